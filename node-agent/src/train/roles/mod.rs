//! The three roles of a job. Each takes a [`RoleCtx`] and runs to the end of
//! the job, returning an error that says, in words for the user, what failed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::job::plan::Plan;
use crate::job::spec::JobSpec;
use crate::net::conn::ConnLimits;
use crate::net::control::Event;
use crate::net::identity::{Identity, Role};
use crate::net::tls::TlsIdentity;

pub mod link;
pub mod scheduler;
pub mod server;
mod shard;
pub mod worker;

/// Where a role reports events (stdout JSON lines in the agent; a channel in tests).
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// A role failure, in words for the user.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RoleError {
    /// Why, in words for the user.
    pub message: String,
    /// The failure follows from another process's: a peer closed or reset
    /// its connection, or the scheduler aborted the job. The launcher names
    /// such a report only when nothing more direct explains the failure.
    pub follows: bool,
}

impl RoleError {
    /// A failure of this process's own (the usual case).
    pub fn new(message: impl Into<String>) -> Self {
        RoleError { message: message.into(), follows: false }
    }

    /// A failure that follows from another process's (see [`RoleError::follows`]).
    pub fn follows(message: impl Into<String>) -> Self {
        RoleError { message: message.into(), follows: true }
    }

    /// The scheduler aborted the job for `reason`.
    pub fn aborted(reason: &str) -> Self {
        Self::follows(format!("the job was aborted: {reason}"))
    }
}

impl From<crate::net::conn::ConnError> for RoleError {
    fn from(e: crate::net::conn::ConnError) -> Self {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        let gone = match &e {
            crate::net::conn::ConnError::Io(io) => match io.kind() {
                UnexpectedEof => Some("a peer closed its connection without a goodbye (it stopped or failed)"),
                ConnectionReset | ConnectionAborted => Some("a peer reset its connection (it stopped or failed)"),
                BrokenPipe => Some("a peer stopped reading (it stopped or failed)"),
                _ => None,
            },
            _ => None,
        };
        // The peer's own report says what happened; TLS's wording (and its
        // documentation link) would only bury it.
        match gone {
            Some(what) => RoleError::follows(what),
            None => RoleError::new(e.to_string()),
        }
    }
}

/// Everything a role needs.
#[derive(Clone)]
pub struct RoleCtx {
    /// The validated job.
    pub spec: JobSpec,
    /// The plan (same on every process).
    pub plan: Plan,
    /// The training seed in force.
    pub seed: u64,
    /// This process's credentials.
    pub tls: TlsIdentity,
    /// Where to report.
    pub events: EventSink,
    /// Where this process may write.
    pub workdir: PathBuf,
    /// A server's checkpoint key and series (servers of jobs with `[checkpoint]`).
    pub checkpoint: Option<CheckpointCtx>,
    /// Whether the job continues from a checkpoint.
    pub resume: bool,
    /// A server's starting weights from `[model] init`, verified (all
    /// parameters; the server takes its shard). Read by the agent before it
    /// drops privileges, so that the weights may sit where the job's uid
    /// cannot read, such as the launching user's private run directory.
    pub initial: Option<Vec<f32>>,
    /// Set when the launcher asks the job to stop and keep its work
    /// ([`crate::net::control::Control::Finish`]): worker 0 saves the model
    /// after the step under way.
    pub finish: Arc<AtomicBool>,
}

/// The starting weights a process of `role` holds: a server of a job with
/// `[model] init` that does not resume gets them, verified; anyone else
/// none. The agent calls this before it drops privileges.
pub fn initial_weights(
    spec: &JobSpec,
    role: Role,
    resume: bool,
) -> Result<Option<Vec<f32>>, crate::store::artifact::ArtifactError> {
    match (&spec.init, role, resume) {
        (Some(init), Role::Server, false) => {
            crate::store::artifact::load_verified(&init.dir, &init.trusted_keys, &spec.model).map(Some)
        }
        _ => Ok(None),
    }
}

