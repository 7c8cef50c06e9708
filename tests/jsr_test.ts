/**
 * The package as a JSR user gets it: the files `deno publish` would upload, served over HTTP
 * from this process and imported from a fresh folder with an empty cache. The first import
 * builds the engine from the served, hash-pinned Rust sources into the cache; the second
 * finds it there; a tampered source, a missing QGALORE_LIB and a machine without cargo are
 * each one line.
 *
 * The build shares CARGO_TARGET_DIR with the checkout's rust/target so that only the qgalore
 * crate itself recompiles (its dependencies are reused). Cargo then also refreshes
 * rust/target/release/libqgalore.so from the served copy: the same sources (checked below to
 * match the pins), so an equivalent library.
 */
import assert from "node:assert/strict";
import { renderSources } from "../tools/sources.ts";
import { PACKAGE_VERSION, SOURCES, SOURCES_DIGEST } from "../ffi/sources.ts";
import { ABI_VERSION } from "../ffi/symbols.ts";
import {
  packageConfig as config,
  type PackageServer,
  publishedFiles as listPublished,
  servePackage,
} from "../tools/package_server.ts";

const root = new URL("..", import.meta.url).pathname;
const dec = new TextDecoder();

/** The files `deno publish` would upload (fails the test when the dry run fails). */
async function publishedFiles(): Promise<string[]> {
  try {
    return await listPublished();
  } catch (e) {
    assert.fail(e instanceof Error ? e.message : String(e));
  }
}

Deno.test("jsr: ffi/sources.ts pins the current Rust sources (else run `deno task sources`)", async () => {
  const fresh = await renderSources();
  const same = fresh === await Deno.readTextFile(`${root}ffi/sources.ts`);
  assert.ok(same, "ffi/sources.ts is out of date: run `deno task sources`");
  assert.equal(PACKAGE_VERSION, config.version);
  assert.ok(SOURCES.some((f) => f.path === "rust/src/ffi.rs"));
  assert.ok(SOURCES.some((f) => f.path === "rust/kernels/nn.cu"));
});

Deno.test("jsr: deno publish uploads the build inputs and the CLIs, not tests or builds", async () => {
  const files = await publishedFiles();
  for (const f of SOURCES) assert.ok(files.includes(f.path), `${f.path} is not published`);
  for (const target of Object.values(config.exports) as string[]) {
    assert.ok(files.includes(target.slice(2)), `export ${target} is not published`);
  }
  // every command-line example runs straight from the package: jsr:@qgalore/qgalore/<name>
  for (const e of Deno.readDirSync(`${root}examples`)) {
    const name = e.name.replace(/\.ts$/, "");
    assert.equal(
      config.exports[`./${name}`],
      `./examples/${e.name}`,
      `deno.json exports ./${name}`,
    );
  }
  const unwanted = files.filter((f) => /^(tests|bench|tools|rust\/target|rust\/tests)\//.test(f));
  assert.deepEqual(unwanted, []);
  assert.ok(files.includes("mod.ts") && files.includes("ffi/sources.ts"));
});

/** Serves `files` under /pkg/ and, with one Rust source altered, under /tampered/. */
function serve(files: string[]): PackageServer {
  return servePackage(files, "rust/src/lib.rs");
}

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** `deno run -A <args>` from `cwd` (a folder with no deno.json), with `env` added. */
async function denoRun(cwd: string, args: string[], env: Record<string, string>): Promise<Ran> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ...args],
    cwd,
    env: { NO_COLOR: "1", QGALORE_LIB: "", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
}

/** Deno's own lines about fetching remote modules (`Download http://…`) are not ours. */
function ownLines(stderr: string): string[] {
  return stderr.split("\n").filter((l) => l && !/^(Download|Warning) /.test(l));
}

/** Exactly one `error:` line containing each of `parts`; no stack trace. */
function assertOneLine(r: Ran, ...parts: string[]): void {
  assert.notEqual(r.code, 0, r.stderr);
  const lines = ownLines(r.stderr);
  assert.equal(lines.length, 1, `stderr must be one line, got:\n${r.stderr}`);
  for (const p of parts) assert.ok(lines[0].includes(p), `"${lines[0]}" lacks "${p}"`);
}

