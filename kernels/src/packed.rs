//! Products of a few rows with a matrix that does not change: the forward
//! pass of a served model, where B is a layer's weights and A the inputs
//! that arrived together (one to a few dozen rows).
//!
//! [`sgemm`](crate::sgemm) streams a row-major B past the rows of C in
//! blocks of columns, so each block walks B with a stride of a whole row
//! (1 KiB for 256 columns): the hardware prefetchers stop at every 4 KiB
//! page, and at serving sizes B (800 KB) comes from L3. [`PackedB`] lays B
//! out once so that every block of 16 columns is one contiguous run, read
//! front to back; on the development machine that halved the time of 2 to
//! 12 rows of 784 x 256 and beat matrixmultiply's blocked kernel (which
//! packs B again on every call) for up to 48 rows (`docs/benchmarks.md`).
//!
//! Each element of C is `fma(a[i][k-1], b[k-1][j], ... fma(a[i][0], b[0][j], 0))`,
//! in that order, whatever the number of rows: an input's result does not
//! depend on which others it was batched with, and for whole blocks of
//! columns it equals the few-rows path of `sgemm` bit for bit.

use crate::Strides;

/// Columns per block: one 64-byte cache line of `f32`, two AVX registers.
const BLOCK: usize = 16;

/// A `k x n` matrix laid out for [`sgemm_packed`]: blocks of [`BLOCK`]
/// columns, each stored row after row (the last block padded with zeros).
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `b` (`k x n`, addressed through `sb`), or `None` if this CPU
    /// has no kernel for the layout (x86-64 without AVX2 and FMA, other
    /// architectures): use [`sgemm`](crate::sgemm) on `b` there.
    ///
    /// # Panics
    /// If `k` or `n` is zero, or `b` is too short for the shape.
    pub fn new(k: usize, n: usize, b: &[f32], sb: Strides) -> Option<PackedB> {
        assert!(k > 0 && n > 0, "PackedB: empty {k}x{n} matrix");
        assert!((k - 1) * sb.row + (n - 1) * sb.col < b.len(), "PackedB: B is too short for {k}x{n}");
        // The kernel needs AVX2 and FMA, as the few-rows path of `sgemm`.
        if !matches!(crate::Isa::best(), crate::Isa::Avx2 | crate::Isa::Avx512) {
            return None;
        }
        let blocks = n.div_ceil(BLOCK);
        let mut data = vec![0f32; blocks * k * BLOCK];
        for (jb, block) in data.chunks_exact_mut(k * BLOCK).enumerate() {
            for (l, row) in block.chunks_exact_mut(BLOCK).enumerate() {
                for (t, v) in row.iter_mut().enumerate().take(n - (jb * BLOCK).min(n)) {
                    *v = b[l * sb.row + (jb * BLOCK + t) * sb.col];
                }
            }
        }
        Some(PackedB { k, n, data })
    }
}

