//! `warden bench ps`: parameter-server throughput, TLS on as always.
//!
//! Runs a local job of the synthetic model: every worker pushes a gradient of
//! P floats to the servers and pulls the result, K untimed warm-up steps
//! (one epoch) and then K timed ones, and prints one line:
//! `warden ps: W=.. S=.. P=.. compression=.. steps_per_s=.. worker_GBps=..`
//! where `worker_GBps` is the bytes one worker pushed plus pulled per second
//! (on the wire: compressed pushes count what they take), and steps per
//! second are the slowest worker's.

use std::path::{Path, PathBuf};

use warden_agent::store::checkpoint::{self as ck, CheckpointKey, CheckpointSecret, Placement, Shape, ShardState};

use crate::cli::EXIT_OK;
use crate::error::{CliError, Context};
use crate::launch::{LaunchOptions, prepare};

/// Arguments of `warden bench ps`.
#[derive(Debug, Clone, clap::Args)]
pub struct PsArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Server processes.
    #[arg(long, default_value_t = 1)]
    pub servers: u32,
    /// Floats pushed and pulled per step (scientific notation welcome: 4e6).
    #[arg(long, default_value = "4e6", value_parser = parse_count)]
    pub params: u64,
    /// Timed steps (after as many warm-up steps).
    #[arg(long, default_value_t = 50)]
    pub iters: u32,
    /// `sync` or `async`.
    #[arg(long, default_value = "sync")]
    pub mode: String,
    /// Wire encoding of the pushes: `none` (f32), `fp16`, `bf16` or `2bit`
    /// (as `[training] compression`; 2bit with threshold 0.5, as MXNet's
    /// default).
    #[arg(long, default_value = "none")]
    pub compression: String,
    /// KiB per pipelined chunk (`[training] chunk_kib`); the job file's
    /// default when not given.
    #[arg(long)]
    pub chunk_kib: Option<u32>,
    /// How workers reach the servers (`[cluster] same_host`): `unix`, the
    /// servers' Unix-domain sockets (every process of the benchmark runs on
    /// this host), or `tcp`, their ports on 127.0.0.1, as from another host.
    #[arg(long, default_value = "unix", value_parser = ["unix", "tcp"])]
    pub same_host: String,
}

/// A `--params` that is not a count of floats.
#[derive(Debug, thiserror::Error)]
enum CountError {
    #[error("`{0}` is not a number")]
    NotANumber(String),
    #[error("{0} must be a whole number from 1 to 1e9")]
    OutOfRange(String),
}

fn parse_count(s: &str) -> Result<u64, CountError> {
    let v: f64 = s.parse().map_err(|_| CountError::NotANumber(s.to_string()))?;
    if !(1.0..=1e9).contains(&v) || v.fract() != 0.0 {
        return Err(CountError::OutOfRange(s.to_string()));
    }
    Ok(v as u64)
}

/// `count` consecutive free loopback ports.
fn free_ports(count: u16) -> Option<u16> {
    for _ in 0..100 {
        let base = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        if base.checked_add(count).is_none_or(|end| end > 65000) || base < 1024 {
            continue;
        }
        if (base..base + count).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Some(base);
        }
    }
    None
}

/// Runs the benchmark and prints its line.
pub fn exec_ps(a: &PsArgs) -> Result<u8, CliError> {
    if a.workers == 0 || a.servers == 0 || a.iters == 0 {
        return Err(CliError::usage("--workers, --servers and --iters must be at least 1"));
    }
    let base = free_ports(a.servers as u16 + 1).ok_or_else(|| CliError::failed("no free port range on 127.0.0.1"))?;
    let frame_mib = ((a.params * 4).div_ceil(u64::from(a.servers)) >> 20) + 2;
    // A fresh directory with an unpredictable name (a fixed name in a shared
    // /tmp could be planted by another user, with symlinks in it), opened to
    // the job user's processes once it exists; removed when `tmp` drops.
    let tmp = tempfile::Builder::new()
        .prefix("warden-bench-")
        .tempdir()
        .map_err(|e| CliError::failed(Context::new("cannot create a scratch directory", e)))?;
    let dir = tmp.path().to_path_buf();
    let job = dir.join("bench.toml");
    let text = format!(
        "[job]\nname = \"bench-ps\"\nseed = 1\n\n[cluster]\nuser = \"warden\"\nports = [{base}, {}]\nsame_host = \"{}\"\n\n\
         [[cluster.hosts]]\nname = \"localhost\"\naddress = \"127.0.0.1\"\nscheduler = 1\nservers = {}\nworkers = {}\n\n\
         [model]\nkind = \"synthetic\"\nparams = {}\n\n[optimizer]\nkind = \"sgd\"\nlr = 0.001\n\n\
         [training]\nepochs = 2\nbatch_size = 1\nsteps = {}\nmode = \"{}\"\ncompression = \"{}\"\n{}\n[limits]\nmax_frame_mib = {}\n",
        base + a.servers as u16,
        a.same_host,
        a.servers,
        a.workers,
        a.params,
        a.iters,
        a.mode,
        a.compression,
        a.chunk_kib.map(|k| format!("chunk_kib = {k}\n")).unwrap_or_default(),
        frame_mib.min(1024),
    );
    use std::os::unix::fs::PermissionsExt;
    let prepared = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .and_then(|()| std::fs::write(&job, text));
    prepared.map_err(|e| CliError::failed(Context::new(dir.display().to_string(), e)))?;
    run(&job, dir.join("run"), a)
}

