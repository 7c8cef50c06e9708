/**
 * Divergence detection for a training run: when the loss has clearly left the run's best, or
 * the gradient has died, and which flag most probably caused it.
 * @module
 */

import { DEFAULT_LR } from "./option_table.ts";
import type { ResolvedOptions } from "./options.ts";

// Divergence thresholds. A healthy run's training loss is noisy step to step (a batch of 8
// sequences) but its short moving average only falls, or rises by a few percent at a warmup
// peak or a projector refresh; a diverging one rises by whole nats and stays up (--lr 10 on
// llama-9m: 5.6 → thousands within ~20 steps). So the alarm needs all of: the moving average
// of the last LOSS_WINDOW losses above the best such average by LOSS_RISE_FACTOR *and* by
// LOSS_RISE_NATS (the factor alone would fire on fine-tuning runs whose loss is near 0, the
// margin alone on large-vocabulary runs whose loss starts near 10), for LOSS_PATIENCE updates
// in a row (one bad batch or a transient spike never stops a run).
/** Updates averaged per loss sample (smooths the batch-to-batch noise). */
const LOSS_WINDOW = 5;
/** The averaged loss must exceed the best average by this factor … */
const LOSS_RISE_FACTOR = 1.5;
/** … and by this many nats … */
const LOSS_RISE_NATS = 1.0;
/** … for this many consecutive updates. */
const LOSS_PATIENCE = 10;
// A gradient norm of exactly 0 means no parameter can move any more (a dead model: e.g. after
// --lr 1e3 every logit is equal and the loss sits at ln(vocab)); a live model's gradient is
// never exactly zero in floating point, so a few updates in a row is conclusive.
/** Consecutive updates with a gradient norm of exactly 0 that end a run. */
const ZERO_GRAD_PATIENCE = 3;
// Validation uses fixed batches, so it is far less noisy: LOSS_RISE_* above its minimum at
// EVAL_PATIENCE evaluations in a row (a single bad evaluation is tolerated).
/** Consecutive evaluations far above the best validation loss that end a run. */
const EVAL_PATIENCE = 3;

/**
 * What a {@link DivergenceWatch} has seen, as JSON (a checkpoint carries it, so a resumed run
 * raises the alarm at the step the uninterrupted one would). Infinity (nothing seen) is null.
 */
export interface WatchState {
  /** The last losses (at most the averaging window). */
  recent: number[];
  /** Best moving average so far. */
  best_avg: number | null;
  /** Updates seen. */
  updates: number;
  /** The update after which the best moving average was reached (0: none yet). */
  best_at: number;
  /** Consecutive updates far above it. */
  high_steps: number;
  /** Consecutive updates with a gradient norm of exactly 0. */
  zero_grads: number;
  /** Best validation loss so far. */
  best_val: number | null;
  /** Consecutive evaluations far above it. */
  high_evals: number;
}

/** Watches a run's losses and gradient norms; says why once the run has clearly diverged. */
export class DivergenceWatch {
  readonly #recent: number[] = [];
  #bestAvg = Infinity;
  #updates = 0;
  #bestAt = 0;
  #highSteps = 0;
  #zeroGrads = 0;
  #bestVal = Infinity;
  #highEvals = 0;

  /**
   * Whether nothing is counting towards an alarm: only such a state is saved as a checkpoint
   * during a run, so the newest checkpoint of a diverged run is one from before the trouble
   * began (its last good one).
   */
  get calm(): boolean {
    return this.#highSteps === 0 && this.#zeroGrads === 0 && this.#highEvals === 0;
  }

  /**
   * The update after which the loss's moving average was at its best (0 before any): after
   * a divergence, the state worth going back to is the newest saved at or before it.
   */
  get bestAt(): number {
    return this.#bestAt;
  }

