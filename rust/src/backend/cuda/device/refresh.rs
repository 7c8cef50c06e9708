//! Projector refresh on the device (docs/algorithm-spec.md §1.2), in full fp32 whatever the
//! activation precision: the Gram matrix plus cuSOLVER `Ssyevd` (the default), or warm-
//! started randomized subspace iteration with cuSOLVER QR and a Rayleigh–Ritz finish,
//! step for step `host::linalg::right_vectors`. The exact thin SVD goes through the
//! host (faer), as the reference's `torch.linalg.svd` would on any device.
//!
//! Workspaces are kept between refreshes and only grow, so a run allocates them once.

use super::memory::CudaBuf;
use super::{dev_err, Cuda};
use crate::backend::cuda::launch;
use crate::backend::cuda::plan;
use crate::backend::{Linalg, Memory, Refresh};
use crate::error::{Error, Result};
use crate::rng;
use cudarc::cusolver::sys as sol;
use std::sync::Arc;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

/// Grow-only device scratch of the refresh.
pub struct Ws {
    /// Gram matrix (n×n) or Rayleigh quotient (k×k); eigenvectors after `Ssyevd`.
    c: CudaSlice<f32>,
    /// Eigenvalues, Householder scalars.
    w: CudaSlice<f32>,
    work: CudaSlice<f32>,
    info: CudaSlice<i32>,
    /// Sketch Y (k×n′), product Z (m′×k), rotation E (k×k).
    y: CudaSlice<f32>,
    z: CudaSlice<f32>,
    e: CudaSlice<f32>,
}

impl Ws {
    pub fn new(s: &Arc<CudaStream>) -> Result<Ws> {
        let f = |n: usize| s.alloc_zeros::<f32>(n).map_err(|e| dev_err("alloc", e));
        Ok(Ws { c: f(1)?, w: f(1)?, work: f(1)?, info: s.alloc_zeros::<i32>(1).map_err(|e| dev_err("alloc", e))?, y: f(1)?, z: f(1)?, e: f(1)? })
    }
}

/// `device::grow` for the refresh workspace, whose failure names the size.
fn grow(s: &Arc<CudaStream>, x: &mut CudaSlice<f32>, n: usize) -> Result<()> {
    super::grow(s, x, n).map_err(|e| dev_err(&format!("alloc of {} MiB (refresh workspace)", (n * 4) >> 20), e))
}

fn ok(st: sol::cusolverStatus_t, what: &str) -> Result<()> {
    if st == sol::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(dev_err(what, st))
    }
}

impl Linalg for Cuda {
    fn top_subspace(
        &self,
        g: &CudaBuf,
        rows: usize,
        cols: usize,
        rank: usize,
        right: bool,
        method: Refresh,
        prev: Option<&CudaBuf>,
        seed: u64,
        out: &mut CudaBuf,
    ) -> Result<()> {
        crate::host::linalg::check_rank(rank, rows, cols)?;
        let pn = if right { rank * cols } else { rows * rank };
        if method == Refresh::Svd {
            // exact host route: copy, decompose with faer, copy back
            let mut hg = vec![0.0f32; rows * cols];
            self.download(g, &mut hg)?;
            let hp = match prev {
                Some(p) => {
                    let mut h = vec![0.0f32; pn];
                    self.download(p, &mut h)?;
                    Some(h)
                }
                None => None,
            };
            let mut ho = vec![0.0f32; pn];
            crate::host::linalg::top_subspace(&hg, rows, cols, rank, right, method, hp.as_deref(), seed, &mut ho, 0)?;
            return self.upload(out, &ho);
        }
        let mut ws = self.ws.lock().unwrap_or_else(|e| e.into_inner());
        self.bind();
        let (gs, os) = (g.data.f32(), out.data.f32_mut());
        match method {
            Refresh::Eigh => self.eigh_refresh(&mut ws, gs, rows, cols, rank, right, os)?,
            _ => self.randomized(&mut ws, gs, rows, cols, rank, right, prev, seed, os)?,
        }
        // an earlier queued error stays for `sync` to fail the step with; it is not a
        // failed refresh
        self.pending_error()?;
        // like the CPU, a non-finite result is a failed refresh (the caller keeps the old P);
        // Σx² in f64 is finite exactly when every element is (f32² cannot overflow f64), so
        // one scalar comes back instead of the whole projector
        if self.sumsq(out, pn).is_finite() {
            Ok(())
        } else {
            Err(Error::backend("decomposition produced non-finite values"))
        }
    }
}

