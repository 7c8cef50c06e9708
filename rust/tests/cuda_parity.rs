//! GPU against CPU: every op and whole training steps, with the tolerances written here.
//! Without a GPU each test prints `skipped: no GPU` and passes.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::backend::cuda::{probe, Cuda};
use qgalore::backend::{AdamHp, AttnDims, Backend, Category, Refresh};
use qgalore::quant::Range;
use qgalore::train::Engine;

fn gpu() -> Option<Cuda> {
    if probe::device_count() == 0 {
        println!("skipped: no GPU");
        return None;
    }
    Some(Cuda::new(0).expect("a GPU is present but the CUDA backend failed to start"))
}

fn up(g: &Cuda, v: &[f32]) -> <Cuda as Backend>::Buf {
    let mut b = g.alloc(v.len(), Category::Activations).unwrap();
    g.upload(&mut b, v).unwrap();
    b
}

fn cb(cpu: &Cpu, v: &[f32]) -> <Cpu as Backend>::Buf {
    let mut b = cpu.alloc(v.len(), Category::Activations).unwrap();
    cpu.upload(&mut b, v).unwrap();
    b
}

fn down(g: &Cuda, b: &<Cuda as Backend>::Buf, n: usize) -> Vec<f32> {
    let mut h = vec![0.0; n];
    g.download(b, &mut h).unwrap();
    h
}

fn close(name: &str, gpu: &[f32], cpu: &[f32], rel: f32) {
    let scale = cpu.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    let err = gpu.iter().zip(cpu).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= rel * scale, "{name}: max error {err} vs scale {scale} (tolerance {rel})");
}

#[test]
fn gpu_parity_layer_ops() {
    let Some(g) = gpu() else { return };
    let cpu = Cpu::new(2).unwrap();
    let (n, ic, oc) = (64, 48, 40);
    let (x, w, d) = (values(n * ic, 1), values(oc * ic, 2), values(n * oc, 3));
    let (gx, gw, gd) = (up(&g, &x), up(&g, &w), up(&g, &d));
    let mut go = g.alloc(n * oc, Category::Activations).unwrap();
    g.matmul(&mut go, &gx, &gw, n, ic, oc, false);
    let mut co = vec![0.0; n * oc];
    qgalore::backend::cpu::matmul::matmul(&mut co, &x, &w, n, ic, oc, false, gemm::Parallelism::None);
    close("matmul", &down(&g, &go, n * oc), &co, 1e-5);
    let mut gdw = g.alloc(oc * ic, Category::Grads).unwrap();
    g.matmul_dw(&mut gdw, &gd, &gx, n, ic, oc, false);
    let mut cdw = vec![0.0; oc * ic];
    qgalore::backend::cpu::matmul::matmul_dw(&mut cdw, &d, &x, n, ic, oc, false, gemm::Parallelism::None);
    close("matmul_dw", &down(&g, &gdw, oc * ic), &cdw, 1e-5);
    // attention with grouped KV heads, forward and backward
    let dm = AttnDims { b: 2, t: 16, h: 4, kvh: 2, hd: 8 };
    let (nq, nk, na) = (2 * 16 * 32, 2 * 16 * 16, 2 * 4 * 16 * 16);
    let (q, k, v, dout) = (values(nq, 4), values(nk, 5), values(nk, 6), values(nq, 7));
    let (mut co, mut ca) = (vec![0.0; nq], vec![0.0; na]);
    qgalore::backend::cpu::attention::forward(&mut co, &mut ca, &q, &k, &v, dm);
    let (gq, gk, gv, gdo) = (up(&g, &q), up(&g, &k), up(&g, &v), up(&g, &dout));
    let mut gout = g.alloc(nq, Category::Activations).unwrap();
    let mut gatt = g.alloc(na, Category::Activations).unwrap();
    g.attention(&mut gout, &mut gatt, &gq, &gk, &gv, dm);
    close("attention", &down(&g, &gout, nq), &co, 1e-4);
    let (mut cdq, mut cdk, mut cdv, mut cs) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk], vec![0.0; na]);
    qgalore::backend::cpu::attention::backward(&mut cdq, &mut cdk, &mut cdv, &mut cs, &dout, &q, &k, &v, &ca, dm);
    let mut gdq = g.alloc(nq, Category::Activations).unwrap();
    let mut gdk = g.alloc(nk, Category::Activations).unwrap();
    let mut gdv = g.alloc(nk, Category::Activations).unwrap();
    let mut gs = g.alloc(na, Category::Activations).unwrap();
    g.attention_bwd(&mut gdq, &mut gdk, &mut gdv, &mut gs, &gdo, &gq, &gk, &gv, &gatt, dm);
    close("attention dq", &down(&g, &gdq, nq), &cdq, 1e-4);
    close("attention dk", &down(&g, &gdk, nk), &cdk, 1e-4);
    close("attention dv", &down(&g, &gdv, nk), &cdv, 1e-4);
    let _ = cpu;
}

