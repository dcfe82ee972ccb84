//! Authenticated connections: mutual TLS, framing with limits, deadlines and
//! per-message authorization.
//!
//! [`Acceptor::accept`] and [`connect`] are the only ways to get a [`Conn`]; both end
//! with a TLS 1.3 session whose peer identity came from a certificate of
//! this job. On every [`Conn::recv`] the frame length is checked against the
//! job's maximum before a byte of body is allocated, and the message is
//! checked against the roles allowed to send it. A listener holds at most
//! one connection per peer identity: a second one under an identity that is
//! already connected is refused before its welcome.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::time::{Instant, timeout, timeout_at};

use crate::net::identity::{Identity, Role};
use crate::net::record::{self, Socket, TlsStream};
use crate::net::tls::{self, TlsIdentity};
use crate::net::wire::{DecodeError, HEADER_LEN, Message};

/// A connection-level error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake failed (bad or missing certificate, wrong role, TLS 1.2, not TLS at all).
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        /// Where the peer is.
        peer: Endpoint,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer announced a frame above the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// Limit.
        max: u32,
    },
    /// The frame did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The peer's role may not send this message.
    #[error("a {role} may not send `{message}`")]
    Unauthorized {
        /// Sender's role.
        role: Role,
        /// Message name.
        message: &'static str,
    },
    /// A deadline passed.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The peer closed the connection.
    #[error("connection closed by {0}")]
    Closed(String),
    /// The peer sent an error message.
    #[error("{peer} refused: {message}")]
    Refused {
        /// Who.
        peer: String,
        /// Their message.
        message: String,
    },
    /// This process's TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The peer's certificate names no identity of this job.
    #[error(transparent)]
    PeerIdentity(#[from] tls::CertIdentityError),
    /// The port to listen on is taken.
    #[error("port {port} on {ip} is already in use; stop whatever holds it or choose another [cluster] ports range")]
    PortInUse {
        /// The port.
        port: u16,
        /// The address it was to be bound on.
        ip: std::net::IpAddr,
    },
    /// Listening failed for another reason.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer could not be reached before the patience ran out.
    #[error("cannot reach {peer} at {addr}: {source}{}", .addr.hint())]
    Unreachable {
        /// Who was dialled.
        peer: Identity,
        /// Where.
        addr: Endpoint,
        /// The last attempt's error.
        #[source]
        source: std::io::Error,
    },
    /// The listener's first message was not its welcome.
    #[error("expected a welcome, got `{0}`")]
    NoWelcome(&'static str),
    /// The peer's identity already has a connection to this listener.
    #[error(
        "{0} is already connected here; a process connects once, so this second connection under its identity was refused"
    )]
    AlreadyConnected(Identity),
}

/// Why a listener closed a new connection at once: one of its caps is full.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdmitError {
    /// As many connections as `[limits] max_connections` are open.
    #[error("{open} connections open, the limit ([limits] max_connections)")]
    Total {
        /// Connections open.
        open: usize,
    },
    /// As many connections from this address as one source may have.
    #[error("{open} connections open from {from}, the limit per source")]
    PerSource {
        /// Connections open from `from`.
        open: usize,
        /// The source: an IP address, or this host's Unix-domain socket.
        from: String,
    },
}

/// Where a connection comes from or goes to: a TCP address, or the path of
/// a listener's Unix-domain socket on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix-domain socket of this host, and the process at the other end
    /// when known (an accepted connection's peer).
    Local {
        /// The socket's path.
        path: PathBuf,
        /// The peer's process id.
        pid: Option<i32>,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => a.fmt(f),
            Endpoint::Local { path, pid: None } => write!(f, "{}", path.display()),
            Endpoint::Local { path, pid: Some(pid) } => write!(f, "{} (pid {pid})", path.display()),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Endpoint {
        Endpoint::Tcp(a)
    }
}

impl Endpoint {
    /// The key connection caps count under: the IP address, or none for
    /// this host's own socket.
    fn source(&self) -> Option<std::net::IpAddr> {
        match self {
            Endpoint::Tcp(a) => Some(a.ip()),
            Endpoint::Local { .. } => None,
        }
    }

    /// What to do when it cannot be reached, after the cause.
    fn hint(&self) -> &'static str {
        match self {
            Endpoint::Tcp(_) => "",
            // A server binds its socket before it registers, and workers
            // connect after every server has: a missing one is not late.
            Endpoint::Local { .. } => {
                "; a server binds its socket before the job starts, so it was removed or is not where this host's \
                 job directories are; [cluster] same_host = \"tcp\" has workers use the server's port"
            }
        }
    }
}

