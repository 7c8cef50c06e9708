//! QLoRA NF4 storage for frozen base weights: 4-bit NormalFloat codes in blocks of 64 with
//! double quantization of the block constants, exactly as bitsandbytes computes them
//! (QLoRA NF4, bitsandbytes `functional.py` `get_4bit_type("nf4")`, `quantize_4bit`,
//! `dequantize_4bit`, `create_dynamic_map`; `backends/default/ops.py` `quantize_4bit`,
//! `quantize_blockwise`, `_dequantize_4bit_compute`; design11.md §2.1–2.4).
//!
//! Layout of an n-element tensor (flattened row-major, as bnb flattens the `[out, in]` weight):
//! * `codes`: u8[⌈n/2⌉], element 2i in the HIGH nibble of byte i, 2i+1 in the low nibble
//!   (the opposite of `QTensor`'s 4-bit layout, §2.3); an odd n pads a code 7 (= 0.0).
//! * one absmax per block of [`BLOCK`] = 64 elements, nb = ⌈n/64⌉ of them, double-quantized:
//!   `offset` = their mean, and `absmax − offset` quantized in blocks of [`DQ_BLOCK`] = 256 with
//!   the signed 8-bit dynamic map ([`bnb_dynamic_map`]) into `qabsmax` (u8[nb]) with one f32
//!   `absmax2` per 256 (§2.4).
//!
//! Dequantization (§2.4): absmax_j = dyn[qabsmax_j]·absmax2[j/256] + offset, then
//! w_k = NF4[code_k]·absmax_{k/64}, each an f32 multiply (and add), never fused.

use crate::ensure;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

/// NF4 block size (QLoRA paper §3; bnb `blocksize=64`, the `Linear4bit` default).
pub const BLOCK: usize = 64;
/// Block size of the second quantization level (bnb `quantize_blockwise(..., blocksize=256)`).
pub const DQ_BLOCK: usize = 256;

/// The 16 NF4 levels as f32 bit patterns: bnb `get_4bit_type("nf4")` (functional.py), equal
/// to `nf4_dequantization_lut` in `csrc/kernels.cu` (design11.md §2.1). Code 7 is 0.0.
pub const NF4_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000, //
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// The 16 NF4 levels, −1 … 1 ascending.
pub const NF4: [f32; 16] = {
    let mut v = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        v[i] = f32::from_bits(NF4_BITS[i]);
        i += 1;
    }
    v
};

/// f32 midpoints (NF4[i] + NF4[i+1]) / 2: bnb's `bucketize` bounds on the default path, and
/// bit-equal to the CUDA `dQuantizeNF4` thresholds (design11.md §2.2).
pub const NF4_MID: [f32; 15] = {
    let mut m = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (NF4[i] + NF4[i + 1]) / 2.0;
        i += 1;
    }
    m
};

/// The floor bnb puts under an absmax before taking its reciprocal (`clamp(min=1e-38)`), so an
/// all-zero block scales to 0 and gets code 7 instead of the NaN of 0·∞.
const ABSMAX_FLOOR: f32 = 1e-38;

/// Code of a value already scaled to [−1, 1]: the number of bounds strictly below it, i.e.
/// `torch.bucketize(x, bounds, right=False)`: a value exactly on a midpoint goes to the LOWER
/// code (design11.md §2.2). `bounds` is ascending.
#[inline]
fn bucket(bounds: &[f32], x: f32) -> u8 {
    bounds.partition_point(|&m| m < x) as u8
}

/// Scales one block to [−1, 1] and writes its codes through `put(j, code)`; returns the absmax
/// bnb stores for it. A full block multiplies by the reciprocal `1/max(absmax, 1e-38)` and
/// stores the raw absmax; a trailing partial block divides by the floored absmax and stores
/// that (bnb `backends/default/ops.py` `quantize_4bit` / `quantize_blockwise`, both the same).
#[inline]
fn scale_block(x: &[f32], full: bool, bounds: &[f32], mut put: impl FnMut(usize, u8)) -> f32 {
    let am = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if full {
        let inv = 1.0f32 / am.max(ABSMAX_FLOOR);
        for (j, &v) in x.iter().enumerate() {
            put(j, bucket(bounds, (v * inv).clamp(-1.0, 1.0)));
        }
        am
    } else {
        let am = am.max(ABSMAX_FLOOR);
        for (j, &v) in x.iter().enumerate() {
            put(j, bucket(bounds, (v / am).clamp(-1.0, 1.0)));
        }
        am
    }
}

