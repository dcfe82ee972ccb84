//! A worker's connections to the servers, one task each, shared by the
//! built-in worker and the KV endpoint of a program of the user's.
//!
//! A step goes out to every server at once ([`send_step`]): per chunk of
//! the server's shard, a push and a pull request, all written without
//! waiting, while the link's task reads the chunks' updates as they come
//! back ([`finish_step`] collects them into the parameters). Buffers travel
//! with the commands and come back with the replies, so the steady state
//! reuses them.
//!
//! The built-in worker's step ([`exchange`] with a gradient) copies no
//! value in user space: the f32 pushes are sealed straight from the
//! gradient (shared with the tasks for the step), and the worker reads
//! every server's answer itself, each chunk decrypted straight into its
//! place in the parameters, while the tasks send.

use std::ops::Range;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::RoleError;
use crate::job::spec::{Compression, SyncMode};
use crate::net::conn::{ClientConn, RecvHalf, SendHalf, Split};
use crate::net::record::TlsStream;
use crate::net::wire::{
    Encoding, Message, PARAMS_CHUNK_HEAD, TAG_PARAMS, TAG_PARAMS_CHUNK, params_chunk_head, params_chunk_view,
    vector_view,
};
use crate::train::shared::Region;

/// The receiving side of a server connection.
type Recv = RecvHalf<tokio::io::ReadHalf<TlsStream>>;

struct LinkCmd {
    /// Ask the server for a checkpoint of this step first (worker 0).
    checkpoint: Option<u64>,
    /// Encoded frames to send: pushes and pull requests.
    frames: Vec<u8>,
    /// The gradient the f32 pushes' values are sent from, if any: no copy
    /// into `frames`. The task lets go of it before it replies.
    grad: Option<Gradient>,
    /// Where in `frames` each such push's values go, and their range of
    /// `grad`, in order.
    splice: Vec<(usize, Range<usize>)>,
    /// Frames the server answers with (params or params_chunk).
    replies: usize,
    /// Receive the replies' bodies; handed back in the reply.
    bodies: Vec<Vec<u8>>,
    /// The connection's receiving side when the task is to read the
    /// replies (handed back in the reply); `None` when the caller reads
    /// them itself (see [`exchange`]).
    recv: Option<Recv>,
}

struct LinkReply {
    recv: Option<Recv>,
    frames: Vec<u8>,
    splice: Vec<(usize, Range<usize>)>,
    bodies: Vec<Vec<u8>>,
    bytes_out: u64,
}

/// What a link's outstanding command will be answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Nothing is outstanding.
    Nothing,
    /// The whole shard (one params frame).
    Whole,
    /// Every chunk of the shard, in order.
    Chunks,
    /// An answer that only acknowledges (initial values taken; or none,
    /// for a checkpoint request), read by the call that sent it.
    Ack,
}

/// One server connection, driven by its own task so that every server is
/// pushed to and pulled from at the same time (and TLS work spreads over the
/// runtime's threads). Within a link, sending and receiving run at once: a
/// step's chunks go out while the first chunks' updates come back.
pub struct Link {
    range: Range<usize>,
    /// The shard's chunks, relative to `range` (the server cuts it alike).
    chunks: Vec<Range<usize>>,
    version: u64,
    tx: mpsc::Sender<LinkCmd>,
    /// A broken connection arrives as a [`RoleError`] that knows whether it
    /// follows from another process's failure (the server closed it).
    rx: mpsc::Receiver<Result<LinkReply, RoleError>>,
    frames: Vec<u8>,
    /// The next command's [`LinkCmd::grad`] and [`LinkCmd::splice`].
    grad: Option<Gradient>,
    splice: Vec<(usize, Range<usize>)>,
    bodies: Vec<Vec<u8>>,
    /// 2-bit error feedback: what was not yet sent.
    residual: Vec<f32>,
    /// A step's frames laid out for f32 values written in place (the KV
    /// endpoint's, see [`Link::staged_pieces`]); empty while in flight.
    staged: Vec<u8>,
    /// Per chunk: where its push frame, its values and its pull frame start
    /// in `staged`.
    staged_at: Vec<(usize, usize, usize)>,
    /// The command in flight carries `staged`, which its reply returns.
    staged_out: bool,
    /// The connection's receiving side, here unless a command in flight
    /// carries it.
    recv: Option<Recv>,
    /// A step whose answer the caller reads itself ([`exchange`]) was sent
    /// and is not read whole yet: if that caller went away mid-way, the
    /// connection is mid-frame and cannot be read from any more.
    torn: bool,
    /// `bodies` hold the last step's chunks, not copied anywhere
    /// ([`finish_step_kept`]).
    kept: bool,
    /// Where [`exchange_into_shared`] opens records before their values go
    /// on to the parameters (made on first use).
    bounce: Vec<u8>,
    due: Due,
    /// The task that owns the connection.
    task: tokio::task::JoinHandle<()>,
}

