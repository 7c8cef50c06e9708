// The fused per-layer step in a data-parallel run (rust/src/dist/overlap.rs): 2 ranks × batch 2
// with the fused step follow one process × batch 4 with the fused step (losses within 1e-5
// relative) and the 2-rank unfused step, every rank ends with the same bytes in every tensor
// (INT8 codes included), and the bytes all-reduced per update are what the step sends: the
// whole gradient once per backward (twice when clipping measures the norm in a first
// backward; the tables once more when the clip stash recomputes them), the loss and the
// target count. Skipped with a message when mpirun is absent (unless QGALORE_REQUIRE_MPI=1).
import assert from "node:assert/strict";
import {
  assertInt8,
  type MetricLine,
  metricLines,
  MPIRUN_FLAGS,
  mpirunOrSkip,
  runMpi,
  sameOnBothRanks,
  tensorHashes,
} from "./mpi_run.ts";

const CHILD = new URL("./dp_child.ts", import.meta.url).pathname;
const metrics = (dir: string): MetricLine[] => metricLines(`${dir}/run/metrics.jsonl`);

interface Summary {
  params: number;
  fused: boolean;
  data_parallel?: { ranks: number; global_batch: number; allreduce_bytes_per_step: number };
}

function summary(dir: string): Summary {
  return JSON.parse(Deno.readTextFileSync(`${dir}/run/summary.json`));
}

/** Trains `opts` on 2 ranks × batch 2 into `dir`; both ranks must finish. */
async function twoRanks(bin: string, opts: Record<string, unknown>, dir: string): Promise<void> {
  const r = await runMpi(bin, [
    ...MPIRUN_FLAGS,
    Deno.execPath(),
    "run",
    "-A",
    CHILD,
    JSON.stringify({ ...opts, batchSize: 2 }),
    dir,
  ]);
  assert.equal(r.code, 0, r.text);
  assert.match(r.text, /DP-CHILD-OK 0/);
  assert.match(r.text, /DP-CHILD-OK 1/);
}

async function oneProcess(opts: Record<string, unknown>, dir: string): Promise<void> {
  const r = await runMpi(Deno.execPath(), [
    "run",
    "-A",
    CHILD,
    JSON.stringify({ ...opts, batchSize: 4 }),
    dir,
  ]);
  assert.equal(r.code, 0, r.text);
}

/** Every metrics line of `a` equals `b`'s: losses within 1e-5, the norm within 1e-4. */
function sameTrajectory(a: MetricLine[], b: MetricLine[], what: string, steps: number): void {
  assert.equal(a.length, b.length, what);
  assert.equal(a.filter((l) => l.type === "step").length, steps, what);
  for (let i = 0; i < a.length; i++) {
    assert.equal(a[i].type, b[i].type);
    for (const k of ["loss", "val_loss", "grad_norm"] as const) {
      const x = a[i][k], y = b[i][k];
      if (y === undefined) continue;
      const tol = k === "grad_norm" ? 1e-4 : 1e-5;
      assert.ok(
        typeof x === "number" && Math.abs(x - y) <= tol * Math.abs(y),
        `${k} at line ${i}: ${x} (2 ranks, fused) vs ${y} (${what})`,
      );
    }
  }
}

const BASE = { steps: 4, seqLen: 32, threads: 1, evalEvery: 2, evalBatches: 2, seed: 7 };
const CASES: Record<string, { opts: Record<string, unknown>; backwards: number }> = {
  // two backwards: the first sums every gradient for the global norm, the second again to
  // update (the gradients are not kept between them)
  "adamw, clip": {
    opts: { ...BASE, optimizer: "adamw", clip: 0.5, fused: true },
    backwards: 2,
  },
  // one backward: exactly the unfused step's bytes
  "adamw, no clip": {
    opts: { ...BASE, optimizer: "adamw", clip: 0, fused: true },
    backwards: 1,
  },
  // the clip stash: one backward, then the embedding recomputed for its update
  "galore, clip": {
    opts: { ...BASE, optimizer: "galore", rank: 8, updateGap: 2, clip: 0.5, fused: true },
    backwards: 1,
  },
  // INT8 weights by stochastic rounding: compared over 3 updates (tests/dp_test.ts says why),
  // the INT8 codes of the two ranks exactly
  "qgalore, clip": {
    opts: {
      ...BASE,
      steps: 3,
      evalEvery: 3,
      optimizer: "qgalore",
      lr: 0.01,
      rank: 8,
      updateGap: 2,
      clip: 1,
      fused: true,
    },
    backwards: 1,
  },
};

