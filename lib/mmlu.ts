/**
 * Multiple-choice evaluation in the MMLU format, and perplexity on held-out fine-tuning data.
 *
 * Files: MMLU's own CSV (no header; each row `question, A, B, C, D, answer letter`, as the
 * hendrycks `data/test/*_test.csv` and `data/dev/*_dev.csv` files; more or fewer choice
 * columns work the same way) or JSONL (one object a line: `question`, `choices` (an array) or
 * fields `A`, `B`, …, `answer` (a letter or a 0-based index), optional `subject`). A file's
 * subject is its `subject` field, else its name without the extension and a trailing
 * `_test` / `_dev` / `_val` (`abstract_algebra_test.csv` → `abstract_algebra`).
 *
 * Prompts are byte for byte those of MMLU's reference harness (hendrycks/test `evaluate.py`):
 *
 *     The following are multiple choice questions (with answers) about  abstract algebra.\n\n
 *     {shot question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {X}\n\n      (k times)
 *     {question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:
 *
 * (the double space after "about" is the harness's: its `format_subject` puts a space before
 * every word of the subject). The k shots are the first k rows of the same subject in the dev
 * file; when a prompt does not fit the model's window the harness drops shots (k -= 1) until it
 * does, and so does {@link scoreMultipleChoice}, counting the dropped shots; a zero-shot prompt
 * that still does not fit loses its oldest tokens (counted as truncated).
 *
 * Scoring (`letter`, the default): each choice's score is the log-likelihood of the
 * continuation " A", " B", … after "Answer:", as the reference harness reads the letter's
 * log-probability and as lm-evaluation-harness's `mmlu` task scores it; the choice with the
 * highest score is the prediction (the first on a tie). `text` scores the continuation
 * " {choice text}" instead, divided by its length in characters (lm-evaluation-harness's
 * `acc_norm`). Continuation tokens are split off as lm-evaluation-harness does: encode the
 * prompt and prompt + continuation, the continuation is what follows the prompt's tokens.
 * Each (item, choice) is one row; rows of similar length share an engine batch whose length is
 * the longest row's, and the engine's per-row sums of -log p over the masked continuation
 * tokens give the scores.
 *
 * @module
 */

import { basename } from "node:path";
import { parse as parseCsv } from "csv-parse/sync";
import type { Engine } from "../ffi/engine.ts";
import { UsageError } from "./errors.ts";
import { evalBatches, type FinetuneData } from "./finetune_data.ts";
import type { Tokenizer } from "./tokenizer.ts";

/** One multiple-choice question. */
export interface McItem {
  /** The question text. */
  question: string;
  /** The choices, in order (A, B, C, …). */
  choices: string[];
  /** Index of the right choice. */
  answer: number;
  /** Subject (with underscores, as MMLU's file names); absent: none. */
  subject?: string;
}

/** Most choices a question may have (letters A..J, as MMLU-Pro). */
export const MAX_CHOICES = 10;
const LETTERS = "ABCDEFGHIJ";

/** The subject a file name implies: `x/abstract_algebra_test.csv` → `abstract_algebra`. */
export function subjectFromPath(path: string): string {
  return basename(path).replace(/\.[^.]*$/, "").replace(/_(test|dev|val|validation|train)$/, "");
}

/**
 * Reads an MMLU CSV (`.csv`) or JSONL (`.jsonl`) file. Throws a one-line {@link UsageError}
 * naming the file, the line and what is wrong for an unreadable file, a malformed row, a bad
 * answer or an empty file.
 */
export async function loadMultipleChoice(path: string): Promise<McItem[]> {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(await Deno.readFile(path));
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UsageError(`${path}: file not found`);
    if (e instanceof Deno.errors.IsADirectory) {
      throw new UsageError(`${path}: a folder; give a .csv or .jsonl file`);
    }
    if (e instanceof TypeError) throw new UsageError(`${path}: not UTF-8 text`);
    throw new UsageError(`${path}: ${String(e).split("\n")[0]}`);
  }
  const subject = subjectFromPath(path);
  let items: McItem[];
  if (/\.csv$/i.test(path)) items = parseMmluCsv(text, path, subject);
  else if (/\.jsonl$/i.test(path)) items = parseMcJsonl(text, path, subject);
  else {
    throw new UsageError(
      `${path}: unknown multiple-choice format; give an MMLU .csv (question,A,B,C,D,answer) ` +
        "or a .jsonl file",
    );
  }
  if (items.length === 0) throw new UsageError(`${path}: no questions in the file`);
  return items;
}

