// One rank of tests/dp_finetune_test.ts: fine-tunes with the options in argv[0] (JSON) into
// argv[1] and, with `stopAfter`, stops after that update like Ctrl-C (rank 0 saves a
// checkpoint to resume from).
import { finetune } from "../lib/finetune.ts";
import { world } from "../lib/dist.ts";

const [optsJson, out] = Deno.args;
const { stopAfter, ...opts } = JSON.parse(optsJson);
const stop = new AbortController();
await finetune({ ...opts, out, quiet: true, handleSigint: false }, {
  signal: stop.signal,
  onStep: (r) => {
    if (r.step === stopAfter) stop.abort();
  },
});
console.log(`DP-FT-CHILD-OK ${world().rank}`);
