/**
 * Side-by-side fine-tuning: the same model and data through full-parameter AdamW, 8-bit Adam,
 * GaLore, 8-bit GaLore, Q-GaLore, LoRA and QLoRA (the library's {@link finetune} once per
 * method), then one table of engine-tracked bytes (weights, adapters, optimizer state,
 * projectors), peak memory, tokens/s, validation loss and multiple-choice accuracy.
 *
 *     deno run -A examples/finetune_compare.ts                     # built-in base + synthetic task
 *     deno run -A examples/finetune_compare.ts --model models/llama-1b --data train.jsonl \
 *         --val-data val.jsonl --mc mmlu_test.csv --steps 500 --seq-len 512
 *     deno run -A examples/finetune_compare.ts --methods qgalore,lora,qlora --json
 *     deno run -A examples/finetune_compare.ts --help
 *
 * The base: `--model DIR` (a Hugging Face LLaMA folder); without it a random-init model of
 * the preset `--preset` (default llama-9m) with a 512-id byte-level BPE trained on the
 * training text, written once as a Hugging Face folder in a temporary directory so that every
 * method starts from the same bytes.
 * The data: `--data`/`--val-data`/`--mc` files, or (`--synthetic`, the default without
 * `--data`) the seeded keyword → group multiple-choice task of lib/synthetic_mc.ts. With the
 * synthetic task the base is first warmed up (`--warm-steps`, default 300 for the built-in
 * base): full AdamW on the same format with other groups and on the task's facts without
 * the format, so that it knows the answers but starts at chance, as a pretrained model
 * would (a random-init base's frozen embeddings and head leave LoRA at chance; see
 * lib/synthetic_mc.ts). Measured on llama-9m, 300 updates, 64 held-out questions (chance
 * 25%, the warmed base 17%): adamw 93.8%, adam8bit 95.3%, galore 93.8%, galore8bit 82.8%,
 * qgalore 92.2%, lora 90.6%, qlora 90.6%.
 *
 * Ranks: `--rank` (GaLore family, default 8) and `--lora-rank` (default 8, alpha 16,
 * targets all-linear as the QLoRA paper trains): the GaLore paper's fine-tuning
 * comparisons run GaLore and LoRA at the same small rank (4 and 8), and its and the
 * Q-GaLore paper's fine-tuning tables put LoRA, QLoRA and (Q-)GaLore side by side at a matched
 * rank; pass larger ranks for larger models.
 *
 * Each method runs in its own process (this script started again with `--child`), which
 * calls {@link finetune} and hands back its summary: peak memory is the process's peak
 * resident set (VmHWM), a process-wide high-water mark that would otherwise carry one
 * method's peak into the next. `--isolate off` runs them in this process instead (faster
 * start, but the peak column then shows the process's peak so far, marked `≥`).
 *
 * Exit codes: 0 done (a method that diverged is a row with its error), 1 engine failure,
 * 2 usage error.
 *
 * @module
 */

// First: a missing or stale engine library is one line, before the options open it.
import "../ffi/preflight.ts";
import { join } from "node:path";
import { Engine, EngineError } from "../ffi/engine.ts";
import { LoadError } from "../ffi/loader.ts";
import { parseScriptArgs, type ScriptFlag } from "../lib/cli.ts";
import { UsageError } from "../lib/errors.ts";
import { finetune, FINETUNE_LR, type FinetuneOptions } from "../lib/finetune.ts";
import { exportModel } from "../lib/hf.ts";
import { formatCount } from "../lib/log.ts";
import { checkOptions, engineConfig } from "../lib/options.ts";
import { modelConfig, PRESET_NAMES } from "../lib/presets.ts";
import {
  knowledgePairs,
  pairsJsonl,
  type PromptCompletion,
  syntheticMc,
  WARMUP_GROUPS,
  writeSyntheticMc,
} from "../lib/synthetic_mc.ts";
import { trainTokenizer } from "../lib/tokenizer.ts";
import { DivergedError, type Summary } from "../lib/summary.ts";

