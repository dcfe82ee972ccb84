//! `warden firewall list|clean`: the job tables on this host, and removing
//! those a crashed job left behind (with the job uids it had leased).

use crate::cli::{EXIT_FAILED, EXIT_OK};

/// Prints the warden tables on this host.
pub fn exec_list() -> u8 {
    match warden_agent::firewall::list() {
        Ok(tables) if tables.is_empty() => {
            println!("no warden firewall tables on this host");
            EXIT_OK
        }
        Ok(tables) => {
            for t in tables {
                println!("inet {t}");
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
    }
}

/// Removes `table`, or every warden table.
pub fn exec_clean(table: Option<&str>) -> u8 {
    let tables = match table {
        Some(t) => vec![t.to_string()],
        None => match warden_agent::firewall::list() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_FAILED;
            }
        },
    };
    let mut code = EXIT_OK;
    for t in &tables {
        match warden_agent::firewall::remove(t) {
            Ok(()) => println!("removed inet {t}"),
            Err(e) => {
                eprintln!("error: {e}");
                code = EXIT_FAILED;
            }
        }
    }
    if tables.is_empty() {
        println!("no warden firewall tables on this host");
    }
    // A job uid whose table is gone and which runs nothing is free again.
    if warden_agent::harden::started_as_root() {
        let live = warden_agent::firewall::list().unwrap_or_default();
        match warden_agent::jobuid::release_stale(&live) {
            Ok(uids) if !uids.is_empty() => println!("released the job uid(s) {uids:?} of ended jobs"),
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: {e}");
                code = EXIT_FAILED;
            }
        }
    }
    code
}
