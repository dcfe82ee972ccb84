//! The run directory: everything a job leaves behind for its user.
//!
//! ```text
//! DIR/run.json        job id, name, seed, start time, checkpoint series
//! DIR/job.toml        the job file as launched
//! DIR/plan.json       the resolved plan
//! DIR/metrics.csv     one row per epoch
//! DIR/plot.png        loss and accuracy per epoch
//! DIR/logs/           one log per process (stderr, plus its events)
//! DIR/model/          model.safetensors
//! DIR/restarts.json   each restart and its cause (on_failure = "restart")
//! DIR/summary.json    how it ended
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use warden_agent::job::plan::Plan;
use warden_agent::job::spec::JobSpec;

/// One row of `metrics.csv`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRow {
    /// Epoch from 1.
    pub epoch: u32,
    /// Mean training loss over workers.
    pub train_loss: f64,
    /// Mean test loss after the epoch.
    pub test_loss: f64,
    /// Test accuracy after the epoch.
    pub test_accuracy: f64,
    /// Steps in the epoch.
    pub steps: u64,
    /// Training samples per second, all workers together.
    pub samples_per_s: f64,
    /// The slowest worker's samples per second.
    pub slowest_worker_samples_per_s: f64,
    /// Bytes all workers pushed to servers in the epoch.
    pub bytes_pushed: u64,
    /// Bytes all workers pulled from servers in the epoch.
    pub bytes_pulled: u64,
    /// Seconds since launch.
    pub elapsed_s: f64,
}

/// A process's exit, for the summary.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProcessExit {
    /// `host/role[rank]`.
    pub process: String,
    /// Exit code (none if killed).
    pub exit_code: Option<i32>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Summary {
    /// "succeeded", "failed" or "stopped" (a requested stop: a signal,
    /// `warden stop` or `max_hours`; the model holds the work done).
    pub status: String,
    /// Job name.
    pub job: String,
    /// Job id.
    pub job_id: String,
    /// Training seed in force.
    pub seed: u64,
    /// Epochs completed.
    pub epochs: u32,
    /// Steps (updates) completed.
    pub steps: u64,
    /// Last epoch's mean training loss.
    pub train_loss: Option<f64>,
    /// Last epoch's mean test loss.
    pub test_loss: Option<f64>,
    /// Last epoch's test accuracy.
    pub test_accuracy: Option<f64>,
    /// Last epoch's training samples per second, all workers together.
    pub samples_per_s: Option<f64>,
    /// Bytes pushed to servers over the whole run.
    pub bytes_pushed: u64,
    /// Bytes pulled from servers over the whole run.
    pub bytes_pulled: u64,
    /// Wall time.
    pub elapsed_s: f64,
    /// Seconds from launch until every process reported it was running.
    pub startup_s: Option<f64>,
    /// Why it failed.
    pub failure: Option<String>,
    /// Why it stopped before its last epoch, when a stop was requested.
    pub stopped: Option<String>,
    /// Where the model is.
    pub model: Option<PathBuf>,
    /// The global training step whose weights the model holds (`None`
    /// for a bring-your-own program's model).
    pub model_step: Option<u64>,
    /// The model's signature (`[signing]`), beside it.
    pub signature: Option<PathBuf>,
    /// The checkpoint step this run continued from (`launch --resume`).
    pub resumed_from_step: Option<u64>,
    /// Checkpoints committed during the run (encrypted, on the servers' hosts).
    pub checkpoints: Vec<CheckpointRow>,
    /// Restarts after process failures (`[training] on_failure = "restart"`).
    pub restarts: Vec<RestartRow>,
    /// Workers a server found suspect (`[training] suspect_ratio`), each
    /// time it did.
    #[serde(default)]
    pub suspect_workers: Vec<SuspectRow>,
    /// Every process of the last attempt and how it exited.
    pub processes: Vec<ProcessExit>,
}

/// One restart, for `restarts.json` and the summary.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RestartRow {
    /// 1 for the first restart; its logs are in `logs/restart-N/`.
    pub restart: u32,
    /// Seconds since launch when the failed attempt had ended.
    pub after_s: f64,
    /// Why the attempt before it failed.
    pub cause: String,
    /// How each process of the failed attempt exited.
    pub processes: Vec<ProcessExit>,
    /// The checkpoint step the restart resumed from (none: from the beginning).
    pub resumed_from_step: Option<u64>,
}

