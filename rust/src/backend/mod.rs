//! The backend seam. Model and optimizer code call these operations on opaque buffers;
//! a backend decides where buffers live (host memory, device memory), which dtype they
//! hold internally (f32 on the CPU; bf16 activations on a GPU) and how work is scheduled
//! (rayon on the CPU; an asynchronous stream on a GPU, synchronised by `sync`).
//!
//! Shapes are passed explicitly, llm.c style: `n` rows of activations (batch × seq),
//! `c` channels, and matrices stored row-major as (out_features, in_features) like
//! `nn.Linear.weight`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use crate::adam::AdamHp;
pub use crate::host::linalg::Refresh;
use crate::error::Result;
use crate::quant::Range;
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
    Grads = 1,
    OptimizerState = 2,
    Projector = 3,
    Activations = 4,
}

pub const CATEGORIES: [Category; 5] = [
    Category::Weights,
    Category::Grads,
    Category::OptimizerState,
    Category::Projector,
    Category::Activations,
];

/// Bytes held per category (engine-tracked, not measured from the OS).
#[derive(Default, Debug)]
pub struct MemTracker {
    bytes: [AtomicU64; 5],
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

/// Shape of one attention call: `b` sequences of `t` tokens, `h` query heads sharing
/// `kvh` key/value heads of width `hd`. q is (b, t, h, hd); k, v are (b, t, kvh, hd);
/// the probabilities `att` are (b, h, t, t).
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kvh: usize,
    pub hd: usize,
}

