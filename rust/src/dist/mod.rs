//! Data-parallel communication: the process's place in a job launched by `mpirun`/`srun`, and
//! the collectives the training step needs (sum all-reduce, broadcast, barrier).
//!
//! One world per process. Until `init` succeeds every collective is the identity of a
//! one-rank job, so the engine calls them unconditionally and a one-process run never loads
//! an MPI library. MPI is driven from one thread at a time (`MPI_THREAD_SERIALIZED` under the
//! lock of `WORLD`); the engine's rayon workers never call it.
//!
//! No collective waits forever: each one is started non-blocking and polled (`MPI_Test`)
//! until it completes or the deadline passes (`QGALORE_DIST_TIMEOUT` seconds, default 600).
//! A rank whose collective does not complete in time, or fails in MPI, prints one line naming
//! the operation, its rank and the timeout, and ends the job (`MPI_Abort`): a hung or dead
//! rank never leaves the others waiting silently.

pub mod grads;
pub mod lowrank;
pub mod mpi;
pub mod nccl;
pub mod overlap;

use crate::error::{Error, Result};
use mpi::{Dtype, Mpi, Request, MAX_COUNT};
use serde::Serialize;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The environment variable that sets how long a collective may wait for the other ranks.
pub const TIMEOUT_ENV: &str = "QGALORE_DIST_TIMEOUT";
/// Default wait of one collective, in seconds: longer than any gap rank 0 leaves the others
/// waiting (a checkpoint save, an evaluation) on the models this engine trains on the CPU.
pub const DEFAULT_TIMEOUT_S: f64 = 600.0;
/// Allowed timeouts, in seconds.
pub const TIMEOUT_RANGE_S: (f64, f64) = (1.0, 86_400.0);

/// The collective timeout in milliseconds.
static TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_TIMEOUT_S as u64 * 1000);

/// Parses a timeout in seconds (`QGALORE_DIST_TIMEOUT`): a number from 1 to 86400.
pub fn parse_timeout(text: &str) -> Result<Duration> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= TIMEOUT_RANGE_S.0 && v <= TIMEOUT_RANGE_S.1 => Ok(Duration::from_secs_f64(v)),
        _ => Err(Error::invalid(format!(
            "{TIMEOUT_ENV}={text}: allowed seconds from {} to {} (default {}), the longest a collective waits for the other ranks",
            TIMEOUT_RANGE_S.0, TIMEOUT_RANGE_S.1, DEFAULT_TIMEOUT_S
        ))),
    }
}

/// Sets how long a collective may wait for the other ranks (1 s to 1 day).
pub fn set_timeout(limit: Duration) -> Result<()> {
    let s = limit.as_secs_f64();
    if !(TIMEOUT_RANGE_S.0..=TIMEOUT_RANGE_S.1).contains(&s) {
        return Err(Error::invalid(format!(
            "collective timeout = {s} s: allowed {} to {} s",
            TIMEOUT_RANGE_S.0, TIMEOUT_RANGE_S.1
        )));
    }
    TIMEOUT_MS.store(limit.as_millis() as u64, Ordering::Relaxed);
    Ok(())
}

/// How long a collective may wait for the other ranks.
pub fn timeout() -> Duration {
    Duration::from_millis(TIMEOUT_MS.load(Ordering::Relaxed))
}

/// What the launcher's environment says about this process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaunchEnv {
    /// `mpirun` (Open MPI), `pmi` (MPICH's Hydra, Intel MPI), `slurm` (srun).
    pub launcher: &'static str,
    pub rank: usize,
    pub size: usize,
}

