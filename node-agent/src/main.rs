//! `warden-agent`: one process of a warden job. Started by the launcher
//! (locally or over SSH) with the job bundle on stdin; see
//! `warden_agent::net::control` for the protocol.

use std::io::BufRead;
use std::process::ExitCode;

use clap::Parser;
use warden_agent::agent;
use warden_agent::net::control::{Control, Event};
use warden_agent::train::roles::RoleError;

#[derive(Parser)]
#[command(
    name = "warden-agent",
    version,
    about = "Runs one process (scheduler, server or worker) of a warden job.",
    long_about = "Runs one process (scheduler, server or worker) of a warden job.\n\n\
        You do not normally run this yourself: `warden launch` starts one agent per process, \
        locally or over SSH, and speaks to it over stdin/stdout (JSON lines). The agent reads \
        its bundle, sends a certificate signing request for a key it generated, receives its \
        certificate, and runs its role over mutual TLS. It stops when its stdin closes.",
    after_help = "Example (what the launcher does):\n  warden-agent run < bundle.jsonl"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Read the bundle from stdin and run the role it names.
    Run,
    /// The job's nftables table on this host (the launcher runs these as root).
    #[command(subcommand)]
    Firewall(FirewallCmd),
    /// A job's uid, firewall table and files on this host (the launcher runs
    /// these as root before the agents start and after they end).
    #[command(subcommand)]
    Host(HostCmd),
    /// slurmd's Prolog and Epilog: the per-job firewall of warden jobs on a
    /// Slurm cluster (docs/slurm.md says how to install them).
    #[command(subcommand)]
    Slurm(SlurmCmd),
    /// End an agent's process group: SIGTERM, GRACE_MS, then SIGKILL (the
    /// launcher runs this when an agent does not stop on request).
    StopGroup {
        /// The agent's PID (its group's id), from its `process` event.
        pgid: u32,
        /// The agent's start time in clock ticks, from the same event.
        start: u64,
        /// Milliseconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 2000)]
        grace_ms: u64,
        /// The job's uid on this host: only its processes in the group are
        /// signalled, and only while the leader runs as it (or is gone).
        #[arg(long)]
        uid: Option<u32>,
    },
}

#[derive(clap::Subcommand)]
enum HostCmd {
    /// Lease the job a uid of its own and install its firewall table (the
    /// ruleset on stdin, `$job_uid` defined as the uid); prints one JSON
    /// line: {"uid": N, "warning": null}.
    Setup {
        /// The job id.
        #[arg(long)]
        job: String,
        /// The host's name in the plan (recorded in the lease).
        #[arg(long)]
        host: String,
        /// First uid of the range ([cluster] uids).
        #[arg(long)]
        first_uid: u32,
        /// Last uid of the range.
        #[arg(long)]
        last_uid: u32,
    },
    /// End every process of the job's uid, remove its firewall table and
    /// release the uid.
    Teardown {
        /// The job id.
        #[arg(long)]
        job: String,
        /// The uid `setup` leased, if any.
        #[arg(long)]
        uid: Option<u32>,
    },
    /// Write the regular files of DIR to stdout (`LEN NAME` lines, each
    /// followed by the bytes, then `end`), read as UID: no link followed.
    Fetch {
        /// The job's model directory.
        dir: std::path::PathBuf,
        /// Read as this uid (the job's) instead of as root.
        #[arg(long)]
        uid: Option<u32>,
        /// At most this many bytes in all.
        #[arg(long)]
        max_bytes: u64,
    },
}

#[derive(clap::Subcommand)]
enum SlurmCmd {
    /// Run as slurmd's Prolog (root, every node, `PrologFlags=Alloc`): for a
    /// job `warden launch` submitted (comment `warden:ports=A-B`), install
    /// the table admitting only the allocation's nodes to those ports.
    Prolog {
        /// The ports warden jobs may claim on this cluster, `FIRST-LAST`.
        #[arg(long, value_name = "FIRST-LAST")]
        ports: String,
    },
    /// Run as slurmd's Epilog: remove the job's table, if there is one.
    Epilog,
}

