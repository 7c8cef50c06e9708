/**
 * Divergence detection in the training loop (a loss far above its running minimum, a gradient
 * norm stuck at 0) and the run-folder rules (an earlier run is not replaced without
 * `overwrite`, run files are never written through a symlink).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import type { TrainEngine } from "../lib/run_types.ts";
import { DivergedError, type Summary } from "../lib/summary.ts";
import type { EngineConfig, StepStats } from "../lib/trainer.ts";
import { train } from "../lib/trainer.ts";
import { UsageError } from "../lib/errors.ts";
import type { MemoryBytes } from "../ffi/engine.ts";
import { standInMemory } from "./stand_in.ts";

/** A stand-in whose update `i` (1-based) returns `losses(i)` and `grads(i)`. */
class ScriptedEngine implements TrainEngine {
  readonly params = 1000;
  readonly device = "cpu";
  #n = 0;
  constructor(
    readonly losses: (i: number) => number,
    readonly grads: (i: number) => number = () => 1,
  ) {}
  trainStep(): Promise<StepStats> {
    const i = ++this.#n;
    return Promise.resolve({
      loss: this.losses(i),
      gradNorm: this.grads(i),
      clipped: false,
      count: 1,
    });
  }
  evalLoss(): Promise<number> {
    return Promise.resolve(this.losses(Math.max(1, this.#n)));
  }
  memory(): MemoryBytes {
    return standInMemory();
  }
  [Symbol.dispose](): void {}
}

const base = {
  model: "llama-9m",
  batchSize: 2,
  seqLen: 16,
  evalBatches: 2,
  quiet: true,
  handleSigint: false,
  out: null,
};

async function diverged(p: Promise<Summary>): Promise<DivergedError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof DivergedError) return e;
    throw e;
  }
  assert.fail("the run was not flagged as diverged");
}

