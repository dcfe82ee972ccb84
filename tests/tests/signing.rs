//! Signed models: the OpenSSF model-signing format, a strict
//! verifier with a distinct error per failure, interoperability both ways
//! with the real `model-signing` package, and the wiring into `launch`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use warden_agent::store::signing::{self, SignError};
use warden_tests::{bin, fresh_tag, job_in, repo_root, scratch, wait_gone};

/// A small model directory: two files at the top, one in a subdirectory.
fn model_dir(root: &Path) -> PathBuf {
    let m = root.join("model");
    std::fs::create_dir_all(m.join("sub")).unwrap();
    std::fs::write(m.join("model.safetensors"), vec![7u8; 4000]).unwrap();
    std::fs::write(m.join("config.json"), b"{\"classes\": 10}").unwrap();
    std::fs::write(m.join("sub/tokenizer.txt"), b"a b c").unwrap();
    m
}

fn keys(root: &Path) -> (PathBuf, PathBuf) {
    signing::write_key_pair(&root.join("keys"), None).unwrap()
}

fn verify(model: &Path, public: &Path) -> Result<signing::Verified, SignError> {
    signing::verify_model(model, &signing::load_public_key(public).unwrap(), None)
}

#[test]
fn sign_then_verify_round_trips_and_every_tampering_is_refused_with_its_own_error() {
    let root = scratch("sign-tamper");
    let (private, public) = keys(&root);
    let key = signing::load_private_key(&private, None).unwrap();
    let fresh = |name: &str| {
        let dir = root.join(name);
        let m = model_dir(&dir);
        signing::sign_model(&m, &key, None).unwrap();
        m
    };

    let m = fresh("ok");
    let v = verify(&m, &public).unwrap();
    assert_eq!(v.files, vec!["config.json", "model.safetensors", "sub/tokenizer.txt"]);

    // A flipped byte in any file.
    for f in ["model.safetensors", "config.json", "sub/tokenizer.txt"] {
        let m = fresh(&format!("flip-{}", f.replace('/', "-")));
        let mut b = std::fs::read(m.join(f)).unwrap();
        b[1] ^= 1;
        std::fs::write(m.join(f), b).unwrap();
        assert!(matches!(verify(&m, &public), Err(SignError::Modified(ref v)) if v == &[f.to_string()]), "{f}");
    }
    // An extra file, a missing file, a renamed file.
    let m = fresh("extra");
    std::fs::write(m.join("sub/extra.bin"), b"x").unwrap();
    assert!(matches!(verify(&m, &public), Err(SignError::Extra(ref v)) if v == &["sub/extra.bin".to_string()]));
    let m = fresh("missing");
    std::fs::remove_file(m.join("config.json")).unwrap();
    assert!(matches!(verify(&m, &public), Err(SignError::Missing(ref v)) if v == &["config.json".to_string()]));
    let m = fresh("renamed");
    std::fs::rename(m.join("config.json"), m.join("config2.json")).unwrap();
    let e = verify(&m, &public).unwrap_err();
    assert!(matches!(e, SignError::Renamed { .. }) && e.to_string().contains("config2.json"), "{e}");
    // A symlink, even to a signed file.
    let m = fresh("symlink");
    std::os::unix::fs::symlink(m.join("config.json"), m.join("link.json")).unwrap();
    assert!(matches!(verify(&m, &public), Err(SignError::Symlink(_))));
    // The wrong key.
    let (_, other_public) = signing::write_key_pair(&root.join("other"), None).unwrap();
    let m = fresh("wrong-key");
    assert!(matches!(verify(&m, &other_public), Err(SignError::WrongKey { .. })));

    // Edits to the bundle itself.
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let m = fresh(name);
        let path = m.join("model.sig");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        verify(&m, &public)
    };
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    // A modified statement (one digest changed, signature left as it was).
    let e = edit("statement", &|v| {
        let p = v["dsseEnvelope"]["payload"].as_str().unwrap();
        let text = String::from_utf8(b64.decode(p).unwrap()).unwrap();
        let changed = text.replacen("\"sha256\"", "\"sha256\" ", 1);
        v["dsseEnvelope"]["payload"] = b64.encode(changed).into();
    });
    assert!(matches!(e, Err(SignError::BadSignature)), "{e:?}");
    // A second signature.
    let e = edit("two-sigs", &|v| {
        let s = v["dsseEnvelope"]["signatures"][0].clone();
        v["dsseEnvelope"]["signatures"].as_array_mut().unwrap().push(s);
    });
    assert!(matches!(e, Err(SignError::SignatureCount(2))), "{e:?}");
    // An unknown field, a transparency-log entry, another media type.
    let e = edit("unknown", &|v| v["dsseEnvelope"]["extra"] = 1.into());
    assert!(matches!(e, Err(SignError::Malformed { ref detail, .. }) if detail.contains("unknown field")), "{e:?}");
    let e = edit("tlog", &|v| v["verificationMaterial"]["tlogEntries"] = serde_json::json!([{}]));
    assert!(matches!(e, Err(SignError::Malformed { ref detail, .. }) if detail.contains("transparency")), "{e:?}");
    let e = edit("media", &|v| v["mediaType"] = "application/json".into());
    assert!(matches!(e, Err(SignError::Malformed { ref detail, .. }) if detail.contains("media type")), "{e:?}");
    // Garbage instead of a signature.
    let m = fresh("garbage");
    std::fs::write(m.join("model.sig"), b"\x00\x01not json").unwrap();
    assert!(matches!(verify(&m, &public), Err(SignError::Malformed { .. })));
}

