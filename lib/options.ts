/**
 * Training options: one table ({@link OPTION_TABLE}) declares each option once — its flag,
 * help text, and either the engine config field it sets (whose type, range, per-optimizer
 * default and applicability the engine's schema states) or, for front-end options, its own
 * range and default. Parsing, checking, `--help`, per-optimizer defaults and the engine
 * config all derive from it. Error messages name the flag so they read the same from the
 * CLI and from a notebook.
 *
 * @module
 */

import { shortValue, UsageError } from "./errors.ts";
import { resolve, sep as SEP } from "node:path";
import { exists, isDirectory } from "./fs.ts";
import {
  type EngineConfig,
  EngineError,
  type OptimizerConfig,
  type OptionCondition,
  type OptionRange,
  planEngine,
  resolveModelConfig,
  resolveOptimizerConfig,
} from "../ffi/engine.ts";
import { type ModelConfig, type ResolvedModel, resolveModel, validateModel } from "./presets.ts";
import { openTokenizer, type Tokenizer } from "./tokenizer.ts";
import {
  ADAPTER_OPTIMIZERS,
  CHOICE_OPTIONS,
  type ChoiceKey,
  CHOICES,
  EIGHT_BIT_OPTIMIZERS,
  FLAG,
  INT8_OPTIMIZERS,
  MAX_BATCH_TOKENS,
  MAX_COUNT,
  NUMERIC_OPTIONS,
  type NumericKey,
  OPTIMIZER_KEYS,
  type OptimizerKey,
  OPTIMIZERS,
  OPTION_KEYS as KEYS,
  optionDef as def,
  optionSpec as spec,
  PROJECTED_OPTIMIZERS,
  runOptionSpec as runSpec,
  schemaOf,
  SWITCH_OPTIONS,
  type SwitchKey,
  type TrainOptions,
} from "./option_table.ts";

export * from "./option_table.ts";

function rangeOf(key: NumericKey): OptionRange {
  const d = def(key);
  return d.range ?? schemaOf(d)!.range!;
}

/** The engine's default of `field` when it is the same for every optimizer it applies to. */
function commonDefault(field: string): unknown {
  const values = Object.values(spec(field).default);
  return values.every((v) => v === values[0]) ? values[0] : null;
}

/**
 * The default run. Options that are null take the chosen optimizer's default
 * ({@link optimizerDefaults}) in {@link checkOptions}.
 */
export function defaultTrainOptions(): TrainOptions {
  const out: Record<string, unknown> = {};
  for (const key of KEYS) {
    const d = def(key);
    if (d.default !== undefined) out[key] = d.default;
    else if (d.nullable) out[key] = null;
    else if (d.engine !== undefined) out[key] = commonDefault(d.engine);
    else if (d.run !== undefined) out[key] = runSpec(d.run).default;
  }
  return out as unknown as TrainOptions;
}

/** Per-optimizer settings; null where a setting does not apply to that optimizer. */
export type OptimizerDefaults = Pick<TrainOptions, OptimizerKey> & {
  lr: number;
  beta2: number;
  eps: number;
  fused: boolean;
};

function unknownOptimizer(shown: string): UsageError {
  return new UsageError(
    `--optimizer ${shown}: unknown optimizer; allowed: ${OPTIMIZERS.join(", ")}`,
  );
}

/** Settings of `optimizer` from an engine-resolved config (`given` wins where set). */
function settingsOf(
  optimizer: string,
  config: OptimizerConfig,
  given: Partial<TrainOptions> = {},
): OptimizerDefaults {
  const out: Record<string, unknown> = {};
  for (const key of OPTIMIZER_KEYS) {
    const d = def(key);
    const v = given[key];
    if (d.perOptimizer) out[key] = v ?? d.perOptimizer[optimizer];
    else out[key] = d.engine! in config ? (v ?? config[d.engine!]) : null;
  }
  return out as OptimizerDefaults;
}

/**
 * The settings of `optimizer` when none are given: the engine's defaults (the reference runs
 * of docs/algorithm-spec.md §1.6, §1.7, §2.6; see `rust/src/config.rs`) and {@link DEFAULT_LR}. The GaLore family
 * steps inside the backward (`fused`) when `gradAccum` is 1. Throws UsageError for an
 * unknown optimizer.
 */
