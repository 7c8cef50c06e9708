/**
 * The option table: every training option declared once ({@link OPTION_TABLE}) — its flag,
 * help text, and either the engine config field it sets (whose type, range, per-optimizer
 * default and applicability the engine's schema states) or, for front-end options, its own
 * range and default — and what derives from the declarations alone (flags, key unions,
 * choices). `lib/options.ts` checks and resolves options with it.
 *
 * @module
 */

import {
  engineOptions,
  type OptionRange,
  type OptionSchema,
  type OptionSpec,
  type RunSpec,
  type ValueSpec,
} from "../ffi/engine.ts";
import type { ModelConfig } from "./presets.ts";

/** The engine's option schema (`qg_options`), read once. */
export const OPTION_SCHEMA: OptionSchema = engineOptions();
const SCHEMA = OPTION_SCHEMA;

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

/** Optimizers that train LoRA adapters on a frozen base (lora; qlora on an NF4 base). */
export const ADAPTER_OPTIMIZERS: readonly string[] = Object.freeze(
  SCHEMA.optimizers.filter((o) => o.adapter).map((o) => o.name),
);

/** Optimizers that may keep INT8 projected weights (Q-GaLore, docs/algorithm-spec.md §2). */
export const INT8_OPTIMIZERS: readonly string[] = Object.freeze(
  SCHEMA.optimizers.filter((o) => o.int8).map((o) => o.name),
);

/** The engine schema entry of an optimizer option. */
export function optionSpec(field: string): OptionSpec {
  const s = SCHEMA.options.find((o) => o.name === field);
  if (!s) throw new Error(`engine option schema has no field ${field}`);
  return s;
}

/** The engine schema entry of a run-level option. */
export function runOptionSpec(field: string): RunSpec {
  const s = SCHEMA.run.find((o) => o.name === field);
  if (!s) throw new Error(`engine option schema has no run field ${field}`);
  return s;
}

/** How a projector is recomputed: `svd` (the reference route), `eigh` (exact, faster), `randomized`. */
export const PROJ_REFRESH: readonly string[] = Object.freeze([
  ...optionSpec("proj_refresh").choices!,
]);

/** How the fused step clips: `auto` (from the memory plan), `stash` (one backward), `two-backward`. */
export const CLIP_MODES: readonly string[] = Object.freeze([...optionSpec("clip_mode").choices!]);

/** Lazy-refresh similarity: `signed` top-1 cosine (reference) or its absolute value. */
export const COS_MODES: readonly string[] = Object.freeze([...optionSpec("cos_mode").choices!]);

/**
 * Quantizer range: `zero` includes 0 in each group's range (fixes the reference clamp bug,
 * docs/algorithm-spec.md §2.2), `reference` is the reference's min–max range.
 */
export const QUANT_RANGES: readonly string[] = Object.freeze([
  ...optionSpec("quant_range").choices!,
]);

/** Weight dtypes an exported `model.safetensors` can hold. */
export const EXPORT_DTYPES: readonly ("bf16" | "f32")[] = Object.freeze(["bf16", "f32"] as const);

/** Where the engine runs; "auto" picks CUDA when available. */
export type Device = "cpu" | "cuda" | "auto";

/** Devices `--device` accepts. */
export const DEVICES: readonly Device[] = Object.freeze(
  [...runOptionSpec("device").choices!] as Device[],
);

/**
 * Activation and GEMM precision of the engine: `fp32` everywhere, `bf16` activations with
 * bf16 GEMM inputs and fp32 accumulation (a GPU, or a CPU with AVX512-BF16 or AMX-BF16;
 * weights, gradients and optimizer state stay fp32), or `auto` (bf16 on a GPU, fp32 on the CPU).
 */
export type Precision = "auto" | "fp32" | "bf16";

