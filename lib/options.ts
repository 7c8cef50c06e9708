/**
 * Training options: one table ({@link OPTION_TABLE}) declares each option once — its flag,
 * help text, and either the engine config field it sets (whose type, range, per-optimizer
 * default and applicability the engine's schema states) or, for front-end options, its own
 * range and default. Parsing, checking, `--help`, per-optimizer defaults and the engine
 * config all derive from it. Error messages name the flag so they read the same from the
 * CLI and from a notebook.
 *
 * @module
 */

import { UsageError } from "./errors.ts";
import {
  type EngineConfig,
  EngineError,
  engineOptions,
  type OptimizerConfig,
  type OptionCondition,
  type OptionRange,
  type OptionSchema,
  type OptionSpec,
  planEngine,
  resolveModelConfig,
  resolveOptimizerConfig,
  type RunSpec,
} from "../ffi/engine.ts";
import { type ModelConfig, type ResolvedModel, resolveModel, validateModel } from "./presets.ts";
import { ByteTokenizer } from "./tokenizer.ts";

const SCHEMA: OptionSchema = engineOptions();

/** Optimizers the engine implements; the single list every check and message uses. */
export const OPTIMIZERS: readonly string[] = Object.freeze(SCHEMA.optimizers.map((o) => o.name));

/** Optimizers that project the 7 linear matrices of each block (GaLore, docs/algorithm-spec.md §1.4). */
export const PROJECTED_OPTIMIZERS: readonly string[] = Object.freeze(
  SCHEMA.optimizers.filter((o) => o.projected).map((o) => o.name),
);

/** Optimizers with bitsandbytes-style block-wise 8-bit Adam states (docs/algorithm-spec.md §1.6). */
export const EIGHT_BIT_OPTIMIZERS: readonly string[] = Object.freeze(
  SCHEMA.optimizers.filter((o) => o.eight_bit).map((o) => o.name),
);

/** Optimizers that may keep INT8 projected weights (Q-GaLore, docs/algorithm-spec.md §2). */
export const INT8_OPTIMIZERS: readonly string[] = Object.freeze(
  SCHEMA.optimizers.filter((o) => o.int8).map((o) => o.name),
);

function spec(field: string): OptionSpec {
  const s = SCHEMA.options.find((o) => o.name === field);
  if (!s) throw new Error(`engine option schema has no field ${field}`);
  return s;
}

function runSpec(field: string): RunSpec {
  const s = SCHEMA.run.find((o) => o.name === field);
  if (!s) throw new Error(`engine option schema has no run field ${field}`);
  return s;
}

/** How a projector is recomputed: `svd` (the reference route), `eigh` (exact, faster), `randomized`. */
export const PROJ_REFRESH: readonly string[] = Object.freeze([...spec("proj_refresh").choices!]);

/** Lazy-refresh similarity: `signed` top-1 cosine (reference) or its absolute value. */
export const COS_MODES: readonly string[] = Object.freeze([...spec("cos_mode").choices!]);

/**
 * Quantizer range: `zero` includes 0 in each group's range (fixes the reference clamp bug,
 * docs/algorithm-spec.md §2.2), `reference` is the reference's min–max range.
 */
export const QUANT_RANGES: readonly string[] = Object.freeze([...spec("quant_range").choices!]);

/** Where the engine runs; "auto" picks CUDA when available. */
export type Device = "cpu" | "cuda" | "auto";

/** Devices `--device` accepts. */
export const DEVICES: readonly Device[] = Object.freeze(
  [...runSpec("device").choices!] as Device[],
);

/**
 * Activation and GEMM precision of the engine: `fp32` everywhere, `bf16` activations with
 * bf16 GEMM inputs and fp32 accumulation (CUDA only; weights, gradients and optimizer state
 * stay fp32), or `auto` (bf16 on a GPU, fp32 on the CPU).
 */
export type Precision = "auto" | "fp32" | "bf16";

/** Precisions `--precision` accepts. */
export const PRECISIONS: readonly Precision[] = Object.freeze(
  [...runSpec("precision").choices!] as Precision[],
);

