/**
 * Generating token ids from a prompt with an engine's model: options with their checks, and
 * {@link generateIds}, which runs the engine's cached decoder (`Engine.generate`).
 * @module
 */
import type { Engine, GenerateResult } from "../ffi/engine.ts";
import { UsageError } from "./errors.ts";

/** How to generate (camelCase mirror of the engine's request). */
export interface GenerateOptions {
  /**
   * New tokens at most: any safe integer ≥ 0 (e.g. `Number.MAX_SAFE_INTEGER` for "until EOS").
   * Generation also stops when the sequence fills the model's `max_position_embeddings`
   * (stop `"max_positions"`); the key/value cache grows with the tokens produced, so a large
   * value reserves no memory up front.
   */
  maxNewTokens: number;
  /** Softmax temperature; 0 (default) is greedy, the lowest id winning ties. */
  temperature?: number;
  /** Keep the k most likely tokens before drawing; 0 (default) is off. */
  topK?: number;
  /**
   * Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches p
   * (after top-k, as `transformers` applies them); 1 (default) is off.
   */
  topP?: number;
  /** Seed of the draws; a (seed, position) pair always draws the same token. Default 0. */
  seed?: number;
  /** Use the key/value cache (default true); false recomputes the prefix for every token. */
  cache?: boolean;
  /** Ids that end the generation (the one generated is returned as the last id). */
  eosIds?: readonly number[];
}

function wholeAtLeast(name: string, v: number, min: number, note = ""): void {
  if (!Number.isSafeInteger(v) || v < min) {
    throw new UsageError(`${name} = ${v}: must be an integer ≥ ${min}${note}`);
  }
}

/**
 * Checks generation options; throws a one-line {@link UsageError} naming the option.
 * `vocabSize`, when given, bounds the prompt and EOS ids.
 */
export function checkGenerateOptions(
  opts: GenerateOptions,
  promptIds?: ArrayLike<number>,
  vocabSize?: number,
): void {
  wholeAtLeast("maxNewTokens", opts.maxNewTokens, 0);
  const t = opts.temperature ?? 0;
  if (!Number.isFinite(t) || t < 0) {
    throw new UsageError(`temperature = ${t}: must be a finite number ≥ 0 (0 = greedy)`);
  }
  wholeAtLeast("topK", opts.topK ?? 0, 0, " (0 = off)");
  const p = opts.topP ?? 1;
  if (!(p > 0 && p <= 1)) throw new UsageError(`topP = ${p}: must be in (0, 1] (1 = off)`);
  wholeAtLeast("seed", opts.seed ?? 0, 0);
  const ids = (name: string, list: ArrayLike<number>) => {
    for (let i = 0; i < list.length; i++) {
      const id = list[i];
      const limit = vocabSize === undefined ? "" : ` and < the vocabulary size ${vocabSize}`;
      if (!Number.isInteger(id) || id < 0 || (vocabSize !== undefined && id >= vocabSize)) {
        throw new UsageError(`${name}[${i}] = ${id}: must be a token id (an integer ≥ 0${limit})`);
      }
    }
  };
  ids("eosIds", opts.eosIds ?? []);
  if (promptIds !== undefined) {
    if (promptIds.length === 0) throw new UsageError("prompt is empty: give at least one token");
    ids("prompt", promptIds);
  }
}

/**
 * Generates after `promptIds` with the engine's model (checked first; see
 * {@link checkGenerateOptions}): the new ids, why it stopped, and the time taken.
 *
 * Limitation: every call reads the model's weights to the host as f32. For float weights on
 * the CPU they are shared, but INT8 (qgalore) weights and GPU weights are copied: a second,
 * full f32 copy of the model (4 bytes per parameter) held in host memory for the call, and
 * the time to make it (the result's `load_seconds`).
 */
export async function generateIds(
  engine: Engine,
  promptIds: ArrayLike<number>,
  opts: GenerateOptions,
): Promise<GenerateResult> {
  checkGenerateOptions(opts, promptIds, engine.config.model.vocab_size);
  return await engine.generate(promptIds, {
    max_new_tokens: opts.maxNewTokens,
    temperature: opts.temperature ?? 0,
    top_k: opts.topK ?? 0,
    top_p: opts.topP ?? 1,
    seed: opts.seed ?? 0,
    eos: [...(opts.eosIds ?? [])],
    cache: opts.cache ?? true,
  });
}
