/**
 * Opening a trained model to look at it: a Hugging Face LLaMA folder or a qgalore checkpoint
 * (an {@link Engine.save} file with the engine config beside it, written by
 * {@link saveCheckpoint}), as an engine sized for one evaluation or generation shape, with
 * the tokenizer that goes with it.
 *
 * @module
 */

import { Engine, type EngineConfig } from "../ffi/engine.ts";
import { UsageError } from "./errors.ts";
import { type ModelConfig, resolveModel } from "./presets.ts";
import { exists } from "./fs.ts";
import { openTokenizer, type Tokenizer } from "./tokenizer.ts";

/** What {@link openModel} needs besides the model. */
export interface OpenModelOptions {
  /** A Hugging Face model folder, or a qgalore checkpoint file. */
  model: string;
  /** Tokenizer file or folder; default: the model folder's, else the checkpoint's, else bytes. */
  tokenizer?: string | null;
  /** Sequences per engine call. Default 1. */
  batchSize?: number;
  /** Tokens per sequence the engine is built for. */
  seqLen: number;
  /** Engine device. Default `cpu`. */
  device?: "cpu" | "cuda" | "auto";
  /** Engine threads; absent: one per core. */
  threads?: number;
  /** How errors name the model (e.g. `--model x`). Default `model <path>`. */
  label?: string;
}

/** An engine holding a trained model, its config and its tokenizer. */
export interface OpenedModel extends Disposable {
  /** The engine (built with batch size and seq_len of the options). */
  engine: Engine;
  /** The model's config. */
  config: ModelConfig;
  /** Its tokenizer. */
  tokenizer: Tokenizer;
  /** `hf` for a Hugging Face folder, `checkpoint` for a qgalore checkpoint. */
  kind: "hf" | "checkpoint";
}

/** The sidecar of a qgalore checkpoint (`<file>.json`). */
export interface CheckpointInfo {
  /** Always `qgalore-checkpoint`. */
  format: "qgalore-checkpoint";
  /** The engine config the checkpoint was saved from. */
  engine: EngineConfig;
  /** Tokenizer file or folder of the run, or null for bytes. */
  tokenizer: string | null;
}

/**
 * Saves `engine` (weights and optimizer state, {@link Engine.save}) to `path` and its config
 * and tokenizer source to `path.json`, so {@link openModel} can open it without the run's
 * options.
 */
export async function saveCheckpoint(
  engine: Engine,
  path: string,
  tokenizer: string | null = null,
): Promise<void> {
  await engine.save(path);
  const info: CheckpointInfo = { format: "qgalore-checkpoint", engine: engine.config, tokenizer };
  const tmp = `${path}.json.tmp`;
  Deno.writeTextFileSync(tmp, JSON.stringify(info, null, 2) + "\n");
  Deno.renameSync(tmp, `${path}.json`);
}

function statOf(path: string): Deno.FileInfo | null {
  try {
    return Deno.statSync(path);
  } catch {
    return null;
  }
}

function readCheckpointInfo(path: string, label: string): CheckpointInfo {
  let raw: unknown;
  try {
    raw = JSON.parse(Deno.readTextFileSync(`${path}.json`));
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound
      ? `no ${path}.json beside it (checkpoints from saveCheckpoint carry their config there)`
      : String(e).split("\n")[0];
    throw new UsageError(`${label}: not a Hugging Face folder or a qgalore checkpoint: ${why}`);
  }
  const info = raw as Partial<CheckpointInfo>;
  if (info?.format !== "qgalore-checkpoint" || typeof info.engine !== "object") {
    throw new UsageError(`${label}: ${path}.json is not a qgalore checkpoint description`);
  }
  return info as CheckpointInfo;
}

/**
 * Opens a trained model as an engine of `batchSize × seqLen` (weights as saved; optimizer
 * state fresh for a Hugging Face folder). Throws UsageError naming the model on a missing
 * or foreign path, an EngineError for a bad checkpoint file.
 */
export async function openModel(opts: OpenModelOptions): Promise<OpenedModel> {
  const label = opts.label ?? `model ${opts.model}`;
  const st = statOf(opts.model);
  if (st === null) throw new UsageError(`${label}: not found`);
  const base = {
    batch_size: opts.batchSize ?? 1,
    seq_len: opts.seqLen,
    device: opts.device ?? "cpu",
    ...(opts.threads === undefined ? {} : { threads: opts.threads }),
  };
  if (st.isDirectory) {
    // a tokenizer.json that is there but unreadable is an error, not a reason to use bytes
    const tokPath = opts.tokenizer ?? (exists(`${opts.model}/tokenizer.json`) ? opts.model : null);
    const tokenizer = openTokenizer(tokPath);
    const { config } = resolveModel(opts.model, tokenizer.vocabSize, label);
    if (tokPath === null && config.vocab_size > 256) {
      throw new UsageError(
        `${label}: no tokenizer.json for its ${config.vocab_size}-token vocabulary; ` +
          "give --tokenizer (bytes would read text as ids 0..255)",
      );
    }
    if (opts.seqLen > config.max_position_embeddings) {
      throw new UsageError(
        `--seq-len ${opts.seqLen}: must be ≤ ${config.max_position_embeddings} (max_position_embeddings of ${label})`,
      );
    }
    // the weights load in place of a random initialisation
    const engine = await Engine.create({
      ...base,
      model: config,
      optimizer: { name: "adamw" } as EngineConfig["optimizer"],
      seed: 0,
      init_from: opts.model,
    });
    return opened(engine, config, tokenizer, "hf");
  }
  const info = readCheckpointInfo(opts.model, label);
  const tokenizer = openTokenizer(opts.tokenizer ?? info.tokenizer);
  const config = info.engine.model;
  if (opts.seqLen > config.max_position_embeddings) {
    throw new UsageError(
      `--seq-len ${opts.seqLen}: must be ≤ ${config.max_position_embeddings} (max_position_embeddings of ${label})`,
    );
  }
  // The optimizer's state is part of the checkpoint, so the engine is built for it.
  const engine = await Engine.create({
    ...info.engine,
    ...base,
    grad_accum: info.engine.grad_accum ?? 1,
  });
  try {
    await engine.load(opts.model);
  } catch (e) {
    engine[Symbol.dispose]();
    throw e;
  }
  return opened(engine, config, tokenizer, "checkpoint");
}

function opened(
  engine: Engine,
  config: ModelConfig,
  tokenizer: Tokenizer,
  kind: "hf" | "checkpoint",
): OpenedModel {
  return {
    engine,
    config,
    tokenizer,
    kind,
    [Symbol.dispose]: () => engine[Symbol.dispose](),
  };
}
