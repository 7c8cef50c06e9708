/**
 * Settings shared by the benchmarks.
 * @module
 */
import type { OptimizerConfig } from "../ffi/engine.ts";
import { checkOptions, engineOptimizerConfig, PROJECTED_OPTIMIZERS } from "../lib/options.ts";

/**
 * The engine's optimizer config for `name` with the CLI's per-optimizer defaults (the
 * reference runs of docs/algorithm-spec.md §1.6, §1.7, §2.6), at `rank` for the projected optimizers
 * and without clipping.
 */
export function optimizerConfig(name: string, rank: number, model: string): OptimizerConfig {
  const projected = PROJECTED_OPTIMIZERS.includes(name);
  const { opts } = checkOptions({
    optimizer: name,
    model,
    clip: 0,
    ...(projected ? { rank } : {}),
  });
  return engineOptimizerConfig(opts);
}
