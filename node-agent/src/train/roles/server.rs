//! A parameter server: holds one contiguous shard of the parameters, sums
//! the workers' gradients and applies the optimizer.
//!
//! It admits only workers on its port (checked in the TLS handshake). In
//! sync mode a step's update happens once every worker has pushed for that
//! step; in async mode each push is applied on arrival. Pulls wait until the
//! shard reaches the version asked for.
//!
//! Worker 0 may set the initial values before the first update, unless the
//! job starts from signed weights (`[model] init`): those are refused.
//! Worker 0 asks for a checkpoint at most once per step it pushed, each of
//! a later step than the last. Version and step counters from the wire are
//! checked, so a value at the end of the range is refused, never wrapped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::{CheckpointCtx, RateLimitedLog, RoleCtx, RoleError};
use crate::job::spec::SyncMode;
use crate::net::conn::{Acceptor, ConnError, ServerConn};
use crate::net::identity::Role;
use crate::net::wire::{DecodeError, Message, ShardDigest, TAG_PUSH, push_view};
use crate::store::checkpoint::{CheckpointError, Manifest, Placement, ShardRecord};
use crate::train::optimizer::{OptimizerSpec, ShardOptimizer};

/// Why a server refuses a worker's request (and closes its connection);
/// the worker is told this text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum Refusal {
    /// The request did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message only other roles' peers are sent.
    #[error("`{0}` is not something a server accepts")]
    NotAccepted(&'static str),
    /// A gradient of another length than the shard.
    #[error("push of {got} values, but this shard holds {holds}")]
    PushLength {
        /// Values pushed.
        got: usize,
        /// Values of the shard.
        holds: usize,
    },
    /// The shard's version cannot grow any more.
    #[error("the shard is at version {0}, the last there is; no update can follow")]
    LastVersion(u64),
    /// Sync mode: a push for another step than the shard's.
    #[error("push for step {step}, but the shard is at step {at}")]
    PushStep {
        /// The push's step.
        step: u64,
        /// The shard's.
        at: u64,
    },
    /// A worker rank beyond the plan's workers.
    #[error("worker rank {0} is not in the plan")]
    NotInPlan(u32),
    /// Sync mode: a second push of one worker for one step.
    #[error("worker {rank} pushed twice for step {step}")]
    PushedTwice {
        /// The worker.
        rank: u32,
        /// The step.
        step: u64,
    },
    /// Initial values in a job that starts from signed weights.
    #[error(
        "this job starts from the signed weights of [model] init; a worker may not replace them \
         (a program's `init` values are ignored in such a job)"
    )]
    SignedInit,
    /// Initial values from a worker other than 0.
    #[error("only worker 0 sets initial values")]
    InitNotWorker0,
    /// Initial values after training began.
    #[error("initial values after {0} update(s); init comes before training")]
    InitAfterUpdates(u64),
    /// Initial values of another length than the shard.
    #[error("initial values for {got} parameters, but this shard holds {holds}")]
    InitLength {
        /// Values given.
        got: usize,
        /// Values of the shard.
        holds: usize,
    },
    /// A pull for a version more than one update ahead.
    #[error("pull for version {min_version}, but the shard is at {current}")]
    PullAhead {
        /// The version asked for.
        min_version: u64,
        /// The shard's.
        current: u64,
    },
    /// A checkpoint asked for by a worker other than 0.
    #[error("only worker 0 may ask for a checkpoint")]
    CheckpointNotWorker0,
    /// A checkpoint in a job without `[checkpoint]`.
    #[error("this job takes no checkpoints ([checkpoint] is not set)")]
    NoCheckpoints,
    /// A checkpoint of a step not after the last one's.
    #[error("checkpoint of step {step} asked for, but step {last} came before it; each checkpoint is of a later step")]
    CheckpointNotLater {
        /// The step asked for.
        step: u64,
        /// The last checkpoint's.
        last: u64,
    },
    /// Sync mode: a checkpoint of another step than the shard's.
    #[error("checkpoint of step {step} asked for, but the shard is at step {at}")]
    CheckpointStep {
        /// The step asked for.
        step: u64,
        /// The shard's.
        at: u64,
    },
    /// A checkpoint of another step than worker 0 pushed.
    #[error("checkpoint of step {step} asked for, but worker 0 has pushed {pushed} steps")]
    CheckpointNotPushed {
        /// The step asked for.
        step: u64,
        /// Steps worker 0 pushed.
        pushed: u64,
    },
    /// The checkpoint writer is gone.
    #[error("the checkpoint writer stopped")]
    WriterStopped,
}

