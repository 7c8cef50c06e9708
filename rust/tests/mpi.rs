//! MPI collectives over two real ranks: `mpirun -np 2` runs this test binary's `child` test
//! (over the loopback interface), which checks every collective's result exactly. Skipped
//! with a message when `mpirun` is absent, unless `QGALORE_REQUIRE_MPI=1` (CI), where that
//! fails.

use qgalore::dist::{self, Mode};
mod common;
use common::mpi::*;
use std::time::Duration;

const CHILD: &str = "QGALORE_MPI_TEST_CHILD";

/// The values rank `r` contributes at index `i`: not integers, so a wrong or partial sum
/// cannot pass by accident.
fn value32(r: usize, i: usize) -> f32 {
    ((i * 7919 + r * 104_729) % 1000) as f32 * 0.001_37 - 0.37
}

fn value64(r: usize, i: usize) -> f64 {
    ((i * 6007 + r * 15_485_863) % 10_007) as f64 * 1.0e-3 / 3.0 - 1.5
}

/// The body each rank runs under mpirun.
fn rank_body() -> Result<usize, String> {
    let info = dist::init(Mode::Auto).map_err(|e| e.msg)?;
    let (r, n) = (info.rank, info.size);
    if info.backend != "mpi" || n != 2 {
        return Err(format!("expected an MPI world of 2, got {info:?}"));
    }
    if info.launcher != Some("mpirun") {
        return Err(format!("launcher not detected from the environment: {info:?}"));
    }
    // sum all-reduce, f32 and f64: with two ranks a + b is exact and order-free
    let len = 4099;
    let mut a: Vec<f32> = (0..len).map(|i| value32(r, i)).collect();
    dist::allreduce_sum(&mut a).map_err(|e| e.msg)?;
    for (i, v) in a.iter().enumerate() {
        let want = value32(0, i) + value32(1, i);
        if v.to_bits() != want.to_bits() {
            return Err(format!("f32 sum at {i}: {v} != {want}"));
        }
    }
    let mut b: Vec<f64> = (0..len).map(|i| value64(r, i)).collect();
    dist::allreduce_sum(&mut b).map_err(|e| e.msg)?;
    for (i, v) in b.iter().enumerate() {
        let want = value64(0, i) + value64(1, i);
        if v.to_bits() != want.to_bits() {
            return Err(format!("f64 sum at {i}: {v} != {want}"));
        }
    }
    // broadcast from rank 0, then from rank 1
    let msg = b"qgalore: rank 0 speaks";
    let mut buf = if r == 0 { msg.to_vec() } else { vec![0u8; msg.len()] };
    dist::bcast(&mut buf, 0).map_err(|e| e.msg)?;
    if buf != msg {
        return Err(format!("broadcast from 0: got {buf:?}"));
    }
    let mut buf = vec![r as u8 + 10; 7];
    dist::bcast(&mut buf, 1).map_err(|e| e.msg)?;
    if buf != vec![11u8; 7] {
        return Err(format!("broadcast from 1: got {buf:?}"));
    }
    if dist::bcast(&mut buf, 2).is_ok() {
        return Err("a broadcast root outside the world was accepted".into());
    }
    // non-blocking all-reduce: work in between, then wait
    let mut c: Vec<f32> = (0..len).map(|i| value32(r, len - i)).collect();
    let mut pending = dist::iallreduce_sum(&mut c).map_err(|e| e.msg)?;
    let busy: f64 = (0..100_000).map(|i| (i as f64).sqrt()).sum();
    let _ = pending.test().map_err(|e| e.msg)?;
    pending.wait().map_err(|e| e.msg)?;
    for (i, v) in c.iter().enumerate() {
        let want = value32(0, len - i) + value32(1, len - i);
        if v.to_bits() != want.to_bits() {
            return Err(format!("iallreduce sum at {i}: {v} != {want} (busy {busy})"));
        }
    }
    // the same options pass; options that differ on rank 1 are refused on both ranks
    dist::check_same("options hash", b"same-hash").map_err(|e| e.msg)?;
    let mine = if r == 0 { b"hash-aaaa".to_vec() } else { b"hash-bbbb".to_vec() };
    match dist::check_same("options hash", &mine) {
        Ok(()) => return Err("differing options were accepted".into()),
        Err(e) if e.msg == "options hash differs across ranks: rank 1 differs from rank 0; every rank must be started with the same options" => {}
        Err(e) => return Err(format!("wrong refusal: {}", e.msg)),
    }
    // a hash of another length differs too
    let mine = if r == 0 { b"short".to_vec() } else { b"longer-hash".to_vec() };
    if dist::check_same("options hash", &mine).is_ok() {
        return Err("a hash of another length was accepted".into());
    }
    // bytes counted: 4099 f32 + 4099 f64 + 4099 f32 (iallreduce) + the check_same counts
    // (3 calls of 2 f64)
    let after = dist::info();
    let want = (4099 * 4 + 4099 * 8 + 4099 * 4 + 3 * 2 * 8) as u64;
    if after.allreduce_bytes != want || after.allreduce_calls != 6 {
        return Err(format!("all-reduce counters: {} bytes in {} calls, want {want} in 6", after.allreduce_bytes, after.allreduce_calls));
    }
    // an engine that would form R from the factors (one process only) is refused on every
    // rank before anything is allocated or summed
    let mut c = common::engine_cfg(common::tiny_model(64, 64, 128, 4, 2, 2), 2, 16, 5);
    c.optimizer = common::optim("galore", 0.0);
    c.optimizer.proj_grad = qgalore::config::ProjGrad::Factored;
    let want = "proj_grad factored is for one process (the ranks of a data-parallel run sum whole gradients or their projections, dp_comm): use proj_grad full";
    match qgalore::train::Engine::new(qgalore::backend::cpu::Cpu::new(1).map_err(|e| e.msg)?, c) {
        Err(e) if e.msg == want => {}
        Err(e) => return Err(format!("proj_grad factored under MPI: {}", e.msg)),
        Ok(_) => return Err("proj_grad factored was accepted in a 2-rank run".into()),
    }
    dist::barrier().map_err(|e| e.msg)?;
    dist::finalize().map_err(|e| e.msg)?;
    if dist::allreduce_sum(&mut [1.0f32]).is_ok() {
        return Err("a collective after finalize was accepted".into());
    }
    Ok(r)
}

