/**
 * Fine-tune a pretrained LLaMA-style model from the command line.
 *
 *     deno run -A examples/finetune.ts --model models/llama-1b --data train.jsonl --steps 200
 *     deno run -A examples/finetune.ts --model DIR --data train.jsonl --optimizer qgalore --mc mmlu.csv
 *     deno run -A examples/finetune.ts --resume runs/2026-12-03T07-00-00-000Z   # after a kill
 *     deno run -A examples/finetune.ts --help
 *
 * Exit codes: 0 done, 1 engine failure, 2 usage error or divergence, 130 interrupted (resumable).
 *
 * @module
 */

// First: a missing or stale engine library is one line, before the options open it.
import "../ffi/preflight.ts";
import { finetuneUsage, parseFinetuneArgs } from "../lib/cli.ts";
import { failureExit } from "../lib/cli_exit.ts";
import { finetune } from "../lib/finetune.ts";

/** Runs the CLI and returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  let json = false;
  try {
    const args = parseFinetuneArgs(argv);
    if (args === "help") {
      console.log(finetuneUsage());
      return 0;
    }
    const { json: asJson, ...opts } = args;
    json = asJson;
    const summary = await finetune(opts);
    const mc = (summary.finetune as { mc?: { accuracy: number; total: number; chance: number } })
      ?.mc;
    if (mc && !json) {
      console.error(
        `multiple choice: accuracy ${(100 * mc.accuracy).toFixed(2)}% of ${mc.total} ` +
          `(chance ${(100 * mc.chance).toFixed(2)}%)`,
      );
    }
    if (json) console.log(JSON.stringify(summary));
    else if (summary.out !== null) console.log(`summary: ${summary.out}/summary.json`);
    return summary.interrupted ? 130 : 0;
  } catch (e) {
    return failureExit(e, json);
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
