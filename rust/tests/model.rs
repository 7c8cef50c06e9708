//! Whole-model tests: gradient check, determinism, gradient accumulation, overfitting.

mod common;
use common::*;
use qgalore::train::Engine;
use qgalore::backend::cpu::Cpu;

fn engine(cfg: qgalore::config::EngineConfig) -> Engine<Cpu> {
    let threads = cfg.threads;
    Engine::new(Cpu::new(threads).unwrap(), cfg).unwrap()
}

#[test]
fn whole_model_gradient_matches_finite_differences() {
    // GQA on, larger init so every parameter has a clearly non-zero gradient.
    let mut m = tiny_model(32, 16, 24, 4, 2, 2);
    m.initializer_range = 0.3;
    let (b, t) = (2, 6);
    let mut e = engine(engine_cfg(m, b, t, 3));
    let toks = tokens(b, t, 32, 9);
    e.loss_and_grads(&toks, 1).unwrap();
    for idx in 0..e.model.params.len() {
        let name = e.model.params[idx].name.clone();
        let analytic = e.grads.get(idx).data.clone();
        let mut x = e.model.params[idx].f().data.clone();
        grad_check(&name, &analytic, &mut x, 1e-2, 40, |xx| {
            e.model.params[idx].f_mut().data.copy_from_slice(xx);
            e.eval(&toks, 1).unwrap()
        });
        e.model.params[idx].f_mut().data.copy_from_slice(&x);
    }
}

#[test]
fn initial_loss_is_log_vocab() {
    let m = tiny_model(256, 32, 64, 4, 4, 2);
    let mut e = engine(engine_cfg(m, 4, 16, 1));
    let l = e.eval(&tokens(4, 16, 256, 2), 1).unwrap();
    assert!((l - 256f64.ln()).abs() < 0.05, "{l}");
}

#[test]
fn same_seed_gives_bit_identical_trajectories() {
    let run = |threads: usize| {
        let mut cfg = engine_cfg(tiny_model(64, 32, 48, 4, 4, 2), 3, 12, 42);
        cfg.threads = threads;
        let mut e = engine(cfg);
        (0..6).map(|s| e.train_step(&tokens(3, 12, 64, 100 + s), 1, 3e-3).unwrap().loss.to_bits()).collect::<Vec<_>>()
    };
    let a = run(2);
    assert_eq!(a, run(2));
    assert_eq!(a, run(1), "trajectory depends on the thread count");
    let mut cfg = engine_cfg(tiny_model(64, 32, 48, 4, 4, 2), 3, 12, 43);
    cfg.threads = 2;
    let other = engine(cfg).train_step(&tokens(3, 12, 64, 100), 1, 3e-3).unwrap().loss.to_bits();
    assert_ne!(a[0], other, "a different seed must give a different model");
}

