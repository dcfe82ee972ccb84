//! `warden firewall list|clean`: the job tables on this host, and removing
//! those a crashed job left behind (with the job uids it had leased).

use crate::cli::{EXIT_FAILED, EXIT_OK};
use crate::error::{BoxError, CliError};

/// Prints the warden tables on this host.
pub fn exec_list() -> Result<u8, CliError> {
    let tables = warden_agent::host::firewall::list().map_err(CliError::failed)?;
    if tables.is_empty() {
        println!("no warden firewall tables on this host");
    }
    for t in tables {
        println!("inet {t}");
    }
    Ok(EXIT_OK)
}

/// Removes `table`, or every warden table. A table that cannot be removed
/// does not keep the others.
pub fn exec_clean(table: Option<&str>) -> Result<u8, CliError> {
    let tables = match table {
        Some(t) => vec![t.to_string()],
        None => warden_agent::host::firewall::list().map_err(CliError::failed)?,
    };
    let mut errors: Vec<BoxError> = Vec::new();
    for t in &tables {
        match warden_agent::host::firewall::remove(t) {
            Ok(()) => println!("removed inet {t}"),
            Err(e) => errors.push(e.into()),
        }
    }
    if tables.is_empty() {
        println!("no warden firewall tables on this host");
    }
    // A job uid whose table is gone and which runs nothing is free again.
    if warden_agent::host::harden::started_as_root() {
        let live = warden_agent::host::firewall::list().unwrap_or_default();
        match warden_agent::host::jobuid::release_stale(&live) {
            Ok(uids) if !uids.is_empty() => println!("released the job uid(s) {uids:?} of ended jobs"),
            Ok(_) => {}
            Err(e) => errors.push(e.into()),
        }
    }
    match errors.is_empty() {
        true => Ok(EXIT_OK),
        false => Err(CliError::several(EXIT_FAILED, errors)),
    }
}
