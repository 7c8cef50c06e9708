import assert from "node:assert/strict";
import { join } from "node:path";
import { UsageError } from "../lib/errors.ts";
import {
  loadModelConfig,
  type ModelConfig,
  modelConfig,
  PRESET_NAMES,
  resolveModel,
  validateModel,
} from "../lib/presets.ts";
import { paramCount } from "../lib/estimate.ts";

Deno.test("paper parameter totals with the T5 vocabulary (docs/algorithm-spec.md §3, I-14)", () => {
  const expected: Record<string, number> = {
    "llama-60m": 58.07,
    "llama-130m": 134.11,
    "llama-350m": 367.97,
    "llama-1b": 1339.08,
    "llama-7b": 6738.42,
  };
  for (const [name, millions] of Object.entries(expected)) {
    const got = paramCount(modelConfig(name, 32000)) / 1e6;
    assert.ok(Math.abs(got - millions) <= 0.005, `${name}: ${got.toFixed(4)}M vs ${millions}M`);
  }
  assert.equal(paramCount(modelConfig("llama-60m", 32000)), 58_073_600);
});

Deno.test("byte-vocabulary presets", () => {
  assert.equal(paramCount(modelConfig("llama-20m", 256)), 3_295_488);
  assert.equal((paramCount(modelConfig("llama-20m", 256)) / 1e6).toFixed(2), "3.30");
  const c = modelConfig("llama-9m", 256);
  assert.deepEqual(c, {
    vocab_size: 256,
    hidden_size: 128,
    intermediate_size: 352,
    num_attention_heads: 4,
    num_key_value_heads: 4,
    num_hidden_layers: 4,
    max_position_embeddings: 2048,
    rope_theta: 10000,
    rms_norm_eps: 1e-6,
    initializer_range: 0.02,
    head_dim: 32,
    rope_scaling: null,
    tie_word_embeddings: false,
  });
});

Deno.test("every preset validates and matches the reference shapes", () => {
  const shapes: Record<string, number[]> = {
    "llama-9m": [128, 352, 4, 4],
    "llama-20m": [256, 688, 4, 4],
    "llama-35m": [384, 1024, 8, 6],
    "llama-60m": [512, 1376, 8, 8],
    "llama-130m": [768, 2048, 12, 12],
    "llama-350m": [1024, 2736, 16, 24],
    "llama-1b": [2048, 5461, 32, 24],
    "llama-7b": [4096, 11008, 32, 32],
  };
  assert.deepEqual([...PRESET_NAMES], Object.keys(shapes));
  for (const [name, [h, i, heads, layers]] of Object.entries(shapes)) {
    const c = modelConfig(name, 256);
    validateModel(c);
    assert.deepEqual(
      [c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers],
      [h, i, heads, layers],
    );
    assert.equal(c.num_key_value_heads, heads);
  }
});

Deno.test("GQA key/value heads shrink the parameter count", () => {
  const c = { ...modelConfig("llama-60m", 32000), num_key_value_heads: 2 };
  // k and v lose 3/4 of their 512×512 weights in each of 8 layers.
  assert.equal(paramCount(c), 58_073_600 - 8 * 2 * 512 * 384);
});

function bad(cfg: Partial<ModelConfig>, pattern: RegExp): void {
  // head_dim is derived from the width and heads: an edited config drops it
  const { head_dim: _, ...base } = modelConfig("llama-9m", 256);
  const c = { ...base, ...cfg };
  assert.throws(() => validateModel(c, "--model x.json"), (e: unknown) => {
    assert.ok(e instanceof UsageError);
    assert.match(e.message, /^--model x\.json: /);
    assert.match(e.message, pattern);
    assert.ok(!e.message.includes("\n"));
    return true;
  });
}

Deno.test("validateModel names the offending field", () => {
  bad({ num_attention_heads: 5 }, /num_attention_heads 5 must divide hidden_size 128/);
  bad({ num_key_value_heads: 3 }, /num_key_value_heads 3 must divide num_attention_heads 4/);
  bad({ hidden_size: 132, num_attention_heads: 4 }, /head dim 33 .* must be even/);
  bad({ num_hidden_layers: 0 }, /num_hidden_layers 0 must be an integer ≥ 1/);
  bad({ intermediate_size: 1.5 }, /intermediate_size 1\.5 must be an integer ≥ 1/);
  bad({ vocab_size: -1 }, /vocab_size -1/);
  bad({ rms_norm_eps: 0 }, /rms_norm_eps 0 must be > 0/);
});

