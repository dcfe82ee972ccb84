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
//! with OP one of `hello`, `share`, `init`, `push`, `pull`, `pushpull`, `barrier`,
//! `rank`, `num_workers`, `tensors`, `report`. `dtype` is the payload's (a
//! pull's answer is in the dtype asked for; a pushpull's answer is f32).
//! Responses: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
//!
//! # Direct copies
//!
//! Tensors need not travel through the socket. The program's own process
//! (the one the agent started, not a child of it) may name an address in its
//! memory instead: `"from": ADDR` in place of a payload (N bytes are read
//! there), `"into": ADDR, "into_nbytes": M` for an answer (written there
//! when it is exactly M bytes of f32; otherwise it comes on the socket as
//! usual, and `"written"` in the answer says which). The kernel copies
//! (`process_vm_readv`/`process_vm_writev`): one copy each way, no trip
//! through socket buffers. The kernel checks that the agent may trace
//! the program, and the agent's seccomp filter allows the two calls only on
//! that one process. `{"op": "hello", "probe": ADDR}` (8 readable bytes at
//! ADDR) answers `"direct": true` when such copies work on this connection.
//!
//! # Shared memory
//!
//! `{"op": "share"}` gives the connection a file descriptor (with the
//! answer, `SCM_RIGHTS`) of a sealed memfd holding two regions of the flat
//! vector: the gradient at offset 0 and the parameters at `params_offset`
//! bytes; the answer lists each tensor's `offset` (in values) and shape. A
//! program that maps it and computes its gradient in the gradient region
//! pushes with `"shared": true` and no payload: the agent seals the step
//! straight from that memory, as the built-in worker does from its own
//! gradient, and opens the servers' answers in a buffer of its own (never
//! in memory the program can write), each record's values then copied into
//! the parameter region while in cache. Once shared, every push lands
//! in the gradient region (a push with a payload or `from` is copied there)
//! and the push that completes a step returns when its answer is in the
//! parameter region; a pull with `"into_shared": true` is answered at once,
//! others get copies from that region. Every connection of the job user's
//! may ask (a child of the program too); all get the same memory. See
//! [`crate::train::shared`] for what the program can and cannot do to it.
//!
//! Headers are at most 64 KiB; a payload is at most the named tensor's size
//! in the given dtype. A malformed frame
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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::job::spec::SyncMode;
use crate::net::conn::{ClientConn, ConnError};
use crate::net::control::Event;
use crate::net::identity::Role;
use crate::net::wire::{Encoding, Message};
use crate::train::roles::link::{self, Gradient, Link, Traffic};
use crate::train::roles::{RoleCtx, RoleError, SchedLink};
use crate::train::shared::Shared;

/// Pushes of a program of the user's travel as f32 (it chose the precision
/// of what it hands over).
const F32: crate::job::spec::Compression = crate::job::spec::Compression { encoding: Encoding::F32, threshold: 0.5 };
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

