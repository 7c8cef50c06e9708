import assert from "node:assert/strict";
import { join } from "node:path";
import { type EngineConfig, EngineError, type StepStats } from "../ffi/engine.ts";
import { UsageError } from "../lib/errors.ts";
import { formatCount, formatDuration, JsonlWriter, Progress } from "../lib/log.ts";
import { peakRssBytes } from "../lib/memory.ts";
import { paramCount } from "../lib/estimate.ts";
import { optimizerDefaults } from "../lib/options.ts";
import { lrAt } from "../lib/schedule.ts";
import type { TrainEngine } from "../lib/run_types.ts";
import { DivergedError, type Summary } from "../lib/summary.ts";
import { train } from "../lib/trainer.ts";
import type { MemoryBytes } from "../ffi/engine.ts";
import { standInMemory } from "./stand_in.ts";

/** An engine stand-in: loss decays with the steps taken; optionally fails at one step. */
class FakeEngine implements TrainEngine {
  readonly params: number;
  readonly device = "cpu";
  calls: { tokens: number; micro: number; lr: number }[] = [];
  evals: number[] = [];
  disposed = false;
  constructor(readonly cfg: EngineConfig, readonly failAt = 0) {
    this.params = paramCount(cfg.model);
  }
  trainStep(tokens: Int32Array, micro: number, lr: number): Promise<StepStats> {
    this.calls.push({ tokens: tokens.length, micro, lr });
    if (this.calls.length === this.failAt) {
      return Promise.reject(new EngineError(-3, "loss is NaN at micro-batch 0"));
    }
    return Promise.resolve({ loss: 5 / this.calls.length, gradNorm: 1, clipped: false, count: 1 });
  }
  evalLoss(tokens: Int32Array, batches: number): Promise<number> {
    const c = this.cfg;
    assert.equal(tokens.length, batches * c.batch_size * (c.seq_len + 1));
    this.evals.push(tokens.reduce((a, b) => a + b, 0));
    return Promise.resolve(5.5 / (1 + this.calls.length));
  }
  memory(): MemoryBytes {
    return standInMemory();
  }
  [Symbol.dispose](): void {
    this.disposed = true;
  }
}

const small = { model: "llama-9m", batchSize: 2, seqLen: 16, evalBatches: 2, quiet: true };

function readJsonl(path: string): Record<string, unknown>[] {
  return Deno.readTextFileSync(path).trim().split("\n").map((l) => JSON.parse(l));
}

