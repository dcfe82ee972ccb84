//! `warden status|logs|stop DIR`: a run, from its directory, whether or not
//! its launcher is still alive.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::rundir::RunRecord;

/// The run's launcher PID, if that process is still a `warden` launcher.
fn live_launcher(run: &RunRecord) -> Option<i32> {
    let pid = i32::try_from(run.launcher_pid).ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    exe.file_name().is_some_and(|n| n == "warden").then_some(pid)
}

fn load(dir: &Path) -> Result<RunRecord, u8> {
    RunRecord::load(dir).map_err(|e| {
        eprintln!("error: {e}");
        EXIT_USAGE
    })
}

/// Prints how the run stands.
pub fn exec_status(dir: &Path) -> u8 {
    let run = match load(dir) {
        Ok(r) => r,
        Err(code) => return code,
    };
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
        return if s.status == "succeeded" { EXIT_OK } else { EXIT_FAILED };
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
    EXIT_OK
}

/// The logs of the run, optionally for one host or role, optionally following.
pub fn exec_logs(dir: &Path, host: Option<&str>, role: Option<&str>, follow: bool) -> u8 {
    let run = match load(dir) {
        Ok(r) => r,
        Err(code) => return code,
    };
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
        Err(e) => {
            eprintln!("error: {}: {e}", dir.join("logs").display());
            return EXIT_USAGE;
        }
    };
    files.sort();
    if files.is_empty() {
        eprintln!("error: no logs match");
        return EXIT_USAGE;
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
            return EXIT_OK;
        }
        if live_launcher(&run).is_none() {
            return EXIT_OK;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Stops a running job, or cleans up after one whose launcher died.
pub fn exec_stop(dir: &Path) -> u8 {
    let run = match load(dir) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if let Some(pid) = live_launcher(&run) {
        // The launcher's Ctrl-C path: stop every process, remove tables, write the summary.
        if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT) {
            eprintln!("error: cannot signal the launcher (pid {pid}): {e}");
            return EXIT_FAILED;
        }
        for _ in 0..300 {
            if live_launcher(&run).is_none() {
                println!("stopped: the launcher (pid {pid}) tore the job down");
                return EXIT_OK;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("error: the launcher (pid {pid}) did not stop within 30s");
        return EXIT_FAILED;
    }
    // The launcher is gone: its agents stopped when their control channels
    // closed; what can remain is the firewall table, the job's uid lease and
    // whatever a program of that uid left running. `warden-agent host
    // teardown` finds the job's leases itself, as it does on SSH hosts.
    let table = run.firewall_table.clone();
    if run.local {
        let job_id = run.job_id.clone();
        let teardown = crate::transport::find_agent().map_err(|e| e.to_string()).and_then(|agent| {
            let args = crate::transport::AgentCmd::Teardown { job: &job_id, uid: None }.args();
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(crate::transport::run_agent(&agent, &[], &args, None))
        });
        return match teardown {
            Ok(said) => {
                let said = String::from_utf8_lossy(&said);
                println!("cleaned up: no launcher was running; firewall table {table} removed; {}", said.trim());
                EXIT_OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_FAILED
            }
        };
    }
    println!("no launcher is running; cleaning the hosts of {} over SSH", run.job_file.display());
    crate::commands::launch::clean_remote(&run.job_file, &run.job_id, &table)
}
