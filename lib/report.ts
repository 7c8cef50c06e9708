/**
 * A run's `report.html`: one self-contained page (inline SVG, no script, no link to anything
 * outside it, so it opens offline) with the charts of the run folder's `metrics.jsonl` and
 * `summary.json`. Charts are Vega-Lite specs compiled and rendered to SVG headlessly by Vega;
 * the spec builders are exported so notebooks can show the same charts live.
 *
 * Recommended call site: at the end of `Run.finish` in lib/trainer.ts, after `summary.json` is
 * written (also after a divergence or an interruption), when `out` is not null:
 * `await writeRunReport(out)` inside a try/catch that turns a failure into a notice (a report
 * must never fail a run).
 *
 * @module
 */

import { join } from "node:path";
import * as vega from "vega";
import * as vl from "vega-lite";
import type { TopLevelSpec } from "vega-lite";
import { UsageError } from "./errors.ts";
import type { EvalRecord, StepRecord } from "./run_types.ts";
import type { Summary } from "./summary.ts";

/**
 * A Vega-Lite (v6) specification as plain JSON: what `Deno.jupyter` displays as
 * `application/vnd.vegalite.v6+json` and what {@link renderSvg} draws.
 */
export type VegaLiteSpec = { [key: string]: unknown };

/** The builders type-check their specs against vega-lite's types; callers get plain JSON. */
function spec(s: TopLevelSpec): VegaLiteSpec {
  return s as unknown as VegaLiteSpec;
}

/** What a run folder holds for a report. */
export interface RunData {
  /** Step records of `metrics.jsonl`, in order. */
  steps: StepRecord[];
  /** Evaluation records of `metrics.jsonl`, in order. */
  evals: EvalRecord[];
  /**
   * Refresh events: records `{type: "refresh", step}` of `metrics.jsonl`, or the steps at which a
   * step record's cumulative `svd_count`/`refreshes` grew. Empty when the run records none.
   */
  refreshes: { step: number; count: number }[];
  /** `summary.json`, or null when the run wrote none (still running, killed). */
  summary: Summary | null;
}

/** Most points a line chart draws; longer series are thinned evenly (the last point kept). */
export const MAX_POINTS = 2000;

/** Reads a run folder's `metrics.jsonl` (a torn last line is skipped) and `summary.json`. */
export function readRun(runDir: string): RunData {
  const steps: StepRecord[] = [];
  const evals: EvalRecord[] = [];
  const refreshes: { step: number; count: number }[] = [];
  let text = "";
  try {
    text = Deno.readTextFileSync(join(runDir, "metrics.jsonl"));
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  // cumulative counts start at 0: the first step's refreshes (the initial projectors) count
  let lastCount = 0;
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    let r: Record<string, unknown>;
    try {
      r = JSON.parse(line);
    } catch {
      continue;
    }
    if (typeof r !== "object" || r === null) continue;
    if (r.type === "step" && typeof r.step === "number") {
      steps.push(r as unknown as StepRecord);
      const count = typeof r.svd_count === "number"
        ? r.svd_count
        : typeof r.refreshes === "number"
        ? r.refreshes
        : null;
      if (count !== null) {
        if (count > lastCount) {
          refreshes.push({ step: r.step, count: count - lastCount });
        }
        lastCount = count;
      }
    } else if (r.type === "eval" && typeof r.step === "number") {
      evals.push(r as unknown as EvalRecord);
    } else if (r.type === "refresh" && typeof r.step === "number") {
      refreshes.push({ step: r.step, count: typeof r.count === "number" ? r.count : 1 });
    }
  }
  let summary: Summary | null = null;
  try {
    summary = JSON.parse(Deno.readTextFileSync(join(runDir, "summary.json")));
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound) && !(e instanceof SyntaxError)) throw e;
  }
  return { steps, evals, refreshes, summary };
}

/** Every `n`-th element so that at most `max` remain, always keeping the last. */
export function thin<T>(xs: readonly T[], max: number = MAX_POINTS): T[] {
  if (xs.length <= max) return [...xs];
  const stride = Math.ceil(xs.length / max);
  const out = xs.filter((_, i) => i % stride === 0);
  if (out.at(-1) !== xs.at(-1)) out.push(xs.at(-1)!);
  return out;
}