/// Why a request was refused or a connection of the program closed; the
/// program is told this text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// A dtype other than f32, f16 and bf16.
    #[error("dtype `{0}`: use f32, f16 or bf16")]
    Dtype(String),
    /// An operation on a tensor without its name.
    #[error("this operation needs `name`")]
    NoName,
    /// A tensor the model does not declare.
    #[error("no tensor `{name}` in [model.tensors] (declared: {declared})")]
    NoTensor {
        /// The name given.
        name: String,
        /// The first few declared names.
        declared: String,
    },
    /// An operation this endpoint does not have.
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    /// A `report` without one of its fields.
    #[error("report needs `{0}`")]
    ReportNeeds(&'static str),
    /// `init` once training has begun.
    #[error("init after the first push or pull; initialise every tensor first")]
    InitAfterStart,
    /// A tensor pushed twice in one step.
    #[error("`{name}` was already pushed in this step; a step pushes every tensor once (still missing: {missing})")]
    PushedTwice {
        /// The tensor.
        name: String,
        /// The tensors the step still lacks.
        missing: String,
    },
    /// A pull while a step is half pushed.
    #[error("pull of `{name}` in the middle of a step: push every tensor first (still missing: {missing})")]
    PullMidStep {
        /// The tensor.
        name: String,
        /// The tensors the step still lacks.
        missing: String,
    },
    /// A payload of another size than the operation needs.
    #[error("`{op}` needs {expected} payload bytes, got {got}")]
    PayloadSize {
        /// The operation.
        op: String,
        /// Bytes it needs.
        expected: usize,
        /// Bytes announced.
        got: usize,
    },
    /// A connection to a server failed.
    #[error(transparent)]
    Server(#[from] ConnError),
    /// A server link failed, or a server sent what it should not.
    #[error(transparent)]
    ServerLink(RoleError),
    /// The link to the scheduler failed.
    #[error(transparent)]
    Scheduler(#[from] RoleError),
    /// The scheduler aborted the job.
    #[error("the job was aborted: {0}")]
    Aborted(String),
    /// The scheduler answered a barrier with something else.
    #[error("unexpected `{0}` from the scheduler at a barrier")]
    AtBarrier(&'static str),
    /// Reading or writing the program's connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A connection from a uid other than the job's.
    #[error("refused a KV connection from uid {uid} (the job's uid is {job_uid})")]
    ForeignUid {
        /// The peer's uid.
        uid: u32,
        /// The job's.
        job_uid: u32,
    },
    /// A request header above [`MAX_HEADER`].
    #[error("header of {0} bytes; at most {MAX_HEADER}")]
    HeaderTooLong(usize),
    /// A direct copy from a process other than the program itself.
    #[error(
        "direct copies (`from`/`into`) are only for the program the agent started (pid {program}), \
         not pid {peer}: start the program as the [worker] command itself (or `exec` it from a wrapper \
         script), or send the payload on the socket"
    )]
    NotDirect {
        /// The program's pid.
        program: u32,
        /// The connecting process's, if known.
        peer: String,
    },
    /// A direct copy the kernel refused or cut short.
    #[error("cannot {what} {len} bytes at {addr:#x} of the program's memory: {why}")]
    ProgramMemory {
        /// "read" or "write".
        what: &'static str,
        /// Bytes to copy.
        len: usize,
        /// Where.
        addr: u64,
        /// The kernel's answer.
        why: String,
    },
    /// `shared`/`into_shared` before `share`.
    #[error("`{0}` names the shared memory, which this job's agent has not shared yet: call `share` first")]
    NotShared(&'static str),
    /// `share` while a step is half pushed.
    #[error("share between steps, not in the middle of one (still missing: {0})")]
    ShareMidStep(String),
    /// The shared memory could not be made.
    #[error("cannot make the memory to share with the program: {0}")]
    Share(std::io::Error),
    /// A 16-bit answer into the shared (f32) parameters.
    #[error("the shared parameters are float32: pull with dtype f32 into them")]
    SharedDtype,
    /// A request header that is not a request.
    #[error("malformed request header: {0}")]
    BadHeader(#[source] serde_json::Error),
    /// A payload larger than the tensor named.
    #[error("payload of {nbytes} bytes for `{name}`, but it holds at most {max}")]
    PayloadTooLarge {
        /// Bytes announced.
        nbytes: usize,
        /// The tensor.
        name: String,
        /// Most bytes it holds.
        max: usize,
    },
}

/// Why the KV socket or the program could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProgramError {
    /// The socket could not be bound.
    #[error("cannot bind {}: {source}", path.display())]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket's mode could not be set.
    #[error("cannot restrict {}: {source}", path.display())]
    Restrict {
        /// The socket's path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The job has no `[worker] command`.
    #[error("no [worker] command")]
    NoCommand,
    /// The program could not be started.
    #[error("cannot start [worker] command `{command}` in {}: {source}", dir.display())]
    Spawn {
        /// The command line.
        command: String,
        /// Its working directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another system call failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

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
    /// The payload is in the program's memory at this address.
    #[serde(default)]
    from: Option<u64>,
    /// The answer goes into the program's memory at this address...
    #[serde(default)]
    into: Option<u64>,
    /// ...which has room for this many bytes.
    #[serde(default)]
    into_nbytes: usize,
    /// `hello`: 8 readable bytes of the program's, to try a direct copy.
    #[serde(default)]
    probe: Option<u64>,
    /// A push whose gradient is in the shared memory already.
    #[serde(default)]
    shared: bool,
    /// An answer to leave in the shared memory's parameters.
    #[serde(default)]
    into_shared: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn parse(s: Option<&str>) -> Result<Dtype, KvError> {
        match s.unwrap_or("f32") {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            other => Err(KvError::Dtype(other.to_string())),
        }
    }
    fn size(self) -> usize {
        if self == Dtype::F32 { 4 } else { 2 }
    }
    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Dtype::F32 => warden_kernels::convert::extend_f32_le(out, values),
            Dtype::F16 => warden_kernels::convert::extend_f16_le(out, values),
            Dtype::Bf16 => warden_kernels::convert::extend_bf16_le(out, values),
        }
    }
}

/// Where a request's tensor bytes are.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// After the header, on the socket.
    Socket(&'a [u8]),
    /// In the program's memory (`from`).
    Program { pid: nix::unistd::Pid, addr: u64, len: usize },
}

impl Source<'_> {
    /// The values, as the wire's f32 (little-endian, as the program's own
    /// floats are on the targets warden builds for), into `pieces`: each
    /// the offset of its first value in the tensor and the bytes to fill;
    /// together they cover the tensor (whose length the caller checked
    /// against the payload's). `scratch` holds 16-bit values on the way.
    fn fill(self, dtype: Dtype, pieces: Vec<(usize, &mut [u8])>, scratch: &mut Vec<u8>) -> Result<(), KvError> {
        let bytes: &[u8] = match self {
            Source::Program { pid, addr, .. } if dtype == Dtype::F32 => {
                let remote = pieces.into_iter().map(|(at, b)| (addr.saturating_add(at as u64 * 4), b)).collect();
                return read_pieces(pid, remote);
            }
            Source::Program { pid, addr, len } => {
                scratch.resize(len, 0);
                read_program(pid, addr, scratch)?;
                scratch
            }
            Source::Socket(bytes) => bytes,
        };
        let size = dtype.size();
        for (at, piece) in pieces {
            let from = &bytes[at * size..at * size + piece.len() / 4 * size];
            match dtype {
                Dtype::F32 => piece.copy_from_slice(from),
                Dtype::F16 | Dtype::Bf16 => {
                    for (out, c) in piece.chunks_exact_mut(4).zip(from.chunks_exact(2)) {
                        let v = match dtype {
                            Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                            _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                        };
                        out.copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where an answer's tensor bytes go: after its header on the socket
/// (`out`), or into the program's memory (`into`).
struct Sink<'a> {
    out: &'a mut Vec<u8>,
    program: Option<(nix::unistd::Pid, u64, usize)>,
    /// The program reads the answer from the shared parameters.
    shared: bool,
}

/// Copies of at least this many bytes are split between two threads: the
/// program waits for them, and so, at that point of a step, do the servers.
const SPLIT_COPY: usize = 1 << 20;

/// The most bytes one `process_vm_*` call is asked to copy: the kernel
/// copies at most about 2 GiB a call (MAX_RW_COUNT) and reports the rest as
/// a short count.
const MAX_COPY: usize = 1 << 30;

/// The most buffers one `process_vm_*` call takes (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

/// The agent's side of a direct copy: a buffer read into or written from.
trait Piece: Sized + Send {
    fn len(&self) -> usize;
    fn split_at(self, at: usize) -> (Self, Self);
}

impl Piece for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split_at(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

impl Piece for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split_at(self, at: usize) -> (Self, Self) {
        <[u8]>::split_at(self, at)
    }
}

/// Copies `buf.len()` bytes at `addr` of process `pid` into `buf`.
fn read_program(pid: nix::unistd::Pid, addr: u64, buf: &mut [u8]) -> Result<(), KvError> {
    read_pieces(pid, vec![(addr, buf)])
}

/// Copies into each buffer of `pieces` the bytes at its address of process `pid`.
fn read_pieces(pid: nix::unistd::Pid, pieces: Vec<(u64, &mut [u8])>) -> Result<(), KvError> {
    copy_pieces(pieces, |batch: Vec<(u64, &mut [u8])>| {
        let (first, len) = (batch[0].0, batch.iter().map(|(_, b)| b.len()).sum());
        let remote: Vec<_> =
            batch.iter().map(|(a, b)| nix::sys::uio::RemoteIoVec { base: *a as usize, len: b.len() }).collect();
        let mut local: Vec<_> = batch.into_iter().map(|(_, b)| std::io::IoSliceMut::new(b)).collect();
        copied("read", first, len, nix::sys::uio::process_vm_readv(pid, &mut local, &remote))
    })
}

/// Copies each buffer of `pieces` to its address of process `pid`.
fn write_pieces(pid: nix::unistd::Pid, pieces: Vec<(u64, &[u8])>) -> Result<(), KvError> {
    copy_pieces(pieces, |batch: Vec<(u64, &[u8])>| {
        let (first, len) = (batch[0].0, batch.iter().map(|(_, b)| b.len()).sum());
        let remote: Vec<_> =
            batch.iter().map(|(a, b)| nix::sys::uio::RemoteIoVec { base: *a as usize, len: b.len() }).collect();
        let local: Vec<_> = batch.into_iter().map(|(_, b)| std::io::IoSlice::new(b)).collect();
        copied("write", first, len, nix::sys::uio::process_vm_writev(pid, &local, &remote))
    })
}

/// Runs `call` over `pieces` (each an address in the program and the
/// agent's buffer for it) in batches of at most [`IOV_MAX`] buffers and
/// [`MAX_COPY`] bytes; large copies in two halves at once.
fn copy_pieces<P: Piece>(
    mut pieces: Vec<(u64, P)>,
    call: impl Fn(Vec<(u64, P)>) -> Result<(), KvError> + Sync,
) -> Result<(), KvError> {
    let total: usize = pieces.iter().map(|(_, b)| b.len()).sum();
    if total < SPLIT_COPY {
        return in_batches(pieces, &call);
    }
    if pieces.len() == 1 {
        let (addr, buf) = pieces.remove(0);
        let half = buf.len() / 2;
        let (a, b) = buf.split_at(half);
        // A hostile address wraps nowhere: the kernel refuses the saturated one.
        pieces = vec![(addr, a), (addr.saturating_add(half as u64), b)];
    }
    let mut seen = 0;
    let cut = pieces.iter().position(|(_, b)| {
        seen += b.len();
        seen >= total / 2
    });
    let second = pieces.split_off(cut.map_or(1, |c| c + 1).clamp(1, pieces.len() - 1));
    std::thread::scope(|s| {
        let other = std::thread::Builder::new().spawn_scoped(s, || in_batches(second, &call))?;
        let mine = in_batches(pieces, &call);
        let theirs = other.join().unwrap_or_else(|_| Err(std::io::Error::other("a copying thread panicked").into()));
        mine.and(theirs)
    })
}

/// One thread's part of [`copy_pieces`].
fn in_batches<P: Piece>(
    pieces: Vec<(u64, P)>,
    call: &impl Fn(Vec<(u64, P)>) -> Result<(), KvError>,
) -> Result<(), KvError> {
    let mut small = Vec::with_capacity(pieces.len());
    for (mut addr, mut buf) in pieces {
        while buf.len() > MAX_COPY {
            let (part, rest) = buf.split_at(MAX_COPY);
            small.push((addr, part));
            (addr, buf) = (addr.saturating_add(MAX_COPY as u64), rest);
        }
        small.push((addr, buf));
    }
    let mut pieces = small.into_iter().peekable();
    while pieces.peek().is_some() {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some((_, b)) = pieces.peek() {
            if batch.len() == IOV_MAX || (!batch.is_empty() && bytes + b.len() > MAX_COPY) {
                break;
            }
            bytes += b.len();
            batch.extend(pieces.next());
        }
        call(batch)?;
    }
    Ok(())
}

/// A direct copy's result: all `len` bytes, or why not.
fn copied(what: &'static str, addr: u64, len: usize, done: nix::Result<usize>) -> Result<(), KvError> {
    match done {
        Ok(n) if n == len => Ok(()),
        Ok(n) => Err(KvError::ProgramMemory { what, len, addr, why: format!("only {n} bytes are mapped there") }),
        Err(e) => Err(KvError::ProgramMemory { what, len, addr, why: e.desc().to_string() }),
    }
}

/// A tensor's place in the flat parameter vector.
struct Tensor {
    name: String,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// What the agent keeps for the program.
pub struct Kv {
    rank: u32,
    workers: u32,
    mode: SyncMode,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
    /// One per server, as the built-in worker has: a step's chunks go out
    /// and come back at once.
    links: Vec<Link>,
    /// Which tensors this step has (their values are in the links' staged
    /// frames).
    pushed: Vec<bool>,
    /// Complete steps this worker pushed.
    step: u64,
    /// Newest values pulled, and at which local step (in `sharing`'s
    /// parameters instead once there is one: [`Kv::params`]).
    params: Vec<f32>,
    /// The memory shared with the program, once it asked for it.
    sharing: Option<Shared>,
    /// The newest values came with this worker's own step, not yet pulled
    /// (an async pull right after takes them rather than asking again).
    fresh: bool,
    /// The newest values are the answers the links keep
    /// ([`link::finish_step_kept`]), not yet copied into `params`.
    kept: bool,
    fetched_at: Option<u64>,
    /// Worker 0's `init` values (zeros where none was given).
    init: Vec<f32>,
    /// 16-bit tensors copied from the program, before conversion.
    scratch: Vec<u8>,
    /// Why a server link broke because another process stopped or failed,
    /// as the program was told: its failure follows from that one.
    lost: Option<String>,
    inited: bool,
    /// The start barrier has been passed.
    started: bool,
    barrier: u64,
    last_report: Instant,
    steps_at_report: u64,
    /// Bytes sent to and received from the servers, and at the last report.
    traffic: Traffic,
    traffic_at_report: Traffic,
}

impl Kv {
    /// Connected to every server of the job.
    pub fn new(ctx: &RoleCtx, servers: Vec<ClientConn>) -> Kv {
        let layout = crate::train::model::layout(&ctx.spec.model);
        let tensors: Vec<Tensor> =
            layout.into_iter().map(|(name, shape, range)| Tensor { name, shape, range }).collect();
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let n = crate::train::model::num_params(&ctx.spec.model);
        let chunk = ctx.spec.training.chunk_floats();
        let links = servers
            .into_iter()
            .zip(ctx.plan.of_role(Role::Server))
            .map(|(conn, p)| Link::spawn(conn, ctx.plan.shard(p.rank), chunk))
            .collect();
        Kv {
            rank: ctx.me().rank,
            workers: ctx.plan.count(Role::Worker),
            mode: ctx.spec.training.mode,
            pushed: vec![false; tensors.len()],
            tensors,
            index,
            links,
            step: 0,
            params: vec![0.0; n],
            sharing: None,
            fresh: false,
            kept: false,
            fetched_at: None,
            init: vec![0.0; n],
            scratch: Vec::new(),
            lost: None,
            inited: false,
            started: false,
            barrier: 1 << 32,
            last_report: Instant::now(),
            steps_at_report: 0,
            traffic: Traffic::default(),
            traffic_at_report: Traffic::default(),
        }
    }

    fn tensor(&self, name: Option<&str>) -> Result<usize, KvError> {
        let name = name.ok_or(KvError::NoName)?;
        self.index.get(name).copied().ok_or_else(|| {
            let known: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).take(8).collect();
            KvError::NoTensor { name: name.to_string(), declared: known.join(", ") }
        })
    }

    /// Before the first push or pull: worker 0's initial values go to the
    /// servers, then every worker meets at a barrier.
    async fn start(&mut self, sched: &mut SchedLink) -> Result<(), KvError> {
        if self.started {
            return Ok(());
        }
        if self.rank == 0 && self.inited {
            for link in &mut self.links {
                link.set_params(&self.init).await.map_err(KvError::ServerLink)?;
            }
        }
        self.barrier(sched).await?;
        // Where the servers are (a resumed job's are past step 0): the
        // links learn the version their first push is for.
        let params = params_mut(&mut self.sharing, &mut self.params);
        link::exchange(&mut self.links, params, None, self.mode, F32, &mut self.traffic)
            .await
            .map_err(KvError::ServerLink)?;
        self.fetched_at = Some(self.step);
        self.started = true;
        Ok(())
    }

    async fn barrier(&mut self, sched: &mut SchedLink) -> Result<(), KvError> {
        self.barrier += 1;
        let id = self.barrier;
        sched.send(&Message::Barrier { id }).await?;
        match sched.recv().await? {
            Message::BarrierDone { id: done } if done == id => Ok(()),
            Message::Abort { reason } => Err(KvError::Aborted(reason)),
            m => Err(KvError::AtBarrier(m.name())),
        }
    }

    /// The tensors not yet pushed in this step.
    fn missing(&self) -> String {
        let names: Vec<&str> =
            self.tensors.iter().zip(&self.pushed).filter(|(_, p)| !**p).map(|(t, _)| t.name.as_str()).collect();
        names.join(", ")
    }

    /// Takes this step's gradient of tensor `i` straight from the request
    /// bytes (or the program's memory).
    async fn push(&mut self, i: usize, dtype: Dtype, payload: Source<'_>, shared: bool) -> Result<(), KvError> {
        if self.pushed[i] {
            return Err(KvError::PushedTwice { name: self.tensors[i].name.clone(), missing: self.missing() });
        }
        if self.sharing.is_some() {
            return self.push_shared(i, dtype, payload, shared).await;
        }
        if shared {
            return Err(KvError::NotShared("shared"));
        }
        // The values go straight into the frames the links send (the copy
        // the built-in worker makes from its gradient). Those of a step the
        // program never pulled come back with its answer: collect it first.
        self.collect().await?;
        let range = self.tensors[i].range.clone();
        let mut pieces = Vec::new();
        for l in &mut self.links {
            pieces.extend(l.staged_pieces(range.clone()).ok_or_else(|| {
                KvError::ServerLink(RoleError::new("a server link still holds the previous step's frames"))
            })?);
        }
        // A failed copy leaves the tensor not pushed: the next push
        // overwrites whatever part arrived.
        payload.fill(dtype, pieces, &mut self.scratch)?;
        self.pushed[i] = true;
        if self.pushed.iter().all(|p| *p) {
            // The step goes out now; its chunks come back while the
            // program goes on, and the next pull takes them.
            link::send_staged(&mut self.links, self.mode).await.map_err(KvError::ServerLink)?;
            self.pushed.fill(false);
            self.step += 1;
        }
        Ok(())
    }

    /// [`Kv::push`] once the memory is shared: the gradient is in its
    /// region (copied there unless `shared` says it is already), and a
    /// step goes out from there, its answer read into the shared
    /// parameters before this returns.
    async fn push_shared(&mut self, i: usize, dtype: Dtype, payload: Source<'_>, shared: bool) -> Result<(), KvError> {
        let Some(sharing) = self.sharing.as_mut() else { return Err(KvError::NotShared("shared")) };
        if !shared {
            let grads = Arc::get_mut(&mut sharing.grads).ok_or_else(|| {
                KvError::ServerLink(RoleError::new("a server link still holds the last step's gradient"))
            })?;
            let values = bytemuck::cast_slice_mut(&mut grads.values_mut()[self.tensors[i].range.clone()]);
            payload.fill(dtype, vec![(0, values)], &mut self.scratch)?;
        }
        self.pushed[i] = true;
        if self.pushed.iter().all(|p| *p) {
            let grad: Gradient = sharing.grads.clone();
            let (params, mode) = (&mut sharing.params, self.mode);
            let sent = link::exchange_into_shared(&mut self.links, params, Some(&grad), mode, &mut self.traffic).await;
            // A failed step is not half pushed: the program is told why,
            // and the next step starts afresh (if the links still can).
            self.pushed.fill(false);
            sent.map_err(KvError::ServerLink)?;
            self.step += 1;
            self.fetched_at = Some(self.step);
            self.fresh = true;
        }
        Ok(())
    }

    /// Shares the gradient and the parameters with the program (`share`):
    /// the memory, made the first time, and the answer that describes it.
    async fn share(&mut self) -> Result<(serde_json::Value, std::os::fd::OwnedFd), KvError> {
        if self.sharing.is_none() {
            if self.pushed.iter().any(|p| *p) {
                return Err(KvError::ShareMidStep(self.missing()));
            }
            // The answer to the step pushed last, if still out, and any
            // kept answer go into the values the shared memory starts with.
            self.collect().await?;
            self.take_kept()?;
            let mut shared = Shared::new(self.params.len()).map_err(KvError::Share)?;
            shared.params.values_mut().copy_from_slice(&self.params);
            self.sharing = Some(shared);
            // The values now live in the shared memory.
            self.params = Vec::new();
        }
        let Some(sharing) = self.sharing.as_ref() else { return Err(KvError::NotShared("share")) };
        let tensors: Vec<_> = self
            .tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "shape": t.shape, "offset": t.range.start}))
            .collect();
        let answer = serde_json::json!({
            "ok": true,
            "floats": sharing.params.values().len(),
            "params_offset": sharing.params_offset(),
            "tensors": tensors,
        });
        Ok((answer, sharing.fd.as_fd().try_clone_to_owned().map_err(KvError::Share)?))
    }

    /// Brings tensor `i`'s newest values in (to the links' kept answers or
    /// to `params`); [`Kv::answer`] gives them.
    async fn pull(&mut self, i: usize) -> Result<(), KvError> {
        if self.pushed.iter().any(|p| *p) {
            return Err(KvError::PullMidStep { name: self.tensors[i].name.clone(), missing: self.missing() });
        }
        let collected = self.collect().await? || std::mem::take(&mut self.fresh);
        // Async values move with every worker's push: ask, unless the
        // answer to this worker's own push just came in.
        if self.fetched_at != Some(self.step) || (self.mode == SyncMode::Async && !collected) {
            let params = params_mut(&mut self.sharing, &mut self.params);
            link::exchange(&mut self.links, params, None, self.mode, F32, &mut self.traffic)
                .await
                .map_err(KvError::ServerLink)?;
            self.kept = false;
            self.fetched_at = Some(self.step);
        }
        Ok(())
    }

    /// Takes the answer to the step sent last, if it is still out; whether
    /// there was one.
    async fn collect(&mut self) -> Result<bool, KvError> {
        if !link::step_outstanding(&self.links) {
            return Ok(false);
        }
        if link::owes_whole(&self.links) {
            // A pull whose caller went away is still owed: into `params`.
            self.take_kept()?;
            let params = params_mut(&mut self.sharing, &mut self.params);
            link::finish_step(&mut self.links, params, &mut self.traffic).await.map_err(KvError::ServerLink)?;
            self.fetched_at = Some(self.step);
            return Ok(true);
        }
        // The chunks stay where they were received: a pull into the
        // program's memory copies each tensor once, from there.
        link::finish_step_kept(&mut self.links, &mut self.traffic).await.map_err(KvError::ServerLink)?;
        self.kept = true;
        self.fetched_at = Some(self.step);
        Ok(true)
    }

    /// The final values (after every complete step), for the model file.
    pub async fn final_params(&mut self) -> Result<Vec<f32>, KvError> {
        if self.tensors.is_empty() {
            return Ok(Vec::new());
        }
        self.pushed.fill(false);
        if self.sharing.is_some() {
            // Not the shared copy, which the program may have written:
            // the servers' values, into memory of the agent's own.
            self.collect().await?;
            let mut params = vec![0.0; self.sharing.as_ref().map_or(0, |s| s.params.values().len())];
            link::exchange(&mut self.links, &mut params, None, self.mode, F32, &mut self.traffic)
                .await
                .map_err(KvError::ServerLink)?;
            return Ok(params);
        }
        self.pull(0).await?;
        self.take_kept()?;
        Ok(self.params().to_vec())
    }

    /// The newest values pulled (once [`Kv::take_kept`] brought them in).
    fn params(&self) -> &[f32] {
        match &self.sharing {
            Some(s) => s.params.values(),
            None => &self.params,
        }
    }

    /// Copies the answers the links keep into `params`, if they hold the
    /// newest values.
    fn take_kept(&mut self) -> Result<(), KvError> {
        if std::mem::take(&mut self.kept)
            && !link::copy_kept(&self.links, params_mut(&mut self.sharing, &mut self.params))
                .map_err(KvError::ServerLink)?
        {
            return Err(KvError::ServerLink(RoleError::new("the last step's answer is no longer there")));
        }
        Ok(())
    }

    /// Closes the server connections cleanly at the end.
    pub async fn close(&mut self) {
        link::close_links(std::mem::take(&mut self.links)).await;
    }

    /// Serves one request; a refusal's text goes back to the program.
    async fn handle(
        &mut self,
        req: Request,
        payload: Source<'_>,
        ctx: &RoleCtx,
        sched: &mut SchedLink,
        sink: Sink<'_>,
    ) -> Result<serde_json::Value, KvError> {
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
                    return Err(KvError::InitAfterStart);
                }
                if ctx.spec.init.is_some() {
                    // The servers start from the verified weights, which no worker may replace.
                    return Ok(json!({"ok": true, "ignored": INIT_IGNORED}));
                }
                let init = bytemuck::cast_slice_mut(&mut self.init[self.tensors[i].range.clone()]);
                payload.fill(dtype, vec![(0, init)], &mut self.scratch)?;
                self.inited = true;
                Ok(json!({"ok": true}))
            }
            "push" | "pushpull" => {
                let i = self.tensor(req.name.as_deref())?;
                if sink.shared && (self.sharing.is_none() || dtype != Dtype::F32) {
                    // Refused before the push counts.
                    return Err(if self.sharing.is_none() {
                        KvError::NotShared("into_shared")
                    } else {
                        KvError::SharedDtype
                    });
                }
                self.start(sched).await?;
                self.push(i, dtype, payload, req.shared).await?;
                if req.op == "push" {
                    return Ok(json!({"ok": true, "step": self.step}));
                }
                self.pull(i).await?;
                self.answer(i, Dtype::F32, sink)
            }
            "pull" => {
                let i = self.tensor(req.name.as_deref())?;
                self.start(sched).await?;
                self.pull(i).await?;
                self.answer(i, dtype, sink)
            }
            "barrier" => {
                self.start(sched).await?;
                self.barrier(sched).await?;
                Ok(json!({"ok": true}))
            }
            "report" => self.report(ctx, &req),
            other => Err(KvError::UnknownOp(other.to_string())),
        }
    }

    /// The values of tensor `i` just pulled, in `dtype`, to where the
    /// program wants them.
    fn answer(&mut self, i: usize, dtype: Dtype, sink: Sink<'_>) -> Result<serde_json::Value, KvError> {
        let range = self.tensors[i].range.clone();
        if sink.shared {
            return match (&self.sharing, dtype) {
                (None, _) => Err(KvError::NotShared("into_shared")),
                (Some(_), Dtype::F32) => {
                    let written = range.len() * 4;
                    Ok(serde_json::json!({"ok": true, "step": self.step, "nbytes": 0, "written": written}))
                }
                (Some(_), _) => Err(KvError::SharedDtype),
            };
        }
        if let Some((pid, addr, room)) = sink.program
            && dtype == Dtype::F32
            && room == range.len() * 4
        {
            // Straight from the received chunks when they are kept there,
            // else from `params`, brought up to the newest values first.
            let pieces = match self.kept.then(|| link::kept_pieces(&self.links, range.clone())).flatten() {
                Some(pieces) => pieces.into_iter().map(|(at, b)| (addr.saturating_add(4 * at as u64), b)).collect(),
                None => {
                    self.take_kept()?;
                    vec![(addr, bytemuck::cast_slice(&self.params()[range.clone()]))]
                }
            };
            // A push may already be counted (pushpull): an `into` that
            // cannot be written gets the values on the socket instead of
            // an error the program might answer by pushing again.
            match write_pieces(pid, pieces) {
                Ok(()) => return Ok(serde_json::json!({"ok": true, "step": self.step, "nbytes": 0, "written": room})),
                Err(e) => tracing::warn!("answering on the socket: {e}"),
            }
        }
        self.take_kept()?;
        dtype.encode(&self.params()[range], sink.out);
        Ok(serde_json::json!({"ok": true, "step": self.step, "nbytes": sink.out.len()}))
    }

    /// `report`: the epoch's figures to the launcher, with the steps,
    /// samples and bytes since the previous report.
    fn report(&mut self, ctx: &RoleCtx, req: &Request) -> Result<serde_json::Value, KvError> {
        let epoch = req.epoch.ok_or(KvError::ReportNeeds("epoch"))?;
        let train_loss = req.train_loss.ok_or(KvError::ReportNeeds("train_loss"))?;
        let secs = self.last_report.elapsed().as_secs_f64().max(1e-9);
        let steps = self.step - self.steps_at_report;
        // The test figures go first: the launcher completes an epoch of a
        // program of the user's once every worker's loss is in, and takes
        // the figures that came before.
        if let (Some(test_loss), Some(test_accuracy)) = (req.test_loss, req.test_accuracy) {
            ctx.emit(Event::Eval { epoch, test_loss, test_accuracy });
        }
        ctx.emit(Event::Epoch {
            epoch,
            train_loss,
            steps,
            samples_per_s: req.samples.unwrap_or(0) as f64 / secs,
            bytes_pushed: self.traffic.pushed - self.traffic_at_report.pushed,
            bytes_pulled: self.traffic.pulled - self.traffic_at_report.pulled,
        });
        self.traffic_at_report = self.traffic;
        self.last_report = Instant::now();
        self.steps_at_report = self.step;
        Ok(serde_json::json!({"ok": true}))
    }

    /// The most payload bytes an op on tensor `name` may carry.
    fn max_payload(&self, req: &Request) -> usize {
        let per = Dtype::parse(req.dtype.as_deref()).map_or(4, Dtype::size);
        req.name.as_deref().and_then(|n| self.index.get(n)).map_or(0, |i| self.tensors[*i].range.len() * per)
    }
}