/// ⌈n/64⌉: the number of NF4 blocks (and first-level absmax values) of an n-element tensor.
pub fn blocks(numel: usize) -> usize {
    numel.div_ceil(BLOCK)
}

/// Refuses what NF4 cannot store: an empty tensor, or a NaN/±inf element (its block's absmax
/// and therefore every code of the block would be meaningless).
fn check_input(w: &[f32]) -> Result<()> {
    ensure!(!w.is_empty(), "NF4 quantization of an empty tensor: it needs at least one element");
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "NF4 quantization: element {i} is {}: weights must be finite (no NaN or infinity)",
            w[i]
        )));
    }
    Ok(())
}

/// First level only: packed NF4 codes and one f32 absmax per block of 64
/// (bnb `quantize_4bit(..., compress_statistics=False)`).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Plain {
    pub numel: usize,
    /// u8[⌈n/2⌉], element 2i in the high nibble.
    pub codes: Vec<u8>,
    /// f32[⌈n/64⌉].
    pub absmax: Vec<f32>,
}

impl Nf4Plain {
    /// Quantizes `w` (flattened row-major) blockwise to NF4.
    pub fn quantize(w: &[f32]) -> Result<Self> {
        check_input(w)?;
        let n = w.len();
        let nb = blocks(n);
        let mut codes = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0.0f32; nb];
        // A block of 64 owns 32 whole bytes, so blocks are independent tasks; the last chunk of
        // `codes` is ⌈rem/2⌉ bytes, matching the last chunk of `w`.
        codes.par_chunks_mut(BLOCK / 2).zip(absmax.par_iter_mut()).zip(w.par_chunks(BLOCK)).for_each(
            |((c, a), x)| {
                if x.len() % 2 == 1 {
                    // bnb pads an odd tensor with one 0.0, whose code is 7 (low nibble of the last byte).
                    c[x.len() / 2] = 7;
                }
                *a = scale_block(x, x.len() == BLOCK, &NF4_MID, |j, q| {
                    if j % 2 == 0 {
                        c[j / 2] = (q << 4) | (c[j / 2] & 0x0f);
                    } else {
                        c[j / 2] = (c[j / 2] & 0xf0) | q;
                    }
                });
            },
        );
        Ok(Nf4Plain { numel: n, codes, absmax })
    }

    /// Bytes of an n-element plain NF4 tensor: ⌈n/2⌉ codes + 4 per block of 64.
    pub fn storage_bytes(numel: usize) -> usize {
        numel.div_ceil(2) + 4 * blocks(numel)
    }

    /// Dequantizes into `out` (len ≥ numel): w_k = NF4[code_k]·absmax_{k/64}.
    pub fn dequantize(&self, out: &mut [f32]) {
        assert!(out.len() >= self.numel, "NF4 dequantize: out holds {} < {} elements", out.len(), self.numel);
        dequant_par(&self.codes, &self.absmax, 0, 0, &mut out[..self.numel]);
    }
}

/// NF4 with double quantization: what QLoRA stores for a frozen base weight
/// (bnb `quantize_4bit(..., quant_type="nf4", compress_statistics=True)`, the `Linear4bit` default).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    pub numel: usize,
    /// u8[⌈n/2⌉], element 2i in the high nibble (design11.md §2.3).
    pub codes: Vec<u8>,
    /// u8[⌈n/64⌉]: each block's absmax − offset as a code of [`bnb_dynamic_map`].
    pub qabsmax: Vec<u8>,
    /// f32[⌈n/64/256⌉]: the absmax of each group of 256 centred block constants.
    pub absmax2: Vec<f32>,
    /// The mean of the first-level absmax values.
    pub offset: f32,
}