fn env_usize(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<usize> {
    get(name).and_then(|v| v.trim().parse::<usize>().ok())
}

/// The launcher of this process from its environment, first found: Open MPI's
/// `OMPI_COMM_WORLD_RANK/SIZE`, PMI's `PMI_RANK/PMI_SIZE`, Slurm's
/// `SLURM_PROCID/SLURM_STEP_NUM_TASKS`. Slurm's size is the job step's (set by `srun` for
/// its tasks), not `SLURM_NTASKS`: a batch script of an allocation of N tasks also sees
/// `SLURM_PROCID=0` and `SLURM_NTASKS=N`, and a plain process started there is one process,
/// not rank 0 of N.
pub fn launch_env_from(get: &dyn Fn(&str) -> Option<String>) -> Option<LaunchEnv> {
    for (launcher, r, s) in [
        ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("pmi", "PMI_RANK", "PMI_SIZE"),
        ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
    ] {
        if let (Some(rank), Some(size)) = (env_usize(get, r), env_usize(get, s)) {
            if size >= 1 && rank < size {
                return Some(LaunchEnv { launcher, rank, size });
            }
        }
    }
    None
}

/// `launch_env_from` over the process environment.
pub fn launch_env() -> Option<LaunchEnv> {
    launch_env_from(&|k| std::env::var(k).ok())
}

/// The process's place in the job, as reported by `qg_dist_info`.
#[derive(Clone, Debug, Serialize)]
pub struct Info {
    /// `none` (one process, no library loaded) or `mpi`.
    pub backend: &'static str,
    pub rank: usize,
    pub size: usize,
    /// The launcher the environment names, if any.
    pub launcher: Option<&'static str>,
    /// The MPI library's path and version line (empty without one).
    pub library: String,
    pub version: String,
    /// MPI was finalized (no collective may run any more).
    pub finalized: bool,
    /// Bytes this rank has contributed to sum all-reduces so far (the buffers' sizes).
    pub allreduce_bytes: u64,
    /// Sum all-reduces started so far (blocking and non-blocking, each piece counted).
    pub allreduce_calls: u64,
    /// Seconds a collective waits for the other ranks before the job is ended.
    pub timeout_s: f64,
    /// What the data-parallel steps sent, by category (`lowrank::CommBytes`).
    pub comm: lowrank::CommBytes,
}

static ALLREDUCE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static ALLREDUCE_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_allreduce(bytes: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    ALLREDUCE_BYTES.fetch_add(bytes as u64, Relaxed);
    ALLREDUCE_CALLS.fetch_add(1, Relaxed);
}

struct World {
    mpi: Option<Mpi>,
    rank: usize,
    size: usize,
    launcher: Option<&'static str>,
    finalized: bool,
    /// The parent process when MPI started (the launcher's daemon: `mpirun`, `orted`,
    /// `slurmstepd`); 0 when unknown.
    parent: u32,
}

static WORLD: Mutex<World> = Mutex::new(World { mpi: None, rank: 0, size: 1, launcher: None, finalized: false, parent: 0 });

/// This process's parent (0 where there is no such notion).
fn parent_pid() -> u32 {
    #[cfg(unix)]
    {
        std::os::unix::process::parent_id()
    }
    #[cfg(not(unix))]
    {
        0
    }
}

fn world() -> std::sync::MutexGuard<'static, World> {
    WORLD.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    fn info(&self) -> Info {
        Info {
            backend: if self.mpi.is_some() { "mpi" } else { "none" },
            rank: self.rank,
            size: self.size,
            launcher: self.launcher,
            library: self.mpi.as_ref().map(|m| m.path.clone()).unwrap_or_default(),
            version: self.mpi.as_ref().map(|m| m.version.clone()).unwrap_or_default(),
            finalized: self.finalized,
            allreduce_bytes: ALLREDUCE_BYTES.load(std::sync::atomic::Ordering::Relaxed),
            allreduce_calls: ALLREDUCE_CALLS.load(std::sync::atomic::Ordering::Relaxed),
            timeout_s: timeout().as_secs_f64(),
            comm: lowrank::report(),
        }
    }

    /// Ends the job after a collective that cannot complete: one line on stderr naming
    /// this rank and what failed, then `MPI_Abort` (every rank of the job ends).
    fn die(&self, m: &Mpi, what: &str) -> ! {
        self.say(&format!("{what}; ending the job"));
        m.abort(1);
        // MPI_Abort does not return; should it, the process still ends
        std::process::exit(1)
    }

    /// One line on stderr naming this rank.
    fn say(&self, what: &str) {
        use std::io::Write;
        let line = format!("error: rank {} of {}: {what}", self.rank, self.size);
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{}", line.replace('\n', " "));
        let _ = err.flush();
    }

    /// Waits for `reqs` (started by `op`, `bytes` long in all): polls them until they
    /// complete, yielding the processor in between (short waits), then sleeping 0.5 ms (long
    /// ones: a rank saving a checkpoint). Past the deadline, or when MPI fails, ends the job.
    fn wait_all(&self, m: &Mpi, reqs: &mut Vec<Request>, op: &str, bytes: usize) {
        let op = &what_op(op, bytes);
        let limit = timeout();
        let start = Instant::now();
        while !reqs.is_empty() {
            let mut i = 0;
            while i < reqs.len() {
                match m.test(&mut reqs[i]) {
                    Ok(true) => {
                        reqs.swap_remove(i);
                    }
                    Ok(false) => i += 1,
                    Err(e) => self.die(m, &format!("{op} failed: {} (another rank may have died)", e.msg)),
                }
            }
            if reqs.is_empty() {
                break;
            }
            let waited = start.elapsed();
            if waited >= limit {
                self.die(
                    m,
                    &format!(
                        "{op} did not complete within {} s ({TIMEOUT_ENV}): another rank is hung or dead",
                        fmt_secs(limit.as_secs_f64())
                    ),
                );
            }
            if waited < Duration::from_millis(50) {
                std::thread::yield_now();
            } else {
                // the launcher gone (the job torn down while this rank waited, e.g. after
                // another rank was killed): nobody is left to abort through, so end alone
                if self.parent > 1 && parent_pid() != self.parent {
                    self.say(&format!("{op} abandoned: the launcher that started this rank (process {}) has ended; ending this rank", self.parent));
                    std::process::exit(1);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }

    /// Starts a collective with `start` (MPI's error ends the job, see `die`).
    fn started(&self, m: &Mpi, op: &str, bytes: usize, start: Result<Request>) -> Request {
        match start {
            Ok(r) => r,
            Err(e) => self.die(m, &format!("{} could not start: {}", what_op(op, bytes), e.msg)),
        }
    }

    /// The MPI to run a collective on: None for a one-rank world.
    fn comm(&self) -> Result<Option<&Mpi>> {
        if self.finalized {
            return Err(Error::invalid("distributed run already finalized: no collective may run after qg_dist_finalize"));
        }
        Ok(self.mpi.as_ref().filter(|_| self.size > 1))
    }
}

/// The operation as the line that ends a job names it: `MPI_Allreduce of 4.0 KiB`, `MPI_Barrier`.
fn what_op(op: &str, bytes: usize) -> String {
    if op == "MPI_Barrier" {
        op.to_string()
    } else {
        format!("{op} of {}", human_bytes(bytes))
    }
}

/// `12 B`, `4.0 KiB`, `1.5 MiB`, `2.0 GiB`.
fn human_bytes(n: usize) -> String {
    let n = n as f64;
    if n < 1024.0 {
        format!("{n} B")
    } else if n < 1024.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else if n < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else {
        format!("{:.1} GiB", n / (1024.0 * 1024.0 * 1024.0))
    }
}

/// Seconds as given: `600`, `2.5`.
fn fmt_secs(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

/// How `init` decides whether to start MPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// MPI when a launcher is named in the environment, else one process without MPI.
    Auto,
    /// MPI always (a singleton `MPI_Init` when no launcher started the process).
    Mpi,
    /// Never MPI: a one-rank world even under a launcher.
    Off,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "" | "auto" => Ok(Mode::Auto),
            "mpi" => Ok(Mode::Mpi),
            "off" | "none" => Ok(Mode::Off),
            other => Err(Error::invalid(format!("dist backend = {other:?}: allowed auto, mpi, off"))),
        }
    }
}

/// Joins the job: loads MPI and initializes it when `mode` asks for it, then returns the
/// process's rank and the world size. Idempotent; after `finalize` it is an error.
pub fn init(mode: Mode) -> Result<Info> {
    let mut w = world();
    if w.finalized {
        return Err(Error::invalid("distributed run already finalized: MPI cannot start twice in one process"));
    }
    if w.mpi.is_some() {
        return Ok(w.info());
    }
    if let Ok(text) = std::env::var(TIMEOUT_ENV) {
        set_timeout(parse_timeout(&text)?)?;
    }
    let env = launch_env();
    w.launcher = env.as_ref().map(|e| e.launcher);
    let want = match mode {
        Mode::Off => false,
        Mode::Mpi => true,
        Mode::Auto => env.is_some(),
    };
    if !want {
        w.rank = 0;
        w.size = 1;
        return Ok(w.info());
    }
    let mpi = Mpi::load().map_err(|e| match &env {
        Some(env) => Error::backend(format!("launched by {} as rank {} of {}, but {}", env.launcher, env.rank, env.size, e.msg)),
        None => e,
    })?;
    let (rank, size) = mpi.init()?;
    if let Some(env) = &env {
        if env.size != size || env.rank != rank {
            let _ = mpi.finalize();
            return Err(Error::backend(format!(
                "{} started rank {} of {} but MPI ({}) sees rank {rank} of {size}: the launcher and the MPI library do not match (use Open MPI's own mpirun, or srun --mpi=pmix)",
                env.launcher, env.rank, env.size, mpi.path
            )));
        }
    }
    w.rank = rank;
    w.size = size;
    w.mpi = Some(mpi);
    w.parent = if env.is_some() { parent_pid() } else { 0 };
    Ok(w.info())
}

/// The current world (a one-rank world before `init`).
pub fn info() -> Info {
    world().info()
}

pub fn rank() -> usize {
    world().rank
}

pub fn size() -> usize {
    world().size
}

/// Ends MPI (`MPI_Finalize`); every collective fails afterwards. A no-op without MPI.
pub fn finalize() -> Result<()> {
    let mut w = world();
    if w.finalized {
        return Ok(());
    }
    if let Some(m) = &w.mpi {
        m.finalize()?;
        w.finalized = true;
    }
    Ok(())
}

/// Ends every rank of the job with `code` (`MPI_Abort`); without MPI, returns.
pub fn abort(code: i32) {
    let w = world();
    if let (Some(m), false) = (&w.mpi, w.finalized) {
        m.abort(code);
    }
}

/// Waits until every rank arrives (`MPI_Ibarrier` under the deadline).
pub fn barrier() -> Result<()> {
    let w = world();
    let Some(m) = w.comm()? else { return Ok(()) };
    let mut reqs = vec![w.started(m, "MPI_Barrier", 0, m.ibarrier())];
    w.wait_all(m, &mut reqs, "MPI_Barrier", 0);
    Ok(())
}

/// Element types a sum all-reduce carries.
pub trait Element: Copy + 'static {
    const DTYPE: Dtype;
}
impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl Element for f64 {
    const DTYPE: Dtype = Dtype::F64;
}