/// Serves one connection of the program (whose pid is `program`) until it
/// closes. Framing errors close it (with a reason); refused operations do
/// not.
async fn serve_conn(
    mut s: UnixStream,
    kv: &tokio::sync::Mutex<Kv>,
    ctx: &RoleCtx,
    sched: &tokio::sync::Mutex<SchedLink>,
    program: u32,
) -> Result<(), KvError> {
    let me = nix::unistd::Uid::current().as_raw();
    let peer = s.peer_cred()?;
    if peer.uid() != me {
        let _ = reply(&mut s, &serde_json::json!({"ok": false, "error": "only the job user may use this socket"}), &[])
            .await;
        return Err(KvError::ForeignUid { uid: peer.uid(), job_uid: me });
    }
    // Direct copies only with the program itself: the seccomp filter allows
    // them on no other process (a child of the program, say).
    let direct = peer.pid().filter(|p| u32::try_from(*p) == Ok(program)).map(nix::unistd::Pid::from_raw);
    let mut payload = Vec::new();
    let mut out = Vec::new();
    loop {
        let n = match s.read_u32_le().await {
            Ok(n) => n as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if n > MAX_HEADER {
            return Err(closing(&mut s, KvError::HeaderTooLong(n)).await);
        }
        let mut header = vec![0u8; n];
        s.read_exact(&mut header).await?;
        let req: Request = match serde_json::from_slice(&header) {
            Ok(r) => r,
            Err(e) => return Err(closing(&mut s, KvError::BadHeader(e)).await),
        };
        // Not held while the payload arrives: a client that stalls
        // mid-request must not hold up the program's other connections.
        let max = kv.lock().await.max_payload(&req);
        if req.nbytes > max {
            let name = req.name.unwrap_or_else(|| "?".into());
            return Err(closing(&mut s, KvError::PayloadTooLarge { nbytes: req.nbytes, name, max }).await);
        }
        if req.op == "hello" {
            let answer = hello(direct, req.probe, program, &peer);
            reply(&mut s, &answer, &[]).await?;
            continue;
        }
        if req.op == "share" {
            // Sent once the lock is let go: a client that stops reading
            // holds up nobody else.
            let shared = kv.lock().await.share().await;
            match shared {
                Ok((answer, fd)) => reply_with_fd(&mut s, &answer, fd.as_fd()).await?,
                Err(why) => reply(&mut s, &refusal(&why), &[]).await?,
            }
            continue;
        }
        let source = match (req.from, direct) {
            (None, _) => {
                payload.resize(req.nbytes, 0);
                s.read_exact(&mut payload).await?;
                Source::Socket(&payload)
            }
            (Some(addr), Some(pid)) => Source::Program { pid, addr, len: req.nbytes },
            // Nothing follows the header: the connection stays usable.
            (Some(_), None) => {
                reply(&mut s, &refusal(&not_direct(program, &peer)), &[]).await?;
                continue;
            }
        };
        let program_sink = match (req.into, direct) {
            (None, _) => None,
            (Some(addr), Some(pid)) => Some((pid, addr, req.into_nbytes)),
            (Some(_), None) => {
                reply(&mut s, &refusal(&not_direct(program, &peer)), &[]).await?;
                continue;
            }
        };
        let carries = matches!(req.op.as_str(), "init" | "push" | "pushpull") && !req.shared;
        let expected = if carries { max } else { 0 };
        out.clear();
        let mut kv = kv.lock().await;
        let mut sched = sched.lock().await;
        let answer = if req.nbytes != expected {
            Err(KvError::PayloadSize { op: req.op, expected, got: req.nbytes })
        } else {
            let sink = Sink { out: &mut out, program: program_sink, shared: req.into_shared };
            kv.handle(req, source, ctx, &mut sched, sink).await
        };
        if let Err(KvError::ServerLink(e) | KvError::Scheduler(e)) = &answer
            && e.follows
        {
            kv.lost.get_or_insert_with(|| e.message.clone());
        }
        drop((sched, kv));
        match answer {
            Ok(h) => reply(&mut s, &h, &out).await?,
            Err(why) => reply(&mut s, &refusal(&why), &[]).await?,
        }
    }
}

/// Why `peer` gets no direct copies.
fn not_direct(program: u32, peer: &tokio::net::unix::UCred) -> KvError {
    KvError::NotDirect { program, peer: peer.pid().map_or_else(|| "unknown".to_string(), |p| p.to_string()) }
}

/// `hello`: whether direct copies work on this connection, tried on the
/// program's probe bytes (the kernel may still refuse: a Yama ptrace policy
/// that forbids it, say).
fn hello(
    direct: Option<nix::unistd::Pid>,
    probe: Option<u64>,
    program: u32,
    peer: &tokio::net::unix::UCred,
) -> serde_json::Value {
    let tried = match (direct, probe) {
        (Some(pid), Some(addr)) => read_program(pid, addr, &mut [0u8; 8]).map_err(|e| e.to_string()),
        (Some(_), None) => Err("no probe address given".to_string()),
        (None, _) => Err(not_direct(program, peer).to_string()),
    };
    match tried {
        Ok(()) => serde_json::json!({"ok": true, "direct": true}),
        Err(why) => {
            tracing::info!("KV connection without direct copies (tensors go through the socket): {why}");
            serde_json::json!({"ok": true, "direct": false, "why": why})
        }
    }
}

/// The response header that says why a request was refused.
fn refusal(why: &KvError) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": why.to_string()})
}

