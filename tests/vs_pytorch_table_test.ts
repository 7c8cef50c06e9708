/**
 * bench/vs_pytorch_table.ts on recorded lines: a bf16 case whose ours side is unavailable on
 * the processor shows the engine's reason and still tabulates the PyTorch (autocast) number.
 */
import assert from "node:assert/strict";
import { table } from "../bench/vs_pytorch_table.ts";

const reason = "ours: not available on this CPU (--precision bf16 on the CPU needs " +
  "AVX512-BF16 or AMX-BF16, which this processor lacks; use --precision fp32 or auto)";

Deno.test("vs_pytorch table: fp32 rows and a bf16 row with ours unavailable", () => {
  const lines = [
    {
      kind: "machine",
      date: "2026-12-03T14:40:00.000Z",
      cpu: { model_name: "AMD EPYC", family: "25", model: "1", cpus: "2", simd: ["avx2", "fma"] },
      threads: 2,
      batch: 8,
      seq: 256,
      steps: 8,
      warmup: 2,
      reps: 1,
      gemm_2048: { ours_gflops: 150, torch_gflops: 250, torch_gflops_best: 260, ratio: 0.6 },
      versions: { torch: "2.5", deno: "2.9.6" },
    },
    {
      kind: "run",
      rep: 1,
      case: "llama-35m:adamw",
      side: "ours",
      precision: "fp32",
      tokens_per_s: 1500,
      tokens_per_cpu_s: 750,
      peak_rss_self: 0.7e9,
      load_before: 2.1,
    },
    {
      kind: "run",
      rep: 1,
      case: "llama-35m:adamw",
      side: "pytorch",
      precision: "fp32",
      tokens_per_s: 2000,
      tokens_per_cpu_s: 1000,
      peak_rss_self: 1.7e9,
      load_before: 2.0,
    },
    {
      kind: "run",
      rep: 1,
      case: "llama-35m:adamw:bf16",
      side: "ours",
      precision: "bf16",
      unavailable: reason,
    },
    {
      kind: "run",
      rep: 1,
      case: "llama-35m:adamw:bf16",
      side: "pytorch",
      precision: "bf16",
      autocast: 'torch.autocast("cpu", dtype=torch.bfloat16)',
      tokens_per_s: 2400,
      tokens_per_cpu_s: 1200,
      peak_rss_self: 1.5e9,
      load_before: 2.2,
    },
  ];
  const rows = table(lines).split("\n").filter((l) => l.startsWith("| llama"));
  assert.deepEqual(rows, [
    "| llama-35m adamw | 1,500 | 2,000 | 0.75 | 0.75 | 0.70 / 1.70 GB | 2.0–2.1 |",
    `| llama-35m adamw bf16 | ${reason} | 2,400 | – | – | – / 1.50 GB | 2.2 |`,
  ]);
});
