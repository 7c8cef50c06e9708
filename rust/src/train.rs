//! One training run inside the engine: model, gradients, activations and optimizer for a
//! fixed (batch, seq). `Session` is the object-safe face the C ABI holds.

use crate::backend::{Backend, CATEGORIES};
use crate::config::{Device, EngineConfig, Named, Precision};
use crate::ensure;
use crate::error::{Error, Result};
use crate::model::{lora, pass, Acts, Grads, Llama, LoraActs};
use crate::optim::{self, Optimizer};
use crate::plan::{self, Bytes, Plan};
use serde::Serialize;
use std::time::Instant;

/// Result of one optimizer step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
    /// Targets that carried loss over all micro-batches (N, the loss's denominator).
    pub count: u64,
}

/// What `eval_masked` returns: the loss over the counted targets of every batch, and per
/// row (batch-major, `batches` × batch_size rows) the NLL sum and count of its targets.
#[derive(Clone, Debug, Default)]
pub struct EvalOut {
    /// Mean token cross-entropy, sum / count; when every target counts (no mask, or one
    /// of all ones) computed as the mean over batches of each batch's mean: the same value
    /// in exact arithmetic, kept as before masks existed so unmasked results stay
    /// bit-identical.
    pub mean: f64,
    /// Σ −log p(target) over counted targets (each row's f32 losses summed in f64).
    pub sum: f64,
    pub count: u64,
    pub row_sums: Vec<f64>,
    pub row_counts: Vec<f64>,
}

/// A checked batch: `t` the active sequence length its size implies; `rows` token ids per
/// micro-batch (batch_size × (t + 1)).
#[derive(Clone, Copy, Debug)]
struct Shape {
    t: usize,
    rows: usize,
}

pub struct Engine<B: Backend> {
    pub be: B,
    pub cfg: EngineConfig,
    pub model: Llama<B>,
    pub grads: Grads<B>,
    pub acts: Acts<B>,
    pub opt: Box<dyn Optimizer<B>>,
    /// Optimizer steps run inside the backward (per-layer updates, docs/algorithm-spec.md §1.5).
    pub fused: bool,
    pub notice: Option<String>,
    /// Seconds spent per phase since the start: forward (with the loss), backward (with
    /// fused updates), optimizer (global-step updates, clipping).
    pub timing: [f64; 3],
    /// Highest device memory in use seen after a step (measured; GPU only).
    pub peak_device_bytes: u64,
    /// Clip in the fused step with two backwards (the first measures the global norm) even
    /// where the optimizer holds a clip stash; the optimizers without one always do. Off by
    /// default; kept for comparisons (`rust/tests/clip_fused.rs`). The config's `clip_mode`
    /// is the user's switch (`clip`).
    pub two_backward_clip: bool,
    /// How the plan this engine was built from clips, and why (`Plan::with_budget`).
    pub clip: plan::ClipPlan,
    /// Backward passes run since the start (each micro-batch's, and each of a fused step's).
    pub backwards: u64,
    /// Set when a checkpoint load failed part-way (`state::engine`): the state is then a
    /// mix of two runs, and every call but a new load is refused with this reason.
    pub poisoned: Option<String>,
}

/// Elements of the gradient the backward hands over: the parameter, or a row chunk of it.
fn grad_len<B: Backend>(m: &Llama<B>, i: usize, rows: Option<(usize, usize)>) -> usize {
    rows.map_or(m.params[i].numel(), |(_, nr)| nr * m.params[i].cols)
}

impl<B: Backend> Engine<B> {
    pub fn new(be: B, cfg: EngineConfig) -> Result<Self> {
        Self::build(be, cfg, None)
    }

    /// An engine whose weights are a Hugging Face checkpoint's (`init`: a model folder or
    /// safetensors file, `crate::hf`), loaded over zeros instead of a random initialisation;
    /// optimizer state fresh. Without `init`, `new`.
    pub fn build(be: B, cfg: EngineConfig, init: Option<&std::path::Path>) -> Result<Self> {
        Self::build_with_budget(be, cfg, init, None)
    }

    /// `build`, with `clip_mode = auto` choosing the clip stash or two backwards against a
    /// memory `budget` in bytes (`Plan::with_budget`; None: none known, the stash is taken).
    /// `open` passes `plan::clip_budget` of the memory the host or the GPU has available.
    pub fn build_with_budget(be: B, cfg: EngineConfig, init: Option<&std::path::Path>, budget: Option<u64>) -> Result<Self> {
        cfg.validate()?;
        ensure!(
            !(cfg.optimizer.proj_grad == crate::config::ProjGrad::Factored && crate::dist::size() > 1),
            "proj_grad factored is for one process (the ranks of a data-parallel run sum whole gradients or their projections, dp_comm): use proj_grad full"
        );
        // Sizes and storage kinds come from the byte plan (the same code `qg_plan` runs),
        // so the tracked bytes are what the plan says.
        let plan = Plan::with_budget(&cfg, be.precision() == "bf16", "the model", budget);
        if let Some(p) = &plan.fit.problem {
            return Err(Error::invalid(p.message()));
        }
        let o = &cfg.optimizer;
        let (quant, half) = (plan::linear_quant(o), plan::half_tables(o));
        let seed = init.is_none().then_some(cfg.seed);
        let lb = plan::lora_build(o, cfg.seed);
        let mut model = be.runner().run(|| Llama::build_with(&be, &cfg.model, seed, quant, half, lb.as_ref()))?;
        model.frozen_tables = o.frozen(crate::model::llama::Role::Embed);
        let fused = plan.fused;
        let opt = optim::build(&be, &plan, o, cfg.seed)?;
        let grads = Grads::new(&be, plan.tensors.iter().map(|t| (t.grad_len, t.grad_chunk_rows)), plan.shared_grad as usize)?;
        let mut acts = Acts::new(&be, &cfg.model, cfg.batch_size, cfg.seq_len, cfg.checkpointing, &plan.activations)?;
        if let Some(lb) = &lb {
            acts.lora = Some(LoraActs::new(&be, &cfg.model, &lb.spec, cfg.batch_size, cfg.seq_len)?);
        }
        let mut e = Engine { be, cfg, model, grads, acts, opt, fused, notice: None, timing: [0.0; 3], peak_device_bytes: 0, two_backward_clip: false, clip: plan.clip.clone(), backwards: 0, poisoned: None };
        if let Some(path) = init {
            e.import_hf(path)?;
        }
        Ok(e)
    }

