//! `[model]`: which model, its shape, and the signed weights it may start from.
//!
//! [`ModelSpec`] is also what training builds on: `crate::train::model` (layout,
//! forward and backward passes) imports it, and nothing here imports
//! `crate::train::model`, so the dependency points one way, from training to the
//! job file.

use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;

use super::{SpecError, Src, int_in, raw};

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    /// Which model.
    pub kind: ModelKind,
    /// Input features.
    pub inputs: usize,
    /// Output classes.
    pub classes: usize,
    /// Hidden layer widths (empty for softmax regression).
    pub hidden: Vec<usize>,
    /// Dropout probability after each hidden layer, in training only.
    pub dropout: f32,
    /// Parameters of the synthetic model (0 for the others).
    pub params: usize,
    /// The external model's named tensors and shapes, in name order.
    pub tensors: Vec<(String, Vec<usize>)>,
}

impl ModelSpec {
    /// A multilayer perceptron without dropout (softmax regression when
    /// `hidden` is empty).
    pub fn mlp(inputs: usize, hidden: Vec<usize>, classes: usize) -> ModelSpec {
        let kind = if hidden.is_empty() { ModelKind::Softmax } else { ModelKind::Mlp };
        ModelSpec { kind, inputs, classes, hidden, dropout: 0.0, params: 0, tensors: Vec::new() }
    }

    /// Layer widths from input to output.
    pub fn widths(&self) -> Vec<usize> {
        std::iter::once(self.inputs).chain(self.hidden.iter().copied()).chain(std::iter::once(self.classes)).collect()
    }

    /// Number of parameters: the floats servers hold and workers push and pull.
    pub fn num_params(&self) -> usize {
        match self.kind {
            ModelKind::Synthetic => return self.params,
            ModelKind::External => return self.tensors.iter().map(|(_, shape)| shape.iter().product::<usize>()).sum(),
            ModelKind::Softmax | ModelKind::Mlp => {}
        }
        self.widths().windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }
}

/// Models warden can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Multinomial logistic regression.
    Softmax,
    /// Multilayer perceptron: ReLU hidden layers, softmax output.
    Mlp,
    /// No model and no data: `params` floats pushed and pulled every step,
    /// for measuring the parameter server (`warden bench ps`).
    Synthetic,
    /// The user's own model: named tensors that the user's program
    /// (`[worker] command`) pushes and pulls through the local KV socket.
    External,
}

/// `[model] init` and `trusted_keys`: start from signed weights.
#[derive(Debug, Clone, Serialize)]
pub struct InitSpec {
    /// The model directory (model.safetensors and model.sig), on the servers' hosts.
    pub dir: PathBuf,
    /// Public keys (PEM) whose signature is accepted.
    pub trusted_keys: Vec<PathBuf>,
}

/// Checks `[model]` except `init` and `trusted_keys` (`convert_init`):
/// each kind takes its own keys and refuses the others'.
pub(super) fn convert_model(src: &Src<'_>, model: &Spanned<raw::Model>) -> Result<ModelSpec, SpecError> {
    let m = model.get_ref();
    let kind = match m.kind.get_ref().as_str() {
        "softmax" => ModelKind::Softmax,
        "mlp" => ModelKind::Mlp,
        "synthetic" => ModelKind::Synthetic,
        "external" => ModelKind::External,
        other => {
            return Err(src.err(
                m.kind.span(),
                format!("unknown model kind `{other}`"),
                "supported: \"softmax\", \"mlp\", \"external\" (your own program, with [worker] command)",
            ));
        }
    };
    // Neither reads data or has layers.
    let synthetic = matches!(kind, ModelKind::Synthetic | ModelKind::External);
    let required = |v: &Option<Spanned<i64>>, what: &str, lo: i64, hi: i64, help: &str| -> Result<usize, SpecError> {
        match v {
            Some(v) if synthetic => {
                Err(src.err(v.span(), format!("the {} model has no `{what}`", m.kind.get_ref()), "remove it"))
            }
            Some(v) => int_in(src, v, what, lo, hi, help),
            None if synthetic => Ok(0),
            None => Err(src.err(model.span(), format!("[model] needs `{what}`"), help)),
        }
    };
    let inputs = required(&m.inputs, "inputs", 1, 1 << 24, "the number of input features, 784 for 28x28 images")?;
    let classes = required(&m.classes, "classes", 2, 256, "the number of classes (2 to 256), 10 for Fashion-MNIST")?;
    let params = convert_params(src, m, kind)?;
    let tensors = convert_tensors(src, m, kind)?;
    let hidden = convert_hidden(src, m, kind)?;
    let dropout = convert_dropout(src, m, kind)?;
    Ok(ModelSpec { kind, inputs, classes, hidden, dropout, params, tensors })
}

/// `params`: the synthetic model's size, and only the synthetic model's.
fn convert_params(src: &Src<'_>, m: &raw::Model, kind: ModelKind) -> Result<usize, SpecError> {
    Ok(match (&m.params, kind == ModelKind::Synthetic) {
        (Some(p), true) => int_in(src, p, "params", 1, 1 << 30, "floats pushed and pulled per step, such as 4000000")?,
        (None, true) => {
            return Err(src.err(
                m.kind.span(),
                "the synthetic model needs `params`",
                "add for example params = 4000000",
            ));
        }
        (Some(p), false) => return Err(src.err(p.span(), "`params` belongs to kind = \"synthetic\"", "remove it")),
        (None, false) => 0,
    })
}

