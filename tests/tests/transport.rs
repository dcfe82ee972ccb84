//! The transport against a real listening server role: every peer that is
//! not this job's worker is refused in the TLS handshake, before the server
//! reads a single message; authenticated peers that break the protocol are
//! told why and cut off; and the server keeps serving legitimate workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use warden_agent::net::identity::Role;
use warden_agent::net::wire::Message;
use warden_agent::train::optimizer::{OptimizerKind, OptimizerSpec};
use warden_tests::{RoleCluster, TestPki, assert_already_connected};

fn roots(ca_pem: &str) -> RootCertStore {
    let mut r = RootCertStore::empty();
    r.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    r
}

/// A client that trusts the job CA (so its side of the handshake proceeds)
/// and presents `cert`, if any, over the given TLS versions.
fn rogue(
    ca_pem: &str,
    cert: Option<(String, Vec<u8>)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let b = ClientConfig::builder_with_provider(warden_agent::net::tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca_pem));
    let config = match cert {
        None => b.with_no_client_auth(),
        Some((pem, key)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap(),
    };
    TlsConnector::from(Arc::new(config))
}

fn cert_for(pki: &TestPki, role: Role, rank: u32) -> (String, Vec<u8>) {
    let me = pki.id(role, rank);
    let key = warden_agent::net::pki::NodeKey::generate().unwrap();
    let cert = pki.ca.sign_csr(&key.csr_pem(&me).unwrap(), &me, Some("127.0.0.1".parse().unwrap())).unwrap();
    (cert, key.pkcs8_der().to_vec())
}

/// Tries a handshake and a first read. Returns what the client saw: `Ok(msg)`
/// if the server sent a frame, `Err(text)` otherwise.
async fn try_peer(cluster: &RoleCluster, connector: TlsConnector) -> Result<Message, String> {
    let tcp = TcpStream::connect(cluster.server_addr).await.map_err(|e| e.to_string())?;
    try_peer_on(cluster, connector, tcp).await
}

/// [`try_peer`] through the server's Unix-domain socket.
async fn try_peer_local(cluster: &RoleCluster, connector: TlsConnector) -> Result<Message, String> {
    let sock = tokio::net::UnixStream::connect(&cluster.server_socket).await.map_err(|e| e.to_string())?;
    try_peer_on(cluster, connector, sock).await
}

async fn try_peer_on<S>(cluster: &RoleCluster, connector: TlsConnector, sock: S) -> Result<Message, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let name = ServerName::IpAddress(cluster.server_addr.ip().into());
    let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, sock))
        .await
        .map_err(|_| "handshake hung".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    // TLS 1.3: a refused client learns it on its first read.
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), warden_agent::net::conn::read_frame(&mut tls, 1 << 20, &mut buf))
        .await
    {
        Err(_) => Err("read hung".into()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(false)) => Err("closed".into()),
        Ok(Ok(true)) => Message::decode(&buf).map_err(|e| e.to_string()),
    }
}

fn assert_refused(what: &str, r: Result<Message, String>, expect_in_error: &str) {
    match r {
        Ok(m) => panic!("{what}: the server answered with `{}`", m.name()),
        Err(e) => assert!(e.contains(expect_in_error), "{what}: expected `{expect_in_error}` in `{e}`"),
    }
}

/// The server still serves: a legitimate worker pushes and pulls, and the
/// update is exactly plain SGD with the job's lr (0.5), i.e. the optimizer
/// was not changed by anything before.
async fn assert_serves_with_original_optimizer(cluster: &RoleCluster, step: u64) {
    let mut w = cluster.worker_conn().await;
    warden_tests::honest_sgd_step(&mut w, step).await;
}

