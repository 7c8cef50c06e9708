/**
 * LLaMA model presets (the `configs/llama_*.json` files of the GaLore / Q-GaLore repositories)
 * and JSON config loading. Defaults and rules are the engine's (`rust/src/config/model.rs`,
 * through {@link resolveModelConfig}); this module only words its problems with the name of
 * the preset, file or flag they came from. The parameter count is the engine's (`paramCount`
 * in lib/estimate.ts).
 *
 * @module
 */

import { join } from "node:path";
import { UsageError } from "./errors.ts";
import { isDirectory, isFile } from "./fs.ts";

import { type ModelConfig, type ModelProblem, resolveModelConfig } from "../ffi/engine.ts";

/** Model shape, with Hugging Face `LlamaConfig` field names (defined next to the engine). */
export type { ModelConfig };

/** A model config together with the name it was resolved from. */
export interface ResolvedModel {
  /** Preset name, JSON file path, model folder, or "custom" for an inline config. */
  name: string;
  /** The full config. */
  config: ModelConfig;
  /**
   * The Hugging Face model folder the config was read from (its `config.json`; the weights
   * and tokenizer files live next to it). Absent for presets and JSON files.
   */
  dir?: string;
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
 * Reads a JSON file with `LlamaConfig` field names (a Hugging Face `config.json` as
 * `transformers` writes it, in either RoPE layout). Missing optional fields get the engine's
 * defaults (`num_key_value_heads`: the head count); other keys (such as
 * `max_sequence_length`) are ignored, as Hugging Face does; settings the engine does not
 * implement are refused by name. The file's `vocab_size` is kept (its embedding is sized
 * for its tokenizer); `vocab`, the tokenizer's vocabulary, fills it in when the file has
 * none and must not exceed it (ids past the embedding would have no row). Throws UsageError
 * naming the file and the field.
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
 * Builds a config from parsed JSON; `source` names the origin in error messages. A missing,
 * mistyped or unsupported field is an error here; the rules of a buildable model are
 * checked by {@link validateModel}. The config's own `vocab_size` is kept; `vocab` (the
 * tokenizer's) fills it in when absent, and a tokenizer vocabulary larger than the
 * config's is an error naming both.
 */
export function configFromJson(raw: unknown, source: string, vocab?: number): ModelConfig {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new UsageError(`model config ${source}: must be a JSON object`);
  }
  const obj = raw as Record<string, unknown>;
  const own = "vocab_size" in obj;
  const r = resolveModelConfig(obj, vocab === undefined || own ? {} : { vocab_size: vocab });
  // range problems wait for validateModel, except inside rope_scaling / rope_parameters:
  // the filled config names those keys after rope_scaling, whichever layout the file used
  if (r.problem && (r.problem.kind !== "range" || r.problem.field.includes("."))) {
    throw new UsageError(problemText(r.problem, `model config ${source}`, obj));
  }
  const config = r.config!;
  if (own && vocab !== undefined && vocab > config.vocab_size) {
    throw new UsageError(
      `model config ${source}: vocab_size ${config.vocab_size} is smaller than the ` +
        `tokenizer's vocabulary of ${vocab} tokens`,
    );
  }
  return config;
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
  if (p.kind === "missing") return `${source}: missing field ${p.field}`;
  // the value as given (p.value is null for one that is absent or not a number); a key
  // inside rope_scaling / rope_parameters is looked up there
  const [outer, inner] = p.field.split(".");
  const holder = inner === undefined ? given : given[outer];
  const key = inner ?? outer;
  const has = typeof holder === "object" && holder !== null && key in holder;
  const v = has || p.value === null
    ? (holder as Record<string, unknown> | undefined)?.[key]
    : p.value;
  const shown = typeof v === "number" ? String(v) : JSON.stringify(v);
  return `${source}: ${p.field} ${shown} ${p.why}`;
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
 * Resolves a preset name, a JSON config path, or a Hugging Face model folder (one holding
 * `config.json`), and validates it. A preset takes the tokenizer's vocabulary `vocab`; a
 * file or folder keeps its own `vocab_size` (see {@link loadModelConfig}). `source` names
 * where the value came from in error messages.
 */
export function resolveModel(nameOrPath: string, vocab: number, source?: string): ResolvedModel {
  const label = source ?? `model ${nameOrPath}`;
  let config: ModelConfig;
  let dir: string | undefined;
  // a folder's problems name its config.json
  let named = label;
  if (nameOrPath in SHAPES) {
    config = modelConfig(nameOrPath, vocab);
  } else if (isDirectory(nameOrPath) || looksLikePath(nameOrPath)) {
    if (isDirectory(nameOrPath)) {
      dir = nameOrPath;
      named = `${label}${label.endsWith("/") ? "" : "/"}config.json`;
    }
    const file = dir === undefined ? nameOrPath : join(dir, "config.json");
    try {
      if (dir !== undefined && !isFile(file)) {
        throw new UsageError(`model config ${file}: no config.json in this folder`);
      }
      config = loadModelConfig(file, vocab);
    } catch (e) {
      if (!(e instanceof UsageError) || source === undefined) throw e;
      throw new UsageError(e.message.replace(`model config ${file}`, named));
    }
  } else {
    throw new UsageError(
      `${label}: unknown preset; allowed: ${PRESET_NAMES.join(", ")}, ` +
        "a path to a JSON config, or a model folder with config.json",
    );
  }
  validateModel(config, named);
  return dir === undefined ? { name: nameOrPath, config } : { name: nameOrPath, config, dir };
}

function looksLikePath(s: string): boolean {
  return s.endsWith(".json") || s.includes("/") || s.includes("\\");
}

function errorText(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n")[0];
}
