/**
 * A run's checkpoints: --save-every parsing, --keep pruning only the run's own files, the
 * last good checkpoint of a diverged run, the sampler's and the divergence watch's state, and
 * the one-line refusals of --resume (changed flag, changed data, no checkpoints, finished).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { checkInterval } from "../lib/options.ts";
import { parsePretrainArgs } from "../lib/cli.ts";
import { checkpointName, listCheckpoints, pruneCheckpoints } from "../lib/checkpoints.ts";
import { DivergenceWatch } from "../lib/diverge.ts";
import { UsageError } from "../lib/errors.ts";
import { Rng } from "../lib/rng.ts";
import type { Summary } from "../lib/trainer.ts";

const script = new URL("../examples/pretrain.ts", import.meta.url).pathname;
const dec = new TextDecoder();

const TINY_MODEL = {
  vocab_size: 256,
  hidden_size: 64,
  intermediate_size: 128,
  num_attention_heads: 2,
  num_hidden_layers: 2,
  max_position_embeddings: 64,
};
const BASE = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "2"];

interface Cli {
  code: number;
  stdout: string;
  stderr: string;
}

async function cli(args: string[], env: Record<string, string> = {}): Promise<Cli> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    env: { NO_COLOR: "1", ...env },
  }).output();
  return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
}

/** Exit 2 and exactly one stderr line, `error: …` with every part. */
function oneLineError(r: Cli, ...parts: string[]): string {
  assert.equal(r.code, 2, r.stderr);
  const lines = r.stderr.trim().split("\n").filter((l) => l.startsWith("error:"));
  assert.equal(lines.length, 1, r.stderr);
  assert.doesNotMatch(r.stderr, /^\s+at |panicked/m);
  for (const p of parts) assert.ok(lines[0].includes(p), `${lines[0]} lacks ${p}`);
  return lines[0];
}

function summary(dir: string): Summary {
  return JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
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
        ["--threads", "1", "has the default"],
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
