/**
 * The files a run writes into its `--out` folder (`metrics.jsonl`, `summary.json`): never
 * through a symlink, never over an earlier run unless asked.
 * @module
 */

import { dirname, join, resolve } from "node:path";
import { exists } from "./fs.ts";
import { UsageError } from "./errors.ts";
import { JsonlWriter } from "./log.ts";
import { listCheckpoints } from "./checkpoints.ts";

/** The files a run writes into its `--out` folder. */
// report.html is written from the other two at the run's end (lib/report.ts)
const RUN_FILES = ["metrics.jsonl", "summary.json", "report.html"] as const;

/**
 * Refuses an `--out` folder holding an earlier run (its files, or checkpoints in its
 * `checkpoints/`) unless `overwrite`, and one whose run files are symlinks or not regular
 * files (never written through, even with `overwrite`).
 */
export function checkOut(out: string, overwrite: boolean): void {
  // a new run's checkpoints must not mix with an earlier run's: --resume would take theirs
  let earlier = listCheckpoints(out).length > 0;
  for (const name of RUN_FILES) {
    const path = join(out, name);
    let info: Deno.FileInfo;
    try {
      info = Deno.lstatSync(path);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound || e instanceof Deno.errors.NotADirectory) continue;
      throw e;
    }
    if (!info.isFile) {
      throw new UsageError(
        `--out ${out}: ${name} is ${
          info.isSymlink ? "a symlink" : "not a regular file"
        }; refusing to write through it (remove it or choose another --out)`,
      );
    }
    earlier = true;
  }
  if (earlier && !overwrite) {
    // only a run that saved a checkpoint can be continued
    throw new UsageError(
      listCheckpoints(out).length > 0
        ? `--out ${out}: holds an earlier run; continue it with --resume ${out}, or pass ` +
          "--overwrite on to replace it"
        : `--out ${out}: holds an earlier run's files but no checkpoint to resume from; pass ` +
          "--overwrite on to replace it, or choose a new --out",
    );
  }
}

/**
 * Creates the output directory and a new `metrics.jsonl` in it, after {@link checkOut}: an
 * earlier run's regular files and checkpoints are removed only with `overwrite` (checked
 * again here: another run may have written them since), a symlink is never followed, and
 * nothing in `checkpoints/` not named as a run names its checkpoints is touched.
 */
