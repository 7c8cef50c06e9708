// Fine-tuning under mpirun: 2 ranks × batch 2 follow the trajectory of one process with batch 4
// (LoRA on the tiny Hugging Face fixture: training losses, validation losses and gradient
// norms within 1e-5 relative, the masked target counts equal), rank 0 alone writes the run
// and the adapter, and a stopped 2-rank fine-tune resumes update for update. Skipped with a
// message when mpirun is absent (unless QGALORE_REQUIRE_MPI=1).
import assert from "node:assert/strict";
import { join } from "node:path";
import { Rng } from "../lib/rng.ts";
import { rankSlice } from "../lib/finetune.ts";
import { type MetricLine, metricLines, MPIRUN_FLAGS, mpirunOrSkip, runMpi } from "./mpi_run.ts";

const MODEL = new URL("./fixtures/hf/gqa-tied-theta5e5", import.meta.url).pathname;
const SCRIPT = new URL("../examples/finetune.ts", import.meta.url).pathname;
const CHILD = new URL("./dp_finetune_child.ts", import.meta.url).pathname;
const metrics = (dir: string): MetricLine[] => metricLines(join(dir, "metrics.jsonl"));

/** Prompt/completion lines of different lengths (so batches carry padding and prompts). */
function lines(n: number, seed: number): string {
  const words = ["apple", "river", "stone", "cloud", "green", "house", "light", "music"];
  const rng = new Rng(seed);
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const k = 1 + rng.int(3);
    const ws = Array.from({ length: k }, () => words[rng.int(words.length)]);
    out.push(JSON.stringify({ prompt: `say ${ws.join(" ")}:`, completion: ` ${ws.join(" ")}` }));
  }
  return out.join("\n") + "\n";
}

Deno.test("rankSlice: each rank's rows of every micro-batch, in turn; the counts add up", () => {
  // 2 micro-batches × (3 ranks × 2 rows) of t + 1 = 4 tokens; token = 100·row + position
  const micro = 2, ranks = 3, batch = 2, w = 4, rows = micro * ranks * batch;
  const tokens = Int32Array.from({ length: rows * w }, (_, i) => 100 * Math.floor(i / w) + i % w);
  // row r counts its last (r % 3) targets (position 0 never counts)
  const mask = Uint8Array.from({ length: rows * w }, (_, i) => {
    const r = Math.floor(i / w), j = i % w;
    return j > 0 && j >= w - (r % 3) ? 1 : 0;
  });
  let all = 0;
  for (let i = 0; i < rows * w; i++) if (i % w !== 0) all += mask[i];
  const global = { tokens, mask, t: w - 1, count: all };
  let sum = 0;
  for (let r = 0; r < ranks; r++) {
    const s = rankSlice(global, micro, batch, r, ranks);
    assert.equal(s.t, 3);
    assert.equal(s.tokens.length, micro * batch * w);
    // micro-batch m, row k of rank r is global row m·(ranks·batch) + r + k·ranks
    const want = [0, 1].flatMap((m) =>
      [0, 1].map((k) => 100 * (m * ranks * batch + r + k * ranks))
    );
    assert.deepEqual(Array.from({ length: micro * batch }, (_, i) => s.tokens[i * w]), want);
    assert.deepEqual(
      Array.from({ length: micro * batch }, (_, i) => s.mask.subarray(i * w, i * w + w).join("")),
      want.map((g) => mask.subarray((g / 100) * w, (g / 100) * w + w).join("")),
    );
    sum += s.count;
  }
  assert.equal(sum, all);
  assert.equal(all, 4 * (0 + 1 + 2)); // 12 rows, each count r % 3
});

