/**
 * The synthetic multiple-choice task (lib/synthetic_mc.ts): deterministic from its seed,
 * answers that are the keyword's group, training prompts that are exactly the MMLU zero-shot
 * prompts the scorer builds, test questions never seen in training, and files that the
 * fine-tuning data loader and the multiple-choice reader take back unchanged.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { loadMultipleChoice, mmluPrompt, parseMmluCsv } from "../lib/mmlu.ts";
import { UsageError } from "../lib/errors.ts";
import {
  itemsCsv,
  knowledgePairs,
  SYNTHETIC_GROUPS,
  syntheticMc,
  WARMUP_GROUPS,
  writeSyntheticMc,
} from "../lib/synthetic_mc.ts";

Deno.test("synthetic_mc: same seed same task, another seed another", () => {
  const a = syntheticMc({ seed: 7, train: 50, test: 20 });
  const b = syntheticMc({ seed: 7, train: 50, test: 20 });
  const c = syntheticMc({ seed: 8, train: 50, test: 20 });
  assert.deepEqual(a, b);
  assert.notDeepEqual(a.test, c.test);
  // the test set does not depend on the size of the training set
  assert.deepEqual(syntheticMc({ seed: 7, train: 200, test: 20 }).test, a.test);
});

Deno.test("synthetic_mc: the answer is the keyword's group; prompts are MMLU's", () => {
  for (const order of ["fixed", "shuffled"] as const) {
    const t = syntheticMc({ seed: 3, train: 300, test: 100, order });
    assert.equal(t.train.length, 300);
    assert.equal(t.test.length, 100);
    const letters = new Set<number>();
    for (const item of t.test) {
      const word = /"([a-z]+)"/.exec(item.question)![1];
      const group = Object.keys(SYNTHETIC_GROUPS).find((g) => SYNTHETIC_GROUPS[g].includes(word));
      assert.equal(item.choices[item.answer], group);
      assert.equal(item.choices.length, 4);
      assert.deepEqual([...item.choices].sort(), Object.keys(SYNTHETIC_GROUPS).sort());
      if (order === "fixed") assert.deepEqual(item.choices, Object.keys(SYNTHETIC_GROUPS));
      letters.add(item.answer);
    }
    assert.equal(letters.size, 4, "every letter is an answer somewhere");
    // validation pairs are the test questions' prompts with their letters
    t.test.forEach((item, i) => {
      assert.equal(t.val[i].prompt, mmluPrompt(item, []));
      assert.equal(t.val[i].completion, ` ${"ABCD"[item.answer]}`);
      assert.ok(t.val[i].prompt.endsWith("\nAnswer:"));
      assert.ok(
        t.val[i].prompt.startsWith(
          "The following are multiple choice questions (with answers) about  word groups.\n\n",
        ),
      );
    });
    // no test question appears among the training prompts
    const trainPrompts = new Set(t.train.map((p) => p.prompt));
    for (const v of t.val) assert.ok(!trainPrompts.has(v.prompt));
  }
});

Deno.test("synthetic_mc: written files read back as the same items and pairs", async () => {
  const dir = Deno.makeTempDirSync({ prefix: "qgalore-synth-" });
  try {
    const t = syntheticMc({ seed: 11, train: 30, test: 12, order: "shuffled" });
    const f = await writeSyntheticMc(join(dir, "task"), t);
    assert.deepEqual(await loadMultipleChoice(f.test), t.test);
    const lines = Deno.readTextFileSync(f.train).trimEnd().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(lines, t.train);
    // the CSV form (MMLU's columns) carries the same questions; quotes survive
    const csv = parseMmluCsv(itemsCsv(t.test), "x.csv", "word_groups");
    assert.deepEqual(csv, t.test);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("synthetic_mc: bad counts and orders are one-line errors", () => {
  assert.throws(() => syntheticMc({ seed: 1, train: 0, test: 5 }), UsageError);
  assert.throws(() => syntheticMc({ seed: 1, train: 5, test: 1.5 }), /test count 1.5/);
  assert.throws(
    () => syntheticMc({ seed: 1, train: 5, test: 5, order: "random" as "fixed" }),
    /fixed or shuffled/,
  );
  assert.throws(() => syntheticMc({ seed: 1, train: 5, test: 100_000 }), /covers every question/);
});

Deno.test("synthetic_mc: facts name the keyword's group without choices; other groups", () => {
  const facts = knowledgePairs(2, 200);
  assert.deepEqual(knowledgePairs(2, 200), facts);
  for (const f of facts) {
    const word = /"([a-z]+)"/.exec(f.prompt)![1];
    assert.ok(SYNTHETIC_GROUPS[f.completion.slice(1)].includes(word), `${f.prompt}${f.completion}`);
    assert.ok(f.prompt.endsWith("?\nAnswer:"));
    assert.ok(!f.prompt.includes("\nA. "), "no choices");
  }
  // the warm-up groups share no keyword and no group name with the task's
  const words = (g: Readonly<Record<string, readonly string[]>>): string[] =>
    Object.entries(g).flatMap(([name, ws]) => [name, ...ws]);
  const task = new Set(words(SYNTHETIC_GROUPS));
  for (const w of words(WARMUP_GROUPS)) assert.ok(!task.has(w), w);
  const warm = syntheticMc({ seed: 1, train: 20, test: 10, groups: WARMUP_GROUPS });
  for (const i of warm.test) assert.deepEqual(i.choices, Object.keys(WARMUP_GROUPS));
  assert.throws(
    () => syntheticMc({ seed: 1, train: 5, test: 5, groups: { a: ["x"] } }),
    /need 2 to 10 groups/,
  );
});