Deno.test("JSON configs: reference file, defaults, vocab override", () => {
  const dir = Deno.makeTempDirSync();
  try {
    // Verbatim shape of the reference repository's configs/llama_9m.json.
    const ref = join(dir, "llama_9m.json");
    Deno.writeTextFileSync(
      ref,
      JSON.stringify({
        architectures: ["LLaMAForCausalLM"],
        bos_token_id: 0,
        eos_token_id: 1,
        hidden_act: "silu",
        hidden_size: 128,
        intermediate_size: 352,
        initializer_range: 0.02,
        max_sequence_length: 1024,
        model_type: "llama",
        num_attention_heads: 4,
        num_hidden_layers: 4,
        pad_token_id: -1,
        rms_norm_eps: 1e-06,
        transformers_version: "4.28.1",
        use_cache: true,
        vocab_size: 32000,
      }),
    );
    assert.deepEqual(loadModelConfig(ref), modelConfig("llama-9m", 32000));
    // the file's vocabulary is kept: its embedding is sized for its tokenizer
    assert.deepEqual(loadModelConfig(ref, 256), modelConfig("llama-9m", 32000));
    const r = resolveModel(ref, 256);
    assert.equal(r.name, ref);
    assert.equal(r.dir, undefined);
    assert.deepEqual(r.config, modelConfig("llama-9m", 32000));
    assert.throws(
      () => resolveModel(ref, 32001, `--model ${ref}`),
      (e: unknown) => {
        assert.ok(e instanceof UsageError);
        assert.equal(
          e.message,
          `--model ${ref}: vocab_size 32000 is smaller than the tokenizer's vocabulary of 32001 tokens`,
        );
        return true;
      },
    );

    const custom = join(dir, "custom.json");
    Deno.writeTextFileSync(
      custom,
      JSON.stringify({
        vocab_size: 1000,
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        num_hidden_layers: 2,
        max_position_embeddings: 512,
        rope_theta: 500000,
      }),
    );
    const c = loadModelConfig(custom);
    assert.equal(c.vocab_size, 1000);
    assert.equal(c.num_key_value_heads, 2);
    assert.equal(c.max_position_embeddings, 512);
    assert.equal(c.rope_theta, 500000);
    assert.equal(c.rms_norm_eps, 1e-6);
    assert.equal(c.initializer_range, 0.02);
    assert.equal(loadModelConfig(custom, 256).vocab_size, 1000);
    // without vocab_size, the tokenizer's
    const novocab = join(dir, "novocab.json");
    Deno.writeTextFileSync(
      novocab,
      JSON.stringify({
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_hidden_layers: 2,
      }),
    );
    assert.equal(resolveModel(novocab, 300).config.vocab_size, 300);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("JSON config errors name the file and field", () => {
  const dir = Deno.makeTempDirSync();
  const write = (name: string, body: string) => {
    const p = join(dir, name);
    Deno.writeTextFileSync(p, body);
    return p;
  };
  const cases: [string, RegExp][] = [
    [
      write(
        "heads.json",
        '{"hidden_size":128,"intermediate_size":352,"num_attention_heads":3,"num_hidden_layers":2}',
      ),
      /--model .*heads\.json: num_attention_heads 3 must divide hidden_size 128/,
    ],
    [write("syntax.json", "{hidden_size: 1"), /--model .*syntax\.json: invalid JSON/],
    [
      write("missing.json", '{"hidden_size":128}'),
      /--model .*missing\.json: missing field intermediate_size/,
    ],
    [
      write(
        "type.json",
        '{"hidden_size":"128","intermediate_size":352,"num_attention_heads":4,"num_hidden_layers":2}',
      ),
      /hidden_size "128" must be a number/,
    ],
    [
      write(
        "act.json",
        '{"hidden_act":"gelu","hidden_size":128,"intermediate_size":352,"num_attention_heads":4,"num_hidden_layers":2}',
      ),
      /hidden_act "gelu" must be "silu" \(other activations are not implemented\)/,
    ],
    [write("array.json", "[1,2]"), /must be a JSON object/],
    [join(dir, "nope.json"), /--model .*nope\.json: file not found/],
  ];
  try {
    for (const [path, pattern] of cases) {
      assert.throws(() => resolveModel(path, 256, `--model ${path}`), (e: unknown) => {
        assert.ok(e instanceof UsageError, String(e));
        assert.match(e.message, pattern);
        return true;
      });
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("unknown preset lists the allowed names", () => {
  assert.throws(() => resolveModel("llama-3m", 256, "--model llama-3m"), (e: unknown) => {
    assert.ok(e instanceof UsageError);
    assert.match(e.message, /^--model llama-3m: unknown preset; allowed: llama-9m, llama-20m, /);
    assert.match(e.message, /llama-7b/);
    return true;
  });
  assert.throws(() => modelConfig("gpt2", 256), /model gpt2: unknown preset/);
});

/** A Llama-3.1-style `config.json` (small) as transformers 4.x writes it. */
const LLAMA31_OLD = {
  architectures: ["LlamaForCausalLM"],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
  head_dim: 16,
  hidden_act: "silu",
  hidden_size: 64,
  initializer_range: 0.02,
  intermediate_size: 128,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: "llama",
  num_attention_heads: 4,
  num_hidden_layers: 2,
  num_key_value_heads: 2,
  pretraining_tp: 1,
  rms_norm_eps: 1e-05,
  rope_scaling: {
    factor: 8.0,
    high_freq_factor: 4.0,
    low_freq_factor: 1.0,
    original_max_position_embeddings: 8192,
    rope_type: "llama3",
  },
  rope_theta: 500000.0,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  transformers_version: "4.43.0.dev0",
  use_cache: true,
  vocab_size: 1000,
};

/** The same model in transformers 5.24's layout (`rope_parameters` holds rope_theta). */
function llama31New(): Record<string, unknown> {
  const { rope_scaling, rope_theta, torch_dtype: _, ...rest } = LLAMA31_OLD;
  return {
    ...rest,
    dtype: "bfloat16",
    rope_parameters: { ...rope_scaling, rope_theta },
    transformers_version: "5.24.0",
  };
}

Deno.test("Hugging Face folders and config.json in both RoPE layouts", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const oldDir = join(dir, "old");
    const newDir = join(dir, "new");
    Deno.mkdirSync(oldDir);
    Deno.mkdirSync(newDir);
    Deno.writeTextFileSync(join(oldDir, "config.json"), JSON.stringify(LLAMA31_OLD));
    Deno.writeTextFileSync(join(newDir, "config.json"), JSON.stringify(llama31New()));
    const a = resolveModel(oldDir, 256, `--model ${oldDir}`);
    const b = resolveModel(newDir, 256);
    assert.equal(a.dir, oldDir);
    assert.equal(b.dir, newDir);
    assert.equal(a.name, oldDir);
    assert.deepEqual(a.config, b.config);
    assert.deepEqual(a.config, {
      vocab_size: 1000,
      hidden_size: 64,
      intermediate_size: 128,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      num_hidden_layers: 2,
      max_position_embeddings: 131072,
      rope_theta: 500000,
      rms_norm_eps: 1e-5,
      initializer_range: 0.02,
      head_dim: 16,
      rope_scaling: {
        rope_type: "llama3",
        factor: 8,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 8192,
      },
      tie_word_embeddings: true,
    });
    // the filled config validates as it is
    validateModel(a.config);
    // the file itself, too
    assert.deepEqual(loadModelConfig(join(newDir, "config.json")), a.config);

    const empty = join(dir, "empty");
    Deno.mkdirSync(empty);
    assert.throws(
      () => resolveModel(empty, 256, `--model ${empty}`),
      (e: unknown) => {
        assert.ok(e instanceof UsageError);
        assert.equal(e.message, `--model ${empty}/config.json: no config.json in this folder`);
        return true;
      },
    );
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("settings the engine does not implement are one-line errors naming the field", () => {
  const dir = Deno.makeTempDirSync();
  try {
    const cases: [Record<string, unknown>, string][] = [
      [{ attention_bias: true }, "attention_bias true must be false (biases are not implemented)"],
      [{ mlp_bias: true }, "mlp_bias true must be false (biases are not implemented)"],
      [
        { hidden_act: "gelu" },
        'hidden_act "gelu" must be "silu" (other activations are not implemented)',
      ],
      [
        { model_type: "mistral" },
        'model_type "mistral" must be "llama" (other architectures are not implemented)',
      ],
      [
        { head_dim: 64 },
        "head_dim 64 must equal hidden_size / num_attention_heads = 16 (other head sizes are not implemented)",
      ],
      [
        { rope_parameters: { rope_type: "yarn", factor: 4, rope_theta: 10000 } },
        'rope_parameters.rope_type "yarn" must be one of "default", "linear", "llama3" (other RoPE types are not implemented)',
      ],
      [
        { rope_parameters: { ...LLAMA31_OLD.rope_scaling, factor: 0 } },
        "rope_parameters.factor 0 must be > 0",
      ],
      [{ tie_word_embeddings: "yes" }, 'tie_word_embeddings "yes" must be true or false'],
    ];
    for (const [change, message] of cases) {
      const path = join(dir, "config.json");
      Deno.writeTextFileSync(path, JSON.stringify({ ...llama31New(), ...change }));
      assert.throws(() => resolveModel(path, 256, "--model m.json"), (e: unknown) => {
        assert.ok(e instanceof UsageError, String(e));
        assert.equal(e.message, `--model m.json: ${message}`);
        return true;
      });
    }
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
