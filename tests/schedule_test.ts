import assert from "node:assert/strict";
import { lambdaAt, lrAt, type ScheduleOptions } from "../lib/schedule.ts";

const ref: ScheduleOptions = {
  lr: 0.01,
  warmup: 100,
  steps: 1000,
  minLrRatio: 0.1,
  zeroFirst: true,
};
const close = (a: number, b: number, tol = 1e-12) =>
  assert.ok(Math.abs(a - b) <= tol, `${a} != ${b} (tol ${tol})`);

Deno.test("reference mode: anchor values of docs/algorithm-spec.md I-13", () => {
  assert.equal(lrAt(0, ref), 0);
  close(lrAt(100, ref), 0.01);
  close(lrAt(1000, ref), 0.001);
  close(lrAt(5000, ref), 0.001); // clamped past N
  // Halfway through the decay the cosine term is exactly ½.
  close(lrAt(550, ref), 0.01 * (0.1 + 0.9 * 0.5));
});

Deno.test("reference mode: warmup is linear", () => {
  for (const s of [1, 10, 37, 50, 99]) close(lrAt(s, ref), (0.01 * s) / 100);
});

Deno.test("reference mode: monotone non-increasing on [W, N]", () => {
  let prev = Infinity;
  for (let s = 100; s <= 1000; s++) {
    const lr = lrAt(s, ref);
    assert.ok(lr <= prev, `lr rose at ${s}: ${prev} -> ${lr}`);
    assert.ok(lr >= 0.001 - 1e-15);
    prev = lr;
  }
});

Deno.test("default mode is the reference shifted by one update", () => {
  const def = { ...ref, zeroFirst: false };
  for (const u of [0, 1, 50, 99, 100, 500, 998, 999]) close(lrAt(u, def), lrAt(u + 1, ref));
  assert.ok(lrAt(0, def) > 0, "first update must not be wasted");
  close(lrAt(999, def), 0.001); // the last of N updates lands on the floor
  assert.equal(lrAt(0, { lr: 1, warmup: 100, steps: 1000, minLrRatio: 0.1 }), 0.01);
});

Deno.test("warmup 0 starts at the peak and decays to the floor", () => {
  const opts = { lr: 2, warmup: 0, steps: 10, minLrRatio: 0.25, zeroFirst: true };
  assert.equal(lrAt(0, opts), 2);
  close(lrAt(10, opts), 0.5);
  close(lrAt(5, opts), 2 * (0.25 + 0.75 * 0.5));
  for (let s = 0; s <= 12; s++) assert.ok(Number.isFinite(lrAt(s, opts)));
});

Deno.test("lambdaAt: ratio 0 reaches zero, warmup equal to steps stays finite", () => {
  close(lambdaAt(10, 2, 10, 0), 0);
  assert.equal(lambdaAt(5, 10, 10, 0.1), 0.5);
  assert.equal(lambdaAt(10, 10, 10, 0.1), 0.1);
});
