/**
 * Command-line parsing for `examples/pretrain.ts`.
 *
 * @module
 */

import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "./errors.ts";
import {
  ADAPTER_OPTIMIZERS,
  checkChoice,
  checkNumber,
  checkOptions,
  checkSwitch,
  type ChoiceKey,
  CHOICES,
  defaultTrainOptions,
  FLAG,
  NUMERIC_OPTIONS,
  type NumericKey,
  optionHelp,
  PROJECTED_OPTIMIZERS,
  SECTIONS,
  SWITCH_OPTIONS,
  type SwitchKey,
  type TrainOptions,
} from "./options.ts";
import type { OpenModelOptions } from "./open_model.ts";
import { PRESET_NAMES } from "./presets.ts";

/** Parsed command line: training options plus the CLI-only `--json` switch. */
export interface PretrainArgs extends TrainOptions {
  /** Print the summary as one JSON object on the last stdout line. */
  json: boolean;
}

/**
 * Parsed command line of a resume (`--resume DIR`): only the flags given, since every other
 * option comes from the run's checkpoint (the trainer checks which ones may be given).
 */
export interface ResumeArgs extends Partial<TrainOptions> {
  /** The run folder to continue. */
  resume: string;
  /** Print the summary as one JSON object on the last stdout line. */
  json: boolean;
}

/** Flag name (without `--`) → option key, for the flags that carry a value. */
const VALUE_FLAGS: Readonly<Record<string, keyof TrainOptions>> = Object.freeze(
  Object.fromEntries(
    (Object.entries(FLAG) as [keyof TrainOptions, string][])
      .filter(([, flag]) => flag.startsWith("--"))
      .map(([key, flag]) => [flag.slice(2), key]),
  ),
);

const PARSE_OPTIONS = Object.freeze({
  ...Object.fromEntries(Object.keys(VALUE_FLAGS).map((f) => [f, { type: "string" as const }])),
  json: { type: "boolean" as const },
  help: { type: "boolean" as const, short: "h" },
});

/**
 * Parses pretraining flags (strictly: unknown flags and stray arguments are errors) and
 * validates every value. Returns "help" for `--help`/`-h`. Throws UsageError with a one-line
 * message naming the flag and the value.
 */
export function parsePretrainArgs(argv: string[]): PretrainArgs | ResumeArgs | "help" {
  const parsed = parseGiven(argv);
  if (parsed === "help") return "help";
  const { given, json } = parsed;
  if (typeof given.resume === "string") return { ...given, resume: given.resume, json };
  const opts: PretrainArgs = { ...defaultTrainOptions(), ...given, json };
  checkOptions(opts);
  return opts;
}

/** The flags given on a command line, each value checked alone; "help" for `--help`. */
function parseGiven(argv: string[]): { given: Partial<TrainOptions>; json: boolean } | "help" {
  const values = strictParse(argv, PARSE_OPTIONS, VALUE_FLAGS);
  if (values.help) return "help";

  const given: Partial<TrainOptions> = {};
  const numeric = new Set<string>(NUMERIC_OPTIONS);
  const switches = new Set<string>(SWITCH_OPTIONS);
  for (const [flag, key] of Object.entries(VALUE_FLAGS)) {
    const raw = values[flag];
    if (typeof raw !== "string") continue;
    const o = given as unknown as Record<string, unknown>;
    if (numeric.has(key)) {
      o[key] = checkNumber(key as NumericKey, raw);
    } else if (switches.has(key)) {
      o[key] = checkSwitch(key as SwitchKey, raw);
    } else if (key in CHOICES) {
      o[key] = checkChoice(key as ChoiceKey, raw);
    } else if (raw === "") {
      throw new UsageError(`--${flag} "": must not be empty`);
    } else {
      o[key] = raw;
    }
  }
  return { given, json: values.json === true };
}

/**
 * Parsed command line of `examples/finetune.ts`: the flags given (values checked; the whole
 * set is checked when the run starts), `model` the folder to fine-tune.
 */
export interface FinetuneArgs extends Partial<Omit<TrainOptions, "model" | "initFrom">> {
  /** The Hugging Face model folder (absent with `--resume`). */
  model?: string;
  /** Print the summary as one JSON object on the last stdout line. */
  json: boolean;
}

