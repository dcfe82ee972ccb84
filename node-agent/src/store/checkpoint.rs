//! Encrypted checkpoints: the file format, keys, manifests and retention.
//!
//! # Layout on a node
//! ```text
//! DIR/<series>/step-000000000300/shard-0000.wck    one per server
//!                               /MANIFEST.json     written last
//! ```
//! `<series>` is the id of the job that started the series; a resumed job
//! keeps writing into its series. A step counts only once its manifest
//! exists: the scheduler commits it when every server reported its shard.
//!
//! # Shard file
//! A 64-byte header (magic, version, chunk size, job id, step, shard, shard
//! count, key id, nonce prefix) and the plaintext length (8 bytes), an
//! HMAC-SHA256 of those 72 bytes, then
//! the plaintext in fixed-size chunks sealed with AES-256-GCM (aws-lc-rs, the
//! provider rustls already uses) in the STREAM construction of Hoang et al.:
//! chunk `i`'s nonce is `prefix(7) || i (4, big-endian) || last (1)`, and the
//! header is every chunk's associated data. So a reordered chunk fails (its
//! counter differs), a dropped or added final chunk fails (the last flag),
//! and a file moved to another shard, step or job fails (the header says
//! where it belongs and cannot be changed without the key). Memory stays at
//! one chunk whatever the shard's size.
//!
//! # Manifest digests
//! A manifest names each shard file's digest: SHA-256 over the file's head
//! (header, length, MAC) and every chunk's GCM tag, in order (manifest
//! format 2). The tags authenticate every byte of the chunks under the key,
//! and the head holds a random nonce prefix of its own, so the digest pins
//! the one file written for the step (another authentic file of the same
//! step, shard and series has another head) while costing 16 bytes of
//! hashing per chunk instead of the whole file: sealing and opening are
//! then the only work per byte, spread over both cores. Format 1 manifests
//! (SHA-256 of the whole file) are still read and checked as they were.
//!
//! # Keys
//! One 256-bit secret per job; three subkeys are derived from it with
//! HMAC-SHA256 under distinct labels (encryption, authentication, key id),
//! so the key id in headers and manifests reveals nothing about the secret
//! and a wrong key is told apart from a damaged file. Secrets are zeroized
//! when dropped and never printed.

use crate::hex::encode as hex;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::{digest, hmac};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::net::identity::JobId;

/// First bytes of every shard file.
pub const MAGIC: &[u8; 8] = b"WARDENCK";
/// Format version written and understood.
pub const VERSION: u16 = 1;
/// Bytes of the authenticated header fields.
pub const HEADER_LEN: usize = 64;
/// Bytes of the header's MAC.
pub const HEADER_MAC_LEN: usize = 32;
/// Bytes of each chunk's GCM tag.
pub const TAG_LEN: usize = 16;
/// Default plaintext bytes per chunk.
pub const DEFAULT_CHUNK: u32 = 1 << 20;
/// Name of a step's manifest.
pub const MANIFEST: &str = "MANIFEST.json";
/// Manifest format written (1 is still read).
pub const MANIFEST_FORMAT: u32 = 2;
/// Bytes of the shard state's own header inside the plaintext.
const STATE_HEADER: usize = 32;
const STATE_MAGIC: &[u8; 8] = b"WDSHARD1";

/// Text that is not a checkpoint key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not 64 hex digits.
    #[error("a checkpoint key is 64 hexadecimal digits (256 bits); make one with `warden checkpoint keygen FILE`")]
    NotHex,
    /// 64 hex digits that still did not decode.
    #[error("a checkpoint key is 64 hexadecimal digits")]
    Undecodable,
}

/// A checkpoint key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading the file failed.
    #[error("checkpoint key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The key file is a link, directory or device.
    #[error("checkpoint key file {} is not a regular file", .0.display())]
    NotRegular(PathBuf),
    /// The key file is readable by others than its owner.
    #[error(
        "checkpoint key file {} has mode {mode:04o}; a key must be readable by its owner only: chmod 600 {}",
        path.display(),
        path.display()
    )]
    Mode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a key.
    #[error("checkpoint key file {}: {source}", path.display())]
    Contents {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: KeyError,
    },
}

