//! Encrypted checkpoints: the format detects every kind of
//! tampering with its own error, keys are handled strictly, retention keeps
//! what it should, a server killed mid-write never yields a checkpoint, and
//! a resumed run ends with the same weights as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use warden_agent::net::identity::JobId;
use warden_agent::store::checkpoint::{
    self as ck, CheckpointError, CheckpointKey, CheckpointSecret, Manifest, Placement, Shape, ShardState,
};
use warden_tests::{JobFile, bin, fresh_tag, scratch, wait_gone};

fn state(len: usize, slots: usize) -> ShardState {
    let v = |k: f32| (0..len).map(|i| (i as f32).mul_add(0.25, k)).collect::<Vec<f32>>();
    ShardState { t: 7 + len as u64, params: v(0.5), slots: (0..slots).map(|s| v(-100.0 * (s as f32 + 1.0))).collect() }
}

fn at(job: &JobId, step: u64, shard: u32) -> Placement {
    Placement { job: job.clone(), step, shard, shards: 2 }
}

fn key() -> CheckpointKey {
    CheckpointKey::new(&CheckpointSecret::generate())
}

fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[offset] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

/// Plaintext sizes: below one chunk, exactly one, exactly several, several
/// plus a remainder, and (default chunk) a shard larger than one chunk.
#[test]
fn round_trip_at_several_sizes() {
    let dir = scratch("ck-sizes");
    let key = key();
    let job = JobId::generate();
    // Plaintext = 32 header bytes + 4 bytes per value per array.
    for (len, slots, chunk) in [
        (0, 0, 64),
        (3, 0, 64),    // 44 bytes: under one chunk
        (8, 0, 64),    // 64 bytes: exactly one chunk
        (24, 0, 64),   // 128 bytes: exactly two
        (1000, 2, 64), // many chunks and a remainder
        (1000, 1, 4096),
        (300_000, 2, ck::DEFAULT_CHUNK), // 3.6 MB: several 1 MiB chunks
    ] {
        let s = state(len, slots);
        let path = dir.join(format!("{len}-{slots}-{chunk}.wck"));
        let rec = ck::write_shard(&path, &key, &at(&job, 5, 1), &s, chunk).unwrap();
        assert_eq!(rec.bytes, std::fs::metadata(&path).unwrap().len());
        let shape = Shape { len: Some(len), slots: Some(slots) };
        let (back, sha) = ck::read_shard(&path, &key, Some(&at(&job, 5, 1)), shape).unwrap();
        assert_eq!(back, s, "len {len} slots {slots} chunk {chunk}");
        assert_eq!(sha, rec.sha256);
    }
}

#[test]
fn no_plaintext_parameter_bytes_reach_the_file() {
    let dir = scratch("ck-plain");
    // A weight pattern that cannot occur by chance: 64 distinctive floats.
    let pattern: Vec<f32> = (0..64).map(|i| 1234.5678 + i as f32).collect();
    let mut s = state(10_000, 1);
    s.params[5000..5064].copy_from_slice(&pattern);
    let path = dir.join("s.wck");
    ck::write_shard(&path, &key(), &at(&JobId::generate(), 1, 0), &s, 4096).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let needle: Vec<u8> = pattern[..4].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(!bytes.windows(needle.len()).any(|w| w == needle), "plaintext weights found in the checkpoint");
    // Even a single weight's bytes are absent (16 bytes of them would be 2^-128 by chance; 4 are 2^-32 per offset).
    let one = 1234.5678f32.to_le_bytes();
    assert!(bytes.windows(4).filter(|w| *w == one).count() <= 1);
}

