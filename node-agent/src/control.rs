//! The control channel between the launcher and an agent process.
//!
//! It runs over the agent's stdin and stdout, whatever carries them: a local
//! pipe or an SSH session. Both directions are JSON lines. The launcher
//! writes a [`Control::Bundle`], reads the agent's [`Event::Csr`], answers
//! with [`Control::Certificate`], then reads events until the agent exits.
//! When the agent's stdin closes (the launcher died or stopped the job), the
//! agent stops.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::identity::{JobId, Role};

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
    /// Stop now.
    Stop,
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
    pub hosts: Option<Vec<crate::spec::HostSpec>>,
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
    /// The uid leased to the job on this host ([`crate::jobuid`]); the
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
    pub checkpoint_key: Option<crate::checkpoint::CheckpointSecret>,
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
