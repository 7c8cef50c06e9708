/**
 * A run's checkpoints: --save-every parsing, --keep pruning only the run's own files, the
 * last good checkpoint of a diverged run, the sampler's and the divergence watch's state, and
 * the one-line refusals of --resume (changed flag, changed data, no checkpoints, finished).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { checkInterval } from "../lib/options.ts";
import { parsePretrainArgs } from "../lib/cli.ts";
import {
  checkpointName,
  dataFingerprint,
  isCorrupt,
  listCheckpoints,
  pruneCheckpoints,
  readRunRecord,
  setAside,
} from "../lib/checkpoints.ts";
import { TextDataset } from "../lib/data.ts";
import { checkOut, lockRun, openOut } from "../lib/run_files.ts";
import type { TrainEngine } from "../lib/run_types.ts";
import { DivergedError, type Summary } from "../lib/summary.ts";
import { train } from "../lib/trainer.ts";
import { Engine, type EngineConfig, EngineError, ErrorCode } from "../ffi/engine.ts";
import { DivergenceWatch } from "../lib/diverge.ts";
import { UsageError } from "../lib/errors.ts";
import { Rng } from "../lib/rng.ts";
import {
  type Cli,
  cli,
  metrics,
  script,
  stopAfterFirstStep,
  summary,
  TINY_MODEL,
} from "./pretrain_cli.ts";

const dec = new TextDecoder();

const BASE = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "2"];

/** Exit 2 and exactly one stderr line, `error: …` with every part. */
function oneLineError(r: Cli, ...parts: string[]): string {
  assert.equal(r.code, 2, r.stderr);
  const lines = r.stderr.trim().split("\n").filter((l) => l.startsWith("error:"));
  assert.equal(lines.length, 1, r.stderr);
  assert.doesNotMatch(r.stderr, /^\s+at |panicked/m);
  for (const p of parts) assert.ok(lines[0].includes(p), `${lines[0]} lacks ${p}`);
  return lines[0];
}

