/**
 * Learning-rate schedule of the GaLore / Q-GaLore recipe: linear warmup, then cosine decay to
 * `minLrRatio · lr` (docs/algorithm-spec.md §1.7).
 *
 * @module
 */

/** Schedule parameters, in optimizer updates. */
export interface ScheduleOptions {
  /** Peak learning rate. */
  lr: number;
  /** Warmup length W in updates (0 allowed). */
  warmup: number;
  /** Total number of updates N; the decay reaches its floor at N. */
  steps: number;
  /** Floor r of the cosine as a fraction of `lr` (the recipe uses 0.1). */
  minLrRatio: number;
  /**
   * Reference mode: update u (0-based) uses λ(u), so the first update has lr 0, as in the
   * reference code. The default (false) uses λ(u + 1): no update is wasted and the last one
   * lands exactly on the floor. This is a deliberate deviation from the reference.
   */
  zeroFirst?: boolean;
}

/**
 * The multiplier λ(s): s/W for s < W, else r + (1 − r)·½(1 + cos(π(s − W)/(N − W))),
 * and r for s ≥ N.
 */
export function lambdaAt(s: number, warmup: number, steps: number, minLrRatio: number): number {
  if (s < warmup) return s / warmup;
  if (s >= steps) return minLrRatio;
  const progress = (s - warmup) / (steps - warmup);
  return minLrRatio + (1 - minLrRatio) * 0.5 * (1 + Math.cos(Math.PI * progress));
}

/** Learning rate for update number `update` (0-based). */
export function lrAt(update: number, opts: ScheduleOptions): number {
  const s = opts.zeroFirst ? update : update + 1;
  return opts.lr * lambdaAt(s, opts.warmup, opts.steps, opts.minLrRatio);
}
