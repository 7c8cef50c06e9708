/**
 * Evaluation of a trained or fine-tuned model, as fine-tuning users report it:
 *
 * - perplexity on a text file (`--data FILE.txt`): the text is tokenized (with the
 *   tokenizer's special tokens), cut from its start into consecutive non-overlapping windows of
 *   N + 1 tokens (the last partial window dropped), and the mean cross-entropy of every
 *   window's N next-token predictions is reported with its exponential;
 * - perplexity on held-out fine-tuning data (`--data FILE.jsonl`: `text`, `prompt` +
 *   `completion` or `messages` lines, read as lib/finetune_data.ts reads training data): only
 *   the tokens that carry loss in training count (the completion, the assistant turns);
 * - multiple-choice accuracy in the MMLU format (`--mc FILE`: MMLU CSV or JSONL, see
 *   lib/mmlu.ts), zero-shot or k-shot (`--shots K --shots-file DEV`) with the prompts of MMLU's
 *   reference harness, each choice scored by the log-likelihood of its letter.
 *
 *     deno run -A examples/evaluate.ts --model runs/x/hf --data valid.txt --seq-len 256
 *     deno run -A examples/evaluate.ts --model ckpt.qgck --data valid.txt --seq-len 128 --json
 *     deno run -A examples/evaluate.ts --model out/hf --seq-len 1024 --batch-size 4 \
 *       --mc mmlu/data/test --shots 5 --shots-file mmlu/data/dev --data held_out.jsonl --json
 *     deno run -A examples/evaluate.ts --model BASE --adapter ADAPTER --mc test.csv --seq-len 512
 *
 * `--adapter DIR` evaluates a Hugging Face `--model` with a PEFT LoRA adapter folder applied
 * (lib/adapter.ts; `--adapter-base qlora` on the NF4 base a QLoRA adapter was trained on).
 *
 * `--json` prints one JSON object as the last stdout line: with `--data`, its `loss`, `ppl`,
 * `tokens` (and `windows` for text, `examples` for JSONL); with `--mc`, an `mc` object
 * (`accuracy`, `correct`, `total`, `chance`, `by_subject`, `predictions`, …). Exit codes:
 * 0 done, 1 engine failure, 2 usage error.
 *
 * @module
 */

// First: a missing or stale engine library is one line, before anything opens it.
import "../ffi/preflight.ts";
import { join } from "node:path";
import { EngineError } from "../ffi/engine.ts";
import { LoadError } from "../ffi/loader.ts";
import { ADAPTER_SCRIPT_FLAGS, ADAPTER_USAGE, adapterArgs } from "../lib/adapter.ts";
import { MODEL_SCRIPT_FLAGS, modelArgs, parseScriptArgs, type ScriptFlag } from "../lib/cli.ts";
import { UsageError } from "../lib/errors.ts";
import { evaluatePerplexity } from "../lib/evaluate.ts";
import { loadFinetuneData } from "../lib/finetune_data.ts";
import {
  loadMultipleChoice,
  type McItem,
  type McResult,
  perplexity,
  scoreMultipleChoice,
} from "../lib/mmlu.ts";
import { openModel } from "../lib/open_model.ts";

const FLAGS: Readonly<Record<string, ScriptFlag>> = {
  ...MODEL_SCRIPT_FLAGS,
  data: { type: "string" },
  mc: { type: "string" },
  shots: { type: "int", min: 0, max: 1000 },
  "shots-file": { type: "string" },
  "mc-score": { type: "choice", choices: ["letter", "text"] },
  "seq-len": { type: "int", min: 1, required: true },
  "batch-size": { type: "int", min: 1, max: 4096 },
  ...ADAPTER_SCRIPT_FLAGS,
  json: { type: "switch" },
};

/** Flags that may be given more than once (their values join with commas). */
const REPEATABLE = ["mc", "shots-file"];