impl ConnError {
    /// Whether the peer broke the protocol (and is worth telling so before
    /// closing), rather than the connection failing or ending.
    pub fn is_peers_fault(&self) -> bool {
        matches!(
            self,
            ConnError::Unauthorized { .. }
                | ConnError::Decode(_)
                | ConnError::FrameTooLarge { .. }
                | ConnError::Timeout(_)
        )
    }
}

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Largest frame body accepted.
    pub max_frame: u32,
    /// Time from TCP accept to the end of the first message.
    pub first_message: Duration,
    /// Connections open at once, authenticated or not.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_per_source: usize,
    /// How long an authenticated peer may stall mid-frame or stop reading.
    pub stall: Duration,
}

/// Connection slots of one listener: every accepted TCP connection takes one
/// before anything is read from it and gives it back when it closes, so a
/// flood costs the listener a bounded number of sockets and tasks. Each
/// authenticated connection also holds its peer's identity until it closes.
#[derive(Debug, Default)]
struct Slots {
    by_source: std::sync::Mutex<std::collections::HashMap<Option<std::net::IpAddr>, usize>>,
    peers: std::sync::Mutex<std::collections::HashSet<Identity>>,
}

/// A peer identity held by one connection; dropping it frees the identity.
#[derive(Debug)]
struct HeldIdentity {
    slots: std::sync::Arc<Slots>,
    peer: Identity,
}

impl Drop for HeldIdentity {
    fn drop(&mut self) {
        self.slots.peers.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.peer);
    }
}

/// A taken connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    slots: std::sync::Arc<Slots>,
    source: Option<std::net::IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.slots.by_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

/// An authenticated, framed connection.
#[derive(Debug)]
pub struct Conn<S> {
    stream: S,
    peer: Identity,
    max_frame: u32,
    stall: Duration,
    rbuf: FrameBuf,
    wbuf: Vec<u8>,
    /// On an accepted connection: its peer's identity at the listener,
    /// held as long as the connection (or its receiving half) lives.
    held: Option<HeldIdentity>,
}

/// Reads one frame body into `buf`, refusing lengths above `max` before
/// allocating. `Ok(false)` is a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: u32, buf: &mut Vec<u8>) -> Result<bool, ConnError> {
    let mut frame = FrameBuf { bytes: std::mem::take(buf), len: 0 };
    let got = read_frame_within(r, max, &mut frame, None).await;
    frame.bytes.truncate(frame.len);
    *buf = frame.bytes;
    got
}

/// The buffer a connection receives frames into: the frame is
/// `bytes[..len]`. `bytes` never shrinks, so when a connection's frames
/// alternate between sizes (a 2 MiB push, a 20-byte pull request) each is
/// read into memory that is already initialized instead of zeroing the
/// difference again at every large frame.
#[derive(Debug, Default)]
struct FrameBuf {
    bytes: Vec<u8>,
    len: usize,
}

impl FrameBuf {
    /// The last frame received.
    fn frame(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Room for a frame of `len` bytes.
    fn prepare(&mut self, len: usize) -> &mut [u8] {
        if self.bytes.len() < len {
            self.bytes.resize(len, 0);
        }
        self.len = len;
        &mut self.bytes[..len]
    }

    /// Gives the last frame away as exactly its bytes, taking `other`'s
    /// allocation (all of it initialized) for the next one.
    fn swap(&mut self, other: &mut Vec<u8>) {
        std::mem::swap(&mut self.bytes, other);
        other.truncate(self.len);
        self.len = 0;
    }
}

/// [`read_frame`] that waits for the next frame as long as it takes, but
/// once a frame has begun drops a peer that sends nothing more for `stall`
/// (a slow-drip sender holds no buffer and no task for long).
async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    buf: &mut FrameBuf,
    stall: Option<Duration>,
) -> Result<bool, ConnError> {
    let Some(len) = read_len(r, max, stall).await? else {
        return Ok(false);
    };
    // Every byte of the frame is overwritten before anyone looks at it.
    read_full(r, buf.prepare(len), stall).await?;
    Ok(true)
}

/// The length of the next frame, checked against `max` before anything is
/// allocated for it; `None` at a clean end of stream between frames.
async fn read_len<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    stall: Option<Duration>,
) -> Result<Option<usize>, ConnError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let read = r.read(&mut header[got..]);
        let n = match (got, stall) {
            (0, _) | (_, None) => read.await?,
            (_, Some(d)) => timeout(d, read).await.map_err(|_| ConnError::Timeout(STALLED_SENDING))??,
        };
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(ConnError::Decode(DecodeError::TruncatedHeader)) };
        }
        got += n;
    }
    let len = u32::from_le_bytes(header);
    if len > max {
        return Err(ConnError::FrameTooLarge { len: len.into(), max });
    }
    Ok(Some(len as usize))
}