function names(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

/** Copies a run folder (files and one level of subfolders). */
function copyDir(from: string, to: string): void {
  Deno.mkdirSync(to);
  for (const e of Deno.readDirSync(from)) {
    if (e.isDirectory) copyDir(join(from, e.name), join(to, e.name));
    else Deno.copyFileSync(join(from, e.name), join(to, e.name));
  }
}

function withTiny(f: (dir: string, model: string) => Promise<void>): () => Promise<void> {
  return async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ckpt-" });
    try {
      const model = join(dir, "tiny.json");
      Deno.writeTextFileSync(model, JSON.stringify(TINY_MODEL));
      await f(dir, model);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  };
}

Deno.test("--save-every: updates, wall time, off; anything else is one line naming the flag", () => {
  assert.deepEqual(checkInterval("500"), { steps: 500 });
  assert.deepEqual(checkInterval(7), { steps: 7 });
  assert.deepEqual(checkInterval("30s"), { seconds: 30 });
  assert.deepEqual(checkInterval("10m"), { seconds: 600 });
  assert.deepEqual(checkInterval("1.5h"), { seconds: 5400 });
  assert.equal(checkInterval("off"), null);
  assert.equal(checkInterval("0"), null);
  assert.equal(checkInterval(0), null);
  for (const bad of ["-1", "1e3", "10x", "", "m", "0s", "1e40", "3000000000", "2.5", "on"]) {
    assert.throws(() => checkInterval(bad), (e: unknown) => {
      assert.ok(e instanceof UsageError);
      assert.ok(e.message.startsWith(`--save-every ${bad || '""'}: must be`), e.message);
      assert.match(e.message, /30s, 10m, 2h/);
      return true;
    });
  }
  assert.throws(() => checkInterval(1.5), /--save-every 1.5: must be/);
  // from the command line, with --keep's range
  assert.throws(() => parsePretrainArgs(["--save-every", "10x"]), /^UsageError: --save-every 10x:/);
  assert.throws(() => parsePretrainArgs(["--keep", "0"]), /--keep 0: must be an integer ≥ 1/);
  const ok = parsePretrainArgs(["--save-every", "2h", "--keep", "5"]);
  assert.ok(ok !== "help" && ok.saveEvery === "2h" && ok.keep === 5);
  // a resume keeps only what was given: everything else comes from the checkpoint
  assert.deepEqual(parsePretrainArgs(["--resume", "runs/x", "--steps", "900"]), {
    resume: "runs/x",
    steps: 900,
    json: false,
  });
});

Deno.test("Rng.state / Rng.restore: the sequence continues exactly; bad states are refused", () => {
  const a = new Rng(12345);
  for (let i = 0; i < 100; i++) a.nextU32();
  const b = Rng.restore(a.state());
  const next = Array.from({ length: 50 }, () => a.nextU32());
  assert.deepEqual(Array.from({ length: 50 }, () => b.nextU32()), next);
  // a fresh generator of the same seed is elsewhere in the sequence
  assert.notDeepEqual(Array.from({ length: 50 }, () => new Rng(12345).nextU32()), next);
  for (const bad of [[0, 0, 0, 0], [1, 2, 3], [1, 2, 3, 2 ** 32], [1, 2, 3, -1], [1, 2, 3, 0.5]]) {
    assert.throws(() => Rng.restore(bad), RangeError);
  }
});

Deno.test("DivergenceWatch.state / restore: a restored watch raises the alarm at the same step", () => {
  const losses = [5, 4.8, 4.7, 4.6, 4.5, 9, 12, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 70];
  const run = (w: DivergenceWatch, from: number): number => {
    for (let i = from; i < losses.length; i++) if (w.step(losses[i], 1) !== null) return i;
    return -1;
  };
  const whole = run(new DivergenceWatch(), 0);
  assert.ok(whole > 5);
  for (let cut = 1; cut < whole; cut++) {
    const w = new DivergenceWatch();
    for (let i = 0; i < cut; i++) w.step(losses[i], 1);
    // through JSON, as a checkpoint carries it
    const restored = DivergenceWatch.restore(JSON.parse(JSON.stringify(w.state())));
    assert.deepEqual(restored.state(), w.state());
    assert.equal(restored.bestAt, Math.min(cut, 5)); // the loss's best: the 5th update
    assert.equal(run(restored, cut), whole, `cut at ${cut}`);
  }
  assert.throws(() => DivergenceWatch.restore({ recent: "x" } as never), RangeError);
});

Deno.test("pruneCheckpoints: keeps the newest K and the protected one; never another name", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const ck = join(dir, "checkpoints");
    Deno.mkdirSync(ck);
    for (const s of [1, 2, 3, 4, 5]) Deno.writeTextFileSync(join(ck, checkpointName(s)), "x");
    const foreign = ["notes.txt", "step-6.safetensors", "step-00000007.safetensors.bak"];
    for (const f of foreign) Deno.writeTextFileSync(join(ck, f), "mine");
    Deno.mkdirSync(join(ck, checkpointName(9)));
    const removed = pruneCheckpoints(dir, 2, join(ck, checkpointName(1)));
    assert.deepEqual(removed.sort(), [2, 3].map((s) => join(ck, checkpointName(s))));
    assert.deepEqual(
      names(ck),
      [...foreign, ...[1, 4, 5, 9].map(checkpointName)].sort(),
    );
    assert.deepEqual(listCheckpoints(dir).map((c) => c.step), [5, 4, 1]);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test(
  "--keep prunes only the run's own checkpoints; a run without --out saves none",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    const ck = join(out, "checkpoints");
    Deno.mkdirSync(ck, { recursive: true });
    const target = join(dir, "user-file");
    Deno.writeTextFileSync(target, "keep me");
    Deno.writeTextFileSync(join(ck, "notes.txt"), "mine");
    Deno.writeTextFileSync(join(ck, "step-3.safetensors"), "mine");
    Deno.symlinkSync(target, join(ck, checkpointName(1)));
    const r = await cli([
      ...BASE,
      "--model",
      model,
      "--steps",
      "7",
      "--save-every",
      "2",
      "--keep",
      "2",
      "--out",
      out,
      "--json",
    ]);
    assert.equal(r.code, 0, r.stderr);
    // saved at 2, 4, 6 and at the end (7); the two newest are kept
    assert.deepEqual(
      names(ck),
      [checkpointName(1), checkpointName(6), checkpointName(7), "notes.txt", "step-3.safetensors"]
        .sort(),
    );
    assert.ok(Deno.lstatSync(join(ck, checkpointName(1))).isSymlink);
    assert.equal(Deno.readTextFileSync(target), "keep me");
    const s: Summary = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
    assert.equal(s.checkpoint, join(ck, checkpointName(7)));
    assert.equal(s.last_good_checkpoint, s.checkpoint);
    assert.equal(s.resumed_from, null);
    assert.equal(s.config.keep, 2);

    // a run with out null writes nothing, whatever --save-every says
    const { train } = await import("../lib/trainer.ts");
    const api = await train({
      model,
      steps: 2,
      batchSize: 2,
      seqLen: 16,
      evalBatches: 1,
      saveEvery: 1,
      out: null,
      quiet: true,
    });
    assert.equal(api.checkpoint, null);
    assert.equal(api.steps, 2);
  }),
);

