//! `warden launch`: PKI, start, enrol, watch, fetch, tear down, in phases
//! (set_up_hosts, start_processes, `watch`, tear_down_hosts, conclude).
//!
//! One task per agent reads its events (answering its CSR), one copies its
//! stderr into its log, one waits for its exit (`agents`). Everything they
//! learn flows into a single loop (`watch`), which decides when the job
//! succeeded, failed (`failures`) or was stopped, and stops every process
//! either way: nothing is left running. `progress` is the terminal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc, oneshot};
use warden_agent::job::plan::{Plan, PlannedProcess};
use warden_agent::job::spec::{JobSpec, ModelKind, SpecError};
use warden_agent::net::control::{Bundle, Control, Event, MAX_CONTROL_LINE};
use warden_agent::net::identity::{Identity, JobId, Role};
use warden_agent::net::pki::JobCa;

use crate::rundir::{EpochRow, RunDir, Summary};

/// `eprintln!` that cannot panic (see [`say`]).
macro_rules! say_fmt {
    ($($arg:tt)*) => { say(&format!($($arg)*)) };
}
use crate::error::Chain;
use crate::transport::Transport;

mod agents;
mod failures;
mod progress;
mod watch;

use agents::*;
use failures::*;
use progress::*;
use watch::*;

/// A launch failure before the job ran.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The job file is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Something the user must fix before launching (missing data, run directory in use).
    #[error("{0}")]
    Input(String),
    /// The run directory cannot be made (or holds a run already).
    #[error(transparent)]
    RunDir(#[from] crate::rundir::RunDirError),
    /// `--resume` names no run directory that can be read.
    #[error("--resume")]
    Resume(#[source] crate::rundir::RunDirError),
    /// Local set-up failed: what was being done, and why.
    #[error("{what}")]
    Setup {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: crate::error::BoxError,
    },
}

impl LaunchError {
    /// A failed local set-up step.
    fn setup(what: impl Into<String>, source: impl Into<crate::error::BoxError>) -> Self {
        LaunchError::Setup { what: what.into(), source: source.into() }
    }
}

/// Options of `warden launch`.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Run directory (default: `runs/NAME-TIMESTAMP`).
    pub run_dir: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
    /// Print a line per epoch (and the processes' warnings and errors).
    pub epoch_lines: bool,
    /// Print every line of every process's log as it is written.
    pub verbose: bool,
    /// When the command started (connecting to hosts comes before
    /// [`launch`]); timings count from here. Default: when `launch` starts.
    pub started: Option<Instant>,
    /// Continue the checkpoints of this earlier run directory.
    pub resume: Option<PathBuf>,
    /// Serve the job's figures for Prometheus here while it runs.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Loads `[signing] key` (and its passphrase) before anything starts.
fn load_signer(sg: &warden_agent::job::spec::SigningSpec) -> Result<p256::ecdsa::SigningKey, LaunchError> {
    let pass = match &sg.passphrase_env {
        Some(var) => match std::env::var(var) {
            Ok(p) if !p.is_empty() => Some(zeroize::Zeroizing::new(p)),
            _ => {
                return Err(LaunchError::Input(format!(
                    "[signing] passphrase_env names {var}, which is unset or empty; export the key's passphrase in it"
                )));
            }
        },
        None => None,
    };
    warden_agent::store::signing::load_private_key(&sg.key, pass.as_deref().map(String::as_str))
        .map_err(|e| LaunchError::Input(format!("[signing] key: {e}")))
}

/// The checkpoint side of a launch: key, series, and what is resumed.
struct CheckpointPlan {
    secret: Option<warden_agent::store::checkpoint::CheckpointSecret>,
    series: Option<JobId>,
    /// The resumed run's seed, which data order and dropout depend on.
    seed: Option<u64>,
}

impl CheckpointPlan {
    fn new(spec: &JobSpec, job_id: &JobId, resume: Option<&Path>) -> Result<CheckpointPlan, LaunchError> {
        use warden_agent::store::checkpoint::CheckpointSecret;
        let Some(ck) = &spec.checkpoint else {
            if let Some(dir) = resume {
                return Err(LaunchError::Input(format!(
                    "--resume {}: the job file has no [checkpoint] section, so there is nothing to resume from; add the one the earlier run used",
                    dir.display()
                )));
            }
            return Ok(CheckpointPlan { secret: None, series: None, seed: None });
        };
        let secret = match &ck.key_file {
            Some(path) => CheckpointSecret::load(path).map_err(|e| LaunchError::Input(e.to_string()))?,
            None => CheckpointSecret::generate(),
        };
        let Some(dir) = resume else {
            return Ok(CheckpointPlan { secret: Some(secret), series: Some(job_id.clone()), seed: None });
        };
        if ck.key_file.is_none() {
            return Err(LaunchError::Input(
                "--resume needs [checkpoint] key_file: without it each launch encrypts its checkpoints with a fresh key that ends with the job. \
                 Make one with `warden checkpoint keygen FILE`, name it in key_file, and launch again (earlier checkpoints without it cannot be read)"
                    .into(),
            ));
        }
        let run = crate::rundir::RunRecord::load(dir).map_err(LaunchError::Resume)?;
        let series = run.checkpoint_series.unwrap_or(run.job_id);
        let old_seed = run.seed;
        if let Some(seed) = spec.seed
            && seed != old_seed
        {
            return Err(LaunchError::Input(format!(
                "--resume: the job file sets seed = {seed}, but the run being resumed trained with seed {old_seed}; \
                 the data order depends on it, so use the same seed (or remove it from the job file)"
            )));
        }
        Ok(CheckpointPlan { secret: Some(secret), series: Some(series), seed: Some(old_seed) })
    }
}

/// How the job ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The run directory.
    pub run_dir: PathBuf,
    /// What was written to `summary.json`.
    pub summary: Summary,
    /// Every completed epoch.
    pub epochs: Vec<EpochRow>,
}

