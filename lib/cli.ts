/**
 * Command-line parsing for `examples/pretrain.ts`.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { UsageError } from "./errors.ts";
import {
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
import { PRESET_NAMES } from "./presets.ts";

/** Parsed command line: training options plus the CLI-only `--json` switch. */
export interface PretrainArgs extends TrainOptions {
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
export function parsePretrainArgs(argv: string[]): PretrainArgs | "help" {
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({
      args: joinNegativeValues(argv),
      options: PARSE_OPTIONS,
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (e) {
    throw parseError(e, argv);
  }
  if (values.help) return "help";

  const opts: PretrainArgs = { ...defaultTrainOptions(), json: values.json === true };
  const numeric = new Set<string>(NUMERIC_OPTIONS);
  const switches = new Set<string>(SWITCH_OPTIONS);
  for (const [flag, key] of Object.entries(VALUE_FLAGS)) {
    const raw = values[flag];
    if (typeof raw !== "string") continue;
    const o = opts as unknown as Record<string, unknown>;
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
  checkOptions(opts);
  return opts;
}

/**
 * `--lr -1` would otherwise read as a missing value followed by a flag `-1`; joining it into
 * `--lr=-1` lets the range check report the value itself.
 */
function joinNegativeValues(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = argv[i + 1];
    if (
      a.startsWith("--") && a.slice(2) in VALUE_FLAGS && next !== undefined &&
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
    ...section("Data", "data"),
    "",
    ...section("Run", "run"),
    "  --json                print the summary as one JSON line on stdout",
    "  -h, --help            show this help",
    "",
    "Switches that do not apply to the chosen optimizer are errors. Ctrl-C stops after the",
    "current update, runs the final evaluation and writes the summary.",
  ].join("\n");
}