/**
 * Everything a training run needs. {@link defaultTrainOptions} fills in all of it; each key
 * has its entry in {@link OPTION_TABLE}.
 */
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
  /** Lazy layer-wise subspace refresh (docs/algorithm-spec.md §2.5); projected optimizers only. */
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

// The engine takes floats as f32; anything larger would arrive as infinity.
const F32_MAX = SCHEMA.f32_max;

/** How one option is declared in {@link OPTION_TABLE}. */
export interface OptionDef {
  /** CLI flag (`--rank`), or the option's name for options only the API has. */
  readonly flag: string;
  /**
   * Value kind: a number, an on/off switch, one of a few choices, a path, the model, or
   * an API-only value that is not checked.
   */
  readonly kind: "number" | "switch" | "choice" | "path" | "model" | "api";
  /** Engine optimizer config field it sets; the engine's schema gives type, range, default. */
  readonly engine?: string;
  /** Engine run-level config field it sets; the engine's schema gives range, choices, default. */
  readonly run?: string;
  /** Range of a front-end numeric option. */
  readonly range?: OptionRange;
  /** Choices of a front-end choice option. */
  readonly choices?: () => readonly string[];
  /** Null means "the default", filled in by {@link checkOptions}. */
  readonly nullable?: boolean;
  /** Front-end default (engine options default to the engine's). */
  readonly default?: unknown;
  /** Front-end default per optimizer. */
  readonly perOptimizer?: Readonly<Record<string, number>>;
  /** `--help` section. */
  readonly section?: string;
  /**
   * `--help` lines, with `{default}` (the default as `--help` shows it), `{choices}`,
   * `{values}` (the allowed numbers, `a|b`) and `{eight_bit}` / `{int8}` (the optimizers the
   * engine's schema names). Flags without help are API-only.
   */
  readonly help?: string;
  /** How `--help` shows the default, from the per-optimizer defaults. */
  readonly shows?: (d: Readonly<Record<string, unknown>>) => string;
}

const MODEL = "Model and optimizer";
const GALORE = "GaLore family";
const DATA = "Data";
const RUN = "Run";

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

const onFor = (d: Readonly<Record<string, unknown>>, v: boolean): string =>
  Object.keys(d).filter((o) => d[o] === v).join(", ");

// Every option, once, in `--help` order. The default run: small enough to finish in about
// two minutes on two CPU cores while driving the synthetic corpus's validation loss well
// below its start.
/**
 * Every option with its literal declaration ({@link OPTION_TABLE} is the same table, typed
 * as {@link OptionDef}s); the key unions below are derived from it.
 */
