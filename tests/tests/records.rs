//! The record layer of the job's connections (`net::record`) on real
//! sockets and real certificates: frames of any size arrive intact both
//! ways and across key updates, it speaks TLS 1.3 with stock rustls in both
//! directions (key updates included), reads of any size get the bytes in
//! order, and a tampered record or a connection cut without close_notify is
//! an error, never data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warden_agent::net::identity::Role;
use warden_agent::net::record::{self, TlsStream};
use warden_agent::net::tls;
use warden_tests::TestPki;

const PATIENCE: Duration = Duration::from_secs(30);

/// Bytes that differ at every offset a record boundary could fall on.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ salt).collect()
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A server (ours) at `l` and a client (ours) dialling `dial`.
async fn pair(pki: &TestPki, l: TcpListener, dial: SocketAddr) -> (TlsStream, TlsStream) {
    let server_cfg = tls::server_config(&pki.issue(Role::Server, 0), &[Role::Worker]).unwrap();
    let client_cfg = tls::client_config(&pki.issue(Role::Worker, 0), pki.id(Role::Server, 0)).unwrap();
    let server = async move {
        let (tcp, _) = l.accept().await.unwrap();
        record::accept(tcp, server_cfg).await.unwrap()
    };
    let client = async move {
        let tcp = TcpStream::connect(dial).await.unwrap();
        record::connect(tcp, client_cfg, tls::server_name(dial.ip())).await.unwrap()
    };
    let ((server, certs), client) =
        tokio::time::timeout(PATIENCE, async { tokio::join!(server, client) }).await.unwrap();
    assert_eq!(tls::peer_identity(&certs).unwrap(), pki.id(Role::Worker, 0), "the server learns the client's identity");
    (server, client)
}

/// Records [`exchange`] sends `data` in: its pieces cut into records of
/// at most 16 KiB.
fn records(data: &[u8]) -> u64 {
    data.chunks(PIECE).map(|p| p.len().div_ceil(1 << 14) as u64).sum()
}

const PIECE: usize = 100_003;

/// Sends `data` on `w` while reading as many bytes from `r`; returns them.
async fn exchange<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(w: &mut W, r: &mut R, data: &[u8]) -> Vec<u8> {
    let mut got = vec![0u8; data.len()];
    let send = async {
        // Uneven writes, so records do not line up with the caller's pieces.
        for piece in data.chunks(PIECE) {
            w.write_all(piece).await.unwrap();
        }
        w.flush().await.unwrap();
    };
    let recv = async { r.read_exact(&mut got).await.unwrap() };
    tokio::time::timeout(PATIENCE, async { tokio::join!(send, recv) }).await.unwrap();
    got
}

#[tokio::test]
async fn frames_arrive_intact_both_ways_at_once_and_across_key_updates() {
    let pki = TestPki::new();
    let (l, addr) = listener().await;
    let (mut server, mut client) = pair(&pki, l, addr).await;
    // A new sending key every three records on both sides.
    server.set_rekey_after(3);
    client.set_rekey_after(3);
    let up = pattern(3_000_017, 0x5a);
    let down = pattern(2_000_003, 0xa5);
    let (mut sr, mut sw) = tokio::io::split(server);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (got_up, got_down) = tokio::join!(exchange(&mut cw, &mut sr, &up), exchange(&mut sw, &mut cr, &down));
    assert!(got_up == up, "client-to-server bytes changed");
    assert!(got_down == down, "server-to-client bytes changed");
    // A new key before every fourth record.
    let updates = |data: &[u8]| (records(data) - 1) / 3;
    let (up_keys, down_keys) = (updates(&up), updates(&down));
    assert!(up_keys > 60 && down_keys > 40);
    let (client_updates, server_updates) = (cr.unsplit(cw).key_updates(), sr.unsplit(sw).key_updates());
    assert_eq!(client_updates, (up_keys, down_keys), "client: key updates (sent, received)");
    assert_eq!(server_updates, (down_keys, up_keys), "server: key updates (sent, received)");
}

#[tokio::test]
async fn close_notify_is_a_clean_end_of_stream() {
    let pki = TestPki::new();
    let (l, addr) = listener().await;
    let (mut server, mut client) = pair(&pki, l, addr).await;
    client.write_all(b"last words").await.unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, server.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(rest, b"last words");
}

