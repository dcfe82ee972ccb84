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

    /// The sum of the squared values (the squared L2 norm), or `None` when
    /// a value is not finite (NaN or infinity). One pass over the values
    /// at memory speed, on the best instruction set of this CPU.
    pub fn finite_sum_squares(&self) -> Option<f64> {
        let (finite, sum) = sum_squares_isa(crate::isa::Isa::best(), self);
        finite.then_some(sum)
    }

    /// Values `start..end`; for 2-bit, `start` must be a multiple of 4.
    pub fn range(&self, start: usize, end: usize) -> Grad<'a> {
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
            // Little-endian f16 bytes are the values themselves on a
            // little-endian machine when 2-byte aligned: half's slice
            // conversion (F16C where the CPU has it) reads them in place.
            let halves: Option<&[f16]> =
                if cfg!(target_endian = "little") { bytemuck::try_cast_slice(b).ok() } else { None };
            match halves {
                Some(h) if overwrite => h.convert_to_f32_slice(acc),
                Some(h) => {
                    let mut tmp = [0f32; 512];
                    for (a, h) in acc.chunks_mut(512).zip(h.chunks(512)) {
                        let t = &mut tmp[..a.len()];
                        h.convert_to_f32_slice(t);
                        for (a, v) in a.iter_mut().zip(t.iter()) {
                            *a += *v;
                        }
                    }
                }
                None => {
                    for (a, c) in acc.iter_mut().zip(b.chunks_exact(2)) {
                        let v = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                        *a = if overwrite { v } else { *a + v };
                    }
                }
            }
        }
        Grad::TwoBit { packed, threshold, .. } => {
            // Decompression fused into the sum: each byte's four values come
            // from a 256-entry table (4 KiB, kept per thread for the last
            // threshold seen), one 16-byte load per byte.
            TWO_BIT.with(|cell| {
                let mut lut = cell.take();
                if lut.threshold != Some(threshold.to_bits()) {
                    lut.fill(threshold);
                }
                let (whole, rest) = acc.as_chunks_mut::<4>();
                for (a4, &byte) in whole.iter_mut().zip(packed) {
                    let v = &lut.values[usize::from(byte)];
                    if overwrite {
                        *a4 = *v;
                    } else {
                        for (a, v) in a4.iter_mut().zip(v) {
                            *a += *v;
                        }
                    }
                }
                if let Some(&byte) = packed.get(whole.len()) {
                    for (a, v) in rest.iter_mut().zip(&lut.values[usize::from(byte)]) {
                        *a = if overwrite { *v } else { *a + *v };
                    }
                }
                cell.set(lut);
            });
        }
    }
}

/// The four values of every 2-bit byte for one threshold.
#[derive(Default)]
struct TwoBitTable {
    threshold: Option<u32>,
    values: Box<[[f32; 4]]>,
}

impl TwoBitTable {
    fn fill(&mut self, threshold: f32) {
        // Codes: 1 is +threshold, 2 is -threshold, 0 and 3 are 0.
        let code = [0.0, threshold, -threshold, 0.0];
        self.values = (0..256usize).map(|b| std::array::from_fn(|j| code[(b >> (2 * j)) & 3])).collect();
        self.threshold = Some(threshold.to_bits());
    }
}

thread_local! {
    static TWO_BIT: std::cell::Cell<TwoBitTable> = std::cell::Cell::new(TwoBitTable::default());
}

/// bfloat16 of an `f32`, rounded to nearest even (NaN stays NaN).
pub fn to_bf16(v: f32) -> bf16 {
    bf16::from_f32(v)
}

/// Whether all of `g` is finite, and the sum of its squares (in f32 lanes,
/// then f64: a norm for comparing workers, not an exact figure).
#[inline(always)]
fn sum_squares_body(g: &Grad<'_>) -> (bool, f64) {
    let mut lanes = [0f32; LANES];
    let mut ok = true;
    match *g {
        Grad::F32(s) => add_squares(&mut lanes, &mut ok, s),
        // Read where they are, as [`SquaresLe`] reads them a piece at a time.
        Grad::F32Le(b) => ok = squares_more_body(&mut lanes, b),
        _ => {
            // Other encodings are decoded a block at a time first.
            let mut buf = [0f32; 1024];
            let n = g.len();
            let mut start = 0;
            while start < n {
                let end = (start + buf.len()).min(n);
                let b = &mut buf[..end - start];
                decode_block(b, &g.range(start, end), true);
                add_squares(&mut lanes, &mut ok, b);
                start = end;
            }
        }
    }
    (ok, lanes.iter().map(|&l| f64::from(l)).sum())
}

