/**
 * A synthetic multiple-choice task that a tiny model learns in a few hundred steps, so that
 * every fine-tuning method can be checked and compared end to end (training data →
 * {@link https://arxiv.org/abs/2009.03300 MMLU}-format accuracy) without downloading anything.
 *
 * Each question names one keyword (`"Which group does the word \"tiger\" belong to?"`, with
 * some filler words that vary); the four choices are the group names (animal, color, fruit,
 * metal). The right answer is the keyword's group. Training examples are prompt/completion
 * pairs whose prompt is exactly the zero-shot MMLU prompt ({@link mmluPrompt}) and whose
 * completion is the answer letter (`" A"`), so fine-tuning teaches the continuation that
 * multiple-choice scoring reads; test items are {@link McItem}s written as JSONL or MMLU CSV
 * (interface E).
 *
 * Choice order (measured on the 2-layer test fixture, 48 held-out questions, chance 25%):
 * - `fixed` (default): the groups are always in the same order, so the answer letter is a
 *   function of the keyword's group. After the warm-up below, 200 updates take every method
 *   well above chance: adamw 96%, adam8bit 98%, galore, galore8bit and qgalore 100%, LoRA
 *   r8 all-linear 85%, QLoRA 88%; LoRA / QLoRA on `q_proj,v_proj` 98% / 85%
 *   (tests/finetune_e2e_test.ts).
 * - `shuffled`: the groups are in a random order per question, so the model has to find the
 *   letter that stands next to the keyword's group: the real multiple-choice skill, but the
 *   same budget leaves every method at chance (adamw 17%, galore 25%, qgalore 33%, LoRA 23%,
 *   QLoRA 25%), so the comparison and the tests use `fixed`.
 *
 * A random-init base is no stand-in for a pretrained one as it is: with frozen random
 * embeddings and head, LoRA cannot learn 32 keyword → letter lookups in a few hundred steps
 * (r8 all-linear: 38% after 300 updates, 56% after 800) while full fine-tuning can. So
 * the comparison first warms the base up with full AdamW on {@link WARMUP_GROUPS} in this
 * format and on the task's facts without it ({@link knowledgePairs}): the base then knows
 * which group each keyword names but has never answered this task with a letter (its
 * accuracy stays at chance, 19–23%), as a pretrained model knows facts that fine-tuning
 * teaches it to answer in the MMLU format.
 *
 * Everything is a pure function of the seed (the project's {@link Rng}). Test questions are
 * drawn first; training questions come from the same distribution but never repeat a test
 * question's text (a redraw), so accuracy is measured on questions the model has not seen:
 * the keywords are shared, the wording (template and filler) around them is new.
 *
 * @module
 */

import { join } from "node:path";
import { formatExample, type McItem, mmluPrompt } from "./mmlu.ts";
import { UsageError } from "./errors.ts";
import { Rng } from "./rng.ts";

/** The groups (choices) and their keywords. Short, distinct ASCII words. */
export const SYNTHETIC_GROUPS: Readonly<Record<string, readonly string[]>> = Object.freeze({
  animal: Object.freeze(["tiger", "horse", "mouse", "eagle", "sheep", "otter", "camel", "whale"]),
  color: Object.freeze(["green", "black", "white", "brown", "olive", "amber", "coral", "ivory"]),
  fruit: Object.freeze(["apple", "mango", "lemon", "peach", "grape", "melon", "guava", "plum"]),
  metal: Object.freeze(["iron", "zinc", "gold", "lead", "tin", "nickel", "cobalt", "copper"]),
});

/**
 * Other groups and keywords in the same format, for warming a random-init base up before it
 * is fine-tuned on {@link SYNTHETIC_GROUPS} (see examples/finetune_compare.ts): a base that
 * has learned the format and to answer with a letter, but none of the task's answers.
 */
export const WARMUP_GROUPS: Readonly<Record<string, readonly string[]>> = Object.freeze({
  vehicle: Object.freeze(["car", "bus", "truck", "train", "boat", "plane", "bike", "tram"]),
  body: Object.freeze(["hand", "foot", "nose", "knee", "elbow", "ear", "neck", "chin"]),
  music: Object.freeze(["piano", "drum", "flute", "violin", "guitar", "harp", "cello", "banjo"]),
  weather: Object.freeze(["rain", "snow", "wind", "fog", "hail", "storm", "sleet", "frost"]),
});