  /** What the watch has seen, for a checkpoint. */
  state(): WatchState {
    const orNull = (x: number) => Number.isFinite(x) ? x : null;
    return {
      recent: [...this.#recent],
      best_avg: orNull(this.#bestAvg),
      updates: this.#updates,
      best_at: this.#bestAt,
      high_steps: this.#highSteps,
      zero_grads: this.#zeroGrads,
      best_val: orNull(this.#bestVal),
      high_evals: this.#highEvals,
    };
  }

  /** A watch that continues from `state` ({@link DivergenceWatch.state}); RangeError if malformed. */
  static restore(state: WatchState): DivergenceWatch {
    const count = (x: unknown) => typeof x === "number" && Number.isInteger(x) && x >= 0;
    const best = (x: unknown) => x === null || (typeof x === "number" && Number.isFinite(x));
    const s = state as Partial<WatchState> | null;
    if (
      typeof s !== "object" || s === null || !Array.isArray(s.recent) ||
      s.recent.length > LOSS_WINDOW ||
      !s.recent.every((x) => typeof x === "number" && Number.isFinite(x)) ||
      !best(s.best_avg) || !best(s.best_val) || !count(s.high_steps) || !count(s.zero_grads) ||
      !count(s.updates) ||
      !count(s.best_at) ||
      !count(s.high_evals)
    ) {
      throw new RangeError("divergence watch state: malformed");
    }
    const w = new DivergenceWatch();
    w.#recent.push(...s.recent);
    w.#bestAvg = s.best_avg ?? Infinity;
    w.#updates = s.updates!;
    w.#bestAt = s.best_at!;
    w.#highSteps = s.high_steps!;
    w.#zeroGrads = s.zero_grads!;
    w.#bestVal = s.best_val ?? Infinity;
    w.#highEvals = s.high_evals!;
    return w;
  }

  /** One update's loss and gradient norm; a reason once diverged, else null. */
  step(loss: number, gradNorm: number): string | null {
    if (!Number.isFinite(loss) || !Number.isFinite(gradNorm)) {
      return `non-finite ${Number.isFinite(loss) ? "gradient norm" : "loss"}`;
    }
    this.#zeroGrads = gradNorm === 0 ? this.#zeroGrads + 1 : 0;
    if (this.#zeroGrads >= ZERO_GRAD_PATIENCE) {
      return `gradient norm exactly 0 for ${this.#zeroGrads} updates (loss ${
        loss.toFixed(4)
      }): the model no longer learns`;
    }
    this.#recent.push(loss);
    if (this.#recent.length > LOSS_WINDOW) this.#recent.shift();
    // the first updates average what there is: a run that rises from its very first update
    // (--lr 10) must be measured against its starting loss, not an already exploded one
    const avg = this.#recent.reduce((a, b) => a + b, 0) / this.#recent.length;
    this.#updates++;
    if (avg < this.#bestAvg) [this.#bestAvg, this.#bestAt] = [avg, this.#updates];
    this.#highSteps = far(avg, this.#bestAvg) ? this.#highSteps + 1 : 0;
    if (this.#highSteps < LOSS_PATIENCE) return null;
    return `loss ${
      avg.toPrecision(4)
    } (mean of the last ${this.#recent.length} updates) has stayed ` +
      `far above its best ${this.#bestAvg.toPrecision(4)} for ${this.#highSteps} updates`;
  }

  /** One validation loss (null: not finite); a reason once diverged, else null. */
  evaluation(loss: number | null): string | null {
    if (loss === null) return "non-finite validation loss";
    this.#bestVal = Math.min(this.#bestVal, loss);
    this.#highEvals = far(loss, this.#bestVal) ? this.#highEvals + 1 : 0;
    if (this.#highEvals < EVAL_PATIENCE) return null;
    return `validation loss ${loss.toPrecision(4)} has stayed far above its best ${
      this.#bestVal.toPrecision(4)
    } for ${this.#highEvals} evaluations`;
  }
}

function far(value: number, best: number): boolean {
  return value > best * LOSS_RISE_FACTOR && value > best + LOSS_RISE_NATS;
}

/**
 * The flag that most probably made a run diverge, as advice: a learning rate well above the
 * optimizer's tuned default first, then a large GaLore scale or weight decay, else the data
 * or the starting weights.
 */
export function likelyCause(o: ResolvedOptions): string {
  const base = DEFAULT_LR[o.optimizer];
  // 4x: the defaults were tuned so that 2x still trains well (see DEFAULT_LR)
  if (base !== undefined && o.lr > 4 * base) {
    const times = o.lr / base;
    return `likely cause: --lr ${o.lr} is ${
      times < 1e6 ? Math.round(times) : times.toExponential(0)
    }x ${o.optimizer}'s default ${base}; lower --lr${o.clip === 0 ? " or set --clip" : ""}`;
  }
  // α scales the projected-back update like a learning rate (default 0.25)
  if (o.galoreScale !== null && o.galoreScale > 1) {
    return `likely cause: --galore-scale ${o.galoreScale} (default 0.25); lower it`;
  }
  // decoupled decay multiplies each weight by (1 − lr·wd) per update
  if (o.lr * o.weightDecay > 0.1) {
    return `likely cause: --weight-decay ${o.weightDecay} (with --lr ${o.lr}); lower it`;
  }
  return `likely cause: the data or the model${
    o.initFrom === null ? "" : ` (--init-from ${o.initFrom})`
  }; try a lower --lr${o.clip === 0 ? " or set --clip" : ""}`;
}