    /// Checks `chunks` (micro-batches or eval batches, named `unit`) of batch_size rows of
    /// t + 1 ids each, derives t from the length (1 ≤ t ≤ seq_len), checks the ids and the
    /// mask, and sets the activations' active length to t.
    fn window_rows(&mut self, tokens: &[i32], mask: Option<&[u8]>, chunks: usize, what: &str, unit: &str) -> Result<Shape> {
        let (b, cap, v) = (self.cfg.batch_size, self.cfg.seq_len, self.cfg.model.vocab_size);
        ensure!(chunks > 0, "{what}: {unit} = 0: must be ≥ 1");
        let n = tokens.len();
        let per = chunks * b;
        let t = (n % per == 0).then(|| n / per).and_then(|w| w.checked_sub(1)).unwrap_or(0);
        ensure!(
            (1..=cap).contains(&t),
            "{what}: got {n} token ids, expected {chunks} × batch {b} × (t + 1) with t in 1..=seq_len {cap} \
             ({unit} {chunks}, batch_size {b}: a multiple of {per} from {} to {})",
            per * 2,
            per * (cap + 1)
        );
        if let Some(m) = mask {
            ensure!(m.len() == n, "{what}: the mask has {} entries, the tokens {n}: one entry per token id is needed", m.len());
        }
        if let Some(bad) = tokens.iter().find(|&&x| x < 0 || x as usize >= v) {
            return Err(Error::invalid(format!("{what}: token id {bad} is outside the vocabulary [0, {v})")));
        }
        self.acts.set_len(&self.be, t)?;
        Ok(Shape { t, rows: b * (t + 1) })
    }

    /// Targets that carry loss in `mask`'s windows of t + 1 (a window's first entry is an
    /// input only); every target without a mask.
    fn counted(windows: usize, t: usize, mask: Option<&[u8]>) -> u64 {
        match mask {
            None => (windows * t) as u64,
            Some(m) => m.chunks(t + 1).map(|w| w[1..].iter().filter(|&&x| x != 0).count() as u64).sum(),
        }
    }

    /// Forward + loss (+ gradient into the logits when `grad_scale` is set); returns Σ loss
    /// over the counted targets (a target masked out adds 0).
    fn forward_loss(&mut self, window: &[i32], mask: Option<&[u8]>, grad_scale: Option<f32>) -> Result<f64> {
        let t0 = Instant::now();
        let (n, v) = (self.acts.b * self.acts.t, self.cfg.model.vocab_size);
        self.acts.load_tokens(window, mask);
        pass::forward(&self.be, &self.model, &mut self.acts);
        let a = &mut self.acts;
        self.be.cross_entropy(&mut a.logits, &a.targets, &mut a.losses, n, v, grad_scale)?;
        self.timing[0] += t0.elapsed().as_secs_f64();
        Ok(a.losses.iter().map(|&x| x as f64).sum())
    }

    /// Runs the backward (with `hook` per parameter), timed; with `factored`, projected
    /// matrices get their rank-r gradient from the product's factors where the optimizer
    /// takes it (`Optimizer::factored`).
    fn timed_backward(&mut self, acc: bool, factored: bool, hook: &mut pass::Hook<B>) -> Result<()> {
        let t0 = Instant::now();
        let (be, opt) = (&self.be, &mut self.opt);
        let f = &mut |i: usize, m: &Llama<B>, fs: optim::Factors<'_, B>, gb: &mut B::Buf| opt.factored(be, i, &m.params[i], fs, false, gb);
        let factor: Option<&mut pass::Factor<B>> = if factored { Some(f) } else { None };
        pass::backward_with(be, &mut self.model, &mut self.grads, &mut self.acts, acc, false, factor, hook);
        self.backwards += 1;
        self.be.sync()?;
        self.timing[1] += t0.elapsed().as_secs_f64();
        Ok(())
    }

    fn note_device_peak(&mut self) {
        if let Some(b) = self.be.device_bytes_in_use() {
            self.peak_device_bytes = self.peak_device_bytes.max(b);
        }
    }

    /// Forward and backward over `micro` micro-batches, accumulating gradients; returns
    /// the mean token loss. Gradients are scaled so they equal the full batch's mean.
    pub fn loss_and_grads(&mut self, tokens: &[i32], micro: usize) -> Result<f64> {
        Ok(self.loss_and_grads_masked(tokens, None, micro)?.0)
    }

    /// `loss_and_grads` with an optional loss mask (completion-only loss, padding): the
    /// loss and the gradients are the mean over the N targets that carry loss in all
    /// micro-batches together (token-weighted accumulation, as transformers ≥ 4.46
    /// does with `num_items_in_batch`), not the mean of per-micro-batch means; returns (loss, N).
    /// Without a mask N = micro × b × t and the result is bit-identical to the unmasked code.
    pub fn loss_and_grads_masked(&mut self, tokens: &[i32], mask: Option<&[u8]>, micro: usize) -> Result<(f64, u64)> {
        self.loss_and_grads_with(tokens, mask, micro, false)
    }