export function openOut(out: string, overwrite: boolean): JsonlWriter {
  checkOut(out, overwrite);
  try {
    Deno.mkdirSync(out, { recursive: true });
    for (const c of listCheckpoints(out)) Deno.removeSync(c.path);
  } catch (e) {
    throw cannotWrite(out, e);
  }
  for (const name of RUN_FILES) {
    const path = join(out, name);
    try {
      // removes a regular file only; lstat again, the folder may have changed since the check
      if (Deno.lstatSync(path).isFile) Deno.removeSync(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw cannotWrite(out, e);
    }
  }
  try {
    return new JsonlWriter(join(out, "metrics.jsonl"));
  } catch (e) {
    if (e instanceof Deno.errors.AlreadyExists) {
      throw new UsageError(
        `--out ${out}: metrics.jsonl appeared while starting (a symlink or another run?); ` +
          "refusing to write through it",
      );
    }
    throw cannotWrite(out, e);
  }
}

/**
 * A resumed run's `metrics.jsonl`: its first `lines` records (those written up to the
 * checkpoint; later ones, by the run that was stopped or killed, are dropped) rewritten to a
 * new file that atomically replaces it, then open for appending. Returns the writer, the
 * number of records kept (fewer than `lines` only when the file lost some: a damaged file
 * keeps its parsable prefix, and `notice` says how many were lost) and the last one kept.
 */
export function resumeMetrics(
  out: string,
  lines: number,
): {
  writer: JsonlWriter;
  kept: number;
  last: Record<string, unknown> | null;
  notice: string | null;
} {
  const path = join(out, "metrics.jsonl");
  let source: Deno.FsFile | null = null;
  try {
    const info = Deno.lstatSync(path);
    if (!info.isFile) {
      throw new UsageError(
        `--resume ${out}: metrics.jsonl is ${
          info.isSymlink ? "a symlink" : "not a regular file"
        }; refusing to write through it`,
      );
    }
    source = Deno.openSync(path, { read: true });
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw cannotWrite(out, e);
  }
  const tmp = join(out, `.metrics.jsonl.${Deno.pid}.tmp`);
  let writer: JsonlWriter;
  try {
    writer = new JsonlWriter(tmp);
  } catch (e) {
    source?.close();
    throw cannotWrite(out, e);
  }
  let kept = 0;
  let last: Record<string, unknown> | null = null;
  try {
    if (source !== null) {
      // JSON.stringify(JSON.parse(line)) gives the line back byte for byte
      // a damaged file (torn or zero-filled by a power loss) keeps its parsable prefix
      for (const line of readLines(source)) {
        if (kept === lines) break;
        if (line === "") continue;
        let record: unknown;
        try {
          record = JSON.parse(line);
        } catch {
          break;
        }
        if (typeof record !== "object" || record === null || Array.isArray(record)) break;
        last = record as Record<string, unknown>;
        writer.write(last);
        kept++;
      }
    }
    using f = Deno.openSync(tmp, { read: true });
    f.syncSync();
    // the writer keeps appending to the file under its new name
    Deno.renameSync(tmp, path);
  } catch (e) {
    writer.close();
    try {
      Deno.removeSync(tmp);
    } catch { /* renamed or never written */ }
    throw cannotWrite(out, e);
  } finally {
    source?.close();
  }
  const notice = kept < lines
    ? `notice: ${out}/metrics.jsonl lost ${lines - kept} of the ${lines} records written up ` +
      `to the checkpoint (damaged or cut short); kept the first ${kept}`
    : null;
  return { writer, kept, last, notice };
}

/** Flushes `out/metrics.jsonl` to the disk (with each checkpoint: a resume needs its lines). */
export function syncMetrics(out: string): void {
  try {
    using f = Deno.openSync(join(out, "metrics.jsonl"), { read: true });
    f.syncSync();
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw cannotWrite(out, e);
  }
}

/**
 * Writes `bytes` as the run folder's own file `name` (in-memory data a run keeps so that it can
 * be resumed) and returns its absolute path: never through a symlink, and never over another
 * file of that name unless `overwrite` (one with the same bytes is left as it is). Throws a
 * one-line UsageError. With `checkOnly`, only the refusals, before the folder is the run's.
 */
export function writeOwnFile(
  out: string,
  name: string,
  bytes: Uint8Array,
  overwrite: boolean,
  checkOnly = false,
): string {
  const path = resolve(out, name);
  let info: Deno.FileInfo | null = null;
  try {
    info = Deno.lstatSync(path);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound || e instanceof Deno.errors.NotADirectory)) {
      throw cannotWrite(out, e);
    }
  }
  if (info !== null) {
    if (!info.isFile) {
      throw new UsageError(
        `--out ${out}: ${name} is ${
          info.isSymlink ? "a symlink" : "not a regular file"
        }; the run keeps its in-memory data there (remove it or choose another --out)`,
      );
    }
    const same = info.size === bytes.length &&
      Deno.readFileSync(path).every((b, i) => b === bytes[i]);
    if (same) return path;
    if (!overwrite) {
      throw new UsageError(
        `--out ${out}: already holds a ${name} that is not this run's data; the run keeps its ` +
          "in-memory data there (choose another --out, or pass --overwrite on to replace it)",
      );
    }
  }
  if (checkOnly) return path;
  try {
    Deno.writeFileSync(path, bytes);
  } catch (e) {
    throw cannotWrite(out, e);
  }
  return path;
}

/** The lock of a run folder held by this process ({@link lockRun}). */
export interface RunLock {
  /** A one-line notice when a stale lock (of a process that no longer runs) was taken over. */
  notice: string | null;
  /**
   * Removes the lock; safe to call twice. With `removeFolders`, also the folders taking the
   * lock created (`out` and missing parents), where nothing else was written into them.
   */
  release(removeFolders?: boolean): void;
}

/**
 * The start time of process `pid` (from /proc), or null when it does not run (or unknown). A
 * zombie (ended, not yet reaped: a container without an init leaves killed processes so) does
 * not run.
 */
function startTime(pid: number): string | null {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // fields 3 (state) and 22, counted after the parenthesised command name (which may hold spaces)
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (fields[0] === "Z" || fields[0] === "X") return null;
    return fields[19] ?? null;
  } catch {
    return null;
  }
}

