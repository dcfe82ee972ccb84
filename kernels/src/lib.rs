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

/// SGD: `p -= lr * (scale * g + wd * p)`.
///
/// # Panics
/// If the lengths differ.
pub fn sgd_update(params: &mut [f32], grad: &[f32], scale: f32, lr: f32, weight_decay: f32) {
    assert_eq!(params.len(), grad.len(), "sgd_update: length mismatch");
    for (p, g) in params.iter_mut().zip(grad) {
        let g = scale * *g + weight_decay * *p;
        *p -= lr * g;
    }
}

/// Numbers of a momentum step.
#[derive(Debug, Clone, Copy)]
pub struct MomentumParams {
    /// Factor applied to the summed gradient (1 / workers).
    pub scale: f32,
    /// Learning rate.
    pub lr: f32,
    /// L2 weight decay.
    pub weight_decay: f32,
    /// Momentum coefficient.
    pub momentum: f32,
    /// Nesterov look-ahead.
    pub nesterov: bool,
}

/// Momentum SGD: `v = mu * v + g; p -= lr * (nesterov ? g + mu * v : v)`.
///
/// # Panics
/// If the lengths differ.
pub fn momentum_update(params: &mut [f32], velocity: &mut [f32], grad: &[f32], m: MomentumParams) {
    assert_eq!(params.len(), grad.len(), "momentum_update: length mismatch");
    assert_eq!(params.len(), velocity.len(), "momentum_update: length mismatch");
    for ((p, v), g) in params.iter_mut().zip(velocity.iter_mut()).zip(grad) {
        let g = m.scale * *g + m.weight_decay * *p;
        *v = m.momentum * *v + g;
        let step = if m.nesterov { g + m.momentum * *v } else { *v };
        *p -= m.lr * step;
    }
}

/// `C (m x n) = A * B` for row-major `B` (k x n) and `C`, overwriting `C`.
/// `A` (m x k) is addressed with row stride `rsa` and column stride `csa`
/// (pass `(k, 1)` for row-major A, `(1, m)` for A stored transposed).
///
/// # Panics
/// If any slice is too short for the shapes given.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, k: usize, n: usize, a: &[f32], rsa: usize, csa: usize, b: &[f32], c: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    let reach = (m - 1) * rsa + (k - 1) * csa;
    assert!(reach < a.len(), "sgemm: A is too short for {m}x{k}");
    assert!(b.len() >= k * n, "sgemm: B is too short for {k}x{n}");
    assert!(c.len() >= m * n, "sgemm: C is too short for {m}x{n}");
    // SAFETY: A is read at i*rsa + l*csa <= reach < a.len() for i < m, l < k;
    // B at l*n + j < k*n <= b.len(); C is written at i*n + j < m*n <= c.len().
    // All strides fit in isize because the slices exist. `c` is a unique
    // borrow, so it aliases neither input.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
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
    fn momentum_accumulates() {
        let mut p = vec![0.0f32];
        let mut v = vec![0.0f32];
        let m = MomentumParams { scale: 1.0, lr: 1.0, weight_decay: 0.0, momentum: 0.5, nesterov: false };
        momentum_update(&mut p, &mut v, &[1.0], m);
        momentum_update(&mut p, &mut v, &[1.0], m);
        assert_eq!(v, vec![1.5]);
        assert_eq!(p, vec![-2.5]);
    }

    #[test]
    fn add_into_sums() {
        let mut a = vec![1.0, 2.0, 3.0];
        add_into(&mut a, &[1.0, 1.0, 1.0]);
        assert_eq!(a, vec![2.0, 3.0, 4.0]);
    }
}
