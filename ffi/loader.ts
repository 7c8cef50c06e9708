/**
 * Finds, opens and version-checks the native library, once per process.
 * @module
 */
import { ABI_VERSION, type NativeLib, SYMBOLS } from "./symbols.ts";

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

/** Absolute paths tried, in order: `QGALORE_LIB`, then the checkout's release build. */
export function candidatePaths(): string[] {
  const out: string[] = [];
  const env = Deno.env.get("QGALORE_LIB");
  if (env) out.push(env);
  // Only local files have a build next to the sources (JSR modules have no filename):
  // a `deno task dist` folder keeps it in native/, a checkout in rust/target/release/.
  if (import.meta.dirname) {
    out.push(`${import.meta.dirname}/../native/${libFile()}`);
    out.push(`${import.meta.dirname}/../rust/target/release/${libFile()}`);
  }
  return out;
}

function exists(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** Opens the engine library (memoised). Throws a {@link LoadError} naming every path tried. */
export function loadLibrary(path?: string): NativeLib {
  if (cached) return cached;
  const tried = path ? [path] : candidatePaths();
  const found = tried.find(exists);
  if (!found) {
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
    throw new LoadError(`cannot open ${found}: ${msg}`, { cause: e });
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
