import assert from "node:assert/strict";
import { join } from "node:path";
import { parsePretrainArgs, usage } from "../lib/cli.ts";
import { openDataset, SyntheticCorpus, TextDataset } from "../lib/data.ts";
import { UsageError } from "../lib/errors.ts";
import { checkOptions, defaultTrainOptions, OPTIMIZERS } from "../lib/options.ts";
import { PRESET_NAMES } from "../lib/presets.ts";

Deno.test("no flags gives the defaults", () => {
  const got = parsePretrainArgs([]);
  assert.notEqual(got, "help");
  assert.deepEqual(got, { ...defaultTrainOptions(), json: false });
});

Deno.test("happy path: every flag lands in its option", () => {
  const got = parsePretrainArgs([
    "--model",
    "llama-20m",
    "--optimizer",
    "adamw",
    "--lr",
    "1e-3",
    "--min-lr-ratio",
    "0",
    "--warmup",
    "5",
    "--steps",
    "50",
    "--batch-size",
    "4",
    "--seq-len=64",
    "--grad-accum",
    "2",
    "--clip",
    "0.5",
    "--weight-decay",
    "0.01",
    "--beta1",
    "0.8",
    "--beta2",
    "0.95",
    "--eps",
    "1e-6",
    "--data",
    "corpus.txt",
    "--val-fraction",
    "0.2",
    "--eval-every",
    "10",
    "--eval-batches",
    "3",
    "--seed",
    "7",
    "--threads",
    "2",
    "--device",
    "cpu",
    "--out",
    "runs/x",
    "--json",
  ]);
  assert.notEqual(got, "help");
  assert.deepEqual(got, {
    ...defaultTrainOptions(),
    model: "llama-20m",
    optimizer: "adamw",
    lr: 1e-3,
    minLrRatio: 0,
    warmup: 5,
    steps: 50,
    batchSize: 4,
    seqLen: 64,
    gradAccum: 2,
    clip: 0.5,
    weightDecay: 0.01,
    beta1: 0.8,
    beta2: 0.95,
    eps: 1e-6,
    data: "corpus.txt",
    valFraction: 0.2,
    evalEvery: 10,
    evalBatches: 3,
    seed: 7,
    threads: 2,
    device: "cpu",
    out: "runs/x",
    json: true,
  });
});

Deno.test("--help and -h", () => {
  assert.equal(parsePretrainArgs(["--help"]), "help");
  assert.equal(parsePretrainArgs(["--steps", "3", "-h"]), "help");
  const text = usage();
  for (const flag of ["--model", "--lr", "--grad-accum", "--eval-batches", "--device", "--json"]) {
    assert.ok(text.includes(flag), `usage lacks ${flag}`);
  }
  assert.ok(text.includes(PRESET_NAMES.join(", ")));
});

/** Asserts a one-line UsageError that starts with `start` and matches every pattern. */
function rejects(argv: string[], start: string, ...patterns: RegExp[]): void {
  assert.throws(() => parsePretrainArgs(argv), (e: unknown) => {
    assert.ok(e instanceof UsageError, `${argv.join(" ")}: expected UsageError, got ${e}`);
    assert.ok(e.message.startsWith(start), `"${e.message}" should start with "${start}"`);
    for (const p of patterns) assert.match(e.message, p);
    assert.ok(!e.message.includes("\n"), "message must be one line");
    return true;
  });
}

Deno.test("bad numbers name the flag, the value and the allowed range", () => {
  rejects(["--batch-size", "0"], "--batch-size 0: must be an integer ≥ 1");
  rejects(["--batch-size", "2.5"], "--batch-size 2.5: must be an integer ≥ 1");
  rejects(["--lr", "abc"], "--lr abc: must be a number in (0, 3.4e+38]");
  rejects(["--lr", "0"], "--lr 0: must be a number in (0, 3.4e+38]");
  rejects(["--lr", "-1"], "--lr -1: must be a number in (0, 3.4e+38]");
  rejects(["--lr=-0.5"], "--lr -0.5: must be a number in (0, 3.4e+38]");
  rejects(["--lr", "Infinity"], "--lr Infinity: must be a number in (0, 3.4e+38]");
  rejects(["--lr", "1e39"], "--lr 1e39: must be a number in (0, 3.4e+38]");
  rejects(["--lr="], '--lr "": must be a number in (0, 3.4e+38]');
  rejects(["--steps", "1e9.5"], "--steps 1e9.5: must be an integer ≥ 1");
  rejects(["--seq-len", "0"], "--seq-len 0: must be an integer ≥ 1");
  rejects(["--grad-accum", "-2"], "--grad-accum -2: must be an integer ≥ 1");
  rejects(["--min-lr-ratio", "1.5"], "--min-lr-ratio 1.5: must be a number in [0, 1]");
  rejects(["--beta2", "1"], "--beta2 1: must be a number in [0, 1)");
  rejects(["--val-fraction", "0"], "--val-fraction 0: must be a number in (0, 1)");
  rejects(["--clip", "-1"], "--clip -1: must be a number ≥ 0");
  rejects(["--threads", "0"], "--threads 0: must be an integer ≥ 1");
  rejects(["--seed", "-3"], "--seed -3: must be an integer ≥ 0");
  rejects(["--eval-batches", "0"], "--eval-batches 0: must be an integer ≥ 1");
  rejects(["--warmup", "50", "--steps", "10"], "--warmup 50: must be ≤ --steps 10");
});

