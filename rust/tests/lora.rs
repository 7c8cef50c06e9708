//! LoRA and QLoRA in the engine: gradients against finite differences, QLoRA against LoRA
//! on the dequantized base, step 0 equal to the base model, target selection, a frozen
//! base, training, merged export, option errors and checkpoints.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::backend::{Category, Memory};
use qgalore::config::{EngineConfig, LoraBase, ModelConfig, OptimConfig};
use qgalore::model::{Targets, Weight};
use qgalore::train::Engine;

fn model() -> ModelConfig {
    // GQA (2 KV heads of 4), an MLP width that is not a multiple of the hidden size
    let mut m = tiny_model(32, 16, 24, 4, 2, 2);
    m.initializer_range = 0.3;
    m
}

fn lora_opt(name: &str, f: impl Fn(&mut OptimConfig)) -> OptimConfig {
    let mut o = optim(name, 0.0);
    o.lora_rank = 4;
    o.lora_alpha = 8.0;
    o.lora_base = LoraBase::F32;
    f(&mut o);
    o
}

fn cfg(m: ModelConfig, o: OptimConfig) -> EngineConfig {
    let mut c = engine_cfg(m, 2, 6, 3);
    c.optimizer = o;
    c
}

fn engine(c: EngineConfig) -> Engine<Cpu> {
    Engine::new(Cpu::new(2).unwrap(), c).unwrap()
}

/// Gives every B random values (B = 0 at init makes dA vanish).
fn randomize_b(e: &mut Engine<Cpu>, seed: u64) {
    for (j, (name, shape, _)) in e.adapter_tensors().unwrap().into_iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = values(shape[0] * shape[1], seed + j as u64).iter().map(|x| 0.3 * x).collect();
            e.set_adapter_tensor(&name, &v).unwrap();
        }
    }
}

/// Parameter `i`'s values (NF4 dequantized).
fn host(e: &Engine<Cpu>, i: usize) -> Vec<f32> {
    let mut s = e.be.alloc_fp32(0, Category::Activations).unwrap();
    e.model.read_host(&e.be, i, &mut s).unwrap().into_owned()
}

fn adapter_indices(e: &Engine<Cpu>) -> Vec<usize> {
    (0..e.model.params.len()).filter(|&i| e.model.params[i].role.adapter()).collect()
}

#[test]
fn lora_gradients_match_finite_differences() {
    let mut e = engine(cfg(model(), lora_opt("lora", |o| o.lora_targets = Targets::ALL)));
    randomize_b(&mut e, 11);
    let toks = tokens(2, 6, 32, 9);
    e.loss_and_grads(&toks, 1).unwrap();
    let idx = adapter_indices(&e);
    assert_eq!(idx.len(), 2 * 7 * 2);
    for i in idx {
        let name = e.model.params[i].name.clone();
        let analytic = e.grads.get(i).data.clone();
        let mut x = e.model.params[i].f().data.clone();
        grad_check(&name, &analytic, &mut x, 1e-2, 40, |xx| {
            e.model.params[i].f_mut().data.copy_from_slice(xx);
            e.eval(&toks, 1).unwrap()
        });
        e.model.params[i].f_mut().data.copy_from_slice(&x);
    }
}

#[test]
fn lora_dropout_gradients_match_finite_differences_of_the_same_masks() {
    let o = lora_opt("lora", |o| {
        o.lora_targets = Targets::parse("q_proj,o_proj,down_proj").unwrap();
        o.lora_dropout = 0.3;
    });
    let mut e = engine(cfg(model(), o));
    randomize_b(&mut e, 5);
    let toks = tokens(2, 6, 32, 4);
    let l0 = e.loss_and_grads(&toks, 1).unwrap();
    // dropout is on in training: the training loss differs from the eval loss
    assert_ne!(l0, e.eval(&toks, 1).unwrap());
    for i in adapter_indices(&e) {
        let name = e.model.params[i].name.clone();
        let analytic = e.grads.get(i).data.clone();
        let mut x = e.model.params[i].f().data.clone();
        // the masks are a function of (seed, step, micro-batch): the same at every call
        grad_check(&name, &analytic, &mut x, 4e-3, 30, |xx| {
            e.model.params[i].f_mut().data.copy_from_slice(xx);
            e.loss_and_grads(&toks, 1).unwrap()
        });
        e.model.params[i].f_mut().data.copy_from_slice(&x);
    }
}

