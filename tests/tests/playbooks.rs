//! The playbooks: `ansible-lint` clean on the production profile,
//! `ansible-playbook --syntax-check`, and real runs against this machine
//! (connection local, into a scratch directory): node-prep twice (the
//! second changes nothing), then teardown removing a crashed job's firewall
//! table, job directory and checkpoint steps past retention (and again,
//! changing nothing), with the Slurm prolog and epilog installed and run.
//! Ansible comes from `WARDEN_ANSIBLE` (a venv's bin
//! directory, made by `./scripts/test-all`).

use std::path::PathBuf;
use std::process::Command;

use warden_tests::{bin, repo_root, scratch};

fn ansible(tool: &str) -> PathBuf {
    let dir = std::env::var("WARDEN_ANSIBLE").unwrap_or_else(|_| {
        panic!("WARDEN_ANSIBLE must name a bin directory with ansible-playbook and ansible-lint; ./scripts/test-all makes target/ansible-venv")
    });
    PathBuf::from(dir).join(tool)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn the_playbooks_pass_ansible_lint_on_the_production_profile_and_the_syntax_check() {
    let root = repo_root();
    let lint = run(Command::new(ansible("ansible-lint"))
        .args(["--offline", "--profile", "production", "playbooks/"])
        .current_dir(&root)
        .env("ANSIBLE_LOCAL_TEMP", std::env::temp_dir()));
    assert!(lint.contains("Profile 'production' was required, and it passed"), "{lint}");
    run(Command::new(ansible("ansible-playbook"))
        .args([
            "--syntax-check",
            "-i",
            "playbooks/inventory.example.ini",
            "playbooks/node-prep.yml",
            "playbooks/teardown.yml",
        ])
        .current_dir(&root));
}

fn recap(text: &str) -> (u32, u32) {
    let line = text.lines().find(|l| l.contains(" ok=")).unwrap_or_else(|| panic!("no recap:\n{text}"));
    let field = |k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap();
    (field("changed="), field("failed="))
}

#[test]
fn node_prep_and_teardown_run_for_real_and_twice_change_nothing() {
    let dir = scratch("playbooks");
    let inv = dir.join("inventory.ini");
    std::fs::write(
        &inv,
        "[warden_nodes]\nlocalhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n",
    )
    .unwrap();
    let remote = dir.join("remote");
    let ck = remote.join("checkpoints");
    let vars = [
        format!("warden_remote_dir={}", remote.display()),
        format!("warden_checkpoint_dir={}", ck.display()),
        format!("warden_agent_binary={}", bin("warden-agent").display()),
        // The sshd drop-in goes to the scratch directory (validated by
        // `sshd -t` all the same), and this machine's sshd is not reloaded.
        format!("warden_sshd_dropin={}", dir.join("50-warden.conf").display()),
        "warden_reload_sshd=false".to_string(),
        "warden_slurm_prolog=true".to_string(),
        format!("warden_slurm_dir={}", dir.join("slurm").display()),
    ];
    let play = |name: &str| {
        let mut c = Command::new(ansible("ansible-playbook"));
        c.args(["-i".as_ref(), inv.as_os_str(), repo_root().join("playbooks").join(name).as_os_str()]);
        for v in &vars {
            c.args(["-e", v]);
        }
        recap(&run(&mut c))
    };
    let (changed, failed) = play("node-prep.yml");
    assert!(changed > 0 && failed == 0);
    assert_eq!(play("node-prep.yml"), (0, 0), "a second node-prep run changed something");
    assert!(remote.join("bin/warden-agent").is_file());
    // The Slurm prolog as installed runs the agent: a job warden did not
    // submit is left alone, one claiming ports past the allowed range is refused.
    let prolog = dir.join("slurm/prolog");
    let text = std::fs::read_to_string(&prolog).unwrap();
    assert!(text.contains("bin/warden-agent slurm prolog --ports 29500-29999"), "{text}");
    let slurm_env = [("SLURM_JOB_ID", "42"), ("SLURM_JOB_UID", "1000"), ("SLURM_NODELIST", "n1")];
    let said = run(Command::new(&prolog).envs(slurm_env).env("SLURM_JOB_COMMENT", "my run"));
    assert!(said.contains("job 42: not a warden job"), "{said}");
    // Refused without failing (a failed prolog drains the node), with a note
    // the job's agents report; the epilog removes the note.
    let comment = ("SLURM_JOB_COMMENT", "warden:ports=1024-2000");
    let said = run(Command::new(&prolog).envs(slurm_env).env(comment.0, comment.1));
    assert!(said.contains("no table: ports 1024-2000 are outside the allowed 29500-29999"), "{said}");
    let note = std::path::Path::new(warden_agent::host::slurm::NOTES).join("42");
    assert!(std::fs::read_to_string(&note).unwrap().starts_with("refused: "));
    let epilog = dir.join("slurm/epilog");
    assert!(std::fs::read_to_string(&epilog).unwrap().contains("bin/warden-agent slurm epilog"));
    run(Command::new(&epilog).envs(slurm_env).env(comment.0, comment.1));
    assert!(!note.exists(), "the epilog removes the note");
    let said = run(Command::new(&epilog).env("SLURM_JOB_ID", "43"));
    assert!(said.contains("job 43: not a warden job"), "{said}");
    let dropin = std::fs::read_to_string(dir.join("50-warden.conf")).unwrap();
    for line in ["PasswordAuthentication no", "PermitRootLogin prohibit-password", "MaxSessions 64"] {
        assert!(dropin.contains(line), "{dropin}");
    }
    let meta = std::fs::metadata(&ck).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o711);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0, "the checkpoint root is root's");

    // What a crashed job leaves: a firewall table, a job directory, old steps.
    let table = format!("warden_{}", &warden_tests::fresh_tag()[..12]);
    let mut install = Command::new(bin("warden-agent"))
        .args(["firewall", "install", &table])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(install.stdin.as_mut().unwrap(), format!("table inet {table} {{\n}}\n").as_bytes())
        .unwrap();
    drop(install.stdin.take());
    assert!(install.wait().unwrap().success());
    std::fs::create_dir_all(remote.join("jobs/0123abcd/localhost-worker-0")).unwrap();
    for step in 1..=4 {
        std::fs::create_dir_all(ck.join(format!("series/step-{step:012}"))).unwrap();
    }
    let (changed, failed) = play("teardown.yml");
    assert!(changed > 0 && failed == 0);
    let tables = run(Command::new(bin("warden-agent")).args(["firewall", "list"]));
    assert!(!tables.contains(&table), "{tables}");
    assert_eq!(std::fs::read_dir(remote.join("jobs")).unwrap().count(), 0);
    let mut kept: Vec<String> = std::fs::read_dir(ck.join("series"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-000000000003", "step-000000000004"]);
    assert_eq!(play("teardown.yml"), (0, 0), "a second teardown run changed something");
}

const YAML_INVENTORY: &str = "\
all:
  children:
    lab:
      hosts:
        n1:
          ansible_host: 10.0.5.1
          warden_workers: 2
        n2:
          ansible_host: 10.0.5.2
          ansible_port: 2222
          warden_scheduler: 1
    other:
      hosts:
        x1:
          ansible_host: 10.0.5.9
";

const DYNAMIC_INVENTORY: &str = r#"#!/usr/bin/env python3
import json, sys
if sys.argv[1:] == ["--list"]:
    print(json.dumps({
        "gpu": {"hosts": ["d1", "d2"], "vars": {"warden_workers": 3}},
        "_meta": {"hostvars": {"d1": {"ansible_host": "10.0.6.1"}, "d2": {"ansible_host": "10.0.6.2"}}},
    }))
else:
    print("{}")
"#;

/// `warden plan --json` of a job whose hosts come from `inventory`, with
/// `path` as PATH: (exit code, plan or stderr).
fn plan_with_inventory(dir: &std::path::Path, inventory: &str, group: Option<&str>, path: &str) -> (i32, String) {
    let mut job = warden_tests::JobFile::local().without("cluster.hosts").set("cluster", "inventory", inventory);
    if let Some(g) = group {
        job = job.set("cluster", "inventory_group", g);
    }
    let file = job.write(dir.join("job.toml"));
    let out = Command::new(bin("warden"))
        .args(["plan".as_ref(), file.as_os_str(), "--json".as_ref()])
        .env("PATH", path)
        .output()
        .unwrap();
    let text = if out.status.success() { out.stdout } else { out.stderr };
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&text).into_owned())
}

