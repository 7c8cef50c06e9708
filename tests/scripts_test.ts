/**
 * examples/evaluate.ts and examples/generate.ts as a user runs them: on a Hugging Face folder
 * and on a qgalore checkpoint, `--json` outputs equal to the library's answers, and bad flags
 * as one `error:` line.
 */
import assert from "node:assert/strict";
import { evaluatePerplexity } from "../lib/evaluate.ts";
import { generateIds } from "../lib/generate.ts";
import { openModel, saveCheckpoint } from "../lib/open_model.ts";
import { lastLine, runScript } from "./run_script.ts";

const FIX = new URL("./fixtures/hf/", import.meta.url).pathname;
const MODEL = `${FIX}gqa-tied-theta5e5`;
const TEXT = `${FIX}multilingual.txt`;
const MC = new URL("./fixtures/mmlu/test/toy_science_test.csv", import.meta.url).pathname;

const run = runScript;
const last = lastLine;

Deno.test("evaluate.ts --json: the library's perplexity, on a folder and on a checkpoint", async () => {
  const r = await run("evaluate", ["--model", MODEL, "--data", TEXT, "--seq-len", "32", "--json"]);
  assert.equal(r.code, 0, r.err);
  const got = JSON.parse(last(r.out));
  assert.deepEqual(Object.keys(got).sort(), ["loss", "ppl", "tokens", "windows"]);
  using m = await openModel({ model: MODEL, seqLen: 32 });
  const ids = m.tokenizer.encode(Deno.readTextFileSync(TEXT));
  const want = await evaluatePerplexity(m.engine, ids, 32);
  assert.deepEqual(got, want);
  assert.equal(want.windows, Math.floor(ids.length / 33));
  assert.equal(want.tokens, want.windows * 32);
  // the same weights as a qgalore checkpoint (engine state + config beside it)
  const dir = await Deno.makeTempDir();
  try {
    await saveCheckpoint(m.engine, `${dir}/ckpt`, MODEL);
    const c = await run("evaluate", [
      "--model",
      `${dir}/ckpt`,
      "--data",
      TEXT,
      "--seq-len",
      "32",
      "--json",
    ]);
    assert.equal(c.code, 0, c.err);
    assert.deepEqual(JSON.parse(last(c.out)), want);
    // a run folder: its newest checkpoint that reads back (a damaged newer one is passed over)
    Deno.mkdirSync(`${dir}/run/checkpoints`, { recursive: true });
    Deno.copyFileSync(`${dir}/ckpt`, `${dir}/run/checkpoints/step-00000001.safetensors`);
    Deno.writeTextFileSync(`${dir}/run/checkpoints/step-00000002.safetensors`, "torn");
    const f = await run("evaluate", [
      "--model",
      `${dir}/run`,
      "--data",
      TEXT,
      "--seq-len",
      "32",
      "--json",
    ]);
    assert.equal(f.code, 0, f.err);
    assert.deepEqual(JSON.parse(last(f.out)), want);
    // five windows per engine batch (the last one filled with windows that carry no loss)
    const b = await run("evaluate", [
      "--model",
      MODEL,
      "--data",
      TEXT,
      "--seq-len",
      "32",
      "--batch-size",
      "5",
      "--json",
    ]);
    assert.equal(b.code, 0, b.err);
    const got3 = JSON.parse(last(b.out));
    assert.equal(want.windows % 5 === 0, false, "the test wants a short last batch");
    assert.equal(got3.windows, want.windows);
    assert.equal(got3.tokens, want.tokens);
    assert.ok(Math.abs(got3.loss - want.loss) < 1e-5, `${got3.loss} vs ${want.loss}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("generate.ts --json: greedy equals the library's; sampling is reproducible", async () => {
  const args = ["--model", MODEL, "--prompt", "ROMEO:", "--max-new-tokens", "12", "--json"];
  const r = await run("generate", args);
  assert.equal(r.code, 0, r.err);
  const got = JSON.parse(last(r.out));
  assert.deepEqual(Object.keys(got).sort(), ["ids", "prompt_ids", "text"]);
  using m = await openModel({ model: MODEL, seqLen: 1 });
  const prompt = m.tokenizer.encode("ROMEO:");
  assert.deepEqual(got.prompt_ids, Array.from(prompt));
  assert.equal(got.prompt_ids[0], 598); // the tokenizer's BOS
  const want = await generateIds(m.engine, prompt, {
    maxNewTokens: 12,
    eosIds: m.tokenizer.eosIds,
  });
  assert.deepEqual(got.ids, want.ids);
  assert.equal(got.text, m.tokenizer.decode(want.ids, { skipSpecial: true }));
  const uncached = await run("generate", [...args, "--cache", "off"]);
  assert.deepEqual(JSON.parse(last(uncached.out)).ids, got.ids);
  const sample = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "7"];
  const s1 = JSON.parse(last((await run("generate", [...args, ...sample])).out));
  const s2 = JSON.parse(last((await run("generate", [...args, ...sample])).out));
  assert.deepEqual(s1.ids, s2.ids);
  assert.notDeepEqual(s1.ids, got.ids);
});

Deno.test("evaluate.ts and generate.ts: bad input is one error line", async () => {
  const cases: [string, string[], RegExp][] = [
    ["evaluate", ["--data", TEXT, "--seq-len", "8"], /--model: required/],
    ["evaluate", ["--model", MODEL, "--seq-len", "8"], /nothing to evaluate: give --data/],
    [
      "evaluate",
      ["--model", MODEL, "--data", TEXT, "--seq-len", "8", "--shots", "2"],
      /--shots: applies to --mc only/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--mc", MC, "--seq-len", "8", "--shots", "2"],
      /--shots 2: needs --shots-file/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--mc", MC, "--seq-len", "8", "--shots-file", MC],
      /--shots-file: give --shots K/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--mc", MC, "--seq-len", "8", "--mc-score", "prob"],
      /--mc-score prob: must be one of letter, text/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--mc", `${MC},/nonexistent.csv`, "--seq-len", "8"],
      /--mc \/nonexistent\.csv: file not found/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--mc", MC, "--mc", TEXT, "--seq-len", "8"],
      /--mc .*multilingual\.txt: unknown multiple-choice format/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--data", TEXT, "--seq-len", "8", "--batch-size", "0"],
      /--batch-size 0: must be an integer in \[1, 4096\]/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--data", TEXT, "--seq-len", "0"],
      /--seq-len 0: must be an integer ≥ 1/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--data", TEXT, "--seq-len", "999"],
      /--seq-len 999: must be ≤ 256/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--data", "/nonexistent", "--seq-len", "8"],
      /--data \/nonexistent: file not found/,
    ],
    [
      "evaluate",
      ["--model", "/nonexistent", "--data", TEXT, "--seq-len", "8"],
      /--model \/nonexistent: not found/,
    ],
    [
      "evaluate",
      ["--model", TEXT, "--data", TEXT, "--seq-len", "8"],
      /not a Hugging Face folder or a qgalore checkpoint/,
    ],
    [
      "evaluate",
      ["--model", MODEL, "--data", TEXT, "--seq-len", "8", "--device", "tpu"],
      /--device tpu: must be one of cpu, cuda, auto/,
    ],
    [
      "generate",
      ["--model", MODEL, "--prompt", "x", "--max-new-tokens", "1e9"],
      /--max-new-tokens 1e9: must be an integer in \[1, 1048576\]/,
    ],
    [
      "generate",
      ["--model", MODEL, "--prompt", "x", "--max-new-tokens", "4", "--top-p", "0"],
      /--top-p 0: must be a number in \(0, 1\]/,
    ],
    ["generate", [
      "--model",
      MODEL,
      "--prompt",
      "x",
      "--max-new-tokens",
      "4",
      "--temperature",
      "-1",
    ], /--temperature -1: must be a number in \[0/],
    [
      "generate",
      ["--model", MODEL, "--prompt", "x", "--max-new-tokens", "4", "--bogus"],
      /--bogus: unknown flag/,
    ],
  ];
  for (const [name, args, re] of cases) {
    const r = await run(name, args);
    assert.equal(r.code, 2, `${name} ${args.join(" ")}: exit ${r.code}\n${r.err}`);
    const lines = r.err.trim().split("\n");
    assert.equal(lines.length, 1, r.err);
    assert.match(lines[0], /^error: /);
    assert.match(lines[0], re);
  }
});

Deno.test("evaluate.ts refuses what is not a UTF-8 text file; a folder without tokenizer is refused", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const bin = `${dir}/x.bin`;
    Deno.writeFileSync(bin, new Uint8Array([0xff, 0xfe, 0x00, 0x80]));
    const json = `${dir}/x.json`;
    Deno.writeTextFileSync(json, '{"text":"hello"}\n');
    const bare = `${dir}/bare`;
    Deno.mkdirSync(bare);
    for (const f of ["config.json", "model.safetensors"]) {
      Deno.copyFileSync(`${MODEL}/${f}`, `${bare}/${f}`);
    }
    const cases: [string[], RegExp][] = [
      [["--data", bin], /--data .*x\.bin: not UTF-8 text/],
      [["--data", json], /--data .*x\.json: evaluate scores a plain text file or fine-tuning/],
      [["--data", dir], /not a regular file/],
      [["--data", TEXT, "--model", bare], /no tokenizer\.json for its 600-token vocabulary/],
    ];
    for (const [args, re] of cases) {
      const r = await run("evaluate", ["--model", MODEL, "--seq-len", "8", ...args]);
      assert.equal(r.code, 2, r.err);
      assert.equal(r.err.trim().split("\n").length, 1, r.err);
      assert.match(r.err, re);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("mod.ts exports the model-opening API", async () => {
  const mod = await import("../mod.ts");
  assert.equal(typeof mod.openModel, "function");
  assert.equal(typeof mod.saveCheckpoint, "function");
  assert.equal(typeof mod.exportModel, "function");
  assert.equal(typeof mod.generateIds, "function");
  assert.equal(typeof mod.evaluatePerplexity, "function");
});
