/**
 * Memory estimates without building an engine: {@link estimateMemory} is the engine's own
 * byte plan (`rust/src/plan.rs`, the code the engine allocates from), category by category
 * (docs/algorithm-spec.md I-15), and {@link paperMemory} gives the GaLore paper's full-rank estimate
 * (Table 6; docs/algorithm-spec.md §4.1).
 *
 * @module
 */

import {
  type ClipPlan,
  type EnginePlan,
  type MemoryBytes,
  planEngine,
  resolveOptimizerConfig,
} from "../ffi/engine.ts";
import { checkChoice, givenOptimizerConfig } from "./options.ts";
import { type ModelConfig, modelConfig, resolveModel } from "./presets.ts";
import { ByteTokenizer } from "./tokenizer.ts";

/**
 * Optimizer settings that change memory, named as in `TrainOptions`. Missing or null
 * settings take the optimizer's defaults; settings that do not apply to it are ignored.
 */
export interface MemorySettings {
  /** Optimizer name. */
  name: string;
  /** GaLore rank (clamped per matrix to min(rank, rows, cols)). */
  rank?: number | null;
  /** 8: INT8 projected weights (qgalore); 16: float weights. */
  weightBits?: number | null;
  /** INT8 weight group size. */
  weightGroupSize?: number | null;
  /** Projector storage bits: 4, 8, 16 or 32. */
  projBits?: number | null;
  /** Projector quantization group size (4 and 8 bits). */
  projGroupSize?: number | null;
  /** 8-bit Adam block size. */
  blockSize?: number | null;
  /** Optimizer steps inside the backward (effective only with gradAccum 1). */
  fused?: boolean | null;
  /**
   * Gradient-norm clipping threshold (default: the engine's, 0 = off). With clipping, a fused
   * projected optimizer may hold a clip stash ({@link estimateClip}).
   */
  clip?: number;
  /** How the fused step clips: `auto` (default), `stash` or `two-backward`. */
  clipMode?: string | null;
  /** LoRA rank (lora, qlora). */
  loraRank?: number | null;
  /** Adapter dropout: a non-zero value adds the dropped-out input buffer. */
  loraDropout?: number | null;
  /** Adapted modules: a comma list of module names or `all-linear`. */
  loraTargets?: string | null;
  /** lora's frozen base storage: `bf16` or `f32`. */
  loraBase?: string | null;
  /** Freeze the token embedding and lm_head: no gradient, no optimizer state (lora, qlora: always). */
  freezeEmbeddings?: boolean | null;
}

/** The batch shape, named as in `TrainOptions`. */
export interface BatchShape {
  /** Sequences per micro-batch. */
  batchSize: number;
  /** Tokens per sequence. */
  seqLen: number;
  /** Micro-batches per update (default 1). */
  gradAccum?: number;
  /**
   * Activation precision: with `bf16` (CUDA) the activation buffers take 2 B per value,
   * except the f32 norm statistics, RoPE table and logits. `fp32`, `auto` (which the CPU
   * engine resolves to fp32; name `bf16` to estimate a GPU run) and absent count 4 B.
   */
  precision?: "auto" | "fp32" | "bf16";
  /** Activation checkpointing: one block's buffers instead of one set per block. */
  checkpointing?: boolean;
}

/** When to estimate. */
export interface EstimateWhen {
  /**
   * Whether at least one update has run (default true). Projectors are stored from their
   * first refresh on, so a fresh engine tracks less projector memory.
   */
  afterFirstStep?: boolean;
  /**
   * Bytes the run may fill, for `clipMode` `auto`: the clip stash is planned when the plan
   * with it fits (the engine itself uses 90% of the memory the host or GPU has available);
   * absent: no budget known, the stash is planned.
   */
  memoryBudget?: number;
}

/**
 * Bytes the engine tracks for `model` trained by `optimizer` on `batch`, by category, as
 * `Engine.memory()` reports them after the first update (or before it, with
 * `{ afterFirstStep: false }`). `model` is a config or a preset/JSON path resolved with the
 * byte tokenizer's vocabulary, as `train()` does; `optimizer` is a name or settings (see
 * {@link MemorySettings}).
 *
 * This is the engine's byte plan (`rust/src/plan.rs`), the same code it sizes its
 * allocations with, computed without allocating or touching a device: a 7B model takes
 * milliseconds. Categories: weights (f32, bf16 tables, or INT8 codes with group scales; for
 * lora and qlora the frozen base: bf16/f32, or NF4 codes with double-quantized constants);
 * adapters (lora, qlora: the f32 A and B matrices; 0 otherwise);
 * grads (gradient buffers, or the fused step's shared one, and the low-rank scratch);
 * optimizer_state (f32 or block-wise 8-bit moments); projector (working copies, plus the
 * stored projectors once refreshed); activations (the forward's kept buffers and the
 * backward's scratch).
 */
