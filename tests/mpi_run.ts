/** Shared by the MPI tests: where mpirun is and how to start 2 ranks on this machine. */
import assert from "node:assert/strict";

/** `mpirun` on the PATH, or null. */
export function mpirun(): string | null {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/mpirun`).isFile) return `${dir}/mpirun`;
    } catch {
      // not here
    }
  }
  return null;
}

/** mpirun, or null after saying why the test is skipped (a failure under QGALORE_REQUIRE_MPI=1). */
export function mpirunOrSkip(): string | null {
  const bin = mpirun();
  if (bin) return bin;
  if (Deno.env.get("QGALORE_REQUIRE_MPI") === "1") {
    throw new Error("mpirun not found but QGALORE_REQUIRE_MPI=1");
  }
  console.log("skipped: mpirun not found (install openmpi-bin libopenmpi-dev)");
  return null;
}

/** Flags for 2 ranks on this machine over the loopback interface. */
export const MPIRUN_FLAGS = [
  "-np",
  "2",
  "--oversubscribe",
  "--mca",
  "btl",
  "self,tcp",
  "--mca",
  "btl_tcp_if_include",
  "lo",
];

/** Lets mpirun start ranks as root (CI containers). */
export const MPIRUN_ENV = {
  OMPI_ALLOW_RUN_AS_ROOT: "1",
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM: "1",
};

const dec = new TextDecoder();

/** Runs `cmd` (mpirun, or one process) with {@link MPIRUN_ENV}, 300 s at most; its exit code and output. */
export async function runMpi(cmd: string, args: string[]): Promise<{ code: number; text: string }> {
  const out = await new Deno.Command(cmd, {
    args,
    env: MPIRUN_ENV,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(300_000),
  }).output();
  return { code: out.code, text: dec.decode(out.stdout) + dec.decode(out.stderr) };
}

/** A line of a run's metrics.jsonl, as the data-parallel tests compare them. */
export interface MetricLine {
  type: string;
  step: number;
  loss?: number;
  val_loss?: number;
  grad_norm?: number;
  loss_tokens?: number;
}

/** The lines of a metrics.jsonl file. */
export function metricLines(path: string): MetricLine[] {
  return Deno.readTextFileSync(path).trim().split("\n").map((l) => JSON.parse(l));
}

/** SHA-256 (hex) of each tensor's bytes in a safetensors file, by name, with its dtype. */
export async function tensorHashes(path: string): Promise<Map<string, string>> {
  const bytes = Deno.readFileSync(path);
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const header = JSON.parse(dec.decode(bytes.subarray(8, 8 + n))) as Record<
    string,
    { dtype: string; data_offsets: [number, number] }
  >;
  const out = new Map<string, string>();
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const data = bytes.subarray(8 + n + t.data_offsets[0], 8 + n + t.data_offsets[1]);
    const h = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
    out.set(name, `${t.dtype}:${Array.from(h, (b) => b.toString(16).padStart(2, "0")).join("")}`);
  }
  return out;
}

/**
 * The tensor hashes of `dir`'s rank-0.safetensors, after checking that rank 1's file holds
 * the same tensors with the same bytes (INT8 codes included: never broadcast, so equal only
 * if every rank applied the same update).
 */
export async function sameOnBothRanks(dir: string): Promise<Map<string, string>> {
  const h0 = await tensorHashes(`${dir}/rank-0.safetensors`);
  const h1 = await tensorHashes(`${dir}/rank-1.safetensors`);
  assert.deepEqual([...h1.keys()].sort(), [...h0.keys()].sort());
  for (const [k, v] of h0) assert.equal(h1.get(k), v, `tensor ${k} differs between ranks`);
  return h0;
}

/** Asserts that a checkpoint's hashes ({@link tensorHashes}) include INT8 codes. */
export function assertInt8(hashes: Map<string, string>): void {
  const int8 = [...hashes.values()].filter((v) => /^(I8|U8):/.test(v)).length;
  assert.ok(int8 > 0, `no INT8 codes in the checkpoint: ${[...hashes.values()].slice(0, 3)}`);
}
