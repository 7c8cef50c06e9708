//! Optimizers. Each one updates one parameter at a time, given that parameter's complete
//! gradient, so the same code serves the global step and the fused per-layer step.

pub mod adamw;
pub mod galore;
pub mod lazy;

use crate::backend::Backend;
use crate::error::Result;
use crate::model::{Llama, Param};
use crate::plan::Plan;

/// Refresh counters of the GaLore family (part of the engine's info).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub svd_count: u64,
    pub refresh_failures: u64,
    pub nonfinite_grads: u64,
    /// Seconds spent refreshing projectors, rounded to microseconds.
    pub refresh_seconds: f64,
    /// Rank-r gradients formed from the product's factors (`proj_grad = factored`).
    pub factored_grads: u64,
    /// Current refresh gap of each projected matrix, by parameter name in model order.
    pub gaps: Gaps,
}

/// Name → gap pairs that serialize as a JSON object in their order.
#[derive(Clone, Debug, Default)]
pub struct Gaps(pub Vec<(String, u64)>);

impl serde::Serialize for Gaps {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// A projected parameter's share of a data-parallel low-rank step (`dist::lowrank`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowRank {
    /// Elements of its rank-r gradient R (`plan::ProjGeom::low`).
    pub len: usize,
    /// Its projector is refreshed (or computed for the first time) in this step: the
    /// refresh needs the whole summed gradient, unless `sketch`.
    pub refresh: bool,
    /// The refresh is the warm-started randomized one (`proj_refresh = randomized`, a
    /// projector already stored): it needs only sketches of the summed gradient
    /// (`refresh_sketched`).
    pub sketch: bool,
}

/// A data-parallel randomized refresh (`dist::lowrank::sketch`): from this rank's gradient
/// (rows×cols, host), the previous projector (f32, its stored layout), rows, cols, the rank
/// and the side, the new projector, summing the sketches over the ranks; `Ok(None)` when
/// the decomposition failed (the same on every rank), `Err` when a sum did.
pub type Sketch<'a> = dyn FnMut(&[f32], &[f32], usize, usize, usize, bool) -> Result<Option<Vec<f32>>> + 'a;

pub use crate::model::pass::Factors;