Deno.test({
  name: "data parallel fine-tuning: 2 ranks × batch 2 = 1 process × batch 4 (lora), resume",
  sanitizeResources: false,
  fn: async () => {
    const bin = mpirunOrSkip();
    if (!bin) return;
    const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-ft-" });
    try {
      const data = join(dir, "train.jsonl");
      const val = join(dir, "val.jsonl");
      Deno.writeTextFileSync(data, lines(40, 10));
      Deno.writeTextFileSync(val, lines(7, 11));
      const opts = {
        model: MODEL,
        data,
        valData: val,
        optimizer: "lora",
        loraRank: 4,
        loraTargets: "all-linear",
        gradAccum: 2,
        seqLen: 32,
        steps: 6,
        lr: 1e-2,
        clip: 0.5,
        evalEvery: 3,
        saveEvery: 2,
        threads: 1,
        seed: 3,
      };
      const flags = (batch: number, out: string) => [
        SCRIPT,
        "--model",
        MODEL,
        "--data",
        data,
        "--val-data",
        val,
        "--optimizer",
        "lora",
        "--lora-rank",
        "4",
        "--lora-targets",
        "all-linear",
        "--batch-size",
        String(batch),
        "--grad-accum",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "6",
        "--lr",
        "1e-2",
        "--clip",
        "0.5",
        "--eval-every",
        "3",
        "--save-every",
        "2",
        "--threads",
        "1",
        "--seed",
        "3",
        "--out",
        out,
      ];
      // the command line under mpirun: 2 ranks × batch 2, the adapter saved once
      const dp = await runMpi(bin, [
        ...MPIRUN_FLAGS,
        Deno.execPath(),
        "run",
        "-A",
        ...flags(2, join(dir, "dp")),
        "--save-adapter",
        join(dir, "dp-adapter"),
      ]);
      assert.equal(dp.code, 0, dp.text);
      assert.match(dp.text, /data-parallel: 2 ranks × batch 2 = global batch 4/);
      // rank 0 alone prints: one summary line
      assert.equal(dp.text.split("\n").filter((l) => l.startsWith("summary: ")).length, 1, dp.text);
      const one = await runMpi(Deno.execPath(), ["run", "-A", ...flags(4, join(dir, "one"))]);
      assert.equal(one.code, 0, one.text);
      const a = metrics(join(dir, "dp")), b = metrics(join(dir, "one"));
      assert.equal(a.length, b.length);
      assert.equal(a.filter((l) => l.type === "step").length, 6);
      assert.equal(a.filter((l) => l.type === "eval").length, 3); // 0, 3, 6
      for (let i = 0; i < a.length; i++) {
        assert.equal(a[i].type, b[i].type);
        assert.equal(a[i].step, b[i].step);
        // the masked targets of the global batch: the engine's all-reduced count
        assert.equal(a[i].loss_tokens, b[i].loss_tokens, `loss_tokens at line ${i}`);
        for (const k of ["loss", "val_loss", "grad_norm"] as const) {
          const x = a[i][k], y = b[i][k];
          if (y === undefined) continue;
          const tol = k === "grad_norm" ? 1e-4 : 1e-5;
          assert.ok(
            typeof x === "number" && Math.abs(x - y) <= tol * Math.abs(y),
            `${k} at line ${i}: ${x} (2 ranks) vs ${y} (1 process)`,
          );
        }
      }
      const sum = JSON.parse(Deno.readTextFileSync(join(dir, "dp", "summary.json")));
      assert.equal(sum.data_parallel.ranks, 2);
      assert.equal(sum.data_parallel.global_batch, 4);
      const single = JSON.parse(Deno.readTextFileSync(join(dir, "one", "summary.json")));
      assert.ok(Math.abs(sum.val_loss - single.val_loss) <= 1e-5 * single.val_loss);
      assert.equal(sum.finetune.val_tokens, single.finetune.val_tokens);
      assert.equal(sum.finetune.epochs, single.finetune.epochs);
      assert.equal(sum.finetune.adapter_saved, join(dir, "dp-adapter"));
      assert.ok(Deno.statSync(join(dir, "dp-adapter", "adapter_config.json")).isFile);

      // stopped after 3 updates (rank 0 checkpoints), resumed from the command line
      const cut = join(dir, "cut");
      const stopped = await runMpi(bin, [
        ...MPIRUN_FLAGS,
        Deno.execPath(),
        "run",
        "-A",
        CHILD,
        JSON.stringify({ ...opts, batchSize: 2, stopAfter: 3 }),
        cut,
      ]);
      assert.equal(stopped.code, 0, stopped.text);
      assert.match(stopped.text, /DP-FT-CHILD-OK 1/);
      assert.equal(metrics(cut).filter((l) => l.type === "step").length, 3);
      // a resume with another number of ranks is refused in one line
      const wrong = await runMpi(Deno.execPath(), ["run", "-A", SCRIPT, "--resume", cut]);
      assert.equal(wrong.code, 2, wrong.text);
      assert.match(
        wrong.text.trim(),
        /^error: .*global batch is 4 rows, this job's is 1 rank × batch 2 = 2: resume with the number of ranks the run was started with$/,
      );
      const resumed = await runMpi(bin, [
        ...MPIRUN_FLAGS,
        Deno.execPath(),
        "run",
        "-A",
        SCRIPT,
        "--resume",
        cut,
      ]);
      assert.equal(resumed.code, 0, resumed.text);
      const key = (
        l: MetricLine,
      ) => [l.type, l.step, l.loss, l.val_loss, l.grad_norm, l.loss_tokens];
      assert.deepEqual(metrics(cut).map(key), a.map(key));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "data parallel fine-tuning with lora dropout: the ranks draw masks of their own",
  sanitizeResources: false,
  fn: async () => {
    const bin = mpirunOrSkip();
    if (!bin) return;
    const dir = await Deno.makeTempDir({ prefix: "qgalore-dp-ft-drop-" });
    try {
      const data = join(dir, "train.jsonl");
      const val = join(dir, "val.jsonl");
      Deno.writeTextFileSync(data, lines(24, 12));
      Deno.writeTextFileSync(val, lines(5, 13));
      const flags = (dropout: string, out: string) => [
        SCRIPT,
        ...["--model", MODEL, "--data", data, "--val-data", val, "--optimizer", "lora"],
        ...["--lora-rank", "4", "--lora-targets", "all-linear", "--lora-dropout", dropout],
        ...["--batch-size", "2", "--grad-accum", "2", "--seq-len", "32"],
        ...["--steps", "4", "--lr", "1e-2", "--eval-every", "0", "--threads", "1"],
        ...["--seed", "5", "--out", out],
      ];
      const mpi = (dropout: string, out: string) =>
        runMpi(bin, [...MPIRUN_FLAGS, Deno.execPath(), "run", "-A", ...flags(dropout, out)]);
      const drop = await mpi("0.3", join(dir, "drop"));
      assert.equal(drop.code, 0, drop.text);
      const none = await mpi("0", join(dir, "none"));
      assert.equal(none.code, 0, none.text);
      const loss = (m: MetricLine[]) => m.filter((l) => l.type === "step").map((l) => l.loss!);
      const a = loss(metrics(join(dir, "drop"))), b = loss(metrics(join(dir, "none")));
      assert.equal(a.length, 4);
      assert.ok(a.every(Number.isFinite), `${a}`);
      // the masks act (the same data without dropout trains otherwise)
      assert.ok(a.some((x, i) => Math.abs(x - b[i]) > 1e-4 * Math.abs(b[i])), `${a} vs ${b}`);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
