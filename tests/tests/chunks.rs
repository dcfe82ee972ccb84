//! Pipelined chunks against a real server role: a shard cut into 4 KiB
//! chunks takes a push and answers a pull per chunk, refuses chunk frames a
//! worker may not send or that name no chunk of its shard, and a connection
//! cut in the middle of a chunk leaves nothing half applied: the chunks
//! pushed whole are updated once, the cut one not at all, and the step can
//! be finished from a new connection with exactly one update per chunk.
//! On the worker's side, a step's pushes go out whole from its gradient and
//! every chunk of the answer lands in its place in the parameters; a wrong
//! chunk, a short one, a refusal or a cut connection fail the step, and so
//! does a server that stops reading (the step does not wait for an answer).
//! A step read into memory shared with a program is unharmed by what the
//! program writes there meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use warden_agent::job::spec::{Compression, SyncMode};
use warden_agent::net::conn::{ClientConn, ConnError, connect, read_frame};
use warden_agent::net::identity::Role;
use warden_agent::net::wire::{
    CHUNK_ALIGN, Encoding, HEADER_LEN, Message, PARAMS_CHUNK_HEAD, chunk_ranges, encode_params_chunk,
};
use warden_agent::net::{record, tls};
use warden_agent::train::roles::link::{Gradient, Link, Traffic, close_links, exchange};
use warden_tests::{RoleCluster, TestPki, bind_two};

/// Parameters of the test job: a softmax of 3000 inputs and 2 classes.
const LEN: usize = 3000 * 2 + 2;
/// Floats per 4 KiB chunk.
const CHUNK: usize = 1024;

/// A one-server, one-worker job whose shard is 6 chunks of 4 KiB (the last
/// shorter), with plain SGD at lr 0.5.
async fn chunked_cluster() -> RoleCluster {
    let cluster = RoleCluster::start_on(
        bind_two(),
        "",
        &[("inputs = 4", "inputs = 3000"), ("batch_size = 1", "batch_size = 1\nchunk_kib = 4")],
    )
    .await;
    assert_eq!(cluster.spec.training.chunk_floats(), CHUNK);
    cluster
}