export const OPTION_DECLARATIONS = {
  model: {
    flag: "--model",
    kind: "model",
    default: "llama-9m",
    section: MODEL,
    help: "--model NAME|FILE     preset ({presets})\n" +
      "                      or a JSON LlamaConfig file [{default}]",
  },
  optimizer: {
    flag: "--optimizer",
    kind: "choice",
    choices: () => OPTIMIZERS,
    default: "adamw",
    section: MODEL,
    help: "--optimizer NAME      {choices} [{default}]",
  },
  lr: {
    flag: "--lr",
    kind: "number",
    range: { min: 0, open: true, max: F32_MAX },
    nullable: true,
    perOptimizer: DEFAULT_LR,
    section: MODEL,
    help: "--lr X                peak learning rate [{default}]",
  },
  minLrRatio: {
    flag: "--min-lr-ratio",
    kind: "number",
    range: { min: 0, max: 1 },
    default: 0.1,
    section: MODEL,
    help: "--min-lr-ratio X      cosine floor as a fraction of --lr [{default}]",
  },
  warmup: {
    flag: "--warmup",
    kind: "number",
    range: { int: true, min: 0 },
    nullable: true,
    section: MODEL,
    help: "--warmup N            linear warmup updates [10% of --steps]",
  },
  steps: {
    flag: "--steps",
    kind: "number",
    range: { int: true, min: 1 },
    default: 300,
    section: MODEL,
    help: "--steps N             optimizer updates [{default}]",
  },
  clip: {
    flag: "--clip",
    kind: "number",
    engine: "clip",
    // The recipe clips at 1; the engine's own default (for direct configs) is off.
    default: 1.0,
    section: MODEL,
    help: "--clip X              gradient-norm clipping, 0 = off [{default}]",
  },
  weightDecay: {
    flag: "--weight-decay",
    kind: "number",
    engine: "weight_decay",
    section: MODEL,
    help: "--weight-decay X      decoupled weight decay [{default}]",
  },
  beta1: {
    flag: "--beta1",
    kind: "number",
    engine: "beta1",
    section: MODEL,
    help: "--beta1 X             Adam β1 [{default}]",
  },
  beta2: {
    flag: "--beta2",
    kind: "number",
    engine: "beta2",
    nullable: true,
    section: MODEL,
    help: "--beta2 X             Adam β2 [{default}]",
  },
  eps: {
    flag: "--eps",
    kind: "number",
    engine: "eps",
    nullable: true,
    section: MODEL,
    help: "--eps X               Adam ε [{default}]",
  },
  fused: {
    flag: "--fused",
    kind: "switch",
    engine: "fused",
    nullable: true,
    section: MODEL,
    help: "--fused on|off        optimizer steps inside the backward (needs --grad-accum 1)\n" +
      "                      [{default}]",
    shows: (d: Readonly<Record<string, unknown>>) =>
      `on for ${onFor(d, true)}; off for ${onFor(d, false)}`,
  },
  blockSize: {
    flag: "--block-size",
    kind: "number",
    engine: "block_size",
    nullable: true,
    section: MODEL,
    help: "--block-size {values} 8-bit Adam block ({eight_bit}) [{default}]",
  },
  rank: {
    flag: "--rank",
    kind: "number",
    engine: "rank",
    nullable: true,
    section: GALORE,
    help:
      "--rank N              projection rank, clamped per matrix to min(N, rows, cols) [{default}]",
  },
  updateGap: {
    flag: "--update-gap",
    kind: "number",
    engine: "update_gap",
    nullable: true,
    section: GALORE,
    help: "--update-gap N        projector refresh interval T in updates [{default}]",
  },
  galoreScale: {
    flag: "--galore-scale",
    kind: "number",
    engine: "galore_scale",
    nullable: true,
    section: GALORE,
    help: "--galore-scale X      scale α of the projected-back update [{default}]",
  },
  projBits: {
    flag: "--proj-bits",
    kind: "number",
    engine: "proj_bits",
    nullable: true,
    section: GALORE,
    help: "--proj-bits B         projector storage: 4, 8 (quantized), 16 (bf16), 32 (f32)\n" +
      "                      [{default}]",
  },
  projGroupSize: {
    flag: "--proj-group-size",
    kind: "number",
    engine: "proj_group_size",
    nullable: true,
    section: GALORE,
    help:
      "--proj-group-size N   projector quantization group (with --proj-bits 4 or 8) [{default}]",
  },
  projRefresh: {
    flag: "--proj-refresh",
    kind: "choice",
    engine: "proj_refresh",
    nullable: true,
    section: GALORE,
    help: "--proj-refresh M      svd (reference), eigh (exact, faster) or randomized [{default}]",
  },
  lazy: {
    flag: "--lazy",
    kind: "switch",
    engine: "lazy",
    nullable: true,
    section: GALORE,
    help: "--lazy on|off         lazy layer-wise refresh: double a matrix's gap while its top\n" +
      "                      singular vector stays put [{default}]",
    shows: (d: Readonly<Record<string, unknown>>) => `on for ${onFor(d, true)}, else off`,
  },
  cosThreshold: {
    flag: "--cos-threshold",
    kind: "number",
    engine: "cos_threshold",
    nullable: true,
    section: GALORE,
    help: "--cos-threshold X     mean cosine that doubles the gap (with --lazy on) [{default}]",
  },
  queueSize: {
    flag: "--queue-size",
    kind: "number",
    engine: "queue_size",
    nullable: true,
    section: GALORE,
    help: "--queue-size N        cosines averaged (with --lazy on) [{default}]",
  },
  gamma: {
    flag: "--gamma",
    kind: "number",
    engine: "gamma",
    nullable: true,
    section: GALORE,
    help: "--gamma N             gap growth factor (with --lazy on) [{default}]",
  },
  cosMode: {
    flag: "--cos-mode",
    kind: "choice",
    engine: "cos_mode",
    nullable: true,
    section: GALORE,
    help: "--cos-mode M          signed (reference) or abs cosine (with --lazy on) [{default}]",
  },
  weightBits: {
    flag: "--weight-bits",
    kind: "number",
    engine: "weight_bits",
    nullable: true,
    section: GALORE,
    help: "--weight-bits {values}    8: INT8 projected weights ({int8} only) [{default}]",
    shows: (d: Readonly<Record<string, unknown>>) =>
      `${Object.entries(d).map(([o, v]) => `${o} ${v}`).join(", ")}, else 16`,
  },
  weightGroupSize: {
    flag: "--weight-group-size",
    kind: "number",
    engine: "weight_group_size",
    nullable: true,
    section: GALORE,
    help: "--weight-group-size N INT8 weight quantization group (with --weight-bits 8) [{default}]",
  },
  stochasticRound: {
    flag: "--stochastic-round",
    kind: "switch",
    engine: "stochastic_round",
    nullable: true,
    section: GALORE,
    help: "--stochastic-round on|off\n" +
      "                      stochastic rounding of INT8 weight updates (with --weight-bits 8) [{default}]",
  },
  quantRange: {
    flag: "--quant-range",
    kind: "choice",
    engine: "quant_range",
    nullable: true,
    section: GALORE,
    help: "--quant-range R       zero (range includes 0; fixes the reference clamp bug) or\n" +
      "                      reference, for INT8 weights and 4/8-bit projectors [{default}]",
  },
  batchSize: {
    flag: "--batch-size",
    kind: "number",
    run: "batch_size",
    default: 8,
    section: DATA,
    help: "--batch-size N        sequences per micro-batch [{default}]",
  },
  seqLen: {
    flag: "--seq-len",
    kind: "number",
    run: "seq_len",
    default: 128,
    section: DATA,
    help: "--seq-len N           tokens per sequence [{default}]",
  },
  gradAccum: {
    flag: "--grad-accum",
    kind: "number",
    run: "grad_accum",
    section: DATA,
    help: "--grad-accum N        micro-batches per update [{default}]",
  },
  data: {
    flag: "--data",
    kind: "path",
    nullable: true,
    section: DATA,
    help:
      "--data FILE           text file, byte-tokenized [synthetic corpus with a known entropy floor]",
  },
  valFraction: {
    flag: "--val-fraction",
    kind: "number",
    range: { min: 0, open: true, max: 1, maxOpen: true },
    default: 0.1,
    section: DATA,
    help: "--val-fraction X      tail of --data held out for validation [{default}]",
  },
  evalEvery: {
    flag: "--eval-every",
    kind: "number",
    range: { int: true, min: 0 },
    default: 100,
    section: DATA,
    help: "--eval-every N        validate every N updates, 0 = start and end only [{default}]",
  },
  evalBatches: {
    flag: "--eval-batches",
    kind: "number",
    range: { int: true, min: 1 },
    default: 8,
    section: DATA,
    help: "--eval-batches N      validation batches per evaluation [{default}]",
  },
  seed: {
    flag: "--seed",
    kind: "number",
    run: "seed",
    // JavaScript numbers are exact up to 2^53; the engine takes any u64.
    range: { int: true, min: 0, max: Number.MAX_SAFE_INTEGER },
    section: RUN,
    help: "--seed N              weight init and batch sampling seed [{default}]",
  },
  threads: {
    flag: "--threads",
    kind: "number",
    run: "threads",
    // null leaves the choice to the engine (its 0: one thread per core)
    range: { int: true, min: 1 },
    nullable: true,
    section: RUN,
    help: "--threads N           engine threads [engine default]",
  },
  device: {
    flag: "--device",
    kind: "choice",
    run: "device",
    // The CLI takes a GPU when there is one; the engine's default (for direct configs) is cpu.
    default: "auto",
    section: RUN,
    help: "--device D            {choices} [{default}]",
  },
  precision: {
    flag: "--precision",
    kind: "choice",
    run: "precision",
    section: RUN,
    help: "--precision P         {choices}: bf16 activations and GEMM inputs\n" +
      "                      need a GPU; auto = bf16 there, fp32 on the CPU [{default}]",
  },
  checkpointing: {
    flag: "--checkpointing",
    kind: "switch",
    run: "checkpointing",
    section: RUN,
    help:
      "--checkpointing on|off  recompute each block in the backward: less activation memory,\n" +
      "                      one extra forward per step, identical results [{default}]",
  },
  out: {
    flag: "--out",
    kind: "path",
    section: RUN,
    help: "--out DIR             metrics.jsonl and summary.json go here [runs/<timestamp>]",
  },
  logEvery: { flag: "logEvery", kind: "number", range: { int: true, min: 0 }, default: 0 },
  quiet: { flag: "quiet", kind: "api", default: false },
  zeroFirst: { flag: "zeroFirst", kind: "api", default: false },
  handleSigint: { flag: "handleSigint", kind: "api", default: true },
} as const satisfies Record<keyof TrainOptions, OptionDef>;

