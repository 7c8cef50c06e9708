//! Optimizers. Each one updates one parameter at a time, given that parameter's complete
//! gradient, so the same code serves the global step and the fused per-layer step.

pub mod adamw;
pub mod galore;
pub mod lazy;

use crate::backend::Backend;
use crate::error::Result;
use crate::model::{Llama, Param};

pub trait Optimizer<B: Backend>: Send {
    fn name(&self) -> &'static str;
    /// Called once per optimizer step, before any `update`: advances the step counter.
    fn begin_step(&mut self);
    /// Applies one update to parameter `idx` (its gradient is `g`).
    /// Applies one update to parameter `idx`. `g` is its gradient; the optimizer may
    /// overwrite it (GaLore reuses the buffer for the projected-back update).
    fn update(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32) -> Result<()>;
    /// The 8-bit block size when parameter `idx` is updated block by block (8-bit Adam,
    /// not projected), so that row chunks whose size is a multiple of it can be updated
    /// one at a time with `update_rows`.
    fn row_block(&self, _idx: usize) -> Option<usize> {
        None
    }
    /// Updates elements [off, off + len) of parameter `idx` (a row chunk) from the
    /// gradient in g[..len]; only for parameters with a `row_block`.
    #[allow(clippy::too_many_arguments)]
    fn update_rows(&mut self, _be: &B, idx: usize, _p: &mut Param<B>, _g: &mut B::Buf, _off: usize, _len: usize, _lr: f32) -> Result<()> {
        Err(crate::error::Error::backend(format!("internal: parameter {idx} cannot be updated in row chunks")))
    }
    /// Called once per optimizer step after every `update` (collects deferred counters).
    fn end_step(&mut self, _be: &B) {}
    /// Completed optimizer steps.
    fn steps(&self) -> u64;
    /// Writes every piece of optimizer state (checkpoints).
    fn save(&self, be: &B, w: &mut crate::state::Writer) -> Result<()>;
    /// Restores what `save` wrote; fails on any mismatch with this run.
    fn load(&mut self, be: &B, r: &mut crate::state::Reader) -> Result<()>;
    /// Downcasting, for tests and reports that need the concrete optimizer.
    fn as_any(&self) -> &dyn std::any::Any;
    /// Extra JSON fields for the run summary (without braces).
    fn report(&self, _model: &Llama<B>) -> String {
        String::new()
    }
}

/// Builds the optimizer named in the config.
pub fn build<B: Backend>(be: &B, model: &Llama<B>, cfg: &crate::config::OptimConfig, seed: u64) -> Result<Box<dyn Optimizer<B>>> {
    match cfg.name.as_str() {
        "adamw" => Ok(Box::new(adamw::AdamW::new(be, model, cfg)?)),
        "adam8bit" | "galore" | "galore8bit" | "qgalore" => Ok(Box::new(galore::Family::new(be, model, cfg, seed)?)),
        other => Err(crate::error::Error::invalid(format!(
            "optimizer = {other}: must be one of adamw, adam8bit, galore, galore8bit, qgalore"
        ))),
    }
}
