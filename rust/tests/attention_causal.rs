//! The causal attention kernels (which skip the masked triangle block by block) against
//! the full products they replaced: bit-identical outputs and gradients on model shapes
//! (llama-35m / llama-60m heads at seq 256), grouped KV heads and ragged last blocks.
//! `cargo test --release --test attention_causal -- --ignored --nocapture` times both.

use gemm::Parallelism;
use qgalore::backend::cpu::attention;
use qgalore::backend::AttnDims;
use qgalore::host::matmul::gemm_raw;
use rayon::prelude::*;

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}
impl Ptr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The previous kernels: full T×T products, the mask applied by the softmax.
mod full {
    use super::*;
    fn check(d: &AttnDims, q: usize, k: usize, v: usize, att: usize) {
        let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
        assert!(h % kvh == 0);
        assert!(q >= b * t * h * hd && k >= b * t * kvh * hd && v >= b * t * kvh * hd && att >= b * h * t * t);
    }

    /// out (b,t,h,hd) and att (b,h,t,t) from q (b,t,h,hd), k, v (b,t,kvh,hd).
    pub fn forward_full(out: &mut [f32], att: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims) {
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
    pub fn backward_full(
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
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| qgalore::rng::normal(seed, i as u64) * 0.7).collect()
}

struct Case {
    d: AttnDims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn case(b: usize, t: usize, h: usize, kvh: usize, hd: usize) -> Case {
    let d = AttnDims { b, t, h, kvh, hd };
    Case {
        d,
        q: values(b * t * h * hd, 1),
        k: values(b * t * kvh * hd, 2),
        v: values(b * t * kvh * hd, 3),
        dout: values(b * t * h * hd, 4),
    }
}

fn run_new(c: &Case) -> [Vec<f32>; 5] {
    let d = c.d;
    let (qn, kn, an) = (d.b * d.t * d.h * d.hd, d.b * d.t * d.kvh * d.hd, d.b * d.h * d.t * d.t);
    let (mut out, mut att) = (vec![f32::NAN; qn], vec![f32::NAN; an]);
    attention::forward(&mut out, &mut att, &c.q, &c.k, &c.v, d);
    let (mut dq, mut dk, mut dv, mut s) = (vec![f32::NAN; qn], vec![f32::NAN; kn], vec![f32::NAN; kn], vec![f32::NAN; an]);
    attention::backward(&mut dq, &mut dk, &mut dv, &mut s, &c.dout, &c.q, &c.k, &c.v, &att, d);
    [out, att, dq, dk, dv]
}

fn run_full(c: &Case) -> [Vec<f32>; 5] {
    let d = c.d;
    let (qn, kn, an) = (d.b * d.t * d.h * d.hd, d.b * d.t * d.kvh * d.hd, d.b * d.h * d.t * d.t);
    let (mut out, mut att) = (vec![0.0; qn], vec![0.0; an]);
    full::forward_full(&mut out, &mut att, &c.q, &c.k, &c.v, d);
    let (mut dq, mut dk, mut dv, mut s) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn], vec![0.0; an]);
    full::backward_full(&mut dq, &mut dk, &mut dv, &mut s, &c.dout, &c.q, &c.k, &c.v, &att, d);
    [out, att, dq, dk, dv]
}

#[test]
fn causal_blocks_are_bit_identical_to_full_products() {
    let shapes = [
        (2, 256, 8, 8, 48), // llama-35m
        (1, 256, 8, 8, 64), // llama-60m
        (2, 100, 4, 2, 16), // grouped KV heads, ragged last block
        (3, 37, 2, 1, 8),
        (2, 8, 2, 2, 4), // smaller than one block
        (1, 64, 12, 4, 32),
        (1, 70, 2, 2, 16),  // a last block of 38 rows
        (1, 512, 2, 2, 64), // longer sequences
        (1, 1024, 1, 1, 64), // full products above 512
        (1, 512, 1, 1, 128),
        (2, 160, 3, 3, 10),
        (1, 512, 1, 1, 256), // wide heads
        (1, 384, 2, 1, 96),
        (1, 200, 2, 2, 80),
        (1, 300, 2, 1, 128),
    ];
    for (b, t, h, kvh, hd) in shapes {
        let c = case(b, t, h, kvh, hd);
        let (n, f) = (run_new(&c), run_full(&c));
        for (name, (x, y)) in ["out", "att", "dq", "dk", "dv"].iter().zip(n.iter().zip(f.iter())) {
            assert!(x.iter().all(|v| v.is_finite()), "{name} not finite at {:?}", (b, t, h, kvh, hd));
            let bad = x.iter().zip(y).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(bad.is_none(), "{name} differs at {:?} index {:?}: {} vs {}", (b, t, h, kvh, hd), bad, x[bad.unwrap()], y[bad.unwrap()]);
        }
    }
}

