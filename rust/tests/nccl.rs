//! The NCCL path (`qgalore::dist::nccl`) without a GPU: the selection from the environment,
//! the device each rank opens, the route every rank takes from every rank's probe, the
//! unique id's broadcast (over two real MPI ranks, like `mpi.rs`), and the one line a
//! machine without NCCL gets. With a GPU and NCCL (`tools/gpu-check.sh device`),
//! `one_rank_communicator` sums a device buffer through a one-rank NCCL communicator on the
//! CUDA backend's own `Collectives::allreduce_sum`; it is skipped with a message elsewhere,
//! unless `QGALORE_REQUIRE_NCCL=1`, where that fails.

use qgalore::dist::nccl::{self, Route, Row, Select, ID_BYTES, ID_MSG_BYTES, UUID_BYTES};
use qgalore::dist::{self, Mode};
mod common;
use common::mpi::*;
use std::collections::HashMap;
use std::time::Duration;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| m.get(k).cloned()
}

fn gpu(n: u8) -> [u8; UUID_BYTES] {
    std::array::from_fn(|i| if i == 0 { n } else { (i as u8) * 17 })
}

fn row(nccl: bool, g: u8, select: Select) -> Row {
    Row { nccl, device: gpu(g), select, share_ok: false }
}

fn with(rows: &[Row], select: Select, share_ok: bool) -> Vec<Row> {
    rows.iter().map(|r| Row { select, share_ok, ..r.clone() }).collect()
}

#[test]
fn selection_from_environment() {
    assert_eq!(Select::from_env(&env(&[])).unwrap(), Select::Auto);
    assert_eq!(Select::from_env(&env(&[("QGALORE_DIST_NCCL", "auto")])).unwrap(), Select::Auto);
    assert_eq!(Select::from_env(&env(&[("QGALORE_DIST_NCCL", "on")])).unwrap(), Select::On);
    assert_eq!(Select::from_env(&env(&[("QGALORE_DIST_NCCL", " off ")])).unwrap(), Select::Off);
    let e = Select::from_env(&env(&[("QGALORE_DIST_NCCL", "yes")])).unwrap_err();
    assert_eq!(e.msg, "QGALORE_DIST_NCCL=yes: allowed auto, on, off");
    assert!(!nccl::share_allowed_from(&env(&[])).unwrap());
    assert!(nccl::share_allowed_from(&env(&[("QGALORE_DIST_SHARE_DEVICE", "1")])).unwrap());
    assert!(!nccl::share_allowed_from(&env(&[("QGALORE_DIST_SHARE_DEVICE", "0")])).unwrap());
    let e = nccl::share_allowed_from(&env(&[("QGALORE_DIST_SHARE_DEVICE", "2")])).unwrap_err();
    assert_eq!(e.msg, "QGALORE_DIST_SHARE_DEVICE=2: allowed 0 or 1");
}

#[test]
fn device_assignment_from_environment() {
    // the local rank, first found: Open MPI, then MPICH/Hydra, then Slurm
    assert_eq!(nccl::local_rank_from(&env(&[])), None);
    let e = env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3"), ("SLURM_LOCALID", "0")]);
    assert_eq!(nccl::local_rank_from(&e), Some(("OMPI_COMM_WORLD_LOCAL_RANK", 3)));
    assert_eq!(nccl::local_rank_from(&env(&[("MPI_LOCALRANKID", "2")])), Some(("MPI_LOCALRANKID", 2)));
    assert_eq!(nccl::local_rank_from(&env(&[("SLURM_LOCALID", "1")])), Some(("SLURM_LOCALID", 1)));
    assert_eq!(nccl::local_rank_from(&env(&[("SLURM_LOCALID", "x")])), None);
    // the device: local rank modulo the visible devices
    assert_eq!(nccl::device_for(Some(3), 8).unwrap(), 3);
    assert_eq!(nccl::device_for(Some(5), 4).unwrap(), 1);
    // a launcher that gives each rank its own single visible GPU: every rank opens its 0
    assert_eq!(nccl::device_for(Some(1), 1).unwrap(), 0);
    assert_eq!(nccl::device_for(None, 2).unwrap(), 0);
    let e = nccl::device_for(Some(0), 0).unwrap_err();
    assert!(e.msg.starts_with("no usable CUDA device for this rank"), "{}", e.msg);
    // which ranks share a device, from their UUIDs
    let rows = |d: &[u8]| d.iter().map(|&g| row(true, g, Select::Auto)).collect::<Vec<_>>();
    assert!(nccl::shared_devices(&rows(&[0, 1, 2, 3])).is_empty());
    assert_eq!(nccl::shared_devices(&rows(&[0, 1, 0, 1, 2])), vec![vec![0, 2], vec![1, 3]]);
    assert_eq!(nccl::uuid_text(&gpu(0xab)), "GPU-ab112233-4455-6677-8899-aabbccddeeff");
}

