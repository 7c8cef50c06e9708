import assert from "node:assert/strict";
import { join } from "node:path";
import { parsePretrainArgs, type PretrainArgs, usage } from "../lib/cli.ts";
import { openDataset, SyntheticCorpus, TextDataset } from "../lib/data.ts";
import { UsageError } from "../lib/errors.ts";
import {
  checkOptions,
  defaultTrainOptions,
  flagNames,
  optimizerDefaults,
  OPTIMIZERS,
  OPTION_TABLE,
} from "../lib/options.ts";
import { engineOptions } from "../ffi/engine.ts";
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
/** Whether the engine runs `--precision bf16` on this CPU (AVX512-BF16 or AMX-BF16, or the
 * test-only `QGALORE_CPU_BF16` override). */
function cpuRunsBf16(): boolean {
  if (Deno.env.get("QGALORE_CPU_BF16")) return true;
  try {
    return /\b(avx512_bf16|amx_bf16)\b/.test(Deno.readTextFileSync("/proc/cpuinfo"));
  } catch {
    return false;
  }
}

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
  rejects(["--batch-size", "0"], "--batch-size 0: must be an integer ≥ 1 and ≤ 2147483648");
  rejects(["--batch-size", "2.5"], "--batch-size 2.5: must be an integer ≥ 1 and ≤ 2147483648");
  rejects(["--lr", "abc"], "--lr abc: must be a number in (0, 3.4e+38]");
  rejects(["--lr", "0"], "--lr 0: must be a number in (0, 3.4e+38]");
  rejects(["--lr", "-1"], "--lr -1: must be a number in (0, 3.4e+38]");
  rejects(["--lr=-0.5"], "--lr -0.5: must be a number in (0, 3.4e+38]");
  rejects(["--lr", "Infinity"], "--lr Infinity: must be a number in (0, 3.4e+38]");
  rejects(["--lr", "1e39"], "--lr 1e39: must be a number in (0, 3.4e+38]");
  rejects(["--lr="], '--lr "": must be a number in (0, 3.4e+38]');
  rejects(["--steps", "1e9.5"], "--steps 1e9.5: must be an integer ≥ 1 and ≤ 2147483648");
  rejects(["--seq-len", "0"], "--seq-len 0: must be an integer ≥ 1 and ≤ 2147483648");
  rejects(["--grad-accum", "-2"], "--grad-accum -2: must be an integer ≥ 1 and ≤ 2147483648");
  rejects(["--min-lr-ratio", "1.5"], "--min-lr-ratio 1.5: must be a number in [0, 1]");
  rejects(["--beta2", "1"], "--beta2 1: must be a number in [0, 1)");
  rejects(["--val-fraction", "0"], "--val-fraction 0: must be a number in (0, 1)");
  rejects(["--clip", "-1"], "--clip -1: must be a number ≥ 0");
  rejects(["--threads", "0"], "--threads 0: must be an integer ≥ 1 and ≤ 2147483648");
  rejects(["--seed", "-3"], "--seed -3: must be an integer ≥ 0");
  rejects(["--eval-batches", "0"], "--eval-batches 0: must be an integer ≥ 1 and ≤ 2147483648");
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
  rejects(["--precision", "fp16"], "--precision fp16: must be one of auto, fp32, bf16");
  rejects(["--checkpointing", "yes"], "--checkpointing yes: must be on or off");
  if (!cpuRunsBf16()) {
    rejects(
      ["--device", "cpu", "--precision", "bf16"],
      "--precision bf16 on the CPU needs AVX512-BF16 or AMX-BF16, which this processor lacks; use --precision fp32 or auto",
    );
  }
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
  // a config's own vocabulary is kept (it must hold every token id), as for files
  assert.equal(inline.model.config.vocab_size, 32000);
  assert.throws(
    () => checkOptions({ model: { ...model.config, vocab_size: 100 } }),
    /vocab_size 100 is smaller than the tokenizer's 256 tokens/,
  );
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
    return openDataset(o as PretrainArgs);
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

