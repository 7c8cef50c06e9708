// Exact data parallelism over MPI: 2 ranks × batch B follow the trajectory of one process
// with batch 2B (losses within 1e-5 relative), every rank ends with the same bytes in every
// tensor (INT8 codes included, never broadcast), and ranks started with different options
// are refused with one line. Skipped with a message when mpirun is absent (unless
// QGALORE_REQUIRE_MPI=1).
import assert from "node:assert/strict";
import {
  assertInt8,
  type MetricLine,
  metricLines,
  MPIRUN_FLAGS,
  mpirunOrSkip,
  runMpi,
  sameOnBothRanks,
} from "./mpi_run.ts";

const CHILD = new URL("./dp_child.ts", import.meta.url).pathname;
const PRETRAIN = new URL("../examples/pretrain.ts", import.meta.url).pathname;
const metrics = (dir: string): MetricLine[] => metricLines(`${dir}/run/metrics.jsonl`);

const BASE = { steps: 6, seqLen: 32, threads: 1, evalEvery: 3, evalBatches: 2, seed: 7 };
const CASES: Record<string, Record<string, unknown>> = {
  // gradient accumulation and clipping (the norm is the global batch's)
  adamw: { ...BASE, optimizer: "adamw", gradAccum: 2, clip: 0.5 },
  // INT8 weights by stochastic rounding, INT4 projectors, a refresh every 2 updates; both
  // runs use the global step (tests/dp_fused_test.ts runs the fused one). Two ranks sum the
  // gradient in another order than one process (equal in real arithmetic, not in the last
  // bit), and stochastic rounding turns the few values that land at a rounding threshold into
  // a flipped INT8 code: the runs drift apart by about 3× per update (with the clip factor
  // applied to the projection, 3.8e-5 by the 4th update at lr 0.01), so this case compares 3
  // updates; the INT8 codes of the two ranks are compared exactly below.
  qgalore: {
    ...BASE,
    steps: 3,
    evalEvery: 3,
    optimizer: "qgalore",
    lr: 0.01,
    rank: 8,
    updateGap: 2,
    clip: 1,
    fused: false,
  },
};

