import assert from "node:assert/strict";

const pretrain = new URL("../examples/pretrain.ts", import.meta.url).pathname;

async function run(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number; stderr: string }> {
  const dir = await Deno.makeTempDir();
  try {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", pretrain, "--steps", "1", "--eval-batches", "1", "--out", dir, ...args],
      stdout: "null",
      stderr: "piped",
      env,
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Whether the engine runs `--precision bf16` on this CPU (AVX512-BF16 or AMX-BF16, or the
 * test-only `QGALORE_CPU_BF16` override). */
function cpuRunsBf16(): boolean {
  if (Deno.env.get("QGALORE_CPU_BF16")) return true;
  try {
    return /\b(avx512_bf16|amx_bf16)\b/.test(Deno.readTextFileSync("/proc/cpuinfo"));
  } catch {
    return false;
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
  if (!cpuRunsBf16()) {
    const bad = await run(["--device", "auto", "--precision", "bf16"]);
    assert.equal(bad.code, 1);
    assert.equal(
      bad.stderr.trim().split("\n").at(-1),
      "error: precision = bf16: no usable GPU, and the CPU needs AVX512-BF16 or AMX-BF16, which this processor lacks; use --precision fp32 or auto",
    );
    const cpu = await run(["--device", "cpu", "--precision", "bf16"]);
    assert.equal(cpu.code, 2, "a usage error: refused before the engine starts");
    assert.equal(
      cpu.stderr.trim().split("\n").at(-1),
      "error: --precision bf16 on the CPU needs AVX512-BF16 or AMX-BF16, which this processor lacks; use --precision fp32 or auto",
    );
  }
  const ok = await run(["--device", "auto", "--precision", "auto"]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.match(ok.stderr, /params on cpu \(fp32\)/);
});

Deno.test("--device cpu --precision bf16 runs the CPU's bf16 path (QGALORE_CPU_BF16=emulate where the CPU lacks it)", async () => {
  const ok = await run(["--device", "cpu", "--precision", "bf16"], { QGALORE_CPU_BF16: "emulate" });
  assert.equal(ok.code, 0, ok.stderr);
  assert.match(ok.stderr, /params on cpu \(bf16\)/);
});
