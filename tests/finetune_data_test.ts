import assert from "node:assert/strict";
import { join } from "node:path";
import { UsageError } from "../lib/errors.ts";
import {
  describeFinetuneData,
  evalBatches,
  type FinetuneBatch,
  type FinetuneData,
  FinetuneSampler,
  loadFinetuneData,
  splitFinetuneData,
} from "../lib/finetune_data.ts";
import { Rng } from "../lib/rng.ts";
import { openTokenizer } from "../lib/tokenizer.ts";

// Model folders with tokenizer + chat template (tests/fixtures/chat, made by tools/chat_fixtures.py
// with transformers), and a tokenizer folder without a chat template.
const chat = new URL("./fixtures/chat/", import.meta.url).pathname;
const noTemplate = new URL("./fixtures/tok/llama3", import.meta.url).pathname;
const want = JSON.parse(Deno.readTextFileSync(join(chat, "expected.json")));
const llama3 = openTokenizer(join(chat, "llama3")); // byte-level BPE, BOS 0, EOS <|eot_id|> = 2
const zephyr = openTokenizer(join(chat, "zephyr")); // SentencePiece-style, BOS <s>, EOS </s>

const tmp = Deno.makeTempDirSync({ prefix: "ftdata" });
let fileNo = 0;
function jsonl(lines: unknown[]): string {
  const p = join(tmp, `d${fileNo++}.jsonl`);
  Deno.writeTextFileSync(
    p,
    lines.map((l) => typeof l === "string" ? l : JSON.stringify(l)).join("\n") + "\n",
  );
  return p;
}

/** Runs of consecutive loss tokens, decoded. */
function lossRuns(tok: typeof llama3, tokens: Int32Array, mask: Uint8Array): string[] {
  const runs: string[] = [];
  let cur: number[] = [];
  for (let i = 0; i <= mask.length; i++) {
    if (i < mask.length && mask[i]) cur.push(tokens[i]);
    else if (cur.length) {
      runs.push(tok.decode(cur));
      cur = [];
    }
  }
  return runs;
}

function sum(a: Uint8Array, from = 0): number {
  let s = 0;
  for (let i = from; i < a.length; i++) s += a[i];
  return s;
}

Deno.test("prompt/completion: loss on exactly the completion tokens and the EOS", async () => {
  const prompt = "Q: capital of France?\nA:";
  const completion = " Paris.";
  const p = jsonl([
    { prompt, completion },
    { prompt: "Hello wor", completion: "ld" }, // the boundary falls inside the token " world"
  ]);
  const data = await loadFinetuneData(p, llama3, { seqLen: 64 });
  assert.equal(data.kind, "prompt");
  const full = llama3.encode(prompt + completion);
  const pre = llama3.encode(prompt);
  assert.equal(pre[0], llama3.bosId); // BOS as the tokenizer adds it
  assert.deepEqual([...full.subarray(0, pre.length)], [...pre]);
  const ex = data.examples[0];
  assert.deepEqual([...ex.tokens], [...full, llama3.eosId!]);
  // Exactly the completion's tokens + EOS carry loss, nothing of the prompt.
  assert.equal(sum(ex.mask), full.length - pre.length + 1);
  assert.equal(sum(ex.mask.subarray(0, pre.length)), 0);
  assert.deepEqual(lossRuns(llama3, ex.tokens, ex.mask), [" Paris.<|eot_id|>"]);
  // " world" straddles the boundary: it belongs to the completion (with the EOS: 2 targets).
  const ex2 = data.examples[1];
  assert.deepEqual(lossRuns(llama3, ex2.tokens, ex2.mask), [" world<|eot_id|>"]);
  assert.equal(sum(ex2.mask), 2);
  assert.deepEqual(data.counts, {
    lines: 2,
    examples: 2,
    truncated: 0,
    refused: 0,
    tokens: ex.tokens.length + ex2.tokens.length,
    lossTokens: full.length - pre.length + 1 + 2,
  });
  // addEos false: no EOS appended, so only the completion's tokens.
  const noEos = await loadFinetuneData(p, llama3, { seqLen: 64, addEos: false });
  assert.equal(sum(noEos.examples[0].mask), full.length - pre.length);
  assert.deepEqual([...noEos.examples[0].tokens], [...full]);
});

