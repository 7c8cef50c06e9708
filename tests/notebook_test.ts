/**
 * tools/notebooks.ts judges a notebook by its outputs, not only by the kernel's status: a
 * cell that writes to stderr, throws, or shows an error MIME type fails the notebook, and
 * the cells after it still run. Needs nbclient in .venv (installed by .ci/run); skipped
 * without it unless QGALORE_REQUIRE_NOTEBOOKS is set. A notebook importing
 * `jsr:@qgalore/qgalore` runs against the package served over HTTP.
 */
import assert from "node:assert/strict";
import { toServed } from "../tools/package_server.ts";

const root = new URL("..", import.meta.url).pathname;
// the venv with nbclient: .venv (as .ci/run makes it), or the one QGALORE_VENV names
const venv = Deno.env.get("QGALORE_VENV") || `${root}.venv`;
const python = `${venv}/bin/python`;
let hasNbclient = false;
try {
  // (no .venv at all: spawning fails)
  hasNbclient = (await new Deno.Command(python, {
    args: ["-c", "import nbclient, nbformat"],
    stdout: "null",
    stderr: "null",
  }).output()).success;
} catch { /* no venv */ }

Deno.test({
  name: "notebooks: error, stderr and error-MIME outputs fail a notebook; a clean one passes",
  ignore: !hasNbclient && !Deno.env.get("QGALORE_REQUIRE_NOTEBOOKS"),
  fn: async () => {
    const dir = "tests/fixtures/notebooks";
    const r = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "tools/notebooks.ts",
        "--venv",
        venv,
        `${dir}/failing.ipynb`,
        `${dir}/passing.ipynb`,
      ],
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

Deno.test("notebooks: a jsr:@qgalore/qgalore specifier becomes the served package's file", () => {
  const pkg = "http://127.0.0.1:4000/pkg";
  const src = [
    'import { train } from "jsr:@qgalore/qgalore";',
    "import { sweep } from 'jsr:@qgalore/qgalore@0.1.0';",
    'const cli = "jsr:@qgalore/qgalore/pretrain";',
    'const x = "jsr:@qgalore/qgalore/nope";',
    'import { y } from "jsr:@other/pkg";',
  ].join("\n");
  assert.equal(
    toServed(src, pkg),
    [
      `import { train } from "${pkg}/mod.ts";`,
      `import { sweep } from '${pkg}/mod.ts';`,
      `const cli = "${pkg}/examples/pretrain.ts";`,
      'const x = "jsr:@qgalore/qgalore/nope";',
      'import { y } from "jsr:@other/pkg";',
    ].join("\n"),
  );
  // the notebook CI runs over HTTP imports the package as a user types it, not by path
  const nb = JSON.parse(Deno.readTextFileSync(`${root}notebooks/from_jsr.ipynb`));
  const code = nb.cells.filter((c: { cell_type: string }) => c.cell_type === "code")
    .map((c: { source: string[] }) => c.source.join("")).join("\n");
  assert.match(code, /^import \{[^}]*\btrain\b[^}]*\} from "jsr:@qgalore\/qgalore";$/m);
  assert.doesNotMatch(code, /\.\.\/mod\.ts/);
  for (const used of ["train(", "charts(", "sweep("]) assert.ok(code.includes(used), used);
});