    /// `loss_and_grads_masked`; with `factored` (the global step under
    /// `proj_grad = factored`) the buffers of projected matrices may hold R instead
    /// (`Optimizer::factored_len`).
    fn loss_and_grads_with(&mut self, tokens: &[i32], mask: Option<&[u8]>, micro: usize, factored: bool) -> Result<(f64, u64)> {
        let sh = self.window_rows(tokens, mask, micro, "train batch", "micro-batches")?;
        // data-parallel: the targets of the whole global batch (this rank's alone otherwise)
        let count = self.update_count(micro, sh.t, mask)?;
        let ntok = count as f64;
        let scale = (1.0 / ntok) as f32;
        let rows = sh.rows;
        let mut sum = 0.0;
        let step = self.opt.steps();
        let r = (|| -> Result<()> {
            for mb in 0..micro {
                self.set_dropout(Some((step, mb)));
                let mw = mask.map(|m| &m[mb * rows..(mb + 1) * rows]);
                sum += self.forward_loss(&tokens[mb * rows..(mb + 1) * rows], mw, Some(scale))?;
                if !sum.is_finite() {
                    return Err(Error::non_finite(format!("loss is {} at micro-batch {mb}", fmt_nf(sum))));
                }
                self.timed_backward(mb > 0, factored, &mut |_, _, _, _| {})?;
            }
            Ok(())
        })();
        self.set_dropout(None);
        r.map(|_| (sum / ntok, count))
    }

    /// Turns the adapters' dropout on for micro-batch `mb` of optimizer step `step` (its
    /// masks are a function of the seed, step and micro-batch), or off (eval, logits).
    fn set_dropout(&mut self, at: Option<(u64, usize)>) {
        let seed = self.cfg.seed;
        if let Some(lm) = self.model.lora.as_mut() {
            lm.dropout_key = at.map(|(step, mb)| lora::dropout_key(seed, step, mb));
        }
    }

    /// N of an update: the targets carrying loss over its `micro` micro-batches (in a
    /// data-parallel run, over every rank's: checked after the sum, so a rank whose slice
    /// carries none trains on and all ranks refuse together when the whole batch does); 0 is
    /// refused.
    fn update_count(&self, micro: usize, t: usize, mask: Option<&[u8]>) -> Result<u64> {
        let count = crate::dist::grads::global_count(Self::counted(micro * self.cfg.batch_size, t, mask))?;
        ensure!(count > 0, "no target in this update carries loss (every mask entry is 0)");
        Ok(count)
    }

    /// Global norm of the gradient buffers after `loss_and_grads` (the global step's
    /// gradients; a fused engine's shared buffer holds only its last tensor or chunk).
    pub fn grad_norm(&self) -> f64 {
        let p = &self.model.params;
        for (i, q) in p.iter().enumerate().filter(|(i, _)| self.model.trainable(*i)) {
            let g = self.grads.get(i);
            self.be.sumsq_acc(g, q.numel().min(self.be.len(g)));
        }
        self.be.take_sumsq().sqrt()
    }

    pub fn train_step(&mut self, tokens: &[i32], micro: usize, lr: f32) -> Result<StepStats> {
        self.train_step_masked(tokens, None, micro, lr)
    }

    /// One optimizer step over `micro` micro-batches of batch_size rows of t + 1 ids (t ≤
    /// seq_len, derived from the length); with `mask` (one entry per id) only the targets
    /// whose entry is not 0 carry loss.
    pub fn train_step_masked(&mut self, tokens: &[i32], mask: Option<&[u8]>, micro: usize, lr: f32) -> Result<StepStats> {
        ensure!(lr.is_finite() && lr >= 0.0, "lr = {lr}: must be a finite number ≥ 0");
        ensure!(
            micro == self.cfg.grad_accum,
            "micro-batches = {micro}: this engine was built for grad_accum = {}",
            self.cfg.grad_accum
        );
        if self.fused {
            return self.fused_step(tokens, mask, lr);
        }
        let factored = self.cfg.optimizer.proj_grad == crate::config::ProjGrad::Factored;
        let (loss, count) = self.loss_and_grads_with(tokens, mask, micro, factored)?;
        let clip = self.cfg.optimizer.clip as f64;
        if crate::dist::lowrank::low_rank_step(&self.cfg.optimizer) {
            // data-parallel with low-rank communication (dist::lowrank): the ranks sum the
            // projected matrices' R between refreshes, whole gradients otherwise
            let t0 = Instant::now();
            let m = &mut self.model;
            let train: Vec<usize> = (0..m.params.len()).filter(|&i| m.trainable(i)).collect();
            let s = crate::dist::lowrank::step(&self.be, m, &mut self.grads, self.opt.as_mut(), &train, loss, lr, |n| clip_scale(n, clip))?;
            self.be.sync()?;
            self.timing[2] += t0.elapsed().as_secs_f64();
            self.note_device_peak();
            return Ok(StepStats { loss: s.loss, grad_norm: s.norm, clipped: s.clipped, count });
        }
        // data-parallel: sum the ranks' gradients (each scaled by 1 / global count) and losses
        let loss = if crate::dist::size() > 1 {
            let m = &self.model;
            let train: Vec<usize> = (0..m.params.len()).filter(|&i| m.trainable(i)).collect();
            crate::dist::lowrank::full_reduce(&self.be, m, &mut self.grads, self.opt.as_ref(), &train, loss)?
        } else {
            loss
        };
        let t0 = Instant::now();
        let mut st = StepStats { loss, count, ..Default::default() };
        let be = &self.be;
        let (model, grads, opt) = (&mut self.model, &mut self.grads, &mut self.opt);
        (|| -> Result<()> {
            // frozen parameters (a LoRA model's base, frozen tables) have no gradient: norm,
            // clipping and updates cover the trained ones
            let train: Vec<usize> = (0..model.params.len()).filter(|&i| model.trainable(i)).collect();
            for &i in &train {
                be.sumsq_acc(grads.get(i), opt.factored_len(i).unwrap_or(model.params[i].numel()));
            }
            st.grad_norm = be.take_sumsq().sqrt();
            // the clip factor goes into the optimizer: an unprojected gradient is scaled
            // element-wise, a projected one after its projection (docs/algorithm-spec.md §1.5)
            let scale = clip_scale(st.grad_norm, clip)?;
            st.clipped = scale.is_some();
            opt.begin_step();
            for &i in &train {
                opt.update_scaled(be, i, &mut model.params[i], grads.get_mut(i), lr, scale)?;
            }
            opt.end_step(be);
            Ok(())
        })()?;
        self.be.sync()?;
        self.timing[2] += t0.elapsed().as_secs_f64();
        self.note_device_peak();
        Ok(st)
    }

