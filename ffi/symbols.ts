/**
 * The native symbol table: the one place that states the C signatures of `rust/src/ffi.rs`.
 * @module
 */

/** ABI version this TypeScript expects; checked against `qg_abi_version()` at load. */
export const ABI_VERSION = 6;

/** Symbols of the qgalore engine library. */
export const SYMBOLS = {
  qg_abi_version: { parameters: [], result: "u32" },
  qg_engine_new: {
    parameters: ["buffer", "usize", "buffer", "usize", "buffer"],
    result: "pointer",
    nonblocking: true,
  },
  qg_plan: {
    parameters: ["buffer", "usize", "buffer", "usize", "buffer", "usize", "buffer"],
    result: "i32",
  },
  qg_engine_free: { parameters: ["pointer"], result: "void" },
  qg_last_error: { parameters: ["pointer", "buffer", "usize"], result: "usize" },
  qg_info: { parameters: ["pointer", "buffer", "usize"], result: "usize" },
  qg_options: { parameters: ["buffer", "usize"], result: "usize" },
  qg_resolve_optimizer: { parameters: ["buffer", "usize", "buffer", "usize"], result: "usize" },
  qg_resolve_model: { parameters: ["buffer", "usize", "buffer", "usize"], result: "usize" },
  // tokens, mask (null = every target counts), n, micro, lr, out [loss, norm, clipped, count]
  qg_train_step: {
    parameters: ["pointer", "buffer", "buffer", "usize", "u32", "f32", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  // tokens, mask (or null), n, batches, out [mean, sum, count], rows (or null)
  qg_eval: {
    parameters: ["pointer", "buffer", "buffer", "usize", "u32", "buffer", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  qg_memory: { parameters: ["pointer", "buffer"], result: "i32" },
  qg_gemm_gflops: {
    parameters: ["u32", "u32", "u32", "u32", "u32"],
    result: "f64",
    nonblocking: true,
  },
  qg_save: {
    parameters: ["pointer", "buffer", "usize", "buffer", "usize"],
    result: "i32",
    nonblocking: true,
  },
  qg_load: { parameters: ["pointer", "buffer", "usize"], result: "i32", nonblocking: true },
  qg_load_weights: {
    parameters: ["pointer", "buffer", "usize"],
    result: "i32",
    nonblocking: true,
  },
  qg_checkpoint_info: { parameters: ["buffer", "usize", "buffer", "usize"], result: "usize" },
  qg_debug_panic: { parameters: ["pointer"], result: "i32" },
  // inference
  qg_logits: {
    parameters: ["pointer", "buffer", "usize", "u32", "u32", "buffer", "usize"],
    result: "i32",
    nonblocking: true,
  },
  qg_generate: {
    parameters: ["pointer", "buffer", "usize", "buffer", "usize", "buffer"],
    result: "i32",
    nonblocking: true,
  },
  // data: tokenizers and token shards
  qg_progress_new: { parameters: [], result: "pointer" },
  qg_progress_get: { parameters: ["pointer", "buffer"], result: "i32" },
  qg_progress_cancel: { parameters: ["pointer"], result: "void" },
  qg_progress_free: { parameters: ["pointer"], result: "void" },
  qg_tok_open: { parameters: ["buffer", "usize", "buffer", "usize", "buffer"], result: "pointer" },
  qg_tok_train: {
    parameters: ["buffer", "usize", "pointer", "buffer", "usize", "buffer"],
    result: "pointer",
    nonblocking: true,
  },
  qg_tok_free: { parameters: ["pointer"], result: "void" },
  qg_tok_last_error: { parameters: ["pointer", "buffer", "usize"], result: "usize" },
  qg_tok_info: { parameters: ["pointer", "buffer", "usize"], result: "usize" },
  qg_tok_encode: {
    parameters: ["pointer", "buffer", "usize", "u32", "buffer", "usize", "buffer"],
    result: "i32",
  },
  qg_tok_decode: {
    parameters: ["pointer", "buffer", "usize", "u32", "buffer", "usize", "buffer"],
    result: "i32",
  },
  qg_tok_save: { parameters: ["pointer", "buffer", "usize"], result: "i32" },
  qg_shards_build: {
    parameters: ["pointer", "buffer", "usize", "pointer", "buffer", "usize", "buffer"],
    result: "pointer",
    nonblocking: true,
  },
  qg_shards_open: {
    parameters: ["buffer", "usize", "buffer", "usize", "buffer"],
    result: "pointer",
  },
  qg_shards_free: { parameters: ["pointer"], result: "void" },
  qg_shards_last_error: { parameters: ["pointer", "buffer", "usize"], result: "usize" },
  qg_shards_info: { parameters: ["pointer", "buffer", "usize"], result: "usize" },
  qg_shards_read: {
    parameters: ["pointer", "u32", "buffer", "usize", "usize", "buffer"],
    result: "i32",
  },
  // H2 safetensors: Hugging Face weights in and out
  qg_import_hf: { parameters: ["pointer", "buffer", "usize"], result: "i32", nonblocking: true },
  qg_export_hf: { parameters: ["pointer", "buffer", "usize"], result: "i32", nonblocking: true },
  qg_hf_inspect: { parameters: ["buffer", "usize", "buffer", "usize"], result: "usize" },
  // PEFT adapters in and out of a lora / qlora engine
  qg_load_adapter: { parameters: ["pointer", "buffer", "usize"], result: "i32", nonblocking: true },
  qg_save_adapter: { parameters: ["pointer", "buffer", "usize"], result: "i32", nonblocking: true },
  qg_adapter_config: { parameters: ["buffer", "usize", "buffer", "usize"], result: "usize" },
  // data-parallel communication (one world per process; init/finalize on the main thread)
  qg_dist_last_error: { parameters: ["buffer", "usize"], result: "usize" },
  qg_dist_init: { parameters: ["buffer", "usize"], result: "i32" },
  qg_dist_info: { parameters: ["buffer", "usize"], result: "usize" },
  qg_dist_finalize: { parameters: [], result: "i32" },
  qg_dist_abort: { parameters: ["i32"], result: "void" },
  qg_dist_barrier: { parameters: [], result: "i32", nonblocking: true },
  qg_dist_allreduce_f32: { parameters: ["buffer", "usize"], result: "i32", nonblocking: true },
  qg_dist_allreduce_f64: { parameters: ["buffer", "usize"], result: "i32", nonblocking: true },
  qg_dist_bcast: { parameters: ["buffer", "usize", "u32"], result: "i32", nonblocking: true },
  qg_dist_check_same: {
    parameters: ["buffer", "usize", "buffer", "usize"],
    result: "i32",
    nonblocking: true,
  },
  qg_dist_iallreduce_f32: { parameters: ["buffer", "usize", "buffer"], result: "i32" },
  qg_dist_wait: { parameters: ["u64"], result: "i32", nonblocking: true },
} as const;

/** The opened library with typed symbols. */
export type NativeLib = Deno.DynamicLibrary<typeof SYMBOLS>;
