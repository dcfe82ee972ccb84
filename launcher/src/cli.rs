//! Command-line interface: the arguments of every subcommand, and [`main`],
//! which runs the one given and returns the process exit code.
//!
//! Most subcommands are an `exec` function in a module of `commands/`, one
//! module per group (`launch.rs` has `launch` and `doctor`, `run_dir.rs` has
//! `status`, `logs` and `stop`, `signing.rs` has `keygen`, `sign` and
//! `verify`). `serve` and `apikey` call [`crate::serve`]; `completions` and
//! `man` are answered here from the clap definition.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::error::{CliError, Context};

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code for a job that ran and failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for bad input: an invalid job file, a missing file, bad flags.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a job stopped on request (a signal, `warden stop`,
/// `max_hours`) with its work kept: 128 + SIGINT, as shells report Ctrl-C.
pub const EXIT_STOPPED: u8 = 130;

/// warden: secure-by-default parameter-server training on your own machines.
#[derive(Debug, Parser)]
#[command(
    name = "warden",
    version,
    about = "Secure-by-default parameter-server training on your own machines.",
    long_about = "Secure-by-default parameter-server training on your own machines.\n\n\
        Describe a job in one TOML file, then launch it. Every connection is mutual TLS 1.3 \
        with certificates from a fresh per-job CA; the optimizer is data, never code.",
    after_help = "Examples:\n  \
        warden validate configs/local.toml\n  \
        warden plan configs/local.toml\n  \
        warden launch configs/local.toml --local\n\n\
        Docs: docs/guide.md (start here), docs/job-file.md (every key), docs/security.md (threat model), \
        docs/operations.md, docs/checkpoints.md, docs/signing.md, docs/serving.md, docs/byo.md (your own \
        program), docs/ssh.md (several machines), docs/fuzzing.md, docs/benchmarks.md. \
        `warden man` prints the manual page, `warden completions SHELL` a completion script."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a job file and report the first problem with its line and column.
    #[command(after_help = "Example:\n  warden validate configs/local.toml\n\n\
        A file that parses is checked against this machine too: the data loads as the workers would load it \
        (headers against [model] inputs and classes, images against labels, truncation, label range), the job user \
        exists, key files are private. Every problem is listed; files a remote job's hosts hold but this machine \
        does not are noted.\n\n\
        Exit status: 0 when valid; 2 with `error: FILE:LINE:COL: ...` or `error: FILE: [table] key: ...` \
        on stderr otherwise.\n\nDocs: docs/job-file.md")]
    Validate {
        /// The job file.
        job: PathBuf,
    },
    /// Show what a launch would do (processes, addresses, ports, identities, firewall) without touching anything.
    #[command(
        after_help = "Examples:\n  warden plan configs/local.toml\n  warden plan configs/local.toml --json > plan.json\n\n\
        The job id shown is an example: every launch draws a fresh one.\n\nDocs: docs/job-file.md"
    )]
    Plan {
        /// The job file.
        job: PathBuf,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Plan for `--local` (every process on this machine at 127.0.0.1).
        #[arg(long)]
        local: bool,
    },
    /// Run a job: certificates, processes, training, model, summary.
    #[command(after_help = "Examples:\n  warden launch configs/local.toml --local --run-dir runs/try1\n  \
        warden launch configs/two-hosts.toml          # over SSH, hosts from the job file\n  \
        warden launch job.toml --run-dir ~/runs/a     # [cluster.slurm]: sbatch, or the allocation it runs in\n\n\
        The run directory gets summary.json, metrics.csv, logs/ (one file per process) and \
        model/model.safetensors. Exit status: 0 when training finished; 1 when the job failed \
        (summary.json says why); 2 for an invalid job file or bad flags. A job submitted with sbatch \
        returns 0 at once with its Slurm job id.\n\nDocs: docs/guide.md, docs/job-file.md, docs/slurm.md")]
    Launch {
        /// The job file.
        job: PathBuf,
        /// Run every process on this machine (the hosts' addresses become 127.0.0.1).
        /// Without it, hosts are reached over SSH.
        #[arg(long)]
        local: bool,
        /// Trust and record host keys seen for the first time (default: refuse unknown hosts).
        #[arg(long)]
        accept_new_host_keys: bool,
        /// Where to write results (default: runs/NAME-YYYYMMDD-HHMMSS). Must be empty or absent.
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
        /// No progress bar (plain lines only).
        #[arg(long)]
        no_progress: bool,
        /// Also print every process's INFO lines as they are logged (they are
        /// always in RUN_DIR/logs/).
        #[arg(short, long)]
        verbose: bool,
        /// Run the launcher in a session of its own and return once the run has started:
        /// the job survives logging out. Its output goes to RUN_DIR/launcher.log; follow
        /// it with `warden logs RUN_DIR -f`, stop it with `warden stop RUN_DIR`.
        #[arg(long)]
        detach: bool,
        /// Leave the caller's session first (how --detach starts the launcher).
        #[arg(long, hide = true)]
        own_session: bool,
        /// Continue an earlier run from its newest checkpoint that is complete and valid on
        /// every server (needs [checkpoint] with the same key_file). Results go to a new run directory.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// Serve the job's figures for Prometheus at http://ADDR/metrics while it runs
        /// (step, loss, learning rate, samples/s, bytes, test accuracy). ADDR is HOST:PORT,
        /// or a port alone for 127.0.0.1:PORT. Plain HTTP, no authentication: keep it on loopback.
        #[arg(long, value_name = "ADDR", value_parser = parse_metrics_listen)]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Check every host of a job over SSH (or this machine, with --local): OS, nft, job user, free ports, disk, clock.
    #[command(
        after_help = "Examples:\n  warden doctor configs/two-hosts.toml\n  warden doctor configs/local.toml --local\n\n\
        Prints one line per host and check; exit status 1 if any check fails. \
        `warden launch` runs the same checks before deploying.\n\nDocs: docs/ssh.md"
    )]
    Doctor {
        /// The job file.
        job: PathBuf,
        /// Trust and record host keys seen for the first time.
        #[arg(long)]
        accept_new_host_keys: bool,
        /// Check this machine for `launch --local` instead (no SSH): the same host checks,
        /// then the job's data, files and keys as `validate` checks them.
        #[arg(long)]
        local: bool,
    },
    /// List the runs in a directory (default ./runs): status, start, duration, epochs, accuracy.
    #[command(after_help = "Examples:\n  warden runs\n  warden status runs/latest\n\n\
        runs/latest points at the newest run started in ./runs.\n\nDocs: docs/operations.md")]
    Runs {
        /// Where the runs are.
        #[arg(default_value = "runs")]
        dir: PathBuf,
    },
    /// How a run stands, from its directory (also after its launcher died).
    #[command(after_help = "Example:\n  warden status runs/fashion-local-20261126-101500\n\nDocs: docs/operations.md")]
    Status {
        /// The run directory.
        dir: PathBuf,
    },
    /// Print a run's logs, each line prefixed host/role[rank].
    #[command(
        after_help = "Examples:\n  warden logs runs/RUN\n  warden logs runs/RUN -f --role worker\n  warden logs runs/RUN --tail 20\n  warden logs runs/RUN --host node2\n\nDocs: docs/operations.md"
    )]
    Logs {
        /// The run directory.
        dir: PathBuf,
        /// Keep printing new lines while the job runs.
        #[arg(short, long)]
        follow: bool,
        /// Only this host's processes.
        #[arg(long)]
        host: Option<String>,
        /// Only this role (scheduler, server, worker).
        #[arg(long)]
        role: Option<String>,
        /// Only the last N lines of each log (then new ones, with --follow).
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:\n  warden completions bash > /etc/bash_completion.d/warden\n  \
        warden completions zsh > ~/.zfunc/_warden\n\nDocs: docs/operations.md")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per subcommand.
    #[command(after_help = "Examples:\n  warden man > /usr/local/share/man/man1/warden.1 && man warden\n  \
        warden man --dir /usr/local/share/man/man1 && man warden-launch\n\nDocs: docs/operations.md")]
    Man {
        /// Write warden.1 and a page for every subcommand (warden-launch.1,
        /// warden-checkpoint-list.1, ...) into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Stop a running job; after a launcher crash, remove what it left on the hosts.
    #[command(after_help = "Example:\n  warden stop runs/RUN\n\nDocs: docs/operations.md")]
    Stop {
        /// The run directory.
        dir: PathBuf,
    },
    /// Measure warden on this machine.
    #[command(subcommand, after_help = "Docs: docs/benchmarks.md")]
    Bench(BenchCommand),
    /// The per-job nftables tables on this host (needs root).
    #[command(subcommand, after_help = "Docs: docs/operations.md, docs/security.md")]
    Firewall(FirewallCommand),
    /// Make an ECDSA P-256 key pair for signing models.
    #[command(after_help = "Examples:\n  warden keygen --out keys/\n  \
        WARDEN_PASS=... warden keygen --out keys/ --passphrase-env WARDEN_PASS\n\n\
        Writes DIR/private.pem (PKCS#8, mode 0600; encrypted with PBKDF2-SHA256 and AES-256-CBC when a \
        passphrase is given) and DIR/public.pem (SubjectPublicKeyInfo). Both work with `model_signing ... key`.\n\nDocs: docs/signing.md")]
    Keygen {
        /// Directory for private.pem and public.pem (existing keys are never overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Protect the private key with the passphrase in this environment variable.
        #[arg(long, value_name = "VAR")]
        passphrase_env: Option<String>,
    },
    /// Sign a model directory (OpenSSF model signing v1.0, key mode).
    #[command(after_help = "Example:\n  warden sign runs/RUN/model --key keys/private.pem\n\n\
        Writes MODEL_DIR/model.sig (or --signature PATH): a Sigstore bundle with a DSSE envelope over an in-toto \
        statement listing every file's SHA-256. `model_signing verify key MODEL_DIR --signature ... --public_key ...` \
        accepts it.\n\nDocs: docs/signing.md")]
    Sign {
        /// The model directory.
        model: PathBuf,
        /// The private key (PEM).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// Where to write the signature (default: MODEL_DIR/model.sig).
        #[arg(long, value_name = "PATH")]
        signature: Option<PathBuf>,
        /// The key's passphrase is in this environment variable.
        #[arg(long, value_name = "VAR")]
        passphrase_env: Option<String>,
    },
    /// Verify a model directory against its signature and a trusted public key.
    #[command(after_help = "Example:\n  warden verify runs/RUN/model --pubkey keys/public.pem\n\n\
        Strict: exactly one signature and subject, the model-signing v1.0 predicate, the key's hint, no unknown \
        fields, no symlinks, no file added, missing, renamed or changed. Exit status 1 says which.\n\nDocs: docs/signing.md")]
    Verify {
        /// The model directory.
        model: PathBuf,
        /// The trusted public key (PEM).
        #[arg(long, value_name = "PUB")]
        pubkey: PathBuf,
        /// The signature (default: MODEL_DIR/model.sig).
        #[arg(long, value_name = "PATH")]
        signature: Option<PathBuf>,
    },
    /// Serve predictions from a signed model over HTTPS, with API keys, budgets and rate limits.
    #[command(
        after_help = "Example:\n  warden serve runs/RUN/model --pubkey keys/public.pem --listen 127.0.0.1:8443 --config serve.toml\n  \
        curl --cacert cert.pem -H 'Authorization: Bearer KEY' -d '{\"input\": [...784 numbers...]}' https://127.0.0.1:8443/v1/predict\n\n\
        The signature is verified before the model is loaded. Without --tls-cert/--tls-key a self-signed certificate \
        is made, written to serve-cert.pem (beside the state file) for curl --cacert, and its key's pin printed. docs/serving.md explains every setting."
    )]
    Serve {
        /// The signed model directory (model.safetensors and model.sig).
        model: PathBuf,
        /// The public key the model's signature must verify under.
        #[arg(long, value_name = "PUB")]
        pubkey: PathBuf,
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// Settings: API keys or client certificates, output and budgets per key or holder, limits (see docs/serving.md).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// TLS certificate chain (PEM).
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Without --tls-cert: where to write the self-signed certificate for clients
        /// (default: serve-cert.pem beside the state file, or in the current directory).
        #[arg(long, value_name = "PEM", conflicts_with = "tls_cert")]
        tls_cert_out: Option<PathBuf>,
    },
    /// Make an API key for `warden serve`: prints the key once, and the entry for the keys file.
    #[command(
        after_help = "Example:\n  warden apikey --id alice >> /dev/null   # shows the key on stderr, the entry on stdout\n\n\
        Only the SHA-256 of the key goes into the keys file; give the key itself to its user.\n\nDocs: docs/serving.md"
    )]
    Apikey {
        /// A name for the key (appears in logs and the state file).
        #[arg(long)]
        id: String,
    },
    /// Encrypted checkpoints on this host: make a key, list, verify, prune.
    #[command(subcommand, after_help = "Docs: docs/checkpoints.md")]
    Checkpoint(CheckpointCommand),
}