/// What a server needs to write and read checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointCtx {
    /// The job's checkpoint key.
    pub key: Arc<crate::store::checkpoint::CheckpointKey>,
    /// The series: the id of the job that started it.
    pub series: crate::net::identity::JobId,
    /// `[checkpoint] dir` joined with the series.
    pub series_dir: PathBuf,
}

impl std::fmt::Debug for RoleCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleCtx").field("me", &self.tls.me).finish_non_exhaustive()
    }
}

impl RoleCtx {
    /// Who this process is.
    pub fn me(&self) -> &Identity {
        &self.tls.me
    }

    /// Connection limits from the job file.
    pub fn limits(&self) -> ConnLimits {
        // Every process of the job may sit on one address (as with --local):
        // the per-source cap never falls below what the plan itself needs.
        let needed = self.plan.processes.len() + 4;
        ConnLimits {
            max_frame: self.spec.limits.max_frame_bytes,
            first_message: Duration::from_millis(self.spec.limits.first_message_timeout_ms),
            max_connections: self.spec.limits.max_connections.max(needed),
            max_per_source: self.spec.limits.max_connections_per_source.max(needed),
            stall: self.stall_timeout(),
        }
    }

    /// How long to keep trying to reach a peer.
    pub fn patience(&self) -> Duration {
        Duration::from_secs(self.spec.limits.connect_timeout_s)
    }

    /// How long a peer may stall mid-frame or stop reading before it is dropped.
    pub fn stall_timeout(&self) -> Duration {
        self.spec.limits.stall_timeout_s.map_or_else(|| self.heartbeat_timeout(), Duration::from_secs)
    }

    /// Silence after which a peer is declared dead.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs(self.spec.training.heartbeat_timeout_s)
    }

    /// How often to say "still here".
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_timeout() / 4
    }

    /// Reports an event.
    pub fn emit(&self, e: Event) {
        (self.events)(e)
    }

    /// Connects to the scheduler, registers, and starts the heartbeat.
    pub async fn scheduler_link(&self) -> Result<SchedLink, RoleError> {
        let (rx, tx) = self.join_scheduler().await?.into_split();
        let tx = Arc::new(tokio::sync::Mutex::new(tx));
        let beat = {
            let (tx, every) = (tx.clone(), self.heartbeat_interval());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if tx.lock().await.send(&crate::net::wire::Message::Heartbeat).await.is_err() {
                        return;
                    }
                }
            })
        };
        Ok(SchedLink { tx, rx: Some(rx), beat, timeout: self.heartbeat_timeout() })
    }

    /// Connects to every server (in rank order), with the job's stall
    /// timeout; each with the range of the flat vector it holds.
    pub async fn connect_servers(
        &self,
    ) -> Result<Vec<(crate::net::conn::ClientConn, std::ops::Range<usize>)>, RoleError> {
        let mut out = Vec::new();
        for p in self.plan.of_role(Role::Server) {
            let local = self.same_host_socket(p);
            let mut conn = crate::net::conn::connect_to(
                &self.tls,
                self.plan.identity(Role::Server, p.rank),
                p.socket().expect("servers listen"),
                local.as_deref(),
                self.spec.limits.max_frame_bytes,
                self.patience(),
            )
            .await
            .map_err(|e| RoleError::new(format!("cannot reach {}: {e}", p.label())))?;
            conn.set_stall(self.stall_timeout());
            out.push((conn, self.plan.shard(p.rank)));
        }
        Ok(out)
    }

    /// The Unix-domain socket through which this process reaches `server`
    /// ([`server::local_socket`]) when the server runs on this process's
    /// host and `[cluster] same_host` is `"unix"`; none otherwise (its TCP
    /// port).
    pub fn same_host_socket(&self, server: &crate::job::plan::PlannedProcess) -> Option<std::path::PathBuf> {
        let me = self.me();
        let mine = self.plan.get(me.role, me.rank)?;
        let unix = self.spec.cluster.same_host == crate::job::spec::SameHost::Unix;
        if !unix || mine.host != server.host {
            return None;
        }
        server::local_socket(&self.workdir, server)
    }

    /// Connects to the scheduler and registers.
    pub async fn join_scheduler(&self) -> Result<crate::net::conn::ClientConn, RoleError> {
        let sched = self.plan.scheduler();
        let addr = sched.socket().expect("the scheduler listens");
        let mut conn = crate::net::conn::connect(
            &self.tls,
            self.plan.identity(Role::Scheduler, 0),
            addr,
            self.spec.limits.max_frame_bytes,
            self.patience(),
        )
        .await
        .map_err(|e| RoleError::new(format!("cannot join the scheduler at {addr}: {e}")))?;
        conn.set_stall(self.stall_timeout());
        conn.send(&crate::net::wire::Message::Register).await?;
        Ok(conn)
    }
}

