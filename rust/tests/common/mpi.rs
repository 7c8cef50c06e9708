//! Two-rank launches for the MPI tests: a test binary runs its own `child` test under
//! `mpirun -np 2` over the loopback interface and reads what both ranks printed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `mpirun` on PATH; None (with a note on stderr) when it is absent, unless
/// `QGALORE_REQUIRE_MPI=1` (CI), where its absence fails the test.
pub fn mpirun_or_skip(what: &str) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join("mpirun"))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string());
    if found.is_none() {
        if std::env::var("QGALORE_REQUIRE_MPI").as_deref() == Ok("1") {
            panic!(
                "mpirun not found but QGALORE_REQUIRE_MPI=1 (install openmpi-bin libopenmpi-dev)"
            );
        }
        eprintln!("skipped: mpirun not found (install openmpi-bin libopenmpi-dev to run {what})");
    }
    found
}

/// `mpirun -np 2` (loopback TCP, oversubscribed, allowed as root) running this binary's
/// `child` test, with each of `env` set and exported to both ranks.
pub fn launch_two_ranks(mpirun: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(mpirun);
    cmd.args([
        "-np",
        "2",
        "--oversubscribe",
        "--mca",
        "btl",
        "self,tcp",
        "--mca",
        "btl_tcp_if_include",
        "lo",
    ]);
    for (k, v) in env {
        cmd.args(["-x", k]).env(k, v);
    }
    cmd.arg(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    cmd
}

/// Runs `cmd` to completion or kills it after `limit`; returns (exit ok, stdout + stderr).
pub fn run_bounded(mut cmd: Command, limit: Duration) -> (bool, String) {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path =
        std::env::temp_dir().join(format!("qgalore-mpi-test-{}-{n}.log", std::process::id()));
    let file = std::fs::File::create(&out_path).unwrap();
    let mut child = cmd
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start mpirun");
    let start = Instant::now();
    let ok = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    (ok, text)
}
