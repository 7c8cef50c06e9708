//! Quantization invariants I-7 … I-11 and the 8-bit Adam invariants of I-6 (docs/algorithm-spec.md §6).

mod common;
use common::*;
use qgalore::quant::adam8::{self, BnbHp, Maps, State8};
use qgalore::quant::{QTensor, Range};

fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let key = qgalore::rng::stream_key(seed, 1, 0);
    (0..n as u64).map(|i| std * qgalore::rng::normal(key, i)).collect()
}

fn rel_fro(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (d / n).sqrt()
}

#[test]
fn i7_int8_round_trip_bound_and_error_level() {
    let w = normal(256 * 64, 0.02, 3);
    let mut q = QTensor::new(w.len(), 8, 256).unwrap();
    q.quantize(&w, Range::WithZero);
    let mut back = vec![0.0; w.len()];
    q.dequantize(&mut back);
    for g in 0..64 {
        let s = q.scale[g];
        for j in 0..256 {
            let i = g * 256 + j;
            assert!((w[i] - back[i]).abs() <= s / 2.0 * 1.0001, "elem {i}");
        }
    }
    let e = rel_fro(&w, &back);
    assert!((0.004..0.009).contains(&e), "INT8 relative error {e} (docs/algorithm-spec.md I-7: ≈ 0.0064)");
    assert_eq!(q.bytes(), w.len() + 64 * 8);
}

#[test]
fn i7_int4_packed_projector_error_level() {
    // rows of a random orthonormal basis, as a projector refresh would produce
    let (r, n) = (32, 256);
    let g = normal(r * n, 1.0, 9);
    let mut out = vec![0.0f32; r * n];
    qgalore::host::linalg::top_subspace(&g, r, n, r, true, qgalore::backend::Refresh::Svd, None, 0, &mut out, 1).unwrap();
    let mut q = QTensor::new(r * n, 4, 256).unwrap();
    q.quantize(&out, Range::WithZero);
    assert_eq!(q.codes.len(), r * n / 2, "two codes per byte");
    let mut back = vec![0.0; r * n];
    q.dequantize(&mut back);
    let e = rel_fro(&out, &back);
    assert!((0.06..0.16).contains(&e), "INT4 relative error {e} (docs/algorithm-spec.md I-7: ≈ 0.11)");
    for gi in 0..q.scale.len() {
        for j in 0..256 {
            let i = gi * 256 + j;
            assert!((out[i] - back[i]).abs() <= q.scale[gi] / 2.0 * 1.0001);
        }
    }
}

#[test]
fn i7_single_sign_group_reference_vs_fixed() {
    let w = [1.0f32, 2.0];
    let mut q = QTensor::new(2, 4, 2).unwrap();
    let mut back = [0.0f32; 2];
    q.quantize(&w, Range::Reference);
    q.dequantize(&mut back);
    assert_eq!(back, [1.0, 1.0], "reference zero-point clamp clips [1, 2] to [1, 1]");
    q.quantize(&w, Range::WithZero);
    q.dequantize(&mut back);
    let s = q.scale[0];
    assert!((s - 2.0 / 15.0).abs() < 1e-7);
    for j in 0..2 {
        assert!((back[j] - w[j]).abs() <= s / 2.0 + 1e-7, "{back:?}");
    }
}

#[test]
fn i8_requantization_is_stable() {
    let w = normal(256 * 16, 0.02, 5);
    let mut q = QTensor::new(w.len(), 8, 256).unwrap();
    q.quantize(&w, Range::WithZero);
    for g in 0..16 {
        let c = &q.codes[g * 256..(g + 1) * 256];
        // group range includes both signs: its extremes map to the ends of the code range
        assert!(*c.iter().min().unwrap() <= 1 && *c.iter().max().unwrap() >= 254);
    }
    let mut w0 = vec![0.0; w.len()];
    q.dequantize(&mut w0);
    let zero = vec![0.0f32; w.len()];
    let mut rtn = q.clone();
    let mut sr = q.clone();
    for step in 0..50 {
        rtn.update(&zero, 1.0, Range::WithZero, None);
        sr.update(&zero, 1.0, Range::WithZero, Some(qgalore::rng::stream_key(1, 2, step)));
    }
    let (mut a, mut b) = (vec![0.0; w.len()], vec![0.0; w.len()]);
    rtn.dequantize(&mut a);
    sr.dequantize(&mut b);
    assert!(rel_fro(&w0, &a) < 1e-6, "RTN drift {}", rel_fro(&w0, &a));
    assert!(rel_fro(&w0, &b) < 1e-4, "SR drift {}", rel_fro(&w0, &b));
}

