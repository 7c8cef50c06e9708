/**
 * The Deno Jupyter kernel: live training progress as one updating display, and rich
 * displays (HTML tables, Vega-Lite charts) of a run's summary, memory and metrics.
 *
 * The kernel does not forward `Deno.stderr.writeSync`, so {@link Progress} (lib/log.ts)
 * sends its line to a {@link KernelProgress} instead when {@link inKernel} is true. Rich
 * displays use the kernel's `Symbol.for("Jupyter.display")` protocol: an object with that
 * method shows itself as a cell's last expression, and the method costs nothing outside a
 * kernel. The chart specs come from lib/report.ts, imported only when a chart is shown, so
 * importing the package does not load Vega.
 *
 * ```ts
 * const summary = await train({ model: "llama-9m", steps: 50, out: null });
 * summary;          // an HTML table
 * summary.memory;   // memory by category: a bar chart (an HTML table where charts are not shown)
 * charts(summary);  // loss, learning rate, gradient norm, refresh events, memory
 * ```
 *
 * @module
 */

import type { EvalRecord, StepRecord } from "./run_types.ts";
import type { Summary } from "./summary.ts";

/** The symbol the Deno kernel looks for on a cell's value (`Deno.jupyter.$display`). */
export const JUPYTER_DISPLAY: symbol = Symbol.for("Jupyter.display");

/** A Jupyter MIME bundle: MIME type → content. */
export type MimeBundle = { [mime: string]: unknown };

/** An object the Deno kernel shows through its MIME bundle. */
export interface Displayable {
  /** The bundle the kernel shows. */
  [JUPYTER_DISPLAY](): MimeBundle | Promise<MimeBundle>;
}

/** What this module uses of `Deno.jupyter` (present only inside the Deno kernel). */
interface JupyterApi {
  display(
    obj: unknown,
    options?: { raw?: boolean; update?: boolean; display_id?: string },
  ): Promise<void>;
}

/** A stand-in for `Deno.jupyter` that tests set on globalThis (the real one cannot be). */
const STAND_IN = Symbol.for("qgalore.jupyter.standIn");

function jupyterApi(): JupyterApi | null {
  let j = (globalThis as Record<symbol, Partial<JupyterApi> | undefined>)[STAND_IN];
  if (j === undefined) {
    try {
      // outside the kernel the getter is missing, or throws ("only available in deno jupyter")
      j = (Deno as unknown as { jupyter?: Partial<JupyterApi> }).jupyter;
    } catch {
      return null;
    }
  }
  return j !== undefined && j !== null && typeof j.display === "function" ? j as JupyterApi : null;
}

/** Whether this code runs inside the Deno Jupyter kernel (`Deno.jupyter` is there). */
export function inKernel(): boolean {
  return jupyterApi() !== null;
}

let displays = 0;

/**
 * Training progress in a notebook: one display that each update replaces (at most every
 * `intervalMs`, and always for the last update), and each note as a display of its own.
 * Messages go out in order; one that the kernel refuses is dropped, never thrown.
 */
export class KernelProgress {
  readonly #api: JupyterApi;
  readonly #id: string;
  readonly #interval: number;
  #shown = false;
  #last = -Infinity;
  #pending: MimeBundle | null = null;
  #chain: Promise<void> = Promise.resolve();

  /** Null outside a kernel. */
  static create(intervalMs = 250): KernelProgress | null {
    const api = jupyterApi();
    return api === null ? null : new KernelProgress(api, intervalMs);
  }

  private constructor(api: JupyterApi, intervalMs: number) {
    this.#api = api;
    this.#interval = intervalMs;
    this.#id = `qgalore-progress-${Date.now().toString(36)}-${++displays}`;
  }

  /** Shows update `step` of `steps` with its progress `line` (throttled unless `last`). */
  step(step: number, steps: number, line: string, last: boolean): void {
    this.#pending = progressBundle(step, steps, line);
    const now = performance.now();
    if (!last && now - this.#last < this.#interval) return;
    this.#last = now;
    this.#flush();
  }

  /** Shows a whole line (a notice, an evaluation) below the progress display. */
  note(text: string): void {
    const bundle = { "text/plain": text };
    this.#send(() => this.#api.display(bundle, { raw: true }));
  }

  /** Shows the newest update, if one is still held back by the throttle. */
  done(): void {
    this.#flush();
  }

  /** Resolves once every message so far has been handed to the kernel. */
  settled(): Promise<void> {
    return this.#chain;
  }

  #flush(): void {
    const bundle = this.#pending;
    if (bundle === null) return;
    this.#pending = null;
    const update = this.#shown;
    this.#shown = true;
    this.#send(() => this.#api.display(bundle, { raw: true, display_id: this.#id, update }));
  }

  #send(message: () => Promise<void>): void {
    this.#chain = this.#chain.then(message).catch(() => {});
  }
}

