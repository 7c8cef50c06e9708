/**
 * Hugging Face model folders out of a run: weights, config and the tokenizer files.
 * @module
 */
import type { Engine } from "../ffi/engine.ts";
import { isFile } from "./fs.ts";
import type { Tokenizer } from "./tokenizer.ts";

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
  /**
   * The model's tokenizer: its files go into the export (the byte tokenizer is written as a
   * `tokenizer.json` Hugging Face reads with the same ids), and its BOS/EOS ids into
   * `config.json` and `generation_config.json` unless `extra` sets them.
   */
  tokenizer?: Tokenizer;
  /** Keys for `config.json` and `generation_config.json` (bos_token_id, eos_token_id, …). */
  extra?: Record<string, unknown>;
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
      if (isFile(p)) copy.push(p);
    }
  }
  const extra: Record<string, unknown> = {};
  let staged: string | null = null;
  const t = opts.tokenizer;
  if (t !== undefined) {
    let files = t.sourceFiles();
    if (files.length === 0) {
      staged = await Deno.makeTempDir({ prefix: "qgalore-tokenizer-" });
      t.save(staged);
      files = [...Deno.readDirSync(staged)].map((e) => `${staged}/${e.name}`);
    }
    // only tokenizer files: the export writes its own config and generation config
    copy.push(
      ...files.filter((f) =>
        TOKENIZER_FILES.includes(basename(f)) && !copy.some((c) => basename(c) === basename(f))
      ),
    );
    if (t.bosId !== null) extra.bos_token_id = t.bosId;
    if (t.eosIds.length > 0) extra.eos_token_id = t.eosIds.length === 1 ? t.eosIds[0] : t.eosIds;
  }
  try {
    await engine.exportHf(dir, { dtype: opts.dtype, extra: { ...extra, ...opts.extra }, copy });
  } finally {
    if (staged !== null) await Deno.remove(staged, { recursive: true });
  }
}

function basename(p: string): string {
  return p.slice(p.lastIndexOf("/") + 1);
}