/** The seven methods, in the table's order. */
export const METHODS: readonly string[] = Object.freeze([
  "adamw",
  "adam8bit",
  "galore",
  "galore8bit",
  "qgalore",
  "lora",
  "qlora",
]);

const PROJECTED = ["galore", "galore8bit", "qgalore"];
const ADAPTER = ["lora", "qlora"];

/**
 * Peak learning rates for a random-init base on the synthetic task, measured with the warm-up
 * on llama-9m (300 updates of batch 8: adamw 93.8%, adam8bit 95.3%, galore 93.8%,
 * galore8bit 82.8%, qgalore 92.2%, lora and qlora 90.6% on 64 held-out questions; qlora
 * diverged at 1e-2) and on the 2-layer test fixture (tests/finetune_e2e_test.ts). A
 * pretrained `--model` takes fine-tuning's rates ({@link FINETUNE_LR}) instead.
 */
export const SYNTHETIC_LR: Readonly<Record<string, number>> = Object.freeze({
  adamw: 3e-3,
  adam8bit: 3e-3,
  galore: 1e-2,
  galore8bit: 1e-2,
  qgalore: 5e-3,
  lora: 3e-3,
  qlora: 3e-3,
});

/** Settings of {@link compareMethods}. */
export interface CompareOptions {
  /** Hugging Face model folder; null: a random-init `preset` with a BPE of the training text. */
  model: string | null;
  /** Preset of the built-in base. */
  preset: string;
  /** Methods to run, from {@link METHODS}. */
  methods: string[];
  /** Training JSONL; null: the synthetic task. */
  data: string | null;
  /** Validation JSONL; null: split off `data` (or the synthetic task's). */
  valData: string | null;
  /** Multiple-choice items (MMLU CSV/JSONL); null: none (the synthetic task brings its own). */
  mc: string | null;
  /** Synthetic task: training examples, test items, choice order. */
  synthetic: { train: number; test: number; order: "fixed" | "shuffled" };
  /** Updates per method. */
  steps: number;
  /**
   * Synthetic task only: full AdamW updates that warm the base up first on the same format
   * with other groups (WARMUP_GROUPS) and on the task's facts without the format
   * (knowledgePairs); 0: none.
   */
  warmSteps: number;
  /** Sequences per micro-batch. */
  batchSize: number;
  /** Longest example in tokens. */
  seqLen: number;
  /** Micro-batches per update. */
  gradAccum: number;
  /** Seed of the base, the task and every run. */
  seed: number;
  /** Engine threads (null: the engine's choice). */
  threads: number | null;
  /** Per-method peak learning rates (missing: {@link SYNTHETIC_LR} or {@link FINETUNE_LR}). */
  lr: Record<string, number>;
  /** GaLore / Q-GaLore rank. */
  rank: number;
  /** GaLore projector refresh interval (null: the engine's default). */
  updateGap: number | null;
  /** Q-GaLore projector / weight quantization group sizes (null: the engine's defaults). */
  projGroupSize: number | null;
  /** Q-GaLore INT8 weight group size (null: the engine's default). */
  weightGroupSize: number | null;
  /** LoRA rank, alpha, target modules. */
  loraRank: number;
  /** LoRA alpha. */
  loraAlpha: number;
  /** LoRA target modules (comma list or all-linear). */
  loraTargets: string;
  /** Run each method in its own process (exact per-method peak memory). */
  isolate: boolean;
  /** Folder for the per-method run folders (`<out>/<method>`); null: none written. */
  out: string | null;
  /** Progress lines on stderr. */
  verbose: boolean;
}

