//! The local KV endpoint: the user's own training program (`[worker]
//! command`) reaches the parameter servers through this agent, over a Unix
//! socket only the job user can open. The program never holds a
//! certificate, a key or a network socket of the job; the agent forwards
//! its pushes and pulls over the job's mutual-TLS connections.
//!
//! # Protocol (one request, one response, in order)
//!
//! ```text
//! request:  u32 LE n | n bytes of JSON header | header.nbytes bytes of payload
//! response: u32 LE n | n bytes of JSON header | header.nbytes bytes of payload
//! ```
//!
//! Request headers: `{"op": OP, "name": TENSOR, "dtype": "f32"|"f16"|"bf16", "nbytes": N}`
//! with OP one of `init`, `push`, `pull`, `pushpull`, `barrier`, `rank`,
//! `num_workers`, `tensors`, `report`. Responses: `{"ok": true, ...}` or
//! `{"ok": false, "error": "..."}`. Headers are at most 64 KiB; a payload is
//! at most the named tensor's size in the given dtype. A malformed frame
//! gets an error and the connection is closed; a refused operation gets an
//! error and the connection stays usable. Other connections are unaffected.
//! At most [`MAX_CONNECTIONS`] are served at once; one more is answered
//! with an error and closed.
//!
//! # Semantics (MXNet's `dist_sync` / `dist_async` kvstore)
//!
//! Every worker calls `init` for the tensors; worker 0's values are the
//! ones the servers start from (in a job with `[model] init` the servers
//! start from the verified signed weights, and `init` is answered with an
//! `ignored` note), and the first push or pull of every worker
//! waits at a barrier until they are in place. A step is a push of every
//! declared tensor (in any order); when the last one arrives the agent
//! sends the gradients to the servers, which aggregate all workers' pushes
//! (sync) or apply each on arrival (async) with the job's optimizer. A pull
//! returns the values after this worker's newest complete step (sync) or
//! the current values (async); pulling in the middle of a step is refused.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::conn::ClientConn;
use crate::control::Event;
use crate::identity::Role;
use crate::roles::{RoleCtx, RoleError, SchedLink};
use crate::spec::SyncMode;
use crate::wire::{Encoding, Message};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest request header.
pub const MAX_HEADER: usize = 64 << 10;

/// Why `init` changes nothing in a job with `[model] init`.
pub const INIT_IGNORED: &str =
    "init ignored: this job starts from the signed weights of [model] init, which the servers verified";

/// The socket's file name in the worker's job directory.
pub const SOCKET: &str = "kv.sock";

/// Connections served at once. A program needs one or a few; past this, a
/// new connection is told why and closed, so a runaway client loop cannot
/// take the agent's file descriptors and memory.
pub const MAX_CONNECTIONS: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    op: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    nbytes: usize,
    #[serde(default)]
    epoch: Option<u32>,
    #[serde(default)]
    train_loss: Option<f64>,
    #[serde(default)]
    test_loss: Option<f64>,
    #[serde(default)]
    test_accuracy: Option<f64>,
    #[serde(default)]
    samples: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn parse(s: Option<&str>) -> Result<Dtype, String> {
        match s.unwrap_or("f32") {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            other => Err(format!("dtype `{other}`: use f32, f16 or bf16")),
        }
    }
    fn size(self) -> usize {
        if self == Dtype::F32 { 4 } else { 2 }
    }
    fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            Dtype::F32 => warden_kernels::convert::copy_f32_le(out, bytes),
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Dtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }
    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Dtype::F32 => warden_kernels::convert::extend_f32_le(out, values),
            Dtype::F16 => warden_kernels::convert::extend_f16_le(out, values),
            Dtype::Bf16 => warden_kernels::convert::extend_bf16_le(out, values),
        }
    }
}

