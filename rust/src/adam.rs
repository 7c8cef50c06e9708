//! Hyper-parameters of one Adam update and the step factors each implementation folds
//! them into (torch.optim.AdamW, bitsandbytes, GaLore-AdamW). A leaf: the backends, the
//! host 8-bit Adam (`quant::adam8`) and the optimizers all read it.

/// Hyper-parameters of one AdamW update of one tensor (torch.optim.AdamW semantics).
#[derive(Clone, Copy, Debug)]
pub struct AdamHp {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based count of updates of this tensor, for bias correction.
    pub step: u64,
}

impl AdamHp {
    /// torch.optim.AdamW's factors: (η/(1−β1^t), 1/√(1−β2^t), 1 − η·λ).
    pub fn torch_factors(&self) -> (f32, f32, f32) {
        let t = self.step as i32;
        let bc1 = 1.0 - (self.beta1 as f64).powi(t);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t);
        ((self.lr as f64 / bc1) as f32, (1.0 / bc2.sqrt()) as f32, 1.0 - self.lr * self.weight_decay)
    }

    /// bitsandbytes' (step_size, ε·√(1−β2^t)): p += step_size · m / (√v + ε·√(1−β2^t)).
    pub fn bnb_factors(&self) -> (f32, f32) {
        let t = self.step as i32;
        let c1 = 1.0 - (self.beta1 as f64).powi(t);
        let c2 = (1.0 - (self.beta2 as f64).powi(t)).sqrt();
        ((-(self.lr as f64) * c2 / c1) as f32, (self.eps as f64 * c2) as f32)
    }

    /// GaLore-AdamW's folded step size ŝ = η·√(1−β2^t)/(1−β1^t) (docs/algorithm-spec.md §1.3).
    pub fn galore_step(&self) -> f32 {
        let t = self.step as i32;
        (self.lr as f64 * (1.0 - (self.beta2 as f64).powi(t)).sqrt() / (1.0 - (self.beta1 as f64).powi(t))) as f32
    }
}
