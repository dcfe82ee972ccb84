//! Entry points for fuzzing every parser that reads bytes from someone else:
//! the frame reader and message decoders (peers), the control channel (the
//! launcher and the agents), the job file (users), checkpoint shards and
//! manifests (the disk), and model signatures (whoever handed over a model).
//!
//! Each takes arbitrary bytes and must return without panicking, hanging or
//! allocating beyond a bound; where a parser has an inverse, the entry also
//! checks that a decoded value encodes and decodes to itself. The same
//! functions are driven by the cargo-fuzz targets in `fuzz/` (coverage-guided,
//! `scripts/fuzz`) and by the bounded mutation run and corpus replay in
//! `tests/tests/fuzz.rs` (every test run).

use std::path::Path;
use std::sync::OnceLock;

use crate::net::identity::{JobId, Role};
use crate::store::checkpoint::{CheckpointKey, CheckpointSecret, Placement, Shape};

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// Every target: its name (the directory of its corpus) and its entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", frame),
    ("message", message),
    ("control", control),
    ("job_file", job_file),
    ("checkpoint", checkpoint),
    ("manifest", manifest),
    ("signature", signature),
];

/// A stream of frames as a peer would send them, read with a 64 KiB limit
/// and decoded as if from each role in turn.
pub fn frame(data: &[u8]) {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime starts")
    });
    rt.block_on(async {
        let mut r = data;
        let mut buf = Vec::new();
        while let Ok(true) = crate::net::conn::read_frame(&mut r, 1 << 16, &mut buf).await {
            for role in [Role::Scheduler, Role::Server, Role::Worker] {
                let _ = crate::net::conn::decode_from(&buf, role);
            }
        }
    });
}

/// One frame body; a message that decodes must survive a round trip.
pub fn message(data: &[u8]) {
    let Ok(msg) = crate::net::wire::Message::decode(data) else { return };
    let mut once = Vec::new();
    msg.encode_frame(&mut once);
    let again = crate::net::wire::Message::decode(&once[crate::net::wire::HEADER_LEN..])
        .unwrap_or_else(|e| panic!("{msg:?} does not decode from its own encoding: {e}"));
    let mut twice = Vec::new();
    again.encode_frame(&mut twice);
    assert_eq!(once, twice, "{msg:?} changes in a round trip");
}

/// A control line in either direction (launcher to agent, agent to launcher).
pub fn control(data: &[u8]) {
    let mut input = std::io::BufReader::new(data);
    while let Ok(Some(_)) = crate::agent::read_control(&mut input) {}
    let _ = serde_json::from_slice::<crate::net::control::Event>(data);
}

/// A job file.
pub fn job_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = crate::job::spec::JobSpec::parse("job.toml", text, Path::new("/nonexistent")) {
        // Every error points into the file.
        assert!(e.line >= 1 && e.line <= text.lines().count().max(1) + 1, "{e:?} outside the file");
    }
}

fn key() -> &'static CheckpointKey {
    static KEY: OnceLock<CheckpointKey> = OnceLock::new();
    KEY.get_or_init(|| CheckpointKey::new(&fuzz_secret()))
}

/// The fixed checkpoint secret the seed corpus was written with.
pub fn fuzz_secret() -> CheckpointSecret {
    CheckpointSecret::from_hex(&"5a".repeat(32)).expect("64 hex digits")
}

/// The placement the seed corpus's shards were written for.
pub fn fuzz_placement() -> Placement {
    Placement {
        job: JobId::try_from("00112233445566778899aabbccddeeff".to_string()).expect("a valid id"),
        step: 3,
        shard: 0,
        shards: 1,
    }
}

/// A checkpoint shard file's bytes, with and without an expected placement.
pub fn checkpoint(data: &[u8]) {
    let path = Path::new("fuzz.wck");
    let at = fuzz_placement();
    for (place, shape) in [(Some(&at), Shape { len: Some(16), slots: Some(1) }), (None, Shape::default())] {
        let _ = crate::store::checkpoint::read_shard_from(data, data.len() as u64, path, key(), place, shape, false);
    }
}

/// A step's manifest, with and without the key.
pub fn manifest(data: &[u8]) {
    let dir = Path::new("/nonexistent/step-000000000003");
    let _ = crate::store::checkpoint::parse_manifest(data, dir, Some(key()));
    let _ = crate::store::checkpoint::parse_manifest(data, dir, None);
}

/// A model signature (Sigstore bundle), checked against a fixed key.
pub fn signature(data: &[u8]) {
    static KEY: OnceLock<p256::ecdsa::VerifyingKey> = OnceLock::new();
    let key = KEY.get_or_init(|| *fuzz_signing_key().verifying_key());
    let _ = crate::store::signing::check_bundle(data, key);
}

/// The fixed signing key the seed corpus's signatures were made with.
pub fn fuzz_signing_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).expect("a valid scalar")
}
