//! GaLore / Q-GaLore invariants I-1 … I-5, I-11, I-12, I-14, I-17, I-18 (docs/algorithm-spec.md §6).

mod common;
use common::*;
use qgalore::backend::cpu::{ops, Cpu};
use qgalore::host::{linalg::top_subspace, matmul};
use qgalore::backend::{AdamHp, Refresh};
use qgalore::config::EngineConfig;
use qgalore::model::{Role, Weight};
use qgalore::optim::galore::Family;
use qgalore::optim::lazy::Lazy;
use qgalore::train::Engine;

fn engine(cfg: EngineConfig) -> Engine<Cpu> {
    Engine::new(Cpu::new(cfg.threads).unwrap(), cfg).unwrap()
}

fn galore_cfg(name: &str, rank: usize, seed: u64) -> EngineConfig {
    let mut c = engine_cfg(tiny_model(64, 32, 48, 4, 4, 2), 2, 16, seed);
    c.optimizer = optim(name, 0.0);
    c.optimizer.rank = rank;
    c.optimizer.update_gap = 3;
    c.optimizer.weight_group_size = 64;
    c.optimizer.proj_group_size = 64;
    c
}

fn family(e: &Engine<Cpu>) -> &Family<Cpu> {
    e.opt.as_any().downcast_ref::<Family<Cpu>>().expect("GaLore family optimizer")
}

/// Low-rank matrix plus noise with a clear spectrum.
fn spectral(m: usize, n: usize, seed: u64) -> Vec<f32> {
    let a = values(m * 6, seed);
    let b = values(6 * n, seed + 1);
    let mut g = vec![0.0f32; m * n];
    matmul::matmul_nn(&mut g, &a, &b, m, 6, n, gemm::Parallelism::None);
    let noise = values(m * n, seed + 2);
    g.iter_mut().zip(noise).for_each(|(x, e)| *x += 0.05 * e);
    g
}

fn svals(g: &[f32], m: usize, n: usize) -> Vec<f64> {
    let gm = faer::MatRef::from_row_major_slice(g, m, n);
    let g64 = faer::Mat::<f64>::from_fn(m, n, |i, j| gm[(i, j)] as f64);
    let s = g64.thin_svd().unwrap();
    (0..m.min(n)).map(|i| s.S().column_vector()[i]).collect()
}

#[test]
fn i1_orientation_and_shapes() {
    // hidden 32, intermediate 48: q/k/v/o square and gate/up tall → right; down wide → left
    for (rank, want) in [(16usize, 16usize), (32, 32), (64, 32)] {
        let e = engine(galore_cfg("galore", rank, 1));
        let f = family(&e);
        let ly = e.model.layers[0];
        for idx in [ly.q, ly.k, ly.v, ly.o, ly.gate, ly.up] {
            let p = f.proj(idx).unwrap();
            assert!(p.right, "{}", e.model.params[idx].name);
            assert_eq!(p.rank, want);
        }
        let d = f.proj(ly.down).unwrap();
        assert!(!d.right && d.rank == want);
        assert!(f.proj(e.model.embed).is_none() && f.proj(e.model.head).is_none() && f.proj(ly.attn_norm).is_none());
    }
}

