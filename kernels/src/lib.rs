//! Reduction and optimizer kernels for warden's parameter servers.
//!
//! The servers' hot loop sums workers' gradients and applies the optimizer;
//! it is bound by memory bandwidth. This crate owns those loops behind a
//! safe API:
//!
//! - [`aggregate_update`]: sum N gradients (in any wire encoding, see
//!   [`Grad`]), scale, clip and apply SGD / momentum / Adam / AdamW to the
//!   parameters and optimizer state in one pass over memory; [`sum`].
//! - [`convert`]: `f32` to and from little-endian f32, f16 and bf16 bytes.
//! - [`twobit`]: MXNet's 2-bit compression with error feedback (its
//!   decompression is fused into the sum).
//! - [`sgemm`]: matrix products for the workers (matrixmultiply);
//!   [`sgemm_packed`]: a few rows against a matrix laid out once
//!   ([`PackedB`]), for serving.
//!
//! One body per kernel, compiled for AVX-512, AVX2 and the baseline and
//! dispatched at run time ([`isa`]); large slices are split over threads
//! ([`parallel`]). This is the only crate of the workspace allowed
//! `unsafe`; every block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]
#![deny(missing_docs)]

pub mod convert;
pub mod grad;
pub mod isa;
pub mod packed;
pub mod parallel;
pub mod robust;
pub mod twobit;
pub mod update;

pub use grad::{Grad, SquaresLe};
pub use isa::Isa;
pub use packed::{PackedB, sgemm_packed};
pub use robust::Combine;
pub use update::{
    GradPrep, Rule, Update, aggregate_update, aggregate_update_with, centered_clip_update_with, combine_update_with,
    state_slots, sum, sum_with,
};

/// Strides of a matrix operand: element (i, j) is at `i * row + j * col`.
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    /// Distance between rows.
    pub row: usize,
    /// Distance between columns.
    pub col: usize,
}