/// The refusal `w` receives next.
async fn refusal(w: &mut ClientConn) -> String {
    match w.recv().await {
        Err(ConnError::Refused { message, .. }) => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The whole shard at `min_version` or later.
async fn pull(w: &mut ClientConn, min_version: u64) -> (u64, Vec<f32>) {
    w.send(&Message::Pull { min_version }).await.unwrap();
    match w.recv().await.unwrap() {
        Message::Params { version, data } => (version, data),
        m => panic!("expected params, got `{}`", m.name()),
    }
}

/// Chunk `chunk` at `min_version` or later.
async fn pull_chunk(w: &mut ClientConn, chunk: u32, min_version: u64) -> (u64, Vec<f32>) {
    w.send(&Message::PullChunk { chunk, min_version }).await.unwrap();
    match w.recv().await.unwrap() {
        Message::ParamsChunk { version, chunk: got, data } => {
            assert_eq!(got, chunk, "the answer is the chunk asked for");
            (version, data)
        }
        m => panic!("expected params_chunk, got `{}`", m.name()),
    }
}

fn push_chunk_frame(step: u64, chunk: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    Message::PushChunk { step, chunk, data: vec![1.0; len] }.encode_frame(&mut f);
    f
}

#[tokio::test]
async fn chunk_frames_a_worker_may_not_send_or_that_name_no_chunk_are_refused() {
    let cluster = chunked_cluster().await;
    let chunks = chunk_ranges(LEN, CHUNK);
    assert_eq!(chunks.len(), 6);

    // A server's answer, sent by a worker.
    let mut w = cluster.worker_conn().await;
    w.send(&Message::ParamsChunk { version: 7, chunk: 0, data: vec![0.0; CHUNK] }).await.unwrap();
    assert_eq!(refusal(&mut w).await, "a worker may not send `params_chunk`");

    // A push to a chunk the shard does not have, and one of the wrong length.
    let mut w = cluster.worker_conn().await;
    w.send_frame(&push_chunk_frame(0, 6, 10)).await.unwrap();
    assert_eq!(refusal(&mut w).await, "chunk 6 asked for, but this shard has 6 chunks");
    let mut w = cluster.worker_conn().await;
    w.send_frame(&push_chunk_frame(0, 1, CHUNK - 1)).await.unwrap();
    assert_eq!(refusal(&mut w).await, "push of 1023 values, but this shard holds 1024");

    // A pull of a chunk the shard does not have (refused by the answering
    // side), and one more than an update ahead (it could wait for ever).
    let mut w = cluster.worker_conn().await;
    w.send(&Message::PullChunk { chunk: 99, min_version: 0 }).await.unwrap();
    assert_eq!(refusal(&mut w).await, "chunk 99 asked for, but this shard has 6 chunks");
    let mut w = cluster.worker_conn().await;
    w.send(&Message::PullChunk { chunk: 0, min_version: 2 }).await.unwrap();
    assert_eq!(refusal(&mut w).await, "pull for version 2, but the shard is at 0");

    // Nothing of it changed the shard: an honest whole-shard step is exact SGD.
    let mut w = cluster.worker_conn().await;
    warden_tests::honest_sgd_step(&mut w, 0).await;
}

#[tokio::test]
async fn a_connection_cut_mid_chunk_leaves_no_half_applied_update() {
    let cluster = chunked_cluster().await;
    let chunks = chunk_ranges(LEN, CHUNK);
    let mut w = cluster.worker_conn().await;
    let (_, before) = pull(&mut w, 0).await;
    assert_eq!(before.len(), LEN);

    // Chunk 0 whole, then half of chunk 1's frame, and the connection is
    // gone without a goodbye.
    let mut frames = push_chunk_frame(0, 0, CHUNK);
    let second = push_chunk_frame(0, 1, CHUNK);
    frames.extend_from_slice(&second[..second.len() / 2]);
    w.send_frame(&frames).await.unwrap();
    drop(w);

    // Chunk 0 took its one update (one worker: each chunk updates when its
    // push is in); chunk 1 was not touched by the half that arrived.
    let mut w = cluster.worker_conn().await;
    let (v0, c0) = pull_chunk(&mut w, 0, 1).await;
    assert_eq!(v0, 1);
    for (b, a) in before[chunks[0].clone()].iter().zip(&c0) {
        assert_eq!((b - 0.5).to_bits(), a.to_bits(), "chunk 0: one SGD step");
    }
    let (v1, c1) = pull_chunk(&mut w, 1, 0).await;
    assert_eq!(v1, 0, "the cut chunk is at the old version");
    assert_eq!(c1, before[chunks[1].clone()], "the cut chunk holds the old values");
    // The whole shard is not at step 1 until every chunk is.
    let (v, _) = pull(&mut w, 0).await;
    assert_eq!(v, 0);

    // Chunk 0 cannot take a second update for the same step...
    w.send_frame(&push_chunk_frame(0, 0, CHUNK)).await.unwrap();
    assert_eq!(refusal(&mut w).await, "push for step 0, but the shard is at step 1");

    // ...and the rest of the step finishes it: every value moved exactly once.
    let mut w = cluster.worker_conn().await;
    let mut frames = Vec::new();
    for (c, r) in chunks.iter().enumerate().skip(1) {
        frames.extend_from_slice(&push_chunk_frame(0, c as u32, r.len()));
    }
    w.send_frame(&frames).await.unwrap();
    let (v, after) = pull(&mut w, 1).await;
    assert_eq!(v, 1);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_eq!((b - 0.5).to_bits(), a.to_bits(), "value {i}: one SGD step");
    }
    warden_tests::honest_sgd_step(&mut w, 1).await;
}

/// A stand-in server on loopback: its listener and TLS configuration.
struct StandIn(tokio::net::TcpListener, Arc<rustls::ServerConfig>);

/// A PKI, a stand-in server of it and its address.
async fn stand_in() -> (TestPki, StandIn, std::net::SocketAddr) {
    let pki = TestPki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = tls::server_config(&pki.issue(Role::Server, 0), &[Role::Worker]).unwrap();
    (pki, StandIn(listener, cfg), addr)
}

impl StandIn {
    /// The stand-in's end of a worker's connection: TLS with the server's
    /// certificate and the welcome a real server sends.
    async fn welcome(self) -> record::TlsStream {
        let (tcp, _) = self.0.accept().await.unwrap();
        let (mut s, _) = record::accept(tcp, self.1).await.unwrap();
        let mut out = Vec::new();
        Message::Welcome.encode_frame(&mut out);
        s.write_all(&out).await.unwrap();
        s.flush().await.unwrap();
        s
    }
}

/// How the stand-in server of [`worker_step_against`] answers a step.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Every chunk, in order.
    Honest,
    /// Chunk 1 where chunk 0 is due.
    WrongChunk,
    /// Chunk 0 one value short.
    Short,
    /// A refusal.
    Refuse,
    /// Half of chunk 0, then the connection ends.
    Cut,
}

