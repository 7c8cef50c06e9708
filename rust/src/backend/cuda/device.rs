//! The CUDA `Backend`: f32 device buffers on one stream, NVRTC kernels (`kernels.rs`),
//! cuBLAS SGEMM for every product (full fp32: no TF32, so the Gram matrices feeding the
//! eigensolver keep their precision), cuSOLVER `Ssyevd` for projector refreshes.
//!
//! Buffers are allocated once per run (the engine plans them), so steady-state steps make
//! no device allocations apart from the small reduction scratch kept here.
//! Unverified on hardware in the session that wrote it: see the parity tests in
//! `rust/tests/cuda_parity.rs`, which run only where a GPU is present.

use super::kernels::{self, MODULES};
use super::probe;
use crate::backend::{AdamHp, AttnDims, Backend, Category, MemTracker, Refresh, Runner, Tracked};
use crate::error::{Error, Result};
use crate::quant::adam8::{self, BnbHp};
use crate::quant::Range;
use crate::state::{Reader, Writer};
use cudarc::cublas::{sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig};
use cudarc::cusolver::{sys as sol, DnHandle};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

fn dev_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::backend(format!("CUDA {what}: {e:?}"))
}

pub struct CudaBuf {
    pub data: CudaSlice<f32>,
    _t: Tracked<()>,
}

pub struct CudaQ {
    /// Bytes as the CPU layout counts them (codes + f32 scale and zero per group).
    pub bytes: usize,
    pub bits: u8,
    pub group: usize,
    pub numel: usize,
    pub codes: CudaSlice<u8>,
    pub scale: CudaSlice<f32>,
    pub zero: CudaSlice<f32>,
    _t: Tracked<()>,
}

pub struct CudaA8 {
    pub block: usize,
    pub n: usize,
    pub m: CudaSlice<u8>,
    pub v: CudaSlice<u8>,
    pub absm: CudaSlice<f32>,
    pub absv: CudaSlice<f32>,
    _t: Tracked<()>,
}

/// Reduction and counter scratch, reused by every call.
struct Scratch {
    partial: CudaSlice<f64>,
    total: CudaSlice<f64>,
    count: CudaSlice<u64>,
    tokens: CudaSlice<i32>,
    targets: CudaSlice<i32>,
    losses: CudaSlice<f32>,
}

pub struct Cuda {
    /// Keeps the primary context alive for as long as the backend exists.
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    funcs: HashMap<&'static str, CudaFunction>,
    maps: (CudaSlice<f32>, CudaSlice<f32>),
    scratch: Mutex<Scratch>,
    mem: Arc<MemTracker>,
    /// First asynchronous error, reported by the next call that can return one.
    sticky: Mutex<Option<Error>>,
    pub name_of_device: String,
}

const PARTS: usize = 256;
const THREADS: u32 = 256;

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(THREADS).max(1), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

impl Cuda {
    /// Opens device `ordinal`, compiles (or loads from the cache) every kernel module for
    /// its architecture. Never panics: a missing library or device is an `Err`.
    pub fn new(ordinal: usize) -> Result<Self> {
        if probe::device_count() <= ordinal {
            return Err(Error::backend("no usable CUDA device (driver, libcuda, libnvrtc and libcublas are needed)"));
        }
        std::panic::catch_unwind(|| Self::open(ordinal))
            .map_err(|_| Error::backend("a CUDA library is missing a symbol (a CUDA 13.0 installation is needed)"))?
    }

