/**
 * Finds, opens and version-checks the native library, once per process.
 *
 * Where the library comes from, first found wins:
 * 1. `QGALORE_LIB` (a path; nothing else is tried when it is set);
 * 2. a build next to the sources, for a local copy of the package: `native/` of a
 *    `deno task dist` folder, `rust/target/release/` of a checkout;
 * 3. the cache, `<cache>/native/<version>/<target>/libqgalore-<digest>.so`, where `<cache>` is
 *    `$QGALORE_CACHE`, else the platform cache folder + `/qgalore` (`~/.cache/qgalore`).
 *
 * When none exists and the package is not a checkout (imported from JSR, over HTTP, or a copy
 * without a build), importing this module builds the package's own Rust sources into the cache:
 * each file listed in `sources.ts` is fetched relative to `import.meta.url`, checked against
 * its pinned SHA-256, written under the cache and built with `cargo build --release`; the
 * library is installed by an atomic rename under a lock, so concurrent first imports neither
 * corrupt it nor build twice. A checkout keeps `deno task build` (tools/build.ts).
 * @module
 */
import { ABI_VERSION, type NativeLib, SYMBOLS } from "./symbols.ts";
import { PACKAGE_VERSION, SOURCES, SOURCES_DIGEST } from "./sources.ts";

let cached: NativeLib | null = null;

