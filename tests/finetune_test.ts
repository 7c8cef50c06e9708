/**
 * The fine-tuning driver (lib/finetune.ts, examples/finetune.ts) on the tiny Hugging Face
 * fixture model with small generated JSONL files: counts, loss tokens per update, learning,
 * resume with the identical batches, and one-line errors from the CLI.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { Engine } from "../ffi/engine.ts";
import { finetune, type FinetuneOptions } from "../lib/finetune.ts";
import { FinetuneSampler, loadFinetuneData, splitFinetuneData } from "../lib/finetune_data.ts";
import { loadMultipleChoice, perplexity, scoreMultipleChoice } from "../lib/mmlu.ts";
import { OPTIMIZERS } from "../lib/options.ts";
import { openModel } from "../lib/open_model.ts";
import { openTokenizer } from "../lib/tokenizer.ts";
import { Rng } from "../lib/rng.ts";
import type { EvalRecord, StepRecord } from "../lib/run_types.ts";
import type { Summary } from "../lib/summary.ts";
import { train } from "../lib/trainer.ts";

const MODEL = new URL("./fixtures/hf/gqa-tied-theta5e5", import.meta.url).pathname;
const SCRIPT = new URL("../examples/finetune.ts", import.meta.url).pathname;
const SEQ = 16;

/**
 * `n` prompt/completion lines of a learnable task: the completion repeats the prompt's
 * words (a fixed function of the prompt). With the fixture's small vocabulary every example
 * is longer than SEQ + 1 tokens and loses the start of its prompt (never its answer).
 */
function lines(n: number, seed: number): string[] {
  const words = ["apple", "river", "stone", "cloud", "green", "house", "light", "music"];
  const rng = new Rng(seed);
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const a = words[rng.int(words.length)];
    const b = words[rng.int(words.length)];
    out.push(
      JSON.stringify({ prompt: `say ${a} ${b} twice:`, completion: ` ${a} ${b} ${a} ${b}` }),
    );
  }
  return out;
}

function readMetrics(out: string): Record<string, unknown>[] {
  return Deno.readTextFileSync(join(out, "metrics.jsonl")).split("\n").filter((l) => l !== "")
    .map((l) => JSON.parse(l));
}

const BASE = {
  model: MODEL,
  optimizer: "adamw",
  batchSize: 2,
  gradAccum: 2,
  seqLen: SEQ,
  device: "cpu" as const,
  threads: 1,
  quiet: true,
  handleSigint: false,
  saveEvery: "off",
};

