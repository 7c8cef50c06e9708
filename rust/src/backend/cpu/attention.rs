//! Causal multi-head attention (grouped KV heads optional) on the CPU: per (sequence,
//! KV head) task, strided GEMMs for QKᵀ and att·V, softmax in between. The probabilities
//! are kept for the backward (seq 256 makes T² per head small; flash attention is not
//! needed at the sizes the CPU trains).
//!
//! Every product skips the masked triangle in blocks of `BLOCK` rows (about half the
//! FLOPs at seq 256). The skipped terms are exact zeros (masked probabilities and score
//! gradients are stored as 0): a block drops zero terms at the end of its sums (scores,
//! att·V, dscores·K) or at the start (attᵀ·dout, dscoresᵀ·Q), where the kernel's running
//! sum is still +0, so every result is bit-identical to the full products
//! (tests/attention_causal.rs checks it against them).
//!
//! The block loop is generic over how results are stored (`Storage`): as computed (the
//! fp32 backend, `F32`), or rounded to bf16 where the buffer holds bf16 (the bf16 backend,
//! `cpu::bf16`, which rounds each product's result and the probabilities once, as the
//! device's kernels store them). Rounding is element-wise and every block's products read
//! only values already final, so rounding block by block stores what rounding the whole
//! products would.

use crate::host::matmul::gemm_raw;
use crate::backend::AttnDims;
use gemm::Parallelism;
use rayon::prelude::*;

use super::SendPtr as Ptr;

/// Rows per causal block.
const BLOCK: usize = 32;

/// The causal row blocks [r0, r1) of a length-`t` sequence: `BLOCK` rows each, the last
/// taking the remainder (so no block is shorter than `BLOCK`); one block (the full
/// products) when t < 2·BLOCK, hd·BLOCK ≤ 256 or t > 512. Below those sizes the `gemm`
/// crate switches small products (m·n ≤ 256) to dot-product kernels that sum in another
/// order, and above 512 it splits long sums at depths that depend on the shape, so blocks
/// there would change bits; in between every block product sums exactly as the full
/// product does.
fn blocks(t: usize, hd: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = if t < 2 * BLOCK || hd * BLOCK <= 256 || t > 512 { 1 } else { t / BLOCK };
    (0..nb).map(move |i| (i * BLOCK * (nb > 1) as usize, if i + 1 == nb { t } else { (i + 1) * BLOCK }))
}

/// How attention stores a product's result or the probabilities once they are final.
pub trait Storage: Sync {
    /// Stores the `rows`×`cols` block at `p` (row stride `ld`) of a buffer; `half`: whether
    /// that buffer holds bf16 values.
    ///
    /// # Safety
    /// The block must lie inside a buffer only the calling task writes.
    unsafe fn store(p: *mut f32, rows: usize, cols: usize, ld: usize, half: bool);