/// [`read_frame_within`] of a frame that has begun, showing `seen` each
/// read's bytes as they arrive (while they are in cache), in order.
async fn read_frame_seen<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    buf: &mut FrameBuf,
    stall: Duration,
    seen: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<bool, ConnError> {
    let Some(len) = read_len(r, max, Some(stall)).await? else {
        return Ok(false);
    };
    fill_seen(r, buf.prepare(len), stall, seen).await?;
    Ok(true)
}

/// Fills `dst` from `r` (part of a frame that has begun).
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, dst: &mut [u8], stall: Option<Duration>) -> Result<(), ConnError> {
    match stall {
        None => Ok(r.read_exact(dst).await.map(drop)?),
        Some(stall) => fill_seen(r, dst, stall, &mut |_| {}).await,
    }
}

/// Fills `dst` from `r`, showing `seen` each read's bytes; a peer that
/// sends nothing for `stall` is given up on.
async fn fill_seen<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [u8],
    stall: Duration,
    seen: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<(), ConnError> {
    let mut filled = 0;
    while filled < dst.len() {
        let n = timeout(stall, r.read(&mut dst[filled..])).await.map_err(|_| ConnError::Timeout(STALLED_SENDING))??;
        if n == 0 {
            return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        seen(&dst[filled..filled + n]);
        filled += n;
    }
    Ok(())
}

fn half_read() -> ConnError {
    ConnError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a frame was left half read"))
}

/// What [`RecvHalf::recv_head`] received.
#[derive(Debug)]
pub enum Split<'a> {
    /// The frame's head; the rest of it is in the destination.
    Head(&'a [u8]),
    /// A frame of another kind or size, whole (nothing went to the
    /// destination).
    Whole(&'a [u8]),
}

const STALLED_SENDING: &str = "waiting for the rest of a frame (the peer stopped sending mid-frame)";
const STALLED_READING: &str = "waiting for the peer to read (it stopped reading)";

/// Writes all of `bytes` and flushes, dropping a peer that takes nothing
/// for `stall` (a peer that stops reading never pins a task or a buffer).
async fn write_within<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8], stall: Duration) -> Result<(), ConnError> {
    write_pieces_within(w, [bytes], stall).await
}

