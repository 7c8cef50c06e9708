//! bf16 on the host: the rounding rule the CUDA kernels use (`f32_to_bf16` in
//! `rust/kernels/prelude.cu`, `crate::quant::f32_to_bf16`: round to nearest even, a NaN
//! stays a quiet NaN), the CPU's bf16 instruction sets found at run time, and a bf16 GEMM
//! micro-kernel for processors with AVX512-BF16 (`vdpbf16ps`).
//!
//! The CPU backend's bf16 precision (`crate::backend::cpu::bf16`) follows the GPU's rules
//! exactly: f32 operands are rounded to bf16 where the GPU casts them, products accumulate
//! in f32, and results stored in bf16 buffers are rounded once. Its exact path needs no
//! bf16 hardware: a product of two bf16 values is exact in f32, so rounding the operands
//! and running the f32 GEMM is the bf16-input, fp32-accumulate product.

use crate::quant::{bf16_to_f32, f32_to_bf16};
use rayon::prelude::*;

/// `x` rounded to the nearest bf16 (ties to even), as an f32.
#[inline]
pub fn round(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// Rounds every value of `x` to bf16 in place (in parallel on the current pool).
pub fn round_slice(x: &mut [f32]) {
    x.par_chunks_mut(16384).for_each(|c| c.iter_mut().for_each(|v| *v = round(*v)));
}

/// A bf16-rounded copy of `x`.
pub fn rounded(x: &[f32]) -> Vec<f32> {
    let mut v = x.to_vec();
    round_slice(&mut v);
    v
}

/// Whether every value of `x` is a bf16 value (rounding leaves it unchanged, bit for bit).
pub fn is_bf16(x: &[f32]) -> bool {
    x.iter().all(|&v| v.is_nan() || round(v).to_bits() == v.to_bits())
}

/// The environment variable behind the test-only software path (see `Kernel`).
pub const ENV: &str = "QGALORE_CPU_BF16";

/// The bf16 instruction sets of this processor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Support {
    /// AVX512-BF16 (`vdpbf16ps`), with AVX512-F.
    pub avx512_bf16: bool,
    /// AMX-BF16 (tile products; the engine has no AMX kernel and runs the exact path there).
    pub amx_bf16: bool,
}

impl Support {
    pub fn any(&self) -> bool {
        self.avx512_bf16 || self.amx_bf16
    }
}

/// What this processor offers, asked at run time.
pub fn detect() -> Support {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512_bf16 = std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512f");
        // `is_x86_feature_detected!("amx-bf16")` is not stable yet: CPUID leaf 7, EDX bit 22
        #[allow(unused_unsafe)]
        let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        let max = {
            #[allow(unused_unsafe)]
            let l0 = unsafe { std::arch::x86_64::__cpuid(0) };
            l0.eax
        };
        let amx_bf16 = max >= 7 && (leaf7.edx >> 22) & 1 == 1;
        Support { avx512_bf16, amx_bf16 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Support::default()
    }
}

/// How the CPU runs bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Operands rounded to bf16, then the f32 GEMM: exact bf16 products, f32 sums. Chosen
    /// on a processor with AMX-BF16 only, or on any processor with `QGALORE_CPU_BF16=emulate`
    /// (for tests: it makes bf16 precision run where the hardware lacks it).
    Exact,
    /// `vdpbf16ps` on bf16-packed operands (AVX512-BF16, `gemm_avx512`): the same
    /// products, summed pair by pair in k order and with denormals flushed as the
    /// instruction specifies. Its attention softmax and SwiGLU take `host::simd`'s
    /// vectorized exp (within 2 ulp of the true value) and sums in 16 lanes.
    Avx512,
    /// `Avx512`'s packing and summation order in scalar code (`gemm_scalar`): lets tests
    /// check the packed path on any processor. Same products as `Exact`, summed in another
    /// order.
    Packed,
}

/// The one-line refusal of bf16 precision on a CPU without bf16 instructions.
pub const MISSING: &str =
    "precision bf16 on the CPU needs AVX512-BF16 or AMX-BF16, which this processor lacks; use precision fp32 or auto";