const WIDTH = 560;
const HEIGHT = 220;

function finite(x: unknown): x is number {
  return typeof x === "number" && Number.isFinite(x);
}

/** A line chart of one step-record field against the step. */
function stepLine(
  title: string,
  values: { step: number; value: number }[],
  yTitle: string,
  opts: { log?: boolean } = {},
): VegaLiteSpec {
  const log = opts.log === true && values.every((v) => v.value > 0);
  return spec({
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title,
    width: WIDTH,
    height: HEIGHT,
    data: { values: thin(values) },
    mark: { type: "line", interpolate: "linear" },
    encoding: {
      x: { field: "step", type: "quantitative", title: "step" },
      y: {
        field: "value",
        type: "quantitative",
        title: yTitle,
        scale: log ? { type: "log" } : { zero: false },
      },
    },
  });
}

/** Training loss per step with the validation loss of each evaluation, as two series. */
export function lossChartSpec(
  steps: readonly StepRecord[],
  evals: readonly EvalRecord[],
): VegaLiteSpec {
  const values = [
    ...thin(steps.filter((s) => finite(s.loss))).map((s) => ({
      step: s.step,
      loss: s.loss,
      series: "train",
    })),
    ...evals.filter((e) => finite(e.val_loss)).map((e) => ({
      step: e.step,
      loss: e.val_loss,
      series: "validation",
    })),
  ];
  return spec({
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: "Loss",
    width: WIDTH,
    height: HEIGHT,
    data: { values },
    mark: { type: "line", point: false },
    encoding: {
      x: { field: "step", type: "quantitative", title: "step" },
      y: {
        field: "loss",
        type: "quantitative",
        title: "loss (nats/token)",
        scale: { zero: false },
      },
      color: { field: "series", type: "nominal", title: null },
    },
  });
}

/** Validation loss at each evaluation (points joined by a line). */
export function valLossChartSpec(evals: readonly EvalRecord[]): VegaLiteSpec {
  return spec({
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: "Validation loss",
    width: WIDTH,
    height: HEIGHT,
    data: {
      values: evals.filter((e) => finite(e.val_loss)).map((e) => ({
        step: e.step,
        val_loss: e.val_loss,
      })),
    },
    mark: { type: "line", point: true },
    encoding: {
      x: { field: "step", type: "quantitative", title: "step" },
      y: {
        field: "val_loss",
        type: "quantitative",
        title: "validation loss (nats/token)",
        scale: { zero: false },
      },
    },
  });
}

/** Learning rate per step. */
export function lrChartSpec(steps: readonly StepRecord[]): VegaLiteSpec {
  return stepLine(
    "Learning rate",
    steps.filter((s) => finite(s.lr)).map((s) => ({ step: s.step, value: s.lr })),
    "learning rate",
  );
}

/** Gradient norm (before clipping) per step, on a log scale when all are positive. */
export function gradNormChartSpec(steps: readonly StepRecord[]): VegaLiteSpec {
  return stepLine(
    "Gradient norm",
    steps.filter((s) => finite(s.grad_norm)).map((s) => ({ step: s.step, value: s.grad_norm })),
    "gradient norm",
    { log: true },
  );
}

/** Training throughput so far, per step. */
export function throughputChartSpec(steps: readonly StepRecord[]): VegaLiteSpec {
  return stepLine(
    "Throughput",
    steps.filter((s) => finite(s.tokens_per_s)).map((s) => ({
      step: s.step,
      value: s.tokens_per_s,
    })),
    "tokens/s",
  );
}

/**
 * Projector refreshes: the training loss with a rule at each refresh event when the run
 * records them; otherwise the final refresh interval of each projected matrix (summary
 * `gaps`). Null when there is nothing to draw (an unprojected optimizer).
 */
