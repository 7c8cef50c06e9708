/**
 * The pretraining loop: model + data + native engine + schedule + logging, usable from the
 * CLI and from a notebook (`await train({ steps: 100 })` returns the summary).
 *
 * Around it: the loop's contracts (engine, batch source, task, records, hooks) are in
 * lib/run_types.ts, the summary in lib/summary.ts, pre-training's batches in lib/batches.ts
 * and data given in memory in lib/memory_data.ts.
 *
 * @module
 */

import { join, resolve } from "node:path";
import {
  Engine,
  type EngineConfig,
  EngineError,
  ErrorCode,
  type MemoryBytes,
  type StepStats,
} from "../ffi/engine.ts";
import { type Dataset, openCorpus, SyntheticCorpus } from "./data.ts";
import { exists } from "./fs.ts";
import { exportModel } from "./hf.ts";
import { openTokenizer, type Tokenizer, trainTokenizer } from "./tokenizer.ts";
import { shortValue, UsageError } from "./errors.ts";
import { formatCount, formatDuration, type JsonlWriter, Progress } from "./log.ts";
import { attachDisplays, inKernel, type RunHistory } from "./jupyter.ts";
import { peakRssBytes } from "./memory.ts";
import { DivergenceWatch, likelyCause } from "./diverge.ts";
import {
  checkOut,
  lockRun,
  openOut,
  resumeMetrics,
  type RunLock,
  syncMetrics,
  writeSummary,
} from "./run_files.ts";
import {
  listCheckpoints,
  type OwnedData,
  pruneCheckpoints,
  removeStaleTemps,
  RUN_RECORD_VERSION,
  type RunRecord,
  setAside,
  writeCheckpoint,
} from "./checkpoints.ts";
import { planResume, type ResumePlan, resumeTokenizer } from "./resume.ts";
import {
  ADAPTER_OPTIMIZERS,
  checkInterval,
  checkOptions,
  checkSource,
  engineConfig,
  FLAG,
  OPTION_KEYS,
  optionDef,
  PROJECTED_OPTIMIZERS,
  type ResolvedOptions,
  type SaveInterval,
  SECTIONS,
  type TrainOptions,
  withFlags,
} from "./options.ts";
import type { ResolvedModel } from "./presets.ts";
import { dataParallel, world } from "./dist.ts";
import { lrAt } from "./schedule.ts";
import type {
  BatchSource,
  EvalRecord,
  RunTask,
  StepRecord,
  TrainEngine,
  TrainHooks,
} from "./run_types.ts";
import {
  type CommStart,
  commStart,
  dataParallelSummary,
  DivergedError,
  type Summary,
} from "./summary.ts";
import { CorpusBatches } from "./batches.ts";
import { keepOwnData, ownedDataTask, pretrainInput, type TrainInput } from "./memory_data.ts";

export type { EngineConfig, MemoryBytes, StepStats };

function ppl(loss: number | null): number | null {
  if (loss === null || !Number.isFinite(loss)) return null;
  return Math.exp(loss);
}

/** The reference's n + 1 divisor applied to a mean over `batches` batches (docs/algorithm-spec.md I-16). */
function refLoss(loss: number | null, batches: number): number | null {
  return loss === null ? null : (loss * batches) / (batches + 1);
}

function finiteOrNull(x: number): number | null {
  return Number.isFinite(x) ? x : null;
}

function defaultOut(): string {
  return join("runs", new Date().toISOString().replace(/[:.]/g, "-"));
}

/** Options only fine-tuning reads (lib/finetune.ts); a pre-training run refuses them. */
const FINETUNE_ONLY: readonly (keyof TrainOptions)[] = Object.freeze(
  OPTION_KEYS.filter((k) => optionDef(k).section === SECTIONS.finetune),
);

/** Pre-training: corpus windows (the synthetic corpus without `--data`). */
export const PRETRAIN: RunTask = Object.freeze({
  name: "pretrain" as const,
  async openSource(
    opts: ResolvedOptions,
    tokenizer: Tokenizer,
    sampler: unknown | null,
  ): Promise<BatchSource> {
    const data: Dataset = opts.data === null ? new SyntheticCorpus() : await openCorpus({
      data: opts.data,
      tokenizer,
      textField: opts.textField,
      valFraction: opts.valFraction,
      seqLen: opts.seqLen,
      // a bar at a terminal; logs get the token counts in the run's description line
      progress: !opts.quiet && Deno.stderr.isTerminal(),
      ...(opts.threads === null ? {} : { threads: opts.threads }),
    }).catch((e: unknown) => {
      throw flagged(e, "--data", opts.data!);
    });
    return new CorpusBatches(data, opts, opts.data, sampler as number[] | null);
  },
  check(opts: Partial<TrainOptions>): void {
    for (const key of FINETUNE_ONLY) {
      const v = opts[key];
      if (v !== undefined && v !== null) {
        throw new UsageError(
          `${FLAG[key]} ${String(v)}: applies only to fine-tuning (examples/finetune.ts)`,
        );
      }
    }
  },
});

/**
 * Pretrains a model. Options not given take {@link defaultTrainOptions} values. Validates
 * everything before an engine is created; invalid options throw UsageError. Ctrl-C
 * stops after the current update (summary `interrupted: true`); a non-finite loss throws
 * {@link DivergedError} after the summary is written. Files go to `out` unless it is null.
 *
 * It composes the phases a notebook can also call one by one: {@link startRun} (set-up),
 * {@link Run.evaluate}, {@link Run.step} and {@link Run.finish}.
 */
export function train(
  options: TrainInput = {},
  hooks: TrainHooks = {},
): Promise<Summary> {
  let given: { task: RunTask; options: Partial<TrainOptions> };
  try {
    given = pretrainInput(options, PRETRAIN);
  } catch (e) {
    return Promise.reject(e);
  }
  return trainWith(given.task, given.options, hooks);
}

