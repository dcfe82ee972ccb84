//! Model artifacts: the trained parameters as safetensors (no pickle, no
//! code), with the model's shape and seed in the file's metadata.
//!
//! Built-in models are stored the way PyTorch stores them: layer `i` is
//! `fc{i}.weight` of shape `[out, in]` and `fc{i}.bias` of shape `[out]`,
//! the state dict of the `nn.Sequential` that `docs/model-format.md` shows,
//! so `load_state_dict(strict=True)` takes the file as it is. Training keeps
//! each weight `[in, out]` in its flat vector (the layout its SGEMM wants);
//! the transposition happens here, on write and on read. Files an earlier
//! warden wrote (`format = warden` without a `layout` entry) are still read
//! in their `[in, out]` layout; any other file is taken to be PyTorch's.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::job::spec::ModelSpec;
use crate::store::signing::SignError;
use crate::train::model::layout;

/// What is wrong with the contents of a `model.safetensors`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelFileError {
    /// Larger than any file of this model can be.
    #[error("{bytes} bytes, too large for this model of {params} parameters")]
    TooLarge {
        /// The file's size.
        bytes: usize,
        /// The model's parameters.
        params: usize,
    },
    /// Not safetensors.
    #[error("{0}")]
    Safetensors(#[source] safetensors::SafeTensorError),
    /// Another number of tensors than the model has.
    #[error("{found} tensors, this model has {wanted}")]
    TensorCount {
        /// Tensors in the file.
        found: usize,
        /// Tensors of the model.
        wanted: usize,
    },
    /// A tensor of the model is missing.
    #[error("no tensor `{name}`")]
    NoTensor {
        /// Its name.
        name: String,
        /// Cause.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A tensor of another type or shape than the model's.
    #[error("tensor `{name}` is {dtype:?} {shape:?}, this model needs F32 {wanted:?}")]
    TensorShape {
        /// Its name.
        name: String,
        /// Its type.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
        /// The model's shape for it.
        wanted: Vec<usize>,
    },
    /// A metadata entry warden writes is missing.
    #[error("no `{0}` in its metadata")]
    NoMetadata(&'static str),
    /// A metadata entry that should be a number is not.
    #[error("`{key}` is not a number")]
    NotANumber {
        /// The entry.
        key: &'static str,
        /// Cause.
        #[source]
        source: std::num::ParseIntError,
    },
    /// A model kind that cannot serve predictions.
    #[error("model `{0}` cannot serve predictions")]
    NotServable(String),
    /// The last layer's width is not the number of classes.
    #[error("its layers do not end in {0} classes")]
    Classes(usize),
}

/// Why a model directory could not be read or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    /// The file could not be read, or a key could not be loaded.
    #[error(transparent)]
    Read(#[from] SignError),
    /// The file's contents are not this model's.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ModelFileError,
    },
    /// The signature does not verify.
    #[error("the signature does not verify: {0}")]
    Unverified(#[source] SignError),
    /// `[model] init` weights that verified but are not this model's.
    #[error("initial weights: {}: {source}", path.display())]
    InitialWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ModelFileError,
    },
    /// No trusted key verifies the `[model] init` weights.
    #[error(
        "initial weights {} were not loaded: no trusted key verifies them ({})",
        dir.display(),
        each_key(tried)
    )]
    NotTrusted {
        /// The model directory.
        dir: PathBuf,
        /// Each key tried, and why it did not verify.
        tried: Vec<(PathBuf, SignError)>,
    },
}

fn each_key(tried: &[(PathBuf, SignError)]) -> String {
    tried.iter().map(|(key, e)| format!("{}: {e}", key.display())).collect::<Vec<_>>().join("; ")
}

fn in_file(path: &Path) -> impl FnOnce(ModelFileError) -> ArtifactError + '_ {
    move |source| ArtifactError::File { path: path.to_path_buf(), source }
}

/// File name of the model inside a model directory.
pub const MODEL_FILE: &str = "model.safetensors";

/// The metadata entry naming how built-in models' weights are laid out.
pub const LAYOUT_KEY: &str = "layout";
/// Its value: weights `[out, in]`, as `torch.nn.Linear` keeps them.
pub const TORCH_LAYOUT: &str = "torch";

/// One tensor of a model file: its name and shape in the file, where its
/// values sit in the flat vector, and, for a built-in model's weight, the
/// vector's `[in, out]` shape it is the transpose of.
struct FileTensor {
    name: String,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
    transposed_from: Option<(usize, usize)>,
}