/// What the workers reported about one epoch so far.
#[derive(Debug, Default)]
struct EpochParts {
    losses: Vec<f64>,
    eval: Option<(f64, f64)>,
    steps: u64,
    samples_per_s: f64,
    slowest: Option<f64>,
    bytes_pushed: u64,
    bytes_pulled: u64,
}

impl EpochParts {
    /// One worker's report of the epoch.
    fn add(&mut self, train_loss: f64, steps: u64, samples_per_s: f64, bytes_pushed: u64, bytes_pulled: u64) {
        self.losses.push(train_loss);
        self.steps = steps;
        self.samples_per_s += samples_per_s;
        self.slowest = Some(self.slowest.map_or(samples_per_s, |v: f64| v.min(samples_per_s)));
        self.bytes_pushed += bytes_pushed;
        self.bytes_pulled += bytes_pulled;
    }
}

enum Report {
    Event(usize, Event),
    Exited(usize, Option<i32>),
    Broken(usize, String),
}

/// An agent's stdin; `None` once closed (which tells the agent to stop).
type ControlWriter = Arc<Mutex<Option<std::pin::Pin<Box<dyn AsyncWrite + Send>>>>>;

struct Proc {
    planned: PlannedProcess,
    stdin: ControlWriter,
    kill: Option<oneshot::Sender<Option<(u32, u64)>>>,
    /// Its process group (PID and start time), once it reported it.
    group: Option<(u32, u64)>,
    exit: Option<Option<i32>>,
    /// It sent a `failed` event (so its non-zero exit is no news).
    failed: bool,
}

/// Loads, checks and plans a job for launching.
pub fn prepare(job: &Path, local: bool) -> Result<(JobSpec, String, Plan), LaunchError> {
    let (spec, text) = JobSpec::load(job)?;
    if let (true, Some(data)) = (local, &spec.data) {
        let mut files = data.train.files("train");
        files.extend(data.test.iter().flat_map(|t| t.files("test")));
        for (key, path) in &files {
            if !path.is_file() {
                return Err(LaunchError::Input(format!(
                    "{}: [data] {key}: {} does not exist; fix the path (relative paths start at the job file's directory)",
                    job.display(),
                    path.display()
                )));
            }
        }
    }
    let problems = if local { warden_agent::job::preflight::check_program(&spec) } else { Vec::new() };
    if !problems.is_empty() {
        let lines: Vec<String> = problems.iter().map(|p| format!("{}: {p}", job.display())).collect();
        return Err(LaunchError::Input(lines.join("\nerror: ")));
    }
    let plan = Plan::new(&spec, &JobId::generate(), local);
    Ok((spec, text, plan))
}

