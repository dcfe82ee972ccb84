//! MXNet's 2-bit gradient compression with error feedback.
//!
//! Each value of `residual + gradient` at or beyond `+threshold` is sent as
//! `+threshold`, at or beyond `-threshold` as `-threshold`, anything else as
//! 0; what was not sent stays in the residual and is added next time, so
//! over many steps the receiver sees the full sum. Four values per byte,
//! lowest bits first: `01` = `+threshold`, `10` = `-threshold`, `00` = 0.
//! Decompression is fused into the server's sum ([`crate::Grad::TwoBit`]).

use crate::isa::{Isa, multiversion};

/// Bytes needed for `n` values.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(4)
}

#[inline(always)]
fn encode_body(grad: &[f32], residual: &mut [f32], threshold: f32, out: &mut [u8]) {
    for ((byte, g4), r4) in out.iter_mut().zip(grad.chunks(4)).zip(residual.chunks_mut(4)) {
        let mut b = 0u8;
        for (j, (g, r)) in g4.iter().zip(r4.iter_mut()).enumerate() {
            // Selects instead of branches, so the loop vectorises. `v - sent`
            // is bit for bit what `v - threshold`, `v + threshold` and `v`
            // give in the three cases (a NaN sends nothing and stays).
            let v = *r + *g;
            let (up, down) = (v >= threshold, v <= -threshold);
            let sent = if up {
                threshold
            } else if down {
                -threshold
            } else {
                0.0
            };
            *r = v - sent;
            b |= (u8::from(up) | (u8::from(down) << 1)) << (2 * j);
        }
        *byte = b;
    }
}

multiversion!(fn encode_isa(grad: &[f32], residual: &mut [f32], threshold: f32, out: &mut [u8]) => encode_body);

/// Appends the 2-bit encoding of `residual + grad` to `out` and keeps what
/// was not sent in `residual`.
///
/// # Panics
/// If the lengths differ or `threshold` is not a positive finite number.
pub fn encode(grad: &[f32], residual: &mut [f32], threshold: f32, out: &mut Vec<u8>) {
    encode_with(Isa::best(), grad, residual, threshold, out)
}

/// [`encode`] on a chosen instruction set.
///
/// # Panics
/// As [`encode`], and if `isa` is not supported by this CPU.
pub fn encode_with(isa: Isa, grad: &[f32], residual: &mut [f32], threshold: f32, out: &mut Vec<u8>) {
    assert_eq!(grad.len(), residual.len(), "twobit::encode: length mismatch");
    assert!(threshold.is_finite() && threshold > 0.0, "twobit::encode: threshold must be positive");
    let start = out.len();
    out.resize(start + packed_len(grad.len()), 0);
    encode_isa(isa, grad, residual, threshold, &mut out[start..]);
}
