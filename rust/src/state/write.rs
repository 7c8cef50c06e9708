//! Writing a checkpoint: the safetensors header (metadata first, the checksum its first
//! value, then the tensor index in data order) and the tensors streamed one at a time,
//! hashed as they go; the checksum digits are patched in at the end.
//!
//! The engine describes its state once through `Out` in plan mode (names, dtypes, shapes:
//! the header), then again in write mode, where each tensor's bytes are fetched (one
//! download per tensor on a GPU) and written; write mode checks that the same tensors come
//! in the same order.

use super::tensors::{f32_bytes, Dtype, Entry};
use super::{CHECKSUM_AT, CHECKSUM_HEX, HEADER_PREFIX};
use crate::backend::{Memory, Optimizers, Quantization};
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::io::Write;

fn internal(what: String) -> Error {
    Error::backend(format!("internal: checkpoint writer: {what}"))
}

/// JSON string literal of `s`.
fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The header text: `{"__metadata__":{"checksum":"sha256:000…",<meta>},<tensors>}` padded
/// with spaces so the data starts 8-byte aligned (as the safetensors writer does).
/// `meta`: (key, value) pairs after the checksum. Offsets follow `entries`' order.
pub fn header(meta: &[(&str, String)], entries: &[Entry]) -> Result<Vec<u8>> {
    let mut s = String::from(HEADER_PREFIX);
    s.push_str(&"0".repeat(CHECKSUM_HEX));
    s.push('"');
    for (k, v) in meta {
        s.push(',');
        s.push_str(&json_str(k));
        s.push(':');
        s.push_str(&json_str(v));
    }
    s.push('}');
    let mut off = 0usize;
    for e in entries {
        let n = e.bytes().ok_or_else(|| internal(format!("{} is too large", e.name)))?;
        let shape: Vec<String> = e.shape.iter().map(|d| d.to_string()).collect();
        s.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            json_str(&e.name),
            e.dtype.name(),
            shape.join(","),
            off + n
        ));
        off += n;
    }
    s.push('}');
    while (8 + s.len()) % 8 != 0 {
        s.push(' ');
    }
    Ok(s.into_bytes())
}

/// A destination the checksum can be patched into once the data is written.
pub trait Target: Write {
    fn patch(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()>;
}

impl Target for Vec<u8> {
    fn patch(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        let at = at as usize;
        self[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

impl Target for std::fs::File {
    fn patch(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.write_all_at(bytes, at)
    }
}

impl<T: Target + ?Sized> Target for &mut T {
    fn patch(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        (**self).patch(at, bytes)
    }
}

impl<T: Target> Target for std::io::BufWriter<T> {
    fn patch(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.flush()?;
        self.get_mut().patch(at, bytes)
    }
}

/// Bytes going out: written and hashed together.
struct Emit<'w> {
    w: &'w mut dyn Target,
    hash: Sha256,
}

impl Emit<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.hash.update(b);
        self.w.write_all(b).map_err(|e| Error::invalid(format!("cannot write checkpoint: {e}")))
    }
}

/// The engine's description of its state: collects entries (plan mode) or writes them.
pub struct Out<'a, 'w> {
    entries: Vec<Entry>,
    emit: Option<(&'a [Entry], &'a mut Emit<'w>)>,
    at: usize,
}

impl Out<'_, '_> {
    /// Plan mode: records the entries only.
    pub fn plan() -> Out<'static, 'static> {
        Out { entries: Vec::new(), emit: None, at: 0 }
    }

    pub fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    /// One tensor; `data` hands its bytes to `put` (in one or more pieces) and is only
    /// called when writing.
    pub fn tensor(&mut self, e: Entry, data: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>) -> Result<()> {
        let Some((plan, emit)) = self.emit.as_mut() else {
            self.entries.push(e);
            return Ok(());
        };
        if plan.get(self.at) != Some(&e) {
            return Err(internal(format!("{} was not planned at position {}", e.name, self.at)));
        }
        self.at += 1;
        let mut n = 0usize;
        data(&mut |b: &[u8]| {
            n += b.len();
            emit.put(b)
        })?;
        if Some(n) != e.bytes() {
            return Err(internal(format!("{} produced {n} bytes, planned {}", e.name, e.describe())));
        }
        Ok(())
    }

    pub fn f32s<'v>(&mut self, name: String, shape: Vec<usize>, get: impl FnOnce() -> Result<Cow<'v, [f32]>>) -> Result<()> {
        self.tensor(Entry::new(name, Dtype::F32, shape), |put| put(&f32_bytes(&get()?)))
    }

    pub fn raw<'v>(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, get: impl FnOnce() -> Result<Cow<'v, [u8]>>) -> Result<()> {
        self.tensor(Entry::new(name, dtype, shape), |put| put(&get()?))
    }

