//! Low-rank communication for the data-parallel global (unfused) step, and the one place
//! that counts what every data-parallel step sends (docs/algorithm-spec.md §1.5a).
//!
//! A projected optimizer (GaLore family) consumes only the rank-r projection R = G Qᵀ (or
//! Pᵀ G) of a projected matrix's gradient. Projection is linear, so between refreshes of a
//! matrix's projector every rank projects its own gradient G_k with the shared projector and
//! the ranks sum R_k instead of G_k: Σ_k G_k Qᵀ = (Σ_k G_k) Qᵀ, exact in real arithmetic. At a
//! refresh of that matrix the ranks sum its whole gradient (the refresh decomposes it) and
//! every rank projects the sum. Unprojected tensors (embedding, head, norms) are summed whole.
//! The projectors, the moments and the INT8 weights stay identical on every rank: each rank
//! computes them from the same summed values with the same arithmetic.
//!
//! With `proj_refresh = randomized` a refresh with a stored projector is the warm-started
//! randomized one (`host::linalg`, one power step): it touches the gradient only through
//! three products, G Yᵀ, Zᵀ G and G Y′ᵀ, so the ranks sum those sketches (2·m′·r + r·n′
//! elements on A = G or Gᵀ, m′×n′) instead of G (`sketch`), and then R with the new projector,
//! where that sends less than G (`sketch_pays`).
//!
//! Clipping needs ‖Σ_k G‖ over every tensor, which the ranks' projections cannot give; with
//! clipping on, a low-rank step takes the norm over what the optimizer consumes (R for
//! projected matrices, the whole gradient otherwise). `DpComm::Auto` therefore sends R only
//! when clipping is off.

use super::{allreduce_sum, size};
use crate::backend::Backend;
use crate::config::{DpComm, OptimConfig};
use crate::error::Result;
use crate::model::{Grads, Llama};
use crate::optim::Optimizer;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

/// What a data-parallel step sends, by category.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cat {
    /// Rank-r projections R of projected matrices (low-rank steps between refreshes).
    LowRank = 0,
    /// Whole gradients of projected matrices whose projector refreshes this step (low-rank).
    Refresh = 1,
    /// Whole gradients of projected matrices in a full step.
    WholeProjected = 2,
    /// Whole gradients of unprojected tensors (embedding, head, norms; every tensor of an
    /// optimizer that projects nothing).
    Unprojected = 3,
    /// The step's scalars: the global target count and the loss (f64 each).
    Scalars = 4,
}

static BYTES: [AtomicU64; 5] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
/// What the same steps' full-gradient all-reduce sends (every trained gradient whole, and
/// the scalars).
static FULL: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);
/// The last step's mode: 0 none yet, 1 full, 2 lowrank.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Counts `bytes` sent in category `c` (only in a world of more than one rank).
pub fn count(c: Cat, bytes: usize) {
    if size() > 1 {
        BYTES[c as usize].fetch_add(bytes as u64, Relaxed);
    }
}

/// Counts one data-parallel step in `mode`, whose full-gradient all-reduce would send
/// `full` bytes.
fn count_step(mode: DpComm, full: usize) {
    FULL.fetch_add(full as u64, Relaxed);
    STEPS.fetch_add(1, Relaxed);
    MODE.store(if mode == DpComm::LowRank { 2 } else { 1 }, Relaxed);
}

/// Bytes of the scalars a step sums (target count, loss).
pub const SCALAR_BYTES: usize = 16;

/// The counters since the process started, as `qg_dist_info` reports them (`comm`).
#[derive(Clone, Debug, Serialize)]
pub struct CommBytes {
    /// The mode of the last data-parallel step: `full`, `lowrank`, or `none` before any.
    pub mode: &'static str,
    /// Data-parallel steps counted.
    pub steps: u64,
    pub lowrank: u64,
    pub refresh: u64,
    pub whole_projected: u64,
    pub unprojected: u64,
    pub scalars: u64,
    /// The sum of the categories.
    pub total: u64,
    /// What a full-gradient all-reduce of the same steps sends.
    pub full_allreduce: u64,
}

pub fn report() -> CommBytes {
    let b: Vec<u64> = BYTES.iter().map(|x| x.load(Relaxed)).collect();
    CommBytes {
        mode: match MODE.load(Relaxed) {
            1 => "full",
            2 => "lowrank",
            _ => "none",
        },
        steps: STEPS.load(Relaxed),
        lowrank: b[0],
        refresh: b[1],
        whole_projected: b[2],
        unprojected: b[3],
        scalars: b[4],
        total: b.iter().sum(),
        full_allreduce: FULL.load(Relaxed),
    }
}