fn run(job: &Path, run_dir: PathBuf, a: &PsArgs) -> Result<u8, CliError> {
    let (spec, text, plan) = prepare(job, true).map_err(CliError::usage)?;
    let (agent, runtime) = crate::commands::launch::agent_and_runtime()?;
    let opts = LaunchOptions {
        run_dir: Some(run_dir),
        progress: false,
        epoch_lines: false,
        verbose: false,
        started: None,
        resume: None,
        metrics_listen: None,
    };
    let outcome = runtime.block_on(crate::commands::launch::launch_local(job, spec, text, plan, agent, opts));
    let outcome = outcome.map_err(CliError::failed)?;
    if outcome.summary.status != "succeeded" {
        let failure = outcome.summary.failure.unwrap_or_default();
        return Err(CliError::failed(format!("the benchmark job failed: {failure}")));
    }
    let timed = outcome.epochs.last().ok_or_else(|| CliError::failed("the benchmark recorded no epoch"))?;
    let steps_per_s = timed.slowest_worker_samples_per_s;
    let secs = timed.steps as f64 / steps_per_s.max(1e-9);
    let per_worker = (timed.bytes_pushed + timed.bytes_pulled) as f64 / f64::from(a.workers);
    println!(
        "warden ps: W={} S={} P={} compression={} same_host={} steps_per_s={:.2} worker_GBps={:.3}",
        a.workers,
        a.servers,
        a.params,
        a.compression,
        a.same_host,
        steps_per_s,
        per_worker / secs / 1e9
    );
    Ok(EXIT_OK)
}

/// Arguments of `warden bench worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Hidden layer widths of the MLP (comma-separated).
    #[arg(long, default_value = "256", value_delimiter = ',')]
    pub hidden: Vec<usize>,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed steps (after 20 warm-up steps).
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
}

/// Forward, backward and a local SGD step of the MLP on the shipped data,
/// single-threaded: the compute a worker does per step, without the network.
pub fn exec_worker(a: &WorkerArgs) -> Result<u8, CliError> {
    use warden_agent::job::spec::{ModelKind, ModelSpec};
    use warden_agent::train::model::{Batch, Workspace, init, num_params};
    if a.batch == 0 || a.steps == 0 || a.hidden.is_empty() || a.hidden.contains(&0) {
        return Err(CliError::usage("--batch, --steps and every hidden width must be at least 1"));
    }
    // Shipped data when run from the repository, else synthetic pixels.
    let shipped = PathBuf::from("data/fashion-mnist-small");
    let (x, y) = match warden_agent::train::data::load_idx(
        &shipped.join("train-images-idx3-ubyte.gz"),
        &shipped.join("train-labels-idx1-ubyte.gz"),
        784,
        10,
        1.0 / 255.0,
    ) {
        Ok(d) => (d.x, d.y),
        Err(_) => {
            ((0..8000 * 784).map(|i| (i % 251) as f32 / 251.0).collect(), (0..8000).map(|i| (i % 10) as u8).collect())
        }
    };
    let m = ModelSpec {
        kind: ModelKind::Mlp,
        inputs: 784,
        classes: 10,
        hidden: a.hidden.clone(),
        dropout: 0.0,
        params: 0,
        tensors: Vec::new(),
    };
    let mut params = init(&m, 1);
    let mut grad = vec![0.0; num_params(&m)];
    let mut opt = warden_agent::train::optimizer::ShardOptimizer::new(
        warden_agent::train::optimizer::OptimizerSpec::sgd(0.01),
        grad.len(),
    );
    let mut ws = Workspace::default();
    let n = y.len();
    let b = a.batch.min(n);
    let mut step = |i: usize| {
        let start = (i * b) % (n - b + 1);
        let batch = Batch { x: &x[start * 784..(start + b) * 784], y: &y[start..start + b] };
        ws.loss_and_grad::<warden_agent::train::train_rng::TrainRng>(&m, &params, &batch, &mut grad, None);
        opt.apply(&mut params, &[warden_agent::kernels::Grad::F32(&grad)], 1);
    };
    for i in 0..20 {
        step(i);
    }
    let t = std::time::Instant::now();
    for i in 0..a.steps {
        step(i);
    }
    let secs = t.elapsed().as_secs_f64();
    let hidden: Vec<String> = a.hidden.iter().map(usize::to_string).collect();
    println!(
        "warden worker: mlp 784-{}-10 batch={} samples_per_s={:.0} step_ms={:.3}",
        hidden.join("-"),
        b,
        (a.steps * b) as f64 / secs,
        secs * 1e3 / a.steps as f64
    );
    Ok(EXIT_OK)
}