    fn open(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err("context", e))?;
        let stream = ctx.default_stream();
        let (maj, min) = ctx.compute_capability().map_err(|e| dev_err("capability", e))?;
        let arch = format!("sm_{maj}{min}");
        let mut funcs = HashMap::new();
        for m in MODULES {
            let bin = kernels::cubin(m, &arch)?;
            let module = ctx.load_module(Ptx::from_binary(bin)).map_err(|e| dev_err("module load", e))?;
            for &k in m.kernels {
                funcs.insert(k, module.load_function(k).map_err(|e| dev_err(k, e))?);
            }
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("cuBLAS", e))?;
        let solver = DnHandle::new(stream.clone()).map_err(|e| dev_err("cuSOLVER", e))?;
        let s = adam8::dynamic_map(true);
        let u = adam8::dynamic_map(false);
        let maps = (
            stream.clone_htod(&s[..]).map_err(|e| dev_err("copy", e))?,
            stream.clone_htod(&u[..]).map_err(|e| dev_err("copy", e))?,
        );
        let z = |n: usize| stream.alloc_zeros::<f32>(n).map_err(|e| dev_err("alloc", e));
        let scratch = Scratch {
            partial: stream.alloc_zeros::<f64>(PARTS).map_err(|e| dev_err("alloc", e))?,
            total: stream.alloc_zeros::<f64>(1).map_err(|e| dev_err("alloc", e))?,
            count: stream.alloc_zeros::<u64>(1).map_err(|e| dev_err("alloc", e))?,
            tokens: stream.alloc_zeros::<i32>(1).map_err(|e| dev_err("alloc", e))?,
            targets: stream.alloc_zeros::<i32>(1).map_err(|e| dev_err("alloc", e))?,
            losses: z(1)?,
        };
        Ok(Cuda {
            name_of_device: format!("cuda:{ordinal} ({arch})"),
            _ctx: ctx,
            stream,
            blas,
            solver,
            funcs,
            maps,
            scratch: Mutex::new(scratch),
            mem: Arc::new(MemTracker::default()),
            sticky: Mutex::new(None),
        })
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    fn note<T, E: std::fmt::Debug>(&self, what: &str, r: std::result::Result<T, E>) {
        if let Err(e) = r {
            let mut s = self.sticky.lock().unwrap();
            if s.is_none() {
                *s = Some(dev_err(what, e));
            }
        }
    }

