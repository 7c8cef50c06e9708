/**
 * A run's checkpoints: where they live (`<out>/checkpoints/step-00000120.safetensors`), the
 * run record stored inside each one (everything `--resume` needs to continue the run exactly:
 * the resolved options, the model, the tokenizer, a fingerprint of the data, the sampler's
 * position and the counters), which ones a resume may use, and pruning to `--keep`.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { join } from "node:path";
import { EngineError, inspectCheckpoint } from "../ffi/engine.ts";
import { UsageError } from "./errors.ts";
import type { Dataset } from "./data.ts";
import { DivergenceWatch, type WatchState } from "./diverge.ts";
import type { ResolvedOptions } from "./options.ts";
import type { ModelConfig } from "./presets.ts";
import { Rng } from "./rng.ts";

/** The folder of a run's checkpoints, inside its `--out`. */
export const CHECKPOINT_DIR = "checkpoints";

/** The names a run gives its checkpoints; only these are ever pruned or resumed from. */
const NAME = /^step-(\d{8,})\.safetensors$/;

/** Version of {@link RunRecord}'s layout. */
export const RUN_RECORD_VERSION = 1;

/** The file name of the checkpoint after `step` updates: `step-00000120.safetensors`. */
export function checkpointName(step: number): string {
  return `step-${String(step).padStart(8, "0")}.safetensors`;
}

/**
 * In-memory data a run was given (`train({ data: { text } })`, `finetune({ data: [...] })`),
 * as its run record keeps it: the run's own copy in its folder, so that the run can be resumed
 * (and no record names a temporary file).
 */
export interface OwnedData {
  /**
   * `text`: pre-training's `{ text }` (a resume reads it back byte-tokenized, as the run did);
   * `records`: fine-tuning records or `{ text }` (JSONL files, read as `--data` files are);
   * `dataset`: a Dataset object, which no file can hold: a resume needs it given again.
   */
  form: "text" | "records" | "dataset";
  /** The file holding `data`, relative to the run folder. */
  data?: string;
  /** The file holding `valData`, relative to the run folder. */
  valData?: string;
}

/**
 * What a checkpoint carries besides the engine's tensors (stored as JSON in its metadata):
 * enough to rebuild the run around the engine and continue it update for update.
 */
export interface RunRecord {
  /** Always `qgalore-run`. */
  kind: "qgalore-run";
  /** {@link RUN_RECORD_VERSION}. */
  version: number;
  /** Updates completed. */
  step: number;
  /**
   * The cosine schedule's length: the first run's `--steps`, kept when a resume extends the
   * run (the extra updates run at the floor learning rate).
   */
  schedule_steps: number;
  /** Lines of `metrics.jsonl` written up to this checkpoint (a resume keeps exactly these). */
  metrics_lines: number;
  /** Every option of the run, resolved (`resume` null, `out` the run's folder). */
  options: ResolvedOptions;
  /** The model's name and config. */
  model: { name: string; config: ModelConfig };
  /**
   * Where the engine ran and in what precision (what `auto` became): a resume asks for the
   * same, since another device or precision computes other losses.
   */
  engine: {
    device: string;
    precision: string;
    /**
     * Worker threads the engine used (the CPU's reductions split work by thread, so another
     * count changes qgalore's losses in the last bits); absent in records of older builds.
     */
    threads?: number;
  };
  /** The tokenizer: where it came from (null: bytes), its kind and vocabulary. */
  tokenizer: { kind: string; vocab_size: number; source: string | null };
  /**
   * The data: its description and a SHA-256 of the description and the complete train and
   * validation token streams ({@link dataFingerprint}).
   */
  data: { description: string; fingerprint: string; own?: OwnedData };
  /**
   * The batch sampler's position: pre-training's {@link Rng.state}; fine-tuning's sampler
   * state (lib/finetune_data.ts `SamplerState`).
   */
  sampler: unknown;
  /**
   * The data-parallel ranks that drew the batches (absent: one process). A resume must use
   * as many: another N would change the global batch the sampler draws.
   */
  ranks?: number;
  /** `finetune` for a fine-tuning run (lib/finetune.ts); absent for pre-training. */
  task?: "finetune";
  /** Counters the summary and the divergence watch continue from. */
  counters: {
    /** Seconds spent in updates (tokens/s). */
    train_s: number;
    /** Training tokens consumed (absent in older records: steps × tokens per update). */
    tokens?: number;
    /** Seconds since the run first started. */
    elapsed_s: number;
    /** Loss of the last update. */
    last_loss: number | null;
    /** Validation loss before the first update. */
    initial_val_loss: number | null;
    /** The divergence watch. */
    watch: WatchState;
  };
  /** When the run first started (ISO 8601). */
  started_at: string;
}

