/**
 * lib/mmlu.ts: MMLU CSV and JSONL files, the reference harness's prompts byte for byte,
 * k-shot dropping, batching and scoring (against a recording engine and against the real
 * engine's logits), and accuracy counts.
 */
import assert from "node:assert/strict";
import type { Engine, EvalResult } from "../ffi/engine.ts";
import { UsageError } from "../lib/errors.ts";
import {
  loadMultipleChoice,
  type McItem,
  mmluPrompt,
  parseMcJsonl,
  parseMmluCsv,
  perplexity,
  scoreMultipleChoice,
  subjectFromPath,
} from "../lib/mmlu.ts";
import { loadFinetuneData } from "../lib/finetune_data.ts";
import { openModel } from "../lib/open_model.ts";
import { ByteTokenizer, type Tokenizer } from "../lib/tokenizer.ts";

const FIX = new URL("./fixtures/mmlu/", import.meta.url).pathname;
const DEV = `${FIX}dev/toy_science_dev.csv`;
const TEST = `${FIX}test/toy_science_test.csv`;
const TEST_JSONL = `${FIX}test/toy_science_test.jsonl`;

const RHYME = "Complete the rhyme:\nTwinkle, twinkle, little ...";

Deno.test("MMLU CSV: quoted commas, quotes and newlines; subject from the file name", async () => {
  const dev = await loadMultipleChoice(DEV);
  assert.deepEqual(dev[1], {
    question: "Which of these is a prime number, if any?",
    choices: ["4", "6", "9", "7"],
    answer: 3,
    subject: "toy_science",
  });
  assert.equal(dev[2].question, 'Which planet is called the "Red Planet"?');
  assert.equal(dev[2].answer, 1);
  const test = await loadMultipleChoice(TEST);
  assert.equal(test.length, 4);
  assert.equal(test[2].question, RHYME);
  assert.deepEqual(test.map((t) => t.answer), [1, 2, 2, 1]);
  assert.equal(subjectFromPath("/d/data/test/abstract_algebra_test.csv"), "abstract_algebra");
  assert.equal(subjectFromPath("dev/high_school_physics_dev.csv"), "high_school_physics");
  assert.equal(subjectFromPath("quiz.jsonl"), "quiz");
  // the JSONL form of the same questions (choices array or A..D fields; letter or index)
  assert.deepEqual(await loadMultipleChoice(TEST_JSONL), test);
  // a CRLF file with a BOM and blank lines reads the same
  const crlf = '\uFEFFq1,a,b,c,d,A\r\n\r\n"q2,\r\nx",a,b,c,d,D\r\n';
  assert.deepEqual(parseMmluCsv(crlf, "x.csv"), [
    { question: "q1", choices: ["a", "b", "c", "d"], answer: 0 },
    { question: "q2,\r\nx", choices: ["a", "b", "c", "d"], answer: 3 },
  ]);
});

