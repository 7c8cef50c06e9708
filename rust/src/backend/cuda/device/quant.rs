//! Quantized tensors on the device (`rust/kernels/quant.cu`): INT8/INT4 codes with group
//! scale and zero, or bf16, and the fused requantizing update; QLoRA's frozen NF4 base
//! (`rust/kernels/nf4.cu`), resident on the device and dequantized there per GEMM.

use super::memory::{CudaBuf, Store};
use super::{dev_err, Cuda};
use crate::backend::cuda::launch;
use crate::backend::{Category, Quantization, Tracked};
use crate::error::Result;
use crate::quant::nf4::Nf4Tensor;
use crate::quant::{QTensor, Range};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::borrow::Cow;

pub struct CudaQ {
    /// Bytes as the CPU layout counts them (codes + f32 scale and zero per group).
    pub bytes: usize,
    pub bits: u8,
    pub group: usize,
    pub numel: usize,
    pub codes: CudaSlice<u8>,
    pub scale: CudaSlice<f32>,
    pub zero: CudaSlice<f32>,
    _t: Tracked<()>,
}

/// A double-quantized NF4 tensor on the device, in `Nf4Tensor`'s layout.
pub struct CudaNf4 {
    pub numel: usize,
    /// u8[⌈n/2⌉], element 2i in the high nibble.
    pub codes: CudaSlice<u8>,
    /// u8[⌈n/64⌉]: codes of the dynamic map.
    pub qabsmax: CudaSlice<u8>,
    /// f32[⌈n/64/256⌉].
    pub absmax2: CudaSlice<f32>,
    /// A kernel argument: the mean of the first-level absmax values.
    pub offset: f32,
    _t: Tracked<()>,
}

impl Quantization for Cuda {
    type Q = CudaQ;
    type N = CudaNf4;


