/**
 * Progress output and metric files. Progress goes to stderr so stdout stays free for results
 * (`--json`): a redrawn one-line bar on a terminal, plain lines every `logEvery` steps in
 * logs and CI.
 *
 * @module
 */

import process from "node:process";
import { styleText } from "node:util";
import { KernelProgress } from "./jupyter.ts";

/** One optimizer update as shown by {@link Progress}. */
export interface StepInfo {
  /** 1-based update number. */
  step: number;
  /** Training loss of the update (nats). */
  loss: number;
  /** Learning rate used. */
  lr: number;
  /** Gradient norm before clipping. */
  gradNorm: number;
  /** Training throughput so far. */
  tokensPerS: number;
}

/** Options of {@link Progress}. */
export interface ProgressOptions {
  /** Planned number of updates. */
  steps: number;
  /** Plain mode prints every this many steps (and the last); default: about 20 lines a run. */
  logEvery?: number;
  /** Redraw a bar in place; default: whether stderr is a terminal. */
  tty?: boolean;
  /**
   * Where text goes; default: stderr, or in the Deno Jupyter kernel (which does not forward
   * stderr) one updating notebook display ({@link KernelProgress}).
   */
  write?: (text: string) => void;
}

const encoder = new TextEncoder();

function toStderr(text: string): void {
  const bytes = encoder.encode(text);
  let done = 0;
  while (done < bytes.length) done += Deno.stderr.writeSync(bytes.subarray(done));
}

/** Renders training progress: a `\r` bar on a terminal, log lines otherwise. */
export class Progress {
  readonly #steps: number;
  readonly #every: number;
  readonly #tty: boolean;
  readonly #write: (text: string) => void;
  #start = performance.now();
  #lastDraw = 0;
  #barShown = false;
  readonly #kernel: KernelProgress | null;

  /** Starts the clock for the ETA. */
  constructor(opts: ProgressOptions) {
    this.#steps = opts.steps;
    this.#every = opts.logEvery && opts.logEvery > 0
      ? opts.logEvery
      : Math.max(1, Math.ceil(opts.steps / 20));
    this.#tty = opts.tty ?? Deno.stderr.isTerminal();
    this.#write = opts.write ?? toStderr;
    this.#kernel = opts.write === undefined && opts.tty === undefined
      ? KernelProgress.create()
      : null;
  }

  /** Reports a finished update. */
  step(info: StepInfo): void {
    const last = info.step === this.#steps;
    if (this.#kernel !== null) {
      this.#kernel.step(info.step, this.#steps, this.#line(info), last);
      return;
    }
    if (!this.#tty) {
      if (info.step % this.#every === 0 || last || info.step === 1) {
        this.#write(this.#line(info) + "\n");
      }
      return;
    }
    const now = performance.now();
    // Redrawing more than ~10 times a second only costs time.
    if (!last && now - this.#lastDraw < 100) return;
    this.#lastDraw = now;
    // A wrapped line cannot be redrawn with \r, so the bar must fit the terminal.
    const room = terminalColumns() - 1;
    let text = this.#line(info);
    const width = 20;
    if (text.length + width + 1 <= room) {
      const filled = Math.round((width * info.step) / this.#steps);
      const bar = "█".repeat(filled) + "░".repeat(width - filled);
      text = `${styleText("cyan", bar, { stream: process.stderr })} ${text}`;
    } else {
      text = text.slice(0, room);
    }
    this.#write(`\r${text}\x1b[K`);
    this.#barShown = true;
  }

  /** Prints a whole line (e.g. an eval result) without garbling the bar. */
  note(text: string): void {
    if (this.#kernel !== null) return this.#kernel.note(text);
    this.#endBar();
    this.#write(text + "\n");
  }

  /** Ends the bar line, if one is shown. */
  done(): void {
    this.#kernel?.done();
    this.#endBar();
  }

  #endBar(): void {
    if (this.#barShown) this.#write("\n");
    this.#barShown = false;
  }

  #line(info: StepInfo): string {
    const elapsed = (performance.now() - this.#start) / 1000;
    const eta = (elapsed / info.step) * (this.#steps - info.step);
    const width = String(this.#steps).length;
    return `step ${String(info.step).padStart(width)}/${this.#steps}` +
      ` loss ${info.loss.toFixed(4)} lr ${info.lr.toExponential(2)}` +
      ` gnorm ${info.gradNorm.toPrecision(3)} ${formatCount(info.tokensPerS)} tok/s` +
      ` eta ${formatDuration(eta)}`;
  }
}

function terminalColumns(): number {
  try {
    return Deno.consoleSize().columns || 80;
  } catch {
    return 80;
  }
}

/** `1234` → `1.2k`, `3.4e6` → `3.4M`. */
export function formatCount(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  if (Math.abs(n) >= 1e9) return `${(n / 1e9).toFixed(1)}G`;
  if (Math.abs(n) >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (Math.abs(n) >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return n.toFixed(0);
}

/** Seconds as `42s`, `3m05s` or `1h02m`. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "?";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

/** Appends one JSON object per line to a file; each line is flushed when written. */
export class JsonlWriter implements Disposable {
  /** The file written to. */
  readonly path: string;
  #file: Deno.FsFile | null;

  /**
   * Creates `path`; an existing file or symlink there is refused (AlreadyExists), never
   * truncated or followed: the caller decides whether an earlier file may go.
   */
  constructor(path: string) {
    this.path = path;
    this.#file = Deno.openSync(path, { write: true, createNew: true });
  }

  /** Writes `record` as one line; non-finite numbers become null, as JSON requires. */
  write(record: Record<string, unknown>): void {
    if (!this.#file) throw new Error(`JsonlWriter ${this.path}: already closed`);
    const bytes = encoder.encode(JSON.stringify(record) + "\n");
    let done = 0;
    while (done < bytes.length) done += this.#file.writeSync(bytes.subarray(done));
  }

  /** Closes the file; later writes throw. Safe to call twice. */
  close(): void {
    this.#file?.close();
    this.#file = null;
  }

  /** Same as {@link JsonlWriter.close}, for `using`. */
  [Symbol.dispose](): void {
    this.close();
  }
}