export function optimizerDefaults(optimizer: string, gradAccum = 1): OptimizerDefaults {
  if (!OPTIMIZERS.includes(optimizer)) throw unknownOptimizer(optimizer || '""');
  const { config } = resolveOptimizerConfig({ name: optimizer }, { grad_accum: gradAccum });
  return settingsOf(optimizer, config);
}

function describeRange(r: OptionRange): string {
  if (r.oneOf) {
    return `one of ${r.oneOf.join(", ")}`;
  }
  const kind = r.even ? "an even integer" : r.int ? "an integer" : "a number";
  if (r.max === undefined) return `${kind} ${r.open ? ">" : "≥"} ${r.min}`;
  if (r.max === Number.MAX_SAFE_INTEGER) return `${kind} ≥ ${r.min}`;
  if (r.max === MAX_COUNT && !r.open) return `${kind} ≥ ${r.min} and ≤ ${r.max}`;
  return `${kind} in ${r.open ? "(" : "["}${r.min}, ${r.max}${r.maxOpen ? ")" : "]"}`;
}

/**
 * Checks one numeric option. `raw` is the value as the user wrote it (a CLI string) and is
 * echoed in the message; strings are parsed here. Returns the number.
 */
export function checkNumber(key: NumericKey, raw: number | string): number {
  const r = rangeOf(key);
  const v = typeof raw === "string" ? (raw.trim() === "" ? NaN : Number(raw)) : raw;
  const ok = typeof v === "number" && Number.isFinite(v) && (!r.int || Number.isInteger(v)) &&
    (r.open ? v > r.min : v >= r.min) &&
    (r.max === undefined || (r.maxOpen ? v < r.max : v <= r.max)) &&
    (!r.oneOf || r.oneOf.includes(v)) && (!r.even || v % 2 === 0);
  if (!ok) {
    const shown = typeof raw === "string" ? (raw === "" ? '""' : raw) : String(raw);
    throw new UsageError(`${FLAG[key]} ${shown}: must be ${describeRange(r)}`);
  }
  return v;
}

/** When periodic checkpoints are due: every `steps` updates or every `seconds` of wall time. */
export type SaveInterval = { steps: number; seconds?: undefined } | {
  seconds: number;
  steps?: undefined;
};

const TIME_UNITS: Readonly<Record<string, number>> = Object.freeze({ s: 1, m: 60, h: 3600 });

/**
 * Parses `--save-every`: a count of updates (`500`), a wall time (`30s`, `10m`, `1.5h`), or
 * `0` / `off` (null: no periodic checkpoints). Throws UsageError naming the flag.
 */
export function checkInterval(raw: number | string): SaveInterval | null {
  const bad = (): never => {
    throw new UsageError(
      `${FLAG.saveEvery} ${
        typeof raw === "string" ? raw || '""' : shortValue(raw)
      }: must be a number of updates ` +
        `(an integer in [0, ${MAX_COUNT}]), a wall time (30s, 10m, 2h; at most ${MAX_COUNT}s) or off`,
    );
  };
  if (raw === "off") return null;
  let steps: number | null = null;
  if (typeof raw === "number") steps = raw;
  else if (typeof raw === "string" && /^\d+$/.test(raw)) steps = Number(raw);
  if (steps !== null) {
    if (!Number.isInteger(steps) || steps < 0 || steps > MAX_COUNT) bad();
    return steps === 0 ? null : { steps };
  }
  const m = typeof raw === "string" ? /^(\d+(?:\.\d+)?)([smh])$/.exec(raw) : null;
  if (m === null) return bad();
  const seconds = Number(m[1]) * TIME_UNITS[m[2]];
  if (!(seconds > 0) || seconds > MAX_COUNT) bad();
  return { seconds };
}

/** Parses an on/off switch as the CLI spells it; throws UsageError naming the flag. */
export function checkSwitch(key: SwitchKey, raw: string | boolean): boolean {
  if (typeof raw === "boolean") return raw;
  if (raw === "on") return true;
  if (raw === "off") return false;
  throw new UsageError(`${FLAG[key]} ${raw || '""'}: must be on or off`);
}

/** Checks a choice option's value; throws UsageError naming the flag and the choices. */
export function checkChoice(key: ChoiceKey, raw: string): string {
  const allowed = CHOICES[key];
  if (typeof raw === "string" && allowed.includes(raw)) return raw;
  const shown = typeof raw === "string" ? raw || '""' : shortValue(raw);
  if (key === "optimizer") throw unknownOptimizer(shown);
  throw new UsageError(`${FLAG[key]} ${shown}: must be one of ${allowed.join(", ")}`);
}

