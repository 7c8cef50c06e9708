/**
 * The shared loop's contracts: what an engine, a batch source and a task (pre-training,
 * fine-tuning) provide to a {@link Run}, the records it writes to `metrics.jsonl`, and the
 * callbacks a caller can pass to {@link train}.
 *
 * @module
 */

import type { EngineConfig, EngineInfo, MemoryBytes, StepStats } from "../ffi/engine.ts";
import type { OwnedData } from "./checkpoints.ts";
import type { ResolvedOptions, TrainOptions } from "./options.ts";
import type { Tokenizer } from "./tokenizer.ts";
import type { Run } from "./trainer.ts";

/** The part of {@link Engine} the loop uses; tests can pass a stand-in. */
export interface TrainEngine extends Disposable {
  /** Trainable parameter count. */
  readonly params: number;
  /** Device actually used. */
  readonly device: string;
  /** Precision actually used (`fp32`, `bf16`); stand-ins may leave it out (fp32). */
  readonly precision?: string;
  /**
   * One optimizer update over `microBatches` micro-batches; `mask` (fine-tuning) marks the
   * targets that carry loss (docs: interface A), absent for pre-training.
   */
  trainStep(
    tokens: Int32Array,
    microBatches: number,
    lr: number,
    mask?: Uint8Array,
  ): Promise<StepStats & { count?: number }>;
  /** Mean validation loss over `batches` batches. */
  evalLoss(tokens: Int32Array, batches: number): Promise<number>;
  /**
   * Masked evaluation (fine-tuning): the sum and count of the counted targets' losses over
   * `batches` batches; absent on engines without masks.
   */
  eval?(
    tokens: Int32Array,
    batches: number,
    mask?: Uint8Array,
  ):
    | Promise<{ mean: number; sum: number; count: number }>
    | { mean: number; sum: number; count: number };
  /** Engine-tracked bytes by category. */
  memory(): MemoryBytes;
  /** Engine facts (`svd_count`, `gaps`, …); optional for stand-ins. */
  info?(): Partial<EngineInfo>;
  /**
   * Writes a checkpoint with the run record `run` stored in it; a stand-in without it makes
   * a run that saves none.
   */
  save?(path: string, run?: unknown): Promise<void>;
  /** Restores a checkpoint (for `resume`); a refused load changes nothing. */
  load?(path: string): Promise<void>;
}

/** One update's training tokens, from a {@link BatchSource}. */
export interface TrainBatch {
  /** `micro × batch` rows of `t + 1` ids (t ≤ seq_len; the engine derives t). */
  tokens: Int32Array;
  /** Which targets carry loss (1) and which not (0, padding, prompts); absent: all do. */
  mask?: Uint8Array;
  /** Targets that carry loss in the update (the engine's count must agree). */
  count: number;
  /** Real (non-padding) input tokens of the update, for tokens/s. */
  tokens_real: number;
}

/** A validation result of a {@link BatchSource}. */
export interface ValResult {
  /** Mean loss per counted target (nats); may be non-finite. */
  loss: number;
  /**
   * Batches of the evaluation, for the reference's n + 1 divisor (`val_loss_ref`); null
   * where that reading does not apply (fine-tuning's token-weighted mean).
   */
  refBatches: number | null;
}

/**
 * Where a run's batches come from: pre-training's corpus windows ({@link CorpusBatches}) or
 * a fine-tuning sampler (lib/finetune.ts). The loop, checkpoints and resume are the same;
 * the source's {@link BatchSource.state} is the run record's `sampler`, from which it is
 * rebuilt on `--resume` to draw the batches the uninterrupted run would.
 */
export interface BatchSource {
  /** One-line description (the summary's `data`). */
  describe(): string;
  /** Best achievable loss when known analytically (the synthetic corpus). */
  readonly entropyFloor?: number;
  /** What the run reads, as a hash: a resume refuses other data. */
  fingerprint(): string;
  /** The next update's batch. */
  next(): TrainBatch;
  /** The sampler's position (JSON), stored in each checkpoint's run record. */
  state(): unknown;
  /** The validation loss with `engine`. */
  validate(engine: TrainEngine): Promise<ValResult>;
}

/**
 * What differs between pre-training and fine-tuning around the shared loop: where the
 * batches come from and what the summary adds. {@link train} uses pre-training's.
 */
