/**
 * Command-line parsing for `examples/pretrain.ts`.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { UsageError } from "./errors.ts";
import {
  checkNumber,
  checkOptions,
  defaultTrainOptions,
  type Device,
  DEVICES,
  FLAG,
  NUMERIC_OPTIONS,
  type NumericKey,
  OPTIMIZERS,
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
  for (const [flag, key] of Object.entries(VALUE_FLAGS)) {
    const raw = values[flag];
    if (typeof raw !== "string") continue;
    if (numeric.has(key)) {
      (opts as unknown as Record<string, number>)[key] = checkNumber(key as NumericKey, raw);
    } else if (key === "device") {
      if (!(DEVICES as readonly string[]).includes(raw)) {
        throw new UsageError(`--device ${raw || '""'}: must be one of ${DEVICES.join(", ")}`);
      }
      opts.device = raw as Device;
    } else if (raw === "") {
      throw new UsageError(`--${flag} "": must not be empty`);
    } else {
      (opts as unknown as Record<string, string>)[key] = raw;
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

/** The `--help` text. */
export function usage(): string {
  const d = defaultTrainOptions();
  return `Pretrain a LLaMA-style model with the qgalore engine.

Usage: deno run -A examples/pretrain.ts [flags]

Model and optimizer
  --model NAME|FILE     preset (${PRESET_NAMES.join(", ")})
                        or a JSON LlamaConfig file [${d.model}]
  --optimizer NAME      ${OPTIMIZERS.join(", ")} [${d.optimizer}]
  --lr X                peak learning rate [${d.lr}]
  --min-lr-ratio X      cosine floor as a fraction of --lr [${d.minLrRatio}]
  --warmup N            linear warmup updates [10% of --steps]
  --steps N             optimizer updates [${d.steps}]
  --clip X              gradient-norm clipping, 0 = off [${d.clip}]
  --weight-decay X      decoupled weight decay [${d.weightDecay}]
  --beta1 X, --beta2 X, --eps X
                        Adam moments and epsilon [${d.beta1}, ${d.beta2}, ${d.eps}]

Data
  --batch-size N        sequences per micro-batch [${d.batchSize}]
  --seq-len N           tokens per sequence [${d.seqLen}]
  --grad-accum N        micro-batches per update [${d.gradAccum}]
  --data FILE           text file, byte-tokenized [synthetic corpus with a known entropy floor]
  --val-fraction X      tail of --data held out for validation [${d.valFraction}]
  --eval-every N        validate every N updates, 0 = start and end only [${d.evalEvery}]
  --eval-batches N      validation batches per evaluation [${d.evalBatches}]

Run
  --seed N              weight init and batch sampling seed [${d.seed}]
  --threads N           engine threads [engine default]
  --device D            ${DEVICES.join(", ")} [${d.device}]
  --out DIR             metrics.jsonl and summary.json go here [runs/<timestamp>]
  --json                print the summary as one JSON line on stdout
  -h, --help            show this help

Ctrl-C stops after the current update, runs the final evaluation and writes the summary.`;
}
