/**
 * Tokenizers. Only bytes for now: every file is valid input and the vocabulary is tiny,
 * which keeps the embedding and lm_head small enough for CPU runs.
 *
 * @module
 */

/** Maps each byte to its own token id (0..255). Lossless for any input, UTF-8 or not. */
export class ByteTokenizer {
  /** Number of distinct token ids. */
  readonly vocabSize: number = 256;

  /** Token ids for a string (UTF-8 encoded first) or raw bytes. */
  encode(input: string | Uint8Array): Int32Array {
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
  decode(ids: ArrayLike<number>): string {
    return new TextDecoder().decode(this.decodeBytes(ids));
  }
}
