/**
 * PEFT adapters from TypeScript (ffi/engine.ts loadAdapter/saveAdapter/adapterConfig,
 * lib/adapter.ts, lib/merge.ts, openModel's `adapter`) and the CLI paths (generate.ts
 * --adapter, merge.ts), on the adapters `peft` 0.21.2 saved on the tiny Hugging Face fixtures
 * (tests/fixtures/peft/): peft's logits, save → load identity, merged folders, and every
 * refusal as one line.
 */
import assert from "node:assert/strict";
import { adapterConfig, Engine, EngineError } from "../ffi/engine.ts";
import { adapterOptimizer } from "../lib/adapter.ts";
import { UsageError } from "../lib/errors.ts";
import { evaluatePerplexity } from "../lib/evaluate.ts";
import { generateIds } from "../lib/generate.ts";
import { mergeAdapter } from "../lib/merge.ts";
import { openModel, saveCheckpoint } from "../lib/open_model.ts";
import { lastLine, runScript } from "./run_script.ts";

const HF = new URL("./fixtures/hf/", import.meta.url).pathname;
const PEFT = new URL("./fixtures/peft/", import.meta.url).pathname;
const QV = `${PEFT}qv-r4`;
const MHA = `${HF}mha-untied-theta1e4`;
const ALL = `${PEFT}all-r8-rslora`;
const GQA = `${HF}gqa-tied-theta5e5`;

