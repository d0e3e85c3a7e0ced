//! ggml's element types and their dequantization to f32.
//!
//! Each quantized type packs a fixed number of elements (a block: 32, or 256 for the "K" types) into a
//! fixed number of bytes: one or two f16 scales and small integers. The arithmetic follows ggml's
//! reference `dequantize_row_*` (and the PyPI package `gguf`'s numpy port, which the tests compare
//! against bit for bit): scales are widened to f32 first, then `(d · scale) · q − (dmin · min)` in f32,
//! in that order, without fused multiply-adds.

use half::{bf16, f16};
use rayon::prelude::*;

/// The types [`dequantize`] handles, for error messages.
pub const SUPPORTED: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

macro_rules! ggml_types {
    ($($name:ident = $id:literal, $block:literal, $bytes:literal;)*) => {
        /// A ggml element type, as numbered in the file.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $(
                #[doc = concat!("ggml type ", stringify!($id), ".")]
                $name,
            )*
            /// A type id this crate does not know.
            Unknown(u32),
        }

        impl GgmlType {
            /// The type numbered `id` in a GGUF tensor index.
            pub fn from_id(id: u32) -> Self {
                match id {
                    $($id => GgmlType::$name,)*
                    other => GgmlType::Unknown(other),
                }
            }

            /// Its number in GGUF files.
            pub fn id(self) -> u32 {
                match self {
                    $(GgmlType::$name => $id,)*
                    GgmlType::Unknown(id) => id,
                }
            }

            /// (elements per block, bytes per block); `None` for unknown types.
            pub fn block(self) -> Option<(usize, usize)> {
                match self {
                    $(GgmlType::$name => Some(($block, $bytes)),)*
                    GgmlType::Unknown(_) => None,
                }
            }

            /// ggml's name of the type.
            pub fn name(self) -> String {
                match self {
                    $(GgmlType::$name => stringify!($name).to_string(),)*
                    GgmlType::Unknown(id) => format!("unknown type {id}"),
                }
            }
        }
    };
}

ggml_types! {
    F32 = 0, 1, 4;
    F16 = 1, 1, 2;
    Q4_0 = 2, 32, 18;
    Q4_1 = 3, 32, 20;
    Q5_0 = 6, 32, 22;
    Q5_1 = 7, 32, 24;
    Q8_0 = 8, 32, 34;
    Q8_1 = 9, 32, 36;
    Q2_K = 10, 256, 84;
    Q3_K = 11, 256, 110;
    Q4_K = 12, 256, 144;
    Q5_K = 13, 256, 176;
    Q6_K = 14, 256, 210;
    Q8_K = 15, 256, 292;
    IQ2_XXS = 16, 256, 66;
    IQ2_XS = 17, 256, 74;
    IQ3_XXS = 18, 256, 98;
    IQ1_S = 19, 256, 50;
    IQ4_NL = 20, 32, 18;
    IQ3_S = 21, 256, 110;
    IQ2_S = 22, 256, 82;
    IQ4_XS = 23, 256, 136;
    I8 = 24, 1, 1;
    I16 = 25, 1, 2;
    I32 = 26, 1, 4;
    I64 = 27, 1, 8;
    F64 = 28, 1, 8;
    IQ1_M = 29, 256, 56;
    BF16 = 30, 1, 2;
    TQ1_0 = 34, 256, 54;
    TQ2_0 = 35, 256, 66;
    MXFP4 = 39, 32, 17;
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Unknown(id) => write!(f, "unknown ggml type {id}"),
            t => write!(f, "{} (ggml type {})", t.name(), t.id()),
        }
    }
}

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = h(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        _ => return None,
    })
}

