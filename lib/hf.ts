/**
 * Hugging Face model folders out of a run: weights, config and the tokenizer files.
 * @module
 */
import type { Engine } from "../ffi/engine.ts";

/** The tokenizer files a Hugging Face model folder carries, copied when present. */
export const TOKENIZER_FILES: readonly string[] = Object.freeze([
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
]);

/** Options of {@link exportModel}. */
export interface ExportModelOptions {
  /** Element type of the weights: bf16 (half the size) or f32 (exact). */
  dtype: "bf16" | "f32";
  /** Folder whose tokenizer files ({@link TOKENIZER_FILES}) go into the export. */
  tokenizerDir?: string;
  /** Keys for `config.json` and `generation_config.json` (bos_token_id, eos_token_id, …). */
  extra?: Record<string, unknown>;
}

async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch {
    return false;
  }
}

/**
 * Writes `engine`'s model as a Hugging Face folder `dir` that
 * `LlamaForCausalLM.from_pretrained` loads: `config.json`, `model.safetensors`,
 * `generation_config.json`, and the tokenizer files found in `tokenizerDir`. The folder must
 * not exist or be empty; it is built next to `dir` and renamed into place, so it appears
 * complete (tokenizer included) or not at all.
 */
export async function exportModel(
  engine: Engine,
  dir: string,
  opts: ExportModelOptions,
): Promise<void> {
  const copy: string[] = [];
  if (opts.tokenizerDir !== undefined) {
    for (const f of TOKENIZER_FILES) {
      const p = `${opts.tokenizerDir}/${f}`;
      if (await isFile(p)) copy.push(p);
    }
  }
  await engine.exportHf(dir, { dtype: opts.dtype, extra: opts.extra, copy });
}