    /// dst[m×n] (row stride `ld`) = (acc ? dst : 0) + alpha · lhs·rhs with lhs and rhs
    /// strided as `gemm_raw` takes them, on the calling thread: the f32 GEMM, unless the
    /// storage has its own product for its values.
    ///
    /// # Safety
    /// As `gemm_raw`; dst's block is written by the calling task only.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn gemm(m: usize, n: usize, k: usize, dst: *mut f32, ld: isize, acc: bool, lhs: *const f32, lrs: isize, lcs: isize, rhs: *const f32, rrs: isize, rcs: isize, alpha: f32) {
        gemm_raw(m, n, k, dst, ld, 1, acc, lhs, lrs, lcs, rhs, rrs, rcs, alpha, Parallelism::None)
    }

    /// Softmax of a causal row of scores in place: exp(s − max) / Σ, libm's exp and the
    /// sum in order unless the storage has its own.
    #[inline(always)]
    fn softmax(row: &mut [f32]) {
        let mx = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0.0f32;
        for s in row.iter_mut() {
            *s = (*s - mx).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }

    /// Σ a[i]·b[i] (the backward's Σ datt⊙att per row), in order unless the storage has
    /// its own.
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0.0f32, |acc, (&x, &y)| acc + x * y)
    }

    /// Work done once per head on a matrix that several of its products read in parts (K,
    /// V, Q, dout): `rows` for `gemm_rows`, `cols` for `gemm_cols`. None: nothing to keep.
    ///
    /// # Safety
    /// `h` must address its t rows of hd values.
    #[inline(always)]
    unsafe fn prepare(_h: Head, _rows: bool, _cols: bool) -> Option<Prepared> {
        None
    }

    /// dst[m×r1] (+)= alpha · lhs[m×hd] · h[..r1]ᵀ (the scores against the first r1 keys,
    /// or dout·Vᵀ).
    ///
    /// # Safety
    /// As `gemm`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn gemm_rows(_prep: Option<&Prepared>, h: Head, m: usize, r1: usize, dst: *mut f32, ld: isize, acc: bool, lhs: *const f32, lrs: isize, lcs: isize, alpha: f32) {
        Self::gemm(m, r1, h.hd, dst, ld, acc, lhs, lrs, lcs, h.p, 1, h.rs, alpha)
    }

    /// dst[m×hd] (+)= alpha · lhs[m×(k1 − k0)] · h[k0..k1] (att·V, dscores·K, attᵀ·dout,
    /// dscoresᵀ·Q).
    ///
    /// # Safety
    /// As `gemm`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn gemm_cols(_prep: Option<&Prepared>, h: Head, m: usize, (k0, k1): (usize, usize), dst: *mut f32, ld: isize, acc: bool, lhs: *const f32, lrs: isize, lcs: isize, alpha: f32) {
        Self::gemm(m, h.hd, k1 - k0, dst, ld, acc, lhs, lrs, lcs, h.p.offset(k0 as isize * h.rs), h.rs, 1, alpha)
    }
}

/// One head's t×hd matrix (row stride `rs`, columns contiguous) inside a (b, t, heads, hd)
/// buffer.
#[derive(Clone, Copy)]
pub struct Head {
    pub p: *const f32,
    pub t: usize,
    pub hd: usize,
    pub rs: isize,
}

/// What `Storage::prepare` keeps for a head's products: the matrix laid out for them once
/// (`cpu::bf16`: bf16 pair panels by rows and by columns) instead of once per product.
pub struct Prepared {
    pub rows: Vec<u32>,
    pub cols: Vec<u32>,
}

/// fp32 storage: values stay as computed.
pub struct F32;

impl Storage for F32 {
    #[inline(always)]
    unsafe fn store(_: *mut f32, _: usize, _: usize, _: usize, _: bool) {}
}

fn check(d: &AttnDims, q: usize, k: usize, v: usize, att: usize) {
    let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
    assert!(h % kvh == 0);
    assert!(q >= b * t * h * hd && k >= b * t * kvh * hd && v >= b * t * kvh * hd && att >= b * h * t * t);
}

/// out (b,t,h,hd) and att (b,h,t,t) from q (b,t,h,hd), k, v (b,t,kvh,hd).
pub fn forward(out: &mut [f32], att: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims) {
    forward_with::<F32>(out, att, q, k, v, d, (false, false));
}