/// The bf16 backend's previous kernels (full T×T products, every result rounded whole), as
/// `backend/cpu/bf16.rs` had them before it shared the causal block loop.
mod bf16_full {
    use super::*;

    /// Rounds the `rows`×`cols` block at `p` (row stride `ld`) to bf16 when `half`.
    ///
    /// # Safety
    /// The block must lie inside a buffer only this task writes.
    unsafe fn store_block(p: *mut f32, rows: usize, cols: usize, ld: usize, half: bool) {
        if half {
            for r in 0..rows {
                let row = std::slice::from_raw_parts_mut(p.add(r * ld), cols);
                row.iter_mut().for_each(|x| *x = qgalore::host::bf16::round(*x));
            }
        }
    }

    /// Attention forward as the device runs it under bf16 (`plan::attn_scores`, the
    /// `causal_softmax` kernel, `plan::attn_values`): scores = scale·q·kᵀ rounded to bf16, the
    /// probabilities exp(s − max)/Σ rounded once, out = att·v rounded. Inputs are bf16 values.
    pub fn forward(out: &mut [f32], att: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims, (oh, ah): (bool, bool)) {
        let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
        assert!(h % kvh == 0 && q.len() >= b * t * h * hd && k.len() >= b * t * kvh * hd && v.len() >= b * t * kvh * hd);
        assert!(att.len() >= b * h * t * t && out.len() >= b * t * h * hd);
        let (qs, kvs) = ((h * hd) as isize, (kvh * hd) as isize);
        let scale = 1.0 / (hd as f32).sqrt();
        let (op, ap) = (Ptr(out.as_mut_ptr()), Ptr(att.as_mut_ptr()));
        (0..b * h).into_par_iter().for_each(|bh| {
            let (bi, hi) = (bh / h, bh % h);
            let g = hi / (h / kvh);
            // SAFETY: task bh writes only its head's probabilities and output columns
            unsafe {
                let qp = q.as_ptr().add(bi * t * h * hd + hi * hd);
                let kp = k.as_ptr().add(bi * t * kvh * hd + g * hd);
                let vp = v.as_ptr().add(bi * t * kvh * hd + g * hd);
                let a = ap.get().add(bh * t * t);
                gemm_raw(t, t, hd, a, t as isize, 1, false, qp, qs, 1, kp, 1, kvs, scale, Parallelism::None);
                store_block(a, t, t, t, ah);
                for ti in 0..t {
                    let row = std::slice::from_raw_parts_mut(a.add(ti * t), t);
                    let mx = row[..=ti].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let mut sum = 0.0f32;
                    for s in &mut row[..=ti] {
                        *s = (*s - mx).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    for s in &mut row[..=ti] {
                        *s *= inv;
                    }
                    row[ti + 1..].fill(0.0);
                }
                store_block(a, t, t, t, ah);
                let o = op.get().add(bi * t * h * hd + hi * hd);
                gemm_raw(t, hd, t, o, qs, 1, false, a, t as isize, 1, vp, kvs, 1, 1.0, Parallelism::None);
                store_block(o, t, hd, h * hd, oh);
            }
        });
    }

    /// Attention backward as the device runs it under bf16 (`plan::attn_dscores`, `attn_dv`,
    /// the `causal_softmax_bwd` kernel, `attn_dq`, `attn_dk`): every product's result rounded
    /// where its buffer holds bf16, the query heads of a group accumulating into dk and dv
    /// one rounded product at a time. `half`: dq, dk, dv, scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], scratch: &mut [f32], dout: &[f32], q: &[f32], k: &[f32], v: &[f32], att: &[f32], d: AttnDims, half: [bool; 4]) {
        let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
        assert!(h % kvh == 0 && q.len() >= b * t * h * hd && k.len() >= b * t * kvh * hd && v.len() >= b * t * kvh * hd);
        assert!(att.len() >= b * h * t * t && scratch.len() >= b * h * t * t && dout.len() >= b * t * h * hd);
        assert!(dq.len() >= b * t * h * hd && dk.len() >= b * t * kvh * hd && dv.len() >= b * t * kvh * hd);
        let [qh, kh, vh, sh] = half;
        let group = h / kvh;
        let (qs, kvs, ts) = ((h * hd) as isize, (kvh * hd) as isize, t as isize);
        let scale = 1.0 / (hd as f32).sqrt();
        let (dqp, dkp, dvp, sp) = (Ptr(dq.as_mut_ptr()), Ptr(dk.as_mut_ptr()), Ptr(dv.as_mut_ptr()), Ptr(scratch.as_mut_ptr()));
        (0..b * kvh).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / kvh, bg % kvh);
            // SAFETY: task (bi, g) writes only its kv head's dk, dv rows and its query heads'
            // dq columns and scores
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
                    gemm_raw(t, t, hd, ds, ts, 1, false, dop, qs, 1, vp, 1, kvs, 1.0, Parallelism::None);
                    store_block(ds, t, t, t, sh);
                    gemm_raw(t, hd, t, dvr, kvs, 1, j > 0, a, 1, ts, dop, qs, 1, 1.0, Parallelism::None);
                    store_block(dvr, t, hd, kvh * hd, vh);
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
                        dr[ti + 1..].fill(0.0);
                    }
                    store_block(ds, t, t, t, sh);
                    gemm_raw(t, hd, t, dqr, qs, 1, false, ds, ts, 1, kp, kvs, 1, 1.0, Parallelism::None);
                    store_block(dqr, t, hd, h * hd, qh);
                    gemm_raw(t, hd, t, dkr, kvs, 1, j > 0, ds, 1, ts, qp, qs, 1, 1.0, Parallelism::None);
                    store_block(dkr, t, hd, kvh * hd, kh);
                }
            }
        });
    }
}