/// Launches a job with `transport` and watches it to the end. With
/// `[training] on_failure = "restart"` a process failure stops every
/// process and starts the job again from the newest committed checkpoint,
/// up to `max_restarts` times, in the same run directory.
pub async fn launch(
    job: &Path,
    spec: JobSpec,
    text: String,
    plan: Plan,
    transport_for: impl FnOnce(&RunDir) -> Arc<dyn Transport>,
    opts: LaunchOptions,
) -> Result<Outcome, LaunchError> {
    let started = opts.started.unwrap_or_else(Instant::now);
    let checkpoints = CheckpointPlan::new(&spec, &plan.job_id, opts.resume.as_deref())?;
    let signer = spec.signing.as_ref().map(load_signer).transpose()?;
    let seed = checkpoints.seed.or(spec.seed).unwrap_or_else(warden_agent::secure_random::u64);
    // Bound before anything is made, so a port in use leaves nothing behind.
    let metrics_listener = match opts.metrics_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            LaunchError::Input(format!("--metrics-listen {addr}: {e}; choose a free port, e.g. --metrics-listen 9464"))
        })?),
        None => None,
    };
    let run = RunDir::create(opts.run_dir.clone(), &spec.name)?;
    let resumed_from = opts.resume.as_deref().map(|d| std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf()));
    let lineage = crate::rundir::Lineage {
        checkpoint_series: checkpoints.series.as_ref(),
        resumed_from: resumed_from.as_deref(),
    };
    run.write_start(&spec, &text, &plan, seed, job, lineage).map_err(|e| written(&run, e))?;
    let transport = transport_for(&run);
    if opts.epoch_lines {
        announce(&spec, &plan, &run);
    }
    let ctx = AttemptCtx {
        job,
        spec: &spec,
        text: &text,
        plan: &plan,
        base_dir: job_base_dir(job)?,
        seed,
        checkpoints: &checkpoints,
        transport: transport.clone(),
        run: &run,
        progress: Arc::new(Progress::new(opts.progress, opts.epoch_lines, opts.verbose)),
        epoch_lines: opts.epoch_lines,
        started,
        telemetry: Arc::new(crate::telemetry::Telemetry::new(Some(run.path()), &spec.name, spec.training.epochs)),
    };
    let metrics = match (opts.metrics_listen, metrics_listener) {
        (Some(addr), Some(listener)) => {
            if !addr.ip().is_loopback() {
                ctx.progress.println(&format!(
                    "  warning: --metrics-listen {addr} serves the job's figures without authentication beyond this machine"
                ));
            }
            if opts.epoch_lines {
                ctx.progress.println(&format!("  metrics for Prometheus: http://{addr}/metrics"));
            }
            Some(tokio::spawn(crate::telemetry::serve_metrics(listener, ctx.telemetry.clone())))
        }
        _ => None,
    };
    let mut acc = Accumulated {
        earlier: opts.resume.as_deref().map(crate::rundir::read_metrics).unwrap_or_default(),
        ..Accumulated::default()
    };
    let (end, restarts) = run_attempts(&ctx, opts.resume.is_some(), &mut acc).await?;
    ctx.progress.finish();
    if let Some(task) = metrics {
        task.abort();
    }
    transport.finish().await;
    conclude(&ctx, signer.as_ref(), end, acc, restarts)
}

/// The job's first line on the terminal: what runs where, and the run directory.
fn announce(spec: &JobSpec, plan: &Plan, run: &RunDir) {
    say_fmt!(
        "warden: job {} (id {}), {} processes on {} host(s){}, for at most {} h (max_hours); run directory {}",
        spec.name,
        plan.job_id,
        plan.processes.len(),
        plan.hosts.len(),
        if plan.local { ", all local" } else { "" },
        spec.max_hours,
        run.path().display()
    );
}

/// A file of the run directory could not be written.
fn written(run: &RunDir, e: std::io::Error) -> LaunchError {
    LaunchError::setup(format!("cannot write to {}", run.path().display()), e)
}

