/**
 * The options of a resumed run (`--resume DIR`): every option comes from the run record of
 * the checkpoint it continues from; only options that cannot change the losses may be given
 * with it, plus `--steps` (more updates) and `--lr` (a deliberate new peak, e.g. after a
 * divergence). Anything else is refused with one line naming the flag.
 *
 * @module
 */

import { join, resolve } from "node:path";
import { openTokenizer, type Tokenizer } from "./tokenizer.ts";
import { UsageError } from "./errors.ts";
import { findResumable, type Resumable } from "./checkpoints.ts";
import {
  checkChoice,
  checkExportDir,
  checkInterval,
  checkNumber,
  checkSwitch,
  defaultTrainOptions,
  FLAG,
  type ResolvedOptions,
  type TrainOptions,
} from "./options.ts";

/**
 * Options a resume may be given: they decide how long the run goes, what it writes and how
 * it reports, never what an update computes. `--lr` is the one deliberate exception (see
 * {@link planResume}). `--threads` is handled apart: the engine's reductions split work by
 * thread, so another count changes qgalore's losses in the last bits (measured on llama-9m);
 * the run record stores the count used, a resume uses it, another is allowed with a notice.
 */
export const RESUME_FREE: readonly (keyof TrainOptions)[] = Object.freeze([
  "steps",
  "lr",
  "saveEvery",
  "keep",
  "evalEvery",
  "checkpointing",
  "export",
  "exportDtype",
  "mc",
  "mcShots",
  "mcDev",
  "saveAdapter",
  "merge",
  "logEvery",
  "quiet",
  "handleSigint",
]);

/** Options holding a path: compared with the run's after both are made absolute. */
const PATHS = new Set<string>(["model", "data", "tokenizer", "initFrom", "valData", "adapter"]);

/** Free options holding a path: stored absolute. */
const PATH_FREE = new Set<string>(["export", "mc", "mcDev", "saveAdapter", "merge"]);

/** Options of this session only: not inherited from the run record. */
const SESSION: readonly (keyof TrainOptions)[] = ["logEvery", "quiet", "handleSigint"];

/** What a resumed run starts from. */
export interface ResumePlan extends Resumable {
  /** The run folder. */
  dir: string;
  /** The run's options with the allowed ones given replaced; `out` and `resume` are `dir`. */
  opts: ResolvedOptions;
  /** One-line notices (a skipped checkpoint, a new --lr). */
  notices: string[];
}

function shown(v: unknown): string {
  if (v === null || v === undefined) return "the default";
  if (typeof v === "boolean") return v ? "on" : "off";
  if (typeof v === "object" && v !== null) return "(a config object)";
  return String(v);
}

/**
 * Finds the checkpoint to resume the run in `dir` from and the options to resume it with.
 * `given` are the options passed along (`resume` itself aside); each must be one of
 * {@link RESUME_FREE} or equal the run's own value. Throws a one-line UsageError.
 */
