/**
 * Settings shared by the benchmarks.
 * @module
 */

/** Optimizer settings of the benchmark for each optimizer name. */
export function optimizerConfig(name: string, rank: number): Record<string, unknown> {
  const base = { name, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0, clip: 0 };
  switch (name) {
    case "galore":
      return { ...base, eps: 1e-6, rank, update_gap: 200, proj_bits: 16, fused: true };
    case "galore8bit":
      return { ...base, rank, update_gap: 200, proj_bits: 16, fused: true };
    case "qgalore":
      return {
        ...base,
        beta2: 0.95,
        rank,
        update_gap: 200,
        weight_bits: 8,
        proj_bits: 4,
        lazy: true,
        fused: true,
      };
    default:
      return base;
  }
}
