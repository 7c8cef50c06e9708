/**
 * Hyper-parameter sweeps: grid or random search over any pretraining option, each run the
 * pretraining CLI (`examples/pretrain.ts`) in a subprocess of its own folder, with ledgers that
 * let the same command on the same folder resume a stopped or killed sweep.
 *
 * The sweep folder `DIR`:
 * - `sweep.json`: what the sweep is (grid, fixed flags, random sample) and its run ids. The same
 *   command on `DIR` resumes; another grid, other fixed flags or another sample on an existing
 *   sweep folder is a one-line error (no file of an earlier sweep is ever replaced or deleted:
 *   choose another `--out`). `--metric` and `--workers` may change between invocations.
 * - `started.jsonl`: one line each time a run is launched (fresh, resumed or restarted).
 * - `results.jsonl`: one line per finished run: its id, status (`done`, `diverged`, `failed`),
 *   swept values, all flags, the chosen metric and the run's summary.
 * - `runs/<id>/`: the run's own folder (metrics.jsonl, summary.json, checkpoints/, report.html);
 *   `logs/<id>.log`: its progress output.
 * - at the end: `table.txt`, `charts/*.svg`, `sweep.html`.
 *
 * Resuming: runs with a `done` or `diverged` result are skipped; a `failed` run is tried again;
 * a run that was stopped continues from its checkpoint (`--resume`, which reproduces the
 * uninterrupted run's losses), and one stopped before its first checkpoint starts over.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { parsePretrainArgs } from "./cli.ts";
import { UsageError } from "./errors.ts";
import { exists } from "./fs.ts";
import { listCheckpoints } from "./checkpoints.ts";
import { FLAG, type TrainOptions } from "./option_table.ts";
import { Rng } from "./rng.ts";
import { lockRun } from "./run_files.ts";
import { inKernel } from "./jupyter.ts";
import {
  escapeHtml,
  htmlPage,
  readRun,
  renderSvg,
  thin,
  type VegaLiteSpec,
  writeFileAtomic,
  writeRunReport,
} from "./report.ts";
import type { Summary } from "./summary.ts";

/** A value of a swept or fixed option, as given on a command line (`on`/`off` for switches). */
export type SweepValue = string | number | boolean;

/** Options of {@link sweep}. */
export interface SweepOptions {
  /** The sweep folder (created; an existing one must be this sweep's, to resume it). */
  out: string;
  /**
   * Option → values to try: flag names (`lr`, `update-gap`) or option keys (`updateGap`); every
   * pretraining option except `out`, `resume`, `overwrite` and `export`.
   */
  grid: Readonly<Record<string, readonly SweepValue[]>>;
  /** Options every run takes (as pretraining flags take them). */
  fixed?: Readonly<Record<string, SweepValue>>;
  /** Run only this many combinations of the grid, drawn at random (all when null or more). */
  random?: number | null;
  /** Seed of the random draw (default 0). */
  sampleSeed?: number;
  /** Runs at the same time (default 1); each gets floor(cores / workers) engine threads. */
  workers?: number;
  /** Summary field the table is sorted by ({@link METRICS}; default `val_loss`). */
  metric?: string;
  /** Aborting it stops the sweep: running runs get SIGTERM, save a checkpoint and stop. */
  signal?: AbortSignal;
  /** Progress lines (default: stderr; in a Jupyter kernel, the cell's output). */
  log?: (line: string) => void;
  /** Processor cores to split among the workers (default: all of this machine's). */
  cores?: number;
}

/** Summary fields a sweep can be sorted by; higher is better only for `tokens_per_s`. */
export const METRICS: readonly string[] = Object.freeze([
  "val_loss",
  "val_ppl",
  "val_loss_ref",
  "val_ppl_ref",
  "final_train_loss",
  "tokens_per_s",
  "wall_s",
  "memory.total",
  "memory.peak_rss",
]);

const HIGHER_IS_BETTER = new Set(["tokens_per_s"]);

/** How a run ended. */
export type RunStatus = "done" | "diverged" | "failed";