#[test]
fn route_from_every_ranks_probe() {
    let (auto, on, off) = (Select::Auto, Select::On, Select::Off);
    let all = [row(true, 0, auto), row(true, 1, auto)];
    // every rank can load NCCL and has its own GPU
    assert_eq!(nccl::decide(&all, 0, None).unwrap(), Route::Nccl);
    assert_eq!(nccl::decide(&with(&all, on, false), 1, None).unwrap(), Route::Nccl);
    assert_eq!(nccl::decide(&with(&all, off, false), 0, None).unwrap(), Route::Host { notice: None });
    // rank 1 lacks NCCL: auto stages through the host with a notice on every rank (rank 1
    // adds its reason), on refuses on every rank
    let part = [row(true, 0, auto), row(false, 1, auto)];
    let Route::Host { notice: Some(n0) } = nccl::decide(&part, 0, None).unwrap() else { panic!() };
    assert_eq!(n0, "NCCL cannot be loaded on rank 1: gradients are summed in host memory through MPI (QGALORE_DIST_NCCL=off silences this)");
    let Route::Host { notice: Some(n1) } = nccl::decide(&part, 1, Some("no libnccl.so")).unwrap() else { panic!() };
    assert!(n1.starts_with("NCCL cannot be loaded on rank 1 (no libnccl.so): "), "{n1}");
    let e = nccl::decide(&with(&part, on, false), 0, None).unwrap_err();
    assert_eq!(e.msg, "QGALORE_DIST_NCCL=on but NCCL cannot be loaded on rank 1; set QGALORE_DIST_NCCL=auto or off to sum gradients through MPI");
    let none = [row(false, 0, on), row(false, 1, on), row(false, 2, on)];
    let e = nccl::decide(&none, 0, None).unwrap_err();
    assert!(e.msg.contains("on ranks 0, 1, 2"), "{}", e.msg);
    // two ranks on one GPU: refused unless allowed, whatever the selection
    let shared = [row(true, 7, auto), row(true, 7, auto)];
    for sel in [auto, on, off] {
        let e = nccl::decide(&with(&shared, sel, false), 0, None).unwrap_err();
        assert!(e.msg.starts_with("ranks 0, 1 run on one GPU (GPU-07112233-"), "{}", e.msg);
        assert!(e.msg.ends_with("or set QGALORE_DIST_SHARE_DEVICE=1 to let them share it through host memory"), "{}", e.msg);
        assert!(!e.msg.contains('\n'));
    }
    // allowed: host staging (NCCL cannot put two ranks on one device), refused under on
    let Route::Host { notice: Some(n) } = nccl::decide(&with(&shared, auto, true), 0, None).unwrap() else { panic!() };
    assert!(n.contains("(QGALORE_DIST_SHARE_DEVICE=1): gradients are summed in host memory through MPI, not by NCCL"), "{n}");
    assert_eq!(nccl::decide(&with(&shared, off, true), 0, None).unwrap(), Route::Host { notice: None });
    let e = nccl::decide(&with(&shared, on, true), 0, None).unwrap_err();
    assert!(e.msg.starts_with("QGALORE_DIST_NCCL=on but ranks 0, 1 run on one GPU"), "{}", e.msg);
    // ranks started with different settings are refused alike, before anything else
    let mixed = [row(true, 0, auto), row(true, 1, on), row(true, 2, auto)];
    let e = nccl::decide(&mixed, 2, None).unwrap_err();
    assert_eq!(e.msg, "QGALORE_DIST_NCCL or QGALORE_DIST_SHARE_DEVICE differs across ranks: rank 1 differs from rank 0; start every rank with the same environment");
    let mut mixed = with(&shared, auto, false);
    mixed[1].share_ok = true;
    assert!(nccl::decide(&mixed, 0, None).unwrap_err().msg.contains("differs across ranks: rank 1 differs"));
}

