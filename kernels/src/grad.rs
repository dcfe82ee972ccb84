//! Gradients as they arrive on the wire, and decoding them into `f32` sums.

use half::{bf16, f16, slice::HalfFloatSliceExt};

/// Elements processed per block: small enough that a block's partial sum
/// stays in L1, a multiple of 4 so 2-bit blocks start on a byte.
pub const BLOCK: usize = 4096;

/// A gradient in one of the wire encodings. Byte slices are little-endian
/// and need no alignment.
#[derive(Debug, Clone, Copy)]
pub enum Grad<'a> {
    /// `f32` values in memory.
    F32(&'a [f32]),
    /// `f32` little-endian bytes (4 per value).
    F32Le(&'a [u8]),
    /// IEEE half precision little-endian bytes (2 per value).
    F16Le(&'a [u8]),
    /// bfloat16 little-endian bytes (2 per value).
    Bf16Le(&'a [u8]),
    /// MXNet's 2-bit scheme: 4 values per byte, lowest bits first;
    /// `01` is `+threshold`, `10` is `-threshold`, `00` is 0.
    TwoBit {
        /// Packed codes; `len` values.
        packed: &'a [u8],
        /// Number of values.
        len: usize,
        /// The magnitude sent.
        threshold: f32,
    },
}

impl<'a> Grad<'a> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Grad::F32(s) => s.len(),
            Grad::F32Le(b) => b.len() / 4,
            Grad::F16Le(b) | Grad::Bf16Le(b) => b.len() / 2,
            Grad::TwoBit { len, .. } => *len,
        }
    }

    /// True when it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the bytes hold exactly `len()` values.
    pub fn is_well_formed(&self) -> bool {
        match self {
            Grad::F32(_) => true,
            Grad::F32Le(b) => b.len().is_multiple_of(4),
            Grad::F16Le(b) | Grad::Bf16Le(b) => b.len().is_multiple_of(2),
            Grad::TwoBit { packed, len, threshold } => {
                packed.len() == crate::twobit::packed_len(*len) && threshold.is_finite() && *threshold > 0.0
            }
        }
    }

    /// Values `start..end`; for 2-bit, `start` must be a multiple of 4.
    pub(crate) fn range(&self, start: usize, end: usize) -> Grad<'a> {
        match *self {
            Grad::F32(s) => Grad::F32(&s[start..end]),
            Grad::F32Le(b) => Grad::F32Le(&b[start * 4..end * 4]),
            Grad::F16Le(b) => Grad::F16Le(&b[start * 2..end * 2]),
            Grad::Bf16Le(b) => Grad::Bf16Le(&b[start * 2..end * 2]),
            Grad::TwoBit { packed, threshold, .. } => {
                debug_assert!(start.is_multiple_of(4));
                Grad::TwoBit { packed: &packed[start / 4..end.div_ceil(4)], len: end - start, threshold }
            }
        }
    }
}

/// `acc = g` (when `overwrite`) or `acc += g`, for one block.
#[inline(always)]
pub(crate) fn decode_block(acc: &mut [f32], g: &Grad<'_>, overwrite: bool) {
    debug_assert!(acc.len() <= BLOCK && acc.len() == g.len());
    match *g {
        Grad::F32(s) => {
            if overwrite {
                acc.copy_from_slice(s);
            } else {
                for (a, v) in acc.iter_mut().zip(s) {
                    *a += *v;
                }
            }
        }
        Grad::F32Le(b) => {
            let it = acc.iter_mut().zip(b.chunks_exact(4));
            if overwrite {
                for (a, c) in it {
                    *a = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            } else {
                for (a, c) in it {
                    *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        Grad::Bf16Le(b) => {
            let it = acc.iter_mut().zip(b.chunks_exact(2));
            if overwrite {
                for (a, c) in it {
                    *a = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                }
            } else {
                for (a, c) in it {
                    *a += f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                }
            }
        }
        Grad::F16Le(b) => {
            // half's slice conversion uses F16C when the CPU has it.
            let mut halves = [f16::ZERO; BLOCK];
            let n = acc.len();
            for (h, c) in halves[..n].iter_mut().zip(b.chunks_exact(2)) {
                *h = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
            }
            if overwrite {
                halves[..n].convert_to_f32_slice(acc);
            } else {
                let mut tmp = [0f32; BLOCK];
                halves[..n].convert_to_f32_slice(&mut tmp[..n]);
                for (a, v) in acc.iter_mut().zip(&tmp[..n]) {
                    *a += *v;
                }
            }
        }
        Grad::TwoBit { packed, threshold, .. } => {
            // Decompression fused into the sum: one table lookup per value.
            let table = [0.0, threshold, -threshold, 0.0];
            for (i, a) in acc.iter_mut().enumerate() {
                let code = (packed[i >> 2] >> ((i & 3) * 2)) & 3;
                let v = table[code as usize];
                if overwrite {
                    *a = v;
                } else {
                    *a += v;
                }
            }
        }
    }
}

/// bfloat16 of an `f32`, rounded to nearest even (NaN stays NaN).
pub fn to_bf16(v: f32) -> bf16 {
    bf16::from_f32(v)
}