/// [`write_within`] of several pieces one after the other, flushed once.
async fn write_pieces_within<'a, W: AsyncWrite + Unpin>(
    w: &mut W,
    pieces: impl IntoIterator<Item = &'a [u8]>,
    stall: Duration,
) -> Result<(), ConnError> {
    for mut bytes in pieces {
        while !bytes.is_empty() {
            let n = timeout(stall, w.write(bytes)).await.map_err(|_| ConnError::Timeout(STALLED_READING))??;
            if n == 0 {
                return Err(ConnError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            bytes = &bytes[n..];
        }
    }
    timeout(stall, w.flush()).await.map_err(|_| ConnError::Timeout(STALLED_READING))??;
    Ok(())
}

/// How long a peer may stall mid-frame or stop reading before it is
/// dropped, unless [`Conn::set_stall`] says otherwise.
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

/// Decodes a frame body and checks that `from` may send it.
pub fn decode_from(body: &[u8], from: Role) -> Result<Message, ConnError> {
    let msg = Message::decode(body)?;
    if !msg.senders().contains(&from) {
        return Err(ConnError::Unauthorized { role: from, message: msg.name() });
    }
    Ok(msg)
}

/// Checks that `peer` may send the frame `body` without decoding its
/// payload; a peer's `Error` becomes [`ConnError::Refused`].
fn check_raw(body: &[u8], peer: &Identity) -> Result<(), ConnError> {
    let tag = *body.first().ok_or(DecodeError::EmptyFrame)?;
    let (name, senders) = crate::net::wire::tag_info(tag).ok_or(DecodeError::UnknownTag(tag))?;
    if !senders.contains(&peer.role) {
        return Err(ConnError::Unauthorized { role: peer.role, message: name });
    }
    if name == "error"
        && let Ok(Message::Error { message }) = Message::decode(body)
    {
        return Err(ConnError::Refused { peer: peer.to_string(), message });
    }
    Ok(())
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S, peer: Identity, max_frame: u32) -> Self {
        Conn { stream, peer, max_frame, stall: DEFAULT_STALL, rbuf: FrameBuf::default(), wbuf: Vec::new(), held: None }
    }

    /// The authenticated peer.
    pub fn peer(&self) -> &Identity {
        &self.peer
    }

    /// Receives one authorized message. A peer's `Error` becomes [`ConnError::Refused`].
    pub async fn recv(&mut self) -> Result<Message, ConnError> {
        if !read_frame_within(&mut self.stream, self.max_frame, &mut self.rbuf, Some(self.stall)).await? {
            return Err(ConnError::Closed(self.peer.to_string()));
        }
        match decode_from(self.rbuf.frame(), self.peer.role)? {
            Message::Error { message } => Err(ConnError::Refused { peer: self.peer.to_string(), message }),
            m => Ok(m),
        }
    }

    /// Receives one frame whose tag the peer's role may send, without
    /// decoding its payload (for the hot push/pull path). A peer's `Error`
    /// becomes [`ConnError::Refused`].
    pub async fn recv_raw(&mut self) -> Result<&[u8], ConnError> {
        if !read_frame_within(&mut self.stream, self.max_frame, &mut self.rbuf, Some(self.stall)).await? {
            return Err(ConnError::Closed(self.peer.to_string()));
        }
        check_raw(self.rbuf.frame(), &self.peer)?;
        Ok(self.rbuf.frame())
    }

    /// Exchanges the frame [`Conn::recv_raw`] returned last with `other`,
    /// whose allocation the next receive reuses: a large frame leaves the
    /// connection without a copy.
    pub fn swap_frame(&mut self, other: &mut Vec<u8>) {
        self.rbuf.swap(other);
    }

    /// Sends an already encoded frame.
    pub async fn send_frame(&mut self, frame: &[u8]) -> Result<(), ConnError> {
        write_within(&mut self.stream, frame, self.stall).await
    }

    /// How long the peer may stall mid-frame or stop reading before it is
    /// dropped (default [`DEFAULT_STALL`]; roles use the heartbeat timeout).
    pub fn set_stall(&mut self, stall: Duration) {
        self.stall = stall;
    }

    /// Sends one message; returns the bytes of the frame.
    pub async fn send(&mut self, msg: &Message) -> Result<usize, ConnError> {
        self.wbuf.clear();
        msg.encode_frame(&mut self.wbuf);
        write_within(&mut self.stream, &self.wbuf, self.stall).await?;
        Ok(self.wbuf.len())
    }

    /// Closes cleanly (TLS close_notify), best effort, within a second.
    pub async fn close(mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    /// Tells the peer why we are closing, best effort, then closes.
    pub async fn refuse(mut self, why: &str) {
        let _ = timeout(Duration::from_secs(1), async {
            let _ = self.send(&Message::Error { message: why.to_string() }).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    /// Tells the peer what it did wrong when that is a protocol violation
    /// (not when the connection is already gone), then closes.
    pub async fn refuse_for(self, e: &ConnError) {
        if e.is_peers_fault() {
            self.refuse(&e.to_string()).await;
        }
    }

    /// Splits into independently usable halves (for roles that read and
    /// write from different tasks).
    pub fn into_split(self) -> (RecvHalf<tokio::io::ReadHalf<S>>, SendHalf<tokio::io::WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.stream);
        (
            RecvHalf {
                r,
                peer: self.peer.clone(),
                max_frame: self.max_frame,
                stall: self.stall,
                buf: self.rbuf,
                rest: 0,
                _held: self.held,
            },
            SendHalf { w, stall: self.stall, buf: self.wbuf },
        )
    }
}

/// Reading half of a split [`Conn`]; it keeps the peer's identity held at
/// the listener (the reading side notices when the connection ends).
#[derive(Debug)]
pub struct RecvHalf<R> {
    r: R,
    peer: Identity,
    max_frame: u32,
    stall: Duration,
    buf: FrameBuf,
    /// Bytes of the frame [`RecvHalf::recv_head`] began still to be read.
    rest: usize,
    _held: Option<HeldIdentity>,
}

impl<R: AsyncRead + Unpin> RecvHalf<R> {
    /// As [`Conn::recv`].
    pub async fn recv(&mut self) -> Result<Message, ConnError> {
        self.between_frames()?;
        if !read_frame_within(&mut self.r, self.max_frame, &mut self.buf, Some(self.stall)).await? {
            return Err(ConnError::Closed(self.peer.to_string()));
        }
        match decode_from(self.buf.frame(), self.peer.role)? {
            Message::Error { message } => Err(ConnError::Refused { peer: self.peer.to_string(), message }),
            m => Ok(m),
        }
    }
    /// The authenticated peer.
    pub fn peer(&self) -> &Identity {
        &self.peer
    }

    /// As [`Conn::recv_raw`].
    pub async fn recv_raw(&mut self) -> Result<&[u8], ConnError> {
        self.recv_raw_seen(&mut |_| {}).await
    }

    /// [`RecvHalf::recv_raw`] that shows `seen` the frame's bytes in
    /// order as they arrive, each read's while it is in cache (a server
    /// checks a push's values then instead of reading them all again).
    pub async fn recv_raw_seen(&mut self, seen: &mut (dyn FnMut(&[u8]) + Send)) -> Result<&[u8], ConnError> {
        self.between_frames()?;
        if !read_frame_seen(&mut self.r, self.max_frame, &mut self.buf, self.stall, seen).await? {
            return Err(ConnError::Closed(self.peer.to_string()));
        }
        check_raw(self.buf.frame(), &self.peer)?;
        Ok(self.buf.frame())
    }

    /// As [`Conn::swap_frame`].
    pub fn swap_frame(&mut self, other: &mut Vec<u8>) {
        self.buf.swap(other);
    }

    /// Receives the head of a frame of tag `tag`: `head` bytes followed by
    /// exactly `rest` more, which [`RecvHalf::recv_rest`] then reads straight
    /// to where the caller keeps them (values never copied out of a frame),
    /// once the caller has checked the head. The head is authorized as
    /// [`RecvHalf::recv_raw`] authorizes frames; a frame with another tag or
    /// length is received whole instead.
    pub async fn recv_head(&mut self, tag: u8, head: usize, rest: usize) -> Result<Split<'_>, ConnError> {
        self.between_frames()?;
        let stall = Some(self.stall);
        let Some(len) = read_len(&mut self.r, self.max_frame, stall).await? else {
            return Err(ConnError::Closed(self.peer.to_string()));
        };
        let split = head > 0 && len == head + rest;
        read_full(&mut self.r, self.buf.prepare(if split { head } else { len }), stall).await?;
        if split && self.buf.frame()[0] != tag {
            // Not the frame expected (a refusal, say): the rest of it too.
            read_full(&mut self.r, &mut self.buf.prepare(len)[head..], stall).await?;
        }
        check_raw(self.buf.frame(), &self.peer)?;
        if self.buf.len < len {
            self.rest = len - self.buf.len;
            return Ok(Split::Head(self.buf.frame()));
        }
        Ok(Split::Whole(self.buf.frame()))
    }

    /// Reads the next `dst.len()` bytes of the frame whose head
    /// [`RecvHalf::recv_head`] gave into `dst`: all of its rest at once,
    /// or in parts, in order (at most what is left).
    pub async fn recv_rest(&mut self, dst: &mut [u8]) -> Result<(), ConnError> {
        if dst.len() > self.rest {
            // The stream stays mid-frame: every later read refuses.
            return Err(half_read());
        }
        read_full(&mut self.r, dst, Some(self.stall)).await?;
        self.rest -= dst.len();
        Ok(())
    }

    /// Refuses to read a new frame while one is half read.
    fn between_frames(&self) -> Result<(), ConnError> {
        if self.rest == 0 { Ok(()) } else { Err(half_read()) }
    }
}

/// Writing half of a split [`Conn`].
#[derive(Debug)]
pub struct SendHalf<W> {
    w: W,
    stall: Duration,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> SendHalf<W> {
    /// A sending half over `w` that gives up when a peer stops reading
    /// for `stall`.
    #[cfg(test)]
    pub(crate) fn new(w: W, stall: Duration) -> Self {
        SendHalf { w, stall, buf: Vec::new() }
    }

    /// As [`Conn::send`].
    pub async fn send(&mut self, msg: &Message) -> Result<(), ConnError> {
        self.buf.clear();
        msg.encode_frame(&mut self.buf);
        write_within(&mut self.w, &self.buf, self.stall).await
    }

    /// As [`Conn::send_frame`] (any number of whole frames).
    pub async fn send_frame(&mut self, frames: &[u8]) -> Result<(), ConnError> {
        write_within(&mut self.w, frames, self.stall).await
    }

    /// Sends frames given in pieces, in order (frames whose values are
    /// written from where they are, not copied into the frame first).
    pub async fn send_pieces<'a>(&mut self, pieces: impl IntoIterator<Item = &'a [u8]>) -> Result<(), ConnError> {
        write_pieces_within(&mut self.w, pieces, self.stall).await
    }

    /// Closes the sending side cleanly (TLS close_notify), best effort,
    /// within a second.
    pub async fn close(mut self) {
        let _ = timeout(Duration::from_secs(1), self.w.shutdown()).await;
    }

    /// As [`Conn::refuse`].
    pub async fn refuse(mut self, why: &str) {
        let _ = timeout(Duration::from_secs(1), async {
            let _ = self.send(&Message::Error { message: why.to_string() }).await;
            let _ = self.w.shutdown().await;
        })
        .await;
    }
}

/// A server-side TLS connection.
pub type ServerConn = Conn<TlsStream>;
/// A client-side TLS connection.
pub type ClientConn = Conn<TlsStream>;

/// A listening endpoint that admits only given roles of this job.
#[derive(Clone)]
pub struct Acceptor {
    tls: std::sync::Arc<rustls::ServerConfig>,
    limits: ConnLimits,
    slots: std::sync::Arc<Slots>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Acceptor {
    /// An acceptor for `me` admitting peers whose role is in `accept`.
    pub fn new(me: &TlsIdentity, accept: &[Role], limits: ConnLimits) -> Result<Acceptor, ConnError> {
        let config = tls::server_config(me, accept)?;
        Ok(Acceptor { tls: config, limits, slots: Default::default() })
    }

    /// Takes a slot for a connection from `from`, or says which cap is full;
    /// the caller closes the connection at once then.
    pub fn admit(&self, from: impl Into<Endpoint>) -> Result<Slot, AdmitError> {
        let source = from.into().source();
        let mut map = self.slots.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = map.values().sum();
        if total >= self.limits.max_connections {
            return Err(AdmitError::Total { open: total });
        }
        let n = map.entry(source).or_insert(0);
        if *n >= self.limits.max_per_source {
            let from = source.map_or_else(|| "this host's socket".to_string(), |ip| ip.to_string());
            return Err(AdmitError::PerSource { open: *n, from });
        }
        *n += 1;
        Ok(Slot { slots: self.slots.clone(), source })
    }

    /// Holds `peer`'s identity for one connection, unless another holds it.
    fn hold(&self, peer: &Identity) -> Option<HeldIdentity> {
        let mut peers = self.slots.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.insert(peer.clone()).then(|| HeldIdentity { slots: self.slots.clone(), peer: peer.clone() })
    }

    /// Completes the handshake, says welcome and reads the first message,
    /// all within the first-message deadline. The connection's `slot` is
    /// given back once the peer has authenticated: the caps bound what
    /// strangers can hold, and an authenticated peer is one of the job's
    /// processes (each of which a listener serves once).
    pub async fn accept(
        &self,
        sock: impl Into<Socket>,
        from: Endpoint,
        slot: Slot,
    ) -> Result<(ServerConn, Message), ConnError> {
        let deadline = Instant::now() + self.limits.first_message;
        let sock = sock.into();
        if let Socket::Tcp(tcp) = &sock {
            let _ = tcp.set_nodelay(true);
        }
        let (stream, certs) = timeout_at(deadline, record::accept(sock, self.tls.clone()))
            .await
            .map_err(|_| ConnError::Timeout("waiting for the TLS handshake"))?
            .map_err(|source| ConnError::Handshake { peer: from, source })?;
        let peer = tls::peer_identity(&certs)?;
        drop(slot);
        let held = self.hold(&peer);
        let mut conn = Conn::new(stream, peer.clone(), self.limits.max_frame);
        conn.set_stall(self.limits.stall);
        if held.is_none() {
            let e = ConnError::AlreadyConnected(peer);
            conn.refuse(&e.to_string()).await;
            return Err(e);
        }
        conn.held = held;
        conn.send(&Message::Welcome).await?;
        match timeout_at(deadline, conn.recv()).await {
            Ok(Ok(first)) => Ok((conn, first)),
            Ok(Err(e)) => {
                conn.refuse_for(&e).await;
                Err(e)
            }
            Err(_) => {
                let e = ConnError::Timeout("waiting for the first message");
                conn.refuse_for(&e).await;
                Err(e)
            }
        }
    }
}

/// Binds a listener, turning "address in use" into an error that says what to do.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ConnError> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            ConnError::PortInUse { port: addr.port(), ip: addr.ip() }
        } else {
            ConnError::Listen { addr, source: e }
        }
    })
}