/** Every option, once, in `--help` order: flag, help, engine field or own range and default. */
export const OPTION_TABLE: Readonly<Record<keyof TrainOptions, OptionDef>> = OPTION_DECLARATIONS;

/** The option table's literal type: what the key unions below are derived from. */
export type OptionTable = typeof OPTION_DECLARATIONS;
/** The keys of {@link OPTION_TABLE} whose declaration matches `P`. */
export type KeysWhere<P> = {
  [K in keyof OptionTable]: OptionTable[K] extends P ? K : never;
}[keyof OptionTable];

const KEYS = Object.keys(OPTION_TABLE) as (keyof TrainOptions)[];
const def = (key: keyof TrainOptions): OptionDef => OPTION_TABLE[key];

/** CLI flag of each option. */
export const FLAG: Readonly<Record<keyof TrainOptions, string>> = Object.freeze(
  Object.fromEntries(KEYS.map((k) => [k, def(k).flag])) as Record<keyof TrainOptions, string>,
);

/** The options whose default depends on the optimizer (and which may not apply to it). */
export type OptimizerKey =
  | KeysWhere<{ engine: string; nullable: true }>
  | KeysWhere<{ perOptimizer: unknown }>;

const OPTIMIZER_KEYS = KEYS.filter((k) =>
  (def(k).engine !== undefined && def(k).nullable) || def(k).perOptimizer !== undefined
) as OptimizerKey[];

