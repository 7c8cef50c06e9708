//! Full-rank AdamW with fp32 moments: the baseline of docs/algorithm-spec.md §1.7 (the paper's
//! "Full-Rank" rows), with torch.optim.AdamW's decoupled weight decay p ← p·(1 − η·λ)
//! applied before the moment update and textbook bias correction.

use super::Optimizer;
use crate::backend::{AdamHp, Backend, Category};
use crate::config::OptimConfig;
use crate::error::Result;
use crate::model::Param;
use crate::plan::Plan;

pub struct AdamW<B: Backend> {
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    step: u64,
}

impl<B: Backend> AdamW<B> {
    /// Two f32 moments per parameter, of the plan's `state_len` elements.
    pub fn new(be: &B, plan: &Plan, cfg: &OptimConfig) -> Result<Self> {
        let mut m = Vec::new();
        let mut v = Vec::new();
        for t in &plan.tensors {
            m.push(be.alloc(t.state_len, Category::OptimizerState)?);
            v.push(be.alloc(t.state_len, Category::OptimizerState)?);
        }
        Ok(AdamW { m, v, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, wd: cfg.weight_decay, step: 0 })
    }
}

impl<B: Backend> Optimizer<B> for AdamW<B> {
    fn name(&self) -> &'static str {
        "adamw"
    }
    fn begin_step(&mut self) {
        self.step += 1;
    }
    fn update(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32) -> Result<()> {
        let hp = AdamHp { lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.wd, step: self.step };
        be.adamw(p.f_mut(), g, &mut self.m[idx], &mut self.v[idx], hp);
        Ok(())
    }
    fn steps(&self) -> u64 {
        self.step
    }
    fn save(&self, be: &B, w: &mut crate::state::Writer) -> Result<()> {
        w.u64(self.step);
        for (m, v) in self.m.iter().zip(&self.v) {
            w.buf(be, m, be.len(m))?;
            w.buf(be, v, be.len(v))?;
        }
        Ok(())
    }
    fn load(&mut self, be: &B, r: &mut crate::state::Reader) -> Result<()> {
        self.step = r.counter("AdamW step")?;
        for (m, v) in self.m.iter_mut().zip(self.v.iter_mut()) {
            let (nm, nv) = (be.len(m), be.len(v));
            r.buf_into(be, m, nm, "AdamW m")?;
            r.buf_into(be, v, nv, "AdamW v")?;
        }
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
