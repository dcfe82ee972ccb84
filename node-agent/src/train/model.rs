//! Models: parameter layout, initialisation, forward and backward passes.
//!
//! Softmax regression is the MLP with no hidden layer, so there is one code
//! path: `widths = [inputs, hidden..., classes]`, ReLU after every hidden
//! layer (with optional inverted dropout while training), softmax and
//! cross-entropy at the end. Parameters are one flat `f32` vector, layer by
//! layer (weight `in x out` row-major, then bias), so servers can shard any
//! model by contiguous ranges. All matrix work goes through
//! `warden_kernels::sgemm` (matrixmultiply's blocked SIMD SGEMM).

use std::ops::Range;

use rand::Rng;
use rand_distr::{Distribution, Normal};
use warden_kernels::{PackedB, Strides, sgemm, sgemm_packed};

use crate::job::spec::{ModelKind, ModelSpec};
use crate::train::train_rng::{Stream, rng};

/// Number of parameters of a model ([`ModelSpec::num_params`]).
pub fn num_params(m: &ModelSpec) -> usize {
    m.num_params()
}

/// One layer's place in the flat vector.
#[derive(Debug, Clone)]
struct Layer {
    fan_in: usize,
    fan_out: usize,
    weight: Range<usize>,
    bias: Range<usize>,
}

fn layers(m: &ModelSpec) -> Vec<Layer> {
    let mut at = 0;
    m.widths()
        .windows(2)
        .map(|w| {
            let weight = at..at + w[0] * w[1];
            let bias = weight.end..weight.end + w[1];
            at = bias.end;
            Layer { fan_in: w[0], fan_out: w[1], weight, bias }
        })
        .collect()
}

/// Named tensors of the flat vector, for model files: (name, shape, range).
pub fn layout(m: &ModelSpec) -> Vec<(String, Vec<usize>, Range<usize>)> {
    if m.kind == ModelKind::Synthetic {
        return vec![("params".into(), vec![m.params], 0..m.params)];
    }
    if m.kind == ModelKind::External {
        let mut at = 0;
        return m
            .tensors
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                at += n;
                (name.clone(), shape.clone(), at - n..at)
            })
            .collect();
    }
    layers(m)
        .into_iter()
        .enumerate()
        .flat_map(|(i, l)| {
            [
                (format!("fc{i}.weight"), vec![l.fan_in, l.fan_out], l.weight),
                (format!("fc{i}.bias"), vec![l.fan_out], l.bias),
            ]
        })
        .collect()
}

/// Initial parameters from the training seed (the same on every server):
/// He-normal weights for ReLU layers, a small normal for the output layer,
/// zero biases.
pub fn init(m: &ModelSpec, seed: u64) -> Vec<f32> {
    let mut r = rng(seed, Stream::Init);
    let mut p = vec![0.0f32; num_params(m)];
    // External models start at zero until worker 0's `init` sets them.
    if matches!(m.kind, ModelKind::Synthetic | ModelKind::External) {
        return p;
    }
    let all = layers(m);
    let last = all.len() - 1;
    for (i, l) in all.into_iter().enumerate() {
        let std = if i == last { (1.0 / l.fan_in as f32).sqrt() * 0.1 } else { (2.0 / l.fan_in as f32).sqrt() };
        let normal = Normal::new(0.0f32, std).expect("finite std");
        for v in &mut p[l.weight] {
            *v = normal.sample(&mut r);
        }
    }
    p
}

/// A batch of samples: `x` is `rows x inputs` row-major, labels in `y`.
#[derive(Debug)]
pub struct Batch<'a> {
    /// Features.
    pub x: &'a [f32],
    /// Class labels.
    pub y: &'a [u8],
}

/// A trained model ready to answer predictions, its weights laid out once
/// for products with a few rows at a time ([`PackedB`]): a served model
/// answers one input or a handful together, and at that size reading the
/// weights is the cost. Each probability is computed the same way
/// whatever the batch it is in, so an input gets the same answer alone or
/// batched with others.
#[derive(Debug)]
pub struct Predictor {
    spec: ModelSpec,
    params: Vec<f32>,
    /// Per layer; `None` where this CPU has no packed kernel.
    packed: Vec<Option<PackedB>>,
}