impl Cuda {
    /// C = GᵀG (cols²) or GGᵀ (rows²) in fp32, then its top eigenvectors.
    #[allow(clippy::too_many_arguments)]
    fn eigh_refresh(&self, ws: &mut Ws, g: &CudaSlice<f32>, rows: usize, cols: usize, k: usize, right: bool, out: &mut CudaSlice<f32>) -> Result<()> {
        let n = if right { cols } else { rows };
        grow(&self.stream, &mut ws.c, n * n)?;
        self.gemm32(&plan::gram(rows, cols, right), g, g, &mut ws.c);
        self.syevd(ws, n)?;
        self.extract(&ws.c, n, k, right, out)
    }

    /// Randomized subspace iteration on A = G (right) or Gᵀ (left), A being m′×n′:
    /// Y ← orth((A Yᵀ)ᵀ A) once from the previous projector or three times from a seeded
    /// Gaussian, then the Rayleigh–Ritz rotation sorts the basis like singular vectors.
    #[allow(clippy::too_many_arguments)]
    fn randomized(
        &self,
        ws: &mut Ws,
        g: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        k: usize,
        right: bool,
        prev: Option<&CudaBuf>,
        seed: u64,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (m, n) = if right { (rows, cols) } else { (cols, rows) };
        let s = &self.stream;
        grow(s, &mut ws.y, k * n)?;
        grow(s, &mut ws.z, m * k)?;
        grow(s, &mut ws.e, k * k)?;
        grow(s, &mut ws.c, k * k)?;
        let iters = match prev {
            Some(p) if right => {
                let r = s.memcpy_dtod(&p.data.f32().slice(..k * n), &mut ws.y.slice_mut(..k * n));
                r.map_err(|e| dev_err("copy", e))?;
                1
            }
            Some(p) => {
                // the left projector (n′×k) transposed into Y's rows
                self.transpose(&mut ws.y, p.data.f32(), n, k)?;
                1
            }
            None => {
                // the CPU's sketch, drawn on the host from the same counter-based stream
                let key = rng::stream_key(seed, 0x5eed, 0);
                let h: Vec<f32> = (0..(k * n) as u64).map(|i| rng::normal(key, i)).collect();
                s.memcpy_htod(&h[..], &mut ws.y.slice_mut(..k * n)).map_err(|e| dev_err("copy", e))?;
                3
            }
        };
        for _ in 0..iters {
            // Z = A Yᵀ (m′×k), Y = Zᵀ A (k×n′), then orthonormal rows
            self.gemm32(&plan::sketch_z(m, n, k, right, cols), g, &ws.y, &mut ws.z);
            self.gemm32(&plan::sketch_y(m, n, k, right, cols), &ws.z, g, &mut ws.y);
            self.orthonormal_rows(ws, k, n)?;
        }
        // Rayleigh–Ritz: eigenvectors E (rows) of (A Yᵀ)ᵀ(A Yᵀ), out = E·Y (or its transpose)
        self.gemm32(&plan::sketch_z(m, n, k, right, cols), g, &ws.y, &mut ws.z);
        self.gemm32(&plan::ritz(m, k), &ws.z, &ws.z, &mut ws.c);
        self.syevd(ws, k)?;
        self.extract(&ws.c, k, k, true, &mut ws.e)?;
        let rotate = plan::rotate(n, k, right);
        if right {
            self.gemm32(&rotate, &ws.e, &ws.y, out);
        } else {
            self.gemm32(&rotate, &ws.y, &ws.e, out);
        }
        Ok(())
    }

    /// Ssyevd on the n×n matrix in `ws.c` (lower triangle); eigenvectors replace it.
    fn syevd(&self, ws: &mut Ws, n: usize) -> Result<()> {
        let s = &self.stream;
        grow(s, &mut ws.w, n)?;
        let jobz = sol::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
        let uplo = sol::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let ni = n as i32;
        let mut lwork = 0i32;
        {
            let (cp, _g1) = ws.c.device_ptr_mut(s);
            let (wp, _g2) = ws.w.device_ptr_mut(s);
            let st = unsafe { sol::cusolverDnSsyevd_bufferSize(self.solver.cu(), jobz, uplo, ni, cp as *const f32, ni, wp as *const f32, &mut lwork) };
            ok(st, "Ssyevd_bufferSize")?;
        }
        grow(s, &mut ws.work, lwork.max(1) as usize)?;
        {
            let (cp, _g1) = ws.c.device_ptr_mut(s);
            let (wp, _g2) = ws.w.device_ptr_mut(s);
            let (kp, _g3) = ws.work.device_ptr_mut(s);
            let (ip, _g4) = ws.info.device_ptr_mut(s);
            let st = unsafe { sol::cusolverDnSsyevd(self.solver.cu(), jobz, uplo, ni, cp as *mut f32, ni, wp as *mut f32, kp as *mut f32, lwork, ip as *mut i32) };
            ok(st, "Ssyevd")?;
        }
        self.check_info(ws, "eigensolver did not converge")
    }

