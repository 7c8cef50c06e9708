/**
 * Training data: a byte-level text file, the embedded synthetic corpus whose entropy per
 * token is known exactly (so a run can be judged against the best achievable loss), or a
 * corpus of any size (text, JSONL, gzip'd JSONL, folders of them) tokenized once into
 * cached, memory-mapped token shards ({@link openCorpus}).
 *
 * Batches use the engine's layout: rows of `seqLen + 1` token ids, row-major; the first
 * `seqLen` ids of a row are inputs and ids 1..seqLen the targets.
 *
 * @module
 */

import { shortValue, UsageError } from "./errors.ts";
import { checkNumber } from "./options.ts";
import { Rng } from "./rng.ts";
import { ByteTokenizer, HfTokenizer, type Tokenizer } from "./tokenizer.ts";
import { EngineError } from "../ffi/engine.ts";
import { NativeProgress, NativeShards, NativeTokenizer, type ShardInfo } from "../ffi/data.ts";

/** A token source with a training split (sampled) and a validation split (fixed). */
export interface Dataset {
  /** Token ids are in [0, vocabSize). */
  readonly vocabSize: number;
  /** Best achievable mean cross-entropy per target token in nats, when known analytically. */
  readonly entropyFloor?: number;
  /** `micro × batch` random training windows of `seqLen + 1` tokens, drawn with `rng`. */
  trainBatch(rng: Rng, batch: number, seqLen: number, micro: number): Int32Array;
  /**
   * `n × batch` validation windows of `seqLen + 1` tokens. Deterministic: the same arguments
   * always give the same windows, so losses of different runs are comparable.
   */
  valBatches(n: number, batch: number, seqLen: number): Int32Array;
  /** The whole token stream of a split. */
  tokens(split: "train" | "val"): Int32Array;
  /**
   * The token stream of a split in consecutive pieces (for a corpus too large to copy whole);
   * absent when {@link Dataset.tokens} holds it in memory already.
   */
  tokenChunks?(split: "train" | "val"): Iterable<Int32Array>;
  /** One-line human description. */
  describe(): string;
}

/**
 * Training data as `train()` takes it: a path (text, JSONL, folder), a {@link Dataset}
 * object, or `{ text }` (byte-tokenized, its tail the validation split).
 */
export type DataInput = string | Dataset | { text: string };

/** Whether `v` has the {@link Dataset} methods a run calls. */
export function isDataset(v: unknown): v is Dataset {
  if (typeof v !== "object" || v === null) return false;
  const d = v as Record<string, unknown>;
  return typeof d.vocabSize === "number" && typeof d.trainBatch === "function" &&
    typeof d.valBatches === "function" && typeof d.tokens === "function" &&
    typeof d.describe === "function";
}

/**
 * The in-memory form of a `data` value that is not a path: a {@link Dataset} as given, or
 * `{ text }` split into a {@link TextDataset}. Throws a one-line UsageError that quotes at
 * most ~80 characters of the value (never the data itself).
 */
export function inMemoryDataset(
  data: unknown,
  opts: { valFraction: number; seqLen: number },
  flag = "--data",
): Dataset {
  const given = checkDataInput(data, flag);
  if (isDataset(given)) return given;
  return TextDataset.fromText(given.text, { ...opts, label: `${flag} { text }` });
}

/**
 * `data` as a {@link Dataset} or `{ text }`, checked by shape only (nothing is read); a
 * one-line UsageError quoting at most ~80 characters of the value otherwise.
 */
export function checkDataInput(data: unknown, flag = "--data"): Dataset | { text: string } {
  if (isDataset(data)) return data;
  if (typeof data === "object" && data !== null && !Array.isArray(data)) {
    const text = (data as { text?: unknown }).text;
    if (Object.keys(data).length === 1 && typeof text === "string") {
      if (text.length === 0) throw new UsageError(`${flag} { text: "" }: the text is empty`);
      return { text };
    }
  }
  throw new UsageError(
    `${flag} ${shortValue(data)}: must be a path (text file, folder, JSONL), a Dataset ` +
      '(vocabSize, trainBatch, valBatches, tokens, describe) or { text: "…" }',
  );
}

