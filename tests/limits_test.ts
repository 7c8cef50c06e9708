/**
 * Bounded resources (issue 10 item 5): every numeric flag has a limit that gives one line
 * naming the flag (never a stack trace or a JSON column), threads are capped at the
 * processors, and a run beyond the host's memory is refused with the engine's estimate.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { parsePretrainArgs } from "../lib/cli.ts";
import { UsageError } from "../lib/errors.ts";
import { checkOptions, MAX_BATCH_TOKENS, MAX_COUNT } from "../lib/options.ts";
import { Engine, EngineError, engineOptions } from "../ffi/engine.ts";
import { modelConfig } from "../lib/presets.ts";
import { tinyConfig } from "./engine_config.ts";

const CLI = new URL("../examples/pretrain.ts", import.meta.url).pathname;

async function cli(args: string[]): Promise<{ code: number; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI, ...args],
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

function usage(args: string[], message: string | RegExp): void {
  assert.throws(() => parsePretrainArgs(args), (e: unknown) => {
    assert.ok(e instanceof UsageError, `expected UsageError, got ${e}`);
    assert.ok(!e.message.includes("\n"), "message must be one line");
    if (typeof message === "string") assert.equal(e.message, message);
    else assert.match(e.message, message);
    return true;
  });
}

const COUNT = `must be an integer ≥ 1 and ≤ ${MAX_COUNT}`;

Deno.test("the engine states its count limit in the schema (2^31)", () => {
  assert.equal(MAX_COUNT, 2 ** 31);
  const schema = engineOptions() as unknown as { max_count: number };
  assert.equal(schema.max_count, 2 ** 31);
  const rank = schema as unknown as { options: { name: string; range: { max: number } }[] };
  assert.equal(rank.options.find((o) => o.name === "rank")!.range.max, 2 ** 31);
});

Deno.test("huge counts name the flag and the limit", () => {
  usage(["--grad-accum", "1e15"], `--grad-accum 1e15: ${COUNT}`);
  usage(["--eval-batches", "1e15"], `--eval-batches 1e15: ${COUNT}`);
  usage(["--eval-batches", "1e40"], `--eval-batches 1e40: ${COUNT}`);
  usage(["--batch-size", "1e40"], `--batch-size 1e40: ${COUNT}`);
  usage(["--optimizer", "galore", "--rank", "1e40"], `--rank 1e40: ${COUNT}`);
  usage(["--optimizer", "galore", "--update-gap", "1e40"], `--update-gap 1e40: ${COUNT}`);
  usage(["--steps", "1e40"], `--steps 1e40: ${COUNT}`);
  usage(["--seq-len", "1e40"], `--seq-len 1e40: ${COUNT}`);
  usage(["--threads", "1e15"], `--threads 1e15: ${COUNT}`);
  usage(["--eval-every", "1e40"], `--eval-every 1e40: must be an integer ≥ 0 and ≤ ${MAX_COUNT}`);
});

Deno.test("an update or evaluation too large to hold is refused before any allocation", () => {
  // 8 × 129 tokens per micro-batch; 2^31 micro-batches would be 2.2e12 ids
  usage(
    ["--grad-accum", String(MAX_COUNT)],
    `--grad-accum ${MAX_COUNT}: --batch-size × (--seq-len + 1) × --grad-accum = ` +
      `${8 * 129 * MAX_COUNT} tokens; must be ≤ ${MAX_BATCH_TOKENS}`,
  );
  usage(["--eval-batches", "1000000"], /^--eval-batches 1000000: .* must be ≤ 268435456$/);
  // the largest allowed still parses
  const most = Math.floor(MAX_BATCH_TOKENS / (8 * 129));
  assert.equal(checkOptions({ evalBatches: most }).opts.evalBatches, most);
});

Deno.test("a decay that zeroes the weights each step blames --weight-decay, not --lr", () => {
  usage(
    ["--weight-decay", "1e15"],
    "--weight-decay 1000000000000000: --lr 0.005 × --weight-decay must be < 1 " +
      "(each step scales the weights by 1 − lr·wd); use --weight-decay < 200",
  );
  usage(["--lr", "0.01", "--weight-decay", "100"], /^--weight-decay 100: --lr 0\.01 × /);
  assert.equal(checkOptions({ lr: 0.01, weightDecay: 99 }).opts.weightDecay, 99);
});

Deno.test("--threads beyond the processors is capped with a notice", () => {
  const cores = navigator.hardwareConcurrency;
  const { opts, notices } = checkOptions({ threads: cores + 3000 });
  assert.equal(opts.threads, cores);
  assert.ok(
    notices.includes(
      `notice: --threads ${cores + 3000} capped at this machine's ${cores} processors`,
    ),
    notices.join("\n"),
  );
  assert.equal(checkOptions({ threads: 1 }).opts.threads, 1);
});

Deno.test("the engine caps threads at the processors and says so in info().notice", async () => {
  using e = await Engine.create({ ...tinyConfig(), threads: 3000 });
  const notice = e.info().notice ?? "";
  assert.match(notice, /^threads = 3000 capped at this machine's \d+ processors$/);
  const cores = Number(/(\d+) processors/.exec(notice)![1]);
  assert.ok(cores >= 1 && cores < 3000);
});

Deno.test("engine counts out of range are one line naming the field, not a serde column", async () => {
  for (
    const [patch, message] of [
      [{ batch_size: 1e40 }, `batch_size = 1e+40: ${COUNT}`],
      [{ seq_len: 2.5 }, `seq_len = 2.5: ${COUNT}`],
      [{ grad_accum: 1e15 }, `grad_accum = 1000000000000000: ${COUNT}`],
      [{ threads: -1 }, `threads = -1: must be an integer ≥ 0 and ≤ ${MAX_COUNT}`],
    ] as const
  ) {
    await assert.rejects(Engine.create({ ...tinyConfig(), ...patch }), (e: unknown) => {
      assert.ok(e instanceof EngineError, String(e));
      assert.equal(e.message, message);
      return true;
    });
  }
  const model = { ...tinyConfig().model, max_position_embeddings: 1e300 };
  await assert.rejects(Engine.create({ ...tinyConfig(), model }), (e: unknown) => {
    assert.ok(e instanceof EngineError, String(e));
    assert.match(
      e.message,
      /^model max_position_embeddings = 1e\+300: must be an integer ≥ 1 and ≤ 9007199254740992$/,
    );
    assert.ok(!e.message.includes("\n") && !e.message.includes("column"));
    return true;
  });
});

Deno.test("a config file's max_position_embeddings 1e300 is one line naming the field", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const path = join(dir, "model.json");
    Deno.writeTextFileSync(
      path,
      JSON.stringify({ ...modelConfig("llama-9m", 256), max_position_embeddings: 1e300 }),
    );
    usage(
      ["--model", path],
      /^--model .*model\.json: max_position_embeddings 1e\+300 must be an integer ≥ 1 and ≤ 9007199254740992$/,
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("tokens that are not an Int32Array are refused, not reinterpreted", async () => {
  using e = await Engine.create(tinyConfig());
  const n = 2 * 17;
  const floats = new Float32Array(n).fill(3);
  await assert.rejects(
    e.trainStep(floats as unknown as Int32Array, 1, 1e-3),
    (err: unknown) =>
      err instanceof EngineError &&
      err.message === "trainStep: tokens is a Float32Array; must be an Int32Array of token ids",
  );
  await assert.rejects(
    e.evalLoss(Array(n).fill(3) as unknown as Int32Array, 1),
    (err: unknown) =>
      err instanceof EngineError &&
      err.message === "evalLoss: tokens is a Array; must be an Int32Array of token ids",
  );
  // nothing ran: the engine still takes a real batch
  const loss = await e.evalLoss(new Int32Array(n).fill(3), 1);
  assert.ok(Number.isFinite(loss));
  assert.equal(e.info().steps, 0);
});

// A 7B model with AdamW needs ~100 GB; this test assumes the machine has less available.
const hostBytes = Deno.systemMemoryInfo().available;

Deno.test({
  name: "a 7B AdamW run beyond the host's memory is refused fast with the estimate (API)",
  ignore: hostBytes > 200e9,
  fn: async () => {
    const cfg = {
      ...tinyConfig(),
      model: modelConfig("llama-7b", 32000),
      batch_size: 8,
      seq_len: 256,
    };
    await assert.rejects(Engine.create(cfg), (e: unknown) => {
      assert.ok(e instanceof EngineError, String(e));
      assert.match(
        e.message,
        /^the model \(6\.\d\dB parameters\) with optimizer adamw needs \d+\.\d GB \(batch_size 8, seq_len 256\); this machine has \d+\.\d GB available; try optimizer qgalore, checkpointing true, a smaller batch_size or seq_len$/,
      );
      return true;
    });
  },
});

Deno.test({
  name: "a 7B AdamW run beyond the host's memory is refused fast with the estimate (CLI)",
  ignore: hostBytes > 200e9,
  fn: async () => {
    const { code, stderr } = await cli([
      "--model",
      "llama-7b",
      "--device",
      "cpu",
      "--steps",
      "2",
      "--out",
      join(Deno.makeTempDirSync(), "run"),
    ]);
    assert.equal(code, 1, stderr);
    const line = stderr.trim().split("\n").at(-1)!;
    assert.match(
      line,
      /^error: the model \(6\.\d\dB parameters\) with --optimizer adamw needs \d+\.\d GB \(--batch-size 8, --seq-len 128\); this machine has \d+\.\d GB available; try --optimizer qgalore, --checkpointing on, a smaller --batch-size or --seq-len$/,
    );
    assert.ok(!stderr.includes("    at "), "no stack trace");
  },
});