function progressBundle(step: number, steps: number, line: string): MimeBundle {
  return {
    "text/plain": line,
    "text/html": `<div><progress value="${step}" max="${steps}" style="width:12em"></progress> ` +
      `<code>${escapeHtml(line)}</code></div>`,
  };
}

function escapeHtml(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;");
}

/** Step and evaluation records of a run held in memory (a notebook run without `out`). */
export interface RunHistory {
  /** Step records, in order. */
  steps: StepRecord[];
  /** Evaluation records, in order. */
  evals: EvalRecord[];
}

const histories = new WeakMap<object, RunHistory>();

/**
 * Gives `summary` (and its `memory`) their notebook displays, and remembers the run's
 * records for {@link charts}. Non-enumerable symbol properties: JSON and equality ignore them.
 */
export function attachDisplays(summary: Summary, history: RunHistory | null): Summary {
  if (history !== null) histories.set(summary, history);
  define(summary, () => summaryBundle(summary));
  if (typeof summary.memory === "object" && summary.memory !== null) {
    define(summary.memory, () => memoryBundle(summary));
  }
  return summary;
}

function define(target: object, show: () => Promise<MimeBundle>): void {
  if (Object.isFrozen(target)) return;
  Object.defineProperty(target, JUPYTER_DISPLAY, {
    value: show,
    enumerable: false,
    configurable: true,
  });
}

async function summaryBundle(s: Summary): Promise<MimeBundle> {
  const { summaryTable } = await import("./report.ts");
  const status = s.diverged ? "diverged" : s.interrupted ? "interrupted" : "finished";
  return {
    "text/html": summaryTable(s) + "\n" + memoryTable(s),
    "text/plain": `Summary: ${status}, ${s.steps}/${s.steps_planned} steps, ` +
      `val loss ${s.initial_val_loss?.toFixed(4) ?? "n/a"} → ${s.val_loss?.toFixed(4) ?? "n/a"}`,
  };
}

async function memoryBundle(s: Summary): Promise<MimeBundle> {
  const { memoryChartSpec } = await import("./report.ts");
  const spec = memoryChartSpec(s);
  return {
    ...(spec === null ? {} : { "application/vnd.vegalite.v5+json": asV5(spec) }),
    "text/html": memoryTable(s),
    "text/plain": memoryRows(s).map(([k, mib]) => `${k}: ${mib.toFixed(2)} MiB`).join("\n"),
  };
}

function memoryRows(s: Summary): [string, number][] {
  const m = (s.memory ?? {}) as unknown as Record<string, unknown>;
  return Object.entries(m)
    .filter(([k, v]) => !["peak_rss", "peak_device"].includes(k) && typeof v === "number")
    .map(([k, v]) => [k, (v as number) / 2 ** 20]);
}

/** The memory breakdown as an HTML table (MiB and share of the total). */
function memoryTable(s: Summary): string {
  const rows = memoryRows(s);
  const total = rows.find(([k]) => k === "total")?.[1] ?? 0;
  const body = rows.map(([k, mib]) =>
    `<tr><th>${escapeHtml(k)}</th><td>${mib.toFixed(2)} MiB</td><td>${
      total > 0 && k !== "total" ? `${((100 * mib) / total).toFixed(1)} %` : ""
    }</td></tr>`
  ).join("\n");
  return `<table>\n<tr><th>memory</th><th>MiB</th><th>share</th></tr>\n${body}\n</table>`;
}

/** The Vega-Lite v5 MIME type's `$schema` (the specs use nothing newer than v5 has). */
function asV5(spec: Record<string, unknown>): Record<string, unknown> {
  return { ...spec, $schema: "https://vega.github.io/schema/vega-lite/v5.json" };
}

/** Chart names {@link charts} shows by default, in order (lib/report.ts `runChartSpecs`). */
export const DEFAULT_CHARTS: readonly string[] = Object.freeze([
  "loss",
  "learning rate",
  "gradient norm",
  "refresh events",
  "memory by category",
]);

/**
 * A run's charts as one display: Vega-Lite (stacked), with an SVG rendering for viewers
 * without Vega. `source` is a summary returned by `train()`/`finetune()` (its records in
 * memory, else its `out` folder's `metrics.jsonl`) or a run folder.
 */
