//! `[training]`: the training loop, the gradients' wire encoding, and what
//! a failed process does to the job.

use serde::Serialize;
use toml::Spanned;

use super::{ModelKind, SpecError, Src, int_in, raw};
use crate::net::wire::Encoding;

/// `[training]`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingSpec {
    /// Passes over the data.
    pub epochs: u32,
    /// Samples per worker step.
    pub batch_size: usize,
    /// Sync or async updates.
    pub mode: SyncMode,
    /// Steps per epoch of the synthetic model (0 otherwise: set by the data).
    pub synthetic_steps: usize,
    /// Wire encoding of pushed gradients.
    pub compression: Compression,
    /// Seconds of silence after which a process (or the scheduler) is declared dead.
    pub heartbeat_timeout_s: u64,
    /// Size of the chunks a shard is pushed, aggregated and pulled in: a
    /// chunk's update starts once every worker's copy of it is in, and
    /// goes back while later chunks are still arriving.
    pub chunk_kib: usize,
    /// How servers combine the workers' gradients of a step.
    pub aggregation: Aggregation,
    /// When a worker counts as suspect, and what then happens.
    pub suspect: SuspectRule,
    /// What the launcher does when a process fails.
    pub on_failure: OnFailure,
}

/// `[training] aggregation`: how a server combines a step's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Their mean (the default; what every parameter server does).
    Mean,
    /// Per coordinate, the mean after dropping the `trim` smallest and
    /// largest values: tolerates `trim` workers pushing anything.
    TrimmedMean {
        /// Values dropped at each end.
        trim: u32,
    },
    /// Per coordinate, the median: tolerates fewer than half the workers
    /// pushing anything.
    Median,
    /// Centered clipping: each worker's difference from the previous
    /// step's combined gradient is clipped to L2 norm `radius` (over a
    /// server's shard, shared among its chunks) before they are averaged.
    CenteredClip {
        /// The clipping radius.
        radius: f32,
    },
}

impl Aggregation {
    /// The kernels' name for a per-coordinate rule (centered clipping has
    /// a kernel of its own: [`Aggregation::radius`]).
    pub fn combine(self) -> warden_kernels::Combine {
        match self {
            Aggregation::Mean | Aggregation::CenteredClip { .. } => warden_kernels::Combine::Mean,
            Aggregation::TrimmedMean { trim } => warden_kernels::Combine::TrimmedMean { trim: trim as usize },
            Aggregation::Median => warden_kernels::Combine::Median,
        }
    }

    /// Centered clipping's radius.
    pub fn radius(self) -> Option<f32> {
        match self {
            Aggregation::CenteredClip { radius } => Some(radius),
            _ => None,
        }
    }
}

/// `[training] suspect_ratio`, `suspect_steps` and `on_suspect`: a worker
/// whose gradient norm on a server's shard is above `ratio` times the
/// median of the workers' for `steps` sync steps in a row is suspect.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SuspectRule {
    /// Times the median norm.
    pub ratio: f64,
    /// Steps in a row.
    pub steps: u32,
    /// Stop the job (else: warn and go on).
    pub fail: bool,
}

/// `[training] on_failure`: what a process failure does to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop the whole job and report who failed and why (the default).
    Fail,
    /// Stop every process, then start the job again from the newest valid
    /// checkpoint, at most `max_restarts` times.
    Restart {
        /// Restarts allowed over the whole run.
        max_restarts: u32,
    },
}

impl TrainingSpec {
    /// Floats per pipelined chunk (`chunk_kib` of f32 values).
    pub fn chunk_floats(&self) -> usize {
        self.chunk_kib * 1024 / 4
    }
}

impl OnFailure {
    /// Restarts allowed (0 with `fail`).
    pub fn max_restarts(self) -> u32 {
        match self {
            OnFailure::Fail => 0,
            OnFailure::Restart { max_restarts } => max_restarts,
        }
    }
}

/// `[training] compression`: how workers encode gradients on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Compression {
    /// The encoding.
    pub encoding: Encoding,
    /// 2-bit only: the magnitude sent.
    pub threshold: f32,
}

/// How servers combine pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Every step waits for every worker's gradient (MXNet `dist_sync`).
    Sync,
    /// Each push is applied on arrival (MXNet `dist_async`).
    Async,
}

/// `[training] chunk_kib` unless set: 2 MiB, between MXNet's big-array
/// bound (1e6 floats) and BytePS' partition size (4 MB).
pub const DEFAULT_CHUNK_KIB: usize = 2048;

