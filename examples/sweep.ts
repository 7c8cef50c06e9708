/**
 * Hyper-parameter sweeps from the command line: grid or random search over any pretraining
 * option, each run the pretraining CLI in a subprocess with its own folder.
 *
 *     deno run -A examples/sweep.ts --out sweeps/lr --grid lr=1e-3,3e-3 \
 *       --grid optimizer=adamw,qgalore --steps 200 --model llama-9m
 *     deno run -A examples/sweep.ts --out sweeps/lr ...   # the same command resumes it
 *
 * Exit codes: 0 done (diverged and failed runs are results, listed in the table), 2 usage
 * error, 130 interrupted (run the same command to resume).
 *
 * @module
 */

// First: a missing or stale engine library is one line, before the options open it.
import "../ffi/preflight.ts";
import { parseArgs } from "node:util";
import { EngineError } from "../ffi/engine.ts";
import { LoadError } from "../ffi/loader.ts";
import { UsageError } from "../lib/errors.ts";
import { FLAG } from "../lib/option_table.ts";
import { METRICS, sweep, type SweepOptions } from "../lib/sweep.ts";

/** The `--help` text. */
export function sweepUsage(): string {
  return [
    "Run a hyper-parameter sweep of pretraining runs.",
    "",
    "Usage: deno run -A examples/sweep.ts --out DIR --grid KEY=V1,V2 [--grid ...] [flags]",
    "",
    "  --out DIR             the sweep folder; the same command on it resumes the sweep",
    "  --grid KEY=V1,V2,...  values to try for a pretraining option (repeatable; KEY is a",
    "                        flag name without --, e.g. lr, optimizer, model, seed, rank)",
    "  --random N            run N combinations of the grid drawn at random (default: all)",
    "  --sample-seed S       seed of that draw [0] (--seed is the pretraining seed)",
    "  --workers N           runs at the same time [1]; each gets floor(cores/N) threads",
    `  --metric M            sort the table by M [val_loss]: ${METRICS.join(", ")}`,
    "  -h, --help            show this help",
    "",
    "Any other pretraining flag (see examples/pretrain.ts --help) is a fixed value for every",
    "run, except --out, --resume, --overwrite and --export. Files in DIR: results.jsonl (one",
    "line per finished run), started.jsonl, runs/<id>/ (each run's folder and report.html),",
    "logs/<id>.log, and at the end table.txt, charts/*.svg, sweep.html. Another grid on an",
    "existing sweep folder is an error: choose another --out. Ctrl-C stops every run (each",
    "saves a checkpoint); the same command resumes. A diverged run is a result.",
  ].join("\n");
}

const PRETRAIN_FLAGS = Object.values(FLAG).filter((f) => f.startsWith("--")).map((f) => f.slice(2));

function oneLine(e: unknown): UsageError {
  const m = e instanceof Error ? e.message : String(e);
  const code = (e as { code?: string }).code;
  const quoted = /'([^']*)'/.exec(m)?.[1]?.split(" ")[0];
  if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" && quoted) {
    return new UsageError(`${quoted}: unknown flag; see --help for the list`);
  }
  if (code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL" && quoted) {
    return new UsageError(`${quoted}: unexpected argument; flags take the form --name value`);
  }
  if (code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE" && quoted) {
    return new UsageError(
      `${quoted}: missing value (write ${quoted}=VALUE for one starting with -)`,
    );
  }
  return new UsageError(m.split("\n")[0]);
}

function int(flag: string, raw: string | undefined, min: number): number | undefined {
  if (raw === undefined) return undefined;
  const v = raw.trim() === "" ? NaN : Number(raw);
  if (!Number.isInteger(v) || v < min) {
    throw new UsageError(`--${flag} ${raw || '""'}: must be an integer ≥ ${min}`);
  }
  return v;
}

/** Parses the sweep's command line; "help" for `--help`. Bad flags: one-line UsageError. */
export function parseSweepArgs(argv: string[]): SweepOptions | "help" {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        ...Object.fromEntries(PRETRAIN_FLAGS.map((f) => [f, { type: "string" as const }])),
        grid: { type: "string", multiple: true },
        random: { type: "string" },
        "sample-seed": { type: "string" },
        workers: { type: "string" },
        metric: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    throw oneLine(e);
  }
  const v = parsed.values as Record<string, string | string[] | boolean | undefined>;
  if (v.help) return "help";
  const out = v.out as string | undefined;
  if (out === undefined) throw new UsageError("--out: required (the sweep folder; see --help)");
  const grid: Record<string, string[]> = {};
  for (const g of (v.grid as string[] | undefined) ?? []) {
    const at = g.indexOf("=");
    if (at <= 0) throw new UsageError(`--grid ${g || '""'}: write --grid KEY=V1,V2,...`);
    const key = g.slice(0, at);
    if (key in grid) throw new UsageError(`--grid ${key}: given twice; list its values once`);
    grid[key] = g.slice(at + 1).split(",").map((s) => s.trim());
    if (grid[key].some((s) => s === "")) {
      throw new UsageError(`--grid ${g}: an empty value; write --grid ${key}=V1,V2,...`);
    }
  }
  const fixed: Record<string, string> = {};
  for (const f of PRETRAIN_FLAGS) {
    if (f === "out") continue;
    const raw = v[f];
    if (typeof raw === "string") fixed[f] = raw;
  }
  return {
    out,
    grid,
    fixed,
    random: int("random", v.random as string | undefined, 1) ?? null,
    sampleSeed: int("sample-seed", v["sample-seed"] as string | undefined, 0),
    workers: int("workers", v.workers as string | undefined, 1),
    metric: v.metric as string | undefined,
  };
}

/** Runs the CLI and returns the process exit code. */
export async function main(argv: string[]): Promise<number> {
  const stop = new AbortController();
  const onSignal = () => stop.abort();
  try {
    const opts = parseSweepArgs(argv);
    if (opts === "help") {
      console.log(sweepUsage());
      return 0;
    }
    for (const sig of ["SIGINT", "SIGTERM"] as const) {
      try {
        Deno.addSignalListener(sig, onSignal);
      } catch { /* unsupported platform: Ctrl-C ends the process */ }
    }
    const r = await sweep({ ...opts, signal: stop.signal });
    console.log(r.table);
    if (r.interrupted) {
      console.error(
        `interrupted: ${r.total - r.pending} of ${r.total} runs have a result; run the same ` +
          "command to resume",
      );
      return 130;
    }
    console.error(`sweep done: ${r.files.join(", ")}`);
    return 0;
  } catch (e) {
    if (e instanceof UsageError) return fail(e.message, 2);
    if (e instanceof EngineError || e instanceof LoadError) return fail(e.message, 1);
    if (e instanceof Deno.errors.NotCapable) {
      return fail(`${e.message.split("\n")[0]}; run with deno run -A`, 2);
    }
    throw e;
  } finally {
    for (const sig of ["SIGINT", "SIGTERM"] as const) {
      try {
        Deno.removeSignalListener(sig, onSignal);
      } catch { /* never added */ }
    }
  }
}

function fail(message: string, code: number): number {
  console.error(`error: ${message.replace(/\s*\n\s*/g, " ")}`);
  return code;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
