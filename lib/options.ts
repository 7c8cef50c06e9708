/**
 * Training options, their defaults and their validation. Each option has a CLI flag (see
 * {@link FLAG}); error messages name the flag so they read the same from the CLI and from a
 * notebook.
 *
 * @module
 */

import { UsageError } from "./errors.ts";
import { type OptimizerConfig, planEngine } from "../ffi/engine.ts";
import { type ModelConfig, type ResolvedModel, resolveModel, validateModel } from "./presets.ts";
import { ByteTokenizer } from "./tokenizer.ts";

/** Optimizers the engine implements; the single list every check and message uses. */
export const OPTIMIZERS: readonly string[] = Object.freeze([
  "adamw",
  "adam8bit",
  "galore",
  "galore8bit",
  "qgalore",
]);

/** Optimizers that project the 7 linear matrices of each block (GaLore, algorithm spec §1.4). */
export const PROJECTED_OPTIMIZERS: readonly string[] = Object.freeze([
  "galore",
  "galore8bit",
  "qgalore",
]);

/** Optimizers with bitsandbytes-style block-wise 8-bit Adam states (spec §1.6). */
export const EIGHT_BIT_OPTIMIZERS: readonly string[] = Object.freeze([
  "adam8bit",
  "galore8bit",
  "qgalore",
]);

/** How a projector is recomputed: `svd` (the reference route), `eigh` (exact, faster), `randomized`. */
export const PROJ_REFRESH: readonly string[] = Object.freeze(["svd", "eigh", "randomized"]);

/** Lazy-refresh similarity: `signed` top-1 cosine (reference) or its absolute value. */
export const COS_MODES: readonly string[] = Object.freeze(["signed", "abs"]);

/**
 * Quantizer range: `zero` includes 0 in each group's range (fixes the reference clamp bug,
 * spec §2.2), `reference` is the reference's min–max range.
 */
export const QUANT_RANGES: readonly string[] = Object.freeze(["zero", "reference"]);

/** Devices `--device` accepts. */
export const DEVICES: readonly ["cpu", "cuda", "auto"] = Object.freeze(
  ["cpu", "cuda", "auto"] as const,
);

/** Where the engine runs; "auto" picks CUDA when available. */
export type Device = typeof DEVICES[number];

/**
 * Precisions `--precision` accepts: `fp32` everywhere, `bf16` activations with bf16 GEMM
 * inputs and fp32 accumulation (CUDA only; weights, gradients and optimizer state stay
 * fp32), or `auto` (bf16 on a GPU, fp32 on the CPU).
 */
export const PRECISIONS: readonly ["auto", "fp32", "bf16"] = Object.freeze(
  ["auto", "fp32", "bf16"] as const,
);

/** Activation and GEMM precision of the engine. */
export type Precision = typeof PRECISIONS[number];

