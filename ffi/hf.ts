/**
 * Hugging Face safetensors at the C ABI: the options of `Engine.exportHf` and the header
 * inspection `inspectSafetensors` (the import and export themselves are `Engine` methods).
 * @module
 */
import { loadLibrary } from "./loader.ts";

/** Options of `Engine.exportHf`. */
export interface HfExportOptions {
  /** Element type of `model.safetensors`: bf16 (rounded to nearest even) or f32 (exact). */
  dtype: "bf16" | "f32";
  /** Keys added to `config.json` (bos/eos/pad token ids also go to `generation_config.json`). */
  extra?: Record<string, unknown>;
  /** Files copied into the folder before it appears (tokenizer files). */
  copy?: readonly string[];
}

/** One tensor of a safetensors checkpoint, as its header states it. */
export interface SafetensorsTensor {
  /** Hugging Face name (`model.layers.0.self_attn.q_proj.weight`). */
  name: string;
  /** Header dtype (`F32`, `BF16`, `F16`). */
  dtype: string;
  /** Dimensions. */
  shape: number[];
}

/** What {@link inspectSafetensors} finds. */
export interface SafetensorsInfo {
  /** The files read (one, or every shard of an index). */
  files: string[];
  /** Their total size in bytes. */
  bytes: number;
  /** Every tensor, sorted by name. */
  tensors: SafetensorsTensor[];
  /** The first problem (one line naming the file); the lists are then empty. */
  error?: string;
}

const enc = new TextEncoder();
const dec = new TextDecoder();

/**
 * Validates the safetensors headers at `path` (a model folder, an index file or one
 * `.safetensors` file) as `Engine.importHf` would, without a config check, and lists the
 * tensors. Problems come back in `error`, not as exceptions.
 */
export function inspectSafetensors(path: string): SafetensorsInfo {
  const lib = loadLibrary();
  const p = enc.encode(path);
  let cap = 1 << 16;
  let buf = new Uint8Array(cap);
  let need = Number(lib.symbols.qg_hf_inspect(p, BigInt(p.length), buf, BigInt(cap)));
  if (need > cap) {
    cap = need;
    buf = new Uint8Array(cap);
    need = Number(lib.symbols.qg_hf_inspect(p, BigInt(p.length), buf, BigInt(cap)));
  }
  return JSON.parse(dec.decode(buf.subarray(0, need))) as SafetensorsInfo;
}