    fn take_sticky(&self) -> Result<()> {
        match self.sticky.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Row-major C[m×n] (ldc) = alpha·op(A)·op(B) + beta·C, with A at `a` (lda) and B at
    /// `b` (ldb); issued as the column-major product Cᵀ = op(B)ᵀ·op(A)ᵀ.
    #[allow(clippy::too_many_arguments)]
    fn gemm_rm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &A,
        lda: usize,
        b: &B,
        ldb: usize,
        beta: f32,
        c: &mut C,
        ldc: usize,
    ) {
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let cfg = GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: ldb as i32,
            ldb: lda as i32,
            beta,
            ldc: ldc as i32,
        };
        let r = unsafe { self.blas.gemm(cfg, b, a, c) };
        self.note("SGEMM", r);
    }

    fn upload_ids(&self, dst: &mut CudaSlice<i32>, ids: &[i32]) -> Result<()> {
        if dst.len() < ids.len() {
            *dst = self.stream.alloc_zeros::<i32>(ids.len()).map_err(|e| dev_err("alloc", e))?;
        }
        self.stream.memcpy_htod(ids, &mut dst.slice_mut(..ids.len())).map_err(|e| dev_err("copy", e))
    }

    fn read_count(&self, count: &CudaSlice<u64>) -> u64 {
        let mut h = [0u64; 1];
        let r = self.stream.memcpy_dtoh(count, &mut h[..]);
        self.note("copy", r);
        h[0]
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Q = CudaQ;
    type A8 = CudaA8;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn mem(&self) -> &MemTracker {
        &self.mem
    }
    fn runner(&self) -> Runner {
        Runner(None)
    }
    fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| dev_err("synchronize", e))?;
        self.take_sticky()
    }

    fn alloc(&self, n: usize, cat: Category) -> Result<CudaBuf> {
        let data = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| dev_err(&format!("alloc of {} MiB", n * 4 >> 20), e))?;
        Ok(CudaBuf { data, _t: Tracked::new((), n * 4, cat, &self.mem) })
    }
    fn len(&self, b: &CudaBuf) -> usize {
        b.data.len()
    }
    fn upload(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        self.stream.memcpy_htod(src, &mut dst.data.slice_mut(..src.len())).map_err(|e| dev_err("copy", e))
    }
    fn download(&self, src: &CudaBuf, dst: &mut [f32]) -> Result<()> {
        let n = dst.len();
        self.stream.memcpy_dtoh(&src.data.slice(..n), dst).map_err(|e| dev_err("copy", e))
    }
    fn fill(&self, b: &mut CudaBuf, v: f32) {
        let n = b.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("fill"));
        l.arg(&mut b.data).arg(&v).arg(&n);
        self.note("fill", unsafe { l.launch(grid(n as usize)) });
    }
    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        let r = self.stream.memcpy_dtod(&src.data, &mut dst.data);
        self.note("copy", r);
    }
    fn copy_n(&self, dst: &mut CudaBuf, src: &CudaBuf, n: usize) {
        let r = self.stream.memcpy_dtod(&src.data.slice(..n), &mut dst.data.slice_mut(..n));
        self.note("copy", r);
    }
    fn add(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        self.axpy(dst, 1.0, src);
    }
    fn scale(&self, b: &mut CudaBuf, s: f32) {
        let n = b.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("scale"));
        l.arg(&mut b.data).arg(&s).arg(&n);
        self.note("scale", unsafe { l.launch(grid(n as usize)) });
    }
    fn sumsq(&self, b: &CudaBuf, n: usize) -> f64 {
        let mut sc = self.scratch.lock().unwrap();
        let Scratch { partial, total, .. } = &mut *sc;
        let nn = n as u64;
        let parts = PARTS as i32;
        let mut l = self.stream.launch_builder(self.f("sumsq_partial"));
        l.arg(&b.data).arg(&mut *partial).arg(&nn);
        let cfg = LaunchConfig { grid_dim: (PARTS as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        self.note("sumsq", unsafe { l.launch(cfg) });
        let mut l = self.stream.launch_builder(self.f("sum_partials"));
        l.arg(&*partial).arg(&mut *total).arg(&parts);
        self.note("sumsq", unsafe { l.launch(rows_cfg(1, 1)) });
        let mut h = [0f64; 1];
        let r = self.stream.memcpy_dtoh(&*total, &mut h[..]);
        self.note("copy", r);
        h[0]
    }

    fn matmul(&self, out: &mut CudaBuf, inp: &CudaBuf, w: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm_rm(false, true, n, oc, ic, 1.0, &inp.data, ic, &w.data, ic, acc as i32 as f32, &mut out.data, oc);
    }
    fn matmul_dinp(&self, dinp: &mut CudaBuf, dout: &CudaBuf, w: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm_rm(false, false, n, ic, oc, 1.0, &dout.data, oc, &w.data, ic, acc as i32 as f32, &mut dinp.data, ic);
    }
    fn matmul_dw(&self, dw: &mut CudaBuf, dout: &CudaBuf, inp: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm_rm(true, false, oc, ic, n, 1.0, &dout.data, oc, &inp.data, ic, acc as i32 as f32, &mut dw.data, ic);
    }

    fn embedding(&self, out: &mut CudaBuf, tokens: &[i32], table: &CudaBuf, c: usize) {
        let mut sc = self.scratch.lock().unwrap();
        if let Err(e) = self.upload_ids(&mut sc.tokens, tokens) {
            self.note::<(), _>("copy", Err(e.msg));
            return;
        }
        let ci = c as i32;
        let mut l = self.stream.launch_builder(self.f("embedding"));
        l.arg(&mut out.data).arg(&sc.tokens).arg(&table.data).arg(&ci);
        let cfg = LaunchConfig { grid_dim: (tokens.len() as u32, (c as u32).div_ceil(THREADS), 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        self.note("embedding", unsafe { l.launch(cfg) });
    }
    fn embedding_bwd(&self, dtable: &mut CudaBuf, dout: &CudaBuf, tokens: &[i32], c: usize) {
        let mut sc = self.scratch.lock().unwrap();
        if let Err(e) = self.upload_ids(&mut sc.tokens, tokens) {
            self.note::<(), _>("copy", Err(e.msg));
            return;
        }
        let (rows, ci) = (tokens.len() as i32, c as i32);
        let mut l = self.stream.launch_builder(self.f("embedding_bwd"));
        l.arg(&mut dtable.data).arg(&dout.data).arg(&sc.tokens).arg(&rows).arg(&ci);
        self.note("embedding_bwd", unsafe { l.launch(grid(c)) });
    }
    fn rmsnorm(&self, out: &mut CudaBuf, rstd: &mut CudaBuf, x: &CudaBuf, w: &CudaBuf, n: usize, c: usize, eps: f32) {
        let ci = c as i32;
        let mut l = self.stream.launch_builder(self.f("rmsnorm"));
        l.arg(&mut out.data).arg(&mut rstd.data).arg(&x.data).arg(&w.data).arg(&ci).arg(&eps);
        self.note("rmsnorm", unsafe { l.launch(rows_cfg(n, THREADS)) });
    }
    fn rmsnorm_bwd(&self, dx: &mut CudaBuf, dw: &mut CudaBuf, dout: &CudaBuf, x: &CudaBuf, w: &CudaBuf, rstd: &CudaBuf, n: usize, c: usize) {
        let (ci, ni) = (c as i32, n as i32);
        let mut l = self.stream.launch_builder(self.f("rmsnorm_bwd_dx"));
        l.arg(&mut dx.data).arg(&dout.data).arg(&x.data).arg(&w.data).arg(&rstd.data).arg(&ci);
        self.note("rmsnorm_bwd", unsafe { l.launch(rows_cfg(n, THREADS)) });
        let mut l = self.stream.launch_builder(self.f("rmsnorm_bwd_dw"));
        l.arg(&mut dw.data).arg(&dout.data).arg(&x.data).arg(&rstd.data).arg(&ni).arg(&ci);
        self.note("rmsnorm_bwd", unsafe { l.launch(grid(c)) });
    }
    fn rope(&self, x: &mut CudaBuf, table: &CudaBuf, b: usize, t: usize, heads: usize, hd: usize, inverse: bool) {
        let (ti, hi, hdi, inv) = (t as i32, heads as i32, hd as i32, inverse as i32);
        let mut l = self.stream.launch_builder(self.f("rope"));
        l.arg(&mut x.data).arg(&table.data).arg(&ti).arg(&hi).arg(&hdi).arg(&inv);
        let cfg = LaunchConfig { grid_dim: ((b * t) as u32, heads as u32, 1), block_dim: ((hd / 2).max(1) as u32, 1, 1), shared_mem_bytes: 0 };
        self.note("rope", unsafe { l.launch(cfg) });
    }
    fn attention(&self, out: &mut CudaBuf, att: &mut CudaBuf, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, d: AttnDims) {
        let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
        let (c, kvd, group) = (h * hd, kvh * hd, h / kvh);
        let scale = 1.0 / (hd as f32).sqrt();
        for bi in 0..b {
            for hi in 0..h {
                let (qo, ko, ao) = (bi * t * c + hi * hd, bi * t * kvd + (hi / group) * hd, (bi * h + hi) * t * t);
                self.gemm_rm(false, true, t, t, hd, scale, &q.data.slice(qo..), c, &k.data.slice(ko..), kvd, 0.0, &mut att.data.slice_mut(ao..), t);
            }
        }
        let ti = t as i32;
        let mut l = self.stream.launch_builder(self.f("causal_softmax"));
        l.arg(&mut att.data).arg(&ti);
        self.note("softmax", unsafe { l.launch(rows_cfg(b * h * t, THREADS)) });
        for bi in 0..b {
            for hi in 0..h {
                let (oo, vo, ao) = (bi * t * c + hi * hd, bi * t * kvd + (hi / group) * hd, (bi * h + hi) * t * t);
                self.gemm_rm(false, false, t, hd, t, 1.0, &att.data.slice(ao..), t, &v.data.slice(vo..), kvd, 0.0, &mut out.data.slice_mut(oo..), c);
            }
        }
    }
    fn attention_bwd(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        scratch: &mut CudaBuf,
        dout: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        att: &CudaBuf,
        d: AttnDims,
    ) {
        let (b, t, h, kvh, hd) = (d.b, d.t, d.h, d.kvh, d.hd);
        let (c, kvd, group) = (h * hd, kvh * hd, h / kvh);
        let scale = 1.0 / (hd as f32).sqrt();
        // datt = dout·Vᵀ and dv (+)= attᵀ·dout, heads of a group accumulating in order
        for bi in 0..b {
            for hi in 0..h {
                let (oo, vo, ao) = (bi * t * c + hi * hd, bi * t * kvd + (hi / group) * hd, (bi * h + hi) * t * t);
                self.gemm_rm(false, true, t, t, hd, 1.0, &dout.data.slice(oo..), c, &v.data.slice(vo..), kvd, 0.0, &mut scratch.data.slice_mut(ao..), t);
                let beta = if hi % group > 0 { 1.0 } else { 0.0 };
                self.gemm_rm(true, false, t, hd, t, 1.0, &att.data.slice(ao..), t, &dout.data.slice(oo..), c, beta, &mut dv.data.slice_mut(vo..), kvd);
            }
        }
        let ti = t as i32;
        let mut l = self.stream.launch_builder(self.f("causal_softmax_bwd"));
        l.arg(&mut scratch.data).arg(&att.data).arg(&ti).arg(&scale);
        self.note("softmax_bwd", unsafe { l.launch(rows_cfg(b * h * t, THREADS)) });
        for bi in 0..b {
            for hi in 0..h {
                let (qo, ko, ao) = (bi * t * c + hi * hd, bi * t * kvd + (hi / group) * hd, (bi * h + hi) * t * t);
                self.gemm_rm(false, false, t, hd, t, 1.0, &scratch.data.slice(ao..), t, &k.data.slice(ko..), kvd, 0.0, &mut dq.data.slice_mut(qo..), c);
                let beta = if hi % group > 0 { 1.0 } else { 0.0 };
                self.gemm_rm(true, false, t, hd, t, 1.0, &scratch.data.slice(ao..), t, &q.data.slice(qo..), c, beta, &mut dk.data.slice_mut(ko..), kvd);
            }
        }
    }
    fn swiglu(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf) {
        let n = out.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("swiglu"));
        l.arg(&mut out.data).arg(&gate.data).arg(&up.data).arg(&n);
        self.note("swiglu", unsafe { l.launch(grid(n as usize)) });
    }
    fn swiglu_bwd(&self, dgate: &mut CudaBuf, dup: &mut CudaBuf, dout: &CudaBuf, gate: &CudaBuf, up: &CudaBuf) {
        let n = dgate.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("swiglu_bwd"));
        l.arg(&mut dgate.data).arg(&mut dup.data).arg(&dout.data).arg(&gate.data).arg(&up.data).arg(&n);
        self.note("swiglu_bwd", unsafe { l.launch(grid(n as usize)) });
    }
    fn cross_entropy(&self, logits: &mut CudaBuf, targets: &[i32], losses: &mut [f32], n: usize, v: usize, grad_scale: Option<f32>) -> Result<()> {
        let mut sc = self.scratch.lock().unwrap();
        let Scratch { targets: dt, losses: dl, .. } = &mut *sc;
        self.upload_ids(dt, &targets[..n])?;
        if dl.len() < n {
            *dl = self.stream.alloc_zeros::<f32>(n).map_err(|e| dev_err("alloc", e))?;
        }
        let (vi, g, s) = (v as i32, grad_scale.is_some() as i32, grad_scale.unwrap_or(0.0));
        let mut l = self.stream.launch_builder(self.f("cross_entropy"));
        l.arg(&mut logits.data).arg(&*dt).arg(&mut *dl).arg(&vi).arg(&g).arg(&s);
        unsafe { l.launch(rows_cfg(n, THREADS)) }.map_err(|e| dev_err("cross_entropy", e))?;
        self.stream.memcpy_dtoh(&dl.slice(..n), &mut losses[..n]).map_err(|e| dev_err("copy", e))?;
        self.take_sticky()
    }
    fn adamw(&self, p: &mut CudaBuf, g: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: AdamHp) {
        let (step, rbc2, decay) = hp.torch_factors();
        let n = m.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("adamw"));
        l.arg(&mut p.data).arg(&g.data).arg(&mut m.data).arg(&mut v.data).arg(&step).arg(&rbc2).arg(&decay).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&n);
        self.note("adamw", unsafe { l.launch(grid(n as usize)) });
    }

    fn sanitize(&self, b: &mut CudaBuf, n: usize) -> u64 {
        let mut sc = self.scratch.lock().unwrap();
        let r = self.stream.memset_zeros(&mut sc.count);
        self.note("memset", r);
        let nn = n as u64;
        let mut l = self.stream.launch_builder(self.f("sanitize"));
        l.arg(&mut b.data).arg(&mut sc.count).arg(&nn);
        self.note("sanitize", unsafe { l.launch(grid(n)) });
        self.read_count(&sc.count)
    }
    fn axpy(&self, dst: &mut CudaBuf, alpha: f32, src: &CudaBuf) {
        let n = dst.data.len().min(src.data.len()) as u64;
        let mut l = self.stream.launch_builder(self.f("axpy"));
        l.arg(&mut dst.data).arg(&alpha).arg(&src.data).arg(&n);
        self.note("axpy", unsafe { l.launch(grid(n as usize)) });
    }

    fn q_new(&self, numel: usize, bits: u8, group: usize, cat: Category) -> Result<CudaQ> {
        // the CPU type validates shapes and gives the byte layout
        let host = crate::quant::QTensor::new(numel, bits, group)?;
        let a8 = |n: usize| self.stream.alloc_zeros::<u8>(n.max(1)).map_err(|e| dev_err("alloc", e));
        let a32 = |n: usize| self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| dev_err("alloc", e));
        Ok(CudaQ {
            bytes: host.bytes(),
            bits,
            group,
            numel,
            codes: a8(host.codes.len())?,
            scale: a32(host.scale.len())?,
            zero: a32(host.zero.len())?,
            _t: Tracked::new((), host.bytes(), cat, &self.mem),
        })
    }
    fn q_bytes(&self, q: &CudaQ) -> usize {
        q.bytes
    }
    fn q_quantize(&self, q: &mut CudaQ, src: &CudaBuf, range: Range) {
        if q.bits == 16 {
            let n = q.numel as u64;
            let mut l = self.stream.launch_builder(self.f("bf16_quant"));
            l.arg(&mut q.codes).arg(&src.data).arg(&n);
            self.note("bf16_quant", unsafe { l.launch(grid(q.numel)) });
            return;
        }
        self.requant(q, &src.data, 1.0, false, range, None);
    }
    fn q_dequantize(&self, dst: &mut CudaBuf, q: &CudaQ) {
        let n = q.numel as u64;
        if q.bits == 16 {
            let mut l = self.stream.launch_builder(self.f("bf16_dequant"));
            l.arg(&mut dst.data).arg(&q.codes).arg(&n);
            self.note("bf16_dequant", unsafe { l.launch(grid(q.numel)) });
            return;
        }
        let (bits, group) = (q.bits as i32, q.group as i32);
        let mut l = self.stream.launch_builder(self.f("q_dequant"));
        l.arg(&mut dst.data).arg(&q.codes).arg(&q.scale).arg(&q.zero).arg(&bits).arg(&group).arg(&n);
        self.note("q_dequant", unsafe { l.launch(grid(q.numel)) });
    }
    fn q_update(&self, q: &mut CudaQ, delta: &CudaBuf, decay: f32, range: Range, sr: Option<u64>) {
        self.requant(q, &delta.data, decay, true, range, sr);
    }

    fn a8_new(&self, n: usize, block: usize, cat: Category) -> Result<CudaA8> {
        let host = crate::quant::adam8::State8::new(n, block);
        let st = CudaA8 {
            block,
            n,
            m: self.stream.clone_htod(&host.m).map_err(|e| dev_err("alloc", e))?,
            v: self.stream.clone_htod(&host.v).map_err(|e| dev_err("alloc", e))?,
            absm: self.stream.clone_htod(&host.absmax_m).map_err(|e| dev_err("alloc", e))?,
            absv: self.stream.clone_htod(&host.absmax_v).map_err(|e| dev_err("alloc", e))?,
            _t: Tracked::new((), host.bytes(), cat, &self.mem),
        };
        Ok(st)
    }
    fn a8_step(&self, p: &mut CudaBuf, g: &CudaBuf, st: &mut CudaA8, hp: BnbHp) -> u64 {
        let (step_size, eps2) = hp.bnb_factors();
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let mut sc = self.scratch.lock().unwrap();
        let r = self.stream.memset_zeros(&mut sc.count);
        self.note("memset", r);
        let (bs, n) = (st.block as i32, st.n as u64);
        let mut l = self.stream.launch_builder(self.f("adam8"));
        l.arg(&mut p.data).arg(&g.data).arg(&mut st.m).arg(&mut st.v).arg(&mut st.absm).arg(&mut st.absv);
        l.arg(&self.maps.0).arg(&self.maps.1).arg(&step_size).arg(&eps2).arg(&hp.beta1).arg(&hp.beta2);
        l.arg(&hp.weight_decay).arg(&decay).arg(&bs).arg(&mut sc.count).arg(&n);
        let cfg = LaunchConfig { grid_dim: (st.n.div_ceil(st.block) as u32, 1, 1), block_dim: ((st.block / 8) as u32, 1, 1), shared_mem_bytes: 0 };
        self.note("adam8", unsafe { l.launch(cfg) });
        self.read_count(&sc.count)
    }
    fn bnb32_step(&self, p: &mut CudaBuf, g: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: BnbHp) -> u64 {
        let (step_size, eps2) = hp.bnb_factors();
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let mut sc = self.scratch.lock().unwrap();
        let r = self.stream.memset_zeros(&mut sc.count);
        self.note("memset", r);
        let n = m.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("bnb32"));
        l.arg(&mut p.data).arg(&g.data).arg(&mut m.data).arg(&mut v.data).arg(&step_size).arg(&eps2);
        l.arg(&hp.beta1).arg(&hp.beta2).arg(&hp.weight_decay).arg(&decay).arg(&mut sc.count).arg(&n);
        self.note("bnb32", unsafe { l.launch(grid(n as usize)) });
        self.read_count(&sc.count)
    }
    fn galore_adam(&self, buf: &mut CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: AdamHp) {
        let s = hp.galore_step();
        let n = m.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("galore_adam"));
        l.arg(&mut buf.data).arg(&mut m.data).arg(&mut v.data).arg(&s).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&n);
        self.note("galore_adam", unsafe { l.launch(grid(n as usize)) });
    }
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
        if method != Refresh::Eigh {
            // exact host route for the other methods: copy, decompose with faer, copy back
            let mut hg = vec![0.0f32; rows * cols];
            self.download(g, &mut hg)?;
            let pn = if right { rank * cols } else { rows * rank };
            let hp = match prev {
                Some(p) => {
                    let mut h = vec![0.0f32; pn];
                    self.download(p, &mut h)?;
                    Some(h)
                }
                None => None,
            };
            let mut ho = vec![0.0f32; pn];
            crate::backend::cpu::linalg::top_subspace(&hg, rows, cols, rank, right, method, hp.as_deref(), seed, &mut ho, 0)?;
            return self.upload(out, &ho);
        }
        if rank > rows.min(cols) {
            return Err(Error::invalid(format!("rank {rank} exceeds the matrix size {rows}×{cols}")));
        }
        // C = GᵀG (cols×cols) or GGᵀ (rows×rows) in full fp32, then Ssyevd
        let n = if right { cols } else { rows };
        let mut c = self.stream.alloc_zeros::<f32>(n * n).map_err(|e| dev_err("alloc", e))?;
        if right {
            self.gemm_rm(true, false, cols, cols, rows, 1.0, &g.data, cols, &g.data, cols, 0.0, &mut c, cols);
        } else {
            self.gemm_rm(false, true, rows, rows, cols, 1.0, &g.data, cols, &g.data, cols, 0.0, &mut c, rows);
        }
        let mut w = self.stream.alloc_zeros::<f32>(n).map_err(|e| dev_err("alloc", e))?;
        let mut info = self.stream.alloc_zeros::<i32>(1).map_err(|e| dev_err("alloc", e))?;
        let jobz = sol::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
        let uplo = sol::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let mut lwork = 0i32;
        {
            let (cp, _s1) = c.device_ptr_mut(&self.stream);
            let (wp, _s2) = w.device_ptr_mut(&self.stream);
            let st = unsafe { sol::cusolverDnSsyevd_bufferSize(self.solver.cu(), jobz, uplo, n as i32, cp as *const f32, n as i32, wp as *const f32, &mut lwork) };
            if st != sol::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
                return Err(dev_err("Ssyevd_bufferSize", st));
            }
        }
        let mut work = self.stream.alloc_zeros::<f32>(lwork.max(1) as usize).map_err(|e| dev_err("alloc", e))?;
        {
            let (cp, _s1) = c.device_ptr_mut(&self.stream);
            let (wp, _s2) = w.device_ptr_mut(&self.stream);
            let (kp, _s3) = work.device_ptr_mut(&self.stream);
            let (ip, _s4) = info.device_ptr_mut(&self.stream);
            let st = unsafe {
                sol::cusolverDnSsyevd(self.solver.cu(), jobz, uplo, n as i32, cp as *mut f32, n as i32, wp as *mut f32, kp as *mut f32, lwork, ip as *mut i32)
            };
            if st != sol::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
                return Err(dev_err("Ssyevd", st));
            }
        }
        let mut hinfo = [0i32; 1];
        self.stream.memcpy_dtoh(&info, &mut hinfo[..]).map_err(|e| dev_err("copy", e))?;
        if hinfo[0] != 0 {
            return Err(Error::backend(format!("eigensolver did not converge (info {})", hinfo[0])));
        }
        let (ni, ki) = (n as i32, rank as i32);
        let name = if right { "top_eigvecs_rows" } else { "top_eigvecs_cols" };
        let mut l = self.stream.launch_builder(self.f(name));
        l.arg(&mut out.data).arg(&c).arg(&ni).arg(&ki);
        let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(THREADS), rank as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        unsafe { l.launch(cfg) }.map_err(|e| dev_err(name, e))?;
        self.take_sticky()?;
        // like the CPU, a non-finite result is a failed refresh (the caller keeps the old P)
        let mut h = vec![0.0f32; rank * n];
        self.download(out, &mut h)?;
        if h.iter().all(|x| x.is_finite()) {
            Ok(())
        } else {
            Err(Error::backend("decomposition produced non-finite values"))
        }
    }

    fn save_buf(&self, b: &CudaBuf, n: usize, w: &mut Writer) {
        let mut h = vec![0.0f32; n];
        let r = self.stream.memcpy_dtoh(&b.data.slice(..n), &mut h[..]);
        self.note("copy", r);
        w.f32s(&h);
    }
    fn load_buf(&self, b: &mut CudaBuf, n: usize, r: &mut Reader, what: &str) -> Result<()> {
        let mut h = vec![0.0f32; n];
        r.f32s_into(&mut h, what)?;
        self.upload(b, &h)
    }
    fn save_q(&self, q: &CudaQ, w: &mut Writer) {
        w.qtensor(&self.q_host(q));
    }
    fn load_q(&self, q: &mut CudaQ, r: &mut Reader, what: &str) -> Result<()> {
        let mut h = self.q_host(q);
        r.qtensor_into(&mut h, what)?;
        let c = |e| dev_err("copy", e);
        self.stream.memcpy_htod(&h.codes, &mut q.codes).map_err(c)?;
        self.stream.memcpy_htod(&h.scale, &mut q.scale.slice_mut(..h.scale.len())).map_err(c)?;
        self.stream.memcpy_htod(&h.zero, &mut q.zero.slice_mut(..h.zero.len())).map_err(c)?;
        Ok(())
    }
    fn save_a8(&self, s: &CudaA8, w: &mut Writer) {
        w.state8(&self.a8_host(s));
    }
    fn load_a8(&self, s: &mut CudaA8, r: &mut Reader, what: &str) -> Result<()> {
        let mut h = self.a8_host(s);
        r.state8_into(&mut h, what)?;
        let c = |e| dev_err("copy", e);
        self.stream.memcpy_htod(&h.m, &mut s.m).map_err(c)?;
        self.stream.memcpy_htod(&h.v, &mut s.v).map_err(c)?;
        self.stream.memcpy_htod(&h.absmax_m, &mut s.absm).map_err(c)?;
        self.stream.memcpy_htod(&h.absmax_v, &mut s.absv).map_err(c)?;
        Ok(())
    }

    fn device_bytes_in_use(&self) -> Option<u64> {
        let _ = self.stream.synchronize();
        cudarc::driver::result::mem_get_info().ok().map(|(free, total)| (total - free) as u64)
    }

    fn gemm_gflops(&self, m: usize, n: usize, k: usize, iters: usize) -> f64 {
        let (Ok(a), Ok(b), Ok(mut c)) =
            (self.stream.alloc_zeros::<f32>(m * k), self.stream.alloc_zeros::<f32>(k * n), self.stream.alloc_zeros::<f32>(m * n))
        else {
            return -1.0;
        };
        self.gemm_rm(false, false, m, n, k, 1.0, &a, k, &b, n, 0.0, &mut c, n);
        let _ = self.stream.synchronize();
        let t0 = std::time::Instant::now();
        for _ in 0..iters.max(1) {
            self.gemm_rm(false, false, m, n, k, 1.0, &a, k, &b, n, 0.0, &mut c, n);
        }
        let _ = self.stream.synchronize();
        2.0 * (m * n * k) as f64 * iters.max(1) as f64 / t0.elapsed().as_secs_f64() / 1e9
    }
}