/** Everything a training run needs. {@link defaultTrainOptions} fills in all of it. */
export interface TrainOptions {
  /** Preset name (`llama-9m` …), path to a JSON LlamaConfig, or a config object. */
  model: string | ModelConfig;
  /** Optimizer name, one of {@link OPTIMIZERS}. */
  optimizer: string;
  /** Peak learning rate; null takes the optimizer's default ({@link optimizerDefaults}). */
  lr: number | null;
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
  /** Adam β2; null takes the optimizer's default. */
  beta2: number | null;
  /** Adam ε; null takes the optimizer's default. */
  eps: number | null;
  /** GaLore rank r (clamped per matrix to min(r, rows, cols)); projected optimizers only. */
  rank: number | null;
  /** Subspace refresh interval T in updates; projected optimizers only. */
  updateGap: number | null;
  /** GaLore scale α on the projected-back update; projected optimizers only. */
  galoreScale: number | null;
  /** 8: INT8 projected weights (qgalore only); 16: float weights. */
  weightBits: number | null;
  /** Elements per INT8 weight quantization group; only with INT8 weights. */
  weightGroupSize: number | null;
  /** Projector storage: 4 or 8 (quantized), 16 (bf16) or 32 (f32); projected optimizers only. */
  projBits: number | null;
  /** Elements per projector quantization group; only with `projBits` 4 or 8. */
  projGroupSize: number | null;
  /** Stochastic rounding of the INT8 weight update; only with INT8 weights. */
  stochasticRound: boolean | null;
  /** Lazy layer-wise subspace refresh (spec §2.5); projected optimizers only. */
  lazy: boolean | null;
  /** Mean cosine at which the lazy refresh doubles a matrix's gap; only with `lazy`. */
  cosThreshold: number | null;
  /** Cosines averaged by the lazy refresh; only with `lazy`. */
  queueSize: number | null;
  /** Gap growth factor γ of the lazy refresh; only with `lazy`. */
  gamma: number | null;
  /** Projector refresh route, one of {@link PROJ_REFRESH}; projected optimizers only. */
  projRefresh: string | null;
  /** Lazy-refresh similarity, one of {@link COS_MODES}; only with `lazy`. */
  cosMode: string | null;
  /** Quantizer range, one of {@link QUANT_RANGES}; only when something is quantized. */
  quantRange: string | null;
  /** Elements per 8-bit Adam block (256 or 2048); 8-bit optimizers only. */
  blockSize: number | null;
  /** Optimizer steps inside the backward (per-layer updates); needs `gradAccum` 1. */
  fused: boolean | null;
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
  /** Activation and GEMM precision ({@link PRECISIONS}). */
  precision: Precision;
  /**
   * Activation checkpointing: keep only each block's input and recompute the block in the
   * backward (one extra forward per step; identical results, far less activation memory).
   */
  checkpointing: boolean;
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
  rank: "--rank",
  updateGap: "--update-gap",
  galoreScale: "--galore-scale",
  weightBits: "--weight-bits",
  weightGroupSize: "--weight-group-size",
  projBits: "--proj-bits",
  projGroupSize: "--proj-group-size",
  stochasticRound: "--stochastic-round",
  lazy: "--lazy",
  cosThreshold: "--cos-threshold",
  queueSize: "--queue-size",
  gamma: "--gamma",
  projRefresh: "--proj-refresh",
  cosMode: "--cos-mode",
  quantRange: "--quant-range",
  blockSize: "--block-size",
  fused: "--fused",
  data: "--data",
  valFraction: "--val-fraction",
  evalEvery: "--eval-every",
  evalBatches: "--eval-batches",
  seed: "--seed",
  threads: "--threads",
  device: "--device",
  precision: "--precision",
  checkpointing: "--checkpointing",
  out: "--out",
  logEvery: "logEvery",
  quiet: "quiet",
  zeroFirst: "zeroFirst",
  handleSigint: "handleSigint",
});

/**
 * The default run: small enough to finish in about two minutes on two CPU cores while
 * driving the synthetic corpus's validation loss well below its start. Options that are
 * null take the chosen optimizer's default ({@link optimizerDefaults}) in
 * {@link checkOptions}.
 */
export function defaultTrainOptions(): TrainOptions {
  return {
    model: "llama-9m",
    optimizer: "adamw",
    lr: null,
    minLrRatio: 0.1,
    warmup: null,
    steps: 300,
    batchSize: 8,
    seqLen: 128,
    gradAccum: 1,
    clip: 1.0,
    weightDecay: 0,
    beta1: 0.9,
    beta2: null,
    eps: null,
    rank: null,
    updateGap: null,
    galoreScale: null,
    weightBits: null,
    weightGroupSize: null,
    projBits: null,
    projGroupSize: null,
    stochasticRound: null,
    lazy: null,
    cosThreshold: null,
    queueSize: null,
    gamma: null,
    projRefresh: null,
    cosMode: null,
    quantRange: null,
    blockSize: null,
    fused: null,
    data: null,
    valFraction: 0.1,
    evalEvery: 100,
    evalBatches: 8,
    seed: 0,
    threads: null,
    device: "auto",
    precision: "auto",
    checkpointing: false,
    logEvery: 0,
    quiet: false,
    zeroFirst: false,
    handleSigint: true,
  };
}

