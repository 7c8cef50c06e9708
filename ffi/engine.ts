/**
 * Typed, disposable handle over one native training session. Only `ffi/` touches pointers.
 * @module
 */
import { loadLibrary } from "./loader.ts";
import type { NativeLib } from "./symbols.ts";
import type { HfExportOptions } from "./hf.ts";

/**
 * LLaMA architecture, with Hugging Face `LlamaConfig` field names. Defaults and rules are the
 * engine's ({@link resolveModelConfig}, `rust/src/config/model.rs`).
 */
export interface ModelConfig {
  /** Vocabulary size (rows of the embedding and of lm_head). */
  vocab_size: number;
  /** Model width. */
  hidden_size: number;
  /** SwiGLU MLP width. */
  intermediate_size: number;
  /** Query heads. */
  num_attention_heads: number;
  /** Key/value heads (grouped-query attention when fewer than the query heads). */
  num_key_value_heads: number;
  /** Decoder blocks. */
  num_hidden_layers: number;
  /** Longest sequence the model accepts. */
  max_position_embeddings: number;
  /** RoPE base. */
  rope_theta: number;
  /** RMSNorm epsilon. */
  rms_norm_eps: number;
  /** Standard deviation of the normal initialisation. */
  initializer_range: number;
  /**
   * Width of one attention head. Accepted only as hidden_size / num_attention_heads (other
   * head sizes are not implemented); the engine fills it in. A config edited to another
   * width or head count drops it.
   */
  head_dim?: number;
  /**
   * RoPE frequency scaling, or null for plain RoPE. A `config.json` may give it as
   * `rope_scaling` (next to `rope_theta`) or inside the newer `rope_parameters` object
   * (with `rope_theta`); the engine fills in this form either way.
   */
  rope_scaling?: RopeScaling | null;
  /** One table serves the token embedding and lm_head (default false). */
  tie_word_embeddings?: boolean;
}

/**
 * RoPE frequency scaling as `transformers` computes it: `linear` divides every frequency by
 * `factor`; `llama3` (Llama 3.1) divides long wavelengths by `factor`, keeps short ones and
 * blends between, the bounds given by `original_max_position_embeddings` over the two
 * frequency factors.
 */
export interface RopeScaling {
  /** `linear` or `llama3` (`default` is written as no scaling). */
  rope_type: "linear" | "llama3";
  /** Frequency divisor. */
  factor: number;
  /** llama3: wavelengths above original_max_position_embeddings / low_freq_factor are divided by `factor`. */
  low_freq_factor?: number;
  /** llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept. */
  high_freq_factor?: number;
  /** llama3: the context length the model was pre-trained with. */
  original_max_position_embeddings?: number;
}

/** Optimizer settings sent to the engine. */
export interface OptimizerConfig {
  /** Optimizer name, e.g. `adamw`. */
  name: string;
  /** Adam β1. */
  beta1: number;
  /** Adam β2. */
  beta2: number;
  /** Adam ε. */
  eps: number;
  /** Decoupled weight decay. */
  weight_decay: number;
  /** Global gradient-norm clipping threshold; 0 disables clipping. */
  clip: number;
  /** Further switches of the GaLore family (`rank`, `update_gap`, `proj_bits`, …). */
  [key: string]: unknown;
}

/** Everything the engine needs to build a session. */
export interface EngineConfig {
  /** Architecture. */
  model: ModelConfig;
  /** Sequences per micro-batch. */
  batch_size: number;
  /** Tokens per sequence. */
  seq_len: number;
  /** Optimizer and its switches (see `rust/src/config.rs` for every field). */
  optimizer: OptimizerConfig;
  /** Seed of the initialisation and of stochastic rounding. */
  seed: number;
  /** Where to run. */
  device: "cpu" | "cuda" | "auto";
  /** Activation and GEMM precision: `auto` (default: bf16 on a GPU, fp32 on the CPU), `fp32`, `bf16`. */
  precision?: "auto" | "fp32" | "bf16";
  /** Activation checkpointing: recompute each block's forward in the backward (default off). */
  checkpointing?: boolean;
  /** Worker threads; 0 or absent means one per core. */
  threads?: number;
  /** Micro-batches per optimizer step; every `trainStep` must pass this many (default 1). */
  grad_accum?: number;
  /**
   * A Hugging Face model folder or safetensors file whose weights replace the random
   * initialisation (checked against the config first; optimizer state fresh).
   */
  init_from?: string;
}

/** Result of one optimizer step. */
export interface StepStats {
  /** Mean token cross-entropy of the step's batch (nats). */
  loss: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
  /** Whether clipping scaled the gradient. */
  clipped: boolean;
  /** Targets that carried loss in the step (N, the mean's denominator, over all micro-batches). */
  count: number;
}

/** Loss of held-out batches ({@link Engine.eval}). */
export interface EvalResult {
  /** Mean token cross-entropy over the counted targets (nats): sum / count. */
  mean: number;
  /** Σ −log p(target) over the counted targets. */
  sum: number;
  /** Targets that carried loss. */
  count: number;
  /** Per row (batches × batch_size, batch-major): the sum of its counted targets' −log p. */
  rowSums: Float64Array;
  /** Per row: how many of its targets carried loss. */
  rowCounts: Float64Array;
}

