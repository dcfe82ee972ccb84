//! The job-file validator: a table of broken job files, each checked for its
//! exact message, its line and column, and its help; plus the CLI contract of
//! `warden validate` (exit 2 and `error: FILE:LINE:COL: ...`).

use std::path::Path;
use std::process::Command;

use warden_agent::job::spec::JobSpec;
use warden_tests::{bin, repo_root};

const BASE: &str = r#"[job]
name = "t"
seed = 1

[cluster]
user = "warden"
ports = [29500, 29599]

[[cluster.hosts]]
name = "a"
address = "10.0.0.1"
scheduler = 1
servers = 1
workers = 1

[[cluster.hosts]]
name = "b"
address = "10.0.0.2"
workers = 1

[model]
kind = "softmax"
inputs = 784
classes = 10

[data]
format = "idx"
train_images = "tr-i"
train_labels = "tr-l"
test_images = "te-i"
test_labels = "te-l"

[optimizer]
kind = "sgd"
lr = 0.1

[training]
epochs = 1
batch_size = 32
"#;

/// One broken file: replace `from` with `to` in BASE (must occur once), and
/// expect an error at the `^` in `at` (or its start), at `at`'s first
/// occurrence in the result.
struct Case {
    name: &'static str,
    from: &'static str,
    to: &'static str,
    at: &'static str,
    message: &'static str,
    help: Option<&'static str>,
}

fn location(text: &str, at: &str) -> (usize, usize) {
    let caret = at.find('^').unwrap_or(0);
    let needle = at.replacen('^', "", 1);
    let off = text.find(&needle).unwrap_or_else(|| panic!("`{needle}` not in the broken file")) + caret;
    let before = &text[..off];
    (before.matches('\n').count() + 1, off - before.rfind('\n').map_or(0, |i| i + 1) + 1)
}

