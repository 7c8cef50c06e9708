/**
 * Fixed-seed training runs whose every loss is pinned bit for bit in
 * `tests/fixtures/pinned_losses.json`: refactors must leave trajectories unchanged.
 * `deno run -A tests/pinned_cases.ts --write` regenerates the fixture (only when a change
 * of numerics is intended and explained in its commit).
 * @module
 */

import type { TrainOptions } from "../lib/options.ts";
import { train } from "../lib/trainer.ts";

/** One pinned run: a name and the options that differ from the defaults. */
export interface PinnedCase {
  /** Case name (fixture key). */
  name: string;
  /** Options given to `train`. */
  opts: Partial<TrainOptions>;
}

const short: Partial<TrainOptions> = {
  batchSize: 4,
  seqLen: 64,
  steps: 10,
  evalEvery: 5,
  evalBatches: 2,
  seed: 7,
  threads: 2,
};

/** The pinned cases: the default run and short runs of every optimizer family. */
export const PINNED_CASES: readonly PinnedCase[] = [
  { name: "default", opts: { threads: 2 } },
  { name: "adamw", opts: { ...short, optimizer: "adamw" } },
  { name: "adamw-ga2-clip", opts: { ...short, optimizer: "adamw", gradAccum: 2, clip: 0.05 } },
  { name: "adam8bit", opts: { ...short, optimizer: "adam8bit" } },
  { name: "galore", opts: { ...short, optimizer: "galore", rank: 16, updateGap: 4 } },
  {
    name: "galore8bit-fused",
    opts: { ...short, optimizer: "galore8bit", rank: 16, updateGap: 4, fused: true },
  },
  {
    name: "galore8bit-unfused-clip",
    opts: { ...short, optimizer: "galore8bit", rank: 16, updateGap: 4, fused: false, clip: 0.05 },
  },
  {
    name: "qgalore-fused-clip",
    opts: { ...short, optimizer: "qgalore", rank: 16, updateGap: 3, fused: true, clip: 0.05 },
  },
  {
    name: "qgalore-unfused",
    opts: { ...short, optimizer: "qgalore", rank: 16, updateGap: 3, fused: false },
  },
  {
    name: "qgalore-ga2",
    opts: { ...short, optimizer: "qgalore", rank: 16, updateGap: 2, gradAccum: 2 },
  },
  {
    name: "qgalore-randomized-ckpt",
    opts: {
      ...short,
      optimizer: "qgalore",
      rank: 16,
      updateGap: 3,
      projRefresh: "randomized",
      checkpointing: true,
      weightDecay: 0.1,
    },
  },
];

/** Every step loss, every validation loss and the final summary losses of one case. */
export interface PinnedRun {
  /** Training loss of each update. */
  losses: number[];
  /** Gradient norm of each update. */
  grad_norms: number[];
  /** Validation losses in order (initial, periodic, final). */
  val_losses: (number | null)[];
  /** Projector refreshes taken. */
  svd_count: number;
}

/** Runs one case with no files and no output. */
export async function runPinned(c: PinnedCase): Promise<PinnedRun> {
  const losses: number[] = [];
  const gradNorms: number[] = [];
  const val: (number | null)[] = [];
  const s = await train({ ...c.opts, out: null, quiet: true, handleSigint: false }, {
    onStep: (r) => {
      losses.push(r.loss);
      gradNorms.push(r.grad_norm);
    },
    onEval: (r) => void val.push(r.val_loss),
  });
  return { losses, grad_norms: gradNorms, val_losses: val, svd_count: s.svd_count };
}

/** Where the pinned values live. */
export const PINNED_FIXTURE: URL = new URL("./fixtures/pinned_losses.json", import.meta.url);

if (import.meta.main && Deno.args.includes("--write")) {
  const out: Record<string, PinnedRun> = {};
  for (const c of PINNED_CASES) {
    out[c.name] = await runPinned(c);
    console.log(c.name, out[c.name].val_losses.at(-1));
  }
  Deno.writeTextFileSync(PINNED_FIXTURE, JSON.stringify(out, null, 1) + "\n");
}