/// Tells the program why its connection closes; returns `why` to log.
async fn closing(s: &mut UnixStream, why: KvError) -> KvError {
    let _ = reply(s, &refusal(&why), &[]).await;
    why
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

/// [`reply`] with a file descriptor passed along (`SCM_RIGHTS`, with the
/// first bytes): the program's copy of the shared memory.
async fn reply_with_fd(s: &mut UnixStream, header: &serde_json::Value, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let h = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    let mut msg = Vec::with_capacity(4 + h.len());
    msg.extend_from_slice(&(h.len() as u32).to_le_bytes());
    msg.extend_from_slice(&h);
    let (sock, fds) = (s.as_raw_fd(), [fd.as_raw_fd()]);
    let sent = loop {
        s.writable().await?;
        let once = s.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(&msg)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)
        });
        match once {
            Ok(n) => break n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => continue,
            Err(e) => return Err(e),
        }
    };
    s.write_all(&msg[sent..]).await
}

/// The parameters' values: the shared memory's once there is one. Only
/// for copies (from the links' own frames, as `exchange` without a
/// gradient and `finish_step` make them): a step read into the shared
/// memory goes through [`link::exchange_into_shared`].
fn params_mut<'a>(sharing: &'a mut Option<Shared>, own: &'a mut [f32]) -> &'a mut [f32] {
    match sharing {
        Some(s) => s.params.values_mut(),
        None => own,
    }
}