/// The kernel bf16 precision uses on this CPU, or the one-line reason it cannot run:
/// `QGALORE_CPU_BF16=emulate` (tests only) forces the exact software path anywhere;
/// `QGALORE_CPU_BF16=exact` forces it where the hardware exists.
pub fn kernel() -> Result<Kernel, String> {
    let s = detect();
    match std::env::var(ENV).ok().as_deref() {
        None | Some("") => {}
        Some("emulate") => return Ok(Kernel::Exact),
        Some("exact") if s.any() => return Ok(Kernel::Exact),
        Some("exact") => return Err(MISSING.to_string()),
        Some(x) => return Err(format!("{ENV} = {x}: must be emulate (tests: exact bf16 arithmetic without bf16 instructions), exact, or unset")),
    }
    if s.avx512_bf16 {
        Ok(Kernel::Avx512)
    } else if s.amx_bf16 {
        Ok(Kernel::Exact)
    } else {
        Err(MISSING.to_string())
    }
}

/// Operand i×l of a strided matrix: element (i, l) at `off + i·rs + l·cs`.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

/// Rows of a's panels and columns of b's panels: `gemm_avx512`'s register tile (MR rows ×
/// NR columns of c in 2·MR zmm accumulators).
pub const MR: usize = 8;
pub const NR: usize = 32;

/// Pairs along k per packed row: k rounded up to even (`vdpbf16ps` takes (k, k+1) pairs).
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2).max(1)
}

/// Packs the `rows`×`k` strided matrix `x` (rows of a, or columns of b) as bf16 pairs in
/// panels of `width` rows: panel p holds, for each pair l, rows p·width … p·width + width − 1
/// side by side, each as the u32 (x[i, 2l] | x[i, 2l+1] << 16). Rows past `rows` and the odd
/// k's partner are zero. a is packed with `MR`, bᵀ with `NR`: then one broadcast of a's pair
/// and two loads of b's give 32 columns of one row of c per `vdpbf16ps` pair.
pub fn pack_pairs(x: &[f32], s: Strided, rows: usize, k: usize, width: usize) -> Vec<u32> {
    pack_pairs_with(x, s, rows, k, width, true)
}

/// a's pairs for the kernel's broadcasts, in one of two layouts; in both, panel p (rows
/// p·MR … p·MR + MR − 1) starts at p·MR·kh and rows past m are zero:
/// - by rows (`by_rows`): row i's pairs side by side, pair l2 at i·kh + l2. A row-major a
///   (cs = 1) is converted row by row in one streaming pass, with no scatter;
/// - in panels (`pack_pairs(…, MR)`): pair l2 of row r of panel p at p·MR·kh + l2·MR + r.
///   A transposed a (rs = 1) takes each pair from two source rows at once, which this
///   layout writes in runs of MR.
pub struct PackedA {
    pub data: Vec<u32>,
    pub by_rows: bool,
}

/// The m×k strided matrix a packed for `gemm_avx512` (`PackedA`: by rows when its rows are
/// contiguous along k, else in panels), in parallel on the current pool.
pub fn pack_a(x: &[f32], s: Strided, m: usize, k: usize) -> PackedA {
    pack_a_with(x, s, m, k, true)
}

#[inline(always)]
fn pack_a_with(x: &[f32], s: Strided, m: usize, k: usize, parallel: bool) -> PackedA {
    if s.cs != 1 {
        return PackedA { data: pack_pairs_with(x, s, m, k, MR, parallel), by_rows: false };
    }
    let kh = pairs(k);
    let mut data = vec![0u32; m.div_ceil(MR) * MR * kh];
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vl");
    let pack = |(p, panel): (usize, &mut [u32])| {
        for (r, row) in panel.chunks_mut(kh).take(m.saturating_sub(p * MR).min(MR)).enumerate() {
            let src = &x[s.off + (p * MR + r) * s.rs..][..k];
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the instruction sets were found on this processor
                unsafe { pack_row_avx512(src, row) };
                continue;
            }
            pack_row(src, row);
        }
    };
    if parallel {
        data.par_chunks_mut(MR * kh).enumerate().for_each(pack);
    } else {
        data.chunks_mut(MR * kh).enumerate().for_each(pack);
    }
    PackedA { data, by_rows: true }
}

/// One row of k values as pairs (the odd k's partner stays zero).
#[inline(always)]
fn pack_row(src: &[f32], row: &mut [u32]) {
    for (d, p) in row.iter_mut().zip(src.chunks_exact(2)) {
        *d = f32_to_bf16(p[0]) as u32 | (f32_to_bf16(p[1]) as u32) << 16;
    }
    if src.len() % 2 == 1 {
        row[src.len() / 2] = f32_to_bf16(src[src.len() - 1]) as u32;
    }
}

