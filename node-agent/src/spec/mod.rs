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

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::identity::Role;
use crate::optimizer::{OptimizerKind, OptimizerSpec, Schedule};

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

pub mod raw;

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

/// `[worker]`: the program each worker rank runs instead of the built-in
/// training loop; it talks to the parameter servers through the agent's
/// local KV socket (`docs/byo.md`).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerSpec {
    /// Program and arguments (no shell).
    pub command: Vec<String>,
    /// Working directory (default: the job file's directory).
    pub workdir: PathBuf,
    /// Extra environment variables.
    pub env: std::collections::BTreeMap<String, String>,
}

/// `[model] init` and `trusted_keys`: start from signed weights.
#[derive(Debug, Clone, Serialize)]
pub struct InitSpec {
    /// The model directory (model.safetensors and model.sig), on the servers' hosts.
    pub dir: PathBuf,
    /// Public keys (PEM) whose signature is accepted.
    pub trusted_keys: Vec<PathBuf>,
}

/// `[signing]`: how `launch` signs the final model.
#[derive(Debug, Clone, Serialize)]
pub struct SigningSpec {
    /// Private key (PEM) on the launcher's host.
    pub key: PathBuf,
    /// Environment variable holding the key's passphrase, if it has one.
    pub passphrase_env: Option<String>,
}

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

/// `[cluster]`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSpec {
    /// The hostfile or inventory the hosts came from, if not the job file.
    pub hosts_from: Option<PathBuf>,
    /// The account whose primary group training runs with (and, without
    /// root, whose name the warning gives).
    pub user: String,
    /// The range of uids leased to jobs, one per job and host
    /// ([`crate::jobuid`]).
    pub uids: (u32, u32),
    /// First port of the job's range.
    pub port_start: u16,
    /// Last port of the job's range (inclusive).
    pub port_end: u16,
    /// Scheduler port, if pinned.
    pub scheduler_port: Option<u16>,
    /// The hosts, in file order.
    pub hosts: Vec<HostSpec>,
    /// An ssh_config file to use instead of the user's (`ssh -F`).
    pub ssh_config: Option<PathBuf>,
    /// Where the agent binary and job directories live on the hosts.
    pub remote_dir: PathBuf,
    /// How remote commands become root.
    pub become_: Become,
}

/// `[cluster] become`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Become {
    /// `sudo -n` when the SSH user is not root.
    Auto,
    /// Always `sudo -n`.
    Sudo,
    /// Never: the SSH user runs the agent as itself.
    None,
}

/// One `[[cluster.hosts]]` entry (or a host of a hostfile or inventory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HostSpec {
    /// Name used in logs and plans.
    pub name: String,
    /// Address peers reach it at.
    pub address: IpAddr,
    /// SSH destination (`user@host`, a `~/.ssh/config` alias, ...); default: the address.
    pub ssh: String,
    /// 0 or 1.
    pub scheduler: u32,
    /// Server processes on this host.
    pub servers: u32,
    /// Worker processes on this host.
    pub workers: u32,
    /// SSH private key for this host (an inventory's `ansible_ssh_private_key_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
}

impl ClusterSpec {
    /// Total processes of a role.
    pub fn count(&self, role: Role) -> u32 {
        self.hosts
            .iter()
            .map(|h| match role {
                Role::Scheduler => h.scheduler,
                Role::Server => h.servers,
                Role::Worker => h.workers,
            })
            .sum()
    }
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    /// Which model.
    pub kind: ModelKind,
    /// Input features.
    pub inputs: usize,
    /// Output classes.
    pub classes: usize,
    /// Hidden layer widths (empty for softmax regression).
    pub hidden: Vec<usize>,
    /// Dropout probability after each hidden layer, in training only.
    pub dropout: f32,
    /// Parameters of the synthetic model (0 for the others).
    pub params: usize,
    /// The external model's named tensors and shapes, in name order.
    pub tensors: Vec<(String, Vec<usize>)>,
}

impl ModelSpec {
    /// A multilayer perceptron without dropout (softmax regression when
    /// `hidden` is empty).
    pub fn mlp(inputs: usize, hidden: Vec<usize>, classes: usize) -> ModelSpec {
        let kind = if hidden.is_empty() { ModelKind::Softmax } else { ModelKind::Mlp };
        ModelSpec { kind, inputs, classes, hidden, dropout: 0.0, params: 0, tensors: Vec::new() }
    }

    /// Layer widths from input to output.
    pub fn widths(&self) -> Vec<usize> {
        std::iter::once(self.inputs).chain(self.hidden.iter().copied()).chain(std::iter::once(self.classes)).collect()
    }

    /// Number of parameters: the floats servers hold and workers push and pull.
    pub fn num_params(&self) -> usize {
        match self.kind {
            ModelKind::Synthetic => return self.params,
            ModelKind::External => return self.tensors.iter().map(|(_, shape)| shape.iter().product::<usize>()).sum(),
            ModelKind::Softmax | ModelKind::Mlp => {}
        }
        self.widths().windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }
}

/// Models warden can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Multinomial logistic regression.
    Softmax,
    /// Multilayer perceptron: ReLU hidden layers, softmax output.
    Mlp,
    /// No model and no data: `params` floats pushed and pulled every step,
    /// for measuring the parameter server (`warden bench ps`).
    Synthetic,
    /// The user's own model: named tensors that the user's program
    /// (`[worker] command`) pushes and pulls through the local KV socket.
    External,
}

/// `[data]`, with paths resolved against the job file's directory.
#[derive(Debug, Clone, Serialize)]
pub struct DataSpec {
    /// File format.
    pub format: DataFormat,
    /// Training data.
    pub train: DataFiles,
    /// Test data; without it, `test_fraction` of the training set is held out.
    pub test: Option<DataFiles>,
    /// Share of the training set held out when no test files are given.
    pub test_fraction: f32,
    /// CSV: the first line is a header.
    pub header: bool,
    /// Factor applied to every feature (IDX: 1/255 by default).
    pub scale: f32,
}

/// Where one split's data is.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum DataFiles {
    /// IDX images and labels files.
    Idx {
        /// Images.
        images: PathBuf,
        /// Labels.
        labels: PathBuf,
    },
    /// One CSV or LIBSVM file.
    File(PathBuf),
}