/// Sums `buf` over every rank in place (in pieces of at most 2^30 elements). Every rank gets
/// the same bits: MPI's reduction is deterministic for a given world and count.
pub fn allreduce_sum<T: Element>(buf: &mut [T]) -> Result<()> {
    let w = world();
    let Some(m) = w.comm()? else { return Ok(()) };
    for piece in buf.chunks_mut(MAX_COUNT) {
        let bytes = std::mem::size_of_val(piece);
        count_allreduce(bytes);
        let start = unsafe { m.iallreduce_sum(piece.as_mut_ptr() as *mut _, piece.len(), T::DTYPE) };
        let mut reqs = vec![w.started(m, "MPI_Allreduce", bytes, start)];
        w.wait_all(m, &mut reqs, "MPI_Allreduce", bytes);
    }
    Ok(())
}

/// Copies `root`'s `buf` into every rank's `buf` (every rank passes the same length).
pub fn bcast(buf: &mut [u8], root: usize) -> Result<()> {
    let w = world();
    let Some(m) = w.comm()? else { return Ok(()) };
    if root >= w.size {
        return Err(Error::invalid(format!("broadcast root = {root}: allowed 0..{}", w.size)));
    }
    for piece in buf.chunks_mut(MAX_COUNT) {
        let start = unsafe { m.ibcast(piece.as_mut_ptr() as *mut _, piece.len(), root) };
        let mut reqs = vec![w.started(m, "MPI_Bcast", piece.len(), start)];
        w.wait_all(m, &mut reqs, "MPI_Bcast", piece.len());
    }
    Ok(())
}