/// bf16 attention through the backend (the shared block loop with bf16 stores) equals the
/// previous full-product bf16 kernels bit for bit, bf16 and f32 destination buffers alike.
#[test]
fn bf16_blocks_are_bit_identical_to_the_previous_bf16_kernels() {
    use qgalore::backend::cpu::bf16::CpuBf16;
    use qgalore::backend::{Category, Layers, Memory};
    use qgalore::host::bf16::{rounded, Kernel};
    let be = CpuBf16::with_kernel(2, Kernel::Exact).unwrap();
    let shapes = [(2, 256, 8, 8, 48), (1, 256, 8, 8, 64), (2, 100, 4, 2, 16), (3, 37, 2, 1, 8), (1, 70, 2, 2, 16), (1, 512, 2, 1, 64), (2, 8, 2, 2, 4)];
    for (b, t, h, kvh, hd) in shapes {
        for half in [true, false] {
            let c = case(b, t, h, kvh, hd);
            let d = c.d;
            let (qn, kn, an) = (d.b * d.t * d.h * d.hd, d.b * d.t * d.kvh * d.hd, d.b * d.h * d.t * d.t);
            // inputs as the model holds them: bf16 activations
            let (q, k, v, dout) = (rounded(&c.q), rounded(&c.k), rounded(&c.v), rounded(&c.dout));
            let (mut out, mut att) = (vec![f32::NAN; qn], vec![f32::NAN; an]);
            bf16_full::forward(&mut out, &mut att, &q, &k, &v, d, (half, half));
            let (mut dq, mut dk, mut dv, mut s) = (vec![f32::NAN; qn], vec![f32::NAN; kn], vec![f32::NAN; kn], vec![f32::NAN; an]);
            // the backend hands the backward every operand as bf16 (an f32 att rounded first)
            bf16_full::backward(&mut dq, &mut dk, &mut dv, &mut s, &dout, &q, &k, &v, &rounded(&att), d, [half; 4]);
            let buf = |n: usize| if half { be.alloc(n, Category::Activations).unwrap() } else { be.alloc_fp32(n, Category::Activations).unwrap() };
            let up = |x: &[f32]| {
                let mut b = be.alloc(x.len(), Category::Activations).unwrap();
                be.upload(&mut b, x).unwrap();
                b
            };
            let (qb, kb, vb, db) = (up(&q), up(&k), up(&v), up(&dout));
            let (mut ob, mut ab) = (buf(qn), buf(an));
            be.attention(&mut ob, &mut ab, &qb, &kb, &vb, d);
            let (mut dqb, mut dkb, mut dvb, mut sb) = (buf(qn), buf(kn), buf(kn), buf(an));
            be.attention_bwd(&mut dqb, &mut dkb, &mut dvb, &mut sb, &db, &qb, &kb, &vb, &ab, d);
            let get = |x: &qgalore::backend::cpu::bf16::HalfBuf, n: usize| {
                let mut o = vec![0.0; n];
                be.download(x, &mut o).unwrap();
                o
            };
            let got = [get(&ob, qn), get(&ab, an), get(&dqb, qn), get(&dkb, kn), get(&dvb, kn)];
            for (name, (x, y)) in ["out", "att", "dq", "dk", "dv"].iter().zip(got.iter().zip([&out, &att, &dq, &dk, &dv])) {
                assert!(x.iter().all(|v| v.is_finite()), "{name} not finite at {:?}", (b, t, h, kvh, hd));
                let bad = x.iter().zip(y.iter()).position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(bad.is_none(), "bf16 {name} (half {half}) differs at {:?} index {:?}", (b, t, h, kvh, hd), bad);
            }
        }
    }
}