#[test]
fn i2_i3_projectors_are_orthonormal_and_optimal() {
    for &(m, n, r) in &[(40usize, 24usize, 6usize), (24, 40, 6), (30, 30, 30)] {
        let g = spectral(m, n, 7);
        let s = svals(&g, m, n);
        let right = m >= n;
        for method in [Refresh::Svd, Refresh::Eigh, Refresh::Randomized] {
            let mut p = vec![0.0f32; r * m.max(n)];
            top_subspace(&g, m, n, r, right, method, None, 5, &mut p, 2).unwrap();
            // Gram of the basis vectors
            let (len, count) = if right { (n, r) } else { (m, r) };
            let at = |i: usize, j: usize| if right { p[i * n + j] } else { p[j * r + i] };
            let mut worst = 0.0f64;
            for a in 0..count {
                for b in 0..count {
                    let d: f64 = (0..len).map(|j| at(a, j) as f64 * at(b, j) as f64).sum();
                    worst = worst.max((d - if a == b { 1.0 } else { 0.0 }).abs());
                }
            }
            assert!(worst <= 1e-5, "{method:?} {m}×{n}: orthonormality error {worst}");
            // energy captured: ‖R‖² = Σ_{i<r} σ_i²
            let mut rr = vec![0.0f32; if right { m * r } else { r * n }];
            if right {
                matmul::matmul(&mut rr, &g, &p, m, n, r, false, gemm::Parallelism::None);
            } else {
                matmul::matmul_dw(&mut rr, &p, &g, m, n, r, false, gemm::Parallelism::None);
            }
            let energy: f64 = rr.iter().map(|x| (*x as f64).powi(2)).sum();
            let best: f64 = s[..r].iter().map(|x| x * x).sum();
            let tol = if method == Refresh::Randomized { 1e-3 } else { 1e-4 };
            assert!(((energy - best) / best).abs() < tol, "{method:?} {m}×{n}: energy {energy} vs {best}");
        }
    }
}

#[test]
fn i4_full_rank_projection_is_the_identity_and_adam_commutes_with_signed_permutations() {
    let (m, n) = (12, 8);
    let g = values(m * n, 3);
    let mut q = vec![0.0f32; n * n];
    top_subspace(&g, m, n, n, true, Refresh::Svd, None, 0, &mut q, 1).unwrap();
    let (mut r, mut back) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
    matmul::matmul(&mut r, &g, &q, m, n, n, false, gemm::Parallelism::None);
    matmul::matmul_dinp(&mut back, &r, &q, m, n, n, false, gemm::Parallelism::None);
    for (a, b) in back.iter().zip(&g) {
        assert!((a - b).abs() < 1e-5, "SGD through a full-rank projector must be exact");
    }
    // a signed permutation projector: GaLore-Adam == Adam
    let perm = [3usize, 0, 7, 1, 6, 2, 5, 4];
    let mut pq = vec![0.0f32; n * n];
    for (i, &j) in perm.iter().enumerate() {
        pq[i * n + j] = if i % 2 == 0 { 1.0 } else { -1.0 };
    }
    let hp = AdamHp { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.0, step: 1 };
    let mut plain = g.clone();
    let (mut m1, mut v1) = (vec![0.0; m * n], vec![0.0; m * n]);
    ops::galore_adam(&mut plain, &mut m1, &mut v1, hp);
    let mut low = vec![0.0f32; m * n];
    matmul::matmul(&mut low, &g, &pq, m, n, n, false, gemm::Parallelism::None);
    let (mut m2, mut v2) = (vec![0.0; m * n], vec![0.0; m * n]);
    ops::galore_adam(&mut low, &mut m2, &mut v2, hp);
    matmul::matmul_dinp(&mut back, &low, &pq, m, n, n, false, gemm::Parallelism::None);
    assert_eq!(back, plain);
}

#[test]
fn i5_refresh_schedule_fixed_gap() {
    let mut e = engine(galore_cfg("galore", 8, 2));
    for s in 0..7 {
        e.train_step(&tokens(2, 16, 64, s), 1, 1e-3).unwrap();
    }
    // steps 0, 3, 6 (pre-increment) refresh each of the 7·L matrices
    assert_eq!(family(&e).stats.svd_count, 3 * 7 * 2);
}

#[test]
fn i5_lazy_gap_sequence_with_always_similar_subspaces() {
    let run = |gap: u64, steps: u64| {
        let mut l = Lazy::new(gap, true, 0.4, 5, 2, false);
        let mut at = Vec::new();
        for iter in 0..steps {
            if l.due(iter) {
                at.push(iter);
                l.observe(vec![1.0, 0.0]); // cosine 1 with the previous vector
            }
        }
        at
    };
    assert_eq!(run(200, 20_000), vec![0, 200, 400, 600, 800, 1000, 1200, 1600, 3200, 6400, 12800]);
    assert_eq!(run(500, 150_000).len(), 13);
    // dissimilar subspaces never grow the gap
    let mut l = Lazy::new(200, true, 0.4, 5, 2, false);
    for k in 0..20 {
        l.observe(if k % 2 == 0 { vec![1.0, 0.0] } else { vec![0.0, 1.0] });
    }
    assert_eq!(l.gap, 200);
}

