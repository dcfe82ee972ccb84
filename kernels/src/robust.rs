//! Robust aggregation: per coordinate, the trimmed mean or the median of the
//! workers' gradients instead of their mean, so that a minority of workers
//! pushing whatever they like cannot move the update where they want
//! (Yin et al. 2018).
//!
//! For each block of [`BLOCK`] elements the gradients are decoded into
//! L1/L2-resident rows (one per worker), sorted per column by a fixed
//! sorting network (Batcher's odd-even merge sort, whose compare-exchanges
//! are `min`/`max` over whole rows: the compiler vectorises them on every
//! instruction set of [`crate::isa`]), and the kept rows are added in
//! sorted order. Negative zeros become positive zeros on decoding, so every
//! column has one sorted order and the result does not depend on the order
//! the gradients came in. Gradients must be finite (a server refuses others
//! on arrival); a NaN would not crash the kernel but would make the column's
//! order meaningless.

use crate::grad::{BLOCK, Grad, decode_block};

/// How a step's gradients are combined into the one the update applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Their sum, scaled by the update's `scale` (the mean with 1 / workers).
    Mean,
    /// Per coordinate: the `trim` smallest and `trim` largest values
    /// dropped, the rest averaged. Needs more than `2 * trim` gradients.
    TrimmedMean {
        /// Values dropped at each end.
        trim: usize,
    },
    /// Per coordinate: the middle value (the mean of the two middle values
    /// for an even count).
    Median,
}

impl Combine {
    /// Whether `n` gradients are enough for this rule.
    pub fn admits(self, n: usize) -> bool {
        match self {
            Combine::Mean => true,
            Combine::TrimmedMean { trim } => n > 2 * trim,
            Combine::Median => n >= 1,
        }
    }
}

