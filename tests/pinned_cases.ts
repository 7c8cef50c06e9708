/**
 * Fixed-seed training runs whose every loss is pinned bit for bit in
 * `tests/fixtures/pinned_losses.json`: refactors must leave trajectories unchanged.
 *
 * The CPU GEMM picks its blocking from the processor's cache sizes, so the last bits of a
 * long run depend on the processor model (the default run differs from the 8th significant
 * digit between AMD family 25 and 26). The fixture therefore holds one set of trajectories
 * per processor model ({@link machineKey}); on a model it has no entry for, the test
 * compares within {@link FALLBACK_RTOL} and says so.
 *
 * `deno run -A tests/pinned_cases.ts --write` records this processor's entry, leaving the
 * others. Record a new processor at the commit the fixture was made from (trajectories of
 * that commit), and regenerate all entries only when a change of numerics is intended and
 * explained in its commit.
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

/** Where the pinned values live: processor model → case name → run. */
export const PINNED_FIXTURE: URL = new URL("./fixtures/pinned_losses.json", import.meta.url);

/** Relative tolerance on a processor model the fixture has no entry for. */
export const FALLBACK_RTOL = 1e-4;

/**
 * The same for cases that project gradients (svd_count > 0), by field. Adam's first steps
 * after a refresh are about lr·sign(R), so a near-zero component of R whose last bit
 * differs moves the run by a whole step: on one processor, the fp32 GEMM's AVX2 and
 * AVX-512 kernels (which round the SVD's products differently) gave trajectories up to
 * 1.7e-2 apart in loss and 1.2e-1 in gradient norm. Exact pins catch changes where the
 * model is known; elsewhere these only say the run trains to the same place.
 */
export const FALLBACK_RTOL_PROJECTED = { losses: 5e-2, grad_norms: 0.3, val_losses: 5e-2 };

/**
 * The processor model as Linux reports it ("AuthenticAMD family 26 model 2"): the fixture
 * key, since GEMM blocking (and so rounding) follows the model's caches.
 */
export function machineKey(): string {
  let text = "";
  try {
    text = Deno.readTextFileSync("/proc/cpuinfo");
  } catch {
    return `${Deno.build.os} ${Deno.build.arch}`;
  }
  const field = (name: string) => text.match(new RegExp(`^${name}\\s*: (.*)$`, "m"))?.[1] ?? "?";
  const model = `${field("vendor_id")} family ${field("cpu family")} model ${field("model")}`;
  // the GEMM takes its AVX-512 kernels where the (virtual) processor exposes avx512f, and
  // one model can be offered with or without it
  return /\bavx512f\b/.test(field("flags")) ? `${model} avx512f` : model;
}

/** The whole fixture. */
export function readPinned(): Record<string, Record<string, PinnedRun>> {
  return JSON.parse(Deno.readTextFileSync(PINNED_FIXTURE));
}

if (import.meta.main && Deno.args.includes("--write")) {
  const all = readPinned();
  const out: Record<string, PinnedRun> = {};
  for (const c of PINNED_CASES) {
    out[c.name] = await runPinned(c);
    console.log(c.name, out[c.name].val_losses.at(-1));
  }
  all[machineKey()] = out;
  Deno.writeTextFileSync(PINNED_FIXTURE, JSON.stringify(all, null, 2) + "\n");
}
