//! Forward and hand-written backward of the LLaMA decoder, op by op (llm.c style).
//!
//! The backward reports each parameter to `hook` as soon as that parameter's gradient
//! for this micro-batch is complete and its weight will not be read again in this pass:
//! a fused per-layer optimizer (docs/algorithm-spec.md §1.5) updates it there and frees the
//! gradient buffer for the next parameter. A tied embedding/head table is reported once, at
//! the end, with the sum of both uses' gradients.

use super::{lora, Acts, Grads, Llama};
use crate::backend::Backend;

/// Called by the backward for each parameter whose gradient is complete: (index, the
/// rows (first, count) when the gradient arrives in row chunks, model, gradients).
pub type Hook<'a, B> = dyn FnMut(usize, Option<(usize, usize)>, &mut Llama<B>, &mut Grads<B>) + 'a;

/// A linear's weight-gradient product dW = doutᵀ·inp as the backward holds it, offered to
/// `Factor` (`Optimizer::factored`) before the backward forms dW.
pub struct Factors<'a, B: Backend> {
    /// n × rows.
    pub dout: &'a B::Buf,
    /// n × cols.
    pub inp: &'a B::Buf,
    /// Rows of the micro-batch (tokens).
    pub n: usize,
    /// Add to the gradient buffer (a later micro-batch of the update).
    pub acc: bool,
    /// At least n × hidden free values.
    pub scratch: &'a mut B::Buf,
}

/// Asked by the backward before it forms a linear's weight gradient: (index, model, the
/// product's factors, the parameter's gradient buffer). True when it wrote the rank-r
/// gradient R there instead (`Optimizer::factored`, docs/algorithm-spec.md §1.5b); false:
/// the backward forms dW.
pub type Factor<'a, B> = dyn FnMut(usize, &Llama<B>, Factors<'_, B>, &mut <B as crate::backend::Memory>::Buf) -> bool + 'a;

/// Runs the model on `a.tokens` and leaves the logits in `a.logits`.
pub fn forward<B: Backend>(be: &B, m: &Llama<B>, a: &mut Acts<B>) {
    let cfg = &m.cfg;
    let (n, c, eps) = (a.b * a.t, cfg.hidden_size, cfg.rms_norm_eps);
    be.embedding(&mut a.x[0], &a.tokens, m.w(m.embed), c);
    for l in 0..m.layers.len() {
        block_forward(be, m, a, l, true);
    }
    let last = m.layers.len();
    be.rmsnorm(&mut a.xnf, &mut a.rstdf, &a.x[last], m.w(m.final_norm), n, c, eps);
    be.matmul(&mut a.logits, &a.xnf, m.w(m.head), n, c, cfg.vocab_size, false);
}