#[tokio::test]
async fn a_connection_cut_without_close_notify_is_an_error_not_an_end() {
    let pki = TestPki::new();
    let (l, addr) = listener().await;
    let (mut server, client) = pair(&pki, l, addr).await;
    drop(client);
    let mut rest = Vec::new();
    let err = tokio::time::timeout(PATIENCE, server.read_to_end(&mut rest)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    assert!(err.to_string().contains("close_notify"), "{err}");
}

/// Forwards `from` to `to`; once `tamper` is set, flips one bit in the
/// middle of the next piece it forwards.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    tamper: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if tamper.swap(false, Ordering::SeqCst) {
            buf[n / 2] ^= 0x10;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test]
async fn a_tampered_record_fails_authentication_and_yields_no_data() {
    let pki = TestPki::new();
    let (l, server_addr) = listener().await;
    let (front, front_addr) = listener().await;
    let tamper = Arc::new(AtomicBool::new(false));
    let t = tamper.clone();
    tokio::spawn(async move {
        let (client_side, _) = front.accept().await.unwrap();
        let server_side = TcpStream::connect(server_addr).await.unwrap();
        let (cr, cw) = client_side.into_split();
        let (sr, sw) = server_side.into_split();
        tokio::spawn(relay(sr, cw, Arc::new(AtomicBool::new(false))));
        relay(cr, sw, t).await;
    });
    let (mut server, mut client) = pair(&pki, l, front_addr).await;
    tamper.store(true, Ordering::SeqCst);
    let data = pattern(50_000, 1);
    client.write_all(&data).await.unwrap();
    client.flush().await.unwrap();
    let mut got = vec![0u8; data.len()];
    let err = tokio::time::timeout(PATIENCE, server.read_exact(&mut got)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("bad_record_mac"), "{err}");
    // Records are opened straight into the reader's buffer: the one that
    // failed leaves nothing of its (altered) plaintext there.
    let leaked = got.iter().zip(&data).filter(|&(g, d)| g != d && *g != 0).count();
    assert_eq!(leaked, 0, "bytes of an unauthenticated record reached the reader's buffer");
}

/// Reads of every size around a record's (a 4-byte frame header, a byte,
/// a record and a byte either side, many records) take the in-place and
/// the straight-into-the-buffer paths in turn; the bytes arrive intact.
#[tokio::test]
async fn reads_of_any_size_get_the_bytes_in_order() {
    let pki = TestPki::new();
    let (l, addr) = listener().await;
    let (mut server, mut client) = pair(&pki, l, addr).await;
    let data = pattern(1_500_007, 3);
    let sizes = [4, 1, 16_383, 16_384, 16_385, 100_000, 7, 40_000];
    let send = async {
        client.write_all(&data).await.unwrap();
        client.flush().await.unwrap();
    };
    let recv = async {
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if at == got.len() {
                break;
            }
            let end = (at + size).min(got.len());
            server.read_exact(&mut got[at..end]).await.unwrap();
            at = end;
        }
        got
    };
    let ((), got) = tokio::time::timeout(PATIENCE, async { tokio::join!(send, recv) }).await.unwrap();
    assert!(got == data, "bytes changed or moved");
}

#[tokio::test]
async fn records_interoperate_with_stock_rustls_and_its_key_updates() {
    let pki = TestPki::new();
    let (l, addr) = listener().await;
    let server_cfg = tls::server_config(&pki.issue(Role::Server, 0), &[Role::Worker]).unwrap();
    let client_cfg = tls::client_config(&pki.issue(Role::Worker, 0), pki.id(Role::Server, 0)).unwrap();
    let up = pattern(1_000_001, 7);
    let down = pattern(700_001, 9);

    // rustls' own server (buffered API) against our client.
    let (up2, down2) = (up.clone(), down.clone());
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server_cfg).accept(tcp).await.unwrap();
        let mut got = vec![0u8; up2.len()];
        tls.read_exact(&mut got).await.unwrap();
        assert!(got == up2, "rustls read other bytes than our client sent");
        // Half the answer, a key update of rustls' own, the other half.
        let (a, b) = down2.split_at(down2.len() / 2);
        tls.write_all(a).await.unwrap();
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        tls.write_all(b).await.unwrap();
        tls.shutdown().await.unwrap();
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut client = record::connect(tcp, client_cfg, tls::server_name(addr.ip())).await.unwrap();
    client.set_rekey_after(5);
    client.write_all(&up).await.unwrap();
    client.flush().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut got)).await.unwrap().unwrap();
    assert!(got == down, "our client read other bytes than rustls sent");
    let (sent, received) = client.key_updates();
    assert!(sent >= 12, "1 MB in records of 16 KiB is 62 records: a new key every 5, got {sent}");
    assert_eq!(received, 1, "rustls' one key update");
    tokio::time::timeout(PATIENCE, server).await.unwrap().unwrap();
}