/// A LoRA f32 engine whose base is `q`'s dequantized NF4 base and whose adapters are `q`'s.
fn lora_twin(q: &Engine<Cpu>) -> Engine<Cpu> {
    let mut c = q.cfg.clone();
    c.optimizer.name = qgalore::config::Optimizer::Lora;
    c.optimizer.lora_base = LoraBase::F32;
    let mut f = engine(c);
    for i in 0..q.model.params.len() {
        let h = host(q, i);
        f.model.params[i].f_mut().data.copy_from_slice(&h);
    }
    f
}

#[test]
fn qlora_equals_lora_on_the_dequantized_base_and_matches_finite_differences() {
    let o = lora_opt("qlora", |o| o.lora_targets = Targets::ALL);
    let mut q = engine(cfg(model(), o));
    // the linears are NF4 codes, the rest f32 (bf16 storage is f32 on the CPU)
    let lin = q.model.layers[0].q;
    assert!(matches!(q.model.params[lin].data, Weight::N(..)));
    randomize_b(&mut q, 21);
    let mut f = lora_twin(&q);
    let toks = tokens(2, 6, 32, 7);
    let lq = q.loss_and_grads(&toks, 1).unwrap();
    let lf = f.loss_and_grads(&toks, 1).unwrap();
    assert_eq!(lq, lf, "same numbers: the GEMMs take the dequantized base");
    for i in adapter_indices(&q) {
        assert_eq!(q.grads.get(i).data, f.grads.get(i).data, "{}", q.model.params[i].name);
    }
    for i in adapter_indices(&q).into_iter().step_by(3) {
        let name = q.model.params[i].name.clone();
        let analytic = q.grads.get(i).data.clone();
        let mut x = q.model.params[i].f().data.clone();
        grad_check(&name, &analytic, &mut x, 1e-2, 30, |xx| {
            q.model.params[i].f_mut().data.copy_from_slice(xx);
            q.eval(&toks, 1).unwrap()
        });
        q.model.params[i].f_mut().data.copy_from_slice(&x);
    }
    // NF4 is lossy: the dequantized base differs from the f32 initialisation it came from
    let a = engine(cfg(model(), optim("adamw", 0.0)));
    assert_ne!(a.model.params[lin].f().data, f.model.params[lin].f().data);
}

fn logits(e: &mut Engine<Cpu>, toks: &[i32]) -> Vec<f32> {
    let (b, t, v) = (e.cfg.batch_size, e.cfg.seq_len, e.cfg.model.vocab_size);
    let mut out = vec![0.0; b * t * v];
    e.logits(toks, b, t, &mut out).unwrap();
    out
}

#[test]
fn step_zero_is_the_base_model_and_adapters_follow_peft_init() {
    let toks: Vec<i32> = tokens(2, 5, 32, 3).into_iter().take(12).collect();
    let mut base = engine(cfg(model(), optim("adamw", 0.0)));
    let mut l = engine(cfg(model(), lora_opt("lora", |o| o.lora_targets = Targets::ALL)));
    assert_eq!(logits(&mut base, &toks), logits(&mut l, &toks));
    for (name, shape, v) in l.adapter_tensors().unwrap() {
        if name.ends_with("lora_B.weight") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}: B starts at zero");
        } else {
            // kaiming_uniform(a=√5): U(−1/√in, 1/√in), spread over the range
            let bound = 1.0 / (shape[1] as f32).sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
            let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(max > 0.8 * bound, "{name}: max {max} of bound {bound}");
        }
    }
    assert_eq!(l.info().params, 2 * (4 * (16 + 16) + 4 * (16 + 8) + 4 * (16 + 8) + 4 * (16 + 16) + 2 * 4 * (16 + 24) + 4 * (24 + 16)));
}

