/**
 * Fidelity against Hugging Face itself: tiny `LlamaForCausalLM` checkpoints and tokenizers
 * that `transformers` wrote (tests/fixtures/hf, made by tools/hf_fixtures.py), with the
 * logits, losses, greedy continuations and token ids `transformers` computed on them.
 */
import assert from "node:assert/strict";
import { Engine } from "../ffi/engine.ts";
import { generateIds } from "../lib/generate.ts";
import { exportModel } from "../lib/hf.ts";
import { openModel } from "../lib/open_model.ts";
import { openTokenizer } from "../lib/tokenizer.ts";
import { train } from "../lib/trainer.ts";

const FIX = new URL("./fixtures/hf/", import.meta.url).pathname;
const MODELS = [
  "mha-untied-theta1e4",
  "gqa-tied-theta5e5",
  "gqa-llama3-scaling",
  "mha-bf16-sharded",
  "gqa-f16",
];

interface Block {
  input: "single" | "batch";
  row: number;
  positions: number[];
  shape: [number, number];
  offset_bytes: number;
}

interface Expected {
  inputs: { single: number[]; batch: number[][] };
  loss: number;
  batch_loss: number;
  greedy: { new_ids: number[] };
  logits: { blocks: Block[] };
}

function expected(name: string): { e: Expected; logits: Float32Array } {
  const e = JSON.parse(Deno.readTextFileSync(`${FIX}${name}/expected.json`)) as Expected;
  const bytes = Deno.readFileSync(`${FIX}${name}/logits.bin`);
  return { e, logits: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) };
}

/** Mean next-token cross-entropy (f64) of row-major [rows × seq × vocab] logits. */
function meanLoss(logits: Float32Array, rows: number[][], vocab: number): number {
  let sum = 0;
  let n = 0;
  const seq = rows[0].length;
  rows.forEach((ids, r) => {
    for (let t = 0; t + 1 < seq; t++) {
      const row = logits.subarray((r * seq + t) * vocab, (r * seq + t + 1) * vocab);
      let max = -Infinity;
      for (const x of row) max = Math.max(max, x);
      let z = 0;
      for (const x of row) z += Math.exp(x - max);
      sum += Math.log(z) + max - row[ids[t + 1]];
      n++;
    }
  });
  return sum / n;
}

/** Largest |ours − theirs| over the positions transformers stored for one input. */
function maxDiff(
  ours: Float32Array,
  ref: Float32Array,
  blocks: Block[],
  input: "single" | "batch",
  seq: number,
  vocab: number,
): number {
  let worst = 0;
  for (const b of blocks.filter((b) => b.input === input)) {
    b.positions.forEach((p, i) => {
      const theirs = ref.subarray(
        b.offset_bytes / 4 + i * vocab,
        b.offset_bytes / 4 + (i + 1) * vocab,
      );
      const mine = ours.subarray((b.row * seq + p) * vocab, (b.row * seq + p + 1) * vocab);
      for (let v = 0; v < vocab; v++) worst = Math.max(worst, Math.abs(mine[v] - theirs[v]));
    });
  }
  return worst;
}

for (const name of MODELS) {
  Deno.test(`hf ${name}: logits, losses and greedy tokens equal transformers'`, async () => {
    const { e, logits: ref } = expected(name);
    const single = Int32Array.from(e.inputs.single);
    {
      using m = await openModel({ model: `${FIX}${name}`, seqLen: single.length, threads: 2 });
      const vocab = m.config.vocab_size;
      const ours = await m.engine.logits(single, 1, single.length);
      const d = maxDiff(ours, ref, e.logits.blocks, "single", single.length, vocab);
      assert.ok(d < 1e-4, `single: max |Δlogit| ${d}`);
      const loss = meanLoss(ours, [e.inputs.single], vocab);
      assert.ok(Math.abs(loss - e.loss) < 1e-5, `loss ${loss} vs ${e.loss}`);
      const g = await generateIds(m.engine, single, { maxNewTokens: 16, eosIds: [] });
      assert.deepEqual(g.ids, e.greedy.new_ids);
    }
    const seq = e.inputs.batch[0].length;
    using m = await openModel({ model: `${FIX}${name}`, batchSize: 2, seqLen: seq, threads: 2 });
    const ours = await m.engine.logits(Int32Array.from(e.inputs.batch.flat()), 2, seq);
    const d = maxDiff(ours, ref, e.logits.blocks, "batch", seq, m.config.vocab_size);
    assert.ok(d < 1e-4, `batch: max |Δlogit| ${d}`);
    const loss = meanLoss(ours, e.inputs.batch, m.config.vocab_size);
    assert.ok(Math.abs(loss - e.batch_loss) < 1e-5, `batch loss ${loss} vs ${e.batch_loss}`);
  });
}

for (const tok of ["tok-spm", "tok-bbpe"]) {
  Deno.test(`hf ${tok}: the same ids and text as transformers on a multilingual text`, () => {
    const want = JSON.parse(Deno.readTextFileSync(`${FIX}${tok}/expected_ids.json`));
    const t = openTokenizer(`${FIX}${tok}`);
    assert.equal(t.vocabSize, Number(want.vocab_size));
    assert.equal(t.bosId, Number(want.bos_token_id));
    assert.equal(t.eosId, Number(want.eos_token_id));
    for (const c of [want.full, ...want.lines]) {
      assert.deepEqual(Array.from(t.encode(c.text)), c.ids, JSON.stringify(c.text));
      assert.deepEqual(
        Array.from(t.encode(c.text, { addSpecial: false })),
        c.ids_no_special,
        JSON.stringify(c.text),
      );
      assert.equal(t.decode(c.ids, { skipSpecial: true }), c.decoded);
    }
  });
}