/// Block `l` from its input x[l] into the layer's activation slot; with `out` also its
/// output x[l+1] (the backward's recomputation under checkpointing leaves x[l+1] alone:
/// it already holds the same values).
fn block_forward<B: Backend>(be: &B, m: &Llama<B>, a: &mut Acts<B>, l: usize, out: bool) {
    let cfg = &m.cfg;
    let (n, c, i, kv) = (a.b * a.t, cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim());
    let (h, kvh, hd, eps) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim(), cfg.rms_norm_eps);
    let dims = a.dims(cfg);
    let (b, t, s) = (a.b, a.t, a.slot(l));
    let ly = &m.layers[l];
    let (xs, rest) = a.x.split_at_mut(l + 1);
    let x_in = &xs[l];
    be.rmsnorm(&mut a.xn1[s], &mut a.rstd1[s], x_in, m.w(ly.attn_norm), n, c, eps);
    be.matmul(&mut a.q[s], &a.xn1[s], m.wv(be, ly.q, &mut a.wq), n, c, c, false);
    be.matmul(&mut a.k[s], &a.xn1[s], m.wv(be, ly.k, &mut a.wq), n, c, kv, false);
    be.matmul(&mut a.v[s], &a.xn1[s], m.wv(be, ly.v, &mut a.wq), n, c, kv, false);
    if let Some(la) = a.lora.as_mut() {
        // LoRA adapters on q, k, v: added before RoPE, as PEFT wraps the projections
        lora::forward(be, m, la, l, 0, &a.xn1[s], &mut a.q[s], n, c, c);
        lora::forward(be, m, la, l, 1, &a.xn1[s], &mut a.k[s], n, c, kv);
        lora::forward(be, m, la, l, 2, &a.xn1[s], &mut a.v[s], n, c, kv);
    }
    be.rope(&mut a.q[s], &a.rope, b, t, h, hd, false);
    be.rope(&mut a.k[s], &a.rope, b, t, kvh, hd, false);
    be.attention(&mut a.ao[s], &mut a.att[s], &a.q[s], &a.k[s], &a.v[s], dims);
    be.copy_n(&mut a.xm[s], x_in, n * c);
    be.matmul(&mut a.xm[s], &a.ao[s], m.wv(be, ly.o, &mut a.wq), n, c, c, true);
    if let Some(la) = a.lora.as_mut() {
        lora::forward(be, m, la, l, 3, &a.ao[s], &mut a.xm[s], n, c, c);
    }
    be.rmsnorm(&mut a.xn2[s], &mut a.rstd2[s], &a.xm[s], m.w(ly.mlp_norm), n, c, eps);
    be.matmul(&mut a.gate[s], &a.xn2[s], m.wv(be, ly.gate, &mut a.wq), n, c, i, false);
    be.matmul(&mut a.up[s], &a.xn2[s], m.wv(be, ly.up, &mut a.wq), n, c, i, false);
    if let Some(la) = a.lora.as_mut() {
        lora::forward(be, m, la, l, 4, &a.xn2[s], &mut a.gate[s], n, c, i);
        lora::forward(be, m, la, l, 5, &a.xn2[s], &mut a.up[s], n, c, i);
    }
    be.swiglu(&mut a.act[s], &a.gate[s], &a.up[s], n * i);
    if out {
        let x_out = &mut rest[0];
        be.copy_n(x_out, &a.xm[s], n * c);
        be.matmul(x_out, &a.act[s], m.wv(be, ly.down, &mut a.wq), n, i, c, true);
        if let Some(la) = a.lora.as_mut() {
            lora::forward(be, m, la, l, 6, &a.act[s], x_out, n, i, c);
        }
    } else if let Some(la) = a.lora.as_mut() {
        // the down adapter's v is needed by the backward; x[l+1] already holds its output
        lora::forward_keep(be, m, la, l, 6, &a.act[s], n, i);
    }
}

/// Backward from `a.logits` holding dLoss/dlogits. `acc` adds into the gradient buffers
/// (gradient accumulation) instead of overwriting them. Frozen parameters (a LoRA model's
/// base) get no gradient and are not reported; the input gradients still flow through them.
pub fn backward<B: Backend>(be: &B, m: &mut Llama<B>, g: &mut Grads<B>, a: &mut Acts<B>, acc: bool, hook: &mut Hook<B>) {
    backward_with(be, m, g, a, acc, false, None, hook)
}

