//! The job file: plain serde types for the TOML, then a validated [`JobSpec`].
//!
//! Parsing happens in two stages (as cargo does for manifests): [`raw`] mirrors
//! the file one to one, with source spans on every value a later check may
//! need to point at; [`JobSpec::parse`] converts it, checking every bound and
//! every cross-field rule. Every error is a [`SpecError`] that names the line
//! and column and says how to fix the file.
//!
//! The launcher and every agent run this same code: agents receive the job
//! file's text in their bundle and validate it again, so no half-checked
//! structure ever crosses a process boundary.
//!
//! # Layout
//! - `raw.rs`: the serde types, one per table.
//! - This file: [`JobSpec`], parsing and loading, [`SpecError`] and source
//!   spans, the checks every table uses (`int_in`, `path_in`), and the
//!   conversion that calls one function per table, then
//!   `check_across_tables`.
//! - One file per table, each with its validated type(s), its `convert_*`
//!   and its bounds: `job.rs`, `cluster.rs`, `model.rs`, `worker.rs`,
//!   `data.rs`, `optimizer.rs`, `training.rs`, `limits.rs`, `checkpoint.rs`,
//!   `signing.rs`.
//!
//! A table that the model kind requires or refuses (`[worker]`, `[data]`,
//! `[training] steps`), or that needs `[checkpoint]` (`on_failure =
//! "restart"`), is checked in that table's conversion, which takes what it
//! needs of the other table as an argument, so the checks keep the order of
//! the tables and a file with several mistakes reports the same one. Rules that need several finished tables are in
//! `check_across_tables`.
//!
//! Dependencies point one way: training code (`crate::train::model`, `crate::train::data`,
//! the roles) builds on these types, and this module uses nothing of it
//! (the parameter count is [`ModelSpec::num_params`]); it uses only the
//! protocol's types ([`crate::train::optimizer`], [`crate::net::wire`]), the identity
//! roles, and the hostfile and inventory readers.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;

use crate::net::identity::Role;
use crate::train::optimizer::OptimizerSpec;

mod checkpoint;
mod cluster;
mod data;
mod job;
mod limits;
mod model;
mod optimizer;
pub mod raw;
mod signing;
mod training;
mod worker;

pub use checkpoint::CheckpointSpec;
pub use cluster::{Become, ClusterSpec, HostSpec, SameHost};
pub use data::{DataFiles, DataFormat, DataSpec};
pub use limits::LimitsSpec;
pub use model::{InitSpec, ModelKind, ModelSpec};
pub use signing::SigningSpec;
pub use training::{Aggregation, Compression, OnFailure, SuspectRule, SyncMode, TrainingSpec};
pub use worker::WorkerSpec;

/// A job-file error with its location and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The job file as the user named it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is something specific to say.
    pub help: Option<String>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// A validated job.
#[derive(Debug, Clone, Serialize)]
pub struct JobSpec {
    /// Human name of the job (`[job] name`).
    pub name: String,
    /// Training seed from the file, if it names one.
    pub seed: Option<u64>,
    /// Upper bound on the job's lifetime; certificates expire after it.
    pub max_hours: u32,
    /// Hosts and role counts.
    pub cluster: ClusterSpec,
    /// The model to train.
    pub model: ModelSpec,
    /// Where the data is (none for the synthetic benchmark model).
    pub data: Option<DataSpec>,
    /// The optimizer the servers apply: data, never code.
    pub optimizer: OptimizerSpec,
    /// The training loop.
    pub training: TrainingSpec,
    /// Protocol limits.
    pub limits: LimitsSpec,
    /// Encrypted checkpoints, if the job takes them.
    pub checkpoint: Option<CheckpointSpec>,
    /// Initial weights from a signed model directory (`[model] init`).
    pub init: Option<InitSpec>,
    /// Sign the final model (`[signing]`).
    pub signing: Option<SigningSpec>,
    /// The user's own training program (`[worker]`, with `kind = "external"`).
    pub worker: Option<WorkerSpec>,
}

