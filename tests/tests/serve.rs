//! `warden serve`: a signed model behind API keys, rounded or
//! label-only answers, budgets and rate limits that survive restarts, size
//! limits, connection caps, metrics for named keys only, a private state
//! file; and the equation-solving extraction attack of Tramer et al. run
//! for real against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warden_tests::{bin, fresh_tag, job_in, repo_root, scratch, wait_gone};

/// A trained softmax model, signed by `launch` itself; returns (model dir, public key).
fn trained_signed_model(dir: &Path, ports: (u16, u16)) -> (PathBuf, PathBuf) {
    trained_signed(dir, ports, &[])
}

/// [`trained_signed_model`] with more replacements in the job file's text.
fn trained_signed(dir: &Path, ports: (u16, u16), replace: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let (private, public) = warden_agent::store::signing::write_key_pair(&dir.join("keys"), None).unwrap();
    let all: Vec<(&str, &str)> = [("epochs = 5", "epochs = 2")].into_iter().chain(replace.iter().copied()).collect();
    let job = job_in(dir, ports, &all);
    let mut text = std::fs::read_to_string(&job).unwrap();
    text.push_str(&format!("\n[signing]\nkey = \"{}\"\n", private.display()));
    std::fs::write(&job, text).unwrap();
    let run = dir.join("run");
    let tag = fresh_tag();
    let out = Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--no-progress".as_ref()])
        .args(["--run-dir".as_ref(), run.as_os_str()])
        .env("WARDEN_TEST_TAG", &tag)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_gone(&tag);
    (run.join("model"), public)
}