    /// One step with the optimizer inside the backward: each parameter is updated as soon
    /// as its gradient is complete, and gradients share one buffer (peak gradient memory
    /// is one tensor's). Clipping stays exact: with a projected optimizer (a clip stash,
    /// `fused_clip_step`) one backward keeps the rank-r gradients until the global norm is
    /// known; otherwise a first backward only measures the norm and a second one applies
    /// the clipped updates (the forward activations are reused: one extra backward).
    fn fused_step(&mut self, tokens: &[i32], mask: Option<&[u8]>, lr: f32) -> Result<StepStats> {
        // adapter dropout on for this step's forward and backward(s), off afterwards
        self.set_dropout(Some((self.opt.steps(), 0)));
        let r = self.fused_step_inner(tokens, mask, lr);
        self.set_dropout(None);
        r
    }

    fn fused_step_inner(&mut self, tokens: &[i32], mask: Option<&[u8]>, lr: f32) -> Result<StepStats> {
        let sh = self.window_rows(tokens, mask, 1, "train batch", "micro-batches")?;
        // data-parallel: N and the loss are the whole global batch's (one process: this
        // batch's); the count is checked after the sum, so every rank refuses together
        let count = self.update_count(1, sh.t, mask)?;
        let ntok = count as f64;
        let sum = self.forward_loss(tokens, mask, Some((1.0 / ntok) as f32))?;
        let sum = crate::dist::overlap::sum_f64(sum)?;
        if !sum.is_finite() {
            return Err(Error::non_finite(format!("loss is {}", fmt_nf(sum))));
        }
        let mut st = StepStats { loss: sum / ntok, count, ..Default::default() };
        let clip = self.cfg.optimizer.clip as f64;
        if clip > 0.0 && self.opt.stashes() && !self.two_backward_clip {
            return self.fused_clip_step(st, clip, lr);
        }
        let t0 = Instant::now();
        self.backwards += if clip > 0.0 { 2 } else { 1 };
        let (be, m, g, a, opt) = (&self.be, &mut self.model, &mut self.grads, &mut self.acts, &mut self.opt);
        // data-parallel: every gradient is summed over the ranks (overlapping the backward)
        // before the norm or the optimizer sees it (`dist::overlap`)
        let mut ov = crate::dist::overlap::Overlap::new(be, g)?;
        let mut scale = 1.0f32;
        if clip > 0.0 {
            let norm = &mut |i: usize, rows: Option<(usize, usize)>, m: &mut Llama<B>, g: &mut Grads<B>| be.sumsq_acc(g.get(i), grad_len(m, i, rows));
            pass::backward(be, m, g, a, false, &mut |i, rows, m, g| ov.push(be, i, rows, grad_len(m, i, rows), m, g, norm));
            let r = ov.flush(be, m, g, norm);
            st.grad_norm = be.take_sumsq().sqrt();
            r?;
            if let Some(s) = clip_scale(st.grad_norm, clip)? {
                scale = s;
                st.clipped = true;
            }
        }
        opt.begin_step();
        let mut err: Option<Error> = None;
        // the optimizer serves the backward twice per tensor: `factored` before its gradient
        // is formed (proj_grad = factored), the update once it is complete
        let optc = std::cell::RefCell::new(&mut **opt);
        let update = &mut |i: usize, rows: Option<(usize, usize)>, m: &mut Llama<B>, g: &mut Grads<B>| {
            if err.is_some() {
                return;
            }
            let mut o = optc.borrow_mut();
            if clip <= 0.0 {
                be.sumsq_acc(g.get(i), o.factored_len(i).unwrap_or(grad_len(m, i, rows)));
            }
            let r = scaled_update(&mut **o, be, m, g, i, rows, lr, (scale != 1.0).then_some(scale));
            if let Err(e) = r {
                err = Some(e);
            }
        };
        let f = &mut |i: usize, m: &Llama<B>, fs: optim::Factors<'_, B>, gb: &mut B::Buf| optc.borrow_mut().factored(be, i, &m.params[i], fs, true, gb);
        let factored = clip <= 0.0 && self.cfg.optimizer.proj_grad == crate::config::ProjGrad::Factored;
        let factor: Option<&mut pass::Factor<B>> = if factored { Some(f) } else { None };
        pass::backward_with(be, m, g, a, false, false, factor, &mut |i, rows, m, g| ov.push(be, i, rows, grad_len(m, i, rows), m, g, update));
        let r = ov.flush(be, m, g, update);
        if let Some(e) = err.or(r.err()) {
            be.take_sumsq(); // drop the partial norm so the next step starts from 0
            return Err(e);
        }
        opt.end_step(be);
        if clip <= 0.0 {
            st.grad_norm = be.take_sumsq().sqrt();
        }
        self.be.sync()?;
        self.timing[1] += t0.elapsed().as_secs_f64();
        self.note_device_peak();
        Ok(st)
    }