const CASES: &[Case] = &[
    Case {
        name: "slurm backend without its table",
        from: "ports = [29500, 29599]",
        to: "ports = [29500, 29599]\nbackend = \"slurm\"",
        at: "\"slurm\"",
        message: "backend = \"slurm\" needs a [cluster.slurm] table",
        help: Some("add [cluster.slurm] with nodes = N (docs/slurm.md), in place of the host list"),
    },
    Case {
        name: "unknown backend",
        from: "ports = [29500, 29599]",
        to: "ports = [29500, 29599]\nbackend = \"k8s\"",
        at: "\"k8s\"",
        message: "unknown backend `k8s`",
        help: Some("use \"ssh\" or \"slurm\""),
    },
    Case {
        name: "slurm nodes out of range",
        from: "[[cluster.hosts]]\nname = \"a\"\naddress = \"10.0.0.1\"\nscheduler = 1\nservers = 1\nworkers = 1\n\n[[cluster.hosts]]\nname = \"b\"\naddress = \"10.0.0.2\"\nworkers = 1\n",
        to: "[cluster.slurm]\nnodes = 0\n",
        at: "nodes = ^0",
        message: "nodes must be between 1 and 4096, not 0",
        help: Some("the number of nodes to run on, for example nodes = 2"),
    },
    Case {
        name: "slurm partition of two words",
        from: "[[cluster.hosts]]\nname = \"a\"\naddress = \"10.0.0.1\"\nscheduler = 1\nservers = 1\nworkers = 1\n\n[[cluster.hosts]]\nname = \"b\"\naddress = \"10.0.0.2\"\nworkers = 1\n",
        to: "[cluster.slurm]\nnodes = 2\npartition = \"gpu debug\"\n",
        at: "\"gpu debug\"",
        message: "partition must be one word",
        help: Some("for example partition = \"gpu\""),
    },
    Case {
        name: "slurm option in short form",
        from: "[[cluster.hosts]]\nname = \"a\"\naddress = \"10.0.0.1\"\nscheduler = 1\nservers = 1\nworkers = 1\n\n[[cluster.hosts]]\nname = \"b\"\naddress = \"10.0.0.2\"\nworkers = 1\n",
        to: "[cluster.slurm]\nnodes = 2\nsbatch_options = [\"-N 3\"]\n",
        at: "\"-N 3\"",
        message: "`-N 3` is not an sbatch option",
        help: Some(
            "give each option as one string in its long form, for example sbatch_options = [\"--exclusive\", \"--qos=high\"]",
        ),
    },
    Case {
        name: "slurm with servers_per_host",
        from: "[[cluster.hosts]]\nname = \"a\"\naddress = \"10.0.0.1\"\nscheduler = 1\nservers = 1\nworkers = 1\n\n[[cluster.hosts]]\nname = \"b\"\naddress = \"10.0.0.2\"\nworkers = 1\n",
        to: "servers_per_host = 2\n[cluster.slurm]\nnodes = 2\n",
        at: "servers_per_host = ^2",
        message: "servers_per_host applies to hosts from a hostfile or inventory",
        help: Some("set servers_per_node in [cluster.slurm] instead"),
    },
    Case {
        name: "syntax error",
        from: "seed = 1",
        to: "seed = = 1",
        at: "= 1",
        message: "extra `=`, expected nothing",
        help: None,
    },
    Case {
        name: "unknown key with a close match",
        from: "lr = 0.1",
        to: "lr8 = 0.1",
        at: "lr8",
        message: "unknown field `lr8`, expected one of `kind`, `lr`, `momentum`, `nesterov`, `beta1`, `beta2`, `eps`, `weight_decay`, `clip_gradient`, `schedule`, `warmup_steps`, `step_every`, `step_gamma`, `decay_steps`, `min_lr`",
        help: Some("did you mean `lr`?"),
    },
    Case {
        name: "misspelt section",
        from: "[training]",
        to: "[trainig]",
        at: "trainig",
        message: "unknown field `trainig`, expected one of `job`, `cluster`, `model`, `data`, `optimizer`, `training`, `worker`, `limits`, `checkpoint`, `signing`",
        help: Some("did you mean `training`?"),
    },
    Case {
        name: "wrong type",
        from: "epochs = 1",
        to: "epochs = \"one\"",
        at: "\"one\"",
        message: "invalid type: string \"one\", expected i64",
        help: Some("check the value's type: numbers are unquoted, text is in quotes"),
    },
    Case {
        name: "missing section",
        from: "[model]\nkind = \"softmax\"\ninputs = 784\nclasses = 10\n",
        to: "",
        at: "[job]",
        message: "missing field `model`",
        help: Some("add it; configs/local.toml shows every section with its keys"),
    },
    Case {
        name: "two schedulers",
        from: "address = \"10.0.0.2\"\n",
        to: "address = \"10.0.0.2\"\nscheduler = 1\n",
        at: "^[[cluster.hosts]]",
        message: "the cluster needs exactly one scheduler, but has 2",
        help: Some("set scheduler = 1 on exactly one host"),
    },
    Case {
        name: "no server",
        from: "servers = 1\n",
        to: "servers = 0\n",
        at: "^[[cluster.hosts]]",
        message: "the cluster has no server",
        help: Some("set servers = 1 (or more) on a host"),
    },
    Case {
        name: "no worker",
        from: "workers = 1\n\n[[cluster.hosts]]\nname = \"b\"\naddress = \"10.0.0.2\"\nworkers = 1\n",
        to: "workers = 0\n",
        at: "^[[cluster.hosts]]",
        message: "the cluster has no worker",
        help: Some("set workers = 1 (or more) on a host"),
    },
    Case {
        name: "duplicate host name",
        from: "name = \"b\"",
        to: "name = \"a\"",
        at: "\"a\"\naddress = \"10.0.0.2\"",
        message: "host `a` is listed twice",
        help: Some("list each host once; give it more servers or workers instead"),
    },
    Case {
        name: "duplicate address",
        from: "address = \"10.0.0.2\"",
        to: "address = \"10.0.0.1\"",
        at: "\"10.0.0.1\"\nworkers",
        message: "address 10.0.0.1 is used by two hosts",
        help: Some("list each host once; give it more servers or workers instead"),
    },
    Case {
        name: "address is not an IP",
        from: "address = \"10.0.0.2\"",
        to: "address = \"node-b\"",
        at: "\"node-b\"",
        message: "`node-b` is not an IP address",
        help: Some("give the address peers reach this host at, for example address = \"10.0.0.5\""),
    },
    Case {
        name: "port below 1024",
        from: "ports = [29500, 29599]",
        to: "ports = [80, 29599]",
        at: "80",
        message: "the first port must be between 1024 and 65535, not 80",
        help: Some("ports are 1024 to 65535; for example: ports = [29500, 29599]"),
    },
    Case {
        name: "empty port range",
        from: "ports = [29500, 29599]",
        to: "ports = [29599, 29500]",
        at: "[29599",
        message: "port range is empty: 29599 is after 29500",
        help: Some("write the lower port first"),
    },
    Case {
        name: "scheduler port outside the range",
        from: "ports = [29500, 29599]",
        to: "ports = [29500, 29599]\nscheduler_port = 30000",
        at: "30000",
        message: "scheduler_port 30000 is outside the job's ports 29500-29599",
        help: Some("pick a port inside `ports`, or leave scheduler_port out"),
    },
    Case {
        name: "port range too small for the host",
        from: "ports = [29500, 29599]",
        to: "ports = [29500, 29500]",
        at: "^[[cluster.hosts]]",
        message: "host `a` needs 2 ports (1 per scheduler and server) but the range 29500-29500 has 1",
        help: Some("widen [cluster] ports"),
    },
    Case {
        name: "learning rate out of range",
        from: "lr = 0.1",
        to: "lr = 50.0",
        at: "50.0",
        message: "optimizer lr = 50 is out of range (0, 10]",
        help: Some("a learning rate above 0 and at most 10; 0.1 is a common start for SGD, 0.001 for Adam"),
    },
    Case {
        name: "momentum out of range",
        from: "kind = \"sgd\"",
        to: "kind = \"momentum\"\nmomentum = 1.5",
        at: "1.5",
        message: "optimizer momentum = 1.5 is out of range [0, 1)",
        help: Some("momentum from 0 up to (not including) 1; 0.9 is common"),
    },
    Case {
        name: "momentum without the momentum optimizer",
        from: "lr = 0.1",
        to: "lr = 0.1\nmomentum = 0.9",
        at: "0.9",
        message: "`momentum` needs kind = \"momentum\"",
        help: Some("set kind = \"momentum\", or remove `momentum`"),
    },
    Case {
        name: "unknown optimizer kind",
        from: "kind = \"sgd\"",
        to: "kind = \"pickle\"",
        at: "\"pickle\"",
        message: "unknown optimizer kind `pickle`",
        help: Some("supported: \"sgd\", \"momentum\", \"adam\", \"adamw\""),
    },
    Case {
        name: "training as root",
        from: "user = \"warden\"",
        to: "user = \"root\"",
        at: "\"root\"",
        message: "training must not run as root",
        help: Some("name an unprivileged account, for example user = \"warden\" (playbooks/node-prep.yml creates it)"),
    },
    Case {
        name: "zero batch size",
        from: "batch_size = 32",
        to: "batch_size = 0",
        at: "batch_size = ^0",
        message: "batch_size must be between 1 and 1048576, not 0",
        help: Some("samples per step on each worker, for example batch_size = 64"),
    },
    Case {
        name: "unknown sync mode",
        from: "batch_size = 32",
        to: "batch_size = 32\nmode = \"eventually\"",
        at: "\"eventually\"",
        message: "unknown training mode `eventually`",
        help: Some("use \"sync\" or \"async\""),
    },
    Case {
        name: "adam key on sgd",
        from: "lr = 0.1",
        to: "lr = 0.1\nbeta1 = 0.9",
        at: "beta1 = ^0.9",
        message: "`beta1` needs kind = \"adam\" or kind = \"adamw\"",
        help: Some("set kind = \"adam\" or kind = \"adamw\", or remove `beta1`"),
    },
    Case {
        name: "beta out of range",
        from: "kind = \"sgd\"",
        to: "kind = \"adamw\"\nbeta2 = 1.0",
        at: "beta2 = ^1.0",
        message: "optimizer beta2 = 1 is out of range [0, 1)",
        help: Some("betas from 0 up to (not including) 1; 0.9 and 0.999 are common"),
    },
    Case {
        name: "cosine schedule without its length",
        from: "lr = 0.1",
        to: "lr = 0.1\nschedule = \"cosine\"",
        at: "schedule = ^\"cosine\"",
        message: "schedule = \"cosine\" needs decay_steps",
        help: Some("add for example decay_steps = 5000 (updates to decay over)"),
    },
    Case {
        name: "schedule key without its schedule",
        from: "lr = 0.1",
        to: "lr = 0.1\nstep_gamma = 0.5",
        at: "step_gamma = ^0.5",
        message: "`step_gamma` needs schedule = \"step\"",
        help: Some("set schedule = \"step\", or remove `step_gamma`"),
    },
    Case {
        name: "negative gradient clip",
        from: "lr = 0.1",
        to: "lr = 0.1\nclip_gradient = -1.0",
        at: "clip_gradient = ^-1.0",
        message: "optimizer clip_gradient = -1 is out of range 0 or (0, 1e6]",
        help: Some("0 turns clipping off; otherwise a bound above 0, such as 5"),
    },
    Case {
        name: "mlp without hidden layers",
        from: "kind = \"softmax\"",
        to: "kind = \"mlp\"",
        at: "kind = ^\"mlp\"",
        message: "an mlp needs hidden layers",
        help: Some("add for example hidden = [256]"),
    },
    Case {
        name: "dropout on softmax",
        from: "classes = 10",
        to: "classes = 10\ndropout = 0.5",
        at: "dropout = ^0.5",
        message: "dropout applies to hidden layers; softmax regression has none",
        help: Some("remove `dropout`"),
    },
    Case {
        name: "idx test images without labels",
        from: "test_labels = \"te-l\"\n",
        to: "",
        at: "test_images = ^\"te-i\"",
        message: "test_images and test_labels go together",
        help: Some("name both, or neither to hold out test_fraction of the training set"),
    },
    Case {
        name: "csv keys for idx-named data",
        from: "format = \"idx\"",
        to: "format = \"csv\"",
        at: "train_images = ^\"tr-i\"",
        message: "CSV and LIBSVM data are named with `train` (and `test`)",
        help: Some("use train = \"file\", or set format = \"idx\""),
    },
    Case {
        name: "too many classes for byte labels",
        from: "classes = 10",
        to: "classes = 1000",
        at: "classes = ^1000",
        message: "classes must be between 2 and 256, not 1000",
        help: Some("the number of classes (2 to 256), 10 for Fashion-MNIST"),
    },
    Case {
        name: "initial weights without trusted keys",
        from: "classes = 10",
        to: "classes = 10\ninit = \"models/base\"",
        at: "init = ^\"models/base\"",
        message: "initial weights are loaded only after their signature is verified: `init` needs trusted_keys",
        help: Some("add trusted_keys = [\"keys/public.pem\"] (public keys whose signatures you accept)"),
    },
    Case {
        name: "checkpoint without a directory",
        from: "batch_size = 32\n",
        to: "batch_size = 32\n[checkpoint]\nevery_steps = 100\n",
        at: "[checkpoint]",
        message: "[checkpoint] needs dir: where the servers keep their encrypted checkpoints",
        help: Some("add for example dir = \"/var/lib/warden/checkpoints\""),
    },
    Case {
        name: "checkpoint without a schedule",
        from: "batch_size = 32\n",
        to: "batch_size = 32\n[checkpoint]\ndir = \"/ck\"\n",
        at: "[checkpoint]",
        message: "[checkpoint] needs every_steps, every_seconds or both: when to take a checkpoint",
        help: Some("add for example every_steps = 500"),
    },
    Case {
        name: "more kept after the job than during it",
        from: "batch_size = 32\n",
        to: "batch_size = 32\n[checkpoint]\ndir = \"/ck\"\nevery_steps = 10\nkeep_last = 2\nkeep_last_after_job = 3\n",
        at: "keep_last_after_job = ^3",
        message: "keep_last_after_job must be between 0 and 2, not 3",
        help: Some("at most keep_last; 0 deletes them all"),
    },
    Case {
        name: "worker command without an external model",
        from: "batch_size = 32\n",
        to: "batch_size = 32\n[worker]\ncommand = [\"python3\", \"train.py\"]\n",
        at: "^[worker]",
        message: "[worker] command runs your own program, which needs [model] kind = \"external\"",
        help: Some("set kind = \"external\" and declare [model.tensors], or remove [worker]"),
    },
    Case {
        name: "external model without tensors",
        from: "kind = \"softmax\"\ninputs = 784\nclasses = 10\n",
        to: "kind = \"external\"\n",
        at: "kind = ^\"external\"",
        message: "an external model declares its tensors",
        help: Some("add [model.tensors] with name = [shape], for example w = [784, 10]"),
    },
    Case {
        name: "restart without checkpoints",
        from: "batch_size = 32\n",
        to: "batch_size = 32\non_failure = \"restart\"\n",
        at: "on_failure = ^\"restart\"",
        message: "on_failure = \"restart\" resumes from the newest checkpoint, but the job file has no [checkpoint] section",
        help: Some("add [checkpoint] with every_steps or every_seconds (see docs/checkpoints.md)"),
    },
    Case {
        name: "max_restarts without restart",
        from: "batch_size = 32\n",
        to: "batch_size = 32\nmax_restarts = 2\n",
        at: "max_restarts = ^2",
        message: "max_restarts belongs to on_failure = \"restart\"",
        help: Some("set on_failure = \"restart\", or remove max_restarts"),
    },
    Case {
        name: "unknown on_failure",
        from: "batch_size = 32\n",
        to: "batch_size = 32\non_failure = \"retry\"\n",
        at: "on_failure = ^\"retry\"",
        message: "unknown on_failure `retry`",
        help: Some("use \"fail\" or \"restart\""),
    },
    Case {
        name: "too many restarts",
        from: "batch_size = 32\n",
        to: "batch_size = 32\non_failure = \"restart\"\nmax_restarts = 1000\n[checkpoint]\ndir = \"/ck\"\nevery_steps = 10\n",
        at: "max_restarts = ^1000",
        message: "max_restarts must be between 1 and 100, not 1000",
        help: Some("how many times the job may start again; 3 is typical"),
    },
    Case {
        name: "trimmed mean without trim",
        from: "batch_size = 32\n",
        to: "batch_size = 32\naggregation = \"trimmed_mean\"\n",
        at: "aggregation = ^\"trimmed_mean\"",
        message: "aggregation = \"trimmed_mean\" needs `trim`, the workers dropped at each end",
        help: Some("add trim = 1 to withstand one misbehaving worker (it needs at least 3 workers)"),
    },
    Case {
        name: "trim leaving nothing",
        from: "batch_size = 32\n",
        to: "batch_size = 32\naggregation = \"trimmed_mean\"\ntrim = 1\n",
        at: "trim = ^1",
        message: "trim = 1 drops 2 values of 2 workers: nothing would be left",
        help: Some("use at least 2 x trim + 1 workers, or aggregation = \"median\""),
    },
    Case {
        name: "robust aggregation in async mode",
        from: "batch_size = 32\n",
        to: "batch_size = 32\nmode = \"async\"\naggregation = \"median\"\n",
        at: "aggregation = ^\"median\"",
        message: "robust aggregation needs every worker's gradient of a step at once, which async mode never has",
        help: Some("use mode = \"sync\", or aggregation = \"mean\""),
    },
    Case {
        name: "unknown aggregation",
        from: "batch_size = 32\n",
        to: "batch_size = 32\naggregation = \"krum\"\n",
        at: "aggregation = ^\"krum\"",
        message: "unknown aggregation `krum`",
        help: Some("use \"mean\", \"trimmed_mean\" (with trim), \"median\" or \"centered_clip\" (with clip_radius)"),
    },
    Case {
        name: "centered clipping without a radius",
        from: "batch_size = 32\n",
        to: "batch_size = 32\naggregation = \"centered_clip\"\n",
        at: "aggregation = ^\"centered_clip\"",
        message: "aggregation = \"centered_clip\" needs `clip_radius`, the L2 norm a worker's gradient may differ from the last step's by",
        help: Some("set it near the norm of a typical gradient on a server's chunk, for example clip_radius = 1.0"),
    },
    Case {
        name: "unknown same_host",
        from: "user = \"warden\"\n",
        to: "user = \"warden\"\nsame_host = \"pipe\"\n",
        at: "same_host = ^\"pipe\"",
        message: "unknown same_host `pipe`",
        help: Some(
            "use \"unix\" (a worker reaches a server on its own host through the server's Unix-domain socket) or \"tcp\"",
        ),
    },
    Case {
        name: "unknown on_suspect",
        from: "batch_size = 32\n",
        to: "batch_size = 32\non_suspect = \"ignore\"\n",
        at: "on_suspect = ^\"ignore\"",
        message: "unknown on_suspect `ignore`",
        help: Some("use \"warn\" or \"fail\""),
    },
    Case {
        name: "suspect ratio of one",
        from: "batch_size = 32\n",
        to: "batch_size = 32\nsuspect_ratio = 1.0\n",
        at: "suspect_ratio = ^1.0",
        message: "suspect_ratio must be above 1 and at most 1e6, not 1",
        help: Some("times the median gradient norm that makes a worker suspect; 10 is the default"),
    },
    Case {
        name: "trim without trimmed mean",
        from: "batch_size = 32\n",
        to: "batch_size = 32\naggregation = \"median\"\ntrim = 1\n",
        at: "trim = ^1",
        message: "`trim` belongs to aggregation = \"trimmed_mean\"",
        help: Some("remove it"),
    },
];

