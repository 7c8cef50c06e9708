import assert from "node:assert/strict";
import {
  Engine,
  engineAbiVersion,
  EngineError,
  ErrorCode,
  inspectCheckpoint,
} from "../ffi/engine.ts";
import { ABI_VERSION } from "../ffi/symbols.ts";
import { tinyConfig } from "./engine_config.ts";

function batch(seed: number): Int32Array {
  const t = new Int32Array(2 * 17);
  let x = seed;
  for (let i = 0; i < t.length; i++) t[i] = (x = (x * 1103515245 + 12345) >>> 0) % 256;
  return t;
}

Deno.test("the library's ABI version matches the bindings", () => {
  assert.equal(engineAbiVersion(), ABI_VERSION);
});

Deno.test("a bad config is a one-line EngineError, not a crash", async () => {
  const cfg = tinyConfig();
  cfg.model.num_attention_heads = 3;
  await assert.rejects(() => Engine.create(cfg), (e: unknown) => {
    assert.ok(e instanceof EngineError);
    assert.match(e.message, /num_attention_heads = 3: must divide hidden_size 128/);
    assert.ok(!e.message.includes("\n"));
    return true;
  });
});

Deno.test("a Rust panic becomes an exception and the process lives on", async () => {
  const e = await Engine.create(tinyConfig());
  assert.throws(() => e.debugPanic(), (err: unknown) => {
    assert.ok(err instanceof EngineError);
    assert.equal(err.code, ErrorCode.panic);
    assert.match(err.message, /internal engine error \(panic\): deliberate panic/);
    return true;
  });
  // the handle refuses further work instead of running on a half-updated state
  await assert.rejects(
    () => e.trainStep(batch(1), 1, 1e-3),
    /unusable after an earlier internal error/,
  );
  e[Symbol.dispose]();
  e[Symbol.dispose](); // twice is harmless
  await assert.rejects(() => e.trainStep(batch(1), 1, 1e-3), /disposed/);
  // a fresh engine still works
  using f = await Engine.create(tinyConfig());
  const st = await f.trainStep(batch(2), 1, 1e-3);
  assert.ok(st.loss > 5 && st.loss < 6, `${st.loss}`);
});

Deno.test("memory categories add up", async () => {
  using e = await Engine.create(tinyConfig({ optimizer: "qgalore", options: { fused: true } }));
  await e.trainStep(batch(3), 1, 1e-3);
  const m = e.memory();
  assert.equal(
    m.weights + m.adapters + m.grads + m.optimizer_state + m.projector + m.activations,
    m.total,
  );
  assert.ok(m.projector > 0 && m.weights > 0);
  const info = e.info();
  assert.equal(info.optimizer, "qgalore");
  assert.equal(info.fused, true);
  assert.equal(info.svd_count, 14);
});

