//! Signed model artifacts in the OpenSSF model-signing format (v1.0, as the
//! `model-signing` Python package 1.1 writes it in key mode).
//!
//! A signature is a Sigstore bundle (`application/vnd.dev.sigstore.bundle.v0.3+json`)
//! holding a public-key hint (hex SHA-256 of the public key's PEM), no
//! transparency-log entries, and a DSSE envelope around an in-toto Statement
//! v1. The statement's predicate (`https://model_signing/signature/v1.0`)
//! lists every regular file of the model directory with its SHA-256
//! (serialization `files`), sorted by path component; its one subject is the
//! model's name with the SHA-256 of those digests concatenated in order.
//! The envelope's signature is ECDSA P-256 with SHA-256, DER-encoded, over
//! the DSSE pre-authentication encoding of the payload.
//!
//! The verifier is strict: exactly one signature and one subject, the
//! expected types, the hint of the key given, no unknown fields, no symlinks,
//! no file missing, added, renamed or changed, and each failure says which.

use crate::hex::{decode as unhex, encode as hex};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Media type of the bundle.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// DSSE payload type.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// in-toto statement type.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The model-signing predicate.
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// Default signature file name, inside the model directory.
pub const SIGNATURE_FILE: &str = "model.sig";
/// Paths the Python signer leaves out by default (git metadata).
const GIT_PATHS: [&str; 4] = [".gitattributes", ".gitignore", ".github", ".git"];
/// Largest signature file read.
const MAX_SIGNATURE: u64 = 64 << 20;
/// PBKDF2-SHA256 rounds for passphrase-protected keys.
const PBKDF2_ROUNDS: u32 = 600_000;

/// What is wrong with a key, a model or its signature.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// A key file cannot be used.
    #[error("{path}: {detail}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The signature file is not a well-formed bundle of the expected shape.
    #[error("{path}: malformed signature: {detail}")]
    Malformed {
        /// The signature file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Signed by another key (the bundle's key hint differs).
    #[error("the signature was made with another key: its key hint is {found}, the public key given has {expected}")]
    WrongKey {
        /// Hint of the key given.
        expected: String,
        /// Hint in the bundle.
        found: String,
    },
    /// Not exactly one signature.
    #[error("the envelope holds {0} signatures; exactly one is accepted")]
    SignatureCount(usize),
    /// The ECDSA signature does not verify.
    #[error("the signature does not verify: the signed statement was modified, or it was not made with this key")]
    BadSignature,
    /// The statement is not the model-signing predicate this verifier knows.
    #[error("unexpected statement: {0}")]
    Statement(String),
    /// Not exactly one subject.
    #[error("the statement has {0} subjects; exactly one is accepted")]
    SubjectCount(usize),
    /// The subject digest does not match the listed files.
    #[error("the statement is inconsistent: its subject digest is not the digest of its resources")]
    Inconsistent,
    /// A symlink in the model directory.
    #[error("{0}: symbolic links are not allowed in a signed model")]
    Symlink(PathBuf),
    /// Something other than regular files and directories.
    #[error("{0}: not a regular file or directory")]
    Special(PathBuf),
    /// Signed files whose contents changed.
    #[error("modified since signing: {}", .0.join(", "))]
    Modified(Vec<String>),
    /// Signed files that are gone.
    #[error("missing from the model directory: {}", .0.join(", "))]
    Missing(Vec<String>),
    /// Files that were not signed.
    #[error("not covered by the signature: {}", .0.join(", "))]
    Extra(Vec<String>),
    /// A file to be loaded is larger than the most that is read.
    #[error("{path}: larger than {max} bytes, the most that is loaded from it; is this the right file?")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The most that is read.
        max: u64,
    },
    /// Both missing and unsigned files: renamed or replaced.
    #[error("renamed or replaced since signing: missing {}; unsigned {}", .missing.join(", "), .extra.join(", "))]
    Renamed {
        /// Signed names now absent.
        missing: Vec<String>,
        /// Present names not signed.
        extra: Vec<String>,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SignError + '_ {
    move |source| SignError::Io { path: path.to_path_buf(), source }
}