#[test]
fn gradient_accumulation_equals_one_large_batch() {
    let m = tiny_model(48, 32, 40, 4, 4, 2);
    let toks = tokens(4, 10, 48, 5);
    let mut big = engine(engine_cfg(m.clone(), 4, 10, 8));
    let mut acfg = engine_cfg(m, 2, 10, 8);
    acfg.grad_accum = 2;
    let mut acc = engine(acfg);
    let lb = big.loss_and_grads(&toks, 1).unwrap();
    let la = acc.loss_and_grads(&toks, 2).unwrap();
    assert!((lb - la).abs() < 1e-6, "{lb} vs {la}");
    for i in 0..big.model.params.len() {
        let (g1, g2) = (&big.grads.get(i).data, &acc.grads.get(i).data);
        let err = g1.iter().zip(g2.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = g1.iter().map(|a| a.abs()).fold(0.0f32, f32::max);
        assert!(err <= 1e-5 * scale.max(1e-3), "param {i}: max err {err} (scale {scale})");
    }
    // and the resulting updates agree
    let sb = big.train_step(&toks, 1, 1e-3).unwrap();
    let sa = acc.train_step(&toks, 2, 1e-3).unwrap();
    assert!((sb.grad_norm - sa.grad_norm).abs() < 1e-5 * sb.grad_norm);
    let l1 = big.eval(&tokens(4, 10, 48, 6), 1).unwrap();
    let l2 = acc.eval(&tokens(2, 10, 48, 6), 1).unwrap();
    let l1b = big.eval(&tokens(4, 10, 48, 6), 1).unwrap();
    assert_eq!(l1, l1b);
    assert!(l2.is_finite());
}

#[test]
fn clipping_bounds_the_update_norm() {
    let mut cfg = engine_cfg(tiny_model(32, 16, 24, 2, 2, 1), 2, 8, 4);
    cfg.optimizer.clip = 1e-3;
    let mut e = engine(cfg);
    let toks = tokens(2, 8, 32, 1);
    e.loss_and_grads(&toks, 1).unwrap();
    let raw = e.grad_norm();
    let st = e.train_step(&toks, 1, 1e-3).unwrap();
    assert!(st.clipped && (st.grad_norm - raw).abs() < 1e-9 * raw.max(1.0));
    assert!((e.grad_norm() - 1e-3).abs() < 1e-6, "clipped norm {}", e.grad_norm());
}

#[test]
fn overfits_one_batch() {
    let mut e = engine(engine_cfg(tiny_model(64, 64, 128, 4, 4, 2), 2, 16, 7));
    let toks = tokens(2, 16, 64, 77);
    let first = e.train_step(&toks, 1, 1e-2).unwrap().loss;
    let mut last = first;
    for _ in 0..150 {
        last = e.train_step(&toks, 1, 1e-2).unwrap().loss;
    }
    assert!(first > 3.5, "{first}");
    assert!(last < 0.05, "loss after 150 steps on one batch: {last}");
}

#[test]
fn rejects_bad_batches_without_touching_weights() {
    let mut e = engine(engine_cfg(tiny_model(32, 16, 24, 2, 2, 1), 2, 8, 4));
    let before = e.model.params[1].f().data.clone();
    let err = e.train_step(&tokens(1, 8, 32, 1), 1, 1e-3).unwrap_err();
    assert!(err.msg.contains("expected 1 × batch 2"), "{}", err.msg);
    let mut bad = tokens(2, 8, 32, 1);
    bad[3] = 99;
    assert!(e.train_step(&bad, 1, 1e-3).unwrap_err().msg.contains("token id 99"));
    assert!(e.train_step(&tokens(2, 8, 32, 1), 1, f32::NAN).is_err());
    assert_eq!(before, e.model.params[1].f().data);
}

#[test]
fn diverging_run_reports_non_finite_and_keeps_weights() {
    let mut e = engine(engine_cfg(tiny_model(32, 16, 24, 2, 2, 1), 2, 8, 4));
    let toks = tokens(2, 8, 32, 1);
    let mut err = None;
    for _ in 0..20 {
        if let Err(x) = e.train_step(&toks, 1, 1e30) {
            err = Some(x);
            break;
        }
    }
    let err = err.expect("lr 1e30 must diverge");
    assert_eq!(err.code, qgalore::error::Code::NonFinite);
}

#[test]
fn param_count_matches_paper_totals() {
    use qgalore::model::llama::param_count;
    let cfg = |c, i, h, l| {
        let mut m = tiny_model(32000, c, i, h, h, l);
        m.max_position_embeddings = 2048;
        m
    };
    let m = |x: usize| (x as f64 / 1e6 * 100.0).round() / 100.0;
    assert_eq!(m(param_count(&cfg(512, 1376, 8, 8))), 58.07);
    assert_eq!(m(param_count(&cfg(768, 2048, 12, 12))), 134.11);
    assert_eq!(m(param_count(&cfg(1024, 2736, 16, 24))), 367.97);
    assert_eq!(m(param_count(&cfg(2048, 5461, 32, 24))), 1339.08);
    assert_eq!(m(param_count(&cfg(4096, 11008, 32, 32))), 6738.42);
}

#[test]
fn checkpointing_gives_bit_identical_training_with_less_activation_memory() {
    use qgalore::backend::{Category, Memory};
    // global step, fused step with and without clipping, gradient accumulation, INT8 weights
    for (name, fused, clip, ga) in
        [("adamw", false, 0.0, 1), ("qgalore", true, 0.0, 1), ("qgalore", true, 1e-2, 1), ("galore8bit", true, 0.0, 2), ("adam8bit", true, 1.0, 1)]
    {
        let run = |ckpt: bool| {
            let mut cfg = engine_cfg(tiny_model(64, 64, 96, 4, 2, 3), 2, 16, 9);
            cfg.optimizer = optim(name, clip);
            cfg.optimizer.rank = 8;
            cfg.optimizer.update_gap = 2;
            cfg.optimizer.fused = fused;
            cfg.optimizer.weight_group_size = 64;
            cfg.optimizer.proj_group_size = 64;
            cfg.grad_accum = ga;
            cfg.checkpointing = ckpt;
            let mut e = engine(cfg);
            let mut trace = Vec::new();
            for s in 0..4 {
                let st = e.train_step(&tokens(2 * ga, 16, 64, 300 + s), ga, 3e-3).unwrap();
                trace.push((st.loss.to_bits(), st.grad_norm.to_bits()));
            }
            trace.push((e.eval(&tokens(2, 16, 64, 9), 1).unwrap().to_bits(), 0));
            (trace, e.be.mem().get(Category::Activations))
        };
        let (plain, mem_plain) = run(false);
        let (ckpt, mem_ckpt) = run(true);
        assert_eq!(plain, ckpt, "{name} fused={fused} clip={clip} ga={ga}: checkpointing changed the run");
        assert!(mem_ckpt < mem_plain, "{name}: activations {mem_ckpt} ≥ {mem_plain}");
    }
}

/// `m` with one table serving the embedding and lm_head.
fn tied(mut m: qgalore::config::ModelConfig) -> qgalore::config::ModelConfig {
    m.tie_word_embeddings = true;
    m
}

#[test]
fn tied_model_gradient_matches_finite_differences() {
    // the table's gradient is the sum of its uses as embedding and as lm_head
    let mut m = tied(tiny_model(32, 16, 24, 4, 2, 2));
    m.initializer_range = 0.3;
    let (b, t) = (2, 6);
    let mut e = engine(engine_cfg(m.clone(), b, t, 3));
    assert_eq!((e.model.head, e.model.embed), (0, 0));
    assert_eq!(e.model.params.len(), 1 + 2 * 9 + 1, "no lm_head.weight");
    assert!(e.model.params.iter().all(|p| p.name != "lm_head.weight"));
    assert_eq!(e.model.numel(), qgalore::model::llama::param_count(&m));
    let toks = tokens(b, t, 32, 9);
    e.loss_and_grads(&toks, 1).unwrap();
    for idx in 0..e.model.params.len() {
        let name = e.model.params[idx].name.clone();
        let analytic = e.grads.get(idx).data.clone();
        let mut x = e.model.params[idx].f().data.clone();
        grad_check(&name, &analytic, &mut x, 1e-2, 40, |xx| {
            e.model.params[idx].f_mut().data.copy_from_slice(xx);
            e.eval(&toks, 1).unwrap()
        });
        e.model.params[idx].f_mut().data.copy_from_slice(&x);
    }
}

#[test]
fn tied_model_equals_an_untied_one_whose_head_is_the_embedding() {
    let mut m = tiny_model(32, 16, 24, 4, 2, 2);
    m.initializer_range = 0.3;
    let (b, t) = (2, 6);
    let toks = tokens(b, t, 32, 11);
    let mut u = engine(engine_cfg(m.clone(), b, t, 5));
    let mut tt = engine(engine_cfg(tied(m), b, t, 5));
    let table = tt.model.params[0].f().data.clone();
    let head = u.model.head;
    u.model.params[head].f_mut().data.copy_from_slice(&table);
    // every other tensor is initialised alike (same seed, same index)
    for i in 0..tt.model.params.len() {
        assert_eq!(u.model.params[i].f().data, tt.model.params[i].f().data, "{}", tt.model.params[i].name);
    }
    let (lu, lt) = (u.loss_and_grads(&toks, 1).unwrap(), tt.loss_and_grads(&toks, 1).unwrap());
    assert_eq!(lu.to_bits(), lt.to_bits(), "step-0 loss");
    for i in 1..tt.model.params.len() {
        assert_eq!(u.grads.get(i).data, tt.grads.get(i).data, "{}", tt.model.params[i].name);
    }
    // the table's gradient is the embedding's plus the head's
    let sum: Vec<f32> = u.grads.get(0).data.iter().zip(&u.grads.get(head).data).map(|(a, b)| a + b).collect();
    let got = &tt.grads.get(0).data;
    let scale = sum.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for (a, b) in sum.iter().zip(got) {
        assert!((a - b).abs() <= 1e-6 * scale, "{a} vs {b}");
    }
}

#[test]
fn every_optimizer_trains_a_tied_model() {
    for name in ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"] {
        for (fused, ga, clip) in [(false, 1, 0.0), (true, 1, 0.0), (true, 1, 0.5), (false, 2, 0.5), (true, 2, 0.0)] {
            let mut cfg = engine_cfg(tied(tiny_model(64, 64, 96, 4, 2, 2)), 2, 16, 21);
            cfg.optimizer = optim(name, clip);
            cfg.optimizer.rank = 16;
            cfg.optimizer.update_gap = 10;
            cfg.optimizer.fused = fused;
            cfg.optimizer.weight_group_size = 64;
            cfg.optimizer.proj_group_size = 64;
            if name == "qgalore" {
                cfg.optimizer.weight_bits = 8;
            }
            cfg.grad_accum = ga;
            let mut e = engine(cfg);
            let toks = tokens(2 * ga, 16, 64, 500);
            let first = e.train_step(&toks, ga, 1e-2).unwrap().loss;
            let mut last = first;
            for _ in 0..25 {
                last = e.train_step(&toks, ga, 1e-2).unwrap().loss;
            }
            assert!(last < 0.7 * first, "{name} fused={fused} ga={ga} clip={clip}: loss {first} → {last}");
        }
    }
}

