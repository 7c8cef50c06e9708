/**
 * Runs every test — static checks, the Rust suite, the Deno suite, the notebooks — and ends with one
 * plain `N passed, N failed` line counting them all. Exit status is non-zero on failure.
 * @module
 */

const root = new URL("..", import.meta.url).pathname;
const deno = Deno.execPath();

/** Runs a command, echoing its output live, and returns the combined text and status. */
async function run(cmd: string, args: string[]): Promise<{ ok: boolean; text: string }> {
  const child = new Deno.Command(cmd, { args, cwd: root, stdout: "piped", stderr: "piped" })
    .spawn();
  const dec = new TextDecoder();
  let text = "";
  const pump = async (s: ReadableStream<Uint8Array>, w: { writeSync(b: Uint8Array): number }) => {
    for await (const chunk of s) {
      w.writeSync(chunk);
      text += dec.decode(chunk, { stream: true });
    }
  };
  await Promise.all([pump(child.stdout, Deno.stdout), pump(child.stderr, Deno.stderr)]);
  const st = await child.status;
  return { ok: st.success, text };
}

// deno-lint-ignore no-control-regex
const strip = (s: string) => s.replace(/\x1b\[[0-9;]*m/g, "");

let passed = 0;
let failed = 0;

// Static checks count as one test each.
for (
  const [name, args] of [
    ["fmt", ["fmt", "--check"]],
    ["lint", ["lint"]],
    ["type check", ["check", "mod.ts", "examples/", "tests/", "bench/", "tools/"]],
    // every public symbol documented, no public type naming a private one (JSR)
    ["doc lint", ["doc", "--lint", "mod.ts"]],
  ] as const
) {
  const r = await run(deno, [...args]);
  console.log(`check ${name}: ${r.ok ? "ok" : "FAILED"}`);
  r.ok ? passed++ : failed++;
}

// Rust: sum every "test result: … N passed; M failed" line. The GPU parity tests run
// apart, uncaptured, so their `skipped: no GPU` lines show on machines without one.
const cargo = ["test", "--release", "--manifest-path", "rust/Cargo.toml"];
let rustOk = true;
for (
  const args of [[...cargo, "--", "--skip", "gpu_parity_"], [
    ...cargo,
    "--test",
    "cuda_parity",
    "--",
    "--nocapture",
    "--test-threads=1",
  ]]
) {
  const rust = await run("cargo", args);
  let seen = false;
  for (const m of strip(rust.text).matchAll(/test result: \w+\. (\d+) passed; (\d+) failed/g)) {
    passed += Number(m[1]);
    failed += Number(m[2]);
    seen = true;
  }
  if (!rust.ok && !seen) failed++; // the suite did not even build
  rustOk &&= rust.ok;
}

// Deno: "ok | N passed (…) | M failed" or "FAILED | N passed | M failed".
const dn = await run(deno, ["test", "-A", "tests/"]);
const m = strip(dn.text).match(/(\d+) passed.*?\| (\d+) failed/);
if (m) {
  passed += Number(m[1]);
  failed += Number(m[2]);
} else if (!dn.ok) failed++;

// Notebooks: each one executed headless with the Deno kernel counts as one test. Without
// nbclient in .venv they are skipped, unless QGALORE_REQUIRE_NOTEBOOKS is set (.ci/run).
const nb = await run(deno, ["run", "-A", "tools/notebooks.ts"]);
const nm = strip(nb.text).match(/^notebooks: (\d+) passed, (\d+) failed$/m);
let nbOk = nb.ok;
if (nm) {
  passed += Number(nm[1]);
  failed += Number(nm[2]);
} else if (/^notebooks: skipped/m.test(nb.text) && !Deno.env.get("QGALORE_REQUIRE_NOTEBOOKS")) {
  nbOk = true;
} else {
  failed++;
  nbOk = false;
}

console.log(`${passed} passed, ${failed} failed`);
Deno.exit(failed === 0 && rustOk && dn.ok && nbOk ? 0 : 1);