function exists(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

const libName = `libqgalore-${SOURCES_DIGEST.slice(0, 16)}.so`;
const cacheLib = (cache: string) =>
  `${cache}/native/${PACKAGE_VERSION}/${Deno.build.target}/${libName}`;

/** Serves the published files for `body`, run from a fresh temp folder; cleans up after. */
async function withServer(
  body: (dir: string, base: string, shared: Record<string, string>) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "qgalore-jsr-" });
  const { base, server } = serve(await publishedFiles());
  try {
    await body(dir, base, {
      QGALORE_CACHE: `${dir}/cache`,
      CARGO_TARGET_DIR: `${root}rust/target`,
    });
  } finally {
    await server.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name:
    "jsr: over HTTP, every refusal is one line (tampered source, QGALORE_LIB, no or failing cargo)",
  ignore: Deno.build.os !== "linux",
  fn: (t) =>
    withServer(async (dir, base, shared) => {
      await t.step("a tampered source is refused in one line, nothing built", async () => {
        const r = await denoRun(dir, [`${base}/tampered/examples/pretrain.ts`, "--help"], {
          ...shared,
          QGALORE_CACHE: `${dir}/cache-tampered`,
        });
        assertOneLine(r, "error: refusing to build the engine: rust/src/lib.rs", "SHA-256");
        assert.equal(r.code, 1);
        const left = [
          ...Deno.readDirSync(
            `${dir}/cache-tampered/native/${PACKAGE_VERSION}/${Deno.build.target}`,
          ),
        ]
          .map((e) => e.name);
        assert.deepEqual(left, [".lock"]);
      });

      await t.step("QGALORE_LIB naming a missing file is one line", async () => {
        const r = await denoRun(dir, [`${base}/pkg/examples/pretrain.ts`, "--help"], {
          ...shared,
          QGALORE_LIB: `${dir}/nope/libqgalore.so`,
        });
        assertOneLine(r, `error: QGALORE_LIB=${dir}/nope/libqgalore.so: no such file`);
      });

      await t.step(
        "without cargo: one line saying to install Rust or set QGALORE_LIB",
        async () => {
          await Deno.mkdir(`${dir}/empty-bin`);
          const r = await denoRun(dir, [`${base}/pkg/examples/pretrain.ts`, "--help"], {
            ...shared,
            PATH: `${dir}/empty-bin`,
          });
          assertOneLine(r, "cargo was not found", "https://rustup.rs", "QGALORE_LIB");
        },
      );

      await t.step(
        "a failed cargo build: one line with cargo's first error and the log",
        async () => {
          // A stand-in cargo that fails the way a compile error does.
          await Deno.mkdir(`${dir}/fake-bin`);
          await Deno.writeTextFile(
            `${dir}/fake-bin/cargo`,
            `#!/bin/sh\n[ "$1" = --version ] && exit 0\n` +
              `printf '   Compiling qgalore v0.1.0\\nerror[E0425]: cannot find value x\\n' >&2\n` +
              `printf 'error: could not compile qgalore\\n' >&2\nexit 101\n`,
          );
          await Deno.chmod(`${dir}/fake-bin/cargo`, 0o755);
          const failed = `${dir}/cache-failed`;
          const r = await denoRun(dir, [`${base}/pkg/examples/pretrain.ts`, "--help"], {
            ...shared,
            QGALORE_CACHE: failed,
            PATH: `${dir}/fake-bin`,
          });
          assert.equal(r.code, 1, r.stderr);
          const folder = `${failed}/native/${PACKAGE_VERSION}/${Deno.build.target}`;
          const lines = ownLines(r.stderr);
          assert.equal(lines.length, 2, r.stderr);
          assert.match(lines[0], /^qgalore: building the native engine /);
          assert.equal(
            lines[1],
            "error: cargo build of the native engine failed (exit 101): " +
              `error[E0425]: cannot find value x; full log: ${folder}/build.log`,
          );
          assert.match(await Deno.readTextFile(`${folder}/build.log`), /could not compile qgalore/);
          assert.ok(!exists(`${folder}/${libName}`));
        },
      );
    }),
});

Deno.test({
  name: "jsr: imported over HTTP from a fresh folder, the package builds, caches and runs",
  ignore: Deno.build.os !== "linux",
  fn: (t) =>
    withServer(async (dir, base, shared) => {
      const cache = shared.QGALORE_CACHE;
      await t.step(
        "two first imports at once: one builds into the empty cache, one waits",
        async () => {
          await Deno.writeTextFile(
            `${dir}/first.ts`,
            `import { engineAbiVersion, engineOptions } from "${base}/pkg/mod.ts";\n` +
              `const optimizers = engineOptions().optimizers.map((o) => o.name);\n` +
              `console.log(JSON.stringify({ abi: engineAbiVersion(), optimizers }));\n`,
          );
          const runs = await Promise.all([1, 2].map(() => denoRun(dir, ["first.ts"], shared)));
          for (const r of runs) {
            assert.equal(r.code, 0, r.stderr);
            const out = JSON.parse(r.stdout.trim());
            assert.equal(out.abi, ABI_VERSION);
            assert.ok(["adamw", "qgalore"].every((o) => out.optimizers.includes(o)), r.stdout);
          }
          // exactly one progress line between them, and nothing else
          const lines = runs.flatMap((r) => ownLines(r.stderr));
          assert.equal(lines.length, 1, runs.map((r) => r.stderr).join("\n---\n"));
          assert.match(lines[0], /^qgalore: building the native engine .* into /);
          assert.ok(Deno.statSync(cacheLib(cache)).isFile);
          // the sources and any temporary file are gone; the lock and the log stay
          const left = [
            ...Deno.readDirSync(`${cache}/native/${PACKAGE_VERSION}/${Deno.build.target}`),
          ]
            .map((e) => e.name).sort();
          assert.deepEqual(left, [".lock", "build.log", libName]);
        },
      );

      await t.step("second run, the CLI from the package: no build, trains 2 steps", async () => {
        const before = Deno.statSync(cacheLib(cache)).mtime?.getTime();
        const r = await denoRun(dir, [
          `${base}/pkg/examples/pretrain.ts`,
          "--batch-size",
          "4",
          "--seq-len",
          "32",
          "--steps",
          "2",
          "--eval-batches",
          "1",
          "--json",
          "--out",
          `${dir}/run`,
        ], shared);
        assert.equal(r.code, 0, r.stderr);
        assert.doesNotMatch(r.stderr, /building/);
        const summary = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
        assert.equal(summary.steps, 2);
        assert.ok(Number.isFinite(summary.val_loss), r.stdout);
        assert.equal(Deno.statSync(cacheLib(cache)).mtime?.getTime(), before);
      });
    }),
});