    /// The fused step with clipping and a clip stash (docs/algorithm-spec.md §1.5), one
    /// backward: each tensor but the tables adds its gradient's sum of squares to the norm
    /// and is stashed (a projected matrix refreshes its projector from the unscaled gradient
    /// and keeps R, a norm keeps its gradient); the tables' gradients are taken after the
    /// backward from the kept activations, the embedding's first, then the head's, for the
    /// norm only. With the norm known: the last table still whole in the shared buffer is
    /// updated from it, every stash is applied (the shared buffer as scratch), and the other
    /// table is recomputed (the embedding's scatter, or the head's product in row chunks) and
    /// updated. On a non-finite norm no weight or moment changes and the step counter is
    /// restored; projectors refreshed in this backward keep their new values.
    ///
    /// Data-parallel: every gradient (the tables' recomputed ones again) is summed over the
    /// ranks before it is stashed, measured or applied (`dist::overlap`); the stash then holds
    /// the projection of the summed gradient, the same on every rank.
    fn fused_clip_step(&mut self, mut st: StepStats, clip: f64, lr: f32) -> Result<StepStats> {
        let t0 = Instant::now();
        self.backwards += 1;
        let (be, m, g, a, opt) = (&self.be, &mut self.model, &mut self.grads, &mut self.acts, &mut self.opt);
        let mut ov = crate::dist::overlap::Overlap::new(be, g)?;
        opt.begin_step();
        let mut err: Option<Error> = None;
        let mut stashed = Vec::new();
        // each tensor but the tables: the norm's share, then the stash; the tables (computed
        // after the backward from the kept activations): the norm's share only
        let collect = &mut |i: usize, rows: Option<(usize, usize)>, m: &mut Llama<B>, g: &mut Grads<B>| {
            let table = i == m.embed || i == m.head;
            if err.is_some() && !table {
                return;
            }
            be.sumsq_acc(g.get(i), grad_len(m, i, rows));
            if table {
                return;
            }
            match opt.stash(be, i, &m.params[i], g.get_mut(i)) {
                Ok(()) => stashed.push(i),
                Err(e) => err = Some(e),
            }
        };
        pass::backward_with(be, m, g, a, false, true, None, &mut |i, rows, m, g| ov.push(be, i, rows, grad_len(m, i, rows), m, g, collect));
        // the tables, for the norm: the embedding's (with a tied head's share), then an
        // untied head's; the last one computed whole stays in the shared buffer (after the
        // flush, its sum over the ranks). In a data-parallel run the backward's last tensor is
        // processed here, at the embedding's first push (one tensor late).
        let hook = &mut |i, rows, m: &mut Llama<B>, g: &mut Grads<B>| ov.push(be, i, rows, grad_len(m, i, rows), m, g, collect);
        pass::embed_grad(be, m, g, a, false, hook);
        pass::head_grad(be, m, g, a, false, hook);
        let comm = ov.flush(be, m, g, collect);
        let head = !m.tied() && m.trainable(m.head);
        let last = if head { Some(m.head) } else { Some(m.embed).filter(|&e| m.trainable(e)) };
        st.grad_norm = be.take_sumsq().sqrt();
        let scale = match err.or(comm.err()).map_or_else(|| clip_scale(st.grad_norm, clip), Err) {
            Ok(s) => s,
            Err(e) => {
                opt.abort_step(be);
                return Err(e);
            }
        };
        st.clipped = scale.is_some();
        let r = (|| -> Result<()> {
            let whole = last.filter(|&i| g.chunk_rows(i).is_none());
            if let Some(i) = whole {
                scaled_update(&mut **opt, be, m, g, i, None, lr, scale)?;
            }
            for &i in &stashed {
                // every stashed tensor's gradient was in the shared buffer: its scratch now
                opt.apply_stash(be, i, &mut m.params[i], g.get_mut(i), lr, scale)?;
            }
            let mut err = None;
            let update = &mut |i: usize, rows: Option<(usize, usize)>, m: &mut Llama<B>, g: &mut Grads<B>| {
                if err.is_none() {
                    err = scaled_update(&mut **opt, be, m, g, i, rows, lr, scale).err();
                }
            };
            let hook = &mut |i, rows, m: &mut Llama<B>, g: &mut Grads<B>| ov.push(be, i, rows, grad_len(m, i, rows), m, g, update);
            if Some(m.embed) != whole {
                pass::embed_grad(be, m, g, a, false, hook);
            }
            if head && Some(m.head) != whole {
                pass::head_grad(be, m, g, a, false, hook);
            }
            let comm = ov.flush(be, m, g, update);
            err.map_or(comm, Err)
        })();
        r?;
        opt.end_step(be);
        self.be.sync()?;
        self.timing[1] += t0.elapsed().as_secs_f64();
        self.note_device_peak();
        Ok(st)
    }

    /// Mean over `batches` of each batch's mean token cross-entropy (docs/algorithm-spec.md I-16).
    pub fn eval(&mut self, tokens: &[i32], batches: usize) -> Result<f64> {
        Ok(self.eval_masked(tokens, None, batches)?.mean)
    }

    /// Loss of `batches` batches of batch_size rows of t + 1 ids (t ≤ seq_len, derived
    /// from the length), over the targets `mask` keeps (all without one), with per-row
    /// sums and counts (for scoring continuations by log-likelihood).
    pub fn eval_masked(&mut self, tokens: &[i32], mask: Option<&[u8]>, batches: usize) -> Result<EvalOut> {
        let sh = self.window_rows(tokens, mask, batches, "eval batches", "batches")?;
        let (b, t, rows) = (self.cfg.batch_size, sh.t, sh.rows);
        let count = Self::counted(batches * b, t, mask);
        ensure!(count > 0, "eval batches: no target carries loss (every mask entry is 0)");
        let ntok = (b * t) as f64;
        let mut out = EvalOut { count, row_sums: Vec::with_capacity(batches * b), row_counts: Vec::with_capacity(batches * b), ..Default::default() };
        let mut total = 0.0;
        for bi in 0..batches {
            let mw = mask.map(|m| &m[bi * rows..(bi + 1) * rows]);
            let s = self.forward_loss(&tokens[bi * rows..(bi + 1) * rows], mw, None)?;
            total += s / ntok;
            out.sum += s;
            for (r, l) in self.acts.losses.chunks(t).enumerate() {
                out.row_sums.push(l.iter().map(|&x| x as f64).sum());
                out.row_counts.push(Self::counted(1, t, mw.map(|m| &m[r * (t + 1)..(r + 1) * (t + 1)])) as f64);
            }
        }
        // every batch counts b·t targets when all do: the mean of batch means is then the
        // token mean, computed as before masks existed (bit-identical without a mask)
        let all = (batches * b * t) as u64;
        out.mean = if count == all { total / batches as f64 } else { out.sum / count as f64 };
        Ok(out)
    }

    /// Tracked bytes: [weights, adapters, grads, optimizer_state, projector, activations, total].
    pub fn memory(&self) -> [u64; 7] {
        let m = self.be.mem();
        let mut out = [0u64; 7];
        for (i, &c) in CATEGORIES.iter().enumerate() {
            out[i] = m.get(c);
        }
        out[6] = m.total();
        out
    }

