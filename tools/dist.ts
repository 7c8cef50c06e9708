/**
 * `deno task dist`: a self-contained folder that runs on an x86-64 Linux host with no Rust
 * toolchain and no network: the release library (native/), the TypeScript sources, the
 * examples, a deno.json without build steps, and (with --deno, the default) this Deno
 * binary under bin/. Usage: `deno task dist [--out DIR] [--no-deno]`.
 * @module
 */
import { parseArgs } from "node:util";
import { build, isStale } from "./build.ts";

const root = new URL("..", import.meta.url).pathname;

/** The file that marks a folder as made by `makeDist`, hence safe for it to replace. */
export const DIST_MARKER = ".qgalore-dist";

/**
 * Makes `out` an empty folder owned by dist: a new or empty folder is taken, a folder
 * holding the marker is replaced; anything else (another folder, a file, a symlink) is
 * refused, so `--out` can never delete what dist did not create.
 */
async function claim(out: string): Promise<void> {
  let st: Deno.FileInfo | null = null;
  try {
    st = await Deno.lstat(out);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  if (st) {
    const refuse = (what: string): Error =>
      new Error(
        `--out ${out}: ${what}; dist only replaces a folder it made itself (one holding ${DIST_MARKER}) or an empty one`,
      );
    if (!st.isDirectory) throw refuse(st.isSymlink ? "is a symlink" : "exists and is not a folder");
    let empty = true;
    let marked = false;
    for await (const e of Deno.readDir(out)) {
      empty = false;
      if (e.name === DIST_MARKER && e.isFile) marked = true;
    }
    if (!empty && !marked) throw refuse(`exists, is not empty and has no ${DIST_MARKER}`);
    if (marked) await Deno.remove(out, { recursive: true });
  }
  await Deno.mkdir(out, { recursive: true });
  await Deno.writeTextFile(
    `${out}/${DIST_MARKER}`,
    "made by `deno task dist`; it may replace this folder\n",
  );
}

/**
 * Builds the distribution folder; returns its path. `out` must be new, empty, or an
 * earlier dist folder (see `DIST_MARKER`); anything else is refused untouched.
 */
export async function makeDist(out: string, withDeno: boolean): Promise<string> {
  await claim(out);
  if (isStale()) await build();
  await Deno.mkdir(`${out}/native`, { recursive: true });
  await Deno.copyFile(`${root}rust/target/release/libqgalore.so`, `${out}/native/libqgalore.so`);
  for (const dir of ["lib", "ffi", "examples"]) await copyDir(`${root}${dir}`, `${out}/${dir}`);
  for (const f of ["mod.ts", "README.md"]) await Deno.copyFile(`${root}${f}`, `${out}/${f}`);
  const cfg = JSON.parse(await Deno.readTextFile(`${root}deno.json`));
  cfg.tasks = {
    pretrain: "deno run -A examples/pretrain.ts",
    ablation: "deno run -A examples/ablation.ts",
  };
  delete cfg.publish;
  await Deno.writeTextFile(`${out}/deno.json`, JSON.stringify(cfg, null, 2) + "\n");
  let runner = `#!/bin/sh\n# Runs a script of this folder: ./run examples/pretrain.ts --help\n`;
  runner += `here=$(cd "$(dirname "$0")" && pwd)\n`;
  if (withDeno) {
    await Deno.mkdir(`${out}/bin`);
    await Deno.copyFile(Deno.execPath(), `${out}/bin/deno`);
    await Deno.chmod(`${out}/bin/deno`, 0o755);
    runner += `exec "$here/bin/deno" run -A --config "$here/deno.json" "$here/$@"\n`;
  } else {
    runner += `exec deno run -A --config "$here/deno.json" "$here/$@"\n`;
  }
  await Deno.writeTextFile(`${out}/run`, runner);
  await Deno.chmod(`${out}/run`, 0o755);
  return out;
}

async function copyDir(src: string, dst: string): Promise<void> {
  await Deno.mkdir(dst, { recursive: true });
  for await (const e of Deno.readDir(src)) {
    if (e.isDirectory) await copyDir(`${src}/${e.name}`, `${dst}/${e.name}`);
    else if (e.isFile) await Deno.copyFile(`${src}/${e.name}`, `${dst}/${e.name}`);
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: { out: { type: "string" }, "no-deno": { type: "boolean", default: false } },
  });
  const version = JSON.parse(await Deno.readTextFile(`${root}deno.json`)).version;
  const out = values.out ?? `${root}dist/qgalore-${version}-x86_64-linux`;
  try {
    console.log(await makeDist(out, !values["no-deno"]));
  } catch (e) {
    console.error(`dist: ${e instanceof Error ? e.message : String(e)}`);
    Deno.exit(1);
  }
}
