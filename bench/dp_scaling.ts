/**
 * CPU scaling of data-parallel training from 1 to 2 ranks: training tokens per second of one
 * process with global batch 2B against `mpirun -np 2` with batch B per rank (the same global
 * batch, the same updates), for GaLore (rank `--rank`, 32 by default: at the default 128
 * llama-9m's R is as large as its gradients) on llama-9m and llama-35m, with the full and the
 * low-rank all-reduce (`--dp-comm`). Each rank gets `threads` engine threads (default: half
 * the cores, so 2 ranks use the machine as one process does with all of them). Measure on a
 * quiet machine: other processes distort both sides.
 *
 *   deno run -A bench/dp_scaling.ts [--steps 20] [--batch 8] [--seq 128] [--rank 32] [--out FILE.jsonl]
 * @module
 */
import { parseArgs } from "node:util";
import { mpirun, MPIRUN_ENV, MPIRUN_FLAGS } from "../tests/mpi_run.ts";

const { values: args } = parseArgs({
  options: {
    steps: { type: "string", default: "20" },
    batch: { type: "string", default: "8" },
    seq: { type: "string", default: "128" },
    rank: { type: "string", default: "32" },
    threads: { type: "string" },
    out: { type: "string" },
  },
});
const STEPS = Number(args.steps), B = Number(args.batch), SEQ = Number(args.seq);
const cores = navigator.hardwareConcurrency;
const PRETRAIN = new URL("../examples/pretrain.ts", import.meta.url).pathname;
const bin = mpirun();
if (bin === null) throw new Error("mpirun not found (install openmpi-bin libopenmpi-dev)");

interface Result {
  model: string;
  ranks: number;
  dp_comm: string;
  rank: number;
  threads_per_rank: number;
  global_batch: number;
  seq_len: number;
  steps: number;
  tokens_per_s: number;
  comm_bytes_per_step: number | null;
}

async function once(model: string, ranks: number, comm: string): Promise<Result> {
  const dir = await Deno.makeTempDir({ prefix: "qgalore-dpscale-" });
  const threads = Number(args.threads ?? Math.max(1, Math.floor(cores / ranks)));
  const train = [
    "run",
    "-A",
    PRETRAIN,
    "--model",
    model,
    "--optimizer",
    "galore",
    "--rank",
    String(args.rank),
    "--clip",
    "0",
    "--fused",
    "off",
    "--steps",
    String(STEPS),
    "--eval-every",
    "0",
    "--eval-batches",
    "1",
    "--seq-len",
    String(SEQ),
    "--batch-size",
    String((2 * B) / ranks),
    "--threads",
    String(threads),
    "--dp-comm",
    comm,
    "--out",
    `${dir}/run`,
  ];
  try {
    const cmd = ranks === 1
      ? new Deno.Command(Deno.execPath(), { args: train, stdout: "piped", stderr: "piped" })
      : new Deno.Command(bin!, {
        args: [
          ...MPIRUN_FLAGS.map((f) => (f === "2" ? String(ranks) : f)),
          Deno.execPath(),
          ...train,
        ],
        env: MPIRUN_ENV,
        stdout: "piped",
        stderr: "piped",
      });
    const out = await cmd.output();
    if (out.code !== 0) throw new Error(new TextDecoder().decode(out.stderr));
    const s = JSON.parse(Deno.readTextFileSync(`${dir}/run/summary.json`));
    // this rank's tokens over its training seconds: the time; the global batch's tokens over it
    const seconds = s.tokens / s.tokens_per_s;
    return {
      model,
      ranks,
      dp_comm: ranks === 1 ? "none" : s.data_parallel.comm.used,
      rank: Number(args.rank),
      threads_per_rank: threads,
      global_batch: 2 * B,
      seq_len: SEQ,
      steps: STEPS,
      tokens_per_s: Math.round((STEPS * 2 * B * SEQ) / seconds),
      comm_bytes_per_step: ranks === 1 ? null : s.data_parallel.comm.bytes_per_step.total,
    };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const results: Result[] = [];
for (const model of ["llama-9m", "llama-35m"]) {
  for (const [ranks, comm] of [[1, "auto"], [2, "full"], [2, "lowrank"]] as const) {
    const r = await once(model, ranks, comm);
    console.log(JSON.stringify(r));
    results.push(r);
  }
}
if (args.out) {
  Deno.writeTextFileSync(
    args.out,
    results.map((r) => JSON.stringify(r)).join("\n") + "\n",
  );
}
