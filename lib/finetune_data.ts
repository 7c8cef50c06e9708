/**
 * Fine-tuning data: a JSONL file of examples, tokenized with the model's tokenizer into
 * examples with a loss mask, and the sampler that batches them.
 *
 * One kind of line per file:
 * - `{"text": …}` (continued pre-training): every token carries loss; a text longer than
 *   `seqLen + 1` tokens is split into windows of `seqLen + 1` tokens that overlap by one token,
 *   so every token after the first is a target exactly once (nothing is refused).
 * - `{"prompt": …, "completion": …}`: loss on the completion's tokens and the EOS after them
 *   only. The ids are those of `prompt + completion` tokenized as one text (BOS as the tokenizer
 *   adds it); the completion starts after the longest common prefix of those ids and the
 *   prompt's own ids (the way TRL's SFTTrainer finds it).
 * - `{"messages": [{"role", "content"}, …]}`: rendered with the model's chat template
 *   ({@link loadChatTemplate}) and tokenized without adding special tokens, as transformers'
 *   `apply_chat_template` does. Loss only on the assistant turns: for assistant message i the
 *   span starts where the render of messages[0..i) with `add_generation_prompt` ends (so the
 *   assistant header carries no loss) and ends where the render of messages[0..i] ends (so the
 *   turn's end token, e.g. `<|eot_id|>` or `</s>`, carries loss); each boundary in tokens is
 *   the longest common prefix of the prefix render's ids and the whole conversation's ids. A
 *   template whose prefix renders are not prefixes of the whole text is a one-line error.
 *
 * Too long (more than `seqLen + 1` tokens, i.e. more than `seqLen` targets): with
 * `tooLong: "truncate"` (default) tokens are dropped from the left (after the BOS, which is
 * kept) so the final answer (the completion, or the last assistant turn) stays whole; an
 * example whose final answer alone does not fit is refused. `"refuse"` skips every too-long
 * example. Both are counted. Examples with no target carrying loss are refused too.
 *
 * Masks follow the engine's convention: `mask[i] = 1` means token i carries loss as a target;
 * `mask[0]` is always 0 (the first token of a row is no target), so `lossTokens` = sum of masks.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { dirname } from "node:path";
import { type ChatMessage, type ChatTemplate, loadChatTemplate } from "./chat_template.ts";
import { UsageError } from "./errors.ts";
import { Rng } from "./rng.ts";
import type { Tokenizer } from "./tokenizer.ts";

/** One tokenized example: `mask[i] = 1` when token i carries loss as a target (mask[0] = 0). */
export interface FinetuneExample {
  /** Token ids, at most seqLen + 1. */
  tokens: Int32Array;
  /** Same length as tokens; 1 = the token is a target that carries loss. */
  mask: Uint8Array;
}

/** What loading a file did; every number is exact. */
export interface FinetuneCounts {
  /** Non-blank lines of the file (each one example before windowing / refusal). */
  lines: number;
  /** Examples kept (text windows count one each). */
  examples: number;
  /** Examples shortened from the left to fit seqLen + 1 tokens. */
  truncated: number;
  /** Examples skipped: too long (answer alone too long, or tooLong "refuse") or no loss token. */
  refused: number;
  /** Tokens of the kept examples. */
  tokens: number;
  /** Targets carrying loss in the kept examples (sum of the masks). */
  lossTokens: number;
}

/** A loaded fine-tuning file. */
export interface FinetuneData {
  /** The file it came from. */
  path: string;
  /** Its kind of line. */
  kind: "text" | "prompt" | "messages";
  /** The examples, in file order. */
  examples: FinetuneExample[];
  /** Counts of the load (a split's parts: examples/tokens/lossTokens of the part, the rest of the file). */
  counts: FinetuneCounts;
  /** SHA-256 (hex) of the file bytes, the tokenizer's identity and the options (resume checks). */
  fingerprint: string;
  /** Id written into padded positions: the tokenizer's EOS, or 0 without one. */
  padId: number;
}