export function refreshChartSpec(
  steps: readonly StepRecord[],
  refreshes: readonly { step: number; count: number }[],
  summary: Summary | null,
): VegaLiteSpec | null {
  if (refreshes.length > 0) {
    return spec({
      $schema: "https://vega.github.io/schema/vega-lite/v6.json",
      title: "Refresh events (rules) over the training loss",
      width: WIDTH,
      height: HEIGHT,
      layer: [
        {
          data: {
            values: thin(steps.filter((s) => finite(s.loss))).map((s) => ({
              step: s.step,
              loss: s.loss,
            })),
          },
          mark: { type: "line", color: "#888" },
          encoding: {
            x: { field: "step", type: "quantitative", title: "step" },
            y: { field: "loss", type: "quantitative", title: "loss", scale: { zero: false } },
          },
        },
        {
          data: { values: refreshes.map((r) => ({ step: r.step, count: r.count })) },
          mark: { type: "rule", color: "#d62728", opacity: 0.6 },
          encoding: {
            x: { field: "step", type: "quantitative" },
            size: { field: "count", type: "quantitative", title: "refreshes" },
          },
        },
      ],
    });
  }
  const gaps = Object.entries(summary?.gaps ?? {}).filter(([, g]) => finite(g));
  if (gaps.length === 0) return null;
  return spec({
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: `Final refresh interval per matrix (${summary?.svd_count ?? 0} refreshes in all)`,
    width: WIDTH,
    data: { values: gaps.map(([name, gap]) => ({ name, gap })) },
    mark: "bar",
    encoding: {
      y: { field: "name", type: "nominal", title: null, sort: null },
      x: { field: "gap", type: "quantitative", title: "refresh interval (updates)" },
    },
  });
}

/** Memory categories of a summary (bytes), without the total and the process measures. */
export function memoryCategories(summary: Summary | null): { category: string; bytes: number }[] {
  const m = (summary?.memory ?? {}) as unknown as Record<string, unknown>;
  return Object.entries(m)
    .filter(([k, v]) => !["total", "peak_rss", "peak_device"].includes(k) && finite(v))
    .map(([category, bytes]) => ({ category, bytes: bytes as number }));
}

/** Engine memory by category (MiB), one bar each. Null without a summary. */
export function memoryChartSpec(summary: Summary | null): VegaLiteSpec | null {
  const cats = memoryCategories(summary);
  if (cats.length === 0) return null;
  return spec({
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title: "Memory by category",
    width: WIDTH,
    data: { values: cats.map((c) => ({ category: c.category, mib: c.bytes / 2 ** 20 })) },
    mark: "bar",
    encoding: {
      y: { field: "category", type: "nominal", title: null, sort: null },
      x: { field: "mib", type: "quantitative", title: "MiB" },
      color: { field: "category", type: "nominal", legend: null },
    },
  });
}

/**
 * Renders a Vega-Lite spec to an SVG string headlessly (no DOM, no canvas; text widths are
 * estimated).
 */
export async function renderSvg(spec: VegaLiteSpec): Promise<string> {
  const compiled = vl.compile(spec as unknown as TopLevelSpec).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: "none" });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** Escapes text for HTML. */
export function escapeHtml(text: string): string {
  return text.replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!,
  );
}

/** A whole self-contained HTML page: `body` (already HTML) under a heading. */
export function htmlPage(title: string, body: string): string {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>${escapeHtml(title)}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.chart { margin: 1.5em 0; }
.note { color: #666; }
</style>
</head>
<body>
<h1>${escapeHtml(title)}</h1>
${body}
</body>
</html>
`;
}

function fmt(x: unknown): string {
  if (x === null || x === undefined) return "–";
  if (typeof x === "number") {
    if (!Number.isFinite(x)) return String(x);
    if (Number.isInteger(x)) return String(x);
    return Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3 ? x.toExponential(3) : x.toPrecision(5);
  }
  return String(x);
}

function mib(bytes: unknown): string {
  return finite(bytes) ? `${(bytes / 2 ** 20).toFixed(2)} MiB` : "–";
}

/** The summary as an HTML table of its headline numbers. */
export function summaryTable(s: Summary | null): string {
  if (s === null) {
    return `<p class="note">No summary.json: the run has not finished (or was killed).</p>`;
  }
  const status = s.diverged ? "diverged" : s.interrupted ? "interrupted" : "finished";
  const rows: [string, string][] = [
    ["status", status + (s.error ? `: ${s.error}` : "")],
    ["model", `${s.model?.name ?? "?"} (${fmt(s.params)} params)`],
    ["optimizer", s.optimizer],
    ["device", `${s.device} (${s.precision})`],
    ["data", s.data],
    ["steps", `${fmt(s.steps)} of ${fmt(s.steps_planned)}`],
    ["tokens", fmt(s.tokens)],
    ["validation loss", `${fmt(s.initial_val_loss)} → ${fmt(s.val_loss)}`],
    ["validation perplexity", fmt(s.val_ppl)],
    ["final training loss", fmt(s.final_train_loss)],
    ["tokens/s", fmt(s.tokens_per_s)],
    ["wall time", `${fmt(s.wall_s)} s`],
    ["projector refreshes", `${fmt(s.svd_count)} (${fmt(s.refresh_failures)} failed)`],
    ["engine memory (total)", mib(s.memory?.total)],
    ["peak resident set", mib(s.memory?.peak_rss)],
    ["started", s.started_at],
  ];
  return "<table>\n" +
    rows.map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(String(v))}</td></tr>`)
      .join("\n") +
    "\n</table>";
}