/// Arguments of `warden bench checkpoint`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointArgs {
    /// Size of the shard state in MiB (parameters plus one optimizer slot).
    #[arg(long, default_value_t = 256)]
    pub mib: usize,
    /// Directory to measure in (created if missing): the bench writes in a
    /// fresh subdirectory of it and removes that afterwards (default: the
    /// system temp dir).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Rounds; the best of each is kept.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

/// Writes and reads the same shard state encrypted (the checkpoint format)
/// and as plain little-endian floats (1 MiB writes, fsync), in one run, and
/// prints throughputs and their ratios.
pub fn exec_checkpoint(a: &CheckpointArgs) -> Result<u8, CliError> {
    if a.mib == 0 || a.mib > 64 * 1024 || a.rounds == 0 {
        return Err(CliError::usage("--mib must be 1 to 65536 and --rounds at least 1"));
    }
    let scratch = scratch_dir(&a.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let result = CheckpointBench::new(scratch.path(), a).run();
    drop(scratch);
    let [wp, we, rp, re] = result.map_err(CliError::failed)?;
    println!(
        "warden checkpoint: MiB={} write_plain_MBps={wp:.0} write_encrypted_MBps={we:.0} write_ratio={:.2} \
         read_plain_MBps={rp:.0} read_encrypted_MBps={re:.0} read_ratio={:.2}",
        a.mib,
        we / wp,
        re / rp
    );
    Ok(EXIT_OK)
}

/// A fresh private directory in `parent` (which is created if missing),
/// removed with what the bench wrote when it drops: nothing already in
/// `parent` is touched.
fn scratch_dir(parent: &Path) -> Result<tempfile::TempDir, CliError> {
    std::fs::create_dir_all(parent)
        .map_err(|e| CliError::failed(Context::new(format!("cannot create {}", parent.display()), e)))?;
    tempfile::Builder::new().prefix("warden-bench-ckpt-").tempdir_in(parent).map_err(|e| {
        CliError::failed(Context::new(format!("cannot create a scratch directory in {}", parent.display()), e))
    })
}

/// One shard state (parameters and one optimizer slot), and where it is
/// written plain and encrypted.
struct CheckpointBench {
    state: ShardState,
    /// Floats per vector.
    len: usize,
    key: CheckpointKey,
    at: Placement,
    enc_path: PathBuf,
    plain_path: PathBuf,
    rounds: u32,
}

impl CheckpointBench {
    fn new(dir: &Path, a: &CheckpointArgs) -> Self {
        let len = a.mib * (1 << 20) / 8;
        let params: Vec<f32> = (0..len).map(|i| (i % 1000) as f32 * 1e-3).collect();
        CheckpointBench {
            state: ShardState { t: 1, slots: vec![params.clone()], params },
            len,
            key: CheckpointKey::new(&CheckpointSecret::generate()),
            at: Placement { job: warden_agent::net::identity::JobId::generate(), step: 1, shard: 0, shards: 1 },
            enc_path: dir.join("bench.wck"),
            plain_path: dir.join("bench.plain"),
            rounds: a.rounds,
        }
    }

    /// MB/s of writing plain, writing encrypted, reading plain, reading
    /// encrypted (in that order: the reads read what was written).
    fn run(&self) -> std::io::Result<[f64; 4]> {
        let shape = Shape { len: Some(self.len), slots: Some(1) };
        let write_enc = || {
            ck::write_shard(&self.enc_path, &self.key, &self.at, &self.state, ck::DEFAULT_CHUNK)
                .map(|_| ())
                .map_err(std::io::Error::other)
        };
        let read_enc = || {
            ck::read_shard(&self.enc_path, &self.key, Some(&self.at), shape).map(|_| ()).map_err(std::io::Error::other)
        };
        Ok([
            self.best(|| self.write_plain())?,
            self.best(write_enc)?,
            self.best(|| self.read_plain())?,
            self.best(read_enc)?,
        ])
    }

    /// MB/s of the fastest of the rounds of `f`.
    fn best(&self, mut f: impl FnMut() -> std::io::Result<()>) -> std::io::Result<f64> {
        let mut best = f64::MAX;
        for _ in 0..self.rounds {
            let t = std::time::Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok((self.len * 8) as f64 / best / 1e6)
    }

    fn write_plain(&self) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&self.plain_path)?;
        let mut buf = Vec::with_capacity(1 << 20);
        for arr in [&self.state.params, &self.state.slots[0]] {
            for piece in arr.chunks(1 << 18) {
                buf.clear();
                warden_agent::kernels::convert::extend_f32_le(&mut buf, piece);
                f.write_all(&buf)?;
            }
        }
        f.sync_all()
    }

    fn read_plain(&self) -> std::io::Result<()> {
        use std::io::Read;
        let mut f = std::fs::File::open(&self.plain_path)?;
        let mut out = [vec![0f32; self.len], vec![0f32; self.len]];
        let mut buf = vec![0u8; 1 << 20];
        for arr in out.iter_mut() {
            for piece in arr.chunks_mut(1 << 18) {
                f.read_exact(&mut buf[..piece.len() * 4])?;
                warden_agent::kernels::convert::copy_f32_le(piece, &buf[..piece.len() * 4]);
            }
        }
        Ok(())
    }
}
