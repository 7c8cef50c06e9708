//! NCCL between GPUs: in a data-parallel job on the CUDA backend (an MPI world of more than
//! one rank), the ranks' gradients are summed on the devices by NCCL instead of being staged
//! through host memory and MPI.
//!
//! NCCL is loaded at run time through cudarc's `nccl` feature, like the other CUDA
//! libraries; nothing is needed at build time. MPI bootstraps it: rank 0 creates the NCCL
//! unique id, `dist::bcast` carries its 128 bytes to every rank, and every rank creates its
//! communicator on its own device (device = local rank modulo the visible devices,
//! `device_for`) and on the backend's stream, where the sums then run in place.
//!
//! The sum is an all-reduce, the primitive docs/algorithm-spec.md §2.9 names (the reference
//! all-gathers every rank's float gradient instead). It should leave every rank the same bits
//! (NCCL reduces each chunk once and copies it to every rank: ring = reduce-scatter then
//! all-gather, tree = reduce then broadcast; not checked on hardware), so every rank applies
//! the same update and INT8 weights stay identical without a broadcast, as on the MPI path.
//!
//! `QGALORE_DIST_NCCL` selects: `auto` (the default: NCCL when every rank can load it and
//! every rank has its own GPU, else host staging through MPI with a one-line notice on
//! rank 0), `on` (NCCL or a one-line refusal on every rank), `off` (host staging always).
//! Two ranks on one GPU are refused (NCCL cannot run them, and it is rarely meant) unless
//! `QGALORE_DIST_SHARE_DEVICE=1`, which lets them share it through host staging.
//!
//! The decision is collective: every rank contributes its probe (can it load NCCL, which
//! GPU it runs on) to one all-gather (`gather`, a sum all-reduce of a table with one row
//! per rank), so every rank takes the same route from the same table (`decide`) and no rank
//! waits in NCCL for a rank that went through MPI.
//!
//! Status: written and unit-tested without a GPU or an NCCL library; the device path (the
//! communicator, the device all-reduce) has never run. `rust/tests/nccl.rs` holds its
//! one-GPU check (a one-rank communicator), run by `tools/gpu-check.sh device`.

use super::{allreduce_sum, bcast, rank, size};
use crate::error::{Error, Result};

/// The variable selecting the GPU collective.
pub const ENV_SELECT: &str = "QGALORE_DIST_NCCL";
/// The variable allowing two ranks on one GPU (through host staging).
pub const ENV_SHARE: &str = "QGALORE_DIST_SHARE_DEVICE";
/// Bytes of an NCCL unique id (`ncclUniqueId`, `NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;
/// Bytes rank 0 broadcasts: a status byte (1: the id follows; 0: rank 0 could not create
/// one) and the id.
pub const ID_MSG_BYTES: usize = 1 + ID_BYTES;
/// Bytes of a device's UUID (`CUuuid`), which tells whether two ranks share a GPU.
pub const UUID_BYTES: usize = 16;

/// How gradients of the CUDA backend cross ranks (`QGALORE_DIST_NCCL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    /// NCCL when every rank can use it, else host staging through MPI (with a notice).
    Auto,
    /// NCCL, or a refusal naming what is missing.
    On,
    /// Host staging through MPI.
    Off,
}

impl Select {
    pub fn parse(s: &str) -> Result<Select> {
        match s.trim() {
            "" | "auto" => Ok(Select::Auto),
            "on" => Ok(Select::On),
            "off" => Ok(Select::Off),
            other => Err(Error::invalid(format!("{ENV_SELECT}={other}: allowed auto, on, off"))),
        }
    }

    /// The selection named by `QGALORE_DIST_NCCL` in `get`'s environment (auto when unset).
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Select> {
        Select::parse(&get(ENV_SELECT).unwrap_or_default())
    }
}

