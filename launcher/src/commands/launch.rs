//! `warden launch JOB --local [--run-dir DIR]`.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cli::{EXIT_FAILED, EXIT_OK, EXIT_STOPPED};
use crate::error::{BoxError, CliError, Context};
use crate::launch::{LaunchError, LaunchOptions, launch, prepare};
use crate::transport::{LocalTransport, Transport, find_agent};

/// Runs a prepared job as processes on this machine.
pub async fn launch_local(
    job: &Path,
    spec: warden_agent::job::spec::JobSpec,
    text: String,
    plan: warden_agent::job::plan::Plan,
    agent: PathBuf,
    opts: LaunchOptions,
) -> Result<crate::launch::Outcome, LaunchError> {
    let for_transport = (spec.clone(), plan.job_id.clone());
    let transport = move |run: &crate::rundir::RunDir| {
        Arc::new(LocalTransport::for_job(agent, &for_transport.0, &for_transport.1, run.nodes_dir()))
            as Arc<dyn Transport>
    };
    launch(job, spec, text, plan, transport, opts).await
}

/// What `warden launch` was asked.
#[derive(Debug, Clone, Default)]
pub struct LaunchArgs {
    /// The job file.
    pub job: PathBuf,
    /// Every process on this machine.
    pub local: bool,
    /// Where to write results.
    pub run_dir: Option<PathBuf>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Trust and record unknown host keys.
    pub accept_new_host_keys: bool,
    /// The earlier run to continue.
    pub resume: Option<PathBuf>,
    /// Stream every process's log lines.
    pub verbose: bool,
    /// Run the launcher in a session of its own and return at once.
    pub detach: bool,
    /// Leave the caller's session before anything else: the launcher that
    /// `--detach` starts, so that no terminal's hangup reaches it.
    pub own_session: bool,
    /// Serve Prometheus figures here while the job runs.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Launches the job and reports how it ended.
pub fn exec(args: &LaunchArgs) -> Result<u8, CliError> {
    let started = std::time::Instant::now();
    if args.own_session {
        nix::unistd::setsid().map_err(|e| CliError::failed(Context::new("cannot start a session of its own", e)))?;
    }
    let LaunchArgs { job, local, .. } = args;
    let (job, local) = (job.as_path(), *local);
    let (spec, text, plan) = prepare(job, local).map_err(CliError::usage)?;
    // [cluster.slurm]: inside an allocation its nodes are the hosts (the
    // spec read them); outside one, submit a launcher to run inside one.
    let slurm_job = match (&spec.cluster.slurm, local) {
        (Some(s), false) => match warden_agent::job::slurm::job_id().map_err(CliError::usage)? {
            Some(id) => Some(id),
            None => return submit(args, &spec, s),
        },
        _ => None,
    };
    if args.detach {
        return detach(args, &spec.name);
    }
    let (agent, runtime) = agent_and_runtime()?;
    let opts = LaunchOptions {
        run_dir: args.run_dir.clone(),
        progress: args.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        epoch_lines: true,
        verbose: args.verbose,
        started: Some(started),
        resume: args.resume.clone(),
        metrics_listen: args.metrics_listen,
    };
    let accept_new_host_keys = args.accept_new_host_keys;
    let result = if local {
        runtime.block_on(launch_local(job, spec, text, plan, agent, opts))
    } else if let Some(slurm_job) = slurm_job {
        eprintln!(
            "warden: inside Slurm job {slurm_job}: {} node(s), agents start as its steps",
            spec.cluster.hosts.len()
        );
        let for_transport = (spec.clone(), plan.job_id.clone());
        let transport = move |run: &crate::rundir::RunDir| {
            let (spec, job) = &for_transport;
            Arc::new(crate::slurm::SlurmTransport::for_job(agent, spec, job, run.nodes_dir(), slurm_job))
                as Arc<dyn Transport>
        };
        runtime.block_on(launch(job, spec.clone(), text, plan, transport, opts))
    } else {
        let connected = ssh_connect(&runtime, &spec, &plan.job_id, &agent, accept_new_host_keys, false);
        let transport = match connected {
            Ok(t) => {
                eprintln!(
                    "warden: {} host(s) connected over SSH, agent in place, in {:.2}s",
                    spec.cluster.hosts.len(),
                    started.elapsed().as_secs_f64()
                );
                Arc::new(t)
            }
            Err(e) if warden_agent::job::preflight::all_hosts_local(&spec) => {
                let hint = format!(
                    "every host of this job is this machine: to run it without SSH, `warden launch {} --local`",
                    job.display()
                );
                return Err(CliError::failed(e).with_trailer(hint));
            }
            Err(e) => return Err(CliError::failed(e)),
        };
        runtime.block_on(launch(job, spec.clone(), text, plan, move |_| transport as Arc<dyn Transport>, opts))
    };
    match result {
        Ok(outcome) => Ok(report(job, local, &outcome)),
        Err(e) => Err(launch_failed(e)),
    }
}

/// `launch --detach`: starts this launch again as a launcher in a session
/// of its own (no terminal, so closing one neither stops nor hangs it),
/// its output in `RUN_DIR/launcher.log`, and returns once it has started
/// the run (or says why it could not).
fn detach(args: &LaunchArgs, name: &str) -> Result<u8, CliError> {
    let (dir, log_path, log) = fresh_run_dir(args, name)?;
    let made = |e| CliError::failed(Context::new(format!("cannot create {}", dir.display()), e));
    let exe = std::env::current_exe().map_err(|e| CliError::failed(Context::new("cannot find this program", e)))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(relaunch_args(args, &dir));
    // It leaves this session itself, first thing (see `LaunchArgs::own_session`).
    cmd.arg("--own-session");
    let err = log.try_clone().map_err(made)?;
    cmd.stdin(std::process::Stdio::null()).stdout(log).stderr(err);
    let mut child = cmd.spawn().map_err(|e| CliError::failed(Context::new("cannot start the launcher", e)))?;
    // Started once its run record is written; an early exit says why in the log.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < until {
        if dir.join(crate::rundir::RUN_RECORD).exists() {
            let d = dir.display();
            eprintln!("detached: launcher pid {} runs the job; its output goes to {}", child.id(), log_path.display());
            eprintln!("  follow:  warden logs {d} -f    status: warden status {d}    stop: warden stop {d}");
            return Ok(EXIT_OK);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(CliError::failed(format!(
                "the launcher exited ({status}) before the run started:\n{}",
                said.trim_end()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(CliError::failed(format!(
        "the launcher (pid {}) has not started the run after 60s; see {}",
        child.id(),
        log_path.display()
    )))
}

/// The run directory a launcher started elsewhere (`--detach`, `sbatch`)
/// will use: absolute, new or empty, made 0700 with its `launcher.log`
/// (0600) in it; the directory, the log's path and the log.
fn fresh_run_dir(args: &LaunchArgs, name: &str) -> Result<(PathBuf, PathBuf, std::fs::File), CliError> {
    let dir = args.run_dir.clone().unwrap_or_else(|| crate::rundir::RunDir::default_path(name));
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(CliError::usage(crate::rundir::RunDirError::InUse(dir)));
    }
    let made = |e| CliError::failed(Context::new(format!("cannot create {}", dir.display()), e));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(made)?;
    let log_path = dir.join(crate::rundir::LAUNCHER_LOG);
    let log = std::fs::OpenOptions::new().create_new(true).append(true).mode(0o600).open(&log_path).map_err(made)?;
    Ok((dir, log_path, log))
}

/// The arguments of this launch for a launcher started elsewhere, into `dir`.
fn relaunch_args(args: &LaunchArgs, dir: &Path) -> Vec<std::ffi::OsString> {
    let job = std::path::absolute(&args.job).unwrap_or_else(|_| args.job.clone());
    let mut out: Vec<std::ffi::OsString> =
        vec!["launch".into(), job.into(), "--run-dir".into(), dir.into(), "--no-progress".into()];
    for (on, flag) in
        [(args.local, "--local"), (args.accept_new_host_keys, "--accept-new-host-keys"), (args.verbose, "--verbose")]
    {
        if on {
            out.push(flag.into());
        }
    }
    if let Some(r) = &args.resume {
        out.push("--resume".into());
        out.push(std::path::absolute(r).unwrap_or_else(|_| r.clone()).into());
    }
    if let Some(addr) = args.metrics_listen {
        out.push("--metrics-listen".into());
        out.push(addr.to_string().into());
    }
    out
}

/// `launch` of a `[cluster.slurm]` job outside an allocation: `sbatch`
/// runs this launch inside one (the launcher on the allocation's first
/// node, its output in `RUN_DIR/launcher.log`), so the job survives logout
/// and shows in `squeue`; prints the Slurm job id and returns at once. The
/// run directory must be on a filesystem the nodes share.
fn submit(
    args: &LaunchArgs,
    spec: &warden_agent::job::spec::JobSpec,
    slurm: &warden_agent::job::slurm::SlurmSpec,
) -> Result<u8, CliError> {
    let name = &spec.name;
    let (dir, log_path, log) = fresh_run_dir(args, name)?;
    drop(log);
    let exe = std::env::current_exe().map_err(|e| CliError::failed(Context::new("cannot find this program", e)))?;
    let mut launch = vec![exe.into_os_string()];
    launch.extend(relaunch_args(args, &dir));
    let script = crate::slurm::batch_script(&launch);
    let script_path = dir.join(crate::slurm::BATCH_SCRIPT);
    let written = |e| CliError::failed(Context::new(format!("cannot write {}", script_path.display()), e));
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o700)
        .open(&script_path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, script.as_bytes()))
        .map_err(written)?;
    let ports = (spec.cluster.port_start, spec.cluster.port_end);
    let id = crate::slurm::sbatch(slurm, ports, name, &log_path, &script_path).map_err(CliError::failed)?;
    crate::slurm::Submitted { job_id: id.clone() }.save(&dir).map_err(CliError::failed)?;
    let d = dir.display();
    eprintln!("submitted: Slurm job {id} runs the launcher inside its allocation (squeue -j {id})");
    eprintln!("  its output goes to {}", log_path.display());
    eprintln!("  follow:  warden logs {d} -f    status: warden status {d}    stop: warden stop {d}");
    Ok(EXIT_OK)
}

/// Says how the job ended and where its results are; returns the exit code.
fn report(job: &Path, local: bool, outcome: &crate::launch::Outcome) -> u8 {
    let s = &outcome.summary;
    let dir = outcome.run_dir.display();
    let results = format!("  results: {dir}/summary.json, {dir}/metrics.csv, logs in {dir}/logs/");
    let model = |s: &crate::rundir::Summary| {
        if let Some(m) = &s.model {
            eprintln!("  model:   {}", m.display());
            if let Some(sig) = &s.signature {
                eprintln!("  signed:  {} (check with: warden verify {dir}/model --pubkey PUB)", sig.display());
            }
        }
    };
    match s.status.as_str() {
        "succeeded" => {
            let accuracy = s.test_accuracy.map(|a| format!(", test accuracy {a:.4}")).unwrap_or_default();
            eprintln!(
                "succeeded: {} epochs, {} steps, train loss {:.4}{accuracy}, in {:.1}s",
                s.epochs,
                s.steps,
                s.train_loss.unwrap_or(f64::NAN),
                s.elapsed_s
            );
            model(s);
            eprintln!("{results}");
            EXIT_OK
        }
        "stopped" => {
            let why = s.stopped.as_deref().unwrap_or("stopped on request");
            match s.model_step {
                Some(step) => eprintln!("stopped: {why}; the model holds the weights after step {step}"),
                None => eprintln!("stopped: {why}; no model was saved"),
            }
            model(s);
            if !s.checkpoints.is_empty() {
                eprintln!(
                    "  resume: warden launch {}{} --resume {dir}",
                    job.display(),
                    if local { " --local" } else { "" }
                );
            }
            eprintln!("{results}");
            EXIT_STOPPED
        }
        _ => {
            eprintln!("failed: {}", s.failure.as_deref().unwrap_or("unknown cause"));
            eprintln!("  details: {dir}/summary.json, logs in {dir}/logs/");
            EXIT_FAILED
        }
    }
}

/// A launch that did not start: bad input (the job file, its data, the run
/// directory, `--resume`) or a failed set-up.
fn launch_failed(e: LaunchError) -> CliError {
    match e {
        LaunchError::Setup { .. } => CliError::failed(e),
        e => CliError::usage(e),
    }
}

/// Removes a job's firewall tables and job directories on every host of
/// `job` over SSH (after its launcher died).
pub fn clean_remote(job: &Path, job_id: &warden_agent::net::identity::JobId, table: &str) -> Result<u8, CliError> {
    let spec = load_job(job)?;
    let plan = warden_agent::job::plan::Plan::new(&spec, job_id, false);
    let (agent, runtime) = agent_and_runtime()?;
    let t = ssh_connect(&runtime, &spec, job_id, &agent, false, true).map_err(CliError::failed)?;
    let errors = runtime.block_on(async {
        let mut errors: Vec<BoxError> = Vec::new();
        let host_job = crate::transport::HostJob { job: job_id.clone(), uids: spec.cluster.uids };
        for host in &plan.hosts {
            // Without the uid: the host finds the job's leases itself.
            match t.teardown_host(host, &host_job, None).await {
                Ok(said) => println!("{}: firewall table {table} removed; {said}", host.name),
                Err(e) => errors.push(Context::new(host.name.clone(), e).into()),
            }
        }
        for p in &plan.processes {
            let _ = t.cleanup(p).await;
        }
        t.finish().await;
        errors
    });
    match errors.is_empty() {
        true => Ok(EXIT_OK),
        false => Err(CliError::several(EXIT_FAILED, errors)),
    }
}

/// `warden doctor JOB`: connects to every host and reports what a job
/// needs; with `--local`, checks this machine the same way, then what
/// `validate` checks here (data, the job's uid reaching its files, keys).
pub fn exec_doctor(job: &Path, accept_new_host_keys: bool, local: bool) -> Result<u8, CliError> {
    let spec = load_job(job)?;
    let reports = if local {
        let agent = find_agent().map_err(CliError::usage)?;
        let report = crate::ssh::check_this_machine(&spec, &agent)
            .map_err(|e| CliError::failed(Context::new("cannot run the checks on this machine", e)))?;
        vec![report]
    } else {
        let (agent, runtime) = agent_and_runtime()?;
        let id = warden_agent::net::identity::JobId::generate();
        ssh_connect(&runtime, &spec, &id, &agent, accept_new_host_keys, true).map_err(CliError::failed)?.reports.clone()
    };
    let mut ok = true;
    for r in &reports {
        for (check, passed, detail) in &r.checks {
            println!("{:<12} {:<9} {:<5} {detail}", r.host, check, if *passed { "ok" } else { "FAIL" });
            ok &= *passed;
        }
    }
    if local {
        let found = warden_agent::job::preflight::check(&spec, true);
        for p in &found.problems {
            println!("{:<12} {:<9} FAIL  {p}", "localhost", "job");
        }
        ok &= found.problems.is_empty();
    }
    Ok(if ok { EXIT_OK } else { EXIT_FAILED })
}

/// What every command that starts agents needs: the agent binary and a
/// runtime.
pub(crate) fn agent_and_runtime() -> Result<(PathBuf, tokio::runtime::Runtime), CliError> {
    let agent = find_agent().map_err(CliError::usage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(Context::new("cannot start the runtime", e)))?;
    Ok((agent, runtime))
}

/// A job file, validated.
fn load_job(job: &Path) -> Result<warden_agent::job::spec::JobSpec, CliError> {
    warden_agent::job::spec::JobSpec::load(job).map(|(spec, _)| spec).map_err(CliError::usage)
}

/// Connects over SSH with a throw-away control directory.
fn ssh_connect(
    runtime: &tokio::runtime::Runtime,
    spec: &warden_agent::job::spec::JobSpec,
    job_id: &warden_agent::net::identity::JobId,
    agent: &Path,
    accept_new_host_keys: bool,
    keep_going: bool,
) -> Result<crate::ssh::SshTransport, crate::ssh::SshError> {
    // The transport removes the directory when it is dropped, after its
    // sessions close.
    let control = crate::ssh::make_control_dir()?;
    let r = runtime.block_on(crate::ssh::SshTransport::connect(
        spec,
        job_id,
        agent,
        accept_new_host_keys,
        &control,
        keep_going,
    ));
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&control);
    }
    r
}
