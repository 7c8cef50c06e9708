/**
 * Checkpoint loading speed (issue 9: "loading approaches disk read speed"). Writes a
 * Hugging Face safetensors checkpoint of a llama-shaped model (default llama-350m with a
 * 32000-token vocabulary in f32, ≈ 1.5 GB) into a temporary folder, then times, once with
 * the file in the page cache (read just before) and once with its pages dropped (cold, where
 * `dd iflag=nocache` can drop them):
 *   - reading the whole file (16 MiB reads into one buffer): the ceiling,
 *   - `Engine.importHf` into a CPU engine built for adamw (f32 weights) and for qgalore
 *     (INT8 linears quantized as they stream in),
 *   - `Engine.exportHf` of each, in f32 and bf16 (written to the same disk, fsync'd).
 * Prints one JSON line per measurement (seconds, GB/s; for imports also how much the
 * process's peak resident memory grew during the import: mapped file pages and scratch) and the CPU model; the
 * folder is deleted at the end.
 *
 *   deno run -A bench/load.ts [--model llama-350m] [--vocab 32000] [--dtype f32|bf16]
 *                             [--repeat 3]
 * @module
 */
import { parseArgs } from "node:util";
import { Engine } from "../ffi/engine.ts";
import { inspectSafetensors } from "../ffi/hf.ts";
import type { ModelConfig } from "../ffi/engine.ts";
import { benchConfig } from "./common.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string", default: "llama-350m" },
    vocab: { type: "string", default: "32000" },
    dtype: { type: "string", default: "f32" },
    repeat: { type: "string", default: "3" },
  },
});
const vocab = Number(values.vocab);
const repeat = Number(values.repeat);
const dtype = values.dtype === "bf16" ? "BF16" : "F32";
const width = dtype === "F32" ? 4 : 2;

/** Hugging Face tensor names and shapes of a LLaMA config (untied head). */
function tensors(m: ModelConfig): [string, number[]][] {
  const c = m.hidden_size, i = m.intermediate_size;
  const kv = (m.num_key_value_heads ?? m.num_attention_heads) * (c / m.num_attention_heads);
  const out: [string, number[]][] = [["model.embed_tokens.weight", [m.vocab_size, c]]];
  for (let l = 0; l < m.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    out.push(
      [`${p}.input_layernorm.weight`, [c]],
      [`${p}.self_attn.q_proj.weight`, [c, c]],
      [`${p}.self_attn.k_proj.weight`, [kv, c]],
      [`${p}.self_attn.v_proj.weight`, [kv, c]],
      [`${p}.self_attn.o_proj.weight`, [c, c]],
      [`${p}.post_attention_layernorm.weight`, [c]],
      [`${p}.mlp.gate_proj.weight`, [i, c]],
      [`${p}.mlp.up_proj.weight`, [i, c]],
      [`${p}.mlp.down_proj.weight`, [c, i]],
    );
  }
  out.push(["model.norm.weight", [c]], ["lm_head.weight", [m.vocab_size, c]]);
  return out;
}

/** Writes the checkpoint: small pseudo-random weights (norms 1), one 16 MiB block reused. */
async function writeCheckpoint(path: string, m: ModelConfig): Promise<number> {
  const list = tensors(m);
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let off = 0;
  for (const [name, shape] of list) {
    const n = shape.reduce((a, b) => a * b, 1) * width;
    header[name] = { dtype, shape, data_offsets: [off, off + n] };
    off += n;
  }
  let text = JSON.stringify(header);
  text += " ".repeat((8 - (text.length % 8)) % 8);
  const block = new Float32Array(1 << 22);
  let x = 12345;
  for (let k = 0; k < block.length; k++) {
    x = (x * 1103515245 + 12345) >>> 0;
    block[k] = (x / 2 ** 32 - 0.5) * 0.04;
  }
  const bytes = dtype === "F32" ? new Uint8Array(block.buffer) : bf16(block);
  const f = await Deno.open(path, { write: true, create: true, truncate: true });
  const head = new Uint8Array(8);
  new DataView(head.buffer).setBigUint64(0, BigInt(text.length), true);
  await writeAll(f, head);
  await writeAll(f, new TextEncoder().encode(text));
  for (let left = off; left > 0;) {
    const n = Math.min(left, bytes.length);
    await writeAll(f, bytes.subarray(0, n));
    left -= n;
  }
  await f.sync(); // written back, so a cold run can drop its pages
  f.close();
  return 8 + text.length + off;
}

function bf16(v: Float32Array): Uint8Array {
  const u = new Uint32Array(v.buffer);
  const out = new Uint16Array(v.length);
  for (let k = 0; k < v.length; k++) out[k] = (u[k] + 0x7fff + ((u[k] >> 16) & 1)) >>> 16;
  return new Uint8Array(out.buffer);
}

async function writeAll(f: Deno.FsFile, b: Uint8Array): Promise<void> {
  for (let done = 0; done < b.length;) done += await f.write(b.subarray(done));
}

/** Reads the whole file into one reused buffer; returns seconds. */
async function readAll(path: string): Promise<number> {
  const buf = new Uint8Array(16 << 20);
  const t0 = performance.now();
  const f = await Deno.open(path);
  while ((await f.read(buf)) !== null) { /* discard */ }
  f.close();
  return (performance.now() - t0) / 1000;
}