/** One method's row of the table. */
export interface CompareRow {
  /** Method (optimizer name). */
  method: string;
  /** Peak learning rate used. */
  lr: number;
  /** Engine-tracked bytes at the end of the run. */
  weights: number;
  /** LoRA adapters (0 for the others). */
  adapters: number;
  /** Optimizer state bytes. */
  optimizer_state: number;
  /** Projector bytes (GaLore family). */
  projector: number;
  /** Gradient buffers. */
  grads: number;
  /** Activation buffers. */
  activations: number;
  /** All tracked bytes. */
  total: number;
  /** Peak resident set of the process that ran the method (bytes), or null. */
  peak_rss: number | null;
  /** `method`: the method's own process; `process`: the shared process's peak so far. */
  peak_scope: "method" | "process";
  /** Training throughput (real, non-padding tokens per second). */
  tokens_per_s: number;
  /** Validation loss (completion tokens only) before and after training. */
  initial_val_loss: number | null;
  /** Validation loss after training. */
  val_loss: number | null;
  /** Multiple-choice accuracy, items and chance, or null without items. */
  mc: { accuracy: number; correct: number; total: number; chance: number } | null;
  /** Wall time of the run in seconds (engine set-up, training, evaluation). */
  wall_s: number;
  /** Why the run stopped early (divergence), else null. */
  error: string | null;
}

/** The comparison's result. */
export interface CompareResult {
  /** What the base was. */
  base: string;
  /** What the data were. */
  data: string;
  /** One row per method, in the order asked. */
  rows: CompareRow[];
}

const FLAGS: Readonly<Record<string, ScriptFlag>> = Object.freeze({
  model: { type: "string" },
  preset: { type: "choice", choices: PRESET_NAMES.slice(0, 4) },
  methods: { type: "string" },
  data: { type: "string" },
  "val-data": { type: "string" },
  mc: { type: "string" },
  synthetic: { type: "switch" },
  "train-examples": { type: "int", min: 8, max: 1_000_000 },
  "test-items": { type: "int", min: 4, max: 10_000 },
  order: { type: "choice", choices: ["fixed", "shuffled"] },
  steps: { type: "int", min: 1, max: 1_000_000 },
  "warm-steps": { type: "int", min: 0, max: 1_000_000 },
  "batch-size": { type: "int", min: 1, max: 4096 },
  "seq-len": { type: "int", min: 8, max: 1 << 20 },
  "grad-accum": { type: "int", min: 1, max: 4096 },
  seed: { type: "int", min: 0, max: 2 ** 31 - 1 },
  threads: { type: "int", min: 1, max: 1024 },
  lr: { type: "string" },
  rank: { type: "int", min: 1, max: 65536 },
  "update-gap": { type: "int", min: 1, max: 1_000_000 },
  "proj-group-size": { type: "int", min: 1, max: 1 << 20 },
  "weight-group-size": { type: "int", min: 1, max: 1 << 20 },
  "lora-rank": { type: "int", min: 1, max: 65536 },
  "lora-alpha": { type: "number", min: 0, open: true, max: 1e6 },
  "lora-targets": { type: "string" },
  isolate: { type: "choice", choices: ["on", "off"] },
  out: { type: "string" },
  json: { type: "switch" },
  child: { type: "string" },
});

/** The defaults of {@link CompareOptions}. */
export function defaultCompareOptions(): CompareOptions {
  return {
    model: null,
    preset: "llama-9m",
    methods: [...METHODS],
    data: null,
    valData: null,
    mc: null,
    synthetic: { train: 800, test: 64, order: "fixed" },
    steps: 300,
    warmSteps: 300,
    batchSize: 8,
    seqLen: 256,
    gradAccum: 1,
    seed: 0,
    threads: null,
    lr: {},
    rank: 8,
    updateGap: null,
    projGroupSize: null,
    weightGroupSize: null,
    loraRank: 8,
    loraAlpha: 16,
    loraTargets: "all-linear",
    isolate: true,
    out: null,
    verbose: true,
  };
}

