/**
 * `--proj-grad full` against `factored` (docs/algorithm-spec.md §1.5b): tokens/s and peak RSS
 * of the same training steps, each case in a fresh process (`bench/cpu.ts --case`), the two
 * modes alternating, clipping off (the 60M–1B recipes), fused steps (the default). The timed
 * steps follow a warm-up update that refreshes every projector; with the default refresh gap
 * (200) none of the timed ones refreshes, so every projected matrix is factored there.
 *
 *   deno run -A bench/proj_grad.ts [--cases llama-35m:galore,llama-60m:qgalore] [--reps 2]
 *     [--steps 6] [--batch 8] [--seq 256] [--out FILE.jsonl]
 * @module
 */
import { parseArgs } from "node:util";
import { lscpu } from "./common.ts";

const { values } = parseArgs({
  options: {
    cases: {
      type: "string",
      default: "llama-35m:galore,llama-35m:qgalore,llama-60m:galore,llama-60m:qgalore",
    },
    reps: { type: "string", default: "2" },
    steps: { type: "string", default: "6" },
    batch: { type: "string", default: "8" },
    seq: { type: "string", default: "256" },
    profile: { type: "boolean", default: false },
    out: { type: "string" },
  },
});

interface Row {
  tokens_per_s: number;
  median_tokens_per_s: number;
  tokens_per_cpu_s: number;
  peak_rss: number;
  factored_grads: number;
  profile: Record<string, number> | null;
}

async function one(model: string, opt: string, mode: string): Promise<Row> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL("./cpu.ts", import.meta.url).pathname,
      "--case",
      model,
      "--optimizer",
      opt,
      "--proj-grad",
      mode,
      "--steps",
      values.steps!,
      "--batch",
      values.batch!,
      "--seq",
      values.seq!,
    ],
    env: values.profile ? { QGALORE_PROFILE: "1" } : {},
    stderr: "inherit",
  }).output();
  if (out.code !== 0) throw new Error(`${model} ${opt} ${mode}: exit ${out.code}`);
  return JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").pop()!);
}

const sink = values.out ? await Deno.open(values.out, { create: true, append: true }) : null;
const emit = async (o: Record<string, unknown>): Promise<void> => {
  const line = JSON.stringify(o);
  console.log(line);
  if (sink) await sink.write(new TextEncoder().encode(line + "\n"));
};
await emit({
  kind: "machine",
  cpu: lscpu(),
  date: new Date().toISOString(),
  batch: Number(values.batch),
  seq: Number(values.seq),
  steps: Number(values.steps),
  clip: 0,
  fused: true,
});
const table: string[] = [
  "| model, optimizer | full tokens/s | factored tokens/s | factored ÷ full | ÷ per CPU-second | peak RSS full / factored |",
  "|---|---|---|---|---|---|",
];
for (const c of values.cases!.split(",")) {
  const [model, opt] = c.split(":");
  const runs: Record<string, Row[]> = { full: [], factored: [] };
  for (let r = 0; r < Number(values.reps); r++) {
    for (const mode of r % 2 === 0 ? ["full", "factored"] : ["factored", "full"]) {
      const row = await one(model, opt, mode);
      runs[mode].push(row);
      await emit({ kind: "run", ...row, case: c, mode, rep: r + 1 });
    }
  }
  // the best of the repetitions' median step (a shared VM only ever slows a step down), and
  // tokens per process CPU-second (steal time excluded)
  const best = (m: string): number => Math.max(...runs[m].map((x) => x.median_tokens_per_s));
  const perCpu = (m: string): number => Math.max(...runs[m].map((x) => x.tokens_per_cpu_s));
  const rss = (m: string): number => Math.max(...runs[m].map((x) => x.peak_rss));
  const ratio = best("factored") / best("full");
  const cpuRatio = perCpu("factored") / perCpu("full");
  await emit({
    kind: "case",
    case: c,
    full: best("full"),
    factored: best("factored"),
    ratio,
    full_per_cpu_s: perCpu("full"),
    factored_per_cpu_s: perCpu("factored"),
    cpu_ratio: cpuRatio,
  });
  const gb = (b: number): string => (b / 1e9).toFixed(2);
  table.push(
    `| ${model} ${opt} | ${best("full").toFixed(0)} | ${best("factored").toFixed(0)} | ${
      ratio.toFixed(2)
    } | ${cpuRatio.toFixed(2)} | ${gb(rss("full"))} / ${gb(rss("factored"))} GB |`,
  );
}
console.log(table.join("\n"));
sink?.close();
