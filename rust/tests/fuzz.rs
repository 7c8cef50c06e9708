//! CI fuzz of the checkpoint reader and the Hugging Face safetensors reader: about 24,500
//! mutated files (bit flips, byte overwrites, truncation, extension, header-length edits,
//! re-sealed JSON edits of offsets, dtypes, shapes and metadata, non-finite values) of
//! real checkpoints of six tiny engines and of the HF fixtures. 0 panics, 0 silent loads,
//! and every attempt ends (bounded work: nothing loops on a stated length). The long run is
//! `cargo run --release --example fuzz -- 1000000`.

mod common;
mod fuzz_common;
use fuzz_common::driver::{configs, fuzz_checkpoint, fuzz_hf, hf_fixtures, Tally};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qg_fuzz_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn check(t: &Tally, what: &str) {
    eprintln!("{what}: {} cases ({} through files), {} refused, {} accepted, {} panics, {} silent; kinds {:?}", t.cases, t.files, t.refused, t.accepted, t.panics, t.silent, t.kinds);
    assert!(t.failures.is_empty(), "{what}: {:#?}", t.failures);
    assert_eq!((t.panics, t.silent), (0, 0), "{what}");
}

#[test]
fn mutated_checkpoints_are_refused_without_panic() {
    let dir = tmpdir("ckpt");
    let mut all = Tally::default();
    // one thread per engine family pair: the machine has 2 cores
    let cfgs = configs();
    let results: Vec<Tally> = std::thread::scope(|s| {
        let hs: Vec<_> = cfgs.chunks(3).map(|chunk| {
            let dir = &dir;
            s.spawn(move || {
                let mut t = Tally::default();
                for (i, (label, cfg)) in chunk.iter().enumerate() {
                    t.add(&fuzz_checkpoint(label, cfg, 3500, 0x5eed + i as u64 * 7919 + label.len() as u64, dir, 25));
                }
                t
            })
        }).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for t in &results {
        all.add(t);
    }
    check(&all, "checkpoints");
    assert!(all.cases >= 18_000 && all.refused == all.cases, "{} cases, {} refused", all.cases, all.refused);
    // every kind of mutation was exercised
    for k in ["bit flip", "byte overwrite", "header byte", "truncation", "extension", "header length", "data_offsets", "dtype", "shape", "engine_config", "step", "projector scalars", "non-finite value", "tensors swapped"] {
        assert!(all.kinds.get(k).copied().unwrap_or(0) > 10, "{k}: {:?}", all.kinds);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mutated_hf_safetensors_never_panic() {
    let dir = tmpdir("hf");
    let mut all = Tally::default();
    for (i, f) in hf_fixtures().iter().enumerate() {
        all.add(&fuzz_hf(f, 700, 0xface + i as u64, &dir));
    }
    check(&all, "hf");
    assert!(all.cases >= 3_000, "{}", all.cases);
    // damage is mostly caught (a flip inside a weight cannot be: HF files have no checksum)
    assert!(all.refused > all.cases / 3, "{} of {} refused", all.refused, all.cases);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_names_in_hf_files_give_one_bounded_line() {
    // found by the long run: a name holding an escaped newline was echoed as two lines
    let dir = tmpdir("hfname");
    let src = hf_fixtures()[0].join("model.safetensors");
    let good = std::fs::read(&src).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&good[8..8 + n]).unwrap();
    for name in ["model.norm.we\night".to_string(), "y".repeat(1 << 20)] {
        let mut h = h.clone();
        let e = h.as_object_mut().unwrap().remove("model.norm.weight").unwrap();
        h[name.as_str()] = e;
        let mut head = serde_json::to_vec(&h).unwrap();
        while head.len() % 8 != 0 {
            head.push(b' ');
        }
        let mut b = (head.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&head);
        b.extend_from_slice(&good[8 + n..]);
        let p = dir.join("model.safetensors");
        std::fs::write(&p, &b).unwrap();
        let cfg: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&std::fs::read(hf_fixtures()[0].join("config.json")).unwrap()).unwrap();
        let model = qgalore::config::ModelConfig::from_map(&cfg).unwrap();
        let msg = qgalore::hf::Checkpoint::open(&p).and_then(|c| c.match_layout(&model).map(|_| ())).unwrap_err().msg;
        assert!(!msg.contains('\n') && msg.chars().count() < 2100, "{}", &msg[..300.min(msg.len())]);
    }
    h["__metadata__"] = serde_json::json!({});
    std::fs::remove_dir_all(&dir).unwrap();
}
