//! `warden launch`: PKI, start, enrol, watch, fetch, tear down.
//!
//! One task per agent reads its events (answering its CSR), one copies its
//! stderr into its log, one waits for its exit. Everything they learn flows
//! into a single loop here, which decides when the job succeeded or failed
//! and stops every process either way: nothing is left running.

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
    };
    let mut acc = Accumulated::default();
    let (end, restarts) = run_attempts(&ctx, opts.resume.is_some(), &mut acc).await?;
    ctx.progress.finish();
    transport.finish().await;
    conclude(&ctx, signer.as_ref(), end, acc, restarts)
}

/// The job's first line on the terminal: what runs where, and the run directory.
fn announce(spec: &JobSpec, plan: &Plan, run: &RunDir) {
    say_fmt!(
        "warden: job {} (id {}), {} processes on {} host(s){}; run directory {}",
        spec.name,
        plan.job_id,
        plan.processes.len(),
        plan.hosts.len(),
        if plan.local { ", all local" } else { "" },
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
    let Accumulated { rows, saved, first_resumed_step, .. } = acc;
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
        test_loss: last.map(|r| r.test_loss),
        test_accuracy: last.map(|r| r.test_accuracy),
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
}

/// What the attempts of a launch add up to.
#[derive(Default)]
struct Accumulated {
    /// Complete epochs, in order (a restart replaces those it runs again).
    rows: Vec<EpochRow>,
    /// Checkpoints committed, over every attempt.
    saved: Vec<crate::rundir::CheckpointRow>,
    /// Warnings already shown.
    warnings: std::collections::BTreeSet<String>,
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

/// SIGINT (Ctrl-C), SIGTERM (`warden stop`, a service manager) and SIGHUP
/// (the terminal closed). Each leads to the same orderly stop; the handlers
/// are installed at once, so that none of these signals kills the launcher
/// with its job's processes, firewall and directories left behind.
struct StopSignals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
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

/// What ended an attempt, most telling first: when one process dies, its
/// peers fail too moments later ("connection reset"); the report names the
/// one that died, not the first to notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cause {
    /// The firewall, an agent's start or the model fetch: never restarted.
    Setup,
    /// Exited non-zero or killed, without saying why.
    Crashed,
    /// Its control channel broke.
    Broken,
    /// It reported a failure (incl. the scheduler declaring a peer dead).
    Reported,
    /// It reported a failure that follows from another process's (a peer's
    /// connection closed under it, or the scheduler aborted the job).
    Follows,
    /// It exited non-zero, or its channel broke, after the job began stopping.
    Stopping,
    /// Ctrl-C or `max_hours`: never restarted; the cause if it came first.
    Stopped,
}

/// How long the teardown of one host (job directories, firewall table) may
/// take before the launcher gives up on it and says what may be left there.
const TEARDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// How long a requested stop waits for worker 0 to finish its step and
/// save the model before it stops every process without it.
const FINISH_GRACE: Duration = Duration::from_secs(60);

/// The failures of one attempt, gathered for a moment after the first.
#[derive(Default)]
struct Failures {
    first_at: Option<Instant>,
    /// Each with the log whose last lines tell more, if any.
    seen: Vec<(Cause, String, Option<PathBuf>)>,
}

impl Failures {
    /// How long after the first failure others still count as candidates.
    const WINDOW: Duration = Duration::from_secs(1);

    fn add(&mut self, cause: Cause, message: String) {
        self.add_with_log(cause, message, None);
    }

    /// A failure whose process's log says more: its last lines are shown
    /// with the message, read once every process has ended (and so every
    /// log is complete).
    fn add_with_log(&mut self, cause: Cause, message: String, log: Option<PathBuf>) {
        let first = *self.first_at.get_or_insert_with(Instant::now);
        if first.elapsed() <= Self::WINDOW || matches!(cause, Cause::Stopped) {
            self.seen.push((cause, message, log));
        }
    }

    fn is_some(&self) -> bool {
        self.first_at.is_some()
    }

    fn is_none(&self) -> bool {
        self.first_at.is_none()
    }

    /// A requested stop came before any failure.
    fn stopped(&self) -> bool {
        matches!(self.seen.first(), Some((Cause::Stopped, ..)))
    }

    /// The root cause, and whether `on_failure = "restart"` applies.
    fn root(self) -> (Option<String>, bool) {
        let stopped = self.seen.iter().any(|(c, ..)| matches!(c, Cause::Stopped | Cause::Setup));
        if let Some((Cause::Stopped, ..)) = self.seen.first() {
            return (self.seen.into_iter().next().map(|(_, m, _)| m), false);
        }
        // min_by_key keeps the earliest of equal causes.
        match self.seen.into_iter().enumerate().min_by_key(|(i, (c, ..))| (*c, *i)) {
            Some((_, (_, message, None))) => (Some(message), !stopped),
            Some((_, (_, message, Some(log)))) => {
                (Some(format!("{message}\n  last lines of {}:\n{}", log.display(), tail(&log, 12))), !stopped)
            }
            None => (None, false),
        }
    }
}

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
            hosts: spec.cluster.hosts_from.as_ref().map(|_| spec.cluster.hosts.clone()),
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

/// Watching one attempt: its processes' events become progress, metrics
/// rows, checkpoints and the model; exits and broken channels become
/// failures, each of which stops the others.
struct Watch<'w, 'a> {
    ctx: &'w AttemptCtx<'a>,
    logs: &'w Path,
    /// Plan index -> position in the attempt's processes.
    index: BTreeMap<usize, usize>,
    set_up: &'w BTreeMap<String, Option<u32>>,
    workers: usize,
    epochs: BTreeMap<u32, EpochParts>,
    model_at: Option<(usize, PathBuf)>,
    model_fetched: bool,
    /// The training step of the model's weights, as worker 0 said.
    model_step: Option<u64>,
    /// A requested stop waits until then for worker 0 to save the model.
    finish_by: Option<tokio::time::Instant>,
    resumed_step: Option<u64>,
    started_count: usize,
    enrolled: usize,
    startup_s: Option<f64>,
}

impl<'w, 'a> Watch<'w, 'a> {
    fn new(
        ctx: &'w AttemptCtx<'a>,
        logs: &'w Path,
        index: BTreeMap<usize, usize>,
        set_up: &'w BTreeMap<String, Option<u32>>,
    ) -> Self {
        Watch {
            ctx,
            logs,
            index,
            set_up,
            workers: ctx.plan.count(Role::Worker) as usize,
            epochs: BTreeMap::new(),
            model_at: None,
            model_fetched: false,
            model_step: None,
            finish_by: None,
            resumed_step: None,
            started_count: 0,
            enrolled: 0,
            startup_s: None,
        }
    }

    /// Stops every process; from now on what they say stays in their logs.
    async fn stop_all(&self, procs: &mut [Proc]) {
        self.ctx.progress.hush();
        stop_all(procs).await;
    }

    fn uid_of(&self, host: &str) -> Option<u32> {
        uid_of(self.ctx.plan, self.set_up, host)
    }

    /// Until every process has exited (or every report sender is gone).
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Report>,
        procs: &mut [Proc],
        failure: &mut Failures,
        acc: &mut Accumulated,
        signals: &mut Signals,
    ) -> Result<(), LaunchError> {
        while procs.iter().any(|p| p.exit.is_none()) {
            let finish_by = self.finish_by;
            let report = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => break },
                why = signals.stops.next() => {
                    self.on_stop_request(why.to_string(), procs, failure, &mut signals.stopping).await;
                    continue;
                }
                // Guarded: a completed future must not be polled again.
                _ = &mut signals.deadline, if !signals.timed_out => {
                    signals.timed_out = true;
                    let why = format!("the job ran longer than max_hours = {}", self.ctx.spec.max_hours);
                    self.on_stop_request(why, procs, failure, &mut signals.stopping).await;
                    continue;
                }
                _ = tokio::time::sleep_until(finish_by.unwrap_or_else(tokio::time::Instant::now)), if finish_by.is_some() => {
                    self.finish_by = None;
                    self.ctx.progress.println(&format!(
                        "warden: worker[0] did not save the model within {}s; stopping without it",
                        FINISH_GRACE.as_secs()
                    ));
                    self.stop_all(procs).await;
                    continue;
                }
            };
            // Plan index -> position in `procs`.
            let report = match report {
                Report::Event(i, e) => self.index.get(&i).map(|k| Report::Event(*k, e)),
                Report::Exited(i, c) => self.index.get(&i).map(|k| Report::Exited(*k, c)),
                Report::Broken(i, w) => self.index.get(&i).map(|k| Report::Broken(*k, w)),
            };
            match report {
                Some(Report::Event(i, ev)) => self.on_event(i, ev, procs, failure, acc).await,
                Some(Report::Exited(i, code)) => self.on_exit(i, code, procs, failure).await,
                Some(Report::Broken(i, why)) => self.on_broken(i, why, procs, failure).await,
                None => continue,
            }
            self.complete_epochs(acc)?;
            self.fetch_model(procs, failure).await;
            if self.finish_by.is_some() && self.model_fetched {
                // The work is kept: now the job stops.
                self.finish_by = None;
                self.stop_all(procs).await;
            }
        }
        Ok(())
    }

    /// A stop was requested (a signal, `warden stop`, `max_hours`). The
    /// first keeps the work where it can: worker 0 finishes the step under
    /// way and saves the model, which is fetched before every process is
    /// stopped. A second stops at once.
    async fn on_stop_request(&mut self, why: String, procs: &mut [Proc], failure: &mut Failures, stopping: &mut bool) {
        if std::mem::replace(stopping, true) {
            self.ctx.progress.println(&format!("warden: {why} again: stopping at once"));
            self.finish_by = None;
            self.stop_all(procs).await;
            return;
        }
        let healthy = failure.is_none();
        failure.add(Cause::Stopped, why.clone());
        let worker0 = procs.iter().find(|p| p.planned.role == Role::Worker && p.planned.rank == 0 && p.exit.is_none());
        let keeps_work = healthy && !self.model_fetched && self.ctx.spec.model.kind != ModelKind::External;
        if let (true, Some(w)) = (keeps_work, worker0)
            && send_control(&w.stdin, &Control::Finish).await.is_ok()
        {
            self.ctx.progress.println(&format!(
                "warden: {why}: finishing the step under way and saving the model (a second Ctrl-C stops at once)"
            ));
            self.finish_by = Some(tokio::time::Instant::now() + FINISH_GRACE);
        } else {
            self.stop_all(procs).await;
        }
    }

    async fn on_event(
        &mut self,
        i: usize,
        ev: Event,
        procs: &mut [Proc],
        failure: &mut Failures,
        acc: &mut Accumulated,
    ) {
        match ev {
            Event::Progress { epoch, step, steps } => {
                self.ctx.progress.step(epoch, self.ctx.spec.training.epochs, step, steps)
            }
            Event::Epoch { epoch, train_loss, steps, samples_per_s, bytes_pushed, bytes_pulled } => {
                self.epochs.entry(epoch).or_default().add(train_loss, steps, samples_per_s, bytes_pushed, bytes_pulled)
            }
            Event::Eval { epoch, test_loss, test_accuracy } => {
                self.epochs.entry(epoch).or_default().eval = Some((test_loss, test_accuracy))
            }
            // Only the job's own model directory, whatever the event says.
            Event::Model { path, step } if path == self.ctx.transport.workdir(&procs[i].planned).join("model") => {
                self.model_at = Some((i, path));
                self.model_step = step;
            }
            Event::Model { path, .. } => {
                let label = procs[i].planned.label();
                let message = format!("{label}: named {} as its model, not its own model directory", path.display());
                failure.add(Cause::Reported, message);
                self.stop_all(procs).await;
            }
            Event::Checkpoint { step, bytes } => self.on_checkpoint(step, bytes, acc),
            Event::Resumed { step } => self.on_resumed(step, acc),
            Event::Failed { message, follows } => {
                procs[i].failed = true;
                let cause = if follows { Cause::Follows } else { Cause::Reported };
                // A process that failed by itself (a user program, say) may have said why in its log.
                let log = (!follows).then(|| self.logs.join(log_name(&procs[i].planned)));
                failure.add_with_log(cause, format!("{}: {message}", procs[i].planned.label()), log);
                self.stop_all(procs).await;
            }
            Event::Warning { message } => {
                if acc.warnings.insert(message.clone()) {
                    self.ctx.progress.println(&format!("warning: {message}"));
                }
            }
            Event::Started => self.on_started(procs.len()),
            Event::Csr { .. } => self.on_enrolled(procs.len()),
            Event::Process { pid, start } => procs[i].group = Some((pid, start)),
            Event::Done | Event::Listening { .. } => {}
        }
    }

    fn on_checkpoint(&mut self, step: u64, bytes: u64, acc: &mut Accumulated) {
        if self.ctx.epoch_lines {
            self.ctx.progress.println(&format!(
                "  checkpoint at step {step}: {:.1} MB, encrypted, on the servers' hosts",
                bytes as f64 / 1e6
            ));
        }
        acc.saved.push(crate::rundir::CheckpointRow { step, bytes });
    }

    fn on_resumed(&mut self, step: u64, acc: &mut Accumulated) {
        if self.ctx.epoch_lines {
            self.ctx.progress.println(&format!("  resuming from checkpoint step {step}"));
        }
        self.resumed_step = Some(step);
        acc.resumed = true;
        acc.resumed_step = Some(step);
        acc.first_resumed_step.get_or_insert(step);
    }

    /// One more process started; once all of `total` have, the start-up time is known.
    fn on_started(&mut self, total: usize) {
        self.started_count += 1;
        self.ctx.progress.phase(&format!("started {}/{} processes", self.started_count, total));
        if self.started_count == total && self.startup_s.is_none() {
            let at = self.ctx.started.elapsed().as_secs_f64();
            self.startup_s = Some(at);
            if self.ctx.epoch_lines {
                self.ctx
                    .progress
                    .println(&format!("  {n}/{n} processes started ({at:.2}s); training", n = self.started_count));
            }
        }
    }

    /// One more process sent its CSR (answered as it arrived, in [`start_one`]).
    fn on_enrolled(&mut self, total: usize) {
        self.enrolled += 1;
        self.ctx.progress.phase(&format!("enrolled {}/{} processes", self.enrolled, total));
        if self.enrolled == total && self.ctx.epoch_lines {
            self.ctx.progress.println(&format!(
                "  {n}/{n} processes enrolled: keys made on their hosts, certificates from this job's CA ({:.2}s)",
                self.ctx.started.elapsed().as_secs_f64(),
                n = self.enrolled
            ));
        }
    }

    async fn on_exit(&mut self, i: usize, code: Option<i32>, procs: &mut [Proc], failure: &mut Failures) {
        procs[i].exit = Some(code);
        // A process that said why it failed has been counted already.
        if code != Some(0) && !procs[i].failed {
            let label = procs[i].planned.label();
            let log = self.logs.join(log_name(&procs[i].planned));
            let what = match code {
                Some(c) => format!("{label} exited with status {c}"),
                None => format!("{label} was killed by a signal"),
            };
            // A signal is news even while stopping (the launcher sends
            // none in the grace period); a plain non-zero exit after
            // the stop is just the process obeying it.
            let cause = if code.is_none() || failure.is_none() { Cause::Crashed } else { Cause::Stopping };
            failure.add_with_log(cause, what, Some(log));
            self.stop_all(procs).await;
        }
    }

    async fn on_broken(&mut self, i: usize, why: String, procs: &mut [Proc], failure: &mut Failures) {
        // A channel that breaks once the job is stopping is the stop's doing.
        let cause = if failure.is_none() { Cause::Broken } else { Cause::Stopping };
        failure.add(cause, format!("{}: {why}", procs[i].planned.label()));
        self.stop_all(procs).await;
    }

    /// Complete epochs become metrics rows, in order.
    fn complete_epochs(&mut self, acc: &mut Accumulated) -> Result<(), LaunchError> {
        while let Some((&epoch, parts)) = self.epochs.first_key_value() {
            let Some((test_loss, test_accuracy)) = parts.eval else { break };
            if parts.losses.len() < self.workers {
                break;
            }
            let row = EpochRow {
                epoch,
                train_loss: parts.losses.iter().sum::<f64>() / parts.losses.len() as f64,
                test_loss,
                test_accuracy,
                steps: parts.steps,
                samples_per_s: parts.samples_per_s,
                slowest_worker_samples_per_s: parts.slowest.unwrap_or_default(),
                bytes_pushed: parts.bytes_pushed,
                bytes_pulled: parts.bytes_pulled,
                elapsed_s: self.ctx.started.elapsed().as_secs_f64(),
            };
            if self.ctx.epoch_lines {
                self.ctx.progress.println(&format!(
                    "  epoch {}/{}: train loss {:.4}, test loss {:.4}, test accuracy {:.4}, {:.0} samples/s ({:.1}s)",
                    row.epoch,
                    self.ctx.spec.training.epochs,
                    row.train_loss,
                    row.test_loss,
                    row.test_accuracy,
                    row.samples_per_s,
                    row.elapsed_s
                ));
            }
            // After a restart, an epoch run again replaces what the failed attempt wrote.
            if acc.rows.last().is_some_and(|r| r.epoch >= row.epoch) {
                acc.rows.retain(|r| r.epoch < row.epoch);
                acc.rows.push(row);
                self.ctx.run.write_metrics(&acc.rows).map_err(|e| written(self.ctx.run, e))?;
            } else {
                self.ctx.run.append_metrics(&row).map_err(|e| written(self.ctx.run, e))?;
                acc.rows.push(row);
            }
            self.epochs.pop_first();
            if self.ctx.spec.data.is_some()
                && let Err(e) = crate::plot::draw(&self.ctx.run.path().join("plot.png"), &acc.rows)
            {
                tracing::warn!("cannot draw plot.png: {e}");
            }
        }
        Ok(())
    }

    /// The model, once worker 0 said where it is.
    async fn fetch_model(&mut self, procs: &mut [Proc], failure: &mut Failures) {
        if let Some((i, path)) = self.model_at.take() {
            let limits = crate::transport::FetchLimits {
                uid: self.uid_of(&procs[i].planned.host),
                max_bytes: model_fetch_limit(self.ctx.spec),
            };
            match self.ctx.transport.fetch_dir(&procs[i].planned, &path, &self.ctx.run.model_dir(), limits).await {
                Ok(()) => self.model_fetched = true,
                Err(e) => {
                    failure.add(
                        Cause::Setup,
                        format!("cannot fetch the model from {}: {}", procs[i].planned.label(), Chain(&e)),
                    );
                    self.stop_all(procs).await;
                }
            }
        }
    }
}