/// What went wrong with a checkpoint; every case names the file and says
/// what to conclude.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// Not a warden checkpoint at all.
    #[error("{path}: not a warden checkpoint (bad magic bytes)")]
    NotCheckpoint {
        /// The file.
        path: PathBuf,
    },
    /// Written by a format version this build does not read.
    #[error("{path}: checkpoint format version {found}; this warden reads version {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u16,
    },
    /// Encrypted under another key.
    #[error(
        "{path}: written with checkpoint key {file_key}, but the key given is {our_key}: wrong key (use the key file the job was launched with)"
    )]
    WrongKey {
        /// The file.
        path: PathBuf,
        /// Key id in the file.
        file_key: String,
        /// Key id of the key given.
        our_key: String,
    },
    /// The header's MAC does not match.
    #[error("{path}: the header fails authentication: it was modified after it was written")]
    HeaderTampered {
        /// The file.
        path: PathBuf,
    },
    /// An authentic file in the wrong place.
    #[error("{path}: belongs to {what} {found}, not {expected}: it was swapped in from another {what}")]
    Misplaced {
        /// The file.
        path: PathBuf,
        /// "job", "step" or "shard".
        what: &'static str,
        /// What this place needs.
        expected: String,
        /// What the header says.
        found: String,
    },
    /// A chunk's tag does not match.
    #[error("{path}: chunk {chunk} fails authentication: its bytes or tag were modified, or chunks were reordered")]
    ChunkTampered {
        /// The file.
        path: PathBuf,
        /// Chunk index from 0.
        chunk: u64,
    },
    /// Shorter than the header says.
    #[error("{path}: {actual} bytes, but its header promises {expected}: the file was truncated")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// Longer than the header says.
    #[error("{path}: {actual} bytes, but its header promises {expected}: data was appended to the file")]
    Extended {
        /// The file.
        path: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// Authentic, but not the state expected (another model or optimizer).
    #[error("{path}: {detail}")]
    Contents {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        detail: String,
    },
    /// The manifest is missing, malformed or fails authentication.
    #[error("{path}: {detail}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The file authenticates, but it is not the one the manifest recorded.
    #[error(
        "{path}: its SHA-256 differs from the one in the step's manifest: it was replaced after the step completed"
    )]
    Digest {
        /// The file.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// A job's 256-bit checkpoint secret: zeroized on drop, never printed,
/// travels as hex inside the agent's bundle on stdin.
#[derive(Clone)]
pub struct CheckpointSecret(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for CheckpointSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointSecret(<redacted>)")
    }
}

impl CheckpointSecret {
    /// A fresh secret from the OS CSPRNG.
    pub fn generate() -> CheckpointSecret {
        CheckpointSecret(Zeroizing::new(crate::secure_random::bytes()))
    }

    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Result<CheckpointSecret, KeyError> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::NotHex);
        }
        let mut out = Zeroizing::new([0u8; 32]);
        if !crate::hex::decode_into(t, &mut out[..]) {
            return Err(KeyError::Undecodable);
        }
        Ok(CheckpointSecret(out))
    }

    /// As 64 hex digits, in a buffer that is zeroized when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(64));
        for b in self.0.iter() {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
        }
        s
    }

    /// Reads a key file: a regular file of mode 0600 holding 64 hex digits.
    pub fn load(path: &Path) -> Result<CheckpointSecret, KeyFileError> {
        use std::os::unix::fs::PermissionsExt;
        let unreadable = |source| KeyFileError::Read { path: path.to_path_buf(), source };
        let meta = fs::symlink_metadata(path).map_err(unreadable)?;
        if !meta.file_type().is_file() {
            return Err(KeyFileError::NotRegular(path.to_path_buf()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode != 0o600 {
            return Err(KeyFileError::Mode { path: path.to_path_buf(), mode });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(unreadable)?);
        CheckpointSecret::from_hex(&text).map_err(|source| KeyFileError::Contents { path: path.to_path_buf(), source })
    }

    /// Writes a new key file (mode 0600); refuses to overwrite one.
    pub fn write_new(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(self.to_hex().as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    }
}

impl Serialize for CheckpointSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for CheckpointSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        CheckpointSecret::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// The keys derived from a [`CheckpointSecret`].
pub struct CheckpointKey {
    aead: LessSafeKey,
    mac: hmac::Key,
    id: [u8; 8],
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CheckpointKey(id {})", self.id_hex())
    }
}

impl CheckpointKey {
    /// Derives the encryption, authentication and id subkeys.
    pub fn new(secret: &CheckpointSecret) -> CheckpointKey {
        let master = hmac::Key::new(hmac::HMAC_SHA256, &secret.0[..]);
        let derive = |label: &[u8]| {
            let mut out = Zeroizing::new([0u8; 32]);
            out.copy_from_slice(hmac::sign(&master, label).as_ref());
            out
        };
        let enc = derive(b"warden checkpoint v1: encryption key");
        let mac = derive(b"warden checkpoint v1: header and manifest authentication key");
        let id = derive(b"warden checkpoint v1: key id");
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &enc[..]).expect("32 bytes is an AES-256 key"));
        let mut short = [0u8; 8];
        short.copy_from_slice(&id[..8]);
        CheckpointKey { aead, mac: hmac::Key::new(hmac::HMAC_SHA256, &mac[..]), id: short }
    }

    /// The key id as 16 hex digits (safe to show).
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

fn job_bytes(job: &JobId) -> [u8; 16] {
    // A job id is 32 hex digits by construction.
    crate::hex::decode_array(job.as_str()).unwrap_or_default()
}

/// Where a shard file belongs; checked against its authenticated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The series (job id that started it).
    pub job: JobId,
    /// Training step the state is from.
    pub step: u64,
    /// Server rank.
    pub shard: u32,
    /// Number of servers.
    pub shards: u32,
}

