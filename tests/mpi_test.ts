import assert from "node:assert/strict";
import { world } from "../lib/dist.ts";
import { allreduceSum, broadcast } from "../ffi/dist.ts";
import { MPIRUN_ENV, MPIRUN_FLAGS, mpirunOrSkip } from "./mpi_run.ts";

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
  const bin = mpirunOrSkip();
  if (!bin) return;
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