    /// The adapter settings of a lora/qlora run (None for the other optimizers).
    pub fn adapters(&self) -> Option<lora::AdapterSpec> {
        self.model.lora.as_ref().map(|l| l.spec.clone())
    }

    /// The adapters as (PEFT parameter name, shape [rows, cols], values), in model order.
    pub fn adapter_tensors(&self) -> Result<lora::HostTensors> {
        let mut out = Vec::new();
        for p in self.model.params.iter().filter(|p| p.role.adapter()) {
            out.push((p.name.clone(), vec![p.rows, p.cols], self.be.to_host(p.f(), p.numel())?.into_owned()));
        }
        Ok(out)
    }

    /// Overwrites adapter `name` with `values` (row-major, its shape's element count).
    pub fn set_adapter_tensor(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let first = self.model.params.iter().find(|p| p.role.adapter()).map_or("none: this run has no adapters".to_string(), |p| p.name.clone());
        let Some(p) = self.model.params.iter_mut().find(|p| p.role.adapter() && p.name == name) else {
            return Err(Error::invalid(format!("adapter tensor {name}: not in this model (its adapters are named like {first})")));
        };
        ensure!(
            values.len() == p.numel(),
            "adapter tensor {name}: got {} values, its shape [{}, {}] holds {}",
            values.len(),
            p.rows,
            p.cols,
            p.numel()
        );
        self.be.upload(p.f_mut(), values)
    }

    /// A fingerprint of the frozen base: FNV-1a over every base parameter's name, shape and
    /// stored values (the dequantized ones for NF4), hex. Adapter checkpoints record it.
    pub fn base_fingerprint(&self) -> Result<String> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= b as u64;
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        let mut scratch = self.be.alloc_fp32(0, crate::backend::Category::Activations)?;
        for (i, p) in self.model.params.iter().enumerate().filter(|(_, p)| !p.role.adapter()) {
            eat(p.name.as_bytes());
            eat(&(p.rows as u64).to_le_bytes());
            eat(&(p.cols as u64).to_le_bytes());
            if matches!(p.data, crate::model::Weight::Q(_)) {
                scratch = self.be.alloc_fp32(p.numel(), crate::backend::Category::Activations)?;
            }
            for v in self.model.read_host(&self.be, i, &mut scratch)?.iter() {
                eat(&v.to_bits().to_le_bytes());
            }
        }
        Ok(format!("{h:016x}"))
    }

    /// How the fused step clips (`ClipPlan::mode`): `stash`, `two-backward`, `unfused` or
    /// `off`; `two-backward` where `two_backward_clip` overrides the plan's stash.
    pub fn clip_mode(&self) -> &'static str {
        if self.two_backward_clip && self.clip.mode == "stash" {
            "two-backward"
        } else {
            self.clip.mode
        }
    }

    /// Engine facts for the front end (`qg_info`).
    pub fn info(&self) -> Info {
        let t = self.timing.map(micro);
        Info {
            params: self.model.trainable_numel(),
            device: self.be.name(),
            device_name: self.be.device_name(),
            precision: self.be.precision(),
            optimizer: self.opt.name(),
            fused: self.fused,
            clip_mode: self.clip_mode(),
            clip_why: self.clip.why.clone(),
            steps: self.opt.steps(),
            memory: Bytes::from_array(self.memory()),
            refresh: self.opt.report(&self.model),
            timing: Timing {
                forward_s: t[0],
                backward_s: t[1],
                optimizer_s: t[2],
                dequant_s: micro(self.model.nf4_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9),
            },
            peak_device_bytes: self.peak_device_bytes,
            notice: self.notice.clone(),
            profile: self.be.profile().map(|mut p| {
                // what no op accounts for: the phases' wall time less the ops' sum
                let ops: f64 = p.values().sum();
                p.insert("other".into(), self.timing.iter().sum::<f64>() - ops);
                p.into_iter().map(|(k, v)| (k, micro(v))).collect()
            }),
        }
    }
}

/// The clipped update of parameter `i` from its gradient in `g` (row chunk `rows` of it, or
/// all of it): a chunk is scaled element-wise, as the global step scales the whole table.
#[allow(clippy::too_many_arguments)]
fn scaled_update<B: Backend>(opt: &mut dyn Optimizer<B>, be: &B, m: &mut Llama<B>, g: &mut Grads<B>, i: usize, rows: Option<(usize, usize)>, lr: f32, scale: Option<f32>) -> Result<()> {
    match rows {
        Some((r0, _)) => {
            let (n, off) = (grad_len(m, i, rows), r0 * m.params[i].cols);
            if let Some(s) = scale {
                be.scale(g.get_mut(i), s);
            }
            opt.update_rows(be, i, &mut m.params[i], g.get_mut(i), off, n, lr)
        }
        None => opt.update_scaled(be, i, &mut m.params[i], g.get_mut(i), lr, scale),
    }
}

/// Seconds rounded to microseconds, as reported.
fn micro(s: f64) -> f64 {
    (s * 1e6).round() / 1e6
}

/// What `qg_info` returns (mirrored by `EngineInfo` in ffi/engine.ts).
#[derive(Clone, Debug, Serialize)]
pub struct Info {
    /// Trainable parameter count.
    pub params: usize,
    /// `cpu` or `cuda`.
    pub device: &'static str,
    /// The hardware in words.
    pub device_name: String,
    /// `fp32` or `bf16`.
    pub precision: &'static str,
    pub optimizer: &'static str,
    /// Optimizer steps run inside the backward.
    pub fused: bool,
    /// How the engine clips (`ClipPlan::mode`): `stash` (one backward, the clip stash),
    /// `two-backward`, `unfused` or `off`.
    pub clip_mode: &'static str,
    /// Why that mode (`ClipPlan::why`; for `clip_mode = auto`, the budget it compared).
    pub clip_why: String,
    /// Completed optimizer steps.
    pub steps: u64,
    /// Tracked bytes by category.
    pub memory: Bytes,
    /// Projector refresh counters (GaLore family and 8-bit Adam only).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<crate::optim::Report>,
    pub timing: Timing,
    /// Highest device memory in use seen after a step (GPU only; 0 on the CPU).
    pub peak_device_bytes: u64,
    /// A one-line notice for the user (e.g. a device fallback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// Seconds per op kind (CPU, with `QGALORE_PROFILE=1`), plus `other`: the phases'
    /// time that no op accounts for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<std::collections::BTreeMap<String, f64>>,
}

