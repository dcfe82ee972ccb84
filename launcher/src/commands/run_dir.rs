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

/// Prints how the run stands: its status, the last epoch's figures, an
/// estimate of the time left while it runs, and how it ended.
pub fn exec_status(dir: &Path) -> Result<u8, CliError> {
    let submitted = crate::slurm::Submitted::load(dir);
    let mut slurm_running = false;
    if let Some(sub) = &submitted {
        let state = crate::slurm::job_state(&sub.job_id).map_err(CliError::failed)?;
        slurm_running = state.as_deref() == Some("RUNNING");
        let state = state.as_deref().map_or_else(|| "finished (Slurm no longer lists it)".to_string(), slurm_state);
        println!("slurm job {}: {state}", sub.job_id);
        if !dir.join(crate::rundir::RUN_RECORD).exists() {
            return Ok(EXIT_OK);
        }
    }
    let run = load(dir)?;
    println!("job {} (id {})", run.job, run.job_id);
    let last = last_epoch(dir);
    if let Some(s) = crate::rundir::Summary::load(dir) {
        println!("status: {}", s.status);
        println!("epochs: {}, steps: {}", s.epochs, s.steps);
        if let Some(acc) = s.test_accuracy {
            println!("test accuracy: {acc:.4}");
        }
        if let Some(why) = &s.stopped {
            println!("stopped: {why}");
        }
        if let Some(f) = &s.failure {
            println!("failure: {f}");
        }
        if let Some(m) = &s.model {
            let step = s.model_step.map(|n| format!(" (weights after step {n})")).unwrap_or_default();
            println!("model: {}{step}", m.display());
        }
        return Ok(if s.status == "failed" { EXIT_FAILED } else { EXIT_OK });
    }
    match live_launcher(&run) {
        Some(pid) => {
            let elapsed = unix_now().saturating_sub(run.started_unix);
            println!("status: running (launcher pid {pid}), for {}", duration(elapsed as f64));
        }
        // The launcher runs on the allocation's first node.
        None if slurm_running => {
            let elapsed = unix_now().saturating_sub(run.started_unix);
            println!("status: running inside the Slurm allocation, for {}", duration(elapsed as f64));
        }
        None => {
            println!("status: ended without a summary: the launcher died; `warden stop {}` cleans up", dir.display())
        }
    }
    match last {
        Some(row) => {
            let of = if run.epochs > 0 { format!("/{}", run.epochs) } else { String::new() };
            // A program of the user's may report no test figures.
            let test = if row.test_loss.is_finite() {
                format!(", test loss {:.4}, test accuracy {:.4}", row.test_loss, row.test_accuracy)
            } else {
                String::new()
            };
            println!(
                "epoch {}{of}: train loss {:.4}{test}, {:.0} samples/s",
                row.epoch, row.train_loss, row.samples_per_s
            );
            if let Some(left) = row.time_left(run.epochs) {
                println!("time left: about {} (at the pace so far)", duration(left));
            }
        }
        None => println!("no epoch has finished yet"),
    }
    for (label, state) in process_states(dir) {
        println!("  {label}: {state}");
    }
    Ok(EXIT_OK)
}

/// Each process of the newest attempt and how it stands, from the last
/// event in its log: `running`, `finished`, `failed: WHY`.
fn process_states(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir.join("logs")) else { return Vec::new() };
    let mut out: Vec<(String, String)> = entries
        .flatten()
        .filter_map(|e| {
            let label = log_label(e.file_name().to_str()?)?;
            let text = std::fs::read_to_string(e.path()).ok()?;
            let last = text.lines().rev().find_map(|l| l.strip_prefix("[event] "));
            let event: Option<serde_json::Value> = last.and_then(|l| serde_json::from_str(l).ok());
            let state = match event.as_ref().and_then(|v| v["event"].as_str()) {
                None => "starting".to_string(),
                Some("done") => "finished".to_string(),
                Some("failed") => {
                    format!("failed: {}", event.as_ref().and_then(|v| v["message"].as_str()).unwrap_or("?"))
                }
                Some("model") => "saved the model".to_string(),
                Some("process" | "csr") => "enrolling".to_string(),
                Some(_) => "running".to_string(),
            };
            Some((label, state))
        })
        .collect();
    out.sort();
    out
}