/// `forward` storing through `S`: the scores, the probabilities (in `att`, bf16 when `ah`)
/// and the output (bf16 when `oh`) as each block computes them.
pub fn forward_with<S: Storage>(out: &mut [f32], att: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims, (oh, ah): (bool, bool)) {
    check(&d, q.len(), k.len(), v.len(), att.len());
    assert!(out.len() >= d.b * d.t * d.h * d.hd);
    let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
    let (qs, kvs) = ((h * hd) as isize, (kvh * hd) as isize);
    let scale = 1.0 / (hd as f32).sqrt();
    let (op, ap) = (Ptr(out.as_mut_ptr()), Ptr(att.as_mut_ptr()));
    (0..b * h).into_par_iter().for_each(|bh| {
        let (bi, hi) = (bh / h, bh % h);
        let g = hi / (h / kvh);
        unsafe {
            let qp = q.as_ptr().add(bi * t * h * hd + hi * hd);
            let kp = k.as_ptr().add(bi * t * kvh * hd + g * hd);
            let vp = v.as_ptr().add(bi * t * kvh * hd + g * hd);
            let a = ap.get().add(bh * t * t);
            let o = op.get().add(bi * t * h * hd + hi * hd);
            let (km, vm) = (Head { p: kp, t, hd, rs: kvs }, Head { p: vp, t, hd, rs: kvs });
            let (kprep, vprep) = (S::prepare(km, true, false), S::prepare(vm, false, true));
            // Row blocks [r0, r1): the causal mask zeroes every column ≥ r1, so the scores
            // need only columns < r1 and att·V only the first r1 rows of V. Dropping those
            // exactly-zero terms leaves every sum unchanged (see the module notes).
            for (r0, r1) in blocks(t, hd) {
                let mb = r1 - r0;
                let ab = a.add(r0 * t);
                // scores = scale · Q Kᵀ
                S::gemm_rows(kprep.as_ref(), km, mb, r1, ab, t as isize, false, qp.offset(r0 as isize * qs), qs, 1, scale);
                S::store(ab, mb, r1, t, ah);
                for ti in r0..r1 {
                    let row = std::slice::from_raw_parts_mut(a.add(ti * t), t);
                    S::softmax(&mut row[..=ti]);
                    row[ti + 1..].fill(0.0);
                }
                S::store(ab, mb, r1, t, ah);
                let ob = o.offset(r0 as isize * qs);
                S::gemm_cols(vprep.as_ref(), vm, mb, (0, r1), ob, qs, false, ab, t as isize, 1, 1.0);
                S::store(ob, mb, hd, qs as usize, oh);
            }
        }
    });
}

/// Gradients with respect to (post-rotary) q, k, v. `scratch` has att's size.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    scratch: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    att: &[f32],
    d: AttnDims,
) {
    backward_with::<F32>(dq, dk, dv, scratch, dout, q, k, v, att, d, [false; 4]);
}