pub trait Optimizer<B: Backend>: Send {
    fn name(&self) -> &'static str;
    /// Called once per optimizer step, before any `update`: advances the step counter.
    fn begin_step(&mut self);
    /// Applies one update to parameter `idx`. `g` is its gradient; the optimizer may
    /// overwrite it (GaLore reuses the buffer for the projected-back update).
    fn update(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32) -> Result<()>;
    /// `update` with the gradient multiplied by `scale` (global-norm clipping; None: not
    /// clipped). An unprojected gradient is scaled element-wise before its update; a
    /// projected one is not: the optimizer refreshes its projector from the unscaled
    /// gradient and scales the rank-r projection R instead (docs/algorithm-spec.md §1.5), so
    /// the global and the fused step compute the same numbers.
    fn update_scaled(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32, scale: Option<f32>) -> Result<()> {
        if let Some(s) = scale {
            be.scale(g, s);
        }
        self.update(be, idx, p, g, lr)
    }
    /// Whether this optimizer holds a clip stash (the byte plan's `clip_stash`): then the
    /// fused step clips with one backward, calling `stash` for every trained tensor but the
    /// tables and `apply_stash` once the global norm is known.
    fn stashes(&self) -> bool {
        false
    }
    /// First half of `update_scaled` for parameter `idx`, inside the backward: from its
    /// unscaled gradient `g`, refreshes the projector when due and keeps the rank-r R (or
    /// the whole gradient of an unprojected tensor) in the stash; nothing is updated.
    fn stash(&mut self, _be: &B, idx: usize, _p: &Param<B>, _g: &mut B::Buf) -> Result<()> {
        Err(crate::error::Error::backend(format!("internal: parameter {idx} has no clip stash")))
    }
    /// Second half: the update of `idx` from its stash, scaled by `scale`, with `scratch`
    /// (at least the parameter's elements) for the projected-back update.
    fn apply_stash(&mut self, _be: &B, idx: usize, _p: &mut Param<B>, _scratch: &mut B::Buf, _lr: f32, _scale: Option<f32>) -> Result<()> {
        Err(crate::error::Error::backend(format!("internal: parameter {idx} has no clip stash")))
    }
    /// Data-parallel low-rank communication (`dist::lowrank`), after `begin_step`: R's size
    /// and whether the projector refreshes this step, for a projected parameter; None for
    /// one the optimizer does not project.
    fn low_rank(&self, _idx: usize) -> Option<LowRank> {
        None
    }
    /// Refreshes the projector of `idx` (due this step, `LowRank::sketch`) with `sketch`
    /// from this rank's gradient `g` (its non-finite entries zeroed first), instead of the
    /// refresh `stash` would run; false when the decomposition failed (the old projector is
    /// kept, a refresh failure counted).
    fn refresh_sketched(&mut self, _be: &B, idx: usize, _p: &Param<B>, _g: &mut B::Buf, _sketch: &mut Sketch<'_>) -> Result<bool> {
        Err(crate::error::Error::backend(format!("internal: parameter {idx} has no projector")))
    }
    /// Allocates the stash (`stash`, `apply_stash`) of every projected parameter that has
    /// none: a data-parallel low-rank step keeps each summed R until the norm is known.
    fn stash_low_rank(&mut self, _be: &B) -> Result<()> {
        Ok(())
    }
    /// The stash of parameter `idx` when `stash` filled it this step (its first `len`
    /// elements: R of a projected matrix), for the ranks to sum in place.
    fn stashed_mut(&mut self, _idx: usize) -> Option<&mut B::Buf> {
        None
    }
    /// The rank-r gradient of projected matrix `idx` straight from its product's factors
    /// (`ProjGrad::Factored`, docs/algorithm-spec.md §1.5b), inside the backward. Writes R
    /// into g's first elements (added to them with `f.acc`, gradient accumulation) and
    /// returns true; false when the matrix has no projector yet, its projector refreshes in
    /// this update (the refresh needs the whole gradient), or R is formed in full: the
    /// caller then computes the whole gradient. `stepped`: `begin_step` has counted this
    /// update already (the fused step; the global step forms its gradients before it).
    #[allow(clippy::too_many_arguments)]
    fn factored(&mut self, _be: &B, _idx: usize, _p: &Param<B>, _f: Factors<'_, B>, _stepped: bool, _g: &mut B::Buf) -> bool {
        false
    }
    /// Elements of `idx`'s gradient buffer that hold this update's gradient when `factored`
    /// wrote R there (its norm and updates take those); None: the whole gradient.
    fn factored_len(&self, _idx: usize) -> Option<usize> {
        None
    }
    /// Undoes `begin_step` after a step that was refused before any update (a non-finite
    /// gradient norm found after the fused backward), dropping the deferred counters.
    fn abort_step(&mut self, be: &B);
    /// Updates elements [off, off + len) of parameter `idx` (a row chunk) from the
    /// gradient in g[..len]; only for the parameters the byte plan chunks
    /// (`TensorPlan::grad_chunk_rows`: 8-bit, unprojected tables in the fused step).
    #[allow(clippy::too_many_arguments)]
    fn update_rows(&mut self, _be: &B, idx: usize, _p: &mut Param<B>, _g: &mut B::Buf, _off: usize, _len: usize, _lr: f32) -> Result<()> {
        Err(crate::error::Error::backend(format!("internal: parameter {idx} cannot be updated in row chunks")))
    }
    /// Called once per optimizer step after every `update` (collects deferred counters).
    fn end_step(&mut self, _be: &B) {}
    /// Completed optimizer steps.
    fn steps(&self) -> u64;
    /// Checkpoint scalars (`state::meta::EngineState::optim`): step counter, statistics,
    /// refresh gaps, queue lengths, storage kinds. Must hold `"step"`.
    fn scalars(&self) -> serde_json::Value;
    /// The optimizer's checkpoint tensors, in order, as `scalars` (this optimizer's own, or
    /// a checkpoint's) imply them: planned, or written from this optimizer's state. Checks
    /// the scalars' ranges against this run first (`params`: the model's, same order).
    fn describe(&self, be: &B, params: &[Param<B>], scalars: &serde_json::Value, out: &mut crate::state::write::Out) -> Result<()>;
    /// Restores the state `describe` wrote from `inp` (checked already: `scalars` passed
    /// `describe` and the file holds exactly its tensors).
    fn load(&mut self, be: &B, params: &[Param<B>], scalars: &serde_json::Value, inp: &mut crate::state::read::In) -> Result<()>;
    /// Downcasting, for tests and reports that need the concrete optimizer.
    fn as_any(&self) -> &dyn std::any::Any;
    /// Projector refresh counters for the run summary (the GaLore family and 8-bit Adam).
    fn report(&self, _model: &Llama<B>) -> Option<Report> {
        None
    }
}

/// Builds the optimizer named in the config, with the buffers of its byte plan (`plan`,
/// built from the same config).
pub fn build<B: Backend>(be: &B, plan: &Plan, cfg: &crate::config::OptimConfig, seed: u64) -> Result<Box<dyn Optimizer<B>>> {
    use crate::config::Optimizer as O;
    match cfg.name {
        O::AdamW | O::Lora | O::QLora => Ok(Box::new(adamw::AdamW::new(be, plan, cfg)?)),
        O::Adam8bit | O::Galore | O::Galore8bit | O::QGalore => Ok(Box::new(galore::Family::new(be, plan, cfg, seed)?)),
    }
}
