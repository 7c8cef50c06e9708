/**
 * The small engine config the engine-level tests build on: llama-9m cut to two blocks, byte
 * vocabulary, batch 2 × seq 16, no clipping or decay, rank 16.
 */
import type { EngineConfig, ModelConfig } from "../ffi/engine.ts";
import { modelConfig } from "../lib/presets.ts";

/** What a test changes in {@link tinyConfig}. */
export interface TinyConfig {
  optimizer?: string;
  seed?: number;
  batch?: number;
  seq?: number;
  /** Model fields replacing llama-9m's. */
  model?: Partial<ModelConfig>;
  /** Optimizer fields added or replaced. */
  options?: Record<string, unknown>;
  threads?: number;
}

/** The tests' engine config with `c`'s changes. */
export function tinyConfig(c: TinyConfig = {}): EngineConfig {
  const optimizer = c.optimizer ?? "adamw";
  return {
    model: { ...modelConfig("llama-9m", 256), num_hidden_layers: 2, ...c.model },
    batch_size: c.batch ?? 2,
    seq_len: c.seq ?? 16,
    optimizer: {
      name: optimizer,
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weight_decay: 0,
      clip: 0,
      rank: 16,
      ...(optimizer === "qgalore" ? { weight_bits: 8, proj_bits: 4 } : {}),
      ...c.options,
    },
    seed: c.seed ?? 1,
    device: "cpu",
    ...(c.threads === undefined ? {} : { threads: c.threads }),
  };
}
