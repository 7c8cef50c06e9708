/**
 * Perplexity of a trained model on a text, as standard perplexity evaluations compute it: the
 * text is tokenized (with the tokenizer's special tokens), cut from its start into consecutive
 * non-overlapping windows of N + 1 tokens (the last partial window dropped), and the mean
 * cross-entropy of every window's N next-token predictions is reported with its exponential.
 *
 *     deno run -A examples/evaluate.ts --model runs/x/hf --data valid.txt --seq-len 256
 *     deno run -A examples/evaluate.ts --model ckpt.qgck --data valid.txt --seq-len 128 --json
 *
 * `--json` prints `{"loss", "ppl", "tokens", "windows"}` as the last stdout line. Exit codes:
 * 0 done, 1 engine failure, 2 usage error.
 *
 * @module
 */

// First: a missing or stale engine library is one line, before anything opens it.
import "../ffi/preflight.ts";
import { EngineError } from "../ffi/engine.ts";
import { LoadError } from "../ffi/loader.ts";
import { MODEL_SCRIPT_FLAGS, modelArgs, parseScriptArgs, type ScriptFlag } from "../lib/cli.ts";
import { UsageError } from "../lib/errors.ts";
import { evaluatePerplexity } from "../lib/evaluate.ts";
import { openModel } from "../lib/open_model.ts";

const FLAGS: Readonly<Record<string, ScriptFlag>> = {
  ...MODEL_SCRIPT_FLAGS,
  data: { type: "string", required: true },
  "seq-len": { type: "int", min: 1, required: true },
  json: { type: "switch" },
};

const USAGE = `Perplexity of a model on a text file.

Usage: deno run -A examples/evaluate.ts --model DIR|CKPT --data FILE --seq-len N [flags]

  --model DIR|CKPT      Hugging Face model folder, a qgalore checkpoint, or a run folder
  --data FILE           text file, tokenized whole with the model's tokenizer
  --seq-len N           predictions per window; windows of N+1 tokens, not overlapping
  --tokenizer PATH      tokenizer.json or folder [the model's, else bytes]
  --device D            cpu, cuda or auto [cpu]
  --threads N           engine threads [one per core]
  --json                print {"loss","ppl","tokens","windows"} as the last stdout line
  -h, --help            show this help`;

/** Runs the script and returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    const a = parseScriptArgs(argv, FLAGS);
    if (a === "help") {
      console.log(USAGE);
      return 0;
    }
    const seqLen = a["seq-len"] as number;
    const path = a.data as string;
    const text = readText(path);
    using m = await openModel(modelArgs(a, seqLen));
    const tokens = m.tokenizer.encode(text, { addSpecial: true });
    if (tokens.length < seqLen + 1) {
      throw new UsageError(
        `--data ${path}: ${tokens.length} tokens, fewer than one window of --seq-len ${seqLen} + 1`,
      );
    }
    const r = await evaluatePerplexity(m.engine, tokens, seqLen);
    if (a.json) console.log(JSON.stringify(r));
    else {
      console.log(
        `${a.model}: loss ${r.loss.toFixed(4)} ppl ${r.ppl.toFixed(3)} over ${r.tokens} tokens ` +
          `(${r.windows} windows of ${seqLen + 1})`,
      );
    }
    return 0;
  } catch (e) {
    return failure(e);
  }
}

/**
 * The evaluation text: a regular UTF-8 file. Corpora in other forms (JSONL, gzip, folders)
 * are training data; scoring their bytes as text would measure the wrong thing.
 */
function readText(path: string): string {
  const bad = (why: string): never => {
    throw new UsageError(`--data ${path}: ${why}`);
  };
  let info: Deno.FileInfo | undefined;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    bad(e instanceof Deno.errors.NotFound ? "file not found" : String(e).split("\n")[0]);
  }
  if (!info!.isFile) bad("not a regular file; give a text file");
  if (/\.(jsonl|json|gz)$/i.test(path)) {
    bad("evaluate scores a plain text file; extract the text of a JSONL or gzip'd corpus first");
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(Deno.readFileSync(path));
  } catch (e) {
    if (e instanceof TypeError) bad("not UTF-8 text");
    throw e;
  }
}

/** Exit code and one `error:` line for an error the scripts expect. */
export function failure(e: unknown): number {
  const line = (m: string) => console.error(`error: ${m.replace(/\s*\n\s*/g, " ")}`);
  if (e instanceof UsageError) return (line(e.message), 2);
  if (e instanceof EngineError || e instanceof LoadError) return (line(e.message), 1);
  if (e instanceof Deno.errors.NotCapable) {
    return (line(`${e.message.split("\n")[0]}; run with deno run -A`), 2);
  }
  throw e;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
