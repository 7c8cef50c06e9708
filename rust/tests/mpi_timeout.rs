//! Collectives that cannot complete end the job in bounded time: under `mpirun -np 2`, rank 1
//! sleeps instead of joining a collective, and rank 0, with `QGALORE_DIST_TIMEOUT=2`, prints one
//! line naming the operation, its rank and the timeout, then `MPI_Abort` ends both ranks (rank 1
//! is killed long before its sleep ends). Each collective's wait is checked: the blocking
//! all-reduce, the broadcast, the barrier and a non-blocking all-reduce's `wait`. Skipped with a
//! message when `mpirun` is absent, unless `QGALORE_REQUIRE_MPI=1`.

use qgalore::dist::{self, Mode};
mod common;
use common::mpi::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

const CHILD: &str = "QGALORE_MPI_TIMEOUT_CHILD";

/// Rank 0 runs the collective `op`; rank 1 never joins (it sleeps 60 s).
fn rank_body(op: &str) -> Result<(), String> {
    let info = dist::init(Mode::Auto).map_err(|e| e.msg)?;
    if info.size != 2 || (info.timeout_s - 2.0).abs() > 1e-9 {
        return Err(format!("expected 2 ranks and a 2 s timeout: {info:?}"));
    }
    // both ranks meet once, so the wait below is the only one that cannot complete
    dist::barrier().map_err(|e| e.msg)?;
    if info.rank == 1 {
        println!("RANK-1-SLEEPS");
        std::thread::sleep(Duration::from_secs(60));
        return Err("rank 1 outlived the job".into());
    }
    let mut v = [1.0f64, 2.0];
    let mut b = [7u8; 5];
    match op {
        "allreduce" => dist::allreduce_sum(&mut v).map_err(|e| e.msg)?,
        // from rank 1: a root sends a small broadcast without waiting for anyone
        "bcast" => dist::bcast(&mut b, 1).map_err(|e| e.msg)?,
        "barrier" => dist::barrier().map_err(|e| e.msg)?,
        "iallreduce" => {
            let mut w = [1.0f32; 3];
            let p = dist::iallreduce_sum(&mut w).map_err(|e| e.msg)?;
            p.wait().map_err(|e| e.msg)?
        }
        other => return Err(format!("unknown op {other}")),
    }
    Err(format!("{op} completed without rank 1"))
}

#[test]
fn child() {
    let Ok(op) = std::env::var(CHILD) else { return };
    if let Err(e) = rank_body(&op) {
        println!("MPI-TIMEOUT-FAIL {e}");
        panic!("{e}");
    }
}

#[test]
fn a_collective_that_cannot_complete_ends_the_job() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let Some(mpirun) = mpirun_or_skip("the timeout test") else {
        return;
    };
    for (op, name, bytes) in [
        ("allreduce", "MPI_Allreduce", "16 B"),
        ("bcast", "MPI_Bcast", "5 B"),
        ("barrier", "MPI_Barrier", ""),
        ("iallreduce", "MPI_Iallreduce", "12 B"),
    ] {
        let start = Instant::now();
        let out = launch_two_ranks(&mpirun, &[(CHILD, op), ("QGALORE_DIST_TIMEOUT", "2")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("start mpirun");
        let took = start.elapsed();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{op}: the job succeeded:\n{text}");
        assert!(text.contains("RANK-1-SLEEPS"), "{op}: rank 1 never got to its sleep:\n{text}");
        // the 2 s wait plus start-up and tear-down, far below rank 1's 60 s sleep
        assert!(took < Duration::from_secs(40), "{op}: the job took {took:?}:\n{text}");
        let what = if bytes.is_empty() { name.to_string() } else { format!("{name} of {bytes}") };
        let want = format!("error: rank 0 of 2: {what} did not complete within 2 s (QGALORE_DIST_TIMEOUT): another rank is hung or dead; ending the job");
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors, vec![want.as_str()], "{op}:\n{text}");
        assert!(!text.contains("MPI-TIMEOUT-FAIL") && !text.contains("panicked"), "{op}:\n{text}");
    }
}