Deno.test("GaLore-family flags land in their options", () => {
  const got = parsePretrainArgs([
    "--optimizer",
    "qgalore",
    "--rank",
    "64",
    "--update-gap",
    "50",
    "--galore-scale",
    "0.5",
    "--weight-bits",
    "8",
    "--weight-group-size",
    "128",
    "--proj-bits",
    "8",
    "--proj-group-size",
    "64",
    "--stochastic-round",
    "off",
    "--lazy",
    "on",
    "--cos-threshold",
    "-0.25",
    "--queue-size",
    "3",
    "--gamma",
    "4",
    "--proj-refresh",
    "svd",
    "--cos-mode",
    "abs",
    "--quant-range",
    "reference",
    "--block-size",
    "256",
    "--fused",
    "off",
  ]);
  assert.notEqual(got, "help");
  assert.deepEqual(got, {
    ...defaultTrainOptions(),
    optimizer: "qgalore",
    rank: 64,
    updateGap: 50,
    galoreScale: 0.5,
    weightBits: 8,
    weightGroupSize: 128,
    projBits: 8,
    projGroupSize: 64,
    stochasticRound: false,
    lazy: true,
    cosThreshold: -0.25,
    queueSize: 3,
    gamma: 4,
    projRefresh: "svd",
    cosMode: "abs",
    quantRange: "reference",
    blockSize: 256,
    fused: false,
    json: false,
  });
  const g = parsePretrainArgs(["--optimizer", "galore", "--proj-bits=4", "--lazy", "on"]);
  assert.notEqual(g, "help");
  if (g !== "help") assert.equal(checkOptions(g).opts.quantRange, "zero");
});