/// Connects to `expect` at `addr` and waits for its welcome. Peers start in
/// any order and a listener closes connections beyond its caps before the
/// handshake, so a refused connection or a handshake cut short is tried
/// again with backoff until `patience` runs out; a handshake the peer
/// refused (a certificate, a role) is not.
pub async fn connect(
    me: &TlsIdentity,
    expect: Identity,
    addr: SocketAddr,
    max_frame: u32,
    patience: Duration,
) -> Result<ClientConn, ConnError> {
    connect_to(me, expect, addr, None, max_frame, patience).await
}

/// As [`connect`], through the listener's Unix-domain socket at `path` on
/// this host when one is given. The handshake is the same as over TCP: the
/// listener's certificate is checked for `addr`'s IP address and its
/// identity, and ours is checked by it.
pub async fn connect_to(
    me: &TlsIdentity,
    expect: Identity,
    addr: SocketAddr,
    path: Option<&Path>,
    max_frame: u32,
    patience: Duration,
) -> Result<ClientConn, ConnError> {
    let config = tls::client_config(me, expect.clone())?;
    let deadline = Instant::now() + patience;
    let mut backoff = Duration::from_millis(20);
    let to = path.map_or(Endpoint::Tcp(addr), |p| Endpoint::Local { path: p.to_path_buf(), pid: None });
    loop {
        match connect_once(&config, &expect, addr, &to, max_frame, deadline).await {
            Err(e) if transient(&e) && Instant::now() + backoff < deadline => {
                tracing::debug!("connect to {expect} at {to}: {e}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(ConnError::Io(source)) => return Err(ConnError::Unreachable { peer: expect, addr: to, source }),
            other => return other,
        }
    }
}

/// Whether a failed connection attempt is worth another: nothing listened
/// yet, or the connection was closed before or during the handshake (a
/// full connection cap does that), as opposed to a peer that refused us.
fn transient(e: &ConnError) -> bool {
    use std::io::ErrorKind::*;
    let kind = match e {
        ConnError::Io(e) | ConnError::Handshake { source: e, .. } => e.kind(),
        ConnError::Closed(_) => return true,
        _ => return false,
    };
    // WouldBlock: a Unix-domain listener's backlog is full (where TCP's
    // connect waits). NotFound is not here: see `Endpoint::hint`.
    matches!(
        kind,
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | UnexpectedEof
            | BrokenPipe
            | NotConnected
            | WouldBlock
    )
}

async fn connect_once(
    config: &std::sync::Arc<rustls::ClientConfig>,
    expect: &Identity,
    addr: SocketAddr,
    to: &Endpoint,
    max_frame: u32,
    deadline: Instant,
) -> Result<ClientConn, ConnError> {
    let sock: Socket = match to {
        Endpoint::Tcp(a) => {
            let tcp =
                timeout_at(deadline, TcpStream::connect(a)).await.map_err(|_| ConnError::Timeout("connecting"))??;
            let _ = tcp.set_nodelay(true);
            tcp.into()
        }
        Endpoint::Local { path, .. } => {
            timeout_at(deadline, connect_unix(path)).await.map_err(|_| ConnError::Timeout("connecting"))??.into()
        }
    };
    let stream = timeout_at(
        deadline.max(Instant::now() + Duration::from_secs(10)),
        record::connect(sock, config.clone(), tls::server_name(addr.ip())),
    )
    .await
    .map_err(|_| ConnError::Timeout("waiting for the TLS handshake"))?
    .map_err(|source| ConnError::Handshake { peer: to.clone(), source })?;
    let mut conn = Conn::new(stream, expect.clone(), max_frame);
    // TLS 1.3 lets a refused client believe its first write succeeded; the
    // welcome proves the server accepted our certificate.
    match timeout(Duration::from_secs(30), conn.recv()).await {
        Ok(Ok(Message::Welcome)) => Ok(conn),
        Ok(Ok(other)) => Err(ConnError::NoWelcome(other.name())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ConnError::Timeout("waiting for the welcome")),
    }
}

/// Longest path a Unix-domain socket address holds (`sun_path`, with its
/// terminating zero).
const SUN_PATH: usize = 107;

/// Connects to the Unix-domain socket at `path`. A path longer than a
/// socket address holds is reached through its directory, opened first and
/// named by `/proc/self/fd` (the kernel resolves that name to the directory
/// itself, so the socket reached is the one at `path`).
async fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    let s = connect_unix_at(path).await?;
    widen(&s);
    Ok(s)
}

/// Gives a Unix-domain stream a send buffer of [`UNIX_SNDBUF`], as far as
/// `net.core.wmem_max` allows (208 KiB on a stock host, which the kernel
/// doubles: as fast here as 4 MiB). A Unix stream queues what its sender's
/// buffer holds (the default, 208 KiB, is less than one write of the record
/// layer), and unlike TCP's it does not grow by itself; a failure leaves
/// the default, which is slower but correct.
pub fn widen(s: &impl std::os::fd::AsFd) {
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &UNIX_SNDBUF);
}