/// A step's gradient, the whole flat vector, shared with the link tasks
/// that send it: the built-in worker's vector, or the region a program
/// shares with its agent ([`crate::train::shared`]).
pub type Gradient = Arc<dyn AsRef<[f32]> + Send + Sync>;

/// Running totals for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    /// Bytes sent to the servers.
    pub pushed: u64,
    /// Bytes received from them.
    pub pulled: u64,
}

/// Closes every link cleanly (TLS close_notify): the servers see an orderly
/// goodbye at the end of training, not a vanished peer.
pub async fn close_links(links: Vec<Link>) {
    for Link { tx, task, .. } in links {
        drop(tx);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
}

impl Link {
    /// A link over `conn` to the server holding `range`, whose shard is cut
    /// into chunks of `chunk_floats`.
    pub fn spawn(conn: ClientConn, range: Range<usize>, chunk_floats: usize) -> Link {
        let (tx, cmd_rx) = mpsc::channel::<LinkCmd>(1);
        let (reply_tx, rx) = mpsc::channel(1);
        let chunks = crate::net::wire::chunk_ranges(range.len(), chunk_floats);
        let (recv, send) = conn.into_split();
        let task = tokio::spawn(drive(send, cmd_rx, reply_tx));
        Link {
            range,
            chunks,
            version: 0,
            tx,
            rx,
            frames: Vec::new(),
            grad: None,
            splice: Vec::new(),
            bodies: Vec::new(),
            residual: Vec::new(),
            staged: Vec::new(),
            staged_at: Vec::new(),
            staged_out: false,
            recv: Some(recv),
            torn: false,
            kept: false,
            bounce: Vec::new(),
            due: Due::Nothing,
            task,
        }
    }

    /// The slice of the flat parameter vector this link's server holds.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Hands the next command to the task, which reads its `replies`
    /// itself (the receiving side goes with the command).
    async fn send(&mut self, checkpoint: Option<u64>, replies: usize, due: Due) -> Result<(), RoleError> {
        let recv = Some(self.take_recv()?);
        self.send_with(checkpoint, replies, recv, due).await
    }

    /// The receiving side, unless a cancelled reader left it mid-frame.
    fn take_recv(&mut self) -> Result<Recv, RoleError> {
        match self.recv.take() {
            Some(recv) if !self.torn => Ok(recv),
            _ => Err(RoleError::new("a server link was left mid-frame by a cancelled step")),
        }
    }

    async fn send_with(
        &mut self,
        checkpoint: Option<u64>,
        replies: usize,
        recv: Option<Recv>,
        due: Due,
    ) -> Result<(), RoleError> {
        let frames = std::mem::take(&mut self.frames);
        let bodies = std::mem::take(&mut self.bodies);
        self.kept = false;
        let (grad, splice) = (self.grad.take(), std::mem::take(&mut self.splice));
        self.tx
            .send(LinkCmd { checkpoint, frames, grad, splice, replies, bodies, recv })
            .await
            .map_err(|_| RoleError::follows("lost a server link"))?;
        self.due = due;
        Ok(())
    }

    /// The answer to the command sent last. `due` is cleared only once it
    /// is in: a caller cancelled while waiting (a KV connection ended, say)
    /// leaves the link still owed its answer.
    async fn reply(&mut self) -> Result<LinkReply, RoleError> {
        let mut reply = self.rx.recv().await.ok_or_else(|| RoleError::follows("lost a server link"))?;
        self.due = Due::Nothing;
        if let Ok(LinkReply { recv: recv @ Some(_), .. }) = &mut reply {
            self.recv = recv.take();
        }
        reply
    }

    /// Where the f32 values of `global` (a range of the flat vector) go in
    /// this link's staged frames: for each chunk they touch, the offset of
    /// the first value within `global` and the bytes to fill, in order. The
    /// frames are laid out on first use and reused for every step (only
    /// their headers change); [`send_staged`] sends them. `None` while the
    /// staged frames are out with a step that was not collected yet.
    pub fn staged_pieces(&mut self, global: Range<usize>) -> Option<Vec<(usize, &mut [u8])>> {
        if self.staged_out {
            return None;
        }
        if self.staged.is_empty() {
            self.lay_out();
        }
        let base = self.range.start;
        let mut pieces = Vec::new();
        let mut rest: &mut [u8] = &mut self.staged;
        let mut consumed = 0;
        for (r, &(_, values, _)) in self.chunks.iter().zip(&self.staged_at) {
            let Some((within, offset)) = overlap(base, r, &global) else {
                continue;
            };
            let at = values + within.start * 4;
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - consumed);
            let (piece, tail) = tail.split_at_mut(within.len() * 4);
            pieces.push((offset, piece));
            rest = tail;
            consumed = at + within.len() * 4;
        }
        Some(pieces)
    }

    /// The version a step's pulls wait for. Sync: this step's aggregate;
    /// async: whatever is there.
    fn min_version(&self, mode: SyncMode) -> Result<u64, RoleError> {
        match mode {
            SyncMode::Sync => self.version.checked_add(1).ok_or_else(|| {
                RoleError::new(format!("a server reported version {}, after which none can follow", self.version))
            }),
            SyncMode::Async => Ok(0),
        }
    }

    /// Lays out `staged`: per chunk an f32 push_chunk frame (zeros, version
    /// 0) and a pull_chunk frame.
    fn lay_out(&mut self) {
        self.staged.clear();
        self.staged_at.clear();
        let zeros = vec![0.0f32; self.chunks.iter().map(Range::len).max().unwrap_or(0)];
        for (c, r) in self.chunks.iter().enumerate() {
            let push = self.staged.len();
            let zeros = &zeros[..r.len()];
            crate::net::wire::encode_push_chunk(0, c as u32, zeros, Encoding::F32, 0.0, &mut [], &mut self.staged);
            let values = self.staged.len() - r.len() * 4;
            let pull = self.staged.len();
            Message::PullChunk { chunk: c as u32, min_version: 0 }.encode_frame(&mut self.staged);
            self.staged_at.push((push, values, pull));
        }
    }

    /// Sends worker 0's initial values of this server's shard and waits for
    /// the server's answer.
    pub async fn set_params(&mut self, all: &[f32]) -> Result<(), RoleError> {
        self.frames.clear();
        Message::SetParams { data: all[self.range.clone()].to_vec() }.encode_frame(&mut self.frames);
        self.send(None, 1, Due::Ack).await?;
        let reply = self.reply().await?;
        let answer = reply.bodies.first().map(|b| b.first().copied());
        self.frames = reply.frames;
        self.splice = reply.splice;
        self.bodies = reply.bodies;
        match answer {
            Some(Some(TAG_PARAMS)) => Ok(()),
            _ => Err(RoleError::new("the server answered initial values with something other than its values")),
        }
    }
}

