/**
 * Markdown table of a bench/vs_pytorch.ts results file (JSON lines): one row per case from its
 * `run` lines (so an interrupted run still tabulates what it measured), the machine line's
 * processor, date and GEMM rates above it. A bf16 case (`MODEL:OPTIMIZER:bf16`: ours at
 * `--precision bf16`, PyTorch under autocast) whose ours side is `unavailable` on this processor
 * shows that reason in place of our numbers.
 *
 *   deno run -A bench/vs_pytorch_table.ts bench/results/vs-pytorch-cpu-DATE.jsonl > DATE.md
 * @module
 */

type Line = Record<string, unknown>;

const GB = 1e9;
const fmt = (x: number) => Math.round(x).toLocaleString("en-US");
const range = (xs: number[], f: (x: number) => string) => {
  if (xs.length === 0) return "–";
  const lo = Math.min(...xs);
  const hi = Math.max(...xs);
  return lo === hi ? f(lo) : `${f(lo)}–${f(hi)}`;
};

/** The markdown text for the lines of one results file. */
export function table(lines: Line[]): string {
  const machine = lines.find((l) => l.kind === "machine") ?? {};
  const cpu = (machine.cpu ?? {}) as Record<string, unknown>;
  const gemm = (machine.gemm_2048 ?? {}) as Record<string, unknown>;
  const v = (machine.versions ?? {}) as Record<string, unknown>;
  const runs = lines.filter((l) => l.kind === "run");
  const cases = [...new Set(runs.map((r) => String(r.case)))];
  const out: string[] = [];
  out.push(
    `Processor: ${cpu.model_name} (family ${cpu.family}, model ${cpu.model}, ${cpu.cpus} CPUs, ` +
      `${(cpu.simd as string[] | undefined)?.join(", ")}); date ${machine.date}; ` +
      `${machine.threads} threads each side, batch ${machine.batch}, seq ${machine.seq}, ` +
      `median of ${machine.steps} steps after ${machine.warmup} warm-up, ` +
      `${machine.reps} repetitions, sides alternating.`,
    "",
    `GEMM 2048³ in the same run: ours ${gemm.ours_gflops} GFLOP/s, torch.mm ${gemm.torch_gflops} ` +
      `GFLOP/s (best ${gemm.torch_gflops_best}), ratio ${gemm.ratio}.`,
    "",
    `Versions: torch ${v.torch}, transformers ${v.transformers}, galore-torch ${v.galore_torch}, ` +
      `q-galore-torch ${v.q_galore_torch}, bitsandbytes ${v.bitsandbytes}, Python ${v.python}, ` +
      `Deno ${v.deno}.`,
    "",
    "| model, optimizer | qgalore tokens/s | PyTorch tokens/s | qgalore ÷ PyTorch | " +
      "÷ per CPU-second | peak RSS qgalore / PyTorch | load average |",
    "|---|---|---|---|---|---|---|",
  );
  for (const c of cases) {
    const of = (side: string) => runs.filter((r) => r.case === c && r.side === side);
    const ours = of("ours");
    const torch = of("pytorch");
    const num = (rs: Line[], k: string) =>
      rs.map((r) => r[k]).filter((x): x is number => typeof x === "number");
    const ratios: number[] = [];
    const cpuRatios: number[] = [];
    for (const o of ours) {
      const p = torch.find((t) => t.rep === o.rep);
      if (typeof o.tokens_per_s === "number" && typeof p?.tokens_per_s === "number") {
        ratios.push(o.tokens_per_s / p.tokens_per_s);
      }
      if (typeof o.tokens_per_cpu_s === "number" && typeof p?.tokens_per_cpu_s === "number") {
        cpuRatios.push(o.tokens_per_cpu_s / p.tokens_per_cpu_s);
      }
    }
    const rss = (rs: Line[]) => {
      const xs = num(rs, "peak_rss_self");
      return xs.length ? (Math.max(...xs) / GB).toFixed(2) : "–";
    };
    const loads = num([...ours, ...torch], "load_before");
    const errors = [...ours, ...torch].filter((r) => r.error).length;
    const missing = ours.find((r) => typeof r.unavailable === "string")?.unavailable;
    const oursTps = missing ? String(missing) : range(num(ours, "tokens_per_s"), fmt);
    out.push(
      `| ${c.replaceAll(":", " ")} | ${oursTps} | ` +
        `${range(num(torch, "tokens_per_s"), fmt)}${errors ? ` (${errors} failed)` : ""} | ` +
        `${range(ratios, (x) => x.toFixed(2))} | ${range(cpuRatios, (x) => x.toFixed(2))} | ` +
        `${rss(ours)} / ${rss(torch)} GB | ${range(loads, (x) => x.toFixed(1))} |`,
    );
  }
  return out.join("\n") + "\n";
}

if (import.meta.main) {
  const path = Deno.args[0];
  if (!path) {
    console.error("usage: deno run -A bench/vs_pytorch_table.ts RESULTS.jsonl");
    Deno.exit(2);
  }
  const lines = Deno.readTextFileSync(path).split("\n").filter((l) => l.trim()).map((l) =>
    JSON.parse(l) as Line
  );
  console.log(table(lines));
}