/** One line of `results.jsonl`. */
export interface SweepResult {
  /** The run's id (its folder under `runs/`). */
  id: string;
  /** How it ended. */
  status: RunStatus;
  /** The swept options' values (flag name → value as given). */
  swept: Record<string, string>;
  /** Every flag given to the run (fixed and swept), flag name → value. */
  flags: Record<string, string>;
  /** The run's summary (null when it failed before writing one). */
  summary: Summary | null;
  /** The one-line reason of a divergence or failure. */
  error: string | null;
  /** When the result was recorded (ISO 8601). */
  finished_at: string;
}

/** What {@link sweep} did. */
export interface SweepOutcome {
  /** Results of this sweep's finished runs, best first by `metric` (others last). */
  results: SweepResult[];
  /** The metric sorted by. */
  metric: string;
  /** The swept flag names. */
  swept: string[];
  /** Runs of the sweep. */
  total: number;
  /** Runs without a result (an interrupted sweep). */
  pending: number;
  /** Stopped by the signal before every run finished. */
  interrupted: boolean;
  /** The table, as printed. */
  table: string;
  /** The files written at the end (table, charts, sweep.html); empty when interrupted. */
  files: string[];
}

/** One run of a sweep, before it runs. */
export interface PlannedRun {
  /** Its id: a slug of the swept values and a hash of its options (its folder's name). */
  id: string;
  /** The swept options' values, flag name → value. */
  swept: Record<string, string>;
  /** Every flag it is given (fixed and swept). */
  flags: Record<string, string>;
}

/** Flag name (without `--`) → option key, for the options a value can be given to. */
const FLAG_KEYS: ReadonlyMap<string, keyof TrainOptions> = new Map(
  (Object.entries(FLAG) as [keyof TrainOptions, string][])
    .filter(([, f]) => f.startsWith("--"))
    .map(([k, f]) => [f.slice(2), k]),
);

const RESERVED: Readonly<Record<string, string>> = {
  out: "set by the sweep (each run gets DIR/runs/<id>)",
  resume: "set by the sweep when it resumes a run",
  overwrite: "set by the sweep (it restarts its own runs only)",
  export: "every run would write the same folder",
};

/** Options that never change what a run computes: left out of its id. */
const NOT_IN_ID = new Set(["threads", "log-every", "quiet", "save-every", "keep"]);

/** The flag name of an option given by flag name or option key; one-line error otherwise. */
export function sweepFlag(key: string, what: string): string {
  const name = key.replace(/^--/, "");
  const flag = FLAG_KEYS.has(name)
    ? name
    : (FLAG as Record<string, string>)[name]?.startsWith("--")
    ? (FLAG as Record<string, string>)[name].slice(2)
    : null;
  if (flag === null) {
    throw new UsageError(
      `${what} ${key}: not a pretraining option; see deno run -A examples/pretrain.ts --help`,
    );
  }
  if (flag in RESERVED) throw new UsageError(`${what} ${key}: ${RESERVED[flag]}`);
  return flag;
}

function text(v: SweepValue): string {
  return typeof v === "boolean" ? (v ? "on" : "off") : String(v);
}

/** The runs of a grid: every combination, keys in the given order, values in the given order. */
function combinations(grid: [string, string[]][]): Record<string, string>[] {
  let out: Record<string, string>[] = [{}];
  for (const [k, vs] of grid) out = out.flatMap((c) => vs.map((v) => ({ ...c, [k]: v })));
  return out;
}

