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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::{CheckpointCtx, RateLimitedLog, RoleCtx, RoleError};
use crate::checkpoint::{Manifest, Placement, ShardRecord};
use crate::conn::{Acceptor, ConnError, ServerConn};
use crate::identity::Role;
use crate::optimizer::{OptimizerSpec, ShardOptimizer};
use crate::spec::SyncMode;
use crate::wire::{Message, ShardDigest, TAG_PUSH, push_view};

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
    /// Takes a push body (any encoding, see [`crate::wire::push_view`]).
    /// In sync mode the body is kept until every worker's is in: it is
    /// swapped into the shard, and `body` comes back holding a spare
    /// buffer (no copy of the gradient).
    fn push(&self, rank: u32, body: &mut Vec<u8>) -> Result<(), String> {
        let (step, grad) = push_view(body).map_err(|e| e.to_string())?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if grad.len() != st.params.len() {
            return Err(format!("push of {} values, but this shard holds {}", grad.len(), st.params.len()));
        }
        let Some(next) = st.version.checked_add(1) else {
            return Err(format!("the shard is at version {}, the last there is; no update can follow", st.version));
        };
        match self.mode {
            SyncMode::Async => {
                let ShardState { params, opt, .. } = &mut *st;
                opt.apply(params, &[grad], 1);
                st.count_step_of(rank);
            }
            SyncMode::Sync => {
                if step != st.version {
                    return Err(format!("push for step {step}, but the shard is at step {}", st.version));
                }
                let r = rank as usize;
                if r >= st.pushed.len() {
                    return Err(format!("worker rank {rank} is not in the plan"));
                }
                if st.pushed[r] {
                    return Err(format!("worker {rank} pushed twice for step {step}"));
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
    fn set_params(&self, rank: u32, data: Vec<f32>) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.signed_init {
            return Err("this job starts from the signed weights of [model] init; a worker may not replace them \
                        (a program's `init` values are ignored in such a job)"
                .into());
        }
        if rank != 0 {
            return Err("only worker 0 sets initial values".into());
        }
        if st.version != 0 || st.count != 0 {
            return Err(format!("initial values after {} update(s); init comes before training", st.version));
        }
        if data.len() != st.params.len() {
            return Err(format!(
                "initial values for {} parameters, but this shard holds {}",
                data.len(),
                st.params.len()
            ));
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
    fn snapshot(&self, step: u64) -> Result<crate::checkpoint::ShardState, String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if step <= st.last_checkpoint {
            return Err(format!(
                "checkpoint of step {step} asked for, but step {} came before it; each checkpoint is of a later step",
                st.last_checkpoint
            ));
        }
        if self.mode == SyncMode::Sync && st.version != step {
            return Err(format!("checkpoint of step {step} asked for, but the shard is at step {}", st.version));
        }
        if st.worker0_steps != step {
            return Err(format!(
                "checkpoint of step {step} asked for, but worker 0 has pushed {} steps",
                st.worker0_steps
            ));
        }
        st.last_checkpoint = step;
        let (t, slots) = st.opt.state();
        Ok(crate::checkpoint::ShardState { t, params: st.params.clone(), slots })
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
        crate::wire::encode_params(st.version, &st.params, &mut buf);
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
    let (version, params, opt) = match restored {
        Some((step, st)) => {
            let opt = ShardOptimizer::restore(spec, place.len, st.t, st.slots).map_err(RoleError::new)?;
            tracing::info!("resumed from checkpoint step {step}");
            (step, st.params, opt)
        }
        None => {
            let all = initial.unwrap_or_else(|| crate::model::init(&ctx.spec.model, ctx.seed));
            (0, all[ctx.plan.shard(place.rank)].to_vec(), ShardOptimizer::new(spec, place.len))
        }
    };
    let workers = ctx.plan.count(Role::Worker) as usize;
    let shard = Arc::new(Shard {
        state: Mutex::new(ShardState::new(params, workers, version, opt)),
        version: watch::Sender::new(version),
        workers,
        mode: ctx.spec.training.mode,
        signed_init: ctx.spec.init.is_some(),
        frame: Mutex::new(None),
    });
    tracing::info!("serving parameters {:?} with {spec:?}", ctx.plan.shard(place.rank));
    ctx.emit(crate::control::Event::Started);

    // Checkpoints: connection tasks snapshot the state and queue it (at most
    // one waiting: a slow disk slows training rather than filling memory);
    // one writer encrypts and writes them in turn.
    let (snap_tx, snap_rx) = mpsc::channel::<(u64, crate::checkpoint::ShardState)>(1);
    let (saved_tx, mut saved_rx) = mpsc::channel::<(u64, Result<ShardRecord, String>)>(4);
    let (rank, shards) = (place.rank, place.shards);
    let writer = ctx.checkpoint.clone().map(|ck| tokio::spawn(write_loop(ck, rank, shards, snap_rx, saved_tx)));
    let snapshots = writer.as_ref().map(|_| snap_tx);

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
    let accept = tokio::spawn(super::accept_loop(listener, acceptor, log, serve));
    let result = loop {
        tokio::select! {
            m = next(&mut from_sched, silence) => match m {
                Ok(Message::Shutdown) => break Ok(()),
                Ok(Message::Abort { reason }) => break Err(RoleError::aborted(&reason)),
                Ok(Message::CheckpointCommit { step, shards: records }) => {
                    let Some(reply) = commit_step(&ctx, step, shards, records).await else { continue };
                    if let Err(e) = sched.send(&reply).await {
                        break Err(RoleError::new(format!("lost the scheduler: {e}")));
                    }
                }
                Ok(Message::SetOptimizer(_)) => {
                    break Err(RoleError::new("changing the optimizer during training is not supported"));
                }
                Ok(m) => tracing::warn!("ignoring unexpected `{}` from the scheduler", m.name()),
                Err(e) => break Err(RoleError { message: format!("lost the scheduler: {}", e.message), ..e }),
            },
            Some((step, outcome)) = saved_rx.recv() => {
                let msg = match outcome {
                    Ok(r) => Message::CheckpointSaved { step, record: to_digest(&r) },
                    Err(reason) => Message::CheckpointFailed { step, reason },
                };
                if let Err(e) = sched.send(&msg).await {
                    break Err(RoleError::new(format!("lost the scheduler: {e}")));
                }
            }
        }
    };
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

/// Where this server's shard sits in the job.
#[derive(Debug, Clone, Copy)]
struct ShardPlace {
    rank: u32,
    shards: u32,
    len: usize,
    shape: crate::checkpoint::Shape,
}

impl ShardPlace {
    fn of(ctx: &RoleCtx) -> ShardPlace {
        let rank = ctx.me().rank;
        let len = ctx.plan.shard(rank).len();
        let slots = ShardOptimizer::new(ctx.spec.optimizer, 0).slots();
        let shape = crate::checkpoint::Shape { len: Some(len), slots: Some(slots) };
        ShardPlace { rank, shards: ctx.plan.count(Role::Server), len, shape }
    }
}

/// The checkpoint steps this server can resume from, newest first, all
/// verified; what it could not use is reported as warnings.
async fn resumable_steps(ctx: &RoleCtx, place: ShardPlace) -> Result<Vec<u64>, RoleError> {
    let ck = ctx.checkpoint.clone().ok_or_else(|| RoleError::new("resuming needs [checkpoint] in the job file"))?;
    let ShardPlace { rank, shards, shape, .. } = place;
    let (steps, warnings) = tokio::task::spawn_blocking(move || {
        crate::checkpoint::resumable_steps(&ck.series_dir, &ck.key, &ck.series, rank, shards, shape)
    })
    .await
    .map_err(|e| RoleError::new(e.to_string()))?
    .map_err(|e| RoleError::new(format!("reading the checkpoint directory: {e}")))?;
    for w in warnings {
        tracing::warn!("{w}");
        ctx.emit(crate::control::Event::Warning { message: format!("server[{rank}]: {w}") });
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
) -> Result<(OptimizerSpec, Option<(u64, crate::checkpoint::ShardState)>), RoleError> {
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
                    crate::checkpoint::load_step(&ck.series_dir, &ck.key, &at, shape)
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
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    Some(match done {
        Ok(()) => Message::CheckpointCommitted { step },
        Err(reason) => {
            tracing::warn!("{reason}");
            Message::CheckpointFailed { step, reason }
        }
    })
}

/// After a successful job only `keep_last_after_job` checkpoint steps stay.
async fn end_of_job_retention(ctx: &RoleCtx) {
    let (Some(ck), Some(spec)) = (ctx.checkpoint.clone(), ctx.spec.checkpoint.clone()) else { return };
    let keep = spec.keep_last_after_job;
    match tokio::task::spawn_blocking(move || crate::checkpoint::prune(&ck.series_dir, keep, None)).await {
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
    mut rx: mpsc::Receiver<(u64, crate::checkpoint::ShardState)>,
    done: mpsc::Sender<(u64, Result<ShardRecord, String>)>,
) {
    while let Some((step, state)) = rx.recv().await {
        let ck = ck.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let dir = crate::checkpoint::step_dir(&ck.series_dir, step);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            // A manifest left by an abandoned run of this series no longer describes this step.
            match std::fs::remove_file(dir.join(crate::checkpoint::MANIFEST)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.to_string()),
                _ => {}
            }
            let at = Placement { job: ck.series.clone(), step, shard: rank, shards };
            let path = dir.join(crate::checkpoint::shard_file(rank));
            crate::checkpoint::write_shard(&path, &ck.key, &at, &state, crate::checkpoint::DEFAULT_CHUNK)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the checkpoint writer failed: {e}")));
        if let Err(e) = &outcome {
            tracing::warn!("checkpoint step {step}: {e}");
        }
        if done.send((step, outcome)).await.is_err() {
            return;
        }
    }
}

/// Writes the manifest of a committed step, then applies `keep_last`.
fn commit(ck: &CheckpointCtx, step: u64, shards: u32, records: &[ShardDigest], keep: usize) -> Result<(), String> {
    // Retention spares the steps after this one, which may still be written.
    let after = step.checked_add(1).ok_or_else(|| format!("checkpoint step {step} is the last there is"))?;
    let files = records
        .iter()
        .map(|d| ShardRecord {
            shard: d.shard,
            file: crate::checkpoint::shard_file(d.shard),
            bytes: d.bytes,
            sha256: d.sha256.iter().map(|b| format!("{b:02x}")).collect(),
        })
        .collect();
    let m = Manifest { format: 1, job_id: ck.series.clone(), step, shards, key_id: ck.key.id_hex(), files };
    let dir = crate::checkpoint::step_dir(&ck.series_dir, step);
    crate::checkpoint::write_manifest(&dir, &ck.key, &m).map_err(|e| format!("checkpoint step {step}: {e}"))?;
    let deleted = crate::checkpoint::prune(&ck.series_dir, keep, Some(after))
        .map_err(|e| format!("checkpoint retention in {}: {e}", ck.series_dir.display()))?;
    if !deleted.is_empty() {
        tracing::info!("checkpoint step {step} complete; deleted steps {deleted:?} (keep_last = {keep})");
    }
    Ok(())
}

type Snapshots = Option<mpsc::Sender<(u64, crate::checkpoint::ShardState)>>;

async fn serve_worker(
    mut conn: ServerConn,
    first: Message,
    shard: &Shard,
    snapshots: Snapshots,
) -> Result<(), ConnError> {
    let rank = conn.peer().rank;
    // The first message arrived decoded (it came through the deadline check).
    let mut pending = Some(first);
    let mut spare = Vec::new();
    loop {
        let outcome = match pending.take() {
            Some(Message::Push { step, data }) => {
                let mut raw = Vec::new();
                crate::wire::encode_push(step, &data, crate::wire::Encoding::F32, 0.0, &mut [], &mut raw);
                Action::Push(raw.split_off(crate::wire::HEADER_LEN))
            }
            Some(Message::Pull { min_version }) => Action::Pull(min_version),
            Some(Message::Checkpoint { step }) => Action::Checkpoint(step),
            Some(Message::SetParams { data }) => Action::SetParams(data),
            Some(other) => Action::Refuse(format!("`{}` is not something a server accepts", other.name())),
            None => match conn.recv_raw().await {
                Ok(body) => match body[0] {
                    // Hot path: straight from the received bytes, which
                    // change places with a spare buffer instead of being copied.
                    TAG_PUSH => {
                        conn.swap_frame(&mut spare);
                        let pushed = shard.push(rank, &mut spare);
                        conn.swap_frame(&mut spare);
                        match pushed {
                            Ok(()) => continue,
                            Err(why) => Action::Refuse(why),
                        }
                    }
                    _ => match Message::decode(body) {
                        Ok(Message::Pull { min_version }) => Action::Pull(min_version),
                        Ok(Message::Checkpoint { step }) => Action::Checkpoint(step),
                        Ok(Message::SetParams { data }) => Action::SetParams(data),
                        Ok(other) => Action::Refuse(format!("`{}` is not something a server accepts", other.name())),
                        Err(e) => Action::Refuse(e.to_string()),
                    },
                },
                Err(ConnError::Closed(_)) => return Ok(()),
                Err(e) => {
                    conn.refuse_for(&e).await;
                    return Err(e);
                }
            },
        };
        match outcome {
            Action::Push(mut body) => {
                if let Err(why) = shard.push(rank, &mut body) {
                    conn.refuse(&why).await;
                    return Err(ConnError::Setup(why));
                }
            }
            Action::Pull(min_version) => {
                let mut rx = shard.version.subscribe();
                let current = *rx.borrow();
                if min_version > current.saturating_add(1) {
                    let why = format!("pull for version {min_version}, but the shard is at {current}");
                    conn.refuse(&why).await;
                    return Err(ConnError::Setup(why));
                }
                // The sender lives as long as the shard, so this only ends on success.
                let _ = rx.wait_for(|v| *v >= min_version).await;
                let frame = shard.params_frame();
                conn.send_frame(&frame).await?;
            }
            Action::SetParams(data) => {
                if let Err(why) = shard.set_params(rank, data) {
                    conn.refuse(&why).await;
                    return Err(ConnError::Setup(why));
                }
                let frame = shard.params_frame();
                conn.send_frame(&frame).await?;
            }
            Action::Checkpoint(step) => {
                let why = match (&snapshots, rank) {
                    (_, r) if r != 0 => Some("only worker 0 may ask for a checkpoint".to_string()),
                    (None, _) => Some("this job takes no checkpoints ([checkpoint] is not set)".to_string()),
                    (Some(tx), _) => match shard.snapshot(step) {
                        // Waits while an earlier checkpoint is still queued.
                        Ok(state) => tx.send((step, state)).await.err().map(|_| "the checkpoint writer stopped".into()),
                        Err(why) => Some(why),
                    },
                };
                if let Some(why) = why {
                    conn.refuse(&why).await;
                    return Err(ConnError::Setup(why));
                }
            }
            Action::Refuse(why) => {
                conn.refuse(&why).await;
                return Err(ConnError::Setup(why));
            }
        }
    }
}

enum Action {
    Push(Vec<u8>),
    Pull(u64),
    Checkpoint(u64),
    SetParams(Vec<f32>),
    Refuse(String),
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
        crate::wire::encode_push(step, &[1.0, 1.0], crate::wire::Encoding::F32, 0.0, &mut [], &mut raw);
        raw.split_off(crate::wire::HEADER_LEN)
    }

    /// Async mode: worker 0 gets one checkpoint per step it pushed, each of
    /// a later step; other workers' pushes earn it none.
    #[test]
    fn worker_0_asks_for_one_checkpoint_per_step_it_pushed() {
        let s = shard(SyncMode::Async, 2, 0);
        assert!(s.snapshot(5).unwrap_err().contains("worker 0 has pushed 0 steps"));
        s.push(1, &mut push_body(0)).unwrap();
        assert!(s.snapshot(1).is_err(), "worker 1's push is not worker 0's step");
        s.push(0, &mut push_body(0)).unwrap();
        s.snapshot(1).unwrap();
        assert!(s.snapshot(1).unwrap_err().contains("each checkpoint is of a later step"));
        assert!(s.snapshot(2).is_err());
        s.push(0, &mut push_body(1)).unwrap();
        s.snapshot(2).unwrap();
        // Sync mode: worker 0's push counts when it arrives, the step when all are in.
        let s = shard(SyncMode::Sync, 2, 0);
        s.push(0, &mut push_body(0)).unwrap();
        assert!(s.snapshot(1).unwrap_err().contains("the shard is at step 0"));
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
            assert!(why.contains("the last there is"), "{why}");
            assert_eq!(*s.version.borrow(), u64::MAX);
        }
        let dir = std::env::temp_dir().join(format!("warden-commit-wrap-{}", std::process::id()));
        let ck = CheckpointCtx {
            key: Arc::new(crate::checkpoint::CheckpointKey::new(&crate::checkpoint::CheckpointSecret::generate())),
            series: crate::identity::JobId::generate(),
            series_dir: dir.clone(),
        };
        let why = commit(&ck, u64::MAX, 1, &[], 1).unwrap_err();
        assert!(why.contains("the last there is"), "{why}");
        assert!(!dir.exists(), "nothing written for a step that cannot be committed");
    }
}