/// Checks `[training]`. `steps` is the synthetic model's alone, and
/// `on_failure = "restart"` needs a `[checkpoint]` table to restart from.
pub(super) fn convert_training(
    src: &Src<'_>,
    training: &Spanned<raw::Training>,
    kind: ModelKind,
    has_checkpoint: bool,
    workers: u32,
) -> Result<TrainingSpec, SpecError> {
    let t = training.get_ref();
    let epochs = int_in(src, &t.epochs, "epochs", 1, 100_000, "how many passes over the data, for example epochs = 5")?;
    let batch_size = int_in(
        src,
        &t.batch_size,
        "batch_size",
        1,
        1 << 20,
        "samples per step on each worker, for example batch_size = 64",
    )?;
    let mode = src.choice(
        t.mode.as_ref(),
        "training mode",
        &[("sync", SyncMode::Sync), ("async", SyncMode::Async)],
        "use \"sync\" or \"async\"",
    )?;
    let synthetic_steps = match (&t.steps, kind == ModelKind::Synthetic) {
        (Some(v), true) => int_in(src, v, "steps", 1, 1_000_000, "timed steps per epoch, such as 100")?,
        (None, true) => {
            return Err(src.err(
                training.span(),
                "the synthetic model needs [training] steps",
                "add for example steps = 100",
            ));
        }
        (Some(v), false) => {
            return Err(src.err(
                v.span(),
                "`steps` belongs to the synthetic model; real data sets the steps",
                "remove it",
            ));
        }
        (None, false) => 0,
    };
    let compression = convert_compression(src, t)?;
    let heartbeat_timeout_s = match &t.heartbeat_timeout {
        Some(v) => int_in(
            src,
            v,
            "heartbeat_timeout",
            2,
            3600,
            "seconds of silence before a process counts as dead; 30 suits most networks",
        )?,
        None => 30,
    };
    let chunk_kib = match &t.chunk_kib {
        Some(v) => int_in(
            src,
            v,
            "chunk_kib",
            4,
            1 << 20,
            "KiB per pipelined chunk of a shard; 2048 (2 MiB) suits most networks, smaller overlaps more but costs a frame per chunk",
        )?,
        None => DEFAULT_CHUNK_KIB,
    };
    let on_failure = convert_on_failure(src, t, has_checkpoint)?;
    let aggregation = convert_aggregation(src, training, mode, workers)?;
    let suspect = convert_suspect(src, t)?;
    Ok(TrainingSpec {
        epochs,
        batch_size,
        mode,
        synthetic_steps,
        compression,
        heartbeat_timeout_s,
        chunk_kib,
        aggregation,
        suspect,
        on_failure,
    })
}

/// `suspect_ratio`, `suspect_steps` and `on_suspect`.
fn convert_suspect(src: &Src<'_>, t: &raw::Training) -> Result<SuspectRule, SpecError> {
    let ratio = match &t.suspect_ratio {
        Some(v) => {
            let x = *v.get_ref();
            if !(x.is_finite() && x > 1.0 && x <= 1e6) {
                return Err(src.err(
                    v.span(),
                    format!("suspect_ratio must be above 1 and at most 1e6, not {x}"),
                    "times the median gradient norm that makes a worker suspect; 10 is the default",
                ));
            }
            x
        }
        None => 10.0,
    };
    let steps = match &t.suspect_steps {
        Some(v) => {
            int_in(src, v, "suspect_steps", 1, 1_000_000, "steps in a row above suspect_ratio; 5 is the default")?
        }
        None => 5,
    };
    let fail = src.choice(
        t.on_suspect.as_ref(),
        "on_suspect",
        &[("warn", false), ("fail", true)],
        "use \"warn\" or \"fail\"",
    )?;
    Ok(SuspectRule { ratio, steps, fail })
}

