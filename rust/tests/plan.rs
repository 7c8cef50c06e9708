//! The byte plan against the bytes the engine tracks: equal, category by category, before
//! and after the first update, for every optimizer and switch that changes memory.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::{EngineConfig, ModelConfig};
use qgalore::plan::Plan;
use qgalore::train::Engine;

/// llama-9m with the byte vocabulary: 128 wide, MLP 352, 4 heads, 4 blocks.
fn llama9m() -> ModelConfig {
    tiny_model(256, 128, 352, 4, 4, 4)
}

/// Builds the engine, checks the plan before and after two updates.
fn compare(cfg: EngineConfig) {
    let label = format!(
        "{:?} fused {} ga {} ckpt {} rank {} bits w{}/p{} groups {}/{} block {}",
        cfg.optimizer.name,
        cfg.optimizer.fused,
        cfg.grad_accum,
        cfg.checkpointing,
        cfg.optimizer.rank,
        cfg.optimizer.weight_bits,
        cfg.optimizer.proj_bits,
        cfg.optimizer.weight_group_size,
        cfg.optimizer.proj_group_size,
        cfg.optimizer.block_size
    );
    let plan = Plan::new(&cfg, false, "the model");
    assert!(plan.fit.problem.is_none(), "{label}: {:?}", plan.fit.problem);
    let (ga, b, t, v) = (cfg.grad_accum, cfg.batch_size, cfg.seq_len, cfg.model.vocab_size);
    let mut e = Engine::new(Cpu::new(2).unwrap(), cfg).unwrap();
    assert_eq!(plan.params as usize, e.model.trainable_numel(), "{label}: params");
    assert_eq!(plan.fused, e.fused, "{label}: fused");
    assert_eq!(e.memory(), plan.initial.to_array(), "{label}: before the first update");
    for s in 0..2 {
        e.train_step(&tokens(ga * b, t, v, 40 + s), ga, 1e-3).unwrap();
    }
    assert_eq!(e.memory(), plan.stepped.to_array(), "{label}: after two updates");
}

fn cfg(model: ModelConfig, name: &str, f: impl Fn(&mut EngineConfig)) -> EngineConfig {
    let mut c = engine_cfg(model, 2, 16, 1);
    c.optimizer = optim(name, 0.0);
    if name == "qgalore" {
        // the front end's qgalore defaults: INT8 weights, INT4 projectors
        c.optimizer.weight_bits = 8;
        c.optimizer.proj_bits = 4;
    }
    f(&mut c);
    c
}

const OPTS: [&str; 5] = ["adamw", "adam8bit", "galore", "galore8bit", "qgalore"];

#[test]
fn plan_equals_tracked_bytes_for_every_optimizer_fused_and_accumulated() {
    // grouped-query attention (2 KV heads of 4) and an MLP width that is not a power of two
    let gqa = tiny_model(256, 128, 384, 4, 2, 4);
    for model in [llama9m(), gqa] {
        for name in OPTS {
            for (fused, ga) in [(true, 1), (false, 1), (true, 2)] {
                compare(cfg(model.clone(), name, |c| {
                    c.optimizer.rank = 48;
                    c.optimizer.fused = fused;
                    c.grad_accum = ga;
                }));
            }
        }
    }
}

#[test]
fn plan_equals_tracked_bytes_for_storage_switches_and_checkpointing() {
    let m = llama9m;
    let cases: Vec<EngineConfig> = vec![
        cfg(m(), "galore", |c| {
            c.optimizer.rank = 32;
            c.optimizer.proj_bits = 32;
        }),
        cfg(m(), "galore", |c| {
            c.optimizer.rank = 32;
            c.optimizer.proj_bits = 8;
            c.optimizer.proj_group_size = 64;
        }),
        cfg(m(), "galore8bit", |c| {
            c.optimizer.rank = 32;
            c.optimizer.proj_bits = 4;
            c.optimizer.block_size = 256;
        }),
        cfg(m(), "qgalore", |c| {
            c.optimizer.rank = 16;
            c.optimizer.weight_bits = 16;
            c.optimizer.proj_bits = 16;
        }),
        cfg(m(), "qgalore", |c| {
            c.optimizer.rank = 64;
            c.optimizer.weight_group_size = 128;
            c.optimizer.proj_group_size = 512;
        }),
        cfg(m(), "qgalore", |c| c.optimizer.rank = 500), // clamped to 128 everywhere
        cfg(m(), "qgalore", |c| {
            c.optimizer.rank = 32;
            c.optimizer.fused = true;
            c.checkpointing = true;
        }),
        cfg(m(), "adamw", |c| {
            c.checkpointing = true;
            c.grad_accum = 2;
        }),
        cfg(m(), "adam8bit", |c| {
            c.optimizer.block_size = 256;
            c.batch_size = 3;
            c.seq_len = 24;
        }),
    ];
    for c in cases {
        compare(c);
    }
}

