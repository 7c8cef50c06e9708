//! Lazy layer-wise subspace exploration (docs/algorithm-spec.md §2.5): each matrix's refresh
//! interval doubles (×γ) once the mean of the last `queue_size` cosines between
//! consecutive top-1 singular vectors reaches the threshold. The gap never shrinks.

use std::collections::VecDeque;

#[derive(Clone, Debug)]
pub struct Lazy {
    pub gap: u64,
    pub queue: VecDeque<f32>,
    pub past: Option<Vec<f32>>,
    pub enabled: bool,
    pub threshold: f32,
    pub queue_size: usize,
    pub gamma: u64,
    /// Sign-invariant |cos| instead of the reference's signed cosine (docs/algorithm-spec.md §5.1-12).
    pub abs: bool,
}

impl Lazy {
    pub fn new(gap: u64, enabled: bool, threshold: f32, queue_size: usize, gamma: u64, abs: bool) -> Self {
        Lazy { gap, queue: VecDeque::new(), past: None, enabled, threshold, queue_size, gamma, abs }
    }

    /// A refresh is due at pre-increment step `iter` when `iter % gap == 0`.
    pub fn due(&self, iter: u64) -> bool {
        iter % self.gap == 0
    }

    /// Cosine between two vectors, signed or absolute per the mode.
    pub fn cosine(&self, a: &[f32], b: &[f32]) -> f32 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let c = (dot / (na * nb).max(1e-30)) as f32;
        if self.abs {
            c.abs()
        } else {
            c
        }
    }

    /// Records a refresh whose new top-1 vector is `v`; returns the cosine appended.
    pub fn observe(&mut self, v: Vec<f32>) -> Option<f32> {
        let c = self.past.as_ref().map(|p| self.cosine(p, &v));
        if let Some(c) = c {
            self.push(c);
        }
        self.past = Some(v);
        c
    }

    /// Appends a cosine (dropping the oldest when full) and grows the gap when due.
    pub fn push(&mut self, c: f32) {
        self.queue.push_back(c);
        if self.queue.len() > self.queue_size {
            self.queue.pop_front();
        }
        if self.enabled && self.queue.len() == self.queue_size {
            let mean = self.queue.iter().sum::<f32>() / self.queue.len() as f32;
            if mean >= self.threshold {
                self.gap *= self.gamma;
            }
        }
    }
}