/// `pack_row` compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_row_avx512(src: &[f32], row: &mut [u32]) {
    pack_row(src, row)
}

/// `pack_pairs` in parallel on the current pool or (`parallel` false) on the calling
/// thread, by code compiled for AVX-512 where the processor has it (`*_avx512`: a closure
/// does not inherit its function's target features, so the dispatch is per task).
#[inline(always)]
fn pack_pairs_with(x: &[f32], s: Strided, rows: usize, k: usize, width: usize, parallel: bool) -> Vec<u32> {
    let kh = pairs(k);
    let len = kh * width;
    let mut out = vec![0u32; rows.div_ceil(width) * len];
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vl");
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    if s.rs == 1 && s.cs != 1 && rows > 0 {
        // x transposed (rows adjacent in memory, k strided): tasks take ranges of pairs and
        // read each pair's two source rows whole, so every task streams through its own
        // part of x. (Strips of columns per task read each row at a new page for every
        // pair, which the hardware prefetchers do not follow: 60% of the packing's time.)
        let tasks = if parallel { 4 * rayon::current_num_threads() } else { 1 };
        let per = kh.div_ceil(tasks).max(4);
        let dst = Dst(out.as_mut_ptr());
        let pack = |t: usize| {
            let l2s = t * per..((t + 1) * per).min(kh);
            // SAFETY: tasks write disjoint pair ranges of every panel of `out`; `wide`: the
            // instruction sets were found on this processor
            unsafe {
                #[cfg(target_arch = "x86_64")]
                if wide {
                    return pack_transposed_avx512(x, s, rows, k, width, l2s, &dst);
                }
                pack_transposed(x, s, rows, k, width, l2s, &dst)
            }
        };
        if parallel {
            (0..kh.div_ceil(per)).into_par_iter().for_each(pack);
        } else {
            (0..kh.div_ceil(per)).for_each(pack);
        }
        return out;
    }
    let pack = |(p, panel): (usize, &mut [u32])| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the instruction sets were found on this processor
            return unsafe { pack_panel_avx512(x, s, rows, k, width, p, panel) };
        }
        pack_panel(x, s, rows, k, width, p, panel)
    };
    if parallel {
        out.par_chunks_mut(len).enumerate().for_each(pack);
    } else {
        out.chunks_mut(len).enumerate().for_each(pack);
    }
    out
}

/// The packed output, written by several tasks at disjoint places.
struct Dst(*mut u32);
// SAFETY: only `pack_transposed` writes through it, each task to its own pairs
unsafe impl Sync for Dst {}

/// `pack_panel` compiled for AVX-512, so that its conversion loops vectorize 16 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_panel_avx512(x: &[f32], s: Strided, rows: usize, k: usize, width: usize, p: usize, panel: &mut [u32]) {
    pack_panel(x, s, rows, k, width, p, panel)
}

/// `pack_transposed` compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_transposed_avx512(x: &[f32], s: Strided, rows: usize, k: usize, width: usize, l2s: std::ops::Range<usize>, out: &Dst) {
    pack_transposed(x, s, rows, k, width, l2s, out)
}

/// Pairs `l2s` of every panel of a transposed x (rs = 1) into `out` (`pack_pairs`'s
/// layout, zeroed): each pair's two source rows converted and interleaved over all of x's
/// rows at once, then cut into the panels' lanes.
///
/// # Safety
/// `out` holds `pack_pairs`'s whole output and no other task writes these pairs.
#[inline(always)]
unsafe fn pack_transposed(x: &[f32], s: Strided, rows: usize, k: usize, width: usize, l2s: std::ops::Range<usize>, out: &Dst) {
    let len = pairs(k) * width;
    let mut tmp = vec![0u32; rows];
    for l2 in l2s {
        let (l, odd) = (2 * l2, 2 * l2 + 1 < k);
        let lo = &x[s.off + l * s.cs..][..rows];
        if odd {
            let hi = &x[s.off + (l + 1) * s.cs..][..rows];
            tmp.iter_mut().zip(lo.iter().zip(hi)).for_each(|(d, (&a, &b))| *d = f32_to_bf16(a) as u32 | (f32_to_bf16(b) as u32) << 16);
        } else {
            tmp.iter_mut().zip(lo).for_each(|(d, &a)| *d = f32_to_bf16(a) as u32);
        }
        for (q, cols) in tmp.chunks(width).enumerate() {
            std::ptr::copy_nonoverlapping(cols.as_ptr(), out.0.add(q * len + l2 * width), cols.len());
        }
    }
}