impl DataFiles {
    /// Every file named, with the job-file key it came from.
    pub fn files(&self, split: &str) -> Vec<(String, PathBuf)> {
        match self {
            DataFiles::Idx { images, labels } => {
                vec![(format!("{split}_images"), images.clone()), (format!("{split}_labels"), labels.clone())]
            }
            DataFiles::File(p) => vec![(split.to_string(), p.clone())],
        }
    }
}

/// Data formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// MNIST's IDX, raw or gzip.
    Idx,
    /// Comma-separated: label first, then the features.
    Csv,
    /// LIBSVM / SVMlight: `label index:value ...`, indices from 1.
    Libsvm,
}

/// `[training]`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingSpec {
    /// Passes over the data.
    pub epochs: u32,
    /// Samples per worker step.
    pub batch_size: usize,
    /// Sync or async updates.
    pub mode: SyncMode,
    /// Steps per epoch of the synthetic model (0 otherwise: set by the data).
    pub synthetic_steps: usize,
    /// Wire encoding of pushed gradients.
    pub compression: Compression,
    /// Seconds of silence after which a process (or the scheduler) is declared dead.
    pub heartbeat_timeout_s: u64,
    /// What the launcher does when a process fails.
    pub on_failure: OnFailure,
}

/// `[training] on_failure`: what a process failure does to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop the whole job and report who failed and why (the default).
    Fail,
    /// Stop every process, then start the job again from the newest valid
    /// checkpoint, at most `max_restarts` times.
    Restart {
        /// Restarts allowed over the whole run.
        max_restarts: u32,
    },
}

impl OnFailure {
    /// Restarts allowed (0 with `fail`).
    pub fn max_restarts(self) -> u32 {
        match self {
            OnFailure::Fail => 0,
            OnFailure::Restart { max_restarts } => max_restarts,
        }
    }
}

/// `[training] compression`: how workers encode gradients on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Compression {
    /// The encoding.
    pub encoding: crate::wire::Encoding,
    /// 2-bit only: the magnitude sent.
    pub threshold: f32,
}

/// How servers combine pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Every step waits for every worker's gradient (MXNet `dist_sync`).
    Sync,
    /// Each push is applied on arrival (MXNet `dist_async`).
    Async,
}

/// `[limits]`: protocol bounds that protect every process.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsSpec {
    /// Largest frame a peer may send, checked before any allocation.
    pub max_frame_bytes: u32,
    /// Time a new connection has to finish TLS and send its first message.
    pub first_message_timeout_ms: u64,
    /// How long a process keeps retrying to reach a peer at startup.
    pub connect_timeout_s: u64,
    /// Connections a listener holds open at once (raised to the job's own needs).
    pub max_connections: usize,
    /// Connections a listener holds open at once from one address (likewise).
    pub max_connections_per_source: usize,
    /// Seconds an authenticated peer may stall mid-frame or stop reading
    /// before it is dropped (`None`: the heartbeat timeout).
    pub stall_timeout_s: Option<u64>,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            max_frame_bytes: 64 << 20,
            first_message_timeout_ms: 10_000,
            connect_timeout_s: 60,
            max_connections: 512,
            max_connections_per_source: 32,
            stall_timeout_s: None,
        }
    }
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

fn int_in<T: TryFrom<i64>>(
    src: &Src<'_>,
    v: &toml::Spanned<i64>,
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

/// `[cluster] uids = [first, last]`: the uids leased to jobs. Never 0,
/// never the ids below 1000 that distributions give to system accounts, at
/// most 2^20 of them, and below 2^32 - 2 (`(uid_t) -1` means "no change").
fn convert_uids(src: &Src<'_>, uids: Option<&toml::Spanned<Vec<toml::Spanned<i64>>>>) -> Result<(u32, u32), SpecError> {
    let Some(uids) = uids else { return Ok(crate::jobuid::DEFAULT_RANGE) };
    let help = "for example uids = [2000000000, 2000065535] (the default): a range no account on the hosts uses";
    let [first, last] = uids.get_ref().as_slice() else {
        return Err(src.err(uids.span(), "uids must be a range of two numbers [first, last]", help));
    };
    let first: u32 = int_in(src, first, "the first job uid", 1000, i64::from(u32::MAX - 2), help)?;
    let last: u32 = int_in(src, last, "the last job uid", 1000, i64::from(u32::MAX - 2), help)?;
    if first > last || last - first >= 1 << 20 {
        return Err(src.err(
            uids.span(),
            "uids must be [first, last] with first <= last and at most 1048576 uids",
            help,
        ));
    }
    Ok((first, last))
}

/// Which kind of host list `[cluster]` names.
enum ListKind<'a> {
    Hostfile,
    /// With the group to take (every host when `None`).
    Inventory(Option<&'a str>),
}

/// Reads a hostfile or inventory into hosts: each gets its workers from the
/// list (`slots`, `warden_workers`; 1 by default), `servers_per_host`
/// servers unless the list says otherwise, and the first host the scheduler
/// unless one is marked. Host names without an address are resolved here,
/// on the launcher, once.
fn hosts_from_list(
    src: &Src<'_>,
    key: &toml::Spanned<String>,
    path: &Path,
    kind: ListKind<'_>,
    servers_per_host: u32,
) -> Result<Vec<HostSpec>, SpecError> {
    let what = match kind {
        ListKind::Hostfile => "hostfile",
        ListKind::Inventory(_) => "inventory",
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        src.err(
            key.span(),
            format!("cannot read the {what} {}: {e}", path.display()),
            "paths are relative to the job file's directory",
        )
    })?;
    let at = |line: usize, message: String, help: &str| SpecError {
        file: path.display().to_string(),
        line,
        col: 1,
        message,
        help: (!help.is_empty()).then(|| help.to_string()),
    };
    let entries = match kind {
        ListKind::Hostfile => crate::inventory::parse_hostfile(&text),
        ListKind::Inventory(group) => crate::inventory::parse_inventory(&text, group),
    }
    .map_err(|e| at(e.line, e.message, &e.help))?;
    if entries.is_empty() {
        return Err(at(1, format!("the {what} lists no host"), "add a line per host: node1 slots=2"));
    }
    let marked = entries.iter().any(|e| e.scheduler.is_some_and(|s| s > 0));
    let mut hosts: Vec<HostSpec> = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let wanted = e.address.clone().unwrap_or_else(|| e.name.clone());
        let address = match wanted.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => resolve(&wanted).map_err(|why| {
                at(
                    e.line,
                    format!("cannot find the address of `{wanted}`: {why}"),
                    match kind {
                        ListKind::Hostfile => "add address=IP to the line: the address the other hosts reach it at",
                        ListKind::Inventory(_) => "set ansible_host=IP (or warden_address=IP) for the host",
                    },
                )
            })?,
        };
        if let Some(other) = hosts.iter().find(|h| h.address == address) {
            return Err(at(
                e.line,
                format!("`{}` has the address {address}, like `{}`", e.name, other.name),
                "list each machine once; give it more workers instead",
            ));
        }
        if !is_host_name(&e.name) {
            return Err(at(e.line, format!("`{}` cannot name a host", e.name), HOST_NAME_HELP));
        }
        let host = HostSpec {
            scheduler: e.scheduler.unwrap_or(u32::from(!marked && i == 0)),
            servers: e.servers.unwrap_or(servers_per_host),
            workers: e.workers.unwrap_or(1),
            name: e.name,
            address,
            ssh: e.ssh,
            identity_file: e.identity_file.map(PathBuf::from),
        };
        if host.scheduler + host.servers + host.workers == 0 {
            return Err(at(
                e.line,
                format!("host `{}` runs nothing", host.name),
                "give it slots, servers or the scheduler",
            ));
        }
        hosts.push(host);
    }
    Ok(hosts)
}

