/**
 * PLACEHOLDER of interface D (/work/plan/interfaces.md), written by h-ft so that the
 * fine-tuning driver can be built and tested before h-data's module lands; h-data's
 * lib/finetune_data.ts replaces this file whole (same exports, same semantics).
 *
 * Fine-tuning data: JSONL with `text` (every target carries loss) or `prompt` + `completion`
 * (loss on the completion only), tokenized into examples with a loss mask; a sampler that
 * groups examples of similar length into batches and can be restored exactly.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { UsageError } from "./errors.ts";
import { Rng } from "./rng.ts";
import type { Tokenizer } from "./tokenizer.ts";

/** One tokenized example; `mask[i]` = 1 when token i carries loss as a target. */
export interface FinetuneExample {
  /** Token ids. */
  tokens: Int32Array;
  /** Loss mask, same length. */
  mask: Uint8Array;
}

/** What loading a file found. */
export interface FinetuneCounts {
  /** Non-empty lines read. */
  lines: number;
  /** Examples kept. */
  examples: number;
  /** Examples shortened from the prompt side. */
  truncated: number;
  /** Examples refused (too long). */
  refused: number;
  /** Tokens of the kept examples. */
  tokens: number;
  /** Targets that carry loss in the kept examples. */
  lossTokens: number;
}

/** A loaded fine-tuning file. */
export interface FinetuneData {
  /** The file read. */
  path: string;
  /** Which fields its lines have. */
  kind: "text" | "prompt" | "messages";
  /** The examples. */
  examples: FinetuneExample[];
  /** Counts. */
  counts: FinetuneCounts;
  /** SHA-256 of the examples (tokens and masks). */
  fingerprint: string;
}

/** How {@link loadFinetuneData} tokenizes. */
export interface FinetuneDataOptions {
  /** Model sequence length: an example holds at most seqLen + 1 tokens. */
  seqLen: number;
  /** Longer examples: truncated from the prompt side (default) or refused. */
  tooLong?: "truncate" | "refuse";
  /** Model folder (its chat template). */
  modelDir?: string;
  /** Append EOS to each example (default true). */
  addEos?: boolean;
}

function fingerprintOf(kind: string, examples: FinetuneExample[]): string {
  const h = createHash("sha256");
  h.update(kind);
  for (const e of examples) {
    h.update(new Uint8Array(e.tokens.buffer, e.tokens.byteOffset, e.tokens.byteLength));
    h.update(e.mask);
    h.update(`|${e.tokens.length}`);
  }
  return h.digest("hex");
}

