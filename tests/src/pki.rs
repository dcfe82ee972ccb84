//! Certificates for tests: [`TestPki`], a fresh job CA that issues
//! credentials for any identity, valid or expired.

use std::time::Duration;

use warden_agent::net::identity::{Identity, JobId, Role};
use warden_agent::net::pki::{JobCa, NodeKey};
use warden_agent::net::tls::TlsIdentity;

/// A fresh job CA plus helpers to issue certificates.
pub struct TestPki {
    pub job: JobId,
    pub ca: JobCa,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    pub fn new() -> TestPki {
        let job = JobId::generate();
        let ca = JobCa::new(&job, Duration::from_secs(3600)).expect("CA");
        TestPki { job, ca }
    }

    pub fn id(&self, role: Role, rank: u32) -> Identity {
        Identity { job: self.job.clone(), role, rank }
    }

    /// Credentials for `role[rank]` with an IP SAN of 127.0.0.1.
    pub fn issue(&self, role: Role, rank: u32) -> TlsIdentity {
        let me = self.id(role, rank);
        let key = NodeKey::generate().unwrap();
        let cert = self.ca.sign_csr(&key.csr_pem(&me).unwrap(), &me, Some("127.0.0.1".parse().unwrap())).unwrap();
        TlsIdentity::new(me, &cert, key.pkcs8_der(), self.ca.cert_pem()).unwrap()
    }

    /// (cert PEM, key PKCS#8 DER) valid only in the past.
    pub fn issue_expired(&self, role: Role, rank: u32) -> (String, Vec<u8>) {
        let me = self.id(role, rank);
        let key = NodeKey::generate().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let cert = self
            .ca
            .sign_csr_valid(
                &key.csr_pem(&me).unwrap(),
                &me,
                Some("127.0.0.1".parse().unwrap()),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        (cert, key.pkcs8_der().to_vec())
    }
}
