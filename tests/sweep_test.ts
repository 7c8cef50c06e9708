/**
 * Sweeps driven as a user would: the sweep CLI in a subprocess on a tiny model, its ledgers and
 * table; a sweep stopped with SIGINT after its first result, or killed outright (kill -9 of the
 * sweep and its run) halfway, and run again ends with the table of an uninterrupted one; a diverged run is a result; bad flags are one line.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { TINY_MODEL } from "./pretrain_cli.ts";
import { parseSweepArgs } from "../examples/sweep.ts";
import { planSweep, pretrainScript, type SweepResult } from "../lib/sweep.ts";
import { UsageError } from "../lib/errors.ts";
import { exists } from "../lib/fs.ts";

const script = new URL("../examples/sweep.ts", import.meta.url).pathname;
const dec = new TextDecoder();
const tmp = Deno.makeTempDirSync({ prefix: "qg-sweep-" });
const model = join(tmp, "tiny.json");
Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
globalThis.addEventListener("unload", () => Deno.removeSync(tmp, { recursive: true }));

/** The flags every run of these sweeps takes; threads fixed so that any --workers gives the same losses. */
const FIXED = [
  "--model",
  model,
  "--steps",
  "150",
  "--batch-size",
  "4",
  "--seq-len",
  "32",
  "--eval-batches",
  "2",
  "--threads",
  "1",
]; // deno-fmt-ignore
const GRID = ["--grid", "lr=1e-3,3e-3", "--grid", "seed=1,2"];

async function sweepCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
}

function results(dir: string): SweepResult[] {
  return Deno.readTextFileSync(join(dir, "results.jsonl")).split("\n").filter((l) => l)
    .map((l) => JSON.parse(l));
}

function lines(path: string): Record<string, unknown>[] {
  try {
    return Deno.readTextFileSync(path).split("\n").filter((l) => l).map((l) => JSON.parse(l));
  } catch {
    return [];
  }
}

/** The run ids of table.txt, in its order. */
function tableIds(dir: string): string[] {
  return Deno.readTextFileSync(join(dir, "table.txt")).trim().split("\n").slice(1)
    .map((l) => l.trim().split(/\s+/).at(-1)!);
}

const straight = join(tmp, "straight");
let straightResults: SweepResult[] = [];

