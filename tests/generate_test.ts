import assert from "node:assert/strict";
import { Engine, EngineError } from "../ffi/engine.ts";
import type { EngineConfig } from "../ffi/engine.ts";
import { checkGenerateOptions, generateIds } from "../lib/generate.ts";
import { evaluatePerplexity, perplexityWindows } from "../lib/evaluate.ts";
import { UsageError } from "../lib/errors.ts";
import { tinyConfig } from "./engine_config.ts";

const VOCAB = 256;

function config(optimizer: string, batch: number, seq: number, kvHeads = 2): EngineConfig {
  return tinyConfig({
    optimizer,
    batch,
    seq,
    seed: 3,
    threads: 2,
    model: { num_key_value_heads: kvHeads, initializer_range: 0.1, max_position_embeddings: 128 },
  });
}

function ids(n: number, seed: number): Int32Array {
  const t = new Int32Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) t[i] = (x = (x * 1103515245 + 12345) >>> 0) % VOCAB;
  return t;
}

/** Mean token cross-entropy (f64) of row-major logits against the windows' targets. */
function crossEntropy(
  logits: Float32Array,
  windows: Int32Array,
  rows: number,
  seq: number,
): number {
  let sum = 0;
  for (let r = 0; r < rows * seq; r++) {
    const row = logits.subarray(r * VOCAB, (r + 1) * VOCAB);
    const target = windows[Math.floor(r / seq) * (seq + 1) + (r % seq) + 1];
    let mx = -Infinity;
    for (const z of row) mx = Math.max(mx, z);
    let s = 0;
    for (const z of row) s += Math.exp(z - mx);
    sum += mx + Math.log(s) - row[target];
  }
  return sum / (rows * seq);
}

function inputs(windows: Int32Array, rows: number, seq: number): Int32Array {
  const out = new Int32Array(rows * seq);
  for (let r = 0; r < rows; r++) {
    out.set(windows.subarray(r * (seq + 1), r * (seq + 1) + seq), r * seq);
  }
  return out;
}

for (const optimizer of ["adamw", "qgalore"]) {
  Deno.test(`${optimizer}: the engine's logits give its eval loss`, async () => {
    using e = await Engine.create(config(optimizer, 2, 16));
    await e.trainStep(ids(2 * 17, 5), 1, 1e-2);
    const w = ids(2 * 17, 9);
    const logits = await e.logits(inputs(w, 2, 16), 2, 16);
    assert.equal(logits.length, 2 * 16 * VOCAB);
    const ce = crossEntropy(logits, w, 2, 16);
    const loss = await e.evalLoss(w, 1);
    assert.ok(Math.abs(ce - loss) < 1e-6, `cross-entropy ${ce}, evalLoss ${loss}`);
  });

  Deno.test(`${optimizer}: greedy with the cache equals greedy without`, async () => {
    using e = await Engine.create(config(optimizer, 1, 16));
    const prompt = [10, 20, 30, 40];
    const a = await generateIds(e, prompt, { maxNewTokens: 48 });
    const b = await generateIds(e, prompt, { maxNewTokens: 48, cache: false });
    assert.equal(a.ids.length, 48);
    assert.equal(a.stop, "length");
    assert.deepEqual(a.ids, b.ids);
    assert.ok(a.prefill_seconds > 0 && a.seconds >= a.prefill_seconds);
  });
}

Deno.test("the first greedy token is the argmax of the engine's logits", async () => {
  using e = await Engine.create(config("adamw", 1, 6));
  await e.trainStep(ids(7, 2), 1, 1e-2);
  const prompt = ids(6, 77);
  const logits = await e.logits(prompt, 1, 6);
  const last = logits.subarray(5 * VOCAB);
  let best = 0;
  for (let i = 1; i < VOCAB; i++) if (last[i] > last[best]) best = i;
  const g = await generateIds(e, prompt, { maxNewTokens: 1 });
  assert.deepEqual(g.ids, [best]);
});

Deno.test("seeded sampling is reproducible; top-k 1 and a tiny top-p are greedy", async () => {
  using e = await Engine.create(config("adamw", 1, 16, 1));
  const prompt = [1, 2, 3];
  const gen = async (o: Record<string, number>) =>
    (await generateIds(e, prompt, { maxNewTokens: 24, ...o })).ids;
  const greedy = await gen({});
  const a = await gen({ temperature: 1, seed: 1 });
  assert.deepEqual(await gen({ temperature: 1, seed: 1 }), a);
  assert.notDeepEqual(await gen({ temperature: 1, seed: 2 }), a);
  assert.notDeepEqual(a, greedy);
  assert.deepEqual(await gen({ temperature: 1, seed: 5, topK: 1 }), greedy);
  assert.deepEqual(await gen({ temperature: 1, seed: 5, topP: 1e-9 }), greedy);
});

Deno.test("generation stops at EOS and at max_position_embeddings", async () => {
  using e = await Engine.create(config("adamw", 1, 16));
  const prompt = [5, 6, 7];
  const free = (await generateIds(e, prompt, { maxNewTokens: 20 })).ids;
  const eos = free[4];
  const g = await generateIds(e, prompt, { maxNewTokens: 20, eosIds: [eos] });
  assert.equal(g.stop, "eos");
  assert.deepEqual(g.ids, free.slice(0, free.indexOf(eos) + 1));
  const long = await generateIds(e, ids(120, 4), { maxNewTokens: 20 });
  assert.equal(long.stop, "max_positions");
  assert.equal(long.ids.length, 8);
  // any count may be asked for: it stops at the last position (memory follows the tokens
  // produced), the same ids, and the engine stays usable
  for (const cache of [true, false]) {
    const most = await generateIds(e, ids(120, 4), {
      maxNewTokens: Number.MAX_SAFE_INTEGER,
      cache,
    });
    assert.equal(most.stop, "max_positions");
    assert.deepEqual(most.ids, long.ids);
  }
  assert.deepEqual((await generateIds(e, prompt, { maxNewTokens: 20 })).ids, free);
});

