//! The fused per-layer step in a data-parallel run (docs/algorithm-spec.md §1.5): each
//! tensor's gradient is summed over the ranks before the optimizer sees it, and the sum
//! overlaps the backward.
//!
//! The backward hands tensor i's gradient (or a row chunk of a table's) over in the shared
//! gradient buffer. `Overlap::push` then
//! 1. waits for the all-reduce of the tensor before it, j, started at the previous push (it
//!    ran while the backward computed i's gradient),
//! 2. swaps the shared buffer with its spare half (`Grads::swap_shared`: handles only, no
//!    copy): the shared buffer now holds j's summed gradient, the spare i's own,
//! 3. starts i's all-reduce on the spare (`iallreduce_sum`, in place where buffers live on
//!    the host; through one host staging buffer on a device),
//! 4. runs `process` (the optimizer's update, the norm's sum of squares, the clip stash)
//!    for j on the shared buffer,
//!
//! and the backward goes on writing tensor i + 1's gradient into the shared buffer while i's
//! all-reduce is in flight. `flush` waits for the last one and processes it; afterwards the
//! shared buffer holds the last tensor's summed gradient (as it holds the last tensor's
//! gradient in one process). Every tensor is processed once, in the order the backward
//! reported them, one tensor later; a weight is therefore updated a little later than in
//! one process, never earlier, so the backward never reads an updated weight.
//!
//! Open MPI moves a non-blocking collective's data only inside MPI calls (beyond what the
//! kernel's socket buffers take at the start), and the backward makes none between two
//! pushes: while an all-reduce is in flight a helper thread calls `MPI_Test` on it every
//! `POLL` (under the world's lock, `MPI_THREAD_SERIALIZED`), so it completes during the
//! backward rather than at the next wait.
//!
//! Gradient memory per rank: the shared buffer and its spare (2 × the largest tensor or
//! table chunk, `Plan::shared_grad` elements each), plus on a device backend one host
//! staging buffer of the same size. At most one all-reduce is in flight.
//!
//! Bytes: every element of every trained tensor's gradient once per backward, as the unfused
//! step's full-gradient all-reduce sends them. In a one-rank world `push` processes at once,
//! with no spare and no copy: one process runs exactly the code it ran before.

use super::{iallreduce_sum, size, Pending};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{pass, Grads, Llama};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the progress thread tests the all-reduce in flight.
const POLL: Duration = Duration::from_micros(200);

/// One tensor's (or chunk's) all-reduce in flight.
struct InFlight {
    idx: usize,
    rows: Option<(usize, usize)>,
    n: usize,
    /// Borrows the spare half of the shared buffer (or `stage`) until waited for.
    req: Pending<'static>,
    /// `MPI_Test` said it is complete (or failed: the wait reports it).
    done: bool,
}

static WAITS: AtomicU64 = AtomicU64::new(0);
static EARLY: AtomicU64 = AtomicU64::new(0);

/// Since the start: (all-reduces the pipelines waited for, those of them the progress thread
/// had already seen complete when the wait came): how much of the communication finished
/// behind the backward.
pub fn waits() -> (u64, u64) {
    (WAITS.load(Ordering::Relaxed), EARLY.load(Ordering::Relaxed))
}