/// `backward`; with `defer_tables` the embedding's and the untied head's gradients are left
/// out (nothing computed, nothing reported): the caller takes them with `embed_grad` and
/// `head_grad` afterwards, whose inputs the backward keeps. With `factor`, each trained
/// linear's gradient is offered to it first (`Factor`).
#[allow(clippy::too_many_arguments)]
pub fn backward_with<B: Backend>(
    be: &B,
    m: &mut Llama<B>,
    g: &mut Grads<B>,
    a: &mut Acts<B>,
    acc: bool,
    defer_tables: bool,
    mut factor: Option<&mut Factor<B>>,
    hook: &mut Hook<B>,
) {
    let cfg = m.cfg.clone();
    let (n, c, i, kv, v) = (a.b * a.t, cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim(), cfg.vocab_size);
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
    let dims = a.dims(&cfg);
    let (b, t) = (a.b, a.t);
    // a linear's weight gradient, unless it is frozen: R from the factors when `factor`
    // takes it (`scratch`: an n×hidden buffer free at that point of the backward), else dW
    #[allow(clippy::too_many_arguments)]
    let dw = |be: &B,
              m: &mut Llama<B>,
              g: &mut Grads<B>,
              factor: &mut Option<&mut Factor<B>>,
              hook: &mut Hook<B>,
              idx: usize,
              dout: &B::Buf,
              inp: &B::Buf,
              scratch: &mut B::Buf,
              ic: usize,
              oc: usize| {
        if m.trainable(idx) {
            let ac = acc && !g.is_shared(idx);
            let done = factor.as_mut().is_some_and(|f| f(idx, m, Factors { dout, inp, n, acc: ac, scratch }, g.get_mut(idx)));
            if !done {
                be.matmul_dw(g.get_mut(idx), dout, inp, n, ic, oc, ac);
            }
            hook(idx, None, m, g);
        }
    };

    let last = m.layers.len();
    be.matmul_dinp(&mut a.dxn, &a.logits, m.w(m.head), n, c, v, false);
    if !defer_tables {
        head_grad(be, m, g, a, acc, hook);
    }
    be.fill(&mut a.dres, 0.0);
    let fnorm = m.final_norm;
    let mut la = a.lora.take();
    let dn = la.as_mut().map(|la| &mut la.dnorm);
    norm_bwd(be, m, g, acc, fnorm, &mut a.dres, &a.dxn, &a.x[last], &a.rstdf, n, c, dn, hook);

    for l in (0..last).rev() {
        let ly = m.layers[l];
        if a.ckpt {
            // this block's weights are not updated yet: the recomputation is exact
            a.lora = la.take();
            block_forward(be, &*m, a, l, false);
            la = a.lora.take();
        }
        let s = a.slot(l);
        // MLP: x[l+1] = xm + down(silu(gate(xn2)) ⊙ up(xn2))
        be.matmul_dinp(&mut a.dact, &a.dres, m.wv(be, ly.down, &mut a.wq), n, i, c, false);
        if let Some(la) = la.as_mut() {
            lora::backward(be, m, g, la, l, 6, &a.act[s], &a.dres, &mut a.dact, n, i, c, acc, hook);
        }
        dw(be, m, g, &mut factor, hook, ly.down, &a.dres, &a.act[s], &mut a.dgate, i, c);
        be.swiglu_bwd(&mut a.dgate, &mut a.dup, &a.dact, &a.gate[s], &a.up[s], n * i);
        be.matmul_dinp(&mut a.dxn, &a.dgate, m.wv(be, ly.gate, &mut a.wq), n, c, i, false);
        be.matmul_dinp(&mut a.dxn, &a.dup, m.wv(be, ly.up, &mut a.wq), n, c, i, true);
        if let Some(la) = la.as_mut() {
            lora::backward(be, m, g, la, l, 4, &a.xn2[s], &a.dgate, &mut a.dxn, n, c, i, acc, hook);
            lora::backward(be, m, g, la, l, 5, &a.xn2[s], &a.dup, &mut a.dxn, n, c, i, acc, hook);
        }
        dw(be, m, g, &mut factor, hook, ly.gate, &a.dgate, &a.xn2[s], &mut a.dact, c, i);
        dw(be, m, g, &mut factor, hook, ly.up, &a.dup, &a.xn2[s], &mut a.dact, c, i);
        let dn = la.as_mut().map(|la| &mut la.dnorm);
        norm_bwd(be, m, g, acc, ly.mlp_norm, &mut a.dres, &a.dxn, &a.xm[s], &a.rstd2[s], n, c, dn, hook);

        // Attention: xm = x[l] + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))
        be.matmul_dinp(&mut a.dao, &a.dres, m.wv(be, ly.o, &mut a.wq), n, c, c, false);
        if let Some(la) = la.as_mut() {
            lora::backward(be, m, g, la, l, 3, &a.ao[s], &a.dres, &mut a.dao, n, c, c, acc, hook);
        }
        dw(be, m, g, &mut factor, hook, ly.o, &a.dres, &a.ao[s], &mut a.dq, c, c);
        be.attention_bwd(&mut a.dq, &mut a.dk, &mut a.dv, &mut a.datt, &a.dao, &a.q[s], &a.k[s], &a.v[s], &a.att[s], dims);
        be.rope(&mut a.dq, &a.rope, b, t, h, hd, true);
        be.rope(&mut a.dk, &a.rope, b, t, kvh, hd, true);
        be.matmul_dinp(&mut a.dxn, &a.dq, m.wv(be, ly.q, &mut a.wq), n, c, c, false);
        be.matmul_dinp(&mut a.dxn, &a.dk, m.wv(be, ly.k, &mut a.wq), n, c, kv, true);
        be.matmul_dinp(&mut a.dxn, &a.dv, m.wv(be, ly.v, &mut a.wq), n, c, kv, true);
        if let Some(la) = la.as_mut() {
            lora::backward(be, m, g, la, l, 0, &a.xn1[s], &a.dq, &mut a.dxn, n, c, c, acc, hook);
            lora::backward(be, m, g, la, l, 1, &a.xn1[s], &a.dk, &mut a.dxn, n, c, kv, acc, hook);
            lora::backward(be, m, g, la, l, 2, &a.xn1[s], &a.dv, &mut a.dxn, n, c, kv, acc, hook);
        }
        for (idx, d, oc) in [(ly.q, &a.dq, c), (ly.k, &a.dk, kv), (ly.v, &a.dv, kv)] {
            dw(be, m, g, &mut factor, hook, idx, d, &a.xn1[s], &mut a.dao, c, oc);
        }
        let dn = la.as_mut().map(|la| &mut la.dnorm);
        norm_bwd(be, m, g, acc, ly.attn_norm, &mut a.dres, &a.dxn, &a.x[l], &a.rstd1[s], n, c, dn, hook);
    }
    a.lora = la;
    if !defer_tables {
        embed_grad(be, m, g, a, acc, hook);
    }
}

