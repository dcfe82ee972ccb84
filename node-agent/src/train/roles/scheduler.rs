//! The scheduler: rendezvous, barriers and the end of the job.
//!
//! It admits only this job's servers and workers (checked in the TLS
//! handshake), waits until every planned process has registered, sends the
//! servers the optimizer and everyone the start, releases barriers when all
//! workers reach them, and shuts everyone down when every worker finished.
//! If any process is lost before that, it aborts the job and says who.
//!
//! What a peer sends costs bounded memory: the workers wait at one barrier
//! at a time, of a later id than the last, and worker 0 has at most
//! [`CHECKPOINTS_IN_FLIGHT`] checkpoints in flight, each of a later step.
//! A request outside these bounds gets an error back. Messages from a
//! connection that did not register (refused, or not in the plan) are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{RateLimitedLog, RoleCtx, RoleError};
use crate::net::conn::{Acceptor, SendHalf, ServerConn};
use crate::net::identity::{Identity, Role};
use crate::net::wire::Message;

/// Why the scheduler refuses a worker's request (the worker is told this
/// text; training goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    /// A barrier id not after the last released one.
    #[error("barrier {id} asked for, but barrier {last} was released already; barrier ids increase")]
    BarrierReleased {
        /// The id asked for.
        id: u64,
        /// The last released.
        last: u64,
    },
    /// A barrier id other than the one the workers wait at.
    #[error("barrier {id} asked for while the workers wait at barrier {open}")]
    OtherBarrier {
        /// The id asked for.
        id: u64,
        /// The open barrier's.
        open: u64,
    },
    /// A worker that waits at the barrier already.
    #[error("worker[{rank}] already waits at barrier {id}")]
    AlreadyWaiting {
        /// The worker.
        rank: u32,
        /// The barrier.
        id: u64,
    },
    /// A checkpoint of a step not after the last one asked for.
    #[error("checkpoint of step {step} asked for, but step {last} came before it; each checkpoint is of a later step")]
    CheckpointNotLater {
        /// The step asked for.
        step: u64,
        /// The last asked for.
        last: u64,
    },
    /// More checkpoints in flight than honest training can have.
    #[error("{CHECKPOINTS_IN_FLIGHT} checkpoints are in flight already, more than honest training can have")]
    TooManyCheckpoints,
}

/// No checkpoint step every server can resume from: each server's steps.
#[derive(Debug, thiserror::Error)]
#[error(
    "no checkpoint step is complete and valid on every server, so there is nothing to resume from ({}); the warnings above say why each was skipped",
    each_server(.0)
)]
struct NothingToResume(BTreeMap<u32, Vec<u64>>);

fn each_server(resumable: &BTreeMap<u32, Vec<u64>>) -> String {
    let each: Vec<String> = resumable
        .iter()
        .map(|(rank, steps)| {
            format!("server[{rank}]: {}", if steps.is_empty() { "none".into() } else { format!("{steps:?}") })
        })
        .collect();
    each.join("; ")
}

type Writer = SendHalf<tokio::io::WriteHalf<crate::net::record::TlsStream>>;

enum Input {
    Joined(Identity, Writer),
    Msg(Identity, Message),
    Lost(Identity, String),
    /// Time to send heartbeats and look for silent processes.
    Tick,
}

/// Who was last heard from when, for the heartbeat check.
#[derive(Default)]
struct Liveness {
    last: BTreeMap<(Role, u32), std::time::Instant>,
}

impl Liveness {
    fn heard(&mut self, id: &Identity) {
        self.last.insert((id.role, id.rank), std::time::Instant::now());
    }

