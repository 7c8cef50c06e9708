//! Every CPU op against a naive reference and/or central finite differences.

mod common;
use common::*;
use qgalore::backend::cpu::{attention, ops};
use qgalore::host::{matmul, rope};
use qgalore::backend::{AdamHp, AttnDims};

fn dotf(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[test]
fn matmul_family_matches_naive_loops() {
    let (n, ic, oc) = (5, 7, 3);
    let inp = values(n * ic, 1);
    let w = values(oc * ic, 2);
    let dout = values(n * oc, 3);
    let p = gemm::Parallelism::None;
    let mut out = vec![0.0; n * oc];
    matmul::matmul(&mut out, &inp, &w, n, ic, oc, false, p);
    let mut dinp = vec![0.0; n * ic];
    matmul::matmul_dinp(&mut dinp, &dout, &w, n, ic, oc, false, p);
    let mut dw = vec![1.0; oc * ic]; // accumulate onto ones
    matmul::matmul_dw(&mut dw, &dout, &inp, n, ic, oc, true, p);
    for r in 0..n {
        for o in 0..oc {
            let e: f32 = (0..ic).map(|k| inp[r * ic + k] * w[o * ic + k]).sum();
            assert!((out[r * oc + o] - e).abs() < 1e-5);
        }
        for k in 0..ic {
            let e: f32 = (0..oc).map(|o| dout[r * oc + o] * w[o * ic + k]).sum();
            assert!((dinp[r * ic + k] - e).abs() < 1e-5);
        }
    }
    for o in 0..oc {
        for k in 0..ic {
            let e: f32 = 1.0 + (0..n).map(|r| dout[r * oc + o] * inp[r * ic + k]).sum::<f32>();
            assert!((dw[o * ic + k] - e).abs() < 1e-5);
        }
    }
}

#[test]
fn rmsnorm_forward_and_gradients() {
    let (n, c, eps) = (6, 24, 1e-6f32);
    let mut x = values(n * c, 10);
    let mut w: Vec<f32> = values(c, 11).iter().map(|v| 1.0 + 0.5 * v).collect();
    let r = values(n * c, 12);
    let mut out = vec![0.0; n * c];
    let mut rstd = vec![0.0; n];
    ops::rmsnorm(&mut out, &mut rstd, &x, &w, n, c, eps);
    for i in 0..n {
        let ms: f64 = x[i * c..(i + 1) * c].iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..c {
            assert!((out[i * c + j] as f64 - w[j] as f64 * x[i * c + j] as f64 * s).abs() < 1e-5);
        }
    }
    let (mut dx, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
    ops::rmsnorm_bwd(&mut dx, &mut dw, &r, &x, &w, &rstd, n, c);
    let wc = w.clone();
    grad_check("rmsnorm dx", &dx, &mut x.clone(), 1e-3, 64, |xx| {
        let (mut o, mut rs) = (vec![0.0; n * c], vec![0.0; n]);
        ops::rmsnorm(&mut o, &mut rs, xx, &wc, n, c, eps);
        dotf(&o, &r)
    });
    let xc = x.clone();
    grad_check("rmsnorm dw", &dw, &mut w, 1e-3, 24, |ww| {
        let (mut o, mut rs) = (vec![0.0; n * c], vec![0.0; n]);
        ops::rmsnorm(&mut o, &mut rs, &xc, ww, n, c, eps);
        dotf(&o, &r)
    });
    x[0] = 0.0; // keep `x` used mutably above
}

/// Hugging Face LLaMA: q·cos + rotate_half(q)·sin with cos = cat(freqs, freqs).cos().
fn rope_naive(x: &[f32], b: usize, t: usize, heads: usize, hd: usize, theta: f64) -> Vec<f64> {
    let half = hd / 2;
    let mut out = vec![0.0f64; x.len()];
    for bi in 0..b {
        for p in 0..t {
            for h in 0..heads {
                let base = ((bi * t + p) * heads + h) * hd;
                for d in 0..hd {
                    let f = 1.0 / theta.powf((2 * (d % half)) as f64 / hd as f64);
                    let (c, s) = ((p as f64 * f).cos(), (p as f64 * f).sin());
                    let rot = if d < half { -(x[base + d + half] as f64) } else { x[base + d - half] as f64 };
                    out[base + d] = x[base + d] as f64 * c + rot * s;
                }
            }
        }
    }
    out
}

#[test]
fn rope_matches_hugging_face_rotate_half_and_inverts() {
    let (b, t, heads, hd) = (2, 9, 3, 8);
    let x = values(b * t * heads * hd, 20);
    let tab = rope::rope_table(t, hd, 10000.0);
    let mut y = x.clone();
    ops::rope(&mut y, &tab, b, t, heads, hd, false);
    let want = rope_naive(&x, b, t, heads, hd, 10000.0);
    for (a, e) in y.iter().zip(&want) {
        assert!((*a as f64 - e).abs() < 1e-5, "{a} vs {e}");
    }
    // position 0 is the identity
    assert_eq!(&y[..heads * hd], &x[..heads * hd]);
    let mut back = y.clone();
    ops::rope(&mut back, &tab, b, t, heads, hd, true);
    for (a, e) in back.iter().zip(&x) {
        assert!((a - e).abs() < 1e-5);
    }
    // the backward is the transpose: <R x, r> = <x, Rᵀ r>
    let r = values(x.len(), 21);
    let mut rt = r.clone();
    ops::rope(&mut rt, &tab, b, t, heads, hd, true);
    assert!((dotf(&y, &r) - dotf(&x, &rt)).abs() < 1e-4);
}

fn attention_naive(q: &[f32], k: &[f32], v: &[f32], d: AttnDims) -> Vec<f64> {
    let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
    let mut out = vec![0.0f64; b * t * h * hd];
    let scale = 1.0 / (hd as f64).sqrt();
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / (h / kvh);
            for ti in 0..t {
                let qrow = &q[((bi * t + ti) * h + hi) * hd..][..hd];
                let scores: Vec<f64> = (0..=ti)
                    .map(|s| {
                        let krow = &k[((bi * t + s) * kvh + g) * hd..][..hd];
                        qrow.iter().zip(krow).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                for (s, sc) in scores.iter().enumerate() {
                    let p = (sc - mx).exp() / z;
                    for dd in 0..hd {
                        out[((bi * t + ti) * h + hi) * hd + dd] += p * v[((bi * t + s) * kvh + g) * hd + dd] as f64;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_reference_and_gradients() {
    for &(h, kvh) in &[(4usize, 4usize), (4, 2)] {
        let d = AttnDims { b: 2, t: 7, h, kvh, hd: 6 };
        let (nq, nk) = (d.b * d.t * h * d.hd, d.b * d.t * kvh * d.hd);
        let mut q = values(nq, 30);
        let mut k = values(nk, 31);
        let mut v = values(nk, 32);
        let r = values(nq, 33);
        let mut out = vec![0.0; nq];
        let mut att = vec![0.0; d.b * h * d.t * d.t];
        attention::forward(&mut out, &mut att, &q, &k, &v, d);
        let want = attention_naive(&q, &k, &v, d);
        for (a, e) in out.iter().zip(&want) {
            assert!((*a as f64 - e).abs() < 1e-5, "h {h} kvh {kvh}: {a} vs {e}");
        }
        // causal: probabilities above the diagonal are zero, rows sum to one
        for row in att.chunks(d.t).take(d.t) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert_eq!(att[1], 0.0);
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        let mut scratch = vec![0.0; att.len()];
        attention::backward(&mut dq, &mut dk, &mut dv, &mut scratch, &r, &q, &k, &v, &att, d);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut o = vec![0.0; nq];
            let mut a = vec![0.0; d.b * h * d.t * d.t];
            attention::forward(&mut o, &mut a, q, k, v, d);
            dotf(&o, &r)
        };
        let (k0, v0) = (k.clone(), v.clone());
        grad_check("attention dq", &dq, &mut q, 1e-3, 80, |x| loss(x, &k0, &v0));
        let q0 = q.clone();
        grad_check("attention dk", &dk, &mut k, 1e-3, 80, |x| loss(&q0, x, &v0));
        let k0 = k.clone();
        grad_check("attention dv", &dv, &mut v, 1e-3, 80, |x| loss(&q0, &k0, x));
    }
}

#[test]
fn swiglu_gradients() {
    let n = 300;
    let mut gate: Vec<f32> = values(n, 40).iter().map(|v| 3.0 * v).collect();
    let mut up = values(n, 41);
    let r = values(n, 42);
    let mut out = vec![0.0; n];
    ops::swiglu(&mut out, &gate, &up);
    let g0 = gate[5] as f64;
    assert!((out[5] as f64 - g0 / (1.0 + (-g0).exp()) * up[5] as f64).abs() < 1e-6);
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    ops::swiglu_bwd(&mut dg, &mut du, &r, &gate, &up);
    let u0 = up.clone();
    grad_check("swiglu dgate", &dg, &mut gate, 1e-3, 100, |g| {
        let mut o = vec![0.0; n];
        ops::swiglu(&mut o, g, &u0);
        dotf(&o, &r)
    });
    let g1 = gate.clone();
    grad_check("swiglu dup", &du, &mut up, 1e-3, 100, |u| {
        let mut o = vec![0.0; n];
        ops::swiglu(&mut o, &g1, u);
        dotf(&o, &r)
    });
}

#[test]
fn cross_entropy_loss_and_gradient() {
    let (n, v) = (5, 11);
    let mut logits: Vec<f32> = values(n * v, 50).iter().map(|x| 4.0 * x).collect();
    let targets: Vec<i32> = (0..n as i32).map(|i| (i * 3) % v as i32).collect();
    let mut losses = vec![0.0; n];
    let mut grad = logits.clone();
    ops::cross_entropy(&mut grad, &targets, &mut losses, n, v, Some(0.5));
    for i in 0..n {
        let row = &logits[i * v..(i + 1) * v];
        let lse = row.iter().map(|&z| (z as f64).exp()).sum::<f64>().ln();
        assert!((losses[i] as f64 - (lse - row[targets[i] as usize] as f64)).abs() < 1e-5);
    }
    grad_check("cross entropy", &grad, &mut logits, 1e-3, 55, |z| {
        let mut zz = z.to_vec();
        let mut l = vec![0.0; n];
        ops::cross_entropy(&mut zz, &targets, &mut l, n, v, None);
        0.5 * l.iter().map(|&x| x as f64).sum::<f64>()
    });
}

#[test]
fn embedding_backward_sums_repeated_tokens() {
    let c = 70; // spans two column blocks
    let table = values(4 * c, 60);
    let tokens = [2, 0, 2, 3];
    let mut out = vec![0.0; tokens.len() * c];
    ops::embedding(&mut out, &tokens, &table, c);
    assert_eq!(&out[c..2 * c], &table[..c]);
    let dout = values(tokens.len() * c, 61);
    let mut dt = vec![0.0; 4 * c];
    ops::embedding_bwd(&mut dt, &dout, &tokens, c);
    for j in 0..c {
        assert_eq!(dt[2 * c + j], dout[j] + dout[2 * c + j]);
        assert_eq!(dt[c + j], 0.0);
        assert_eq!(dt[3 * c + j], dout[3 * c + j]);
    }
}

#[test]
fn adamw_matches_hand_computed_steps() {
    // Two steps of torch.optim.AdamW on one element, computed by hand in f64.
    let (lr, b1, b2, eps, wd) = (0.1f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
    let mut p = vec![1.0f32, -0.5];
    let (mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2]);
    let grads = [[0.2f32, -0.4], [-0.1, 0.3]];
    let (mut ep, mut em, mut ev) = ([1.0f64, -0.5], [0.0f64; 2], [0.0f64; 2]);
    for (s, g) in grads.iter().enumerate() {
        let t = s as u64 + 1;
        let hp = AdamHp { lr: lr as f32, beta1: b1 as f32, beta2: b2 as f32, eps: eps as f32, weight_decay: wd as f32, step: t };
        ops::adamw(&mut p, g, &mut m, &mut v, hp);
        for j in 0..2 {
            let gj = g[j] as f64;
            ep[j] *= 1.0 - lr * wd;
            em[j] = b1 * em[j] + (1.0 - b1) * gj;
            ev[j] = b2 * ev[j] + (1.0 - b2) * gj * gj;
            let mh = em[j] / (1.0 - b1.powi(t as i32));
            let vh = ev[j] / (1.0 - b2.powi(t as i32));
            ep[j] -= lr * mh / (vh.sqrt() + eps);
        }
    }
    for j in 0..2 {
        assert!((p[j] as f64 - ep[j]).abs() < 1e-6, "{} vs {}", p[j], ep[j]);
    }
    // Step 1 by hand: m̂ = g, v̂ = g², so p = 1·(1 − 0.1·0.01) − 0.1·0.2/(0.2 + 1e-8).
    let mut p1 = vec![1.0f32];
    let (mut m1, mut v1) = (vec![0.0f32], vec![0.0f32]);
    let hp = AdamHp { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1 };
    ops::adamw(&mut p1, &[0.2], &mut m1, &mut v1, hp);
    assert!((p1[0] - 0.899).abs() < 1e-6, "{}", p1[0]);
    assert!((m1[0] - 0.02).abs() < 1e-8 && (v1[0] - 0.00004).abs() < 1e-8);
}

#[test]
fn sumsq_is_exact_enough_and_order_fixed() {
    let x = values(100_003, 70);
    let want: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
    let got = ops::sumsq(&x);
    assert!((got - want).abs() / want < 1e-12);
    assert_eq!(got.to_bits(), ops::sumsq(&x).to_bits());
}