/** Something that writes checkpoints with a run record (the native engine). */
export interface CheckpointWriter {
  /** Writes the engine state and `run` (as JSON) to `path`, atomically and durably. */
  save(path: string, run?: unknown): Promise<void>;
}

/**
 * Writes the checkpoint of `record.step` into `out/checkpoints/` with the run record inside;
 * returns its path. The engine writes atomically and durably (temporary file, fsync, rename):
 * a killed save leaves no file under the final name.
 */
export async function writeCheckpoint(
  engine: CheckpointWriter,
  out: string,
  record: RunRecord,
): Promise<string> {
  const dir = join(out, CHECKPOINT_DIR);
  try {
    Deno.mkdirSync(dir, { recursive: true });
  } catch (e) {
    const why = (e instanceof Error ? e.message : String(e)).split("\n")[0];
    throw new UsageError(`--out ${out}: cannot create ${CHECKPOINT_DIR}/ (${why})`);
  }
  const path = join(dir, checkpointName(record.step));
  await engine.save(path, record);
  return path;
}

/** One checkpoint file of a run. */
export interface CheckpointFile {
  /** Updates completed when it was written. */
  step: number;
  /** Its path. */
  path: string;
}

/** Temporary files of the engine's saves into the checkpoint folder. */
const TEMP = /^(\.step-\d{8,}\.safetensors\.tmp-\d+-\d+|\.qg-\d+-\d+\.tmp)$/;

/** The entries of the checkpoint folder `dir`; none when it does not exist. */
function entries(dir: string): Deno.DirEntry[] {
  try {
    return [...Deno.readDirSync(dir)];
  } catch (e) {
    if (e instanceof Deno.errors.NotFound || e instanceof Deno.errors.NotADirectory) return [];
    throw e;
  }
}

/**
 * The checkpoints a run wrote into `out/checkpoints/` (regular files named by
 * {@link checkpointName}; anything else there is not ours), newest first.
 */
export function listCheckpoints(out: string): CheckpointFile[] {
  const dir = join(out, CHECKPOINT_DIR);
  const found: CheckpointFile[] = [];
  for (const e of entries(dir)) {
    const m = NAME.exec(e.name);
    if (m === null || !e.isFile) continue; // a link or a folder with our name is not ours
    found.push({ step: Number(m[1]), path: join(dir, e.name) });
  }
  return found.sort((a, b) => b.step - a.step);
}

/**
 * Removes the oldest of the run's checkpoints beyond the `keep` newest; never the newest, nor
 * `protect` (the last good one), nor a file not named as the run names its checkpoints.
 * Returns the removed paths.
 */