Deno.test(
  "TrainHooks.signal stops the run with a checkpoint, and train({ resume }) continues it",
  withTiny(async (dir, model) => {
    const { train } = await import("../lib/trainer.ts");
    const opts = {
      model,
      optimizer: "galore",
      rank: 8,
      steps: 12,
      batchSize: 2,
      seqLen: 16,
      evalBatches: 1,
      saveEvery: "off",
      quiet: true,
    };
    const stop = new AbortController();
    const losses: number[] = [];
    const first = await train({ ...opts, out: join(dir, "a") }, {
      signal: stop.signal,
      onStep: (r) => {
        losses.push(r.loss);
        if (r.step === 5) stop.abort();
      },
    });
    assert.equal(first.interrupted, true);
    assert.equal(first.steps, 5);
    assert.equal(first.checkpoint, join(dir, "a", "checkpoints", checkpointName(5)));
    const rest = await train({ resume: join(dir, "a"), quiet: true }, {
      onStep: (r) => void losses.push(r.loss),
    });
    assert.equal(rest.steps, 12);
    assert.equal(rest.resumed_from, first.checkpoint);
    const whole: number[] = [];
    const ref = await train({ ...opts, out: null }, { onStep: (r) => void whole.push(r.loss) });
    assert.deepEqual(losses, whole);
    assert.equal(rest.val_loss, ref.val_loss);
  }),
);

Deno.test(
  "divergence: the last good checkpoint is kept and named; no diverged state is saved",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    // warmup to lr 1 (200x the default): healthy for a few updates, then it diverges
    const args = [...BASE, "--model", model, "--steps", "60", "--warmup", "20", "--clip", "0"];
    const r = await cli([...args, "--lr", "1", "--save-every", "1", "--out", out, "--json"]);
    oneLineError(r, "training diverged", "--lr 1");
    const s: Summary = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
    assert.equal(s.diverged, true);
    const good = s.last_good_checkpoint!;
    assert.ok(good !== null);
    assert.match(r.stderr, new RegExp(`last good checkpoint: ${good}`));
    const goodStep = Number(/step-(\d+)/.exec(good)![1]);
    assert.ok(goodStep >= 2 && goodStep < s.steps, `${goodStep} of ${s.steps}`);
    // the newest a resume can find: later ones were renamed …diverged (or never written)
    assert.equal(listCheckpoints(out)[0].step, goodStep);
    assert.equal(s.checkpoint, good);
    const later = names(join(out, "checkpoints")).filter((n) => n.endsWith(".diverged"));
    for (const n of later) assert.ok(Number(/step-(\d+)/.exec(n)![1]) > goodStep, n);
    console.log(`diverged at ${s.steps}; last good ${goodStep}; set aside ${later.length}`);

    // the same options would diverge the same way: said, before anything runs
    const copy = join(dir, "copy");
    copyDir(out, copy);
    const same = await cli(["--resume", copy, "--steps", String(goodStep + 1)]);
    assert.equal(same.code, 0, same.stderr);
    assert.match(same.stderr, /notice: this run diverged at step \d+; resumed with the same/);
    // a resume starts from it, here with a learning rate that trains
    const again = await cli(["--resume", out, "--lr", "0.005", "--steps", "30"]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /notice: --lr 0.005 replaces the run's peak 1 from step \d+ on/);
    const t = summary(out);
    assert.equal(t.resumed_from, good);
    assert.equal(t.steps, 30);
    assert.equal(t.diverged, false);
  }),
);

