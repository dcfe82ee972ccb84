//! `warden-attack`: an unauthenticated attack load, from its own process,
//! against a job's listeners on this machine (`tests/tests/flood.rs` and
//! `scripts/bench-attack` only; it refuses any address but loopback).
//!
//! ```text
//! warden-attack PORT[,PORT...] [--waves N] [--per-second R] [--hold SECONDS] [--while-pid PID]
//! ```
//!
//! Each wave sends, spread over the ports: 40 plaintext connections of
//! random bytes (closed at once), 10 half-open TLS handshakes and 6 frames
//! announcing 0x7fffffff bytes (both held open), and 2 complete handshakes
//! with a client certificate from another job's CA. 50 waves are the test's
//! load: 2,000 plaintext, 500 half-open, 300 huge headers, 100 foreign
//! certificates. With `--per-second` the waves are paced; without, they go
//! as fast as they can; with `--while-pid` they stop when that process
//! has exited. At the end it reports, as one JSON line, what it
//! sent and how many held connections each port still kept open.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use warden_agent::net::identity::Role;

/// The attacker does not care who the server is; it wants the server to
/// spend its verification on a certificate from the wrong CA.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client certificate for a worker of another job (its own CA).
fn foreign_client() -> Arc<rustls::ClientConfig> {
    let other = warden_tests::TestPki::new();
    let me = other.id(Role::Worker, 0);
    let key = warden_agent::net::pki::NodeKey::generate().expect("a key");
    let cert = other.ca.sign_csr(&key.csr_pem(&me).expect("a CSR"), &me, None).expect("a certificate");
    let provider = warden_agent::net::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("PEM")],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec())),
        )
        .expect("a client config");
    Arc::new(config)
}

/// Tries a full handshake with the foreign certificate and one read;
/// returns whether the server let it get as far as a byte of application data.
fn foreign_handshake(port: u16, config: &Arc<rustls::ClientConfig>) -> bool {
    let Ok(mut tcp) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else { return false };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let Ok(mut conn) = rustls::ClientConnection::new(config.clone(), name) else { return false };
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut b = [0u8; 64];
    matches!(tls.read(&mut b), Ok(n) if n > 0)
}

struct Rng(u64);

impl Rng {
    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *x = self.0 as u8;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: warden-attack PORT[,PORT...] [--waves N] [--per-second R] [--hold SECONDS] [--while-pid PID]";
    let Some(ports) = args.first().map(|p| p.split(',').map(|x| x.parse::<u16>().expect(usage)).collect::<Vec<_>>())
    else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let opt = |name: &str, default: f64| -> f64 {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |v| v.parse().expect(usage))
    };
    let (waves, per_second, hold) = (opt("--waves", 50.0) as usize, opt("--per-second", 0.0), opt("--hold", 1.0));
    let while_pid = opt("--while-pid", 0.0) as u32;
    let foreign = foreign_client();
    let mut rng = Rng(std::process::id() as u64 | 1);
    let mut held: Vec<(u16, TcpStream)> = Vec::new();
    let mut sent = BTreeMap::<&str, usize>::new();
    let mut admitted_foreign = 0;
    let started = Instant::now();
    let mut k = 0usize;
    for wave in 0..waves {
        if while_pid != 0 && !std::path::Path::new(&format!("/proc/{while_pid}")).exists() {
            break;
        }
        if per_second > 0.0 {
            let due = started + Duration::from_secs_f64(wave as f64 / per_second);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let mut next_port = || {
            k += 1;
            ports[k % ports.len()]
        };
        for _ in 0..40 {
            if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, next_port())) {
                let mut junk = [0u8; 64];
                rng.fill(&mut junk);
                let _ = s.write_all(&junk);
                *sent.entry("plaintext").or_default() += 1;
            }
        }
        for i in 0..16 {
            let port = next_port();
            if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                let (what, bytes): (&str, &[u8]) = if i < 10 {
                    // A TLS handshake record header promising 16 KiB, and one byte of it.
                    ("half_open_tls", &[0x16, 0x03, 0x01, 0x40, 0x00, 0x01])
                } else {
                    ("huge_length", &[0xff, 0xff, 0xff, 0x7f])
                };
                let _ = s.write_all(bytes);
                *sent.entry(what).or_default() += 1;
                held.push((port, s));
            }
        }
        for _ in 0..2 {
            admitted_foreign += usize::from(foreign_handshake(next_port(), &foreign));
            *sent.entry("foreign_ca_handshakes").or_default() += 1;
        }
    }
    std::thread::sleep(Duration::from_secs_f64(hold));
    // Closed ones read to EOF or a reset; the ones still held fall silent.
    let mut still_open = BTreeMap::<u16, usize>::new();
    for (port, s) in &mut held {
        let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
        let mut b = [0u8; 256];
        let open = loop {
            match s.read(&mut b) {
                Ok(0) => break false,
                Ok(_) => continue,
                Err(e) => break matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            }
        };
        *still_open.entry(*port).or_default() += usize::from(open);
    }
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "foreign_ca_admitted": admitted_foreign,
            "still_open": still_open,
            "seconds": started.elapsed().as_secs_f64(),
            "held_at_end": held.len(),
        })
    );
}