/**
 * {@link train}'s loop for a {@link RunTask}: lib/finetune.ts runs fine-tuning through it
 * with its own batch source, so both share checkpoints, resume, divergence handling, export.
 */
export async function trainWith(
  task: RunTask,
  options: Partial<TrainOptions>,
  hooks: TrainHooks = {},
): Promise<Summary> {
  using run = await Run.start(options, hooks, task);
  // a resumed run's earlier evaluations are already in its metrics.jsonl, except one due at
  // its checkpoint's step that it never made (stopped there, or extended after its end)
  if (run.resumedFrom === null || run.evalDue) await run.evaluate();
  while (!run.done) {
    if ((await run.step()) === null) continue;
    if (run.evalDue) await run.evaluate();
    if (run.saveDue) await run.save();
  }
  return await run.finish();
}

/**
 * Set-up of a run: checks the options, opens the data (a path or, for pre-training, data in
 * memory as {@link train} takes it), creates the engine and the output files, prints the
 * run's description and listens for Ctrl-C. Then call
 * {@link Run.evaluate} and {@link Run.step} in any order, and {@link Run.finish} once.
 *
 * ```ts
 * using run = await startRun({ model: "llama-9m", steps: 20, out: null });
 * await run.evaluate();
 * while (!run.done) await run.step();
 * const summary = await run.finish();
 * ```
 */
export function startRun(
  options: TrainInput = {},
  hooks: TrainHooks = {},
  task: RunTask = PRETRAIN,
): Promise<Run> {
  let given: { task: RunTask; options: Partial<TrainOptions> };
  try {
    given = pretrainInput(options, task);
  } catch (e) {
    return Promise.reject(e);
  }
  return Run.start(given.options, hooks, given.task);
}

/**
 * One training run in progress, in the phases {@link train} composes: set-up
 * ({@link Run.start}), {@link Run.step}, {@link Run.evaluate}, {@link Run.finish}. Disposing
 * it (`using`) frees the engine and closes the files if {@link Run.finish} was not reached.
 */
export class Run implements Disposable {
  /** Every option of the run, defaults filled in. */
  readonly opts: ResolvedOptions;
  /** The model's name and config. */
  readonly model: ResolvedModel;
  /** Training and validation data of a pre-training run; null for fine-tuning. */
  readonly data: Dataset | null;
  /** Where the run's batches come from. */
  readonly source: BatchSource;
  /** Pre-training or fine-tuning. */
  readonly task: RunTask;
  /** The tokenizer of the data (bytes for the synthetic corpus). */
  readonly tokenizer: Tokenizer;
  /** Directory of `metrics.jsonl` and `summary.json`, or null. */
  readonly out: string | null;
  /** The native engine (or the stand-in from {@link TrainHooks.createEngine}). */
  readonly engine: TrainEngine;
  /**
   * Training tokens per update (grad_accum × batch × seq_len); fine-tuning's updates hold at
   * most this many, fewer when their examples are short.
   */
  readonly tokensPerStep: number;

  /** The checkpoint the run was resumed from, or null. */
  readonly resumedFrom: string | null;

  readonly #hooks: TrainHooks;
  readonly #progress: Progress;
  readonly #metrics: JsonlWriter | null;
  readonly #started: number;
  readonly #startedAt: string;
  readonly #watch: DivergenceWatch;
  /** The cosine schedule's length (the first run's --steps; kept when a resume extends it). */
  readonly #scheduleSteps: number;
  /** Seconds the run had already run before this process resumed it. */
  readonly #elapsedBefore: number;
  readonly #fingerprint: string | null;
  readonly #saveEvery: SaveInterval | null;
  /** The lock of the run folder, held until the run is disposed. */
  readonly #lock: RunLock | null;
  /** Worker threads the engine uses (stored in the run record; a resume asks for the same). */
  readonly #threads: number | null;
  /** The options as the run record stores them: paths made absolute at the start. */
  readonly #recordOptions: ResolvedOptions;
  /** In-memory data the run keeps in its folder (its record's `data.own`), or null. */
  readonly #own: OwnedData | null;
  /** Step of the last evaluation in metrics.jsonl (-1: none). */
  #evalStep = -1;
  #listening = false;
  #stop = false;
  #steps = 0;
  #trainS = 0;
  /** Training tokens consumed (real ones: fine-tuning's padding is not counted). */
  #tokens = 0;
  #lastLoss: number | null = null;
  #failure: string | null = null;
  /**
   * Whether the engine state is still good after the divergence: a non-finite update that the
   * engine refused (the weights untouched) while the loss was calm; then it is saved and is
   * the last good checkpoint.
   */
  #intact = false;
  #initialLoss: number | null | undefined = undefined;
  #closed = false;
  /** Lines in metrics.jsonl. */
  #metricsLines = 0;
  /** All-reduced bytes and updates as this process started the run (bytes per update). */
  readonly #commFrom: CommStart;
  /** Step of the newest checkpoint, its path, and when it was written (performance.now). */
  #savedStep = 0;
  #checkpoint: string | null = null;
  #savedAt: number;
  /** Whether the optimizer refreshes projectors (its step records count them). */
  readonly #projected: boolean;
  /** The records of a notebook run without `out`, for its charts (lib/jupyter.ts). */
  readonly #history: RunHistory | null;