Deno.test(
  "--resume refuses: a changed flag, changed data, no checkpoints, a finished run",
  withTiny(async (dir, model) => {
    const data = join(dir, "corpus.txt");
    Deno.writeTextFileSync(data, "the quick brown fox jumps over the lazy dog. ".repeat(200));
    const out = join(dir, "run");
    const env = { QGALORE_CACHE: join(dir, "cache") };
    const args = [...BASE, "--model", model, "--data", data, "--steps", "6", "--save-every", "2"];
    assert.equal((await cli([...args, "--out", out], env)).code, 0);

    for (
      const [flag, value, has] of [
        ["--seed", "5", "has 0"],
        ["--optimizer", "galore", "has adamw"],
        ["--batch-size", "4", "has 2"],
        ["--clip", "0", "has 1"],
        ["--precision", "bf16", "has auto"],
      ]
    ) {
      const r = await cli(["--resume", out, flag, value, "--steps", "9"], env);
      oneLineError(r, `${flag} ${value}: cannot change when resuming`, has, "--steps, --lr");
    }
    // the same value as the run's is not a change
    // (nor is the device `auto` became)
    const same = await cli(
      ["--resume", out, "--seed", "0", "--device", "cpu", "--steps", "8"],
      env,
    );
    assert.equal(same.code, 0, same.stderr);
    assert.equal(summary(out).steps, 8);

    oneLineError(
      await cli(["--resume", out, "--out", join(dir, "elsewhere")], env),
      "--out",
      "not with --resume",
    );
    oneLineError(
      await cli(["--resume", out], env),
      `--resume ${out}: the run finished all its 8 steps; give --steps N > 8`,
    );
    oneLineError(
      await cli(["--resume", out, "--steps", "5"], env),
      "--steps 5: the checkpoint is already at step 8",
    );

    Deno.writeTextFileSync(data, "a different text entirely. ".repeat(300));
    oneLineError(
      await cli(["--resume", out, "--steps", "12"], env),
      `--resume ${out}: the data changed since the checkpoint (--data ${data}`,
    );
    assert.equal(summary(out).steps, 8); // nothing was touched

    // a new run never writes into a folder with another run's checkpoints: --resume would
    // find theirs
    const other = join(dir, "other");
    Deno.mkdirSync(join(other, "checkpoints"), { recursive: true });
    Deno.writeTextFileSync(join(other, "checkpoints", "step-00000004.safetensors"), "x");
    oneLineError(
      await cli([...args, "--out", other], env),
      `--out ${other}: holds an earlier run; continue it with --resume ${other}`,
    );

    const empty = join(dir, "empty");
    Deno.mkdirSync(empty);
    oneLineError(await cli(["--resume", empty], env), `--resume ${empty}: no checkpoints in`);
    oneLineError(await cli(["--resume", join(dir, "nope")], env), "not found");
    oneLineError(await cli(["--resume", data], env), "not a folder");
  }),
);

const QGALORE = ["--optimizer", "qgalore", "--rank", "8", "--update-gap", "3"];

