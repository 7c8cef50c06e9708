import assert from "node:assert/strict";
import { makeDist } from "../tools/dist.ts";

Deno.test("deno task dist: the folder trains with no checkout and no Rust next to it", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const out = await makeDist(`${dir}/qgalore`, false);
    for (
      const f of ["native/libqgalore.so", "mod.ts", "ffi/loader.ts", "examples/pretrain.ts", "run"]
    ) {
      assert.ok((await Deno.stat(`${out}/${f}`)).isFile, f);
    }
    const run = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--config",
        `${out}/deno.json`,
        `${out}/examples/pretrain.ts`,
        "--steps",
        "2",
        "--eval-batches",
        "1",
        "--json",
        "--out",
        `${dir}/run`,
      ],
      cwd: dir,
      env: { QGALORE_LIB: "" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(run.stderr);
    assert.equal(run.code, 0, err);
    const summary = JSON.parse(new TextDecoder().decode(run.stdout).trim().split("\n").at(-1)!);
    assert.equal(summary.steps, 2);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
