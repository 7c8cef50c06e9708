//! freeze_embeddings: the token embedding and the lm_head (one table when tied) are frozen
//! for every optimizer: no gradient buffer, no optimizer state, bit-unchanged by steps; the
//! other parameters train as before, their gradients are the unfrozen engine's, and a
//! checkpoint of such a run resumes it exactly.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::backend::{Category, Memory};
use qgalore::config::{EngineConfig, ModelConfig};
use qgalore::model::llama::Role;
use qgalore::plan::Plan;
use qgalore::train::Engine;

const OPTS: [&str; 5] = ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"];

fn model(tied: bool) -> ModelConfig {
    let mut m = tiny_model(64, 32, 96, 4, 2, 2);
    m.tie_word_embeddings = tied;
    m
}

fn cfg(m: ModelConfig, name: &str, fused: bool, freeze: bool) -> EngineConfig {
    let mut c = engine_cfg(m, 2, 8, 3);
    c.optimizer = optim(name, 0.0);
    c.optimizer.rank = 8;
    c.optimizer.fused = fused;
    c.optimizer.freeze_embeddings = freeze;
    if name == "qgalore" {
        // the front end's qgalore: INT8 weights, INT4 projectors
        c.optimizer.weight_bits = 8;
        c.optimizer.proj_bits = 4;
        c.optimizer.proj_group_size = 32;
        c.optimizer.weight_group_size = 32;
    }
    c
}

fn engine(c: EngineConfig) -> Engine<Cpu> {
    Engine::new(Cpu::new(2).unwrap(), c).unwrap()
}