/** Engine-tracked bytes by category. */
export interface MemoryBytes {
  /** Parameters (f32, or INT8 codes with group scales and zeros); lora/qlora: the frozen base
   * (bf16/f32, or NF4 codes with double-quantized constants). */
  weights: number;
  /** LoRA adapters (f32 A and B); 0 for the other optimizers. */
  adapters: number;
  /** Gradient buffers and low-rank gradient scratch. */
  grads: number;
  /** Optimizer moments (fp32 or 8-bit with block absmax). */
  optimizer_state: number;
  /** GaLore projectors (packed as stored) and their f32 working copies. */
  projector: number;
  /** Forward activations kept for the backward, and backward scratch. */
  activations: number;
  /** Sum of the categories. */
  total: number;
}

/** What {@link planEngine} reads: an engine config whose optimizer may list only the settings
 * that change memory (the engine's defaults fill in the rest). */
export type PlanConfig = Omit<EngineConfig, "optimizer" | "seed"> & {
  /** Optimizer name and any of its settings (`rust/src/config.rs` field names). */
  optimizer: { name: string; [key: string]: unknown };
  /** Ignored by the plan. */
  seed?: number;
  /**
   * Bytes `clip_mode = auto` plans for: the clip stash is taken when the plan with it fits
   * (absent: no budget known, the stash is taken). The engine uses 90% of the memory the host
   * or the GPU has available.
   */
  memory_budget?: number;
};

/** How an engine clips (`ClipPlan` in `rust/src/plan.rs`). */
export interface ClipPlan {
  /**
   * `stash` (the fused step clips with one backward and the clip stash), `two-backward`
   * (a first backward measures the norm), `unfused` (the global step) or `off` (no clipping).
   */
  mode: "stash" | "two-backward" | "unfused" | "off";
  /** The stash's bytes: held in `stash` mode; in `two-backward`, what it would have taken. */
  stash_bytes: number;
  /** The budget `auto` compared the plan with, or null. */
  budget: number | null;
  /** Why this mode, in words. */
  why: string;
}

/** A setting judged against the model: `field = value: why`, with an engine-config field. */
export interface PlanNote {
  /** Engine-config field, e.g. `weight_group_size`. */
  field: string;
  /** Its value. */
  value: number;
  /** Why, naming the matrix or projector concerned. */
  why: string;
}

/** One parameter tensor in the engine's byte plan. */
export interface TensorPlan {
  /** Hugging Face parameter name. */
  name: string;
  /** Output features. */
  rows: number;
  /** Input features. */
  cols: number;
  /** `embed`, `norm`, `linear` or `head`. */
  role: string;
  /** Weight storage bytes. */
  weight_bytes: number;
  /** Own gradient buffer bytes (0 when the fused step shares one buffer). */
  grad_bytes: number;
  /** Adam moment bytes. */
  state_bytes: number;
  /** Whether the moments are block-wise 8-bit. */
  eight_bit_state: boolean;
  /** GaLore projector of a projected linear: geometry and stored bytes. */
  projector: {
    right: boolean;
    rank: number;
    low: number;
    numel: number;
    stored_bytes: number;
  } | null;
}

/** The engine's byte plan for a config (`rust/src/plan.rs`): computed without allocating. */
export interface EnginePlan {
  /** Trainable parameters. */
  params: number;
  /** Activation precision planned for. */
  precision: "fp32" | "bf16";
  /** Whether the optimizer steps inside the backward. */
  fused: boolean;
  /** Rows per chunk of the embedding and head gradients in the fused step, when chunked. */
  table_chunk_rows: number | null;
  /** Elements of the fused step's shared gradient buffer (0 without it). */
  shared_grad: number;
  /** Elements of the fused step's clip stash (0: none, also when two backwards were chosen). */
  clip_stash: number;
  /** How the engine clips, and why. */
  clip: ClipPlan;
  /** Elements of the largest low-rank gradient. */
  largest_low: number;
  /** Elements of the largest projector. */
  largest_projector: number;
  /** Bytes a freshly built engine tracks (no projector stored yet). */
  initial: MemoryBytes;
  /** Bytes tracked once every projector is stored (after the first update). */
  stepped: MemoryBytes;
  /** Every parameter tensor, in creation order. */
  tensors: TensorPlan[];
  /** Activation buffers: `copies` × `len` values, f32 or the activation dtype. */
  activations: { name: string; len: number; copies: number; fp32: boolean }[];
  /** A setting the engine cannot be built with, or null. */
  problem: PlanNote | null;
  /** Settings the engine adapts (a rank clamped to a matrix's size). */
  notices: PlanNote[];
}

/**
 * The engine's byte plan for `config`, computed from the config alone: no allocation, no
 * device (a 7B model takes milliseconds). bf16 is planned when `precision` is `bf16`, or
 * `auto` on `device: "cuda"`. `label` names the model in the plan's messages. Throws
 * {@link EngineError} when the config is invalid.
 */