impl Cuda {
    fn requant(&self, q: &mut CudaQ, src: &CudaSlice<f32>, decay: f32, update: bool, range: Range, sr: Option<u64>) {
        let (upd, bits, wz, use_sr, key) =
            (update as i32, q.bits as i32, (range == Range::WithZero) as i32, sr.is_some() as i32, sr.unwrap_or(0));
        let mut l = self.stream.launch_builder(self.f("q_requant"));
        l.arg(&mut q.codes).arg(&mut q.scale).arg(&mut q.zero).arg(src).arg(src).arg(&decay).arg(&upd);
        let group = q.group as i32;
        l.arg(&bits).arg(&wz).arg(&use_sr).arg(&key).arg(&group);
        let threads = (q.group as u32).div_ceil(32) * 32;
        let cfg = LaunchConfig { grid_dim: ((q.numel / q.group) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        self.note("q_requant", unsafe { l.launch(cfg) });
    }

    fn q_host(&self, q: &CudaQ) -> crate::quant::QTensor {
        let mut h = crate::quant::QTensor::new(q.numel, q.bits, q.group).expect("validated at creation");
        let r = self.stream.memcpy_dtoh(&q.codes, &mut h.codes[..]);
        self.note("copy", r);
        if !h.scale.is_empty() {
            let n = h.scale.len();
            let r1 = self.stream.memcpy_dtoh(&q.scale.slice(..n), &mut h.scale[..]);
            let r2 = self.stream.memcpy_dtoh(&q.zero.slice(..n), &mut h.zero[..]);
            self.note("copy", r1);
            self.note("copy", r2);
        }
        h
    }

    fn a8_host(&self, s: &CudaA8) -> crate::quant::adam8::State8 {
        let mut h = crate::quant::adam8::State8::new(s.n, s.block);
        for r in [
            self.stream.memcpy_dtoh(&s.m, &mut h.m[..]),
            self.stream.memcpy_dtoh(&s.v, &mut h.v[..]),
            self.stream.memcpy_dtoh(&s.absm, &mut h.absmax_m[..]),
            self.stream.memcpy_dtoh(&s.absv, &mut h.absmax_v[..]),
        ] {
            self.note("copy", r);
        }
        h
    }
}