const TEMPLATES: readonly string[] = Object.freeze([
  'Which group does the word "{w}" belong to?',
  'The word "{w}" names what?',
  'What kind of thing is "{w}"?',
  '"{w}" is an example of which group?',
]);

const FILLERS: readonly string[] = Object.freeze([
  "",
  "Quick question. ",
  "Think first. ",
  "Test item. ",
  "One more. ",
  "Easy one. ",
]);

/** Order of the choices: see the module notes. */
export type ChoiceOrder = "fixed" | "shuffled";

/** Options of {@link syntheticMc}. */
export interface SyntheticMcOptions {
  /** Seed: the same seed gives the same task, byte for byte. */
  seed: number;
  /** Training examples (prompt/completion pairs). */
  train: number;
  /** Held-out questions to score. */
  test: number;
  /** Choice order; default `fixed`. */
  order?: ChoiceOrder;
  /** Subject of the MMLU prompt line; default `word_groups` ("… about  word groups."). */
  subject?: string;
  /** Groups (choices, 2 to 10) and their keywords; default {@link SYNTHETIC_GROUPS}. */
  groups?: Readonly<Record<string, readonly string[]>>;
}

/** A prompt/completion line (interface D's `prompt` kind). */
export interface PromptCompletion {
  /** The zero-shot MMLU prompt, ending in "Answer:". */
  prompt: string;
  /** The answer letter with its leading space (" A"). */
  completion: string;
}

/** The generated task. */
export interface SyntheticMc {
  /** Training pairs. */
  train: PromptCompletion[];
  /** Validation pairs (the same form as `train`, from the test questions). */
  val: PromptCompletion[];
  /** Held-out questions. */
  test: McItem[];
  /** The options it was made with (defaults filled in). */
  options: Required<SyntheticMcOptions>;
}

const LETTERS = "ABCDEFGHIJ";

/** Distinct questions (keyword × template × filler, × the choice orders when shuffled). */
function questionCount(groups: Readonly<Record<string, readonly string[]>>, order: ChoiceOrder) {
  const keywords = Object.values(groups).reduce((n, w) => n + w.length, 0);
  let orders = 1;
  for (let k = 2; k <= Object.keys(groups).length && order === "shuffled"; k++) orders *= k;
  return keywords * TEMPLATES.length * FILLERS.length * orders;
}
const MAX_ITEMS = 1_000_000;

function question(
  rng: Rng,
  order: ChoiceOrder,
  subject: string,
  table: Readonly<Record<string, readonly string[]>>,
): McItem {
  const groups = Object.keys(table);
  const g = rng.int(groups.length);
  const words = table[groups[g]];
  const w = words[rng.int(words.length)];
  const q = FILLERS[rng.int(FILLERS.length)] +
    TEMPLATES[rng.int(TEMPLATES.length)].replace("{w}", w);
  const choices = [...groups];
  if (order === "shuffled") {
    for (let i = choices.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [choices[i], choices[j]] = [choices[j], choices[i]];
    }
  }
  return { question: q, choices, answer: choices.indexOf(groups[g]), subject };
}

/** The prompt/completion pair that teaches `item`'s answer in the zero-shot MMLU prompt. */
export function trainingPair(item: McItem): PromptCompletion {
  return { prompt: mmluPrompt(item, []), completion: ` ${LETTERS[item.answer]}` };
}

/**
 * Generates the task. Throws a one-line UsageError for counts that are not integers in
 * [1, 1e6] (train, test) or an unknown order.
 */