/** How `--help` shows the default of `key`. */
export function defaultText(key: keyof TrainOptions): string {
  const d = def(key);
  const num = (x: unknown) =>
    typeof x === "number" && x !== 0 && Math.abs(x) < 1e-3
      ? x.toExponential()
      : typeof x === "boolean"
      ? (x ? "on" : "off")
      : String(x);
  const all: Readonly<Record<string, unknown>> | undefined = d.perOptimizer ??
    (d.engine !== undefined ? spec(d.engine).default : undefined);
  if (d.default !== undefined || all === undefined) {
    return num(d.default ?? (d.run !== undefined ? runSpec(d.run).default : undefined));
  }
  // in the engine's optimizer order
  const per = Object.fromEntries(OPTIMIZERS.filter((o) => o in all).map((o) => [o, all[o]]));
  if (d.shows) return d.shows(per);
  const values = Object.values(per);
  if (values.every((v) => v === values[0])) return num(values[0]);
  return Object.entries(per).map(([o, v]) => `${o} ${num(v)}`).join(", ");
}

/** The `--help` lines of every option that has a flag, by section. */
export function optionHelp(fill: Readonly<Record<string, string>> = {}): Map<string, string[]> {
  const sections = new Map<string, string[]>();
  for (const key of KEYS) {
    const d = def(key);
    if (!d.help || !d.section) continue;
    const text = d.help.replace(/\{(\w+)\}/g, (m, name: string) => {
      if (name === "default") return defaultText(key);
      if (name === "choices") return CHOICES[key as ChoiceKey].join(", ");
      if (name === "values") return rangeOf(key as NumericKey).oneOf!.join("|");
      if (name === "eight_bit") return EIGHT_BIT_OPTIMIZERS.join(", ");
      if (name === "int8") return INT8_OPTIMIZERS.join(", ");
      return fill[name] ?? m;
    });
    const lines = sections.get(d.section) ?? [];
    lines.push(...text.split("\n").map((l) => `  ${l}`));
    sections.set(d.section, lines);
  }
  return sections;
}

/** Options after validation and resolution: every default filled in. */
export type ResolvedOptions = Omit<TrainOptions, "lr" | "beta2" | "eps" | "warmup" | "fused"> & {
  /** Peak learning rate. */
  lr: number;
  /** Adam β2. */
  beta2: number;
  /** Adam ε. */
  eps: number;
  /** Warmup updates. */
  warmup: number;
  /** Optimizer steps inside the backward. */
  fused: boolean;
};

/** Options after validation, with the model resolved and the warmup filled in. */
export interface CheckedOptions {
  /**
   * The options with every default filled in. Settings that do not apply to the optimizer
   * are null (e.g. `rank` for adamw).
   */
  opts: ResolvedOptions;
  /** The model's name and config (vocabulary from the tokenizer). */
  model: ResolvedModel;
  /**
   * The tokenizer (`--tokenizer`, else the model folder's, else bytes); null when
   * `trainTokenizer` asks for one to be trained on the data first.
   */
  tokenizer: Tokenizer | null;
  /** One-line notices for the user, such as a rank clamped to a matrix's size. */
  notices: string[];
}

function given(v: unknown): boolean {
  return v !== null && v !== undefined;
}

function shownValue(v: unknown): string {
  if (typeof v === "boolean") return v ? "on" : "off";
  return String(v);
}

/**
 * Validates every option (types, ranges, names, model, `seq_len ≤ max_position_embeddings`,
 * which switches apply to the optimizer, group sizes against the model's matrices) and
 * resolves the model and the optimizer's defaults; throws UsageError naming the flag and
 * value. Files named by `--data` are checked when the dataset is read.
 */