#[test]
fn i18_signed_cosine_flips_abs_is_invariant() {
    let v = vec![0.6f32, 0.8];
    let w = vec![0.8f32, 0.6];
    let minus: Vec<f32> = w.iter().map(|x| -x).collect();
    let mut signed = Lazy::new(1, false, 0.4, 5, 2, false);
    signed.observe(v.clone());
    let c = signed.observe(w.clone()).unwrap();
    let mut s2 = Lazy::new(1, false, 0.4, 5, 2, false);
    s2.observe(v.clone());
    assert_eq!(s2.observe(minus.clone()).unwrap(), -c);
    let mut a = Lazy::new(1, false, 0.4, 5, 2, true);
    a.observe(v.clone());
    let mut a2 = Lazy::new(1, false, 0.4, 5, 2, true);
    a2.observe(v);
    assert_eq!(a.observe(w).unwrap(), a2.observe(minus).unwrap());
}

#[test]
fn i12_fused_per_layer_step_equals_global_step() {
    for name in ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"] {
        for clip in [0.0f32, 0.05] {
            let run = |fused: bool| {
                let mut c = galore_cfg(name, 8, 4);
                c.optimizer.fused = fused;
                c.optimizer.clip = clip;
                if name == "qgalore" {
                    c.optimizer.weight_bits = 8;
                    c.optimizer.proj_bits = 4;
                    c.optimizer.lazy = true;
                }
                let mut e = engine(c);
                let losses: Vec<u64> =
                    (0..4).map(|s| e.train_step(&tokens(2, 16, 64, 50 + s), 1, 2e-3).unwrap().loss.to_bits()).collect();
                let l = e.eval(&tokens(2, 16, 64, 99), 1).unwrap();
                (losses, l.to_bits(), e.fused)
            };
            let (a, b) = (run(true), run(false));
            assert!(a.2 && !b.2);
            assert_eq!(a.0, b.0, "{name} clip {clip}: per-step losses differ");
            assert_eq!(a.1, b.1, "{name} clip {clip}: final weights differ");
        }
    }
}

/// With a vocabulary-sized embedding and head larger than every other tensor, the fused
/// step takes their gradients in row chunks (whole 8-bit blocks): the shared gradient
/// buffer shrinks to the largest other tensor and the run equals the global step.
#[test]
fn fused_step_updates_large_tables_in_row_chunks() {
    use qgalore::backend::{Category, Memory};
    for name in ["adam8bit", "galore8bit", "qgalore"] {
        for clip in [0.0f32, 0.05] {
            let run = |fused: bool| {
                // tables 512×64 = 32768 elements; the largest linear 128×64 = 8192
                let mut c = engine_cfg(tiny_model(512, 64, 128, 4, 4, 2), 2, 16, 7);
                c.optimizer = optim(name, clip);
                c.optimizer.rank = 8;
                c.optimizer.update_gap = 3;
                c.optimizer.weight_group_size = 64;
                c.optimizer.proj_group_size = 64;
                c.optimizer.fused = fused;
                let mut e = engine(c);
                let steps: Vec<(f64, f64)> = (0..4)
                    .map(|s| {
                        let st = e.train_step(&tokens(2, 16, 512, 70 + s), 1, 2e-3).unwrap();
                        (st.loss, st.grad_norm)
                    })
                    .collect();
                let l = e.eval(&tokens(2, 16, 512, 98), 1).unwrap();
                let chunk = e.grads.chunk_rows(e.model.head);
                (steps, l, chunk, e.be.mem().get(Category::Grads))
            };
            let (a, b) = (run(true), run(false));
            assert_eq!(a.2, Some(128), "{name}: rows per chunk (8192 / 64)");
            assert_eq!(b.2, None);
            // the shared buffer holds the largest linear (8192), not a table (32768); the
            // projected optimizers add their low-rank scratch
            if name == "adam8bit" {
                assert_eq!(a.3, 4 * 8192, "{name}: gradient bytes");
            } else {
                assert!(a.3 < 4 * 32768, "{name}: gradient bytes {}", a.3);
            }
            // identical weights; the norm sums the tables chunk by chunk, so its last f64
            // bits may differ
            for ((la, na), (lb, nb)) in a.0.iter().zip(&b.0) {
                assert_eq!(la.to_bits(), lb.to_bits(), "{name} clip {clip}: losses differ");
                assert!((na - nb).abs() <= 1e-12 * nb, "{name} clip {clip}: norms {na} vs {nb}");
            }
            assert_eq!(a.1.to_bits(), b.1.to_bits(), "{name} clip {clip}: final weights differ");
        }
    }
}

