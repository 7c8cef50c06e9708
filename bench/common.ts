/**
 * Settings shared by the benchmarks.
 * @module
 */
import type { EngineConfig, OptimizerConfig } from "../ffi/engine.ts";
import {
  checkOptions,
  engineConfig,
  PROJECTED_OPTIMIZERS,
  type TrainOptions,
} from "../lib/options.ts";
import { modelConfig } from "../lib/presets.ts";

/** One benchmark case: a preset at a vocabulary, an optimizer and a run shape. */
export interface BenchCase
  extends
    Partial<Pick<TrainOptions, "batchSize" | "seqLen" | "device" | "precision" | "checkpointing">> {
  /** Preset name. */
  model: string;
  /** Vocabulary of the preset (the byte tokenizer's 256, or the paper's 32000). */
  vocab: number;
  /** Optimizer name. */
  optimizer: string;
  /** GaLore rank, for the projected optimizers. */
  rank: number;
}

/**
 * The engine config of a benchmark case ({@link engineConfig} of the CLI's options): the
 * per-optimizer defaults (the reference runs of docs/algorithm-spec.md §1.6, §1.7, §2.6), at
 * `rank` for the projected optimizers and without clipping.
 */
export function benchConfig(c: BenchCase): EngineConfig {
  const { model, vocab, rank, ...run } = c;
  const projected = PROJECTED_OPTIMIZERS.includes(c.optimizer);
  const { opts } = checkOptions({ ...run, model, clip: 0, ...(projected ? { rank } : {}) });
  return engineConfig(opts, modelConfig(model, vocab));
}

/** The optimizer section of {@link benchConfig}. */
export function optimizerConfig(name: string, rank: number, model: string): OptimizerConfig {
  return benchConfig({ model, vocab: 256, optimizer: name, rank }).optimizer;
}