/// Floats of the stand-in shard, in chunks of [`CHUNK_ALIGN`]: 4 whole and
/// a shorter last one.
const SHARD: usize = 4 * CHUNK_ALIGN + 44;

/// The value the stand-in server sends for parameter `i`.
fn served(i: usize) -> f32 {
    i as f32 * 0.25 - 7.0
}

/// A worker's step (the built-in worker's path: pushes from its gradient,
/// every chunk's answer read straight into its parameters) against a
/// stand-in server speaking the real protocol over real TLS, answering as
/// `answer` says. Returns what the step gave, the parameters, and the
/// gradient values the server received.
async fn worker_step_against(answer: Answer) -> (Result<(), String>, Vec<f32>, Vec<f32>) {
    let (pki, stand_in, addr) = stand_in().await;
    let server = tokio::spawn(async move {
        let mut s = stand_in.welcome().await;
        let mut out = Vec::new();
        // A push and a pull request per chunk.
        let chunks = chunk_ranges(SHARD, CHUNK_ALIGN);
        let (mut pushed, mut buf) = (vec![f32::NAN; SHARD], Vec::new());
        for _ in 0..2 * chunks.len() {
            assert!(read_frame(&mut s, 1 << 20, &mut buf).await.unwrap());
            if let Message::PushChunk { chunk, data, .. } = Message::decode(&buf).unwrap() {
                pushed[chunks[chunk as usize].clone()].copy_from_slice(&data);
            }
        }
        let chunk_frame = |c: usize, len: usize, out: &mut Vec<u8>| {
            let r = chunks[c].start..chunks[c].start + len;
            encode_params_chunk(1, c as u32, &r.map(served).collect::<Vec<_>>(), out)
        };
        out.clear();
        match answer {
            Answer::Honest => chunks.iter().enumerate().for_each(|(c, r)| chunk_frame(c, r.len(), &mut out)),
            Answer::WrongChunk => chunk_frame(1, CHUNK_ALIGN, &mut out),
            Answer::Short => chunk_frame(0, CHUNK_ALIGN - 1, &mut out),
            Answer::Refuse => Message::Error { message: "not now".into() }.encode_frame(&mut out),
            Answer::Cut => {
                chunk_frame(0, CHUNK_ALIGN, &mut out);
                out.truncate(out.len() / 2);
            }
        }
        s.write_all(&out).await.unwrap();
        s.flush().await.unwrap();
        if matches!(answer, Answer::Cut) {
            // Gone without close_notify, mid-frame.
            drop(s);
        } else {
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s, 1 << 20, &mut rest)).await;
        }
        pushed
    });
    let conn = connect(&pki.issue(Role::Worker, 0), pki.id(Role::Server, 0), addr, 1 << 20, Duration::from_secs(10))
        .await
        .unwrap();
    let mut links = vec![Link::spawn(conn, 0..SHARD, CHUNK_ALIGN)];
    let mut params = vec![0.0f32; SHARD];
    let grad: Gradient = Arc::new((0..SHARD).map(|i| 1.0 / (i as f32 + 1.0)).collect::<Vec<_>>());
    let f32s = Compression { encoding: Encoding::F32, threshold: 0.0 };
    let mut traffic = Traffic::default();
    let step = tokio::time::timeout(
        Duration::from_secs(30),
        exchange(&mut links, &mut params, Some(&grad), SyncMode::Sync, f32s, &mut traffic),
    )
    .await
    .expect("the step ends, one way or the other")
    .map_err(|e| e.message);
    if step.is_ok() {
        let per_chunk = (HEADER_LEN + PARAMS_CHUNK_HEAD) as u64;
        assert_eq!(traffic.pulled, 5 * per_chunk + 4 * SHARD as u64, "bytes pulled, as received");
    }
    close_links(links).await;
    let pushed = server.await.unwrap();
    assert!(
        pushed.iter().zip((*grad).as_ref().iter()).all(|(p, g)| p == g),
        "the server received the gradient, exactly"
    );
    (step, params, pushed)
}

