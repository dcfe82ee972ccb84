//! Fuzzing on every test run: the seed corpus and every saved
//! crash in `fuzz/` replay through `warden_agent::fuzz`, then a bounded
//! mutation run feeds each target tens of thousands of inputs derived from
//! its corpus. The coverage-guided runs are `scripts/fuzz` (cargo-fuzz).
//!
//! A failing input is saved under `target/fuzz-failures/TARGET/` and the
//! test names it; copied to `fuzz/regressions/TARGET/` it stays a
//! regression test for good. `WARDEN_FUZZ_SEED` repeats a run,
//! `WARDEN_FUZZ_ITERS` sets its length (default 50,000 per target).

use std::path::{Path, PathBuf};

use warden_agent::fuzz::TARGETS;
use warden_tests::repo_root;

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

/// Runs `f` on `data`; a panic becomes an error naming the saved input.
fn run(target: &str, f: fn(&[u8]), data: &[u8]) -> Result<(), String> {
    let outcome = std::panic::catch_unwind(|| f(data));
    outcome.map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let dir = repo_root().join("target/fuzz-failures").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        let name = format!("crash-{:016x}", fnv(data));
        std::fs::write(dir.join(&name), data).unwrap();
        format!("{target}: panicked ({what}) on {}", dir.join(name).display())
    })
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

#[test]
fn every_target_has_a_seed_corpus_and_replays_it_and_every_regression_cleanly() {
    let mut failures = Vec::new();
    for (name, f) in TARGETS {
        let seeds = inputs(&repo_root().join("fuzz/corpus").join(name));
        assert!(seeds.len() >= 3, "fuzz/corpus/{name} needs seeds (run this file's `write_seed_corpus`)");
        for (_, data) in seeds.iter().chain(inputs(&repo_root().join("fuzz/regressions").join(name)).iter()) {
            failures.extend(run(name, *f, data).err());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// xorshift64*: the mutation run needs speed and repeatability, not secrecy.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random edit of the kinds that find parser bugs: bit flips, random
/// and boundary bytes, lengths of 0/-1/0x7fffffff, cuts, repeats, splices.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    const INTERESTING: [u32; 8] = [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 0x8000_0000];
    let len = input.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.next() as u8;
        }
        2 if len >= 4 => {
            let i = rng.below(len - 3);
            let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
            input[i..i + 4].copy_from_slice(&v);
        }
        3 => input.truncate(rng.below(len + 1)),
        4 if len > 0 => {
            let (a, b) = (rng.below(len), rng.below(len));
            let (a, b) = (a.min(b), a.max(b));
            input.drain(a..b);
        }
        5 if len > 0 => {
            let (a, n) = (rng.below(len), rng.below(64) + 1);
            let piece: Vec<u8> = input[a..(a + n).min(len)].to_vec();
            let at = rng.below(len + 1);
            input.splice(at..at, piece);
        }
        6 if !other.is_empty() => {
            let a = rng.below(other.len());
            let b = a + rng.below(other.len() - a) + 1;
            let at = rng.below(len + 1);
            input.splice(at..at, other[a..b].iter().copied());
        }
        7 => {
            let at = rng.below(len + 1);
            let b = [b'"', b'[', b']', b'{', b'}', b'=', b'\n', b'\\', 0, 0xff, b'-', b'9'][rng.below(12)];
            input.insert(at, b);
        }
        _ => {
            let n = rng.below(8) + 1;
            for _ in 0..n {
                input.push(rng.next() as u8);
            }
        }
    }
}