#[test]
fn base_file_is_valid() {
    JobSpec::parse("base.toml", BASE, Path::new(".")).expect("the base job file is valid");
}

#[test]
fn every_broken_file_gets_its_exact_message_and_location() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for c in CASES {
        assert_eq!(BASE.matches(c.from).count(), 1, "{}: `from` must occur once", c.name);
        let text = BASE.replacen(c.from, c.to, 1);
        let (line, col) = location(&text, c.at);
        match JobSpec::parse("job.toml", &text, Path::new(".")) {
            Ok(_) => failures.push(format!("{}: accepted", c.name)),
            Err(e) => {
                let got = (e.line, e.col, e.message.as_str(), e.help.as_deref());
                let want = (line, col, c.message, c.help);
                if got != want {
                    failures.push(format!("{}:\n   got {got:?}\n  want {want:?}", c.name));
                }
                assert_eq!(e.file, "job.toml");
            }
        }
        checked += 1;
    }
    assert!(checked >= 15, "the table must hold at least 15 cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_model_that_cannot_fit_in_a_frame_is_refused() {
    // 784 x 256 x ... : an MLP with a 65536-wide hidden layer needs ~200 MiB frames on one server.
    let text = BASE.replacen("kind = \"softmax\"", "kind = \"mlp\"\nhidden = [65536]", 1).replacen(
        "batch_size = 32",
        "batch_size = 32\n\n[limits]\nmax_frame_mib = 1",
        1,
    );
    let e = JobSpec::parse("job.toml", &text, Path::new(".")).unwrap_err();
    assert!(e.message.starts_with("a server's shard of this model needs frames of"), "{e}");
    assert_eq!(e.help.as_deref(), Some("raise [limits] max_frame_mib, or add servers"));
    assert_eq!((e.line, e.col), location(&text, "max_frame_mib = ^1"));
}

