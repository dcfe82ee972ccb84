//! The Slurm prolog and epilog: the per-job firewall on clusters where
//! warden's steps run as the submitting user, not root.
//!
//! slurmd runs the prolog as root on every node of an allocation before the
//! job starts (with `PrologFlags=Alloc`) and the epilog after it ends, however
//! it ended. `warden launch` submits with `--comment=warden:ports=A-B` (the
//! job file's `[cluster] ports`); for such a job the prolog installs the
//! table `inet warden_slurm_JOBID`: the ports accept connections only from
//! the allocation's nodes, and on this node only the job's user (or root) may
//! connect to them on those nodes, the same rules the SSH transport's table
//! makes per process. It also leaves a note in [`NOTES`] that the job's
//! (unprivileged) agents read to report the protection. Jobs without the
//! comment are left alone. The admin bounds the ports a job may claim
//! (`--ports` of the prolog), and a job whose ports overlap those of another
//! warden job on the node gets no table, so no job can fence off ports
//! another job uses.
//!
//! What a job supplied never fails the prolog (a failed prolog drains the
//! node): a claim outside the range, too wide or overlapping is refused with
//! a note, and the job's agents report that it has no table. A failure of the
//! node itself (nft, scontrol) fails the prolog, and Slurm drains the node
//! and requeues the job, which so never runs without the firewall it asked
//! for on a node that could not give it.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::host::HostError;

/// What `warden launch` puts before the port range in the job's comment.
pub const COMMENT_PREFIX: &str = "warden:ports=";

/// Where the prolog leaves a note per job (readable by everyone; the agents
/// run as the user).
pub const NOTES: &str = "/run/warden/slurm";

/// Most ports one job may claim.
pub const MAX_PORTS: u32 = 4096;

/// The table of Slurm job `id`.
pub fn table(id: &str) -> String {
    format!("warden_slurm_{id}")
}

/// The comment `warden launch` gives a job with `ports`.
pub fn comment(ports: (u16, u16)) -> String {
    format!("{COMMENT_PREFIX}{}-{}", ports.0, ports.1)
}

/// The port range of a job's comment, if it is a warden job's.
pub fn ports_of(comment: &str) -> Option<(u16, u16)> {
    let (a, b) = comment.trim().strip_prefix(COMMENT_PREFIX)?.split_once('-')?;
    let (a, b) = (a.parse::<u16>().ok()?, b.parse::<u16>().ok()?);
    (a <= b).then_some((a, b))
}

/// Parses the prolog's `--ports A-B`.
pub fn parse_range(text: &str) -> Option<(u16, u16)> {
    let (a, b) = text.split_once('-')?;
    let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
    (a <= b).then_some((a, b))
}

/// What slurmd tells a prolog or epilog about the job.
#[derive(Debug, Clone)]
pub struct JobEnv {
    /// SLURM_JOB_ID (digits).
    pub id: String,
    /// SLURM_JOB_UID.
    pub uid: u32,
    /// SLURM_NODELIST (the prolog's name for the job's nodes).
    pub nodes: String,
    /// SLURM_JOB_COMMENT, if the job has one.
    pub comment: Option<String>,
}

/// Why a prolog or epilog did not do its work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrologError {
    /// A variable slurmd sets is missing or malformed.
    #[error("{0} is missing or malformed: run this as slurmd's Prolog/Epilog")]
    Env(&'static str),
    /// The allocation's nodes could not be listed.
    #[error(transparent)]
    Slurm(#[from] crate::job::slurm::SlurmError),
    /// The table or the note.
    #[error(transparent)]
    Host(#[from] HostError),
}

impl JobEnv {
    /// From the process environment.
    pub fn from_env() -> Result<JobEnv, PrologError> {
        let var = |k: &'static str| std::env::var(k).map_err(|_| PrologError::Env(k));
        let id = var("SLURM_JOB_ID")?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PrologError::Env("SLURM_JOB_ID"));
        }
        let uid = var("SLURM_JOB_UID")?.parse().map_err(|_| PrologError::Env("SLURM_JOB_UID"))?;
        let nodes = var("SLURM_NODELIST").or_else(|_| var("SLURM_JOB_NODELIST"))?;
        let comment = std::env::var("SLURM_JOB_COMMENT").ok().filter(|c| !c.is_empty());
        Ok(JobEnv { id, uid, nodes, comment })
    }
}