/** `adamw=3e-3,lora=1e-2` or one number for every method. */
function parseLr(text: string): Record<string, number> {
  const bad = (why: string): never => {
    throw new UsageError(
      `--lr ${text}: ${why}; give one number or METHOD=LR,… (methods: ${METHODS.join(", ")})`,
    );
  };
  const num = (s: string): number => {
    const v = Number(s);
    if (s.trim() === "" || !Number.isFinite(v) || v <= 0) bad(`${s || '""'} is not a number > 0`);
    return v;
  };
  if (!text.includes("=")) return Object.fromEntries(METHODS.map((m) => [m, num(text)]));
  const out: Record<string, number> = {};
  for (const part of text.split(",")) {
    const [m, v, ...rest] = part.split("=");
    if (rest.length > 0 || v === undefined) bad(`${part || '""'} is not METHOD=LR`);
    if (!METHODS.includes(m)) bad(`unknown method ${m || '""'}`);
    out[m] = num(v);
  }
  return out;
}

/** Parses the command line; "help" for `--help`. Throws one-line UsageErrors. */
export function parseCompareArgs(
  argv: string[],
): (CompareOptions & { json: boolean; child: string | null }) | "help" {
  const a = parseScriptArgs(argv, FLAGS);
  if (a === "help") return "help";
  const o = defaultCompareOptions();
  const str = (k: string) => a[k] as string | undefined;
  const int = (k: string) => a[k] as number | undefined;
  o.model = str("model") ?? null;
  if (o.model !== null && a.preset !== undefined) {
    throw new UsageError(`--preset ${a.preset}: not with --model (the base is the model folder)`);
  }
  o.preset = str("preset") ?? o.preset;
  if (a.methods !== undefined) {
    const ms = str("methods")!.split(",");
    for (const m of ms) {
      if (!METHODS.includes(m)) {
        throw new UsageError(
          `--methods ${a.methods}: unknown method ${m || '""'}; allowed: ${METHODS.join(", ")}`,
        );
      }
    }
    if (new Set(ms).size !== ms.length) {
      throw new UsageError(`--methods ${a.methods}: a method is named twice`);
    }
    o.methods = ms;
  }
  o.data = str("data") ?? null;
  o.valData = str("val-data") ?? null;
  o.mc = str("mc") ?? null;
  if (a.synthetic === true && o.data !== null) {
    throw new UsageError(`--synthetic: not with --data ${o.data} (the task brings its own data)`);
  }
  if (o.data === null) {
    for (const f of ["val-data", "mc"]) {
      if (a[f] !== undefined) {
        throw new UsageError(`--${f} ${a[f]}: needs --data (the synthetic task brings its own)`);
      }
    }
  } else {
    for (const f of ["train-examples", "test-items", "order"]) {
      if (a[f] !== undefined) throw new UsageError(`--${f} ${a[f]}: only with the synthetic task`);
    }
  }
  o.synthetic = {
    train: int("train-examples") ?? o.synthetic.train,
    test: int("test-items") ?? o.synthetic.test,
    order: (str("order") ?? o.synthetic.order) as "fixed" | "shuffled",
  };
  o.steps = int("steps") ?? o.steps;
  if (o.model !== null && a["warm-steps"] !== undefined) {
    throw new UsageError(
      `--warm-steps ${a["warm-steps"]}: only for the built-in base (not --model)`,
    );
  }
  o.warmSteps = int("warm-steps") ?? o.warmSteps;
  o.batchSize = int("batch-size") ?? o.batchSize;
  o.seqLen = int("seq-len") ?? o.seqLen;
  o.gradAccum = int("grad-accum") ?? o.gradAccum;
  o.seed = int("seed") ?? o.seed;
  o.threads = int("threads") ?? null;
  o.lr = a.lr === undefined ? {} : parseLr(str("lr")!);
  o.rank = int("rank") ?? o.rank;
  o.updateGap = int("update-gap") ?? null;
  o.projGroupSize = int("proj-group-size") ?? null;
  o.weightGroupSize = int("weight-group-size") ?? null;
  o.loraRank = int("lora-rank") ?? o.loraRank;
  o.loraAlpha = (a["lora-alpha"] as number | undefined) ?? o.loraAlpha;
  o.loraTargets = str("lora-targets") ?? o.loraTargets;
  o.isolate = (str("isolate") ?? "on") === "on";
  o.out = str("out") ?? null;
  return { ...o, json: a.json === true, child: str("child") ?? null };
}