/** Options of {@link loadFinetuneData}. */
export interface FinetuneDataOptions {
  /** Longest window in targets; an example holds at most seqLen + 1 tokens. */
  seqLen: number;
  /** What to do with a too-long prompt/messages example (default "truncate"). */
  tooLong?: "truncate" | "refuse";
  /**
   * Folder whose chat template renders `messages` (default: the tokenizer's folder).
   */
  modelDir?: string;
  /** Append the tokenizer's EOS to text and completions when it is not already last (default true). */
  addEos?: boolean;
}

/** The forms a line may take, for error messages. */
const FORMS = 'each line must be a JSON object with "text", or "prompt" and "completion" ' +
  '(strings), or "messages" ([{"role", "content"}]), one kind per file';

type Kind = FinetuneData["kind"];

/** The kind a parsed line declares by its fields, or null. */
function kindOf(obj: Record<string, unknown>): Kind | null {
  if ("messages" in obj) return "messages";
  if ("prompt" in obj || "completion" in obj) return "prompt";
  if ("text" in obj) return "text";
  return null;
}

function messageOf(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).replace(/\s*\n\s*/g, " ").trim();
}

/** Length of the longest common prefix of two id arrays. */
function commonPrefix(a: Int32Array, b: Int32Array): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** The tokenizer's identity for the fingerprint: its kind, ids and the bytes of its files. */
function tokenizerIdentity(tok: Tokenizer, hash: ReturnType<typeof createHash>): void {
  hash.update(JSON.stringify([tok.kind, tok.vocabSize, tok.bosId, tok.eosId, tok.eosIds]));
  for (const f of tok.sourceFiles()) {
    hash.update(f.split("/").pop() ?? f);
    hash.update(Deno.readFileSync(f));
  }
}

/** A tokenized example before the length rule: ids, mask and where its final answer starts. */
interface Draft {
  ids: Int32Array;
  mask: Uint8Array;
  /** Index of the first loss token of the final answer (kept whole when truncating). */
  answerStart: number;
}

/**
 * Reads a JSONL fine-tuning file (see the module doc for the three kinds and the length rules).
 * Every bad input is a one-line UsageError naming the file (and line): a missing or unreadable
 * file, an empty file, invalid JSON, a line without the fields or of another kind than the
 * first, a `messages` file without a chat template, and a file of which no example is left.
 */