/// The decoded header of a shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Plaintext bytes per chunk.
    pub chunk: u32,
    /// Series id bytes.
    pub job: [u8; 16],
    /// Step.
    pub step: u64,
    /// Shard.
    pub shard: u32,
    /// Shard count.
    pub shards: u32,
    /// Key id.
    pub key_id: [u8; 8],
    /// Total plaintext bytes.
    pub plain_len: u64,
    /// Nonce prefix, random per file.
    pub prefix: [u8; 7],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&VERSION.to_le_bytes());
        // 10..12 reserved, zero.
        h[12..16].copy_from_slice(&self.chunk.to_le_bytes());
        h[16..32].copy_from_slice(&self.job);
        h[32..40].copy_from_slice(&self.step.to_le_bytes());
        h[40..44].copy_from_slice(&self.shard.to_le_bytes());
        h[44..48].copy_from_slice(&self.shards.to_le_bytes());
        h[48..56].copy_from_slice(&self.key_id);
        // 56 reserved, zero. The plaintext length follows the 64 bytes.
        h[57..64].copy_from_slice(&self.prefix);
        h
    }

    fn decode(h: &[u8; HEADER_LEN], len_bytes: &[u8; 8], path: &Path) -> Result<Header, CheckpointError> {
        if &h[0..8] != MAGIC {
            return Err(CheckpointError::NotCheckpoint { path: path.to_path_buf() });
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != VERSION {
            return Err(CheckpointError::Version { path: path.to_path_buf(), found: version });
        }
        let arr = |r: std::ops::Range<usize>| h[r].to_vec();
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        Ok(Header {
            chunk: u32_at(12),
            job: arr(16..32).try_into().expect("16 bytes"),
            step: u64::from_le_bytes(h[32..40].try_into().expect("8 bytes")),
            shard: u32_at(40),
            shards: u32_at(44),
            key_id: arr(48..56).try_into().expect("8 bytes"),
            plain_len: u64::from_le_bytes(*len_bytes),
            prefix: arr(57..64).try_into().expect("7 bytes"),
        })
    }

    /// Number of chunks (an empty plaintext still has one, empty, final chunk).
    fn chunks(&self) -> u64 {
        self.plain_len.div_ceil(u64::from(self.chunk)).max(1)
    }

    /// Size of a well-formed file with this header.
    pub fn file_len(&self) -> u64 {
        (HEADER_LEN + 8 + HEADER_MAC_LEN) as u64 + self.plain_len + self.chunks() * TAG_LEN as u64
    }
}

// The authenticated prefix is the 64 header bytes plus the 8-byte length.
fn aad_bytes(h: &Header) -> [u8; HEADER_LEN + 8] {
    let mut a = [0u8; HEADER_LEN + 8];
    a[..HEADER_LEN].copy_from_slice(&h.encode());
    a[HEADER_LEN..].copy_from_slice(&h.plain_len.to_le_bytes());
    a
}

fn nonce(prefix: &[u8; 7], counter: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&(counter as u32).to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// A server's shard of the training state.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardState {
    /// Updates applied (the optimizer's step counter).
    pub t: u64,
    /// Parameters.
    pub params: Vec<f32>,
    /// Optimizer state slots, each as long as `params` (0, 1 or 2 of them).
    pub slots: Vec<Vec<f32>>,
}

impl ShardState {
    fn plain_len(&self) -> u64 {
        (STATE_HEADER + 4 * self.params.len() * (1 + self.slots.len())) as u64
    }
}

/// What a written shard file is: recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRecord {
    /// Server rank.
    pub shard: u32,
    /// File name inside the step directory.
    pub file: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file's head and chunk tags (manifest format 2) or of
    /// the whole file (format 1), hex.
    pub sha256: String,
}

/// Directory of a series under a checkpoint root.
pub fn series_dir(root: &Path, series: &JobId) -> PathBuf {
    root.join(series.as_str())
}

/// Directory of one step.
pub fn step_dir(series: &Path, step: u64) -> PathBuf {
    series.join(format!("step-{step:012}"))
}

/// File name of a shard.
pub fn shard_file(shard: u32) -> String {
    format!("shard-{shard:04}.wck")
}

