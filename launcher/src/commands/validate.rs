//! `warden validate JOB`.

use std::path::Path;

use warden_agent::job::spec::JobSpec;

use crate::cli::{EXIT_OK, EXIT_USAGE};
use crate::error::CliError;

/// Validates the job file; fails with `FILE:LINE:COL: ...` when invalid.
/// A job file that parses is then checked against this machine
/// ([`warden_agent::job::preflight`]): every problem is reported, not only the
/// first.
pub fn exec(job: &Path) -> Result<u8, CliError> {
    let (spec, _) = JobSpec::load(job).map_err(CliError::usage)?;
    let local = warden_agent::job::preflight::all_hosts_local(&spec);
    let found = warden_agent::job::preflight::check(&spec, local);
    for note in &found.notes {
        eprintln!("note: {note}");
    }
    if !found.problems.is_empty() {
        let count = found.problems.len();
        let problems = found.problems.iter().map(|p| format!("{}: {p}", job.display()).into()).collect();
        return Err(CliError::several(EXIT_USAGE, problems).with_trailer(format!(
            "{}: {count} problem(s); the job file parses, but a launch on {} would fail",
            job.display(),
            if local { "this machine" } else { "its hosts" }
        )));
    }
    let c = &spec.cluster;
    println!(
        "{}: valid: job `{}`, {} host(s), 1 scheduler, {} server(s), {} worker(s)",
        job.display(),
        spec.name,
        c.hosts.len(),
        c.count(warden_agent::net::identity::Role::Server),
        c.count(warden_agent::net::identity::Role::Worker)
    );
    Ok(EXIT_OK)
}