export function planEngine(config: PlanConfig, label = ""): EnginePlan {
  const lib = loadLibrary();
  const json = enc.encode(JSON.stringify({ seed: 0, ...config }));
  const name = enc.encode(label);
  const need = new BigUint64Array(1);
  let rc = 0;
  const text = readText((buf, cap) => {
    rc = lib.symbols.qg_plan(json, BigInt(json.length), name, BigInt(name.length), buf, cap, need);
    return need[0];
  }, 64 * 1024);
  if (rc !== 0) throw new EngineError(rc, text);
  return JSON.parse(text);
}

/** What the engine reports about a session (`Info` in `rust/src/train.rs`). */
export interface EngineInfo {
  /** Trainable parameter count. */
  params: number;
  /** Device the session runs on (`cpu`, `cuda`). */
  device: string;
  /** The hardware in words (the GPU model on CUDA). */
  device_name: string;
  /** Precision the session computes in (`fp32`, `bf16`). */
  precision: string;
  /** Optimizer name. */
  optimizer: string;
  /** Whether optimizer steps run inside the backward. */
  fused: boolean;
  /** How the engine clips: `stash`, `two-backward`, `unfused` or `off` ({@link ClipPlan}). */
  clip_mode: ClipPlan["mode"];
  /** Why that mode (for `clip_mode = auto`, the memory budget it compared). */
  clip_why: string;
  /** Completed optimizer steps. */
  steps: number;
  /** Engine-tracked bytes by category. */
  memory: MemoryBytes;
  /** Projector refreshes (SVDs or their replacements) so far; GaLore family and 8-bit Adam. */
  svd_count?: number;
  /** Refreshes that failed and kept the previous projector. */
  refresh_failures?: number;
  /** Updates skipped for a non-finite gradient. */
  nonfinite_grads?: number;
  /** Seconds spent refreshing projectors. */
  refresh_seconds?: number;
  /** Rank-r gradients formed from the product's factors (`proj_grad = factored`). */
  factored_grads?: number;
  /** Current refresh gap of each projected matrix, by parameter name. */
  gaps?: Record<string, number>;
  /** Seconds per phase since the start. */
  timing: { forward_s: number; backward_s: number; optimizer_s: number; dequant_s: number };
  /** Highest device memory in use seen after a step (GPU only; 0 on the CPU). */
  peak_device_bytes: number;
  /** A one-line notice for the user (e.g. a device fallback). */
  notice?: string;
  /** Seconds per op kind (CPU with `QGALORE_PROFILE=1`), plus `other` (time no op accounts for). */
  profile?: Record<string, number>;
}

/** Allowed values of a numeric option, as the engine states them. */
export interface OptionRange {
  /** Whole numbers only. */
  int?: boolean;
  /** Lower bound; `open` makes it strict. */
  min: number;
  /** Strict lower bound. */
  open?: boolean;
  /** Upper bound; `maxOpen` makes it strict. */
  max?: number;
  /** Strict upper bound. */
  maxOpen?: boolean;
  /** The only values allowed. */
  oneOf?: readonly number[];
  /** Must be even. */
  even?: boolean;
}

/**
 * When an optimizer option applies: to every optimizer, the projected ones, the 8-bit ones,
 * INT8 weights (`int8_capable`: the value 8 needs qgalore), quantized projectors, anything
 * quantized, the lazy refresh, or one micro-batch per update (fused steps).
 */
export type OptionCondition =
  | "all"
  | "projected"
  | "eight_bit"
  | "int8_capable"
  | "int8_weights"
  | "quantized_projector"
  | "quantized"
  | "lazy"
  | "one_micro_batch"
  | "adapter"
  | "lora";

/** A config field's name and allowed values (`ValueSpec` in `rust/src/config.rs`). */
export interface ValueSpec {
  /** Config field (`weight_group_size`, `batch_size`). */
  name: string;
  /** Value type. */
  type: "number" | "integer" | "switch" | "choice" | "string";
  /** Allowed values of a choice. */
  choices?: readonly string[];
  /** Allowed values of a number. */
  range?: OptionRange;
}

/** One optimizer option of the engine's schema. */
export interface OptionSpec extends ValueSpec {
  /** When the option applies. */
  applies: OptionCondition;
  /** Default per optimizer, for the optimizers it applies to by default. */
  default: Readonly<Record<string, number | boolean | string>>;
}

/** One run-level option of the engine's schema (top level of {@link EngineConfig}). */
export interface RunSpec extends ValueSpec {
  /** The engine's default; absent when the field is required. */
  default?: number | boolean | string;
}

/** The engine's option schema (`qg_options`). */
export interface OptionSchema {
  /** Optimizers with their families (`int8`: may keep INT8 projected weights). */
  optimizers: readonly {
    name: string;
    /** "full", "galore" or "adapter" (lora, qlora). */
    family: string;
    projected: boolean;
    eight_bit: boolean;
    int8: boolean;
    /** Trains LoRA adapters on a frozen base. */
    adapter: boolean;
  }[];
  /** Optimizer options, in the order the engine reports options that do not apply. */
  options: readonly OptionSpec[];
  /** Run-level options: batch shape, accumulation, device, precision, checkpointing. */
  run: readonly RunSpec[];
  /** The largest float the engine takes (it computes in f32; larger values become infinity). */
  f32_max: number;
}

