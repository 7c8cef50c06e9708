/**
 * Tokenizers: the byte tokenizer (the default: every file is valid input and the vocabulary
 * is tiny, which keeps the embedding and lm_head small enough for CPU runs) and Hugging Face
 * `tokenizer.json` files (LLaMA 2 and 3 style, and any other the `tokenizers` library
 * reads), which give exactly the ids Hugging Face gives, with BOS/EOS as the model folder's
 * `tokenizer_config.json` and `generation_config.json` say.
 *
 * @module
 */

import { EngineError } from "../ffi/engine.ts";
import { NativeProgress, NativeTokenizer } from "../ffi/data.ts";
import { UsageError } from "./errors.ts";

/** Text to token ids and back. */
export interface Tokenizer {
  /** `bytes` (id = byte) or `hf` (a Hugging Face tokenizer.json). */
  readonly kind: "bytes" | "hf";
  /** Number of ids: the largest id (added tokens included) + 1, so gaps count. */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, or null when the tokenizer has none. */
  readonly bosId: number | null;
  /** End-of-sequence id (written after each document of a corpus), or null. */
  readonly eosId: number | null;
  /** Every id that ends generation (tokenizer_config's and generation_config's). */
  readonly eosIds: number[];
  /** Token ids of `text`; `addSpecial` (default true) adds BOS/EOS as the model says. */
  encode(text: string, opts?: { addSpecial?: boolean }): Int32Array;
  /** Text of `ids`; `skipSpecial` (default false) drops special tokens. */
  decode(ids: ArrayLike<number>, opts?: { skipSpecial?: boolean }): string;
  /**
   * Writes `tokenizer.json` (+ `tokenizer_config.json`) into the folder `dir`, which must be
   * new or empty (a UsageError otherwise; nothing is replaced).
   */
  save(dir: string): void;
  /** The tokenizer files to copy when a model is exported (none for bytes). */
  sourceFiles(): string[];
}

/** An engine error from bad input becomes a UsageError with the engine's one line. */
function usage(e: unknown): unknown {
  return e instanceof EngineError && e.code === -1 ? new UsageError(e.message) : e;
}

/** Maps each byte to its own token id (0..255). Lossless for any input, UTF-8 or not. */
export class ByteTokenizer implements Tokenizer {
  /** Always `bytes`. */
  readonly kind = "bytes" as const;
  /** Number of distinct token ids. */
  readonly vocabSize: number = 256;
  /** No BOS. */
  readonly bosId: number | null = null;
  /** No EOS: documents of a corpus are simply concatenated. */
  readonly eosId: number | null = null;
  /** None. */
  readonly eosIds: number[] = [];

  /** Token ids for a string (UTF-8 encoded first) or raw bytes; there are no special tokens. */
  encode(input: string | Uint8Array, _opts?: { addSpecial?: boolean }): Int32Array {
    const bytes = typeof input === "string" ? new TextEncoder().encode(input) : input;
    return Int32Array.from(bytes);
  }

  /** Bytes for token ids; throws RangeError on an id outside 0..255. */
  decodeBytes(ids: ArrayLike<number>): Uint8Array {
    const out = new Uint8Array(ids.length);
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (!Number.isInteger(id) || id < 0 || id > 255) {
        throw new RangeError(`token id ${id} at ${i}: byte ids are 0..255`);
      }
      out[i] = id;
    }
    return out;
  }

  /** Text for token ids; invalid UTF-8 becomes U+FFFD rather than an error. */
  decode(ids: ArrayLike<number>, _opts?: { skipSpecial?: boolean }): string {
    return new TextDecoder().decode(this.decodeBytes(ids));
  }

  /**
   * Writes a `tokenizer.json` Hugging Face loads giving the same ids (a BPE of 256 `<0xNN>`
   * tokens with byte fallback and no merges) and a `tokenizer_config.json` into `dir`, a new
   * or empty folder.
   */
  save(dir: string): void {
    using native = NativeTokenizer.open("");
    try {
      native.save(dir);
    } catch (e) {
      throw usage(e);
    }
  }

  /** None: the byte tokenizer has no files. */
  sourceFiles(): string[] {
    return [];
  }
}

