//! bf16 precision on the CPU, with exactly the GPU backend's rules (`backend/cuda/device/
//! gemm.rs`, `memory.rs`, `rust/kernels/nn.cu`), so that the CPU is the reference for the
//! GPU's bf16 path as it is for the fp32 one:
//!
//! - activation buffers (`alloc` under `Category::Activations`) and `alloc_half` weights
//!   hold bf16 values: every write into them (layer outputs, GEMM results, uploads, copies,
//!   fills, 8-bit Adam updates of bf16 tables, dequantized weights) is rounded to nearest
//!   even once, where the device's kernels store through `f32_to_bf16`;
//! - every product (the model's GEMMs, attention's and the GaLore projections) takes bf16
//!   inputs: an f32 operand (weights, logits' gradients, f32 gradients and projectors) is
//!   rounded first, as the device casts it into scratch; products accumulate in f32 and
//!   the result is rounded only when its buffer holds bf16 (an accumulating product reads
//!   the bf16 values back, as cuBLAS does with beta = 1);
//! - weights, gradients, optimizer state, RMSNorm statistics, RoPE tables, logits and
//!   projector refreshes stay f32 (`alloc_fp32` and every other category).
//!
//! Storage is emulated: a bf16 buffer is an f32 buffer whose values are all bf16 values, so
//! the layer code (`ops.rs`, `attention.rs`) is shared with the fp32 backend and memory is
//! not halved (the tracker counts the 4 bytes each value takes). The products run on the
//! exact path (operands rounded, then the f32 GEMM, products of two bf16 values being
//! exact in f32) or, on AVX512-BF16 hardware, through `vdpbf16ps` (`host::bf16`). That
//! fast path also takes its element-wise math from `host::simd` (attention's softmax and
//! row dots, SwiGLU rounded in the same pass): an exp within 2 ulp and sums in 16 lanes
//! instead of libm and sequential sums, inside the tolerances its results are rounded to.
//! `Cpu` itself is untouched: fp32 stays bit-identical.

use super::attention::{Head, Prepared};
use super::{attention, profile, Cpu, CpuBuf};
use crate::backend::{AdamHp, AttnDims, Category, Layers, Linalg, MemTracker, Memory, Optimizers, Quantization, Refresh, Runner};
use crate::error::{Error, Result};
use crate::host::bf16::{self as hb, Kernel, Strided};
use crate::host::{matmul, simd};
use crate::quant::adam8::State8;
use crate::quant::nf4::Nf4Tensor;
use crate::quant::{QTensor, Range};
use gemm::Parallelism;
use rayon::prelude::*;
use std::borrow::Cow;


/// The CPU backend under bf16 precision (see the module notes).
pub struct CpuBf16 {
    cpu: Cpu,
    kernel: Kernel,
}

/// A host buffer and whether it holds bf16 values.
pub struct HalfBuf {
    pub inner: CpuBuf,
    pub half: bool,
}

impl std::ops::Deref for HalfBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.inner.data
    }
}

impl HalfBuf {
    /// Rounds the first `n` values when the buffer holds bf16.
    fn store(&mut self, n: usize) {
        if self.half {
            let n = n.min(self.inner.data.len());
            hb::round_slice(&mut self.inner.data[..n]);
        }
    }
    fn store_all(&mut self) {
        self.store(usize::MAX)
    }
    /// The buffer as a GEMM operand: its values when they are bf16, else a rounded copy
    /// (the device's cast into scratch).
    fn operand(&self) -> Cow<'_, [f32]> {
        if self.half {
            Cow::Borrowed(&self.inner.data)
        } else {
            Cow::Owned(hb::rounded(&self.inner.data))
        }
    }
}