/** Options of {@link TextDataset}. */
export interface TextDatasetOptions {
  /** Fraction of the tokens, taken from the end, used for validation; in (0, 1). */
  valFraction: number;
  /** Window length the splits must hold at least once (plus one target). */
  seqLen: number;
  /** Names the source in error messages; defaults to the file path or "text". */
  label?: string;
}

/** A byte-tokenized text; the last `valFraction` of its tokens is the validation split. */
export class TextDataset implements Dataset {
  /** Byte vocabulary. */
  readonly vocabSize: number = 256;
  /** Training tokens (the head of the text). */
  readonly train: Int32Array;
  /** Validation tokens (the tail of the text). */
  readonly val: Int32Array;
  #name: string;

  /** Splits `tokens`; throws UsageError when a split cannot hold one window. */
  constructor(tokens: Int32Array, opts: TextDatasetOptions) {
    const label = opts.label ?? "text";
    const { valFraction, seqLen } = opts;
    checkNumber("valFraction", valFraction); // the option table's range
    const window = seqLen + 1;
    const nVal = Math.floor(tokens.length * valFraction);
    const nTrain = tokens.length - nVal;
    if (nTrain < window || nVal < window) {
      const need = Math.ceil(window / Math.min(valFraction, 1 - valFraction));
      throw new UsageError(
        `${label}: ${tokens.length} tokens split into ${nTrain} train + ${nVal} validation ` +
          `(val fraction ${valFraction}); each split needs at least ${window} ` +
          `(seq_len ${seqLen} + 1), so at least ~${need} tokens in all`,
      );
    }
    this.train = tokens.subarray(0, nTrain);
    this.val = tokens.subarray(nTrain);
    this.#name = label;
  }

  /** Reads and byte-tokenizes a file; UsageError for a missing, empty or too short file. */
  static fromFile(path: string, opts: TextDatasetOptions): TextDataset {
    const label = opts.label ?? path;
    let bytes: Uint8Array;
    try {
      bytes = Deno.readFileSync(path);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) throw new UsageError(`${label}: file not found`);
      if (e instanceof Deno.errors.IsADirectory) {
        throw new UsageError(`${label}: is a directory, expected a text file`);
      }
      const why = (e instanceof Error ? e.message : String(e)).split("\n")[0];
      throw new UsageError(`${label}: cannot read (${why})`);
    }
    if (bytes.length === 0) {
      throw new UsageError(
        `${label}: file is empty (0 tokens); need at least ${
          2 * (opts.seqLen + 1)
        } tokens (one window of seq_len + 1 per split)`,
      );
    }
    return new TextDataset(new ByteTokenizer().encode(bytes), { ...opts, label });
  }

  /** Splits a string (UTF-8 bytes). */
  static fromText(text: string, opts: TextDatasetOptions): TextDataset {
    return new TextDataset(new ByteTokenizer().encode(text), opts);
  }

  /** Random windows from the training split. */
  trainBatch(rng: Rng, batch: number, seqLen: number, micro: number): Int32Array {
    return randomWindows(this.train, rng, micro * batch, seqLen);
  }

  /** Evenly spaced windows covering the validation split. */
  valBatches(n: number, batch: number, seqLen: number): Int32Array {
    return spreadWindows(this.val, n * batch, seqLen);
  }

  /** The token stream of a split. */
  tokens(split: "train" | "val"): Int32Array {
    return split === "train" ? this.train : this.val;
  }

  /** E.g. `text corpus.txt: 1000000 tokens (900000 train, 100000 val), bytes`. */
  describe(): string {
    const n = this.train.length + this.val.length;
    return `text ${this.#name}: ${n} byte tokens (${this.train.length} train, ${this.val.length} val)`;
  }
}

/** Options of {@link SyntheticCorpus}; every field has a default. */
export interface SyntheticOptions {
  /** Seed of the training stream; the validation stream uses a derived seed. Default 42. */
  seed?: number;
  /** Length of the training stream. Default 2^21 (about 2.1 M tokens). */
  trainTokens?: number;
  /** Length of the validation stream. Default 2^17 (131072 tokens). */
  valTokens?: number;
  /** Step offsets of the walk (distinct modulo the alphabet size). */
  offsets?: readonly number[];
  /** Positive integer weights of the offsets (their probabilities up to normalisation). */
  weights?: readonly number[];
}

/** The 64 printable bytes the walk's states map to (the base64url alphabet). */
export const SYNTHETIC_ALPHABET =
  "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