/// Signed statements that are authentic but not acceptable: made here with
/// the key, so only the strict checks can refuse them.
#[test]
fn authentic_but_unacceptable_statements_are_refused() {
    use base64::Engine;
    use p256::ecdsa::signature::Signer;
    let root = scratch("sign-strict");
    let (private, public) = keys(&root);
    let key = signing::load_private_key(&private, None).unwrap();
    let m = model_dir(&root.join("m"));
    signing::sign_model(&m, &key, None).unwrap();
    let sig_path = m.join("model.sig");
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(&sig_path).unwrap()).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let statement: serde_json::Value =
        serde_json::from_slice(&b64.decode(original["dsseEnvelope"]["payload"].as_str().unwrap()).unwrap()).unwrap();
    let resign = |st: &serde_json::Value| {
        let payload = serde_json::to_vec(st).unwrap();
        let mut pae = format!("DSSEv1 28 application/vnd.in-toto+json {} ", payload.len()).into_bytes();
        pae.extend_from_slice(&payload);
        let sig: p256::ecdsa::DerSignature = key.sign(&pae);
        let mut b = original.clone();
        b["dsseEnvelope"]["payload"] = b64.encode(&payload).into();
        b["dsseEnvelope"]["signatures"][0]["sig"] = b64.encode(sig.as_bytes()).into();
        std::fs::write(&sig_path, serde_json::to_vec(&b).unwrap()).unwrap();
        verify(&m, &public)
    };
    assert!(resign(&statement).is_ok(), "re-signing the same statement must verify");
    let mut two = statement.clone();
    let s = two["subject"][0].clone();
    two["subject"].as_array_mut().unwrap().push(s);
    assert!(matches!(resign(&two), Err(SignError::SubjectCount(2))));
    let mut pred = statement.clone();
    pred["predicateType"] = "https://model_signing/Digests/v0.1".into();
    assert!(matches!(resign(&pred), Err(SignError::Statement(ref d)) if d.contains("predicate type")));
    let mut root_digest = statement.clone();
    root_digest["subject"][0]["digest"]["sha256"] = "00".repeat(32).into();
    assert!(matches!(resign(&root_digest), Err(SignError::Inconsistent)));
    let mut unknown = statement.clone();
    unknown["predicate"]["extra"] = true.into();
    assert!(matches!(resign(&unknown), Err(SignError::Statement(ref d)) if d.contains("unknown field")));
    let mut links = statement;
    links["predicate"]["serialization"]["allow_symlinks"] = true.into();
    assert!(matches!(resign(&links), Err(SignError::Statement(ref d)) if d.contains("allow_symlinks")));
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_reads_and_passphrases_protect_it() {
    use std::os::unix::fs::PermissionsExt;
    let root = scratch("sign-keygen");
    let out = Command::new(bin("warden"))
        .args(["keygen", "--out"])
        .arg(root.join("k"))
        .args(["--passphrase-env", "TEST_PASS"])
        .env("TEST_PASS", "correct horse")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let private = root.join("k/private.pem");
    assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&private).unwrap();
    assert!(text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"), "{text}");
    assert!(std::fs::read_to_string(root.join("k/public.pem")).unwrap().starts_with("-----BEGIN PUBLIC KEY-----"));
    assert!(signing::load_private_key(&private, Some("correct horse")).is_ok());
    let e = signing::load_private_key(&private, Some("wrong")).unwrap_err();
    assert!(e.to_string().contains("wrong passphrase"), "{e}");
    let e = signing::load_private_key(&private, None).unwrap_err();
    assert!(e.to_string().contains("passphrase-protected"), "{e}");
    // Never overwritten.
    let again = Command::new(bin("warden")).args(["keygen", "--out"]).arg(root.join("k")).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    // sign and verify through the CLI, exit codes included.
    let m = model_dir(&root.join("m"));
    let sign = Command::new(bin("warden"))
        .arg("sign")
        .arg(&m)
        .arg("--key")
        .arg(&private)
        .args(["--passphrase-env", "TEST_PASS"])
        .env("TEST_PASS", "correct horse")
        .output()
        .unwrap();
    assert!(sign.status.success(), "{}", String::from_utf8_lossy(&sign.stderr));
    let verify = |m: &Path| {
        Command::new(bin("warden"))
            .arg("verify")
            .arg(m)
            .arg("--pubkey")
            .arg(root.join("k/public.pem"))
            .output()
            .unwrap()
    };
    assert!(verify(&m).status.success());
    std::fs::write(m.join("config.json"), b"{}").unwrap();
    let bad = verify(&m);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("modified since signing: config.json"));
}