use crate::net::conn::Endpoint;

type ClientTls = crate::net::record::TlsStream;

/// A server's or worker's connection to the scheduler: a sender shared with
/// the heartbeat task that says "still here" every quarter of the timeout,
/// and a receiver that skips the scheduler's heartbeats and declares it dead
/// after `[training] heartbeat_timeout` of silence.
pub struct SchedLink {
    tx: Arc<tokio::sync::Mutex<crate::net::conn::SendHalf<tokio::io::WriteHalf<ClientTls>>>>,
    rx: Option<crate::net::conn::RecvHalf<tokio::io::ReadHalf<ClientTls>>>,
    beat: tokio::task::JoinHandle<()>,
    timeout: Duration,
}

impl Drop for SchedLink {
    fn drop(&mut self) {
        self.beat.abort();
    }
}

impl SchedLink {
    /// Sends to the scheduler.
    pub async fn send(&self, m: &crate::net::wire::Message) -> Result<(), RoleError> {
        self.tx.lock().await.send(m).await.map_err(RoleError::from)
    }

    /// The next message from the scheduler other than a heartbeat.
    pub async fn recv(&mut self) -> Result<crate::net::wire::Message, RoleError> {
        self.recv_or_closed().await?.ok_or_else(|| RoleError::follows("the scheduler closed the connection"))
    }

    /// Like [`SchedLink::recv`], but a connection the scheduler closed
    /// cleanly is `None` rather than an error (at the end of the job).
    pub async fn recv_or_closed(&mut self) -> Result<Option<crate::net::wire::Message>, RoleError> {
        let timeout = self.timeout;
        let rx = self.rx.as_mut().ok_or_else(|| RoleError::new("the scheduler's messages go elsewhere"))?;
        loop {
            let waited = match tokio::time::timeout(timeout, rx.recv()).await {
                Ok(Err(crate::net::conn::ConnError::Closed(_))) => return Ok(None),
                other => other.map(|r| r.map_err(RoleError::from)),
            };
            if let Some(out) = settle(waited, timeout) {
                return out.map(Some);
            }
        }
    }

    /// Hands the receiving side to a task that forwards every message,
    /// heartbeats included, so waiting for one can race other work.
    pub fn forward(&mut self) -> tokio::sync::mpsc::Receiver<Result<crate::net::wire::Message, RoleError>> {
        let (tx, out) = tokio::sync::mpsc::channel(16);
        if let Some(mut rx) = self.rx.take() {
            tokio::spawn(async move {
                loop {
                    let m = rx.recv().await.map_err(RoleError::from);
                    let end = m.is_err();
                    if tx.send(m).await.is_err() || end {
                        return;
                    }
                }
            });
        }
        out
    }