/// Writes keys.toml with one key per (id, extra settings); returns the keys.
fn api_keys(dir: &Path, keys: &[(&str, &str)]) -> Vec<String> {
    let mut file = String::new();
    let mut out = Vec::new();
    for (id, extra) in keys {
        let o = Command::new(bin("warden")).args(["apikey", "--id", id]).output().unwrap();
        assert!(o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        out.push(err.trim().rsplit(' ').next().unwrap().to_string());
        file.push_str(&String::from_utf8_lossy(&o.stdout));
        file.push_str(extra);
        file.push('\n');
    }
    std::fs::write(dir.join("keys.toml"), file).unwrap();
    out
}

struct Served {
    child: Child,
    port: u16,
    /// What it printed while starting.
    said: String,
}

impl Served {
    fn start(model: &Path, public: &Path, config: &Path, port: u16) -> Served {
        let mut child = Command::new(bin("warden"))
            .arg("serve")
            .arg(model)
            .arg("--pubkey")
            .arg(public)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--config")
            .arg(config)
            // Without a state file, serve writes its certificate in the
            // working directory: the test's own, not the source tree.
            .current_dir(config.parent().unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let until = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > until {
                panic!("warden serve did not come up: {seen}");
            }
            seen.push_str(&line);
            if line.contains("/v1/predict") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Served { child, port, said: seen }
    }

    /// POSTs `body`; returns (status, lower-cased headers, body).
    fn post(&self, key: Option<&str>, body: &str) -> (u16, String, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "-i", "-X", "POST", "--data-binary", "@-"]);
        cmd.args(["-H", "Content-Type: application/json"]);
        if let Some(k) = key {
            cmd.args(["-H", &format!("Authorization: Bearer {k}")]);
        }
        cmd.arg(format!("https://127.0.0.1:{}/v1/predict", self.port));
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("curl is installed");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(body.as_bytes());
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
        let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, head.to_lowercase(), body.to_string())
    }

    /// GETs /metrics; returns (status, body).
    fn metrics(&self, key: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "-o", "-", "-w", "\n%{http_code}"]);
        if let Some(k) = key {
            cmd.args(["-H", &format!("Authorization: Bearer {k}")]);
        }
        let out = cmd.arg(format!("https://127.0.0.1:{}/metrics", self.port)).output().expect("curl is installed");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// POSTs one input with `key` until it is answered (a connection the
    /// server closes at once is tried again), for at most a minute.
    fn served_eventually(&self, key: &str) {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, _, body) = self.post(Some(key), &input(0.1));
            match code {
                200 => return,
                0 if Instant::now() < until => continue,
                _ => panic!("an honest client was not served: {code} {body}"),
            }
        }
    }

    /// Sockets the server process holds open: its listener and connections.
    fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|fds| {
                fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .filter(|link| link.to_string_lossy().starts_with("socket:"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Stops with SIGTERM (the state is saved) and waits.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(self.child.wait().unwrap().success(), "warden serve must stop cleanly on SIGTERM");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn input(v: f32) -> String {
    format!("{{\"input\": [{}]}}", vec![format!("{v}"); 784].join(","))
}

/// The model's own probabilities for `x`, to compare answers against.
fn probabilities(model: &Path, x: &[f32]) -> Vec<f32> {
    let spec = warden_agent::store::artifact::model_spec_of(model).unwrap();
    let params = warden_agent::store::artifact::read_model(model, &spec).unwrap();
    let served = warden_agent::train::model::Predictor::new(spec, params);
    served.predict(&mut warden_agent::train::model::Workspace::default(), x, 1).to_vec()
}

#[test]
fn answers_keys_budgets_limits_and_restarts_behave_as_configured() {
    let dir = scratch("serve");
    let (model, public) = trained_signed_model(&dir, (31060, 31065));
    let keys = api_keys(
        &dir,
        &[
            ("precise", "precision = 4\ntop_k = 2\nqueries_per_day = 1000"),
            ("labels", "output = \"label\""),
            ("daily", "queries_per_day = 3"),
            ("slow", "rate_per_s = 0.2\nburst = 2"),
        ],
    );
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        "state_file = \"state.json\"\n[auth]\napi_keys = \"keys.toml\"\n[defaults]\nqueries_per_day = 100\nrate_per_s = 1000\nburst = 1000\n[limits]\nmax_body_bytes = 16384\nmax_batch = 4\n[metrics]\nkeys = [\"precise\"]\n",
    )
    .unwrap();
    let s = Served::start(&model, &public, &config, 31066);

    // Precision and top-k exactly as configured for the key.
    let x = vec![0.3f32; 784];
    let p = probabilities(&model, &x);
    let mut order: Vec<usize> = (0..10).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let (code, _, body) = s.post(Some(&keys[0]), &input(0.3));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let top = v["predictions"][0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(v["predictions"][0]["label"], order[0]);
    for (t, &c) in top.iter().zip(&order) {
        assert_eq!(t["class"], c);
        let want = (f64::from(p[c]) * 1e4).round() / 1e4;
        assert_eq!(t["probability"].as_f64().unwrap(), want, "{body}");
    }
    // Labels only.
    let (code, _, body) = s.post(Some(&keys[1]), &input(0.3));
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"predictions": [{"label": order[0]}]})
    );

    // Unknown key, no key.
    let (code, head, _) = s.post(Some("wdn_not_a_key"), &input(0.3));
    assert_eq!(code, 401);
    assert!(head.contains("www-authenticate: bearer"));
    assert_eq!(s.post(None, &input(0.3)).0, 401);

    // The daily budget: 3 queries, then 429 with Retry-After until midnight UTC.
    for _ in 0..3 {
        assert_eq!(s.post(Some(&keys[2]), &input(0.1)).0, 200);
    }
    let (code, head, body) = s.post(Some(&keys[2]), &input(0.1));
    assert_eq!(code, 429, "{body}");
    let retry: u64 = head.lines().find_map(|l| l.strip_prefix("retry-after: ")).unwrap().trim().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    // The rate limit: a burst of 2, then 429 with a short Retry-After.
    assert_eq!(s.post(Some(&keys[3]), &input(0.1)).0, 200);
    assert_eq!(s.post(Some(&keys[3]), &input(0.1)).0, 200);
    let (code, head, _) = s.post(Some(&keys[3]), &input(0.1));
    assert_eq!(code, 429);
    let retry: u64 = head.lines().find_map(|l| l.strip_prefix("retry-after: ")).unwrap().trim().parse().unwrap();
    assert!((1..=10).contains(&retry), "{head}");

    // Oversized bodies and batches, malformed inputs.
    let (code, _, _) = s.post(Some(&keys[0]), &format!("{{\"input\": [{}]}}", vec!["0.5"; 10_000].join(",")));
    assert_eq!(code, 413);
    let batch = format!("{{\"inputs\": [{}]}}", vec![format!("[{}]", vec!["0"; 784].join(",")); 5].join(","));
    assert_eq!(s.post(Some(&keys[0]), &batch).0, 413);
    assert_eq!(s.post(Some(&keys[0]), "{\"input\": [1, 2, 3]}").0, 400);
    assert_eq!(s.post(Some(&keys[0]), "not json").0, 400);

    // Counts survive a restart: the daily key stays spent.
    s.stop();
    let s = Served::start(&model, &public, &config, 31066);
    assert_eq!(s.post(Some(&keys[2]), &input(0.1)).0, 429);
    assert_eq!(s.post(Some(&keys[0]), &input(0.1)).0, 200);
    let (code, metrics) = s.metrics(Some(&keys[0]));
    assert_eq!(code, 200, "{metrics}");
    assert!(metrics.contains("warden_predictions_total 1"), "{metrics}");
    s.stop();

    // A model whose signature fails is never served.
    std::fs::write(model.join("extra.txt"), b"x").unwrap();
    let out = Command::new(bin("warden"))
        .arg("serve")
        .arg(&model)
        .arg("--pubkey")
        .arg(&public)
        .args(["--listen", "127.0.0.1:31067"])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to serve"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The interoperability venv's python, with numpy.
fn python() -> Option<PathBuf> {
    warden_tests::interop_python("numpy")
}

/// Runs scripts/extraction_attack.py against the server on `port`; its JSON line.
fn attack(py: &Path, model: &Path, port: u16, key: &str, queries: u32, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(py)
        .arg(repo_root().join("scripts/extraction_attack.py"))
        .args(["--url", &format!("https://127.0.0.1:{port}"), "--key", key, "--queries", &queries.to_string()])
        .args(extra)
        .arg("--model")
        .arg(model)
        .arg("--test-images")
        .arg(repo_root().join("data/fashion-mnist-small/t10k-images-idx3-ubyte.gz"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_equation_solving_attack_steals_full_precision_but_not_the_defaults() {
    let Some(py) = python() else { return };
    let dir = scratch("serve-attack");
    let (model, public) = trained_signed_model(&dir, (31070, 31075));
    // Full precision is a test-only setting; the other key has the defaults
    // (2 decimals, top 3, 1000 queries a day) with a rate limit raised so the
    // test does not wait: the budget, not the clock, is what stops it.
    let keys = api_keys(&dir, &[("full", "precision = 9\ntop_k = 10\nqueries_per_day = 100000"), ("default", "")]);
    let config = dir.join("serve.toml");
    std::fs::write(&config, "[auth]\napi_keys = \"keys.toml\"\n[defaults]\nrate_per_s = 100000\nburst = 100000\n")
        .unwrap();
    let served = Served::start(&model, &public, &config, 31076);
    let full = attack(&py, &model, 31076, &keys[0], 1000, &[]);
    assert!(full["agreement"].as_f64().unwrap() >= 0.99, "full precision must be stealable: {full}");
    // The defaults: asking for more than the daily budget gets 429 at 1000.
    let capped = attack(&py, &model, 31076, &keys[1], 2000, &[]);
    assert_eq!(capped["answered"], 1000, "{capped}");
    assert!(capped["stopped"].as_str().unwrap().contains("429"), "{capped}");
    assert!(capped["agreement"].as_f64().unwrap() < 0.99, "the defaults must not give the model away: {capped}");
    served.stop();
}

/// The model file is an ordinary PyTorch MLP: scripts/predict_numpy.py,
/// which knows only the file and `torch.nn.Linear`'s convention
/// (`x @ W.T + b`, W `[out, in]`), computes exactly the probabilities
/// `warden serve` answers for a trained two-layer MLP.
#[test]
fn numpy_with_torch_linears_convention_reproduces_the_served_predictions_from_the_file_alone() {
    let Some(py) = python() else { return };
    let dir = scratch("serve-numpy");
    let mlp = "kind = \"mlp\"\nhidden = [24]\ndropout = 0.1";
    let (model, public) = trained_signed(&dir, (32140, 32145), &[("kind = \"softmax\"", mlp)]);
    let keys = api_keys(&dir, &[("full", "precision = 9\ntop_k = 10")]);
    let config = dir.join("serve.toml");
    std::fs::write(&config, "[auth]\napi_keys = \"keys.toml\"\n").unwrap();
    let served = Served::start(&model, &public, &config, 32146);
    let inputs: Vec<Vec<f32>> =
        (0..4).map(|k| (0..784).map(|i| ((i * 7 + k * 13) % 17) as f32 / 16.0).collect()).collect();
    let mut numpy = Command::new(&py)
        .arg(repo_root().join("scripts/predict_numpy.py"))
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(numpy.stdin.take().unwrap(), &inputs).unwrap();
    let out = numpy.wait_with_output().unwrap();
    assert!(out.status.success(), "predict_numpy.py failed");
    let expected: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();
    for (x, want) in inputs.iter().zip(&expected) {
        let body = serde_json::json!({ "input": x }).to_string();
        let (code, _, answer) = served.post(Some(&keys[0]), &body);
        assert_eq!(code, 200, "{answer}");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let top = v["predictions"][0]["top"].as_array().unwrap();
        assert_eq!(top.len(), 10, "{answer}");
        for t in top {
            let (class, p) = (t["class"].as_u64().unwrap() as usize, t["probability"].as_f64().unwrap());
            assert!((p - want[class]).abs() < 1e-5, "class {class}: served {p}, numpy {}", want[class]);
        }
    }
    served.stop();
}

#[test]
fn the_detector_throttles_a_key_whose_queries_look_synthetic() {
    let Some(py) = python() else { return };
    let dir = scratch("serve-detector");
    let (model, public) = trained_signed_model(&dir, (31080, 31085));
    let keys = api_keys(&dir, &[("honest", ""), ("thief", "")]);
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        "state_file = \"state.json\"\n[auth]\napi_keys = \"keys.toml\"\n[defaults]\nrate_per_s = 100000\nburst = 100000\n\
         [detector]\nenabled = true\naction = \"throttle\"\nthrottle_rate_per_s = 0.01\n",
    )
    .unwrap();
    let served = Served::start(&model, &public, &config, 31086);
    // Real images: answered in full, never flagged.
    let honest = attack(&py, &model, 31086, &keys[0], 400, &["--batch", "20", "--natural"]);
    assert_eq!(honest["answered"], 400, "{honest}");
    // Random inputs: flagged after the first window and throttled to a trickle.
    let thief = attack(&py, &model, 31086, &keys[1], 400, &["--batch", "20"]);
    let answered = thief["answered"].as_u64().unwrap();
    assert!((50..400).contains(&answered), "{thief}");
    assert!(thief["stopped"].as_str().unwrap().contains("429"), "{thief}");
    served.stop();
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["thief"]["flagged"], true, "{state}");
    assert_eq!(state["honest"]["flagged"], false, "{state}");
}

/// A CA and client certificates it issued to the common names `cns`, as PEM
/// files in `dir`; returns the CA's path and each (cert, key) pair.
fn client_pki(dir: &Path, name: &str, cns: &[&str]) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let ca_path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let leaves = cns
        .iter()
        .map(|cn| {
            let key = KeyPair::generate().unwrap();
            let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
            leaf.distinguished_name.push(DnType::CommonName, *cn);
            leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = leaf.signed_by(&key, &issuer).unwrap();
            let paths = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
            std::fs::write(&paths.0, cert.pem()).unwrap();
            std::fs::write(&paths.1, key.serialize_pem()).unwrap();
            paths
        })
        .collect();
    (ca_path, leaves)
}

#[test]
fn client_certificates_from_the_configured_ca_stand_in_for_keys() {
    let dir = scratch("serve-mtls");
    let (model, public) = trained_signed_model(&dir, (31090, 31095));
    let (ca, lab) = client_pki(&dir, "lab", &["alice-laptop", "bob"]);
    let [(cert, key), (bob_cert, bob_key)] = <[_; 2]>::try_from(lab).unwrap();
    let (_, stranger) = client_pki(&dir, "stranger", &["mallory"]);
    let (other_cert, other_key) = &stranger[0];
    // bob's settings come from [clients.bob], everyone else's from [defaults].
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "state_file = \"state.json\"\n[auth]\nclient_ca = \"{}\"\n[defaults]\noutput = \"label\"\n\
             [clients.bob]\noutput = \"probabilities\"\nprecision = 1\ntop_k = 2\n",
            ca.display()
        ),
    )
    .unwrap();
    let s = Served::start(&model, &public, &config, 31096);
    let post = |creds: Option<(&Path, &Path)>| -> (bool, u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", "--data-binary", &input(0.2)]);
        if let Some((c, k)) = creds {
            cmd.arg("--cert").arg(c).arg("--key").arg(k);
        }
        let out = cmd.arg("https://127.0.0.1:31096/v1/predict").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (out.status.success(), code.trim().parse().unwrap_or(0), body.to_string())
    };
    // The CA's certificate gets in, under [defaults] (labels only here).
    let (ok, code, body) = post(Some((&cert, &key)));
    assert!(ok && code == 200, "{code} {body}");
    assert!(body.contains("\"label\"") && !body.contains("probability"), "{body}");
    // bob, from the same CA, gets what [clients.bob] says: two classes, one decimal.
    let (ok, code, body) = post(Some((&bob_cert, &bob_key)));
    assert!(ok && code == 200, "{code} {body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let top = answer["predictions"][0]["top"].as_array().unwrap_or_else(|| panic!("{body}"));
    assert_eq!(top.len(), 2, "{body}");
    for t in top {
        let p = t["probability"].as_f64().unwrap();
        assert_eq!((p * 10.0).round() / 10.0, p, "one decimal: {body}");
    }
    // No certificate and no key: 401. Another CA's certificate: no TLS session at all.
    assert_eq!(post(None).1, 401);
    let (ok, code, _) = post(Some((other_cert, other_key)));
    assert!(!ok || code == 0, "a certificate from another CA must be refused in the handshake (got HTTP {code})");
    s.stop();
    // Usage is counted under the certificate's name.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["cert:alice-laptop"]["total"], 1, "{state}");
    assert_eq!(state["cert:bob"]["total"], 1, "{state}");
}

