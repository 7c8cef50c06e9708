/**
 * Q-GaLore memory and speed benchmark (issue: Q-GaLore on the CPU engine).
 * On llama-35m (byte vocabulary, seq 256, batch 8) it measures adamw, galore and qgalore
 * at the same rank and prints one JSON line per optimizer, then the ratios the targets
 * name: qgalore's weights + optimizer state + projector bytes against adamw's and
 * galore's, qgalore's tokens/s against adamw's, and the share of run time spent in
 * projector refreshes with lazy exploration on and off.
 *
 *   deno run -A bench/qgalore.ts [--model llama-35m] [--rank 128] [--steps 4]
 *                                [--refresh-steps 60] [--gap 10]
 * @module
 */
import { parseArgs } from "node:util";
import { Engine, type OptimizerConfig } from "../ffi/engine.ts";
import { benchConfig, optimizerConfig } from "./common.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string", default: "llama-35m" },
    rank: { type: "string", default: "128" },
    batch: { type: "string", default: "8" },
    seq: { type: "string", default: "256" },
    steps: { type: "string", default: "4" },
    "refresh-steps": { type: "string", default: "60" },
    gap: { type: "string", default: "10" },
  },
});
const [b, t, rank] = [Number(values.batch), Number(values.seq), Number(values.rank)];

function batch(seed: number): Int32Array {
  const tokens = new Int32Array(b * (t + 1));
  let x = seed >>> 0;
  for (let i = 0; i < tokens.length; i++) tokens[i] = (x = (x * 1103515245 + 12345) >>> 0) % 256;
  return tokens;
}

async function engine(opt: Record<string, unknown>): Promise<Engine> {
  const run = { model: values.model!, vocab: 256, rank, batchSize: b, seqLen: t };
  return await Engine.create({
    ...benchConfig({ ...run, optimizer: String(opt.name), device: "cpu" }),
    optimizer: opt as OptimizerConfig,
  });
}

interface Row {
  optimizer: string;
  tokens_per_s: number;
  state_bytes: number;
  memory: Record<string, number>;
  svd_count: number;
  refresh_seconds: number;
}

async function measure(name: string): Promise<Row> {
  const e = await engine(optimizerConfig(name, rank, values.model!));
  await e.trainStep(batch(1), 1, 1e-3); // first step: initial projector refresh
  const steps = Number(values.steps);
  const t0 = performance.now();
  for (let s = 0; s < steps; s++) await e.trainStep(batch(2 + s), 1, 1e-3);
  const sec = (performance.now() - t0) / 1000;
  const m = e.memory();
  const info = e.info();
  e[Symbol.dispose]();
  return {
    optimizer: name,
    tokens_per_s: Math.round(steps * b * t / sec),
    state_bytes: m.weights + m.optimizer_state + m.projector,
    memory: { ...m },
    svd_count: Number(info.svd_count ?? 0),
    refresh_seconds: Number(info.refresh_seconds ?? 0),
  };
}

async function refreshShare(lazy: boolean): Promise<Record<string, unknown>> {
  const gap = Number(values.gap);
  const steps = Number(values["refresh-steps"]);
  const cfg = { ...optimizerConfig("qgalore", rank, values.model!), update_gap: gap, lazy };
  const e = await engine(cfg);
  const t0 = performance.now();
  for (let s = 0; s < steps; s++) await e.trainStep(batch(100 + s), 1, 1e-3);
  const wall = (performance.now() - t0) / 1000;
  const info = e.info();
  e[Symbol.dispose]();
  const refresh = Number(info.refresh_seconds);
  const svd = Number(info.svd_count);
  const perMatrix = refresh / Math.max(svd, 1);
  const matrices = Object.keys(info.gaps as object).length;
  const stepS = (wall - refresh) / steps;
  return {
    lazy,
    gap,
    steps,
    svd_count: svd,
    refresh_seconds: Math.round(refresh * 1000) / 1000,
    wall_s: Math.round(wall * 10) / 10,
    refresh_share: Math.round(refresh / wall * 10000) / 10000,
    // without lazy growth, T = 200 refreshes every matrix once per 200 steps
    share_at_gap_200:
      Math.round(perMatrix * matrices / (perMatrix * matrices + 200 * stepS) * 1e5) /
      1e5,
    final_gaps: [...new Set(Object.values(info.gaps as Record<string, number>))].sort((x, y) =>
      x - y
    ),
  };
}

const rows: Record<string, Row> = {};
for (const name of ["adamw", "galore", "qgalore"]) {
  rows[name] = await measure(name);
  console.log(JSON.stringify({ model: values.model, rank, batch: b, seq: t, ...rows[name] }));
}
const q = rows.qgalore;
console.log(JSON.stringify({
  ratio_state_vs_adamw: Math.round(q.state_bytes / rows.adamw.state_bytes * 1000) / 1000,
  ratio_state_vs_galore: Math.round(q.state_bytes / rows.galore.state_bytes * 1000) / 1000,
  ratio_tokens_per_s_vs_adamw: Math.round(q.tokens_per_s / rows.adamw.tokens_per_s * 1000) / 1000,
  targets: { state_vs_adamw: "<= 0.2", state_vs_galore: "<= 0.5", speed_vs_adamw: ">= 0.8" },
}));
for (const lazy of [true, false]) console.log(JSON.stringify(await refreshShare(lazy)));
