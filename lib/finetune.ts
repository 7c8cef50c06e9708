/**
 * Fine-tuning a pretrained model: a Hugging Face model folder (`--model DIR`) trained on
 * instruction data (JSONL: `text`, `prompt` + `completion`, or chat `messages`; see
 * lib/finetune_data.ts) with any of the engine's optimizers, through the same loop as
 * pre-training ({@link trainWith}): checkpoints, `--resume`, divergence handling, export.
 *
 * ```ts
 * const summary = await finetune({
 *   model: "models/llama-1b", data: "train.jsonl", optimizer: "qgalore", steps: 200,
 * });
 * ```
 *
 * What differs from pre-training: the batches come from a {@link FinetuneSampler} (examples
 * of similar length together, padded positions and prompts carry no loss, its position is
 * stored in each checkpoint so that a resumed run draws the identical batches), validation
 * is the token-weighted masked loss over every held-out example, the learning rates default
 * to fine-tuning's ({@link FINETUNE_LR}), and the summary adds the data counts, the
 * validation perplexity and, with `--mc`, multiple-choice accuracy.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { join, resolve } from "node:path";
import type { Engine } from "../ffi/engine.ts";
import { shortValue, UsageError } from "./errors.ts";
import { readAdapterConfig } from "./adapter.ts";
import { isDirectory } from "./fs.ts";
import {
  evalBatches,
  type FinetuneBatch,
  type FinetuneData,
  FinetuneSampler,
  loadFinetuneData,
  type SamplerState,
  splitFinetuneData,
} from "./finetune_data.ts";
import {
  ADAPTER_OPTIMIZERS,
  checkExportDir,
  checkSource,
  FLAG,
  type ResolvedOptions,
  type TrainOptions,
} from "./options.ts";
import { loadMultipleChoice, type McItem, type McResult, scoreMultipleChoice } from "./mmlu.ts";
import type { Tokenizer } from "./tokenizer.ts";
import type { OwnedData } from "./checkpoints.ts";
import { allreduceSum, world } from "./dist.ts";
import { writeOwnFile } from "./run_files.ts";
import type {
  BatchSource,
  EvalRecord,
  RunTask,
  TrainBatch,
  TrainEngine,
  TrainHooks,
  ValResult,
} from "./run_types.ts";
import { DivergedError, type Summary } from "./summary.ts";
import { type Run, trainWith } from "./trainer.ts";

/**
 * Peak learning rates of fine-tuning when `lr` is not given: 2e-5 for full-parameter
 * AdamW and 8-bit Adam (the usual full fine-tuning rate of LLaMA-class models); 2e-4 for
 * the adapter methods (PEFT's and the QLoRA paper's rate for 7B models); 2e-4 for the GaLore
 * family, whose projected update is scaled by `galore_scale` (0.25 by default, so the
 * step is that of 5e-5). Optimizers not named here take 2e-5.
 */
export const FINETUNE_LR: Readonly<Record<string, number>> = Object.freeze({
  adamw: 2e-5,
  adam8bit: 2e-5,
  galore: 2e-4,
  galore8bit: 2e-4,
  qgalore: 2e-4,
  lora: 2e-4,
  qlora: 2e-4,
});

/**
 * Options of {@link finetune}: the training options, with `model` the Hugging Face folder
 * (or qgalore checkpoint) to start from; `initFrom` is not used (it is `model`).
 */
export type FinetuneOptions = Omit<TrainOptions, "model" | "initFrom"> & {
  /** The Hugging Face LLaMA folder to fine-tune (config, weights, tokenizer). */
  model: string;
};

/** The fine-tuning part of the summary (`summary.finetune`). */
export interface FinetuneSummary {
  /** Training data: its file, kind and counts. */
  train: { path: string; kind: string } & FinetuneData["counts"];
  /**
   * Validation data: its file (the training file for a split) and counts (for a split:
   * examples, tokens and loss tokens of the held-out part; lines, truncated and refused of
   * the whole file, as in `train`).
   */
  val: { path: string; kind: string; split: boolean } & FinetuneData["counts"];
  /** Epochs completed by the sampler (fractional: updates of the epoch done / its updates). */
  epochs: number;
  /** Final validation: token-weighted masked loss, its perplexity, targets counted. */
  val_loss: number | null;
  /** exp(val_loss). */
  val_ppl: number | null;
  /** Targets counted by the validation. */
  val_tokens: number;
  /** Multiple-choice accuracy with `--mc`, else null. */
  mc: {
    accuracy: number;
    correct: number;
    total: number;
    chance: number;
    shots: number;
    /** Shots dropped so that prompts fit (the harness's k -= 1). */
    shots_dropped: number;
    by_subject: Record<string, { correct: number; total: number }>;
  } | null;
  /** The PEFT adapter folder written (`--save-adapter`), else null. */
  adapter_saved: string | null;
  /** The PEFT adapter the run started from (`--adapter`), else null. */
  adapter_from: string | null;
}

