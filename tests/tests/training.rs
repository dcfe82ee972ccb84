//! Training is correct, not just running: sync data parallelism is exactly
//! large-batch SGD, the MLP converges on the shipped data in sync and async
//! mode, and the run directory records what happened.

use std::path::{Path, PathBuf};
use std::process::Command;

use warden_agent::job::spec::JobSpec;
use warden_agent::train::data::Dataset;
use warden_agent::train::model::{Batch, Workspace, init};
use warden_agent::train::optimizer::{OptimizerSpec, ShardOptimizer};
use warden_agent::train::roles::worker::{epoch_order, steps_per_epoch};
use warden_agent::train::train_rng::TrainRng;
use warden_tests::{bin, repo_root, scratch};

fn write_idx(dir: &Path, ds: &Dataset, name: &str) -> (PathBuf, PathBuf) {
    let side = (ds.features as f64).sqrt() as u32;
    let mut img = vec![0, 0, 8, 3];
    for d in [ds.len() as u32, side, side] {
        img.extend_from_slice(&d.to_be_bytes());
    }
    img.extend(ds.x.iter().map(|v| (v * 255.0).round() as u8));
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&(ds.len() as u32).to_be_bytes());
    lab.extend_from_slice(&ds.y);
    let (i, l) = (dir.join(format!("{name}-images")), dir.join(format!("{name}-labels")));
    std::fs::write(&i, img).unwrap();
    std::fs::write(&l, lab).unwrap();
    (i, l)
}

/// The flat parameter vector of the model file at `path` (stored in
/// PyTorch's layout, read back by warden's reader).
fn read_model(path: &Path, spec: &JobSpec) -> Vec<f32> {
    warden_agent::store::artifact::read_model(path.parent().unwrap(), &spec.model).unwrap()
}

fn launch(job: &Path, run: &Path) -> serde_json::Value {
    let out = Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run.as_os_str()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// Also: pipelined chunks, and the transport between workers and servers
/// on one host, change nothing. The same job with shards cut into
/// 4 KiB chunks (13 per server, each updated on its own as soon as every
/// worker's copy is in) ends with the very same bits as with one chunk per
/// shard.
#[test]
fn sync_with_four_workers_equals_one_process_on_four_times_the_batch() {
    let dir = scratch("equiv");
    // 320 training samples: 80 per worker, 5 steps of batch 16 per epoch.
    let shipped = repo_root().join("data/fashion-mnist-small");
    let full = warden_agent::train::data::load_idx(
        &shipped.join("train-images-idx3-ubyte.gz"),
        &shipped.join("train-labels-idx1-ubyte.gz"),
        784,
        10,
        1.0 / 255.0,
    )
    .unwrap();
    let (ti, tl) = write_idx(&dir, &full.select(&(0..320).collect::<Vec<_>>()), "train");
    let (ei, el) = write_idx(&dir, &full.select(&(320..420).collect::<Vec<_>>()), "test");
    let job = dir.join("job.toml");
    let text = format!(
        r#"
[job]
name = "equivalence"
seed = 11
[cluster]
user = "warden"
ports = [29800, 29820]
[[cluster.hosts]]
name = "localhost"
address = "127.0.0.1"
scheduler = 1
servers = 2
workers = 4
[model]
kind = "mlp"
inputs = 784
hidden = [32]
classes = 10
[data]
format = "idx"
train_images = "{}"
train_labels = "{}"
test_images = "{}"
test_labels = "{}"
[optimizer]
kind = "sgd"
lr = 0.1
[training]
epochs = 2
batch_size = 16
mode = "sync"
chunk_kib = CHUNK
"#,
        ti.display(),
        tl.display(),
        ei.display(),
        el.display()
    );
    // The whole-shard run reaches its servers over TCP, the chunked one
    // through their Unix-domain sockets (the default on one host).
    let whole = text.replace("CHUNK", "1048576").replace("user = \"warden\"", "user = \"warden\"\nsame_host = \"tcp\"");
    std::fs::write(&job, whole).unwrap();
    let summary = launch(&job, &dir.join("whole"));
    assert_eq!(summary["steps"], 10);
    std::fs::write(&job, text.replace("CHUNK", "4")).unwrap();
    let summary = launch(&job, &dir.join("run"));
    assert_eq!(summary["steps"], 10);
    for (run, from) in [("whole", "127.0.0.1:"), ("run", ".sock (pid ")] {
        for server in 0..2 {
            let log = std::fs::read_to_string(dir.join(format!("{run}/logs/localhost-server-{server}.log"))).unwrap();
            let connected = log.lines().filter(|l| l.contains("connected from")).collect::<Vec<_>>();
            assert_eq!(connected.len(), 4, "{run}: each worker connects once: {log}");
            assert!(connected.iter().all(|l| l.contains(from)), "{run}: workers connect from {from}: {log}");
        }
    }

    // The same computation in one process: every step, the four workers'
    // batches (as each worker chose them) form one batch of 64.
    let (spec, _) = JobSpec::load(&job).unwrap();
    let (train, _) = warden_agent::train::data::load(spec.data.as_ref().unwrap(), &spec.model, 11, false).unwrap();
    let workers = 4;
    let b = 16;
    let steps = steps_per_epoch(train.len(), workers, b).unwrap();
    let shards: Vec<Dataset> = (0..workers).map(|r| train.shard(r, workers)).collect();
    let mut params = init(&spec.model, 11);
    let mut opt = ShardOptimizer::new(OptimizerSpec::sgd(0.1), params.len());
    let mut ws = Workspace::default();
    let mut grad = vec![0.0; params.len()];
    for epoch in 1..=2 {
        let orders: Vec<Vec<usize>> =
            shards.iter().enumerate().map(|(r, s)| epoch_order(11, r as u32, epoch, s.len())).collect();
        for step in 0..steps {
            let mut x = Vec::new();
            let mut y = Vec::new();
            for (shard, order) in shards.iter().zip(&orders) {
                for &i in &order[step * b..(step + 1) * b] {
                    x.extend_from_slice(&shard.x[i * 784..(i + 1) * 784]);
                    y.push(shard.y[i]);
                }
            }
            ws.loss_and_grad::<TrainRng>(&spec.model, &params, &Batch { x: &x, y: &y }, &mut grad, None);
            opt.apply(&mut params, &[warden_agent::kernels::Grad::F32(&grad)], 1);
        }
    }
    let trained = read_model(&dir.join("run/model/model.safetensors"), &spec);
    let whole = read_model(&dir.join("whole/model/model.safetensors"), &spec);
    assert!(trained.len() > 2 * 12 * 1024, "several 4 KiB chunks per server");
    let differ = trained.iter().zip(&whole).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "chunked and whole-shard training agree to the bit");
    let diff: f64 = trained.iter().zip(&params).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = params.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    let moved: f64 =
        init(&spec.model, 11).iter().zip(&params).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
    assert!(moved > 1e-2, "training moved the weights ({moved})");
    assert!(diff / norm < 1e-5, "relative difference {} (|diff| {diff}, |w| {norm})", diff / norm);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn mlp_job(dir: &Path, ports: (u16, u16), mode: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("configs/mlp.toml"))
        .unwrap()
        .replace("../data", repo_root().join("data").to_str().unwrap())
        .replace("ports = [29500, 29599]", &format!("ports = [{}, {}]", ports.0, ports.1))
        .replace("mode = \"sync\"", &format!("mode = \"{mode}\""));
    let job = dir.join("job.toml");
    std::fs::write(&job, text).unwrap();
    job
}

