/**
 * Data given in memory instead of a file ({@link TrainInput}): pre-training on a
 * {@link Dataset} object or `{ text }`, the run folder's own copy of it ({@link OwnedData}),
 * and reading that copy back when such a run is resumed.
 *
 * @module
 */

import { join } from "node:path";
import { CorpusBatches } from "./batches.ts";
import type { OwnedData } from "./checkpoints.ts";
import {
  checkDataInput,
  type DataInput,
  type Dataset,
  inMemoryDataset,
  isDataset,
} from "./data.ts";
import { shortValue, UsageError } from "./errors.ts";
import type { ResolvedOptions, TrainOptions } from "./options.ts";
import type { ResumePlan } from "./resume.ts";
import { writeOwnFile } from "./run_files.ts";
import type { BatchSource, RunTask } from "./run_types.ts";

/**
 * The task and options of a pre-training run given `options` whose `data` may be held in
 * memory: such data is checked now (a bad value fails before anything starts) and opened in
 * place of a file ({@link memoryTask}); the options then say `data: null`.
 */
export function pretrainInput(
  options: TrainInput,
  task: RunTask,
): { task: RunTask; options: Partial<TrainOptions> } {
  const d = options.data;
  if (d === undefined || d === null || typeof d === "string") {
    return { task, options: options as Partial<TrainOptions> };
  }
  if (task.name !== "pretrain") {
    throw new UsageError(
      `--data ${shortValue(d)}: in-memory data here is pre-training's; fine-tune with finetune()`,
    );
  }
  return { task: memoryTask(task, checkDataInput(d)), options: { ...options, data: null } };
}

/**
 * Pre-training on data held in memory: a {@link Dataset} as given, or `{ text }`
 * byte-tokenized ({@link inMemoryDataset}). A new run with an output folder keeps `{ text }`
 * there as `data.txt` (so that `resume` continues it bit for bit); a Dataset object cannot
 * be kept in a file, so its resume needs it given again (checked by its fingerprint).
 */
export function memoryTask(base: RunTask, d: Dataset | { text: string }): RunTask {
  return {
    ...base,
    openSource(opts, _tokenizer, sampler): Promise<BatchSource> {
      try {
        const data = inMemoryDataset(d, opts);
        return Promise.resolve(new CorpusBatches(data, opts, null, sampler as number[] | null));
      } catch (e) {
        return Promise.reject(e);
      }
    },
    adopt(out: string, overwrite: boolean, checkOnly = false): { own: OwnedData; data?: string } {
      if (isDataset(d)) return { own: { form: "dataset" } };
      const bytes = new TextEncoder().encode(d.text);
      const path = writeOwnFile(out, OWN_TEXT, bytes, overwrite, checkOnly);
      return { own: { form: "text", data: OWN_TEXT }, data: path };
    },
  };
}

export type { OwnedData };

/** The file of a run folder holding the `{ text }` it was given ({@link memoryTask}). */
const OWN_TEXT = "data.txt";

/** {@link train}'s options: {@link TrainOptions}, with `data` also in memory ({@link DataInput}). */
export type TrainInput = Omit<Partial<TrainOptions>, "data"> & { data?: DataInput | null };

/**
 * The task resuming the run of `plan`, whose record may say that its data was given in memory
 * ({@link OwnedData}): the options then name the run folder's own copies, and pre-training's
 * `{ text }` is read back from its file as the run read it (unless `task` already holds data
 * in memory, given again: its fingerprint must then match). A Dataset object, which no file
 * holds, must be given again.
 */
export function ownedDataTask(task: RunTask, plan: ResumePlan): RunTask {
  const own = plan.record.data.own;
  if (own === undefined) return task;
  // the copies in the run folder (wherever it is now), unless other paths were given
  const kept = plan.record.options;
  if (own.data !== undefined && plan.opts.data === kept.data) {
    plan.opts.data = join(plan.dir, own.data);
  }
  if (own.valData !== undefined && plan.opts.valData === kept.valData) {
    plan.opts.valData = join(plan.dir, own.valData);
  }
  if (task.adopt !== undefined || own.form === "records") return task;
  if (own.form === "dataset") {
    throw new UsageError(
      `--resume ${plan.dir}: the run trained on a Dataset object held in memory ` +
        `(${plan.record.data.description}); resume it from code, train({ resume, data }) ` +
        "with the same Dataset",
    );
  }
  let text: string;
  try {
    text = Deno.readTextFileSync(plan.opts.data!);
  } catch (e) {
    throw new UsageError(
      `--resume ${plan.dir}: cannot read ${own.data}, the text the run was given (${
        e instanceof Error ? e.message : String(e)
      })`,
    );
  }
  return memoryTask(task, { text });
}

/**
 * The run's own copy of data given in memory, in its folder: a new run with `out` whose task
 * adopts data writes it there ({@link RunTask.adopt}); a resumed run's record names the copies
 * its folder holds. Returns what the run record keeps (null: nothing) and `opts` with
 * `data`/`valData` naming those copies (as the record and the summary name them).
 */
export function keepOwnData(
  task: RunTask,
  opts: ResolvedOptions,
  out: string | null,
  plan: ResumePlan | null,
): { own: OwnedData | null; opts: ResolvedOptions } {
  let own = plan?.record.data.own ?? null;
  let runOpts = opts;
  if (plan === null && out !== null && task.adopt !== undefined) {
    const kept = task.adopt(out, opts.overwrite);
    own = kept.own;
    runOpts = {
      ...opts,
      ...(kept.data === undefined ? {} : { data: kept.data }),
      ...(kept.valData === undefined ? {} : { valData: kept.valData }),
    };
  } else if (plan !== null && own !== null) {
    runOpts = {
      ...opts,
      ...(own.data === undefined ? {} : { data: join(plan.dir, own.data) }),
      ...(own.valData === undefined ? {} : { valData: join(plan.dir, own.valData) }),
    };
  }
  return { own, opts: runOpts };
}
