/**
 * Training options, their defaults and their validation. Each option has a CLI flag (see
 * {@link FLAG}); error messages name the flag so they read the same from the CLI and from a
 * notebook.
 *
 * @module
 */

import { UsageError } from "./errors.ts";
import { type ModelConfig, type ResolvedModel, resolveModel, validateModel } from "./presets.ts";
import { ByteTokenizer } from "./tokenizer.ts";

/** Optimizers the engine implements; the single list every check and message uses. */
export const OPTIMIZERS: readonly string[] = Object.freeze(["adamw"]);

/** Devices `--device` accepts. */
export const DEVICES: readonly ["cpu", "cuda", "auto"] = Object.freeze(
  ["cpu", "cuda", "auto"] as const,
);

/** Where the engine runs; "auto" picks CUDA when available. */
export type Device = typeof DEVICES[number];

/** Everything a training run needs. {@link defaultTrainOptions} fills in all of it. */
export interface TrainOptions {
  /** Preset name (`llama-9m` …), path to a JSON LlamaConfig, or a config object. */
  model: string | ModelConfig;
  /** Optimizer name, one of {@link OPTIMIZERS}. */
  optimizer: string;
  /** Peak learning rate. */
  lr: number;
  /** Cosine floor as a fraction of `lr`. */
  minLrRatio: number;
  /** Warmup updates; null means 10% of `steps`, as in the recipe. */
  warmup: number | null;
  /** Optimizer updates. */
  steps: number;
  /** Sequences per micro-batch. */
  batchSize: number;
  /** Tokens per sequence (inputs; each row carries one extra target token). */
  seqLen: number;
  /** Micro-batches accumulated per update. */
  gradAccum: number;
  /** Global gradient-norm clipping threshold; 0 disables clipping. */
  clip: number;
  /** Decoupled (AdamW) weight decay. */
  weightDecay: number;
  /** Adam β1. */
  beta1: number;
  /** Adam β2. */
  beta2: number;
  /** Adam ε. */
  eps: number;
  /** Text file to train on (bytes); null uses the synthetic corpus. */
  data: string | null;
  /** Fraction of a text file held out for validation (its tail). */
  valFraction: number;
  /** Evaluate every this many updates (0: only at the start and the end). */
  evalEvery: number;
  /** Validation batches per evaluation (fixed windows, the same in every run). */
  evalBatches: number;
  /** Seed of the weight init and the batch sampling. */
  seed: number;
  /** Engine worker threads; null lets the engine decide. */
  threads: number | null;
  /** Device for the engine. */
  device: Device;
  /** Output directory; undefined means `runs/<ISO timestamp>`, null writes no files. */
  out?: string | null;
  /** Plain-log interval in updates; 0 picks about 20 lines per run. */
  logEvery: number;
  /** No progress output at all (e.g. in a notebook). */
  quiet: boolean;
  /** Reference schedule: the first update uses lr 0 (see `lrAt` in lib/schedule.ts). */
  zeroFirst: boolean;
  /** Stop gracefully on Ctrl-C (SIGINT) instead of dying. */
  handleSigint: boolean;
}

/** CLI flag of each option. */
export const FLAG: Readonly<Record<keyof TrainOptions, string>> = Object.freeze({
  model: "--model",
  optimizer: "--optimizer",
  lr: "--lr",
  minLrRatio: "--min-lr-ratio",
  warmup: "--warmup",
  steps: "--steps",
  batchSize: "--batch-size",
  seqLen: "--seq-len",
  gradAccum: "--grad-accum",
  clip: "--clip",
  weightDecay: "--weight-decay",
  beta1: "--beta1",
  beta2: "--beta2",
  eps: "--eps",
  data: "--data",
  valFraction: "--val-fraction",
  evalEvery: "--eval-every",
  evalBatches: "--eval-batches",
  seed: "--seed",
  threads: "--threads",
  device: "--device",
  out: "--out",
  logEvery: "logEvery",
  quiet: "quiet",
  zeroFirst: "zeroFirst",
  handleSigint: "handleSigint",
});

/**
 * The default run: small enough to finish in about two minutes on two CPU cores while
 * driving the synthetic corpus's validation loss well below its start.
 */
export function defaultTrainOptions(): TrainOptions {
  return {
    model: "llama-9m",
    optimizer: "adamw",
    lr: 5e-3,
    minLrRatio: 0.1,
    warmup: null,
    steps: 300,
    batchSize: 8,
    seqLen: 128,
    gradAccum: 1,
    clip: 1.0,
    weightDecay: 0,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    data: null,
    valFraction: 0.1,
    evalEvery: 100,
    evalBatches: 8,
    seed: 0,
    threads: null,
    device: "auto",
    logEvery: 0,
    quiet: false,
    zeroFirst: false,
    handleSigint: true,
  };
}

/** Options whose value is a number. */
export type NumericKey =
  | "lr"
  | "minLrRatio"
  | "warmup"
  | "steps"
  | "batchSize"
  | "seqLen"
  | "gradAccum"
  | "clip"
  | "weightDecay"
  | "beta1"
  | "beta2"
  | "eps"
  | "valFraction"
  | "evalEvery"
  | "evalBatches"
  | "seed"
  | "threads"
  | "logEvery";

interface Range {
  int?: boolean;
  /** Lower bound; `open` makes it strict. */
  min: number;
  open?: boolean;
  /** Upper bound; `maxOpen` makes it strict. */
  max?: number;
  maxOpen?: boolean;
}

