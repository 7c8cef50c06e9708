//! The rotary-embedding table, built on the host and uploaded once per run by either
//! backend (`model::acts`).

/// (t, hd/2) cos/sin table for Hugging Face LLaMA's rotate-half RoPE: position p,
/// frequency i uses angle p · θ^(−2i/hd). Laid out as [cos(t×hd/2), sin(t×hd/2)].
pub fn rope_table(t: usize, hd: usize, theta: f64) -> Vec<f32> {
    let half = hd / 2;
    let mut tab = vec![0.0f32; 2 * t * half];
    for p in 0..t {
        for i in 0..half {
            let inv = 1.0 / theta.powf((2 * i) as f64 / hd as f64);
            let a = p as f64 * inv;
            tab[p * half + i] = a.cos() as f32;
            tab[t * half + p * half + i] = a.sin() as f32;
        }
    }
    tab
}
