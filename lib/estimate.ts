/**
 * Memory estimates without building an engine: {@link estimateMemory} reproduces the bytes
 * the engine tracks, category by category (algorithm spec I-15), and {@link paperMemory}
 * gives the GaLore paper's full-rank estimate (Table 6; spec §4.1).
 *
 * @module
 */

import type { MemoryBytes } from "../ffi/engine.ts";
import {
  EIGHT_BIT_OPTIMIZERS,
  linearShapes,
  optimizerDefaults,
  PROJECTED_OPTIMIZERS,
  projectorShape,
} from "./options.ts";
import { type ModelConfig, modelConfig, paramCount, resolveModel } from "./presets.ts";
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
}

interface Tensor {
  numel: number;
  /** One of the 7 linear matrices of a block (projected and possibly INT8). */
  linear: boolean;
  /** The embedding or the lm_head (bf16 under bf16 precision with 8-bit optimizers). */
  table?: boolean;
  rows: number;
  cols: number;
}

function tensors(cfg: ModelConfig): Tensor[] {
  const c = cfg.hidden_size;
  const v = cfg.vocab_size;
  const vec = (n: number): Tensor => ({ numel: n, linear: false, rows: 1, cols: n });
  const out: Tensor[] = [{ numel: v * c, linear: false, table: true, rows: v, cols: c }];
  for (let l = 0; l < cfg.num_hidden_layers; l++) {
    out.push(vec(c));
    for (const s of linearShapes(cfg)) {
      if (s.name === "gate") out.push(vec(c)); // post-attention norm precedes the MLP
      out.push({ numel: s.rows * s.cols, linear: true, rows: s.rows, cols: s.cols });
    }
  }
  out.push(vec(c), { numel: v * c, linear: false, table: true, rows: v, cols: c });
  return out;
}

function defined<T>(v: T | null | undefined, fallback: T): T {
  return v === null || v === undefined ? fallback : v;
}

/**
 * Bytes the engine tracks for `model` trained by `optimizer` on `batch`, by category, as
 * `Engine.memory()` reports them after the first update (or before it, with
 * `{ afterFirstStep: false }`). `model` is a config or a preset/JSON path resolved with the
 * byte tokenizer's vocabulary, as `train()` does; `optimizer` is a name or settings (see
 * {@link MemorySettings}).
 *
 * Per category, with linears the 7 matrices of each block (rows = out, cols = in), and for
 * projected optimizers r' = min(rank, rows, cols), low = rows·r' (rows ≥ cols) or r'·cols,
 * pn = r'·cols (rows ≥ cols) or rows·r':
 * - weights: 4 B per float element; INT8 linears 1 B + 8 B per group (fp32 scale, zero);
 *   under bf16 precision with an 8-bit optimizer, 2 B per embedding and lm_head element;
 * - grads: one f32 buffer per tensor, or only the largest when fused (gradAccum 1; with
 *   8-bit Adam, embedding and head larger than every other tensor come in row chunks), plus
 *   the low-rank scratch (twice for 8-bit optimizers);
 * - optimizer_state: two f32 moments, or with 8-bit Adam 2 B per element plus 8 B per block
 *   for tensors of ≥ 4096 elements (of the low-rank shape when projected);
 * - projector: two f32 working copies of the largest projector, plus each stored projector
 *   (f32, bf16, 8-bit or packed 4-bit codes with 8 B per group) once refreshed;
 * - activations: the forward buffers kept for the backward and the backward scratch.
 */
