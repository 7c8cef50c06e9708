//! Optimizer update rules on backend buffers: torch AdamW, GaLore-AdamW, bitsandbytes'
//! 32-bit and block-wise 8-bit Adam (with the 8-bit state they own), and the
//! non-finite-gradient guard. The algorithms that drive them live in `crate::optim`.

use super::memory::{Category, Memory};
use crate::adam::AdamHp;
use crate::error::Result;
use crate::quant::adam8::State8;
use std::borrow::Cow;

/// Update rules of the optimizers and their 8-bit state.
pub trait Optimizers: Memory {
    /// Block-wise 8-bit Adam state.
    type A8: Send;

    /// One AdamW update of `p` with gradient `g` and fp32 moments `m`, `v`.
    fn adamw(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamHp);
    /// GaLore-AdamW (docs/algorithm-spec.md §1.3), in place: `buf` holds the gradient (m.len()
    /// values) and receives the update u = −ŝ·M/(√V + ε), ŝ = η·√(1−β2^t)/(1−β1^t),
    /// with ε added to the uncorrected √V.
    fn galore_adam(&self, buf: &mut Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamHp);
    /// bnb 32-bit Adam (the 8-bit update's formula, fp32 moments).
    fn bnb32_step(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamHp);

    fn a8_new(&self, n: usize, block: usize, cat: Category) -> Result<Self::A8>;
    /// bnb 8-bit block-wise Adam on `p`; non-finite gradient elements are skipped and
    /// counted (see `take_nonfinite`).
    fn a8_step(&self, p: &mut Self::Buf, g: &Self::Buf, st: &mut Self::A8, hp: AdamHp);
    /// `a8_step` on elements [off, off + len) of `p` and `st` with the gradient in
    /// g[..len]; `off` is a multiple of the state's block size.
    fn a8_step_range(&self, p: &mut Self::Buf, g: &Self::Buf, st: &mut Self::A8, off: usize, len: usize, hp: AdamHp);
    /// The state as host bytes (borrowed where it lives on the host, copied otherwise).
    fn a8_to_host<'a>(&self, st: &'a Self::A8) -> Result<Cow<'a, State8>>;
    /// Overwrites `st` with what `fill` writes into a host state of its shape (`st`'s own
    /// storage where it lives on the host).
    fn a8_from_host(&self, st: &mut Self::A8, fill: impl FnOnce(&mut State8) -> Result<()>) -> Result<()>;

    /// Zeroes non-finite elements among the first `n` and counts them (see
    /// `take_nonfinite`).
    fn sanitize(&self, b: &mut Self::Buf, n: usize);
    /// Non-finite gradient elements met by `sanitize`, `a8_step` and `bnb32_step` since
    /// the last call, then reset to 0 (one device sync per step instead of one per tensor).
    fn take_nonfinite(&self) -> u64;
}