impl CpuBf16 {
    /// A bf16 backend with `threads` workers (0 = one per core), on the kernel this
    /// processor allows (`host::bf16::kernel`): a one-line error where it has neither
    /// AVX512-BF16 nor AMX-BF16 (and `QGALORE_CPU_BF16=emulate` is not set).
    pub fn new(threads: usize) -> Result<Self> {
        let kernel = hb::kernel().map_err(Error::invalid)?;
        Self::with_kernel(threads, kernel)
    }
    /// A bf16 backend on a given kernel (tests: `Kernel::Exact` and `Kernel::Packed` run
    /// on any processor; `Kernel::Avx512` is refused without the instructions).
    pub fn with_kernel(threads: usize, kernel: Kernel) -> Result<Self> {
        if kernel == Kernel::Avx512 && !hb::detect().avx512_bf16 {
            return Err(Error::invalid(hb::MISSING));
        }
        Ok(CpuBf16 { cpu: Cpu::new(threads)?, kernel })
    }
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
    pub fn threads(&self) -> usize {
        self.cpu.threads()
    }
    fn par(&self) -> Parallelism {
        self.cpu.par()
    }
    /// `b` as a GEMM operand for this kernel: the packed kernels round while packing, so
    /// they take the buffer as it is; the exact path takes `HalfBuf::operand`.
    fn opnd<'a>(&self, b: &'a HalfBuf) -> Cow<'a, [f32]> {
        if self.kernel == Kernel::Exact {
            b.operand()
        } else {
            Cow::Borrowed(&b.inner.data)
        }
    }

    /// dst[m×n] (row stride ldc) (+)= a·b with a (m×k) and b (k×n) strided, in f32 from
    /// their bf16 values (`opnd`: already rounded for the exact path, rounded while packing
    /// for the packed kernels); then dst rounded where it holds bf16. The exact path runs
    /// `run` (one of `host::matmul`'s products on the same operands). `label`: the product's
    /// name in the per-op profile (`QGALORE_PROFILE=1`), where the packed kernels' packing
    /// is counted apart under `bf16.pack`.
    #[allow(clippy::too_many_arguments)]
    fn product(&self, label: impl FnOnce() -> Cow<'static, str>, dst: &mut HalfBuf, a: &[f32], sa: Strided, b: &[f32], sb: Strided, m: usize, n: usize, k: usize, acc: bool, run: impl FnOnce(&mut [f32], &[f32], &[f32])) {
        let prof = &self.cpu.prof;
        match self.kernel {
            Kernel::Exact => prof.time(label, || run(&mut dst.inner.data, a, b)),
            Kernel::Avx512 | Kernel::Packed => {
                // b is packed transposed: row j of bᵀ is column j of b
                let bt = Strided { off: sb.off, rs: sb.cs, cs: sb.rs };
                let (pa, pb) = prof.time(|| "bf16.pack".into(), || (hb::pack_a(a, sa, m, k), hb::pack_pairs(b, bt, n, k, hb::NR)));
                prof.time(label, || match self.kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `with_kernel` checked the instruction sets
                    Kernel::Avx512 => unsafe { hb::gemm_avx512(&mut dst.inner.data, n, &pa, &pb, m, n, k, acc, 1.0) },
                    _ => hb::gemm_scalar(&mut dst.inner.data, n, &pa, &pb, m, n, k, acc, 1.0),
                });
            }
        }
        if dst.half {
            prof.time(|| "bf16.round".into(), || dst.store(m * n));
        }
    }

    /// Measured bf16 GEMM throughput in GFLOP/s for an (m×k)·(k×n) product on this
    /// backend's kernel (the operands' rounding or packing included, as in training).
    pub fn gemm_gflops(&self, m: usize, n: usize, k: usize, iters: usize) -> f64 {
        let buf = |len: usize, f: &dyn Fn(usize) -> f32| -> Result<HalfBuf> {
            let mut b = self.alloc_fp32(len, Category::Activations)?;
            b.inner.data.iter_mut().enumerate().for_each(|(i, v)| *v = f(i));
            Ok(b)
        };
        let (Ok(a), Ok(b), Ok(mut c)) = (buf(m * k, &|i| ((i % 7) as f32 - 3.0) * 0.01), buf(k * n, &|i| ((i % 5) as f32 - 2.0) * 0.01), buf(m * n, &|_| 0.0)) else {
            return -1.0;
        };
        // C[m×n] = A[m×k]·B[k×n]: matmul_dinp's shape with dout = A, w = B
        self.runner().run(|| {
            self.matmul_dinp(&mut c, &a, &b, m, n, k, false);
            let t0 = std::time::Instant::now();
            for _ in 0..iters.max(1) {
                self.matmul_dinp(&mut c, &a, &b, m, n, k, false);
            }
            2.0 * (m * n * k) as f64 * iters.max(1) as f64 / t0.elapsed().as_secs_f64() / 1e9
        })
    }
}

