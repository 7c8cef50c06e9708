//! bitsandbytes 0.43.1 block-wise 8-bit Adam (docs/algorithm-spec.md §1.6): dynamic code books,
//! per-block absmax, non-finite gradient elements skipped, fp32 states for small tensors.

use rayon::prelude::*;

/// Tensors with fewer elements keep fp32 states (bnb `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// Largest state block (the config allows 256 and 2048): a block's dequantized moments are
/// kept on the stack, and the CUDA `adam8` kernel's block of `bs / ITEMS` threads covers it.
pub const MAX_BLOCK: usize = 2048;

/// `create_dynamic_map(signed, max_exponent_bits = 7, total_bits = 8)`: for exponent
/// i = 0…6, the midpoints of linspace(0.1, 1, k_i) scaled by 10^(i−6), with
/// k_i = 2^i + 1 (signed, mirrored) or 2^(i+1) + 1 (unsigned); plus 0 and 1; sorted.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let k = if signed { (1usize << i) + 1 } else { (1usize << (i + 1)) + 1 };
        // torch.linspace in f32, then the midpoint in f32, as the reference builds it
        let b: Vec<f32> = (0..k).map(|j| (0.1f64 + 0.9f64 * j as f64 / (k - 1) as f64) as f32).collect();
        let scale = 10f64.powi(i - 6);
        for j in 0..k - 1 {
            let mid = ((b[j] + b[j + 1]) / 2.0) as f64;
            data.push((scale * mid) as f32);
            if signed {
                data.push((-scale * mid) as f32);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// Nearest code of `x` in the sorted map (midpoint rule, ties to the lower code). For the
/// signed map, a code whose sign disagrees with x is moved one step toward x's sign.
#[inline]
pub fn quantize(map: &[f32; 256], x: f32, signed: bool) -> u8 {
    // Branchless search for the last code nearer to x than its lower neighbour: the same
    // answer as a binary search plus the neighbour comparison, without mispredictions.
    let mut i = 0usize;
    let mut step = 128usize;
    while step > 0 {
        let j = i + step;
        i += step * ((x - map[j - 1] > map[j] - x) as usize);
        step >>= 1;
    }
    fix_sign(map, x, signed, i)
}

/// For the signed map, moves a code whose sign disagrees with x one step toward x's sign.
#[inline]
fn fix_sign(map: &[f32; 256], x: f32, signed: bool, mut i: usize) -> u8 {
    if signed {
        if x > 0.0 && map[i] < 0.0 && i < 255 {
            i += 1;
        } else if x < 0.0 && map[i] > 0.0 && i > 0 {
            i -= 1;
        }
    }
    i as u8
}

/// The reference search (binary search, then the nearer neighbour); kept to test
/// `quantize` against.
pub fn quantize_reference(map: &[f32; 256], x: f32, signed: bool) -> u8 {
    let (mut lo, mut hi) = (0usize, 256usize);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if map[mid] <= x {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let idx = if lo == 0 {
        0
    } else if lo == 256 {
        255
    } else {
        let (a, b) = (map[lo - 1], map[lo]);
        if x - a <= b - x {
            lo - 1
        } else {
            lo
        }
    };
    fix_sign(map, x, signed, idx)
}

/// Hyper-parameters of one bnb Adam update (the same fields as AdamW's).
pub type BnbHp = crate::adam::AdamHp;

/// Block-wise 8-bit state of one tensor.
#[derive(Clone, Debug)]
pub struct State8 {
    pub block: usize,
    pub m: Vec<u8>,
    pub v: Vec<u8>,
    pub absmax_m: Vec<f32>,
    pub absmax_v: Vec<f32>,
}

impl State8 {
    pub fn new(n: usize, block: usize) -> Self {
        let blocks = n.div_ceil(block);
        // code of 0.0 in each map, so a fresh state dequantizes to zeros
        let (sm, um) = (dynamic_map(true), dynamic_map(false));
        let (zs, zu) = (quantize(&sm, 0.0, true), quantize(&um, 0.0, false));
        State8 { block, m: vec![zs; n], v: vec![zu; n], absmax_m: vec![0.0; blocks], absmax_v: vec![0.0; blocks] }
    }

    /// Bytes an `n`-element state holds, without building it: one code per element for
    /// each moment, plus an f32 absmax per block for each.
    pub fn storage_bytes(n: usize, block: usize) -> usize {
        2 * n + 2 * 4 * n.div_ceil(block)
    }

    pub fn bytes(&self) -> usize {
        Self::storage_bytes(self.m.len(), self.block)
    }
}

/// Code books shared by every 8-bit state.
pub struct Maps {
    pub signed: [f32; 256],
    pub unsigned: [f32; 256],
}

impl Maps {
    pub fn new() -> Self {
        Maps { signed: dynamic_map(true), unsigned: dynamic_map(false) }
    }
}

impl Default for Maps {
    fn default() -> Self {
        Self::new()
    }
}

/// `kOptimizerStatic8bit2StateBlockwise`: per block, dequantize, update the moments
/// (skipping non-finite gradients: m = v = 0, p unchanged), take the new absmax, update
/// p, then requantize. Returns the number of non-finite gradient elements skipped.
pub fn step8(p: &mut [f32], g: &[f32], st: &mut State8, maps: &Maps, hp: BnbHp) -> u64 {
    let n = p.len();
    step8_range(p, g, st, 0, n, maps, hp)
}

/// `step8` on elements [off, off + len) of the tensor: `p` and `g` hold just that range
/// and `off` is a multiple of the block size, so whole blocks are updated exactly as the
/// full step would (the fused step's row-chunked update of large tables).
pub fn step8_range(p: &mut [f32], g: &[f32], st: &mut State8, off: usize, len: usize, maps: &Maps, hp: BnbHp) -> u64 {
    let bs = st.block;
    assert!(off % bs == 0 && off + len <= st.m.len(), "8-bit Adam range {off}+{len} is not block-aligned");
    let (b0, b1e) = (off / bs, (off + len).div_ceil(bs));
    let State8 { m, v, absmax_m, absmax_v, .. } = st;
    let (m, v) = (&mut m[off..off + len], &mut v[off..off + len]);
    let (absmax_m, absmax_v) = (&mut absmax_m[b0..b1e], &mut absmax_v[b0..b1e]);
    let p = &mut p[..len];
    let wide = crate::quant::wide_simd();
    p.par_chunks_mut(bs)
        .zip(m.par_chunks_mut(bs))
        .zip(v.par_chunks_mut(bs))
        .zip(absmax_m.par_iter_mut().zip(absmax_v.par_iter_mut()))
        .enumerate()
        .map(|(bi, (((pb, mb), vb), (am, av)))| {
            let gb = &g[bi * bs..bi * bs + pb.len()];
            if wide {
                // SAFETY: the CPU has AVX2, FMA and SSE4.1 (checked by `wide_simd`)
                unsafe { block8_avx2(pb, gb, mb, vb, am, av, maps, hp) }
            } else {
                block8(pb, gb, mb, vb, am, av, maps, hp)
            }
        })
        .sum()
}

/// One block of `step8_range`: dequantize, update, new absmax, requantize; returns the
/// number of non-finite gradient elements skipped.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block8(pb: &mut [f32], gb: &[f32], mb: &mut [u8], vb: &mut [u8], am: &mut f32, av: &mut f32, maps: &Maps, hp: BnbHp) -> u64 {
    let (step_size, eps2) = hp.bnb_factors();
    let (b1, b2, decay) = (hp.beta1, hp.beta2, 1.0 - hp.lr * hp.weight_decay);
    let mut mv = [0.0f32; MAX_BLOCK];
    let mut vv = [0.0f32; MAX_BLOCK];
    let (mut nm, mut nv, mut skipped) = (0.0f32, 0.0f32, 0u64);
    for j in 0..pb.len() {
        let gj = gb[j];
        let (mut mj, mut vj) = (maps.signed[mb[j] as usize] * *am, maps.unsigned[vb[j] as usize] * *av);
        if gj.is_finite() {
            mj = b1 * mj + (1.0 - b1) * gj;
            vj = b2 * vj + (1.0 - b2) * gj * gj;
            pb[j] += step_size * (mj / (vj.sqrt() + eps2));
            if hp.weight_decay > 0.0 {
                pb[j] *= decay;
            }
        } else {
            mj = 0.0;
            vj = 0.0;
            skipped += 1;
        }
        mv[j] = mj;
        vv[j] = vj;
        nm = nm.max(mj.abs());
        nv = nv.max(vj.abs());
    }
    *am = nm;
    *av = nv;
    let (im, iv) = (if nm > 0.0 { 1.0 / nm } else { 0.0 }, if nv > 0.0 { 1.0 / nv } else { 0.0 });
    for j in 0..pb.len() {
        mb[j] = quantize(&maps.signed, mv[j] * im, true);
        vb[j] = quantize(&maps.unsigned, vv[j] * iv, false);
    }
    skipped
}

/// `block8` compiled for AVX2 + FMA + SSE4.1 (bit-identical, see `crate::quant::wide_simd`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,sse4.1")]
unsafe fn block8_avx2(pb: &mut [f32], gb: &[f32], mb: &mut [u8], vb: &mut [u8], am: &mut f32, av: &mut f32, maps: &Maps, hp: BnbHp) -> u64 {
    block8(pb, gb, mb, vb, am, av, maps, hp)
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn block8_avx2(pb: &mut [f32], gb: &[f32], mb: &mut [u8], vb: &mut [u8], am: &mut f32, av: &mut f32, maps: &Maps, hp: BnbHp) -> u64 {
    block8(pb, gb, mb, vb, am, av, maps, hp)
}

/// `kOptimizer32bit2State` (ADAM): the same update with fp32 moments, for tensors below
/// `MIN_8BIT_SIZE`. Returns the number of non-finite gradient elements skipped.
pub fn step32(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: BnbHp) -> u64 {
    let (step_size, eps2) = hp.bnb_factors();
    let (b1, b2, decay) = (hp.beta1, hp.beta2, 1.0 - hp.lr * hp.weight_decay);
    let mut skipped = 0;
    for j in 0..p.len() {
        let gj = g[j];
        if !gj.is_finite() {
            skipped += 1;
            continue;
        }
        m[j] = b1 * m[j] + (1.0 - b1) * gj;
        v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
        p[j] += step_size * (m[j] / (v[j].sqrt() + eps2));
        if hp.weight_decay > 0.0 {
            p[j] *= decay;
        }
    }
    skipped
}