/// The most a model fetch may bring back: the parameters as f32 twice
/// over (a format's overhead is far below that), plus room for metadata.
fn model_fetch_limit(spec: &JobSpec) -> u64 {
    (warden_agent::train::model::num_params(&spec.model) as u64).saturating_mul(8).saturating_add(64 << 20)
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

/// The log file name of a process in `DIR/logs/`.
pub fn log_name(p: &PlannedProcess) -> String {
    format!("{}-{}-{}.log", p.host, p.role, p.rank)
}

/// The last `n` lines of a log, indented, for failure reports.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !is_chatter(l) && !l.starts_with("[event] ")).collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// An agent's log line at INFO or below (`2026-12-06T02:35:17.009450Z
/// INFO target: ...`): the per-process log's business, not the terminal's.
/// A user program's own output and WARN/ERROR lines are not chatter.
pub(crate) fn is_chatter(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let stamped = words.next().is_some_and(|w| w.len() > 20 && w.as_bytes()[0].is_ascii_digit() && w.contains('T'));
    stamped && matches!(words.next(), Some("INFO" | "DEBUG" | "TRACE"))
}

/// What every agent's start shares.
struct StartCtx {
    transport: Arc<dyn Transport>,
    ca: Arc<JobCa>,
    logs: PathBuf,
    progress: Arc<Progress>,
}

/// A process's log file, shared by the tasks that serve it.
type Log = Arc<Mutex<tokio::fs::File>>;

/// Why an agent could not be started.
#[derive(Debug, thiserror::Error)]
enum StartError {
    /// The transport could not start it.
    #[error(transparent)]
    Spawn(std::io::Error),
    /// Its log file cannot be made.
    #[error("cannot create its log")]
    Log(#[source] std::io::Error),
    /// It did not take its bundle.
    #[error("cannot send the bundle")]
    Bundle(#[source] std::io::Error),
}

/// Starts one agent, sends its bundle, and spawns the tasks that serve it.
async fn start_one(
    i: usize,
    p: &PlannedProcess,
    bundle: Bundle,
    ctx: &StartCtx,
    tx: mpsc::Sender<Report>,
    uid: Option<u32>,
) -> Result<Proc, StartError> {
    let StartCtx { transport, ca, logs, progress } = ctx;
    let spawned = transport.spawn_agent(p).await.map_err(StartError::Spawn)?;
    let log: Log =
        Arc::new(Mutex::new(tokio::fs::File::create(logs.join(log_name(p))).await.map_err(StartError::Log)?));
    let stdin: ControlWriter = Arc::new(Mutex::new(Some(spawned.stdin)));
    send_control(&stdin, &Control::Bundle(Box::new(bundle))).await.map_err(StartError::Bundle)?;

    // stderr -> log file, and the terminal with the process's label.
    let stderr_done =
        tokio::spawn(copy_stderr(BufReader::new(spawned.stderr), log.clone(), p.label(), progress.clone()));
    // stdout -> events; the CSR is answered here.
    let (events_done_tx, events_done_rx) = oneshot::channel::<()>();
    let events = EventReader {
        i,
        who: Identity { job: ca.job().clone(), role: p.role, rank: p.rank },
        address: p.address,
        ca: ca.clone(),
        stdin: stdin.clone(),
        tx: tx.clone(),
        log: log.clone(),
    };
    tokio::spawn(events.run(BufReader::new(spawned.stdout), events_done_tx));
    // exit status; a kill request ends it early.
    let (kill_tx, kill_rx) = oneshot::channel::<Option<(u32, u64)>>();
    {
        let mut handle = spawned.handle;
        let label = p.label();
        tokio::spawn(async move {
            let code = tokio::select! {
                r = handle.wait() => r,
                Ok(group) = kill_rx => {
                    let said = handle.terminate(group, uid).await;
                    tracing::warn!("{label} did not stop on request: {said}");
                    let line = format!("[launcher] did not stop on request: {said}\n");
                    let _ = log.lock().await.write_all(line.as_bytes()).await;
                    // A host that went away cannot report the exit: give up.
                    tokio::time::timeout(Duration::from_secs(15), handle.wait()).await.unwrap_or(Ok(None))
                }
            };
            // Report the exit only after the process's last event (its
            // reason for failing, usually) and the last line of its log
            // (a program's traceback), so neither is lost.
            let _ = tokio::time::timeout(Duration::from_secs(2), events_done_rx).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), stderr_done).await;
            let _ = tx.send(Report::Exited(i, code.unwrap_or(None))).await;
        });
    }
    Ok(Proc { planned: p.clone(), stdin, kill: Some(kill_tx), group: None, exit: None, failed: false })
}

/// Copies an agent's stderr into its log and to the terminal, labelled.
async fn copy_stderr(
    stderr: BufReader<Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
    log: Log,
    label: String,
    progress: Arc<Progress>,
) {
    let mut lines = stderr.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        progress.log_line(&label, &line);
        let mut f = log.lock().await;
        let _ = f.write_all(format!("{line}\n").as_bytes()).await;
    }
}