export function pruneCheckpoints(out: string, keep: number, protect: string | null): string[] {
  const removed: string[] = [];
  for (const c of listCheckpoints(out).slice(Math.max(1, keep))) {
    if (c.path === protect) continue;
    try {
      Deno.removeSync(c.path);
      removed.push(c.path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
  }
  return removed;
}

/**
 * The run record of a checkpoint, checked; throws a one-line UsageError naming what is wrong
 * when the file is not a valid checkpoint or its record is missing or malformed.
 */
export function readRunRecord(path: string): RunRecord {
  let info: { step: number; run: unknown };
  try {
    // checks the header and the checksum of the whole payload without building an engine
    info = inspectCheckpoint(path);
  } catch (e) {
    if (e instanceof EngineError || e instanceof UsageError) throw new UsageError(e.message);
    throw e;
  }
  const r = info.run as Partial<RunRecord> | null;
  const bad = (why: string): never => {
    throw new UsageError(`${path}: run record ${why}`);
  };
  if (typeof r !== "object" || r === null) return bad("missing (not written by a training run)");
  if (r.kind !== "qgalore-run") return bad(`kind ${JSON.stringify(r.kind)}: not a run record`);
  if (r.version !== RUN_RECORD_VERSION) {
    return bad(`version ${r.version}: this build reads version ${RUN_RECORD_VERSION}`);
  }
  const count = (x: unknown) => typeof x === "number" && Number.isInteger(x) && x >= 0;
  if (!count(r.step) || r.step! < 1) return bad(`step ${r.step}: must be an integer ≥ 1`);
  if (r.step !== info.step) bad(`step ${r.step} differs from the engine's ${info.step}`);
  if (!count(r.schedule_steps) || !count(r.metrics_lines)) bad("counts malformed");
  if (typeof r.options !== "object" || r.options === null) bad("options missing");
  if (typeof r.model?.config !== "object" || typeof r.model?.name !== "string") {
    bad("model missing");
  }
  if (typeof r.engine?.device !== "string" || typeof r.engine?.precision !== "string") {
    bad("engine device or precision missing");
  }
  if (typeof r.tokenizer?.vocab_size !== "number") bad("tokenizer missing");
  if (typeof r.data?.fingerprint !== "string") bad("data fingerprint missing");
  if (typeof r.counters !== "object" || r.counters === null) bad("counters missing");
  const c = r.counters!;
  const seconds = (x: unknown) => typeof x === "number" && Number.isFinite(x) && x >= 0;
  if (!seconds(c.train_s) || !seconds(c.elapsed_s)) bad("counters: seconds malformed");
  if (typeof c.watch !== "object" || c.watch === null) bad("counters: watch missing");
  try {
    DivergenceWatch.restore(c.watch);
  } catch (e) {
    bad(`counters: watch: ${(e as Error).message.split("\n")[0]}`);
  }
  const threads = r.engine!.threads;
  if (threads !== undefined && !(count(threads) && threads >= 1)) {
    bad(`engine threads ${threads}: must be an integer ≥ 1`);
  }
  if (r.task !== undefined && r.task !== "finetune") bad(`task ${JSON.stringify(r.task)}: unknown`);
  if (c.tokens !== undefined && !count(c.tokens)) bad("counters: tokens malformed");
  if (r.ranks !== undefined && !(count(r.ranks) && r.ranks >= 1)) {
    bad(`ranks ${r.ranks}: must be an integer ≥ 1`);
  }
  if (r.task === undefined) {
    try {
      Rng.restore((r.sampler ?? []) as number[]);
    } catch (e) {
      bad(`sampler: ${(e as Error).message}`);
    }
  } else if (typeof r.sampler !== "object" || r.sampler === null) {
    bad("sampler missing");
  }
  return r as RunRecord;
}

/** The checkpoint a resume starts from, and the newer ones it had to skip. */
export interface Resumable {
  /** The newest valid checkpoint. */
  path: string;
  /** Its run record. */
  record: RunRecord;
  /**
   * Newer checkpoints that were not valid, with the reason (one line each); `corrupt` when
   * the file itself is bad (not when it could not be read, or is of a newer format).
   */
  skipped: { path: string; why: string; corrupt: boolean }[];
}

/**
 * The newest valid checkpoint of the run in `dir` (invalid newer ones are reported in
 * `skipped`); a one-line UsageError when `dir` is not a run folder or holds no valid one.
 */
export function findResumable(dir: string): Resumable {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(dir);
  } catch {
    throw new UsageError(`--resume ${dir}: not found; name the --out folder of an earlier run`);
  }
  if (!info.isDirectory) {
    throw new UsageError(`--resume ${dir}: not a folder; name the --out folder of an earlier run`);
  }
  const files = listCheckpoints(dir);
  if (files.length === 0) {
    throw new UsageError(
      `--resume ${dir}: no checkpoints in ${join(dir, CHECKPOINT_DIR)} (the run saved none: ` +
        "it was started without an --out, or stopped before its first save)",
    );
  }
  const skipped: { path: string; why: string; corrupt: boolean }[] = [];
  for (const f of files) {
    try {
      return { path: f.path, record: readRunRecord(f.path), skipped };
    } catch (e) {
      if (!(e instanceof UsageError)) throw e;
      skipped.push({ path: f.path, why: e.message, corrupt: isCorrupt(e.message) });
    }
  }
  throw new UsageError(
    `--resume ${dir}: none of its ${files.length} checkpoints is valid; the newest: ${
      skipped[0].why
    }`,
  );
}

/**
 * Whether a checkpoint's refusal says the file is bad, rather than unreadable here (an I/O
 * error, a permission) or written by a newer build (a format or record version): only a bad
 * file may be set aside; the others stay as they are, for a build or a machine that reads them.
 */
export function isCorrupt(why: string): boolean {
  return !/cannot read checkpoint|cannot open|os error \d+|format version|record version/i.test(
    why,
  );
}

/**
 * A SHA-256 (hex) of what a run reads from its data: its description (less `path`, the
 * `--data` it was opened by, which a move changes), then the complete
 * training and validation token streams (int32 ids, little-endian), each followed by its
 * length. Any change to a single token, the tokenizer or the split changes it. A sharded
 * corpus is hashed chunk by chunk ({@link Dataset.tokenChunks}), never copied whole.
 */
export function dataFingerprint(data: Dataset, path: string | null = null): string {
  const hash = createHash("sha256");
  // without the path it was opened by: moved data is the same data
  const described = path === null ? data.describe() : data.describe().replace(path, "");
  hash.update(new TextEncoder().encode(described));
  for (const split of ["train", "val"] as const) {
    const chunks: Iterable<Int32Array> = data.tokenChunks?.(split) ?? [data.tokens(split)];
    let n = 0;
    for (const t of chunks) {
      hash.update(new Uint8Array(t.buffer, t.byteOffset, t.byteLength));
      n += t.length;
    }
    // the split's length after it, so that moving tokens from one split to the other changes it
    hash.update(new TextEncoder().encode(`|${split}:${n}`));
  }
  return hash.digest("hex");
}

/**
 * Renames a checkpoint the run must not resume from to `<name>.invalid` (not readable) or
 * `<name>.diverged` (written after the loss's best, by a run that then diverged), so that
 * neither a resume nor pruning takes it for one of the run's checkpoints again; nothing is
 * deleted. Returns the new path.
 */
export function setAside(path: string, why: "invalid" | "diverged"): string {
  // never onto an earlier one set aside under the same name (e.g. two divergences)
  for (let i = 0;; i++) {
    const to = i === 0 ? `${path}.${why}` : `${path}.${why}.${i}`;
    try {
      Deno.lstatSync(to);
      continue;
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
    try {
      // a link (not a rename) cannot replace a file that appeared in between
      Deno.linkSync(path, to);
    } catch (e) {
      if (e instanceof Deno.errors.AlreadyExists) continue;
      // a file system without hard links: the name was free a moment ago
      Deno.renameSync(path, to);
      return to;
    }
    Deno.removeSync(path);
    return to;
  }
}

/**
 * Removes what killed saves of the run left in `out/checkpoints/`: the engine's temporary
 * files of the run's checkpoint names (`.step-00000120.safetensors.tmp-<pid>-<ns>`). Call it
 * only while holding the run's lock ({@link lockRun}): no other process then saves into the
 * folder, so every such file is stale whatever process id it names (a pid may be reused: in a
 * container it is often 1). Returns the removed paths.
 */
export function removeStaleTemps(out: string): string[] {
  const dir = join(out, CHECKPOINT_DIR);
  const removed: string[] = [];
  for (const e of entries(dir)) {
    // the engine's temporary names: `.<name>.tmp-<pid>-<ns>`, or `.qg-<pid>-<ns>.tmp` when
    // that would be too long for the file system (rust/src/state/file.rs)
    if (!TEMP.test(e.name) || !e.isFile) continue;
    Deno.removeSync(join(dir, e.name));
    removed.push(join(dir, e.name));
  }
  return removed;
}
