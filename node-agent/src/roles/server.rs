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
use crate::wire::Message;

/// The shard and its update state.
///
/// A `std::sync::Mutex`, not a tokio one: nothing awaits while holding it,
/// and the critical sections are short loops over memory.
struct Shard {
    state: Mutex<ShardState>,
    version: watch::Sender<u64>,
    workers: usize,
    mode: SyncMode,
}

struct ShardState {
    params: Vec<f32>,
    sum: Vec<f32>,
    pushed: Vec<bool>,
    count: usize,
    version: u64,
    opt: ShardOptimizer,
}

impl Shard {
    fn push(&self, rank: u32, step: u64, data: &[f32]) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if data.len() != st.params.len() {
            return Err(format!("push of {} values, but this shard holds {}", data.len(), st.params.len()));
        }
        match self.mode {
            SyncMode::Async => {
                let ShardState { params, opt, .. } = &mut *st;
                opt.apply(params, data, 1);
            }
            SyncMode::Sync => {
                if step != st.version {
                    return Err(format!("push for step {step}, but the shard is at step {}", st.version));
                }
                let slot =
                    st.pushed.get_mut(rank as usize).ok_or_else(|| format!("worker rank {rank} is not in the plan"))?;
                if *slot {
                    return Err(format!("worker {rank} pushed twice for step {step}"));
                }
                *slot = true;
                warden_kernels::add_into(&mut st.sum, data);
                st.count += 1;
                if st.count < self.workers {
                    return Ok(());
                }
                let ShardState { params, sum, opt, .. } = &mut *st;
                opt.apply(params, sum, self.workers);
                sum.fill(0.0);
                st.pushed.fill(false);
                st.count = 0;
            }
        }
        st.version += 1;
        self.version.send_replace(st.version);
        Ok(())
    }

    fn snapshot(&self) -> (u64, Vec<f32>) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.version, st.params.clone())
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
            sum: vec![0.0; len],
            pushed: vec![false; workers],
            count: 0,
            version: 0,
            opt: ShardOptimizer::new(spec, len),
        }),
        version: watch::Sender::new(0),
        workers,
        mode: ctx.spec.training.mode,
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
        let Ok((tcp, from)) = listener.accept().await else { continue };
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
    let mut next = Some(first);
    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => match conn.recv().await {
                Ok(m) => m,
                Err(ConnError::Closed(_)) => return Ok(()),
                Err(e) => {
                    conn.refuse_for(&e).await;
                    return Err(e);
                }
            },
        };
        match msg {
            Message::Push { step, data } => {
                if let Err(why) = shard.push(rank, step, &data) {
                    conn.refuse(&why).await;
                    return Err(ConnError::Setup(why));
                }
            }
            Message::Pull { min_version } => {
                let mut rx = shard.version.subscribe();
                let current = *rx.borrow();
                if min_version > current + 1 {
                    let why = format!("pull for version {min_version}, but the shard is at {current}");
                    conn.refuse(&why).await;
                    return Err(ConnError::Setup(why));
                }
                // The sender lives as long as the shard, so this only ends on success.
                let _ = rx.wait_for(|v| *v >= min_version).await;
                let (version, data) = shard.snapshot();
                conn.send(&Message::Params { version, data }).await?;
            }
            other => {
                let why = format!("`{}` is not something a server accepts", other.name());
                conn.refuse(&why).await;
                return Err(ConnError::Setup(why));
            }
        }
    }
}
