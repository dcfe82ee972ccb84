//! A real scheduler and server role running in this process on loopback,
//! started with one call ([`RoleCluster::start`]), for attacking the
//! server's port exactly as a peer on the network would; loopback ports for
//! it ([`bind_two`], [`bind_at`]) and one honest training step
//! ([`honest_sgd_step`]) to show the server still computes what it should.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warden_agent::job::plan::Plan;
use warden_agent::job::spec::JobSpec;
use warden_agent::net::control::Event;
use warden_agent::net::identity::Role;
use warden_agent::net::wire::Message;
use warden_agent::train::roles::RoleCtx;

use crate::{JobFile, TestPki};

/// Two consecutive free loopback ports, already bound.
pub fn bind_two() -> (std::net::TcpListener, std::net::TcpListener) {
    for _ in 0..200 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if !(1024..65000).contains(&base) {
            continue;
        }
        let (Ok(a), Ok(b)) =
            (std::net::TcpListener::bind(("127.0.0.1", base)), std::net::TcpListener::bind(("127.0.0.1", base + 1)))
        else {
            continue;
        };
        return (a, b);
    }
    panic!("no two consecutive free ports on loopback");
}

/// Two consecutive loopback ports from `base`, bound (for tests that keep
/// to a range of ports of their own).
pub fn bind_at(base: u16) -> (std::net::TcpListener, std::net::TcpListener) {
    let bind =
        |port| std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("127.0.0.1:{port}: {e}"));
    (bind(base), bind(base + 1))
}

/// A real scheduler and server role of a one-server, one-worker job, running
/// in this process. After [`RoleCluster::start`] the job has started (a
/// legitimate worker registered), so the server is serving its port.
pub struct RoleCluster {
    pub pki: TestPki,
    pub spec: JobSpec,
    pub plan: Plan,
    pub server_addr: SocketAddr,
    /// The server's Unix-domain socket, which it serves beside its port
    /// as it does for workers of its own host.
    pub server_socket: std::path::PathBuf,
    pub events: Arc<Mutex<Vec<Event>>>,
    /// The legitimate worker's scheduler connection (kept open).
    pub worker_sched: warden_agent::net::conn::ClientConn,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: crate::Scratch,
}

impl RoleCluster {
    pub async fn start(extra_toml: &str) -> RoleCluster {
        Self::start_on(bind_two(), extra_toml, &[]).await
    }