Deno.test("diverge: --lr 10 (adamw, llama-9m) stops with diverged: true and names --lr", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const e = await diverged(
      train({ ...base, optimizer: "adamw", lr: 10, steps: 60, evalEvery: 0, out: dir }),
    );
    assert.match(e.message, /^training diverged at step \d+: loss .* far above its best/);
    assert.match(e.message, /likely cause: --lr 10 is 2000x adamw's default/);
    assert.ok(e.summary.diverged);
    assert.ok(e.summary.steps < 60, `stopped at ${e.summary.steps}`);
    // the loss before the alarm had risen to thousands from about ln 256
    const s: Summary = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
    assert.equal(s.diverged, true);
    assert.equal(s.error, e.message);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("diverge: --lr 1e3 kills the model (gradient norm 0) and is flagged", async () => {
  const e = await diverged(train({ ...base, optimizer: "adamw", lr: 1e3, steps: 40 }));
  assert.match(e.message, /gradient norm exactly 0 for 3 updates/);
  assert.match(e.message, /--lr 1000/);
  assert.ok(e.summary.diverged);
  assert.ok(e.summary.steps < 40);
});

Deno.test("diverge: default-lr runs of each optimizer are not flagged", async () => {
  for (const optimizer of ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"]) {
    const s = await train({ ...base, optimizer, steps: 30, evalEvery: 10 });
    assert.equal(s.diverged, false, optimizer);
    assert.equal(s.steps, 30, optimizer);
  }
});

Deno.test("diverge: the rule needs a lasting, large rise (stand-in engine)", async () => {
  const run = (losses: (i: number) => number, extra: Record<string, unknown> = {}) =>
    train({ ...base, steps: 80, evalEvery: 0, ...extra }, {
      createEngine: (_c: EngineConfig) => new ScriptedEngine(losses),
    });
  // a noisy falling loss, and one spike of 100x lasting 5 updates: no alarm
  const noisy = (i: number) => 3 / Math.sqrt(i) + 0.3 * Math.sin(i * 1.7);
  assert.equal((await run(noisy)).diverged, false);
  assert.equal((await run((i) => (i >= 40 && i < 45 ? 300 : noisy(i)))).diverged, false);
  // fine-tuning near 0: tripling from 0.05 to 0.15 is < 1 nat, no alarm
  assert.equal((await run((i) => (i < 30 ? 0.05 : 0.15))).diverged, false);
  // a lasting rise of 2 nats from 2 to 4 is flagged after the patience
  const e = await diverged(run((i) => (i < 30 ? 2 : 4)));
  assert.match(e.message, /training diverged at step 4\d: loss 4\.000/);
  // the default lr: blamed on --galore-scale when it is large, else on the data or model
  const g = await diverged(run((i) => (i < 30 ? 2 : 4), { optimizer: "galore", galoreScale: 8 }));
  assert.match(g.message, /likely cause: --galore-scale 8/);
  const d = await diverged(run((i) => (i < 30 ? 2 : 4), { optimizer: "galore" }));
  assert.match(d.message, /likely cause: the data or the model/);
  const w = await diverged(run((i) => (i < 30 ? 2 : 4), { optimizer: "adamw", weightDecay: 100 }));
  assert.match(w.message, /likely cause: --weight-decay 100/);
});

Deno.test("diverge: validation far above its best for 3 evaluations is flagged", async () => {
  // training losses are not scripted to rise (a constant 2), evaluation rises: only the eval
  // rule can fire
  let n = 0;
  const e = await diverged(
    train({ ...base, steps: 80, evalEvery: 5 }, {
      createEngine: () =>
        new (class extends ScriptedEngine {
          override evalLoss(): Promise<number> {
            return Promise.resolve(++n > 3 ? 6 : 2);
          }
        })(() => 2),
    }),
  );
  assert.match(e.message, /validation loss 6\.000 has stayed far above its best 2\.000 for 3/);
});

Deno.test("run folder: an earlier run is refused unless overwrite; symlinks never followed", async () => {
  const dir = Deno.makeTempDirSync();
  const user = Deno.makeTempFileSync();
  try {
    Deno.writeTextFileSync(user, "user data\n");
    const opts = { ...base, steps: 2, evalEvery: 0, out: dir };
    Deno.symlinkSync(user, join(dir, "metrics.jsonl"));
    for (const overwrite of [false, true]) {
      await assert.rejects(
        train({ ...opts, overwrite }),
        (e: Error) => e instanceof UsageError && /metrics\.jsonl is a symlink/.test(e.message),
      );
    }
    assert.equal(Deno.readTextFileSync(user), "user data\n");
    Deno.removeSync(join(dir, "metrics.jsonl"));

    // a symlink named summary.json is refused as well
    Deno.symlinkSync(user, join(dir, "summary.json"));
    await assert.rejects(train(opts), /summary\.json is a symlink/);
    Deno.removeSync(join(dir, "summary.json"));

    const first = await train(opts);
    assert.equal(first.steps, 2);
    await assert.rejects(
      train(opts),
      (e: Error) =>
        e instanceof UsageError &&
        e.message === `--out ${dir}: holds an earlier run; continue it with --resume ${dir}, ` +
            "or pass --overwrite on to replace it",
    );
    const again = await train({ ...opts, overwrite: true, steps: 3 });
    assert.equal(again.steps, 3);
    const lines = Deno.readTextFileSync(join(dir, "metrics.jsonl")).trim().split("\n");
    // only the second run's records: the initial eval, 3 steps and the final eval
    assert.equal(lines.length, 5);
    assert.equal(JSON.parse(Deno.readTextFileSync(join(dir, "summary.json"))).steps, 3);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name).sort(), [
      "checkpoints",
      "metrics.jsonl",
      "report.html",
      "summary.json",
    ]);
    // the first run's checkpoint (step 2) went with it: a resume finds only the second's
    assert.deepEqual([...Deno.readDirSync(join(dir, "checkpoints"))].map((e) => e.name), [
      "step-00000003.safetensors",
    ]);
    assert.equal(Deno.readTextFileSync(user), "user data\n");
  } finally {
    Deno.removeSync(dir, { recursive: true });
    Deno.removeSync(user);
  }
});