/** The {@link finetune} options of one method of the comparison. */
export function methodOptions(
  o: CompareOptions,
  method: string,
  files: { model: string; data: string; valData: string | null; mc: string | null },
): Partial<FinetuneOptions> {
  const pretrained = o.model !== null;
  const lr = o.lr[method] ?? (pretrained ? FINETUNE_LR[method] : SYNTHETIC_LR[method]);
  const run: Partial<FinetuneOptions> = {
    model: files.model,
    data: files.data,
    valData: files.valData,
    mc: files.mc,
    optimizer: method,
    lr,
    steps: o.steps,
    batchSize: o.batchSize,
    seqLen: o.seqLen,
    gradAccum: o.gradAccum,
    seed: o.seed,
    // validation before the first update and after the last
    evalEvery: o.steps,
    device: "cpu",
    saveEvery: "off",
    out: o.out === null ? null : join(o.out, method),
    quiet: true,
    handleSigint: false,
  };
  if (o.threads !== null) run.threads = o.threads;
  if (PROJECTED.includes(method)) {
    run.rank = o.rank;
    if (o.updateGap !== null) run.updateGap = o.updateGap;
  }
  if (method === "qgalore") {
    if (o.projGroupSize !== null) run.projGroupSize = o.projGroupSize;
    if (o.weightGroupSize !== null) run.weightGroupSize = o.weightGroupSize;
  }
  if (ADAPTER.includes(method)) {
    Object.assign(run, {
      loraRank: o.loraRank,
      loraAlpha: o.loraAlpha,
      loraTargets: o.loraTargets,
    });
  }
  return run;
}

/** A summary as a table row. */
function rowOf(
  method: string,
  lr: number,
  s: Summary,
  wallS: number,
  scope: "method" | "process",
  error: string | null,
): CompareRow {
  const m = s.memory;
  const f = (s.finetune ?? {}) as {
    val_loss?: number | null;
    mc?: CompareRow["mc"];
  };
  return {
    method,
    lr,
    weights: m.weights,
    adapters: m.adapters,
    optimizer_state: m.optimizer_state,
    projector: m.projector,
    grads: m.grads,
    activations: m.activations,
    total: m.total,
    peak_rss: m.peak_rss,
    peak_scope: scope,
    tokens_per_s: s.tokens_per_s,
    initial_val_loss: s.initial_val_loss,
    val_loss: f.val_loss ?? s.val_loss,
    mc: f.mc === null || f.mc === undefined
      ? null
      : { accuracy: f.mc.accuracy, correct: f.mc.correct, total: f.mc.total, chance: f.mc.chance },
    wall_s: wallS,
    error,
  };
}

/** Runs {@link finetune} with `opts`; a divergence still gives its summary and the reason. */
async function runOne(
  opts: Partial<FinetuneOptions>,
): Promise<{ summary: Summary; error: string | null }> {
  try {
    return { summary: await finetune(opts), error: null };
  } catch (e) {
    if (e instanceof DivergedError) return { summary: e.summary, error: e.message };
    throw e;
  }
}

/**
 * {@link finetune} with `opts` in a child process (this script with `--child`), so that the
 * summary's peak RSS is this run's alone: its summary and, for a divergence, the reason.
 */