  private constructor(
    init: {
      opts: ResolvedOptions;
      model: ResolvedModel;
      source: BatchSource;
      task: RunTask;
      tokenizer: Tokenizer;
      out: string | null;
      engine: TrainEngine;
      metrics: JsonlWriter | null;
      progress: Progress;
      hooks: TrainHooks;
      started: number;
      startedAt: string;
      fingerprint: string | null;
      resume: { plan: ResumePlan; kept: number; last: Record<string, unknown> | null } | null;
      lock: RunLock | null;
      threads: number | null;
      own: OwnedData | null;
    },
  ) {
    this.opts = init.opts;
    this.#own = init.own;
    this.model = init.model;
    this.source = init.source;
    this.task = init.task;
    this.data = init.source instanceof CorpusBatches ? init.source.data : null;
    this.tokenizer = init.tokenizer;
    this.out = init.out;
    this.engine = init.engine;
    this.#metrics = init.metrics;
    this.#progress = init.progress;
    this.#hooks = init.hooks;
    this.#started = init.started;
    this.#startedAt = init.startedAt;
    const opts = init.opts;
    this.tokensPerStep = opts.gradAccum * opts.batchSize * opts.seqLen;
    this.#fingerprint = init.fingerprint;
    this.#lock = init.lock;
    this.#threads = init.threads;
    this.#recordOptions = absolutePaths(opts);
    this.#saveEvery = checkInterval(opts.saveEvery);
    this.#savedAt = init.started;
    this.#projected = PROJECTED_OPTIMIZERS.includes(opts.optimizer);
    this.#commFrom = commStart(init.resume?.plan.record.step ?? 0);
    this.#history = init.out === null && inKernel() ? { steps: [], evals: [] } : null;
    const r = init.resume?.plan.record;
    if (r === undefined) {
      this.resumedFrom = null;
      this.#watch = new DivergenceWatch();
      this.#scheduleSteps = opts.steps;
      this.#elapsedBefore = 0;
    } else {
      // the state of the run when it wrote the checkpoint, so it goes on as if never stopped
      this.resumedFrom = init.resume!.plan.path;
      this.#watch = DivergenceWatch.restore(r.counters.watch);
      this.#scheduleSteps = r.schedule_steps;
      this.#elapsedBefore = r.counters.elapsed_s;
      this.#steps = r.step;
      this.#trainS = r.counters.train_s;
      this.#tokens = r.counters.tokens ?? r.step * this.tokensPerStep;
      this.#lastLoss = r.counters.last_loss;
      this.#initialLoss = r.counters.initial_val_loss;
      this.#metricsLines = init.resume!.kept;
      this.#savedStep = r.step;
      this.#checkpoint = this.resumedFrom;
      const last = init.resume!.last;
      if (last?.type === "eval" && typeof last.step === "number") this.#evalStep = last.step;
    }
  }