Deno.test("sweep: a 2×2 grid: one results line per run, table sorted by val_loss, charts, resume skips", async () => {
  const r = await sweepCli(["--out", straight, ...GRID, ...FIXED, "--workers", "2"]);
  assert.equal(r.code, 0, r.stderr);
  straightResults = results(straight);
  assert.equal(straightResults.length, 4);
  const swept = straightResults.map((x) => `${x.swept.lr} ${x.swept.seed}`).sort();
  assert.deepEqual(swept, ["1e-3 1", "1e-3 2", "3e-3 1", "3e-3 2"]);
  for (const x of straightResults) {
    assert.equal(x.status, "done");
    assert.equal(x.error, null);
    assert.equal(x.flags.steps, "150");
    assert.equal(x.flags.lr, x.swept.lr);
    assert.equal(x.summary?.steps, 150);
    assert.equal(x.summary?.config.lr, Number(x.swept.lr));
    assert.equal(x.summary?.config.seed, Number(x.swept.seed));
    assert.ok(Number.isFinite(x.summary?.val_loss));
    // each run in its own folder, with its report
    const html = Deno.readTextFileSync(join(straight, "runs", x.id, "report.html"));
    assert.ok(html.includes("<svg"));
  }
  // the table: best val_loss first, printed and written
  const byLoss = [...straightResults].sort((a, b) => a.summary!.val_loss! - b.summary!.val_loss!)
    .map((x) => x.id);
  assert.deepEqual(tableIds(straight), byLoss);
  assert.ok(r.stdout.includes(Deno.readTextFileSync(join(straight, "table.txt")).trim()));
  // the larger lr learns faster in 150 steps
  assert.equal(straightResults.find((x) => x.id === byLoss[0])!.swept.lr, "3e-3");
  // charts: val_loss against lr and seed, and the best runs' loss curves
  for (const f of ["val_loss-by-lr.svg", "val_loss-by-seed.svg", "loss-best.svg"]) {
    assert.ok(Deno.readTextFileSync(join(straight, "charts", f)).startsWith("<svg"), f);
  }
  const html = Deno.readTextFileSync(join(straight, "sweep.html"));
  assert.equal(html.match(/<svg[\s>]/g)?.length, 3);
  assert.equal(html.match(/(src|href)\s*=\s*["']?\s*(https?:)?\/\//gi), null);
  // each id links to its run's report
  for (const id of byLoss) assert.ok(html.includes(`<a href="runs/${id}/report.html">`), id);

  // the same command again: every run is done, nothing starts
  const started = lines(join(straight, "started.jsonl")).length;
  assert.equal(started, 4);
  const again = await sweepCli(["--out", straight, ...GRID, ...FIXED, "--workers", "2"]);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, /4 of 4 runs already done/);
  assert.equal(results(straight).length, 4);
  assert.equal(lines(join(straight, "started.jsonl")).length, 4);
  assert.deepEqual(tableIds(straight), byLoss);
});

Deno.test("sweep: SIGINT after the first result, then the same command, gives the uninterrupted table", async () => {
  assert.equal(straightResults.length, 4, "needs the previous test's sweep");
  const dir = join(tmp, "stopped");
  const args = ["run", "-A", script, "--out", dir, ...GRID, ...FIXED, "--workers", "1"];
  const child = new Deno.Command(Deno.execPath(), {
    args,
    env: { NO_COLOR: "1" },
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const err = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  // stop once the first run has its result and the second has trained a little
  const readAll = (async () => {
    for (;;) {
      const { value, done } = await err.read();
      if (done) break;
      text += value;
    }
  })();
  let sent = false;
  while (!sent) {
    await new Promise((r) => setTimeout(r, 20));
    const done = lines(join(dir, "results.jsonl"));
    const started = lines(join(dir, "started.jsonl"));
    if (done.length >= 1 && started.length >= 2) {
      let log = "";
      try {
        log = Deno.readTextFileSync(join(dir, "logs", `${started[1].id}.log`));
      } catch { /* not yet */ }
      if (/step +\d+\/150/.test(log)) {
        child.kill("SIGINT");
        sent = true;
      }
    }
    if (text.includes("sweep done")) break;
  }
  const status = await child.status;
  await readAll;
  assert.ok(sent, `the sweep ended before it could be stopped: ${text}`);
  assert.equal(status.code, 130, text);
  assert.match(text, /interrupted: \d of 4 runs have a result; run the same command to resume/);
  const partial = results(dir).length;
  assert.ok(partial >= 1 && partial < 4, String(partial));
  const stoppedId = lines(join(dir, "started.jsonl"))[1].id as string;
  assert.match(text, new RegExp(`stopped ${stoppedId} at step \\d+ of 150`));
  // the stopped run saved a checkpoint
  assert.ok([...Deno.readDirSync(join(dir, "runs", stoppedId, "checkpoints"))].length > 0);

  const r = await sweepCli(["--out", dir, ...GRID, ...FIXED, "--workers", "1"]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, new RegExp(`resuming ${stoppedId}`));
  const resumed = results(dir);
  assert.equal(resumed.length, 4);
  assert.deepEqual(tableIds(dir), tableIds(straight));
  const metric = (xs: SweepResult[]) =>
    Object.fromEntries(xs.map((x) => [x.id, [x.summary!.val_loss, x.summary!.final_train_loss]]));
  assert.deepEqual(metric(resumed), metric(straightResults));
  // the first run was not run again
  const started = lines(join(dir, "started.jsonl")).map((l) => l.id);
  assert.equal(started.filter((id) => id === started[0]).length, 1);
});

Deno.test({
  name:
    "sweep: kill -9 of the sweep and its running run halfway, then the same command, gives the uninterrupted table",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    assert.equal(straightResults.length, 4, "needs the first test's sweep");
    const dir = join(tmp, "killed");
    // a checkpoint every 40 updates, so the run killed mid-way resumes from one (--save-every
    // changes no loss and no run id: the table must equal the uninterrupted sweep's)
    const args = [...GRID, ...FIXED, "--save-every", "40", "--workers", "1"];
    // its own process group (setsid), so that one kill -9 takes the sweep and its run, as a
    // lost machine or an OOM kill of the session would
    const child = new Deno.Command("setsid", {
      args: [Deno.execPath(), "run", "-A", script, "--out", dir, ...args],
      env: { NO_COLOR: "1" },
      stdout: "null",
      stderr: "null",
    }).spawn();
    let killedId: string | null = null;
    let ended = false;
    child.status.then(() => (ended = true));
    while (killedId === null && !ended) {
      await new Promise((r) => setTimeout(r, 10));
      const started = lines(join(dir, "started.jsonl"));
      if (lines(join(dir, "results.jsonl")).length < 1 || started.length < 2) continue;
      const id = started[1].id as string;
      let saved = 0;
      try {
        saved = [...Deno.readDirSync(join(dir, "runs", id, "checkpoints"))]
          .filter((e) => e.name.endsWith(".safetensors")).length;
      } catch { /* not yet */ }
      if (saved > 0) {
        Deno.kill(-child.pid, "SIGKILL");
        killedId = id;
      }
    }
    const status = await child.status;
    assert.ok(killedId !== null, "the sweep ended before it could be killed");
    assert.equal(status.signal, "SIGKILL");
    const partial = results(dir);
    assert.ok(partial.length >= 1 && partial.length < 4, String(partial.length));
    assert.ok(!partial.some((x) => x.id === killedId));
    // killed mid-way: no summary, its lock left by a dead process
    assert.ok(!exists(join(dir, "runs", killedId, "summary.json")));
    assert.ok(exists(join(dir, "runs", killedId, ".lock")));

    const r = await sweepCli(["--out", dir, ...args]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, new RegExp(`resuming ${killedId}`));
    const resumed = results(dir);
    assert.equal(resumed.length, 4);
    assert.deepEqual(tableIds(dir), tableIds(straight));
    const metric = (xs: SweepResult[]) =>
      Object.fromEntries(
        xs.map((x) => [x.id, [x.status, x.summary!.val_loss, x.summary!.final_train_loss]]),
      );
    assert.deepEqual(metric(resumed), metric(straightResults));
    // table.txt, every column but the wall time
    const noWall = (d: string) => {
      const rows = Deno.readTextFileSync(join(d, "table.txt")).trim().split("\n")
        .map((l) => l.trim().split(/\s+/));
      const wall = rows[0].indexOf("wall_s");
      return rows.map((r) => r.filter((_, i) => i !== wall).join(" "));
    };
    assert.deepEqual(noWall(dir), noWall(straight));
    // the killed run went on from its checkpoint, and the first run was not run again
    const killedSummary = resumed.find((x) => x.id === killedId)!.summary!;
    assert.ok(killedSummary.resumed_from !== null, "the killed run started over");
    const started = lines(join(dir, "started.jsonl")).map((l) => l.id);
    assert.equal(started.filter((id) => id === started[0]).length, 1);
  },
});

Deno.test("sweep: a diverged run is a result, ranked last", async () => {
  const dir = join(tmp, "diverge");
  const r = await sweepCli([
    "--out",
    dir,
    "--grid",
    "lr=1e-3,1e6",
    "--model",
    model,
    "--steps",
    "20",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--eval-batches",
    "2",
  ]); // deno-fmt-ignore
  assert.equal(r.code, 0, r.stderr);
  const rs = results(dir);
  assert.equal(rs.length, 2);
  const bad = rs.find((x) => x.swept.lr === "1e6")!;
  assert.equal(bad.status, "diverged");
  assert.equal(bad.summary?.diverged, true);
  assert.match(bad.error!, /diverged/);
  assert.ok(bad.summary!.steps < 20);
  assert.equal(rs.find((x) => x.swept.lr === "1e-3")!.status, "done");
  const good = rs.find((x) => x.swept.lr === "1e-3")!;
  assert.deepEqual(tableIds(dir), [good.id, bad.id]);
  // without --threads each of the 1 workers gets all the cores
  assert.equal(good.summary?.config.threads, navigator.hardwareConcurrency);

  // a sweep killed outright (no ledger line for either run): the diverged run's summary is
  // taken from its folder, the other run, killed before its first checkpoint, starts over
  Deno.removeSync(join(dir, "results.jsonl"));
  const goodDir = join(dir, "runs", good.id);
  Deno.removeSync(join(goodDir, "checkpoints"), { recursive: true });
  Deno.removeSync(join(goodDir, "summary.json"));
  const again = await sweepCli([
    "--out",
    dir,
    "--grid",
    "lr=1e-3,1e6",
    "--model",
    model,
    "--steps",
    "20",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--eval-batches",
    "2",
  ]); // deno-fmt-ignore
  assert.equal(again.code, 0, again.stderr);
  assert.match(
    again.stderr,
    new RegExp(`restarting ${good.id} \\(stopped before its first checkpoint\\)`),
  );
  assert.doesNotMatch(again.stderr, new RegExp(`(starting|resuming) ${bad.id}`));
  const rs2 = results(dir);
  assert.deepEqual(rs2.map((x) => [x.id, x.status]).sort(), rs.map((x) => [x.id, x.status]).sort());
  assert.equal(
    rs2.find((x) => x.id === good.id)!.summary!.val_loss,
    good.summary!.val_loss,
  );
});

Deno.test("sweep: bad flags and another grid on a sweep folder are one-line errors", async () => {
  const out = join(tmp, "bad");
  const cases: [string[], RegExp][] = [
    [["--grid", "lr=abc"], /^--lr abc: must be a number .*\(in the run lr=abc\)$/],
    [["--grid", "nope=1,2"], /^--grid nope: not a pretraining option/],
    [["--grid", "out=a,b"], /^--grid out: set by the sweep/],
    [["--grid", "lr=1e-3", "--lr", "1e-3"], /^--lr: both fixed and swept/],
    [["--grid", "lr"], /^--grid lr: write --grid KEY=V1,V2/],
    [["--grid", "lr=1e-3,"], /an empty value/],
    [["--grid", "lr=1e-3", "--grid", "lr=2e-3"], /^--grid lr: given twice/],
    [["--grid", "lr=1e-3", "--random", "0"], /^--random 0: must be an integer ≥ 1$/],
    [["--grid", "lr=1e-3", "--workers", "x"], /^--workers x: must be an integer ≥ 1$/],
    [["--grid", "optimizer=adamw,nadam"], /^--optimizer nadam: .*adamw.*\(in the run/],
    [["--grid", "lr=1e-3", "--bogus", "1"], /^--bogus: unknown flag/],
    [[], /^--grid: nothing to sweep/],
  ];
  for (const [args, want] of cases) {
    let msg = "";
    try {
      const o = parseSweepArgs(["--out", out, ...args, "--model", model, "--seq-len", "32"]);
      if (o !== "help") planSweep(o);
    } catch (e) {
      assert.ok(e instanceof UsageError, `${args.join(" ")}: ${e}`);
      msg = e.message;
    }
    assert.match(msg, want, args.join(" "));
    assert.ok(!msg.includes("\n"));
  }
  assert.throws(() => parseSweepArgs(["--grid", "lr=1"]), /^UsageError: --out: required/);

  // through the CLI: exit 2, one line, nothing written
  const r = await sweepCli(["--out", out, "--grid", "lr=abc", "--model", model]);
  assert.equal(r.code, 2);
  assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  assert.match(r.stderr, /^error: --lr abc/);
  assert.equal(r.stdout, "");
  assert.throws(() => Deno.statSync(out), Deno.errors.NotFound);
  const m = await sweepCli(["--out", out, "--grid", "lr=1e-3", "--metric", "acc"]);
  assert.equal(m.code, 2);
  assert.match(m.stderr, /^error: --metric acc: must be one of val_loss/);

  // another grid on an existing sweep: refused, its files untouched
  assert.ok(straightResults.length === 4, "needs the first test's sweep");
  const before = Deno.readTextFileSync(join(straight, "results.jsonl"));
  const other = await sweepCli(["--out", straight, "--grid", "lr=1e-3", ...FIXED]);
  assert.equal(other.code, 2);
  assert.match(
    other.stderr,
    /^error: --out .*straight: holds another sweep \(--grid lr=1e-3,3e-3 --grid seed=1,2 .*\); give the same/,
  );
  assert.equal(other.stderr.trim().split("\n").length, 1);
  assert.equal(Deno.readTextFileSync(join(straight, "results.jsonl")), before);
  // a folder of the user's that is not a sweep
  const mine = join(tmp, "mine");
  Deno.mkdirSync(mine);
  Deno.writeTextFileSync(join(mine, "notes.txt"), "mine");
  const n = await sweepCli(["--out", mine, "--grid", "lr=1e-3", ...FIXED]);
  assert.equal(n.code, 2);
  assert.match(n.stderr, /^error: --out .*mine: exists and holds no sweep/);
  assert.deepEqual([...Deno.readDirSync(mine)].map((e) => e.name), ["notes.txt"]);
});

Deno.test("sweep: --random draws a fixed subset of the grid for a seed", () => {
  const opts = (seed: number) => ({
    out: join(tmp, "random"),
    grid: { lr: ["1e-3", "2e-3", "3e-3"], seed: [1, 2, 3] },
    fixed: { model, "seq-len": 32 },
    random: 4,
    sampleSeed: seed,
  });
  const a = planSweep(opts(7)).runs.map((r) => r.id);
  assert.equal(a.length, 4);
  assert.equal(new Set(a).size, 4);
  assert.deepEqual(planSweep(opts(7)).runs.map((r) => r.id), a);
  const all = planSweep({ ...opts(7), random: null }).runs.map((r) => r.id);
  assert.equal(all.length, 9);
  for (const id of a) assert.ok(all.includes(id), id);
  assert.notDeepEqual(planSweep(opts(8)).runs.map((r) => r.id), a);
  // more than the grid: every run once
  assert.equal(planSweep({ ...opts(7), random: 50 }).runs.length, 9);
  // 1e-3 and 0.001 are the same run
  const same =
    planSweep({ out: tmp, grid: { lr: ["1e-3"] }, fixed: { model, seqLen: 32 } }).runs[0];
  const also =
    planSweep({ out: tmp, grid: { lr: ["0.001"] }, fixed: { model, seqLen: 32 } }).runs[0];
  assert.equal(same.id.split("_").at(-1), also.id.split("_").at(-1));
});

Deno.test("sweep: the pretraining CLI of the package the sweep was loaded from", () => {
  assert.equal(
    pretrainScript(new URL("../lib/sweep.ts", import.meta.url).href),
    new URL("../examples/pretrain.ts", import.meta.url).pathname,
  );
  assert.equal(
    pretrainScript("https://jsr.io/@qgalore/qgalore/0.2.0/lib/sweep.ts"),
    "jsr:@qgalore/qgalore@0.2.0/pretrain",
  );
  assert.equal(
    pretrainScript("http://localhost:8000/pkg/lib/sweep.ts"),
    "http://localhost:8000/pkg/examples/pretrain.ts",
  );
});