#[test]
fn child() {
    if std::env::var(CHILD).is_err() {
        return; // only under mpirun (see `two_ranks`)
    }
    match rank_body() {
        Ok(r) => println!("MPI-RANK-OK {r}"),
        Err(e) => {
            println!("MPI-RANK-FAIL {e}");
            panic!("{e}");
        }
    }
}



#[test]
fn two_ranks() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let Some(mpirun) = mpirun_or_skip("the two-rank test") else {
        return;
    };
    let mut cmd = launch_two_ranks(&mpirun, &[(CHILD, "1")]);
    // `refuses_a_library_that_is_not_open_mpi` sets it in this process meanwhile
    cmd.env_remove("QGALORE_MPI_LIB");
    let (ok, text) = run_bounded(cmd, Duration::from_secs(180));
    assert!(ok, "mpirun -np 2 failed:\n{text}");
    for r in 0..2 {
        assert!(text.contains(&format!("MPI-RANK-OK {r}")), "rank {r} did not pass:\n{text}");
    }
}

#[test]
fn refuses_a_library_that_is_not_open_mpi() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    // the only test in this binary that reads QGALORE_MPI_LIB
    std::env::set_var("QGALORE_MPI_LIB", "/nonexistent/libmpi.so");
    let e = dist::init(Mode::Mpi).unwrap_err();
    assert!(e.msg.starts_with("no MPI library found (tried /nonexistent/libmpi.so ("), "{}", e.msg);
    assert!(e.msg.contains("apt-get install openmpi-bin libopenmpi-dev"), "{}", e.msg);
    assert!(!e.msg.contains('\n'));
    std::env::set_var("QGALORE_MPI_LIB", "libc.so.6");
    let e = dist::init(Mode::Mpi).unwrap_err();
    assert_eq!(e.msg, "libc.so.6 is not an MPI library (no MPI_Init_thread): set QGALORE_MPI_LIB to Open MPI's libmpi.so");
    std::env::remove_var("QGALORE_MPI_LIB");
    // nothing was started: a one-rank world whose collectives are the identity
    let info = dist::info();
    assert_eq!((info.backend, info.rank, info.size), ("none", 0, 1));
    let mut v = [1.5f32, -2.0];
    dist::allreduce_sum(&mut v).unwrap();
    assert_eq!(v, [1.5, -2.0]);
    // off: never MPI, even when asked twice
    let info = dist::init(Mode::Off).unwrap();
    assert_eq!((info.backend, info.size), ("none", 1));
}
