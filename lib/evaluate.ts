/**
 * Perplexity of a model on a token stream.
 *
 * Windows: the text is cut into consecutive windows of seqLen + 1 ids from its start; window i
 * holds ids [i·seqLen, i·seqLen + seqLen], so its seqLen inputs and seqLen targets do not
 * overlap with the next window's (the last id of one window is the first input of the next),
 * and every id after the first is scored exactly once, with up to seqLen − 1 ids of context
 * before it — how llm.c and nanoGPT evaluate, and `transformers`' perplexity guide with a
 * stride equal to the window, except that no target is lost at window boundaries. Ids that do
 * not fill a last window are dropped. Loss is the mean token cross-entropy (nats),
 * perplexity its exponential.
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
 * The consecutive windows of `seqLen` + 1 ids from the start of `tokens` (window i covers ids
 * i·seqLen … i·seqLen + seqLen), the last partial window dropped: 1000 ids at seqLen 100 give 9
 * windows and 900 targets.
 */
export function perplexityWindows(tokens: Int32Array, seqLen: number): PerplexityWindows {
  if (!Number.isSafeInteger(seqLen) || seqLen < 1) {
    throw new UsageError(`seq_len = ${seqLen}: must be an integer ≥ 1`);
  }
  const count = tokens.length > seqLen ? Math.floor((tokens.length - 1) / seqLen) : 0;
  const windows = new Int32Array(count * (seqLen + 1));
  for (let i = 0; i < count; i++) {
    windows.set(tokens.subarray(i * seqLen, i * seqLen + seqLen + 1), i * (seqLen + 1));
  }
  return { windows, count };
}

/** Windows per engine call (bounds the ids handed over at once). */
const CHUNK = 64;

/**
 * Mean cross-entropy and perplexity of `engine`'s model over `tokens` (see the module notes
 * for the windows). The engine must be built with batch_size 1 and seq_len `seqLen`; its
 * training forward scores the windows, so the loss is what training reports.
 */
export async function evaluatePerplexity(
  engine: Engine,
  tokens: Int32Array,
  seqLen: number,
  onProgress?: (done: number, total: number) => void,
): Promise<Perplexity> {
  const { batch_size, seq_len } = engine.config;
  if (batch_size !== 1 || seq_len !== seqLen) {
    throw new UsageError(
      `evaluate: the engine is built for batch_size ${batch_size} × seq_len ${seq_len}; ` +
        `perplexity needs batch_size 1 and seq_len ${seqLen}`,
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
  for (let i = 0; i < count; i += CHUNK) {
    const k = Math.min(CHUNK, count - i);
    sum += k * await engine.evalLoss(windows.subarray(i * row, (i + k) * row), k);
    onProgress?.(i + k, count);
  }
  const loss = sum / count;
  return { loss, ppl: Math.exp(loss), tokens: count * seqLen, windows: count };
}
