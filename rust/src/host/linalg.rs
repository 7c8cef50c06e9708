//! Projector refresh on the host with faer (the CPU backend's, and the CUDA backend's
//! exact-SVD route): thin SVD, Gram + symmetric eigensolver, and
//! warm-started randomized subspace iteration (docs/algorithm-spec.md §1.2).

use super::matmul::{matmul, matmul_dw, par};
use crate::error::{Error, Result};
use crate::rng;
use faer::{Mat, MatRef, Side};

/// How a projector refresh finds the top-r singular subspace of a gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Full thin SVD (the reference's `torch.linalg.svd(full_matrices=False)`).
    Svd,
    /// Gram matrix (GᵀG or GGᵀ) plus a symmetric eigensolver: exact, 6–8× cheaper.
    Eigh,
    /// Randomized subspace iteration warm-started from the previous projector, finished
    /// with Rayleigh–Ritz so the basis is sorted like singular vectors.
    Randomized,
}

/// Fails unless `rank` ≤ min(rows, cols): the optimizers clamp the rank per matrix
/// (`plan::ProjGeom`), so a larger one here is a caller's error. Both backends check it.
pub fn check_rank(rank: usize, rows: usize, cols: usize) -> Result<()> {
    if rank > rows.min(cols) {
        return Err(Error::invalid(format!("rank {rank} exceeds the matrix size {rows}×{cols}")));
    }
    Ok(())
}

/// Writes the top-`rank` subspace of g (rows × cols) into `out`; see `Linalg::top_subspace`.
#[allow(clippy::too_many_arguments)]
pub fn top_subspace(
    g: &[f32],
    rows: usize,
    cols: usize,
    rank: usize,
    right: bool,
    method: Refresh,
    prev: Option<&[f32]>,
    seed: u64,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    check_rank(rank, rows, cols)?;
    let k = rank;
    if right {
        right_vectors(g, rows, cols, k, method, prev, seed, out, threads)
    } else {
        // Left singular vectors of G are the right singular vectors of Gᵀ.
        let gt = transpose(&g[..rows * cols], rows, cols);
        let prev_t = prev.map(|p| transpose(p, rows, k));
        let mut tmp = vec![0.0f32; k * rows];
        right_vectors(&gt, cols, rows, k, method, prev_t.as_deref(), seed, &mut tmp, threads)?;
        out[..rows * k].copy_from_slice(&transpose(&tmp, k, rows));
        Ok(())
    }
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

fn finite(x: &[f32]) -> Result<()> {
    if x.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(Error::backend("decomposition produced non-finite values"))
    }
}

/// Top-k right singular vectors of g (m × n), as the rows of `out` (k × n).
#[allow(clippy::too_many_arguments)]
fn right_vectors(
    g: &[f32],
    m: usize,
    n: usize,
    k: usize,
    method: Refresh,
    prev: Option<&[f32]>,
    seed: u64,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let gm = MatRef::from_row_major_slice(&g[..m * n], m, n);
    match method {
        Refresh::Svd => {
            let svd = gm.thin_svd().map_err(|e| Error::backend(format!("SVD did not converge: {e:?}")))?;
            let v = svd.V();
            for i in 0..k {
                for j in 0..n {
                    out[i * n + j] = v[(j, i)];
                }
            }
        }
        Refresh::Eigh => {
            // C = GᵀG (n × n); its top eigenvectors are G's right singular vectors.
            let mut c = vec![0.0f32; n * n];
            matmul_dw(&mut c, g, g, m, n, n, false, par(threads));
            top_eigvecs(&c, n, k, out)?;
        }
        Refresh::Randomized => {
            // Start from the previous projector's rows, or a seeded Gaussian sketch.
            let (mut y, iters) = match prev {
                Some(p) => (p[..k * n].to_vec(), 1),
                None => {
                    let key = rng::stream_key(seed, 0x5eed, 0);
                    ((0..(k * n) as u64).map(|i| rng::normal(key, i)).collect::<Vec<f32>>(), 3)
                }
            };
            let mut z = vec![0.0f32; m * k];
            for _ in 0..iters {
                // Y ← orth(Zᵀ G) with Z = G Yᵀ: one power step on GᵀG.
                matmul(&mut z, g, &y, m, n, k, false, par(threads));
                matmul_dw(&mut y, &z, g, m, n, k, false, par(threads));
                orthonormal_rows(&mut y, k, n)?;
            }
            // Rayleigh–Ritz: eigenvectors E of (G Yᵀ)ᵀ(G Yᵀ) rotate Y into sorted order.
            matmul(&mut z, g, &y, m, n, k, false, par(threads));
            let mut s = vec![0.0f32; k * k];
            matmul_dw(&mut s, &z, &z, m, k, k, false, par(threads));
            let mut e = vec![0.0f32; k * k]; // rows = eigenvectors
            top_eigvecs(&s, k, k, &mut e)?;
            for i in 0..k {
                for j in 0..n {
                    out[i * n + j] = (0..k).map(|l| e[i * k + l] * y[l * n + j]).sum();
                }
            }
        }
    }
    finite(&out[..k * n])
}

/// Top-k eigenvectors of the symmetric c (n × n), largest first, as rows of `out`.
pub(crate) fn top_eigvecs(c: &[f32], n: usize, k: usize, out: &mut [f32]) -> Result<()> {
    finite(c)?;
    let cm = MatRef::from_row_major_slice(c, n, n);
    let evd = cm.self_adjoint_eigen(Side::Lower).map_err(|e| Error::backend(format!("eigensolver failed: {e:?}")))?;
    let u = evd.U();
    for i in 0..k {
        let col = n - 1 - i; // eigenvalues ascend
        for j in 0..n {
            out[i * n + j] = u[(j, col)];
        }
    }
    Ok(())
}

/// Orthonormalizes the k rows of y (k × n) through a thin QR of yᵀ.
pub(crate) fn orthonormal_rows(y: &mut [f32], k: usize, n: usize) -> Result<()> {
    finite(y)?;
    let yt = Mat::from_fn(n, k, |i, j| y[j * n + i]);
    let q = yt.qr().compute_thin_Q();
    for i in 0..k {
        for j in 0..n {
            y[i * n + j] = q[(j, i)];
        }
    }
    Ok(())
}