#[test]
fn plan_equals_tracked_bytes_with_row_chunked_tables() {
    // a 4096-token vocabulary dwarfs the linears of a 1-block model: the fused step takes
    // the table gradients in row chunks
    let big = tiny_model(4096, 128, 352, 4, 4, 1);
    for name in ["adam8bit", "galore8bit", "qgalore"] {
        let c = cfg(big.clone(), name, |c| {
            c.optimizer.rank = 32;
            c.optimizer.fused = true;
            c.batch_size = 1;
        });
        let plan = Plan::new(&c, false, "the model");
        let rows = plan.table_chunk_rows.expect("chunked tables");
        assert!(rows < 4096 && plan.shared_grad < 4096 * 128, "{name}: {rows} rows");
        compare(c);
    }
}

#[test]
fn plan_of_a_7b_model_takes_milliseconds() {
    let mut m = tiny_model(32000, 4096, 11008, 32, 32, 32);
    m.max_position_embeddings = 2048;
    let c = cfg(m, "qgalore", |c| {
        c.optimizer.rank = 1024;
        c.optimizer.fused = true;
        c.batch_size = 1;
        c.seq_len = 2048;
        c.optimizer.proj_group_size = 256;
    });
    let t0 = std::time::Instant::now();
    let plan = Plan::new(&c, true, "llama-7b");
    let took = t0.elapsed();
    assert!(took.as_millis() < 100, "planning took {took:?}");
    assert_eq!(plan.params, 6_738_415_616);
    assert!(plan.fit.problem.is_none() && plan.fit.notices.is_empty());
    // INT8 linears take 1 B per element plus 8 B per group of 256; the bf16 tables 2 B
    let linear: u64 = plan.tensors.iter().filter(|t| t.projector.is_some()).map(|t| (t.rows * t.cols) as u64).sum();
    let tables = 2 * 32000 * 4096u64;
    let norms = (2 * 32 + 1) * 4096u64;
    assert_eq!(plan.stepped.weights, linear + linear / 256 * 8 + 2 * tables + 4 * norms);
    let per_param = plan.stepped.weights as f64 / plan.params as f64;
    assert!((1.0..1.1).contains(&per_param), "{per_param} B per parameter");
    // the fused step's shared gradient holds the largest linear (11008×4096), not a table
    assert_eq!(plan.shared_grad, 11008 * 4096);
}

#[test]
fn fit_names_config_fields() {
    let m = llama9m;
    let p = Plan::new(&cfg(m(), "qgalore", |c| c.optimizer.weight_group_size = 6), false, "llama-9m");
    assert_eq!(
        p.fit.problem.unwrap().message(),
        "weight_group_size = 6: does not divide the 128×128 q matrix of llama-9m (16384 elements); use an even divisor of 4096"
    );
    let p = Plan::new(&cfg(m(), "qgalore", |c| c.optimizer.rank = 3), false, "llama-9m");
    assert_eq!(
        p.fit.problem.unwrap().message(),
        "proj_group_size = 256: does not divide the 3×128 projector of the q matrix of llama-9m (384 elements at rank 3); use an even divisor of 384"
    );
    let p = Plan::new(&cfg(m(), "galore", |c| c.optimizer.rank = 200), false, "llama-9m");
    assert!(p.fit.problem.is_none());
    assert_eq!(
        p.fit.notices[0].message(),
        "rank = 200: exceeds the size of some llama-9m matrices; clamped per matrix to min(rank, rows, cols): 128 for q, k, v, o, gate, up, down"
    );
    // the engine refuses the same config with the same words
    let c = cfg(m(), "qgalore", |c| c.optimizer.rank = 3);
    let err = Engine::new(Cpu::new(1).unwrap(), c).err().unwrap();
    assert!(err.msg.starts_with("proj_group_size = 256: does not divide the 3×128 projector of the q matrix of the model"), "{}", err.msg);
}