Deno.test("messages: the ids are transformers' and loss is on exactly the assistant turns", async () => {
  const conv = want.conversations.multi;
  for (const [folder, tok] of [["llama3", llama3], ["zephyr", zephyr]] as const) {
    const p = jsonl([{ messages: conv }, { messages: want.conversations.single }]);
    const data = await loadFinetuneData(p, tok, { seqLen: 512 });
    assert.equal(data.kind, "messages");
    const ex = data.examples[0];
    assert.deepEqual([...ex.tokens], want.renders[folder].multi.ids, folder);
    const runs = lossRuns(tok, ex.tokens, ex.mask);
    if (folder === "llama3") {
      // The assistant headers carry no loss; each answer's <|eot_id|> does.
      assert.deepEqual(runs, ["Blue.<|eot_id|>", "Pear<|eot_id|>"]);
      assert.deepEqual(lossRuns(tok, data.examples[1].tokens, data.examples[1].mask), [
        "2 + 2 = 4.<|eot_id|>",
      ]);
    } else {
      // Zephyr: "<|assistant|>\n" is the prompt; the turn is content + "</s>" + "\n".
      assert.deepEqual(runs.map((r) => r.replace(/\s+/g, "")), ["Blue.</s>", "Pear</s>"]);
      assert.ok(!runs.join("").includes("<|assistant|>"));
    }
    assert.equal(data.counts.lossTokens, sum(ex.mask) + sum(data.examples[1].mask));
  }
  // The Llama-2 template (named list form, chosen by modelDir) gives transformers' ids too.
  const p2 = jsonl([{ messages: conv }]);
  const l2 = openTokenizer(join(chat, "llama2"));
  const d2 = await loadFinetuneData(p2, l2, { seqLen: 512, modelDir: join(chat, "llama2") });
  assert.deepEqual([...d2.examples[0].tokens], want.renders.llama2.multi.ids);
  assert.deepEqual(
    lossRuns(l2, d2.examples[0].tokens, d2.examples[0].mask).map((r) => r.replace(/\s+/g, "")),
    ["Blue.</s>", "Pear</s>"],
  );
});

Deno.test("too long: truncated from the left keeping the whole answer, or refused; counts exact", async () => {
  const prompt = "Context: " + "the quick brown fox jumps over the lazy dog. ".repeat(8) +
    "\nQ: why?\nA:";
  const completion = " Because it can.";
  const tooLongAnswer = " " + "very ".repeat(40) + "long.";
  const p = jsonl([
    { prompt, completion },
    { prompt: "Hi", completion: " there" },
    { prompt: "Q", completion: tooLongAnswer },
  ]);
  const seqLen = 24;
  const full = [...llama3.encode(prompt + completion), llama3.eosId!];
  const nAnswer = full.length - llama3.encode(prompt).length;
  assert.ok(full.length > seqLen + 1 && nAnswer < seqLen);
  const data = await loadFinetuneData(p, llama3, { seqLen });
  assert.equal(data.counts.lines, 3);
  assert.equal(data.counts.truncated, 1);
  assert.equal(data.counts.refused, 1); // the answer alone does not fit
  assert.equal(data.counts.examples, 2);
  const ex = data.examples[0];
  assert.equal(ex.tokens.length, seqLen + 1);
  assert.equal(ex.tokens[0], llama3.bosId); // BOS kept
  // The rest is the tail of the full example: the prompt lost its beginning, the answer is whole.
  assert.deepEqual([...ex.tokens.subarray(1)], full.slice(full.length - seqLen));
  assert.equal(sum(ex.mask), nAnswer);
  assert.deepEqual(lossRuns(llama3, ex.tokens, ex.mask), [completion + "<|eot_id|>"]);
  assert.equal(data.counts.lossTokens, nAnswer + sum(data.examples[1].mask));

  // "refuse" skips every too-long example.
  assert.equal(
    describeFinetuneData(data),
    `${p} (prompt): 3 lines, 2 examples (1 truncated from the left, 1 refused), ` +
      `${data.counts.tokens} tokens, ${data.counts.lossTokens} carrying loss`,
  );
  const refused = await loadFinetuneData(p, llama3, { seqLen, tooLong: "refuse" });
  assert.deepEqual([refused.counts.examples, refused.counts.truncated, refused.counts.refused], [
    1,
    0,
    2,
  ]);

  // Messages: the first turns are cut, the last assistant turn stays whole.
  const conv = want.conversations.multi;
  const mp = jsonl([{ messages: conv }]);
  const whole = want.renders.llama3.multi.ids as number[];
  const m = await loadFinetuneData(mp, llama3, { seqLen: 40 });
  assert.equal(m.counts.truncated, 1);
  const mex = m.examples[0];
  assert.equal(mex.tokens[0], llama3.bosId);
  assert.deepEqual([...mex.tokens.subarray(1)], whole.slice(whole.length - 40));
  assert.deepEqual(lossRuns(llama3, mex.tokens, mex.mask), ["Pear<|eot_id|>"]);
  // Too short even for the last answer: refused, and no example left is a one-line error.
  await assert.rejects(loadFinetuneData(mp, llama3, { seqLen: 2 }), (e: unknown) => {
    assert.ok(e instanceof UsageError);
    assert.match(e.message, /no example left: 1 of 1 refused/);
    return true;
  });
});