/// Location helper: turns byte spans into [`SpecError`]s.
struct Src<'a> {
    file: &'a str,
    text: &'a str,
}

impl Src<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>, help: impl Into<String>) -> SpecError {
        let (line, col) = line_col(self.text, span.start);
        let help = help.into();
        SpecError {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
            help: (!help.is_empty()).then_some(help),
        }
    }

    /// The value a string key names among `choices`, the first when the key
    /// is absent; any other string is an error at the key, with `help`.
    fn choice<T: Copy>(
        &self,
        key: Option<&toml::Spanned<String>>,
        what: &str,
        choices: &[(&str, T)],
        help: &str,
    ) -> Result<T, SpecError> {
        let Some(key) = key else { return Ok(choices[0].1) };
        match choices.iter().find(|(name, _)| *name == key.get_ref()) {
            Some(&(_, v)) => Ok(v),
            None => Err(self.err(key.span(), format!("unknown {what} `{}`", key.get_ref()), help)),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Adds a "did you mean" to serde's unknown-field and unknown-variant errors.
fn hint_for(message: &str) -> String {
    for prefix in ["unknown field `", "unknown variant `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let Some(end) = rest.find('`') else { break };
            let wrong = &rest[..end];
            let expected: Vec<&str> = rest[end + 1..].split('`').skip(1).step_by(2).collect();
            let best = expected
                .iter()
                .map(|c| (strsim::jaro_winkler(wrong, c), *c))
                .filter(|(score, _)| *score > 0.7)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            return match best {
                Some((_, c)) => format!("did you mean `{c}`?"),
                None if expected.is_empty() => "remove this key".to_string(),
                None => format!("valid keys here: {}", expected.join(", ")),
            };
        }
    }
    if message.starts_with("missing field `") {
        return "add it; configs/local.toml shows every section with its keys".to_string();
    }
    if message.starts_with("invalid type") {
        return "check the value's type: numbers are unquoted, text is in quotes".to_string();
    }
    String::new()
}

impl JobSpec {
    /// Parses and validates a job file. `file` is the name errors show;
    /// relative data paths are resolved against `base_dir`.
    pub fn parse(file: &str, text: &str, base_dir: &Path) -> Result<JobSpec, SpecError> {
        Self::parse_with_hosts(file, text, base_dir, None)
    }

    /// [`JobSpec::parse`], with the hosts of a `hostfile` or `inventory`
    /// already read (by the launcher: agents get them in their bundle, so
    /// every process sees the same hosts and only the launcher resolves
    /// names). Ignored when the job file lists its hosts itself.
    pub fn parse_with_hosts(
        file: &str,
        text: &str,
        base_dir: &Path,
        hosts: Option<&[HostSpec]>,
    ) -> Result<JobSpec, SpecError> {
        let src = Src { file, text };
        let raw: raw::JobFile = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim_end().to_string();
            src.err(span, message.clone(), hint_for(&message))
        })?;
        convert(&src, raw, base_dir, hosts)
    }

    /// Reads and parses a job file from disk.
    pub fn load(path: &Path) -> Result<(JobSpec, String), SpecError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            file: file.clone(),
            line: 1,
            col: 1,
            message: format!("cannot read the job file: {e}"),
            help: Some("check the path; `warden validate --help` shows an example".into()),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        JobSpec::parse(&file, &text, &base).map(|s| (s, text))
    }
}

/// An integer key within `[lo, hi]`, as the type the spec keeps.
fn int_in<T: TryFrom<i64>>(
    src: &Src<'_>,
    v: &Spanned<i64>,
    what: &str,
    lo: i64,
    hi: i64,
    help: &str,
) -> Result<T, SpecError> {
    let x = *v.get_ref();
    if x < lo || x > hi {
        return Err(src.err(v.span(), format!("{what} must be between {lo} and {hi}, not {x}"), help));
    }
    T::try_from(x).map_err(|_| src.err(v.span(), format!("{what} is out of range"), help))
}

