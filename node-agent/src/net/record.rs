//! The TLS 1.3 record layer of the job's own connections.
//!
//! rustls does the handshake, certificate checks and key schedule, driven
//! through its unbuffered API ([`accept`], [`connect`]); once the handshake
//! is complete the connection becomes a rustls kernel connection, which
//! keeps the key schedule for key updates, and [`TlsStream`] protects the
//! records itself with aws-lc's TLS 1.3 AEADs (`TlsRecordSealingKey` refuses
//! a nonce that is not larger than the last one).
//!
//! Why not rustls' own record layer: its buffered API reads the socket 4 KiB
//! at a time and copies every byte three times (into a record buffer, into a
//! plaintext queue, out to the caller), and its unbuffered API in this
//! version still queues decrypted records in freshly allocated vectors. The
//! parameter server moves gigabytes a minute through these connections, so
//! here the socket is read up to [`READ_AHEAD`] bytes at a time, a record is
//! decrypted straight from the receive buffer into the caller's buffer when
//! its plaintext fits there (and in place, then copied, when it does not),
//! and records are sealed straight from the caller's bytes into the send
//! buffer, written out many at a time: the AES pass is the copy. This
//! is the split rustls' kernel connection API exists for (kTLS does the same
//! in the kernel; this machine class's kernels do not all offer it).
//!
//! What the layer does, by RFC 8446 section 5: records of at most 2^14
//! plaintext bytes, outer type application_data and version 0x0303, the
//! 5-byte header as additional data, the per-record nonce from the IV and
//! the sequence number, the inner content type after the zero padding.
//! Alerts: close_notify ends the stream cleanly, user_canceled is ignored,
//! anything else fails it; an end of stream without close_notify is an
//! error (truncation). A key update from the peer turns over the receiving
//! key (and, if it asks, the sending one); the sending key is turned over
//! on our own before the cipher suite's confidentiality limit. A
//! NewSessionTicket is dropped (nothing here resumes sessions).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, TlsProtocolId, TlsRecordSealingKey, UnboundKey,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Largest plaintext of one record.
const MAX_PLAINTEXT: usize = 1 << 14;
/// Bytes of a record header.
const HEADER: usize = 5;
/// Bytes of an AES-GCM tag.
const TAG: usize = 16;
/// Largest ciphertext a peer may send in one record (RFC 8446 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Socket bytes asked for per read once a frame is under way.
pub const READ_AHEAD: usize = 256 * 1024;
/// Sealed bytes gathered before they are written to the socket: 32 full
/// records, half a MiB (against 16, fewer writes and fewer wake-ups of the
/// reader gave 5% more steps/s on one host, over TCP and Unix sockets).
const WRITE_BEHIND: usize = 32 * (HEADER + MAX_PLAINTEXT + 1 + TAG);
/// Largest handshake flight buffered (rustls allows 64 KiB messages).
const MAX_HANDSHAKE_BUFFER: usize = 96 * 1024;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;

fn invalid(why: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// The two unbuffered rustls connection types, driven by one handshake loop.
trait Handshaking {
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    type Data;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Handshaking for rustls::server::UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, k) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Server(k)))
    }
}

impl Handshaking for rustls::client::UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
        let (secrets, k) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Kernel::Client(k)))
    }
}

/// The key schedule after the handshake, for key updates.
enum Kernel {
    Server(KernelConnection<ServerConnectionData>),
    Client(KernelConnection<rustls::client::ClientConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Server(k) => k.update_tx_secret(),
            Kernel::Client(k) => k.update_tx_secret(),
        }
    }
    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Server(k) => k.update_rx_secret(),
            Kernel::Client(k) => k.update_rx_secret(),
        }
    }
    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Server(k) => k.negotiated_cipher_suite(),
            Kernel::Client(k) => k.negotiated_cipher_suite(),
        };
        match suite {
            rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            // Only TLS 1.3 is configured; no limit known is the smallest one.
            _ => 1 << 23,
        }
    }
}

