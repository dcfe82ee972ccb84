//! Reduction and optimizer kernels for warden's parameter servers.
//!
//! The servers' hot loop sums workers' gradients and applies the optimizer.
//! This crate owns those loops behind a safe API. The current bodies are
//! straightforward loops the compiler auto-vectorises; explicit SIMD with
//! runtime dispatch is tracked separately (issue 4).
//!
//! This is the only crate of the workspace allowed `unsafe`; every block
//! carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

/// `acc[i] += x[i]`.
///
/// # Panics
/// If the lengths differ.
pub fn add_into(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_into: length mismatch");
    for (a, b) in acc.iter_mut().zip(x) {
        *a += *b;
    }
}

/// Wire conversions: `f32` slices to and from little-endian bytes with one
/// memory copy (bytemuck casts) on little-endian machines, which is every
/// machine warden targets; a per-element path keeps big-endian correct.
pub mod bytes {
    /// Appends `src` as little-endian bytes to `out`.
    pub fn extend_le(out: &mut Vec<u8>, src: &[f32]) {
        if cfg!(target_endian = "little") {
            out.extend_from_slice(bytemuck::cast_slice(src));
        } else {
            out.reserve(src.len() * 4);
            for v in src {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// Copies little-endian bytes into `dst`.
    ///
    /// # Panics
    /// If `src.len() != 4 * dst.len()`.
    pub fn copy_from_le(dst: &mut [f32], src: &[u8]) {
        assert_eq!(src.len(), dst.len() * 4, "copy_from_le: length mismatch");
        if cfg!(target_endian = "little") {
            bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(src);
        } else {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }

    /// `acc[i] += f32::from_le_bytes(src[4i..4i+4])`: sums a received
    /// gradient without decoding it into a buffer first.
    ///
    /// # Panics
    /// If `src.len() != 4 * acc.len()`.
    pub fn add_from_le(acc: &mut [f32], src: &[u8]) {
        assert_eq!(src.len(), acc.len() * 4, "add_from_le: length mismatch");
        for (a, c) in acc.iter_mut().zip(src.chunks_exact(4)) {
            *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
}

/// Per-element gradient preprocessing shared by every update rule: the
/// summed gradient is scaled (1 / workers), clipped to `[-clip, clip]` when
/// `clip > 0` (MXNet's `clip_gradient`, elementwise so it shards cleanly),
/// and L2 weight decay added unless the rule decouples it.
#[derive(Debug, Clone, Copy)]
pub struct GradPrep {
    /// Factor applied to the summed gradient.
    pub scale: f32,
    /// Elementwise clip bound; 0 disables.
    pub clip: f32,
    /// L2 weight decay coupled into the gradient.
    pub weight_decay: f32,
}

impl GradPrep {
    #[inline(always)]
    fn apply(&self, g: f32, p: f32) -> f32 {
        let mut g = self.scale * g;
        if self.clip > 0.0 {
            g = g.clamp(-self.clip, self.clip);
        }
        g + self.weight_decay * p
    }
}

/// SGD: `p -= lr * prep(g)`.
///
/// # Panics
/// If the lengths differ.
pub fn sgd_update(params: &mut [f32], grad: &[f32], prep: GradPrep, lr: f32) {
    assert_eq!(params.len(), grad.len(), "sgd_update: length mismatch");
    for (p, g) in params.iter_mut().zip(grad) {
        *p -= lr * prep.apply(*g, *p);
    }
}

/// Momentum SGD: `v = mu * v + g; p -= lr * (nesterov ? g + mu * v : v)`.
///
/// # Panics
/// If the lengths differ.
pub fn momentum_update(
    params: &mut [f32],
    velocity: &mut [f32],
    grad: &[f32],
    prep: GradPrep,
    lr: f32,
    momentum: f32,
    nesterov: bool,
) {
    assert_eq!(params.len(), grad.len(), "momentum_update: length mismatch");
    assert_eq!(params.len(), velocity.len(), "momentum_update: length mismatch");
    for ((p, v), g) in params.iter_mut().zip(velocity.iter_mut()).zip(grad) {
        let g = prep.apply(*g, *p);
        *v = momentum * *v + g;
        let step = if nesterov { g + momentum * *v } else { *v };
        *p -= lr * step;
    }
}

/// Numbers of an Adam step.
#[derive(Debug, Clone, Copy)]
pub struct AdamParams {
    /// Learning rate in force.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator term.
    pub eps: f32,
    /// Decoupled weight decay (AdamW); 0 for Adam.
    pub decoupled_decay: f32,
    /// Update number, from 1 (for bias correction).
    pub t: u64,
}

/// Adam / AdamW with bias correction.
///
/// # Panics
/// If the lengths differ.
pub fn adam_update(params: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], prep: GradPrep, a: AdamParams) {
    assert!(
        params.len() == grad.len() && m.len() == grad.len() && v.len() == grad.len(),
        "adam_update: length mismatch"
    );
    let t = a.t.max(1) as i32;
    let c1 = 1.0 - a.beta1.powi(t);
    let c2 = 1.0 - a.beta2.powi(t);
    let step = a.lr * c2.sqrt() / c1;
    for (((p, m), v), g) in params.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(grad) {
        let g = prep.apply(*g, *p);
        *m = a.beta1 * *m + (1.0 - a.beta1) * g;
        *v = a.beta2 * *v + (1.0 - a.beta2) * g * g;
        *p -= step * *m / (v.sqrt() + a.eps) + a.lr * a.decoupled_decay * *p;
    }
}

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

/// `C (m x n) = A (m x k) * B (k x n)` (or `C += A * B` with `accumulate`),
/// C row-major and dense; A and B addressed through their strides, so
/// transposed operands cost nothing. Runs on matrixmultiply's blocked SIMD
/// SGEMM.
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

    const PLAIN: GradPrep = GradPrep { scale: 1.0, clip: 0.0, weight_decay: 0.0 };

    #[test]
    fn momentum_accumulates() {
        let mut p = vec![0.0f32];
        let mut v = vec![0.0f32];
        momentum_update(&mut p, &mut v, &[1.0], PLAIN, 1.0, 0.5, false);
        momentum_update(&mut p, &mut v, &[1.0], PLAIN, 1.0, 0.5, false);
        assert_eq!(v, vec![1.5]);
        assert_eq!(p, vec![-2.5]);
    }

    #[test]
    fn byte_conversions_round_trip_on_odd_lengths_and_offsets() {
        let v: Vec<f32> = (0..1003).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mut out = vec![0xAA]; // misalign the payload
        bytes::extend_le(&mut out, &v);
        let mut back = vec![0.0; v.len()];
        bytes::copy_from_le(&mut back, &out[1..]);
        assert_eq!(back, v);
        let mut acc = vec![1.0; v.len()];
        bytes::add_from_le(&mut acc, &out[1..]);
        assert!(acc.iter().zip(&v).all(|(a, b)| *a == b + 1.0));
    }

    #[test]
    fn clipping_bounds_each_element() {
        let mut p = vec![0.0f32; 3];
        sgd_update(&mut p, &[100.0, -100.0, 0.5], GradPrep { clip: 1.0, ..PLAIN }, 1.0);
        assert_eq!(p, vec![-1.0, 1.0, -0.5]);
    }

    #[test]
    fn adam_first_step_is_lr_sized() {
        let (mut p, mut m, mut v) = (vec![0.0f32; 2], vec![0.0; 2], vec![0.0; 2]);
        let a = AdamParams { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, decoupled_decay: 0.0, t: 1 };
        adam_update(&mut p, &mut m, &mut v, &[3.0, -0.01], PLAIN, a);
        assert!((p[0] + 0.1).abs() < 1e-5 && (p[1] - 0.1).abs() < 1e-4, "{p:?}");
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

    #[test]
    fn add_into_sums() {
        let mut a = vec![1.0, 2.0, 3.0];
        add_into(&mut a, &[1.0, 1.0, 1.0]);
        assert_eq!(a, vec![2.0, 3.0, 4.0]);
    }
}