impl Memory for CpuBf16 {
    type Buf = HalfBuf;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn mem(&self) -> &MemTracker {
        self.cpu.mem()
    }
    fn runner(&self) -> Runner {
        self.cpu.runner()
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn precision(&self) -> &'static str {
        "bf16"
    }
    fn alloc(&self, n: usize, cat: Category) -> Result<HalfBuf> {
        Ok(HalfBuf { inner: self.cpu.alloc(n, cat)?, half: cat == Category::Activations })
    }
    fn alloc_half(&self, n: usize, cat: Category) -> Result<HalfBuf> {
        Ok(HalfBuf { inner: self.cpu.alloc(n, cat)?, half: true })
    }
    fn alloc_fp32(&self, n: usize, cat: Category) -> Result<HalfBuf> {
        Ok(HalfBuf { inner: self.cpu.alloc(n, cat)?, half: false })
    }
    fn len(&self, b: &HalfBuf) -> usize {
        b.inner.data.len()
    }
    fn upload(&self, dst: &mut HalfBuf, src: &[f32]) -> Result<()> {
        self.cpu.upload(&mut dst.inner, src)?;
        dst.store(src.len());
        Ok(())
    }
    fn download(&self, src: &HalfBuf, dst: &mut [f32]) -> Result<()> {
        self.cpu.download(&src.inner, dst)
    }
    fn to_host<'a>(&self, b: &'a HalfBuf, n: usize) -> Result<Cow<'a, [f32]>> {
        Ok(Cow::Borrowed(&b.inner.data[..n]))
    }
    fn from_host(&self, b: &mut HalfBuf, n: usize, fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
        fill(&mut b.inner.data[..n])?;
        b.store(n);
        Ok(())
    }
    fn fill(&self, b: &mut HalfBuf, v: f32) {
        b.inner.data.fill(if b.half { hb::round(v) } else { v });
    }
    fn copy(&self, dst: &mut HalfBuf, src: &HalfBuf) {
        self.cpu.copy(&mut dst.inner, &src.inner);
        dst.store_all();
    }
    fn copy_n(&self, dst: &mut HalfBuf, src: &HalfBuf, n: usize) {
        self.cpu.copy_n(&mut dst.inner, &src.inner, n);
        dst.store(n);
    }
    // add, axpy and scale only ever see f32 buffers (the device refuses bf16 ones)
    fn add(&self, dst: &mut HalfBuf, src: &HalfBuf) {
        self.cpu.add(&mut dst.inner, &src.inner);
        dst.store_all();
    }
    fn axpy(&self, dst: &mut HalfBuf, alpha: f32, src: &HalfBuf) {
        self.cpu.axpy(&mut dst.inner, alpha, &src.inner);
        dst.store_all();
    }
    fn scale(&self, b: &mut HalfBuf, s: f32) {
        self.cpu.scale(&mut b.inner, s);
        b.store_all();
    }
    fn sumsq(&self, b: &HalfBuf, n: usize) -> f64 {
        self.cpu.sumsq(&b.inner, n)
    }
    fn sumsq_acc(&self, b: &HalfBuf, n: usize) {
        self.cpu.sumsq_acc(&b.inner, n)
    }
    fn take_sumsq(&self) -> f64 {
        self.cpu.take_sumsq()
    }
}

/// Values per task of the element-wise fast paths.
const CHUNK: usize = 8192;

const fn st(off: usize, rs: usize, cs: usize) -> Strided {
    Strided { off, rs, cs }
}

