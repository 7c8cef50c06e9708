/**
 * Builds the native engine (`cargo build --release`) when the library is missing or older
 * than any Rust source. Used by `deno task build|test|pretrain|bench`.
 * @module
 */

const root = new URL("..", import.meta.url).pathname;
const lib = `${root}rust/target/release/libqgalore.so`;

function newest(path: string): number {
  let t = 0;
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch {
    return 0;
  }
  if (info.isFile) return info.mtime?.getTime() ?? 0;
  for (const e of Deno.readDirSync(path)) t = Math.max(t, newest(`${path}/${e.name}`));
  return t;
}

/** True when the library is absent or older than its sources. */
export function isStale(): boolean {
  let built = 0;
  try {
    built = Deno.statSync(lib).mtime?.getTime() ?? 0;
  } catch {
    return true;
  }
  const src = Math.max(
    newest(`${root}rust/src`),
    newest(`${root}rust/kernels`),
    newest(`${root}rust/Cargo.toml`),
    newest(`${root}rust/Cargo.lock`),
  );
  return src > built;
}

/** Runs cargo; exits the process with a one-line message when the toolchain is missing. */
export async function build(extra: string[] = []): Promise<void> {
  console.error("building the native engine (cargo build --release)…");
  let status: Deno.CommandStatus;
  try {
    status = await new Deno.Command("cargo", {
      args: ["build", "--release", "--manifest-path", `${root}rust/Cargo.toml`, ...extra],
      stdout: "inherit",
      stderr: "inherit",
    }).spawn().status;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      console.error("error: cargo not found: install a Rust toolchain (https://rustup.rs)");
      Deno.exit(2);
    }
    throw e;
  }
  if (!status.success) {
    console.error(`error: cargo build failed (exit ${status.code})`);
    Deno.exit(status.code || 1);
  }
}

if (import.meta.main) {
  if (Deno.args.includes("--force") || isStale()) await build();
}