export function charts(
  source: Summary | string,
  names: readonly string[] = DEFAULT_CHARTS,
): Displayable {
  return {
    [JUPYTER_DISPLAY]: async (): Promise<MimeBundle> => {
      const report = await import("./report.ts");
      let data;
      if (typeof source === "string") data = report.readRun(source);
      else {
        const h = histories.get(source);
        data = h !== undefined
          ? { ...h, refreshes: refreshEvents(h.steps), summary: source }
          : source.out !== null
          ? { ...report.readRun(source.out), summary: source }
          : { steps: [], evals: [], refreshes: [], summary: source };
      }
      const specs = report.runChartSpecs(data)
        .filter((c) => names.includes(c.name) && c.spec !== null)
        .map((c) => {
          const { $schema: _, ...rest } = c.spec!;
          return rest;
        });
      if (specs.length === 0) return { "text/plain": "no charts: the run has no records" };
      const spec = { $schema: "", vconcat: specs };
      let svg: string | null = null;
      try {
        // a copy: Vega marks the data objects it draws
        svg = await report.renderSvg(structuredClone({ vconcat: specs }));
      } catch { /* the Vega-Lite view still shows */ }
      return {
        "application/vnd.vegalite.v5+json": asV5(spec),
        ...(svg === null ? {} : { "image/svg+xml": svg }),
        "text/plain": `charts: ${specs.map((s) => String(s.title ?? "")).join(", ")}`,
      };
    },
  };
}

/** Steps at which the cumulative `svd_count` of the step records grew, and by how much. */
export function refreshEvents(steps: readonly StepRecord[]): { step: number; count: number }[] {
  const out: { step: number; count: number }[] = [];
  let last = 0;
  for (const s of steps) {
    const c = s.svd_count;
    if (typeof c !== "number") continue;
    if (c > last) out.push({ step: s.step, count: c - last });
    last = c;
  }
  return out;
}

/** A table of plain records (one row each) as an HTML table; numbers shown to 4 digits. */
export function table(
  rows: readonly Record<string, unknown>[],
  columns: readonly string[] = [...new Set(rows.flatMap((r) => Object.keys(r)))],
): Displayable & { rows: readonly Record<string, unknown>[] } {
  const cell = (v: unknown): string =>
    typeof v === "number"
      ? Number.isInteger(v) ? String(v) : v.toPrecision(4)
      : v === null || v === undefined
      ? "–"
      : typeof v === "object"
      ? JSON.stringify(v)
      : String(v);
  return {
    rows,
    [JUPYTER_DISPLAY]: (): MimeBundle => ({
      "text/html": "<table>\n<tr>" + columns.map((c) => `<th>${escapeHtml(c)}</th>`).join("") +
        "</tr>\n" +
        rows.map((r) =>
          "<tr>" + columns.map((c) => `<td>${escapeHtml(cell(r[c]))}</td>`).join("") + "</tr>"
        ).join("\n") + "\n</table>",
      "text/plain": [
        columns.join("\t"),
        ...rows.map((r) => columns.map((c) => cell(r[c])).join("\t")),
      ]
        .join("\n"),
    }),
  };
}

/**
 * Runs side by side as one Vega-Lite display: engine memory by category (a stacked bar per
 * run) and the training loss of each run, with an SVG rendering. `runs` maps a label (e.g.
 * the optimizer) to the summary `train()` returned.
 */
export function compare(runs: Readonly<Record<string, Summary>>): Displayable {
  return {
    [JUPYTER_DISPLAY]: async (): Promise<MimeBundle> => {
      const report = await import("./report.ts");
      const memory = Object.entries(runs).flatMap(([run, s]) =>
        report.memoryCategories(s).map((c) => ({
          run,
          category: c.category,
          mib: c.bytes / 2 ** 20,
        }))
      );
      const loss = Object.entries(runs).flatMap(([run, s]) => {
        const steps = histories.get(s)?.steps ??
          (s.out !== null ? report.readRun(s.out).steps : []);
        return report.thin(steps.filter((r) => Number.isFinite(r.loss)), 500)
          .map((r) => ({ run, step: r.step, loss: r.loss }));
      });
      const specs = [
        {
          title: "Engine memory by category",
          width: 480,
          data: { values: memory },
          mark: "bar",
          encoding: {
            y: { field: "run", type: "nominal", title: null, sort: null },
            x: { field: "mib", type: "quantitative", title: "MiB", stack: "zero" },
            color: { field: "category", type: "nominal" },
            tooltip: [{ field: "category" }, { field: "mib", format: ".2f" }],
          },
        },
        {
          title: "Training loss",
          width: 480,
          height: 220,
          data: { values: loss },
          mark: "line",
          encoding: {
            x: { field: "step", type: "quantitative" },
            y: { field: "loss", type: "quantitative", scale: { zero: false } },
            color: { field: "run", type: "nominal", sort: null },
          },
        },
      ];
      let svg: string | null = null;
      try {
        svg = await report.renderSvg(
          structuredClone({ vconcat: specs, resolve: { scale: { color: "independent" } } }),
        );
      } catch { /* the Vega-Lite view still shows */ }
      return {
        "application/vnd.vegalite.v5+json": asV5({
          vconcat: specs,
          resolve: { scale: { color: "independent" } },
        }),
        ...(svg === null ? {} : { "image/svg+xml": svg }),
        "text/plain": `compare: ${Object.keys(runs).join(", ")}`,
      };
    },
  };
}
