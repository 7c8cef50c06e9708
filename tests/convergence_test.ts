/**
 * Convergence: Q-GaLore (INT8 weights with stochastic rounding, INT4 projectors, lazy
 * refresh, 8-bit Adam) trains as well as full-rank AdamW and as plain GaLore, on the
 * synthetic corpus with the real engine. About 20 s on two CPU cores.
 */
import assert from "node:assert/strict";
import { modelConfig } from "../lib/presets.ts";
import type { Summary } from "../lib/summary.ts";
import { train } from "../lib/trainer.ts";
import type { TrainOptions } from "../lib/options.ts";

// llama-9m is 128 wide; rank 32 is a quarter of every matrix's smaller side. Each optimizer
// runs at its default learning rate; the projectors refresh every 50 updates, so the run
// crosses two subspace switches (moments carried over, docs/algorithm-spec.md §1.2).
const run = (optimizer: string): Promise<Summary> => {
  const opts: Partial<TrainOptions> = {
    model: "llama-9m",
    optimizer,
    steps: 150,
    batchSize: 8,
    seqLen: 64,
    seed: 0,
    out: null,
    quiet: true,
    handleSigint: false,
  };
  if (optimizer !== "adamw") Object.assign(opts, { rank: 32, updateGap: 50 });
  return train(opts);
};

Deno.test("convergence: qgalore within 5% of adamw (and of galore) after 150 updates", async () => {
  assert.ok(32 < modelConfig("llama-9m", 256).hidden_size);
  const adamw = await run("adamw");
  const galore = await run("galore");
  const qgalore = await run("qgalore");
  const [a, g, q] = [adamw.val_loss!, galore.val_loss!, qgalore.val_loss!];
  const msg = `adamw ${a.toFixed(4)}, galore ${g.toFixed(4)}, qgalore ${q.toFixed(4)}`;
  // Every run starts near ln 256 ≈ 5.55 and must end well below it (the floor is 1.859).
  for (const s of [adamw, galore, qgalore]) {
    assert.ok(s.initial_val_loss! > 5.4, `${s.optimizer} started at ${s.initial_val_loss}`);
    assert.ok(s.val_loss! < 0.45 * s.initial_val_loss!, `${s.optimizer}: ${msg}`);
    assert.ok(s.val_loss! > s.entropy_floor!, `${s.optimizer} below the entropy floor: ${msg}`);
    assert.equal(s.steps, 150);
  }
  assert.ok(q <= 1.05 * a, `qgalore not within 5% of adamw: ${msg}`);
  // The quantized variant must also stay close to its float counterpart, either way.
  assert.ok(Math.abs(q - g) <= 0.05 * g, `qgalore not within 5% of galore: ${msg}`);
  // Refreshes at updates 0, 50 and 100 for all 28 matrices (the lazy queue never fills).
  assert.equal(galore.svd_count, 84);
  assert.equal(qgalore.svd_count, 84);
  assert.equal(qgalore.refresh_failures, 0);
  assert.ok(qgalore.memory.weights < adamw.memory.weights / 2, "INT8 linear weights");
});