/** Options whose value is a number. */
export type NumericKey = KeysWhere<{ kind: "number" }>;

/** Options that are on/off switches (`--lazy on`). */
export type SwitchKey = KeysWhere<{ kind: "switch" }>;

/** Options that name one of a few choices. */
export type ChoiceKey = KeysWhere<{ kind: "choice" }>;

/** Values of the on/off switches, as the CLI spells them. */
export const SWITCH_VALUES: readonly ["on", "off"] = Object.freeze(["on", "off"] as const);

/** Numeric options, in a stable order. */
export const NUMERIC_OPTIONS: readonly NumericKey[] = Object.freeze(
  KEYS.filter((k) => def(k).kind === "number") as NumericKey[],
);

/** Switch options, in a stable order. */
export const SWITCH_OPTIONS: readonly SwitchKey[] = Object.freeze(
  KEYS.filter((k) => def(k).kind === "switch") as SwitchKey[],
);

const CHOICE_OPTIONS = KEYS.filter((k) => def(k).kind === "choice") as ChoiceKey[];

/** Allowed values of each choice option. */
export const CHOICES: Readonly<Record<ChoiceKey, readonly string[]>> = Object.freeze(
  Object.fromEntries(
    CHOICE_OPTIONS.map((k) => {
      const d = def(k);
      const choices = d.choices?.() ?? (d.engine ? spec(d.engine) : runSpec(d.run!)).choices!;
      return [k, choices];
    }),
  ) as Record<ChoiceKey, readonly string[]>,
);

