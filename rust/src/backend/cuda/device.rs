//! The CUDA `Backend`: device buffers on one stream, NVRTC kernels (`kernels.rs`),
//! cuBLAS `GemmEx` for every product, cuSOLVER for projector refreshes.
//!
//! Two precisions. `fp32`: every buffer f32, GEMMs in full fp32 (`CUBLAS_COMPUTE_32F`,
//! no TF32): the reference the parity tests hold to CPU tolerances. `bf16` (the default on
//! a GPU): activation buffers hold bf16, GEMMs (the model's and the GaLore projections)
//! take bf16 inputs and accumulate in fp32 (f32 operands are cast into a reused scratch,
//! like autocast), while weights, gradients, optimizer state, norm statistics, RoPE tables
//! and logits stay f32. Projector refreshes always run in fp32.
//!
//! Buffers are planned once per run (the engine's activation plan, the optimizer's
//! state); the scratch kept here (reductions, casts, solver workspace) grows during the
//! first step and is then reused, so steady-state steps make no device allocations.
//! Unverified on hardware in the session that wrote it: see the parity tests in
//! `rust/tests/cuda_parity.rs`, which run only where a GPU is present, and the CPU
//! emulation of the kernels in `rust/tests/kernel_emu.rs`.

use super::kernels::{self, MODULES};
use super::launch::{self, Launch, DW_CHUNK, PARTS, THREADS};
use super::plan::{self, Gemm};
use super::probe;
use crate::backend::{AdamHp, AttnDims, Backend, Category, MemTracker, Refresh, Runner, Tracked};
use crate::error::{Error, Result};
use crate::quant::adam8::{self, BnbHp};
use crate::quant::{bf16_to_f32, f32_to_bf16, Range};
use crate::state::{Reader, Writer};
use cudarc::cublas::{result as blas_r, sys as blas_sys, CudaBlas};
use cudarc::cusolver::DnHandle;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig, PushKernelArg,
    SyncOnDrop,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod refresh;

fn dev_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::backend(format!("CUDA {what}: {e:?}"))
}

/// Device storage of one buffer: f32, or bf16 bits for activations under bf16 precision.
pub enum Store {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl Store {
    pub fn len(&self) -> usize {
        match self {
            Store::F32(x) => x.len(),
            Store::Bf16(x) => x.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_bf16(&self) -> bool {
        matches!(self, Store::Bf16(_))
    }
    fn bytes_per(&self) -> usize {
        if self.is_bf16() {
            2
        } else {
            4
        }
    }
    /// The f32 slice of a buffer the engine always keeps in f32 (weights, gradients,
    /// optimizer state). A bf16 buffer here is an engine bug, reported as a panic that the
    /// C ABI turns into an error.
    pub fn f32(&self) -> &CudaSlice<f32> {
        match self {
            Store::F32(x) => x,
            Store::Bf16(_) => panic!("internal: bf16 buffer where f32 is required"),
        }
    }
    pub fn f32_mut(&mut self) -> &mut CudaSlice<f32> {
        match self {
            Store::F32(x) => x,
            Store::Bf16(_) => panic!("internal: bf16 buffer where f32 is required"),
        }
    }
    fn dtype(&self) -> blas_sys::cudaDataType {
        if self.is_bf16() {
            blas_sys::cudaDataType::CUDA_R_16BF
        } else {
            blas_sys::cudaDataType::CUDA_R_32F
        }
    }
    /// Device address of element `off` and the guard that must outlive its use.
    fn ptr<'a>(&'a self, stream: &'a CudaStream, off: usize) -> (u64, SyncOnDrop<'a>) {
        let (p, g) = match self {
            Store::F32(x) => x.device_ptr(stream),
            Store::Bf16(x) => x.device_ptr(stream),
        };
        (p + (off * self.bytes_per()) as u64, g)
    }
    fn ptr_mut<'a>(&'a mut self, stream: &'a CudaStream, off: usize) -> (u64, SyncOnDrop<'a>) {
        let bp = self.bytes_per();
        let (p, g) = match self {
            Store::F32(x) => x.device_ptr_mut(stream),
            Store::Bf16(x) => x.device_ptr_mut(stream),
        };
        (p + (off * bp) as u64, g)
    }
}

// A buffer goes to a kernel as its device pointer, whatever its element type.
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b Store> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, s: &'b Store) -> &mut Self {
        match s {
            Store::F32(x) => self.arg(x),
            Store::Bf16(x) => self.arg(x),
        }
    }
}
unsafe impl<'a, 'b: 'a> PushKernelArg<&'b mut Store> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, s: &'b mut Store) -> &mut Self {
        match s {
            Store::F32(x) => self.arg(x),
            Store::Bf16(x) => self.arg(x),
        }
    }
}

