//! CPU backend: f32 buffers in host memory, rayon for threads, `gemm` for products.
//! It is the bit-faithful reference that every GPU kernel is tested against.

pub mod attention;
pub mod bf16;
pub mod ops;
pub mod profile;

/// A raw pointer that parallel tasks may share: each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

use super::{AdamHp, AttnDims, Category, Layers, Linalg, MemTracker, Memory, Optimizers, Quantization, Refresh, Runner, Tracked};
use crate::host::{linalg, matmul};
use crate::quant::adam8::{self, BnbHp, State8};
use crate::quant::nf4::Nf4Tensor;
use crate::quant::{QTensor, Range};
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

pub struct Cpu {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    mem: Arc<MemTracker>,
    /// Running totals behind `take_nonfinite` and `take_sumsq`.
    nonfinite: std::sync::atomic::AtomicU64,
    sumsq_total: std::sync::Mutex<f64>,
    /// Per-op wall time (`QGALORE_PROFILE=1`); off by default.
    prof: profile::Profile,
}

impl Cpu {
    /// A backend with its own pool of `threads` workers (0 = one per core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("qgalore-cpu-{i}"))
            .build()
            .map_err(|e| Error::backend(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(Cpu {
            pool: Arc::new(pool),
            threads,
            mem: Arc::new(MemTracker::default()),
            nonfinite: Default::default(),
            sumsq_total: Default::default(),
            prof: profile::Profile::from_env(),
        })
    }

    fn count_nonfinite(&self, k: u64) {
        self.nonfinite.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    fn par(&self) -> gemm::Parallelism {
        matmul::par(self.threads)
    }
}

/// A host buffer that gives its bytes back to the tracker when dropped.
pub struct CpuBuf {
    pub data: Vec<f32>,
    cat: Category,
    tracker: Arc<MemTracker>,
}

impl Drop for CpuBuf {
    fn drop(&mut self) {
        self.tracker.sub(self.cat, self.data.len() * 4);
    }
}

impl std::ops::Deref for CpuBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}
impl std::ops::DerefMut for CpuBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

impl Cpu {
    fn track<T>(&self, inner: T, bytes: usize, cat: Category) -> Tracked<T> {
        Tracked::new(inner, bytes, cat, &self.mem)
    }
}

static MAPS: std::sync::OnceLock<adam8::Maps> = std::sync::OnceLock::new();

impl Memory for Cpu {
    type Buf = CpuBuf;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn mem(&self) -> &MemTracker {
        &self.mem
    }
    fn runner(&self) -> Runner {
        Runner(Some(self.pool.clone()))
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn alloc(&self, n: usize, cat: Category) -> Result<CpuBuf> {
        let mut data = Vec::new();
        data.try_reserve_exact(n)
            .map_err(|_| Error::backend(format!("out of host memory allocating {} MiB", n * 4 >> 20)))?;
        data.resize(n, 0.0);
        self.mem.add(cat, n * 4);
        Ok(CpuBuf { data, cat, tracker: self.mem.clone() })
    }
    fn len(&self, b: &CpuBuf) -> usize {
        b.data.len()
    }
    fn upload(&self, dst: &mut CpuBuf, src: &[f32]) -> Result<()> {
        dst.data[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn download(&self, src: &CpuBuf, dst: &mut [f32]) -> Result<()> {
        let n = dst.len();
        dst.copy_from_slice(&src.data[..n]);
        Ok(())
    }
    fn to_host<'a>(&self, b: &'a CpuBuf, n: usize) -> Result<Cow<'a, [f32]>> {
        Ok(Cow::Borrowed(&b.data[..n]))
    }
    fn from_host(&self, b: &mut CpuBuf, n: usize, fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
        fill(&mut b.data[..n])
    }
    fn fill(&self, b: &mut CpuBuf, v: f32) {
        self.prof.time(|| "fill".into(), || b.data.fill(v))
    }
    fn copy(&self, dst: &mut CpuBuf, src: &CpuBuf) {
        self.prof.time(|| "copy".into(), || dst.data.copy_from_slice(&src.data))
    }
    fn copy_n(&self, dst: &mut CpuBuf, src: &CpuBuf, n: usize) {
        self.prof.time(|| "copy".into(), || dst.data[..n].copy_from_slice(&src.data[..n]))
    }
    fn add(&self, dst: &mut CpuBuf, src: &CpuBuf) {
        self.prof.time(|| "add/axpy/scale".into(), || ops::add(dst, src))
    }
    fn axpy(&self, dst: &mut CpuBuf, alpha: f32, src: &CpuBuf) {
        use rayon::prelude::*;
        self.prof.time(
            || "add/axpy/scale".into(),
            || {
                dst.data.par_chunks_mut(8192).zip(src.data.par_chunks(8192)).for_each(|(d, s)| {
                    for (a, b) in d.iter_mut().zip(s) {
                        *a += alpha * *b;
                    }
                })
            },
        )
    }
    fn scale(&self, b: &mut CpuBuf, s: f32) {
        self.prof.time(|| "add/axpy/scale".into(), || ops::scale(b, s))
    }
    fn sumsq(&self, b: &CpuBuf, n: usize) -> f64 {
        self.prof.time(|| "sumsq".into(), || ops::sumsq(&b.data[..n]))
    }
    fn sumsq_acc(&self, b: &CpuBuf, n: usize) {
        // one f64 per tensor added in call order: the same sum as summing the returns
        let s = self.prof.time(|| "sumsq".into(), || ops::sumsq(&b.data[..n]));
        *self.sumsq_total.lock().unwrap() += s;
    }
    fn take_sumsq(&self) -> f64 {
        std::mem::take(&mut *self.sumsq_total.lock().unwrap())
    }
}

impl Layers for Cpu {
    fn profile(&self) -> Option<std::collections::BTreeMap<String, f64>> {
        self.prof.snapshot()
    }
    fn matmul(&self, out: &mut CpuBuf, inp: &CpuBuf, w: &CpuBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.prof.time(|| profile::mm("matmul.fwd", n, ic, oc), || matmul::matmul(out, inp, w, n, ic, oc, acc, self.par()))
    }
    fn matmul_dinp(&self, dinp: &mut CpuBuf, dout: &CpuBuf, w: &CpuBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.prof.time(|| profile::mm("matmul.dinp", n, ic, oc), || matmul::matmul_dinp(dinp, dout, w, n, ic, oc, acc, self.par()))
    }
    fn matmul_dw(&self, dw: &mut CpuBuf, dout: &CpuBuf, inp: &CpuBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.prof.time(|| profile::mm("matmul.dw", n, ic, oc), || matmul::matmul_dw(dw, dout, inp, n, ic, oc, acc, self.par()))
    }
    fn matmul_dw_rows(&self, dw: &mut CpuBuf, dout: &CpuBuf, inp: &CpuBuf, n: usize, ic: usize, oc: usize, r0: usize, rows: usize) {
        self.prof.time(
            || profile::mm("matmul.dw_rows", n, ic, oc),
            || matmul::matmul_dw_rows(&mut dw.data, &dout.data, &inp.data, n, ic, oc, r0, rows, self.par()),
        )
    }
    fn embedding(&self, out: &mut CpuBuf, tokens: &[i32], table: &CpuBuf, c: usize) {
        self.prof.time(|| "embedding".into(), || ops::embedding(out, tokens, table, c))
    }
    fn embedding_bwd(&self, dtable: &mut CpuBuf, dout: &CpuBuf, tokens: &[i32], c: usize) {
        self.prof.time(|| "embedding_bwd".into(), || ops::embedding_bwd(dtable, dout, tokens, c))
    }
    fn embedding_bwd_rows(&self, dchunk: &mut CpuBuf, dout: &CpuBuf, tokens: &[i32], c: usize, r0: usize, rows: usize) {
        self.prof.time(|| "embedding_bwd".into(), || ops::embedding_bwd_rows(&mut dchunk.data, &dout.data, tokens, c, r0, rows))
    }
    fn rmsnorm(&self, out: &mut CpuBuf, rstd: &mut CpuBuf, x: &CpuBuf, w: &CpuBuf, n: usize, c: usize, eps: f32) {
        self.prof.time(|| "rmsnorm".into(), || ops::rmsnorm(out, rstd, x, w, n, c, eps))
    }
    fn rmsnorm_bwd(&self, dx: &mut CpuBuf, dw: &mut CpuBuf, dout: &CpuBuf, x: &CpuBuf, w: &CpuBuf, rstd: &CpuBuf, n: usize, c: usize) {
        self.prof.time(|| "rmsnorm_bwd".into(), || ops::rmsnorm_bwd(dx, dw, dout, x, w, rstd, n, c))
    }
    fn rope(&self, x: &mut CpuBuf, table: &CpuBuf, b: usize, t: usize, heads: usize, hd: usize, inverse: bool) {
        self.prof.time(|| if inverse { "rope_bwd" } else { "rope" }.into(), || ops::rope(x, table, b, t, heads, hd, inverse))
    }
    fn attention(&self, out: &mut CpuBuf, att: &mut CpuBuf, q: &CpuBuf, k: &CpuBuf, v: &CpuBuf, d: AttnDims) {
        self.prof.time(|| "attention".into(), || attention::forward(out, att, q, k, v, d))
    }
    fn attention_bwd(
        &self,
        dq: &mut CpuBuf,
        dk: &mut CpuBuf,
        dv: &mut CpuBuf,
        scratch: &mut CpuBuf,
        dout: &CpuBuf,
        q: &CpuBuf,
        k: &CpuBuf,
        v: &CpuBuf,
        att: &CpuBuf,
        d: AttnDims,
    ) {
        self.prof.time(|| "attention_bwd".into(), || attention::backward(dq, dk, dv, scratch, dout, q, k, v, att, d))
    }
    fn swiglu(&self, out: &mut CpuBuf, gate: &CpuBuf, up: &CpuBuf, n: usize) {
        self.prof.time(|| "swiglu".into(), || ops::swiglu(&mut out.data[..n], &gate.data[..n], &up.data[..n]))
    }
    fn swiglu_bwd(&self, dgate: &mut CpuBuf, dup: &mut CpuBuf, dout: &CpuBuf, gate: &CpuBuf, up: &CpuBuf, n: usize) {
        self.prof.time(
            || "swiglu_bwd".into(),
            || ops::swiglu_bwd(&mut dgate.data[..n], &mut dup.data[..n], &dout.data[..n], &gate.data[..n], &up.data[..n]),
        )
    }
    fn cross_entropy(&self, logits: &mut CpuBuf, targets: &[i32], losses: &mut [f32], n: usize, v: usize, grad_scale: Option<f32>) -> Result<()> {
        self.prof.time(|| "cross_entropy".into(), || ops::cross_entropy(logits, targets, losses, n, v, grad_scale));
        Ok(())
    }
}

impl Optimizers for Cpu {
    type A8 = Tracked<State8>;