/// The all-reduce in flight, shared with the progress thread.
struct Slot {
    flight: Mutex<Option<InFlight>>,
    stop: AtomicBool,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<InFlight>> {
        self.flight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drives the all-reduce in flight until `stop`.
fn progress(slot: Arc<Slot>) {
    while !slot.stop.load(Ordering::Relaxed) {
        if let Some(f) = slot.lock().as_mut().filter(|f| !f.done) {
            f.done = f.req.test().unwrap_or(true);
        }
        std::thread::sleep(POLL);
    }
}

/// The all-reduce pipeline of one backward (see the module's notes).
pub struct Overlap {
    /// More than one rank: gradients are summed.
    on: bool,
    /// The buffers live on the host: the sum runs in place in the spare buffer.
    host: bool,
    /// Host copy of the spare buffer on a device backend.
    stage: Vec<f32>,
    slot: Arc<Slot>,
    /// The progress thread (more than one rank).
    thread: Option<std::thread::JoinHandle<()>>,
    /// The first communication failure; every later push only drains.
    err: Option<Error>,
    /// Bytes handed to all-reduces by this pipeline.
    pub bytes: u64,
}

impl Overlap {
    /// A pipeline for `g`'s shared buffer: in a world of more than one rank the spare half is
    /// allocated (once per engine; it is kept for the next steps).
    pub fn new<B: Backend>(be: &B, g: &mut Grads<B>) -> Result<Overlap> {
        let on = size() > 1;
        let slot = Arc::new(Slot { flight: Mutex::new(None), stop: AtomicBool::new(false) });
        let mut ov = Overlap { on, host: true, stage: Vec::new(), slot, thread: None, err: None, bytes: 0 };
        if on {
            let slot = ov.slot.clone();
            ov.thread = Some(
                std::thread::Builder::new()
                    .name("qgalore-allreduce".into())
                    .spawn(move || progress(slot))
                    .map_err(|e| Error::backend(format!("cannot start the all-reduce progress thread: {e}")))?,
            );
            g.add_spare(be)?;
            if let Some(s) = g.spare_mut() {
                ov.host = matches!(be.to_host(s, 0)?, std::borrow::Cow::Borrowed(_));
                if !ov.host {
                    ov.stage = vec![0.0; be.len(s)];
                }
            }
        }
        Ok(ov)
    }

    /// Whether gradients are summed over ranks (more than one).
    pub fn active(&self) -> bool {
        self.on
    }

    /// Hands over tensor `idx`'s gradient (`n` values, row chunk `rows` or all of it), in
    /// `g`'s shared buffer: processed at once in one process; summed over the ranks and
    /// processed at the next push or at `flush` otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn push<B: Backend>(&mut self, be: &B, idx: usize, rows: Option<(usize, usize)>, n: usize, m: &mut Llama<B>, g: &mut Grads<B>, process: &mut pass::Hook<B>) {
        if !self.on {
            process(idx, rows, m, g);
            return;
        }
        if !g.is_shared(idx) {
            // a tensor with its own buffer (not in a fused plan): summed in place, blocking
            let prev = self.wait(be, g);
            if let Err(e) = self.reduce_own(be, g, idx, n) {
                self.err.get_or_insert(e);
            }
            if let Some((j, r)) = prev {
                process(j, r, m, g);
            }
            process(idx, rows, m, g);
            return;
        }
        let prev = self.wait(be, g);
        // the shared buffer (idx's own gradient) becomes the spare, the spare (prev's sum) shared
        g.swap_shared();
        if let Err(e) = self.start(be, g, idx, rows, n) {
            self.err.get_or_insert(e);
        }
        if let Some((j, r)) = prev {
            process(j, r, m, g);
        }
    }

    /// Waits for the last all-reduce and processes its tensor (its sum is then in the shared
    /// buffer). Returns the first communication failure of this pipeline.
    pub fn flush<B: Backend>(&mut self, be: &B, m: &mut Llama<B>, g: &mut Grads<B>, process: &mut pass::Hook<B>) -> Result<()> {
        if let Some((j, r)) = self.wait(be, g) {
            g.swap_shared();
            process(j, r, m, g);
        }
        self.err.take().map_or(Ok(()), Err)
    }

    /// Starts the sum of the spare buffer's first `n` values.
    fn start<B: Backend>(&mut self, be: &B, g: &mut Grads<B>, idx: usize, rows: Option<(usize, usize)>, n: usize) -> Result<()> {
        if self.err.is_some() {
            return Ok(()); // a failed job only drains
        }
        be.sync()?;
        let spare = g.spare_mut().expect("spare gradient buffer");
        let ptr = if self.host {
            let mut p = std::ptr::null_mut();
            be.from_host(spare, n, |s| {
                p = s.as_mut_ptr();
                Ok(())
            })?;
            p
        } else {
            be.download(spare, &mut self.stage[..n])?;
            self.stage.as_mut_ptr()
        };
        // SAFETY: `ptr` addresses n f32 values of the spare buffer's storage (or of `stage`),
        // which nothing reads or writes until `wait` (the spare is only swapped, a move of its
        // handle that leaves the storage in place) and which outlive this pipeline: the
        // engine owns the buffers, and the pipeline waits before it is dropped.
        let buf: &'static mut [f32] = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
        let req = iallreduce_sum(buf)?;
        self.bytes += 4 * n as u64;
        *self.slot.lock() = Some(InFlight { idx, rows, n, req, done: false });
        Ok(())
    }

    /// Waits for the all-reduce in flight, if any; its sum is then in the spare buffer.
    fn wait<B: Backend>(&mut self, be: &B, g: &mut Grads<B>) -> Option<(usize, Option<(usize, usize)>)> {
        let f = self.slot.lock().take()?;
        WAITS.fetch_add(1, Ordering::Relaxed);
        if f.done {
            EARLY.fetch_add(1, Ordering::Relaxed);
        }
        let r = f.req.wait().and_then(|_| match self.host {
            true => Ok(()),
            false => be.upload(g.spare_mut().expect("spare gradient buffer"), &self.stage[..f.n]),
        });
        if let Err(e) = r {
            self.err.get_or_insert(e);
        }
        Some((f.idx, f.rows))
    }

    /// Sums a tensor's own gradient buffer over the ranks (blocking).
    fn reduce_own<B: Backend>(&mut self, be: &B, g: &mut Grads<B>, idx: usize, n: usize) -> Result<()> {
        if self.err.is_some() {
            return Ok(());
        }
        be.sync()?;
        let buf = g.get_mut(idx);
        let mut h = be.to_host(buf, n)?.into_owned();
        super::allreduce_sum(&mut h)?;
        self.bytes += 4 * n as u64;
        be.upload(buf, &h)
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        self.slot.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // an abandoned pipeline still waits: MPI must not write into a buffer reused later
        if let Some(f) = self.slot.lock().take() {
            let _ = f.req.wait();
        }
    }
}

/// Sums one f64 (a rank's share of the loss) over the ranks; itself in one process.
pub fn sum_f64(x: f64) -> Result<f64> {
    if size() <= 1 {
        return Ok(x);
    }
    let mut v = [x];
    super::allreduce_sum(&mut v)?;
    Ok(v[0])
}