/// Checkpoint maintenance, on the host that holds the checkpoints.
#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Make a new checkpoint key file (256 bits from the OS CSPRNG, mode 0600).
    #[command(after_help = "Example:\n  warden checkpoint keygen ~/.config/warden/fashion.key\n\n\
        Name it in the job file as [checkpoint] key_file to resume across launches. \
        Keep it apart from the checkpoints: whoever has both can read them.\n\nDocs: docs/checkpoints.md")]
    Keygen {
        /// Where to write the key (must not exist).
        file: PathBuf,
    },
    /// List checkpoint steps: complete (with a manifest) or not, shards and sizes. Needs no key.
    #[command(after_help = "Examples:\n  warden checkpoint list /var/lib/warden/checkpoints\n  \
        warden checkpoint list /var/lib/warden/checkpoints/3f2a9c0d1e4b5a6978800112233aabbc\n\nDocs: docs/checkpoints.md")]
    List {
        /// A checkpoint root ([checkpoint] dir) or one series directory inside it.
        dir: PathBuf,
    },
    /// Decrypt and check every shard file on this host against its manifest.
    #[command(after_help = "Example:\n  warden checkpoint verify /var/lib/warden/checkpoints --key-file job.key\n\n\
        Exit status 1 if any complete step fails; incomplete steps are reported, not failed.\n\nDocs: docs/checkpoints.md")]
    Verify {
        /// A checkpoint root or one series directory.
        dir: PathBuf,
        /// The job's key file.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
    },
    /// Keep the newest N complete steps of each series; delete the rest and stale incomplete ones.
    #[command(
        after_help = "Example:\n  warden checkpoint prune /var/lib/warden/checkpoints --keep 1\n\nDocs: docs/checkpoints.md"
    )]
    Prune {
        /// A checkpoint root or one series directory.
        dir: PathBuf,
        /// Complete steps to keep per series.
        #[arg(long, value_name = "N")]
        keep: usize,
    },
}