#[tokio::test]
async fn unauthenticated_and_wrong_peers_are_refused_in_the_handshake() {
    let cluster = RoleCluster::start("").await;
    let ca = cluster.pki.ca.cert_pem().to_string();
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    assert_refused("no certificate", try_peer(&cluster, rogue(&ca, None, tls13)).await, "CertificateRequired");

    let other_job = TestPki::new();
    assert_refused(
        "a certificate from another job's CA",
        try_peer(&cluster, rogue(&ca, Some(cert_for(&other_job, Role::Worker, 0)), tls13)).await,
        "UnknownCA",
    );

    let expired = cluster.pki.issue_expired(Role::Worker, 0);
    assert_refused(
        "an expired certificate",
        try_peer(&cluster, rogue(&ca, Some(expired), tls13)).await,
        "CertificateExpired",
    );

    for role in [Role::Server, Role::Scheduler] {
        assert_refused(
            &format!("a {role} certificate on a server's port"),
            try_peer(&cluster, rogue(&ca, Some(cert_for(&cluster.pki, role, 0)), tls13)).await,
            "CertificateUnknown",
        );
    }

    let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    assert_refused(
        "a TLS 1.2-only client",
        try_peer(&cluster, rogue(&ca, Some(cert_for(&cluster.pki, Role::Worker, 0)), tls12)).await,
        "handshake",
    );

    // A legitimate worker certificate through the same rogue path is welcomed,
    // so the refusals above are about the certificates, not the harness.
    let ok = try_peer(&cluster, rogue(&ca, Some(cert_for(&cluster.pki, Role::Worker, 0)), tls13)).await;
    assert_eq!(ok, Ok(Message::Welcome));

    assert_serves_with_original_optimizer(&cluster, 0).await;
}

#[tokio::test]
async fn a_worker_may_not_send_what_only_the_scheduler_may() {
    let cluster = RoleCluster::start("").await;
    let mut w = cluster.worker_conn().await;
    let evil = OptimizerSpec { kind: OptimizerKind::Sgd, ..OptimizerSpec::sgd(10.0) };
    w.send(&Message::SetOptimizer(evil)).await.unwrap();
    match w.recv().await {
        Err(warden_agent::net::conn::ConnError::Refused { message, .. }) => {
            assert_eq!(message, "a worker may not send `set_optimizer`")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Mid-connection too: after a legitimate pull, a `start` is refused.
    let mut w = cluster.worker_conn().await;
    w.send(&Message::Pull { min_version: 0 }).await.unwrap();
    assert!(matches!(w.recv().await.unwrap(), Message::Params { .. }));
    w.send(&Message::Shutdown).await.unwrap();
    assert!(matches!(w.recv().await, Err(warden_agent::net::conn::ConnError::Refused { .. })));

    assert_serves_with_original_optimizer(&cluster, 0).await;
}

/// A raw TLS stream with a legitimate worker certificate, past the welcome.
async fn raw_worker(cluster: &RoleCluster) -> tokio_rustls::client::TlsStream<TcpStream> {
    let me = cluster.pki.issue(Role::Worker, 0);
    let config = warden_agent::net::tls::client_config(&me, cluster.pki.id(Role::Server, 0)).unwrap();
    let tcp = TcpStream::connect(cluster.server_addr).await.unwrap();
    let mut tls =
        TlsConnector::from(config).connect(ServerName::IpAddress(cluster.server_addr.ip().into()), tcp).await.unwrap();
    let mut buf = Vec::new();
    assert!(warden_agent::net::conn::read_frame(&mut tls, 1 << 20, &mut buf).await.unwrap());
    assert_eq!(Message::decode(&buf).unwrap(), Message::Welcome);
    tls
}

/// Reads the server's last words: an error frame, then the end of the stream.
async fn refusal(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let mut buf = Vec::new();
    let got = tokio::time::timeout(Duration::from_secs(5), warden_agent::net::conn::read_frame(tls, 1 << 20, &mut buf))
        .await
        .expect("the server answers promptly")
        .expect("a readable frame");
    assert!(got, "expected an error frame before the close");
    let Message::Error { message } = Message::decode(&buf).unwrap() else { panic!("expected an error frame") };
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await.expect("then it closes");
    message
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn oversized_length_header_is_refused_before_allocation() {
    let cluster = RoleCluster::start("").await;
    let mut tls = raw_worker(&cluster).await;
    let before = vm_hwm_kib();
    tls.write_all(&0x7fff_ffffu32.to_le_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let message = refusal(&mut tls).await;
    assert_eq!(message, "frame of 2147483647 bytes exceeds the limit of 67108864 bytes");
    let grew = vm_hwm_kib().saturating_sub(before);
    assert!(grew < 64 * 1024, "peak memory grew by {grew} KiB after a 2 GiB length header");
    assert_serves_with_original_optimizer(&cluster, 0).await;
}

#[tokio::test]
async fn silence_past_the_first_message_deadline_is_cut_off() {
    // The test job sets first_message_timeout_ms = 500.
    let cluster = RoleCluster::start("").await;
    let started = Instant::now();
    let mut tls = raw_worker(&cluster).await;
    let message = refusal(&mut tls).await;
    assert_eq!(message, "timed out waiting for the first message");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(5), "cut off after {waited:?}");
    assert_serves_with_original_optimizer(&cluster, 0).await;
}

#[tokio::test]
async fn plaintext_and_garbage_get_nothing() {
    let cluster = RoleCluster::start("").await;
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0u8; 64][..], &[0x16, 0x03, 0x01, 0xff, 0xff][..]] {
        let mut tcp = TcpStream::connect(cluster.server_addr).await.unwrap();
        tcp.write_all(junk).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got))
            .await
            .expect("the server closes the connection instead of waiting");
        // At most a TLS alert record (content type 21) comes back; never a frame.
        assert!(got.is_empty() || got[0] == 21, "plaintext peer received {got:?}");
    }
    assert_serves_with_original_optimizer(&cluster, 0).await;
}