/// Runs the handshake of `conn` over `sock`. Returns the bytes read past the
/// handshake (records the peer sent right after it).
async fn handshake<C: Handshaking>(sock: &mut Socket, conn: &mut C) -> io::Result<Vec<u8>> {
    let mut incoming = vec![0u8; 16 * 1024];
    let mut used = 0;
    let mut outgoing = vec![0u8; 16 * 1024];
    let mut out_len = 0;
    loop {
        enum Next {
            Process,
            Read,
            Done,
            Failed(rustls::Error),
        }
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..used]);
        let next = match state {
            Err(e) => Next::Failed(e),
            Ok(ConnectionState::EncodeTlsData(mut data)) => loop {
                match data.encode(&mut outgoing[out_len..]) {
                    Ok(n) => {
                        out_len += n;
                        break Next::Process;
                    }
                    Err(EncodeError::InsufficientSize(e)) => outgoing.resize(out_len + e.required_size, 0),
                    Err(EncodeError::AlreadyEncoded) => break Next::Process,
                }
            },
            Ok(ConnectionState::TransmitTlsData(data)) => {
                sock.write_all(&outgoing[..out_len]).await?;
                out_len = 0;
                data.done();
                Next::Process
            }
            Ok(ConnectionState::BlockedHandshake) => Next::Read,
            Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Ok(other) => return Err(invalid(format!("unexpected TLS state during the handshake: {other:?}"))),
        };
        incoming.copy_within(discard..used, 0);
        used -= discard;
        match next {
            Next::Process => {}
            Next::Failed(e) => {
                // rustls queued an alert for the peer; send it, best effort.
                flush_alerts(sock, conn, &mut incoming[..used]).await;
                return Err(invalid(e));
            }
            Next::Done => {
                incoming.truncate(used);
                return Ok(incoming);
            }
            Next::Read => {
                if used == incoming.len() {
                    if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                        return Err(invalid("handshake messages too large"));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = sock.read(&mut incoming[used..]).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                used += n;
            }
        }
    }
}

/// Sends what rustls queued after a failed handshake (its alert).
async fn flush_alerts<C: Handshaking>(sock: &mut Socket, conn: &mut C, incoming: &mut [u8]) {
    let mut out = vec![0u8; 1024];
    let mut len = 0;
    for _ in 0..4 {
        let UnbufferedStatus { state, .. } = conn.process(incoming);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                if let Ok(n) = data.encode(&mut out[len..]) {
                    len += n;
                }
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                break;
            }
            _ => break,
        }
    }
    if len > 0 {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sock.write_all(&out[..len])).await;
    }
}

/// Completes a server handshake on `sock`. Returns the stream and the peer's
/// certificate chain (checked by the config's verifier).
pub async fn accept(
    sock: impl Into<Socket>,
    config: std::sync::Arc<rustls::ServerConfig>,
) -> io::Result<(TlsStream, Vec<rustls::pki_types::CertificateDer<'static>>)> {
    let mut sock = sock.into();
    let mut conn = rustls::server::UnbufferedServerConnection::new(config).map_err(invalid)?;
    let rest = handshake(&mut sock, &mut conn).await?;
    let certs = conn.peer_certificates().map(|c| c.to_vec()).unwrap_or_default();
    let stream = TlsStream::after(sock, conn, rest)?;
    Ok((stream, certs))
}

/// Completes a client handshake with `name` on `sock`.
pub async fn connect(
    sock: impl Into<Socket>,
    config: std::sync::Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
) -> io::Result<TlsStream> {
    let mut sock = sock.into();
    let mut conn = rustls::client::UnbufferedClientConnection::new(config, name).map_err(invalid)?;
    let rest = handshake(&mut sock, &mut conn).await?;
    TlsStream::after(sock, conn, rest)
}

/// The record protection of one direction: key and sequence number.
struct Keys<K> {
    key: K,
    iv: [u8; 12],
    seq: u64,
}