/// The job file's directory, absolute: relative paths in it start there.
fn job_base_dir(job: &Path) -> Result<PathBuf, LaunchError> {
    // `job.toml` has the parent "", which is the current directory.
    let parent = job.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::path::absolute(parent).map_err(|e| LaunchError::setup("cannot resolve the job file's directory", e))
}

/// Runs attempts until one ends for good: a process failure under
/// `on_failure = "restart"` starts another while `max_restarts` allows.
/// Returns the last attempt's end and the restarts, which are also written
/// to the run directory as they happen.
async fn run_attempts(
    ctx: &AttemptCtx<'_>,
    resuming: bool,
    acc: &mut Accumulated,
) -> Result<(AttemptEnd, Vec<crate::rundir::RestartRow>), LaunchError> {
    let run = ctx.run;
    let mut signals = Signals::new(ctx.spec);
    let max_restarts = ctx.spec.training.on_failure.max_restarts();
    let mut restarts: Vec<crate::rundir::RestartRow> = Vec::new();
    loop {
        let number = restarts.len() as u32;
        // A restart resumes when a checkpoint was committed (in this run or
        // the one it resumed); before the first, it starts from the beginning.
        // A launch with --resume always resumes, even if its first attempt
        // failed before its resume step was chosen.
        let resume = resuming || !acc.saved.is_empty() || acc.resumed;
        let logs = if number == 0 { run.logs() } else { run.logs().join(format!("restart-{number}")) };
        std::fs::create_dir_all(&logs)
            .map_err(|e| LaunchError::setup(format!("cannot create {}", logs.display()), e))?;
        let end = run_attempt(ctx, &logs, resume, acc, &mut signals).await?;
        if let Some(last) = restarts.last_mut() {
            last.resumed_from_step = end.resumed_step;
            run.write_restarts(&restarts).map_err(|e| written(run, e))?;
        }
        match &end.failure {
            Some(cause) if end.restartable && number < max_restarts => {
                let from = acc.saved.last().map(|c| c.step).or(acc.resumed_step);
                ctx.progress.println(&format!(
                    "warden: restarting ({} of {max_restarts}) after: {cause}\n  {}; logs of the new attempt in {}",
                    number + 1,
                    match (from, resuming) {
                        (Some(step), _) => format!("resuming from the newest valid checkpoint (step {step} or the newest before it that every server holds)"),
                        (None, true) => "resuming from the newest valid checkpoint of the series".to_string(),
                        (None, false) => "no checkpoint was committed yet, so it starts from the beginning".to_string(),
                    },
                    run.logs().join(format!("restart-{}", number + 1)).display()
                ));
                restarts.push(crate::rundir::RestartRow {
                    restart: number + 1,
                    after_s: ctx.started.elapsed().as_secs_f64(),
                    cause: cause.clone(),
                    processes: end.processes.clone(),
                    resumed_from_step: None,
                });
                run.write_restarts(&restarts).map_err(|e| written(run, e))?;
            }
            _ => return Ok((end, restarts)),
        }
    }
}

