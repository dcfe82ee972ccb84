//! The per-job certificate authority and node keys.
//!
//! The launcher makes a fresh CA for every job ([`JobCa`]); its key never
//! leaves the launcher's memory. Every agent process makes its own key
//! ([`NodeKey`]) and sends only a CSR. The CA signs a CSR by building the
//! certificate from scratch: the CSR contributes its public key and nothing
//! else, so a CSR that asks to be a CA, for other names or for a long life
//! gets none of it.
//!
//! Both keys are cleared from memory when dropped: the PKCS#8 copy rcgen
//! keeps by a wrapper that clears it on drop, the key inside aws-lc by aws-lc itself
//! (its allocator cleanses every block it frees).

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SignatureAlgorithm,
    SigningKey,
};
use time::OffsetDateTime;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::net::identity::{Identity, JobId};

/// A PKI error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Key or certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    /// The CSR did not parse or its signature did not verify.
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(#[source] rcgen::Error),
    /// The identity is not valid as a certificate name.
    #[error("identity {0} cannot be written into a certificate")]
    BadIdentity(String),
}

/// How far back a certificate's validity starts, for clocks that differ a little.
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(300);

/// A fresh key pair whose PKCS#8 copy is cleared when it is dropped.
struct SecretKeyPair(KeyPair);

impl SecretKeyPair {
    /// A fresh ECDSA P-256 key from the OS CSPRNG.
    fn generate() -> Result<SecretKeyPair, PkiError> {
        KeyPair::generate().map(SecretKeyPair).map_err(PkiError::Generate)
    }

    /// The private key in PKCS#8 DER, in a buffer cleared when dropped.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.0.serialize_der())
    }
}

impl Drop for SecretKeyPair {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for SecretKeyPair {}

impl PublicKeyData for SecretKeyPair {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl SigningKey for SecretKeyPair {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// A job's certificate authority (held only by the launcher); its key is
/// cleared from memory when it is dropped.
pub struct JobCa {
    job: JobId,
    issuer: Issuer<'static, SecretKeyPair>,
    cert_pem: String,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for JobCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCa").field("job", &self.job).field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

impl JobCa {
    /// A fresh CA for `job`, valid for `lifetime` (plus the clock tolerance before now).
    pub fn new(job: &JobId, lifetime: Duration) -> Result<JobCa, PkiError> {
        let key = SecretKeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("warden job CA {job}"));
        params.distinguished_name = dn;
        // pathlen 0: this CA signs leaf certificates only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - CLOCK_TOLERANCE;
        params.not_after = now + lifetime;
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
        let not_after = params.not_after;
        Ok(JobCa { job: job.clone(), issuer: Issuer::new(params, key), cert_pem: cert.pem(), not_after })
    }

    /// The CA certificate every node trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The job this CA serves.
    pub fn job(&self) -> &JobId {
        &self.job
    }

    /// Signs a node's CSR for `who`, valid from now (less the clock tolerance)
    /// until the CA expires. `ip` becomes an IP SAN so peers can check the
    /// address they dialled.
    pub fn sign_csr(&self, csr_pem: &str, who: &Identity, ip: Option<IpAddr>) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.sign_csr_valid(csr_pem, who, ip, now - CLOCK_TOLERANCE, self.not_after)
    }

    /// [`JobCa::sign_csr`] with an explicit validity window (clamped to the
    /// CA's own); tests use it to make expired certificates.
    pub fn sign_csr_valid(
        &self,
        csr_pem: &str,
        who: &Identity,
        ip: Option<IpAddr>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String, PkiError> {
        if who.job != self.job {
            return Err(PkiError::BadIdentity(format!("{} (belongs to another job)", who.uri())));
        }
        // Parsing verifies the CSR's self-signature (proof of key possession).
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        // Everything below is decided here; nothing is taken from csr.params.
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, who.uri());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let uri = who.uri().try_into().map_err(|_| PkiError::BadIdentity(who.uri()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        if let Some(ip) = ip {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        params.not_before = not_before;
        params.not_after = not_after.min(self.not_after);
        params.serial_number = Some(serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer).map_err(PkiError::Generate)?;
        Ok(cert.pem())
    }
}

fn serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = crate::secure_random::bytes();
    bytes[0] &= 0x7f; // positive
    rcgen::SerialNumber::from_slice(&bytes)
}

impl ZeroizeOnDrop for JobCa {}

/// A node's private key, generated where it is used; cleared from memory
/// when it is dropped.
pub struct NodeKey {
    key: SecretKeyPair,
}

impl ZeroizeOnDrop for NodeKey {}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

impl NodeKey {
    /// A fresh ECDSA P-256 key from the OS CSPRNG.
    pub fn generate() -> Result<NodeKey, PkiError> {
        Ok(NodeKey { key: SecretKeyPair::generate()? })
    }

    /// A CSR carrying only the public key and the identity asked for.
    pub fn csr_pem(&self, who: &Identity) -> Result<String, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, who.uri());
        params.distinguished_name = dn;
        let csr = params.serialize_request(&self.key).map_err(PkiError::Generate)?;
        csr.pem().map_err(PkiError::Generate)
    }

    /// The key in PKCS#8 DER, for rustls, in a buffer cleared when dropped.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        self.key.pkcs8_der()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::identity::Role;

    #[test]
    fn private_keys_are_cleared_when_dropped() {
        fn cleared_on_drop<T: ZeroizeOnDrop>() {}
        cleared_on_drop::<JobCa>();
        cleared_on_drop::<NodeKey>();
        cleared_on_drop::<SecretKeyPair>();
        // What the drop does to rcgen's PKCS#8 copy of the key.
        let mut key = SecretKeyPair::generate().unwrap();
        assert!(key.pkcs8_der().iter().any(|b| *b != 0));
        key.0.zeroize();
        assert!(key.pkcs8_der().is_empty());
    }

    #[test]
    fn csr_wishes_are_ignored() {
        let job = JobId::generate();
        let ca = JobCa::new(&job, Duration::from_secs(3600)).unwrap();
        // A CSR that asks to be a CA, for a DNS name, valid to 4096.
        let key = KeyPair::generate().unwrap();
        let mut greedy = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        greedy.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        greedy.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let csr = greedy.serialize_request(&key).unwrap().pem().unwrap();
        let who = Identity { job: job.clone(), role: Role::Worker, rank: 0 };
        let pem = ca.sign_csr(&csr, &who, None).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec![format!("URI({})", who.uri())]);
        assert!(
            cert.validity().not_after.timestamp()
                <= (OffsetDateTime::now_utc() + Duration::from_secs(3700)).unix_timestamp()
        );
        // A CSR for another job is refused outright.
        let other = Identity { job: JobId::generate(), role: Role::Worker, rank: 0 };
        assert!(ca.sign_csr(&csr, &other, None).is_err());
        // A CSR whose signature does not verify is refused.
        let mut tampered = csr.clone().into_bytes();
        let mid = tampered.len() / 2;
        tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
        assert!(ca.sign_csr(std::str::from_utf8(&tampered).unwrap(), &who, None).is_err());
    }
}