export function estimateMemory(
  model: ModelConfig | string,
  optimizer: string | MemorySettings,
  batch: BatchShape,
  when: EstimateWhen = {},
): MemoryBytes {
  const cfg = typeof model === "string"
    ? resolveModel(model, new ByteTokenizer().vocabSize).config
    : model;
  const s: MemorySettings = typeof optimizer === "string" ? { name: optimizer } : optimizer;
  const ga = batch.gradAccum ?? 1;
  const d = optimizerDefaults(s.name, ga);
  const projected = PROJECTED_OPTIMIZERS.includes(s.name);
  const eight = EIGHT_BIT_OPTIMIZERS.includes(s.name);
  const int8 = s.name === "qgalore" && defined(s.weightBits, d.weightBits) === 8;
  const weightGroup = defined(s.weightGroupSize, 256);
  const rank = defined(s.rank, 128);
  const projBits = defined(s.projBits, d.projBits ?? 16);
  const projGroup = defined(s.projGroupSize, 256);
  const block = defined(s.blockSize, 2048);
  const fused = defined(s.fused, d.fused) && ga === 1;
  const stepped = when.afterFirstStep ?? true;
  // the engine stores embedding and lm_head in bf16 on a bf16 GPU when 8-bit Adam updates them
  const halfTables = eight && batch.precision === "bf16";

  const all = tensors(cfg);
  let weights = 0;
  let sumNumel = 0;
  let maxLinear = 0;
  let state = 0;
  let maxLow = 0;
  let maxProj = 0;
  let stored = 0;
  for (const t of all) {
    sumNumel += t.numel;
    if (t.linear) maxLinear = Math.max(maxLinear, t.numel);
    weights += int8 && t.linear
      ? t.numel + 8 * (t.numel / weightGroup)
      : (t.table && halfTables ? 2 : 4) * t.numel;
    let m = t.numel;
    if (projected && t.linear) {
      const p = projectorShape(t.rows, t.cols, rank);
      m = p.low;
      maxLow = Math.max(maxLow, p.low);
      maxProj = Math.max(maxProj, p.proj);
      stored += projectorBytes(p.proj, projBits, projGroup);
    }
    if (s.name === "adamw") state += 8 * t.numel;
    else state += eight && m >= 4096 ? 2 * m + 8 * Math.ceil(m / block) : 8 * m;
  }
  let grads = fused ? 4 * sharedGradient(cfg, all, eight, block) : 4 * sumNumel;
  if (projected) grads += (eight ? 8 : 4) * maxLow;
  const projector = projected ? 8 * maxProj + (stepped ? stored : 0) : 0;
  const activations = activationBytes(
    cfg,
    batch.batchSize,
    batch.seqLen,
    int8 ? maxLinear : 0,
    batch.precision === "bf16" ? 2 : 4,
    batch.checkpointing ? 1 : cfg.num_hidden_layers,
  );
  return {
    weights,
    grads,
    optimizer_state: state,
    projector,
    activations,
    total: weights + grads + state + projector + activations,
  };
}

/**
 * Elements of the fused step's shared gradient buffer: the largest tensor, unless the
 * embedding and head take block-wise 8-bit Adam and dwarf every other tensor; then they
 * arrive in row chunks of whole blocks no larger than the largest other tensor (the
 * engine's `table_chunk_rows`).
 */
function sharedGradient(cfg: ModelConfig, all: Tensor[], eight: boolean, block: number): number {
  const c = cfg.hidden_size;
  const v = cfg.vocab_size;
  const table = v * c;
  const other = Math.max(...all.filter((t) => !t.table).map((t) => t.numel));
  if (!eight || table < 4096 || table <= other) return Math.max(table, other);
  const gcd = (a: number, b: number): number => b === 0 ? a : gcd(b, a % b);
  const unit = block / gcd(c, block);
  const rows = Math.max(Math.floor(other / c / unit) * unit, unit);
  return rows < v ? Math.max(other, rows * c) : table;
}

/** Stored bytes of one projector of `pn` elements at `bits` (4-bit codes packed two a byte). */
function projectorBytes(pn: number, bits: number, group: number): number {
  switch (bits) {
    case 32:
      return 4 * pn;
    case 16:
      return 2 * pn;
    case 8:
      return pn + 8 * Math.ceil(pn / group);
    default:
      return Math.ceil(pn / 2) + 8 * Math.ceil(pn / group);
  }
}

/**
 * Activation and backward-scratch bytes of the engine for a b×t micro-batch; `wq` is the
 * dequantization scratch of INT8 weights (the largest linear's element count), else 0;
 * `bytes` per activation value (4 for fp32, 2 for bf16), the f32 buffers (RMSNorm
 * statistics, logits, RoPE table) at 4 whatever the precision; `slots` sets of per-block
 * buffers (1 with activation checkpointing, else one per block).
 */
function activationBytes(
  cfg: ModelConfig,
  b: number,
  t: number,
  wq: number,
  bytes: number,
  slots: number,
): number {
  const L = cfg.num_hidden_layers;
  const c = cfg.hidden_size;
  const i = cfg.intermediate_size;
  const v = cfg.vocab_size;
  const h = cfg.num_attention_heads;
  const hd = c / h;
  const kv = hd * cfg.num_key_value_heads;
  const n = b * t;
  const att = b * h * t * t;
  const f32 = slots * 2 * n + n + n * v + t * hd;
  const act = (L + 1) * n * c +
    slots * (5 * n * c + 2 * n * kv + att + 3 * n * i) +
    n * c +
    4 * n * c + 2 * n * kv + att + 3 * n * i + wq;
  return 4 * f32 + bytes * act;
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
 * Full-rank BF16 memory of GaLore paper Table 6 as algorithm spec I-15 defines it: weights
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
