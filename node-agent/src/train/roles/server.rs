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
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::shard::{ChunkAnswer, Refusal, Shard, ShardStart, Suspect};
use super::{CheckpointCtx, Listener, RateLimitedLog, RoleCtx, RoleError};
use crate::net::conn::{Acceptor, ConnError, RecvHalf, SendHalf, ServerConn};
use crate::net::identity::Role;
use crate::net::wire::{Message, ShardDigest, TAG_PULL_CHUNK, TAG_PUSH, TAG_PUSH_CHUNK};
use crate::store::checkpoint::{CheckpointError, Manifest, Placement, ShardRecord};
use crate::train::optimizer::{OptimizerSpec, ShardOptimizer};

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

/// Where server `server` listens for the workers of its host
/// (`[cluster] same_host`), given the job directory `workdir` of any process
/// of the job on that host: beside the job directories, which are siblings
/// on every transport (`transport::workdir_in`), named after the server's.
/// Their parent is root's when the agents run as root, so the job's uid may
/// connect to the socket but not remove or replace it.
pub fn local_socket(workdir: &std::path::Path, server: &crate::job::plan::PlannedProcess) -> Option<PathBuf> {
    Some(workdir.parent()?.join(server.socket_name()))
}

/// Runs server `ctx.me().rank` on already bound listeners (its port and,
/// for workers on its own host, its Unix-domain socket) until the job ends.
pub async fn run(mut ctx: RoleCtx, listener: TcpListener, local: Option<Listener>) -> Result<(), RoleError> {
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
    let (suspect_tx, mut suspect_rx) = mpsc::channel(1);
    let report = SuspectReport {
        events: ctx.events.clone(),
        server: place.rank,
        fail: ctx.spec.training.suspect.fail.then(|| suspect_tx.clone()),
    };
    let accept = accept_workers(&ctx, listener, local, shard, snapshots, report)?;
    let mut watch = Watch { saved: &mut saved_rx, suspects: &mut suspect_rx };
    let result = follow_scheduler(&ctx, &sched, &mut from_sched, &mut watch, silence, place.shards).await;
    drop(suspect_tx);
    accept.iter().for_each(|a| a.abort());
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
    let (version, params, restored) = match restored {
        Some((step, st)) => {
            tracing::info!("resumed from checkpoint step {step}");
            (step, st.params, Some((st.t, st.slots)))
        }
        None => {
            let all = initial.unwrap_or_else(|| crate::train::model::init(&ctx.spec.model, ctx.seed));
            (0, all[ctx.plan.shard(place.rank)].to_vec(), None)
        }
    };
    Shard::new(ShardStart {
        params,
        version,
        spec,
        restored,
        workers: ctx.plan.count(Role::Worker) as usize,
        mode: ctx.spec.training.mode,
        signed_init: ctx.spec.init.is_some(),
        chunk: ctx.spec.training.chunk_floats(),
        combine: ctx.spec.training.aggregation.combine(),
        centered: ctx.spec.training.aggregation.radius(),
        suspect: Some(ctx.spec.training.suspect),
    })
    .map_err(|e| RoleError::new(e.to_string()))
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

/// Serves the workers on `listener` (and `local`), each connection on a
/// task of its own; one that fails is logged (at a bounded rate) and
/// dropped. Both listeners admit through one acceptor: its caps and the
/// one connection per identity hold across them.
fn accept_workers(
    ctx: &RoleCtx,
    listener: TcpListener,
    local: Option<Listener>,
    shard: Arc<Shard>,
    snapshots: Snapshots,
    report: SuspectReport,
) -> Result<Vec<tokio::task::JoinHandle<()>>, RoleError> {
    let acceptor = Acceptor::new(&ctx.tls, &[Role::Worker], ctx.limits())?;
    let log = Arc::new(RateLimitedLog::default());
    let serve = {
        let log = log.clone();
        move |conn: ServerConn, first, from| {
            let (shard, snapshots, log, report) = (shard.clone(), snapshots.clone(), log.clone(), report.clone());
            async move {
                let peer = conn.peer().clone();
                tracing::info!("{peer} connected from {from}");
                if let Err(e) = serve_worker(conn, first, &shard, snapshots, &report).await {
                    log.warn(&format!("dropped {peer} from {from}: {e}"));
                }
            }
        }
    };
    let listeners = std::iter::once(Listener::Tcp(listener)).chain(local);
    Ok(listeners.map(|l| tokio::spawn(super::accept_loop(l, acceptor.clone(), log.clone(), serve.clone()))).collect())
}

/// Until the scheduler ends the job: commits the checkpoints it announces
/// and tells it what the writer saved or failed to save.
async fn follow_scheduler(
    ctx: &RoleCtx,
    sched: &super::SchedLink,
    from_sched: &mut mpsc::Receiver<Result<Message, RoleError>>,
    watch: &mut Watch<'_>,
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
            Some(why) = watch.suspects.recv() => {
                return Err(RoleError::new(format!("{why}; on_suspect = \"fail\" stops the job")));
            }
            Some((step, outcome)) = watch.saved.recv() => {
                let msg = match outcome {
                    Ok(r) => Message::CheckpointSaved { step, record: to_digest(&r) },
                    Err(e) => Message::CheckpointFailed { step, reason: e.to_string() },
                };
                sched.send(&msg).await.map_err(lost)?;
            }
        }
    }
}