impl Predictor {
    /// Lays out `params` (the flat vector of `spec`, an MLP or softmax).
    pub fn new(spec: ModelSpec, params: Vec<f32>) -> Predictor {
        let packed = layers(&spec)
            .iter()
            .map(|l| PackedB::new(l.fan_in, l.fan_out, &params[l.weight.clone()], Strides::row_major(l.fan_out)))
            .collect();
        Predictor { spec, params, packed }
    }

    /// The model's shape.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Class probabilities of `rows` inputs (row-major, `rows x classes`),
    /// computed in `ws`.
    pub fn predict<'w>(&self, ws: &'w mut Workspace, x: &[f32], rows: usize) -> &'w [f32] {
        ws.forward(
            &self.spec,
            &self.params,
            Some(&self.packed),
            x,
            rows,
            None::<&mut crate::train::train_rng::TrainRng>,
        );
        &ws.acts[ws.acts.len() - 1]
    }
}

/// Scratch space reused across steps: activations and dropout masks.
#[derive(Debug, Default)]
pub struct Workspace {
    /// Post-activation outputs of each hidden layer, then the output probabilities.
    acts: Vec<Vec<f32>>,
    /// Dropout scale per hidden unit (0 or 1/(1-p)); empty without dropout.
    masks: Vec<Vec<f32>>,
    delta: Vec<f32>,
    delta_prev: Vec<f32>,
}

