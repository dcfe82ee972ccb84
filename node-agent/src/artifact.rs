//! Model artifacts: the trained parameters as safetensors (no pickle, no
//! code), with the model's shape and seed in the file's metadata.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::model::layout;
use crate::spec::ModelSpec;

/// File name of the model inside a model directory.
pub const MODEL_FILE: &str = "model.safetensors";

/// Writes `dir/model.safetensors` atomically (temporary file, fsync, rename).
pub fn write_model(dir: &Path, model: &ModelSpec, params: &[f32], seed: u64) -> std::io::Result<()> {
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
    let meta = HashMap::from([
        ("format".to_string(), "warden".to_string()),
        ("model".to_string(), format!("{:?}", model.kind).to_lowercase()),
        ("inputs".to_string(), model.inputs.to_string()),
        ("classes".to_string(), model.classes.to_string()),
        ("seed".to_string(), seed.to_string()),
    ]);
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
    (crate::model::num_params(model) as u64) * 4 + (1 << 20)
}

/// Reads `dir/model.safetensors` (unverified) into the flat parameter
/// vector of `model`; see [`params_of`].
pub fn read_model(dir: &Path, model: &ModelSpec) -> Result<Vec<f32>, String> {
    let path = dir.join(MODEL_FILE);
    let bytes = crate::signing::read_regular(&path, max_bytes(model)).map_err(|e| e.to_string())?;
    params_of(&bytes, model).map_err(|e| format!("{}: {e}", path.display()))
}

/// The flat parameter vector of `model` from the contents of a
/// `model.safetensors`: every tensor of the layout present, `F32`, of the
/// right shape, and nothing else.
pub fn params_of(bytes: &[u8], model: &ModelSpec) -> Result<Vec<f32>, String> {
    let n = crate::model::num_params(model);
    if bytes.len() as u64 > max_bytes(model) {
        return Err(format!("{} bytes, too large for this model of {n} parameters", bytes.len()));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let wanted = layout(model);
    if st.len() != wanted.len() {
        return Err(format!("{} tensors, this model has {}", st.len(), wanted.len()));
    }
    let mut out = vec![0.0f32; n];
    for (name, shape, range) in wanted {
        let t = st.tensor(&name).map_err(|_| format!("no tensor `{name}`"))?;
        if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
            return Err(format!("tensor `{name}` is {:?} {:?}, this model needs F32 {shape:?}", t.dtype(), t.shape()));
        }
        crate::kernels::convert::copy_f32_le(&mut out[range], t.data());
    }
    Ok(out)
}

/// Verifies the model directory against any of `trusted_keys` and returns
/// the parameters of `model` parsed from the very bytes that verified.
pub fn load_verified(dir: &Path, trusted_keys: &[std::path::PathBuf], model: &ModelSpec) -> Result<Vec<f32>, String> {
    let mut why = Vec::new();
    for key_path in trusted_keys {
        let key = crate::signing::load_public_key(key_path).map_err(|e| e.to_string())?;
        match crate::signing::verify_model_file(dir, &key, None, MODEL_FILE, max_bytes(model)) {
            Ok(v) => {
                return params_of(v.bytes(), model)
                    .map_err(|e| format!("initial weights: {}: {e}", dir.join(MODEL_FILE).display()));
            }
            Err(e) => why.push(format!("{}: {e}", key_path.display())),
        }
    }
    Err(format!("initial weights {} were not loaded: no trusted key verifies them ({})", dir.display(), why.join("; ")))
}

/// A signed model, verified, with its shape and parameters read from the
/// bytes that verified.
#[derive(Debug)]
pub struct SignedModel {
    /// What the signature covered.
    pub verified: crate::signing::Verified,
    /// The model's shape, from the file's metadata.
    pub spec: ModelSpec,
    /// Its parameters.
    pub params: Vec<f32>,
}

/// Verifies the model directory against `key`, then takes the model's shape
/// and parameters from the `model.safetensors` bytes that verified (at most
/// [`MAX_MODEL_BYTES`]), never from the file again.
pub fn load_signed(dir: &Path, key: &p256::ecdsa::VerifyingKey) -> Result<SignedModel, String> {
    let v = crate::signing::verify_model_file(dir, key, None, MODEL_FILE, MAX_MODEL_BYTES)
        .map_err(|e| format!("the signature does not verify: {e}"))?;
    let path = dir.join(MODEL_FILE);
    let spec = spec_of(v.bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    let params = params_of(v.bytes(), &spec).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(SignedModel { verified: v.verified, spec, params })
}

/// The model a `model.safetensors` written by warden holds (read unverified,
/// at most [`MAX_MODEL_BYTES`]); see [`spec_of`].
pub fn model_spec_of(dir: &Path) -> Result<ModelSpec, String> {
    let path = dir.join(MODEL_FILE);
    let bytes = crate::signing::read_regular(&path, MAX_MODEL_BYTES).map_err(|e| e.to_string())?;
    spec_of(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The model the contents of a `model.safetensors` written by warden hold:
/// kind, sizes and hidden widths from its metadata and tensor shapes
/// (nothing is executed).
pub fn spec_of(bytes: &[u8]) -> Result<ModelSpec, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let md = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| md.get(k).cloned().ok_or_else(|| format!("no `{k}` in its metadata"));
    let kind = match get("model")?.as_str() {
        "softmax" => crate::spec::ModelKind::Softmax,
        "mlp" => crate::spec::ModelKind::Mlp,
        other => return Err(format!("model `{other}` cannot serve predictions")),
    };
    let num = |k: &str| get(k)?.parse::<usize>().map_err(|_| format!("`{k}` is not a number"));
    let (inputs, classes) = (num("inputs")?, num("classes")?);
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut hidden = Vec::new();
    for i in 0.. {
        match st.tensor(&format!("fc{i}.weight")) {
            Ok(t) if t.shape().len() == 2 => hidden.push(t.shape()[1]),
            _ => break,
        }
    }
    if hidden.pop() != Some(classes) {
        return Err(format!("its layers do not end in {classes} classes"));
    }
    Ok(ModelSpec { kind, inputs, classes, hidden, dropout: 0.0, params: 0, tensors: Vec::new() })
}
