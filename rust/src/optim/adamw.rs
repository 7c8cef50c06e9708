//! Full-rank AdamW with fp32 moments: the baseline of docs/algorithm-spec.md §1.7 (the paper's
//! "Full-Rank" rows), with torch.optim.AdamW's decoupled weight decay p ← p·(1 − η·λ)
//! applied before the moment update and textbook bias correction.

use super::Optimizer;
use crate::backend::{AdamHp, Backend, Category};
use crate::config::{Named, OptimConfig};
use crate::error::Result;
use crate::model::Param;
use crate::plan::Plan;
use crate::state::read::In;
use crate::state::tensors::matrix;
use crate::state::write::Out;

pub struct AdamW<B: Backend> {
    name: &'static str,
    /// None for a frozen parameter (a LoRA model's base, frozen tables: no state).
    m: Vec<Option<B::Buf>>,
    v: Vec<Option<B::Buf>>,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    step: u64,
}

impl<B: Backend> AdamW<B> {
    /// Two f32 moments per trained parameter, of the plan's `state_len` elements (0: a
    /// frozen parameter, none). Also lora's and qlora's optimizer, over the adapters.
    pub fn new(be: &B, plan: &Plan, cfg: &OptimConfig) -> Result<Self> {
        let mut m = Vec::new();
        let mut v = Vec::new();
        for t in &plan.tensors {
            let on = !cfg.frozen(t.role);
            m.push(if on { Some(be.alloc(t.state_len, Category::OptimizerState)?) } else { None });
            v.push(if on { Some(be.alloc(t.state_len, Category::OptimizerState)?) } else { None });
        }
        let name = cfg.name.name();
        Ok(AdamW { name, m, v, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, wd: cfg.weight_decay, step: 0 })
    }
}

impl<B: Backend> Optimizer<B> for AdamW<B> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn begin_step(&mut self) {
        self.step += 1;
    }
    fn update(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32) -> Result<()> {
        let hp = AdamHp { lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.wd, step: self.step };
        let (Some(m), Some(v)) = (self.m[idx].as_mut(), self.v[idx].as_mut()) else {
            return Err(crate::error::Error::backend(format!("internal: {} is frozen and has no optimizer state", p.name)));
        };
        be.adamw(p.f_mut(), g, m, v, hp);
        Ok(())
    }
    fn abort_step(&mut self, _be: &B) {
        self.step -= 1;
    }
    fn steps(&self) -> u64 {
        self.step
    }
    fn scalars(&self) -> serde_json::Value {
        serde_json::json!({ "step": self.step })
    }
    fn describe(&self, be: &B, params: &[Param<B>], scalars: &serde_json::Value, out: &mut Out) -> Result<()> {
        scalars_step(scalars)?;
        for (i, p) in params.iter().enumerate() {
            let (Some(m), Some(v)) = (&self.m[i], &self.v[i]) else { continue };
            let n = be.len(m);
            // the moments have the parameter's shape (the plan may size them otherwise)
            let shape = if n == p.numel() { matrix(p.rows, p.cols) } else { vec![n] };
            out.buf(be, format!("optim.{}.m", p.name), shape.clone(), m, n)?;
            out.buf(be, format!("optim.{}.v", p.name), shape, v, n)?;
        }
        Ok(())
    }
    fn load(&mut self, be: &B, params: &[Param<B>], scalars: &serde_json::Value, inp: &mut In) -> Result<()> {
        let step = scalars_step(scalars)?;
        for (i, p) in params.iter().enumerate() {
            let (Some(m), Some(v)) = (self.m[i].as_mut(), self.v[i].as_mut()) else { continue };
            let n = be.len(m);
            inp.buf(be, &format!("optim.{}.m", p.name), m, n)?;
            inp.buf(be, &format!("optim.{}.v", p.name), v, n)?;
        }
        self.step = step;
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// AdamW's checkpoint scalars: `{"step": n}` with n ≤ 2^53.
fn scalars_step(v: &serde_json::Value) -> Result<u64> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct S {
        step: u64,
    }
    let s: S = serde_json::from_value(v.clone()).map_err(|e| crate::error::Error::invalid(format!("checkpoint state of adamw: {e}")))?;
    crate::state::meta::counter("step", s.step)
}