function rangeOf(key: NumericKey): OptionRange {
  const d = def(key);
  return d.range ?? (d.engine ? spec(d.engine) : runSpec(d.run!)).range!;
}

/** The engine's default of `field` when it is the same for every optimizer it applies to. */
function commonDefault(field: string): unknown {
  const values = Object.values(spec(field).default);
  return values.every((v) => v === values[0]) ? values[0] : null;
}

/**
 * The default run. Options that are null take the chosen optimizer's default
 * ({@link optimizerDefaults}) in {@link checkOptions}.
 */
export function defaultTrainOptions(): TrainOptions {
  const out: Record<string, unknown> = {};
  for (const key of KEYS) {
    const d = def(key);
    if (d.default !== undefined) out[key] = d.default;
    else if (d.nullable) out[key] = null;
    else if (d.engine !== undefined) out[key] = commonDefault(d.engine);
    else if (d.run !== undefined) out[key] = runSpec(d.run).default;
  }
  return out as unknown as TrainOptions;
}

/** Per-optimizer settings; null where a setting does not apply to that optimizer. */
export type OptimizerDefaults = Pick<TrainOptions, OptimizerKey> & {
  lr: number;
  beta2: number;
  eps: number;
  fused: boolean;
};

function unknownOptimizer(shown: string): UsageError {
  return new UsageError(
    `--optimizer ${shown}: unknown optimizer; allowed: ${OPTIMIZERS.join(", ")}`,
  );
}

/** Settings of `optimizer` from an engine-resolved config (`given` wins where set). */
function settingsOf(
  optimizer: string,
  config: OptimizerConfig,
  given: Partial<TrainOptions> = {},
): OptimizerDefaults {
  const out: Record<string, unknown> = {};
  for (const key of OPTIMIZER_KEYS) {
    const d = def(key);
    const v = given[key];
    if (d.perOptimizer) out[key] = v ?? d.perOptimizer[optimizer];
    else out[key] = d.engine! in config ? (v ?? config[d.engine!]) : null;
  }
  return out as OptimizerDefaults;
}

/**
 * The settings of `optimizer` when none are given: the engine's defaults (the reference runs
 * of docs/algorithm-spec.md §1.6, §1.7, §2.6; see `rust/src/config.rs`) and {@link DEFAULT_LR}. The GaLore family
 * steps inside the backward (`fused`) when `gradAccum` is 1. Throws UsageError for an
 * unknown optimizer.
 */
export function optimizerDefaults(optimizer: string, gradAccum = 1): OptimizerDefaults {
  if (!OPTIMIZERS.includes(optimizer)) throw unknownOptimizer(optimizer || '""');
  const { config } = resolveOptimizerConfig({ name: optimizer }, { grad_accum: gradAccum });
  return settingsOf(optimizer, config);
}

function describeRange(r: OptionRange): string {
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
  const r = rangeOf(key);
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
  if (key === "optimizer") throw unknownOptimizer(shown);
  throw new UsageError(`${FLAG[key]} ${shown}: must be one of ${allowed.join(", ")}`);
}