export async function loadFinetuneData(
  path: string,
  tokenizer: Tokenizer,
  opts: FinetuneDataOptions,
): Promise<FinetuneData> {
  const seqLen = opts.seqLen;
  if (!Number.isInteger(seqLen) || seqLen < 1) {
    throw new UsageError(`seqLen ${seqLen}: must be an integer >= 1`);
  }
  const tooLong = opts.tooLong ?? "truncate";
  if (tooLong !== "truncate" && tooLong !== "refuse") {
    throw new UsageError(`tooLong ${JSON.stringify(tooLong)}: must be "truncate" or "refuse"`);
  }
  const addEos = opts.addEos ?? true;
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new UsageError(`${path}: no such file`);
    throw new UsageError(`${path}: not readable (${messageOf(e)})`);
  }
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: false }).decode(bytes);
  } catch {
    throw new UsageError(`${path}: not UTF-8 text; ${FORMS}`);
  }

  const counts: FinetuneCounts = {
    lines: 0,
    examples: 0,
    truncated: 0,
    refused: 0,
    tokens: 0,
    lossTokens: 0,
  };
  const examples: FinetuneExample[] = [];
  const eos = tokenizer.eosId;
  const bos = tokenizer.bosId;
  let kind: Kind | null = null;
  let kindLine = 0;
  let chat: ChatTemplate | null = null;

  const keep = (ids: Int32Array, mask: Uint8Array): void => {
    mask[0] = 0;
    let loss = 0;
    for (let i = 1; i < mask.length; i++) loss += mask[i];
    if (loss === 0) {
      counts.refused++;
      return;
    }
    examples.push({ tokens: ids, mask });
    counts.tokens += ids.length;
    counts.lossTokens += loss;
  };
  const withEos = (ids: Int32Array): Int32Array => {
    if (!addEos || eos === null || (ids.length > 0 && ids[ids.length - 1] === eos)) return ids;
    const out = new Int32Array(ids.length + 1);
    out.set(ids);
    out[ids.length] = eos;
    return out;
  };
  // Applies the length rule to a prompt/messages draft.
  const fit = (d: Draft): void => {
    const max = seqLen + 1;
    const n = d.ids.length;
    if (n <= max) return keep(d.ids, d.mask);
    if (tooLong === "refuse") {
      counts.refused++;
      return;
    }
    const head = bos !== null && d.ids[0] === bos ? 1 : 0;
    const tailStart = n - (max - head);
    // The answer must stay whole and have a token before it to be predicted from.
    if (tailStart > d.answerStart || (head === 0 && tailStart === d.answerStart)) {
      counts.refused++;
      return;
    }
    const ids = new Int32Array(max);
    const mask = new Uint8Array(max);
    if (head) ids[0] = d.ids[0];
    ids.set(d.ids.subarray(tailStart), head);
    mask.set(d.mask.subarray(tailStart), head);
    counts.truncated++;
    keep(ids, mask);
  };

  const lines = text.split("\n");
  for (let li = 0; li < lines.length; li++) {
    const raw = lines[li].replace(/\r$/, "");
    if (raw.trim() === "") continue;
    const at = `${path}:${li + 1}`;
    counts.lines++;
    let obj: unknown;
    try {
      obj = JSON.parse(raw);
    } catch (e) {
      throw new UsageError(`${at}: not valid JSON (${messageOf(e)}); ${FORMS}`);
    }
    if (typeof obj !== "object" || obj === null || Array.isArray(obj)) {
      throw new UsageError(`${at}: not a JSON object; ${FORMS}`);
    }
    const rec = obj as Record<string, unknown>;
    const k = kindOf(rec);
    if (k === null) {
      throw new UsageError(
        `${at}: no "text", "prompt"/"completion" or "messages" field (it has ${
          Object.keys(rec).map((x) => JSON.stringify(x)).join(", ") || "none"
        }); ${FORMS}`,
      );
    }
    if (kind === null) {
      kind = k;
      kindLine = li + 1;
    } else if (k !== kind) {
      throw new UsageError(
        `${at}: a ${k} line in a ${kind} file (line ${kindLine} is ${kind}); ${FORMS}`,
      );
    }

    if (k === "text") {
      if (typeof rec.text !== "string") {
        throw new UsageError(`${at}: "text" must be a string; ${FORMS}`);
      }
      const ids = withEos(tokenizer.encode(rec.text));
      if (ids.length < 2) {
        counts.refused++;
        continue;
      }
      // Windows of seqLen + 1 tokens overlapping by one: each target appears exactly once.
      for (let s = 0; s + 1 < ids.length; s += seqLen) {
        const w = ids.slice(s, Math.min(ids.length, s + seqLen + 1));
        keep(w, new Uint8Array(w.length).fill(1));
      }
    } else if (k === "prompt") {
      if (typeof rec.prompt !== "string" || typeof rec.completion !== "string") {
        throw new UsageError(`${at}: "prompt" and "completion" must both be strings; ${FORMS}`);
      }
      const full = tokenizer.encode(rec.prompt + rec.completion);
      const pre = tokenizer.encode(rec.prompt);
      // (A tokenizer that appends EOS itself ends both with it; the prefix stops before it.)
      const start = commonPrefix(pre, full);
      const ids = withEos(full);
      const mask = new Uint8Array(ids.length);
      mask.fill(1, start);
      fit({ ids, mask, answerStart: start });
    } else {
      const msgs = rec.messages;
      if (!Array.isArray(msgs) || msgs.length === 0) {
        throw new UsageError(`${at}: "messages" must be a non-empty list; ${FORMS}`);
      }
      for (let j = 0; j < msgs.length; j++) {
        const m = msgs[j] as { role?: unknown; content?: unknown } | null;
        if (
          typeof m !== "object" || m === null || typeof m.role !== "string" ||
          typeof m.content !== "string"
        ) {
          throw new UsageError(
            `${at}: messages[${j}] must be {"role": string, "content": string}; ${FORMS}`,
          );
        }
      }
      const conv = msgs as ChatMessage[];
      if (!conv.some((m) => m.role === "assistant")) {
        throw new UsageError(`${at}: no "assistant" message, so nothing would carry loss`);
      }
      if (chat === null) chat = templateFor(at, tokenizer, opts.modelDir);
      fit(messagesDraft(at, chat, tokenizer, conv));
    }
  }
  if (counts.lines === 0) throw new UsageError(`${path}: empty file; ${FORMS}`);
  if (examples.length === 0) {
    throw new UsageError(
      `${path}: no example left: ${counts.refused} of ${counts.lines} refused (longer than ` +
        `seqLen ${seqLen} + 1 tokens${
          tooLong === "truncate" ? " even without the prompt" : ""
        }, or no token carrying loss)`,
    );
  }
  counts.examples = examples.length;

  const hash = createHash("sha256");
  hash.update("qgalore finetune data v1\n");
  hash.update(createHash("sha256").update(bytes).digest("hex"));
  tokenizerIdentity(tokenizer, hash);
  hash.update(JSON.stringify({ seqLen, tooLong, addEos }));
  if (chat !== null) hash.update((chat as ChatTemplate).text);
  return {
    path,
    kind: kind as Kind,
    examples,
    counts,
    fingerprint: hash.digest("hex"),
    padId: eos ?? 0,
  };
}

