/**
 * How the training CLIs (`examples/pretrain.ts`, `examples/finetune.ts`) end on an error: one
 * line on stderr and an exit code, never a stack trace for what the user can fix.
 *
 * @module
 */

import { EngineError } from "../ffi/engine.ts";
import { LoadError } from "../ffi/loader.ts";
import { UsageError } from "./errors.ts";
import { DivergedError } from "./summary.ts";

/**
 * Prints `e` as one `error: …` line and returns the exit code: 2 for a usage error or a
 * divergence (whose partial summary goes to stdout first with `json`, so sweeps still get the
 * run's numbers), 1 for an engine or library failure; anything else is a bug and is rethrown.
 */
export function failureExit(e: unknown, json: boolean): number {
  if (e instanceof DivergedError && json) console.log(JSON.stringify(e.summary));
  if (e instanceof UsageError) return fail(e.message, 2);
  if (e instanceof EngineError || e instanceof LoadError) return fail(e.message, 1);
  if (e instanceof Deno.errors.NotCapable) {
    return fail(`${e.message.split("\n")[0]}; run with deno run -A`, 2);
  }
  throw e;
}

function fail(message: string, code: number): number {
  console.error(`error: ${message.replace(/\s*\n\s*/g, " ")}`);
  return code;
}
