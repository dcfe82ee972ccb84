//! The job: its file parsed and validated ([`spec`]), the plan every
//! process derives from it ([`plan`]: processes, ranks, ports, shards,
//! firewall rules), hosts from a hostfile or an Ansible inventory
//! ([`inventory`]) or a Slurm allocation ([`slurm`]), and what a launch
//! would meet on this machine ([`preflight`]).

pub mod inventory;
pub mod plan;
pub mod preflight;
pub mod slurm;
pub mod spec;