/// A server's Unix-domain socket, through which the workers of its own host
/// reach it, is the same door as its port: the same handshake turns away
/// garbage, peers without the job's worker certificate and TLS 1.2; an
/// honest worker trains through it; and one acceptor behind both holds one
/// connection per identity across them.
#[tokio::test]
async fn a_servers_unix_socket_admits_exactly_what_its_port_does() {
    let cluster = RoleCluster::start("").await;
    let ca = cluster.pki.ca.cert_pem().to_string();
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0u8; 64][..]] {
        let mut sock = tokio::net::UnixStream::connect(&cluster.server_socket).await.unwrap();
        sock.write_all(junk).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut got))
            .await
            .expect("the server closes the connection instead of waiting");
        assert!(got.is_empty() || got[0] == 21, "plaintext peer received {got:?}");
    }
    assert_refused("no certificate", try_peer_local(&cluster, rogue(&ca, None, tls13)).await, "CertificateRequired");
    let other_job = TestPki::new();
    assert_refused(
        "a certificate from another job's CA",
        try_peer_local(&cluster, rogue(&ca, Some(cert_for(&other_job, Role::Worker, 0)), tls13)).await,
        "UnknownCA",
    );
    assert_refused(
        "a server certificate",
        try_peer_local(&cluster, rogue(&ca, Some(cert_for(&cluster.pki, Role::Server, 0)), tls13)).await,
        "CertificateUnknown",
    );
    let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    assert_refused(
        "a TLS 1.2-only client",
        try_peer_local(&cluster, rogue(&ca, Some(cert_for(&cluster.pki, Role::Worker, 0)), tls12)).await,
        "handshake",
    );

    let worker = cluster.pki.issue(Role::Worker, 0);
    let mut local = cluster.try_conn_with(&worker, Role::Server, true).await.expect("a worker of this host connects");
    warden_tests::honest_sgd_step(&mut local, 0).await;
    let through_port = cluster.try_conn_with(&worker, Role::Server, false).await;
    assert_already_connected("the port while connected through the socket", through_port);
    drop(local);
    let mut remote = cluster.worker_conn().await;
    let through_socket = cluster.try_conn_with(&worker, Role::Server, true).await;
    assert_already_connected("the socket while connected through the port", through_socket);
    warden_tests::honest_sgd_step(&mut remote, 1).await;
}