/// Encrypts `state` into `path` (temporary file, fsync, rename, fsync of the
/// directory) with chunks of `chunk` bytes; returns its manifest record
/// (with the digest of its head and tags, see the module docs).
pub fn write_shard(
    path: &Path,
    key: &CheckpointKey,
    at: &Placement,
    state: &ShardState,
    chunk: u32,
) -> Result<ShardRecord, CheckpointError> {
    assert!(chunk >= 64 && chunk.is_multiple_of(4), "chunks hold whole f32 values");
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let header = Header {
        chunk,
        job: job_bytes(&at.job),
        step: at.step,
        shard: at.shard,
        shards: at.shards,
        key_id: key.id,
        plain_len: state.plain_len(),
        prefix: crate::secure_random::bytes(),
    };
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let mut hash = digest::Context::new(&digest::SHA256);
        let aad = aad_bytes(&header);
        let mac = hmac::sign(&key.mac, &aad);
        for part in [&aad[..], mac.as_ref()] {
            hash.update(part);
            file.write_all(part).map_err(io_err(&tmp))?;
        }
        // One thread fills chunks, two seal every other one, this one
        // hashes their tags and writes them.
        let chunks = header.chunks();
        let mut source = PlainSource::new(state);
        let fill = |_: u64, buf: &mut Vec<u8>| {
            source.fill(buf, chunk as usize);
            Ok(())
        };
        let seal = |parity: u64| {
            let (header, aad, tmp) = (&header, &aad, &tmp);
            move |i: u64, buf: &mut Vec<u8>| {
                if i % 2 != parity {
                    return Ok(());
                }
                key.aead
                    .seal_in_place_append_tag(nonce(&header.prefix, i, i + 1 == chunks), Aad::from(&aad[..]), buf)
                    .map_err(|_| CheckpointError::Contents { path: tmp.clone(), detail: "encryption failed".into() })
            }
        };
        let write = |_: u64, buf: &mut Vec<u8>| {
            hash.update(&buf[buf.len() - TAG_LEN..]);
            file.write_all(buf).map_err(io_err(&tmp))
        };
        let stages: Vec<Stage<'_>> = vec![Box::new(fill), Box::new(seal(0)), Box::new(seal(1))];
        pipeline(&tmp, chunks, chunk as usize + TAG_LEN, stages, write)?;
        file.sync_all().map_err(io_err(&tmp))?;
        Ok(hash.finish())
    })();
    let sha = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
    Ok(ShardRecord { shard: at.shard, file: name, bytes: header.file_len(), sha256: hex(sha.as_ref()) })
}

/// Produces the plaintext of a [`ShardState`] piece by piece.
struct PlainSource<'a> {
    head: [u8; STATE_HEADER],
    arrays: Vec<&'a [f32]>,
    /// Bytes produced so far.
    pos: usize,
}

impl<'a> PlainSource<'a> {
    fn new(s: &'a ShardState) -> PlainSource<'a> {
        let mut head = [0u8; STATE_HEADER];
        head[0..8].copy_from_slice(STATE_MAGIC);
        head[8..16].copy_from_slice(&(s.params.len() as u64).to_le_bytes());
        head[16..20].copy_from_slice(&(s.slots.len() as u32).to_le_bytes());
        head[24..32].copy_from_slice(&s.t.to_le_bytes());
        let mut arrays = vec![&s.params[..]];
        arrays.extend(s.slots.iter().map(|v| &v[..]));
        PlainSource { head, arrays, pos: 0 }
    }

    /// Appends up to `n` more plaintext bytes to `buf`. Arrays start at
    /// 4-byte offsets and `n` is a multiple of 4, so no value is split.
    fn fill(&mut self, buf: &mut Vec<u8>, mut n: usize) {
        if self.pos < STATE_HEADER {
            let take = (STATE_HEADER - self.pos).min(n);
            buf.extend_from_slice(&self.head[self.pos..self.pos + take]);
            self.pos += take;
            n -= take;
        }
        let mut offset = STATE_HEADER;
        for a in &self.arrays {
            let bytes = a.len() * 4;
            if n > 0 && self.pos < offset + bytes {
                let from = (self.pos - offset) / 4;
                let count = (n / 4).min(a.len() - from);
                crate::kernels::convert::extend_f32_le(buf, &a[from..from + count]);
                self.pos += count * 4;
                n -= count * 4;
            }
            offset += bytes;
        }
    }
}

/// What a reader expects of a shard's contents (`None`: anything).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// Parameters in the shard.
    pub len: Option<usize>,
    /// Optimizer state slots.
    pub slots: Option<usize>,
}

/// Decrypts and checks a shard file against where it should be; returns the
/// state and its digest as manifests of format 2 name it (SHA-256 of the
/// head and the chunk tags, hex).
pub fn read_shard(
    path: &Path,
    key: &CheckpointKey,
    at: Option<&Placement>,
    shape: Shape,
) -> Result<(ShardState, String), CheckpointError> {
    read_shard_digest(path, key, at, shape, false)
}

/// [`read_shard`], with the digest of the whole file instead (what
/// manifests of format 1 name) when `whole_file`: computed from the very
/// bytes decrypted, in the same pass.
fn read_shard_digest(
    path: &Path,
    key: &CheckpointKey,
    at: Option<&Placement>,
    shape: Shape,
    whole_file: bool,
) -> Result<(ShardState, String), CheckpointError> {
    let file = File::open(path).map_err(io_err(path))?;
    let actual = file.metadata().map_err(io_err(path))?.len();
    read_shard_from(file, actual, path, key, at, shape, whole_file)
}

