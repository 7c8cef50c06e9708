import assert from "node:assert/strict";
import { PINNED_CASES, PINNED_FIXTURE, type PinnedRun, runPinned } from "./pinned_cases.ts";

// Trajectories are bit-identical for any thread count and any refactor that keeps the
// arithmetic: every loss and gradient norm must equal the pinned value exactly.
const pinned = JSON.parse(Deno.readTextFileSync(PINNED_FIXTURE)) as Record<string, PinnedRun>;

for (const c of PINNED_CASES) {
  Deno.test(`pinned losses: ${c.name}`, async () => {
    const want = pinned[c.name];
    assert.ok(want, `no pinned values for ${c.name}; run tests/pinned_cases.ts --write`);
    const got = await runPinned(c);
    assert.deepEqual(got, want);
  });
}