#[test]
fn every_kind_of_tampering_is_detected_with_its_own_error() {
    let dir = scratch("ck-tamper");
    let key = key();
    let job = JobId::generate();
    let chunk = 64u32;
    let s = state(100, 1); // 832 bytes: 13 chunks of 64
    let fresh = |name: &str, step: u64, shard: u32| {
        let p = dir.join(name);
        ck::write_shard(&p, &key, &at(&job, step, shard), &s, chunk).unwrap();
        p
    };
    let read =
        |p: &Path, step: u64, shard: u32| ck::read_shard(p, &key, Some(&at(&job, step, shard)), Shape::default());
    let header = ck::HEADER_LEN + 8 + ck::HEADER_MAC_LEN;
    let sealed = chunk as usize + ck::TAG_LEN;

    // A flipped bit in the header (the step field).
    let p = fresh("h.wck", 5, 0);
    flip(&p, 33);
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::HeaderTampered { .. })), "{:?}", read(&p, 5, 0));
    // ... in the body, and in a tag.
    let p = fresh("b.wck", 5, 0);
    flip(&p, header + sealed + 3);
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::ChunkTampered { chunk: 1, .. })));
    let p = fresh("t.wck", 5, 0);
    flip(&p, header + 2 * sealed - 1);
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::ChunkTampered { chunk: 1, .. })));
    // Reordered chunks.
    let p = fresh("r.wck", 5, 0);
    let mut b = std::fs::read(&p).unwrap();
    let (c0, c1) = (b[header..header + sealed].to_vec(), b[header + sealed..header + 2 * sealed].to_vec());
    b[header..header + sealed].copy_from_slice(&c1);
    b[header + sealed..header + 2 * sealed].copy_from_slice(&c0);
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::ChunkTampered { chunk: 0, .. })));
    // Truncated mid-chunk, at a chunk boundary, and to almost nothing.
    for cut in [10, b.len() - header - 12 * sealed, b.len() - 20] {
        let p = fresh("tr.wck", 5, 0);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - cut]).unwrap();
        assert!(matches!(read(&p, 5, 0), Err(CheckpointError::Truncated { .. })), "cut {cut}: {:?}", read(&p, 5, 0));
    }
    // Extended.
    let p = fresh("x.wck", 5, 0);
    let mut b = std::fs::read(&p).unwrap();
    let again = b[header..header + sealed].to_vec();
    b.extend_from_slice(&again);
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::Extended { .. })));
    // Swapped between shards, between steps, between jobs.
    let p = fresh("s1.wck", 5, 1);
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::Misplaced { what: "shard", .. })));
    let p = fresh("s6.wck", 6, 0);
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::Misplaced { what: "step", .. })));
    let other = JobId::generate();
    let p = dir.join("j.wck");
    ck::write_shard(&p, &key, &at(&other, 5, 0), &s, chunk).unwrap();
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::Misplaced { what: "job", .. })));
    // The wrong key says so, rather than "corrupt".
    let p = fresh("k.wck", 5, 0);
    let e = ck::read_shard(&p, &self::key(), Some(&at(&job, 5, 0)), Shape::default()).unwrap_err();
    assert!(matches!(e, CheckpointError::WrongKey { .. }) && e.to_string().contains("wrong key"), "{e}");
    // Not a checkpoint at all.
    let p = dir.join("garbage.wck");
    std::fs::write(&p, vec![0x41u8; 500]).unwrap();
    assert!(matches!(read(&p, 5, 0), Err(CheckpointError::NotCheckpoint { .. })));
    // Authentic, but for another model or optimizer.
    let p = fresh("shape.wck", 5, 0);
    let e = ck::read_shard(&p, &key, Some(&at(&job, 5, 0)), Shape { len: Some(99), slots: None }).unwrap_err();
    assert!(e.to_string().contains("the model or the server count changed"), "{e}");
    let e = ck::read_shard(&p, &key, Some(&at(&job, 5, 0)), Shape { len: None, slots: Some(2) }).unwrap_err();
    assert!(e.to_string().contains("optimizer kind changed"), "{e}");

    // Every message names the file and never panics on any single-byte flip.
    let p = fresh("all.wck", 5, 0);
    let good = std::fs::read(&p).unwrap();
    for i in (0..good.len()).step_by(7) {
        let mut b = good.clone();
        b[i] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = read(&p, 5, 0).expect_err("a flipped bit must be detected");
        assert!(e.to_string().contains("all.wck"), "{e}");
    }
}