#[test]
fn validate_cli_exit_codes_and_format() {
    let ok = Command::new(bin("warden")).arg("validate").arg(repo_root().join("configs/local.toml")).output().unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));

    let dir = warden_tests::scratch("validate");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, BASE.replacen("lr = 0.1", "lr8 = 0.1", 1)).unwrap();
    let out = Command::new(bin("warden")).arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (line, col) = location(&BASE.replacen("lr = 0.1", "lr8 = 0.1", 1), "lr8");
    assert!(
        stderr.starts_with(&format!("error: {}:{line}:{col}: unknown field `lr8`", bad.display())),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("help: did you mean `lr`?"), "stderr: {stderr}");

    let missing = Command::new(bin("warden")).arg("validate").arg(dir.join("nope.toml")).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the job file"));

    // Not TOML at all, and binary garbage: still a located error, no panic.
    std::fs::write(&bad, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let garbage = Command::new(bin("warden")).arg("validate").arg(&bad).output().unwrap();
    assert_eq!(garbage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&garbage.stderr).starts_with("error: "));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_shipped_config_is_valid() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            JobSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 2);
}

/// docs/job-file.md cannot drift from the parser: every key the parser
/// accepts, in every section, is documented there. The accepted keys come
/// from the parser itself (its "unknown field, expected one of" error).
#[test]
fn every_key_the_parser_accepts_is_documented_in_job_file_md() {
    let doc = std::fs::read_to_string(warden_tests::repo_root().join("docs/job-file.md")).unwrap();
    let mut missing = Vec::new();
    let mut seen = 0;
    for section in
        ["", "[job]", "[cluster]", "[[cluster.hosts]]", "[model]", "[data]", "[optimizer]", "[training]", "[worker]"]
            .into_iter()
            .chain(["[limits]", "[checkpoint]", "[signing]", "[cluster.slurm]"])
    {
        let text = format!("{section}\nzzz_not_a_key = 1\n");
        let e = JobSpec::parse("job.toml", &text, Path::new(".")).expect_err("an unknown key");
        // serde says "expected one of `a`, `b`", "expected `a` or `b`" or "expected `a`".
        let Some((_, list)) = e.message.split_once("expected ") else {
            panic!("{section}: no key list in `{}`", e.message)
        };
        let list = list.trim_start_matches("one of ").replace(" or ", ", ");
        for key in list.split(", ").map(|k| k.trim_matches('`')) {
            seen += 1;
            let parent = section.trim_matches(|c| c == '[' || c == ']');
            let forms = [format!("`{key}`"), format!("`[{key}]`"), format!("[{parent}.{key}]")];
            if !forms.iter().any(|f| doc.contains(f.as_str())) {
                missing.push(format!("{section} {key}"));
            }
        }
    }
    assert!(seen > 60, "only {seen} keys found");
    assert!(missing.is_empty(), "keys missing from docs/job-file.md: {missing:?}");
}