/** The chat template for `messages` data: opts.modelDir's, else the tokenizer folder's. */
function templateFor(at: string, tok: Tokenizer, modelDir: string | undefined): ChatTemplate {
  const json = tok.sourceFiles().find((f) => f.endsWith("tokenizer.json"));
  const dir = modelDir ?? (json === undefined ? undefined : dirname(json));
  if (dir === undefined) {
    throw new UsageError(
      `${at}: messages need a chat template, but the ${tok.kind} tokenizer has no model ` +
        `folder; give a Hugging Face model folder (or use prompt/completion or text data)`,
    );
  }
  try {
    return loadChatTemplate(dir);
  } catch (e) {
    throw e instanceof UsageError ? new UsageError(`${at}: ${e.message}`) : e;
  }
}

/** Renders a conversation and marks its assistant turns (see the module doc). */
function messagesDraft(
  at: string,
  chat: ChatTemplate,
  tok: Tokenizer,
  conv: ChatMessage[],
): Draft {
  const render = (msgs: ChatMessage[], gen: boolean): string => {
    try {
      return chat.render(msgs, { addGenerationPrompt: gen });
    } catch (e) {
      throw new UsageError(`${at}: ${messageOf(e)}`);
    }
  };
  const full = render(conv, false);
  const ids = tok.encode(full, { addSpecial: false });
  const mask = new Uint8Array(ids.length);
  let answerStart = ids.length;
  for (let i = 0; i < conv.length; i++) {
    if (conv[i].role !== "assistant") continue;
    const before = render(conv.slice(0, i), true);
    const through = render(conv.slice(0, i + 1), false);
    if (!full.startsWith(before) || !full.startsWith(through)) {
      throw new UsageError(
        `${at}: the chat template (${chat.source}) does not render messages[0..${i}] as a ` +
          `prefix of the whole conversation, so the assistant turn's tokens cannot be found`,
      );
    }
    const s = commonPrefix(tok.encode(before, { addSpecial: false }), ids);
    const e = commonPrefix(tok.encode(through, { addSpecial: false }), ids);
    if (e > s) {
      mask.fill(1, s, e);
      answerStart = s;
    }
  }
  return { ids, mask, answerStart };
}

/**
 * One line for logs and summaries, e.g. `train.jsonl (prompt): 120 lines, 118 examples
 * (3 truncated from the left, 2 refused), 20345 tokens, 5012 carrying loss`.
 */