#[tokio::test]
async fn captured_bytes_of_a_push_do_not_contain_the_gradient() {
    // A relay between a legitimate worker and the server records every byte.
    let cluster = RoleCluster::start("").await;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server = cluster.server_addr;
    let captured = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let cap = captured.clone();
    tokio::spawn(async move {
        let (mut client, _) = relay.accept().await.unwrap();
        let mut upstream = TcpStream::connect(server).await.unwrap();
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let up = async {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = cr.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                cap.lock().unwrap().extend_from_slice(&buf[..n]);
                if uw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        };
        let down = async {
            let _ = tokio::io::copy(&mut ur, &mut cw).await;
        };
        tokio::join!(up, down);
    });
    let me = cluster.pki.issue(Role::Worker, 0);
    // The relay is at another port of 127.0.0.1, and the certificate names the IP, so TLS still verifies.
    let mut w = warden_agent::net::conn::connect(
        &me,
        cluster.pki.id(Role::Server, 0),
        relay_addr,
        1 << 20,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let len = cluster.plan.shard(0).len();
    let pattern: Vec<f32> = (0..len).map(|i| 1234.5678 + i as f32).collect();
    w.send(&Message::Push { step: 0, data: pattern.clone() }).await.unwrap();
    w.send(&Message::Pull { min_version: 1 }).await.unwrap();
    assert!(matches!(w.recv().await.unwrap(), Message::Params { version: 1, .. }));
    let bytes = captured.lock().unwrap().clone();
    let needle: Vec<u8> = pattern[..2].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(bytes.len() > len * 4, "the relay saw the push");
    assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_slice()), "gradient bytes visible on the wire");
}

/// A legitimate worker's raw TLS stream with a tiny receive buffer, past
/// its first message (so the first-message deadline no longer applies).
async fn raw_worker_small_buffer(cluster: &RoleCluster) -> tokio_rustls::client::TlsStream<TcpStream> {
    let me = cluster.pki.issue(Role::Worker, 0);
    let config = warden_agent::net::tls::client_config(&me, cluster.pki.id(Role::Server, 0)).unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(cluster.server_addr).await.unwrap();
    let mut tls =
        TlsConnector::from(config).connect(ServerName::IpAddress(cluster.server_addr.ip().into()), tcp).await.unwrap();
    let mut buf = Vec::new();
    assert!(warden_agent::net::conn::read_frame(&mut tls, 1 << 20, &mut buf).await.unwrap());
    assert_eq!(Message::decode(&buf).unwrap(), Message::Welcome);
    let mut frame = Vec::new();
    Message::Pull { min_version: 0 }.encode_frame(&mut frame);
    tls.write_all(&frame).await.unwrap();
    assert!(warden_agent::net::conn::read_frame(&mut tls, 1 << 20, &mut buf).await.unwrap());
    assert!(matches!(Message::decode(&buf).unwrap(), Message::Params { .. }));
    tls
}

/// After authentication, a peer that starts a frame and then drips or stops
/// is dropped after `stall_timeout_s`, told why, and costs nothing more.
#[tokio::test]
async fn a_peer_that_stalls_mid_frame_is_dropped_after_the_stall_timeout() {
    let cluster = RoleCluster::start("stall_timeout_s = 1").await;
    let mut tls = raw_worker_small_buffer(&cluster).await;
    // A header promising 100 bytes, then 10 of them, then nothing.
    tls.write_all(&100u32.to_le_bytes()).await.unwrap();
    tls.write_all(&[3; 10]).await.unwrap();
    tls.flush().await.unwrap();
    let started = Instant::now();
    let message = refusal(&mut tls).await;
    assert_eq!(message, "timed out waiting for the rest of a frame (the peer stopped sending mid-frame)");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(4), "dropped after {waited:?}");
    assert_serves_with_original_optimizer(&cluster, 0).await;
}

