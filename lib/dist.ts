/**
 * Data-parallel runs: joins the job when `mpirun`/`srun` launched this process, checks that
 * every rank was started with the same options, and finalizes MPI when the process ends.
 * A one-process run loads no MPI library and sees a world of one.
 * @module
 */
import {
  allreduceSum,
  barrier,
  broadcast,
  checkSame,
  type CommBytes,
  distFinalize,
  type DistInfo,
  distInfo,
  distInit,
} from "../ffi/dist.ts";

export { allreduceSum, barrier, broadcast, type CommBytes, type DistInfo };

let finalizeRegistered = false;

/**
 * Joins the job (`QGALORE_DIST`: `auto` (default), `mpi` or `off`) and makes sure MPI is
 * finalized when the process ends (Open MPI reports a rank that exits without it as failed).
 */
export function startDist(mode?: string): DistInfo {
  const m = mode ?? Deno.env.get("QGALORE_DIST") ?? "auto";
  if (m !== "auto" && m !== "mpi" && m !== "off") {
    throw new Error(`QGALORE_DIST=${m}: allowed auto, mpi, off`);
  }
  const info = distInit(m);
  if (info.backend === "mpi" && !finalizeRegistered) {
    finalizeRegistered = true;
    globalThis.addEventListener("unload", () => {
      try {
        distFinalize();
      } catch {
        // the process ends either way
      }
    });
  }
  return info;
}

/** The current world without joining one. */
export function world(): DistInfo {
  return distInfo();
}

/** Canonical JSON: object keys sorted, so equal options hash equally on every rank. */
function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  if (v !== null && typeof v === "object") {
    const o = v as Record<string, unknown>;
    return `{${
      Object.keys(o).sort().filter((k) => o[k] !== undefined).map((k) =>
        `${JSON.stringify(k)}:${canonical(o[k])}`
      ).join(",")
    }}`;
  }
  return JSON.stringify(v) ?? "null";
}

/** SHA-256 of the canonical JSON of `options`. */
export async function optionsHash(options: unknown): Promise<Uint8Array> {
  const bytes = new TextEncoder().encode(canonical(options));
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/**
 * Refuses, on every rank with the same one line, a job whose ranks resolved different
 * `options` (rank 0's hash is broadcast and compared). A no-op in a one-rank world.
 */
export async function checkSameOptions(
  options: unknown,
  what = "the resolved options",
): Promise<void> {
  if (distInfo().size <= 1) return;
  await checkSame(what, await optionsHash(options));
}

/** A run's place in a data-parallel job (see {@link dataParallel}). */
export interface DataParallel<O> {
  /** The options this rank runs with. */
  opts: O;
  /** This rank and the number of ranks (0 and 1 in a one-process run). */
  rank: number;
  size: number;
  /** A line for the run's log, or null in a one-process run. */
  notice: string | null;
}

/**
 * Joins the job a training run belongs to. In a one-process run nothing changes. With N > 1
 * ranks: every rank must have resolved the same options (their hash is compared; `out` is
 * left out, as its default names the start time), and ranks other than 0 run quiet (rank 0
 * alone prints, writes metrics and checkpoints; every rank resumes from them). The per-layer
 * fused step stays fused: each tensor's gradient is summed over the ranks as soon as the
 * backward completes it, overlapping the rest of the backward (rust/src/dist/overlap.rs),
 * whole. `dpComm: "lowrank"` asks for the rank-r projections to be summed instead, which the
 * global step does (rust/src/dist/lowrank.rs): the fused step is then turned off, with a notice.
 */
export async function dataParallel<
  O extends {
    quiet?: boolean;
    out?: string | null;
    export?: string | null;
    batchSize: number;
    fused?: boolean | null;
    dpComm?: string;
  },
>(opts: O): Promise<DataParallel<O>> {
  const info = startDist();
  if (info.size <= 1) return { opts, rank: 0, size: 1, notice: null };
  const { out: _out, ...compared } = opts;
  await checkSameOptions(compared);
  // rank 0 alone writes the `--export` too (every rank holds the same weights)
  if (info.rank !== 0 && opts.export !== undefined) opts = { ...opts, export: null };
  const lowrank = opts.dpComm === "lowrank" && opts.fused !== false;
  const notice = `data-parallel: ${info.size} ranks × batch ${opts.batchSize} = global batch ` +
    `${info.size * opts.batchSize} (${info.backend}${info.version ? `, ${info.version}` : ""})` +
    (lowrank ? "; fused step off (--dp-comm lowrank sums R in the global step)" : "");
  return {
    opts: {
      ...opts,
      ...(lowrank ? { fused: false } : {}),
      quiet: info.rank !== 0 || opts.quiet === true,
    },
    rank: info.rank,
    size: info.size,
    notice,
  };
}
