/**
 * Merges a PEFT LoRA adapter into its base model: a plain Hugging Face folder (weights
 * W + s·B·A, as `peft`'s `merge_and_unload()`) that `transformers` loads without `peft`.
 *
 *     deno run -A examples/merge.ts --model BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR
 *     deno run -A examples/merge.ts --model BASE --adapter A --out M --dtype bf16 --json
 *
 * `--out` must not exist or be an empty folder (nothing is overwritten). `--json` prints
 * `{"out", "dtype", "base", "adapter"}` as the last stdout line. Exit codes: 0 done, 1 engine
 * failure, 2 usage error.
 *
 * @module
 */

// First: a missing or stale engine library is one line, before anything opens it.
import "../ffi/preflight.ts";
import { MODEL_SCRIPT_FLAGS, parseScriptArgs, type ScriptFlag } from "../lib/cli.ts";
import { mergeAdapter } from "../lib/merge.ts";
import { failure } from "./evaluate.ts";

const FLAGS: Readonly<Record<string, ScriptFlag>> = {
  ...MODEL_SCRIPT_FLAGS,
  adapter: { type: "string", required: true },
  out: { type: "string", required: true },
  dtype: { type: "choice", choices: ["f32", "bf16"] },
  "adapter-base": { type: "choice", choices: ["lora", "qlora"] },
  json: { type: "switch" },
};

const USAGE = `Merge a PEFT LoRA adapter into its base model (a plain Hugging Face folder).

Usage: deno run -A examples/merge.ts --model DIR --adapter DIR --out DIR [flags]

  --model DIR           the base model: a Hugging Face model folder
  --adapter DIR         PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)
  --out DIR             the merged model's folder; must not exist or be empty
  --dtype D             f32 or bf16 weights [f32]
  --adapter-base B      lora (the f32 base) or qlora (the NF4 base a QLoRA adapter was trained on) [lora]
  --tokenizer PATH      tokenizer.json or folder [the model's, else bytes]
  --device D            cpu, cuda or auto [cpu]
  --threads N           engine threads [one per core]
  --json                print {"out","dtype","base","adapter"} as the last stdout line
  -h, --help            show this help`;

/** Runs the script and returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    const a = parseScriptArgs(argv, FLAGS);
    if (a === "help") {
      console.log(USAGE);
      return 0;
    }
    const r = await mergeAdapter(a.model as string, a.adapter as string, a.out as string, {
      dtype: (a.dtype ?? "f32") as "f32" | "bf16",
      base: (a["adapter-base"] ?? "lora") as "lora" | "qlora",
      tokenizer: (a.tokenizer as string | undefined) ?? null,
      device: (a.device ?? "cpu") as "cpu" | "cuda" | "auto",
      ...(a.threads === undefined ? {} : { threads: a.threads as number }),
      labels: {
        model: `--model ${a.model}`,
        adapter: `--adapter ${a.adapter}`,
        out: `--out ${a.out}`,
      },
    });
    if (a.json) console.log(JSON.stringify(r));
    else {
      const c = r.adapter;
      console.log(
        `merged ${a.adapter} (r ${c.r}, alpha ${c.lora_alpha}, ${
          c.target_modules.join(",")
        }) into ${a.model} → ${r.out} (${r.dtype})`,
      );
    }
    return 0;
  } catch (e) {
    return failure(e);
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
