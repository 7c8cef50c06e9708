/**
 * LLaMA model presets (the `configs/llama_*.json` files of the GaLore / Q-GaLore repositories)
 * and JSON config loading. Defaults and rules are the engine's (`rust/src/config/model.rs`,
 * through {@link resolveModelConfig}); this module only words its problems with the name of
 * the preset, file or flag they came from. The parameter count is the engine's (`paramCount`
 * in lib/estimate.ts).
 *
 * @module
 */

import { UsageError } from "./errors.ts";

import { type ModelConfig, type ModelProblem, resolveModelConfig } from "../ffi/engine.ts";

/** Model shape, with Hugging Face `LlamaConfig` field names (defined next to the engine). */
export type { ModelConfig };

/** A model config together with the name it was resolved from. */
export interface ResolvedModel {
  /** Preset name, JSON file path, or "custom" for an inline config. */
  name: string;
  /** The full config. */
  config: ModelConfig;
}

/** Shape of one preset: [hidden, intermediate, heads, layers]. */
type Shape = readonly [number, number, number, number];

const SHAPES: Readonly<Record<string, Shape>> = Object.freeze({
  "llama-9m": [128, 352, 4, 4],
  "llama-20m": [256, 688, 4, 4],
  "llama-35m": [384, 1024, 8, 6],
  "llama-60m": [512, 1376, 8, 8],
  "llama-130m": [768, 2048, 12, 12],
  "llama-350m": [1024, 2736, 16, 24],
  "llama-1b": [2048, 5461, 32, 24],
  "llama-7b": [4096, 11008, 32, 32],
});

/** Names of the built-in presets, smallest first. */
export const PRESET_NAMES: readonly string[] = Object.freeze(Object.keys(SHAPES));

/** The config of preset `name` with `vocab` tokens (the tokenizer decides the vocabulary). */
export function modelConfig(name: string, vocab: number): ModelConfig {
  const shape = SHAPES[name];
  if (!shape) {
    throw new UsageError(`model ${name}: unknown preset; allowed: ${PRESET_NAMES.join(", ")}`);
  }
  const [hidden, inter, heads, layers] = shape;
  return resolveModelConfig({
    vocab_size: vocab,
    hidden_size: hidden,
    intermediate_size: inter,
    num_attention_heads: heads,
    num_hidden_layers: layers,
  }).config!;
}

/**
 * Reads a JSON file with `LlamaConfig` field names. Missing optional fields get the engine's
 * defaults (`num_key_value_heads`: the head count); other keys (such as
 * `max_sequence_length`) are ignored, as Hugging Face does. When `vocab` is given it
 * replaces the file's `vocab_size`: the token ids come from our tokenizer, so an embedding
 * sized for another tokenizer would either miss ids or waste rows. Throws UsageError naming
 * the file and the field.
 */
export function loadModelConfig(path: string, vocab?: number): ModelConfig {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound ? "file not found" : errorText(e);
    throw new UsageError(`model config ${path}: ${why}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`model config ${path}: invalid JSON (${errorText(e)})`);
  }
  return configFromJson(raw, path, vocab);
}

/**
 * Builds a config from parsed JSON; `source` names the origin in error messages. A missing
 * or non-numeric field is an error here; the rules of a buildable model are checked by
 * {@link validateModel}.
 */
export function configFromJson(raw: unknown, source: string, vocab?: number): ModelConfig {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new UsageError(`model config ${source}: must be a JSON object`);
  }
  const obj = raw as Record<string, unknown>;
  const r = resolveModelConfig(obj, vocab === undefined ? {} : { vocab_size: vocab });
  if (r.problem && r.problem.kind !== "range") {
    throw new UsageError(problemText(r.problem, `model config ${source}`, obj));
  }
  if ("hidden_act" in obj && obj.hidden_act !== "silu") {
    throw new UsageError(
      `model config ${source}: hidden_act ${
        JSON.stringify(obj.hidden_act)
      }: only "silu" is supported`,
    );
  }
  if (obj.tie_word_embeddings === true) {
    throw new UsageError(
      `model config ${source}: tie_word_embeddings true: only untied lm_head is supported`,
    );
  }
  return r.config!;
}

/**
 * An engine problem worded for the user: `source: field value why`, the value as given in
 * `given` (the config the user wrote) where it has the field.
 */
function problemText(
  p: ModelProblem,
  source: string,
  given: Readonly<Record<string, unknown>>,
): string {
  // the value as given (p.value is null for one that is absent or not a number)
  const v = p.field in given || p.value === null ? given[p.field] : p.value;
  if (p.kind === "missing") return `${source}: missing field ${p.field}`;
  if (p.kind === "type") return `${source}: ${p.field} ${JSON.stringify(v)} ${p.why}`;
  return `${source}: ${p.field} ${v} ${p.why}`;
}

/**
 * Checks that a complete config describes a buildable model (the engine's rules, no
 * defaults); throws UsageError naming the field. `source` prefixes the message (a flag and
 * value, or a file).
 */
export function validateModel(cfg: ModelConfig, source = "model config"): void {
  const r = resolveModelConfig(cfg, { defaults: false });
  if (r.problem) {
    throw new UsageError(problemText(r.problem, source, cfg as unknown as Record<string, unknown>));
  }
}

/**
 * Resolves a preset name or a JSON config path, with the tokenizer's vocabulary, and
 * validates it. `source` names where the value came from in error messages.
 */
export function resolveModel(nameOrPath: string, vocab: number, source?: string): ResolvedModel {
  const label = source ?? `model ${nameOrPath}`;
  let config: ModelConfig;
  if (nameOrPath in SHAPES) {
    config = modelConfig(nameOrPath, vocab);
  } else if (looksLikePath(nameOrPath)) {
    try {
      config = loadModelConfig(nameOrPath, vocab);
    } catch (e) {
      if (!(e instanceof UsageError) || source === undefined) throw e;
      throw new UsageError(e.message.replace(`model config ${nameOrPath}`, label));
    }
  } else {
    throw new UsageError(
      `${label}: unknown preset; allowed: ${PRESET_NAMES.join(", ")}, or a path to a JSON config`,
    );
  }
  validateModel(config, label);
  return { name: nameOrPath, config };
}

function looksLikePath(s: string): boolean {
  return s.endsWith(".json") || s.includes("/") || s.includes("\\");
}

function errorText(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}
