import assert from "node:assert/strict";

const pretrain = new URL("../examples/pretrain.ts", import.meta.url).pathname;

async function run(args: string[]): Promise<{ code: number; stderr: string }> {
  const dir = await Deno.makeTempDir();
  try {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", pretrain, "--steps", "1", "--eval-batches", "1", "--out", dir, ...args],
      stdout: "null",
      stderr: "piped",
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function hasGpu(): Promise<boolean> {
  const { stderr } = await run(["--device", "auto"]);
  return /params on cuda/.test(stderr);
}

Deno.test("--device auto without a GPU runs on the CPU with a one-line notice", async () => {
  if (await hasGpu()) {
    console.log("skipped: a GPU is present");
    return;
  }
  const { code, stderr } = await run(["--device", "auto"]);
  assert.equal(code, 0, stderr);
  const lines = stderr.split("\n").filter((l) => l.startsWith("notice:"));
  assert.deepEqual(lines, ["notice: no usable CUDA device found; running on the CPU"]);
  assert.match(stderr, /params on cpu/);
});

Deno.test("--device cuda without a GPU is a clear one-line error", async () => {
  if (await hasGpu()) {
    console.log("skipped: a GPU is present");
    return;
  }
  const { code, stderr } = await run(["--device", "cuda"]);
  assert.notEqual(code, 0);
  const lines = stderr.trim().split("\n");
  assert.equal(
    lines.at(-1),
    "error: --device cuda: no usable CUDA device (the driver with libcuda, and libnvrtc, libcublas and libcusolver, are needed); use --device cpu or auto",
  );
  assert.ok(!stderr.includes("panicked") && !/\n\s+at /.test(stderr));
});

Deno.test("--precision bf16 without a GPU is a clear one-line error; auto falls back to fp32", async () => {
  if (await hasGpu()) {
    console.log("skipped: a GPU is present");
    return;
  }
  const bad = await run(["--device", "auto", "--precision", "bf16"]);
  assert.equal(bad.code, 1);
  assert.equal(
    bad.stderr.trim().split("\n").at(-1),
    "error: precision = bf16 needs a GPU, and none is usable; use --precision fp32 or auto",
  );
  const ok = await run(["--device", "auto", "--precision", "auto"]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.match(ok.stderr, /params on cpu \(fp32\)/);
});