/// Whether `QGALORE_DIST_SHARE_DEVICE` lets two ranks share a GPU (unset: no).
pub fn share_allowed_from(get: &dyn Fn(&str) -> Option<String>) -> Result<bool> {
    match get(ENV_SHARE).unwrap_or_default().trim() {
        "" | "0" | "no" | "false" => Ok(false),
        "1" | "yes" | "true" => Ok(true),
        other => Err(Error::invalid(format!("{ENV_SHARE}={other}: allowed 0 or 1"))),
    }
}

/// The process's rank among the ranks on its machine, first found: Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH/Hydra's `MPI_LOCALRANKID`, Slurm's `SLURM_LOCALID`;
/// with the variable that named it.
pub fn local_rank_from(get: &dyn Fn(&str) -> Option<String>) -> Option<(&'static str, usize)> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]
        .into_iter()
        .find_map(|k| get(k).and_then(|v| v.trim().parse::<usize>().ok()).map(|r| (k, r)))
}

/// The device a rank opens: its local rank modulo the devices it can see (0 without a
/// local rank). Two ranks of one machine that land on one device are found later, by
/// comparing device UUIDs across ranks (a launcher may give each rank its own single
/// visible GPU, so the local rank alone cannot tell).
pub fn device_for(local_rank: Option<usize>, visible: usize) -> Result<usize> {
    if visible == 0 {
        return Err(Error::backend("no usable CUDA device for this rank (CUDA_VISIBLE_DEVICES, or the driver and libraries)"));
    }
    Ok(local_rank.unwrap_or(0) % visible)
}

/// What one rank contributes to the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// This rank can load NCCL and knows its device (false under `off`).
    pub nccl: bool,
    /// Its device's UUID.
    pub device: [u8; UUID_BYTES],
    /// Its `QGALORE_DIST_NCCL` and `QGALORE_DIST_SHARE_DEVICE`: every rank must have the
    /// same, or ranks would take different routes.
    pub select: Select,
    pub share_ok: bool,
}

impl Select {
    fn code(self) -> f64 {
        match self {
            Select::Auto => 0.0,
            Select::On => 1.0,
            Select::Off => 2.0,
        }
    }
    fn from_code(c: f64) -> Select {
        match c as u8 {
            1 => Select::On,
            2 => Select::Off,
            _ => Select::Auto,
        }
    }
}

/// The route every rank takes (the same on every rank).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Device buffers are summed by NCCL.
    Nccl,
    /// Gradients go through host memory and MPI; `notice` says why when NCCL was wanted.
    Host { notice: Option<String> },
}

fn ranks_text(rs: &[usize]) -> String {
    let list: Vec<String> = rs.iter().map(|r| r.to_string()).collect();
    format!("rank{} {}", if rs.len() > 1 { "s" } else { "" }, list.join(", "))
}

/// Formats a device UUID as the driver and `nvidia-smi -L` do (`GPU-xxxxxxxx-xxxx-…`).
pub fn uuid_text(u: &[u8; UUID_BYTES]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("GPU-{}-{}-{}-{}-{}", h[0..4].concat(), h[4..6].concat(), h[6..8].concat(), h[8..10].concat(), h[10..16].concat())
}

/// The groups of ranks that run on one device (each group sorted, groups by first rank).
pub fn shared_devices(rows: &[Row]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        if groups.iter().any(|g| g.contains(&r)) {
            continue;
        }
        let g: Vec<usize> = (r..rows.len()).filter(|&q| rows[q].device == row.device).collect();
        if g.len() > 1 {
            groups.push(g);
        }
    }
    groups
}

