/**
 * LLaMA model presets (the `configs/llama_*.json` files of the GaLore / Q-GaLore repositories),
 * JSON config loading and validation. The parameter count is the engine's (`paramCount` in
 * lib/estimate.ts).
 *
 * @module
 */

import { UsageError } from "./errors.ts";

import type { ModelConfig } from "../ffi/engine.ts";

/** Model shape, with Hugging Face `LlamaConfig` field names (defined next to the engine). */
export type { ModelConfig };

/** A model config together with the name it was resolved from. */
export interface ResolvedModel {
  /** Preset name, JSON file path, or "custom" for an inline config. */
  name: string;
  /** The full config. */
  config: ModelConfig;
}

/** Fields shared by every preset; the reference JSON files leave these to HF defaults. */
export const MODEL_DEFAULTS: Readonly<
  Pick<ModelConfig, "max_position_embeddings" | "rope_theta" | "rms_norm_eps" | "initializer_range">
> = Object.freeze({
  // The JSON key `max_sequence_length` is not a LlamaConfig field, so HF's 2048 applies.
  max_position_embeddings: 2048,
  rope_theta: 10000,
  rms_norm_eps: 1e-6,
  initializer_range: 0.02,
});

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
  return {
    vocab_size: vocab,
    hidden_size: hidden,
    intermediate_size: inter,
    num_attention_heads: heads,
    num_key_value_heads: heads,
    num_hidden_layers: layers,
    ...MODEL_DEFAULTS,
  };
}

const REQUIRED = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"];
const NUMERIC: readonly (keyof ModelConfig)[] = [
  "vocab_size",
  ...REQUIRED as (keyof ModelConfig)[],
  "num_key_value_heads",
  "max_position_embeddings",
  "rope_theta",
  "rms_norm_eps",
  "initializer_range",
];

/**
 * Reads a JSON file with `LlamaConfig` field names. Missing optional fields get
 * {@link MODEL_DEFAULTS}; `num_key_value_heads` defaults to the head count; other keys (such
 * as `max_sequence_length`) are ignored, as Hugging Face does. When `vocab` is given it
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

/** Builds a config from parsed JSON; `source` names the origin in error messages. */
export function configFromJson(raw: unknown, source: string, vocab?: number): ModelConfig {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new UsageError(`model config ${source}: must be a JSON object`);
  }
  const obj = raw as Record<string, unknown>;
  for (const key of REQUIRED) {
    if (!(key in obj)) throw new UsageError(`model config ${source}: missing field ${key}`);
  }
  if (vocab === undefined && !("vocab_size" in obj)) {
    throw new UsageError(`model config ${source}: missing field vocab_size`);
  }
  for (const key of NUMERIC) {
    if (key in obj && typeof obj[key] !== "number") {
      throw new UsageError(
        `model config ${source}: ${key} ${JSON.stringify(obj[key])} must be a number`,
      );
    }
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
  const num = (key: keyof ModelConfig): number | undefined => obj[key] as number | undefined;
  const heads = num("num_attention_heads")!;
  return {
    vocab_size: vocab ?? num("vocab_size")!,
    hidden_size: num("hidden_size")!,
    intermediate_size: num("intermediate_size")!,
    num_attention_heads: heads,
    num_key_value_heads: num("num_key_value_heads") ?? heads,
    num_hidden_layers: num("num_hidden_layers")!,
    max_position_embeddings: num("max_position_embeddings") ??
      MODEL_DEFAULTS.max_position_embeddings,
    rope_theta: num("rope_theta") ?? MODEL_DEFAULTS.rope_theta,
    rms_norm_eps: num("rms_norm_eps") ?? MODEL_DEFAULTS.rms_norm_eps,
    initializer_range: num("initializer_range") ?? MODEL_DEFAULTS.initializer_range,
  };
}

/**
 * Checks that a config describes a buildable model; throws UsageError naming the field.
 * `source` prefixes the message (a flag and value, or a file).
 */
export function validateModel(cfg: ModelConfig, source = "model config"): void {
  const ints: (keyof ModelConfig)[] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "max_position_embeddings",
  ];
  for (const key of ints) {
    const v = cfg[key];
    if (!Number.isInteger(v) || v < 1) {
      throw new UsageError(`${source}: ${key} ${v} must be an integer ≥ 1`);
    }
  }
  for (const key of ["rope_theta", "rms_norm_eps", "initializer_range"] as const) {
    const v = cfg[key];
    if (!Number.isFinite(v) || v <= 0) throw new UsageError(`${source}: ${key} ${v} must be > 0`);
  }
  const { hidden_size: h, num_attention_heads: heads, num_key_value_heads: kv } = cfg;
  if (h % heads !== 0) {
    throw new UsageError(
      `${source}: num_attention_heads ${heads} must divide hidden_size ${h}`,
    );
  }
  if (heads % kv !== 0) {
    throw new UsageError(
      `${source}: num_key_value_heads ${kv} must divide num_attention_heads ${heads}`,
    );
  }
  if ((h / heads) % 2 !== 0) {
    throw new UsageError(
      `${source}: head dim ${
        h / heads
      } (hidden_size ${h} / num_attention_heads ${heads}) must be even for RoPE`,
    );
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