impl Layers for CpuBf16 {
    fn profile(&self) -> Option<std::collections::BTreeMap<String, f64>> {
        self.cpu.prof.snapshot()
    }
    fn matmul(&self, out: &mut HalfBuf, inp: &HalfBuf, w: &HalfBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        let (x, w) = (self.opnd(inp), self.opnd(w));
        let p = self.par();
        self.product(|| profile::mm("matmul.fwd", n, ic, oc), out, &x, st(0, ic, 1), &w, st(0, 1, ic), n, oc, ic, acc, |o, x, w| matmul::matmul(o, x, w, n, ic, oc, acc, p));
    }
    fn matmul_dinp(&self, dinp: &mut HalfBuf, dout: &HalfBuf, w: &HalfBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        let (d, w) = (self.opnd(dout), self.opnd(w));
        let p = self.par();
        self.product(|| profile::mm("matmul.dinp", n, ic, oc), dinp, &d, st(0, oc, 1), &w, st(0, ic, 1), n, ic, oc, acc, |o, d, w| matmul::matmul_dinp(o, d, w, n, ic, oc, acc, p));
    }
    fn matmul_dw(&self, dw: &mut HalfBuf, dout: &HalfBuf, inp: &HalfBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        let (d, x) = (self.opnd(dout), self.opnd(inp));
        let p = self.par();
        self.product(|| profile::mm("matmul.dw", n, ic, oc), dw, &d, st(0, 1, oc), &x, st(0, ic, 1), oc, ic, n, acc, |o, d, x| matmul::matmul_dw(o, d, x, n, ic, oc, acc, p));
    }
    fn matmul_dw_rows(&self, dw: &mut HalfBuf, dout: &HalfBuf, inp: &HalfBuf, n: usize, ic: usize, oc: usize, r0: usize, rows: usize) {
        let (d, x) = (self.opnd(dout), self.opnd(inp));
        let p = self.par();
        self.product(|| profile::mm("matmul.dw_rows", n, ic, oc), dw, &d, st(r0, 1, oc), &x, st(0, ic, 1), rows, ic, n, false, |o, d, x| matmul::matmul_dw_rows(o, d, x, n, ic, oc, r0, rows, p));
    }
    fn embedding(&self, out: &mut HalfBuf, tokens: &[i32], table: &HalfBuf, c: usize) {
        self.cpu.embedding(&mut out.inner, tokens, &table.inner, c);
        out.store(tokens.len() * c);
    }
    fn embedding_bwd(&self, dtable: &mut HalfBuf, dout: &HalfBuf, tokens: &[i32], c: usize) {
        self.cpu.embedding_bwd(&mut dtable.inner, &dout.inner, tokens, c);
        dtable.store_all();
    }
    fn embedding_bwd_rows(&self, dchunk: &mut HalfBuf, dout: &HalfBuf, tokens: &[i32], c: usize, r0: usize, rows: usize) {
        self.cpu.embedding_bwd_rows(&mut dchunk.inner, &dout.inner, tokens, c, r0, rows);
        dchunk.store(rows * c);
    }
    fn rmsnorm(&self, out: &mut HalfBuf, rstd: &mut HalfBuf, x: &HalfBuf, w: &HalfBuf, n: usize, c: usize, eps: f32) {
        self.cpu.rmsnorm(&mut out.inner, &mut rstd.inner, &x.inner, &w.inner, n, c, eps);
        out.store(n * c);
        rstd.store(n);
    }
    fn rmsnorm_bwd(&self, dx: &mut HalfBuf, dw: &mut HalfBuf, dout: &HalfBuf, x: &HalfBuf, w: &HalfBuf, rstd: &HalfBuf, n: usize, c: usize) {
        self.cpu.rmsnorm_bwd(&mut dx.inner, &mut dw.inner, &dout.inner, &x.inner, &w.inner, &rstd.inner, n, c);
        dx.store(n * c);
        dw.store(c);
    }
    fn rope(&self, x: &mut HalfBuf, table: &HalfBuf, b: usize, t: usize, heads: usize, hd: usize, inverse: bool) {
        self.cpu.rope(&mut x.inner, &table.inner, b, t, heads, hd, inverse);
        x.store(b * t * heads * hd);
    }
    fn attention(&self, out: &mut HalfBuf, att: &mut HalfBuf, q: &HalfBuf, k: &HalfBuf, v: &HalfBuf, d: AttnDims) {
        let (q, k, v) = (q.operand(), k.operand(), v.operand());
        let packed = self.kernel == Kernel::Avx512;
        self.cpu.prof.time(|| "attention".into(), || forward(&mut out.inner.data, &mut att.inner.data, &q, &k, &v, d, (out.half, att.half), packed));
    }
    fn attention_bwd(
        &self,
        dq: &mut HalfBuf,
        dk: &mut HalfBuf,
        dv: &mut HalfBuf,
        scratch: &mut HalfBuf,
        dout: &HalfBuf,
        q: &HalfBuf,
        k: &HalfBuf,
        v: &HalfBuf,
        att: &HalfBuf,
        d: AttnDims,
    ) {
        let (dout, q, k, v, att) = (dout.operand(), q.operand(), k.operand(), v.operand(), att.operand());
        let (half, packed) = ([dq.half, dk.half, dv.half, scratch.half], self.kernel == Kernel::Avx512);
        self.cpu.prof.time(
            || "attention_bwd".into(),
            || backward(&mut dq.inner.data, &mut dk.inner.data, &mut dv.inner.data, &mut scratch.inner.data, &dout, &q, &k, &v, &att, d, half, packed),
        );
    }
    fn swiglu(&self, out: &mut HalfBuf, gate: &HalfBuf, up: &HalfBuf, n: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx512 {
            // the fast path (`host::simd`): exp within 2 ulp, rounded in the same pass
            let half = out.half;
            let (g, u) = (&gate.inner.data[..n], &up.inner.data[..n]);
            return self.cpu.prof.time(
                || "swiglu".into(),
                || {
                    out.inner.data[..n].par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
                        let r = i * CHUNK..i * CHUNK + o.len();
                        // SAFETY: `with_kernel` checked AVX512-BF16 (with AVX512-F/BW/VL)
                        unsafe { simd::avx512::swiglu(o, &g[r.clone()], &u[r], half) }
                    })
                },
            );
        }
        self.cpu.swiglu(&mut out.inner, &gate.inner, &up.inner, n);
        out.store(n);
    }
    fn swiglu_bwd(&self, dgate: &mut HalfBuf, dup: &mut HalfBuf, dout: &HalfBuf, gate: &HalfBuf, up: &HalfBuf, n: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx512 {
            let half = (dgate.half, dup.half);
            let (d, g, u) = (&dout.inner.data[..n], &gate.inner.data[..n], &up.inner.data[..n]);
            let (dg, du) = (&mut dgate.inner.data[..n], &mut dup.inner.data[..n]);
            return self.cpu.prof.time(
                || "swiglu_bwd".into(),
                || {
                    dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(i, (a, b))| {
                        let r = i * CHUNK..i * CHUNK + a.len();
                        // SAFETY: as `swiglu`
                        unsafe { simd::avx512::swiglu_bwd(a, b, &d[r.clone()], &g[r.clone()], &u[r], half) }
                    })
                },
            );
        }
        self.cpu.swiglu_bwd(&mut dgate.inner, &mut dup.inner, &dout.inner, &gate.inner, &up.inner, n);
        dgate.store(n);
        dup.store(n);
    }
    fn cross_entropy(&self, logits: &mut HalfBuf, targets: &[i32], losses: &mut [f32], n: usize, v: usize, grad_scale: Option<f32>) -> Result<()> {
        self.cpu.cross_entropy(&mut logits.inner, targets, losses, n, v, grad_scale)?;
        logits.store(n * v);
        Ok(())
    }
}

