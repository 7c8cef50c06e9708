//! One named tensor of a checkpoint as the safetensors header states it, the value rules
//! a loaded tensor must meet, and the byte views of f32 data (little-endian on disk).

use crate::error::{Error, Result};

/// Element types a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    /// bf16 projectors (`proj_bits` 16), stored as their codes.
    BF16,
    /// Quantization codes (INT8; INT4 packed two a byte) and 8-bit Adam states.
    U8,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::U8 => "U8",
        }
    }
    pub fn parse(s: &str) -> Option<Dtype> {
        [Dtype::F32, Dtype::BF16, Dtype::U8].into_iter().find(|d| d.name() == s)
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 => 2,
            Dtype::U8 => 1,
        }
    }
}

/// Largest rank of a stored tensor (the engine writes 1 and 2).
pub const MAX_RANK: usize = 4;

/// A tensor's name, element type and dimensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl Entry {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        Entry { name: name.into(), dtype, shape }
    }
    /// Elements, or None when the product overflows.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }
    /// Bytes of data, or None when it overflows.
    pub fn bytes(&self) -> Option<usize> {
        self.numel()?.checked_mul(self.dtype.size())
    }
    /// "F32 [32, 64]": how messages show a tensor's type.
    pub fn describe(&self) -> String {
        format!("{} {:?}", self.dtype.name(), self.shape)
    }
}

/// The shape of an `rows × cols` matrix as stored: a vector when it has one row (norms).
pub fn matrix(rows: usize, cols: usize) -> Vec<usize> {
    if rows == 1 {
        vec![cols]
    } else {
        vec![rows, cols]
    }
}

/// What every value of a tensor must satisfy, decided by the format (dtype and name), so
/// the check needs no engine: floats finite; second moments and absmax also ≥ 0 (a
/// negative one would make the next update's square root NaN); codes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Any,
    Finite,
    NonNegative,
}

pub fn rule(name: &str, dtype: Dtype) -> Rule {
    match dtype {
        Dtype::U8 => Rule::Any,
        Dtype::BF16 => Rule::Finite,
        Dtype::F32 if name.ends_with(".v") || name.ends_with(".absmax") => Rule::NonNegative,
        Dtype::F32 => Rule::Finite,
    }
}

/// Checks `bytes` (whole elements of a tensor, `first` the index of its first element)
/// against `rule`; the message names the tensor and the element.
pub fn check_values(name: &str, dtype: Dtype, r: Rule, bytes: &[u8], first: usize) -> Result<()> {
    let bad = |i: usize, what: &str| {
        Err(Error::invalid(format!(
            "checkpoint tensor {name} holds {what} at element {}; weights, moments and projectors must be finite",
            first + i
        )))
    };
    match (r, dtype) {
        (Rule::Any, _) | (_, Dtype::U8) => Ok(()),
        (_, Dtype::BF16) => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                // exponent all ones: an infinity or NaN
                if u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80 {
                    return bad(i, "a non-finite value");
                }
            }
            Ok(())
        }
        (_, Dtype::F32) => {
            for (i, c) in bytes.chunks_exact(4).enumerate() {
                let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if x.is_nan() {
                    return bad(i, "NaN");
                }
                if x.is_infinite() {
                    return bad(i, "an infinity");
                }
                if r == Rule::NonNegative && x < 0.0 {
                    return Err(Error::invalid(format!(
                        "checkpoint tensor {name} holds {x} at element {}; second moments and absmax values are ≥ 0",
                        first + i
                    )));
                }
            }
            Ok(())
        }
    }
}

/// f32 values as their little-endian bytes (borrowed on little-endian machines).
pub fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and any byte pattern is a valid u8
        std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) })
    }
    #[cfg(not(target_endian = "little"))]
    {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// Fills `dst` from little-endian bytes produced by `fill` (which gets a byte buffer of
/// exactly `4 · dst.len()` bytes): in place on little-endian machines.
pub fn fill_f32(dst: &mut [f32], fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<()> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: every byte pattern is a valid f32; the view covers exactly `dst`
        let b = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u8, std::mem::size_of_val(dst)) };
        fill(b)
    }
    #[cfg(not(target_endian = "little"))]
    {
        let mut b = vec![0u8; 4 * dst.len()];
        fill(&mut b)?;
        for (d, c) in dst.iter_mut().zip(b.chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

/// Text from a file as a one-line message shows it: control characters (and the Unicode
/// line separators) escaped, at most `max` characters, then "…". A hostile tensor name
/// may hold a newline or be megabytes long.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A name from a checkpoint as messages show it.
pub fn shown(name: &str) -> String {
    printable(name, 200)
}
