//! One training run inside the engine: model, gradients, activations and optimizer for a
//! fixed (batch, seq). `Session` is the object-safe face the C ABI holds.

use crate::backend::{Backend, Category, CATEGORIES};
use crate::config::EngineConfig;
use crate::ensure;
use crate::error::{Error, Result};
use crate::model::{pass, Acts, Grads, Llama};
use crate::optim::{self, Optimizer};

/// Result of one optimizer step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
}

pub struct Engine<B: Backend> {
    pub be: B,
    pub cfg: EngineConfig,
    pub model: Llama<B>,
    pub grads: Grads<B>,
    pub acts: Acts<B>,
    pub opt: Box<dyn Optimizer<B>>,
}

impl<B: Backend> Engine<B> {
    pub fn new(be: B, cfg: EngineConfig) -> Result<Self> {
        cfg.validate()?;
        let model = be.runner().run(|| Llama::new(&be, &cfg.model, cfg.seed))?;
        let grads = Grads::new(&be, &model, |_| false)?;
        let acts = Acts::new(&be, &cfg.model, cfg.batch_size, cfg.seq_len)?;
        let opt = optim::build(&be, &model, &cfg.optimizer)?;
        Ok(Engine { be, cfg, model, grads, acts, opt })
    }

    fn window_rows(&self, tokens: &[i32], chunks: usize, what: &str) -> Result<()> {
        let (b, t, v) = (self.cfg.batch_size, self.cfg.seq_len, self.cfg.model.vocab_size);
        ensure!(chunks > 0, "{what}: count must be ≥ 1");
        let want = chunks * b * (t + 1);
        ensure!(
            tokens.len() == want,
            "{what}: got {} token ids, expected {chunks} × batch {b} × (seq {t} + 1) = {want}",
            tokens.len()
        );
        if let Some(bad) = tokens.iter().find(|&&x| x < 0 || x as usize >= v) {
            return Err(Error::invalid(format!("{what}: token id {bad} is outside the vocabulary [0, {v})")));
        }
        Ok(())
    }

    /// Forward + loss (+ gradient into the logits when `grad_scale` is set); returns Σ loss.
    fn forward_loss(&mut self, window: &[i32], grad_scale: Option<f32>) -> Result<f64> {
        let (n, v) = (self.acts.b * self.acts.t, self.cfg.model.vocab_size);
        self.acts.load_tokens(window);
        pass::forward(&self.be, &self.model, &mut self.acts);
        let a = &mut self.acts;
        self.be.cross_entropy(&mut a.logits, &a.targets, &mut a.losses, n, v, grad_scale)?;
        Ok(a.losses.iter().map(|&x| x as f64).sum())
    }

    /// Forward and backward over `micro` micro-batches, accumulating gradients; returns
    /// the mean token loss. Gradients are scaled so they equal the full batch's mean.
    pub fn loss_and_grads(&mut self, tokens: &[i32], micro: usize) -> Result<f64> {
        self.window_rows(tokens, micro, "train batch")?;
        let rows = self.cfg.batch_size * (self.cfg.seq_len + 1);
        let ntok = (self.cfg.batch_size * self.cfg.seq_len * micro) as f64;
        let scale = (1.0 / ntok) as f32;
        let mut sum = 0.0;
        for mb in 0..micro {
            sum += self.forward_loss(&tokens[mb * rows..(mb + 1) * rows], Some(scale))?;
            if !sum.is_finite() {
                return Err(Error::non_finite(format!("loss is {} at micro-batch {mb}", fmt_nf(sum))));
            }
            let (be, m, g, a) = (&self.be, &mut self.model, &mut self.grads, &mut self.acts);
            pass::backward(be, m, g, a, mb > 0, &mut |_, _, _| {});
        }
        Ok(sum / ntok)
    }

    pub fn grad_norm(&self) -> f64 {
        (0..self.model.params.len()).map(|i| self.be.sumsq(self.grads.get(i))).sum::<f64>().sqrt()
    }