/// bf16 storage for the shared attention block loop (`attention::Storage`): a block of a
/// buffer that holds bf16 is rounded to nearest even where the device's kernels store it.
struct Bf16Store;

impl attention::Storage for Bf16Store {
    unsafe fn store(p: *mut f32, rows: usize, cols: usize, ld: usize, half: bool) {
        if half {
            for r in 0..rows {
                let row = std::slice::from_raw_parts_mut(p.add(r * ld), cols);
                row.iter_mut().for_each(|x| *x = hb::round(*x));
            }
        }
    }
}

/// `Bf16Store` whose products run through the `vdpbf16ps` kernel (`Kernel::Avx512`): every
/// operand of attention's products is a bf16 value there (the inputs are rounded, each stored
/// block is rounded when every buffer holds bf16), so the kernel's rounding while packing
/// changes nothing and only the summation order differs from the exact path.
struct Bf16Packed;

impl attention::Storage for Bf16Packed {
    unsafe fn store(p: *mut f32, rows: usize, cols: usize, ld: usize, half: bool) {
        Bf16Store::store(p, rows, cols, ld, half)
    }
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(m: usize, n: usize, k: usize, dst: *mut f32, ld: isize, acc: bool, lhs: *const f32, lrs: isize, lcs: isize, rhs: *const f32, rrs: isize, rcs: isize, alpha: f32) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only on `Kernel::Avx512` (`with_kernel` checked the instructions);
        // attention's strides are non-negative
        hb::gemm_avx512_strided(m, n, k, dst, ld as usize, acc, lhs, lrs as usize, lcs as usize, rhs, rrs as usize, rcs as usize, alpha);
        #[cfg(not(target_arch = "x86_64"))]
        crate::host::matmul::gemm_raw(m, n, k, dst, ld, 1, acc, lhs, lrs, lcs, rhs, rrs, rcs, alpha, Parallelism::None);
    }

    // the fast path's softmax and dots (`host::simd`: exp within 2 ulp, sums in 16 lanes)
    fn softmax(row: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: chosen only on `Kernel::Avx512`, whose processors have AVX512-F/BW/VL
        unsafe {
            simd::avx512::softmax(row)
        }
        #[cfg(not(target_arch = "x86_64"))]
        simd::softmax(row)
    }
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as `softmax`
        unsafe {
            simd::avx512::dot(a, b)
        }
        #[cfg(not(target_arch = "x86_64"))]
        simd::dot(a, b)
    }

    // K, V, Q and dout are packed once per head, by rows and/or by columns, and each block's
    // product takes its part of the panels: the same pairs the per-product packing makes
    // (parts start at an even k and end at an even k or the matrix's end; a rows part ends
    // at a panel boundary or the end), so results are bit-identical to packing per product.
    unsafe fn prepare(h: Head, rows: bool, cols: bool) -> Option<Prepared> {
        if h.t == 0 || h.hd == 0 {
            return None;
        }
        let x = std::slice::from_raw_parts(h.p, (h.t - 1) * h.rs as usize + h.hd);
        let pack = |on: bool, s: Strided, r: usize, k: usize| if on { hb::pack_pairs_here(x, s, r, k, hb::NR) } else { Vec::new() };
        let rs = h.rs as usize;
        Some(Prepared { rows: pack(rows, Strided { off: 0, rs, cs: 1 }, h.t, h.hd), cols: pack(cols, Strided { off: 0, rs: 1, cs: rs }, h.hd, h.t) })
    }
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_rows(prep: Option<&Prepared>, h: Head, m: usize, r1: usize, dst: *mut f32, ld: isize, acc: bool, lhs: *const f32, lrs: isize, lcs: isize, alpha: f32) {
        #[cfg(target_arch = "x86_64")]
        if let Some(pr) = prep.filter(|pr| !pr.rows.is_empty() && (r1 % hb::NR == 0 || r1 == h.t)) {
            // SAFETY: as `gemm`; bᵀ is h's first r1 rows, the first panels of its row packing
            return hb::gemm_avx512_prepacked(m, r1, h.hd, dst, ld as usize, acc, lhs, lrs as usize, lcs as usize, &pr.rows, hb::pairs(h.hd) * hb::NR, alpha);
        }
        Self::gemm(m, r1, h.hd, dst, ld, acc, lhs, lrs, lcs, h.p, 1, h.rs, alpha)
    }
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_cols(prep: Option<&Prepared>, h: Head, m: usize, (k0, k1): (usize, usize), dst: *mut f32, ld: isize, acc: bool, lhs: *const f32, lrs: isize, lcs: isize, alpha: f32) {
        #[cfg(target_arch = "x86_64")]
        if let Some(pr) = prep.filter(|pr| !pr.cols.is_empty() && k0 % 2 == 0 && ((k1 - k0) % 2 == 0 || k1 == h.t)) {
            // SAFETY: as `gemm`; bᵀ is hᵀ's columns k0..k1: pairs k0/2.. of each panel of
            // its column packing
            return hb::gemm_avx512_prepacked(m, h.hd, k1 - k0, dst, ld as usize, acc, lhs, lrs as usize, lcs as usize, &pr.cols[k0 / 2 * hb::NR..], hb::pairs(h.t) * hb::NR, alpha);
        }
        Self::gemm(m, h.hd, k1 - k0, dst, ld, acc, lhs, lrs, lcs, h.p.offset(k0 as isize * h.rs), h.rs, 1, alpha)
    }
}

