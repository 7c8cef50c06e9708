/**
 * Executes every notebook in `notebooks/` headless with the Deno Jupyter kernel (nbclient,
 * from a Python venv) and fails on any error: an `error` output, a `stderr` stream, or an
 * error/stderr MIME type in any cell output. Outputs are checked, not just the execution
 * status, because a Deno kernel has been known to report a failing cell as successful.
 *
 *     deno run -A tools/notebooks.ts [--venv .venv] [--timeout S] [--keep DIR] [NOTEBOOK.ipynb ...]
 *
 * The kernelspec is installed with `deno jupyter --install` into the venv's `share/jupyter`
 * (never the user's home), pointing at this Deno. Prints one line per notebook and ends with
 * `notebooks: N passed, M failed`; exit status 0 when none failed, 1 otherwise, and 3 when
 * the venv has no nbclient (`pip install nbclient jupyter-client ipykernel`).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { basename, dirname, join, resolve } from "node:path";

const root = resolve(new URL("..", import.meta.url).pathname);

/** The checker run inside the venv's Python: executes one notebook, prints a JSON verdict. */
const CHECKER = `
import json, sys, nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
path, timeout = sys.argv[1], int(sys.argv[2])
nb = nbformat.read(path, as_version=4)
client = NotebookClient(nb, kernel_name="deno", timeout=timeout, allow_errors=True,
                        resources={"metadata": {"path": sys.argv[3]}})
problems = []
try:
    client.execute()
except (CellExecutionError, CellTimeoutError, DeadKernelError, RuntimeError) as e:
    problems.append("execution: " + str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__)
code = 0
for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
        continue
    code += 1
    if cell.get("execution_count") is None and cell.source.strip():
        problems.append(f"cell {i}: not executed")
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "error":
            problems.append(f"cell {i}: {out.get('ename')}: {str(out.get('evalue'))[:300]}")
        elif kind == "stream" and out.get("name") == "stderr":
            problems.append(f"cell {i}: stderr: {out.get('text', '')[:300]!r}")
        for mime in (out.get("data") or {}):
            if "stderr" in mime or "error" in mime:
                problems.append(f"cell {i}: {mime} output")
if len(sys.argv) > 4:
    nbformat.write(nb, sys.argv[4])
print(json.dumps({"cells": code, "problems": problems}))
`;

const { values, positionals } = parseArgs({
  args: Deno.args,
  options: {
    venv: { type: "string", default: join(root, ".venv") },
    timeout: { type: "string", default: "300" },
    // a folder to write each executed notebook into (with its outputs), for a look
    keep: { type: "string" },
  },
  allowPositionals: true,
});
const venv = resolve(values.venv!);
const python = join(venv, "bin", "python");

const dec = new TextDecoder();
const probe = await new Deno.Command(python, {
  args: ["-c", "import nbclient, nbformat, jupyter_client"],
  stdout: "null",
  stderr: "null",
}).output().catch(() => null);
if (probe === null || !probe.success) {
  console.log(
    `notebooks: skipped: ${python} has no nbclient ` +
      "(python3 -m venv .venv && .venv/bin/pip install nbclient jupyter-client ipykernel)",
  );
  Deno.exit(3);
}

// the kernelspec goes into the venv (jupyter_client searches sys.prefix/share/jupyter), and
// the kernel runs this very Deno
const data = join(venv, "share");
const env = {
  XDG_DATA_HOME: data,
  JUPYTER_DATA_DIR: join(data, "jupyter"),
  JUPYTER_PATH: join(data, "jupyter"),
  PATH: `${dirname(Deno.execPath())}:${Deno.env.get("PATH") ?? ""}`,
  DENO_NO_UPDATE_CHECK: "1",
  NO_COLOR: "1",
};
const install = await new Deno.Command(Deno.execPath(), {
  args: ["jupyter", "--install", "--name", "deno", "--force"],
  env,
  stdout: "piped",
  stderr: "piped",
}).output();
if (!install.success) {
  console.log(`notebooks: deno jupyter --install failed: ${dec.decode(install.stderr).trim()}`);
  console.log("notebooks: 0 passed, 1 failed");
  Deno.exit(1);
}

const books = positionals.length > 0
  ? positionals.map((p) => resolve(p))
  : [...Deno.readDirSync(join(root, "notebooks"))]
    .filter((e) => e.isFile && e.name.endsWith(".ipynb"))
    .map((e) => join(root, "notebooks", e.name))
    .sort();

let passed = 0;
let failed = 0;
for (const book of books) {
  const t0 = performance.now();
  const r = await new Deno.Command(python, {
    args: [
      "-c",
      CHECKER,
      book,
      values.timeout!,
      dirname(book),
      ...(values.keep === undefined ? [] : [join(resolve(values.keep), basename(book))]),
    ],
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const seconds = ((performance.now() - t0) / 1000).toFixed(1);
  const name = book.startsWith(root) ? book.slice(root.length + 1) : book;
  let verdict: { cells: number; problems: string[] } | null = null;
  try {
    verdict = JSON.parse(dec.decode(r.stdout).trim().split("\n").at(-1) ?? "");
  } catch { /* reported below */ }
  if (verdict === null) {
    failed++;
    const why = dec.decode(r.stderr).trim().split("\n").slice(-3).join(" | ");
    console.log(`notebook ${name}: FAILED (the checker did not finish: ${why})`);
  } else if (verdict.problems.length > 0) {
    failed++;
    console.log(`notebook ${name}: FAILED in ${seconds}s`);
    for (const p of verdict.problems) console.log(`  ${p}`);
  } else {
    passed++;
    console.log(`notebook ${name}: ok (${verdict.cells} code cells, ${seconds}s)`);
  }
}
console.log(`notebooks: ${passed} passed, ${failed} failed`);
Deno.exit(failed === 0 ? 0 : 1);