/// Binds the socket in `dir` (mode 0600; the directory is the job user's, 0700).
pub fn bind(dir: &Path) -> Result<std::os::unix::net::UnixListener, ProgramError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let l = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(source) => return Err(ProgramError::Bind { path, source }),
    };
    if let Err(source) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        return Err(ProgramError::Restrict { path, source });
    }
    l.set_nonblocking(true)?;
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
    child: std::process::Child,
) -> Result<(), RoleError> {
    let program = child.id();
    let (_guard, exit) = watch_exit(child);
    let mut sched = ctx.scheduler_link().await?;
    crate::train::roles::await_start(&mut sched, false).await?;
    ctx.emit(Event::Started);
    let conns = ctx.connect_servers().await?.into_iter().map(|(conn, _)| conn).collect();
    let ctx = Arc::new(ctx);
    let kv = Arc::new(tokio::sync::Mutex::new(Kv::new(&ctx, conns)));
    let sched = Arc::new(tokio::sync::Mutex::new(sched));
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| RoleError::new(e.to_string()))?;
    let status = serve_until_exit(listener, &kv, &ctx, &sched, program, exit).await?;
    let command = ctx.spec.worker.as_ref().map(|w| w.command.join(" ")).unwrap_or_default();
    if !status.success() {
        let said = format!("the program `{command}` ended with {status}; its output is in this log");
        // After the agent told it that another process stopped or failed,
        // the program's exit is not the cause: the launcher names that one.
        return Err(match kv.lock().await.lost.take() {
            Some(why) => RoleError::follows(format!("{said} (after: {why})")),
            None => RoleError::new(said),
        });
    }
    tracing::info!("the program `{command}` finished");
    if ctx.me().rank == 0 {
        let params = kv.lock().await.final_params().await.map_err(|e| RoleError::new(e.to_string()))?;
        let dir = ctx.workdir.join("model");
        crate::store::artifact::write_model(&dir, &ctx.spec.model, &params, ctx.seed)
            .map_err(|e| RoleError::new(format!("cannot write the model: {e}")))?;
        ctx.emit(Event::Model { path: dir, step: None });
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

/// The program's exit status, from a thread that waits for it; the guard
/// kills the program if the agent stops first.
fn watch_exit(
    mut child: std::process::Child,
) -> (ChildGuard, tokio::sync::oneshot::Receiver<std::io::Result<std::process::ExitStatus>>) {
    let exited = Arc::new(AtomicBool::new(false));
    let guard = ChildGuard { pid: child.id() as i32, exited: exited.clone() };
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let status = child.wait();
        exited.store(true, Ordering::SeqCst);
        let _ = exit_tx.send(status);
    });
    (guard, exit_rx)
}

