/**
 * Notebook integration (lib/jupyter.ts) with a stand-in `Deno.jupyter`: progress is one
 * display updated in place (throttled, the last update always shown, nothing on stderr);
 * summaries, memory and metrics show as HTML tables and Vega-Lite charts; step records of a
 * projected optimizer carry the running refresh count.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import type { EngineConfig, StepStats } from "../ffi/engine.ts";
import { paramCount } from "../lib/estimate.ts";
import { charts, inKernel, JUPYTER_DISPLAY, type MimeBundle } from "../lib/jupyter.ts";
import { Progress } from "../lib/log.ts";
import { readRun } from "../lib/report.ts";
import type { StepRecord, TrainEngine } from "../lib/run_types.ts";
import { train } from "../lib/trainer.ts";

type Call = { bundle: Record<string, unknown>; opts: Record<string, unknown> };

/** Installs a stand-in `Deno.jupyter` (lib/jupyter.ts's test seam) for the duration of `fn`. */
async function withKernel(fn: (calls: Call[]) => Promise<void>): Promise<void> {
  const calls: Call[] = [];
  const g = globalThis as Record<symbol, unknown>;
  g[Symbol.for("qgalore.jupyter.standIn")] = {
    display: (bundle: Record<string, unknown>, opts: Record<string, unknown>) => {
      calls.push({ bundle, opts: { ...opts } });
      return Promise.resolve();
    },
  };
  try {
    await fn(calls);
  } finally {
    delete g[Symbol.for("qgalore.jupyter.standIn")];
  }
}

/** Loss falls; the projector refresh count grows by 2 every 4 updates. */
class RefreshEngine implements TrainEngine {
  readonly params: number;
  readonly device = "cpu";
  n = 0;
  constructor(readonly cfg: EngineConfig) {
    this.params = paramCount(cfg.model);
  }
  trainStep(): Promise<StepStats> {
    this.n++;
    return Promise.resolve({ loss: 5 / this.n, gradNorm: 2 / this.n, clipped: false, count: 1 });
  }
  evalLoss(): Promise<number> {
    return Promise.resolve(6 / (1 + this.n));
  }
  info(): { svd_count: number } {
    return { svd_count: 2 * Math.ceil(this.n / 4) };
  }
  memory() {
    const m = 2 ** 20;
    return {
      weights: 4 * m,
      adapters: 0,
      grads: 4 * m,
      optimizer_state: 2 * m,
      projector: m,
      activations: 3 * m,
      total: 14 * m,
    };
  }
  [Symbol.dispose](): void {}
}

const small = { model: "llama-9m", batchSize: 2, seqLen: 16, evalBatches: 1 };

async function show(x: unknown): Promise<MimeBundle> {
  return await (x as { [JUPYTER_DISPLAY]: () => Promise<MimeBundle> })[JUPYTER_DISPLAY]();
}

Deno.test("jupyter: progress is one display, updated in place; the last update shown", async () => {
  assert.equal(inKernel(), false);
  await withKernel(async (calls) => {
    assert.equal(inKernel(), true);
    const p = new Progress({ steps: 500 });
    p.note("model llama-9m");
    for (let step = 1; step <= 500; step++) {
      p.step({ step, loss: 1, lr: 1e-3, gradNorm: 1, tokensPerS: 100 });
    }
    p.done();
    await new Promise((r) => setTimeout(r, 10));
    assert.equal(calls[0].bundle["text/plain"], "model llama-9m");
    assert.equal(calls[0].opts.display_id, undefined);
    const prog = calls.slice(1);
    // a fast loop: the first update, then the last one (throttled to one per 250 ms)
    assert.ok(prog.length >= 2 && prog.length <= 4, `${prog.length} progress messages`);
    const id = prog[0].opts.display_id as string;
    assert.match(id, /^qgalore-progress-/);
    assert.equal(prog[0].opts.update, false);
    for (const c of prog.slice(1)) {
      assert.deepEqual(c.opts, { raw: true, display_id: id, update: true });
    }
    assert.match(prog.at(-1)!.bundle["text/plain"] as string, /^step 500\/500 loss 1\.0000/);
    assert.match(prog.at(-1)!.bundle["text/html"] as string, /<progress value="500" max="500"/);
    // an explicit writer (a test, --quiet) keeps the text path
    const lines: string[] = [];
    const q = new Progress({ steps: 2, write: (t) => lines.push(t) });
    q.step({ step: 2, loss: 1, lr: 1, gradNorm: 1, tokensPerS: 1 });
    assert.equal(lines.length, 1);
  });
});