pub struct CudaBuf {
    pub data: Store,
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

/// Reduction, counter and cast scratch, reused by every call (grown, never shrunk).
struct Scratch {
    partial: CudaSlice<f64>,
    total: CudaSlice<f64>,
    /// Running Σx² of `sumsq_acc`, read by `take_sumsq`.
    acc_total: CudaSlice<f64>,
    /// Running count of non-finite gradient elements, read by `take_nonfinite`.
    count: CudaSlice<u64>,
    tokens: CudaSlice<i32>,
    targets: CudaSlice<i32>,
    /// The grouped embedding backward's ids (`plan::token_groups`): distinct tokens, group
    /// starts, rows in group order.
    groups: [CudaSlice<i32>; 3],
    losses: CudaSlice<f32>,
    /// bf16 copies of f32 GEMM inputs (one per operand).
    cast: [CudaSlice<u16>; 2],
    /// Per-chunk partial sums of an RMSNorm weight gradient.
    dw_part: CudaSlice<f32>,
}

/// A raw GEMM operand: device address of its first element and element type.
type Raw = (u64, blas_sys::cudaDataType);

pub struct Cuda {
    /// Keeps the primary context alive for as long as the backend exists.
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    /// Kernels of the f32 modules, by name.
    funcs: HashMap<&'static str, CudaFunction>,
    /// The layer kernels for this precision's activation type (`nn` or `nn_bf16`).
    acts: HashMap<&'static str, CudaFunction>,
    bf16: bool,
    maps: (CudaSlice<f32>, CudaSlice<f32>),
    scratch: Mutex<Scratch>,
    ws: Mutex<refresh::Ws>,
    mem: Arc<MemTracker>,
    /// First asynchronous error, reported by the next call that can return one.
    sticky: Mutex<Option<Error>>,
    pub name_of_device: String,
}

impl From<Launch> for LaunchConfig {
    fn from(l: Launch) -> LaunchConfig {
        let d = |x: [u32; 3]| (x[0], x[1], x[2]);
        LaunchConfig { grid_dim: d(l.grid), block_dim: d(l.block), shared_mem_bytes: l.shared }
    }
}

fn grid(n: usize) -> LaunchConfig {
    launch::elems(n).into()
}

fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    launch::rows(rows, threads).into()
}

impl Cuda {
    /// Opens device `ordinal` with bf16 (or fp32) precision, compiles (or loads from the
    /// cache) every kernel module for its architecture. Never panics: a missing library
    /// or device is an `Err`.
    pub fn new(ordinal: usize, bf16: bool) -> Result<Self> {
        if probe::device_count() <= ordinal {
            return Err(Error::backend("no usable CUDA device (the driver with libcuda, and libnvrtc, libcublas and libcusolver, are needed)"));
        }
        std::panic::catch_unwind(|| Self::open(ordinal, bf16))
            .map_err(|_| Error::backend("a CUDA library is missing a symbol (a CUDA 13.0 installation is needed)"))?
    }