/// [`read_shard`] from any reader of `actual` bytes; `path` names it in
/// errors; `whole_file` as in [`read_shard_digest`].
pub fn read_shard_from<R: Read + Send>(
    mut r: R,
    actual: u64,
    path: &Path,
    key: &CheckpointKey,
    at: Option<&Placement>,
    shape: Shape,
    whole_file: bool,
) -> Result<(ShardState, String), CheckpointError> {
    let mut hash = digest::Context::new(&digest::SHA256);
    let head = read_head(&mut r, actual, path)?;
    hash.update(&head);
    let header = check_header(&head, path, key)?;
    if let Some(at) = at {
        check_placement(&header, at, path)?;
    }
    let expected = check_layout(&header, actual, path)?;
    let aad = &head[..HEADER_LEN + 8];

    // One thread reads and hashes the tags, two open every other chunk,
    // this one fills the state.
    let mut sink = StateSink::new(path, shape);
    let chunks = header.chunks();
    let plain_of = |i: u64| (header.plain_len - i * u64::from(header.chunk)).min(u64::from(header.chunk)) as usize;
    let read_chunk = |i: u64, buf: &mut Vec<u8>| {
        buf.resize(plain_of(i) + TAG_LEN, 0);
        r.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                // The file shrank while we read it.
                CheckpointError::Truncated { path: path.to_path_buf(), expected, actual }
            } else {
                CheckpointError::Io { path: path.to_path_buf(), source: e }
            }
        })?;
        hash.update(if whole_file { &buf[..] } else { &buf[buf.len() - TAG_LEN..] });
        Ok(())
    };
    let open = |parity: u64| {
        let header = &header;
        move |i: u64, buf: &mut Vec<u8>| {
            if i % 2 != parity {
                return Ok(());
            }
            let plain = key
                .aead
                .open_in_place(nonce(&header.prefix, i, i + 1 == chunks), Aad::from(aad), buf)
                .map_err(|_| CheckpointError::ChunkTampered { path: path.to_path_buf(), chunk: i })?
                .len();
            buf.truncate(plain);
            Ok(())
        }
    };
    let take = |_: u64, buf: &mut Vec<u8>| sink.take(buf);
    let stages: Vec<Stage<'_>> = vec![Box::new(read_chunk), Box::new(open(0)), Box::new(open(1))];
    pipeline(path, chunks, header.chunk as usize + TAG_LEN, stages, take)?;
    let mut extra = [0u8; 1];
    if r.read(&mut extra).map_err(io_err(path))? != 0 {
        return Err(CheckpointError::Extended { path: path.to_path_buf(), expected, actual: actual + 1 });
    }
    let state = sink.finish()?;
    Ok((state, hex(hash.finish().as_ref())))
}

/// The fixed header, the plaintext length and the header's MAC, as read.
type Head = [u8; HEADER_LEN + 8 + HEADER_MAC_LEN];

/// Reads the head of a shard file; a short one is truncated if it starts
/// like a checkpoint, and not a checkpoint otherwise.
fn read_head<R: Read>(r: &mut R, actual: u64, path: &Path) -> Result<Head, CheckpointError> {
    let mut head = [0u8; HEADER_LEN + 8 + HEADER_MAC_LEN];
    if let Err(e) = r.read_exact(&mut head) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            if actual < 8 || head[..8] == MAGIC[..] {
                CheckpointError::Truncated { path: path.to_path_buf(), expected: head.len() as u64, actual }
            } else {
                CheckpointError::NotCheckpoint { path: path.to_path_buf() }
            }
        } else {
            CheckpointError::Io { path: path.to_path_buf(), source: e }
        });
    }
    Ok(head)
}

/// Decodes the header and checks that it is for `key` and untouched.
fn check_header(head: &Head, path: &Path, key: &CheckpointKey) -> Result<Header, CheckpointError> {
    let fixed: &[u8; HEADER_LEN] = head[..HEADER_LEN].try_into().expect("64 bytes");
    let len_bytes: &[u8; 8] = head[HEADER_LEN..HEADER_LEN + 8].try_into().expect("8 bytes");
    let header = Header::decode(fixed, len_bytes, path)?;
    if header.key_id != key.id {
        return Err(CheckpointError::WrongKey {
            path: path.to_path_buf(),
            file_key: hex(&header.key_id),
            our_key: key.id_hex(),
        });
    }
    let aad = &head[..HEADER_LEN + 8];
    if hmac::verify(&key.mac, aad, &head[HEADER_LEN + 8..]).is_err() || aad != aad_bytes(&header) {
        return Err(CheckpointError::HeaderTampered { path: path.to_path_buf() });
    }
    Ok(header)
}

/// Checks that the header names the job, step and shard the file should hold.
fn check_placement(header: &Header, at: &Placement, path: &Path) -> Result<(), CheckpointError> {
    let misplaced = |what, expected: String, found: String| CheckpointError::Misplaced {
        path: path.to_path_buf(),
        what,
        expected,
        found,
    };
    if header.job != job_bytes(&at.job) {
        return Err(misplaced("job", at.job.to_string(), hex(&header.job)));
    }
    if header.step != at.step {
        return Err(misplaced("step", at.step.to_string(), header.step.to_string()));
    }
    if header.shard != at.shard || header.shards != at.shards {
        return Err(misplaced(
            "shard",
            format!("{} of {}", at.shard, at.shards),
            format!("{} of {}", header.shard, header.shards),
        ));
    }
    Ok(())
}

/// Checks the file's length and the header's chunk layout; returns the
/// length the header implies.
fn check_layout(header: &Header, actual: u64, path: &Path) -> Result<u64, CheckpointError> {
    let expected = header.file_len();
    if actual < expected {
        return Err(CheckpointError::Truncated { path: path.to_path_buf(), expected, actual });
    }
    if actual > expected {
        return Err(CheckpointError::Extended { path: path.to_path_buf(), expected, actual });
    }
    if header.chunk < 64 || !header.chunk.is_multiple_of(4) || header.plain_len < STATE_HEADER as u64 {
        return Err(CheckpointError::Contents { path: path.to_path_buf(), detail: "impossible chunk layout".into() });
    }
    Ok(expected)
}