/// After the last attempt: the verdict, the model's signature and
/// `summary.json`.
fn conclude(
    ctx: &AttemptCtx<'_>,
    signer: Option<&p256::ecdsa::SigningKey>,
    mut end: AttemptEnd,
    acc: Accumulated,
    restarts: Vec<crate::rundir::RestartRow>,
) -> Result<Outcome, LaunchError> {
    let (spec, run) = (ctx.spec, ctx.run);
    let max_restarts = spec.training.on_failure.max_restarts();
    let Accumulated { rows, saved, first_resumed_step, suspects, .. } = acc;
    // A requested stop is no failure: the work done is kept.
    let (mut failure, stopped) = match end.failure.take() {
        Some(why) if end.stopped => (None, Some(why)),
        f => (f, None),
    };
    if let Some(f) = &mut failure
        && end.restartable
        && max_restarts > 0
    {
        *f = format!("{f}\n  (after {} restart(s), all that max_restarts = {max_restarts} allows)", restarts.len());
    }

    // The product: signed where the job says so, before anyone copies it.
    let mut signature = None;
    if let (Some(key), true, None) = (signer, end.model_fetched, &failure) {
        match warden_agent::store::signing::sign_model(&run.model_dir(), key, None) {
            Ok(path) => signature = Some(path),
            Err(e) => failure = Some(format!("the model was trained but cannot be signed: {e}")),
        }
    }
    if failure.is_none() && stopped.is_none() {
        failure = incomplete(spec, &end, &rows);
    }
    let last = rows.last();
    let status = match (&failure, &stopped) {
        (Some(_), _) => "failed",
        (None, Some(_)) => "stopped",
        (None, None) => "succeeded",
    };
    let summary = Summary {
        status: status.to_string(),
        job: spec.name.clone(),
        job_id: ctx.plan.job_id.to_string(),
        seed: ctx.seed,
        epochs: rows.len() as u32,
        steps: rows.iter().map(|r| r.steps).sum(),
        train_loss: last.map(|r| r.train_loss),
        // A program of the user's may report no test figures.
        test_loss: last.map(|r| r.test_loss).filter(|v| v.is_finite()),
        test_accuracy: last.map(|r| r.test_accuracy).filter(|v| v.is_finite()),
        samples_per_s: last.map(|r| r.samples_per_s),
        bytes_pushed: rows.iter().map(|r| r.bytes_pushed).sum(),
        bytes_pulled: rows.iter().map(|r| r.bytes_pulled).sum(),
        elapsed_s: ctx.started.elapsed().as_secs_f64(),
        startup_s: end.startup_s,
        failure,
        stopped,
        model: end.model_fetched.then(|| run.model_dir().join(warden_agent::store::artifact::MODEL_FILE)),
        model_step: end.model_fetched.then_some(end.model_step).flatten(),
        signature,
        resumed_from_step: first_resumed_step,
        checkpoints: saved,
        restarts,
        suspect_workers: suspects,
        processes: end.processes,
    };
    run.write_summary(&summary).map_err(|e| written(run, e))?;
    Ok(Outcome { run_dir: run.path().to_path_buf(), summary, epochs: rows })
}

/// Why a job that reported no failure still failed: it stopped before its
/// last epoch, or without a model.
fn incomplete(spec: &JobSpec, end: &AttemptEnd, rows: &[EpochRow]) -> Option<String> {
    // A resumed run reports only the epochs it ran (none if it resumed at the very end).
    let last_epoch = rows.last().map_or(0, |r| r.epoch);
    // An external program reports the epochs it likes (or none).
    let all_epochs = last_epoch == spec.training.epochs
        || (end.resumed_step.is_some() && rows.is_empty())
        || spec.model.kind == ModelKind::External;
    (!all_epochs || !end.model_fetched).then(|| {
        format!(
            "the job ended after epoch {last_epoch} of {}{}",
            spec.training.epochs,
            if end.model_fetched { "" } else { " without a model" }
        )
    })
}

/// What every attempt of a launch shares.
struct AttemptCtx<'a> {
    job: &'a Path,
    spec: &'a JobSpec,
    text: &'a str,
    plan: &'a Plan,
    base_dir: PathBuf,
    seed: u64,
    checkpoints: &'a CheckpointPlan,
    transport: Arc<dyn Transport>,
    run: &'a RunDir,
    progress: Arc<Progress>,
    epoch_lines: bool,
    started: Instant,
    /// steps.csv, TensorBoard events and the Prometheus figures.
    telemetry: Arc<crate::telemetry::Telemetry>,
}

/// What the attempts of a launch add up to.
#[derive(Default)]
struct Accumulated {
    /// Complete epochs, in order (a restart replaces those it runs again).
    rows: Vec<EpochRow>,
    /// With `--resume`: the resumed run's epochs, which the plot continues.
    earlier: Vec<EpochRow>,
    /// Checkpoints committed, over every attempt.
    saved: Vec<crate::rundir::CheckpointRow>,
    /// Warnings already shown.
    warnings: std::collections::BTreeSet<String>,
    /// Suspect workers the servers reported.
    suspects: Vec<crate::rundir::SuspectRow>,
    /// Some attempt resumed from a checkpoint.
    resumed: bool,
    /// The newest step an attempt resumed from.
    resumed_step: Option<u64>,
    /// The step the first attempt resumed from (`--resume`).
    first_resumed_step: Option<u64>,
}

