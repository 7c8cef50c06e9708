//! Counter-based random numbers: every draw is a pure function of (seed, stream, index),
//! so results never depend on thread count or launch shape (docs/algorithm-spec.md I-10), and a
//! GPU kernel can reproduce the CPU bit for bit with the same three integers.

/// splitmix64 finaliser of `seed + golden·(i + 1)`; `mix64` in `rust/kernels/prelude.cu` is
/// the same function, so GPU kernels draw the same numbers.
#[inline]
pub fn mix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i.wrapping_add(1)));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Key for one stream of draws: (seed, stream id, step) folded into one 64-bit seed.
#[inline]
pub fn stream_key(seed: u64, stream: u64, step: u64) -> u64 {
    mix64(mix64(seed, stream), step)
}

/// 32 random bits for element `i` of the stream `key`.
#[inline]
pub fn bits32(key: u64, i: u64) -> u32 {
    (mix64(key, i) >> 32) as u32
}

/// Uniform in [0, 1) with 24 bits of resolution (exactly representable in f32).
#[inline]
pub fn uniform(key: u64, i: u64) -> f32 {
    (bits32(key, i) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Standard normal via Box–Muller on two independent 32-bit draws.
#[inline]
pub fn normal(key: u64, i: u64) -> f32 {
    let h = mix64(key, i);
    let u1 = ((h >> 40) as f64 + 0.5) / 16_777_216.0; // (0, 1)
    let u2 = ((h & 0xff_ffff) as f64) / 16_777_216.0;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_unbiased() {
        let key = stream_key(7, 3, 11);
        let n = 200_000u64;
        let mut sum = 0.0f64;
        for i in 0..n {
            let u = uniform(key, i);
            assert!((0.0..1.0).contains(&u));
            sum += u as f64;
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 4.0 * (1.0f64 / 12.0).sqrt() / (n as f64).sqrt(), "{mean}");
    }

    #[test]
    fn normal_has_unit_variance() {
        let key = stream_key(1, 2, 0);
        let n = 200_000u64;
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for i in 0..n {
            let x = normal(key, i) as f64;
            s += x;
            s2 += x * x;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn streams_differ() {
        assert_ne!(bits32(stream_key(0, 1, 0), 0), bits32(stream_key(0, 2, 0), 0));
        assert_ne!(bits32(stream_key(0, 1, 0), 0), bits32(stream_key(0, 1, 1), 0));
        assert_eq!(bits32(stream_key(5, 1, 9), 42), bits32(stream_key(5, 1, 9), 42));
    }
}