Deno.test(
  "--threads: stored in the run record; a resume uses it (bit-exact), accepts it, and allows another with a notice",
  withTiny(async (dir, model) => {
    const args = [...BASE, ...QGALORE, "--model", model, "--steps", "8", "--threads", "1"];
    const whole = join(dir, "whole");
    assert.equal((await cli([...args, "--out", whole, "--save-every", "off"])).code, 0);
    // as if killed after update 4: the newer checkpoints gone
    const killedAt4 = async (out: string): Promise<void> => {
      const first = await cli([...args, "--out", out, "--save-every", "2", "--keep", "9"]);
      assert.equal(first.code, 0, first.stderr);
      for (const step of [6, 8]) Deno.removeSync(join(out, "checkpoints", checkpointName(step)));
    };
    const run = join(dir, "run");
    await killedAt4(run);
    const ckpt = join(run, "checkpoints", checkpointName(4));
    assert.equal(readRunRecord(ckpt).engine.threads, 1);
    // no --threads: the run's 1, not this machine's default; the losses equal the whole run's
    const r = await cli(["--resume", run, "--save-every", "off"]);
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stderr, /threads/);
    assert.deepEqual(metrics(run), metrics(whole));
    // the same count given is no change; another is allowed, with a notice
    const again = join(dir, "again");
    await killedAt4(again);
    const same = await cli(["--resume", again, "--steps", "6", "--threads", "1"]);
    assert.equal(same.code, 0, same.stderr);
    assert.doesNotMatch(same.stderr, /threads/);
    const other = await cli(["--resume", again, "--steps", "8", "--threads", "2"]);
    assert.equal(other.code, 0, other.stderr);
    assert.match(
      other.stderr,
      /notice: --threads 2 replaces the run's 1: the last bits of the losses will differ/,
    );
    assert.equal(readRunRecord(join(again, "checkpoints", checkpointName(8))).engine.threads, 2);
  }),
);

Deno.test(
  "paths are stored absolute: resume from another working directory; moved data is accepted, other data refused",
  withTiny(async (dir, model) => {
    const a = join(dir, "a");
    Deno.mkdirSync(a);
    const text = "the quick brown fox jumps over the lazy dog. ".repeat(200);
    Deno.writeTextFileSync(join(a, "corpus.txt"), text);
    const env = { QGALORE_CACHE: join(dir, "cache") };
    const args = [...BASE, "--model", model, "--steps", "4", "--save-every", "2"];
    const run = (cwd: string, more: string[]) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", script, ...args, ...more],
        env: { NO_COLOR: "1", ...env },
        cwd,
      }).output();
    const first = await run(a, ["--data", "corpus.txt", "--out", "run"]);
    assert.equal(first.code, 0, dec.decode(first.stderr));
    const record = readRunRecord(join(a, "run", "checkpoints", checkpointName(4)));
    assert.equal(record.options.data, join(a, "corpus.txt"));
    assert.equal(record.options.out, join(a, "run"));
    // from another folder, by its relative name: the record's absolute path
    const b = join(dir, "b");
    Deno.mkdirSync(b);
    const r = await run(b, ["--resume", "../a/run", "--steps", "6"]);
    assert.equal(r.code, 0, dec.decode(r.stderr));
    assert.equal(summary(join(a, "run")).steps, 6);
    // the same file named relative to here is no change
    const same = await run(b, [
      "--resume",
      "../a/run",
      "--data",
      "../a/corpus.txt",
      "--steps",
      "7",
    ]);
    assert.equal(same.code, 0, dec.decode(same.stderr));
    // moved: the same tokens elsewhere
    Deno.renameSync(join(a, "corpus.txt"), join(b, "moved.txt"));
    const moved = await run(b, ["--resume", "../a/run", "--data", "moved.txt", "--steps", "8"]);
    assert.equal(moved.code, 0, dec.decode(moved.stderr));
    assert.equal(summary(join(a, "run")).steps, 8);
    // other data under another name: refused, nothing touched
    Deno.writeTextFileSync(join(b, "other.txt"), text.replace("lazy", "lazi"));
    const o = await run(b, ["--resume", "../a/run", "--data", "other.txt", "--steps", "9"]);
    oneLineError(
      { code: o.code, stdout: "", stderr: dec.decode(o.stderr) },
      "the data changed since the checkpoint",
    );
    assert.equal(summary(join(a, "run")).steps, 8);
  }),
);