#[test]
fn every_tensor_is_updated_once_per_step() {
    for name in ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"] {
        let mut c = galore_cfg(name, 8, 5);
        c.optimizer.fused = true;
        if name == "qgalore" {
            c.optimizer.weight_bits = 8;
        }
        let mut e = engine(c);
        let snap = |e: &Engine<Cpu>| -> Vec<Vec<f32>> {
            e.model
                .params
                .iter()
                .map(|p| match &p.data {
                    Weight::F(b) => b.data.clone(),
                    Weight::Q(q) => q.codes.iter().map(|&c| c as f32).chain(q.scale.iter().cloned()).collect(),
                    Weight::N(..) => unreachable!("no NF4 weights here"),
                })
                .collect()
        };
        let before = snap(&e);
        e.train_step(&tokens(2, 16, 64, 1), 1, 1e-2).unwrap();
        let after = snap(&e);
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            assert_ne!(a, b, "{name}: {} was not updated", e.model.params[i].name);
        }
        assert_eq!(e.opt.steps(), 1);
    }
}

#[test]
fn i11_forward_uses_the_optimizers_dequantized_weights() {
    let mut c = galore_cfg("qgalore", 8, 6);
    c.optimizer.weight_bits = 8;
    let mut q = engine(c);
    q.train_step(&tokens(2, 16, 64, 3), 1, 1e-2).unwrap();
    let mut f = engine(galore_cfg("adamw", 8, 6));
    for (pf, pq) in f.model.params.iter_mut().zip(&q.model.params) {
        match &pq.data {
            Weight::Q(qt) => qt.dequantize(&mut pf.f_mut().data),
            Weight::F(b) => pf.f_mut().data.copy_from_slice(&b.data),
            Weight::N(..) => unreachable!("no NF4 weights here"),
        }
    }
    let toks = tokens(2, 16, 64, 8);
    assert_eq!(q.eval(&toks, 1).unwrap().to_bits(), f.eval(&toks, 1).unwrap().to_bits());
}

#[test]
fn i14_parameter_selection() {
    let mut c = galore_cfg("qgalore", 8, 1);
    c.optimizer.weight_bits = 8;
    let e = engine(c);
    let projected = (0..e.model.params.len()).filter(|&i| family(&e).proj(i).is_some()).count();
    let int8 = e.model.params.iter().filter(|p| matches!(p.data, Weight::Q(_))).count();
    assert_eq!(projected, 7 * 2);
    assert_eq!(int8, 7 * 2);
    assert!(e.model.params.iter().filter(|p| p.role != Role::Linear).all(|p| matches!(p.data, Weight::F(_))));
    // the GaLore'd subset of the paper's models (vocab 32000)
    let sub = |c: usize, i: usize, h: usize, l: usize| {
        let mut m = tiny_model(32000, c, i, h, h, l);
        m.max_position_embeddings = 2048;
        qgalore::model::llama::layout(&m).iter().filter(|x| x.3 == Role::Linear).map(|x| x.1 * x.2).sum::<usize>()
    };
    let r = |x: usize| (x as f64 / 1e4).round() / 100.0;
    assert_eq!(r(sub(512, 1376, 8, 8)), 25.30);
    assert_eq!(r(sub(768, 2048, 12, 12)), 84.93);
    assert_eq!(r(sub(1024, 2736, 16, 24)), 302.38);
    assert_eq!(r(sub(2048, 5461, 32, 24)), 1207.91);
    assert_eq!(r(sub(4096, 11008, 32, 32)), 6476.01);
}