/// A path key that is not empty, resolved against the job file's directory.
fn path_in(src: &Src<'_>, base_dir: &Path, p: &Spanned<String>, help: &str) -> Result<PathBuf, SpecError> {
    if p.get_ref().trim().is_empty() {
        return Err(src.err(p.span(), "path is empty", help));
    }
    Ok(base_dir.join(p.get_ref()))
}

/// The second stage: each table in the file's order, then the rules across
/// tables.
fn convert(
    src: &Src<'_>,
    raw: raw::JobFile,
    base_dir: &Path,
    given: Option<&[HostSpec]>,
) -> Result<JobSpec, SpecError> {
    let job::Job { name, seed, max_hours } = job::convert_job(src, &raw.job)?;
    let cluster = cluster::convert_cluster(src, &raw.cluster, base_dir, given)?;
    let model = model::convert_model(src, &raw.model)?;
    let m = raw.model.get_ref();
    let worker = worker::convert_worker(src, raw.worker.as_ref(), m, model.kind, base_dir)?;
    let init = model::convert_init(src, m, base_dir)?;
    let data = data::convert_data(src, raw.data.as_ref(), model.kind, base_dir)?;
    let optimizer = optimizer::convert_optimizer(src, &raw.optimizer)?;
    let workers = cluster.count(Role::Worker);
    let training = training::convert_training(src, &raw.training, model.kind, raw.checkpoint.is_some(), workers)?;
    let limits = limits::convert_limits(src, raw.limits.as_ref())?;
    let checkpoint = raw.checkpoint.as_ref().map(|c| checkpoint::convert_checkpoint(src, c, base_dir)).transpose()?;
    let signing = raw.signing.as_ref().map(|sg| signing::convert_signing(sg, base_dir));
    let spec = JobSpec {
        name,
        seed,
        max_hours,
        cluster,
        model,
        data,
        optimizer,
        training,
        limits,
        checkpoint,
        init,
        signing,
        worker,
    };
    check_across_tables(src, &raw, &spec)?;
    Ok(spec)
}

/// Rules between finished tables: `[checkpoint]` needs a model the servers
/// checkpoint, and `[limits] max_frame_mib` must fit the largest message, a
/// push or pull of one server's shard of the model.
fn check_across_tables(src: &Src<'_>, raw: &raw::JobFile, spec: &JobSpec) -> Result<(), SpecError> {
    if let (Some(c), ModelKind::External) = (&raw.checkpoint, spec.model.kind) {
        return Err(src.err(
            c.span(),
            "[checkpoint] is not available for external models yet (nothing would ask the servers for one)",
            "remove [checkpoint]; save what you need from your program",
        ));
    }
    let shard = spec.model.num_params().div_ceil(spec.cluster.count(Role::Server) as usize);
    let needed = shard * 4 + crate::net::wire::VECTOR_FRAME_OVERHEAD;
    if needed > spec.limits.max_frame_bytes as usize {
        let span = raw
            .limits
            .as_ref()
            .and_then(|l| l.get_ref().max_frame_mib.as_ref().map(|v| v.span()))
            .unwrap_or(raw.model.span());
        return Err(src.err(
            span,
            format!(
                "a server's shard of this model needs frames of {needed} bytes, above max_frame_mib ({} bytes)",
                spec.limits.max_frame_bytes
            ),
            "raise [limits] max_frame_mib, or add servers",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\n", 0), (1, 1));
        assert_eq!(line_col("a\nbc\n", 3), (2, 2));
    }

    #[test]
    fn hint_suggests_closest_key() {
        assert_eq!(hint_for("unknown field `lr8`, expected one of `kind`, `lr`, `momentum`"), "did you mean `lr`?");
        assert_eq!(hint_for("unknown field `zzz`, expected `kind`"), "valid keys here: kind");
    }
}
