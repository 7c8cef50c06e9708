//! Progress of a long call (shard build, tokenizer training): bytes read out of bytes in
//! all, updated by the worker and read by the host while the call runs on another thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Default)]
pub struct Progress {
    read: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
}

impl Progress {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }
    pub fn finish(&self) {
        self.read.store(self.total.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    /// `(bytes read, bytes in all)`.
    pub fn get(&self) -> (u64, u64) {
        (self.read.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }
    /// Asks the running call to stop at its next document; it then fails with "cancelled".
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}
