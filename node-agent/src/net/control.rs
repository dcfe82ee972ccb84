//! The control channel between the launcher and an agent process.
//!
//! It runs over the agent's stdin and stdout, whatever carries them: a local
//! pipe or an SSH session. Both directions are JSON lines. The launcher
//! writes a [`Control::Bundle`], reads the agent's [`Event::Csr`], answers
//! with [`Control::Certificate`], then reads events until the agent exits.
//! When the agent's stdin closes (the launcher died or stopped the job), the
//! agent stops.
//!
//! A bundle may carry the checkpoint key, so its bytes are cleared wherever
//! they are held: [`Control::to_line`] on the launcher's side, the line
//! buffer and [`ClearingReader`] on the agent's.

use std::io::{BufRead, Read};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::net::identity::{JobId, Role};

/// Longest control line accepted (the bundle carries the job file).
pub const MAX_CONTROL_LINE: usize = 1 << 20;

/// Launcher to agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Everything the agent needs to know about the job and itself.
    Bundle(Box<Bundle>),
    /// The agent's signed certificate and the job CA.
    Certificate {
        /// PEM certificate for the agent's key.
        cert_pem: String,
        /// PEM job CA.
        ca_pem: String,
    },
    /// Finish the step under way and keep the work: worker 0 saves the
    /// weights it holds to its model directory, says so with
    /// [`Event::Model`], and waits for [`Control::Stop`]. Sent on a
    /// requested stop (a signal, `warden stop`, `max_hours`); other
    /// processes ignore it.
    Finish,
    /// Stop now.
    Stop,
}

impl Control {
    /// As one JSON line with its newline, in a buffer that is cleared when
    /// dropped. The buffer is sized before the message is written into it,
    /// so it never grows and leaves no uncleared copy behind.
    pub fn to_line(&self) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
        let mut counter = ByteCount(0);
        serde_json::to_writer(&mut counter, self)?;
        let mut line = Zeroizing::new(Vec::with_capacity(counter.0 + 1));
        serde_json::to_writer(&mut *line, self)?;
        line.push(b'\n');
        Ok(line)
    }
}

/// Counts what is written to it and keeps none of it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A buffered reader that clears every byte of its buffer as it is
/// consumed, for the agent's control channel: what passed through it (the
/// bundle with the checkpoint key) does not stay in its buffer.
///
/// Its buffer is larger than the standard input's own (8 KiB), and a read
/// at least as large as that bypasses it, so nothing stays there either.
#[derive(Debug)]
pub struct ClearingReader<R> {
    inner: R,
    buf: Zeroizing<Vec<u8>>,
    pos: usize,
    end: usize,
}

impl<R: Read> ClearingReader<R> {
    /// Reads `inner` in blocks of 64 KiB.
    pub fn new(inner: R) -> Self {
        ClearingReader { inner, buf: Zeroizing::new(vec![0; 64 << 10]), pos: 0, end: 0 }
    }
}

impl<R: Read> Read for ClearingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for ClearingReader<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.pos == self.end {
            self.end = self.inner.read(&mut self.buf)?;
            self.pos = 0;
        }
        Ok(&self.buf[self.pos..self.end])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.end - self.pos);
        self.buf[self.pos..self.pos + amt].zeroize();
        self.pos += amt;
    }
}

/// What an agent receives before anything else.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Job id (also in every certificate).
    pub job_id: JobId,
    /// The job file, as the user wrote it; the agent validates it again.
    pub job_toml: String,
    /// The job file's name, for error messages.
    pub job_file: String,
    /// Directory that relative data paths are resolved against.
    pub base_dir: PathBuf,
    /// The hosts, when the job file takes them from a hostfile or inventory
    /// (read and resolved once, by the launcher).
    #[serde(default)]
    pub hosts: Option<Vec<crate::job::spec::HostSpec>>,
    /// The training seed in force (from the file, or drawn by the launcher).
    pub seed: u64,
    /// Whether every host is mapped onto this machine.
    pub local: bool,
    /// Which process this agent is.
    pub role: Role,
    /// Its rank within the role.
    pub rank: u32,
    /// Where it may write (model output, scratch).
    pub workdir: PathBuf,
    /// The uid leased to the job on this host ([`crate::host::jobuid`]); the
    /// agent, when root, runs the job as it. `None` without root.
    #[serde(default)]
    pub job_uid: Option<u32>,
    /// The job continues from the newest checkpoint valid on every server.
    #[serde(default)]
    pub resume: bool,
    /// The checkpoint series: the id of the job that started it (this job's
    /// own id unless it resumes another's checkpoints).
    #[serde(default)]
    pub checkpoint_series: Option<JobId>,
    /// The checkpoint secret (servers only): delivered here, on stdin, and
    /// held in memory only.
    #[serde(default)]
    pub checkpoint_key: Option<crate::store::checkpoint::CheckpointSecret>,
}

/// Step-level training figures of worker 0 over the steps since its
/// previous progress event, for `steps.csv`, TensorBoard and the
/// launcher's Prometheus endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepScalars {
    /// The global step the figures end at (from 1).
    pub global_step: u64,
    /// Mean training loss over those steps.
    pub train_loss: f64,
    /// The learning rate of the last of them.
    pub lr: f64,
    /// Worker 0's training samples per second over them.
    pub samples_per_s: f64,
    /// Bytes worker 0 pushed to the servers over them.
    pub bytes_pushed: u64,
    /// Bytes worker 0 pulled from the servers over them.
    pub bytes_pulled: u64,
}

