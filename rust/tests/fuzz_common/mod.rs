//! Checkpoint mutations shared by the CI fuzz test (`tests/fuzz.rs`), the checkpoint file
//! tests and the long fuzz run (`examples/fuzz.rs`): raw byte damage, and edits of the
//! header JSON that are re-sealed with a valid checksum so they reach the validators.
#![allow(dead_code)]

pub mod driver;

use qgalore::state::{CHECKSUM_AT, CHECKSUM_HEX};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// xorshift64: reproducible cases from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Recomputes the checksum of checkpoint bytes (the format's definition: SHA-256 of the
/// file with the 64 digits read as '0'). No-op on bytes too short to hold it.
pub fn reseal(b: &mut [u8]) {
    if b.len() < CHECKSUM_AT + CHECKSUM_HEX {
        return;
    }
    b[CHECKSUM_AT..CHECKSUM_AT + CHECKSUM_HEX].fill(b'0');
    let d = Sha256::digest(&*b);
    let hex: String = d.iter().map(|x| format!("{x:02x}")).collect();
    b[CHECKSUM_AT..CHECKSUM_AT + CHECKSUM_HEX].copy_from_slice(hex.as_bytes());
}

/// (header JSON, data bytes) of a well-formed checkpoint.
pub fn split(b: &[u8]) -> (Value, &[u8]) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&b[8..8 + n]).unwrap(), &b[8 + n..])
}

/// A checkpoint with `header` and `data`, sealed. serde_json writes object keys sorted,
/// which puts `__metadata__` and then `checksum` first, as the format wants.
pub fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    reseal(&mut out);
    out
}

/// The `state` metadata as JSON.
pub fn state(h: &Value) -> Value {
    serde_json::from_str(h["__metadata__"]["state"].as_str().unwrap()).unwrap()
}

pub fn set_state(h: &mut Value, st: &Value) {
    h["__metadata__"]["state"] = Value::String(st.to_string());
}

/// Tensor names of a header, in data order.
pub fn tensor_names(h: &Value) -> Vec<String> {
    let mut v: Vec<(u64, String)> = h
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, e)| (e["data_offsets"][0].as_u64().unwrap(), k.clone()))
        .collect();
    v.sort();
    v.into_iter().map(|(_, k)| k).collect()
}

/// Raw damage: bit flips, byte overwrites, truncation, extension, header-length edits.
/// Never returns the input unchanged.
pub fn raw(rng: &mut Rng, good: &[u8]) -> (Vec<u8>, &'static str) {
    loop {
        let mut b = good.to_vec();
        let kind = match rng.below(6) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let k = rng.below(b.len());
                    b[k] ^= 1 << rng.below(8);
                }
                "bit flip"
            }
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let k = rng.below(b.len());
                    b[k] = rng.next() as u8;
                }
                "byte overwrite"
            }
            2 => {
                // a header byte: the JSON is where most parsing happens
                let n = u64::from_le_bytes(b[..8].try_into().unwrap());
                // (an index JSON file has no length prefix: any byte then)
                let k = if n < b.len() as u64 - 8 { 8 + rng.below(n as usize) } else { rng.below(b.len()) };
                b[k] = *rng.pick(b"{}[]\",:0123456789-eE.ntfu \\");
                "header byte"
            }
            3 => {
                b.truncate(rng.below(b.len()));
                "truncation"
            }
            4 => {
                for _ in 0..1 + rng.below(64) {
                    b.push(rng.next() as u8);
                }
                "extension"
            }
            _ => {
                let n = u64::from_le_bytes(b[..8].try_into().unwrap());
                let v = match rng.below(7) {
                    0 => n.wrapping_add(1 + rng.below(16) as u64),
                    1 => n.wrapping_sub(1 + rng.below(16) as u64),
                    2 => u64::MAX - rng.below(16) as u64,
                    3 => 1 << (8 + rng.below(56)),
                    4 => 0,
                    5 => b.len() as u64,
                    _ => rng.next(),
                };
                b[..8].copy_from_slice(&v.to_le_bytes());
                "header length"
            }
        };
        if b != good {
            return (b, kind);
        }
    }
}

/// Values no validator may accept in place of a counter, size or offset.
const HOSTILE_INTS: &[u64] = &[u64::MAX, u64::MAX - 1, 1 << 63, (1 << 53) + 1, 1 << 62, 1 << 54];

