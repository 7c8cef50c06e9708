/**
 * Errors caused by the user (flags, config files, data files) rather than by a bug.
 *
 * @module
 */

/**
 * A user mistake: a bad flag, config or data file. The message is one line that names the
 * flag or file, the offending value and what is allowed, so a CLI can print it without a
 * stack trace, e.g. `--batch-size 0: must be an integer ≥ 1`.
 */
export class UsageError extends Error {
  /** Creates a usage error; newlines in `message` are folded so it stays one line. */
  constructor(message: string) {
    super(message.replace(/\s*\n\s*/g, " "));
    this.name = "UsageError";
  }
}

/**
 * A value as an error message quotes it: JSON, cut to `max` characters
 * with `…`, so a message stays one short line even when the value is a whole dataset.
 */
export function shortValue(v: unknown, max = 80): string {
  let s: string;
  if (typeof v === "function") s = "a function";
  else {
    try {
      s = JSON.stringify(v) ?? String(v);
    } catch {
      s = Object.prototype.toString.call(v);
    }
  }
  s = s.replace(/\s+/g, " ");
  return s.length <= max ? s : `${s.slice(0, max - 1)}…`;
}