    /// [`RoleCluster::start`] on the given listeners (scheduler, server),
    /// with each `(from, to)` of `replace` applied to the job file once.
    pub async fn start_on(
        listeners: (std::net::TcpListener, std::net::TcpListener),
        extra_toml: &str,
        replace: &[(&str, &str)],
    ) -> RoleCluster {
        let (l_sched, l_server) = listeners;
        let ports = (l_sched.local_addr().unwrap().port(), l_server.local_addr().unwrap().port());
        let mut text = JobFile::tiny().ports(ports.0, ports.1).append(extra_toml).render();
        for (from, to) in replace {
            assert!(text.contains(from), "{from}");
            text = text.replacen(from, to, 1);
        }
        let spec = JobSpec::parse("role-test.toml", &text, Path::new(".")).expect("valid test job");
        let pki = TestPki::new();
        let plan = Plan::new(&spec, &pki.job, true);
        assert_eq!(plan.scheduler().port, Some(ports.0));
        assert_eq!(plan.get(Role::Server, 0).unwrap().port, Some(ports.1));
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let events = events.clone();
            Arc::new(move |e: Event| events.lock().unwrap().push(e)) as warden_agent::train::roles::EventSink
        };
        let ctx = |role, rank| RoleCtx {
            spec: spec.clone(),
            plan: plan.clone(),
            seed: 1,
            tls: pki.issue(role, rank),
            events: sink.clone(),
            workdir: std::env::temp_dir(),
            checkpoint: None,
            resume: false,
            initial: warden_agent::train::roles::initial_weights(&spec, role, false).unwrap(),
            finish: Default::default(),
        };
        let dir = crate::scratch("role-cluster");
        let server_socket = dir.join("server.sock");
        let local = warden_agent::host::privfs::bind_socket(&server_socket, None).unwrap();
        let mut local = Some(warden_agent::train::roles::Listener::Unix(
            tokio::net::UnixListener::from_std(local).unwrap(),
            server_socket.clone(),
        ));
        let mut tasks = Vec::new();
        for (l, c, is_sched) in [(l_sched, ctx(Role::Scheduler, 0), true), (l_server, ctx(Role::Server, 0), false)] {
            l.set_nonblocking(true).unwrap();
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let local = if is_sched { None } else { local.take() };
            tasks.push(tokio::spawn(async move {
                let r = if is_sched {
                    warden_agent::train::roles::scheduler::run(c, l).await
                } else {
                    warden_agent::train::roles::server::run(c, l, local).await
                };
                if let Err(e) = r {
                    eprintln!("role ended: {e}");
                }
            }));
        }
        let worker = pki.issue(Role::Worker, 0);
        let mut worker_sched = warden_agent::net::conn::connect(
            &worker,
            pki.id(Role::Scheduler, 0),
            plan.scheduler().socket().unwrap(),
            1 << 20,
            Duration::from_secs(10),
        )
        .await
        .expect("the legitimate worker joins");
        worker_sched.send(&Message::Register).await.unwrap();
        assert_eq!(worker_sched.recv().await.unwrap(), Message::Start);
        let server_addr = plan.get(Role::Server, 0).unwrap().socket().unwrap();
        RoleCluster { pki, spec, plan, server_addr, server_socket, events, worker_sched, tasks, _dir: dir }
    }

    /// Connects to the server as the legitimate worker 0. A server holds
    /// one connection per identity, so this waits (up to 10 s) until it has
    /// seen the end of worker 0's previous connection.
    pub async fn worker_conn(&self) -> warden_agent::net::conn::ClientConn {
        self.worker_conn_as(0).await
    }

    /// [`RoleCluster::worker_conn`] with a worker certificate of `rank`
    /// (the plan has only worker 0, but the handshake checks job and role).
    pub async fn worker_conn_as(&self, rank: u32) -> warden_agent::net::conn::ClientConn {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_conn(Role::Worker, rank, Role::Server).await {
                Ok(conn) => return conn,
                Err(warden_agent::net::conn::ConnError::Refused { message, .. })
                    if message.contains("already connected") && Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("a legitimate worker connects: {e}"),
            }
        }
    }

    /// One attempt to connect as `role[rank]` to the scheduler or the server.
    pub async fn try_conn(
        &self,
        role: Role,
        rank: u32,
        to: Role,
    ) -> Result<warden_agent::net::conn::ClientConn, warden_agent::net::conn::ConnError> {
        self.try_conn_with(&self.pki.issue(role, rank), to, false).await
    }

    /// One attempt to connect with credentials `me` to the scheduler or
    /// the server, to the server through its Unix-domain socket if `local`.
    pub async fn try_conn_with(
        &self,
        me: &warden_agent::net::tls::TlsIdentity,
        to: Role,
        local: bool,
    ) -> Result<warden_agent::net::conn::ClientConn, warden_agent::net::conn::ConnError> {
        let addr = if to == Role::Server { self.server_addr } else { self.plan.scheduler().socket().unwrap() };
        let path = (local && to == Role::Server).then_some(self.server_socket.as_path());
        warden_agent::net::conn::connect_to(me, self.pki.id(to, 0), addr, path, 1 << 20, Duration::from_secs(10)).await
    }
}

impl Drop for RoleCluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One honest step on a worker connection `w` from version `step`: pull,
/// push a gradient of ones, pull the update, and check it is exactly SGD
/// with the test job's lr 0.5 (so nothing else changed the parameters or
/// the optimizer).
pub async fn honest_sgd_step(w: &mut warden_agent::net::conn::ClientConn, step: u64) {
    w.send(&Message::Pull { min_version: step }).await.unwrap();
    let Message::Params { version, data: before } = w.recv().await.unwrap() else { panic!("no params") };
    assert_eq!(version, step);
    w.send(&Message::Push { step, data: vec![1.0; before.len()] }).await.unwrap();
    w.send(&Message::Pull { min_version: step + 1 }).await.unwrap();
    let Message::Params { version, data: after } = w.recv().await.unwrap() else { panic!("no params") };
    assert_eq!(version, step + 1);
    for (b, a) in before.iter().zip(&after) {
        assert!((b - 0.5 - a).abs() < 1e-5, "step {step}: expected SGD with lr 0.5: {b} -> {a}");
    }
}

/// Asserts that `r`, a connection attempt under an identity that already
/// has a connection open, was refused for that reason.
pub fn assert_already_connected(
    what: &str,
    r: Result<warden_agent::net::conn::ClientConn, warden_agent::net::conn::ConnError>,
) {
    match r {
        Err(warden_agent::net::conn::ConnError::Refused { message, .. }) => {
            assert!(message.contains("already connected"), "{what}: {message}")
        }
        other => panic!("{what}: a second connection under one identity was not refused: {other:?}"),
    }
}