/// The task that reads one agent's events: each is logged, a CSR is
/// answered with a certificate from the job's CA, and each is reported as
/// plan index `i`.
struct EventReader {
    i: usize,
    who: Identity,
    address: std::net::IpAddr,
    ca: Arc<JobCa>,
    stdin: ControlWriter,
    tx: mpsc::Sender<Report>,
    log: Log,
}

impl EventReader {
    /// Until the agent's stdout ends, the channel breaks or nobody listens.
    async fn run(
        self,
        mut reader: BufReader<Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
        events_done: oneshot::Sender<()>,
    ) {
        // Dropped on every return: tells the exit task that all events are in.
        let _events_done = events_done;
        let mut line = Vec::new();
        loop {
            line.clear();
            match self.next_event(&mut reader, &mut line).await {
                Ok(None) => return,
                Ok(Some(ev)) => {
                    if self.tx.send(Report::Event(self.i, ev)).await.is_err() {
                        return;
                    }
                }
                Err(why) => {
                    let _ = self.tx.send(Report::Broken(self.i, why)).await;
                    return;
                }
            }
        }
    }

    /// Reads, logs and parses the next event, answering it if it is a CSR;
    /// `None` at the end of the stream, an error when the channel broke.
    async fn next_event(
        &self,
        reader: &mut BufReader<Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
        line: &mut Vec<u8>,
    ) -> Result<Option<Event>, String> {
        let n = (&mut *reader)
            .take(MAX_CONTROL_LINE as u64 + 1)
            .read_until(b'\n', line)
            .await
            .map_err(|e| format!("reading its events: {e}"))?;
        if n == 0 {
            return Ok(None);
        }
        let ev: Event = serde_json::from_slice(line).map_err(|e| format!("sent an unreadable event: {e}"))?;
        // A CSR's PEM text says nothing to someone reading the log.
        let logged: &[u8] = if matches!(ev, Event::Csr { .. }) { b"{\"event\":\"csr\"}\n" } else { line };
        let _ = self.log.lock().await.write_all(&[b"[event] ", logged].concat()).await;
        if let Event::Csr { pem } = &ev {
            let cert_pem =
                self.ca.sign_csr(pem, &self.who, Some(self.address)).map_err(|e| format!("enrolment failed: {e}"))?;
            let answer = Control::Certificate { cert_pem, ca_pem: self.ca.cert_pem().to_string() };
            send_control(&self.stdin, &answer).await.map_err(|e| format!("cannot send its certificate: {e}"))?;
        }
        Ok(Some(ev))
    }
}