/// Serves the connections of the program (pid `program`, and any process of
/// the job user's it lets in), each on a task of its own and at most
/// [`MAX_CONNECTIONS`] at once, until the program exits; its exit status.
async fn serve_until_exit(
    listener: tokio::net::UnixListener,
    kv: &Arc<tokio::sync::Mutex<Kv>>,
    ctx: &Arc<RoleCtx>,
    sched: &Arc<tokio::sync::Mutex<SchedLink>>,
    program: u32,
    mut exit: tokio::sync::oneshot::Receiver<std::io::Result<std::process::ExitStatus>>,
) -> Result<std::process::ExitStatus, RoleError> {
    let mut tasks = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let status = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let s = match accepted {
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
                    tasks.spawn(turn_away(s));
                    continue;
                };
                let (kv, ctx, sched) = (kv.clone(), ctx.clone(), sched.clone());
                tasks.spawn(async move {
                    if let Err(e) = serve_conn(s, &kv, &ctx, &sched, program).await {
                        tracing::warn!("KV connection closed: {e}");
                    }
                    drop(slot);
                });
            }
            // Finished connections are reaped as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            status = &mut exit => {
                break status.map_err(|_| RoleError::new("lost the program's exit status"))?
                    .map_err(|e| RoleError::new(format!("waiting for the program: {e}")))?;
            }
        }
    };
    // A request the program left under way (a step whose answer it did
    // not wait for, say) runs to its end first: a request holds both locks
    // while it works on the server links, and stopping it there would leave
    // a link mid-frame. Connections waiting for their next request hold
    // neither and end at once. One that never ends (a barrier no other
    // worker reaches) is stopped after a while all the same. A program that
    // failed gets no model and no wait.
    let grace = if status.success() { LEFT_UNDER_WAY } else { std::time::Duration::ZERO };
    let locks = async { (kv.lock().await, sched.lock().await) };
    let held = tokio::time::timeout(grace, locks).await;
    if held.is_err() && status.success() {
        tracing::warn!("a request of the program's was still under way {LEFT_UNDER_WAY:?} after it exited; stopped");
    }
    tasks.abort_all();
    drop(held);
    Ok(status)
}