/// Dequantizes whole blocks of type `ty` to f32; `None` when the type is not supported. `bytes` must be
/// a whole number of blocks (the tensor index guarantees it).
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let f = block_fn(ty)?;
    let (block, block_bytes) = ty.block()?;
    let n_blocks = bytes.len() / block_bytes;
    let mut out = vec![0f32; n_blocks * block];
    // Plain-float types have one-element "blocks": hand them out in bigger runs.
    let per_task = (16384 / block).max(1);
    out.par_chunks_mut(block * per_task)
        .zip(bytes.par_chunks(block_bytes * per_task))
        .for_each(|(y, b)| {
            for (yb, bb) in y.chunks_exact_mut(block).zip(b.chunks_exact(block_bytes)) {
                f(bb, yb);
            }
        });
    Some(out)
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0xF) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let lo = (qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (lo as i32 - 16) as f32;
        y[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let lo = (qs[j] & 0xF) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = d * lo as f32 + m;
        y[j + 16] = d * hi as f32 + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (h(b, 80), h(b, 82));
    for (e, out) in y.iter_mut().enumerate().take(256) {
        let sc = scales[e / 16];
        let dl = d * (sc & 0xF) as f32;
        let ml = dmin * (sc >> 4) as f32;
        let q = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
        *out = dl * q as f32 - ml;
    }
}

fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = h(b, 108);
    let mut scales = [0f32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 { sc[i] & 0xF } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = ((low | high << 4) as i8 - 32) as f32;
    }
    for (e, out) in y.iter_mut().enumerate().take(256) {
        let ql = ((qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3) as i8;
        let qh = ((hmask[e % 32] >> (e / 32)) & 1) ^ 1;
        let q = ql - ((qh << 2) as i8);
        *out = (d * scales[e / 16]) * q as f32;
    }
}

/// The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K block.
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    k_scaled(b, None, &b[16..144], y);
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    k_scaled(b, Some(&b[16..48]), &b[48..176], y);
}

/// Q4_K and Q5_K: eight sub-blocks of 32, each `(d·scale)·q − dmin·min`, q's fifth bit (Q5_K) in `qh`.
fn k_scaled(b: &[u8], qh: Option<&[u8]>, qs: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    for j in 0..8 {
        let d1 = d * sc[j] as f32;
        let m1 = dmin * mn[j] as f32;
        let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
        let shift = 4 * (j % 2);
        for l in 0..32 {
            let high = qh.map_or(0, |qh| ((qh[l] >> j) & 1) << 4);
            y[j * 32 + l] = d1 * (((chunk[l] >> shift) & 0xF) | high) as f32 - m1;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = h(b, 208);
    for (e, out) in y.iter_mut().enumerate().take(256) {
        let (half, r) = (e / 128, e % 128);
        let lo = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
        let hi = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        let q = (lo | hi << 4) as i8 - 32;
        *out = (d * (scales[e / 16] as i8) as f32) * q as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        assert_eq!(GgmlType::from_id(12), GgmlType::Q4_K);
        assert_eq!(GgmlType::Q6_K.block(), Some((256, 210)));
        assert_eq!(GgmlType::from_id(99).block(), None);
        assert_eq!(GgmlType::IQ2_XXS.to_string(), "IQ2_XXS (ggml type 16)");
        assert!(dequantize(GgmlType::IQ2_XXS, &[0; 66]).is_none());
    }

    #[test]
    fn q8_0_and_q4_0_by_hand() {
        // d = 0.5; q = -3..28
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 3) as u8));
        let y = dequantize(GgmlType::Q8_0, &b).expect("q8_0");
        assert_eq!(y[0], -1.5);
        assert_eq!(y[31], 14.0);
        // Q4_0: low nibbles are elements 0..16, high nibbles 16..32, offset 8.
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend((0..16).map(|i| (i as u8) | (15 - i as u8) << 4));
        let y = dequantize(GgmlType::Q4_0, &b).expect("q4_0");
        assert_eq!(y[0], -16.0);
        assert_eq!(y[15], 14.0);
        assert_eq!(y[16], 14.0);
        assert_eq!(y[31], -16.0);
    }
}