/** How `--help` shows the default of `key`. */
export function defaultText(key: keyof TrainOptions): string {
  const d = def(key);
  const num = (x: unknown) =>
    typeof x === "number" && x !== 0 && Math.abs(x) < 1e-3
      ? x.toExponential()
      : typeof x === "boolean"
      ? (x ? "on" : "off")
      : String(x);
  const all: Readonly<Record<string, unknown>> | undefined = d.perOptimizer ??
    (d.engine !== undefined ? spec(d.engine).default : undefined);
  if (d.default !== undefined || all === undefined) {
    return num(d.default ?? (d.run !== undefined ? runSpec(d.run).default : undefined));
  }
  // in the engine's optimizer order
  const per = Object.fromEntries(OPTIMIZERS.filter((o) => o in all).map((o) => [o, all[o]]));
  if (d.shows) return d.shows(per);
  const values = Object.values(per);
  if (values.every((v) => v === values[0])) return num(values[0]);
  return Object.entries(per).map(([o, v]) => `${o} ${num(v)}`).join(", ");
}

/** The `--help` lines of every option that has a flag, by section. */
export function optionHelp(fill: Readonly<Record<string, string>> = {}): Map<string, string[]> {
  const sections = new Map<string, string[]>();
  for (const key of KEYS) {
    const d = def(key);
    if (!d.help || !d.section) continue;
    const text = d.help.replace(/\{(\w+)\}/g, (m, name: string) => {
      if (name === "default") return defaultText(key);
      if (name === "choices") return CHOICES[key as ChoiceKey].join(", ");
      if (name === "values") return rangeOf(key as NumericKey).oneOf!.join("|");
      if (name === "eight_bit") return EIGHT_BIT_OPTIMIZERS.join(", ");
      if (name === "int8") return INT8_OPTIMIZERS.join(", ");
      return fill[name] ?? m;
    });
    const lines = sections.get(d.section) ?? [];
    lines.push(...text.split("\n").map((l) => `  ${l}`));
    sections.set(d.section, lines);
  }
  return sections;
}