/** The answer letter's index, or -1. */
function letterIndex(s: string, n: number): number {
  const t = s.trim().toUpperCase();
  const i = t.length === 1 ? LETTERS.indexOf(t) : -1;
  return i >= 0 && i < n ? i : -1;
}

function allowedLetters(n: number): string {
  return LETTERS.slice(0, n).split("").join(", ");
}

/**
 * Rows of an MMLU CSV (RFC 4180 quoting: commas, quotes and newlines inside quoted fields);
 * `where` names the file in errors; items get `subject`.
 */
export function parseMmluCsv(text: string, where: string, subject?: string): McItem[] {
  let rows: { record: string[]; info: { lines: number; records: number } }[];
  try {
    rows = parseCsv(text, {
      bom: true,
      info: true,
      relax_column_count: true,
      skip_empty_lines: true,
    });
  } catch (e) {
    throw new UsageError(`${where}: not a valid CSV: ${(e as Error).message.split("\n")[0]}`);
  }
  const items: McItem[] = [];
  let width = -1;
  for (const { record, info } of rows) {
    const at = `${where} line ${info.lines}`;
    const n = record.length - 2;
    if (n < 2 || n > MAX_CHOICES) {
      throw new UsageError(
        `${at}: ${record.length} fields; an MMLU row is question, 2 to ${MAX_CHOICES} choices ` +
          "(4 in MMLU), answer letter",
      );
    }
    if (width >= 0 && record.length !== width) {
      throw new UsageError(`${at}: ${record.length} fields, the rows before have ${width}`);
    }
    width = record.length;
    const answer = letterIndex(record[n + 1], n);
    if (answer < 0) {
      throw new UsageError(
        `${at}: answer ${JSON.stringify(record[n + 1])} must be one of ${allowedLetters(n)}`,
      );
    }
    items.push({
      question: record[0],
      choices: record.slice(1, n + 1),
      answer,
      ...(subject ? { subject } : {}),
    });
  }
  return items;
}

/**
 * Objects of a multiple-choice JSONL: `question`, `choices` (array of strings) or `A`, `B`, …
 * fields, `answer` (letter or 0-based index), optional `subject` (default `subject`).
 */
export function parseMcJsonl(text: string, where: string, subject?: string): McItem[] {
  const items: McItem[] = [];
  const lines = text.replace(/^\uFEFF/, "").split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === "") continue;
    const at = `${where} line ${i + 1}`;
    let o: unknown;
    try {
      o = JSON.parse(line);
    } catch (e) {
      throw new UsageError(`${at}: not JSON: ${(e as Error).message.split("\n")[0]}`);
    }
    if (o === null || typeof o !== "object" || Array.isArray(o)) {
      throw new UsageError(`${at}: must be a JSON object with question, choices, answer`);
    }
    const r = o as Record<string, unknown>;
    if (typeof r.question !== "string") {
      throw new UsageError(`${at}: "question" must be a string`);
    }
    let choices: string[];
    if (r.choices !== undefined) {
      if (!Array.isArray(r.choices) || !r.choices.every((c) => typeof c === "string")) {
        throw new UsageError(`${at}: "choices" must be an array of strings`);
      }
      choices = r.choices as string[];
    } else {
      choices = [];
      for (const l of LETTERS) {
        if (r[l] === undefined) break;
        if (typeof r[l] !== "string") throw new UsageError(`${at}: "${l}" must be a string`);
        choices.push(r[l] as string);
      }
      if (choices.length === 0) {
        throw new UsageError(`${at}: no choices: give "choices": [...] or fields "A", "B", …`);
      }
    }
    const n = choices.length;
    if (n < 2 || n > MAX_CHOICES) {
      throw new UsageError(`${at}: ${n} choices; must be 2 to ${MAX_CHOICES} (4 in MMLU)`);
    }
    let answer = -1;
    if (typeof r.answer === "number") {
      answer = Number.isInteger(r.answer) && r.answer >= 0 && r.answer < n ? r.answer : -1;
    } else if (typeof r.answer === "string") answer = letterIndex(r.answer, n);
    if (answer < 0) {
      throw new UsageError(
        `${at}: answer ${JSON.stringify(r.answer ?? null)} must be one of ` +
          `${allowedLetters(n)} or an index 0..${n - 1}`,
      );
    }
    if (r.subject !== undefined && typeof r.subject !== "string") {
      throw new UsageError(`${at}: "subject" must be a string`);
    }
    const s = (r.subject as string | undefined) ?? subject;
    items.push({ question: r.question, choices, answer, ...(s ? { subject: s } : {}) });
  }
  return items;
}