Deno.test("text: every token carries loss; long texts become overlapping windows", async () => {
  const text = "Sing, O goddess, the anger of Achilles son of Peleus. ".repeat(6);
  const p = jsonl([{ text }, { text: "short" }]);
  const seqLen = 16;
  const ids = [...llama3.encode(text), llama3.eosId!];
  const data = await loadFinetuneData(p, llama3, { seqLen });
  assert.equal(data.kind, "text");
  const windows = Math.ceil((ids.length - 1) / seqLen);
  assert.equal(data.counts.examples, windows + 1);
  assert.equal(data.counts.refused, 0);
  assert.equal(data.counts.truncated, 0);
  // Windows of seqLen + 1 overlap by one token: each target appears exactly once.
  const rebuilt: number[] = [...data.examples[0].tokens];
  for (let w = 0; w < windows; w++) {
    const ex = data.examples[w];
    assert.ok(ex.tokens.length <= seqLen + 1);
    assert.equal(sum(ex.mask), ex.tokens.length - 1);
    if (w > 0) {
      assert.equal(ex.tokens[0], rebuilt[rebuilt.length - 1]);
      rebuilt.push(...ex.tokens.subarray(1));
    }
  }
  assert.deepEqual(rebuilt, ids);
  const short = llama3.encode("short").length + 1;
  assert.equal(data.counts.lossTokens, ids.length - 1 + short - 1);
  assert.equal(data.counts.tokens, ids.length + windows - 1 + short);
});

Deno.test("bad inputs are one-line UsageErrors naming the file, the line and the allowed forms", async () => {
  const bad = async (lines: unknown[] | null, re: RegExp, tok = llama3) => {
    const p = lines === null ? join(tmp, "missing.jsonl") : jsonl(lines);
    await assert.rejects(loadFinetuneData(p, tok, { seqLen: 64 }), (e: unknown) => {
      assert.ok(e instanceof UsageError, String(e));
      assert.doesNotMatch(e.message, /\n/);
      assert.ok(e.message.startsWith(p), e.message);
      assert.match(e.message, re);
      return true;
    });
  };
  const forms = /"text", or "prompt" and "completion".*"messages"/;
  await bad([{ text: "a" }, { question: "q", answer: "a" }], /:2: no "text".*"question", "answer"/);
  await bad([{ text: "a" }, { question: "q" }], forms);
  await bad(
    [{ prompt: "a", completion: "b" }, { text: "c" }],
    /:2: a text line in a prompt file \(line 1 is prompt\)/,
  );
  await bad([{ text: "a" }, "", "{bad json"], /:3: not valid JSON/);
  await bad(["{bad json"], forms);
  await bad([{ prompt: "a" }], /:1: "prompt" and "completion" must both be strings/);
  await bad([{ text: 5 }], /:1: "text" must be a string/);
  await bad(["[1, 2]"], /:1: not a JSON object/);
  await bad([{ messages: [] }], /:1: "messages" must be a non-empty list/);
  await bad(
    [{ messages: [{ role: "user" }] }],
    /:1: messages\[0\] must be \{"role": string, "content": string\}/,
  );
  await bad([{ messages: [{ role: "user", content: "x" }] }], /:1: no "assistant" message/);
  // The Llama-2 template refuses roles that do not alternate: its message, with the line.
  await bad(
    [{
      messages: [{ role: "user", content: "a" }, { role: "user", content: "b" }, {
        role: "assistant",
        content: "c",
      }],
    }],
    /:1: chat template: Conversation roles must alternate/,
    openTokenizer(join(chat, "llama2")),
  );
  await bad([], /: empty file/);
  await bad(["", "  "], /: empty file/);
  await bad(null, /: no such file/);
  // Messages with a tokenizer folder that has no chat template.
  await bad(
    [{ messages: [{ role: "user", content: "a" }, { role: "assistant", content: "b" }] }],
    /:1: .*tok\/llama3 has no chat template .*messages data needs/,
    openTokenizer(noTemplate),
  );
  // Messages with the byte tokenizer: no model folder to take a template from.
  await bad(
    [{ messages: [{ role: "user", content: "a" }, { role: "assistant", content: "b" }] }],
    /:1: messages need a chat template, but the bytes tokenizer/,
    openTokenizer(null),
  );
});