impl Nf4Tensor {
    /// NF4 codes plus double-quantized block constants of `w` (flattened row-major).
    /// Non-finite or empty input is refused with a one-line error.
    pub fn quantize(w: &[f32]) -> Result<Self> {
        let p = Nf4Plain::quantize(w)?;
        let (qabsmax, absmax2, offset) = double_quantize(&p.absmax);
        Ok(Nf4Tensor { numel: p.numel, codes: p.codes, qabsmax, absmax2, offset })
    }

    /// Bytes of an n-element double-quantized NF4 tensor, the one formula the memory plan uses:
    /// ⌈n/2⌉ codes + ⌈n/64⌉ u8 constants + 4·⌈n/64/256⌉ f32 second-level absmax + 4 (offset)
    /// (design11.md §2.4: 0.5159 bytes = 4.127 bits per parameter). bnb's shared 1 KiB dynamic
    /// map and 16-level table are not per tensor and not counted.
    pub fn storage_bytes(numel: usize) -> usize {
        let nb = blocks(numel);
        numel.div_ceil(2) + nb + 4 * nb.div_ceil(DQ_BLOCK) + 4
    }

    /// Bytes held by this tensor (= `storage_bytes(numel)`).
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.qabsmax.len() + 4 * self.absmax2.len() + 4
    }

    /// The dequantized block constants: absmax_j = dyn[qabsmax_j]·absmax2[j/256] + offset
    /// (bnb `dequantize_4bit`: `dequantize_blockwise(...)` then `+= offset`, all f32).
    pub fn absmax(&self) -> Vec<f32> {
        let d = dyn_map();
        self.qabsmax.iter().enumerate().map(|(j, &q)| d[q as usize] * self.absmax2[j / DQ_BLOCK] + self.offset).collect()
    }

    /// Dequantizes the whole tensor into `out` (len ≥ numel).
    pub fn dequantize(&self, out: &mut [f32]) {
        assert!(out.len() >= self.numel, "NF4 dequantize: out holds {} < {} elements", out.len(), self.numel);
        dequant_par(&self.codes, &self.absmax(), 0, 0, &mut out[..self.numel]);
    }

    /// Dequantizes rows `rows` of the tensor viewed as [numel/cols, cols] into `out`
    /// (len = rows.len()·cols), for a matmul that never holds the whole dense weight. Rows need
    /// not align with blocks of 64: the block constants are dequantized per element's block.
    pub fn dequantize_rows(&self, cols: usize, rows: Range<usize>, out: &mut [f32]) {
        let (start, end) = (rows.start * cols, rows.end * cols);
        assert!(cols > 0 && start <= end && end <= self.numel, "NF4 rows {rows:?} × {cols} outside {} elements", self.numel);
        assert_eq!(out.len(), end - start, "NF4 dequantize_rows: out length");
        let (b0, b1) = (start / BLOCK, end.div_ceil(BLOCK));
        let d = dyn_map();
        // Only the constants of the blocks the rows touch, indexed from block b0.
        let am: Vec<f32> =
            (b0..b1).map(|j| d[self.qabsmax[j] as usize] * self.absmax2[j / DQ_BLOCK] + self.offset).collect();
        dequant_par(&self.codes, &am, b0, start, out);
    }
}

/// Entries of [`kernel_tables`]: the 16 NF4 levels, then the 256 of the dynamic map.
pub const KERNEL_TABLES: usize = 16 + 256;

/// The constants a device dequantization reads (`rust/kernels/nf4.cu`): [`NF4`] then
/// [`dyn_map`], so the kernel source restates neither.
pub fn kernel_tables() -> Vec<f32> {
    let mut t = Vec::with_capacity(KERNEL_TABLES);
    t.extend_from_slice(&NF4);
    t.extend_from_slice(dyn_map());
    t
}

/// Elements per parallel task of a dequantization: big enough that rayon's overhead is small.
const DEQUANT_CHUNK: usize = 16 * 1024;

