/** The ablation example: flags, a tiny real run of two optimizers, the table and --json. */
import assert from "node:assert/strict";
import {
  defaultAblationOptions,
  formatTable,
  parseAblationArgs,
  runAblation,
} from "../examples/ablation.ts";
import { UsageError } from "../lib/errors.ts";
import { OPTIMIZERS } from "../lib/options.ts";

Deno.test("ablation: flags and their errors", () => {
  assert.equal(parseAblationArgs(["--help"]), "help");
  const d = parseAblationArgs([]);
  assert.deepEqual(d, defaultAblationOptions());
  assert.deepEqual(defaultAblationOptions().optimizers, [...OPTIMIZERS]);
  assert.ok(defaultAblationOptions().rank < 128, "rank below llama-9m's width");
  const o = parseAblationArgs([
    "--model",
    "llama-20m",
    "--steps",
    "5",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--rank",
    "64",
    "--update-gap",
    "2",
    "--seed",
    "3",
    "--optimizers",
    "adamw, qgalore",
    "--json",
  ]);
  assert.notEqual(o, "help");
  assert.deepEqual(o, {
    model: "llama-20m",
    steps: 5,
    batchSize: 2,
    seqLen: 16,
    rank: 64,
    updateGap: 2,
    data: null,
    seed: 3,
    optimizers: ["adamw", "qgalore"],
    json: true,
  });
  const bad = (argv: string[], re: RegExp) =>
    assert.throws(() => parseAblationArgs(argv), (e: unknown) => {
      assert.ok(e instanceof UsageError, String(e));
      assert.match(e.message, re);
      return true;
    });
  bad(["--rank", "0"], /^--rank 0: must be an integer ≥ 1/);
  bad(["--steps", "x"], /^--steps x: must be an integer ≥ 1/);
  bad(["--optimizers", "adamw,sgd"], /^--optimizers adamw,sgd: a comma-separated list of adamw/);
  bad(["--model", "llama-3m"], /^--model llama-3m: unknown preset/);
  bad(["--rank", "3"], /^--proj-group-size 256 \(default\): does not divide/);
  bad(["--bogus"], /bogus/);
});

Deno.test("ablation: a tiny run of two optimizers, table and rows", async () => {
  const lines: string[] = [];
  const rows = await runAblation(
    {
      ...defaultAblationOptions(),
      steps: 10,
      batchSize: 2,
      seqLen: 16,
      rank: 16,
      updateGap: 4,
      optimizers: ["adamw", "qgalore"],
    },
    (l) => void lines.push(l),
  );
  assert.deepEqual(rows.map((r) => r.optimizer), ["adamw", "qgalore"]);
  assert.equal(lines.length, 2);
  const [a, q] = rows;
  assert.equal(a.svd_count, 0);
  assert.equal(q.svd_count, 28 * 3); // refreshes at updates 0, 4 and 8
  assert.equal(a.memory.projector, 0);
  assert.ok(q.memory.projector > 0);
  assert.equal(
    q.weights_opt_projector,
    q.memory.weights + q.memory.optimizer_state +
      q.memory.projector,
  );
  assert.ok(q.weights_opt_projector < a.weights_opt_projector / 4);
  // Ten updates of 2×16 tokens are too few to judge qgalore's loss (its default lr is tuned
  // for a 30-update warmup); the convergence test does that.
  assert.ok(a.val_loss! < a.initial_val_loss!);
  for (const r of rows) assert.ok(Number.isFinite(r.val_loss) && r.tokens_per_s > 0);
  const table = formatTable(rows).split("\n");
  assert.match(table[0], /^optimizer +lr +val loss +ppl +weights +grads +opt state +projector/);
  assert.match(table[0], /W\+O\+P +total +tok\/s +SVDs$/);
  assert.match(table[2], /^adamw +0\.005 +\d\.\d{4} /);
  assert.match(table[3], /^qgalore +0\.04 +\d\.\d{4} .* 84$/);
  // Aligned: every row of the table has the same width.
  assert.equal(new Set(table.slice(0, 4).map((l) => l.length)).size, 1);
});