const USAGE = `Perplexity and multiple-choice accuracy of a model.

Usage: deno run -A examples/evaluate.ts --model DIR|CKPT --seq-len N (--data FILE | --mc FILE) [flags]

  --model DIR|CKPT      Hugging Face model folder, a qgalore checkpoint, or a run folder
  --seq-len N           longest sequence scored: text windows of N+1 tokens, not overlapping;
                        fine-tuning examples and multiple-choice prompts of up to N+1 tokens
  --data FILE           perplexity on a text file (tokenized whole), or on held-out
                        fine-tuning data (.jsonl: text, prompt+completion or messages lines;
                        only the tokens that carry loss in training count)
  --mc FILE[,FILE]      multiple-choice accuracy on MMLU CSV files (question,A,B,C,D,answer;
                        no header) or JSONL (question, choices or A..D, answer); a folder
                        means its .csv and .jsonl files; repeatable
  --shots K             k-shot prompts: the first K questions of the same subject from
                        --shots-file, dropped one by one when a prompt is too long [0]
  --shots-file FILE     dev questions for the shots (same formats; folder; repeatable)
  --mc-score S          letter: log-likelihood of " A".." D" after "Answer:" (MMLU);
                        text: of the choice text, per character [letter]
  --batch-size N        sequences per engine batch [1]
${ADAPTER_USAGE}
  --tokenizer PATH      tokenizer.json or folder [the model's, else bytes]
  --device D            cpu, cuda or auto [cpu]
  --threads N           engine threads [one per core]
  --json                print one JSON object as the last stdout line
  -h, --help            show this help`;

/** `--mc a --mc b,c` → `--mc a,b,c`: the strict parser keeps only one value per flag. */
function joinRepeated(argv: string[]): string[] {
  const out: string[] = [];
  const joined = new Map<string, string[]>();
  for (let i = 0; i < argv.length; i++) {
    const m = /^--([a-z-]+)(?:=(.*))?$/s.exec(argv[i]);
    if (m && REPEATABLE.includes(m[1])) {
      const v = m[2] ?? argv[i + 1];
      if (v === undefined || (m[2] === undefined && v.startsWith("--"))) {
        out.push(argv[i]); // the parser names the missing value
        continue;
      }
      if (m[2] === undefined) i++;
      if (!joined.has(m[1])) joined.set(m[1], []);
      joined.get(m[1])!.push(v);
    } else out.push(argv[i]);
  }
  for (const [k, v] of joined) out.push(`--${k}=${v.join(",")}`);
  return out;
}

/** Files named by a repeatable flag: comma lists; a folder gives its .csv/.jsonl files, sorted. */
function mcFiles(flag: string, value: string): string[] {
  const files: string[] = [];
  for (const p of value.split(",").filter((x) => x !== "")) {
    let info: Deno.FileInfo;
    try {
      info = Deno.statSync(p);
    } catch (e) {
      throw new UsageError(
        `--${flag} ${p}: ${
          e instanceof Deno.errors.NotFound ? "file not found" : String(e).split("\n")[0]
        }`,
      );
    }
    if (!info.isDirectory) {
      files.push(p);
      continue;
    }
    const inDir = [...Deno.readDirSync(p)]
      .filter((e) => e.isFile && /\.(csv|jsonl)$/i.test(e.name))
      .map((e) => join(p, e.name))
      .sort();
    if (inDir.length === 0) throw new UsageError(`--${flag} ${p}: no .csv or .jsonl file in it`);
    files.push(...inDir);
  }
  return files;
}

async function loadItems(flag: string, value: string): Promise<McItem[]> {
  const items: McItem[] = [];
  for (const f of mcFiles(flag, value)) {
    try {
      items.push(...await loadMultipleChoice(f));
    } catch (e) {
      if (e instanceof UsageError) throw new UsageError(`--${flag} ${e.message}`);
      throw e;
    }
  }
  return items;
}

