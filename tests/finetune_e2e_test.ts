/**
 * End to end: the synthetic multiple-choice task (lib/synthetic_mc.ts) through all seven
 * fine-tuning methods on the tiny Hugging Face fixture model, with the comparison driver of
 * examples/finetune_compare.ts in this process. The base is first warmed up (full AdamW on
 * the format with other groups and on the task's facts without the format), so it starts at
 * chance on the task; every method must then raise multiple-choice accuracy well above
 * chance on 48 held-out questions and lower the validation loss, and the table's bytes must
 * be each method's: adapters only for LoRA/QLoRA, projectors only for the GaLore family,
 * QLoRA's NF4 base smaller than LoRA's.
 */
import assert from "node:assert/strict";
import {
  compareMethods,
  defaultCompareOptions,
  METHODS,
  SYNTHETIC_LR,
} from "../examples/finetune_compare.ts";

const MODEL = new URL("./fixtures/hf/gqa-tied-theta5e5", import.meta.url).pathname;

Deno.test({
  name: "finetune e2e: every method learns the synthetic multiple-choice task",
  sanitizeResources: false,
  fn: async () => {
    const r = await compareMethods({
      ...defaultCompareOptions(),
      model: MODEL,
      synthetic: { train: 600, test: 48, order: "fixed" },
      warmSteps: 600,
      steps: 200,
      batchSize: 8,
      seqLen: 128,
      seed: 1,
      threads: 1,
      // the fixture's k/v matrices are 16 × 32: group sizes that divide its projectors
      projGroupSize: 32,
      weightGroupSize: 32,
      // the fixture is a random-init model: the rates measured for that, not fine-tuning's
      lr: { ...SYNTHETIC_LR },
      isolate: false,
      verbose: false,
    });
    assert.match(r.base, /its accuracy on the task: /);
    const base = Number(/its accuracy on the task: ([\d.]+)%/.exec(r.base)![1]) / 100;
    assert.ok(base <= 0.4, `the warmed-up base starts near chance (${base})`);
    assert.deepEqual(r.rows.map((x) => x.method), [...METHODS]);
    const report = r.rows.map((x) =>
      `${x.method} ${x.initial_val_loss?.toFixed(3)}→${x.val_loss?.toFixed(3)} ` +
      `acc ${x.mc?.accuracy.toFixed(3)}`
    ).join("; ");
    for (const x of r.rows) {
      assert.equal(x.error, null, `${x.method}: ${x.error}`);
      assert.equal(x.mc!.total, 48);
      assert.equal(x.mc!.chance, 0.25);
      assert.ok(x.mc!.accuracy >= 0.5, `${x.method}: accuracy ${x.mc!.accuracy} (${report})`);
      assert.ok(x.val_loss! < x.initial_val_loss! - 0.2, `${x.method}: val loss (${report})`);
      assert.ok(x.tokens_per_s > 0);
      const adapter = x.method === "lora" || x.method === "qlora";
      const projected = x.method.includes("galore");
      assert.equal(x.adapters > 0, adapter, `${x.method} adapters ${x.adapters}`);
      assert.equal(x.projector > 0, projected, `${x.method} projector ${x.projector}`);
    }
    console.log(report);
    const by = Object.fromEntries(r.rows.map((x) => [x.method, x]));
    // the fixture's frozen f32 embedding (600 × 32) is most of both bases; NF4 shrinks the rest
    assert.ok(by.qlora.weights < by.lora.weights, "NF4 base smaller than the f32 base");
    assert.equal(by.qlora.adapters, by.lora.adapters);
    assert.ok(by.qgalore.weights < by.galore.weights, "INT8 weights");
    // (bitsandbytes keeps tensors under 4096 elements in f32: most of this tiny model)
    assert.ok(by.adam8bit.optimizer_state < by.adamw.optimizer_state);
  },
});

Deno.test("finetune_compare CLI: bad flags are one-line errors with exit code 2", async () => {
  const script = new URL("../examples/finetune_compare.ts", import.meta.url).pathname;
  const cases: [string[], RegExp][] = [
    [["--methods", "adamw,sgd"], /^error: --methods adamw,sgd: unknown method sgd; allowed: /],
    [["--lr", "lora=0"], /^error: --lr lora=0: 0 is not a number > 0/],
    [["--mc", "x.csv"], /^error: --mc x.csv: needs --data/],
    [["--model", MODEL, "--preset", "llama-9m"], /^error: --preset llama-9m: not with --model/],
    [["--data", "x.jsonl", "--order", "shuffled"], /^error: --order shuffled: only with/],
  ];
  for (const [args, want] of cases) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", script, ...args],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 2, `${args.join(" ")}: ${err}`);
    assert.match(err, want);
    assert.equal(err.trim().split("\n").length, 1, err);
  }
});