Deno.test("CRLF lines, a UTF-8 BOM and blank lines are fine; bytes that are not UTF-8 are not", async () => {
  const p = join(tmp, "crlf.jsonl");
  Deno.writeTextFileSync(p, '\uFEFF{"text": "one"}\r\n\r\n{"text": "two"}\r\n');
  const data = await loadFinetuneData(p, llama3, { seqLen: 32 });
  assert.equal(data.counts.lines, 2);
  assert.deepEqual([...data.examples[1].tokens], [...llama3.encode("two"), llama3.eosId!]);
  const q = join(tmp, "latin1.jsonl");
  Deno.writeFileSync(q, new Uint8Array([0x7b, 0x22, 0x74, 0x22, 0x3a, 0x22, 0xe9, 0x22, 0x7d]));
  await assert.rejects(
    loadFinetuneData(q, llama3, { seqLen: 32 }),
    /latin1\.jsonl: not UTF-8 text/,
  );
});

Deno.test("fingerprint: same file, tokenizer and options give the same one; any change another", async () => {
  const lines = [{ prompt: "a", completion: "b" }];
  const p = jsonl(lines);
  const fp = (await loadFinetuneData(p, llama3, { seqLen: 64 })).fingerprint;
  assert.match(fp, /^[0-9a-f]{64}$/);
  assert.equal((await loadFinetuneData(jsonl(lines), llama3, { seqLen: 64 })).fingerprint, fp);
  assert.notEqual((await loadFinetuneData(p, llama3, { seqLen: 65 })).fingerprint, fp);
  assert.notEqual(
    (await loadFinetuneData(p, llama3, { seqLen: 64, tooLong: "refuse" })).fingerprint,
    fp,
  );
  assert.notEqual((await loadFinetuneData(p, zephyr, { seqLen: 64 })).fingerprint, fp);
  assert.notEqual(
    (await loadFinetuneData(jsonl([{ prompt: "a", completion: "c" }]), llama3, { seqLen: 64 }))
      .fingerprint,
    fp,
  );
});

/** In-memory data: example i has a unique first token 1000 + i and length lengths[i]. */
function synthetic(lengths: number[], seqLen: number): FinetuneData {
  const examples = lengths.map((n, i) => {
    const tokens = new Int32Array(n);
    tokens[0] = 1000 + i;
    for (let j = 1; j < n; j++) tokens[j] = 1 + ((i + j) % 50);
    const mask = new Uint8Array(n).fill(1);
    mask[0] = 0;
    return { tokens, mask };
  });
  let tokens = 0;
  let lossTokens = 0;
  for (const e of examples) {
    tokens += e.tokens.length;
    lossTokens += e.tokens.length - 1;
  }
  void seqLen;
  return {
    path: "mem.jsonl",
    kind: "text",
    examples,
    counts: {
      lines: lengths.length,
      examples: lengths.length,
      truncated: 0,
      refused: 0,
      tokens,
      lossTokens,
    },
    fingerprint: "f".repeat(64),
    padId: 7,
  };
}

function randomLengths(n: number, max: number, seed: number): number[] {
  const rng = new Rng(seed);
  return Array.from({ length: n }, () => 2 + rng.int(max - 1));
}

