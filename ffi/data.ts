/**
 * Typed, disposable handles over the engine's data entries (`rust/src/data/`): tokenizers,
 * token shard sets and the progress counter of long calls. Only `ffi/` touches pointers.
 * @module
 */
import { EngineError } from "./engine.ts";
import { loadLibrary } from "./loader.ts";
import type { NativeLib } from "./symbols.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** What the engine reports about a tokenizer. */
export interface TokenizerInfo {
  /** `bytes` (id = byte) or `hf` (a Hugging Face tokenizer.json). */
  kind: "bytes" | "hf";
  /** Number of ids, added tokens included. */
  vocab_size: number;
  /** Beginning-of-sequence id, if the model has one. */
  bos_id: number | null;
  /** End-of-sequence id (the tokenizer config's), if any. */
  eos_id: number | null;
  /** Every id that ends generation (the tokenizer's and generation_config's). */
  eos_ids: number[];
  /** Whether encoding with special tokens puts BOS first. */
  adds_bos: boolean;
  /** Whether encoding with special tokens puts EOS last. */
  adds_eos: boolean;
  /** The model folder's tokenizer files. */
  files: string[];
}

/** What the engine reports about a shard set. */
export interface ShardInfo {
  /** Tokens of the training split. */
  train_tokens: number;
  /** Tokens of the validation split. */
  val_tokens: number;
  /** Storage type of the shard files. */
  dtype: "uint16" | "uint32";
  /** Vocabulary size of the tokenizer that built them. */
  vocab_size: number;
  /** Documents per split. */
  docs: { train: number; val: number };
  /** `documents`, or `tokens` when the corpus was too small to split by documents. */
  split: "documents" | "tokens";
  /** BOS and EOS ids of the tokenizer. */
  bos_id: number | null;
  /** EOS id written after each document. */
  eos_id: number | null;
  /** Bytes of input read. */
  bytes: number;
  /** Whether the build found the shards in the cache. */
  cached: boolean;
  /** The shard folder. */
  dir: string;
}

function readText(fill: (buf: Uint8Array, cap: bigint) => number | bigint, cap = 4096): string {
  let buf = new Uint8Array(cap);
  let need = Number(fill(buf, BigInt(cap)));
  if (need > cap) need = Number(fill(buf = new Uint8Array(need), BigInt(need)));
  return dec.decode(buf.subarray(0, need));
}

/** A native constructor that returns null and an error text: the handle, or an EngineError. */
async function create(
  f: (
    err: Uint8Array,
    cap: bigint,
    len: BigUint64Array,
  ) => Deno.PointerValue | Promise<Deno.PointerValue>,
  what: string,
): Promise<Deno.PointerObject> {
  const err = new Uint8Array(2048);
  const len = new BigUint64Array(1);
  const ptr = await f(err, BigInt(err.length), len);
  if (ptr === null) {
    const n = Math.min(Number(len[0]), err.length);
    throw new EngineError(-1, dec.decode(err.subarray(0, n)) || `${what} failed`);
  }
  return ptr;
}

function createSync(
  f: (err: Uint8Array, cap: bigint, len: BigUint64Array) => Deno.PointerValue,
  what: string,
): Deno.PointerObject {
  const err = new Uint8Array(2048);
  const len = new BigUint64Array(1);
  const ptr = f(err, BigInt(err.length), len);
  if (ptr === null) {
    const n = Math.min(Number(len[0]), err.length);
    throw new EngineError(-1, dec.decode(err.subarray(0, n)) || `${what} failed`);
  }
  return ptr;
}

/** Bytes read out of bytes in all, polled while a build or a training runs. */
export class NativeProgress implements Disposable {
  #lib: NativeLib;
  #ptr: Deno.PointerValue;

  /** A fresh counter (0 of 0). */
  constructor() {
    this.#lib = loadLibrary();
    this.#ptr = this.#lib.symbols.qg_progress_new();
  }

  /** The pointer handed to a native call. */
  get pointer(): Deno.PointerValue {
    return this.#ptr;
  }