impl Workspace {
    /// Forward pass; leaves probabilities in `self.acts.last()`.
    /// `dropout` carries the training RNG when dropout applies.
    /// `packed` holds the layers' weights laid out for [`sgemm_packed`]
    /// (serving; see [`Predictor`]), `None` to multiply the flat vector's.
    fn forward<R: Rng>(
        &mut self,
        m: &ModelSpec,
        params: &[f32],
        packed: Option<&[Option<PackedB>]>,
        x: &[f32],
        rows: usize,
        mut dropout: Option<&mut R>,
    ) {
        let all = layers(m);
        self.acts.resize_with(all.len(), Vec::new);
        self.masks.resize_with(all.len(), Vec::new);
        let last = all.len() - 1;
        for (i, l) in all.iter().enumerate() {
            let (done, rest) = self.acts.split_at_mut(i);
            let input: &[f32] = if i == 0 { x } else { &done[i - 1] };
            let out = &mut rest[0];
            out.resize(rows * l.fan_out, 0.0);
            match packed.and_then(|p| p[i].as_ref()) {
                Some(w) => sgemm_packed(rows, input, l.fan_in, w, out),
                None => sgemm(
                    rows,
                    l.fan_in,
                    l.fan_out,
                    input,
                    Strides::row_major(l.fan_in),
                    &params[l.weight.clone()],
                    Strides::row_major(l.fan_out),
                    out,
                    false,
                ),
            }
            let bias = &params[l.bias.clone()];
            for row in out.chunks_exact_mut(l.fan_out) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += *b;
                }
            }
            if i < last {
                for v in out.iter_mut() {
                    *v = v.max(0.0);
                }
                let mask = &mut self.masks[i];
                mask.clear();
                if let (Some(r), true) = (dropout.as_deref_mut(), m.dropout > 0.0) {
                    let keep = 1.0 / (1.0 - m.dropout);
                    mask.extend((0..out.len()).map(|_| if r.random::<f32>() < m.dropout { 0.0 } else { keep }));
                    for (v, k) in out.iter_mut().zip(mask.iter()) {
                        *v *= *k;
                    }
                }
            } else {
                for row in out.chunks_exact_mut(l.fan_out) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    for v in row.iter_mut() {
                        *v /= sum;
                    }
                }
            }
        }
    }

    /// Class probabilities of `rows` inputs (row-major, `rows x classes`).
    pub fn predict(&mut self, m: &ModelSpec, params: &[f32], x: &[f32], rows: usize) -> &[f32] {
        self.forward(m, params, None, x, rows, None::<&mut crate::train::train_rng::TrainRng>);
        &self.acts[self.acts.len() - 1]
    }

    /// Mean cross-entropy of the batch; writes its gradient into `grad`.
    /// Dropout (if the model has it) draws its masks from `dropout_rng`.
    pub fn loss_and_grad<R: Rng>(
        &mut self,
        m: &ModelSpec,
        params: &[f32],
        batch: &Batch<'_>,
        grad: &mut [f32],
        dropout_rng: Option<&mut R>,
    ) -> f32 {
        let rows = batch.y.len();
        self.forward(m, params, None, batch.x, rows, dropout_rng);
        let all = layers(m);
        let last = all.len() - 1;
        // Output delta: (p - onehot) / rows.
        let probs = &self.acts[last];
        let mut loss = 0.0f64;
        self.delta.clear();
        self.delta.extend_from_slice(probs);
        for (row, &y) in self.delta.chunks_exact_mut(m.classes).zip(batch.y) {
            loss -= f64::from(row[y as usize].max(1e-12).ln());
            row[y as usize] -= 1.0;
        }
        let inv = 1.0 / rows as f32;
        for v in self.delta.iter_mut() {
            *v *= inv;
        }
        for i in (0..all.len()).rev() {
            let l = &all[i];
            let input: &[f32] = if i == 0 { batch.x } else { &self.acts[i - 1] };
            // dW = input^T (fan_in x rows) * delta (rows x fan_out)
            sgemm(
                l.fan_in,
                rows,
                l.fan_out,
                input,
                Strides::transposed(l.fan_in),
                &self.delta,
                Strides::row_major(l.fan_out),
                &mut grad[l.weight.clone()],
                false,
            );
            let gb = &mut grad[l.bias.clone()];
            gb.fill(0.0);
            for row in self.delta.chunks_exact(l.fan_out) {
                for (g, d) in gb.iter_mut().zip(row) {
                    *g += *d;
                }
            }
            if i > 0 {
                // delta_prev = delta (rows x fan_out) * W^T (fan_out x fan_in), through ReLU and dropout.
                self.delta_prev.resize(rows * l.fan_in, 0.0);
                sgemm(
                    rows,
                    l.fan_out,
                    l.fan_in,
                    &self.delta,
                    Strides::row_major(l.fan_out),
                    &params[l.weight.clone()],
                    Strides::transposed(l.fan_out),
                    &mut self.delta_prev,
                    false,
                );
                let act = &self.acts[i - 1];
                let mask = &self.masks[i - 1];
                for (j, d) in self.delta_prev.iter_mut().enumerate() {
                    // act is relu(z) * mask: zero exactly where the gradient is blocked.
                    if act[j] <= 0.0 {
                        *d = 0.0;
                    } else if !mask.is_empty() {
                        *d *= mask[j];
                    }
                }
                std::mem::swap(&mut self.delta, &mut self.delta_prev);
            }
        }
        (loss / rows as f64) as f32
    }

    /// (summed cross-entropy, correctly classified) over the batch, without dropout.
    pub fn evaluate(&mut self, m: &ModelSpec, params: &[f32], batch: &Batch<'_>) -> (f64, usize) {
        let rows = batch.y.len();
        self.forward::<rand_pcg::Pcg64Mcg>(m, params, None, batch.x, rows, None);
        let probs = self.acts.last().expect("at least one layer");
        let mut loss = 0.0;
        let mut correct = 0;
        for (row, &y) in probs.chunks_exact(m.classes).zip(batch.y) {
            loss -= f64::from(row[y as usize].max(1e-12).ln());
            let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
            correct += usize::from(best == y as usize);
        }
        (loss, correct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_gradient(m: &ModelSpec) {
        let mut p = init(m, 7);
        for (i, v) in p.iter_mut().enumerate() {
            *v += (i as f32 * 0.37).sin() * 0.3;
        }
        let rows = 4;
        let x: Vec<f32> = (0..rows * m.inputs).map(|i| ((i * 7 % 11) as f32) / 11.0).collect();
        let y = [0u8, 2, 1, 2];
        let batch = Batch { x: &x, y: &y };
        let mut ws = Workspace::default();
        // Dropout masks come from a generator re-made with the same seed for
        // every evaluation, so each sees the same mask.
        let fresh = || rng(99, Stream::Init);
        let mut g = vec![0.0; p.len()];
        ws.loss_and_grad(m, &p, &batch, &mut g, Some(&mut fresh()));
        let mut scratch = vec![0.0; p.len()];
        let mut worst = 0.0f32;
        for i in 0..p.len() {
            // Small enough not to step across a ReLU kink at these inputs.
            let h = 1e-3;
            let mut q = p.clone();
            q[i] += h;
            let up = ws.loss_and_grad(m, &q, &batch, &mut scratch, Some(&mut fresh()));
            q[i] -= 2.0 * h;
            let down = ws.loss_and_grad(m, &q, &batch, &mut scratch, Some(&mut fresh()));
            let numeric = (up - down) / (2.0 * h);
            worst = worst.max((numeric - g[i]).abs());
            assert!((numeric - g[i]).abs() < 3e-3, "{m:?} param {i}: numeric {numeric} vs analytic {}", g[i]);
        }
        assert!(worst < 3e-3);
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        check_gradient(&ModelSpec {
            kind: ModelKind::Softmax,
            inputs: 5,
            classes: 3,
            hidden: vec![],
            dropout: 0.0,
            params: 0,
            tensors: Vec::new(),
        });
    }

    #[test]
    fn mlp_gradient_matches_finite_differences() {
        check_gradient(&ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 5,
            classes: 3,
            hidden: vec![7, 4],
            dropout: 0.0,
            params: 0,
            tensors: Vec::new(),
        });
    }

    #[test]
    fn mlp_with_dropout_gradient_matches_finite_differences() {
        check_gradient(&ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 5,
            classes: 3,
            hidden: vec![8],
            dropout: 0.3,
            params: 0,
            tensors: Vec::new(),
        });
    }

    #[test]
    fn served_predictions_agree_with_training_and_do_not_depend_on_the_batch() {
        for hidden in [vec![256], vec![40, 17], vec![]] {
            let m = ModelSpec::mlp(784, hidden, 10);
            let params = init(&m, 3);
            let rows = 19;
            let x: Vec<f32> = (0..rows * m.inputs).map(|i| ((i * 37 % 255) as f32) / 255.0).collect();
            let served = Predictor::new(m.clone(), params.clone());
            let mut ws = Workspace::default();
            let together = served.predict(&mut ws, &x, rows).to_vec();
            // What training's forward pass computes (other kernels, so
            // the last bits may differ).
            let mut plain = Workspace::default();
            let want = plain.predict(&m, &params, &x, rows);
            for (a, b) in together.iter().zip(want) {
                assert!((a - b).abs() <= 1e-6, "{m:?}: {a} vs {b}");
            }
            // Any batch gives each input the same bits.
            for size in [1, 2, 3, 5, 6, 7, 13] {
                for (start, chunk) in x.chunks(size * m.inputs).enumerate() {
                    let n = chunk.len() / m.inputs;
                    let got = served.predict(&mut ws, chunk, n);
                    let at = start * size * m.classes;
                    let same = got.iter().zip(&together[at..]).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{m:?}: rows {start}.. in batches of {size}");
                }
            }
        }
    }

    #[test]
    fn layout_covers_the_vector() {
        let m = ModelSpec::mlp(784, vec![256], 10);
        let l = layout(&m);
        assert_eq!(l.iter().map(|(_, _, r)| r.len()).sum::<usize>(), num_params(&m));
        assert_eq!(num_params(&m), 784 * 256 + 256 + 256 * 10 + 10);
        assert_eq!(l[0].0, "fc0.weight");
    }
}