/// Send buffer of a Unix-domain stream between a worker and a server.
const UNIX_SNDBUF: usize = 4 << 20;

async fn connect_unix_at(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    if path.as_os_str().as_bytes().len() <= SUN_PATH {
        return UnixStream::connect(path).await;
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a socket path"));
    };
    // O_PATH: the job's directory may be one it can pass through but not
    // read (root's, 0711).
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_DIRECTORY).open(dir)?;
    use std::os::fd::AsRawFd;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    UnixStream::connect(short).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A socket path longer than a socket address holds is bound and
    /// reached through its directory; the socket is 0600 either way; a
    /// stale socket is replaced, a live one, a link or a file refused.
    #[tokio::test]
    async fn unix_sockets_bind_and_connect_at_any_path_length() {
        use crate::host::privfs::{PrivFsError, bind_socket};
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("d".repeat(100));
        std::fs::create_dir(&deep).unwrap();
        for path in [tmp.path().join("s.sock"), deep.join("s.sock")] {
            let long = path.as_os_str().len() > SUN_PATH;
            let l = tokio::net::UnixListener::from_std(bind_socket(&path, None).unwrap()).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{long}");
            let (c, a) = tokio::join!(connect_unix(&path), l.accept());
            let (mut c, (mut a, _)) = (c.unwrap(), a.unwrap());
            c.write_all(b"hi").await.unwrap();
            let mut got = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(&mut a, &mut got).await.unwrap();
            assert_eq!(&got, b"hi", "{long}");
            assert!(matches!(bind_socket(&path, None), Err(PrivFsError::Live(_))), "{long}");
            let (c, a) = tokio::join!(connect_unix(&path), l.accept());
            assert!(c.is_ok() && a.is_ok(), "a refused second bind leaves the live socket serving");
            drop(l);
            bind_socket(&path, None).expect("a socket nothing listens on is replaced");
        }
        let file = tmp.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(matches!(bind_socket(&file, None), Err(PrivFsError::Unexpected { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(bind_socket(&link, None), Err(PrivFsError::Link(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    /// A server's socket that is not there fails a worker's connection at
    /// once, saying what to do, instead of being waited for: servers bind
    /// theirs before the job starts.
    #[tokio::test]
    async fn a_missing_server_socket_fails_at_once_with_a_hint() {
        let job = crate::net::identity::JobId::generate();
        let ca = crate::net::pki::JobCa::new(&job, Duration::from_secs(60)).unwrap();
        let who = Identity { job, role: Role::Worker, rank: 0 };
        let key = crate::net::pki::NodeKey::generate().unwrap();
        let cert = ca.sign_csr(&key.csr_pem(&who).unwrap(), &who, None).unwrap();
        let me = TlsIdentity::new(who.clone(), &cert, key.pkcs8_der(), ca.cert_pem()).unwrap();
        let expect = Identity { role: Role::Server, ..who };
        let tmp = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let missing = tmp.path().join("h-server-0.sock");
        // A patience no test run waits out: only a failure that does not
        // retry returns.
        let r = timeout(
            Duration::from_secs(120),
            connect_to(&me, expect, addr, Some(&missing), 1 << 20, Duration::from_secs(3600)),
        )
        .await
        .expect("a missing socket is not retried");
        let Err(e) = r else { panic!("nothing listens there") };
        assert!(matches!(e, ConnError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("same_host = \"tcp\""), "{e}");
    }

    /// A frame arriving a few bytes at a time is shown to `seen` in order,
    /// every byte of its body once, and lands whole in the buffer.
    #[tokio::test]
    async fn the_bytes_seen_are_the_frames_body_in_order() {
        let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut w, mut r) = tokio::io::duplex(7);
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&(sent.len() as u32).to_le_bytes()).await.unwrap();
            w.write_all(&sent).await.unwrap();
        });
        let (mut buf, mut seen, mut reads) = (FrameBuf::default(), Vec::new(), 0);
        let mut see = |b: &[u8]| {
            seen.extend_from_slice(b);
            reads += 1;
        };
        assert!(read_frame_seen(&mut r, 1 << 20, &mut buf, Duration::from_secs(10), &mut see).await.unwrap());
        writer.await.unwrap();
        assert_eq!(seen, body);
        assert_eq!(buf.frame(), &body[..]);
        assert!(reads > 1000, "read in small pieces ({reads})");
    }
}
