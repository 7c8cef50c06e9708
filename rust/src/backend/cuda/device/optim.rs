//! Optimizer update rules and 8-bit Adam state on the device (`rust/kernels/optim.cu`).

use super::memory::CudaBuf;
use super::{dev_err, Cuda};
use crate::backend::cuda::launch;
use crate::backend::{AdamHp, Category, Optimizers, Tracked};
use crate::error::Result;
use crate::quant::adam8::{BnbHp, State8};
use cudarc::driver::CudaSlice;
use std::borrow::Cow;

pub struct CudaA8 {
    pub block: usize,
    pub n: usize,
    pub m: CudaSlice<u8>,
    pub v: CudaSlice<u8>,
    pub absm: CudaSlice<f32>,
    pub absv: CudaSlice<f32>,
    _t: Tracked<()>,
}

impl Optimizers for Cuda {
    type A8 = CudaA8;

    fn adamw(&self, p: &mut CudaBuf, g: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: AdamHp) {
        let (step, rbc2, decay) = hp.torch_factors();
        let n = m.data.len() as u64;
        self.note("adamw", launch!(self, self.f("adamw"), launch::elems(n as usize); p.data.f32_mut(), g.data.f32(), m.data.f32_mut(), v.data.f32_mut(), &step, &rbc2, &decay, &hp.beta1, &hp.beta2, &hp.eps, &n));
    }
    fn galore_adam(&self, buf: &mut CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: AdamHp) {
        let s = hp.galore_step();
        let n = m.data.len() as u64;
        self.note("galore_adam", launch!(self, self.f("galore_adam"), launch::elems(n as usize); buf.data.f32_mut(), m.data.f32_mut(), v.data.f32_mut(), &s, &hp.beta1, &hp.beta2, &hp.eps, &n));
    }
    fn bnb32_step(&self, p: &mut CudaBuf, g: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: BnbHp) {
        let (step_size, eps2) = hp.bnb_factors();
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let mut sc = self.scratch();
        let n = m.data.len() as u64;
        let name = if p.data.is_bf16() { "bnb32_w16" } else { "bnb32" };
        self.note("bnb32", launch!(self, self.f(name), launch::elems(n as usize); &mut p.data, g.data.f32(), m.data.f32_mut(), v.data.f32_mut(), &step_size, &eps2, &hp.beta1, &hp.beta2, &hp.weight_decay, &decay, &mut sc.count, &n));
    }

    fn a8_new(&self, n: usize, block: usize, cat: Category) -> Result<CudaA8> {
        let host = crate::quant::adam8::State8::new(n, block);
        let st = CudaA8 {
            block,
            n,
            m: self.stream.clone_htod(&host.m).map_err(|e| dev_err("alloc", e))?,
            v: self.stream.clone_htod(&host.v).map_err(|e| dev_err("alloc", e))?,
            absm: self.stream.clone_htod(&host.absmax_m).map_err(|e| dev_err("alloc", e))?,
            absv: self.stream.clone_htod(&host.absmax_v).map_err(|e| dev_err("alloc", e))?,
            _t: Tracked::new((), host.bytes(), cat, &self.mem),
        };
        Ok(st)
    }
    fn a8_step(&self, p: &mut CudaBuf, g: &CudaBuf, st: &mut CudaA8, hp: BnbHp) {
        let n = st.n;
        self.a8_step_range(p, g, st, 0, n, hp);
    }
    fn a8_step_range(&self, p: &mut CudaBuf, g: &CudaBuf, st: &mut CudaA8, off: usize, len: usize, hp: BnbHp) {
        let (step_size, eps2) = hp.bnb_factors();
        let decay = 1.0 - hp.lr * hp.weight_decay;
        let bs = st.block;
        if off % bs != 0 || off + len > st.n {
            return self.note("adam8", Err::<(), _>(format!("range {off}+{len} is not block-aligned")));
        }
        let mut sc = self.scratch();
        let (bsi, n) = (bs as i32, len as u64);
        let name = if p.data.is_bf16() { "adam8_w16" } else { "adam8" };
        let (pp, _gp) = p.data.ptr_mut(&self.stream, off);
        let (mut cm, mut cv) = (st.m.slice_mut(off..off + len), st.v.slice_mut(off..off + len));
        let blocks = (off / bs)..(off + len).div_ceil(bs);
        let (mut am, mut av) = (st.absm.slice_mut(blocks.clone()), st.absv.slice_mut(blocks));
        self.note("adam8", launch!(self, self.f(name), launch::adam8(len, bs); &pp, g.data.f32(), &mut cm, &mut cv, &mut am, &mut av, &self.maps.0, &self.maps.1, &step_size, &eps2, &hp.beta1, &hp.beta2, &hp.weight_decay, &decay, &bsi, &mut sc.count, &n));
    }
    fn a8_to_host<'a>(&self, s: &'a CudaA8) -> Result<Cow<'a, State8>> {
        let mut h = State8::new(s.n, s.block);
        let c = |e| dev_err("copy", e);
        self.stream.memcpy_dtoh(&s.m, &mut h.m[..]).map_err(c)?;
        self.stream.memcpy_dtoh(&s.v, &mut h.v[..]).map_err(c)?;
        self.stream.memcpy_dtoh(&s.absm, &mut h.absmax_m[..]).map_err(c)?;
        self.stream.memcpy_dtoh(&s.absv, &mut h.absmax_v[..]).map_err(c)?;
        Ok(Cow::Owned(h))
    }
    fn a8_from_host(&self, s: &mut CudaA8, fill: impl FnOnce(&mut State8) -> Result<()>) -> Result<()> {
        let mut h = State8::new(s.n, s.block);
        fill(&mut h)?;
        let c = |e| dev_err("copy", e);
        self.stream.memcpy_htod(&h.m, &mut s.m).map_err(c)?;
        self.stream.memcpy_htod(&h.v, &mut s.v).map_err(c)?;
        self.stream.memcpy_htod(&h.absmax_m, &mut s.absm).map_err(c)?;
        self.stream.memcpy_htod(&h.absmax_v, &mut s.absv).map_err(c)?;
        Ok(())
    }

    fn sanitize(&self, b: &mut CudaBuf, n: usize) {
        let mut sc = self.scratch();
        let nn = n as u64;
        self.note("sanitize", launch!(self, self.f("sanitize"), launch::elems(n); b.data.f32_mut(), &mut sc.count, &nn));
    }
    fn take_nonfinite(&self) -> u64 {
        let mut sc = self.scratch();
        let k = self.read_count(&sc.count);
        let r = self.stream.memset_zeros(&mut sc.count);
        self.note("memset", r);
        k
    }
}