/// The link's task: sends each command's frames while reading its replies
/// (when the command brings the receiving side).
async fn drive(
    mut send: SendHalf<tokio::io::WriteHalf<TlsStream>>,
    mut cmd_rx: mpsc::Receiver<LinkCmd>,
    reply_tx: mpsc::Sender<Result<LinkReply, RoleError>>,
) {
    while let Some(LinkCmd { checkpoint, frames, grad, mut splice, replies, mut bodies, mut recv }) =
        cmd_rx.recv().await
    {
        let result = async {
            let values: u64 = splice.iter().map(|(_, r)| 4 * r.len() as u64).sum();
            let mut bytes_out = frames.len() as u64 + values;
            if let Some(step) = checkpoint {
                let mut f = Vec::new();
                Message::Checkpoint { step }.encode_frame(&mut f);
                send.send_frame(&f).await?;
                bytes_out += f.len() as u64;
            }
            bodies.resize_with(bodies.len().max(replies), Vec::new);
            let sending = async {
                match &grad {
                    None => send.send_frame(&frames).await,
                    Some(g) => send.send_pieces(spliced(&frames, &splice, (**g).as_ref())).await,
                }
            };
            let receiving = async {
                if let Some(recv) = recv.as_mut() {
                    for body in bodies.iter_mut().take(replies) {
                        recv.recv_raw().await?;
                        recv.swap_frame(body);
                    }
                }
                Ok(())
            };
            tokio::try_join!(sending, receiving)?;
            splice.clear();
            Ok::<_, RoleError>(LinkReply { recv, frames, splice, bodies, bytes_out })
        }
        .await;
        // The worker may write its next gradient once every link let go.
        drop(grad);
        let failed = result.is_err();
        if reply_tx.send(result).await.is_err() || failed {
            return;
        }
    }
    // The worker is done with this server.
    send.close().await;
}