    /// The first process silent for longer than `timeout`, if any.
    fn silent(&self, timeout: Duration, skip: &BTreeSet<u32>) -> Option<String> {
        self.last
            .iter()
            .filter(|((role, rank), _)| !(*role == Role::Worker && skip.contains(rank)))
            .find(|(_, at)| at.elapsed() > timeout)
            .map(|((role, rank), at)| {
                format!(
                    "{role}[{rank}] sent nothing for {:.0} s ([training] heartbeat_timeout = {} s): declared dead",
                    at.elapsed().as_secs_f64(),
                    timeout.as_secs()
                )
            })
    }
}

/// Tells every process the scheduler is alive. A peer that cannot take a
/// heartbeat within a second has stopped reading (its socket buffer is
/// full), and its link now ends in a partly written frame that no later
/// message may follow: that writer is removed from `writers` and returned
/// with the reason, for the caller to handle like a lost connection. (A
/// failed write is not reported here: the link's reader reports the loss.)
async fn beat<W: tokio::io::AsyncWrite + Unpin>(
    writers: &mut BTreeMap<(Role, u32), SendHalf<W>>,
) -> Option<((Role, u32), String)> {
    let mut stuck = None;
    for (key, w) in writers.iter_mut() {
        if tokio::time::timeout(HEARTBEAT_WRITE, w.send(&Message::Heartbeat)).await.is_err() {
            stuck = Some(*key);
            break;
        }
    }
    let (role, rank) = stuck?;
    writers.remove(&(role, rank));
    let why = format!(
        "{role}[{rank}] stopped reading from the scheduler (a heartbeat could not be written within {} s)",
        HEARTBEAT_WRITE.as_secs()
    );
    Some(((role, rank), why))
}

/// How long one heartbeat may take to write.
const HEARTBEAT_WRITE: Duration = Duration::from_secs(1);

/// Runs the scheduler on an already bound listener until the job ends:
/// rendezvous, start, training (barriers, checkpoints, liveness), shutdown.
pub async fn run(ctx: RoleCtx, listener: TcpListener) -> Result<(), RoleError> {
    let acceptor = Acceptor::new(&ctx.tls, &[Role::Server, Role::Worker], ctx.limits())?;
    let (tx, rx) = mpsc::channel::<Input>(1024);
    let log = Arc::new(RateLimitedLog::default());
    let ticker = {
        let (tx, every) = (tx.clone(), ctx.heartbeat_interval());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if tx.send(Input::Tick).await.is_err() {
                    return;
                }
            }
        })
    };
    let serve = {
        let log = log.clone();
        move |conn, first, from| serve_peer(conn, first, from, tx.clone(), log.clone())
    };
    let _accept =
        AbortOnDrop(tokio::spawn(super::accept_loop(super::Listener::Tcp(listener), acceptor, log.clone(), serve)));
    let _ticker = AbortOnDrop(ticker);
    let mut s = Scheduler {
        timeout: ctx.heartbeat_timeout(),
        servers: ctx.plan.count(Role::Server),
        workers: ctx.plan.count(Role::Worker),
        ctx,
        rx,
        log,
        writers: BTreeMap::new(),
        alive: Liveness::default(),
    };
    let resumable = s.rendezvous().await?;
    s.start(&resumable).await?;
    s.train().await?;
    for w in s.writers.values_mut() {
        let _ = w.send(&Message::Shutdown).await;
    }
    Ok(())
}

/// The scheduler's state across its phases.
struct Scheduler {
    ctx: RoleCtx,
    rx: mpsc::Receiver<Input>,
    log: Arc<RateLimitedLog>,
    /// The registered peers' links.
    writers: BTreeMap<(Role, u32), Writer>,
    alive: Liveness,
    timeout: Duration,
    servers: u32,
    workers: u32,
}

impl Scheduler {
    /// Ends the job for every peer with `reason`.
    async fn fail(&mut self, reason: String) -> RoleError {
        abort(&mut self.writers, &reason).await;
        RoleError::new(reason)
    }

    /// Aborts the job because a peer's connection closed: the peer's own
    /// report (its error, its exit, its broken channel) says more, so this
    /// one only follows from it.
    async fn lost(&mut self, reason: String) -> RoleError {
        abort(&mut self.writers, &reason).await;
        RoleError::follows(reason)
    }