  /** The set-up phase; see {@link startRun}. `task` defaults to pre-training. */
  static async start(
    options: Partial<TrainOptions> = {},
    hooks: TrainHooks = {},
    runTask: RunTask = PRETRAIN,
  ): Promise<Run> {
    let task = runTask;
    const started = performance.now();
    let startedAt = new Date().toISOString();
    let plan: ResumePlan | null = null;
    let checked;
    task.check?.(options);
    if (options.resume !== undefined && options.resume !== null) {
      if (typeof options.resume !== "string" || options.resume === "") {
        throw new UsageError(`--resume ${shortValue(options.resume)}: must be a run folder`);
      }
      // every option from the checkpoint's run record; the model and tokenizer as they were
      plan = planResume(options.resume, options);
      const was = plan.record.task ?? "pretrain";
      if (was !== task.name) {
        throw new UsageError(
          `--resume ${options.resume}: a ${
            was === "finetune" ? "fine-tuning" : "pre-training"
          } run; continue it with examples/${was}.ts --resume`,
        );
      }
      task = ownedDataTask(task, plan);
      checked = {
        opts: plan.opts,
        model: plan.record.model,
        tokenizer: resumeTokenizer(plan),
        notices: plan.notices,
      };
      startedAt = plan.record.started_at;
    } else {
      checked = checkOptions(options);
    }
    const { model, tokenizer: given } = checked;
    const notices = [...checked.notices];
    // mpirun/srun: this rank's options (rank 0 alone writes); one process: unchanged
    const dp = await dataParallel(checked.opts).catch((e: unknown) => {
      throw e instanceof Error ? new UsageError(e.message) : e;
    });
    const opts = dp.opts;
    if (dp.notice !== null) notices.push(dp.notice);
    const out = dp.rank !== 0
      ? null
      : plan !== null
      ? plan.dir
      : opts.out === undefined
      ? defaultOut()
      : opts.out;
    // read next: it must be a file or folder (a FIFO or a device would block or never end)
    if (opts.data !== null) checkSource("--data", opts.data, "a file or folder");
    if (out !== null && plan === null) {
      checkOut(out, opts.overwrite);
      task.adopt?.(out, opts.overwrite, true);
    }
    if (given === null && out !== null && exists(join(out, "tokenizer"))) {
      throw new UsageError(
        `--out ${out}: already holds a tokenizer/ folder (an earlier run's); ` +
          "choose a new --out for --train-tokenizer (nothing is replaced)",
      );
    }
    return await Run.#setUp(
      { opts, model, given, notices, out, plan, started, startedAt, root: dp.rank === 0 },
      hooks,
      task,
    );
  }

  static async #setUp(
    s: {
      opts: ResolvedOptions;
      model: ResolvedModel;
      given: Tokenizer | null;
      notices: string[];
      out: string | null;
      plan: ResumePlan | null;
      started: number;
      startedAt: string;
      /** Rank 0 of a data-parallel run, or a one-process run: the one that writes. */
      root: boolean;
    },
    hooks: TrainHooks,
    task: RunTask,
  ): Promise<Run> {
    const { opts, model, given, notices, out, plan, started, startedAt, root } = s;
    // A trained tokenizer goes to a temporary folder first: it moves into the run's folder
    // only once the data and the engine are ready, so a failed set-up leaves no half run.
    const staged = given === null ? await Deno.makeTempDir({ prefix: "qgalore-tokenizer-" }) : null;
    let tokenizer = given ?? await trainTokenizer({
      inputs: [opts.data!],
      vocabSize: opts.trainTokenizer!,
      textField: opts.textField,
      out: staged!,
    }).catch((e: unknown) => {
      Deno.removeSync(staged!, { recursive: true });
      throw flagged(e, "--data", opts.data!);
    });
    const ranks = world().size;
    if (plan !== null && task.name === "pretrain" && (plan.record.ranks ?? 1) !== ranks) {
      // pre-training's sampler draws ranks × batch windows per update: another N would
      // silently change the global batch (fine-tuning's sampler checks its global batch)
      const was = plan.record.ranks ?? 1;
      throw new UsageError(
        `--resume ${plan.dir}: the run was trained by ${was} rank${was > 1 ? "s" : ""}, this ` +
          `job has ${ranks}: resume with the number of ranks the run was started with`,
      );
    }
    const source = await task.openSource(opts, tokenizer, plan?.record.sampler ?? null)
      .catch((e: unknown) => {
        // a sampler that cannot continue on this data says so as the resume's error
        if (plan === null || !(e instanceof UsageError) || !e.message.startsWith("resume: ")) {
          throw e;
        }
        throw new UsageError(`--resume ${plan.dir}: ${e.message.slice("resume: ".length)}`);
      });
    // what the run reads, so that a resume can tell whether the data changed
    const fingerprint = out === null && plan === null ? null : source.fingerprint();
    if (plan !== null && fingerprint !== plan.record.data.fingerprint) {
      throw new UsageError(
        `--resume ${plan.dir}: the data changed since the checkpoint (${
          opts.data === null ? "the synthetic corpus" : `--data ${opts.data}`
        } now reads other tokens); a resumed run needs the data it started with`,
      );
    }
    // the worker threads the engine will use: the CPU's reductions split work by thread
    const threads = opts.threads ?? (navigator.hardwareConcurrency || null);
    // The engine sizes its gradient buffers for `grad_accum` micro-batches per update.
    const cfg = engineConfig(opts, model.config);

    const progress = new Progress({
      steps: opts.steps,
      logEvery: opts.logEvery,
      ...(opts.quiet ? { write: () => {} } : {}),
    });
    for (const n of notices) progress.note(n);

    // --init-from: the engine loads the checkpoint instead of drawing random weights (a
    // resumed run's weights come from its own checkpoint; but an adapter method's checkpoint
    // holds the adapters only, and its frozen base comes from the same folder again, which
    // the engine checks against the fingerprint the checkpoint records)
    const adapters = ADAPTER_OPTIMIZERS.includes(opts.optimizer);
    if (opts.initFrom !== null && (plan === null || adapters)) cfg.init_from = opts.initFrom;
    const create: (c: EngineConfig) => TrainEngine | Promise<TrainEngine> = hooks.createEngine ??
      Engine.create;
    const engine = await Promise.resolve(cfg).then(create)
      .catch((e: unknown) => {
        // a checkpoint that does not fit is bad input, named by its flag
        if (
          opts.initFrom !== null && e instanceof EngineError && e.code === ErrorCode.invalid &&
          e.message.startsWith(opts.initFrom)
        ) throw flagged(new UsageError(e.message), "--init-from", opts.initFrom);
        throw withFlags(e); // the engine names config fields; the user knows flags
      });
    let metrics: JsonlWriter | null = null;
    let run: Run | undefined;
    let lock: RunLock | null = null;
    let resume: { plan: ResumePlan; kept: number; last: Record<string, unknown> | null } | null =
      null;
    try {
      // before anything of the run is written into its folder: no second process writes
      // there at the same time (a second run on the same --out, or a resume while it runs)
      lock = out === null ? null : lockRun(out, plan !== null ? "--resume" : "--out");
      if (lock?.notice) progress.note(lock.notice);
      if (plan !== null) {
        if (engine.load === undefined) {
          throw new UsageError(`--resume ${plan.dir}: this engine cannot load a checkpoint`);
        }
        try {
          await engine.load(plan.path);
        } catch (e) {
          if (!(e instanceof EngineError)) throw e;
          throw new UsageError(`--resume ${plan.dir}: ${e.message}`);
        }
      }
      if (plan !== null && !root) {
        // another rank of a data-parallel run: the same state, nothing of the folder touched
        resume = { plan, kept: plan.record.metrics_lines, last: null };
      } else if (plan !== null) {
        // newer checkpoints that are not valid are renamed, so no later resume or pruning
        // mistakes them for the run's (nothing is deleted)
        for (const s of plan.skipped) {
          progress.note(
            s.corrupt
              ? `notice: skipped ${s.why}; renamed to ${setAside(s.path, "invalid")}`
              : `notice: skipped ${s.why}; left in place`,
          );
        }
        // temporary files of saves cut short by a kill
        for (const path of removeStaleTemps(plan.dir)) {
          progress.note(`notice: removed ${path}, left by a save that was killed`);
        }
        const { writer, kept, last, notice } = resumeMetrics(plan.dir, plan.record.metrics_lines);
        if (notice !== null) progress.note(notice);
        metrics = writer;
        resume = { plan, kept, last };
      } else {
        metrics = out === null ? null : openOut(out, opts.overwrite);
      }
      if (staged !== null && out !== null) {
        // saved with the run, so its token ids can be read back
        const dir = join(out, "tokenizer");
        Deno.mkdirSync(dir);
        for (const e of Deno.readDirSync(staged)) {
          Deno.copyFileSync(join(staged, e.name), join(dir, e.name));
        }
        const moved = openTokenizer(dir);
        (tokenizer as Partial<Disposable>)[Symbol.dispose]?.();
        tokenizer = moved;
        Deno.removeSync(staged, { recursive: true });
      }
      await task.prepare?.(engine, opts, plan !== null);
      // in-memory data: the run's own copy in its folder, named by the record and summary
      const { own, opts: runOpts } = keepOwnData(task, opts, out, plan);
      run = new Run({
        opts: runOpts,
        own,
        model,
        source,
        task,
        tokenizer,
        out,
        engine,
        metrics,
        progress,
        hooks,
        started,
        startedAt,
        fingerprint,
        resume,
        lock,
        threads,
      });
      const engineNotice = engine.info?.().notice;
      if (typeof engineNotice === "string") progress.note(`notice: ${engineNotice}`);
      progress.note(
        `${model.name}: ${formatCount(engine.params)} params on ${engine.device} (${
          engine.precision ?? "fp32"
        }), ` +
          `${describeOptimizer(opts)}, ${opts.steps} steps × ` +
          `${formatCount(run.tokensPerStep)} tokens; data: ${source.describe()}` +
          (out === null ? "" : `; out: ${out}`),
      );
      if (plan !== null) {
        progress.note(`resumed from ${plan.path} (step ${plan.record.step} of ${opts.steps})`);
      }
      if (opts.handleSigint) {
        // SIGTERM too: `docker stop` and a Slurm preemption save and stop like Ctrl-C
        for (const sig of ["SIGINT", "SIGTERM"] as const) {
          try {
            Deno.addSignalListener(sig, run.#onSigint);
            run.#listening = true;
          } catch {
            // Signals are unsupported on some platforms; Ctrl-C then simply ends the process.
          }
        }
      }
      return run;
    } catch (e) {
      if (run !== undefined) run[Symbol.dispose]();
      else {
        metrics?.close();
        engine[Symbol.dispose]();
      }
      // a failed set-up leaves no run folder it created
      lock?.release(true);
      throw e;
    }
  }

  /** Updates completed. */
  get steps(): number {
    return this.#steps;
  }

  /** Loss of the last completed update, or null before the first. */
  get lastLoss(): number | null {
    return this.#lastLoss;
  }

  /** The one-line reason the run diverged, else null. */
  get failure(): string | null {
    return this.#failure;
  }

  /** Whether Ctrl-C or {@link TrainHooks.signal} asked the run to stop (latched). */
  get stopped(): boolean {
    return this.#stop ||= this.#hooks.signal?.aborted ?? false;
  }

  /** True once every planned update is done, the run diverged, or it was asked to stop. */
  get done(): boolean {
    return this.#failure !== null || this.#steps >= this.opts.steps || this.stopped;
  }

  /**
   * Whether `evalEvery` asks for an evaluation now that metrics.jsonl does not have (never
   * after the last update). True at the start of a resumed run whose checkpoint was written
   * at such a step before its evaluation (stopped there, or a finished run extended).
   */
  get evalDue(): boolean {
    const o = this.opts;
    return o.evalEvery > 0 && this.#steps % o.evalEvery === 0 && this.#steps < o.steps &&
      this.#evalStep !== this.#steps && !this.#stop;
  }

  /** Seconds since the set-up began (for a resumed run: since the run first started). */
  elapsed(): number {
    return this.#elapsedBefore + (performance.now() - this.#started) / 1000;
  }

  /** The run's newest checkpoint, or null. */
  get checkpoint(): string | null {
    return this.#checkpoint;
  }

  /**
   * Whether `saveEvery` asks for a checkpoint now: a multiple of its updates, or its wall
   * time, has passed since the last one. Deferred while the divergence watch is counting
   * towards an alarm, so that every checkpoint of a run that then diverges is a good one.
   */
  get saveDue(): boolean {
    const every = this.#saveEvery;
    if (every === null || !this.#canSave() || !this.#watch.calm) return false;
    if (every.steps !== undefined) {
      return Math.floor(this.#steps / every.steps) > Math.floor(this.#savedStep / every.steps);
    }
    return (performance.now() - this.#savedAt) / 1000 >= every.seconds;
  }

  /**
   * Writes a checkpoint of the run now into `out/checkpoints/` (the engine state with the
   * run record inside) and removes the oldest beyond `keep`. Returns its path; null when
   * there is nothing to save (no `out`, no update since the last checkpoint, or diverged).
   */
  async save(): Promise<string | null> {
    this.#checkOpen();
    if (!this.#canSave()) return this.#steps === this.#savedStep ? this.#checkpoint : null;
    return await this.#write(this.#runRecord());
  }

  #canSave(): boolean {
    return this.out !== null && this.engine.save !== undefined &&
      (this.#failure === null || this.#intact) && this.#steps > this.#savedStep;
  }

  async #write(record: RunRecord): Promise<string> {
    // the lines the checkpoint counts must survive a power loss as the checkpoint does
    syncMetrics(this.out!);
    const path = await writeCheckpoint(
      { save: (p, run) => this.engine.save!(p, run) },
      this.out!,
      record,
    );
    this.#savedStep = record.step;
    this.#savedAt = performance.now();
    this.#checkpoint = path;
    // the one to go back to should the run diverge later: never pruned
    pruneCheckpoints(
      this.out!,
      this.opts.keep,
      this.#goodCheckpoint(record.counters.watch.best_at),
    );
    return path;
  }

  /** The newest checkpoint of the run at or before update `bestAt` (the loss's best), or null. */
  #goodCheckpoint(bestAt: number): string | null {
    return this.out === null
      ? null
      : listCheckpoints(this.out).find((c) => c.step <= bestAt)?.path ?? null;
  }

  /**
   * After a divergence: the newest checkpoint at or before the loss's best is the last good
   * one; newer ones hold states already on the way up and are renamed `….diverged`, so that
   * `--resume` starts from the last good one. Returns it, or null.
   */
  #keepLastGood(): string | null {
    if (this.out === null) return null;
    const good = this.#goodCheckpoint(this.#watch.bestAt);
    for (const c of listCheckpoints(this.out)) {
      if (c.path === good) break;
      this.#progress.note(
        `notice: ${c.path} was written after the loss's best (update ${this.#watch.bestAt}); ` +
          `renamed to ${setAside(c.path, "diverged")}`,
      );
    }
    return good;
  }

  /** Everything a resume needs besides the engine state, as of now. */
  #runRecord(): RunRecord {
    return {
      kind: "qgalore-run",
      version: RUN_RECORD_VERSION,
      step: this.#steps,
      schedule_steps: this.#scheduleSteps,
      metrics_lines: this.#metricsLines,
      options: {
        ...this.#recordOptions,
        out: this.out === null ? null : resolve(this.out),
        resume: null,
        overwrite: false,
      },
      model: { name: this.model.name, config: this.model.config },
      engine: {
        device: this.engine.device,
        precision: this.engine.precision ?? "fp32",
        ...(this.#threads === null ? {} : { threads: this.#threads }),
      },
      tokenizer: {
        kind: this.tokenizer.kind,
        vocab_size: this.tokenizer.vocabSize,
        source: this.#tokenizerSource(),
      },
      data: {
        description: this.source.describe(),
        fingerprint: this.#fingerprint ?? "",
        ...(this.#own === null ? {} : { own: this.#own }),
      },
      sampler: this.source.state(),
      ...(world().size > 1 ? { ranks: world().size } : {}),
      ...(this.task.name === "pretrain" ? {} : { task: this.task.name }),
      counters: {
        train_s: this.#trainS,
        tokens: this.#tokens,
        elapsed_s: this.elapsed(),
        last_loss: this.#lastLoss,
        initial_val_loss: this.#initialLoss ?? null,
        watch: this.#watch.state(),
      },
      started_at: this.#startedAt,
    };
  }

  /** The folder of the run's tokenizer.json; null for bytes (and a trained one without out). */
  #tokenizerSource(): string | null {
    // absolute: a resume or an evaluation may run from another working directory
    if (this.opts.trainTokenizer !== null) {
      return this.out === null ? null : resolve(this.out, "tokenizer");
    }
    const folder = this.#recordOptions.tokenizer ?? tokenizerFolder(this.tokenizer);
    return folder === null ? null : resolve(folder);
  }

  #writeMetrics(record: StepRecord | EvalRecord): void {
    if (this.#metrics === null) return;
    this.#metrics.write({ ...record });
    this.#metricsLines++;
  }

  /**
   * The evaluation phase: mean validation loss over `evalBatches` batches (null when not
   * finite), written to `metrics.jsonl`, printed and passed to {@link TrainHooks.onEval}.
   * The first evaluation before any update is the summary's `initial_val_loss`.
   */
  async evaluate(): Promise<number | null> {
    this.#checkOpen();
    const opts = this.opts;
    let loss: number | null;
    let refBatches: number | null = opts.evalBatches;
    try {
      const v = await this.source.validate(this.engine);
      loss = finiteOrNull(v.loss);
      refBatches = v.refBatches;
    } catch (e) {
      // After a divergence the weights may already hold huge values; report, don't crash.
      if (this.#failure !== null && e instanceof EngineError) loss = null;
      else throw e;
    }
    // what the task measures besides (fine-tuning: multiple-choice accuracy); not after a
    // divergence, whose weights may hold anything
    const extra = this.task.onEvaluate === undefined || this.#failure !== null
      ? null
      : await this.task.onEvaluate(this);
    const record: EvalRecord = {
      type: "eval",
      step: this.#steps,
      val_loss: loss,
      val_ppl: ppl(loss),
      val_loss_ref: refBatches === null ? null : refLoss(loss, refBatches),
      tokens: this.#tokens,
      elapsed_s: this.elapsed(),
      ...extra?.record,
    };
    this.#writeMetrics(record);
    this.#history?.evals.push(record);
    this.#evalStep = this.#steps;
    const floor = this.source.entropyFloor;
    this.#progress.note(
      `eval step ${this.#steps}: val loss ${loss?.toFixed(4) ?? "n/a"} ppl ${
        record.val_ppl?.toFixed(2) ?? "n/a"
      }` + (floor === undefined ? "" : ` (floor ${floor.toFixed(4)})`) +
        (extra?.note ? `; ${extra.note}` : ""),
    );
    if (this.#steps === 0 && this.#initialLoss === undefined) this.#initialLoss = loss;
    if (this.#failure === null) {
      const why = this.#watch.evaluation(loss);
      if (why !== null) {
        this.#failure = `training diverged by step ${this.#steps}: ${why}; ${likelyCause(opts)}`;
      }
    }
    await this.#hooks.onEval?.(record);
    return loss;
  }

  /**
   * The step phase: one optimizer update at the scheduled learning rate on the next training
   * batch, written to `metrics.jsonl`, shown and passed to {@link TrainHooks.onStep}. Returns
   * null when the loss or gradient was not finite: the run has then diverged
   * ({@link Run.failure}) and {@link Run.finish} throws {@link DivergedError}.
   */
  async step(): Promise<StepRecord | null> {
    this.#checkOpen();
    if (this.#failure !== null) throw new UsageError(`the run has diverged: ${this.#failure}`);
    const opts = this.opts;
    const steps = this.#steps;
    // the schedule keeps its first length when a resume extends the run (then: the floor)
    const lr = lrAt(steps, { ...opts, steps: this.#scheduleSteps });
    const t0 = performance.now();
    const batch = this.source.next();
    let stats: StepStats & { count?: number };
    try {
      stats = batch.mask === undefined
        ? await this.engine.trainStep(batch.tokens, opts.gradAccum, lr)
        : await this.engine.trainStep(batch.tokens, opts.gradAccum, lr, batch.mask);
    } catch (e) {
      if (!(e instanceof EngineError) || e.code !== ErrorCode.nonFinite) throw e;
      this.#intact = this.#watch.calm;
      this.#failure = `training diverged at step ${steps + 1}: ${e.message} (lr ${
        lr.toPrecision(3)
      }); ${likelyCause(opts)}`;
      return null;
    }
    this.#trainS += (performance.now() - t0) / 1000;
    const done = ++this.#steps;
    this.#tokens += batch.tokens_real;
    this.#lastLoss = stats.loss;
    const record: StepRecord = {
      type: "step",
      step: done,
      loss: stats.loss,
      lr,
      grad_norm: stats.gradNorm,
      clipped: stats.clipped,
      tokens: this.#tokens,
      ...(batch.mask === undefined ? {} : { loss_tokens: stats.count ?? batch.count }),
      ...(this.#projected ? refreshCount(this.engine) : {}),
      tokens_per_s: this.#tokens / this.#trainS,
      elapsed_s: this.elapsed(),
    };
    this.#writeMetrics(record);
    this.#history?.steps.push(record);
    this.#progress.step({
      step: done,
      loss: stats.loss,
      lr,
      gradNorm: stats.gradNorm,
      tokensPerS: record.tokens_per_s,
    });
    await this.#hooks.onStep?.(record);
    this.#stop ||= this.#hooks.signal?.aborted ?? false;
    const why = this.#watch.step(stats.loss, stats.gradNorm);
    if (why !== null) {
      this.#failure = `training diverged at step ${done}: ${why} (lr ${lr.toPrecision(3)}); ${
        likelyCause(opts)
      }`;
      return null;
    }
    return record;
  }

  /**
   * The finish phase: the final evaluation, the summary (written to `summary.json` when
   * there is an output directory, and returned), the closing line, and the engine freed.
   * Throws {@link DivergedError}, carrying the summary, when the run diverged.
   */
  async finish(): Promise<Summary> {
    this.#checkOpen();
    const opts = this.opts;
    const engine = this.engine;
    let finalLoss: number | null;
    // an export that fails still leaves the run's summary, which says why
    let exportFailure: string | null = null;
    try {
      this.#progress.done();
      // the run as it stands before the final evaluation, which a resume must not find in
      // metrics.jsonl (the uninterrupted run has none at this step)
      const last = this.#canSave() ? this.#runRecord() : null;
      finalLoss = await this.evaluate();
      if (last !== null && (this.#failure === null || this.#intact)) {
        try {
          await this.#write(last);
        } catch (e) {
          if (!(e instanceof UsageError || e instanceof EngineError)) throw e;
          exportFailure = `the final checkpoint was not written: ${e.message}`;
        }
      }
      if (opts.export !== null && this.#failure === null) {
        try {
          if (!(engine instanceof Engine)) {
            throw new UsageError(`${opts.export}: this engine cannot write a model`);
          }
          await exportModel(engine, opts.export, {
            dtype: opts.exportDtype,
            tokenizer: this.tokenizer,
          });
          this.#progress.note(`exported: ${opts.export} (${opts.exportDtype})`);
        } catch (e) {
          if (!(e instanceof UsageError || e instanceof EngineError)) throw e;
          exportFailure = (flagged(new UsageError(e.message), "--export", opts.export) as Error)
            .message;
        }
      }
    } finally {
      this.#endLoop();
    }
    try {
      const steps = this.#steps;
      const info = engine.info?.() ?? {};
      const finalRef = this.task.name === "pretrain" ? refLoss(finalLoss, opts.evalBatches) : null;
      const extra = this.task.summarize === undefined ? undefined : await this.task.summarize(this);
      const lastLoss = this.#lastLoss;
      const failure = this.#failure;
      // a diverged run's newest good state; a healthy run's newest
      const lastGood = failure === null || this.#intact ? this.#checkpoint : this.#keepLastGood();
      const summary: Summary = {
        steps,
        steps_planned: opts.steps,
        tokens: this.#tokens,
        initial_val_loss: this.#initialLoss ?? null,
        final_train_loss: lastLoss === null ? null : finiteOrNull(lastLoss),
        val_loss: finalLoss,
        val_ppl: ppl(finalLoss),
        val_loss_ref: finalRef,
        val_ppl_ref: ppl(finalRef),
        entropy_floor: this.source.entropyFloor ?? null,
        tokens_per_s: this.#trainS > 0 ? this.#tokens / this.#trainS : 0,
        wall_s: this.elapsed(),
        params: engine.params,
        optimizer: opts.optimizer,
        // stand-in engines (tests) may report less than the native one
        fused: info.fused ?? opts.fused,
        clip_mode: info.clip_mode ?? null,
        svd_count: info.svd_count ?? 0,
        gaps: info.gaps ?? {},
        refresh_failures: info.refresh_failures ?? 0,
        nonfinite_grads: info.nonfinite_grads ?? null,
        refresh_seconds: info.refresh_seconds ?? 0,
        factored_grads: info.factored_grads ?? 0,
        timing: info.timing ?? null,
        device: engine.device,
        precision: engine.precision ?? "fp32",
        model: { name: this.model.name, config: this.model.config },
        data: this.source.describe(),
        tokenizer: {
          kind: this.tokenizer.kind,
          vocab_size: this.tokenizer.vocabSize,
          source: this.#tokenizerSource(),
        },
        init_from: opts.initFrom,
        export: opts.export !== null && this.#failure === null && exportFailure === null
          ? opts.export
          : null,
        config: { ...opts, out: this.out },
        memory: {
          ...engine.memory(),
          peak_rss: peakRssBytes(),
          // measured by the driver on a GPU; the CPU has no device memory
          peak_device: engine.device === "cuda" ? info.peak_device_bytes ?? null : null,
        },
        interrupted: this.#stop && failure === null,
        diverged: failure !== null,
        error: failure ?? exportFailure,
        out: this.out,
        checkpoint: failure === null ? this.#checkpoint : lastGood,
        last_good_checkpoint: lastGood,
        resumed_from: this.resumedFrom,
        started_at: this.#startedAt,
        ...(extra === undefined ? {} : { finetune: extra }),
      };
      const dp = dataParallelSummary(this.#commFrom, steps, opts);
      if (dp !== undefined) summary.data_parallel = dp;
      if (this.out !== null) {
        writeSummary(this.out, JSON.stringify(summary, null, 2) + "\n");
        // the run's report.html; Vega loads only here, and a report never fails a run
        try {
          const { writeRunReport } = await import("./report.ts");
          await writeRunReport(this.out);
        } catch (e) {
          this.#progress.note(
            `notice: report.html not written: ${
              (e instanceof Error ? e.message : String(e))
                .split("\n")[0]
            }`,
          );
        }
      }
      attachDisplays(summary, this.#history);
      this.#progress.note(
        `${steps < opts.steps ? "stopped" : "done"}: ${steps} steps, ${
          formatCount(summary.tokens)
        } tokens in ${formatDuration(summary.wall_s)}, ${
          formatCount(summary.tokens_per_s)
        } tok/s; val loss ${summary.initial_val_loss?.toFixed(4) ?? "n/a"} → ${
          finalLoss?.toFixed(4) ?? "n/a"
        }`,
      );
      if (failure !== null) {
        this.#progress.note(
          lastGood === null
            ? "no checkpoint was saved before the divergence"
            : `last good checkpoint: ${lastGood} (continue from it with --resume ${this.out} ` +
              "and a lower --lr)",
        );
        throw new DivergedError(failure, summary);
      }
      if (exportFailure !== null) throw new UsageError(exportFailure);
      return summary;
    } finally {
      this[Symbol.dispose]();
    }
  }

  /** Ends the progress bar, stops listening for Ctrl-C, closes the files, frees the engine. */
  [Symbol.dispose](): void {
    if (this.#closed) return;
    this.#endLoop();
    this.#closed = true;
    try {
      this.#metrics?.[Symbol.dispose]();
    } finally {
      try {
        this.engine[Symbol.dispose]();
      } finally {
        this.#lock?.release();
      }
    }
  }

  #endLoop(): void {
    this.#progress.done();
    if (this.#listening) {
      for (const sig of ["SIGINT", "SIGTERM"] as const) {
        try {
          Deno.removeSignalListener(sig, this.#onSigint);
        } catch { /* never added (unsupported) */ }
      }
    }
    this.#listening = false;
  }

  #checkOpen(): void {
    if (this.#closed) throw new UsageError("this run is finished: start another with startRun()");
  }

  readonly #onSigint = (): void => {
    // A second Ctrl-C at a terminal quits at once; a notebook kernel must never exit.
    if (this.#stop && Deno.stderr.isTerminal()) Deno.exit(130);
    this.#stop = true;
    this.#progress.note("interrupted: stopping after the current step");
  };
}

/** e.g. "qgalore lr 0.04 (warmup 30), rank 128, T 200, INT8 weights, INT4 projectors, lazy, fused". */
function describeOptimizer(o: ResolvedOptions): string {
  const parts = [`${o.optimizer} lr ${o.lr} (warmup ${o.warmup})`];
  if (o.rank !== null) parts.push(`rank ${o.rank}, T ${o.updateGap}`);
  if (o.weightBits === 8) parts.push(`INT8 weights${o.stochasticRound ? " (SR)" : ""}`);
  if (o.projBits !== null) {
    parts.push(
      `${
        ({ 32: "f32", 16: "bf16" } as Record<number, string>)[o.projBits] ?? `INT${o.projBits}`
      } projectors`,
    );
  }
  if (o.lazy) parts.push("lazy refresh");
  if (o.fused) parts.push("fused");
  return parts.join(", ");
}

/** The options with their paths made absolute (as the run record stores them). */
function absolutePaths(o: ResolvedOptions): ResolvedOptions {
  const abs = (p: string | null | undefined) => typeof p === "string" ? resolve(p) : p ?? null;
  return {
    ...o,
    // a config file or folder (a preset's name stays a name)
    model: typeof o.model === "string" && exists(o.model) ? resolve(o.model) : o.model,
    data: abs(o.data),
    tokenizer: abs(o.tokenizer),
    initFrom: abs(o.initFrom),
    export: abs(o.export),
    valData: abs(o.valData),
    mc: abs(o.mc),
    mcDev: abs(o.mcDev),
    saveAdapter: abs(o.saveAdapter),
    adapter: abs(o.adapter),
  };
}

/** The engine's projector refresh count so far, for a step record; {} when it has none. */
function refreshCount(engine: TrainEngine): { svd_count?: number } {
  const n = engine.info?.().svd_count;
  return typeof n === "number" ? { svd_count: n } : {};
}

/** A UsageError about `value` worded with its flag: "--data x: …". */
function flagged(e: unknown, flag: string, value: string): unknown {
  if (!(e instanceof UsageError) || e.message.startsWith(`${flag} `)) return e;
  const m = e.message;
  // "--data x: why", or "--init-from x/model.safetensors: why" for a file inside it
  return new UsageError(m.startsWith(value) ? `${flag} ${m}` : `${flag} ${value}: ${m}`);
}

function tokenizerFolder(t: Tokenizer): string | null {
  const json = t.sourceFiles().find((f) => f.endsWith("tokenizer.json"));
  return json === undefined ? null : json.slice(0, Math.max(0, json.lastIndexOf("/"))) || ".";
}