/// Shell completions and the manual page come from the CLI definition
/// itself, so they list every subcommand; the top-level help names the docs.
#[test]
fn completions_man_page_and_help_come_from_the_cli() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(warden_tests::bin("warden")).args(args).output().unwrap();
        assert!(out.status.success(), "warden {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        for sub in ["launch", "validate", "serve", "checkpoint", "completions"] {
            assert!(script.contains(sub), "{shell} completion lacks `{sub}`");
        }
    }
    let man = run(&["man"]);
    assert!(man.starts_with(".ie") || man.contains(".TH warden"), "{}", &man[..200.min(man.len())]);
    assert!(man.contains("launch") && man.contains("serve"));
    // --dir: a page for every page the top-level one links to.
    let dir = warden_tests::scratch("man-pages");
    run(&["man", "--dir", dir.to_str().unwrap()]);
    for page in ["warden.1", "warden-launch.1", "warden-serve.1", "warden-checkpoint-list.1", "warden-runs.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        let name = page.trim_end_matches(".1");
        assert!(text.contains(&format!(".TH {name} 1")), "{page}: {}", &text[..200.min(text.len())]);
    }
    let top = std::fs::read_to_string(dir.join("warden.1")).unwrap();
    for linked in top.split("warden\\-").skip(1).filter_map(|t| t.split_once("(1)").map(|(n, _)| n.replace("\\-", "-")))
    {
        assert!(
            dir.join(format!("warden-{linked}.1")).is_file(),
            "warden.1 links warden-{linked}(1), which was not written"
        );
    }
    let help = run(&["--help"]);
    for doc in ["job-file.md", "security.md", "byo.md", "ssh.md"] {
        assert!(help.contains(doc), "--help does not point to {doc}");
    }
}