    /// Until every process of the plan registered (and, when resuming,
    /// every server said which steps it can resume from). Returns those.
    async fn rendezvous(&mut self) -> Result<BTreeMap<u32, Vec<u64>>, RoleError> {
        let (servers, workers) = (self.servers, self.workers);
        let expected: BTreeSet<(Role, u32)> =
            (0..servers).map(|r| (Role::Server, r)).chain((0..workers).map(|r| (Role::Worker, r))).collect();
        let resume = self.ctx.resume;
        let deadline = tokio::time::Instant::now() + self.ctx.patience() + Duration::from_secs(30);
        let mut resumable: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        while self.writers.len() < expected.len() || (resume && resumable.len() < servers as usize) {
            let input = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(i)) => i,
                Ok(None) => return Err(RoleError::new("the scheduler's listener stopped")),
                Err(_) => {
                    let missing: Vec<String> = expected
                        .iter()
                        .filter(|k| !self.writers.contains_key(k))
                        .map(|(role, rank)| format!("{role}[{rank}]"))
                        .collect();
                    abort(&mut self.writers, "rendezvous timed out").await;
                    return Err(RoleError::new(format!("rendezvous timed out; never joined: {}", missing.join(", "))));
                }
            };
            match input {
                Input::Tick => {
                    let stuck = beat(&mut self.writers).await.map(|(_, why)| why);
                    if let Some(why) = stuck.or_else(|| self.alive.silent(self.timeout, &BTreeSet::new())) {
                        return Err(self.fail(why).await);
                    }
                }
                Input::Joined(id, mut w) => {
                    let key = (id.role, id.rank);
                    self.alive.heard(&id);
                    if !expected.contains(&key) {
                        let message = format!("{id} is not part of this job's plan");
                        let _ = w.send(&Message::Error { message }).await;
                    } else if let std::collections::btree_map::Entry::Vacant(slot) = self.writers.entry(key) {
                        tracing::info!("{id} joined");
                        slot.insert(w);
                    } else {
                        let _ = w.send(&Message::Error { message: format!("{id} is already registered") }).await;
                    }
                }
                Input::Msg(id, m) if !self.writers.contains_key(&(id.role, id.rank)) => {
                    self.log.warn(&format!("ignoring `{}` from {id}, which is not registered", m.name()));
                }
                Input::Msg(id, Message::Resumable { steps }) if resume && id.role == Role::Server => {
                    self.alive.heard(&id);
                    resumable.insert(id.rank, steps);
                }
                Input::Msg(id, Message::Heartbeat) => self.alive.heard(&id),
                Input::Msg(id, m) => tracing::warn!("ignoring `{}` from {id} before the start", m.name()),
                Input::Lost(id, why) if self.writers.contains_key(&(id.role, id.rank)) => {
                    return Err(self.fail(format!("{id} was lost during rendezvous: {why}")).await);
                }
                Input::Lost(..) => {}
            }
        }
        Ok(resumable)
    }

    /// The step to resume from (when resuming), the optimizer (data,
    /// validated) to the servers, then go.
    async fn start(&mut self, resumable: &BTreeMap<u32, Vec<u64>>) -> Result<(), RoleError> {
        if self.ctx.resume {
            let step = match choose_resume_step(resumable) {
                Ok(step) => step,
                Err(e) => return Err(self.fail(e.to_string()).await),
            };
            tracing::info!("resuming from checkpoint step {step}");
            for w in self.writers.values_mut() {
                w.send(&Message::ResumeFrom { step }).await?;
            }
            self.ctx.emit(crate::net::control::Event::Resumed { step });
        }
        let opt = Message::SetOptimizer(self.ctx.spec.optimizer);
        self.send_to(Role::Server, &opt).await?;
        for w in self.writers.values_mut() {
            w.send(&Message::Start).await?;
        }
        self.ctx.emit(crate::net::control::Event::Started);
        Ok(())
    }

    async fn send_to(&mut self, role: Role, msg: &Message) -> Result<(), RoleError> {
        for ((r, _), w) in self.writers.iter_mut() {
            if *r == role {
                w.send(msg).await?;
            }
        }
        Ok(())
    }

    /// Training ends when every worker finished and every checkpoint they
    /// asked for is committed or failed, so no write is cut short.
    async fn train(&mut self) -> Result<(), RoleError> {
        let mut t = Training::default();
        while t.finished.len() < self.workers as usize || t.checkpoints.outstanding() {
            let Some(input) = self.rx.recv().await else {
                return Err(RoleError::new("the scheduler's listener stopped"));
            };
            if let Input::Msg(id, _) = &input {
                self.alive.heard(id);
            }
            self.on_training_input(input, &mut t).await?;
        }
        Ok(())
    }

    async fn on_training_input(&mut self, input: Input, t: &mut Training) -> Result<(), RoleError> {
        let (servers, workers) = (self.servers, self.workers);
        match input {
            Input::Tick => {
                // A finished worker that stops reading is no loss.
                let stuck = beat(&mut self.writers)
                    .await
                    .filter(|((role, rank), _)| !(*role == Role::Worker && t.finished.contains(rank)))
                    .map(|(_, why)| why);
                if let Some(why) = stuck.or_else(|| self.alive.silent(self.timeout, &t.finished)) {
                    return Err(self.fail(why).await);
                }
            }
            Input::Msg(id, m) if !self.writers.contains_key(&(id.role, id.rank)) => {
                self.log.warn(&format!("ignoring `{}` from {id}, which is not registered", m.name()));
            }
            Input::Msg(_, Message::Heartbeat) => {}
            Input::Msg(id, Message::Barrier { id: b }) => match t.barrier.arrive(id.rank, b, workers) {
                Ok(false) => {}
                Ok(true) => self.send_to(Role::Worker, &Message::BarrierDone { id: b }).await?,
                Err(why) => refuse(&mut self.writers, &id, why, &self.log).await,
            },
            Input::Msg(id, Message::Finished) => {
                t.finished.insert(id.rank);
            }
            Input::Msg(id, Message::Checkpoint { step }) if id.rank == 0 => {
                if let Err(why) = t.checkpoints.requested(step) {
                    refuse(&mut self.writers, &id, why, &self.log).await;
                }
            }
            Input::Msg(id, Message::CheckpointSaved { step, record }) if id.role == Role::Server => {
                if record.shard != id.rank {
                    tracing::warn!("{id} reported a checkpoint for shard {}; ignored", record.shard);
                } else if let Some(shards) = t.checkpoints.saved(step, record, servers) {
                    t.checkpoints.committing(step, shards.iter().map(|d| d.bytes).sum());
                    self.send_to(Role::Server, &Message::CheckpointCommit { step, shards }).await?;
                }
            }
            Input::Msg(id, Message::CheckpointCommitted { step }) if id.role == Role::Server => {
                if let Some(bytes) = t.checkpoints.committed(step, id.rank, servers) {
                    self.ctx.emit(crate::net::control::Event::Checkpoint { step, bytes });
                }
            }
            Input::Msg(id, Message::CheckpointFailed { step, reason }) if id.role == Role::Server => {
                t.checkpoints.failed(step);
                let message = format!("checkpoint at step {step} failed on {id}: {reason}; training goes on");
                // Logged as the event's line; the launcher shows it once.
                self.ctx.emit(crate::net::control::Event::Warning { message });
            }
            Input::Msg(id, m) => tracing::warn!("ignoring unexpected `{}` from {id}", m.name()),
            Input::Joined(id, mut w) => {
                let _ = w.send(&Message::Error { message: format!("{id}: the job has already started") }).await;
            }
            Input::Lost(id, _) if id.role == Role::Worker && t.finished.contains(&id.rank) => {}
            Input::Lost(id, why) => return Err(self.lost(format!("{id} was lost: {why}")).await),
        }
        Ok(())
    }
}

