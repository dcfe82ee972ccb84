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