/**
 * Takes the lock of the run folder `out` (`out/.lock`, created exclusively, holding this
 * process's id and start time), before anything of the run is written: a second run on the
 * same folder, or a `--resume` while the run still goes on, is refused with one line naming
 * the process. A lock left by a process that no longer runs (killed) is taken over with a
 * notice; where that cannot be known (no /proc) the user is told to remove it.
 */
export function lockRun(out: string, flag = "--out"): RunLock {
  const path = join(out, ".lock");
  const me = `${Deno.pid} ${startTime(Deno.pid) ?? "?"}\n`;
  let notice: string | null = null;
  // the folders this creates, innermost first
  const created: string[] = [];
  for (let d = resolve(out); !exists(d) && dirname(d) !== d; d = dirname(d)) created.push(d);
  try {
    Deno.mkdirSync(out, { recursive: true });
  } catch (e) {
    throw cannotWrite(out, e);
  }
  for (let attempt = 0;; attempt++) {
    try {
      using f = Deno.openSync(path, { write: true, createNew: true });
      f.writeSync(new TextEncoder().encode(me));
      break;
    } catch (e) {
      if (!(e instanceof Deno.errors.AlreadyExists) || attempt > 2) throw cannotWrite(out, e);
    }
    let held = "";
    try {
      held = Deno.readTextFileSync(path);
    } catch { /* removed meanwhile: try again */ }
    const [pid, started] = held.trim().split(" ");
    const live = /^\d+$/.test(pid ?? "") ? startTime(Number(pid)) : null;
    const procs = startTime(Deno.pid) !== null;
    if (!procs || (live !== null && (started === "?" || live === started))) {
      throw new UsageError(
        `${flag} ${out}: in use by process ${pid || "?"} (its lock ${path}); wait for it to ` +
          `end${flag === "--out" ? " or choose another --out" : ""}${
            procs ? "" : " (remove the lock if it no longer runs)"
          }`,
      );
    }
    try {
      Deno.removeSync(path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw cannotWrite(out, e);
    }
    notice = `notice: took over ${path} left by process ${pid || "?"}, which no longer runs`;
  }
  let held = true;
  return {
    notice,
    release(removeFolders = false): void {
      if (!held) return;
      held = false;
      try {
        // only our own lock: never one a later run took over
        if (Deno.readTextFileSync(path) === me) Deno.removeSync(path);
      } catch { /* already gone */ }
      if (!removeFolders) return;
      for (const d of created) {
        try {
          Deno.removeSync(d); // an empty folder only
        } catch {
          return;
        }
      }
    },
  };
}

/** The lines of a file, read 1 MiB at a time (a long run's metrics need not fit in memory). */
function* readLines(file: Deno.FsFile): Generator<string> {
  const buf = new Uint8Array(1 << 20);
  const dec = new TextDecoder();
  let rest = "";
  for (let n = file.readSync(buf); n !== null; n = file.readSync(buf)) {
    const parts = (rest + dec.decode(buf.subarray(0, n), { stream: true })).split("\n");
    rest = parts.pop()!;
    yield* parts;
  }
  rest += dec.decode();
  if (rest !== "") yield rest;
}

/** Writes `summary.json` via a new temporary file and a rename: never through a symlink. */
export function writeSummary(out: string, text: string): void {
  const path = join(out, "summary.json");
  const tmp = join(out, `.summary.json.${Deno.pid}.tmp`);
  try {
    using f = Deno.openSync(tmp, { write: true, createNew: true });
    const bytes = new TextEncoder().encode(text);
    let done = 0;
    while (done < bytes.length) done += f.writeSync(bytes.subarray(done));
    f.syncSync();
  } catch (e) {
    try {
      Deno.removeSync(tmp);
    } catch { /* it may never have been created */ }
    throw cannotWrite(out, e);
  }
  // rename replaces a symlink named summary.json itself, never its target
  Deno.renameSync(tmp, path);
}

function cannotWrite(out: string, e: unknown): unknown {
  if (e instanceof Deno.errors.NotCapable || e instanceof UsageError) return e;
  const why = (e instanceof Error ? e.message : String(e)).split("\n")[0];
  return new UsageError(`--out ${out}: cannot write there (${why})`);
}