/// A peer that keeps asking but stops reading the answers fills the
/// server's socket buffer; the server drops it after `stall_timeout_s`
/// instead of blocking on it for ever, and keeps serving everyone else.
#[tokio::test]
async fn a_peer_that_stops_reading_is_dropped_after_the_stall_timeout() {
    let cluster = RoleCluster::start("stall_timeout_s = 1").await;
    let tls = raw_worker_small_buffer(&cluster).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut pulls = Vec::new();
    // Enough answers (about 80 bytes each) to fill both sides' socket buffers.
    for _ in 0..300_000 {
        Message::Pull { min_version: 0 }.encode_frame(&mut pulls);
    }
    // Ask, and ask, without reading (the writes block once the server stops
    // reading too, which is fine: the task is dropped at the end).
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&pulls).await;
        let _ = wr.flush().await;
        wr
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    // By now the server has given up on us: draining what it sent reaches the end.
    let mut sink = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut sink)).await;
    assert!(drained.is_ok(), "the server still holds the connection of a peer that stopped reading");
    writer.abort();
    assert_serves_with_original_optimizer(&cluster, 0).await;
}

fn limits(max_connections: usize, max_per_source: usize) -> warden_agent::net::conn::ConnLimits {
    warden_agent::net::conn::ConnLimits {
        max_frame: 1 << 20,
        first_message: Duration::from_secs(10),
        max_connections,
        max_per_source,
        stall: Duration::from_secs(10),
    }
}

/// A listener whose cap is full closes a connection before the handshake;
/// a peer of the job then tries again (with backoff, within its patience)
/// instead of failing the job at start-up.
#[tokio::test]
async fn a_client_tries_again_after_a_full_cap_cut_its_handshake_short() {
    use warden_agent::net::conn::{Acceptor, connect};
    let pki = TestPki::new();
    let acceptor = Acceptor::new(&pki.issue(Role::Server, 0), &[Role::Worker], limits(8, 8)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // The first three are closed at once, as a full cap does.
        for _ in 0..3 {
            drop(listener.accept().await.unwrap());
        }
        let (tcp, from) = listener.accept().await.unwrap();
        let slot = acceptor.admit(from).unwrap();
        acceptor.accept(tcp, from.into(), slot).await.map(|_| ())
    });
    let worker = pki.issue(Role::Worker, 0);
    let conn = connect(&worker, pki.id(Role::Server, 0), addr, 1 << 20, Duration::from_secs(20)).await;
    let conn = conn.expect("the fourth attempt is served");
    conn.close().await;
    let _ = server.await.unwrap();
}

/// Only connections that have not authenticated count against a
/// listener's caps: the job's own peers never crowd each other out.
#[tokio::test]
async fn authenticated_connections_do_not_count_against_the_caps() {
    use warden_agent::net::conn::{Acceptor, connect};
    let pki = TestPki::new();
    let acceptor = Acceptor::new(&pki.issue(Role::Server, 0), &[Role::Worker], limits(2, 2)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..4 {
            let (tcp, from) = listener.accept().await.unwrap();
            let slot = acceptor.admit(from).expect("a slot: authenticated peers gave theirs back");
            let (conn, _first) = acceptor.accept(tcp, from.into(), slot).await.unwrap();
            held.push(conn);
        }
        held.len()
    });
    let mut clients = Vec::new();
    for rank in 0..4 {
        let worker = pki.issue(Role::Worker, rank);
        let mut conn = connect(&worker, pki.id(Role::Server, 0), addr, 1 << 20, Duration::from_secs(20)).await.unwrap();
        conn.send(&Message::Pull { min_version: 0 }).await.unwrap();
        clients.push(conn);
    }
    assert_eq!(server.await.unwrap(), 4, "four authenticated connections held under a cap of two");
}
