//! Checkpoint files: safetensors written atomically (never through a symlink, folder or
//! FIFO, no temporary file left), loads that refuse non-regular files without blocking,
//! check the header, checksum, values, config and scalars before touching the engine, and
//! leave it bit-identical when they refuse.

mod common;
mod fuzz_common;
use common::*;
use fuzz_common::{join, set_f32, set_state, split, state};
use qgalore::backend::cpu::Cpu;
use qgalore::config::EngineConfig;
use qgalore::error::Result;
use qgalore::state::Source;
use qgalore::train::{Engine, Session};
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

#[test]
fn saves_round_trip_and_leave_only_the_target() {
    let dir = tmpdir("round");
    let e = trained();
    let p = dir.join("a.ckpt");
    e.save_file(&p, None).unwrap();
    e.save_file(&p, Some(r#"{"data":1}"#)).unwrap(); // replacing an older checkpoint
    assert_eq!(names(&dir), ["a.ckpt"]);
    let mut b = Engine::new(Cpu::new(2).unwrap(), cfg()).unwrap();
    b.load_file(&p).unwrap();
    assert_eq!(b.save_state().unwrap(), e.save_state().unwrap());
    // the file is the in-memory checkpoint plus the run
    let (file, mem) = (std::fs::read(&p).unwrap(), e.save_state().unwrap());
    let (h, data) = split(&file);
    assert_eq!(h["__metadata__"]["run"], r#"{"data":1}"#);
    assert_eq!(data, split(&mem).1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_file_is_standard_safetensors_with_named_tensors() {
    // the `safetensors` crate (the reference reader) opens it and sees real shapes
    let e = trained();
    let b = e.save_state().unwrap();
    let st = safetensors::SafeTensors::deserialize(&b).unwrap();
    let emb = st.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!((emb.dtype(), emb.shape()), (safetensors::Dtype::F32, &[64usize, 32][..]));
    let norm = st.tensor("model.layers.0.input_layernorm.weight").unwrap();
    assert_eq!(norm.shape(), &[32]);
    // q_proj 32×32: projected on the right (Q is r×n), moments of the r-column R = G Qᵀ
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(st.tensor(&format!("optim.{q}.proj")).unwrap().shape(), &[8, 32]);
    assert_eq!(st.tensor(&format!("optim.{q}.m")).unwrap().shape(), &[32, 8]);
    assert_eq!(st.tensor(&format!("optim.{q}.past")).unwrap().shape(), &[32]);
    assert_eq!(st.tensor(&format!("optim.{q}.queue")).unwrap().shape(), &[2]);
    // down_proj 32×48 (rows < cols): left projector P (m×r)
    let d = "model.layers.0.mlp.down_proj.weight";
    assert_eq!(st.tensor(&format!("optim.{d}.proj")).unwrap().shape(), &[32, 8]);
    let (h, _) = split(&b);
    let m = &h["__metadata__"];
    assert_eq!((m["format"].as_str(), m["format_version"].as_str()), (Some("qgalore-checkpoint"), Some("3")));
    let c: serde_json::Value = serde_json::from_str(m["engine_config"].as_str().unwrap()).unwrap();
    assert_eq!((c["seed"].as_u64(), c["optimizer"]["update_gap"].as_u64()), (Some(12), Some(2)));
    let s = state(&h);
    assert_eq!((s["step"].as_u64(), s["optimizer"].as_str()), (Some(5), Some("galore")));
    assert_eq!(s["optim"]["projectors"][0]["store"], "bf16");
    assert!(m.get("run").is_none());
}

#[test]
fn saves_refuse_symlinks_folders_fifos_and_devices() {
    let dir = tmpdir("refuse");
    let e = trained();
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let link = dir.join("link.ckpt");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let err = e.save_file(&link, None).unwrap_err();
    assert!(err.msg.contains("symlink"), "{}", err.msg);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert!(e.save_file(&sub, None).unwrap_err().msg.contains("not a regular file"));
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    assert!(e.save_file(&fifo, None).unwrap_err().msg.contains("not a regular file"));
    assert!(e.save_file(Path::new("/dev/null"), None).unwrap_err().msg.contains("not a regular file"));
    assert!(e.save_file(Path::new("/dev/shm"), None).is_err());
    assert!(e.save_file(Path::new("."), None).unwrap_err().msg.contains("names no file"));
    assert!(e.save_file(&dir.join("missing/x.ckpt"), None).is_err());
    // a run text that is not JSON is refused before anything is written
    assert!(e.save_file(&dir.join("r.ckpt"), Some("{oops")).unwrap_err().msg.contains("not JSON"));
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
    std::thread::spawn(move || {
        let mut e = Engine::new(Cpu::new(1).unwrap(), cfg()).unwrap();
        tx.send(e.load_file(&f2).map_err(|e| e.msg)).unwrap()
    });
    let r = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("loading a FIFO blocked");
    assert!(r.unwrap_err().contains("not a regular file"));
    let mut e = Engine::new(Cpu::new(1).unwrap(), cfg()).unwrap();
    assert!(e.load_file(Path::new("/dev/zero")).unwrap_err().msg.contains("not a regular file"));
    assert!(e.load_file(&dir).unwrap_err().msg.contains("not a regular file"));
    assert!(e.load_file(&dir.join("missing")).unwrap_err().msg.contains("cannot read"));
    let info: serde_json::Value = serde_json::from_str(&qgalore::state::info_json(&fifo)).unwrap();
    assert!(info["error"].as_str().unwrap().contains("not a regular file"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn header_is_checked_before_the_payload_is_read() {
    let dir = tmpdir("header");
    let p = dir.join("big");
    let mut e = Engine::new(Cpu::new(2).unwrap(), cfg()).unwrap();
    // a sparse 3 GiB file of zeros: a header length of 0, refused from its first bytes
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(3 << 30).unwrap();
    drop(f);
    let msg = e.load_file(&p).unwrap_err().msg;
    assert!(msg.contains("header length 0"), "{msg}");
    // a header length near 2^64, and one past the file's end
    let good = trained().save_state().unwrap();
    for v in [u64::MAX, good.len() as u64] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&v.to_le_bytes());
        let msg = e.load_state(&b).unwrap_err().msg;
        assert!(msg.contains(&format!("header length {v}")), "{msg}");
    }
    // the old binary layout (version 2, "QGCK") is refused by name in one line
    let mut old = b"QGCK".to_vec();
    old.extend_from_slice(&2u32.to_le_bytes());
    old.extend_from_slice(&[0u8; 64]);
    let msg = e.load_state(&old).unwrap_err().msg;
    assert!(msg.starts_with("checkpoint format version 2 (the old binary layout): this engine reads version 3"), "{msg}");
    assert!(!msg.contains('\n'));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Loads `bad` and asserts it is refused with `want` in the message, without a panic, and
/// leaves the engine bit-identical (a save before and after agree) and usable.
fn refused(e: &mut Engine<Cpu>, bad: &[u8], want: &str) {
    let before = e.save_state().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.load_state(bad)));
    let err = r.expect("hostile checkpoint panicked").unwrap_err();
    assert!(err.msg.contains(want), "{want}: {}", err.msg);
    assert!(!err.msg.contains('\n'), "{}", err.msg);
    assert!(e.save_state().unwrap() == before, "{want}: engine changed");
    e.usable().unwrap();
}

#[test]
fn a_corrupted_payload_is_refused_by_the_checksum() {
    let mut e = trained();
    let good = e.save_state().unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    // the last byte, the middle, the first data byte, and a digit of the stored checksum
    // (changed to another hex digit)
    let at = qgalore::state::CHECKSUM_AT;
    let cfg_at = 8 + std::str::from_utf8(&good[8..8 + n]).unwrap().find("\"seed\\\":").unwrap() + 8; // the first digit of the seed
    for (k, v) in [(good.len() - 1, None), (good.len() / 2, None), (8 + n, None), (at, Some(if good[at] == b'0' { b'1' } else { b'0' }))] {
        let mut b = good.clone();
        b[k] = v.unwrap_or(b[k] ^ 0x04);
        assert_ne!(b, good);
        refused(&mut e, &b, "checksum does not match");
    }
    // the header is compared with the engine before the payload is read (so a crafted
    // file cannot make a load read more than the engine's own state): a damaged config
    // byte is refused by that comparison, naming the field
    let mut b = good.clone();
    b[cfg_at] = b'9';
    refused(&mut e, &b, "seed is 92 in the checkpoint and 12 in this engine");
}

#[test]
fn non_finite_or_negative_values_are_refused_naming_the_tensor() {
    let mut e = trained();
    let good = e.save_state().unwrap();
    refused(&mut e, &set_f32(&good, "model.embed_tokens.weight", 5, f32::NAN), "tensor model.embed_tokens.weight holds NaN at element 5");
    refused(&mut e, &set_f32(&good, "lm_head.weight", 0, f32::INFINITY), "tensor lm_head.weight holds an infinity");
    let v = "optim.model.embed_tokens.weight.v";
    refused(&mut e, &set_f32(&good, v, 3, -1.0), &format!("tensor {v} holds -1 at element 3"));
    let q = "optim.model.layers.1.mlp.up_proj.weight.queue";
    refused(&mut e, &set_f32(&good, q, 0, f32::NAN), q);
}

#[test]
fn another_config_is_refused_naming_the_field() {
    let good = trained().save_state().unwrap();
    let mut c = cfg();
    c.seed = 13;
    let mut other = Engine::new(Cpu::new(2).unwrap(), c).unwrap();
    refused(&mut other, &good, "seed is 12 in the checkpoint and 13 in this engine");
    // a stored config edited (and re-sealed) is caught the same way
    let mut e = trained();
    let (mut h, data) = split(&good);
    let mut c: serde_json::Value = serde_json::from_str(h["__metadata__"]["engine_config"].as_str().unwrap()).unwrap();
    c["optimizer"]["galore_scale"] = 0.5.into();
    h["__metadata__"]["engine_config"] = c.to_string().into();
    refused(&mut e, &join(&h, data), "optimizer.galore_scale is 0.5 in the checkpoint and 0.25 in this engine");
}

#[test]
fn hostile_scalars_and_layouts_are_refused_and_change_nothing() {
    let mut e = trained();
    let good = e.save_state().unwrap();
    let (h0, data) = split(&good);
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut h = h0.clone();
        let mut st = state(&h);
        f(&mut st);
        set_state(&mut h, &st);
        join(&h, data)
    };
    let q = "model.layers.0.self_attn.q_proj.weight";
    refused(&mut e, &edit(&|s| s["optim"]["projectors"][0]["gap"] = 0.into()), &format!("{q} gap is 0; a refresh gap is at least 1"));
    refused(&mut e, &edit(&|s| s["optim"]["projectors"][0]["gap"] = u64::MAX.into()), "above the limit 2^53");
    refused(
        &mut e,
        &edit(&|s| {
            s["step"] = u64::MAX.into();
            s["optim"]["step"] = u64::MAX.into();
        }),
        "step is 18446744073709551615, above the limit 2^53",
    );
    refused(&mut e, &edit(&|s| s["optim"]["step"] = 4.into()), "step differs");
    refused(&mut e, &edit(&|s| s["optim"]["projectors"][0]["queue"] = 3.into()), "3 queued cosines; queue_size is 2");
    refused(&mut e, &edit(&|s| s["optim"]["projectors"][0]["store"] = "int4".into()), "stored as int4");
    refused(&mut e, &edit(&|s| s["optim"]["projectors"][0]["past"] = false.into()), "unexpected tensor optim.model.layers.0.self_attn.q_proj.weight.past");
    refused(&mut e, &edit(&|s| s["optim"]["svd_count"] = serde_json::json!(-1)), "checkpoint state of galore");
    refused(&mut e, &edit(&|s| s["optim"]["extra"] = 1.into()), "unknown field `extra`");
    // a top-1 vector of the wrong length; a tensor missing; an unknown one
    let mut h = h0.clone();
    h[format!("optim.{q}.past")]["shape"] = serde_json::json!([31]);
    refused(&mut e, &join(&h, data), "checkpoint is corrupt");
    let mut h = h0.clone();
    let past = h.as_object_mut().unwrap().remove(&format!("optim.{q}.past")).unwrap();
    h["optim.bogus"] = past;
    refused(&mut e, &join(&h, data), "tensor optim.model.layers.0.self_attn.q_proj.weight.past is missing");
    // huge offsets and shapes: checked arithmetic, never a wrapped index or a panic
    for (field, v) in [("data_offsets", serde_json::json!([0, u64::MAX])), ("data_offsets", serde_json::json!([u64::MAX - 3, u64::MAX])), ("shape", serde_json::json!([1u64 << 53, 1u64 << 53]))] {
        let mut h = h0.clone();
        h["model.norm.weight"][field] = v;
        refused(&mut e, &join(&h, data), "checkpoint is corrupt");
    }
    // names with a newline, or a megabyte long: the message stays one bounded line
    for name in ["optim.bo\ngus".to_string(), "x".repeat(1 << 20)] {
        let mut h = h0.clone();
        let e0 = h.as_object_mut().unwrap().remove("model.norm.weight").unwrap();
        h[name.as_str()] = e0;
        let msg = e.load_state(&join(&h, data)).unwrap_err().msg;
        assert!(!msg.contains('\n') && msg.chars().count() < 2100, "{}", &msg[..200.min(msg.len())]);
        assert!(msg.contains("tensor model.norm.weight is missing"), "{}", &msg[..200.min(msg.len())]);
    }
    let mut h = h0.clone();
    h["__metadata__"]["zz\nkey"] = "1".into();
    let msg = e.load_state(&join(&h, data)).unwrap_err().msg;
    assert!(msg.contains("unknown metadata key zz\\nkey"), "{msg}");
    // the engine still trains exactly like an untouched copy
    let mut twin = trained();
    let a = e.train_step(&tokens(2, 16, 64, 9), 1, 3e-3).unwrap().loss.to_bits();
    assert_eq!(a, twin.train_step(&tokens(2, 16, 64, 9), 1, 3e-3).unwrap().loss.to_bits());
}

/// A source whose bytes change after `flip_after` reads (a file rewritten in place while
/// it is being loaded).
struct Changing {
    bytes: Vec<u8>,
    reads: std::cell::Cell<usize>,
    flip_after: usize,
}

impl Source for Changing {
    fn size(&self) -> Result<u64> {
        Ok(self.bytes.len() as u64)
    }
    fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        qgalore::state::Mem(&self.bytes).read_at(at, buf)?;
        self.reads.set(self.reads.get() + 1);
        if self.reads.get() > self.flip_after && at + buf.len() as u64 == self.bytes.len() as u64 {
            buf[buf.len() - 1] ^= 1;
        }
        Ok(())
    }
}

#[test]
fn a_file_changing_during_the_load_leaves_the_engine_refusing_work() {
    let mut e = trained();
    let good = e.save_state().unwrap();
    let mut fresh = Engine::new(Cpu::new(2).unwrap(), cfg()).unwrap();
    // the verify pass reads each tensor once (+ header); flip on the load pass
    let n = split(&good).0.as_object().unwrap().len() + 2;
    let src = Changing { bytes: good.clone(), reads: 0.into(), flip_after: n };
    let err = fresh.load_from(&src).unwrap_err();
    assert!(err.msg.contains("changed while it was being loaded"), "{}", err.msg);
    let s: &mut dyn Session = &mut fresh;
    let msg = s.train_step(&tokens(2, 16, 64, 1), 1, 1e-3).unwrap_err().msg;
    assert!(msg.contains("engine state is incomplete"), "{msg}");
    assert!(s.save_state().is_err());
    // a good load makes it whole again
    fresh.load_state(&good).unwrap();
    let (a, b) = (e.train_step(&tokens(2, 16, 64, 9), 1, 3e-3).unwrap(), fresh.train_step(&tokens(2, 16, 64, 9), 1, 3e-3).unwrap());
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
}

#[test]
fn python_safetensors_reads_the_file() {
    // CI has no Python: the check runs where /work/pyref (or QG_PYTHON) has safetensors
    let py = std::env::var("QG_PYTHON").unwrap_or_else(|_| "/work/pyref/bin/python".into());
    if !Path::new(&py).exists() {
        eprintln!("skipped: no Python with safetensors at {py}");
        return;
    }
    let dir = tmpdir("python");
    let p = dir.join("q.ckpt");
    let mut c = cfg();
    c.optimizer = optim("qgalore", 0.0);
    (c.optimizer.rank, c.optimizer.update_gap, c.optimizer.weight_bits, c.optimizer.proj_bits) = (8, 2, 8, 4);
    (c.optimizer.weight_group_size, c.optimizer.proj_group_size) = (64, 64);
    let mut e = Engine::new(Cpu::new(2).unwrap(), c).unwrap();
    for s in 0..3 {
        e.train_step(&tokens(2, 16, 64, s), 1, 3e-3).unwrap();
    }
    e.save_file(&p, Some(r#"{"tokenizer":"bytes"}"#)).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/checkpoint_check.py");
    let out = std::process::Command::new(&py).arg(script).arg(&p).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/checkpoint_python.txt");
    if std::env::var("QG_BLESS").is_ok() {
        std::fs::write(fixture, text.as_bytes()).unwrap();
    }
    let want = std::fs::read_to_string(fixture).unwrap();
    assert_eq!(text, want);
    std::fs::remove_dir_all(&dir).unwrap();
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
        let mut out = [0f64; 4];
        assert_eq!(qg_train_step(h, t.as_ptr(), std::ptr::null(), t.len(), 1, 3e-3, out.as_mut_ptr()), 0);
        out[0].to_bits()
    }

    unsafe fn error(h: *mut Handle) -> String {
        let mut b = vec![0u8; 1024];
        let n = qg_last_error(h, b.as_mut_ptr(), b.len());
        String::from_utf8_lossy(&b[..n.min(1024)]).into_owned()
    }

    unsafe fn info(p: &str) -> serde_json::Value {
        let n = qg_checkpoint_info(p.as_ptr(), p.len(), std::ptr::null_mut(), 0);
        let mut b = vec![0u8; n];
        assert_eq!(qg_checkpoint_info(p.as_ptr(), p.len(), b.as_mut_ptr(), n), n);
        serde_json::from_slice(&b).unwrap()
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
            let run = r#"{"data":{"position":77},"tokenizer":"bytes"}"#;
            assert_eq!(qg_save(a, ps.as_ptr(), ps.len(), run.as_ptr(), run.len()), 0, "{}", error(a));
            assert_eq!(names(&dir), ["a.ckpt"]);
            let i = info(ps);
            assert_eq!((i["format_version"].as_u64(), i["step"].as_u64(), i["optimizer"].as_str()), (Some(3), Some(3), Some("galore")));
            assert_eq!(i["run"]["data"]["position"], 77);
            assert_eq!(i["engine_config"]["seed"], 1);
            assert!(i["error"].is_null());
            let good = std::fs::read(&p).unwrap();
            // a length near 2^64 in the index (valid checksum): refused, engine unchanged
            let (mut h, data) = split(&good);
            h["model.norm.weight"]["data_offsets"] = serde_json::json!([u64::MAX / 4, u64::MAX]);
            std::fs::write(&p, join(&h, data)).unwrap();
            assert_ne!(qg_load(a, ps.as_ptr(), ps.len()), 0);
            assert!(error(a).contains("corrupt"), "{}", error(a));
            // a flipped payload byte: refused by the checksum, and by the info too
            let mut raw = good.clone();
            let k = raw.len() - 5;
            raw[k] ^= 0x40;
            std::fs::write(&p, &raw).unwrap();
            assert_ne!(qg_load(a, ps.as_ptr(), ps.len()), 0);
            assert!(error(a).contains("checksum"), "{}", error(a));
            assert!(info(ps)["error"].as_str().unwrap().contains("checksum"));
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

/// A source that claims `size` bytes: `head` at its start, zeros after it (a sparse file
/// of any size, without the disk), counting the bytes read.
struct Sparse {
    head: Vec<u8>,
    size: u64,
    read: std::cell::Cell<u64>,
}

impl Source for Sparse {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn read_at(&self, at: u64, buf: &mut [u8]) -> Result<()> {
        self.read.set(self.read.get() + buf.len() as u64);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.head.get((at as usize).saturating_add(i)).copied().unwrap_or(0);
        }
        Ok(())
    }
}

/// A header listing `tensors` (name, dtype, shape, bytes) with valid metadata, padded.
fn crafted_header(good: &[u8], tensors: &[(&str, &str, Vec<u64>, u64)]) -> Vec<u8> {
    let (h0, _) = split(good);
    let mut h = serde_json::json!({ "__metadata__": h0["__metadata__"].clone() });
    let mut at = 0u64;
    for (name, dtype, shape, bytes) in tensors {
        h[*name] = serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes] });
        at += bytes;
    }
    join(&h, &[])
}

#[test]
fn a_file_claiming_a_huge_tensor_is_refused_before_its_payload_is_read() {
    let good = trained().save_state().unwrap();
    // one 1 TiB tensor the engine does not hold: refused from the header alone
    let tib = 1u64 << 40;
    let head = crafted_header(&good, &[("model.embed_tokens.weight", "U8", vec![tib], tib)]);
    let src = Sparse { size: head.len() as u64 + tib, head, read: 0.into() };
    let mut e = trained();
    let before = e.save_state().unwrap();
    let msg = e.load_from(&src).unwrap_err().msg;
    assert!(msg.contains("does not match this engine"), "{msg}");
    assert!(src.read.get() < 1 << 20, "{} bytes read", src.read.get());
    assert_eq!(e.save_state().unwrap(), before);
    // the same through a real sparse file
    let dir = tmpdir("sparse");
    let p = dir.join("huge.ckpt");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&src.head).unwrap();
        f.set_len(src.size).unwrap();
    }
    let msg = e.load_file(&p).unwrap_err().msg;
    assert!(msg.contains("does not match this engine"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_header_is_bounded_and_parsed_without_a_json_tree() {
    let good = trained().save_state().unwrap();
    let mut e = trained();
    // over 16 MiB: refused by its length alone
    let big = qgalore::state::MAX_HEADER as u64 + 8;
    let mut b = good.clone();
    b[..8].copy_from_slice(&big.to_le_bytes());
    b.resize(8 + big as usize, b' ');
    let msg = e.load_state(&b).unwrap_err().msg;
    assert!(msg.contains(&format!("header length {big}")) && msg.contains("at most 16777216"), "{msg}");
    // a shape of a million dimensions: refused at the fifth, not built
    let (mut h, data) = split(&good);
    h["model.norm.weight"]["shape"] = serde_json::Value::Array(vec![0.into(); 1 << 20]);
    let msg = e.load_state(&join(&h, data)).unwrap_err().msg;
    assert!(msg.contains("tensor model.norm.weight") && msg.contains("more than 4 elements"), "{msg}");
    // a state text over 1 MiB, and an array in the metadata
    let (mut h, data) = split(&good);
    let mut st = state(&h);
    st["optim"]["pad"] = "x".repeat(1 << 20).into();
    set_state(&mut h, &st);
    let msg = e.load_state(&join(&h, data)).unwrap_err().msg;
    assert!(msg.contains("metadata state is") && msg.contains("at most 1048576"), "{msg}");
    let (mut h, data) = split(&good);
    h["__metadata__"]["run"] = serde_json::Value::Array(vec![0.into(); 1000]);
    let msg = e.load_state(&join(&h, data)).unwrap_err().msg;
    assert!(msg.contains("metadata run is not a string"), "{msg}");
    // a tensor listed twice
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let text = std::str::from_utf8(&good[8..8 + n]).unwrap();
    let entry = text.find(",\"model.norm.weight\":").unwrap();
    let end = entry + text[entry..].find('}').unwrap() + 1;
    let dup = format!("{}{}{}", &text[..end], &text[entry..end], &text[end..]);
    let mut b = (dup.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(dup.as_bytes());
    b.extend_from_slice(&good[8 + n..]);
    fuzz_common::reseal(&mut b);
    let msg = e.load_state(&b).unwrap_err().msg;
    assert!(msg.contains("appears twice"), "{msg}");
    // still the same engine
    let mut twin = trained();
    assert_eq!(e.train_step(&tokens(2, 16, 64, 9), 1, 3e-3).unwrap().loss.to_bits(), twin.train_step(&tokens(2, 16, 64, 9), 1, 3e-3).unwrap().loss.to_bits());
}

fn qcfg() -> EngineConfig {
    let mut c = cfg();
    c.optimizer = common::optim("qgalore", 0.0);
    (c.optimizer.rank, c.optimizer.update_gap, c.optimizer.weight_bits, c.optimizer.proj_bits) = (8, 2, 8, 4);
    (c.optimizer.weight_group_size, c.optimizer.proj_group_size) = (64, 64);
    c
}

#[test]
fn finite_scales_that_dequantize_to_infinity_are_refused() {
    let mut a = Engine::new(Cpu::new(2).unwrap(), qcfg()).unwrap();
    for s in 0..3 {
        a.train_step(&tokens(2, 16, 64, s), 1, 1e-3).unwrap();
    }
    let good = a.save_state().unwrap();
    let names = fuzz_common::tensor_names(&split(&good).0);
    let weight = names.iter().find(|n| n.starts_with("model.") && n.ends_with(".weight.scale")).unwrap();
    let proj = names.iter().find(|n| n.ends_with(".proj.scale")).unwrap();
    let zero = names.iter().find(|n| n.ends_with(".weight.zero")).unwrap();
    let mut b = Engine::new(Cpu::new(2).unwrap(), qcfg()).unwrap();
    let before = b.save_state().unwrap();
    // a zero far outside the code range, with a scale of 10: (255 + 3e38)·10 overflows
    let big_zero = set_f32(&set_f32(&good, zero, 0, -3.0e38), weight, 0, 10.0);
    for (name, bad) in [(weight, set_f32(&good, weight, 0, 3.0e38)), (proj, set_f32(&good, proj, 0, 3.0e38)), (zero, big_zero)] {
        let msg = b.load_state(&bad).unwrap_err().msg;
        let base = name.rsplit_once('.').unwrap().0;
        assert!(msg.contains(&format!("tensor {base}: group 0")) && msg.contains("non-finite"), "{msg}");
        assert_eq!(b.save_state().unwrap(), before);
    }
    // a large but harmless scale still loads
    b.load_state(&set_f32(&good, weight, 0, 1.0e30)).unwrap();
}

#[test]
fn a_half_loaded_engine_refuses_export_and_import() {
    let e = trained();
    let good = e.save_state().unwrap();
    let mut fresh = Engine::new(Cpu::new(2).unwrap(), cfg()).unwrap();
    let n = split(&good).0.as_object().unwrap().len() + 2;
    let src = Changing { bytes: good.clone(), reads: 0.into(), flip_after: n };
    assert!(fresh.load_from(&src).is_err());
    let dir = tmpdir("poisoned_export");
    let out = dir.join("hf");
    let opts = qgalore::hf::ExportOptions::from_json(&serde_json::json!({ "dir": out.to_str().unwrap(), "dtype": "f32" }).to_string()).unwrap();
    let msg = qgalore::hf::HfSession::export_hf(&mut fresh, &opts).unwrap_err().msg;
    assert!(msg.contains("engine state is incomplete"), "{msg}");
    assert!(!out.exists());
    // an export of a good engine to import from
    e.export_hf_with(&opts).unwrap();
    let msg = qgalore::hf::HfSession::import_hf(&mut fresh, &out).unwrap_err().msg;
    assert!(msg.contains("engine state is incomplete"), "{msg}");
    let s: &mut dyn Session = &mut fresh;
    for msg in [
        s.eval(&tokens(2, 16, 64, 1), 1).unwrap_err().msg,
        s.logits(&tokens(1, 4, 64, 1)[..4], 1, 4, &mut vec![0.0; 4 * 64]).unwrap_err().msg,
        s.save_file(&dir.join("x.ckpt"), None).unwrap_err().msg,
    ] {
        assert!(msg.contains("engine state is incomplete"), "{msg}");
    }
    assert!(!dir.join("x.ckpt").exists());
    fresh.load_state(&good).unwrap();
    qgalore::hf::HfSession::export_hf(&mut fresh, &qgalore::hf::ExportOptions::from_json(&serde_json::json!({ "dir": dir.join("hf2").to_str().unwrap(), "dtype": "f32" }).to_string()).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn messages_naming_a_path_are_one_line_and_name_the_checkpoint() {
    let dir = tmpdir("newline");
    let odd = dir.join("a\nb");
    std::fs::create_dir_all(&odd).unwrap();
    let p = odd.join("ck");
    std::fs::write(&p, b"not a checkpoint at all").unwrap();
    let mut e = trained();
    let msg = e.load_file(&p).unwrap_err().msg;
    assert!(!msg.contains('\n') && msg.contains("a\\nb/ck") && msg.contains("not a qgalore checkpoint"), "{msg}");
    let target = odd.join("missing/x.ckpt");
    let msg = e.save_file(&target, None).unwrap_err().msg;
    assert!(!msg.contains('\n') && msg.contains("a\\nb/missing/x.ckpt") && !msg.contains(".tmp"), "{msg}");
    let msg = e.load_file(&odd.join("none")).unwrap_err().msg;
    assert!(!msg.contains('\n'), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn names_up_to_255_bytes_save_and_a_panicking_save_leaves_no_temporary_file() {
    let dir = tmpdir("longname");
    let e = trained();
    for len in [200, 230, 255] {
        let p = dir.join("c".repeat(len));
        e.save_file(&p, None).unwrap();
        assert_eq!(names(&dir), ["c".repeat(len)]);
        let mut back = Engine::new(Cpu::new(2).unwrap(), cfg()).unwrap();
        back.load_file(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
    // a fill that panics: the temporary file is removed on unwind, the old file kept
    let p = dir.join("a.ckpt");
    e.save_file(&p, None).unwrap();
    let old = std::fs::read(&p).unwrap();
    let r = std::panic::catch_unwind(|| {
        let _ = qgalore::state::file::write_atomic(&p, |f| {
            std::io::Write::write_all(f, b"partial").unwrap();
            panic!("fill failed");
        });
    });
    assert!(r.is_err());
    assert_eq!(names(&dir), ["a.ckpt"]);
    assert_eq!(std::fs::read(&p).unwrap(), old);
    std::fs::remove_dir_all(&dir).unwrap();
}