/// A group with anchors at −1 and +1 (fixed scale 2/255) and free elements elsewhere.
fn anchored(x: f32) -> Vec<f32> {
    let mut w = vec![x; 256];
    w[0] = -1.0;
    w[1] = 1.0;
    w
}

#[test]
fn i9_stochastic_rounding_is_unbiased_and_accumulates() {
    let s = 2.0f32 / 255.0;
    // single value between grid points, many independent draws (different steps)
    let x = 0.3 * s + 5.0 * s;
    let mut total = 0.0f64;
    let mut count = 0usize;
    for step in 0..80u64 {
        let mut q = QTensor::new(256, 8, 256).unwrap();
        q.quantize(&anchored(0.0), Range::WithZero);
        let mut delta = anchored(x);
        delta[0] = 0.0;
        delta[1] = 0.0;
        q.update(&delta, 1.0, Range::WithZero, Some(qgalore::rng::stream_key(7, 0, step)));
        let mut out = vec![0.0; 256];
        q.dequantize(&mut out);
        for v in &out[2..] {
            total += *v as f64;
            count += 1;
            let f = ((*v - x) / s).abs();
            assert!(f < 1.0, "stays on the two neighbouring grid points");
        }
    }
    let mean = total / count as f64;
    assert!((mean - x as f64).abs() < 4.0 * 0.5 * s as f64 / (count as f64).sqrt(), "mean {mean} vs {x}");

    // 100 updates of 0.1 grid step: SR moves ≈ 10 grid steps, RTN none
    let mut sr = QTensor::new(256, 8, 256).unwrap();
    sr.quantize(&anchored(0.0), Range::WithZero);
    let mut rtn = sr.clone();
    let mut delta = vec![0.1 * s; 256];
    delta[0] = 0.0;
    delta[1] = 0.0;
    for step in 0..100u64 {
        sr.update(&delta, 1.0, Range::WithZero, Some(qgalore::rng::stream_key(8, 0, step)));
        rtn.update(&delta, 1.0, Range::WithZero, None);
    }
    let (mut a, mut b) = (vec![0.0; 256], vec![0.0; 256]);
    sr.dequantize(&mut a);
    rtn.dequantize(&mut b);
    let moved_sr = a[2..].iter().map(|v| *v as f64).sum::<f64>() / 254.0 / s as f64;
    let moved_rtn = b[2..].iter().map(|v| *v as f64).sum::<f64>() / 254.0 / s as f64;
    assert!((moved_sr - 10.0).abs() < 1.0, "SR moved {moved_sr} grid steps");
    assert!(moved_rtn.abs() < 1e-6, "RTN moved {moved_rtn}");
}

#[test]
fn i10_rounding_is_independent_of_thread_count() {
    let w = normal(256 * 40, 0.02, 11);
    let delta = normal(w.len(), 0.001, 12);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut q = QTensor::new(w.len(), 8, 256).unwrap();
            q.quantize(&w, Range::WithZero);
            q.update(&delta, 1.0, Range::WithZero, Some(qgalore::rng::stream_key(3, 4, 5)));
            q.codes
        })
    };
    assert_eq!(run(1), run(2));
    assert_eq!(run(2), run(2));
}

#[test]
fn i6_dynamic_maps() {
    let s = adam8::dynamic_map(true);
    let u = adam8::dynamic_map(false);
    for m in [&s, &u] {
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert!(m.contains(&0.0) && m.contains(&1.0));
    }
    assert!((s[0] + 0.99296874).abs() < 1e-7, "signed minimum {}", s[0]);
    let sp = s.iter().cloned().filter(|v| *v > 0.0).fold(1.0, f32::min);
    let up = u.iter().cloned().filter(|v| *v > 0.0).fold(1.0, f32::min);
    assert!((sp - 5.5e-7).abs() < 1e-12, "{sp}");
    assert!((up - 3.25e-7).abs() < 1e-12, "{up}");
    assert_eq!(u[0], 0.0);
}