const DEFAULT_OFFSETS = [1, 2, 3, 5, 8, 13, 21, 34];
const DEFAULT_WEIGHTS = [30, 20, 15, 12, 9, 7, 4, 3];

/**
 * The default dataset when no text is given: a random walk on Z_64,
 * x_t = (x_{t−1} + d_t) mod 64, with i.i.d. steps d_t from a fixed uneven distribution p over
 * a few offsets, each state printed as one of 64 distinct printable bytes.
 *
 * The transition matrix is circulant, hence doubly stochastic, so the uniform law is
 * stationary and every target's entropy given its past is exactly H(p): that is
 * {@link SyntheticCorpus.entropyFloor}, the loss a perfect model reaches. A model that only
 * learns the unigram law stops at ln 64 ≈ 4.16 nats; one that learns nothing sits at
 * ln 256 ≈ 5.55.
 *
 * The corpus seed is separate from a run's seed, so runs with different seeds still train
 * and validate on the same text. Streams are generated on first use (a few ms).
 */
export class SyntheticCorpus implements Dataset {
  /** Byte vocabulary (only 64 ids occur). */
  readonly vocabSize: number = 256;
  /** H(p) in nats. */
  readonly entropyFloor: number;
  /** Seed of the training stream. */
  readonly seed: number;
  #offsets: readonly number[];
  #table: Uint8Array;
  #lengths: { train: number; val: number };
  #streams: { train?: Int32Array; val?: Int32Array } = {};

  /** Validates the options; generation is deferred until a split is used. */
  constructor(opts: SyntheticOptions = {}) {
    const k = SYNTHETIC_ALPHABET.length;
    this.seed = opts.seed ?? 42;
    this.#offsets = opts.offsets ?? DEFAULT_OFFSETS;
    const weights = opts.weights ?? DEFAULT_WEIGHTS;
    if (weights.length !== this.#offsets.length || weights.length === 0) {
      throw new RangeError("SyntheticCorpus: offsets and weights must be non-empty, same length");
    }
    const residues = new Set(this.#offsets.map((d) => ((d % k) + k) % k));
    if (residues.size !== this.#offsets.length) {
      throw new RangeError(`SyntheticCorpus: offsets must be distinct modulo ${k}`);
    }
    if (!weights.every((w) => Number.isInteger(w) && w > 0)) {
      throw new RangeError("SyntheticCorpus: weights must be positive integers");
    }
    const total = weights.reduce((a, b) => a + b, 0);
    if (total > 1 << 16) throw new RangeError("SyntheticCorpus: weights must sum to ≤ 65536");
    // One slot per unit of weight makes sampling exact: p_i = w_i / total.
    this.#table = new Uint8Array(total);
    let at = 0;
    weights.forEach((w, i) => this.#table.fill(i, at, at += w));
    this.entropyFloor = -weights.reduce((h, w) => h + (w / total) * Math.log(w / total), 0);
    this.#lengths = { train: opts.trainTokens ?? 1 << 21, val: opts.valTokens ?? 1 << 17 };
  }

  /** Offsets and their probabilities. */
  get steps(): { offset: number; p: number }[] {
    const total = this.#table.length;
    return this.#offsets.map((offset, i) => ({
      offset,
      p: this.#table.filter((j) => j === i).length / total,
    }));
  }

  /** The generated stream of a split (byte ids of {@link SYNTHETIC_ALPHABET}). */
  tokens(split: "train" | "val"): Int32Array {
    return (this.#streams[split] ??= this.#generate(split));
  }

  /** Random windows from the training stream. */
  trainBatch(rng: Rng, batch: number, seqLen: number, micro: number): Int32Array {
    return randomWindows(this.tokens("train"), rng, micro * batch, seqLen);
  }

  /** Evenly spaced windows covering the validation stream. */
  valBatches(n: number, batch: number, seqLen: number): Int32Array {
    return spreadWindows(this.tokens("val"), n * batch, seqLen);
  }

  /** E.g. `synthetic random walk on 64 symbols, floor 1.859 nats/token`. */
  describe(): string {
    return `synthetic random walk on ${SYNTHETIC_ALPHABET.length} symbols ` +
      `(seed ${this.seed}, ${this.#lengths.train} train + ${this.#lengths.val} val tokens), ` +
      `entropy floor ${this.entropyFloor.toFixed(4)} nats/token`;
  }

  #generate(split: "train" | "val"): Int32Array {
    const k = SYNTHETIC_ALPHABET.length;
    const n = this.#lengths[split];
    // A fixed odd constant keeps the validation stream independent of the training one.
    const rng = new Rng(split === "train" ? this.seed : this.seed + 0x5bd1e995);
    const codes = new TextEncoder().encode(SYNTHETIC_ALPHABET);
    const steps = this.#offsets.map((d) => ((d % k) + k) % k);
    const table = this.#table;
    const out = new Int32Array(n);
    let x = rng.int(k);
    for (let i = 0; i < n; i++) {
      out[i] = codes[x];
      x = (x + steps[table[rng.int(table.length)]]) % k;
    }
    return out;
  }
}

