import assert from "node:assert/strict";
import { join } from "node:path";
import { SYNTHETIC_ALPHABET, SyntheticCorpus, TextDataset } from "../lib/data.ts";
import { UsageError } from "../lib/errors.ts";
import { Rng } from "../lib/rng.ts";
import { ByteTokenizer } from "../lib/tokenizer.ts";

Deno.test("byte tokenizer round trip", () => {
  const tok = new ByteTokenizer();
  const text = "Héllo, wörld! 🦕\n\ttabs";
  const ids = tok.encode(text);
  assert.equal(tok.vocabSize, 256);
  assert.equal(ids.length, new TextEncoder().encode(text).length);
  assert.ok(ids.every((id) => id >= 0 && id < 256));
  assert.equal(tok.decode(ids), text);
  const raw = Uint8Array.from([0, 255, 128, 7]);
  assert.deepEqual([...tok.encode(raw)], [0, 255, 128, 7]);
  assert.deepEqual(tok.decodeBytes(tok.encode(raw)), raw);
  assert.throws(() => tok.decode([256]), RangeError);
  assert.throws(() => tok.decode([-1]), RangeError);
});

Deno.test("rng: deterministic, seed-sensitive, in range", () => {
  const a = new Rng(7), b = new Rng(7), c = new Rng(8);
  const xs = Array.from({ length: 100 }, () => a.nextU32());
  assert.deepEqual(xs, Array.from({ length: 100 }, () => b.nextU32()));
  assert.notDeepEqual(xs, Array.from({ length: 100 }, () => c.nextU32()));
  // Pinned so a change of generator is noticed (it would change every run's data order).
  const pinned = new Rng(0);
  assert.deepEqual(
    [pinned.nextU32(), pinned.nextU32(), pinned.nextU32()],
    [1789933344, 44971166, 2521387044],
  );
  const r = new Rng(1);
  const counts = new Array(10).fill(0);
  let sum = 0;
  for (let i = 0; i < 100_000; i++) {
    const f = r.nextFloat();
    assert.ok(f >= 0 && f < 1);
    sum += f;
    counts[r.int(10)]++;
  }
  assert.ok(Math.abs(sum / 100_000 - 0.5) < 0.01);
  for (const n of counts) assert.ok(Math.abs(n - 10_000) < 500, `bucket ${n}`);
  assert.throws(() => r.int(0), RangeError);
  assert.notDeepEqual(
    Array.from({ length: 4 }, () => new Rng(2 ** 40).nextU32()),
    Array.from({ length: 4 }, () => new Rng(0).nextU32()),
  );
});

function withFile(bytes: Uint8Array, fn: (path: string) => void): void {
  const dir = Deno.makeTempDirSync();
  try {
    const path = join(dir, "corpus.txt");
    Deno.writeFileSync(path, bytes);
    fn(path);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

function contains(haystack: Int32Array, needle: Int32Array): boolean {
  outer: for (let s = 0; s + needle.length <= haystack.length; s++) {
    for (let i = 0; i < needle.length; i++) if (haystack[s + i] !== needle[i]) continue outer;
    return true;
  }
  return false;
}

Deno.test("text dataset: split sizes and window contents match the file", () => {
  const bytes = new Uint8Array(1000);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + (i >> 5)) % 251;
  withFile(bytes, (path) => {
    const ds = TextDataset.fromFile(path, { valFraction: 0.1, seqLen: 16 });
    assert.equal(ds.train.length, 900);
    assert.equal(ds.val.length, 100);
    assert.deepEqual([...ds.train], [...bytes.subarray(0, 900)]);
    assert.deepEqual([...ds.val], [...bytes.subarray(900)]);
    assert.equal(ds.tokens("val"), ds.val);
    assert.match(ds.describe(), /1000 byte tokens \(900 train, 100 val\)/);

    const batch = ds.trainBatch(new Rng(3), 4, 16, 2);
    assert.equal(batch.length, 2 * 4 * 17);
    for (let r = 0; r < 8; r++) {
      const row = batch.subarray(r * 17, (r + 1) * 17);
      assert.ok(contains(ds.train, row), `train row ${r} is not a window of the train split`);
    }
    const val = ds.valBatches(3, 2, 16);
    assert.equal(val.length, 3 * 2 * 17);
    // Evenly spaced: the first window starts the split and the last one ends it.
    assert.deepEqual([...val.subarray(0, 17)], [...bytes.subarray(900, 917)]);
    assert.deepEqual([...val.subarray(5 * 17)], [...bytes.subarray(1000 - 17)]);
    for (let r = 0; r < 6; r++) assert.ok(contains(ds.val, val.subarray(r * 17, (r + 1) * 17)));
  });
});

Deno.test("text dataset: seeded sampling is deterministic", () => {
  const ds = TextDataset.fromText("the quick brown fox jumps over the lazy dog. ".repeat(50), {
    valFraction: 0.2,
    seqLen: 8,
  });
  const a = ds.trainBatch(new Rng(11), 4, 8, 3);
  assert.deepEqual(a, ds.trainBatch(new Rng(11), 4, 8, 3));
  assert.notDeepEqual(a, ds.trainBatch(new Rng(12), 4, 8, 3));
  assert.deepEqual(ds.valBatches(4, 4, 8), ds.valBatches(4, 4, 8));
});

function usage(fn: () => unknown, ...patterns: RegExp[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof UsageError, `expected UsageError, got ${e}`);
    for (const p of patterns) assert.match(e.message, p);
    assert.ok(!e.message.includes("\n"));
    return true;
  });
}