/// The untied head's weight gradient dW = dlogitsᵀ·xnf, reported to `hook` (whole, or row
/// chunk by row chunk when the plan chunks it); nothing for a tied or frozen head. Needs only
/// `a.logits` (dLoss/dlogits) and `a.xnf`, which the backward keeps: it can run at any time
/// after the loss, as often as needed (the fused step with clipping runs it twice for a
/// chunked head, docs/algorithm-spec.md §1.5).
pub fn head_grad<B: Backend>(be: &B, m: &mut Llama<B>, g: &mut Grads<B>, a: &mut Acts<B>, acc: bool, hook: &mut Hook<B>) {
    let (n, c, v) = (a.b * a.t, m.cfg.hidden_size, m.cfg.vocab_size);
    if m.tied() || !m.trainable(m.head) {
        // the head's share of a tied table's gradient is added at the end, with the
        // embedding's (dlogits and xnf are kept until then)
    } else if let Some(rows) = g.chunk_rows(m.head) {
        // row chunks of the head's gradient, each updated before the next is computed
        for r0 in (0..v).step_by(rows) {
            let nr = rows.min(v - r0);
            be.matmul_dw_rows(g.get_mut(m.head), &a.logits, &a.xnf, n, c, v, r0, nr);
            hook(m.head, Some((r0, nr)), m, g);
        }
    } else {
        let ac = acc && !g.is_shared(m.head);
        be.matmul_dw(g.get_mut(m.head), &a.logits, &a.xnf, n, c, v, ac);
        hook(m.head, None, m, g);
    }
}

/// The embedding table's gradient (with the head's share when tied), reported to `hook`
/// whole or in row chunks. Needs `a.dres` as the backward leaves it (dLoss/dx[0]), the
/// tokens, and for a tied table `a.logits` and `a.xnf`: valid after the backward until the
/// next forward.
pub fn embed_grad<B: Backend>(be: &B, m: &mut Llama<B>, g: &mut Grads<B>, a: &mut Acts<B>, acc: bool, hook: &mut Hook<B>) {
    let (n, c, v) = (a.b * a.t, m.cfg.hidden_size, m.cfg.vocab_size);
    let e = m.embed;
    if !m.trainable(e) {
        return;
    }
    let tied = m.tied();
    if let Some(rows) = g.chunk_rows(e) {
        for r0 in (0..v).step_by(rows) {
            let nr = rows.min(v - r0);
            if tied {
                be.matmul_dw_rows(g.get_mut(e), &a.logits, &a.xnf, n, c, v, r0, nr);
            } else {
                be.fill(g.get_mut(e), 0.0);
            }
            be.embedding_bwd_rows(g.get_mut(e), &a.dres, &a.tokens, c, r0, nr);
            hook(e, Some((r0, nr)), m, g);
        }
        return;
    }
    let accum = acc && !g.is_shared(e);
    if tied {
        // the table's gradient is the sum of its two uses: as lm_head, then as embedding
        be.matmul_dw(g.get_mut(e), &a.logits, &a.xnf, n, c, v, accum);
    } else if !accum {
        be.fill(g.get_mut(e), 0.0);
    }
    be.embedding_bwd(g.get_mut(e), &a.dres, &a.tokens, c);
    hook(e, None, m, g);
}

/// RMSNorm backward into `dres` (+=) and the norm's weight gradient (reported to `hook`);
/// a frozen norm's weight gradient goes to `frozen` (scratch) and is dropped.
#[allow(clippy::too_many_arguments)]
fn norm_bwd<B: Backend>(
    be: &B,
    m: &mut Llama<B>,
    g: &mut Grads<B>,
    acc: bool,
    idx: usize,
    dres: &mut B::Buf,
    dout: &B::Buf,
    x: &B::Buf,
    rstd: &B::Buf,
    n: usize,
    c: usize,
    frozen: Option<&mut B::Buf>,
    hook: &mut Hook<B>,
) {
    if !m.trainable(idx) {
        let s = frozen.expect("scratch for a frozen norm's gradient");
        be.fill(s, 0.0);
        be.rmsnorm_bwd(dres, s, dout, x, m.w(idx), rstd, n, c);
        return;
    }
    if !(acc && !g.is_shared(idx)) {
        be.fill(g.get_mut(idx), 0.0);
    }
    be.rmsnorm_bwd(dres, g.get_mut(idx), dout, x, m.w(idx), rstd, n, c);
    hook(idx, None, m, g);
}