/// Panel `p` of `pack_pairs` into `panel` (zeroed).
#[inline(always)]
fn pack_panel(x: &[f32], s: Strided, rows: usize, k: usize, width: usize, p: usize, panel: &mut [u32]) {
    let kh = pairs(k);
    let live = width.min(rows - p * width);
    let base = s.off + p * width * s.rs;
    if s.cs == 1 {
        // rows of x contiguous along k: convert a row at once (vectorized), then lay its
        // pairs out at the panel's stride
        let mut row = vec![0u16; 2 * kh];
        for r in 0..live {
            let src = &x[base + r * s.rs..base + r * s.rs + k];
            row[..k].iter_mut().zip(src).for_each(|(d, &v)| *d = f32_to_bf16(v));
            for (l2, pair) in row.chunks_exact(2).enumerate() {
                panel[l2 * width + r] = pair[0] as u32 | (pair[1] as u32) << 16;
            }
        }
        return;
    }
    // general strides (a transposed x goes through `pack_transposed`): pairs outermost, so the
    // panel is written in order
    for (l2, lane) in panel.chunks_exact_mut(width).enumerate() {
        let (l, odd) = (2 * l2, 2 * l2 + 1 < k);
        let at = base + l * s.cs;
        for (r, d) in lane[..live].iter_mut().enumerate() {
            let at = at + r * s.rs;
            let lo = f32_to_bf16(x[at]) as u32;
            let hi = if odd { f32_to_bf16(x[at + s.cs]) as u32 } else { 0 };
            *d = lo | hi << 16;
        }
    }
}

/// `gemm_avx512` on raw strided operands, packed and multiplied on the calling thread
/// (attention's small per-head products, already run in parallel over heads): c[m×n] (row
/// stride ldc) = (acc ? c : 0) + alpha · a·b, a m×k with strides (ars, acs), b k×n with
/// (brs, bcs).
///
/// # Safety
/// AVX512-BF16 and AVX512-F (`detect().avx512_bf16`); non-negative strides addressing the
/// operands' full extents; c's m rows of n values writable by this task only.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_avx512_strided(m: usize, n: usize, k: usize, c: *mut f32, ldc: usize, acc: bool, a: *const f32, ars: usize, acs: usize, b: *const f32, brs: usize, bcs: usize, alpha: f32) {
    if m == 0 || n == 0 {
        return;
    }
    let kh = pairs(k);
    let extent = |rows: usize, rs: usize, cols: usize, cs: usize| if cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 };
    let xa = std::slice::from_raw_parts(a, extent(m, ars, k, acs));
    let xb = std::slice::from_raw_parts(b, extent(k, brs, n, bcs));
    let pa = pack_a_with(xa, Strided { off: 0, rs: ars, cs: acs }, m, k, false);
    // bᵀ: row j is column j of b
    let pb = pack_pairs_with(xb, Strided { off: 0, rs: bcs, cs: brs }, n, k, NR, false);
    for p in 0..m.div_ceil(MR) {
        row_panel_avx512(&pa, &pb, p, m, n, kh, kh * NR, c.add(p * MR * ldc), ldc, acc, alpha);
    }
}

/// `pack_pairs` on the calling thread (operands packed once for several products).
pub fn pack_pairs_here(x: &[f32], s: Strided, rows: usize, k: usize, width: usize) -> Vec<u32> {
    pack_pairs_with(x, s, rows, k, width, false)
}

/// `gemm_avx512_strided` with bᵀ already packed (`pack_pairs(…, NR)`): `b` starts at the
/// first pair this product takes in the first panel, panels lie `bstride` values apart and
/// each gives k's pairs from there. On the calling thread.
///
/// # Safety
/// As `gemm_avx512_strided` for a and c; b must hold n.div_ceil(NR) such panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_avx512_prepacked(m: usize, n: usize, k: usize, c: *mut f32, ldc: usize, acc: bool, a: *const f32, ars: usize, acs: usize, b: &[u32], bstride: usize, alpha: f32) {
    if m == 0 || n == 0 {
        return;
    }
    let kh = pairs(k);
    assert!((n.div_ceil(NR) - 1) * bstride + kh * NR <= b.len());
    let xa = std::slice::from_raw_parts(a, if k == 0 { 0 } else { (m - 1) * ars + (k - 1) * acs + 1 });
    let pa = pack_a_with(xa, Strided { off: 0, rs: ars, cs: acs }, m, k, false);
    for p in 0..m.div_ceil(MR) {
        row_panel_avx512(&pa, b, p, m, n, kh, bstride, c.add(p * MR * ldc), ldc, acc, alpha);
    }
}