/** `n` of `xs` drawn without replacement (a partial Fisher–Yates shuffle), in draw order. */
function sample<T>(xs: readonly T[], n: number, seed: number): T[] {
  const a = [...xs];
  const rng = new Rng(seed);
  const k = Math.min(n, a.length);
  for (let i = 0; i < k; i++) {
    const j = i + rng.int(a.length - i);
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a.slice(0, k);
}

/** A folder-name-safe slug of the swept values plus a hash of every option that matters. */
function runId(swept: Record<string, string>, canonical: string): string {
  const slug = Object.entries(swept).map(([k, v]) => `${k}-${v}`).join("_")
    .replace(/[^A-Za-z0-9._=-]+/g, "-").slice(0, 80);
  const hash = createHash("sha256").update(canonical).digest("hex").slice(0, 8);
  return slug === "" ? hash : `${slug}_${hash}`;
}

/** The argv of a run's flags, in flag-name order. */
function argv(flags: Record<string, string>): string[] {
  return Object.keys(flags).sort().flatMap((f) => [`--${f}=${flags[f]}`]);
}

/**
 * Checks the sweep's options and plans its runs: every run's flags are parsed and checked as
 * the pretraining CLI checks them, so a bad value fails the sweep before anything runs.
 */
export function planSweep(opts: SweepOptions): {
  runs: PlannedRun[];
  identity: Record<string, unknown>;
  swept: string[];
} {
  const grid: [string, string[]][] = [];
  for (const [key, values] of Object.entries(opts.grid)) {
    const flag = sweepFlag(key, "--grid");
    if (grid.some(([f]) => f === flag)) throw new UsageError(`--grid ${key}: given twice`);
    if (!Array.isArray(values) || values.length === 0) {
      throw new UsageError(`--grid ${key}: no values; write --grid ${flag}=v1,v2`);
    }
    const vs = values.map(text);
    const dup = vs.find((v, i) => vs.indexOf(v) !== i);
    if (dup !== undefined) throw new UsageError(`--grid ${flag}: value ${dup} given twice`);
    if (vs.some((v) => v === "")) throw new UsageError(`--grid ${flag}: empty value`);
    grid.push([flag, vs]);
  }
  if (grid.length === 0) {
    throw new UsageError("--grid: nothing to sweep; give --grid key=v1,v2 at least once");
  }
  const fixed: Record<string, string> = {};
  for (const [key, value] of Object.entries(opts.fixed ?? {})) {
    const flag = sweepFlag(key, `--${key}`);
    if (grid.some(([f]) => f === flag)) {
      throw new UsageError(`--${flag}: both fixed and swept (--grid ${flag}=…); give one`);
    }
    fixed[flag] = text(value);
  }
  const random = opts.random ?? null;
  if (random !== null && !(Number.isInteger(random) && random >= 1)) {
    throw new UsageError(`--random ${random}: must be an integer ≥ 1`);
  }
  const sampleSeed = opts.sampleSeed ?? 0;
  if (!Number.isInteger(sampleSeed) || sampleSeed < 0) {
    throw new UsageError(`--sample-seed ${sampleSeed}: must be an integer ≥ 0`);
  }
  let combos = combinations(grid);
  if (random !== null) combos = sample(combos, random, sampleSeed);
  const runs: PlannedRun[] = [];
  const ids = new Set<string>();
  for (const swept of combos) {
    const flags = { ...fixed, ...swept };
    let parsed: Record<string, unknown>;
    try {
      const p = parsePretrainArgs([...argv(flags), "--out", join(opts.out, "runs", "x")]);
      if (p === "help" || "resume" in p && typeof p.resume === "string") throw new Error();
      parsed = p as unknown as Record<string, unknown>;
    } catch (e) {
      if (!(e instanceof UsageError)) throw e;
      const at = Object.entries(swept).map(([k, v]) => `${k}=${v}`).join(" ");
      throw new UsageError(`${e.message} (in the run ${at})`);
    }
    // the parsed values, so `--lr 1e-3` and `--lr 0.001` are one run
    const canonical = JSON.stringify(
      Object.keys(flags).filter((f) => !NOT_IN_ID.has(f)).sort()
        .map((f) => [f, parsed[FLAG_KEYS.get(f)!] ?? flags[f]]),
    );
    const id = runId(swept, canonical);
    if (ids.has(id)) continue;
    ids.add(id);
    runs.push({ id, swept, flags });
  }
  const identity = {
    grid: Object.fromEntries(grid),
    fixed,
    random,
    sample_seed: random === null ? null : sampleSeed,
  };
  return { runs, identity, swept: grid.map(([f]) => f) };
}

/** Reads a JSONL file's objects; a torn or damaged line (a killed writer) is skipped. */
function readJsonl<T>(path: string): T[] {
  let t = "";
  try {
    t = Deno.readTextFileSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return [];
    throw e;
  }
  const out: T[] = [];
  for (const line of t.split("\n")) {
    if (line.trim() === "") continue;
    try {
      const r = JSON.parse(line);
      if (typeof r === "object" && r !== null && !Array.isArray(r)) out.push(r as T);
    } catch { /* torn */ }
  }
  return out;
}

/** Appends one JSON line, first ending a torn last line so the new one stays whole. */
function appendJsonl(path: string, record: unknown): void {
  let prefix = "";
  try {
    const t = Deno.readTextFileSync(path);
    if (t !== "" && !t.endsWith("\n")) prefix = "\n";
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  using f = Deno.openSync(path, { append: true, create: true });
  const bytes = new TextEncoder().encode(prefix + JSON.stringify(record) + "\n");
  let done = 0;
  while (done < bytes.length) done += f.writeSync(bytes.subarray(done));
  f.syncSync();
}

/** The metric of a summary (`memory.total`: a dotted path), or null when not finite. */
export function metricOf(summary: Summary | null, metric: string): number | null {
  let v: unknown = summary;
  for (const part of metric.split(".")) {
    v = typeof v === "object" && v !== null ? (v as Record<string, unknown>)[part] : undefined;
  }
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

/** Results best first by `metric`; diverged and failed runs (and those without it) last, by id. */
export function sortResults(results: readonly SweepResult[], metric: string): SweepResult[] {
  const sign = HIGHER_IS_BETTER.has(metric) ? -1 : 1;
  // a diverged run's last numbers say little: finished runs rank first
  const value = (r: SweepResult) => r.status === "done" ? metricOf(r.summary, metric) : null;
  return [...results].sort((a, b) => {
    const x = value(a);
    const y = value(b);
    if (x !== null && y !== null && x !== y) return sign * (x - y);
    if (x === null && y !== null) return 1;
    if (y === null && x !== null) return -1;
    return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
  });
}

function num(x: number | null): string {
  if (x === null) return "–";
  if (Number.isInteger(x)) return String(x);
  return Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3 ? x.toExponential(3) : x.toPrecision(5);
}

/** The table's rows: a header, then one row per result in the given order. */
function tableRows(results: readonly SweepResult[], swept: string[], metric: string): string[][] {
  const extra = metric === "val_loss" ? [] : ["val_loss"];
  const head = ["#", ...swept, "status", metric, ...extra, "steps", "wall_s", "id"];
  const rows = results.map((r, i) => [
    String(i + 1),
    ...swept.map((k) => r.swept[k] ?? ""),
    r.status,
    num(metricOf(r.summary, metric)),
    ...extra.map((m) => num(metricOf(r.summary, m))),
    r.summary ? `${r.summary.steps}/${r.summary.steps_planned}` : "–",
    r.summary && Number.isFinite(r.summary.wall_s) ? r.summary.wall_s.toFixed(1) : "–",
    r.id,
  ]);
  return [head, ...rows];
}

/** The results as an aligned text table. */
export function formatTable(
  results: readonly SweepResult[],
  swept: string[],
  metric: string,
): string {
  const rows = tableRows(results, swept, metric);
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c])).join("  ").trimEnd())
    .join("\n");
}