/// What a server watches besides the scheduler: the checkpoint writer's
/// reports, and (with `on_suspect = "fail"`) suspect workers.
struct Watch<'a> {
    saved: &'a mut Saved,
    suspects: &'a mut mpsc::Receiver<String>,
}

/// What a server does with the workers its steps find suspect: tells the
/// launcher (which logs it and counts it in the run's metrics), and with
/// `on_suspect = "fail"` ends the job naming the worker.
#[derive(Clone)]
struct SuspectReport {
    events: super::EventSink,
    server: u32,
    fail: Option<mpsc::Sender<String>>,
}

impl SuspectReport {
    fn found(&self, found: &[Suspect]) {
        for s in found {
            let server = format!("server[{}]", self.server);
            let text = crate::net::control::suspect_text(&server, s.worker, s.ratio, s.steps, s.step);
            tracing::warn!("{text}");
            (self.events)(crate::net::control::Event::SuspectWorker {
                worker: s.worker,
                ratio: s.ratio,
                steps: s.steps,
                step: s.step,
            });
            if let Some(tx) = &self.fail {
                let _ = tx.try_send(text);
            }
        }
    }
}

/// Where this server's shard sits in the job.
#[derive(Debug, Clone, Copy)]
struct ShardPlace {
    rank: u32,
    shards: u32,
    shape: crate::store::checkpoint::Shape,
}