/** Checks the layout of a batch and returns the example ids of its rows (-1 = padding row). */
function rowsOf(data: FinetuneData, b: FinetuneBatch, rows: number, seqLen: number): number[] {
  const w = b.t + 1;
  assert.equal(b.tokens.length, rows * w);
  assert.equal(b.mask.length, rows * w);
  assert.ok(b.t >= 1 && b.t <= seqLen && (b.t % 8 === 0 || b.t === seqLen));
  let count = 0;
  let longest = 0;
  const ids: number[] = [];
  for (let r = 0; r < rows; r++) {
    assert.equal(b.mask[r * w], 0);
    const first = b.tokens[r * w];
    if (first < 1000) {
      ids.push(-1);
      assert.equal(sum(b.mask.subarray(r * w, (r + 1) * w)), 0);
      continue;
    }
    const ex = data.examples[first - 1000];
    ids.push(first - 1000);
    longest = Math.max(longest, ex.tokens.length - 1);
    assert.deepEqual([...b.tokens.subarray(r * w, r * w + ex.tokens.length)], [...ex.tokens]);
    for (let i = r * w + ex.tokens.length; i < (r + 1) * w; i++) {
      assert.equal(b.tokens[i], data.padId);
      assert.equal(b.mask[i], 0);
    }
    count += sum(b.mask.subarray(r * w + 1, (r + 1) * w));
  }
  assert.equal(b.count, count);
  assert.equal(b.t, Math.min(seqLen, Math.ceil(longest / 8) * 8));
  return ids;
}

Deno.test("sampler: deterministic, every example once per epoch, reshuffled each epoch", () => {
  const seqLen = 64;
  const data = synthetic(randomLengths(203, seqLen + 1, 1), seqLen);
  const opts = { batch: 4, micro: 2, seqLen, seed: 11 };
  const a = new FinetuneSampler(data, opts);
  const b = new FinetuneSampler(data, opts);
  const c = new FinetuneSampler(data, { ...opts, seed: 12 });
  const perEpoch = Math.ceil(203 / 8);
  assert.equal(a.updatesPerEpoch, perEpoch);
  const epochs: number[][] = [];
  let differs = false;
  for (let e = 0; e < 2; e++) {
    const seen: number[] = [];
    for (let s = 0; s < perEpoch; s++) {
      const x = a.next();
      assert.equal(a.epoch, e);
      const y = b.next();
      assert.deepEqual(x, y);
      const z = c.next();
      if (z.tokens.length !== x.tokens.length || z.tokens.some((v, i) => v !== x.tokens[i])) {
        differs = true;
      }
      seen.push(...rowsOf(data, x, 8, seqLen).filter((i) => i >= 0));
    }
    assert.deepEqual([...seen].sort((p, q) => p - q), Array.from({ length: 203 }, (_, i) => i));
    epochs.push(seen);
  }
  assert.ok(differs, "another seed gives other batches");
  assert.notDeepEqual(epochs[0], epochs[1], "epochs are reshuffled");
  a.next();
  assert.equal(a.epoch, 2);
});

Deno.test("sampler: state()/restore() continue exactly, across epochs and through JSON", () => {
  const seqLen = 32;
  const data = synthetic(randomLengths(50, seqLen + 1, 2), seqLen);
  const opts = { batch: 3, micro: 2, seqLen, seed: 5 };
  for (const k of [0, 4, 9, 23]) { // 9 updates per epoch: 9 is an epoch boundary
    const a = new FinetuneSampler(data, opts);
    for (let i = 0; i < k; i++) a.next();
    const saved = JSON.parse(JSON.stringify(a.state()));
    const b = FinetuneSampler.restore(data, opts, saved);
    assert.equal(b.epoch, a.epoch);
    for (let i = 0; i < 20; i++) assert.deepEqual(b.next(), a.next(), `after ${k}, batch ${i}`);
  }
  const s = new FinetuneSampler(data, opts).state();
  const oneLine = (f: () => unknown, re: RegExp) =>
    assert.throws(
      f,
      (e: unknown) => e instanceof UsageError && re.test(e.message) && !e.message.includes("\n"),
    );
  oneLine(
    () => FinetuneSampler.restore({ ...data, fingerprint: "0".repeat(64) }, opts, s),
    /not the data of the checkpoint/,
  );
  oneLine(
    () => FinetuneSampler.restore(data, { ...opts, batch: 4 }, s),
    /batch 4 differs from the checkpoint's 3/,
  );
  oneLine(() => FinetuneSampler.restore(data, opts, { ...s, rng: [0, 0, 0, 0] }), /sampler state/);
  oneLine(
    () => FinetuneSampler.restore(data, opts, { ...s, step: 99 }),
    /beyond the epoch's 9 updates/,
  );
  oneLine(() => new FinetuneSampler(data, { ...opts, seqLen: 8 }), /more than seqLen 8 \+ 1/);
  oneLine(
    () => new FinetuneSampler(data, { ...opts, micro: 0 }),
    /micro 0: must be an integer >= 1/,
  );
});