/// Seconds spent per phase since the start.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// Of forward and backward: NF4 base dequantization for products (qlora; else 0).
    pub dequant_s: f64,
}

/// Global-norm clipping: fails on a non-finite norm, and gives the factor the gradients
/// are scaled by when `clip` > 0 and the norm exceeds it (torch.nn.utils.clip_grad_norm_:
/// max_norm / (norm + 1e-6)).
fn clip_scale(norm: f64, clip: f64) -> Result<Option<f32>> {
    if !norm.is_finite() {
        return Err(Error::non_finite(format!("gradient norm is {}", fmt_nf(norm))));
    }
    Ok((clip > 0.0 && norm > clip).then(|| (clip / (norm + 1e-6)) as f32))
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
    /// One optimizer step (`Engine::train_step_masked`).
    fn train_step_masked(&mut self, tokens: &[i32], mask: Option<&[u8]>, micro: usize, lr: f32) -> Result<StepStats>;
    /// Loss of held-out batches with per-row sums (`Engine::eval_masked`).
    fn eval_masked(&mut self, tokens: &[i32], mask: Option<&[u8]>, batches: usize) -> Result<EvalOut>;
    fn train_step(&mut self, tokens: &[i32], micro: usize, lr: f32) -> Result<StepStats> {
        self.train_step_masked(tokens, None, micro, lr)
    }
    fn eval(&mut self, tokens: &[i32], batches: usize) -> Result<f64> {
        Ok(self.eval_masked(tokens, None, batches)?.mean)
    }
    fn memory(&self) -> [u64; 7];
    fn info(&self) -> Info;
    /// The checkpoint as bytes (`state::engine`).
    fn save_state(&self) -> Result<Vec<u8>>;
    fn load_state(&mut self, bytes: &[u8]) -> Result<()>;
    /// Writes a checkpoint file; `run`: the front end's JSON text.
    fn save_file(&mut self, path: &std::path::Path, run: Option<&str>) -> Result<()>;
    /// Loads a checkpoint file, checking the config as `check` says.
    fn load_file(&mut self, path: &std::path::Path, check: crate::state::engine::Check) -> Result<()>;
    /// A one-line notice for the user (e.g. a device fallback), reported in `info`.
    fn set_notice(&mut self, text: &str);
    /// Logits of batch × seq ids (`crate::infer`).
    fn logits(&mut self, tokens: &[i32], batch: usize, seq: usize, out: &mut [f32]) -> Result<()>;
    /// New tokens after a prompt (`crate::infer`).
    fn generate(&mut self, req: &crate::infer::Request) -> Result<crate::infer::Generated>;
    /// Hugging Face weights in and out (`crate::hf`).
    fn hf(&mut self) -> &mut dyn crate::hf::HfSession;
    /// PEFT adapters in and out (`crate::hf::adapter`).
    fn adapter(&mut self) -> &mut dyn crate::hf::adapter::AdapterSession;
}

impl<B: Backend> Session for Engine<B> {
    fn train_step_masked(&mut self, tokens: &[i32], mask: Option<&[u8]>, micro: usize, lr: f32) -> Result<StepStats> {
        self.usable()?;
        self.be.runner().run(|| Engine::train_step_masked(self, tokens, mask, micro, lr))
    }
    fn eval_masked(&mut self, tokens: &[i32], mask: Option<&[u8]>, batches: usize) -> Result<EvalOut> {
        self.usable()?;
        self.be.runner().run(|| Engine::eval_masked(self, tokens, mask, batches))
    }
    fn memory(&self) -> [u64; 7] {
        Engine::memory(self)
    }
    fn info(&self) -> Info {
        Engine::info(self)
    }
    fn save_state(&self) -> Result<Vec<u8>> {
        Engine::save_state(self)
    }
    fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        Engine::load_state(self, bytes)
    }
    fn save_file(&mut self, path: &std::path::Path, run: Option<&str>) -> Result<()> {
        let runner = self.be.runner();
        let me = &mut *self;
        runner.run(move || Engine::save_file(me, path, run))
    }
    fn load_file(&mut self, path: &std::path::Path, check: crate::state::engine::Check) -> Result<()> {
        let runner = self.be.runner();
        let me = &mut *self;
        runner.run(move || Engine::load_file_checked(me, path, check))
    }
    fn set_notice(&mut self, text: &str) {
        self.notice = Some(text.to_string());
    }
    fn logits(&mut self, tokens: &[i32], batch: usize, seq: usize, out: &mut [f32]) -> Result<()> {
        self.usable()?;
        self.be.runner().run(|| Engine::logits(self, tokens, batch, seq, out))
    }
    fn generate(&mut self, req: &crate::infer::Request) -> Result<crate::infer::Generated> {
        self.usable()?;
        self.be.runner().run(|| Engine::generate(self, req))
    }
    fn hf(&mut self) -> &mut dyn crate::hf::HfSession {
        self
    }
    fn adapter(&mut self) -> &mut dyn crate::hf::adapter::AdapterSession {
        self
    }
}