  /** `[bytes read, bytes in all]`. */
  get(): [number, number] {
    const out = new Float64Array(2);
    if (this.#ptr !== null) this.#lib.symbols.qg_progress_get(this.#ptr, out);
    return [out[0], out[1]];
  }

  /** Asks the running call to stop; it then fails with "cancelled". */
  cancel(): void {
    if (this.#ptr !== null) this.#lib.symbols.qg_progress_cancel(this.#ptr);
  }

  /** Frees the counter; only after the call using it has settled. */
  [Symbol.dispose](): void {
    if (this.#ptr === null) return;
    this.#lib.symbols.qg_progress_free(this.#ptr);
    this.#ptr = null;
  }
}

const tokRegistry = new FinalizationRegistry<Deno.PointerValue>((ptr) => {
  if (ptr) loadLibrary().symbols.qg_tok_free(ptr);
});

/** Settings of {@link NativeTokenizer.train} (engine field names). */
export interface TokenizerTrainSpec {
  /** Corpus files or folders. */
  inputs: string[];
  /** Vocabulary size to reach (256 bytes, BOS and EOS included). */
  vocab_size: number;
  /** JSONL field holding the text (default `text`). */
  text_field?: string;
  /** Folder the tokenizer files are written into. */
  out: string;
}

/** A native tokenizer: the byte tokenizer or a Hugging Face tokenizer.json. */
export class NativeTokenizer implements Disposable {
  #lib: NativeLib;
  #ptr: Deno.PointerValue;
  /** Shard builds running with this tokenizer (it must outlive them). */
  #builds = 0;
  /** What the engine reports about it. */
  readonly info: TokenizerInfo;

  private constructor(lib: NativeLib, ptr: Deno.PointerObject) {
    this.#lib = lib;
    this.#ptr = ptr;
    this.info = JSON.parse(readText((b, n) => lib.symbols.qg_tok_info(ptr, b, n)));
    tokRegistry.register(this, ptr, this);
  }

  /** Opens `tokenizer.json` or a model folder; `""` gives the byte tokenizer. */
  static open(path: string): NativeTokenizer {
    const lib = loadLibrary();
    const p = enc.encode(path);
    const ptr = createSync(
      (e, c, l) => lib.symbols.qg_tok_open(p, BigInt(p.length), e, c, l),
      "opening the tokenizer",
    );
    return new NativeTokenizer(lib, ptr);
  }

  /** Trains a byte-level BPE from a corpus, saves it into `spec.out` and opens it. */
  static async train(
    spec: TokenizerTrainSpec,
    progress?: NativeProgress,
  ): Promise<NativeTokenizer> {
    const lib = loadLibrary();
    const json = enc.encode(JSON.stringify(spec));
    const ptr = await create(
      (e, c, l) =>
        lib.symbols.qg_tok_train(json, BigInt(json.length), progress?.pointer ?? null, e, c, l),
      "tokenizer training",
    );
    return new NativeTokenizer(lib, ptr);
  }

  /** The pointer handed to native calls. */
  get pointer(): Deno.PointerObject {
    if (this.#ptr === null) throw new EngineError(-1, "tokenizer already disposed");
    return this.#ptr;
  }

  /** Runs `f` (a call off the main thread using this tokenizer), keeping it from disposal. */
  async lend<T>(f: (ptr: Deno.PointerObject) => Promise<T>): Promise<T> {
    const ptr = this.pointer;
    this.#builds++;
    try {
      return await f(ptr);
    } finally {
      this.#builds--;
    }
  }

  #error(code: number): EngineError {
    const h = this.pointer;
    const need = Number(this.#lib.symbols.qg_tok_last_error(h, null, 0n));
    const buf = new Uint8Array(need);
    this.#lib.symbols.qg_tok_last_error(h, buf, BigInt(need));
    return new EngineError(code, dec.decode(buf));
  }

  /** Token ids of `text`. */
  encode(text: string, addSpecial: boolean): Int32Array {
    const h = this.pointer;
    const bytes = enc.encode(text);
    const need = new BigUint64Array(1);
    // Ids never outnumber bytes by more than the special tokens; retry if they do.
    let out = new Int32Array(bytes.length + 16);
    for (let i = 0; i < 2; i++) {
      const rc = this.#lib.symbols.qg_tok_encode(
        h,
        bytes,
        BigInt(bytes.length),
        addSpecial ? 1 : 0,
        out,
        BigInt(out.length),
        need,
      );
      if (rc !== 0) throw this.#error(rc);
      const n = Number(need[0]);
      if (n <= out.length) return out.slice(0, n);
      out = new Int32Array(n);
    }
    throw new EngineError(-2, "tokenizer: encoding length changed between calls");
  }

  /** Text of token ids. */
  decode(ids: Int32Array, skipSpecial: boolean): string {
    const h = this.pointer;
    const need = new BigUint64Array(1);
    let rc = 0;
    const text = readText((buf, cap) => {
      rc = this.#lib.symbols.qg_tok_decode(
        h,
        ids,
        BigInt(ids.length),
        skipSpecial ? 1 : 0,
        buf,
        cap,
        need,
      );
      return rc === 0 ? need[0] : 0n;
    }, Math.max(64, ids.length * 8));
    if (rc !== 0) throw this.#error(rc);
    return text;
  }

  /** Writes the tokenizer files into the folder `dir`. */
  save(dir: string): void {
    const p = enc.encode(dir);
    const rc = this.#lib.symbols.qg_tok_save(this.pointer, p, BigInt(p.length));
    if (rc !== 0) throw this.#error(rc);
  }

  /** Frees the native tokenizer. Safe to call twice. */
  [Symbol.dispose](): void {
    if (this.#ptr === null) return;
    if (this.#builds > 0) {
      throw new EngineError(-1, "cannot dispose a tokenizer while a shard build uses it");
    }
    tokRegistry.unregister(this);
    this.#lib.symbols.qg_tok_free(this.#ptr);
    this.#ptr = null;
  }
}

const shardRegistry = new FinalizationRegistry<Deno.PointerValue>((ptr) => {
  if (ptr) loadLibrary().symbols.qg_shards_free(ptr);
});

/** Settings of {@link NativeShards.build} (engine field names). */
export interface ShardBuildSpec {
  /** A text file, JSONL file (optionally gzip'd) or folder of them. */
  data: string;
  /** JSONL field holding the text (default `text`). */
  text_field?: string;
  /** Share of the documents held out for validation, in (0, 1). */
  val_fraction: number;
  /** Cache root; each corpus and tokenizer gets a folder under it. */
  cache_dir: string;
  /** Tokenizing threads (0 or absent: one per core). */
  threads?: number;
}

/** A memory-mapped token shard set. */
export class NativeShards implements Disposable {
  #lib: NativeLib;
  #ptr: Deno.PointerValue;
  /** What the engine reports about it. */
  readonly info: ShardInfo;

  private constructor(lib: NativeLib, ptr: Deno.PointerObject) {
    this.#lib = lib;
    this.#ptr = ptr;
    this.info = JSON.parse(readText((b, n) => lib.symbols.qg_shards_info(ptr, b, n)));
    shardRegistry.register(this, ptr, this);
  }

  /**
   * The shards of `spec.data` under `tok`: from the cache, or built in parallel (the call
   * runs off the main thread; poll `progress` meanwhile). Keep `tok` alive until it settles.
   */
  static async build(
    tok: NativeTokenizer,
    spec: ShardBuildSpec,
    progress?: NativeProgress,
  ): Promise<NativeShards> {
    const lib = loadLibrary();
    const json = enc.encode(JSON.stringify(spec));
    const ptr = await tok.lend((t) =>
      create(
        (e, c, l) =>
          lib.symbols.qg_shards_build(
            t,
            json,
            BigInt(json.length),
            progress?.pointer ?? null,
            e,
            c,
            l,
          ),
        "building token shards",
      )
    );
    return new NativeShards(lib, ptr);
  }

  /** Opens a finished shard folder. */
  static open(dir: string): NativeShards {
    const lib = loadLibrary();
    const p = enc.encode(dir);
    const ptr = createSync(
      (e, c, l) => lib.symbols.qg_shards_open(p, BigInt(p.length), e, c, l),
      "opening token shards",
    );
    return new NativeShards(lib, ptr);
  }

  #handle(): Deno.PointerObject {
    if (this.#ptr === null) throw new EngineError(-1, "shard set already disposed");
    return this.#ptr;
  }

  /** Copies windows of `window` tokens starting at `starts` into `out` (row-major). */
  read(split: "train" | "val", starts: BigUint64Array, window: number, out: Int32Array): void {
    const h = this.#handle();
    const rc = this.#lib.symbols.qg_shards_read(
      h,
      split === "train" ? 0 : 1,
      starts,
      BigInt(starts.length),
      BigInt(window),
      out,
    );
    if (rc !== 0) {
      const need = Number(this.#lib.symbols.qg_shards_last_error(h, null, 0n));
      const buf = new Uint8Array(need);
      this.#lib.symbols.qg_shards_last_error(h, buf, BigInt(need));
      throw new EngineError(rc, dec.decode(buf));
    }
  }

  /** Unmaps the shards. Safe to call twice. */
  [Symbol.dispose](): void {
    if (this.#ptr === null) return;
    shardRegistry.unregister(this);
    this.#lib.symbols.qg_shards_free(this.#ptr);
    this.#ptr = null;
  }
}
