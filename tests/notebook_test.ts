/**
 * tools/notebooks.ts judges a notebook by its outputs, not only by the kernel's status: a
 * cell that writes to stderr, throws, or shows an error MIME type fails the notebook, and
 * the cells after it still run. Needs nbclient in .venv (installed by .ci/run); skipped
 * without it unless QGALORE_REQUIRE_NOTEBOOKS is set.
 */
import assert from "node:assert/strict";

const root = new URL("..", import.meta.url).pathname;
const python = `${root}.venv/bin/python`;
const hasNbclient = await new Deno.Command(python, {
  args: ["-c", "import nbclient, nbformat"],
  stdout: "null",
  stderr: "null",
}).output().then((o) => o.success, () => false);

Deno.test({
  name: "notebooks: error, stderr and error-MIME outputs fail a notebook; a clean one passes",
  ignore: !hasNbclient && !Deno.env.get("QGALORE_REQUIRE_NOTEBOOKS"),
  fn: async () => {
    const dir = "tests/fixtures/notebooks";
    const r = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "tools/notebooks.ts", `${dir}/failing.ipynb`, `${dir}/passing.ipynb`],
      cwd: root,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(r.stdout);
    assert.equal(r.code, 1, text);
    const lines = text.trim().split("\n").map((l) => l.replace(/ in [\d.]+s$| \([^)]*s\)$/, ""));
    assert.deepEqual(lines, [
      `notebook ${dir}/failing.ipynb: FAILED`,
      "  cell 1: stderr: 'to stderr\\n'",
      "  cell 2: Error: boom",
      "  cell 3: application/vnd.code.notebook.error output",
      `notebook ${dir}/passing.ipynb: ok`,
      "notebooks: 1 passed, 1 failed",
    ]);
  },
});