/// Host names end up in file names (`logs/NAME-worker-0.log`): 1 to 64
/// letters, digits, `-`, `_`, `.` or `:` (an IPv6 address), not starting
/// with a dot.
fn is_host_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

const HOST_NAME_HELP: &str = "host names are 1-64 letters, digits, '-', '_', '.' or ':'";

/// A host name's address as this machine resolves it (IPv4 first).
fn resolve(name: &str) -> Result<IpAddr, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<IpAddr> = (name, 22).to_socket_addrs().map_err(|e| e.to_string())?.map(|a| a.ip()).collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| "no address".to_string())
}

fn convert(
    src: &Src<'_>,
    raw: raw::JobFile,
    base_dir: &Path,
    given: Option<&[HostSpec]>,
) -> Result<JobSpec, SpecError> {
    // [job]
    let job = raw.job.get_ref();
    let name = job.name.get_ref().trim().to_string();
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(src.err(
            job.name.span(),
            "job name must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
            "for example: name = \"fashion-mnist\"",
        ));
    }
    let seed = match &job.seed {
        Some(s) if *s.get_ref() < 0 => {
            return Err(src.err(
                s.span(),
                "seed must not be negative",
                "use any number from 0 up, or leave `seed` out to draw one at random",
            ));
        }
        Some(s) => Some(*s.get_ref() as u64),
        None => None,
    };
    let max_hours = match &job.max_hours {
        Some(h) => int_in(src, h, "max_hours", 1, 24 * 30, "certificates live this long; 24 suits most jobs")?,
        None => 24,
    };

    // [cluster]
    let cl = raw.cluster.get_ref();
    let user = cl.user.get_ref().trim().to_string();
    if user.is_empty() || user == "root" || user.contains(char::is_whitespace) {
        return Err(src.err(
            cl.user.span(),
            if user == "root" {
                "training must not run as root".to_string()
            } else {
                "user must be a user name".to_string()
            },
            "name an unprivileged account, for example user = \"warden\" (playbooks/node-prep.yml creates it)",
        ));
    }
    let uids = convert_uids(src, cl.uids.as_ref())?;
    let ports = cl.ports.get_ref();
    if ports.len() != 2 {
        return Err(src.err(
            cl.ports.span(),
            "ports must be a range of two numbers [first, last]",
            "for example: ports = [29500, 29599]",
        ));
    }
    let port_help = "ports are 1024 to 65535; for example: ports = [29500, 29599]";
    let port_start: u16 = int_in(src, &ports[0], "the first port", 1024, 65535, port_help)?;
    let port_end: u16 = int_in(src, &ports[1], "the last port", 1024, 65535, port_help)?;
    if port_end < port_start {
        return Err(src.err(
            cl.ports.span(),
            format!("port range is empty: {port_start} is after {port_end}"),
            "write the lower port first",
        ));
    }
    let scheduler_port = match &cl.scheduler_port {
        Some(p) => {
            let port: u16 = int_in(src, p, "scheduler_port", 1024, 65535, port_help)?;
            if port < port_start || port > port_end {
                return Err(src.err(
                    p.span(),
                    format!("scheduler_port {port} is outside the job's ports {port_start}-{port_end}"),
                    "pick a port inside `ports`, or leave scheduler_port out",
                ));
            }
            Some(port)
        }
        None => None,
    };
    // The hosts: listed here, or read from a hostfile or an Ansible inventory.
    let sources = [cl.hosts.is_some(), cl.hostfile.is_some(), cl.inventory.is_some()];
    let cluster_span = raw.cluster.span();
    match sources.iter().filter(|x| **x).count() {
        0 => {
            return Err(src.err(
                cluster_span,
                "the cluster has no hosts",
                "add [[cluster.hosts]] tables, or name a hostfile (hostfile = \"hosts\") or an Ansible inventory (inventory = \"inventory.ini\")",
            ));
        }
        1 => {}
        _ => {
            return Err(src.err(
                cluster_span,
                "the hosts are listed more than one way",
                "keep one of [[cluster.hosts]], hostfile and inventory",
            ));
        }
    }
    if let (Some(g), None) = (&cl.inventory_group, &cl.inventory) {
        return Err(src.err(
            g.span(),
            "inventory_group needs an inventory",
            "add inventory = \"inventory.ini\", or remove it",
        ));
    }
    let mut hosts = Vec::new();
    // Where each host's mistakes are pointed at in the job file.
    let mut spans: Vec<Range<usize>> = Vec::new();
    let mut hosts_from = None;
    let hosts_span;
    if let Some(table) = &cl.hosts {
        hosts_span = table.span();
        if let Some(s) = &cl.servers_per_host {
            return Err(src.err(
                s.span(),
                "servers_per_host applies to hosts from a hostfile or inventory",
                "set servers = N on each [[cluster.hosts]] table instead",
            ));
        }
        if table.get_ref().is_empty() {
            return Err(src.err(table.span(), "the cluster has no hosts", "add a [[cluster.hosts]] table"));
        }
        let mut names = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for h in table.get_ref() {
            let hr = h.get_ref();
            let address: IpAddr = hr.address.get_ref().parse().map_err(|_| {
                src.err(
                    hr.address.span(),
                    format!("`{}` is not an IP address", hr.address.get_ref()),
                    "give the address peers reach this host at, for example address = \"10.0.0.5\"",
                )
            })?;
            let name = hr.name.as_ref().map_or_else(|| address.to_string(), |n| n.get_ref().clone());
            if !is_host_name(&name) {
                let span = hr.name.as_ref().map_or(hr.address.span(), |n| n.span());
                return Err(src.err(span, format!("`{name}` cannot name a host"), HOST_NAME_HELP));
            }
            let count = |v: &Option<toml::Spanned<i64>>, what: &str, hi: i64| -> Result<u32, SpecError> {
                match v {
                    Some(v) => int_in(src, v, what, 0, hi, "role counts are whole numbers; 0 leaves the role out"),
                    None => Ok(0),
                }
            };
            let scheduler = count(&hr.scheduler, "scheduler", 1)?;
            let servers = count(&hr.servers, "servers", 256)?;
            let workers = count(&hr.workers, "workers", 1024)?;
            if !names.insert(name.clone()) {
                let span = hr.name.as_ref().map_or(hr.address.span(), |n| n.span());
                return Err(src.err(
                    span,
                    format!("host `{name}` is listed twice"),
                    "list each host once; give it more servers or workers instead",
                ));
            }
            if !addresses.insert(address) {
                return Err(src.err(
                    hr.address.span(),
                    format!("address {address} is used by two hosts"),
                    "list each host once; give it more servers or workers instead",
                ));
            }
            if scheduler + servers + workers == 0 {
                return Err(src.err(
                    h.span(),
                    format!("host `{name}` runs nothing"),
                    "give it a scheduler, servers or workers, or remove it",
                ));
            }
            let ssh = hr.ssh.as_ref().map_or_else(|| address.to_string(), |s| s.get_ref().clone());
            hosts.push(HostSpec { name, address, ssh, scheduler, servers, workers, identity_file: None });
            spans.push(h.span());
        }
    } else {
        let (key, kind) = match (&cl.hostfile, &cl.inventory) {
            (Some(f), _) => (f, ListKind::Hostfile),
            (None, Some(i)) => (i, ListKind::Inventory(cl.inventory_group.as_ref().map(|g| g.get_ref().as_str()))),
            (None, None) => unreachable!("one source was checked to be present"),
        };
        hosts_span = key.span();
        let servers_per_host = match &cl.servers_per_host {
            Some(v) => {
                int_in(src, v, "servers_per_host", 0, 256, "parameter servers on each listed host, 1 by default")?
            }
            None => 1,
        };
        let path = base_dir.join(key.get_ref());
        hosts = match given {
            Some(h) => {
                // The launcher read these; an agent still refuses what the
                // list itself would have been refused for.
                let names: BTreeSet<&str> = h.iter().map(|x| x.name.as_str()).collect();
                let addresses: BTreeSet<IpAddr> = h.iter().map(|x| x.address).collect();
                if h.is_empty() || names.len() != h.len() || addresses.len() != h.len() {
                    return Err(src.err(key.span(), "the hosts sent with the job repeat a name or address", ""));
                }
                if let Some(bad) = h.iter().find(|x| !is_host_name(&x.name)) {
                    return Err(src.err(key.span(), format!("`{}` cannot name a host", bad.name), HOST_NAME_HELP));
                }
                h.to_vec()
            }
            None => hosts_from_list(src, key, &path, kind, servers_per_host)?,
        };
        spans = vec![key.span(); hosts.len()];
        hosts_from = Some(path);
    }
    let ssh_config = cl.ssh_config.as_ref().map(|p| base_dir.join(p.get_ref()));
    let remote_dir = match &cl.remote_dir {
        Some(d) if !Path::new(d.get_ref()).is_absolute() => {
            return Err(src.err(
                d.span(),
                "remote_dir must be an absolute path",
                "for example remote_dir = \"/var/lib/warden\"",
            ));
        }
        Some(d) => PathBuf::from(d.get_ref()),
        None => PathBuf::from("/var/lib/warden"),
    };
    let become_ = match cl.become_.as_ref().map(|b| b.get_ref().as_str()) {
        None | Some("auto") => Become::Auto,
        Some("sudo") => Become::Sudo,
        Some("none") => Become::None,
        Some(other) => {
            let span = cl.become_.as_ref().map(|b| b.span()).unwrap_or_default();
            return Err(src.err(
                span,
                format!("unknown become `{other}`"),
                "use \"auto\" (sudo -n unless the SSH user is root), \"sudo\" or \"none\"",
            ));
        }
    };
    let cluster = ClusterSpec {
        hosts_from,
        user,
        uids,
        port_start,
        port_end,
        scheduler_port,
        hosts,
        ssh_config,
        remote_dir,
        become_,
    };
    let schedulers = cluster.count(Role::Scheduler);
    if schedulers != 1 {
        return Err(src.err(
            hosts_span.clone(),
            format!("the cluster needs exactly one scheduler, but has {schedulers}"),
            "set scheduler = 1 on exactly one host",
        ));
    }
    if cluster.count(Role::Server) == 0 {
        return Err(src.err(hosts_span.clone(), "the cluster has no server", "set servers = 1 (or more) on a host"));
    }
    if cluster.count(Role::Worker) == 0 {
        return Err(src.err(hosts_span.clone(), "the cluster has no worker", "set workers = 1 (or more) on a host"));
    }
    let range = u32::from(port_end - port_start) + 1;
    for (h, span) in cluster.hosts.iter().zip(&spans) {
        let listeners = h.scheduler + h.servers;
        if listeners > range {
            return Err(src.err(
                span.clone(),
                format!(
                    "host `{}` needs {listeners} ports (1 per scheduler and server) but the range {port_start}-{port_end} has {range}",
                    h.name
                ),
                "widen [cluster] ports",
            ));
        }
    }

    // [model]
    let m = raw.model.get_ref();
    let kind = match m.kind.get_ref().as_str() {
        "softmax" => ModelKind::Softmax,
        "mlp" => ModelKind::Mlp,
        "synthetic" => ModelKind::Synthetic,
        "external" => ModelKind::External,
        other => {
            return Err(src.err(
                m.kind.span(),
                format!("unknown model kind `{other}`"),
                "supported: \"softmax\", \"mlp\", \"external\" (your own program, with [worker] command)",
            ));
        }
    };
    let external = kind == ModelKind::External;
    // Neither reads data or has layers.
    let synthetic = matches!(kind, ModelKind::Synthetic | ModelKind::External);
    let required =
        |v: &Option<toml::Spanned<i64>>, what: &str, lo: i64, hi: i64, help: &str| -> Result<usize, SpecError> {
            match v {
                Some(v) if synthetic => {
                    Err(src.err(v.span(), format!("the {} model has no `{what}`", m.kind.get_ref()), "remove it"))
                }
                Some(v) => int_in(src, v, what, lo, hi, help),
                None if synthetic => Ok(0),
                None => Err(src.err(raw.model.span(), format!("[model] needs `{what}`"), help)),
            }
        };
    let inputs = required(&m.inputs, "inputs", 1, 1 << 24, "the number of input features, 784 for 28x28 images")?;
    let classes = required(&m.classes, "classes", 2, 256, "the number of classes (2 to 256), 10 for Fashion-MNIST")?;
    let params = match (&m.params, synthetic && !external) {
        (Some(p), true) => int_in(src, p, "params", 1, 1 << 30, "floats pushed and pulled per step, such as 4000000")?,
        (None, true) => {
            return Err(src.err(
                m.kind.span(),
                "the synthetic model needs `params`",
                "add for example params = 4000000",
            ));
        }
        (Some(p), false) => return Err(src.err(p.span(), "`params` belongs to kind = \"synthetic\"", "remove it")),
        (None, false) => 0,
    };
    let mut tensors = Vec::new();
    match (&m.tensors, external) {
        (Some(t), true) if t.get_ref().is_empty() || t.get_ref().len() > 4096 => {
            return Err(src.err(t.span(), "an external model has 1 to 4096 tensors", "for example w = [784, 10]"));
        }
        (Some(t), true) => {
            let mut total = 0usize;
            for (name, shape) in t.get_ref() {
                let ok_name = !name.is_empty()
                    && name.len() <= 128
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
                if !ok_name {
                    return Err(src.err(
                        shape.span(),
                        format!("tensor name `{name}` must be 1-128 letters, digits, `.`, `_`, `-` or `/`"),
                        "for example fc1.weight",
                    ));
                }
                let dims = shape.get_ref();
                if dims.is_empty() || dims.len() > 8 || dims.iter().any(|d| !(1..=1 << 30).contains(d)) {
                    return Err(src.err(
                        shape.span(),
                        format!("tensor `{name}` needs 1 to 8 dimensions, each 1 to 2^30"),
                        "for example [784, 10]",
                    ));
                }
                let dims: Vec<usize> = dims.iter().map(|d| *d as usize).collect();
                total = total.saturating_add(dims.iter().product());
                if total > 1 << 30 {
                    return Err(src.err(
                        shape.span(),
                        "the tensors hold more than 2^30 floats in all",
                        "split the job",
                    ));
                }
                tensors.push((name.clone(), dims));
            }
        }
        (None, true) => {
            return Err(src.err(
                m.kind.span(),
                "an external model declares its tensors",
                "add [model.tensors] with name = [shape], for example w = [784, 10]",
            ));
        }
        (Some(t), false) => {
            return Err(src.err(t.span(), "`tensors` belongs to kind = \"external\"", "remove it"));
        }
        (None, false) => {}
    }
    let mut hidden = Vec::new();
    match (kind, &m.hidden) {
        (ModelKind::Softmax, Some(h)) => {
            return Err(src.err(
                h.span(),
                "softmax regression has no hidden layers",
                "use kind = \"mlp\", or remove `hidden`",
            ));
        }
        (ModelKind::Mlp, None) => {
            return Err(src.err(m.kind.span(), "an mlp needs hidden layers", "add for example hidden = [256]"));
        }
        (ModelKind::Mlp, Some(h)) if h.get_ref().is_empty() || h.get_ref().len() > 16 => {
            return Err(src.err(
                h.span(),
                "an mlp has 1 to 16 hidden layers",
                "for example hidden = [256] or [512, 256]",
            ));
        }
        (_, Some(h)) => {
            for w in h.get_ref() {
                hidden.push(int_in(
                    src,
                    w,
                    "a hidden layer width",
                    1,
                    1 << 16,
                    "widths are whole numbers such as 256",
                )?);
            }
        }
        (ModelKind::Softmax | ModelKind::Synthetic | ModelKind::External, None) => {}
    }
    let dropout = match &m.dropout {
        Some(d) if kind != ModelKind::Mlp => {
            return Err(src.err(
                d.span(),
                "dropout applies to hidden layers; softmax regression has none",
                "remove `dropout`",
            ));
        }
        Some(d) if !(0.0..0.95).contains(d.get_ref()) => {
            return Err(src.err(
                d.span(),
                format!("dropout must be in [0, 0.95), not {}", d.get_ref()),
                "0 turns it off; 0.2 to 0.5 is common",
            ));
        }
        Some(d) => *d.get_ref() as f32,
        None => 0.0,
    };
    let model = ModelSpec { kind, inputs, classes, hidden, dropout, params, tensors };
    let worker = match (&raw.worker, external) {
        (Some(w), true) => {
            let w = w.get_ref();
            if w.command.get_ref().is_empty() || w.command.get_ref()[0].is_empty() {
                return Err(src.err(
                    w.command.span(),
                    "[worker] command is empty",
                    "name the program and its arguments, for example [\"python3\", \"train.py\"]",
                ));
            }
            let env = w.env.as_ref().map(|e| e.get_ref().clone()).unwrap_or_default();
            if let Some(k) = env.keys().find(|k| k.starts_with("WARDEN_") || k.is_empty() || k.contains('=')) {
                let span = w.env.as_ref().map(|e| e.span()).unwrap_or_default();
                return Err(src.err(span, format!("[worker] env cannot set `{k}`"), "WARDEN_* are set by the agent"));
            }
            Some(WorkerSpec {
                command: w.command.get_ref().clone(),
                workdir: w.workdir.as_ref().map_or_else(|| base_dir.to_path_buf(), |d| base_dir.join(d.get_ref())),
                env,
            })
        }
        (None, true) => {
            return Err(src.err(
                m.kind.span(),
                "an external model is trained by your own program",
                "add [worker] command = [\"python3\", \"train.py\"] (see docs/byo.md)",
            ));
        }
        (Some(w), false) => {
            return Err(src.err(
                w.span(),
                "[worker] command runs your own program, which needs [model] kind = \"external\"",
                "set kind = \"external\" and declare [model.tensors], or remove [worker]",
            ));
        }
        (None, false) => None,
    };
    let init = match (&m.init, &m.trusted_keys) {
        (Some(dir), Some(keys)) if !keys.get_ref().is_empty() => Some(InitSpec {
            dir: base_dir.join(dir.get_ref()),
            trusted_keys: keys.get_ref().iter().map(|k| base_dir.join(k.get_ref())).collect(),
        }),
        (Some(dir), _) => {
            return Err(src.err(
                dir.span(),
                "initial weights are loaded only after their signature is verified: `init` needs trusted_keys",
                "add trusted_keys = [\"keys/public.pem\"] (public keys whose signatures you accept)",
            ));
        }
        (None, Some(keys)) => {
            return Err(src.err(keys.span(), "trusted_keys belongs to `init`", "add init = \"DIR\", or remove it"));
        }
        (None, None) => None,
    };

    // [data]
    let data = match (&raw.data, synthetic) {
        (Some(d), true) if external => {
            return Err(src.err(d.span(), "your program reads its own data; warden passes none", "remove [data]"));
        }
        (Some(d), true) => return Err(src.err(d.span(), "the synthetic model reads no data", "remove [data]")),
        (None, false) => {
            return Err(src.err(
                0..0,
                "missing field `data`",
                "add it; configs/local.toml shows every section with its keys",
            ));
        }
        (None, true) => None,
        (Some(d), false) => Some(convert_data(src, d, base_dir)?),
    };
    // [optimizer]
    let o = raw.optimizer.get_ref();
    let f32_of = |v: &Option<toml::Spanned<f64>>, default: f32| v.as_ref().map_or(default, |x| *x.get_ref() as f32);
    let kind_name = o.kind.get_ref().as_str();
    let kind = match kind_name {
        "sgd" => OptimizerKind::Sgd,
        "momentum" => OptimizerKind::Momentum {
            momentum: f32_of(&o.momentum, 0.9),
            nesterov: o.nesterov.as_ref().is_some_and(|n| *n.get_ref()),
        },
        "adam" | "adamw" => {
            let (beta1, beta2, eps) = (f32_of(&o.beta1, 0.9), f32_of(&o.beta2, 0.999), f32_of(&o.eps, 1e-8));
            if kind_name == "adam" {
                OptimizerKind::Adam { beta1, beta2, eps }
            } else {
                OptimizerKind::AdamW { beta1, beta2, eps }
            }
        }
        other => {
            return Err(src.err(
                o.kind.span(),
                format!("unknown optimizer kind `{other}`"),
                "supported: \"sgd\", \"momentum\", \"adam\", \"adamw\"",
            ));
        }
    };
    // Keys that belong to another rule are errors, not silently ignored.
    let foreign: &[(&str, Option<std::ops::Range<usize>>)] = &[
        ("momentum", o.momentum.as_ref().map(|v| v.span())),
        ("nesterov", o.nesterov.as_ref().map(|v| v.span())),
        ("beta1", o.beta1.as_ref().map(|v| v.span())),
        ("beta2", o.beta2.as_ref().map(|v| v.span())),
        ("eps", o.eps.as_ref().map(|v| v.span())),
    ];
    for (key, span) in foreign {
        let owner = if matches!(*key, "momentum" | "nesterov") { "momentum" } else { "adam\" or kind = \"adamw" };
        let belongs = match kind {
            OptimizerKind::Momentum { .. } => matches!(*key, "momentum" | "nesterov"),
            OptimizerKind::Adam { .. } | OptimizerKind::AdamW { .. } => matches!(*key, "beta1" | "beta2" | "eps"),
            OptimizerKind::Sgd => false,
        };
        if let (Some(span), false) = (span, belongs) {
            return Err(src.err(
                span.clone(),
                format!("`{key}` needs kind = \"{owner}\""),
                format!("set kind = \"{owner}\", or remove `{key}`"),
            ));
        }
    }
    let sched_name = o.schedule.as_ref().map_or("constant", |s| s.get_ref().as_str());
    let sched_keys = [
        ("step_every", "step", o.step_every.as_ref().map(|v| v.span())),
        ("step_gamma", "step", o.step_gamma.as_ref().map(|v| v.span())),
        ("decay_steps", "cosine", o.decay_steps.as_ref().map(|v| v.span())),
        ("min_lr", "cosine", o.min_lr.as_ref().map(|v| v.span())),
    ];
    for (key, owner, span) in &sched_keys {
        if let (Some(span), true) = (span, sched_name != *owner) {
            return Err(src.err(
                span.clone(),
                format!("`{key}` needs schedule = \"{owner}\""),
                format!("set schedule = \"{owner}\", or remove `{key}`"),
            ));
        }
    }
    let count = |v: &Option<toml::Spanned<i64>>, what: &str| -> Result<Option<u64>, SpecError> {
        v.as_ref().map(|v| int_in::<u64>(src, v, what, 0, 1_000_000_000, "a number of updates")).transpose()
    };
    let schedule = match sched_name {
        "constant" => Schedule::Constant,
        "step" => Schedule::Step {
            every: count(&o.step_every, "step_every")?.ok_or_else(|| {
                src.err(
                    o.schedule.as_ref().map(|s| s.span()).unwrap_or_default(),
                    "schedule = \"step\" needs step_every",
                    "add for example step_every = 1000 (updates between decays)",
                )
            })?,
            gamma: f32_of(&o.step_gamma, 0.1),
        },
        "cosine" => Schedule::Cosine {
            decay_steps: count(&o.decay_steps, "decay_steps")?.ok_or_else(|| {
                src.err(
                    o.schedule.as_ref().map(|s| s.span()).unwrap_or_default(),
                    "schedule = \"cosine\" needs decay_steps",
                    "add for example decay_steps = 5000 (updates to decay over)",
                )
            })?,
            min_lr: f32_of(&o.min_lr, 0.0),
        },
        other => {
            let span = o.schedule.as_ref().map(|s| s.span()).unwrap_or_default();
            return Err(src.err(
                span,
                format!("unknown schedule `{other}`"),
                "supported: \"constant\", \"step\", \"cosine\"",
            ));
        }
    };
    let optimizer = OptimizerSpec {
        kind,
        lr: *o.lr.get_ref() as f32,
        weight_decay: f32_of(&o.weight_decay, 0.0),
        clip_gradient: f32_of(&o.clip_gradient, 0.0),
        schedule,
        warmup_steps: count(&o.warmup_steps, "warmup_steps")?.unwrap_or(0),
    };
    if let Err(e) = optimizer.validate() {
        let field_span = |v: &Option<toml::Spanned<f64>>| v.as_ref().map(|x| x.span());
        let span = match e.field {
            "lr" => Some(o.lr.span()),
            "momentum" => field_span(&o.momentum),
            "weight_decay" => field_span(&o.weight_decay),
            "clip_gradient" => field_span(&o.clip_gradient),
            "beta1" => field_span(&o.beta1),
            "beta2" => field_span(&o.beta2),
            "eps" => field_span(&o.eps),
            "step_gamma" => field_span(&o.step_gamma),
            "min_lr" => field_span(&o.min_lr),
            "step_every" => o.step_every.as_ref().map(|v| v.span()),
            "decay_steps" => o.decay_steps.as_ref().map(|v| v.span()),
            _ => None,
        }
        .unwrap_or(o.kind.span());
        return Err(src.err(span, e.to_string(), e.help()));
    }

    // [training]
    let t = raw.training.get_ref();
    let epochs = int_in(src, &t.epochs, "epochs", 1, 100_000, "how many passes over the data, for example epochs = 5")?;
    let batch_size = int_in(
        src,
        &t.batch_size,
        "batch_size",
        1,
        1 << 20,
        "samples per step on each worker, for example batch_size = 64",
    )?;
    let mode = match t.mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("sync") => SyncMode::Sync,
        Some("async") => SyncMode::Async,
        Some(other) => {
            let span = t.mode.as_ref().map(|m| m.span()).unwrap_or_default();
            return Err(src.err(span, format!("unknown training mode `{other}`"), "use \"sync\" or \"async\""));
        }
    };
    let synthetic_steps = match (&t.steps, synthetic && !external) {
        (Some(v), true) => int_in(src, v, "steps", 1, 1_000_000, "timed steps per epoch, such as 100")?,
        (None, true) => {
            return Err(src.err(
                raw.training.span(),
                "the synthetic model needs [training] steps",
                "add for example steps = 100",
            ));
        }
        (Some(v), false) => {
            return Err(src.err(
                v.span(),
                "`steps` belongs to the synthetic model; real data sets the steps",
                "remove it",
            ));
        }
        (None, false) => 0,
    };
    let encoding = match t.compression.as_ref().map(|c| c.get_ref().as_str()) {
        None | Some("none") => crate::wire::Encoding::F32,
        Some("fp16") => crate::wire::Encoding::F16,
        Some("bf16") => crate::wire::Encoding::Bf16,
        Some("2bit") => crate::wire::Encoding::TwoBit,
        Some(other) => {
            let span = t.compression.as_ref().map(|c| c.span()).unwrap_or_default();
            return Err(src.err(
                span,
                format!("unknown compression `{other}`"),
                "use \"none\", \"fp16\", \"bf16\" or \"2bit\"",
            ));
        }
    };
    let threshold = match (&t.compression_threshold, encoding) {
        (Some(v), crate::wire::Encoding::TwoBit) => {
            let x = *v.get_ref();
            if !(x.is_finite() && x > 0.0 && x <= 1e6) {
                return Err(src.err(
                    v.span(),
                    format!("compression_threshold must be above 0 and at most 1e6, not {x}"),
                    "0.5 is MXNet's default",
                ));
            }
            x as f32
        }
        (Some(v), _) => {
            return Err(src.err(
                v.span(),
                "compression_threshold belongs to compression = \"2bit\"",
                "set compression = \"2bit\", or remove it",
            ));
        }
        (None, _) => 0.5,
    };
    let compression = Compression { encoding, threshold };
    let heartbeat_timeout_s = match &t.heartbeat_timeout {
        Some(v) => int_in(
            src,
            v,
            "heartbeat_timeout",
            2,
            3600,
            "seconds of silence before a process counts as dead; 30 suits most networks",
        )?,
        None => 30,
    };
    let on_failure = match (t.on_failure.as_ref().map(|v| (v.get_ref().as_str(), v.span())), &t.max_restarts) {
        (None | Some(("fail", _)), None) => OnFailure::Fail,
        (None | Some(("fail", _)), Some(v)) => {
            return Err(src.err(
                v.span(),
                "max_restarts belongs to on_failure = \"restart\"",
                "set on_failure = \"restart\", or remove max_restarts",
            ));
        }
        (Some(("restart", span)), max) => {
            if raw.checkpoint.is_none() {
                return Err(src.err(
                    span,
                    "on_failure = \"restart\" resumes from the newest checkpoint, but the job file has no [checkpoint] section",
                    "add [checkpoint] with every_steps or every_seconds (see docs/checkpoints.md)",
                ));
            }
            let max_restarts = match max {
                Some(v) => {
                    int_in(src, v, "max_restarts", 1, 100, "how many times the job may start again; 3 is typical")?
                }
                None => 3,
            };
            OnFailure::Restart { max_restarts }
        }
        (Some((other, span)), _) => {
            return Err(src.err(span, format!("unknown on_failure `{other}`"), "use \"fail\" or \"restart\""));
        }
    };
    let training =
        TrainingSpec { epochs, batch_size, mode, synthetic_steps, compression, heartbeat_timeout_s, on_failure };

    // [limits]
    let mut limits = LimitsSpec::default();
    if let Some(l) = &raw.limits {
        let l = l.get_ref();
        if let Some(v) = &l.max_frame_mib {
            let mib: u32 =
                int_in(src, v, "max_frame_mib", 1, 1024, "the largest message in MiB; 64 suits most models")?;
            limits.max_frame_bytes = mib << 20;
        }
        if let Some(v) = &l.first_message_timeout_ms {
            limits.first_message_timeout_ms =
                int_in(src, v, "first_message_timeout_ms", 50, 600_000, "10000 suits most networks")?;
        }
        if let Some(v) = &l.connect_timeout_s {
            limits.connect_timeout_s = int_in(src, v, "connect_timeout_s", 1, 3600, "60 suits most clusters")?;
        }
        if let Some(v) = &l.max_connections {
            limits.max_connections = int_in(src, v, "max_connections", 1, 65_536, "512 suits most jobs")?;
        }
        if let Some(v) = &l.max_connections_per_source {
            limits.max_connections_per_source =
                int_in(src, v, "max_connections_per_source", 1, 65_536, "32 suits most jobs")?;
        }
        if let Some(v) = &l.stall_timeout_s {
            limits.stall_timeout_s = Some(int_in(
                src,
                v,
                "stall_timeout_s",
                1,
                3600,
                "seconds a peer may stop mid-message or stop reading; the heartbeat timeout (default) suits most jobs",
            )?);
        }
    }
    let checkpoint = raw.checkpoint.as_ref().map(|c| convert_checkpoint(src, c, base_dir)).transpose()?;
    if let (Some(c), ModelKind::External) = (&raw.checkpoint, model.kind) {
        return Err(src.err(
            c.span(),
            "[checkpoint] is not available for external models yet (nothing would ask the servers for one)",
            "remove [checkpoint]; save what you need from your program",
        ));
    }
    let signing = raw.signing.as_ref().map(|sg| {
        let sg = sg.get_ref();
        SigningSpec {
            key: base_dir.join(sg.key.get_ref()),
            passphrase_env: sg.passphrase_env.as_ref().map(|v| v.get_ref().clone()),
        }
    });
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

    // The largest message is a push or pull of one server's shard.
    let shard = spec.model.num_params().div_ceil(spec.cluster.count(Role::Server) as usize);
    let needed = shard * 4 + crate::wire::VECTOR_FRAME_OVERHEAD;
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
    Ok(spec)
}

