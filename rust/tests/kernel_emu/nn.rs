//! nn.cu: the layer kernels, within a tolerance of the CPU ops, for every module compiled
//! from nn.cu (f32 and bf16 activations).

use crate::harness::{emu, kernel_names, Arg, Lib, Report};
use crate::{cbuf, cpu, ids, vals};
use qgalore::backend::cpu::{attention, ops};
use qgalore::host::{matmul, rope};
use qgalore::backend::cuda::launch::{self, THREADS};
use qgalore::backend::cuda::plan::{self, Gemm};
use qgalore::backend::{AttnDims, Memory};
use qgalore::quant::{bf16_to_f32, f32_to_bf16};

/// The source of the layer kernels, the one `kernels::MODULES` compiles once per
/// activation type.
const SRC: &str = include_str!("../../kernels/nn.cu");

/// Runs one planned product (row-major, a strided batch; `plan::Gemm`) with the CPU's GEMM.
fn run_gemm(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (a_rs, a_cs) = if g.ta { (1, g.lda) } else { (g.lda, 1) };
    let (b_rs, b_cs) = if g.tb { (1, g.ldb) } else { (g.ldb, 1) };
    assert!(g.beta == 0.0 || g.beta == 1.0, "beta {} is neither overwrite nor accumulate", g.beta);
    for i in 0..g.batch.count {
        let (ao, bo, co) = (g.a_off + i * g.batch.a, g.b_off + i * g.batch.b, g.c_off + i * g.batch.c);
        unsafe {
            matmul::gemm_raw(
                g.m,
                g.n,
                g.k,
                c.as_mut_ptr().add(co),
                g.ldc as isize,
                1,
                g.beta == 1.0,
                a.as_ptr().add(ao),
                a_rs as isize,
                a_cs as isize,
                b.as_ptr().add(bo),
                b_rs as isize,
                b_cs as isize,
                g.alpha,
                matmul::par(1),
            );
        }
    }
}