type Fwd = fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32], AttnDims);
type Bwd = fn(&mut [f32], &mut [f32], &mut [f32], &mut [f32], &[f32], &[f32], &[f32], &[f32], &[f32], AttnDims);
type Kernels = (Fwd, Bwd);

#[test]
#[ignore = "timing harness (speed is measured by benchmarks, not tests): cargo test --release --test attention_causal -- --ignored"]
fn time_causal_vs_full() {
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().ok();
    for (name, hd) in [("llama-35m", 48), ("llama-60m", 64)] {
        let c = case(8, 256, 8, 8, hd);
        let d = c.d;
        let (qn, kn, an) = (d.b * d.t * d.h * d.hd, d.b * d.t * d.kvh * d.hd, d.b * d.h * d.t * d.t);
        let (mut out, mut att, mut dq, mut dk, mut dv, mut s) =
            (vec![0.0; qn], vec![0.0; an], vec![0.0; qn], vec![0.0; kn], vec![0.0; kn], vec![0.0; an]);
        let runs: [(&str, Kernels); 2] =
            [("full", (full::forward_full, full::backward_full)), ("causal", (attention::forward, attention::backward))];
        for round in 0..2 {
            for (label, (fwd, bwd)) in runs {
                let (mut bf, mut bb) = (f64::MAX, f64::MAX);
                for _ in 0..6 {
                    let t0 = std::time::Instant::now();
                    fwd(&mut out, &mut att, &c.q, &c.k, &c.v, d);
                    let t1 = std::time::Instant::now();
                    bwd(&mut dq, &mut dk, &mut dv, &mut s, &c.dout, &c.q, &c.k, &c.v, &att, d);
                    bf = bf.min((t1 - t0).as_secs_f64());
                    bb = bb.min(t1.elapsed().as_secs_f64());
                }
                println!("{name} batch 8 seq 256, 8 heads, 1 thread, round {round}: {label} forward {:.1} ms, backward {:.1} ms (best of 6)", bf * 1e3, bb * 1e3);
            }
        }
    }
}