#[test]
fn targets_select_the_right_modules() {
    let names = |t: &str| -> Vec<String> {
        let e = engine(cfg(model(), lora_opt("lora", |o| o.lora_targets = Targets::parse(t).unwrap())));
        e.adapter_tensors().unwrap().into_iter().map(|x| x.0).collect()
    };
    let d = names("q_proj,v_proj");
    assert_eq!(
        d,
        [
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.layers.0.self_attn.q_proj.lora_B.weight",
            "model.layers.0.self_attn.v_proj.lora_A.weight",
            "model.layers.0.self_attn.v_proj.lora_B.weight",
            "model.layers.1.self_attn.q_proj.lora_A.weight",
            "model.layers.1.self_attn.q_proj.lora_B.weight",
            "model.layers.1.self_attn.v_proj.lora_A.weight",
            "model.layers.1.self_attn.v_proj.lora_B.weight",
        ]
    );
    assert_eq!(OptimConfig::defaults(qgalore::config::Optimizer::Lora, 1).lora_targets, Targets::DEFAULT);
    let all = names("all-linear");
    assert_eq!(all.len(), 28);
    assert!(all.contains(&"model.layers.1.mlp.down_proj.lora_B.weight".to_string()));
    assert_eq!(names("up_proj , gate_proj").len(), 8);
    assert_eq!(Targets::parse("gate_proj,up_proj").unwrap().text(), "gate_proj,up_proj");
    assert_eq!(Targets::ALL.text(), "all-linear");
}

#[test]
fn base_stays_frozen_and_the_loss_falls() {
    for name in ["lora", "qlora"] {
        let mut e = engine(cfg(model(), lora_opt(name, |o| o.lora_targets = Targets::ALL)));
        let base: Vec<Vec<f32>> = (0..e.model.params.len()).filter(|&i| !e.model.params[i].role.adapter()).map(|i| host(&e, i)).collect();
        let toks = tokens(2, 6, 32, 1);
        let first = e.train_step(&toks, 1, 1e-2).unwrap().loss;
        let mut last = first;
        for _ in 0..30 {
            last = e.train_step(&toks, 1, 1e-2).unwrap().loss;
        }
        assert!(last < 0.7 * first, "{name}: loss {first} → {last}");
        let after: Vec<Vec<f32>> = (0..e.model.params.len()).filter(|&i| !e.model.params[i].role.adapter()).map(|i| host(&e, i)).collect();
        assert!(base == after, "{name}: the base changed");
        let info = e.info();
        assert_eq!(info.optimizer, name);
        // QLoRA's dequantization is timed inside forward and backward; LoRA has none
        let t = info.timing;
        if name == "qlora" {
            assert!(t.dequant_s > 0.0 && t.dequant_s < t.forward_s + t.backward_s, "{t:?}");
        } else {
            assert_eq!(t.dequant_s, 0.0);
        }
    }
}

