//! Model artifacts: the trained parameters as safetensors (no pickle, no
//! code), with the model's shape and seed in the file's metadata.

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
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = layout(model)
        .into_iter()
        .map(|(name, shape, range)| (name, shape, params[range].iter().flat_map(|v| v.to_le_bytes()).collect()))
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
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(ModelFileError::Safetensors)?;
    let wanted = layout(model);
    if st.len() != wanted.len() {
        return Err(ModelFileError::TensorCount { found: st.len(), wanted: wanted.len() });
    }
    let mut out = vec![0.0f32; n];
    for (name, shape, range) in wanted {
        let t = match st.tensor(&name) {
            Ok(t) => t,
            Err(source) => return Err(ModelFileError::NoTensor { name, source }),
        };
        if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
            let (dtype, found) = (t.dtype(), t.shape().to_vec());
            return Err(ModelFileError::TensorShape { name, dtype, shape: found, wanted: shape });
        }
        crate::kernels::convert::copy_f32_le(&mut out[range], t.data());
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
    let mut hidden = Vec::new();
    for i in 0.. {
        match st.tensor(&format!("fc{i}.weight")) {
            Ok(t) if t.shape().len() == 2 => hidden.push(t.shape()[1]),
            _ => break,
        }
    }
    if hidden.pop() != Some(classes) {
        return Err(ModelFileError::Classes(classes));
    }
    Ok(ModelSpec { kind, inputs, classes, hidden, dropout: 0.0, params: 0, tensors: Vec::new() })
}