/** The harness's `format_subject`: a space before every `_`-separated word. */
export function formatSubject(subject: string): string {
  return subject.split("_").map((w) => " " + w).join("");
}

/** The harness's `format_example`: question, lettered choices, "Answer:" (+ " X\n\n"). */
export function formatExample(item: McItem, includeAnswer: boolean): string {
  let s = item.question;
  item.choices.forEach((c, j) => s += `\n${LETTERS[j]}. ${c}`);
  s += "\nAnswer:";
  if (includeAnswer) s += ` ${LETTERS[item.answer]}\n\n`;
  return s;
}

/**
 * The prompt MMLU's reference harness builds for `item` after `shots` (its `gen_prompt` +
 * `format_example`): the subject line, each shot with its answer, then the question ending in
 * "Answer:". `subject` defaults to the item's; with none the line reads "… (with answers).".
 */
export function mmluPrompt(item: McItem, shots: McItem[], subject?: string): string {
  const s = subject ?? item.subject;
  let p = s === undefined
    ? "The following are multiple choice questions (with answers).\n\n"
    : `The following are multiple choice questions (with answers) about ${formatSubject(s)}.\n\n`;
  for (const shot of shots) p += formatExample(shot, true);
  return p + formatExample(item, false);
}

/** How choices are scored; see the module notes. */
export type McScoring = "letter" | "text";

/** Options of {@link scoreMultipleChoice}. */
export interface McOptions {
  /** Shots per prompt (k); default 0. */
  shots?: number;
  /** Where shots come from: the first `shots` items of the same subject. */
  dev?: McItem[];
  /** Rows per engine batch: the engine's batch_size. */
  batch: number;
  /** Longest row the engine takes: its seq_len (a row holds up to seqLen + 1 tokens). */
  seqLen: number;
  /** `letter` (default) or `text`. */
  scoring?: McScoring;
  /** Called after each engine batch with rows done and rows in all. */
  onProgress?: (done: number, total: number) => void;
}

/** What {@link scoreMultipleChoice} measures. */
export interface McResult {
  /** correct / total. */
  accuracy: number;
  /** Questions answered right. */
  correct: number;
  /** Questions. */
  total: number;
  /** Accuracy of guessing: the mean of 1 / choices (0.25 for MMLU). */
  chance: number;
  /** Per subject (`""` for items without one). */
  bySubject: Record<string, { correct: number; total: number }>;
  /** Predicted choice index of each item. */
  predictions: number[];
  /** Each item's choice scores (log-likelihoods; per character for `text`). */
  scores: number[][];
  /** The scoring used. */
  scoring: McScoring;
  /** Shots asked for. */
  shots: number;
  /** Shots dropped over all items so that prompts fit (the harness's k -= 1). */
  shotsDropped: number;
  /** Items whose zero-shot prompt still did not fit and lost its oldest tokens. */
  truncated: number;
}

/** One (item, choice) row: its tokens and where the scored continuation starts. */
interface Row {
  tokens: Int32Array;
  start: number;
  item: number;
  choice: number;
}

/**
 * `text` with the tokenizer's BOS as the model saw text in training, without a trailing EOS
 * (a tokenizer that appends one would put it between prompt and continuation).
 */
