/**
 * Runs an example script (`examples/<name>.ts`) as a subprocess, as a user would: the tests
 * of the scripts' flags, outputs and one-line errors share it.
 * @module
 */

/** Exit code, stdout and stderr of `deno run -A examples/<name>.ts ...args`. */
export async function runScript(
  name: string,
  args: string[],
): Promise<{ code: number; out: string; err: string }> {
  const script = new URL(`../examples/${name}.ts`, import.meta.url).pathname;
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", script, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  const dec = new TextDecoder();
  return { code: r.code, out: dec.decode(r.stdout), err: dec.decode(r.stderr) };
}

/** The last line of a text. */
export const lastLine = (s: string): string => s.trim().split("\n").at(-1)!;