/// Every subcommand's help points to its documentation page, and every
/// page it names exists.
#[test]
fn every_subcommand_help_points_to_an_existing_doc_page() {
    fn walk(cmd: &mut clap::Command, path: String, missing: &mut Vec<String>) {
        let help = cmd.render_long_help().to_string();
        let named: Vec<&str> = help
            .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
            .filter(|w| w.starts_with("docs/") && w.ends_with(".md"))
            .collect();
        if named.is_empty() {
            missing.push(format!("`{path}` names no docs page"));
        }
        for doc in named {
            if !warden_tests::repo_root().join(doc).is_file() {
                missing.push(format!("`{path}` names {doc}, which does not exist"));
            }
        }
        for sub in cmd.get_subcommands_mut() {
            let name = format!("{path} {}", sub.get_name());
            if sub.get_name() != "help" {
                walk(sub, name, missing);
            }
        }
    }
    let mut cmd = <warden::cli::Cli as clap::CommandFactory>::command();
    cmd.build();
    let mut missing = Vec::new();
    walk(&mut cmd, "warden".into(), &mut missing);
    assert!(missing.is_empty(), "{missing:#?}");
}

/// BASE with its `[[cluster.hosts]]` tables replaced by `cluster` lines.
fn with_host_list(cluster: &str) -> String {
    let start = BASE.find("[[cluster.hosts]]").unwrap();
    let end = BASE.find("[model]").unwrap();
    format!("{}{}", &BASE[..start], &BASE[end..]).replacen(
        "ports = [29500, 29599]",
        &format!("ports = [29500, 29599]\n{cluster}"),
        1,
    )
}

