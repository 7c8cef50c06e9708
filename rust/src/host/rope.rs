//! The rotary-embedding table, built on the host and uploaded once per run by either
//! backend (`model::acts`), and by inference.

use crate::config::ModelConfig;
use crate::config::model::RopeScaling;

/// (t, hd/2) cos/sin table for Hugging Face LLaMA's rotate-half RoPE: position p,
/// frequency i uses angle p · θ^(−2i/hd), the inverse frequency θ^(−2i/hd) scaled first
/// when `scaling` is given (as `transformers`' rope init functions do). Laid out as
/// [cos(t×hd/2), sin(t×hd/2)].
pub fn rope_table_scaled(t: usize, hd: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let half = hd / 2;
    let mut tab = vec![0.0f32; 2 * t * half];
    for i in 0..half {
        let mut inv = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
        if let Some(s) = scaling {
            inv = s.scale(inv);
        }
        for p in 0..t {
            let a = p as f64 * inv;
            tab[p * half + i] = a.cos() as f32;
            tab[t * half + p * half + i] = a.sin() as f32;
        }
    }
    tab
}

/// The unscaled table (`rope_type` "default").
pub fn rope_table(t: usize, hd: usize, theta: f64) -> Vec<f32> {
    rope_table_scaled(t, hd, theta, None)
}

/// The table of a model's first `t` positions (its head size, θ and scaling).
pub fn rope_table_for(cfg: &ModelConfig, t: usize) -> Vec<f32> {
    rope_table_scaled(t, cfg.head_dim(), cfg.rope_theta, cfg.rope_scaling.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative agreement with transformers' inv_freq, which it computes in f32.
    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= 1e-6 * want.abs()
    }

    #[test]
    fn scaled_tables_match_transformers() {
        // Expected inv_freq from transformers 5.24 (its f32 arithmetic), head size 32:
        // /work/pyref/bin/python -c 'from transformers import LlamaConfig
        // from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS as F
        // c = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=16384,
        //   rope_parameters={"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
        //   "high_freq_factor":4.0,"original_max_position_embeddings":8192})
        // print(F["llama3"](c)[0].tolist())
        // c = LlamaConfig(hidden_size=64, num_attention_heads=2,
        //   rope_parameters={"rope_type":"linear","rope_theta":10000.0,"factor":4.0})
        // print(F["linear"](c)[0].tolist())'
        // i = 7 is kept (short wavelength), 8 is blended, 9 and 15 are divided by the factor.
        let llama3 = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
        let want = [(0, 1.0), (1, 0.44036662578582764), (7, 0.0032114461064338684), (8, 0.0005248460220173001), (9, 7.784655463183299e-05), (15, 5.677088097399974e-07)];
        let linear = RopeScaling::Linear { factor: 4.0 };
        let want_linear = [(0, 0.25), (1, 0.14058533310890198), (8, 0.0024999999441206455), (15, 4.4456985051510856e-05)];
        for (scaling, theta, want) in [(&llama3, 500000.0, &want[..]), (&linear, 10000.0, &want_linear[..])] {
            let tab = rope_table_scaled(2, 32, theta, Some(scaling));
            for &(i, w) in want {
                let inv = scaling.scale(1.0 / f64::powf(theta, (2 * i) as f64 / 32.0));
                assert!(close(inv, w), "{scaling:?} inv_freq[{i}] {inv} vs {w}");
                // position 1's angle is the inverse frequency itself
                assert_eq!((tab[16 + i], tab[32 + 16 + i]), (inv.cos() as f32, inv.sin() as f32), "{scaling:?} table at i = {i}");
            }
        }
    }

    #[test]
    fn default_table_is_the_plain_formula() {
        let tab = rope_table(3, 8, 10000.0);
        // position 2, frequency 1: angle 2 · 10000^(−2/8)
        let a = 2.0 * (1.0 / 10000f64.powf(0.25));
        assert_eq!(tab[2 * 4 + 1], a.cos() as f32);
        assert_eq!(tab[3 * 4 + 2 * 4 + 1], a.sin() as f32);
    }
}
