//! `warden launch JOB --local [--run-dir DIR]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cli::{EXIT_FAILED, EXIT_OK};
use crate::error::{BoxError, CliError, Context};
use crate::launch::{LaunchError, LaunchOptions, launch, prepare};
use crate::transport::{LocalTransport, Transport, find_agent};

/// Runs a prepared job as processes on this machine.
pub async fn launch_local(
    job: &Path,
    spec: warden_agent::spec::JobSpec,
    text: String,
    plan: warden_agent::plan::Plan,
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

/// Launches the job and reports how it ended.
pub fn exec(
    job: &Path,
    local: bool,
    run_dir: Option<PathBuf>,
    progress: bool,
    accept_new_host_keys: bool,
    resume: Option<PathBuf>,
) -> Result<u8, CliError> {
    let started = std::time::Instant::now();
    let (spec, text, plan) = prepare(job, local).map_err(CliError::usage)?;
    let (agent, runtime) = agent_and_runtime()?;
    let opts = LaunchOptions {
        run_dir,
        progress: progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        epoch_lines: true,
        started: Some(started),
        resume,
    };
    let result = if local {
        runtime.block_on(launch_local(job, spec, text, plan, agent, opts))
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
            Err(e) => return Err(CliError::failed(e)),
        };
        runtime.block_on(launch(job, spec.clone(), text, plan, move |_| transport as Arc<dyn Transport>, opts))
    };
    match result {
        Ok(outcome) => {
            let s = &outcome.summary;
            let dir = outcome.run_dir.display();
            if s.status == "succeeded" {
                eprintln!(
                    "succeeded: {} epochs, {} steps, train loss {:.4}, test accuracy {:.4}, in {:.1}s",
                    s.epochs,
                    s.steps,
                    s.train_loss.unwrap_or(f64::NAN),
                    s.test_accuracy.unwrap_or(f64::NAN),
                    s.elapsed_s
                );
                if let Some(m) = &s.model {
                    eprintln!("  model:   {}", m.display());
                    if let Some(sig) = &s.signature {
                        eprintln!("  signed:  {} (check with: warden verify {dir}/model --pubkey PUB)", sig.display());
                    }
                }
                eprintln!("  results: {dir}/summary.json, {dir}/metrics.csv, logs in {dir}/logs/");
                Ok(EXIT_OK)
            } else {
                eprintln!("failed: {}", s.failure.as_deref().unwrap_or("unknown cause"));
                eprintln!("  details: {dir}/summary.json, logs in {dir}/logs/");
                Ok(EXIT_FAILED)
            }
        }
        Err(e) => Err(launch_failed(e)),
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
pub fn clean_remote(job: &Path, job_id: &warden_agent::identity::JobId, table: &str) -> Result<u8, CliError> {
    let spec = load_job(job)?;
    let plan = warden_agent::plan::Plan::new(&spec, job_id, false);
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

/// `warden doctor JOB`: connects to every host and reports what a job needs.
pub fn exec_doctor(job: &Path, accept_new_host_keys: bool) -> Result<u8, CliError> {
    let spec = load_job(job)?;
    let (agent, runtime) = agent_and_runtime()?;
    let id = warden_agent::identity::JobId::generate();
    let t = ssh_connect(&runtime, &spec, &id, &agent, accept_new_host_keys, true).map_err(CliError::failed)?;
    let mut ok = true;
    for r in &t.reports {
        for (check, passed, detail) in &r.checks {
            println!("{:<12} {:<9} {:<5} {detail}", r.host, check, if *passed { "ok" } else { "FAIL" });
            ok &= *passed;
        }
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
fn load_job(job: &Path) -> Result<warden_agent::spec::JobSpec, CliError> {
    warden_agent::spec::JobSpec::load(job).map(|(spec, _)| spec).map_err(CliError::usage)
}

/// Connects over SSH with a throw-away control directory.
fn ssh_connect(
    runtime: &tokio::runtime::Runtime,
    spec: &warden_agent::spec::JobSpec,
    job_id: &warden_agent::identity::JobId,
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