fn slurm(cmd: SlurmCmd) -> ExitCode {
    use warden_agent::host::slurm;
    let result = match cmd {
        SlurmCmd::Prolog { ports } => match slurm::parse_range(&ports) {
            Some(allowed) => slurm::JobEnv::from_env().and_then(|env| slurm::prolog(&env, allowed)),
            None => {
                eprintln!("error: --ports must be FIRST-LAST, for example --ports 29500-29999");
                return ExitCode::from(2);
            }
        },
        // The epilog needs only the job id: it runs after every job.
        SlurmCmd::Epilog => match std::env::var("SLURM_JOB_ID") {
            Ok(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => slurm::epilog(&id),
            _ => Err(slurm::PrologError::Env("SLURM_JOB_ID")),
        },
    };
    match result {
        Ok(said) => {
            println!("warden: {said}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: warden: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why a `warden-agent host` command failed.
#[derive(Debug, thiserror::Error)]
enum HostCmdError {
    /// `--job` is not a job id.
    #[error(transparent)]
    Job(#[from] warden_agent::net::identity::IdentityError),
    /// The ruleset on stdin could not be read.
    #[error("reading the ruleset: {0}")]
    Ruleset(#[source] std::io::Error),
    /// `--first-uid` above `--last-uid`.
    #[error("the uid range {first}-{last} is empty")]
    EmptyRange {
        /// First uid.
        first: u32,
        /// Last uid.
        last: u32,
    },
    /// The work on the host failed.
    #[error(transparent)]
    Host(#[from] warden_agent::host::HostError),
    /// The answer could not be written as JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

fn host(cmd: HostCmd) -> ExitCode {
    use std::io::Read;
    use warden_agent::host;
    use warden_agent::net::identity::JobId;
    let result: Result<(), HostCmdError> = (|| match cmd {
        HostCmd::Setup { job, host: name, first_uid, last_uid } => {
            let id = JobId::try_from(job)?;
            let mut rules = String::new();
            std::io::stdin().take(1 << 20).read_to_string(&mut rules).map_err(HostCmdError::Ruleset)?;
            if first_uid > last_uid {
                return Err(HostCmdError::EmptyRange { first: first_uid, last: last_uid });
            }
            let setup = host::setup(&id, &name, (first_uid, last_uid), &rules)?;
            println!("{}", serde_json::to_string(&setup)?);
            Ok(())
        }
        HostCmd::Teardown { job, uid } => {
            let said = host::teardown(&JobId::try_from(job)?, uid)?;
            println!("{said}");
            Ok(())
        }
        HostCmd::Fetch { dir, uid, max_bytes } => {
            if let Some(uid) = uid.filter(|_| warden_agent::host::harden::started_as_root()) {
                host::become_uid(uid)?;
            }
            let mut out = std::io::stdout().lock();
            Ok(host::send_files(&dir, &mut out, max_bytes)?)
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `warden-agent stop-group`: only ever a warden agent's group.
fn stop_group(pgid: u32, start: u64, grace_ms: u64, uid: Option<u32>) -> ExitCode {
    use warden_agent::host::reap;
    // A living leader must be an agent (its binary is warden-agent[-HASH]);
    // with the job's uid, only that uid's processes can be reached anyway.
    if let (None, Ok(exe)) = (uid, std::fs::read_link(format!("/proc/{pgid}/exe")))
        && !exe.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("warden-agent"))
    {
        println!("process {pgid} is not a warden agent ({}); nothing signalled", exe.display());
        return ExitCode::SUCCESS;
    }
    match reap::stop_group(pgid, start, std::time::Duration::from_millis(grace_ms.min(60_000)), uid) {
        Ok(ended) => {
            println!("process group {pgid}: {ended}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(clap::Subcommand)]
enum FirewallCmd {
    /// Load TABLE from the ruleset on stdin (replacing a leftover of the same name).
    Install {
        /// A warden table name (warden_...).
        table: String,
    },
    /// Remove TABLE (no error if absent).
    Remove {
        /// A warden table name (warden_...).
        table: String,
    },
    /// List the warden tables.
    List,
}

fn firewall(cmd: FirewallCmd) -> ExitCode {
    use std::io::Read;
    use warden_agent::host::firewall;
    let result = match cmd {
        FirewallCmd::Install { table } => {
            let mut rules = String::new();
            match std::io::stdin().take(1 << 20).read_to_string(&mut rules) {
                Ok(_) => firewall::install(&table, &rules),
                Err(e) => {
                    eprintln!("error: reading the ruleset: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        FirewallCmd::Remove { table } => firewall::remove(&table),
        FirewallCmd::List => firewall::list().map(|tables| {
            for t in tables {
                println!("{t}");
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Firewall(cmd) => return firewall(cmd),
        Cmd::StopGroup { pgid, start, grace_ms, uid } => return stop_group(pgid, start, grace_ms, uid),
        Cmd::Host(cmd) => return host(cmd),
        Cmd::Slurm(cmd) => return slurm(cmd),
        Cmd::Run => {}
    }
    // Before the key exists: no process of this uid may trace the agent or
    // read its memory (see harden::drop_identity, which says it again).
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("error: cannot clear the dumpable flag: {e}");
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let events = agent::stdout_sink();
    // Its own process group first, so that whatever it starts can be ended with it.
    match warden_agent::host::reap::lead_own_group() {
        Ok((pid, start)) => events(Event::Process { pid, start }),
        Err(e) => tracing::warn!("cannot lead a process group ({e}); the launcher can only close its channel"),
    }
    let mut stdin = warden_agent::net::control::ClearingReader::new(std::io::stdin());
    let prepared = match agent::prepare(&mut stdin, events.clone()) {
        Ok(p) => p,
        Err(e) => {
            let message = e.to_string();
            tracing::error!("{message}");
            events(Event::Failed { message, follows: false });
            return ExitCode::FAILURE;
        }
    };
    // Threads only from here on (see agent::prepare).
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            events(Event::Failed { message: format!("cannot start the runtime: {e}"), follows: false });
            return ExitCode::FAILURE;
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<String>();
    // The control channel stays open for the whole job: EOF or `stop` means
    // the launcher is gone or wants us gone; `finish` asks worker 0 to save
    // its weights first.
    let finish = prepared.finish_flag();
    std::thread::spawn(move || {
        let why = loop {
            match agent::read_control(&mut stdin) {
                Ok(None) => break "the launcher closed the control channel".to_string(),
                Ok(Some(Control::Stop)) => break "stopped by the launcher".to_string(),
                Ok(Some(Control::Finish)) => finish.store(true, std::sync::atomic::Ordering::Relaxed),
                Ok(Some(_)) => continue,
                Err(e) => break e.to_string(),
            }
        };
        let _ = stop_tx.send(why);
        // Ignore further input; the process exits when the role returns.
        for _ in stdin.lines() {}
    });
    let result = runtime.block_on(async move {
        tokio::select! {
            r = agent::run(prepared) => r,
            why = stop_rx => Err(RoleError::follows(why.unwrap_or_else(|_| "control channel failed".to_string()))),
        }
    });
    match result {
        Ok(()) => {
            events(Event::Done);
            ExitCode::SUCCESS
        }
        Err(RoleError { message, follows }) => {
            tracing::error!("{message}");
            events(Event::Failed { message, follows });
            ExitCode::FAILURE
        }
    }
}
