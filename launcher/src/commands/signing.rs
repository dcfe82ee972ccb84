//! `warden keygen|sign|verify`: model signatures in the OpenSSF
//! model-signing format, interoperable with `model_signing ... key`.

use std::path::Path;

use warden_agent::store::signing;

use crate::cli::EXIT_OK;
use crate::error::{CliError, Context};

/// `--passphrase-env` names a variable that holds no passphrase.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {0} (named by --passphrase-env) is unset or empty")]
pub struct NoPassphrase(String);

/// The passphrase held in environment variable `var`, if one is named.
fn passphrase(var: Option<&str>) -> Result<Option<zeroize::Zeroizing<String>>, NoPassphrase> {
    match var {
        None => Ok(None),
        Some(v) => match std::env::var(v) {
            Ok(p) if !p.is_empty() => Ok(Some(zeroize::Zeroizing::new(p))),
            _ => Err(NoPassphrase(v.to_string())),
        },
    }
}

/// Writes a new key pair.
pub fn exec_keygen(out: &Path, passphrase_env: Option<&str>) -> Result<u8, CliError> {
    let pass = passphrase(passphrase_env).map_err(CliError::usage)?;
    let (private, public) =
        signing::write_key_pair(out, pass.as_deref().map(String::as_str)).map_err(CliError::usage)?;
    println!(
        "wrote {} (private, mode 0600{}) and {} (public)",
        private.display(),
        if pass.is_some() { ", passphrase-protected" } else { "" },
        public.display()
    );
    Ok(EXIT_OK)
}

/// Signs a model directory.
pub fn exec_sign(
    model: &Path,
    key: &Path,
    signature: Option<&Path>,
    passphrase_env: Option<&str>,
) -> Result<u8, CliError> {
    let pass = passphrase(passphrase_env).map_err(CliError::usage)?;
    let key = signing::load_private_key(key, pass.as_deref().map(String::as_str)).map_err(CliError::usage)?;
    let path = signing::sign_model(model, &key, signature).map_err(CliError::failed)?;
    println!("signed {} -> {}", model.display(), path.display());
    Ok(EXIT_OK)
}

/// Verifies a model directory.
pub fn exec_verify(model: &Path, pubkey: &Path, signature: Option<&Path>) -> Result<u8, CliError> {
    let key = signing::load_public_key(pubkey).map_err(CliError::usage)?;
    let v = signing::verify_model(model, &key, signature)
        .map_err(|e| CliError::failed(Context::new("verification failed", e)))?;
    println!("verified {}: {} file(s), digest sha256:{}", model.display(), v.files.len(), v.digest);
    Ok(EXIT_OK)
}
