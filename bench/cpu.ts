/**
 * CPU training benchmark (issue: foundation). For each case it starts a fresh process,
 * trains a few steps with real batches and prints one JSON line: tokens/s, peak RSS, and
 * the model FLOP rate (6 × params × tokens/s) against one large f32 GEMM measured in the
 * same process. Then it times the default `pretrain` run end to end.
 *
 *   deno task bench            # all cases
 *   deno run -A bench/cpu.ts --case llama-60m --optimizer qgalore [--checkpointing]
 *     [--proj-grad full|factored] [--precision fp32|bf16]
 * @module
 */
import { parseArgs } from "node:util";
import process from "node:process";
import { Engine, gemmGflops } from "../ffi/engine.ts";
import { defaultTrainOptions } from "../lib/options.ts";
import { peakRssBytes } from "../lib/memory.ts";
import { benchConfig } from "./common.ts";
import type { Precision } from "../lib/option_table.ts";

const { values } = parseArgs({
  options: {
    case: { type: "string" },
    optimizer: { type: "string", default: "adamw" },
    batch: { type: "string", default: "8" },
    seq: { type: "string", default: "256" },
    steps: { type: "string", default: "4" },
    rank: { type: "string", default: "128" },
    "skip-default-run": { type: "boolean", default: false },
    checkpointing: { type: "boolean", default: false },
    "proj-grad": { type: "string" },
    precision: { type: "string", default: "fp32" },
  },
});

async function runCase(name: string, opt: string, b: number, t: number, steps: number) {
  const e = await Engine.create(benchConfig({
    model: name,
    vocab: 256,
    optimizer: opt,
    rank: Number(values.rank),
    batchSize: b,
    seqLen: t,
    device: "cpu",
    checkpointing: values.checkpointing,
    projGrad: values["proj-grad"],
    precision: values.precision as Precision,
  }));
  const tokens = new Int32Array(b * (t + 1));
  let x = 12345;
  for (let i = 0; i < tokens.length; i++) tokens[i] = (x = (x * 1103515245 + 12345) >>> 0) % 256;
  await e.trainStep(tokens, 1, 1e-3); // warm-up (first refresh, page faults)
  // per-step wall times (the median resists a noisy shared machine) and process CPU time
  // (steal time on a shared VM is not counted)
  const stepS: number[] = [];
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  for (let s = 0; s < steps; s++) {
    const ts = performance.now();
    await e.trainStep(tokens, 1, 1e-3);
    stepS.push((performance.now() - ts) / 1000);
  }
  const sec = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const cpuS = (cpu.user + cpu.system) / 1e6;
  const median = [...stepS].sort((x, y) => x - y)[Math.floor(steps / 2)];
  const tps = steps * b * t / sec;
  const gemm = await gemmGflops(2048, 2048, 2048, 3);
  const achieved = 6 * e.params * tps / 1e9;
  const mem = e.memory();
  const info = e.info();
  e[Symbol.dispose]();
  return {
    case: name,
    optimizer: opt,
    checkpointing: values.checkpointing,
    batch: b,
    seq: t,
    params: e.params,
    tokens_per_s: Math.round(tps * 10) / 10,
    step_s: Math.round(sec / steps * 1000) / 1000,
    median_tokens_per_s: Math.round(b * t / median * 10) / 10,
    tokens_per_cpu_s: Math.round(steps * b * t / cpuS * 10) / 10,
    model_gflops: Math.round(achieved * 10) / 10,
    gemm_gflops: Math.round(gemm * 10) / 10,
    gemm_ratio: Math.round(achieved / gemm * 1000) / 1000,
    peak_rss: peakRssBytes(),
    memory: mem,
    refresh_seconds: info.refresh_seconds ?? 0,
    svd_count: info.svd_count ?? 0,
    proj_grad: values["proj-grad"] ?? null,
    precision: values.precision,
    factored_grads: info.factored_grads ?? 0,
    profile: info.profile ?? null,
  };
}

async function child(args: string[]): Promise<Record<string, unknown>> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", import.meta.filename!, ...args],
    stderr: "inherit",
  }).output();
  const text = new TextDecoder().decode(out.stdout).trim().split("\n").pop() ?? "{}";
  return JSON.parse(text);
}

if (!import.meta.main) {
  // imported for its helpers only
} else if (values.case) {
  const r = await runCase(
    values.case,
    values.optimizer!,
    Number(values.batch),
    Number(values.seq),
    Number(values.steps),
  );
  console.log(JSON.stringify(r));
} else {
  const def = defaultTrainOptions();
  const cases: [string, number, number][] = [
    [String(def.model), def.batchSize, def.seqLen],
    ["llama-35m", 8, 256],
    ["llama-60m", 8, 256],
  ];
  for (const [name, b, t] of cases) {
    console.log(JSON.stringify(await child(["--case", name, "--batch", `${b}`, "--seq", `${t}`])));
  }
  if (!values["skip-default-run"]) {
    const dir = await Deno.makeTempDir();
    const t0 = performance.now();
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        new URL("../examples/pretrain.ts", import.meta.url).pathname,
        "--json",
        "--out",
        dir,
      ],
      stderr: "null",
    }).output();
    const wall = (performance.now() - t0) / 1000;
    const s = JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").pop() ?? "{}");
    console.log(JSON.stringify({
      case: "default pretrain run",
      exit: out.code,
      wall_s: Math.round(wall * 10) / 10,
      initial_val_loss: s.initial_val_loss,
      val_loss: s.val_loss,
      reduction: s.initial_val_loss ? 1 - s.val_loss / s.initial_val_loss : null,
      entropy_floor: s.entropy_floor,
      tokens_per_s: s.tokens_per_s,
    }));
    await Deno.remove(dir, { recursive: true });
  }
}