/** A Hugging Face `tokenizer.json` run by the engine (the `tokenizers` library). */
export class HfTokenizer implements Tokenizer, Disposable {
  /** Always `hf`. */
  readonly kind = "hf" as const;
  /** Number of ids: the largest id (added tokens included) + 1, so gaps count. */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, or null. */
  readonly bosId: number | null;
  /** End-of-sequence id, or null. */
  readonly eosId: number | null;
  /** Every id that ends generation. */
  readonly eosIds: number[];
  /** The engine handle (shard builds use it). */
  readonly native: NativeTokenizer;

  /** Wraps an opened engine tokenizer. */
  constructor(native: NativeTokenizer) {
    this.native = native;
    this.vocabSize = native.info.vocab_size;
    this.bosId = native.info.bos_id;
    this.eosId = native.info.eos_id;
    this.eosIds = native.info.eos_ids;
  }

  /** Token ids of `text`; `addSpecial` (default true) applies the model's post-processor. */
  encode(text: string, opts: { addSpecial?: boolean } = {}): Int32Array {
    return this.native.encode(text, opts.addSpecial ?? true);
  }

  /** Text of `ids`; `skipSpecial` (default false) drops special tokens. */
  decode(ids: ArrayLike<number>, opts: { skipSpecial?: boolean } = {}): string {
    const arr = ids instanceof Int32Array ? ids : Int32Array.from(ids);
    try {
      return this.native.decode(arr, opts.skipSpecial ?? false);
    } catch (e) {
      throw e instanceof EngineError && e.code === -1 ? new RangeError(e.message) : e;
    }
  }

  /**
   * Copies the tokenizer files (tokenizer.json and the folder's configs) into `dir`, a new or
   * empty folder (a UsageError otherwise; nothing is replaced).
   */
  save(dir: string): void {
    try {
      this.native.save(dir);
    } catch (e) {
      throw usage(e);
    }
  }

  /** tokenizer.json, tokenizer_config.json, generation_config.json (those present). */
  sourceFiles(): string[] {
    return [...this.native.info.files];
  }

  /** Frees the engine handle. */
  [Symbol.dispose](): void {
    this.native[Symbol.dispose]();
  }
}

/**
 * The tokenizer at `pathOrDir` (a `tokenizer.json`, or a model folder holding it with its
 * `tokenizer_config.json` / `generation_config.json`), or the byte tokenizer for null.
 * Throws a one-line UsageError for a missing or unreadable tokenizer.
 */
export function openTokenizer(pathOrDir: string | null): Tokenizer {
  if (pathOrDir === null) return new ByteTokenizer();
  try {
    return new HfTokenizer(NativeTokenizer.open(pathOrDir));
  } catch (e) {
    throw usage(e);
  }
}

/** Options of {@link trainTokenizer}. */
export interface TrainTokenizerOptions {
  /** Corpus files or folders (text, JSONL, gzip'd JSONL), read as `openCorpus` reads them. */
  inputs: string[];
  /** Vocabulary size (≥ 259: 256 bytes, BOS, EOS, then merges). */
  vocabSize: number;
  /** JSONL field holding the text (default `text`). */
  textField?: string;
  /** Folder the tokenizer files are written into: new or empty (checked before training). */
  out: string;
}

/**
 * Trains a byte-level BPE (LLaMA 3 style: its split regex, every input encodable) of
 * `vocabSize` ids from a corpus, with `<|begin_of_text|>` / `<|end_of_text|>` as BOS / EOS,
 * saves `tokenizer.json` and `tokenizer_config.json` into `out`, and opens it.
 */
export async function trainTokenizer(opts: TrainTokenizerOptions): Promise<Tokenizer> {
  using progress = new NativeProgress();
  try {
    const native = await NativeTokenizer.train({
      inputs: opts.inputs,
      vocab_size: opts.vocabSize,
      text_field: opts.textField,
      out: opts.out,
    }, progress);
    return new HfTokenizer(native);
  } catch (e) {
    throw usage(e);
  }
}