/// What a step sends each server: with a gradient, a push and a pull per
/// chunk, interleaved (each chunk comes back once every worker's copy of
/// it is in); without, one pull of the whole shard. Returns the replies due.
fn encode_step(
    link: &mut Link,
    grad: Option<&Gradient>,
    mode: SyncMode,
    compression: Compression,
) -> Result<(usize, Due), RoleError> {
    link.frames.clear();
    link.splice.clear();
    let Some(grad) = grad else {
        Message::Pull { min_version: 0 }.encode_frame(&mut link.frames);
        return Ok((1, Due::Whole));
    };
    let min_version = link.min_version(mode)?;
    let frames = &mut link.frames;
    if compression.encoding == Encoding::F32 && cfg!(target_endian = "little") {
        // The values go out from the gradient itself (see `spliced`).
        for (c, r) in link.chunks.iter().enumerate() {
            let chunk = c as u32;
            crate::net::wire::encode_push_chunk_f32_head(link.version, chunk, r.len(), frames);
            let base = link.range.start;
            link.splice.push((frames.len(), base + r.start..base + r.end));
            Message::PullChunk { chunk, min_version }.encode_frame(frames);
        }
        link.grad = Some(grad.clone());
        return Ok((link.chunks.len(), Due::Chunks));
    }
    if link.residual.len() != link.range.len() && compression.encoding == Encoding::TwoBit {
        link.residual = vec![0.0; link.range.len()];
    }
    let g = &(**grad).as_ref()[link.range.clone()];
    for (c, r) in link.chunks.iter().enumerate() {
        let residual = link.residual.get_mut(r.clone()).unwrap_or_default();
        let (chunk, (data, enc)) = (c as u32, (&g[r.clone()], compression.encoding));
        crate::net::wire::encode_push_chunk(link.version, chunk, data, enc, compression.threshold, residual, frames);
        Message::PullChunk { chunk, min_version }.encode_frame(frames);
    }
    Ok((link.chunks.len(), Due::Chunks))
}