/// A non-blocking sum all-reduce in flight; the buffer stays borrowed until `wait` (dropping
/// it waits too, so the buffer is never released under MPI's feet).
pub struct Pending<'a> {
    reqs: Vec<Request>,
    /// Bytes summed (for the line that ends a job whose sum never completes).
    bytes: usize,
    _buf: PhantomData<&'a mut [u8]>,
}

impl Pending<'_> {
    /// Waits for the sum; afterwards the buffer holds it on every rank. A sum that does not
    /// complete within the collective timeout ends the job (see the module's notes).
    pub fn wait(mut self) -> Result<()> {
        self.finish()
    }

    /// Drives progress and says whether the sum is complete (no wait).
    pub fn test(&mut self) -> Result<bool> {
        if self.reqs.is_empty() {
            return Ok(true);
        }
        let w = world();
        let Some(m) = w.mpi.as_ref() else { return Ok(true) };
        let mut all = true;
        for r in &mut self.reqs {
            all &= m.test(r)?;
        }
        Ok(all)
    }

    fn finish(&mut self) -> Result<()> {
        if self.reqs.is_empty() {
            return Ok(());
        }
        let w = world();
        let Some(m) = w.mpi.as_ref() else { return Ok(()) };
        w.wait_all(m, &mut self.reqs, "MPI_Iallreduce", self.bytes);
        Ok(())
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Starts a sum all-reduce of `buf` over every rank (`MPI_Iallreduce`) and returns at once.
pub fn iallreduce_sum<T: Element>(buf: &mut [T]) -> Result<Pending<'_>> {
    let w = world();
    let mut reqs = Vec::new();
    let bytes = std::mem::size_of_val(buf);
    if let Some(m) = w.comm()? {
        for piece in buf.chunks_mut(MAX_COUNT) {
            count_allreduce(std::mem::size_of_val(piece));
            let start = unsafe { m.iallreduce_sum(piece.as_mut_ptr() as *mut _, piece.len(), T::DTYPE) };
            reqs.push(w.started(m, "MPI_Iallreduce", bytes, start));
        }
    }
    Ok(Pending { reqs, bytes, _buf: PhantomData })
}

