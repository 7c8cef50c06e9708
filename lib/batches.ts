/**
 * Pre-training's batch source: random windows of a corpus, drawn with a seeded generator
 * that a checkpoint stores, split across the ranks of a data-parallel run.
 *
 * @module
 */

import { dataFingerprint } from "./checkpoints.ts";
import type { Dataset } from "./data.ts";
import { world } from "./dist.ts";
import type { ResolvedOptions } from "./options.ts";
import { Rng } from "./rng.ts";
import type { BatchSource, TrainBatch, TrainEngine, ValResult } from "./run_types.ts";

/** Pre-training's batches: random windows of a {@link Dataset}, drawn with a seeded {@link Rng}. */
export class CorpusBatches implements BatchSource {
  /** The corpus. */
  readonly data: Dataset;
  readonly #rng: Rng;
  readonly #path: string | null;
  readonly #shape: { batch: number; seqLen: number; micro: number; evalBatches: number };
  readonly #rank: number;
  readonly #ranks: number;
  #valTokens: Int32Array | null = null;

  /**
   * Windows of `data` in the run's shape; `sampler` is a saved {@link Rng.state} (resume),
   * else the generator starts from `seed`. `path` is the `--data` it was opened by.
   */
  constructor(
    data: Dataset,
    opts: Pick<ResolvedOptions, "batchSize" | "seqLen" | "gradAccum" | "evalBatches" | "seed">,
    path: string | null,
    sampler: number[] | null = null,
  ) {
    this.data = data;
    this.#path = path;
    this.#rng = sampler === null ? new Rng(opts.seed) : Rng.restore(sampler);
    // data-parallel: every rank draws the whole global batch (so the generator stays the
    // same everywhere) and trains on its own slice of each micro-batch
    const w = world();
    this.#rank = w.rank;
    this.#ranks = w.size;
    this.#shape = {
      batch: opts.batchSize,
      seqLen: opts.seqLen,
      micro: opts.gradAccum,
      evalBatches: opts.evalBatches,
    };
    // the validation windows are fixed: taken once, as the run starts
    // (a data-parallel run's ranks each evaluate every window of the global batches, in
    // batches of their own size: the same mean as one process with the global batch)
    this.#valTokens = data.valBatches(opts.evalBatches, opts.batchSize * this.#ranks, opts.seqLen);
  }

  /** The corpus's best achievable loss, if known. */
  get entropyFloor(): number | undefined {
    return this.data.entropyFloor;
  }

  /** The corpus's description. */
  describe(): string {
    return this.data.describe();
  }

  /** {@link dataFingerprint} of the corpus. */
  fingerprint(): string {
    return dataFingerprint(this.data, this.#path);
  }

  /** `micro × batch` random windows of `seq_len + 1` tokens; every target counts. */
  next(): TrainBatch {
    const { batch, seqLen, micro } = this.#shape;
    const n = micro * batch * seqLen;
    if (this.#ranks > 1) {
      const all = this.data.trainBatch(this.#rng, batch * this.#ranks, seqLen, micro);
      const row = seqLen + 1;
      const tokens = new Int32Array(micro * batch * row);
      for (let m = 0; m < micro; m++) {
        const from = (m * this.#ranks + this.#rank) * batch * row;
        tokens.set(all.subarray(from, from + batch * row), m * batch * row);
      }
      return { tokens, count: n, tokens_real: n };
    }
    const tokens = this.data.trainBatch(this.#rng, batch, seqLen, micro);
    return { tokens, count: n, tokens_real: n };
  }

  /** The generator's state. */
  state(): number[] {
    return this.#rng.state();
  }

  /** Mean of the batch means over the fixed validation windows. */
  async validate(engine: TrainEngine): Promise<ValResult> {
    const n = this.#shape.evalBatches;
    return { loss: await engine.evalLoss(this.#valTokens!, n * this.#ranks), refBatches: n };
  }
}