/// Attention forward as the device runs it under bf16 (`plan::attn_scores`, the
/// `causal_softmax` kernel, `plan::attn_values`): scores = scale·q·kᵀ rounded to bf16, the
/// probabilities exp(s − max)/Σ rounded once, out = att·v rounded. Inputs are bf16 values.
/// The fp32 backend's causal block loop (`attention::forward_with`) with bf16 stores.
fn forward(out: &mut [f32], att: &mut [f32], q: &[f32], k: &[f32], v: &[f32], d: AttnDims, half: (bool, bool), packed: bool) {
    if packed && half.0 && half.1 {
        attention::forward_with::<Bf16Packed>(out, att, q, k, v, d, half);
    } else {
        attention::forward_with::<Bf16Store>(out, att, q, k, v, d, half);
    }
}

/// Attention backward as the device runs it under bf16 (`plan::attn_dscores`, `attn_dv`,
/// the `causal_softmax_bwd` kernel, `attn_dq`, `attn_dk`): every product's result rounded
/// where its buffer holds bf16, the query heads of a group accumulating into dk and dv
/// one rounded product at a time. `half`: dq, dk, dv, scratch. The fp32 backend's causal
/// block loop (`attention::backward_with`) with bf16 stores.
#[allow(clippy::too_many_arguments)]
fn backward(dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], scratch: &mut [f32], dout: &[f32], q: &[f32], k: &[f32], v: &[f32], att: &[f32], d: AttnDims, half: [bool; 4], packed: bool) {
    if packed && half.iter().all(|&h| h) {
        attention::backward_with::<Bf16Packed>(dq, dk, dv, scratch, dout, q, k, v, att, d, half);
    } else {
        attention::backward_with::<Bf16Store>(dq, dk, dv, scratch, dout, q, k, v, att, d, half);
    }
}

