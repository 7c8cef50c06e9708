/**
 * report.html of a run folder: every chart drawn as inline SVG from the run's own numbers,
 * nothing fetched from outside the page, a symlink never written through.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { cli, TINY_MODEL } from "./pretrain_cli.ts";
import {
  gradNormChartSpec,
  lossChartSpec,
  memoryCategories,
  readRun,
  renderSvg,
  thin,
  writeRunReport,
} from "../lib/report.ts";
import { UsageError } from "../lib/errors.ts";

const temps: string[] = [];
globalThis.addEventListener("unload", () => {
  for (const t of temps) Deno.removeSync(t, { recursive: true });
});

/** A finished qgalore run (refreshes every 4 updates) in a fresh folder. */
async function qgaloreRun(): Promise<string> {
  const tmp = Deno.makeTempDirSync({ prefix: "qg-report-" });
  temps.push(tmp);
  const model = join(tmp, "tiny.json");
  Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
  const out = join(tmp, "run");
  const r = await cli([
    "--model",
    model,
    "--optimizer",
    "qgalore",
    "--update-gap",
    "4",
    "--steps",
    "12",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-batches",
    "2",
    "--eval-every",
    "4",
    "--threads",
    "1",
    "--out",
    out,
  ]); // deno-fmt-ignore
  assert.deepStrictEqual(r.code, 0, r.stderr);
  return out;
}

Deno.test("report.html: every chart as inline SVG, no external URL", async () => {
  const out = await qgaloreRun();
  const path = await writeRunReport(out);
  assert.deepStrictEqual(path, join(out, "report.html"));
  const html = Deno.readTextFileSync(path);
  // loss, validation loss, learning rate, gradient norm, tokens/s, refreshes, memory
  assert.deepStrictEqual(html.match(/<svg[\s>]/g)?.length, 7);
  for (
    const title of [
      "Loss",
      "Validation loss",
      "Learning rate",
      "Gradient norm",
      "Throughput",
      // step records count refreshes (svd_count): the events, each at its step
      "Refresh events",
      "Memory by category",
    ]
  ) assert(html.includes(`>${title}`), `chart title ${title}`);
  assert.deepStrictEqual(html.match(/(src|href)\s*=\s*["']?\s*(https?:)?\/\//gi), null);
  assert(!/<script/i.test(html), "no script");
  assert(!/<link/i.test(html), "no linked resource");
  // the memory bars are the summary's categories
  const data = readRun(out);
  const cats = memoryCategories(data.summary).map((c) => c.category);
  assert(cats.includes("optimizer_state") && cats.includes("projector"), cats.join());
  for (const c of cats) assert(html.includes(`>${c}<`), `memory category ${c} labelled`);
});

Deno.test("report specs carry the run's numbers", async () => {
  const out = await qgaloreRun();
  const data = readRun(out);
  assert.deepStrictEqual(data.steps.length, 12);
  // evaluations at 0, 4, 8, 12
  assert.deepStrictEqual(data.evals.map((e) => e.step), [0, 4, 8, 12]);
  const spec = lossChartSpec(data.steps, data.evals) as { data: { values: unknown[] } };
  const values = spec.data.values as { step: number; loss: number; series: string }[];
  assert.deepStrictEqual(values.filter((v) => v.series === "train").map((v) => v.loss), [
    ...data.steps.map((s) => s.loss),
  ]);
  assert.deepStrictEqual(
    values.filter((v) => v.series === "validation").map((v) => v.loss),
    data.evals.map((e) => e.val_loss),
  );
  assert.deepStrictEqual(data.summary?.steps, 12);
  const svg = await renderSvg(gradNormChartSpec(data.steps));
  assert(svg.startsWith("<svg"), svg.slice(0, 40));
});

Deno.test("thin keeps at most max points, evenly, and the last", () => {
  const xs = Array.from({ length: 10_001 }, (_, i) => i);
  const t = thin(xs, 2000);
  assert(t.length <= 2001, String(t.length));
  assert.deepStrictEqual(t[0], 0);
  assert.deepStrictEqual(t.at(-1), 10_000);
  assert.deepStrictEqual(t[1] - t[0], 6);
  assert.deepStrictEqual(thin([1, 2, 3], 2000), [1, 2, 3]);
});

Deno.test("report: a folder without a run is one line; a symlink is replaced, not followed", async () => {
  const tmp = Deno.makeTempDirSync({ prefix: "qg-report-" });
  temps.push(tmp);
  let e: Error | null = null;
  try {
    await writeRunReport(tmp);
  } catch (err) {
    e = err as Error;
  }
  assert(e instanceof UsageError);
  assert(!e.message.includes("\n") && e.message.includes("no metrics.jsonl"), e.message);

  Deno.writeTextFileSync(
    join(tmp, "metrics.jsonl"),
    JSON.stringify({
      type: "step",
      step: 1,
      loss: 5,
      lr: 1e-3,
      grad_norm: 1,
      clipped: false,
      tokens: 64,
      tokens_per_s: 100,
      elapsed_s: 0.1,
    }) + "\n{torn",
  );
  const victim = join(tmp, "victim.txt");
  Deno.writeTextFileSync(victim, "keep me");
  Deno.symlinkSync(victim, join(tmp, "report.html"));
  await writeRunReport(tmp);
  assert.deepStrictEqual(Deno.readTextFileSync(victim), "keep me");
  assert(!Deno.lstatSync(join(tmp, "report.html")).isSymlink);
  const html = Deno.readTextFileSync(join(tmp, "report.html"));
  assert(html.includes("No summary.json"), "says the run has no summary");
  assert(/<svg/.test(html));
});

Deno.test("report: refresh events from step records become rules over the loss", async () => {
  const tmp = Deno.makeTempDirSync({ prefix: "qg-report-" });
  temps.push(tmp);
  const step = (n: number, svd: number) =>
    JSON.stringify({
      type: "step",
      step: n,
      loss: 6 - n / 10,
      lr: 1e-3,
      grad_norm: 1,
      clipped: false,
      tokens: 64 * n,
      tokens_per_s: 100,
      elapsed_s: n,
      svd_count: svd,
    });
  // 14 refreshes at step 1, 14 more at step 4; a record of kind "refresh" at step 6
  Deno.writeTextFileSync(
    join(tmp, "metrics.jsonl"),
    [step(1, 14), step(2, 14), step(3, 14), step(4, 28), step(5, 28)].join("\n") +
      "\n" + JSON.stringify({ type: "refresh", step: 6, count: 3 }) + "\n",
  );
  const data = readRun(tmp);
  assert.deepStrictEqual(data.refreshes, [
    { step: 1, count: 14 },
    { step: 4, count: 14 },
    { step: 6, count: 3 },
  ]);
  const html = Deno.readTextFileSync(await writeRunReport(tmp));
  assert.ok(html.includes(">Refresh events (rules) over the training loss"));
});