Deno.test("dataFingerprint: hashes every token of both splits, not a sample", () => {
  const n = 200_000;
  const tokens = Int32Array.from({ length: n }, (_, i) => (i * 7919) % 251);
  const fp = (t: Int32Array) =>
    dataFingerprint(new TextDataset(t, { valFraction: 0.1, seqLen: 16, label: "x" }));
  const base = fp(tokens);
  assert.match(base, /^[0-9a-f]{64}$/);
  assert.equal(fp(tokens.slice()), base);
  for (const at of [1, 77_777, n - 2]) {
    const t = tokens.slice();
    t[at] = (t[at] + 1) % 251; // one token anywhere: in train, in val
    assert.notEqual(fp(t), base, `token ${at}`);
  }
  // the same tokens split elsewhere differ
  const other = dataFingerprint(
    new TextDataset(tokens, { valFraction: 0.2, seqLen: 16, label: "x" }),
  );
  assert.notEqual(other, base);
  // the path it was opened by is not part of it (moved data)
  const at = (label: string) =>
    dataFingerprint(new TextDataset(tokens, { valFraction: 0.1, seqLen: 16, label }), label);
  assert.equal(at("/a/x.txt"), at("/b/moved.txt"));
});

Deno.test(
  "the run folder's lock: a live holder is refused naming its pid; a dead one's is taken over",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    Deno.mkdirSync(out);
    const args = [...BASE, "--model", model, "--steps", "2", "--out", out];
    // held by this (live) test process
    Deno.writeTextFileSync(join(out, ".lock"), `${Deno.pid} ?\n`);
    oneLineError(await cli(args), `--out ${out}: in use by process ${Deno.pid}`);
    assert.deepEqual(names(out), [".lock"]); // nothing written
    // in-process too: a second lock on the same folder is refused while the first is held
    Deno.removeSync(join(out, ".lock"));
    const held = lockRun(out);
    assert.throws(() => lockRun(out), UsageError);
    held.release();
    assert.deepEqual(names(out), []);
    // left by a process that no longer runs
    Deno.writeTextFileSync(join(out, ".lock"), "999999999 1\n");
    const r = await cli(args);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /notice: took over .*\.lock left by process 999999999/);
    assert.ok(!names(out).includes(".lock")); // released at the end
    // a resume while the run still goes on is refused, and changes nothing
    const before = Deno.readTextFileSync(join(out, "metrics.jsonl"));
    Deno.writeTextFileSync(join(out, ".lock"), `${Deno.pid} ?\n`);
    oneLineError(
      await cli(["--resume", out, "--steps", "4"]),
      `--resume ${out}: in use by process ${Deno.pid}`,
    );
    assert.equal(Deno.readTextFileSync(join(out, "metrics.jsonl")), before);
  }),
);

Deno.test("openOut: re-checks at open time; never deletes an earlier run's files without --overwrite", () => {
  const out = Deno.makeTempDirSync({ prefix: "qgalore-out-" });
  try {
    checkOut(out, false); // empty: fine
    // another run wrote its files meanwhile
    Deno.writeTextFileSync(join(out, "metrics.jsonl"), '{"type":"step"}\n');
    assert.throws(() => openOut(out, false), UsageError);
    assert.equal(Deno.readTextFileSync(join(out, "metrics.jsonl")), '{"type":"step"}\n');
    openOut(out, true).close(); // asked for
    assert.equal(Deno.readTextFileSync(join(out, "metrics.jsonl")), "");
  } finally {
    Deno.removeSync(out, { recursive: true });
  }
});

