//! Every product through cuBLAS `GemmStridedBatchedEx` with fp32 accumulation, on the
//! layouts `../plan.rs` computes; bf16 inputs under bf16 precision.

use super::memory::{CudaBuf, Store};
use super::{grow, Cuda};
use crate::backend::cuda::launch;
use crate::backend::cuda::plan::{self, Gemm};
use crate::backend::{Category, Memory};
use cudarc::cublas::{result as blas_r, sys as blas_sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

/// A raw GEMM operand: device address of its first element and element type.
type Raw = (u64, blas_sys::cudaDataType);

impl Cuda {
    /// Casts `src[off..]` (f32) into the bf16 scratch `slot`, grown if needed; false (and
    /// a sticky error) when the scratch cannot grow.
    fn cast_into(&self, slot: &mut CudaSlice<u16>, src: &CudaSlice<f32>, off: usize) -> bool {
        let n = src.len() - off;
        if let Err(e) = grow(&self.stream, slot, n) {
            self.note("alloc of the bf16 cast scratch", Err::<(), _>(e));
            return false;
        }
        let nn = n as u64;
        let view = src.slice(off..);
        self.note("bf16 cast", launch!(self, self.f("bf16_quant"), launch::elems(n); &mut *slot, &view, &nn));
        true
    }

    /// Runs one planned product (`plan::Gemm`) on buffers A, B and C through
    /// `cublasGemmStridedBatchedEx` with fp32 accumulation. Under bf16 precision every
    /// product of a step takes bf16 inputs (f32 ones, such as weights, logit gradients and
    /// the GaLore projections of f32 gradients, are cast to scratch first), as the
    /// reference's bf16 training does; projector refreshes use `gemm32` and stay fp32.
    pub(super) fn gemm(&self, g: &Gemm, a: &Store, b: &Store, c: &mut Store) {
        let half = self.bf16;
        let mut sc = self.scratch();
        let [ca, cb] = &mut sc.cast;
        // resolve each input to the buffer and offset the product reads
        let mut cast_a = None;
        let mut cast_b = None;
        if half {
            if let Store::F32(x) = a {
                if !self.cast_into(ca, x, g.a_off) {
                    return;
                }
                cast_a = Some(&*ca);
            }
            if let Store::F32(x) = b {
                if !self.cast_into(cb, x, g.b_off) {
                    return;
                }
                cast_b = Some(&*cb);
            }
        }
        let s = &self.stream;
        let bf = blas_sys::cudaDataType::CUDA_R_16BF;
        let ((pa, _ga), ta) = match cast_a {
            Some(x) => (x.device_ptr(s), bf),
            None => (a.ptr(s, g.a_off), a.dtype()),
        };
        let ((pb, _gb), tb) = match cast_b {
            Some(x) => (x.device_ptr(s), bf),
            None => (b.ptr(s, g.b_off), b.dtype()),
        };
        let tc = c.dtype();
        let (pc, _gc) = c.ptr_mut(s, g.c_off);
        self.gemm_raw(g, (pa, ta), (pb, tb), (pc, tc));
    }

    /// The cuBLAS call of `g` given the addresses of where A, B and C start (the
    /// offsets in `g` already applied) and their element types.
    pub(super) fn gemm_raw(&self, g: &Gemm, a: Raw, b: Raw, c: Raw) {
        // raw library calls need the context current on this thread (FFI calls arrive on
        // Deno's worker threads)
        self.bind();
        let x = g.cublas();
        let (first, second) = if x.first.is_a { (a, b) } else { (b, a) };
        let t = |x: bool| if x { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
        let r = unsafe {
            blas_r::gemm_strided_batched_ex(
                *self.blas.handle(),
                t(x.trans_first),
                t(x.trans_second),
                x.m as i32,
                x.n as i32,
                x.k as i32,
                &g.alpha as *const f32 as *const _,
                first.0 as *const _,
                first.1,
                x.first.ld as i32,
                x.first.stride as i64,
                second.0 as *const _,
                second.1,
                x.second.ld as i32,
                x.second.stride as i64,
                &g.beta as *const f32 as *const _,
                c.0 as *mut _,
                c.1,
                x.ldc as i32,
                x.stride_c as i64,
                x.count as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        self.note("GemmEx", r);
    }

    /// A planned product on whole f32 slices in full fp32 (refresh workspaces).
    pub(super) fn gemm32(&self, g: &Gemm, a: &CudaSlice<f32>, b: &CudaSlice<f32>, c: &mut CudaSlice<f32>) {
        let f = blas_sys::cudaDataType::CUDA_R_32F;
        let s = &self.stream;
        let (pa, _ga) = a.device_ptr(s);
        let (pb, _gb) = b.device_ptr(s);
        let (pc, _gc) = c.device_ptr_mut(s);
        let at = |p: u64, off: usize| p + 4 * off as u64;
        self.gemm_raw(g, (at(pa, g.a_off), f), (at(pb, g.b_off), f), (at(pc, g.c_off), f));
    }
}

impl Cuda {
    /// GEMM throughput of this precision's products (bf16 inputs under bf16).
    pub fn gemm_gflops(&self, m: usize, n: usize, k: usize, iters: usize) -> f64 {
        let cat = Category::Activations;
        let (Ok(a), Ok(b), Ok(mut c)) = (self.alloc(m * k, cat), self.alloc(k * n, cat), self.alloc(m * n, cat)) else {
            return -1.0;
        };
        // C[m×n] = A[m×k]·B[k×n]: matmul_dinp's shape with dout = A, w = B
        let g = plan::matmul_dinp(m, n, k, false);
        let run = |c: &mut CudaBuf| self.gemm(&g, &a.data, &b.data, &mut c.data);
        run(&mut c);
        let _ = self.stream.synchronize();
        let t0 = std::time::Instant::now();
        for _ in 0..iters.max(1) {
            run(&mut c);
        }
        let _ = self.stream.synchronize();
        2.0 * (m * n * k) as f64 * iters.max(1) as f64 / t0.elapsed().as_secs_f64() / 1e9
    }
}