export async function runIsolated(
  opts: Partial<FinetuneOptions>,
): Promise<{ summary: Summary; error: string | null }> {
  const script = new URL(import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, "--child", JSON.stringify(opts)],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const lines = new TextDecoder().decode(out.stdout).trim().split("\n");
  const err = new TextDecoder().decode(out.stderr).trim().split("\n").filter((l) => l !== "");
  const last = lines[lines.length - 1] ?? "";
  if (out.code !== 0 || !last.startsWith("{")) {
    const why = err.find((l) => l.startsWith("error: ")) ?? err[err.length - 1] ??
      `exit ${out.code}`;
    const msg = why.replace(/^error: /, "");
    throw out.code === 2 ? new UsageError(msg) : new Error(`--methods ${opts.optimizer}: ${msg}`);
  }
  return JSON.parse(last);
}

/**
 * Writes a random-init model of `preset` (seed `seed`) as a Hugging Face folder `dir`: the
 * base every method of a comparison without `--model` starts from. Its tokenizer is a
 * byte-level BPE of `vocab` ids trained on `corpus` (the task's training text), so that the
 * task's words are single tokens as they are for a real model's tokenizer; a byte tokenizer
 * would make a tiny random-init model spell every keyword out (it stays at chance for
 * hundreds of updates).
 */
