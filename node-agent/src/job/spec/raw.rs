//! Raw serde mirror of the job file, one struct per table. Unknown keys are
//! errors everywhere; every value a later check may point at keeps its
//! source span ([`Spanned`]).
#![allow(missing_docs)]

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub job: Spanned<Job>,
    pub cluster: Spanned<Cluster>,
    pub model: Spanned<Model>,
    pub data: Option<Spanned<Data>>,
    pub optimizer: Spanned<Optimizer>,
    pub training: Spanned<Training>,
    #[serde(default)]
    pub worker: Option<Spanned<Worker>>,
    #[serde(default)]
    pub limits: Option<Spanned<Limits>>,
    #[serde(default)]
    pub checkpoint: Option<Spanned<Checkpoint>>,
    #[serde(default)]
    pub signing: Option<Spanned<Signing>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub name: Spanned<String>,
    pub seed: Option<Spanned<i64>>,
    pub max_hours: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub user: Spanned<String>,
    pub uids: Option<Spanned<Vec<Spanned<i64>>>>,
    pub ssh_config: Option<Spanned<String>>,
    pub remote_dir: Option<Spanned<String>>,
    #[serde(rename = "become")]
    pub become_: Option<Spanned<String>>,
    pub backend: Option<Spanned<String>>,
    pub same_host: Option<Spanned<String>>,
    pub ports: Spanned<Vec<Spanned<i64>>>,
    pub scheduler_port: Option<Spanned<i64>>,
    pub hosts: Option<Spanned<Vec<Spanned<Host>>>>,
    pub hostfile: Option<Spanned<String>>,
    pub inventory: Option<Spanned<String>>,
    pub inventory_group: Option<Spanned<String>>,
    pub servers_per_host: Option<Spanned<i64>>,
    pub slurm: Option<Spanned<Slurm>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slurm {
    pub nodes: Spanned<i64>,
    pub workers_per_node: Option<Spanned<i64>>,
    pub servers_per_node: Option<Spanned<i64>>,
    pub partition: Option<Spanned<String>>,
    pub time: Option<Spanned<String>>,
    pub account: Option<Spanned<String>>,
    pub sbatch_options: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: Option<Spanned<String>>,
    pub address: Spanned<String>,
    pub ssh: Option<Spanned<String>>,
    #[serde(default)]
    pub scheduler: Option<Spanned<i64>>,
    #[serde(default)]
    pub servers: Option<Spanned<i64>>,
    #[serde(default)]
    pub workers: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub kind: Spanned<String>,
    pub inputs: Option<Spanned<i64>>,
    pub classes: Option<Spanned<i64>>,
    pub params: Option<Spanned<i64>>,
    pub hidden: Option<Spanned<Vec<Spanned<i64>>>>,
    pub dropout: Option<Spanned<f64>>,
    pub init: Option<Spanned<String>>,
    pub trusted_keys: Option<Spanned<Vec<Spanned<String>>>>,
    pub tensors: Option<Spanned<std::collections::BTreeMap<String, Spanned<Vec<i64>>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    pub command: Spanned<Vec<String>>,
    pub workdir: Option<Spanned<String>>,
    pub env: Option<Spanned<std::collections::BTreeMap<String, String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signing {
    pub key: Spanned<String>,
    pub passphrase_env: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Data {
    pub format: Spanned<String>,
    pub train_images: Option<Spanned<String>>,
    pub train_labels: Option<Spanned<String>>,
    pub test_images: Option<Spanned<String>>,
    pub test_labels: Option<Spanned<String>>,
    pub train: Option<Spanned<String>>,
    pub test: Option<Spanned<String>>,
    pub test_fraction: Option<Spanned<f64>>,
    pub header: Option<Spanned<bool>>,
    pub scale: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Optimizer {
    pub kind: Spanned<String>,
    pub lr: Spanned<f64>,
    pub momentum: Option<Spanned<f64>>,
    pub nesterov: Option<Spanned<bool>>,
    pub beta1: Option<Spanned<f64>>,
    pub beta2: Option<Spanned<f64>>,
    pub eps: Option<Spanned<f64>>,
    pub weight_decay: Option<Spanned<f64>>,
    pub clip_gradient: Option<Spanned<f64>>,
    pub schedule: Option<Spanned<String>>,
    pub warmup_steps: Option<Spanned<i64>>,
    pub step_every: Option<Spanned<i64>>,
    pub step_gamma: Option<Spanned<f64>>,
    pub decay_steps: Option<Spanned<i64>>,
    pub min_lr: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    pub epochs: Spanned<i64>,
    pub batch_size: Spanned<i64>,
    pub mode: Option<Spanned<String>>,
    pub steps: Option<Spanned<i64>>,
    pub compression: Option<Spanned<String>>,
    pub compression_threshold: Option<Spanned<f64>>,
    pub heartbeat_timeout: Option<Spanned<i64>>,
    pub chunk_kib: Option<Spanned<i64>>,
    pub aggregation: Option<Spanned<String>>,
    pub trim: Option<Spanned<i64>>,
    pub clip_radius: Option<Spanned<f64>>,
    pub suspect_ratio: Option<Spanned<f64>>,
    pub suspect_steps: Option<Spanned<i64>>,
    pub on_suspect: Option<Spanned<String>>,
    pub on_failure: Option<Spanned<String>>,
    pub max_restarts: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub dir: Option<Spanned<String>>,
    pub every_steps: Option<Spanned<i64>>,
    pub every_seconds: Option<Spanned<i64>>,
    pub keep_last: Option<Spanned<i64>>,
    pub keep_last_after_job: Option<Spanned<i64>>,
    pub key_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_frame_mib: Option<Spanned<i64>>,
    pub first_message_timeout_ms: Option<Spanned<i64>>,
    pub connect_timeout_s: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_source: Option<Spanned<i64>>,
    pub stall_timeout_s: Option<Spanned<i64>>,
}