export function checkOptions(input: Partial<TrainOptions> = {}): CheckedOptions {
  const defined = Object.fromEntries(
    Object.entries(input).filter(([, v]) => v !== undefined),
  ) as Partial<TrainOptions>;
  const raw = { ...defaultTrainOptions(), ...defined };
  for (const key of NUMERIC_OPTIONS) {
    const v = raw[key];
    if (v === null && def(key).nullable) continue;
    if (typeof v !== "number") {
      throw new UsageError(
        `${FLAG[key]} ${shortValue(v)}: must be ${describeRange(rangeOf(key))}`,
      );
    }
    checkNumber(key, v);
  }
  for (const key of SWITCH_OPTIONS) {
    const v = raw[key];
    if (v !== null && typeof v !== "boolean") {
      throw new UsageError(`${FLAG[key]} ${shortValue(v)}: must be true or false (on/off)`);
    }
  }
  checkChoice("optimizer", raw.optimizer);
  checkChoice("device", raw.device);
  checkChoice("precision", raw.precision);
  for (const key of CHOICE_OPTIONS) {
    const v = raw[key];
    if (def(key).nullable && v !== null) checkChoice(key, v);
  }
  if (raw.data !== null && (typeof raw.data !== "string" || raw.data === "")) {
    throw new UsageError(
      `--data ${shortValue(raw.data)}: must be a path to a text file, folder or JSONL file`,
    );
  }
  checkInterval(raw.saveEvery);
  for (const key of ["tokenizer", "initFrom", "export", "resume"] as const) {
    const v = raw[key];
    if (v !== null && (typeof v !== "string" || v === "")) {
      throw new UsageError(`${FLAG[key]} ${shortValue(v)}: must be a path`);
    }
  }
  if (typeof raw.textField !== "string" || raw.textField === "") {
    throw new UsageError(`${FLAG.textField} ${shortValue(raw.textField)}: must be a name`);
  }
  checkChoice("exportDtype", raw.exportDtype);
  if (raw.trainTokenizer !== null && raw.data === null) {
    throw new UsageError(
      `${FLAG.trainTokenizer} ${raw.trainTokenizer}: needs --data (the corpus to train it on)`,
    );
  }
  if (raw.trainTokenizer !== null && raw.tokenizer !== null) {
    throw new UsageError(
      `${FLAG.trainTokenizer} ${raw.trainTokenizer}: give either it or --tokenizer, not both`,
    );
  }
  if (raw.trainTokenizer !== null && raw.initFrom !== null) {
    throw new UsageError(
      `${FLAG.trainTokenizer} ${raw.trainTokenizer}: --init-from's embedding belongs to its own ` +
        "tokenizer; give one or the other",
    );
  }
  if (raw.tokenizer !== null && raw.data === null) {
    throw new UsageError(
      `${FLAG.tokenizer} ${raw.tokenizer}: needs --data (the synthetic corpus is bytes)`,
    );
  }
  if (raw.initFrom !== null) {
    checkSource(FLAG.initFrom, raw.initFrom, "a Hugging Face model folder");
    if (!isDirectory(raw.initFrom)) {
      throw new UsageError(
        `${FLAG.initFrom} ${raw.initFrom}: must be a Hugging Face model folder ` +
          "(config.json and model.safetensors)",
      );
    }
  }
  if (raw.export !== null) checkExportDir(raw.export, raw.out);
  if (raw.out !== undefined && raw.out !== null && (typeof raw.out !== "string" || !raw.out)) {
    throw new UsageError(`--out ${shortValue(raw.out)}: must be a directory path`);
  }
  // The front end holds a whole update's and a whole evaluation's tokens as one Int32Array.
  const rowTokens = raw.batchSize * (raw.seqLen + 1);
  for (const key of ["gradAccum", "evalBatches"] as const) {
    if (rowTokens * raw[key] > MAX_BATCH_TOKENS) {
      throw new UsageError(
        `${FLAG[key]} ${raw[key]}: ${FLAG.batchSize} × (${FLAG.seqLen} + 1) × ${FLAG[key]} = ` +
          `${rowTokens * raw[key]} tokens; must be ≤ ${MAX_BATCH_TOKENS}`,
      );
    }
  }
  // Decoupled decay multiplies the weights by 1 − lr·wd each step: at lr·wd ≥ 1 it zeroes
  // or flips them, whatever the learning rate alone would do.
  const peakLr = raw.lr ?? def("lr").perOptimizer![raw.optimizer] as number;
  if (raw.weightDecay * peakLr >= 1) {
    throw new UsageError(
      `${FLAG.weightDecay} ${raw.weightDecay}: ${FLAG.lr} ${peakLr} × ${FLAG.weightDecay} must be < 1 ` +
        `(each step scales the weights by 1 − lr·wd); use ${FLAG.weightDecay} < ${1 / peakLr}`,
    );
  }
  const cores = navigator.hardwareConcurrency;
  const threadNotice = raw.threads !== null && cores > 0 && raw.threads > cores
    ? `notice: ${FLAG.threads} ${raw.threads} capped at this machine's ${cores} processors`
    : null;
  if (threadNotice !== null) raw.threads = cores;
  const warmup = raw.warmup ?? Math.round(raw.steps * 0.1);
  if (warmup > raw.steps) {
    throw new UsageError(`--warmup ${warmup}: must be ≤ --steps ${raw.steps}`);
  }
  if (
    raw.initFrom !== null && raw.model !== def("model").default && raw.model !== raw.initFrom
  ) {
    throw new UsageError(
      `${FLAG.initFrom} ${raw.initFrom}: the folder's config is the model; leave out --model`,
    );
  }
  // The folder a model comes from may hold its tokenizer.
  const folder = raw.initFrom ??
    (typeof raw.model === "string" && isDirectory(raw.model) ? raw.model : null);
  let tokenizer: Tokenizer | null = null;
  if (raw.trainTokenizer === null) {
    // a tokenizer.json that is there but unreadable is an error, not a reason to use bytes
    const path = raw.tokenizer ??
      (folder !== null && exists(`${folder}/tokenizer.json`) ? folder : null);
    try {
      tokenizer = openTokenizer(path);
    } catch (e) {
      if (!(e instanceof UsageError) || path === null) throw e;
      // the engine names the tokenizer; the user knows the flag it came from
      const flag = raw.tokenizer !== null
        ? FLAG.tokenizer
        : raw.initFrom !== null
        ? FLAG.initFrom
        : FLAG.model;
      const m = e.message.replace(/^tokenizer /, "");
      throw new UsageError(m.startsWith(path) ? `${flag} ${m}` : `${flag} ${path}: ${m}`);
    }
  }
  const vocab = raw.trainTokenizer ?? tokenizer!.vocabSize;
  let model: ResolvedModel;
  if (raw.initFrom !== null) {
    model = resolveModel(raw.initFrom, vocab, `${FLAG.initFrom} ${raw.initFrom}`);
  } else if (typeof raw.model === "string") {
    model = resolveModel(raw.model, vocab, `--model ${raw.model}`);
  } else {
    // As for files: the config's own vocabulary, which must hold every token id.
    const given = raw.model.vocab_size;
    if (typeof given === "number" && given < vocab) {
      throw new UsageError(
        `--model (config object): vocab_size ${given} is smaller than the tokenizer's ${vocab} tokens`,
      );
    }
    const config = { ...raw.model, vocab_size: given ?? vocab };
    validateModel(config, "--model (config object)");
    model = { name: "custom", config };
  }
  // The engine judges the sequence against the model's positions.
  if (resolveModelConfig(model.config, { seq_len: raw.seqLen }).problem) {
    const maxPos = model.config.max_position_embeddings;
    throw new UsageError(
      `${FLAG.seqLen} ${raw.seqLen}: must be ≤ ${maxPos} (max_position_embeddings of ${model.name})`,
    );
  }
  const { settings, notices } = resolveOptimizer(raw, model);
  if (threadNotice !== null) notices.push(threadNotice);
  if (
    raw.data !== null && folder !== null && tokenizer?.kind === "bytes" &&
    model.config.vocab_size > 256
  ) {
    notices.push(
      `notice: ${folder} has no tokenizer.json: --data is read as bytes (ids 0..255 of its ` +
        `${model.config.vocab_size}-token vocabulary); give --tokenizer to use the model's own`,
    );
  }
  return { opts: { ...raw, ...settings, warmup }, model, tokenizer, notices };
}