/// `backward` storing through `S` each product's result once it is final (the query heads
/// of a group accumulate into dk and dv one stored product at a time) and the score
/// gradients; `half`: whether dq, dk, dv, scratch hold bf16.
#[allow(clippy::too_many_arguments)]
pub fn backward_with<S: Storage>(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    scratch: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    att: &[f32],
    d: AttnDims,
    half: [bool; 4],
) {
    check(&d, q.len(), k.len(), v.len(), att.len());
    assert!(dout.len() >= d.b * d.t * d.h * d.hd);
    let [qh, kh, vh, sh] = half;
    assert!(scratch.len() >= d.b * d.h * d.t * d.t);
    assert!(dq.len() >= d.b * d.t * d.h * d.hd);
    assert!(dk.len() >= d.b * d.t * d.kvh * d.hd && dv.len() >= d.b * d.t * d.kvh * d.hd);
    let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
    let group = h / kvh;
    let (qs, kvs, ts) = ((h * hd) as isize, (kvh * hd) as isize, t as isize);
    let scale = 1.0 / (hd as f32).sqrt();
    let (dqp, dkp, dvp, sp) = (Ptr(dq.as_mut_ptr()), Ptr(dk.as_mut_ptr()), Ptr(dv.as_mut_ptr()), Ptr(scratch.as_mut_ptr()));
    // One task per (sequence, kv head): the heads of a group accumulate into the same
    // dk/dv rows, so they run sequentially inside the task.
    (0..b * kvh).into_par_iter().for_each(|bg| {
        let (bi, g) = (bg / kvh, bg % kvh);
        unsafe {
            let kp = k.as_ptr().add(bi * t * kvh * hd + g * hd);
            let vp = v.as_ptr().add(bi * t * kvh * hd + g * hd);
            let dkr = dkp.get().add(bi * t * kvh * hd + g * hd);
            let dvr = dvp.get().add(bi * t * kvh * hd + g * hd);
            let (km, vm) = (Head { p: kp, t, hd, rs: kvs }, Head { p: vp, t, hd, rs: kvs });
            let (kprep, vprep) = (S::prepare(km, false, true), S::prepare(vm, true, false));
            for j in 0..group {
                let hi = g * group + j;
                let bh = bi * h + hi;
                let a = att.as_ptr().add(bh * t * t);
                let ds = sp.get().add(bh * t * t);
                let qp = q.as_ptr().add(bi * t * h * hd + hi * hd);
                let dop = dout.as_ptr().add(bi * t * h * hd + hi * hd);
                let dqr = dqp.get().add(bi * t * h * hd + hi * hd);
                let (qm, dom) = (Head { p: qp, t, hd, rs: qs }, Head { p: dop, t, hd, rs: qs });
                let (qprep, doprep) = (S::prepare(qm, false, true), S::prepare(dom, false, true));
                // datt = dout · Vᵀ, causal part: row block [r0, r1) needs columns < r1
                for (r0, r1) in blocks(t, hd) {
                    let (ro, rq) = ((r0 * t) as isize, r0 as isize * qs);
                    S::gemm_rows(vprep.as_ref(), vm, r1 - r0, r1, ds.offset(ro), ts, false, dop.offset(rq), qs, 1, 1.0);
                    S::store(ds.offset(ro), r1 - r0, r1, t, sh);
                }
                // dv (+)= attᵀ · dout: row s sums over ti ≥ s, so block [s0, s1) starts at ti = s0
                for (s0, s1) in blocks(t, hd) {
                    let (lo, dvo) = ((s0 * t + s0) as isize, s0 as isize * kvs);
                    S::gemm_cols(doprep.as_ref(), dom, s1 - s0, (s0, t), dvr.offset(dvo), kvs, j > 0, a.offset(lo), 1, ts, 1.0);
                    S::store(dvr.offset(dvo), s1 - s0, hd, kvs as usize, vh);
                }
                // dscores = att ⊙ (datt − Σ datt⊙att) · scale, causal part only
                for ti in 0..t {
                    let ar = std::slice::from_raw_parts(a.add(ti * t), t);
                    let dr = std::slice::from_raw_parts_mut(ds.add(ti * t), t);
                    let dot = S::dot(&ar[..=ti], &dr[..=ti]);
                    for s in 0..=ti {
                        dr[s] = ar[s] * (dr[s] - dot) * scale;
                    }
                    for x in &mut dr[ti + 1..] {
                        *x = 0.0;
                    }
                    S::store(dr.as_mut_ptr(), 1, ti + 1, t, sh);
                }
                // dq = dscores · K (row block [r0, r1): columns < r1);
                // dk (+)= dscoresᵀ · Q (row s sums over ti ≥ s)
                for (r0, r1) in blocks(t, hd) {
                    let (ro, rq) = ((r0 * t) as isize, r0 as isize * qs);
                    S::gemm_cols(kprep.as_ref(), km, r1 - r0, (0, r1), dqr.offset(rq), qs, false, ds.offset(ro), ts, 1, 1.0);
                    S::store(dqr.offset(rq), r1 - r0, hd, qs as usize, qh);
                }
                for (s0, s1) in blocks(t, hd) {
                    let (lo, dko) = ((s0 * t + s0) as isize, s0 as isize * kvs);
                    S::gemm_cols(qprep.as_ref(), qm, s1 - s0, (s0, t), dkr.offset(dko), kvs, j > 0, ds.offset(lo), 1, ts, 1.0);
                    S::store(dkr.offset(dko), s1 - s0, hd, kvs as usize, kh);
                }
            }
        }
    });
}