/// `host/role[rank]` of a log named `HOST-ROLE-RANK.log` (the host may
/// itself contain '-').
fn log_label(file: &str) -> Option<String> {
    let name = file.strip_suffix(".log")?;
    let mut parts = name.rsplitn(3, '-');
    let (rank, role, host) = (parts.next()?, parts.next()?, parts.next()?);
    Some(format!("{host}/{role}[{rank}]"))
}

/// `warden runs [DIR]`: every run directory in `DIR` (default `runs`),
/// oldest first, with its status, start, duration, epochs and accuracy;
/// `DIR/latest` names the newest.
pub fn exec_runs(dir: &Path) -> Result<u8, CliError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        CliError::usage(Context::new(
            format!("{} (runs go to ./runs unless --run-dir says otherwise)", dir.display()),
            e,
        ))
    })?;
    let mut rows: Vec<(u64, [String; 6])> = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let is_link = e.file_type().is_ok_and(|t| t.is_symlink());
        let Ok(run) = RunRecord::load(&path) else { continue };
        if is_link {
            continue;
        }
        let summary = crate::rundir::Summary::load(&path);
        let (status, secs) = match (&summary, live_launcher(&run)) {
            (Some(s), _) => (s.status.clone(), s.elapsed_s),
            (None, Some(_)) => ("running".to_string(), unix_now().saturating_sub(run.started_unix) as f64),
            (None, None) => ("died".to_string(), f64::NAN),
        };
        let epochs = summary.as_ref().map(|s| s.epochs).or_else(|| last_epoch(&path).map(|l| l.epoch)).unwrap_or(0);
        let accuracy = summary
            .as_ref()
            .and_then(|s| s.test_accuracy)
            .or_else(|| last_epoch(&path).map(|l| l.test_accuracy))
            .filter(|a| a.is_finite())
            .map_or("-".to_string(), |a| format!("{a:.4}"));
        let started = time::OffsetDateTime::from_unix_timestamp(run.started_unix as i64)
            .map(|t| {
                format!("{:04}-{:02}-{:02} {:02}:{:02}", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute())
            })
            .unwrap_or_default();
        let name = e.file_name().to_string_lossy().to_string();
        let took = if secs.is_nan() { "-".to_string() } else { duration(secs) };
        let of = if run.epochs > 0 { format!("{epochs}/{}", run.epochs) } else { epochs.to_string() };
        rows.push((run.started_unix, [name, status, started, took, of, accuracy]));
    }
    rows.sort_by(|a, b| (a.0, &a.1[0]).cmp(&(b.0, &b.1[0])));
    let header = ["RUN", "STATUS", "STARTED (UTC)", "TOOK", "EPOCHS", "ACCURACY"].map(String::from);
    let width = |i: usize| rows.iter().map(|r| r.1[i].len()).chain([header[i].len()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..6).map(width).collect();
    for cells in std::iter::once(&header).chain(rows.iter().map(|r| &r.1)) {
        let line: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    if rows.is_empty() {
        println!("(no runs in {})", dir.display());
    }
    Ok(EXIT_OK)
}

/// The figures of the newest complete epoch in `metrics.csv`.
struct LastEpoch {
    epoch: u32,
    train_loss: f64,
    test_loss: f64,
    test_accuracy: f64,
    samples_per_s: f64,
    /// Epochs this run has trained (a resumed run starts later).
    trained: u32,
    elapsed_s: f64,
}

impl LastEpoch {
    /// Seconds until epoch `total`, if this run's pace says.
    fn time_left(&self, total: u32) -> Option<f64> {
        (total > self.epoch && self.trained > 0)
            .then(|| self.elapsed_s / f64::from(self.trained) * f64::from(total - self.epoch))
    }
}

/// Reads the last row of `DIR/metrics.csv` by its header's column names.
fn last_epoch(dir: &Path) -> Option<LastEpoch> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).ok()?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split(',').collect();
    let rows: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    let cells: Vec<&str> = rows.last()?.split(',').collect();
    let get = |name: &str| -> Option<f64> { cells.get(header.iter().position(|h| *h == name)?)?.parse().ok() };
    Some(LastEpoch {
        epoch: get("epoch")? as u32,
        train_loss: get("train_loss")?,
        test_loss: get("test_loss")?,
        test_accuracy: get("test_accuracy")?,
        samples_per_s: get("samples_per_s")?,
        trained: rows.len() as u32,
        elapsed_s: get("elapsed_s")?,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `1h 02m`, `3m 07s` or `12s`.
pub(crate) fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m {sec:02}s"),
        (h, m, _) => format!("{h}h {m:02}m"),
    }
}