for (const [name, { opts, backwards }] of Object.entries(CASES)) {
  Deno.test(`data parallel, fused step: 2 ranks × batch 2 = 1 process × batch 4 (${name})`, async () => {
    const bin = mpirunOrSkip();
    if (!bin) return;
    const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-fused-" });
    try {
      await twoRanks(bin, opts, `${dir}/dp`);
      await oneProcess(opts, `${dir}/one`);
      const steps = opts.steps as number;
      sameTrajectory(metrics(`${dir}/dp`), metrics(`${dir}/one`), "1 process, fused", steps);
      const s = summary(`${dir}/dp`);
      assert.equal(s.fused, true, "the 2-rank run did not use the fused step");
      assert.equal(summary(`${dir}/one`).fused, true);
      const bytes = s.data_parallel!.allreduce_bytes_per_step;
      if (name.startsWith("adamw")) {
        // every parameter is trained (f32), once per backward; the loss and the count (f64)
        assert.equal(bytes, backwards * 4 * s.params + 16);
      } else {
        // the stash path: one backward's gradients plus the recomputed embedding
        assert.ok(bytes > 4 * s.params + 16 && bytes < 2 * 4 * s.params, `${bytes} bytes`);
      }
      if (name === "adamw, no clip" || name === "galore, clip") {
        // the same run with the unfused step: the same trajectory
        await twoRanks(bin, { ...opts, fused: false }, `${dir}/unfused`);
        sameTrajectory(metrics(`${dir}/dp`), metrics(`${dir}/unfused`), "2 ranks, unfused", steps);
        const u = summary(`${dir}/unfused`);
        assert.equal(u.fused, false);
        if (name === "adamw, no clip") {
          assert.equal(bytes, u.data_parallel!.allreduce_bytes_per_step);
        }
        console.log(
          `${name}: all-reduced per update: fused ${bytes} B, unfused ${
            u.data_parallel!.allreduce_bytes_per_step
          } B (${s.params} parameters)`,
        );
      }
      const h0 = await sameOnBothRanks(`${dir}/dp`);
      if (name.startsWith("qgalore")) assertInt8(h0);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("data parallel, fused step: grad_accum > 1 is refused as in one process", async () => {
  const bin = mpirunOrSkip();
  if (!bin) return;
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-fused-ga-" });
  try {
    // the fused step updates inside the backward: accumulated gradients cannot persist
    // (plan::fused; the front end refuses the combination before anything starts)
    const opts = { ...BASE, steps: 2, optimizer: "adamw", fused: true, gradAccum: 2, batchSize: 2 };
    const r = await runMpi(bin, [
      ...MPIRUN_FLAGS,
      Deno.execPath(),
      "run",
      "-A",
      CHILD,
      JSON.stringify(opts),
      `${dir}/dp`,
    ]);
    assert.notEqual(r.code, 0, r.text);
    assert.match(
      r.text,
      /--fused on: needs --grad-accum 1 \(here 2\): accumulated gradients must persist/,
    );
    assert.doesNotMatch(r.text, /DP-CHILD-OK/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("data parallel, fused step: a stopped 2-rank run resumes update for update", async () => {
  const bin = mpirunOrSkip();
  if (!bin) return;
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-fused-resume-" });
  const mpi = async (o: Record<string, unknown>, d: string) => {
    const r = await runMpi(bin, [
      ...MPIRUN_FLAGS,
      Deno.execPath(),
      "run",
      "-A",
      CHILD,
      JSON.stringify(o),
      d,
    ]);
    assert.equal(r.code, 0, r.text);
    assert.match(r.text, /DP-CHILD-OK 1/);
  };
  try {
    // the clip stash path, a projector refresh every 2 updates: the cut falls between them
    const opts: Record<string, unknown> = { ...CASES["galore, clip"].opts, batchSize: 2 };
    await mpi(opts, `${dir}/full`);
    await mpi({ ...opts, stopAfter: 3 }, `${dir}/cut`);
    assert.equal(metrics(`${dir}/cut`).filter((l) => l.type === "step").length, 3);
    await mpi({ resume: `${dir}/cut/run`, steps: opts.steps }, `${dir}/cut`);
    assert.equal(summary(`${dir}/cut`).fused, true);
    // bit for bit: the same arithmetic, the same global batches
    assert.deepEqual(
      metrics(`${dir}/cut`).map((l) => [l.type, l.step, l.loss, l.val_loss, l.grad_norm]),
      metrics(`${dir}/full`).map((l) => [l.type, l.step, l.loss, l.val_loss, l.grad_norm]),
    );
    const h0 = await sameOnBothRanks(`${dir}/cut`);
    const f0 = await tensorHashes(`${dir}/full/rank-0.safetensors`);
    assert.deepEqual([...h0.entries()], [...f0.entries()]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