function checkWindow(stream: Int32Array, seqLen: number): number {
  const window = seqLen + 1;
  if (!Number.isInteger(seqLen) || seqLen < 1 || window > stream.length) {
    throw new RangeError(`seq_len ${seqLen}: windows of ${window} exceed ${stream.length} tokens`);
  }
  return window;
}

function randomWindows(stream: Int32Array, rng: Rng, rows: number, seqLen: number): Int32Array {
  const window = checkWindow(stream, seqLen);
  const out = new Int32Array(rows * window);
  const starts = stream.length - window + 1;
  for (let r = 0; r < rows; r++) {
    const s = rng.int(starts);
    out.set(stream.subarray(s, s + window), r * window);
  }
  return out;
}

function spreadWindows(stream: Int32Array, rows: number, seqLen: number): Int32Array {
  const window = checkWindow(stream, seqLen);
  const out = new Int32Array(rows * window);
  const last = stream.length - window;
  for (let r = 0; r < rows; r++) {
    // Evenly spaced starts cover the whole split; they overlap only when it is short.
    const s = rows === 1 ? 0 : Math.floor((r * last) / (rows - 1));
    out.set(stream.subarray(s, s + window), r * window);
  }
  return out;
}

/** Source options of {@link openDataset}. */
export interface OpenDatasetOptions {
  /** Text file, or null for the synthetic corpus. */
  data: string | null;
  /** Validation share of a text file. */
  valFraction: number;
  /** Window length both splits must hold. */
  seqLen: number;
}

/**
 * The dataset a run trains on: the text file named by `data` (errors name `--data`), or the
 * synthetic corpus when `data` is null.
 */
export function openDataset(opts: OpenDatasetOptions): Dataset {
  if (opts.data === null) return new SyntheticCorpus();
  return TextDataset.fromFile(opts.data, {
    valFraction: opts.valFraction,
    seqLen: opts.seqLen,
    label: `--data ${opts.data}`,
  });
}

/** Options of {@link openCorpus}. */
export interface CorpusOptions {
  /** A text file (one document), a JSONL file (one document per line), gzip'd JSONL, or a
   * folder of such files (recursive, sorted by path). */
  data: string;
  /** The tokenizer: {@link ByteTokenizer} or one from `openTokenizer` / `trainTokenizer`. */
  tokenizer: Tokenizer;
  /** JSONL field holding the text (default `text`). */
  textField?: string;
  /** Share of the documents held out for validation, in (0, 1). */
  valFraction: number;
  /** Window length both splits must hold at least once (plus one target). */
  seqLen: number;
  /** Cache root (default `$QGALORE_CACHE/tokens`, else `~/.cache/qgalore/tokens`). */
  cacheDir?: string;
  /** Progress on stderr: a bar on a terminal, else one line at the end (default true). */
  progress?: boolean;
  /** Tokenizing threads (default: one per core; more than 4 per core are 4 per core). */
  threads?: number;
}

/** The default cache root of token shards. */
export function defaultTokenCache(): string {
  const root = Deno.env.get("QGALORE_CACHE");
  if (root) return `${root}/tokens`;
  const home = Deno.env.get("HOME") ?? Deno.env.get("USERPROFILE") ?? ".";
  return `${home}/.cache/qgalore/tokens`;
}

const MB = 1e6;

