/**
 * The real CLI (`examples/pretrain.ts`) over the native engine, as a subprocess: a short run,
 * a diverging run, Ctrl-C, and each kind of bad input.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Summary } from "../lib/summary.ts";
import { type Cli as Result, cli, stopAfterFirstStep } from "./pretrain_cli.ts";

// Tiny runs: a few seconds each on two cores.
const tiny = ["--batch-size", "4", "--seq-len", "32", "--eval-batches", "2"];

function lastLine(text: string): string {
  return text.trimEnd().split("\n").at(-1) ?? "";
}

/** The stderr of a failed command is exactly one `error:` line naming what was wrong. */
function assertOneLineError(r: Result, ...parts: string[]): void {
  assert.notEqual(r.code, 0, `expected failure, got exit 0; stderr: ${r.stderr}`);
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `stderr must be one line, got:\n${r.stderr}`);
  assert.ok(lines[0].startsWith("error: "), lines[0]);
  for (const p of parts) assert.ok(lines[0].includes(p), `"${lines[0]}" lacks "${p}"`);
  assert.doesNotMatch(r.stderr, /^\s+at /m, "stack frames in stderr");
  assert.doesNotMatch(r.stderr, /panicked/);
}

Deno.test("e2e: a short run learns and writes its files", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const args = [...tiny, "--steps", "12", "--grad-accum", "2", "--lr", "1e-2"];
    const r = await cli([...args, "--seed", "3", "--json", "--out", dir]);
    assert.equal(r.code, 0, r.stderr);
    const printed: Summary = JSON.parse(lastLine(r.stdout));
    const s: Summary = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
    assert.deepEqual(printed, s);
    assert.equal(s.steps, 12);
    assert.equal(s.tokens, 12 * 4 * 32 * 2);
    assert.ok(s.val_loss! < s.initial_val_loss!, `${s.val_loss} !< ${s.initial_val_loss}`);
    // Before training every byte is about equally likely.
    assert.ok(Math.abs(s.initial_val_loss! - Math.log(256)) < 0.2, `${s.initial_val_loss}`);
    assert.ok(Math.abs(s.val_ppl! - Math.exp(s.val_loss!)) < 1e-9);
    assert.ok(s.final_train_loss! > 0 && Number.isFinite(s.final_train_loss));
    assert.equal(s.params, 869_504);
    assert.equal(s.device, "cpu");
    assert.equal(s.precision, "fp32");
    assert.equal(s.optimizer, "adamw");
    assert.equal(s.model.name, "llama-9m");
    assert.ok(s.entropy_floor! > 1.8 && s.entropy_floor! < 1.9);
    assert.ok(s.tokens_per_s > 0 && s.wall_s > 0);
    const m = s.memory;
    assert.ok(m.total > 0 && m.weights === 869_504 * 4, JSON.stringify(m));
    assert.equal(
      m.total,
      m.weights + m.adapters + m.grads + m.optimizer_state + m.projector + m.activations,
    );
    assert.ok(m.peak_rss! > m.weights);
    assert.equal(s.config.gradAccum, 2);
    assert.equal(s.interrupted, false);
    assert.equal(s.diverged, false);
    const lines = Deno.readTextFileSync(join(dir, "metrics.jsonl")).trim().split("\n")
      .map((l) => JSON.parse(l));
    assert.equal(lines.filter((l) => l.type === "step").length, 12);
    assert.deepEqual(lines.filter((l) => l.type === "eval").map((l) => l.step), [0, 12]);
    // Logs go to stderr; stdout holds only the summary.
    assert.equal(r.stdout.trim().split("\n").length, 1);
    assert.match(r.stderr, /eval step 12: val loss \d\.\d{4}/);

    // Same seed, same run: the engine and the sampling are deterministic.
    const again = await cli([...args, "--seed", "3", "--json", "--out", join(dir, "again")]);
    assert.equal(JSON.parse(lastLine(again.stdout)).val_loss, s.val_loss);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("e2e: --optimizer qgalore reports refreshes, gaps and a rank clamp notice", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const r = await cli([
      ...tiny,
      "--steps",
      "6",
      "--optimizer",
      "qgalore",
      "--rank",
      "200",
      "--update-gap",
      "2",
      "--json",
      "--out",
      dir,
    ]);
    assert.equal(r.code, 0, r.stderr);
    const s: Summary = JSON.parse(lastLine(r.stdout));
    assert.deepEqual(s, JSON.parse(Deno.readTextFileSync(join(dir, "summary.json"))));
    assert.equal(s.optimizer, "qgalore");
    assert.equal(s.steps, 6);
    // 4 blocks × 7 matrices, each refreshed at updates 0, 2 and 4 (the lazy queue of 5
    // cosines is not full yet, so no gap has grown).
    const names = Object.keys(s.gaps);
    assert.equal(names.length, 28);
    assert.ok(names.includes("model.layers.3.mlp.down_proj.weight"), names.join(" "));
    assert.ok(Object.values(s.gaps).every((g) => g === 2), JSON.stringify(s.gaps));
    assert.equal(s.svd_count, 28 * 3);
    assert.equal(s.refresh_failures, 0);
    assert.equal(s.nonfinite_grads, 0);
    assert.ok(s.refresh_seconds > 0);
    assert.equal(s.fused, true);
    assert.ok(s.val_loss! < s.initial_val_loss!);
    assert.equal(s.val_loss_ref, (s.val_loss! * 2) / 3); // --eval-batches 2
    assert.equal(s.config.rank, 200);
    assert.equal(s.config.weightBits, 8);
    assert.ok(s.memory.weights < 869_504 * 4 / 2, "INT8 linears");
    // One notice line: the rank is clamped to the 128-wide matrices (the device fallback
    // notice of --device auto is tested in device_test.ts).
    const notices = r.stderr.split("\n").filter((l) => l.startsWith("notice: --rank"));
    assert.deepEqual(notices, [
      "notice: --rank 200 exceeds the size of some llama-9m matrices; clamped per matrix to " +
      "min(rank, rows, cols): 128 for q, k, v, o, gate, up, down",
    ]);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("e2e: --proj-grad factored forms R from the factors between refreshes; needs --clip 0", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const base = [...tiny, "--steps", "8", "--optimizer", "galore", "--rank", "32"];
    const r = await cli([
      ...base,
      "--update-gap",
      "4",
      "--clip",
      "0",
      "--proj-grad",
      "factored",
      "--json",
      "--out",
      dir,
    ]);
    assert.equal(r.code, 0, r.stderr);
    const s: Summary = JSON.parse(lastLine(r.stdout));
    assert.equal(s.config.projGrad, "factored");
    // 4 blocks × 7 matrices refreshed at updates 0 and 4, factored at the other six
    assert.equal(s.svd_count, 28 * 2);
    assert.equal(s.factored_grads, 28 * 6);
    assert.ok(s.val_loss! < s.initial_val_loss!);
    // clipping needs the whole gradient's norm
    const bad = await cli([...base, "--proj-grad", "factored", "--out", join(dir, "bad")]);
    assertOneLineError(
      bad,
      "--proj-grad factored needs --clip 0",
      "use --proj-grad full, or --clip 0",
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("e2e: a diverging run stops with one error line and still writes the summary", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const r = await cli([...tiny, "--steps", "12", "--lr", "1e30", "--clip", "0", "--out", dir]);
    assert.equal(r.code, 2, r.stderr);
    const last = lastLine(r.stderr);
    assert.match(
      last,
      /^error: training diverged at step \d+: (loss|gradient norm) is (NaN|infinite)/,
    );
    assert.match(last, /\(lr [\d.]+e\+29|\(lr 1\.00e\+30/);
    assert.match(last, /lower --lr/);
    assert.doesNotMatch(r.stderr, /^\s+at |panicked/m);
    const s: Summary = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
    assert.equal(s.diverged, true);
    assert.equal(s.error, last.slice("error: ".length));
    assert.ok(s.steps < 12);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("e2e: Ctrl-C stops after the current step and writes the summary", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const { code, stderr: err } = await stopAfterFirstStep([
      ...tiny,
      "--steps",
      "100000",
      "--out",
      dir,
    ], "SIGINT");
    assert.equal(code, 130, err);
    assert.match(err, /interrupted: stopping after the current step/);
    const s: Summary = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
    assert.equal(s.interrupted, true);
    assert.ok(s.steps >= 1 && s.steps < 100000);
    assert.ok(s.val_loss !== null);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("e2e: --help", async () => {
  const r = await cli(["--help"]);
  assert.equal(r.code, 0);
  assert.match(r.stdout, /^Pretrain a LLaMA-style model/);
  assert.match(r.stdout, /--grad-accum N/);
  assert.equal(r.stderr, "");
});

const FIX = new URL("./fixtures/hf/", import.meta.url).pathname;

Deno.test("e2e: bad inputs give one error line naming the flag and the value", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const empty = join(dir, "empty.txt");
    Deno.writeTextFileSync(empty, "");
    const short = join(dir, "short.txt");
    Deno.writeTextFileSync(short, "too short\n");
    const heads = join(dir, "heads.json");
    Deno.writeTextFileSync(
      heads,
      '{"hidden_size":96,"intermediate_size":256,"num_attention_heads":5,"num_hidden_layers":2}',
    );
    const missing = join(dir, "missing.txt");
    const badJsonl = join(dir, "bad.jsonl");
    Deno.writeTextFileSync(badJsonl, '{"text":"a"}\n{"text":\n');
    const noField = join(dir, "nofield.jsonl");
    Deno.writeTextFileSync(noField, '{"body":"a"}\n');
    // a model folder whose weights file was cut short
    const cut = join(dir, "cut");
    Deno.mkdirSync(cut);
    Deno.copyFileSync(`${FIX}gqa-tied-theta5e5/config.json`, join(cut, "config.json"));
    const st = Deno.readFileSync(`${FIX}gqa-tied-theta5e5/model.safetensors`);
    Deno.writeFileSync(join(cut, "model.safetensors"), st.subarray(0, st.length - 100));
    const fifo = join(dir, "fifo");
    await new Deno.Command("mkfifo", { args: [fifo] }).output();
    const cases: [string[], string[]][] = [
      [["--batch-size", "0"], ["--batch-size 0", "integer ≥ 1"]],
      [["--batch-size", "1.5"], ["--batch-size 1.5"]],
      [["--lr", "abc"], ["--lr abc", "a number in (0, "]],
      [["--lr", "-0.01"], ["--lr -0.01"]],
      [["--lr", "0"], ["--lr 0"]],
      [["--model", "llama-3m"], ["--model llama-3m", "unknown preset", "llama-60m"]],
      [["--seq-len", "4096"], ["--seq-len 4096", "2048", "max_position_embeddings"]],
      [["--model", heads], [`--model ${heads}`, "num_attention_heads 5", "hidden_size 96"]],
      [["--data", missing], [`--data ${missing}`, "not found"]],
      [["--data", empty], [`--data ${empty}`, "empty"]],
      [["--data", badJsonl], [`--data ${badJsonl}`, "line 2", "not JSON"]],
      [["--data", noField], [`--data ${noField}`, "line 1", 'no "text" field']],
      [["--init-from", dir], [`--init-from ${dir}`, "config.json"]],
      [["--init-from", cut], [`--init-from ${cut}/model.safetensors`]],
      [["--init-from", `${FIX}gqa-tied-theta5e5`, "--model", "llama-20m"], [
        "--init-from",
        "--model",
      ]],
      [["--export", dir], [`--export ${dir}`, "not empty"]],
      [["--export", join(dir, "no/such")], [`--export ${join(dir, "no/such")}`, "parent folder"]],
      [["--export", join(dir, "hfx")], ["must be outside --out"]],
      [["--init-from", heads], [`--init-from ${heads}`, "must be a Hugging Face model folder"]],
      [["--data", fifo], [`--data ${fifo}`, "not a regular file or folder"]],
      [["--tokenizer", `${FIX}tok-bbpe`], ["--tokenizer", "needs --data"]],
      [["--train-tokenizer", "1000", "--data", short, "--init-from", `${FIX}gqa-f16`], [
        "--train-tokenizer 1000",
        "--init-from",
      ]],
      [["--export-dtype", "f16"], ["--export-dtype f16", "bf16, f32"]],
      [["--tokenizer", missing], [`--tokenizer ${missing}`]],
      [["--train-tokenizer", "100", "--data", short], ["--train-tokenizer 100", "260"]],
      [["--train-tokenizer", "1000"], ["--train-tokenizer 1000", "needs --data"]],
      [["--model", `${FIX}mha-untied-theta1e4`, "--tokenizer", `${FIX}tok-bbpe`, "--data", short], [
        "vocab_size 500",
        "600",
      ]],
      [["--data", short, "--seq-len", "64"], [`--data ${short}`, "10 tokens", "65"]],
      [["--learning-rate", "1"], ["--learning-rate", "unknown flag"]],
      [["--device", "tpu"], ["--device tpu", "cpu, cuda, auto"]],
      [["--optimizer", "sgd"], ["--optimizer sgd", "adamw"]],
      [["--steps"], ["--steps", "missing value"]],
      [["extra"], ["extra", "unexpected argument"]],
      [["--rank", "64"], ["--rank 64", "applies only to --optimizer galore"]],
      [["--proj-bits", "4"], ["--proj-bits 4", "(not adamw)"]],
      [["--optimizer", "galore", "--weight-bits", "8"], ["--weight-bits 8", "qgalore"]],
      [["--optimizer", "qgalore", "--rank", "0"], ["--rank 0", "integer ≥ 1"]],
      [["--optimizer", "qgalore", "--lazy", "maybe"], ["--lazy maybe", "on or off"]],
      [["--optimizer", "qgalore", "--weight-group-size", "6"], ["--weight-group-size 6", "4096"]],
      [["--device", "cuda"], ["cuda"]],
    ];
    const results = await Promise.all(cases.map(([args]) => cli([...args, "--out", dir])));
    results.forEach((r, i) => assertOneLineError(r, ...cases[i][1]));
    // Usage errors exit 2; the engine's own refusal (no CUDA build) exits 1.
    assert.deepEqual(results.map((r) => r.code), [...cases.map(() => 2).slice(1), 1]);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("e2e: --checkpointing on gives the same run with less activation memory", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const run = async (ckpt: string) => {
      const args = ["--optimizer", "qgalore", "--rank", "16", "--steps", "4", "--json"];
      const r = await cli([...tiny, ...args, "--checkpointing", ckpt, "--out", join(dir, ckpt)]);
      assert.equal(r.code, 0, r.stderr);
      return JSON.parse(lastLine(r.stdout)) as Summary;
    };
    const [off, on] = [await run("off"), await run("on")];
    assert.equal(on.val_loss, off.val_loss);
    assert.equal(on.final_train_loss, off.final_train_loss);
    assert.ok(on.memory.activations < off.memory.activations);
    assert.equal(on.config.checkpointing, true);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("cli: a stale native library is one line naming the fix (pretrain and ablation, --help included)", async () => {
  // libm stands in for a library built from older sources: it lacks every qg_ entry point.
  const stale = await cli(["--help"], { QGALORE_LIB: "/lib/x86_64-linux-gnu/libm.so.6" });
  assertOneLineError(stale, "was built from older sources (no qg_", "deno task build");
  assert.equal(stale.code, 1);
  const ablation = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", new URL("../examples/ablation.ts", import.meta.url).pathname, "--help"],
    env: { NO_COLOR: "1", QGALORE_LIB: "/lib/x86_64-linux-gnu/libm.so.6" },
  }).output();
  assertOneLineError(
    {
      code: ablation.code,
      stdout: new TextDecoder().decode(ablation.stdout),
      stderr: new TextDecoder().decode(ablation.stderr),
    },
    "was built from older sources",
  );
});

Deno.test("e2e: a failed set-up leaves no run folder, even with a trained tokenizer", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // enough text to train a tokenizer, too little for one validation window
    const data = join(dir, "tiny.jsonl");
    Deno.writeTextFileSync(
      data,
      '{"text":"to be or not to be"}\n{"text":"that is the question"}\n',
    );
    const out = join(dir, "run");
    const r = await cli([
      "--data",
      data,
      "--train-tokenizer",
      "300",
      "--seq-len",
      "64",
      "--out",
      out,
    ]);
    assertOneLineError(r, `--data ${data}`);
    assert.equal(r.code, 2);
    assert.equal(Deno.statSync(dir).isDirectory, true);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["tiny.jsonl"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("e2e: --train-tokenizer never replaces an earlier run's tokenizer in --out", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = join(dir, "t.txt");
    Deno.writeTextFileSync(data, "to be or not to be, that is the question\n".repeat(400));
    Deno.mkdirSync(join(dir, "run/tokenizer"), { recursive: true });
    Deno.writeTextFileSync(join(dir, "run/tokenizer/tokenizer.json"), "mine");
    const r = await cli(["--data", data, "--train-tokenizer", "300", "--out", join(dir, "run")]);
    assertOneLineError(r, `--out ${join(dir, "run")}`, "already holds a tokenizer");
    assert.equal(Deno.readTextFileSync(join(dir, "run/tokenizer/tokenizer.json")), "mine");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("e2e: --lr 10 and --lr 1e3 stop diverged with exit 2 and one line naming --lr", async () => {
  for (const lr of ["10", "1e3"]) {
    const dir = Deno.makeTempDirSync();
    try {
      const r = await cli([...tiny, "--steps", "60", "--lr", lr, "--out", dir]);
      assert.equal(r.code, 2, r.stderr);
      const error = lastLine(r.stderr);
      assert.match(error, /^error: training diverged at step \d+: /);
      assert.match(error, new RegExp(`likely cause: --lr ${Number(lr)} is \\d+x`));
      const s: Summary = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
      assert.equal(s.diverged, true);
      assert.ok(s.steps < 60, `${s.steps}`);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  }
});

Deno.test("e2e: --out with an earlier run needs --overwrite on; a symlinked metrics.jsonl is refused", async () => {
  const dir = Deno.makeTempDirSync();
  try {
    const args = [...tiny, "--steps", "2", "--out", dir];
    assert.equal((await cli(args)).code, 0);
    const before = Deno.readTextFileSync(join(dir, "summary.json"));
    assertOneLineError(await cli(args), `--out ${dir}: holds an earlier run`, "--overwrite on");
    assert.equal(Deno.readTextFileSync(join(dir, "summary.json")), before);
    assert.equal((await cli([...args, "--overwrite", "on"])).code, 0);

    const user = join(dir, "user.txt");
    Deno.writeTextFileSync(user, "keep me\n");
    Deno.removeSync(join(dir, "metrics.jsonl"));
    Deno.symlinkSync(user, join(dir, "metrics.jsonl"));
    assertOneLineError(await cli([...args, "--overwrite", "on"]), "metrics.jsonl is a symlink");
    assert.equal(Deno.readTextFileSync(user), "keep me\n");
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
