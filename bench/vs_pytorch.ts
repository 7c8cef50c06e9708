/**
 * qgalore against PyTorch on the CPU, side by side (issue 13, deliverable 1). Benchmark only:
 * never run by CI or the test suite.
 *
 *   deno run -A bench/vs_pytorch.ts [--cases llama-35m:adamw,llama-60m:qgalore,...]
 *       [--precision fp32,bf16] [--steps 8] [--warmup 2] [--threads 2] [--batch 8] [--seq 256]
 *       [--reps 2] [--data FILE] [--out FILE.jsonl] [--no-profile]
 *       [--clip X (both sides; default the project's 1)] [--proj-grad full|factored (ours)]
 *
 * On first use it makes a venv in .venv/vs-pytorch (Python ≥ 3.11: `$QGALORE_BENCH_PYTHON`, else
 * the first of python3.12, python3.13, python3.11, python3 that is new enough) and installs
 * the pinned reference from bench/vs_pytorch_requirements.txt: torch, transformers,
 * galore-torch, q-galore-torch, bitsandbytes. It reinstalls when that file changes.
 *
 * Each case is a preset (byte vocabulary, 256) and an optimizer at the project's defaults:
 * the engine config comes from the CLI's option resolution (`checkOptions`, `engineConfig`),
 * so clipping is on (1) and the GaLore family steps inside the backward (fused) as the
 * engine defaults; lr is the optimizer's default peak lr, held constant (no schedule) on both
 * sides. bench/vs_pytorch.py builds Hugging Face `LlamaForCausalLM` (fp32, default attention)
 * from the same model config and the optimizer from the same settings (torch AdamW,
 * galore-torch GaLoreAdamW, q-galore-torch QGaLoreAdamW8bit with INT8 weights), with
 * `clip_grad_norm_` at the same threshold. Both train on the same batches of the same bytes.
 *
 * `--precision bf16` (issue 13, deliverable 3) runs each case again with ours at
 * `--precision bf16` (bf16 activations and GEMM inputs, fp32 accumulation, weights and state)
 * against PyTorch under `torch.autocast("cpu", dtype=torch.bfloat16)`; its lines carry
 * `precision: "bf16"` and its case is labelled `MODEL:OPTIMIZER:bf16`. Our bf16 needs
 * AVX512-BF16 or AMX-BF16: on a processor without them the PyTorch side is still measured and
 * ours is recorded as a `run` line with `unavailable: "ours: not available on this CPU
 * (REASON)"` (the engine's own refusal), not as a failure.
 *
 * Every measurement runs in its own process (so peak RSS is per side); sides alternate,
 * case by case, for `--reps` repetitions. Tokens/s is batch·seq over the median step time of
 * `--steps` timed steps after `--warmup` untimed ones. Output (stdout and `--out`): one JSON
 * line about the machine (lscpu, both GEMM rates on 2048³ at the same threads, versions), then
 * one line per case.
 * @module
 */
import { parseArgs } from "node:util";
import { dirname, join } from "node:path";
import { Engine, type EngineConfig, gemmGflops } from "../ffi/engine.ts";
import { checkOptions, engineConfig, PROJECTED_OPTIMIZERS } from "../lib/options.ts";
import type { Precision } from "../lib/option_table.ts";
import { modelConfig } from "../lib/presets.ts";
import { lscpu } from "./common.ts";

const HERE = import.meta.dirname!;
const ROOT = dirname(HERE);
// outside bench/ so that `deno check bench/` does not walk into it (git-ignored by `.venv/`)
const VENV = join(ROOT, ".venv", "vs-pytorch");
const REQUIREMENTS = join(HERE, "vs_pytorch_requirements.txt");
const PY_SCRIPT = join(HERE, "vs_pytorch.py");
const ALL_CASES = [
  "llama-35m:adamw",
  "llama-35m:galore",
  "llama-35m:qgalore",
  "llama-60m:adamw",
  "llama-60m:galore",
  "llama-60m:qgalore",
];
const OPTIMIZERS = ["adamw", "galore", "qgalore"];

const { values } = parseArgs({
  options: {
    cases: { type: "string", default: ALL_CASES.join(",") },
    precision: { type: "string", default: "fp32,bf16" },
    steps: { type: "string", default: "8" },
    warmup: { type: "string", default: "2" },
    threads: { type: "string", default: "2" },
    batch: { type: "string", default: "8" },
    seq: { type: "string", default: "256" },
    reps: { type: "string", default: "2" },
    data: { type: "string" },
    out: { type: "string" },
    "no-profile": { type: "boolean", default: false },
    // both sides: the clipping threshold (default: the project's, 1); ours: --proj-grad
    clip: { type: "string" },
    "proj-grad": { type: "string" },
    // internal: one measurement of our side in this process
    child: { type: "string" },
  },
});