#[tokio::test]
async fn a_worker_reads_each_chunk_into_its_parameters_and_refuses_wrong_answers() {
    let (step, params, _) = worker_step_against(Answer::Honest).await;
    step.unwrap();
    assert!(params.iter().enumerate().all(|(i, &p)| p == served(i)), "every chunk landed in its place");

    let (step, params, _) = worker_step_against(Answer::WrongChunk).await;
    let why = step.unwrap_err();
    assert!(why.contains("server sent chunk 1 of 64 values where chunk 0 of 64 was due"), "{why}");
    assert!(params.iter().all(|&p| p == 0.0), "a wrong chunk is not taken: {:?}", &params[..4]);

    let (step, params, _) = worker_step_against(Answer::Short).await;
    let why = step.unwrap_err();
    assert!(why.contains("server sent chunk 0 of 63 values where chunk 0 of 64 was due"), "{why}");
    assert!(params.iter().all(|&p| p == 0.0), "a short chunk is not taken");

    let (step, _, _) = worker_step_against(Answer::Refuse).await;
    let why = step.unwrap_err();
    assert!(why.contains("not now"), "the server's refusal reaches the worker: {why}");

    let (step, _, _) = worker_step_against(Answer::Cut).await;
    let why = step.unwrap_err();
    assert!(why.contains("close_notify") || why.contains("closed") || why.contains("eof"), "{why}");
}

/// A server that takes the connection and then neither reads nor answers:
/// the worker's sending stalls, and the step fails once the stall timeout
/// passes instead of waiting forever for an answer.
#[tokio::test]
async fn a_step_fails_when_the_server_stops_reading() {
    let (pki, stand_in, addr) = stand_in().await;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _s = stand_in.welcome().await;
        // Holds the connection open, reading nothing, until the test ends.
        let _ = done_rx.await;
    });
    let mut conn =
        connect(&pki.issue(Role::Worker, 0), pki.id(Role::Server, 0), addr, 1 << 20, Duration::from_secs(10))
            .await
            .unwrap();
    conn.set_stall(Duration::from_millis(500));
    // 64 MB of pushes: far more than the sockets' buffers hold.
    let len = 16 << 20;
    let mut links = vec![Link::spawn(conn, 0..len, 1 << 20)];
    let mut params = vec![0.0f32; len];
    let grad: Gradient = Arc::new(vec![1e-3f32; len]);
    let f32s = Compression { encoding: Encoding::F32, threshold: 0.0 };
    let step = tokio::time::timeout(
        Duration::from_secs(20),
        exchange(&mut links, &mut params, Some(&grad), SyncMode::Sync, f32s, &mut Traffic::default()),
    )
    .await
    .expect("the step ends once sending stalls, not waiting for an answer forever");
    let why = step.unwrap_err().message;
    assert!(why.contains("stopped reading"), "{why}");
    let _ = done_tx.send(());
    drop(links);
    server.await.unwrap();
}

/// Floats per chunk of [`scribbled_step`]'s shard (1 MiB), and its chunks.
const BIG_CHUNK: usize = 1 << 18;
const BIG_CHUNKS: usize = 4;

/// Plaintext bytes per TLS record (2^14), as the record layer sends them.
const RECORD: usize = 1 << 14;