/** An optimizer config resolved by the engine (`qg_resolve_optimizer`). */
export interface ResolvedOptimizer {
  /** The options that apply, every default filled in. */
  config: OptimizerConfig;
  /** Given options that do not apply, with the condition that failed. */
  not_applicable: readonly { field: string; when: OptionCondition }[];
}

/** Engine status codes (`rust/src/error.rs`). */
export const ErrorCode = {
  invalid: -1,
  panic: -2,
  nonFinite: -3,
  backend: -4,
} as const;

/** An error reported by the engine; `message` is one user-readable line. */
export class EngineError extends Error {
  /** Engine status code (see {@link ErrorCode}). */
  code: number;
  /** Creates an engine error. */
  constructor(code: number, message: string) {
    super(message);
    this.name = "EngineError";
    this.code = code;
  }
}

const enc = new TextEncoder();
const dec = new TextDecoder();

/**
 * Text an engine entry writes into a buffer: it copies at most `cap` bytes and returns the
 * full length, so a second call is needed only when the first buffer was too small (each
 * call redoes the engine's work: resolving a config, serializing a plan).
 */
function readText(fill: (buf: Uint8Array, cap: bigint) => number | bigint, cap = 4096): string {
  let buf = new Uint8Array(cap);
  let need = Number(fill(buf, BigInt(cap)));
  if (need > cap) need = Number(fill(buf = new Uint8Array(need), BigInt(need)));
  return dec.decode(buf.subarray(0, need));
}

let schema: OptionSchema | null = null;

/** The engine's option schema: types, ranges, per-optimizer defaults (loads the library). */
export function engineOptions(): OptionSchema {
  if (schema === null) {
    const lib = loadLibrary();
    schema = JSON.parse(readText((b, n) => lib.symbols.qg_options(b, n))) as OptionSchema;
  }
  return schema;
}

/**
 * Fills an optimizer config with the engine's defaults (every given value must be in range)
 * and lists the given options that do not apply; `run` (grad_accum, device, precision) is
 * checked too. Throws {@link EngineError} with the engine's one-line message otherwise.
 */
export function resolveOptimizerConfig(
  optimizer: Partial<OptimizerConfig> & { name: string },
  run: Partial<Pick<EngineConfig, "grad_accum" | "device" | "precision">> & {
    /** Out-of-range values of options that do not apply are ignored, not errors. */
    lenient?: boolean;
  } = {},
): ResolvedOptimizer {
  const lib = loadLibrary();
  const json = enc.encode(JSON.stringify({ optimizer, ...run }));
  const r = JSON.parse(
    readText((b, n) => lib.symbols.qg_resolve_optimizer(json, BigInt(json.length), b, n)),
  ) as ResolvedOptimizer | { error: string };
  if ("error" in r) throw new EngineError(ErrorCode.invalid, r.error);
  return r;
}

/**
 * One problem of a model config, as the engine reports it: `field value why`
 * ("num_attention_heads 3 must divide hidden_size 128"). `field` is a config field, `seq_len`,
 * or `head dim` (which `why` explains).
 */
export interface ModelProblem {
  /**
   * A required field is absent, a field has the wrong type, a value breaks a rule, or a
   * value asks for what the engine does not implement (biases, another activation, another
   * RoPE type).
   */
  kind: "missing" | "type" | "range" | "unsupported";
  /** The field (`rope_scaling.factor` for a key inside `rope_scaling` or `rope_parameters`). */
  field: string;
  /** The value as the engine read it (null when missing). */
  value: unknown;
  /** The rule, worded to follow the value ("must be an integer ≥ 1"). */
  why: string;
}

/** A model config resolved by the engine (`qg_resolve_model`). */
export interface ResolvedModelConfig {
  /** Every field filled (absent when a field is missing or not a number). */
  config?: ModelConfig;
  /** The first problem found, if any. */
  problem?: ModelProblem;
}

/**
 * Fills a model config (`LlamaConfig` field names; other keys are ignored) with the engine's
 * defaults and checks it against the engine's rules; `vocab_size` replaces the config's,
 * `seq_len` is checked against its positions. Problems come back as data for the caller to
 * word; a malformed request throws {@link EngineError}.
 */
export function resolveModelConfig(
  model: object,
  run: {
    vocab_size?: number;
    seq_len?: number;
    /** false: no defaults; a field that is absent or not a number breaks its rule. */
    defaults?: boolean;
  } = {},
): ResolvedModelConfig {
  const lib = loadLibrary();
  // JSON writes NaN and ±Infinity as null; name them, so the engine judges them as numbers.
  const values = model as Readonly<Record<string, unknown>>;
  const nonFinite = Object.keys(values).filter((k) =>
    typeof values[k] === "number" && !Number.isFinite(values[k])
  );
  const json = enc.encode(JSON.stringify({ model, ...run, non_finite: nonFinite }));
  const r = JSON.parse(
    readText((b, n) => lib.symbols.qg_resolve_model(json, BigInt(json.length), b, n)),
  ) as ResolvedModelConfig | { error: string };
  if ("error" in r) throw new EngineError(ErrorCode.invalid, r.error);
  // and give them back as they were
  const config = r.config as Record<string, unknown> | undefined;
  for (const k of nonFinite) if (config && k in config) config[k] = values[k];
  return r;
}