/** Reads and tokenizes a JSONL file; one-line UsageErrors naming the file and line. */
export async function loadFinetuneData(
  path: string,
  tokenizer: Tokenizer,
  opts: FinetuneDataOptions,
): Promise<FinetuneData> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new UsageError(`${path}: ${e instanceof Deno.errors.NotFound ? "not found" : e}`);
  }
  const max = opts.seqLen + 1;
  const eos = opts.addEos === false ? null : tokenizer.eosId;
  const counts: FinetuneCounts = {
    lines: 0,
    examples: 0,
    truncated: 0,
    refused: 0,
    tokens: 0,
    lossTokens: 0,
  };
  const examples: FinetuneExample[] = [];
  let kind: FinetuneData["kind"] | null = null;
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === "") continue;
    counts.lines++;
    let row: Record<string, unknown>;
    try {
      row = JSON.parse(line);
    } catch {
      throw new UsageError(`${path}:${i + 1}: not a JSON object`);
    }
    const k = typeof row?.prompt === "string" && typeof row?.completion === "string"
      ? "prompt"
      : typeof row?.text === "string"
      ? "text"
      : null;
    if (k === null) {
      throw new UsageError(
        `${path}:${i + 1}: needs "text", or "prompt" and "completion" (strings)`,
      );
    }
    if (kind !== null && k !== kind) {
      throw new UsageError(`${path}:${i + 1}: has ${k} fields; earlier lines have ${kind}`);
    }
    kind = k;
    let prompt: number[];
    let answer: number[];
    if (k === "text") {
      prompt = [];
      answer = [...tokenizer.encode(row.text as string)];
    } else {
      prompt = [...tokenizer.encode(row.prompt as string)];
      answer = [...tokenizer.encode(row.completion as string, { addSpecial: false })];
    }
    if (eos !== null) answer.push(eos);
    if (prompt.length + answer.length > max) {
      // the answer is never cut: a prompt keeps its first token (BOS) and loses its start
      const keep = max - answer.length - (k === "text" ? 0 : 1);
      if (opts.tooLong === "refuse" || k === "text" || keep < 0) {
        counts.refused++;
        continue;
      }
      prompt = [prompt[0], ...prompt.slice(prompt.length - keep)];
      counts.truncated++;
    }
    const tokens = Int32Array.from([...prompt, ...answer]);
    const mask = new Uint8Array(tokens.length);
    // a text's first token is no target; a completion's targets all carry loss
    mask.fill(1, Math.max(1, prompt.length));
    counts.examples++;
    counts.tokens += tokens.length;
    counts.lossTokens += tokens.length - Math.max(1, prompt.length);
    examples.push({ tokens, mask });
  }
  if (kind === null) throw new UsageError(`${path}: no examples (empty file)`);
  return { path, kind, examples, counts, fingerprint: fingerprintOf(kind, examples) };
}

function subset(data: FinetuneData, idx: number[]): FinetuneData {
  const examples = idx.map((i) => data.examples[i]);
  const counts: FinetuneCounts = {
    lines: examples.length,
    examples: examples.length,
    truncated: 0,
    refused: 0,
    tokens: examples.reduce((a, e) => a + e.tokens.length, 0),
    lossTokens: examples.reduce(
      (a, e) => a + e.mask.reduce((x, m, j) => x + (j > 0 ? m : 0), 0),
      0,
    ),
  };
  return {
    path: data.path,
    kind: data.kind,
    examples,
    counts,
    fingerprint: fingerprintOf(data.kind, examples),
  };
}

/** A seeded split: `valFraction` of the examples (at least one) held out. */
export function splitFinetuneData(
  data: FinetuneData,
  valFraction: number,
  seed: number,
): { train: FinetuneData; val: FinetuneData } {
  const n = data.examples.length;
  const order = permutation(n, new Rng(seed ^ 0x5eed));
  const nVal = Math.min(n - 1, Math.max(1, Math.round(n * valFraction)));
  const val = order.slice(0, nVal).sort((a, b) => a - b);
  const train = order.slice(nVal).sort((a, b) => a - b);
  return { train: subset(data, train), val: subset(data, val) };
}

function permutation(n: number, rng: Rng): number[] {
  const p = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [p[i], p[j]] = [p[j], p[i]];
  }
  return p;
}

/** `micro × batch` rows of `t + 1` tokens with their mask; `count` = targets carrying loss. */
export interface FinetuneBatch {
  /** Token ids. */
  tokens: Int32Array;
  /** Loss mask. */
  mask: Uint8Array;
  /** Row length − 1. */
  t: number;
  /** Targets that carry loss. */
  count: number;
}

/** Where a {@link FinetuneSampler} is. */
export interface SamplerState {
  /** Epoch (0-based). */
  epoch: number;
  /** Examples of the epoch's order already used. */
  pos: number;
}

