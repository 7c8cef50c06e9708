/**
 * `--resume` after a real `kill -9` (and after Ctrl-C) continues the run update for update:
 * the resumed run's metrics.jsonl equals the uninterrupted run's, for every optimizer, fused
 * and not, with gradient accumulation and clipping. Plus the refusals of a resume.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { OPTIMIZERS, PROJECTED_OPTIMIZERS } from "../lib/options.ts";
import { Rng } from "../lib/rng.ts";
import { listCheckpoints, readRunRecord } from "../lib/checkpoints.ts";
import { cli, metrics, script, stopAfterFirstStep, summary, TINY_MODEL } from "./pretrain_cli.ts";

// --clip 0.5 is below the tiny model's gradient norms (about 2): clipping scales every update.
const BASE = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "2", "--clip", "0.5"];
/** Updates of each run; long enough that a kill always lands well before the end. */
const STEPS = 40;

function checkpointSteps(dir: string): number[] {
  return [...Deno.readDirSync(join(dir, "checkpoints"))]
    .map((e) => /^step-(\d+)\.safetensors$/.exec(e.name)?.[1])
    .filter((s) => s !== undefined).map(Number).sort((a, b) => a - b);
}

/**
 * Polls until the run in `dir` has written the records of `step` updates and has a
 * checkpoint, or its process ended.
 */
