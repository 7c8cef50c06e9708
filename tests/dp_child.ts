// One process (or one rank under mpirun) of tests/dp_test.ts: trains with the options in
// argv[0] (JSON), writes metrics.jsonl into argv[1] (rank 0) and saves every rank's engine
// state to argv[1]/rank-<r>.safetensors after the last update.
import { train } from "../lib/trainer.ts";
import { world } from "../lib/dist.ts";
import { Engine, type EngineConfig } from "../ffi/engine.ts";

const [optsJson, dir] = Deno.args;
const { stopAfter, ...opts } = JSON.parse(optsJson);
let engine: Engine | null = null;
// `stopAfter`: stop after that update like Ctrl-C (rank 0 saves a checkpoint to resume from)
const stop = new AbortController();
await train(
  { ...opts, ...(opts.resume ? {} : { out: `${dir}/run` }), quiet: true },
  {
    createEngine: async (cfg: EngineConfig) => (engine = await Engine.create(cfg)),
    onStep: async (r) => {
      if (r.step === opts.steps) await engine!.save(`${dir}/rank-${world().rank}.safetensors`);
      if (r.step === stopAfter) stop.abort();
    },
    signal: stop.signal,
  },
);
console.log(`DP-CHILD-OK ${world().rank}`);
