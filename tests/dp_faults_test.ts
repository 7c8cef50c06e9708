// Faults in a data-parallel run (2 ranks over loopback): a rank that hangs ends the job with
// one line on the surviving rank within the collective timeout (QGALORE_DIST_TIMEOUT), never a
// silent hang; a rank killed mid-run ends the job, and a re-launch resumes from the last
// checkpoint and follows the uninterrupted run update for update. Skipped with a message when
// mpirun is absent (unless QGALORE_REQUIRE_MPI=1).
import assert from "node:assert/strict";
import { MPIRUN_ENV, MPIRUN_FLAGS, mpirunOrSkip } from "./mpi_run.ts";

const CHILD = new URL("./dp_fault_child.ts", import.meta.url).pathname;
const dec = new TextDecoder();

interface Ran {
  code: number;
  text: string;
  /** Seconds from the start to the fault's marker line (null if none), and to the end. */
  markerAt: number | null;
  endAt: number;
}

/** Runs mpirun with the child, timing when the fault's marker line arrives. */
async function launch(
  bin: string,
  opts: Record<string, unknown>,
  dir: string,
  env: Record<string, string> = {},
): Promise<Ran> {
  const t0 = performance.now();
  const p = new Deno.Command(bin, {
    args: [
      ...MPIRUN_FLAGS,
      ...Object.keys(env).flatMap((k) => ["-x", k]),
      Deno.execPath(),
      "run",
      "-A",
      CHILD,
      JSON.stringify(opts),
      dir,
    ],
    env: { ...MPIRUN_ENV, ...env },
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(300_000),
  }).spawn();
  let text = "";
  let markerAt: number | null = null;
  const read = async (s: ReadableStream<Uint8Array>) => {
    for await (const chunk of s) {
      text += dec.decode(chunk, { stream: true });
      if (markerAt === null && text.includes("DP-FAULT ")) {
        markerAt = (performance.now() - t0) / 1000;
      }
    }
  };
  const [status] = await Promise.all([p.status, read(p.stdout), read(p.stderr)]);
  return { code: status.code, text, markerAt, endAt: (performance.now() - t0) / 1000 };
}

function metrics(dir: string): unknown[][] {
  return Deno.readTextFileSync(`${dir}/run/metrics.jsonl`).trim().split("\n").map((l) => {
    const x = JSON.parse(l);
    return [x.type, x.step, x.loss, x.val_loss, x.grad_norm];
  });
}

/** Lines our code printed: errors, panics, stack frames (mpirun's own banners excluded). */
function ours(text: string): { errors: string[]; traces: string[] } {
  const lines = text.split("\n");
  return {
    errors: lines.filter((l) => /^error:/.test(l)),
    traces: lines.filter((l) => /panicked|^\s+at |RUST_BACKTRACE|Uncaught/.test(l)),
  };
}

function alive(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return !/^\d+ \(.*\) Z/.test(stat); // a zombie is gone
  } catch {
    return false;
  }
}

const BASE = {
  optimizer: "adamw",
  steps: 6,
  seqLen: 32,
  batchSize: 2,
  threads: 1,
  evalEvery: 3,
  evalBatches: 2,
  seed: 7,
};