/// What training tracks: the open barrier, the workers that finished, the
/// checkpoints in flight.
#[derive(Default)]
struct Training {
    barrier: Barrier,
    finished: BTreeSet<u32>,
    checkpoints: Checkpoints,
}

/// The newest step every server can resume from.
fn choose_resume_step(resumable: &BTreeMap<u32, Vec<u64>>) -> Result<u64, NothingToResume> {
    let mut common: Option<BTreeSet<u64>> = None;
    for steps in resumable.values() {
        let these: BTreeSet<u64> = steps.iter().copied().collect();
        common = Some(match common {
            None => these,
            Some(c) => c.intersection(&these).copied().collect(),
        });
    }
    common.and_then(|c| c.last().copied()).ok_or_else(|| NothingToResume(resumable.clone()))
}

/// Tells a peer what it asked for is refused (and logs it, at a bounded rate).
async fn refuse(writers: &mut BTreeMap<(Role, u32), Writer>, id: &Identity, why: Refusal, log: &RateLimitedLog) {
    log.warn(&format!("refused a request of {id}: {why}"));
    if let Some(w) = writers.get_mut(&(id.role, id.rank)) {
        let _ = w.send(&Message::Error { message: why.to_string() }).await;
    }
}

/// The barrier the workers wait at: one at a time, each of a later id than
/// the one before, so a worker sending ever-new ids holds no memory.
#[derive(Debug, Default)]
struct Barrier {
    /// The id the waiting workers gave, and their ranks.
    open: Option<(u64, BTreeSet<u32>)>,
    /// The id of the barrier released last.
    last: Option<u64>,
}

