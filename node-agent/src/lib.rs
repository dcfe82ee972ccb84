//! warden's node agent library: everything a job's processes share.
//!
//! # Layout
//! - [`job`]: the job file ([`job::spec`]), the plan derived from it, hosts
//!   from inventories, and preflight checks.
//! - [`net`]: identities, the per-job CA, mutual TLS, the wire protocol,
//!   authenticated connections, and the launcher-agent control channel.
//! - [`train`]: the scheduler, server and worker roles, optimizers, models,
//!   data, training randomness, and the KV socket for users' programs.
//! - [`store`]: encrypted checkpoints, the model artifact and its signature.
//! - [`host`]: a job's set-up and teardown on a host as root (`warden-agent
//!   host`): the privilege drop, the firewall, per-job uids, root's path
//!   handling by file descriptor, ending process groups.
//! - [`agent`]: the agent process's set-up, from bundle to running role.
//! - [`secure_random`]: the CSPRNG for keys and ids, kept apart from
//!   training randomness; [`hex`]: bytes as text.
//! - [`fuzz`]: entry points for fuzzing every parser of untrusted bytes.
#![deny(missing_docs)]
#![cfg_attr(test, allow(unsafe_code))]

pub use warden_kernels as kernels;

pub mod agent;
pub mod fuzz;
pub mod hex;
pub mod host;
pub mod job;
pub mod net;
pub mod secure_random;
pub mod store;
pub mod train;