Deno.test("sampler: grouping by length pads far less than random batches", () => {
  const seqLen = 256;
  const data = synthetic(randomLengths(800, seqLen + 1, 3), seqLen);
  const rows = 8;
  const sampler = new FinetuneSampler(data, { batch: 4, micro: 2, seqLen, seed: 1 });
  let slots = 0;
  let real = 0;
  for (let i = 0; i < sampler.updatesPerEpoch; i++) {
    const b = sampler.next();
    slots += rows * b.t;
    real += b.count;
  }
  assert.equal(real, data.counts.lossTokens);
  // Random batches of the same size (a seeded shuffle, no sorting), t rounded the same way.
  const rng = new Rng(1);
  const order = Array.from({ length: 800 }, (_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  let randomSlots = 0;
  for (let i = 0; i < order.length; i += rows) {
    const longest = Math.max(
      ...order.slice(i, i + rows).map((k) => data.examples[k].tokens.length - 1),
    );
    randomSlots += rows * Math.min(seqLen, Math.ceil(longest / 8) * 8);
  }
  const grouped = 1 - real / slots;
  const random = 1 - real / randomSlots;
  // Uniform lengths 1..256 targets: random batches of 8 are 44.6% padding, grouped
  // ones 4.5% (most of it the rounding of t up to a multiple of 8).
  assert.ok(random > 0.35, `random padding ${random}`);
  assert.ok(grouped < 0.06 && grouped < random / 8, `grouped padding ${grouped}`);
});

Deno.test("evalBatches: every example exactly once, micro = 1, the last batch padded with empty rows", () => {
  const seqLen = 40;
  const data = synthetic(randomLengths(37, seqLen + 1, 4), seqLen);
  const batches = evalBatches(data, 5, seqLen);
  assert.equal(batches.length, 8);
  const seen: number[] = [];
  let count = 0;
  for (const b of batches) {
    seen.push(...rowsOf(data, b, 5, seqLen));
    count += b.count;
  }
  assert.deepEqual(seen.filter((i) => i < 0).length, 3);
  assert.deepEqual(
    seen.filter((i) => i >= 0).sort((p, q) => p - q),
    Array.from({ length: 37 }, (_, i) => i),
  );
  assert.equal(count, data.counts.lossTokens);
  // Sorted by length, so t never decreases.
  for (let i = 1; i < batches.length; i++) assert.ok(batches[i].t >= batches[i - 1].t);
});

Deno.test("splitFinetuneData: disjoint, complete, seeded; counts of each part", async () => {
  const data = synthetic(randomLengths(40, 20, 5), 19);
  const { train, val } = splitFinetuneData(data, 0.25, 3);
  assert.equal(val.examples.length, 10);
  assert.equal(train.examples.length, 30);
  const ids = (d: FinetuneData) => d.examples.map((e) => e.tokens[0] - 1000);
  assert.deepEqual(
    [...ids(train), ...ids(val)].sort((a, b) => a - b),
    Array.from({ length: 40 }, (_, i) => i),
  );
  assert.deepEqual(ids(splitFinetuneData(data, 0.25, 3).val), ids(val));
  assert.notDeepEqual(ids(splitFinetuneData(data, 0.25, 4).val), ids(val));
  assert.equal(train.counts.lossTokens + val.counts.lossTokens, data.counts.lossTokens);
  assert.equal(val.counts.examples, 10);
  assert.notEqual(train.fingerprint, val.fingerprint);
  assert.throws(() => splitFinetuneData(data, 1, 3), UsageError);
  assert.throws(() => splitFinetuneData(synthetic([3], 4), 0.5, 3), UsageError);
  // A loaded file splits the same way.
  const p = jsonl(Array.from({ length: 6 }, (_, i) => ({ prompt: `q${i}`, completion: ` a${i}` })));
  const loaded = await loadFinetuneData(p, llama3, { seqLen: 32 });
  const parts = splitFinetuneData(loaded, 0.5, 1);
  assert.equal(parts.val.examples.length + parts.train.examples.length, 6);
});

Deno.test("cleanup", () => {
  Deno.removeSync(tmp, { recursive: true });
});