/// One stage of a [`pipeline`], run on its own thread.
type Stage<'a> = Box<dyn FnMut(u64, &mut Vec<u8>) -> Result<(), CheckpointError> + Send + 'a>;

/// Passes items `0..n` through `stages` (each on its own scoped thread, in
/// order) and then `last` (on this thread), with a few reused buffers
/// circulating: the cores stay busy (reading, hashing, encrypting at once)
/// and memory stays bounded by the buffers. The first error ends it all.
fn pipeline(
    path: &Path,
    n: u64,
    capacity: usize,
    stages: Vec<Stage<'_>>,
    mut last: impl FnMut(u64, &mut Vec<u8>) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    use std::sync::mpsc::{Receiver, sync_channel};
    const DEPTH: usize = 4;
    type Item = Result<Vec<u8>, CheckpointError>;
    std::thread::scope(|scope| {
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(DEPTH);
        for _ in 0..DEPTH {
            let _ = free_tx.send(Vec::with_capacity(capacity));
        }
        // The first stage takes free buffers; each later one the previous stage's output.
        let (head_tx, mut upstream): (_, Receiver<Item>) = sync_channel(DEPTH);
        scope.spawn(move || {
            for _ in 0..n {
                let Ok(mut buf) = free_rx.recv() else { return };
                buf.clear();
                if head_tx.send(Ok(buf)).is_err() {
                    return;
                }
            }
        });
        for mut stage in stages {
            let (tx, rx) = sync_channel::<Item>(DEPTH);
            let input = std::mem::replace(&mut upstream, rx);
            scope.spawn(move || {
                for i in 0..n {
                    let Ok(item) = input.recv() else { return };
                    let out = item.and_then(|mut buf| stage(i, &mut buf).map(|()| buf));
                    let failed = out.is_err();
                    if tx.send(out).is_err() || failed {
                        return;
                    }
                }
            });
        }
        for i in 0..n {
            let mut buf = upstream.recv().map_err(|_| CheckpointError::Contents {
                path: path.to_path_buf(),
                detail: "a checkpoint pipeline thread stopped".into(),
            })??;
            last(i, &mut buf)?;
            let _ = free_tx.send(buf);
        }
        Ok(())
    })
}

/// Rebuilds a [`ShardState`] from plaintext chunks as they are opened.
struct StateSink<'p> {
    path: &'p Path,
    shape: Shape,
    head: Vec<u8>,
    state: Option<ShardState>,
    /// Values filled so far across params and slots.
    filled: usize,
    /// Bytes of a value split between two pieces (only when pieces are not
    /// multiples of 4, as in tests; chunks always are).
    carry: Vec<u8>,
}

impl<'p> StateSink<'p> {
    fn new(path: &'p Path, shape: Shape) -> StateSink<'p> {
        StateSink { path, shape, head: Vec::new(), state: None, filled: 0, carry: Vec::new() }
    }

    fn bad(&self, detail: String) -> CheckpointError {
        CheckpointError::Contents { path: self.path.to_path_buf(), detail }
    }

    fn take(&mut self, mut bytes: &[u8]) -> Result<(), CheckpointError> {
        if self.state.is_none() {
            let need = STATE_HEADER - self.head.len();
            let take = need.min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.head.len() < STATE_HEADER {
                return Ok(());
            }
            let h = &self.head;
            if &h[0..8] != STATE_MAGIC {
                return Err(self.bad("the decrypted contents are not a shard state".into()));
            }
            let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")) as usize;
            let slots = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
            let t = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
            if slots > 2 {
                return Err(self.bad(format!("{slots} optimizer slots; at most 2 exist")));
            }
            if let Some(want) = self.shape.len
                && want != len
            {
                return Err(self.bad(format!(
                    "holds {len} parameters, but this job's shard has {want}: the model or the server count changed"
                )));
            }
            if let Some(want) = self.shape.slots
                && want != slots
            {
                return Err(self.bad(format!(
                    "holds {slots} optimizer state slots, but this job's optimizer needs {want}: the optimizer kind changed"
                )));
            }
            self.state = Some(ShardState { t, params: vec![0.0; len], slots: vec![vec![0.0; len]; slots] });
        }
        if self.carry.is_empty() {
            // The usual case: whole values straight from the chunk.
            let whole = bytes.len() / 4 * 4;
            self.fill(&bytes[..whole])?;
            self.carry.extend_from_slice(&bytes[whole..]);
        } else {
            let mut carry = std::mem::take(&mut self.carry);
            carry.extend_from_slice(bytes);
            let whole = carry.len() / 4 * 4;
            self.fill(&carry[..whole])?;
            carry.drain(..whole);
            self.carry = carry;
        }
        Ok(())
    }

    /// Copies whole little-endian values into params, then each slot.
    fn fill(&mut self, mut src: &[u8]) -> Result<(), CheckpointError> {
        let st = self.state.as_mut().expect("the state header came first");
        let len = st.params.len();
        let total = len * (1 + st.slots.len());
        while !src.is_empty() {
            if self.filled >= total {
                return Err(CheckpointError::Contents {
                    path: self.path.to_path_buf(),
                    detail: "more values than the state header declares".into(),
                });
            }
            let (array, at) = (self.filled / len.max(1), self.filled % len.max(1));
            let dst = if array == 0 { &mut st.params } else { &mut st.slots[array - 1] };
            let n = (len - at).min(src.len() / 4);
            crate::kernels::convert::copy_f32_le(&mut dst[at..at + n], &src[..n * 4]);
            self.filled += n;
            src = &src[n * 4..];
        }
        Ok(())
    }

    fn finish(self) -> Result<ShardState, CheckpointError> {
        let Some(st) = self.state else {
            return Err(self.bad("too short for a shard state".into()));
        };
        let total = st.params.len() * (1 + st.slots.len());
        if self.filled != total || !self.carry.is_empty() {
            return Err(CheckpointError::Contents {
                path: self.path.to_path_buf(),
                detail: format!("{} of {total} values present", self.filled),
            });
        }
        Ok(st)
    }
}

/// A step's manifest: which shards make it up and their digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format.
    pub format: u32,
    /// Series id.
    pub job_id: JobId,
    /// Step.
    pub step: u64,
    /// Number of shards (servers).
    pub shards: u32,
    /// Key id the shards are encrypted under.
    pub key_id: String,
    /// One record per shard, by rank.
    pub files: Vec<ShardRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    manifest: Manifest,
    /// HMAC-SHA256 of the manifest's canonical JSON, hex.
    mac: String,
}