#[test]
fn tied_models_take_llama3_rope_from_their_config() {
    use qgalore::config::model::RopeScaling;
    // a scaled RoPE changes the model's loss; the default one is what the engine always ran
    let m = tied(tiny_model(32, 16, 24, 4, 2, 2));
    let toks = tokens(2, 12, 32, 3);
    let loss = |m: qgalore::config::ModelConfig| engine(engine_cfg(m, 2, 12, 5)).eval(&toks, 1).unwrap();
    let mut s = m.clone();
    s.rope_theta = 500000.0;
    s.rope_scaling = Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8 });
    let (a, b) = (loss(m.clone()), loss(s));
    assert!(a.is_finite() && b.is_finite() && a != b, "{a} vs {b}");
    let table = qgalore::host::rope::rope_table_for(&m, 12);
    assert_eq!(table, qgalore::host::rope::rope_table(12, 4, 10000.0));
}

/// Writes a tied, GQA, llama3-RoPE model (config.json from `hf_config`, every tensor as raw
/// little-endian f32, the token windows and the engine's loss) to $QG_HF_DUMP, for the hand
/// check against `transformers` (`rust/tests/model_hf_check.py`: `LlamaForCausalLM` with these
/// weights gives the same loss, measured within 1e-6);
/// skipped without it.
#[test]
fn dump_for_transformers_check() {
    use qgalore::config::model::RopeScaling;
    let Ok(dir) = std::env::var("QG_HF_DUMP") else { return };
    for (tie, scaled) in [(true, true), (false, false), (true, false), (false, true)] {
        let mut m = tiny_model(96, 64, 112, 4, 2, 2);
        m.tie_word_embeddings = tie;
        m.initializer_range = 0.2;
        m.max_position_embeddings = 64;
        if scaled {
            m.rope_theta = 500000.0;
            m.rope_scaling = Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16 });
        }
        let (b, t) = (2, 24);
        let mut e = engine(engine_cfg(m.clone(), b, t, 17));
        let toks = tokens(b, t, 96, 5);
        let loss = e.eval(&toks, 1).unwrap();
        let out = std::path::Path::new(&dir).join(format!("tie{}_scaled{}", tie as u8, scaled as u8));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&m.hf_config()).unwrap()).unwrap();
        let mut index = Vec::new();
        for p in &e.model.params {
            let bytes: Vec<u8> = p.f().data.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(out.join(format!("{}.bin", p.name)), bytes).unwrap();
            index.push(serde_json::json!({ "name": p.name, "shape": if p.rows == 1 { vec![p.cols] } else { vec![p.rows, p.cols] } }));
        }
        let run = serde_json::json!({ "tensors": index, "tokens": toks, "b": b, "t": t, "loss": loss });
        std::fs::write(out.join("run.json"), run.to_string()).unwrap();
    }
}