// ---- Interoperability with the real `model-signing` package ----

/// The `model_signing` CLI that scripts/test-all installs (PyPI model-signing 1.1.1).
fn model_signing() -> Option<PathBuf> {
    let path = std::env::var_os("WARDEN_MODEL_SIGNING")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/model-signing-venv/bin/model_signing"));
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("WARDEN_SKIP_INTEROP").is_some() {
        eprintln!("WARDEN_SKIP_INTEROP is set: skipping the model-signing interoperability test");
        return None;
    }
    panic!(
        "{} is missing: run ./scripts/test-all (it installs model-signing 1.1.1 into a venv), \
         or set WARDEN_MODEL_SIGNING to a model_signing executable; WARDEN_SKIP_INTEROP=1 skips this test",
        path.display()
    );
}

fn py(tool: &Path, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(tool).args(args).output().unwrap()
}

#[test]
fn signatures_interoperate_both_ways_with_the_model_signing_package() {
    let Some(tool) = model_signing() else { return };
    let root = scratch("sign-interop");
    let (private, public) = keys(&root);

    // warden signs, model_signing verifies (and refuses a tampered copy).
    let ours = model_dir(&root.join("ours"));
    let out = Command::new(bin("warden")).arg("sign").arg(&ours).arg("--key").arg(&private).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sig = ours.join("model.sig");
    let check = |m: &Path| {
        py(
            &tool,
            &[
                "verify".as_ref(),
                "key".as_ref(),
                m.as_os_str(),
                "--signature".as_ref(),
                m.join("model.sig").as_os_str(),
                "--public_key".as_ref(),
                public.as_os_str(),
            ],
        )
    };
    let ok = check(&ours);
    assert!(ok.status.success(), "model_signing refused warden's signature: {}", String::from_utf8_lossy(&ok.stdout));
    let _ = sig;
    std::fs::write(ours.join("sub/tokenizer.txt"), b"a b d").unwrap();
    assert!(!check(&ours).status.success(), "model_signing accepted a tampered model signed by warden");

    // model_signing signs, warden verifies (and refuses a tampered copy).
    let theirs = model_dir(&root.join("theirs"));
    let out = py(
        &tool,
        &[
            "sign".as_ref(),
            "key".as_ref(),
            theirs.as_os_str(),
            "--private_key".as_ref(),
            private.as_os_str(),
            "--signature".as_ref(),
            theirs.join("model.sig").as_os_str(),
        ],
    );
    assert!(out.status.success(), "model_signing sign failed: {}", String::from_utf8_lossy(&out.stderr));
    let v = verify(&theirs, &public).unwrap_or_else(|e| panic!("warden refused model_signing's signature: {e}"));
    assert_eq!(v.files.len(), 3);
    std::fs::write(theirs.join("model.safetensors"), vec![8u8; 4000]).unwrap();
    assert!(matches!(verify(&theirs, &public), Err(SignError::Modified(_))));
    // And a key made by warden, passphrase-protected, is one cryptography can read.
    let (enc_private, _) = signing::write_key_pair(&root.join("enc"), Some("pw")).unwrap();
    let python = tool.parent().unwrap().join("python");
    let load = Command::new(python)
        .args([
            "-c",
            "import sys; from cryptography.hazmat.primitives import serialization as s; \
             k = s.load_pem_private_key(open(sys.argv[1], 'rb').read(), b'pw'); print(k.curve.name)",
        ])
        .arg(&enc_private)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&load.stdout).trim(), "secp256r1", "{}", String::from_utf8_lossy(&load.stderr));
}