/// A step read into memory shared with a program (the KV endpoint's
/// `share`), while another thread, standing in for the program, keeps
/// writing a TLS content type (handshake, 0x16) at every byte where a
/// record's inner content type lands when a record of the answer is opened
/// straight into the destination (each chunk frame sent on its own, so its
/// records start with it), through
/// [`warden_agent::train::roles::link::exchange_into_shared`]. (The same
/// step through the plain [`exchange`] into that memory fails: "truncated
/// TLS handshake message".) Returns what the step gave, and whether every
/// value the thread did not write is the server's.
#[allow(unsafe_code)] // a second mapping of the shared file, written as the program would
async fn scribbled_step() -> (Result<(), String>, bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use warden_agent::train::roles::link::exchange_into_shared;
    use warden_agent::train::shared::Shared;
    let len = BIG_CHUNK * BIG_CHUNKS;
    let (pki, stand_in, addr) = stand_in().await;
    let server = tokio::spawn(async move {
        let mut s = stand_in.welcome().await;
        let mut buf = Vec::new();
        for _ in 0..2 * BIG_CHUNKS {
            assert!(read_frame(&mut s, 8 << 20, &mut buf).await.unwrap());
        }
        let mut out = Vec::new();
        for (c, r) in chunk_ranges(len, BIG_CHUNK).into_iter().enumerate() {
            out.clear();
            encode_params_chunk(1, c as u32, &r.map(served).collect::<Vec<_>>(), &mut out);
            s.write_all(&out).await.unwrap();
            s.flush().await.unwrap();
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s, 1 << 20, &mut rest)).await;
    });
    let conn = connect(&pki.issue(Role::Worker, 0), pki.id(Role::Server, 0), addr, 8 << 20, Duration::from_secs(10))
        .await
        .unwrap();
    let mut links = vec![Link::spawn(conn, 0..len, BIG_CHUNK)];
    let mut shared = Shared::new(len).unwrap();
    let head = HEADER_LEN + PARAMS_CHUNK_HEAD;
    // Byte offsets in the parameters where record k >= 1 of a chunk frame
    // ends (the frame's head rides in its first record).
    let marks: Vec<usize> = (0..BIG_CHUNKS)
        .flat_map(|c| (2..).map(move |k| (c, k * RECORD - head)).take_while(|(_, at)| *at < 4 * BIG_CHUNK))
        .map(|(c, at)| 4 * BIG_CHUNK * c + at)
        .collect();
    let total = 2 * shared.params_offset();
    let map = unsafe {
        nix::sys::mman::mmap(
            None,
            std::num::NonZeroUsize::new(total).unwrap(),
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &shared.fd,
            0,
        )
    }
    .unwrap();
    let params_at = map.as_ptr() as usize + shared.params_offset();
    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = {
        let (stop, marks) = (stop.clone(), marks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for at in &marks {
                    // SAFETY: `at` is inside the parameter region, mapped above.
                    unsafe { std::ptr::write_volatile((params_at + at) as *mut u8, 0x16) };
                }
            }
        })
    };
    let grad: Gradient = Arc::new(vec![1e-3f32; len]);
    let mut traffic = Traffic::default();
    let step = exchange_into_shared(&mut links, &mut shared.params, Some(&grad), SyncMode::Sync, &mut traffic);
    let step = tokio::time::timeout(Duration::from_secs(30), step)
        .await
        .expect("the step ends, one way or the other")
        .map_err(|e| e.message);
    stop.store(true, Ordering::Relaxed);
    scribbler.join().unwrap();
    let written: std::collections::HashSet<usize> = marks.iter().map(|at| at / 4).collect();
    let intact = shared.params.values().iter().enumerate().all(|(i, &v)| written.contains(&i) || v == served(i));
    close_links(links).await;
    let _ = server.await;
    unsafe { nix::sys::mman::munmap(map, total) }.unwrap();
    (step, intact)
}

#[tokio::test]
async fn a_step_into_shared_memory_ignores_what_the_program_writes_there() {
    let (step, intact) = scribbled_step().await;
    step.unwrap();
    assert!(intact, "every value the program did not overwrite is the server's");
}