/**
 * A path the run reads must exist and be a regular file or folder: a FIFO or a device would
 * block or never end. Throws UsageError naming the flag.
 */
export function checkSource(flag: string, path: string, what: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    const why = e instanceof Deno.errors.NotFound ? "not found" : String(e).split("\n")[0];
    throw new UsageError(`${flag} ${path}: ${why}`);
  }
  if (!info.isFile && !info.isDirectory) {
    throw new UsageError(`${flag} ${path}: not a regular file or folder; must be ${what}`);
  }
}

/**
 * `--export DIR` must be new or an empty folder (not a link), outside the run's own folder,
 * and its parent must exist: checked before training, so a run is never lost to an export
 * that cannot be written. An export never replaces a user's files.
 */
export function checkExportDir(dir: string, out: string | null | undefined): void {
  const bad = (why: string): never => {
    throw new UsageError(`${FLAG.export} ${dir}: ${why}`);
  };
  let info: Deno.FileInfo | null = null;
  try {
    info = Deno.lstatSync(dir);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) bad(`cannot use it (${String(e).split("\n")[0]})`);
  }
  if (info !== null) {
    if (info.isSymlink) bad("is a link; name a new or empty folder");
    if (!info.isDirectory) bad("is a file; name a new or empty folder");
    for (const _ of Deno.readDirSync(dir)) {
      bad("folder is not empty; name a new or empty folder (nothing is replaced)");
    }
  } else if (!isDirectory(resolve(dir, ".."))) {
    bad(`its parent folder ${resolve(dir, "..")} does not exist`);
  }
  if (typeof out === "string") {
    const [e, o] = [resolve(dir), resolve(out)];
    if (e === o || e.startsWith(`${o}${SEP}`) || o.startsWith(`${e}${SEP}`)) {
      bad(`must be outside --out ${out} (the run writes its own files there)`);
    }
  }
}

