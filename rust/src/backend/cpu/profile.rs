//! Per-op wall time of the CPU backend, on when the process starts with `QGALORE_PROFILE=1`
//! (read once, when a backend is built). Off, an op costs one branch on a `bool`; on, each
//! op adds its elapsed seconds under a label (matmuls by direction and shape, so a reader
//! can tell q/k/v/o, gate/up, down and the head apart). The engine's `info()` reports the
//! totals as `profile` (label → seconds since the backend was built).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
pub struct Profile {
    on: bool,
    totals: Mutex<BTreeMap<Cow<'static, str>, f64>>,
}

impl Profile {
    /// On when the environment has `QGALORE_PROFILE` set to anything but empty or `0`.
    pub fn from_env() -> Self {
        let on = std::env::var("QGALORE_PROFILE").map(|v| !v.is_empty() && v != "0").unwrap_or(false);
        Profile { on, totals: Mutex::default() }
    }

    #[inline]
    pub fn on(&self) -> bool {
        self.on
    }

    /// Runs `f`, adding its wall time under `label()` when profiling is on (the label is
    /// only built then).
    #[inline]
    pub fn time<R>(&self, label: impl FnOnce() -> Cow<'static, str>, f: impl FnOnce() -> R) -> R {
        if !self.on {
            return f();
        }
        let t0 = Instant::now();
        let r = f();
        self.add(label(), t0.elapsed().as_secs_f64());
        r
    }

    fn add(&self, label: Cow<'static, str>, s: f64) {
        *self.totals.lock().unwrap().entry(label).or_insert(0.0) += s;
    }

    /// Seconds per label so far; None when profiling is off.
    pub fn snapshot(&self) -> Option<BTreeMap<String, f64>> {
        self.on.then(|| self.totals.lock().unwrap().iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }
}

/// `kind n×ic→oc` label of a product (n rows of activations).
pub fn mm(kind: &'static str, n: usize, ic: usize, oc: usize) -> Cow<'static, str> {
    Cow::Owned(format!("{kind} {n}x{ic}->{oc}"))
}