/// A tensor's place in the flat parameter vector.
struct Tensor {
    name: String,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// One server: its connection and the slice of the flat vector it holds.
struct Server {
    conn: ClientConn,
    range: Range<usize>,
}

/// What the agent keeps for the program.
pub struct Kv {
    rank: u32,
    workers: u32,
    mode: SyncMode,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
    servers: Vec<Server>,
    /// This step's gradients, and which tensors are in.
    grad: Vec<f32>,
    pushed: Vec<bool>,
    /// Complete steps this worker pushed.
    step: u64,
    /// Newest values pulled, and at which local step.
    params: Vec<f32>,
    fetched_at: Option<u64>,
    /// Worker 0's `init` values (zeros where none was given).
    init: Vec<f32>,
    inited: bool,
    /// The start barrier has been passed.
    started: bool,
    barrier: u64,
    last_report: Instant,
    steps_at_report: u64,
}

fn io(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Kv {
    /// Connected to every server of the job.
    pub fn new(ctx: &RoleCtx, servers: Vec<ClientConn>) -> Kv {
        let layout = crate::model::layout(&ctx.spec.model);
        let tensors: Vec<Tensor> =
            layout.into_iter().map(|(name, shape, range)| Tensor { name, shape, range }).collect();
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let n = crate::model::num_params(&ctx.spec.model);
        let servers = servers
            .into_iter()
            .zip(ctx.plan.of_role(Role::Server))
            .map(|(conn, p)| Server { conn, range: ctx.plan.shard(p.rank) })
            .collect();
        Kv {
            rank: ctx.me().rank,
            workers: ctx.plan.count(Role::Worker),
            mode: ctx.spec.training.mode,
            pushed: vec![false; tensors.len()],
            tensors,
            index,
            servers,
            grad: vec![0.0; n],
            step: 0,
            params: vec![0.0; n],
            fetched_at: None,
            init: vec![0.0; n],
            inited: false,
            started: false,
            barrier: 1 << 32,
            last_report: Instant::now(),
            steps_at_report: 0,
        }
    }

    fn tensor(&self, name: Option<&str>) -> Result<usize, String> {
        let name = name.ok_or("this operation needs `name`")?;
        self.index.get(name).copied().ok_or_else(|| {
            let known: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).take(8).collect();
            format!("no tensor `{name}` in [model.tensors] (declared: {})", known.join(", "))
        })
    }

    /// Before the first push or pull: worker 0's initial values go to the
    /// servers, then every worker meets at a barrier.
    async fn start(&mut self, sched: &mut SchedLink) -> Result<(), String> {
        if self.started {
            return Ok(());
        }
        if self.rank == 0 && self.inited {
            for s in &mut self.servers {
                let data = self.init[s.range.clone()].to_vec();
                s.conn.send(&Message::SetParams { data }).await.map_err(io)?;
            }
            for s in &mut self.servers {
                match s.conn.recv().await.map_err(io)? {
                    Message::Params { .. } => {}
                    m => return Err(format!("unexpected `{}` from a server after init", m.name())),
                }
            }
        }
        self.barrier(sched).await?;
        self.started = true;
        Ok(())
    }

    async fn barrier(&mut self, sched: &mut SchedLink) -> Result<(), String> {
        self.barrier += 1;
        let id = self.barrier;
        sched.send(&Message::Barrier { id }).await.map_err(|e| e.message)?;
        match sched.recv().await.map_err(|e| e.message)? {
            Message::BarrierDone { id: done } if done == id => Ok(()),
            Message::Abort { reason } => Err(format!("the job was aborted: {reason}")),
            m => Err(format!("unexpected `{}` from the scheduler at a barrier", m.name())),
        }
    }

    /// The tensors not yet pushed in this step.
    fn missing(&self) -> String {
        let names: Vec<&str> =
            self.tensors.iter().zip(&self.pushed).filter(|(_, p)| !**p).map(|(t, _)| t.name.as_str()).collect();
        names.join(", ")
    }

    /// Takes this step's gradient of tensor `i` straight from the request bytes.
    async fn push(&mut self, i: usize, dtype: Dtype, payload: &[u8]) -> Result<(), String> {
        if self.pushed[i] {
            return Err(format!(
                "`{}` was already pushed in this step; a step pushes every tensor once (still missing: {})",
                self.tensors[i].name,
                self.missing()
            ));
        }
        dtype.decode(payload, &mut self.grad[self.tensors[i].range.clone()]);
        self.pushed[i] = true;
        if self.pushed.iter().all(|p| *p) {
            let mut frame = Vec::new();
            for s in &mut self.servers {
                frame.clear();
                crate::wire::encode_push(
                    self.step,
                    &self.grad[s.range.clone()],
                    Encoding::F32,
                    0.0,
                    &mut [],
                    &mut frame,
                );
                s.conn.send_frame(&frame).await.map_err(io)?;
            }
            self.pushed.fill(false);
            self.step += 1;
        }
        Ok(())
    }

    async fn pull(&mut self, i: usize) -> Result<&[f32], String> {
        if self.pushed.iter().any(|p| *p) {
            return Err(format!(
                "pull of `{}` in the middle of a step: push every tensor first (still missing: {})",
                self.tensors[i].name,
                self.missing()
            ));
        }
        // Async values move with every worker's push: always ask.
        if self.fetched_at != Some(self.step) || self.mode == SyncMode::Async {
            let min_version = if self.mode == SyncMode::Sync { self.step } else { 0 };
            for s in &mut self.servers {
                s.conn.send(&Message::Pull { min_version }).await.map_err(io)?;
            }
            for s in &mut self.servers {
                // Straight from the frame into the values: no decoded copy.
                let body = s.conn.recv_raw().await.map_err(io)?;
                let (_, values) = crate::wire::vector_view(body, crate::wire::TAG_PARAMS)
                    .map_err(|e| format!("from a server: {e}"))?;
                if values.len() != s.range.len() * 4 {
                    return Err(format!("a server sent {} values for a shard of {}", values.len() / 4, s.range.len()));
                }
                warden_kernels::convert::copy_f32_le(&mut self.params[s.range.clone()], values);
            }
            self.fetched_at = Some(self.step);
        }
        Ok(&self.params[self.tensors[i].range.clone()])
    }

    /// The final values (after every complete step), for the model file.
    pub async fn final_params(&mut self) -> Result<Vec<f32>, String> {
        if self.tensors.is_empty() {
            return Ok(Vec::new());
        }
        self.pushed.fill(false);
        self.pull(0).await?;
        Ok(self.params.clone())
    }

    /// Closes the server connections cleanly at the end.
    pub async fn close(&mut self) {
        for s in self.servers.drain(..) {
            s.conn.close().await;
        }
    }

    /// Serves one request; `Err` means the connection must close.
    async fn handle(
        &mut self,
        req: Request,
        payload: &[u8],
        ctx: &RoleCtx,
        sched: &mut SchedLink,
        out: &mut Vec<u8>,
    ) -> Result<serde_json::Value, String> {
        use serde_json::json;
        let dtype = Dtype::parse(req.dtype.as_deref())?;
        match req.op.as_str() {
            "rank" => Ok(json!({"ok": true, "rank": self.rank})),
            "num_workers" => Ok(json!({"ok": true, "num_workers": self.workers})),
            "tensors" => Ok(json!({
                "ok": true,
                "tensors": self.tensors.iter().map(|t| json!({"name": t.name, "shape": t.shape})).collect::<Vec<_>>(),
            })),
            "init" => {
                let i = self.tensor(req.name.as_deref())?;
                if self.started {
                    return Err("init after the first push or pull; initialise every tensor first".into());
                }
                if ctx.spec.init.is_some() {
                    // The servers start from the verified weights, which no worker may replace.
                    return Ok(json!({"ok": true, "ignored": INIT_IGNORED}));
                }
                let range = self.tensors[i].range.clone();
                dtype.decode(payload, &mut self.init[range]);
                self.inited = true;
                Ok(json!({"ok": true}))
            }
            "push" | "pushpull" => {
                let i = self.tensor(req.name.as_deref())?;
                self.start(sched).await?;
                self.push(i, dtype, payload).await?;
                if req.op == "push" {
                    return Ok(json!({"ok": true, "step": self.step}));
                }
                let v = self.pull(i).await?;
                dtype.encode(v, out);
                Ok(json!({"ok": true, "step": self.step, "nbytes": out.len()}))
            }
            "pull" => {
                let i = self.tensor(req.name.as_deref())?;
                self.start(sched).await?;
                let v = self.pull(i).await?;
                dtype.encode(v, out);
                Ok(json!({"ok": true, "step": self.step, "nbytes": out.len()}))
            }
            "barrier" => {
                self.start(sched).await?;
                self.barrier(sched).await?;
                Ok(json!({"ok": true}))
            }
            "report" => {
                let epoch = req.epoch.ok_or("report needs `epoch`")?;
                let train_loss = req.train_loss.ok_or("report needs `train_loss`")?;
                let secs = self.last_report.elapsed().as_secs_f64().max(1e-9);
                let steps = self.step - self.steps_at_report;
                ctx.emit(Event::Epoch {
                    epoch,
                    train_loss,
                    steps,
                    samples_per_s: req.samples.unwrap_or(0) as f64 / secs,
                    bytes_pushed: 0,
                    bytes_pulled: 0,
                });
                if let (Some(test_loss), Some(test_accuracy)) = (req.test_loss, req.test_accuracy) {
                    ctx.emit(Event::Eval { epoch, test_loss, test_accuracy });
                }
                self.last_report = Instant::now();
                self.steps_at_report = self.step;
                Ok(json!({"ok": true}))
            }
            other => Err(format!("unknown op `{other}`")),
        }
    }

    /// The most payload bytes an op on tensor `name` may carry.
    fn max_payload(&self, req: &Request) -> usize {
        let per = Dtype::parse(req.dtype.as_deref()).map_or(4, Dtype::size);
        req.name.as_deref().and_then(|n| self.index.get(n)).map_or(0, |i| self.tensors[*i].range.len() * per)
    }
}

/// Serves one connection of the program until it closes. Framing errors
/// close it (with a reason); refused operations do not.
pub async fn serve_conn(
    mut s: UnixStream,
    kv: &tokio::sync::Mutex<Kv>,
    ctx: &RoleCtx,
    sched: &tokio::sync::Mutex<SchedLink>,
) -> Result<(), String> {
    let me = nix::unistd::Uid::current().as_raw();
    let peer = s.peer_cred().map_err(io)?;
    if peer.uid() != me {
        let _ = reply(&mut s, &serde_json::json!({"ok": false, "error": "only the job user may use this socket"}), &[])
            .await;
        return Err(format!("refused a KV connection from uid {} (the job's uid is {me})", peer.uid()));
    }
    let mut payload = Vec::new();
    let mut out = Vec::new();
    loop {
        let n = match s.read_u32_le().await {
            Ok(n) => n as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        if n > MAX_HEADER {
            let why = format!("header of {n} bytes; at most {MAX_HEADER}");
            let _ = reply(&mut s, &serde_json::json!({"ok": false, "error": why}), &[]).await;
            return Err(why);
        }
        let mut header = vec![0u8; n];
        s.read_exact(&mut header).await.map_err(io)?;
        let req: Request = match serde_json::from_slice(&header) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("malformed request header: {e}");
                let _ = reply(&mut s, &serde_json::json!({"ok": false, "error": why}), &[]).await;
                return Err(why);
            }
        };
        // Not held while the payload arrives: a client that stalls
        // mid-request must not hold up the program's other connections.
        let max = kv.lock().await.max_payload(&req);
        if req.nbytes > max {
            let why = format!(
                "payload of {} bytes for `{}`, but it holds at most {max}",
                req.nbytes,
                req.name.as_deref().unwrap_or("?")
            );
            let _ = reply(&mut s, &serde_json::json!({"ok": false, "error": why}), &[]).await;
            return Err(why);
        }
        payload.resize(req.nbytes, 0);
        s.read_exact(&mut payload).await.map_err(io)?;
        let expected = if matches!(req.op.as_str(), "init" | "push" | "pushpull") { max } else { 0 };
        out.clear();
        let mut kv = kv.lock().await;
        let mut sched = sched.lock().await;
        let answer = if req.nbytes != expected {
            Err(format!("`{}` needs {expected} payload bytes, got {}", req.op, req.nbytes))
        } else {
            kv.handle(req, &payload, ctx, &mut sched, &mut out).await
        };
        drop((sched, kv));
        match answer {
            Ok(h) => reply(&mut s, &h, &out).await.map_err(io)?,
            Err(why) => reply(&mut s, &serde_json::json!({"ok": false, "error": why}), &[]).await.map_err(io)?,
        }
    }
}

