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
  optimizerDefaults,
  OPTIMIZERS,
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

/** The `--help` text. */
export function usage(): string {
  const d = defaultTrainOptions();
  const num = (x: unknown) =>
    typeof x === "number" && x !== 0 && Math.abs(x) < 1e-3 ? x.toExponential() : String(x);
  // Each optimizer's default, for the optimizers the setting applies to.
  const per = (pick: (name: string) => unknown) =>
    OPTIMIZERS.filter((o) => pick(o) !== null).map((o) => `${o} ${num(pick(o))}`).join(", ");
  const def = optimizerDefaults;
  return `Pretrain a LLaMA-style model with the qgalore engine.

Usage: deno run -A examples/pretrain.ts [flags]

Model and optimizer
  --model NAME|FILE     preset (${PRESET_NAMES.join(", ")})
                        or a JSON LlamaConfig file [${d.model}]
  --optimizer NAME      ${OPTIMIZERS.join(", ")} [${d.optimizer}]
  --lr X                peak learning rate [${per((o) => def(o).lr)}]
  --min-lr-ratio X      cosine floor as a fraction of --lr [${d.minLrRatio}]
  --warmup N            linear warmup updates [10% of --steps]
  --steps N             optimizer updates [${d.steps}]
  --clip X              gradient-norm clipping, 0 = off [${d.clip}]
  --weight-decay X      decoupled weight decay [${d.weightDecay}]
  --beta1 X             Adam β1 [${d.beta1}]
  --beta2 X             Adam β2 [${per((o) => def(o).beta2)}]
  --eps X               Adam ε [${per((o) => def(o).eps)}]
  --fused on|off        optimizer steps inside the backward (needs --grad-accum 1)
                        [on for galore, galore8bit, qgalore; off for adamw, adam8bit]
  --block-size 256|2048 8-bit Adam block (adam8bit, galore8bit, qgalore) [2048]

GaLore family (galore, galore8bit, qgalore)
  --rank N              projection rank, clamped per matrix to min(N, rows, cols) [128]
  --update-gap N        projector refresh interval T in updates [200]
  --galore-scale X      scale α of the projected-back update [0.25]
  --proj-bits B         projector storage: 4, 8 (quantized), 16 (bf16), 32 (f32)
                        [${per((o) => def(o).projBits)}]
  --proj-group-size N   projector quantization group (with --proj-bits 4 or 8) [256]
  --proj-refresh M      svd (reference), eigh (exact, faster) or randomized [eigh]
  --lazy on|off         lazy layer-wise refresh: double a matrix's gap while its top
                        singular vector stays put [on for qgalore, else off]
  --cos-threshold X     mean cosine that doubles the gap (with --lazy on) [0.4]
  --queue-size N        cosines averaged (with --lazy on) [5]
  --gamma N             gap growth factor (with --lazy on) [2]
  --cos-mode M          signed (reference) or abs cosine (with --lazy on) [signed]
  --weight-bits 8|16    8: INT8 projected weights (qgalore only) [qgalore 8, else 16]
  --weight-group-size N INT8 weight quantization group (with --weight-bits 8) [256]
  --stochastic-round on|off
                        stochastic rounding of INT8 weight updates (with --weight-bits 8) [on]
  --quant-range R       zero (range includes 0; fixes the reference clamp bug) or
                        reference, for INT8 weights and 4/8-bit projectors [zero]

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
  --device D            ${CHOICES.device.join(", ")} [${d.device}]
  --precision P         ${CHOICES.precision.join(", ")}: bf16 activations and GEMM inputs
                        need a GPU; auto = bf16 there, fp32 on the CPU [${d.precision}]
  --checkpointing on|off  recompute each block in the backward: less activation memory,
                        one extra forward per step, identical results [off]
  --out DIR             metrics.jsonl and summary.json go here [runs/<timestamp>]
  --json                print the summary as one JSON line on stdout
  -h, --help            show this help

Switches that do not apply to the chosen optimizer are errors. Ctrl-C stops after the
current update, runs the final evaluation and writes the summary.`;
}
