/**
 * Perplexity of a model on a token stream.
 *
 * Windows: the tokenized text is cut from its start into consecutive, non-overlapping windows
 * of seqLen + 1 ids (window i holds ids [i·(seqLen+1), i·(seqLen+1) + seqLen]); in each, the
 * first seqLen ids predict the next, so a window scores seqLen targets, and ids that do not fill
 * a last window are dropped. This is `transformers`' perplexity guide with the stride equal to
 * the window (max_length = seqLen + 1): every window starts without context, as the issue's
 * definition and the guide's non-overlapping evaluation have it. Loss is the mean token
 * cross-entropy (nats) over every scored target, perplexity its exponential.
 * @module
 */
import type { Engine } from "../ffi/engine.ts";
import { UsageError } from "./errors.ts";

/** Windows of `seqLen` + 1 ids as {@link Engine.evalLoss} reads them, and their count. */
export interface PerplexityWindows {
  /** `count` × (seqLen + 1) ids, row-major. */
  windows: Int32Array;
  /** Whole windows in the text. */
  count: number;
}

/** What {@link evaluatePerplexity} measures. */
export interface Perplexity {
  /** Mean token cross-entropy over every scored id (nats). */
  loss: number;
  /** exp(loss). */
  ppl: number;
  /** Ids scored (targets): windows × seqLen. */
  tokens: number;
  /** Windows evaluated. */
  windows: number;
}

/**
 * The consecutive non-overlapping windows of `seqLen` + 1 ids from the start of `tokens`
 * (window i covers ids i·(seqLen+1) … i·(seqLen+1) + seqLen), the last partial window dropped:
 * 1000 ids at seqLen 100 give 9 windows and 900 targets.
 */
export function perplexityWindows(tokens: Int32Array, seqLen: number): PerplexityWindows {
  if (!Number.isSafeInteger(seqLen) || seqLen < 1) {
    throw new UsageError(`seq_len = ${seqLen}: must be an integer ≥ 1`);
  }
  const row = seqLen + 1;
  const count = Math.floor(tokens.length / row);
  // consecutive windows are the text's first count × row ids, as they are
  const windows = tokens.slice(0, count * row);
  return { windows, count };
}

/** Windows per engine call (bounds the ids handed over at once). */
const CHUNK = 64;

/**
 * Mean cross-entropy and perplexity of `engine`'s model over `tokens` (see the module notes
 * for the windows). The engine must be built with seq_len `seqLen`; with batch_size B it
 * scores B windows per batch (a last, short batch is filled with windows that carry no loss),
 * and its training forward scores them, so the loss is what training reports.
 */
export async function evaluatePerplexity(
  engine: Engine,
  tokens: Int32Array,
  seqLen: number,
  onProgress?: (done: number, total: number) => void,
): Promise<Perplexity> {
  const { batch_size: batch, seq_len } = engine.config;
  if (seq_len !== seqLen) {
    throw new UsageError(
      `evaluate: the engine is built for seq_len ${seq_len}; perplexity needs seq_len ${seqLen}`,
    );
  }
  const { windows, count } = perplexityWindows(tokens, seqLen);
  if (count === 0) {
    throw new UsageError(
      `evaluate: the text has ${tokens.length} tokens, fewer than seq_len + 1 = ${seqLen + 1}`,
    );
  }
  const row = seqLen + 1;
  let sum = 0; // Σ over windows of each window's mean token loss
  if (batch === 1) {
    for (let i = 0; i < count; i += CHUNK) {
      const k = Math.min(CHUNK, count - i);
      sum += k * await engine.evalLoss(windows.subarray(i * row, (i + k) * row), k);
      onProgress?.(i + k, count);
    }
  } else {
    // whole batches in chunks, then the rest padded with copies that carry no loss
    const per = Math.max(1, Math.floor(CHUNK / batch)) * batch;
    for (let i = 0; i < count; i += per) {
      const k = Math.min(per, count - i);
      const nb = Math.ceil(k / batch);
      let ids = windows.subarray(i * row, (i + k) * row);
      let mask: Uint8Array | undefined;
      if (k % batch !== 0) {
        const padded = new Int32Array(nb * batch * row);
        padded.set(ids);
        mask = new Uint8Array(padded.length);
        mask.fill(1, 0, k * row);
        ids = padded;
      }
      const r = await engine.eval(ids, nb, mask);
      sum += r.sum / seqLen; // every window scores seqLen targets
      onProgress?.(i + k, count);
    }
  }
  const loss = sum / count;
  return { loss, ppl: Math.exp(loss), tokens: count * seqLen, windows: count };
}
