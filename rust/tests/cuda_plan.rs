//! The CUDA backend's GEMM plan (`backend::cuda::plan`) executed by a host emulation of
//! `cublasGemmStridedBatchedEx` (column-major, as its documentation defines it), against
//! the CPU engine. This checks the layout arithmetic the device code hands to cuBLAS —
//! the row-major trick, leading dimensions, offsets, batch strides over attention heads,
//! accumulation order — without a GPU.
#![cfg(feature = "cuda")]

mod common;
use common::values;
use gemm::Parallelism;
use qgalore::backend::cpu::attention;
use qgalore::host::matmul;
use qgalore::backend::cuda::plan::{self, Gemm};
use qgalore::backend::AttnDims;

/// Runs `g` on row-major buffers as cuBLAS would run `g.cublas()`: column-major
/// C′ = alpha·op(first)·op(second) + beta·C′ for each batch entry (beta 0 never reads C).
fn run(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let x = g.cublas();
    let (first, second) = if x.first.is_a { (a, b) } else { (b, a) };
    // element (i, j) of op(M) for a column-major M with leading dimension ld
    let at = |m: &[f32], off: usize, ld: usize, trans: bool, i: usize, j: usize| {
        if trans {
            m[off + j + i * ld]
        } else {
            m[off + i + j * ld]
        }
    };
    for p in 0..x.count {
        let (fo, so, co) = (x.first.off + p * x.first.stride, x.second.off + p * x.second.stride, g.c_off + p * x.stride_c);
        for j in 0..x.n {
            for i in 0..x.m {
                let mut s = 0.0f64;
                for l in 0..x.k {
                    s += at(first, fo, x.first.ld, x.trans_first, i, l) as f64 * at(second, so, x.second.ld, x.trans_second, l, j) as f64;
                }
                let dst = &mut c[co + i + j * x.ldc];
                let old = if g.beta == 0.0 { 0.0 } else { g.beta as f64 * *dst as f64 };
                *dst = (g.alpha as f64 * s + old) as f32;
            }
        }
    }
}

fn close(name: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{name}: lengths");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    let err = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= rel * scale, "{name}: max error {err} vs scale {scale}");
}

#[test]
fn matmul_plans_match_the_cpu() {
    let (n, ic, oc) = (7, 5, 3);
    let (x, w, d) = (values(n * ic, 1), values(oc * ic, 2), values(n * oc, 3));
    for acc in [false, true] {
        let start = values(n * oc.max(ic) * ic, 4);
        let (mut got, mut want) = (start[..n * oc].to_vec(), start[..n * oc].to_vec());
        run(&plan::matmul(n, ic, oc, acc), &x, &w, &mut got);
        matmul::matmul(&mut want, &x, &w, n, ic, oc, acc, Parallelism::None);
        close("matmul", &got, &want, 1e-6);
        let (mut got, mut want) = (start[..n * ic].to_vec(), start[..n * ic].to_vec());
        run(&plan::matmul_dinp(n, ic, oc, acc), &d, &w, &mut got);
        matmul::matmul_dinp(&mut want, &d, &w, n, ic, oc, acc, Parallelism::None);
        close("matmul_dinp", &got, &want, 1e-6);
        let (mut got, mut want) = (start[..oc * ic].to_vec(), start[..oc * ic].to_vec());
        run(&plan::matmul_dw(n, ic, oc, acc), &d, &x, &mut got);
        matmul::matmul_dw(&mut want, &d, &x, n, ic, oc, acc, Parallelism::None);
        close("matmul_dw", &got, &want, 1e-6);
    }
}

/// The device's causal softmax over each score row (kernel semantics), in place.
fn softmax(att: &mut [f32], t: usize) {
    for (r, row) in att.chunks_mut(t).enumerate() {
        let ti = r % t;
        let mx = row[..=ti].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f32 = row[..=ti].iter().map(|&x| (x - mx).exp()).sum();
        for (s, x) in row.iter_mut().enumerate() {
            *x = if s <= ti { (*x - mx).exp() / sum } else { 0.0 };
        }
    }
}

/// ds = att ⊙ (datt − Σ datt⊙att) · scale on the causal part, in place on datt.
fn softmax_bwd(datt: &mut [f32], att: &[f32], t: usize, scale: f32) {
    for (r, (d, a)) in datt.chunks_mut(t).zip(att.chunks(t)).enumerate() {
        let ti = r % t;
        let dot: f32 = (0..=ti).map(|s| d[s] * a[s]).sum();
        for s in 0..t {
            d[s] = if s <= ti { a[s] * (d[s] - dot) * scale } else { 0.0 };
        }
    }
}