Deno.test("per-optimizer defaults (docs/algorithm-spec.md §1.6, §1.7, §2.6)", () => {
  const resolved = (optimizer: string, extra: Record<string, unknown> = {}) =>
    checkOptions({ optimizer, ...extra }).opts;
  const none = {
    rank: null,
    updateGap: null,
    galoreScale: null,
    weightBits: null,
    weightGroupSize: null,
    projBits: null,
    projGroupSize: null,
    stochasticRound: null,
    lazy: null,
    cosThreshold: null,
    queueSize: null,
    gamma: null,
    projRefresh: null,
    cosMode: null,
    quantRange: null,
  };
  const pick = (o: Record<string, unknown>) =>
    Object.fromEntries(
      [...Object.keys(none), "lr", "beta2", "eps", "blockSize", "fused"].map((k) => [k, o[k]]),
    );
  const lr = (o: string) => optimizerDefaults(o).lr;
  assert.deepEqual(pick(resolved("adamw")), {
    ...none,
    lr: lr("adamw"),
    beta2: 0.999,
    eps: 1e-8,
    blockSize: null,
    fused: false,
  });
  assert.deepEqual(pick(resolved("adam8bit")), {
    ...none,
    lr: lr("adam8bit"),
    beta2: 0.999,
    eps: 1e-8,
    blockSize: 2048,
    fused: false,
  });
  const galore = {
    ...none,
    rank: 128,
    updateGap: 200,
    galoreScale: 0.25,
    projBits: 16,
    lazy: false,
    projRefresh: "eigh",
    beta2: 0.999,
    fused: true,
  };
  assert.deepEqual(pick(resolved("galore")), {
    ...galore,
    lr: lr("galore"),
    eps: 1e-6,
    blockSize: null,
  });
  assert.deepEqual(pick(resolved("galore8bit")), {
    ...galore,
    lr: lr("galore8bit"),
    eps: 1e-8,
    blockSize: 2048,
  });
  assert.deepEqual(pick(resolved("qgalore")), {
    rank: 128,
    updateGap: 200,
    galoreScale: 0.25,
    weightBits: 8,
    weightGroupSize: 256,
    projBits: 4,
    projGroupSize: 256,
    stochasticRound: true,
    lazy: true,
    cosThreshold: 0.4,
    queueSize: 5,
    gamma: 2,
    projRefresh: "eigh",
    cosMode: "signed",
    quantRange: "zero",
    lr: lr("qgalore"),
    beta2: 0.95,
    eps: 1e-8,
    blockSize: 2048,
    fused: true,
  });
  // Given values win over the defaults; gradient accumulation turns the default fusion off.
  assert.equal(resolved("qgalore", { beta2: 0.999, lr: 3e-3 }).beta2, 0.999);
  assert.equal(resolved("qgalore", { beta2: 0.999, lr: 3e-3 }).lr, 3e-3);
  assert.equal(resolved("galore", { gradAccum: 2 }).fused, false);
  assert.equal(resolved("adamw", { fused: true }).fused, true);
  // qgalore with float weights: no INT8 settings; INT4 projectors keep a quantizer range.
  const f = resolved("qgalore", { weightBits: 16 });
  assert.deepEqual([f.weightGroupSize, f.stochasticRound, f.quantRange], [null, null, "zero"]);
  // galore with lazy refresh gets the lazy defaults.
  const l = resolved("galore", { lazy: true });
  assert.deepEqual([l.cosThreshold, l.queueSize, l.gamma, l.cosMode], [0.4, 5, 2, "signed"]);
  assert.throws(() => optimizerDefaults("sgd"), /--optimizer sgd: unknown optimizer/);
  // The help text shows each optimizer's defaults.
  assert.match(
    usage(),
    /--eps X +Adam ε \[adamw 1e-8, adam8bit 1e-8, galore 1e-6, galore8bit 1e-8, qgalore 1e-8, lora 1e-8, qlora 1e-8\]/,
  );
  // lora and qlora: PEFT's LLaMA defaults; lora_base is lora's only
  const lo = resolved("lora");
  assert.deepEqual(
    [lo.loraRank, lo.loraAlpha, lo.loraDropout, lo.loraTargets, lo.loraRslora, lo.loraBase],
    [8, 8, 0, "q_proj,v_proj", false, "bf16"],
  );
  assert.deepEqual([lo.rank, lo.projBits, lo.blockSize, lo.fused], [null, null, null, false]);
  assert.equal(resolved("qlora").loraBase, null);
  assert.equal(resolved("adamw").loraRank, null);
  for (const flag of ["--lora-rank", "--lora-targets", "--lora-base", "--lora-rslora"]) {
    assert.ok(usage().includes(flag), `usage lacks ${flag}`);
  }
  for (const flag of ["--rank", "--proj-bits", "--stochastic-round", "--cos-mode", "--fused"]) {
    assert.ok(usage().includes(flag), `usage lacks ${flag}`);
  }
});

Deno.test("bad lora flags are one-line errors naming the flag and what is allowed", () => {
  const l = ["--optimizer", "lora"];
  rejects(
    [...l, "--lora-targets", "q_proj,lm_head"],
    "--lora-targets q_proj,lm_head: must be a comma list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all-linear",
  );
  rejects([...l, "--lora-dropout", "1"], "--lora-dropout 1: must be a number in [0, 1)");
  rejects([...l, "--lora-rank", "0"], "--lora-rank 0: must be an integer ≥ 1 and ≤ 2147483648");
  rejects([...l, "--lora-base", "int4"], "--lora-base int4: must be one of bf16, f32");
  rejects(
    ["--optimizer", "qlora", "--lora-base", "f32"],
    "--lora-base f32: applies only to --optimizer lora",
  );
  rejects(
    ["--optimizer", "adamw", "--lora-rank", "4"],
    "--lora-rank 4: applies only to --optimizer lora, qlora",
  );
  // llama-9m's k_proj is 128×128: a rank above it is refused by the engine's fit check
  rejects(
    [...l, "--lora-rank", "200", "--lora-targets", "k_proj"],
    "--lora-rank 200: exceeds the 128×128 k_proj matrix",
  );
});

