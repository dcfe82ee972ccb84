//! TLS for `warden serve`: the server certificate (given, or a self-signed
//! one whose fingerprint is printed), client certificates from `[auth]
//! client_ca` when configured, and the handshake with its deadline. There
//! is no plaintext mode.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file (certificate chain or key) cannot be read.
    #[error("{}", .path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate chain and key do not make a server configuration.
    #[error("TLS certificate and key")]
    CertificateAndKey(#[source] rustls::Error),
    /// The self-signed certificate cannot be made.
    #[error(transparent)]
    SelfSigned(#[from] rcgen::Error),
    /// The self-signed certificate's key is unusable.
    #[error("{0}")]
    SelfSignedKey(&'static str),
    /// The self-signed certificate cannot be written for clients.
    #[error("cannot write the certificate to {} (choose another place with --tls-cert-out)", .path.display())]
    CertOut {
        /// Where it was to go.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `[auth] client_ca` cannot be used.
    #[error("[auth] client_ca {}", .path.display())]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::error::BoxError,
    },
}

/// The server's TLS configuration: TLS 1.3 or 1.2, HTTP/1.1, and client
/// certificates from `client_ca` verified when one is given.
pub(super) fn server_config(
    given: Option<&(PathBuf, PathBuf)>,
    listen: SocketAddr,
    client_ca: Option<&Path>,
    cert_out: &Path,
) -> Result<rustls::ServerConfig, TlsError> {
    let (certs, key) = certificate(given, listen, cert_out)?;
    let builder =
        rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca)?),
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(TlsError::CertificateAndKey)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The certificate chain and key from `given` (PEM files), or a self-signed
/// pair for `localhost` and the listening address, whose certificate is
/// written to `cert_out` for clients to trust (`curl --cacert`), with the
/// pin of its public key (`curl --pinnedpubkey`) printed.
fn certificate(
    given: Option<&(PathBuf, PathBuf)>,
    listen: SocketAddr,
    cert_out: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    match given {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::Pem { path: cert.clone(), source })?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem { path: key.clone(), source })?;
            Ok((certs, key))
        }
        None => {
            let names = vec!["localhost".to_string(), listen.ip().to_string()];
            let ck = rcgen::generate_simple_self_signed(names)?;
            let der = ck.cert.der().clone();
            let fp: String = Sha256::digest(&der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
            write_public(cert_out, ck.cert.pem().as_bytes())
                .map_err(|source| TlsError::CertOut { path: cert_out.to_path_buf(), source })?;
            let pin = {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .encode(Sha256::digest(rcgen::PublicKeyData::subject_public_key_info(&ck.signing_key)))
            };
            eprintln!("warden serve: self-signed certificate {}, SHA-256 fingerprint {fp}", cert_out.display());
            eprintln!("  trust it: curl --cacert {} https://localhost:{}/ ...", cert_out.display(), listen.port());
            eprintln!("  or pin its key: curl --pinnedpubkey sha256//{pin} --cacert {} ...", cert_out.display());
            let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(TlsError::SelfSignedKey)?;
            Ok((vec![der], key))
        }
    }
}

/// Writes a public file (mode 0644) whole: aside under a fresh name, then
/// renamed over `path`, so a reader never sees half of it and a link
/// planted at the temporary name is not followed.
fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Verifies client certificates issued by the CA in the PEM file `ca`.
/// Certificates from this CA identify their holders; clients without one
/// may still come with an API key.
fn client_verifier(ca: &Path) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let bad = |e: crate::error::BoxError| TlsError::ClientCa { path: ca.to_path_buf(), source: e };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.into()))? {
        roots.add(c.map_err(|e| bad(e.into()))?).map_err(|e| bad(e.into()))?;
    }
    rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad(e.into()))
}

/// The TLS handshake on `io`, and the holder (subject common name) of the
/// client certificate if one was verified; `None` if the handshake failed
/// or did not complete within `timeout`.
pub(super) async fn handshake<IO: AsyncRead + AsyncWrite + Unpin>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: IO,
    timeout: Duration,
) -> Option<(TlsStream<IO>, Option<Arc<str>>)> {
    let tls = tokio::time::timeout(timeout, acceptor.accept(io)).await.ok()?.ok()?;
    let holder = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|der| {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
        Some(Arc::from(cn))
    });
    Some((tls, holder))
}
