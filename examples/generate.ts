/**
 * Text from a trained model: the prompt is tokenized (with the tokenizer's special tokens),
 * processed in one pass, and each new token costs one position thanks to a KV cache.
 * Temperature 0 is greedy; otherwise softmax sampling with top-k and top-p, reproducible by
 * seed. Stops at the tokenizer's EOS or after --max-new-tokens.
 *
 *     deno run -A examples/generate.ts --model runs/x/hf --prompt "ROMEO:" --max-new-tokens 64
 *     deno run -A examples/generate.ts --model DIR --prompt "Hi" --max-new-tokens 20 \
 *       --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1 --json
 *     deno run -A examples/generate.ts --model BASE --adapter ADAPTER --prompt "Hi" --max-new-tokens 20
 *
 * `--adapter` applies a PEFT LoRA adapter folder (one `peft` saved, or qgalore's
 * `--save-adapter`) to a Hugging Face `--model`: an engine built from the adapter's settings
 * on the f32 base (`--adapter-base qlora`: on the NF4 base a QLoRA adapter was trained on).
 *
 * `--json` prints `{"prompt_ids", "ids", "text"}` (new tokens only in `ids` and `text`) as
 * the last stdout line. Exit codes: 0 done, 1 engine failure, 2 usage error.
 *
 * @module
 */

// First: a missing or stale engine library is one line, before anything opens it.
import "../ffi/preflight.ts";
import { MODEL_SCRIPT_FLAGS, modelArgs, parseScriptArgs, type ScriptFlag } from "../lib/cli.ts";
import { UsageError } from "../lib/errors.ts";
import { ADAPTER_SCRIPT_FLAGS, ADAPTER_USAGE, adapterArgs } from "../lib/adapter.ts";
import { generateIds } from "../lib/generate.ts";
import { openModel } from "../lib/open_model.ts";
import { failure } from "./evaluate.ts";

const FLAGS: Readonly<Record<string, ScriptFlag>> = {
  ...MODEL_SCRIPT_FLAGS,
  prompt: { type: "string", required: true },
  ...ADAPTER_SCRIPT_FLAGS,
  "max-new-tokens": { type: "int", min: 1, max: 1 << 20, required: true },
  temperature: { type: "number", min: 0, max: 1e6 },
  "top-k": { type: "int", min: 0 },
  "top-p": { type: "number", min: 0, open: true, max: 1 },
  seed: { type: "int", min: 0 },
  cache: { type: "choice", choices: ["on", "off"] },
  json: { type: "switch" },
};

const USAGE = `Generate text with a model.

Usage: deno run -A examples/generate.ts --model DIR|CKPT --prompt TEXT --max-new-tokens N [flags]

  --model DIR|CKPT      Hugging Face model folder, a qgalore checkpoint, or a run folder
  --prompt TEXT         the text to continue
${ADAPTER_USAGE}
  --max-new-tokens N    at most N new tokens (fewer at EOS or the model's last position)
  --temperature T       0 = greedy [0]
  --top-k K             sample among the K most likely tokens, 0 = all [0]
  --top-p P             nucleus: the smallest set with probability ≥ P, in (0, 1] [1]
  --seed S              sampling seed [0]
  --cache on|off        KV cache (off recomputes the whole prefix per token) [on]
  --tokenizer PATH      tokenizer.json or folder [the model's, else bytes]
  --device D            cpu, cuda or auto [cpu]
  --threads N           engine threads [one per core]
  --json                print {"prompt_ids","ids","text"} as the last stdout line
  -h, --help            show this help`;

/** Runs the script and returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    const a = parseScriptArgs(argv, FLAGS);
    if (a === "help") {
      console.log(USAGE);
      return 0;
    }
    const cache = (a.cache ?? "on") as string;
    // generation runs on its own KV-cache path; the engine's training shape stays small
    using m = await openModel({ ...modelArgs(a, 1), ...adapterArgs(a) });
    const promptIds = m.tokenizer.encode(a.prompt as string, { addSpecial: true });
    if (promptIds.length === 0) throw new UsageError(`--prompt: gives no tokens`);
    const r = await generateIds(m.engine, promptIds, {
      maxNewTokens: a["max-new-tokens"] as number,
      temperature: (a.temperature as number | undefined) ?? 0,
      topK: (a["top-k"] as number | undefined) ?? 0,
      topP: (a["top-p"] as number | undefined) ?? 1,
      seed: (a.seed as number | undefined) ?? 0,
      cache: cache === "on",
      eosIds: m.tokenizer.eosIds,
    });
    const text = m.tokenizer.decode(r.ids, { skipSpecial: true });
    if (a.json) {
      console.log(JSON.stringify({ prompt_ids: Array.from(promptIds), ids: r.ids, text }));
    } else console.log(`${a.prompt}${text}`);
    return 0;
  } catch (e) {
    return failure(e);
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