Deno.test("multiple-choice files: every bad row is a one-line error naming file and line", async () => {
  const csv: [string, RegExp][] = [
    ["q,a,b,c,d,A\nq,a,b,c,d,E\n", /x\.csv line 2: answer "E" must be one of A, B, C, D/],
    ["q,a,b,c,d,A\nq,a,b,c,d,e,A\n", /x\.csv line 2: 7 fields, the rows before have 6/],
    ["q,A\n", /x\.csv line 1: 2 fields; an MMLU row is question, 2 to 10 choices/],
    ['q,a,b,c,d,A\n"q2,a,b\n', /x\.csv: not a valid CSV: Quote Not Closed/],
  ];
  for (const [text, re] of csv) {
    assert.throws(() => parseMmluCsv(text, "x.csv"), (e: Error) => {
      assert.ok(e instanceof UsageError, String(e));
      assert.match(e.message, re);
      assert.ok(!e.message.includes("\n"));
      return true;
    });
  }
  const jsonl: [string, RegExp][] = [
    ['{"question":"q","choices":["a","b"],"answer":"A"}\n{x', /y\.jsonl line 2: not JSON/],
    ['{"choices":["a","b"],"answer":0}', /line 1: "question" must be a string/],
    ['{"question":"q","answer":0}', /line 1: no choices: give "choices"/],
    ['{"question":"q","choices":["a"],"answer":0}', /line 1: 1 choices; must be 2 to 10/],
    ['{"question":"q","choices":["a",2],"answer":0}', /"choices" must be an array of strings/],
    ['{"question":"q","choices":["a","b"],"answer":2}', /answer 2 must be one of A, B or an/],
    ['{"question":"q","choices":["a","b"],"answer":"C"}', /answer "C" must be one of A, B/],
    ['{"question":"q","choices":["a","b"]}', /answer null must be one of/],
    ["[1]", /line 1: must be a JSON object/],
  ];
  for (const [text, re] of jsonl) {
    assert.throws(() => parseMcJsonl(text, "y.jsonl"), re);
  }
  const dir = await Deno.makeTempDir();
  try {
    Deno.writeTextFileSync(`${dir}/e.csv`, "\n");
    Deno.writeTextFileSync(`${dir}/e.txt`, "q,a,b,c,d,A\n");
    Deno.writeFileSync(`${dir}/b.csv`, new Uint8Array([0xff, 0xfe, 0x2c]));
    const files: [string, RegExp][] = [
      [`${dir}/e.csv`, /e\.csv: no questions in the file/],
      [`${dir}/e.txt`, /e\.txt: unknown multiple-choice format; give an MMLU \.csv/],
      [`${dir}/b.csv`, /b\.csv: not UTF-8 text/],
      [`${dir}/none.csv`, /none\.csv: file not found/],
      [dir, /a folder; give a \.csv or \.jsonl file/],
    ];
    for (const [p, re] of files) await assert.rejects(() => loadMultipleChoice(p), re);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("mmluPrompt is the hendrycks harness's prompt, byte for byte", async () => {
  const dev = await loadMultipleChoice(DEV);
  const test = await loadMultipleChoice(TEST);
  // gen_prompt(dev, "toy_science", 2) + format_example(test, 2, include_answer=False)
  // (format_subject puts a space before each word, hence "about  toy science")
  assert.equal(
    mmluPrompt(test[2], dev.slice(0, 2)),
    "The following are multiple choice questions (with answers) about  toy science.\n\n" +
      "What is the chemical symbol for water?\nA. H2O\nB. CO2\nC. NaCl\nD. O2\nAnswer: A\n\n" +
      "Which of these is a prime number, if any?\nA. 4\nB. 6\nC. 9\nD. 7\nAnswer: D\n\n" +
      "Complete the rhyme:\nTwinkle, twinkle, little ...\nA. moon\nB. sun\nC. star\nD. comet\n" +
      "Answer:",
  );
  assert.equal(
    mmluPrompt(test[0], []),
    "The following are multiple choice questions (with answers) about  toy science.\n\n" +
      "How many legs does an insect have?\nA. Four\nB. Six\nC. Eight\nD. Ten\nAnswer:",
  );
  // an explicit subject; three choices letter A..C as the harness's k = columns - 2
  const three: McItem = { question: "Pick", choices: ["x", "y", "z"], answer: 2 };
  assert.equal(
    mmluPrompt(three, [], "college_computer_science"),
    "The following are multiple choice questions (with answers) about  college computer " +
      "science.\n\nPick\nA. x\nB. y\nC. z\nAnswer:",
  );
});

/** What a recording engine saw in one eval call. */
interface Call {
  tokens: Int32Array;
  mask: Uint8Array;
  t: number;
}

/**
 * An engine stand-in with `eval` as interface A defines it: per-row NLL = a function of the
 * row's masked tokens (bytes), so the test knows which choice each row is.
 */
function fakeEngine(
  batch: number,
  seqLen: number,
  nll: (masked: number[]) => number,
  calls: Call[],
): Engine {
  return {
    config: { batch_size: batch, seq_len: seqLen },
    eval(tokens: Int32Array, batches: number, mask?: Uint8Array): Promise<EvalResult> {
      assert.equal(batches, 1);
      assert.ok(mask);
      const row = tokens.length / batch;
      assert.ok(Number.isInteger(row) && row - 1 >= 1 && row - 1 <= seqLen);
      calls.push({ tokens, mask, t: row - 1 });
      const rowSums = new Float64Array(batch);
      const rowCounts = new Float64Array(batch);
      for (let b = 0; b < batch; b++) {
        const m: number[] = [];
        for (let i = 1; i < row; i++) if (mask[b * row + i]) m.push(tokens[b * row + i]);
        rowSums[b] = nll(m);
        rowCounts[b] = m.length;
      }
      const sum = rowSums.reduce((a, x) => a + x, 0);
      const count = rowCounts.reduce((a, x) => a + x, 0);
      return Promise.resolve({ mean: sum / count, sum, count, rowSums, rowCounts });
    },
  } as unknown as Engine;
}

const bytes = new ByteTokenizer();
const str = (ids: ArrayLike<number>) => bytes.decode(ids);

Deno.test("scoreMultipleChoice: rows, masks, batches and accuracy counts", async () => {
  const items: McItem[] = [
    { question: "q one", choices: ["a", "b", "c", "d"], answer: 0, subject: "s_1" },
    { question: "q two?", choices: ["a", "b", "c", "d"], answer: 3, subject: "s_1" },
    { question: "q3", choices: ["a", "b", "c", "d"], answer: 0, subject: "s_2" },
    { question: "q4", choices: ["yes", "no"], answer: 1, subject: "s_2" },
    { question: "q five", choices: ["a", "b", "c", "d"], answer: 1 },
  ];
  const calls: Call[] = [];
  // NLL = the letter's byte: " A" is the likeliest continuation everywhere
  const e = fakeEngine(3, 200, (m) => m.reduce((a, x) => a + x, 0), calls);
  const r = await scoreMultipleChoice(e, bytes, items, { batch: 3, seqLen: 200 });
  assert.deepEqual(r.predictions, [0, 0, 0, 0, 0]);
  assert.equal(r.correct, 2);
  assert.equal(r.total, 5);
  assert.equal(r.accuracy, 0.4);
  assert.equal(r.chance, (4 * 0.25 + 0.5) / 5);
  assert.deepEqual(r.bySubject, {
    s_1: { correct: 1, total: 2 },
    s_2: { correct: 1, total: 2 },
    "": { correct: 0, total: 1 },
  });
  assert.deepEqual(r.scores[3], [-(32 + 65), -(32 + 66)]);
  assert.equal(r.shotsDropped, 0);
  assert.equal(r.truncated, 0);
  // 18 rows in 6 batches of 3; every row is a prompt + " X" with exactly " X" masked
  assert.equal(calls.length, 6);
  const seen = new Map<string, number>();
  for (const c of calls) {
    const row = c.t + 1;
    let longest = 0;
    for (let b = 0; b < 3; b++) {
      const m = c.mask.subarray(b * row, (b + 1) * row);
      const first = m.indexOf(1);
      const end = m.lastIndexOf(1) + 1;
      assert.equal(end - first, 2);
      const text = str(c.tokens.subarray(b * row, b * row + end));
      longest = Math.max(longest, end);
      seen.set(text, (seen.get(text) ?? 0) + 1);
      assert.match(str(c.tokens.subarray(b * row + first, b * row + end)), /^ [A-D]$/);
      assert.ok(m.subarray(end).every((x) => x === 0)); // padding carries no loss
    }
    assert.equal(c.t, longest - 1); // as short as the longest row
  }
  for (const it of items) {
    for (let j = 0; j < it.choices.length; j++) {
      const text = mmluPrompt(it, []) + " " + "ABCD"[j];
      // the last batch repeats its last row to fill up
      assert.ok((seen.get(text) ?? 0) >= 1, text);
    }
  }
  // preferring the last letter instead flips the predictions
  const r2 = await scoreMultipleChoice(
    fakeEngine(4, 200, (m) => -m.reduce((a, x) => a + x, 0), []),
    bytes,
    items,
    { batch: 4, seqLen: 200 },
  );
  assert.deepEqual(r2.predictions, [3, 3, 3, 1, 3]);
  assert.equal(r2.correct, 2);
  // text scoring: the choice text's NLL per character; "yes" vs "no"
  const r3 = await scoreMultipleChoice(
    fakeEngine(2, 200, (m) => m.length, []),
    bytes,
    [items[3]],
    { batch: 2, seqLen: 200, scoring: "text" },
  );
  assert.deepEqual(r3.scores, [[-1, -1]]);
  assert.equal(r3.scoring, "text");
});

Deno.test("scoreMultipleChoice: k-shot prompts drop shots that do not fit (k -= 1)", async () => {
  const dev = await loadMultipleChoice(DEV);
  const test = await loadMultipleChoice(TEST);
  const len = (k: number, i: number) => bytes.encode(mmluPrompt(test[i], dev.slice(0, k))).length;
  // room for 2 shots + " A" on item 0 but only 1 shot on items 1 and 2 (longer questions)
  const seqLen = len(2, 0) + 2 - 1;
  assert.ok(len(2, 2) + 2 > seqLen + 1 && len(1, 2) + 2 <= seqLen + 1);
  const calls: Call[] = [];
  const e = fakeEngine(4, seqLen, () => 1, calls);
  const r = await scoreMultipleChoice(e, bytes, test, { batch: 4, seqLen, shots: 2, dev });
  const rows = new Set<string>();
  for (const c of calls) {
    for (let b = 0; b < 4; b++) {
      const m = c.mask.subarray(b * (c.t + 1), (b + 1) * (c.t + 1));
      rows.add(str(c.tokens.subarray(b * (c.t + 1), b * (c.t + 1) + m.lastIndexOf(1) + 1)));
    }
  }
  const k = test.map((_, i) => len(2, i) + 2 <= seqLen + 1 ? 2 : 1);
  assert.deepEqual(k, [2, 1, 1, 2]);
  for (let i = 0; i < test.length; i++) {
    for (const l of "ABCD") assert.ok(rows.has(`${mmluPrompt(test[i], dev.slice(0, k[i]))} ${l}`));
  }
  assert.equal(r.shotsDropped, 2);
  assert.equal(r.truncated, 0);
  assert.equal(r.shots, 2);
  // ties go to the first choice, as numpy's argmax
  assert.deepEqual(r.predictions, [0, 0, 0, 0]);
  // a zero-shot prompt longer than the window keeps its last seqLen + 1 tokens
  const short = 20;
  const calls2: Call[] = [];
  const r2 = await scoreMultipleChoice(
    fakeEngine(2, short, (m) => m.length, calls2),
    bytes,
    [test[0]],
    { batch: 2, seqLen: short },
  );
  assert.equal(r2.truncated, 1);
  for (const c of calls2) {
    assert.equal(c.t, short);
    const full = mmluPrompt(test[0], []);
    const row = str(c.tokens.subarray(0, short + 1));
    assert.ok(row.endsWith(" A") || row.endsWith(" B") || row.endsWith(" C") || row.endsWith(" D"));
    assert.equal(row.slice(0, -2), full.slice(full.length - (short - 1)));
  }
  // shots beyond the dev file's rows of the subject; shots without a dev file
  await assert.rejects(
    () => scoreMultipleChoice(e, bytes, test, { batch: 4, seqLen, shots: 4, dev }),
    /--shots 4: the shots file has 3 question\(s\) of subject "toy_science"/,
  );
  await assert.rejects(
    () => scoreMultipleChoice(e, bytes, test, { batch: 4, seqLen, shots: 1 }),
    /--shots 1: needs a --shots-file/,
  );
  await assert.rejects(
    () => scoreMultipleChoice(e, bytes, test, { batch: 2, seqLen }),
    /engine is built for batch_size 4/,
  );
});

const MODEL = new URL("./fixtures/hf/gqa-tied-theta5e5", import.meta.url).pathname;

/** Σ -log p(tokens[p] | tokens[<p]) over p in start..end-1, from the engine's logits. */
async function nllFromLogits(
  e: Engine,
  tokens: Int32Array,
  start: number,
  end: number,
): Promise<number> {
  const seq = e.config.seq_len;
  const vocab = e.config.model.vocab_size;
  const input = new Int32Array(seq); // causal: padding after the row changes nothing before it
  input.set(tokens.subarray(0, end - 1));
  const logits = await e.logits(input, 1, seq);
  let nll = 0;
  for (let p = start; p < end; p++) {
    const z = logits.subarray((p - 1) * vocab, p * vocab);
    let max = -Infinity;
    for (const v of z) max = Math.max(max, v);
    let s = 0;
    for (const v of z) s += Math.exp(v - max);
    nll += Math.log(s) + max - z[tokens[p]];
  }
  return nll;
}

/** The row of `prompt` + `cont` and where the continuation starts (lm-eval's split). */
function pairOf(tok: Tokenizer, prompt: string, cont: string): { row: Int32Array; start: number } {
  const ctx = tok.encode(prompt);
  const row = tok.encode(prompt + cont);
  assert.deepEqual(row.subarray(0, ctx.length), ctx);
  assert.ok(row.length > ctx.length);
  return { row, start: ctx.length };
}

Deno.test("scoreMultipleChoice on a model: each score is -Σ log p of the continuation from its logits", async () => {
  const dev = await loadMultipleChoice(DEV);
  const test = await loadMultipleChoice(TEST);
  const seqLen = 200;
  using m = await openModel({ model: MODEL, seqLen, batchSize: 3 });
  using ref = await openModel({ model: MODEL, seqLen, batchSize: 1 });
  for (const [shots, scoring] of [[0, "letter"], [2, "letter"], [1, "text"]] as const) {
    const r = await scoreMultipleChoice(m.engine, m.tokenizer, test, {
      batch: 3,
      seqLen,
      shots,
      dev,
      scoring,
    });
    // the 2-shot prompts of questions 2 and 3 pass 201 tokens: one shot each is dropped
    const k = shots === 2 ? [2, 1, 1, 2] : [shots, shots, shots, shots];
    assert.equal(r.shotsDropped, shots === 2 ? 2 : 0);
    assert.equal(r.truncated, 0);
    let correct = 0;
    for (let i = 0; i < test.length; i++) {
      const conts = [0, 1, 2, 3].map((j) =>
        scoring === "letter" ? ` ${"ABCD"[j]}` : ` ${test[i].choices[j]}`
      );
      const fits = (n: number) =>
        conts.every((c) =>
          pairOf(m.tokenizer, mmluPrompt(test[i], dev.slice(0, n)), c).row.length <= seqLen + 1
        );
      assert.ok(fits(k[i]) && (k[i] === shots || !fits(k[i] + 1)), `item ${i}: k ${k[i]}`);
      const prompt = mmluPrompt(test[i], dev.slice(0, k[i]));
      const want: number[] = [];
      for (let j = 0; j < 4; j++) {
        const cont = conts[j];
        const { row, start } = pairOf(m.tokenizer, prompt, cont);
        const ll = -await nllFromLogits(ref.engine, row, start, row.length);
        want.push(scoring === "letter" ? ll : ll / cont.length);
      }
      for (let j = 0; j < 4; j++) {
        const tol = 1e-4 * Math.max(1, Math.abs(want[j]));
        assert.ok(
          Math.abs(r.scores[i][j] - want[j]) < tol,
          `${shots}-shot ${scoring} item ${i} choice ${j}: ${r.scores[i][j]} vs ${want[j]}`,
        );
      }
      const pred = want.indexOf(Math.max(...want));
      assert.equal(r.predictions[i], pred);
      if (pred === test[i].answer) correct++;
    }
    assert.equal(r.correct, correct);
    assert.equal(r.accuracy, correct / 4);
    assert.deepEqual(r.bySubject, { toy_science: { correct, total: 4 } });
  }
});

Deno.test("evaluate.ts --mc --json: the library's accuracy and predictions", async () => {
  const script = new URL("../examples/evaluate.ts", import.meta.url).pathname;
  const args = [
    "run",
    "-A",
    script,
    "--model",
    MODEL,
    "--seq-len",
    "200",
    "--batch-size",
    "3",
    "--mc",
    `${FIX}test`, // a folder: its .csv and .jsonl files, sorted
    "--shots",
    "2",
    "--shots-file",
    `${FIX}dev`,
    "--json",
  ];
  const p = await new Deno.Command(Deno.execPath(), { args, stdout: "piped", stderr: "piped" })
    .output();
  const err = new TextDecoder().decode(p.stderr);
  assert.equal(p.code, 0, err);
  const lines = new TextDecoder().decode(p.stdout).trim().split("\n");
  const got = JSON.parse(lines.at(-1)!);
  assert.deepEqual(Object.keys(got), ["mc"]);
  const items = [...await loadMultipleChoice(TEST), ...await loadMultipleChoice(TEST_JSONL)];
  using m = await openModel({ model: MODEL, seqLen: 200, batchSize: 3 });
  const want = await scoreMultipleChoice(m.engine, m.tokenizer, items, {
    batch: 3,
    seqLen: 200,
    shots: 2,
    dev: await loadMultipleChoice(DEV),
  });
  assert.deepEqual(got.mc, {
    accuracy: want.accuracy,
    correct: want.correct,
    total: 8,
    chance: 0.25,
    scoring: "letter",
    shots: 2,
    shots_dropped: 4, // questions 2 and 3 (CSV and JSONL) lose a shot to fit 201 tokens
    truncated: 0,
    by_subject: { toy_science: { correct: want.correct, total: 8 } },
    predictions: want.predictions,
  });
  // the same questions twice (CSV and JSONL) get the same predictions
  assert.deepEqual(want.predictions.slice(0, 4), want.predictions.slice(4));
});

const HELDOUT = `${FIX}heldout.jsonl`;

Deno.test("perplexity on held-out fine-tuning JSONL counts exactly the completion tokens", async () => {
  const seqLen = 48;
  using m = await openModel({ model: MODEL, seqLen, batchSize: 2 });
  using ref = await openModel({ model: MODEL, seqLen, batchSize: 1 });
  const data = await loadFinetuneData(HELDOUT, m.tokenizer, { seqLen });
  assert.equal(data.kind, "prompt");
  assert.equal(data.examples.length, 5);
  const r = await perplexity(m.engine, data, 2, seqLen);
  // the same from the logits, example by example, over the masked (completion) targets only
  let nll = 0;
  let count = 0;
  for (const ex of data.examples) {
    for (let p = 1; p < ex.tokens.length; p++) {
      if (ex.mask[p]) {
        nll += await nllFromLogits(ref.engine, ex.tokens, p, p + 1);
        count++;
      }
    }
  }
  assert.equal(r.tokens, count);
  assert.equal(r.tokens, data.counts.lossTokens);
  assert.ok(Math.abs(r.loss - nll / count) < 1e-5 * Math.max(1, nll / count), `${r.loss}`);
  assert.equal(r.perplexity, Math.exp(r.loss));
  await assert.rejects(() => perplexity(m.engine, data, 3, seqLen), /batch_size 2/);

  // examples/evaluate.ts --data FILE.jsonl --json: the same numbers
  const script = new URL("../examples/evaluate.ts", import.meta.url).pathname;
  const args = ["run", "-A", script, "--model", MODEL, "--seq-len", `${seqLen}`];
  const p = await new Deno.Command(Deno.execPath(), {
    args: [...args, "--batch-size", "2", "--data", HELDOUT, "--json"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(p.code, 0, new TextDecoder().decode(p.stderr));
  const got = JSON.parse(new TextDecoder().decode(p.stdout).trim().split("\n").at(-1)!);
  assert.deepEqual(got, {
    loss: r.loss,
    ppl: r.perplexity,
    tokens: r.tokens,
    examples: 5,
    truncated: 0,
    refused: 0,
  });
});