/// Builds a session on the configured device. `auto` takes the GPU when a usable device
/// and its libraries are found, else the CPU (and says so in `info`'s `notice`). On the CPU,
/// `threads` beyond the machine's processors is capped (with a notice), and a run whose
/// memory plan exceeds the host's available memory is refused before anything is allocated.
pub fn open(cfg: EngineConfig, init: Option<&std::path::Path>) -> Result<Box<dyn Session>> {
    let cpu = |mut cfg: EngineConfig, fallback: Option<&str>| -> Result<Box<dyn Session>> {
        // bf16 on the CPU where it has bf16 instructions (`backend::cpu::bf16`); auto is fp32
        let bf16 = cfg.precision == Precision::Bf16;
        if bf16 {
            crate::host::bf16::kernel().map_err(|e| match fallback {
                Some(_) => Error::invalid(format!("precision = bf16: no usable GPU, and {}", e.trim_start_matches("precision bf16 on "))),
                None => Error::invalid(e),
            })?;
        }
        let mut notices: Vec<String> = fallback.map(String::from).into_iter().collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cfg.threads > cores {
            notices.push(format!("threads = {} capped at this machine's {cores} processors", cfg.threads));
            cfg.threads = cores;
        }
        let budget = refuse_beyond_host_memory(&cfg)?;
        let mut s: Box<dyn Session> = if bf16 {
            Box::new(Engine::build_with_budget(crate::backend::cpu::bf16::CpuBf16::new(cfg.threads)?, cfg, init, budget)?)
        } else {
            Box::new(Engine::build_with_budget(crate::backend::cpu::Cpu::new(cfg.threads)?, cfg, init, budget)?)
        };
        if !notices.is_empty() {
            s.set_notice(&notices.join("; "));
        }
        Ok(s)
    };
    match cfg.device {
        Device::Cpu => cpu(cfg, None),
        Device::Cuda => cuda(cfg, init),
        Device::Auto => {
            #[cfg(feature = "cuda")]
            if crate::backend::cuda::probe::device_count() > 0 {
                return cuda(cfg, init);
            }
            cpu(cfg, Some("no usable CUDA device found; running on the CPU"))
        }
    }
}

/// Bytes the host can still hand out without swapping (Linux `MemAvailable`); None where
/// the system does not say (then nothing is refused).
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Refuses a CPU run whose memory plan (`Plan`, the bytes the engine tracks once every
/// projector is stored) exceeds the host's available memory: allocating it would end in
/// the kernel's out-of-memory kill after minutes of paging, with nothing said. Only an
/// impossible run is refused; the plan leaves out the process's own overhead. Returns the
/// budget `clip_mode = auto` plans for (`plan::clip_budget` of the available memory; None
/// where the system does not say): the plan checked is the one the engine will build, so
/// a run that fits without the clip stash is not refused for it.
fn refuse_beyond_host_memory(cfg: &EngineConfig) -> Result<Option<u64>> {
    cfg.validate()?;
    let Some(free) = host_available_bytes() else { return Ok(None) };
    let budget = local_clip_budget(free);
    let need = Plan::with_budget(cfg, false, "the model", budget).stepped.total;
    if need <= free {
        return Ok(budget);
    }
    Err(Error::invalid(memory_refusal(cfg, need, free, "this machine has")))
}

/// The budget `clip_mode = auto` plans for, from the memory this process found available:
/// `plan::clip_budget` of it, or None in a data-parallel run, whose ranks must clip the same
/// way (a fused step's all-reduces follow its backwards) but may see different free memory;
/// there `auto` takes the stash as a plan without a budget does, and `clip_mode` chooses.
fn local_clip_budget(free: u64) -> Option<u64> {
    (crate::dist::size() <= 1).then(|| plan::clip_budget(free))
}

/// The one-line refusal: the estimate, what is available (`place`: "this machine has",
/// "the GPU has"), and the options that shrink it.
pub fn memory_refusal(cfg: &EngineConfig, need: u64, free: u64, place: &str) -> String {
    let gb = |b: u64| format!("{:.1} GB", b as f64 / 1e9);
    let o = &cfg.optimizer;
    let mut tries = Vec::new();
    if o.name != crate::config::Optimizer::QGalore {
        tries.push("optimizer qgalore".to_string());
    }
    if !cfg.checkpointing {
        tries.push("checkpointing true".to_string());
    }
    // `auto` already drops the clip stash when it does not fit (but in a data-parallel run,
    // `local_clip_budget`); a forced one may be the excess
    let stash = match o.clip_mode {
        crate::config::ClipMode::Stash => true,
        crate::config::ClipMode::TwoBackward => false,
        crate::config::ClipMode::Auto => crate::dist::size() > 1,
    };
    if plan::clip_stash(cfg) && stash {
        tries.push("clip_mode two-backward".to_string());
    }
    tries.push("a smaller batch_size or seq_len".to_string());
    let params: u64 = Plan::new(cfg, false, "the model").params;
    format!(
        "the model ({:.2}B parameters) with optimizer {} needs {} (batch_size {}, seq_len {}); {place} {} available; try {}",
        params as f64 / 1e9,
        o.name.name(),
        gb(need),
        cfg.batch_size,
        cfg.seq_len,
        gb(free),
        tries.join(", ")
    )
}

#[cfg(feature = "cuda")]
fn cuda(cfg: EngineConfig, init: Option<&std::path::Path>) -> Result<Box<dyn Session>> {
    cfg.validate()?;
    let bf16 = cfg.precision != Precision::Fp32;
    // one device per rank in a data-parallel job (its local rank's), device 0 otherwise
    let be = crate::dist::nccl::device_ordinal()
        .and_then(|d| crate::backend::cuda::Cuda::new(d, bf16))
        .map_err(|e| Error::backend(format!("device cuda: {}; use device cpu or auto", e.msg)))?;
    // As on the host: a plan beyond the device's free memory would fail at some allocation
    // deep in the build (or later, in the first backward); refuse it up front with the
    // estimate. Only impossible runs are refused: the plan leaves out the CUDA context and
    // the cuBLAS workspaces.
    let free = be.device_free_bytes();
    let budget = free.and_then(local_clip_budget);
    if let Some(free) = free {
        let need = Plan::with_budget(&cfg, bf16, "the model", budget).stepped.total;
        if need > free {
            return Err(Error::invalid(memory_refusal(&cfg, need, free, "the GPU has")));
        }
    }
    Ok(Box::new(Engine::build_with_budget(be, cfg, init, budget)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: EngineConfig, _: Option<&std::path::Path>) -> Result<Box<dyn Session>> {
    Err(Error::backend("device cuda: this build has no CUDA support (feature `cuda`); use device cpu or auto"))
}