const LANES: usize = 16;

/// Adds the squares of `v` into `lanes`, and whether all are finite into `ok`.
#[inline(always)]
fn add_squares(lanes: &mut [f32; LANES], ok: &mut bool, v: &[f32]) {
    let (whole, rest) = v.as_chunks::<LANES>();
    for c in whole {
        for (l, x) in lanes.iter_mut().zip(c) {
            *ok &= x.is_finite();
            *l += x * x;
        }
    }
    for (l, x) in lanes.iter_mut().zip(rest) {
        *ok &= x.is_finite();
        *l += x * x;
    }
}

crate::isa::multiversion!(fn sum_squares_isa(g: &Grad<'_>) -> (bool, f64) => sum_squares_body);

/// [`Grad::finite_sum_squares`] of little-endian f32 bytes that arrive a
/// piece at a time (each piece read while it is in cache): the same
/// result, bit for bit, as the whole at once, whatever the pieces.
#[derive(Debug, Clone)]
pub struct SquaresLe {
    lanes: [f32; LANES],
    ok: bool,
    /// Bytes of a value group not yet added (so that each value meets the
    /// lane it meets in the whole at once).
    held: [u8; 4 * LANES],
    held_len: usize,
}

impl Default for SquaresLe {
    fn default() -> Self {
        SquaresLe { lanes: [0.0; LANES], ok: true, held: [0; 4 * LANES], held_len: 0 }
    }
}

impl SquaresLe {
    /// Adds the next bytes, in order.
    pub fn add(&mut self, mut bytes: &[u8]) {
        let isa = crate::isa::Isa::best();
        if self.held_len > 0 {
            let take = (self.held.len() - self.held_len).min(bytes.len());
            self.held[self.held_len..self.held_len + take].copy_from_slice(&bytes[..take]);
            self.held_len += take;
            bytes = &bytes[take..];
            if self.held_len < self.held.len() {
                return;
            }
            let held = self.held;
            self.ok &= squares_more_isa(isa, &mut self.lanes, &held);
            self.held_len = 0;
        }
        let whole = bytes.len() / self.held.len() * self.held.len();
        self.ok &= squares_more_isa(isa, &mut self.lanes, &bytes[..whole]);
        let rest = &bytes[whole..];
        self.held[..rest.len()].copy_from_slice(rest);
        self.held_len = rest.len();
    }

    /// The sum of squares of every value added, or `None` if one is not
    /// finite (or the bytes do not end on a whole value).
    pub fn finish(mut self) -> Option<f64> {
        if !self.held_len.is_multiple_of(4) {
            return None;
        }
        let held = self.held;
        self.ok &= squares_more_isa(crate::isa::Isa::best(), &mut self.lanes, &held[..self.held_len]);
        self.ok.then(|| self.lanes.iter().map(|&l| f64::from(l)).sum())
    }
}

/// Adds the squares of little-endian f32 `bytes` (starting at a value
/// whose index is a multiple of [`LANES`]) into `lanes`; whether all are
/// finite. Read where they are (unaligned): [`sum_squares_body`] of the
/// whole adds them the same way, so the figures agree to the bit.
#[inline(always)]
fn squares_more_body(lanes: &mut [f32; LANES], bytes: &[u8]) -> bool {
    let mut ok = true;
    let (groups, rest) = bytes.as_chunks::<{ 4 * LANES }>();
    for g in groups {
        for (l, x) in lanes.iter_mut().zip(g.as_chunks::<4>().0) {
            let x = f32::from_le_bytes(*x);
            ok &= x.is_finite();
            *l += x * x;
        }
    }
    for (l, x) in lanes.iter_mut().zip(rest.as_chunks::<4>().0) {
        let x = f32::from_le_bytes(*x);
        ok &= x.is_finite();
        *l += x * x;
    }
    ok
}

crate::isa::multiversion!(fn squares_more_isa(lanes: &mut [f32; LANES], bytes: &[u8]) -> bool => squares_more_body);
