// One rank of tests/mpi_test.ts: run under `mpirun -np 2`, checks the collectives through
// the FFI exactly and prints `MPI-TS-OK <rank>`.
import { allreduceSum, barrier, broadcast, checkSameOptions, startDist } from "../lib/dist.ts";
import { iallreduceSum } from "../ffi/dist.ts";

function fail(msg: string): never {
  console.log(`MPI-TS-FAIL ${msg}`);
  Deno.exit(1);
}

const info = startDist();
if (info.backend !== "mpi" || info.size !== 2) fail(`world ${JSON.stringify(info)}`);
const r = info.rank;
const n = 1031;
const v32 = (rank: number, i: number) => Math.fround(((i * 31 + rank * 17) % 101) * 0.0137 - 0.5);
const a = Float32Array.from({ length: n }, (_, i) => v32(r, i));
await allreduceSum(a);
for (let i = 0; i < n; i++) {
  if (a[i] !== Math.fround(v32(0, i) + v32(1, i))) fail(`f32 sum at ${i}: ${a[i]}`);
}
const v64 = (rank: number, i: number) => ((i * 7 + rank * 13) % 97) / 3 - 10;
const b = Float64Array.from({ length: n }, (_, i) => v64(r, i));
await allreduceSum(b);
for (let i = 0; i < n; i++) if (b[i] !== v64(0, i) + v64(1, i)) fail(`f64 sum at ${i}: ${b[i]}`);
const msg = new TextEncoder().encode("from rank 0");
const buf = r === 0 ? msg.slice() : new Uint8Array(msg.length);
await broadcast(buf, 0);
if (new TextDecoder().decode(buf) !== "from rank 0") fail(`broadcast: ${buf}`);
const c = Float32Array.from({ length: n }, (_, i) => v32(r, n - i));
const wait = iallreduceSum(c);
await wait();
for (let i = 0; i < n; i++) {
  if (c[i] !== Math.fround(v32(0, n - i) + v32(1, n - i))) fail(`iallreduce at ${i}: ${c[i]}`);
}
// the same options (keys in another order) pass; different ones are refused on both ranks
await checkSameOptions(r === 0 ? { lr: 1e-3, steps: 5 } : { steps: 5, lr: 1e-3 });
try {
  await checkSameOptions({ lr: r === 0 ? 1e-3 : 2e-3 });
  fail("differing options were accepted");
} catch (e) {
  const want =
    "the resolved options differs across ranks: rank 1 differs from rank 0; every rank must be started with the same options";
  if ((e as Error).message !== want) fail(`refusal: ${(e as Error).message}`);
}
await barrier();
console.log(`MPI-TS-OK ${r}`);