    fn q_new(&self, numel: usize, bits: u8, group: usize, cat: Category) -> Result<CudaQ> {
        // the CPU type validates shapes and gives the byte layout
        let host = crate::quant::QTensor::new(numel, bits, group)?;
        let a8 = |n: usize| self.stream.alloc_zeros::<u8>(n.max(1)).map_err(|e| dev_err("alloc", e));
        let a32 = |n: usize| self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| dev_err("alloc", e));
        Ok(CudaQ {
            bytes: host.bytes(),
            bits,
            group,
            numel,
            codes: a8(host.codes.len())?,
            scale: a32(host.scale.len())?,
            zero: a32(host.zero.len())?,
            _t: Tracked::new((), host.bytes(), cat, &self.mem),
        })
    }
    fn q_bytes(&self, q: &CudaQ) -> usize {
        q.bytes
    }
    fn q_quantize(&self, q: &mut CudaQ, src: &CudaBuf, range: Range) {
        if q.bits == 16 {
            let n = q.numel as u64;
            self.note("bf16_quant", launch!(self, self.f("bf16_quant"), launch::elems(q.numel); &mut q.codes, src.data.f32(), &n));
            return;
        }
        self.requant(q, src.data.f32(), 1.0, false, range, None);
    }
    fn q_dequantize(&self, dst: &mut CudaBuf, q: &CudaQ) {
        let n = q.numel as u64;
        match (&mut dst.data, q.bits) {
            (Store::F32(d), 16) => {
                self.note("bf16_dequant", launch!(self, self.f("bf16_dequant"), launch::elems(q.numel); d, &q.codes, &n));
            }
            (Store::Bf16(d), 16) => {
                // bf16 storage is already the GEMM operand: a byte copy
                self.bind();
                let (dp, _g1) = d.device_ptr_mut(&self.stream);
                let (sp, _g2) = q.codes.device_ptr(&self.stream);
                let r = unsafe { cudarc::driver::result::memcpy_dtod_async(dp, sp, q.numel * 2, self.stream.cu_stream()) };
                self.note("copy", r);
            }
            (data, _) => {
                let (bits, group) = (q.bits as i32, q.group as i32);
                let name = if data.is_bf16() { "q_dequant_bf16" } else { "q_dequant" };
                self.note(name, launch!(self, self.f(name), launch::elems(q.numel); data, &q.codes, &q.scale, &q.zero, &bits, &group, &n));
            }
        }
    }
    fn q_update(&self, q: &mut CudaQ, delta: &CudaBuf, decay: f32, range: Range, sr: Option<u64>) {
        self.requant(q, delta.data.f32(), decay, true, range, sr);
    }
    fn q_to_host<'a>(&self, q: &'a CudaQ) -> Result<Cow<'a, QTensor>> {
        let mut h = QTensor::new(q.numel, q.bits, q.group)?;
        let c = |e| dev_err("copy", e);
        self.stream.memcpy_dtoh(&q.codes, &mut h.codes[..]).map_err(c)?;
        if !h.scale.is_empty() {
            let n = h.scale.len();
            self.stream.memcpy_dtoh(&q.scale.slice(..n), &mut h.scale[..]).map_err(c)?;
            self.stream.memcpy_dtoh(&q.zero.slice(..n), &mut h.zero[..]).map_err(c)?;
        }
        Ok(Cow::Owned(h))
    }
    fn q_from_host(&self, q: &mut CudaQ, fill: impl FnOnce(&mut QTensor) -> Result<()>) -> Result<()> {
        // a host tensor of the same shape receives the values (nothing to download)
        let mut h = QTensor::new(q.numel, q.bits, q.group)?;
        fill(&mut h)?;
        let c = |e| dev_err("copy", e);
        self.stream.memcpy_htod(&h.codes, &mut q.codes).map_err(c)?;
        if !h.scale.is_empty() {
            self.stream.memcpy_htod(&h.scale, &mut q.scale.slice_mut(..h.scale.len())).map_err(c)?;
            self.stream.memcpy_htod(&h.zero, &mut q.zero.slice_mut(..h.zero.len())).map_err(c)?;
        }
        Ok(())
    }

    fn nf4_new(&self, t: Nf4Tensor, cat: Category) -> Result<CudaNf4> {
        let c = |e| dev_err("copy", e);
        Ok(CudaNf4 {
            numel: t.numel,
            codes: self.stream.clone_htod(&t.codes[..]).map_err(c)?,
            qabsmax: self.stream.clone_htod(&t.qabsmax[..]).map_err(c)?,
            absmax2: self.stream.clone_htod(&t.absmax2[..]).map_err(c)?,
            offset: t.offset,
            // the bytes the plan counts (Nf4Tensor::storage_bytes), as on the CPU
            _t: Tracked::new((), t.bytes(), cat, &self.mem),
        })
    }
    fn nf4_numel(&self, t: &CudaNf4) -> usize {
        t.numel
    }
    fn nf4_dequantize_rows(&self, dst: &mut CudaBuf, t: &CudaNf4, cols: usize, rows: std::ops::Range<usize>) {
        let (start, end) = (rows.start * cols, rows.end * cols);
        assert!(cols > 0 && start <= end && end <= t.numel, "NF4 rows {rows:?} × {cols} outside {} elements", t.numel);
        assert!(dst.data.len() >= end - start, "NF4 dequantize_rows: {} values into a buffer of {}", end - start, dst.data.len());
        if start == end {
            return;
        }
        let (s, n) = (start as u64, (end - start) as u64);
        let name = if dst.data.is_bf16() { "nf4_dequant_bf16" } else { "nf4_dequant" };
        self.note(name, launch!(self, self.f(name), launch::elems(end - start); &mut dst.data, &t.codes, &t.qabsmax, &t.absmax2, &self.nf4_tables, &t.offset, &s, &n));
    }
    fn nf4_to_host<'a>(&self, t: &'a CudaNf4) -> Result<Cow<'a, Nf4Tensor>> {
        let c = |e| dev_err("copy", e);
        let mut h = Nf4Tensor {
            numel: t.numel,
            codes: vec![0u8; t.codes.len()],
            qabsmax: vec![0u8; t.qabsmax.len()],
            absmax2: vec![0f32; t.absmax2.len()],
            offset: t.offset,
        };
        self.stream.memcpy_dtoh(&t.codes, &mut h.codes[..]).map_err(c)?;
        self.stream.memcpy_dtoh(&t.qabsmax, &mut h.qabsmax[..]).map_err(c)?;
        self.stream.memcpy_dtoh(&t.absmax2, &mut h.absmax2[..]).map_err(c)?;
        Ok(Cow::Owned(h))
    }
}

impl Cuda {
    fn requant(&self, q: &mut CudaQ, src: &CudaSlice<f32>, decay: f32, update: bool, range: Range, sr: Option<u64>) {
        let (upd, bits, wz, use_sr, key) =
            (update as i32, q.bits as i32, (range == Range::WithZero) as i32, sr.is_some() as i32, sr.unwrap_or(0));
        let group = q.group as i32;
        self.note("q_requant", launch!(self, self.f("q_requant"), launch::requant(q.numel, q.group); &mut q.codes, &mut q.scale, &mut q.zero, src, src, &decay, &upd, &bits, &wz, &use_sr, &key, &group));
    }
}