export async function writePresetBase(
  preset: string,
  seed: number,
  dir: string,
  corpus: string,
  vocab = 512,
): Promise<void> {
  const work = await Deno.makeTempDir({ prefix: "qgalore-base-" });
  try {
    const text = join(work, "corpus.txt");
    await Deno.writeTextFile(text, corpus);
    const tok = await trainTokenizer({ inputs: [text], vocabSize: vocab, out: join(work, "tok") });
    const { opts } = checkOptions({
      model: preset,
      optimizer: "adamw",
      seed,
      seqLen: 8,
      batchSize: 1,
      device: "cpu",
    });
    using engine = await Engine.create(engineConfig(opts, modelConfig(preset, tok.vocabSize)));
    await exportModel(engine, dir, { dtype: "f32", tokenizer: tok });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
}

/**
 * Fine-tunes the same base on the same data with each of `o.methods` and returns one row per
 * method. Temporary files (the built-in base, the synthetic task) are removed afterwards.
 */
export async function compareMethods(
  o: CompareOptions,
  log: (line: string) => void = (l) => console.error(l),
): Promise<CompareResult> {
  const tmp = await Deno.makeTempDir({ prefix: "qgalore-compare-" });
  try {
    let files: { data: string; valData: string | null; mc: string | null };
    let data: string;
    let corpus: string;
    if (o.data === null) {
      const task = syntheticMc({ seed: o.seed, ...o.synthetic });
      const f = await writeSyntheticMc(join(tmp, "task"), task);
      files = { data: f.train, valData: f.val, mc: f.test };
      data = `synthetic multiple choice (${o.synthetic.order} order, seed ${o.seed}): ` +
        `${o.synthetic.train} training examples, ${o.synthetic.test} held-out questions`;
      corpus = task.train.map((p) => p.prompt + p.completion).join("\n\n");
    } else {
      files = { data: o.data, valData: o.valData, mc: o.mc };
      data = o.data;
      corpus = o.model === null ? await Deno.readTextFile(o.data) : "";
    }
    // the warm-up (synthetic task only): this format on other groups, and the task's facts
    // without the format, so that the base knows the answers but not how to give them
    const warmTask = syntheticMc({
      seed: o.seed + 1,
      train: 800,
      test: 16,
      order: o.synthetic.order,
      groups: WARMUP_GROUPS,
    });
    const warmPairs = interleave(warmTask.train, knowledgePairs(o.seed, 800));
    const warming = o.warmSteps > 0 && o.data === null;
    let model = o.model;
    let base: string;
    let init = model;
    if (model === null) {
      init = join(tmp, "init");
      const text = corpus + "\n\n" + warmPairs.map((p) => p.prompt + p.completion).join("\n\n");
      await writePresetBase(o.preset, o.seed, init, text);
      base = `${o.preset} random init (seed ${o.seed}), 512-id BPE trained on the training text`;
    } else {
      base = model;
    }
    if (warming) {
      await Deno.mkdir(join(tmp, "warm"));
      const warm = { train: join(tmp, "warm", "train.jsonl"), val: join(tmp, "warm", "val.jsonl") };
      await Deno.writeTextFile(warm.train, pairsJsonl(warmPairs));
      await Deno.writeTextFile(warm.val, pairsJsonl(warmTask.val));
      model = join(tmp, "base");
      if (o.verbose) log(`base: ${o.warmSteps} full AdamW updates on the warm-up task…`);
      const w = await finetune({
        ...methodOptions({ ...o, steps: o.warmSteps, out: null }, "adamw", {
          model: init!,
          data: warm.train,
          valData: warm.val,
          mc: files.mc,
        }),
        export: model,
        exportDtype: "f32",
      });
      const acc = (w.finetune as { mc?: { accuracy: number } | null }).mc?.accuracy;
      base += `, warmed up by ${o.warmSteps} AdamW updates on the format with other groups ` +
        `(${Object.keys(WARMUP_GROUPS).join(", ")}) and on the task's facts without it` +
        (acc === undefined ? "" : ` (its accuracy on the task: ${(100 * acc).toFixed(1)}%)`);
    } else {
      model = init!;
    }
    const rows: CompareRow[] = [];
    for (const method of o.methods) {
      const opts = methodOptions(o, method, { model, ...files });
      if (o.verbose) log(`${method}: ${o.steps} updates at lr ${opts.lr}…`);
      const t0 = performance.now();
      const { summary, error } = o.isolate ? await runIsolated(opts) : await runOne(opts);
      const wall = (performance.now() - t0) / 1000;
      const row = rowOf(method, opts.lr!, summary, wall, o.isolate ? "method" : "process", error);
      rows.push(row);
      if (o.verbose) {
        log(
          `${method}: val loss ${fmt(row.initial_val_loss)} → ${fmt(row.val_loss)}, accuracy ` +
            `${row.mc === null ? "-" : (100 * row.mc.accuracy).toFixed(1) + "%"}, ${
              wall.toFixed(1)
            } s` +
            (error === null ? "" : ` (${error})`),
        );
      }
    }
    return { base, data, rows };
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
}

/** a0, b0, a1, b1, …, then the rest of the longer one. */
function interleave(a: PromptCompletion[], b: PromptCompletion[]): PromptCompletion[] {
  const out: PromptCompletion[] = [];
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (i < a.length) out.push(a[i]);
    if (i < b.length) out.push(b[i]);
  }
  return out;
}

function fmt(x: number | null): string {
  return x === null ? "-" : x.toFixed(3);
}

function bytes(n: number | null): string {
  if (n === null) return "-";
  if (n === 0) return "0";
  const units = ["B", "KiB", "MiB", "GiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${units[u]}`;
}

/** The aligned table of a comparison. */
export function formatTable(r: CompareResult): string {
  const head = [
    "method",
    "weights",
    "adapters",
    "opt state",
    "projector",
    "peak RSS",
    "tokens/s",
    "val loss",
    "MC acc",
  ];
  const body = r.rows.map((x) => [
    x.method + (x.error === null ? "" : " (diverged)"),
    bytes(x.weights),
    bytes(x.adapters),
    bytes(x.optimizer_state),
    bytes(x.projector),
    (x.peak_scope === "process" ? "≥" : "") + bytes(x.peak_rss),
    formatCount(x.tokens_per_s),
    `${fmt(x.initial_val_loss)} → ${fmt(x.val_loss)}`,
    x.mc === null ? "-" : `${(100 * x.mc.accuracy).toFixed(1)}% (${x.mc.correct}/${x.mc.total})`,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  const chance = r.rows.find((x) => x.mc !== null)?.mc?.chance;
  return [
    `base: ${r.base}`,
    `data: ${r.data}`,
    line(head),
    ...body.map(line),
    chance === undefined ? "" : `multiple-choice chance: ${(100 * chance).toFixed(1)}%`,
    "bytes are the engine's tracked bytes at the end of each run; " +
    (r.rows.some((x) => x.peak_scope === "process")
      ? "peak RSS (≥) is the shared process's peak so far"
      : "peak RSS is each method's own process"),
  ].filter((l) => l !== "").join("\n");
}

/** Runs the CLI and returns the exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    const args = parseCompareArgs(argv);
    if (args === "help") {
      console.log(HELP);
      return 0;
    }
    if (args.child !== null) {
      // one method for a parent comparison: its summary as the last stdout line
      const r = await runOne(JSON.parse(args.child));
      console.log(JSON.stringify(r));
      return 0;
    }
    const { json, child: _, ...o } = args;
    const result = await compareMethods({ ...o, verbose: !json });
    if (json) console.log(JSON.stringify(result));
    else console.log(formatTable(result));
    return 0;
  } catch (e) {
    if (e instanceof UsageError) return fail(e.message, 2);
    if (e instanceof EngineError || e instanceof LoadError) return fail(e.message, 1);
    if (e instanceof Error && !(e instanceof TypeError)) return fail(e.message, 1);
    throw e;
  }
}

function fail(message: string, code: number): number {
  console.error(`error: ${message.replace(/\s*\n\s*/g, " ")}`);
  return code;
}

const HELP = `Fine-tune one base with several methods and compare them in one table.

Usage: deno run -A examples/finetune_compare.ts [flags]

Base and data:
  --model DIR            Hugging Face LLaMA folder (default: a random-init --preset with a BPE
                         trained on the training text)
  --preset NAME          built-in base without --model: ${
  PRESET_NAMES.slice(0, 4).join(", ")
} [llama-9m]
  --data FILE            training JSONL (text, prompt+completion or messages)
  --val-data FILE        validation JSONL [a split of --data]
  --mc FILE              multiple-choice items (MMLU CSV or JSONL) to score after training
  --synthetic            the seeded keyword → group multiple-choice task (default without --data)
  --train-examples N     synthetic training examples [800]
  --test-items N         synthetic held-out questions [64]
  --order fixed|shuffled synthetic choice order [fixed]

Methods:
  --methods LIST         comma list of ${METHODS.join(", ")} [all]
  --lr X | M=X,…         peak learning rate(s) [random-init base: ${
  Object.entries(SYNTHETIC_LR).map(([k, v]) => `${k} ${v}`).join(", ")
}; --model: fine-tuning defaults]
  --rank N               GaLore / Q-GaLore rank [8]
  --update-gap N         GaLore projector refresh interval [engine default]
  --proj-group-size N    Q-GaLore INT4 projector group size [engine default]
  --weight-group-size N  Q-GaLore INT8 weight group size [engine default]
  --lora-rank N          LoRA / QLoRA rank [8]
  --lora-alpha X         LoRA alpha [16]
  --lora-targets LIST    adapted modules, comma list or all-linear [all-linear]

Run:
  --steps N              updates per method [300]
  --warm-steps N         synthetic task: full AdamW updates first on the format with other
                         groups and on the task's facts without the format, so the base
                         knows the answers but not how to give them (a pretrained
                         stand-in; its accuracy starts at chance) [300 for the built-in
                         base, 0 with --model]
  --batch-size N         sequences per micro-batch [8]
  --seq-len N            longest example in tokens [256]
  --grad-accum N         micro-batches per update [1]
  --seed N               seed of the base, the task and every run [0]
  --threads N            engine threads [engine default]
  --isolate on|off       each method in its own process, for its own peak memory [on]
  --out DIR              keep each run's folder as DIR/<method> [none]
  --json                 print the rows as one JSON object
`;

if (import.meta.main) Deno.exit(await main(Deno.args));
