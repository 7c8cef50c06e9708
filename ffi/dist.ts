/**
 * Data-parallel communication at the C ABI (`qg_dist_*`, `rust/src/dist/`): the process's
 * rank and world size, and the collectives over MPI. One world per process; before
 * {@link distInit} every collective is the identity of a one-rank job.
 * @module
 */
import { loadLibrary } from "./loader.ts";

/** The process's place in the job (`dist::Info`). */
export interface DistInfo {
  /** `none`: one process, no MPI library loaded; `mpi`: Open MPI. */
  backend: "none" | "mpi";
  /** This process's rank, 0 … size − 1. */
  rank: number;
  /** Number of ranks. */
  size: number;
  /** The launcher the environment names (`mpirun`, `pmi`, `slurm`), or null. */
  launcher: string | null;
  /** Path of the MPI library ("" without one). */
  library: string;
  /** First line of its version text. */
  version: string;
  /** MPI was finalized: no collective may run any more. */
  finalized: boolean;
  /** Bytes this rank has contributed to sum all-reduces so far. */
  allreduce_bytes: number;
  /** Sum all-reduces started so far. */
  allreduce_calls: number;
  /**
   * Seconds a collective waits for the other ranks (`QGALORE_DIST_TIMEOUT`, default 600);
   * past it the rank prints one line naming the operation and ends the job.
   */
  timeout_s: number;
  /** What the data-parallel training steps sent so far, by category (bytes). */
  comm: CommBytes;
}

/** Bytes the data-parallel training steps sent (`rust/src/dist/lowrank.rs`). */
export interface CommBytes {
  /** The last step's mode: `full`, `lowrank`, or `none` before any step. */
  mode: "full" | "lowrank" | "none";
  /** Data-parallel steps counted. */
  steps: number;
  /** Rank-r projections R of projected matrices (low-rank steps). */
  lowrank: number;
  /** Whole gradients of projected matrices whose projector refreshed (low-rank steps). */
  refresh: number;
  /** Whole gradients of projected matrices in full steps. */
  whole_projected: number;
  /** Whole gradients of unprojected tensors. */
  unprojected: number;
  /** The steps' scalars (global target count, loss). */
  scalars: number;
  /** Sum of the categories. */
  total: number;
  /** What a full-gradient all-reduce of the same steps sends. */
  full_allreduce: number;
}

/** Error of a collective; the message is one line. */
export class DistError extends Error {
  /** Status code of the C ABI (−1 invalid, −2 panic, −4 backend). */
  readonly code: number;
  /** Creates a distributed-run error. */
  constructor(message: string, code: number) {
    super(message);
    this.name = "DistError";
    this.code = code;
  }
}

const enc = new TextEncoder();
const dec = new TextDecoder();

function lastError(): string {
  const lib = loadLibrary();
  const cap = 4096;
  const buf = new Uint8Array(cap);
  const n = Number(lib.symbols.qg_dist_last_error(buf, BigInt(cap)));
  return dec.decode(buf.subarray(0, Math.min(n, cap)));
}

function check(rc: number): void {
  if (rc !== 0) throw new DistError(lastError(), rc);
}

/**
 * Joins the job: `auto` starts MPI when a launcher (`mpirun`, `srun`, PMI) named this
 * process a rank, `mpi` always, `off` never. Idempotent. Call it from the main thread.
 */
export function distInit(mode: "auto" | "mpi" | "off" = "auto"): DistInfo {
  const m = enc.encode(mode);
  check(loadLibrary().symbols.qg_dist_init(m, BigInt(m.length)));
  return distInfo();
}

/** The current world (a one-rank world before {@link distInit}). */
export function distInfo(): DistInfo {
  const lib = loadLibrary();
  let cap = 1024;
  let buf = new Uint8Array(cap);
  let n = Number(lib.symbols.qg_dist_info(buf, BigInt(cap)));
  if (n > cap) {
    cap = n;
    buf = new Uint8Array(cap);
    n = Number(lib.symbols.qg_dist_info(buf, BigInt(cap)));
  }
  return JSON.parse(dec.decode(buf.subarray(0, n))) as DistInfo;
}

/** Ends MPI (a no-op without it); every collective fails afterwards. Main thread only. */
export function distFinalize(): void {
  check(loadLibrary().symbols.qg_dist_finalize());
}

/** Ends every rank of the job with `code` (`MPI_Abort`); returns without MPI. */
export function distAbort(code: number): void {
  loadLibrary().symbols.qg_dist_abort(code);
}

/** Waits until every rank arrives. */
export async function barrier(): Promise<void> {
  check(await loadLibrary().symbols.qg_dist_barrier());
}

/** Sums `buf` over every rank in place (every rank passes the same length). */
export async function allreduceSum(buf: Float32Array | Float64Array): Promise<void> {
  const lib = loadLibrary();
  const n = BigInt(buf.length);
  check(
    await (buf instanceof Float32Array
      ? lib.symbols.qg_dist_allreduce_f32(buf, n)
      : lib.symbols.qg_dist_allreduce_f64(buf, n)),
  );
}

/** Copies `root`'s `buf` into every rank's `buf` (every rank passes the same length). */
export async function broadcast(buf: Uint8Array, root = 0): Promise<void> {
  check(await loadLibrary().symbols.qg_dist_bcast(buf, BigInt(buf.length), root));
}

/**
 * Refuses on every rank, with one line naming the ranks that differ, when `bytes` (a hash of
 * the resolved options) differ from rank 0's.
 */
export async function checkSame(what: string, bytes: Uint8Array): Promise<void> {
  const w = enc.encode(what);
  check(
    await loadLibrary().symbols.qg_dist_check_same(
      w,
      BigInt(w.length),
      bytes,
      BigInt(bytes.length),
    ),
  );
}

/**
 * Starts a sum of `buf` over every rank and returns a function that waits for it. `buf` must
 * stay referenced and untouched until the wait resolves.
 */
export function iallreduceSum(buf: Float32Array): () => Promise<void> {
  const lib = loadLibrary();
  const id = new BigUint64Array(1);
  check(lib.symbols.qg_dist_iallreduce_f32(buf, BigInt(buf.length), id));
  return async () => {
    check(await lib.symbols.qg_dist_wait(id[0]));
    void buf.length; // keeps the buffer alive until the sum has landed
  };
}
