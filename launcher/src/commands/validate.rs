//! `warden validate JOB`.

use std::path::Path;

use warden_agent::spec::JobSpec;

use crate::cli::{EXIT_OK, EXIT_USAGE};

/// Validates the job file; prints `error: FILE:LINE:COL: ...` when invalid.
/// A job file that parses is then checked against this machine
/// ([`warden_agent::preflight`]): every problem is printed, not only the
/// first.
pub fn exec(job: &Path) -> u8 {
    match JobSpec::load(job) {
        Ok((spec, _)) => {
            let local = warden_agent::preflight::all_hosts_local(&spec);
            let found = warden_agent::preflight::check(&spec, local);
            for note in &found.notes {
                eprintln!("note: {note}");
            }
            if !found.problems.is_empty() {
                for p in &found.problems {
                    eprintln!("error: {}: {p}", job.display());
                }
                eprintln!(
                    "{}: {} problem(s); the job file parses, but a launch on {} would fail",
                    job.display(),
                    found.problems.len(),
                    if local { "this machine" } else { "its hosts" }
                );
                return EXIT_USAGE;
            }
            let c = &spec.cluster;
            println!(
                "{}: valid: job `{}`, {} host(s), 1 scheduler, {} server(s), {} worker(s)",
                job.display(),
                spec.name,
                c.hosts.len(),
                c.count(warden_agent::identity::Role::Server),
                c.count(warden_agent::identity::Role::Worker)
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
    }
}
