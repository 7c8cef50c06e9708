//! Choosing the next token from logits: greedy at temperature 0, else softmax(logits / T)
//! restricted by top-k and then top-p (nucleus) as `transformers` applies them, drawn with
//! the counter-based RNG so a (seed, position) pair always gives the same token.

use crate::rng;

/// Stream id of sampling draws in the counter-based RNG.
const STREAM: u64 = 0x5a3b1e;

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 = off.
    pub top_p: f64,
    pub seed: u64,
}

/// The highest logit's id, the lowest id on ties.
pub fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    best as i32
}

/// The token drawn for sequence position `pos` (the index the new token will have).
pub fn sample(logits: &[f32], s: &Sampling, pos: usize) -> i32 {
    if s.temperature == 0.0 {
        return argmax(logits);
    }
    // most likely first; equal logits by id, so top-k 1 and a tiny top-p are greedy
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if s.top_k > 0 && s.top_k < ids.len() {
        ids.select_nth_unstable_by(s.top_k - 1, by_logit);
        ids.truncate(s.top_k);
    }
    ids.sort_unstable_by(by_logit);
    let top = logits[ids[0] as usize];
    let t = s.temperature as f64;
    let mut w: Vec<f64> = ids.iter().map(|&i| ((logits[i as usize] - top) as f64 / t).exp()).collect();
    if s.top_p < 1.0 {
        // transformers' TopPLogitsWarper: drop the tail whose mass is ≤ 1 − p, i.e. keep
        // the tokens whose more likely predecessors hold less than p
        let total: f64 = w.iter().sum();
        let (mut before, mut keep) = (0.0, 0);
        while keep < w.len() && before < s.top_p {
            before += w[keep] / total;
            keep += 1;
        }
        ids.truncate(keep.max(1));
        w.truncate(keep.max(1));
    }
    let total: f64 = w.iter().sum();
    let u = rng::uniform(rng::stream_key(s.seed, STREAM, pos as u64), 0) as f64 * total;
    let mut acc = 0.0;
    for (&id, &wi) in ids.iter().zip(&w) {
        acc += wi;
        if u < acc {
            return id as i32;
        }
    }
    *ids.last().expect("at least one token") as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_lowest_id_on_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 1.0, 2.0]), 1);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities ∝ 4, 3, 2, 1 (sum 10): p = 0.65 keeps {0, 1}; p = 0.75 keeps {0, 1, 2}
        let logits: Vec<f32> = [4.0f32, 3.0, 2.0, 1.0].iter().map(|w| w.ln()).collect();
        let drawn = |p: f64| {
            let mut seen = [false; 4];
            for seed in 0..400 {
                seen[sample(&logits, &Sampling { temperature: 1.0, top_k: 0, top_p: p, seed }, 3) as usize] = true;
            }
            seen
        };
        assert_eq!(drawn(0.65), [true, true, false, false]);
        assert_eq!(drawn(0.75), [true, true, true, false]);
        assert_eq!(drawn(1.0), [true, true, true, true]);
        assert_eq!(drawn(0.3), [true, false, false, false]);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln()]; // 1 : 3
        let n = 20_000;
        let ones = (0..n).filter(|&i| sample(&logits, &Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: i }, 0) == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.015, "{f}");
        // temperature 2 flattens 1 : 3 into 1 : √3
        let ones = (0..n).filter(|&i| sample(&logits, &Sampling { temperature: 2.0, top_k: 0, top_p: 1.0, seed: i }, 0) == 1).count();
        let want = 3f64.sqrt() / (1.0 + 3f64.sqrt());
        assert!((ones as f64 / n as f64 - want).abs() < 0.015);
    }
}
