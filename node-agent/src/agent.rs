//! The agent process: read the bundle, enrol, run one role, report.
//!
//! Order matters. Everything that needs privileges or must happen before
//! any thread exists (the privilege drop of [`crate::harden`], which acts on
//! the calling thread only) happens in [`prepare`], single-threaded. Only
//! then is the async runtime built, by hand.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use crate::control::{Bundle, Control, Event, MAX_CONTROL_LINE};
use crate::identity::{Identity, Role};
use crate::pki::NodeKey;
use crate::plan::{Plan, PlannedProcess};
use crate::roles::{self, EventSink, RoleCtx, RoleError};
use crate::spec::JobSpec;
use crate::tls::TlsIdentity;

/// Reads one control line of at most [`MAX_CONTROL_LINE`] bytes; `None` at EOF.
pub fn read_control<R: BufRead>(input: &mut R) -> Result<Option<Control>, String> {
    // The bundle may carry the checkpoint key: clear the line once parsed.
    // Room for the longest line from the start: a growing vector would
    // leave uncleared copies behind.
    let mut line = zeroize::Zeroizing::new(Vec::with_capacity(MAX_CONTROL_LINE + 1));
    let n = std::io::Read::take(&mut *input, MAX_CONTROL_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading the control channel: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_CONTROL_LINE {
        return Err(format!("control line longer than {MAX_CONTROL_LINE} bytes"));
    }
    serde_json::from_slice(&line).map(Some).map_err(|e| format!("bad control message: {e}"))
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
}

/// Single-threaded set-up: bundle, spec, plan, key, CSR, certificate,
/// listening socket, data.
pub fn prepare<R: BufRead>(input: &mut R, events: EventSink) -> Result<Prepared, String> {
    let bundle = read_bundle(input)?;
    let spec = JobSpec::parse_with_hosts(&bundle.job_file, &bundle.job_toml, &bundle.base_dir, bundle.hosts.as_deref())
        .map_err(|e| e.to_string())?;
    let plan = Plan::new(&spec, &bundle.job_id, bundle.local);
    let me = Identity { job: bundle.job_id.clone(), role: bundle.role, rank: bundle.rank };
    let planned = plan.get(me.role, me.rank).ok_or_else(|| format!("{me} is not in the job's plan"))?.clone();
    set_process_name(&me);

    // Who training runs as: the job's own uid when we are root, else ourselves.
    let root = crate::harden::started_as_root();
    let user = if root { Some(job_user(&spec, &bundle)?) } else { warn_not_root(&events) };

    let tls = enrol(input, &me, &events)?;

    let owner = user.map(|u| crate::privfs::Owner { uid: u.uid, gid: u.gid });
    crate::privfs::ensure_dir(&bundle.workdir, 0o700, owner).map_err(|e| format!("job directory: {e}"))?;
    let checkpoint = checkpoint_ctx(&spec, &bundle, user)?;
    // Starting weights are read (and verified) before the drop: they are the
    // launching user's, for example in a private run directory.
    let initial = roles::initial_weights(&spec, me.role, bundle.resume)?;
    // A worker's data files are opened now, for the same reason; they are
    // parsed after the drop.
    if me.role == Role::Worker
        && let Some(data) = &spec.data
    {
        crate::data::open_before_drop(data).map_err(|e| e.to_string())?;
    }

    // The point of no return: nothing below runs with privileges, and no
    // thread exists yet, so every thread started later inherits the drop.
    let external = drop_privileges(&spec, &plan, &bundle, &me, user)?;
    let status = crate::harden::verify(root).map_err(|e| e.to_string())?;
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
    };
    let worker_data = match me.role {
        Role::Worker if external.is_none() => Some(roles::worker::load_data(&ctx).map_err(|e| e.message)?),
        _ => None,
    };
    Ok(Prepared { ctx, listener, worker_data, external })
}

/// The first control message, which must be the bundle.
fn read_bundle<R: BufRead>(input: &mut R) -> Result<Bundle, String> {
    match read_control(input)? {
        Some(Control::Bundle(b)) => Ok(*b),
        Some(_) => Err("the first control message must be the bundle".into()),
        None => Err("the launcher closed the control channel before sending the bundle".into()),
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
fn warn_not_root(events: &EventSink) -> Option<crate::harden::JobUser> {
    let message = format!(
        "warden-agent is not running as root: no firewall for this job on this host and no uid of its own; \
         training runs as uid {} with no_new_privs and the seccomp filter",
        nix::unistd::Uid::current()
    );
    tracing::warn!("{message}");
    events(Event::Warning { message });
    None
}

/// Makes a key here, sends its CSR and reads the certificate the launcher's
/// job CA signed.
fn enrol<R: BufRead>(input: &mut R, me: &Identity, events: &EventSink) -> Result<TlsIdentity, String> {
    let key = NodeKey::generate().map_err(|e| e.to_string())?;
    events(Event::Csr { pem: key.csr_pem(me).map_err(|e| e.to_string())? });
    let (cert_pem, ca_pem) = match read_control(input)? {
        Some(Control::Certificate { cert_pem, ca_pem }) => (cert_pem, ca_pem),
        Some(Control::Stop) | None => return Err("stopped by the launcher during enrolment".into()),
        Some(_) => return Err("expected a certificate from the launcher".into()),
    };
    TlsIdentity::new(me.clone(), &cert_pem, key.pkcs8_der(), &ca_pem).map_err(|e| e.to_string())
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
    user: Option<crate::harden::JobUser>,
) -> Result<Option<(std::os::unix::net::UnixListener, std::process::Child)>, String> {
    match (me.role, &spec.worker) {
        (Role::Worker, Some(_)) => {
            crate::harden::drop_identity(user).map_err(|e| e.to_string())?;
            let socket = crate::kv::bind(&bundle.workdir).map_err(|e| e.to_string())?;
            let workers = plan.count(Role::Worker);
            let child = crate::kv::spawn_program(spec, me.rank, workers, &bundle.workdir, bundle.seed)
                .map_err(|e| e.to_string())?;
            crate::harden::install_seccomp_with_child(Some(child.id())).map_err(|e| e.to_string())?;
            Ok(Some((socket, child)))
        }
        _ => {
            crate::harden::drop_privileges(user).map_err(|e| e.to_string())?;
            Ok(None)
        }
    }
}

/// Binds the process's listening socket, if its role has one, and tells the
/// launcher where.
fn listen(planned: &PlannedProcess, events: &EventSink) -> Result<Option<std::net::TcpListener>, String> {
    let Some(addr) = planned.socket() else { return Ok(None) };
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "port {} on {} is already in use; stop whatever holds it or choose another [cluster] ports range",
                addr.port(),
                planned.host
            )
        } else {
            format!("cannot listen on {addr}: {e}")
        }
    })?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    events(Event::Listening { addr: addr.to_string() });
    Ok(Some(l))
}