function bar(label: string, read: number, total: number, seconds: number): string {
  const f = total > 0 ? Math.min(1, read / total) : 0;
  const width = 30;
  const done = Math.round(f * width);
  const rate = seconds > 0 ? read / MB / seconds : 0;
  return `\r\x1b[K${label} [${"#".repeat(done)}${".".repeat(width - done)}] ` +
    `${(100 * f).toFixed(0).padStart(3)}% ${(read / MB).toFixed(1)}/${
      (total / MB).toFixed(1)
    } MB ` +
    `${rate.toFixed(1)} MB/s`;
}

/**
 * Opens a corpus as token shards: tokenized once (in parallel, streaming, memory bounded
 * whatever its size) into a cache folder keyed by the tokenizer and the inputs, reused by
 * later calls. Each document is followed by EOS when the tokenizer has one; validation is
 * split by documents. Bad input (a JSONL line that is not JSON or lacks the field, a
 * truncated gzip stream, text that is not UTF-8, an empty corpus) is a one-line UsageError.
 */
export async function openCorpus(opts: CorpusOptions): Promise<ShardDataset> {
  checkNumber("valFraction", opts.valFraction);
  const tok = opts.tokenizer;
  let native: NativeTokenizer;
  let own = false;
  if (tok instanceof HfTokenizer) native = tok.native;
  else if (tok instanceof ByteTokenizer) [native, own] = [NativeTokenizer.open(""), true];
  else {throw new UsageError(
      "openCorpus: the tokenizer must be a ByteTokenizer or come from openTokenizer / trainTokenizer",
    );}
  const show = opts.progress ?? true;
  const tty = show && Deno.stderr.isTerminal();
  const label = `tokenizing ${opts.data}`;
  const enc = new TextEncoder();
  using progress = new NativeProgress();
  const t0 = performance.now();
  const timer = tty
    ? setInterval(() => {
      const [read, total] = progress.get();
      Deno.stderr.writeSync(enc.encode(bar(label, read, total, (performance.now() - t0) / 1e3)));
    }, 200)
    : undefined;
  let shards: NativeShards;
  try {
    shards = await NativeShards.build(native, {
      data: opts.data,
      text_field: opts.textField,
      val_fraction: opts.valFraction,
      cache_dir: opts.cacheDir ?? defaultTokenCache(),
      threads: opts.threads ?? 0,
    }, progress);
  } catch (e) {
    throw e instanceof EngineError && e.code === -1 ? new UsageError(e.message) : e;
  } finally {
    if (timer !== undefined) {
      clearInterval(timer);
      Deno.stderr.writeSync(enc.encode("\r\x1b[K"));
    }
    if (own) native[Symbol.dispose]();
  }
  if (show) {
    const i = shards.info;
    const s = (performance.now() - t0) / 1e3;
    const what = i.cached
      ? `token shards of ${opts.data}: cached in ${i.dir}`
      : `tokenized ${opts.data}: ${(i.bytes / MB).toFixed(1)} MB in ${s.toFixed(1)} s ` +
        `(${(i.bytes / MB / s).toFixed(1)} MB/s) into ${i.dir}`;
    Deno.stderr.writeSync(
      enc.encode(
        `${what}; ${i.train_tokens} train + ${i.val_tokens} val tokens, ` +
          `${i.docs.train} + ${i.docs.val} documents\n`,
      ),
    );
  }
  try {
    return new ShardDataset(shards, opts.seqLen, opts.data);
  } catch (e) {
    shards[Symbol.dispose]();
    throw e;
  }
}

/** A uniform start in [0, n); `n` may exceed 2^32. */
function drawStart(rng: Rng, n: number): number {
  if (n <= 0x1_0000_0000) return rng.int(n);
  // Two draws: high part, then the low 32 bits, rejecting the sliver past n.
  for (;;) {
    const hi = rng.int(Math.ceil(n / 0x1_0000_0000));
    const s = hi * 0x1_0000_0000 + rng.nextU32();
    if (s < n) return s;
  }
}

/**
 * A corpus as memory-mapped token shards ({@link openCorpus}). Windows are copied out by
 * the engine; they may span documents (EOS separates them).
 */
export class ShardDataset implements Dataset, Disposable {
  /** Token ids are in [0, vocabSize). */
  readonly vocabSize: number;
  /** What the engine reports: token and document counts, dtype, cache folder. */
  readonly info: ShardInfo;
  /** Whether the shards came from the cache (no tokenizing this time). */
  readonly cached: boolean;
  #shards: NativeShards;
  #name: string;

