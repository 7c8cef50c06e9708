//! The model's layers on the device (`rust/kernels/nn.cu`, compiled once per activation
//! type) and the attention and linear GEMMs (`gemm.rs`).

use super::memory::CudaBuf;
use super::{dev_err, grow, Cuda, Scratch};
use crate::backend::cuda::launch::{self, DW_CHUNK, THREADS};
use crate::backend::cuda::plan;
use crate::backend::{AttnDims, Layers};
use crate::error::Result;

impl Cuda {
    /// The grouped embedding backward (`plan::token_groups`) into `dtable`.
    fn embedding_bwd_groups(&self, dtable: &mut CudaBuf, dout: &CudaBuf, groups: (Vec<i32>, Vec<i32>, Vec<i32>), c: usize) {
        let (uniq, starts, order) = groups;
        if uniq.is_empty() {
            return;
        }
        let mut sc = self.scratch();
        for (dst, ids) in sc.groups.iter_mut().zip([&uniq, &starts, &order]) {
            if let Err(e) = self.upload_ids(dst, ids) {
                return self.note::<(), _>("copy", Err(e.msg));
            }
        }
        let ci = c as i32;
        let [d_uniq, d_starts, d_order] = &sc.groups;
        self.note("embedding_bwd", launch!(self, self.a("embedding_bwd"), launch::token_rows(uniq.len(), c); dtable.data.f32_mut(), &dout.data, d_uniq, d_starts, d_order, &ci));
    }
}

impl Layers for Cuda {

    fn matmul(&self, out: &mut CudaBuf, inp: &CudaBuf, w: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm(&plan::matmul(n, ic, oc, acc), &inp.data, &w.data, &mut out.data);
    }
    fn matmul_dinp(&self, dinp: &mut CudaBuf, dout: &CudaBuf, w: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm(&plan::matmul_dinp(n, ic, oc, acc), &dout.data, &w.data, &mut dinp.data);
    }
    fn matmul_dw(&self, dw: &mut CudaBuf, dout: &CudaBuf, inp: &CudaBuf, n: usize, ic: usize, oc: usize, acc: bool) {
        self.gemm(&plan::matmul_dw(n, ic, oc, acc), &dout.data, &inp.data, &mut dw.data);
    }
    fn matmul_dw_rows(&self, dw: &mut CudaBuf, dout: &CudaBuf, inp: &CudaBuf, n: usize, ic: usize, oc: usize, r0: usize, rows: usize) {
        self.gemm(&plan::matmul_dw_rows(n, ic, oc, r0, rows), &dout.data, &inp.data, &mut dw.data);
    }