/// The route from every rank's row (`rows[r]` is rank r's), as rank `me` words it: `why`
/// is its reason when it cannot load NCCL, quoted when it is among those missing it.
/// Pure: every rank calls it with the same rows and takes the same route (or refuses).
pub fn decide(rows: &[Row], me: usize, why: Option<&str>) -> Result<Route> {
    let Some(first) = rows.first() else { return Ok(Route::Host { notice: None }) };
    let (select, share_ok) = (first.select, first.share_ok);
    let differ: Vec<usize> = (1..rows.len()).filter(|&r| (rows[r].select, rows[r].share_ok) != (select, share_ok)).collect();
    if !differ.is_empty() {
        return Err(Error::invalid(format!(
            "{ENV_SELECT} or {ENV_SHARE} differs across ranks: {} differ{} from rank 0; start every rank with the same environment",
            ranks_text(&differ),
            if differ.len() > 1 { "" } else { "s" }
        )));
    }
    let shared = shared_devices(rows);
    if let Some(g) = shared.first() {
        let what = format!("{} run on one GPU ({})", ranks_text(g), uuid_text(&rows[g[0]].device));
        if !share_ok {
            return Err(Error::invalid(format!(
                "{what}: give each rank its own GPU (at most as many ranks per machine as GPUs), or set {ENV_SHARE}=1 to let them share it through host memory"
            )));
        }
        return match select {
            Select::On => Err(Error::invalid(format!("{ENV_SELECT}=on but {what}, which NCCL cannot run: give each rank its own GPU, or set {ENV_SELECT}=auto or off"))),
            Select::Off => Ok(Route::Host { notice: None }),
            Select::Auto => Ok(Route::Host { notice: Some(format!("{what} ({ENV_SHARE}=1): gradients are summed in host memory through MPI, not by NCCL")) }),
        };
    }
    if select == Select::Off {
        return Ok(Route::Host { notice: None });
    }
    let missing: Vec<usize> = rows.iter().enumerate().filter(|(_, r)| !r.nccl).map(|(i, _)| i).collect();
    if missing.is_empty() {
        return Ok(Route::Nccl);
    }
    let reason = match why {
        Some(w) if missing.contains(&me) => format!(" ({w})"),
        _ => String::new(),
    };
    let what = format!("NCCL cannot be loaded on {}{reason}", ranks_text(&missing));
    match select {
        Select::On => Err(Error::backend(format!("{ENV_SELECT}=on but {what}; set {ENV_SELECT}=auto or off to sum gradients through MPI"))),
        _ => Ok(Route::Host { notice: Some(format!("{what}: gradients are summed in host memory through MPI ({ENV_SELECT}=off silences this)")) }),
    }
}

/// Every rank's row, on every rank (an all-gather built from one sum all-reduce: each rank
/// fills its own row of a zero table). Collective.
pub fn gather(mine: &Row) -> Result<Vec<Row>> {
    let (r, n) = (rank(), size());
    const W: usize = 3 + UUID_BYTES;
    let mut t = vec![0f64; n * W];
    t[r * W] = if mine.nccl { 1.0 } else { 0.0 };
    t[r * W + 1] = mine.select.code();
    t[r * W + 2] = if mine.share_ok { 1.0 } else { 0.0 };
    for (k, &b) in mine.device.iter().enumerate() {
        t[r * W + 3 + k] = b as f64;
    }
    allreduce_sum(&mut t)?;
    Ok((0..n)
        .map(|q| {
            let row = &t[q * W..(q + 1) * W];
            let mut device = [0u8; UUID_BYTES];
            for (k, d) in device.iter_mut().enumerate() {
                *d = row[3 + k] as u8;
            }
            Row { nccl: row[0] != 0.0, device, select: Select::from_code(row[1]), share_ok: row[2] != 0.0 }
        })
        .collect())
}

/// Rank 0's broadcast: the status byte, then the id (zeros when rank 0 has none).
pub fn encode_id(id: Option<&[u8; ID_BYTES]>) -> [u8; ID_MSG_BYTES] {
    let mut m = [0u8; ID_MSG_BYTES];
    if let Some(id) = id {
        m[0] = 1;
        m[1..].copy_from_slice(id);
    }
    m
}

/// The id in rank 0's broadcast, or None when rank 0 could not create one.
pub fn decode_id(m: &[u8; ID_MSG_BYTES]) -> Option<[u8; ID_BYTES]> {
    (m[0] == 1).then(|| {
        let mut id = [0u8; ID_BYTES];
        id.copy_from_slice(&m[1..]);
        id
    })
}