/** A fixture's logits.safetensors: ids [rows, seq] and f32 logits by name. */
function fixtureLogits(dir: string): {
  ids: Int32Array;
  rows: number;
  seq: number;
  by: Record<string, Float32Array>;
} {
  const bytes = Deno.readFileSync(`${dir}/logits.safetensors`);
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const at = (k: string) => {
    const [a, b] = header[k].data_offsets as [number, number];
    return bytes.slice(8 + n + a, 8 + n + b).buffer;
  };
  const by: Record<string, Float32Array> = {};
  for (const k of ["base", "adapted", "merged"]) by[k] = new Float32Array(at(k));
  const [rows, seq] = header.ids.shape as [number, number];
  return { ids: new Int32Array(at("ids")), rows, seq, by };
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

async function rejectsOneLine(p: Promise<unknown>, ...want: string[]): Promise<string> {
  let msg = "";
  await assert.rejects(p, (e: Error) => {
    msg = e.message;
    return e instanceof EngineError || e instanceof UsageError;
  });
  assert.ok(!msg.includes("\n"), msg);
  for (const w of want) {
    assert.ok(msg.includes(w), `${JSON.stringify(msg)} lacks ${JSON.stringify(w)}`);
  }
  return msg;
}

Deno.test("adapterConfig: the fixture adapters' settings, one-line errors", () => {
  const c = adapterConfig(QV);
  assert.deepEqual(
    [c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, c.target_modules],
    [4, 8, 0.05, false, ["q_proj", "v_proj"]],
  );
  assert.equal(c.base_model_name_or_path, "tests/fixtures/hf/mha-untied-theta1e4");
  const a = adapterConfig(ALL);
  assert.deepEqual([a.r, a.lora_alpha, a.use_rslora, a.target_modules.length], [8, 16, true, 7]);
  assert.throws(() => adapterConfig(`${PEFT}nope`), (e: Error) => {
    return e instanceof EngineError && e.message.includes("cannot read the adapter folder") &&
      !e.message.includes("\n");
  });
  // a model folder is no adapter
  assert.throws(() => adapterConfig(MHA), /no adapter_config\.json: not a PEFT adapter folder/);
});

for (const [adapter, model] of [[QV, MHA], [ALL, GQA]]) {
  const name = adapter.split("/").at(-1)!;
  Deno.test(`${name}: base + adapter gives peft's logits; merge gives them as a plain model`, async () => {
    const l = fixtureLogits(adapter);
    using m = await openModel({ model, adapter, batchSize: l.rows, seqLen: l.seq, threads: 2 });
    assert.equal(m.engine.config.optimizer.name, "lora");
    const got = await m.engine.logits(l.ids, l.rows, l.seq);
    const d = maxDiff(got, l.by.adapted);
    assert.ok(d < 1e-4, `${name}: max |Δ| vs peft ${d}`);
    assert.ok(maxDiff(l.by.adapted, l.by.base) > 1);
    const dir = await Deno.makeTempDir();
    try {
      const out = `${dir}/merged`;
      const r = await mergeAdapter(model, adapter, out, { threads: 2 });
      assert.equal(r.dtype, "f32");
      // a plain Hugging Face folder with the model's tokenizer
      for (const f of ["config.json", "model.safetensors", "tokenizer.json"]) {
        assert.ok(Deno.statSync(`${out}/${f}`).isFile, f);
      }
      using p = await openModel({ model: out, batchSize: l.rows, seqLen: l.seq, threads: 2 });
      assert.equal(p.engine.config.optimizer.name, "adamw");
      const merged = await p.engine.logits(l.ids, l.rows, l.seq);
      assert.ok(maxDiff(merged, got) < 1e-4 && maxDiff(merged, l.by.merged) < 1e-4);
      // never over an existing folder
      await rejectsOneLine(
        mergeAdapter(model, adapter, out),
        `output ${out}: exists and is not an empty folder`,
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("saveAdapter → loadAdapter: identical logits; base path, dtype, overwrite", async () => {
  const l = fixtureLogits(QV);
  using m = await openModel({
    model: MHA,
    adapter: QV,
    batchSize: l.rows,
    seqLen: l.seq,
    threads: 2,
  });
  const want = await m.engine.logits(l.ids, l.rows, l.seq);
  const dir = await Deno.makeTempDir();
  try {
    await m.engine.saveAdapter(`${dir}/a`);
    const c = adapterConfig(`${dir}/a`);
    // base_model_name_or_path: the folder the engine was loaded from
    assert.equal(c.base_model_name_or_path, MHA);
    assert.deepEqual([c.r, c.lora_alpha, c.lora_dropout, c.target_modules], [4, 8, 0.05, [
      "q_proj",
      "v_proj",
    ]]);
    using e = await Engine.create({
      model: m.config,
      optimizer: adapterOptimizer(c),
      batch_size: l.rows,
      seq_len: l.seq,
      seed: 7,
      device: "cpu",
      threads: 2,
      init_from: MHA,
    });
    await e.loadAdapter(`${dir}/a`);
    assert.deepEqual(await e.logits(l.ids, l.rows, l.seq), want);
    await rejectsOneLine(m.engine.saveAdapter(`${dir}/a`), "already holds an adapter");
    await m.engine.saveAdapter(`${dir}/a`, {
      dtype: "bf16",
      overwrite: true,
      baseModel: "my/base",
    });
    assert.equal(adapterConfig(`${dir}/a`).base_model_name_or_path, "my/base");
    // bf16 tensors: 2 bytes each (8 tensors of 4·32 values)
    const size = Deno.statSync(`${dir}/a/adapter_model.safetensors`).size;
    assert.ok(size < 8 * 128 * 4 && size > 8 * 128 * 2, `${size}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadAdapter refusals: not an adapter engine, another model, other settings, missing files", async () => {
  using full = await openModel({ model: MHA, seqLen: 4, threads: 2 });
  await rejectsOneLine(full.engine.loadAdapter(QV), "optimizer lora or qlora", "adamw");
  await rejectsOneLine(full.engine.saveAdapter("/tmp/never-written"), "optimizer lora or qlora");
  // qv-r4 (an MHA model's v_proj) on the GQA model
  await rejectsOneLine(
    openModel({ model: GQA, adapter: QV, seqLen: 4, threads: 2, adapterLabel: "--adapter x" }),
    "--adapter x: ",
    "adapter for another model",
  );
  const { config } = await openModel({ model: MHA, seqLen: 4, threads: 2 }).then((m) => {
    m[Symbol.dispose]();
    return m;
  });
  using e = await Engine.create({
    model: config,
    optimizer: adapterOptimizer({ ...adapterConfig(QV), r: 8 }),
    batch_size: 1,
    seq_len: 4,
    seed: 0,
    device: "cpu",
    threads: 2,
    init_from: MHA,
  });
  await rejectsOneLine(e.loadAdapter(QV), "r = 4 but this engine's lora_rank is 8", "lora_rank 4");
  await rejectsOneLine(e.loadAdapter(`${PEFT}nope`), "cannot read the adapter folder");
  await rejectsOneLine(
    openModel({ model: MHA, adapter: MHA, seqLen: 4 }),
    "no adapter_config.json",
  );
  // a qgalore checkpoint carries its own weights: no --adapter on it
  const dir = await Deno.makeTempDir();
  try {
    await saveCheckpoint(full.engine, `${dir}/ckpt`, MHA);
    await rejectsOneLine(
      openModel({ model: `${dir}/ckpt`, adapter: QV, seqLen: 4 }),
      "applies to a Hugging Face model folder",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const run = runScript;
const last = lastLine;

/** A usage error: exit 2 and one `error:` line containing `want`. */
function usage(r: { code: number; out: string; err: string }, want: string): void {
  assert.equal(r.code, 2, r.err);
  const lines = r.err.trim().split("\n");
  assert.equal(lines.length, 1, r.err);
  assert.ok(lines[0].startsWith("error: ") && lines[0].includes(want), r.err);
}

Deno.test("generate.ts --adapter: the library's generation with base + adapter; errors", async () => {
  const args = [
    "--model",
    MHA,
    "--prompt",
    "Hello",
    "--max-new-tokens",
    "6",
    "--threads",
    "2",
    "--json",
  ];
  const r = await run("generate", [...args, "--adapter", QV]);
  assert.equal(r.code, 0, r.err);
  const got = JSON.parse(last(r.out));
  using m = await openModel({ model: MHA, adapter: QV, seqLen: 1, threads: 2 });
  const prompt = m.tokenizer.encode("Hello", { addSpecial: true });
  const want = await generateIds(m.engine, prompt, { maxNewTokens: 6, eosIds: m.tokenizer.eosIds });
  assert.deepEqual(got.ids, want.ids);
  usage(await run("generate", [...args, "--adapter", `${PEFT}nope`]), `--adapter ${PEFT}nope: `);
  usage(await run("generate", [...args, "--adapter", ALL]), "adapter for another model");
  usage(
    await run("generate", [...args, "--adapter-base", "qlora"]),
    "--adapter-base: needs --adapter",
  );
});

Deno.test("merge.ts: a plain folder equal to mergeAdapter's; refuses an occupied --out", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const out = `${dir}/m`;
    const r = await run("merge", [
      "--model",
      MHA,
      "--adapter",
      QV,
      "--out",
      out,
      "--threads",
      "2",
      "--json",
    ]);
    assert.equal(r.code, 0, r.err);
    const got = JSON.parse(last(r.out));
    assert.deepEqual([got.out, got.dtype, got.base, got.adapter.r], [out, "f32", "lora", 4]);
    await mergeAdapter(MHA, QV, `${dir}/lib`, { threads: 2 });
    assert.deepEqual(
      Deno.readFileSync(`${out}/model.safetensors`),
      Deno.readFileSync(`${dir}/lib/model.safetensors`),
    );
    const before = Deno.readFileSync(`${out}/model.safetensors`);
    usage(
      await run("merge", ["--model", MHA, "--adapter", QV, "--out", out]),
      `--out ${out}: exists`,
    );
    assert.deepEqual(Deno.readFileSync(`${out}/model.safetensors`), before);
    usage(
      await run("merge", ["--model", GQA, "--adapter", QV, "--out", `${dir}/x`]),
      "adapter for another model",
    );
    assert.throws(() => Deno.statSync(`${dir}/x`), Deno.errors.NotFound);
    usage(await run("merge", ["--model", MHA, "--out", `${dir}/y`]), "--adapter");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("evaluate.ts --adapter: the library's perplexity of base + adapter; errors", async () => {
  const text = `${HF}multilingual.txt`;
  const args = ["--model", MHA, "--data", text, "--seq-len", "16", "--threads", "2", "--json"];
  const r = await run("evaluate", [...args, "--adapter", QV]);
  assert.equal(r.code, 0, r.err);
  const got = JSON.parse(last(r.out));
  using m = await openModel({ model: MHA, adapter: QV, seqLen: 16, threads: 2 });
  const want = await evaluatePerplexity(
    m.engine,
    m.tokenizer.encode(Deno.readTextFileSync(text)),
    16,
  );
  assert.deepEqual(got, want);
  // the adapter is applied: the base model's perplexity differs
  const b = await run("evaluate", args);
  assert.equal(b.code, 0, b.err);
  assert.notEqual(JSON.parse(last(b.out)).loss, got.loss);
  usage(await run("evaluate", [...args, "--adapter", GQA]), `--adapter ${GQA}: `);
  usage(
    await run("evaluate", [...args, "--adapter-base", "qlora"]),
    "--adapter-base: needs --adapter",
  );
});

Deno.test("adapterBase qlora: the adapter on the NF4 base; its merge is that model", async () => {
  const l = fixtureLogits(QV);
  const opts = { model: MHA, adapter: QV, batchSize: l.rows, seqLen: l.seq, threads: 2 };
  using q = await openModel({ ...opts, adapterBase: "qlora" });
  assert.equal(q.engine.config.optimizer.name, "qlora");
  const got = await q.engine.logits(l.ids, l.rows, l.seq);
  // NF4 moves the toy model's logits: not peft's f32 ones
  assert.ok(maxDiff(got, l.by.adapted) > 1e-3);
  const dir = await Deno.makeTempDir();
  try {
    await mergeAdapter(MHA, QV, `${dir}/m`, { base: "qlora", threads: 2 });
    using p = await openModel({ model: `${dir}/m`, batchSize: l.rows, seqLen: l.seq, threads: 2 });
    const d = maxDiff(await p.engine.logits(l.ids, l.rows, l.seq), got);
    assert.ok(d < 1e-4, `${d}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
