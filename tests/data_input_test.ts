/**
 * In-memory data for train() and finetune(): `{ text }`, a Dataset object, an array of
 * records; and one-line errors that never print the data (a 40 KB value gives one short line).
 * A run on in-memory data keeps it in its folder and resumes from it bit for bit.
 */
import assert from "node:assert/strict";
import type { EngineConfig, StepStats } from "../ffi/engine.ts";
import { TextDataset } from "../lib/data.ts";
import { shortValue, UsageError } from "../lib/errors.ts";
import { finetune } from "../lib/finetune.ts";
import { paramCount } from "../lib/estimate.ts";
import type { TrainEngine, TrainHooks } from "../lib/run_types.ts";
import { startRun, train } from "../lib/trainer.ts";
import { listCheckpoints, readRunRecord } from "../lib/checkpoints.ts";
import { TINY_MODEL } from "./pretrain_cli.ts";
import { join } from "node:path";
import type { MemoryBytes } from "../ffi/engine.ts";
import { standInMemory } from "./stand_in.ts";

const MODEL = new URL("./fixtures/hf/gqa-tied-theta5e5", import.meta.url).pathname;

/** Records every training batch it is given. */
class RecordingEngine implements TrainEngine {
  readonly params: number;
  readonly device = "cpu";
  batches: Int32Array[] = [];
  constructor(readonly cfg: EngineConfig) {
    this.params = paramCount(cfg.model);
  }
  trainStep(tokens: Int32Array): Promise<StepStats> {
    this.batches.push(tokens.slice());
    return Promise.resolve({ loss: 1, gradNorm: 1, clipped: false, count: 1 });
  }
  evalLoss(): Promise<number> {
    return Promise.resolve(1);
  }
  memory(): MemoryBytes {
    return standInMemory();
  }
  [Symbol.dispose](): void {}
}

const small = { model: "llama-9m", batchSize: 2, seqLen: 16, evalBatches: 1, quiet: true };
const big = { rows: "x".repeat(40_000) }; // a 40 KB value

Deno.test("train: { text } and a Dataset object are trained on in memory", async () => {
  let engine: RecordingEngine | null = null;
  const createEngine = (cfg: EngineConfig) => (engine = new RecordingEngine(cfg));
  const s = await train({ ...small, steps: 2, data: { text: "ab".repeat(500) }, out: null }, {
    createEngine,
  });
  assert.equal(s.steps, 2);
  assert.match(s.data, /^text --data \{ text \}: 1000 byte tokens \(900 train, 100 val\)$/);
  // every window comes from "abab…": only the bytes of a and b
  for (const b of engine!.batches) for (const t of b) assert.ok(t === 97 || t === 98);

  const ds = TextDataset.fromText("xyz".repeat(300), { valFraction: 0.2, seqLen: 16 });
  const s2 = await train({ ...small, steps: 3, data: ds, out: null }, { createEngine });
  assert.equal(s2.steps, 3);
  assert.equal(s2.data, ds.describe());
  assert.equal(engine!.batches.length, 3);
  for (const b of engine!.batches) for (const t of b) assert.ok(t >= 120 && t <= 122);
});