function positiveInt(flag: string, raw: string | undefined): number {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) {
    console.error(`--${flag} ${raw}: must be an integer ≥ 1`);
    Deno.exit(2);
  }
  return n;
}

const steps = positiveInt("steps", values.steps);
const warmup = Number(values.warmup);
if (!Number.isInteger(warmup) || warmup < 0) {
  console.error(`--warmup ${values.warmup}: must be an integer ≥ 0`);
  Deno.exit(2);
}
const threads = positiveInt("threads", values.threads);
const batch = positiveInt("batch", values.batch);
const seq = positiveInt("seq", values.seq);
const reps = positiveInt("reps", values.reps);
const PRECISIONS = ["fp32", "bf16"];
const precisions = values.precision!.split(",").map((p) => p.trim()).filter((p) => p);
if (precisions.length === 0 || precisions.some((p) => !PRECISIONS.includes(p))) {
  console.error(
    `--precision ${values.precision}: must be a comma list of ${PRECISIONS.join(", ")}`,
  );
  Deno.exit(2);
}

/**
 * The engine config of one case at the project's defaults, and its default peak lr. Throws
 * the engine's one-line refusal where `precision` bf16 is not available on this processor.
 */
function caseConfig(
  model: string,
  optimizer: string,
  precision = "fp32",
): { config: EngineConfig; lr: number } {
  const { opts } = checkOptions({
    model,
    optimizer,
    batchSize: batch,
    seqLen: seq,
    device: "cpu",
    precision: precision as Precision,
    threads,
    ...(values.clip !== undefined ? { clip: Number(values.clip) } : {}),
    ...(values["proj-grad"] && PROJECTED_OPTIMIZERS.includes(optimizer)
      ? { projGrad: values["proj-grad"] }
      : {}),
  });
  return { config: engineConfig(opts, modelConfig(model, 256)), lr: opts.lr };
}

/** Why our side cannot run `precision` here (null: it can): the engine's refusal, one line. */
function oursUnavailable(model: string, optimizer: string, precision: string): string | null {
  try {
    caseConfig(model, optimizer, precision);
    return null;
  } catch (e) {
    return `ours: not available on this CPU (${e instanceof Error ? e.message : String(e)})`;
  }
}

function dataFile(): string {
  if (values.data) return values.data;
  const candidates = [
    join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"),
    "/work/shared/data/tinyshakespeare.txt",
  ];
  for (const c of candidates) {
    try {
      if (Deno.statSync(c).isFile) return c;
    } catch {
      // next
    }
  }
  return join(ROOT, "README.md"); // any text will do: the bytes are the tokens
}

/**
 * Step s's batch: `batch` windows of seq + 1 bytes at offsets (s·batch + i)·(seq + 1) modulo
 * (file length − seq − 1): the same formula as `batches` in bench/vs_pytorch.py.
 */
function stepBatch(bytes: Uint8Array, s: number): Int32Array {
  const n = bytes.length - (seq + 1);
  const out = new Int32Array(batch * (seq + 1));
  for (let i = 0; i < batch; i++) {
    const off = ((s * batch + i) * (seq + 1)) % n;
    for (let j = 0; j <= seq; j++) out[i * (seq + 1) + j] = bytes[off + j];
  }
  return out;
}

function vmHwm(): number {
  const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(Deno.readTextFileSync("/proc/self/status"));
  return m ? Number(m[1]) * 1024 : 0;
}

/** CPU seconds (user + system, all threads) this process has used so far. */
function cpuSeconds(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
}

function loadAvg(): number {
  return Number(Deno.readTextFileSync("/proc/loadavg").split(" ")[0]);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const h = s.length >> 1;
  return s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2;
}

const r4 = (x: number) => Math.round(x * 1e4) / 1e4;