#[test]
fn gpu_parity_quantized_update_and_8bit_adam_bit_identical() {
    let Some(g) = gpu() else { return };
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
        let mut buf = qgalore::state::Writer::new();
        g.save_q(&gq, &mut buf);
        let mut cbuf = qgalore::state::Writer::new();
        cpu.save_q(&cq, &mut cbuf);
        assert!(buf.buf == cbuf.buf, "{bits}-bit group {group}: quantization codes differ");
        if bits == 8 {
            let (cd, gd) = (cb(&cpu, &delta), up(&g, &delta));
            let key = qgalore::rng::stream_key(1, 2, 3);
            cpu.q_update(&mut cq, &cd, 0.999, Range::WithZero, Some(key));
            g.q_update(&mut gq, &gd, 0.999, Range::WithZero, Some(key));
            let (mut a, mut b) = (qgalore::state::Writer::new(), qgalore::state::Writer::new());
            g.save_q(&gq, &mut a);
            cpu.save_q(&cq, &mut b);
            assert!(a.buf == b.buf, "group {group}: INT8 stochastic-rounding update differs");
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
    let (mut a, mut b) = (qgalore::state::Writer::new(), qgalore::state::Writer::new());
    g.save_a8(&gs, &mut a);
    cpu.save_a8(&cs, &mut b);
    assert!(a.buf == b.buf, "8-bit Adam states differ");
}

#[test]
fn gpu_parity_projector_refresh_same_subspace() {
    let Some(g) = gpu() else { return };
    let (m, n, r) = (96, 64, 8);
    let gm = values(m * n, 30);
    let mut cpu_p = vec![0.0f32; r * n];
    qgalore::backend::cpu::linalg::top_subspace(&gm, m, n, r, true, Refresh::Eigh, None, 0, &mut cpu_p, 1).unwrap();
    let gg = up(&g, &gm);
    let mut gp = g.alloc(r * n, Category::Projector).unwrap();
    g.top_subspace(&gg, m, n, r, true, Refresh::Eigh, None, 0, &mut gp).unwrap();
    let gpu_p = down(&g, &gp, r * n);
    // same vectors up to sign
    for i in 0..r {
        let dot: f32 = (0..n).map(|j| cpu_p[i * n + j] * gpu_p[i * n + j]).sum();
        assert!((dot.abs() - 1.0).abs() < 1e-3, "vector {i}: |cos| = {}", dot.abs());
    }
}

#[test]
fn gpu_parity_training_steps_every_optimizer() {
    if gpu().is_none() {
        return;
    }
    for name in ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"] {
        let mut cfg = engine_cfg(tiny_model(64, 64, 128, 4, 2, 2), 2, 32, 5);
        cfg.optimizer = optim(name, 1.0);
        cfg.optimizer.rank = 16;
        cfg.optimizer.fused = name != "adamw";
        cfg.optimizer.proj_group_size = 64;
        cfg.optimizer.weight_group_size = 64;
        if name == "qgalore" {
            cfg.optimizer.weight_bits = 8;
            cfg.optimizer.proj_bits = 4;
        }
        let mut c = Engine::new(Cpu::new(2).unwrap(), cfg.clone()).unwrap();
        let mut d = Engine::new(Cuda::new(0).unwrap(), cfg).unwrap();
        for s in 0..3 {
            let t = tokens(2, 32, 64, s);
            let (a, b) = (c.train_step(&t, 1, 3e-3).unwrap(), d.train_step(&t, 1, 3e-3).unwrap());
            assert!((a.loss - b.loss).abs() <= 1e-3 * a.loss, "{name} step {s}: loss {} vs {}", a.loss, b.loss);
        }
        let t = tokens(2, 32, 64, 99);
        let (a, b) = (c.eval(&t, 1).unwrap(), d.eval(&t, 1).unwrap());
        assert!((a - b).abs() <= 1e-2 * a, "{name}: eval {a} vs {b}");
    }
}
