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

pub trait Optimizer<B: Backend>: Send {
    fn name(&self) -> &'static str;
    /// Called once per optimizer step, before any `update`: advances the step counter.
    fn begin_step(&mut self);
    /// Applies one update to parameter `idx`. `g` is its gradient; the optimizer may
    /// overwrite it (GaLore reuses the buffer for the projected-back update).
    fn update(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32) -> Result<()>;
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