export function describeFinetuneData(data: FinetuneData): string {
  const c = data.counts;
  return `${data.path} (${data.kind}): ${c.lines} lines, ${c.examples} examples ` +
    `(${c.truncated} truncated from the left, ${c.refused} refused), ${c.tokens} tokens, ` +
    `${c.lossTokens} carrying loss`;
}

/**
 * Splits off a validation part: `valFraction` of the examples (rounded, at least one each side)
 * chosen by a seeded shuffle; both parts keep file order. Text windows of one document may land
 * on both sides. A fraction outside (0, 1) or fewer than 2 examples is a one-line UsageError.
 */
export function splitFinetuneData(
  data: FinetuneData,
  valFraction: number,
  seed: number,
): { train: FinetuneData; val: FinetuneData } {
  if (!(valFraction > 0 && valFraction < 1)) {
    throw new UsageError(`validation fraction ${valFraction}: must be in (0, 1)`);
  }
  const n = data.examples.length;
  if (n < 2) {
    throw new UsageError(`${data.path}: ${n} example(s): a validation split needs at least 2`);
  }
  const nVal = Math.min(n - 1, Math.max(1, Math.round(n * valFraction)));
  const perm = shuffled(n, new Rng(seed));
  const isVal = new Uint8Array(n);
  for (let i = 0; i < nVal; i++) isVal[perm[i]] = 1;
  const part = (want: number, name: string): FinetuneData => {
    const examples = data.examples.filter((_, i) => isVal[i] === want);
    let tokens = 0;
    let lossTokens = 0;
    for (const ex of examples) {
      tokens += ex.tokens.length;
      for (let i = 1; i < ex.mask.length; i++) lossTokens += ex.mask[i];
    }
    const fingerprint = createHash("sha256")
      .update(`${data.fingerprint}\n${name}\n${valFraction}\n${seed}`).digest("hex");
    return {
      ...data,
      examples,
      counts: { ...data.counts, examples: examples.length, tokens, lossTokens },
      fingerprint,
    };
  };
  return { train: part(0, "train"), val: part(1, "val") };
}

/** A permutation of 0..n-1 (Fisher–Yates with `rng`). */
function shuffled(n: number, rng: Rng): Int32Array {
  const p = new Int32Array(n);
  for (let i = 0; i < n; i++) p[i] = i;
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    const t = p[i];
    p[i] = p[j];
    p[j] = t;
  }
  return p;
}

/**
 * One update's tokens: `rows` rows of t + 1 tokens (micro * batch rows for training), laid out
 * as the engine's trainStep / eval take them (interface A), with the loss mask.
 */
export interface FinetuneBatch {
  /** rows * (t + 1) ids; a row is an example followed by padding (the pad id). */
  tokens: Int32Array;
  /** Same layout; 1 = the target carries loss; padding and each row's first position are 0. */
  mask: Uint8Array;
  /** Targets per row: the longest example's, rounded up to a multiple of 8, capped at seqLen. */
  t: number;
  /** Targets carrying loss in the batch (mask ones, rows' first positions excluded). */
  count: number;
}

/** Options of {@link FinetuneSampler}. */
export interface SamplerOptions {
  /** Rows per micro-batch. */
  batch: number;
  /** Micro-batches per update (gradient accumulation). */
  micro: number;
  /** Longest t; every example must fit (at most seqLen + 1 tokens). */
  seqLen: number;
  /** Seed of the shuffles. */
  seed: number;
}

/** Where a sampler stands, to continue it exactly ({@link FinetuneSampler.restore}). JSON-safe. */
export interface SamplerState {
  /** Epoch of the next batch's plan (0-based). */
  epoch: number;
  /** Batches of that epoch already returned. */
  step: number;
  /** The generator's state at the start of that epoch's plan. */
  rng: [number, number, number, number];
  /** Fingerprint of the data the sampler ran on. */
  fingerprint: string;
  /** Rows per micro-batch, micro-batches per update and seqLen it ran with. */
  batch: number;
  /** Micro-batches per update. */
  micro: number;
  /** Longest t. */
  seqLen: number;
}

