import assert from "node:assert/strict";
import { world } from "../lib/dist.ts";
import { allreduceSum, broadcast } from "../ffi/dist.ts";

/** `mpirun` on the PATH, or null. */
function mpirun(): string | null {
  for (const dir of (Deno.env.get("PATH") ?? "").split(":")) {
    try {
      if (Deno.statSync(`${dir}/mpirun`).isFile) return `${dir}/mpirun`;
    } catch {
      // not here
    }
  }
  return null;
}

/** Flags for 2 ranks on this machine over the loopback interface (as root too). */
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
export const MPIRUN_ENV = {
  OMPI_ALLOW_RUN_AS_ROOT: "1",
  OMPI_ALLOW_RUN_AS_ROOT_CONFIRM: "1",
};

Deno.test("dist: a one-process run is a world of one with identity collectives", async () => {
  const info = world();
  assert.equal(info.backend, "none");
  assert.equal(info.rank, 0);
  assert.equal(info.size, 1);
  const a = Float32Array.of(1.5, -2.25);
  await allreduceSum(a);
  assert.deepEqual([...a], [1.5, -2.25]);
  const b = Uint8Array.of(7, 8);
  await broadcast(b);
  assert.deepEqual([...b], [7, 8]);
});

Deno.test("dist: mpirun -np 2 sums, broadcasts and refuses differing options exactly", async () => {
  const bin = mpirun();
  if (!bin) {
    if (Deno.env.get("QGALORE_REQUIRE_MPI") === "1") {
      throw new Error("mpirun not found but QGALORE_REQUIRE_MPI=1");
    }
    console.log("skipped: mpirun not found (install openmpi-bin libopenmpi-dev)");
    return;
  }
  const child = new URL("./mpi_child.ts", import.meta.url).pathname;
  const out = await new Deno.Command(bin, {
    args: [...MPIRUN_FLAGS, Deno.execPath(), "run", "-A", child],
    env: MPIRUN_ENV,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(180_000),
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, text);
  assert.match(text, /MPI-TS-OK 0/);
  assert.match(text, /MPI-TS-OK 1/);
});