impl Optimizers for CpuBf16 {
    type A8 = <Cpu as Optimizers>::A8;

    fn adamw(&self, p: &mut HalfBuf, g: &HalfBuf, m: &mut HalfBuf, v: &mut HalfBuf, hp: AdamHp) {
        self.cpu.adamw(&mut p.inner, &g.inner, &mut m.inner, &mut v.inner, hp);
        p.store_all();
    }
    fn galore_adam(&self, buf: &mut HalfBuf, m: &mut HalfBuf, v: &mut HalfBuf, hp: AdamHp) {
        self.cpu.galore_adam(&mut buf.inner, &mut m.inner, &mut v.inner, hp);
        buf.store_all();
    }
    fn bnb32_step(&self, p: &mut HalfBuf, g: &HalfBuf, m: &mut HalfBuf, v: &mut HalfBuf, hp: AdamHp) {
        let n = m.inner.data.len();
        self.cpu.bnb32_step(&mut p.inner, &g.inner, &mut m.inner, &mut v.inner, hp);
        // a bf16 table: each update computed in f32 and rounded (the `bnb32_w16` kernel)
        p.store(n);
    }
    fn a8_new(&self, n: usize, block: usize, cat: Category) -> Result<Self::A8> {
        self.cpu.a8_new(n, block, cat)
    }
    fn a8_step(&self, p: &mut HalfBuf, g: &HalfBuf, st: &mut Self::A8, hp: AdamHp) {
        let n = st.m.len();
        self.cpu.a8_step(&mut p.inner, &g.inner, st, hp);
        p.store(n);
    }
    fn a8_step_range(&self, p: &mut HalfBuf, g: &HalfBuf, st: &mut Self::A8, off: usize, len: usize, hp: AdamHp) {
        self.cpu.a8_step_range(&mut p.inner, &g.inner, st, off, len, hp);
        if p.half {
            hb::round_slice(&mut p.inner.data[off..off + len]);
        }
    }
    fn a8_to_host<'a>(&self, st: &'a Self::A8) -> Result<Cow<'a, State8>> {
        self.cpu.a8_to_host(st)
    }
    fn a8_from_host(&self, st: &mut Self::A8, fill: impl FnOnce(&mut State8) -> Result<()>) -> Result<()> {
        self.cpu.a8_from_host(st, fill)
    }
    fn sanitize(&self, b: &mut HalfBuf, n: usize) {
        self.cpu.sanitize(&mut b.inner, n)
    }
    fn take_nonfinite(&self) -> u64 {
        self.cpu.take_nonfinite()
    }
}

impl Quantization for CpuBf16 {
    type Q = <Cpu as Quantization>::Q;

    fn q_new(&self, numel: usize, bits: u8, group: usize, cat: Category) -> Result<Self::Q> {
        self.cpu.q_new(numel, bits, group, cat)
    }
    fn q_bytes(&self, q: &Self::Q) -> usize {
        self.cpu.q_bytes(q)
    }
    fn q_quantize(&self, q: &mut Self::Q, src: &HalfBuf, range: Range) {
        self.cpu.q_quantize(q, &src.inner, range)
    }
    fn q_dequantize(&self, dst: &mut HalfBuf, q: &Self::Q) {
        self.cpu.q_dequantize(&mut dst.inner, q);
        // `q_dequant_bf16`: the dequantized values rounded once
        dst.store(q.numel);
    }
    fn q_update(&self, q: &mut Self::Q, delta: &HalfBuf, decay: f32, range: Range, sr: Option<u64>) {
        self.cpu.q_update(q, &delta.inner, decay, range, sr)
    }
    fn q_to_host<'a>(&self, q: &'a Self::Q) -> Result<Cow<'a, QTensor>> {
        self.cpu.q_to_host(q)
    }
    fn q_from_host(&self, q: &mut Self::Q, fill: impl FnOnce(&mut QTensor) -> Result<()>) -> Result<()> {
        self.cpu.q_from_host(q, fill)
    }

    type N = <Cpu as Quantization>::N;

    fn nf4_new(&self, t: Nf4Tensor, cat: Category) -> Result<Self::N> {
        self.cpu.nf4_new(t, cat)
    }
    fn nf4_numel(&self, t: &Self::N) -> usize {
        self.cpu.nf4_numel(t)
    }
    fn nf4_dequantize_rows(&self, dst: &mut HalfBuf, t: &Self::N, cols: usize, rows: std::ops::Range<usize>) {
        let n = rows.len() * cols;
        self.cpu.nf4_dequantize_rows(&mut dst.inner, t, cols, rows);
        // `nf4_dequant_bf16`
        dst.store(n);
    }
    fn nf4_to_host<'a>(&self, t: &'a Self::N) -> Result<Cow<'a, Nf4Tensor>> {
        self.cpu.nf4_to_host(t)
    }
}

