//! The `warden` launcher: job file -> plan -> certificates -> processes ->
//! training -> model and summary.
//!
//! # Layout
//! - [`cli`] parses arguments and prints a command's [`error::CliError`];
//!   [`commands`] has one module per subcommand.
//! - [`launch`] orchestrates a job over a [`transport::Transport`]: local
//!   processes, [`ssh`] to lab machines, or [`slurm`] job steps.
//! - [`rundir`] writes what a run leaves behind; [`plot`] draws it;
//!   [`telemetry`] writes step-level figures (`steps.csv`, [`tensorboard`]
//!   event files) and serves them to Prometheus.
//!
//! The job spec, plan and identities come from the agent's library
//! (`warden_agent`), never re-implemented here.
#![deny(missing_docs)]

pub mod cli;
pub mod commands;
pub mod error;
pub mod launch;
pub mod plot;
pub mod rundir;
pub mod serve;
pub mod slurm;
pub mod ssh;
pub mod telemetry;
pub mod tensorboard;
pub mod transport;