/** Pre-training flags fine-tuning has no use for, and what to use instead. */
const NOT_FOR_FINETUNING: Readonly<Partial<Record<keyof TrainOptions, string>>> = Object.freeze({
  initFrom: "give the model folder as --model",
  trainTokenizer: "fine-tuning uses the model's own tokenizer",
  textField: "the JSONL fields are text, prompt + completion, or messages",
});

/**
 * Parses fine-tuning flags (strictly, as {@link parsePretrainArgs}): each value is checked
 * here; `--model` and `--data` are required unless `--resume` is given. Returns "help" for
 * `--help`. Throws a one-line UsageError naming the flag.
 */
export function parseFinetuneArgs(argv: string[]): FinetuneArgs | "help" {
  const parsed = parseGiven(argv);
  if (parsed === "help") return "help";
  const { given, json } = parsed;
  for (const [key, why] of Object.entries(NOT_FOR_FINETUNING)) {
    const v = given[key as keyof TrainOptions];
    if (v !== undefined) throw new UsageError(`${FLAG[key as keyof TrainOptions]} ${v}: ${why}`);
  }
  if (given.resume === undefined) {
    if (given.model === undefined && given.data === undefined) {
      throw new UsageError(
        "--model and --data: required: a Hugging Face model folder and a JSONL file (see --help)",
      );
    }
    if (given.model === undefined) {
      throw new UsageError("--model: required: the Hugging Face model folder to fine-tune");
    }
    if (given.data === undefined) {
      throw new UsageError(
        "--data: required: a JSONL file of text, prompt + completion or messages lines",
      );
    }
  }
  const { model, ...rest } = given;
  return { ...rest, ...(model === undefined ? {} : { model: model as string }), json };
}

/** `--help` rows that read differently for fine-tuning (an empty list drops the flag). */
const FINETUNE_ROWS: Readonly<Record<string, string[]>> = Object.freeze({
  "--model": ["--model DIR           the Hugging Face LLaMA folder to fine-tune (required)"],
  "--lr": [
    "--lr X                peak learning rate [adamw, adam8bit 2e-5; galore, galore8bit,",
    "                      qgalore, lora, qlora 2e-4]",
  ],
  "--data": [
    "--data FILE           JSONL: text, prompt + completion, or messages lines (required)",
  ],
  "--val-fraction": [
    "--val-fraction X      share of --data's examples held out when there is no --val-data",
    "                      [0.1]",
  ],
  "--tokenizer": ["--tokenizer PATH      tokenizer.json [the model folder's]"],
  "--eval-every": [
    "--eval-every N        validate (every held-out example) every N updates, 0 = start",
    "                      and end only [100]",
  ],
  "--eval-batches": [],
});

/** The `--help` text of `examples/finetune.ts`. */
export function finetuneUsage(): string {
  const help = optionHelp({ presets: PRESET_NAMES.join(", ") });
  const skip = new Set(
    Object.keys(NOT_FOR_FINETUNING).map((k) => FLAG[k as keyof TrainOptions]),
  );
  // every section, those added later (adapters) included; the model flag reads as a folder
  const lines: string[] = [];
  for (const [title, rows] of help) {
    const kept: string[] = [];
    let drop = false;
    for (const row of rows) {
      const flag = /^ {2}(--[a-z0-9-]+)/.exec(row)?.[1];
      if (flag !== undefined) {
        drop = skip.has(flag) || flag in FINETUNE_ROWS;
        if (flag in FINETUNE_ROWS) kept.push(...FINETUNE_ROWS[flag].map((l) => `  ${l}`));
      }
      if (!drop) kept.push(row);
    }
    lines.push(title, ...kept, "");
  }
  return [
    "Fine-tune a pretrained LLaMA-style model with the qgalore engine.",
    "",
    "Usage: deno run -A examples/finetune.ts --model DIR --data FILE.jsonl [flags]",
    "",
    ...lines,
    "  --json                print the summary as one JSON line on stdout",
    "  -h, --help            show this help",
    "",
    "--data lines hold `text` (loss on every token), `prompt` + `completion` (loss on the",
    "completion only) or `messages` (the model's chat template; loss on assistant turns).",
    "Learning rates default to fine-tuning's: 2e-5 for adamw and adam8bit, 2e-4 for the",
    "GaLore family and the adapters. Ctrl-C stops after the current update and saves a",
    "checkpoint; --resume DIR continues it with the identical batches.",
  ].join("\n");
}

