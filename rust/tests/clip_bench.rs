//! Benchmark (ignored; one case per process, for its peak RSS): the fused step with the clip
//! stash (one backward) against the old two-backward fused step and the global step, at
//! clip 1, byte vocabulary, batch 8, seq 256, 2 threads. Prints one JSON line.
//!
//!   QG_CASE=llama-60m QG_OPT=qgalore QG_MODE=stash cargo test --release --test clip_bench -- --ignored --nocapture
//!
//! QG_MODE: `stash`, `two-backward` or `unfused`; QG_STEPS (default 3) timed after one warm-up.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::OptimConfig;
use qgalore::train::Engine;
use std::time::Instant;

fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) * 1024
}

#[test]
#[ignore = "benchmark harness behind bench/results/clip-cpu-*.jsonl: cargo test --release --test clip_bench -- --ignored --nocapture"]
fn clip_bench() {
    let case = std::env::var("QG_CASE").unwrap_or("llama-35m".into());
    let opt = std::env::var("QG_OPT").unwrap_or("galore".into());
    let mode = std::env::var("QG_MODE").unwrap_or("stash".into());
    let steps: usize = std::env::var("QG_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    // lib/presets.ts: [hidden, intermediate, heads, layers]
    let (h, i, heads, layers) = match case.as_str() {
        "llama-35m" => (384, 1024, 8, 6),
        "llama-60m" => (512, 1376, 8, 8),
        other => panic!("QG_CASE {other}: llama-35m or llama-60m"),
    };
    let (b, t, v) = (8, 256, 256);
    let mut c = engine_cfg(tiny_model(v, h, i, heads, heads, layers), b, t, 1);
    c.model.max_position_embeddings = 1024;
    // the engine's defaults for the optimizer (fused on), rank 128, clip 1
    let mut o: OptimConfig = serde_json::from_str(&format!("{{\"name\":\"{opt}\",\"clip\":1.0,\"rank\":128}}")).unwrap();
    o.fused = mode != "unfused";
    c.optimizer = o;
    let mut e = Engine::new(Cpu::new(2).unwrap(), c).unwrap();
    e.two_backward_clip = mode == "two-backward";
    let toks = tokens(b, t, v, 12345);
    e.train_step(&toks, 1, 1e-3).unwrap(); // warm-up (first refresh, page faults)
    let b0 = e.backwards;
    let t0 = Instant::now();
    for _ in 0..steps {
        e.train_step(&toks, 1, 1e-3).unwrap();
    }
    let sec = t0.elapsed().as_secs_f64();
    let m = e.memory();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("").trim().to_string();
    let line = serde_json::json!({
        "case": case, "optimizer": opt, "mode": mode, "clip": 1.0, "rank": 128, "batch": b, "seq": t, "vocab": v, "threads": 2,
        "steps": steps, "tokens_per_s": (steps * b * t) as f64 / sec, "backwards_per_step": (e.backwards - b0) as f64 / steps as f64,
        "memory": {"weights": m[0], "grads": m[2], "optimizer_state": m[3], "projector": m[4], "activations": m[5], "total": m[6]},
        "peak_rss": peak_rss(), "cpu": model,
    });
    println!("BENCH {line}");
}