#[test]
fn unique_id_message() {
    // NCCL's unique id is 128 bytes (NCCL_UNIQUE_ID_BYTES): the struct cudarc binds
    assert_eq!(ID_BYTES, 128);
    #[cfg(feature = "cuda")]
    assert_eq!(std::mem::size_of::<cudarc::nccl::sys::ncclUniqueId>(), ID_BYTES);
    assert_eq!(ID_MSG_BYTES, 129);
    let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 31 + 7) as u8);
    let m = nccl::encode_id(Some(&id));
    assert_eq!(m[0], 1);
    assert_eq!(&m[1..], &id[..]);
    assert_eq!(nccl::decode_id(&m), Some(id));
    let m = nccl::encode_id(None);
    assert_eq!(m, [0u8; ID_MSG_BYTES]);
    assert_eq!(nccl::decode_id(&m), None);
}

#[test]
fn one_process_world_needs_no_nccl() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    // a one-rank world: every collective of the protocol is the identity, nothing is loaded
    assert_eq!(dist::size(), 1);
    let mine = Row { nccl: false, device: gpu(3), select: Select::Off, share_ok: true };
    assert_eq!(nccl::gather(&mine).unwrap(), vec![mine]);
    let id: [u8; ID_BYTES] = std::array::from_fn(|i| i as u8);
    assert_eq!(nccl::share_id(Ok(id)).unwrap(), id);
    let e = nccl::share_id(Err("no NCCL".into())).unwrap_err();
    assert_eq!(e.msg, "rank 0 could not create the NCCL unique id: no NCCL");
    assert!(nccl::failed_ranks(true).unwrap().is_empty());
    assert_eq!(nccl::failed_ranks(false).unwrap(), vec![0]);
}

/// On a machine without NCCL the probe is one line, never a panic; with NCCL, its version.
#[cfg(feature = "cuda")]
#[test]
fn library_probe_is_one_line() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    match nccl::probe_library() {
        Ok(v) => {
            assert!(v.starts_with("NCCL 2."), "{v}");
            println!("found {v}");
        }
        Err(e) => {
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains("libnccl.so"), "{e}");
            println!("no NCCL here: {e}");
        }
    }
}

const CHILD: &str = "QGALORE_NCCL_TEST_CHILD";

/// What each rank runs under mpirun: the collective parts of the NCCL bootstrap over MPI
/// (the probe table, the id broadcast, the failure vote), with rows made up so that no GPU
/// or NCCL is needed.
fn rank_body() -> Result<usize, String> {
    let info = dist::init(Mode::Auto).map_err(|e| e.msg)?;
    let (r, n) = (info.rank, info.size);
    if n != 2 {
        return Err(format!("expected an MPI world of 2, got {info:?}"));
    }
    // every rank's row on every rank
    let mine = row(r == 0, 10 + r as u8, Select::Auto);
    let rows = nccl::gather(&mine).map_err(|e| e.msg)?;
    let want = vec![row(true, 10, Select::Auto), row(false, 11, Select::Auto)];
    if rows != want {
        return Err(format!("gathered rows {rows:?}, want {want:?}"));
    }
    // the same route on both ranks from them: host staging, refused under on
    match nccl::decide(&rows, r, None).map_err(|e| e.msg)? {
        Route::Host { notice: Some(n) } if n.starts_with("NCCL cannot be loaded on rank 1:") => {}
        other => return Err(format!("auto route {other:?}")),
    }
    if nccl::decide(&with(&rows, Select::On, false), r, None).is_ok() {
        return Err("on was accepted with rank 1 lacking NCCL".into());
    }
    // settings that differ travel in the rows: rank 1 asks for on, rank 0 for off
    let sel = if r == 0 { Select::Off } else { Select::On };
    let rows = nccl::gather(&Row { share_ok: r == 1, ..row(true, 20 + r as u8, sel) }).map_err(|e| e.msg)?;
    if rows[0].select != Select::Off || rows[1].select != Select::On || rows[0].share_ok || !rows[1].share_ok {
        return Err(format!("gathered settings {rows:?}"));
    }
    match nccl::decide(&rows, r, None) {
        Err(e) if e.msg.contains("differs across ranks: rank 1 differs from rank 0") => {}
        other => return Err(format!("differing settings gave {other:?}")),
    }
    // the unique id: rank 0's 128 bytes reach rank 1 whatever rank 1 passes
    let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 13 + 1) as u8);
    let got = nccl::share_id(if r == 0 { Ok(id) } else { Err(String::new()) }).map_err(|e| e.msg)?;
    if got != id {
        return Err(format!("shared id {got:?}"));
    }
    // rank 0 failing to create one fails both ranks, with its reason on rank 0
    let e = nccl::share_id(if r == 0 { Err("boom".into()) } else { Ok([9u8; ID_BYTES]) }).unwrap_err().msg;
    let want = if r == 0 { "rank 0 could not create the NCCL unique id: boom" } else { "rank 0 could not create the NCCL unique id" };
    if e != want {
        return Err(format!("id failure: {e}"));
    }
    // the vote after joining: rank 1 failed, both ranks know
    let failed = nccl::failed_ranks(r == 0).map_err(|e| e.msg)?;
    if failed != vec![1] {
        return Err(format!("failed ranks {failed:?}"));
    }
    dist::finalize().map_err(|e| e.msg)?;
    Ok(r)
}