function cpuModel(): string {
  try {
    const out = new Deno.Command("lscpu", { stdout: "piped" }).outputSync();
    const line = new TextDecoder().decode(out.stdout).split("\n").find((l) =>
      l.startsWith("Model name:")
    );
    return line?.replace("Model name:", "").trim() ?? "unknown";
  } catch {
    return "unknown (no lscpu)";
  }
}

/** Resets the kernel's peak resident size of this process (Linux; else a no-op). */
function resetPeak(): void {
  try {
    Deno.writeTextFileSync("/proc/self/clear_refs", "5");
  } catch { /* not Linux */ }
}

/** Peak resident bytes since `resetPeak` (VmHWM), or the current size where unknown. */
function peakRss(): number {
  try {
    const m = Deno.readTextFileSync("/proc/self/status").match(/VmHWM:\s+(\d+) kB/);
    if (m) return Number(m[1]) * 1024;
  } catch { /* not Linux */ }
  return Deno.memoryUsage().rss;
}

/** The 1-minute load average: other work on the machine skews every number. */
function loadAverage(): string {
  try {
    return Deno.readTextFileSync("/proc/loadavg").split(" ")[0];
  } catch {
    return "unknown";
  }
}

const best = (xs: number[]): number => Math.min(...xs);

/**
 * Drops the file's pages from the page cache (posix_fadvise DONTNEED through `dd
 * iflag=nocache`: this file only, nothing else on the machine). Returns whether it could.
 */
function evict(path: string): boolean {
  try {
    const args = [`if=${path}`, "iflag=nocache", "count=0", "status=none"];
    return new Deno.Command("dd", { args }).outputSync().success;
  } catch {
    return false;
  }
}

/** A CPU engine for the benchmark's model with `optimizer`'s defaults. */
async function engine(optimizer: string): Promise<Engine> {
  const run = { batchSize: 1, seqLen: 16, device: "cpu" as const };
  return await Engine.create(
    benchConfig({ model: values.model!, vocab, optimizer, rank: 128, ...run }),
  );
}

const dir = await Deno.makeTempDir({ prefix: "qgalore-load-" });
try {
  const cfg = benchConfig({
    model: values.model!,
    vocab,
    optimizer: "adamw",
    rank: 128,
    batchSize: 1,
    seqLen: 16,
    device: "cpu",
  });
  const file = `${dir}/model.safetensors`;
  const t0 = performance.now();
  const bytes = await writeCheckpoint(file, cfg.model);
  const gb = bytes / 1e9;
  const cold = evict(file);
  console.log(JSON.stringify({
    file: "model.safetensors",
    model: values.model,
    vocab,
    dtype,
    bytes,
    write_s: +((performance.now() - t0) / 1000).toFixed(3),
    tensors: inspectSafetensors(dir).tensors.length,
    cpu: cpuModel(),
    cores: navigator.hardwareConcurrency,
    page_cache: "warm: file read once before each timed run; cold: its pages dropped before",
    cold_possible: cold,
    loadavg: loadAverage(),
  }));
  for (const cache of cold ? ["warm", "cold"] : ["warm"]) {
    const prepare = async (): Promise<void> => {
      if (cache === "cold") evict(file);
      else await readAll(file);
    };
    const reads: number[] = [];
    for (let r = 0; r < repeat; r++) {
      await prepare();
      reads.push(await readAll(file));
    }
    console.log(JSON.stringify({
      what: "read file",
      cache,
      seconds: +best(reads).toFixed(3),
      gb_per_s: +(gb / best(reads)).toFixed(2),
    }));
    for (const optimizer of ["adamw", "qgalore"]) {
      const times: number[] = [];
      const exports: Record<string, unknown>[] = [];
      let rssGrowth = 0;
      for (let r = 0; r < repeat; r++) {
        using e = await engine(optimizer);
        await prepare();
        const rss0 = Deno.memoryUsage().rss;
        resetPeak();
        const t = performance.now();
        await e.importHf(dir);
        times.push((performance.now() - t) / 1000);
        // the engine's own memory is already resident: growth is mapped file pages, scratch
        rssGrowth = Math.max(rssGrowth, peakRss() - rss0);
        if (cache === "warm" && r === repeat - 1) {
          // and back out (to the same disk; the written file's size over the time)
          for (const d of ["f32", "bf16"] as const) {
            const out = `${dir}/export-${optimizer}-${d}`;
            const t = performance.now();
            await e.exportHf(out, { dtype: d });
            const s = (performance.now() - t) / 1000;
            const size = (await Deno.stat(`${out}/model.safetensors`)).size;
            exports.push({
              what: `exportHf ${optimizer} ${d}`,
              seconds: +s.toFixed(3),
              gb_per_s: +(size / 1e9 / s).toFixed(2),
            });
            await Deno.remove(out, { recursive: true });
          }
        }
      }
      console.log(JSON.stringify({
        what: `importHf ${optimizer}`,
        cache,
        seconds: +best(times).toFixed(3),
        gb_per_s: +(gb / best(times)).toFixed(2),
        vs_read: +(best(reads) / best(times)).toFixed(2),
        runs: times.map((s) => +s.toFixed(3)),
        peak_rss_growth_mb: Math.round(rssGrowth / 2 ** 20),
        loadavg: loadAverage(),
      }));
      for (const x of exports) console.log(JSON.stringify(x));
    }
  }
} finally {
  await Deno.remove(dir, { recursive: true });
}