#[test]
fn manifests_are_authenticated_and_bind_the_files() {
    let base = scratch("ck-manifest");
    let series = base.join(JobId::generate().as_str());
    let key = key();
    let job = JobId::generate();
    let dir = ck::step_dir(&series, 10);
    std::fs::create_dir_all(&dir).unwrap();
    let s = state(50, 0);
    let files: Vec<_> = (0..2)
        .map(|shard| ck::write_shard(&dir.join(ck::shard_file(shard)), &key, &at(&job, 10, shard), &s, 64).unwrap())
        .collect();
    let m = Manifest {
        format: ck::MANIFEST_FORMAT,
        job_id: job.clone(),
        step: 10,
        shards: 2,
        key_id: key.id_hex(),
        files: files.clone(),
    };
    ck::write_manifest(&dir, &key, &m).unwrap();
    let shape = Shape { len: Some(50), slots: Some(0) };
    assert_eq!(ck::load_step(&series, &key, &at(&job, 10, 1), shape).unwrap(), s);

    // A format 1 manifest (an earlier warden's) names each file's SHA-256,
    // as sha256sum prints it, and is still checked against it.
    let sha256sum = |p: &Path| {
        let out = std::process::Command::new("sha256sum").arg(p).output().unwrap();
        String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
    };
    let whole: Vec<_> =
        files.iter().map(|r| ck::ShardRecord { sha256: sha256sum(&dir.join(&r.file)), ..r.clone() }).collect();
    let old = Manifest { format: 1, files: whole, ..m.clone() };
    ck::write_manifest(&dir, &key, &old).unwrap();
    assert_eq!(ck::load_step(&series, &key, &at(&job, 10, 1), shape).unwrap(), s);
    let old = Manifest { format: 1, ..m.clone() };
    ck::write_manifest(&dir, &key, &old).unwrap();
    assert!(
        matches!(ck::load_step(&series, &key, &at(&job, 10, 1), shape), Err(CheckpointError::Digest { .. })),
        "a format 1 manifest is not satisfied by the head-and-tags digest"
    );
    ck::write_manifest(&dir, &key, &m).unwrap();

    // A file replaced by another authentic one for the same place (an older
    // write, say) no longer matches the manifest's digest.
    let mut s2 = s.clone();
    s2.params[0] = 99.0;
    ck::write_shard(&dir.join(ck::shard_file(1)), &key, &at(&job, 10, 1), &s2, 64).unwrap();
    assert!(matches!(ck::load_step(&series, &key, &at(&job, 10, 1), shape), Err(CheckpointError::Digest { .. })));

    // An edited manifest fails its MAC; another key is named as such.
    let path = dir.join(ck::MANIFEST);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"bytes\": ", "\"bytes\": 1", 1)).unwrap();
    let e = ck::load_step(&series, &key, &at(&job, 10, 0), shape).unwrap_err();
    assert!(e.to_string().contains("fails authentication"), "{e}");
    std::fs::write(&path, &text).unwrap();
    let e = ck::load_step(&series, &self::key(), &at(&job, 10, 0), shape).unwrap_err();
    assert!(e.to_string().contains("wrong key"), "{e}");
    // No manifest: the step never completed.
    std::fs::remove_file(&path).unwrap();
    let e = ck::load_step(&series, &key, &at(&job, 10, 0), shape).unwrap_err();
    assert!(e.to_string().contains("never completed"), "{e}");
}