/** Rows (`micro × batch`) → real input tokens: a row's targets up to its last counted one. */
function realTokens(b: FinetuneBatch): number {
  const w = b.t + 1;
  const rows = b.tokens.length / w;
  let n = 0;
  for (let r = 0; r < rows; r++) {
    // examples end with a target that carries loss (an answer is never cut), so the row's
    // real length is up to its last counted target; the rest is padding
    for (let j = w - 1; j > 0; j--) {
      if (b.mask[r * w + j] !== 0) {
        n += j;
        break;
      }
    }
  }
  return n;
}

/**
 * Rank `rank`'s rows of a global batch of `micro` micro-batches of `ranks × batch` rows each:
 * rows rank, rank + ranks, rank + 2·ranks, … of every micro-batch. Taken in turn, so that the
 * examples of a short update (an epoch's last; its rows are filled from the first) reach every
 * rank while it has as many as ranks: the engine refuses an update in which a rank's rows carry
 * no target. The update is the same set of rows as one process's, summed in another order.
 */
export function rankSlice(
  b: FinetuneBatch,
  micro: number,
  batch: number,
  rank: number,
  ranks: number,
): FinetuneBatch {
  const w = b.t + 1;
  const tokens = new Int32Array(micro * batch * w);
  const mask = new Uint8Array(micro * batch * w);
  for (let m = 0; m < micro; m++) {
    for (let k = 0; k < batch; k++) {
      const from = (m * ranks * batch + rank + k * ranks) * w;
      const to = (m * batch + k) * w;
      tokens.set(b.tokens.subarray(from, from + w), to);
      mask.set(b.mask.subarray(from, from + w), to);
    }
  }
  let count = 0;
  for (let r = 0; r < micro * batch; r++) {
    for (let j = 1; j < w; j++) count += mask[r * w + j];
  }
  return { tokens, mask, t: b.t, count };
}

/**
 * Fine-tuning batches from a {@link FinetuneSampler}; validation over every held-out example.
 *
 * In a data-parallel run of N ranks (mpirun/srun) every rank runs the same sampler over the
 * global batch of N × `batchSize` rows per micro-batch (so its plan and its checkpointed
 * state are those of one process with that batch) and trains on its own slice of each
 * micro-batch; the engine all-reduces the masked targets' count and the gradients, so the
 * update is the one-process update of the global batch. Validation splits each global
 * evaluation batch the same way and sums the ranks' losses and counts.
 */
export class FinetuneBatches implements BatchSource {
  /** Training examples. */
  readonly train: FinetuneData;
  /** Validation examples. */
  readonly val: FinetuneData;
  /** Whether `val` was split off the training file. */
  readonly split: boolean;
  /** The sampler. */
  readonly sampler: FinetuneSampler;
  readonly #valBatches: FinetuneBatch[];
  #lastVal: { loss: number; count: number } | null = null;
  readonly #rank: number;
  readonly #ranks: number;
  readonly #batch: number;
  readonly #micro: number;

  /** A sampler over `train` in the run's shape, at `state` when resuming. */
  constructor(
    train: FinetuneData,
    val: FinetuneData,
    split: boolean,
    opts: Pick<ResolvedOptions, "batchSize" | "gradAccum" | "seqLen" | "seed">,
    state: SamplerState | null,
  ) {
    this.train = train;
    this.val = val;
    this.split = split;
    const w = world();
    this.#rank = w.rank;
    this.#ranks = w.size;
    this.#batch = opts.batchSize;
    this.#micro = opts.gradAccum;
    const shape = {
      batch: opts.batchSize * w.size,
      micro: opts.gradAccum,
      seqLen: opts.seqLen,
      seed: opts.seed,
    };
    if (state !== null && typeof state.batch === "number" && state.batch !== shape.batch) {
      throw new UsageError(
        `resume: the checkpoint's global batch is ${state.batch} rows, this job's is ` +
          `${w.size} rank${w.size > 1 ? "s" : ""} × batch ${opts.batchSize} = ${shape.batch}: ` +
          `resume with the number of ranks the run was started with`,
      );
    }
    this.sampler = state === null
      ? new FinetuneSampler(train, shape)
      : FinetuneSampler.restore(train, shape, state);
    this.#valBatches = evalBatches(val, shape.batch, opts.seqLen);
  }

