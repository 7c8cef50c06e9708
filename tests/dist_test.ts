import assert from "node:assert/strict";
import { DIST_MARKER, makeDist } from "../tools/dist.ts";

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

Deno.test("deno task dist --out replaces only a folder it made itself", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // a folder of someone else's files is refused and left untouched
    await Deno.mkdir(`${dir}/mine`);
    await Deno.writeTextFile(`${dir}/mine/notes.txt`, "precious");
    await assert.rejects(
      () => makeDist(`${dir}/mine`, false),
      (e: Error) => e.message.includes(`--out ${dir}/mine`) && e.message.includes(DIST_MARKER),
    );
    assert.equal(await Deno.readTextFile(`${dir}/mine/notes.txt`), "precious");
    assert.deepEqual([...Deno.readDirSync(`${dir}/mine`)].map((e) => e.name), ["notes.txt"]);
    // a file, and a symlink to that folder, are refused too
    await Deno.writeTextFile(`${dir}/file`, "x");
    await assert.rejects(() => makeDist(`${dir}/file`, false), /not a folder/);
    await Deno.symlink(`${dir}/mine`, `${dir}/link`);
    await assert.rejects(() => makeDist(`${dir}/link`, false), /symlink/);
    assert.equal(await Deno.readTextFile(`${dir}/mine/notes.txt`), "precious");
    // a marker that is a symlink does not count
    await Deno.symlink(`${dir}/file`, `${dir}/mine/${DIST_MARKER}`);
    await assert.rejects(() => makeDist(`${dir}/mine`, false), /no \.qgalore-dist/);
    // an empty folder is taken; a folder dist made is replaced (stale files go)
    await Deno.mkdir(`${dir}/empty`);
    const out = await makeDist(`${dir}/empty`, false);
    assert.ok((await Deno.stat(`${out}/${DIST_MARKER}`)).isFile);
    await Deno.writeTextFile(`${out}/stale.txt`, "old");
    await makeDist(out, false);
    await assert.rejects(() => Deno.stat(`${out}/stale.txt`), Deno.errors.NotFound);
    assert.ok((await Deno.stat(`${out}/native/libqgalore.so`)).isFile);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deno task dist --out on a foreign folder: a one-line error, exit 1", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/keep.txt`, "keep");
    const r = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL("../tools/dist.ts", import.meta.url).pathname, "--out", dir],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(r.stderr).trim();
    assert.equal(r.code, 1, err);
    assert.equal(err.split("\n").length, 1, err);
    assert.match(err, /^dist: --out .*\.qgalore-dist/);
    assert.equal(await Deno.readTextFile(`${dir}/keep.txt`), "keep");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