async fn reply(s: &mut UnixStream, header: &serde_json::Value, payload: &[u8]) -> std::io::Result<()> {
    let h = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    let mut head = Vec::with_capacity(4 + h.len());
    head.extend_from_slice(&(h.len() as u32).to_le_bytes());
    head.extend_from_slice(&h);
    s.write_all(&head).await?;
    // The tensor bytes go as they are: no copy into one buffer.
    s.write_all(payload).await
}

/// Binds the socket in `dir` (mode 0600; the directory is the job user's, 0700).
pub fn bind(dir: &Path) -> Result<std::os::unix::net::UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let l =
        std::os::unix::net::UnixListener::bind(&path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    l.set_nonblocking(true).map_err(io)?;
    Ok(l)
}

/// Kills the program if the agent stops first (a stop from the launcher, a
/// failed job); disarmed once the program has exited.
struct ChildGuard {
    pid: i32,
    exited: Arc<AtomicBool>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.exited.load(Ordering::SeqCst) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs an external worker: serves the program's KV socket until the
/// program exits; its exit status is the worker's result. Worker 0 then
/// writes the final values as the job's model.
pub async fn run(
    ctx: RoleCtx,
    listener: std::os::unix::net::UnixListener,
    mut child: std::process::Child,
) -> Result<(), RoleError> {
    let exited = Arc::new(AtomicBool::new(false));
    let _guard = ChildGuard { pid: child.id() as i32, exited: exited.clone() };
    let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel();
    {
        let exited = exited.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            exited.store(true, Ordering::SeqCst);
            let _ = exit_tx.send(status);
        });
    }
    let mut sched = ctx.scheduler_link().await?;
    crate::roles::await_start(&mut sched, false).await?;
    ctx.emit(Event::Started);
    let conns = ctx.connect_servers().await?.into_iter().map(|(conn, _)| conn).collect();
    let ctx = Arc::new(ctx);
    let kv = Arc::new(tokio::sync::Mutex::new(Kv::new(&ctx, conns)));
    let sched = Arc::new(tokio::sync::Mutex::new(sched));
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| RoleError::new(e.to_string()))?;
    let mut tasks = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let status = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let mut s = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of descriptors, say: the program's open
                        // connections go on; try again shortly.
                        tracing::warn!("KV socket: cannot accept a connection: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!("refused a KV connection: {MAX_CONNECTIONS} are open already");
                    tasks.spawn(async move {
                        let why = format!("too many connections to the KV socket (at most {MAX_CONNECTIONS} at once); close one first");
                        let header = serde_json::json!({"ok": false, "error": why});
                        let answer = reply(&mut s, &header, &[]);
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), answer).await;
                    });
                    continue;
                };
                let (kv, ctx, sched) = (kv.clone(), ctx.clone(), sched.clone());
                tasks.spawn(async move {
                    if let Err(e) = serve_conn(s, &kv, &ctx, &sched).await {
                        tracing::warn!("KV connection closed: {e}");
                    }
                    drop(slot);
                });
            }
            // Finished connections are reaped as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            status = &mut exit_rx => {
                break status.map_err(|_| RoleError::new("lost the program's exit status"))?
                    .map_err(|e| RoleError::new(format!("waiting for the program: {e}")))?;
            }
        }
    };
    tasks.abort_all();
    let command = ctx.spec.worker.as_ref().map(|w| w.command.join(" ")).unwrap_or_default();
    if !status.success() {
        return Err(RoleError::new(format!("the program `{command}` ended with {status}; its output is in this log")));
    }
    tracing::info!("the program `{command}` finished");
    if ctx.me().rank == 0 {
        let params = kv.lock().await.final_params().await.map_err(RoleError::new)?;
        let dir = ctx.workdir.join("model");
        crate::artifact::write_model(&dir, &ctx.spec.model, &params, ctx.seed)
            .map_err(|e| RoleError::new(format!("cannot write the model: {e}")))?;
        ctx.emit(Event::Model { path: dir });
    }
    kv.lock().await.close().await;
    let mut sched = sched.lock().await;
    sched.send(&Message::Finished).await?;
    match sched.recv_or_closed().await? {
        Some(Message::Shutdown) | None => Ok(()),
        Some(Message::Abort { reason }) => Err(RoleError::aborted(&reason)),
        Some(m) => Err(RoleError::new(format!("unexpected `{}` from the scheduler at the end", m.name()))),
    }
}

