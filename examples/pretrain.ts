/**
 * Pretrain a LLaMA-style model from the command line.
 *
 *     deno run -A examples/pretrain.ts                  # default CPU run, synthetic corpus
 *     deno run -A examples/pretrain.ts --help
 *     deno run -A examples/pretrain.ts --data book.txt --model llama-20m --steps 1000 --json
 *     deno run -A examples/pretrain.ts --resume runs/2026-12-02T17-00-00-000Z   # after a kill
 *
 * Checkpoints go to `<out>/checkpoints/` (`--save-every`, at the end, on Ctrl-C); `--resume DIR`
 * continues a run from its newest one.
 *
 * Exit codes: 0 done, 1 engine failure, 2 usage error or divergence, 130 interrupted (resumable).
 *
 * @module
 */

// First: a missing or stale engine library is one line, before the options open it.
import "../ffi/preflight.ts";
import { parsePretrainArgs, usage } from "../lib/cli.ts";
import { failureExit } from "../lib/cli_exit.ts";
import { train } from "../lib/trainer.ts";
import { world } from "../lib/dist.ts";

/** Runs the CLI and returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  let json = false;
  try {
    const args = parsePretrainArgs(argv);
    if (args === "help") {
      console.log(usage());
      return 0;
    }
    const { json: asJson, ...opts } = args;
    json = asJson;
    const summary = await train(opts);
    if (world().rank !== 0) return summary.interrupted ? 130 : 0; // rank 0 reports
    if (json) console.log(JSON.stringify(summary));
    else if (summary.out !== null) console.log(`summary: ${summary.out}/summary.json`);
    return summary.interrupted ? 130 : 0;
  } catch (e) {
    return failureExit(e, json);
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
