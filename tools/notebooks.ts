/**
 * Executes every notebook in `notebooks/` headless with the Deno Jupyter kernel (nbclient,
 * from a Python venv) and fails on any error: an `error` output, a `stderr` stream, or an
 * error/stderr MIME type in any cell output. Outputs are checked, not just the execution
 * status, because a Deno kernel has been known to report a failing cell as successful.
 *
 *     deno run -A tools/notebooks.ts [--venv .venv] [--timeout S] [--keep DIR] [NOTEBOOK.ipynb ...]
 *
 * The kernelspec is installed with `deno jupyter --install` into the venv's `share/jupyter`
 * (never the user's home), pointing at this Deno.
 *
 * A notebook that imports the package from JSR (an `import … from "jsr:@qgalore/qgalore"` line
 * that is not a comment, e.g. `notebooks/from_jsr.ipynb`) runs as a JSR user would run it: this
 * serves the files `deno publish` would upload over HTTP (tools/package_server.ts, as
 * tests/jsr_test.ts does), executes a copy of the notebook whose `jsr:@qgalore/qgalore[/entry]`
 * specifiers name the served files, from a fresh temporary folder (no deno.json, no lock file).
 * The committed notebook keeps the `jsr:` line a user types. Its engine: `QGALORE_LIB` when set,
 * else this checkout's `rust/target/release/libqgalore.so` when built (so CI does not build the
 * engine again; tests/jsr_test.ts covers the build from the served sources), else the loader
 * builds the served sources into its cache (`QGALORE_CACHE`).
 *
 * Prints one line per notebook and ends with
 * `notebooks: N passed, M failed`; exit status 0 when none failed, 1 otherwise, and 3 when
 * the venv has no nbclient (`pip install nbclient jupyter-client ipykernel`).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { basename, dirname, join, resolve } from "node:path";
import { type PackageServer, publishedFiles, servePackage, toServed } from "./package_server.ts";

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
const env: Record<string, string> = {
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

/** Whether a notebook imports the package from JSR (a code line, not a comment). */
function importsJsr(book: string): boolean {
  const nb = JSON.parse(Deno.readTextFileSync(book)) as {
    cells: { cell_type: string; source: string | string[] }[];
  };
  return nb.cells.some((c) =>
    c.cell_type === "code" &&
    /^\s*(import|export)\b[^\n]*["']jsr:@qgalore\/qgalore[@/"']/m.test(
      Array.isArray(c.source) ? c.source.join("") : c.source,
    )
  );
}

/**
 * A copy of `book` in a fresh temporary folder whose code cells import the package from
 * `server` instead of JSR; returns the copy's path.
 */
function servedCopy(book: string, server: PackageServer): string {
  const nb = JSON.parse(Deno.readTextFileSync(book)) as {
    cells: { cell_type: string; source: string | string[] }[];
  };
  for (const c of nb.cells) {
    if (c.cell_type !== "code") continue;
    const src = Array.isArray(c.source) ? c.source.join("") : c.source;
    c.source = toServed(src, `${server.base}/pkg`);
  }
  const dir = Deno.makeTempDirSync({ prefix: "qgalore-notebook-" });
  const copy = join(dir, basename(book));
  Deno.writeTextFileSync(copy, JSON.stringify(nb, null, 1) + "\n");
  return copy;
}

// the engine of a notebook importing the served package: QGALORE_LIB, else this checkout's
// build, else the loader builds the served sources into its cache (QGALORE_CACHE)
const localLib = join(root, "rust", "target", "release", "libqgalore.so");
if (!Deno.env.get("QGALORE_LIB") && Deno.build.os === "linux") {
  try {
    if (Deno.statSync(localLib).isFile) env.QGALORE_LIB = localLib;
  } catch { /* not built: the loader builds it */ }
}

let server: PackageServer | null = null;
let passed = 0;
let failed = 0;
for (const book of books) {
  const t0 = performance.now();
  const served = importsJsr(book);
  let copy: string | null = null;
  if (served) {
    server ??= servePackage(await publishedFiles());
    copy = servedCopy(book, server);
  }
  const r = await new Deno.Command(python, {
    args: [
      "-c",
      CHECKER,
      copy ?? book,
      values.timeout!,
      // the kernel's working folder: the notebook's, or the copy's fresh one
      dirname(copy ?? book),
      ...(values.keep === undefined ? [] : [join(resolve(values.keep), basename(book))]),
    ],
    env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (copy !== null) Deno.removeSync(dirname(copy), { recursive: true });
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
    const how = served ? ", the package over HTTP" : "";
    console.log(`notebook ${name}: ok (${verdict.cells} code cells${how}, ${seconds}s)`);
  }
}
await server?.server.shutdown();
console.log(`notebooks: ${passed} passed, ${failed} failed`);
Deno.exit(failed === 0 ? 0 : 1);
