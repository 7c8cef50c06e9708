/**
 * Bytes each rank all-reduces per optimizer update in a data-parallel GaLore run, low-rank
 * communication (`--dp-comm lowrank`, rust/src/dist/lowrank.rs, docs/algorithm-spec.md §1.5a)
 * versus a full-gradient all-reduce, for the paper's LLaMA shapes at GaLore ranks 128–1024.
 * Pure arithmetic from the engine's byte plan (`planEngine`: each tensor's shape and its
 * projector geometry, ranks clamped as the engine clamps them); no cluster is needed, and the
 * accounting is the one `summary.data_parallel.comm` reports (tests/dp_lowrank_test.ts checks it
 * on a real 2-rank run).
 *
 * Per update: steady = R of every projected matrix + unprojected tensors whole + 16 bytes of
 * scalars (loss, target count); refresh = the same step with every projected matrix whole
 * (svd/eigh refresh; all matrices refresh together without --lazy); randomized refresh = the
 * sketches Z, Y′, Z′ (2·max(rows, cols)·r′ + r′·min(rows, cols) elements) and R of each
 * projected matrix instead where that is less than its gradient (`--proj-refresh randomized`,
 * from the second refresh on);
 * amortized = one refresh per `gap` updates.
 * Sizes are the same for every number of ranks (a sum all-reduce's buffer; what the wire carries
 * per rank depends on the MPI/NCCL algorithm, about 2× the buffer for a ring).
 *
 *   deno run -A bench/comm_bytes.ts [--gap 200] [--vocab 32000] [--out bench/results/comm-bytes-DATE]
 * @module
 */
import { parseArgs } from "node:util";
import { planEngine } from "../ffi/engine.ts";
import { benchConfig } from "./common.ts";

const { values: args } = parseArgs({
  options: {
    gap: { type: "string", default: "200" },
    vocab: { type: "string", default: "32000" },
    out: { type: "string" },
  },
});
const GAP = Number(args.gap);
const VOCAB = Number(args.vocab);
const MODELS = ["llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b"];
const RANKS = [128, 256, 512, 1024];

interface Row {
  model: string;
  vocab: number;
  rank: number;
  params: number;
  projected_matrices: number;
  clamped: number;
  gap: number;
  full_allreduce: number;
  lowrank_steady: number;
  lowrank_refresh: number;
  lowrank_amortized: number;
  randomized_refresh: number;
  randomized_amortized: number;
  steady_vs_full: number;
  amortized_vs_full: number;
}

const rows: Row[] = [];
for (const model of MODELS) {
  for (const rank of RANKS) {
    const plan = planEngine(
      benchConfig({ model, vocab: VOCAB, optimizer: "galore", rank, batchSize: 1, seqLen: 256 }),
      model,
    );
    if (plan.problem) throw new Error(`${model} rank ${rank}: ${plan.problem.why}`);
    let low = 0, whole = 0, unproj = 0, n = 0, clamped = 0, sketch = 0;
    for (const t of plan.tensors) {
      const bytes = 4 * t.rows * t.cols;
      if (t.projector) {
        n++;
        low += 4 * t.projector.low;
        whole += bytes;
        const r = t.projector.rank;
        // the sketches and R, or the whole gradient where that is less (`sketch_pays`)
        sketch += Math.min(
          4 * (2 * Math.max(t.rows, t.cols) * r + r * Math.min(t.rows, t.cols)) +
            4 * t.projector.low,
          bytes,
        );
        if (t.projector.rank < rank) clamped++;
      } else {
        unproj += bytes;
      }
    }
    const full = whole + unproj + 16;
    const steady = low + unproj + 16;
    const refresh = whole + unproj + 16;
    const amortized = ((GAP - 1) * steady + refresh) / GAP;
    const randomized = sketch + unproj + 16;
    rows.push({
      model,
      vocab: VOCAB,
      rank,
      params: plan.params,
      projected_matrices: n,
      clamped,
      gap: GAP,
      full_allreduce: full,
      lowrank_steady: steady,
      lowrank_refresh: refresh,
      lowrank_amortized: Math.round(amortized),
      randomized_refresh: randomized,
      randomized_amortized: Math.round(((GAP - 1) * steady + randomized) / GAP),
      steady_vs_full: steady / full,
      amortized_vs_full: amortized / full,
    });
  }
}

const mb = (b: number) => (b / 1e6).toFixed(1);
const jsonl = rows.map((r) => JSON.stringify(r)).join("\n") + "\n";
const md = [
  `Bytes all-reduced per update and rank (f32), GaLore at vocab ${VOCAB}, refresh gap ${GAP}; ` +
  "computed from the engine's plan (`deno run -A bench/comm_bytes.ts`).",
  "",
  "| model | rank | full all-reduce MB | low-rank steady MB | refresh step MB (svd/eigh) | refresh step MB (randomized) | amortized MB (svd/eigh) | steady / full | amortized / full |",
  "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ...rows.map((r) =>
    `| ${r.model} | ${r.rank}${r.clamped ? ` (${r.clamped} clamped)` : ""} | ${
      mb(r.full_allreduce)
    } | ${mb(r.lowrank_steady)} | ${mb(r.lowrank_refresh)} | ${mb(r.randomized_refresh)} | ${
      mb(r.lowrank_amortized)
    } | ${r.steady_vs_full.toFixed(3)} | ${r.amortized_vs_full.toFixed(3)} |`
  ),
  "",
].join("\n");
console.log(jsonl.trimEnd());
console.log();
console.log(md);
if (args.out) {
  Deno.writeTextFileSync(`${args.out}.jsonl`, jsonl);
  Deno.writeTextFileSync(`${args.out}.md`, md);
}