for (const opt of ["adamw", "qgalore"]) {
  Deno.test(`${opt}: a checkpoint resumes bit-exactly; a bad one changes nothing`, async () => {
    const dir = await Deno.makeTempDir();
    try {
      using a = await Engine.create(
        tinyConfig({ optimizer: opt, options: { fused: opt !== "adamw" } }),
      );
      for (let s = 0; s < 3; s++) await a.trainStep(batch(10 + s), 1, 3e-3);
      await a.save(`${dir}/ck.bin`);
      const cont: number[] = [];
      for (let s = 3; s < 6; s++) cont.push((await a.trainStep(batch(10 + s), 1, 3e-3)).loss);
      using b = await Engine.create(
        tinyConfig({ optimizer: opt, options: { fused: opt !== "adamw" } }),
      );
      await b.load(`${dir}/ck.bin`);
      const resumed: number[] = [];
      for (let s = 3; s < 6; s++) resumed.push((await b.trainStep(batch(10 + s), 1, 3e-3)).loss);
      assert.deepEqual(resumed, cont);

      await Deno.writeFile(`${dir}/bad.bin`, new TextEncoder().encode("not a checkpoint"));
      const before = await b.evalLoss(batch(99), 1);
      await assert.rejects(
        () => b.load(`${dir}/bad.bin`),
        /bad\.bin: checkpoint is corrupt or not a qgalore checkpoint/,
      );
      await assert.rejects(() => b.load(`${dir}/missing.bin`), /cannot read checkpoint/);
      assert.equal(await b.evalLoss(batch(99), 1), before);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("a checkpoint carries the run and the engine config; another seed is refused", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const cfg = tinyConfig({ optimizer: "qgalore", seed: 7 });
    using a = await Engine.create(cfg);
    for (let s = 0; s < 2; s++) await a.trainStep(batch(20 + s), 1, 3e-3);
    const run = { data: { position: 1234 }, tokenizer: "bytes", note: "ünïcode" };
    await a.save(`${dir}/ck.bin`, run);
    const info = inspectCheckpoint(`${dir}/ck.bin`);
    assert.equal(info.optimizer, "qgalore");
    assert.equal(info.step, 2);
    assert.deepEqual(info.run, run);
    assert.equal(info.engine_config.seed, 7);
    assert.equal(info.engine_config.batch_size, 2);
    assert.equal((info.engine_config.optimizer as Record<string, unknown>).rank, 16);
    assert.equal(info.format_version, 3);
    // no run: null
    await a.save(`${dir}/plain.bin`);
    assert.equal(inspectCheckpoint(`${dir}/plain.bin`).run, null);

    using other = await Engine.create(tinyConfig({ optimizer: "qgalore", seed: 8 }));
    const before = await other.evalLoss(batch(99), 1);
    await assert.rejects(() => other.load(`${dir}/ck.bin`), (e: unknown) => {
      assert.ok(e instanceof EngineError);
      assert.match(e.message, /seed is 7 in the checkpoint and 8 in this engine/);
      assert.ok(!e.message.includes("\n"));
      return true;
    });
    assert.equal(await other.evalLoss(batch(99), 1), before);
    // an engine for inference at another batch shape and seed takes the weights
    using infer = await Engine.create({ ...cfg, batch_size: 1, seq_len: 8, seed: 3 });
    await assert.rejects(
      () => infer.load(`${dir}/ck.bin`),
      /seed is 7 in the checkpoint and 3 in this engine/,
    );
    await infer.loadWeights(`${dir}/ck.bin`);
    assert.equal(infer.info().steps, 2);
    using same = await Engine.create(cfg);
    await same.load(`${dir}/ck.bin`);
    assert.equal(same.info().steps, 2);

    // a damaged file: one byte flipped in the middle
    const bytes = await Deno.readFile(`${dir}/ck.bin`);
    bytes[bytes.length >> 1] ^= 0x10;
    await Deno.writeFile(`${dir}/bad.bin`, bytes);
    assert.throws(() => inspectCheckpoint(`${dir}/bad.bin`), (e: unknown) => {
      assert.ok(e instanceof EngineError);
      assert.equal(e.code, ErrorCode.invalid);
      assert.match(e.message, /bad\.bin: .*SHA-256 checksum does not match/);
      return true;
    });
    assert.throws(() => inspectCheckpoint(`${dir}/missing.bin`), /cannot read checkpoint/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// Completion-only loss (interface A): a mask changes the loss, counts its targets, and eval
// returns per-row sums that add up; short windows (t < seq_len) and bad inputs.
Deno.test("a loss mask selects the targets; eval gives per-row sums and counts", async () => {
  using e = await Engine.create(tinyConfig());
  using f = await Engine.create(tinyConfig());
  const toks = batch(5);
  // row 0: targets 1..16 from position 9 on (8 targets); row 1: every target (16)
  const mask = new Uint8Array(toks.length);
  for (let j = 9; j <= 16; j++) mask[j] = 1;
  mask.fill(1, 17);
  const full = await e.eval(toks, 1);
  assert.equal(full.count, 32);
  assert.equal(full.mean, await e.evalLoss(toks, 1));
  const m = await e.eval(toks, 1, mask);
  assert.equal(m.count, 24);
  assert.deepEqual([...m.rowCounts], [8, 16]);
  assert.ok(Math.abs(m.rowSums[0] + m.rowSums[1] - m.sum) <= 1e-12 * m.sum);
  assert.equal(m.mean, m.sum / m.count);
  assert.equal(m.mean, await e.evalLoss(toks, 1, mask));
  // row 1 counts every target in both: the same sum
  assert.equal(m.rowSums[1], full.rowSums[1]);
  assert.ok(Math.abs(m.mean - full.mean) > 1e-4, `${m.mean} vs ${full.mean}`);
  // the step's loss is that mean, over N = 24 targets; unmasked, all 32
  const sm = await e.trainStep(toks, 1, 1e-3, mask);
  const sf = await f.trainStep(toks, 1, 1e-3);
  assert.equal(sm.count, 24);
  assert.equal(sf.count, 32);
  assert.equal(sm.loss, m.mean);
  assert.equal(sf.loss, full.mean);
});

Deno.test("short windows and bad masks", async () => {
  using e = await Engine.create(tinyConfig());
  // t = 7 < seq_len 16: 2 rows of 8 ids
  const short = batch(6).subarray(0, 16);
  const st = await e.trainStep(short, 1, 1e-3);
  assert.equal(st.count, 14);
  const r = await e.eval(short, 1);
  assert.equal(r.count, 14);
  assert.deepEqual([...r.rowCounts], [7, 7]);
  await assert.rejects(() => e.trainStep(batch(1).subarray(0, 33), 1, 1e-3), (err: unknown) => {
    assert.ok(err instanceof EngineError);
    assert.match(err.message, /got 33 token ids.*batch 2.*seq_len 16/);
    assert.ok(!err.message.includes("\n"));
    return true;
  });
  await assert.rejects(
    () => e.trainStep(batch(1), 1, 1e-3, new Uint8Array(34)),
    /no target in this update carries loss \(every mask entry is 0\)/,
  );
  await assert.rejects(
    () => e.eval(batch(1), 1, new Uint8Array(3)),
    /mask has 3 entries/,
  );
  await assert.rejects(
    () => e.trainStep(batch(1), 1, 1e-3, [1, 2] as unknown as Uint8Array),
    /trainStep: mask is a Array; must be a Uint8Array/,
  );
});