export function syntheticMc(opts: SyntheticMcOptions): SyntheticMc {
  const o: Required<SyntheticMcOptions> = {
    order: "fixed",
    subject: "word_groups",
    groups: SYNTHETIC_GROUPS,
    ...opts,
  };
  const names = Object.keys(o.groups);
  if (
    names.length < 2 || names.length > LETTERS.length ||
    names.some((g) => !Array.isArray(o.groups[g]) || o.groups[g].length === 0)
  ) {
    throw new UsageError(
      `synthetic groups ${
        names.join(",") || '""'
      }: need 2 to ${LETTERS.length} groups, each with keywords`,
    );
  }
  for (const k of ["train", "test"] as const) {
    const n = o[k];
    if (!Number.isInteger(n) || n < 1 || n > MAX_ITEMS) {
      throw new UsageError(`synthetic ${k} count ${n}: must be an integer in [1, ${MAX_ITEMS}]`);
    }
  }
  if (!Number.isInteger(o.seed)) {
    throw new UsageError(`synthetic seed ${o.seed}: must be an integer`);
  }
  if (o.order !== "fixed" && o.order !== "shuffled") {
    throw new UsageError(`synthetic order ${o.order}: must be fixed or shuffled`);
  }
  // separate streams: the test set does not change when the training set grows
  const trainRng = new Rng(o.seed * 2 + 1);
  const testRng = new Rng(o.seed * 2 + 2);
  const test = Array.from(
    { length: o.test },
    () => question(testRng, o.order, o.subject, o.groups),
  );
  const held = new Set(test.map((i) => formatExample(i, false)));
  if (held.size >= questionCount(o.groups, o.order)) {
    throw new UsageError(
      `synthetic test count ${o.test}: covers every question of the ${o.order} task; ` +
        "fewer test items leave questions to train on",
    );
  }
  const trainItems: McItem[] = [];
  while (trainItems.length < o.train) {
    const q = question(trainRng, o.order, o.subject, o.groups);
    if (!held.has(formatExample(q, false))) trainItems.push(q);
  }
  return { train: trainItems.map(trainingPair), val: test.map(trainingPair), test, options: o };
}

/**
 * The keywords' groups as plain questions answered by the group's name (no choices, no
 * letters): `Think first. What kind of thing is "tiger"?\nAnswer:` → ` animal`. Training a
 * random-init base on these (with the multiple-choice format on other groups,
 * {@link WARMUP_GROUPS}) makes a stand-in for a pretrained model: it knows the facts but
 * has never answered this task's questions with a letter, so its accuracy starts at chance
 * and fine-tuning, adapters included, only has to connect the two, as with a real model.
 */
export function knowledgePairs(
  seed: number,
  n: number,
  groups: Readonly<Record<string, readonly string[]>> = SYNTHETIC_GROUPS,
): PromptCompletion[] {
  const rng = new Rng(seed * 2 + 3);
  return Array.from({ length: n }, () => {
    const q = question(rng, "fixed", "", groups);
    return { prompt: `${q.question}\nAnswer:`, completion: ` ${q.choices[q.answer]}` };
  });
}

/** JSONL of prompt/completion pairs (one object a line, trailing newline). */
export function pairsJsonl(pairs: PromptCompletion[]): string {
  return pairs.map((p) => JSON.stringify(p)).join("\n") + "\n";
}

/** JSONL of multiple-choice items (`question`, `choices`, `answer` letter, `subject`). */
export function itemsJsonl(items: McItem[]): string {
  return items.map((i) =>
    JSON.stringify({
      question: i.question,
      choices: i.choices,
      answer: LETTERS[i.answer],
      ...(i.subject === undefined ? {} : { subject: i.subject }),
    })
  ).join("\n") + "\n";
}

/** MMLU's CSV (no header: question, A, B, C, D, answer letter; RFC 4180 quoting). */
export function itemsCsv(items: McItem[]): string {
  const cell = (s: string) => /[",\n\r]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
  return items.map((i) => [i.question, ...i.choices, LETTERS[i.answer]].map(cell).join(","))
    .join("\n") + "\n";
}

/** The files {@link writeSyntheticMc} writes. */
export interface SyntheticMcFiles {
  /** Training pairs (JSONL). */
  train: string;
  /** Validation pairs (JSONL). */
  val: string;
  /** Test questions (JSONL, with the subject). */
  test: string;
}

/** Writes `train.jsonl`, `val.jsonl` and `test.jsonl` of `task` into the folder `dir`. */
export async function writeSyntheticMc(dir: string, task: SyntheticMc): Promise<SyntheticMcFiles> {
  await Deno.mkdir(dir, { recursive: true });
  const files = {
    train: join(dir, "train.jsonl"),
    val: join(dir, "val.jsonl"),
    test: join(dir, "test.jsonl"),
  };
  await Deno.writeTextFile(files.train, pairsJsonl(task.train));
  await Deno.writeTextFile(files.val, pairsJsonl(task.val));
  await Deno.writeTextFile(files.test, itemsJsonl(task.test));
  return files;
}
