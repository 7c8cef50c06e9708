//! Causal multi-head attention (grouped KV heads optional) on the CPU: per (sequence,
//! KV head) task, strided GEMMs for QKᵀ and att·V, softmax in between. The probabilities
//! are kept for the backward (seq 256 makes T² per head small; flash attention is not
//! needed at the sizes the CPU trains).

use crate::host::matmul::gemm_raw;
use crate::backend::AttnDims;
use gemm::Parallelism;
use rayon::prelude::*;

use super::SendPtr as Ptr;

fn check(d: &AttnDims, q: usize, k: usize, v: usize, att: usize) {
    let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
    assert!(h % kvh == 0);
    assert!(q >= b * t * h * hd && k >= b * t * kvh * hd && v >= b * t * kvh * hd && att >= b * h * t * t);
}

/// out (b,t,h,hd) and att (b,h,t,t) from q (b,t,h,hd), k, v (b,t,kvh,hd).
pub fn forward(out: &mut [f32], att: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims) {
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
            // scores = scale · Q Kᵀ
            gemm_raw(t, t, hd, a, t as isize, 1, false, qp, qs, 1, kp, 1, kvs, scale, Parallelism::None);
            for ti in 0..t {
                let row = std::slice::from_raw_parts_mut(a.add(ti * t), t);
                let mut mx = f32::NEG_INFINITY;
                for &s in &row[..=ti] {
                    mx = mx.max(s);
                }
                let mut sum = 0.0f32;
                for s in &mut row[..=ti] {
                    *s = (*s - mx).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                for s in &mut row[..=ti] {
                    *s *= inv;
                }
                for s in &mut row[ti + 1..] {
                    *s = 0.0;
                }
            }
            let o = op.get().add(bi * t * h * hd + hi * hd);
            gemm_raw(t, hd, t, o, qs, 1, false, a, t as isize, 1, vp, kvs, 1, 1.0, Parallelism::None);
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
    check(&d, q.len(), k.len(), v.len(), att.len());
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
            for j in 0..group {
                let hi = g * group + j;
                let bh = bi * h + hi;
                let a = att.as_ptr().add(bh * t * t);
                let ds = sp.get().add(bh * t * t);
                let qp = q.as_ptr().add(bi * t * h * hd + hi * hd);
                let dop = dout.as_ptr().add(bi * t * h * hd + hi * hd);
                let dqr = dqp.get().add(bi * t * h * hd + hi * hd);
                // datt = dout · Vᵀ
                gemm_raw(t, t, hd, ds, ts, 1, false, dop, qs, 1, vp, 1, kvs, 1.0, Parallelism::None);
                // dv (+)= attᵀ · dout
                gemm_raw(t, hd, t, dvr, kvs, 1, j > 0, a, 1, ts, dop, qs, 1, 1.0, Parallelism::None);
                // dscores = att ⊙ (datt − Σ datt⊙att) · scale, causal part only
                for ti in 0..t {
                    let ar = std::slice::from_raw_parts(a.add(ti * t), t);
                    let dr = std::slice::from_raw_parts_mut(ds.add(ti * t), t);
                    let mut dot = 0.0f32;
                    for s in 0..=ti {
                        dot += ar[s] * dr[s];
                    }
                    for s in 0..=ti {
                        dr[s] = ar[s] * (dr[s] - dot) * scale;
                    }
                    for x in &mut dr[ti + 1..] {
                        *x = 0.0;
                    }
                }
                // dq = dscores · K ; dk (+)= dscoresᵀ · Q
                gemm_raw(t, hd, t, dqr, qs, 1, false, ds, ts, 1, kp, kvs, 1, 1.0, Parallelism::None);
                gemm_raw(t, hd, t, dkr, kvs, 1, j > 0, ds, 1, ts, qp, qs, 1, 1.0, Parallelism::None);
            }
        }
    });
}