#[test]
fn a_bounded_mutation_run_of_every_target_finds_nothing() {
    let seed = std::env::var("WARDEN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(warden_agent::secure_random::u64)
        | 1;
    let iters: usize = std::env::var("WARDEN_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(50_000);
    let mut failures = Vec::new();
    for (name, f) in TARGETS {
        let corpus: Vec<Vec<u8>> =
            inputs(&repo_root().join("fuzz/corpus").join(name)).into_iter().map(|(_, d)| d).collect();
        let mut rng = Rng(seed ^ fnv(name.as_bytes()));
        // The checkpoint reader spawns its pipeline threads per call: fewer runs.
        let n = if *name == "checkpoint" { iters / 10 } else { iters };
        for _ in 0..n {
            let mut input = corpus[rng.below(corpus.len())].clone();
            let other = &corpus[rng.below(corpus.len())];
            for _ in 0..=rng.below(4) {
                mutate(&mut rng, &mut input, other);
            }
            if let Err(e) = run(name, *f, &input) {
                failures.push(e);
                break;
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed} (WARDEN_FUZZ_SEED={seed} repeats it):\n{}", failures.join("\n"));
}

/// Writes the seed corpus into `fuzz/corpus/` from real encodings: run with
/// `cargo test -p warden-tests --test fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore = "regenerates fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    use warden_agent::net::wire::{Encoding, Message, ShardDigest, encode_push};
    use warden_agent::store::checkpoint::{self as ck, CheckpointKey, Manifest, ShardRecord, ShardState};
    use warden_agent::train::optimizer::OptimizerSpec;

    let root = repo_root().join("fuzz/corpus");
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    // Messages: one of every kind, and pushes in every encoding.
    let digest = ShardDigest { shard: 1, bytes: 4096, sha256: [7; 32] };
    let messages = vec![
        Message::Welcome,
        Message::Register,
        Message::SetOptimizer(OptimizerSpec::sgd(0.1)),
        Message::Start,
        Message::Barrier { id: 3 },
        Message::BarrierDone { id: 3 },
        Message::Finished,
        Message::Shutdown,
        Message::Abort { reason: "a reason".into() },
        Message::Push { step: 9, data: vec![1.0, -2.5, f32::MIN_POSITIVE, 0.0] },
        Message::Pull { min_version: 4 },
        Message::Params { version: 4, data: vec![0.5; 6] },
        Message::Checkpoint { step: 20 },
        Message::CheckpointSaved { step: 20, record: digest.clone() },
        Message::CheckpointFailed { step: 20, reason: "disk full".into() },
        Message::CheckpointCommit { step: 20, shards: vec![digest.clone(), digest] },
        Message::Resumable { steps: vec![40, 20] },
        Message::ResumeFrom { step: 40 },
        Message::Heartbeat,
        Message::SetParams { data: vec![0.25; 5] },
        Message::Error { message: "refused".into() },
    ];
    let mut stream = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let mut frame = Vec::new();
        m.encode_frame(&mut frame);
        put("message", &format!("seed-{i:02}-{}", m.name()), &frame[4..]);
        stream.extend_from_slice(&frame);
    }
    let grad = [0.75f32, -0.25, 3.0, -4.0, 0.0, 1e-3, 2.0];
    for (i, enc) in [Encoding::F16, Encoding::Bf16, Encoding::TwoBit].into_iter().enumerate() {
        let mut frame = Vec::new();
        encode_push(5, &grad, enc, 0.5, &mut [0.0; 7], &mut frame);
        put("message", &format!("seed-push-{i}"), &frame[4..]);
        stream.extend_from_slice(&frame);
    }
    put("frame", "seed-all", &stream);
    put("frame", "seed-one", &stream[..stream.len().min(64)]);
    put("frame", "seed-huge-length", &[0xff, 0xff, 0xff, 0x7f, 1]);

    // Control lines both ways.
    put("control", "seed-stop", b"{\"type\":\"stop\"}\n");
    put(
        "control",
        "seed-cert",
        b"{\"type\":\"certificate\",\"cert_pem\":\"-----BEGIN CERTIFICATE-----\\n\",\"ca_pem\":\"x\"}\n",
    );
    put(
        "control",
        "seed-events",
        b"{\"event\":\"started\"}\n{\"event\":\"progress\",\"epoch\":1,\"step\":20,\"steps\":62}\n",
    );
    put("control", "seed-failed", b"{\"event\":\"failed\",\"message\":\"why\"}\n");

    // Job files: every shipped config.
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "toml") {
            put("job_file", &format!("seed-{}", p.file_name().unwrap().to_string_lossy()), &std::fs::read(&p).unwrap());
        }
    }

    // A checkpoint shard of several chunks, and its manifest.
    let key = CheckpointKey::new(&warden_agent::fuzz::fuzz_secret());
    let at = warden_agent::fuzz::fuzz_placement();
    let state = ShardState { t: 3, params: (0..16).map(|i| i as f32).collect(), slots: vec![vec![0.25; 16]] };
    let scratch = warden_tests::scratch("fuzz-seeds");
    let shard = scratch.join("shard.wck");
    let rec = ck::write_shard(&shard, &key, &at, &state, 64).unwrap();
    put("checkpoint", "seed-shard", &std::fs::read(&shard).unwrap());
    let empty = ShardState { t: 0, params: vec![], slots: vec![] };
    ck::write_shard(&shard, &key, &at, &empty, 64).unwrap();
    put("checkpoint", "seed-empty", &std::fs::read(&shard).unwrap());
    put("checkpoint", "seed-garbage", b"WARDENCK not really");
    let step_dir = scratch.join("step-000000000003");
    std::fs::create_dir_all(&step_dir).unwrap();
    let manifest = Manifest {
        format: ck::MANIFEST_FORMAT,
        job_id: at.job.clone(),
        step: 3,
        shards: 1,
        key_id: key.id_hex(),
        files: vec![ShardRecord { shard: 0, file: ck::shard_file(0), bytes: rec.bytes, sha256: rec.sha256 }],
    };
    ck::write_manifest(&step_dir, &key, &manifest).unwrap();
    let text = std::fs::read(step_dir.join("MANIFEST.json")).unwrap();
    ck::parse_manifest(&text, Path::new("/nonexistent/step-000000000003"), Some(&key)).unwrap();
    put("manifest", "seed-valid", &text);
    put("manifest", "seed-empty-object", b"{}");
    put("manifest", "seed-no-mac", br#"{"manifest":{"format":1},"mac":""}"#);

    // A signature made with the fuzz key over a small model directory.
    let model = scratch.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
    std::fs::write(model.join("config.json"), b"{}").unwrap();
    let sig = warden_agent::store::signing::sign_model(&model, &warden_agent::fuzz::fuzz_signing_key(), None).unwrap();
    let text = std::fs::read(&sig).unwrap();
    let key = *warden_agent::fuzz::fuzz_signing_key().verifying_key();
    assert_eq!(warden_agent::store::signing::check_bundle(&text, &key).unwrap().len(), 2);
    put("signature", "seed-valid", &text);
    put("signature", "seed-empty-object", b"{}");
    put("signature", "seed-wrong-type", br#"{"mediaType":"x","verificationMaterial":{},"dsseEnvelope":{}}"#);
}