Deno.test("train/finetune: a bad in-memory value gives one short line, never the data", async () => {
  const createEngine = (): TrainEngine => {
    throw new Error("no engine for bad input");
  };
  const bad: unknown[] = [big, [big], { text: 5, more: big }, 42, { text: "" }];
  for (const data of bad) {
    const e = await train({ ...small, data: data as string }, { createEngine }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(e instanceof UsageError, String(e));
    assert.ok(!e.message.includes("\n"));
    assert.ok(e.message.length < 260, `${e.message.length} chars: ${e.message.slice(0, 300)}`);
    assert.match(e.message, /^--data /);
  }
  // the option checks quote values the same bounded way
  const e = await train({ ...small, lr: big as unknown as number }).catch((e: unknown) => e);
  assert.ok(e instanceof UsageError);
  assert.ok(e.message.length < 200, e.message);
  assert.equal(shortValue(big).length, 80);
  assert.equal(shortValue("x"), '"x"');

  for (const data of [big, [], "x".repeat(10) as unknown]) {
    if (typeof data === "string") continue;
    const f = await finetune({ model: MODEL, data: data as string, quiet: true }).catch((
      e: unknown,
    ) => e);
    assert.ok(f instanceof UsageError, String(f));
    assert.ok(f.message.length < 260 && !f.message.includes("\n"), f.message);
    assert.match(f.message, /^--data /);
  }
  // with a path, nothing is staged: a bad model is still its own one-line error
  const m = await finetune({ model: "/nonexistent/model", data: "x.jsonl" }).catch((e) => e);
  assert.ok(m instanceof UsageError, String(m));
  assert.match(m.message, /^--model \/nonexistent\/model/);
});

Deno.test({
  name: "finetune: an array of records; a bad record is named by its index",
  sanitizeResources: false,
  fn: async () => {
    const good = Array.from({ length: 12 }, (_, i) => ({
      prompt: `say ${i}:`,
      completion: ` ${i} ${i}`,
    }));
    const opts = {
      model: MODEL,
      seqLen: 16,
      batchSize: 2,
      steps: 2,
      device: "cpu" as const,
      threads: 1,
      quiet: true,
      handleSigint: false,
      saveEvery: "off",
      out: null,
    };
    const s = await finetune({ ...opts, data: good });
    assert.equal(s.steps, 2);
    const f = s.finetune as Record<string, Record<string, number>>;
    assert.equal(f.train.lines, 12);
    assert.equal(f.train.examples + f.val.examples, 12);

    const bad = [...good.slice(0, 2), { prompt: "p", completion: 7, pad: big.rows }, ...good];
    const e = await finetune({ ...opts, data: bad as never }).catch((e: unknown) => e);
    assert.ok(e instanceof UsageError, String(e));
    assert.match(e.message, /^--data data\[2\]: "prompt" and "completion" must both be strings/);
    assert.ok(e.message.length < 300 && !e.message.includes("qgalore-ft-data-"), e.message);
    // the staged files are gone
    const left = [...Deno.readDirSync(Deno.env.get("TMPDIR") ?? "/tmp")].filter((d) =>
      d.name.startsWith("qgalore-ft-data-")
    );
    assert.deepEqual(left, []);
  },
});

/** The lines of a run's metrics.jsonl, without the timings (which differ between runs). */
function metricsOf(dir: string): Record<string, unknown>[] {
  return Deno.readTextFileSync(join(dir, "metrics.jsonl")).split("\n").filter((l) => l)
    .map((l) => {
      const { elapsed_s: _e, tokens_per_s: _t, ...rest } = JSON.parse(l);
      return rest;
    });
}

/** Aborts after `k` updates: the run stops there with a checkpoint, as Ctrl-C stops it. */
function stopAt(k: number): TrainHooks {
  const ctl = new AbortController();
  return { signal: ctl.signal, onStep: (r) => void (r.step === k && ctl.abort()) };
}

/** Real engine, one thread (bit-exact across processes), no periodic checkpoint. */
const real = {
  batchSize: 2,
  seqLen: 16,
  evalBatches: 2,
  evalEvery: 4,
  steps: 12,
  threads: 1,
  quiet: true,
  handleSigint: false,
  saveEvery: "off",
  optimizer: "qgalore" as const,
  rank: 8,
  updateGap: 3,
};

Deno.test({
  name:
    "train/startRun: { text } is kept as the run's data.txt; stopped and resumed without it, the run equals the uninterrupted one bit for bit",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-memresume-" });
    try {
      const model = join(dir, "tiny.json");
      Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
      const text = "the quick brown fox jumps over the lazy dog. ".repeat(60);
      const opts = { ...real, model, data: { text } };

      const whole = join(dir, "whole");
      const w = await train({ ...opts, out: whole });
      assert.equal(w.steps, 12);
      assert.equal(Deno.readTextFileSync(join(whole, "data.txt")), text);
      assert.equal(w.config.data, join(whole, "data.txt"));
      assert.match(w.data, /^text --data \{ text \}: 2700 byte tokens/);

      // startRun takes in-memory data too: its phases, composed by hand, give train()'s run
      const phased = join(dir, "phased");
      {
        using run = await startRun({ ...opts, out: phased });
        await run.evaluate();
        while (!run.done) {
          if ((await run.step()) === null) continue;
          if (run.evalDue) await run.evaluate();
        }
        const s = await run.finish();
        assert.equal(s.data, w.data);
      }
      assert.deepEqual(metricsOf(phased), metricsOf(whole));
      assert.equal(Deno.readTextFileSync(join(phased, "data.txt")), text);

      // stopped after 5 updates, then resumed with no data given: read back from data.txt
      const part = join(dir, "part");
      const p = await train({ ...opts, out: part }, stopAt(5));
      assert.equal(p.interrupted, true);
      assert.equal(p.steps, 5);
      const record = readRunRecord(p.checkpoint!);
      assert.deepEqual(record.data.own, { form: "text", data: "data.txt" });
      assert.equal(record.options.data, join(part, "data.txt"));
      // the run folder may move: the record's file names are relative to it
      const moved = join(dir, "moved");
      Deno.renameSync(part, moved);
      const r = await train({ resume: moved, quiet: true, handleSigint: false });
      assert.equal(r.steps, 12);
      assert.equal(r.interrupted, false);
      assert.equal(r.config.data, join(moved, "data.txt"));
      assert.deepEqual(metricsOf(moved), metricsOf(whole));
      assert.equal(r.val_loss, w.val_loss);
      assert.equal(r.final_train_loss, w.final_train_loss);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "train: a Dataset object resumes when given again (else one line saying so); other data is refused",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-memresume-" });
    try {
      const model = join(dir, "tiny.json");
      Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
      const ds = TextDataset.fromText("pack my box with five dozen liquor jugs. ".repeat(60), {
        valFraction: 0.1,
        seqLen: 16,
      });
      const opts = { ...real, model, data: ds };
      const whole = join(dir, "whole");
      await train({ ...opts, out: whole });
      const part = join(dir, "part");
      await train({ ...opts, out: part }, stopAt(4));
      const record = readRunRecord(listCheckpoints(part).at(-1)!.path);
      assert.deepEqual(record.data.own, { form: "dataset" });
      assert.equal(record.options.data, null);
      const e = await train({ resume: part, quiet: true }).catch((e: unknown) => e);
      assert.ok(e instanceof UsageError, String(e));
      assert.equal(
        e.message,
        `--resume ${part}: the run trained on a Dataset object held in memory ` +
          `(${ds.describe()}); resume it from code, train({ resume, data }) with the same Dataset`,
      );
      const other = TextDataset.fromText("x".repeat(3000), { valFraction: 0.1, seqLen: 16 });
      const o = await train({ resume: part, data: other, quiet: true }).catch((e: unknown) => e);
      assert.ok(o instanceof UsageError, String(o));
      assert.match(o.message, /the data changed since the checkpoint/);
      const r = await train({ resume: part, data: ds, quiet: true, handleSigint: false });
      assert.equal(r.steps, 12);
      assert.deepEqual(metricsOf(part), metricsOf(whole));
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "finetune: records in memory are kept in the run folder, named by record and summary, and resume bit for bit",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ftmem-" });
    try {
      const records = Array.from({ length: 24 }, (_, i) => ({
        prompt: `say ${i}:`,
        completion: ` ${i} ${i}`,
      }));
      const val = [{ text: "say 1: 1 1" }, { text: "say 2: 2 2" }];
      const opts = {
        model: MODEL,
        seqLen: 16,
        batchSize: 2,
        steps: 8,
        evalEvery: 3,
        device: "cpu" as const,
        threads: 1,
        quiet: true,
        handleSigint: false,
        saveEvery: "off",
        data: records,
        valData: val,
      };
      const whole = join(dir, "whole");
      const w = await finetune({ ...opts, out: whole });
      const f = w.finetune as Record<string, { path: string }>;
      assert.equal(f.train.path, join(whole, "data.jsonl"));
      assert.equal(f.val.path, join(whole, "val_data.jsonl"));
      assert.equal(w.config.data, join(whole, "data.jsonl"));
      assert.equal(w.config.valData, join(whole, "val_data.jsonl"));
      assert.ok(w.data.startsWith(`${join(whole, "data.jsonl")} (prompt): 24 examples`), w.data);
      const lines = Deno.readTextFileSync(join(whole, "data.jsonl")).trim().split("\n");
      assert.deepEqual(lines.map((l) => JSON.parse(l)), records);
      // no temporary file is left, none is named
      const left = [...Deno.readDirSync(Deno.env.get("TMPDIR") ?? "/tmp")].filter((d) =>
        d.name.startsWith("qgalore-ft-data-")
      );
      assert.deepEqual(left, []);
      assert.ok(!Deno.readTextFileSync(join(whole, "summary.json")).includes("qgalore-ft-data-"));

      const part = join(dir, "part");
      const p = await finetune({ ...opts, out: part }, stopAt(3));
      assert.equal(p.steps, 3);
      const record = readRunRecord(p.checkpoint!);
      assert.deepEqual(record.data.own, {
        form: "records",
        data: "data.jsonl",
        valData: "val_data.jsonl",
      });
      for (const path of [record.options.data!, record.options.valData!]) {
        assert.ok(Deno.statSync(path).isFile, path);
      }
      assert.ok(!record.data.description.includes("qgalore-ft-data-"), record.data.description);
      const r = await finetune({ resume: part, quiet: true, handleSigint: false });
      assert.equal(r.steps, 8);
      assert.deepEqual(metricsOf(part), metricsOf(whole));
      assert.equal(r.val_loss, w.val_loss);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "train: an --out folder holding another data.txt is refused in one line (same text kept; --overwrite replaces)",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-memown-" });
    try {
      const model = join(dir, "tiny.json");
      Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
      const text = "sphinx of black quartz, judge my vow. ".repeat(60);
      const opts = { ...real, steps: 2, model, data: { text } };
      const out = join(dir, "out");
      Deno.mkdirSync(out);
      Deno.writeTextFileSync(join(out, "data.txt"), "the user's own notes");
      const e = await train({ ...opts, out }).catch((e: unknown) => e);
      assert.ok(e instanceof UsageError, String(e));
      assert.equal(
        e.message,
        `--out ${out}: already holds a data.txt that is not this run's data; the run keeps its ` +
          "in-memory data there (choose another --out, or pass --overwrite on to replace it)",
      );
      assert.equal(Deno.readTextFileSync(join(out, "data.txt")), "the user's own notes");
      // refused as the options are checked: nothing of a run was written there
      assert.deepEqual([...Deno.readDirSync(out)].map((e) => e.name), ["data.txt"]);
      // the same text there already: kept, the run goes on
      Deno.writeTextFileSync(join(out, "data.txt"), text);
      assert.equal((await train({ ...opts, out })).steps, 2);
      const replaced = join(dir, "replaced");
      Deno.mkdirSync(replaced);
      Deno.writeTextFileSync(join(replaced, "data.txt"), "old");
      assert.equal((await train({ ...opts, out: replaced, overwrite: true })).steps, 2);
      assert.equal(Deno.readTextFileSync(join(replaced, "data.txt")), text);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});