/// `frames` with the values of `grad` spliced in where `splice` says: the
/// pieces a step's frames are sent in.
fn spliced<'a>(
    frames: &'a [u8],
    splice: &'a [(usize, Range<usize>)],
    grad: &'a [f32],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let values: &[u8] = bytemuck::cast_slice(grad);
    let starts = std::iter::once(0).chain(splice.iter().map(|(at, _)| *at));
    let ends = splice.iter().map(|(at, _)| *at).chain(std::iter::once(frames.len()));
    let values = splice.iter().map(|(_, r)| &values[4 * r.start..4 * r.end]).map(Some).chain(std::iter::once(None));
    starts.zip(ends).zip(values).flat_map(move |((a, b), v)| std::iter::once(&frames[a..b]).chain(v))
}

/// Byte offsets in a push_chunk frame of its version, and in a pull_chunk
/// frame of its min_version (length prefix, tag, then the fields in order).
const PUSH_CHUNK_VERSION_AT: usize = crate::net::wire::HEADER_LEN + 1;
const PULL_CHUNK_MIN_VERSION_AT: usize = crate::net::wire::HEADER_LEN + 1 + 4;

/// Starts a step on every server at once from the values written into the
/// staged frames ([`Link::staged_pieces`]): the frames' versions are set
/// and they go out as they are, no copy. [`finish_step`] collects it.
pub async fn send_staged(links: &mut [Link], mode: SyncMode) -> Result<(), RoleError> {
    for link in links.iter_mut() {
        if link.staged.is_empty() {
            link.lay_out();
        }
        let min_version = link.min_version(mode)?;
        for &(push, _, pull) in &link.staged_at {
            let at = push + PUSH_CHUNK_VERSION_AT;
            link.staged[at..at + 8].copy_from_slice(&link.version.to_le_bytes());
            let at = pull + PULL_CHUNK_MIN_VERSION_AT;
            link.staged[at..at + 8].copy_from_slice(&min_version.to_le_bytes());
        }
        let staged = std::mem::take(&mut link.staged);
        let spare = std::mem::replace(&mut link.frames, staged);
        link.send(None, link.chunks.len(), Due::Chunks).await?;
        link.frames = spare;
        link.staged_out = true;
    }
    Ok(())
}

/// Starts a step on every server at once: pushes `grad` (the whole flat
/// vector; if any) and asks for the result. [`finish_step`] collects it.
pub async fn send_step(
    links: &mut [Link],
    grad: Option<&Gradient>,
    mode: SyncMode,
    compression: Compression,
) -> Result<(), RoleError> {
    for link in links.iter_mut() {
        let (replies, due) = encode_step(link, grad, mode, compression)?;
        link.send(None, replies, due).await?;
    }
    Ok(())
}

/// Waits for every server's answer to [`send_step`] and copies it into
/// `params` (the whole flat vector).
pub async fn finish_step(links: &mut [Link], params: &mut [f32], t: &mut Traffic) -> Result<(), RoleError> {
    finish(links, Some(params), t).await
}

/// [`finish_step`] of a step whose answers are all chunks, which stay in
/// the links instead of being copied into a parameter vector: a program's
/// pull takes each tensor straight from them ([`kept_pieces`]), and
/// [`copy_kept`] makes the flat vector when one is wanted. They are kept
/// until the links send again.
pub async fn finish_step_kept(links: &mut [Link], t: &mut Traffic) -> Result<(), RoleError> {
    finish(links, None, t).await
}

async fn finish(links: &mut [Link], mut params: Option<&mut [f32]>, t: &mut Traffic) -> Result<(), RoleError> {
    for link in links.iter_mut() {
        let due = link.due;
        if due == Due::Nothing {
            // Answered already (an earlier call was cancelled after it).
            continue;
        }
        let mut reply = link.reply().await?;
        // The frames come back first (to `staged` if they were the staged
        // ones), whatever the answer holds.
        let frames = std::mem::take(&mut reply.frames);
        link.splice = std::mem::take(&mut reply.splice);
        if std::mem::take(&mut link.staged_out) {
            link.staged = frames;
        } else {
            link.frames = frames;
        }
        let shard = params.as_deref_mut().map(|p| &mut p[link.range.clone()]);
        let replies = match (due, shard) {
            (Due::Chunks, shard) => {
                let keep = shard.is_none();
                link.version = take_chunks(&link.chunks, &reply.bodies, shard)?;
                link.kept = keep;
                link.chunks.len()
            }
            (Due::Whole, Some(shard)) => {
                link.version = take_whole(&reply.bodies[0], shard)?;
                1
            }
            (Due::Whole, None) => return Err(RoleError::new("a whole shard's answer needs the parameter vector")),
            (Due::Nothing | Due::Ack, _) => 0,
        };
        t.pushed += reply.bytes_out;
        t.pulled +=
            reply.bodies.iter().take(replies).map(|b| (b.len() + crate::net::wire::HEADER_LEN) as u64).sum::<u64>();
        link.bodies = reply.bodies;
    }
    Ok(())
}