/** The options whose default depends on the optimizer (and which may not apply to it). */
export type OptimizerKey =
  | "lr"
  | "beta2"
  | "eps"
  | "rank"
  | "updateGap"
  | "galoreScale"
  | "weightBits"
  | "weightGroupSize"
  | "projBits"
  | "projGroupSize"
  | "stochasticRound"
  | "lazy"
  | "cosThreshold"
  | "queueSize"
  | "gamma"
  | "projRefresh"
  | "cosMode"
  | "quantRange"
  | "blockSize"
  | "fused";

/** Per-optimizer settings; null where a setting does not apply to that optimizer. */
export type OptimizerDefaults = Pick<TrainOptions, OptimizerKey> & {
  lr: number;
  beta2: number;
  eps: number;
  fused: boolean;
};

/**
 * Peak learning rates, measured on the default run (llama-9m, 300 updates of 8×128 tokens of
 * the synthetic corpus, rank 128, seed 0) by sweeping ×2 steps: each is the best value
 * whose halving and doubling also train well. AdamW and 8-bit Adam reach validation loss
 * 1.890 at 5e-3 (1.888 at 1e-2, but 2e-2 degrades to 2.03 / 2.44); the GaLore family,
 * whose projected update is scaled by α = 0.25, reaches 1.884 (galore, galore8bit) and
 * 1.885 (qgalore) at 4e-2, within 0.002 of 2e-2 and 8e-2. The entropy floor is 1.859.
 */
export const DEFAULT_LR: Readonly<Record<string, number>> = Object.freeze({
  adamw: 5e-3,
  adam8bit: 5e-3,
  galore: 4e-2,
  galore8bit: 4e-2,
  qgalore: 4e-2,
});

/**
 * The settings of `optimizer` when none are given: the reference runs of algorithm spec
 * §1.7 (GaLore: ε 1e-6, β2 0.999, r 128, T 200, α 0.25, bf16 projectors), §1.6 (8-bit
 * Adam: ε 1e-8, block 2048) and §2.6 (Q-GaLore C4 runs: β2 0.95, INT8 weights with
 * stochastic rounding, INT4 projectors, lazy refresh with threshold 0.4, queue 5, γ 2).
 * Projectors refresh by `eigh` (exact and faster than the reference `svd`). The GaLore
 * family steps inside the backward (`fused`) when `gradAccum` is 1. Throws UsageError for an
 * unknown optimizer.
 */