/** The engine option of `field`'s key in the table. */
function keyOfField(field: string): OptimizerKey {
  const key = OPTIMIZER_KEYS.find((k) => def(k).engine === field);
  if (!key) throw new Error(`engine option ${field} has no entry in OPTION_TABLE`);
  return key;
}

/**
 * The optimizer settings given in `settings` (non-null, `TrainOptions` names) as an engine
 * optimizer config for `name` (engine field names); the engine fills in the rest.
 */
export function givenOptimizerConfig(
  name: string,
  settings: Partial<TrainOptions>,
): Partial<OptimizerConfig> & { name: string } {
  return { name, ...fields(settings, "engine") };
}

/** The given options that set engine config fields of `kind`, keyed by those fields. */
function fields(settings: Partial<TrainOptions>, kind: "engine" | "run"): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of KEYS) {
    const field = def(key)[kind];
    if (field !== undefined && given(settings[key])) out[field] = settings[key];
  }
  return out;
}

/**
 * Fills in the optimizer's defaults, rejects settings that do not apply to it, and checks
 * rank and group sizes against the model's matrices.
 */
function resolveOptimizer(
  raw: TrainOptions,
  model: ResolvedModel,
): { settings: OptimizerDefaults; notices: string[] } {
  const name = raw.optimizer;
  const projected = PROJECTED_OPTIMIZERS.includes(name);
  const reject = (key: OptimizerKey, why: string, value?: unknown): never => {
    const shown = given(raw[key]) ? shownValue(raw[key]) : `${shownValue(value)} (default)`;
    throw new UsageError(`${FLAG[key]} ${shown}: ${why}`);
  };
  let resolved;
  try {
    resolved = resolveOptimizerConfig(givenOptimizerConfig(raw.optimizer, raw), {
      grad_accum: raw.gradAccum,
      device: raw.device,
      precision: raw.precision,
    });
  } catch (e) {
    throw e instanceof EngineError ? new UsageError(flagNames(e.message)) : e;
  }
  const { config, not_applicable } = resolved;
  const forProjected = `applies only to --optimizer ${
    PROJECTED_OPTIMIZERS.join(", ")
  } (not ${name})`;
  // How each failed condition of the engine reads with flags.
  const why: Record<OptionCondition, () => string> = {
    all: () => "does not apply",
    projected: () => forProjected,
    eight_bit: () =>
      `applies only to the 8-bit optimizers ${EIGHT_BIT_OPTIMIZERS.join(", ")} (not ${name})`,
    int8_capable: () =>
      `INT8 weights need --optimizer ${INT8_OPTIMIZERS.join(", ")} (not ${name}); allowed here: 16`,
    int8_weights: () =>
      `applies only to INT8 weights (--optimizer ${
        INT8_OPTIMIZERS.join(", ")
      } with --weight-bits 8)`,
    quantized_projector: () => `applies only with --proj-bits 4 or 8 (here ${config.proj_bits})`,
    quantized: () =>
      "applies only when something is quantized (--weight-bits 8 or --proj-bits 4/8)",
    lazy: () => "applies only with --lazy on",
    one_micro_batch: () =>
      `needs --grad-accum 1 (here ${raw.gradAccum}): accumulated gradients must persist`,
    adapter: () => `applies only to --optimizer ${ADAPTER_OPTIMIZERS.join(", ")} (not ${name})`,
    lora: () => `applies only to --optimizer lora (qlora's base is always NF4, not ${name})`,
  };
  for (const n of not_applicable) reject(keyOfField(n.field), why[n.when]());

  const settings = settingsOf(name, config, raw);
  // What the engine's resolution says applies: INT8 weights.
  const int8 = settings.weightGroupSize !== null;

  // The engine judges group sizes and ranks against the model's matrices (one check,
  // `plan::fit` in rust/src/plan.rs); its notes name engine-config fields, shown here as flags.
  const notices: string[] = [];
  if (int8 || projected || ADAPTER_OPTIMIZERS.includes(name)) {
    const fit = planEngine({
      model: model.config,
      batch_size: raw.batchSize,
      seq_len: raw.seqLen,
      device: "cpu",
      optimizer: engineOptimizerConfig({ ...raw, ...settings, warmup: 0 }),
    }, model.name);
    const p = fit.problem;
    if (p) reject(keyOfField(p.field), p.why, p.value);
    for (const n of fit.notices) {
      notices.push(`notice: ${FLAG[keyOfField(n.field)]} ${n.value} ${n.why}`);
    }
  }
  return { settings, notices };
}

