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
export interface BenchCase extends
  Partial<
    Pick<
      TrainOptions,
      "batchSize" | "seqLen" | "device" | "precision" | "checkpointing" | "projGrad"
    >
  > {
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
  const { projGrad, ...rest } = run;
  const { opts } = checkOptions({
    ...rest,
    model,
    clip: 0,
    ...(projected ? { rank, ...(projGrad ? { projGrad } : {}) } : {}),
  });
  return engineConfig(opts, modelConfig(model, vocab));
}

/** The optimizer section of {@link benchConfig}. */
export function optimizerConfig(name: string, rank: number, model: string): OptimizerConfig {
  return benchConfig({ model, vocab: 256, optimizer: name, rank }).optimizer;
}

/** The processor as `lscpu` names it (model, family, CPUs, the SIMD the kernels care about). */
export function lscpu(): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  try {
    const text = new TextDecoder().decode(new Deno.Command("lscpu").outputSync().stdout);
    const field = (name: string) =>
      new RegExp(`^${name}:\\s+(.*)$`, "m").exec(text)?.[1]?.trim() ?? null;
    out.model_name = field("Model name");
    out.family = field("CPU family");
    out.model = field("Model");
    out.cpus = field("CPU\\(s\\)");
    const flags = (field("Flags") ?? "").split(/\s+/);
    out.simd = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"].filter((f) =>
      flags.includes(f)
    );
  } catch (e) {
    out.error = String(e);
  }
  return out;
}