Deno.test("text dataset errors name the file, its size and the minimum", () => {
  usage(
    () => TextDataset.fromFile("/nonexistent/corpus.txt", { valFraction: 0.1, seqLen: 8 }),
    /^\/nonexistent\/corpus\.txt: file not found$/,
  );
  usage(
    () =>
      TextDataset.fromFile("/nonexistent/x.txt", {
        valFraction: 0.1,
        seqLen: 8,
        label: "--data /nonexistent/x.txt",
      }),
    /^--data \/nonexistent\/x\.txt: file not found$/,
  );
  withFile(new Uint8Array(0), (path) => {
    usage(
      () => TextDataset.fromFile(path, { valFraction: 0.1, seqLen: 8 }),
      new RegExp(`^${path}: file is empty \\(0 tokens\\); need at least 18 tokens`),
    );
  });
  withFile(new TextEncoder().encode("x".repeat(100)), (path) => {
    // 100 tokens → 90 train + 10 val; a window needs 17.
    usage(
      () => TextDataset.fromFile(path, { valFraction: 0.1, seqLen: 16 }),
      new RegExp(`^${path}: 100 tokens split into 90 train \\+ 10 validation`),
      /at least 17 \(seq_len 16 \+ 1\)/,
      /at least ~170 tokens/,
    );
    usage(
      () => TextDataset.fromFile(path, { valFraction: 0.1, seqLen: 128 }),
      /100 tokens/,
      /at least 129/,
    );
    usage(() => TextDataset.fromFile(path, { valFraction: 1, seqLen: 4 }), /--val-fraction 1/);
    const ok = TextDataset.fromFile(path, { valFraction: 0.2, seqLen: 16 });
    assert.equal(ok.val.length, 20);
  });
  const dir = Deno.makeTempDirSync();
  try {
    usage(() => TextDataset.fromFile(dir, { valFraction: 0.1, seqLen: 8 }), /is a directory/);
  } finally {
    Deno.removeSync(dir);
  }
});

/** Plug-in estimate of H(X_t | X_{t−1}) in nats from transition counts. */
function conditionalEntropy(stream: Int32Array): number {
  const pair = new Map<number, number>();
  const prev = new Map<number, number>();
  for (let i = 1; i < stream.length; i++) {
    const key = stream[i - 1] * 256 + stream[i];
    pair.set(key, (pair.get(key) ?? 0) + 1);
    prev.set(stream[i - 1], (prev.get(stream[i - 1]) ?? 0) + 1);
  }
  const n = stream.length - 1;
  let h = 0;
  for (const [key, c] of pair) h -= (c / n) * Math.log(c / prev.get(Math.floor(key / 256))!);
  return h;
}

