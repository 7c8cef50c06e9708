//! Elementwise and row-wise CPU kernels (f32). Every reduction runs in a fixed order so
//! results are bit-identical for any thread count.

use crate::backend::AdamHp;
use rayon::prelude::*;

/// Rows per rayon task for row-wise kernels: large enough to amortise scheduling.
const ROWS: usize = 16;
/// Columns per task for column-wise reductions (norm weight grads, embedding grads).
const COLS: usize = 64;

use super::SendPtr as Ptr;

pub fn embedding(out: &mut [f32], tokens: &[i32], table: &[f32], c: usize) {
    out[..tokens.len() * c].par_chunks_mut(c * ROWS).enumerate().for_each(|(ci, chunk)| {
        for (r, row) in chunk.chunks_mut(c).enumerate() {
            let tok = tokens[ci * ROWS + r] as usize;
            row.copy_from_slice(&table[tok * c..(tok + 1) * c]);
        }
    });
}

/// dtable[tok] += dout[row]; parallel over column blocks so no two tasks touch the
/// same element, and each element sums its rows in row order.
pub fn embedding_bwd(dtable: &mut [f32], dout: &[f32], tokens: &[i32], c: usize) {
    let p = Ptr(dtable.as_mut_ptr());
    (0..c.div_ceil(COLS)).into_par_iter().for_each(|cb| {
        let (c0, c1) = (cb * COLS, ((cb + 1) * COLS).min(c));
        for (r, &tok) in tokens.iter().enumerate() {
            let src = &dout[r * c + c0..r * c + c1];
            unsafe {
                let dst = std::slice::from_raw_parts_mut(p.get().add(tok as usize * c + c0), c1 - c0);
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += *s;
                }
            }
        }
    });
}

/// Rows r0 .. r0 + rows of `embedding_bwd` into a chunk buffer: dchunk[t − r0, :] +=
/// dout[i, :] for tokens t in the range, rows in order (the full backward's order).
pub fn embedding_bwd_rows(dchunk: &mut [f32], dout: &[f32], tokens: &[i32], c: usize, r0: usize, rows: usize) {
    for (r, &tok) in tokens.iter().enumerate() {
        let t = tok as usize;
        if t < r0 || t >= r0 + rows {
            continue;
        }
        let dst = &mut dchunk[(t - r0) * c..(t - r0 + 1) * c];
        for (d, s) in dst.iter_mut().zip(&dout[r * c..(r + 1) * c]) {
            *d += s;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn rmsnorm(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], n: usize, c: usize, eps: f32) {
    out[..n * c].par_chunks_mut(c).zip(rstd[..n].par_iter_mut()).zip(x[..n * c].par_chunks(c)).for_each(
        |((o, r), xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let s = 1.0 / (ms + eps).sqrt();
            *r = s;
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = wv * (xv * s);
            }
        },
    );
}

/// With g = dout ⊙ w: dx += r·g − x·r³·mean(x ⊙ g); dw += Σ_rows dout ⊙ x·r.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(dx: &mut [f32], dw: &mut [f32], dout: &[f32], x: &[f32], w: &[f32], rstd: &[f32], n: usize, c: usize) {
    dx[..n * c].par_chunks_mut(c).enumerate().for_each(|(i, dxr)| {
        let (xr, dr, r) = (&x[i * c..(i + 1) * c], &dout[i * c..(i + 1) * c], rstd[i]);
        let mut dot = 0.0f32;
        for j in 0..c {
            dot += xr[j] * dr[j] * w[j];
        }
        let k = r * r * r * dot / c as f32;
        for j in 0..c {
            dxr[j] += r * dr[j] * w[j] - xr[j] * k;
        }
    });
    dw[..c].par_chunks_mut(COLS).enumerate().for_each(|(cb, dwc)| {
        let c0 = cb * COLS;
        for i in 0..n {
            let r = rstd[i];
            let (xr, dr) = (&x[i * c + c0..], &dout[i * c + c0..]);
            for (j, d) in dwc.iter_mut().enumerate() {
                *d += dr[j] * xr[j] * r;
            }
        }
    });
}

