//! The per-job nftables table.
//!
//! One table per job and host (`inet warden_<first 12 hex digits of the job
//! id>`, see [`crate::job::plan::firewall_table`]): the job's ports accept only
//! the job's peer addresses, everything else to those ports is dropped, and
//! other traffic is untouched. It is installed before any listener opens and
//! removed at teardown; tables left by crashed jobs are found by [`list`] and
//! removed by [`remove`]. Driven through the `nft` command (atomic `-f`
//! loads); needs root or CAP_NET_ADMIN.

use std::io::Write;
use std::process::{Command, Stdio};

/// Prefix of every warden table.
pub const PREFIX: &str = "warden_";

/// A firewall operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirewallError {
    /// `nft` is not installed.
    #[error("nft is not installed; install the nftables package (playbooks/node-prep.yml does)")]
    NoNft,
    /// `nft` refused.
    #[error("nft {what} failed: {detail}")]
    Nft {
        /// What was attempted.
        what: String,
        /// nft's message.
        detail: String,
    },
}

/// The `nft` program: the system's, found where Debian and others install
/// it before any PATH lookup (slurmd runs a prolog with a minimal PATH
/// that lacks /usr/sbin, and root is better off not searching PATH at all).
fn nft_program() -> &'static str {
    ["/usr/sbin/nft", "/sbin/nft"].into_iter().find(|p| std::path::Path::new(p).is_file()).unwrap_or("nft")
}

fn nft(args: &[&str], stdin: Option<&str>, what: &str) -> Result<String, FirewallError> {
    let mut child = Command::new(nft_program())
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound { FirewallError::NoNft } else { nft_err(what, e.to_string()) }
        })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).map_err(|e| nft_err(what, e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| nft_err(what, e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(nft_err(what, String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

fn nft_err(what: &str, detail: String) -> FirewallError {
    FirewallError::Nft { what: what.to_string(), detail }
}

fn valid_name(table: &str) -> bool {
    table.starts_with(PREFIX) && table.len() <= 64 && table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Loads a job's ruleset (from the plan) atomically, replacing a table of
/// the same name if one is left over.
pub fn install(table: &str, ruleset: &str) -> Result<(), FirewallError> {
    if !valid_name(table) {
        return Err(nft_err("install", format!("`{table}` is not a warden table name")));
    }
    let _ = remove(table);
    nft(&["-f", "-"], Some(ruleset), &format!("loading table {table}")).map(|_| ())
}

/// Removes a warden table; removing one that does not exist is not an error.
pub fn remove(table: &str) -> Result<(), FirewallError> {
    if !valid_name(table) {
        return Err(nft_err("delete", format!("`{table}` is not a warden table name")));
    }
    if !list()?.iter().any(|t| t == table) {
        return Ok(());
    }
    nft(&["delete", "table", "inet", table], None, &format!("deleting table {table}")).map(|_| ())
}

/// Names of the warden tables on this host.
pub fn list() -> Result<Vec<String>, FirewallError> {
    let json = nft(&["-j", "list", "tables", "inet"], None, "listing tables")?;
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| nft_err("listing tables", e.to_string()))?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["table"]["name"].as_str())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_string)
        .collect())
}

/// The text of an installed table, for inspection.
pub fn show(table: &str) -> Result<String, FirewallError> {
    nft(&["list", "table", "inet", table], None, &format!("listing table {table}"))
}