/// Rank 0's unique id on every rank. Rank 0 passes what creating it gave (other ranks'
/// argument is ignored); when rank 0 failed, every rank returns the same error. Collective.
pub fn share_id(mine: std::result::Result<[u8; ID_BYTES], String>) -> Result<[u8; ID_BYTES]> {
    let root = rank() == 0;
    let mut m = if root { encode_id(mine.as_ref().ok()) } else { [0u8; ID_MSG_BYTES] };
    bcast(&mut m, 0)?;
    decode_id(&m).ok_or_else(|| {
        let why = match (&mine, root) {
            (Err(e), true) => format!(": {e}"),
            _ => String::new(),
        };
        Error::backend(format!("rank 0 could not create the NCCL unique id{why}"))
    })
}

/// Whether every rank succeeded at a step, on every rank: the failing ranks, or empty.
/// Collective.
pub fn failed_ranks(ok: bool) -> Result<Vec<usize>> {
    let mut t = vec![0f64; size()];
    t[rank()] = if ok { 0.0 } else { 1.0 };
    allreduce_sum(&mut t)?;
    Ok(t.iter().enumerate().filter(|(_, &v)| v != 0.0).map(|(i, _)| i).collect())
}

/// Prints a route's notice once, on rank 0 alone (the other ranks run quiet).
pub fn announce(route: &Route) {
    if let Route::Host { notice: Some(n) } = route {
        if rank() == 0 {
            eprintln!("qgalore: {n}");
        }
    }
}

#[cfg(feature = "cuda")]
pub use device::*;

#[cfg(feature = "cuda")]
mod device {
    use super::*;
    use cudarc::driver::{CudaSlice, CudaStream};
    use cudarc::nccl::{result::NcclError, sys, Comm as NcclComm, Id, ReduceOp};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::Arc;

    // the id rank 0 broadcasts is the struct cudarc hands to ncclCommInitRank, byte for byte
    const _: () = assert!(std::mem::size_of::<sys::ncclUniqueId>() == ID_BYTES);
    const _: () = assert!(std::mem::size_of::<cudarc::driver::sys::CUuuid>() == UUID_BYTES);

    /// The device a rank opens in this process's job: device 0 in a one-rank world,
    /// otherwise its local rank modulo the visible devices (`device_for`).
    pub fn device_ordinal() -> Result<usize> {
        if size() <= 1 {
            return Ok(0);
        }
        let local = local_rank_from(&|k| std::env::var(k).ok()).map(|(_, r)| r);
        device_for(local, crate::backend::cuda::probe::device_count())
    }

    /// One line for an NCCL error code: its name and NCCL's own text (and the last error
    /// NCCL recorded, which names the cause, when there is one).
    fn nccl_err(what: &str, e: NcclError) -> String {
        let text = catch_unwind(|| unsafe {
            let s = sys::ncclGetErrorString(e.0);
            let mut t = if s.is_null() { String::new() } else { std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned() };
            let last = sys::ncclGetLastError(std::ptr::null_mut());
            if !last.is_null() {
                let l = std::ffi::CStr::from_ptr(last).to_string_lossy();
                if !l.is_empty() {
                    t = format!("{t}; {l}");
                }
            }
            t
        })
        .unwrap_or_default();
        let text = text.replace('\n', " ");
        format!("NCCL {what}: {:?}{}", e.0, if text.is_empty() { String::new() } else { format!(" ({})", text.trim()) })
    }

