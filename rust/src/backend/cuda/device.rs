//! The CUDA `Backend`: device buffers on one stream, NVRTC kernels (`kernels.rs`),
//! cuBLAS `GemmEx` for every product, cuSOLVER for projector refreshes.
//!
//! This file holds the context: module loading, the sticky asynchronous error, the
//! reusable scratch and the one launch helper (`launch!`). The trait implementations
//! follow `rust/kernels/*.cu`, one file per concern: `memory.rs` (buffers), `gemm.rs`
//! (cuBLAS products), `layers.rs` (nn.cu), `optim.rs` (optim.cu), `quant.rs` (quant.cu, nf4.cu)
//! and `refresh.rs` (linalg.cu with cuSOLVER); launch shapes are data in `../launch.rs`.
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
//! emulation of the kernels in `rust/tests/kernel_emu/`.

use super::kernels::{self, MODULES};
use super::launch::{Launch, PARTS};
use super::probe;
use crate::backend::MemTracker;
use crate::error::{Error, Result};
use crate::quant::adam8;
use cudarc::cublas::CudaBlas;
use cudarc::cusolver::DnHandle;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Queues one kernel on the stream: `launch!(self, kernel, shape; args…)` pushes the
/// arguments in the order of the kernel's parameters, launches it with `shape` (a
/// `launch::Launch`) and evaluates to the launch's result, for `note` or `?`. The
/// arguments must match the kernel's parameters in number, order and type; the host
/// emulation (`rust/tests/kernel_emu/`) runs every kernel with such argument lists.
macro_rules! launch {
    ($cuda:expr, $kernel:expr, $shape:expr; $($arg:expr),+ $(,)?) => {{
        let mut l = $cuda.stream.launch_builder($kernel);
        $(cudarc::driver::PushKernelArg::arg(&mut l, $arg);)+
        let cfg = cudarc::driver::LaunchConfig::from($shape);
        unsafe { l.launch(cfg) }.map(|_| ())
    }};
}

mod dist;
mod gemm;
mod layers;
mod memory;
mod optim;
mod quant;
mod refresh;

fn dev_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::backend(format!("CUDA {what}: {e:?}"))
}

/// Grows scratch `x` to at least `n` elements (a fresh zeroed buffer; the old contents are
/// dropped), or leaves it as it is; the caller words and reports the failure.
fn grow<T: DeviceRepr + ValidAsZeroBits>(s: &Arc<CudaStream>, x: &mut CudaSlice<T>, n: usize) -> std::result::Result<(), DriverError> {
    if x.len() < n {
        *x = s.alloc_zeros::<T>(n)?;
    }
    Ok(())
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
    /// The NF4 levels and bnb's dynamic map that `nf4_dequant` reads (`nf4::kernel_tables`).
    nf4_tables: CudaSlice<f32>,
    scratch: Mutex<Scratch>,
    ws: Mutex<refresh::Ws>,
    mem: Arc<MemTracker>,
    /// First asynchronous error, reported by the next call that can return one.
    sticky: Mutex<Option<Error>>,
    /// How gradients cross the ranks of a data-parallel job (NCCL or host staging),
    /// decided at the first sum (`dist.rs`).
    link: Mutex<Option<crate::dist::nccl::Link>>,
    pub name_of_device: String,
}

impl From<Launch> for LaunchConfig {
    fn from(l: Launch) -> LaunchConfig {
        let d = |x: [u32; 3]| (x[0], x[1], x[2]);
        LaunchConfig { grid_dim: d(l.grid), block_dim: d(l.block), shared_mem_bytes: l.shared }
    }
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
        let nf4_tables = stream.clone_htod(&crate::quant::nf4::kernel_tables()[..]).map_err(|e| dev_err("copy", e))?;
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
            nf4_tables,
            scratch: Mutex::new(scratch),
            mem: Arc::new(MemTracker::default()),
            sticky: Mutex::new(None),
            link: Mutex::new(None),
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

    fn upload_ids(&self, dst: &mut CudaSlice<i32>, ids: &[i32]) -> Result<()> {
        grow(&self.stream, dst, ids.len()).map_err(|e| dev_err("alloc", e))?;
        self.stream.memcpy_htod(ids, &mut dst.slice_mut(..ids.len())).map_err(|e| dev_err("copy", e))
    }

    fn read_count(&self, count: &CudaSlice<u64>) -> u64 {
        let mut h = [0u64; 1];
        let r = self.stream.memcpy_dtoh(count, &mut h[..]);
        self.note("copy", r);
        h[0]
    }
}