/// Firewall maintenance.
#[derive(Debug, Subcommand)]
pub enum FirewallCommand {
    /// List the warden tables on this host.
    #[command(after_help = "Example:\n  sudo warden firewall list\n\nDocs: docs/operations.md, docs/security.md")]
    List,
    /// Remove a job's table, or every warden table (left by crashed jobs).
    #[command(
        after_help = "Examples:\n  sudo warden firewall clean\n  sudo warden firewall clean warden_3f2a9c0d1e4b\n\nDocs: docs/operations.md, docs/security.md"
    )]
    Clean {
        /// The table (default: all warden tables).
        table: Option<String>,
    },
}

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Parameter-server throughput: W workers push and pull P floats through S servers over mutual TLS.
    #[command(after_help = "Examples:\n  warden bench ps --workers 2 --servers 1 --params 4e6 --iters 50\n  \
        warden bench ps --params 16e6 --compression 2bit --chunk-kib 1024\n\n\
        Prints: warden ps: W=2 S=1 P=4000000 compression=none same_host=unix steps_per_s=.. worker_GBps=..\n\
        worker_GBps counts the bytes one worker pushed plus pulled per second (as sent: compressed pushes count \
        their compressed size); steps/s are the slowest worker's. ./scripts/bench-mxnet compares it with MXNet; \
        docs/benchmarks.md has reference figures.")]
    Ps(crate::commands::bench::PsArgs),
    /// Worker compute: forward, backward and update of the MLP on one core, no network.
    #[command(after_help = "Example:\n  warden bench worker --hidden 256 --batch 64\n\n\
        Prints: warden worker: mlp 784-256-10 batch=64 samples_per_s=.. step_ms=..\n\
        Run from the repository root to use the shipped data.\n\nDocs: docs/benchmarks.md")]
    Worker(crate::commands::bench::WorkerArgs),
    /// Encrypted checkpoint write and read throughput against plain files of the same bytes.
    #[command(after_help = "Example:\n  warden bench checkpoint --mib 512 --dir /var/lib/warden/checkpoints\n\n\
        Prints: warden checkpoint: MiB=.. write_plain_MBps=.. write_encrypted_MBps=.. write_ratio=.. \
        read_plain_MBps=.. read_encrypted_MBps=.. read_ratio=..\n\
        Both sides write 1 MiB at a time and fsync; reads fill float vectors. Use --dir on the disk your checkpoints live on.\n\nDocs: docs/benchmarks.md")]
    Checkpoint(crate::commands::bench::CheckpointArgs),
}