/// What a `[worker] command` inherits of the agent's environment.
pub const PROGRAM_ENV: &[&str] = &["PATH", "LANG", "TZ"];

/// Starts the `[worker] command` as the job user (the caller has dropped
/// privileges already; the seccomp filter comes after, so the program is
/// not bound by the agent's filter but has no capabilities and
/// no_new_privs). Its stdout and stderr go to the agent's log.
///
/// Its environment is [`PROGRAM_ENV`] as the agent has it, then `[worker]
/// env`, then the `WARDEN_*` variables below: nothing else of the agent's
/// or the launcher's (no passphrase variable, no token of a user's shell).
pub fn spawn_program(
    spec: &crate::spec::JobSpec,
    rank: u32,
    workers: u32,
    workdir: &Path,
    seed: u64,
) -> Result<std::process::Child, String> {
    use std::os::fd::AsFd;
    let w = spec.worker.as_ref().ok_or("no [worker] command")?;
    let log = std::io::stderr().as_fd().try_clone_to_owned().map_err(io)?;
    std::process::Command::new(&w.command[0])
        .args(&w.command[1..])
        .current_dir(&w.workdir)
        .env_clear()
        .envs(PROGRAM_ENV.iter().filter_map(|k| std::env::var_os(k).map(|v| (k, v))))
        .envs(&w.env)
        .env("WARDEN_RANK", rank.to_string())
        .env("WARDEN_NUM_WORKERS", workers.to_string())
        .env("WARDEN_KV", workdir.join(SOCKET))
        .env("WARDEN_RUN_DIR", workdir)
        .env("WARDEN_EPOCHS", spec.training.epochs.to_string())
        .env("WARDEN_BATCH_SIZE", spec.training.batch_size.to_string())
        .env("WARDEN_SEED", seed.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(log))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start [worker] command `{}` in {}: {e}", w.command.join(" "), w.workdir.display()))
}