/// An edit of the header that makes the file invalid, re-sealed so only the validators
/// can catch it: offsets, dtypes, shapes, names, metadata values and the state scalars.
/// Returns None when the chosen edit does not apply to this checkpoint (no such field).
pub fn json_edit(rng: &mut Rng, good: &[u8]) -> Option<(Vec<u8>, &'static str)> {
    let (mut h, data) = split(good);
    let names = tensor_names(&h);
    let t = rng.pick(&names).clone();
    let kind = match rng.below(14) {
        0 => {
            let i = rng.below(2);
            let o = h[&t]["data_offsets"][i].as_u64().unwrap();
            h[&t]["data_offsets"][i] = match rng.below(4) {
                0 => (o + 1 + rng.below(8) as u64).into(),
                1 if o > 0 => (o - 1).into(),
                2 => (*rng.pick(HOSTILE_INTS)).into(),
                _ => Value::from(-1),
            };
            "data_offsets"
        }
        1 => {
            let d = h[&t]["dtype"].as_str().unwrap().to_string();
            let others: Vec<&str> = ["F32", "U8", "BF16", "F16", "I64", "F64", "BOOL", "f32", ""].into_iter().filter(|x| *x != d).collect();
            h[&t]["dtype"] = (*rng.pick(&others)).into();
            "dtype"
        }
        2 => {
            let shape = h[&t]["shape"].as_array().unwrap().clone();
            let mut s: Vec<Value> = shape.clone();
            match rng.below(5) {
                0 if !s.is_empty() => {
                    let i = rng.below(s.len());
                    s[i] = (s[i].as_u64().unwrap() + 1).into();
                }
                1 if s.len() == 2 && s[0] != s[1] => s.swap(0, 1),
                2 => s.push(1.into()),
                3 if !s.is_empty() => {
                    let i = rng.below(s.len());
                    s[i] = (*rng.pick(HOSTILE_INTS)).into();
                }
                _ => s = vec![Value::from(2.5)],
            }
            if s == shape {
                return None;
            }
            h[&t]["shape"] = Value::Array(s);
            "shape"
        }
        3 => {
            let e = h.as_object_mut().unwrap().remove(&t).unwrap();
            h[format!("{t}.x")] = e;
            "tensor renamed"
        }
        4 => {
            h.as_object_mut().unwrap().remove(&t);
            "tensor removed"
        }
        5 => {
            h[&t]["extra"] = 1.into();
            "tensor entry key"
        }
        6 => {
            let k = *rng.pick(&["format", "format_version", "engine_config", "state"]);
            match rng.below(3) {
                0 => {
                    h["__metadata__"].as_object_mut().unwrap().remove(k);
                }
                1 => h["__metadata__"][k] = "{".into(),
                _ => h["__metadata__"][k] = 7.into(),
            }
            "metadata value"
        }
        7 => {
            h["__metadata__"]["format_version"] = (*rng.pick(&["2", "4", "3.0", " 3"])).into();
            "format_version"
        }
        8 => {
            let mut c: Value = serde_json::from_str(h["__metadata__"]["engine_config"].as_str().unwrap()).unwrap();
            match rng.below(4) {
                0 => c["seed"] = (c["seed"].as_u64().unwrap() + 1).into(),
                1 => c["batch_size"] = (c["batch_size"].as_u64().unwrap() + 1).into(),
                2 => c["optimizer"]["beta1"] = 0.5.into(),
                _ => c["model"]["hidden_size"] = (c["model"]["hidden_size"].as_u64().unwrap() * 2).into(),
            }
            h["__metadata__"]["engine_config"] = Value::String(c.to_string());
            "engine_config"
        }
        9 => {
            let mut st = state(&h);
            st["step"] = (*rng.pick(HOSTILE_INTS)).into();
            st["optim"]["step"] = st["step"].clone();
            set_state(&mut h, &st);
            "step"
        }
        10 => {
            let mut st = state(&h);
            let Some(ps) = st["optim"]["projectors"].as_array_mut().filter(|p| !p.is_empty()) else { return None };
            let i = rng.below(ps.len());
            let p = &mut ps[i];
            match rng.below(6) {
                0 => p["gap"] = 0.into(),
                1 => p["gap"] = (*rng.pick(HOSTILE_INTS)).into(),
                2 => p["queue"] = (p["queue"].as_u64().unwrap() + 1000).into(),
                3 => p["past"] = (!p["past"].as_bool().unwrap()).into(),
                4 => p["store"] = (*rng.pick(&["f32", "bf16", "int8", "int4", "none", "int2"])).into(),
                _ => p["param"] = (p["param"].as_u64().unwrap() + 1).into(),
            }
            let changed = st != state(&h);
            if !changed {
                return None;
            }
            set_state(&mut h, &st);
            "projector scalars"
        }
        11 => {
            let mut st = state(&h);
            match rng.below(4) {
                0 => st["optim"]["unknown"] = 1.into(),
                1 => st["precision"] = "fp16".into(),
                2 => st["optimizer"] = "sgd".into(),
                _ => st["optim"]["svd_count"] = (*rng.pick(HOSTILE_INTS)).into(),
            }
            set_state(&mut h, &st);
            "state scalars"
        }
        12 => {
            h["__metadata__"]["unknown"] = "x".into();
            "unknown metadata"
        }
        _ => {
            // two tensors' places swapped (same sizes keep offsets consistent)
            let (a, b) = (rng.pick(&names).clone(), rng.pick(&names).clone());
            if a == b || h[&a]["data_offsets"][1].as_u64().unwrap() - h[&a]["data_offsets"][0].as_u64().unwrap()
                != h[&b]["data_offsets"][1].as_u64().unwrap() - h[&b]["data_offsets"][0].as_u64().unwrap()
            {
                return None;
            }
            let oa = h[&a]["data_offsets"].clone();
            h[&a]["data_offsets"] = h[&b]["data_offsets"].clone();
            h[&b]["data_offsets"] = oa;
            "tensors swapped"
        }
    };
    Some((join(&h, data), kind))
}

/// Sets element `i` of the F32 tensor `name` to `v` and re-seals.
pub fn set_f32(good: &[u8], name: &str, i: usize, v: f32) -> Vec<u8> {
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let (h, _) = split(good);
    let off = 8 + n + h[name]["data_offsets"][0].as_u64().unwrap() as usize + 4 * i;
    let mut b = good.to_vec();
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    reseal(&mut b);
    b
}