    fn adamw(&self, p: &mut CpuBuf, g: &CpuBuf, m: &mut CpuBuf, v: &mut CpuBuf, hp: AdamHp) {
        self.prof.time(|| "optimizer.adamw".into(), || ops::adamw(p, g, m, v, hp))
    }
    fn galore_adam(&self, buf: &mut CpuBuf, m: &mut CpuBuf, v: &mut CpuBuf, hp: AdamHp) {
        let n = m.len();
        self.prof.time(|| "optimizer.galore_adam".into(), || ops::galore_adam(&mut buf.data[..n], &mut m.data, &mut v.data, hp))
    }
    fn bnb32_step(&self, p: &mut CpuBuf, g: &CpuBuf, m: &mut CpuBuf, v: &mut CpuBuf, hp: BnbHp) {
        let n = m.len();
        let k = self.prof.time(|| "optimizer.bnb32".into(), || adam8::step32(&mut p.data[..n], &g.data[..n], &mut m.data, &mut v.data[..n], hp));
        self.count_nonfinite(k);
    }
    fn a8_new(&self, n: usize, block: usize, cat: Category) -> Result<Self::A8> {
        let st = State8::new(n, block);
        let bytes = st.bytes();
        Ok(self.track(st, bytes, cat))
    }
    fn a8_step(&self, p: &mut CpuBuf, g: &CpuBuf, st: &mut Self::A8, hp: BnbHp) {
        let maps = MAPS.get_or_init(adam8::Maps::new);
        let n = st.m.len();
        let k = self.prof.time(|| "optimizer.adam8".into(), || adam8::step8(&mut p.data[..n], &g.data[..n], &mut st.inner, maps, hp));
        self.count_nonfinite(k);
    }
    fn a8_step_range(&self, p: &mut CpuBuf, g: &CpuBuf, st: &mut Self::A8, off: usize, len: usize, hp: BnbHp) {
        let maps = MAPS.get_or_init(adam8::Maps::new);
        let k = self.prof.time(
            || "optimizer.adam8".into(),
            || adam8::step8_range(&mut p.data[off..off + len], &g.data[..len], &mut st.inner, off, len, maps, hp),
        );
        self.count_nonfinite(k);
    }
    fn a8_to_host<'a>(&self, st: &'a Self::A8) -> Result<Cow<'a, State8>> {
        Ok(Cow::Borrowed(&st.inner))
    }
    fn a8_from_host(&self, st: &mut Self::A8, fill: impl FnOnce(&mut State8) -> Result<()>) -> Result<()> {
        fill(&mut st.inner)
    }
    fn sanitize(&self, b: &mut CpuBuf, n: usize) {
        use rayon::prelude::*;
        let k: u64 = self.prof.time(
            || "sanitize".into(),
            || {
                b.data[..n]
                    .par_chunks_mut(8192)
                    .map(|c| {
                        let mut k = 0u64;
                        for v in c.iter_mut() {
                            if !v.is_finite() {
                                *v = 0.0;
                                k += 1;
                            }
                        }
                        k
                    })
                    .sum()
            },
        );
        self.count_nonfinite(k);
    }
    fn take_nonfinite(&self) -> u64 {
        self.nonfinite.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Quantization for Cpu {
    type Q = Tracked<QTensor>;

    fn q_new(&self, numel: usize, bits: u8, group: usize, cat: Category) -> Result<Self::Q> {
        let q = QTensor::new(numel, bits, group)?;
        let bytes = q.bytes();
        Ok(self.track(q, bytes, cat))
    }
    fn q_bytes(&self, q: &Self::Q) -> usize {
        q.bytes()
    }
    fn q_quantize(&self, q: &mut Self::Q, src: &CpuBuf, range: Range) {
        self.prof.time(|| "quantize".into(), || q.inner.quantize(src, range))
    }
    fn q_dequantize(&self, dst: &mut CpuBuf, q: &Self::Q) {
        self.prof.time(|| format!("dequant.int{}", q.inner.bits).into(), || q.inner.dequantize(dst))
    }
    fn q_update(&self, q: &mut Self::Q, delta: &CpuBuf, decay: f32, range: Range, sr: Option<u64>) {
        self.prof.time(|| "optimizer.q_update".into(), || q.inner.update(delta, decay, range, sr))
    }
    fn q_to_host<'a>(&self, q: &'a Self::Q) -> Result<Cow<'a, QTensor>> {
        Ok(Cow::Borrowed(&q.inner))
    }
    fn q_from_host(&self, q: &mut Self::Q, fill: impl FnOnce(&mut QTensor) -> Result<()>) -> Result<()> {
        fill(&mut q.inner)
    }

