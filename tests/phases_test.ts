import assert from "node:assert/strict";
import { type EngineConfig, EngineError, type StepStats } from "../ffi/engine.ts";
import type { TrainOptions } from "../lib/options.ts";
import { paramCount } from "../lib/estimate.ts";
import {
  DivergedError,
  type EvalRecord,
  startRun,
  type StepRecord,
  type Summary,
  train,
  type TrainEngine,
} from "../mod.ts";
import type { MemoryBytes } from "../ffi/engine.ts";
import { standInMemory } from "./stand_in.ts";

// The phases a notebook calls by hand (startRun, evaluate, step, finish) are what train()
// composes: driven the same way on the real engine they give bit-identical trajectories.

interface Trace {
  steps: StepRecord[];
  evals: EvalRecord[];
  summary: Summary;
}

const strip = (r: StepRecord | EvalRecord) => ({ ...r, elapsed_s: 0, tokens_per_s: 0 });

/** The summary fields that do not depend on timing or memory measurements. */
function stable(s: Summary): Record<string, unknown> {
  const {
    wall_s: _w,
    tokens_per_s: _t,
    refresh_seconds: _r,
    timing: _ti,
    memory,
    started_at: _s,
    ...rest
  } = s;
  const { peak_rss: _p, ...bytes } = memory;
  return { ...rest, memory: bytes };
}

async function viaTrain(opts: Partial<TrainOptions>): Promise<Trace> {
  const steps: StepRecord[] = [];
  const evals: EvalRecord[] = [];
  const summary = await train(opts, {
    onStep: (r) => void steps.push(r),
    onEval: (r) => void evals.push(r),
  });
  return { steps, evals, summary };
}

async function viaPhases(opts: Partial<TrainOptions>): Promise<Trace> {
  const steps: StepRecord[] = [];
  const evals: EvalRecord[] = [];
  using run = await startRun(opts, {
    onStep: (r) => void steps.push(r),
    onEval: (r) => void evals.push(r),
  });
  await run.evaluate();
  while (!run.done) {
    const record = await run.step();
    if (record !== null && run.evalDue) await run.evaluate();
  }
  const summary = await run.finish();
  return { steps, evals, summary };
}

const short: Partial<TrainOptions> = {
  batchSize: 4,
  seqLen: 64,
  steps: 6,
  evalEvery: 3,
  evalBatches: 2,
  seed: 7,
  threads: 2,
  out: null,
  quiet: true,
  handleSigint: false,
};

for (
  const [name, opts] of [
    ["adamw", { ...short, optimizer: "adamw" }],
    ["qgalore fused, clipped", {
      ...short,
      optimizer: "qgalore",
      rank: 16,
      updateGap: 3,
      fused: true,
      clip: 0.05,
    }],
  ] as [string, Partial<TrainOptions>][]
) {
  Deno.test(`phases by hand equal train() bit for bit: ${name}`, async () => {
    const a = await viaTrain(opts);
    const b = await viaPhases(opts);
    assert.equal(a.steps.length, opts.steps);
    assert.deepEqual(b.steps.map(strip), a.steps.map(strip));
    assert.deepEqual(b.evals.map(strip), a.evals.map(strip));
    assert.deepEqual(stable(b.summary), stable(a.summary));
  });
}

/** An engine stand-in whose loss turns NaN at update `failAt`. */
class FailingEngine implements TrainEngine {
  readonly params: number;
  readonly device = "cpu";
  disposed = false;
  #calls = 0;
  constructor(cfg: EngineConfig, readonly failAt: number) {
    this.params = paramCount(cfg.model);
  }
  trainStep(): Promise<StepStats> {
    if (++this.#calls === this.failAt) {
      return Promise.reject(new EngineError(-3, "loss is NaN at micro-batch 0"));
    }
    return Promise.resolve({ loss: 5 / this.#calls, gradNorm: 1, clipped: false, count: 1 });
  }
  evalLoss(): Promise<number> {
    return Promise.resolve(5);
  }
  memory(): MemoryBytes {
    return standInMemory();
  }
  [Symbol.dispose](): void {
    this.disposed = true;
  }
}

Deno.test("phases: a diverged step returns null, finish throws the summary, the engine is freed", async () => {
  let engine: FailingEngine | undefined;
  const run = await startRun(
    { model: "llama-9m", batchSize: 2, seqLen: 16, steps: 5, quiet: true, out: null },
    { createEngine: (cfg) => (engine = new FailingEngine(cfg, 3)) },
  );
  assert.equal(await run.evaluate(), 5);
  assert.notEqual(await run.step(), null);
  assert.notEqual(await run.step(), null);
  assert.equal(await run.step(), null);
  assert.ok(run.done);
  assert.match(run.failure ?? "", /^training diverged at step 3: /);
  const err = await run.finish().catch((e) => e);
  assert.ok(err instanceof DivergedError);
  assert.equal(err.summary.steps, 2);
  assert.equal(err.summary.initial_val_loss, 5);
  assert.ok(engine?.disposed);
  await assert.rejects(() => run.step(), /this run is finished/);
});

Deno.test("phases: disposing an unfinished run frees the engine", async () => {
  let engine: FailingEngine | undefined;
  {
    using run = await startRun(
      { model: "llama-9m", batchSize: 2, seqLen: 16, steps: 5, quiet: true, out: null },
      { createEngine: (cfg) => (engine = new FailingEngine(cfg, 0)) },
    );
    await run.step();
    assert.equal(run.steps, 1);
    assert.ok(!engine?.disposed);
  }
  assert.ok(engine?.disposed);
});