/// Why this server could not write its part of a checkpoint; the
/// scheduler is told this text, and training goes on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum CheckpointWriteError {
    /// The step's directory could not be made.
    #[error("{}: {source}", dir.display())]
    StepDir {
        /// The directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifest an abandoned run left in the step could not be removed.
    #[error("{0}")]
    StaleManifest(#[source] std::io::Error),
    /// The shard file could not be written.
    #[error(transparent)]
    Shard(#[from] CheckpointError),
    /// The blocking task writing it failed.
    #[error("the checkpoint writer failed: {0}")]
    Writer(#[source] tokio::task::JoinError),
    /// The step number cannot grow any more.
    #[error("checkpoint step {0} is the last there is")]
    LastStep(u64),
    /// The step's manifest could not be written.
    #[error("checkpoint step {step}: {source}")]
    Manifest {
        /// The step.
        step: u64,
        /// Cause.
        #[source]
        source: CheckpointError,
    },
    /// Older steps could not be deleted.
    #[error("checkpoint retention in {}: {source}", dir.display())]
    Retention {
        /// The series directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The blocking task committing it failed.
    #[error("{0}")]
    Committer(#[source] tokio::task::JoinError),
}

/// Why a worker's connection ended early.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    /// The connection failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The server refused a request.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// The shard and its update state.
///
/// A `std::sync::Mutex`, not a tokio one: nothing awaits while holding it,
/// and the critical sections are short loops over memory.
struct Shard {
    state: Mutex<ShardState>,
    version: watch::Sender<u64>,
    workers: usize,
    mode: SyncMode,
    /// The job starts from verified signed weights (`[model] init`), which
    /// no worker may replace.
    signed_init: bool,
    /// The encoded params frame of the newest version, made by the first
    /// puller and shared by the rest: encode once, send W times.
    frame: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

struct ShardState {
    params: Vec<f32>,
    /// Sync mode: each worker's push body for the current step, until all
    /// are in; then one fused pass sums them and applies the optimizer.
    pending: Vec<Vec<u8>>,
    pushed: Vec<bool>,
    count: usize,
    version: u64,
    opt: ShardOptimizer,
    /// Steps worker 0 has pushed (counted from the version training started at).
    worker0_steps: u64,
    /// The step of the newest checkpoint asked for (or where training started).
    last_checkpoint: u64,
}

impl ShardState {
    /// Training starts at `version` with `params`.
    fn new(params: Vec<f32>, workers: usize, version: u64, opt: ShardOptimizer) -> ShardState {
        ShardState {
            params,
            pending: vec![Vec::new(); workers],
            pushed: vec![false; workers],
            count: 0,
            version,
            opt,
            worker0_steps: version,
            last_checkpoint: version,
        }
    }

    /// Counts an accepted push of worker `rank`'s.
    fn count_step_of(&mut self, rank: u32) {
        if rank == 0 {
            // At most the version plus one, which exists (`push` checks it first).
            self.worker0_steps = self.worker0_steps.saturating_add(1);
        }
    }
}

impl Shard {
    /// Takes a push body (any encoding, see [`crate::net::wire::push_view`]).
    /// In sync mode the body is kept until every worker's is in: it is
    /// swapped into the shard, and `body` comes back holding a spare
    /// buffer (no copy of the gradient).
    fn push(&self, rank: u32, body: &mut Vec<u8>) -> Result<(), Refusal> {
        let (step, grad) = push_view(body)?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if grad.len() != st.params.len() {
            return Err(Refusal::PushLength { got: grad.len(), holds: st.params.len() });
        }
        let Some(next) = st.version.checked_add(1) else {
            return Err(Refusal::LastVersion(st.version));
        };
        match self.mode {
            SyncMode::Async => {
                let ShardState { params, opt, .. } = &mut *st;
                opt.apply(params, &[grad], 1);
                st.count_step_of(rank);
            }
            SyncMode::Sync => {
                if step != st.version {
                    return Err(Refusal::PushStep { step, at: st.version });
                }
                let r = rank as usize;
                if r >= st.pushed.len() {
                    return Err(Refusal::NotInPlan(rank));
                }
                if st.pushed[r] {
                    return Err(Refusal::PushedTwice { rank, step });
                }
                st.pushed[r] = true;
                st.count_step_of(rank);
                std::mem::swap(&mut st.pending[r], body);
                st.count += 1;
                if st.count < self.workers {
                    return Ok(());
                }
                let ShardState { params, pending, opt, .. } = &mut *st;
                // Validated on arrival above; the views cannot fail now.
                let grads: Vec<_> = pending.iter().filter_map(|b| push_view(b).ok().map(|(_, g)| g)).collect();
                opt.apply(params, &grads, self.workers);
                st.pushed.fill(false);
                st.count = 0;
            }
        }
        st.version = next;
        self.version.send_replace(st.version);
        Ok(())
    }

    /// Worker 0's initial values (an external model's `init`), before any update.
    fn set_params(&self, rank: u32, data: Vec<f32>) -> Result<(), Refusal> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.signed_init {
            return Err(Refusal::SignedInit);
        }
        if rank != 0 {
            return Err(Refusal::InitNotWorker0);
        }
        if st.version != 0 || st.count != 0 {
            return Err(Refusal::InitAfterUpdates(st.version));
        }
        if data.len() != st.params.len() {
            return Err(Refusal::InitLength { got: data.len(), holds: st.params.len() });
        }
        st.params = data;
        drop(st);
        // The cached frame of version 0 is stale now.
        *self.frame.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// A copy of the state for checkpoint `step`. In sync mode the shard is
    /// exactly at that step when worker 0 asks (its next push has not been
    /// sent), so the copy is the state after `step` updates. In either mode
    /// `step` is the number of steps worker 0 pushed, and later than the
    /// last checkpoint's: one checkpoint per step at most, so worker 0
    /// cannot make the server copy and write its state faster than it trains.
    fn snapshot(&self, step: u64) -> Result<crate::store::checkpoint::ShardState, Refusal> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if step <= st.last_checkpoint {
            return Err(Refusal::CheckpointNotLater { step, last: st.last_checkpoint });
        }
        if self.mode == SyncMode::Sync && st.version != step {
            return Err(Refusal::CheckpointStep { step, at: st.version });
        }
        if st.worker0_steps != step {
            return Err(Refusal::CheckpointNotPushed { step, pushed: st.worker0_steps });
        }
        st.last_checkpoint = step;
        let (t, slots) = st.opt.state();
        Ok(crate::store::checkpoint::ShardState { t, params: st.params.clone(), slots })
    }

    /// Waits until the shard reaches `min_version`; a pull more than one
    /// update ahead could wait forever and is refused.
    async fn reach(&self, min_version: u64) -> Result<(), Refusal> {
        let mut rx = self.version.subscribe();
        let current = *rx.borrow();
        if min_version > current.saturating_add(1) {
            return Err(Refusal::PullAhead { min_version, current });
        }
        // The sender lives as long as the shard, so this only ends on success.
        let _ = rx.wait_for(|v| *v >= min_version).await;
        Ok(())
    }

    /// The encoded params frame of the current version.
    fn params_frame(&self) -> Arc<Vec<u8>> {
        let mut cache = self.frame.lock().unwrap_or_else(|p| p.into_inner());
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, frame)) = cache.as_ref()
            && *v == st.version
        {
            return frame.clone();
        }
        // Reuse the old buffer when no connection still holds it.
        let mut buf = cache.take().and_then(|(_, f)| Arc::try_unwrap(f).ok()).unwrap_or_default();
        buf.clear();
        crate::net::wire::encode_params(st.version, &st.params, &mut buf);
        let frame = Arc::new(buf);
        *cache = Some((st.version, frame.clone()));
        frame
    }
}

/// Runs server `ctx.me().rank` on an already bound listener until the job ends.
pub async fn run(mut ctx: RoleCtx, listener: TcpListener) -> Result<(), RoleError> {
    // Signed initial weights are verified before this server joins the job.
    let initial = ctx.initial.take();
    let mut sched = ctx.scheduler_link().await?;
    let mut from_sched = sched.forward();
    let silence = sched.timeout();
    let place = ShardPlace::of(&ctx);
    if ctx.resume {
        let steps = resumable_steps(&ctx, place).await?;
        sched.send(&Message::Resumable { steps }).await?;
    }
    let (spec, restored) = await_start(&ctx, &mut from_sched, silence, place).await?;
    let shard = Arc::new(starting_shard(&ctx, place, spec, restored, initial)?);
    let range = ctx.plan.shard(place.rank);
    tracing::info!("serving parameters {}..{} with {spec}", range.start, range.end);
    ctx.emit(crate::net::control::Event::Started);

    let (writer, snapshots, mut saved_rx) = start_writer(&ctx, place);
    let accept = accept_workers(&ctx, listener, shard, snapshots)?;
    let result = follow_scheduler(&ctx, &sched, &mut from_sched, &mut saved_rx, silence, place.shards).await;
    accept.abort();
    if let Some(w) = writer {
        // The scheduler waits for every requested checkpoint to commit
        // before the shutdown: a write still going on means the job failed,
        // and its temporary file never counts.
        w.abort();
    }
    if result.is_ok() {
        end_of_job_retention(&ctx).await;
    }
    result
}

/// The shard training starts from: a checkpoint's state when resuming,
/// else the initial weights (signed ones, or the model's from the seed).
fn starting_shard(
    ctx: &RoleCtx,
    place: ShardPlace,
    spec: OptimizerSpec,
    restored: Option<(u64, crate::store::checkpoint::ShardState)>,
    initial: Option<Vec<f32>>,
) -> Result<Shard, RoleError> {
    let (version, params, opt) = match restored {
        Some((step, st)) => {
            let opt =
                ShardOptimizer::restore(spec, place.len, st.t, st.slots).map_err(|e| RoleError::new(e.to_string()))?;
            tracing::info!("resumed from checkpoint step {step}");
            (step, st.params, opt)
        }
        None => {
            let all = initial.unwrap_or_else(|| crate::train::model::init(&ctx.spec.model, ctx.seed));
            (0, all[ctx.plan.shard(place.rank)].to_vec(), ShardOptimizer::new(spec, place.len))
        }
    };
    let workers = ctx.plan.count(Role::Worker) as usize;
    Ok(Shard {
        state: Mutex::new(ShardState::new(params, workers, version, opt)),
        version: watch::Sender::new(version),
        workers,
        mode: ctx.spec.training.mode,
        signed_init: ctx.spec.init.is_some(),
        frame: Mutex::new(None),
    })
}

/// What the checkpoint writer reports: each step's record, or why it failed.
type Saved = mpsc::Receiver<(u64, Result<ShardRecord, CheckpointWriteError>)>;

/// Starts the checkpoint writer of a job with `[checkpoint]`: connection
/// tasks snapshot the state and queue it (at most one waiting: a slow disk
/// slows training rather than filling memory); the writer encrypts and
/// writes them in turn and reports each.
fn start_writer(ctx: &RoleCtx, place: ShardPlace) -> (Option<tokio::task::JoinHandle<()>>, Snapshots, Saved) {
    let (snap_tx, snap_rx) = mpsc::channel::<(u64, crate::store::checkpoint::ShardState)>(1);
    let (saved_tx, saved_rx) = mpsc::channel(4);
    let (rank, shards) = (place.rank, place.shards);
    let writer = ctx.checkpoint.clone().map(|ck| tokio::spawn(write_loop(ck, rank, shards, snap_rx, saved_tx)));
    let snapshots = writer.as_ref().map(|_| snap_tx);
    (writer, snapshots, saved_rx)
}

/// Serves the workers on `listener`, each connection on a task of its own;
/// one that fails is logged (at a bounded rate) and dropped.
fn accept_workers(
    ctx: &RoleCtx,
    listener: TcpListener,
    shard: Arc<Shard>,
    snapshots: Snapshots,
) -> Result<tokio::task::JoinHandle<()>, RoleError> {
    let acceptor = Acceptor::new(&ctx.tls, &[Role::Worker], ctx.limits())?;
    let log = Arc::new(RateLimitedLog::default());
    let serve = {
        let log = log.clone();
        move |conn: ServerConn, first, from| {
            let (shard, snapshots, log) = (shard.clone(), snapshots.clone(), log.clone());
            async move {
                let peer = conn.peer().clone();
                if let Err(e) = serve_worker(conn, first, &shard, snapshots).await {
                    log.warn(&format!("dropped {peer} from {from}: {e}"));
                }
            }
        }
    };
    Ok(tokio::spawn(super::accept_loop(listener, acceptor, log, serve)))
}

/// Until the scheduler ends the job: commits the checkpoints it announces
/// and tells it what the writer saved or failed to save.
async fn follow_scheduler(
    ctx: &RoleCtx,
    sched: &super::SchedLink,
    from_sched: &mut mpsc::Receiver<Result<Message, RoleError>>,
    saved: &mut Saved,
    silence: Duration,
    shards: u32,
) -> Result<(), RoleError> {
    let lost = |e: RoleError| RoleError::new(format!("lost the scheduler: {e}"));
    loop {
        tokio::select! {
            m = next(from_sched, silence) => match m {
                Ok(Message::Shutdown) => return Ok(()),
                Ok(Message::Abort { reason }) => return Err(RoleError::aborted(&reason)),
                Ok(Message::CheckpointCommit { step, shards: records }) => {
                    let Some(reply) = commit_step(ctx, step, shards, records).await else { continue };
                    sched.send(&reply).await.map_err(lost)?;
                }
                Ok(Message::SetOptimizer(_)) => {
                    return Err(RoleError::new("changing the optimizer during training is not supported"));
                }
                Ok(m) => tracing::warn!("ignoring unexpected `{}` from the scheduler", m.name()),
                Err(e) => return Err(RoleError { message: format!("lost the scheduler: {}", e.message), ..e }),
            },
            Some((step, outcome)) = saved.recv() => {
                let msg = match outcome {
                    Ok(r) => Message::CheckpointSaved { step, record: to_digest(&r) },
                    Err(e) => Message::CheckpointFailed { step, reason: e.to_string() },
                };
                sched.send(&msg).await.map_err(lost)?;
            }
        }
    }
}

/// Where this server's shard sits in the job.
#[derive(Debug, Clone, Copy)]
struct ShardPlace {
    rank: u32,
    shards: u32,
    len: usize,
    shape: crate::store::checkpoint::Shape,
}

impl ShardPlace {
    fn of(ctx: &RoleCtx) -> ShardPlace {
        let rank = ctx.me().rank;
        let len = ctx.plan.shard(rank).len();
        let slots = ShardOptimizer::new(ctx.spec.optimizer, 0).slots();
        let shape = crate::store::checkpoint::Shape { len: Some(len), slots: Some(slots) };
        ShardPlace { rank, shards: ctx.plan.count(Role::Server), len, shape }
    }
}

/// The checkpoint steps this server can resume from, newest first, all
/// verified; what it could not use is reported as warnings.
async fn resumable_steps(ctx: &RoleCtx, place: ShardPlace) -> Result<Vec<u64>, RoleError> {
    let ck = ctx.checkpoint.clone().ok_or_else(|| RoleError::new("resuming needs [checkpoint] in the job file"))?;
    let ShardPlace { rank, shards, shape, .. } = place;
    let (steps, warnings) = tokio::task::spawn_blocking(move || {
        crate::store::checkpoint::resumable_steps(&ck.series_dir, &ck.key, &ck.series, rank, shards, shape)
    })
    .await
    .map_err(|e| RoleError::new(e.to_string()))?
    .map_err(|e| RoleError::new(format!("reading the checkpoint directory: {e}")))?;
    for w in warnings {
        // Logged as the event's line; the launcher shows it once.
        ctx.emit(crate::net::control::Event::Warning { message: format!("server[{rank}]: {w}") });
    }
    Ok(steps)
}

/// Until the scheduler says start: the optimizer, and the checkpoint step
/// to resume from (loaded), if any.
async fn await_start(
    ctx: &RoleCtx,
    from_sched: &mut mpsc::Receiver<Result<Message, RoleError>>,
    silence: Duration,
    place: ShardPlace,
) -> Result<(OptimizerSpec, Option<(u64, crate::store::checkpoint::ShardState)>), RoleError> {
    let mut optimizer: Option<OptimizerSpec> = None;
    let mut restored = None;
    loop {
        match next(from_sched, silence).await? {
            Message::SetOptimizer(spec) => optimizer = Some(spec),
            Message::ResumeFrom { step } => {
                let ck = ctx.checkpoint.clone().ok_or_else(|| RoleError::new("resume without [checkpoint]"))?;
                let at = Placement { job: ck.series.clone(), step, shard: place.rank, shards: place.shards };
                let shape = place.shape;
                let state = tokio::task::spawn_blocking(move || {
                    crate::store::checkpoint::load_step(&ck.series_dir, &ck.key, &at, shape)
                })
                .await
                .map_err(|e| RoleError::new(e.to_string()))?
                .map_err(|e| RoleError::new(format!("cannot load checkpoint step {step}: {e}")))?;
                restored = Some((step, state));
            }
            Message::Start => break,
            Message::Abort { reason } => return Err(RoleError::aborted(&reason)),
            m => return Err(RoleError::new(format!("unexpected `{}` from the scheduler before the start", m.name()))),
        }
    }
    let spec = optimizer.ok_or_else(|| RoleError::new("the scheduler started the job without an optimizer"))?;
    Ok((spec, restored))
}

/// Writes this server's manifest of checkpoint `step` and applies
/// `keep_last`; the answer for the scheduler, which announces a checkpoint
/// only once every server's manifest is on disk. `None` without checkpoints.
async fn commit_step(ctx: &RoleCtx, step: u64, shards: u32, records: Vec<ShardDigest>) -> Option<Message> {
    let ck = ctx.checkpoint.clone()?;
    let keep = ctx.spec.checkpoint.as_ref().map_or(1, |c| c.keep_last);
    let done = tokio::task::spawn_blocking(move || commit(&ck, step, shards, &records, keep))
        .await
        .map_err(CheckpointWriteError::Committer)
        .and_then(|r| r);
    Some(match done {
        Ok(()) => Message::CheckpointCommitted { step },
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!("{reason}");
            Message::CheckpointFailed { step, reason }
        }
    })
}

/// After a successful job only `keep_last_after_job` checkpoint steps stay.
async fn end_of_job_retention(ctx: &RoleCtx) {
    let (Some(ck), Some(spec)) = (ctx.checkpoint.clone(), ctx.spec.checkpoint.clone()) else { return };
    let keep = spec.keep_last_after_job;
    match tokio::task::spawn_blocking(move || crate::store::checkpoint::prune(&ck.series_dir, keep, None)).await {
        Ok(Ok(deleted)) if !deleted.is_empty() => {
            tracing::info!("end of job: deleted checkpoint steps {deleted:?}, kept the newest {keep}")
        }
        Ok(Err(e)) => tracing::warn!("end-of-job checkpoint retention failed: {e}"),
        _ => {}
    }
}

/// The next scheduler message other than a heartbeat, through the channel
/// (so waiting can race other work in a `select!`), or an error after
/// `silence` without any message.
async fn next(rx: &mut mpsc::Receiver<Result<Message, RoleError>>, silence: Duration) -> Result<Message, RoleError> {
    loop {
        let waited = tokio::time::timeout(silence, rx.recv())
            .await
            .map(|m| m.unwrap_or_else(|| Err(RoleError::follows("the scheduler connection ended"))));
        if let Some(out) = super::settle(waited, silence) {
            return out;
        }
    }
}

fn to_digest(r: &ShardRecord) -> ShardDigest {
    let mut sha256 = [0u8; 32];
    for (i, b) in sha256.iter_mut().enumerate() {
        *b = u8::from_str_radix(&r.sha256[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    ShardDigest { shard: r.shard, bytes: r.bytes, sha256 }
}

/// Writes queued snapshots one after the other.
async fn write_loop(
    ck: CheckpointCtx,
    rank: u32,
    shards: u32,
    mut rx: mpsc::Receiver<(u64, crate::store::checkpoint::ShardState)>,
    done: mpsc::Sender<(u64, Result<ShardRecord, CheckpointWriteError>)>,
) {
    while let Some((step, state)) = rx.recv().await {
        let ck = ck.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let dir = crate::store::checkpoint::step_dir(&ck.series_dir, step);
            std::fs::create_dir_all(&dir)
                .map_err(|source| CheckpointWriteError::StepDir { dir: dir.clone(), source })?;
            // A manifest left by an abandoned run of this series no longer describes this step.
            match std::fs::remove_file(dir.join(crate::store::checkpoint::MANIFEST)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(CheckpointWriteError::StaleManifest(e));
                }
                _ => {}
            }
            let at = Placement { job: ck.series.clone(), step, shard: rank, shards };
            let path = dir.join(crate::store::checkpoint::shard_file(rank));
            Ok(crate::store::checkpoint::write_shard(
                &path,
                &ck.key,
                &at,
                &state,
                crate::store::checkpoint::DEFAULT_CHUNK,
            )?)
        })
        .await
        .unwrap_or_else(|e| Err(CheckpointWriteError::Writer(e)));
        if let Err(e) = &outcome {
            tracing::warn!("checkpoint step {step}: {e}");
        }
        if done.send((step, outcome)).await.is_err() {
            return;
        }
    }
}

/// Writes the manifest of a committed step, then applies `keep_last`.
fn commit(
    ck: &CheckpointCtx,
    step: u64,
    shards: u32,
    records: &[ShardDigest],
    keep: usize,
) -> Result<(), CheckpointWriteError> {
    // Retention spares the steps after this one, which may still be written.
    let after = step.checked_add(1).ok_or(CheckpointWriteError::LastStep(step))?;
    let files = records
        .iter()
        .map(|d| ShardRecord {
            shard: d.shard,
            file: crate::store::checkpoint::shard_file(d.shard),
            bytes: d.bytes,
            sha256: d.sha256.iter().map(|b| format!("{b:02x}")).collect(),
        })
        .collect();
    let m = Manifest { format: 1, job_id: ck.series.clone(), step, shards, key_id: ck.key.id_hex(), files };
    let dir = crate::store::checkpoint::step_dir(&ck.series_dir, step);
    crate::store::checkpoint::write_manifest(&dir, &ck.key, &m)
        .map_err(|source| CheckpointWriteError::Manifest { step, source })?;
    let deleted = crate::store::checkpoint::prune(&ck.series_dir, keep, Some(after))
        .map_err(|source| CheckpointWriteError::Retention { dir: ck.series_dir.clone(), source })?;
    if !deleted.is_empty() {
        tracing::info!("checkpoint step {step} complete; deleted steps {deleted:?} (keep_last = {keep})");
    }
    Ok(())
}

type Snapshots = Option<mpsc::Sender<(u64, crate::store::checkpoint::ShardState)>>;

/// Serves one worker until it closes its connection; a refused request
/// ends the connection (the worker is told why).
async fn serve_worker(
    mut conn: ServerConn,
    first: Message,
    shard: &Shard,
    snapshots: Snapshots,
) -> Result<(), ServeError> {
    let rank = conn.peer().rank;
    // The first message arrived decoded (it came through the deadline check).
    let mut pending = Some(first);
    let mut spare = Vec::new();
    loop {
        let action = match pending.take() {
            Some(m) => Action::of(m),
            None => match receive(&mut conn, shard, rank, &mut spare).await {
                Ok(Some(action)) => action,
                Ok(None) => return Ok(()),
                Err(e) => {
                    conn.refuse_for(&e).await;
                    return Err(e.into());
                }
            },
        };
        let reply = match act(shard, rank, &snapshots, action).await {
            Ok(reply) => reply,
            Err(why) => {
                conn.refuse(&why.to_string()).await;
                return Err(why.into());
            }
        };
        if reply == Reply::Params {
            let frame = shard.params_frame();
            conn.send_frame(&frame).await?;
        }
    }
}

/// The worker's next request, `None` once it closed the connection, or why
/// it could not be received (the caller tells the worker). A push
/// is applied here, straight from the received bytes, which change places
/// with a spare buffer instead of being copied (the hot path).
async fn receive(
    conn: &mut ServerConn,
    shard: &Shard,
    rank: u32,
    spare: &mut Vec<u8>,
) -> Result<Option<Action>, ConnError> {
    match conn.recv_raw().await {
        Ok(body) if body[0] == TAG_PUSH => {
            conn.swap_frame(spare);
            let pushed = shard.push(rank, spare);
            conn.swap_frame(spare);
            Ok(Some(pushed.map_or_else(Action::Refuse, |()| Action::Pushed)))
        }
        Ok(body) => Ok(Some(Message::decode(body).map_or_else(|e| Action::Refuse(e.into()), Action::of))),
        Err(ConnError::Closed(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Carries out one request of worker `rank`: what to send back, or why it
/// is refused.
async fn act(shard: &Shard, rank: u32, snapshots: &Snapshots, action: Action) -> Result<Reply, Refusal> {
    match action {
        Action::Pushed => Ok(Reply::Nothing),
        Action::Push(mut body) => shard.push(rank, &mut body).map(|()| Reply::Nothing),
        Action::Pull(min_version) => shard.reach(min_version).await.map(|()| Reply::Params),
        Action::SetParams(data) => shard.set_params(rank, data).map(|()| Reply::Params),
        Action::Checkpoint(step) => queue_checkpoint(shard, rank, snapshots, step).await.map(|()| Reply::Nothing),
        Action::Refuse(why) => Err(why),
    }
}

/// Worker 0's request for checkpoint `step`: the shard's state is copied
/// and queued for the writer (waiting while an earlier one is still queued).
async fn queue_checkpoint(shard: &Shard, rank: u32, snapshots: &Snapshots, step: u64) -> Result<(), Refusal> {
    if rank != 0 {
        return Err(Refusal::CheckpointNotWorker0);
    }
    let Some(tx) = snapshots else { return Err(Refusal::NoCheckpoints) };
    let state = shard.snapshot(step)?;
    tx.send((step, state)).await.map_err(|_| Refusal::WriterStopped)
}

/// A worker's request.
enum Action {
    /// A push already applied (see [`receive`]).
    Pushed,
    /// A push body to apply.
    Push(Vec<u8>),
    Pull(u64),
    Checkpoint(u64),
    SetParams(Vec<f32>),
    Refuse(Refusal),
}

impl Action {
    /// What a decoded message asks of the server.
    fn of(m: Message) -> Action {
        match m {
            Message::Push { step, data } => {
                let mut raw = Vec::new();
                crate::net::wire::encode_push(step, &data, crate::net::wire::Encoding::F32, 0.0, &mut [], &mut raw);
                Action::Push(raw.split_off(crate::net::wire::HEADER_LEN))
            }
            Message::Pull { min_version } => Action::Pull(min_version),
            Message::Checkpoint { step } => Action::Checkpoint(step),
            Message::SetParams { data } => Action::SetParams(data),
            other => Action::Refuse(Refusal::NotAccepted(other.name())),
        }
    }
}

/// What a server sends back for a request it carried out.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Nothing,
    /// The shard's current parameters.
    Params,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(mode: SyncMode, workers: usize, version: u64) -> Shard {
        let opt = ShardOptimizer::new(OptimizerSpec::sgd(0.5), 2);
        Shard {
            state: Mutex::new(ShardState::new(vec![0.0; 2], workers, version, opt)),
            version: watch::Sender::new(version),
            workers,
            mode,
            signed_init: false,
            frame: Mutex::new(None),
        }
    }

    fn push_body(step: u64) -> Vec<u8> {
        let mut raw = Vec::new();
        crate::net::wire::encode_push(step, &[1.0, 1.0], crate::net::wire::Encoding::F32, 0.0, &mut [], &mut raw);
        raw.split_off(crate::net::wire::HEADER_LEN)
    }

    /// Async mode: worker 0 gets one checkpoint per step it pushed, each of
    /// a later step; other workers' pushes earn it none.
    #[test]
    fn worker_0_asks_for_one_checkpoint_per_step_it_pushed() {
        let s = shard(SyncMode::Async, 2, 0);
        assert!(s.snapshot(5).unwrap_err().to_string().contains("worker 0 has pushed 0 steps"));
        s.push(1, &mut push_body(0)).unwrap();
        assert!(s.snapshot(1).is_err(), "worker 1's push is not worker 0's step");
        s.push(0, &mut push_body(0)).unwrap();
        s.snapshot(1).unwrap();
        assert!(s.snapshot(1).unwrap_err().to_string().contains("each checkpoint is of a later step"));
        assert!(s.snapshot(2).is_err());
        s.push(0, &mut push_body(1)).unwrap();
        s.snapshot(2).unwrap();
        // Sync mode: worker 0's push counts when it arrives, the step when all are in.
        let s = shard(SyncMode::Sync, 2, 0);
        s.push(0, &mut push_body(0)).unwrap();
        assert!(s.snapshot(1).unwrap_err().to_string().contains("the shard is at step 0"));
        s.push(1, &mut push_body(0)).unwrap();
        s.snapshot(1).unwrap();
        s.push(1, &mut push_body(1)).unwrap();
        s.push(0, &mut push_body(1)).unwrap();
        s.snapshot(2).unwrap();
    }

    /// A shard at the last version there is refuses the next update
    /// instead of wrapping around (or panicking).
    #[test]
    fn the_version_never_wraps() {
        for mode in [SyncMode::Async, SyncMode::Sync] {
            let s = shard(mode, 1, u64::MAX);
            let why = s.push(0, &mut push_body(u64::MAX)).unwrap_err();
            assert!(why.to_string().contains("the last there is"), "{why}");
            assert_eq!(*s.version.borrow(), u64::MAX);
        }
        let dir = std::env::temp_dir().join(format!("warden-commit-wrap-{}", std::process::id()));
        let ck = CheckpointCtx {
            key: Arc::new(crate::store::checkpoint::CheckpointKey::new(
                &crate::store::checkpoint::CheckpointSecret::generate(),
            )),
            series: crate::net::identity::JobId::generate(),
            series_dir: dir.clone(),
        };
        let why = commit(&ck, u64::MAX, 1, &[], 1).unwrap_err();
        assert!(why.to_string().contains("the last there is"), "{why}");
        assert!(!dir.exists(), "nothing written for a step that cannot be committed");
    }
}