/**
 * `parseArgs` in strict mode (unknown flags and stray arguments are errors), its errors as
 * one-line UsageErrors; values that start with `-` are joined to their flag first.
 */
function strictParse(
  argv: string[],
  options: ParseArgsConfig["options"],
  valueFlags: Readonly<Record<string, unknown>>,
): Record<string, string | boolean | undefined> {
  try {
    return parseArgs({
      args: joinNegativeValues(argv, valueFlags),
      options,
      strict: true,
      allowPositionals: false,
    }).values as Record<string, string | boolean | undefined>;
  } catch (e) {
    throw parseError(e, argv);
  }
}

/**
 * `--lr -1` would otherwise read as a missing value followed by a flag `-1`; joining it into
 * `--lr=-1` lets the range check report the value itself.
 */
function joinNegativeValues(
  argv: string[],
  valueFlags: Readonly<Record<string, unknown>> = VALUE_FLAGS,
): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = argv[i + 1];
    if (
      a.startsWith("--") && a.slice(2) in valueFlags && next !== undefined &&
      /^-(\d|\.\d|inf|nan)/i.test(next)
    ) {
      out.push(`${a}=${next}`);
      i++;
    } else {
      out.push(a);
    }
  }
  return out;
}

function parseError(e: unknown, argv: string[]): Error {
  if (!(e instanceof Error)) return new UsageError(String(e));
  const code = (e as { code?: string }).code;
  const quoted = /'([^']*)'/.exec(e.message)?.[1] ?? "";
  const flag = quoted.split(" ")[0];
  switch (code) {
    case "ERR_PARSE_ARGS_UNKNOWN_OPTION": {
      const raw = argv.find((a) => a === flag || a.startsWith(`${flag}=`)) ?? flag;
      return new UsageError(`${raw}: unknown flag; see --help for the list`);
    }
    case "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL":
      return new UsageError(
        `${quoted}: unexpected argument; flags take the form --name value (see --help)`,
      );
    case "ERR_PARSE_ARGS_INVALID_OPTION_VALUE": {
      if (/does not take an argument/.test(e.message)) {
        const raw = argv.find((a) => a.startsWith(`${flag}=`)) ?? flag;
        return new UsageError(`${raw}: ${flag} is a switch and takes no value`);
      }
      const at = argv.indexOf(flag);
      const next = at >= 0 ? argv[at + 1] : undefined;
      return new UsageError(
        next === undefined
          ? `${flag}: missing value`
          : `${flag} ${next}: missing value (${next} looks like a flag; write ${flag}=VALUE for a value starting with -)`,
      );
    }
    default:
      return new UsageError(e.message.split("\n")[0]);
  }
}

/** The `--help` text: the option table's help lines, by section. */
export function usage(): string {
  const help = optionHelp({ presets: PRESET_NAMES.join(", ") });
  const section = (title: string, key: string) => [title, ...help.get(SECTIONS[key]) ?? []];
  return [
    "Pretrain a LLaMA-style model with the qgalore engine.",
    "",
    "Usage: deno run -A examples/pretrain.ts [flags]",
    "",
    ...section("Model and optimizer", "model"),
    "",
    ...section(`GaLore family (${PROJECTED_OPTIMIZERS.join(", ")})`, "galore"),
    "",
    ...section(`LoRA and QLoRA (${ADAPTER_OPTIMIZERS.join(", ")})`, "lora"),
    "",
    ...section("Data", "data"),
    "",
    ...section("Run", "run"),
    "  --json                print the summary as one JSON line on stdout",
    "  -h, --help            show this help",
    "",
    "Switches that do not apply to the chosen optimizer are errors. Ctrl-C stops after the",
    "current update, saves a checkpoint, runs the final evaluation and writes the summary;",
    "--resume DIR continues it.",
  ].join("\n");
}