/// The prolog: for a warden job (its comment names ports inside `allowed`,
/// not used by another warden job here), installs its table and note;
/// what it did, for slurmd's log.
pub fn prolog(env: &JobEnv, allowed: (u16, u16)) -> Result<String, PrologError> {
    let Some((first, last)) = env.comment.as_deref().and_then(ports_of) else {
        return Ok(format!("job {}: not a warden job, nothing to do", env.id));
    };
    let refused = if first < allowed.0 || last > allowed.1 || u32::from(last - first) >= MAX_PORTS {
        Some(format!(
            "ports {first}-{last} are outside the allowed {}-{} (or more than {MAX_PORTS})",
            allowed.0, allowed.1
        ))
    } else {
        overlapping(&env.id, (first, last)).map(|other| format!("ports {first}-{last} overlap those of job {other}"))
    };
    if let Some(why) = refused {
        std::fs::create_dir_all(NOTES)
            .and_then(|_| std::fs::write(note_path(&env.id), format!("refused: {why}\n")))
            .map_err(|e| PrologError::Host(HostError::Io(e)))?;
        return Ok(format!("job {}: no table: {why}", env.id));
    }
    let peers: Vec<IpAddr> = crate::job::slurm::nodes(&env.nodes)?.into_iter().map(|(_, a)| a).collect();
    let ports: Vec<u16> = (first..=last).collect();
    let all: BTreeSet<u16> = ports.iter().copied().collect();
    let table = table(&env.id);
    let rules = format!(
        "define {} = {}\n{}",
        crate::job::plan::JOB_UID_VAR,
        env.uid,
        crate::job::plan::firewall_ruleset(&table, &ports, &peers, &all)
    );
    crate::host::firewall::install(&table, &rules).map_err(HostError::from)?;
    let note = note_path(&env.id);
    let text = format!("{table} ports {first}-{last} peers {}\n", peers.len());
    let written = std::fs::create_dir_all(NOTES).and_then(|_| std::fs::write(&note, text));
    if let Err(e) = written {
        let _ = crate::host::firewall::remove(&table);
        return Err(PrologError::Host(HostError::Io(e)));
    }
    Ok(format!("job {}: table {table} admits only the job's {} node(s) to ports {first}-{last}", env.id, peers.len()))
}

/// Another warden job's note on this node whose ports overlap `ports`.
fn overlapping(id: &str, ports: (u16, u16)) -> Option<String> {
    let dir = std::fs::read_dir(NOTES).ok()?;
    dir.flatten().find_map(|e| {
        let other = e.file_name().to_string_lossy().into_owned();
        let (a, b) = std::fs::read_to_string(e.path()).ok().and_then(|t| noted_ports(&t))?;
        (other != id && a <= ports.1 && ports.0 <= b).then_some(other)
    })
}

/// The port range a note names, unless the prolog refused the job.
pub fn noted_ports(note: &str) -> Option<(u16, u16)> {
    if note.starts_with("refused") {
        return None;
    }
    note.split_whitespace().skip_while(|w| *w != "ports").nth(1).and_then(parse_range)
}

/// The epilog: removes the job's table and note; nothing for a job that is
/// not a warden job (no comment of one, no note), so that it cannot fail
/// (and drain the node) after every other job.
pub fn epilog(env_id: &str) -> Result<String, PrologError> {
    let warden = std::env::var("SLURM_JOB_COMMENT").ok().is_some_and(|c| ports_of(&c).is_some());
    if !warden && !note_path(env_id).exists() {
        return Ok(format!("job {env_id}: not a warden job, nothing to do"));
    }
    let table = table(env_id);
    crate::host::firewall::remove(&table).map_err(HostError::from)?;
    match std::fs::remove_file(note_path(env_id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(PrologError::Host(HostError::Io(e))),
        _ => {}
    }
    Ok(format!("job {env_id}: table {table} removed (if it was there)"))
}

/// The note of Slurm job `id`.
pub fn note_path(id: &str) -> PathBuf {
    PathBuf::from(NOTES).join(id)
}

/// What the prolog noted for Slurm job `id` on this node, if anything: the
/// agents' (unprivileged) view of the firewall.
pub fn noted(id: &str) -> Option<String> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    std::fs::read_to_string(note_path(id)).ok().map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_warden_comment_names_ports() {
        assert_eq!(ports_of(&comment((29500, 29599))), Some((29500, 29599)));
        assert_eq!(ports_of("warden:ports=2-1"), None);
        assert_eq!(ports_of("warden:ports=1-70000"), None);
        assert_eq!(ports_of("ports=1-2"), None);
        assert_eq!(ports_of("warden:ports=1-2;rm -rf /"), None);
        assert_eq!(parse_range("29000-29999"), Some((29000, 29999)));
    }

    #[test]
    fn a_job_that_is_not_a_warden_job_is_left_alone() {
        let env = JobEnv { id: "7".into(), uid: 1000, nodes: "n1".into(), comment: Some("a run of mine".into()) };
        assert!(prolog(&env, (29000, 29999)).unwrap().contains("not a warden job"));
    }
}
