//! Checkpoint files: atomic saves that never write through a symlink, folder or FIFO and
//! leave no temporary file; loads that refuse non-regular files without blocking, check
//! the header and SHA-256 before parsing, and survive hostile fields with the engine
//! unchanged.

mod common;
use common::*;
use qgalore::backend::cpu::Cpu;
use qgalore::config::EngineConfig;
use qgalore::state::{read_file, write_file};
use qgalore::train::Engine;
use std::path::{Path, PathBuf};

fn cfg() -> EngineConfig {
    let mut c = engine_cfg(tiny_model(64, 32, 48, 4, 4, 2), 2, 16, 12);
    c.optimizer = optim("galore", 0.0);
    c.optimizer.rank = 8;
    c.optimizer.update_gap = 2;
    c.optimizer.lazy = true;
    c.optimizer.queue_size = 2;
    c
}

/// A galore engine after a few steps: moments, projectors, a lazy queue and a top-1 vector.
fn trained() -> Engine<Cpu> {
    let mut e = Engine::new(Cpu::new(2).unwrap(), cfg()).unwrap();
    for s in 0..5 {
        e.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap();
    }
    e
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qg_ckfiles_{name}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn mkfifo(p: &Path) {
    assert!(std::process::Command::new("mkfifo").arg(p).status().unwrap().success());
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn saves_round_trip_and_leave_only_the_target() {
    let dir = tmpdir("round");
    let e = trained();
    let state = e.save_state().unwrap();
    let p = dir.join("a.ckpt");
    write_file(&p, &state).unwrap();
    write_file(&p, &state).unwrap(); // replacing an older checkpoint
    assert_eq!(names(&dir), ["a.ckpt"]);
    assert_eq!(read_file(&p).unwrap(), state);
    let mut b = Engine::new(Cpu::new(2).unwrap(), cfg()).unwrap();
    b.load_state(&read_file(&p).unwrap()).unwrap();
    assert_eq!(b.save_state().unwrap(), state);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn saves_refuse_symlinks_folders_fifos_and_devices() {
    let dir = tmpdir("refuse");
    let state = trained().save_state().unwrap();
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let link = dir.join("link.ckpt");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let e = write_file(&link, &state).unwrap_err();
    assert!(e.msg.contains("symlink"), "{}", e.msg);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert!(write_file(&sub, &state).unwrap_err().msg.contains("not a regular file"));
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    assert!(write_file(&fifo, &state).unwrap_err().msg.contains("not a regular file"));
    assert!(write_file(Path::new("/dev/null"), &state).unwrap_err().msg.contains("not a regular file"));
    assert!(write_file(Path::new("/dev/shm"), &state).is_err());
    assert!(write_file(Path::new("."), &state).unwrap_err().msg.contains("names no file"));
    assert!(write_file(&dir.join("missing/x.ckpt"), &state).is_err());
    // nothing was created next to any of them
    assert_eq!(names(&dir), ["fifo", "link.ckpt", "sub", "victim.txt"]);
    assert!(names(&sub).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loads_refuse_fifos_devices_and_folders_without_blocking() {
    let dir = tmpdir("loadfifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let (tx, rx) = std::sync::mpsc::channel();
    let f2 = fifo.clone();
    std::thread::spawn(move || tx.send(read_file(&f2).map_err(|e| e.msg)).unwrap());
    let r = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("loading a FIFO blocked");
    assert!(r.unwrap_err().contains("not a regular file"));
    assert!(read_file(Path::new("/dev/zero")).unwrap_err().msg.contains("not a regular file"));
    assert!(read_file(&dir).unwrap_err().msg.contains("not a regular file"));
    assert!(read_file(&dir.join("missing")).unwrap_err().msg.contains("cannot read"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn header_is_checked_before_the_payload_is_read() {
    let dir = tmpdir("header");
    let p = dir.join("big");
    // a sparse 3 GiB file that is not a checkpoint: refused from its first bytes
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(3 << 30).unwrap();
    drop(f);
    assert!(read_file(&p).unwrap_err().msg.contains("bad magic"));
    // a real header whose stated length disagrees with the file size
    let state = trained().save_state().unwrap();
    write_file(&p, &state).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert!(read_file(&p).unwrap_err().msg.contains("truncated or corrupt"));
    // version 1 (no checksum) is refused by name
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert!(read_file(&p).unwrap_err().msg.contains("version 1"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Byte offsets of fields in a galore (fp32) checkpoint, found by walking the layout.
struct Fields {
    step: usize,
    first_gap: usize,
    first_queue: usize,
    first_past: usize,
}

fn walk(b: &[u8]) -> Fields {
    let mut pos = 8;
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    let skip_bytes = |pos: &mut usize, elem: usize| {
        let n = u64_at(*pos);
        *pos += 8 + n * elem;
    };
    skip_bytes(&mut pos, 1); // metadata JSON
    skip_bytes(&mut pos, 1); // optimizer name
    let n = u64_at(pos);
    pos += 8;
    for _ in 0..n {
        skip_bytes(&mut pos, 1); // tensor name
        assert_eq!(b[pos], 0, "fp32 weights");
        pos += 1;
        skip_bytes(&mut pos, 4);
    }
    let step = pos;
    pos += 8 * 4; // step, svd_count, refresh_failures, nonfinite_grads
    pos += 8; // refresh_seconds
    loop {
        assert_eq!(b[pos], 0, "fp32 moments");
        pos += 1;
        skip_bytes(&mut pos, 4);
        skip_bytes(&mut pos, 4);
        let tag = b[pos];
        pos += 1;
        if tag == 1 {
            let first_gap = pos + 8;
            let first_queue = pos + 16;
            let mut q = first_queue;
            skip_bytes(&mut q, 4);
            return Fields { step, first_gap, first_queue, first_past: q };
        }
    }
}

/// Loads `bad` (written as a file with a valid checksum) and asserts it is refused with
/// `want` in the message and leaves the engine bit-identical and working.
fn refused(e: &mut Engine<Cpu>, dir: &Path, bad: &[u8], want: &str) {
    let before = e.save_state().unwrap();
    let p = dir.join("hostile.ckpt");
    write_file(&p, bad).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.load_state(&read_file(&p).unwrap())));
    let err = r.expect("hostile checkpoint panicked").unwrap_err();
    assert!(err.msg.contains(want), "{want}: {}", err.msg);
    assert!(e.save_state().unwrap() == before, "{want}: engine changed");
}

#[test]
fn hostile_fields_are_refused_and_change_nothing() {
    let dir = tmpdir("hostile");
    let mut e = trained();
    let good = e.save_state().unwrap();
    let f = walk(&good);
    let with = |at: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    refused(&mut e, &dir, &with(f.first_gap, &0u64.to_le_bytes()), "refresh gap is 0");
    refused(&mut e, &dir, &with(f.first_gap, &u64::MAX.to_le_bytes()), "above the limit");
    refused(&mut e, &dir, &with(f.step, &u64::MAX.to_le_bytes()), "above the limit");
    // lengths near 2^64 in the reader: an error, never a wrapped index or a panic
    refused(&mut e, &dir, &with(f.first_queue, &u64::MAX.to_le_bytes()), "corrupt");
    // × 4 bytes still fits in u64: only the reader's checked position catches these
    refused(&mut e, &dir, &with(f.first_queue, &(u64::MAX / 4).to_le_bytes()), "corrupt");
    refused(&mut e, &dir, &with(f.first_past, &(u64::MAX / 4 - 1).to_le_bytes()), "corrupt");
    // a top-1 vector one value short (the next field shifted to keep the layout)
    let n = u64::from_le_bytes(good[f.first_past..f.first_past + 8].try_into().unwrap());
    assert!(n > 0, "the trained engine has a top-1 vector");
    let mut short = good[..f.first_past].to_vec();
    short.extend_from_slice(&(n - 1).to_le_bytes());
    short.extend_from_slice(&good[f.first_past + 8..f.first_past + 8 + 4 * (n as usize - 1)]);
    short.extend_from_slice(&good[f.first_past + 8 + 4 * n as usize..]);
    refused(&mut e, &dir, &short, "top-1 vector");
    // a cosine queue longer than queue_size
    let q = u64::from_le_bytes(good[f.first_queue..f.first_queue + 8].try_into().unwrap()) as usize;
    let mut long = good[..f.first_queue].to_vec();
    long.extend_from_slice(&3u64.to_le_bytes());
    long.extend_from_slice(&[0u8; 12]);
    long.extend_from_slice(&good[f.first_queue + 8 + 4 * q..]);
    refused(&mut e, &dir, &long, "cosine queue");
    // the engine still trains exactly like an untouched copy
    let mut twin = trained();
    let a = e.train_step(&tokens(2, 16, 64, 9), 1, 3e-3).unwrap().loss.to_bits();
    assert_eq!(a, twin.train_step(&tokens(2, 16, 64, 9), 1, 3e-3).unwrap().loss.to_bits());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn randomly_corrupted_files_are_never_loaded() {
    let dir = tmpdir("fuzz");
    let mut e = trained();
    let before = e.save_state().unwrap();
    let p = dir.join("c.ckpt");
    write_file(&p, &before).unwrap();
    let file = std::fs::read(&p).unwrap();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let (mut silent, mut panics) = (0, 0);
    for i in 0..2000 {
        let mut b = file.clone();
        let flips = 1 + rng.below(4);
        let mut at: Vec<usize> = (0..flips).map(|_| rng.below(b.len())).collect();
        at.sort();
        at.dedup();
        for &k in &at {
            b[k] ^= 1 + rng.below(255) as u8;
        }
        if i % 10 == 0 {
            b.truncate(rng.below(b.len()));
        }
        std::fs::write(&p, &b).unwrap();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_file(&p).and_then(|s| e.load_state(&s)))) {
            Ok(Ok(())) => silent += 1,
            Ok(Err(_)) => {}
            Err(_) => panics += 1,
        }
    }
    assert_eq!((silent, panics), (0, 0));
    assert!(e.save_state().unwrap() == before, "engine changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_reader_survives_random_corruption_without_a_checksum() {
    // in-memory state bytes skip the checksum: the reader itself must never panic, and a
    // refused load must leave the engine as it was
    let mut e = trained();
    let before = e.save_state().unwrap();
    let mut rng = Rng(12345);
    for _ in 0..1000 {
        let mut b = before.clone();
        for _ in 0..1 + rng.below(3) {
            let k = rng.below(b.len());
            b[k] ^= 1 + rng.below(255) as u8;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.load_state(&b)));
        let r = r.expect("the reader panicked");
        if r.is_err() {
            assert!(e.save_state().unwrap() == before, "refused load changed the engine");
        } else {
            e.load_state(&before).unwrap();
        }
    }
}

mod ffi_level {
    use super::*;
    use qgalore::ffi::*;

    unsafe fn new_engine() -> *mut Handle {
        let cfg = r#"{"model":{"vocab_size":64,"hidden_size":32,"intermediate_size":48,"num_attention_heads":4,
            "num_key_value_heads":4,"num_hidden_layers":2,"max_position_embeddings":64},
            "batch_size":2,"seq_len":16,"optimizer":{"name":"galore","rank":8,"update_gap":2,"clip":0},
            "seed":1,"device":"cpu","threads":2}"#;
        let mut err = vec![0u8; 512];
        let mut n = 0usize;
        let h = qg_engine_new(cfg.as_ptr(), cfg.len(), err.as_mut_ptr(), err.len(), &mut n);
        assert!(!h.is_null(), "{}", String::from_utf8_lossy(&err[..n.min(512)]));
        h
    }

    unsafe fn step(h: *mut Handle, s: u64) -> u64 {
        let t = tokens(2, 16, 64, s);
        let mut out = [0f64; 3];
        assert_eq!(qg_train_step(h, t.as_ptr(), t.len(), 1, 3e-3, out.as_mut_ptr()), 0);
        out[0].to_bits()
    }

    unsafe fn error(h: *mut Handle) -> String {
        let mut b = vec![0u8; 1024];
        let n = qg_last_error(h, b.as_mut_ptr(), b.len());
        String::from_utf8_lossy(&b[..n.min(1024)]).into_owned()
    }

    #[test]
    fn a_hostile_file_leaves_the_live_engine_working_and_unchanged() {
        let dir = tmpdir("ffi");
        unsafe {
            let (a, twin) = (new_engine(), new_engine());
            for s in 0..3 {
                assert_eq!(step(a, s), step(twin, s));
            }
            let p = dir.join("a.ckpt");
            let ps = p.to_str().unwrap();
            assert_eq!(qg_save(a, ps.as_ptr(), ps.len(), std::ptr::null(), 0), 0, "{}", error(a));
            assert_eq!(names(&dir), ["a.ckpt"]);
            let state = read_file(&p).unwrap();
            // a reader length near 2^64 (valid checksum): once a panic that broke the engine
            let f = walk(&state);
            let mut bad = state.clone();
            bad[f.first_queue..f.first_queue + 8].copy_from_slice(&(u64::MAX / 4).to_le_bytes());
            write_file(&p, &bad).unwrap();
            assert_ne!(qg_load(a, ps.as_ptr(), ps.len()), 0);
            assert!(error(a).contains("corrupt"), "{}", error(a));
            // a flipped payload byte: refused by the checksum
            write_file(&p, &state).unwrap();
            let mut raw = std::fs::read(&p).unwrap();
            let k = raw.len() - 5;
            raw[k] ^= 0x40;
            std::fs::write(&p, &raw).unwrap();
            assert_ne!(qg_load(a, ps.as_ptr(), ps.len()), 0);
            assert!(error(a).contains("SHA-256"), "{}", error(a));
            // a FIFO at the path is refused without blocking; a save refuses to write into it
            std::fs::remove_file(&p).unwrap();
            mkfifo(&p);
            assert_ne!(qg_load(a, ps.as_ptr(), ps.len()), 0);
            assert_ne!(qg_save(a, ps.as_ptr(), ps.len(), std::ptr::null(), 0), 0);
            assert!(error(a).contains("not a regular file"), "{}", error(a));
            // still the same engine: it trains exactly like its twin
            for s in 3..5 {
                assert_eq!(step(a, s), step(twin, s));
            }
            qg_engine_free(a);
            qg_engine_free(twin);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