async fn send_control(stdin: &ControlWriter, msg: &Control) -> std::io::Result<()> {
    // Cleared when dropped: a bundle may carry the checkpoint key.
    let line = msg.to_line().map_err(std::io::Error::other)?;
    let mut guard = stdin.lock().await;
    let w = guard.as_mut().ok_or_else(|| std::io::Error::other("control channel already closed"))?;
    w.write_all(&line).await?;
    w.flush().await
}

/// Asks every agent to stop, closes their control channels and, after a
/// grace period, kills whatever is still running.
async fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        let _ = tokio::time::timeout(Duration::from_secs(1), send_control(&p.stdin, &Control::Stop)).await;
        p.stdin.lock().await.take();
    }
    let kills: Vec<_> = procs.iter_mut().filter_map(|p| p.kill.take().map(|k| (k, p.group))).collect();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        for (k, group) in kills {
            let _ = k.send(group);
        }
    });
}

/// Writes a line to stderr, ignoring failure: a closed terminal or pipe must
/// never stop the launcher before it has torn the job down.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The terminal display: a progress bar when interactive, plain lines always.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// Stream the processes' log lines to the terminal: WARN and ERROR
    /// lines and a program's own output, or (`-v`) every line.
    stream_logs: bool,
    verbose: bool,
    /// The job is stopping: what processes say now is the stop's echo
    /// ("stopped by the launcher", connections closing), left to their logs.
    quiet: std::sync::atomic::AtomicBool,
    /// The first step has been shown (the bar left the phase spinner).
    training: std::sync::atomic::AtomicBool,
}