Deno.test("data parallel: a hung rank ends the job with one line on the other within the timeout", async () => {
  const bin = mpirunOrSkip();
  if (!bin) return;
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-hang-" });
  try {
    // long enough for the ranks' start-up skew on a loaded machine, short for the test
    const timeout = 8;
    const r = await launch(
      bin,
      { ...BASE, fault: "hang", faultAt: 2, faultRank: 1 },
      dir,
      { QGALORE_DIST_TIMEOUT: String(timeout) },
    );
    assert.notEqual(r.code, 0, r.text);
    assert.ok(r.markerAt !== null, `rank 1 never reached the fault:\n${r.text}`);
    const m = /DP-FAULT hang rank 1 pid (\d+)/.exec(r.text);
    assert.ok(m, r.text);
    // the survivor waited the timeout, not forever: at least the timeout after rank 1
    // stopped, at most the timeout plus the job's tear-down
    const waited = r.endAt - r.markerAt!;
    assert.ok(waited >= timeout - 0.5, `ended ${waited.toFixed(1)} s after the hang:\n${r.text}`);
    assert.ok(waited <= timeout + 30, `ended ${waited.toFixed(1)} s after the hang:\n${r.text}`);
    const { errors, traces } = ours(r.text);
    assert.equal(errors.length, 1, r.text);
    assert.match(
      errors[0],
      new RegExp(
        `^error: rank 0 of 2: MPI_(Allreduce|Iallreduce|Bcast|Barrier) of [0-9.]+ (B|KiB|MiB) ` +
          `did not complete within ${timeout} s \\(QGALORE_DIST_TIMEOUT\\): another rank is hung ` +
          `or dead; ending the job$`,
      ),
    );
    assert.deepEqual(traces, [], r.text);
    assert.doesNotMatch(r.text, /DP-FAULT-CHILD-OK/);
    // the job's end took the stopped rank with it
    await new Promise((ok) => setTimeout(ok, 1000));
    assert.ok(!alive(Number(m[1])), `rank 1 (pid ${m[1]}) still alive after the job ended`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("data parallel: a rank that fails alone ends the job: its line, then the other's within the timeout", async () => {
  const bin = mpirunOrSkip();
  if (!bin) return;
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-throw-" });
  try {
    const timeout = 8;
    const r = await launch(
      bin,
      { ...BASE, fault: "throw", faultAt: 2, faultRank: 1 },
      dir,
      { QGALORE_DIST_TIMEOUT: String(timeout) },
    );
    assert.notEqual(r.code, 0, r.text);
    assert.ok(r.markerAt !== null, r.text);
    const waited = r.endAt - r.markerAt!;
    assert.ok(waited <= timeout + 30, `ended ${waited.toFixed(1)} s after the failure:\n${r.text}`);
    const { errors, traces } = ours(r.text);
    assert.deepEqual(errors.sort(), [
      "error: rank 0 of 2: MPI_Allreduce of 8 B did not complete within 8 s (QGALORE_DIST_TIMEOUT): " +
      "another rank is hung or dead; ending the job",
      "error: rank 1 failed alone",
    ], r.text);
    assert.deepEqual(traces, [], r.text);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("data parallel: a killed rank ends the job; the re-launch resumes from the last checkpoint", async () => {
  const bin = mpirunOrSkip();
  if (!bin) return;
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-kill-" });
  try {
    const opts = { ...BASE, saveEvery: 2 };
    const full = await launch(bin, opts, `${dir}/full`);
    assert.equal(full.code, 0, full.text);
    // rank 1 dies after update 3; rank 0 saved update 2's checkpoint
    const killed = await launch(
      bin,
      { ...opts, fault: "kill", faultAt: 3, faultRank: 1 },
      `${dir}/cut`,
      { QGALORE_DIST_TIMEOUT: "20" },
    );
    assert.notEqual(killed.code, 0, killed.text);
    assert.ok(killed.markerAt !== null, killed.text);
    assert.ok(killed.endAt - killed.markerAt! <= 50, killed.text);
    // mpirun reports the dead rank; what our code printed is at most one line, no trace
    assert.match(killed.text, /signal 9|Killed|exited on signal|terminated/i, killed.text);
    const { errors, traces } = ours(killed.text);
    assert.ok(errors.length <= 1, killed.text);
    for (const e of errors) assert.match(e, /^error: rank 0 of 2: /, killed.text);
    assert.deepEqual(traces, [], killed.text);
    console.log(
      `  killed rank: exit ${killed.code}; ${
        errors.length === 0 ? "rank 0 printed nothing (mpirun ended it)" : errors[0]
      }; mpirun: ${
        killed.text.split("\n").filter((l) => /signal|exited|abort/i.test(l)).slice(0, 2)
          .map((l) => l.trim()).join(" / ")
      }`,
    );
    // no rank outlives the job (a survivor would hold the run's lock against the re-launch)
    const pids = [...killed.text.matchAll(/DP-RANK (\d) pid (\d+)/g)].map((m) => Number(m[2]));
    assert.equal(pids.length, 2, killed.text);
    for (let i = 0; i < 50 && pids.some(alive); i++) {
      await new Promise((ok) => setTimeout(ok, 100));
    }
    assert.deepEqual(pids.filter(alive), [], `ranks alive after the job ended:\n${killed.text}`);
    const cut = metrics(`${dir}/cut`);
    const steps = cut.filter((l) => l[0] === "step").length;
    assert.ok(steps >= 2 && steps <= 4, `${steps} updates logged before the kill`);
    const resumed = await launch(
      bin,
      { resume: `${dir}/cut/run`, steps: opts.steps },
      `${dir}/cut`,
    );
    assert.equal(resumed.code, 0, resumed.text);
    assert.match(resumed.text, /DP-FAULT-CHILD-OK 0/);
    assert.match(resumed.text, /DP-FAULT-CHILD-OK 1/);
    // from update 2's checkpoint, the same global batches and arithmetic: bit for bit
    assert.deepEqual(metrics(`${dir}/cut`), metrics(`${dir}/full`));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("data parallel: a rank waiting when its launcher dies ends itself at once", async () => {
  const bin = mpirunOrSkip();
  if (!bin) return;
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-orphan-" });
  // rank 1 hangs; rank 0 waits (the default 600 s timeout); then mpirun itself is killed
  const p = new Deno.Command(bin, {
    args: [
      ...MPIRUN_FLAGS,
      Deno.execPath(),
      "run",
      "-A",
      CHILD,
      JSON.stringify({ ...BASE, fault: "hang", faultAt: 2, faultRank: 1 }),
      dir,
    ],
    env: MPIRUN_ENV,
    stdout: "piped",
    stderr: "null",
  }).spawn();
  let text = "";
  const reading = (async () => {
    for await (const chunk of p.stdout) text += dec.decode(chunk, { stream: true });
  })().catch(() => {});
  const pids = () => [...text.matchAll(/DP-RANK (\d) pid (\d+)/g)].map((m) => Number(m[2]));
  try {
    for (let i = 0; i < 1200 && !text.includes("DP-FAULT "); i++) {
      await new Promise((ok) => setTimeout(ok, 100));
    }
    assert.match(text, /DP-FAULT hang rank 1/, text);
    assert.equal(pids().length, 2, text);
    // rank 0 is now waiting in its next collective
    await new Promise((ok) => setTimeout(ok, 1500));
    const [r0] = pids();
    assert.ok(alive(r0), "rank 0 ended before its launcher");
    p.kill("SIGKILL");
    await p.status;
    const t0 = performance.now();
    while (alive(r0) && performance.now() - t0 < 10_000) {
      await new Promise((ok) => setTimeout(ok, 50));
    }
    const took = (performance.now() - t0) / 1000;
    assert.ok(!alive(r0), `rank 0 (pid ${r0}) still waits ${took.toFixed(1)} s after mpirun died`);
  } finally {
    for (const pid of pids()) {
      try {
        Deno.kill(pid, "SIGKILL"); // the stopped rank 1 (and anything left)
      } catch {
        // gone
      }
    }
    await reading;
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("data parallel: a bad QGALORE_DIST_TIMEOUT is one line naming what is allowed", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL("../examples/pretrain.ts", import.meta.url).pathname,
      "--steps",
      "1",
    ],
    env: { QGALORE_DIST_TIMEOUT: "0.1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = dec.decode(out.stdout) + dec.decode(out.stderr);
  assert.equal(out.code, 2, text);
  assert.equal(
    text.trim(),
    "error: QGALORE_DIST_TIMEOUT=0.1: allowed seconds from 1 to 86400 (default 600), the " +
      "longest a collective waits for the other ranks",
  );
});
