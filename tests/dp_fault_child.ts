// One rank of tests/dp_faults_test.ts: trains like tests/dp_child.ts (options in argv[0] as
// JSON, the run folder argv[1]/run) and, on rank `faultRank` right after update `faultAt`,
// plays a fault: `hang` stops the process (SIGSTOP: alive, never answering again) and `kill`
// ends it at once (SIGKILL: no finalize, no checkpoint). It prints its pid first, so the test
// can check that the job's end took the stopped process with it.
import { train } from "../lib/trainer.ts";
import { world } from "../lib/dist.ts";

const [optsJson, dir] = Deno.args;
const { faultAt, faultRank, fault, ...opts } = JSON.parse(optsJson);
await train(
  { ...opts, ...(opts.resume ? {} : { out: `${dir}/run` }), quiet: true },
  {
    onStep: (r) => {
      if (r.step !== faultAt || world().rank !== faultRank) return;
      console.log(`DP-FAULT ${fault} rank ${faultRank} pid ${Deno.pid} after update ${r.step}`);
      Deno.kill(Deno.pid, fault === "hang" ? "SIGSTOP" : "SIGKILL");
    },
  },
);
console.log(`DP-FAULT-CHILD-OK ${world().rank}`);