/** Every tensor of a safetensors file as raw bytes by name. */
function tensors(path: string): Map<string, { dtype: string; shape: number[]; bytes: Uint8Array }> {
  const buf = Deno.readFileSync(path);
  const n = Number(new DataView(buf.buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(buf.subarray(8, 8 + n)));
  const out = new Map();
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const { dtype, shape, data_offsets: [a, b] } = t as {
      dtype: string;
      shape: number[];
      data_offsets: [number, number];
    };
    out.set(name, { dtype, shape, bytes: buf.subarray(8 + n + a, 8 + n + b) });
  }
  return out;
}

Deno.test("hf export → reload: bit-identical weights, same logits, folder loadable again", async () => {
  const src = `${FIX}gqa-tied-theta5e5`;
  const dir = await Deno.makeTempDir();
  try {
    const single = Int32Array.from(expected("gqa-tied-theta5e5").e.inputs.single);
    let before: Float32Array;
    {
      using m = await openModel({ model: src, seqLen: single.length, threads: 2 });
      before = await m.engine.logits(single, 1, single.length);
      await exportModel(m.engine, `${dir}/out`, { dtype: "f32", tokenizer: m.tokenizer });
    }
    const a = tensors(`${src}/model.safetensors`);
    const b = tensors(`${dir}/out/model.safetensors`);
    assert.deepEqual([...b.keys()].sort(), [...a.keys()].sort());
    for (const [k, t] of a) {
      assert.equal(b.get(k)!.dtype, t.dtype, k);
      assert.deepEqual(b.get(k)!.shape, t.shape, k);
      assert.deepEqual(b.get(k)!.bytes, t.bytes, `${k}: weights differ`);
    }
    const cfg = JSON.parse(Deno.readTextFileSync(`${dir}/out/config.json`));
    assert.equal(cfg.tie_word_embeddings, true);
    assert.equal(cfg.bos_token_id, 598);
    assert.equal(cfg.eos_token_id, 599);
    using m = await openModel({ model: `${dir}/out`, seqLen: single.length, threads: 2 });
    assert.deepEqual(await m.engine.logits(single, 1, single.length), before);
    assert.deepEqual(
      Array.from(m.tokenizer.encode("Hello, wörld")),
      Array.from(openTokenizer(src).encode("Hello, wörld")),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("hf bf16 checkpoint: bf16 export reproduces the stored bf16 bytes", async () => {
  const src = `${FIX}mha-bf16-sharded`;
  const dir = await Deno.makeTempDir();
  try {
    {
      using m = await openModel({ model: src, seqLen: 8, threads: 2 });
      await exportModel(m.engine, `${dir}/out`, { dtype: "bf16", tokenizer: m.tokenizer });
    }
    const index = JSON.parse(Deno.readTextFileSync(`${src}/model.safetensors.index.json`));
    const shards = new Set(Object.values(index.weight_map) as string[]);
    const a = new Map([...shards].flatMap((f) => [...tensors(`${src}/${f}`)]));
    const b = tensors(`${dir}/out/model.safetensors`);
    assert.equal(b.size, a.size);
    for (const [k, t] of a) assert.deepEqual(b.get(k)!.bytes, t.bytes, k);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

for (const optimizer of ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"]) {
  Deno.test(`hf checkpoint trains with ${optimizer} and exports`, async () => {
    const src = `${FIX}gqa-tied-theta5e5`;
    const dir = await Deno.makeTempDir();
    try {
      const data = `${dir}/corpus.txt`;
      // about 30 KB of varied text: the fixtures' multilingual sample, repeated
      Deno.writeTextFileSync(data, Deno.readTextFileSync(`${FIX}multilingual.txt`).repeat(30));
      const s = await train({
        initFrom: src,
        optimizer,
        data,
        steps: 12,
        batchSize: 4,
        seqLen: 32,
        evalBatches: 2,
        ...(optimizer.includes("galore") ? { rank: 8, updateGap: 5 } : {}),
        ...(optimizer === "qgalore" ? { projGroupSize: 32 } : {}),
        lr: optimizer === "adamw" || optimizer === "adam8bit" ? 3e-3 : 2e-2,
        threads: 2,
        quiet: true,
        handleSigint: false,
        out: null,
        export: `${dir}/hf`,
        exportDtype: "f32",
      });
      assert.equal(s.steps, 12);
      assert.equal(s.init_from, src);
      assert.equal(s.tokenizer.vocab_size, 600);
      assert.ok(s.val_loss! < s.initial_val_loss!, `${s.initial_val_loss} → ${s.val_loss}`);
      // the exported model scores the run's final validation as the engine did
      using m = await openModel({ model: `${dir}/hf`, seqLen: 32, threads: 2 });
      assert.equal(m.config.tie_word_embeddings, true);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("hf: a model folder's vocabulary is kept; a larger tokenizer is refused", async () => {
  // tok-bbpe has 600 tokens, the model's embedding 500 rows
  await assert.rejects(
    () => openModel({ model: `${FIX}mha-untied-theta1e4`, tokenizer: `${FIX}tok-bbpe`, seqLen: 8 }),
    /vocab_size 500.*600|600.*vocab_size 500/,
  );
  using e = await Engine.create({
    model: JSON.parse(Deno.readTextFileSync(`${FIX}gqa-tied-theta5e5/config.json`)),
    batch_size: 1,
    seq_len: 8,
    optimizer: { name: "adamw" } as never,
    seed: 0,
    device: "cpu",
  });
  assert.equal(e.params, 600 * 32 + 2 * (32 + 32 * 32 * 2 + 16 * 32 * 2 + 3 * 32 * 96 + 32) + 32);
});
