//! Models: parameter layout, initialisation, forward and backward passes.
//!
//! Parameters are one flat `f32` vector so that servers can shard any model
//! by contiguous ranges. The matrix work goes through `matrixmultiply`'s
//! SGEMM (cache-blocked and SIMD), not naive loops.

use rand_distr::{Distribution, Normal};

use crate::spec::{ModelKind, ModelSpec};
use crate::train_rng::{Stream, rng};

/// Number of parameters of a model.
pub fn num_params(m: &ModelSpec) -> usize {
    match m.kind {
        ModelKind::Softmax => m.inputs * m.classes + m.classes,
    }
}

/// Named tensors of the flat vector, for model files: (name, shape, range).
pub fn layout(m: &ModelSpec) -> Vec<(String, Vec<usize>, std::ops::Range<usize>)> {
    match m.kind {
        ModelKind::Softmax => {
            let w = m.inputs * m.classes;
            vec![("weight".into(), vec![m.inputs, m.classes], 0..w), ("bias".into(), vec![m.classes], w..w + m.classes)]
        }
    }
}

/// Initial parameters from the training seed (the same on every server).
pub fn init(m: &ModelSpec, seed: u64) -> Vec<f32> {
    let mut r = rng(seed, Stream::Init);
    let mut p = vec![0.0f32; num_params(m)];
    match m.kind {
        ModelKind::Softmax => {
            let std = (1.0 / m.inputs as f32).sqrt() * 0.1;
            let normal = Normal::new(0.0f32, std).expect("finite std");
            for v in &mut p[..m.inputs * m.classes] {
                *v = normal.sample(&mut r);
            }
        }
    }
    p
}

/// `C (m x n) = A (m x k) * B (k x n)`, row-major, overwriting C; with
/// `trans_a` A is stored transposed (k x m row-major).
fn gemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], trans_a: bool) {
    let (rsa, csa) = if trans_a { (1, m) } else { (k, 1) };
    warden_kernels::sgemm(m, k, n, a, rsa, csa, b, c);
}

/// A batch of samples: `x` is `rows x inputs` row-major, labels in `y`.
#[derive(Debug)]
pub struct Batch<'a> {
    /// Features.
    pub x: &'a [f32],
    /// Class labels.
    pub y: &'a [u8],
}

/// Softmax regression's loss and gradient, with reusable scratch space.
#[derive(Debug, Default)]
pub struct Workspace {
    logits: Vec<f32>,
}

impl Workspace {
    /// Computes the forward pass into `self.logits` as probabilities.
    fn probabilities(&mut self, m: &ModelSpec, params: &[f32], batch: &Batch<'_>) -> usize {
        let rows = batch.y.len();
        let (w, b) = params.split_at(m.inputs * m.classes);
        self.logits.resize(rows * m.classes, 0.0);
        gemm(rows, m.inputs, m.classes, batch.x, w, &mut self.logits, false);
        for row in self.logits.chunks_exact_mut(m.classes) {
            for (l, bias) in row.iter_mut().zip(b) {
                *l += *bias;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for l in row.iter_mut() {
                *l = (*l - max).exp();
                sum += *l;
            }
            for l in row.iter_mut() {
                *l /= sum;
            }
        }
        rows
    }

    /// Mean cross-entropy of the batch; writes its gradient into `grad`.
    pub fn loss_and_grad(&mut self, m: &ModelSpec, params: &[f32], batch: &Batch<'_>, grad: &mut [f32]) -> f32 {
        let rows = self.probabilities(m, params, batch);
        let mut loss = 0.0f64;
        // dlogits = (p - onehot) / rows
        for (row, &y) in self.logits.chunks_exact_mut(m.classes).zip(batch.y) {
            loss -= f64::from(row[y as usize].max(1e-12).ln());
            row[y as usize] -= 1.0;
            for v in row.iter_mut() {
                *v /= rows as f32;
            }
        }
        let (gw, gb) = grad.split_at_mut(m.inputs * m.classes);
        // dW = X^T (inputs x rows) * dlogits (rows x classes)
        gemm(m.inputs, rows, m.classes, batch.x, &self.logits, gw, true);
        gb.fill(0.0);
        for row in self.logits.chunks_exact(m.classes) {
            for (g, v) in gb.iter_mut().zip(row) {
                *g += *v;
            }
        }
        (loss / rows as f64) as f32
    }

    /// Number of correctly classified samples in the batch.
    pub fn correct(&mut self, m: &ModelSpec, params: &[f32], batch: &Batch<'_>) -> usize {
        self.probabilities(m, params, batch);
        self.logits
            .chunks_exact(m.classes)
            .zip(batch.y)
            .filter(|(row, y)| {
                let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
                best == **y as usize
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let m = ModelSpec { kind: ModelKind::Softmax, inputs: 5, classes: 3 };
        let mut p = init(&m, 7);
        for (i, v) in p.iter_mut().enumerate() {
            *v += (i as f32 * 0.37).sin() * 0.3;
        }
        let x: Vec<f32> = (0..4 * 5).map(|i| ((i * 7 % 11) as f32) / 11.0).collect();
        let y = [0u8, 2, 1, 2];
        let batch = Batch { x: &x, y: &y };
        let mut ws = Workspace::default();
        let mut g = vec![0.0; p.len()];
        ws.loss_and_grad(&m, &p, &batch, &mut g);
        let mut scratch = vec![0.0; p.len()];
        for i in 0..p.len() {
            let h = 1e-2;
            let mut q = p.clone();
            q[i] += h;
            let up = ws.loss_and_grad(&m, &q, &batch, &mut scratch);
            q[i] -= 2.0 * h;
            let down = ws.loss_and_grad(&m, &q, &batch, &mut scratch);
            let numeric = (up - down) / (2.0 * h);
            assert!((numeric - g[i]).abs() < 2e-3, "param {i}: numeric {numeric} vs analytic {}", g[i]);
        }
    }
}
