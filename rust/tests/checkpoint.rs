//! Checkpoints resume bit-exactly for every optimizer; bad checkpoints are refused whole.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::EngineConfig;
use qgalore::train::Engine;

fn cfg(name: &str) -> EngineConfig {
    let mut c = engine_cfg(tiny_model(64, 32, 48, 4, 4, 2), 2, 16, 12);
    c.optimizer = optim(name, 0.0);
    c.optimizer.rank = 8;
    c.optimizer.update_gap = 2;
    c.optimizer.lazy = true;
    c.optimizer.queue_size = 2;
    c.optimizer.weight_group_size = 64;
    c.optimizer.proj_group_size = 64;
    if name == "qgalore" {
        c.optimizer.weight_bits = 8;
        c.optimizer.proj_bits = 4;
    }
    c
}

fn engine(c: EngineConfig) -> Engine<Cpu> {
    Engine::new(Cpu::new(2).unwrap(), c).unwrap()
}

#[test]
fn resume_is_bit_exact_for_every_optimizer() {
    for name in ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"] {
        let mut a = engine(cfg(name));
        for s in 0..5 {
            a.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap();
        }
        let ckpt = a.save_state().unwrap();
        let cont: Vec<u64> = (5..10).map(|s| a.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap().loss.to_bits()).collect();
        let mut b = engine(cfg(name));
        b.load_state(&ckpt).unwrap();
        let resumed: Vec<u64> = (5..10).map(|s| b.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap().loss.to_bits()).collect();
        assert_eq!(cont, resumed, "{name}");
        let held_out = tokens(2, 16, 64, 777);
        assert_eq!(a.eval(&held_out, 1).unwrap().to_bits(), b.eval(&held_out, 1).unwrap().to_bits(), "{name}");
        // counters, gaps and memory agree too (wall-clock timing aside)
        let strip = |s: String| {
            let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
            v.as_object_mut().unwrap().remove("refresh_seconds");
            v.as_object_mut().unwrap().remove("timing");
            v
        };
        let info = |e: &Engine<Cpu>| serde_json::to_string(&e.info()).unwrap();
        assert!(strip(info(&a)) == strip(info(&b)), "{name}: {} vs {}", info(&a), info(&b));
    }
}

#[test]
fn mismatched_or_corrupt_checkpoints_change_nothing() {
    let mut a = engine(cfg("galore"));
    a.train_step(&tokens(2, 16, 64, 1), 1, 3e-3).unwrap();
    let good = a.save_state().unwrap();
    let mut other = engine(cfg("adamw"));
    let before = other.save_state().unwrap();
    let e = other.load_state(&good).unwrap_err();
    assert!(e.msg.contains("optimizer galore"), "{}", e.msg);
    assert!(other.save_state().unwrap() == before);
    let mut b = engine(cfg("galore"));
    let before = b.save_state().unwrap();
    assert!(b.load_state(&good[..good.len() / 2]).unwrap_err().msg.contains("corrupt"));
    assert!(b.load_state(b"nonsense").unwrap_err().msg.contains("not a qgalore checkpoint"));
    assert!(b.save_state().unwrap() == before);
    let mut wide = cfg("galore");
    wide.model.hidden_size = 64;
    let mut c = engine(wide);
    assert!(c.load_state(&good).is_err());
}

#[test]
fn tied_models_resume_bit_exactly() {
    for name in ["adamw", "adam8bit", "qgalore"] {
        let tied = || {
            let mut c = cfg(name);
            c.model.tie_word_embeddings = true;
            c
        };
        let mut a = engine(tied());
        for s in 0..3 {
            a.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap();
        }
        let ckpt = a.save_state().unwrap();
        let mut b = engine(tied());
        b.load_state(&ckpt).unwrap();
        assert_eq!(b.save_state().unwrap(), ckpt, "{name}: round trip");
        let cont: Vec<u64> = (3..6).map(|s| a.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap().loss.to_bits()).collect();
        let resumed: Vec<u64> = (3..6).map(|s| b.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap().loss.to_bits()).collect();
        assert_eq!(cont, resumed, "{name}");
        // an untied run refuses a tied checkpoint whole
        let mut u = engine(cfg(name));
        let before = u.save_state().unwrap();
        assert!(u.load_state(&ckpt).is_err(), "{name}");
        assert_eq!(u.save_state().unwrap(), before);
    }
}

