/**
 * A small seeded PRNG (xoshiro128**) for data sampling. Same seed, same sequence, on every
 * machine and every run.
 *
 * @module
 */

/** Seeded xoshiro128** generator using 32-bit integer ops only (no BigInt). */
export class Rng {
  #s = new Uint32Array(4);

  /** Seeds the state from any finite number via splitmix32, so nearby seeds diverge fast. */
  constructor(seed: number) {
    if (!Number.isFinite(seed)) throw new RangeError(`Rng seed ${seed}: must be finite`);
    // Fold both 32-bit halves in so seeds above 2^32 still differ.
    let x = (seed >>> 0) ^ Math.imul(Math.floor(seed / 0x1_0000_0000) >>> 0, 0x85ebca6b);
    for (let i = 0; i < 4; i++) {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
      z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
      this.#s[i] = z ^ (z >>> 15);
    }
    // An all-zero state would emit zeros forever.
    if ((this.#s[0] | this.#s[1] | this.#s[2] | this.#s[3]) === 0) this.#s[0] = 1;
  }

  /**
   * The generator's position: its four 32-bit state words. {@link Rng.restore} continues the
   * sequence exactly from here (a resumed run draws the batches the uninterrupted one would).
   */
  state(): [number, number, number, number] {
    const s = this.#s;
    return [s[0], s[1], s[2], s[3]];
  }

  /**
   * A generator at a position saved by {@link Rng.state}. Throws RangeError unless `state` is
   * four integers in [0, 2^32), not all zero (that state would emit zeros forever).
   */
  static restore(state: readonly unknown[]): Rng {
    const ok = Array.isArray(state) && state.length === 4 &&
      state.every((w) => typeof w === "number" && Number.isInteger(w) && w >= 0 && w < 2 ** 32) &&
      state.some((w) => w !== 0);
    if (!ok) {
      throw new RangeError(
        `Rng state ${JSON.stringify(state)}: must be 4 integers in [0, 2^32), not all 0`,
      );
    }
    const rng = new Rng(0);
    rng.#s.set(state as number[]);
    return rng;
  }

  /** Next uniform 32-bit unsigned integer. */
  nextU32(): number {
    const s = this.#s;
    const r = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return r;
  }

  /** Uniform float in [0, 1) with 32 bits of randomness. */
  nextFloat(): number {
    return this.nextU32() / 0x1_0000_0000;
  }

  /** Uniform integer in [0, n), unbiased (rejection sampling); n must be in [1, 2^32]. */
  int(n: number): number {
    if (!Number.isInteger(n) || n < 1 || n > 0x1_0000_0000) {
      throw new RangeError(`Rng.int(${n}): n must be an integer in [1, 2^32]`);
    }
    // Reject the top sliver of the 32-bit range that would over-represent small residues.
    const limit = 0x1_0000_0000 - (0x1_0000_0000 % n);
    let x = this.nextU32();
    while (x >= limit) x = this.nextU32();
    return x % n;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