/** `--help` section titles. */
export const SECTIONS: Readonly<Record<string, string>> = Object.freeze({
  model: MODEL,
  galore: GALORE,
  data: DATA,
  run: RUN,
});

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
    if (v === null && def(key).nullable) continue;
    if (typeof v !== "number") {
      throw new UsageError(
        `${FLAG[key]} ${JSON.stringify(v)}: must be ${describeRange(rangeOf(key))}`,
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
  for (const key of CHOICE_OPTIONS) {
    const v = raw[key];
    if (def(key).nullable && v !== null) checkChoice(key, v);
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
  // The engine judges the sequence against the model's positions.
  if (resolveModelConfig(model.config, { seq_len: raw.seqLen }).problem) {
    const maxPos = model.config.max_position_embeddings;
    throw new UsageError(
      `${FLAG.seqLen} ${raw.seqLen}: must be ≤ ${maxPos} (max_position_embeddings of ${model.name})`,
    );
  }
  const { settings, notices } = resolveOptimizer(raw, model);
  return { opts: { ...raw, ...settings, warmup }, model, notices };
}

/** The engine option of `field`'s key in the table. */
function keyOfField(field: string): OptimizerKey {
  const key = OPTIMIZER_KEYS.find((k) => def(k).engine === field);
  if (!key) throw new Error(`engine option ${field} has no entry in OPTION_TABLE`);
  return key;
}

/**
 * The optimizer settings given in `settings` (non-null, `TrainOptions` names) as an engine
 * optimizer config for `name` (engine field names); the engine fills in the rest.
 */
export function givenOptimizerConfig(
  name: string,
  settings: Partial<TrainOptions>,
): Partial<OptimizerConfig> & { name: string } {
  const out: Record<string, unknown> = { name };
  for (const key of KEYS) {
    const field = def(key).engine;
    if (field !== undefined && given(settings[key])) out[field] = settings[key];
  }
  return out as Partial<OptimizerConfig> & { name: string };
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
  const projected = PROJECTED_OPTIMIZERS.includes(name);
  const reject = (key: OptimizerKey, why: string, value?: unknown): never => {
    const shown = given(raw[key]) ? shownValue(raw[key]) : `${shownValue(value)} (default)`;
    throw new UsageError(`${FLAG[key]} ${shown}: ${why}`);
  };
  let resolved;
  try {
    resolved = resolveOptimizerConfig(givenOptimizerConfig(raw.optimizer, raw), {
      grad_accum: raw.gradAccum,
      device: raw.device,
      precision: raw.precision,
    });
  } catch (e) {
    throw e instanceof EngineError ? new UsageError(flagNames(e.message)) : e;
  }
  const { config, not_applicable } = resolved;
  const forProjected = `applies only to --optimizer ${
    PROJECTED_OPTIMIZERS.join(", ")
  } (not ${name})`;
  // How each failed condition of the engine reads with flags.
  const why: Record<OptionCondition, () => string> = {
    all: () => "does not apply",
    projected: () => forProjected,
    eight_bit: () =>
      `applies only to the 8-bit optimizers ${EIGHT_BIT_OPTIMIZERS.join(", ")} (not ${name})`,
    int8_capable: () =>
      `INT8 weights need --optimizer ${INT8_OPTIMIZERS.join(", ")} (not ${name}); allowed here: 16`,
    int8_weights: () =>
      `applies only to INT8 weights (--optimizer ${
        INT8_OPTIMIZERS.join(", ")
      } with --weight-bits 8)`,
    quantized_projector: () => `applies only with --proj-bits 4 or 8 (here ${config.proj_bits})`,
    quantized: () =>
      "applies only when something is quantized (--weight-bits 8 or --proj-bits 4/8)",
    lazy: () => "applies only with --lazy on",
    one_micro_batch: () =>
      `needs --grad-accum 1 (here ${raw.gradAccum}): accumulated gradients must persist`,
  };
  for (const n of not_applicable) reject(keyOfField(n.field), why[n.when]());

  const settings = settingsOf(name, config, raw);
  // What the engine's resolution says applies: INT8 weights.
  const int8 = settings.weightGroupSize !== null;

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
    const p = fit.problem;
    if (p) reject(keyOfField(p.field), p.why, p.value);
    for (const n of fit.notices) {
      notices.push(`notice: ${FLAG[keyOfField(n.field)]} ${n.value} ${n.why}`);
    }
  }
  return { settings, notices };
}

/**
 * The optimizer section of the engine config (`rust/src/config.rs`) for resolved options:
 * every setting that applies to the optimizer, none that does not.
 */
export function engineOptimizerConfig(opts: ResolvedOptions): OptimizerConfig {
  const cfg: Record<string, unknown> = { name: opts.optimizer };
  for (const key of KEYS) {
    const field = def(key).engine;
    if (field !== undefined && opts[key] !== null) cfg[field] = opts[key];
  }
  return cfg as OptimizerConfig;
}

/**
 * The whole engine config (`rust/src/config.rs`) for resolved options and a model: the
 * run-level fields the table maps (`run`), left out where null so the engine's default
 * applies, and the optimizer section ({@link engineOptimizerConfig}).
 */
export function engineConfig(opts: ResolvedOptions, model: ModelConfig): EngineConfig {
  const cfg: Record<string, unknown> = { model };
  for (const key of KEYS) {
    const field = def(key).run;
    if (field !== undefined && opts[key] !== null) cfg[field] = opts[key];
  }
  cfg.optimizer = engineOptimizerConfig(opts);
  return cfg as unknown as EngineConfig;
}

/**
 * An engine message worded for the CLI: the engine writes a setting as its config field and
 * value ("use device cpu or auto"), the user knows flags ("use --device cpu or auto"). A
 * value the engine quotes back (`precision = bf16`) stays as it is.
 */
export function flagNames(message: string): string {
  let out = message;
  for (const key of CHOICE_OPTIONS) {
    const field = def(key).engine ?? def(key).run;
    if (field === undefined) continue;
    const values = CHOICES[key].join("|");
    out = out.replace(new RegExp(`\\b${field} (${values})\\b`, "g"), `${FLAG[key]} $1`);
  }
  return out;
}

/** {@link flagNames} for an engine error; other errors pass through. */
export function withFlags(e: unknown): unknown {
  if (!(e instanceof EngineError)) return e;
  const msg = flagNames(e.message);
  return msg === e.message ? e : new EngineError(e.code, msg);
}