/// `C (m x n) = A (m x k) B (k x n)`: A row-major with row stride `lda`,
/// C row-major and dense.
///
/// # Panics
/// If `lda < k`, or `a` or `c` is too short for the shapes.
pub fn sgemm_packed(m: usize, a: &[f32], lda: usize, b: &PackedB, c: &mut [f32]) {
    let (k, n) = (b.k, b.n);
    if m == 0 {
        return;
    }
    assert!(lda >= k && (m - 1) * lda + k <= a.len(), "sgemm_packed: A is too short for {m}x{k}");
    assert!(c.len() >= m * n, "sgemm_packed: C is too short for {m}x{n}");
    #[cfg(target_arch = "x86_64")]
    {
        let blocks = n.div_ceil(BLOCK);
        let mut i0 = 0;
        while i0 < m {
            // Six rows of a block of C fill 12 of the 16 AVX registers;
            // one or two rows take several blocks at once, so that enough
            // independent FMA chains are in flight to hide their latency
            // (three rows on two blocks ran out of registers: measured
            // slower than on one). Seven or eight rows go as four and the
            // rest, which measured faster than six and the rest.
            let left = m - i0;
            let rows = if left == 7 || left == 8 { 4 } else { left.min(6) };
            let wide = match rows {
                1 => 4,
                2 => 2,
                _ => 1,
            };
            let p = Panel { k, n, a: &a[i0 * lda..], lda, b: &b.data };
            let c = &mut c[i0 * n..(i0 + rows) * n];
            let mut jb = 0;
            while jb < blocks {
                let at_once = if blocks - jb >= wide { wide } else { 1 };
                // SAFETY: `PackedB::new` returned Some, so the CPU has AVX2
                // and FMA. `p.a` holds `rows` rows of `k` values at stride
                // `lda` (asserted above, with `i0 + rows <= m`), `p.b` holds
                // `blocks` packed blocks of `k * BLOCK` values and
                // `jb + at_once <= blocks`, and `c` is `rows x n`.
                unsafe {
                    match (rows, at_once) {
                        (1, 4) => panel::<1, 4>(p, jb, c),
                        (2, 2) => panel::<2, 2>(p, jb, c),
                        (1, _) => panel::<1, 1>(p, jb, c),
                        (2, _) => panel::<2, 1>(p, jb, c),
                        (3, _) => panel::<3, 1>(p, jb, c),
                        (4, _) => panel::<4, 1>(p, jb, c),
                        (5, _) => panel::<5, 1>(p, jb, c),
                        _ => panel::<6, 1>(p, jb, c),
                    }
                }
                jb += at_once;
            }
            i0 += rows;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("PackedB::new returns None on this architecture");
}

/// The operands of one call of [`panel`].
#[derive(Clone, Copy)]
struct Panel<'a> {
    k: usize,
    n: usize,
    a: &'a [f32],
    lda: usize,
    b: &'a [f32],
}

/// Blocks `jb .. jb + NB` of `M` rows of C, each accumulated in registers
/// while its packed block of B is read front to back. Hand-written with
/// intrinsics for the same reason as `avx2_rows` in the crate root: the
/// accumulators must stay in registers.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `p.a` must hold `M` rows of `p.k`
/// values at stride `p.lda`, `p.b` at least `(jb + NB) * p.k * BLOCK`
/// values, and `c` at least `M * p.n`; `jb * BLOCK < p.n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel<const M: usize, const NB: usize>(p: Panel<'_>, jb: usize, c: &mut [f32]) {
    use std::arch::x86_64::*;
    let Panel { k, n, a, lda, b } = p;
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [[[_mm256_setzero_ps(); 2]; NB]; M];
    for l in 0..k {
        let mut bv = [[_mm256_setzero_ps(); 2]; NB];
        for (t, v) in bv.iter_mut().enumerate() {
            let at = ((jb + t) * k + l) * BLOCK;
            // SAFETY: at + 15 < (jb + NB) * k * BLOCK <= b.len().
            unsafe {
                v[0] = _mm256_loadu_ps(bp.add(at));
                v[1] = _mm256_loadu_ps(bp.add(at + 8));
            }
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: i * lda + l < (M - 1) * lda + k <= a.len().
            let x = _mm256_set1_ps(unsafe { *ap.add(i * lda + l) });
            for (r, v) in row.iter_mut().zip(&bv) {
                r[0] = _mm256_fmadd_ps(x, v[0], r[0]);
                r[1] = _mm256_fmadd_ps(x, v[1], r[1]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (t, r) in row.iter().enumerate() {
            let j = (jb + t) * BLOCK;
            let mut out = [0f32; BLOCK];
            // SAFETY: `out` holds 16 values.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), r[0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), r[1]);
            }
            // The padded columns of the last block are not written.
            let cols = BLOCK.min(n - j);
            c[i * n + j..i * n + j + cols].copy_from_slice(&out[..cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each element as a chain of FMAs in the order of `l`.
    fn reference(m: usize, k: usize, n: usize, a: &[f32], lda: usize, b: &[f32], sb: Strides) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f32;
                for l in 0..k {
                    acc = a[i * lda + l].mul_add(b[l * sb.row + j * sb.col], acc);
                }
                c[i * n + j] = acc;
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        // Irregular values of mixed sign and magnitude, so that any change
        // of order or of rounding shows in the low bits.
        (0..len as u32)
            .map(|i| {
                let h = (i ^ seed).wrapping_mul(0x9e37_79b9).rotate_left(13).wrapping_mul(0x85eb_ca6b);
                (h >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_element_is_the_fma_chain_in_order_for_any_number_of_rows_and_columns() {
        for (k, n) in [(1, 1), (3, 7), (17, 16), (784, 256), (256, 10), (33, 50), (5, 65)] {
            for sb in [Strides::row_major(n), Strides::transposed(k)] {
                let b = values(k * n, 7);
                let Some(packed) = PackedB::new(k, n, &b, sb) else {
                    eprintln!("no packed kernel on this CPU; nothing to check");
                    return;
                };
                for m in [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 19] {
                    let lda = k + 3;
                    let a = values(m * lda, 11);
                    let mut c = vec![f32::NAN; m * n + 5];
                    sgemm_packed(m, &a, lda, &packed, &mut c);
                    let want = reference(m, k, n, &a, lda, &b, sb);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&c[..m * n]), bits(&want), "m={m} k={k} n={n} {sb:?}");
                    assert!(c[m * n..].iter().all(|v| v.is_nan()), "wrote past C: m={m} k={k} n={n}");
                }
            }
        }
    }

    #[test]
    fn whole_blocks_equal_the_few_rows_path_of_sgemm() {
        let (k, n) = (784, 256);
        let b = values(k * n, 3);
        let Some(packed) = PackedB::new(k, n, &b, Strides::row_major(n)) else { return };
        for m in 1..=12 {
            let a = values(m * k, 5);
            let (mut c, mut want) = (vec![0f32; m * n], vec![0f32; m * n]);
            sgemm_packed(m, &a, k, &packed, &mut c);
            crate::sgemm(m, k, n, &a, Strides::row_major(k), &b, Strides::row_major(n), &mut want, false);
            assert!(c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "m={m}");
        }
    }
}