// ---- Keys ----

/// A new P-256 key from the OS CSPRNG.
pub fn generate_key() -> SigningKey {
    loop {
        let bytes = Zeroizing::new(crate::secure_random::bytes::<32>());
        // Rejects 0 and values of n or above (probability about 2^-32).
        if let Ok(k) = SigningKey::from_slice(&bytes[..]) {
            return k;
        }
    }
}

/// The private key as PKCS#8 PEM; encrypted (PBES2: PBKDF2-SHA256, AES-256-CBC)
/// when a passphrase is given.
pub fn private_key_pem(key: &SigningKey, passphrase: Option<&str>) -> Result<Zeroizing<String>, pkcs8::Error> {
    let der = key.to_pkcs8_der()?;
    let Some(pass) = passphrase else {
        return key.to_pkcs8_pem(LineEnding::LF);
    };
    let info = p256::pkcs8::PrivateKeyInfo::try_from(der.as_bytes())?;
    let salt: [u8; 16] = crate::secure_random::bytes();
    let iv: [u8; 16] = crate::secure_random::bytes();
    let params = pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(PBKDF2_ROUNDS, &salt, &iv)?;
    let enc = info.encrypt_with_params(params, pass.as_bytes())?;
    Ok(enc.to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)?)
}

/// The public key as SubjectPublicKeyInfo PEM (the form whose SHA-256 is the hint).
pub fn public_key_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF).expect("P-256 public keys always encode")
}

/// The key hint: hex SHA-256 of the public key's PEM.
pub fn key_hint(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(public_key_pem(key).as_bytes()))
}

/// Loads a PKCS#8 (or SEC1) PEM private key, decrypting it with `passphrase` if it is encrypted.
pub fn load_private_key(path: &Path, passphrase: Option<&str>) -> Result<SigningKey, SignError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
    let bad = |detail: String| SignError::Key { path: path.to_path_buf(), detail };
    if text.contains("BEGIN ENCRYPTED PRIVATE KEY") {
        let pass = passphrase
            .ok_or_else(|| bad("the key is passphrase-protected; give the passphrase (--passphrase-env VAR)".into()))?;
        return SigningKey::from_pkcs8_encrypted_pem(&text, pass.as_bytes())
            .map_err(|_| bad("cannot decrypt the key: wrong passphrase, or not a P-256 key".into()));
    }
    if text.contains("BEGIN PRIVATE KEY") {
        return SigningKey::from_pkcs8_pem(&text).map_err(|e| bad(format!("not a P-256 PKCS#8 private key ({e})")));
    }
    if text.contains("BEGIN EC PRIVATE KEY") {
        return p256::SecretKey::from_sec1_pem(&text)
            .map(SigningKey::from)
            .map_err(|e| bad(format!("not a P-256 EC private key ({e})")));
    }
    Err(bad("no PEM private key found (expected BEGIN PRIVATE KEY); make one with `warden keygen`".into()))
}

/// Loads a SubjectPublicKeyInfo PEM P-256 public key.
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, SignError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| SignError::Key {
        path: path.to_path_buf(),
        detail: format!("not a P-256 public key in PEM (BEGIN PUBLIC KEY): {e}"),
    })
}

