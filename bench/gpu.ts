/**
 * GPU benchmark (issue: CUDA backend). For llama-60m/130m/350m/1b at seq 256 with adamw,
 * galore8bit and qgalore it prints one JSON line each: tokens/s, the step-time breakdown
 * (forward, backward with fused updates, optimizer, projector refresh), measured peak
 * device memory and model FLOP utilisation against the GPU's dense bf16 peak; then one
 * qgalore step of llama-7b at batch 1 with its peak device memory. Each line also carries
 * the engine's own estimate of its tracked bytes (`estimateMemory`), the cost of one full
 * projector refresh (the first step refreshes every matrix) and the share of run time that
 * refreshes would take at the reference gap T = 200 without any lazy growth (an upper
 * bound). With `--save` the lines also go to bench/results/gpu-<date>.jsonl. Needs a CUDA
 * device (exits 2 if there is none).
 *
 *   deno run -A bench/gpu.ts [--models llama-60m,llama-1b] [--steps 5] [--batch 8]
 *     [--precision bf16|fp32] [--checkpointing] [--save]
 *
 * `--checkpointing` applies to the model cases; the llama-7b step always runs with it (its
 * memory-minimal configuration).
 * @module
 */
import { parseArgs } from "node:util";
import { Engine, EngineError } from "../ffi/engine.ts";
import { estimateMemory } from "../lib/estimate.ts";
import { modelConfig } from "../lib/presets.ts";
import { benchConfig } from "./common.ts";

const { values } = parseArgs({
  options: {
    models: { type: "string", default: "llama-60m,llama-130m,llama-350m,llama-1b" },
    optimizers: { type: "string", default: "adamw,galore8bit,qgalore" },
    steps: { type: "string", default: "5" },
    batch: { type: "string", default: "8" },
    seq: { type: "string", default: "256" },
    "peak-tflops": { type: "string", default: "989" },
    precision: { type: "string", default: "bf16" },
    checkpointing: { type: "boolean", default: false },
    "skip-7b": { type: "boolean", default: false },
    save: { type: "boolean", default: false },
  },
});

/** Ranks of the reference runs (docs/algorithm-spec.md §1.7): 128/256/256/1024 (1B as the scripts). */
const RANK: Record<string, number> = {
  "llama-60m": 128,
  "llama-130m": 256,
  "llama-350m": 256,
  "llama-1b": 1024,
  "llama-7b": 1024,
};

const lines: string[] = [];
function emit(o: Record<string, unknown>): void {
  const s = JSON.stringify(o);
  lines.push(s);
  console.log(s);
}

const precision = values.precision === "fp32" ? "fp32" : "bf16";
if (values.precision !== precision) {
  console.error(`error: --precision ${values.precision}: must be bf16 or fp32`);
  Deno.exit(2);
}

async function runCase(
  name: string,
  opt: string,
  batch: number,
  steps: number,
  checkpointing = values.checkpointing!,
) {
  const t = Number(values.seq);
  const model = modelConfig(name, 32000);
  const rank = RANK[name] ?? 128;
  let e: Engine;
  try {
    e = await Engine.create(benchConfig({
      model: name,
      vocab: 32000,
      optimizer: opt,
      rank,
      batchSize: batch,
      seqLen: t,
      device: "cuda",
      precision,
      checkpointing,
    }));
  } catch (err) {
    if (err instanceof EngineError) {
      emit({ case: name, optimizer: opt, batch, error: err.message });
      return;
    }
    throw err;
  }
  const tokens = new Int32Array(batch * (t + 1));
  let x = 7;
  for (let i = 0; i < tokens.length; i++) tokens[i] = (x = (x * 1103515245 + 12345) >>> 0) % 32000;
  await e.trainStep(tokens, 1, 1e-4); // first step: kernel load, initial refresh
  const before = e.info();
  const refreshOnce = Number(before.refresh_seconds ?? 0);
  const t0 = performance.now();
  for (let s = 0; s < steps; s++) await e.trainStep(tokens, 1, 1e-4);
  const sec = (performance.now() - t0) / 1000;
  const after = e.info();
  const d = (k: string) =>
    ((after.timing as Record<string, number>)[k] - (before.timing as Record<string, number>)[k]) /
    steps;
  const tps = steps * batch * t / sec;
  emit({
    case: name,
    optimizer: opt,
    precision,
    checkpointing,
    batch,
    seq: t,
    rank: opt === "adamw" ? null : RANK[name],
    params: e.params,
    tokens_per_s: Math.round(tps),
    step_s: Math.round(sec / steps * 1e4) / 1e4,
    forward_s: Math.round(d("forward_s") * 1e4) / 1e4,
    backward_s: Math.round(d("backward_s") * 1e4) / 1e4,
    optimizer_s: Math.round(d("optimizer_s") * 1e4) / 1e4,
    refresh_s: Math.round(
      (Number(after.refresh_seconds ?? 0) - Number(before.refresh_seconds ?? 0)) / steps * 1e4,
    ) / 1e4,
    refresh_once_s: Math.round(refreshOnce * 1e4) / 1e4,
    refresh_share_at_t200: opt === "adamw"
      ? null
      : Math.round(refreshOnce / (refreshOnce + 200 * sec / steps) * 1e4) / 1e4,
    peak_device_bytes: after.peak_device_bytes,
    engine_memory: e.memory(),
    estimated_memory: estimateMemory(model, { name: opt, rank }, {
      batchSize: batch,
      seqLen: t,
      precision,
      checkpointing,
    }).total,
    mfu: Math.round(6 * e.params * tps / (Number(values["peak-tflops"]) * 1e12) * 1e4) / 1e4,
  });
  e[Symbol.dispose]();
}

try {
  using probe = await Engine.create(benchConfig({
    model: "llama-9m",
    vocab: 256,
    optimizer: "adamw",
    rank: 8,
    batchSize: 1,
    seqLen: 8,
    device: "cuda",
  }));
  emit({
    device: probe.device,
    gpu: probe.info().device_name,
    precision,
    date: new Date().toISOString().slice(0, 10),
  });
} catch (err) {
  console.error(`error: ${(err as Error).message}`);
  Deno.exit(2);
}
for (const name of values.models!.split(",")) {
  for (const opt of values.optimizers!.split(",")) {
    await runCase(name, opt, Number(values.batch), Number(values.steps));
  }
}
if (!values["skip-7b"]) await runCase("llama-7b", "qgalore", 1, 1, true);
if (values.save) {
  const date = new Date().toISOString().slice(0, 10);
  const path = new URL(`./results/gpu-${date}.jsonl`, import.meta.url).pathname;
  await Deno.writeTextFile(path, lines.join("\n") + "\n");
  console.error(`saved ${path}`);
}
