//! The memory-efficient family in one optimizer, each part switchable:
//! - `adam8bit`: bnb block-wise 8-bit Adam on every tensor (docs/algorithm-spec.md §1.6);
//! - `galore`: GaLore-AdamW on the 7 linear matrices of each block (docs/algorithm-spec.md §1.2–1.3), fp32
//!   moments, plain AdamW (same formula, no α) elsewhere;
//! - `galore8bit`: the same with bnb 8-bit moments (docs/algorithm-spec.md §1.6);
//! - `qgalore`: galore8bit plus INT8 weights updated with stochastic rounding (docs/algorithm-spec.md §2.4),
//!   INT4 projectors (docs/algorithm-spec.md §2.3) and lazy layer-wise subspace refreshes (docs/algorithm-spec.md §2.5).

use super::Optimizer;
use crate::backend::{AdamHp, Backend, Category};
use crate::config::{CosMode, Named, OptimConfig, ProjGrad};
use crate::optim::{Gaps, Report};
use crate::error::Result;
use crate::model::{Llama, Param, Weight};
use crate::plan::{self, Plan};
use crate::quant::adam8::BnbHp;
use crate::rng;
use super::lazy::Lazy;
use crate::error::Error;
use crate::state::meta::counter;
use crate::state::read::In;
use crate::state::tensors::matrix;
use crate::state::write::Out;
use std::borrow::Cow;
use std::time::Instant;

/// The family's checkpoint scalars (`Optimizer::scalars`).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Scalars {
    step: u64,
    svd_count: u64,
    refresh_failures: u64,
    nonfinite_grads: u64,
    /// Seconds spent refreshing, in integer nanoseconds.
    refresh_ns: u64,
    /// Rank-r gradients formed from the product's factors (absent in older checkpoints).
    #[serde(default)]
    factored_grads: u64,
    projectors: Vec<ProjScalars>,
}

/// One projected matrix's scalars; its tensors are `optim.<param>.queue` (when `queue` >
/// 0), `.past` (when `past`) and `.proj` (when `store` is not `none`).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjScalars {
    /// Index of the parameter in model order.
    param: usize,
    svd_count: u64,
    gap: u64,
    /// Cosines in the lazy-refresh queue.
    queue: usize,
    /// Whether a previous top-1 vector is kept.
    past: bool,
    /// `none`, `f32`, `bf16`, `int8` or `int4`.
    store: String,
}

enum Moments<B: Backend> {
    F32 { m: B::Buf, v: B::Buf },
    Q8(B::A8),
    /// A frozen parameter (`OptimConfig::frozen`): no state, never updated.
    Frozen,
}

/// Projector state of one matrix (docs/algorithm-spec.md §1.2, §2.5).
pub struct Proj<B: Backend> {
    /// Right projector Q (r×n) when rows ≥ cols, else left P (m×r). Stored once chosen.
    pub right: bool,
    pub rank: usize,
    /// Elements of the projector: r×n (right) or m×r (left).
    pub numel: usize,
    store: Option<Weight<B>>,
    pub lazy: Lazy,
    pub svd_count: u64,
}

struct State<B: Backend> {
    moments: Moments<B>,
    proj: Option<Proj<B>>,
}

/// Counters reported in `summary.json`.
#[derive(Default, Debug, Clone)]
pub struct Stats {
    pub svd_count: u64,
    pub refresh_failures: u64,
    pub nonfinite_grads: u64,
    pub refresh_seconds: f64,
    /// Rank-r gradients formed from the product's factors (`proj_grad = factored`).
    pub factored_grads: u64,
}

pub struct Family<B: Backend> {
    cfg: OptimConfig,
    name: &'static str,
    seed: u64,
    step: u64,
    states: Vec<State<B>>,
    /// f32 projector in use (dequantized) and a fresh one during a refresh.
    pf: Option<B::Buf>,
    pnew: Option<B::Buf>,
    /// Low-rank gradient R, then (in place) the low-rank update; and the 8-bit output.
    r: Option<B::Buf>,
    u: Option<B::Buf>,
    pub stats: Stats,
    /// Elements of each parameter's moments (the plan's `state_len`).
    lens: Vec<usize>,
    /// The fused step's clip stash per parameter (`plan::clip_stash`): R of a projected
    /// matrix, the whole gradient of a norm; None for the tables and without one.
    stash: Vec<Option<B::Buf>>,
    /// Whether a parameter's stash holds this step's R (false: no projector, skipped).
    stashed: Vec<bool>,
    /// Whether a parameter's projector was refreshed this step by `refresh_sketched` (then
    /// `project` does not refresh it again).
    sketched: Vec<bool>,
    /// Whether a parameter's gradient buffer holds R formed by `factored` (its first
    /// `lens` elements) rather than the whole gradient; taken by `project`.
    factored: Vec<bool>,
}