/// The tensors of `model` as a file of the given layout holds them
/// (`torch`: built-in weights `[out, in]`; otherwise as in the vector).
fn file_tensors(model: &ModelSpec, torch: bool) -> Vec<FileTensor> {
    let builtin = matches!(model.kind, crate::job::spec::ModelKind::Softmax | crate::job::spec::ModelKind::Mlp);
    layout(model)
        .into_iter()
        .map(|(name, shape, range)| match shape[..] {
            [fan_in, fan_out] if builtin && torch => {
                FileTensor { name, shape: vec![fan_out, fan_in], range, transposed_from: Some((fan_in, fan_out)) }
            }
            _ => FileTensor { name, shape, range, transposed_from: None },
        })
        .collect()
}

/// The little-endian bytes of one tensor in the file's order.
fn tensor_bytes(t: &FileTensor, params: &[f32]) -> Vec<u8> {
    let values = &params[t.range.clone()];
    match t.transposed_from {
        None => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Some((fan_in, fan_out)) => {
            let mut out = Vec::with_capacity(values.len() * 4);
            for o in 0..fan_out {
                for i in 0..fan_in {
                    out.extend_from_slice(&values[i * fan_out + o].to_le_bytes());
                }
            }
            out
        }
    }
}

/// Copies one tensor's file bytes into its place in the flat vector.
fn copy_into(t: &FileTensor, out: &mut [f32], data: &[u8]) {
    let dst = &mut out[t.range.clone()];
    match t.transposed_from {
        None => crate::kernels::convert::copy_f32_le(dst, data),
        Some((fan_in, fan_out)) => {
            for (k, b) in data.chunks_exact(4).enumerate() {
                let (o, i) = (k / fan_in, k % fan_in);
                dst[i * fan_out + o] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Whether built-in weights in a file are `[out, in]`: every file but one
/// an earlier warden wrote (`format = warden` and no `layout` entry), so a
/// state dict PyTorch saved itself reads in its own layout.
fn is_torch_layout(meta: Option<&HashMap<String, String>>) -> bool {
    let get = |k: &str| meta.and_then(|m| m.get(k)).map(String::as_str);
    let earlier_warden = get("format") == Some("warden") && get(LAYOUT_KEY).is_none();
    !earlier_warden
}

/// Writes `dir/model.safetensors` atomically (temporary file, fsync, rename).
pub fn write_model(dir: &Path, model: &ModelSpec, params: &[f32], seed: u64) -> std::io::Result<()> {
    write(dir, model, params, seed, None)
}

/// [`write_model`] for the weights after global training step `step`,
/// which the file's metadata records as `step`.
pub fn write_model_at(dir: &Path, model: &ModelSpec, params: &[f32], seed: u64, step: u64) -> std::io::Result<()> {
    write(dir, model, params, seed, Some(step))
}

fn write(dir: &Path, model: &ModelSpec, params: &[f32], seed: u64, step: Option<u64>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file_tensors(model, true)
        .into_iter()
        .map(|t| {
            let bytes = tensor_bytes(&t, params);
            (t.name, t.shape, bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v)).map_err(std::io::Error::other)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = [
        ("format".to_string(), "warden".to_string()),
        ("model".to_string(), format!("{:?}", model.kind).to_lowercase()),
        ("inputs".to_string(), model.inputs.to_string()),
        ("classes".to_string(), model.classes.to_string()),
        ("seed".to_string(), seed.to_string()),
        (LAYOUT_KEY.to_string(), TORCH_LAYOUT.to_string()),
    ]
    .into_iter()
    .chain(step.map(|s| ("step".to_string(), s.to_string())))
    .collect::<HashMap<_, _>>();
    let data = safetensors::serialize(views, Some(meta)).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{MODEL_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(MODEL_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Largest `model.safetensors` read when the model's shape is not known
/// beforehand (`warden serve`): 1 GiB, 256 million `f32` parameters.
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

/// Largest `model.safetensors` of `model`: its parameters and 1 MiB of header.
fn max_bytes(model: &ModelSpec) -> u64 {
    (crate::train::model::num_params(model) as u64) * 4 + (1 << 20)
}

/// Reads `dir/model.safetensors` (unverified) into the flat parameter
/// vector of `model`; see [`params_of`].
pub fn read_model(dir: &Path, model: &ModelSpec) -> Result<Vec<f32>, ArtifactError> {
    let path = dir.join(MODEL_FILE);
    let bytes = crate::store::signing::read_regular(&path, max_bytes(model))?;
    params_of(&bytes, model).map_err(in_file(&path))
}

/// The flat parameter vector of `model` from the contents of a
/// `model.safetensors`: every tensor of the layout present, `F32`, of the
/// right shape, and nothing else.
pub fn params_of(bytes: &[u8], model: &ModelSpec) -> Result<Vec<f32>, ModelFileError> {
    let n = crate::train::model::num_params(model);
    if bytes.len() as u64 > max_bytes(model) {
        return Err(ModelFileError::TooLarge { bytes: bytes.len(), params: n });
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(ModelFileError::Safetensors)?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(ModelFileError::Safetensors)?;
    let wanted = file_tensors(model, is_torch_layout(meta.metadata().as_ref()));
    if st.len() != wanted.len() {
        return Err(ModelFileError::TensorCount { found: st.len(), wanted: wanted.len() });
    }
    let mut out = vec![0.0f32; n];
    for w in wanted {
        let t = match st.tensor(&w.name) {
            Ok(t) => t,
            Err(source) => return Err(ModelFileError::NoTensor { name: w.name, source }),
        };
        if t.dtype() != Dtype::F32 || t.shape() != w.shape.as_slice() {
            let (dtype, found) = (t.dtype(), t.shape().to_vec());
            return Err(ModelFileError::TensorShape { name: w.name, dtype, shape: found, wanted: w.shape });
        }
        copy_into(&w, &mut out, t.data());
    }
    Ok(out)
}

/// Verifies the model directory against any of `trusted_keys` and returns
/// the parameters of `model` parsed from the very bytes that verified.
pub fn load_verified(
    dir: &Path,
    trusted_keys: &[std::path::PathBuf],
    model: &ModelSpec,
) -> Result<Vec<f32>, ArtifactError> {
    let mut tried = Vec::new();
    for key_path in trusted_keys {
        let key = crate::store::signing::load_public_key(key_path)?;
        match crate::store::signing::verify_model_file(dir, &key, None, MODEL_FILE, max_bytes(model)) {
            Ok(v) => {
                return params_of(v.bytes(), model)
                    .map_err(|source| ArtifactError::InitialWeights { path: dir.join(MODEL_FILE), source });
            }
            Err(e) => tried.push((key_path.clone(), e)),
        }
    }
    Err(ArtifactError::NotTrusted { dir: dir.to_path_buf(), tried })
}

/// A signed model, verified, with its shape and parameters read from the
/// bytes that verified.
#[derive(Debug)]
pub struct SignedModel {
    /// What the signature covered.
    pub verified: crate::store::signing::Verified,
    /// The model's shape, from the file's metadata.
    pub spec: ModelSpec,
    /// Its parameters.
    pub params: Vec<f32>,
}

/// Verifies the model directory against `key`, then takes the model's shape
/// and parameters from the `model.safetensors` bytes that verified (at most
/// [`MAX_MODEL_BYTES`]), never from the file again.
pub fn load_signed(dir: &Path, key: &p256::ecdsa::VerifyingKey) -> Result<SignedModel, ArtifactError> {
    let v = crate::store::signing::verify_model_file(dir, key, None, MODEL_FILE, MAX_MODEL_BYTES)
        .map_err(ArtifactError::Unverified)?;
    let path = dir.join(MODEL_FILE);
    let spec = spec_of(v.bytes()).map_err(in_file(&path))?;
    let params = params_of(v.bytes(), &spec).map_err(in_file(&path))?;
    Ok(SignedModel { verified: v.verified, spec, params })
}

/// The model a `model.safetensors` written by warden holds (read unverified,
/// at most [`MAX_MODEL_BYTES`]); see [`spec_of`].
pub fn model_spec_of(dir: &Path) -> Result<ModelSpec, ArtifactError> {
    let path = dir.join(MODEL_FILE);
    let bytes = crate::store::signing::read_regular(&path, MAX_MODEL_BYTES)?;
    spec_of(&bytes).map_err(in_file(&path))
}

/// The model the contents of a `model.safetensors` written by warden hold:
/// kind, sizes and hidden widths from its metadata and tensor shapes
/// (nothing is executed).
pub fn spec_of(bytes: &[u8]) -> Result<ModelSpec, ModelFileError> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(ModelFileError::Safetensors)?;
    let md = meta.metadata().clone().unwrap_or_default();
    let get = |k: &'static str| md.get(k).cloned().ok_or(ModelFileError::NoMetadata(k));
    let kind = match get("model")?.as_str() {
        "softmax" => crate::job::spec::ModelKind::Softmax,
        "mlp" => crate::job::spec::ModelKind::Mlp,
        other => return Err(ModelFileError::NotServable(other.to_string())),
    };
    let num =
        |key: &'static str| get(key)?.parse::<usize>().map_err(|source| ModelFileError::NotANumber { key, source });
    let (inputs, classes) = (num("inputs")?, num("classes")?);
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(ModelFileError::Safetensors)?;
    // A layer's width is its weight's `out`: first under the torch layout.
    let out_axis = if is_torch_layout(Some(&md)) { 0 } else { 1 };
    let mut hidden = Vec::new();
    for i in 0.. {
        match st.tensor(&format!("fc{i}.weight")) {
            Ok(t) if t.shape().len() == 2 => hidden.push(t.shape()[out_axis]),
            _ => break,
        }
    }
    if hidden.pop() != Some(classes) {
        return Err(ModelFileError::Classes(classes));
    }
    Ok(ModelSpec { kind, inputs, classes, hidden, dropout: 0.0, params: 0, tensors: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::spec::ModelKind;

    fn mlp() -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Mlp,
            inputs: 3,
            classes: 4,
            hidden: vec![2],
            dropout: 0.0,
            params: 0,
            tensors: Vec::new(),
        }
    }

    fn tensor(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
    }

    /// Each weight is `[out, in]` in the file: element `(o, i)` is the
    /// vector's `(i, o)`, as `torch.nn.Linear` computes `x @ W.T + b`.
    #[test]
    fn built_in_weights_are_stored_out_by_in_like_torch_linear() {
        let dir = tempfile::tempdir().unwrap();
        let spec = mlp();
        let params: Vec<f32> = (0..spec.num_params()).map(|v| v as f32).collect();
        write_model(dir.path(), &spec, &params, 7).unwrap();
        let bytes = std::fs::read(dir.path().join(MODEL_FILE)).unwrap();
        // fc0: in 3, out 2 at 0..6, bias 6..8; fc1: in 2, out 4 at 8..16, bias 16..20.
        let (shape, w0) = tensor(&bytes, "fc0.weight");
        assert_eq!(shape, [2, 3]);
        for (o, i) in (0..2).flat_map(|o| (0..3).map(move |i| (o, i))) {
            assert_eq!(w0[o * 3 + i], params[i * 2 + o], "fc0.weight[{o}][{i}]");
        }
        assert_eq!(tensor(&bytes, "fc1.weight").0, [4, 2]);
        assert_eq!(tensor(&bytes, "fc1.bias"), (vec![4], params[16..20].to_vec()));
        assert_eq!(read_model(dir.path(), &spec).unwrap(), params);
        assert_eq!(spec_of(&bytes).unwrap().hidden, [2]);
    }

    /// A file an earlier warden wrote (weights `[in, out]`, no `layout`
    /// entry) reads into the same vector; a state dict without warden's
    /// metadata is PyTorch's `[out, in]`.
    #[test]
    fn files_in_the_earlier_in_by_out_layout_still_read() {
        let spec = mlp();
        let params: Vec<f32> = (0..spec.num_params()).map(|v| v as f32 * 0.5).collect();
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = layout(&spec)
            .into_iter()
            .map(|(name, shape, range)| (name, shape, params[range].iter().flat_map(|v| v.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, TensorView<'_>)> =
            tensors.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
        let meta: HashMap<String, String> = [("format", "warden"), ("model", "mlp"), ("inputs", "3"), ("classes", "4")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let bytes = safetensors::serialize(views, Some(meta)).unwrap();
        assert_eq!(params_of(&bytes, &spec).unwrap(), params);
        assert_eq!(spec_of(&bytes).unwrap().hidden, [2]);
        let torch_saved = safetensors::serialize(
            tensors.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())),
            None,
        )
        .unwrap();
        let e = params_of(&torch_saved, &spec).unwrap_err();
        assert!(matches!(e, ModelFileError::TensorShape { ref wanted, .. } if wanted == &[2, 3]), "{e}");
    }
}