/// Writes `step_dir/MANIFEST.json` atomically (temporary file, fsync,
/// rename, fsync of the directory). Several servers sharing a directory may
/// write the same manifest; the last rename wins with identical contents.
pub fn write_manifest(step_dir: &Path, key: &CheckpointKey, m: &Manifest) -> Result<(), CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let body = serde_json::to_vec(m).expect("manifests serialize");
    let mac = hex(hmac::sign(&key.mac, &body).as_ref());
    let text = serde_json::to_vec_pretty(&ManifestFile { manifest: m.clone(), mac }).expect("manifests serialize");
    let path = step_dir.join(MANIFEST);
    let tmp = step_dir.join(format!(".{MANIFEST}.tmp-{}", std::process::id()));
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&text).and_then(|_| f.sync_all()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(step_dir).and_then(|d| d.sync_all()).map_err(io_err(step_dir))
}

/// Reads a step's manifest; with a key, also checks its MAC and key id.
pub fn read_manifest(step_dir: &Path, key: Option<&CheckpointKey>) -> Result<Manifest, CheckpointError> {
    let path = step_dir.join(MANIFEST);
    let bad = |detail: String| CheckpointError::Manifest { path: path.clone(), detail };
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(bad("no manifest: the step never completed (a server stopped while writing it)".into()));
        }
        Err(e) => return Err(CheckpointError::Io { path, source: e }),
    };
    parse_manifest(&text, step_dir, key)
}

/// Checks the text of `step_dir`'s manifest (see [`read_manifest`]).
pub fn parse_manifest(text: &[u8], step_dir: &Path, key: Option<&CheckpointKey>) -> Result<Manifest, CheckpointError> {
    let path = step_dir.join(MANIFEST);
    let bad = |detail: String| CheckpointError::Manifest { path: path.clone(), detail };
    if text.len() > 1 << 20 {
        return Err(bad("larger than 1 MiB; not a manifest".into()));
    }
    let file: ManifestFile = serde_json::from_slice(text).map_err(|e| bad(format!("malformed: {e}")))?;
    let m = file.manifest;
    if !(1..=MANIFEST_FORMAT).contains(&m.format) {
        return Err(bad(format!("manifest format {}; this warden reads formats 1 to {MANIFEST_FORMAT}", m.format)));
    }
    if let Some(key) = key {
        if m.key_id != key.id_hex() {
            return Err(bad(format!(
                "written with checkpoint key {}, but the key given is {}: wrong key",
                m.key_id,
                key.id_hex()
            )));
        }
        let body = serde_json::to_vec(&m).expect("manifests serialize");
        let mac = crate::hex::decode(&file.mac).unwrap_or_default();
        if hmac::verify(&key.mac, &body, &mac).is_err() {
            return Err(bad("fails authentication: it was modified after it was written".into()));
        }
    }
    let dir_step = step_of(step_dir);
    if dir_step != Some(m.step) {
        return Err(bad(format!("describes step {}, but lies in {}", m.step, step_dir.display())));
    }
    if m.files.len() != m.shards as usize || m.files.iter().enumerate().any(|(i, f)| f.shard as usize != i) {
        return Err(bad("its shard list is not one record per shard in order".into()));
    }
    if m.files.iter().any(|f| f.file != shard_file(f.shard)) {
        return Err(bad("names a file that is not a shard file".into()));
    }
    Ok(m)
}

fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
}