impl<B: Backend> Family<B> {
    /// Sizes and storage kinds come from the byte plan (`plan`, built from the same config):
    /// the projector geometry, the moments' elements and kind, and the working buffers. The
    /// engine has checked the projector group size against them (`plan::fit`).
    pub fn new(be: &B, plan: &Plan, cfg: &OptimConfig, seed: u64) -> Result<Self> {
        let mut states = Vec::with_capacity(plan.tensors.len());
        for t in &plan.tensors {
            let proj = t.projector.as_ref().map(|p| {
                let geo = p.geom;
                let lazy = Lazy::new(cfg.update_gap, cfg.lazy, cfg.cos_threshold, cfg.queue_size, cfg.gamma, cfg.cos_mode == CosMode::Abs);
                Proj { right: geo.right, rank: geo.rank, numel: geo.numel, store: None, lazy, svd_count: 0 }
            });
            // moments of the low-rank gradient when projected
            let n = t.state_len;
            let moments = if cfg.frozen(t.role) {
                Moments::Frozen
            } else if t.eight_bit_state {
                Moments::Q8(be.a8_new(n, cfg.block_size, Category::OptimizerState)?)
            } else {
                Moments::F32 {
                    m: be.alloc(n, Category::OptimizerState)?,
                    v: be.alloc(n, Category::OptimizerState)?,
                }
            };
            states.push(State { moments, proj });
        }
        let buf = |n: usize, c| if n > 0 { be.alloc(n, c).map(Some) } else { Ok(None) };
        let w = plan.work;
        Ok(Family {
            cfg: cfg.clone(),
            name: cfg.name.name(),
            seed,
            step: 0,
            states,
            pf: buf(w.projector, Category::Projector)?,
            pnew: buf(w.projector_new, Category::Projector)?,
            r: buf(w.low, Category::Grads)?,
            u: buf(w.update, Category::Grads)?,
            stats: Stats::default(),
            lens: plan.tensors.iter().map(|t| t.state_len).collect(),
            stash: plan.tensors.iter().map(|t| buf(t.stash_len, Category::Grads)).collect::<Result<_>>()?,
            stashed: vec![false; plan.tensors.len()],
            sketched: vec![false; plan.tensors.len()],
            factored: vec![false; plan.tensors.len()],
        })
    }

    pub fn proj(&self, idx: usize) -> Option<&Proj<B>> {
        self.states[idx].proj.as_ref()
    }

    fn adam_hp(&self, lr: f32) -> AdamHp {
        let c = &self.cfg;
        AdamHp { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: 0.0, step: self.step }
    }

    fn bnb_hp(&self, lr: f32, wd: f32) -> BnbHp {
        let c = &self.cfg;
        BnbHp { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: wd, step: self.step }
    }

    /// Full-rank update of a tensor that is not projected.
    fn update_full(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32) {
        let wd = self.cfg.weight_decay;
        let eight = self.cfg.eight_bit();
        let hp8 = self.bnb_hp(lr, wd);
        let hp = self.adam_hp(lr);
        let n = p.numel();
        let w = p.f_mut();
        match &mut self.states[idx].moments {
            Moments::Frozen => {}
            Moments::Q8(st) => be.a8_step(w, g, st, hp8),
            Moments::F32 { m, v } if eight => be.bnb32_step(w, g, m, v, hp8),
            Moments::F32 { m, v } => {
                // GaLoreAdamW's regular group: same formula, no α, decay after the update.
                be.sanitize(g, n);
                be.galore_adam(g, m, v, hp);
                be.axpy(w, 1.0, g);
                if wd > 0.0 {
                    be.scale(w, 1.0 - lr * wd);
                }
            }
        }
    }

