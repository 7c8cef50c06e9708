/**
 * Merging a PEFT LoRA adapter into its base model: a plain Hugging Face folder whose
 * weights are W + s·B·A (what `peft`'s `merge_and_unload()` then `save_pretrained` gives),
 * which `transformers` loads without `peft`.
 *
 * @module
 */

import type { AdapterConfig } from "../ffi/engine.ts";
import { type AdapterBase, readAdapterConfig } from "./adapter.ts";
import { UsageError } from "./errors.ts";
import { exportModel } from "./hf.ts";
import { openModel } from "./open_model.ts";

/** Options of {@link mergeAdapter}. */
export interface MergeAdapterOptions {
  /** Element type of the merged weights: `f32` (default, exact) or `bf16`. */
  dtype?: "f32" | "bf16";
  /**
   * The base the adapter is added to: `lora` (the model's weights in f32, default) or
   * `qlora` (the NF4-quantized base a QLoRA adapter was trained on, dequantized).
   */
  base?: AdapterBase;
  /** Tokenizer file or folder; default: the model folder's, else bytes. */
  tokenizer?: string | null;
  /** Engine device. Default `cpu`. */
  device?: "cpu" | "cuda" | "auto";
  /** Engine threads; absent: one per core. */
  threads?: number;
  /** How errors name the model, the adapter and the output (flags in the CLI). */
  labels?: { model?: string; adapter?: string; out?: string };
}

/** What {@link mergeAdapter} did. */
export interface MergeAdapterResult {
  /** The folder written. */
  out: string;
  /** The adapter's settings. */
  adapter: AdapterConfig;
  /** Element type written. */
  dtype: "f32" | "bf16";
  /** The base the adapter was added to. */
  base: AdapterBase;
}

/** Whether `path` exists and is not an empty folder (a file counts as not empty). */
function occupied(path: string): boolean {
  let st: Deno.FileInfo;
  try {
    st = Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
  if (!st.isDirectory) return true;
  for (const _ of Deno.readDirSync(path)) return true;
  return false;
}

/**
 * Writes the Hugging Face model folder `model` with the PEFT adapter folder `adapter`
 * merged into its weights as a plain Hugging Face folder `out` (config, weights, generation
 * config, the model's tokenizer files). `out` must not exist or be an empty folder: nothing
 * is ever overwritten, and the folder appears complete or not at all. Bad input (an adapter
 * for another model, missing files, an occupied `out`) is a one-line {@link UsageError}.
 */
export async function mergeAdapter(
  model: string,
  adapter: string,
  out: string,
  opts: MergeAdapterOptions = {},
): Promise<MergeAdapterResult> {
  const labels = {
    model: opts.labels?.model ?? `model ${model}`,
    adapter: opts.labels?.adapter ?? `adapter ${adapter}`,
    out: opts.labels?.out ?? `output ${out}`,
  };
  if (occupied(out)) {
    throw new UsageError(
      `${labels.out}: exists and is not an empty folder; the merged model is written to a new or empty folder`,
    );
  }
  const config = readAdapterConfig(adapter, labels.adapter);
  const base = opts.base ?? "lora";
  const dtype = opts.dtype ?? "f32";
  // one position is enough: the engine only holds and exports the weights
  using m = await openModel({
    model,
    tokenizer: opts.tokenizer ?? null,
    seqLen: 1,
    device: opts.device ?? "cpu",
    ...(opts.threads === undefined ? {} : { threads: opts.threads }),
    label: labels.model,
    adapter,
    adapterBase: base,
    adapterLabel: labels.adapter,
  });
  await exportModel(m.engine, out, { dtype, tokenizerDir: model, tokenizer: m.tokenizer });
  return { out, adapter: config, dtype, base };
}