/// Where the values of `global` (a range of the flat vector) are in the
/// answers [`finish_step_kept`] kept: for each chunk it touches, the offset
/// of its first value within `global` and its bytes (little-endian f32).
/// `None` unless every link keeps its answer.
pub fn kept_pieces(links: &[Link], global: Range<usize>) -> Option<Vec<(usize, &[u8])>> {
    let mut pieces = Vec::new();
    for link in links {
        if !link.kept || link.bodies.len() < link.chunks.len() {
            return None;
        }
        for (r, body) in link.chunks.iter().zip(&link.bodies) {
            if let Some((within, offset)) = overlap(link.range.start, r, &global) {
                let (_, _, values) = params_chunk_view(body).ok()?;
                pieces.push((offset, &values[4 * within.start..4 * within.end]));
            }
        }
    }
    Some(pieces)
}

/// Where chunk `chunk` of a shard starting at `base` of the flat vector and
/// `global` (a range of it) meet: the values' range within the chunk and
/// the offset of the first within `global`; `None` if they do not.
fn overlap(base: usize, chunk: &Range<usize>, global: &Range<usize>) -> Option<(Range<usize>, usize)> {
    let (lo, hi) = (base + chunk.start, base + chunk.end);
    let (a, b) = (lo.max(global.start), hi.min(global.end));
    (a < b).then(|| (a - lo..b - lo, a - global.start))
}

/// Copies the answers [`finish_step_kept`] kept into `params`; whether
/// every link had one.
pub fn copy_kept(links: &[Link], params: &mut [f32]) -> Result<bool, RoleError> {
    for link in links {
        if !link.kept {
            return Ok(false);
        }
        take_chunks(&link.chunks, &link.bodies, Some(&mut params[link.range.clone()]))?;
    }
    Ok(true)
}

/// Whether a link is owed a whole shard (a pull without a push whose
/// caller went away before the answer): [`finish_step`] must take it.
pub fn owes_whole(links: &[Link]) -> bool {
    links.iter().any(|l| l.due == Due::Whole)
}

/// Whether a step sent with [`send_step`] still waits for [`finish_step`].
pub fn step_outstanding(links: &[Link]) -> bool {
    links.iter().any(|l| matches!(l.due, Due::Whole | Due::Chunks))
}

/// Pushes `grad` (if any) and pulls every shard, all servers at once.
pub async fn exchange(
    links: &mut [Link],
    params: &mut [f32],
    grad: Option<&Gradient>,
    mode: SyncMode,
    compression: Compression,
    t: &mut Traffic,
) -> Result<(), RoleError> {
    exchange_with(links, params, grad, (mode, compression), t, false).await
}

/// [`exchange`] of f32 pushes into parameters in memory another process may
/// write (shared with a program, [`crate::train::shared`]): each record of
/// the answer is opened in a buffer of the link's own and its values copied
/// on from there. The record layer reads a record's content type and
/// length back from the plaintext it decrypted, which must not be memory
/// the program can change under it.
pub async fn exchange_into_shared(
    links: &mut [Link],
    params: &mut Region,
    grad: Option<&Gradient>,
    mode: SyncMode,
    t: &mut Traffic,
) -> Result<(), RoleError> {
    for link in links.iter_mut().filter(|l| l.bounce.is_empty()) {
        link.bounce = vec![0; crate::net::record::READ_AHEAD];
    }
    let f32s = Compression { encoding: Encoding::F32, threshold: 0.0 };
    exchange_with(links, params.values_mut(), grad, (mode, f32s), t, true).await
}

