//! Wire encodings: `f32` to and from little-endian `f32`, IEEE half and
//! bfloat16 bytes. Narrowing rounds to nearest, ties to even (the `half`
//! crate's conversions, which use F16C where the CPU has it); NaN stays NaN
//! and out-of-range values become infinities.

use half::{bf16, f16, slice::HalfFloatSliceExt};

/// Appends `src` as little-endian `f32` bytes (one copy on little-endian machines).
pub fn extend_f32_le(out: &mut Vec<u8>, src: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(src));
    } else {
        out.reserve(src.len() * 4);
        for v in src {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Copies little-endian `f32` bytes into `dst`.
///
/// # Panics
/// If `src.len() != 4 * dst.len()`.
pub fn copy_f32_le(dst: &mut [f32], src: &[u8]) {
    assert_eq!(src.len(), dst.len() * 4, "copy_f32_le: length mismatch");
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(src);
    } else {
        for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
}

/// Appends `src` as little-endian IEEE half-precision bytes.
pub fn extend_f16_le(out: &mut Vec<u8>, src: &[f32]) {
    extend_narrow(out, src, |h: &mut [f16], s| h.convert_from_f32_slice(s))
}

/// Appends `src` as little-endian bfloat16 bytes.
pub fn extend_bf16_le(out: &mut Vec<u8>, src: &[f32]) {
    extend_narrow(out, src, |h: &mut [bf16], s| h.convert_from_f32_slice(s))
}

/// Narrows `src` chunk by chunk with `convert` and appends the 16-bit
/// values little-endian: on a little-endian machine, as one copy of the
/// chunk's bytes.
fn extend_narrow<H: bytemuck::Pod + Default>(out: &mut Vec<u8>, src: &[f32], convert: impl Fn(&mut [H], &[f32])) {
    out.reserve(src.len() * 2);
    let mut halves = [H::default(); 1024];
    for chunk in src.chunks(halves.len()) {
        let h = &mut halves[..chunk.len()];
        convert(h, chunk);
        let bytes: &[u8] = bytemuck::cast_slice(h);
        if cfg!(target_endian = "little") {
            out.extend_from_slice(bytes);
        } else {
            for pair in bytes.chunks_exact(2) {
                out.extend_from_slice(&[pair[1], pair[0]]);
            }
        }
    }
}