Deno.test("jupyter: a run's summary, memory and charts display as tables and Vega-Lite", async () => {
  await withKernel(async (calls) => {
    const s = await train({ ...small, optimizer: "qgalore", steps: 12, evalEvery: 6, out: null }, {
      createEngine: (cfg) => new RefreshEngine(cfg),
    });
    await new Promise((r) => setTimeout(r, 10));
    // the run's lines went to the notebook: the description, evaluations, the closing line
    assert.ok(calls.some((c) => /^done: 12 steps/.test(c.bundle["text/plain"] as string)));
    // displays are invisible to JSON
    assert.equal(JSON.stringify(s).includes("Jupyter"), false);
    assert.deepEqual(Object.keys(s), Object.keys(JSON.parse(JSON.stringify(s))));

    const table = await show(s);
    assert.match(table["text/html"] as string, /<th>optimizer<\/th><td>qgalore<\/td>/);
    assert.match(
      table["text/html"] as string,
      /<th>grads<\/th><td>4\.00 MiB<\/td><td>28\.6 %<\/td>/,
    );
    const mem = await show(s.memory);
    const mspec = mem["application/vnd.vegalite.v5+json"] as Record<string, unknown>;
    assert.equal(mspec.$schema, "https://vega.github.io/schema/vega-lite/v5.json");
    assert.equal((mspec.data as { values: unknown[] }).values.length, 6);

    const c = await show(charts(s));
    const spec = c["application/vnd.vegalite.v5+json"] as { vconcat: Record<string, unknown>[] };
    assert.deepEqual(spec.vconcat.map((v) => v.title), [
      "Loss",
      "Learning rate",
      "Gradient norm",
      "Refresh events (rules) over the training loss",
      "Memory by category",
    ]);
    const refresh = spec.vconcat[3] as { layer: { data: { values: unknown[] } }[] };
    // refreshes at steps 1, 5 and 9, two each
    assert.deepEqual(refresh.layer[1].data.values, [
      { step: 1, count: 2 },
      { step: 5, count: 2 },
      { step: 9, count: 2 },
    ]);
    assert.match(c["image/svg+xml"] as string, /^<svg/);
  });
});

Deno.test("trainer: step records carry svd_count; a run folder gets report.html", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "qgalore-nb-" });
  try {
    const out = join(dir, "run");
    await train({ ...small, optimizer: "galore", steps: 6, out, quiet: true, saveEvery: "off" }, {
      createEngine: (cfg) => new RefreshEngine(cfg),
    });
    const run = readRun(out);
    assert.deepEqual(run.steps.map((r: StepRecord) => r.svd_count), [2, 2, 2, 2, 4, 4]);
    assert.deepEqual(run.refreshes, [{ step: 1, count: 2 }, { step: 5, count: 2 }]);
    const html = Deno.readTextFileSync(join(out, "report.html"));
    assert.match(html, /<svg/);
    // an unprojected optimizer's records have none
    const out2 = join(dir, "run2");
    await train({
      ...small,
      optimizer: "adamw",
      steps: 2,
      out: out2,
      quiet: true,
      saveEvery: "off",
    }, {
      createEngine: (cfg) => new RefreshEngine(cfg),
    });
    assert.equal(readRun(out2).steps[0].svd_count, undefined);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