/// A worker a server found suspect, for the summary.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SuspectRow {
    /// The worker's rank.
    pub worker: u32,
    /// The server that found it (`host server[rank]`).
    pub server: String,
    /// Its gradient norm over the median of the workers', in the last step.
    pub ratio: f64,
    /// Steps in a row it stood out.
    pub steps: u32,
    /// The step that made it suspect.
    pub step: u64,
}

/// A committed checkpoint, for the summary.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CheckpointRow {
    /// Global training step.
    pub step: u64,
    /// Encrypted bytes over all shards.
    pub bytes: u64,
}

/// Where a run's checkpoints come from and go, for `run.json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lineage<'a> {
    /// The checkpoint series the run writes to.
    pub checkpoint_series: Option<&'a warden_agent::net::identity::JobId>,
    /// The run directory it resumed.
    pub resumed_from: Option<&'a Path>,
}

/// `run.json`: what was launched, written when the run starts and read by
/// `warden status|logs|stop` and `warden launch --resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// `[job] name`.
    pub job: String,
    /// The job id (also in every certificate).
    pub job_id: warden_agent::net::identity::JobId,
    /// The training seed in force.
    pub seed: u64,
    /// Where the seed came from: the job file or the OS CSPRNG.
    pub seed_source: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
    /// The launcher's version.
    pub warden_version: String,
    /// The launcher's PID (`stop` signals it while it is a `warden`).
    pub launcher_pid: u32,
    /// Every host on this machine (`--local`).
    pub local: bool,
    /// The job file, absolute.
    pub job_file: PathBuf,
    /// The job's nftables table on every host.
    pub firewall_table: String,
    /// The checkpoint series the run writes to.
    pub checkpoint_series: Option<warden_agent::net::identity::JobId>,
    /// The run directory it resumed, if any.
    pub resumed_from: Option<PathBuf>,
    /// `[training] epochs` (0 in run directories of versions that did not record it).
    #[serde(default)]
    pub epochs: u32,
    /// The Slurm job the launcher ran inside (`[cluster.slurm]`), if any:
    /// `stop` reaches it through Slurm wherever it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
}

impl Summary {
    /// Reads `DIR/summary.json`, if the run has ended and written one.
    pub fn load(dir: &Path) -> Option<Summary> {
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).ok()?).ok()
    }
}

