/**
 * Ablation: trains adamw, adam8bit, galore, galore8bit and qgalore on the same data with the
 * same seed (a fresh engine each, in this process) and prints one aligned table of
 * validation loss, perplexity, engine memory by category, throughput and projector
 * refreshes. Each optimizer uses its default settings and learning rate; `--rank` and
 * `--update-gap` apply to the three projected ones.
 *
 *     deno run -A examples/ablation.ts                       # llama-9m, rank 32, ~1–2 min
 *     deno run -A examples/ablation.ts --model llama-20m --rank 64 --steps 300
 *     deno run -A examples/ablation.ts --json                # rows as one JSON line
 *
 * Exit codes: 0 done, 1 engine failure, 2 usage error.
 *
 * @module
 */

// First: a missing or stale engine library is one line, before the options open it.
import "../ffi/preflight.ts";
import { parseArgs } from "node:util";
import { EngineError } from "../ffi/engine.ts";
import { LoadError } from "../ffi/loader.ts";
import { UsageError } from "../lib/errors.ts";
import { formatCount, formatDuration } from "../lib/log.ts";
import {
  checkNumber,
  checkOptions,
  OPTIMIZERS,
  PROJECTED_OPTIMIZERS,
  type TrainOptions,
} from "../lib/options.ts";
import { DivergedError, type Summary } from "../lib/summary.ts";
import { train } from "../lib/trainer.ts";

/** One optimizer's outcome. */
export interface AblationRow {
  /** Optimizer name. */
  optimizer: string;
  /** Peak learning rate used (the optimizer's default). */
  lr: number;
  /** Validation loss before training. */
  initial_val_loss: number | null;
  /** Validation loss after training (exact mean over the batches). */
  val_loss: number | null;
  /** exp(val_loss). */
  val_ppl: number | null;
  /** Engine-tracked bytes by category at the end of the run. */
  memory: Summary["memory"];
  /** Weights + optimizer states + projectors, the papers' "memory" column, in bytes. */
  weights_opt_projector: number;
  /** Training throughput. */
  tokens_per_s: number;
  /** Projector refreshes taken. */
  svd_count: number;
  /** Wall time of the run in seconds. */
  wall_s: number;
}

/** Settings of an ablation. */
export interface AblationOptions {
  /** Model preset or JSON config path. */
  model: string;
  /** Updates per optimizer. */
  steps: number;
  /** Sequences per batch. */
  batchSize: number;
  /** Tokens per sequence. */
  seqLen: number;
  /** Rank of the projected optimizers. */
  rank: number;
  /** Projector refresh interval of the projected optimizers. */
  updateGap: number;
  /** Text file, or null for the synthetic corpus. */
  data: string | null;
  /** Weight init and batch sampling seed. */
  seed: number;
  /** Optimizers to compare, in order. */
  optimizers: string[];
  /** Print the rows as one JSON line. */
  json: boolean;
}

/** The default ablation: about a minute on two CPU cores. */
export function defaultAblationOptions(): AblationOptions {
  return {
    model: "llama-9m",
    steps: 300,
    batchSize: 8,
    seqLen: 64,
    rank: 32,
    updateGap: 25,
    data: null,
    seed: 0,
    optimizers: [...OPTIMIZERS],
    json: false,
  };
}

const FLAGS = {
  model: { type: "string" },
  steps: { type: "string" },
  "batch-size": { type: "string" },
  "seq-len": { type: "string" },
  rank: { type: "string" },
  "update-gap": { type: "string" },
  data: { type: "string" },
  seed: { type: "string" },
  optimizers: { type: "string" },
  json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;

/** Parses the ablation flags; returns "help" for `--help`. Throws UsageError on bad input. */
export function parseAblationArgs(argv: string[]): AblationOptions | "help" {
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({ args: argv, options: FLAGS, strict: true, allowPositionals: false })
      .values;
  } catch (e) {
    throw new UsageError(`${(e as Error).message.split("\n")[0]}; see --help`);
  }
  if (values.help) return "help";
  const o = defaultAblationOptions();
  const str = (k: string) => values[k] as string | undefined;
  if (str("model") !== undefined) o.model = str("model")!;
  if (str("steps") !== undefined) o.steps = checkNumber("steps", str("steps")!);
  if (str("batch-size") !== undefined) o.batchSize = checkNumber("batchSize", str("batch-size")!);
  if (str("seq-len") !== undefined) o.seqLen = checkNumber("seqLen", str("seq-len")!);
  if (str("rank") !== undefined) o.rank = checkNumber("rank", str("rank")!);
  if (str("update-gap") !== undefined) o.updateGap = checkNumber("updateGap", str("update-gap")!);
  if (str("seed") !== undefined) o.seed = checkNumber("seed", str("seed")!);
  if (str("data") !== undefined) o.data = str("data") || null;
  if (str("optimizers") !== undefined) {
    o.optimizers = str("optimizers")!.split(",").map((s) => s.trim()).filter((s) => s);
    const bad = o.optimizers.find((n) => !OPTIMIZERS.includes(n));
    if (bad !== undefined || o.optimizers.length === 0) {
      throw new UsageError(
        `--optimizers ${str("optimizers") || '""'}: a comma-separated list of ${
          OPTIMIZERS.join(", ")
        }`,
      );
    }
  }
  o.json = values.json === true;
  // Validate every run up front, so a bad rank or model fails before any training.
  for (const name of o.optimizers) checkOptions(runOptions(o, name));
  return o;
}