/** Groups of examples of similar length are this many updates wide before sorting. */
const SORT_CHUNK = 50;

function roundT(longest: number, seqLen: number): number {
  return Math.max(1, Math.min(seqLen, Math.ceil(longest / 8) * 8));
}

/** Lays out examples (by index) as rows; rows beyond them are padding only (mask 0). */
function buildBatch(
  data: FinetuneData,
  idx: ArrayLike<number>,
  rows: number,
  seqLen: number,
): FinetuneBatch {
  let longest = 1;
  for (let i = 0; i < idx.length; i++) {
    longest = Math.max(longest, data.examples[idx[i]].tokens.length - 1);
  }
  const t = roundT(longest, seqLen);
  const w = t + 1;
  const tokens = new Int32Array(rows * w).fill(data.padId);
  const mask = new Uint8Array(rows * w);
  let count = 0;
  for (let r = 0; r < idx.length; r++) {
    const ex = data.examples[idx[r]];
    tokens.set(ex.tokens, r * w);
    mask.set(ex.mask, r * w);
    mask[r * w] = 0;
    for (let i = 1; i < ex.mask.length; i++) count += ex.mask[i];
  }
  return { tokens, mask, t, count };
}

function checkFits(data: FinetuneData, seqLen: number): void {
  if (!Number.isInteger(seqLen) || seqLen < 1) {
    throw new UsageError(`seqLen ${seqLen}: must be an integer >= 1`);
  }
  if (data.examples.length === 0) throw new UsageError(`${data.path}: no examples`);
  let longest = 0;
  for (const ex of data.examples) longest = Math.max(longest, ex.tokens.length);
  if (longest > seqLen + 1) {
    throw new UsageError(
      `${data.path}: an example has ${longest} tokens, more than seqLen ${seqLen} + 1 ` +
        `(load the data with the same seqLen)`,
    );
  }
}

/**
 * Deterministic batches for training: each epoch is a fresh seeded shuffle of all examples;
 * the shuffled order is cut into chunks of 50 updates, each chunk sorted by length and cut into
 * updates of micro * batch rows (so an update's rows have similar lengths and little padding),
 * and the updates' order is shuffled again. Each epoch uses every example exactly once; the
 * epoch's last update may have fewer examples, the rest of its rows being padding (mask 0).
 */
export class FinetuneSampler {
  readonly #data: FinetuneData;
  readonly #opts: SamplerOptions;
  #rng: Rng;
  #epochRng: [number, number, number, number];
  #plan: Int32Array[] = [];
  #step = 0;
  #epoch = 0;

  /**
   * A sampler at the start of epoch 0. Bad options (batch, micro < 1) or an example longer
   * than seqLen + 1 tokens are one-line UsageErrors.
   */
  constructor(data: FinetuneData, opts: SamplerOptions) {
    for (const k of ["batch", "micro"] as const) {
      if (!Number.isInteger(opts[k]) || opts[k] < 1) {
        throw new UsageError(`${k} ${opts[k]}: must be an integer >= 1`);
      }
    }
    checkFits(data, opts.seqLen);
    this.#data = data;
    this.#opts = { ...opts };
    this.#rng = new Rng(opts.seed);
    this.#epochRng = this.#rng.state();
    this.#plan = this.#makePlan();
  }

  /** The epoch the most recent (or, before the first, the next) batch belongs to; 0-based. */
  get epoch(): number {
    return this.#epoch;
  }

  /** Updates per epoch. */
  get updatesPerEpoch(): number {
    return this.#plan.length;
  }

