import assert from "node:assert/strict";
import { join } from "node:path";
import { openCorpus, ShardDataset } from "../lib/data.ts";
import { UsageError } from "../lib/errors.ts";
import { Rng } from "../lib/rng.ts";
import {
  ByteTokenizer,
  type HfTokenizer,
  openTokenizer,
  type Tokenizer,
} from "../lib/tokenizer.ts";

const fixtures = new URL("./fixtures/tok/", import.meta.url).pathname;
const multilingual: string = JSON.parse(Deno.readTextFileSync(join(fixtures, "ids.json"))).text;
const llama3 = openTokenizer(join(fixtures, "llama3"));

/** Deterministic words from a few syllables. */
function words(seed: number, n: number): string {
  const syl = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fi", "gu", "ha"];
  let x = seed >>> 0;
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    out.push(syl[(x >>> 8) % syl.length] + syl[(x >>> 16) % syl.length]);
    out.push(i % 9 === 8 ? ".\n" : " ");
  }
  return out.join("");
}

const docs = Array.from(
  { length: 30 },
  (_, i) => words(i + 1, 20 + 3 * i) + (i % 7 === 0 ? multilingual : ""),
);

async function gzip(bytes: Uint8Array<ArrayBuffer>): Promise<Uint8Array<ArrayBuffer>> {
  const stream = new Blob([bytes]).stream().pipeThrough(new CompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function withDir(f: (dir: string) => Promise<void>): Promise<void> {
  const dir = Deno.makeTempDirSync();
  try {
    await f(dir);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

/**
 * Checks that the two splits hold exactly the documents, each encoded directly and followed
 * by EOS, each document whole in one split and in corpus order within it.
 */
function assertDocuments(ds: ShardDataset, tok: Tokenizer, texts: string[]): void {
  const encoded = texts.map((t) => [...tok.encode(t), tok.eosId!]);
  const streams = { train: [...ds.tokens("train")], val: [...ds.tokens("val")] };
  const at = { train: 0, val: 0 };
  const count = { train: 0, val: 0 };
  for (const ids of encoded) {
    const split = (["train", "val"] as const).find((s) =>
      ids.every((x, i) => streams[s][at[s] + i] === x)
    );
    assert.ok(split, "each document appears whole, in order, in one split");
    at[split] += ids.length;
    count[split]++;
  }
  assert.deepEqual(at, { train: streams.train.length, val: streams.val.length });
  assert.deepEqual(count, ds.info.docs);
  assert.ok(count.train > 0 && count.val > 0);
}

Deno.test("txt folder, JSONL and gzip'd JSONL give the documents' own tokens", async () => {
  await withDir(async (dir) => {
    const jsonl = docs.map((d) => JSON.stringify({ text: d, meta: { n: 1 } }) + "\n").join("");
    Deno.writeTextFileSync(join(dir, "c.jsonl"), jsonl);
    Deno.writeFileSync(join(dir, "c.jsonl.gz"), await gzip(new TextEncoder().encode(jsonl)));
    Deno.mkdirSync(join(dir, "folder/deeper"), { recursive: true });
    docs.forEach((d, i) => {
      const name = i < 15 ? `a${String(i).padStart(2, "0")}.txt` : `deeper/b${i}.txt`;
      Deno.writeTextFileSync(join(dir, "folder", name), d);
    });
    const cacheDir = join(dir, "cache");
    for (const data of ["c.jsonl", "c.jsonl.gz", "folder"]) {
      using ds = await openCorpus({
        data: join(dir, data),
        tokenizer: llama3,
        valFraction: 0.3,
        seqLen: 8,
        cacheDir,
        progress: false,
      });
      assert.equal(ds.info.dtype, "uint16");
      assert.equal(ds.vocabSize, llama3.vocabSize);
      assertDocuments(ds, llama3, docs);
    }
  });
});

Deno.test("windows are the split's tokens at the drawn starts; validation is spread", async () => {
  await withDir(async (dir) => {
    Deno.writeTextFileSync(join(dir, "c.txt"), words(5, 3000));
    using ds = await openCorpus({
      data: join(dir, "c.txt"),
      tokenizer: new ByteTokenizer(),
      valFraction: 0.1,
      seqLen: 16,
      cacheDir: join(dir, "cache"),
      progress: false,
    });
    // One text file is one document: the tail of its bytes is the validation split.
    assert.equal(ds.info.split, "tokens");
    const bytes = new TextEncoder().encode(words(5, 3000));
    const train = ds.tokens("train"), val = ds.tokens("val");
    assert.equal(val.length, Math.floor(bytes.length * 0.1));
    assert.deepEqual([...train, ...val], [...bytes]);
    const batch = ds.trainBatch(new Rng(3), 2, 16, 3);
    const rng = new Rng(3);
    for (let r = 0; r < 6; r++) {
      const s = rng.int(train.length - 16);
      assert.deepEqual([...batch.subarray(r * 17, r * 17 + 17)], [...train.subarray(s, s + 17)]);
    }
    const v = ds.valBatches(2, 2, 16);
    assert.deepEqual([...v.subarray(0, 17)], [...val.subarray(0, 17)]);
    assert.deepEqual([...v.subarray(3 * 17)], [...val.subarray(val.length - 17)]);
    assert.deepEqual(v, ds.valBatches(2, 2, 16));
    assert.throws(() => ds.trainBatch(new Rng(1), 1, train.length, 1), RangeError);
  });
});

Deno.test("the split is the same whatever the thread count", async () => {
  await withDir(async (dir) => {
    const lines = Array.from({ length: 800 }, (_, i) => JSON.stringify({ text: words(i, 10) }));
    Deno.writeTextFileSync(join(dir, "c.jsonl"), lines.join("\n"));
    const open = (threads: number) =>
      openCorpus({
        data: join(dir, "c.jsonl"),
        tokenizer: llama3,
        valFraction: 0.1,
        seqLen: 8,
        cacheDir: join(dir, `cache${threads}`),
        progress: false,
        threads,
      });
    using one = await open(1);
    using three = await open(3);
    assert.equal(one.info.split, "documents");
    assert.deepEqual(one.tokens("train"), three.tokens("train"));
    assert.deepEqual(one.tokens("val"), three.tokens("val"));
    assert.deepEqual(one.info.docs, three.info.docs);
    assert.ok(one.info.docs.val > 40 && one.info.docs.val < 120, `${one.info.docs.val}`);
  });
});

Deno.test("a second open reuses the cache; a changed input rebuilds it", async () => {
  await withDir(async (dir) => {
    const data = join(dir, "c.jsonl");
    Deno.writeTextFileSync(data, docs.map((d) => JSON.stringify({ text: d })).join("\n"));
    const open = () =>
      openCorpus({
        data,
        tokenizer: llama3,
        valFraction: 0.3,
        seqLen: 8,
        cacheDir: join(dir, "cache"),
        progress: false,
      });
    const first = await open();
    assert.equal(first.cached, false);
    const shard = join(first.info.dir, "train.bin");
    const mtime = Deno.statSync(shard).mtime;
    first[Symbol.dispose]();
    using second = await open();
    assert.equal(second.cached, true);
    assert.equal(second.info.dir, first.info.dir);
    assert.deepEqual(Deno.statSync(shard).mtime, mtime);
    Deno.writeTextFileSync(data, docs.slice(1).map((d) => JSON.stringify({ text: d })).join("\n"));
    using reopened = ShardDataset.open(second.info.dir, 8);
    assert.deepEqual(reopened.tokens("val"), second.tokens("val"));
    assert.throws(
      () => ShardDataset.open(join(dir, "nowhere"), 8),
      (e: Error) => e instanceof UsageError && /not a token shard folder/.test(e.message),
    );
    using third = await open();
    assert.equal(third.cached, false);
    assert.notEqual(third.info.dir, first.info.dir);
    assert.equal(third.info.docs.train + third.info.docs.val, docs.length - 1);
  });
});

Deno.test("bad inputs are one-line UsageErrors naming the file (and the JSONL line)", async () => {
  await withDir(async (dir) => {
    const full = await gzip(new TextEncoder().encode('{"text": "some words"}\n'.repeat(3000)));
    const cases: [string, Uint8Array<ArrayBuffer> | string, RegExp][] = [
      ["a.jsonl", '{"text": "ok"}\n{"text": "ok",\n', /a\.jsonl: line 2: not JSON/],
      ["b.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', /b\.jsonl: line 3: no "text" field/],
      ["c.jsonl.gz", full.subarray(0, full.length >> 1), /c\.jsonl\.gz: gzip stream ends early/],
      ["d.txt", Uint8Array.of(104, 105, 0xc3, 0x28), /d\.txt: not UTF-8 \(byte 2\)/],
      ["e.txt", "", /e\.txt: empty corpus/],
      ["missing.txt", "", /missing\.txt: not found/],
    ];
    for (const [name, content, re] of cases) {
      const path = join(dir, name);
      if (name !== "missing.txt") {
        if (typeof content === "string") Deno.writeTextFileSync(path, content);
        else Deno.writeFileSync(path, content);
      }
      await assert.rejects(
        () =>
          openCorpus({
            data: path,
            tokenizer: new ByteTokenizer(),
            valFraction: 0.1,
            seqLen: 4,
            cacheDir: join(dir, "cache"),
            progress: false,
          }),
        (e: Error) => e instanceof UsageError && re.test(e.message) && !e.message.includes("\n"),
        name,
      );
    }
    // Nothing half-built was left to be reused.
    assert.deepEqual([...Deno.readDirSync(join(dir, "cache"))], []);
    // A corpus too small for one window per split says so.
    Deno.writeTextFileSync(join(dir, "small.txt"), "tiny");
    await assert.rejects(
      () =>
        openCorpus({
          data: join(dir, "small.txt"),
          tokenizer: new ByteTokenizer(),
          valFraction: 0.5,
          seqLen: 4,
          cacheDir: join(dir, "cache"),
          progress: false,
        }),
      (e: Error) => e instanceof UsageError && /each split needs at least 5/.test(e.message),
    );
  });
});

Deno.test("a killed build leaves no cache that is reused", async () => {
  await withDir(async (dir) => {
    const data = join(dir, "big.jsonl");
    const line = (i: number) => JSON.stringify({ text: words(i, 400) }) + "\n";
    const f = Deno.openSync(data, { write: true, create: true });
    const enc = new TextEncoder();
    for (let i = 0; i < 5000; i++) f.writeSync(enc.encode(line(i))); // ~12 MB
    f.close();
    const cacheDir = join(dir, "cache");
    const script = `
      import { openCorpus } from "${new URL("../lib/data.ts", import.meta.url).href}";
      import { openTokenizer } from "${new URL("../lib/tokenizer.ts", import.meta.url).href}";
      const t = setInterval(() => console.log("tick"), 20);
      await openCorpus({ data: ${JSON.stringify(data)}, tokenizer: openTokenizer(${
      JSON.stringify(join(fixtures, "llama3"))
    }), valFraction: 0.1, seqLen: 8, cacheDir: ${
      JSON.stringify(cacheDir)
    }, progress: false, threads: 1 });
      clearInterval(t);
      console.log("done");`;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["eval", script],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    // Kill it once the build is under way (its temporary folder exists).
    const reader = child.stdout.getReader();
    let out = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      out += new TextDecoder().decode(value);
      const building = [...safeReadDir(cacheDir)].some((n) => n.includes(".partial-"));
      if (building || out.includes("done")) break;
    }
    assert.ok(!out.includes("done"), "the build finished before it could be killed");
    child.kill("SIGKILL");
    await child.status;
    reader.releaseLock();
    await child.stdout.cancel();
    const left = [...safeReadDir(cacheDir)];
    assert.ok(left.every((n) => n.includes(".partial-")), `only a temporary folder: ${left}`);
    using ds = await openCorpus({
      data,
      tokenizer: llama3,
      valFraction: 0.1,
      seqLen: 8,
      cacheDir,
      progress: false,
    });
    assert.equal(ds.cached, false);
    assert.equal(ds.info.docs.train + ds.info.docs.val, 5000);
    // The dead build's temporary folder was cleared.
    assert.deepEqual([...safeReadDir(cacheDir)], [ds.info.dir.split("/").pop()]);
  });
});

function* safeReadDir(dir: string): Generator<string> {
  try {
    for (const e of Deno.readDirSync(dir)) yield e.name;
  } catch {
    // not created yet
  }
}

Deno.test("a tokenizer cannot be freed while a build uses it", async () => {
  await withDir(async (dir) => {
    Deno.writeTextFileSync(join(dir, "c.txt"), words(1, 2000));
    const tok = openTokenizer(join(fixtures, "llama2")) as HfTokenizer;
    const building = openCorpus({
      data: join(dir, "c.txt"),
      tokenizer: tok,
      valFraction: 0.1,
      seqLen: 8,
      cacheDir: join(dir, "cache"),
      progress: false,
    });
    assert.throws(() => tok[Symbol.dispose](), /while a shard build uses it/);
    using ds = await building;
    assert.equal(ds.info.bos_id, 1);
    tok[Symbol.dispose]();
    assert.throws(() => tok.encode("x"), /disposed/);
  });
});