/// Dequantizes global elements [start, start + out.len()) from packed `codes` and per-block
/// `absmax` whose entry 0 belongs to block `b0`.
fn dequant_par(codes: &[u8], absmax: &[f32], b0: usize, start: usize, out: &mut [f32]) {
    out.par_chunks_mut(DEQUANT_CHUNK).enumerate().for_each(|(ci, o)| {
        let s = start + ci * DEQUANT_CHUNK;
        for (j, v) in o.iter_mut().enumerate() {
            let k = s + j;
            let q = (codes[k / 2] >> (if k % 2 == 0 { 4 } else { 0 })) & 0x0f;
            *v = NF4[q as usize] * absmax[k / BLOCK - b0];
        }
    });
}

/// Second level (design11.md §2.4, bnb `quantize_4bit(compress_statistics=True)`):
/// offset = mean(absmax); (absmax − offset) quantized in blocks of 256 with the signed dynamic
/// map by exact nearest on its f32 midpoints (ties to the lower code), as bnb's default
/// `quantize_blockwise` (a full block multiplies by 1/max(absmax2, 1e-38), a partial one divides).
/// The mean is taken in f64 and rounded once; torch's f32 reduction may differ in the last ulp
/// (design11.md §8), which moves every centred value by that ulp, far below a code step.
/// Returns (qabsmax, absmax2, offset).
pub fn double_quantize(absmax: &[f32]) -> (Vec<u8>, Vec<f32>, f32) {
    let nb = absmax.len();
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / nb as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mid = dyn_mid();
    let mut q = vec![0u8; nb];
    let absmax2: Vec<f32> = q
        .chunks_mut(DQ_BLOCK)
        .zip(centred.chunks(DQ_BLOCK))
        .map(|(qc, c)| scale_block(c, c.len() == DQ_BLOCK, mid, |j, code| qc[j] = code))
        .collect();
    (q, absmax2, offset)
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU, bit for bit: the loop of
/// `aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp` `linspace_kernel`, step = (end − start)/(steps − 1)
/// in f32, start + step·i for i < steps/2 and end − step·(steps − 1 − i) after, each a FUSED
/// multiply-add: torch's CPU kernels are compiled with FMA contraction, and bitsandbytes 0.50.2's
/// `create_dynamic_map` on torch 2.15 matches only the fused form (an unfused multiply then add
/// differs in 42 of the 256 entries; tests/nf4.rs `the_dynamic_map_equals_bitsandbytes` against
/// the fixture of tools/peft_fixtures.py).
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - 1 - i) as f32, end) })
        .collect()
}

/// bnb `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` as torch builds it
/// (functional.py): for i = 0…6, `b = torch.linspace(0.1, 1, 2^i + 1)` (f32,
/// [`torch_linspace_f32`]), `means = (b[:-1] + b[1:]) / 2.0` (f32), then `±(10**(i−6)) * means`: a
/// tensor times a Python float, which torch computes in f32 after rounding the scalar to f32;
/// plus 0 and 1.0, sorted. 127 negatives, 0, 128 positives; range [−0.99296874, 1].
///
/// This is a separate construction from `adam8::dynamic_map`, which computes the linspace in f64
/// and the scale product in f64: the two differ in a few entries by an ulp or two
/// (tests/nf4.rs `dynamic_map_vs_adam8` lists which). The bnb fixture (tools/peft_fixtures.py,
/// `dynamic_code`) is the arbiter.
pub fn bnb_dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let b = torch_linspace_f32(0.1, 1.0, (1usize << i) + 1);
        let scale = 10f64.powi(i - 6) as f32;
        for w in b.windows(2) {
            let m = (w[0] + w[1]) / 2.0;
            data.push(scale * m);
            data.push(-scale * m);
        }
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), 256);
    data.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// The map used for double quantization, built once.
pub fn dyn_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(bnb_dynamic_map)
}

/// f32 midpoints of [`dyn_map`]: bnb default `quantize_blockwise`'s `(code[:-1] + code[1:]) / 2`.
pub fn dyn_mid() -> &'static [f32; 255] {
    static MID: OnceLock<[f32; 255]> = OnceLock::new();
    MID.get_or_init(|| {
        let d = dyn_map();
        let mut m = [0.0f32; 255];
        for i in 0..255 {
            m[i] = (d[i] + d[i + 1]) / 2.0;
        }
        m
    })
}