  #makePlan(): Int32Array[] {
    const ex = this.#data.examples;
    const u = this.#opts.batch * this.#opts.micro;
    const perm = shuffled(ex.length, this.#rng);
    const groups: Int32Array[] = [];
    const chunk = SORT_CHUNK * u;
    for (let c = 0; c < perm.length; c += chunk) {
      const part = Array.from(perm.subarray(c, Math.min(perm.length, c + chunk)));
      part.sort((a, b) => ex[a].tokens.length - ex[b].tokens.length || a - b);
      for (let g = 0; g < part.length; g += u) groups.push(Int32Array.from(part.slice(g, g + u)));
    }
    const order = shuffled(groups.length, this.#rng);
    return Array.from(order, (i) => groups[i]);
  }

  /** The next update: micro * batch rows of t + 1 tokens and their mask. */
  next(): FinetuneBatch {
    if (this.#step >= this.#plan.length) {
      this.#epoch++;
      this.#epochRng = this.#rng.state();
      this.#plan = this.#makePlan();
      this.#step = 0;
    }
    const idx = this.#plan[this.#step++];
    return buildBatch(
      this.#data,
      idx,
      this.#opts.batch * this.#opts.micro,
      this.#opts.seqLen,
    );
  }

  /** Where the sampler stands; {@link FinetuneSampler.restore} continues from exactly here. */
  state(): SamplerState {
    return {
      epoch: this.#epoch,
      step: this.#step,
      rng: [...this.#epochRng],
      fingerprint: this.#data.fingerprint,
      batch: this.#opts.batch,
      micro: this.#opts.micro,
      seqLen: this.#opts.seqLen,
    };
  }

  /**
   * A sampler that gives the batches the saved one would have given next. Data of another
   * fingerprint, other batch / micro / seqLen, or a malformed state is a one-line UsageError.
   */
  static restore(data: FinetuneData, opts: SamplerOptions, state: SamplerState): FinetuneSampler {
    const s = state as Partial<SamplerState> | null;
    if (
      typeof s !== "object" || s === null || !Number.isInteger(s.epoch) || s.epoch! < 0 ||
      !Number.isInteger(s.step) || s.step! < 0 || !Array.isArray(s.rng)
    ) {
      throw new UsageError(`sampler state ${JSON.stringify(state)}: malformed`);
    }
    if (s.fingerprint !== data.fingerprint) {
      throw new UsageError(
        `resume: the fine-tuning data is not the data of the checkpoint (fingerprint ` +
          `${String(s.fingerprint).slice(0, 12)}…, now ${data.fingerprint.slice(0, 12)}…): ` +
          `same file, tokenizer and options needed`,
      );
    }
    for (const k of ["batch", "micro", "seqLen"] as const) {
      if (s[k] !== opts[k]) {
        throw new UsageError(`resume: ${k} ${opts[k]} differs from the checkpoint's ${s[k]}`);
      }
    }
    const out = new FinetuneSampler(data, opts);
    let rng: Rng;
    try {
      rng = Rng.restore(s.rng);
    } catch (e) {
      throw new UsageError(`sampler state: ${messageOf(e)}`);
    }
    out.#rng = rng;
    out.#epochRng = rng.state();
    out.#plan = out.#makePlan();
    if (s.step! > out.#plan.length) {
      throw new UsageError(
        `sampler state: step ${s.step} beyond the epoch's ${out.#plan.length} updates`,
      );
    }
    out.#epoch = s.epoch!;
    out.#step = s.step!;
    return out;
  }
}

/**
 * Evaluation batches (micro = 1) covering every example exactly once: examples sorted by length
 * (ties by file order), `batch` rows each, the last batch padded with empty rows (mask 0).
 */
export function evalBatches(data: FinetuneData, batch: number, seqLen: number): FinetuneBatch[] {
  if (!Number.isInteger(batch) || batch < 1) {
    throw new UsageError(`batch ${batch}: must be an integer >= 1`);
  }
  checkFits(data, seqLen);
  const ex = data.examples;
  const order = Array.from(ex.keys()).sort((a, b) =>
    ex[a].tokens.length - ex[b].tokens.length || a - b
  );
  const out: FinetuneBatch[] = [];
  for (let i = 0; i < order.length; i += batch) {
    out.push(buildBatch(data, order.slice(i, i + batch), batch, seqLen));
  }
  return out;
}
