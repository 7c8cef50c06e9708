/**
 * Opening a trained model to look at it: a Hugging Face LLaMA folder, a qgalore checkpoint
 * (an {@link Engine.save} file, which carries its engine config; a training run's or one
 * written by {@link saveCheckpoint}), or a training run's folder (its newest checkpoint), as
 * an engine sized for one evaluation or generation shape, with the tokenizer that goes with it.
 *
 * @module
 */

import { join } from "node:path";
import { Engine, type EngineConfig, EngineError, inspectCheckpoint } from "../ffi/engine.ts";
import {
  type AdapterBase,
  adapterOptimizer,
  loadAdapterInto,
  readAdapterConfig,
} from "./adapter.ts";
import { listCheckpoints } from "./checkpoints.ts";
import { UsageError } from "./errors.ts";
import { type ModelConfig, resolveModel } from "./presets.ts";
import { exists } from "./fs.ts";
import { openTokenizer, type Tokenizer } from "./tokenizer.ts";

/** What {@link openModel} needs besides the model. */
export interface OpenModelOptions {
  /** A Hugging Face model folder, a qgalore checkpoint file, or a training run's folder. */
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
  /**
   * A PEFT LoRA adapter folder applied to a Hugging Face model (lib/adapter.ts): the engine
   * is built from the adapter's settings and holds base + adapter. Not for checkpoints.
   */
  adapter?: string | null;
  /** `lora` (f32 base, default) or `qlora` (NF4 base) for {@link OpenModelOptions.adapter}. */
  adapterBase?: AdapterBase;
  /** How errors name the adapter (e.g. `--adapter x`). Default `adapter <path>`. */
  adapterLabel?: string;
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

/** What {@link saveCheckpoint} stores in a checkpoint besides the engine's tensors. */
export interface ModelRecord {
  /** Always `qgalore-model`. */
  kind: "qgalore-model";
  /** Tokenizer file or folder of the model, or null for bytes. */
  tokenizer: string | null;
}

/**
 * Saves `engine` (weights and optimizer state, {@link Engine.save}) to `path` with the
 * tokenizer's source inside the checkpoint, so {@link openModel} can open it alone (the
 * engine config is always stored in a checkpoint).
 */
export async function saveCheckpoint(
  engine: Engine,
  path: string,
  tokenizer: string | null = null,
): Promise<void> {
  const record: ModelRecord = { kind: "qgalore-model", tokenizer };
  await engine.save(path, record);
}

function statOf(path: string): Deno.FileInfo | null {
  try {
    return Deno.statSync(path);
  } catch {
    return null;
  }
}

/** A checkpoint's engine config and tokenizer source; one-line UsageError when unreadable. */
function readCheckpoint(
  path: string,
  label: string,
): { engine: EngineConfig; tokenizer: string | null } {
  let info: ReturnType<typeof inspectCheckpoint>;
  try {
    info = inspectCheckpoint(path);
  } catch (e) {
    if (!(e instanceof EngineError)) throw e;
    throw new UsageError(
      `${label}: not a Hugging Face folder or a qgalore checkpoint: ${e.message}`,
    );
  }
  // a training run's record (lib/checkpoints.ts) or saveCheckpoint's
  const run = info.run as { kind?: string; tokenizer?: unknown } | null;
  let tokenizer: string | null = null;
  if (run?.kind === "qgalore-run") {
    const t = run.tokenizer as { source?: unknown } | undefined;
    tokenizer = typeof t?.source === "string" ? t.source : null;
  } else if (run?.kind === "qgalore-model" && typeof run.tokenizer === "string") {
    tokenizer = run.tokenizer;
  }
  return { engine: info.engine_config as unknown as EngineConfig, tokenizer };
}

/** The newest readable checkpoint of a run folder (`<out>/checkpoints/`), or null. */
function newestCheckpoint(dir: string): string | null {
  for (const c of listCheckpoints(dir)) {
    try {
      inspectCheckpoint(c.path);
      return c.path;
    } catch (e) {
      if (!(e instanceof EngineError)) throw e;
    }
  }
  return null;
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
  // a training run's folder: its newest valid checkpoint
  const runCkpt = st.isDirectory && !exists(join(opts.model, "config.json"))
    ? newestCheckpoint(opts.model)
    : null;
  const adapter = opts.adapter ?? null;
  const adapterLabel = opts.adapterLabel ?? `adapter ${adapter}`;
  if (adapter !== null && !(st.isDirectory && runCkpt === null)) {
    throw new UsageError(
      `${adapterLabel}: applies to a Hugging Face model folder; ${label} is a qgalore checkpoint (its adapters, if any, are inside it)`,
    );
  }
  if (st.isDirectory && runCkpt === null) {
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
    // the adapter's settings build the engine (lib/adapter.ts), checked before the weights load
    const optimizer = adapter === null
      ? { name: "adamw" } as EngineConfig["optimizer"]
      : adapterOptimizer(readAdapterConfig(adapter, adapterLabel), opts.adapterBase);
    // the weights load in place of a random initialisation
    const engine = await Engine.create({
      ...base,
      model: config,
      optimizer,
      seed: 0,
      init_from: opts.model,
    });
    if (adapter !== null) {
      try {
        await loadAdapterInto(engine, adapter, adapterLabel);
      } catch (e) {
        engine[Symbol.dispose]();
        throw e;
      }
    }
    return opened(engine, config, tokenizer, "hf");
  }
  const file = runCkpt ?? opts.model;
  const info = readCheckpoint(file, label);
  const tokenizer = openTokenizer(opts.tokenizer ?? info.tokenizer);
  const config = info.engine.model;
  if (opts.seqLen > config.max_position_embeddings) {
    throw new UsageError(
      `--seq-len ${opts.seqLen}: must be ≤ ${config.max_position_embeddings} (max_position_embeddings of ${label})`,
    );
  }
  // The optimizer's state is part of the checkpoint, so the engine is built for it; the
  // batch shape is this use's, which loadWeights allows (it checks model and optimizer).
  const engine = await Engine.create({ ...info.engine, ...base, grad_accum: 1 });
  try {
    await engine.loadWeights(file);
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