/// Why a run directory cannot be read or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunDirError {
    /// `DIR/run.json` cannot be read.
    #[error("{} is not a warden run directory ({}: {source})", .dir.display(), .record.display())]
    NotARun {
        /// The directory.
        dir: PathBuf,
        /// Its run.json.
        record: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// `DIR/run.json` is not a record this warden wrote.
    #[error("{}: not a run record of this warden", .record.display())]
    Unreadable {
        /// The run.json.
        record: PathBuf,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
    /// The directory for a new run holds an earlier one.
    #[error("run directory {} already holds a run; choose another with --run-dir or remove it", .0.display())]
    InUse(PathBuf),
    /// The directory for a new run (or one inside it) cannot be made.
    #[error("cannot create {}", .path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl RunRecord {
    /// Reads `DIR/run.json`, saying what is wrong in a way a user can act on.
    pub fn load(dir: &Path) -> Result<RunRecord, RunDirError> {
        let record = dir.join(RUN_RECORD);
        let text = match std::fs::read_to_string(&record) {
            Ok(t) => t,
            Err(source) => return Err(RunDirError::NotARun { dir: dir.to_path_buf(), record, source }),
        };
        serde_json::from_str(&text).map_err(|source| RunDirError::Unreadable { record, source })
    }
}

/// Where runs go unless `--run-dir` says otherwise (relative to the
/// current directory).
pub const RUNS: &str = "runs";

/// The link in [`RUNS`] to the newest run started there.
pub const LATEST: &str = "latest";

/// A detached launcher's own output (`launch --detach`), in its run directory.
pub const LAUNCHER_LOG: &str = "launcher.log";

/// The run's record, written when it starts.
pub const RUN_RECORD: &str = "run.json";

/// A run directory being written.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// The default run directory of job `name` started now:
    /// `runs/NAME-YYYYMMDD-HHMMSS`, or `...-2`, `...-3` when a run of the
    /// same second has that name.
    pub fn default_path(name: &str) -> PathBuf {
        let t = time::OffsetDateTime::now_utc();
        let stem = format!(
            "{name}-{:04}{:02}{:02}-{:02}{:02}{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        let runs = PathBuf::from(RUNS);
        (1..)
            .map(|n| runs.join(if n == 1 { stem.clone() } else { format!("{stem}-{n}") }))
            .find(|p| !p.exists())
            .expect("some name is free")
    }

    /// Points `runs/latest` at this run, replacing the link atomically (a
    /// run directory of the default place only).
    fn mark_latest(&self) -> std::io::Result<()> {
        let (Some(parent), Some(name)) = (self.path.parent(), self.path.file_name()) else { return Ok(()) };
        let tmp = parent.join(format!(".latest-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp)?;
        std::fs::rename(&tmp, parent.join(LATEST))
    }

    /// Creates `path`, or [`RunDir::default_path`]. Refuses a non-empty
    /// directory, so no earlier run is ever overwritten; the files it
    /// accepts are [`LAUNCHER_LOG`], which `launch --detach` and a Slurm
    /// submission open for the launcher they start before that launcher
    /// makes the directory its run, and the submission's batch script and
    /// record.
    pub fn create(path: Option<PathBuf>, name: &str) -> Result<RunDir, RunDirError> {
        let default = path.is_none();
        let path = path.unwrap_or_else(|| RunDir::default_path(name));
        // Absolute, so every path the launcher prints works from any directory
        // (`train-local` runs from the checkout, its user from elsewhere).
        let path = std::path::absolute(&path).unwrap_or(path);
        let prepared = [LAUNCHER_LOG, crate::slurm::BATCH_SCRIPT, crate::slurm::SUBMITTED];
        let foreign =
            |e: std::io::Result<std::fs::DirEntry>| e.map_or(true, |e| !prepared.iter().any(|p| e.file_name() == *p));
        if std::fs::read_dir(&path).is_ok_and(|mut d| d.any(foreign)) {
            return Err(RunDirError::InUse(path));
        }
        // Private to the user who launched: logs, the plan and the model are
        // theirs to share (the launcher's umask makes every file 0600).
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)))
            .map_err(|source| RunDirError::Create { path: path.clone(), source })?;
        for sub in ["logs", "model"] {
            let path = path.join(sub);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .map_err(|source| RunDirError::Create { path: path.clone(), source })?;
        }
        let run = RunDir { path };
        if default && let Err(e) = run.mark_latest() {
            tracing::warn!("cannot point {RUNS}/{LATEST} at {}: {e}", run.path.display());
        }
        Ok(run)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `DIR/logs`.
    pub fn logs(&self) -> PathBuf {
        self.path.join("logs")
    }

    /// `DIR/model`.
    pub fn model_dir(&self) -> PathBuf {
        self.path.join("model")
    }

    /// Where local agents keep their job directories.
    pub fn nodes_dir(&self) -> PathBuf {
        self.path.join("nodes")
    }

    /// Records what is being launched.
    pub fn write_start(
        &self,
        spec: &JobSpec,
        text: &str,
        plan: &Plan,
        seed: u64,
        job_file: &Path,
        lineage: Lineage<'_>,
    ) -> std::io::Result<()> {
        std::fs::write(self.path.join("job.toml"), text)?;
        write_json(&self.path.join("plan.json"), plan)?;
        let run = RunRecord {
            job: spec.name.clone(),
            job_id: plan.job_id.clone(),
            seed,
            seed_source: if spec.seed.is_some() { "job file" } else { "drawn from the OS CSPRNG" }.to_string(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            warden_version: env!("CARGO_PKG_VERSION").to_string(),
            launcher_pid: std::process::id(),
            local: plan.local,
            job_file: std::path::absolute(job_file).unwrap_or_else(|_| job_file.to_path_buf()),
            firewall_table: warden_agent::job::plan::firewall_table(&plan.job_id),
            checkpoint_series: lineage.checkpoint_series.cloned(),
            resumed_from: lineage.resumed_from.map(Path::to_path_buf),
            epochs: spec.training.epochs,
            slurm_job: spec.cluster.slurm.as_ref().and_then(|_| warden_agent::job::slurm::job_id().ok().flatten()),
        };
        write_json(&self.path.join(RUN_RECORD), &run)?;
        std::fs::write(self.path.join("metrics.csv"), METRICS_HEADER)
    }

    /// Appends one epoch to `metrics.csv`.
    pub fn append_metrics(&self, r: &EpochRow) -> std::io::Result<()> {
        self.append_to(&self.path.join("metrics.csv"), r)
    }

    fn append_to(&self, path: &Path, r: &EpochRow) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
        writeln!(
            f,
            "{},{:.6},{:.6},{:.6},{},{:.1},{},{},{:.3}",
            r.epoch,
            r.train_loss,
            r.test_loss,
            r.test_accuracy,
            r.steps,
            r.samples_per_s,
            r.bytes_pushed,
            r.bytes_pulled,
            r.elapsed_s
        )
    }

    /// Rewrites `metrics.csv` with `rows` (after a restart ran epochs again).
    pub fn write_metrics(&self, rows: &[EpochRow]) -> std::io::Result<()> {
        let path = self.path.join("metrics.csv");
        let tmp = path.with_extension("csv.tmp");
        std::fs::write(&tmp, METRICS_HEADER)?;
        for r in rows {
            self.append_to(&tmp, r)?;
        }
        std::fs::rename(tmp, path)
    }

    /// Writes `restarts.json` (each restart and its cause) atomically.
    pub fn write_restarts(&self, rows: &[RestartRow]) -> std::io::Result<()> {
        write_json(&self.path.join("restarts.json"), &rows)
    }

    /// Writes `summary.json` atomically.
    pub fn write_summary(&self, s: &Summary) -> std::io::Result<()> {
        write_json(&self.path.join("summary.json"), s)
    }
}

const METRICS_HEADER: &str =
    "epoch,train_loss,test_loss,test_accuracy,steps,samples_per_s,bytes_pushed,bytes_pulled,elapsed_s\n";

/// The epochs in `dir/metrics.csv`, read by its header's column names (an
/// earlier run's, for the plot of a run that resumes it). Rows that do not
/// parse are left out; a missing file is no rows.
pub fn read_metrics(dir: &Path) -> Vec<EpochRow> {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap_or_default();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    lines
        .filter_map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            let f = |name: &str| -> Option<f64> { cells.get(column(name)?)?.parse().ok() };
            let n = |name: &str| -> Option<u64> { cells.get(column(name)?)?.parse().ok() };
            Some(EpochRow {
                epoch: u32::try_from(n("epoch")?).ok()?,
                train_loss: f("train_loss")?,
                test_loss: f("test_loss").unwrap_or(f64::NAN),
                test_accuracy: f("test_accuracy").unwrap_or(f64::NAN),
                steps: n("steps").unwrap_or(0),
                samples_per_s: f("samples_per_s").unwrap_or(0.0),
                slowest_worker_samples_per_s: 0.0,
                bytes_pushed: n("bytes_pushed").unwrap_or(0),
                bytes_pulled: n("bytes_pulled").unwrap_or(0),
                elapsed_s: f("elapsed_s").unwrap_or(0.0),
            })
        })
        .collect()
}

fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    text.push(b'\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(epoch: u32, test_accuracy: f64) -> EpochRow {
        EpochRow {
            epoch,
            train_loss: 1.0 / f64::from(epoch),
            test_loss: 0.5,
            test_accuracy,
            steps: 10,
            samples_per_s: 100.0,
            slowest_worker_samples_per_s: 0.0,
            bytes_pushed: 4096,
            bytes_pulled: 8192,
            elapsed_s: f64::from(epoch),
        }
    }

    /// What `metrics.csv` holds reads back (a resumed run's plot continues
    /// from it), test figures a program did not report included.
    #[test]
    fn metrics_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(Some(dir.path().join("run")), "t").unwrap();
        let rows = [row(1, 0.5), row(2, f64::NAN), row(3, 0.75)];
        run.write_metrics(&rows).unwrap();
        let back = read_metrics(run.path());
        assert_eq!(back.len(), 3);
        for (a, b) in rows.iter().zip(&back) {
            assert_eq!(
                (a.epoch, a.steps, a.bytes_pushed, a.bytes_pulled),
                (b.epoch, b.steps, b.bytes_pushed, b.bytes_pulled)
            );
            assert!((a.train_loss - b.train_loss).abs() < 1e-6);
            assert!(a.test_accuracy.is_nan() == b.test_accuracy.is_nan());
        }
        assert!(read_metrics(&dir.path().join("none")).is_empty());
    }
}