    /// Recomputes the projector of `idx` from g; keeps the old one on failure (docs/algorithm-spec.md I-17).
    fn refresh(&mut self, be: &B, idx: usize, p: &Param<B>, g: &B::Buf) -> bool {
        let t0 = Instant::now();
        let (rows, cols) = (p.rows, p.cols);
        let method = self.cfg.proj_refresh;
        let key = rng::stream_key(self.seed, idx as u64, self.step);
        let st = self.states[idx].proj.as_mut().expect("projected parameter");
        let (pf, pnew) = (self.pf.as_mut().unwrap(), self.pnew.as_mut().unwrap());
        let prev = st.store.as_ref().map(|w| dequantized(be, w, pf));
        // An all-zero (or fully non-finite, hence zeroed) gradient has no subspace (docs/algorithm-spec.md I-17).
        let res = if be.sumsq(g, rows * cols) > 0.0 {
            be.top_subspace(g, rows, cols, st.rank, st.right, method, prev, key, pnew)
        } else {
            Err(crate::error::Error::backend("zero gradient"))
        };
        let ok = res.is_ok();
        if ok {
            self.adopt(be, idx, rows, cols, t0)
        } else {
            self.stats.refresh_failures += 1;
            self.stats.refresh_seconds += t0.elapsed().as_secs_f64();
            false
        }
    }

    /// The end of a successful refresh of `idx` (the fresh projector in `pnew`): the lazy
    /// refresh's top-1 vector, then the projector stored (quantized when so configured).
    fn adopt(&mut self, be: &B, idx: usize, rows: usize, cols: usize, t0: Instant) -> bool {
        let st = self.states[idx].proj.as_mut().expect("projected parameter");
        let pnew = self.pnew.as_mut().unwrap();
        {
            // Top-1 singular vector, before quantization (docs/algorithm-spec.md §2.5 step 2).
            let k = st.rank;
            let mut host = vec![0.0f32; if st.right { cols } else { rows * k }];
            if be.download(pnew, &mut host).is_err() {
                self.stats.refresh_failures += 1;
                self.stats.refresh_seconds += t0.elapsed().as_secs_f64();
                return false;
            }
            st.svd_count += 1;
            self.stats.svd_count += 1;
            let vnew: Vec<f32> = if st.right { host } else { (0..rows).map(|i| host[i * k]).collect() };
            st.lazy.observe(vnew);
            let n = st.numel;
            let store = match st.store.take() {
                Some(s) => Ok(s),
                None if plan::f32_projector(self.cfg.proj_bits) => be.alloc(n, Category::Projector).map(Weight::F),
                None => be.q_new(n, self.cfg.proj_bits, self.cfg.proj_group_size, Category::Projector).map(Weight::Q),
            };
            match store {
                Ok(Weight::F(mut b)) => {
                    be.copy_n(&mut b, pnew, n);
                    st.store = Some(Weight::F(b));
                }
                Ok(Weight::Q(mut q)) => {
                    be.q_quantize(&mut q, pnew, self.cfg.quant_range);
                    st.store = Some(Weight::Q(q));
                }
                Ok(Weight::N(..)) => unreachable!("projectors are never NF4"),
                Err(_) => self.stats.refresh_failures += 1,
            }
        }
        self.stats.refresh_seconds += t0.elapsed().as_secs_f64();
        true
    }

    /// The global step's update of a projected matrix (`update_scaled`): `project`, then
    /// `step_low` with R in the optimizer's scratch.
    fn update_projected(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32, scale: Option<f32>) -> Result<()> {
        let mut r = self.r.take().expect("low-rank scratch");
        let res = if self.project(be, idx, p, g, &mut r) { self.step_low(be, idx, p, &mut r, g, lr, scale, false) } else { Ok(()) };
        self.r = Some(r);
        res
    }

    /// First half of a projected update, from the unscaled gradient `g`: zeroes its
    /// non-finite entries (counted), refreshes the projector when due (a subspace is
    /// invariant to a positive scale of g, so clipping is left out of it) and writes the
    /// low-rank gradient R = G Qᵀ (m×r) or Pᵀ G (r×n) into `r`. False when the matrix has no
    /// projector (none could ever be computed): it is skipped this step.
    fn project(&mut self, be: &B, idx: usize, p: &Param<B>, g: &mut B::Buf, r: &mut B::Buf) -> bool {
        let (rows, cols) = (p.rows, p.cols);
        // R already formed from the factors (`factored`): no refresh is due this update
        let factored = std::mem::take(&mut self.factored[idx]);
        self.stats.factored_grads += factored as u64;
        be.sanitize(g, if factored { self.lens[idx] } else { rows * cols });
        let iter = self.step - 1; // pre-increment counter (docs/algorithm-spec.md §1.2 item 3)
        let due = !factored && {
            let st = self.states[idx].proj.as_ref().unwrap();
            st.store.is_none() || st.lazy.due(iter)
        };
        // a data-parallel sketched refresh (`refresh_sketched`) already ran this step
        if due && !std::mem::take(&mut self.sketched[idx]) {
            self.refresh(be, idx, p, g);
        }
        let st = self.states[idx].proj.as_ref().unwrap();
        let Some(store) = &st.store else {
            return false;
        };
        let pm = dequantized(be, store, self.pf.as_mut().unwrap());
        if factored {
            be.copy_n(r, g, self.lens[idx]);
        } else if st.right {
            be.matmul(r, g, pm, rows, cols, st.rank, false);
        } else {
            be.matmul_dw(r, pm, g, rows, cols, st.rank, false);
        }
        true
    }