Deno.test("bad values of the optimizer flags name the flag, the value and what is allowed", () => {
  rejects(["--optimizer", "sgd"], "--optimizer sgd: unknown optimizer; allowed: adamw, adam8bit");
  rejects(["--optimizer", ""], '--optimizer "": unknown optimizer');
  const q = ["--optimizer", "qgalore"];
  rejects([...q, "--rank", "0"], "--rank 0: must be an integer ≥ 1 and ≤ 2147483648");
  rejects([...q, "--rank", "-4"], "--rank -4: must be an integer ≥ 1 and ≤ 2147483648");
  rejects([...q, "--rank", "2.5"], "--rank 2.5: must be an integer ≥ 1 and ≤ 2147483648");
  rejects([...q, "--update-gap", "0"], "--update-gap 0: must be an integer ≥ 1 and ≤ 2147483648");
  rejects([...q, "--galore-scale", "0"], "--galore-scale 0: must be a number in (0, 3.4e+38]");
  rejects([...q, "--weight-bits", "4"], "--weight-bits 4: must be one of 8, 16");
  rejects([...q, "--proj-bits", "2"], "--proj-bits 2: must be one of 4, 8, 16, 32");
  rejects([...q, "--proj-bits", "12"], "--proj-bits 12: must be one of 4, 8, 16, 32");
  rejects(
    [...q, "--weight-group-size", "255"],
    "--weight-group-size 255: must be an even integer in [2, 1024]",
  );
  rejects(
    [...q, "--proj-group-size", "2048"],
    "--proj-group-size 2048: must be an even integer in [2, 1024]",
  );
  rejects([...q, "--stochastic-round", "yes"], "--stochastic-round yes: must be on or off");
  rejects([...q, "--lazy", ""], '--lazy "": must be on or off');
  rejects([...q, "--fused", "1"], "--fused 1: must be on or off");
  rejects([...q, "--cos-threshold", "1.5"], "--cos-threshold 1.5: must be a number in [-1, 1]");
  rejects([...q, "--queue-size", "0"], "--queue-size 0: must be an integer in [1, 1000000]");
  rejects([...q, "--gamma", "0"], "--gamma 0: must be an integer in [1, 1000000]");
  rejects(
    [...q, "--proj-refresh", "qr"],
    "--proj-refresh qr: must be one of svd, eigh, randomized",
  );
  rejects([...q, "--cos-mode", "neg"], "--cos-mode neg: must be one of signed, abs");
  rejects(
    [...q, "--clip-mode", "sometimes"],
    "--clip-mode sometimes: must be one of auto, stash, two-backward",
  );
  rejects([...q, "--proj-grad", "lazy"], "--proj-grad lazy: must be one of full, factored");
  rejects([...q, "--quant-range", "full"], "--quant-range full: must be one of zero, reference");
  rejects([...q, "--block-size", "512"], "--block-size 512: must be one of 256, 2048");
  // Notebook-style options are type-checked as well.
  assert.throws(
    () => checkOptions({ optimizer: "qgalore", lazy: "on" as unknown as boolean }),
    /--lazy "on": must be true or false/,
  );
  assert.throws(
    () => checkOptions({ optimizer: "galore", projRefresh: "qr" }),
    /--proj-refresh qr: must be one of svd, eigh, randomized/,
  );
});