export function planResume(dir: string, given: Partial<TrainOptions>): ResumePlan {
  const found = findResumable(dir);
  const { record } = found;
  const run = record.options as unknown as Record<string, unknown>;
  const free = new Set<string>(RESUME_FREE);
  const allowed = RESUME_FREE.filter((k) => FLAG[k].startsWith("--")).map((k) => FLAG[k]);
  const opts = { ...record.options } as unknown as Record<string, unknown>;
  const defaults = defaultTrainOptions() as unknown as Record<string, unknown>;
  let threadsGiven: number | null = null;
  for (const key of SESSION) opts[key] = defaults[key];
  for (const [key, value] of Object.entries(given) as [keyof TrainOptions, unknown][]) {
    // (keys that are no option are ignored, as a new run ignores them)
    if (key === "resume" || value === undefined || !(key in FLAG)) continue;
    if (key === "out") {
      if (value !== null && resolve(String(value)) === resolve(dir)) continue;
      throw new UsageError(
        `--out ${value}: not with --resume (the run continues in its own folder ${dir})`,
      );
    }
    if (key === "overwrite") {
      if (value === false) continue;
      throw new UsageError(
        `--overwrite ${
          shown(value)
        }: not with --resume (the run keeps its files up to the checkpoint)`,
      );
    }
    if (key === "threads") {
      if (value !== null) threadsGiven = value as number;
      continue;
    }
    if (free.has(key)) {
      if (value !== null) {
        opts[key] = PATH_FREE.has(key) && typeof value === "string" ? resolve(value) : value;
      }
      continue;
    }
    // paths are stored absolute (older records: as typed, relative to where the run started)
    if (PATHS.has(key) && typeof value === "string" && typeof run[key] === "string") {
      if (resolve(value) === resolve(run[key] as string)) continue;
      // moved data is the same run when it reads the same tokens (the set-up compares the
      // data's fingerprint with the checkpoint's and refuses any difference)
      // a moved base model: an adapter method's checkpoint names the base it needs by a
      // fingerprint the engine compares; other methods' checkpoints hold every weight
      if (key === "data" || key === "valData" || key === "initFrom") {
        opts[key] = resolve(value);
        continue;
      }
    }
    // null means "the default" for the options resolved per optimizer: nothing given
    if (value === null || JSON.stringify(value) === JSON.stringify(run[key])) continue;
    // what `auto` became is the same run
    if ((key === "device" || key === "precision") && value === "auto") continue;
    if (key === "device" && value === record.engine.device) continue;
    if (key === "precision" && value === record.engine.precision) continue;
    throw new UsageError(
      `${FLAG[key]} ${shown(value)}: cannot change when resuming (the run in ${dir} has ${
        shown(run[key])
      }, and the losses would change); with --resume only ${allowed.join(", ")} may be given`,
    );
  }
  const o = opts as unknown as ResolvedOptions;
  // what `auto` became when the run started: the same device and precision, or the engine
  // says why not (no GPU here); never silently another trajectory
  o.device = checkChoice("device", record.engine.device) as ResolvedOptions["device"];
  o.precision = checkChoice("precision", record.engine.precision) as ResolvedOptions["precision"];
  // the values given, checked as a new run checks them
  checkNumber("steps", o.steps);
  checkNumber("lr", o.lr);
  checkNumber("keep", o.keep);
  checkNumber("evalEvery", o.evalEvery);
  checkNumber("logEvery", o.logEvery);
  checkInterval(o.saveEvery);
  o.checkpointing = checkSwitch("checkpointing", o.checkpointing);
  o.exportDtype = checkChoice("exportDtype", o.exportDtype) as ResolvedOptions["exportDtype"];
  for (const key of ["quiet", "handleSigint"] as const) {
    if (typeof o[key] !== "boolean") {
      throw new UsageError(`${key} ${JSON.stringify(o[key])}: must be true or false`);
    }
  }
  if (o.steps <= record.step) {
    throw new UsageError(
      given.steps === undefined
        ? `--resume ${dir}: the run finished all its ${record.step} steps; give --steps N > ${record.step} to continue it`
        : `--steps ${o.steps}: the checkpoint is already at step ${record.step}; give more to continue`,
    );
  }
  if (o.lr * o.weightDecay >= 1) {
    throw new UsageError(
      `${FLAG.lr} ${o.lr}: ${FLAG.lr} × ${FLAG.weightDecay} ${o.weightDecay} must be < 1`,
    );
  }
  if (o.export !== null) checkExportDir(o.export, dir);
  const notices: string[] = [];
  // the thread count the run used (older records: the option, maybe null = one per core)
  const recorded = record.engine.threads ?? record.options.threads ?? null;
  const differ = "the last bits of the losses will differ from the uninterrupted run's";
  o.threads = recorded;
  if (threadsGiven !== null) {
    checkNumber("threads", threadsGiven);
    if (recorded !== null && threadsGiven !== recorded) {
      notices.push(
        `notice: ${FLAG.threads} ${threadsGiven} replaces the run's ${recorded}: ${differ}`,
      );
    }
    o.threads = threadsGiven;
  }
  const cores = navigator.hardwareConcurrency;
  if (o.threads !== null && cores > 0 && o.threads > cores) {
    notices.push(
      `notice: ${FLAG.threads} ${o.threads} capped at this machine's ${cores} processors: ` +
        differ,
    );
    o.threads = cores;
  }
  const diverged = divergedAt(dir);
  // only a divergence after this checkpoint, by the options it is resumed with, repeats
  // (at: the state before the non-finite update at step + 1, which the engine refused)
  if (diverged !== null && diverged.step >= record.step && o.lr === diverged.lr) {
    notices.push(
      `notice: this run diverged at step ${diverged.step}; resumed with the same options it ` +
        `will diverge again the same way (give a lower ${FLAG.lr})`,
    );
  }
  if (o.lr !== record.options.lr) {
    notices.push(
      `notice: ${FLAG.lr} ${o.lr} replaces the run's peak ${record.options.lr} from step ` +
        `${record.step + 1} on: the losses leave the first run's trajectory`,
    );
  }
  return { ...found, dir, opts: { ...o, out: dir, resume: dir, overwrite: false }, notices };
}

/**
 * The tokenizer of a resumed run: the one its record names (a trained one from the run's own
 * `tokenizer/` folder), which must still have the kind and vocabulary it had.
 */
export function resumeTokenizer(plan: ResumePlan): Tokenizer {
  const t = plan.record.tokenizer;
  const source = plan.opts.trainTokenizer !== null ? join(plan.dir, "tokenizer") : t.source;
  let tok: Tokenizer;
  try {
    tok = openTokenizer(source);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    throw new UsageError(`--resume ${plan.dir}: the run's tokenizer ${source}: ${e.message}`);
  }
  if (tok.kind !== t.kind || tok.vocabSize !== t.vocab_size) {
    (tok as Partial<Disposable>)[Symbol.dispose]?.();
    throw new UsageError(
      `--resume ${plan.dir}: the tokenizer ${source} changed (${tok.kind}, ${tok.vocabSize} ids; ` +
        `the run used ${t.kind}, ${t.vocab_size} ids); a resumed run needs the one it started with`,
    );
  }
  return tok;
}

/**
 * The step at which the run in `dir` last diverged and its peak `--lr` then (its summary.json
 * says so), else null.
 */
function divergedAt(dir: string): { step: number; lr: number } | null {
  try {
    const s = JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
    return s?.diverged === true && typeof s.steps === "number" &&
        typeof s.config?.lr === "number"
      ? { step: s.steps, lr: s.config.lr }
      : null;
  } catch {
    return null; // no summary (a killed run) or an unreadable one: nothing to say
  }
}