/** Error raised when the native library cannot be used; the message is one line. */
export class LoadError extends Error {
  /** Creates a load error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "LoadError";
  }
}

function libFile(): string {
  switch (Deno.build.os) {
    case "darwin":
      return "libqgalore.dylib";
    case "windows":
      return "qgalore.dll";
    default:
      return "libqgalore.so";
  }
}

/** The package root as a URL (the folder holding mod.ts), wherever the package is served. */
const PACKAGE_ROOT = new URL("../", import.meta.url);

/** The package root as a local folder, or null when the modules are not local files. */
function localRoot(): string | null {
  return import.meta.dirname ? `${import.meta.dirname}/..` : null;
}

function exists(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** A development checkout: local files with the repository's build tool (never published). */
function isCheckout(): boolean {
  const root = localRoot();
  return root !== null && exists(`${root}/tools/build.ts`);
}

/** The root of qgalore's caches: `$QGALORE_CACHE`, else the platform cache folder + `/qgalore`. */
export function cacheRoot(): string {
  const env = Deno.env.get("QGALORE_CACHE");
  if (env) return env;
  const home = Deno.env.get("HOME") ?? Deno.env.get("USERPROFILE") ?? ".";
  switch (Deno.build.os) {
    case "darwin":
      return `${home}/Library/Caches/qgalore`;
    case "windows":
      return `${Deno.env.get("LOCALAPPDATA") ?? `${home}/AppData/Local`}/qgalore`;
    default:
      return `${Deno.env.get("XDG_CACHE_HOME") || `${home}/.cache`}/qgalore`;
  }
}

/** The cache folder of libraries built for this package version and platform. */
export function nativeCacheDir(): string {
  return `${cacheRoot()}/native/${PACKAGE_VERSION}/${Deno.build.target}`;
}

/** The cached library built from exactly the pinned sources (the digest names it). */
export function cachedLibPath(): string {
  const [stem, ext] = libFile().split(/\.(?=[^.]+$)/);
  return `${nativeCacheDir()}/${stem}-${SOURCES_DIGEST.slice(0, 16)}.${ext}`;
}

/** Paths tried, in order: `QGALORE_LIB` alone when set; else the local builds, then the cache. */
export function candidatePaths(): string[] {
  const env = Deno.env.get("QGALORE_LIB");
  if (env) return [env];
  const out: string[] = [];
  // Only local files have a build next to the sources (JSR modules have no filename):
  // a `deno task dist` folder keeps it in native/, a checkout in rust/target/release/.
  const root = localRoot();
  if (root) {
    out.push(`${root}/native/${libFile()}`);
    out.push(`${root}/rust/target/release/${libFile()}`);
  }
  out.push(cachedLibPath());
  return out;
}

/** Why the library could not be built at import; reported by the first `loadLibrary()`. */
let buildFailure: LoadError | null = null;

function oneLine(s: string): string {
  return s.replace(/\s*\n\s*/g, " ").trim();
}

/** Fetches every pinned source, refusing the first one whose SHA-256 differs. */
async function fetchSources(): Promise<Map<string, Uint8Array>> {
  const out = new Map<string, Uint8Array>();
  const queue = [...SOURCES];
  const worker = async (): Promise<void> => {
    for (let f = queue.shift(); f; f = queue.shift()) {
      const url = new URL(f.path, PACKAGE_ROOT);
      let bytes: Uint8Array;
      try {
        const res = await fetch(url);
        if (!res.ok) {
          await res.body?.cancel();
          throw new Error(`HTTP ${res.status}`);
        }
        bytes = new Uint8Array(await res.arrayBuffer());
      } catch (e) {
        throw new LoadError(
          `cannot fetch the engine source ${url}: ${oneLine((e as Error).message)}`,
        );
      }
      const hex = Array.from(
        new Uint8Array(await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>)),
        (b) => b.toString(16).padStart(2, "0"),
      ).join("");
      if (hex !== f.sha256) {
        throw new LoadError(
          `refusing to build the engine: ${f.path} (${url}) does not match its pinned SHA-256 in ffi/sources.ts`,
        );
      }
      out.set(f.path, bytes);
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  return out;
}

/** Checks that cargo runs; otherwise a one-line LoadError saying what to install or set. */
async function checkCargo(): Promise<void> {
  try {
    const r = await new Deno.Command("cargo", {
      args: ["--version"],
      stdout: "null",
      stderr: "null",
    })
      .output();
    if (r.success) return;
  } catch (e) {
    if (e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied) {
      throw new LoadError(
        "the native engine is not built yet and building it needs --allow-run (or -A); or set QGALORE_LIB to a built libqgalore",
      );
    }
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  throw new LoadError(
    "the native engine must be built once from source, but cargo was not found: install Rust (https://rustup.rs) or set QGALORE_LIB to a built libqgalore",
  );
}

/**
 * Builds the pinned sources into the cache and installs the library at `cachedLibPath()`.
 * Holds `<dir>/.lock` throughout: a second process waits, then finds the library installed.
 */
async function buildIntoCache(): Promise<void> {
  await checkCargo();
  const dir = nativeCacheDir();
  const lib = cachedLibPath();
  await Deno.mkdir(dir, { recursive: true });
  using lock = await Deno.open(`${dir}/.lock`, { create: true, write: true });
  await lock.lock(true);
  if (exists(lib)) return; // built by another process while we waited
  const sources = await fetchSources();
  const src = `${dir}/build-${SOURCES_DIGEST.slice(0, 16)}`;
  await Deno.remove(src, { recursive: true }).catch(() => {});
  for (const [path, bytes] of sources) {
    const file = `${src}/${path}`;
    await Deno.mkdir(file.slice(0, file.lastIndexOf("/")), { recursive: true });
    await Deno.writeFile(file, bytes);
  }
  // CARGO_TARGET_DIR, when set, is shared (a checkout's rust/target reuses its compiled
  // dependencies); otherwise the build uses a folder of its own, removed once installed.
  const shared = Deno.env.get("CARGO_TARGET_DIR");
  const target = shared || `${dir}/target`;
  const log = `${dir}/build.log`;
  console.error(
    `qgalore: building the native engine ${PACKAGE_VERSION} for ${Deno.build.target} (first use; cargo build --release, a few minutes) into ${dir}`,
  );
  const out = await new Deno.Command("cargo", {
    args: [
      "build",
      "--release",
      "--locked",
      "--manifest-path",
      `${src}/rust/Cargo.toml`,
      "--target-dir",
      target,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  const text = dec.decode(out.stdout) + dec.decode(out.stderr);
  await Deno.writeTextFile(log, text);
  if (!out.success) {
    const first = text.split("\n").find((l) => /^error\b/.test(l)) ??
      text.trim().split("\n").at(-1) ?? "";
    throw new LoadError(
      `cargo build of the native engine failed (exit ${out.code}): ${
        oneLine(first)
      }; full log: ${log}`,
    );
  }
  // Copy beside the final name, then rename: readers see no file or a whole one.
  const tmp = `${lib}.tmp-${Deno.pid}`;
  await Deno.copyFile(`${target}/release/${libFile()}`, tmp);
  await Deno.rename(tmp, lib);
  await Deno.remove(src, { recursive: true }).catch(() => {});
  if (!shared) await Deno.remove(`${dir}/target`, { recursive: true }).catch(() => {});
}

/** Builds into the cache when no library exists and the package is not a checkout. */
async function ensureLibrary(): Promise<void> {
  if (Deno.env.get("QGALORE_LIB")) return;
  if (candidatePaths().some(exists) || isCheckout()) return;
  await buildIntoCache();
}

// Top-level await: the first import of a package without a library builds it before the
// modules that open the engine while they load (the option table) run.
try {
  await ensureLibrary();
} catch (e) {
  // Without --allow-env/--allow-read, loadLibrary() meets the same permission error itself.
  if (!(e instanceof Deno.errors.NotCapable)) {
    buildFailure = e instanceof LoadError ? e : new LoadError(
      `cannot build the native engine: ${oneLine(e instanceof Error ? e.message : String(e))}`,
      { cause: e },
    );
  }
}

/** Opens the engine library (memoised). Throws a {@link LoadError} naming every path tried. */
export function loadLibrary(path?: string): NativeLib {
  if (cached) return cached;
  if (!path && buildFailure) throw buildFailure;
  const env = Deno.env.get("QGALORE_LIB");
  const tried = path ? [path] : candidatePaths();
  const found = tried.find(exists);
  if (!found) {
    if (!path && env) {
      throw new LoadError(
        `QGALORE_LIB=${env}: no such file; point it at a built libqgalore or unset it`,
      );
    }
    throw new LoadError(
      `native library not found (tried ${
        tried.join(", ") || "nothing"
      }); build it with \`deno task build\` or set QGALORE_LIB`,
    );
  }
  let lib: NativeLib;
  try {
    lib = Deno.dlopen(found, SYMBOLS);
  } catch (e) {
    const msg = (e as Error).message;
    // A library built from older sources lacks the newest entry points.
    const missing = msg.match(/undefined symbol: (\w+)/)?.[1];
    if (missing) {
      throw new LoadError(
        `${found} was built from older sources (no ${missing}); rebuild with \`deno task build\``,
        { cause: e },
      );
    }
    throw new LoadError(`cannot open ${found}: ${oneLine(msg)}`, { cause: e });
  }
  const abi = lib.symbols.qg_abi_version();
  if (abi !== ABI_VERSION) {
    lib.close();
    throw new LoadError(
      `${found} has ABI version ${abi}, this code needs ${ABI_VERSION}; rebuild with \`deno task build\``,
    );
  }
  cached = lib;
  return lib;
}