#[test]
fn i6_eight_bit_adam_state_and_nonfinite_skip() {
    let maps = Maps::new();
    let n = 5000;
    let mut p = values(n, 1);
    let mut g = values(n, 2);
    g[7] = f32::NAN;
    g[4000] = f32::INFINITY;
    let p0 = p.clone();
    let mut st = State8::new(n, 2048);
    let hp = BnbHp { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
    let skipped = adam8::step8(&mut p, &g, &mut st, &maps, hp);
    assert_eq!(skipped, 2);
    assert_eq!(p[7], p0[7]);
    assert_eq!(p[4000], p0[4000]);
    assert_eq!(maps.signed[st.m[7] as usize], 0.0);
    assert_eq!(maps.unsigned[st.v[4000] as usize], 0.0);
    assert_eq!(st.absmax_m.len(), 3);
    for b in 0..3 {
        for j in b * 2048..((b + 1) * 2048).min(n) {
            let m = maps.signed[st.m[j] as usize] * st.absmax_m[b];
            assert!(m.abs() <= st.absmax_m[b] * (1.0 + 1e-6));
        }
    }
    // first step moves each finite weight by ≈ lr against its gradient's sign
    assert!(((p[0] - p0[0]).abs() - 1e-2).abs() < 1e-3);
}

#[test]
fn i6_eight_bit_adam_tracks_fp32_adam_on_a_quadratic() {
    // f(p) = ½ Σ a_i p_i², 1000 steps of each
    let n = 4096;
    let a: Vec<f32> = (0..n).map(|i| 0.5 + (i % 17) as f32 / 8.0).collect();
    let mut p8 = values(n, 3);
    let mut p32 = p8.clone();
    let start = p8.clone();
    let maps = Maps::new();
    let mut st = State8::new(n, 2048);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut g = vec![0.0f32; n];
    for t in 1..=1000u64 {
        let hp = BnbHp { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: t };
        for i in 0..n {
            g[i] = a[i] * p8[i];
        }
        adam8::step8(&mut p8, &g, &mut st, &maps, hp);
        for i in 0..n {
            g[i] = a[i] * p32[i];
        }
        adam8::step32(&mut p32, &g, &mut m, &mut v, hp);
    }
    // distance between the two end points, relative to the distance travelled
    let norm = |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let diff: Vec<f32> = p32.iter().zip(&p8).map(|(a, b)| a - b).collect();
    let travel: Vec<f32> = p32.iter().zip(&start).map(|(a, b)| a - b).collect();
    let d = norm(&diff) / norm(&travel);
    assert!(norm(&p32) < 0.2 * norm(&start), "fp32 Adam must make progress");
    assert!(d < 0.05, "8-bit vs fp32 end points differ by {d} of the distance travelled");
}

#[test]
fn fast_state_quantizer_matches_the_reference_search() {
    let maps = Maps::new();
    let mut k = 0u64;
    for signed in [true, false] {
        let map = if signed { &maps.signed } else { &maps.unsigned };
        // every code, every midpoint (ties), and random values across the range
        let mut xs: Vec<f32> = map.to_vec();
        xs.extend(map.windows(2).map(|w| 0.5 * (w[0] + w[1])));
        xs.extend((0..100_000).map(|_| {
            k += 1;
            let u = qgalore::rng::uniform(99, k);
            if signed { 2.0 * u - 1.0 } else { u }
        }));
        xs.extend([0.0, 1.0, -1.0, 1e-9, -1e-9, 3e-7, -3e-7]);
        for x in xs {
            if !signed && x < 0.0 {
                continue;
            }
            assert_eq!(adam8::quantize(map, x, signed), adam8::quantize_reference(map, x, signed), "x = {x}, signed {signed}");
        }
    }
}

/// `QTensor::update` as first written (scalar, one group at a time): the wide-SIMD build
/// the library dispatches to on AVX2 machines must give the same codes, scales and zeros.
fn update_reference(q: &mut QTensor, delta: &[f32], decay: f32, range: Range, sr: Option<u64>) {
    use qgalore::quant::{group_params, round_code};
    let (g, qmax) = (q.group, q.qmax());
    for gi in 0..q.numel / g {
        let mut w = vec![0.0f32; g];
        for j in 0..g {
            let v = (q.codes[gi * g + j] as f32 - q.zero[gi]) * q.scale[gi] + delta[gi * g + j];
            w[j] = if decay != 1.0 { v * decay } else { v };
        }
        let (sv, zv) = group_params(&w, qmax, range);
        q.scale[gi] = sv;
        q.zero[gi] = zv;
        for j in 0..g {
            let u = sr.map(|k| qgalore::rng::uniform(k, (gi * g + j) as u64));
            q.codes[gi * g + j] = round_code(w[j] / sv, zv, qmax, u);
        }
    }
}

#[test]
fn fused_update_matches_the_scalar_reference_bit_for_bit() {
    let n = 256 * 64;
    for (group, range, sr, decay) in [
        (256, Range::WithZero, Some(17u64), 0.999f32),
        (128, Range::Reference, Some(5), 1.0),
        (256, Range::WithZero, None, 0.99),
        (64, Range::WithZero, Some(3), 1.0),
    ] {
        let w = normal(n, 0.02, 1);
        let mut a = QTensor::new(n, 8, group).unwrap();
        a.quantize(&w, range);
        let mut b = a.clone();
        for step in 0..3u64 {
            let d = normal(n, 1e-3, 10 + step);
            let key = sr.map(|k| qgalore::rng::stream_key(k, 2, step));
            a.update(&d, decay, range, key);
            update_reference(&mut b, &d, decay, range, key);
            assert_eq!(a.codes, b.codes, "codes differ (group {group}, step {step})");
            assert!(a.scale.iter().zip(&b.scale).all(|(x, y)| x.to_bits() == y.to_bits()), "scales differ");
            assert!(a.zero.iter().zip(&b.zero).all(|(x, y)| x.to_bits() == y.to_bits()), "zeros differ");
        }
    }
}

/// `adam8::step8` as first written (scalar), for the wide-SIMD build to match bit for bit.
fn step8_reference(p: &mut [f32], g: &[f32], st: &mut State8, maps: &Maps, hp: BnbHp) {
    let (step_size, eps2) = hp.bnb_factors();
    let (b1, b2, decay) = (hp.beta1, hp.beta2, 1.0 - hp.lr * hp.weight_decay);
    let bs = st.block;
    for bi in 0..p.len().div_ceil(bs) {
        let r = bi * bs..((bi + 1) * bs).min(p.len());
        let (mut mv, mut vv) = (vec![0.0f32; r.len()], vec![0.0f32; r.len()]);
        let (mut nm, mut nv) = (0.0f32, 0.0f32);
        for (jj, j) in r.clone().enumerate() {
            let gj = g[j];
            let (mut mj, mut vj) = (maps.signed[st.m[j] as usize] * st.absmax_m[bi], maps.unsigned[st.v[j] as usize] * st.absmax_v[bi]);
            if gj.is_finite() {
                mj = b1 * mj + (1.0 - b1) * gj;
                vj = b2 * vj + (1.0 - b2) * gj * gj;
                p[j] += step_size * (mj / (vj.sqrt() + eps2));
                if hp.weight_decay > 0.0 {
                    p[j] *= decay;
                }
            } else {
                mj = 0.0;
                vj = 0.0;
            }
            mv[jj] = mj;
            vv[jj] = vj;
            nm = nm.max(mj.abs());
            nv = nv.max(vj.abs());
        }
        st.absmax_m[bi] = nm;
        st.absmax_v[bi] = nv;
        let (im, iv) = (if nm > 0.0 { 1.0 / nm } else { 0.0 }, if nv > 0.0 { 1.0 / nv } else { 0.0 });
        for (jj, j) in r.enumerate() {
            st.m[j] = adam8::quantize(&maps.signed, mv[jj] * im, true);
            st.v[j] = adam8::quantize(&maps.unsigned, vv[jj] * iv, false);
        }
    }
}

#[test]
fn eight_bit_adam_matches_the_scalar_reference_bit_for_bit() {
    let maps = Maps::new();
    let n = 256 * 40 + 77; // a ragged last block
    let p0 = normal(n, 0.02, 3);
    let (mut pa, mut pb) = (p0.clone(), p0);
    let (mut sa, mut sb) = (State8::new(n, 256), State8::new(n, 256));
    for step in 1..=4u64 {
        let mut g = normal(n, 1e-2, 20 + step);
        g[5] = f32::NAN; // skipped element
        let hp = BnbHp { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step };
        adam8::step8(&mut pa, &g, &mut sa, &maps, hp);
        step8_reference(&mut pb, &g, &mut sb, &maps, hp);
        assert!(pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()), "weights differ at step {step}");
        assert_eq!(sa.m, sb.m);
        assert_eq!(sa.v, sb.v);
        assert!(sa.absmax_m.iter().zip(&sb.absmax_m).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(sa.absmax_v.iter().zip(&sb.absmax_v).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