/// The compare-exchanges of Batcher's odd-even merge sort for `n` wires, in
/// order (`(a, b)` with `a < b`: `a` gets the smaller value). Built for the
/// next power of two; comparators that touch a wire at or past `n` are
/// dropped, which sorts `n` values as if the missing ones were +infinity.
pub fn sorting_network(n: usize) -> Vec<(usize, usize)> {
    let size = n.next_power_of_two();
    let mut out = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < size {
                for i in 0..k.min(size - j - k) {
                    let (a, b) = (i + j, i + j + k);
                    if (a / (2 * p)) == (b / (2 * p)) && b < n {
                        out.push((a, b));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    out
}

/// The combined gradient of one block: `acc[i]` from column `i` of the
/// gradients' values `start..start + acc.len()`. `rows` is scratch space of
/// at least `grads.len() * acc.len()` values.
#[inline(always)]
pub(crate) fn combine_block(
    acc: &mut [f32],
    rows: &mut [f32],
    grads: &[Grad<'_>],
    start: usize,
    combine: Combine,
    network: &[(usize, usize)],
) {
    let len = acc.len();
    let n = grads.len();
    debug_assert!(len <= BLOCK && rows.len() >= n * len && start.is_multiple_of(4));
    for (k, g) in grads.iter().enumerate() {
        let row = &mut rows[k * len..(k + 1) * len];
        decode_block(row, &g.range(start, start + len), true);
        for v in row.iter_mut() {
            // -0.0 + 0.0 is +0.0: one zero, one sorted order.
            *v += 0.0;
        }
    }
    // The network runs over tiles of columns whose rows fit in L1 together
    // (the rows of a whole block may not), then each tile is combined.
    let tile = (TILE_VALUES / n.max(1)).clamp(16, len.max(16));
    let mut t0 = 0;
    while t0 < len {
        let t1 = (t0 + tile).min(len);
        sort_columns(rows, len, t0..t1, network);
        combine_columns(&mut acc[t0..t1], rows, len, n, t0, combine);
        t0 = t1;
    }
}

/// Values of all rows that one tile keeps in L1 (32 KiB).
const TILE_VALUES: usize = 8192;

/// Sorts columns `cols` of the `n` rows of `len` values in `rows`.
#[inline(always)]
fn sort_columns(rows: &mut [f32], len: usize, cols: std::ops::Range<usize>, network: &[(usize, usize)]) {
    for &(a, b) in network {
        let (lo, hi) = rows.split_at_mut(b * len);
        let ra = &mut lo[a * len + cols.start..a * len + cols.end];
        let rb = &mut hi[cols.start..cols.end];
        for (x, y) in ra.iter_mut().zip(rb.iter_mut()) {
            // Selects, not f32::min/max (whose NaN rules cost extra
            // instructions): one `minps` and one `maxps` per vector.
            let (u, v) = (*x, *y);
            let less = u < v;
            *x = if less { u } else { v };
            *y = if less { v } else { u };
        }
    }
}

/// `acc` from the sorted columns `t0..t0 + acc.len()` of the `n` rows.
#[inline(always)]
fn combine_columns(acc: &mut [f32], rows: &[f32], len: usize, n: usize, t0: usize, combine: Combine) {
    let width = acc.len();
    let row = |k: usize| &rows[k * len + t0..k * len + t0 + width];
    match combine {
        Combine::Mean => unreachable!("the mean is summed by the plain kernels"),
        Combine::TrimmedMean { trim } => {
            let kept = n - 2 * trim;
            acc.copy_from_slice(row(trim));
            for k in trim + 1..n - trim {
                for (a, v) in acc.iter_mut().zip(row(k)) {
                    *a += *v;
                }
            }
            let inv = 1.0 / kept as f32;
            for a in acc.iter_mut() {
                *a *= inv;
            }
        }
        Combine::Median => {
            let mid = n / 2;
            if n % 2 == 1 {
                acc.copy_from_slice(row(mid));
            } else {
                for ((a, x), y) in acc.iter_mut().zip(row(mid - 1)).zip(row(mid)) {
                    *a = (*x + *y) * 0.5;
                }
            }
        }
    }
}

/// Every gradient decoded, one value at a time per block (for the references).
fn decode_all(grads: &[Grad<'_>], len: usize) -> Vec<Vec<f32>> {
    grads
        .iter()
        .map(|g| {
            let mut v = vec![0.0; len];
            for start in (0..len).step_by(BLOCK) {
                let end = (start + BLOCK).min(len);
                decode_block(&mut v[start..end], &g.range(start, end), true);
            }
            v
        })
        .collect()
}

/// The plain reference: column by column, the values decoded one at a
/// time, sorted with `total_cmp` and combined as [`Combine`] says, adding
/// in sorted order. What the kernels must equal to the bit.
pub fn reference(grads: &[Grad<'_>], combine: Combine) -> Vec<f32> {
    let len = grads.first().map_or(0, |g| g.len());
    let decoded = decode_all(grads, len);
    let n = grads.len();
    (0..len)
        .map(|i| {
            let mut col: Vec<f32> = decoded.iter().map(|v| v[i] + 0.0).collect();
            col.sort_by(f32::total_cmp);
            match combine {
                Combine::Mean => col.iter().sum(),
                Combine::TrimmedMean { trim } => {
                    let mut s = col[trim];
                    for v in &col[trim + 1..n - trim] {
                        s += *v;
                    }
                    s * (1.0 / (n - 2 * trim) as f32)
                }
                Combine::Median if n % 2 == 1 => col[n / 2],
                Combine::Median => (col[n / 2 - 1] + col[n / 2]) * 0.5,
            }
        })
        .collect()
}

/// Centered clipping (Karimireddy, He and Jaggi, ICML 2021), one
/// iteration: with `center` the previous step's combined gradient,
///
/// `combined = center + (1 / N) * sum_k s_k * (g_k - center)`,
/// `s_k = min(1, radius / |g_k - center|)`,
///
/// so a gradient far from the center moves the result by at most
/// `radius / N`. This computes the `s_k` (norms over the whole slice, in
/// f64 lanes of a fixed order: the same bits on every instruction set and
/// thread count); [`centered_block`] then combines block by block.
pub fn centered_weights(grads: &[Grad<'_>], center: &[f32], radius: f32, threads: usize) -> Vec<f32> {
    let n = grads.len();
    let isa = crate::isa::Isa::best();
    let weight = |g: &Grad<'_>| {
        let norm = distance2_isa(isa, g, center).sqrt();
        let s = if norm > f64::from(radius) { f64::from(radius) / norm } else { 1.0 };
        (s / n as f64) as f32
    };
    // Each gradient's distance is one thread's work: the same bits whatever
    // the split.
    let per = n.div_ceil(threads.max(1)).max(1);
    if threads <= 1 || n < 2 || center.len() < crate::parallel::MIN_PER_THREAD {
        return grads.iter().map(weight).collect();
    }
    std::thread::scope(|scope| {
        let parts: Vec<_> =
            grads.chunks(per).map(|part| scope.spawn(move || part.iter().map(weight).collect::<Vec<_>>())).collect();
        parts.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// Lanes of the squared distance: value `i` adds into lane `i % LANES`, and
/// the lanes are added in order at the end. Fixed, so every instruction set
/// gives the same bits (and the additions pipeline instead of waiting on
/// each other).
const LANES: usize = 8;

/// The squared L2 distance between `g` and `center`, in f64.
#[inline(always)]
fn distance2_body(g: &Grad<'_>, center: &[f32]) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut row = [0f32; 1024];
    for start in (0..center.len()).step_by(row.len()) {
        let end = (start + row.len()).min(center.len());
        let r = &mut row[..end - start];
        decode_block(r, &g.range(start, end), true);
        let c = &center[start..end];
        let (rw, rr) = r.as_chunks::<LANES>();
        let (cw, cr) = c.as_chunks::<LANES>();
        for (v, c) in rw.iter().zip(cw) {
            for l in 0..LANES {
                let d = f64::from(v[l] - c[l]);
                lanes[l] += d * d;
            }
        }
        // A block starts at a multiple of LANES: its tail starts at lane 0.
        for (l, (v, c)) in rr.iter().zip(cr).enumerate() {
            let d = f64::from(*v - *c);
            lanes[l] += d * d;
        }
    }
    lanes.iter().fold(0.0, |s, l| s + l)
}

crate::isa::multiversion!(fn distance2_isa(g: &Grad<'_>, center: &[f32]) -> f64 => distance2_body);

/// One block of centered clipping: `acc = center + sum_k w_k * (g_k -
/// center)` with the weights of [`centered_weights`], added in gradient
/// order; `row` is scratch of at least `acc.len()` values.
#[inline(always)]
pub(crate) fn centered_block(
    acc: &mut [f32],
    row: &mut [f32],
    center: &[f32],
    grads: &[Grad<'_>],
    start: usize,
    weights: &[f32],
) {
    let len = acc.len();
    let row = &mut row[..len];
    acc.fill(0.0);
    for (g, w) in grads.iter().zip(weights) {
        decode_block(row, &g.range(start, start + len), true);
        for ((a, v), c) in acc.iter_mut().zip(row.iter()).zip(center) {
            *a += *w * (*v - *c);
        }
    }
    for (a, c) in acc.iter_mut().zip(center) {
        *a += *c;
    }
}

/// The plain reference of centered clipping, element by element.
pub fn centered_reference(grads: &[Grad<'_>], center: &[f32], radius: f32) -> Vec<f32> {
    let len = center.len();
    let decoded = decode_all(grads, len);
    let n = grads.len() as f64;
    let weights: Vec<f32> = decoded
        .iter()
        .map(|v| {
            let mut lanes = [0f64; LANES];
            for (i, (x, c)) in v.iter().zip(center).enumerate() {
                lanes[i % LANES] += f64::from(x - c) * f64::from(x - c);
            }
            let norm = lanes.iter().fold(0.0, |s, l| s + l).sqrt();
            let s = if norm > f64::from(radius) { f64::from(radius) / norm } else { 1.0 };
            (s / n) as f32
        })
        .collect();
    (0..len)
        .map(|i| {
            let mut a = 0f32;
            for (v, w) in decoded.iter().zip(&weights) {
                a += w * (v[i] - center[i]);
            }
            a + center[i]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every network sorts every 0/1 input of its size (the 0-1 principle:
    /// then it sorts everything).
    #[test]
    fn the_networks_sort() {
        for n in 1..=12 {
            let net = sorting_network(n);
            for bits in 0u32..(1 << n) {
                let mut v: Vec<u32> = (0..n).map(|i| (bits >> i) & 1).collect();
                for &(a, b) in &net {
                    assert!(a < b);
                    if v[a] > v[b] {
                        v.swap(a, b);
                    }
                }
                assert!(v.windows(2).all(|w| w[0] <= w[1]), "n = {n}, input {bits:b}: {v:?}");
            }
        }
    }
}