export interface RunTask {
  /** `pretrain` or `finetune`: stored in the run record; a resume must be the same task. */
  readonly name: "pretrain" | "finetune";
  /**
   * Opens the run's batch source: `sampler` is the run record's (resume) or null.
   * Errors are one-line UsageErrors naming the flag.
   */
  openSource(
    opts: ResolvedOptions,
    tokenizer: Tokenizer,
    sampler: unknown | null,
  ): Promise<BatchSource>;
  /**
   * At each evaluation, after the validation loss: what the task adds to the evaluation's
   * record (e.g. `mc_accuracy`) and to its progress line. Must not change the engine's state
   * (a resumed run repeats the uninterrupted run's evaluations).
   */
  onEvaluate?(run: Run): Promise<{ record: Partial<EvalRecord>; note?: string }>;
  /** What the task adds to the summary (as `finetune`), evaluated before the engine is freed. */
  summarize?(run: Run): Promise<Record<string, unknown>>;
  /** Throws a one-line UsageError when the options name something the task does not use. */
  check?(opts: Partial<TrainOptions>): void;
  /**
   * After the engine is built (and a resume's checkpoint loaded): e.g. loading an adapter
   * into a new run. A UsageError fails the set-up, leaving no run folder.
   */
  prepare?(engine: TrainEngine, opts: ResolvedOptions, resumed: boolean): Promise<void>;
  /**
   * In-memory data only (a task that has it opens data given in memory): writes the run's own
   * copy of the data into the new run's folder `out` (so that a resume can read it back, and
   * no record names a temporary file) and says what the run record keeps ({@link OwnedData});
   * `data`/`valData` (absolute paths of those files) replace the options' in the record and
   * the summary. Called once the folder is the run's, never for a resumed run; first with
   * `checkOnly`, as the options are checked, for the refusals alone (a file of another's there).
   */
  adopt?(
    out: string,
    overwrite: boolean,
    checkOnly?: boolean,
  ): { own: OwnedData; data?: string; valData?: string };
}

/** A `metrics.jsonl` line for one update. */
export interface StepRecord {
  /** Record kind. */
  type: "step";
  /** 1-based update number. */
  step: number;
  /** Training loss (mean over the update's micro-batches). */
  loss: number;
  /** Learning rate used. */
  lr: number;
  /** Global gradient norm before clipping. */
  grad_norm: number;
  /** Whether clipping scaled the gradient. */
  clipped: boolean;
  /** Training tokens consumed so far (fine-tuning: real tokens, padding not counted). */
  tokens: number;
  /** Targets that carried loss in this update (fine-tuning only; the engine's count). */
  loss_tokens?: number;
  /** Projector refreshes so far (projected optimizers only): report refresh events per step. */
  svd_count?: number;
  /** Training throughput so far (excludes evaluation time). */
  tokens_per_s: number;
  /** Seconds since the run started. */
  elapsed_s: number;
}

/** A `metrics.jsonl` line for one evaluation. */
export interface EvalRecord {
  /** Record kind. */
  type: "eval";
  /** Updates done when evaluated (0 = before training). */
  step: number;
  /** Mean validation cross-entropy (nats/token); null when it was not finite. */
  val_loss: number | null;
  /** exp(val_loss). */
  val_ppl: number | null;
  /** Multiple-choice accuracy (fine-tuning with `--mc`). */
  mc_accuracy?: number;
  /** The reference's loss: sum of batch losses / (batches + 1) (docs/algorithm-spec.md §1.7, I-16). */
  val_loss_ref: number | null;
  /** Training tokens consumed so far. */
  tokens: number;
  /** Seconds since the run started. */
  elapsed_s: number;
}

/** Callbacks during {@link train}; awaited, so they may update a notebook display. */
export interface TrainHooks {
  /** After each update. */
  onStep?: (record: StepRecord) => void | Promise<void>;
  /** After each evaluation, including the initial and the final one. */
  onEval?: (record: EvalRecord) => void | Promise<void>;
  /** Aborting it stops the run after the current update, like Ctrl-C (`interrupted: true`). */
  signal?: AbortSignal;
  /** Builds the engine; defaults to `Engine.create` (loads the native library). */
  createEngine?: (cfg: EngineConfig) => TrainEngine | Promise<TrainEngine>;
}
