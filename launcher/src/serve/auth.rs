//! Who is asking: API keys (made by `warden apikey`, listed in the keys file
//! by their SHA-256 hashes only), client-certificate holders and anonymous
//! callers, and the policy each gets. No HTTP here: [`identify`] takes the
//! bearer key and the certificate holder's name, and the HTTP layer turns a
//! [`Refused`] into 401.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::config::{Config, ConfigError, Policy, RawPolicy};

/// Key hash -> (key id, policy).
pub(super) type Keys = HashMap<[u8; 32], (String, Policy)>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
// The policy fields are repeated from RawPolicy on purpose: serde cannot
// combine `flatten` with `deny_unknown_fields`, and a misspelt key setting
// must be an error, not silently ignored.
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    sha256: String,
    output: Option<String>,
    precision: Option<u32>,
    top_k: Option<usize>,
    queries_per_day: Option<u64>,
    queries_total: Option<u64>,
    rate_per_s: Option<f64>,
    burst: Option<u32>,
}

/// The keys listed in the keys file at `path`, each with `defaults` and its
/// own settings.
pub(super) fn load_keys(path: &Path, defaults: &Policy, classes: usize) -> Result<Keys, ConfigError> {
    let parsed: KeysFile = ConfigError::load(path)?;
    let mut keys = Keys::new();
    for k in parsed.key {
        let digest = unhex32(&k.sha256).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "{}: key `{}`: sha256 must be 64 hex digits (`warden apikey` prints it)",
                path.display(),
                k.id
            ))
        })?;
        let over = RawPolicy {
            output: k.output,
            precision: k.precision,
            top_k: k.top_k,
            queries_per_day: k.queries_per_day,
            queries_total: k.queries_total,
            rate_per_s: k.rate_per_s,
            burst: k.burst,
        };
        let policy = over.apply(defaults, classes, &format!("{}: key `{}`", path.display(), k.id))?;
        if keys.insert(digest, (k.id.clone(), policy)).is_some() {
            return Err(ConfigError::Invalid(format!("{}: the same key hash is listed twice", path.display())));
        }
    }
    Ok(keys)
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    warden_agent::hex::decode_array(s.trim())
}

/// A new API key and the line that admits it.
pub fn new_api_key(id: &str) -> (String, String) {
    let bytes: [u8; 24] = warden_agent::secure_random::bytes();
    let key = format!("wdn_{}", warden_agent::hex::encode(&bytes));
    let hash = warden_agent::hex::encode(&Sha256::digest(key.as_bytes()));
    (key, format!("[[key]]\nid = \"{id}\"\nsha256 = \"{hash}\"\n"))
}

/// Why a caller was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// A key was given, and it is not in the keys file.
    UnknownKey,
    /// Neither a key nor a certificate, and anonymous callers may not ask.
    NoCredentials,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::UnknownKey => "unknown API key",
            Refused::NoCredentials => "an API key (Authorization: Bearer KEY) or a client certificate is required",
        })
    }
}

/// Who asks (key id, `cert:NAME` or `anonymous`) and under which policy.
/// `key` is the bearer key, if one was sent; `client` the verified client
/// certificate's holder. Callers with neither pass only when `[auth]
/// anonymous` is on and `anonymous_ok` says they may.
pub(super) fn identify(
    config: &Config,
    key: Option<&str>,
    client: Option<&str>,
    anonymous_ok: bool,
) -> Result<(String, Policy), Refused> {
    match key {
        Some(key) => {
            let digest: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
            config.keys.get(&digest).cloned().ok_or(Refused::UnknownKey)
        }
        None => match (client, &config.client_ca, &config.anonymous) {
            (Some(name), Some((_, p)), _) => {
                Ok((format!("cert:{name}"), config.clients.get(name).unwrap_or(p).clone()))
            }
            (_, _, Some(p)) if anonymous_ok => Ok(("anonymous".into(), p.clone())),
            _ => Err(Refused::NoCredentials),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_certificates_and_anonymous_callers_get_their_policies() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (key, entry) = new_api_key("alice");
        std::fs::write(dir.path().join("keys.toml"), format!("{entry}precision = 4\n")).expect("written");
        let toml = "[auth]\napi_keys = \"keys.toml\"\nanonymous = true\nclient_ca = \"ca.pem\"\n\
                    [clients.bob]\noutput = \"label\"\n";
        std::fs::write(dir.path().join("serve.toml"), toml).expect("written");
        let c = Config::load(Some(&dir.path().join("serve.toml")), 10).expect("valid");
        let alice = Policy { precision: 4, ..Policy::default() };
        assert_eq!(identify(&c, Some(&key), None, false), Ok(("alice".into(), alice.clone())));
        // A key wins over a certificate, and an unknown key is refused even where anonymous callers pass.
        assert_eq!(identify(&c, Some(&key), Some("bob"), true), Ok(("alice".into(), alice)));
        assert_eq!(identify(&c, Some("wdn_00"), None, true), Err(Refused::UnknownKey));
        let bob = Policy { labels_only: true, ..Policy::default() };
        assert_eq!(identify(&c, None, Some("bob"), false), Ok(("cert:bob".into(), bob)));
        assert_eq!(identify(&c, None, Some("carol"), false), Ok(("cert:carol".into(), Policy::default())));
        assert_eq!(identify(&c, None, None, true), Ok(("anonymous".into(), Policy::default())));
        assert_eq!(identify(&c, None, None, false), Err(Refused::NoCredentials));
    }

    #[test]
    fn a_key_hash_must_be_64_hex_digits() {
        assert_eq!(unhex32(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(unhex32(&format!(" {} ", "0f".repeat(32))), Some([0x0f; 32]));
        assert_eq!(unhex32(&"ab".repeat(31)), None);
        assert_eq!(unhex32(&format!("{}zz", "ab".repeat(31))), None);
    }
}