  /** Wraps opened shards; UsageError when a split cannot hold one window of `seqLen + 1`. */
  constructor(shards: NativeShards, seqLen: number, label = "corpus") {
    this.#shards = shards;
    this.info = shards.info;
    this.vocabSize = this.info.vocab_size;
    this.cached = this.info.cached;
    this.#name = label;
    const window = seqLen + 1;
    const { train_tokens: nTrain, val_tokens: nVal } = this.info;
    if (nTrain < window || nVal < window) {
      throw new UsageError(
        `${label}: ${nTrain + nVal} tokens split into ${nTrain} train + ${nVal} validation ` +
          `(${this.info.docs.train} + ${this.info.docs.val} documents); each split needs at ` +
          `least ${window} (seq_len ${seqLen} + 1)`,
      );
    }
  }

  #count(split: "train" | "val"): number {
    return split === "train" ? this.info.train_tokens : this.info.val_tokens;
  }

  #windows(split: "train" | "val", starts: number[], seqLen: number): Int32Array {
    const window = seqLen + 1;
    const n = this.#count(split);
    if (!Number.isInteger(seqLen) || seqLen < 1 || window > n) {
      throw new RangeError(`seq_len ${seqLen}: windows of ${window} exceed ${n} tokens`);
    }
    const out = new Int32Array(starts.length * window);
    this.#shards.read(split, BigUint64Array.from(starts, BigInt), window, out);
    return out;
  }

  /** `micro × batch` random windows of the training split, drawn with `rng`. */
  trainBatch(rng: Rng, batch: number, seqLen: number, micro: number): Int32Array {
    const n = this.#count("train") - seqLen;
    const starts = Array.from({ length: micro * batch }, () => drawStart(rng, Math.max(1, n)));
    return this.#windows("train", starts, seqLen);
  }

  /** `n × batch` evenly spaced windows covering the validation split. */
  valBatches(n: number, batch: number, seqLen: number): Int32Array {
    const rows = n * batch;
    const last = this.#count("val") - (seqLen + 1);
    const starts = Array.from(
      { length: rows },
      (_, r) => rows === 1 ? 0 : Math.floor((r * Math.max(0, last)) / (rows - 1)),
    );
    return this.#windows("val", starts, seqLen);
  }

  /** Opens a finished shard folder (`info.dir` of an earlier {@link openCorpus}). */
  static open(dir: string, seqLen: number): ShardDataset {
    let shards: NativeShards;
    try {
      shards = NativeShards.open(dir);
    } catch (e) {
      throw e instanceof EngineError && e.code === -1 ? new UsageError(e.message) : e;
    }
    try {
      return new ShardDataset(shards, seqLen, dir);
    } catch (e) {
      shards[Symbol.dispose]();
      throw e;
    }
  }

  /** The whole split copied out (for small corpora; a large one would not fit). */
  tokens(split: "train" | "val"): Int32Array {
    const n = this.#count(split);
    if (n > 2 ** 31 - 1) {
      throw new RangeError(`the ${split} split has ${n} tokens, too many for one Int32Array`);
    }
    const out = new Int32Array(n);
    if (n > 0) this.#shards.read(split, BigUint64Array.of(0n), n, out);
    return out;
  }

  /** The split in consecutive pieces of 1 Mi tokens, each read into the same buffer. */
  *tokenChunks(split: "train" | "val"): Generator<Int32Array> {
    const n = this.#count(split);
    const buf = new Int32Array(Math.min(n, 1 << 20));
    for (let at = 0; at < n; at += buf.length) {
      const len = Math.min(buf.length, n - at);
      const out = buf.subarray(0, len);
      this.#shards.read(split, BigUint64Array.of(BigInt(at)), len, out);
      yield out;
    }
  }

  /** E.g. `corpus c4/: 1200000 tokens (1080000 train, 120000 val; 900 + 100 documents), uint16`. */
  describe(): string {
    const i = this.info;
    return `corpus ${this.#name}: ${i.train_tokens + i.val_tokens} tokens (${i.train_tokens} ` +
      `train, ${i.val_tokens} val; ${i.docs.train} + ${i.docs.val} documents), ${i.dtype}`;
  }

  /** Unmaps the shards. */
  [Symbol.dispose](): void {
    this.#shards[Symbol.dispose]();
  }
}