    fn open(ordinal: usize, bf16: bool) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err("context", e))?;
        // Everything runs on one stream, in order: per-buffer read/write events (two
        // CUevents per allocation, recorded at every use) would only cost time.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (maj, min) = ctx.compute_capability().map_err(|e| dev_err("capability", e))?;
        let arch = format!("sm_{maj}{min}");
        let act_module = if bf16 { "nn_bf16" } else { "nn" };
        let (mut funcs, mut acts) = (HashMap::new(), HashMap::new());
        for m in MODULES {
            if m.name == "nn_bf16" && !bf16 {
                continue;
            }
            let bin = kernels::cubin(m, &arch)?;
            let module = ctx.load_module(Ptx::from_binary(bin)).map_err(|e| dev_err("module load", e))?;
            for &k in m.kernels {
                let f = module.load_function(k).map_err(|e| dev_err(k, e))?;
                if m.name == act_module {
                    acts.insert(k, f.clone());
                }
                if m.name != "nn_bf16" {
                    funcs.insert(k, f);
                }
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
        let a = |e| dev_err("alloc", e);
        let scratch = Scratch {
            partial: stream.alloc_zeros::<f64>(PARTS).map_err(a)?,
            total: stream.alloc_zeros::<f64>(1).map_err(a)?,
            acc_total: stream.alloc_zeros::<f64>(1).map_err(a)?,
            count: stream.alloc_zeros::<u64>(1).map_err(a)?,
            tokens: stream.alloc_zeros::<i32>(1).map_err(a)?,
            targets: stream.alloc_zeros::<i32>(1).map_err(a)?,
            groups: [
                stream.alloc_zeros::<i32>(1).map_err(a)?,
                stream.alloc_zeros::<i32>(1).map_err(a)?,
                stream.alloc_zeros::<i32>(1).map_err(a)?,
            ],
            losses: stream.alloc_zeros::<f32>(1).map_err(a)?,
            cast: [stream.alloc_zeros::<u16>(1).map_err(a)?, stream.alloc_zeros::<u16>(1).map_err(a)?],
            dw_part: stream.alloc_zeros::<f32>(1).map_err(a)?,
        };
        let ws = Mutex::new(refresh::Ws::new(&stream)?);
        let model = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(Cuda {
            ws,
            name_of_device: format!("{model} (cuda:{ordinal}, {arch})"),
            _ctx: ctx,
            stream,
            blas,
            solver,
            funcs,
            acts,
            bf16,
            maps,
            scratch: Mutex::new(scratch),
            mem: Arc::new(MemTracker::default()),
            sticky: Mutex::new(None),
        })
    }

    /// Makes the context current on the calling thread before a raw driver or library call.
    pub(super) fn bind(&self) {
        let r = self.stream.context().bind_to_thread();
        self.note("context", r);
    }

    /// The scratch, usable even after a caught panic poisoned its lock (it holds plain
    /// buffers, never a half-updated invariant).
    fn scratch(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first queued asynchronous error, left in place for `sync` to report.
    fn pending_error(&self) -> Result<()> {
        match self.sticky.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(e) => Err(Error::backend(e.msg.clone())),
            None => Ok(()),
        }
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    /// A layer kernel taking activations of this precision's type.
    fn a(&self, name: &str) -> &CudaFunction {
        &self.acts[name]
    }

    fn note<T, E: std::fmt::Debug>(&self, what: &str, r: std::result::Result<T, E>) {
        if let Err(e) = r {
            let mut s = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
            if s.is_none() {
                *s = Some(dev_err(what, e));
            }
        }
    }

    fn take_sticky(&self) -> Result<()> {
        match self.sticky.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Casts `src[off..]` (f32) into the bf16 scratch `slot`, grown if needed; false (and
    /// a sticky error) when the scratch cannot grow.
    fn cast_into(&self, slot: &mut CudaSlice<u16>, src: &CudaSlice<f32>, off: usize) -> bool {
        let n = src.len() - off;
        if slot.len() < n {
            match self.stream.alloc_zeros::<u16>(n) {
                Ok(s) => *slot = s,
                Err(e) => {
                    self.note("alloc of the bf16 cast scratch", Err::<(), _>(e));
                    return false;
                }
            }
        }
        let nn = n as u64;
        let mut l = self.stream.launch_builder(self.f("bf16_quant"));
        let view = src.slice(off..);
        l.arg(&mut *slot).arg(&view).arg(&nn);
        self.note("bf16 cast", unsafe { l.launch(grid(n)) });
        true
    }

    /// Runs one planned product (`plan::Gemm`) on buffers A, B and C through
    /// `cublasGemmStridedBatchedEx` with fp32 accumulation. Under bf16 precision every
    /// product of a step takes bf16 inputs (f32 ones, such as weights, logit gradients and
    /// the GaLore projections of f32 gradients, are cast to scratch first), as the
    /// reference's bf16 training does; projector refreshes use `gemm32` and stay fp32.
    fn gemm(&self, g: &Gemm, a: &Store, b: &Store, c: &mut Store) {
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

    /// The grouped embedding backward (`plan::token_groups`) into `dtable`.
    fn embedding_bwd_groups(&self, dtable: &mut CudaBuf, dout: &CudaBuf, groups: (Vec<i32>, Vec<i32>, Vec<i32>), c: usize) {
        let (uniq, starts, order) = groups;
        if uniq.is_empty() {
            return;
        }
        let mut sc = self.scratch();
        for (dst, ids) in sc.groups.iter_mut().zip([&uniq, &starts, &order]) {
            if let Err(e) = self.upload_ids(dst, ids) {
                return self.note::<(), _>("copy", Err(e.msg));
            }
        }
        let ci = c as i32;
        let [d_uniq, d_starts, d_order] = &sc.groups;
        let mut l = self.stream.launch_builder(self.a("embedding_bwd"));
        l.arg(dtable.data.f32_mut()).arg(&dout.data).arg(d_uniq).arg(d_starts).arg(d_order).arg(&ci);
        let cfg = launch::token_rows(uniq.len(), c).into();
        self.note("embedding_bwd", unsafe { l.launch(cfg) });
    }

    /// Σx² of b[..n] into `out` (= or +=), in a fixed order: 256 block partials, then one
    /// thread adds them.
    fn sumsq_into(&self, b: &CudaBuf, n: usize, partial: &mut CudaSlice<f64>, out: &mut CudaSlice<f64>, acc: bool) {
        let (nn, parts, acc) = (n as u64, PARTS as i32, acc as i32);
        let mut l = self.stream.launch_builder(self.f("sumsq_partial"));
        l.arg(b.data.f32()).arg(&mut *partial).arg(&nn);
        let cfg = launch::sumsq_partial().into();
        self.note("sumsq", unsafe { l.launch(cfg) });
        let mut l = self.stream.launch_builder(self.f("sum_partials"));
        l.arg(&*partial).arg(out).arg(&parts).arg(&acc);
        self.note("sumsq", unsafe { l.launch(launch::sum_partials().into()) });
    }

    /// dst[..n] = src[..n] across element types (a bf16 ⇄ f32 cast when they differ).
    fn copy_any(&self, dst: &mut Store, src: &Store, n: usize) {
        let nn = n as u64;
        match (dst, src) {
            (Store::F32(d), Store::F32(s)) => self.note("copy", self.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n))),
            (Store::Bf16(d), Store::Bf16(s)) => self.note("copy", self.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n))),
            (Store::Bf16(d), Store::F32(s)) => {
                let mut l = self.stream.launch_builder(self.f("bf16_quant"));
                l.arg(d).arg(s).arg(&nn);
                self.note("bf16 cast", unsafe { l.launch(grid(n)) });
            }
            (Store::F32(d), Store::Bf16(s)) => {
                let mut l = self.stream.launch_builder(self.f("bf16_dequant"));
                l.arg(d).arg(s).arg(&nn);
                self.note("bf16 cast", unsafe { l.launch(grid(n)) });
            }
        }
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Q = CudaQ;
    type A8 = CudaA8;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn device_name(&self) -> String {
        self.name_of_device.clone()
    }
    fn precision(&self) -> &'static str {
        if self.bf16 {
            "bf16"
        } else {
            "fp32"
        }
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
        if self.bf16 && cat == Category::Activations {
            let data = self.stream.alloc_zeros::<u16>(n.max(1)).map_err(|e| dev_err(&format!("alloc of {} MiB", (n * 2) >> 20), e))?;
            return Ok(CudaBuf { data: Store::Bf16(data), _t: Tracked::new((), n * 2, cat, &self.mem) });
        }
        self.alloc_fp32(n, cat)
    }
    fn alloc_half(&self, n: usize, cat: Category) -> Result<CudaBuf> {
        if !self.bf16 {
            return self.alloc_fp32(n, cat);
        }
        let data = self.stream.alloc_zeros::<u16>(n.max(1)).map_err(|e| dev_err(&format!("alloc of {} MiB", (n * 2) >> 20), e))?;
        Ok(CudaBuf { data: Store::Bf16(data), _t: Tracked::new((), n * 2, cat, &self.mem) })
    }
    fn alloc_fp32(&self, n: usize, cat: Category) -> Result<CudaBuf> {
        let data = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| dev_err(&format!("alloc of {} MiB", (n * 4) >> 20), e))?;
        Ok(CudaBuf { data: Store::F32(data), _t: Tracked::new((), n * 4, cat, &self.mem) })
    }
    fn len(&self, b: &CudaBuf) -> usize {
        b.data.len()
    }
    fn upload(&self, dst: &mut CudaBuf, src: &[f32]) -> Result<()> {
        let n = src.len();
        match &mut dst.data {
            Store::F32(d) => self.stream.memcpy_htod(src, &mut d.slice_mut(..n)),
            Store::Bf16(d) => {
                let h: Vec<u16> = src.iter().map(|&x| f32_to_bf16(x)).collect();
                self.stream.memcpy_htod(&h[..], &mut d.slice_mut(..n))
            }
        }
        .map_err(|e| dev_err("copy", e))
    }
    fn download(&self, src: &CudaBuf, dst: &mut [f32]) -> Result<()> {
        let n = dst.len();
        match &src.data {
            Store::F32(s) => self.stream.memcpy_dtoh(&s.slice(..n), dst).map_err(|e| dev_err("copy", e)),
            Store::Bf16(s) => {
                let mut h = vec![0u16; n];
                self.stream.memcpy_dtoh(&s.slice(..n), &mut h[..]).map_err(|e| dev_err("copy", e))?;
                for (d, &x) in dst.iter_mut().zip(&h) {
                    *d = bf16_to_f32(x);
                }
                Ok(())
            }
        }
    }
    fn fill(&self, b: &mut CudaBuf, v: f32) {
        let n = b.data.len() as u64;
        let f = if b.data.is_bf16() { self.a("fill_act") } else { self.f("fill") };
        let mut l = self.stream.launch_builder(f);
        l.arg(&mut b.data).arg(&v).arg(&n);
        self.note("fill", unsafe { l.launch(grid(n as usize)) });
    }
    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        let n = dst.data.len().min(src.data.len());
        self.copy_any(&mut dst.data, &src.data, n);
    }
    fn copy_n(&self, dst: &mut CudaBuf, src: &CudaBuf, n: usize) {
        self.copy_any(&mut dst.data, &src.data, n);
    }
    fn add(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        self.axpy(dst, 1.0, src);
    }
    fn scale(&self, b: &mut CudaBuf, s: f32) {
        let n = b.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("scale"));
        l.arg(b.data.f32_mut()).arg(&s).arg(&n);
        self.note("scale", unsafe { l.launch(grid(n as usize)) });
    }
    fn sumsq(&self, b: &CudaBuf, n: usize) -> f64 {
        let mut sc = self.scratch();
        let Scratch { partial, total, .. } = &mut *sc;
        self.sumsq_into(b, n, partial, total, false);
        let mut h = [0f64; 1];
        let r = self.stream.memcpy_dtoh(&*total, &mut h[..]);
        self.note("copy", r);
        h[0]
    }
    fn sumsq_acc(&self, b: &CudaBuf, n: usize) {
        let mut sc = self.scratch();
        let Scratch { partial, acc_total, .. } = &mut *sc;
        self.sumsq_into(b, n, partial, acc_total, true);
    }
    fn take_sumsq(&self) -> f64 {
        let mut sc = self.scratch();
        let mut h = [0f64; 1];
        let r = self.stream.memcpy_dtoh(&sc.acc_total, &mut h[..]);
        self.note("copy", r);
        let r = self.stream.memset_zeros(&mut sc.acc_total);
        self.note("memset", r);
        h[0]
    }

    fn matmul(&self, out: &mut CudaBuf, inp: &CudaBuf, w: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm(&plan::matmul(n, ic, oc, acc), &inp.data, &w.data, &mut out.data);
    }
    fn matmul_dinp(&self, dinp: &mut CudaBuf, dout: &CudaBuf, w: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm(&plan::matmul_dinp(n, ic, oc, acc), &dout.data, &w.data, &mut dinp.data);
    }
    fn matmul_dw(&self, dw: &mut CudaBuf, dout: &CudaBuf, inp: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm(&plan::matmul_dw(n, ic, oc, acc), &dout.data, &inp.data, &mut dw.data);
    }
    fn matmul_dw_rows(&self, dw: &mut CudaBuf, dout: &CudaBuf, inp: &CudaBuf, n: usize, ic: usize, oc: usize, r0: usize, rows: usize) {
        self.gemm(&plan::matmul_dw_rows(n, ic, oc, r0, rows), &dout.data, &inp.data, &mut dw.data);
    }

    fn embedding(&self, out: &mut CudaBuf, tokens: &[i32], table: &CudaBuf, c: usize) {
        let mut sc = self.scratch();
        if let Err(e) = self.upload_ids(&mut sc.tokens, tokens) {
            self.note::<(), _>("copy", Err(e.msg));
            return;
        }
        let ci = c as i32;
        let name = if table.data.is_bf16() { "embedding_w16" } else { "embedding" };
        let mut l = self.stream.launch_builder(self.a(name));
        l.arg(&mut out.data).arg(&sc.tokens).arg(&table.data).arg(&ci);
        let cfg = launch::token_rows(tokens.len(), c).into();
        self.note("embedding", unsafe { l.launch(cfg) });
    }
    fn embedding_bwd(&self, dtable: &mut CudaBuf, dout: &CudaBuf, tokens: &[i32], c: usize) {
        self.embedding_bwd_groups(dtable, dout, plan::token_groups(tokens), c);
    }
    fn embedding_bwd_rows(&self, dchunk: &mut CudaBuf, dout: &CudaBuf, tokens: &[i32], c: usize, r0: usize, rows: usize) {
        self.embedding_bwd_groups(dchunk, dout, plan::token_groups_in(tokens, r0, rows), c);
    }
    fn rmsnorm(&self, out: &mut CudaBuf, rstd: &mut CudaBuf, x: &CudaBuf, w: &CudaBuf, n: usize, c: usize, eps: f32) {
        let ci = c as i32;
        let mut l = self.stream.launch_builder(self.a("rmsnorm"));
        l.arg(&mut out.data).arg(rstd.data.f32_mut()).arg(&x.data).arg(w.data.f32()).arg(&ci).arg(&eps);
        self.note("rmsnorm", unsafe { l.launch(rows_cfg(n, THREADS)) });
    }
    fn rmsnorm_bwd(&self, dx: &mut CudaBuf, dw: &mut CudaBuf, dout: &CudaBuf, x: &CudaBuf, w: &CudaBuf, rstd: &CudaBuf, n: usize, c: usize) {
        let (ci, ni) = (c as i32, n as i32);
        let mut l = self.stream.launch_builder(self.a("rmsnorm_bwd_dx"));
        l.arg(&mut dx.data).arg(&dout.data).arg(&x.data).arg(w.data.f32()).arg(rstd.data.f32()).arg(&ci);
        self.note("rmsnorm_bwd", unsafe { l.launch(rows_cfg(n, THREADS)) });
        // dw in two stages: per-chunk partial sums, then their ordered sum per column
        let chunks = n.div_ceil(DW_CHUNK);
        let mut sc = self.scratch();
        if sc.dw_part.len() < chunks * c {
            match self.stream.alloc_zeros::<f32>(chunks * c) {
                Ok(p) => sc.dw_part = p,
                Err(e) => return self.note("alloc", Err::<(), _>(e)),
            }
        }
        let (chunk, nch) = (DW_CHUNK as i32, chunks as i32);
        let mut l = self.stream.launch_builder(self.a("rmsnorm_bwd_dw_part"));
        l.arg(&mut sc.dw_part).arg(&dout.data).arg(&x.data).arg(rstd.data.f32()).arg(&ni).arg(&ci).arg(&chunk);
        let cfg = launch::rmsnorm_dw_part(c, chunks).into();
        self.note("rmsnorm_bwd", unsafe { l.launch(cfg) });
        let mut l = self.stream.launch_builder(self.a("rmsnorm_bwd_dw_sum"));
        l.arg(dw.data.f32_mut()).arg(&sc.dw_part).arg(&nch).arg(&ci);
        self.note("rmsnorm_bwd", unsafe { l.launch(grid(c)) });
    }
    fn rope(&self, x: &mut CudaBuf, table: &CudaBuf, b: usize, t: usize, heads: usize, hd: usize, inverse: bool) {
        let (ti, hi, hdi, inv) = (t as i32, heads as i32, hd as i32, inverse as i32);
        let mut l = self.stream.launch_builder(self.a("rope"));
        l.arg(&mut x.data).arg(table.data.f32()).arg(&ti).arg(&hi).arg(&hdi).arg(&inv);
        let cfg = launch::rope(b, t, heads, hd).into();
        self.note("rope", unsafe { l.launch(cfg) });
    }
    fn attention(&self, out: &mut CudaBuf, att: &mut CudaBuf, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, d: AttnDims) {
        for g in plan::attn_scores(d) {
            self.gemm(&g, &q.data, &k.data, &mut att.data);
        }
        let ti = d.t as i32;
        let mut l = self.stream.launch_builder(self.a("causal_softmax"));
        l.arg(&mut att.data).arg(&ti);
        self.note("softmax", unsafe { l.launch(rows_cfg(d.b * d.h * d.t, THREADS)) });
        for g in plan::attn_values(d) {
            self.gemm(&g, &att.data, &v.data, &mut out.data);
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
        for g in plan::attn_dscores(d) {
            self.gemm(&g, &dout.data, &v.data, &mut scratch.data);
        }
        for g in plan::attn_dv(d) {
            self.gemm(&g, &att.data, &dout.data, &mut dv.data);
        }
        let (ti, scale) = (d.t as i32, 1.0 / (d.hd as f32).sqrt());
        let mut l = self.stream.launch_builder(self.a("causal_softmax_bwd"));
        l.arg(&mut scratch.data).arg(&att.data).arg(&ti).arg(&scale);
        self.note("softmax_bwd", unsafe { l.launch(rows_cfg(d.b * d.h * d.t, THREADS)) });
        for g in plan::attn_dq(d) {
            self.gemm(&g, &scratch.data, &k.data, &mut dq.data);
        }
        for g in plan::attn_dk(d) {
            self.gemm(&g, &scratch.data, &q.data, &mut dk.data);
        }
    }
    fn swiglu(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf) {
        let n = out.data.len() as u64;
        let mut l = self.stream.launch_builder(self.a("swiglu"));
        l.arg(&mut out.data).arg(&gate.data).arg(&up.data).arg(&n);
        self.note("swiglu", unsafe { l.launch(grid(n as usize)) });
    }
    fn swiglu_bwd(&self, dgate: &mut CudaBuf, dup: &mut CudaBuf, dout: &CudaBuf, gate: &CudaBuf, up: &CudaBuf) {
        let n = dgate.data.len() as u64;
        let mut l = self.stream.launch_builder(self.a("swiglu_bwd"));
        l.arg(&mut dgate.data).arg(&mut dup.data).arg(&dout.data).arg(&gate.data).arg(&up.data).arg(&n);
        self.note("swiglu_bwd", unsafe { l.launch(grid(n as usize)) });
    }
    fn cross_entropy(&self, logits: &mut CudaBuf, targets: &[i32], losses: &mut [f32], n: usize, v: usize, grad_scale: Option<f32>) -> Result<()> {
        let mut sc = self.scratch();
        let Scratch { targets: dt, losses: dl, .. } = &mut *sc;
        self.upload_ids(dt, &targets[..n])?;
        if dl.len() < n {
            *dl = self.stream.alloc_zeros::<f32>(n).map_err(|e| dev_err("alloc", e))?;
        }
        let (vi, g, s) = (v as i32, grad_scale.is_some() as i32, grad_scale.unwrap_or(0.0));
        let mut l = self.stream.launch_builder(self.f("cross_entropy"));
        l.arg(logits.data.f32_mut()).arg(&*dt).arg(&mut *dl).arg(&vi).arg(&g).arg(&s);
        unsafe { l.launch(rows_cfg(n, THREADS)) }.map_err(|e| dev_err("cross_entropy", e))?;
        self.stream.memcpy_dtoh(&dl.slice(..n), &mut losses[..n]).map_err(|e| dev_err("copy", e))?;
        self.take_sticky()
    }
    fn adamw(&self, p: &mut CudaBuf, g: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: AdamHp) {
        let (step, rbc2, decay) = hp.torch_factors();
        let n = m.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("adamw"));
        l.arg(p.data.f32_mut()).arg(g.data.f32()).arg(m.data.f32_mut()).arg(v.data.f32_mut());
        l.arg(&step).arg(&rbc2).arg(&decay).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&n);
        self.note("adamw", unsafe { l.launch(grid(n as usize)) });
    }

    fn sanitize(&self, b: &mut CudaBuf, n: usize) {
        let mut sc = self.scratch();
        let nn = n as u64;
        let mut l = self.stream.launch_builder(self.f("sanitize"));
        l.arg(b.data.f32_mut()).arg(&mut sc.count).arg(&nn);
        self.note("sanitize", unsafe { l.launch(grid(n)) });
    }
    fn take_nonfinite(&self) -> u64 {
        let mut sc = self.scratch();
        let k = self.read_count(&sc.count);
        let r = self.stream.memset_zeros(&mut sc.count);
        self.note("memset", r);
        k
    }
    fn axpy(&self, dst: &mut CudaBuf, alpha: f32, src: &CudaBuf) {
        let n = dst.data.len().min(src.data.len()) as u64;
        let mut l = self.stream.launch_builder(self.f("axpy"));
        l.arg(dst.data.f32_mut()).arg(&alpha).arg(src.data.f32()).arg(&n);
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
            l.arg(&mut q.codes).arg(src.data.f32()).arg(&n);
            self.note("bf16_quant", unsafe { l.launch(grid(q.numel)) });
            return;
        }
        self.requant(q, src.data.f32(), 1.0, false, range, None);
    }
    fn q_dequantize(&self, dst: &mut CudaBuf, q: &CudaQ) {
        let n = q.numel as u64;
        match (&mut dst.data, q.bits) {
            (Store::F32(d), 16) => {
                let mut l = self.stream.launch_builder(self.f("bf16_dequant"));
                l.arg(d).arg(&q.codes).arg(&n);
                self.note("bf16_dequant", unsafe { l.launch(grid(q.numel)) });
            }
            (Store::Bf16(d), 16) => {
                // bf16 storage is already the GEMM operand: a byte copy
                self.bind();
                let (dp, _g1) = d.device_ptr_mut(&self.stream);
                let (sp, _g2) = q.codes.device_ptr(&self.stream);
                let r = unsafe { cudarc::driver::result::memcpy_dtod_async(dp, sp, q.numel * 2, self.stream.cu_stream()) };
                self.note("copy", r);
            }
            (data, _) => {
                let (bits, group) = (q.bits as i32, q.group as i32);
                let name = if data.is_bf16() { "q_dequant_bf16" } else { "q_dequant" };
                let mut l = self.stream.launch_builder(self.f(name));
                l.arg(data).arg(&q.codes).arg(&q.scale).arg(&q.zero).arg(&bits).arg(&group).arg(&n);
                self.note(name, unsafe { l.launch(grid(q.numel)) });
            }
        }
    }
    fn q_update(&self, q: &mut CudaQ, delta: &CudaBuf, decay: f32, range: Range, sr: Option<u64>) {
        self.requant(q, delta.data.f32(), decay, true, range, sr);
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
    fn a8_step(&self, p: &mut CudaBuf, g: &CudaBuf, st: &mut CudaA8, hp: BnbHp) {
        let n = st.n;
        self.a8_step_range(p, g, st, 0, n, hp);
    }
    fn a8_step_range(&self, p: &mut CudaBuf, g: &CudaBuf, st: &mut CudaA8, off: usize, len: usize, hp: BnbHp) {
        let (step_size, eps2) = hp.bnb_factors();
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let bs = st.block;
        if off % bs != 0 || off + len > st.n {
            return self.note("adam8", Err::<(), _>(format!("range {off}+{len} is not block-aligned")));
        }
        let mut sc = self.scratch();
        let (bsi, n) = (bs as i32, len as u64);
        let name = if p.data.is_bf16() { "adam8_w16" } else { "adam8" };
        let (pp, _gp) = p.data.ptr_mut(&self.stream, off);
        let (mut cm, mut cv) = (st.m.slice_mut(off..off + len), st.v.slice_mut(off..off + len));
        let blocks = (off / bs)..(off + len).div_ceil(bs);
        let (mut am, mut av) = (st.absm.slice_mut(blocks.clone()), st.absv.slice_mut(blocks));
        let mut l = self.stream.launch_builder(self.f(name));
        l.arg(&pp).arg(g.data.f32()).arg(&mut cm).arg(&mut cv).arg(&mut am).arg(&mut av);
        l.arg(&self.maps.0).arg(&self.maps.1).arg(&step_size).arg(&eps2).arg(&hp.beta1).arg(&hp.beta2);
        l.arg(&hp.weight_decay).arg(&decay).arg(&bsi).arg(&mut sc.count).arg(&n);
        let cfg = launch::adam8(len, bs).into();
        self.note("adam8", unsafe { l.launch(cfg) });
    }
    fn bnb32_step(&self, p: &mut CudaBuf, g: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: BnbHp) {
        let (step_size, eps2) = hp.bnb_factors();
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let mut sc = self.scratch();
        let n = m.data.len() as u64;
        let name = if p.data.is_bf16() { "bnb32_w16" } else { "bnb32" };
        let mut l = self.stream.launch_builder(self.f(name));
        l.arg(&mut p.data).arg(g.data.f32()).arg(m.data.f32_mut()).arg(v.data.f32_mut()).arg(&step_size).arg(&eps2);
        l.arg(&hp.beta1).arg(&hp.beta2).arg(&hp.weight_decay).arg(&decay).arg(&mut sc.count).arg(&n);
        self.note("bnb32", unsafe { l.launch(grid(n as usize)) });
    }
    fn galore_adam(&self, buf: &mut CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: AdamHp) {
        let s = hp.galore_step();
        let n = m.data.len() as u64;
        let mut l = self.stream.launch_builder(self.f("galore_adam"));
        l.arg(buf.data.f32_mut()).arg(m.data.f32_mut()).arg(v.data.f32_mut()).arg(&s).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&n);
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
        self.refresh(g, rows, cols, rank, right, method, prev, seed, out)
    }

    fn save_buf(&self, b: &CudaBuf, n: usize, w: &mut Writer) {
        let mut h = vec![0.0f32; n];
        let r = self.download(b, &mut h);
        self.note("copy", r.map_err(|e| e.msg));
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
        // a host tensor of the same shape receives the checkpoint (nothing to download)
        let mut h = crate::quant::QTensor::new(q.numel, q.bits, q.group)?;
        r.qtensor_into(&mut h, what)?;
        let c = |e| dev_err("copy", e);
        self.stream.memcpy_htod(&h.codes, &mut q.codes).map_err(c)?;
        if !h.scale.is_empty() {
            self.stream.memcpy_htod(&h.scale, &mut q.scale.slice_mut(..h.scale.len())).map_err(c)?;
            self.stream.memcpy_htod(&h.zero, &mut q.zero.slice_mut(..h.zero.len())).map_err(c)?;
        }
        Ok(())
    }
    fn save_a8(&self, s: &CudaA8, w: &mut Writer) {
        w.state8(&self.a8_host(s));
    }
    fn load_a8(&self, s: &mut CudaA8, r: &mut Reader, what: &str) -> Result<()> {
        let mut h = crate::quant::adam8::State8::new(s.n, s.block);
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

    /// GEMM throughput of this precision's products (bf16 inputs under bf16).
    fn gemm_gflops(&self, m: usize, n: usize, k: usize, iters: usize) -> f64 {
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

impl Cuda {
    fn requant(&self, q: &mut CudaQ, src: &CudaSlice<f32>, decay: f32, update: bool, range: Range, sr: Option<u64>) {
        let (upd, bits, wz, use_sr, key) =
            (update as i32, q.bits as i32, (range == Range::WithZero) as i32, sr.is_some() as i32, sr.unwrap_or(0));
        let mut l = self.stream.launch_builder(self.f("q_requant"));
        l.arg(&mut q.codes).arg(&mut q.scale).arg(&mut q.zero).arg(src).arg(src).arg(&decay).arg(&upd);
        let group = q.group as i32;
        l.arg(&bits).arg(&wz).arg(&use_sr).arg(&key).arg(&group);
        let cfg = launch::requant(q.numel, q.group).into();
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