#[test]
fn attention_plans_match_the_cpu_forward_and_backward() {
    // grouped-query (3 query heads per kv head), multi-head, and one head
    for d in [
        AttnDims { b: 2, t: 5, h: 6, kvh: 2, hd: 4 },
        AttnDims { b: 3, t: 4, h: 2, kvh: 2, hd: 3 },
        AttnDims { b: 1, t: 6, h: 1, kvh: 1, hd: 8 },
    ] {
        let (nq, nk, na) = (d.b * d.t * d.h * d.hd, d.b * d.t * d.kvh * d.hd, d.b * d.h * d.t * d.t);
        let (q, k, v, dout) = (values(nq, 10), values(nk, 11), values(nk, 12), values(nq, 13));
        let (mut out, mut att) = (vec![0.0; nq], vec![f32::NAN; na]);
        for g in plan::attn_scores(d) {
            run(&g, &q, &k, &mut att);
        }
        softmax(&mut att, d.t);
        for g in plan::attn_values(d) {
            run(&g, &att, &v, &mut out);
        }
        let (mut cout, mut catt) = (vec![0.0; nq], vec![0.0; na]);
        attention::forward(&mut cout, &mut catt, &q, &k, &v, d);
        close("probabilities", &att, &catt, 1e-5);
        close("attention out", &out, &cout, 1e-5);

        // NaN-filled outputs: every element must be written (beta 0 never reads C)
        let (mut dq, mut dk, mut dv, mut ds) = (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk], vec![f32::NAN; na]);
        for g in plan::attn_dscores(d) {
            run(&g, &dout, &v, &mut ds);
        }
        for g in plan::attn_dv(d) {
            run(&g, &att, &dout, &mut dv);
        }
        softmax_bwd(&mut ds, &att, d.t, 1.0 / (d.hd as f32).sqrt());
        for g in plan::attn_dq(d) {
            run(&g, &ds, &k, &mut dq);
        }
        for g in plan::attn_dk(d) {
            run(&g, &ds, &q, &mut dk);
        }
        let (mut cdq, mut cdk, mut cdv, mut cs) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk], vec![0.0; na]);
        attention::backward(&mut cdq, &mut cdk, &mut cdv, &mut cs, &dout, &q, &k, &v, &catt, d);
        close("dq", &dq, &cdq, 1e-5);
        close("dk", &dk, &cdk, 1e-5);
        close("dv", &dv, &cdv, 1e-5);
    }
}

/// Row-major naive product of op(a) (m×k) and op(b) (k×n).
#[allow(clippy::too_many_arguments)]
fn naive(a: &[f32], ta: bool, b: &[f32], tb: bool, m: usize, n: usize, k: usize, lda: usize, ldb: usize) -> Vec<f32> {
    let ea = |i: usize, l: usize| if ta { a[l * lda + i] } else { a[i * lda + l] };
    let eb = |l: usize, j: usize| if tb { b[j * ldb + l] } else { b[l * ldb + j] };
    (0..m * n).map(|x| (0..k).map(|l| ea(x / n, l) * eb(l, x % n)).sum()).collect()
}

#[test]
fn refresh_plans_compute_the_intended_products() {
    let (rows, cols, k) = (9, 6, 3);
    let g = values(rows * cols, 20);
    // Gram matrices
    let mut c = vec![f32::NAN; cols * cols];
    run(&plan::gram(rows, cols, true), &g, &g, &mut c);
    close("GᵀG", &c, &naive(&g, true, &g, false, cols, cols, rows, cols, cols), 1e-5);
    let mut c = vec![f32::NAN; rows * rows];
    run(&plan::gram(rows, cols, false), &g, &g, &mut c);
    close("GGᵀ", &c, &naive(&g, false, &g, true, rows, rows, cols, cols, cols), 1e-5);
    // randomized iteration on A = G (right) and A = Gᵀ (left)
    for right in [true, false] {
        let (m, n) = if right { (rows, cols) } else { (cols, rows) };
        let y = values(k * n, 21);
        let mut z = vec![f32::NAN; m * k];
        run(&plan::sketch_z(m, n, k, right, cols), &g, &y, &mut z);
        close("Z = A·Yᵀ", &z, &naive(&g, !right, &y, true, m, k, n, cols, n), 1e-5);
        let mut y2 = vec![f32::NAN; k * n];
        run(&plan::sketch_y(m, n, k, right, cols), &z, &g, &mut y2);
        close("Y = Zᵀ·A", &y2, &naive(&z, true, &g, !right, k, n, m, k, cols), 1e-5);
        let mut s = vec![f32::NAN; k * k];
        run(&plan::ritz(m, k), &z, &z, &mut s);
        close("ZᵀZ", &s, &naive(&z, true, &z, false, k, k, m, k, k), 1e-5);
        let e = values(k * k, 22);
        let mut out = vec![f32::NAN; k * n];
        if right {
            run(&plan::rotate(n, k, true), &e, &y, &mut out);
            close("E·Y", &out, &naive(&e, false, &y, false, k, n, k, k, n), 1e-5);
        } else {
            run(&plan::rotate(n, k, false), &y, &e, &mut out);
            close("(E·Y)ᵀ", &out, &naive(&y, true, &e, true, n, k, k, n, k), 1e-5);
        }
    }
}

#[test]
fn token_groups_list_each_tokens_rows_in_order() {
    let (uniq, starts, order) = plan::token_groups(&[7, 3, 7, 9, 3, 7]);
    assert_eq!(uniq, [7, 3, 9]);
    assert_eq!(starts, [0, 3, 5, 6]);
    assert_eq!(order, [0, 2, 5, 1, 4, 3]);
    assert_eq!(plan::token_groups(&[]), (vec![], vec![0], vec![]));
}

#[test]
fn row_chunks_of_the_weight_gradient_and_embedding_backward() {
    let (n, ic, oc) = (6, 5, 11);
    let (d, x) = (values(n * oc, 30), values(n * ic, 31));
    let mut full = vec![0.0; oc * ic];
    matmul::matmul_dw(&mut full, &d, &x, n, ic, oc, false, Parallelism::None);
    for (r0, rows) in [(0, 4), (4, 4), (8, 3)] {
        let mut got = vec![f32::NAN; rows * ic];
        run(&plan::matmul_dw_rows(n, ic, oc, r0, rows), &d, &x, &mut got);
        close("matmul_dw rows", &got, &full[r0 * ic..(r0 + rows) * ic], 1e-6);
    }
    // the chunk's tokens relative to its first row, rows in order
    let (uniq, starts, order) = plan::token_groups_in(&[7, 3, 7, 9, 3, 7, 5], 4, 4);
    assert_eq!(uniq, [3, 1]); // tokens 7 and 5
    assert_eq!(starts, [0, 3, 4]);
    assert_eq!(order, [0, 2, 5, 6]);
}