/// Requested stops (SIGINT, SIGTERM, SIGHUP) and the `max_hours`
/// deadline, which span every attempt.
struct Signals {
    stops: StopSignals,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// A stop was requested or the deadline passed: the job is stopping.
    stopping: bool,
    timed_out: bool,
}

impl Signals {
    fn new(spec: &JobSpec) -> Signals {
        Signals {
            stops: StopSignals::install(),
            deadline: Box::pin(tokio::time::sleep(Duration::from_secs(u64::from(spec.max_hours) * 3600))),
            stopping: false,
            timed_out: false,
        }
    }
}

/// SIGINT (Ctrl-C), SIGTERM (`warden stop`, a service manager), SIGHUP
/// (the terminal closed) and SIGUSR1 (Slurm's warning that the allocation's
/// time limit is near, see [`crate::slurm::STOP_AHEAD_S`]). Each leads to the
/// same orderly stop; the handlers are installed at once, so that none of
/// these signals kills the launcher with its job's processes, firewall and
/// directories left behind.
struct StopSignals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
    usr1: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> StopSignals {
        use tokio::signal::unix::{SignalKind, signal};
        let installed = |kind: SignalKind| {
            signal(kind).map_err(|e| tracing::warn!("cannot handle signal {}: {e}", kind.as_raw_value())).ok()
        };
        StopSignals {
            int: installed(SignalKind::interrupt()),
            term: installed(SignalKind::terminate()),
            hup: installed(SignalKind::hangup()),
            usr1: installed(SignalKind::user_defined1()),
        }
    }

    /// The next stop signal's description. Cancel-safe: a signal that
    /// arrives while this is not polled is kept for the next call.
    async fn next(&mut self) -> &'static str {
        async fn arrives(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = arrives(&mut self.int) => "interrupted (Ctrl-C)",
            () = arrives(&mut self.term) => "stopped by SIGTERM (as `warden stop` sends)",
            () = arrives(&mut self.hup) => "stopped by SIGHUP (the terminal closed)",
            () = arrives(&mut self.usr1) => "stopped ahead of Slurm's time limit (SIGUSR1 from sbatch --signal)",
        }
    }
}

/// How one attempt ended.
struct AttemptEnd {
    /// What ended it early: a failure or a requested stop.
    failure: Option<String>,
    /// `failure` is a requested stop (a signal, `warden stop`, `max_hours`).
    stopped: bool,
    /// A process failed: `on_failure = "restart"` applies. Set-up errors
    /// (firewall, starting an agent), Ctrl-C and the deadline do not.
    restartable: bool,
    model_fetched: bool,
    /// The training step of the model's weights.
    model_step: Option<u64>,
    startup_s: Option<f64>,
    /// The checkpoint step this attempt resumed from.
    resumed_step: Option<u64>,
    processes: Vec<crate::rundir::ProcessExit>,
}

/// How long the teardown of one host (job directories, firewall table) may
/// take before the launcher gives up on it and says what may be left there.
const TEARDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// How long a requested stop waits for worker 0 to finish its step and
/// save the model before it stops every process without it.
const FINISH_GRACE: Duration = Duration::from_secs(60);

/// Runs the job once, in phases: hosts set up (uid and firewall), agents
/// started and enrolled (with a fresh CA), watched until every process has
/// ended, hosts torn down. Nothing of this attempt is left running when it
/// returns.
async fn run_attempt(
    ctx: &AttemptCtx<'_>,
    logs: &Path,
    resume: bool,
    acc: &mut Accumulated,
    signals: &mut Signals,
) -> Result<AttemptEnd, LaunchError> {
    // A fresh CA for every attempt: certificates of a failed attempt's
    // processes are worthless to the next one.
    let ca = Arc::new(
        JobCa::new(&ctx.plan.job_id, Duration::from_secs(u64::from(ctx.spec.max_hours) * 3600))
            .map_err(|e| LaunchError::setup("cannot make the job's CA", e))?,
    );
    let mut failure = Failures::default();
    // Every host first: the job's uid and firewall table, so that no
    // listener opens on an unprotected host.
    let host_job = crate::transport::HostJob { job: ctx.plan.job_id.clone(), uids: ctx.spec.cluster.uids };
    let set_up = set_up_hosts(ctx, &host_job, acc, &mut failure).await;
    let (tx, rx) = mpsc::channel::<Report>(4096);
    let (mut procs, index) = start_processes(ctx, logs, &ca, resume, &set_up, tx, &mut failure).await;
    if failure.is_some() {
        ctx.progress.hush();
        stop_all(&mut procs).await;
    }
    let mut watch = Watch::new(ctx, logs, index, &set_up);
    watch.run(rx, &mut procs, &mut failure, acc, signals).await?;
    tear_down_hosts(ctx, &host_job, &set_up, &procs).await;
    let stopped = failure.stopped();
    let (failure, restartable) = failure.root();
    Ok(AttemptEnd {
        failure,
        stopped,
        restartable,
        model_fetched: watch.model_fetched,
        model_step: watch.model_step,
        startup_s: watch.startup_s,
        resumed_step: watch.resumed_step,
        processes: procs
            .iter()
            .map(|p| crate::rundir::ProcessExit { process: p.planned.label(), exit_code: p.exit.flatten() })
            .collect(),
    })
}