#[test]
fn the_mlp_reaches_84_percent_on_the_shipped_data_in_sync_mode() {
    let dir = scratch("mlp-sync");
    let s = launch(&mlp_job(&dir, (29830, 29840), "sync"), &dir.join("run"));
    let acc = s["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.84, "test accuracy {acc}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn async_training_converges_too() {
    let dir = scratch("mlp-async");
    let s = launch(&mlp_job(&dir, (29850, 29860), "async"), &dir.join("run"));
    let acc = s["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.80, "test accuracy {acc}");
    let metrics = std::fs::read_to_string(dir.join("run/metrics.csv")).unwrap();
    let losses: Vec<f64> = metrics.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    assert!(losses.last().unwrap() < &(losses[0] * 0.8), "training loss fell: {losses:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// configs/local.toml with plain SGD and the given compression.
fn compressed_job(dir: &Path, ports: (u16, u16), compression: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("configs/local.toml"))
        .unwrap()
        .replace("../data", repo_root().join("data").to_str().unwrap())
        .replace("ports = [29500, 29599]", &format!("ports = [{}, {}]", ports.0, ports.1))
        .replace("kind = \"momentum\"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 0.0001", "kind = \"sgd\"\nlr = 0.3")
        .replace("mode = \"sync\"", &format!("mode = \"sync\"\n{compression}"));
    assert!(text.contains("lr = 0.3"));
    let job = dir.join(format!("job-{}.toml", ports.0));
    std::fs::write(&job, text).unwrap();
    job
}

#[test]
fn compressed_gradients_shrink_the_wire_and_keep_the_accuracy() {
    let dir = scratch("compression");
    let plain = launch(&compressed_job(&dir, (29870, 29875), ""), &dir.join("none"));
    let bf16 = launch(&compressed_job(&dir, (29876, 29880), "compression = \"bf16\""), &dir.join("bf16"));
    let two = launch(
        &compressed_job(&dir, (29881, 29885), "compression = \"2bit\"\ncompression_threshold = 0.005"),
        &dir.join("2bit"),
    );
    let acc = |s: &serde_json::Value| s["test_accuracy"].as_f64().unwrap();
    let pushed = |s: &serde_json::Value| s["bytes_pushed"].as_f64().unwrap();
    assert!(acc(&two) >= acc(&plain) - 0.02, "2bit {} vs none {}", acc(&two), acc(&plain));
    assert!(acc(&bf16) >= acc(&plain) - 0.01, "bf16 {} vs none {}", acc(&bf16), acc(&plain));
    // Pushes shrink by the encoding's ratio (pull requests ride along uncompressed).
    let r16 = pushed(&bf16) / pushed(&plain);
    let r2 = pushed(&two) / pushed(&plain);
    assert!((0.45..0.55).contains(&r16), "bf16 pushes {r16} of f32");
    assert!(r2 < 0.1, "2bit pushes {r2} of f32");
    // Pulls stay full precision.
    assert_eq!(bf16["bytes_pulled"], plain["bytes_pulled"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