    pub fn train_step(&mut self, tokens: &[i32], micro: usize, lr: f32) -> Result<StepStats> {
        ensure!(lr.is_finite() && lr >= 0.0, "lr = {lr}: must be a finite number ≥ 0");
        let loss = self.loss_and_grads(tokens, micro)?;
        let mut st = StepStats { loss, ..Default::default() };
        let be = &self.be;
        let (model, grads, opt) = (&mut self.model, &mut self.grads, &mut self.opt);
        let clip = self.cfg.optimizer.clip as f64;
        (|| -> Result<()> {
            st.grad_norm = (0..model.params.len()).map(|i| be.sumsq(grads.get(i))).sum::<f64>().sqrt();
            if !st.grad_norm.is_finite() {
                return Err(Error::non_finite(format!("gradient norm is {}", fmt_nf(st.grad_norm))));
            }
            if clip > 0.0 && st.grad_norm > clip {
                // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6)
                let s = (clip / (st.grad_norm + 1e-6)) as f32;
                for i in 0..model.params.len() {
                    be.scale(grads.get_mut(i), s);
                }
                st.clipped = true;
            }
            opt.begin_step();
            for i in 0..model.params.len() {
                opt.update(be, i, &mut model.params[i], grads.get(i), lr)?;
            }
            Ok(())
        })()?;
        Ok(st)
    }

    /// Mean over `batches` of each batch's mean token cross-entropy (algorithm-spec I-16).
    pub fn eval(&mut self, tokens: &[i32], batches: usize) -> Result<f64> {
        self.window_rows(tokens, batches, "eval batches")?;
        let rows = self.cfg.batch_size * (self.cfg.seq_len + 1);
        let ntok = (self.cfg.batch_size * self.cfg.seq_len) as f64;
        let mut total = 0.0;
        for bi in 0..batches {
            let window = &tokens[bi * rows..(bi + 1) * rows];
            total += self.forward_loss(window, None)? / ntok;
        }
        Ok(total / batches as f64)
    }

    pub fn memory(&self) -> [u64; 6] {
        let m = self.be.mem();
        let mut out = [0u64; 6];
        for (i, &c) in CATEGORIES.iter().enumerate() {
            out[i] = m.get(c);
        }
        out[5] = m.total();
        out
    }

    pub fn info_json(&self) -> String {
        let m = self.memory();
        format!(
            "{{\"params\":{},\"device\":\"{}\",\"optimizer\":\"{}\",\"steps\":{},\"memory\":{{\"weights\":{},\"grads\":{},\"optimizer_state\":{},\"projector\":{},\"activations\":{},\"total\":{}}}}}",
            self.model.numel(),
            self.be.name(),
            self.opt.name(),
            self.opt.steps(),
            m[Category::Weights as usize],
            m[Category::Grads as usize],
            m[Category::OptimizerState as usize],
            m[Category::Projector as usize],
            m[Category::Activations as usize],
            m[5]
        )
    }
}

fn fmt_nf(x: f64) -> &'static str {
    if x.is_nan() {
        "NaN"
    } else {
        "infinite"
    }
}

/// What the C ABI needs from a run, independent of the backend type.
pub trait Session: Send {
    fn train_step(&mut self, tokens: &[i32], micro: usize, lr: f32) -> Result<StepStats>;
    fn eval(&mut self, tokens: &[i32], batches: usize) -> Result<f64>;
    fn memory(&self) -> [u64; 6];
    fn info_json(&self) -> String;
}

impl<B: Backend> Session for Engine<B> {
    fn train_step(&mut self, tokens: &[i32], micro: usize, lr: f32) -> Result<StepStats> {
        self.be.runner().run(|| Engine::train_step(self, tokens, micro, lr))
    }
    fn eval(&mut self, tokens: &[i32], batches: usize) -> Result<f64> {
        self.be.runner().run(|| Engine::eval(self, tokens, batches))
    }
    fn memory(&self) -> [u64; 6] {
        Engine::memory(self)
    }
    fn info_json(&self) -> String {
        Engine::info_json(self)
    }
}

/// Builds a session on the configured device.
pub fn open(cfg: EngineConfig) -> Result<Box<dyn Session>> {
    match cfg.device.as_str() {
        "cpu" | "auto" => Ok(Box::new(Engine::new(crate::backend::cpu::Cpu::new(cfg.threads)?, cfg)?)),
        "cuda" => Err(Error::backend(
            "device = cuda: this build has no CUDA backend yet; use --device cpu or auto",
        )),
        other => Err(Error::invalid(format!("device = {other}: must be cpu, cuda or auto"))),
    }
}