/** Whether every value is a number (then a swept option is plotted on a numeric axis). */
function numeric(values: readonly string[]): boolean {
  return values.every((v) => v.trim() !== "" && Number.isFinite(Number(v)));
}

/**
 * The metric of each finished run against one swept option: a numeric axis (log when the
 * values span 10× or more and are positive) for numbers, a band per value otherwise.
 */
export function metricVsParamSpec(
  results: readonly SweepResult[],
  param: string,
  metric: string,
): VegaLiteSpec {
  const points = results.flatMap((r) => {
    const m = metricOf(r.summary, metric);
    const v = r.swept[param];
    return m === null || v === undefined ? [] : [{ value: v, metric: m, id: r.id }];
  });
  const isNum = numeric(points.map((p) => p.value));
  const nums = points.map((p) => Number(p.value));
  const log = isNum && nums.length > 0 && nums.every((x) => x > 0) &&
    Math.max(...nums) / Math.min(...nums) >= 10;
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: `${metric} by ${param}`,
    width: 420,
    height: 240,
    data: {
      values: points.map((p) => ({ ...p, value: isNum ? Number(p.value) : p.value })),
    },
    mark: { type: "point", filled: true, size: 60 },
    encoding: {
      x: {
        field: "value",
        type: isNum ? "quantitative" : "nominal",
        title: param,
        ...(log ? { scale: { type: "log" } } : isNum ? { scale: { zero: false } } : {}),
      },
      y: { field: "metric", type: "quantitative", title: metric, scale: { zero: false } },
    },
  };
}