/** What {@link inspectCheckpoint} reads from a checkpoint without building an engine. */
export interface CheckpointInfo {
  /** Checkpoint format version. */
  format_version: number;
  /** Optimizer that wrote it (`adamw`, `qgalore`, …). */
  optimizer: string;
  /** Completed optimizer steps at the save. */
  step: number;
  /** The full engine config of the engine that wrote it. */
  engine_config: Record<string, unknown>;
  /** The `run` value given to {@link Engine.save}, or null. */
  run: unknown;
}

/**
 * Checks the checkpoint at `path` (regular file, header, checksum) without an engine and
 * returns what it says. Throws {@link EngineError} (code `invalid`) with a one-line message
 * when it is not a valid checkpoint.
 */
export function inspectCheckpoint(path: string): CheckpointInfo {
  const lib = loadLibrary();
  const p = enc.encode(path);
  // a big first buffer: each call re-checks the whole file
  const text = readText(
    (b, n) => lib.symbols.qg_checkpoint_info(p, BigInt(p.length), b, n),
    1 << 16,
  );
  const r = JSON.parse(text) as CheckpointInfo & { error: string | null };
  if (r.error !== null) throw new EngineError(ErrorCode.invalid, r.error);
  const { error: _, ...info } = r;
  return info;
}

/** A PEFT LoRA adapter's settings, as {@link adapterConfig} reads them. */
export interface AdapterConfig {
  /** Rank of every adapter pair (engine option `lora_rank`). */
  r: number;
  /** Scale numerator (`lora_alpha`). */
  lora_alpha: number;
  /** Training dropout on the adapter's input (`lora_dropout`). */
  lora_dropout: number;
  /** The adapted modules (PEFT names: `q_proj`, …), in block order (`lora_targets`). */
  target_modules: string[];
  /** alpha/√r instead of alpha/r (`lora_rslora`). */
  use_rslora: boolean;
  /** The base model the adapter was saved for, as its config names it. */
  base_model_name_or_path: string | null;
}

/**
 * Reads the settings of the PEFT adapter folder `dir` (`adapter_config.json`, checked, and
 * the presence of `adapter_model.safetensors`) without an engine: what an engine must be
 * built with to {@link Engine.loadAdapter} it. Throws {@link EngineError} (code `invalid`)
 * with a one-line message naming the folder or file when it is not a usable LoRA adapter.
 */
export function adapterConfig(dir: string): AdapterConfig {
  const lib = loadLibrary();
  const p = enc.encode(dir);
  const text = readText((b, n) => lib.symbols.qg_adapter_config(p, BigInt(p.length), b, n));
  const r = JSON.parse(text) as AdapterConfig & { error: string | null };
  if (r.error !== null) throw new EngineError(ErrorCode.invalid, r.error);
  const { error: _, ...config } = r;
  return config;
}

/** Options of {@link Engine.saveAdapter}. */
export interface SaveAdapterOptions {
  /** Element type of the adapter tensors: `f32` (default, exact) or `bf16`. */
  dtype?: "f32" | "bf16";
  /**
   * `base_model_name_or_path` written into `adapter_config.json` (what `peft` loads the base
   * from); default: the engine's `init_from` (the Hugging Face folder it was loaded from), else null.
   */
  baseModel?: string | null;
  /** Replace adapter files already in `dir` (other files are never touched). Default false. */
  overwrite?: boolean;
}

/** The engine library's ABI version (loads the library). */
export function engineAbiVersion(): number {
  return loadLibrary().symbols.qg_abi_version();
}

/** Measured f32 GEMM throughput (GFLOP/s) of an (m×k)·(k×n) product on `threads` threads. */
export async function gemmGflops(
  m: number,
  n: number,
  k: number,
  iters: number,
  threads = 0,
): Promise<number> {
  return await loadLibrary().symbols.qg_gemm_gflops(m, n, k, iters, threads);
}

const registry = new FinalizationRegistry<Deno.PointerValue>((ptr) => {
  if (ptr) loadLibrary().symbols.qg_engine_free(ptr);
});

/** One native training session: model, optimizer state and activation buffers. */
export class Engine implements Disposable {
  #lib: NativeLib;
  #ptr: Deno.PointerValue;
  #busy = false;
  /** Trainable parameter count. */
  readonly params: number;
  /** Device the session runs on (`cpu`, `cuda`). */
  readonly device: string;
  /** Precision the session computes in (`fp32`, `bf16`). */
  readonly precision: string;
  /** Optimizer name as the engine reports it. */
  readonly optimizer: string;
  /** The configuration the session was built from. */
  readonly config: EngineConfig;

  private constructor(lib: NativeLib, ptr: Deno.PointerValue, config: EngineConfig) {
    this.#lib = lib;
    this.#ptr = ptr;
    this.config = config;
    const info = this.info();
    this.params = info.params;
    this.device = info.device;
    this.precision = info.precision;
    this.optimizer = info.optimizer;
    registry.register(this, ptr, this);
  }