    /// NCCL's version (`2.x.y`) when the library loads, else one line saying why not.
    /// cudarc opens it by the name `libnccl.so` (the development link); a machine with only
    /// the runtime's `libnccl.so.2` is told so.
    pub fn probe_library() -> std::result::Result<String, String> {
        let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if !present {
            // SAFETY: loading NCCL runs only its initialisers.
            let runtime_only = unsafe { libloading::Library::new("libnccl.so.2") }.is_ok();
            return Err(if runtime_only {
                "libnccl.so.2 is installed but cudarc loads NCCL as libnccl.so: install libnccl-dev, or link libnccl.so to libnccl.so.2 in a folder on LD_LIBRARY_PATH".into()
            } else {
                "no libnccl.so on the loader path (install libnccl2 and libnccl-dev, or pip's nvidia-nccl-cu13 and link libnccl.so to its libnccl.so.2 in a folder on LD_LIBRARY_PATH)".into()
            });
        }
        match catch_unwind(cudarc::nccl::result::get_nccl_version) {
            Ok(Ok(v)) => {
                // NCCL ≥ 2.9 encodes major * 10000 + minor * 100 + patch
                let (maj, min, patch) = if v >= 10000 { (v / 10000, (v / 100) % 100, v % 100) } else { (v / 1000, (v / 100) % 10, v % 100) };
                Ok(format!("NCCL {maj}.{min}.{patch}"))
            }
            Ok(Err(e)) => Err(nccl_err("version", e)),
            Err(_) => Err("libnccl.so lacks ncclGetVersion: not an NCCL 2 library".into()),
        }
    }

    /// A new NCCL unique id (rank 0's part of the bootstrap).
    pub fn new_id() -> std::result::Result<[u8; ID_BYTES], String> {
        let id = catch_unwind(Id::new).map_err(|_| "NCCL lacks ncclGetUniqueId".to_string())?.map_err(|e| nccl_err("unique id", e))?;
        let mut out = [0u8; ID_BYTES];
        for (o, &c) in out.iter_mut().zip(id.internal().iter()) {
            *o = c as u8;
        }
        Ok(out)
    }

    /// The UUID of the device `stream` runs on.
    pub fn device_uuid(stream: &CudaStream) -> Result<[u8; UUID_BYTES]> {
        let u = stream.context().uuid().map_err(|e| Error::backend(format!("CUDA device UUID: {e:?}")))?;
        let mut out = [0u8; UUID_BYTES];
        for (o, &c) in out.iter_mut().zip(u.bytes.iter()) {
            *o = c as u8;
        }
        Ok(out)
    }

    /// One rank's NCCL communicator, on the backend's stream.
    pub struct Comm(std::mem::ManuallyDrop<NcclComm>);

    impl Drop for Comm {
        fn drop(&mut self) {
            // cudarc's drop aborts the communicator and panics when that fails: never let it
            // unwind out of a backend being dropped
            // SAFETY: dropped once, here; nothing uses it afterwards.
            let _ = catch_unwind(AssertUnwindSafe(|| unsafe { std::mem::ManuallyDrop::drop(&mut self.0) }));
        }
    }

    // SAFETY: the communicator is used by one thread at a time (the backend keeps it under a
    // lock), which is all NCCL asks of a communicator.
    unsafe impl Send for Comm {}
    unsafe impl Sync for Comm {}

    impl Comm {
        /// Joins communicator `id` as `rank` of `size` on `stream`'s device. Blocks until every
        /// rank has joined (NCCL's bootstrap).
        pub fn new(stream: &Arc<CudaStream>, rank: usize, size: usize, id: &[u8; ID_BYTES]) -> Result<Comm> {
            let mut internal = [0 as std::ffi::c_char; ID_BYTES];
            for (i, &b) in internal.iter_mut().zip(id.iter()) {
                *i = b as std::ffi::c_char;
            }
            // NCCL takes the device from the thread's current context
            stream.context().bind_to_thread().map_err(|e| Error::backend(format!("CUDA context: {e:?}")))?;
            let c = catch_unwind(AssertUnwindSafe(|| NcclComm::from_rank(stream.clone(), rank, size, Id::uninit(internal))))
                .map_err(|_| Error::backend("NCCL lacks ncclCommInitRank"))?
                .map_err(|e| Error::backend(nccl_err(&format!("communicator (rank {rank} of {size})"), e)))?;
            Ok(Comm(std::mem::ManuallyDrop::new(c)))
        }