fn nn_module(lib: &Lib, r: &mut Report) {
    let be = cpu();
    let m = lib.module;
    let has = |k: &str| lib.kernels.contains(&k);

    // elementwise: n = 1000 (4 blocks, the last partial)
    let n = 1000;
    let x = vals(n, 1, 2.0);
    let y = vals(n, 2, 2.0);
    if has("fill") {
        let mut a = vec![Arg::F32s(x.clone()), Arg::F32(0.37), Arg::U64(n as u64)];
        let l = lib.launch("fill", launch::elems(n), &mut a);
        let mut b = cbuf(&be, &x);
        be.fill(&mut b, 0.37);
        r.close(
            &format!("{m}/fill"),
            &format!("{m}/fill"),
            a[0].f32s(),
            &b.data,
            n,
            l.tol(0),
        );
    }
    if has("fill_act") {
        // the activation fill stores v once rounded (exact, either type)
        let mut a = vec![Arg::F32s(x.clone()), Arg::F32(0.37), Arg::U64(n as u64)];
        let l = lib.launch("fill_act", launch::elems(n), &mut a);
        let v = if l.bf16[0] {
            bf16_to_f32(f32_to_bf16(0.37))
        } else {
            0.37
        };
        r.same_f32(&format!("{m}/fill_act"), a[0].f32s(), &vec![v; n]);
        r.note(format!("{m}/fill_act: exact"));
    }
    if has("axpy") {
        let mut a = vec![
            Arg::F32s(x.clone()),
            Arg::F32(-0.7),
            Arg::F32s(y.clone()),
            Arg::U64(n as u64),
        ];
        let l = lib.launch("axpy", launch::elems(n), &mut a);
        let mut d = cbuf(&be, l.before[0].f32s());
        be.axpy(&mut d, -0.7, &cbuf(&be, l.before[2].f32s()));
        r.close(
            &format!("{m}/axpy"),
            &format!("{m}/axpy"),
            a[0].f32s(),
            &d.data,
            1,
            l.tol(0),
        );
    }
    if has("scale") {
        let mut a = vec![Arg::F32s(x.clone()), Arg::F32(1.3), Arg::U64(n as u64)];
        let l = lib.launch("scale", launch::elems(n), &mut a);
        let mut d = cbuf(&be, l.before[0].f32s());
        be.scale(&mut d, 1.3);
        r.close(
            &format!("{m}/scale"),
            &format!("{m}/scale"),
            a[0].f32s(),
            &d.data,
            1,
            l.tol(0),
        );
    }
    if has("swiglu") {
        let mut a = vec![
            Arg::F32s(vec![0.0; n]),
            Arg::F32s(x.clone()),
            Arg::F32s(y.clone()),
            Arg::U64(n as u64),
        ];
        let l = lib.launch("swiglu", launch::elems(n), &mut a);
        let mut want = vec![0.0f32; n];
        ops::swiglu(&mut want, l.before[1].f32s(), l.before[2].f32s());
        r.close(
            &format!("{m}/swiglu"),
            &format!("{m}/swiglu"),
            a[0].f32s(),
            &want,
            1,
            l.tol(0),
        );
    }
    if has("swiglu_bwd") {
        let d = vals(n, 3, 1.0);
        let mut a = vec![
            Arg::F32s(vec![0.0; n]),
            Arg::F32s(vec![0.0; n]),
            Arg::F32s(d),
            Arg::F32s(x.clone()),
            Arg::F32s(y.clone()),
            Arg::U64(n as u64),
        ];
        let l = lib.launch("swiglu_bwd", launch::elems(n), &mut a);
        let (mut dg, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
        ops::swiglu_bwd(
            &mut dg,
            &mut du,
            l.before[2].f32s(),
            l.before[3].f32s(),
            l.before[4].f32s(),
        );
        r.close(
            &format!("{m}/swiglu_bwd"),
            &format!("{m}/swiglu_bwd dgate"),
            a[0].f32s(),
            &dg,
            1,
            l.tol(0),
        );
        r.close(
            &format!("{m}/swiglu_bwd"),
            &format!("{m}/swiglu_bwd dup"),
            a[1].f32s(),
            &du,
            1,
            l.tol(1),
        );
    }

    // embedding: 7 rows of c = 300 channels (two column blocks), repeated tokens
    let (rows, c, vocab) = (7usize, 300usize, 11usize);
    let tokens = {
        let mut t = ids(rows, 4, vocab);
        t[5] = t[1];
        t
    };
    // f32 table, and a bf16 table (`embedding_w16`; the harness rounds the bf16 argument)
    for kname in ["embedding", "embedding_w16"]
        .into_iter()
        .filter(|k| has(k))
    {
        let table = vals(vocab * c, 5, 1.0);
        let mut a = vec![
            Arg::F32s(vec![0.0; rows * c]),
            Arg::I32s(tokens.clone()),
            Arg::F32s(table),
            Arg::I32(c as i32),
        ];
        let l = lib.launch(kname, launch::token_rows(rows, c), &mut a);
        let mut want = vec![0.0f32; rows * c];
        ops::embedding(&mut want, &tokens, l.before[2].f32s(), c);
        r.close(
            &format!("{m}/{kname}"),
            &format!("{m}/{kname}"),
            a[0].f32s(),
            &want,
            c,
            l.tol(0),
        );
    }
    if has("embedding_bwd") {
        // rows grouped by token on the host as device/layers.rs does
        let (uniq, starts, order) = plan::token_groups(&tokens);
        let mut a = vec![
            Arg::F32s(vals(vocab * c, 6, 1.0)),
            Arg::F32s(vals(rows * c, 7, 1.0)),
            Arg::I32s(uniq.clone()),
            Arg::I32s(starts),
            Arg::I32s(order),
            Arg::I32(c as i32),
        ];
        let l = lib.launch("embedding_bwd", launch::token_rows(uniq.len(), c), &mut a);
        let mut want = l.before[0].f32s().to_vec();
        ops::embedding_bwd(&mut want, l.before[1].f32s(), &tokens, c);
        // the CPU's summation order: bit-identical, not only close
        assert!(
            a[0].f32s()
                .iter()
                .zip(&want)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{m}/embedding_bwd: not bit-identical to the CPU"
        );
        r.close(
            &format!("{m}/embedding_bwd"),
            &format!("{m}/embedding_bwd"),
            a[0].f32s(),
            &want,
            c,
            l.tol(0),
        );
    }

    // RMSNorm: rows wider and narrower than the block
    for c in [300usize, 100] {
        let rows = 5;
        let x = vals(rows * c, 8 + c as u64, 2.0);
        let w = vals(c, 9, 1.5);
        let eps = 1e-5f32;
        let mut rstd_cpu = vec![0.0f32; rows];
        if has("rmsnorm") {
            let mut a = vec![
                Arg::F32s(vec![0.0; rows * c]),
                Arg::F32s(vec![0.0; rows]),
                Arg::F32s(x.clone()),
                Arg::F32s(w.clone()),
                Arg::I32(c as i32),
                Arg::F32(eps),
            ];
            let l = lib.launch("rmsnorm", launch::rows(rows, THREADS), &mut a);
            let mut out = vec![0.0f32; rows * c];
            ops::rmsnorm(
                &mut out,
                &mut rstd_cpu,
                l.before[2].f32s(),
                l.before[3].f32s(),
                rows,
                c,
                eps,
            );
            r.close(
                &format!("{m}/rmsnorm"),
                &format!("{m}/rmsnorm out c={c}"),
                a[0].f32s(),
                &out,
                c,
                l.tol(0),
            );
            r.close(
                &format!("{m}/rmsnorm (rstd)"),
                &format!("{m}/rmsnorm rstd c={c}"),
                a[1].f32s(),
                &rstd_cpu,
                1,
                l.tol(1),
            );
        } else {
            let mut out = vec![0.0f32; rows * c];
            ops::rmsnorm(&mut out, &mut rstd_cpu, &x, &w, rows, c, eps);
        }
        if has("rmsnorm_bwd_dx") && has("rmsnorm_bwd_dw_part") && has("rmsnorm_bwd_dw_sum") {
            let dout = vals(rows * c, 10, 1.0);
            let (dx0, dw0) = (vals(rows * c, 11, 0.5), vals(c, 12, 0.5));
            let mut a = vec![
                Arg::F32s(dx0),
                Arg::F32s(dout.clone()),
                Arg::F32s(x.clone()),
                Arg::F32s(w.clone()),
                Arg::F32s(rstd_cpu.clone()),
                Arg::I32(c as i32),
            ];
            let l = lib.launch("rmsnorm_bwd_dx", launch::rows(rows, THREADS), &mut a);
            // device/layers.rs's two stages, with small chunks so that several partial sums exist
            let chunk = 3usize;
            let chunks = rows.div_ceil(chunk);
            let mut p = vec![
                Arg::F32s(vec![f32::NAN; chunks * c]),
                Arg::F32s(dout),
                Arg::F32s(x.clone()),
                Arg::F32s(rstd_cpu.clone()),
                Arg::I32(rows as i32),
                Arg::I32(c as i32),
                Arg::I32(chunk as i32),
            ];
            lib.launch(
                "rmsnorm_bwd_dw_part",
                launch::rmsnorm_dw_part(c, chunks),
                &mut p,
            );
            let mut b = vec![
                Arg::F32s(dw0),
                Arg::F32s(p[0].f32s().to_vec()),
                Arg::I32(chunks as i32),
                Arg::I32(c as i32),
            ];
            let l2 = lib.launch("rmsnorm_bwd_dw_sum", launch::elems(c), &mut b);
            let (mut dx, mut dw) = (l.before[0].f32s().to_vec(), l2.before[0].f32s().to_vec());
            assert!(
                p[0].f32s().iter().all(|v| v.is_finite()),
                "{m}: a partial sum was not written"
            );
            let (dout, x, w, rstd) = (
                l.before[1].f32s(),
                l.before[2].f32s(),
                l.before[3].f32s(),
                l.before[4].f32s(),
            );
            ops::rmsnorm_bwd(&mut dx, &mut dw, dout, x, w, rstd, rows, c);
            r.close(
                &format!("{m}/rmsnorm_bwd_dx"),
                &format!("{m}/rmsnorm_bwd_dx c={c}"),
                a[0].f32s(),
                &dx,
                c,
                l.tol(0),
            );
            r.close(
                &format!("{m}/rmsnorm_bwd_dw"),
                &format!("{m}/rmsnorm_bwd_dw c={c}"),
                b[0].f32s(),
                &dw,
                c,
                l2.tol(0),
            );
        }
    }

    // RoPE: head widths 80 (40 threads, not a whole warp) and 16, both directions
    if has("rope") {
        for hd in [80usize, 16] {
            let (b, t, heads) = (2usize, 5usize, 3usize);
            let table = rope::rope_table(t, hd, 10000.0);
            for inverse in [false, true] {
                let x = vals(b * t * heads * hd, 13 + hd as u64, 1.0);
                let mut a = vec![
                    Arg::F32s(x),
                    Arg::F32s(table.clone()),
                    Arg::I32(t as i32),
                    Arg::I32(heads as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(inverse as i32),
                ];
                let l = lib.launch("rope", launch::rope(b, t, heads, hd), &mut a);
                let mut want = l.before[0].f32s().to_vec();
                ops::rope(&mut want, l.before[1].f32s(), b, t, heads, hd, inverse);
                let what = format!("{m}/rope hd={hd} inverse={inverse}");
                r.close(
                    &format!("{m}/rope"),
                    &what,
                    a[0].f32s(),
                    &want,
                    hd,
                    l.tol(0),
                );
            }
        }
    }

    // attention softmax: scores and their gradient formed by the device's planned products
    // (`plan::attn_scores`, `attn_dscores`) on the CPU GEMM, the CPU's probabilities (attention::forward) and dscores (attention::backward's
    // scratch) as references; t = 300 rows are wider than a block, t = 37 narrower
    for (b, t, h, kvh, hd) in [(2usize, 37usize, 4usize, 2usize, 8usize), (1, 300, 2, 1, 8)] {
        let d = AttnDims { b, t, h, kvh, hd };
        let (c, kvd) = (h * hd, kvh * hd);
        let q = vals(b * t * c, 20 + t as u64, 1.5);
        let k = vals(b * t * kvd, 21 + t as u64, 1.5);
        let v = vals(b * t * kvd, 22 + t as u64, 1.0);
        let dout = vals(b * t * c, 23 + t as u64, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut out, mut att) = (vec![0.0f32; b * t * c], vec![0.0f32; b * h * t * t]);
        attention::forward(&mut out, &mut att, &q, &k, &v, d);
        let (mut scores, mut datt) = (vec![0.0f32; b * h * t * t], vec![0.0f32; b * h * t * t]);
        for g in plan::attn_scores(d) {
            run_gemm(&g, &q, &k, &mut scores);
        }
        for g in plan::attn_dscores(d) {
            run_gemm(&g, &dout, &v, &mut datt);
        }
        let rows = b * h * t;
        if has("causal_softmax") {
            let mut a = vec![Arg::F32s(scores.clone()), Arg::I32(t as i32)];
            let l = lib.launch("causal_softmax", launch::rows(rows, THREADS), &mut a);
            let want = if l.any_bf16() {
                // bf16 scores in: recompute the CPU's softmax from what the kernel read
                cpu_causal_softmax(l.before[0].f32s(), t)
            } else {
                att.clone()
            };
            r.close(
                &format!("{m}/causal_softmax"),
                &format!("{m}/causal_softmax t={t}"),
                a[0].f32s(),
                &want,
                t,
                l.tol(0),
            );
        }
        if has("causal_softmax_bwd") {
            let (mut dq, mut dk, mut dv, mut ds) = (
                vec![0.0f32; b * t * c],
                vec![0.0f32; b * t * kvd],
                vec![0.0f32; b * t * kvd],
                vec![0.0f32; b * h * t * t],
            );
            attention::backward(
                &mut dq, &mut dk, &mut dv, &mut ds, &dout, &q, &k, &v, &att, d,
            );
            let mut a = vec![
                Arg::F32s(datt.clone()),
                Arg::F32s(att.clone()),
                Arg::I32(t as i32),
                Arg::F32(scale),
            ];
            let l = lib.launch("causal_softmax_bwd", launch::rows(rows, THREADS), &mut a);
            let want = if l.any_bf16() {
                cpu_causal_softmax_bwd(l.before[0].f32s(), l.before[1].f32s(), t, scale)
            } else {
                ds
            };
            r.close(
                &format!("{m}/causal_softmax_bwd"),
                &format!("{m}/causal_softmax_bwd t={t}"),
                a[0].f32s(),
                &want,
                t,
                l.tol(0),
            );
        }
    }

    // cross-entropy: vocabularies wider (1000) and narrower (50) than the block; with
    // ignored targets (< 0, masked out of the loss: loss 0 and a zero gradient row)
    if has("cross_entropy") {
        for (v, ignore) in [(1000usize, false), (50, false), (1000, true), (50, true)] {
            let n = 6;
            let mut targets = ids(n, 30 + v as u64, v);
            if ignore {
                targets[1] = -1;
                targets[4] = -7;
            }
            let logits = vals(n * v, 31 + v as u64, 4.0);
            for grad in [None, Some(1.0f32 / n as f32)] {
                let mut a = vec![
                    Arg::F32s(logits.clone()),
                    Arg::I32s(targets.clone()),
                    Arg::F32s(vec![0.0; n]),
                    Arg::I32(v as i32),
                    Arg::I32(grad.is_some() as i32),
                    Arg::F32(grad.unwrap_or(0.0)),
                ];
                let l = lib.launch("cross_entropy", launch::rows(n, THREADS), &mut a);
                let mut z = l.before[0].f32s().to_vec();
                let mut losses = vec![0.0f32; n];
                ops::cross_entropy(&mut z, &targets, &mut losses, n, v, grad);
                if ignore {
                    // the reference itself: ignored rows are exactly 0 (and untouched without grad)
                    for i in [1, 4] {
                        assert_eq!(losses[i], 0.0);
                        let row = &z[i * v..(i + 1) * v];
                        let want = if grad.is_some() { vec![0.0; v] } else { logits[i * v..(i + 1) * v].to_vec() };
                        assert_eq!(row, &want[..]);
                        // and the kernel's, bit for bit
                        assert_eq!(a[2].f32s()[i], 0.0, "{m}/cross_entropy v={v}: ignored row {i}'s loss");
                        assert_eq!(&a[0].f32s()[i * v..(i + 1) * v], &want[..], "{m}/cross_entropy v={v}: ignored row {i}");
                    }
                }
                let tag = format!("{m}/cross_entropy v={v} grad={} ignore={ignore}", grad.is_some());
                r.close(
                    &format!("{m}/cross_entropy"),
                    &format!("{tag} losses"),
                    a[2].f32s(),
                    &losses,
                    1,
                    l.tol(2),
                );
                r.close(
                    &format!("{m}/cross_entropy"),
                    &format!("{tag} logits"),
                    a[0].f32s(),
                    &z,
                    v,
                    l.tol(0),
                );
            }
        }
    }
}

/// The CPU's causal softmax of attention::forward, for inputs the kernel read as bf16.
fn cpu_causal_softmax(scores: &[f32], t: usize) -> Vec<f32> {
    let mut a = scores.to_vec();
    for (i, row) in a.chunks_mut(t).enumerate() {
        let ti = i % t;
        let mx = row[..=ti].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0.0f32;
        for s in &mut row[..=ti] {
            *s = (*s - mx).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row[..=ti].iter_mut().for_each(|s| *s *= inv);
        row[ti + 1..].iter_mut().for_each(|s| *s = 0.0);
    }
    a
}

/// attention::backward's dscores step, for inputs the kernel read as bf16.
fn cpu_causal_softmax_bwd(datt: &[f32], att: &[f32], t: usize, scale: f32) -> Vec<f32> {
    let mut d = datt.to_vec();
    for (i, (dr, ar)) in d.chunks_mut(t).zip(att.chunks(t)).enumerate() {
        let ti = i % t;
        let dot: f32 = (0..=ti).fold(0.0, |s, j| s + ar[j] * dr[j]);
        for j in 0..t {
            dr[j] = if j <= ti {
                ar[j] * (dr[j] - dot) * scale
            } else {
                0.0
            };
        }
    }
    d
}

#[test]
fn layer_kernels_match_the_cpu_ops() {
    let Some(emu) = emu() else { return };
    let mut r = Report::new("nn");
    let nn = kernel_names(SRC);
    let libs: Vec<&Lib> = emu
        .libs
        .iter()
        .filter(|l| l.kernels.iter().any(|k| nn.contains(k)))
        .collect();
    assert!(!libs.is_empty(), "no module exports the layer kernels");
    for lib in libs {
        nn_module(lib, &mut r);
    }
    r.finish();
}