/// Parameter `i`'s values (INT8 dequantized).
fn host(e: &Engine<Cpu>, i: usize) -> Vec<f32> {
    let mut s = e.be.alloc_fp32(0, Category::Activations).unwrap();
    if matches!(e.model.params[i].data, qgalore::model::Weight::Q(_)) {
        s = e.be.alloc_fp32(e.model.params[i].numel(), Category::Activations).unwrap();
    }
    e.model.read_host(&e.be, i, &mut s).unwrap().into_owned()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn is_table(e: &Engine<Cpu>, i: usize) -> bool {
    matches!(e.model.params[i].role, Role::Embed | Role::Head)
}

#[test]
fn frozen_tables_stay_bit_identical_while_the_rest_trains() {
    for tied in [false, true] {
        for name in OPTS {
            for fused in [false, true] {
                let label = format!("{name} fused {fused} tied {tied}");
                let c = cfg(model(tied), name, fused, true);
                let plan = Plan::new(&c, false, "m");
                let mut e = engine(c);
                let n = e.model.params.len();
                let tables: Vec<usize> = (0..n).filter(|&i| is_table(&e, i)).collect();
                assert_eq!(tables.len(), if tied { 1 } else { 2 }, "{label}");
                assert!(tables.iter().all(|&i| !e.model.trainable(i)), "{label}");
                let before: Vec<Vec<f32>> = (0..n).map(|i| host(&e, i)).collect();
                assert_eq!(e.memory(), plan.initial.to_array(), "{label}: plan before");
                let toks = tokens(2, 8, 64, 7);
                let mut losses = Vec::new();
                for _ in 0..8 {
                    losses.push(e.train_step(&toks, 1, 1e-2).unwrap().loss);
                }
                assert_eq!(e.memory(), plan.stepped.to_array(), "{label}: plan after");
                assert!(losses[7] < losses[0] - 0.05, "{label}: loss {losses:?}");
                for (i, was) in before.iter().enumerate() {
                    let after = host(&e, i);
                    let p = &e.model.params[i].name;
                    if is_table(&e, i) {
                        assert_eq!(bits(&after), bits(was), "{label}: {p} changed");
                    } else {
                        assert_ne!(bits(&after), bits(was), "{label}: {p} did not train");
                    }
                }
                // the count of trained parameters leaves the tables out
                let all: usize = e.model.params.iter().map(|p| p.numel()).sum();
                assert_eq!(e.info().params, all - tables.len() * 64 * 32, "{label}");
            }
        }
    }
}

/// The remaining parameters' gradients are bit-equal to an unfrozen engine's on the same
/// batch (freezing only skips the tables' own weight gradients), and match finite
/// differences of the loss; the norm covers the trained parameters only.
#[test]
fn remaining_gradients_equal_the_unfrozen_engines() {
    for tied in [false, true] {
        // a larger init so every parameter has a clearly non-zero gradient (as tests/model.rs)
        let mut m = model(tied);
        m.initializer_range = 0.3;
        let mut a = engine(cfg(m.clone(), "adamw", false, true));
        let mut b = engine(cfg(m, "adamw", false, false));
        let toks = tokens(2, 8, 64, 11);
        let (la, lb) = (a.loss_and_grads(&toks, 1).unwrap(), b.loss_and_grads(&toks, 1).unwrap());
        assert_eq!(la.to_bits(), lb.to_bits());
        let mut sq = 0.0f64;
        for i in 0..a.model.params.len() {
            if is_table(&a, i) {
                continue;
            }
            assert_eq!(bits(&a.grads.get(i).data), bits(&b.grads.get(i).data), "tied {tied}: {}", a.model.params[i].name);
            sq += a.grads.get(i).data.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        }
        let (na, nb) = (a.grad_norm(), b.grad_norm());
        assert!((na - sq.sqrt()).abs() <= 1e-6 * na, "tied {tied}: norm {na} vs {}", sq.sqrt());
        assert!(nb > na, "the unfrozen norm includes the tables");
        // finite differences of the frozen engine's loss, for a norm, a linear and the final norm
        let l0 = &a.model.layers[0];
        for i in [l0.attn_norm, l0.q, l0.down, a.model.final_norm] {
            let name = a.model.params[i].name.clone();
            let analytic = a.grads.get(i).data.clone();
            let mut x = a.model.params[i].f().data.clone();
            grad_check(&name, &analytic, &mut x, 1e-2, 40, |xx| {
                a.model.params[i].f_mut().data.copy_from_slice(xx);
                a.eval(&toks, 1).unwrap()
            });
            a.model.params[i].f_mut().data.copy_from_slice(&x);
        }
    }
}

#[test]
fn a_frozen_run_resumes_exactly_from_its_checkpoint() {
    for name in OPTS {
        let fused = name != "adamw";
        let c = cfg(model(false), name, fused, true);
        let mut a = engine(c.clone());
        for s in 0..3 {
            a.train_step(&tokens(2, 8, 64, s), 1, 1e-2).unwrap();
        }
        let ckpt = a.save_state().unwrap();
        let cont: Vec<u64> = (3..6).map(|s| a.train_step(&tokens(2, 8, 64, s), 1, 1e-2).unwrap().loss.to_bits()).collect();
        let mut b = engine(c.clone());
        b.load_state(&ckpt).unwrap();
        let resumed: Vec<u64> = (3..6).map(|s| b.train_step(&tokens(2, 8, 64, s), 1, 1e-2).unwrap().loss.to_bits()).collect();
        assert_eq!(cont, resumed, "{name}");
        for i in 0..a.model.params.len() {
            assert_eq!(bits(&host(&a, i)), bits(&host(&b, i)), "{name}: {}", a.model.params[i].name);
        }
        assert_eq!(a.memory(), b.memory(), "{name}");
        // the checkpoint holds no state for the tables
        let text = String::from_utf8_lossy(&ckpt);
        assert!(!text.contains("optim.model.embed_tokens.weight") && !text.contains("optim.lm_head.weight"), "{name}");
        assert!(text.contains("optim.model.norm.weight"), "{name}");
        // into an unfrozen engine: a one-line refusal, not a panic
        let mut other = engine(cfg(model(false), name, fused, false));
        let msg = other.load_state(&ckpt).unwrap_err().msg;
        assert!(!msg.contains('\n') && msg.contains("optimizer.freeze_embeddings is true in the checkpoint and false in this engine"), "{name}: {msg}");
    }
}