    /// The first `n` values of a backend buffer.
    pub fn buf<B: Memory>(&mut self, be: &B, name: String, shape: Vec<usize>, b: &B::Buf, n: usize) -> Result<()> {
        self.f32s(name, shape, || be.to_host(b, n))
    }

    /// A quantized tensor: `<name>.codes` (U8, `shape` for 8-bit, packed bytes for 4-bit),
    /// `<name>.scale` and `<name>.zero` (F32 per group); a 16-bit one as `<name>` (BF16).
    /// `layout`: (bits, group, numel) as the engine built it.
    /// `q` gives the tensor (only called when writing).
    pub fn q<'q, B: Quantization>(&mut self, be: &'q B, name: &str, shape: Vec<usize>, layout: (u8, usize, usize), q: impl Fn() -> Result<&'q B::Q>) -> Result<()> {
        let (bits, group, numel) = layout;
        let (codes, groups) = crate::quant::QTensor::layout(numel, bits, group);
        let host = std::cell::RefCell::new(None::<Cow<crate::quant::QTensor>>);
        // one download serves the three tensors
        let with = |f: &mut dyn FnMut(&crate::quant::QTensor) -> Result<()>| -> Result<()> {
            let mut h = host.borrow_mut();
            if h.is_none() {
                *h = Some(be.q_to_host(q()?)?);
            }
            f(h.as_ref().unwrap())
        };
        if bits == 16 {
            return self.tensor(Entry::new(name, Dtype::BF16, shape), |put| with(&mut |t| put(&t.codes)));
        }
        let cshape = if bits == 8 { shape } else { vec![codes] };
        self.tensor(Entry::new(format!("{name}.codes"), Dtype::U8, cshape), |put| with(&mut |t| put(&t.codes)))?;
        self.tensor(Entry::new(format!("{name}.scale"), Dtype::F32, vec![groups]), |put| with(&mut |t| put(&f32_bytes(&t.scale))))?;
        self.tensor(Entry::new(format!("{name}.zero"), Dtype::F32, vec![groups]), |put| with(&mut |t| put(&f32_bytes(&t.zero))))
    }

    /// 8-bit Adam state of `n` elements in blocks of `block`: `<name>.m.codes`,
    /// `<name>.v.codes` (U8 [n]), `<name>.m.absmax`, `<name>.v.absmax` (F32 per block).
    pub fn a8<B: Optimizers>(&mut self, be: &B, name: &str, st: &B::A8, n: usize, block: usize) -> Result<()> {
        let host = std::cell::RefCell::new(None::<Cow<crate::quant::adam8::State8>>);
        let with = |f: &mut dyn FnMut(&crate::quant::adam8::State8) -> Result<()>| -> Result<()> {
            let mut h = host.borrow_mut();
            if h.is_none() {
                *h = Some(be.a8_to_host(st)?);
            }
            f(h.as_ref().unwrap())
        };
        let blocks = n.div_ceil(block.max(1));
        self.tensor(Entry::new(format!("{name}.m.codes"), Dtype::U8, vec![n]), |put| with(&mut |s| put(&s.m)))?;
        self.tensor(Entry::new(format!("{name}.v.codes"), Dtype::U8, vec![n]), |put| with(&mut |s| put(&s.v)))?;
        self.tensor(Entry::new(format!("{name}.m.absmax"), Dtype::F32, vec![blocks]), |put| with(&mut |s| put(&f32_bytes(&s.absmax_m))))?;
        self.tensor(Entry::new(format!("{name}.v.absmax"), Dtype::F32, vec![blocks]), |put| with(&mut |s| put(&f32_bytes(&s.absmax_v))))
    }
}

/// Writes a checkpoint into `w`: the header for `entries` with `meta`, then the data that
/// `describe` produces in write mode, then the checksum. `describe` must produce exactly
/// `entries` (it is the same function that planned them).
pub fn write(w: &mut dyn Target, meta: &[(&str, String)], entries: &[Entry], describe: impl FnOnce(&mut Out) -> Result<()>) -> Result<()> {
    let head = header(meta, entries)?;
    let mut emit = Emit { w, hash: Sha256::new() };
    emit.put(&(head.len() as u64).to_le_bytes())?;
    emit.put(&head)?;
    let mut out = Out { entries: Vec::new(), emit: Some((entries, &mut emit)), at: 0 };
    describe(&mut out)?;
    if out.at != entries.len() {
        return Err(internal(format!("{} of {} planned tensors written", out.at, entries.len())));
    }
    let digest = emit.hash.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    emit.w.flush().and_then(|()| emit.w.patch(CHECKSUM_AT as u64, hex.as_bytes())).map_err(|e| Error::invalid(format!("cannot write checkpoint: {e}")))
}
