//! GPU against CPU: every op and whole training steps, with the tolerances written here.
//! Without a GPU each test prints `skipped: no GPU` and passes.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::backend::cuda::{probe, Cuda};
use qgalore::backend::{AdamHp, AttnDims, Backend, Category, Linalg, Memory, Optimizers, Quantization, Refresh};
use qgalore::quant::Range;
use qgalore::train::Engine;

fn gpu(bf16: bool) -> Option<Cuda> {
    if probe::device_count() == 0 {
        println!("skipped: no GPU");
        return None;
    }
    Some(Cuda::new(0, bf16).expect("a GPU is present but the CUDA backend failed to start"))
}

/// Tolerance relative to the largest reference magnitude: fp32 GEMMs and kernels, or bf16
/// activations (the bound: relative error ≤ 1e-2 on activations).
fn tol(bf16: bool) -> f32 {
    if bf16 {
        1e-2
    } else {
        1e-4
    }
}

fn up(g: &Cuda, v: &[f32]) -> <Cuda as Memory>::Buf {
    let mut b = g.alloc(v.len(), Category::Activations).unwrap();
    g.upload(&mut b, v).unwrap();
    b
}

fn cb(cpu: &Cpu, v: &[f32]) -> <Cpu as Memory>::Buf {
    let mut b = cpu.alloc(v.len(), Category::Activations).unwrap();
    cpu.upload(&mut b, v).unwrap();
    b
}

fn down(g: &Cuda, b: &<Cuda as Memory>::Buf, n: usize) -> Vec<f32> {
    let mut h = vec![0.0; n];
    g.download(b, &mut h).unwrap();
    h
}

fn close(name: &str, gpu: &[f32], cpu: &[f32], rel: f32) {
    assert_eq!(gpu.len(), cpu.len(), "{name}: lengths");
    let scale = cpu.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    let err = gpu.iter().zip(cpu).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err.is_finite() && err <= rel * scale, "{name}: max error {err} vs scale {scale} (tolerance {rel})");
    println!("{name}: max error / scale = {:.2e}", err / scale);
}

