//! Binary checkpoint of everything a run needs to resume bit-exactly: weights (float or
//! quantized codes), optimizer moments (fp32 or 8-bit with absmax), projectors, refresh
//! gaps, cosine queues, previous top-1 vectors, counters. The random-number position is
//! the step counter itself (every draw is keyed by seed, parameter and step).
//!
//! Layout: "QGCK", u32 version, then length-prefixed little-endian sections.

use crate::backend::{Memory, Optimizers, Quantization};
use crate::error::{Error, Result};
use crate::quant::adam8::State8;
use crate::quant::QTensor;

pub const MAGIC: &[u8; 4] = b"QGCK";
pub const VERSION: u32 = 1;

#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        let mut w = Writer { buf: Vec::new() };
        w.buf.extend_from_slice(MAGIC);
        w.u32(VERSION);
        w
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub fn qtensor(&mut self, q: &QTensor) {
        self.u8(q.bits);
        self.u64(q.group as u64);
        self.u64(q.numel as u64);
        self.bytes(&q.codes);
        self.f32s(&q.scale);
        self.f32s(&q.zero);
    }
    pub fn state8(&mut self, s: &State8) {
        self.u64(s.block as u64);
        self.bytes(&s.m);
        self.bytes(&s.v);
        self.f32s(&s.absmax_m);
        self.f32s(&s.absmax_v);
    }
    /// The first `n` values of a backend buffer (as `f32s`).
    pub fn buf<B: Memory>(&mut self, be: &B, b: &B::Buf, n: usize) -> Result<()> {
        let h = be.to_host(b, n)?;
        self.f32s(&h);
        Ok(())
    }
    /// A backend's quantized tensor (as `qtensor`).
    pub fn q<B: Quantization>(&mut self, be: &B, q: &B::Q) -> Result<()> {
        let h = be.q_to_host(q)?;
        self.qtensor(&h);
        Ok(())
    }
    /// A backend's 8-bit Adam state (as `state8`).
    pub fn a8<B: Optimizers>(&mut self, be: &B, s: &B::A8) -> Result<()> {
        let h = be.a8_to_host(s)?;
        self.state8(&h);
        Ok(())
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn corrupt(what: &str) -> Error {
    Error::invalid(format!("checkpoint is truncated or corrupt ({what})"))
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self> {
        if buf.len() < 8 || &buf[..4] != MAGIC {
            return Err(Error::invalid("not a qgalore checkpoint (bad magic bytes)"));
        }
        let mut r = Reader { buf, pos: 4 };
        let v = r.u32()?;
        if v != VERSION {
            return Err(Error::invalid(format!("checkpoint version {v}: this engine reads version {VERSION}")));
        }
        Ok(r)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos + n > self.buf.len() {
            return Err(corrupt("unexpected end"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()? as usize;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| corrupt("string"))
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.u64()? as usize;
        let b = self.take(n.checked_mul(4).ok_or_else(|| corrupt("length"))?)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    /// Reads f32s into `dst`, which must have exactly the stored length.
    pub fn f32s_into(&mut self, dst: &mut [f32], what: &str) -> Result<()> {
        let v = self.f32s()?;
        if v.len() != dst.len() {
            return Err(Error::invalid(format!(
                "checkpoint does not match this model: {what} has {} values, expected {}",
                v.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(&v);
        Ok(())
    }
    pub fn qtensor_into(&mut self, q: &mut QTensor, what: &str) -> Result<()> {
        let (bits, group, numel) = (self.u8()?, self.u64()? as usize, self.u64()? as usize);
        if bits != q.bits || group != q.group || numel != q.numel {
            return Err(Error::invalid(format!(
                "checkpoint does not match this run: {what} is {bits}-bit/group {group}/{numel} elements, expected {}-bit/group {}/{}",
                q.bits, q.group, q.numel
            )));
        }
        let codes = self.bytes()?;
        if codes.len() != q.codes.len() {
            return Err(corrupt(what));
        }
        q.codes.copy_from_slice(codes);
        let (s, z) = (self.f32s()?, self.f32s()?);
        if s.len() != q.scale.len() || z.len() != q.zero.len() {
            return Err(corrupt(what));
        }
        q.scale = s;
        q.zero = z;
        Ok(())
    }
    pub fn state8_into(&mut self, st: &mut State8, what: &str) -> Result<()> {
        let block = self.u64()? as usize;
        let (m, v) = (self.bytes()?, self.bytes()?);
        if block != st.block || m.len() != st.m.len() || v.len() != st.v.len() {
            return Err(Error::invalid(format!("checkpoint does not match this run: 8-bit state of {what}")));
        }
        st.m.copy_from_slice(m);
        st.v.copy_from_slice(v);
        let (a, b) = (self.f32s()?, self.f32s()?);
        if a.len() != st.absmax_m.len() || b.len() != st.absmax_v.len() {
            return Err(corrupt(what));
        }
        st.absmax_m = a;
        st.absmax_v = b;
        Ok(())
    }
    /// `buf`'s output into the first `n` values of a backend buffer.
    pub fn buf_into<B: Memory>(&mut self, be: &B, b: &mut B::Buf, n: usize, what: &str) -> Result<()> {
        be.from_host(b, n, |h| self.f32s_into(h, what))
    }
    /// `q`'s output into a backend's quantized tensor of the same shape.
    pub fn q_into<B: Quantization>(&mut self, be: &B, q: &mut B::Q, what: &str) -> Result<()> {
        be.q_from_host(q, |h| self.qtensor_into(h, what))
    }
    /// `a8`'s output into a backend's 8-bit Adam state of the same shape.
    pub fn a8_into<B: Optimizers>(&mut self, be: &B, s: &mut B::A8, what: &str) -> Result<()> {
        be.a8_from_host(s, |h| self.state8_into(h, what))
    }
    pub fn done(&self) -> Result<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
}