Deno.test("train: loop, schedule, evals, files and summary", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    let engine: FakeEngine | undefined;
    const steps: number[] = [];
    const evalSteps: number[] = [];
    const summary = await train(
      { ...small, steps: 10, gradAccum: 3, lr: 0.01, evalEvery: 4, out: dir },
      {
        createEngine: (cfg) => (engine = new FakeEngine(cfg)),
        onStep: (r) => void steps.push(r.step),
        onEval: (r) => void evalSteps.push(r.step),
      },
    );
    assert.ok(engine?.disposed, "engine must be disposed");
    assert.deepEqual(steps, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert.deepEqual(evalSteps, [0, 4, 8, 10]);
    // Every evaluation sees the same validation windows.
    assert.equal(new Set(engine.evals).size, 1);
    const sched = { lr: 0.01, warmup: 1, steps: 10, minLrRatio: 0.1 };
    assert.deepEqual(engine.calls.map((c) => c.lr), steps.map((s) => lrAt(s - 1, sched)));
    assert.ok(engine.calls.every((c) => c.micro === 3 && c.tokens === 3 * 2 * 17));
    assert.deepEqual(engine.cfg.optimizer, {
      name: "adamw",
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      weight_decay: 0,
      clip: 1,
      freeze_embeddings: false,
      dp_comm: "auto",
      fused: false,
    });
    assert.equal(engine.cfg.model.vocab_size, 256);
    assert.equal(engine.cfg.threads, undefined);
    assert.equal((engine.cfg as EngineConfig & { grad_accum?: number }).grad_accum, 3);

    assert.equal(summary.steps, 10);
    assert.equal(summary.tokens, 10 * 3 * 2 * 16);
    assert.equal(summary.initial_val_loss, 5.5);
    assert.equal(summary.val_loss, 0.5);
    assert.equal(summary.val_ppl, Math.exp(0.5));
    // evalBatches 2: the reference divides the sum of 2 batch losses by 3 (docs/algorithm-spec.md I-16).
    assert.equal(summary.val_loss_ref, (0.5 * 2) / 3);
    assert.equal(summary.val_ppl_ref, Math.exp((0.5 * 2) / 3));
    // A stand-in without info(): no refreshes, fused from the options.
    assert.equal(summary.svd_count, 0);
    assert.deepEqual(summary.gaps, {});
    assert.equal(summary.refresh_failures, 0);
    assert.equal(summary.nonfinite_grads, null);
    assert.equal(summary.refresh_seconds, 0);
    assert.equal(summary.fused, false);
    assert.equal(summary.final_train_loss, 0.5);
    assert.ok(Math.abs(summary.entropy_floor! - 1.8589) < 1e-4);
    assert.equal(summary.params, 869_504);
    assert.equal(summary.memory.total, 18);
    assert.ok(summary.memory.peak_rss === null || summary.memory.peak_rss > 0);
    assert.equal(summary.config.warmup, 1);
    assert.equal(summary.interrupted, false);
    assert.equal(summary.diverged, false);
    assert.ok(summary.tokens_per_s > 0 && summary.wall_s > 0);

    const onDisk = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
    assert.deepEqual(onDisk, JSON.parse(JSON.stringify(summary)));
    const lines = readJsonl(join(dir, "metrics.jsonl"));
    assert.equal(lines.filter((l) => l.type === "step").length, 10);
    assert.deepEqual(lines.filter((l) => l.type === "eval").map((l) => l.step), [0, 4, 8, 10]);
    assert.equal(lines[0].val_loss, 5.5);
    assert.equal(lines[0].val_loss_ref, (5.5 * 2) / 3);
    assert.equal(lines.at(-1)!.val_loss, 0.5);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("train: out null writes nothing; text data has no entropy floor", async () => {
  const dir = Deno.makeTempDirSync();
  const cwd = Deno.cwd();
  try {
    const data = join(dir, "t.txt");
    Deno.writeTextFileSync(data, "abcdefghij".repeat(100));
    Deno.chdir(dir);
    const s = await train({ ...small, steps: 2, data, out: null }, {
      createEngine: (cfg) => new FakeEngine(cfg),
    });
    assert.equal(s.out, null);
    assert.equal(s.entropy_floor, null);
    assert.match(s.data, /1000 tokens \(900 train, 100 val; 1 \+ 0 documents\)/);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["t.txt"]);
  } finally {
    Deno.chdir(cwd);
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("train: a non-finite loss ends the run with a one-line error and a summary", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    let engine: FakeEngine | undefined;
    const err = await train({ ...small, steps: 10, lr: 1e30, clip: 0, out: dir }, {
      createEngine: (cfg) => (engine = new FakeEngine(cfg, 4)),
    }).then(() => null, (e) => e);
    assert.ok(err instanceof DivergedError && err instanceof UsageError);
    assert.equal(
      err.message,
      `training diverged at step 4: loss is NaN at micro-batch 0 (lr ${
        lrAt(3, { lr: 1e30, warmup: 1, steps: 10, minLrRatio: 0.1 }).toPrecision(3)
      }); likely cause: --lr 1e+30 is 2e+32x adamw's default 0.005; lower --lr or set --clip`,
    );
    assert.ok(engine?.disposed);
    const s: Summary = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
    assert.equal(s.steps, 3);
    assert.equal(s.diverged, true);
    assert.equal(s.error, err.message);
    assert.equal(s.val_loss, 5.5 / 5);
    assert.deepEqual(err.summary.steps, 3);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("train: other engine errors propagate unchanged", async () => {
  await assert.rejects(
    train({ ...small, steps: 3, out: null }, {
      createEngine: () => {
        throw new EngineError(-1, "threads = 0: bad");
      },
    }),
    (e: unknown) => e instanceof EngineError && e.message === "threads = 0: bad",
  );
});

Deno.test("train: an abort signal stops after the current step and still evaluates", async () => {
  // Ctrl-C takes the same path; the e2e suite sends a real SIGINT to a child process.
  const dir = Deno.makeTempDirSync();
  try {
    const stop = new AbortController();
    const s = await train({ ...small, steps: 50, out: dir }, {
      createEngine: (cfg) => new FakeEngine(cfg),
      signal: stop.signal,
      onStep: (r) => {
        if (r.step === 3) stop.abort();
      },
    });
    assert.equal(s.interrupted, true);
    assert.equal(s.steps, 3);
    assert.equal(s.val_loss, 5.5 / 4);
    assert.equal(JSON.parse(Deno.readTextFileSync(join(dir, "summary.json"))).interrupted, true);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("train: bad options fail before an engine is created", async () => {
  let created = false;
  const createEngine = (cfg: EngineConfig) => {
    created = true;
    return new FakeEngine(cfg);
  };
  await assert.rejects(train({ batchSize: 0 }, { createEngine }), /--batch-size 0: must be/);
  await assert.rejects(
    train({ data: "/nonexistent/file.txt" }, { createEngine }),
    /--data \/nonexistent\/file\.txt: not found/,
  );
  assert.equal(created, false);
});

Deno.test("log: progress lines, formatters, jsonl, peak RSS", () => {
  const out: string[] = [];
  const p = new Progress({ steps: 40, tty: false, write: (t) => void out.push(t) });
  for (let step = 1; step <= 40; step++) {
    p.step({ step, loss: 2.5, lr: 1e-3, gradNorm: 0.5, tokensPerS: 12345 });
  }
  // Plain mode: the first step, every other step (40/20) and the last.
  assert.equal(out.length, 20 + 1);
  assert.match(out[0], /^step {2}1\/40 loss 2\.5000 lr 1\.00e-3 gnorm 0\.500 12\.3k tok\/s eta /);
  assert.ok(out.every((l) => l.endsWith("\n") && !l.includes("\r")));

  const tty: string[] = [];
  const bar = new Progress({ steps: 2, tty: true, write: (t) => void tty.push(t) });
  bar.step({ step: 2, loss: 1, lr: 1, gradNorm: 1, tokensPerS: 1 });
  bar.note("eval");
  assert.ok(tty[0].startsWith("\r") && tty[0].includes("step 2/2"));
  assert.deepEqual(tty.slice(1), ["\n", "eval\n"]);

  assert.equal(formatCount(999), "999");
  assert.equal(formatCount(12_345), "12.3k");
  assert.equal(formatCount(3.4e6), "3.4M");
  assert.equal(formatDuration(42), "42s");
  assert.equal(formatDuration(185), "3m05s");
  assert.equal(formatDuration(3720), "1h02m");

  const dir = Deno.makeTempDirSync();
  try {
    const path = join(dir, "m.jsonl");
    {
      using w = new JsonlWriter(path);
      w.write({ type: "step", loss: 1.5 });
      w.write({ type: "eval", val_loss: NaN });
    }
    assert.equal(
      Deno.readTextFileSync(path),
      '{"type":"step","loss":1.5}\n{"type":"eval","val_loss":null}\n',
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
  const rss = peakRssBytes();
  if (Deno.build.os === "linux") assert.ok(rss !== null && rss > 1e6, `peak RSS ${rss}`);
});

/** A stand-in that also reports GaLore-family facts through info(). */
class InfoEngine extends FakeEngine {
  info(): Record<string, unknown> {
    return {
      fused: true,
      clip_mode: "two-backward",
      svd_count: 7,
      refresh_failures: 1,
      nonfinite_grads: 3,
      refresh_seconds: 0.25,
      gaps: { "model.layers.0.self_attn.q_proj.weight": 400 },
    };
  }
}

Deno.test("train: GaLore settings reach the engine; info() fills the summary", async () => {
  let engine: InfoEngine | undefined;
  const s = await train(
    { ...small, steps: 3, optimizer: "qgalore", rank: 16, out: null },
    { createEngine: (cfg) => (engine = new InfoEngine(cfg)) },
  );
  assert.deepEqual(engine!.cfg.optimizer, {
    name: "qgalore",
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0,
    clip: 1,
    freeze_embeddings: false,
    dp_comm: "auto",
    rank: 16,
    update_gap: 200,
    galore_scale: 0.25,
    weight_bits: 8,
    weight_group_size: 256,
    proj_bits: 4,
    proj_group_size: 256,
    stochastic_round: true,
    lazy: true,
    cos_threshold: 0.4,
    queue_size: 5,
    gamma: 2,
    proj_refresh: "eigh",
    cos_mode: "signed",
    quant_range: "zero",
    block_size: 2048,
    fused: true,
    clip_mode: "auto",
    proj_grad: "full",
  });
  assert.equal(s.svd_count, 7);
  assert.equal(s.refresh_failures, 1);
  assert.equal(s.nonfinite_grads, 3);
  assert.equal(s.refresh_seconds, 0.25);
  assert.deepEqual(s.gaps, { "model.layers.0.self_attn.q_proj.weight": 400 });
  assert.equal(s.fused, true);
  assert.equal(s.clip_mode, "two-backward");
  assert.equal((engine!.cfg as { checkpointing?: boolean }).checkpointing, false);
  assert.equal(s.config.rank, 16);
  assert.equal(s.config.lr, optimizerDefaults("qgalore").lr);
  assert.equal(s.config.blockSize, 2048);

  // galore with gradient accumulation: no 8-bit block, no INT8 switches, not fused.
  await train(
    { ...small, steps: 1, optimizer: "galore", gradAccum: 2, out: null },
    { createEngine: (cfg) => (engine = new InfoEngine(cfg)) },
  );
  assert.deepEqual(engine!.cfg.optimizer, {
    name: "galore",
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-6,
    weight_decay: 0,
    clip: 1,
    freeze_embeddings: false,
    dp_comm: "auto",
    rank: 128,
    update_gap: 200,
    galore_scale: 0.25,
    proj_bits: 16,
    lazy: false,
    proj_refresh: "eigh",
    fused: false,
    clip_mode: "auto",
    proj_grad: "full",
  });
});

Deno.test("train: an export that fails at the end still writes the summary, naming --export", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const out = join(dir, "run");
    await assert.rejects(
      train({ ...small, steps: 2, out, export: join(dir, "hf"), quiet: true }, {
        // a stand-in engine cannot write a model: the export fails after training
        createEngine: (cfg) => new FakeEngine(cfg),
      }),
      /^UsageError: --export .*hf: this engine cannot write a model/,
    );
    const s = JSON.parse(Deno.readTextFileSync(join(out, "summary.json")));
    assert.equal(s.steps, 2);
    assert.equal(s.export, null);
    assert.match(s.error, /--export .*cannot write a model/);
    assert.throws(() => Deno.statSync(join(dir, "hf")), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
