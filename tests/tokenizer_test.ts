import assert from "node:assert/strict";
import { join } from "node:path";
import { UsageError } from "../lib/errors.ts";
import { ByteTokenizer, openTokenizer, trainTokenizer } from "../lib/tokenizer.ts";

const fixtures = new URL("./fixtures/tok/", import.meta.url).pathname;
const want = JSON.parse(Deno.readTextFileSync(join(fixtures, "ids.json")));
const text: string = want.text;

for (const name of ["llama2", "llama3"]) {
  Deno.test(`${name}-style tokenizer gives Python's ids and decodes as Python does`, () => {
    const w = want[name];
    const tok = openTokenizer(join(fixtures, name));
    assert.equal(tok.kind, "hf");
    assert.equal(tok.vocabSize, w.vocab_size);
    assert.equal(tok.bosId, w.bos_id);
    assert.equal(tok.eosId, w.eos_id);
    const plain = tok.encode(text, { addSpecial: false });
    const special = tok.encode(text);
    assert.deepEqual([...plain], w.ids);
    assert.deepEqual([...special], w.ids_special);
    assert.equal(special[0], tok.bosId);
    assert.equal(tok.decode(plain, { skipSpecial: true }), w.decoded);
    assert.equal(tok.decode(special), w.decoded_special);
    assert.equal(tok.decode(special, { skipSpecial: true }), w.decoded_skip);
    // The text without special-token strings round-trips exactly.
    const clean = "Ünïcödé 中文 👋\n\tx  y\n\n";
    assert.equal(tok.decode(tok.encode(clean, { addSpecial: false })), clean);
    assert.throws(() => tok.decode([tok.vocabSize]), RangeError);
    const files = tok.sourceFiles().map((f) => f.split("/").pop()).sort();
    assert.deepEqual(files, ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]);
  });
}

Deno.test("llama3-style tokenizer reports every EOS of the model folder", () => {
  const tok = openTokenizer(join(fixtures, "llama3"));
  const eot = tok.encode("<|eot_id|>", { addSpecial: false })[0];
  const end = tok.encode("<|end_of_text|>", { addSpecial: false })[0];
  assert.equal(tok.eosId, eot);
  assert.deepEqual(tok.eosIds, [eot, end]);
});

Deno.test("openTokenizer(null) is the byte tokenizer; a missing one is a one-line UsageError", () => {
  const bytes = openTokenizer(null);
  assert.ok(bytes instanceof ByteTokenizer);
  assert.equal(bytes.kind, "bytes");
  assert.deepEqual([bytes.bosId, bytes.eosId, bytes.eosIds, bytes.sourceFiles()], [
    null,
    null,
    [],
    [],
  ]);
  assert.throws(
    () => openTokenizer("/no/such/model"),
    (e: Error) => e instanceof UsageError && /\/no\/such\/model: not found/.test(e.message),
  );
  const dir = Deno.makeTempDirSync();
  try {
    assert.throws(
      () => openTokenizer(dir),
      (e: Error) => e instanceof UsageError && /no tokenizer\.json/.test(e.message),
    );
    Deno.writeTextFileSync(join(dir, "tokenizer.json"), "{ not json");
    assert.throws(
      () => openTokenizer(dir),
      (e: Error) =>
        e instanceof UsageError && /not a Hugging Face tokenizer\.json/.test(e.message) &&
        !e.message.includes("\n"),
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("the byte tokenizer saved as tokenizer.json gives the same ids", () => {
  const dir = Deno.makeTempDirSync();
  try {
    new ByteTokenizer().save(dir);
    const tok = openTokenizer(dir);
    assert.equal(tok.vocabSize, 256);
    assert.equal(tok.bosId, null);
    assert.deepEqual([...tok.encode(text)], [...new ByteTokenizer().encode(text)]);
    assert.equal(tok.decode(tok.encode(text)), text);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

/** Deterministic words from 16 syllables (a few thousand distinct words). */
function words(seed: number, n: number): string {
  const syl = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fi", "gu", "ha"];
  let x = seed >>> 0;
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    let w = "";
    for (let j = 0; j < 1 + (x >>> 29) % 3; j++) w += syl[(x >>> (4 * j + 3)) % syl.length];
    out.push(w + (i % 11 === 10 ? ".\n" : " "));
  }
  return out.join("");
}

Deno.test("a trained tokenizer has the asked vocabulary, round-trips and saves", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const corpus = join(dir, "c.jsonl");
    Deno.writeTextFileSync(
      corpus,
      Array.from({ length: 300 }, (_, i) => JSON.stringify({ body: words(i, 100) }) + "\n").join(
        "",
      ),
    );
    const out = join(dir, "tok");
    const tok = await trainTokenizer({ inputs: [corpus], vocabSize: 400, textField: "body", out });
    assert.equal(tok.vocabSize, 400);
    assert.equal(tok.encode("<|begin_of_text|>", { addSpecial: false })[0], tok.bosId);
    assert.equal(tok.encode("<|end_of_text|>", { addSpecial: false })[0], tok.eosId);
    const sample = "kalo mine. Anything: 中文 👋\t  spaces\n";
    const ids = tok.encode(sample);
    assert.equal(ids[0], tok.bosId);
    assert.equal(tok.decode(ids, { skipSpecial: true }), sample);
    const trainText = words(7, 100);
    assert.ok(tok.encode(trainText, { addSpecial: false }).length * 2 < trainText.length);
    const copy = join(dir, "copy");
    tok.save(copy);
    assert.deepEqual([...openTokenizer(copy).encode(sample)], [...ids]);
    await assert.rejects(
      () => trainTokenizer({ inputs: [corpus], vocabSize: 100, out }),
      (e: Error) => e instanceof UsageError && /vocab_size 100/.test(e.message),
    );
    await assert.rejects(
      () => trainTokenizer({ inputs: [corpus], vocabSize: 400, out: join(dir, "tok2") }),
      (e: Error) => e instanceof UsageError && /line 1: no "text" field/.test(e.message),
    );
    // A folder holding files is never trained into or saved over; nothing in it changes.
    const before = Deno.readFileSync(join(out, "tokenizer.json"));
    await assert.rejects(
      () => trainTokenizer({ inputs: [corpus], vocabSize: 400, textField: "body", out }),
      (e: Error) =>
        e instanceof UsageError &&
        e.message ===
          `${out}: folder is not empty; tokenizer training writes only into a new or empty folder`,
    );
    assert.throws(
      () => tok.save(copy),
      (e: Error) => e instanceof UsageError && /copy: folder is not empty/.test(e.message),
    );
    assert.deepEqual(Deno.readFileSync(join(out, "tokenizer.json")), before);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