/// How long a request the program left under way when it exited may go on.
const LEFT_UNDER_WAY: std::time::Duration = std::time::Duration::from_secs(60);

/// Tells a connection beyond [`MAX_CONNECTIONS`] why it is closed (within a second).
async fn turn_away(mut s: UnixStream) {
    let why = format!("too many connections to the KV socket (at most {MAX_CONNECTIONS} at once); close one first");
    let header = serde_json::json!({"ok": false, "error": why});
    let answer = reply(&mut s, &header, &[]);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), answer).await;
}

/// What a `[worker] command` inherits of the agent's environment.
pub const PROGRAM_ENV: &[&str] = &["PATH", "LANG", "TZ"];

/// A worker's place among the job's workers, and among those on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerRanks {
    /// Its rank among all workers.
    pub rank: u32,
    /// Workers of the job.
    pub workers: u32,
    /// Its place among the workers on its host, by rank.
    pub local_rank: u32,
    /// Workers on its host.
    pub local_workers: u32,
}

impl WorkerRanks {
    /// Worker `rank`'s place in `plan`.
    pub fn of(plan: &crate::job::plan::Plan, rank: u32) -> WorkerRanks {
        use crate::net::identity::Role;
        let host = plan.processes.iter().find(|p| p.role == Role::Worker && p.rank == rank).map(|p| p.host.as_str());
        let mut here: Vec<u32> = plan
            .processes
            .iter()
            .filter(|p| p.role == Role::Worker && Some(p.host.as_str()) == host)
            .map(|p| p.rank)
            .collect();
        here.sort_unstable();
        WorkerRanks {
            rank,
            workers: plan.count(Role::Worker),
            local_rank: here.iter().position(|r| *r == rank).unwrap_or(0) as u32,
            local_workers: here.len().max(1) as u32,
        }
    }
}

