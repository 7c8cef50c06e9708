/**
 * Imported first by command-line scripts whose other imports open the engine while they load
 * (the option table takes its rules from the engine): a missing or stale library becomes one
 * `error:` line and exit status 1 instead of an uncaught error with a stack trace. Only CLI
 * entry points import it; a notebook or a test imports `mod.ts` and gets a LoadError.
 * @module
 */

import { LoadError, loadLibrary } from "./loader.ts";

try {
  loadLibrary();
} catch (e) {
  if (!(e instanceof LoadError)) throw e;
  console.error(`error: ${e.message.replace(/\s*\n\s*/g, " ")}`);
  Deno.exit(1);
}
