//! Bring your own training program: the user's program runs per
//! worker rank as the job user and reaches the servers only through the
//! agent's local KV socket.
//!
//! The programs run under `WARDEN_BYO_PYTHON` (a python with numpy that the
//! job user can execute; `scripts/test-all` makes `target/byo-venv`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use warden_tests::{fresh_tag, repo_root, scratch, spawn_launch, wait_for, wait_gone};

fn python() -> String {
    match std::env::var("WARDEN_BYO_PYTHON") {
        Ok(p) if Path::new(&p).exists() => p,
        _ => panic!(
            "WARDEN_BYO_PYTHON must name a python with numpy that the job user can run; \
             ./scripts/test-all makes target/byo-venv and sets it"
        ),
    }
}

fn json(path: &Path) -> serde_json::Value {
    json_text(&std::fs::read_to_string(path).unwrap())
}

fn json_text(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

/// configs/byo-numpy.toml with the test's python and ports, its program,
/// client library and data copied into `dir`: the job's uid must reach
/// them, and a checkout may lie under a directory only root can enter.
fn numpy_job(dir: &Path, ports: (u16, u16)) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = repo_root();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stage = dir.join("stage");
    copy_tree(&root.join("configs/byo"), &stage.join("byo"));
    copy_tree(&root.join("python"), &stage.join("python"));
    copy_tree(&root.join("data/fashion-mnist-small"), &stage.join("data"));
    let text = std::fs::read_to_string(root.join("configs/byo-numpy.toml"))
        .unwrap()
        .replace("\"python3\"", &format!("\"{}\"", python()))
        .replace("\"byo/train_numpy.py\"", &format!("\"{}\"", stage.join("byo/train_numpy.py").display()))
        .replace("\"../data/fashion-mnist-small\"", &format!("\"{}\"", stage.join("data").display()))
        .replace("\"../python\"", &format!("\"{}\"", stage.join("python").display()))
        .replace("ports = [29600, 29699]", &format!("ports = [{}, {}]", ports.0, ports.1));
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Copies the files of `from` into `to`, readable by all (whatever the
/// umask and the checkout's modes), leaving out Python's caches.
fn copy_tree(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "__pycache__" {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
            std::fs::set_permissions(to.join(&name), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// A two-worker job of tensors x = [6] and y = [2, 3] with SGD (lr 0.5) in
/// `mode`, whose workers run `script`.
fn script_job(dir: &Path, ports: (u16, u16), script: &Path, mode: &str) -> PathBuf {
    let mut text = std::fs::read_to_string(numpy_job(dir, ports)).unwrap();
    text = text
        .replace("w = [784, 10]\nb = [10]", "x = [6]\ny = [2, 3]")
        .replace("kind = \"momentum\"\nlr = 0.1\nmomentum = 0.9", "kind = \"sgd\"\nlr = 0.5")
        .replace("mode = \"sync\"", &format!("mode = \"{mode}\""));
    let cmd_start = text.find("command = [").unwrap();
    let cmd_end = cmd_start + text[cmd_start..].find('\n').unwrap();
    text.replace_range(cmd_start..cmd_end, &format!("command = [\"{}\", \"{}\"]", python(), script.display()));
    let job = dir.join("job.toml");
    std::fs::write(&job, text).unwrap();
    job
}

#[test]
fn the_numpy_example_trains_through_the_local_kv_socket() {
    let tag = fresh_tag();
    let dir = scratch("byo-numpy");
    let job = numpy_job(&dir, (31250, 31260));
    let run = dir.join("run");
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 180);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "succeeded");
    // The stated accuracy of configs/byo-numpy.toml: at least 75% after 3 epochs.
    let acc = summary["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.75, "test accuracy {acc}");
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    // The model holds the program's tensors by name.
    let bytes = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let st = safetensors_shapes(&bytes);
    assert_eq!(st, vec![("b".to_string(), vec![10]), ("w".to_string(), vec![784, 10])]);
    // The program ran as the job user: its output went to the worker's log.
    let log = std::fs::read_to_string(run.join("logs/localhost-worker-0.log")).unwrap();
    assert!(log.contains("epoch 3: test accuracy"), "{log}");
    wait_gone(&tag);
}

fn safetensors_shapes(bytes: &[u8]) -> Vec<(String, Vec<usize>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out: Vec<(String, Vec<usize>)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            (k.clone(), v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())
        })
        .collect();
    out.sort();
    out
}

/// Two workers push known arrays in sync mode and pull back exactly the
/// optimizer's result, with tensors copied straight from and into the
/// program's memory and through the socket alike (and as float16); only the
/// program itself gets direct copies (not its child), a bad address is
/// refused and leaves nothing half pushed, and the program cannot read its
/// agent's memory; the agent refuses a pull in the middle of a step,
/// garbage and an oversized tensor (each with its reason) and keeps serving,
/// also while another client sits in the middle of a request;
/// another local user cannot reach the socket, and root (not the job user)
/// is refused by its credentials.
const SEMANTICS: &str = r#"
import json, os, select, socket, struct, sys, time
import numpy as np
from warden import kv

rank = int(os.environ["WARDEN_RANK"])
time.sleep(3)  # the test probes the socket from outside meanwhile
store = kv.connect()
assert store.rank == rank and store.num_workers == 2
store.init("x", np.arange(1, 7, dtype=np.float32))
g = np.full(6, 2.0 if rank == 0 else 4.0, dtype=np.float32)
zeros = np.zeros((2, 3), dtype=np.float32)
out = {"direct": store.direct}
os.environ["WARDEN_KV_DIRECT"] = "0"
plain = kv.connect()
del os.environ["WARDEN_KV_DIRECT"]
out["plain_direct"] = plain.direct
for step, client in enumerate([store, plain]):
    client.push("x", g)
    client.push("y", zeros)  # a step pushes every declared tensor
    out[step] = client.pull("x").tolist()
try:
    store.push("y", zeros)
    store.pull("x")
    raise SystemExit("a pull in the middle of a step was accepted")
except kv.KVError as e:
    out["mid_step"] = str(e)
# Garbage and an oversized tensor on other connections: each refused, with a reason.
def raw(payload):
    s = socket.socket(socket.AF_UNIX); s.connect(os.environ["WARDEN_KV"]); s.sendall(payload)
    n = struct.unpack("<I", s.recv(4))[0]
    return json.loads(s.recv(n))
# A client that starts a request and stalls holds up nobody else.
stalled = socket.socket(socket.AF_UNIX); stalled.connect(os.environ["WARDEN_KV"])
h = json.dumps({"op": "push", "name": "x", "nbytes": 24}).encode()
stalled.sendall(struct.pack("<I", len(h)) + h + b"\0\0\0\0")
out["garbage"] = raw(struct.pack("<I", 0xFFFFFFF0) + b"xx")
h = json.dumps({"op": "push", "name": "x", "nbytes": 1 << 30}).encode()
out["oversized"] = raw(struct.pack("<I", len(h)) + h)
h = b"{not json"
out["malformed"] = raw(struct.pack("<I", len(h)) + h)
# Connections past the cap (64 at once, `store` and `stalled` among them)
# are told why and closed; once some close, new ones are served again.
# Which of the 70 are refused depends on when the agent sees the raw
# connections above close, but with `store` and `stalled` open at least
# 70 - 62 = 8 of them are, whatever the timing.
held = []
for _ in range(70):
    s = socket.socket(socket.AF_UNIX); s.connect(os.environ["WARDEN_KV"]); held.append(s)
refused = []
deadline = time.time() + 60
while len(refused) < 8 and time.time() < deadline:
    ready, _, _ = select.select([s for s in held if s not in refused], [], [], 1)
    refused.extend(ready)
out["refused"] = len(refused)
n = struct.unpack("<I", refused[0].recv(4))[0]
out["too_many"] = json.loads(refused[0].recv(n))
for s in held:
    s.close()
for _ in range(100):
    try:
        out["reconnected"] = kv.connect().rank
        break
    except Exception:
        time.sleep(0.05)
store.push("x", g)  # completes the step begun above ("y" was pushed)
out["still_serving"] = store.pull("x").tolist()
# A direct push from an address that is not the program's memory: refused,
# and nothing of it counts (the float16 step below pushes "x" again).
h = json.dumps({"op": "push", "name": "x", "dtype": "f32", "nbytes": 24, "from": 8}).encode()
out["bad_address"] = raw(struct.pack("<I", len(h)) + h)
store.push("y", zeros.astype(np.float16))
out["f16"] = store.pushpull("x", g.astype(np.float16)).tolist()
# A child of the program gets no direct copies, and is told why if it asks.
import subprocess
CHILD = """
import json
import numpy as np
from warden import kv
s = kv.connect()
direct = s.direct
s._direct = True
try:
    s.pull("x")
    said = "served"
except kv.KVError as e:
    said = str(e)
print(json.dumps([direct, said]))
"""
child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
out["child"] = json.loads(child.stdout) if child.returncode == 0 else child.stderr
# The program cannot read its agent's memory (where the agent's key is).
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(8)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
remote = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
r = libc.process_vm_readv(os.getppid(), iov, 1, remote, 1, 0)
out["agent_memory"] = [r, ctypes.get_errno()]
print("RESULT " + json.dumps(out), flush=True)
"#;

/// Launches `program` (Python source) as the job's worker program and
/// waits (2 min) for the job to succeed; the tag, scratch, run directory
/// and the launcher's stderr.
fn run_script(
    name: &str,
    program: &str,
    ports: (u16, u16),
    mode: &str,
) -> (String, warden_tests::Scratch, PathBuf, String) {
    let tag = fresh_tag();
    let dir = scratch(name);
    let script = dir.join(format!("{name}.py"));
    std::fs::write(&script, program).unwrap();
    let job = script_job(&dir, ports, &script, mode);
    let run = dir.join("run");
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 120);
    assert_eq!(status.code(), Some(0), "{stderr}");
    (tag, dir, run, stderr)
}

#[test]
fn two_workers_get_exactly_the_optimizers_result_and_bad_clients_are_refused() {
    let tag = fresh_tag();
    let dir = scratch("byo-semantics");
    let script = dir.join("semantics.py");
    std::fs::write(&script, SEMANTICS).unwrap();
    let job = script_job(&dir, (31262, 31272), &script, "sync");
    // The script must be readable by the job user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.join("run");
    let child = spawn_launch(&tag, &job, &run);

    // From outside, while the programs sleep: nobody cannot even reach the
    // socket; root can (as root can everything) but is not the job user.
    // As root, local job directories live where SSH hosts keep them.
    let until = Instant::now() + Duration::from_secs(60);
    let job_id = loop {
        if let Ok(plan) = std::fs::read_to_string(run.join("plan.json")) {
            break json_text(&plan)["job_id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < until, "no plan.json appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    let sock = Path::new("/var/lib/warden/jobs").join(job_id).join("localhost-worker-0/kv.sock");
    while !sock.exists() {
        assert!(Instant::now() < until, "no KV socket appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let probe = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); print(s.recv(200))",
        sock.display().to_string()
    );
    let as_nobody = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", &probe])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&as_nobody.stderr);
    assert!(!as_nobody.status.success() && err.contains("Permission denied"), "nobody reached the socket: {err}");
    let as_root = std::process::Command::new("/usr/bin/python3").args(["-c", &probe]).output().unwrap();
    let said = String::from_utf8_lossy(&as_root.stdout);
    assert!(said.contains("only the job user may use this socket"), "root was not refused: {said}");

    // The programs (children of the worker agents; they start with a clean
    // environment, so without the test's tag) run as the job's own uid with
    // no capabilities and no_new_privs.
    let agents = warden_tests::Procs::agents(&tag).pids();
    let programs = warden_tests::Procs::all().children_of(&agents).exe_contains("python").pids();
    assert_eq!(programs.len(), 2, "one program per worker");
    let job_uid = warden_tests::procs::status_field(agents[0], "Uid:").unwrap();
    let job_uid = job_uid.split_whitespace().next().unwrap().to_string();
    let warden = nix::unistd::User::from_name("warden").unwrap().unwrap().uid.as_raw();
    assert_ne!(job_uid, warden.to_string(), "the job runs under a uid of its own");
    for pid in programs {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim().to_string();
        assert!(field("Uid:").split_whitespace().all(|u| u == job_uid), "{status}");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
            assert_eq!(field(caps), "0000000000000000", "{caps} of the program {pid}");
        }
        assert_eq!(field("NoNewPrivs:"), "1");
    }

    let (status, stderr) = wait_for(child, &run, 120);
    assert_eq!(status.code(), Some(0), "{stderr}");
    for rank in 0..2 {
        let log = std::fs::read_to_string(run.join(format!("logs/localhost-worker-{rank}.log"))).unwrap();
        let line = log.lines().find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_string())).expect("a result");
        let out: serde_json::Value = serde_json::from_str(&line).unwrap();
        // x0 = 1..6; both steps apply SGD (lr 0.5) to the mean gradient 3.
        assert_eq!(out["0"], serde_json::json!([-0.5, 0.5, 1.5, 2.5, 3.5, 4.5]), "rank {rank}");
        assert_eq!(out["1"], serde_json::json!([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]), "rank {rank}");
        assert!(out["mid_step"].as_str().unwrap().contains("in the middle of a step"), "{out}");
        assert!(out["garbage"]["error"].as_str().unwrap().contains("header of"), "{out}");
        assert!(out["oversized"]["error"].as_str().unwrap().contains("holds at most 24"), "{out}");
        assert!(out["malformed"]["error"].as_str().unwrap().contains("malformed request header"), "{out}");
        assert!(out["refused"].as_u64().unwrap() >= 8, "{out}");
        assert!(out["too_many"]["error"].as_str().unwrap().contains("too many connections"), "{out}");
        assert_eq!(out["reconnected"], rank, "{out}");
        assert_eq!(out["still_serving"], serde_json::json!([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5]), "rank {rank}");
        assert_eq!(
            (&out["direct"], &out["plain_direct"]),
            (&serde_json::json!(true), &serde_json::json!(false)),
            "{out}"
        );
        let bad = out["bad_address"]["error"].as_str().unwrap();
        assert!(bad.contains("cannot read 24 bytes at 0x8 of the program's memory"), "{out}");
        assert_eq!(out["f16"], serde_json::json!([-5.0, -4.0, -3.0, -2.0, -1.0, 0.0]), "rank {rank}");
        assert_eq!(out["child"][0], serde_json::json!(false), "{out}");
        assert!(out["child"][1].as_str().unwrap().contains("only for the program the agent started"), "{out}");
        assert_eq!(out["agent_memory"], serde_json::json!([-1, nix::errno::Errno::EPERM as i32]), "{out}");
    }
    wait_gone(&tag);
}

/// `async` mode: each worker's step is applied on arrival; after a barrier
/// both workers' updates are in, whatever their order.
const ASYNC: &str = r#"
import json, os, time
import numpy as np
from warden import kv
rank = int(os.environ["WARDEN_RANK"])
print("TORCHRUN", *(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")), flush=True)
store = kv.connect()
store.init("x", np.arange(1, 7, dtype=np.float32))
store.push("x", np.full(6, 2.0 if rank == 0 else 4.0, dtype=np.float32))
store.push("y", np.zeros((2, 3), dtype=np.float32))
store.barrier()
# Both pushes were sent before the barrier; the servers apply them as they
# arrive, so the value reaches x0 - 3 (and never goes past it).
want = (np.arange(1, 7, dtype=np.float32) - 3).tolist()
for _ in range(200):
    x = store.pull("x").tolist()
    if x == want:
        break
    time.sleep(0.01)
# Through shared memory: this worker's push is in when its last push
# returns; the other's arrives in a later pull (into the same memory).
store.barrier()  # both saw the first round's result
sh = store.share()
np.copyto(sh.grads["x"], np.full(6, 2.0 if rank == 0 else 4.0, dtype=np.float32))
store.push("y", np.zeros((2, 3), dtype=np.float32))
store.push("x", sh.grads["x"])
mine = (sh.params["x"] <= np.array(x, dtype=np.float32) - (1 if rank == 0 else 2)).all()
store.barrier()
want = (np.arange(1, 7, dtype=np.float32) - 6).tolist()
for _ in range(200):
    if store.pull("x", out=sh.params["x"]).tolist() == want:
        break
    time.sleep(0.01)
print("RESULT " + json.dumps([x, bool(mine), sh.params["x"].tolist()]), flush=True)
"#;

#[test]
fn in_async_mode_every_push_is_applied_on_arrival() {
    let (tag, _dir, run, _) = run_script("byo-async", ASYNC, (31274, 31284), "async");
    for rank in 0..2 {
        let log = std::fs::read_to_string(run.join(format!("logs/localhost-worker-{rank}.log"))).unwrap();
        let line = log.lines().find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_string())).expect("a result");
        // Each push applied alone (lr 0.5): x0 - 0.5 * 2 - 0.5 * 4, then as
        // much again through shared memory.
        let want = "[[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0], true, [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0]]";
        assert_eq!(line, want, "rank {rank}");
        // torchrun's variables, for programs written against it: both workers on one host.
        assert!(log.contains(&format!("TORCHRUN {rank} 2 {rank} 2")), "rank {rank}: {log}");
    }
    wait_gone(&tag);
}

const LOSS_ONLY: &str = r#"
import os
import numpy as np
from warden import kv

store = kv.connect()
store.init("x", np.zeros(6, dtype=np.float32))
g, zeros = np.ones(6, dtype=np.float32), np.zeros((2, 3), dtype=np.float32)
for epoch in range(1, int(os.environ["WARDEN_EPOCHS"]) + 1):
    for step in range(5):
        store.push("x", g)
        store.push("y", zeros)
        store.pull("x")
    store.report(epoch, 1.0 / epoch, samples=5)
"#;

/// A program that reports only its training loss still gets a row per
/// epoch with the bytes it moved through the KV socket, a plot, and no
/// made-up test figures.
#[test]
fn a_program_reporting_only_its_loss_gets_metrics_bytes_and_a_plot() {
    let (tag, _dir, run, stderr) = run_script("byo-loss-only", LOSS_ONLY, (32150, 32160), "sync");
    assert!(stderr.contains("epoch 3/3: train loss 0.3333,") && !stderr.contains("test loss"), "{stderr}");
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let rows: Vec<Vec<&str>> = metrics.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3, "{metrics}");
    for row in &rows {
        // 5 steps a worker, both workers: at least 6 floats each way per step.
        let (pushed, pulled): (u64, u64) = (row[6].parse().unwrap(), row[7].parse().unwrap());
        assert!(pushed >= 2 * 5 * 12 * 4 && pulled >= 2 * 5 * 6 * 4, "{metrics}");
        assert_eq!(row[3], "NaN", "no test accuracy was reported: {metrics}");
    }
    let summary = json(&run.join("summary.json"));
    assert!(summary["test_accuracy"].is_null() && summary["bytes_pushed"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(&std::fs::read(run.join("plot.png")).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    wait_gone(&tag);
}

/// A program that fails ends the launch with one headline: which worker,
/// what the program said (its traceback), and the log it is in; the other
/// processes' "stopped by the launcher" echo stays in their logs.
#[test]
fn a_failing_programs_traceback_ends_the_launchers_output() {
    use std::os::unix::fs::PermissionsExt;
    let tag = fresh_tag();
    let dir = scratch("byo-traceback");
    let script = dir.join("fails.py");
    std::fs::write(&script, "def load():\n    raise ValueError('labels file has 9 rows, expected 10')\n\nload()\n")
        .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let job = script_job(&dir, (32020, 32030), &script, "sync");
    let run = dir.join("run");
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 120);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let headline = &stderr[stderr.rfind("failed: ").expect("a failure headline")..];
    assert!(headline.contains("failed: localhost/worker["), "{headline}");
    assert!(headline.contains("Traceback (most recent call last)"), "{headline}");
    assert!(headline.contains("ValueError: labels file has 9 rows, expected 10"), "{headline}");
    assert!(
        headline.contains(&format!("last lines of {}", run.join("logs/localhost-worker-").display())),
        "{headline}"
    );
    assert!(!stderr.contains("stopped by the launcher"), "the stop's echo reached the terminal: {stderr}");
    wait_gone(&tag);
}

/// configs/byo-numpy.toml with five workers whose rank 4 runs `behaviour`
/// (`honest`, `scaled`: it pushes -100 times its gradients, or `nan`;
/// `scaled+momentum`: every rank pushes its momentum, rank 4 times -100,
/// and the servers apply plain SGD) and
/// the servers combining gradients by `aggregation` (TOML lines).
fn five_worker_job(dir: &Path, ports: (u16, u16), behaviour: &str, aggregation: &str) -> PathBuf {
    let mut text = std::fs::read_to_string(numpy_job(dir, ports)).unwrap();
    let program = dir.join("stage/byo/train_numpy.py");
    let wrapper = dir.join("stage/byo/rank4.py");
    // The program of configs/byo with rank 4 changed: a worker whose
    // certificate is valid and whose gradients are not.
    std::fs::write(
        &wrapper,
        format!(
            r#"import os, sys
import numpy as np
sys.path.insert(0, {dir:?})
import train_numpy as t
behaviour = {behaviour:?}
def deliver(loss, vw, vb, gw, gb):
    # As the program's own function does: into `gw` and `gb` when given
    # (its arrays in memory shared with the agent).
    if gw is None:
        return loss, vw, vb
    np.copyto(gw, vw)
    np.copyto(gb, vb)
    return loss, gw, gb
if behaviour.endswith("+momentum"):
    # Every rank pushes its momentum (beta 0.9) instead of its gradient,
    # as centered clipping assumes.
    plain, state = t.loss_and_grads, {{}}
    def with_momentum(w, b, x, y, gw=None, gb=None):
        loss, vw, vb = plain(w, b, x, y)
        mw, mb = state.get("m", (0 * vw, 0 * vb))
        state["m"] = (0.9 * mw + vw, 0.9 * mb + vb)
        return deliver(loss, *state["m"], gw, gb)
    t.loss_and_grads = with_momentum
if os.environ["WARDEN_RANK"] == "4" and behaviour != "honest":
    honest = t.loss_and_grads
    def hostile(w, b, x, y, gw=None, gb=None):
        loss, vw, vb = honest(w, b, x, y)
        if behaviour == "nan":
            vw = vw.copy()
            vw[3, 3] = np.nan
            return deliver(loss, vw, vb, gw, gb)
        return deliver(loss, -100 * vw, -100 * vb, gw, gb)
    t.loss_and_grads = hostile
t.main()
"#,
            dir = program.parent().unwrap().display().to_string(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    if behaviour.ends_with("+momentum") {
        // The workers' momentum takes the place of the servers'.
        let server_momentum = "kind = \"momentum\"\nlr = 0.1\nmomentum = 0.9";
        assert!(text.contains(server_momentum));
        text = text.replace(server_momentum, "kind = \"sgd\"\nlr = 0.1");
    }
    text = text
        .replace("workers = 2", "workers = 5")
        .replace(&program.display().to_string(), &wrapper.display().to_string())
        .replace("mode = \"sync\"", &format!("mode = \"sync\"\n{aggregation}"));
    assert!(text.contains("rank4.py") && text.contains("workers = 5"));
    let job = dir.join("job.toml");
    std::fs::write(&job, text).unwrap();
    job
}

/// Launches `job`; the summary and the launcher's stderr.
fn run_job(job: &Path, run: &Path) -> (Option<i32>, serde_json::Value, String) {
    let tag = fresh_tag();
    let (status, stderr) = wait_for(spawn_launch(&tag, job, run), run, 300);
    wait_gone(&tag);
    (status.code(), json(&run.join("summary.json")), stderr)
}

/// One worker of five pushing -100 times its gradient: with the mean the
/// job does not learn; with the trimmed mean (trim 1) and the median it
/// reaches within two points of the honest job; centered clipping (radius
/// 3, the workers pushing momentum) above 70%. A worker pushing a NaN is
/// refused by name and the job stops.
#[test]
fn a_hostile_worker_ruins_the_mean_and_not_the_trimmed_mean_or_the_median() {
    let acc = |s: &serde_json::Value| s["test_accuracy"].as_f64().unwrap();
    let mut results = Vec::new();
    for (i, (behaviour, aggregation)) in [
        ("honest", ""),
        ("scaled", ""),
        ("scaled", "aggregation = \"trimmed_mean\"\ntrim = 1"),
        ("scaled", "aggregation = \"median\""),
        ("scaled+momentum", "aggregation = \"centered_clip\"\nclip_radius = 3.0"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = scratch(&format!("byo-robust-{i}"));
        let base = if i < 4 { 32200 + 10 * i as u16 } else { 32260 };
        let job = five_worker_job(&dir, (base, base + 9), behaviour, aggregation);
        let (code, summary, stderr) = run_job(&job, &dir.join("run"));
        assert_eq!(code, Some(0), "{behaviour} with {aggregation:?}: {stderr}");
        results.push(acc(&summary));
        // Every server names rank 4 once (its norm is about 100x the
        // median's, for 5 steps in a row), and nobody else, ever.
        let suspects = summary["suspect_workers"].as_array().unwrap();
        if behaviour == "honest" {
            assert!(suspects.is_empty(), "{suspects:?}");
        } else {
            assert_eq!(suspects.len(), 2, "once per server: {suspects:?}");
            for s in suspects {
                assert_eq!(s["worker"], 4, "{s}");
                assert!(s["ratio"].as_f64().unwrap() > 10.0, "{s}");
            }
            assert!(stderr.contains("warning: worker 4 is suspect"), "{stderr}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let [honest, mean, trimmed, median, centered] = results[..] else { unreachable!() };
    eprintln!(
        "test accuracy: honest {honest}, mean {mean}, trimmed mean {trimmed}, median {median}, centered clip {centered}"
    );
    assert!(honest >= 0.75, "the honest job learns: {honest}");
    assert!(mean < 0.70, "one hostile worker ruins the mean: {mean}");
    assert!(trimmed >= honest - 0.02, "trimmed mean {trimmed}, honest {honest}");
    assert!(median >= honest - 0.02, "median {median}, honest {honest}");
    // Centered clipping (one iteration, as the paper; its radius tuned to
    // the workers' momentum here) holds off most of the attack, not all.
    assert!(centered >= 0.70, "centered clipping {centered}, honest {honest}");

    // With on_suspect = "fail" the job stops naming the worker.
    let dir = scratch("byo-robust-fail");
    let job = five_worker_job(&dir, (32250, 32259), "scaled", "aggregation = \"median\"\non_suspect = \"fail\"");
    let (code, summary, stderr) = run_job(&job, &dir.join("run"));
    assert_ne!(code, Some(0));
    assert_eq!(summary["status"], "failed");
    assert!(summary["failure"].as_str().unwrap().contains("worker 4 is suspect"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = scratch("byo-robust-nan");
    let job = five_worker_job(&dir, (32240, 32249), "nan", "aggregation = \"median\"");
    let (code, summary, stderr) = run_job(&job, &dir.join("run"));
    assert_ne!(code, Some(0));
    assert_eq!(summary["status"], "failed");
    assert!(
        stderr.contains("worker 4 pushed a gradient with a value that is not finite"),
        "the refusal names the worker: {stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A program whose worker 0 asks for a pull and exits without reading the
/// answer, while worker 1 has not pushed yet: the agent's pull, left under
/// way, runs to its end once worker 1 pushes, and the model must hold the
/// step's full result (every server's shard of it), not hang or keep a
/// shard from before the step.
#[test]
fn a_program_that_exits_with_a_pull_outstanding_still_gets_the_whole_model() {
    use std::os::unix::fs::PermissionsExt;
    let tag = fresh_tag();
    let dir = scratch("byo-exit-mid-pull");
    let script = dir.join("exit_mid_pull.py");
    std::fs::write(
        &script,
        r#"import json, os, struct, time
import numpy as np
from warden import kv
store = kv.connect()
rank = int(os.environ["WARDEN_RANK"])
store.init("x", np.zeros(6, dtype=np.float32))
store.init("y", np.zeros((2, 3), dtype=np.float32))
for step in range(2):
    if rank == 1 and step == 1:
        time.sleep(2)  # worker 0 is gone, its agent waiting for this step
    store.push("x", np.ones(6, dtype=np.float32))
    store.push("y", np.ones((2, 3), dtype=np.float32))
    if step == 0:
        store.pull("x")
if rank == 0:
    h = json.dumps({"op": "pull", "name": "x", "dtype": "f32", "nbytes": 0}).encode()
    store._sock.sendall(struct.pack("<I", len(h)) + h)
    time.sleep(0.2)  # the agent is inside the pull
"#,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let job = script_job(&dir, (32270, 32280), &script, "sync");
    let run = dir.join("run");
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 120);
    assert_eq!(status.code(), Some(0), "{stderr}");
    // Two steps of SGD with lr 0.5 from zeros on the mean gradient 1: every
    // value -1, on both servers' shards.
    let bytes = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let values: Vec<f32> = bytes[8 + n..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(values.len(), 12);
    assert!(values.iter().all(|v| *v == -1.0), "{values:?}");
    wait_gone(&tag);
}

/// Tensors that cross chunk and server boundaries (4 KiB chunks, two
/// servers, over a thousand chunks per server) arrive whole through every
/// path a program can push by: copied from its memory, sent on the socket,
/// as float16 either way, and from memory shared with the agent (alone and
/// mixed with the others, also for a child of the program); each step's
/// values are exactly SGD's. The shared memory is refused mid-step and
/// before it exists, and the program cannot resize it.
const CHUNKED: &str = r#"
import json, os, socket, struct, subprocess, sys, threading
import numpy as np
from warden import kv
rank = int(os.environ["WARDEN_RANK"])
store = kv.connect()
os.environ["WARDEN_KV_DIRECT"] = "0"
plain = kv.connect()
del os.environ["WARDEN_KV_DIRECT"]
na, nb = 2100000, 3001
a0 = (np.arange(na) % 1000).astype(np.float32)
b0 = (np.arange(nb) % 11).astype(np.float32)
store.init("a", a0)
store.init("b", b0)
ga = np.full(na, 1.0 + rank, dtype=np.float32)
gb = ((np.arange(nb) % 7) * (rank + 1)).astype(np.float32)
out = {"direct": [store.direct, plain.direct], "steps": []}
for k, (client, dtype) in enumerate([(store, np.float32), (plain, np.float32), (store, np.float16), (plain, np.float16)], 1):
    client.push("b", gb.astype(dtype))
    a = client.pushpull("a", ga.astype(dtype))
    b = client.pull("b")
    # lr 0.5, mean gradients 1.5 and 1.5 * (i % 7): exact in float32.
    want_a = a0 - np.float32(0.75 * k)
    want_b = b0 - np.float32(0.75 * k) * (np.arange(nb) % 7).astype(np.float32)
    out["steps"].append([bool((a == want_a).all()), bool((b == want_b).all())])
def want(k):
    return a0 - np.float32(0.75 * k), b0 - np.float32(0.75 * k) * (np.arange(nb) % 7).astype(np.float32)
def raw(header):
    s = socket.socket(socket.AF_UNIX); s.connect(os.environ["WARDEN_KV"])
    h = json.dumps(header).encode(); s.sendall(struct.pack("<I", len(h)) + h)
    head, fds, _, _ = socket.recv_fds(s, 4, 1, socket.MSG_CMSG_CLOEXEC)
    n = struct.unpack("<I", head + s.recv(4 - len(head)))[0]
    return json.loads(s.recv(n, socket.MSG_WAITALL)), fds
out["not_shared"] = raw({"op": "pull", "name": "a", "into_shared": True})[0]
plain.push("b", gb)
try:
    plain.share()
    out["mid_step"] = "shared"
except kv.KVError as e:
    out["mid_step"] = str(e)
a = plain.pushpull("a", ga)  # step 5, through the socket
sh = store.share()
total = 5
def scribble(stop):
    # Byte patterns of TLS content types and padding, over and over.
    pats = [np.frombuffer(bytes([b]) * 4, np.float32)[0] for b in (0x16, 0, 0x15, 0x17)]
    i = 0
    while not stop.is_set():
        sh.params["a"].fill(pats[i % 4])
        sh.params["b"].fill(pats[i % 4])
        i += 1
for k in (6, 7, 8, 9, 10):
    scale = np.float32(k - 5)  # a gradient of its own each step
    total += k - 5
    if k == 7:
        plain.push("b", gb * scale)  # copied into the shared gradient
    else:
        np.copyto(sh.grads["b"], gb * scale)
        store.push("b", sh.grads["b"])
    np.copyto(sh.grads["a"], ga * scale)
    if k == 9:
        # The program writes its parameters while the answer arrives: the
        # agent must not care.
        stop = threading.Event()
        writer = threading.Thread(target=scribble, args=(stop,))
        writer.start()
    a = store.pushpull("a", sh.grads["a"], out=sh.params["a"])
    if k == 9:
        stop.set()
        writer.join()
        continue
    want_a, want_b = want(total)
    out["steps"].append([a is sh.params["a"] and bool((a == want_a).all()), bool((sh.params["b"] == want_b).all())])
    if k == 8:
        out["steps"][-1].append(bool((plain.pull("b") == want_b).all()))
CHILD = """
import json, sys
import numpy as np
from warden import kv
s = kv.connect()
sh = s.share()
sh.grads["b"][0] = 12345.0
print(json.dumps([s.direct, sh.params["b"][:20].tolist()]))
"""
child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
out["child"] = json.loads(child.stdout) if child.returncode == 0 else child.stderr
same = isinstance(out["child"], list) and out["child"][1] == sh.params["b"][:20].tolist()
out["child_sees"] = same and float(sh.grads["b"][0]) == 12345.0
# The memory is sealed: the program cannot shrink it under its agent.
answer, fds = raw({"op": "share", "nbytes": 0})
try:
    os.ftruncate(fds[0], 0)
    out["shrink"] = "shrunk"
except OSError as e:
    out["shrink"] = e.errno
print("RESULT " + json.dumps(out), flush=True)
# The model file holds the servers' values, not what the program leaves here.
sh.params["a"].fill(np.nan)
"#;

#[test]
fn tensors_across_chunks_and_servers_arrive_whole_by_every_path() {
    let tag = fresh_tag();
    let dir = scratch("byo-chunked");
    let script = dir.join("chunked.py");
    std::fs::write(&script, CHUNKED).unwrap();
    let job = script_job(&dir, (32340, 32349), &script, "sync");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("x = [6]\ny = [2, 3]", "a = [2100000]\nb = [3001]")
        .replace("mode = \"sync\"", "mode = \"sync\"\nchunk_kib = 4");
    std::fs::write(&job, text).unwrap();
    let run = dir.join("run");
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 120);
    assert_eq!(status.code(), Some(0), "{stderr}");
    for rank in 0..2 {
        let log = std::fs::read_to_string(run.join(format!("logs/localhost-worker-{rank}.log"))).unwrap();
        let line = log.lines().find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_string())).expect("a result");
        let out: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(out["direct"], serde_json::json!([true, false]), "rank {rank}");
        let steps = [[true, true], [true, true], [true, true], [true, true]];
        let shared = serde_json::json!([[true, true], [true, true], [true, true, true], [true, true]]);
        let mut want = serde_json::json!(steps);
        want.as_array_mut().unwrap().extend(shared.as_array().unwrap().iter().cloned());
        assert_eq!(out["steps"], want, "rank {rank}: {out}");
        assert!(out["not_shared"]["error"].as_str().unwrap().contains("call `share` first"), "{out}");
        assert!(out["mid_step"].as_str().unwrap().contains("share between steps"), "{out}");
        assert_eq!(out["child"][0], serde_json::json!(false), "a child gets no direct copies: {out}");
        assert_eq!(out["child_sees"], serde_json::json!(true), "{out}");
        assert_eq!(out["shrink"], serde_json::json!(nix::errno::Errno::EPERM as i32), "{out}");
    }
    // Ten steps of SGD (lr 0.5, mean gradient 1.5 times each step's scale;
    // the scales add up to 20) from `a`'s start, whatever worker 0's
    // program wrote into its shared copy before it exited.
    let bytes = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = header["a"]["data_offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize);
    let (start, end) = (at.clone().min().unwrap(), at.max().unwrap());
    let a = &bytes[8 + n + start..8 + n + end];
    for (i, v) in a.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).enumerate() {
        assert_eq!(v, (i % 1000) as f32 - 15.0, "model value {i}");
    }
    wait_gone(&tag);
}