/// [`exchange`], opening records in the links' own buffers if `private`.
async fn exchange_with(
    links: &mut [Link],
    params: &mut [f32],
    grad: Option<&Gradient>,
    (mode, compression): (SyncMode, Compression),
    t: &mut Traffic,
    private: bool,
) -> Result<(), RoleError> {
    let Some(grad) = grad else {
        // The answer is read into the links' own frames and copied from there.
        send_step(links, None, mode, compression).await?;
        return finish_step(links, params, t).await;
    };
    // The tasks send; this reads every server's chunks at once, each
    // straight into its place in `params` (no copy out of a frame).
    if links.iter().any(|l| l.torn || l.recv.is_none() || l.due != Due::Nothing) {
        return Err(RoleError::new("a server link cannot take a step now"));
    }
    for link in links.iter_mut() {
        encode_step(link, Some(grad), mode, compression)?;
        // Owed this step's chunks from here until they are all read.
        link.torn = true;
        link.send_with(None, 0, None, Due::Ack).await?;
    }
    let steps = shards_of(links, params)?.into_iter().map(|(link, shard)| link.take_step(shard, private));
    for (pushed, pulled) in futures_util::future::try_join_all(steps).await? {
        t.pushed += pushed;
        t.pulled += pulled;
    }
    Ok(())
}