// ---- Wiring into launch ----

#[test]
fn launch_signs_the_final_model_and_starts_only_from_verified_weights() {
    let tag = fresh_tag();
    let dir = scratch("sign-launch");
    let (private, public) = keys(&dir);
    let job = job_in(&dir, (31040, 31050), &[("epochs = 5", "epochs = 1")]);
    let mut text = std::fs::read_to_string(&job).unwrap();
    text.push_str(&format!("\n[signing]\nkey = \"{}\"\n", private.display()));
    std::fs::write(&job, &text).unwrap();
    let launch = |job: &Path, run: &Path| {
        Command::new(bin("warden"))
            .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--no-progress".as_ref()])
            .args(["--run-dir".as_ref(), run.as_os_str()])
            .env("WARDEN_TEST_TAG", &tag)
            .output()
            .unwrap()
    };
    let first = dir.join("first");
    let out = launch(&job, &first);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("signed:"), "{stderr}");
    verify(&first.join("model"), &public).unwrap();

    // A second job starts from the first one's signed weights.
    let with_init = |trusted: &Path, name: &str| {
        let t = text.replacen(
            "classes = 10",
            &format!(
                "classes = 10\ninit = \"{}\"\ntrusted_keys = [\"{}\"]",
                first.join("model").display(),
                trusted.display()
            ),
            1,
        );
        let p = dir.join(name);
        std::fs::write(&p, t).unwrap();
        p
    };
    let second = dir.join("second");
    let out = launch(&with_init(&public, "init.toml"), &second);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // Starting from trained weights, the first epoch's loss is far below a fresh start's.
    let loss = |run: &Path| -> f64 {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
        s["train_loss"].as_f64().unwrap()
    };
    assert!(
        loss(&second) < 0.85 * loss(&first),
        "train loss {} from scratch, {} from init",
        loss(&first),
        loss(&second)
    );

    // Untrusted key or tampered weights: the job does not start training.
    let (_, stranger) = signing::write_key_pair(&dir.join("stranger"), None).unwrap();
    let out = launch(&with_init(&stranger, "untrusted.toml"), &dir.join("untrusted"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no trusted key verifies them") && stderr.contains("another key"), "{stderr}");
    let mut b = std::fs::read(first.join("model/model.safetensors")).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0x40;
    std::fs::write(first.join("model/model.safetensors"), b).unwrap();
    let out = launch(&with_init(&public, "tampered.toml"), &dir.join("tampered"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("modified since signing: model.safetensors"), "{stderr}");
    wait_gone(&tag);
}

/// A signed model of a small MLP in `root/model` with the weights of `seed`;
/// returns the model directory, its shape, the signed weights and the
/// public key's path.
fn signed_mlp(root: &Path) -> (PathBuf, warden_agent::job::spec::ModelSpec, Vec<f32>, PathBuf) {
    let (private, public) = keys(root);
    let spec = warden_agent::job::spec::ModelSpec::mlp(6, vec![4], 3);
    let weights = warden_agent::train::model::init(&spec, 1);
    let dir = root.join("model");
    warden_agent::store::artifact::write_model(&dir, &spec, &weights, 1).unwrap();
    signing::sign_model(&dir, &signing::load_private_key(&private, None).unwrap(), None).unwrap();
    (dir, spec, weights, public)
}

#[test]
fn the_bytes_that_verified_are_the_bytes_that_load_after_the_file_is_replaced() {
    use warden_agent::store::artifact::{self, MODEL_FILE};
    let root = scratch("sign-swap");
    let (dir, spec, signed, public) = signed_mlp(&root);
    let key = signing::load_public_key(&public).unwrap();
    let v = signing::verify_model_file(&dir, &key, None, MODEL_FILE, 1 << 20).unwrap();
    // Replaced after the check with other, well-formed weights.
    let other = warden_agent::train::model::init(&spec, 2);
    artifact::write_model(&dir, &spec, &other, 2).unwrap();
    assert!(matches!(verify(&dir, &public), Err(SignError::Modified(_))), "the file on disk did change");
    assert_eq!(artifact::read_model(&dir, &spec).unwrap(), other);
    // What loads from the verification is what was verified.
    assert_eq!(artifact::spec_of(v.bytes()).unwrap().hidden, spec.hidden);
    assert_eq!(artifact::params_of(v.bytes(), &spec).unwrap(), signed);
    // The read is bounded, whatever the file's size.
    let small = signing::verify_model_file(&dir, &key, None, MODEL_FILE, 100);
    assert!(matches!(small, Err(SignError::TooLarge { max: 100, .. })), "{small:?}");
}

#[test]
fn initial_weights_swapped_while_they_load_never_load_unverified() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let root = scratch("sign-race");
    let (dir, spec, signed, public) = signed_mlp(&root);
    let target = dir.join(warden_agent::store::artifact::MODEL_FILE);
    let (a, b) = (root.join("a.safetensors"), root.join("b.safetensors"));
    std::fs::copy(&target, &a).unwrap();
    warden_agent::store::artifact::write_model(
        &root.join("other"),
        &spec,
        &warden_agent::train::model::init(&spec, 2),
        2,
    )
    .unwrap();
    std::fs::rename(root.join("other").join(warden_agent::store::artifact::MODEL_FILE), &b).unwrap();
    // The file flips between the signed and other weights, each time
    // replaced whole (a rename), for as long as the loads go on.
    let stop = AtomicBool::new(false);
    // Stops the swapping also when an assertion below fails (the scope
    // waits for the swapping thread before the failure surfaces).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let (loaded, refused) = std::thread::scope(|s| {
        let _stop = Stop(&stop);
        s.spawn(|| {
            let next = root.join("next");
            while !stop.load(Ordering::Relaxed) {
                for from in [&a, &b] {
                    std::fs::hard_link(from, &next).unwrap();
                    std::fs::rename(&next, &target).unwrap();
                }
            }
        });
        let (mut loaded, mut refused) = (0, 0);
        while loaded < 50 && loaded + refused < 50_000 {
            match warden_agent::store::artifact::load_verified(&dir, std::slice::from_ref(&public), &spec) {
                Ok(weights) => {
                    assert!(weights == signed, "weights that never verified were loaded after {loaded} good loads");
                    loaded += 1;
                }
                Err(_) => refused += 1,
            }
        }
        (loaded, refused)
    });
    assert!(loaded > 0, "no load succeeded in {refused} tries; the test proves nothing");
}
