//! Element-wise math for the bf16 AVX512-BF16 path (`backend::cpu::bf16`, `Kernel::Avx512`)
//! written so that it vectorizes: an exp in plain arithmetic (no libm call, no branch),
//! sums and dots in 16 fixed lanes, and the softmax row and SwiGLU built on them.
//!
//! Every function is plain f32 arithmetic in a fixed order (no fused multiply-add, no
//! reassociation), so its results are the same bits whether the compiler emits 16-wide
//! AVX-512, narrower vectors or scalar code; `*_avx512` wrappers only let it use the wide
//! registers. The exact and emulated bf16 paths and fp32 keep libm's `expf` and
//! sequential sums: these are the fast path's choices (exp within 2 ulp of the true
//! value, sums in another order), inside the GPU-parity bf16 tolerances its results are
//! rounded to anyway.

use super::bf16::round;

/// Lanes of the sums (one AVX-512 register of f32).
const LANES: usize = 16;

/// e^x within 2 ulp for −87.33 ≤ x ≤ 88 (Cephes' `expf` reduction and polynomial): x =
/// n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-7 polynomial, 2^n put in the exponent. Below
/// −87.33 (where e^x leaves the normal range) it is 0, above 88 it saturates at e^88 (no
/// infinity: callers take 1/(1 + e^−g) and exp(s − max) ≤ 1); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5·2²³: adding it rounds to an integer (ties to even) held in the low mantissa bits
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.33, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n: n + 127 in the exponent field (n from t's mantissa: t's bits − MAGIC's bits)
    let e = ((t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32 + 127) as u32) << 23;
    let v = y * f32::from_bits(e);
    if x < -87.33 {
        0.0
    } else {
        v
    }
}

/// Σ lanes in a fixed tree (pairs of halves).
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// Σ a[i]·b[i] in 16 lanes (lane i takes elements i, i + 16, …), then the lanes folded.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a[..n].chunks_exact(LANES), b[..n].chunks_exact(LANES));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    for i in 0..at.len() {
        acc[i] += at[i] * bt[i];
    }
    fold(acc)
}

/// Softmax of `row` in place: exp(s − max) / Σ, the sum in 16 lanes.
#[inline(always)]
pub fn softmax(row: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    for (i, &s) in chunks.remainder().iter().enumerate() {
        mx[i] = mx[i].max(s);
    }
    for c in chunks {
        for i in 0..LANES {
            mx[i] = mx[i].max(c[i]);
        }
    }
    let m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp(c[i] - m);
            acc[i] += c[i];
        }
    }
    for (i, s) in chunks.into_remainder().iter_mut().enumerate() {
        *s = exp(*s - m);
        acc[i] += *s;
    }
    let inv = 1.0 / fold(acc);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// out = g·σ(g)·u (σ(g) = 1 / (1 + e^−g)), rounded to bf16 when `half`.
#[inline(always)]
pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32], half: bool) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let v = g * (1.0 / (1.0 + exp(-g))) * u;
        *o = if half { round(v) } else { v };
    }
}

/// SwiGLU's gradients: dgate = d·u·σ·(1 + g·(1 − σ)), dup = d·g·σ, each rounded to bf16
/// when its buffer holds bf16.
#[inline(always)]
pub fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32], (gh, uh): (bool, bool)) {
    for (((dg, du), &d), (&g, &u)) in dgate.iter_mut().zip(dup.iter_mut()).zip(dout).zip(gate.iter().zip(up)) {
        let s = 1.0 / (1.0 + exp(-g));
        let a = d * u * s * (1.0 + g * (1.0 - s));
        let b = d * g * s;
        *dg = if gh { round(a) } else { a };
        *du = if uh { round(b) } else { b };
    }
}

/// The functions above compiled for AVX-512.
///
/// # Safety (every function)
/// The processor must have AVX512-F, BW and VL.
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::dot(a, b)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn softmax(row: &mut [f32]) {
        super::softmax(row)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32], half: bool) {
        super::swiglu(out, gate, up, half)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32], half: (bool, bool)) {
        super::swiglu_bwd(dgate, dup, dout, gate, up, half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_true_value() {
        let mut worst = 0.0f64;
        let mut x = -87.33f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            // one ulp of the f32 nearest the true value
            let ulp = ((want as f32).to_bits() as f64).max(1.0);
            let ulp = f32::from_bits(ulp as u32 + 1) as f64 - f32::from_bits(ulp as u32) as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 1.37e-3;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(100.0).is_finite() && exp(100.0) >= exp(88.0));
    }

    #[test]
    fn softmax_dot_and_swiglu_match_their_definitions() {
        for n in [1usize, 5, 16, 17, 40, 256] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7).collect();
            let mut got = row.clone();
            softmax(&mut got);
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let z: f64 = row.iter().map(|&s| (s as f64 - m).exp()).sum();
            for (g, &s) in got.iter().zip(&row) {
                let want = (s as f64 - m).exp() / z;
                assert!((*g as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12, "n {n}: {g} vs {want}");
            }
            let b: Vec<f32> = (0..n).map(|i| ((i * 11 % 7) as f32 - 3.0) * 0.25).collect();
            let want: f64 = row.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((dot(&row, &b) as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "dot n {n}");
        }
        let g: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.2).collect();
        let u: Vec<f32> = (0..100).map(|i| 1.0 - i as f32 * 0.03).collect();
        let d: Vec<f32> = (0..100).map(|i| 0.5 - i as f32 * 0.01).collect();
        let (mut o, mut oh) = (vec![0.0; 100], vec![0.0; 100]);
        swiglu(&mut o, &g, &u, false);
        swiglu(&mut oh, &g, &u, true);
        let (mut dg, mut du) = (vec![0.0; 100], vec![0.0; 100]);
        swiglu_bwd(&mut dg, &mut du, &d, &g, &u, (false, false));
        let (mut dgh, mut duh) = (vec![0.0; 100], vec![0.0; 100]);
        swiglu_bwd(&mut dgh, &mut duh, &d, &g, &u, (true, true));
        for i in 0..100 {
            let (gi, ui, di) = (g[i] as f64, u[i] as f64, d[i] as f64);
            let s = 1.0 / (1.0 + (-gi).exp());
            let close = |x: f32, y: f64| (x as f64 - y).abs() <= 1e-6 * (1.0 + y.abs());
            assert!(close(o[i], gi * s * ui), "swiglu {i}");
            assert_eq!(oh[i], round(o[i]));
            assert!(close(dg[i], di * ui * s * (1.0 + gi * (1.0 - s))), "dgate {i}");
            assert!(close(du[i], di * gi * s), "dup {i}");
            assert_eq!((dgh[i], duh[i]), (round(dg[i]), round(du[i])));
        }
    }

    /// The AVX-512 builds give the same bits as the plain ones (no FMA contraction).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_builds_equal_the_plain_ones() {
        if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vl")) {
            println!("skipped: no AVX-512");
            return;
        }
        let row: Vec<f32> = (0..203).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.05).collect();
        let (mut a, mut b) = (row.clone(), row.clone());
        softmax(&mut a);
        // SAFETY: checked above
        unsafe { avx512::softmax(&mut b) };
        assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        let (mut o1, mut o2) = (vec![0.0; 203], vec![0.0; 203]);
        swiglu(&mut o1, &row, &a, false);
        // SAFETY: checked above
        unsafe { avx512::swiglu(&mut o2, &row, &a, false) };
        assert_eq!(o1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), o2.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        // SAFETY: checked above
        assert_eq!(dot(&row, &a).to_bits(), unsafe { avx512::dot(&row, &a) }.to_bits());
    }
}