/// What a [`Event::SuspectWorker`] says, in words: `server` names the
/// server whose shard it was found on.
pub fn suspect_text(server: &str, worker: u32, ratio: f64, steps: u32, step: u64) -> String {
    format!(
        "worker {worker} is suspect: its gradient norm on {server}'s shard was {ratio:.1}x the median of the workers' for {steps} steps in a row (to step {step})"
    )
}

/// Agent to launcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The agent leads its own process group (its id is `pid`): the launcher
    /// ends the group with `warden-agent stop-group` if the agent does not
    /// stop on request. `start` is the process's start time in clock ticks,
    /// against a reused PID.
    Process {
        /// Process id, also the group's id.
        pid: u32,
        /// Start time (field 22 of `/proc/PID/stat`).
        start: u64,
    },
    /// The agent's certificate signing request.
    Csr {
        /// PEM CSR.
        pem: String,
    },
    /// The agent listens here.
    Listening {
        /// Address.
        addr: String,
    },
    /// The role is set up and training is under way.
    Started,
    /// Something the user should know, shown once.
    Warning {
        /// The warning.
        message: String,
    },
    /// A worker's progress within an epoch.
    Progress {
        /// Epoch from 1.
        epoch: u32,
        /// Steps done in the epoch.
        step: u64,
        /// Steps per epoch.
        steps: u64,
        /// Worker 0's figures since its previous progress event.
        #[serde(default)]
        scalars: Option<StepScalars>,
    },
    /// A worker finished an epoch.
    Epoch {
        /// Epoch from 1.
        epoch: u32,
        /// Mean training loss over the epoch.
        train_loss: f64,
        /// Steps in the epoch.
        steps: u64,
        /// Training samples per second on this worker.
        samples_per_s: f64,
        /// Bytes this worker sent to servers in the epoch.
        bytes_pushed: u64,
        /// Bytes this worker received from servers in the epoch.
        bytes_pulled: u64,
    },
    /// A server found a worker's gradients standing out (`[training]
    /// suspect_ratio` times the median norm for `suspect_steps` steps).
    SuspectWorker {
        /// The worker's rank.
        worker: u32,
        /// Its norm over the workers' median in the last of those steps.
        ratio: f64,
        /// Steps in a row.
        steps: u32,
        /// The step that made it suspect.
        step: u64,
    },
    /// Worker 0's evaluation after an epoch.
    Eval {
        /// Epoch from 1.
        epoch: u32,
        /// Mean cross-entropy on the test set.
        test_loss: f64,
        /// Accuracy on the test set.
        test_accuracy: f64,
    },
    /// Every server wrote its shard of checkpoint `step` and the step is committed.
    Checkpoint {
        /// Global training step.
        step: u64,
        /// Encrypted bytes over all shards.
        bytes: u64,
    },
    /// The job continues from checkpoint `step`.
    Resumed {
        /// Global training step.
        step: u64,
    },
    /// The trained model is at this path on the agent's host.
    Model {
        /// Path of the model directory.
        path: PathBuf,
        /// The global training step whose weights it holds (`None` from a
        /// bring-your-own program, which saves what it likes).
        #[serde(default)]
        step: Option<u64>,
    },
    /// The role finished cleanly.
    Done,
    /// The role failed.
    Failed {
        /// Why, in words for the user.
        message: String,
        /// The failure follows from another process's (a peer's connection
        /// closed, or the scheduler aborted the job); see `RoleError::follows`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        follows: bool,
    },
}

impl Event {
    /// As one JSON line (no trailing newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("events always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_with_key(secret: &crate::store::checkpoint::CheckpointSecret) -> Control {
        Control::Bundle(Box::new(Bundle {
            job_id: JobId::generate(),
            job_toml: "x".repeat(10_000),
            job_file: "job.toml".into(),
            base_dir: PathBuf::from("/"),
            hosts: None,
            seed: 1,
            local: true,
            role: Role::Server,
            rank: 0,
            workdir: PathBuf::from("/tmp"),
            job_uid: Some(2_000_000_000),
            resume: false,
            checkpoint_series: None,
            checkpoint_key: Some(secret.clone()),
        }))
    }

    /// The launcher's line holds the key in one buffer that never grew
    /// (a grown vector leaves its old block uncleared).
    #[test]
    fn a_bundle_line_is_written_into_one_buffer_of_its_final_size() {
        let secret = crate::store::checkpoint::CheckpointSecret::generate();
        let line = bundle_with_key(&secret).to_line().unwrap();
        assert_eq!(line.capacity(), line.len());
        assert_eq!(line.last(), Some(&b'\n'));
        let hex = secret.to_hex();
        assert!(line.windows(64).any(|w| w == hex.as_bytes()));
    }

    /// Every byte the agent's reader handed out is gone from its buffer,
    /// the key among them; what it has not handed out yet is still there.
    #[test]
    fn the_control_reader_clears_what_it_handed_out() {
        let secret = crate::store::checkpoint::CheckpointSecret::generate();
        let mut input = bundle_with_key(&secret).to_line().unwrap().to_vec();
        input.extend_from_slice(b"{\"type\":\"stop\"}\n");
        let mut r = ClearingReader::new(&input[..]);
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        assert!(matches!(serde_json::from_slice(&line).unwrap(), Control::Bundle(_)));
        let hex = secret.to_hex();
        assert!(!r.buf.windows(64).any(|w| w == hex.as_bytes()), "the key stayed in the reader's buffer");
        let rest = &r.buf[..r.end];
        assert!(rest[..r.pos].iter().all(|b| *b == 0));
        assert_eq!(&rest[r.pos..], b"{\"type\":\"stop\"}\n");
        let mut tail = String::new();
        r.read_to_string(&mut tail).unwrap();
        assert_eq!(tail, "{\"type\":\"stop\"}\n");
        assert!(r.buf.iter().all(|b| *b == 0));
    }
}