impl Barrier {
    /// Worker `rank` reaches barrier `id`: `Ok(true)` when it is the last of
    /// `workers` to arrive (the barrier is released), `Err` for an id other
    /// than the one the workers wait at or a worker already waiting.
    fn arrive(&mut self, rank: u32, id: u64, workers: u32) -> Result<bool, Refusal> {
        if let Some(last) = self.last
            && id <= last
        {
            return Err(Refusal::BarrierReleased { id, last });
        }
        let (at, waiting) = self.open.get_or_insert_with(|| (id, BTreeSet::new()));
        if *at != id {
            return Err(Refusal::OtherBarrier { id, open: *at });
        }
        if !waiting.insert(rank) {
            return Err(Refusal::AlreadyWaiting { rank, id });
        }
        if waiting.len() < workers as usize {
            return Ok(false);
        }
        self.open = None;
        self.last = Some(id);
        Ok(true)
    }
}

/// How many checkpoints may be between worker 0's request and their commit.
/// Honestly there are at most four: a server holds three (one being
/// written, one queued, one waiting for the queue, while it reads nothing
/// more from worker 0, who therefore cannot finish another step) and worker
/// 0 may have asked for one more that the servers have not read yet.
pub const CHECKPOINTS_IN_FLIGHT: usize = 8;

/// Checkpoints in flight: asked for by worker 0, reported by the servers.
#[derive(Debug, Default)]
struct Checkpoints {
    pending: BTreeMap<u64, BTreeMap<u32, crate::net::wire::ShardDigest>>,
    /// Told to commit: the servers that wrote their manifest so far, and
    /// the checkpoint's size. A checkpoint is announced only once every
    /// server has, since only then does a restart resume from it.
    committing: BTreeMap<u64, (BTreeSet<u32>, u64)>,
    /// Committed or failed: late messages about them change nothing.
    settled: BTreeSet<u64>,
    /// The step worker 0 asked for last.
    last_requested: Option<u64>,
}