impl Strides {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(cols: usize) -> Strides {
        Strides { row: cols, col: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(cols: usize) -> Strides {
        Strides { row: 1, col: cols }
    }
}

/// Up to this many rows of A, [`sgemm`] skips packing (see there): with
/// AVX2, blocks of four rows each stream B once, and up to 12 rows that
/// beats matrixmultiply, which took about 107 us for any m up to 8 at
/// 784 x 256 (packing B first) where one streamed row takes about 18 us;
/// the generic body re-reads C for every row of B and is kept to 4 rows.
fn few_rows_limit(isa: Isa) -> usize {
    match isa {
        Isa::Avx2 | Isa::Avx512 => 12,
        Isa::Scalar => 4,
    }
}

/// The few-rows path of [`sgemm`]: `C (m x n) = A (m x k) B (k x n)` with B
/// row-major (row stride `b_row`), B streamed once for all rows of C (which
/// stay in L1): at this size B's bytes are the cost.
#[inline(always)]
fn small_rows_body(p: FewRows<'_>, c: &mut [f32]) {
    let FewRows { m, k, n, a, sa, b, b_row, accumulate } = p;
    if !accumulate {
        c[..m * n].fill(0.0);
    }
    for l in 0..k {
        let b_l = &b[l * b_row..l * b_row + n];
        for (i, row) in c[..m * n].chunks_exact_mut(n).enumerate() {
            let x = a[i * sa.row + l * sa.col];
            for (out, w) in row.iter_mut().zip(b_l) {
                *out += x * *w;
            }
        }
    }
}

isa::multiversion!(fn small_rows_generic(p: FewRows<'_>, c: &mut [f32]) => small_rows_body);

/// The operands of a few-rows product (all but C): `C (m x n) (+)= A (m x k)
/// B (k x n)`, B row-major with row stride `b_row`.
#[derive(Debug, Clone, Copy)]
struct FewRows<'a> {
    m: usize,
    k: usize,
    n: usize,
    a: &'a [f32],
    sa: Strides,
    b: &'a [f32],
    b_row: usize,
    accumulate: bool,
}

/// The few-rows path on `isa`. With AVX2, whole blocks of columns run in
/// [`avx2_rows`] and the rest in the generic body.
fn small_rows(isa: Isa, p: FewRows<'_>, c: &mut [f32]) {
    let FewRows { m, k, n, a, sa, b, b_row, accumulate } = p;
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.supported() && k > 0 {
        // Groups of up to four rows of C (each a dense rows x n matrix),
        // each group streaming B once.
        for i0 in (0..m).step_by(4) {
            let rows = (m - i0).min(4);
            let c = &mut c[i0 * n..(i0 + rows) * n];
            let a = &a[i0 * sa.row..];
            assert!((rows - 1) * sa.row + (k - 1) * sa.col < a.len() && (k - 1) * b_row + n <= b.len());
            // SAFETY: the CPU has AVX2 and FMA (`isa.supported()`), `c`
            // holds rows x n values, and the bounds on A and B were
            // asserted just above.
            let group = FewRows { m: rows, a, ..p };
            let full = unsafe {
                match rows {
                    1 => avx2_rows::<1, 8>(group, c),
                    2 => avx2_rows::<2, 4>(group, c),
                    3 => avx2_rows::<3, 2>(group, c),
                    _ => avx2_rows::<4, 2>(group, c),
                }
            };
            if full < n {
                // The columns past the last whole block.
                let rest = n - full;
                let mut tail = vec![0f32; rows * rest];
                if accumulate {
                    for i in 0..rows {
                        tail[i * rest..(i + 1) * rest].copy_from_slice(&c[i * n + full..(i + 1) * n]);
                    }
                }
                small_rows_generic(isa, FewRows { n: rest, b: &b[full..], ..group }, &mut tail);
                for i in 0..rows {
                    c[i * n + full..(i + 1) * n].copy_from_slice(&tail[i * rest..(i + 1) * rest]);
                }
            }
        }
        return;
    }
    small_rows_generic(isa, p, c)
}

/// `C (M x n) (+)= A (M x k) B (k x n)` for the first `n / (8 V) * 8 V`
/// columns; returns how many columns that is. Hand-written with AVX2
/// intrinsics because the same loops over arrays of accumulators, left to
/// the compiler, ran slower than the simple loop (measured). Here the M x V
/// registers of C's column block stay in registers while B's rows stream
/// past, so every element of B is loaded once and C is written once per
/// block (the generic body loads and stores C once per row of B: 66 us
/// against 37 us for 4 rows of 784 x 256 on the development machine).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `c.len() >= M * n`,
/// `(M - 1) * sa.row + (k - 1) * sa.col < a.len()`, `(k - 1) * b_row + n <= b.len()`, `k > 0`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_rows<const M: usize, const V: usize>(p: FewRows<'_>, c: &mut [f32]) -> usize {
    let FewRows { k, n, a, sa, b, b_row, accumulate, .. } = p;
    use std::arch::x86_64::*;
    let w = 8 * V;
    let full = n / w * w;
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut j0 = 0;
    while j0 < full {
        let mut acc = [[_mm256_setzero_ps(); V]; M];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, r) in row.iter_mut().enumerate() {
                    // SAFETY: i * n + j0 + 8v + 7 < (M - 1) * n + full <= M * n <= c.len().
                    *r = unsafe { _mm256_loadu_ps(cp.add(i * n + j0 + 8 * v)) };
                }
            }
        }
        for l in 0..k {
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, x) in bv.iter_mut().enumerate() {
                // SAFETY: l * b_row + j0 + 8v + 7 < (k - 1) * b_row + full <= (k - 1) * b_row + n <= b.len().
                *x = unsafe { _mm256_loadu_ps(bp.add(l * b_row + j0 + 8 * v)) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: i * sa.row + l * sa.col <= (M - 1) * sa.row + (k - 1) * sa.col < a.len().
                let x = _mm256_set1_ps(unsafe { *ap.add(i * sa.row + l * sa.col) });
                for (r, y) in row.iter_mut().zip(&bv) {
                    *r = _mm256_fmadd_ps(x, *y, *r);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, r) in row.iter().enumerate() {
                // SAFETY: as for the loads from C above.
                unsafe { _mm256_storeu_ps(cp.add(i * n + j0 + 8 * v), *r) };
            }
        }
        j0 += w;
    }
    full
}