/// Each link with its shard of `params` (the links' ranges are disjoint).
fn shards_of<'a>(
    links: &'a mut [Link],
    params: &'a mut [f32],
) -> Result<Vec<(&'a mut Link, &'a mut [f32])>, RoleError> {
    let mut order: Vec<&mut Link> = links.iter_mut().collect();
    order.sort_by_key(|l| l.range.start);
    let (mut rest, mut at) = (params, 0);
    let mut shards = Vec::with_capacity(order.len());
    for link in order {
        let r = link.range.clone();
        if r.start < at || r.end > at + rest.len() {
            return Err(RoleError::new(format!("server shards overlap or exceed the {} parameters", at + rest.len())));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
        let (shard, tail) = tail.split_at_mut(r.len());
        (rest, at) = (tail, r.end);
        shards.push((link, shard));
    }
    Ok(shards)
}

impl Link {
    /// The rest of a step [`exchange`] sent: reads the server's answer,
    /// every chunk's values straight into `shard` (its place in the
    /// parameters; through the link's own buffer if `private`), while the
    /// task's sending finishes; a failed send ends the step at once.
    /// Returns the bytes pushed and pulled. The link stays torn unless both
    /// complete.
    async fn take_step(&mut self, shard: &mut [f32], private: bool) -> Result<(u64, u64), RoleError> {
        let Link { recv, chunks, rx, bounce, .. } = self;
        let bounce = if private { bounce.as_mut_slice() } else { &mut [] };
        let recv = recv.as_mut().ok_or_else(|| RoleError::new("a server link cannot take a step now"))?;
        let sent = async {
            match rx.recv().await {
                Some(reply) => reply,
                None => Err(RoleError::follows("lost a server link")),
            }
        };
        let ((version, pulled), reply) = tokio::try_join!(read_chunks(recv, chunks, shard, bounce), sent)?;
        self.due = Due::Nothing;
        self.version = version;
        self.frames = reply.frames;
        self.splice = reply.splice;
        self.bodies = reply.bodies;
        self.torn = false;
        Ok((reply.bytes_out, pulled))
    }
}

/// Reads a step's answer of `chunks` from `recv`, each chunk's head checked
/// before its values are decrypted into their place in `shard` (through
/// `bounce` unless it is empty). Returns the lowest version and the bytes
/// received.
async fn read_chunks(
    recv: &mut Recv,
    chunks: &[Range<usize>],
    shard: &mut [f32],
    bounce: &mut [u8],
) -> Result<(u64, u64), RoleError> {
    let (mut version, mut bytes) = (u64::MAX, 0);
    for (c, r) in chunks.iter().enumerate() {
        let values = &mut shard[r.clone()];
        let got = match recv.recv_head(TAG_PARAMS_CHUNK, PARAMS_CHUNK_HEAD, 4 * r.len()).await? {
            Split::Head(head) => params_chunk_head(head),
            Split::Whole(body) => params_chunk_view(body).map(|(v, chunk, values)| (v, chunk, values.len() / 4)),
        };
        let (v, chunk, n) = got.map_err(|e| RoleError::new(format!("from a server: {e}")))?;
        // A frame of another kind or length cannot pass this check.
        check_chunk((chunk, n), (c, r.len()))?;
        let dst: &mut [u8] = bytemuck::cast_slice_mut(values);
        if bounce.is_empty() {
            recv.recv_rest(dst).await?;
        } else {
            for part in dst.chunks_mut(bounce.len()) {
                let private = &mut bounce[..part.len()];
                recv.recv_rest(private).await?;
                part.copy_from_slice(private);
            }
        }
        if cfg!(target_endian = "big") {
            values.iter_mut().for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
        }
        version = version.min(v);
        bytes += (crate::net::wire::HEADER_LEN + PARAMS_CHUNK_HEAD + 4 * r.len()) as u64;
    }
    Ok((version, bytes))
}

/// A chunk `(chunk, values)` the server sent where `(c, len)` was due.
fn check_chunk((chunk, n): (u32, usize), (c, len): (usize, usize)) -> Result<(), RoleError> {
    if chunk as usize != c || n != len {
        return Err(RoleError::new(format!(
            "server sent chunk {chunk} of {n} values where chunk {c} of {len} was due"
        )));
    }
    Ok(())
}

/// Copies a whole-shard params body into `shard`; returns its version.
fn take_whole(body: &[u8], shard: &mut [f32]) -> Result<u64, RoleError> {
    let (version, values) = vector_view(body, TAG_PARAMS).map_err(|e| RoleError::new(format!("from a server: {e}")))?;
    if values.len() != shard.len() * 4 {
        return Err(RoleError::new(format!("server sent {} values for a shard of {}", values.len() / 4, shard.len())));
    }
    warden_kernels::convert::copy_f32_le(shard, values);
    Ok(version)
}

/// Copies the params_chunk bodies of every chunk into `shard`; returns
/// the oldest chunk's version. Each body must be its chunk's, in order.
fn take_chunks(chunks: &[Range<usize>], bodies: &[Vec<u8>], mut shard: Option<&mut [f32]>) -> Result<u64, RoleError> {
    let mut version = u64::MAX;
    for (c, (r, body)) in chunks.iter().zip(bodies).enumerate() {
        let (v, chunk, values) = params_chunk_view(body).map_err(|e| RoleError::new(format!("from a server: {e}")))?;
        check_chunk((chunk, values.len() / 4), (c, r.len()))?;
        if let Some(shard) = shard.as_deref_mut() {
            warden_kernels::convert::copy_f32_le(&mut shard[r.clone()], values);
        }
        version = version.min(v);
    }
    Ok(version)
}

/// Worker 0 asks every server (and the scheduler, which then waits for the
/// commit before ending the job) for a checkpoint of the state after `step`
/// steps. Sent before this worker's next push, so in sync mode every server
/// is exactly at `step` when the request arrives.
pub async fn request_checkpoint(links: &mut [Link], sched: &mut super::SchedLink, step: u64) -> Result<(), RoleError> {
    sched.send(&Message::Checkpoint { step }).await?;
    for link in links.iter_mut() {
        // No push, no pull.
        link.frames.clear();
        link.send(Some(step), 0, Due::Ack).await?;
    }
    for link in links.iter_mut() {
        let reply = link.reply().await?;
        link.frames = reply.frames;
        link.splice = reply.splice;
        link.bodies = reply.bodies;
    }
    Ok(())
}