/// Parses arguments and runs the command; returns the exit code. A
/// command's error is printed here, and only here, with its causes.
pub fn main() -> u8 {
    // Everything warden writes (run directories, logs, models, keys, state)
    // is its user's alone unless they share it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    init_tracing();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprint!("{}", e.report());
            e.code()
        }
    }
}

/// Logs to stderr at the level `WARDEN_LOG` names (default: warnings).
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WARDEN_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
}

/// Runs `command`: its exit code, or why it failed.
fn run(command: Command) -> Result<u8, CliError> {
    use crate::commands::{bench, checkpoint, firewall, launch, plan, run_dir, signing, validate};
    match command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "warden", &mut std::io::stdout());
            Ok(EXIT_OK)
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::Validate { job } => validate::exec(&job),
        Command::Plan { job, json, local } => plan::exec(&job, json, local),
        Command::Launch {
            job,
            local,
            run_dir,
            no_progress,
            accept_new_host_keys,
            resume,
            verbose,
            detach,
            own_session,
            metrics_listen,
        } => launch::exec(&launch::LaunchArgs {
            job,
            local,
            run_dir,
            progress: !no_progress,
            accept_new_host_keys,
            resume,
            verbose,
            detach,
            own_session,
            metrics_listen,
        }),
        Command::Doctor { job, accept_new_host_keys, local } => launch::exec_doctor(&job, accept_new_host_keys, local),
        Command::Runs { dir } => run_dir::exec_runs(&dir),
        Command::Status { dir } => run_dir::exec_status(&dir),
        Command::Logs { dir, follow, host, role, tail } => {
            run_dir::exec_logs(&dir, &run_dir::LogFilter { host: host.as_deref(), role: role.as_deref(), tail }, follow)
        }
        Command::Stop { dir } => run_dir::exec_stop(&dir),
        Command::Bench(BenchCommand::Ps(args)) => bench::exec_ps(&args),
        Command::Bench(BenchCommand::Worker(args)) => bench::exec_worker(&args),
        Command::Bench(BenchCommand::Checkpoint(args)) => bench::exec_checkpoint(&args),
        Command::Firewall(FirewallCommand::List) => firewall::exec_list(),
        Command::Firewall(FirewallCommand::Clean { table }) => firewall::exec_clean(table.as_deref()),
        Command::Serve { model, pubkey, listen, config, tls_cert, tls_key, tls_cert_out } => {
            serve(crate::serve::ServeOptions {
                model,
                pubkey,
                listen,
                config,
                tls: tls_cert.zip(tls_key),
                tls_cert_out,
            })
        }
        Command::Apikey { id } => {
            let (key, entry) = crate::serve::new_api_key(&id);
            eprintln!("API key for `{id}` (shown once; give it to its user): {key}");
            print!("{entry}");
            Ok(EXIT_OK)
        }
        Command::Keygen { out, passphrase_env } => signing::exec_keygen(&out, passphrase_env.as_deref()),
        Command::Sign { model, key, signature, passphrase_env } => {
            signing::exec_sign(&model, &key, signature.as_deref(), passphrase_env.as_deref())
        }
        Command::Verify { model, pubkey, signature } => signing::exec_verify(&model, &pubkey, signature.as_deref()),
        Command::Checkpoint(CheckpointCommand::Keygen { file }) => checkpoint::exec_keygen(&file),
        Command::Checkpoint(CheckpointCommand::List { dir }) => checkpoint::exec_list(&dir),
        Command::Checkpoint(CheckpointCommand::Verify { dir, key_file }) => checkpoint::exec_verify(&dir, &key_file),
        Command::Checkpoint(CheckpointCommand::Prune { dir, keep }) => checkpoint::exec_prune(&dir, keep),
    }
}

