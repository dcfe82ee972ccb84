//! `warden validate JOB`.

use std::path::Path;

use warden_agent::spec::JobSpec;

use crate::cli::{EXIT_OK, EXIT_USAGE};

/// Validates the job file; prints `error: FILE:LINE:COL: ...` when invalid.
pub fn exec(job: &Path) -> u8 {
    match JobSpec::load(job) {
        Ok((spec, _)) => {
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