Deno.test("setAside: never renames onto an earlier file set aside under the same name", () => {
  const dir = Deno.makeTempDirSync({ prefix: "qgalore-aside-" });
  try {
    const path = join(dir, checkpointName(4));
    Deno.writeTextFileSync(path, "first");
    assert.equal(setAside(path, "diverged"), `${path}.diverged`);
    Deno.writeTextFileSync(path, "second");
    assert.equal(setAside(path, "diverged"), `${path}.diverged.1`);
    assert.equal(Deno.readTextFileSync(`${path}.diverged`), "first");
    assert.equal(Deno.readTextFileSync(`${path}.diverged.1`), "second");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test(
  "--resume: a damaged metrics.jsonl keeps its parsable prefix; stale temps go whatever their pid; --precision auto; no false divergence notice",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    const args = [...BASE, "--model", model, "--steps", "6", "--save-every", "2", "--out", out];
    assert.equal((await cli(args)).code, 0);
    // zero-filled from the middle of the 5th line on (a power loss), within the kept lines
    const path = join(out, "metrics.jsonl");
    const text = Deno.readTextFileSync(path);
    const cut = text.split("\n").slice(0, 4).join("\n").length + 10;
    const bytes = new TextEncoder().encode(text);
    bytes.fill(0, cut);
    Deno.writeFileSync(path, bytes);
    // a temp file of a killed save by a pid that exists (1, in a container the runner)
    const temp = join(out, "checkpoints", ".step-00000008.safetensors.tmp-1-123");
    Deno.writeTextFileSync(temp, "x");
    // a divergence recorded before the checkpoint resumed from (step 6): no repeat to warn of
    const s = summary(out);
    Deno.writeTextFileSync(
      join(out, "summary.json"),
      JSON.stringify({ ...s, diverged: true, steps: 3 }),
    );
    const r = await cli(["--resume", out, "--steps", "8", "--precision", "auto"]);
    assert.equal(r.code, 0, r.stderr);
    const lines = text.split("\n").filter((l) => l).length - 1; // less the final evaluation
    assert.match(
      r.stderr,
      new RegExp(`notice: .*metrics.jsonl lost ${lines - 4} of the ${lines} records`),
    );
    assert.doesNotMatch(r.stderr, /diverge again/);
    assert.match(r.stderr, /notice: removed .*\.tmp-1-123, left by a save that was killed/);
    assert.equal(metrics(out).length, 4 + 2 + 1); // the kept 4, steps 7-8, the final eval
    assert.equal(summary(out).steps, 8);
  }),
);

Deno.test(
  "a folder with run files but no checkpoint: the hint is --overwrite or a new --out, not --resume",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    Deno.mkdirSync(out);
    Deno.writeTextFileSync(join(out, "metrics.jsonl"), "");
    const line = oneLineError(
      await cli([...BASE, "--model", model, "--steps", "2", "--out", out]),
      "no checkpoint to resume from",
      "--overwrite on",
    );
    assert.doesNotMatch(line, /--resume/);
  }),
);

Deno.test(
  "evaluations: a stop at a step with an evaluation due, and extending a finished run, keep the uninterrupted run's eval records",
  withTiny(async (dir, model) => {
    const base = {
      model,
      batchSize: 2,
      seqLen: 16,
      evalBatches: 2,
      evalEvery: 4,
      steps: 12,
      saveEvery: "off",
      quiet: true,
      handleSigint: false,
    } as const;
    const whole = join(dir, "whole");
    await train({ ...base, out: whole });
    // stopped right after update 4, where an evaluation is due
    const stopped = join(dir, "stopped");
    const stop = new AbortController();
    await train({ ...base, out: stopped }, {
      signal: stop.signal,
      onStep: (r) => {
        if (r.step === 4) stop.abort();
      },
    });
    assert.equal(summary(stopped).steps, 4);
    await train({ resume: stopped, quiet: true, handleSigint: false });
    assert.deepEqual(metrics(stopped), metrics(whole));
    // a finished 8-step run extended to 12: its evaluation at 8 is one the plan has
    const ext = join(dir, "ext");
    await train({ ...base, steps: 8, out: ext });
    await train({ resume: ext, steps: 12, quiet: true, handleSigint: false });
    const evals = metrics(ext).filter((m) => m.type === "eval").map((m) => m.step);
    assert.deepEqual(evals, [0, 4, 8, 12]);
  }),
);

Deno.test(
  "readRunRecord: a malformed counter is a one-line error naming it, not a RangeError",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    // an engine whose checkpoints carry a crafted run record
    const createEngine = async (cfg: EngineConfig): Promise<TrainEngine> => {
      const e = await Engine.create(cfg);
      const save = e.save.bind(e);
      e.save = (path: string, run?: unknown) => {
        const r = run as { counters: Record<string, unknown> };
        return save(path, { ...r, counters: { ...r.counters, watch: { recent: "x" } } });
      };
      return e;
    };
    await train(
      { model, batchSize: 2, seqLen: 16, evalBatches: 2, steps: 2, out, quiet: true },
      { createEngine },
    );
    const path = join(out, "checkpoints", checkpointName(2));
    assert.throws(() => readRunRecord(path), (e: Error) => {
      assert.ok(e instanceof UsageError, String(e));
      assert.match(e.message, /run record counters: watch: .*malformed/);
      assert.doesNotMatch(e.message, /\n/);
      return true;
    });
    const r = await cli(["--resume", out, "--steps", "4"]);
    oneLineError(r, "none of its 1 checkpoints is valid", "counters");
  }),
);