/// Operations every backend provides. All buffers hold `len` logical f32 values.
pub trait Backend: Send + Sync + 'static {
    type Buf: Send;
    /// Quantized storage (INT8/INT4 codes with group scale and zero, or bf16).
    type Q: Send;
    /// Block-wise 8-bit Adam state.
    type A8: Send;

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
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()>;
    fn download(&self, src: &Self::Buf, dst: &mut [f32]) -> Result<()>;
    fn fill(&self, b: &mut Self::Buf, v: f32);
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// dst += src
    fn add(&self, dst: &mut Self::Buf, src: &Self::Buf);
    fn scale(&self, b: &mut Self::Buf, s: f32);
    /// Σ x² over the first `n` values in f64, reduced in a fixed order (deterministic
    /// for any thread count). Waits for the device; see `sumsq_acc` for the step's norm.
    fn sumsq(&self, b: &Self::Buf, n: usize) -> f64;
    /// Adds Σ x² over the first `n` values to a running total that `take_sumsq` returns:
    /// the global gradient norm costs one device sync per step, not one per tensor.
    fn sumsq_acc(&self, b: &Self::Buf, n: usize);
    /// The running total of `sumsq_acc` since the last call, then reset to 0.
    fn take_sumsq(&self) -> f64;
    /// dst[..n] = src[..n]
    fn copy_n(&self, dst: &mut Self::Buf, src: &Self::Buf, n: usize);

    /// out[n, oc] (+)= inp[n, ic] · w[oc, ic]ᵀ
    fn matmul(&self, out: &mut Self::Buf, inp: &Self::Buf, w: &Self::Buf, n: usize, ic: usize, oc: usize, acc: bool);
    /// dinp[n, ic] (+)= dout[n, oc] · w[oc, ic]
    fn matmul_dinp(&self, dinp: &mut Self::Buf, dout: &Self::Buf, w: &Self::Buf, n: usize, ic: usize, oc: usize, acc: bool);
    /// dw[oc, ic] (+)= dout[n, oc]ᵀ · inp[n, ic]
    fn matmul_dw(&self, dw: &mut Self::Buf, dout: &Self::Buf, inp: &Self::Buf, n: usize, ic: usize, oc: usize, acc: bool);

    /// out[i, :] = table[tokens[i], :]
    fn embedding(&self, out: &mut Self::Buf, tokens: &[i32], table: &Self::Buf, c: usize);
    /// dtable[tokens[i], :] += dout[i, :]
    fn embedding_bwd(&self, dtable: &mut Self::Buf, dout: &Self::Buf, tokens: &[i32], c: usize);
    /// out = w ⊙ x · rsqrt(mean(x²) + eps) per row; rstd keeps the rsqrt for backward.
    fn rmsnorm(&self, out: &mut Self::Buf, rstd: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, n: usize, c: usize, eps: f32);
    /// dx += ∂/∂x, dw += ∂/∂w
    fn rmsnorm_bwd(&self, dx: &mut Self::Buf, dw: &mut Self::Buf, dout: &Self::Buf, x: &Self::Buf, w: &Self::Buf, rstd: &Self::Buf, n: usize, c: usize);
    /// Rotary embedding in place on (b, t, heads, hd) using the (t, hd/2) cos/sin table;
    /// `inverse` applies the transpose rotation (the backward).
    fn rope(&self, x: &mut Self::Buf, table: &Self::Buf, b: usize, t: usize, heads: usize, hd: usize, inverse: bool);
    fn attention(&self, out: &mut Self::Buf, att: &mut Self::Buf, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, d: AttnDims);
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        scratch: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        att: &Self::Buf,
        d: AttnDims,
    );
    /// out = silu(gate) ⊙ up
    fn swiglu(&self, out: &mut Self::Buf, gate: &Self::Buf, up: &Self::Buf);
    fn swiglu_bwd(&self, dgate: &mut Self::Buf, dup: &mut Self::Buf, dout: &Self::Buf, gate: &Self::Buf, up: &Self::Buf);
    /// Softmax cross-entropy of `n` rows of `v` logits against `targets`. Writes the
    /// per-row loss into `losses` (host) and, when `grad_scale` is given, overwrites the
    /// logits with `grad_scale · (softmax − onehot)` (llm.c's fused classifier).
    fn cross_entropy(&self, logits: &mut Self::Buf, targets: &[i32], losses: &mut [f32], n: usize, v: usize, grad_scale: Option<f32>) -> Result<()>;
    /// One AdamW update of `p` with gradient `g` and fp32 moments `m`, `v`.
    fn adamw(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamHp);
    /// Zeroes non-finite elements among the first `n` and counts them (see
    /// `take_nonfinite`).
    fn sanitize(&self, b: &mut Self::Buf, n: usize);
    /// Non-finite gradient elements met by `sanitize`, `a8_step` and `bnb32_step` since
    /// the last call, then reset to 0 (one device sync per step instead of one per tensor).
    fn take_nonfinite(&self) -> u64;
    /// dst += alpha · src
    fn axpy(&self, dst: &mut Self::Buf, alpha: f32, src: &Self::Buf);

    fn q_new(&self, numel: usize, bits: u8, group: usize, cat: Category) -> Result<Self::Q>;
    fn q_bytes(&self, q: &Self::Q) -> usize;
    /// Round-to-nearest quantization of `src` into `q`.
    fn q_quantize(&self, q: &mut Self::Q, src: &Self::Buf, range: Range);
    fn q_dequantize(&self, dst: &mut Self::Buf, q: &Self::Q);
    /// Fused dequantize → += delta → ·decay → new group range → requantize (SR when keyed).
    fn q_update(&self, q: &mut Self::Q, delta: &Self::Buf, decay: f32, range: Range, sr: Option<u64>);

    fn a8_new(&self, n: usize, block: usize, cat: Category) -> Result<Self::A8>;
    /// bnb 8-bit block-wise Adam on `p`; non-finite gradient elements are skipped and
    /// counted (see `take_nonfinite`).
    fn a8_step(&self, p: &mut Self::Buf, g: &Self::Buf, st: &mut Self::A8, hp: AdamHp);
    /// `a8_step` on elements [off, off + len) of `p` and `st` with the gradient in
    /// g[..len]; `off` is a multiple of the state's block size.
    fn a8_step_range(&self, p: &mut Self::Buf, g: &Self::Buf, st: &mut Self::A8, off: usize, len: usize, hp: AdamHp);
    /// Rows r0 .. r0 + rows of `matmul_dw`: dw[r, :] = Σ_i dout[i, r0 + r] · inp[i, :]
    /// (a row chunk of a weight gradient, overwritten).
    #[allow(clippy::too_many_arguments)]
    fn matmul_dw_rows(&self, dw: &mut Self::Buf, dout: &Self::Buf, inp: &Self::Buf, n: usize, ic: usize, oc: usize, r0: usize, rows: usize);
    /// Rows r0 .. r0 + rows of `embedding_bwd`: dchunk[t − r0, :] += dout[i, :] for the
    /// tokens t = tokens[i] in that range, in row order.
    #[allow(clippy::too_many_arguments)]
    fn embedding_bwd_rows(&self, dchunk: &mut Self::Buf, dout: &Self::Buf, tokens: &[i32], c: usize, r0: usize, rows: usize);
    /// bnb 32-bit Adam (same formula, fp32 moments).
    fn bnb32_step(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamHp);
    /// GaLore-AdamW (algorithm-spec §1.3), in place: `buf` holds the gradient (m.len()
    /// values) and receives the update u = −ŝ·M/(√V + ε), ŝ = η·√(1−β2^t)/(1−β1^t),
    /// with ε added to the uncorrected √V.
    fn galore_adam(&self, buf: &mut Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamHp);
    /// Top-`rank` singular vectors of g (rows × cols): the first rank rows of Vᵀ into
    /// `out` (rank × cols) when `right`, else the first rank columns of U (rows × rank).
    /// `prev` is the previous projector (warm start for `Refresh::Randomized`).
    #[allow(clippy::too_many_arguments)]
    fn top_subspace(
        &self,
        g: &Self::Buf,
        rows: usize,
        cols: usize,
        rank: usize,
        right: bool,
        method: Refresh,
        prev: Option<&Self::Buf>,
        seed: u64,
        out: &mut Self::Buf,
    ) -> Result<()>;

    // Checkpointing: copy state to and from the host byte stream.
    fn save_buf(&self, b: &Self::Buf, n: usize, w: &mut crate::state::Writer);
    fn load_buf(&self, b: &mut Self::Buf, n: usize, r: &mut crate::state::Reader, what: &str) -> Result<()>;
    fn save_q(&self, q: &Self::Q, w: &mut crate::state::Writer);
    fn load_q(&self, q: &mut Self::Q, r: &mut crate::state::Reader, what: &str) -> Result<()>;
    fn save_a8(&self, s: &Self::A8, w: &mut crate::state::Writer);
    fn load_a8(&self, s: &mut Self::A8, r: &mut crate::state::Reader, what: &str) -> Result<()>;

    /// Device bytes in use right now as the driver reports them (None on the CPU).
    fn device_bytes_in_use(&self) -> Option<u64> {
        None
    }

    /// Measured GEMM throughput in GFLOP/s for an (m×k)·(k×n) product (benchmarks).
    fn gemm_gflops(&self, m: usize, n: usize, k: usize, iters: usize) -> f64;
}