/** The charts of a run, in page order; null entries have nothing to draw. */
export function runChartSpecs(data: RunData): { name: string; spec: VegaLiteSpec | null }[] {
  const { steps, evals, refreshes, summary } = data;
  const some = <T>(xs: readonly T[], make: () => VegaLiteSpec): VegaLiteSpec | null =>
    xs.length > 0 ? make() : null;
  return [
    { name: "loss", spec: some([...steps, ...evals], () => lossChartSpec(steps, evals)) },
    { name: "validation loss", spec: some(evals, () => valLossChartSpec(evals)) },
    { name: "learning rate", spec: some(steps, () => lrChartSpec(steps)) },
    { name: "gradient norm", spec: some(steps, () => gradNormChartSpec(steps)) },
    { name: "tokens/s", spec: some(steps, () => throughputChartSpec(steps)) },
    { name: "refresh events", spec: refreshChartSpec(steps, refreshes, summary) },
    { name: "memory by category", spec: memoryChartSpec(summary) },
  ];
}

/** The report page of a run folder's data. */
export async function runReportHtml(data: RunData, title: string): Promise<string> {
  const parts = [summaryTable(data.summary)];
  for (const { name, spec } of runChartSpecs(data)) {
    if (spec === null) {
      const why = name === "refresh events"
        ? "no projector refreshes recorded (the optimizer does not project, or none were taken)"
        : "no data recorded";
      parts.push(`<p class="note">${escapeHtml(name)}: ${escapeHtml(why)}.</p>`);
      continue;
    }
    parts.push(
      `<div class="chart" id="${escapeHtml(name.replace(/\W+/g, "-"))}">` +
        `${await renderSvg(spec)}</div>`,
    );
  }
  return htmlPage(title, parts.join("\n"));
}

/**
 * Writes a file atomically (a temporary file renamed over it), so a reader never sees half a
 * page and a symlink at `path` is replaced, never written through.
 */
export function writeFileAtomic(path: string, text: string): void {
  const tmp = `${path}.${Deno.pid}.tmp`;
  try {
    Deno.writeTextFileSync(tmp, text, { createNew: true });
    Deno.renameSync(tmp, path);
  } catch (e) {
    try {
      Deno.removeSync(tmp);
    } catch { /* never written */ }
    throw e;
  }
}

/**
 * Writes `runDir/report.html` from the folder's `metrics.jsonl` and `summary.json` and returns
 * its path. A folder with neither is a UsageError (one line).
 */
export async function writeRunReport(runDir: string): Promise<string> {
  const data = readRun(runDir);
  if (data.summary === null && data.steps.length === 0 && data.evals.length === 0) {
    throw new UsageError(
      `${runDir}: no metrics.jsonl or summary.json to report on (is it a run folder?)`,
    );
  }
  const name = runDir.replace(/\/+$/, "").split("/").at(-1) ?? runDir;
  const html = await runReportHtml(data, `qgalore run ${name}`);
  const path = join(runDir, "report.html");
  writeFileAtomic(path, html);
  return path;
}