/** Training-loss curves of several runs (one colour each), thinned to ≤ 2000 points a run. */
export function lossCurvesSpec(
  curves: readonly { id: string; steps: readonly { step: number; loss: number }[] }[],
  title = "Training loss of the best runs",
): VegaLiteSpec {
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title,
    width: 560,
    height: 260,
    data: {
      values: curves.flatMap((c) =>
        thin(c.steps.filter((s) => Number.isFinite(s.loss))).map((s) => ({
          run: c.id,
          step: s.step,
          loss: s.loss,
        }))
      ),
    },
    mark: "line",
    encoding: {
      x: { field: "step", type: "quantitative", title: "step" },
      y: { field: "loss", type: "quantitative", title: "loss", scale: { zero: false } },
      color: { field: "run", type: "nominal", title: "run", sort: null },
    },
  };
}

/** How many of the best runs the loss-curve chart shows. */
export const BEST_CURVES = 5;

/** Writes table.txt, charts/*.svg and sweep.html; returns their paths. */
async function writeSweepFiles(
  out: string,
  results: SweepResult[],
  swept: string[],
  metric: string,
  table: string,
): Promise<string[]> {
  const files: string[] = [];
  const tablePath = join(out, "table.txt");
  writeFileAtomic(tablePath, table + "\n");
  files.push(tablePath);
  Deno.mkdirSync(join(out, "charts"), { recursive: true });
  const charts: { name: string; file: string; svg: string }[] = [];
  for (const p of swept) {
    const svg = await renderSvg(metricVsParamSpec(results, p, metric));
    charts.push({ name: `${metric} by ${p}`, file: `${metric}-by-${p}.svg`, svg });
  }
  const best = results.filter((r) => r.status === "done").slice(0, BEST_CURVES);
  if (best.length > 0) {
    const curves = best.map((r) => ({
      id: r.id,
      steps: readRun(join(out, "runs", r.id)).steps,
    }));
    charts.push({
      name: "loss curves",
      file: "loss-best.svg",
      svg: await renderSvg(lossCurvesSpec(curves)),
    });
  }
  for (const c of charts) {
    const path = join(out, "charts", c.file.replace(/[^A-Za-z0-9._-]+/g, "-"));
    writeFileAtomic(path, c.svg);
    files.push(path);
  }
  const rows = tableRows(results, swept, metric);
  const html = htmlPage(
    `qgalore sweep ${out}`,
    `<p>${results.length} runs, sorted by ${escapeHtml(metric)} (${
      HIGHER_IS_BETTER.has(metric) ? "highest" : "lowest"
    } first).</p>\n<table>\n<tr>${rows[0].map((h) => `<th>${escapeHtml(h)}</th>`).join("")}</tr>\n${
      rows.slice(1).map((r, i) => {
        const id = results[i].id;
        // the run's own report, next to it in the sweep folder
        const link = exists(join(out, "runs", id, "report.html"))
          ? `<a href="runs/${encodeURIComponent(id)}/report.html">${escapeHtml(id)}</a>`
          : escapeHtml(id);
        return `<tr>${r.slice(0, -1).map((c) => `<td>${escapeHtml(c)}</td>`).join("")}` +
          `<td>${link}</td></tr>`;
      }).join("\n")
    }\n</table>\n` +
      charts.map((c) => `<div class="chart">${c.svg}</div>`).join("\n"),
  );
  const htmlPath = join(out, "sweep.html");
  writeFileAtomic(htmlPath, html);
  files.push(htmlPath);
  return files;
}