#[test]
fn i17_zero_and_nonfinite_gradients_keep_the_projector() {
    let e = engine(galore_cfg("galore", 8, 3));
    let be = Cpu::new(1).unwrap();
    let mut model = qgalore::model::Llama::new(&be, &e.cfg.model, 3).unwrap();
    let plan = qgalore::plan::Plan::new(&e.cfg, false, "the model");
    let mut f = Family::new(&be, &plan, &e.cfg.optimizer, 3).unwrap();
    let idx = model.layers[0].q;
    let n = model.params[idx].numel();
    let mut g = qgalore::backend::Memory::alloc(&be, n, qgalore::backend::Category::Grads).unwrap();
    use qgalore::optim::Optimizer;
    // step 1: a normal gradient gives a projector
    g.data.copy_from_slice(&values(n, 1));
    f.begin_step();
    f.update(&be, idx, &mut model.params[idx], &mut g, 1e-3).unwrap();
    assert_eq!(f.stats.svd_count, 1);
    // steps 2–3 pass, step 4 is due (gap 3): an all-NaN gradient must not crash or refresh
    for _ in 0..2 {
        g.data.copy_from_slice(&values(n, 2));
        f.begin_step();
        f.update(&be, idx, &mut model.params[idx], &mut g, 1e-3).unwrap();
    }
    let w = model.params[idx].f().data.clone();
    g.data.iter_mut().for_each(|x| *x = f32::NAN);
    f.begin_step();
    f.update(&be, idx, &mut model.params[idx], &mut g, 1e-3).unwrap();
    f.end_step(&be); // collects the backend's deferred non-finite count
    assert_eq!(f.stats.svd_count, 1, "no refresh from a NaN gradient");
    assert_eq!(f.stats.refresh_failures, 1);
    assert_eq!(f.stats.nonfinite_grads, n as u64);
    assert!(model.params[idx].f().data.iter().all(|x| x.is_finite()));
    assert_ne!(model.params[idx].f().data, w, "momentum still moves the weight");
}

/// Tied tables: the fused step (the table updated once, after the embedding's backward,
/// whole or in row chunks) equals the global step.
#[test]
fn fused_step_equals_global_step_for_tied_tables() {
    for (vocab, name) in [(64, "adamw"), (64, "galore"), (64, "qgalore"), (512, "adam8bit"), (512, "galore8bit"), (512, "qgalore")] {
        for clip in [0.0f32, 0.05] {
            let run = |fused: bool| {
                let mut m = tiny_model(vocab, 64, 128, 4, 4, 2);
                m.tie_word_embeddings = true;
                let mut c = engine_cfg(m, 2, 16, 7);
                c.optimizer = optim(name, clip);
                c.optimizer.rank = 8;
                c.optimizer.update_gap = 3;
                c.optimizer.weight_group_size = 64;
                c.optimizer.proj_group_size = 64;
                c.optimizer.fused = fused;
                let mut e = engine(c);
                let losses: Vec<u64> = (0..4).map(|s| e.train_step(&tokens(2, 16, vocab, 70 + s), 1, 2e-3).unwrap().loss.to_bits()).collect();
                (losses, e.eval(&tokens(2, 16, vocab, 98), 1).unwrap().to_bits(), e.grads.chunk_rows(e.model.head))
            };
            let (a, b) = (run(true), run(false));
            if vocab == 512 {
                assert_eq!(a.2, Some(128), "{name}: rows per chunk");
            }
            assert_eq!(a.0, b.0, "{name} vocab {vocab} clip {clip}: losses differ");
            assert_eq!(a.1, b.1, "{name} vocab {vocab} clip {clip}: final weights differ");
        }
    }
}