/// Whether this step sends R: more than one rank and `DpComm::resolve` says lowrank.
pub fn low_rank_step(cfg: &OptimConfig) -> bool {
    size() > 1 && DpComm::resolve(cfg) == DpComm::LowRank
}

/// Sums `n` elements of `b` over the ranks in place, counting them in `c`.
fn sum_buf<B: Backend>(be: &B, b: &mut B::Buf, n: usize, c: Cat) -> Result<()> {
    count(c, n * std::mem::size_of::<f32>());
    if be.allreduce_sum(b, n)? {
        return Ok(()); // summed on the device (NCCL, dist/nccl.rs)
    }
    let mut h = be.to_host(b, n)?.into_owned();
    allreduce_sum(&mut h)?;
    be.upload(b, &h)
}

/// Sums the loss and the `train` tensors' gradients over the ranks whole, in place (the
/// full mode); returns the global mean loss.
pub fn full_reduce<B: Backend>(be: &B, model: &Llama<B>, grads: &mut Grads<B>, opt: &dyn Optimizer<B>, train: &[usize], loss: f64) -> Result<f64> {
    let mut l = [loss];
    allreduce_sum(&mut l)?;
    count(Cat::Scalars, 8);
    be.sync()?;
    let mut full = SCALAR_BYTES;
    for &i in train {
        let n = model.params[i].numel();
        full += 4 * n;
        let c = if opt.low_rank(i).is_some() { Cat::WholeProjected } else { Cat::Unprojected };
        sum_buf(be, grads.get_mut(i), n, c)?;
    }
    count_step(DpComm::Full, full);
    Ok(l[0])
}

/// What a low-rank step returns: the global mean loss, the norm it clipped by and whether
/// it did.
pub struct Stepped {
    pub loss: f64,
    pub norm: f64,
    pub clipped: bool,
}

/// One optimizer step of a data-parallel run with low-rank communication, from each rank's
/// own gradients of the `train` tensors (scaled by 1 / the global target count) and its
/// share `loss` of the loss. Projected matrices go through the optimizer's stash: `stash`
/// projects (refreshing from the summed gradient when due), R is summed over the ranks, and
/// `apply_stash` updates once the norm is known; `clip_scale` turns that norm into the clip
/// factor (and refuses a non-finite one, before any update).
#[allow(clippy::too_many_arguments)]
pub fn step<B: Backend>(
    be: &B,
    model: &mut Llama<B>,
    grads: &mut Grads<B>,
    opt: &mut dyn Optimizer<B>,
    train: &[usize],
    loss: f64,
    lr: f32,
    clip_scale: impl Fn(f64) -> Result<Option<f32>>,
) -> Result<Stepped> {
    let mut l = [loss];
    allreduce_sum(&mut l)?;
    count(Cat::Scalars, 8);
    be.sync()?;
    opt.stash_low_rank(be)?;
    opt.begin_step();
    let mut full = SCALAR_BYTES;
    let mut low = vec![None; model.params.len()];
    // every rank makes the same calls in the same order: the refresh schedule and the
    // projectors are the same everywhere
    let sent = (|| -> Result<f64> {
        for &i in train {
            let n = model.params[i].numel();
            full += 4 * n;
            match opt.low_rank(i) {
                Some(lr) => {
                    low[i] = Some(lr.len);
                    // R is summed unless the projection was taken of the summed gradient
                    let mut sum_r = !lr.refresh;
                    if lr.sketch && sketch_pays(model.params[i].rows, model.params[i].cols, lr.len) {
                        let mut f = |g: &[f32], prev: &[f32], rows, cols, k, right| sketch(g, prev, rows, cols, k, right);
                        opt.refresh_sketched(be, i, &model.params[i], grads.get_mut(i), &mut f)?;
                        sum_r = true;
                    } else if lr.refresh {
                        sum_buf(be, grads.get_mut(i), n, Cat::Refresh)?;
                    }
                    opt.stash(be, i, &model.params[i], grads.get_mut(i))?;
                    if sum_r {
                        if let Some(r) = opt.stashed_mut(i) {
                            sum_buf(be, r, lr.len, Cat::LowRank)?;
                        }
                    }
                }
                None => sum_buf(be, grads.get_mut(i), n, Cat::Unprojected)?,
            }
        }
        // the norm of what the optimizer consumes: R of the projected matrices (a matrix
        // without a projector is skipped this step and adds nothing), whole gradients else
        for &i in train {
            match low[i] {
                Some(len) => {
                    if let Some(r) = opt.stashed_mut(i) {
                        be.sumsq_acc(r, len);
                    }
                }
                None => be.sumsq_acc(grads.get(i), model.params[i].numel()),
            }
        }
        Ok(be.take_sumsq().sqrt())
    })();
    let norm = match sent {
        Ok(n) => n,
        Err(e) => {
            opt.abort_step(be);
            return Err(e);
        }
    };
    let scale = match clip_scale(norm) {
        Ok(s) => s,
        Err(e) => {
            opt.abort_step(be);
            return Err(e);
        }
    };
    count_step(DpComm::LowRank, full);
    for &i in train {
        if low[i].is_some() {
            opt.apply_stash(be, i, &mut model.params[i], grads.get_mut(i), lr, scale)?;
        } else {
            opt.update_scaled(be, i, &mut model.params[i], grads.get_mut(i), lr, scale)?;
        }
    }
    opt.end_step(be);
    Ok(Stepped { loss: l[0], norm, clipped: scale.is_some() })
}