export function optimizerDefaults(optimizer: string, gradAccum = 1): OptimizerDefaults {
  if (!OPTIMIZERS.includes(optimizer)) {
    throw new UsageError(
      `--optimizer ${optimizer || '""'}: unknown optimizer; allowed: ${OPTIMIZERS.join(", ")}`,
    );
  }
  const projected = PROJECTED_OPTIMIZERS.includes(optimizer);
  const eight = EIGHT_BIT_OPTIMIZERS.includes(optimizer);
  const q = optimizer === "qgalore";
  return {
    lr: DEFAULT_LR[optimizer],
    beta2: q ? 0.95 : 0.999,
    eps: optimizer === "galore" ? 1e-6 : 1e-8,
    rank: projected ? 128 : null,
    updateGap: projected ? 200 : null,
    galoreScale: projected ? 0.25 : null,
    weightBits: q ? 8 : null,
    weightGroupSize: q ? 256 : null,
    projBits: projected ? (q ? 4 : 16) : null,
    projGroupSize: q ? 256 : null,
    stochasticRound: q ? true : null,
    lazy: projected ? q : null,
    cosThreshold: q ? 0.4 : null,
    queueSize: q ? 5 : null,
    gamma: q ? 2 : null,
    projRefresh: projected ? "eigh" : null,
    cosMode: q ? "signed" : null,
    quantRange: q ? "zero" : null,
    blockSize: eight ? 2048 : null,
    fused: projected && gradAccum === 1,
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
  | "rank"
  | "updateGap"
  | "galoreScale"
  | "weightBits"
  | "weightGroupSize"
  | "projBits"
  | "projGroupSize"
  | "cosThreshold"
  | "queueSize"
  | "gamma"
  | "blockSize"
  | "valFraction"
  | "evalEvery"
  | "evalBatches"
  | "seed"
  | "threads"
  | "logEvery";

/** Options that are on/off switches (`--lazy on`). */
export type SwitchKey = "stochasticRound" | "lazy" | "fused" | "checkpointing";

/** Options that name one of a few choices. */
export type ChoiceKey =
  | "optimizer"
  | "device"
  | "precision"
  | "projRefresh"
  | "cosMode"
  | "quantRange";

/** Values of the on/off switches, as the CLI spells them. */
export const SWITCH_VALUES: readonly ["on", "off"] = Object.freeze(["on", "off"] as const);

/** Allowed values of each choice option. */
export const CHOICES: Readonly<Record<ChoiceKey, readonly string[]>> = Object.freeze({
  optimizer: OPTIMIZERS,
  device: DEVICES,
  precision: PRECISIONS,
  projRefresh: PROJ_REFRESH,
  cosMode: COS_MODES,
  quantRange: QUANT_RANGES,
});

/** Switch options, in a stable order. */
export const SWITCH_OPTIONS: readonly SwitchKey[] = Object.freeze(
  ["stochasticRound", "lazy", "fused", "checkpointing"] as SwitchKey[],
);

interface Range {
  int?: boolean;
  /** Lower bound; `open` makes it strict. */
  min: number;
  open?: boolean;
  /** Upper bound; `maxOpen` makes it strict. */
  max?: number;
  maxOpen?: boolean;
  /** The only values allowed. */
  oneOf?: readonly number[];
  /** Must be even. */
  even?: boolean;
}

// The engine takes floats as f32; anything larger would arrive as infinity.
const F32_MAX = 3.4e38;

const RANGES: Readonly<Record<NumericKey, Range>> = {
  lr: { min: 0, open: true, max: F32_MAX },
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
  rank: { int: true, min: 1 },
  updateGap: { int: true, min: 1 },
  galoreScale: { min: 0, open: true, max: F32_MAX },
  weightBits: { int: true, min: 8, oneOf: [8, 16] },
  weightGroupSize: { int: true, min: 2, max: 1024, even: true },
  projBits: { int: true, min: 4, oneOf: [4, 8, 16, 32] },
  projGroupSize: { int: true, min: 2, max: 1024, even: true },
  cosThreshold: { min: -1, max: 1 },
  queueSize: { int: true, min: 1, max: 1_000_000 },
  gamma: { int: true, min: 1, max: 1_000_000 },
  blockSize: { int: true, min: 256, oneOf: [256, 2048] },
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

/** Numeric options that may be null (meaning a default). */
const NULLABLE = new Set<string>([
  "warmup",
  "threads",
  "lr",
  "beta2",
  "eps",
  "rank",
  "updateGap",
  "galoreScale",
  "weightBits",
  "weightGroupSize",
  "projBits",
  "projGroupSize",
  "cosThreshold",
  "queueSize",
  "gamma",
  "blockSize",
]);

function describeRange(r: Range): string {
  if (r.oneOf) {
    return `one of ${r.oneOf.join(", ")}`;
  }
  const kind = r.even ? "an even integer" : r.int ? "an integer" : "a number";
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
    (r.max === undefined || (r.maxOpen ? v < r.max : v <= r.max)) &&
    (!r.oneOf || r.oneOf.includes(v)) && (!r.even || v % 2 === 0);
  if (!ok) {
    const shown = typeof raw === "string" ? (raw === "" ? '""' : raw) : String(raw);
    throw new UsageError(`${FLAG[key]} ${shown}: must be ${describeRange(r)}`);
  }
  return v;
}

/** Parses an on/off switch as the CLI spells it; throws UsageError naming the flag. */
export function checkSwitch(key: SwitchKey, raw: string | boolean): boolean {
  if (typeof raw === "boolean") return raw;
  if (raw === "on") return true;
  if (raw === "off") return false;
  throw new UsageError(`${FLAG[key]} ${raw || '""'}: must be on or off`);
}

/** Checks a choice option's value; throws UsageError naming the flag and the choices. */
export function checkChoice(key: ChoiceKey, raw: string): string {
  const allowed = CHOICES[key];
  if (typeof raw === "string" && allowed.includes(raw)) return raw;
  const shown = typeof raw === "string" ? raw || '""' : JSON.stringify(raw);
  if (key === "optimizer") {
    throw new UsageError(`--optimizer ${shown}: unknown optimizer; allowed: ${allowed.join(", ")}`);
  }
  throw new UsageError(`${FLAG[key]} ${shown}: must be one of ${allowed.join(", ")}`);
}

/** Options after validation and resolution: every default filled in. */
export type ResolvedOptions = Omit<TrainOptions, "lr" | "beta2" | "eps" | "warmup" | "fused"> & {
  /** Peak learning rate. */
  lr: number;
  /** Adam β2. */
  beta2: number;
  /** Adam ε. */
  eps: number;
  /** Warmup updates. */
  warmup: number;
  /** Optimizer steps inside the backward. */
  fused: boolean;
};

/** Options after validation, with the model resolved and the warmup filled in. */
export interface CheckedOptions {
  /**
   * The options with every default filled in. Settings that do not apply to the optimizer
   * are null (e.g. `rank` for adamw).
   */
  opts: ResolvedOptions;
  /** The model's name and config (vocabulary from the tokenizer). */
  model: ResolvedModel;
  /** One-line notices for the user, such as a rank clamped to a matrix's size. */
  notices: string[];
}

function given(v: unknown): boolean {
  return v !== null && v !== undefined;
}

function shownValue(v: unknown): string {
  if (typeof v === "boolean") return v ? "on" : "off";
  return String(v);
}

/**
 * Validates every option (types, ranges, names, model, `seq_len ≤ max_position_embeddings`,
 * which switches apply to the optimizer, group sizes against the model's matrices) and
 * resolves the model and the optimizer's defaults; throws UsageError naming the flag and
 * value. Files named by `--data` are checked when the dataset is read.
 */
export function checkOptions(input: Partial<TrainOptions> = {}): CheckedOptions {
  const defined = Object.fromEntries(
    Object.entries(input).filter(([, v]) => v !== undefined),
  ) as Partial<TrainOptions>;
  const raw = { ...defaultTrainOptions(), ...defined };
  for (const key of NUMERIC_OPTIONS) {
    const v = raw[key];
    if (v === null && NULLABLE.has(key)) continue;
    if (typeof v !== "number") {
      throw new UsageError(
        `${FLAG[key]} ${JSON.stringify(v)}: must be ${describeRange(RANGES[key])}`,
      );
    }
    checkNumber(key, v);
  }
  for (const key of SWITCH_OPTIONS) {
    const v = raw[key];
    if (v !== null && typeof v !== "boolean") {
      throw new UsageError(`${FLAG[key]} ${JSON.stringify(v)}: must be true or false (on/off)`);
    }
  }
  checkChoice("optimizer", raw.optimizer);
  checkChoice("device", raw.device);
  checkChoice("precision", raw.precision);
  if (raw.device === "cpu" && raw.precision === "bf16") {
    throw new UsageError(
      "--precision bf16 needs a GPU (--device cuda or auto); the CPU engine computes in fp32",
    );
  }
  for (const key of ["projRefresh", "cosMode", "quantRange"] as const) {
    const v = raw[key];
    if (v !== null) checkChoice(key, v);
  }
  if (raw.data !== null && (typeof raw.data !== "string" || raw.data === "")) {
    throw new UsageError(`--data ${JSON.stringify(raw.data)}: must be a path to a text file`);
  }
  if (raw.out !== undefined && raw.out !== null && (typeof raw.out !== "string" || !raw.out)) {
    throw new UsageError(`--out ${JSON.stringify(raw.out)}: must be a directory path`);
  }
  const warmup = raw.warmup ?? Math.round(raw.steps * 0.1);
  if (warmup > raw.steps) {
    throw new UsageError(`--warmup ${warmup}: must be ≤ --steps ${raw.steps}`);
  }
  const vocab = new ByteTokenizer().vocabSize;
  let model: ResolvedModel;
  if (typeof raw.model === "string") {
    model = resolveModel(raw.model, vocab, `--model ${raw.model}`);
  } else {
    // As for presets and files, the tokenizer decides the vocabulary.
    const config = { ...raw.model, vocab_size: vocab };
    validateModel(config, "--model (config object)");
    model = { name: "custom", config };
  }
  const maxPos = model.config.max_position_embeddings;
  if (raw.seqLen > maxPos) {
    throw new UsageError(
      `--seq-len ${raw.seqLen}: must be ≤ ${maxPos} (max_position_embeddings of ${model.name})`,
    );
  }
  const { settings, notices } = resolveOptimizer(raw, model);
  return { opts: { ...raw, ...settings, warmup }, model, notices };
}

/**
 * Fills in the optimizer's defaults, rejects settings that do not apply to it, and checks
 * rank and group sizes against the model's matrices.
 */
function resolveOptimizer(
  raw: TrainOptions,
  model: ResolvedModel,
): { settings: OptimizerDefaults; notices: string[] } {
  const name = raw.optimizer;
  const d = optimizerDefaults(name, raw.gradAccum);
  const projected = PROJECTED_OPTIMIZERS.includes(name);
  const eight = EIGHT_BIT_OPTIMIZERS.includes(name);
  const reject = (key: OptimizerKey, why: string, value?: unknown): never => {
    const shown = given(raw[key]) ? shownValue(raw[key]) : `${shownValue(value)} (default)`;
    throw new UsageError(`${FLAG[key]} ${shown}: ${why}`);
  };
  const onlyFor = (key: OptimizerKey, ok: boolean, why: string) => {
    if (given(raw[key]) && !ok) reject(key, why);
  };
  const pick = <K extends OptimizerKey>(key: K): OptimizerDefaults[K] =>
    (given(raw[key]) ? raw[key] : d[key]) as OptimizerDefaults[K];

  const forProjected = `applies only to --optimizer ${
    PROJECTED_OPTIMIZERS.join(", ")
  } (not ${name})`;
  for (
    const key of [
      "rank",
      "updateGap",
      "galoreScale",
      "projBits",
      "projRefresh",
      "lazy",
    ] as const
  ) {
    onlyFor(key, projected, forProjected);
  }
  onlyFor(
    "blockSize",
    eight,
    `applies only to the 8-bit optimizers ${EIGHT_BIT_OPTIMIZERS.join(", ")} (not ${name})`,
  );
  if (raw.weightBits === 8 && name !== "qgalore") {
    reject("weightBits", `INT8 weights need --optimizer qgalore (not ${name}); allowed here: 16`);
  }
  const weightBits = pick("weightBits");
  const int8 = name === "qgalore" && weightBits === 8;
  const int8Only = "applies only to INT8 weights (--optimizer qgalore with --weight-bits 8)";
  onlyFor("stochasticRound", int8, int8Only);
  onlyFor("weightGroupSize", int8, int8Only);
  const projBits = pick("projBits");
  const projQuant = projBits === 4 || projBits === 8;
  onlyFor(
    "projGroupSize",
    projQuant,
    projected ? `applies only with --proj-bits 4 or 8 (here ${projBits})` : forProjected,
  );
  onlyFor(
    "quantRange",
    int8 || projQuant,
    "applies only when something is quantized (--weight-bits 8 or --proj-bits 4/8)",
  );
  const lazy = pick("lazy");
  const lazyOnly = projected ? "applies only with --lazy on" : forProjected;
  for (const key of ["cosThreshold", "queueSize", "gamma", "cosMode"] as const) {
    onlyFor(key, projected && lazy === true, lazyOnly);
  }
  if (raw.fused === true && raw.gradAccum > 1) {
    reject(
      "fused",
      `needs --grad-accum 1 (here ${raw.gradAccum}): accumulated gradients must persist`,
    );
  }

  const settings: OptimizerDefaults = {
    lr: pick("lr"),
    beta2: pick("beta2"),
    eps: pick("eps"),
    rank: pick("rank"),
    updateGap: pick("updateGap"),
    galoreScale: pick("galoreScale"),
    weightBits,
    weightGroupSize: int8 ? pick("weightGroupSize") : null,
    projBits,
    projGroupSize: projQuant ? (given(raw.projGroupSize) ? raw.projGroupSize : 256) : null,
    stochasticRound: int8 ? pick("stochasticRound") : null,
    lazy,
    cosThreshold: lazy ? (raw.cosThreshold ?? 0.4) : null,
    queueSize: lazy ? (raw.queueSize ?? 5) : null,
    gamma: lazy ? (raw.gamma ?? 2) : null,
    projRefresh: pick("projRefresh"),
    cosMode: lazy ? (raw.cosMode ?? "signed") : null,
    quantRange: int8 || projQuant ? (raw.quantRange ?? "zero") : null,
    blockSize: pick("blockSize"),
    fused: pick("fused"),
  };

  // The engine judges group sizes and ranks against the model's matrices (one check,
  // `plan::fit` in rust/src/plan.rs); its notes name engine-config fields, shown here as flags.
  const notices: string[] = [];
  if (int8 || projected) {
    const fit = planEngine({
      model: model.config,
      batch_size: raw.batchSize,
      seq_len: raw.seqLen,
      device: "cpu",
      optimizer: engineOptimizerConfig({ ...raw, ...settings, warmup: 0 }),
    }, model.name);
    const key = (field: string): OptimizerKey => {
      const k = FIT_FIELDS[field];
      if (!k) throw new UsageError(`${field}: not a setting of this front end`);
      return k;
    };
    if (fit.problem) reject(key(fit.problem.field), fit.problem.why, fit.problem.value);
    for (const n of fit.notices) notices.push(`notice: ${FLAG[key(n.field)]} ${n.value} ${n.why}`);
  }
  return { settings, notices };
}

/** The option of each engine-config field that the engine's fit check names. */
const FIT_FIELDS: Readonly<Record<string, OptimizerKey>> = Object.freeze({
  rank: "rank",
  weight_group_size: "weightGroupSize",
  proj_group_size: "projGroupSize",
});

/**
 * The optimizer section of the engine config (`rust/src/config.rs`) for resolved options:
 * every setting that applies to the optimizer, none that does not.
 */
export function engineOptimizerConfig(opts: ResolvedOptions): OptimizerConfig {
  const cfg: OptimizerConfig = {
    name: opts.optimizer,
    beta1: opts.beta1,
    beta2: opts.beta2,
    eps: opts.eps,
    weight_decay: opts.weightDecay,
    clip: opts.clip,
  };
  const put = (field: string, v: number | boolean | string | null) => {
    if (v !== null) cfg[field] = v;
  };
  put("rank", opts.rank);
  put("update_gap", opts.updateGap);
  put("galore_scale", opts.galoreScale);
  put("weight_bits", opts.weightBits);
  put("weight_group_size", opts.weightGroupSize);
  put("proj_bits", opts.projBits);
  put("proj_group_size", opts.projGroupSize);
  put("stochastic_round", opts.stochasticRound);
  put("lazy", opts.lazy);
  put("cos_threshold", opts.cosThreshold);
  put("queue_size", opts.queueSize);
  put("gamma", opts.gamma);
  put("proj_refresh", opts.projRefresh);
  put("cos_mode", opts.cosMode);
  put("quant_range", opts.quantRange);
  put("block_size", opts.blockSize);
  cfg.fused = opts.fused;
  return cfg;
}