impl Linalg for CpuBf16 {
    /// Refreshes stay fp32 (the device's `gemm32` and solvers).
    fn top_subspace(
        &self,
        g: &HalfBuf,
        rows: usize,
        cols: usize,
        rank: usize,
        right: bool,
        method: Refresh,
        prev: Option<&HalfBuf>,
        seed: u64,
        out: &mut HalfBuf,
    ) -> Result<()> {
        self.cpu.top_subspace(&g.inner, rows, cols, rank, right, method, prev.map(|p| &p.inner), seed, &mut out.inner)?;
        out.store_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attention::Storage;

    /// Products on panels packed once per head equal products that pack their operands
    /// themselves, bit for bit: rows parts (prefixes at panel boundaries and the whole) and
    /// column parts (prefixes and suffixes from even k, odd ends), accumulating or not.
    #[test]
    fn prepared_head_products_equal_per_product_packing() {
        if !hb::detect().avx512_bf16 {
            println!("skipped: no AVX512-BF16 on this processor");
            return;
        }
        let val = |i: usize, s: usize| hb::round((((i * 7919 + s * 104_729) % 2003) as f32 - 1001.0) * 1.3e-3);
        for (t, hd) in [(96usize, 48usize), (75, 40), (33, 16)] {
            let rs = 2 * hd + 3;
            let mat: Vec<f32> = (0..t * rs).map(|i| val(i, 1)).collect();
            let h = Head { p: mat.as_ptr(), t, hd, rs: rs as isize };
            // SAFETY: `mat` holds t rows of `rs` values
            let prep = unsafe { Bf16Packed::prepare(h, true, true) };
            let lhs: Vec<f32> = (0..64 * t).map(|i| val(i, 2)).collect();
            let m = 37;
            for acc in [false, true] {
                let mut r1s: Vec<usize> = (1..=t / 32).map(|i| i * 32).collect();
                r1s.push(t);
                for &r1 in &r1s {
                    let (mut a, mut b) = (vec![0.5f32; m * r1], vec![0.5f32; m * r1]);
                    // SAFETY: lhs is m×hd with row stride hd; dst m×r1
                    unsafe {
                        Bf16Packed::gemm_rows(prep.as_ref(), h, m, r1, a.as_mut_ptr(), r1 as isize, acc, lhs.as_ptr(), hd as isize, 1, 0.75);
                        Bf16Packed::gemm_rows(None, h, m, r1, b.as_mut_ptr(), r1 as isize, acc, lhs.as_ptr(), hd as isize, 1, 0.75);
                    }
                    assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "rows t {t} hd {hd} r1 {r1}");
                }
                let mut parts: Vec<(usize, usize)> = r1s.iter().map(|&r1| (0, r1)).collect();
                parts.extend((0..t).step_by(32).map(|s0| (s0, t)));
                for (k0, k1) in parts {
                    let (mut a, mut b) = (vec![0.25f32; m * hd], vec![0.25f32; m * hd]);
                    // SAFETY: lhs is m×(k1 − k0) with row stride t; dst m×hd
                    unsafe {
                        Bf16Packed::gemm_cols(prep.as_ref(), h, m, (k0, k1), a.as_mut_ptr(), hd as isize, acc, lhs.as_ptr(), t as isize, 1, 1.0);
                        Bf16Packed::gemm_cols(None, h, m, (k0, k1), b.as_mut_ptr(), hd as isize, acc, lhs.as_ptr(), t as isize, 1, 1.0);
                    }
                    assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "cols t {t} hd {hd} {k0}..{k1}");
                }
            }
        }
    }
}
