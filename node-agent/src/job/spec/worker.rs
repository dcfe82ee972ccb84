//! `[worker]`: the user's own training program, which an external model needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;

use super::{ModelKind, SpecError, Src, raw};

/// `[worker]`: the program each worker rank runs instead of the built-in
/// training loop; it talks to the parameter servers through the agent's
/// local KV socket (`docs/byo.md`).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerSpec {
    /// Program and arguments (no shell).
    pub command: Vec<String>,
    /// Working directory (default: the job file's directory).
    pub workdir: PathBuf,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
}

/// Checks `[worker]`, which `[model] kind = "external"` requires and every
/// other kind refuses.
pub(super) fn convert_worker(
    src: &Src<'_>,
    worker: Option<&Spanned<raw::Worker>>,
    model: &raw::Model,
    kind: ModelKind,
    base_dir: &Path,
) -> Result<Option<WorkerSpec>, SpecError> {
    Ok(match (worker, kind == ModelKind::External) {
        (Some(w), true) => {
            let w = w.get_ref();
            if w.command.get_ref().is_empty() || w.command.get_ref()[0].is_empty() {
                return Err(src.err(
                    w.command.span(),
                    "[worker] command is empty",
                    "name the program and its arguments, for example [\"python3\", \"train.py\"]",
                ));
            }
            let env = w.env.as_ref().map(|e| e.get_ref().clone()).unwrap_or_default();
            if let Some(k) = env.keys().find(|k| k.starts_with("WARDEN_") || k.is_empty() || k.contains('=')) {
                let span = w.env.as_ref().map(|e| e.span()).unwrap_or_default();
                return Err(src.err(span, format!("[worker] env cannot set `{k}`"), "WARDEN_* are set by the agent"));
            }
            Some(WorkerSpec {
                command: w.command.get_ref().clone(),
                workdir: w.workdir.as_ref().map_or_else(|| base_dir.to_path_buf(), |d| base_dir.join(d.get_ref())),
                env,
            })
        }
        (None, true) => {
            return Err(src.err(
                model.kind.span(),
                "an external model is trained by your own program",
                "add [worker] command = [\"python3\", \"train.py\"] (see docs/byo.md)",
            ));
        }
        (Some(w), false) => {
            return Err(src.err(
                w.span(),
                "[worker] command runs your own program, which needs [model] kind = \"external\"",
                "set kind = \"external\" and declare [model.tensors], or remove [worker]",
            ));
        }
        (None, false) => None,
    })
}
