/**
 * The pretraining CLI (`examples/pretrain.ts`) as a subprocess, for the tests that drive it
 * as a user would: run it, stop it with a signal after its first update, read its files.
 */
import { join } from "node:path";
import type { Summary } from "../lib/summary.ts";

/** Path of the CLI script. */
export const script: string = new URL("../examples/pretrain.ts", import.meta.url).pathname;

const dec = new TextDecoder();

/** A model small enough for ~1 ms updates: 2 blocks of width 64, byte vocabulary. */
export const TINY_MODEL = {
  vocab_size: 256,
  hidden_size: 64,
  intermediate_size: 128,
  num_attention_heads: 2,
  num_hidden_layers: 2,
  max_position_embeddings: 64,
} as const;

/** What a CLI run printed and returned. */
export interface Cli {
  /** Exit code. */
  code: number;
  /** Standard output. */
  stdout: string;
  /** Standard error. */
  stderr: string;
}

/** Runs the CLI with `args` to its end. */
export async function cli(args: string[], env: Record<string, string> = {}): Promise<Cli> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    env: { NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
}

/**
 * Starts the CLI with `args`, sends `signal` once its progress shows the first update, and
 * waits for it to end; returns its exit code and standard error.
 */
export async function stopAfterFirstStep(
  args: string[],
  signal: Deno.Signal,
): Promise<{ code: number; stderr: string }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    env: { NO_COLOR: "1" },
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let err = "";
  let sent = false;
  const reader = child.stderr.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    err += dec.decode(value, { stream: true });
    if (!sent && /step +1\//.test(err)) {
      child.kill(signal);
      sent = true;
    }
  }
  return { code: (await child.status).code, stderr: err };
}

/** metrics.jsonl of a run folder without the fields that measure time. */
export function metrics(dir: string): Record<string, unknown>[] {
  return Deno.readTextFileSync(join(dir, "metrics.jsonl")).split("\n").filter((l) => l)
    .map((l) => {
      const { elapsed_s: _e, tokens_per_s: _t, ...rest } = JSON.parse(l);
      return rest;
    });
}

/** summary.json of a run folder. */
export function summary(dir: string): Summary {
  return JSON.parse(Deno.readTextFileSync(join(dir, "summary.json")));
}
