/**
 * What a run did: the {@link Summary} written to `summary.json` and returned by {@link train},
 * the data-parallel communication it reports, and {@link DivergedError}, which carries it.
 *
 * @module
 */

import type { MemoryBytes } from "../ffi/engine.ts";
import { type CommBytes, world } from "./dist.ts";
import { UsageError } from "./errors.ts";
import type { ResolvedOptions } from "./options.ts";
import type { ModelConfig } from "./presets.ts";

/** The categories of {@link CommBytes} (bytes). */
const COMM_FIELDS = [
  "lowrank",
  "refresh",
  "whole_projected",
  "unprojected",
  "scalars",
  "total",
  "full_allreduce",
] as const;

/** `summary.data_parallel.comm`: what the steps between `from` and `to` sent. */
function commSummary(
  requested: string,
  from: CommBytes,
  to: CommBytes,
): NonNullable<Summary["data_parallel"]>["comm"] {
  const steps = to.steps - from.steps;
  const total = Object.fromEntries(COMM_FIELDS.map((k) => [k, to[k] - from[k]])) as Omit<
    CommBytes,
    "mode" | "steps"
  >;
  const per = Object.fromEntries(
    COMM_FIELDS.map((k) => [k, steps > 0 ? total[k] / steps : 0]),
  ) as Omit<CommBytes, "mode" | "steps">;
  return {
    requested,
    // no step counted by category: the fused step ran, summing whole gradients as they
    // complete (rust/src/dist/overlap.rs; its bytes are in allreduce_bytes_per_step)
    used: steps > 0 ? to.mode : "full (fused step)",
    steps,
    bytes_per_step: per,
    full_allreduce_bytes_per_step: per.full_allreduce,
    bytes_total: total,
  };
}

/** All-reduced bytes and updates as this process started the run (bytes per update). */
export interface CommStart {
  /** Bytes this process had all-reduced. */
  bytes: number;
  /** Updates the run had done (a resumed run's checkpoint step). */
  steps: number;
  /** This process's communication by category. */
  comm: CommBytes;
}

/** {@link CommStart} as of now, for a run that has done `steps` updates. */
export function commStart(steps: number): CommStart {
  return { bytes: world().allreduce_bytes, steps, comm: world().comm };
}

/**
 * `summary.data_parallel` of a run that has done `steps` updates, its bytes counted from
 * `from`; undefined for a one-process run.
 */
export function dataParallelSummary(
  from: CommStart,
  steps: number,
  opts: Pick<ResolvedOptions, "batchSize" | "dpComm">,
): Summary["data_parallel"] {
  const w = world();
  if (w.size <= 1) return undefined;
  const done = steps - from.steps;
  return {
    ranks: w.size,
    global_batch: w.size * opts.batchSize,
    allreduce_bytes_per_step: done > 0 ? (w.allreduce_bytes - from.bytes) / done : 0,
    comm: commSummary(opts.dpComm, from.comm, w.comm),
  };
}