/// The uid a process on `host` runs as: its host's lease (locally, every
/// host is this machine, set up once as the plan's first host).
fn uid_of(plan: &Plan, set_up: &BTreeMap<String, Option<u32>>, host: &str) -> Option<u32> {
    set_up.get(if plan.local { plan.hosts[0].name.as_str() } else { host }).copied().flatten()
}

/// Starts every agent at once, each with its bundle; each enrols as soon as
/// its CSR arrives (answered in [`start_one`]). Returns the started
/// processes in plan order and, since one that failed to start leaves a
/// gap, the map from plan index to position.
async fn start_processes(
    ctx: &AttemptCtx<'_>,
    logs: &Path,
    ca: &Arc<JobCa>,
    resume: bool,
    set_up: &BTreeMap<String, Option<u32>>,
    tx: mpsc::Sender<Report>,
    failure: &mut Failures,
) -> (Vec<Proc>, BTreeMap<usize, usize>) {
    let (spec, plan, transport) = (ctx.spec, ctx.plan, &ctx.transport);
    ctx.progress.phase(&format!("starting {} processes", plan.processes.len()));
    let start_ctx = Arc::new(StartCtx {
        transport: transport.clone(),
        ca: ca.clone(),
        logs: logs.to_path_buf(),
        progress: ctx.progress.clone(),
    });
    let mut starts = tokio::task::JoinSet::new();
    for (i, p) in plan.processes.iter().enumerate().filter(|_| failure.is_none()) {
        let uid = uid_of(plan, set_up, &p.host);
        let bundle = Bundle {
            job_id: plan.job_id.clone(),
            job_toml: ctx.text.to_string(),
            job_file: ctx.job.display().to_string(),
            base_dir: ctx.base_dir.clone(),
            // Hosts the launcher read (a list, a Slurm allocation) go with
            // the job: agents never resolve names or ask Slurm.
            hosts: (spec.cluster.hosts_from.is_some() || spec.cluster.slurm.is_some())
                .then(|| spec.cluster.hosts.clone()),
            seed: ctx.seed,
            local: plan.local,
            role: p.role,
            rank: p.rank,
            workdir: transport.workdir(p),
            job_uid: uid,
            resume,
            checkpoint_series: ctx.checkpoints.series.clone(),
            // The key goes to the servers only: they alone write checkpoints.
            checkpoint_key: ctx.checkpoints.secret.clone().filter(|_| p.role == Role::Server),
        };
        let (p, tx, sctx) = (p.clone(), tx.clone(), start_ctx.clone());
        starts.spawn(async move {
            let r = start_one(i, &p, bundle, &sctx, tx, uid).await;
            (i, p, r)
        });
    }
    let mut started = Vec::new();
    while let Some(joined) = starts.join_next().await {
        match joined {
            Ok((i, _, Ok(proc_))) => started.push((i, proc_)),
            Ok((_, p, Err(e))) => failure.add(Cause::Setup, format!("{}: {}", p.label(), Chain(&e))),
            Err(e) => failure.add(Cause::Setup, e.to_string()),
        }
    }
    // Reports carry the plan index: keep procs in plan order.
    started.sort_by_key(|(i, _)| *i);
    let index = started.iter().enumerate().map(|(k, (i, _))| (*i, k)).collect();
    (started.into_iter().map(|(_, p)| p).collect(), index)
}