Deno.test("bad names: preset, optimizer, device", () => {
  rejects(
    ["--model", "llama-3m"],
    "--model llama-3m: unknown preset; allowed: ",
    /llama-9m, llama-20m, llama-35m, llama-60m, llama-130m, llama-350m, llama-1b, llama-7b/,
  );
  rejects(
    ["--optimizer", "sgd"],
    "--optimizer sgd: unknown optimizer; allowed: ",
    new RegExp(OPTIMIZERS.join(", ")),
  );
  rejects(["--device", "tpu"], "--device tpu: must be one of cpu, cuda, auto");
  rejects(["--data", ""], '--data "": must not be empty');
});

Deno.test("flag syntax errors: unknown flag, stray argument, missing value, switch value", () => {
  rejects(["--learning-rate", "3"], "--learning-rate: unknown flag");
  rejects(["--bogus=1"], "--bogus=1: unknown flag");
  rejects(["-x"], "-x: unknown flag");
  rejects(["llama-9m"], "llama-9m: unexpected argument");
  rejects(["--steps"], "--steps: missing value");
  rejects(["--lr", "--steps", "3"], "--lr --steps: missing value");
  rejects(["--json=yes"], "--json=yes: --json is a switch");
});

Deno.test("model constraints: seq-len over max positions, heads from a JSON config", () => {
  rejects(
    ["--seq-len", "4096"],
    "--seq-len 4096: must be ≤ 2048 (max_position_embeddings of llama-9m)",
  );
  const dir = Deno.makeTempDirSync();
  try {
    const heads = join(dir, "heads.json");
    Deno.writeTextFileSync(
      heads,
      JSON.stringify({
        hidden_size: 100,
        intermediate_size: 256,
        num_attention_heads: 3,
        num_hidden_layers: 2,
      }),
    );
    rejects(
      ["--model", heads],
      `--model ${heads}: num_attention_heads 3 must divide hidden_size 100`,
    );
    const short = join(dir, "short.json");
    Deno.writeTextFileSync(
      short,
      JSON.stringify({
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_hidden_layers: 2,
        max_position_embeddings: 64,
      }),
    );
    rejects(
      ["--model", short, "--seq-len", "128"],
      `--seq-len 128: must be ≤ 64 (max_position_embeddings of ${short})`,
    );
    const ok = parsePretrainArgs(["--model", short, "--seq-len", "64"]);
    assert.notEqual(ok, "help");
    rejects(
      ["--model", join(dir, "missing.json")],
      `--model ${join(dir, "missing.json")}`,
      /not found/,
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("checkOptions: notebook-style partial options", () => {
  const { opts, model } = checkOptions({ steps: 40 });
  assert.equal(opts.warmup, 4); // 10% of the steps
  assert.equal(model.name, "llama-9m");
  assert.equal(model.config.vocab_size, 256);
  const inline = checkOptions({
    model: { ...model.config, vocab_size: 32000, num_hidden_layers: 1 },
    warmup: 0,
  });
  assert.equal(inline.model.name, "custom");
  assert.equal(inline.model.config.vocab_size, 256);
  assert.equal(inline.opts.warmup, 0);
  assert.throws(() => checkOptions({ lr: Number.NaN }), /^UsageError: --lr NaN: must be/);
  assert.throws(
    () => checkOptions({ batchSize: "8" as unknown as number }),
    /--batch-size "8": must be an integer ≥ 1/,
  );
  assert.throws(() => checkOptions({ out: "" }), /--out "": must be a directory path/);
});

Deno.test("--data errors: missing, empty, shorter than a window", () => {
  const dir = Deno.makeTempDirSync();
  const open = (argv: string[]) => {
    const o = parsePretrainArgs(argv);
    assert.notEqual(o, "help");
    if (o === "help") return;
    return openDataset(o);
  };
  const fails = (argv: string[], start: string, ...patterns: RegExp[]) =>
    assert.throws(() => open(argv), (e: unknown) => {
      assert.ok(e instanceof UsageError, String(e));
      assert.ok(e.message.startsWith(start), e.message);
      for (const p of patterns) assert.match(e.message, p);
      assert.ok(!e.message.includes("\n"));
      return true;
    });
  try {
    const missing = join(dir, "missing.txt");
    fails(["--data", missing], `--data ${missing}: file not found`);
    const empty = join(dir, "empty.txt");
    Deno.writeTextFileSync(empty, "");
    fails(["--data", empty], `--data ${empty}: file is empty (0 tokens)`);
    const short = join(dir, "short.txt");
    Deno.writeTextFileSync(short, "hello world, this is far too short\n".repeat(5));
    fails(
      ["--data", short, "--seq-len", "64"],
      `--data ${short}: 175 tokens split into 158 train + 17 validation`,
      /at least 65 \(seq_len 64 \+ 1\)/,
    );
    const ds = open(["--data", short, "--seq-len", "16"]);
    assert.ok(ds instanceof TextDataset);
    assert.ok(open([]) instanceof SyntheticCorpus);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