/**
 * The pretraining CLI of this copy of the package: a path in a checkout, the package's
 * `./pretrain` entry point when loaded from JSR (`jsr:@scope/name@version/pretrain`: a file
 * fetched from jsr.io by URL would lack the package's import map), else its URL.
 */
export function pretrainScript(base: string = import.meta.url): string {
  const url = new URL("../examples/pretrain.ts", base);
  if (url.protocol === "file:") return fileURLToPath(url);
  const jsr = /^https:\/\/jsr\.io\/(@[^/]+\/[^/]+)\/([^/]+)\//.exec(url.href);
  return jsr ? `jsr:${jsr[1]}@${jsr[2]}/pretrain` : url.href;
}

/**
 * The process still running the run in `dir` (its `.lock`, as lib/run_files.ts writes it: pid
 * and start time), or null. A sweep killed outright leaves its runs going; the next one waits.
 */
function lockHolder(dir: string): number | null {
  try {
    const [pid, started] = Deno.readTextFileSync(join(dir, ".lock")).trim().split(" ");
    if (!/^\d+$/.test(pid ?? "") || Number(pid) === Deno.pid) return null;
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const now = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
    return started === "?" || now === started ? Number(pid) : null;
  } catch {
    return null; // no lock, or no such process (or no /proc: the run's own lock decides)
  }
}

function readSummary(dir: string): Summary | null {
  try {
    return JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
  } catch {
    return null;
  }
}

const decoder = new TextDecoder();

/** Reads a stream to its end, passing each chunk on. */
async function drain(
  stream: ReadableStream<Uint8Array>,
  chunk: (bytes: Uint8Array) => void,
): Promise<void> {
  for await (const b of stream) chunk(b);
}

/**
 * Runs a sweep (see the module doc): plans and checks every run, resumes what an earlier
 * invocation on `out` left, runs the rest `workers` at a time, and at the end writes the table,
 * the charts and `sweep.html`. Bad options throw UsageError (one line); a diverged or failed run
 * is a result, not an exception. Aborting `signal` stops it cleanly (`interrupted: true`).
 */