#[test]
fn merged_export_gives_the_adapted_logits() {
    for name in ["lora", "qlora"] {
        let mut e = engine(cfg(model(), lora_opt(name, |o| o.lora_targets = Targets::ALL)));
        randomize_b(&mut e, 8);
        let toks: Vec<i32> = tokens(2, 6, 32, 3).into_iter().take(12).collect();
        let want = logits(&mut e, &toks);
        let dir = std::env::temp_dir().join(format!("qg-lora-merge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        e.export_hf(&dir, qgalore::hf::Dtype::F32, &serde_json::Map::new()).unwrap();
        let st = std::fs::read(dir.join("model.safetensors")).unwrap();
        assert!(!String::from_utf8_lossy(&st[..2000.min(st.len())]).contains("lora_"), "{name}: a merged export has no adapters");
        let mut plain = Engine::build(Cpu::new(2).unwrap(), cfg(model(), optim("adamw", 0.0)), Some(&dir)).unwrap();
        let got = logits(&mut plain, &toks);
        let _ = std::fs::remove_dir_all(&dir);
        // generation runs the adapted model too: greedy ids equal the merged model's
        let req = qgalore::infer::Request::from_json(r#"{"prompt":[1,2,3,4,5],"max_new_tokens":12}"#).unwrap();
        assert_eq!(e.generate(&req).unwrap().ids, plain.generate(&req).unwrap().ids, "{name}: generate");
        let err = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-4, "{name}: merged logits differ by {err}");
        // the merge is not the base: the adapters changed the logits
        let mut base = engine(cfg(model(), optim("adamw", 0.0)));
        let b = logits(&mut base, &toks);
        assert!(want.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3), "{name}");
    }
}

#[test]
fn bad_adapter_options_are_one_line_errors() {
    let e = serde_json::from_str::<OptimConfig>(r#"{"name":"lora","lora_targets":"q_proj,lm_head"}"#).unwrap_err().to_string();
    assert_eq!(e, "lora_targets = q_proj,lm_head: must be a comma list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all-linear");
    let e = serde_json::from_str::<OptimConfig>(r#"{"name":"qlora","lora_dropout":1}"#).unwrap_err().to_string();
    assert_eq!(e, "lora_dropout = 1: must be a number in [0, 1)");
    let e = serde_json::from_str::<OptimConfig>(r#"{"name":"lora","lora_base":"int8"}"#).unwrap_err().to_string();
    assert_eq!(e, "lora_base = int8: must be one of bf16, f32");
    // rank beyond a matrix: k_proj is 8 × 16 (2 KV heads of width 4)
    let c = cfg(model(), lora_opt("lora", |o| {
        o.lora_rank = 9;
        o.lora_targets = Targets::parse("q_proj,k_proj").unwrap();
    }));
    let msg = Engine::new(Cpu::new(2).unwrap(), c).err().unwrap().msg;
    assert_eq!(msg, "lora_rank = 9: exceeds the 8×16 k_proj matrix (out × in); use a rank ≤ 8 (the model)");
    assert!(!msg.contains('\n'));
    // lora_base is lora's: qlora reports it as not applicable
    let (_, off) = OptimConfig::resolve(&serde_json::from_str(r#"{"name":"qlora","lora_base":"f32"}"#).unwrap(), 1).unwrap();
    assert_eq!(off.iter().map(|n| n.field).collect::<Vec<_>>(), ["lora_base"]);
}

#[test]
fn a_lora_checkpoint_restores_the_run_exactly_and_checks_the_base() {
    for name in ["lora", "qlora"] {
        let o = lora_opt(name, |o| {
            o.lora_targets = Targets::ALL;
            o.lora_dropout = 0.1;
        });
        let mut a = engine(cfg(model(), o.clone()));
        let toks = tokens(2, 6, 32, 2);
        for _ in 0..2 {
            a.train_step(&toks, 1, 1e-2).unwrap();
        }
        let saved = a.save_state().unwrap();
        let mut want = Vec::new();
        for _ in 0..2 {
            want.push(a.train_step(&toks, 1, 1e-2).unwrap().loss);
        }
        let mut b = engine(cfg(model(), o.clone()));
        b.load_state(&saved).unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(b.train_step(&toks, 1, 1e-2).unwrap().loss);
        }
        assert_eq!(want, got, "{name}");
        assert_eq!(a.adapter_tensors().unwrap(), b.adapter_tensors().unwrap(), "{name}");
        assert_eq!(a.base_fingerprint().unwrap(), b.base_fingerprint().unwrap());
        // another base (another seed's initialisation): refused, nothing changed
        let mut c = cfg(model(), o);
        c.seed = 4;
        let mut other = engine(c);
        let before = other.adapter_tensors().unwrap();
        let msg = other.load_state_weights(&saved).err().unwrap().msg;
        assert!(msg.starts_with("checkpoint's adapters were trained on another base model (fingerprint "), "{name}: {msg}");
        assert_eq!(before, other.adapter_tensors().unwrap());
    }
}

#[test]
fn checkpointing_gives_identical_adapter_gradients() {
    for name in ["lora", "qlora"] {
        let o = lora_opt(name, |o| {
            o.lora_targets = Targets::ALL;
            o.lora_dropout = 0.2;
        });
        let mut a = engine(cfg(model(), o.clone()));
        let mut c = cfg(model(), o);
        c.checkpointing = true;
        let mut b = engine(c);
        randomize_b(&mut a, 3);
        randomize_b(&mut b, 3);
        let toks = tokens(2, 6, 32, 5);
        assert_eq!(a.loss_and_grads(&toks, 1).unwrap(), b.loss_and_grads(&toks, 1).unwrap());
        for i in adapter_indices(&a) {
            assert_eq!(a.grads.get(i).data, b.grads.get(i).data, "{name}: {}", a.model.params[i].name);
        }
    }
}

#[test]
fn a_hugging_face_base_loads_into_the_frozen_storage() {
    let dir = std::env::temp_dir().join(format!("qg-lora-base-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut base = engine(cfg(model(), optim("adamw", 0.0)));
    base.train_step(&tokens(2, 6, 32, 1), 1, 1e-2).unwrap(); // not the seed's initialisation
    base.export_hf(&dir, qgalore::hf::Dtype::F32, &serde_json::Map::new()).unwrap();
    let toks: Vec<i32> = tokens(2, 6, 32, 3).into_iter().take(12).collect();
    let want = logits(&mut base, &toks);
    let load = |name: &str, seed: u64| {
        let mut c = cfg(model(), lora_opt(name, |o| o.lora_targets = Targets::ALL));
        c.seed = seed;
        Engine::build(Cpu::new(2).unwrap(), c, Some(&dir)).unwrap()
    };
    // lora: the base as it was, and step 0 is the base model
    let mut l = load("lora", 3);
    assert_eq!(logits(&mut l, &toks), want);
    // qlora: every linear is the NF4 quantization of the file's weight
    let q = load("qlora", 3);
    for ly in &q.model.layers {
        for idx in ly.linears() {
            let w = base.model.params[idx].f().data.clone();
            let mut d = vec![0.0; w.len()];
            qgalore::quant::nf4::Nf4Tensor::quantize(&w).unwrap().dequantize(&mut d);
            assert_eq!(host(&q, idx), d, "{}", q.model.params[idx].name);
        }
    }
    assert!(q.memory()[0] < l.memory()[0] / 2, "NF4 base is far smaller");
    // the fingerprint depends on the base, not on the adapters' seed
    assert_eq!(load("qlora", 9).base_fingerprint().unwrap(), q.base_fingerprint().unwrap());
    assert_ne!(l.base_fingerprint().unwrap(), q.base_fingerprint().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rslora_scales_by_the_square_root_of_the_rank() {
    let mut o = lora_opt("lora", |o| o.lora_rank = 16);
    let spec = |o: &OptimConfig| qgalore::model::AdapterSpec::from_optim(o).unwrap();
    assert_eq!(spec(&o).scale(), 0.5);
    o.lora_rslora = true;
    assert_eq!(spec(&o).scale(), 2.0);
    assert!(qgalore::model::AdapterSpec::from_optim(&optim("adamw", 0.0)).is_none());
}

#[test]
fn fused_steps_equal_global_steps() {
    for (name, clip) in [("lora", 0.0), ("qlora", 0.0), ("lora", 0.01)] {
        let o = lora_opt(name, |o| {
            o.lora_targets = Targets::ALL;
            o.lora_dropout = 0.1;
            o.clip = clip;
        });
        let mut f = o.clone();
        f.fused = true;
        let mut a = engine(cfg(model(), o));
        let mut b = engine(cfg(model(), f));
        assert!(b.fused && !a.fused);
        let toks = tokens(2, 6, 32, 6);
        for _ in 0..4 {
            let (x, y) = (a.train_step(&toks, 1, 1e-2).unwrap(), b.train_step(&toks, 1, 1e-2).unwrap());
            assert_eq!(x.loss, y.loss, "{name}");
            assert!(y.grad_norm > 0.0);
            assert_eq!(x.clipped, y.clipped);
        }
        assert_eq!(a.adapter_tensors().unwrap(), b.adapter_tensors().unwrap(), "{name}");
    }
}

#[test]
fn short_masked_windows_train_the_adapters_exactly() {
    // t = 4 < seq_len 6, completion-only mask: the adapters' gradients against finite
    // differences of the masked mean over the same short windows
    let o = lora_opt("qlora", |o| o.lora_targets = Targets::parse("v_proj,up_proj").unwrap());
    let mut e = engine(cfg(model(), o));
    randomize_b(&mut e, 2);
    let toks = tokens(2, 4, 32, 12);
    let mask: Vec<u8> = (0..toks.len()).map(|i| (i % 5 >= 2) as u8).collect();
    let (_, n) = e.loss_and_grads_masked(&toks, Some(&mask), 1).unwrap();
    assert_eq!(n, 2 * 3);
    for i in adapter_indices(&e) {
        let name = e.model.params[i].name.clone();
        let analytic = e.grads.get(i).data.clone();
        let mut x = e.model.params[i].f().data.clone();
        grad_check(&name, &analytic, &mut x, 1e-2, 30, |xx| {
            e.model.params[i].f_mut().data.copy_from_slice(xx);
            let r = e.eval_masked(&toks, Some(&mask), 1).unwrap();
            r.sum / r.count as f64
        });
        e.model.params[i].f_mut().data.copy_from_slice(&x);
    }
}