for (const [name, opts] of Object.entries(CASES)) {
  Deno.test(`data parallel: 2 ranks × batch 2 = 1 process × batch 4 (${name})`, async () => {
    const bin = mpirunOrSkip();
    if (!bin) return;
    const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-" });
    try {
      const dp = await runMpi(bin, [
        ...MPIRUN_FLAGS,
        Deno.execPath(),
        "run",
        "-A",
        CHILD,
        JSON.stringify({ ...opts, batchSize: 2 }),
        `${dir}/dp`,
      ]);
      assert.equal(dp.code, 0, dp.text);
      assert.match(dp.text, /DP-CHILD-OK 0/);
      assert.match(dp.text, /DP-CHILD-OK 1/);
      const one = await runMpi(Deno.execPath(), [
        "run",
        "-A",
        CHILD,
        JSON.stringify({ ...opts, batchSize: 4 }),
        `${dir}/one`,
      ]);
      assert.equal(one.code, 0, one.text);
      const a = metrics(`${dir}/dp`), b = metrics(`${dir}/one`);
      assert.equal(a.length, b.length);
      assert.equal(a.filter((l) => l.type === "step").length, opts.steps as number);
      for (let i = 0; i < a.length; i++) {
        assert.equal(a[i].type, b[i].type);
        for (const k of ["loss", "val_loss", "grad_norm"] as const) {
          const x = a[i][k], y = b[i][k];
          if (y === undefined) continue;
          // losses within 1e-5; the gradient norm, more sensitive, within 1e-4
          const tol = k === "grad_norm" ? 1e-4 : 1e-5;
          assert.ok(
            typeof x === "number" && Math.abs(x - y) <= tol * Math.abs(y),
            `${k} at line ${i}: ${x} (2 ranks) vs ${y} (1 process)`,
          );
        }
      }
      // the summary reports the global batch and the bytes all-reduced per update: the whole
      // gradient (every parameter is trained, f32) plus the loss and the target count (f64)
      const sum = JSON.parse(Deno.readTextFileSync(`${dir}/dp/run/summary.json`));
      if (name === "adamw") {
        const { comm, ...rest } = sum.data_parallel;
        assert.deepEqual(rest, {
          ranks: 2,
          global_batch: 4,
          allreduce_bytes_per_step: 4 * sum.params + 16,
        });
        // adamw projects nothing: every gradient goes whole (tests/dp_lowrank_test.ts)
        assert.equal(comm.used, "full");
        assert.equal(comm.bytes_per_step.unprojected, 4 * sum.params);
        assert.equal(comm.bytes_per_step.total, comm.full_allreduce_bytes_per_step);
      } else {
        assert.equal(sum.data_parallel.global_batch, 4);
      }
      const single = JSON.parse(Deno.readTextFileSync(`${dir}/one/run/summary.json`));
      assert.equal(single.data_parallel, undefined);
      // only rank 0 wrote the run folder; every rank holds the same state, bit for bit
      const h0 = await sameOnBothRanks(`${dir}/dp`);
      if (name === "qgalore") assertInt8(h0);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("data parallel: a stopped 2-rank run resumes update for update", async () => {
  const bin = mpirunOrSkip();
  if (!bin) return;
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-resume-" });
  const mpi = (o: Record<string, unknown>, d: string) =>
    runMpi(bin, [...MPIRUN_FLAGS, Deno.execPath(), "run", "-A", CHILD, JSON.stringify(o), d]);
  try {
    const opts: Record<string, unknown> = { ...CASES.adamw, batchSize: 2 };
    const full = await mpi(opts, `${dir}/full`);
    assert.equal(full.code, 0, full.text);
    const cut = await mpi({ ...opts, stopAfter: 3 }, `${dir}/cut`);
    assert.equal(cut.code, 0, cut.text);
    assert.equal(metrics(`${dir}/cut`).filter((l) => l.type === "step").length, 3);
    // one process cannot resume a 2-rank run (its global batch would halve): refused in one
    // line, and the run folder is left as it was (the 2-rank resume below still matches)
    const alone = await runMpi(Deno.execPath(), [
      "run",
      "-A",
      CHILD,
      JSON.stringify({ resume: `${dir}/cut/run`, steps: opts.steps }),
      `${dir}/alone`,
    ]);
    assert.notEqual(alone.code, 0, alone.text);
    assert.match(
      alone.text,
      /the run was trained by 2 ranks, this job has 1: resume with the number of ranks the run was started with/,
    );
    const resumed = await mpi({ resume: `${dir}/cut/run`, steps: opts.steps }, `${dir}/cut`);
    assert.equal(resumed.code, 0, resumed.text);
    assert.match(resumed.text, /DP-CHILD-OK 1/);
    // bit for bit: the same arithmetic, the same global batches
    assert.deepEqual(
      metrics(`${dir}/cut`).map((l) => [l.type, l.step, l.loss, l.val_loss, l.grad_norm]),
      metrics(`${dir}/full`).map((l) => [l.type, l.step, l.loss, l.val_loss, l.grad_norm]),
    );
    await sameOnBothRanks(`${dir}/cut`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("data parallel: ranks started with different options are refused with one line", async () => {
  const bin = mpirunOrSkip();
  if (!bin) return;
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-refuse-" });
  const common = ["run", "-A", PRETRAIN, "--steps", "1", "--out", `${dir}/run`];
  const r = await runMpi(bin, [
    ...MPIRUN_FLAGS.filter((f, i, all) => f !== "-np" && all[i - 1] !== "-np"),
    "-np",
    "1",
    Deno.execPath(),
    ...common,
    "--lr",
    "0.001",
    ":",
    "-np",
    "1",
    Deno.execPath(),
    ...common,
    "--lr",
    "0.002",
  ]);
  assert.notEqual(r.code, 0, r.text);
  const want =
    "error: the resolved options differs across ranks: rank 1 differs from rank 0; every rank must be started with the same options";
  const lines = r.text.split("\n").filter((l) => l.startsWith("error:"));
  assert.deepEqual(lines, [want, want], r.text);
  // refused before anything was written
  assert.deepEqual([...Deno.readDirSync(dir)], []);
  await Deno.remove(dir, { recursive: true });
});