Deno.test({
  name: "finetune: counts, loss tokens per update equal the sampler's, val loss falls",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ft-" });
    try {
      const data = join(dir, "train.jsonl");
      // two lines too long for SEQ + 1 tokens, even with the prompt cut: refused
      const long = JSON.stringify({ prompt: "hi", completion: " word".repeat(40) });
      Deno.writeTextFileSync(data, [...lines(41, 1), long, long].join("\n") + "\n");
      const out = join(dir, "run");
      const s: Summary = await finetune(
        { ...BASE, data, steps: 12, lr: 1e-2, evalEvery: 6, out },
      );
      const f = s.finetune as Record<string, Record<string, number>>;
      assert.equal(s.steps, 12);
      assert.equal(f.train.lines, 43);
      assert.equal(f.train.refused, 2);
      assert.equal(f.train.examples + f.val.examples, 41);
      assert.equal(f.val.examples, 4); // --val-fraction 0.1
      assert.equal(f.train.truncated, 41); // every example lost the start of its prompt

      // the loss tokens of each update are the sampler's counts, replayed
      const tok = openTokenizer(MODEL);
      const all = await loadFinetuneData(data, tok, { seqLen: SEQ, tooLong: "truncate" });
      const { train } = splitFinetuneData(all, 0.1, 0);
      const sampler = new FinetuneSampler(train, { batch: 2, micro: 2, seqLen: SEQ, seed: 0 });
      const steps = readMetrics(out).filter((m) => m.type === "step") as unknown as StepRecord[];
      assert.equal(steps.length, 12);
      let real = 0;
      for (const r of steps) {
        const b = sampler.next();
        assert.equal(b.t, SEQ);
        assert.equal(r.loss_tokens, b.count, `update ${r.step}`);
        // every example is a full window: a row holds SEQ real targets, a padding row none
        for (let row = 0; row < 4; row++) real += b.mask[row * (SEQ + 1) + SEQ] ? SEQ : 0;
        assert.equal(r.tokens, real);
      }
      // real tokens: the epoch's last update has a padding row, not counted
      assert.equal(s.tokens, real);
      assert.ok(real < 12 * 2 * 2 * SEQ);
      assert.ok(s.tokens_per_s > 0);
      // learning: the validation loss falls well below its start
      const v0 = s.initial_val_loss!;
      assert.ok(
        (f.val_loss as unknown as number) < v0 - 0.5,
        `val loss ${v0} → ${f.val_loss}`,
      );
      assert.equal(f.val_loss as unknown as number, s.val_loss);
      assert.ok(s.memory.total > 0 && s.memory.weights > 0);
      const sum = JSON.parse(Deno.readTextFileSync(join(out, "summary.json")));
      assert.equal(sum.finetune.train.refused, 2);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "finetune: a run stopped and resumed ends bit-exact with the uninterrupted one",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ft-" });
    try {
      const data = join(dir, "train.jsonl");
      Deno.writeTextFileSync(data, lines(30, 2).join("\n") + "\n");
      const val = join(dir, "val.jsonl");
      Deno.writeTextFileSync(val, lines(6, 3).join("\n") + "\n");
      const mc = new URL("./fixtures/mmlu/test/toy_science_test.jsonl", import.meta.url).pathname;
      const opts = { ...BASE, data, valData: val, steps: 10, lr: 5e-3, evalEvery: 4, mc };
      const whole = await finetune({ ...opts, out: join(dir, "whole") });
      // stopped after 3 updates (a checkpoint at the stop), then resumed to the end; the
      // sampler wraps into a second epoch (10 updates × 4 examples > 30)
      const stop = new AbortController();
      const part = join(dir, "part");
      const first = await finetune({ ...opts, out: part }, {
        signal: stop.signal,
        onStep: (r) => {
          if (r.step === 3) stop.abort();
        },
      });
      assert.equal(first.steps, 3);
      assert.ok(first.interrupted);
      const resumed = await finetune(
        { resume: part, quiet: true, handleSigint: false },
      );
      assert.equal(resumed.steps, 10);
      assert.equal(resumed.final_train_loss, whole.final_train_loss);
      assert.equal(resumed.val_loss, whole.val_loss);
      assert.equal(resumed.tokens, whole.tokens);
      const steps = (out: string) =>
        readMetrics(out).filter((m) => m.type === "step").map((m) => [m.loss, m.loss_tokens]);
      assert.deepEqual(steps(part), steps(join(dir, "whole")));
      const evals = (out: string) =>
        readMetrics(out).filter((m) => m.type === "eval").map((m) => [
          m.step,
          m.val_loss,
          m.mc_accuracy,
        ]);
      assert.deepEqual(evals(part), evals(join(dir, "whole")));
      assert.equal(evals(part).length, 4); // at 0, 4, 8 and the end
      const w = whole.finetune as Record<string, unknown>;
      const r = resumed.finetune as Record<string, unknown>;
      assert.equal(r.epochs, w.epochs);
      assert.ok((w.epochs as number) > 1);
      // other validation data, or resuming it as a pre-training run: refused, one line
      const other = join(dir, "other.jsonl");
      Deno.writeTextFileSync(other, lines(6, 9).join("\n") + "\n");
      await assert.rejects(
        finetune({ resume: part, valData: other, steps: 12, quiet: true }),
        /^UsageError: --resume .*part: the data changed since the checkpoint/,
      );
      // other training data: the sampler cannot continue on it
      Deno.writeTextFileSync(data, lines(30, 12).join("\n") + "\n");
      await assert.rejects(
        finetune({ resume: part, steps: 12, quiet: true }),
        /^UsageError: --resume .*part: the fine-tuning data is not the data of the checkpoint/,
      );
      await assert.rejects(
        train({ resume: part, steps: 12, quiet: true }),
        /a fine-tuning run; continue it with examples\/finetune\.ts --resume/,
      );
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "finetune: messages render with the model folder's chat template; loss on replies",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ft-" });
    try {
      // the fixture model with a chat template in its tokenizer_config.json
      const model = join(dir, "model");
      Deno.mkdirSync(model);
      for (const e of Deno.readDirSync(MODEL)) {
        Deno.copyFileSync(join(MODEL, e.name), join(model, e.name));
      }
      const cfg = JSON.parse(Deno.readTextFileSync(join(model, "tokenizer_config.json")));
      cfg.chat_template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}" +
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
      Deno.writeTextFileSync(join(model, "tokenizer_config.json"), JSON.stringify(cfg));
      const data = join(dir, "chat.jsonl");
      const rows = lines(20, 7).map((l) => {
        const { prompt, completion } = JSON.parse(l);
        return JSON.stringify({
          messages: [{ role: "user", content: prompt }, { role: "assistant", content: completion }],
        });
      });
      Deno.writeTextFileSync(data, rows.join("\n") + "\n");
      const s = await finetune(
        { ...BASE, model, data, steps: 2, lr: 1e-3, out: null },
      );
      const f = s.finetune as Record<string, Record<string, number | string>>;
      assert.equal(f.train.kind, "messages");
      assert.equal((f.train.examples as number) + (f.val.examples as number), 20);
      // the replies carry loss, the user turns do not
      assert.ok((f.train.lossTokens as number) > 0);
      assert.ok((f.train.lossTokens as number) < (f.train.tokens as number));
      // the fixture as it is has no chat template: a one-line error naming the file
      await assert.rejects(
        finetune({ ...BASE, data, steps: 2, out: null }),
        /^UsageError: --data .*chat\.jsonl.*chat template/,
      );
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "finetune: --mc scores the trained model as the exported one scores (k-shot, --mc-dev)",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ft-" });
    try {
      const data = join(dir, "train.jsonl");
      Deno.writeTextFileSync(data, lines(12, 8).join("\n") + "\n");
      const mc = new URL("./fixtures/mmlu/test/toy_science_test.csv", import.meta.url).pathname;
      const dev = new URL("./fixtures/mmlu/dev/toy_science_dev.csv", import.meta.url).pathname;
      const exported = join(dir, "export");
      const evals: EvalRecord[] = [];
      const s = await finetune({
        ...BASE,
        seqLen: 128,
        data,
        steps: 3,
        lr: 1e-2,
        mc,
        mcShots: 1,
        mcDev: dev,
        export: exported,
        exportDtype: "f32",
        out: null,
      }, { onEval: (r) => void evals.push(r) });
      const got = (s.finetune as { mc: Record<string, number> }).mc;
      const items = await loadMultipleChoice(mc);
      using m = await openModel({ model: exported, batchSize: 2, seqLen: 128, threads: 1 });
      const want = await scoreMultipleChoice(m.engine, m.tokenizer, items, {
        shots: 1,
        dev: await loadMultipleChoice(dev),
        batch: 2,
        seqLen: 128,
      });
      assert.equal(got.total, items.length);
      assert.equal(got.correct, want.correct);
      assert.equal(got.accuracy, want.accuracy);
      assert.equal(got.chance, 0.25);
      assert.equal(got.shots, 1);
      // the trained model is not the base model: the scores moved
      using base = await openModel({ model: MODEL, batchSize: 2, seqLen: 128, threads: 1 });
      const before = await scoreMultipleChoice(base.engine, base.tokenizer, items, {
        shots: 1,
        dev: await loadMultipleChoice(dev),
        batch: 2,
        seqLen: 128,
      });
      assert.notDeepEqual(before.scores, want.scores);
      // scored at each evaluation: the base model's before training, the final one at the end
      assert.equal(evals.length, 2);
      assert.equal(evals[0].mc_accuracy, before.accuracy);
      assert.equal(evals[1].mc_accuracy, want.accuracy);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "finetune: lora and qlora train adapters; merged export, resume bit-exact, adapters",
  sanitizeResources: false,
  ignore: !OPTIMIZERS.includes("lora"), // the engine's adapter methods (interface B)
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ft-" });
    try {
      const data = join(dir, "train.jsonl");
      Deno.writeTextFileSync(data, lines(30, 10).join("\n") + "\n");
      const val = join(dir, "val.jsonl");
      Deno.writeTextFileSync(val, lines(6, 11).join("\n") + "\n");
      for (const optimizer of ["lora", "qlora"]) {
        const opts = {
          ...BASE,
          optimizer,
          seqLen: 32,
          data,
          valData: val,
          steps: 8,
          lr: 1e-2,
          evalEvery: 0,
          loraRank: 4,
          loraTargets: "all-linear",
        } as Partial<FinetuneOptions>;
        const exported = join(dir, `${optimizer}-export`);
        const whole = await finetune({
          ...opts,
          out: join(dir, optimizer),
          // --merge is --export for the adapter methods
          ...(optimizer === "lora" ? { merge: exported } : { export: exported }),
          exportDtype: "f32",
        });
        // adapters only: the base is frozen (no gradients or state for it)
        const mem = whole.memory as unknown as Record<string, number>;
        assert.ok(mem.adapters > 0, optimizer);
        assert.equal(mem.grads, mem.adapters, optimizer);
        assert.ok(whole.val_loss! < whole.initial_val_loss! - 0.3, optimizer);
        // the merged export computes the adapted model's validation loss
        using m = await openModel({ model: exported, batchSize: 2, seqLen: 32, threads: 1 });
        const tok = openTokenizer(MODEL);
        const v = await loadFinetuneData(val, tok, { seqLen: 32 });
        const p = await perplexity(m.engine, v, 2, 32);
        assert.ok(
          Math.abs(p.loss - whole.val_loss!) < 1e-4,
          `${optimizer}: ${p.loss} vs ${whole.val_loss}`,
        );
        // stopped after 3 updates and resumed: the same adapters, the same losses
        const stop = new AbortController();
        const part = join(dir, `${optimizer}-part`);
        await finetune({ ...opts, out: part }, {
          signal: stop.signal,
          onStep: (r) => {
            if (r.step === 3) stop.abort();
          },
        });
        const resumed = await finetune({ resume: part, quiet: true, handleSigint: false });
        assert.equal(resumed.final_train_loss, whole.final_train_loss, optimizer);
        assert.equal(resumed.val_loss, whole.val_loss, optimizer);
      }
      // --save-adapter: PEFT files, or (before the engine writes them) a one-line refusal
      const adapter = join(dir, "adapter");
      const run = finetune({
        ...BASE,
        optimizer: "lora",
        seqLen: 32,
        data,
        valData: val,
        steps: 3,
        lr: 1e-2,
        loraRank: 4,
        loraTargets: "all-linear",
        saveAdapter: adapter,
        out: null,
      });
      if ("saveAdapter" in Engine.prototype) {
        const s = await run;
        assert.equal((s.finetune as Record<string, unknown>).adapter_saved, adapter);
        assert.ok(exists(join(adapter, "adapter_config.json")));
        assert.ok(exists(join(adapter, "adapter_model.safetensors")));
        // --adapter continues from it with the adapter's own settings (rank 4, all-linear;
        // not the defaults): its first validation is the saved run's last
        const next = await finetune({
          ...BASE,
          optimizer: undefined, // lora, from the adapter
          seqLen: 32,
          data,
          valData: val,
          steps: 1,
          adapter,
          out: null,
        });
        assert.equal((next.finetune as Record<string, unknown>).adapter_from, adapter);
        assert.ok(
          Math.abs(next.initial_val_loss! - s.val_loss!) < 1e-5,
          `${next.initial_val_loss} vs ${s.val_loss}`,
        );
      } else {
        await assert.rejects(run, /^UsageError: --save-adapter .*adapter: this build's engine/);
      }
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

const dec = new TextDecoder();

async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", SCRIPT, ...args],
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: r.code, stdout: dec.decode(r.stdout), stderr: dec.decode(r.stderr) };
}

Deno.test({
  name: "finetune CLI: bad flags and data are one-line errors with exit code 2",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ft-cli-" });
    try {
      const good = join(dir, "good.jsonl");
      Deno.writeTextFileSync(good, lines(10, 4).join("\n") + "\n");
      const bad = join(dir, "bad.jsonl");
      Deno.writeTextFileSync(bad, `${lines(1, 5)[0]}\n{"question": "no fields"}\n`);
      const out = join(dir, "out");
      const cases: [string[], RegExp][] = [
        [[], /^error: --model and --data: required/],
        [["--data", good], /^error: --model: required/],
        [["--model", join(dir, "nope"), "--data", good], /^error: --model .*nope: not found/],
        [
          ["--model", good, "--data", good],
          /^error: --model .*good\.jsonl: must be a Hugging Face/,
        ],
        [["--model", MODEL], /^error: --data: required/],
        [["--model", MODEL, "--data", bad, "--out", out], /^error: --data .*bad\.jsonl.*:2: /],
        [
          ["--model", MODEL, "--data", join(dir, "x.jsonl")],
          /^error: --data .*x\.jsonl: not found/,
        ],
        [["--model", MODEL, "--data", good, "--init-from", MODEL], /^error: --init-from .*--model/],
        [["--model", MODEL, "--data", good, "--lr", "-1"], /^error: --lr -1: must be/],
        [
          ["--model", MODEL, "--data", good, "--too-long", "cut"],
          /^error: --too-long cut: must be one of truncate, refuse/,
        ],
        [
          ["--model", MODEL, "--data", good, "--save-adapter", join(dir, "a")],
          /^error: --save-adapter .*: applies only to --optimizer lora, qlora \(not adamw\)/,
        ],
        [["--model", MODEL, "--data", good, "--mc-shots", "2"], /^error: --mc-shots 2: needs --mc/],
        [
          ["--model", MODEL, "--data", good, "--mc", good, "--mc-shots", "2"],
          /^error: --mc-shots 2: needs --mc-dev/,
        ],
        [
          ["--model", MODEL, "--data", good, "--mc", join(dir, "none.csv"), "--out", out],
          /^error: --mc .*none\.csv: not found/,
        ],
        [["--model", MODEL, "--data", good, "--bogus", "1"], /^error: --bogus: unknown flag/],
        [
          ["--model", MODEL, "--data", good, "--merge", join(dir, "m")],
          /^error: --merge .*: applies only to --optimizer lora, qlora \(not adamw\)/,
        ],
        [
          [
            "--model",
            MODEL,
            "--data",
            good,
            "--optimizer",
            "lora",
            "--merge",
            join(dir, "m"),
            "--export",
            join(dir, "e"),
          ],
          /^error: --merge .*: give --merge or --export, not both/,
        ],
      ];
      for (const [args, want] of cases) {
        const r = await cli(args);
        assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
        const errLines = r.stderr.trim().split("\n");
        assert.equal(errLines.length, 1, r.stderr);
        assert.match(errLines[0], want, args.join(" "));
      }
      // a refused set-up leaves no run folder
      assert.ok(!exists(out));
      const help = await cli(["--help"]);
      assert.equal(help.code, 0);
      assert.match(help.stdout, /--model DIR/);
      assert.match(help.stdout, /--val-data FILE/);
      assert.doesNotMatch(help.stdout, /--init-from|--eval-batches|--train-tokenizer/);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "finetune CLI: a short run prints its summary as JSON",
  sanitizeResources: false,
  fn: async () => {
    const dir = Deno.makeTempDirSync({ prefix: "qgalore-ft-cli-" });
    try {
      const data = join(dir, "train.jsonl");
      Deno.writeTextFileSync(data, lines(12, 6).join("\n") + "\n");
      const r = await cli([
        "--model",
        MODEL,
        "--data",
        data,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--out",
        join(dir, "run"),
        "--json",
      ]);
      assert.equal(r.code, 0, r.stderr);
      const s = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
      assert.equal(s.steps, 2);
      assert.equal(s.config.lr, 2e-5); // fine-tuning's default for adamw
      assert.equal(s.finetune.train.examples + s.finetune.val.examples, 12);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

function exists(p: string): boolean {
  try {
    Deno.lstatSync(p);
    return true;
  } catch {
    return false;
  }
}