/** The training options of one optimizer's run. */
export function runOptions(o: AblationOptions, optimizer: string): Partial<TrainOptions> {
  const projected = PROJECTED_OPTIMIZERS.includes(optimizer);
  return {
    model: o.model,
    optimizer,
    steps: o.steps,
    batchSize: o.batchSize,
    seqLen: o.seqLen,
    data: o.data,
    seed: o.seed,
    evalEvery: 0,
    out: null,
    quiet: true,
    handleSigint: false,
    ...(projected ? { rank: o.rank, updateGap: o.updateGap } : {}),
  };
}

/** Trains each optimizer in turn; `log` receives one line per finished run. */
export async function runAblation(
  o: AblationOptions,
  log: (line: string) => void = () => {},
): Promise<AblationRow[]> {
  const rows: AblationRow[] = [];
  for (const name of o.optimizers) {
    const opts = runOptions(o, name);
    const notices = checkOptions(opts).notices;
    for (const n of notices) log(n);
    // A diverged run still has a summary; its row shows what it reached.
    const s = await train(opts).catch((e) => {
      if (e instanceof DivergedError) return e.summary;
      throw e;
    });
    if (s.diverged) log(`${name}: ${s.error}`);
    const m = s.memory;
    rows.push({
      optimizer: name,
      lr: s.config.lr,
      initial_val_loss: s.initial_val_loss,
      val_loss: s.val_loss,
      val_ppl: s.val_ppl,
      memory: m,
      weights_opt_projector: m.weights + m.optimizer_state + m.projector,
      tokens_per_s: s.tokens_per_s,
      svd_count: s.svd_count,
      wall_s: s.wall_s,
    });
    log(
      `${name}: val loss ${s.initial_val_loss?.toFixed(4)} → ${s.val_loss?.toFixed(4)} in ${
        formatDuration(s.wall_s)
      } (${formatCount(s.tokens_per_s)} tok/s)`,
    );
  }
  return rows;
}

const MIB = 2 ** 20;

/** The rows as an aligned text table (memory in MiB). */
export function formatTable(rows: AblationRow[]): string {
  const head = [
    "optimizer",
    "lr",
    "val loss",
    "ppl",
    "weights",
    "grads",
    "opt state",
    "projector",
    "activ.",
    "W+O+P",
    "total",
    "tok/s",
    "SVDs",
  ];
  const mib = (b: number) => (b / MIB).toFixed(2);
  const body = rows.map((r) => [
    r.optimizer,
    String(r.lr),
    r.val_loss?.toFixed(4) ?? "n/a",
    r.val_ppl?.toFixed(3) ?? "n/a",
    mib(r.memory.weights),
    mib(r.memory.grads),
    mib(r.memory.optimizer_state),
    mib(r.memory.projector),
    mib(r.memory.activations),
    mib(r.weights_opt_projector),
    mib(r.memory.total),
    Math.round(r.tokens_per_s).toString(),
    String(r.svd_count),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((row) => row[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  const rule = widths.map((w) => "-".repeat(w)).join("  ");
  return [line(head), rule, ...body.map(line), "(memory in MiB, as the engine tracks it)"]
    .join("\n");
}

function usage(): string {
  const d = defaultAblationOptions();
  return `Compare the optimizers on one model, one data set and one seed.

Usage: deno run -A examples/ablation.ts [flags]

  --model NAME|FILE     preset or JSON LlamaConfig [${d.model}]
  --steps N             updates per optimizer [${d.steps}]
  --batch-size N        sequences per batch [${d.batchSize}]
  --seq-len N           tokens per sequence [${d.seqLen}]
  --rank N              rank of galore, galore8bit, qgalore [${d.rank}]
  --update-gap N        their projector refresh interval [${d.updateGap}]
  --data FILE           text file [synthetic corpus]
  --seed N              weight init and sampling seed [${d.seed}]
  --optimizers LIST     comma-separated subset [${d.optimizers.join(",")}]
  --json                print the rows as one JSON line on stdout
  -h, --help            show this help`;
}

/** Runs the CLI and returns the exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    const o = parseAblationArgs(argv);
    if (o === "help") {
      console.log(usage());
      return 0;
    }
    console.error(
      `ablation: ${o.model}, ${o.steps} steps of ${o.batchSize}×${o.seqLen} tokens, rank ${o.rank}` +
        `, update gap ${o.updateGap}, seed ${o.seed}`,
    );
    const rows = await runAblation(o, (l) => console.error(l));
    if (o.json) console.log(JSON.stringify(rows));
    else console.log(formatTable(rows));
    return 0;
  } catch (e) {
    if (e instanceof UsageError) return fail(e.message, 2);
    if (e instanceof EngineError || e instanceof LoadError) return fail(e.message, 1);
    throw e;
  }
}

function fail(message: string, code: number): number {
  console.error(`error: ${message}`);
  return code;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
