/**
 * PEFT LoRA adapters with a base model: the engine a base + adapter is opened with, and
 * loading the adapter into it with errors that name the flag.
 *
 * Design: an engine's adapter settings are fixed when it is built, so a model opened "with
 * an adapter" gets an engine built from the adapter's own `adapter_config.json` (read by
 * the engine, {@link adapterConfig}): optimizer `lora` on an f32 copy of the base (the
 * logits of `peft` on the f32 model) or `qlora` (NF4 base) when asked, with `lora_rank`,
 * `lora_alpha`, `lora_dropout`, `lora_targets` and `lora_rslora` from the adapter. An engine
 * built from explicit options (fine-tuning from an adapter) must agree with the adapter;
 * {@link Engine.loadAdapter} refuses it in one line otherwise.
 *
 * @module
 */

import {
  type AdapterConfig,
  adapterConfig,
  type Engine,
  EngineError,
  ErrorCode,
  type OptimizerConfig,
} from "../ffi/engine.ts";
import type { ScriptFlag } from "./cli.ts";
import { UsageError } from "./errors.ts";
import type { OpenModelOptions } from "./open_model.ts";

/** How a base model carries its adapter in an engine. */
export type AdapterBase = "lora" | "qlora";

/**
 * Reads the adapter folder's settings (one-line {@link UsageError} naming `label`, e.g.
 * `--adapter DIR`, when it is not a usable PEFT LoRA adapter).
 */
export function readAdapterConfig(dir: string, label = `adapter ${dir}`): AdapterConfig {
  try {
    return adapterConfig(dir);
  } catch (e) {
    if (e instanceof EngineError) throw new UsageError(`${label}: ${e.message}`);
    throw e;
  }
}

/**
 * The optimizer config of an engine that holds the adapter `config`: `lora` with an f32
 * base (default), or `qlora` (NF4 base), with the adapter's rank, alpha, dropout, targets
 * and rsLoRA. Other optimizer options take the engine's defaults.
 */
export function adapterOptimizer(
  config: AdapterConfig,
  base: AdapterBase = "lora",
): OptimizerConfig {
  return {
    name: base,
    ...(base === "lora" ? { lora_base: "f32" } : {}),
    lora_rank: config.r,
    lora_alpha: config.lora_alpha,
    lora_dropout: config.lora_dropout,
    lora_targets: config.target_modules.join(","),
    lora_rslora: config.use_rslora,
  } as unknown as OptimizerConfig;
}

/**
 * Loads the adapter folder `dir` into `engine` ({@link Engine.loadAdapter}); an engine
 * refusal becomes a one-line {@link UsageError} starting with `label` (e.g. `--adapter DIR`).
 */
export async function loadAdapterInto(
  engine: Engine,
  dir: string,
  label = `adapter ${dir}`,
): Promise<void> {
  try {
    await engine.loadAdapter(dir);
  } catch (e) {
    if (e instanceof EngineError && e.code === ErrorCode.invalid) {
      throw new UsageError(`${label}: ${e.message}`);
    }
    throw e;
  }
}

/** The example scripts' adapter flags (`generate.ts`, `evaluate.ts`): `--adapter`, `--adapter-base`. */
export const ADAPTER_SCRIPT_FLAGS: Readonly<Record<string, ScriptFlag>> = Object.freeze({
  adapter: { type: "string" },
  "adapter-base": { type: "choice", choices: ["lora", "qlora"] },
});

/** `--help` lines of {@link ADAPTER_SCRIPT_FLAGS}. */
export const ADAPTER_USAGE =
  `  --adapter DIR         PEFT LoRA adapter folder applied to the Hugging Face --model
  --adapter-base B      lora (f32 base) or qlora (NF4 base, as QLoRA trained it) [lora]`;

/**
 * {@link openModel}'s adapter options from parsed {@link ADAPTER_SCRIPT_FLAGS} (none without
 * `--adapter`; `--adapter-base` alone is a one-line {@link UsageError}).
 */
export function adapterArgs(
  a: Readonly<Record<string, string | number | boolean | undefined>>,
): Pick<OpenModelOptions, "adapter" | "adapterBase" | "adapterLabel"> {
  if (a.adapter === undefined) {
    if (a["adapter-base"] !== undefined) {
      throw new UsageError("--adapter-base: needs --adapter DIR");
    }
    return {};
  }
  return {
    adapter: a.adapter as string,
    adapterBase: (a["adapter-base"] ?? "lora") as AdapterBase,
    adapterLabel: `--adapter ${a.adapter}`,
  };
}