async function waitForStep(dir: string, step: number, ended: () => boolean): Promise<void> {
  while (!ended()) {
    try {
      const done = Deno.readTextFileSync(join(dir, "metrics.jsonl")).split("\n")
        .filter((l) => l.startsWith('{"type":"step"')).length;
      if (done >= step && checkpointSteps(dir).length > 0) return;
    } catch { /* the files appear as the run starts */ }
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** The cases: every optimizer fused (one micro-batch) and unfused with 2 micro-batches. */
const CASES: { name: string; args: string[] }[] = OPTIMIZERS.flatMap((o) => {
  const projected = PROJECTED_OPTIMIZERS.includes(o)
    ? ["--rank", "8", "--update-gap", "3"] // projector refreshes before and after the kill
    : [];
  return [
    { name: `${o} fused`, args: ["--optimizer", o, ...projected, "--fused", "on"] },
    {
      name: `${o} unfused, grad-accum 2`,
      args: ["--optimizer", o, ...projected, "--fused", "off", "--grad-accum", "2"],
    },
  ];
});

// The kill steps are random but reproducible: QG_RESUME_SEED picks another draw.
const SEED = Number(Deno.env.get("QG_RESUME_SEED") ?? 20261202);

Deno.test({
  name: `resume: kill -9 at a random step, then --resume, equals the uninterrupted run (${
    OPTIMIZERS.join(", ")
  }; fused and grad-accum 2; clipping; seed ${SEED})`,
  sanitizeResources: false,
  fn: async () => {
    const rng = new Rng(SEED);
    let dropped = 0;
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-resume-" });
    try {
      const model = join(dir, "tiny.json");
      Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
      for (const [i, c] of CASES.entries()) {
        // an evaluation every 3 updates: some fall between the newest checkpoint and the kill
        const args = [
          ...BASE,
          "--model",
          model,
          "--steps",
          String(STEPS),
          "--eval-every",
          "3",
          ...c.args,
        ];
        const whole = join(dir, `whole-${i}`);
        const killed = join(dir, `killed-${i}`);
        // SIGKILL once this many updates are done; odd, so that the newest checkpoint (every 2)
        // is older than the records already written
        const kill = 3 + 2 * rng.int(STEPS / 8);
        console.log(`${c.name}: kill -9 after ${kill} updates`);

        const ref = await cli([...args, "--save-every", "off", "--out", whole]);
        assert.equal(ref.code, 0, ref.stderr);

        // a checkpoint every 2 updates: slow enough to be killed mid-way, and the kill often
        // lands after metrics.jsonl got records past the newest checkpoint (to be dropped)
        const child = new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", script, ...args, "--save-every", "2", "--out", killed],
          env: { NO_COLOR: "1" },
          stdout: "null",
          stderr: "null",
        }).spawn();
        let ended = false;
        const status = child.status.then((s) => (ended = true, s));
        await waitForStep(killed, kill, () => ended);
        if (!ended) child.kill("SIGKILL");
        const st = await status;
        assert.equal(st.signal, "SIGKILL", `${c.name}: the run ended before the kill`);
        const before = metrics(killed).filter((r) => r.type === "step").length;
        assert.ok(before < STEPS, `${c.name}: killed after ${before} updates`);
        // the records written past the newest checkpoint: the resume must drop them
        const newest = listCheckpoints(killed)[0];
        const kept = readRunRecord(newest.path).metrics_lines;
        const written = Deno.readTextFileSync(join(killed, "metrics.jsonl")).split("\n")
          .filter((l) => l.startsWith("{")).length;
        assert.ok(written >= kept, `${c.name}: ${written} records, checkpoint counts ${kept}`);
        dropped += written - kept;

        const resumed = await cli(["--resume", killed, "--save-every", "off"]);
        assert.equal(resumed.code, 0, resumed.stderr);
        // nothing a killed save left behind stays
        assert.deepEqual(
          [...Deno.readDirSync(join(killed, "checkpoints"))].filter((e) => e.name.startsWith(".")),
          [],
        );
        const s = summary(killed);
        const from = Number(/step-(\d+)/.exec(s.resumed_from ?? "")?.[1]);
        console.log(`  killed after ${before} updates; resumed from step ${from}`);
        assert.ok(from <= before && from >= 1);
        assert.match(resumed.stderr, new RegExp(`resumed from .*step-0*${from}\\.safetensors`));
        // every step and evaluation record, bit for bit (the JSON of the same doubles)
        assert.deepEqual(metrics(killed), metrics(whole), c.name);
        const evals = metrics(whole).filter((m) => m.type === "eval").length;
        assert.equal(evals, 1 + Math.ceil(STEPS / 3)); // at 0, every 3, and the final one
        const w = summary(whole);
        assert.equal(s.steps, STEPS);
        assert.equal(s.val_loss, w.val_loss);
        assert.equal(s.initial_val_loss, w.initial_val_loss);
        assert.equal(s.final_train_loss, w.final_train_loss);
        assert.deepEqual(s.gaps, w.gaps);
      }
      // the kills landed after records the checkpoints did not count, which were dropped
      assert.ok(dropped > 0, "no kill landed past a checkpoint's records");
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test("resume: Ctrl-C saves a checkpoint and --resume continues identically", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "qgalore-resume-" });
  try {
    const model = join(dir, "tiny.json");
    Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
    const steps = 400; // far more than run before the signal arrives
    const args = [
      ...BASE,
      "--model",
      model,
      "--optimizer",
      "qgalore",
      "--rank",
      "8",
      "--update-gap",
      "3",
      "--steps",
      String(steps),
      "--eval-every",
      "50",
      // no periodic checkpoint: the one resumed from is Ctrl-C's
      "--save-every",
      "off",
    ];
    const stopped = join(dir, "stopped");
    const { code, stderr: err } = await stopAfterFirstStep([...args, "--out", stopped], "SIGINT");
    assert.equal(code, 130, err);
    const first = summary(stopped);
    assert.equal(first.interrupted, true);
    const k = first.steps;
    assert.ok(k >= 1 && k < steps, `stopped after ${k} updates`);
    const name = `step-${String(k).padStart(8, "0")}.safetensors`;
    assert.equal(first.checkpoint, join(stopped, "checkpoints", name));
    assert.deepEqual(checkpointSteps(stopped), [k]);
    // the stopped run evaluated at its end; the uninterrupted one did not at that step
    assert.equal(metrics(stopped).at(-1)?.type, "eval");

    const resumed = await cli(["--resume", stopped]);
    assert.equal(resumed.code, 0, resumed.stderr);
    const whole = join(dir, "whole");
    const ref = await cli([...args, "--out", whole]);
    assert.equal(ref.code, 0, ref.stderr);
    assert.deepEqual(metrics(stopped), metrics(whole));
    const s = summary(stopped);
    assert.equal(s.val_loss, summary(whole).val_loss);
    assert.equal(s.resumed_from, join(stopped, "checkpoints", name));
    assert.equal(s.interrupted, false);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("resume: an invalid newest checkpoint is skipped with a notice and set aside", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "qgalore-resume-" });
  try {
    const model = join(dir, "tiny.json");
    Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
    const args = [...BASE, "--model", model, "--optimizer", "galore", "--rank", "8"];
    // a run stopped at 9 with checkpoints 6 and 9; then one byte of 9's payload flips
    const cut = join(dir, "cut");
    assert.equal((await cli([...args, "--steps", "9", "--save-every", "3", "--out", cut])).code, 0);
    const newest = join(cut, "checkpoints", "step-00000009.safetensors");
    const bytes = Deno.readFileSync(newest);
    bytes[bytes.length - 100] ^= 0x40;
    Deno.writeFileSync(newest, bytes);
    // and a record torn by the kill at the end of metrics.jsonl
    Deno.writeTextFileSync(join(cut, "metrics.jsonl"), '{"type":"step","ste', { append: true });
    const r = await cli(["--resume", cut, "--steps", "12"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stderr,
      /notice: skipped .*step-00000009\.safetensors: .*renamed to .*\.invalid/,
    );
    assert.ok(Deno.statSync(`${newest}.invalid`).isFile);
    const s = summary(cut);
    assert.equal(s.resumed_from, join(cut, "checkpoints", "step-00000006.safetensors"));
    assert.equal(s.steps, 12);
    // a run planned for 9 and extended keeps the 9-step schedule: compare its updates up to 9
    // with a 9-step run's, and the rest follows the floor learning rate
    const nine = join(dir, "nine");
    assert.equal(
      (await cli([...args, "--steps", "9", "--save-every", "off", "--out", nine])).code,
      0,
    );
    const steps = metrics(cut).filter((m) => m.type === "step");
    assert.deepEqual(steps.slice(0, 9), metrics(nine).filter((m) => m.type === "step"));
    assert.equal(steps.length, 12);
    const floor = steps[8].lr as number;
    for (const m of steps.slice(9)) assert.equal(m.lr, floor);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
