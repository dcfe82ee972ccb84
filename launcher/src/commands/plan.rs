//! `warden plan JOB [--json] [--local]`: what a launch would do; touches nothing.

use std::path::Path;

use warden_agent::job::plan::Plan;
use warden_agent::job::spec::JobSpec;
use warden_agent::net::identity::JobId;

use crate::cli::EXIT_OK;
use crate::error::CliError;

/// Prints the plan.
pub fn exec(job: &Path, json: bool, local: bool) -> Result<u8, CliError> {
    let (spec, _) = JobSpec::load(job).map_err(CliError::usage)?;
    let plan = Plan::new(&spec, &JobId::generate(), local);
    if json {
        println!("{}", serde_json::to_string_pretty(&plan).expect("plans serialize"));
    } else {
        print!("{}", render(&spec, &plan));
    }
    Ok(EXIT_OK)
}

/// The human-readable plan.
pub fn render(spec: &JobSpec, plan: &Plan) -> String {
    let mut s = format!(
        "job `{}` (example id {}; each launch draws a fresh one){}\n",
        spec.name,
        plan.job_id,
        if plan.local { ", local: every process on this machine" } else { "" }
    );
    s += &format!(
        "model: {} with {} parameters, sharded over {} server(s); optimizer {}; {} epoch(s) of batch {} ({})\n\n",
        format!("{:?}", spec.model.kind).to_lowercase(),
        plan.num_params,
        plan.count(warden_agent::net::identity::Role::Server),
        spec.optimizer,
        spec.training.epochs,
        spec.training.batch_size,
        format!("{:?}", spec.training.mode).to_lowercase()
    );
    s += &format!(
        "lifetime: at most {} h (max_hours): certificates expire then, and the job is stopped with its model kept\n",
        spec.max_hours
    );
    s +=
        &format!("training processes run as user `{}` (no capabilities, no_new_privs, seccomp)\n\n", spec.cluster.user);
    if let Some(slurm) = &spec.cluster.slurm {
        s += &match warden_agent::job::slurm::job_id().ok().flatten() {
            Some(id) => format!("hosts: the nodes of Slurm job {id} (agents start as its steps)\n"),
            None => format!(
                "hosts: {} Slurm node(s) that `warden launch` asks sbatch for; named node-1 ... here until allocated\n",
                slurm.nodes
            ),
        };
        s += "Slurm steps run as the submitting user: unless that is root, the job gets no uid of its own on \
              the nodes, and a firewall table only from warden's Slurm prolog where the admin installed it \
              (docs/slurm.md; the launch says per node); the agents keep no capabilities, no_new_privs and \
              seccomp either way\n\n";
    }
    if let Some(list) = &spec.cluster.hosts_from {
        s += &format!("hosts from {} (reached over SSH as):\n", list.display());
        for h in &spec.cluster.hosts {
            let key = h.identity_file.as_ref().map(|k| format!(" (key {})", k.display())).unwrap_or_default();
            s += &format!("  {:<14} {} at {}{key}\n", h.name, h.ssh, h.address);
        }
        s += "\n";
    }
    s += &format!("{:<14} {:<16} {:<22} {}\n", "HOST", "PROCESS", "LISTENS", "CERTIFICATE IDENTITY");
    for p in &plan.processes {
        let listens = p.socket().map_or_else(|| "-".to_string(), |a| a.to_string());
        s += &format!("{:<14} {:<16} {:<22} {}\n", p.host, format!("{}[{}]", p.role, p.rank), listens, p.identity);
    }
    for h in &plan.hosts {
        s += &format!("\nfirewall on {} ({}):\n", h.name, h.address);
        for line in h.firewall.lines() {
            s += &format!("  {line}\n");
        }
    }
    s
}