export async function sweep(opts: SweepOptions): Promise<SweepOutcome> {
  // a notebook shows stdout; its stderr reads as an error (CI fails a notebook on it)
  const log = opts.log ??
    (inKernel() ? (l: string) => console.log(l) : (l: string) => console.error(l));
  const metric = opts.metric ?? "val_loss";
  if (!METRICS.includes(metric)) {
    throw new UsageError(`--metric ${metric}: must be one of ${METRICS.join(", ")}`);
  }
  const workers = opts.workers ?? 1;
  if (!Number.isInteger(workers) || workers < 1 || workers > 1024) {
    throw new UsageError(`--workers ${workers}: must be an integer in [1, 1024]`);
  }
  const out = opts.out;
  if (out === "") throw new UsageError(`--out "": must not be empty`);
  const { runs, identity, swept } = planSweep(opts);

  const sweepFile = join(out, "sweep.json");
  if (exists(out)) {
    if (!Deno.statSync(out).isDirectory) {
      throw new UsageError(`--out ${out}: not a folder`);
    }
    const entries = [...Deno.readDirSync(out)].filter((e) => e.name !== ".lock");
    if (entries.length > 0 && !exists(sweepFile)) {
      throw new UsageError(
        `--out ${out}: exists and holds no sweep (no sweep.json); choose a new or empty folder`,
      );
    }
  }
  const lock = lockRun(out, "--out");
  try {
    if (lock.notice) log(lock.notice);
    if (exists(sweepFile)) {
      let earlier: Record<string, unknown>;
      try {
        earlier = JSON.parse(Deno.readTextFileSync(sweepFile));
      } catch (e) {
        throw new UsageError(`--out ${out}: sweep.json unreadable (${(e as Error).message})`);
      }
      const same = JSON.stringify({
        grid: earlier.grid,
        fixed: earlier.fixed,
        random: earlier.random,
        sample_seed: earlier.sample_seed,
      }) === JSON.stringify(identity);
      if (!same) {
        throw new UsageError(
          `--out ${out}: holds another sweep (${describe(earlier)}); give the same --grid, ` +
            `--random and fixed flags to resume it, or choose another --out`,
        );
      }
    } else {
      writeFileAtomic(
        sweepFile,
        JSON.stringify({ version: 1, ...identity, runs: runs.map((r) => r.id) }, null, 2) + "\n",
      );
    }
    for (const d of ["runs", "logs"]) Deno.mkdirSync(join(out, d), { recursive: true });

    const resultsPath = join(out, "results.jsonl");
    const startedPath = join(out, "started.jsonl");
    const known = new Map<string, SweepResult>();
    for (const r of readJsonl<SweepResult>(resultsPath)) known.set(r.id, r);
    const ids = new Set(runs.map((r) => r.id));
    const finished = () =>
      [...known.values()].filter((r) => ids.has(r.id) && r.status !== "failed").length;
    const pending = runs.filter((r) => {
      const k = known.get(r.id);
      return k === undefined || k.status === "failed";
    });
    const cores = opts.cores ?? navigator.hardwareConcurrency ?? 1;
    const threads = Math.max(1, Math.floor(cores / workers));
    if (runs.length - pending.length > 0) {
      log(`sweep ${out}: ${runs.length - pending.length} of ${runs.length} runs already done`);
    }
    log(
      `sweep ${out}: ${pending.length} runs to go, ${Math.min(workers, pending.length)} at a ` +
        `time, ${runs[0]?.flags.threads ?? threads} threads each`,
    );

    const script = pretrainScript();
    const live = new Set<Deno.ChildProcess>();
    let stopping = opts.signal?.aborted ?? false;
    const onAbort = () => {
      if (!stopping) log("interrupted: stopping the running runs (they save a checkpoint)");
      stopping = true;
      for (const c of live) {
        try {
          c.kill("SIGTERM");
        } catch { /* already ended */ }
      }
    };
    opts.signal?.addEventListener("abort", onAbort);

    const runOne = async (run: PlannedRun): Promise<void> => {
      const dir = join(out, "runs", run.id);
      for (let holder = lockHolder(dir), said = false; holder !== null && !stopping;) {
        if (!said) {
          log(`waiting for ${run.id}: still run by process ${holder} (an earlier sweep's)`);
        }
        said = true;
        await new Promise((r) => setTimeout(r, 200));
        holder = lockHolder(dir);
      }
      if (stopping) return;
      const earlier = readSummary(dir);
      if (earlier !== null && !earlier.interrupted) {
        // finished before the sweep could record it (the sweep was killed)
        await record(run, earlier, earlier.error);
        return;
      }
      let args: string[];
      let mode: string;
      let why = "";
      if (listCheckpoints(dir).length > 0) {
        args = ["--resume", dir, "--json"];
        mode = "resuming";
      } else {
        args = [...argv(run.flags), "--out", dir, "--json"];
        if (!("threads" in run.flags)) args.push("--threads", String(threads));
        mode = "starting";
        if (exists(dir)) {
          // the sweep's own folder, stopped before its first checkpoint
          args.push("--overwrite", "on");
          mode = "restarting";
          why = " (stopped before its first checkpoint)";
        }
      }
      appendJsonl(startedPath, {
        id: run.id,
        mode,
        at: new Date().toISOString(),
      });
      log(`${mode} ${run.id}${why}`);
      const child = new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", script, ...args],
        env: { NO_COLOR: "1" },
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      live.add(child);
      if (stopping) {
        try {
          child.kill("SIGTERM");
        } catch { /* ended */ }
      }
      let stdout = "";
      let lastError = "";
      const logFile = Deno.openSync(join(out, "logs", `${run.id}.log`), {
        append: true,
        create: true,
      });
      try {
        let pendingErr = "";
        await Promise.all([
          drain(child.stdout, (b) => stdout += decoder.decode(b, { stream: true })),
          drain(child.stderr, (b) => {
            logFile.writeSync(b);
            pendingErr += decoder.decode(b, { stream: true });
            const lines = pendingErr.split("\n");
            pendingErr = lines.pop()!;
            for (const l of lines) if (l.startsWith("error: ")) lastError = l.slice(7);
          }),
        ]);
        if (pendingErr.startsWith("error: ")) lastError = pendingErr.slice(7);
      } finally {
        logFile.close();
      }
      const status = await child.status;
      live.delete(child);
      const jsonLine = stdout.trim().split("\n").at(-1) ?? "";
      let summary: Summary | null = null;
      try {
        summary = JSON.parse(jsonLine);
      } catch {
        summary = readSummary(dir);
      }
      if (summary !== null && typeof summary !== "object") summary = null;
      if (summary !== null && !summary.interrupted && (status.code === 0 || summary.diverged)) {
        await record(run, summary, summary.error);
        return;
      }
      if (stopping || summary?.interrupted) {
        log(
          `stopped ${run.id}` +
            (summary ? ` at step ${summary.steps} of ${summary.steps_planned}` : ""),
        );
        return;
      }
      await record(run, summary, lastError || `exit code ${status.code}`, "failed");
    };

    const record = async (
      run: PlannedRun,
      summary: Summary | null,
      error: string | null,
      forced?: RunStatus,
    ): Promise<void> => {
      const status: RunStatus = forced ?? (summary?.diverged ? "diverged" : "done");
      const r: SweepResult = {
        id: run.id,
        status,
        swept: run.swept,
        flags: run.flags,
        summary,
        error,
        finished_at: new Date().toISOString(),
      };
      appendJsonl(resultsPath, r);
      known.set(run.id, r);
      const m = metricOf(summary, metric);
      log(
        `[${finished()}/${runs.length}] ${status} ${run.id}` +
          (m === null ? "" : ` ${metric} ${num(m)}`) +
          (error && status !== "done" ? `: ${error}` : ""),
      );
      if (summary !== null) {
        try {
          await writeRunReport(join(out, "runs", run.id));
        } catch (e) {
          log(`notice: no report.html for ${run.id}: ${(e as Error).message}`);
        }
      }
    };

    const queue = [...pending];
    const worker = async () => {
      while (!stopping && queue.length > 0) await runOne(queue.shift()!);
    };
    try {
      await Promise.all(Array.from({ length: Math.min(workers, queue.length) }, worker));
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
    }

    const results = sortResults(
      runs.map((r) => known.get(r.id)).filter((r): r is SweepResult => r !== undefined),
      metric,
    );
    const left = runs.filter((r) => !known.has(r.id)).length;
    const table = formatTable(results, swept, metric);
    const interrupted = stopping && left > 0;
    const files = interrupted ? [] : await writeSweepFiles(out, results, swept, metric, table);
    return {
      results,
      metric,
      swept,
      total: runs.length,
      pending: left,
      interrupted,
      table,
      files,
    };
  } finally {
    lock.release();
  }
}

function describe(s: Record<string, unknown>): string {
  const grid = Object.entries((s.grid ?? {}) as Record<string, string[]>)
    .map(([k, v]) => `--grid ${k}=${v.join(",")}`).join(" ");
  const fixed = Object.entries((s.fixed ?? {}) as Record<string, string>)
    .map(([k, v]) => `--${k} ${v}`).join(" ");
  const random = s.random === null || s.random === undefined
    ? ""
    : ` --random ${s.random} --sample-seed ${s.sample_seed}`;
  return [grid, fixed].filter((x) => x).join(" ") + random;
}