    /// The host tensor itself: the CPU is the reference the device kernels follow.
    type N = Tracked<Nf4Tensor>;

    fn nf4_new(&self, t: Nf4Tensor, cat: Category) -> Result<Self::N> {
        let bytes = t.bytes();
        Ok(self.track(t, bytes, cat))
    }
    fn nf4_numel(&self, t: &Self::N) -> usize {
        t.numel
    }
    fn nf4_dequantize_rows(&self, dst: &mut CpuBuf, t: &Self::N, cols: usize, rows: std::ops::Range<usize>) {
        let n = rows.len() * cols;
        self.prof.time(|| "dequant.nf4".into(), || t.inner.dequantize_rows(cols, rows, &mut dst.data[..n]))
    }
    fn nf4_to_host<'a>(&self, t: &'a Self::N) -> Result<Cow<'a, Nf4Tensor>> {
        Ok(Cow::Borrowed(&t.inner))
    }
}

impl Linalg for Cpu {
    fn top_subspace(
        &self,
        g: &CpuBuf,
        rows: usize,
        cols: usize,
        rank: usize,
        right: bool,
        method: Refresh,
        prev: Option<&CpuBuf>,
        seed: u64,
        out: &mut CpuBuf,
    ) -> Result<()> {
        self.prof.time(
            || "refresh.top_subspace".into(),
            || linalg::top_subspace(g, rows, cols, rank, right, method, prev.map(|p| &p.data[..]), seed, out, self.threads),
        )
    }
}

impl Cpu {
    /// Measured GEMM throughput in GFLOP/s for an (m×k)·(k×n) product (benchmarks).
    pub fn gemm_gflops(&self, m: usize, n: usize, k: usize, iters: usize) -> f64 {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect();
        let mut c = vec![0.0f32; m * n];
        self.pool.install(|| {
            matmul::matmul_nn(&mut c, &a, &b, m, k, n, self.par()); // warm-up
            let t0 = Instant::now();
            for _ in 0..iters.max(1) {
                matmul::matmul_nn(&mut c, &a, &b, m, k, n, self.par());
            }
            let s = t0.elapsed().as_secs_f64();
            2.0 * (m * n * k) as f64 * iters.max(1) as f64 / s / 1e9
        })
    }
}
