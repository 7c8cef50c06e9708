//! Group-wise asymmetric min–max quantization (docs/algorithm-spec.md §2.2–2.4): INT8 weights,
//! INT4 projectors (packed two codes per byte), bf16 storage, and the fused
//! dequantize → update → requantize-with-stochastic-rounding step, all in f32.

pub mod adam8;
pub mod nf4;

use crate::ensure;
use crate::error::Result;
use crate::rng;
use rayon::prelude::*;

/// Largest quantization group: the CUDA kernels give a group one thread block of one thread
/// per element (`q_requant`'s `QG_MAX_GROUP`, see `backend::cuda::kernels::size_defines`),
/// and the host keeps a group on the stack.
pub const MAX_GROUP: usize = 1024;

/// A quantized tensor. `bits` is 4 or 8 (codes with per-group scale and zero point) or
/// 16 (plain bf16, round-to-nearest-even, no groups).
#[derive(Clone, Debug)]
pub struct QTensor {
    pub bits: u8,
    pub group: usize,
    pub numel: usize,
    /// 8-bit: one code per byte; 4-bit: element 2i in the low nibble of byte i, 2i+1 in
    /// the high nibble; 16-bit: little-endian bf16.
    pub codes: Vec<u8>,
    pub scale: Vec<f32>,
    pub zero: Vec<f32>,
}

/// How a group's range is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// Range extended to include 0, so single-sign groups keep the s/2 error bound
    /// (our default; fixes the reference's zero-point clamp bug, docs/algorithm-spec.md §2.2 / §5.1-9).
    WithZero,
    /// The reference's [min, max]: a single-sign group is clipped by the clamped zero point.
    Reference,
}

impl QTensor {
    pub fn new(numel: usize, bits: u8, group: usize) -> Result<Self> {
        ensure!(matches!(bits, 4 | 8 | 16), "bits = {bits}: must be 4, 8 or 16");
        if bits != 16 {
            ensure!(group > 0, "group size = 0: must be ≥ 1");
            ensure!(
                numel % group == 0,
                "group size {group} does not divide a tensor of {numel} elements; choose a group size that divides it"
            );
            ensure!(bits != 4 || group % 2 == 0, "4-bit group size {group}: must be even");
            ensure!(group <= MAX_GROUP, "group size {group}: must be ≤ {MAX_GROUP}");
        }
        let (bytes, groups) = Self::layout(numel, bits, group);
        Ok(QTensor { bits, group, numel, codes: vec![0; bytes], scale: vec![0.0; groups], zero: vec![0.0; groups] })
    }

    /// (code bytes, groups) of a `numel`-element tensor: 4-bit codes packed two a byte,
    /// 8-bit codes one a byte, bf16 two bytes an element and no groups.
    pub fn layout(numel: usize, bits: u8, group: usize) -> (usize, usize) {
        let groups = if bits == 16 { 0 } else { numel.div_ceil(group) };
        let codes = match bits {
            4 => numel.div_ceil(2),
            8 => numel,
            _ => numel * 2,
        };
        (codes, groups)
    }

    /// Bytes a tensor holds, without building it: codes plus an f32 scale and zero per group.
    pub fn storage_bytes(numel: usize, bits: u8, group: usize) -> usize {
        let (codes, groups) = Self::layout(numel, bits, group);
        codes + 2 * 4 * groups
    }

    /// Bytes held (codes plus f32 scale and zero per group).
    pub fn bytes(&self) -> usize {
        Self::storage_bytes(self.numel, self.bits, self.group)
    }