/// How long `warden stop` waits for the launcher: worker 0's grace to
/// save the model, then the teardown.
const STOP_PATIENCE: Duration = Duration::from_secs(120);

/// Which log lines `warden logs` prints.
pub struct LogFilter<'a> {
    /// Only this host's processes.
    pub host: Option<&'a str>,
    /// Only this role's processes.
    pub role: Option<&'a str>,
    /// Only the last N lines of each log (to begin with).
    pub tail: Option<usize>,
}

/// The logs of the run, optionally for one host or role, optionally only
/// their last lines, optionally following. Certificate requests (PEM text
/// in logs of older runs) are left out.
pub fn exec_logs(dir: &Path, filter: &LogFilter<'_>, follow: bool) -> Result<u8, CliError> {
    let run = load(dir)?;
    let mut files: Vec<(String, PathBuf, u64)> = match std::fs::read_dir(dir.join("logs")) {
        Ok(d) => d
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".log")?.to_string();
                // host-role-rank, where the host may itself contain '-'.
                let mut parts = name.rsplitn(3, '-');
                let (_, r, h) = (parts.next()?, parts.next()?, parts.next()?);
                let keep = filter.host.is_none_or(|x| x == h) && filter.role.is_none_or(|x| x == r);
                keep.then(|| log_label(&format!("{name}.log")).map(|l| (l, e.path(), 0))).flatten()
            })
            .collect(),
        Err(e) => return Err(CliError::usage(Context::new(dir.join("logs").display().to_string(), e))),
    };
    files.sort();
    if files.is_empty() {
        return Err(CliError::usage("no logs match"));
    }
    if let Some(n) = filter.tail {
        for (_, path, offset) in files.iter_mut() {
            *offset = std::fs::read(path).map(|bytes| start_of_last_lines(&bytes, n)).unwrap_or(0);
        }
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
            for line in text[..end].lines().filter(|l| !is_certificate_request(l)) {
                let _ = writeln!(out, "{label} {line}");
            }
            *offset += end as u64;
        }
        let _ = out.flush();
        if !follow || live_launcher(&run).is_none() {
            return Ok(EXIT_OK);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Where the last `n` whole lines of `bytes` begin.
fn start_of_last_lines(bytes: &[u8], n: usize) -> u64 {
    // The final newline ends the last line; it does not start another.
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let start =
        body.iter().enumerate().rev().filter(|(_, b)| **b == b'\n').nth(n.saturating_sub(1)).map_or(0, |(i, _)| i + 1);
    if n == 0 { bytes.len() as u64 } else { start as u64 }
}

/// An agent's certificate request, as logs of older runs recorded it: PEM
/// text that tells a reader nothing.
fn is_certificate_request(line: &str) -> bool {
    line.starts_with("[event] {\"event\":\"csr\",")
}

/// How a Slurm job state reads.
fn slurm_state(state: &str) -> String {
    match state {
        "PENDING" => "waiting for its allocation (PENDING)".to_string(),
        "RUNNING" => "running".to_string(),
        "TIMEOUT" => {
            "ended by Slurm's time limit (TIMEOUT): Slurm told the launcher to stop, which saves the model if the \
             cluster's KillWait leaves it time"
                .into()
        }
        "CANCELLED" => "cancelled (CANCELLED)".to_string(),
        "COMPLETED" => "completed".to_string(),
        other => other.to_lowercase(),
    }
}

/// `stop` of a run submitted with `sbatch`: the launcher inside the
/// allocation gets SIGTERM (through Slurm, wherever it runs) and stops the
/// job in order; a job still waiting for its allocation is cancelled.
fn stop_submitted(dir: &Path, sub: &crate::slurm::Submitted) -> Result<u8, CliError> {
    let id = &sub.job_id;
    match crate::slurm::job_state(id).map_err(CliError::failed)?.as_deref() {
        Some("PENDING") => {
            crate::slurm::scancel(id, false).map_err(CliError::failed)?;
            println!("cancelled: Slurm job {id} had not started");
            Ok(EXIT_OK)
        }
        Some("RUNNING" | "COMPLETING") => {
            crate::slurm::scancel(id, true).map_err(CliError::failed)?;
            println!("stopping: the launcher in Slurm job {id} saves the model and tears the job down");
            let until = std::time::Instant::now() + STOP_PATIENCE;
            while std::time::Instant::now() < until {
                let state = crate::slurm::job_state(id).map_err(CliError::failed)?;
                if state.as_deref() != Some("RUNNING") {
                    match crate::rundir::Summary::load(dir).and_then(|s| s.model.zip(s.model_step)) {
                        Some((model, step)) => {
                            println!("stopped: model saved to {} (weights after step {step})", model.display())
                        }
                        None => println!("stopped: Slurm job {id} ended; no model was saved"),
                    }
                    return Ok(EXIT_OK);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(CliError::failed(format!(
                "Slurm job {id} did not end within {}s; `scancel {id}` ends it at once",
                STOP_PATIENCE.as_secs()
            )))
        }
        Some(state) if !crate::slurm::finished(state) => {
            // Configuring, suspended, requeued...: no launcher to ask yet.
            crate::slurm::scancel(id, false).map_err(CliError::failed)?;
            println!("cancelled: Slurm job {id} was {}", slurm_state(state));
            Ok(EXIT_OK)
        }
        state => {
            let state = state.map_or_else(|| "finished".to_string(), slurm_state);
            println!("nothing to stop: Slurm job {id} is {state}");
            Ok(EXIT_OK)
        }
    }
}

/// Stops a running job, or cleans up after one whose launcher died.
pub fn exec_stop(dir: &Path) -> Result<u8, CliError> {
    if let Some(sub) = crate::slurm::Submitted::load(dir) {
        return stop_submitted(dir, &sub);
    }
    let run = load(dir)?;
    // A launcher started inside an allocation by the user's own sbatch or
    // salloc, running on another node: through Slurm.
    if let (None, Some(job_id)) = (live_launcher(&run), &run.slurm_job) {
        return stop_submitted(dir, &crate::slurm::Submitted { job_id: job_id.clone() });
    }
    if let Some(pid) = live_launcher(&run) {
        // The launcher's orderly stop: worker 0 saves the model, then every
        // process stops, tables and job directories go, the summary is written.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| CliError::failed(Context::new(format!("cannot signal the launcher (pid {pid})"), e)))?;
        println!("stopping: the launcher (pid {pid}) saves the model and tears the job down");
        let until = std::time::Instant::now() + STOP_PATIENCE;
        while std::time::Instant::now() < until {
            if live_launcher(&run).is_none() {
                match crate::rundir::Summary::load(dir).and_then(|s| s.model.zip(s.model_step)) {
                    Some((model, step)) => {
                        println!("stopped: model saved to {} (weights after step {step})", model.display())
                    }
                    None => println!("stopped: the launcher (pid {pid}) tore the job down; no model was saved"),
                }
                return Ok(EXIT_OK);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        return Err(CliError::failed(format!(
            "the launcher (pid {pid}) did not stop within {}s; `warden stop` again makes it stop at once",
            STOP_PATIENCE.as_secs()
        )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_start_after_the_right_newline() {
        let text = b"a\nbb\nccc\n";
        let from = |n| std::str::from_utf8(&text[start_of_last_lines(text, n) as usize..]).unwrap();
        assert_eq!(from(1), "ccc\n");
        assert_eq!(from(2), "bb\nccc\n");
        assert_eq!(from(3), "a\nbb\nccc\n");
        assert_eq!(from(9), "a\nbb\nccc\n");
        assert_eq!(from(0), "");
        // A last line still being written counts as a line.
        assert_eq!(start_of_last_lines(b"a\nb", 1), 2);
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(duration(12.4), "12s");
        assert_eq!(duration(187.0), "3m 07s");
        assert_eq!(duration(3720.0), "1h 02m");
    }
}