/// The step directories of a series, oldest first.
pub fn list_steps(series: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(series) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if let Some(step) = step_of(&path)
            && path.is_dir()
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a step directory has its manifest.
pub fn is_complete(step_dir: &Path) -> bool {
    step_dir.join(MANIFEST).is_file()
}

/// Retention: keeps the `keep` newest complete steps and deletes the other
/// complete steps and every incomplete step older than the newest complete
/// one. Steps at or above `protect_from` are left alone (they may still be
/// being written). Returns the deleted steps.
pub fn prune(series: &Path, keep: usize, protect_from: Option<u64>) -> io::Result<Vec<u64>> {
    let steps = list_steps(series)?;
    let eligible: Vec<&(u64, PathBuf)> =
        steps.iter().filter(|(s, _)| protect_from.is_none_or(|limit| *s < limit)).collect();
    let complete: Vec<u64> = eligible.iter().filter(|(_, p)| is_complete(p)).map(|(s, _)| *s).collect();
    let newest_complete = complete.last().copied();
    let kept: Vec<u64> = complete.iter().rev().take(keep).copied().collect();
    let mut deleted = Vec::new();
    for (step, path) in eligible {
        let old_incomplete = !is_complete(path) && newest_complete.is_some_and(|n| *step < n);
        let beyond = is_complete(path) && !kept.contains(step);
        if old_incomplete || beyond {
            match fs::remove_dir_all(path) {
                Ok(()) => deleted.push(*step),
                // Another server on this host deleted it first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(deleted)
}

/// Checks one step for resuming shard `at.shard`: manifest (with MAC), the
/// shard file (authenticated, in place, of the expected shape) and its
/// digest against the manifest. Returns the decrypted state.
pub fn load_step(
    series: &Path,
    key: &CheckpointKey,
    at: &Placement,
    shape: Shape,
) -> Result<ShardState, CheckpointError> {
    let dir = step_dir(series, at.step);
    let m = read_manifest(&dir, Some(key))?;
    if m.job_id != at.job || m.shards != at.shards {
        return Err(CheckpointError::Manifest {
            path: dir.join(MANIFEST),
            detail: format!("belongs to job {} with {} shards, not this series", m.job_id, m.shards),
        });
    }
    let record = &m.files[at.shard as usize];
    let path = dir.join(&record.file);
    read_for_manifest(&m, record, &path, key, Some(at), shape)
}

/// Reads shard `record` of manifest `m` from `path` and checks it against
/// the manifest's digest (of the head and tags for format 2, of the whole
/// file for format 1), computed from the very bytes decrypted.
pub fn read_for_manifest(
    m: &Manifest,
    record: &ShardRecord,
    path: &Path,
    key: &CheckpointKey,
    at: Option<&Placement>,
    shape: Shape,
) -> Result<ShardState, CheckpointError> {
    let (state, digest) = read_shard_digest(path, key, at, shape, m.format < 2)?;
    if digest != record.sha256 {
        return Err(CheckpointError::Digest { path: path.to_path_buf() });
    }
    Ok(state)
}

/// The steps of a series that shard `shard` can resume from, newest first,
/// each fully verified, and a warning for every step skipped.
pub fn resumable_steps(
    series: &Path,
    key: &CheckpointKey,
    job: &JobId,
    shard: u32,
    shards: u32,
    shape: Shape,
) -> io::Result<(Vec<u64>, Vec<String>)> {
    let mut good = Vec::new();
    let mut warnings = Vec::new();
    for (step, _) in list_steps(series)?.into_iter().rev() {
        let at = Placement { job: job.clone(), step, shard, shards };
        match load_step(series, key, &at, shape) {
            Ok(_) => good.push(step),
            Err(e) => warnings.push(format!("skipping checkpoint step {step}: {e}")),
        }
    }
    Ok((good, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(len: usize, slots: usize) -> ShardState {
        let v = |k: f32| (0..len).map(|i| i as f32 * 0.5 + k).collect::<Vec<f32>>();
        ShardState { t: 42, params: v(0.25), slots: (0..slots).map(|s| v(s as f32 + 1000.0)).collect() }
    }

    #[test]
    fn plain_source_lays_out_header_then_arrays() {
        let s = state(5, 1);
        let mut src = PlainSource::new(&s);
        let mut all = Vec::new();
        while all.len() < s.plain_len() as usize {
            src.fill(&mut all, 64);
        }
        assert_eq!(all.len() as u64, s.plain_len());
        let mut sink = StateSink::new(Path::new("x"), Shape::default());
        for piece in all.chunks(12) {
            sink.take(piece).unwrap();
        }
        assert_eq!(sink.finish().unwrap(), s);
    }

    #[test]
    fn secret_hex_round_trip_and_redacted_debug() {
        let s = CheckpointSecret::generate();
        let back = CheckpointSecret::from_hex(&s.to_hex()).unwrap();
        assert_eq!(*s.0, *back.0);
        assert!(!format!("{s:?}").contains(&s.to_hex()[..16]));
        assert!(CheckpointSecret::from_hex("abc").is_err());
        assert_eq!(CheckpointKey::new(&s).id_hex(), CheckpointKey::new(&back).id_hex());
    }
}