/// (host, role) of every process in a plan.
fn roles(plan: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(plan).unwrap();
    v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["host"].as_str().unwrap().into(), p["role"].as_str().unwrap().into()))
        .collect()
}

/// Inventories only Ansible reads, a YAML file and a dynamic inventory
/// script, give their hosts and variables through `ansible-inventory
/// --list`; without Ansible, one line says what to install.
#[test]
fn yaml_and_dynamic_inventories_are_read_through_ansible_inventory() {
    let dir = scratch("inventories");
    std::fs::write(dir.join("hosts.yml"), YAML_INVENTORY).unwrap();
    let script = dir.join("inventory.py");
    std::fs::write(&script, DYNAMIC_INVENTORY).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let with_ansible = format!("{}:{}", ansible("").display(), std::env::var("PATH").unwrap_or_default());

    let (code, plan) = plan_with_inventory(&dir, "hosts.yml", Some("lab"), &with_ansible);
    assert_eq!(code, 0, "{plan}");
    let r = roles(&plan);
    let on = |host: &str, role: &str| r.iter().filter(|(h, x)| h == host && x == role).count();
    assert_eq!(
        (on("n1", "worker"), on("n2", "worker"), on("n2", "scheduler"), on("n1", "scheduler")),
        (2, 1, 1, 0),
        "{plan}"
    );
    assert!(!r.iter().any(|(h, _)| h == "x1"), "x1 is not in the lab group: {plan}");
    assert!(plan.contains("10.0.5.1") && plan.contains("10.0.5.2"), "{plan}");

    let (code, plan) = plan_with_inventory(&dir, "inventory.py", None, &with_ansible);
    assert_eq!(code, 0, "{plan}");
    let r = roles(&plan);
    assert_eq!(r.iter().filter(|(h, x)| h == "d2" && x == "worker").count(), 3, "{plan}");
    assert!(plan.contains("10.0.6.1"), "{plan}");

    let (code, said) = plan_with_inventory(&dir, "hosts.yml", None, "/nonexistent");
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("only Ansible reads") && said.contains("pip install ansible-core"), "{said}");
    let (code, said) = plan_with_inventory(&dir, "hosts.yml", Some("gpu"), &with_ansible);
    assert_eq!(code, 2, "{said}");
    assert!(said.contains("no group `gpu`") && said.contains("lab"), "{said}");
}
