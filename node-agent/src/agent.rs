//! The agent process: read the bundle, enrol, run one role, report.
//!
//! Order matters. Everything that needs privileges or must happen before
//! any thread exists (the privilege drop of [`crate::host::harden`], which acts on
//! the calling thread only) happens in [`prepare`], single-threaded. Only
//! then is the async runtime built, by hand.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::job::plan::{Plan, PlannedProcess};
use crate::job::spec::JobSpec;
use crate::net::control::{Bundle, Control, Event, MAX_CONTROL_LINE};
use crate::net::identity::{Identity, Role};
use crate::net::pki::NodeKey;
use crate::net::tls::TlsIdentity;
use crate::train::roles::{self, EventSink, RoleCtx, RoleError};

/// The control channel failed or carried something that is not a control message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Reading stdin failed.
    #[error("reading the control channel: {0}")]
    Read(#[source] std::io::Error),
    /// A line longer than [`MAX_CONTROL_LINE`].
    #[error("control line longer than {MAX_CONTROL_LINE} bytes")]
    TooLong,
    /// A line that is not a control message.
    #[error("bad control message: {0}")]
    Bad(#[source] serde_json::Error),
}

/// Why the agent could not get ready to run its role; the launcher is told
/// this text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrepareError {
    /// The control channel failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The first control message was another one.
    #[error("the first control message must be the bundle")]
    NotBundle,
    /// The launcher went away before the bundle.
    #[error("the launcher closed the control channel before sending the bundle")]
    NoBundle,
    /// The bundle's job file does not validate.
    #[error(transparent)]
    Spec(#[from] crate::job::spec::SpecError),
    /// The bundle names a process the plan does not have.
    #[error("{0} is not in the job's plan")]
    NotInPlan(Identity),
    /// The job user, or a step of the privilege drop.
    #[error(transparent)]
    Harden(#[from] crate::host::harden::HardenError),
    /// Started as root, but without a uid for the job.
    #[error("the launcher leased this job no uid on this host; a launcher of this version does")]
    NoUid,
    /// The uid leased is outside the job's range.
    #[error("uid {uid} is outside the job's [cluster] uids = [{first}, {last}]")]
    UidOutOfRange {
        /// The uid.
        uid: u32,
        /// First of the range.
        first: u32,
        /// Last of the range.
        last: u32,
    },
    /// The uid's lease is not this job's.
    #[error(transparent)]
    Lease(#[from] crate::host::jobuid::JobUidError),
    /// The node key or its CSR.
    #[error(transparent)]
    Key(#[from] crate::net::pki::PkiError),
    /// The launcher stopped the job while this agent enrolled.
    #[error("stopped by the launcher during enrolment")]
    StoppedInEnrolment,
    /// The launcher's answer to the CSR was not a certificate.
    #[error("expected a certificate from the launcher")]
    NoCertificate,
    /// The certificate or CA does not make a TLS identity.
    #[error(transparent)]
    Tls(#[from] crate::net::tls::TlsError),
    /// The job directory could not be made.
    #[error("job directory: {0}")]
    JobDir(#[source] crate::host::privfs::PrivFsError),
    /// A server's checkpoint directory could not be made.
    #[error("checkpoint directory: {0}")]
    CheckpointDir(#[source] crate::host::privfs::PrivFsError),
    /// A server of a job with checkpoints got no key.
    #[error("the launcher sent no checkpoint key to this server")]
    NoCheckpointKey,
    /// The `[model] init` weights.
    #[error(transparent)]
    InitialWeights(#[from] crate::store::artifact::ArtifactError),
    /// A worker's data files.
    #[error(transparent)]
    Data(#[from] crate::train::data::DataError),
    /// An external worker's KV socket or program.
    #[error(transparent)]
    Program(#[from] crate::train::kv::ProgramError),
    /// The process's port is taken.
    #[error("port {port} on {host} is already in use; stop whatever holds it or choose another [cluster] ports range")]
    PortInUse {
        /// The port.
        port: u16,
        /// The host's name in the plan.
        host: String,
    },
    /// Listening failed for another reason.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A server's Unix-domain socket could not be bound.
    #[error(
        "cannot bind the server's socket for the workers of its host: {0}; \
         [cluster] same_host = \"tcp\" has them use its port instead"
    )]
    LocalSocket(#[source] crate::host::privfs::PrivFsError),
    /// The listening socket could not be made non-blocking.
    #[error("{0}")]
    Nonblocking(#[source] std::io::Error),
    /// The job user cannot write a directory it must.
    #[error(
        "{what} {} is not writable by the job user: {source}; every parent directory must be enterable by it (chmod o+x)",
        dir.display()
    )]
    NotWritable {
        /// "job directory" or "checkpoint directory".
        what: &'static str,
        /// The directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A worker's data did not load.
    #[error(transparent)]
    WorkerData(RoleError),
}

/// Reads one control line of at most [`MAX_CONTROL_LINE`] bytes; `None` at EOF.
pub fn read_control<R: BufRead>(input: &mut R) -> Result<Option<Control>, ControlError> {
    // The bundle may carry the checkpoint key: clear the line once parsed.
    // Room for the longest line from the start: a growing vector would
    // leave uncleared copies behind.
    let mut line = zeroize::Zeroizing::new(Vec::with_capacity(MAX_CONTROL_LINE + 1));
    let n = std::io::Read::take(&mut *input, MAX_CONTROL_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(ControlError::Read)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_CONTROL_LINE {
        return Err(ControlError::TooLong);
    }
    serde_json::from_slice(&line).map(Some).map_err(ControlError::Bad)
}

/// Writes events as JSON lines on stdout.
pub fn stdout_sink() -> EventSink {
    Arc::new(|e: Event| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", e.to_line());
        let _ = out.flush();
    })
}

/// What [`prepare`] hands to the runtime.
pub struct Prepared {
    ctx: RoleCtx,
    listener: Option<std::net::TcpListener>,
    worker_data: Option<roles::worker::WorkerData>,
    /// An external worker's KV socket and program.
    external: Option<(std::os::unix::net::UnixListener, std::process::Child)>,
    /// A server's Unix-domain socket for the workers of its own host.
    local: Option<(std::os::unix::net::UnixListener, PathBuf)>,
}

impl Prepared {
    /// The flag that [`crate::net::control::Control::Finish`] sets.
    pub fn finish_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.ctx.finish.clone()
    }
}

/// Single-threaded set-up: bundle, spec, plan, key, CSR, certificate,
/// listening socket, data.
pub fn prepare<R: BufRead>(input: &mut R, events: EventSink) -> Result<Prepared, PrepareError> {
    let bundle = read_bundle(input)?;
    // An agent never reads a hostfile or inventory itself (reading one may
    // run an inventory script, and agents run as root): no hosts sent with
    // a list-based job is an error, not a cue to read the list.
    let given = bundle.hosts.as_deref().unwrap_or(&[]);
    let spec = JobSpec::parse_with_hosts(&bundle.job_file, &bundle.job_toml, &bundle.base_dir, Some(given))?;
    let plan = Plan::new(&spec, &bundle.job_id, bundle.local);
    let me = Identity { job: bundle.job_id.clone(), role: bundle.role, rank: bundle.rank };
    let planned = plan.get(me.role, me.rank).ok_or_else(|| PrepareError::NotInPlan(me.clone()))?.clone();
    set_process_name(&me);

    // Who training runs as: the job's own uid when we are root, else ourselves.
    let root = crate::host::harden::started_as_root();
    let user = if root { Some(job_user(&spec, &bundle)?) } else { warn_not_root(&events) };

    let tls = enrol(input, &me, &events)?;

    let owner = user.map(|u| crate::host::privfs::Owner { uid: u.uid, gid: u.gid });
    crate::host::privfs::ensure_dir(&bundle.workdir, 0o700, owner).map_err(PrepareError::JobDir)?;
    let checkpoint = checkpoint_ctx(&spec, &bundle, user)?;
    let local = local_socket(&spec, &plan, &planned, &bundle.workdir, owner)?;
    // Starting weights are read (and verified) before the drop: they are the
    // launching user's, for example in a private run directory.
    let initial = roles::initial_weights(&spec, me.role, bundle.resume)?;
    // A worker's data files are opened now, for the same reason; they are
    // parsed after the drop.
    if me.role == Role::Worker
        && let Some(data) = &spec.data
    {
        crate::train::data::open_before_drop(data)?;
    }

    // The point of no return: nothing below runs with privileges, and no
    // thread exists yet, so every thread started later inherits the drop.
    let external = drop_privileges(&spec, &plan, &bundle, &me, user)?;
    let status = crate::host::harden::verify(root)?;
    tracing::info!(
        "running as uid {} gid {}, no capabilities, no_new_privs, seccomp filter",
        status.uids[0],
        status.gids[0]
    );

    // Bind before anything slow, so a taken port fails the job at once.
    let listener = listen(&planned, &events)?;
    check_writable(&bundle.workdir, checkpoint.as_ref())?;
    let ctx = RoleCtx {
        spec,
        plan,
        seed: bundle.seed,
        tls,
        events,
        workdir: bundle.workdir,
        checkpoint,
        resume: bundle.resume,
        initial,
        finish: Default::default(),
    };
    let worker_data = match me.role {
        Role::Worker if external.is_none() => Some(roles::worker::load_data(&ctx).map_err(PrepareError::WorkerData)?),
        _ => None,
    };
    Ok(Prepared { ctx, listener, worker_data, external, local })
}

/// The first control message, which must be the bundle.
fn read_bundle<R: BufRead>(input: &mut R) -> Result<Bundle, PrepareError> {
    match read_control(input)? {
        Some(Control::Bundle(b)) => Ok(*b),
        Some(_) => Err(PrepareError::NotBundle),
        None => Err(PrepareError::NoBundle),
    }
}

/// `ps` and /proc/PID/comm show which process this is (wd-worker-3);
/// threads started later inherit the name.
fn set_process_name(me: &Identity) {
    let comm = match me.role {
        Role::Scheduler => "wd-scheduler".to_string(),
        role => format!("wd-{role}-{}", me.rank),
    };
    if let Ok(comm) = std::ffi::CString::new(comm) {
        let _ = nix::sys::prctl::set_name(&comm);
    }
}

/// Not root: training runs as this process's own uid, which the launcher
/// is told. Returns no job user.
fn warn_not_root(events: &EventSink) -> Option<crate::host::harden::JobUser> {
    let message = format!(
        "warden-agent is not running as root: no firewall for this job on this host and no uid of its own; \
         training runs as uid {} with no_new_privs and the seccomp filter",
        nix::unistd::Uid::current()
    );
    // The event reaches the terminal once however many agents say it, and
    // the process's log as its `[event]` line.
    events(Event::Warning { message });
    None
}

/// Makes a key here, sends its CSR and reads the certificate the launcher's
/// job CA signed.
fn enrol<R: BufRead>(input: &mut R, me: &Identity, events: &EventSink) -> Result<TlsIdentity, PrepareError> {
    let key = NodeKey::generate()?;
    events(Event::Csr { pem: key.csr_pem(me)? });
    let (cert_pem, ca_pem) = match read_control(input)? {
        Some(Control::Certificate { cert_pem, ca_pem }) => (cert_pem, ca_pem),
        Some(Control::Stop) | None => return Err(PrepareError::StoppedInEnrolment),
        Some(_) => return Err(PrepareError::NoCertificate),
    };
    Ok(TlsIdentity::new(me.clone(), &cert_pem, key.pkcs8_der(), &ca_pem)?)
}

/// Drops to the job user for good, with the seccomp filter. Must run while
/// no thread exists. An external worker starts the user's program between
/// the identity drop and the filter: the job user, no capabilities,
/// no_new_privs; its KV socket and program are returned.
fn drop_privileges(
    spec: &JobSpec,
    plan: &Plan,
    bundle: &Bundle,
    me: &Identity,
    user: Option<crate::host::harden::JobUser>,
) -> Result<Option<(std::os::unix::net::UnixListener, std::process::Child)>, PrepareError> {
    match (me.role, &spec.worker) {
        (Role::Worker, Some(_)) => {
            crate::host::harden::drop_identity(user)?;
            let socket = crate::train::kv::bind(&bundle.workdir)?;
            let ranks = crate::train::kv::WorkerRanks::of(plan, me.rank);
            let child = crate::train::kv::spawn_program(spec, ranks, &bundle.workdir, bundle.seed)?;
            crate::host::harden::install_seccomp_with_child(Some(child.id()))?;
            Ok(Some((socket, child)))
        }
        _ => {
            crate::host::harden::drop_privileges(user)?;
            Ok(None)
        }
    }
}

/// A server's Unix-domain socket for the workers of its own host
/// (`[cluster] same_host = "unix"`), bound before the drop: root makes it
/// in the job's directory, which is root's, so the job's uid (its owner,
/// whose workers connect) cannot remove or replace it.
fn local_socket(
    spec: &JobSpec,
    plan: &Plan,
    me: &PlannedProcess,
    workdir: &Path,
    owner: Option<crate::host::privfs::Owner>,
) -> Result<Option<(std::os::unix::net::UnixListener, PathBuf)>, PrepareError> {
    let serves_own_host = me.role == Role::Server
        && spec.cluster.same_host == crate::job::spec::SameHost::Unix
        && plan.of_role(Role::Worker).iter().any(|w| w.host == me.host);
    let Some(path) = roles::server::local_socket(workdir, me).filter(|_| serves_own_host) else { return Ok(None) };
    let socket = crate::host::privfs::bind_socket(&path, owner).map_err(PrepareError::LocalSocket)?;
    Ok(Some((socket, path)))
}

/// Binds the process's listening socket, if its role has one, and tells the
/// launcher where.
fn listen(planned: &PlannedProcess, events: &EventSink) -> Result<Option<std::net::TcpListener>, PrepareError> {
    let Some(addr) = planned.socket() else { return Ok(None) };
    let l = std::net::TcpListener::bind(addr).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            PrepareError::PortInUse { port: addr.port(), host: planned.host.clone() }
        } else {
            PrepareError::Listen { addr, source }
        }
    })?;
    l.set_nonblocking(true).map_err(PrepareError::Nonblocking)?;
    events(Event::Listening { addr: addr.to_string() });
    Ok(Some(l))
}

/// Fail now, not at the end of training, if the job user cannot write
/// where it must (a parent directory it cannot enter, say).
fn check_writable(workdir: &Path, checkpoint: Option<&roles::CheckpointCtx>) -> Result<(), PrepareError> {
    let dirs = std::iter::once(("job directory", workdir))
        .chain(checkpoint.iter().map(|ck| ("checkpoint directory", ck.series_dir.as_path())));
    for (what, dir) in dirs {
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|source| PrepareError::NotWritable { what, dir: dir.to_path_buf(), source })?;
    }
    Ok(())
}

/// The job's identity on this host: the uid the launcher leased to the job
/// here (checked against the lease and the job's range), with the primary
/// group of `[cluster] user`.
fn job_user(spec: &JobSpec, bundle: &Bundle) -> Result<crate::host::harden::JobUser, PrepareError> {
    let account = crate::host::harden::resolve_user(&spec.cluster.user)?;
    let uid = bundle.job_uid.ok_or(PrepareError::NoUid)?;
    let (first, last) = spec.cluster.uids;
    if !(first..=last).contains(&uid) {
        return Err(PrepareError::UidOutOfRange { uid, first, last });
    }
    crate::host::jobuid::check_lease(uid, &bundle.job_id)?;
    Ok(crate::host::harden::JobUser { uid, gid: account.gid })
}

/// A server's checkpoint set-up: the series directory, made while still
/// privileged and handed to the job's uid (mode 0700, and everything in it
/// when the job resumes a series an earlier job wrote), and the key. Root
/// works here by file descriptor ([`crate::host::privfs`]): the series may hold
/// what an earlier job's uid planted.
fn checkpoint_ctx(
    spec: &JobSpec,
    bundle: &Bundle,
    user: Option<crate::host::harden::JobUser>,
) -> Result<Option<roles::CheckpointCtx>, PrepareError> {
    let (Some(ck), Role::Server) = (&spec.checkpoint, bundle.role) else {
        return Ok(None);
    };
    let secret = bundle.checkpoint_key.as_ref().ok_or(PrepareError::NoCheckpointKey)?;
    let series = bundle.checkpoint_series.clone().unwrap_or_else(|| bundle.job_id.clone());
    let series_dir = crate::store::checkpoint::series_dir(&ck.dir, &series);
    let fail = PrepareError::CheckpointDir;
    match user {
        Some(u) => {
            // A root made here is root's, 0711: job uids pass through it to
            // their series and can neither list it nor plant anything in it.
            crate::host::privfs::ensure_dir_if_missing(&ck.dir, 0o711, Some(crate::host::privfs::Owner::ROOT))
                .map_err(fail)?;
            let owner = crate::host::privfs::Owner { uid: u.uid, gid: u.gid };
            crate::host::privfs::hand_over_tree(&series_dir, owner).map_err(fail)?;
        }
        None => {
            crate::host::privfs::ensure_dir_if_missing(&ck.dir, 0o700, None).map_err(fail)?;
            crate::host::privfs::ensure_dir(&series_dir, 0o700, None).map_err(fail)?;
        }
    }
    let key = std::sync::Arc::new(crate::store::checkpoint::CheckpointKey::new(secret));
    Ok(Some(roles::CheckpointCtx { key, series, series_dir }))
}

/// Runs the prepared role to the end.
pub async fn run(p: Prepared) -> Result<(), RoleError> {
    let listener =
        p.listener.map(tokio::net::TcpListener::from_std).transpose().map_err(|e| RoleError::new(e.to_string()))?;
    match p.ctx.me().role {
        Role::Scheduler => roles::scheduler::run(p.ctx, listener.expect("the scheduler listens")).await,
        Role::Server => {
            let local =
                p.local.map(|(l, path)| tokio::net::UnixListener::from_std(l).map(|l| roles::Listener::Unix(l, path)));
            let local = local.transpose().map_err(|e| RoleError::new(e.to_string()))?;
            roles::server::run(p.ctx, listener.expect("servers listen"), local).await
        }
        Role::Worker => match p.external {
            Some((socket, child)) => crate::train::kv::run(p.ctx, socket, child).await,
            None => roles::worker::run(p.ctx, p.worker_data.expect("loaded in prepare")).await,
        },
    }
}