/// Checks that every rank holds the same `bytes` (for example the hash of its resolved
/// options): rank 0's copy is broadcast, each rank compares, and the ranks that differ are
/// counted on every rank, so all of them refuse together with the same line naming them.
pub fn check_same(what: &str, bytes: &[u8]) -> Result<()> {
    let size = size();
    if size <= 1 {
        return Ok(());
    }
    let mut len = (bytes.len() as u64).to_le_bytes();
    bcast(&mut len, 0)?;
    let n = u64::from_le_bytes(len) as usize;
    let mut root = if rank() == 0 { bytes.to_vec() } else { vec![0u8; n] };
    bcast(&mut root, 0)?;
    let mut differs = vec![0f64; size];
    differs[rank()] = if root.as_slice() == bytes { 0.0 } else { 1.0 };
    allreduce_sum(&mut differs)?;
    let bad: Vec<String> = differs.iter().enumerate().filter(|(_, &d)| d != 0.0).map(|(r, _)| r.to_string()).collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} differs across ranks: rank{} {} differ{} from rank 0; every rank must be started with the same options",
            if bad.len() > 1 { "s" } else { "" },
            bad.join(", "),
            if bad.len() > 1 { "" } else { "s" }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launcher_from_environment() {
        assert_eq!(launch_env_from(&env(&[])), None);
        let e = launch_env_from(&env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]));
        assert_eq!(e, Some(LaunchEnv { launcher: "mpirun", rank: 1, size: 4 }));
        let e = launch_env_from(&env(&[("PMI_RANK", "2"), ("PMI_SIZE", "3")]));
        assert_eq!(e, Some(LaunchEnv { launcher: "pmi", rank: 2, size: 3 }));
        // srun's task: the step's size, whatever the allocation's
        let e = launch_env_from(&env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "4"), ("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_STEP_ID", "0")]));
        assert_eq!(e, Some(LaunchEnv { launcher: "slurm", rank: 1, size: 2 }));
        // a rank outside the world, or garbage, names no launcher
        assert_eq!(launch_env_from(&env(&[("SLURM_PROCID", "2"), ("SLURM_STEP_NUM_TASKS", "2")])), None);
        assert_eq!(launch_env_from(&env(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])), None);
    }

    #[test]
    fn launcher_under_slurm() {
        // an sbatch script of 4 tasks (no srun step): one plain process, not rank 0 of 4
        let batch = [("SLURM_JOB_ID", "77"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_NPROCS", "4")];
        assert_eq!(launch_env_from(&env(&batch)), None);
        // mpirun inside that allocation: Open MPI's variables win over the allocation's
        let mut v = batch.to_vec();
        v.extend([("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        assert_eq!(launch_env_from(&env(&v)), Some(LaunchEnv { launcher: "mpirun", rank: 3, size: 4 }));
        // srun --mpi=pmi2: PMI's variables (the same numbers) come first
        let pmi2 = [("SLURM_PROCID", "1"), ("SLURM_STEP_NUM_TASKS", "2"), ("PMI_RANK", "1"), ("PMI_SIZE", "2")];
        assert_eq!(launch_env_from(&env(&pmi2)), Some(LaunchEnv { launcher: "pmi", rank: 1, size: 2 }));
        // srun --mpi=pmix (PMIX_RANK, no PMI_SIZE): Slurm's step variables
        let pmix = [("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "8"), ("PMIX_RANK", "0")];
        assert_eq!(launch_env_from(&env(&pmix)), Some(LaunchEnv { launcher: "slurm", rank: 0, size: 8 }));
        // a one-task step is a world of one (init then runs MPI as a singleton, or not at all)
        assert_eq!(
            launch_env_from(&env(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")])),
            Some(LaunchEnv { launcher: "slurm", rank: 0, size: 1 })
        );
        // size 0 or a negative rank are not a launch
        assert_eq!(launch_env_from(&env(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "0")])), None);
        assert_eq!(launch_env_from(&env(&[("PMI_RANK", "-1"), ("PMI_SIZE", "2")])), None);
        // a half-set pair falls through to the next launcher
        let half = [("OMPI_COMM_WORLD_RANK", "0"), ("SLURM_PROCID", "1"), ("SLURM_STEP_NUM_TASKS", "2")];
        assert_eq!(launch_env_from(&env(&half)), Some(LaunchEnv { launcher: "slurm", rank: 1, size: 2 }));
    }

    #[test]
    fn timeout_parse() {
        assert_eq!(parse_timeout("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_timeout(" 2.5 ").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse_timeout("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_timeout("86400").unwrap(), Duration::from_secs(86_400));
        for bad in ["0", "0.5", "86401", "-3", "abc", "", "inf", "NaN", "10s"] {
            let e = parse_timeout(bad).unwrap_err();
            assert_eq!(
                e.msg,
                format!("QGALORE_DIST_TIMEOUT={bad}: allowed seconds from 1 to 86400 (default 600), the longest a collective waits for the other ranks")
            );
        }
        assert!(set_timeout(Duration::from_millis(500)).is_err());
        assert!(set_timeout(Duration::from_secs(100_000)).is_err());
        assert_eq!(timeout(), Duration::from_secs(600));
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(fmt_secs(600.0), "600");
        assert_eq!(fmt_secs(2.5), "2.5");
        assert_eq!(what_op("MPI_Bcast", 5), "MPI_Bcast of 5 B");
        assert_eq!(what_op("MPI_Barrier", 0), "MPI_Barrier");
    }

    #[test]
    fn mode_parse() {
        assert_eq!(Mode::parse("auto").unwrap(), Mode::Auto);
        assert_eq!(Mode::parse("").unwrap(), Mode::Auto);
        assert_eq!(Mode::parse("mpi").unwrap(), Mode::Mpi);
        assert_eq!(Mode::parse("off").unwrap(), Mode::Off);
        let e = Mode::parse("nccl2").unwrap_err();
        assert!(e.msg.contains("allowed auto, mpi, off"), "{}", e.msg);
    }
}