/**
 * The optimizer section of the engine config (`rust/src/config.rs`) for resolved options:
 * every setting that applies to the optimizer, none that does not.
 */
export function engineOptimizerConfig(opts: ResolvedOptions): OptimizerConfig {
  return givenOptimizerConfig(opts.optimizer, opts) as OptimizerConfig;
}

/**
 * The whole engine config (`rust/src/config.rs`) for resolved options and a model: the
 * run-level fields the table maps (`run`), left out where null so the engine's default
 * applies, and the optimizer section ({@link engineOptimizerConfig}).
 */
export function engineConfig(opts: ResolvedOptions, model: ModelConfig): EngineConfig {
  const cfg = { model, ...fields(opts, "run"), optimizer: engineOptimizerConfig(opts) };
  return cfg as unknown as EngineConfig;
}

/**
 * An engine message worded for the CLI: the engine writes a setting as its config field and
 * value ("use device cpu or auto"), the user knows flags ("use --device cpu or auto"). A
 * value the engine quotes back (`precision = bf16`) stays as it is.
 */
export function flagNames(message: string): string {
  let out = message;
  // the engine's memory refusal (rust/src/train.rs `memory_refusal`) suggests settings
  if (/ available; try /.test(out)) {
    out = out.replace(/\bcheckpointing true\b/g, `${FLAG.checkpointing} on`)
      .replace(/\boptimizer (\w+)/g, `${FLAG.optimizer} $1`)
      .replace(/\bclip_mode two-backward\b/g, `${FLAG.clipMode} two-backward`)
      .replace(/\bbatch_size\b/g, FLAG.batchSize).replace(/\bseq_len\b/g, FLAG.seqLen);
  }
  // a text value only the engine checks (`lora_targets = q_proj,lm_head: must be …`)
  const lead = /^(\w+) = /.exec(out);
  const leadKey = lead && KEYS.find((k) => def(k).kind === "text" && def(k).engine === lead[1]);
  if (lead && leadKey) out = `${FLAG[leadKey]} ${out.slice(lead[0].length)}`;
  // a switch value only the engine refuses (`freeze_embeddings = false: lora always …`)
  const sw = /^(\w+) = (true|false)\b/.exec(out);
  const swKey = sw && KEYS.find((k) => def(k).kind === "switch" && def(k).engine === sw[1]);
  if (sw && swKey) {
    out = `${FLAG[swKey]} ${sw[2] === "true" ? "on" : "off"}${out.slice(sw[0].length)}`;
  }
  // `proj_grad factored needs clip 0` (rust/src/config.rs)
  out = out.replace(/\bneeds clip 0\b/g, `needs ${FLAG.clip} 0`).replace(
    /\bor clip 0\b/g,
    `or ${FLAG.clip} 0`,
  );
  for (const key of CHOICE_OPTIONS) {
    const field = def(key).engine ?? def(key).run;
    if (field === undefined) continue;
    const values = CHOICES[key].join("|");
    out = out.replace(new RegExp(`\\b${field} (${values})\\b`, "g"), `${FLAG[key]} $1`);
  }
  return out;
}

/** {@link flagNames} for an engine error; other errors pass through. */
export function withFlags(e: unknown): unknown {
  if (!(e instanceof EngineError)) return e;
  const msg = flagNames(e.message);
  return msg === e.message ? e : new EngineError(e.code, msg);
}