fn convert_checkpoint(
    src: &Src<'_>,
    raw_ck: &toml::Spanned<raw::Checkpoint>,
    base_dir: &Path,
) -> Result<CheckpointSpec, SpecError> {
    let c = raw_ck.get_ref();
    let path = |p: &toml::Spanned<String>, help: &str| -> Result<PathBuf, SpecError> {
        if p.get_ref().trim().is_empty() {
            return Err(src.err(p.span(), "path is empty", help));
        }
        Ok(base_dir.join(p.get_ref()))
    };
    let dir = match &c.dir {
        Some(d) => path(d, "name a directory on the servers' hosts, such as \"/var/lib/warden/checkpoints\"")?,
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
    let key_file =
        c.key_file.as_ref().map(|k| path(k, "name the key file, made by `warden checkpoint keygen`")).transpose()?;
    Ok(CheckpointSpec { dir, every_steps, every_seconds, keep_last, keep_last_after_job, key_file })
}

fn convert_data(src: &Src<'_>, raw_data: &toml::Spanned<raw::Data>, base_dir: &Path) -> Result<DataSpec, SpecError> {
    let d = raw_data.get_ref();
    let format = match d.format.get_ref().as_str() {
        "idx" => DataFormat::Idx,
        "csv" => DataFormat::Csv,
        "libsvm" => DataFormat::Libsvm,
        other => {
            return Err(src.err(
                d.format.span(),
                format!("unknown data format `{other}`"),
                "supported: \"idx\", \"csv\", \"libsvm\"",
            ));
        }
    };
    let path = |p: &toml::Spanned<String>| -> Result<PathBuf, SpecError> {
        if p.get_ref().trim().is_empty() {
            return Err(src.err(p.span(), "path is empty", "name a file, relative to the job file or absolute"));
        }
        Ok(base_dir.join(p.get_ref()))
    };
    let idx_keys = [&d.train_images, &d.train_labels, &d.test_images, &d.test_labels];
    let file_keys = [&d.train, &d.test];
    let (train, test) = if format == DataFormat::Idx {
        if let Some(k) = file_keys.iter().find_map(|k| k.as_ref()) {
            return Err(src.err(
                k.span(),
                "IDX data is named with train_images/train_labels (and test_images/test_labels)",
                "use those keys, or set format = \"csv\" or \"libsvm\"",
            ));
        }
        let (Some(ti), Some(tl)) = (&d.train_images, &d.train_labels) else {
            return Err(src.err(raw_data.span(), "IDX data needs train_images and train_labels", "name both files"));
        };
        let train = DataFiles::Idx { images: path(ti)?, labels: path(tl)? };
        let test = match (&d.test_images, &d.test_labels) {
            (Some(i), Some(l)) => Some(DataFiles::Idx { images: path(i)?, labels: path(l)? }),
            (None, None) => None,
            (Some(k), None) | (None, Some(k)) => {
                return Err(src.err(
                    k.span(),
                    "test_images and test_labels go together",
                    "name both, or neither to hold out test_fraction of the training set",
                ));
            }
        };
        (train, test)
    } else {
        if let Some(k) = idx_keys.iter().find_map(|k| k.as_ref()) {
            return Err(src.err(
                k.span(),
                "CSV and LIBSVM data are named with `train` (and `test`)",
                "use train = \"file\", or set format = \"idx\"",
            ));
        }
        let Some(t) = &d.train else {
            return Err(src.err(raw_data.span(), "the training file is missing", "add train = \"path/to/train.csv\""));
        };
        (DataFiles::File(path(t)?), d.test.as_ref().map(path).transpose()?.map(DataFiles::File))
    };
    let test_fraction = match &d.test_fraction {
        Some(f) if test.is_some() => {
            return Err(src.err(
                f.span(),
                "test_fraction applies only when no test files are given",
                "remove test_fraction, or the test files",
            ));
        }
        Some(f) if !(*f.get_ref() > 0.0 && *f.get_ref() < 0.9) => {
            return Err(src.err(
                f.span(),
                format!("test_fraction must be in (0, 0.9), not {}", f.get_ref()),
                "0.1 holds out a tenth of the training set",
            ));
        }
        Some(f) => *f.get_ref() as f32,
        None => 0.1,
    };
    if let (Some(h), false) = (&d.header, format == DataFormat::Csv) {
        return Err(src.err(h.span(), "`header` applies to CSV files only", "remove it"));
    }
    let scale = match &d.scale {
        Some(v) if !(v.get_ref().is_finite() && *v.get_ref() != 0.0) => {
            return Err(src.err(
                v.span(),
                "scale must be a finite, non-zero number",
                "for example scale = 0.00392 (1/255)",
            ));
        }
        Some(v) => *v.get_ref() as f32,
        None if format == DataFormat::Idx => 1.0 / 255.0,
        None => 1.0,
    };
    Ok(DataSpec { format, train, test, test_fraction, header: d.header.as_ref().is_some_and(|h| *h.get_ref()), scale })
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
