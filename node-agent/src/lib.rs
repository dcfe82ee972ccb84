//! warden's node agent library: everything a job's processes share.
//!
//! # Layout
//! - [`spec`]: the job file, parsed then validated into a [`spec::JobSpec`].
//! - [`plan`]: processes, ranks, ports, shards and firewall rules of a job.
//! - [`identity`], [`pki`], [`tls`]: who a process is, the per-job CA and
//!   node keys, mutual TLS 1.3 with role authorization in the handshake.
//! - [`wire`], [`conn`]: the framed protocol, its messages and who may send
//!   each, and authenticated connections with limits and deadlines.
//! - [`control`], [`agent`]: the launcher-agent channel over stdin/stdout and
//!   the agent process's set-up; [`harden`]: the privilege drop; [`firewall`]:
//!   the per-job nftables table; [`jobuid`]: the uid each job has on each
//!   host, leased and ended; [`host`]: a job's set-up and teardown on a
//!   host as root (`warden-agent host`); [`privfs`]: what root does to paths that job
//!   users can write, by file descriptor; [`reap`]: ending process groups.
//! - [`roles`]: scheduler, server and worker.
//! - [`optimizer`], [`model`], [`data`], [`artifact`]: training itself.
//! - [`secure_random`] and [`train_rng`]: the two kinds of randomness, kept apart;
//!   [`hex`]: bytes as text.
//! - [`fuzz`]: entry points for fuzzing every parser of untrusted bytes.
#![deny(missing_docs)]
#![cfg_attr(test, allow(unsafe_code))]

pub use warden_kernels as kernels;

pub mod agent;
pub mod artifact;
pub mod checkpoint;
pub mod conn;
pub mod control;
pub mod data;
pub mod firewall;
pub mod fuzz;
pub mod harden;
pub mod hex;
pub mod host;
pub mod identity;
pub mod inventory;
pub mod jobuid;
pub mod kv;
pub mod model;
pub mod optimizer;
pub mod pki;
pub mod plan;
pub mod preflight;
pub mod privfs;
pub mod reap;
pub mod roles;
pub mod secure_random;
pub mod signing;
pub mod spec;
pub mod tls;
pub mod train_rng;
pub mod wire;