Deno.test("synthetic corpus: empirical conditional entropy matches the floor", () => {
  const corpus = new SyntheticCorpus();
  const p = [0.3, 0.2, 0.15, 0.12, 0.09, 0.07, 0.04, 0.03];
  const h = -p.reduce((s, q) => s + q * Math.log(q), 0);
  assert.ok(Math.abs(corpus.entropyFloor - h) < 1e-12);
  assert.deepEqual(corpus.steps.map((s) => s.p), p);
  const train = corpus.tokens("train");
  assert.equal(train.length, 1 << 21);
  const hTrain = conditionalEntropy(train);
  assert.ok(
    Math.abs(hTrain - corpus.entropyFloor) / corpus.entropyFloor < 0.01,
    `train ${hTrain} vs floor ${corpus.entropyFloor}`,
  );
  const hVal = conditionalEntropy(corpus.tokens("val"));
  assert.ok(Math.abs(hVal - corpus.entropyFloor) / corpus.entropyFloor < 0.01, `val ${hVal}`);
  assert.match(corpus.describe(), /entropy floor 1\.85\d\d nats/);
});

Deno.test("synthetic corpus: 64 printable symbols, near-uniform frequencies", () => {
  const corpus = new SyntheticCorpus({ seed: 5 });
  const stream = corpus.tokens("train");
  const allowed = new Set(new TextEncoder().encode(SYNTHETIC_ALPHABET));
  assert.equal(allowed.size, 64);
  const counts = new Map<number, number>();
  for (const id of stream) counts.set(id, (counts.get(id) ?? 0) + 1);
  assert.equal(counts.size, 64);
  const mean = stream.length / 64;
  for (const [id, c] of counts) {
    assert.ok(allowed.has(id), `unexpected byte ${id}`);
    assert.ok(id >= 0x21 && id < 0x7f, `byte ${id} is not printable`);
    assert.ok(Math.abs(c - mean) / mean < 0.05, `symbol ${id}: ${c} vs ${mean}`);
  }
});

Deno.test("synthetic corpus: seeded, separate val stream, stable val windows", () => {
  const a = new SyntheticCorpus({ trainTokens: 5000, valTokens: 3000 });
  const b = new SyntheticCorpus({ trainTokens: 5000, valTokens: 3000 });
  const c = new SyntheticCorpus({ seed: 43, trainTokens: 5000, valTokens: 3000 });
  assert.deepEqual(a.tokens("train"), b.tokens("train"));
  assert.notDeepEqual(a.tokens("train"), c.tokens("train"));
  assert.notDeepEqual(a.tokens("train").subarray(0, 3000), a.tokens("val"));
  const v1 = a.valBatches(4, 3, 32);
  assert.equal(v1.length, 4 * 3 * 33);
  assert.deepEqual(v1, a.valBatches(4, 3, 32));
  assert.deepEqual(v1, b.valBatches(4, 3, 32));
  // Sampling training windows must not disturb the validation set.
  a.trainBatch(new Rng(1), 8, 32, 2);
  assert.deepEqual(v1, a.valBatches(4, 3, 32));
  for (let r = 0; r < 12; r++) {
    assert.ok(contains(a.tokens("val"), v1.subarray(r * 33, r * 33 + 33)));
  }
  const t = a.trainBatch(new Rng(9), 2, 32, 3);
  assert.equal(t.length, 3 * 2 * 33);
  assert.deepEqual(t, b.trainBatch(new Rng(9), 2, 32, 3));
  assert.throws(() => a.trainBatch(new Rng(1), 1, 5000, 1), RangeError);
});

Deno.test("synthetic corpus: custom walk and bad options", () => {
  const fair = new SyntheticCorpus({ offsets: [1, -1], weights: [1, 1], trainTokens: 200_000 });
  assert.ok(Math.abs(fair.entropyFloor - Math.log(2)) < 1e-12);
  assert.ok(Math.abs(conditionalEntropy(fair.tokens("train")) - Math.log(2)) < 0.005);
  assert.throws(() => new SyntheticCorpus({ offsets: [1, 65], weights: [1, 1] }), /distinct/);
  assert.throws(() => new SyntheticCorpus({ offsets: [1], weights: [0] }), /positive integers/);
  assert.throws(() => new SyntheticCorpus({ offsets: [1, 2], weights: [1] }), /same length/);
});