Deno.test("switches that do not apply to the optimizer are errors", () => {
  const proj = /applies only to --optimizer galore, galore8bit, qgalore \(not adamw\)/;
  rejects(["--rank", "64"], "--rank 64: ", proj);
  rejects(["--proj-bits", "4"], "--proj-bits 4: ", proj);
  rejects(["--update-gap", "10"], "--update-gap 10: ", proj);
  rejects(["--galore-scale", "1"], "--galore-scale 1: ", proj);
  rejects(["--proj-refresh", "svd"], "--proj-refresh svd: ", proj);
  rejects(["--lazy", "on"], "--lazy on: ", proj);
  rejects(["--cos-threshold", "0.5"], "--cos-threshold 0.5: ", proj);
  rejects(["--proj-group-size", "128"], "--proj-group-size 128: ", proj);
  rejects(["--clip-mode", "stash"], "--clip-mode stash: ", proj);
  rejects(["--proj-grad", "factored"], "--proj-grad factored: ", proj);
  rejects(
    ["--optimizer", "adam8bit", "--rank", "8"],
    "--rank 8: applies only to --optimizer galore, galore8bit, qgalore (not adam8bit)",
  );
  rejects(
    ["--block-size", "256"],
    "--block-size 256: applies only to the 8-bit optimizers adam8bit, galore8bit, qgalore",
  );
  rejects(
    ["--optimizer", "galore", "--block-size", "256"],
    "--block-size 256: applies only to the 8-bit optimizers",
    /\(not galore\)/,
  );
  for (const o of ["adamw", "adam8bit", "galore", "galore8bit"]) {
    rejects(
      ["--optimizer", o, "--weight-bits", "8"],
      `--weight-bits 8: INT8 weights need --optimizer qgalore (not ${o}); allowed here: 16`,
    );
  }
  const int8 = /applies only to INT8 weights \(--optimizer qgalore with --weight-bits 8\)/;
  rejects(
    ["--optimizer", "galore8bit", "--stochastic-round", "on"],
    "--stochastic-round on: ",
    int8,
  );
  rejects(
    ["--optimizer", "qgalore", "--weight-bits", "16", "--stochastic-round", "off"],
    "--stochastic-round off: ",
    int8,
  );
  rejects(
    ["--optimizer", "qgalore", "--weight-bits", "16", "--weight-group-size", "128"],
    "--weight-group-size 128: ",
    int8,
  );
  rejects(
    ["--optimizer", "galore", "--proj-group-size", "128"],
    "--proj-group-size 128: applies only with --proj-bits 4 or 8 (here 16)",
  );
  rejects(
    ["--optimizer", "galore", "--quant-range", "reference"],
    "--quant-range reference: applies only when something is quantized",
  );
  for (const [flag, v] of [["--cos-threshold", "0.5"], ["--queue-size", "3"], ["--gamma", "3"]]) {
    rejects(["--optimizer", "galore", flag, v], `${flag} ${v}: applies only with --lazy on`);
  }
  rejects(
    ["--optimizer", "qgalore", "--lazy", "off", "--cos-mode", "abs"],
    "--cos-mode abs: applies only with --lazy on",
  );
  rejects(
    ["--optimizer", "galore", "--fused", "on", "--grad-accum", "2"],
    "--fused on: needs --grad-accum 1 (here 2)",
  );
  // These do apply.
  for (
    const argv of [
      ["--weight-bits", "16"],
      ["--fused", "on"],
      ["--optimizer", "adam8bit", "--block-size", "256", "--fused", "on"],
      ["--optimizer", "galore", "--lazy", "on", "--gamma", "3", "--cos-mode", "abs"],
      ["--optimizer", "galore8bit", "--proj-bits", "8", "--quant-range", "reference"],
      ["--optimizer", "qgalore", "--weight-bits", "16", "--quant-range", "reference"],
      ["--optimizer", "qgalore", "--fused", "off", "--grad-accum", "2"],
    ]
  ) {
    const o = parsePretrainArgs(argv);
    assert.notEqual(o, "help");
    if (o !== "help") checkOptions(o);
  }
});