/// Fail now, not at the end of training, if the job user cannot write
/// where it must (a parent directory it cannot enter, say).
fn check_writable(workdir: &Path, checkpoint: Option<&roles::CheckpointCtx>) -> Result<(), String> {
    let dirs = std::iter::once(("job directory", workdir))
        .chain(checkpoint.iter().map(|ck| ("checkpoint directory", ck.series_dir.as_path())));
    for (what, dir) in dirs {
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        std::fs::write(&probe, b"").and_then(|_| std::fs::remove_file(&probe)).map_err(|e| {
            format!(
                "{what} {} is not writable by the job user: {e}; every parent directory must be enterable by it (chmod o+x)",
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// The job's identity on this host: the uid the launcher leased to the job
/// here (checked against the lease and the job's range), with the primary
/// group of `[cluster] user`.
fn job_user(spec: &JobSpec, bundle: &Bundle) -> Result<crate::harden::JobUser, String> {
    let account = crate::harden::resolve_user(&spec.cluster.user).map_err(|e| e.to_string())?;
    let uid =
        bundle.job_uid.ok_or("the launcher leased this job no uid on this host; a launcher of this version does")?;
    let (first, last) = spec.cluster.uids;
    if !(first..=last).contains(&uid) {
        return Err(format!("uid {uid} is outside the job's [cluster] uids = [{first}, {last}]"));
    }
    crate::jobuid::check_lease(uid, &bundle.job_id).map_err(|e| e.to_string())?;
    Ok(crate::harden::JobUser { uid, gid: account.gid })
}

/// A server's checkpoint set-up: the series directory, made while still
/// privileged and handed to the job's uid (mode 0700, and everything in it
/// when the job resumes a series an earlier job wrote), and the key. Root
/// works here by file descriptor ([`crate::privfs`]): the series may hold
/// what an earlier job's uid planted.
fn checkpoint_ctx(
    spec: &JobSpec,
    bundle: &Bundle,
    user: Option<crate::harden::JobUser>,
) -> Result<Option<roles::CheckpointCtx>, String> {
    let (Some(ck), Role::Server) = (&spec.checkpoint, bundle.role) else {
        return Ok(None);
    };
    let secret = bundle.checkpoint_key.as_ref().ok_or("the launcher sent no checkpoint key to this server")?;
    let series = bundle.checkpoint_series.clone().unwrap_or_else(|| bundle.job_id.clone());
    let series_dir = crate::checkpoint::series_dir(&ck.dir, &series);
    let fail = |e: crate::privfs::PrivFsError| format!("checkpoint directory: {e}");
    match user {
        Some(u) => {
            // A root made here is root's, 0711: job uids pass through it to
            // their series and can neither list it nor plant anything in it.
            crate::privfs::ensure_dir_if_missing(&ck.dir, 0o711, Some(crate::privfs::Owner::ROOT)).map_err(fail)?;
            let owner = crate::privfs::Owner { uid: u.uid, gid: u.gid };
            crate::privfs::hand_over_tree(&series_dir, owner).map_err(fail)?;
        }
        None => {
            crate::privfs::ensure_dir_if_missing(&ck.dir, 0o700, None).map_err(fail)?;
            crate::privfs::ensure_dir(&series_dir, 0o700, None).map_err(fail)?;
        }
    }
    let key = std::sync::Arc::new(crate::checkpoint::CheckpointKey::new(secret));
    Ok(Some(roles::CheckpointCtx { key, series, series_dir }))
}

/// Runs the prepared role to the end.
pub async fn run(p: Prepared) -> Result<(), RoleError> {
    let listener =
        p.listener.map(tokio::net::TcpListener::from_std).transpose().map_err(|e| RoleError::new(e.to_string()))?;
    match p.ctx.me().role {
        Role::Scheduler => roles::scheduler::run(p.ctx, listener.expect("the scheduler listens")).await,
        Role::Server => roles::server::run(p.ctx, listener.expect("servers listen")).await,
        Role::Worker => match p.external {
            Some((socket, child)) => crate::kv::run(p.ctx, socket, child).await,
            None => roles::worker::run(p.ctx, p.worker_data.expect("loaded in prepare")).await,
        },
    }
}
