//! Attacks during training. Unauthenticated: the listeners take a bounded
//! number of connections per source and in total, close the rest before
//! reading a byte, refuse other CAs in the handshake, log refusals at
//! a bounded rate, and the job trains to the end. Authenticated but wrong
//! (a certificate of the job's CA for the wrong role, or a worker sending
//! what only servers send): refused per connection while honest training
//! steps go on with exactly the optimizer's results.

use std::time::{Duration, Instant};

use warden_tests::{Procs, fresh_tag, job_in, scratch, wait_gone};

fn rss_kib(pid: u32) -> u64 {
    warden_tests::procs::status_field(pid, "VmRSS:")
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_flood_of_garbage_connections_does_not_stop_training() {
    let tag = fresh_tag();
    let dir = scratch("flood");
    let job = job_in(&dir, (31110, 31120), &[("epochs = 5", "epochs = 150")]);
    let run = dir.join("run");
    let child = warden_tests::spawn_launch(&tag, &job, &run);
    let until = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default().lines().count() < 2 {
        assert!(Instant::now() < until, "training never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("plan.json")).unwrap()).unwrap();
    let ports: Vec<u16> =
        plan["processes"].as_array().unwrap().iter().filter_map(|p| p["port"].as_u64().map(|p| p as u16)).collect();
    assert_eq!(ports.len(), 3, "scheduler and two servers listen");

    // The attack, from another process: 2,000 plaintext connections of
    // random bytes, 500 half-open TLS handshakes and 300 frames announcing
    // 0x7fffffff bytes (both held open), 100 handshakes with a client
    // certificate from another job's CA. Memory is sampled while it runs.
    let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let attack = std::process::Command::new(env!("CARGO_BIN_EXE_warden-attack"))
        .args([list.as_str(), "--waves", "50", "--hold", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak = 0;
    let attack = {
        let id = attack.id();
        let waiter = std::thread::spawn(move || attack.wait_with_output().unwrap());
        while !waiter.is_finished() {
            peak = peak.max(Procs::agents(&tag).pids().iter().map(|p| rss_kib(*p)).max().unwrap_or(0));
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = waiter.join().unwrap();
        assert!(out.status.success(), "warden-attack (pid {id}) failed");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    assert_eq!(attack["sent"]["plaintext"], 2000, "{attack}");
    assert_eq!(attack["sent"]["half_open_tls"], 500, "{attack}");
    assert_eq!(attack["sent"]["huge_length"], 300, "{attack}");
    assert_eq!(attack["foreign_ca_admitted"], 0, "a certificate of another job's CA got through: {attack}");
    for (port, open) in attack["still_open"].as_object().unwrap() {
        // 32 per source by default (the job's 5 processes all share this address, too).
        let open = open.as_u64().unwrap();
        assert!(open <= 32, "port {port} still holds {open} of the 800 held unauthenticated connections");
    }

    let (status, stderr) = warden_tests::wait_for(child, &run, 120);
    assert!(status.success(), "the job must train to the end under the flood: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(summary["epochs"], 150);
    // Each process stayed small; the logs did not grow with the flood.
    assert!(peak < 256 * 1024, "an agent reached {peak} KiB of resident memory");
    for entry in std::fs::read_dir(run.join("logs")).unwrap() {
        let log = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let refusals = log.lines().filter(|l| l.contains("closed a connection") || l.contains("refused")).count();
        assert!(refusals <= 40, "{refusals} refusal lines for 2,900 connections: the log is not rate-limited");
    }
    assert!(stderr.contains("at once") || stderr.contains("refused"), "refusals are logged: {stderr}");
    wait_gone(&tag);
}

/// Insiders with the wrong role, during honest training: certificates of
/// the job's own CA for roles the server does not admit, and worker
/// certificates sending what only servers or the scheduler may send. Each
/// is refused on its own connection; the honest worker's 60 steps all come
/// back with exactly the SGD update, so nothing the attackers sent changed
/// the parameters or the optimizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_role_certificates_and_messages_are_refused_while_training_goes_on() {
    use warden_agent::net::identity::Role;
    use warden_agent::net::wire::Message;
    use warden_agent::train::optimizer::OptimizerSpec;

    // Caps raised: this test is about what insiders send, not how many come.
    let caps = "max_connections = 1024\nmax_connections_per_source = 1024";
    let cluster = std::sync::Arc::new(warden_tests::RoleCluster::start(caps).await);
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..120u32 {
        let cluster = cluster.clone();
        attackers.spawn(async move {
            match i % 3 {
                // The right CA, the wrong role: the server admits only workers.
                0 => {
                    let role = if i % 2 == 0 { Role::Server } else { Role::Scheduler };
                    let me = cluster.pki.issue(role, 0);
                    let r = warden_agent::net::conn::connect(
                        &me,
                        cluster.pki.id(Role::Server, 0),
                        cluster.server_addr,
                        1 << 20,
                        std::time::Duration::from_secs(5),
                    )
                    .await;
                    assert!(r.is_err(), "a {role} certificate was admitted by a server");
                    "wrong role refused in the handshake"
                }
                // A worker sending what only a server (params) or the scheduler
                // (set_optimizer) may send; each under an identity of its own,
                // as a server holds one connection per identity.
                _ => {
                    let mut w = cluster.worker_conn_as(1 + i).await;
                    let m = if i % 3 == 1 {
                        Message::Params { version: 1_000_000, data: vec![1e9; 10] }
                    } else {
                        Message::SetOptimizer(OptimizerSpec::sgd(10.0))
                    };
                    w.send(&m).await.unwrap();
                    let got = w.recv().await;
                    assert!(
                        matches!(got, Err(warden_agent::net::conn::ConnError::Refused { .. })),
                        "`{}` from a worker was not refused: {got:?}",
                        m.name()
                    );
                    "server-only message refused"
                }
            }
        });
    }
    // Meanwhile, honest steps: every update is exactly SGD with lr 0.5 on a
    // gradient of ones, from the version the worker saw.
    let mut honest = cluster.worker_conn().await;
    for step in 0..60u64 {
        warden_tests::honest_sgd_step(&mut honest, step).await;
    }
    let mut refused = 0;
    while let Some(r) = attackers.join_next().await {
        r.expect("every attacker was refused as expected");
        refused += 1;
    }
    assert_eq!(refused, 120);
}
