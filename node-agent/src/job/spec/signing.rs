//! `[signing]`: the key `launch` signs the final model with.

use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;

use super::raw;

/// `[signing]`: how `launch` signs the final model.
#[derive(Debug, Clone, Serialize)]
pub struct SigningSpec {
    /// Private key (PEM) on the launcher's host.
    pub key: PathBuf,
    /// Environment variable holding the key's passphrase, if it has one.
    pub passphrase_env: Option<String>,
}

/// Reads `[signing]`, resolving the key against the job file's directory;
/// the key itself is read (and checked) when the model is signed.
pub(super) fn convert_signing(signing: &Spanned<raw::Signing>, base_dir: &Path) -> SigningSpec {
    let sg = signing.get_ref();
    SigningSpec {
        key: base_dir.join(sg.key.get_ref()),
        passphrase_env: sg.passphrase_env.as_ref().map(|v| v.get_ref().clone()),
    }
}
