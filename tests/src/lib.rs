//! Helpers for warden's integration tests, one module per concern; each is
//! re-exported here, so a test needs only `use warden_tests::...`.
//!
//! # Layout
//!
//! - [`launcher`]: the built binaries ([`bin`], [`repo_root`]) and
//!   `warden launch` run by tests ([`spawn_launch`] + [`wait_for`],
//!   [`Launcher`], [`start_long_job`]).
//! - [`jobs`]: job files. [`JobFile`] builds one from `configs/local.toml`
//!   or a tiny one-of-each job; [`job_in`] rewrites `configs/local.toml` as
//!   text.
//! - [`procs`]: finding processes with [`Procs`] (by a test's tag, the
//!   executable, the name a process gives itself, its parent, its uid, its
//!   command line), and [`wait_gone`] to check a job left nothing behind.
//! - [`scratch`](mod@scratch): a directory per test, removed when it drops.
//! - [`pki`]: [`TestPki`], a job CA issuing credentials for any identity.
//! - [`cluster`]: [`RoleCluster`], a real scheduler and server role in this
//!   process on loopback, for attacking the server's port as a peer would.
//! - [`netns`], [`netns_transport`]: hosts in network namespaces with sshd,
//!   for tests of clusters over real SSH; [`slurm`](mod@slurm): a real Slurm
//!   cluster on such hosts.
#![allow(missing_docs)]

pub mod cluster;
pub mod jobs;
pub mod launcher;
pub mod netns;
pub mod netns_transport;
pub mod pki;
pub mod procs;
pub mod scratch;
pub mod slurm;

pub use cluster::{RoleCluster, assert_already_connected, bind_at, bind_two, honest_sgd_step};
pub use jobs::{JobFile, Raw, TomlValue, job_in};
pub use launcher::{
    Launcher, bin, interop_python, job_table, repo_root, require, require_root, spawn_launch, start_long,
    start_long_job, wait_for,
};
pub use pki::TestPki;
pub use procs::{Procs, fresh_tag, wait_gone};
pub use scratch::{Scratch, scratch};
