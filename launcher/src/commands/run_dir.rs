//! `warden status|logs|stop DIR`: a run, from its directory, whether or not
//! its launcher is still alive.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{EXIT_FAILED, EXIT_OK};
use crate::error::{CliError, Context};
use crate::rundir::RunRecord;
use crate::transport::AgentError;

/// The run's launcher PID, if that process is still a `warden` launcher.
fn live_launcher(run: &RunRecord) -> Option<i32> {
    let pid = i32::try_from(run.launcher_pid).ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    exe.file_name().is_some_and(|n| n == "warden").then_some(pid)
}

fn load(dir: &Path) -> Result<RunRecord, CliError> {
    RunRecord::load(dir).map_err(CliError::usage)
}

/// Prints how the run stands.
pub fn exec_status(dir: &Path) -> Result<u8, CliError> {
    let run = load(dir)?;
    println!("job {} (id {})", run.job, run.job_id);
    if let Some(s) = crate::rundir::Summary::load(dir) {
        println!("status: {}", s.status);
        println!("epochs: {}, steps: {}", s.epochs, s.steps);
        if let Some(acc) = s.test_accuracy {
            println!("test accuracy: {acc:.4}");
        }
        if let Some(f) = &s.failure {
            println!("failure: {f}");
        }
        return Ok(if s.status == "succeeded" { EXIT_OK } else { EXIT_FAILED });
    }
    let last = std::fs::read_to_string(dir.join("metrics.csv"))
        .ok()
        .and_then(|m| m.lines().skip(1).last().map(str::to_string));
    match live_launcher(&run) {
        Some(pid) => println!("status: running (launcher pid {pid})"),
        None => {
            println!("status: ended without a summary: the launcher died; `warden stop {}` cleans up", dir.display())
        }
    }
    if let Some(row) = last {
        println!("last epoch (epoch,train_loss,test_loss,test_accuracy,...): {row}");
    }
    Ok(EXIT_OK)
}

/// The logs of the run, optionally for one host or role, optionally following.
pub fn exec_logs(dir: &Path, host: Option<&str>, role: Option<&str>, follow: bool) -> Result<u8, CliError> {
    let run = load(dir)?;
    let mut files: Vec<(String, PathBuf, u64)> = match std::fs::read_dir(dir.join("logs")) {
        Ok(d) => d
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".log")?.to_string();
                // host-role-rank, where the host may itself contain '-'.
                let mut parts = name.rsplitn(3, '-');
                let (rank, r, h) = (parts.next()?, parts.next()?, parts.next()?);
                let keep = host.is_none_or(|x| x == h) && role.is_none_or(|x| x == r);
                keep.then(|| (format!("{h}/{r}[{rank}]"), e.path(), 0))
            })
            .collect(),
        Err(e) => return Err(CliError::usage(Context::new(dir.join("logs").display().to_string(), e))),
    };
    files.sort();
    if files.is_empty() {
        return Err(CliError::usage("no logs match"));
    }
    let mut out = std::io::stdout().lock();
    loop {
        for (label, path, offset) in files.iter_mut() {
            let Ok(mut f) = std::fs::File::open(&path) else { continue };
            if f.seek(SeekFrom::Start(*offset)).is_err() {
                continue;
            }
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            // Only whole lines; a partial one waits for the next round.
            let end = text.rfind('\n').map_or(0, |i| i + 1);
            for line in text[..end].lines() {
                let _ = writeln!(out, "{label} {line}");
            }
            *offset += end as u64;
        }
        let _ = out.flush();
        if !follow || (live_launcher(&run).is_none() && dir.join("summary.json").exists()) {
            return Ok(EXIT_OK);
        }
        if live_launcher(&run).is_none() {
            return Ok(EXIT_OK);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Stops a running job, or cleans up after one whose launcher died.
pub fn exec_stop(dir: &Path) -> Result<u8, CliError> {
    let run = load(dir)?;
    if let Some(pid) = live_launcher(&run) {
        // The launcher's Ctrl-C path: stop every process, remove tables, write the summary.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT)
            .map_err(|e| CliError::failed(Context::new(format!("cannot signal the launcher (pid {pid})"), e)))?;
        for _ in 0..300 {
            if live_launcher(&run).is_none() {
                println!("stopped: the launcher (pid {pid}) tore the job down");
                return Ok(EXIT_OK);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        return Err(CliError::failed(format!("the launcher (pid {pid}) did not stop within 30s")));
    }
    // The launcher is gone: its agents stopped when their control channels
    // closed; what can remain is the firewall table, the job's uid lease and
    // whatever a program of that uid left running. `warden-agent host
    // teardown` finds the job's leases itself, as it does on SSH hosts.
    let table = run.firewall_table.clone();
    if run.local {
        let job_id = run.job_id.clone();
        let teardown = crate::transport::find_agent().map_err(AgentError::from).and_then(|agent| {
            let args = crate::transport::AgentCmd::Teardown { job: &job_id, uid: None }.args();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(crate::transport::run_agent(&agent, &[], &args, None))
        });
        let said = teardown.map_err(CliError::failed)?;
        let said = String::from_utf8_lossy(&said);
        println!("cleaned up: no launcher was running; firewall table {table} removed; {}", said.trim());
        return Ok(EXIT_OK);
    }
    println!("no launcher is running; cleaning the hosts of {} over SSH", run.job_file.display());
    crate::commands::launch::clean_remote(&run.job_file, &run.job_id, &table)
}