/// Whether the server has not yet closed `c` (it never sends on these).
fn still_open(c: &std::net::TcpStream) -> bool {
    use std::io::Read;
    c.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    match (&*c).read(&mut [0u8; 1]) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn connections_past_the_caps_are_closed_and_an_honest_client_is_still_served() {
    let dir = scratch("serve-caps");
    let (model, public) = trained_signed_model(&dir, (31600, 31605));
    let keys = api_keys(&dir, &[("honest", "")]);
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        "[auth]\napi_keys = \"keys.toml\"\n[defaults]\nrate_per_s = 1000\nburst = 1000\n[metrics]\nkeys = [\"honest\"]\n\
         [limits]\nmax_connections = 8\nmax_handshakes = 4\nhandshake_timeout_s = 3\nidle_timeout_s = 3\n",
    )
    .unwrap();
    let s = Served::start(&model, &public, &config, 31606);
    // The server's sockets: those it holds before any client (its listener,
    // the runtime's own), 8 connections, and one just accepted and closing.
    let bound = s.sockets() + 8 + 1;
    let mut most = 0;

    // 40 connections that never start their TLS handshake: past 4 the
    // server closes them at once, the others at the handshake deadline.
    let mut stalled: Vec<_> = (0..40).map(|_| std::net::TcpStream::connect(("127.0.0.1", 31606)).unwrap()).collect();
    let until = Instant::now() + Duration::from_secs(60);
    while !stalled.is_empty() {
        most = most.max(s.sockets());
        assert!(Instant::now() < until, "{} stalled connections are still open after a minute", stalled.len());
        stalled.retain(still_open);
    }
    assert!(most <= bound, "the server held {most} sockets; at most {bound} with max_connections = 8");
    s.served_eventually(&keys[0]);

    // 12 clients that finish the handshake and then send nothing: at most 8
    // are held, until the idle deadline closes them.
    let mut idle: Vec<Child> = (0..12)
        .map(|_| {
            Command::new("openssl")
                .args(["s_client", "-quiet", "-connect", "127.0.0.1:31606"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("openssl is installed")
        })
        .collect();
    while !idle.is_empty() {
        most = most.max(s.sockets());
        assert!(
            Instant::now() < until + Duration::from_secs(60),
            "{} idle TLS clients are still connected",
            idle.len()
        );
        idle.retain_mut(|c| c.try_wait().unwrap().is_none());
        // (A poll interval: the loop ends when the last client is closed.)
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(most <= bound, "the server held {most} sockets; at most {bound} with max_connections = 8");
    s.served_eventually(&keys[0]);

    // The stalled connections past the handshake cap were refused, not queued.
    let (code, metrics) = s.metrics(Some(&keys[0]));
    assert_eq!(code, 200, "{metrics}");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("warden_connections_refused_total{limit=\"max_handshakes\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(refused >= 30, "{metrics}");
    s.stop();
}

#[test]
fn metrics_need_a_key_named_for_them_and_the_state_file_is_private() {
    let dir = scratch("serve-private");
    let (model, public) = trained_signed_model(&dir, (31610, 31615));
    let keys = api_keys(&dir, &[("alice", ""), ("prometheus", "")]);
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        "state_file = \"state.json\"\n[auth]\napi_keys = \"keys.toml\"\nanonymous = true\n[metrics]\nkeys = [\"prometheus\"]\n",
    )
    .unwrap();
    // A symlink planted where a predictable writer would put its temporary file.
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("state.tmp")).unwrap();
    let s = Served::start(&model, &public, &config, 31616);
    assert_eq!(s.post(Some(&keys[0]), &input(0.1)).0, 200);
    // Anonymous clients may predict here, but not read the metrics; nor
    // may a key that is not named in [metrics].
    assert_eq!(s.post(None, &input(0.1)).0, 200);
    assert_eq!(s.metrics(None).0, 401);
    assert_eq!(s.metrics(Some("wdn_not_a_key")).0, 401);
    assert_eq!(s.metrics(Some(&keys[0])).0, 403);
    let (code, metrics) = s.metrics(Some(&keys[1]));
    assert_eq!(code, 200, "{metrics}");
    assert!(metrics.contains("warden_predictions_total 2"), "{metrics}");
    // The self-signed certificate is beside the state file, for curl as is:
    // trusted with --cacert, or its key pinned with the printed pin.
    let cert = dir.join("serve-cert.pem");
    let pin = s.said.split_whitespace().find(|w| w.starts_with("sha256//")).expect("a printed pin").to_string();
    let curl = |extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(format!("https://localhost:{}/metrics", s.port))
            .output()
            .expect("curl is installed");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    assert_eq!(curl(&["--cacert", cert.to_str().unwrap()]), (Some(0), "401".to_string()), "{}", s.said);
    assert_eq!(curl(&["--cacert", cert.to_str().unwrap(), "--pinnedpubkey", &pin]).0, Some(0));
    let wrong = format!("sha256//{}", "A".repeat(43) + "=");
    assert_eq!(
        curl(&["--cacert", cert.to_str().unwrap(), "--pinnedpubkey", &wrong]).0,
        Some(90),
        "a wrong pin must fail"
    );
    assert_eq!(curl(&[]).0, Some(60), "without the certificate curl must not trust the server");
    s.stop();
    use std::os::unix::fs::PermissionsExt;
    let state = std::fs::symlink_metadata(dir.join("state.json")).unwrap();
    assert!(state.is_file(), "the state file must be a regular file");
    assert_eq!(state.permissions().mode() & 0o777, 0o600, "the state file must be readable by its owner only");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched", "the planted symlink was followed");
    let usage: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(usage["alice"]["total"], 1, "{usage}");
}