    /// `Optimizer::factored` (docs/algorithm-spec.md §1.5b): R = dYᵀ·(X·Qᵀ) (right
    /// projector, rows×r) or (dY·P)ᵀ·X (left, r×cols) into `g`, when a projector is stored
    /// and this update does not refresh it.
    #[allow(clippy::too_many_arguments)]
    fn form_factored(&mut self, be: &B, idx: usize, p: &Param<B>, f: super::Factors<'_, B>, stepped: bool, g: &mut B::Buf) -> bool {
        if self.cfg.proj_grad != ProjGrad::Factored || matches!(self.states[idx].moments, Moments::Frozen) {
            return false;
        }
        // the update's pre-increment counter, inside the step (fused) or before it (global)
        let iter = if stepped { self.step - 1 } else { self.step };
        let (dout, inp, n, acc, scratch) = (f.dout, f.inp, f.n, f.acc, f.scratch);
        let Some(st) = self.states[idx].proj.as_ref() else {
            return false;
        };
        let Some(store) = st.store.as_ref().filter(|_| !st.lazy.due(iter)) else {
            return false;
        };
        let (rows, cols, k) = (p.rows, p.cols, st.rank);
        if !factoring_saves(rows, cols, k, n) {
            return false;
        }
        let pm = dequantized(be, store, self.pf.as_mut().unwrap());
        if st.right {
            be.matmul(scratch, inp, pm, n, cols, k, false); // T = X·Qᵀ (n×r)
            be.matmul_dw(g, dout, scratch, n, k, rows, acc); // R (+)= dYᵀ·T (rows×r)
        } else {
            be.matmul_dinp(scratch, dout, pm, n, k, rows, false); // S = dY·P (n×r)
            be.matmul_dw(g, scratch, inp, n, cols, k, acc); // R (+)= Sᵀ·X (r×cols)
        }
        true
    }

    /// Second half: R (in `r`) times the clip factor `scale`, the low-rank Adam step, the
    /// update projected back into `g` (at least m×n elements; overwritten) and applied to
    /// the weight. `dequant`: dequantize the stored projector again (`project` left it in
    /// the working copy, unless another matrix was projected since).
    #[allow(clippy::too_many_arguments)]
    fn step_low(&mut self, be: &B, idx: usize, p: &mut Param<B>, r: &mut B::Buf, g: &mut B::Buf, lr: f32, scale: Option<f32>, dequant: bool) -> Result<()> {
        let (rows, cols) = (p.rows, p.cols);
        let hp = self.adam_hp(lr);
        let hp8 = self.bnb_hp(lr, 0.0);
        let eight = self.cfg.eight_bit();
        let (alpha, wd) = (self.cfg.galore_scale, self.cfg.weight_decay);
        let State { moments, proj } = &mut self.states[idx];
        let st = proj.as_ref().unwrap();
        let Some(store) = &st.store else {
            return Err(Error::backend(format!("internal: {} has no projector", p.name)));
        };
        let pf = self.pf.as_mut().unwrap();
        let pm: &B::Buf = match store {
            Weight::F(b) => b,
            Weight::Q(q) => {
                if dequant {
                    be.q_dequantize(pf, q);
                }
                pf
            }
            Weight::N(..) => unreachable!("projectors are never NF4"),
        };
        let k = st.rank;
        if let Some(s) = scale {
            be.scale(r, s);
        }
        // Low-rank Adam step → U (−ŝ·N), then α·U.
        let upd: &mut B::Buf = match moments {
            Moments::Frozen => unreachable!("update refuses frozen parameters"),
            Moments::F32 { m, v } if !eight => {
                be.galore_adam(r, m, v, hp);
                r
            }
            Moments::F32 { m, v } => {
                let u = self.u.as_mut().unwrap();
                be.fill(u, 0.0);
                be.bnb32_step(u, r, m, v, hp8);
                u
            }
            Moments::Q8(s8) => {
                let u = self.u.as_mut().unwrap();
                be.fill(u, 0.0);
                be.a8_step(u, r, s8, hp8);
                u
            }
        };
        be.scale(upd, alpha);
        // Ĝ = U Q (m×n) or P U, written over the gradient buffer (it is no longer needed).
        if st.right {
            be.matmul_dinp(g, upd, pm, rows, cols, k, false);
        } else {
            be.matmul_dinp(g, pm, upd, rows, cols, k, false);
        }
        let decay = 1.0 - lr * wd;
        match &mut p.data {
            Weight::F(w) => {
                be.axpy(w, 1.0, g);
                if wd > 0.0 {
                    be.scale(w, decay);
                }
            }
            Weight::Q(q) => {
                let sr = self.cfg.stochastic_round.then(|| rng::stream_key(self.seed, idx as u64, self.step));
                be.q_update(q, g, decay, self.cfg.quant_range, sr);
            }
            Weight::N(..) => return Err(crate::error::Error::backend(format!("internal: {} is frozen (NF4)", p.name))),
        }
        Ok(())
    }