/// Runs every layer op of the model on one backend through the `Backend` trait, with the
/// buffer categories the engine uses (activations, f32 weights, f32 gradients), and
/// returns each op's outputs on the host.
fn layer_ops<B: Backend>(be: &B) -> Vec<(&'static str, Vec<f32>)> {
    let buf = |v: &[f32], cat: Category| {
        let mut b = be.alloc(v.len(), cat).unwrap();
        be.upload(&mut b, v).unwrap();
        b
    };
    let f32buf = |v: &[f32]| {
        let mut b = be.alloc_fp32(v.len(), Category::Activations).unwrap();
        be.upload(&mut b, v).unwrap();
        b
    };
    let get = |b: &B::Buf| {
        let mut h = vec![0.0; be.len(b)];
        be.download(b, &mut h).unwrap();
        h
    };
    let act = Category::Activations;
    let mut out = Vec::new();
    // linear layer, forward and both gradients
    let (n, ic, oc) = (64, 48, 40);
    let (x, w, d) = (buf(&values(n * ic, 1), act), buf(&values(oc * ic, 2), Category::Weights), buf(&values(n * oc, 3), act));
    let mut y = be.alloc(n * oc, act).unwrap();
    be.matmul(&mut y, &x, &w, n, ic, oc, false);
    out.push(("matmul", get(&y)));
    be.matmul(&mut y, &x, &w, n, ic, oc, true);
    out.push(("matmul accumulate", get(&y)));
    let mut dx = be.alloc(n * ic, act).unwrap();
    be.matmul_dinp(&mut dx, &d, &w, n, ic, oc, false);
    out.push(("matmul_dinp", get(&dx)));
    let mut dw = be.alloc(oc * ic, Category::Grads).unwrap();
    be.matmul_dw(&mut dw, &d, &x, n, ic, oc, false);
    out.push(("matmul_dw", get(&dw)));
    be.matmul_dw_rows(&mut dw, &d, &x, n, ic, oc, 8, 16);
    out.push(("matmul_dw rows 8..24", get(&dw)[..16 * ic].to_vec()));
    // RMSNorm forward and backward (dx accumulates into a residual gradient)
    let c = ic;
    let nw = buf(&values(c, 8).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>(), Category::Weights);
    let mut xn = be.alloc(n * c, act).unwrap();
    let mut rstd = be.alloc_fp32(n, act).unwrap();
    be.rmsnorm(&mut xn, &mut rstd, &x, &nw, n, c, 1e-6);
    out.push(("rmsnorm", get(&xn)));
    let mut dres = buf(&values(n * c, 9), act);
    let mut dnw = be.alloc(c, Category::Grads).unwrap();
    let dn = buf(&values(n * c, 10), act);
    be.rmsnorm_bwd(&mut dres, &mut dnw, &dn, &x, &nw, &rstd, n, c);
    out.push(("rmsnorm_bwd dx", get(&dres)));
    out.push(("rmsnorm_bwd dw", get(&dnw)));
    // RoPE both ways on (b, t, heads, hd)
    let (b, t, h, kvh, hd) = (2, 16, 4, 2, 8);
    let table = f32buf(&qgalore::host::rope::rope_table(t, hd, 10000.0));
    let mut r = buf(&values(b * t * h * hd, 11), act);
    be.rope(&mut r, &table, b, t, h, hd, false);
    out.push(("rope", get(&r)));
    be.rope(&mut r, &table, b, t, h, hd, true);
    out.push(("rope inverse", get(&r)));
    // SwiGLU
    let m = n * 72;
    let (gate, upv, dout) = (buf(&values(m, 12), act), buf(&values(m, 13), act), buf(&values(m, 14), act));
    let mut s = be.alloc(m, act).unwrap();
    be.swiglu(&mut s, &gate, &upv, m);
    out.push(("swiglu", get(&s)));
    let (mut dg, mut du) = (be.alloc(m, act).unwrap(), be.alloc(m, act).unwrap());
    be.swiglu_bwd(&mut dg, &mut du, &dout, &gate, &upv, m);
    out.push(("swiglu_bwd dgate", get(&dg)));
    out.push(("swiglu_bwd dup", get(&du)));
    // embedding forward and backward (repeated tokens accumulate)
    let (vocab, rows) = (50, 40);
    let ids: Vec<i32> = (0..rows).map(|i| ((i * 7) % 13) as i32).collect();
    let tab = buf(&values(vocab * c, 15), Category::Weights);
    let mut e = be.alloc(rows * c, act).unwrap();
    be.embedding(&mut e, &ids, &tab, c);
    out.push(("embedding", get(&e)));
    let mut dtab = be.alloc(vocab * c, Category::Grads).unwrap();
    let de = buf(&values(rows * c, 16), act);
    be.embedding_bwd(&mut dtab, &de, &ids, c);
    out.push(("embedding_bwd", get(&dtab)));
    let mut dchunk = be.alloc(4 * c, Category::Grads).unwrap();
    be.embedding_bwd_rows(&mut dchunk, &de, &ids, c, 5, 4);
    out.push(("embedding_bwd rows 5..9", get(&dchunk)));
    // fused softmax cross-entropy on f32 logits
    let mut logits = f32buf(&values(rows * vocab, 17).iter().map(|v| 4.0 * v).collect::<Vec<_>>());
    let mut losses = vec![0.0f32; rows];
    be.cross_entropy(&mut logits, &ids, &mut losses, rows, vocab, Some(1.0 / rows as f32)).unwrap();
    out.push(("cross_entropy loss", losses));
    out.push(("cross_entropy grad", get(&logits)));
    // attention with grouped KV heads, forward and backward
    let dm = AttnDims { b, t, h, kvh, hd };
    let (nq, nk, na) = (b * t * h * hd, b * t * kvh * hd, b * h * t * t);
    let (q, k, v, dao) = (buf(&values(nq, 4), act), buf(&values(nk, 5), act), buf(&values(nk, 6), act), buf(&values(nq, 7), act));
    let (mut ao, mut att) = (be.alloc(nq, act).unwrap(), be.alloc(na, act).unwrap());
    be.attention(&mut ao, &mut att, &q, &k, &v, dm);
    out.push(("attention", get(&ao)));
    let (mut dq, mut dk, mut dv, mut ds) = (be.alloc(nq, act).unwrap(), be.alloc(nk, act).unwrap(), be.alloc(nk, act).unwrap(), be.alloc(na, act).unwrap());
    be.attention_bwd(&mut dq, &mut dk, &mut dv, &mut ds, &dao, &q, &k, &v, &att, dm);
    out.push(("attention dq", get(&dq)));
    out.push(("attention dk", get(&dk)));
    out.push(("attention dv", get(&dv)));
    // INT8 weight dequantized into the GEMM operand buffer
    let mut qw = be.q_new(oc * ic, 8, 64, Category::Weights).unwrap();
    be.q_quantize(&mut qw, &w, qgalore::quant::Range::WithZero);
    let mut wq = be.alloc(oc * ic, act).unwrap();
    be.q_dequantize(&mut wq, &qw);
    out.push(("int8 dequantize", get(&wq)));
    be.sync().unwrap();
    out
}