#[test]
fn another_trajectory_config_is_refused_naming_the_field() {
    let mut a = engine(cfg("qgalore"));
    a.train_step(&tokens(2, 16, 64, 1), 1, 3e-3).unwrap();
    let good = a.save_state().unwrap();
    let cases: Vec<(Box<dyn Fn(&mut EngineConfig)>, &str)> = vec![
        (Box::new(|c| c.seed = 13), "seed is 12 in the checkpoint and 13 in this engine"),
        (Box::new(|c| c.optimizer.beta2 = 0.99), "optimizer.beta2 is 0.999 in the checkpoint and 0.99 in this engine"),
        (Box::new(|c| c.optimizer.cos_threshold = 0.5), "optimizer.cos_threshold is 0.4 in the checkpoint and 0.5 in this engine"),
        (Box::new(|c| c.optimizer.update_gap = 3), "optimizer.update_gap is 2 in the checkpoint and 3 in this engine"),
        (Box::new(|c| c.model.rope_theta = 5e5), "model.rope_theta is 10000.0 in the checkpoint and 500000.0 in this engine"),
    ];
    for (change, want) in cases {
        let mut c = cfg("qgalore");
        change(&mut c);
        let mut b = engine(c);
        let before = b.save_state().unwrap();
        let e = b.load_state(&good).unwrap_err();
        assert!(e.msg.contains(want), "{}", e.msg);
        assert!(!e.msg.contains('\n'));
        assert!(b.save_state().unwrap() == before, "{want}: engine changed");
    }
    // speed and memory settings are not the trajectory's: threads, checkpointing
    let mut c = cfg("qgalore");
    c.threads = 1;
    c.checkpointing = true;
    engine(c).load_state(&good).unwrap();
}

#[test]
fn a_weights_load_ignores_the_batch_shape_but_not_the_model_or_optimizer() {
    let mut a = engine(cfg("qgalore"));
    a.train_step(&tokens(2, 16, 64, 1), 1, 3e-3).unwrap();
    let good = a.save_state().unwrap();
    let mut c = cfg("qgalore");
    (c.batch_size, c.seq_len, c.seed) = (1, 5, 99);
    let mut b = engine(c.clone());
    assert!(b.load_state(&good).unwrap_err().msg.contains("seed is 12 in the checkpoint and 99 in this engine"));
    b.load_state_weights(&good).unwrap();
    let held_out = tokens(1, 5, 64, 3);
    let mut d = engine(c.clone());
    d.load_state_weights(&good).unwrap();
    assert_eq!(b.eval(&held_out, 1).unwrap().to_bits(), d.eval(&held_out, 1).unwrap().to_bits());
    c.optimizer.rank = 4;
    let mut e = engine(c);
    let msg = e.load_state_weights(&good).unwrap_err().msg;
    assert!(msg.contains("optimizer.rank is 8 in the checkpoint and 4 in this engine"), "{msg}");
}

/// `fused` is not compared: the fused per-layer step is bit-identical to the global one
/// (tests/galore.rs i12) and its default follows grad_accum, so a run resumed with the
/// other setting continues exactly as the original would have.
#[test]
fn a_resume_ignores_fused_and_continues_bit_exactly() {
    let mut fused = cfg("qgalore");
    fused.optimizer.fused = true;
    let mut a = engine(fused);
    for s in 0..3 {
        a.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap();
    }
    let ckpt = a.save_state().unwrap();
    let mut b = engine(cfg("qgalore"));
    b.load_state(&ckpt).unwrap();
    for s in 3..6 {
        let (x, y) = (a.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap(), b.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap());
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {s}");
    }
}

/// A weights load compares only what decides the state's layout and the model's function:
/// the update's hyperparameters, the initializer, grad_accum (and the `fused` default it
/// sets) and the precision may differ; the storage options may not.
#[test]
fn a_weights_load_compares_only_layout_and_function() {
    let mut a = engine(cfg("qgalore"));
    a.train_step(&tokens(2, 16, 64, 1), 1, 3e-3).unwrap();
    let good = a.save_state().unwrap();
    let mut c = cfg("qgalore");
    (c.optimizer.beta1, c.optimizer.beta2, c.optimizer.eps, c.optimizer.clip) = (0.8, 0.95, 1e-6, 1.0);
    (c.optimizer.weight_decay, c.optimizer.galore_scale, c.optimizer.cos_threshold, c.optimizer.gamma) = (0.1, 0.5, 0.3, 3);
    (c.optimizer.fused, c.grad_accum, c.model.initializer_range) = (true, 4, 0.05);
    (c.batch_size, c.seq_len, c.seed) = (1, 8, 5);
    let mut b = engine(c.clone());
    assert!(b.load_state(&good).is_err(), "a resume still compares the hyperparameters");
    b.load_state_weights(&good).unwrap();
    // the same function: its loss on held-out tokens equals that of an engine differing
    // from the saving one in the batch shape only
    let mut same = cfg("qgalore");
    (same.batch_size, same.seq_len) = (1, 8);
    let mut d = engine(same);
    d.load_state_weights(&good).unwrap();
    let held_out = tokens(1, 8, 64, 3);
    assert_eq!(b.eval(&held_out, 1).unwrap().to_bits(), d.eval(&held_out, 1).unwrap().to_bits());
    for (change, field) in [
        (Box::new(|c: &mut EngineConfig| c.optimizer.weight_group_size = 32) as Box<dyn Fn(&mut EngineConfig)>, "optimizer.weight_group_size"),
        (Box::new(|c: &mut EngineConfig| c.optimizer.proj_bits = 8), "optimizer.proj_bits"),
        (Box::new(|c: &mut EngineConfig| c.model.rms_norm_eps = 1e-5), "model.rms_norm_eps"),
    ] {
        let mut d = c.clone();
        change(&mut d);
        let msg = engine(d).load_state_weights(&good).unwrap_err().msg;
        assert!(msg.contains(&format!("{field} is")), "{field}: {msg}");
    }
}
