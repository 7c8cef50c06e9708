/**
 * qgalore: pre-train and fine-tune LLaMA-style models on the memory you have, with
 * Q-GaLore (INT8 weights, INT4 projectors, lazy low-rank subspaces, 8-bit Adam) and its
 * baselines (AdamW, 8-bit Adam, GaLore) in one Rust engine driven from TypeScript.
 *
 * ```ts
 * import { train } from "@qgalore/qgalore";
 * const summary = await train({ model: "llama-9m", optimizer: "qgalore", steps: 100, out: null });
 * console.log(summary.val_loss);
 * ```
 *
 * `train` composes phases a notebook can also call one at a time: `startRun` (set-up: options
 * checked, data, engine, files), `Run.step` (one update), `Run.evaluate` and `Run.finish`
 * (summary, files, engine freed).
 *
 * ```ts
 * import { startRun } from "@qgalore/qgalore";
 * using run = await startRun({ model: "llama-9m", steps: 20, out: null });
 * await run.evaluate();
 * while (!run.done) await run.step();
 * const summary = await run.finish();
 * ```
 *
 * Fine-tuning a Hugging Face model with any of the seven methods (full AdamW, 8-bit Adam,
 * GaLore, 8-bit GaLore, Q-GaLore, LoRA, QLoRA) is `finetune`; `sweep` runs grids of runs.
 * @module
 */

export * from "./lib/errors.ts";
export * from "./lib/presets.ts";
export * from "./lib/tokenizer.ts";
export * from "./lib/rng.ts";
export * from "./lib/data.ts";
export * from "./lib/schedule.ts";
export * from "./lib/memory.ts";
export * from "./lib/log.ts";
export * from "./lib/jupyter.ts";
export * from "./lib/options.ts";
export * from "./lib/cli.ts";
export * from "./lib/run_types.ts";
export * from "./lib/batches.ts";
export type { OwnedData, TrainInput } from "./lib/memory_data.ts";
export { DivergedError, type Summary } from "./lib/summary.ts";
export * from "./lib/trainer.ts";
export * from "./lib/finetune.ts";
export * from "./lib/finetune_data.ts";
export * from "./lib/chat_template.ts";
export * from "./lib/mmlu.ts";
export * from "./lib/open_model.ts";
export * from "./lib/generate.ts";
export * from "./lib/evaluate.ts";
export * from "./lib/adapter.ts";
export * from "./lib/merge.ts";
export * from "./lib/sweep.ts";
export * from "./lib/report.ts";
export {
  type AdapterConfig,
  adapterConfig,
  type CheckpointInfo,
  type ClipPlan,
  Engine,
  engineAbiVersion,
  type EngineConfig,
  EngineError,
  type EngineInfo,
  engineOptions,
  type EnginePlan,
  ErrorCode,
  type EvalResult,
  gemmGflops,
  type GenerateRequest,
  type GenerateResult,
  inspectCheckpoint,
  type MemoryBytes,
  type ModelConfig as EngineModelConfig,
  type ModelProblem,
  type OptimizerConfig,
  type OptionCondition,
  type OptionRange,
  type OptionSchema,
  type OptionSpec,
  type PlanConfig,
  planEngine,
  type PlanNote,
  type ResolvedModelConfig,
  type ResolvedOptimizer,
  resolveModelConfig,
  resolveOptimizerConfig,
  type RopeScaling,
  type RunSpec,
  type SaveAdapterOptions,
  type StepStats,
  type TensorPlan,
  type ValueSpec,
} from "./ffi/engine.ts";
export { LoadError } from "./ffi/loader.ts";
export type { CommBytes, DistInfo } from "./lib/dist.ts";
export {
  NativeProgress,
  NativeShards,
  NativeTokenizer,
  type ShardBuildSpec,
  type ShardInfo,
  type TokenizerInfo,
  type TokenizerTrainSpec,
} from "./ffi/data.ts";
export * from "./lib/estimate.ts";
export * from "./lib/hf.ts";
export {
  type HfExportOptions,
  inspectSafetensors,
  type SafetensorsInfo,
  type SafetensorsTensor,
} from "./ffi/hf.ts";
