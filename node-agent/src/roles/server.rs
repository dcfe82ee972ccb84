//! A parameter server: holds one contiguous shard of the parameters, sums
//! the workers' gradients and applies the optimizer.
//!
//! It admits only workers on its port (checked in the TLS handshake). In
//! sync mode a step's update happens once every worker has pushed for that
//! step; in async mode each push is applied on arrival. Pulls wait until the
//! shard reaches the version asked for.

use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{RateLimitedLog, RoleCtx, RoleError};
use crate::conn::{Acceptor, ConnError, ServerConn};
use crate::identity::Role;
use crate::optimizer::{OptimizerSpec, ShardOptimizer};
use crate::spec::SyncMode;
use crate::wire::{Message, TAG_PUSH, push_view};

/// The shard and its update state.
///
/// A `std::sync::Mutex`, not a tokio one: nothing awaits while holding it,
/// and the critical sections are short loops over memory.
struct Shard {
    state: Mutex<ShardState>,
    version: watch::Sender<u64>,
    workers: usize,
    mode: SyncMode,
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
}

impl Shard {
    /// Takes a push body (any encoding, see [`crate::wire::push_view`]).
    fn push(&self, rank: u32, body: &[u8]) -> Result<(), String> {
        let (step, grad) = push_view(body).map_err(|e| e.to_string())?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if grad.len() != st.params.len() {
            return Err(format!("push of {} values, but this shard holds {}", grad.len(), st.params.len()));
        }
        match self.mode {
            SyncMode::Async => {
                let ShardState { params, opt, .. } = &mut *st;
                opt.apply(params, &[grad], 1);
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
                let slot = &mut st.pending[r];
                slot.clear();
                slot.extend_from_slice(body);
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
        st.version += 1;
        self.version.send_replace(st.version);
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
        crate::wire::encode_params(st.version, &st.params, &mut buf);
        let frame = Arc::new(buf);
        *cache = Some((st.version, frame.clone()));
        frame
    }
}

/// Runs server `ctx.me().rank` on an already bound listener until the job ends.
pub async fn run(ctx: RoleCtx, listener: TcpListener) -> Result<(), RoleError> {
    let mut sched = ctx.join_scheduler().await?;
    let mut optimizer: Option<OptimizerSpec> = None;
    loop {
        match sched.recv().await? {
            Message::SetOptimizer(spec) => optimizer = Some(spec),
            Message::Start => break,
            Message::Abort { reason } => return Err(RoleError(format!("the job was aborted: {reason}"))),
            m => return Err(RoleError(format!("unexpected `{}` from the scheduler before the start", m.name()))),
        }
    }
    let spec = optimizer.ok_or_else(|| RoleError("the scheduler started the job without an optimizer".into()))?;
    let range = ctx.plan.shard(ctx.me().rank);
    let params = crate::model::init(&ctx.spec.model, ctx.seed)[range.clone()].to_vec();
    let workers = ctx.plan.count(Role::Worker) as usize;
    let len = params.len();
    let shard = Arc::new(Shard {
        state: Mutex::new(ShardState {
            params,
            pending: vec![Vec::new(); workers],
            pushed: vec![false; workers],
            count: 0,
            version: 0,
            opt: ShardOptimizer::new(spec, len),
        }),
        version: watch::Sender::new(0),
        workers,
        mode: ctx.spec.training.mode,
        frame: Mutex::new(None),
    });
    tracing::info!("serving parameters {range:?} with {spec:?}");
    ctx.emit(crate::control::Event::Started);
    let acceptor = Acceptor::new(&ctx.tls, &[Role::Worker], ctx.limits())?;
    let accept = tokio::spawn(accept_loop(listener, acceptor, shard));
    let result = loop {
        match sched.recv().await {
            Ok(Message::Shutdown) => break Ok(()),
            Ok(Message::Abort { reason }) => break Err(RoleError(format!("the job was aborted: {reason}"))),
            Ok(Message::SetOptimizer(_)) => {
                break Err(RoleError("changing the optimizer during training is not supported".into()));
            }
            Ok(m) => tracing::warn!("ignoring unexpected `{}` from the scheduler", m.name()),
            Err(e) => break Err(RoleError(format!("lost the scheduler: {e}"))),
        }
    };
    accept.abort();
    result
}

async fn accept_loop(listener: TcpListener, acceptor: Acceptor, shard: Arc<Shard>) {
    let log = Arc::new(RateLimitedLog::default());
    loop {
        let (tcp, from) = super::accept_next(&listener, &log).await;
        let acceptor = acceptor.clone();
        let shard = shard.clone();
        let log = log.clone();
        tokio::spawn(async move {
            match acceptor.accept(tcp).await {
                Ok((conn, first)) => {
                    let peer = conn.peer().clone();
                    if let Err(e) = serve_worker(conn, first, &shard).await {
                        log.warn(&format!("dropped {peer} from {from}: {e}"));
                    }
                }
                Err(e) => log.warn(&format!("refused a connection from {from}: {e}")),
            }
        });
    }
}

async fn serve_worker(mut conn: ServerConn, first: Message, shard: &Shard) -> Result<(), ConnError> {
    let rank = conn.peer().rank;
    // The first message arrived decoded (it came through the deadline check).
    let mut pending = Some(first);
    loop {
        let outcome = match pending.take() {
            Some(Message::Push { step, data }) => {
                let mut raw = Vec::new();
                crate::wire::encode_push(step, &data, crate::wire::Encoding::F32, 0.0, &mut [], &mut raw);
                Action::Push(raw.split_off(crate::wire::HEADER_LEN))
            }
            Some(Message::Pull { min_version }) => Action::Pull(min_version),
            Some(other) => Action::Refuse(format!("`{}` is not something a server accepts", other.name())),
            None => match conn.recv_raw().await {
                Ok(body) => match body[0] {
                    // Hot path: straight from the received bytes.
                    TAG_PUSH => match shard.push(rank, body) {
                        Ok(()) => continue,
                        Err(why) => Action::Refuse(why),
                    },
                    _ => match Message::decode(body) {
                        Ok(Message::Pull { min_version }) => Action::Pull(min_version),
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
            Action::Push(body) => {
                if let Err(why) = shard.push(rank, &body) {
                    conn.refuse(&why).await;
                    return Err(ConnError::Setup(why));
                }
            }
            Action::Pull(min_version) => {
                let mut rx = shard.version.subscribe();
                let current = *rx.borrow();
                if min_version > current + 1 {
                    let why = format!("pull for version {min_version}, but the shard is at {current}");
                    conn.refuse(&why).await;
                    return Err(ConnError::Setup(why));
                }
                // The sender lives as long as the shard, so this only ends on success.
                let _ = rx.wait_for(|v| *v >= min_version).await;
                let frame = shard.params_frame();
                conn.send_frame(&frame).await?;
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
    Refuse(String),
}