const RANGES: Readonly<Record<NumericKey, Range>> = {
  // The engine takes lr as f32; anything larger would arrive as infinity.
  lr: { min: 0, open: true, max: 3.4e38 },
  minLrRatio: { min: 0, max: 1 },
  warmup: { int: true, min: 0 },
  steps: { int: true, min: 1 },
  batchSize: { int: true, min: 1 },
  seqLen: { int: true, min: 1 },
  gradAccum: { int: true, min: 1 },
  clip: { min: 0 },
  weightDecay: { min: 0 },
  beta1: { min: 0, max: 1, maxOpen: true },
  beta2: { min: 0, max: 1, maxOpen: true },
  eps: { min: 0, open: true },
  valFraction: { min: 0, open: true, max: 1, maxOpen: true },
  evalEvery: { int: true, min: 0 },
  evalBatches: { int: true, min: 1 },
  seed: { int: true, min: 0, max: Number.MAX_SAFE_INTEGER },
  threads: { int: true, min: 1 },
  logEvery: { int: true, min: 0 },
};

/** Numeric options, in a stable order. */
export const NUMERIC_OPTIONS: readonly NumericKey[] = Object.freeze(
  Object.keys(RANGES) as NumericKey[],
);

function describeRange(r: Range): string {
  const kind = r.int ? "an integer" : "a number";
  if (r.max === undefined) return `${kind} ${r.open ? ">" : "≥"} ${r.min}`;
  if (r.max === Number.MAX_SAFE_INTEGER) return `${kind} ≥ ${r.min}`;
  return `${kind} in ${r.open ? "(" : "["}${r.min}, ${r.max}${r.maxOpen ? ")" : "]"}`;
}

/**
 * Checks one numeric option. `raw` is the value as the user wrote it (a CLI string) and is
 * echoed in the message; strings are parsed here. Returns the number.
 */
export function checkNumber(key: NumericKey, raw: number | string): number {
  const r = RANGES[key];
  const v = typeof raw === "string" ? (raw.trim() === "" ? NaN : Number(raw)) : raw;
  const ok = typeof v === "number" && Number.isFinite(v) && (!r.int || Number.isInteger(v)) &&
    (r.open ? v > r.min : v >= r.min) &&
    (r.max === undefined || (r.maxOpen ? v < r.max : v <= r.max));
  if (!ok) {
    const shown = typeof raw === "string" ? (raw === "" ? '""' : raw) : String(raw);
    throw new UsageError(`${FLAG[key]} ${shown}: must be ${describeRange(r)}`);
  }
  return v;
}

/** Options after validation, with the model resolved and the warmup filled in. */
export interface CheckedOptions {
  /** The options, `warmup` now a number. */
  opts: TrainOptions & { warmup: number };
  /** The model's name and config (vocabulary from the tokenizer). */
  model: ResolvedModel;
}

/**
 * Validates every option (types, ranges, names, model, `seq_len ≤ max_position_embeddings`)
 * and resolves the model; throws UsageError naming the flag and value. Files named by
 * `--data` are checked when the dataset is read.
 */
export function checkOptions(input: Partial<TrainOptions> = {}): CheckedOptions {
  const opts = { ...defaultTrainOptions(), ...input };
  for (const key of NUMERIC_OPTIONS) {
    const v = opts[key];
    if (v === null && (key === "warmup" || key === "threads")) continue;
    if (typeof v !== "number") {
      throw new UsageError(
        `${FLAG[key]} ${JSON.stringify(v)}: must be ${describeRange(RANGES[key])}`,
      );
    }
    checkNumber(key, v);
  }
  if (!OPTIMIZERS.includes(opts.optimizer)) {
    throw new UsageError(
      `--optimizer ${opts.optimizer}: unknown optimizer; allowed: ${OPTIMIZERS.join(", ")}`,
    );
  }
  if (!(DEVICES as readonly string[]).includes(opts.device)) {
    throw new UsageError(`--device ${opts.device}: must be one of ${DEVICES.join(", ")}`);
  }
  if (opts.data !== null && (typeof opts.data !== "string" || opts.data === "")) {
    throw new UsageError(`--data ${JSON.stringify(opts.data)}: must be a path to a text file`);
  }
  if (opts.out !== undefined && opts.out !== null && (typeof opts.out !== "string" || !opts.out)) {
    throw new UsageError(`--out ${JSON.stringify(opts.out)}: must be a directory path`);
  }
  const warmup = opts.warmup ?? Math.round(opts.steps * 0.1);
  if (warmup > opts.steps) {
    throw new UsageError(`--warmup ${warmup}: must be ≤ --steps ${opts.steps}`);
  }
  const vocab = new ByteTokenizer().vocabSize;
  let model: ResolvedModel;
  if (typeof opts.model === "string") {
    model = resolveModel(opts.model, vocab, `--model ${opts.model}`);
  } else {
    // As for presets and files, the tokenizer decides the vocabulary.
    const config = { ...opts.model, vocab_size: vocab };
    validateModel(config, "--model (config object)");
    model = { name: "custom", config };
  }
  const maxPos = model.config.max_position_embeddings;
  if (opts.seqLen > maxPos) {
    throw new UsageError(
      `--seq-len ${opts.seqLen}: must be ≤ ${maxPos} (max_position_embeddings of ${model.name})`,
    );
  }
  return { opts: { ...opts, warmup }, model };
}