  /** Builds a session; throws {@link EngineError} with a one-line message on a bad config. */
  static async create(config: EngineConfig): Promise<Engine> {
    const lib = loadLibrary();
    const json = enc.encode(JSON.stringify(config));
    const err = new Uint8Array(1024);
    const errLen = new BigUint64Array(1);
    const ptr = await lib.symbols.qg_engine_new(json, BigInt(json.length), err, 1024n, errLen);
    if (ptr === null) {
      const n = Math.min(Number(errLen[0]), err.length);
      throw new EngineError(-1, dec.decode(err.subarray(0, n)) || "engine creation failed");
    }
    return new Engine(lib, ptr, config);
  }

  #handle(): Deno.PointerObject {
    if (this.#ptr === null) throw new EngineError(-1, "engine already disposed");
    return this.#ptr;
  }

  #error(code: number): EngineError {
    const h = this.#handle();
    const need = Number(this.#lib.symbols.qg_last_error(h, null, 0n));
    const buf = new Uint8Array(need);
    this.#lib.symbols.qg_last_error(h, buf, BigInt(need));
    return new EngineError(code, dec.decode(buf));
  }

  async #call(f: () => Promise<number>): Promise<void> {
    if (this.#busy) throw new EngineError(-1, "engine is busy: await the previous call first");
    this.#busy = true;
    try {
      const rc = await f();
      if (rc !== 0) throw this.#error(rc);
    } finally {
      this.#busy = false;
    }
  }

  /** Engine facts: params, device, optimizer, steps, memory, refresh counters, timing. */
  info(): EngineInfo {
    const h = this.#handle();
    return JSON.parse(readText((b, n) => this.#lib.symbols.qg_info(h, b, n))) as EngineInfo;
  }

  /**
   * One optimizer step over `microBatches` micro-batches. `tokens` holds
   * microBatches × batch_size × (t + 1) ids, row-major, for any 1 ≤ t ≤ seq_len (shorter
   * windows cost less); each row's first t ids are inputs and ids 1..t the targets.
   * `mask` (one entry per id, same layout): a target whose entry is 0 carries no loss
   * (prompts, padding); the loss and gradient are the mean over the counted targets of all
   * micro-batches. Rejects with code −3 when the loss or the gradient is not finite (the
   * weights are then left untouched).
   */
  async trainStep(
    tokens: Int32Array,
    microBatches: number,
    lr: number,
    mask?: Uint8Array,
  ): Promise<StepStats> {
    const h = this.#handle();
    checkTokens("trainStep", tokens);
    checkMask("trainStep", mask, tokens);
    const out = new Float64Array(4);
    await this.#call(() =>
      this.#lib.symbols.qg_train_step(
        h,
        tokens,
        mask ?? null,
        BigInt(tokens.length),
        microBatches,
        lr,
        out,
      )
    );
    return { loss: out[0], gradNorm: out[1], clipped: out[2] !== 0, count: out[3] };
  }