/** One measurement of our engine (run in a child process). */
async function oursChild(model: string, optimizer: string, data: string, precision: string) {
  const { config, lr } = caseConfig(model, optimizer, precision);
  const bytes = Deno.readFileSync(data);
  const e = await Engine.create(config);
  const losses: number[] = [];
  for (let s = 0; s < warmup; s++) {
    losses.push((await e.trainStep(stepBatch(bytes, s), 1, lr)).loss);
  }
  const before = e.info().timing;
  const times: number[] = [];
  const cpu0 = cpuSeconds();
  for (let s = warmup; s < warmup + steps; s++) {
    const tokens = stepBatch(bytes, s);
    const t0 = performance.now();
    const st = await e.trainStep(tokens, 1, lr);
    times.push((performance.now() - t0) / 1000);
    losses.push(st.loss);
  }
  const cpuPerStep = (cpuSeconds() - cpu0) / steps;
  const peak = vmHwm();
  const info = e.info() as unknown as Record<string, unknown>;
  const after = e.info().timing;
  const memory = e.memory();
  e[Symbol.dispose]();
  const med = median(times);
  const split: Record<string, number> = {};
  for (const k of Object.keys(after) as (keyof typeof after)[]) {
    split[k] = r4((after[k] - before[k]) / steps);
  }
  return {
    side: "ours",
    params: info.params,
    fused: info.fused,
    clip_mode: info.clip_mode ?? null,
    precision: info.precision,
    lr,
    lr_note: "constant lr (no schedule)",
    config: config.optimizer,
    step_s: times.map(r4),
    median_step_s: r4(med),
    tokens_per_s: Math.round(batch * seq / med * 10) / 10,
    losses: losses.map(r4),
    cpu_s_per_step: r4(cpuPerStep),
    tokens_per_cpu_s: Math.round(batch * seq / cpuPerStep * 10) / 10,
    timing_per_step: split,
    // the engine's per-op profile (QGALORE_PROFILE=1), where this build has one
    profile: info.profile ?? null,
    svd_count: info.svd_count ?? null,
    memory,
    peak_rss_self: peak,
  };
}