#[test]
fn child() {
    if std::env::var(CHILD).is_err() {
        return; // only under mpirun (see `bootstrap_over_two_ranks`)
    }
    match rank_body() {
        Ok(r) => println!("NCCL-BOOT-OK {r}"),
        Err(e) => {
            println!("NCCL-BOOT-FAIL {e}");
            panic!("{e}");
        }
    }
}



#[test]
fn bootstrap_over_two_ranks() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let Some(mpirun) = mpirun_or_skip("the two-rank test") else {
        return;
    };
    let cmd = launch_two_ranks(&mpirun, &[(CHILD, "1")]);
    let (ok, text) = run_bounded(cmd, Duration::from_secs(180));
    assert!(ok, "mpirun -np 2 failed:\n{text}");
    for r in 0..2 {
        assert!(text.contains(&format!("NCCL-BOOT-OK {r}")), "rank {r} did not pass:\n{text}");
    }
}

/// The GPU check: a one-rank NCCL communicator on the CUDA backend's stream; the backend's
/// `allreduce_sum` must leave the buffer equal to its input (the sum over one rank), bit
/// for bit, and report that it ran on the device.
#[cfg(feature = "cuda")]
#[test]
fn one_rank_communicator() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    use qgalore::backend::cuda::{probe, Cuda};
    use qgalore::backend::{Category, Collectives, Memory};
    let require = std::env::var("QGALORE_REQUIRE_NCCL").as_deref() == Ok("1");
    let skip = |why: String| {
        assert!(!require, "QGALORE_REQUIRE_NCCL=1 but {why}");
        eprintln!("skipped: {why}");
    };
    if probe::device_count() == 0 {
        return skip("no GPU".into());
    }
    let version = match nccl::probe_library() {
        Ok(v) => v,
        Err(e) => return skip(e),
    };
    let be = Cuda::new(0, false).expect("CUDA backend");
    // a one-rank world has no MPI: nothing is summed before a communicator is given
    let n = 1 << 20 | 37;
    let input: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.001_37 - 0.37).collect();
    let mut buf = be.alloc(n, Category::Grads).unwrap();
    be.upload(&mut buf, &input).unwrap();
    assert!(!be.allreduce_sum(&mut buf, n).unwrap(), "a one-rank world summed without a communicator");
    let id = nccl::new_id().expect("NCCL unique id");
    let comm = nccl::Comm::new(be.stream(), 0, 1, &id).expect("one-rank NCCL communicator");
    assert_eq!((comm.rank(), comm.size()), (0, 1));
    be.use_nccl(comm);
    assert!(be.on_nccl());
    let before = dist::info().allreduce_bytes;
    assert!(be.allreduce_sum(&mut buf, n).unwrap(), "the backend did not use its communicator");
    be.sync().unwrap();
    assert_eq!(dist::info().allreduce_bytes - before, (n * 4) as u64);
    let out = be.to_host(&buf, n).unwrap();
    let bad = out.iter().zip(&input).position(|(a, b)| a.to_bits() != b.to_bits());
    assert!(bad.is_none(), "one-rank all-reduce changed element {:?}", bad);
    // a prefix only: the rest stays as it was
    assert!(be.allreduce_sum(&mut buf, 1000).unwrap());
    let out = be.to_host(&buf, n).unwrap();
    assert!(out.iter().zip(&input).all(|(a, b)| a.to_bits() == b.to_bits()));
    println!("NCCL one-rank all-reduce: {n} f32 values equal their input ({version}, {})", be.device_name());
}