    fn embedding(&self, out: &mut CudaBuf, tokens: &[i32], table: &CudaBuf, c: usize) {
        let mut sc = self.scratch();
        if let Err(e) = self.upload_ids(&mut sc.tokens, tokens) {
            self.note::<(), _>("copy", Err(e.msg));
            return;
        }
        let ci = c as i32;
        let name = if table.data.is_bf16() { "embedding_w16" } else { "embedding" };
        self.note("embedding", launch!(self, self.a(name), launch::token_rows(tokens.len(), c); &mut out.data, &sc.tokens, &table.data, &ci));
    }
    fn embedding_bwd(&self, dtable: &mut CudaBuf, dout: &CudaBuf, tokens: &[i32], c: usize) {
        self.embedding_bwd_groups(dtable, dout, plan::token_groups(tokens), c);
    }
    fn embedding_bwd_rows(&self, dchunk: &mut CudaBuf, dout: &CudaBuf, tokens: &[i32], c: usize, r0: usize, rows: usize) {
        self.embedding_bwd_groups(dchunk, dout, plan::token_groups_in(tokens, r0, rows), c);
    }
    fn rmsnorm(&self, out: &mut CudaBuf, rstd: &mut CudaBuf, x: &CudaBuf, w: &CudaBuf, n: usize, c: usize, eps: f32) {
        let ci = c as i32;
        self.note("rmsnorm", launch!(self, self.a("rmsnorm"), launch::rows(n, THREADS); &mut out.data, rstd.data.f32_mut(), &x.data, w.data.f32(), &ci, &eps));
    }
    fn rmsnorm_bwd(&self, dx: &mut CudaBuf, dw: &mut CudaBuf, dout: &CudaBuf, x: &CudaBuf, w: &CudaBuf, rstd: &CudaBuf, n: usize, c: usize) {
        let (ci, ni) = (c as i32, n as i32);
        self.note("rmsnorm_bwd", launch!(self, self.a("rmsnorm_bwd_dx"), launch::rows(n, THREADS); &mut dx.data, &dout.data, &x.data, w.data.f32(), rstd.data.f32(), &ci));
        // dw in two stages: per-chunk partial sums, then their ordered sum per column
        let chunks = n.div_ceil(DW_CHUNK);
        let mut sc = self.scratch();
        if let Err(e) = grow(&self.stream, &mut sc.dw_part, chunks * c) {
            return self.note("alloc", Err::<(), _>(e));
        }
        let (chunk, nch) = (DW_CHUNK as i32, chunks as i32);
        self.note("rmsnorm_bwd", launch!(self, self.a("rmsnorm_bwd_dw_part"), launch::rmsnorm_dw_part(c, chunks); &mut sc.dw_part, &dout.data, &x.data, rstd.data.f32(), &ni, &ci, &chunk));
        self.note("rmsnorm_bwd", launch!(self, self.a("rmsnorm_bwd_dw_sum"), launch::elems(c); dw.data.f32_mut(), &sc.dw_part, &nch, &ci));
    }
    fn rope(&self, x: &mut CudaBuf, table: &CudaBuf, b: usize, t: usize, heads: usize, hd: usize, inverse: bool) {
        let (ti, hi, hdi, inv) = (t as i32, heads as i32, hd as i32, inverse as i32);
        self.note("rope", launch!(self, self.a("rope"), launch::rope(b, t, heads, hd); &mut x.data, table.data.f32(), &ti, &hi, &hdi, &inv));
    }
    fn attention(&self, out: &mut CudaBuf, att: &mut CudaBuf, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, d: AttnDims) {
        for g in plan::attn_scores(d) {
            self.gemm(&g, &q.data, &k.data, &mut att.data);
        }
        let ti = d.t as i32;
        self.note("softmax", launch!(self, self.a("causal_softmax"), launch::rows(d.b * d.h * d.t, THREADS); &mut att.data, &ti));
        for g in plan::attn_values(d) {
            self.gemm(&g, &att.data, &v.data, &mut out.data);
        }
    }
    fn attention_bwd(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        scratch: &mut CudaBuf,
        dout: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        att: &CudaBuf,
        d: AttnDims,
    ) {
        for g in plan::attn_dscores(d) {
            self.gemm(&g, &dout.data, &v.data, &mut scratch.data);
        }
        for g in plan::attn_dv(d) {
            self.gemm(&g, &att.data, &dout.data, &mut dv.data);
        }
        let (ti, scale) = (d.t as i32, 1.0 / (d.hd as f32).sqrt());
        self.note("softmax_bwd", launch!(self, self.a("causal_softmax_bwd"), launch::rows(d.b * d.h * d.t, THREADS); &mut scratch.data, &att.data, &ti, &scale));
        for g in plan::attn_dq(d) {
            self.gemm(&g, &scratch.data, &k.data, &mut dq.data);
        }
        for g in plan::attn_dk(d) {
            self.gemm(&g, &scratch.data, &q.data, &mut dk.data);
        }
    }
    fn swiglu(&self, out: &mut CudaBuf, gate: &CudaBuf, up: &CudaBuf, n: usize) {
        let n = n as u64;
        self.note("swiglu", launch!(self, self.a("swiglu"), launch::elems(n as usize); &mut out.data, &gate.data, &up.data, &n));
    }
    fn swiglu_bwd(&self, dgate: &mut CudaBuf, dup: &mut CudaBuf, dout: &CudaBuf, gate: &CudaBuf, up: &CudaBuf, n: usize) {
        let n = n as u64;
        self.note("swiglu_bwd", launch!(self, self.a("swiglu_bwd"), launch::elems(n as usize); &mut dgate.data, &mut dup.data, &dout.data, &gate.data, &up.data, &n));
    }
    fn cross_entropy(&self, logits: &mut CudaBuf, targets: &[i32], losses: &mut [f32], n: usize, v: usize, grad_scale: Option<f32>) -> Result<()> {
        let mut sc = self.scratch();
        let Scratch { targets: dt, losses: dl, .. } = &mut *sc;
        self.upload_ids(dt, &targets[..n])?;
        grow(&self.stream, dl, n).map_err(|e| dev_err("alloc", e))?;
        let (vi, g, s) = (v as i32, grad_scale.is_some() as i32, grad_scale.unwrap_or(0.0));
        launch!(self, self.f("cross_entropy"), launch::rows(n, THREADS); logits.data.f32_mut(), &*dt, &mut *dl, &vi, &g, &s).map_err(|e| dev_err("cross_entropy", e))?;
        self.stream.memcpy_dtoh(&dl.slice(..n), &mut losses[..n]).map_err(|e| dev_err("copy", e))?;
        self.take_sticky()
    }
}