/// Hosts may come from an MPI/DeepSpeed hostfile or an Ansible inventory:
/// the same hosts and roles as tables would give, and every mistake in the
/// list named by the list's file and line.
#[test]
fn hosts_come_from_a_hostfile_or_an_ansible_inventory() {
    let dir = warden_tests::scratch("host-lists");
    std::fs::write(
        dir.join("hosts"),
        "# the lab\n10.0.0.1 slots=2\nlab@10.0.0.2 slots=3 servers=0\nlocalhost address=10.0.0.3 scheduler=1\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("inventory.ini"),
        "[gpu]\nn[1:2] warden_workers=2\n\n[gpu:vars]\nansible_user=ops\nansible_ssh_private_key_file=/keys/lab\n\
         \n[cpu]\nc1 ansible_host=10.0.0.9 ansible_port=2200\n\n[lab:children]\ngpu\ncpu\n\n[all:vars]\nwarden_address=\n",
    )
    .unwrap();
    let parse = |cluster: &str| {
        let text = with_host_list(cluster).replace("\n\n\n", "\n\n");
        JobSpec::parse("job.toml", &text, &dir)
    };
    let spec = parse("hostfile = \"hosts\"\nservers_per_host = 2").unwrap();
    let got: Vec<(&str, String, &str, u32, u32, u32)> = spec
        .cluster
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), h.address.to_string(), h.ssh.as_str(), h.scheduler, h.servers, h.workers))
        .collect();
    assert_eq!(
        got,
        [
            ("10.0.0.1", "10.0.0.1".into(), "10.0.0.1", 0, 2, 2),
            ("10.0.0.2", "10.0.0.2".into(), "lab@10.0.0.2", 0, 0, 3),
            ("localhost", "10.0.0.3".into(), "localhost", 1, 2, 1),
        ]
    );
    assert_eq!(spec.cluster.hosts_from.as_deref(), Some(dir.join("hosts").as_path()));

    // An empty warden_address in [all:vars] is a mistake at the host's line.
    let e = parse("inventory = \"inventory.ini\"").unwrap_err();
    assert_eq!((e.file.as_str(), e.line), (dir.join("inventory.ini").to_str().unwrap(), 2), "{e}");
    std::fs::write(
        dir.join("inventory.ini"),
        std::fs::read_to_string(dir.join("inventory.ini")).unwrap().replace("[all:vars]\nwarden_address=\n", ""),
    )
    .unwrap();
    // n1 and n2 are not IP addresses and do not resolve.
    let e = parse("inventory = \"inventory.ini\"\ninventory_group = \"gpu\"").unwrap_err();
    assert!(e.message.starts_with("cannot find the address of `n1`"), "{e}");
    assert_eq!(e.help.as_deref(), Some("set ansible_host=IP (or warden_address=IP) for the host"));
    std::fs::write(dir.join("inventory.ini"), "[gpu]\nn[1:2] warden_workers=2 ansible_host=10.0.1.1\n").unwrap();
    let e = parse("inventory = \"inventory.ini\"").unwrap_err();
    assert_eq!(e.message, "`n2` has the address 10.0.1.1, like `n1`");
    std::fs::write(
        dir.join("inventory.ini"),
        "[gpu]\nn1 ansible_host=10.0.1.1\nn2 ansible_host=10.0.1.2\n[gpu:vars]\nwarden_workers=2\nansible_user=ops\n\
         ansible_ssh_private_key_file=/keys/lab\n[cpu]\nc1 ansible_host=10.0.0.9 ansible_port=2200 warden_scheduler=1\n",
    )
    .unwrap();
    let spec = parse("inventory = \"inventory.ini\"").unwrap();
    type Row<'a> = (&'a str, &'a str, u32, u32, u32, Option<&'a Path>);
    let got: Vec<Row> = spec
        .cluster
        .hosts
        .iter()
        .map(|h| (h.name.as_str(), h.ssh.as_str(), h.scheduler, h.servers, h.workers, h.identity_file.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("n1", "ops@10.0.1.1", 0, 1, 2, Some(Path::new("/keys/lab"))),
            ("n2", "ops@10.0.1.2", 0, 1, 2, Some(Path::new("/keys/lab"))),
            ("c1", "ssh://10.0.0.9:2200", 1, 1, 1, None),
        ]
    );
    assert_eq!(parse("inventory = \"inventory.ini\"\ninventory_group = \"cpu\"").unwrap().cluster.hosts.len(), 1);
    // Agents get the launcher's hosts and never read the list themselves.
    let text = with_host_list("inventory = \"gone.ini\"").replace("\n\n\n", "\n\n");
    let again = JobSpec::parse_with_hosts("job.toml", &text, &dir, Some(&spec.cluster.hosts)).unwrap();
    assert_eq!(again.cluster.hosts, spec.cluster.hosts);
    let mut twice = spec.cluster.hosts.clone();
    twice[1].name = twice[0].name.clone();
    let e = JobSpec::parse_with_hosts("job.toml", &text, &dir, Some(&twice)).unwrap_err();
    assert_eq!(e.message, "the hosts sent with the job repeat a name or address");
    twice[1].name = "../x".into();
    let e = JobSpec::parse_with_hosts("job.toml", &text, &dir, Some(&twice)).unwrap_err();
    assert_eq!(e.message, "`../x` cannot name a host");

    // Mistakes in the job file point at the job file.
    for (cluster, message) in [
        ("hostfile = \"missing\"", "cannot read the hostfile"),
        ("hostfile = \"hosts\"\ninventory = \"inventory.ini\"", "the hosts are listed more than one way"),
        ("hostfile = \"hosts\"\ninventory_group = \"gpu\"", "inventory_group needs an inventory"),
        ("inventory = \"inventory.ini\"\ninventory_group = \"web\"", "the inventory has no group `web`"),
        ("", "the cluster has no hosts"),
    ] {
        let e = parse(cluster).unwrap_err();
        assert!(e.message.starts_with(message), "{cluster:?}: {e}");
    }
    // A hostfile mistake names the hostfile and its line.
    std::fs::write(dir.join("hosts"), "10.0.0.1 slots=2\n../etc slots=1 address=10.0.0.5\n").unwrap();
    let e = parse("hostfile = \"hosts\"").unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line, e.message.as_str()),
        (dir.join("hosts").to_str().unwrap(), 2, "`../etc` cannot name a host")
    );
    std::fs::write(dir.join("hosts"), "10.0.0.1 slots=2\n10.0.0.2 gpus=8\n").unwrap();
    let e = parse("hostfile = \"hosts\"").unwrap_err();
    assert_eq!((e.line, e.message.as_str()), (2, "unknown hostfile key `gpus`"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An IDX file of unsigned bytes with the given dimensions.
fn idx(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// A job file that parses can still fail half a second into its launch:
/// validate loads the data as the workers will, looks up the job user and
/// checks key files, and reports every problem it finds with the key it
/// concerns, not only the first.
#[test]
fn validate_finds_every_problem_a_launch_would_meet_on_this_machine() {
    use std::os::unix::fs::PermissionsExt;
    let dir = warden_tests::scratch("validate-preflight");
    let write = |name: &str, bytes: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    // 10 images of 2x2 = 4 inputs, 3 classes.
    let images = write("images", idx(&[10, 2, 2], &[7; 40]));
    let labels = write("labels", idx(&[10], &[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]));
    let wild_labels = write("wild-labels", idx(&[10], &[0, 1, 2, 0, 1, 2, 0, 1, 9, 0]));
    let truncated = write("truncated", idx(&[10, 2, 2], &[7; 33]));
    let key = dir.join("ck.key");
    let make_key = Command::new(bin("warden")).args(["checkpoint", "keygen"]).arg(&key).output().unwrap();
    assert!(make_key.status.success(), "{}", String::from_utf8_lossy(&make_key.stderr));
    let job = |train: (&Path, &Path), test: (&Path, &Path)| {
        warden_tests::JobFile::local()
            .set("cluster", "user", "nobody")
            .set("model", "inputs", 4)
            .set("model", "classes", 3)
            .set("data", "train_images", train.0)
            .set("data", "train_labels", train.1)
            .set("data", "test_images", test.0)
            .set("data", "test_labels", test.1)
            .checkpoint(&dir.join("checkpoints"), Some(&key))
            .set("checkpoint", "every_steps", 100)
    };
    let validate = |file: &Path| Command::new(bin("warden")).arg("validate").arg(file).output().unwrap();

    let good = job((&images, &labels), (&images, &labels)).write(dir.join("good.toml"));
    let out = validate(&good);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // Swapped training files, a test label beyond `classes`, a key file
    // others may read and a job user that does not exist: four problems.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bad = job((&labels, &images), (&images, &wild_labels))
        .set("cluster", "user", "no-such-warden-user")
        .write(dir.join("bad.toml"));
    let out = validate(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for expected in [
        "[cluster] user: no user `no-such-warden-user` on this machine",
        "[data] train_images: ",
        "are the images and labels files swapped?",
        "[data] test_labels: ",
        "[checkpoint] key_file: ",
        "chmod 600",
        "4 problem(s)",
    ] {
        assert!(stderr.contains(expected), "missing `{expected}` in:\n{stderr}");
    }

    // A truncated file and a missing one, each named with its key.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let missing = dir.join("no-such-images");
    let out = validate(&job((&truncated, &labels), (&missing, &labels)).write(dir.join("short.toml")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("[data] train_images: ") && stderr.contains("truncated or padded"), "{stderr}");
    assert!(stderr.contains(&format!("[data] test_images: {}: No such file", missing.display())), "{stderr}");
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
}

/// A root-launched job runs under a uid of its own, which may not reach the
/// user's program (a checkout in /root, mode 0700): validate and launch
/// name the directory in the way before anything starts, and the same job
/// is fine once the program is where others can read it.
#[test]
fn a_program_the_jobs_uid_cannot_reach_is_named_before_anything_starts() {
    use std::os::unix::fs::PermissionsExt;
    assert!(nix::unistd::geteuid().is_root(), "needs root: the job runs under a leased uid only then");
    let dir = warden_tests::scratch("validate-program");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = dir.join("home");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let script = private.join("train.py");
    std::fs::write(&script, "print('hello')\n").unwrap();
    let job = warden_tests::JobFile::tiny()
        .without("data")
        .without("limits")
        .without("model")
        .set("model", "kind", "external")
        .set("model.tensors", "x", [6])
        .set("worker", "command", [Path::new("/usr/bin/python3"), &script])
        .write(dir.join("job.toml"));

    let out = Command::new(bin("warden")).arg("validate").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let want = format!(
        "[worker] command: the job's uid cannot reach {}: {} is mode 0700, owned by root",
        script.display(),
        private.display()
    );
    assert!(stderr.contains(&want), "missing `{want}` in:\n{stderr}");

    let run = dir.join("run");
    let out =
        Command::new(bin("warden")).arg("launch").arg(&job).arg("--local").arg("--run-dir").arg(&run).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&want), "missing `{want}` in:\n{stderr}");
    assert!(!run.exists(), "nothing started, no run directory");

    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(bin("warden")).arg("validate").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `warden doctor JOB --local` checks this machine as `doctor` checks SSH
/// hosts (no SSH involved), then the job's files as `validate` does: a port
/// of the job in use fails it, by number, with exit status 1.
#[test]
fn doctor_local_checks_this_machine_like_a_host() {
    let dir = warden_tests::scratch("doctor-local");
    let job = warden_tests::JobFile::local().ports(32060, 32079).write(dir.join("job.toml"));
    let doctor =
        || Command::new(bin("warden")).args(["doctor".as_ref(), job.as_os_str(), "--local".as_ref()]).output().unwrap();
    let out = doctor();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for check in ["os", "nft", "ports", "disk", "agent dir"] {
        assert!(
            text.lines().any(|l| l.starts_with("localhost") && l.contains(&format!(" {check} ")) && l.contains(" ok ")),
            "{check}: {text}"
        );
    }
    // The scheduler's port, taken.
    let _busy = std::net::TcpListener::bind("127.0.0.1:32060").unwrap();
    let out = doctor();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  in use:") && text.contains("32060"), "{text}");
}

/// An SSH failure keeps ssh's own reason and says what to try; a job whose
/// hosts are all this machine also points at `--local`.
#[test]
fn ssh_failures_keep_ssh_reason_and_say_what_to_try() {
    let dir = warden_tests::scratch("ssh-refused");
    // Nothing listens on port 1 of the loopback address.
    let job = warden_tests::JobFile::local()
        .set("cluster.hosts", "ssh", "ssh://nobody@127.0.0.1:1")
        .write(dir.join("job.toml"));
    let doctor = Command::new(bin("warden")).arg("doctor").arg(&job).output().unwrap();
    let said = String::from_utf8_lossy(&doctor.stderr);
    assert!(!doctor.status.success(), "{said}");
    assert!(said.contains("Connection refused") && said.contains("(try: no sshd answers on that port"), "{said}");
    let launch = Command::new(bin("warden")).arg("launch").arg(&job).output().unwrap();
    let said = String::from_utf8_lossy(&launch.stderr);
    assert_eq!(launch.status.code(), Some(1), "{said}");
    assert!(said.contains("Connection refused") && said.contains("--local"), "{said}");
}
