//! `[checkpoint]`: where and how often servers take encrypted checkpoints,
//! and how many they keep.

use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;

use super::{SpecError, Src, int_in, path_in, raw};

/// `[checkpoint]`: encrypted checkpoints on the servers' hosts.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointSpec {
    /// Root directory on each server's host (absolute, or relative to the job file).
    pub dir: PathBuf,
    /// Take one every this many training steps.
    pub every_steps: Option<u64>,
    /// Take one when this many seconds passed since the last.
    pub every_seconds: Option<u64>,
    /// Complete checkpoints kept while the job runs.
    pub keep_last: usize,
    /// Complete checkpoints kept once the job ended.
    pub keep_last_after_job: usize,
    /// Key file on the launcher's host (mode 0600); without it a fresh key
    /// per job, which cannot be resumed across launches.
    pub key_file: Option<PathBuf>,
}

/// Checks `[checkpoint]`: a directory, at least one of the two periods, and
/// no more checkpoints kept after the job than during it.
pub(super) fn convert_checkpoint(
    src: &Src<'_>,
    raw_ck: &Spanned<raw::Checkpoint>,
    base_dir: &Path,
) -> Result<CheckpointSpec, SpecError> {
    let c = raw_ck.get_ref();
    let dir = match &c.dir {
        Some(d) => path_in(
            src,
            base_dir,
            d,
            "name a directory on the servers' hosts, such as \"/var/lib/warden/checkpoints\"",
        )?,
        None => {
            return Err(src.err(
                raw_ck.span(),
                "[checkpoint] needs dir: where the servers keep their encrypted checkpoints",
                "add for example dir = \"/var/lib/warden/checkpoints\"",
            ));
        }
    };
    let every_steps =
        c.every_steps.as_ref().map(|v| int_in(src, v, "every_steps", 1, 1_000_000_000, "such as 500")).transpose()?;
    let every_seconds = c
        .every_seconds
        .as_ref()
        .map(|v| int_in(src, v, "every_seconds", 1, 10_000_000, "such as 600 (ten minutes)"))
        .transpose()?;
    if every_steps.is_none() && every_seconds.is_none() {
        return Err(src.err(
            raw_ck.span(),
            "[checkpoint] needs every_steps, every_seconds or both: when to take a checkpoint",
            "add for example every_steps = 500",
        ));
    }
    let keep_last =
        c.keep_last.as_ref().map(|v| int_in(src, v, "keep_last", 1, 1000, "such as 3")).transpose()?.unwrap_or(3);
    let keep_last_after_job = match &c.keep_last_after_job {
        Some(v) => int_in(src, v, "keep_last_after_job", 0, keep_last as i64, "at most keep_last; 0 deletes them all")?,
        None => 1.min(keep_last),
    };
    let key_file = c
        .key_file
        .as_ref()
        .map(|k| path_in(src, base_dir, k, "name the key file, made by `warden checkpoint keygen`"))
        .transpose()?;
    Ok(CheckpointSpec { dir, every_steps, every_seconds, keep_last, keep_last_after_job, key_file })
}