/// In place on x (b, t, heads, hd): x₁' = x₁cos − x₂sin, x₂' = x₂cos + x₁sin, where x₁, x₂
/// are the two halves of each head (rotate_half). `inverse` rotates by −angle.
#[allow(clippy::too_many_arguments)]
pub fn rope(x: &mut [f32], table: &[f32], b: usize, t: usize, heads: usize, hd: usize, inverse: bool) {
    let half = hd / 2;
    let (cos, sin) = table.split_at(t * half);
    let width = heads * hd;
    x[..b * t * width].par_chunks_mut(width).enumerate().for_each(|(row, xr)| {
        let p = row % t;
        let (cr, sr) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for head in xr.chunks_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b2, c, s) = (x1[i], x2[i], cr[i], if inverse { -sr[i] } else { sr[i] });
                x1[i] = a * c - b2 * s;
                x2[i] = b2 * c + a * s;
            }
        }
    });
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(4096).enumerate().for_each(|(ci, o)| {
        let base = ci * 4096;
        for (j, v) in o.iter_mut().enumerate() {
            let g = gate[base + j];
            *v = g * sigmoid(g) * up[base + j];
        }
    });
}

pub fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    dgate.par_chunks_mut(4096).zip(dup.par_chunks_mut(4096)).enumerate().for_each(|(ci, (dg, du))| {
        let base = ci * 4096;
        for j in 0..dg.len() {
            let (g, u, d) = (gate[base + j], up[base + j], dout[base + j]);
            let s = sigmoid(g);
            dg[j] = d * u * s * (1.0 + g * (1.0 - s));
            du[j] = d * g * s;
        }
    });
}

/// Per-row softmax cross-entropy; optionally overwrites logits with the scaled gradient.
/// A row whose target is < 0 is ignored (masked out of the loss): loss 0, gradient 0.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(logits: &mut [f32], targets: &[i32], losses: &mut [f32], n: usize, v: usize, grad_scale: Option<f32>) {
    logits[..n * v].par_chunks_mut(v).zip(losses[..n].par_iter_mut()).enumerate().for_each(|(i, (row, loss))| {
        if targets[i] < 0 {
            *loss = 0.0;
            if grad_scale.is_some() {
                row.fill(0.0);
            }
            return;
        }
        let tgt = targets[i] as usize;
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0f32;
        for &z in row.iter() {
            sum += (z - mx).exp();
        }
        let lse = mx + sum.ln();
        *loss = lse - row[tgt];
        if let Some(s) = grad_scale {
            let inv = 1.0 / sum;
            for z in row.iter_mut() {
                *z = (*z - mx).exp() * inv * s;
            }
            row[tgt] -= s;
        }
    });
}

/// torch.optim.AdamW: p ← p·(1 − lr·wd); m, v moments; p ← p − lr/bc1 · m / (√v/√bc2 + ε).
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamHp) {
    let (step, rbc2, decay) = hp.torch_factors();
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    p.par_chunks_mut(4096).zip(m.par_chunks_mut(4096)).zip(v.par_chunks_mut(4096)).enumerate().for_each(
        |(ci, ((pc, mc), vc))| {
            let gc = &g[ci * 4096..];
            for j in 0..pc.len() {
                let gj = gc[j];
                let mj = b1 * mc[j] + (1.0 - b1) * gj;
                let vj = b2 * vc[j] + (1.0 - b2) * gj * gj;
                mc[j] = mj;
                vc[j] = vj;
                pc[j] = pc[j] * decay - step * mj / (vj.sqrt() * rbc2 + eps);
            }
        },
    );
}

/// Σ x² in f64 over 64 fixed slices, then summed in order.
pub fn sumsq(x: &[f32]) -> f64 {
    let mut parts = [0.0f64; 64];
    let chunk = x.len().div_ceil(64).max(1);
    parts.par_iter_mut().enumerate().for_each(|(i, p)| {
        let lo = (i * chunk).min(x.len());
        let hi = ((i + 1) * chunk).min(x.len());
        *p = x[lo..hi].iter().map(|&v| (v as f64) * (v as f64)).sum();
    });
    parts.iter().sum()
}

pub fn add(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(8192).zip(src.par_chunks(8192)).for_each(|(d, s)| {
        for (a, b) in d.iter_mut().zip(s) {
            *a += *b;
        }
    });
}

pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(8192).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// GaLore-AdamW on a low-rank gradient (docs/algorithm-spec.md §1.3): out = −ŝ·M/(√V + ε) with
/// ŝ = η·√(1−β2^t)/(1−β1^t); ε is added to the *uncorrected* √V, as the reference does.
pub fn galore_adam(buf: &mut [f32], m: &mut [f32], v: &mut [f32], hp: AdamHp) {
    let s = hp.galore_step();
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    buf.par_chunks_mut(4096).zip(m.par_chunks_mut(4096)).zip(v.par_chunks_mut(4096)).for_each(
        |((o, mc), vc)| {
            for j in 0..o.len() {
                let g = o[j];
                mc[j] = b1 * mc[j] + (1.0 - b1) * g;
                vc[j] = b2 * vc[j] + (1.0 - b2) * g * g;
                o[j] = -s * mc[j] / (vc[j].sqrt() + eps);
            }
        },
    );
}