/** What a run did; written to `summary.json` and returned by {@link train}. */
export interface Summary {
  /**
   * A data-parallel run only: the ranks, the global batch (ranks × batch) and the bytes each
   * rank all-reduced per update in this process (the full gradient plus the loss and count).
   */
  data_parallel?: {
    ranks: number;
    global_batch: number;
    allreduce_bytes_per_step: number;
    /**
     * The training steps' communication in this process: `--dp-comm` as given and as used
     * (`full` or `lowrank` in the global step; `full (fused step)` when the fused step ran,
     * whose bytes are not split by category), and bytes per step by category (averaged over the steps, refresh
     * steps included) next to what a full-gradient all-reduce of the same steps sends.
     */
    comm: {
      requested: string;
      used: string;
      steps: number;
      bytes_per_step: Omit<CommBytes, "mode" | "steps">;
      full_allreduce_bytes_per_step: number;
      bytes_total: Omit<CommBytes, "mode" | "steps">;
    };
  };
  /** Updates completed. */
  steps: number;
  /** Updates requested. */
  steps_planned: number;
  /** Training tokens consumed (steps × grad_accum × batch × seq_len). */
  tokens: number;
  /** Validation loss before the first update. */
  initial_val_loss: number | null;
  /** Loss of the last completed update. */
  final_train_loss: number | null;
  /** Validation loss at the end: the exact mean of the batch losses. */
  val_loss: number | null;
  /** exp(val_loss). */
  val_ppl: number | null;
  /**
   * Validation loss at the end as the reference computes it: the sum of the batch losses
   * divided by (batches + 1), an off-by-one that biases it down (docs/algorithm-spec.md §1.7, I-16).
   */
  val_loss_ref: number | null;
  /** exp(val_loss_ref): the perplexity the reference would report. */
  val_ppl_ref: number | null;
  /** Best achievable loss of the synthetic corpus; null for text data. */
  entropy_floor: number | null;
  /** Training throughput (evaluation time excluded). */
  tokens_per_s: number;
  /** Wall time of the whole run, engine creation and evaluations included. */
  wall_s: number;
  /** Trainable parameters. */
  params: number;
  /** Optimizer name. */
  optimizer: string;
  /** Whether the optimizer stepped inside the backward (as the engine reports it). */
  fused: boolean;
  /**
   * How the engine clipped (`EngineInfo.clip_mode`): `stash` (one backward with the clip
   * stash), `two-backward`, `unfused` or `off`; null where the engine does not say.
   */
  clip_mode: string | null;
  /** Projector refreshes (SVD or equivalent) taken; 0 for unprojected optimizers. */
  svd_count: number;
  /** Final refresh interval of each projected matrix, by parameter name. */
  gaps: Record<string, number>;
  /** Refreshes that failed and kept the previous projector (docs/algorithm-spec.md I-17). */
  refresh_failures: number;
  /** Non-finite gradient elements zeroed by the optimizer; null when not counted (adamw). */
  nonfinite_grads: number | null;
  /** Seconds spent in projector refreshes. */
  refresh_seconds: number;
  /**
   * Rank-r gradients formed straight from the product's factors (`projGrad: "factored"`;
   * 0 otherwise): one per projected matrix and update that did not refresh its projector.
   */
  factored_grads: number;
  /** Seconds per engine phase: forward (with the loss), backward (with fused updates), optimizer. */
  timing: { forward_s: number; backward_s: number; optimizer_s: number; dequant_s: number } | null;
  /** Device the engine ran on. */
  device: string;
  /** Precision the engine computed in (`fp32`, `bf16`). */
  precision: string;
  /** Model name and config. */
  model: { name: string; config: ModelConfig };
  /** Data description. */
  data: string;
  /** The tokenizer: kind, vocabulary, and where it came from (null: bytes). */
  tokenizer: { kind: string; vocab_size: number; source: string | null };
  /** The Hugging Face folder the weights started from, or null (random init). */
  init_from: string | null;
  /** The Hugging Face folder the final model was written to, or null. */
  export: string | null;
  /** Every option of the run, defaults filled in (null: does not apply to the optimizer). */
  config: ResolvedOptions;
  /** Engine bytes by category, plus the process's peak resident set size. */
  memory: MemoryBytes & { peak_rss: number | null; peak_device: number | null };
  /** Stopped early by Ctrl-C. */
  interrupted: boolean;
  /** Stopped early by a non-finite loss or gradient. */
  diverged: boolean;
  /** The one-line reason a run stopped early on an error, or why its export failed; else null. */
  error: string | null;
  /** Directory of `metrics.jsonl` and `summary.json`, or null. */
  out: string | null;
  /** The run's newest checkpoint (`out/checkpoints/step-….safetensors`), or null. */
  checkpoint: string | null;
  /**
   * The checkpoint to go back to: for a healthy run its newest; after a divergence the newest
   * saved at or before the loss's best (later ones are renamed `….diverged`), to resume from
   * with a lower `--lr`. Null when there is none.
   */
  last_good_checkpoint: string | null;
  /** The checkpoint this run was resumed from (`--resume`), or null. */
  resumed_from: string | null;
  /** Start time of the run (ISO 8601; a resumed run keeps its first start). */
  started_at: string;
  /** Fine-tuning's additions (data counts, validation, multiple-choice accuracy); absent otherwise. */
  finetune?: Record<string, unknown>;
}

/** Training stopped on a non-finite loss; `summary` has what the run did until then. */
export class DivergedError extends UsageError {
  /** Summary of the interrupted run (also written to `summary.json`). */
  readonly summary: Summary;

  /** Wraps the one-line message and the summary. */
  constructor(message: string, summary: Summary) {
    super(message);
    this.name = "DivergedError";
    this.summary = summary;
  }
}