    /// How this run stores projectors: `f32`, `bf16`, `int8` or `int4` (the checkpoint's
    /// storage tag of a projector that exists).
    fn store_kind(&self) -> &'static str {
        match self.cfg.proj_bits {
            4 => "int4",
            8 => "int8",
            16 => "bf16",
            _ => "f32",
        }
    }

    /// Stored shape of a parameter's `n`-element moments: the low-rank gradient's when
    /// projected (R = G Qᵀ is m×r, Pᵀ G is r×n), else the parameter's.
    fn moment_shape(&self, st: &State<B>, p: &Param<B>, n: usize) -> Vec<usize> {
        let shape = match &st.proj {
            Some(pr) if pr.right => vec![p.rows, pr.rank],
            Some(pr) => vec![pr.rank, p.cols],
            None => matrix(p.rows, p.cols),
        };
        if shape.iter().product::<usize>() == n {
            shape
        } else {
            vec![n]
        }
    }

    /// A checkpoint's scalars, parsed and checked against this run: counters ≤ 2^53, one
    /// entry per projected matrix in model order, gaps ≥ 1, queues no longer than
    /// `queue_size`, storage tags `none` or this run's kind.
    fn check(&self, params: &[Param<B>], v: &serde_json::Value) -> Result<Scalars> {
        let bad = |what: String| Error::invalid(format!("checkpoint state of {}: {what}", self.name));
        let sc: Scalars = serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
        for (what, x) in [("step", sc.step), ("svd_count", sc.svd_count), ("refresh_failures", sc.refresh_failures), ("nonfinite_grads", sc.nonfinite_grads), ("refresh_ns", sc.refresh_ns)] {
            counter(what, x)?;
        }
        let projected: Vec<usize> = self.states.iter().enumerate().filter(|(_, s)| s.proj.is_some()).map(|(i, _)| i).collect();
        if sc.projectors.len() != projected.len() {
            return Err(bad(format!("{} projectors listed, this run projects {} matrices", sc.projectors.len(), projected.len())));
        }
        for (ps, &i) in sc.projectors.iter().zip(&projected) {
            let name = &params[i].name;
            if ps.param != i {
                return Err(bad(format!("projector of parameter {} listed where this run projects {name} (parameter {i})", ps.param)));
            }
            counter(&format!("{name} svd_count"), ps.svd_count)?;
            counter(&format!("{name} gap"), ps.gap)?;
            if ps.gap == 0 {
                return Err(Error::invalid(format!("checkpoint field {name} gap is 0; a refresh gap is at least 1")));
            }
            let lazy = &self.states[i].proj.as_ref().unwrap().lazy;
            if ps.queue > lazy.queue_size {
                return Err(bad(format!("{name} has {} queued cosines; queue_size is {}", ps.queue, lazy.queue_size)));
            }
            if ps.store != "none" && ps.store != self.store_kind() {
                return Err(bad(format!("{name} projector stored as {}; this run stores none or {}", crate::state::tensors::shown(&ps.store), self.store_kind())));
            }
        }
        Ok(sc)
    }

    /// JSON fragment with refresh statistics and every projected matrix's final gap.
    pub fn report(&self, model: &Llama<B>) -> Report {
        let gaps = self.states.iter().zip(&model.params).filter_map(|(s, p)| s.proj.as_ref().map(|pr| (p.name.clone(), pr.lazy.gap))).collect();
        Report {
            svd_count: self.stats.svd_count,
            refresh_failures: self.stats.refresh_failures,
            nonfinite_grads: self.stats.nonfinite_grads,
            refresh_seconds: (self.stats.refresh_seconds * 1e6).round() / 1e6,
            factored_grads: self.stats.factored_grads,
            gaps: Gaps(gaps),
        }
    }
}

