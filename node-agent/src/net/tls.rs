//! Mutual TLS 1.3 for every connection of a job, and nothing else.
//!
//! There is no plaintext path and no way to turn client certificates off:
//! [`server_config`] and [`client_config`] are the only constructors, and
//! both wrap webpki's verifiers in ones that also authorize the peer's
//! identity (job, role, rank from the URI SAN). webpki matches only DNS and
//! IP names, so a wrong role must be refused by us, inside the handshake,
//! before any application byte is read.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::net::identity::{Identity, JobId, Role};
use zeroize::Zeroizing;

/// A TLS setup error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM input did not parse.
    #[error("bad {what}: {detail}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
    /// The verifier could not be built.
    #[error("TLS verifier: {0}")]
    Verifier(String),
    /// This process's own certificate names no identity.
    #[error("bad certificate: {0}")]
    OwnIdentity(#[source] CertIdentityError),
}

/// Why a certificate names no warden identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertIdentityError {
    /// The peer sent no certificate at all.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// Not DER X.509.
    #[error("unparseable certificate: {0}")]
    Unparseable(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The subjectAltName extension does not parse.
    #[error("bad subjectAltName: {0}")]
    BadSan(#[source] x509_parser::error::X509Error),
    /// No subjectAltName extension.
    #[error("certificate has no subjectAltName")]
    NoSan,
    /// No URI among the alternative names.
    #[error("certificate has no warden URI")]
    NoUri,
    /// More than one URI: which one is the identity would be a guess.
    #[error("certificate has more than one URI")]
    SeveralUris,
    /// The URI is not a warden identity.
    #[error(transparent)]
    Identity(#[from] crate::net::identity::IdentityError),
}

/// The one crypto provider of the tree (aws-lc-rs), chosen explicitly so a
/// second provider in the graph can never make rustls guess.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The provider of the job's own connections: [`provider`] limited to the
/// TLS 1.3 AES-GCM suites, the ones [`crate::net::record`] seals and opens
/// (with AES instructions, the fastest everywhere warden runs).
fn record_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(p)
}

/// A process's credentials: its identity, certificate, key and the job CA.
///
/// The key is held only as aws-lc's signing key, which aws-lc clears when
/// it is freed; no copy of its PKCS#8 bytes outlives [`TlsIdentity::new`].
#[derive(Clone)]
pub struct TlsIdentity {
    /// Who this process is.
    pub me: Identity,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").field("me", &self.me).finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// From PEM certificate and CA, and a PKCS#8 DER key (cleared when this returns).
    pub fn new(
        me: Identity,
        cert_pem: &str,
        key_pkcs8: impl Into<Zeroizing<Vec<u8>>>,
        ca_pem: &str,
    ) -> Result<TlsIdentity, TlsError> {
        let key_pkcs8 = key_pkcs8.into();
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| TlsError::Pem { what: "certificate", detail: e.to_string() })?;
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| TlsError::Pem { what: "CA certificate", detail: e.to_string() })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca).map_err(TlsError::Config)?;
        // Our own certificate must name us: refuse to start with someone else's.
        let named = identity_of_cert(&cert).map_err(TlsError::OwnIdentity)?;
        if named != me {
            return Err(TlsError::Pem {
                what: "certificate",
                detail: format!("it names {}, not {}", named.uri(), me.uri()),
            });
        }
        // Borrowed, so rustls never owns (and never frees uncleared) a copy.
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&key_pkcs8[..]));
        let certified = CertifiedKey::new(vec![cert], rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)?);
        certified.keys_match()?;
        Ok(TlsIdentity { me, certified: Arc::new(certified), roots: Arc::new(roots) })
    }

    fn cert_and_key(&self) -> Arc<SingleCertAndKey> {
        Arc::new(SingleCertAndKey::from(self.certified.clone()))
    }
}

/// Reads the warden identity from a certificate's URI SAN (exactly one).
pub fn identity_of_cert(der: &CertificateDer<'_>) -> Result<Identity, CertIdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(CertIdentityError::Unparseable)?;
    let san = cert.subject_alternative_name().map_err(CertIdentityError::BadSan)?.ok_or(CertIdentityError::NoSan)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(u), None) => Ok(Identity::from_uri(u)?),
        (None, _) => Err(CertIdentityError::NoUri),
        (Some(_), Some(_)) => Err(CertIdentityError::SeveralUris),
    }
}

fn refuse(why: impl Into<AuthzError>) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(why.into()))))
}

/// Why an otherwise valid certificate was not accepted here.
#[derive(Debug, thiserror::Error)]
enum AuthzError {
    /// It names no identity.
    #[error(transparent)]
    NoIdentity(#[from] CertIdentityError),
    /// A process of another job.
    #[error("peer {0} belongs to another job")]
    OtherJob(String),
    /// A role this listener does not admit.
    #[error("a {0} may not connect here")]
    RoleRefused(Role),
    /// A server other than the one dialled.
    #[error("expected {expected} but the peer is {found}")]
    NotExpected {
        /// The URI dialled.
        expected: String,
        /// The URI the certificate names.
        found: String,
    },
}

/// Accepts client certificates of this job's CA whose identity has one of `accept` roles.
#[derive(Debug)]
struct RoleClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    job: JobId,
    accept: Vec<Role>,
}

impl ClientCertVerifier for RoleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_of_cert(end_entity).map_err(refuse)?;
        if id.job != self.job {
            return Err(refuse(AuthzError::OtherJob(id.uri())));
        }
        if !self.accept.contains(&id.role) {
            return Err(refuse(AuthzError::RoleRefused(id.role)));
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts exactly one server identity, at the address dialled.
#[derive(Debug)]
struct ExactServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expect: Identity,
}

impl ServerCertVerifier for ExactServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let id = identity_of_cert(end_entity).map_err(refuse)?;
        if id != self.expect {
            return Err(refuse(AuthzError::NotExpected { expected: self.expect.uri(), found: id.uri() }));
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server side: TLS 1.3 only, client certificate mandatory and of a role in `accept`.
pub fn server_config(id: &TlsIdentity, accept: &[Role]) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(RoleClientVerifier { inner, job: id.me.job.clone(), accept: accept.to_vec() });
    let mut config = ServerConfig::builder_with_provider(record_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(id.cert_and_key());
    // The record layer after the handshake is warden's own (crate::net::record).
    config.enable_secret_extraction = true;
    // Nothing resumes sessions: no tickets to send, none to store.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side: TLS 1.3 only, presents our certificate, accepts only `expect`.
pub fn client_config(id: &TlsIdentity, expect: Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(id.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(ExactServerVerifier { inner, expect });
    let mut config = ClientConfig::builder_with_provider(record_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // only to install our verifier, which wraps webpki's own
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(id.cert_and_key());
    config.enable_secret_extraction = true;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The name a client checks the server's certificate against.
pub fn server_name(addr: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

/// The authenticated identity of the peer of an established connection.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<Identity, CertIdentityError> {
    let cert = chain.first().ok_or(CertIdentityError::NoCertificate)?;
    identity_of_cert(cert)
}