Deno.test("isCorrupt: only a bad file is set aside, not an unreadable one or a newer format", () => {
  assert.equal(isCorrupt("x: checkpoint is corrupt or not a qgalore checkpoint (checksum)"), true);
  assert.equal(isCorrupt('x: run record kind "y": not a run record'), true);
  assert.equal(isCorrupt("cannot read checkpoint: Permission denied (os error 13)"), false);
  assert.equal(isCorrupt("checkpoint format version 9: this engine reads version 3 only"), false);
  assert.equal(isCorrupt("x: run record version 2: this build reads version 1"), false);
});

Deno.test(
  "SIGTERM (docker stop, a Slurm preemption) saves a checkpoint and stops like Ctrl-C",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    const { code, stderr: err } = await stopAfterFirstStep([
      ...BASE,
      "--model",
      model,
      "--steps",
      "5000",
      "--out",
      out,
    ], "SIGTERM");
    assert.equal(code, 130, err);
    const s = summary(out);
    assert.equal(s.interrupted, true);
    assert.equal(s.checkpoint, join(out, "checkpoints", checkpointName(s.steps)));
    assert.ok(!names(out).includes(".lock"));
  }),
);

Deno.test(
  "divergence by a non-finite update the engine refused: the state is intact, saved as the last good checkpoint",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    // the 5th update is non-finite: the engine refuses it and leaves the weights as they were
    const createEngine = async (cfg: EngineConfig): Promise<TrainEngine> => {
      const e = await Engine.create(cfg);
      const step = e.trainStep.bind(e);
      let n = 0;
      e.trainStep = (t: Int32Array, m: number, lr: number) =>
        ++n === 5
          ? Promise.reject(new EngineError(ErrorCode.nonFinite, "loss is not finite"))
          : step(t, m, lr);
      return e;
    };
    const opts = {
      model,
      batchSize: 2,
      seqLen: 16,
      evalBatches: 2,
      steps: 8,
      saveEvery: "off",
      out,
      quiet: true,
      handleSigint: false,
    } as const;
    const err = await train(opts, { createEngine }).catch((e) => e);
    assert.ok(err instanceof DivergedError, String(err));
    const good = join(out, "checkpoints", checkpointName(4));
    assert.equal(err.summary.last_good_checkpoint, good);
    assert.equal(err.summary.checkpoint, good);
    assert.equal(readRunRecord(good).step, 4);
    // resumed with the same options it meets the same update: the notice says so
    const r = await cli(["--resume", out]);
    assert.match(r.stderr, /resumed from .*step-00000004/);
    assert.match(r.stderr, /notice: this run diverged at step 4; resumed with the same options/);
  }),
);

Deno.test(
  "--resume of a run that used more threads than this machine has: capped, with a notice",
  withTiny(async (dir, model) => {
    const out = join(dir, "run");
    const many = navigator.hardwareConcurrency + 7;
    // a run record as a machine with more processors writes it
    const createEngine = async (cfg: EngineConfig): Promise<TrainEngine> => {
      const e = await Engine.create(cfg);
      const save = e.save.bind(e);
      e.save = (path: string, run?: unknown) => {
        const r = run as { engine: Record<string, unknown> };
        return save(path, { ...r, engine: { ...r.engine, threads: many } });
      };
      return e;
    };
    await train(
      { model, batchSize: 2, seqLen: 16, evalBatches: 2, steps: 2, out, quiet: true },
      { createEngine },
    );
    const r = await cli(["--resume", out, "--steps", "4"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stderr,
      new RegExp(
        `notice: --threads ${many} capped at this machine's ${navigator.hardwareConcurrency} ` +
          "processors: the last bits of the losses will differ",
      ),
    );
  }),
);
