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
    /// `vdpbf16ps` on bf16-packed operands (AVX512-BF16): the same products, summed in
    /// pairs and with denormals flushed as the instruction specifies.
    Avx512,
    /// `Avx512`'s packing (bf16 operands, b transposed, k padded) with a scalar dot product
    /// in f32 (`gemm_nt_scalar`): lets tests check the packed path's layout on any
    /// processor. Same products as `Exact`, summed in another order.
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

/// Packs the `rows`×`k` strided matrix `x` as bf16, row-major, each row zero-padded to
/// `kp` (a multiple of 32: one `vdpbf16ps` takes 32 pairs).
pub fn pack(x: &[f32], s: Strided, rows: usize, k: usize, kp: usize) -> Vec<u16> {
    let mut out = vec![0u16; rows * kp];
    out.par_chunks_mut(kp).enumerate().for_each(|(i, row)| {
        for (l, d) in row[..k].iter_mut().enumerate() {
            *d = f32_to_bf16(x[s.off + i * s.rs + l * s.cs]);
        }
    });
    out
}

/// k rounded up to the kernel's step.
pub fn padded(k: usize) -> usize {
    k.div_ceil(32).max(1) * 32
}

/// c[m×n] (row stride ldc) = (acc ? c : 0) + alpha · a·bᵀ with a (m×kp) and b (n×kp) bf16
/// packed by `pack`, through `vdpbf16ps`. Rows of c in parallel on the current pool.
///
/// # Safety
/// The processor must have AVX512-BF16 and AVX512-F (`detect().avx512_bf16`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_nt_avx512(c: &mut [f32], ldc: usize, a: &[u16], b: &[u16], m: usize, n: usize, kp: usize, acc: bool, alpha: f32) {
    assert!(kp % 32 == 0 && a.len() >= m * kp && b.len() >= n * kp && (m == 0 || c.len() >= (m - 1) * ldc + n));
    c.par_chunks_mut(ldc).take(m).enumerate().for_each(|(i, row)| {
        let ar = &a[i * kp..(i + 1) * kp];
        // SAFETY: the caller checked the instruction sets; slices hold kp values each
        unsafe { row_avx512(&mut row[..n], ar, b, kp, acc, alpha) }
    });
}

/// `gemm_nt_avx512` in scalar code: each dot product summed in index order in f32.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_scalar(c: &mut [f32], ldc: usize, a: &[u16], b: &[u16], m: usize, n: usize, kp: usize, acc: bool, alpha: f32) {
    assert!(a.len() >= m * kp && b.len() >= n * kp && (m == 0 || c.len() >= (m - 1) * ldc + n));
    c.par_chunks_mut(ldc).take(m).enumerate().for_each(|(i, row)| {
        let ar = &a[i * kp..(i + 1) * kp];
        for (j, cj) in row[..n].iter_mut().enumerate() {
            let br = &b[j * kp..(j + 1) * kp];
            let dot = ar.iter().zip(br).fold(0.0f32, |s, (&x, &y)| s + bf16_to_f32(x) * bf16_to_f32(y));
            *cj = if acc { *cj + alpha * dot } else { alpha * dot };
        }
    });
}

/// One row of `gemm_nt_avx512`: four columns at a time share each load of the row of a.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512bf16,avx512f")]
unsafe fn row_avx512(c: &mut [f32], a: &[u16], b: &[u16], kp: usize, acc: bool, alpha: f32) {
    use std::arch::x86_64::*;
    let n = c.len();
    let load = |p: *const u16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p as *const _)) };
    let mut j = 0;
    while j < n {
        let w = (n - j).min(4);
        let mut s = [_mm512_setzero_ps(); 4];
        let mut l = 0;
        while l < kp {
            let va = load(a.as_ptr().add(l));
            for (q, sq) in s.iter_mut().enumerate().take(w) {
                *sq = _mm512_dpbf16_ps(*sq, va, load(b.as_ptr().add((j + q) * kp + l)));
            }
            l += 32;
        }
        for (q, sq) in s.iter().enumerate().take(w) {
            let v = alpha * _mm512_reduce_add_ps(*sq);
            c[j + q] = if acc { c[j + q] + v } else { v };
        }
        j += w;
    }
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
}