/// Starts the `[worker] command` as the job user (the caller has dropped
/// privileges already; the seccomp filter comes after, so the program is
/// not bound by the agent's filter but has no capabilities and
/// no_new_privs). Its stdout and stderr go to the agent's log.
///
/// Its environment is [`PROGRAM_ENV`] as the agent has it, then `[worker]
/// env`, then the `WARDEN_*` variables below: nothing else of the agent's
/// or the launcher's (no passphrase variable, no token of a user's shell).
pub fn spawn_program(
    spec: &crate::job::spec::JobSpec,
    ranks: WorkerRanks,
    workdir: &Path,
    seed: u64,
) -> Result<std::process::Child, ProgramError> {
    let WorkerRanks { rank, workers, local_rank, local_workers } = ranks;
    use std::os::fd::AsFd;
    let w = spec.worker.as_ref().ok_or(ProgramError::NoCommand)?;
    let log = std::io::stderr().as_fd().try_clone_to_owned()?;
    std::process::Command::new(&w.command[0])
        .args(&w.command[1..])
        .current_dir(&w.workdir)
        .env_clear()
        .envs(PROGRAM_ENV.iter().filter_map(|k| std::env::var_os(k).map(|v| (k, v))))
        .envs(&w.env)
        .env("WARDEN_RANK", rank.to_string())
        .env("WARDEN_NUM_WORKERS", workers.to_string())
        // What torchrun sets, for programs written against it.
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", workers.to_string())
        .env("LOCAL_RANK", local_rank.to_string())
        .env("LOCAL_WORLD_SIZE", local_workers.to_string())
        .env("WARDEN_KV", workdir.join(SOCKET))
        .env("WARDEN_RUN_DIR", workdir)
        .env("WARDEN_EPOCHS", spec.training.epochs.to_string())
        .env("WARDEN_BATCH_SIZE", spec.training.batch_size.to_string())
        .env("WARDEN_SEED", seed.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(log))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|source| ProgramError::Spawn { command: w.command.join(" "), dir: w.workdir.clone(), source })
}