impl Progress {
    fn new(enabled: bool, stream_logs: bool, verbose: bool) -> Progress {
        let bar = enabled.then(|| {
            let b = indicatif::ProgressBar::new(0);
            // A spinner with the phase until the first step, then the epoch bar.
            b.set_style(indicatif::ProgressStyle::with_template("  {spinner} {msg}").expect("valid template"));
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress { bar, stream_logs, verbose, quiet: Default::default(), training: Default::default() }
    }
    /// The phase before training (starting, enrolling), on the spinner.
    fn phase(&self, what: &str) {
        if let Some(b) = &self.bar
            && !self.training.load(std::sync::atomic::Ordering::Relaxed)
        {
            b.set_message(what.to_string());
        }
    }
    /// One line of a process's log, prefixed with its label.
    fn log_line(&self, label: &str, line: &str) {
        let shown = self.verbose
            || (self.stream_logs && !is_chatter(line) && !self.quiet.load(std::sync::atomic::Ordering::Relaxed));
        if shown {
            self.println(&format!("{label} {line}"));
        }
    }

    /// From now on, processes' lines go to their logs only (unless `-v`).
    fn hush(&self) {
        self.quiet.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    /// Step `step` of `steps` in epoch `epoch` of `epochs`: the bar runs
    /// over the whole job, so it ends full and its ETA is the job's.
    fn step(&self, epoch: u32, epochs: u32, step: u64, steps: u64) {
        if let Some(b) = &self.bar {
            if !self.training.swap(true, std::sync::atomic::Ordering::Relaxed) {
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "  {spinner} epoch {msg} [{bar:30}] {percent:>3}%, about {eta} left",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
            }
            b.set_length(u64::from(epochs) * steps);
            b.set_position(u64::from(epoch.saturating_sub(1)) * steps + step);
            b.set_message(format!("{epoch}/{epochs}"));
        }
    }
    fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| say(line)),
            None => say(line),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Cause, Failures};

    fn root(reports: &[(Cause, &str)]) -> (Option<String>, bool) {
        let mut f = Failures::default();
        for (cause, message) in reports {
            f.add(*cause, (*message).to_string());
        }
        f.root()
    }

    #[test]
    fn a_verdict_outranks_the_symptoms_reported_before_it() {
        // Seen in CI: a worker whose peer closed under it reported before the
        // scheduler's heartbeat verdict that explains it.
        let (message, restartable) = root(&[
            (Cause::Follows, "worker[1]: i/o: peer closed connection"),
            (Cause::Follows, "server[0]: the job was aborted: server[1] declared dead"),
            (Cause::Reported, "scheduler[0]: server[1] sent nothing for 4 s: declared dead"),
            (Cause::Stopping, "worker[0] exited with status 1"),
        ]);
        assert_eq!(message.as_deref(), Some("scheduler[0]: server[1] sent nothing for 4 s: declared dead"));
        assert!(restartable);
    }

    #[test]
    fn a_symptom_is_named_when_nothing_explains_it() {
        let (message, _) = root(&[(Cause::Stopping, "x exited"), (Cause::Follows, "worker[1]: peer closed")]);
        assert_eq!(message.as_deref(), Some("worker[1]: peer closed"));
    }

    #[test]
    fn a_crash_outranks_every_report_and_ctrl_c_first_is_never_restarted() {
        let (message, _) = root(&[(Cause::Reported, "a"), (Cause::Crashed, "worker[0] was killed by a signal")]);
        assert_eq!(message.as_deref(), Some("worker[0] was killed by a signal"));
        let (message, restartable) = root(&[(Cause::Stopped, "interrupted"), (Cause::Crashed, "b")]);
        assert_eq!(message.as_deref(), Some("interrupted"));
        assert!(!restartable);
    }

    #[test]
    fn the_bar_spans_the_whole_job_and_ends_full() {
        let p = super::Progress::new(true, false, false);
        let bar = p.bar.as_ref().unwrap();
        p.step(1, 5, 20, 62);
        assert_eq!((bar.position(), bar.length()), (20, Some(310)));
        // The last step of the last epoch, which worker 0 always reports.
        p.step(5, 5, 62, 62);
        assert_eq!(Some(bar.position()), bar.length());
    }

    #[test]
    fn chatter_is_info_and_below_from_the_agents_log_format() {
        assert!(super::is_chatter("2026-12-06T02:35:17.009450Z  INFO warden_agent::agent: running as uid 2"));
        assert!(!super::is_chatter("2026-12-06T02:35:17.009450Z  WARN warden_agent: refused"));
        assert!(!super::is_chatter("2026-12-06T02:35:17.009450Z ERROR warden_agent: stopped"));
        assert!(!super::is_chatter("Traceback (most recent call last):"));
        assert!(!super::is_chatter("epoch 3: test accuracy 0.81"));
    }
}