#[test]
fn plan_equals_tracked_bytes_for_tied_tables() {
    let mut tied = llama9m();
    tied.tie_word_embeddings = true;
    let untied = Plan::new(&cfg(llama9m(), "adamw", |_| {}), false, "the model");
    let plan = Plan::new(&cfg(tied.clone(), "adamw", |_| {}), false, "the model");
    assert_eq!(untied.params - plan.params, 256 * 128, "the table is counted once");
    assert!(plan.tensors.iter().all(|t| t.name != "lm_head.weight"));
    for name in OPTS {
        for (fused, ga, ckpt) in [(true, 1, false), (false, 1, false), (true, 2, false), (true, 1, true)] {
            compare(cfg(tied.clone(), name, |c| {
                c.optimizer.rank = 48;
                c.optimizer.fused = fused;
                c.grad_accum = ga;
                c.checkpointing = ckpt;
            }));
        }
    }
    // a large tied table, taken in row chunks by the fused step
    let mut big = tiny_model(4096, 128, 352, 4, 4, 1);
    big.tie_word_embeddings = true;
    for name in ["adam8bit", "galore8bit", "qgalore"] {
        let c = cfg(big.clone(), name, |c| {
            c.optimizer.rank = 32;
            c.optimizer.fused = true;
            c.batch_size = 1;
        });
        assert!(Plan::new(&c, false, "the model").table_chunk_rows.is_some(), "{name}");
        compare(c);
    }
}

/// The refusal names the estimate, the place that lacks the memory (host or GPU) and the
/// options that shrink the plan; qgalore with checkpointing on suggests neither again.
#[test]
fn memory_refusal_names_the_place_and_the_remedies() {
    let cfg = engine_cfg(llama9m(), 8, 256, 1);
    let need = Plan::new(&cfg, false, "the model").stepped.total;
    let gpu = qgalore::train::memory_refusal(&cfg, need, 16_000_000_000, "the GPU has");
    assert!(gpu.contains("with optimizer adamw needs"), "{gpu}");
    assert!(gpu.contains("; the GPU has 16.0 GB available; try optimizer qgalore, checkpointing true, a smaller batch_size or seq_len"), "{gpu}");
    let mut q = engine_cfg(llama9m(), 8, 256, 1);
    (q.optimizer, q.checkpointing) = (optim("qgalore", 0.0), true);
    let host = qgalore::train::memory_refusal(&q, need, 1_000_000_000, "this machine has");
    assert!(host.ends_with("this machine has 1.0 GB available; try a smaller batch_size or seq_len"), "{host}");
}

#[test]
fn plan_equals_tracked_bytes_for_lora_and_qlora() {
    use qgalore::config::LoraBase;
    use qgalore::model::Targets;
    let gqa = tiny_model(256, 128, 384, 4, 2, 4);
    for model in [llama9m(), gqa] {
        for name in ["lora", "qlora"] {
            for (targets, base, dropout, ckpt, ga) in [
                (Targets::DEFAULT, LoraBase::Bf16, 0.0, false, 1),
                (Targets::ALL, LoraBase::F32, 0.1, false, 2),
                (Targets::ALL, LoraBase::Bf16, 0.0, true, 1),
                (Targets::parse("k_proj,down_proj").unwrap(), LoraBase::F32, 0.05, true, 2),
            ] {
                let c = cfg(model.clone(), name, |c| {
                    c.optimizer.lora_rank = 16;
                    c.optimizer.lora_targets = targets;
                    c.optimizer.lora_base = base;
                    c.optimizer.lora_dropout = dropout;
                    c.checkpointing = ckpt;
                    c.grad_accum = ga;
                    // fused steps route the adapters' gradients through one shared buffer
                    c.optimizer.fused = ckpt && ga == 1;
                });
                let plan = Plan::new(&c, false, "the model");
                assert!(plan.initial.adapters > 0 && plan.initial.projector == 0);
                assert_eq!(plan.initial, plan.stepped);
                compare(c);
            }
        }
    }
    // bf16 precision halves a bf16 base, never the adapters; qlora's linears are NF4
    let c = cfg(llama9m(), "lora", |_| {});
    let (p32, p16) = (Plan::new(&c, false, "m"), Plan::new(&c, true, "m"));
    // norms (2 per block + the final one, 128 wide) stay f32
    assert_eq!(p16.initial.weights, p32.initial.weights / 2 + 2 * 9 * 128);
    assert_eq!(p16.initial.adapters, p32.initial.adapters);
    let q = Plan::new(&cfg(llama9m(), "qlora", |_| {}), false, "m");
    // 4 blocks of four 128×128 and three 128×352 linears
    let sb = qgalore::quant::nf4::Nf4Tensor::storage_bytes;
    let lin: u64 = 4 * 4 * (4 * 128 * 128 + 3 * 128 * 352) as u64;
    let nf4: u64 = 4 * (4 * sb(128 * 128) + 3 * sb(128 * 352)) as u64;
    let lf = Plan::new(&cfg(llama9m(), "lora", |c| c.optimizer.lora_base = LoraBase::F32), false, "m");
    assert_eq!(q.initial.weights, lf.initial.weights - lin + nf4);
}