function encodeText(tok: Tokenizer, text: string): Int32Array {
  const ids = tok.encode(text, { addSpecial: true });
  const n = ids.length;
  return n > 0 && tok.eosIds.includes(ids[n - 1]) && !text.endsWith(tok.decode([ids[n - 1]]))
    ? ids.subarray(0, n - 1)
    : ids;
}

/** The tokens of prompt + continuation and the continuation's first index (lm-eval's split). */
function encodePair(tok: Tokenizer, ctx: Int32Array, prompt: string, cont: string): Row {
  const whole = encodeText(tok, prompt + cont);
  if (whole.length > ctx.length) return { tokens: whole, start: ctx.length, item: 0, choice: 0 };
  // the continuation merged into the prompt's last token: score it encoded on its own
  const c = tok.encode(cont, { addSpecial: false });
  const t = new Int32Array(ctx.length + c.length);
  t.set(ctx);
  t.set(c, ctx.length);
  return { tokens: t, start: ctx.length, item: 0, choice: 0 };
}

/** The `shots` dev items of `subject`, or a one-line error when there are fewer. */
function shotsOf(dev: McItem[], subject: string | undefined, k: number): McItem[] {
  const same = dev.filter((d) => d.subject === subject);
  if (same.length < k) {
    throw new UsageError(
      `--shots ${k}: the shots file has ${same.length} question(s) of subject ` +
        `${JSON.stringify(subject ?? "")}; give a dev file of that subject with ≥ ${k} rows`,
    );
  }
  return same.slice(0, k);
}

function continuation(item: McItem, j: number, scoring: McScoring): string {
  return scoring === "letter" ? ` ${LETTERS[j]}` : ` ${item.choices[j]}`;
}

/**
 * Multiple-choice accuracy of `engine`'s model on `items` (see the module notes for prompts
 * and scoring). The engine must be built with batch_size `opts.batch` and seq_len ≥
 * `opts.seqLen`; it evaluates each batch at the length of its longest row.
 */