/// `[model.tensors]`: the external model's named tensors, 2^30 floats at most.
fn convert_tensors(src: &Src<'_>, m: &raw::Model, kind: ModelKind) -> Result<Vec<(String, Vec<usize>)>, SpecError> {
    let mut tensors = Vec::new();
    match (&m.tensors, kind == ModelKind::External) {
        (Some(t), true) if t.get_ref().is_empty() || t.get_ref().len() > 4096 => {
            return Err(src.err(t.span(), "an external model has 1 to 4096 tensors", "for example w = [784, 10]"));
        }
        (Some(t), true) => {
            let mut total = 0usize;
            for (name, shape) in t.get_ref() {
                let ok_name = !name.is_empty()
                    && name.len() <= 128
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
                if !ok_name {
                    return Err(src.err(
                        shape.span(),
                        format!("tensor name `{name}` must be 1-128 letters, digits, `.`, `_`, `-` or `/`"),
                        "for example fc1.weight",
                    ));
                }
                let dims = shape.get_ref();
                if dims.is_empty() || dims.len() > 8 || dims.iter().any(|d| !(1..=1 << 30).contains(d)) {
                    return Err(src.err(
                        shape.span(),
                        format!("tensor `{name}` needs 1 to 8 dimensions, each 1 to 2^30"),
                        "for example [784, 10]",
                    ));
                }
                let dims: Vec<usize> = dims.iter().map(|d| *d as usize).collect();
                total = total.saturating_add(dims.iter().product());
                if total > 1 << 30 {
                    return Err(src.err(
                        shape.span(),
                        "the tensors hold more than 2^30 floats in all",
                        "split the job",
                    ));
                }
                tensors.push((name.clone(), dims));
            }
        }
        (None, true) => {
            return Err(src.err(
                m.kind.span(),
                "an external model declares its tensors",
                "add [model.tensors] with name = [shape], for example w = [784, 10]",
            ));
        }
        (Some(t), false) => {
            return Err(src.err(t.span(), "`tensors` belongs to kind = \"external\"", "remove it"));
        }
        (None, false) => {}
    }
    Ok(tensors)
}

/// `hidden`: an mlp's 1 to 16 layer widths; softmax regression has none.
fn convert_hidden(src: &Src<'_>, m: &raw::Model, kind: ModelKind) -> Result<Vec<usize>, SpecError> {
    let mut hidden = Vec::new();
    match (kind, &m.hidden) {
        (ModelKind::Softmax, Some(h)) => {
            return Err(src.err(
                h.span(),
                "softmax regression has no hidden layers",
                "use kind = \"mlp\", or remove `hidden`",
            ));
        }
        (ModelKind::Mlp, None) => {
            return Err(src.err(m.kind.span(), "an mlp needs hidden layers", "add for example hidden = [256]"));
        }
        (ModelKind::Mlp, Some(h)) if h.get_ref().is_empty() || h.get_ref().len() > 16 => {
            return Err(src.err(
                h.span(),
                "an mlp has 1 to 16 hidden layers",
                "for example hidden = [256] or [512, 256]",
            ));
        }
        (_, Some(h)) => {
            for w in h.get_ref() {
                hidden.push(int_in(
                    src,
                    w,
                    "a hidden layer width",
                    1,
                    1 << 16,
                    "widths are whole numbers such as 256",
                )?);
            }
        }
        (ModelKind::Softmax | ModelKind::Synthetic | ModelKind::External, None) => {}
    }
    Ok(hidden)
}

/// `dropout`: an mlp's, in [0, 0.95).
fn convert_dropout(src: &Src<'_>, m: &raw::Model, kind: ModelKind) -> Result<f32, SpecError> {
    Ok(match &m.dropout {
        Some(d) if kind != ModelKind::Mlp => {
            return Err(src.err(
                d.span(),
                "dropout applies to hidden layers; softmax regression has none",
                "remove `dropout`",
            ));
        }
        Some(d) if !(0.0..0.95).contains(d.get_ref()) => {
            return Err(src.err(
                d.span(),
                format!("dropout must be in [0, 0.95), not {}", d.get_ref()),
                "0 turns it off; 0.2 to 0.5 is common",
            ));
        }
        Some(d) => *d.get_ref() as f32,
        None => 0.0,
    })
}

/// `[model] init` and `trusted_keys`: initial weights only with the keys
/// their signature is checked against.
pub(super) fn convert_init(src: &Src<'_>, m: &raw::Model, base_dir: &Path) -> Result<Option<InitSpec>, SpecError> {
    Ok(match (&m.init, &m.trusted_keys) {
        (Some(dir), Some(keys)) if !keys.get_ref().is_empty() => Some(InitSpec {
            dir: base_dir.join(dir.get_ref()),
            trusted_keys: keys.get_ref().iter().map(|k| base_dir.join(k.get_ref())).collect(),
        }),
        (Some(dir), _) => {
            return Err(src.err(
                dir.span(),
                "initial weights are loaded only after their signature is verified: `init` needs trusted_keys",
                "add trusted_keys = [\"keys/public.pem\"] (public keys whose signatures you accept)",
            ));
        }
        (None, Some(keys)) => {
            return Err(src.err(keys.span(), "trusted_keys belongs to `init`", "add init = \"DIR\", or remove it"));
        }
        (None, None) => None,
    })
}