Deno.test("group sizes must divide every matrix of the model (weights and projectors)", () => {
  // llama-9m linears have 16384 (128×128) and 45056 (352×128) elements; gcd 4096.
  rejects(
    ["--optimizer", "qgalore", "--weight-group-size", "6"],
    "--weight-group-size 6: does not divide the 128×128 q matrix of llama-9m (16384 elements); " +
      "use an even divisor of 4096",
  );
  const ok = checkOptions({ optimizer: "qgalore", weightGroupSize: 1024 });
  assert.equal(ok.opts.weightGroupSize, 1024);
  // Rank 3: every projector has 3×128 = 384 elements, which 256 does not divide.
  rejects(
    ["--optimizer", "qgalore", "--rank", "3"],
    "--proj-group-size 256 (default): does not divide the 3×128 projector of the q matrix of llama-9m " +
      "(384 elements at rank 3); use an even divisor of 384",
  );
  assert.equal(checkOptions({ optimizer: "qgalore", rank: 3, projGroupSize: 128 }).opts.rank, 3);
  rejects(
    ["--optimizer", "galore", "--rank", "5", "--proj-bits", "8", "--proj-group-size", "256"],
    "--proj-group-size 256: does not divide the 5×128 projector of the q matrix",
  );
  // The left projector of down (128×352, wide) is rows × r' = 128×5, also 640 elements.
  assert.equal(
    checkOptions({ optimizer: "galore", rank: 5, projBits: 8, projGroupSize: 128 }).opts.rank,
    5,
  );
  // A GQA config: k and v are 64×128 (2 KV heads of 4); rank 96 clamps them to 64, and
  // their (left, since rows < cols) 64×64 projectors still divide 256.
  const dir = Deno.makeTempDirSync();
  try {
    const path = join(dir, "gqa.json");
    Deno.writeTextFileSync(
      path,
      JSON.stringify({
        hidden_size: 128,
        intermediate_size: 300,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: 2,
      }),
    );
    // 300×128 = 38400 = 2^9·75: 1024 does not divide it, 512 does.
    rejects(
      ["--model", path, "--optimizer", "qgalore", "--weight-group-size", "1024"],
      `--weight-group-size 1024: does not divide the 300×128 gate matrix of ${path}`,
      /use an even divisor of 512$/,
    );
    const c = checkOptions({ model: path, optimizer: "qgalore", rank: 96 });
    assert.equal(c.notices.length, 1);
    assert.match(c.notices[0], /--rank 96 exceeds the size of some .*gqa\.json matrices/);
    assert.match(c.notices[0], /clamped per matrix to min\(rank, rows, cols\): 64 for k, v$/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("a rank above a matrix's size is clamped with a one-line notice", () => {
  const c = checkOptions({ optimizer: "galore", rank: 200 });
  assert.equal(c.opts.rank, 200);
  assert.deepEqual(c.notices, [
    "notice: --rank 200 exceeds the size of some llama-9m matrices; clamped per matrix to " +
    "min(rank, rows, cols): 128 for q, k, v, o, gate, up, down",
  ]);
  assert.deepEqual(checkOptions({ optimizer: "galore", rank: 128 }).notices, []);
  assert.deepEqual(checkOptions({ optimizer: "adamw" }).notices, []);
});

Deno.test("the option table sets every engine option exactly once", () => {
  const fields = Object.values(OPTION_TABLE).flatMap((d) => d.engine ?? d.run ?? []);
  const schema = engineOptions();
  const engine = [...schema.options, ...schema.run].map((o) => o.name);
  assert.deepEqual([...fields].sort(), [...engine].sort());
});

Deno.test("engine messages name flags where they name a setting", () => {
  assert.equal(
    flagNames("device cuda: no GPU; use device cpu or auto"),
    "--device cuda: no GPU; use --device cpu or auto",
  );
  // a value the engine quotes back stays as it is
  assert.equal(
    flagNames(
      "precision = bf16: no usable GPU, and the CPU needs AVX512-BF16 or AMX-BF16; use precision fp32 or auto",
    ),
    "precision = bf16: no usable GPU, and the CPU needs AVX512-BF16 or AMX-BF16; use --precision fp32 or auto",
  );
  assert.equal(
    flagNames("proj_grad factored needs clip 0 (why): use proj_grad full, or clip 0"),
    "--proj-grad factored needs --clip 0 (why): use --proj-grad full, or --clip 0",
  );
});