impl Checkpoints {
    /// Worker 0 asks for checkpoint `step`: a later step than the last it
    /// asked for, with fewer than [`CHECKPOINTS_IN_FLIGHT`] in flight.
    fn requested(&mut self, step: u64) -> Result<(), Refusal> {
        if let Some(last) = self.last_requested
            && step <= last
        {
            return Err(Refusal::CheckpointNotLater { step, last });
        }
        if !self.settled.contains(&step) {
            self.pending_at(step)?;
        }
        self.last_requested = Some(step);
        Ok(())
    }

    /// The shards reported for `step` so far, making room for it if there is some.
    fn pending_at(&mut self, step: u64) -> Result<&mut BTreeMap<u32, crate::net::wire::ShardDigest>, Refusal> {
        if !self.pending.contains_key(&step) && self.pending.len() >= CHECKPOINTS_IN_FLIGHT {
            return Err(Refusal::TooManyCheckpoints);
        }
        Ok(self.pending.entry(step).or_default())
    }

    /// Records a shard; returns all of them once every server reported.
    fn saved(
        &mut self,
        step: u64,
        d: crate::net::wire::ShardDigest,
        servers: u32,
    ) -> Option<Vec<crate::net::wire::ShardDigest>> {
        if self.settled.contains(&step) {
            return None;
        }
        let at = match self.pending_at(step) {
            Ok(at) => at,
            Err(why) => {
                tracing::warn!("a checkpoint report of step {step} ignored: {why}");
                return None;
            }
        };
        at.insert(d.shard, d);
        if at.len() < servers as usize {
            return None;
        }
        self.settled.insert(step);
        self.pending.remove(&step).map(|m| m.into_values().collect())
    }

    /// The servers were told to commit `step` (of `bytes` in all).
    fn committing(&mut self, step: u64, bytes: u64) {
        self.committing.insert(step, (BTreeSet::new(), bytes));
    }

    /// Server `rank` wrote its manifest of `step`; the checkpoint's size
    /// once every server has.
    fn committed(&mut self, step: u64, rank: u32, servers: u32) -> Option<u64> {
        let (done, bytes) = self.committing.get_mut(&step)?;
        done.insert(rank);
        let bytes = *bytes;
        (done.len() >= servers as usize).then(|| {
            self.committing.remove(&step);
            bytes
        })
    }

    fn failed(&mut self, step: u64) {
        self.pending.remove(&step);
        self.committing.remove(&step);
        self.settled.insert(step);
    }

    fn outstanding(&self) -> bool {
        !self.pending.is_empty() || !self.committing.is_empty()
    }
}

/// Aborts a task when dropped, on every way out of a function.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn abort(writers: &mut BTreeMap<(Role, u32), Writer>, reason: &str) {
    for w in writers.values_mut() {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), w.send(&Message::Abort { reason: reason.to_string() })).await;
    }
}