Deno.test("bad generation requests are one-line errors naming the field", async () => {
  const usage = (o: Parameters<typeof checkGenerateOptions>[0], p?: number[], re?: RegExp) =>
    assert.throws(() => checkGenerateOptions(o, p, VOCAB), (e: unknown) => {
      assert.ok(e instanceof UsageError);
      assert.match(e.message, re!);
      assert.ok(!e.message.includes("\n"));
      return true;
    });
  usage({ maxNewTokens: -1 }, [1], /^maxNewTokens = -1: must be an integer ≥ 0$/);
  usage({ maxNewTokens: 2.5 }, [1], /^maxNewTokens = 2.5: must be an integer ≥ 0$/);
  // past 2^53 a number is no longer an exact integer
  usage({ maxNewTokens: 2 ** 60 }, [1], /^maxNewTokens = 1152921504606847000: must be an integer/);
  usage({ maxNewTokens: 4, temperature: -0.5 }, [1], /^temperature = -0.5: must be a finite/);
  usage({ maxNewTokens: 4, topP: 0 }, [1], /^topP = 0: must be in \(0, 1\]/);
  usage({ maxNewTokens: 4, topK: -1 }, [1], /^topK = -1: must be an integer ≥ 0/);
  usage({ maxNewTokens: 4 }, [], /^prompt is empty/);
  usage({ maxNewTokens: 4 }, [1, 256], /^prompt\[1\] = 256: must be a token id/);
  usage({ maxNewTokens: 4, eosIds: [-1] }, [1], /^eosIds\[0\] = -1: must be a token id/);
  // the engine checks the same things itself
  using e = await Engine.create(config("adamw", 1, 16));
  const engine = async (p: number[], o: object, re: RegExp) =>
    await assert.rejects(
      () => e.generate(p, { max_new_tokens: 4, ...o }),
      (err: unknown) => {
        assert.ok(err instanceof EngineError);
        assert.match(err.message, re);
        assert.ok(!err.message.includes("\n"));
        return true;
      },
    );
  await engine([1], { top_p: 2 }, /^generate: top_p = 2: must be in \(0, 1\]/);
  await engine([1], { temperature: -1 }, /^generate: temperature = -1/);
  await engine([1], { top_k: -3 }, /^generate: top_k = -3/);
  await engine([], {}, /^generate: prompt is empty/);
  await engine([300], {}, /^generate: prompt\[0\] = 300: outside the vocabulary \[0, 256\)/);
  await assert.rejects(
    () => e.logits(new Int32Array(32), 2, 16),
    /logits: batch 2 × seq 16 differs/,
  );
  // the engine still works afterwards
  assert.equal((await generateIds(e, [1], { maxNewTokens: 2 })).ids.length, 2);
});

Deno.test("perplexity windows: consecutive, not overlapping, the partial window dropped", () => {
  const t = new Int32Array(1000).map((_, i) => i);
  const { windows, count } = perplexityWindows(t, 100);
  assert.equal(count, 9);
  assert.equal(windows.length, 9 * 101);
  for (let i = 0; i < 9; i++) {
    assert.equal(windows[i * 101], i * 101);
    assert.equal(windows[i * 101 + 100], i * 101 + 100);
  }
  assert.equal(perplexityWindows(t.subarray(0, 101), 100).count, 1);
  assert.equal(perplexityWindows(t.subarray(0, 100), 100).count, 0);
  assert.equal(perplexityWindows(t.subarray(0, 201), 100).count, 1);
  assert.equal(perplexityWindows(t.subarray(0, 202), 100).count, 2);
  assert.throws(() => perplexityWindows(t, 0), /seq_len = 0: must be an integer ≥ 1/);
});

Deno.test("evaluatePerplexity scores seq_len targets in each window of seq_len + 1", async () => {
  const seq = 16;
  using e = await Engine.create(config("adamw", 1, seq));
  await e.trainStep(ids(seq + 1, 8), 1, 1e-2);
  const text = ids(17 * 70 + 5, 31); // 70 windows (two engine calls), 5 ids dropped
  const r = await evaluatePerplexity(e, text, seq);
  assert.equal(r.windows, 70);
  assert.equal(r.tokens, 70 * seq);
  assert.ok(Math.abs(r.ppl - Math.exp(r.loss)) < 1e-9 * r.ppl);
  // the same mean from the logits, window by window
  let sum = 0;
  for (let i = 0; i < 70; i++) {
    const w = text.slice(i * (seq + 1), i * (seq + 1) + seq + 1);
    sum += crossEntropy(await e.logits(w.subarray(0, seq), 1, seq), w, 1, seq);
  }
  assert.ok(Math.abs(sum / 70 - r.loss) < 1e-6, `${sum / 70} vs ${r.loss}`);
  await assert.rejects(() => evaluatePerplexity(e, text, 8), /perplexity needs seq_len 8/);
  await assert.rejects(() => evaluatePerplexity(e, text.subarray(0, 16), seq), /16 tokens/);
});
