/**
 * What the tests' stand-in engines (trainer, phases, diverge, data input) share: a fixed
 * memory report in the engine's seven categories.
 * @module
 */

import type { MemoryBytes } from "../ffi/engine.ts";

/** A small fixed memory report: weights 4, grads 4, state 8, activations 2, total 18. */
export function standInMemory(): MemoryBytes {
  return {
    weights: 4,
    adapters: 0,
    grads: 4,
    optimizer_state: 8,
    projector: 0,
    activations: 2,
    total: 18,
  };
}