/// Sets up every host at once (one slow host must not delay the others):
/// `warden-agent host setup` leases the job's uid and installs its firewall
/// table there. Returns the uid of each host that was set up; a failure is
/// added to `failure`.
async fn set_up_hosts(
    ctx: &AttemptCtx<'_>,
    job: &crate::transport::HostJob,
    acc: &mut Accumulated,
    failure: &mut Failures,
) -> BTreeMap<String, Option<u32>> {
    let plan = ctx.plan;
    let hosts: Vec<&warden_agent::job::plan::HostPlan> =
        if plan.local { plan.hosts.iter().take(1).collect() } else { plan.hosts.iter().collect() };
    let mut setups = tokio::task::JoinSet::new();
    for host in hosts {
        let (t, host, job) = (ctx.transport.clone(), host.clone(), job.clone());
        setups.spawn(async move {
            let r = t.setup_host(&host, &job).await;
            (host.name, r)
        });
    }
    let (mut set_up, mut errors) = (BTreeMap::new(), Vec::new());
    while let Some(joined) = setups.join_next().await {
        match joined {
            Ok((name, Ok(setup))) => {
                if let Some(warning) = setup.warning
                    && acc.warnings.insert(warning.clone())
                {
                    say_fmt!("warning: {warning}")
                }
                set_up.insert(name, setup.uid);
            }
            Ok((name, Err(e))) => {
                errors.push(format!("{name}: cannot set up the job's uid and firewall: {}", Chain(&e)))
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        errors.sort();
        failure.add(Cause::Setup, errors.join("; "));
    } else if ctx.epoch_lines && set_up.values().any(Option::is_some) {
        ctx.progress.println(&format!(
            "  firewall table and a uid of the job's own on {} host(s) ({:.2}s)",
            set_up.len(),
            ctx.started.elapsed().as_secs_f64()
        ));
    }
    set_up
}

/// Every host at once, each within a deadline (a host that went away must
/// hold neither the others nor the launcher): first every process of the
/// job's uid ends, the firewall table goes and the uid is released
/// (`warden-agent host teardown`), then the job directories are removed.
async fn tear_down_hosts(
    ctx: &AttemptCtx<'_>,
    job: &crate::transport::HostJob,
    set_up: &BTreeMap<String, Option<u32>>,
    procs: &[Proc],
) {
    let table = warden_agent::job::plan::firewall_table(&job.job);
    let mut cleanups = tokio::task::JoinSet::new();
    for host in &ctx.plan.hosts {
        let mine: Vec<PlannedProcess> =
            procs.iter().filter(|p| p.planned.host == host.name).map(|p| p.planned.clone()).collect();
        let uid = set_up.get(&host.name).copied();
        if mine.is_empty() && uid.is_none() {
            continue;
        }
        let (t, host, job, table) = (ctx.transport.clone(), host.clone(), job.clone(), table.clone());
        cleanups.spawn(async move {
            let work = async {
                let torn = match uid {
                    Some(uid) => t.teardown_host(&host, &job, uid).await.map(|said| {
                        if !said.is_empty() {
                            tracing::info!("{}: {said}", host.name);
                        }
                    }),
                    None => Ok(()),
                };
                for p in &mine {
                    if let Err(e) = t.cleanup(p).await {
                        tracing::warn!("cleanup on {}: {e}", p.label());
                    }
                }
                torn.map_err(|e| {
                    format!("cannot end the job's processes and remove firewall table {table}: {}", Chain(&e))
                })
            };
            let result = tokio::time::timeout(TEARDOWN_DEADLINE, work).await.unwrap_or_else(|_| {
                Err(format!(
                    "did not answer within {} s; its job directory, processes and firewall table {table} may be left",
                    TEARDOWN_DEADLINE.as_secs()
                ))
            });
            (host.name, result)
        });
    }
    while let Some(joined) = cleanups.join_next().await {
        if let Ok((name, Err(e))) = joined {
            say_fmt!(
                "warning: {name}: {e}; playbooks/teardown.yml (or `sudo warden firewall clean` on that host) removes leftovers"
            );
        }
    }
}