/** Runs the script and returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    const a = parseScriptArgs(joinRepeated(argv), FLAGS);
    if (a === "help") {
      console.log(USAGE);
      return 0;
    }
    const seqLen = a["seq-len"] as number;
    const batch = (a["batch-size"] as number | undefined) ?? 1;
    const data = a.data as string | undefined;
    const mc = a.mc as string | undefined;
    const shots = (a.shots as number | undefined) ?? 0;
    const shotsFile = a["shots-file"] as string | undefined;
    if (data === undefined && mc === undefined) {
      throw new UsageError("nothing to evaluate: give --data FILE and/or --mc FILE (see --help)");
    }
    if (mc === undefined) {
      for (const f of ["shots", "shots-file", "mc-score"]) {
        if (a[f] !== undefined) throw new UsageError(`--${f}: applies to --mc only`);
      }
    }
    if (shots > 0 && shotsFile === undefined) {
      throw new UsageError(`--shots ${shots}: needs --shots-file with dev questions`);
    }
    if (shotsFile !== undefined && shots === 0) {
      throw new UsageError("--shots-file: give --shots K (≥ 1) to use it");
    }
    const jsonl = data !== undefined && /\.jsonl$/i.test(data);
    const text = data !== undefined && !jsonl ? readText(data) : undefined;
    // files first, so a bad file is reported before the model loads
    const items = mc === undefined ? undefined : await loadItems("mc", mc);
    const dev = shotsFile === undefined ? undefined : await loadItems("shots-file", shotsFile);
    using m = await openModel({ ...modelArgs(a, seqLen), batchSize: batch, ...adapterArgs(a) });
    const out: Record<string, unknown> = {};
    const lines: string[] = [];
    if (text !== undefined) {
      const tokens = m.tokenizer.encode(text, { addSpecial: true });
      if (tokens.length < seqLen + 1) {
        throw new UsageError(
          `--data ${data}: ${tokens.length} tokens, fewer than one window of --seq-len ${seqLen} + 1`,
        );
      }
      const r = await evaluatePerplexity(m.engine, tokens, seqLen);
      Object.assign(out, r);
      lines.push(
        `${a.model}: loss ${r.loss.toFixed(4)} ppl ${r.ppl.toFixed(3)} over ${r.tokens} tokens ` +
          `(${r.windows} windows of ${seqLen + 1})`,
      );
    } else if (data !== undefined) {
      const d = await loadFinetuneData(data, m.tokenizer, {
        seqLen,
        ...(m.kind === "hf" ? { modelDir: a.model as string } : {}),
      });
      const r = await perplexity(m.engine, d, batch, seqLen);
      const c = d.counts;
      Object.assign(out, {
        loss: r.loss,
        ppl: r.perplexity,
        tokens: r.tokens,
        examples: c.examples,
        truncated: c.truncated,
        refused: c.refused,
      });
      lines.push(
        `${data}: loss ${r.loss.toFixed(4)} ppl ${r.perplexity.toFixed(3)} over ${r.tokens} ` +
          `loss tokens of ${c.examples} ${d.kind} examples` +
          (c.truncated + c.refused > 0 ? ` (${c.truncated} truncated, ${c.refused} refused)` : ""),
      );
    }
    if (items !== undefined) {
      const r = await scoreMultipleChoice(m.engine, m.tokenizer, items, {
        shots,
        ...(dev ? { dev } : {}),
        batch,
        seqLen,
        scoring: (a["mc-score"] as "letter" | "text" | undefined) ?? "letter",
      });
      out.mc = mcJson(r);
      lines.push(...mcLines(r));
    }
    if (a.json) console.log(JSON.stringify(out));
    else for (const l of lines) console.log(l);
    return 0;
  } catch (e) {
    return failure(e);
  }
}

/** The `mc` object of `--json` (snake_case keys, as the other scripts' JSON). */
function mcJson(r: McResult): Record<string, unknown> {
  return {
    accuracy: r.accuracy,
    correct: r.correct,
    total: r.total,
    chance: r.chance,
    scoring: r.scoring,
    shots: r.shots,
    shots_dropped: r.shotsDropped,
    truncated: r.truncated,
    by_subject: r.bySubject,
    predictions: r.predictions,
  };
}

function mcLines(r: McResult): string[] {
  const pct = (c: number, t: number) => `${(100 * c / t).toFixed(2)}%`;
  const subjects = Object.keys(r.bySubject).sort();
  const out = subjects.length > 1
    ? subjects.map((s) => {
      const b = r.bySubject[s];
      return `  ${s || "(no subject)"}: ${pct(b.correct, b.total)} (${b.correct}/${b.total})`;
    })
    : [];
  out.push(
    `multiple choice: accuracy ${pct(r.correct, r.total)} (${r.correct}/${r.total}), ` +
      `chance ${pct(r.chance, 1)}; ${r.shots}-shot, ${r.scoring} scoring` +
      (r.shotsDropped > 0 ? `, ${r.shotsDropped} shots dropped to fit` : "") +
      (r.truncated > 0 ? `, ${r.truncated} prompts cut to fit` : ""),
  );
  return out;
}

/**
 * The evaluation text: a regular UTF-8 file. Corpora in other forms (JSON, gzip, folders)
 * are training data; scoring their bytes as text would measure the wrong thing (a `.jsonl`
 * is read as fine-tuning data instead).
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
  if (/\.(json|gz)$/i.test(path)) {
    bad(
      "evaluate scores a plain text file or fine-tuning .jsonl; extract the text of a JSON or " +
        "gzip'd corpus first",
    );
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