  /** e.g. `train.jsonl (prompt): 900 examples, 41k loss tokens; validation 100 examples`. */
  describe(): string {
    const t = this.train.counts;
    const v = this.val.counts;
    return `${this.train.path} (${this.train.kind}): ${t.examples} examples, ${t.lossTokens} ` +
      `loss tokens` + (t.truncated > 0 ? `, ${t.truncated} truncated` : "") +
      (t.refused > 0 ? `, ${t.refused} refused` : "") +
      `; validation ${this.split ? `${v.examples} examples split off` : this.val.path}` +
      (this.split ? "" : ` (${v.examples} examples)`);
  }

  /** A hash of both splits' examples (tokens and masks). */
  fingerprint(): string {
    return createHash("sha256").update(
      `${this.train.fingerprint}|${this.val.fingerprint}|${this.split}`,
    ).digest("hex");
  }

  /** The next update's batch (this rank's slice of the global batch). */
  next(): TrainBatch {
    const all = this.sampler.next();
    const b = this.#ranks > 1
      ? rankSlice(all, this.#micro, this.#batch, this.#rank, this.#ranks)
      : all;
    return { tokens: b.tokens, mask: b.mask, count: b.count, tokens_real: realTokens(b) };
  }

  /** The sampler's position. */
  state(): SamplerState {
    return this.sampler.state();
  }

  /** Token-weighted masked loss over every validation example (one engine call per batch). */
  async validate(engine: TrainEngine): Promise<ValResult> {
    if (engine.eval === undefined) {
      throw new UsageError("this engine cannot evaluate masked batches (it predates fine-tuning)");
    }
    let sum = 0;
    let count = 0;
    for (const all of this.#valBatches) {
      const b = this.#ranks > 1 ? rankSlice(all, 1, this.#batch, this.#rank, this.#ranks) : all;
      // a rank's rows of the last batch may be padding only (the engine refuses to evaluate
      // them): nothing to add
      if (b.count === 0) continue;
      const r = await engine.eval(b.tokens, 1, b.mask);
      sum += r.sum;
      count += r.count;
    }
    if (this.#ranks > 1) {
      // every rank evaluated its rows of each batch: the sums over every rank
      const both = new Float64Array([sum, count]);
      await allreduceSum(both);
      [sum, count] = both;
    }
    const loss = count > 0 ? sum / count : NaN;
    this.#lastVal = { loss, count };
    return { loss, refBatches: null };
  }

  /** The last validation's loss and target count, or null before the first. */
  get lastValidation(): { loss: number; count: number } | null {
    return this.#lastVal;
  }
}

function pathOption(flag: string, v: unknown): void {
  if (v !== null && v !== undefined && (typeof v !== "string" || v === "")) {
    throw new UsageError(`${flag} ${shortValue(v)}: must be a path`);
  }
}

/** A folder that must not exist or be empty (the adapter is written there). */
function checkNewDir(flag: string, dir: string): void {
  try {
    checkExportDir(dir, null);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    throw new UsageError(e.message.replace(FLAG.export, flag));
  }
}

/** The files of a run folder holding the records it was given in memory ({@link finetune}). */
const OWN_FILES = { data: "data.jsonl", valData: "val_data.jsonl" } as const;

/**
 * The fine-tuning task of the shared loop; with `staged` (records given in memory, written to
 * temporary JSONL files), a new run with an output folder copies them there and names them.
 */
function finetuneTask(staged: StagedRecords | null = null): RunTask {
  let source: FinetuneBatches | null = null;
  let tokenizer: Tokenizer | null = null;
  let adapterFrom: string | null = null;
  let mcItems: { items: McItem[]; dev: McItem[] | undefined } | null = null;
  let lastMc: NonNullable<FinetuneSummary["mc"]> | null = null;
  const task: RunTask = {
    name: "finetune",
    check(o: Partial<TrainOptions>): void {
      for (const key of ["valData", "mc", "mcDev", "saveAdapter", "adapter"] as const) {
        pathOption(FLAG[key], o[key]);
      }
      if (o.resume !== undefined && o.resume !== null) return;
      if (o.data === null || o.data === undefined) {
        throw new UsageError(
          "--data: required: a JSONL file of `text`, `prompt`+`completion` or `messages` lines",
        );
      }
      if (o.trainTokenizer !== undefined && o.trainTokenizer !== null) {
        throw new UsageError(
          `${FLAG.trainTokenizer} ${o.trainTokenizer}: fine-tuning uses the model's own tokenizer`,
        );
      }
      if (o.valData !== undefined && o.valData !== null) {
        checkSource(FLAG.valData, o.valData, "a JSONL file");
      }
      if (o.mc !== undefined && o.mc !== null) checkSource(FLAG.mc, o.mc, "a CSV or JSONL file");
      if (o.adapter !== undefined && o.adapter !== null) {
        checkSource(FLAG.adapter, o.adapter, "a PEFT adapter folder");
      }
      const opt = o.optimizer ?? "adamw";
      for (const key of ["saveAdapter", "adapter"] as const) {
        const v = o[key];
        if (v !== undefined && v !== null && !ADAPTER_OPTIMIZERS.includes(opt)) {
          throw new UsageError(
            `${FLAG[key]} ${v}: applies only to --optimizer ${
              ADAPTER_OPTIMIZERS.join(", ")
            } (not ${opt})`,
          );
        }
      }
      if (o.saveAdapter !== undefined && o.saveAdapter !== null) {
        checkNewDir(FLAG.saveAdapter, o.saveAdapter);
      }
      const given = (v: unknown) => v !== undefined && v !== null;
      if (given(o.mcShots) && !given(o.mc)) {
        throw new UsageError(`${FLAG.mcShots} ${o.mcShots}: needs --mc (the items to score)`);
      }
      if (given(o.mcShots) && o.mcShots! > 0 && !given(o.mcDev)) {
        throw new UsageError(`${FLAG.mcShots} ${o.mcShots}: needs --mc-dev with dev questions`);
      }
      if (given(o.mcDev)) {
        if (!given(o.mcShots) || o.mcShots === 0) {
          throw new UsageError(`${FLAG.mcDev} ${o.mcDev}: give --mc-shots K (≥ 1) to use it`);
        }
        checkSource(FLAG.mcDev, o.mcDev!, "a CSV or JSONL file or a folder of them");
      }
    },
    async openSource(opts, tok, sampler): Promise<BatchSource> {
      tokenizer = tok;
      const dataOpts = {
        seqLen: opts.seqLen,
        tooLong: (opts.tooLong ?? "truncate") as "truncate" | "refuse",
        ...(opts.initFrom === null ? {} : { modelDir: opts.initFrom }),
      };
      const load = (flag: string, path: string) =>
        loadFinetuneData(path, tok, dataOpts).catch((e: unknown) => {
          throw flagged(e, flag, path);
        });
      const all = await load(FLAG.data, opts.data!);
      let train: FinetuneData;
      let val: FinetuneData;
      const split = opts.valData === null || opts.valData === undefined;
      if (split) {
        if (all.examples.length < 2) {
          throw new UsageError(
            `--data ${opts.data}: ${all.examples.length} example(s); a validation split needs ` +
              "at least 2 (or give --val-data)",
          );
        }
        ({ train, val } = splitFinetuneData(all, opts.valFraction, opts.seed));
      } else {
        train = all;
        val = await load(FLAG.valData, opts.valData!);
      }
      if (train.examples.length === 0) {
        throw new UsageError(
          `--data ${opts.data}: no example fits --seq-len ${opts.seqLen} (${all.counts.refused} refused)`,
        );
      }
      if (val.examples.length === 0) {
        throw new UsageError(
          `${split ? "--data" : "--val-data"} ${
            split ? opts.data : opts.valData
          }: no validation example fits --seq-len ${opts.seqLen}`,
        );
      }
      source = new FinetuneBatches(train, val, split, opts, sampler as SamplerState | null);
      return source;
    },
    async prepare(engine, opts, resumed): Promise<void> {
      const wants = opts.saveAdapter !== null || (opts.adapter !== null && !resumed);
      const e = engine as unknown as {
        saveAdapter?: (dir: string) => Promise<void>;
        loadAdapter?: (dir: string) => Promise<void>;
      };
      if (wants && (e.saveAdapter === undefined || e.loadAdapter === undefined)) {
        const flag = opts.saveAdapter !== null ? FLAG.saveAdapter : FLAG.adapter;
        throw new UsageError(
          `${flag} ${
            opts.saveAdapter ?? opts.adapter
          }: this build's engine cannot read or write PEFT adapters yet`,
        );
      }
      // a resumed run's adapters are in its checkpoint
      if (opts.adapter !== null && !resumed) {
        try {
          await e.loadAdapter!(opts.adapter);
        } catch (err) {
          throw flagged(err, FLAG.adapter, opts.adapter);
        }
        adapterFrom = opts.adapter;
      }
      if (opts.adapter !== null && resumed) adapterFrom = opts.adapter;
    },
    async onEvaluate(run: Run): Promise<{ record: Partial<EvalRecord>; note?: string }> {
      const opts = run.opts;
      if (opts.mc === null) return { record: {} };
      mcItems ??= await loadMc(opts);
      lastMc = await scoreMc(run, opts, tokenizer!, mcItems);
      return {
        record: { mc_accuracy: lastMc.accuracy },
        note: `multiple choice ${(100 * lastMc.accuracy).toFixed(2)}% of ${lastMc.total}`,
      };
    },
    async summarize(run: Run): Promise<Record<string, unknown>> {
      const s = source!;
      const opts = run.opts;
      // the final evaluation's (none after a divergence)
      const mc = run.failure === null ? lastMc : null;
      let saved: string | null = null;
      // rank 0 alone writes (every rank of a data-parallel run holds the same adapters)
      if (opts.saveAdapter !== null && run.failure === null && world().rank === 0) {
        const e = run.engine as unknown as { saveAdapter: (dir: string) => Promise<void> };
        try {
          await e.saveAdapter(opts.saveAdapter);
        } catch (err) {
          throw flagged(err, FLAG.saveAdapter, opts.saveAdapter);
        }
        saved = opts.saveAdapter;
      }
      const v = s.lastValidation;
      const loss = v !== null && Number.isFinite(v.loss) ? v.loss : null;
      const st = s.sampler.state();
      const out: FinetuneSummary = {
        train: { path: s.train.path, kind: s.train.kind, ...s.train.counts },
        val: { path: s.val.path, kind: s.val.kind, split: s.split, ...s.val.counts },
        epochs: st.epoch + st.step / s.sampler.updatesPerEpoch,
        val_loss: loss,
        val_ppl: loss === null ? null : Math.exp(loss),
        val_tokens: v?.count ?? 0,
        mc,
        adapter_saved: saved,
        adapter_from: adapterFrom,
      };
      return out as unknown as Record<string, unknown>;
    },
  };
  if (staged !== null && staged.dir !== "") {
    task.adopt = (dir: string, overwrite: boolean, checkOnly = false) => {
      const own: OwnedData = { form: "records" };
      const paths: { data?: string; valData?: string } = {};
      for (const key of ["data", "valData"] as const) {
        const from = staged.paths[key];
        if (from === undefined) continue;
        const bytes = Deno.readFileSync(from);
        const to = writeOwnFile(dir, OWN_FILES[key], bytes, overwrite, checkOnly);
        own[key] = OWN_FILES[key];
        paths[key] = to;
        // what the summary and the record describe: the run's own copy
        if (checkOnly) continue;
        for (const d of [source!.train, source!.val]) if (d.path === from) d.path = to;
      }
      return { own, ...paths };
    };
  }
  return task;
}

/** The `--mc` items and the `--mc-dev` shots, read once per run. */
async function loadMc(
  opts: ResolvedOptions,
): Promise<{ items: McItem[]; dev: McItem[] | undefined }> {
  const load = (flag: string, path: string) =>
    loadMultipleChoice(path).catch((e: unknown) => {
      throw flagged(e, flag, path);
    });
  const items = await load(FLAG.mc, opts.mc!);
  const dev = opts.mcDev === null ? undefined : await load(FLAG.mcDev, opts.mcDev);
  return { items, dev };
}

/** Multiple-choice accuracy (lib/mmlu.ts) of the run's engine as it is now. */
async function scoreMc(
  run: Run,
  opts: ResolvedOptions,
  tokenizer: Tokenizer,
  mc: { items: McItem[]; dev: McItem[] | undefined },
): Promise<NonNullable<FinetuneSummary["mc"]>> {
  let r: McResult;
  try {
    r = await scoreMultipleChoice(run.engine as Engine, tokenizer, mc.items, {
      shots: opts.mcShots ?? 0,
      ...(mc.dev === undefined ? {} : { dev: mc.dev }),
      batch: opts.batchSize,
      seqLen: opts.seqLen,
    });
  } catch (e) {
    throw flagged(e, FLAG.mc, opts.mc!);
  }
  return {
    accuracy: r.accuracy,
    correct: r.correct,
    total: r.total,
    chance: r.chance,
    shots: r.shots,
    shots_dropped: r.shotsDropped,
    by_subject: r.bySubject,
  };
}

/** A UsageError about `value` worded with its flag: "--data x: …". */
function flagged(e: unknown, flag: string, value: string): unknown {
  if (!(e instanceof UsageError) || e.message.startsWith(`${flag} `)) return e;
  const m = e.message;
  return new UsageError(m.startsWith(value) ? `${flag} ${m}` : `${flag} ${value}: ${m}`);
}

/**
 * The training options of a fine-tuning run: `model` is the folder the weights come from
 * (`initFrom`), and the learning rate, when not given, is {@link FINETUNE_LR}'s.
 */
export function finetuneTrainOptions(options: Partial<FinetuneOptions>): Partial<TrainOptions> {
  const { model, ...rest } = options;
  const o: Partial<TrainOptions> = { ...rest };
  if (typeof o.merge === "string") {
    // --merge is --export for the adapter methods, whose export is the merged model
    const opt = o.optimizer ?? (typeof o.adapter === "string" ? "lora" : "adamw");
    if (!ADAPTER_OPTIMIZERS.includes(opt)) {
      throw new UsageError(
        `${FLAG.merge} ${o.merge}: applies only to --optimizer ${
          ADAPTER_OPTIMIZERS.join(", ")
        } (not ${opt}); a full-parameter run writes its model with --export DIR`,
      );
    }
    if (o.export !== undefined && o.export !== null) {
      throw new UsageError(`${FLAG.merge} ${o.merge}: give --merge or --export, not both`);
    }
    o.export = o.merge;
    o.merge = null;
  }
  if (options.resume !== undefined && options.resume !== null) {
    // a resume takes the model from its run record
    if (model !== undefined && model !== null) {
      o.initFrom = typeof model === "string" ? resolve(model) : model;
    }
    return o;
  }
  if (model === undefined || model === null) {
    throw new UsageError("--model: required: a Hugging Face model folder to fine-tune");
  }
  if (typeof model !== "string" || model === "") {
    throw new UsageError(`--model ${shortValue(model)}: must be a Hugging Face model folder`);
  }
  checkSource("--model", model, "a Hugging Face model folder");
  if (!isDirectory(model)) {
    throw new UsageError(
      `--model ${model}: must be a Hugging Face model folder (config.json, safetensors weights, ` +
        "tokenizer.json); a qgalore run writes one with --export DIR",
    );
  }
  o.initFrom = model;
  o.model = model;
  if (typeof o.adapter === "string" && o.adapter !== "" && isDirectory(o.adapter)) {
    // continuing from a PEFT adapter: its rank, alpha, targets and rsLoRA are the run's
    // unless given (a given value that disagrees is the engine's one-line refusal)
    const a = readAdapterConfig(o.adapter, `${FLAG.adapter} ${o.adapter}`);
    const unset = (v: unknown) => v === undefined || v === null;
    if (unset(o.optimizer)) o.optimizer = "lora";
    if (unset(o.loraRank)) o.loraRank = a.r;
    if (unset(o.loraAlpha)) o.loraAlpha = a.lora_alpha;
    if (unset(o.loraTargets)) o.loraTargets = a.target_modules.join(",");
    if (unset(o.loraRslora)) o.loraRslora = a.use_rslora;
  }
  if (o.lr === undefined || o.lr === null) {
    o.lr = FINETUNE_LR[o.optimizer ?? "adamw"] ?? FINETUNE_LR.adamw;
  }
  return o;
}

/**
 * Fine-tunes a pretrained model and returns the summary (also written to `summary.json`).
 * Validates every option before an engine is created (UsageError, one line, naming the flag).
 * Ctrl-C stops after the current update with a checkpoint; `resume` continues the run with
 * the identical batches. A non-finite loss throws {@link DivergedError} carrying the summary.
 */
export function finetune(
  options: FinetuneInput = {},
  hooks: TrainHooks = {},
): Promise<Summary> {
  let o: Partial<TrainOptions>;
  let staged: StagedRecords | null = null;
  try {
    staged = stageRecords(options);
    o = finetuneTrainOptions({ ...options, ...staged.paths } as Partial<FinetuneOptions>);
  } catch (e) {
    if (staged !== null && staged.dir !== "") Deno.removeSync(staged.dir, { recursive: true });
    return Promise.reject(e);
  }
  const files = staged;
  return trainWith(finetuneTask(files), o, hooks).catch((e: unknown) => {
    // the shared checks name the weights' folder as pre-training's flag; here it is --model
    if (e instanceof UsageError && !(e instanceof DivergedError)) {
      const m = files.rename(e.message.replace(/^--init-from /, "--model "));
      if (m !== e.message) throw new UsageError(m);
    }
    throw e;
  }).finally(() => {
    if (files.dir !== "") Deno.removeSync(files.dir, { recursive: true });
  });
}

/** One fine-tuning example in memory: the same forms as a JSONL line (lib/finetune_data.ts). */
export type FinetuneRecord =
  | { text: string }
  | { prompt: string; completion: string }
  | { messages: { role: string; content: string }[] };

/**
 * {@link finetune}'s options: {@link FinetuneOptions}, with `data` and `valData` also given
 * in memory, as an array of {@link FinetuneRecord}s or `{ text }`.
 */
export type FinetuneInput = Omit<Partial<FinetuneOptions>, "data" | "valData"> & {
  /** A JSONL file, an array of records, or `{ text }`. */
  data?: string | FinetuneRecord[] | { text: string } | null;
  /** Validation data in the same forms; null splits `valFraction` off `data`. */
  valData?: string | FinetuneRecord[] | { text: string } | null;
};

/** In-memory records written as JSONL for the loader, and how to name them in messages. */
interface StagedRecords {
  /** The temporary folder ("" when nothing was staged). */
  dir: string;
  /** The staged options' paths. */
  paths: { data?: string; valData?: string };
  /** A message with the staged files' paths replaced by `data[i]` / `data`. */
  rename(message: string): string;
}

function stageRecords(options: FinetuneInput): StagedRecords {
  const staged: { key: "data" | "valData"; path: string }[] = [];
  const paths: { data?: string; valData?: string } = {};
  let dir = "";
  try {
    for (const key of ["data", "valData"] as const) {
      const v = options[key];
      if (v === undefined || v === null || typeof v === "string") continue;
      const flag = FLAG[key];
      const records = Array.isArray(v) ? v : isTextRecord(v) ? [v] : null;
      if (records === null || records.length === 0) {
        throw new UsageError(
          `${flag} ${shortValue(v)}: must be a JSONL path, a non-empty array of ` +
            '{text} / {prompt, completion} / {messages} records, or { text: "…" }',
        );
      }
      if (dir === "") dir = Deno.makeTempDirSync({ prefix: "qgalore-ft-data-" });
      const path = join(dir, `${key}.jsonl`);
      const lines = records.map((r) => JSON.stringify(r ?? null) ?? "null");
      Deno.writeTextFileSync(path, lines.join("\n") + "\n");
      paths[key] = path;
      staged.push({ key, path });
    }
  } catch (e) {
    if (dir !== "") Deno.removeSync(dir, { recursive: true });
    throw e;
  }
  return {
    dir,
    paths,
    rename(message: string): string {
      let m = message;
      for (const { key, path } of staged) {
        m = m.split(`${path}:`).join(`${key}[`).replace(
          new RegExp(`${key}\\[(\\d+)`, "g"),
          (_all, n: string) => `${key}[${Number(n) - 1}]`,
        ).split(path).join(`${key} (in memory)`);
      }
      return m;
    },
  };
}

function isTextRecord(v: unknown): v is { text: string } {
  return typeof v === "object" && v !== null && !Array.isArray(v) &&
    Object.keys(v).length === 1 && typeof (v as { text?: unknown }).text === "string";
}
