//! Buffers: where they live and what they hold, their transfers to and from the host,
//! element-wise operations and deterministic reductions. The base of the seam: every
//! other concern's trait works on `Memory::Buf`.

use crate::error::Result;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a backend's host-side work runs: its own rayon pool, or the caller's thread.
#[derive(Clone, Default)]
pub struct Runner(pub Option<Arc<rayon::ThreadPool>>);

impl Runner {
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.0 {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

/// What a buffer is for; the engine reports memory by these categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Weights = 0,
    /// LoRA adapters (lora, qlora): the trained low-rank matrices.
    Adapters = 1,
    Grads = 2,
    OptimizerState = 3,
    Projector = 4,
    Activations = 5,
}

pub const CATEGORIES: [Category; 6] = [
    Category::Weights,
    Category::Adapters,
    Category::Grads,
    Category::OptimizerState,
    Category::Projector,
    Category::Activations,
];

/// Bytes held per category (engine-tracked, not measured from the OS).
#[derive(Default, Debug)]
pub struct MemTracker {
    bytes: [AtomicU64; 6],
}

impl MemTracker {
    pub fn add(&self, cat: Category, bytes: usize) {
        self.bytes[cat as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn sub(&self, cat: Category, bytes: usize) {
        self.bytes[cat as usize].fetch_sub(bytes as u64, Ordering::Relaxed);
    }
    pub fn get(&self, cat: Category) -> u64 {
        self.bytes[cat as usize].load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        CATEGORIES.iter().map(|&c| self.get(c)).sum()
    }
}

/// Storage of any kind (host or device) whose bytes are counted while it lives.
pub struct Tracked<T> {
    pub inner: T,
    bytes: usize,
    cat: Category,
    tracker: Arc<MemTracker>,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, bytes: usize, cat: Category, tracker: &Arc<MemTracker>) -> Self {
        tracker.add(cat, bytes);
        Tracked { inner, bytes, cat, tracker: tracker.clone() }
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        self.tracker.sub(self.cat, self.bytes);
    }
}

impl<T> std::ops::Deref for Tracked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}
impl<T> std::ops::DerefMut for Tracked<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// The device and its buffers. All buffers hold `len` logical f32 values.
pub trait Memory: Send + Sync + 'static {
    type Buf: Send;

    fn name(&self) -> &'static str;
    /// The hardware in words (the GPU model and architecture on CUDA).
    fn device_name(&self) -> String {
        self.name().to_string()
    }
    fn mem(&self) -> &MemTracker;
    /// Runs closures on the backend's worker threads (a rayon pool on the CPU).
    fn runner(&self) -> Runner;
    /// Waits for queued work (a no-op on the CPU).
    fn sync(&self) -> Result<()>;
    /// Device bytes in use right now as the driver reports them (None on the CPU).
    fn device_bytes_in_use(&self) -> Option<u64> {
        None
    }

    /// `fp32`, or `bf16` when activation buffers hold bf16 and GEMMs take bf16 inputs
    /// with fp32 accumulation.
    fn precision(&self) -> &'static str {
        "fp32"
    }
    /// A zero-filled buffer of `n` values, counted under `cat`. Under bf16 precision a
    /// backend stores `Category::Activations` buffers in bf16; every other category in f32.
    fn alloc(&self, n: usize, cat: Category) -> Result<Self::Buf>;
    /// Weights that only `a8_step` / `bnb32_step` update and only GEMMs and `embedding`
    /// read (the embedding and lm_head under an 8-bit optimizer): stored in bf16 under bf16
    /// precision, as the reference keeps them, with each update rounded to nearest even;
    /// f32 otherwise.
    fn alloc_half(&self, n: usize, cat: Category) -> Result<Self::Buf> {
        self.alloc_fp32(n, cat)
    }
    /// A buffer that stays f32 under every precision (norm statistics, RoPE tables, logits).
    fn alloc_fp32(&self, n: usize, cat: Category) -> Result<Self::Buf> {
        self.alloc(n, cat)
    }
    fn len(&self, b: &Self::Buf) -> usize;
    /// dst[..src.len()] = src
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    /// dst = src[..dst.len()]
    fn download(&self, src: &Self::Buf, dst: &mut [f32]) -> Result<()>;
    /// The first `n` values on the host (checkpoints): borrowed where the buffer already
    /// lives there, downloaded otherwise.
    fn to_host<'a>(&self, b: &'a Self::Buf, n: usize) -> Result<Cow<'a, [f32]>> {
        let mut h = vec![0.0f32; n];
        self.download(b, &mut h)?;
        Ok(Cow::Owned(h))
    }
    /// Fills the first `n` values from the host (checkpoints): in place where the buffer
    /// lives there, through an upload otherwise.
    fn from_host(&self, b: &mut Self::Buf, n: usize, fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
        let mut h = vec![0.0f32; n];
        fill(&mut h)?;
        self.upload(b, &h)
    }
    fn fill(&self, b: &mut Self::Buf, v: f32);
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// dst[..n] = src[..n]
    fn copy_n(&self, dst: &mut Self::Buf, src: &Self::Buf, n: usize);
    /// dst += src
    fn add(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// dst += alpha · src
    fn axpy(&self, dst: &mut Self::Buf, alpha: f32, src: &Self::Buf);
    fn scale(&self, b: &mut Self::Buf, s: f32);
    /// Σ x² over the first `n` values in f64, reduced in a fixed order (deterministic
    /// for any thread count). Waits for the device; see `sumsq_acc` for the step's norm.
    fn sumsq(&self, b: &Self::Buf, n: usize) -> f64;
    /// Adds Σ x² over the first `n` values to a running total that `take_sumsq` returns:
    /// the global gradient norm costs one device sync per step, not one per tensor.
    fn sumsq_acc(&self, b: &Self::Buf, n: usize);
    /// The running total of `sumsq_acc` since the last call, then reset to 0.
    fn take_sumsq(&self) -> f64;
}