/** One flag of a small script ({@link parseScriptArgs}). */
export interface ScriptFlag {
  /**
   * `string` (any non-empty text), `choice` (one of `choices`), `int` or `number` within
   * `min`/`max`, or a `switch`.
   */
  type: "string" | "choice" | "int" | "number" | "switch";
  /** Allowed values of a `choice`. */
  choices?: readonly string[];
  /** Smallest allowed value (numbers). */
  min?: number;
  /** Largest allowed value (numbers). */
  max?: number;
  /** Whether `min` itself is excluded. */
  open?: boolean;
  /** The flag must be given. */
  required?: boolean;
}

/**
 * Strict parsing for the example scripts (`evaluate.ts`, `generate.ts`): unknown flags, stray
 * arguments, missing values and out-of-range numbers are one-line UsageErrors naming the flag.
 * Returns "help" for `--help`/`-h`; switches are booleans, numbers are numbers.
 */
export function parseScriptArgs(
  argv: string[],
  flags: Readonly<Record<string, ScriptFlag>>,
): Record<string, string | number | boolean | undefined> | "help" {
  const valueFlags = Object.fromEntries(
    Object.entries(flags).filter(([, f]) => f.type !== "switch").map(([k]) => [k, k]),
  );
  // `--temperature -1` reads as a value, so the range check can name it
  const values = strictParse(argv, {
    ...Object.fromEntries(
      Object.entries(flags).map((
        [k, f],
      ) => [k, { type: f.type === "switch" ? "boolean" as const : "string" as const }]),
    ),
    help: { type: "boolean", short: "h" },
  }, valueFlags);
  if (values.help) return "help";
  const out: Record<string, string | number | boolean | undefined> = {};
  for (const [name, f] of Object.entries(flags)) {
    const raw = values[name];
    if (raw === undefined) {
      if (f.required) throw new UsageError(`--${name}: required (see --help)`);
      continue;
    }
    if (f.type === "switch") {
      out[name] = raw === true;
      continue;
    }
    const text = String(raw);
    if (f.type === "string") {
      if (text === "") throw new UsageError(`--${name} "": must not be empty`);
      out[name] = text;
      continue;
    }
    if (f.type === "choice") {
      if (!f.choices!.includes(text)) {
        throw new UsageError(`--${name} ${text || '""'}: must be one of ${f.choices!.join(", ")}`);
      }
      out[name] = text;
      continue;
    }
    const v = text.trim() === "" ? NaN : Number(text);
    const lo = f.min ?? -Infinity;
    const hi = f.max ?? Number.MAX_SAFE_INTEGER;
    const ok = Number.isFinite(v) && (f.type !== "int" || Number.isInteger(v)) &&
      (f.open ? v > lo : v >= lo) && v <= hi;
    if (!ok) {
      const kind = f.type === "int" ? "an integer" : "a number";
      const range = f.max === undefined
        ? `${f.open ? ">" : "≥"} ${lo}`
        : `in ${f.open ? "(" : "["}${lo}, ${hi}]`;
      throw new UsageError(`--${name} ${text || '""'}: must be ${kind} ${range}`);
    }
    out[name] = v;
  }
  return out;
}

/** The flags `evaluate.ts` and `generate.ts` share: the model, its tokenizer, where it runs. */
export const MODEL_SCRIPT_FLAGS: Readonly<Record<string, ScriptFlag>> = Object.freeze({
  model: { type: "string", required: true },
  tokenizer: { type: "string" },
  device: { type: "choice", choices: ["cpu", "cuda", "auto"] },
  threads: { type: "int", min: 1, max: 1024 },
});

/** {@link openModel}'s options from the parsed {@link MODEL_SCRIPT_FLAGS}. */
export function modelArgs(
  a: Readonly<Record<string, string | number | boolean | undefined>>,
  seqLen: number,
): OpenModelOptions {
  return {
    model: a.model as string,
    tokenizer: (a.tokenizer as string | undefined) ?? null,
    seqLen,
    device: (a.device ?? "cpu") as "cpu" | "cuda" | "auto",
    ...(a.threads === undefined ? {} : { threads: a.threads as number }),
    label: `--model ${a.model}`,
  };
}
