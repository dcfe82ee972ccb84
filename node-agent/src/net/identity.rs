//! Who a process is: job, role and rank, as written in its certificate's URI
//! SAN (`warden://JOBID/worker/3`), and the job id itself.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A role name, job id or identity URI that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Not one of the three roles.
    #[error("unknown role `{0}` (expected scheduler, server or worker)")]
    UnknownRole(String),
    /// Not 32 lower-case hex digits.
    #[error("`{0}` is not a job id (32 lower-case hex digits)")]
    BadJobId(String),
    /// A URI of another scheme.
    #[error("`{0}` is not a warden identity")]
    NotWarden(String),
    /// A warden URI without exactly job, role and rank.
    #[error("`{0}` is not of the form warden://JOB/ROLE/RANK")]
    BadForm(String),
    /// A rank that is not a number in its one spelling.
    #[error("`{0}` has a bad rank")]
    BadRank(String),
}

/// The three roles of a parameter-server job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Rendezvous, barriers, liveness; the only sender of optimizer specs.
    Scheduler,
    /// Holds a shard of the parameters and applies the optimizer.
    Server,
    /// Reads data, computes gradients, pushes and pulls.
    Worker,
}

impl Role {
    /// Lower-case name as used in URIs, logs and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Scheduler => "scheduler",
            Role::Server => "server",
            Role::Worker => "worker",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "scheduler" => Ok(Role::Scheduler),
            "server" => Ok(Role::Server),
            "worker" => Ok(Role::Worker),
            _ => Err(IdentityError::UnknownRole(s.to_string())),
        }
    }
}

/// A job id: 128 bits from the OS CSPRNG, as 32 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// A fresh id from the operating system's CSPRNG.
    pub fn generate() -> JobId {
        let bytes: [u8; 16] = crate::secure_random::bytes();
        JobId(crate::hex::encode(&bytes))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(JobId(s))
        } else {
            Err(IdentityError::BadJobId(s))
        }
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One process's identity within one job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// The job it belongs to.
    pub job: JobId,
    /// Its role.
    pub role: Role,
    /// Its rank within the role, from 0.
    pub rank: u32,
}

const SCHEME: &str = "warden://";

impl Identity {
    /// The URI written into the certificate.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}/{}", self.job, self.role, self.rank)
    }

    /// Parses a URI SAN; anything but the exact form is an error.
    pub fn from_uri(uri: &str) -> Result<Identity, IdentityError> {
        let rest = uri.strip_prefix(SCHEME).ok_or_else(|| IdentityError::NotWarden(uri.to_string()))?;
        let mut parts = rest.split('/');
        let (Some(job), Some(role), Some(rank), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(IdentityError::BadForm(uri.to_string()));
        };
        // Digits only, no sign and no leading zeros: one identity, one spelling.
        let canonical =
            !rank.is_empty() && rank.bytes().all(|b| b.is_ascii_digit()) && (rank == "0" || !rank.starts_with('0'));
        let rank: u32 =
            rank.parse().ok().filter(|_| canonical).ok_or_else(|| IdentityError::BadRank(uri.to_string()))?;
        Ok(Identity { job: JobId::try_from(job.to_string())?, role: role.parse()?, rank })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.role, self.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips_and_rejects_junk() {
        let id = Identity { job: JobId::generate(), role: Role::Worker, rank: 3 };
        assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        let job = id.job.as_str();
        for bad in [
            format!("warden://{job}/worker"),
            format!("warden://{job}/worker/3/x"),
            format!("warden://{job}/admin/0"),
            format!("warden://{job}/worker/+3"),
            format!("https://{job}/worker/3"),
            "warden://XYZ/worker/3".to_string(),
        ] {
            assert!(Identity::from_uri(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_ids_are_random() {
        assert_ne!(JobId::generate(), JobId::generate());
    }
}
