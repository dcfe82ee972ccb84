//! `warden keygen|sign|verify`: model signatures in the OpenSSF
//! model-signing format, interoperable with `model_signing ... key`.

use std::path::Path;

use warden_agent::signing;

use crate::cli::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// The passphrase held in environment variable `var`, if one is named.
fn passphrase(var: Option<&str>) -> Result<Option<zeroize::Zeroizing<String>>, String> {
    match var {
        None => Ok(None),
        Some(v) => match std::env::var(v) {
            Ok(p) if !p.is_empty() => Ok(Some(zeroize::Zeroizing::new(p))),
            _ => Err(format!("environment variable {v} (named by --passphrase-env) is unset or empty")),
        },
    }
}

/// Writes a new key pair.
pub fn exec_keygen(out: &Path, passphrase_env: Option<&str>) -> u8 {
    let pass = match passphrase(passphrase_env) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match signing::write_key_pair(out, pass.as_deref().map(String::as_str)) {
        Ok((private, public)) => {
            println!(
                "wrote {} (private, mode 0600{}) and {} (public)",
                private.display(),
                if pass.is_some() { ", passphrase-protected" } else { "" },
                public.display()
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
    }
}

/// Signs a model directory.
pub fn exec_sign(model: &Path, key: &Path, signature: Option<&Path>, passphrase_env: Option<&str>) -> u8 {
    let result = passphrase(passphrase_env)
        .map_err(|e| (EXIT_USAGE, e))
        .and_then(|pass| {
            signing::load_private_key(key, pass.as_deref().map(String::as_str)).map_err(|e| (EXIT_USAGE, e.to_string()))
        })
        .and_then(|k| signing::sign_model(model, &k, signature).map_err(|e| (EXIT_FAILED, e.to_string())));
    match result {
        Ok(path) => {
            println!("signed {} -> {}", model.display(), path.display());
            EXIT_OK
        }
        Err((code, e)) => {
            eprintln!("error: {e}");
            code
        }
    }
}

/// Verifies a model directory.
pub fn exec_verify(model: &Path, pubkey: &Path, signature: Option<&Path>) -> u8 {
    let key = match signing::load_public_key(pubkey) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match signing::verify_model(model, &key, signature) {
        Ok(v) => {
            println!("verified {}: {} file(s), digest sha256:{}", model.display(), v.files.len(), v.digest);
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: verification failed: {e}");
            EXIT_FAILED
        }
    }
}