    /// The silence after which the scheduler counts as dead.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// What one wait for a scheduler message came to: `None` for a heartbeat
/// (wait again), else the message, the error, or "declared dead" after
/// `timeout` of silence.
pub fn settle(
    waited: Result<Result<crate::net::wire::Message, RoleError>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Option<Result<crate::net::wire::Message, RoleError>> {
    match waited {
        Ok(Ok(crate::net::wire::Message::Heartbeat)) => None,
        Ok(other) => Some(other),
        Err(_) => Some(Err(RoleError::new(format!(
            "the scheduler sent nothing for {} s ([training] heartbeat_timeout): declared dead",
            timeout.as_secs()
        )))),
    }
}

/// Logs a refused or failed connection at a bounded rate, so a flood of
/// garbage cannot flood the logs.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimitedLog {
    /// Logs `msg` unless one was logged in the last second; counts the rest.
    pub fn warn(&self, msg: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match st.0 {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => st.1 += 1,
            _ => {
                if st.1 > 0 {
                    tracing::warn!("{msg} (and {} similar in the last second)", st.1);
                } else {
                    tracing::warn!("{msg}");
                }
                *st = (Some(now), 0);
            }
        }
    }
}

/// The accept loop of every listening role: a connection takes a slot
/// before a byte is read (closed at once when a cap is full: a flood costs
/// a bounded number of sockets and tasks), then completes its handshake and
/// first message on a task of its own, which hands both to `serve`.
pub async fn accept_loop<F, Fut>(
    listener: Listener,
    acceptor: crate::net::conn::Acceptor,
    log: Arc<RateLimitedLog>,
    serve: F,
) where
    F: Fn(crate::net::conn::ServerConn, crate::net::wire::Message, Endpoint) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    loop {
        let (sock, from) = accept_next(&listener, &log).await;
        let slot = match acceptor.admit(from.clone()) {
            Ok(slot) => slot,
            Err(why) => {
                log.warn(&format!("closed a connection from {from} at once: {why}"));
                continue;
            }
        };
        let (acceptor, log, serve) = (acceptor.clone(), log.clone(), serve.clone());
        tokio::spawn(async move {
            match acceptor.accept(sock, from.clone(), slot).await {
                Ok((conn, first)) => serve(conn, first, from).await,
                Err(e) => log.warn(&format!("refused a connection from {from}: {e}")),
            }
        });
    }
}

/// A listening socket of a role: its TCP port, or (servers) its Unix-domain
/// socket for the processes of its own host.
#[derive(Debug)]
pub enum Listener {
    /// The role's port.
    Tcp(tokio::net::TcpListener),
    /// A Unix-domain socket, and its path.
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(crate::net::record::Socket, Endpoint)> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, from)| (s.into(), Endpoint::Tcp(from))),
            Listener::Unix(l, path) => l.accept().await.map(|(s, _)| {
                crate::net::conn::widen(&s);
                let pid = s.peer_cred().ok().and_then(|c| c.pid());
                (s.into(), Endpoint::Local { path: path.clone(), pid })
            }),
        }
    }
}

/// Accepts the next connection; on errors (out of descriptors, memory) it
/// logs at a bounded rate and backs off instead of spinning.
pub async fn accept_next(listener: &Listener, log: &RateLimitedLog) -> (crate::net::record::Socket, Endpoint) {
    loop {
        match listener.accept().await {
            Ok(x) => return x,
            Err(e) => {
                log.warn(&format!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A worker waits for the scheduler's start; returns the checkpoint step to
/// continue from (0 unless `resume`).
pub async fn await_start(sched: &mut SchedLink, resume: bool) -> Result<u64, RoleError> {
    let mut resumed_at = 0u64;
    loop {
        match sched.recv().await? {
            crate::net::wire::Message::Start => return Ok(resumed_at),
            crate::net::wire::Message::ResumeFrom { step } if resume => resumed_at = step,
            crate::net::wire::Message::Abort { reason } => {
                return Err(RoleError::aborted(&reason));
            }
            m => return Err(RoleError::new(format!("unexpected `{}` from the scheduler", m.name()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RoleError;
    use crate::net::conn::ConnError;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_peer_gone_is_marked_as_following_and_other_errors_are_not() {
        for kind in [ErrorKind::UnexpectedEof, ErrorKind::ConnectionReset, ErrorKind::BrokenPipe] {
            assert!(RoleError::from(ConnError::Io(Error::new(kind, "gone"))).follows, "{kind:?}");
        }
        assert!(!RoleError::from(ConnError::Io(Error::new(ErrorKind::TimedOut, "stalled"))).follows);
        assert!(!RoleError::from(ConnError::FrameTooLarge { len: 9, max: 1 }).follows);
        assert!(RoleError::aborted("server[1] declared dead").follows);
        assert!(!RoleError::new("data file truncated").follows);
    }
}