function pack(rows: (FinetuneExample | null)[], seqLen: number, pad: number): FinetuneBatch {
  const longest = Math.max(2, ...rows.map((r) => r?.tokens.length ?? 0));
  const t = Math.min(seqLen, Math.ceil((longest - 1) / 8) * 8);
  const tokens = new Int32Array(rows.length * (t + 1)).fill(pad);
  const mask = new Uint8Array(rows.length * (t + 1));
  let count = 0;
  rows.forEach((r, i) => {
    if (r === null) return;
    tokens.set(r.tokens, i * (t + 1));
    mask.set(r.mask, i * (t + 1));
    mask[i * (t + 1)] = 0;
    for (let j = 1; j < r.mask.length; j++) count += r.mask[j];
  });
  return { tokens, mask, t, count };
}

function padOf(_data: FinetuneData): number {
  return 0; // pad positions carry no loss; their id does not matter
}

/** Batches of the training examples, epoch after epoch, each epoch in a seeded order. */
export class FinetuneSampler {
  readonly #data: FinetuneData;
  readonly #opts: { batch: number; micro: number; seqLen: number; seed: number };
  #epoch = 0;
  #pos = 0;
  #order: number[];

  /** A sampler at the start of epoch 0. */
  constructor(
    data: FinetuneData,
    opts: { batch: number; micro: number; seqLen: number; seed: number },
  ) {
    if (data.examples.length === 0) throw new UsageError(`${data.path}: no training examples`);
    this.#data = data;
    this.#opts = opts;
    this.#order = this.#orderOf(0);
  }

  #orderOf(epoch: number): number[] {
    const p = permutation(this.#data.examples.length, new Rng(this.#opts.seed * 1009 + epoch));
    // similar lengths together: sort runs of 8 updates' worth by length
    const run = this.#opts.batch * this.#opts.micro * 8;
    const len = (i: number) => this.#data.examples[i].tokens.length;
    const out: number[] = [];
    for (let i = 0; i < p.length; i += run) {
      out.push(...p.slice(i, i + run).sort((a, b) => len(a) - len(b)));
    }
    return out;
  }

  /** Epochs completed. */
  get epoch(): number {
    return this.#epoch;
  }

  /** The next update's micro-batches. */
  next(): FinetuneBatch {
    const rows: FinetuneExample[] = [];
    const n = this.#opts.batch * this.#opts.micro;
    while (rows.length < n) {
      if (this.#pos >= this.#order.length) {
        this.#epoch++;
        this.#pos = 0;
        this.#order = this.#orderOf(this.#epoch);
      }
      rows.push(this.#data.examples[this.#order[this.#pos++]]);
    }
    return pack(rows, this.#opts.seqLen, padOf(this.#data));
  }

  /** The position, for {@link FinetuneSampler.restore}. */
  state(): SamplerState {
    return { epoch: this.#epoch, pos: this.#pos };
  }

  /** A sampler at a saved position. */
  static restore(
    data: FinetuneData,
    opts: { batch: number; micro: number; seqLen: number; seed: number },
    state: SamplerState,
  ): FinetuneSampler {
    const s = new FinetuneSampler(data, opts);
    if (
      !Number.isInteger(state?.epoch) || !Number.isInteger(state?.pos) || state.epoch < 0 ||
      state.pos < 0 || state.pos > data.examples.length
    ) throw new UsageError(`sampler state ${JSON.stringify(state)}: malformed`);
    s.#epoch = state.epoch;
    s.#pos = state.pos;
    s.#order = s.#orderOf(state.epoch);
    return s;
  }
}

/** Every example exactly once, in batches of `batch` rows (the last padded with empty rows). */
export function evalBatches(data: FinetuneData, batch: number, seqLen: number): FinetuneBatch[] {
  const out: FinetuneBatch[] = [];
  const idx = data.examples.map((_, i) => i).sort((a, b) =>
    data.examples[a].tokens.length - data.examples[b].tokens.length
  );
  for (let i = 0; i < idx.length; i += batch) {
    const rows: (FinetuneExample | null)[] = idx.slice(i, i + batch).map((j) => data.examples[j]);
    while (rows.length < batch) rows.push(null);
    out.push(pack(rows, seqLen, padOf(data)));
  }
  return out;
}
