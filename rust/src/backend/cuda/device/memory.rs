//! Device buffers (`Store`: f32, or bf16 activations) and the `Memory` trait: allocation,
//! transfers, copies and casts, element-wise ops (nn.cu) and the Σx² reduction (optim.cu).

use super::{dev_err, Cuda, Scratch};
use crate::backend::cuda::launch::{self, PARTS};
use crate::backend::{Category, MemTracker, Memory, Runner, Tracked};
use crate::error::Result;
use crate::quant::{bf16_to_f32, f32_to_bf16};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchArgs, PushKernelArg, SyncOnDrop};

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
    pub(super) fn dtype(&self) -> blas_sys::cudaDataType {
        if self.is_bf16() {
            blas_sys::cudaDataType::CUDA_R_16BF
        } else {
            blas_sys::cudaDataType::CUDA_R_32F
        }
    }
    /// Device address of element `off` and the guard that must outlive its use.
    pub(super) fn ptr<'a>(&'a self, stream: &'a CudaStream, off: usize) -> (u64, SyncOnDrop<'a>) {
        let (p, g) = match self {
            Store::F32(x) => x.device_ptr(stream),
            Store::Bf16(x) => x.device_ptr(stream),
        };
        (p + (off * self.bytes_per()) as u64, g)
    }
    pub(super) fn ptr_mut<'a>(&'a mut self, stream: &'a CudaStream, off: usize) -> (u64, SyncOnDrop<'a>) {
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

impl Cuda {
    /// Σx² of b[..n] into `out` (= or +=), in a fixed order: 256 block partials, then one
    /// thread adds them.
    fn sumsq_into(&self, b: &CudaBuf, n: usize, partial: &mut CudaSlice<f64>, out: &mut CudaSlice<f64>, acc: bool) {
        let (nn, parts, acc) = (n as u64, PARTS as i32, acc as i32);
        self.note("sumsq", launch!(self, self.f("sumsq_partial"), launch::sumsq_partial(); b.data.f32(), &mut *partial, &nn));
        self.note("sumsq", launch!(self, self.f("sum_partials"), launch::sum_partials(); &*partial, out, &parts, &acc));
    }

    /// dst[..n] = src[..n] across element types (a bf16 ⇄ f32 cast when they differ).
    fn copy_any(&self, dst: &mut Store, src: &Store, n: usize) {
        let nn = n as u64;
        match (dst, src) {
            (Store::F32(d), Store::F32(s)) => self.note("copy", self.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n))),
            (Store::Bf16(d), Store::Bf16(s)) => self.note("copy", self.stream.memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n))),
            (Store::Bf16(d), Store::F32(s)) => {
                self.note("bf16 cast", launch!(self, self.f("bf16_quant"), launch::elems(n); d, s, &nn));
            }
            (Store::F32(d), Store::Bf16(s)) => {
                self.note("bf16 cast", launch!(self, self.f("bf16_dequant"), launch::elems(n); d, s, &nn));
            }
        }
    }}

impl Cuda {
    /// Device memory the driver can still hand out (`cuMemGetInfo`), or None when it does
    /// not answer (then nothing is refused).
    pub fn device_free_bytes(&self) -> Option<u64> {
        // the driver answers for the context current on this thread
        self.stream.context().bind_to_thread().ok()?;
        cudarc::driver::result::mem_get_info().ok().map(|(free, _)| free as u64)
    }
}

impl Memory for Cuda {
    type Buf = CudaBuf;

    fn name(&self) -> &'static str {
        "cuda"
    }
    fn device_name(&self) -> String {
        self.name_of_device.clone()
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

    fn device_bytes_in_use(&self) -> Option<u64> {
        let _ = self.stream.synchronize();
        cudarc::driver::result::mem_get_info().ok().map(|(free, total)| (total - free) as u64)
    }
    fn precision(&self) -> &'static str {
        if self.bf16 {
            "bf16"
        } else {
            "fp32"
        }
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
        self.note("fill", launch!(self, f, launch::elems(n as usize); &mut b.data, &v, &n));
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
    fn axpy(&self, dst: &mut CudaBuf, alpha: f32, src: &CudaBuf) {
        let n = dst.data.len().min(src.data.len()) as u64;
        self.note("axpy", launch!(self, self.f("axpy"), launch::elems(n as usize); dst.data.f32_mut(), &alpha, src.data.f32(), &n));
    }
    fn scale(&self, b: &mut CudaBuf, s: f32) {
        let n = b.data.len() as u64;
        self.note("scale", launch!(self, self.f("scale"), launch::elems(n as usize); b.data.f32_mut(), &s, &n));
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
}