impl ShardPlace {
    fn of(ctx: &RoleCtx) -> ShardPlace {
        let rank = ctx.me().rank;
        let len = ctx.plan.shard(rank).len();
        let slots = ShardOptimizer::new(ctx.spec.optimizer, 0).slots();
        let shape = crate::store::checkpoint::Shape { len: Some(len), slots: Some(slots) };
        ShardPlace { rank, shards: ctx.plan.count(Role::Server), shape }
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
    let m = Manifest {
        format: crate::store::checkpoint::MANIFEST_FORMAT,
        job_id: ck.series.clone(),
        step,
        shards,
        key_id: ck.key.id_hex(),
        files,
    };
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
///
/// Reading and answering run at once: the reader applies pushes as they
/// arrive and queues what must be answered; the writer waits for each
/// answer's chunk to update and sends it. A worker sends a whole step
/// (every chunk's push and pull) before it reads, so a server that read
/// one request and answered it before reading the next would stop reading
/// while its answer waits behind that worker's unread pushes.
async fn serve_worker(
    conn: ServerConn,
    first: Message,
    shard: &Shard,
    snapshots: Snapshots,
    report: &SuspectReport,
) -> Result<(), ServeError> {
    let (recv, send) = conn.into_split();
    let rank = recv.peer().rank;
    // A worker has at most one step of pulls outstanding; a peer asking for
    // more waits for the writer (its own reads stop, nobody else's).
    let (out_tx, out_rx) = mpsc::channel(shard.chunks() + 2);
    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel();
    let reading = read_requests(recv, first, (shard, rank), (&snapshots, report), out_tx, fatal_tx);
    let writing = write_answers(send, shard, out_rx, fatal_rx);
    tokio::pin!(reading, writing);
    tokio::select! {
        // The writer ends first only when it failed or refused: stop reading.
        w = &mut writing => w,
        // The reader ended (the worker closed, or broke a rule and the
        // writer tells it why): the writer finishes at once.
        r = &mut reading => {
            let w = writing.await;
            r.and(w)
        }
    }
}

/// What the writer sends, in the order the worker asked.
enum Answer {
    /// The whole shard at `min_version` or later.
    Pull(u64),
    /// One chunk at `min_version` or later.
    Chunk(u32, u64),
    /// The whole shard as it is now (after worker 0 set it).
    Params,
}

/// The reading side of [`serve_worker`]: applies pushes, checkpoints and
/// initial values in arrival order, queues answers for the writer. On a
/// refusal the writer is handed the reason (it drops any queued answer).
async fn read_requests(
    mut recv: RecvHalf<tokio::io::ReadHalf<crate::net::record::TlsStream>>,
    first: Message,
    (shard, rank): (&Shard, u32),
    (snapshots, report): (&Snapshots, &SuspectReport),
    answers: mpsc::Sender<Answer>,
    fatal: tokio::sync::oneshot::Sender<String>,
) -> Result<(), ServeError> {
    // The first message arrived decoded (it came through the deadline check).
    let mut pending = Some(first);
    let mut spare = Vec::new();
    loop {
        let action = match pending.take() {
            Some(m) => Action::of(m),
            None => match receive(&mut recv, shard, rank, &mut spare).await {
                Ok(Some(action)) => action,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if e.is_peers_fault() {
                        let _ = fatal.send(e.to_string());
                    }
                    return Err(e.into());
                }
            },
        };
        match act(shard, rank, snapshots, report, action).await {
            Ok(Some(answer)) => {
                if answers.send(answer).await.is_err() {
                    // The writer ended; it says why.
                    return Ok(());
                }
            }
            Ok(None) => {}
            Err(why) => {
                let _ = fatal.send(why.to_string());
                return Err(why.into());
            }
        }
    }
}

/// The writing side of [`serve_worker`]: answers in order, each once its
/// chunk reaches the version asked for. A refusal from the reader is sent
/// at once, before queued answers (never in the middle of a frame); when
/// the reader ends without one, so does the writer.
async fn write_answers(
    mut send: SendHalf<tokio::io::WriteHalf<crate::net::record::TlsStream>>,
    shard: &Shard,
    mut answers: mpsc::Receiver<Answer>,
    mut fatal: tokio::sync::oneshot::Receiver<String>,
) -> Result<(), ServeError> {
    loop {
        let ready = tokio::select! {
            biased;
            why = &mut fatal => {
                if let Ok(why) = why {
                    send.refuse(&why).await;
                }
                return Ok(());
            }
            next = async {
                let answer = answers.recv().await?;
                Some(ready_frame(shard, answer).await)
            } => next,
        };
        match ready {
            None => return Ok(()),
            Some(Ok(Ready::Frame(frame))) => send.send_frame(&frame).await?,
            // Sealed from the chunk's values, which the answer holds until
            // they are.
            Some(Ok(Ready::Chunk(answer))) => send.send_pieces(answer.pieces()).await?,
            Some(Err(why)) => {
                send.refuse(&why.to_string()).await;
                return Err(why.into());
            }
        }
    }
}

/// A frame ready to send.
enum Ready {
    /// Encoded whole (and shared by every puller).
    Frame(Arc<Vec<u8>>),
    /// A chunk's head and values.
    Chunk(ChunkAnswer),
}

/// The frame answering `answer`, once the shard can give it.
async fn ready_frame(shard: &Shard, answer: Answer) -> Result<Ready, Refusal> {
    match answer {
        Answer::Pull(min_version) => shard.reach(min_version).await.map(|()| Ready::Frame(shard.params_frame())),
        Answer::Chunk(chunk, min_version) => {
            shard.reach_chunk(chunk, min_version).await?;
            shard.chunk_answer(chunk).map(Ready::Chunk)
        }
        Answer::Params => Ok(Ready::Frame(shard.params_frame())),
    }
}

/// The finite check and squared norm of an f32 push_chunk's values, taken
/// as its bytes arrive (each read's while in cache) rather than in a pass
/// over the whole frame afterwards; the same figure to the bit.
#[derive(Default)]
struct SeenValues {
    /// The frame's first bytes, until they say what it is.
    head: [u8; crate::net::wire::PUSH_CHUNK_F32_HEAD],
    head_len: usize,
    /// Some once the head showed an f32 push_chunk.
    squares: Option<warden_kernels::SquaresLe>,
}

impl SeenValues {
    fn see(&mut self, mut bytes: &[u8]) {
        use crate::net::wire::{PUSH_CHUNK_F32_HEAD, is_push_chunk_f32};
        if self.squares.is_none() {
            if self.head_len >= PUSH_CHUNK_F32_HEAD {
                return; // not an f32 push_chunk
            }
            let take = (PUSH_CHUNK_F32_HEAD - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
            self.head_len += take;
            bytes = &bytes[take..];
            if self.head_len < PUSH_CHUNK_F32_HEAD || !is_push_chunk_f32(&self.head) {
                return;
            }
            self.squares = Some(warden_kernels::SquaresLe::default());
        }
        if let Some(s) = self.squares.as_mut() {
            s.add(bytes);
        }
    }

    /// The values' sum of squares (`Some(None)`: one is not finite), if
    /// the frame was an f32 push_chunk.
    fn checked(self) -> Option<Option<f64>> {
        self.squares.map(warden_kernels::SquaresLe::finish)
    }
}

/// The worker's next request, `None` once it closed the connection, or why
/// it could not be received (the caller tells the worker). A push
/// is applied here, straight from the received bytes, which change places
/// with a spare buffer instead of being copied (the hot path).
async fn receive(
    recv: &mut RecvHalf<tokio::io::ReadHalf<crate::net::record::TlsStream>>,
    shard: &Shard,
    rank: u32,
    spare: &mut Vec<u8>,
) -> Result<Option<Action>, ConnError> {
    let mut values = SeenValues::default();
    match recv.recv_raw_seen(&mut |bytes| values.see(bytes)).await {
        Ok(body) if body[0] == TAG_PUSH || body[0] == TAG_PUSH_CHUNK => {
            recv.swap_frame(spare);
            let pushed = shard.push_checked(rank, spare, values.checked());
            recv.swap_frame(spare);
            Ok(Some(pushed.map_or_else(Action::Refuse, Action::Pushed)))
        }
        Ok(body) if body[0] == TAG_PULL_CHUNK => Ok(Some(match Message::decode(body) {
            Ok(Message::PullChunk { chunk, min_version }) => Action::PullChunk(chunk, min_version),
            Ok(other) => Action::Refuse(Refusal::NotAccepted(other.name())),
            Err(e) => Action::Refuse(e.into()),
        })),
        Ok(body) => Ok(Some(Message::decode(body).map_or_else(|e| Action::Refuse(e.into()), Action::of))),
        Err(ConnError::Closed(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Carries out one request of worker `rank`: what to answer, if anything,
/// or why it is refused.
async fn act(
    shard: &Shard,
    rank: u32,
    snapshots: &Snapshots,
    report: &SuspectReport,
    action: Action,
) -> Result<Option<Answer>, Refusal> {
    match action {
        Action::Pushed(found) => {
            report.found(&found);
            Ok(None)
        }
        Action::Push(mut body) => shard.push(rank, &mut body).map(|found| {
            report.found(&found);
            None
        }),
        Action::Pull(min_version) => Ok(Some(Answer::Pull(min_version))),
        Action::PullChunk(chunk, min_version) => Ok(Some(Answer::Chunk(chunk, min_version))),
        Action::SetParams(data) => shard.set_params(rank, data).map(|()| Some(Answer::Params)),
        Action::Checkpoint(step) => queue_checkpoint(shard, rank, snapshots, step).await.map(|()| None),
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
    /// A push already applied (see [`receive`]), and the workers its step
    /// found suspect.
    Pushed(Vec<Suspect>),
    /// A push body to apply.
    Push(Vec<u8>),
    Pull(u64),
    /// A chunk's pull: chunk, lowest version.
    PullChunk(u32, u64),
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
            Message::PullChunk { chunk, min_version } => Action::PullChunk(chunk, min_version),
            Message::PushChunk { step, chunk, data } => {
                let mut raw = Vec::new();
                crate::net::wire::encode_push_chunk(
                    step,
                    chunk,
                    &data,
                    crate::net::wire::Encoding::F32,
                    0.0,
                    &mut [],
                    &mut raw,
                );
                Action::Push(raw.split_off(crate::net::wire::HEADER_LEN))
            }
            Message::Checkpoint { step } => Action::Checkpoint(step),
            Message::SetParams { data } => Action::SetParams(data),
            other => Action::Refuse(Refusal::NotAccepted(other.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A push's values checked as they arrive, in pieces cut anywhere, give
    /// what checking the whole body gives; other frames are left alone.
    #[test]
    fn values_seen_in_pieces_are_checked_as_the_whole_body_would_be() {
        use crate::net::wire::{Encoding, HEADER_LEN, encode_push_chunk, push_view};
        let frame = |values: &[f32], enc: Encoding| {
            let mut out = Vec::new();
            encode_push_chunk(3, 1, values, enc, 0.5, &mut vec![0.0; values.len()], &mut out);
            out.split_off(HEADER_LEN)
        };
        let seen = |body: &[u8], cut: usize| {
            let mut v = SeenValues::default();
            body.chunks(cut).for_each(|p| v.see(p));
            v.checked()
        };
        let values: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.37).sin()).collect();
        let body = frame(&values, Encoding::F32);
        let whole = push_view(&body).unwrap().2.finite_sum_squares();
        for cut in [1, 7, 18, 64, 1000, body.len()] {
            assert_eq!(seen(&body, cut).map(|n| n.map(f64::to_bits)), Some(whole.map(f64::to_bits)), "cut {cut}");
        }
        let mut bad = values.clone();
        bad[4321] = f32::INFINITY;
        assert_eq!(seen(&frame(&bad, Encoding::F32), 333), Some(None));
        assert_eq!(seen(&frame(&values, Encoding::Bf16), 333), None, "not f32: checked when decoded");
        assert_eq!(seen(&[TAG_PUSH, 0, 0], 1), None);
    }

    /// A checkpoint step at the last number there is is refused, not
    /// wrapped, and nothing is written for it.
    #[test]
    fn the_last_checkpoint_step_is_never_committed() {
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