/// SGEMM: `C (m x n) = A (m x k) * B (k x n)` (or `C += A * B` with
/// `accumulate`), C row-major and dense; A and B addressed through their
/// strides, so transposed operands cost nothing. Runs on matrixmultiply's
/// blocked SIMD kernels, except for a few rows against a row-major B
/// ([`small_rows_body`]).
///
/// # Panics
/// If a slice is too short for the shapes and strides given.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    sa: Strides,
    b: &[f32],
    sb: Strides,
    c: &mut [f32],
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= m * n, "sgemm: C is too short for {m}x{n}");
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!((m - 1) * sa.row + (k - 1) * sa.col < a.len(), "sgemm: A is too short for {m}x{k}");
    assert!((k - 1) * sb.row + (n - 1) * sb.col < b.len(), "sgemm: B is too short for {k}x{n}");
    let isa = Isa::best();
    if m <= few_rows_limit(isa) && sb.col == 1 {
        // A few rows against a row-major B (one prediction, say): rows of B
        // scaled and added straight into C. Blocked SGEMM would first copy
        // all of B into its packing buffer, which costs more than the
        // arithmetic at this size. B is streamed once for all rows of C
        // (which stay in L1): at this size B's bytes are the cost.
        small_rows(isa, FewRows { m, k, n, a, sa, b, b_row: sb.row, accumulate }, c);
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: every element matrixmultiply reads from A is at i*row + l*col
    // <= (m-1)*row + (k-1)*col < a.len() (asserted above), likewise for B;
    // C is written at i*n + j < m*n <= c.len(). Strides fit in isize because
    // the slices they index exist. `c` is a unique borrow, so it aliases
    // neither input.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            sa.row as isize,
            sa.col as isize,
            b.as_ptr(),
            sb.row as isize,
            sb.col as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_the_definition_on_both_paths() {
        let (k, n) = (37, 19);
        for m in 1..=7 {
            for a_t in [false, true] {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.25).collect();
                let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.5).collect();
                let sa = if a_t { Strides::transposed(m) } else { Strides::row_major(k) };
                for accumulate in [false, true] {
                    let mut c = vec![1.0f32; m * n];
                    sgemm(m, k, n, &a, sa, &b, Strides::row_major(n), &mut c, accumulate);
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f32 = (0..k).map(|l| a[i * sa.row + l * sa.col] * b[l * n + j]).sum();
                            let want = dot + if accumulate { 1.0 } else { 0.0 };
                            assert!((c[i * n + j] - want).abs() < 1e-3, "m={m} a_t={a_t} acc={accumulate} ({i},{j})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_few_rows_path_agrees_on_every_isa_this_cpu_runs() {
        // Register blocks of 16 columns, a tail, and fewer columns than a block.
        for (k, n) in [(1003, 37), (784, 256), (5, 3)] {
            for m in 1..=few_rows_limit(Isa::best()) {
                let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.25).collect();
                let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.5).collect();
                let want: Vec<f64> = (0..m * n)
                    .map(|ij| (0..k).map(|l| f64::from(a[(ij / n) * k + l]) * f64::from(b[l * n + ij % n])).sum())
                    .collect();
                for isa in Isa::ALL {
                    if !isa.supported() {
                        eprintln!("{isa:?} not supported by this CPU: not tested");
                        continue;
                    }
                    for accumulate in [false, true] {
                        let mut c = vec![if accumulate { 2.0 } else { f32::NAN }; m * n];
                        small_rows(
                            isa,
                            FewRows { m, k, n, a: &a, sa: Strides::row_major(k), b: &b, b_row: n, accumulate },
                            &mut c,
                        );
                        let base = if accumulate { 2.0 } else { 0.0 };
                        for (got, want) in c.iter().zip(&want) {
                            let want = want + base;
                            assert!(
                                (f64::from(*got) - want).abs() < 1e-2,
                                "{isa:?} m={m} k={k} n={n} acc={accumulate}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sgemm_handles_transposes() {
        // A = [[1,2],[3,4]], B = [[5,6],[7,8]]
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut c = [0.0; 4];
        sgemm(2, 2, 2, &a, Strides::row_major(2), &b, Strides::row_major(2), &mut c, false);
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        sgemm(2, 2, 2, &a, Strides::transposed(2), &b, Strides::transposed(2), &mut c, false);
        // A^T B^T = (B A)^T
        assert_eq!(c, [23.0, 31.0, 34.0, 46.0]);
    }
}