/// A stored projector as f32 values: its f32 buffer, or its codes dequantized into `pf`.
fn dequantized<'a, B: Backend>(be: &B, store: &'a Weight<B>, pf: &'a mut B::Buf) -> &'a B::Buf {
    match store {
        Weight::F(b) => b,
        Weight::Q(q) => {
            be.q_dequantize(pf, q);
            pf
        }
        Weight::N(..) => unreachable!("projectors are never NF4"),
    }
}

/// Whether forming R from the factors (n·r·(rows + cols) multiply-adds) costs less than the
/// whole gradient and its projection (n·rows·cols + rows·cols·r): false for a rank near the
/// matrix's size (a clamped rank), where `factored` keeps the full route.
pub fn factoring_saves(rows: usize, cols: usize, rank: usize, n: usize) -> bool {
    let (m, c, r, n) = (rows as u128, cols as u128, rank as u128, n as u128);
    n * r * (m + c) < n * m * c + m * c * r
}

impl<B: Backend> Optimizer<B> for Family<B> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn begin_step(&mut self) {
        self.step += 1;
    }
    #[allow(clippy::too_many_arguments)]
    fn factored(&mut self, be: &B, idx: usize, p: &Param<B>, f: super::Factors<'_, B>, stepped: bool, g: &mut B::Buf) -> bool {
        let done = self.form_factored(be, idx, p, f, stepped, g);
        self.factored[idx] = done;
        done
    }
    fn factored_len(&self, idx: usize) -> Option<usize> {
        self.factored[idx].then_some(self.lens[idx])
    }
    fn update_rows(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, off: usize, len: usize, lr: f32) -> Result<()> {
        let hp8 = self.bnb_hp(lr, self.cfg.weight_decay);
        match &mut self.states[idx].moments {
            Moments::Q8(st) => {
                be.a8_step_range(p.f_mut(), g, st, off, len, hp8);
                Ok(())
            }
            _ => Err(crate::error::Error::backend(format!("internal: parameter {idx} has no 8-bit state"))),
        }
    }
    fn end_step(&mut self, be: &B) {
        self.stats.nonfinite_grads += be.take_nonfinite();
    }
    fn update(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32) -> Result<()> {
        self.update_scaled(be, idx, p, g, lr, None)
    }
    fn update_scaled(&mut self, be: &B, idx: usize, p: &mut Param<B>, g: &mut B::Buf, lr: f32, scale: Option<f32>) -> Result<()> {
        if matches!(self.states[idx].moments, Moments::Frozen) {
            return Err(Error::backend(format!("internal: {} is frozen and has no optimizer state", p.name)));
        }
        if self.states[idx].proj.is_some() {
            self.update_projected(be, idx, p, g, lr, scale)
        } else {
            if let Some(s) = scale {
                be.scale(g, s);
            }
            self.update_full(be, idx, p, g, lr);
            Ok(())
        }
    }
    fn stashes(&self) -> bool {
        self.stash.iter().any(Option::is_some)
    }
    fn stash(&mut self, be: &B, idx: usize, p: &Param<B>, g: &mut B::Buf) -> Result<()> {
        let Some(mut r) = self.stash[idx].take() else {
            return Err(Error::backend(format!("internal: {} has no clip stash", p.name)));
        };
        self.stashed[idx] = if self.states[idx].proj.is_some() {
            self.project(be, idx, p, g, &mut r)
        } else {
            be.copy_n(&mut r, g, p.numel());
            true
        };
        self.stash[idx] = Some(r);
        Ok(())
    }
    fn apply_stash(&mut self, be: &B, idx: usize, p: &mut Param<B>, scratch: &mut B::Buf, lr: f32, scale: Option<f32>) -> Result<()> {
        let Some(mut r) = self.stash[idx].take() else {
            return Err(Error::backend(format!("internal: {} has no clip stash", p.name)));
        };
        let res = if !std::mem::take(&mut self.stashed[idx]) {
            Ok(())
        } else if self.states[idx].proj.is_some() {
            self.step_low(be, idx, p, &mut r, scratch, lr, scale, true)
        } else {
            if let Some(s) = scale {
                be.scale(&mut r, s);
            }
            self.update_full(be, idx, p, &mut r, lr);
            Ok(())
        };
        self.stash[idx] = Some(r);
        res
    }
    fn low_rank(&self, idx: usize) -> Option<super::LowRank> {
        let st = self.states[idx].proj.as_ref()?;
        // the same test as `project` (pre-increment counter)
        let refresh = st.store.is_none() || st.lazy.due(self.step.saturating_sub(1));
        // the warm-started randomized refresh needs only sketches of the summed gradient
        let sketch = refresh && st.store.is_some() && self.cfg.proj_refresh == crate::backend::Refresh::Randomized;
        Some(super::LowRank { len: self.lens[idx], refresh, sketch })
    }
    fn refresh_sketched(&mut self, be: &B, idx: usize, p: &Param<B>, g: &mut B::Buf, sketch: &mut super::Sketch<'_>) -> Result<bool> {
        let t0 = Instant::now();
        let (rows, cols) = (p.rows, p.cols);
        be.sanitize(g, rows * cols);
        let Some(st) = self.states[idx].proj.as_ref() else {
            return Err(Error::backend(format!("internal: {} has no projector", p.name)));
        };
        let (k, right, n) = (st.rank, st.right, st.numel);
        let pf = self.pf.as_mut().unwrap();
        let prev: Vec<f32> = match &st.store {
            Some(Weight::F(b)) => be.to_host(b, n)?.into_owned(),
            Some(Weight::Q(q)) => {
                be.q_dequantize(pf, q);
                be.to_host(pf, n)?.into_owned()
            }
            _ => return Err(Error::backend(format!("internal: {} has no projector to start a sketch from", p.name))),
        };
        let gh = be.to_host(g, rows * cols)?.into_owned();
        let ok = match sketch(&gh, &prev, rows, cols, k, right)? {
            Some(new) => {
                be.upload(self.pnew.as_mut().unwrap(), &new)?;
                self.adopt(be, idx, rows, cols, t0)
            }
            None => {
                self.stats.refresh_failures += 1;
                self.stats.refresh_seconds += t0.elapsed().as_secs_f64();
                false
            }
        };
        self.sketched[idx] = true;
        Ok(ok)
    }
    fn stash_low_rank(&mut self, be: &B) -> Result<()> {
        for (i, st) in self.states.iter().enumerate() {
            if st.proj.is_some() && self.stash[i].is_none() {
                self.stash[i] = Some(be.alloc(self.lens[i], Category::Grads)?);
            }
        }
        Ok(())
    }
    fn stashed_mut(&mut self, idx: usize) -> Option<&mut B::Buf> {
        if self.stashed[idx] {
            self.stash[idx].as_mut()
        } else {
            None
        }
    }
    fn abort_step(&mut self, be: &B) {
        self.step -= 1;
        self.factored.iter_mut().for_each(|x| *x = false);
        self.stashed.iter_mut().for_each(|x| *x = false);
        self.sketched.iter_mut().for_each(|x| *x = false);
        be.take_nonfinite();
    }
    fn steps(&self) -> u64 {
        self.step
    }
    fn scalars(&self) -> serde_json::Value {
        let s = &self.stats;
        let projectors = self
            .states
            .iter()
            .enumerate()
            .filter_map(|(i, st)| st.proj.as_ref().map(|p| (i, p)))
            .map(|(i, p)| ProjScalars {
                param: i,
                svd_count: p.svd_count,
                gap: p.lazy.gap,
                queue: p.lazy.queue.len(),
                past: p.lazy.past.is_some(),
                store: match &p.store {
                    None => "none".into(),
                    Some(_) => self.store_kind().into(),
                },
            })
            .collect();
        let sc = Scalars {
            step: self.step,
            svd_count: s.svd_count,
            refresh_failures: s.refresh_failures,
            nonfinite_grads: s.nonfinite_grads,
            // integer nanoseconds: a JSON float need not read back bit-exactly
            refresh_ns: (s.refresh_seconds * 1e9).round() as u64,
            factored_grads: s.factored_grads,
            projectors,
        };
        serde_json::to_value(sc).unwrap_or_default()
    }

    fn describe(&self, be: &B, params: &[Param<B>], scalars: &serde_json::Value, out: &mut Out) -> Result<()> {
        let sc = self.check(params, scalars)?;
        let (bits, group) = (self.cfg.proj_bits, self.cfg.proj_group_size);
        let mut k = 0;
        for (i, (st, p)) in self.states.iter().zip(params).enumerate() {
            let base = format!("optim.{}", p.name);
            let n = self.lens[i];
            let shape = self.moment_shape(st, p, n);
            match &st.moments {
                Moments::F32 { m, v } => {
                    out.buf(be, format!("{base}.m"), shape.clone(), m, n)?;
                    out.buf(be, format!("{base}.v"), shape, v, n)?;
                }
                Moments::Q8(a) => out.a8(be, &base, a, n, self.cfg.block_size)?,
                Moments::Frozen => {}
            }
            let Some(pr) = &st.proj else { continue };
            let ps = &sc.projectors[k];
            k += 1;
            let missing = || Error::backend(format!("internal: {base}: the checkpoint plan names state this optimizer lacks"));
            if ps.queue > 0 {
                out.f32s(format!("{base}.queue"), vec![ps.queue], || Ok(Cow::Owned(pr.lazy.queue.iter().copied().collect())))?;
            }
            if ps.past {
                let len = if pr.right { p.cols } else { p.rows };
                out.f32s(format!("{base}.past"), vec![len], || pr.lazy.past.as_deref().map(Cow::Borrowed).ok_or_else(missing))?;
            }
            let pshape = if pr.right { vec![pr.rank, p.cols] } else { vec![p.rows, pr.rank] };
            match ps.store.as_str() {
                "none" => {}
                "f32" => out.f32s(format!("{base}.proj"), pshape, || match &pr.store {
                    Some(Weight::F(b)) => be.to_host(b, pr.numel),
                    _ => Err(missing()),
                })?,
                _ => out.q(be, &format!("{base}.proj"), pshape, (bits, group, pr.numel), || match &pr.store {
                    Some(Weight::Q(q)) => Ok(q),
                    _ => Err(missing()),
                })?,
            }
        }
        Ok(())
    }

    fn load(&mut self, be: &B, params: &[Param<B>], scalars: &serde_json::Value, inp: &mut In) -> Result<()> {
        let sc = self.check(params, scalars)?;
        let (bits, group) = (self.cfg.proj_bits, self.cfg.proj_group_size);
        let kind = self.store_kind();
        let mut k = 0;
        for (i, (st, p)) in self.states.iter_mut().zip(params).enumerate() {
            let base = format!("optim.{}", p.name);
            let n = self.lens[i];
            match &mut st.moments {
                Moments::F32 { m, v } => {
                    inp.buf(be, &format!("{base}.m"), m, n)?;
                    inp.buf(be, &format!("{base}.v"), v, n)?;
                }
                Moments::Q8(a) => inp.a8(be, &base, a)?,
                Moments::Frozen => {}
            }
            let Some(pr) = &mut st.proj else { continue };
            let ps = &sc.projectors[k];
            k += 1;
            let queue = if ps.queue > 0 { inp.f32s(&format!("{base}.queue"), ps.queue)? } else { Vec::new() };
            let past = if ps.past { Some(inp.f32s(&format!("{base}.past"), if pr.right { p.cols } else { p.rows })?) } else { None };
            pr.store = match (ps.store.as_str(), pr.store.take()) {
                ("none", _) => None,
                ("f32", old) => {
                    let mut b = match old {
                        Some(Weight::F(b)) => b,
                        _ => be.alloc(pr.numel, Category::Projector)?,
                    };
                    inp.buf(be, &format!("{base}.proj"), &mut b, pr.numel)?;
                    Some(Weight::F(b))
                }
                (_, old) => {
                    debug_assert_eq!(ps.store, kind);
                    let mut q = match old {
                        Some(Weight::Q(q)) => q,
                        _ => be.q_new(pr.numel, bits, group, Category::Projector)?,
                    };
                    inp.q(be, &format!("{base}.proj"), &mut q)?;
                    Some(Weight::Q(q))
                }
            };
            pr.svd_count = ps.svd_count;
            pr.lazy.gap = ps.gap;
            pr.lazy.queue = queue.into_iter().collect();
            pr.lazy.past = past;
        }
        self.step = sc.step;
        self.stats = Stats {
            svd_count: sc.svd_count,
            refresh_failures: sc.refresh_failures,
            nonfinite_grads: sc.nonfinite_grads,
            refresh_seconds: sc.refresh_ns as f64 / 1e9,
            factored_grads: sc.factored_grads,
        };
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn report(&self, model: &Llama<B>) -> Option<Report> {
        Some(Family::report(self, model))
    }
}
