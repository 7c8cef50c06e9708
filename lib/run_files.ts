/**
 * The files a run writes into its `--out` folder (`metrics.jsonl`, `summary.json`): never
 * through a symlink, never over an earlier run unless asked.
 * @module
 */

import { join } from "node:path";
import { UsageError } from "./errors.ts";
import { JsonlWriter } from "./log.ts";
import { listCheckpoints } from "./checkpoints.ts";

/** The files a run writes into its `--out` folder. */
const RUN_FILES = ["metrics.jsonl", "summary.json"] as const;

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
    throw new UsageError(
      `--out ${out}: holds an earlier run; continue it with --resume ${out}, or pass ` +
        "--overwrite on to replace it",
    );
  }
}

/**
 * Creates the output directory and a new `metrics.jsonl` in it, after {@link checkOut}: an
 * earlier run's regular files and checkpoints are removed (`--overwrite`), a symlink is never
 * followed, and nothing in `checkpoints/` not named as a run names its checkpoints is touched.
 */
export function openOut(out: string): JsonlWriter {
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
 * new file that atomically replaces it, then open for appending. Returns the writer and the
 * number of records kept (fewer than `lines` only when the file lost some).
 */
export function resumeMetrics(out: string, lines: number): { writer: JsonlWriter; kept: number } {
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
  try {
    if (source !== null) {
      // JSON.stringify(JSON.parse(line)) gives the line back byte for byte
      for (const line of readLines(source)) {
        if (kept === lines) break;
        if (line === "") continue;
        writer.write(JSON.parse(line));
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
    throw e instanceof SyntaxError
      ? new UsageError(`--resume ${out}: metrics.jsonl: a record is not JSON (${e.message})`)
      : cannotWrite(out, e);
  } finally {
    source?.close();
  }
  return { writer, kept };
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