/** Runs a child process, sampling its VmHWM; returns its last stdout line as JSON. */
async function runChild(
  cmd: string,
  args: string[],
  env: Record<string, string> = {},
): Promise<Record<string, unknown>> {
  const child = new Deno.Command(cmd, {
    args,
    env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let sampled = 0;
  const sample = () => {
    try {
      const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(Deno.readTextFileSync(`/proc/${child.pid}/status`));
      if (m) sampled = Math.max(sampled, Number(m[1]) * 1024);
    } catch {
      // exited
    }
  };
  const load = loadAvg();
  const timer = setInterval(sample, 50);
  const out = await child.output();
  clearInterval(timer);
  const stdout = new TextDecoder().decode(out.stdout).trim();
  const stderr = new TextDecoder().decode(out.stderr).trim();
  const last = stdout.split("\n").pop() ?? "";
  if (!out.success || !last.startsWith("{")) {
    const tail = stderr.split("\n").slice(-15).join("\n");
    return { error: `exit ${out.code}: ${tail || stdout.slice(-2000)}` };
  }
  const r = JSON.parse(last) as Record<string, unknown>;
  return { ...r, peak_rss_sampled: sampled, load_before: load, load_after: loadAvg() };
}

function pythonOk(exe: string): boolean {
  try {
    const r = new Deno.Command(exe, {
      args: ["-c", "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)"],
      stdout: "null",
      stderr: "null",
    }).outputSync();
    return r.success;
  } catch {
    return false;
  }
}

/** The venv's interpreter, making the venv and installing the pinned packages when needed. */
async function venvPython(): Promise<string> {
  const py = join(VENV, "bin", "python");
  const stamp = join(VENV, ".qgalore-requirements");
  const want = Deno.readTextFileSync(REQUIREMENTS);
  let have = "";
  try {
    have = Deno.readTextFileSync(stamp);
  } catch {
    // not installed yet
  }
  if (have === want && pythonOk(py)) return py;
  let base = "";
  if (!pythonOk(py)) {
    const env = Deno.env.get("QGALORE_BENCH_PYTHON");
    const candidates = env ? [env] : ["python3.12", "python3.13", "python3.11", "python3"];
    base = candidates.find(pythonOk) ?? "";
    if (!base) {
      throw new Error(
        `no Python ≥ 3.11 found (tried ${candidates.join(", ")}); set QGALORE_BENCH_PYTHON`,
      );
    }
    console.error(`vs_pytorch: making ${VENV} with ${base}`);
    const mk = await new Deno.Command(base, { args: ["-m", "venv", VENV] }).output();
    if (!mk.success) throw new Error(`${base} -m venv ${VENV} failed`);
  }
  console.error(`vs_pytorch: installing ${REQUIREMENTS} into ${VENV} (several GB the first time)`);
  // pip's report goes to stderr: stdout is the benchmark's JSON lines
  const pip = await new Deno.Command(py, {
    args: ["-m", "pip", "install", "--progress-bar", "off", "-r", REQUIREMENTS],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  await Deno.stderr.write(pip.stdout);
  if (!pip.success) throw new Error(`pip install -r ${REQUIREMENTS} failed`);
  Deno.writeTextFileSync(stamp, want);
  return py;
}

function emit(line: Record<string, unknown>) {
  const text = JSON.stringify(line);
  console.log(text);
  if (values.out) Deno.writeTextFileSync(values.out, text + "\n", { append: true });
}

async function main() {
  const cases = values.cases!.split(",").map((c) => c.trim()).filter((c) => c);
  for (const c of cases) {
    const [model, opt] = c.split(":");
    if (!opt || !OPTIMIZERS.includes(opt)) {
      console.error(`--cases ${c}: must be PRESET:OPTIMIZER with OPTIMIZER one of ${OPTIMIZERS}`);
      Deno.exit(2);
    }
    caseConfig(model, opt); // a bad preset fails here, before anything is installed
  }
  const data = dataFile();
  const py = await venvPython();
  if (values.out) Deno.writeTextFileSync(values.out, "");

  const torchGemm = await runChild(py, [PY_SCRIPT, "gemm", "--threads", `${threads}`]);
  const ours = await gemmGflops(2048, 2048, 2048, 5, threads);
  emit({
    kind: "machine",
    date: new Date().toISOString(),
    cpu: lscpu(),
    threads,
    batch,
    seq,
    steps,
    warmup,
    reps,
    data,
    gemm_2048: {
      ours_gflops: Math.round(ours * 10) / 10,
      torch_gflops: torchGemm.torch_gemm_gflops ?? null,
      torch_gflops_best: torchGemm.torch_gemm_gflops_best ?? null,
      ratio: typeof torchGemm.torch_gemm_gflops === "number"
        ? r4(ours / torchGemm.torch_gemm_gflops)
        : null,
      error: torchGemm.error,
    },
    versions: { deno: Deno.version.deno, ...(torchGemm.versions as object ?? {}) },
  });

  const runs: Record<
    string,
    { ours: Record<string, unknown>[]; torch: Record<string, unknown>[] }
  > = {};
  // (case, precision) pairs, labelled MODEL:OPTIMIZER (fp32) or MODEL:OPTIMIZER:bf16
  const jobs = precisions.flatMap((precision) =>
    cases.map((c) => ({ c, precision, label: precision === "fp32" ? c : `${c}:${precision}` }))
  );
  const unavailable: Record<string, string | null> = {};
  for (const { c, precision, label } of jobs) {
    runs[label] = { ours: [], torch: [] };
    const [model, opt] = c.split(":");
    unavailable[label] = oursUnavailable(model, opt, precision);
    if (unavailable[label]) console.error(`vs_pytorch: ${label}: ${unavailable[label]}`);
  }
  for (let rep = 0; rep < reps; rep++) {
    for (const { c, precision, label } of jobs) {
      const [model, opt] = c.split(":");
      // the PyTorch side takes the fp32 config (the same model and optimizer settings)
      const { config, lr } = caseConfig(model, opt);
      const spec = {
        precision,
        model: config.model,
        optimizer: config.optimizer,
        lr,
        clip: Number(config.optimizer.clip),
        batch,
        seq,
        steps,
        warmup,
        data,
        profile: !values["no-profile"],
      };
      // the profiles come from the first repetition only (torch.profiler costs an extra step)
      const oursRun = (profile: boolean) =>
        runChild(
          Deno.execPath(),
          [
            "run",
            "-A",
            import.meta.filename!,
            "--child",
            c,
            "--steps",
            `${steps}`,
            "--warmup",
            `${warmup}`,
            "--threads",
            `${threads}`,
            "--batch",
            `${batch}`,
            "--seq",
            `${seq}`,
            "--data",
            data,
            "--precision",
            precision,
            ...(values.clip !== undefined ? ["--clip", values.clip] : []),
            ...(values["proj-grad"] ? ["--proj-grad", values["proj-grad"]] : []),
          ],
          values["no-profile"] || !profile ? {} : { QGALORE_PROFILE: "1" },
        );
      const torchRun = (profile: boolean) =>
        runChild(py, [
          PY_SCRIPT,
          "train",
          "--threads",
          `${threads}`,
          "--spec",
          JSON.stringify({ ...spec, profile: spec.profile && profile }),
        ]);
      // alternate which side goes first from one repetition to the next
      const order = rep % 2 === 0 ? ["ours", "torch"] : ["torch", "ours"];
      for (const side of order) {
        const skip = side === "ours" ? unavailable[label] : null;
        console.error(`vs_pytorch: rep ${rep + 1}/${reps} ${label} ${side}`);
        const r: Record<string, unknown> = skip
          ? { side: "ours", precision, unavailable: skip }
          : side === "ours"
          ? await oursRun(rep === 0)
          : await torchRun(rep === 0);
        if (r.error) console.error(`vs_pytorch: ${label} ${side}: ${r.error}`);
        else if (!skip) {
          console.error(`vs_pytorch:   ${r.tokens_per_s} tokens/s, load ${r.load_before}`);
        }
        runs[label][side as "ours" | "torch"].push(r);
        // every measurement as it comes, so that an interrupted run keeps what it measured
        const { versions: _v, ...rest } = r;
        emit({
          kind: "run",
          rep: rep + 1,
          case: label,
          side: side === "torch" ? "pytorch" : side,
          precision,
          ...rest,
        });
      }
    }
  }

  for (const { c, precision, label } of jobs) {
    const [model, opt] = c.split(":");
    const { ours, torch } = runs[label];
    const tps = (rs: Record<string, unknown>[]) =>
      rs.map((r) => (typeof r.tokens_per_s === "number" ? r.tokens_per_s : null));
    const perCpu = (rs: Record<string, unknown>[]) =>
      rs.map((r) => (typeof r.tokens_per_cpu_s === "number" ? r.tokens_per_cpu_s : null));
    const oc = perCpu(ours);
    const pc = perCpu(torch);
    const rss = (rs: Record<string, unknown>[]) =>
      rs.map((r) => (typeof r.peak_rss_self === "number" ? r.peak_rss_self : null));
    const o = tps(ours);
    const p = tps(torch);
    const ratio = o.map((x, i) => (x !== null && p[i] !== null ? r4(x / p[i]!) : null));
    const maxOf = (xs: (number | null)[]) =>
      xs.every((x) => x === null) ? null : Math.max(...xs.filter((x) => x !== null) as number[]);
    const rssO = maxOf(rss(ours));
    const rssP = maxOf(rss(torch));
    const last = <T>(xs: T[]) => xs[xs.length - 1];
    emit({
      kind: "case",
      case: label,
      model,
      optimizer: opt,
      precision,
      ours_unavailable: unavailable[label],
      batch,
      seq,
      threads,
      steps,
      reps,
      ours_tokens_per_s: o,
      pytorch_tokens_per_s: p,
      ratio,
      // tokens per CPU-second (all threads): less sensitive to other load on the machine
      ours_tokens_per_cpu_s: oc,
      pytorch_tokens_per_cpu_s: pc,
      ratio_per_cpu_s: oc.map((x, i) => (x !== null && pc[i] !== null ? r4(x / pc[i]!) : null)),
      load_avg: [...ours, ...torch].map((r) => r.load_before ?? null),
      peak_rss_ours: rssO,
      peak_rss_pytorch: rssP,
      rss_ratio: rssO !== null && rssP !== null ? r4(rssO / rssP) : null,
      params: { ours: last(ours).params ?? null, pytorch: last(torch).params ?? null },
      pytorch_model_shape: last(torch).model_shape ?? null,
      ours_config: last(ours).config ?? null,
      first_losses: {
        ours: (last(ours).losses as number[] | undefined)?.slice(0, 3) ?? null,
        pytorch: (last(torch).losses as number[] | undefined)?.slice(0, 3) ?? null,
      },
      ours_timing_per_step: ours.map((r) => r.timing_per_step ?? null),
      pytorch_timing_per_step: torch.map((r) => r.timing_per_step ?? null),
      ours_profile: ours[0]?.profile ?? null,
      pytorch_profile: torch[0]?.profile ?? null,
      pytorch_notes: last(torch).notes ?? null,
      errors: [...ours, ...torch].map((r) => r.error).filter((e) => e),
    });
  }
}

if (values.child) {
  const [model, opt] = values.child.split(":");
  console.log(
    JSON.stringify(await oursChild(model, opt, values.data ?? dataFile(), precisions[0])),
  );
} else if (import.meta.main) {
  await main();
}