/// Row panel `p` of c (at `cp`, row stride ldc) over every column panel (`bstride` values
/// apart in b), one tile each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn row_panel_avx512(a: &PackedA, b: &[u32], p: usize, m: usize, n: usize, kh: usize, bstride: usize, cp: *mut f32, ldc: usize, acc: bool, alpha: f32) {
    let rows = (m - p * MR).min(MR);
    let ap = a.data.as_ptr().add(p * MR * kh);
    for q in 0..n.div_ceil(NR) {
        let cols = (n - q * NR).min(NR);
        let (bq, cq) = (b.as_ptr().add(q * bstride), cp.add(q * NR));
        if a.by_rows {
            tile_avx512::<true>(ap, bq, kh, cq, ldc, rows, cols, acc, alpha);
        } else {
            tile_avx512::<false>(ap, bq, kh, cq, ldc, rows, cols, acc, alpha);
        }
    }
}

/// c[m×n] (row stride ldc) = (acc ? c : 0) + alpha · a·b with a packed by `pack_a`
/// and bᵀ by `pack_pairs(…, NR)`, through `vdpbf16ps`: each element of c sums its pairs in
/// k order in one f32 lane (no horizontal sums). Row panels of c in parallel on the current
/// pool; each runs the MR×NR tile over every column panel.
///
/// # Safety
/// The processor must have AVX512-BF16 and AVX512-F (`detect().avx512_bf16`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_avx512(c: &mut [f32], ldc: usize, a: &PackedA, b: &[u32], m: usize, n: usize, k: usize, acc: bool, alpha: f32) {
    let kh = pairs(k);
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    assert!(a.data.len() >= mp * kh * MR && b.len() >= np * kh * NR && (m == 0 || c.len() >= (m - 1) * ldc + n));
    c.par_chunks_mut(ldc * MR).take(mp).enumerate().for_each(|(p, cp)| {
        // SAFETY: the caller checked the instruction sets; the panels hold kh pairs of MR
        // (NR) lanes; the panel's rows × n values of c lie inside `cp` (row stride ldc)
        unsafe { row_panel_avx512(a, b, p, m, n, kh, kh * NR, cp.as_mut_ptr(), ldc, acc, alpha) }
    });
}

/// One MR×NR tile of `gemm_avx512` (a's panel `BY_ROWS` or not: `PackedA`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const BY_ROWS: bool>(a: *const u32, b: *const u32, kh: usize, c: *mut f32, ldc: usize, rows: usize, cols: usize, acc: bool, alpha: f32) {
    use std::arch::x86_64::*;
    let mut s = [[_mm512_setzero_ps(); 2]; MR];
    for l2 in 0..kh {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(l2 * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(l2 * NR + 16) as *const _));
        let ap = if BY_ROWS { a.add(l2) } else { a.add(l2 * MR) };
        for (r, sr) in s.iter_mut().enumerate() {
            let at = if BY_ROWS { ap.add(r * kh) } else { ap.add(r) };
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at as i32));
            sr[0] = _mm512_dpbf16_ps(sr[0], av, b0);
            sr[1] = _mm512_dpbf16_ps(sr[1], av, b1);
        }
    }
    let va = _mm512_set1_ps(alpha);
    for (r, sr) in s.iter().enumerate().take(rows) {
        for (h, v) in sr.iter().enumerate() {
            let j0 = h * 16;
            if j0 >= cols {
                break;
            }
            let w = (cols - j0).min(16);
            let mask: __mmask16 = if w == 16 { 0xffff } else { ((1u32 << w) - 1) as u16 };
            let p = c.add(r * ldc + j0);
            let mut x = _mm512_mul_ps(*v, va);
            if acc {
                x = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), x);
            }
            _mm512_mask_storeu_ps(p, mask, x);
        }
    }
}