fn key_parts(secrets: &ConnectionTrafficSecrets) -> io::Result<(&'static aws_lc_rs::aead::Algorithm, &[u8], [u8; 12])> {
    let (alg, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
        _ => return Err(invalid("the negotiated cipher suite is not AES-GCM")),
    };
    let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| invalid("IV of the wrong length"))?;
    Ok((alg, key.as_ref(), iv))
}

impl<K> Keys<K> {
    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }
}

impl Keys<TlsRecordSealingKey> {
    fn sealing((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Self> {
        // aws-lc's TLS 1.3 sealing key learns the IV from its first nonce,
        // which must therefore be sequence number 0.
        if seq != 0 {
            return Err(invalid("sending keys must start at sequence number 0"));
        }
        let (alg, key, iv) = key_parts(&secrets)?;
        let key = TlsRecordSealingKey::new(alg, TlsProtocolId::TLS13, key).map_err(|_| invalid("bad sending key"))?;
        Ok(Keys { key, iv, seq })
    }
}

impl Keys<LessSafeKey> {
    /// Opening needs no TLS-specific key (aws-lc's only checks the nonce
    /// order when sealing); the plain AES-GCM key can also open a record
    /// from one buffer into another.
    fn opening((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Self> {
        let (alg, key, iv) = key_parts(&secrets)?;
        let key = UnboundKey::new(alg, key).map_err(|_| invalid("bad receiving key"))?;
        Ok(Keys { key: LessSafeKey::new(key), iv, seq })
    }
}

/// What a decrypted record turned out to be.
enum Opened {
    /// Application data at this range of the receive buffer.
    Data(std::ops::Range<usize>),
    /// Application data, opened straight into the caller's buffer.
    Given,
    /// Nothing for the reader (an empty record, a ticket, a key update).
    Nothing,
    /// The peer's close_notify.
    Closed,
}

/// The socket under a [`TlsStream`]: TCP, or a Unix-domain stream between
/// two processes of one host (the same records either way).
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain stream socket.
    Unix(UnixStream),
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Socket {
        Socket::Tcp(s)
    }
}

impl From<UnixStream> for Socket {
    fn from(s: UnixStream) -> Socket {
        Socket::Unix(s)
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, data),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An established TLS 1.3 connection; see the module docs.
pub struct TlsStream {
    sock: Socket,
    kernel: Kernel,
    /// Records sent per sending key before it is turned over.
    rekey_after: u64,
    rx: Keys<LessSafeKey>,
    /// Received bytes; `rx_start..rx_end` not yet looked at.
    rx_buf: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// Decrypted application data not yet given to the reader.
    plain: std::ops::Range<usize>,
    /// The peer sent close_notify.
    rx_closed: bool,
    tx: Keys<TlsRecordSealingKey>,
    /// Sealed records in `..tx_end` (the rest is room, allocated once);
    /// `tx_sent..tx_end` not yet written to the socket.
    tx_buf: Vec<u8>,
    tx_end: usize,
    tx_sent: usize,
    /// The peer asked for our sending key to be turned over.
    update_requested: bool,
    /// close_notify is sealed into `tx_buf`.
    tx_closed: bool,
    /// Key updates sent and received.
    updates: (u64, u64),
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("sock", &self.sock).finish_non_exhaustive()
    }
}

impl TlsStream {
    fn after<C: Handshaking>(sock: Socket, conn: C, rest: Vec<u8>) -> io::Result<TlsStream> {
        let (secrets, kernel) = conn.into_kernel().map_err(invalid)?;
        // Turn the sending key over well before the suite's limit (2^24
        // records for AES-GCM, about 270 GB at full records).
        let rekey_after = (kernel.confidentiality_limit() / 2).max(1);
        let mut rx_buf = rest;
        let rx_end = rx_buf.len();
        rx_buf.resize(rx_end.max(READ_AHEAD + HEADER + MAX_CIPHERTEXT), 0);
        Ok(TlsStream {
            sock,
            kernel,
            rekey_after,
            rx: Keys::opening(secrets.rx)?,
            rx_buf,
            rx_start: 0,
            rx_end,
            plain: 0..0,
            rx_closed: false,
            tx: Keys::sealing(secrets.tx)?,
            // Room for a key update and a full record past WRITE_BEHIND.
            tx_buf: vec![0; WRITE_BEHIND + 2 * (HEADER + MAX_PLAINTEXT + 1 + TAG)],
            tx_end: 0,
            tx_sent: 0,
            update_requested: false,
            tx_closed: false,
            updates: (0, 0),
        })
    }

    /// Turns the sending key over after `records` records (tests).
    #[doc(hidden)]
    pub fn set_rekey_after(&mut self, records: u64) {
        self.rekey_after = records.max(1);
    }

    /// Key updates sent and received so far.
    pub fn key_updates(&self) -> (u64, u64) {
        self.updates
    }

    /// The underlying socket.
    pub fn socket(&self) -> &Socket {
        &self.sock
    }

    /// The complete record at `rx_start`, if there is one: its header and
    /// the range of its body (ciphertext and tag) in the receive buffer.
    fn next_record(&self) -> io::Result<Option<([u8; HEADER], std::ops::Range<usize>)>> {
        let avail = &self.rx_buf[self.rx_start..self.rx_end];
        if avail.len() < HEADER {
            return Ok(None);
        }
        let header: [u8; HEADER] = avail[..HEADER].try_into().unwrap_or_default();
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != CONTENT_APPLICATION_DATA || header[1..3] != [3, 3] {
            return Err(invalid(format!(
                "unexpected TLS record (type {}, version {:02x}{:02x})",
                header[0], header[1], header[2]
            )));
        }
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(invalid(format!("TLS record of {len} bytes is out of bounds")));
        }
        if avail.len() < HEADER + len {
            return Ok(None);
        }
        Ok(Some((header, self.rx_start + HEADER..self.rx_start + HEADER + len)))
    }

    /// Opens the complete record at `rx_start`, if there is one: straight
    /// into `out` when its whole inner plaintext fits there, else in place
    /// in the receive buffer.
    fn open_next(&mut self, out: &mut ReadBuf<'_>) -> io::Result<Option<Opened>> {
        let Some((header, body)) = self.next_record()? else {
            return Ok(None);
        };
        self.rx_start = body.end;
        let nonce = self.rx.nonce();
        self.rx.seq += 1;
        let inner_len = body.len() - TAG;
        if out.remaining() >= inner_len {
            // Zeroes only what the caller left uninitialized (frame
            // buffers are initialized: nothing).
            let dst = &mut out.initialize_unfilled_to(inner_len)[..inner_len];
            let (ciphertext, tag) = self.rx_buf[body].split_at(inner_len);
            if self.rx.key.open_separate_gather(nonce, Aad::from(header), ciphertext, tag, dst).is_err() {
                // Unauthenticated plaintext never stays in the caller's
                // buffer (aws-lc clears it too; this does not rely on that).
                dst.fill(0);
                return Err(bad_record_mac());
            }
            let (typ, content) = inner(dst)?;
            return match typ {
                CONTENT_APPLICATION_DATA => {
                    out.advance(content);
                    Ok(Some(if content == 0 { Opened::Nothing } else { Opened::Given }))
                }
                _ => {
                    let content = dst[..content].to_vec();
                    self.on_control(typ, &content).map(Some)
                }
            };
        }
        let plain = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), &mut self.rx_buf[body.clone()])
            .map_err(|_| bad_record_mac())?;
        let (typ, content) = inner(plain)?;
        let content = body.start..body.start + content;
        match typ {
            CONTENT_APPLICATION_DATA => {
                Ok(Some(if content.is_empty() { Opened::Nothing } else { Opened::Data(content) }))
            }
            _ => {
                let content = self.rx_buf[content].to_vec();
                self.on_control(typ, &content).map(Some)
            }
        }
    }