  /**
   * Loss of `batches` batches of batch_size rows of t + 1 ids (1 ≤ t ≤ seq_len), over the
   * targets `mask` keeps (every target without one), with each row's sum and count: the
   * log-likelihood of a row's counted targets is −rowSums[row].
   */
  async eval(tokens: Int32Array, batches: number, mask?: Uint8Array): Promise<EvalResult> {
    const h = this.#handle();
    checkTokens("eval", tokens);
    checkMask("eval", mask, tokens);
    const out = new Float64Array(3);
    const rows = Number.isInteger(batches) && batches > 0 ? batches * this.config.batch_size : 0;
    const perRow = new Float64Array(2 * rows);
    await this.#call(() =>
      this.#lib.symbols.qg_eval(
        h,
        tokens,
        mask ?? null,
        BigInt(tokens.length),
        batches,
        out,
        rows > 0 ? perRow : null,
      )
    );
    return {
      mean: out[0],
      sum: out[1],
      count: out[2],
      rowSums: perRow.subarray(0, rows),
      rowCounts: perRow.subarray(rows),
    };
  }

  /** Mean token cross-entropy (nats) of `batches` batches: {@link Engine.eval}'s `mean`. */
  async evalLoss(tokens: Int32Array, batches: number, mask?: Uint8Array): Promise<number> {
    const h = this.#handle();
    checkTokens("evalLoss", tokens);
    checkMask("evalLoss", mask, tokens);
    const out = new Float64Array(3);
    await this.#call(() =>
      this.#lib.symbols.qg_eval(
        h,
        tokens,
        mask ?? null,
        BigInt(tokens.length),
        batches,
        out,
        null,
      )
    );
    return out[0];
  }

  /** Engine-tracked bytes by category. */
  memory(): MemoryBytes {
    const out = new Float64Array(7);
    const rc = this.#lib.symbols.qg_memory(this.#handle(), out);
    if (rc !== 0) throw this.#error(rc);
    const [weights, adapters, grads, optimizer_state, projector, activations, total] = out;
    return { weights, adapters, grads, optimizer_state, projector, activations, total };
  }

  /**
   * Writes weights and every piece of optimizer state to `path` (atomically and durably), so
   * a run can resume bit-exactly with {@link Engine.load} on an engine built from the same
   * config. `run` (any JSON value; undefined = none) is stored verbatim with the checkpoint
   * and comes back from {@link inspectCheckpoint}.
   */
  async save(path: string, run?: unknown): Promise<void> {
    const h = this.#handle();
    const p = enc.encode(path);
    const r = enc.encode(run === undefined ? "" : JSON.stringify(run));
    await this.#call(() => this.#lib.symbols.qg_save(h, p, BigInt(p.length), r, BigInt(r.length)));
  }

  /**
   * Restores a checkpoint written by {@link Engine.save}. Refused (and nothing changed) when
   * the file is corrupt, or when the engine that wrote it had another trajectory-relevant
   * config (model, optimizer settings, seed, batch_size, seq_len, grad_accum, precision):
   * the message names the first differing field and both values.
   */
  async load(path: string): Promise<void> {
    const h = this.#handle();
    const p = enc.encode(path);
    await this.#call(() => this.#lib.symbols.qg_load(h, p, BigInt(p.length)));
  }

  /**
   * {@link Engine.load} for an engine that will not continue the run (inference or
   * evaluation at another batch_size, seq_len, seed or precision): only the model and the
   * optimizer config must match the checkpoint's; every other check is the same.
   */
  async loadWeights(path: string): Promise<void> {
    const h = this.#handle();
    const p = enc.encode(path);
    await this.#call(() => this.#lib.symbols.qg_load_weights(h, p, BigInt(p.length)));
  }

  /** Test hook: makes the engine panic inside its guard; must surface as an EngineError. */
  debugPanic(): never {
    const rc = this.#lib.symbols.qg_debug_panic(this.#handle());
    throw this.#error(rc);
  }

  /** Frees the native session. Safe to call twice. */
  [Symbol.dispose](): void {
    if (this.#ptr === null) return;
    if (this.#busy) throw new EngineError(-1, "cannot dispose an engine while a call is running");
    registry.unregister(this);
    this.#lib.symbols.qg_engine_free(this.#ptr);
    this.#ptr = null;
  }

  /**
   * Logits of the training forward pass on `batch × seq` input ids (`batch` and `seq` must be
   * the engine's `batch_size` and `seq_len`): batch × seq × vocab values, row-major. Scoring
   * them gives what {@link Engine.evalLoss} gives.
   */
  async logits(tokens: Int32Array, batch: number, seq: number): Promise<Float32Array> {
    const h = this.#handle();
    checkTokens("logits", tokens);
    for (const [name, v] of [["batch", batch], ["seq", seq]] as const) {
      if (!Number.isInteger(v) || v < 1) {
        throw new EngineError(ErrorCode.invalid, `logits: ${name} = ${v}: must be an integer ≥ 1`);
      }
    }
    const out = new Float32Array(batch * seq * this.config.model.vocab_size);
    await this.#call(() =>
      this.#lib.symbols.qg_logits(
        h,
        tokens,
        BigInt(tokens.length),
        batch,
        seq,
        out,
        BigInt(out.length),
      )
    );
    return out;
  }

  /**
   * New tokens after `prompt`, from a decoder over this engine's weights with a key/value
   * cache (each new token costs one position). Greedy at temperature 0; stops at an id of
   * `eos` (returned as the last id), after `max_new_tokens`, or when the sequence fills
   * `max_position_embeddings`. Rejects with a one-line {@link EngineError} naming the field
   * of a bad request.
   */
  async generate(prompt: ArrayLike<number>, opts: GenerateRequest): Promise<GenerateResult> {
    const h = this.#handle();
    const json = enc.encode(JSON.stringify({ ...opts, prompt: Array.from(prompt) }));
    // room for every new id (at most max_new_tokens, and the sequence never passes
    // max_position_embeddings), up to 64 Ki ids: a longer answer is fetched by the retry
    const most = Math.min(
      Number(opts.max_new_tokens) || 0,
      this.config.model.max_position_embeddings,
      1 << 16,
    );
    const cap = 256 + 12 * (Number.isFinite(most) ? Math.max(0, most) : 0);
    let out = new Uint8Array(cap);
    const need = new BigUint64Array(1);
    const run = (buf: Uint8Array) => () =>
      this.#lib.symbols.qg_generate(h, json, BigInt(json.length), buf, BigInt(buf.length), need);
    await this.#call(run(out));
    // the answer is sized from max_new_tokens; a larger one means running again
    if (Number(need[0]) > out.length) await this.#call(run(out = new Uint8Array(Number(need[0]))));
    return JSON.parse(dec.decode(out.subarray(0, Number(need[0])))) as GenerateResult;
  }

  /**
   * Loads Hugging Face LLaMA weights into this new engine: a folder with `model.safetensors`
   * or `model.safetensors.index.json` and its shards, an index file, or one `.safetensors`
   * file, in F32, BF16 or F16. Every header, name, shape and dtype is checked against the
   * config first; a mismatch rejects with a one-line {@link EngineError} naming the file and
   * changes nothing. INT8 weights (qgalore) are quantized as they stream in.
   */
  async importHf(path: string): Promise<void> {
    const h = this.#handle();
    const p = enc.encode(path);
    await this.#call(() => this.#lib.symbols.qg_import_hf(h, p, BigInt(p.length)));
  }

  /**
   * Writes the model as a Hugging Face folder `dir` (`config.json`, `model.safetensors` in
   * bf16 or f32, `generation_config.json`, and the `copy` files). `dir` must not exist or be
   * empty; the folder appears complete or not at all. INT8 weights are dequantized.
   */
  async exportHf(dir: string, opts: HfExportOptions): Promise<void> {
    const h = this.#handle();
    const json = enc.encode(
      JSON.stringify({ dir, dtype: opts.dtype, extra: opts.extra ?? {}, copy: opts.copy ?? [] }),
    );
    await this.#call(() => this.#lib.symbols.qg_export_hf(h, json, BigInt(json.length)));
  }

  /**
   * Loads the PEFT LoRA adapter folder `dir` (`adapter_config.json`,
   * `adapter_model.safetensors`, as `peft` saves them) into this new `lora` or `qlora`
   * engine's adapters. The engine must have been built with the adapter's settings
   * (`lora_rank` = r, `lora_alpha`, `lora_targets` = target_modules, `lora_rslora` =
   * use_rslora; see {@link adapterConfig}); `lora_dropout` may differ. The folder is checked
   * whole first; an adapter for another model, other settings, missing files or an engine
   * without adapters reject with a one-line {@link EngineError}, and nothing changes.
   */
  async loadAdapter(dir: string): Promise<void> {
    const h = this.#handle();
    const p = enc.encode(dir);
    await this.#call(() => this.#lib.symbols.qg_load_adapter(h, p, BigInt(p.length)));
  }

  /**
   * Writes this `lora` / `qlora` engine's adapters as a PEFT adapter folder `dir`
   * (`adapter_config.json` and `adapter_model.safetensors` with PEFT's names, which
   * `PeftModel.from_pretrained` loads); the folder is created if missing and may hold other
   * files, but adapter files already there are replaced only with `overwrite`.
   */
  async saveAdapter(dir: string, opts: SaveAdapterOptions = {}): Promise<void> {
    const h = this.#handle();
    const json = enc.encode(JSON.stringify({
      dir,
      dtype: opts.dtype ?? "f32",
      base_model: opts.baseModel === undefined ? (this.config.init_from ?? null) : opts.baseModel,
      overwrite: opts.overwrite ?? false,
    }));
    await this.#call(() => this.#lib.symbols.qg_save_adapter(h, json, BigInt(json.length)));
  }
}