/// `gemm_avx512` in scalar code on the same packed operands, each element of c summed as
/// `vdpbf16ps` specifies: per pair, + a[2l+1]·b[2l+1] then + a[2l]·b[2l], rounding each sum
/// to f32 (products of bf16 values are exact in f32). Denormals are kept (the instruction
/// flushes them). Lets tests check the packed path's layout and order on any processor.
#[allow(clippy::too_many_arguments)]
pub fn gemm_scalar(c: &mut [f32], ldc: usize, a: &PackedA, b: &[u32], m: usize, n: usize, k: usize, acc: bool, alpha: f32) {
    let kh = pairs(k);
    assert!(a.data.len() >= m.div_ceil(MR) * kh * MR && b.len() >= n.div_ceil(NR) * kh * NR && (m == 0 || c.len() >= (m - 1) * ldc + n));
    let half = |x: u32| (bf16_to_f32(x as u16), bf16_to_f32((x >> 16) as u16));
    c.par_chunks_mut(ldc).take(m).enumerate().for_each(|(i, row)| {
        let (pa, ra) = (i / MR, i % MR);
        for (j, cj) in row[..n].iter_mut().enumerate() {
            let (pb, rb) = (j / NR, j % NR);
            let mut sum = 0.0f32;
            for l2 in 0..kh {
                let (a0, a1) = half(if a.by_rows { a.data[i * kh + l2] } else { a.data[(pa * kh + l2) * MR + ra] });
                let (b0, b1) = half(b[(pb * kh + l2) * NR + rb]);
                sum += a1 * b1;
                sum += a0 * b0;
            }
            *cj = if acc { *cj + alpha * sum } else { alpha * sum };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_is_round_to_nearest_even() {
        // ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 and goes to the even 1
        assert_eq!(round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round(f32::INFINITY), f32::INFINITY);
        assert!(round(f32::NAN).is_nan());
    }

    /// The packers (a by rows, per panel, by ranges of pairs for a transposed x, parallel or on the
    /// calling thread, AVX-512-compiled or not) against the layout `pack_pairs` documents.
    #[test]
    fn packing_follows_the_documented_layout() {
        let x: Vec<f32> = (0..40_000).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1.37e-3).collect();
        // (rows, k, rs, cs, off): row-major, transposed (rs = 1), general strides; odd sizes
        let cases: [(usize, usize, usize, usize, usize); 7] = [(37, 13, 13, 1, 0), (37, 13, 1, 41, 3), (300, 9, 1, 310, 5), (64, 64, 1, 64, 0), (19, 7, 11, 3, 2), (1, 5, 1, 1, 0), (70, 2, 1, 80, 0)];
        for (rows, k, rs, cs, off) in cases {
            let s = Strided { off, rs, cs };
            for width in [MR, NR] {
                let kh = pairs(k);
                let mut want = vec![0u32; rows.div_ceil(width) * kh * width];
                for i in 0..rows {
                    for l2 in 0..kh {
                        let v = |l: usize| if l < k { f32_to_bf16(x[off + i * rs + l * cs]) as u32 } else { 0 };
                        want[(i / width) * kh * width + l2 * width + i % width] = v(2 * l2) | v(2 * l2 + 1) << 16;
                    }
                }
                for parallel in [true, false] {
                    assert_eq!(pack_pairs_with(&x, s, rows, k, width, parallel), want, "rows {rows} k {k} rs {rs} cs {cs} width {width} parallel {parallel}");
                }
            }
            // a: by rows when its rows are contiguous along k, else MR panels
            let kh = pairs(k);
            let mut by_rows = vec![0u32; rows.div_ceil(MR) * MR * kh];
            for i in 0..rows {
                for l2 in 0..kh {
                    let v = |l: usize| if l < k { f32_to_bf16(x[off + i * rs + l * cs]) as u32 } else { 0 };
                    by_rows[i * kh + l2] = v(2 * l2) | v(2 * l2 + 1) << 16;
                }
            }
            for parallel in [true, false] {
                let a = pack_a_with(&x, s, rows, k, parallel);
                assert_eq!(a.by_rows, cs == 1, "rows {rows} k {k} rs {rs} cs {cs}");
                let want = if cs == 1 { by_rows.clone() } else { pack_pairs_with(&x, s, rows, k, MR, false) };
                assert_eq!(a.data, want, "a: rows {rows} k {k} rs {rs} cs {cs} parallel {parallel}");
            }
        }
    }
}
