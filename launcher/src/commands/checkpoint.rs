//! `warden checkpoint keygen|list|verify|prune`: the operator's view of the
//! encrypted checkpoints on this host.

use std::path::{Path, PathBuf};

use warden_agent::store::checkpoint::{self as ck, CheckpointKey, CheckpointSecret, Placement, Shape};

use crate::cli::{EXIT_FAILED, EXIT_OK};
use crate::error::{BoxError, CliError, Context};

/// Writes a fresh key file.
pub fn exec_keygen(file: &Path) -> Result<u8, CliError> {
    let secret = CheckpointSecret::generate();
    match secret.write_new(file) {
        Ok(()) => {
            let id = CheckpointKey::new(&secret).id_hex();
            println!("wrote checkpoint key {} (key id {id}, mode 0600)", file.display());
            println!("name it in the job file: [checkpoint] key_file = \"{}\"", file.display());
            Ok(EXIT_OK)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(CliError::usage(format!(
            "{} already exists; a key is never overwritten (its checkpoints would be lost)",
            file.display()
        ))),
        Err(e) => Err(CliError::failed(Context::new(format!("cannot write {}", file.display()), e))),
    }
}

/// The series directories under `dir` (or `dir` itself when it is one).
fn series_dirs(dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    let has_steps = |d: &Path| ck::list_steps(d).map(|s| !s.is_empty()).unwrap_or(false);
    if !dir.is_dir() {
        return Err(CliError::usage(format!("{} is not a directory", dir.display())));
    }
    if has_steps(dir) {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| CliError::usage(Context::new(dir.display().to_string(), e)))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| has_steps(p))
        .collect();
    out.sort();
    Ok(out)
}

/// Runs `f` on every series under `dir`: the worst of their exit codes.
fn for_each_series(dir: &Path, f: impl FnMut(&Path) -> u8) -> Result<u8, CliError> {
    let all = series_dirs(dir)?;
    if all.is_empty() {
        println!("no checkpoints under {}", dir.display());
    }
    Ok(all.iter().map(PathBuf::as_path).map(f).max().unwrap_or(EXIT_OK))
}

/// Lists steps without decrypting anything.
pub fn exec_list(dir: &Path) -> Result<u8, CliError> {
    for_each_series(dir, |series| {
        println!("series {}", series.display());
        for (step, path) in ck::list_steps(series).unwrap_or_default() {
            let files: Vec<(String, u64)> = std::fs::read_dir(&path)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".wck"))
                        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map_or(0, |m| m.len())))
                        .collect()
                })
                .unwrap_or_default();
            let bytes: u64 = files.iter().map(|f| f.1).sum();
            let state = match ck::read_manifest(&path, None) {
                Ok(m) => format!("complete, {} shard(s) in the manifest", m.shards),
                Err(_) if !ck::is_complete(&path) => "INCOMPLETE (no manifest; never used for resuming)".to_string(),
                Err(e) => format!("DAMAGED: {e}"),
            };
            println!("  step {step:>10}: {state}; {} shard file(s) here, {:.1} MB", files.len(), bytes as f64 / 1e6);
        }
        EXIT_OK
    })
}

/// Decrypts and checks every shard file present.
pub fn exec_verify(dir: &Path, key_file: &Path) -> Result<u8, CliError> {
    let key = CheckpointKey::new(&CheckpointSecret::load(key_file).map_err(CliError::usage)?);
    for_each_series(dir, |series| {
        println!("series {}", series.display());
        let mut worst = EXIT_OK;
        for (step, path) in ck::list_steps(series).unwrap_or_default() {
            if !ck::is_complete(&path) {
                println!("  step {step}: incomplete (no manifest); not checked");
                continue;
            }
            let m = match ck::read_manifest(&path, Some(&key)) {
                Ok(m) => m,
                Err(e) => {
                    println!("  step {step}: FAILED: {e}");
                    worst = EXIT_FAILED;
                    continue;
                }
            };
            let mut here = 0;
            for rec in &m.files {
                let file = path.join(&rec.file);
                if !file.exists() {
                    continue; // held by a server on another host
                }
                here += 1;
                let at = Placement { job: m.job_id.clone(), step, shard: rec.shard, shards: m.shards };
                match ck::read_for_manifest(&m, rec, &file, &key, Some(&at), Shape::default()) {
                    Ok(_) => {}
                    Err(e) => {
                        println!("  step {step}: FAILED: {e}");
                        worst = EXIT_FAILED;
                    }
                }
            }
            if worst == EXIT_OK || here > 0 {
                println!("  step {step}: checked {here} of {} shard file(s) on this host", m.shards);
            }
        }
        worst
    })
}

/// Applies retention by hand. A series that cannot be pruned does not keep
/// the others.
pub fn exec_prune(dir: &Path, keep: usize) -> Result<u8, CliError> {
    let mut errors: Vec<BoxError> = Vec::new();
    for_each_series(dir, |series| {
        match ck::prune(series, keep, None) {
            Ok(deleted) if deleted.is_empty() => println!("{}: nothing to delete", series.display()),
            Ok(deleted) => println!("{}: deleted steps {deleted:?}, kept the newest {keep} complete", series.display()),
            Err(e) => errors.push(Context::new(series.display().to_string(), e).into()),
        }
        EXIT_OK
    })?;
    match errors.is_empty() {
        true => Ok(EXIT_OK),
        false => Err(CliError::several(EXIT_FAILED, errors)),
    }
}