export function estimateMemory(
  model: ModelConfig | string,
  optimizer: string | MemorySettings,
  batch: BatchShape,
  when: EstimateWhen = {},
): MemoryBytes {
  const plan = estimatePlan(model, optimizer, batch, when);
  const m = (when.afterFirstStep ?? true) ? plan.stepped : plan.initial;
  return {
    weights: m.weights,
    adapters: m.adapters,
    grads: m.grads,
    optimizer_state: m.optimizer_state,
    projector: m.projector,
    activations: m.activations,
    total: m.total,
  };
}

/**
 * How an engine built for the same arguments as {@link estimateMemory} clips, from the same
 * byte plan: `stash` (one backward holding the projected gradients; its bytes are in the
 * estimate's `grads`), `two-backward` (no stash: the stash would not fit `memoryBudget`, or
 * `clipMode` says so), `unfused` or `off`, with the stash's size and the reason.
 */
export function estimateClip(
  model: ModelConfig | string,
  optimizer: string | MemorySettings,
  batch: BatchShape,
  when: EstimateWhen = {},
): ClipPlan {
  return estimatePlan(model, optimizer, batch, when).clip;
}

function estimatePlan(
  model: ModelConfig | string,
  optimizer: string | MemorySettings,
  batch: BatchShape,
  when: EstimateWhen,
): EnginePlan {
  const cfg = typeof model === "string"
    ? resolveModel(model, new ByteTokenizer().vocabSize).config
    : model;
  const s: MemorySettings = typeof optimizer === "string" ? { name: optimizer } : optimizer;
  const ga = batch.gradAccum ?? 1;
  checkChoice("optimizer", s.name);
  // The engine fills in its defaults and keeps only the settings that apply.
  const { config } = resolveOptimizerConfig(givenOptimizerConfig(s.name, s), {
    grad_accum: ga,
    lenient: true,
  });
  const bf16 = batch.precision === "bf16";
  return planEngine({
    model: cfg,
    batch_size: batch.batchSize,
    seq_len: batch.seqLen,
    grad_accum: ga,
    // a bf16 estimate is a GPU's; planning never touches a device
    device: bf16 ? "cuda" : "cpu",
    precision: bf16 ? "bf16" : "fp32",
    checkpointing: batch.checkpointing ?? false,
    optimizer: config,
    ...(when.memoryBudget === undefined ? {} : { memory_budget: when.memoryBudget }),
  });
}

/**
 * Exact trainable parameter count of a model, as the engine lays it out: token embedding,
 * untied lm_head, per layer the q, k, v, o, gate, up and down projections plus two RMSNorm
 * weights, and the final norm.
 */
export function paramCount(cfg: ModelConfig): number {
  return planEngine({
    model: cfg,
    batch_size: 1,
    seq_len: 1,
    device: "cpu",
    optimizer: { name: "adamw" },
  }).params;
}

/** The GaLore paper's full-rank memory estimate for one model (Table 6 rows (a) and (b)). */
export interface PaperMemory {
  /** Parameter count (untied embedding and lm_head, norms included). */
  params: number;
  /** BF16 weights: 2 B per parameter. */
  weightsBytes: number;
  /** BF16 Adam states (m and v): 4 B per parameter. */
  optimizerStateBytes: number;
  /** weightsBytes in GiB (2^30 B), unrounded. */
  weightsGiB: number;
  /** optimizerStateBytes in GiB, unrounded. */
  optimizerStateGiB: number;
}

/**
 * Full-rank BF16 memory of GaLore paper Table 6 as docs/algorithm-spec.md I-15 defines it: weights
 * = params × 2 B and Adam states = params × 4 B, in GiB. `model` is a config or a preset
 * name, which here takes the paper's T5 vocabulary (32000). The paper's printed rows agree
 * with this only in part (no single unit or rounding reproduces all of them; see the
 * tests): 130M weights 0.25 and 350M states 1.37 match to two decimals; 60M prints 0.12 /
 * 0.23 (this gives 0.11 / 0.22, decimal GB would give 0.12 / 0.23); 350M weights print
 * 0.68 (0.685 here, so truncated); 130M states 0.51 (0.4996 here); 1B 2.60 / 5.20 (2.49 /
 * 4.99 here).
 */
export function paperMemory(model: ModelConfig | string): PaperMemory {
  const cfg = typeof model === "string" ? modelConfig(model, 32000) : model;
  const params = paramCount(cfg);
  const gib = 2 ** 30;
  return {
    params,
    weightsBytes: 2 * params,
    optimizerStateBytes: 4 * params,
    weightsGiB: (2 * params) / gib,
    optimizerStateGiB: (4 * params) / gib,
  };
}
