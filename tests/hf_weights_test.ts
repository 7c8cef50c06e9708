import assert from "node:assert/strict";
import { Engine, EngineError, ErrorCode } from "../ffi/engine.ts";
import { inspectSafetensors } from "../ffi/hf.ts";
import { exportModel } from "../lib/hf.ts";
import { tinyConfig } from "./engine_config.ts";

function batch(seed: number): Int32Array {
  const t = new Int32Array(2 * 17);
  let x = seed;
  for (let i = 0; i < t.length; i++) t[i] = (x = (x * 1103515245 + 12345) >>> 0) % 256;
  return t;
}

async function trained(optimizer = "adamw"): Promise<Engine> {
  const e = await Engine.create(tinyConfig({ optimizer, seed: 7 }));
  for (let s = 0; s < 3; s++) await e.trainStep(batch(s + 1), 1, 1e-2);
  return e;
}

function names(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

Deno.test("exportModel writes a complete Hugging Face folder that imports back exactly", async () => {
  const base = await Deno.makeTempDir();
  try {
    using a = await trained();
    const tok = `${base}/tok`;
    await Deno.mkdir(tok);
    await Deno.writeTextFile(`${tok}/tokenizer.json`, '{"model":{"type":"BPE"}}');
    await Deno.writeTextFile(`${tok}/tokenizer_config.json`, '{"bos_token":"<s>"}');
    const out = `${base}/out`;
    await exportModel(a, out, {
      dtype: "f32",
      tokenizerDir: tok,
      extra: { bos_token_id: 1, eos_token_id: 2 },
    });
    assert.deepEqual(names(out), [
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
    ]);
    assert.deepEqual(names(base), ["out", "tok"]);
    const cfg = JSON.parse(await Deno.readTextFile(`${out}/config.json`));
    assert.deepEqual(cfg.architectures, ["LlamaForCausalLM"]);
    assert.equal(cfg.hidden_size, 128);
    assert.equal(cfg.vocab_size, 256);
    assert.equal(cfg.torch_dtype, "float32");
    assert.equal(cfg.eos_token_id, 2);
    const gen = JSON.parse(await Deno.readTextFile(`${out}/generation_config.json`));
    assert.equal(gen.bos_token_id, 1);
    assert.equal(await Deno.readTextFile(`${out}/tokenizer.json`), '{"model":{"type":"BPE"}}');

    const info = inspectSafetensors(out);
    assert.equal(info.error, undefined);
    assert.deepEqual(info.files, [`${out}/model.safetensors`]);
    assert.equal(info.bytes, (await Deno.stat(`${out}/model.safetensors`)).size);
    assert.equal(info.tensors.length, 1 + 2 * 9 + 2);
    const embed = info.tensors.find((t) => t.name === "model.embed_tokens.weight");
    assert.deepEqual(embed, { name: "model.embed_tokens.weight", dtype: "F32", shape: [256, 128] });
    const norm = info.tensors.find((t) => t.name === "model.norm.weight");
    assert.deepEqual(norm?.shape, [128]);

    using b = await Engine.create(tinyConfig({ optimizer: "adamw", seed: 99 }));
    const held = batch(999);
    assert.notEqual(await b.evalLoss(held, 1), await a.evalLoss(held, 1));
    await b.importHf(out);
    assert.equal(await b.evalLoss(held, 1), await a.evalLoss(held, 1));
  } finally {
    await Deno.remove(base, { recursive: true });
  }
});

Deno.test("bf16 export halves the file and qgalore re-imports it", async () => {
  const base = await Deno.makeTempDir();
  try {
    using a = await trained("qgalore");
    await a.exportHf(`${base}/bf16`, { dtype: "bf16" });
    const info = inspectSafetensors(`${base}/bf16`);
    assert.ok(info.tensors.every((t) => t.dtype === "BF16"));
    const cfg = JSON.parse(await Deno.readTextFile(`${base}/bf16/config.json`));
    assert.equal(cfg.torch_dtype, "bfloat16");
    await a.exportHf(`${base}/f32`, { dtype: "f32" });
    const big = inspectSafetensors(`${base}/f32`).bytes;
    assert.ok(info.bytes < 0.51 * big, `${info.bytes} vs ${big}`);
    using b = await Engine.create(tinyConfig({ optimizer: "qgalore", seed: 5 }));
    await b.importHf(`${base}/bf16`);
    const held = batch(31);
    const [la, lb] = [await a.evalLoss(held, 1), await b.evalLoss(held, 1)];
    assert.ok(Math.abs(la - lb) < 0.02, `${la} vs ${lb}`);
  } finally {
    await Deno.remove(base, { recursive: true });
  }
});

Deno.test("a bad checkpoint is a one-line error naming the file, and changes nothing", async () => {
  const base = await Deno.makeTempDir();
  try {
    using a = await trained();
    await a.exportHf(`${base}/good`, { dtype: "f32" });
    const bytes = await Deno.readFile(`${base}/good/model.safetensors`);
    await Deno.writeFile(`${base}/cut.safetensors`, bytes.subarray(0, bytes.length - 100));
    using b = await Engine.create(tinyConfig({ optimizer: "adamw", seed: 3 }));
    const held = batch(5);
    const before = await b.evalLoss(held, 1);
    await assert.rejects(() => b.importHf(`${base}/cut.safetensors`), (e: unknown) => {
      assert.ok(e instanceof EngineError);
      assert.equal(e.code, ErrorCode.invalid);
      assert.ok(!e.message.includes("\n"));
      assert.ok(e.message.startsWith(`${base}/cut.safetensors: `), e.message);
      assert.match(e.message, /truncated file or out-of-range offsets/);
      return true;
    });
    // another shape of model
    using wide = await Engine.create({
      ...tinyConfig(),
      model: { ...tinyConfig().model, intermediate_size: 384 },
    });
    await assert.rejects(
      () => wide.importHf(`${base}/good`),
      /model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[352, 128\], the config needs \[384, 128\]/,
    );
    assert.equal(await b.evalLoss(held, 1), before);
    const info = inspectSafetensors(`${base}/cut.safetensors`);
    assert.match(info.error ?? "", /cut\.safetensors: tensor .* ends at byte/);
    assert.deepEqual(info.tensors, []);
  } finally {
    await Deno.remove(base, { recursive: true });
  }
});

Deno.test("export refuses a non-empty folder and leaves it untouched", async () => {
  const base = await Deno.makeTempDir();
  try {
    using a = await trained();
    await Deno.mkdir(`${base}/mine`);
    await Deno.writeTextFile(`${base}/mine/notes.txt`, "keep");
    await assert.rejects(
      () => a.exportHf(`${base}/mine`, { dtype: "bf16" }),
      (e: unknown) => {
        assert.ok(e instanceof EngineError);
        assert.equal(
          e.message,
          `${base}/mine: folder is not empty; export writes only into a new or empty folder`,
        );
        return true;
      },
    );
    assert.deepEqual(names(`${base}/mine`), ["notes.txt"]);
    assert.equal(await Deno.readTextFile(`${base}/mine/notes.txt`), "keep");
    assert.deepEqual(names(base), ["mine"]);
  } finally {
    await Deno.remove(base, { recursive: true });
  }
});