    /// Y (k×n, row-major) ← its thin-QR Q factor: the column-major n×k matrix Yᵀ is
    /// factored in place by Sgeqrf and expanded by Sorgqr.
    fn orthonormal_rows(&self, ws: &mut Ws, k: usize, n: usize) -> Result<()> {
        let s = &self.stream;
        grow(s, &mut ws.w, k)?;
        let (ni, ki) = (n as i32, k as i32);
        let (mut l1, mut l2) = (0i32, 0i32);
        {
            let (yp, _g1) = ws.y.device_ptr_mut(s);
            let (tp, _g2) = ws.w.device_ptr(s);
            ok(unsafe { sol::cusolverDnSgeqrf_bufferSize(self.solver.cu(), ni, ki, yp as *mut f32, ni, &mut l1) }, "Sgeqrf_bufferSize")?;
            ok(unsafe { sol::cusolverDnSorgqr_bufferSize(self.solver.cu(), ni, ki, ki, yp as *const f32, ni, tp as *const f32, &mut l2) }, "Sorgqr_bufferSize")?;
        }
        let lwork = l1.max(l2).max(1);
        grow(s, &mut ws.work, lwork as usize)?;
        {
            let (yp, _g1) = ws.y.device_ptr_mut(s);
            let (tp, _g2) = ws.w.device_ptr_mut(s);
            let (kp, _g3) = ws.work.device_ptr_mut(s);
            let (ip, _g4) = ws.info.device_ptr_mut(s);
            let h = self.solver.cu();
            ok(unsafe { sol::cusolverDnSgeqrf(h, ni, ki, yp as *mut f32, ni, tp as *mut f32, kp as *mut f32, lwork, ip as *mut i32) }, "Sgeqrf")?;
        }
        self.check_info(ws, "QR factorisation failed")?;
        {
            let (yp, _g1) = ws.y.device_ptr_mut(s);
            let (tp, _g2) = ws.w.device_ptr(s);
            let (kp, _g3) = ws.work.device_ptr_mut(s);
            let (ip, _g4) = ws.info.device_ptr_mut(s);
            let h = self.solver.cu();
            ok(unsafe { sol::cusolverDnSorgqr(h, ni, ki, ki, yp as *mut f32, ni, tp as *const f32, kp as *mut f32, lwork, ip as *mut i32) }, "Sorgqr")?;
        }
        self.check_info(ws, "QR expansion failed")
    }

    fn check_info(&self, ws: &Ws, what: &str) -> Result<()> {
        let mut h = [0i32; 1];
        self.stream.memcpy_dtoh(&ws.info, &mut h[..]).map_err(|e| dev_err("copy", e))?;
        if h[0] != 0 {
            return Err(Error::backend(format!("{what} (info {})", h[0])));
        }
        Ok(())
    }

    /// The top k eigenvectors of the n×n `Ssyevd` output as rows (k×n) or columns (n×k).
    fn extract(&self, c: &CudaSlice<f32>, n: usize, k: usize, rows: bool, out: &mut CudaSlice<f32>) -> Result<()> {
        let (ni, ki) = (n as i32, k as i32);
        let name = if rows { "top_eigvecs_rows" } else { "top_eigvecs_cols" };
        launch!(self, self.f(name), launch::eigvecs(n, k); out, c, &ni, &ki).map_err(|e| dev_err(name, e))
    }

    /// out (cols×rows) = inᵀ for the row-major rows×cols `inp`.
    fn transpose(&self, out: &mut CudaSlice<f32>, inp: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
        let (r, c) = (rows as i32, cols as i32);
        launch!(self, self.f("transpose"), launch::elems(rows * cols); out, inp, &r, &c).map_err(|e| dev_err("transpose", e))
    }
}
