/**
 * The package as a JSR user gets it, served over HTTP from this process: the files
 * `deno publish` would upload (deno's own list), each `.ts` module with the import map's
 * specifiers made full ones, as JSR rewrites them. tests/jsr_test.ts imports it from a fresh
 * folder; tools/notebooks.ts runs a notebook that imports `jsr:@qgalore/qgalore` against it.
 *
 * @module
 */

const root = new URL("..", import.meta.url).pathname;
const config = JSON.parse(Deno.readTextFileSync(`${root}deno.json`));
const dec = new TextDecoder();

/** The package's deno.json (exports, imports, version). */
export const packageConfig: {
  name: string;
  version: string;
  exports: Record<string, string>;
  imports: Record<string, string>;
} = config;

/** The files `deno publish` would upload, as paths from the package root (deno's own list). */
export async function publishedFiles(): Promise<string[]> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["publish", "--dry-run", "--allow-dirty"],
    cwd: root,
    env: { NO_COLOR: "1" },
  }).output();
  const text = dec.decode(r.stdout) + dec.decode(r.stderr);
  if (r.code !== 0) throw new Error(`deno publish --dry-run failed:\n${text}`);
  const prefix = new URL("..", import.meta.url).href;
  return [...text.matchAll(/^\s+(file:\/\/\S+) \(/gm)]
    .map((m) => decodeURIComponent(m[1].slice(prefix.length)))
    .sort();
}

/**
 * What JSR does to a published module: specifiers of the import map become full ones, a
 * subpath of an `npm:` entry included (`"csv-parse/sync"` -> `"npm:csv-parse@5.6.0/sync"`).
 */
export function unfurl(text: string): string {
  for (const [key, value] of Object.entries(config.imports as Record<string, string>)) {
    const escaped = key.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
    text = text.replace(
      new RegExp(`(["'])${escaped}(/[^"'\\s]*)?\\1`, "g"),
      (_m, q: string, sub = "") => `${q}${value}${sub}${q}`,
    );
  }
  return text;
}

/** A running package server ({@link servePackage}). */
export interface PackageServer {
  /** `http://127.0.0.1:PORT`; the package is under `${base}/pkg/`. */
  base: string;
  /** The server, to shut down. */
  server: Deno.HttpServer;
}

/**
 * Serves `files` (paths from the package root) under `/pkg/`; with `tampered`, also under
 * `/tampered/`, there with that one file altered (a source whose pinned hash no longer holds).
 */
export function servePackage(files: string[], tampered?: string): PackageServer {
  const set = new Set(files);
  const prefixes = tampered === undefined ? ["pkg"] : ["pkg", "tampered"];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (req) => {
    const [, prefix, ...rest] = new URL(req.url).pathname.split("/");
    const path = decodeURIComponent(rest.join("/"));
    if (!prefixes.includes(prefix) || !set.has(path)) {
      return new Response("not found", { status: 404 });
    }
    const bytes = await Deno.readFile(`${root}${path}`);
    let body: Uint8Array | string = bytes;
    if (path.endsWith(".ts")) body = unfurl(dec.decode(bytes));
    if (prefix === "tampered" && path === tampered) body = dec.decode(bytes) + "\n// x\n";
    const type = path.endsWith(".ts") ? "application/typescript" : "text/plain";
    return new Response(body as BodyInit, { headers: { "content-type": type } });
  });
  return { base: `http://127.0.0.1:${server.addr.port}`, server };
}

/**
 * `source` with every `jsr:@qgalore/qgalore[@version][/entry]` specifier pointing at the
 * package served under `pkgBase` (`http://127.0.0.1:PORT/pkg`): the root to `mod.ts`, an entry
 * to its file as deno.json exports it. An entry the package does not export is left as is.
 */
export function toServed(source: string, pkgBase: string): string {
  const name = config.name.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  return source.replace(
    new RegExp(`jsr:${name}(@[^/"'\\s]+)?(/[\\w.-]+)?(?=["'\\s])`, "g"),
    (all, _version: string | undefined, entry: string | undefined) => {
      const target = config.exports[entry === undefined ? "." : `.${entry}`];
      return typeof target === "string" ? `${pkgBase}/${target.slice(2)}` : all;
    },
  );
}