/// `--metrics-listen`: `HOST:PORT`, or a port alone on loopback.
fn parse_metrics_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| format!("`{text}` is not HOST:PORT or a port, e.g. 127.0.0.1:9464 or 9464"))
}

/// `warden man`: the manual page on stdout, or every page into `dir`.
fn man(dir: Option<&Path>) -> Result<u8, CliError> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .map_err(|e| CliError::failed(Context::new("cannot write the manual page", e)))?;
        return Ok(EXIT_OK);
    };
    let cannot = |e| CliError::failed(Context::new(format!("cannot write the manual pages into {}", dir.display()), e));
    std::fs::create_dir_all(dir).map_err(cannot)?;
    clap_mangen::generate_to(cmd, dir).map_err(cannot)?;
    let pages = std::fs::read_dir(dir)
        .map_err(cannot)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("warden") && n.ends_with(".1"))
        .count();
    let d = dir.display();
    eprintln!(
        "wrote {pages} manual pages into {d} (warden.1, warden-launch.1, ...); read one: man -l {d}/warden-launch.1"
    );
    Ok(EXIT_OK)
}

/// `warden serve`: serves until stopped. A model, key or setting that does
/// not work is bad input.
fn serve(opts: crate::serve::ServeOptions) -> Result<u8, CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(CliError::failed)?;
    runtime.block_on(crate::serve::serve(opts)).map_err(CliError::usage)?;
    Ok(EXIT_OK)
}