export async function scoreMultipleChoice(
  engine: Engine,
  tokenizer: Tokenizer,
  items: McItem[],
  opts: McOptions,
): Promise<McResult> {
  const k0 = opts.shots ?? 0;
  const scoring = opts.scoring ?? "letter";
  const { batch, seqLen } = opts;
  if (!Number.isSafeInteger(k0) || k0 < 0) {
    throw new UsageError(`--shots ${k0}: must be an integer ≥ 0`);
  }
  if (k0 > 0 && !opts.dev) {
    throw new UsageError(`--shots ${k0}: needs a --shots-file with dev questions`);
  }
  if (engine.config.batch_size !== batch || seqLen > engine.config.seq_len || seqLen < 1) {
    throw new UsageError(
      `multiple choice: the engine is built for batch_size ${engine.config.batch_size} × ` +
        `seq_len ${engine.config.seq_len}; asked for ${batch} rows of ≤ ${seqLen} + 1 tokens`,
    );
  }
  if (items.length === 0) throw new UsageError("multiple choice: no questions");
  const maxLen = seqLen + 1;
  const rows: Row[] = [];
  let shotsDropped = 0;
  let truncated = 0;
  items.forEach((item, i) => {
    const shots = k0 > 0 ? shotsOf(opts.dev!, item.subject, k0) : [];
    let k = k0;
    const conts = item.choices.map((_, j) => continuation(item, j, scoring));
    let pair: Row[] = [];
    for (;;) {
      const prompt = mmluPrompt(item, shots.slice(0, k));
      const ctx = encodeText(tokenizer, prompt);
      pair = conts.map((c) => encodePair(tokenizer, ctx, prompt, c));
      if (k === 0 || pair.every((r) => r.tokens.length <= maxLen)) break;
      k -= 1;
      shotsDropped += 1;
    }
    let cut = false;
    pair.forEach((r, j) => {
      r.item = i;
      r.choice = j;
      const over = r.tokens.length - maxLen;
      if (over > 0) {
        if (r.tokens.length - r.start >= maxLen) {
          throw new UsageError(
            `multiple choice: choice ${LETTERS[j]} of question ${i + 1} is ` +
              `${r.tokens.length - r.start} tokens, more than --seq-len ${seqLen} allows`,
          );
        }
        r.tokens = r.tokens.slice(over);
        r.start -= over;
        cut = true;
      }
      rows.push(r);
    });
    if (cut) truncated += 1;
  });

  // rows of similar length together, so each batch is as short as its longest row
  const order = rows.map((_, i) => i).sort((a, b) =>
    rows[a].tokens.length - rows[b].tokens.length || a - b
  );
  const nll = new Float64Array(rows.length);
  for (let s = 0; s < order.length; s += batch) {
    const group = order.slice(s, s + batch);
    // a short last batch repeats its last row (its result is not read)
    while (group.length < batch) group.push(group[group.length - 1]);
    const t = Math.max(...group.map((r) => rows[r].tokens.length)) - 1;
    const tokens = new Int32Array(batch * (t + 1));
    const mask = new Uint8Array(batch * (t + 1));
    group.forEach((r, b) => {
      const row = rows[r];
      tokens.set(row.tokens, b * (t + 1));
      mask.fill(1, b * (t + 1) + row.start, b * (t + 1) + row.tokens.length);
    });
    const res = await engine.eval(tokens, 1, mask);
    for (let b = 0; b < Math.min(batch, order.length - s); b++) nll[group[b]] = res.rowSums[b];
    opts.onProgress?.(Math.min(s + batch, order.length), order.length);
  }

  const scores = items.map((it) => new Array<number>(it.choices.length).fill(0));
  rows.forEach((r, i) => {
    const ll = -nll[i];
    scores[r.item][r.choice] = scoring === "letter"
      ? ll
      : ll / [...continuation(items[r.item], r.choice, scoring)].length;
  });
  const predictions = scores.map((s) => s.indexOf(Math.max(...s)));
  const bySubject: Record<string, { correct: number; total: number }> = {};
  let correct = 0;
  items.forEach((it, i) => {
    const ok = predictions[i] === it.answer ? 1 : 0;
    correct += ok;
    const s = (bySubject[it.subject ?? ""] ??= { correct: 0, total: 0 });
    s.correct += ok;
    s.total += 1;
  });
  const chance = items.reduce((a, it) => a + 1 / it.choices.length, 0) / items.length;
  return {
    accuracy: correct / items.length,
    correct,
    total: items.length,
    chance,
    bySubject,
    predictions,
    scores,
    scoring,
    shots: k0,
    shotsDropped,
    truncated,
  };
}

/** What {@link perplexity} measures. */
export interface HeldOutPerplexity {
  /** Mean -log p over the loss-carrying target tokens (nats). */
  loss: number;
  /** exp(loss). */
  perplexity: number;
  /** Loss-carrying targets scored. */
  tokens: number;
}

/**
 * Perplexity of `engine`'s model on held-out fine-tuning data: every example once
 * ({@link evalBatches}, rows of `batch`, length ≤ `seqLen`), counting only the targets its
 * mask marks (the completion of a prompt/completion example, the assistant turns of a chat;
 * never padding). The engine must be built with batch_size `batch` and seq_len ≥ `seqLen`.
 */
export async function perplexity(
  engine: Engine,
  data: FinetuneData,
  batch: number,
  seqLen: number,
): Promise<HeldOutPerplexity> {
  if (engine.config.batch_size !== batch || seqLen > engine.config.seq_len) {
    throw new UsageError(
      `perplexity: the engine is built for batch_size ${engine.config.batch_size} × ` +
        `seq_len ${engine.config.seq_len}; asked for ${batch} × ${seqLen}`,
    );
  }
  let sum = 0;
  let count = 0;
  for (const b of evalBatches(data, batch, seqLen)) {
    if (b.count === 0) continue;
    const r = await engine.eval(b.tokens, 1, b.mask);
    sum += r.sum;
    count += r.count;
  }
  if (count === 0) {
    throw new UsageError(`${data.path}: no token carries loss; nothing to evaluate`);
  }
  const loss = sum / count;
  return { loss, perplexity: Math.exp(loss), tokens: count };
}
