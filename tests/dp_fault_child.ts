// One rank of tests/dp_faults_test.ts: trains like tests/dp_child.ts (options in argv[0] as
// JSON, the run folder argv[1]/run) and, on rank `faultRank` right after update `faultAt`,
// plays a fault: `hang` stops the process (SIGSTOP: alive, never answering again) and `kill`
// ends it at once (SIGKILL: no finalize, no checkpoint); `throw` fails on that rank alone
// and exits with one line as the command line does. Every rank prints its pid after the
// first update, so the test can check that the job's end took every rank with it.
import { train } from "../lib/trainer.ts";
import { world } from "../lib/dist.ts";

const [optsJson, dir] = Deno.args;
const { faultAt, faultRank, fault, ...opts } = JSON.parse(optsJson);
try {
  await train(
    { ...opts, ...(opts.resume ? {} : { out: `${dir}/run` }), quiet: true },
    {
      onStep: (r) => {
        if (r.step === 1 && !opts.resume) console.log(`DP-RANK ${world().rank} pid ${Deno.pid}`);
        if (r.step !== faultAt || world().rank !== faultRank) return;
        console.log(`DP-FAULT ${fault} rank ${faultRank} pid ${Deno.pid} after update ${r.step}`);
        if (fault === "throw") throw new Error(`rank ${faultRank} failed alone`);
        Deno.kill(Deno.pid, fault === "hang" ? "SIGSTOP" : "SIGKILL");
      },
    },
  );
} catch (e) {
  // as the command line ends on an error: one line, exit code 1 (MPI is finalized on unload)
  console.error(`error: ${e instanceof Error ? e.message : e}`);
  Deno.exit(1);
}
console.log(`DP-FAULT-CHILD-OK ${world().rank}`);