        pub fn rank(&self) -> usize {
            self.0.rank()
        }

        pub fn size(&self) -> usize {
            self.0.world_size()
        }

        /// Sums `buf[..n]` over every rank in place, queued on the communicator's stream (the
        /// backend's), so the kernels queued after it see the sum. Every rank gets the same
        /// bits (NCCL's all-reduce ends with every rank holding the same reduced chunks).
        pub fn allreduce_sum(&self, buf: &mut CudaSlice<f32>, n: usize) -> Result<()> {
            if n > buf.len() {
                return Err(Error::invalid(format!("NCCL all-reduce of {n} values: the buffer holds {}", buf.len())));
            }
            super::super::count_allreduce(n * 4);
            self.0.context().bind_to_thread().map_err(|e| Error::backend(format!("CUDA context: {e:?}")))?;
            let mut v = buf.slice_mut(..n);
            catch_unwind(AssertUnwindSafe(|| self.0.all_reduce_in_place(&mut v, &ReduceOp::Sum)))
                .map_err(|_| Error::backend("NCCL lacks ncclAllReduce"))?
                .map_err(|e| Error::backend(nccl_err(&format!("all-reduce of {n} values"), e)))?;
            Ok(())
        }
    }

    /// How a CUDA backend's buffers cross ranks, once decided.
    pub enum Link {
        Host,
        Nccl(Comm),
    }

    /// Decides how `stream`'s backend sums across the ranks of the current MPI world and,
    /// for NCCL, creates this rank's communicator. Collective: every rank of a world of more
    /// than one calls it at the same point (the first gradient sum). Refusals and failures
    /// are one line, the same on every rank where they concern every rank.
    pub fn connect(stream: &Arc<CudaStream>) -> Result<Link> {
        let env = |k: &str| std::env::var(k).ok();
        let select = Select::from_env(&env)?;
        let share_ok = share_allowed_from(&env)?;
        connect_with(stream, select, share_ok)
    }

    /// `connect` with the selection given.
    pub fn connect_with(stream: &Arc<CudaStream>, select: Select, share_ok: bool) -> Result<Link> {
        let (r, n) = (rank(), size());
        if n <= 1 {
            return Ok(Link::Host);
        }
        let lib = if select == Select::Off { Err("off".to_string()) } else { probe_library() };
        // a rank that cannot name its device still joins the vote (under a UUID of its own,
        // never another rank's), so no rank waits for it
        let (device, lib) = match device_uuid(stream) {
            Ok(u) => (u, lib),
            Err(e) => (std::array::from_fn(|i| if i < 8 { 0xff } else { (r >> (8 * (i - 8))) as u8 }), Err(e.msg)),
        };
        let mine = Row { nccl: lib.is_ok(), device, select, share_ok };
        let rows = gather(&mine)?;
        let route = decide(&rows, r, lib.as_ref().err().map(|s| s.as_str()))?;
        announce(&route);
        if route != Route::Nccl {
            return Ok(Link::Host);
        }
        let id = share_id(if r == 0 { new_id() } else { Err(String::new()) })?;
        let comm = Comm::new(stream, r, n, &id);
        let failed = failed_ranks(comm.is_ok())?;
        if failed.is_empty() {
            return comm.map(Link::Nccl);
        }
        // some rank could not join: every rank drops its communicator and says so alike
        let why = comm.err().map(|e| format!(" ({})", e.msg)).unwrap_or_default();
        let what = format!("NCCL communicator setup failed on {}{why}", ranks_text(&failed));
        if select == Select::On {
            return Err(Error::backend(format!("{what}; set {ENV_SELECT}=auto or off to sum gradients through MPI")));
        }
        announce(&Route::Host { notice: Some(format!("{what}: gradients are summed in host memory through MPI")) });
        Ok(Link::Host)
    }
}