fn compare_layer_ops(bf16: bool) {
    let Some(g) = gpu(bf16) else { return };
    let cpu = Cpu::new(2).unwrap();
    let (a, b) = (layer_ops(&g), layer_ops(&cpu));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        close(name, x, y, tol(bf16));
    }
}

#[test]
fn gpu_parity_layer_ops_fp32() {
    compare_layer_ops(false);
}

#[test]
fn gpu_parity_layer_ops_bf16() {
    compare_layer_ops(true);
}

#[test]
fn gpu_parity_quantized_update_and_8bit_adam_bit_identical() {
    let Some(g) = gpu(false) else { return };
    let cpu = Cpu::new(2).unwrap();
    let n = 256 * 24;
    let w = values(n, 11).iter().map(|x| 0.02 * x).collect::<Vec<_>>();
    let delta = values(n, 12).iter().map(|x| 1e-3 * x).collect::<Vec<_>>();
    // 48: a group that is not a whole number of warps; 256: the default
    for (bits, group) in [(8u8, 256usize), (4, 256), (8, 48), (4, 48)] {
        let mut cq = cpu.q_new(n, bits, group, Category::Weights).unwrap();
        let mut gq = g.q_new(n, bits, group, Category::Weights).unwrap();
        let (cw, gw) = (cb(&cpu, &w), up(&g, &w));
        cpu.q_quantize(&mut cq, &cw, Range::WithZero);
        g.q_quantize(&mut gq, &gw, Range::WithZero);
        assert!(q_bits(&g, &gq) == q_bits(&cpu, &cq), "{bits}-bit group {group}: quantization codes differ");
        if bits == 8 {
            let (cd, gd) = (cb(&cpu, &delta), up(&g, &delta));
            let key = qgalore::rng::stream_key(1, 2, 3);
            cpu.q_update(&mut cq, &cd, 0.999, Range::WithZero, Some(key));
            g.q_update(&mut gq, &gd, 0.999, Range::WithZero, Some(key));
            assert!(q_bits(&g, &gq) == q_bits(&cpu, &cq), "group {group}: INT8 stochastic-rounding update differs");
        }
    }
    let m = 5000;
    let (p0, gr) = (values(m, 20), values(m, 21));
    let hp = AdamHp { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
    let mut cs = cpu.a8_new(m, 2048, Category::OptimizerState).unwrap();
    let mut gs = g.a8_new(m, 2048, Category::OptimizerState).unwrap();
    let (mut cp, cg) = (cb(&cpu, &p0), cb(&cpu, &gr));
    let (mut gp, gg) = (up(&g, &p0), up(&g, &gr));
    for _ in 0..3 {
        cpu.a8_step(&mut cp, &cg, &mut cs, hp);
        g.a8_step(&mut gp, &gg, &mut gs, hp);
    }
    assert_eq!(down(&g, &gp, m), cp.data, "8-bit Adam weights differ");
    let a8_bits = |s: &qgalore::quant::adam8::State8| {
        (s.block, s.m.clone(), s.v.clone(), s.absmax_m.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), s.absmax_v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    assert!(a8_bits(&g.a8_to_host(&gs).unwrap()) == a8_bits(&cpu.a8_to_host(&cs).unwrap()), "8-bit Adam states differ");
}

/// ‖P₁ᵀP₂‖²_F / r for two r-dimensional orthonormal bases given as rows (k×n) or
/// columns (n×k): 1 when they span the same subspace.
fn overlap(p1: &[f32], p2: &[f32], n: usize, r: usize, rows: bool) -> f64 {
    let at = |p: &[f32], i: usize, j: usize| if rows { p[i * n + j] } else { p[j * r + i] } as f64;
    let mut f = 0.0;
    for a in 0..r {
        for b in 0..r {
            let d: f64 = (0..n).map(|j| at(p1, a, j) * at(p2, b, j)).sum();
            f += d * d;
        }
    }
    f / r as f64
}

/// A 96×64 gradient with a clear top-8 spectrum plus noise: its subspace is well defined.
fn spectral_matrix() -> (Vec<f32>, usize, usize, usize) {
    let (m, n, r) = (96, 64, 8);
    let (u, v, noise) = (values(m * r, 31), values(r * n, 32), values(m * n, 33));
    let gm = (0..m * n)
        .map(|i| {
            let (a, b) = (i / n, i % n);
            (0..r).map(|l| (8.0 - l as f32) * u[a * r + l] * v[l * n + b]).sum::<f32>() + 0.05 * noise[i]
        })
        .collect();
    (gm, m, n, r)
}

/// Runs everywhere: the premise of the GPU refresh test (all three CPU methods find the
/// same subspace of the test matrix, so the GPU must too) and the overlap measure.
#[test]
fn refresh_methods_agree_on_the_parity_matrix() {
    let (gm, m, n, r) = spectral_matrix();
    for right in [true, false] {
        let (pn, side) = if right { (r * n, n) } else { (m * r, m) };
        let mut p = [vec![0.0f32; pn], vec![0.0f32; pn], vec![0.0f32; pn]];
        for (i, method) in [Refresh::Svd, Refresh::Eigh, Refresh::Randomized].into_iter().enumerate() {
            qgalore::host::linalg::top_subspace(&gm, m, n, r, right, method, None, 7, &mut p[i], 1).unwrap();
        }
        for i in 1..3 {
            let o = overlap(&p[0], &p[i], side, r, right);
            assert!(o > 1.0 - 1e-4, "right={right} method {i}: overlap with the SVD {o}");
        }
        // the top subspace of an unrelated matrix scores near r/side, far below 1
        let mut q = vec![0.0f32; pn];
        qgalore::host::linalg::top_subspace(&values(m * n, 40), m, n, r, right, Refresh::Svd, None, 7, &mut q, 1).unwrap();
        let other = overlap(&p[0], &q, side, r, right);
        assert!(other < 0.4, "overlap with an unrelated subspace {other}");
    }
}

/// Runs everywhere: the op harness itself works on the CPU backend.
#[test]
fn layer_op_harness_runs_on_the_cpu() {
    let ops = layer_ops(&Cpu::new(2).unwrap());
    assert_eq!(ops.len(), 23);
    assert!(ops.iter().all(|(name, v)| !v.is_empty() && v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0) || name.is_empty()));
}

#[test]
fn gpu_parity_projector_refresh_same_subspace() {
    let Some(g) = gpu(true) else { return };
    let (gm, m, n, r) = spectral_matrix();
    let mut gg = g.alloc(m * n, Category::Grads).unwrap();
    g.upload(&mut gg, &gm).unwrap();
    for method in [Refresh::Eigh, Refresh::Randomized, Refresh::Svd] {
        for right in [true, false] {
            let (pn, side) = if right { (r * n, n) } else { (m * r, m) };
            let mut cpu_p = vec![0.0f32; pn];
            qgalore::host::linalg::top_subspace(&gm, m, n, r, right, method, None, 7, &mut cpu_p, 1).unwrap();
            let mut gp = g.alloc(pn, Category::Projector).unwrap();
            g.top_subspace(&gg, m, n, r, right, method, None, 7, &mut gp).unwrap();
            let gpu_p = down(&g, &gp, pn);
            let o = overlap(&cpu_p, &gpu_p, side, r, right);
            let self_o = overlap(&gpu_p, &gpu_p, side, r, right);
            println!("{method:?} right={right}: overlap {o:.6}, orthonormality {self_o:.6}");
            assert!((self_o - 1.0).abs() < 1e-4, "{method:?} right={right}: basis not orthonormal ({self_o})");
            assert!(o > 1.0 - 1e-3, "{method:?} right={right}: subspace overlap {o}");
            // the warm-started randomized refresh from the previous projector
            if method == Refresh::Randomized {
                let mut gp2 = g.alloc(pn, Category::Projector).unwrap();
                g.top_subspace(&gg, m, n, r, right, method, Some(&gp), 7, &mut gp2).unwrap();
                let mut cpu_p2 = vec![0.0f32; pn];
                qgalore::host::linalg::top_subspace(&gm, m, n, r, right, method, Some(&cpu_p), 7, &mut cpu_p2, 1).unwrap();
                let o2 = overlap(&cpu_p2, &down(&g, &gp2, pn), side, r, right);
                assert!(o2 > 1.0 - 1e-3, "warm randomized right={right}: subspace overlap {o2}");
            }
        }
    }
}

fn training_steps(bf16: bool) {
    if gpu(bf16).is_none() {
        return;
    }
    // fp32: the same arithmetic up to summation order; bf16: activations rounded to 8 bits
    let (step_tol, eval_tol) = if bf16 { (2e-2, 3e-2) } else { (1e-3, 1e-2) };
    // the second adam8bit/qgalore cases have tables larger than any linear: row-chunked
    // fused updates of the embedding and head
    for (name, vocab) in [("adamw", 64), ("adam8bit", 64), ("galore", 64), ("galore8bit", 64), ("qgalore", 64), ("adam8bit", 512), ("qgalore", 512)] {
        let mut cfg = engine_cfg(tiny_model(vocab, 64, 128, 4, 2, 2), 2, 32, 5);
        cfg.optimizer = optim(name, 1.0);
        cfg.optimizer.rank = 16;
        cfg.optimizer.fused = name != "adamw";
        cfg.optimizer.proj_group_size = 64;
        cfg.optimizer.weight_group_size = 64;
        if name == "qgalore" {
            cfg.optimizer.weight_bits = 8;
            cfg.optimizer.proj_bits = 4;
        }
        // the byte plan is what the device engine tracks, under either precision
        let plan = qgalore::plan::Plan::new(&cfg, bf16, "the model");
        let mut c = Engine::new(Cpu::new(2).unwrap(), cfg.clone()).unwrap();
        let mut d = Engine::new(Cuda::new(0, bf16).unwrap(), cfg).unwrap();
        assert_eq!(d.memory(), plan.initial.to_array(), "{name} bf16={bf16}: planned bytes of a fresh engine");
        for s in 0..3 {
            let t = tokens(2, 32, vocab, s);
            let (a, b) = (c.train_step(&t, 1, 3e-3).unwrap(), d.train_step(&t, 1, 3e-3).unwrap());
            assert!((a.loss - b.loss).abs() <= step_tol * a.loss, "{name} step {s}: loss {} vs {}", a.loss, b.loss);
        }
        assert_eq!(d.memory(), plan.stepped.to_array(), "{name} bf16={bf16}: planned bytes after three updates");
        let t = tokens(2, 32, vocab, 99);
        let (a, b) = (c.eval(&t, 1).unwrap(), d.eval(&t, 1).unwrap());
        println!("{name} bf16={bf16}: eval cpu {a:.5} gpu {b:.5}");
        assert!((a - b).abs() <= eval_tol * a, "{name}: eval {a} vs {b}");
    }
}

#[test]
fn gpu_parity_training_steps_every_optimizer_fp32() {
    training_steps(false);
}

#[test]
fn gpu_parity_training_steps_every_optimizer_bf16() {
    training_steps(true);
}

/// A quantized tensor's codes, scales and zeros, bit for bit.
fn q_bits<B: Quantization>(be: &B, q: &B::Q) -> (u8, usize, Vec<u8>, Vec<u32>, Vec<u32>) {
    let h = be.q_to_host(q).unwrap();
    (h.bits, h.group, h.codes.clone(), h.scale.iter().map(|x| x.to_bits()).collect(), h.zero.iter().map(|x| x.to_bits()).collect())
}

/// QLoRA with its NF4 base resident on the device: the device dequantization of every base
/// linear equals the CPU's bit for bit (f32 operand; the bf16 operand is that value rounded
/// once), the engine tracks the planned bytes, and a few adapter steps agree with the CPU's.
fn qlora_steps(bf16: bool) {
    if gpu(bf16).is_none() {
        return;
    }
    qlora_steps_on(|| Cuda::new(0, bf16).unwrap(), bf16);
}

/// `qlora_steps` against any backend (`bf16`: the device's precision, for the plan).
fn qlora_steps_on<B: Backend>(device: impl Fn() -> B, bf16: bool) {
    let (step_tol, eval_tol) = if bf16 { (2e-2, 3e-2) } else { (1e-3, 1e-2) };
    // rows of 96 values straddle the blocks of 64; all seven linears targeted
    let mut cfg = engine_cfg(tiny_model(64, 96, 160, 4, 2, 2), 2, 32, 5);
    cfg.optimizer = optim("qlora", 1.0);
    cfg.optimizer.lora_rank = 8;
    cfg.optimizer.lora_alpha = 16.0;
    cfg.optimizer.lora_targets = qgalore::model::Targets::ALL;
    let plan = qgalore::plan::Plan::new(&cfg, bf16, "the model");
    let mut c = Engine::new(Cpu::new(2).unwrap(), cfg.clone()).unwrap();
    let mut d = Engine::new(device(), cfg).unwrap();
    assert_eq!(d.memory(), plan.initial.to_array(), "qlora bf16={bf16}: planned bytes of a fresh engine");
    let mut nf4 = 0;
    for (i, p) in d.model.params.iter().enumerate() {
        let qgalore::model::Weight::N(t) = &p.data else { continue };
        let n = p.numel();
        let mut scratch = c.be.alloc(0, Category::Activations).unwrap();
        let want = c.model.read_host(&c.be, i, &mut scratch).unwrap().into_owned();
        let mut buf = d.be.alloc_fp32(n, Category::Activations).unwrap();
        d.be.nf4_dequantize_rows(&mut buf, t, p.cols, 0..p.rows);
        let mut got = vec![0.0f32; n];
        d.be.download(&buf, &mut got).unwrap();
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: device NF4 dequantization differs from the CPU's", p.name);
        // a row range that starts and ends inside blocks
        let (r0, r1) = (1, p.rows - 1);
        let mut part = d.be.alloc_fp32((r1 - r0) * p.cols, Category::Activations).unwrap();
        d.be.nf4_dequantize_rows(&mut part, t, p.cols, r0..r1);
        let mut got = vec![0.0f32; (r1 - r0) * p.cols];
        d.be.download(&part, &mut got).unwrap();
        assert!(got.iter().zip(&want[r0 * p.cols..r1 * p.cols]).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: rows {r0}..{r1}", p.name);
        // the codes came back as they went up
        let qgalore::model::Weight::N(ct) = &c.model.params[i].data else { unreachable!("{}: NF4 on the CPU too", p.name) };
        assert_eq!(*d.be.nf4_to_host(t).unwrap(), *c.be.nf4_to_host(ct).unwrap(), "{}: codes and constants", p.name);
        nf4 += 1;
    }
    assert_eq!(nf4, 14, "two blocks of seven NF4 linears");
    for s in 0..3 {
        let t = tokens(2, 32, 64, s);
        let (a, b) = (c.train_step(&t, 1, 3e-3).unwrap(), d.train_step(&t, 1, 3e-3).unwrap());
        assert!((a.loss - b.loss).abs() <= step_tol * a.loss, "qlora step {s}: loss {} vs {}", a.loss, b.loss);
    }
    assert_eq!(d.memory(), plan.stepped.to_array(), "qlora bf16={bf16}: planned bytes after three updates");
    let t = tokens(2, 32, 64, 99);
    let (a, b) = (c.eval(&t, 1).unwrap(), d.eval(&t, 1).unwrap());
    println!("qlora bf16={bf16}: eval cpu {a:.5} gpu {b:.5}");
    assert!((a - b).abs() <= eval_tol * a, "qlora: eval {a} vs {b}");
    // the adapters moved alike (Adam's first steps are near sign(g): an element whose
    // gradient is almost 0 may step differently, hence a tolerance of a few per cent)
    let adapter_tol = if bf16 { 0.2 } else { 0.05 };
    for ((name, _, x), (_, _, y)) in c.adapter_tensors().unwrap().into_iter().zip(d.adapter_tensors().unwrap()) {
        close(&name, &y, &x, adapter_tol);
    }
}

#[test]
fn gpu_parity_qlora_fp32() {
    qlora_steps(false);
}

#[test]
fn gpu_parity_qlora_bf16() {
    qlora_steps(true);
}

#[test]
fn qlora_harness_runs_on_the_cpu() {
    qlora_steps_on(|| Cpu::new(2).unwrap(), false);
}
