//! `warden launch JOB --local [--run-dir DIR]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cli::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::launch::{LaunchError, LaunchOptions, launch, prepare};
use crate::transport::{LocalTransport, Transport, find_agent};

/// Launches the job and reports how it ended.
pub fn exec(job: &Path, local: bool, run_dir: Option<PathBuf>, progress: bool, accept_new_host_keys: bool) -> u8 {
    let started = std::time::Instant::now();
    let (spec, text, plan) = match prepare(job, local) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let agent = match find_agent() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return EXIT_FAILED;
        }
    };
    let opts = LaunchOptions {
        run_dir,
        progress: progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        epoch_lines: true,
        started: Some(started),
    };
    let result = if local {
        runtime.block_on(launch(
            job,
            spec,
            text,
            plan,
            move |run| Arc::new(LocalTransport::new(agent, run.nodes_dir())) as Arc<dyn Transport>,
            opts,
        ))
    } else {
        // Control sockets need short paths (108 bytes at most).
        let control = std::env::temp_dir().join(format!("warden-ssh-{}", std::process::id()));
        let connected = runtime.block_on(crate::ssh::SshTransport::connect(
            &spec,
            &plan.job_id,
            &agent,
            accept_new_host_keys,
            &control,
            false,
        ));
        let transport = match connected {
            Ok(t) => {
                eprintln!(
                    "warden: {} host(s) connected over SSH, agent in place, in {:.2}s",
                    spec.cluster.hosts.len(),
                    started.elapsed().as_secs_f64()
                );
                Arc::new(t)
            }
            Err(e) => {
                eprintln!("error: {e}");
                let _ = std::fs::remove_dir_all(&control);
                return EXIT_FAILED;
            }
        };
        let r = runtime.block_on(launch(job, spec.clone(), text, plan, move |_| transport as Arc<dyn Transport>, opts));
        let _ = std::fs::remove_dir_all(&control);
        r
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
                }
                eprintln!("  results: {dir}/summary.json, {dir}/metrics.csv, logs in {dir}/logs/");
                EXIT_OK
            } else {
                eprintln!("failed: {}", s.failure.as_deref().unwrap_or("unknown cause"));
                eprintln!("  details: {dir}/summary.json, logs in {dir}/logs/");
                EXIT_FAILED
            }
        }
        Err(e @ (LaunchError::Spec(_) | LaunchError::Input(_))) => {
            eprintln!("error: {e}");
            EXIT_USAGE
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
    }
}

/// Removes a job's firewall tables and job directories on every host of
/// `job` over SSH (after its launcher died).
pub fn clean_remote(job: &Path, job_id: &str, table: &str) -> u8 {
    let (spec, _) = match warden_agent::spec::JobSpec::load(job) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let Ok(job_id) = warden_agent::identity::JobId::try_from(job_id.to_string()) else {
        eprintln!("error: run.json has no valid job id");
        return EXIT_USAGE;
    };
    let plan = warden_agent::plan::Plan::new(&spec, &job_id, false);
    let agent = match find_agent() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        return EXIT_FAILED;
    };
    let control = std::env::temp_dir().join(format!("warden-ssh-{}", std::process::id()));
    let code = runtime.block_on(async {
        let t = match crate::ssh::SshTransport::connect(&spec, &job_id, &agent, false, &control, true).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_FAILED;
            }
        };
        let mut code = EXIT_OK;
        for host in &plan.hosts {
            match t.teardown_host(host, table).await {
                Ok(()) => println!("{}: firewall table {table} removed", host.name),
                Err(e) => {
                    eprintln!("error: {}: {e}", host.name);
                    code = EXIT_FAILED;
                }
            }
        }
        for p in &plan.processes {
            let _ = t.cleanup(p).await;
        }
        t.finish().await;
        code
    });
    let _ = std::fs::remove_dir_all(&control);
    code
}

/// `warden doctor JOB`: connects to every host and reports what a job needs.
pub fn exec_doctor(job: &Path, accept_new_host_keys: bool) -> u8 {
    let (spec, _) = match warden_agent::spec::JobSpec::load(job) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let agent = match find_agent() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        return EXIT_FAILED;
    };
    let control = std::env::temp_dir().join(format!("warden-ssh-{}", std::process::id()));
    let id = warden_agent::identity::JobId::generate();
    let result =
        runtime.block_on(crate::ssh::SshTransport::connect(&spec, &id, &agent, accept_new_host_keys, &control, true));
    let _ = std::fs::remove_dir_all(&control);
    match result {
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
        Ok(t) => {
            let mut ok = true;
            for r in &t.reports {
                for (check, passed, detail) in &r.checks {
                    println!("{:<12} {:<9} {:<5} {detail}", r.host, check, if *passed { "ok" } else { "FAIL" });
                    ok &= *passed;
                }
            }
            if ok { EXIT_OK } else { EXIT_FAILED }
        }
    }
}