/** Precisions `--precision` accepts. */
export const PRECISIONS: readonly Precision[] = Object.freeze(
  [...runOptionSpec("precision").choices!] as Precision[],
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
  /**
   * How the fused step clips, one of {@link CLIP_MODES}: `stash` keeps the rank-r gradients
   * until the global norm is known (one backward), `two-backward` measures the norm in a first
   * backward (no stash memory), `auto` takes the stash when the engine's memory plan with it
   * fits the memory available; projected optimizers only. Every mode trains the same numbers.
   */
  clipMode: string | null;
  /**
   * How a projected matrix's rank-r gradient is formed: `full` (the references: the whole
   * gradient, then its projection) or `factored` (straight from the product's factors on
   * steps that do not refresh the projector: fewer multiply-adds, the same values up to
   * rounding; needs `clip` 0 and one process); projected optimizers only.
   */
  projGrad: string | null;
  /**
   * Freeze the token embedding and the lm_head (one table when tied): no gradient, no
   * optimizer state, unchanged by steps. Every optimizer; always on for lora and qlora.
   */
  freezeEmbeddings: boolean | null;
  /** LoRA rank r (≤ min(rows, cols) of every target matrix); lora and qlora only. */
  loraRank: number | null;
  /** LoRA alpha: the adapter scale is alpha / r (alpha / √r with `loraRslora`). */
  loraAlpha: number | null;
  /** Dropout on the adapters' input during training, in [0, 1). */
  loraDropout: number | null;
  /** Adapted modules: a comma list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or `all-linear`. */
  loraTargets: string | null;
  /** Rank-stabilized LoRA: scale alpha / √r. */
  loraRslora: boolean | null;
  /** lora's frozen base storage: `bf16` (bf16 under bf16 precision) or `f32`; qlora's is NF4. */
  loraBase: string | null;
  /**
   * Corpus to train on: a text file, a folder of files, JSONL (`textField`) or gzip'd JSONL;
   * tokenized once into cached token shards. Null uses the synthetic corpus.
   */
  data: string | null;
  /** JSONL field holding each document's text. */
  textField: string;
  /** Fraction of the documents held out for validation (of the tokens for a single text). */
  valFraction: number;
  /**
   * Tokenizer: a `tokenizer.json` or a model folder holding one; null takes `initFrom`'s when
   * it has one, else bytes (ids 0..255).
   */
  tokenizer: string | null;
  /** Train a byte-level BPE tokenizer of this many tokens on `data` (saved into `out`). */
  trainTokenizer: number | null;
  /**
   * A Hugging Face LLaMA folder (`config.json`, safetensors weights): its config is the model
   * and its weights the starting point (fresh optimizer state).
   */
  initFrom: string | null;
  /** Write the final model here as a Hugging Face folder; null writes none. */
  export: string | null;
  /** Weight dtype of the exported `model.safetensors`. */
  exportDtype: "bf16" | "f32";
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
  /**
   * What the ranks of a data-parallel run (mpirun) all-reduce for the projected matrices:
   * `full` gradients, their rank-r projection (`lowrank`, exact without clipping; with
   * clipping the norm is taken over what the optimizer consumes; the fused step is turned
   * off), or `auto` (lowrank in the global step when clipping is off; full otherwise, and
   * always in the fused step). No effect in a one-process run.
   */
  dpComm: string;
  /** Output directory; undefined means `runs/<ISO timestamp>`, null writes no files. */
  out?: string | null;
  /**
   * Periodic checkpoints into `out/checkpoints/`: every N updates (a number, or its text
   * `"500"`), every so much wall time (`"30s"`, `"10m"`, `"2h"`), or never (`0`, `"off"`).
   * A run also saves at its end and when stopped (Ctrl-C, the abort signal).
   */
  saveEvery: number | string;
  /** Periodic checkpoints kept: older ones the run wrote itself are removed. */
  keep: number;
  /**
   * Continue the run in this folder from its newest valid checkpoint, with the options stored
   * in it; only options that cannot change the losses may be given with it.
   */
  resume: string | null;
  /** Replace an `out` folder that holds an earlier run (its summary.json, metrics.jsonl). */
  overwrite: boolean;
  // ---- fine-tuning only (lib/finetune.ts; a pre-training run refuses them) ----
  /** Validation JSONL (same format as `data`); null splits `valFraction` off `data`. */
  valData: string | null;
  /** Multiple-choice file (MMLU CSV or JSONL) scored at the end of a fine-tuning run. */
  mc: string | null;
  /** k-shot prompts for `mc`: the first k questions of the same subject from `mcDev`; null: 0. */
  mcShots: number | null;
  /** Dev questions (MMLU CSV or JSONL, or a folder of them) the `mcShots` shots come from. */
  mcDev: string | null;
  /** An example longer than `seqLen`: `truncate` its prompt side, or `refuse` it; null: truncate. */
  tooLong: string | null;
  /** Write the trained adapter (lora, qlora) here in PEFT's format at the end. */
  saveAdapter: string | null;
  /** Start from this PEFT adapter (lora, qlora) on top of the base model. */
  adapter: string | null;
  /** Write the base with the trained adapter merged in (lora, qlora) as a plain Hugging Face folder. */
  merge: string | null;
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

/**
 * The largest count any option takes (2^31): the engine's `MAX_COUNT` (rust/src/config.rs,
 * stated in its schema), also the cap of the front end's own counts (`--steps`,
 * `--eval-batches` …) so that no loop or buffer size runs away.
 */
export const MAX_COUNT: number = (SCHEMA as { max_count?: number }).max_count ?? 2 ** 31;

/**
 * The most tokens one update (`--batch-size` × (`--seq-len` + 1) × `--grad-accum`) or one
 * evaluation (× `--eval-batches`) may hold: 2^28 int32 ids, 1 GiB, which the front end
 * allocates at once; real runs use a few million.
 */
export const MAX_BATCH_TOKENS: number = 2 ** 28;

/** How one option is declared in {@link OPTION_TABLE}. */
export interface OptionDef {
  /** CLI flag (`--rank`), or the option's name for options only the API has. */
  readonly flag: string;
  /**
   * Value kind: a number, an on/off switch, one of a few choices, a path, a name, the model, a
   * number of updates or a wall time (`--save-every`), or an API-only value that is not checked.
   */
  readonly kind: "number" | "switch" | "choice" | "path" | "text" | "model" | "interval" | "api";
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
const LORA = "LoRA and QLoRA";
const DATA = "Data";
const RUN = "Run";
const FINETUNE = "Fine-tuning";

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
  // not swept: LoRA fine-tuning rates are ~1e-4..1e-3 (QLoRA: 2e-4 at 7B and above, 1e-4 at
  // 33B+); the adapters of a tiny model take the upper end
  lora: 1e-3,
  qlora: 1e-3,
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
    help: "--model NAME|FILE|DIR preset ({presets}),\n" +
      "                      a JSON LlamaConfig file or a Hugging Face model folder's config\n" +
      "                      (random init) [{default}]",
  },
  initFrom: {
    flag: "--init-from",
    kind: "path",
    nullable: true,
    section: MODEL,
    help: "--init-from DIR       start from a Hugging Face LLaMA folder's config and weights\n" +
      "                      (fresh optimizer state; replaces --model)",
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
    range: { int: true, min: 0, max: MAX_COUNT },
    nullable: true,
    section: MODEL,
    help: "--warmup N            linear warmup updates [10% of --steps]",
  },
  steps: {
    flag: "--steps",
    kind: "number",
    range: { int: true, min: 1, max: MAX_COUNT },
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
  clipMode: {
    flag: "--clip-mode",
    kind: "choice",
    engine: "clip_mode",
    nullable: true,
    section: MODEL,
    help: "--clip-mode M         how the fused step clips: stash (one backward, keeps the\n" +
      "                      rank-r gradients), two-backward (no stash memory) or auto\n" +
      "                      (the stash when the memory plan with it fits) [{default}]",
  },
  projGrad: {
    flag: "--proj-grad",
    kind: "choice",
    engine: "proj_grad",
    nullable: true,
    section: MODEL,
    help: "--proj-grad M         projected optimizers: form the rank-r gradient from the whole\n" +
      "                      gradient (full, the references) or from the product's factors\n" +
      "                      (factored: fewer products; needs --clip 0, one process)\n" +
      "                      [{default}]",
  },
  freezeEmbeddings: {
    flag: "--freeze-embeddings",
    kind: "switch",
    engine: "freeze_embeddings",
    nullable: true,
    section: MODEL,
    help: "--freeze-embeddings on|off\n" +
      "                      freeze the token embedding and lm_head: no gradient, no optimizer\n" +
      "                      state (always on for lora, qlora) [{default}]",
    shows: (d: Readonly<Record<string, unknown>>) => `on for ${onFor(d, true)}, else off`,
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
  loraRank: {
    flag: "--lora-rank",
    kind: "number",
    engine: "lora_rank",
    nullable: true,
    section: LORA,
    help: "--lora-rank N         adapter rank r, ≤ min(rows, cols) of every target [{default}]",
  },
  loraAlpha: {
    flag: "--lora-alpha",
    kind: "number",
    engine: "lora_alpha",
    nullable: true,
    section: LORA,
    help:
      "--lora-alpha X        adapter scale alpha/r (alpha/√r with --lora-rslora on) [{default}]",
  },
  loraDropout: {
    flag: "--lora-dropout",
    kind: "number",
    engine: "lora_dropout",
    nullable: true,
    section: LORA,
    help: "--lora-dropout P      dropout on the adapters' input in training, in [0, 1) [{default}]",
  },
  loraTargets: {
    flag: "--lora-targets",
    kind: "text",
    engine: "lora_targets",
    nullable: true,
    section: LORA,
    help:
      "--lora-targets LIST   adapted modules: a comma list of q_proj, k_proj, v_proj, o_proj,\n" +
      "                      gate_proj, up_proj, down_proj, or all-linear [{default}]",
  },
  loraRslora: {
    flag: "--lora-rslora",
    kind: "switch",
    engine: "lora_rslora",
    nullable: true,
    section: LORA,
    help: "--lora-rslora on|off  rank-stabilized scale alpha/√r [{default}]",
  },
  loraBase: {
    flag: "--lora-base",
    kind: "choice",
    engine: "lora_base",
    nullable: true,
    section: LORA,
    help:
      "--lora-base B         lora's frozen base: bf16 (bf16 on a bf16 GPU, f32 on the CPU) or\n" +
      "                      f32; qlora's base is NF4 with double quantization [{default}]",
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
    help: "--data PATH           text file, folder, JSONL or .jsonl.gz, tokenized once into\n" +
      "                      cached shards [synthetic corpus with a known entropy floor]",
  },
  textField: {
    flag: "--text-field",
    kind: "text",
    default: "text",
    section: DATA,
    help: "--text-field NAME     JSONL field holding each document [{default}]",
  },
  valFraction: {
    flag: "--val-fraction",
    kind: "number",
    range: { min: 0, open: true, max: 1, maxOpen: true },
    default: 0.1,
    section: DATA,
    help: "--val-fraction X      share of --data's documents held out for validation\n" +
      "                      (of its tokens when it is one text) [{default}]",
  },
  tokenizer: {
    flag: "--tokenizer",
    kind: "path",
    nullable: true,
    section: DATA,
    help: "--tokenizer PATH      tokenizer.json, or a model folder holding one\n" +
      "                      [--init-from's tokenizer, else bytes]",
  },
  trainTokenizer: {
    flag: "--train-tokenizer",
    kind: "number",
    range: { int: true, min: 260, max: 1 << 20 },
    nullable: true,
    section: DATA,
    help: "--train-tokenizer N   train a byte-level BPE tokenizer of N tokens on --data\n" +
      "                      and save it into --out [off]",
  },
  evalEvery: {
    flag: "--eval-every",
    kind: "number",
    range: { int: true, min: 0, max: MAX_COUNT },
    default: 100,
    section: DATA,
    help: "--eval-every N        validate every N updates, 0 = start and end only [{default}]",
  },
  evalBatches: {
    flag: "--eval-batches",
    kind: "number",
    range: { int: true, min: 1, max: MAX_COUNT },
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
    range: { int: true, min: 1, max: MAX_COUNT },
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
      "                      need a GPU or a CPU with AVX512-BF16 or AMX-BF16; auto =\n" +
      "                      bf16 on a GPU, fp32 on the CPU [{default}]",
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
  dpComm: {
    flag: "--dp-comm",
    kind: "choice",
    engine: "dp_comm",
    section: RUN,
    help: "--dp-comm M           mpirun runs: what the ranks sum for projected matrices: full\n" +
      "                      gradients, or their rank-r projection (lowrank; exact without\n" +
      "                      --clip, else the norm covers what the optimizer consumes; turns\n" +
      "                      the fused step off); auto = lowrank in the global step without\n" +
      "                      clipping, else full; {choices} [{default}]",
  },
  out: {
    flag: "--out",
    kind: "path",
    section: RUN,
    help: "--out DIR             metrics.jsonl and summary.json go here [runs/<timestamp>]",
  },
  saveEvery: {
    flag: "--save-every",
    kind: "interval",
    default: "10m",
    section: RUN,
    help: "--save-every N|T      checkpoint into --out/checkpoints every N updates or every\n" +
      "                      T of wall time (30s, 10m, 2h); 0 or off: only at the end and\n" +
      "                      on Ctrl-C [{default}]",
  },
  keep: {
    flag: "--keep",
    kind: "number",
    range: { int: true, min: 1, max: MAX_COUNT },
    default: 3,
    section: RUN,
    help: "--keep K              periodic checkpoints kept; older ones are removed [{default}]",
  },
  resume: {
    flag: "--resume",
    kind: "path",
    nullable: true,
    section: RUN,
    help: "--resume DIR          continue the run in DIR from its newest valid checkpoint with\n" +
      "                      its own options; allowed with it: --steps (more updates),\n" +
      "                      --lr (a new peak from here on), --save-every, --keep,\n" +
      "                      --eval-every, --checkpointing, --export, --export-dtype, --json",
  },
  overwrite: {
    flag: "--overwrite",
    kind: "switch",
    default: false,
    section: RUN,
    help: "--overwrite on|off    replace an --out folder that holds an earlier run [{default}]",
  },
  export: {
    flag: "--export",
    kind: "path",
    nullable: true,
    section: RUN,
    help: "--export DIR          write the final model as a Hugging Face folder (config.json,\n" +
      "                      model.safetensors, tokenizer files); DIR must not exist or be empty",
  },
  exportDtype: {
    flag: "--export-dtype",
    kind: "choice",
    choices: () => EXPORT_DTYPES,
    default: "bf16",
    section: RUN,
    help: "--export-dtype T      {choices} weights in the exported model.safetensors [{default}]",
  },
  valData: {
    flag: "--val-data",
    kind: "path",
    nullable: true,
    section: FINETUNE,
    help: "--val-data FILE       held-out JSONL for validation (same format as --data)\n" +
      "                      [--val-fraction of --data's examples]",
  },
  mc: {
    flag: "--mc",
    kind: "path",
    nullable: true,
    section: FINETUNE,
    help: "--mc FILE             multiple-choice items (MMLU CSV or JSONL, or a folder) scored\n" +
      "                      by each choice's log-likelihood at every evaluation (--eval-every;\n" +
      "                      0: before training and at the end) [none]",
  },
  mcShots: {
    flag: "--mc-shots",
    kind: "number",
    range: { int: true, min: 0, max: 64 },
    nullable: true,
    section: FINETUNE,
    help: "--mc-shots K          k-shot prompts for --mc: the first K questions of the same\n" +
      "                      subject from --mc-dev [0]",
  },
  mcDev: {
    flag: "--mc-dev",
    kind: "path",
    nullable: true,
    section: FINETUNE,
    help: "--mc-dev FILE         dev questions for the --mc-shots shots (same formats)",
  },
  tooLong: {
    flag: "--too-long",
    kind: "choice",
    choices: () => ["truncate", "refuse"],
    nullable: true,
    section: FINETUNE,
    help: "--too-long M          an example longer than --seq-len + 1: truncate (from the\n" +
      "                      prompt side, never the answer) or refuse it [truncate]",
  },
  saveAdapter: {
    flag: "--save-adapter",
    kind: "path",
    nullable: true,
    section: FINETUNE,
    help: "--save-adapter DIR    write the trained adapter in PEFT's format (lora, qlora)",
  },
  adapter: {
    flag: "--adapter",
    kind: "path",
    nullable: true,
    section: FINETUNE,
    help: "--adapter DIR         start from a PEFT adapter on the base model (lora, qlora)",
  },
  merge: {
    flag: "--merge",
    kind: "path",
    nullable: true,
    section: FINETUNE,
    help: "--merge DIR           write the base with the adapter merged in (W + scale·B·A) as a\n" +
      "                      plain Hugging Face folder (lora, qlora; --export-dtype applies)",
  },
  logEvery: {
    flag: "logEvery",
    kind: "number",
    range: { int: true, min: 0, max: MAX_COUNT },
    default: 0,
  },
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

/** Every option key, in table (`--help`) order. */
export const OPTION_KEYS: readonly (keyof TrainOptions)[] = Object.freeze(
  Object.keys(OPTION_TABLE) as (keyof TrainOptions)[],
);
const KEYS = OPTION_KEYS;
/** The declaration of one option. */
export function optionDef(key: keyof TrainOptions): OptionDef {
  return OPTION_TABLE[key];
}
const def = optionDef;

/** The engine's schema entry of an option that sets an engine field; undefined otherwise. */
export function schemaOf(d: OptionDef): ValueSpec | undefined {
  if (d.engine !== undefined) return optionSpec(d.engine);
  if (d.run !== undefined) return runOptionSpec(d.run);
  return undefined;
}

/** CLI flag of each option. */
export const FLAG: Readonly<Record<keyof TrainOptions, string>> = Object.freeze(
  Object.fromEntries(KEYS.map((k) => [k, def(k).flag])) as Record<keyof TrainOptions, string>,
);

/** The options whose default depends on the optimizer (and which may not apply to it). */
export type OptimizerKey =
  | KeysWhere<{ engine: string; nullable: true }>
  | KeysWhere<{ perOptimizer: unknown }>;

/** The options whose default depends on the optimizer, in table order. */
export const OPTIMIZER_KEYS: readonly OptimizerKey[] = KEYS.filter((k) =>
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

/** Choice options, in table order. */
export const CHOICE_OPTIONS: readonly ChoiceKey[] = KEYS.filter((k) =>
  def(k).kind === "choice"
) as ChoiceKey[];

/** Allowed values of each choice option. */
export const CHOICES: Readonly<Record<ChoiceKey, readonly string[]>> = Object.freeze(
  Object.fromEntries(
    CHOICE_OPTIONS.map((k) => {
      const d = def(k);
      const choices = d.choices?.() ??
        (d.engine ? optionSpec(d.engine) : runOptionSpec(d.run!)).choices!;
      return [k, choices];
    }),
  ) as Record<ChoiceKey, readonly string[]>,
);

/** `--help` section titles. */
export const SECTIONS: Readonly<Record<string, string>> = Object.freeze({
  model: MODEL,
  galore: GALORE,
  lora: LORA,
  data: DATA,
  run: RUN,
  finetune: FINETUNE,
});