/// `aggregation` and `trim` (trimmed_mean only), against the mode and the
/// job's worker count.
fn convert_aggregation(
    src: &Src<'_>,
    training: &Spanned<raw::Training>,
    mode: SyncMode,
    workers: u32,
) -> Result<Aggregation, SpecError> {
    let t = training.get_ref();
    let span = t.aggregation.as_ref().map_or_else(|| training.span(), |a| a.span());
    let aggregation = match t.aggregation.as_ref().map(|a| a.get_ref().as_str()) {
        None | Some("mean") => Aggregation::Mean,
        Some("median") => Aggregation::Median,
        Some("trimmed_mean") => {
            let Some(v) = &t.trim else {
                return Err(src.err(
                    span,
                    "aggregation = \"trimmed_mean\" needs `trim`, the workers dropped at each end",
                    "add trim = 1 to withstand one misbehaving worker (it needs at least 3 workers)",
                ));
            };
            let most = workers.saturating_sub(1) / 2;
            let trim = int_in(
                src,
                v,
                "trim",
                1,
                i64::from(most.max(1)),
                &format!(
                    "the workers dropped at each end; with {workers} workers at most {most} (2 x trim + 1 <= workers)"
                ),
            )?;
            if 2 * trim + 1 > workers {
                return Err(src.err(
                    v.span(),
                    format!("trim = {trim} drops {} values of {workers} workers: nothing would be left", 2 * trim),
                    "use at least 2 x trim + 1 workers, or aggregation = \"median\"",
                ));
            }
            Aggregation::TrimmedMean { trim }
        }
        Some("centered_clip") => {
            let Some(v) = &t.clip_radius else {
                return Err(src.err(
                    span,
                    "aggregation = \"centered_clip\" needs `clip_radius`, the L2 norm a worker's gradient may differ from the last step's by",
                    "set it near the norm of a typical gradient on a server's chunk, for example clip_radius = 1.0",
                ));
            };
            let x = *v.get_ref();
            if !(x.is_finite() && x > 0.0 && x <= 1e6) {
                return Err(src.err(
                    v.span(),
                    format!("clip_radius must be above 0 and at most 1e6, not {x}"),
                    "set it near the norm of a typical gradient on a server's chunk",
                ));
            }
            Aggregation::CenteredClip { radius: x as f32 }
        }
        Some(other) => {
            return Err(src.err(
                span,
                format!("unknown aggregation `{other}`"),
                "use \"mean\", \"trimmed_mean\" (with trim), \"median\" or \"centered_clip\" (with clip_radius)",
            ));
        }
    };
    if let (Some(v), false) = (&t.clip_radius, matches!(aggregation, Aggregation::CenteredClip { .. })) {
        return Err(src.err(v.span(), "`clip_radius` belongs to aggregation = \"centered_clip\"", "remove it"));
    }
    if let (Some(v), false) = (&t.trim, matches!(aggregation, Aggregation::TrimmedMean { .. })) {
        return Err(src.err(v.span(), "`trim` belongs to aggregation = \"trimmed_mean\"", "remove it"));
    }
    if aggregation != Aggregation::Mean && mode == SyncMode::Async {
        return Err(src.err(
            span,
            "robust aggregation needs every worker's gradient of a step at once, which async mode never has",
            "use mode = \"sync\", or aggregation = \"mean\"",
        ));
    }
    Ok(aggregation)
}

/// `compression` and `compression_threshold` (2-bit only).
fn convert_compression(src: &Src<'_>, t: &raw::Training) -> Result<Compression, SpecError> {
    let encoding = src.choice(
        t.compression.as_ref(),
        "compression",
        &[("none", Encoding::F32), ("fp16", Encoding::F16), ("bf16", Encoding::Bf16), ("2bit", Encoding::TwoBit)],
        "use \"none\", \"fp16\", \"bf16\" or \"2bit\"",
    )?;
    let threshold = match (&t.compression_threshold, encoding) {
        (Some(v), Encoding::TwoBit) => {
            let x = *v.get_ref();
            if !(x.is_finite() && x > 0.0 && x <= 1e6) {
                return Err(src.err(
                    v.span(),
                    format!("compression_threshold must be above 0 and at most 1e6, not {x}"),
                    "0.5 is MXNet's default",
                ));
            }
            x as f32
        }
        (Some(v), _) => {
            return Err(src.err(
                v.span(),
                "compression_threshold belongs to compression = \"2bit\"",
                "set compression = \"2bit\", or remove it",
            ));
        }
        (None, _) => 0.5,
    };
    Ok(Compression { encoding, threshold })
}

/// `on_failure` and `max_restarts` (restart only).
fn convert_on_failure(src: &Src<'_>, t: &raw::Training, has_checkpoint: bool) -> Result<OnFailure, SpecError> {
    Ok(match (t.on_failure.as_ref().map(|v| (v.get_ref().as_str(), v.span())), &t.max_restarts) {
        (None | Some(("fail", _)), None) => OnFailure::Fail,
        (None | Some(("fail", _)), Some(v)) => {
            return Err(src.err(
                v.span(),
                "max_restarts belongs to on_failure = \"restart\"",
                "set on_failure = \"restart\", or remove max_restarts",
            ));
        }
        (Some(("restart", span)), max) => {
            if !has_checkpoint {
                return Err(src.err(
                    span,
                    "on_failure = \"restart\" resumes from the newest checkpoint, but the job file has no [checkpoint] section",
                    "add [checkpoint] with every_steps or every_seconds (see docs/checkpoints.md)",
                ));
            }
            let max_restarts = match max {
                Some(v) => {
                    int_in(src, v, "max_restarts", 1, 100, "how many times the job may start again; 3 is typical")?
                }
                None => 3,
            };
            OnFailure::Restart { max_restarts }
        }
        (Some((other, span)), _) => {
            return Err(src.err(span, format!("unknown on_failure `{other}`"), "use \"fail\" or \"restart\""));
        }
    })
}
