/**
 * In-memory data for train() and finetune(): `{ text }`, a Dataset object, an array of
 * records; and one-line errors that never print the data (a 40 KB value gives one short line).
 */
import assert from "node:assert/strict";
import type { EngineConfig, StepStats } from "../ffi/engine.ts";
import { TextDataset } from "../lib/data.ts";
import { shortValue, UsageError } from "../lib/errors.ts";
import { finetune } from "../lib/finetune.ts";
import { paramCount } from "../lib/estimate.ts";
import { train, type TrainEngine } from "../lib/trainer.ts";
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