/// One peer's connection: its registration, then every message it sends
/// goes to the scheduler's loop as input, and its loss too.
async fn serve_peer(
    conn: ServerConn,
    first: Message,
    from: crate::net::conn::Endpoint,
    tx: mpsc::Sender<Input>,
    log: Arc<RateLimitedLog>,
) {
    let id = conn.peer().clone();
    if first != Message::Register {
        log.warn(&format!("refused {id} from {from}: first message was `{}`, not `register`", first.name()));
        return conn.refuse("the first message must be `register`").await;
    }
    let (mut r, w) = conn.into_split();
    if tx.send(Input::Joined(id.clone(), w)).await.is_err() {
        return;
    }
    loop {
        match r.recv().await {
            Ok(m) => {
                if tx.send(Input::Msg(id.clone(), m)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // In words a person reads: a closed connection, not TLS's text.
                let _ = tx.send(Input::Lost(id.clone(), RoleError::from(e).message)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A worker sending ever-new barrier ids holds one entry, not one per id.
    #[test]
    fn a_barrier_holds_one_id_at_a_time() {
        let mut b = Barrier::default();
        assert_eq!(b.arrive(1, 1, 2), Ok(false));
        for id in 2..1000 {
            assert_eq!(b.arrive(1, id, 2), Err(Refusal::OtherBarrier { id, open: 1 }));
        }
        assert_eq!(b.arrive(1, 1, 2), Err(Refusal::AlreadyWaiting { rank: 1, id: 1 }));
        let why = b.arrive(1, 2, 2).unwrap_err().to_string();
        assert_eq!(why, "barrier 2 asked for while the workers wait at barrier 1");
        assert_eq!(b.open.as_ref().map(|(id, w)| (*id, w.len())), Some((1, 1)));
        assert_eq!(b.arrive(0, 1, 2), Ok(true));
        assert!(b.open.is_none());
        assert!(b.arrive(0, 1, 2).is_err());
        assert_eq!(b.arrive(0, 2, 2), Ok(false));
    }

    /// Reports of ever-new steps hold at most the bound in flight.
    #[test]
    fn checkpoints_in_flight_are_bounded() {
        let mut c = Checkpoints::default();
        let d = |shard| crate::net::wire::ShardDigest { shard, bytes: 1, sha256: [0; 32] };
        for step in 1..1000 {
            let _ = c.requested(step);
            assert!(c.saved(step + 5000, d(0), 2).is_none());
        }
        assert_eq!(c.pending.len(), CHECKPOINTS_IN_FLIGHT);
    }

    /// Regression: a checkpoint was announced when the servers were told to
    /// commit it, so a job stopped right then resumed from an older one than
    /// the launcher had printed. It is announced once every server's
    /// manifest is written, and the scheduler waits for that before ending.
    #[test]
    fn a_checkpoint_counts_once_every_server_committed_it() {
        let mut c = Checkpoints::default();
        let d = |shard| crate::net::wire::ShardDigest { shard, bytes: 10, sha256: [0; 32] };
        c.requested(15).unwrap();
        assert!(c.saved(15, d(0), 2).is_none());
        let shards = c.saved(15, d(1), 2).expect("both shards written");
        c.committing(15, shards.iter().map(|s| s.bytes).sum());
        assert!(c.outstanding(), "not done before the manifests are written");
        assert_eq!(c.committed(15, 1, 2), None);
        assert_eq!(c.committed(15, 1, 2), None, "the same server twice does not count twice");
        assert_eq!(c.committed(15, 0, 2), Some(20));
        assert!(!c.outstanding());
        assert_eq!(c.committed(15, 0, 2), None, "announced once");
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_loses_its_link_after_one_heartbeat() {
        let stall = Duration::from_secs(60);
        // Worker 1's end of the link holds one byte and is never read.
        let (mut live_peer, live) = tokio::io::duplex(1 << 16);
        let (_stuck_peer, stuck) = tokio::io::duplex(1);
        let mut writers = BTreeMap::new();
        writers.insert((Role::Worker, 0), SendHalf::new(live, stall));
        writers.insert((Role::Worker, 1), SendHalf::new(stuck, stall));
        let started = std::time::Instant::now();
        let (key, why) = beat(&mut writers).await.expect("the stuck link is reported");
        assert_eq!(key, (Role::Worker, 1));
        assert!(why.contains("worker[1] stopped reading"), "{why}");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded by the heartbeat write time");
        // Its half-written frame is never followed by another message.
        assert_eq!(writers.keys().copied().collect::<Vec<_>>(), [(Role::Worker, 0)]);
        // The live peer got a whole heartbeat, and gets the next one.
        assert!(beat(&mut writers).await.is_none());
        let mut want = Vec::new();
        Message::Heartbeat.encode_frame(&mut want);
        let mut got = vec![0u8; 2 * want.len()];
        live_peer.read_exact(&mut got).await.expect("two heartbeat frames");
        assert_eq!(got, [want.clone(), want].concat());
    }
}