// ---- The statement and the bundle ----

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    #[serde(rename = "_type")]
    type_: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Subject {
    name: String,
    digest: SubjectDigest,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectDigest {
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Predicate {
    serialization: Serialization,
    resources: Vec<Resource>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Serialization {
    hash_type: String,
    method: String,
    allow_symlinks: bool,
    #[serde(default)]
    ignore_paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resource {
    name: String,
    algorithm: String,
    digest: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    verification_material: VerificationMaterial,
    dsse_envelope: Envelope,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VerificationMaterial {
    public_key: PublicKeyHint,
    #[serde(default)]
    tlog_entries: Vec<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeyHint {
    hint: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeSignature {
    sig: String,
    #[serde(default)]
    keyid: String,
}

/// DSSE's pre-authentication encoding.
fn pae(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {PAYLOAD_TYPE} {} ", PAYLOAD_TYPE.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

// ---- The model directory ----

/// Paths left out of the signature: the signature file itself (when inside
/// the model directory) and git metadata, as the Python signer does.
fn ignored_paths(model: &Path, signature: &Path) -> Vec<String> {
    let mut out: Vec<String> = GIT_PATHS.iter().map(|s| s.to_string()).collect();
    if let Some(rel) = relative_inside(model, signature) {
        out.push(rel);
    }
    out
}

fn relative_inside(model: &Path, path: &Path) -> Option<String> {
    let model = std::path::absolute(model).ok()?;
    let path = std::path::absolute(path).ok()?;
    let rel = path.strip_prefix(&model).ok()?;
    Some(rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/"))
}

/// The files of a model directory with their SHA-256, and the contents of
/// the one file asked to be kept.
struct Hashed {
    /// POSIX paths relative to the model directory, in the order of their
    /// path components.
    digests: BTreeMap<Vec<String>, [u8; 32]>,
    /// The kept file's bytes: exactly the bytes its digest was computed on.
    kept: Option<Vec<u8>>,
}

/// Every regular file under `model` with its SHA-256; symlinks and special
/// files are errors. The file at `keep.0` (a POSIX path relative to
/// `model`) is read whole into memory, at most `keep.1` bytes, and hashed
/// from there.
fn hash_model(model: &Path, ignore: &[String], keep: Option<(&str, u64)>) -> Result<Hashed, SignError> {
    let meta = std::fs::symlink_metadata(model).map_err(io(model))?;
    if meta.file_type().is_symlink() {
        return Err(SignError::Symlink(model.to_path_buf()));
    }
    if !meta.is_dir() {
        return Err(SignError::Special(model.to_path_buf()));
    }
    let mut out = Hashed { digests: BTreeMap::new(), kept: None };
    let mut stack = vec![(model.to_path_buf(), Vec::<String>::new())];
    while let Some((dir, parts)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let name =
                entry.file_name().to_str().map(str::to_string).ok_or_else(|| SignError::Special(path.clone()))?;
            let mut rel = parts.clone();
            rel.push(name);
            let joined = rel.join("/");
            if ignore.iter().any(|i| joined == *i || joined.starts_with(&format!("{i}/"))) {
                continue;
            }
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_symlink() {
                return Err(SignError::Symlink(path));
            } else if kind.is_dir() {
                stack.push((path, rel));
            } else if kind.is_file() {
                let digest = match keep {
                    Some((name, max)) if joined == name => {
                        let bytes = read_regular(&path, max)?;
                        let digest = Sha256::digest(&bytes).into();
                        out.kept = Some(bytes);
                        digest
                    }
                    _ => hash_file(&path)?,
                };
                out.digests.insert(rel, digest);
            } else {
                return Err(SignError::Special(path));
            }
        }
    }
    Ok(out)
}

/// Opens `path` for reading if it is a regular file. The type is checked on
/// the open file, and a symlink is never followed, so a name swapped after
/// the directory was listed cannot lead elsewhere (nor block on a FIFO).
fn open_regular(path: &Path) -> Result<std::fs::File, SignError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => SignError::Symlink(path.to_path_buf()),
                _ => SignError::Io { path: path.to_path_buf(), source: e },
            },
        )?;
    if !f.metadata().map_err(io(path))?.is_file() {
        return Err(SignError::Special(path.to_path_buf()));
    }
    Ok(f)
}

/// The whole contents of the regular file `path`, refused past `max` bytes
/// (checked on the bytes read, not on a size reported beforehand).
pub(crate) fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, SignError> {
    use std::io::Read;
    let f = open_regular(path)?;
    let hint = f.metadata().map_err(io(path))?.len().min(max);
    let mut bytes = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    f.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(io(path))?;
    if bytes.len() as u64 > max {
        return Err(SignError::TooLarge { path: path.to_path_buf(), max });
    }
    Ok(bytes)
}

fn hash_file(path: &Path) -> Result<[u8; 32], SignError> {
    use std::io::Read;
    let mut f = open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

fn model_name(model: &Path) -> String {
    std::path::absolute(model)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}

// ---- Sign and verify ----

/// Signs the model directory; writes the bundle to `signature`
/// (default `MODEL/model.sig`). Returns the signature's path.
pub fn sign_model(model: &Path, key: &SigningKey, signature: Option<&Path>) -> Result<PathBuf, SignError> {
    let sig_path = signature.map_or_else(|| model.join(SIGNATURE_FILE), Path::to_path_buf);
    let ignore = ignored_paths(model, &sig_path);
    let files = hash_model(model, &ignore, None)?.digests;
    let mut root = Sha256::new();
    let resources: Vec<Resource> = files
        .iter()
        .map(|(parts, digest)| {
            root.update(digest);
            Resource { name: parts.join("/"), algorithm: "sha256".into(), digest: hex(digest) }
        })
        .collect();
    let statement = Statement {
        type_: STATEMENT_TYPE.into(),
        subject: vec![Subject { name: model_name(model), digest: SubjectDigest { sha256: hex(&root.finalize()) } }],
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Predicate {
            serialization: Serialization {
                hash_type: "sha256".into(),
                method: "files".into(),
                allow_symlinks: false,
                ignore_paths: ignore,
            },
            resources,
        },
    };
    let payload = serde_json::to_vec_pretty(&statement).expect("statements serialize");
    let sig: DerSignature = key.sign(&pae(&payload));
    let bundle = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.into(),
        verification_material: VerificationMaterial {
            public_key: PublicKeyHint { hint: key_hint(key.verifying_key()) },
            tlog_entries: Vec::new(),
        },
        dsse_envelope: Envelope {
            payload: B64.encode(&payload),
            payload_type: PAYLOAD_TYPE.into(),
            signatures: vec![EnvelopeSignature { sig: B64.encode(sig.as_bytes()), keyid: String::new() }],
        },
    };
    let text = serde_json::to_string(&bundle).expect("bundles serialize");
    let tmp = sig_path.with_extension("sig.tmp");
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &sig_path).map_err(io(&sig_path))?;
    Ok(sig_path)
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The files, relative to the model directory, in signed order.
    pub files: Vec<String>,
    /// The statement's subject digest (hex).
    pub digest: String,
}

/// A model directory whose signature verified, with the contents of the one
/// file that is to be loaded. Those bytes were read once, and the digest the
/// signature covers was computed on them: what is loaded from here is what
/// was verified, whatever happens to the file on disk afterwards.
#[derive(Debug)]
pub struct VerifiedModel {
    /// What the verification covered.
    pub verified: Verified,
    bytes: Vec<u8>,
}

impl VerifiedModel {
    /// The verified contents of the file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The verified contents of the file, taken out.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Verifies the model directory against its signature (default
/// `MODEL/model.sig`) and a trusted public key.
pub fn verify_model(model: &Path, key: &VerifyingKey, signature: Option<&Path>) -> Result<Verified, SignError> {
    verify(model, key, signature, None).map(|(v, _)| v)
}

/// Verifies the model directory as [`verify_model`] does and keeps the
/// contents of `file` (a signed path relative to the model directory, such
/// as `model.safetensors`), read once into memory, at most `max_bytes`.
/// Load from the returned bytes, never from the file again.
pub fn verify_model_file(
    model: &Path,
    key: &VerifyingKey,
    signature: Option<&Path>,
    file: &str,
    max_bytes: u64,
) -> Result<VerifiedModel, SignError> {
    let (verified, kept) = verify(model, key, signature, Some((file, max_bytes)))?;
    // Every file present was signed and hashed; one not kept is not there.
    let bytes = kept.ok_or_else(|| SignError::Missing(vec![file.to_string()]))?;
    Ok(VerifiedModel { verified, bytes })
}

fn verify(
    model: &Path,
    key: &VerifyingKey,
    signature: Option<&Path>,
    keep: Option<(&str, u64)>,
) -> Result<(Verified, Option<Vec<u8>>), SignError> {
    let sig_path = signature.map_or_else(|| model.join(SIGNATURE_FILE), Path::to_path_buf);
    let malformed = |detail: String| SignError::Malformed { path: sig_path.clone(), detail };
    let size = std::fs::metadata(&sig_path).map_err(io(&sig_path))?.len();
    if size > MAX_SIGNATURE {
        return Err(malformed(format!("{size} bytes; a signature is at most {MAX_SIGNATURE}")));
    }
    let text = std::fs::read(&sig_path).map_err(io(&sig_path))?;
    let (st, signed) = open_bundle(&text, key, &sig_path)?;

    // The ignore list is signed; the signature file itself is never hashed.
    let ser = &st.predicate.serialization;
    let mut ignore = ser.ignore_paths.clone();
    ignore.extend(relative_inside(model, &sig_path));
    let Hashed { digests, kept } = hash_model(model, &ignore, keep)?;
    let actual: BTreeMap<String, [u8; 32]> = digests.into_iter().map(|(k, v)| (k.join("/"), v)).collect();
    let modified: Vec<String> =
        signed.iter().filter(|(n, d)| actual.get(*n).is_some_and(|a| a[..] != d[..])).map(|(n, _)| n.clone()).collect();
    let missing: Vec<String> = signed.keys().filter(|n| !actual.contains_key(*n)).cloned().collect();
    let extra: Vec<String> = actual.keys().filter(|n| !signed.contains_key(*n)).cloned().collect();
    match (modified.is_empty(), missing.is_empty(), extra.is_empty()) {
        (false, _, _) => Err(SignError::Modified(modified)),
        (true, false, false) => Err(SignError::Renamed { missing, extra }),
        (true, false, true) => Err(SignError::Missing(missing)),
        (true, true, false) => Err(SignError::Extra(extra)),
        (true, true, true) => Ok((
            Verified {
                files: st.predicate.resources.iter().map(|r| r.name.clone()).collect(),
                digest: st.subject[0].digest.sha256.clone(),
            },
            kept,
        )),
    }
}

/// Parses a signature bundle, checks its signature with `key` and the
/// statement it signs; returns the statement and its files' digests.
/// `sig_path` names the bundle in errors. Nothing here trusts a byte before
/// the signature over it is verified.
fn open_bundle(
    text: &[u8],
    key: &VerifyingKey,
    sig_path: &Path,
) -> Result<(Statement, BTreeMap<String, Vec<u8>>), SignError> {
    let malformed = |detail: String| SignError::Malformed { path: sig_path.to_path_buf(), detail };
    let bundle: Bundle = serde_json::from_slice(text).map_err(|e| malformed(e.to_string()))?;
    if bundle.media_type != BUNDLE_MEDIA_TYPE {
        return Err(malformed(format!("media type `{}`, expected `{BUNDLE_MEDIA_TYPE}`", bundle.media_type)));
    }
    if !bundle.verification_material.tlog_entries.is_empty() {
        return Err(malformed("transparency-log entries present; a key-mode signature has none".into()));
    }
    let expected = key_hint(key);
    if bundle.verification_material.public_key.hint != expected {
        return Err(SignError::WrongKey { expected, found: bundle.verification_material.public_key.hint });
    }
    let env = &bundle.dsse_envelope;
    if env.payload_type != PAYLOAD_TYPE {
        return Err(malformed(format!("payload type `{}`, expected `{PAYLOAD_TYPE}`", env.payload_type)));
    }
    if env.signatures.len() != 1 {
        return Err(SignError::SignatureCount(env.signatures.len()));
    }
    let payload = B64.decode(&env.payload).map_err(|e| malformed(format!("payload is not base64: {e}")))?;
    let der = B64.decode(&env.signatures[0].sig).map_err(|e| malformed(format!("signature is not base64: {e}")))?;
    let sig = Signature::from_der(&der).map_err(|_| malformed("the signature is not a DER ECDSA signature".into()))?;
    key.verify(&pae(&payload), &sig).map_err(|_| SignError::BadSignature)?;

    // Authentic from here on: now check what it says.
    let st: Statement = serde_json::from_slice(&payload).map_err(|e| SignError::Statement(e.to_string()))?;
    if st.type_ != STATEMENT_TYPE {
        return Err(SignError::Statement(format!("type `{}`, expected `{STATEMENT_TYPE}`", st.type_)));
    }
    if st.predicate_type != PREDICATE_TYPE {
        return Err(SignError::Statement(format!(
            "predicate type `{}`, expected `{PREDICATE_TYPE}`",
            st.predicate_type
        )));
    }
    if st.subject.len() != 1 {
        return Err(SignError::SubjectCount(st.subject.len()));
    }
    let ser = &st.predicate.serialization;
    if ser.method != "files" || ser.hash_type != "sha256" || ser.allow_symlinks {
        return Err(SignError::Statement(format!(
            "serialization method `{}`, hash `{}`, allow_symlinks {}; only files, sha256 and no symlinks are accepted",
            ser.method, ser.hash_type, ser.allow_symlinks
        )));
    }
    let mut root = Sha256::new();
    let mut signed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for r in &st.predicate.resources {
        let digest = unhex(&r.digest).filter(|d| d.len() == 32 && r.algorithm == "sha256").ok_or_else(|| {
            SignError::Statement(format!("resource `{}` has no SHA-256 digest ({} {})", r.name, r.algorithm, r.digest))
        })?;
        root.update(&digest);
        if signed.insert(r.name.clone(), digest).is_some() {
            return Err(SignError::Statement(format!("resource `{}` is listed twice", r.name)));
        }
    }
    if hex(&root.finalize()) != st.subject[0].digest.sha256 {
        return Err(SignError::Inconsistent);
    }

    Ok((st, signed))
}

/// `open_bundle` for the fuzzer: the signature file's text against `key`.
pub fn check_bundle(text: &[u8], key: &VerifyingKey) -> Result<Vec<String>, SignError> {
    open_bundle(text, key, Path::new("model.sig")).map(|(_, signed)| signed.into_keys().collect())
}

/// Writes a new key pair into `dir`: `private.pem` (mode 0600, encrypted
/// when a passphrase is given) and `public.pem`. Refuses to overwrite.
pub fn write_key_pair(dir: &Path, passphrase: Option<&str>) -> Result<(PathBuf, PathBuf), SignError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = generate_key();
    let (private, public) = (dir.join("private.pem"), dir.join("public.pem"));
    for p in [&private, &public] {
        if p.exists() {
            return Err(SignError::Key {
                path: p.clone(),
                detail: "already exists; keys are never overwritten".into(),
            });
        }
    }
    let pem = private_key_pem(&key, passphrase)
        .map_err(|e| SignError::Key { path: private.clone(), detail: e.to_string() })?;
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&private).map_err(io(&private))?;
    f.write_all(pem.as_bytes()).and_then(|_| f.sync_all()).map_err(io(&private))?;
    std::fs::write(&public, public_key_pem(key.verifying_key())).map_err(io(&public))?;
    Ok((private, public))
}
