//! The long fuzz run of the checkpoint and Hugging Face safetensors readers (the CI test
//! `tests/fuzz.rs` runs the same loop on ~24,500 inputs):
//!
//!     cargo run --release --example fuzz -- 1000000 [threads]
//!
//! Splits the inputs over `threads` workers (default: the machine's processors): 85% over
//! the six engine checkpoints, 15% over the HF fixtures. Prints the tally and exits
//! non-zero on any panic or silent load.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/fuzz_common/mod.rs"]
mod fuzz_common;

use fuzz_common::driver::{configs, fuzz_checkpoint, fuzz_hf, hf_fixtures, Tally};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let total: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // the panics are caught and counted; keep their messages out of the output
    std::panic::set_hook(Box::new(|_| {}));
    let dir = std::env::temp_dir().join(format!("qg_fuzz_long_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfgs = configs();
    let fixtures = hf_fixtures();
    // jobs: (checkpoint?, config or fixture index, cases, seed), in chunks so the workers
    // share the load
    let per_ckpt = total * 85 / 100 / cfgs.len() as u64;
    let per_hf = (total - per_ckpt * cfgs.len() as u64).div_ceil(fixtures.len() as u64);
    let mut jobs: Vec<(bool, usize, u64, u64)> = Vec::new();
    let chunk = 20_000u64;
    for (ckpt, count, per) in [(true, cfgs.len(), per_ckpt), (false, fixtures.len(), per_hf)] {
        for i in 0..count {
            let mut left = per;
            while left > 0 {
                let n = left.min(chunk);
                jobs.push((ckpt, i, n, 0x1000 + jobs.len() as u64 * 7919));
                left -= n;
            }
        }
    }
    let t0 = std::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|w| {
                let (jobs, next, cfgs, fixtures) = (&jobs, &next, &cfgs, &fixtures);
                let wdir = dir.join(format!("w{w}"));
                s.spawn(move || {
                    std::fs::create_dir_all(&wdir).unwrap();
                    let mut t = Tally::default();
                    loop {
                        let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(ckpt, i, n, seed)) = jobs.get(j) else { break };
                        let r = if ckpt { fuzz_checkpoint(cfgs[i].0, &cfgs[i].1, n, seed, &wdir, 25) } else { fuzz_hf(&fixtures[i], n, seed, &wdir) };
                        t.add(&r);
                    }
                    t
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = Tally::default();
    for t in &tallies {
        all.add(t);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "inputs {} ({} through files), refused {}, accepted HF {}, panics {}, silent loads {}, slowest attempt {:.3} s, wall {:.1} s on {threads} threads",
        all.cases,
        all.files,
        all.refused,
        all.accepted,
        all.panics,
        all.silent,
        all.slowest,
        t0.elapsed().as_secs_f64()
    );
    println!("kinds {:?}", all.kinds);
    for f in &all.failures {
        println!("FAILURE {f}");
    }
    if all.panics > 0 || all.silent > 0 {
        std::process::exit(1);
    }
}