/** A generation request as the engine reads it (`rust/src/infer/generate.rs`). */
export interface GenerateRequest {
  /** New tokens at most. */
  max_new_tokens: number;
  /** Softmax temperature; 0 (default) is greedy. */
  temperature?: number;
  /** Keep the k most likely tokens; 0 (default) is off. */
  top_k?: number;
  /** Keep the smallest set of most likely tokens reaching probability p; 1 (default) is off. */
  top_p?: number;
  /** Seed of the sampling draws (each draw is keyed by seed and position). */
  seed?: number;
  /** Ids that end the generation. */
  eos?: readonly number[];
  /** Use the key/value cache (default true); false recomputes the prefix for every token. */
  cache?: boolean;
}

/** What {@link Engine.generate} returns. */
export interface GenerateResult {
  /** The new ids only (an EOS that stopped the generation is the last). */
  ids: number[];
  /** Why it stopped: an EOS id, `max_new_tokens`, or `max_position_embeddings`. */
  stop: "eos" | "length" | "max_positions";
  /** Seconds of prefill and decoding. */
  seconds: number;
  /** Seconds until the first new token's logits (the prompt's forward pass). */
  prefill_seconds: number;
  /** Seconds reading the weights to the host. */
  load_seconds: number;
}

/**
 * Token ids travel as raw int32 memory: any other array (a Float32Array, a plain array)
 * would be reinterpreted bit for bit, so it is refused.
 */
/**
 * A mask is a Uint8Array of one entry per token id: the native call reads as many mask bytes
 * as there are ids, so a shorter one must never reach it.
 */
function checkMask(method: string, mask: unknown, tokens: Int32Array): void {
  if (mask === undefined) return;
  if (!(mask instanceof Uint8Array)) {
    const kind = (mask as { constructor?: { name?: string } } | null)?.constructor?.name ??
      typeof mask;
    throw new EngineError(
      ErrorCode.invalid,
      `${method}: mask is a ${kind}; must be a Uint8Array (1 = the target carries loss) or absent`,
    );
  }
  if (mask.length !== tokens.length) {
    throw new EngineError(
      ErrorCode.invalid,
      `${method}: the mask has ${mask.length} entries, the tokens ${tokens.length}: one entry per token id is needed`,
    );
  }
}

function checkTokens(method: string, tokens: unknown): void {
  if (!(tokens instanceof Int32Array)) {
    const kind = (tokens as { constructor?: { name?: string } } | null)?.constructor?.name ??
      typeof tokens;
    throw new EngineError(
      ErrorCode.invalid,
      `${method}: tokens is a ${kind}; must be an Int32Array of token ids`,
    );
  }
}