    /// A record that is not application data: an alert or a post-handshake
    /// message (both rare and short).
    fn on_control(&mut self, typ: u8, content: &[u8]) -> io::Result<Opened> {
        match typ {
            CONTENT_ALERT => self.on_alert(content),
            CONTENT_HANDSHAKE => self.on_handshake(content).map(|()| Opened::Nothing),
            t => Err(invalid(format!("unexpected TLS content type {t} after the handshake"))),
        }
    }

    fn on_alert(&mut self, content: &[u8]) -> io::Result<Opened> {
        let &[_level, desc] = content else {
            return Err(invalid("malformed TLS alert"));
        };
        match desc {
            ALERT_CLOSE_NOTIFY => {
                self.rx_closed = true;
                Ok(Opened::Closed)
            }
            ALERT_USER_CANCELED => Ok(Opened::Nothing),
            d => Err(invalid(rustls::Error::AlertReceived(rustls::AlertDescription::from(d)))),
        }
    }

    /// Post-handshake messages: a key update or a session ticket.
    fn on_handshake(&mut self, mut msg: &[u8]) -> io::Result<()> {
        let mut key_update = None;
        while !msg.is_empty() {
            let &[typ, a, b, c, ref rest @ ..] = msg else {
                return Err(invalid("truncated TLS handshake message"));
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            if rest.len() < len {
                return Err(invalid("truncated TLS handshake message"));
            }
            let (body, next) = rest.split_at(len);
            match (typ, body) {
                (HANDSHAKE_KEY_UPDATE, &[req @ (0 | 1)]) if next.is_empty() => key_update = Some(req == 1),
                (HANDSHAKE_NEW_SESSION_TICKET, _) if matches!(self.kernel, Kernel::Client(_)) => {}
                _ => return Err(invalid(format!("unexpected TLS handshake message {typ} after the handshake"))),
            }
            msg = next;
        }
        if let Some(requested) = key_update {
            // Every record after this one is under the next key.
            self.rx = Keys::opening(self.kernel.update_rx().map_err(invalid)?)?;
            self.updates.1 += 1;
            self.update_requested |= requested;
        }
        Ok(())
    }

    /// Seals one record of `content` with inner type `typ` into `tx_buf`,
    /// encrypting straight from `content` (no copy before the cipher).
    fn seal(&mut self, typ: u8, content: &[u8]) -> io::Result<()> {
        debug_assert!(content.len() <= MAX_PLAINTEXT);
        let len = content.len() + 1 + TAG;
        let end = self.tx_end + HEADER + len;
        if self.tx_buf.len() < end {
            self.tx_buf.resize(end, 0);
        }
        let header = [CONTENT_APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let record = &mut self.tx_buf[self.tx_end..end];
        record[..HEADER].copy_from_slice(&header);
        let (body, type_and_tag) = record[HEADER..].split_at_mut(content.len());
        let nonce = self.tx.nonce();
        self.tx
            .key
            .seal_out_of_place_scatter(nonce, Aad::from(header), content, body, &[typ], type_and_tag)
            .map_err(|_| invalid("TLS record sealing failed"))?;
        self.tx.seq += 1;
        self.tx_end = end;
        Ok(())
    }

    /// Before sealing application data: turns the sending key over when the
    /// peer asked or the limit is near.
    fn maybe_rekey(&mut self) -> io::Result<()> {
        if self.update_requested || self.tx.seq >= self.rekey_after {
            self.seal(CONTENT_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0])?;
            self.tx = Keys::sealing(self.kernel.update_tx().map_err(invalid)?)?;
            self.updates.0 += 1;
            self.update_requested = false;
        }
        Ok(())
    }

    /// Writes sealed bytes to the socket until all are out or it would block.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tx_sent < self.tx_end {
            let n = ready!(Pin::new(&mut self.sock).poll_write(cx, &self.tx_buf[self.tx_sent..self.tx_end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx_sent += n;
        }
        self.tx_end = 0;
        self.tx_sent = 0;
        Poll::Ready(Ok(()))
    }
}

fn bad_record_mac() -> io::Error {
    invalid("TLS record failed authentication (bad_record_mac)")
}

/// The content type and content length of a record's inner plaintext
/// (content, content type, zero padding).
fn inner(plain: &[u8]) -> io::Result<(u8, usize)> {
    let Some(at) = plain.iter().rposition(|&b| b != 0) else {
        return Err(invalid("TLS record without a content type"));
    };
    if at > MAX_PLAINTEXT {
        return Err(invalid("TLS record plaintext over 2^14 bytes"));
    }
    Ok((plain[at], at))
}

impl AsyncRead for TlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let wanted = out.remaining();
        if wanted == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !me.plain.is_empty() {
                let n = me.plain.len().min(out.remaining());
                out.put_slice(&me.rx_buf[me.plain.start..me.plain.start + n]);
                me.plain.start += n;
                if out.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if me.rx_closed {
                return Poll::Ready(Ok(()));
            }
            match me.open_next(out)? {
                Some(Opened::Data(range)) => me.plain = range,
                Some(Opened::Given) if out.remaining() == 0 => return Poll::Ready(Ok(())),
                Some(Opened::Given | Opened::Nothing) => {}
                Some(Opened::Closed) => return Poll::Ready(Ok(())),
                None if wanted - out.remaining() >= READ_AHEAD => {
                    // A read's worth is decrypted: hand it over before the
                    // next socket read (a split stream's other half waits
                    // while this one is polled).
                    return Poll::Ready(Ok(()));
                }
                None => {
                    // Need more bytes: keep the partial record, read after it.
                    if me.rx_start == me.rx_end {
                        me.rx_start = 0;
                        me.rx_end = 0;
                    } else if me.rx_buf.len() - me.rx_end < HEADER + MAX_CIPHERTEXT {
                        me.rx_buf.copy_within(me.rx_start..me.rx_end, 0);
                        me.rx_end -= me.rx_start;
                        me.rx_start = 0;
                    }
                    let end = me.rx_end;
                    let mut buf = ReadBuf::new(&mut me.rx_buf[end..]);
                    match Pin::new(&mut me.sock).poll_read(cx, &mut buf) {
                        Poll::Pending if out.remaining() < wanted => return Poll::Ready(Ok(())),
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {}
                    }
                    let n = buf.filled().len();
                    if n == 0 {
                        if out.remaining() < wanted {
                            return Poll::Ready(Ok(()));
                        }
                        // The peer's TCP ended without close_notify: maybe truncated.
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed connection without sending TLS close_notify",
                        )));
                    }
                    me.rx_end += n;
                }
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.tx_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if me.tx_end >= WRITE_BEHIND {
            ready!(me.poll_drain(cx))?;
        }
        let mut taken = 0;
        while taken < data.len() && me.tx_end < WRITE_BEHIND {
            me.maybe_rekey()?;
            let n = (data.len() - taken).min(MAX_PLAINTEXT);
            me.seal(CONTENT_APPLICATION_DATA, &data[taken..taken + n])?;
            taken += n;
        }
        // Start the socket on a record's worth or more; what it cannot take
        // now goes at the next write or flush (a short write, such as a
        // frame's head before its values, waits for what follows it).
        if me.tx_end - me.tx_sent >= MAX_PLAINTEXT
            && let Poll::Ready(Err(e)) = me.poll_drain(cx)
        {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.sock).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if !me.tx_closed {
            me.seal(CONTENT_ALERT, &[1, ALERT_CLOSE_NOTIFY])?;
            me.tx_closed = true;
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.sock).poll_shutdown(cx)
    }
}