#[test]
fn key_files_must_be_private_and_well_formed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("ck-keyfile");
    let path = dir.join("job.key");
    let secret = CheckpointSecret::generate();
    secret.write_new(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(secret.write_new(&path).is_err(), "a key file is never overwritten");
    let loaded = CheckpointSecret::load(&path).unwrap();
    assert_eq!(CheckpointKey::new(&loaded).id_hex(), CheckpointKey::new(&secret).id_hex());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = CheckpointSecret::load(&path).unwrap_err().to_string();
    assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
    let bad = dir.join("bad.key");
    std::fs::write(&bad, "not hex\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(CheckpointSecret::load(&bad).unwrap_err().to_string().contains("64 hexadecimal digits"));
    // The CLI makes the same kind of file.
    let made = dir.join("cli.key");
    let out = Command::new(bin("warden")).args(["checkpoint", "keygen"]).arg(&made).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(CheckpointSecret::load(&made).is_ok());
    let again = Command::new(bin("warden")).args(["checkpoint", "keygen"]).arg(&made).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
}

// ---- End to end, through `warden launch --local`. ----

fn launch(tag: &str, job: &Path, run: &Path, extra: &[&std::ffi::OsStr]) -> Output {
    Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--no-progress".as_ref()])
        .args(["--run-dir".as_ref(), run.as_os_str()])
        .args(extra)
        .env("WARDEN_TEST_TAG", tag)
        .output()
        .unwrap()
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

fn steps_in(root: &Path) -> Vec<(u64, bool)> {
    let series: Vec<PathBuf> = std::fs::read_dir(root).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(series.len(), 1, "one series expected in {}", root.display());
    ck::list_steps(&series[0]).unwrap().into_iter().map(|(s, p)| (s, ck::is_complete(&p))).collect()
}

/// The tensors of a safetensors file, as raw f32 values in file order.
fn weights(run: &Path) -> Vec<f32> {
    let b = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    b[8 + n..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn checkpoint_job(dir: &Path, ports: (u16, u16), epochs: u32, after_job: u32, key: &Path) -> PathBuf {
    checkpoint_job_file(dir, ports, epochs, after_job, key).write(dir.join(format!("job-{epochs}-{after_job}.toml")))
}

/// A scratch directory holding a fresh checkpoint key file, `job.key`.
fn scratch_with_key(name: &str) -> (warden_tests::Scratch, PathBuf) {
    let dir = scratch(name);
    let key = dir.join("job.key");
    CheckpointSecret::generate().write_new(&key).unwrap();
    (dir, key)
}

fn checkpoint_job_file(dir: &Path, ports: (u16, u16), epochs: u32, after_job: u32, key: &Path) -> JobFile {
    JobFile::local()
        .ports(ports.0, ports.1)
        .epochs(epochs)
        .checkpoint(&dir.join("ckpt"), Some(key))
        .set("checkpoint", "every_steps", 20)
        .set("checkpoint", "keep_last", 2)
        .set("checkpoint", "keep_last_after_job", after_job)
        // Dropout and momentum make the state worth resuming exactly.
        .set("model", "kind", "mlp")
        .set("model", "hidden", [32])
        .set("model", "dropout", 0.2)
}

/// A stopped job with checkpoints prints the command that resumes it, and
/// that command, run as printed from the same directory, resumes from the
/// newest checkpoint the stopped run committed (at least the newest it
/// announced).
#[test]
fn a_stopped_job_prints_the_resume_command_and_it_resumes() {
    let tag = fresh_tag();
    let (dir, key) = scratch_with_key("ck-resume-line");
    let job = checkpoint_job_file(&dir, (32120, 32139), 100000, 2, &key);
    let (launcher, run) = warden_tests::start_long(&tag, &dir, job);
    let until = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_dir(dir.join("ckpt")).is_ok_and(|mut d| d.next().is_some())
        || !steps_in(&dir.join("ckpt")).iter().any(|(_, complete)| *complete)
    {
        assert!(Instant::now() < until, "no checkpoint was committed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sigint = |pid: u32| {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    };
    sigint(launcher.id());
    let out = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let newest = summary(&run)["checkpoints"].as_array().unwrap().last().expect("a committed checkpoint")["step"]
        .as_u64()
        .unwrap();
    let line = stderr.lines().find_map(|l| l.trim().strip_prefix("resume: ")).unwrap_or_else(|| panic!("{stderr}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[..2], ["warden", "launch"], "{line}");
    assert!(words.ends_with(&["--resume", &run.to_string_lossy()]), "{line}");

    let resumed = warden_tests::Launcher::start(&tag, &words[1..], &dir);
    let latest = dir.join("runs/latest");
    let until = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(latest.join("metrics.csv")).unwrap_or_default().lines().count() < 2 {
        assert!(Instant::now() < until, "the resumed run never finished an epoch");
        std::thread::sleep(Duration::from_millis(50));
    }
    sigint(resumed.id());
    let out = resumed.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    // The newest the stopped run announced, or a newer one its servers
    // committed while it stopped (announced too late to be listed).
    let from: u64 = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("resuming from checkpoint step "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(from >= newest, "resumed from step {from}, older than the announced {newest}: {stderr}");
    let again = summary(&latest);
    assert_eq!(again["resumed_from_step"], from, "{again}");
    assert_eq!(again["status"], "stopped", "{again}");
    wait_gone(&tag);
}

#[test]
fn a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one_and_retention_holds() {
    let tag = fresh_tag();
    let (base, key) = scratch_with_key("ck-resume");

    // Uninterrupted: 3 epochs; afterwards only keep_last_after_job = 1 step remains.
    let full_dir = base.join("full");
    std::fs::create_dir_all(&full_dir).unwrap();
    let full_job = checkpoint_job(&full_dir, (31000, 31010), 3, 1, &key);
    let full = full_dir.join("run");
    let out = launch(&tag, &full_job, &full, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let s = summary(&full);
    let total = s["steps"].as_u64().unwrap();
    let saved: Vec<u64> = s["checkpoints"].as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
    assert_eq!(saved, (1..=total / 20).map(|k| k * 20).collect::<Vec<_>>());
    assert_eq!(steps_in(&full_dir.join("ckpt")), vec![(*saved.last().unwrap(), true)]);

    // Interrupted after 2 epochs (keeping keep_last = 2 steps), then resumed to 3.
    let part_dir = base.join("part");
    std::fs::create_dir_all(&part_dir).unwrap();
    let part = part_dir.join("run");
    let out = launch(&tag, &checkpoint_job(&part_dir, (31000, 31010), 2, 2, &key), &part, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let kept = steps_in(&part_dir.join("ckpt"));
    let part_saved: Vec<u64> =
        summary(&part)["checkpoints"].as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
    let newest_two: Vec<(u64, bool)> = part_saved[part_saved.len() - 2..].iter().map(|s| (*s, true)).collect();
    assert_eq!(kept, newest_two, "keep_last = 2 keeps exactly the two newest steps");

    // `warden checkpoint list|verify` see the same.
    let list = Command::new(bin("warden")).args(["checkpoint", "list"]).arg(part_dir.join("ckpt")).output().unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success() && text.matches("complete, 2 shard(s)").count() == 2, "{text}");
    let verify = Command::new(bin("warden"))
        .args(["checkpoint", "verify"])
        .arg(part_dir.join("ckpt"))
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    let resumed = part_dir.join("resumed");
    let job3 = checkpoint_job(&part_dir, (31000, 31010), 3, 1, &key);
    let out = launch(&tag, &job3, &resumed, &["--resume".as_ref(), part.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let newest = part_saved.last().copied().unwrap();
    assert!(stderr.contains(&format!("resuming from checkpoint step {newest}")), "{stderr}");
    let r = summary(&resumed);
    assert_eq!(r["resumed_from_step"], newest);
    assert_eq!(r["seed"], summary(&part)["seed"]);

    let (a, b) = (weights(&full), weights(&resumed));
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "weight {i}: {x} uninterrupted, {y} resumed");
    }
    assert_eq!(r["test_accuracy"], summary(&full)["test_accuracy"]);

    // Resuming with another key finds nothing it can use, and says why.
    let other = part_dir.join("other.key");
    CheckpointSecret::generate().write_new(&other).unwrap();
    let wrong = checkpoint_job(&part_dir, (31000, 31010), 3, 1, &other);
    let out = launch(&tag, &wrong, &part_dir.join("wrong"), &["--resume".as_ref(), part.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("wrong key") && stderr.contains("nothing to resume from"), "{stderr}");

    // A key file others can read is refused before anything starts.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = launch(&tag, &wrong, &part_dir.join("perm"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    wait_gone(&tag);
}

/// The server writing a checkpoint is killed (SIGKILL, by its pid) in the
/// middle of the write; resuming picks the newest step that completed.
#[test]
fn a_checkpoint_cut_short_by_a_killed_server_is_never_resumed_from() {
    let tag = fresh_tag();
    let dir = scratch("ck-kill");
    let key = dir.join("job.key");
    CheckpointSecret::generate().write_new(&key).unwrap();
    let root = dir.join("ckpt");
    // A synthetic model big enough that a shard takes a while to write:
    // 2 servers x 15M floats x (params + momentum) = 120 MB per shard file.
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"
[job]
name = "ckpt-kill"
seed = 3
[cluster]
user = "warden"
ports = [31020, 31030]
[[cluster.hosts]]
address = "127.0.0.1"
scheduler = 1
servers = 2
workers = 1
[model]
kind = "synthetic"
params = 30000000
[optimizer]
kind = "momentum"
lr = 0.01
momentum = 0.9
[training]
epochs = 1
batch_size = 1
steps = 12
[checkpoint]
dir = "{}"
every_steps = 2
keep_last = 3
key_file = "{}"
"#,
            root.display(),
            key.display()
        ),
    )
    .unwrap();
    let run = dir.join("run");
    let child = warden_tests::spawn_launch(&tag, &job, &run);

    // Wait for one complete step, then catch a server inside a later write:
    // stop it, confirm its temporary file is still there, kill it.
    let until = Instant::now() + Duration::from_secs(120);
    let (killed_step, killed_pid) = 'caught: loop {
        assert!(Instant::now() < until, "never caught a server writing a checkpoint");
        let Ok(mut series) = std::fs::read_dir(&root) else { continue };
        let Some(Ok(series)) = series.next() else { continue };
        let steps = ck::list_steps(&series.path()).unwrap_or_default();
        let Some(done) = steps.iter().filter(|(_, p)| ck::is_complete(p)).map(|(s, _)| *s).max() else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        for (step, path) in steps.iter().filter(|(s, p)| *s > done && !ck::is_complete(p)) {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.rsplit_once(".tmp-").and_then(|(_, pid)| pid.parse::<i32>().ok()) else {
                    continue;
                };
                let pid = nix::unistd::Pid::from_raw(pid);
                if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).is_err() {
                    continue;
                }
                if entry.path().exists() && !ck::is_complete(path) {
                    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
                    break 'caught (*step, pid);
                }
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let (status, stderr) = warden_tests::wait_for(child, &run, 120);
    assert_eq!(status.code(), Some(1), "the job must fail when a server dies: {stderr}");
    assert!(stderr.contains("server"), "{stderr}");
    let series = std::fs::read_dir(&root).unwrap().next().unwrap().unwrap().path();
    let killed_dir = ck::step_dir(&series, killed_step);
    assert!(!ck::is_complete(&killed_dir), "step {killed_step} must never get a manifest");
    let complete: Vec<u64> =
        ck::list_steps(&series).unwrap().into_iter().filter(|(_, p)| ck::is_complete(p)).map(|(s, _)| s).collect();
    let newest_complete = *complete.last().unwrap();
    assert!(newest_complete < killed_step);
    let _ = killed_pid;

    let resumed = dir.join("resumed");
    let out = launch(&tag, &job, &resumed, &["--resume".as_ref(), run.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(summary(&resumed)["resumed_from_step"], newest_complete, "{stderr}");
    assert!(
        stderr.contains(&format!("skipping checkpoint step {killed_step}")) && stderr.contains("never completed"),
        "the half-written step is skipped with a warning: {stderr}"
    );
    wait_gone(&tag);
}