/// Whether a sketched refresh of a rows×cols matrix whose R has `low` elements sends less
/// than its whole gradient: the sketches and R after it, 3·max·r′ + r′·min elements, against
/// rows·cols (a whole-gradient refresh needs no R sum). At a rank near min(rows, cols) the
/// sketches outgrow the gradient, and the whole gradient is summed instead.
pub fn sketch_pays(rows: usize, cols: usize, low: usize) -> bool {
    let (max, min) = (rows.max(cols), rows.min(cols));
    let r = low / max.max(1);
    3 * max * r + r * min < rows * cols
}

/// Sums a host buffer over the ranks, counted as refresh traffic.
fn sum_refresh(h: &mut [f32]) -> Result<()> {
    count(Cat::Refresh, std::mem::size_of_val(h));
    allreduce_sum(h)
}

fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = a[i * c + j];
        }
    }
    t
}

/// The warm-started randomized refresh of `host::linalg` (one power step, Rayleigh–Ritz
/// finish) for a data-parallel run: this rank's gradient `g` (rows×cols) enters only through
/// products whose sums over the ranks are taken (`Cat::Refresh`). On A = G (right projector,
/// rows ≥ cols) or Gᵀ (left), m′×n′, from Y = the previous projector as k×n′ rows:
/// Z = Σ A_k Yᵀ (m′×k); Y′ = orth(Σ Zᵀ A_k) (k×n′); Z′ = Σ A_k Y′ᵀ; the eigenvectors E of
/// Z′ᵀZ′ rotate Y′ into the new projector E Y′ (returned in the projector's layout: k×cols
/// right, rows×k left). Every rank computes the same projector from the same sums. None when
/// the sums are zero or a decomposition fails (the caller keeps the old projector).
pub fn sketch(g: &[f32], prev: &[f32], rows: usize, cols: usize, k: usize, right: bool) -> Result<Option<Vec<f32>>> {
    use crate::host::linalg::{orthonormal_rows, top_eigvecs};
    use crate::host::matmul::{matmul, matmul_dw, par};
    let p = par(rayon::current_num_threads());
    let (a, y, m, n) = if right {
        (std::borrow::Cow::Borrowed(&g[..rows * cols]), prev[..k * cols].to_vec(), rows, cols)
    } else {
        (std::borrow::Cow::Owned(transpose(&g[..rows * cols], rows, cols)), transpose(&prev[..rows * k], rows, k), cols, rows)
    };
    let mut z = vec![0.0f32; m * k];
    matmul(&mut z, &a, &y, m, n, k, false, p);
    sum_refresh(&mut z)?;
    if !z.iter().any(|&x| x != 0.0) || !z.iter().all(|x| x.is_finite()) {
        return Ok(None);
    }
    let mut y2 = vec![0.0f32; k * n];
    matmul_dw(&mut y2, &z, &a, m, n, k, false, p);
    sum_refresh(&mut y2)?;
    if orthonormal_rows(&mut y2, k, n).is_err() {
        return Ok(None);
    }
    matmul(&mut z, &a, &y2, m, n, k, false, p);
    sum_refresh(&mut z)?;
    let mut s = vec![0.0f32; k * k];
    matmul_dw(&mut s, &z, &z, m, k, k, false, p);
    let mut e = vec![0.0f32; k * k];
    if top_eigvecs(&s, k, k, &mut e).is_err() {
        return Ok(None);
    }
    let mut out = vec![0.0f32; k * n];
    for i in 0..k {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| e[i * k + l] * y2[l * n + j]).sum();
        }
    }
    if !out.iter().all(|x| x.is_finite()) {
        return Ok(None);
    }
    Ok(Some(if right { out } else { transpose(&out, k, rows) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::linalg::{top_subspace, Refresh};

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let key = crate::rng::stream_key(seed, 1, 2);
        (0..(rows * cols) as u64).map(|i| crate::rng::normal(key, i)).collect()
    }

    /// In a one-rank world the sums are the identity: the sketched refresh is the host's
    /// warm-started randomized refresh, both sides, to rounding.
    #[test]
    fn sketch_is_the_randomized_refresh() {
        for (rows, cols, right) in [(48, 20, true), (20, 48, false)] {
            let k = 4;
            let g = matrix(rows, cols, 3);
            let n = k * if right { cols } else { rows };
            let mut prev = vec![0.0f32; n];
            top_subspace(&matrix(rows, cols, 4), rows, cols, k, right, Refresh::Eigh, None, 0, &mut prev, 1).unwrap();
            let mut want = vec![0.0f32; n];
            top_subspace(&g, rows, cols, k, right, Refresh::Randomized, Some(&prev), 0, &mut want, 1).unwrap();
            let got = sketch(&g, &prev, rows, cols, k, right).unwrap().expect("a projector");
            assert_eq!(got.len(), n);
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-4, "{rows}×{cols}: max difference {err}");
            // a zero gradient has no subspace
            assert_eq!(sketch(&vec![0.0; rows * cols], &prev, rows, cols, k, right).unwrap(), None);
        }
    }

    #[test]
    fn sketches_pay_below_a_third_of_the_smaller_side() {
        // 4096×11008 (LLaMA-7B's MLP): R is 11008·r; sketches 2·11008·r + 4096·r
        assert!(sketch_pays(11008, 4096, 11008 * 1024));
        assert!(!sketch_pays(11008, 4096, 11008 * 4096 / 3));
        // 512×512 at rank 128: 3·512·128 + 128·512 = 262144 = 512·512, not less
        assert!(!sketch_pays(512, 512, 512 * 128));
        assert!(sketch_pays(512, 512, 512 * 127));
    }

    #[test]
    fn auto_sends_r_only_without_clipping_and_only_for_projected_optimizers() {
        use crate::config::{Named, Optimizer};
        let cfg = |name, clip: f32, comm: &str| {
            let mut c = OptimConfig::defaults(name, 1);
            c.clip = clip;
            c.dp_comm = DpComm::parse(comm).unwrap();
            DpComm::resolve(&c)
        };
        assert_eq!(cfg(Optimizer::Galore, 0.0, "auto"), DpComm::LowRank);
        assert_eq!(cfg(Optimizer::QGalore, 1.0, "auto"), DpComm::Full);
        assert_eq!(cfg(Optimizer::Galore8bit, 1.0, "lowrank"), DpComm::LowRank);
        assert_eq!(cfg(Optimizer::Galore, 0.0, "full"), DpComm::Full);
        for o in [Optimizer::AdamW, Optimizer::Adam8bit, Optimizer::Lora] {
            assert_eq!(cfg(o, 0.0, "lowrank"), DpComm::Full);
        }
        let mut raw = serde_json::Map::new();
        raw.insert("name".into(), "galore".into());
        raw.insert("dp_comm".into(), "sparse".into());
        let e = OptimConfig::resolve(&raw, 1).unwrap_err();
        assert_eq!(e.msg, "dp_comm = sparse: must be one of auto, full, lowrank");
        // one world: nothing goes low-rank
        assert!(!low_rank_step(&OptimConfig::defaults(Optimizer::Galore, 1)));
    }

    #[test]
    fn one_rank_counts_nothing() {
        count(Cat::LowRank, 100);
        assert_eq!(report().lowrank, 0);
    }
}