    pub fn qmax(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    #[inline]
    fn code(&self, i: usize) -> u8 {
        match self.bits {
            8 => self.codes[i],
            _ => (self.codes[i / 2] >> ((i & 1) * 4)) & 0xf,
        }
    }

    /// Dequantizes into `out` (len = numel): ŵ = (q − z)·s (bf16 widened for 16-bit).
    /// The forward pass and the optimizer both call this (docs/algorithm-spec.md I-11).
    pub fn dequantize(&self, out: &mut [f32]) {
        assert!(out.len() >= self.numel);
        if self.bits == 16 {
            out[..self.numel].par_chunks_mut(4096).enumerate().for_each(|(ci, o)| {
                for (j, v) in o.iter_mut().enumerate() {
                    let i = ci * 4096 + j;
                    *v = bf16_to_f32(u16::from_le_bytes([self.codes[2 * i], self.codes[2 * i + 1]]));
                }
            });
            return;
        }
        let g = self.group;
        // Several groups per task keep rayon's overhead small next to the work.
        let per = (16384 / g).max(1);
        out[..self.numel].par_chunks_mut(g * per).enumerate().for_each(|(ti, o)| {
            for (k, og) in o.chunks_mut(g).enumerate() {
                let gi = ti * per + k;
                let (s, z) = (self.scale[gi], self.zero[gi]);
                if self.bits == 8 {
                    for (v, &c) in og.iter_mut().zip(&self.codes[gi * g..(gi + 1) * g]) {
                        *v = (c as f32 - z) * s;
                    }
                } else {
                    for (j, v) in og.iter_mut().enumerate() {
                        *v = (self.code(gi * g + j) as f32 - z) * s;
                    }
                }
            }
        });
    }

    /// Round-to-nearest quantization of `src` (initial conversion, projector refresh).
    pub fn quantize(&mut self, src: &[f32], range: Range) {
        self.requantize(src, range, None);
    }

    /// Quantizes `src` with fresh per-group scale and zero. With `sr = Some(key)` the
    /// codes are stochastically rounded with uniforms keyed by (key, element index).
    pub fn requantize(&mut self, src: &[f32], range: Range, sr: Option<u64>) {
        assert!(src.len() >= self.numel);
        if self.bits == 16 {
            let codes = &mut self.codes;
            codes.par_chunks_mut(2).zip(src[..self.numel].par_iter()).for_each(|(c, &x)| {
                c.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
            });
            return;
        }
        let (g, bits, qmax) = (self.group, self.bits, self.qmax());
        let bytes_per_group = if bits == 8 { g } else { g / 2 };
        let QTensor { codes, scale, zero, .. } = self;
        codes
            .par_chunks_mut(bytes_per_group)
            .zip(scale.par_iter_mut())
            .zip(zero.par_iter_mut())
            .enumerate()
            .for_each(|(gi, ((cg, s), z))| {
                let w = &src[gi * g..(gi + 1) * g];
                let (sv, zv) = group_params(w, qmax, range);
                *s = sv;
                *z = zv;
                let base = (gi * g) as u64;
                for (j, &x) in w.iter().enumerate() {
                    let q = round_code(x / sv, zv, qmax, sr.map(|k| rng::uniform(k, base + j as u64)));
                    if bits == 8 {
                        cg[j] = q;
                    } else if j & 1 == 0 {
                        cg[j / 2] = q;
                    } else {
                        cg[j / 2] |= q << 4;
                    }
                }
            });
    }

    /// The fused Q-GaLore weight update (docs/algorithm-spec.md §2.4 steps 2–7, in f32): per group, dequantize,
    /// add `delta`, apply decoupled decay (`decay` = 1 − η·λ, after the update as the
    /// reference does), recompute scale and zero, requantize with stochastic rounding
    /// (or round-to-nearest when `sr` is None).
    pub fn update(&mut self, delta: &[f32], decay: f32, range: Range, sr: Option<u64>) {
        assert!(self.bits == 8 && delta.len() >= self.numel);
        let (g, qmax) = (self.group, self.qmax());
        let QTensor { codes, scale, zero, .. } = self;
        let wide = wide_simd();
        codes.par_chunks_mut(g).zip(scale.par_iter_mut()).zip(zero.par_iter_mut()).enumerate().for_each(
            |(gi, ((cg, s), z))| {
                let d = &delta[gi * g..(gi + 1) * g];
                let base = (gi * g) as u64;
                if wide {
                    // SAFETY: the CPU has AVX2, FMA and SSE4.1 (checked by `wide_simd`)
                    unsafe { update_group_avx2(cg, s, z, d, decay, qmax, range, sr, base) }
                } else {
                    update_group(cg, s, z, d, decay, qmax, range, sr, base)
                }
            },
        );
    }
}

/// Whether this CPU runs the AVX2 builds of the per-group loops. They are the same Rust
/// source compiled with wider instructions (Rust never contracts a·b + c into an FMA, and
/// vectorizes only element-wise work, never reorders a sum), so results are bit-identical;
/// the gain is vector lanes for the dequantize/update loop, the counter-based random
/// numbers and one-instruction floor/round where the x86-64 baseline calls libm.
#[inline]
pub(crate) fn wide_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("sse4.1")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One group of `QTensor::update`: dequantize, add, decay, new scale and zero, requantize.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn update_group(cg: &mut [u8], s: &mut f32, z: &mut f32, d: &[f32], decay: f32, qmax: f32, range: Range, sr: Option<u64>, base: u64) {
    let g = cg.len();
    let mut w = [0.0f32; MAX_GROUP];
    let w = if g <= MAX_GROUP { &mut w[..g] } else { unreachable!("group sizes are capped at {MAX_GROUP}") };
    for j in 0..g {
        let v = (cg[j] as f32 - *z) * *s + d[j];
        w[j] = if decay != 1.0 { v * decay } else { v };
    }
    let (sv, zv) = group_params(w, qmax, range);
    *s = sv;
    *z = zv;
    match sr {
        Some(k) => {
            // the group's uniforms first (a loop the compiler vectorizes), then the codes
            let mut u = [0.0f32; MAX_GROUP];
            for (j, u) in u[..g].iter_mut().enumerate() {
                *u = rng::uniform(k, base + j as u64);
            }
            for j in 0..g {
                cg[j] = round_code(w[j] / sv, zv, qmax, Some(u[j]));
            }
        }
        None => {
            for j in 0..g {
                cg[j] = round_code(w[j] / sv, zv, qmax, None);
            }
        }
    }
}

/// `update_group` compiled for AVX2 + FMA + SSE4.1 (see `wide_simd`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,sse4.1")]
unsafe fn update_group_avx2(cg: &mut [u8], s: &mut f32, z: &mut f32, d: &[f32], decay: f32, qmax: f32, range: Range, sr: Option<u64>, base: u64) {
    update_group(cg, s, z, d, decay, qmax, range, sr, base)
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn update_group_avx2(cg: &mut [u8], s: &mut f32, z: &mut f32, d: &[f32], decay: f32, qmax: f32, range: Range, sr: Option<u64>, base: u64) {
    update_group(cg, s, z, d, decay, qmax, range, sr, base)
}

/// Scale and zero point of one group: s = max(max − min, 1e-5)/qmax,
/// z = clamp(−round(min/s), 0, qmax) (round half to even, as torch.round).
#[inline]
pub fn group_params(w: &[f32], qmax: f32, range: Range) -> (f32, f32) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in w {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if range == Range::WithZero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    let s = (hi - lo).max(1e-5) / qmax;
    let z = (-(lo / s)).round_ties_even().clamp(0.0, qmax);
    (s, z)
}

/// q = clamp(round(x) + z, 0, qmax); with a uniform `u`, round(x) is stochastic:
/// ⌊x⌋ + 1 when u < x − ⌊x⌋ (docs/algorithm-spec.md §2.4 step 6), so E[q] = x + z inside the range.
#[inline]
pub fn round_code(x: f32, z: f32, qmax: f32, u: Option<f32>) -> u8 {
    let r = match u {
        Some(u) => {
            let f = x.floor();
            if u < x - f {
                f + 1.0
            } else {
                f
            }
        }
        None => x.round_ties_even(),
    };
    (r + z).clamp(0.0, qmax) as u8
}

/// f32 → bf16 with round-to-nearest-even (quiet NaN kept).
#[inline]
pub fn f32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    // branch-free (a select), so that loops over slices vectorize
    let nan = (u & 0x7fff_ffff) > 0x7f80_0000;
    let quiet = (u >> 16) | 0x40;
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16;
    (if nan { quiet } else { rounded }) as u16
}

#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}
