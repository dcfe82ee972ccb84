//! The wire protocol: messages, their encoding, and who may send each.
//!
//! A frame is a 4-byte little-endian body length followed by the body; the
//! body is a one-byte tag and the message's fields, little-endian. Decoding
//! is strict: unknown tags, short or trailing bytes, oversized strings and
//! invalid optimizer values are errors. There is deliberately no message
//! that carries code or a serialized object: the optimizer travels as a
//! [`OptimizerSpec`] and is validated on arrival.

use crate::net::identity::Role;
use crate::train::optimizer::{OptimizerKind, OptimizerSpec, Schedule};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Longest text field (reasons, error messages) accepted.
pub const MAX_TEXT: usize = 4096;
/// Bytes a push or params frame holds besides its 4-byte values, with room
/// to spare: the length prefix, tag, step or version, encoding, count and
/// 2-bit threshold. A frame of `n` floats needs at most `n * 4` plus this.
pub const VECTOR_FRAME_OVERHEAD: usize = 64;

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Sent by a listener right after the handshake: "your certificate was accepted".
    Welcome,
    /// A server or worker announces itself to the scheduler.
    Register,
    /// The optimizer the servers apply (scheduler only).
    SetOptimizer(OptimizerSpec),
    /// Training may begin (scheduler only).
    Start,
    /// A worker reached barrier `id`.
    Barrier {
        /// Barrier number.
        id: u64,
    },
    /// Every worker reached barrier `id` (scheduler only).
    BarrierDone {
        /// Barrier number.
        id: u64,
    },
    /// A worker finished training.
    Finished,
    /// The job is over; exit cleanly (scheduler only).
    Shutdown,
    /// The job failed; exit with an error (scheduler only).
    Abort {
        /// Why.
        reason: String,
    },
    /// A worker's gradient for this server's shard.
    Push {
        /// The parameter version the gradient was computed at.
        step: u64,
        /// Gradient values.
        data: Vec<f32>,
    },
    /// A worker asks for the shard once its version reaches `min_version`.
    Pull {
        /// Lowest acceptable version.
        min_version: u64,
    },
    /// The shard's parameters (server only).
    Params {
        /// Version: number of updates applied.
        version: u64,
        /// Values.
        data: Vec<f32>,
    },
    /// Worker 0 asks for a checkpoint of the state after `step` steps (to
    /// every server, and to the scheduler so it waits for the commit).
    Checkpoint {
        /// Global training step.
        step: u64,
    },
    /// A server wrote its shard of checkpoint `step`.
    CheckpointSaved {
        /// Step.
        step: u64,
        /// The file, for the manifest.
        record: ShardDigest,
    },
    /// A server could not write its shard of checkpoint `step`.
    CheckpointFailed {
        /// Step.
        step: u64,
        /// Why.
        reason: String,
    },
    /// Every server wrote its shard of `step`: write the manifest (scheduler only).
    CheckpointCommit {
        /// Step.
        step: u64,
        /// One record per server rank.
        shards: Vec<ShardDigest>,
    },
    /// A server wrote its manifest of checkpoint `step`: on its host the
    /// checkpoint is complete (and is what a restart resumes from).
    CheckpointCommitted {
        /// Step.
        step: u64,
    },
    /// A server can resume from these steps (newest first), all verified.
    Resumable {
        /// Steps.
        steps: Vec<u64>,
    },
    /// Load (servers) or continue from (workers) checkpoint `step` (scheduler only).
    ResumeFrom {
        /// Step.
        step: u64,
    },
    /// "Still here": between the scheduler and every process, every
    /// quarter of `[training] heartbeat_timeout`.
    Heartbeat,
    /// A worker's gradient for one chunk of this server's shard (chunks of
    /// `[training] chunk_kib`; see [`chunk_ranges`]).
    PushChunk {
        /// The parameter version the gradient was computed at.
        step: u64,
        /// Chunk index.
        chunk: u32,
        /// Gradient values of the chunk.
        data: Vec<f32>,
    },
    /// A worker asks for one chunk once its version reaches `min_version`.
    PullChunk {
        /// Chunk index.
        chunk: u32,
        /// Lowest acceptable version.
        min_version: u64,
    },
    /// One chunk's parameters (server only).
    ParamsChunk {
        /// Version of the chunk.
        version: u64,
        /// Chunk index.
        chunk: u32,
        /// Values.
        data: Vec<f32>,
    },
    /// Worker 0 sets the shard's initial values (an external model's
    /// `kv.init`); accepted only before the first update.
    SetParams {
        /// Values, one per parameter of the shard.
        data: Vec<f32>,
    },
    /// The sender refuses what it received, and closes.
    Error {
        /// Why.
        message: String,
    },
}

/// A written shard file as the wire carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardDigest {
    /// Server rank.
    pub shard: u32,
    /// File size.
    pub bytes: u64,
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
}

/// Most shard records or steps one message may carry.
pub const MAX_LIST: usize = 4096;

/// A decoding failure: one variant per way a frame can be malformed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The stream ended inside a frame's length prefix.
    #[error("malformed message: truncated frame header")]
    TruncatedHeader,
    /// A frame with no body, not even a tag.
    #[error("malformed message: empty frame")]
    EmptyFrame,
    /// A tag no message has.
    #[error("malformed message: unknown message tag {0}")]
    UnknownTag(u8),
    /// A fast-path view was asked of a frame of another tag.
    #[error("malformed message: expected tag {expected}, got {found}")]
    WrongTag {
        /// The tag the view reads.
        expected: u8,
        /// The frame's tag.
        found: u8,
    },
    /// [`push_view`] was given a frame that is not a push.
    #[error("malformed message: not a push")]
    NotPush,
    /// A field runs past the end of the body.
    #[error("malformed message: truncated: needed {needed} more bytes at offset {offset}")]
    Truncated {
        /// Bytes the field needs.
        needed: usize,
        /// Where it starts.
        offset: usize,
    },
    /// Bytes left over after the last field.
    #[error("malformed message: {0} trailing bytes")]
    Trailing(usize),
    /// A value count whose byte length does not fit in memory.
    #[error("malformed message: count overflows")]
    CountOverflows,
    /// A list longer than [`MAX_LIST`].
    #[error("malformed message: a list of {0} entries; at most {MAX_LIST} are accepted")]
    ListTooLong(usize),
    /// A text field longer than [`MAX_TEXT`].
    #[error("malformed message: text of {0} bytes exceeds {MAX_TEXT}")]
    TextTooLong(usize),
    /// A text field that is not UTF-8.
    #[error("malformed message: text is not UTF-8")]
    NotUtf8(#[source] std::string::FromUtf8Error),
    /// A push's gradient encoding no [`Encoding`] has.
    #[error("malformed message: unknown gradient encoding {0}")]
    UnknownEncoding(u8),
    /// A compressed push given to the general decoder.
    #[error("malformed message: push with encoding {0} has no general form; use push_view")]
    NoGeneralForm(u8),
    /// A 2-bit push's threshold is not a positive number.
    #[error("malformed message: 2-bit threshold {0} is not a positive number")]
    BadThreshold(f32),
    /// An optimizer kind no [`OptimizerKind`] has.
    #[error("malformed message: unknown optimizer kind {0}")]
    UnknownOptimizer(u8),
    /// A momentum optimizer's nesterov flag is neither 0 nor 1.
    #[error("malformed message: nesterov flag {0} is not 0 or 1")]
    BadNesterov(u8),
    /// A learning-rate schedule no [`Schedule`] has.
    #[error("malformed message: unknown learning-rate schedule {0}")]
    UnknownSchedule(u8),
    /// An optimizer whose values are out of range.
    #[error("malformed message: {0}")]
    Optimizer(#[source] crate::train::optimizer::OptimizerError),
}

const ALL: &[Role] = &[Role::Scheduler, Role::Server, Role::Worker];

/// Tag of [`Message::Push`].
pub const TAG_PUSH: u8 = 16;
/// Tag of [`Message::Pull`].
pub const TAG_PULL: u8 = 17;
/// Tag of [`Message::Params`].
pub const TAG_PARAMS: u8 = 18;
/// Tag of [`Message::PushChunk`].
pub const TAG_PUSH_CHUNK: u8 = 23;
/// Tag of [`Message::PullChunk`].
pub const TAG_PULL_CHUNK: u8 = 24;
/// Tag of [`Message::ParamsChunk`].
pub const TAG_PARAMS_CHUNK: u8 = 25;

/// Floats per chunk are a multiple of this, so that a chunk boundary is a
/// boundary of every kernel's vector body and of 2-bit bytes: an element
/// is computed the same whichever chunk it is in.
pub const CHUNK_ALIGN: usize = 64;

/// The chunks of a shard of `len` floats in chunks of `chunk` floats
/// (rounded down to [`CHUNK_ALIGN`], at least one alignment unit); the last
/// may be shorter. A shard of no more than one chunk is one chunk.
pub fn chunk_ranges(len: usize, chunk: usize) -> Vec<std::ops::Range<usize>> {
    let chunk = (chunk / CHUNK_ALIGN).max(1) * CHUNK_ALIGN;
    if len == 0 {
        return std::iter::once(0..0).collect();
    }
    (0..len).step_by(chunk).map(|s| s..(s + chunk).min(len)).collect()
}

/// Name and allowed senders of each tag: the one table authorization reads.
pub fn tag_info(tag: u8) -> Option<(&'static str, &'static [Role])> {
    const SCHED: &[Role] = &[Role::Scheduler];
    const WORKER: &[Role] = &[Role::Worker];
    const SERVER: &[Role] = &[Role::Server];
    Some(match tag {
        1 => ("welcome", &[Role::Scheduler, Role::Server]),
        2 => ("register", &[Role::Server, Role::Worker]),
        3 => ("set_optimizer", SCHED),
        4 => ("start", SCHED),
        5 => ("barrier", WORKER),
        6 => ("barrier_done", SCHED),
        7 => ("finished", WORKER),
        8 => ("shutdown", SCHED),
        9 => ("abort", SCHED),
        TAG_PUSH => ("push", WORKER),
        TAG_PULL => ("pull", WORKER),
        TAG_PARAMS => ("params", SERVER),
        TAG_PUSH_CHUNK => ("push_chunk", WORKER),
        TAG_PULL_CHUNK => ("pull_chunk", WORKER),
        TAG_PARAMS_CHUNK => ("params_chunk", SERVER),
        10 => ("checkpoint", WORKER),
        11 => ("checkpoint_saved", SERVER),
        12 => ("checkpoint_failed", SERVER),
        13 => ("checkpoint_commit", SCHED),
        14 => ("resumable", SERVER),
        15 => ("resume_from", SCHED),
        22 => ("checkpoint_committed", SERVER),
        20 => ("heartbeat", ALL),
        21 => ("set_params", WORKER),
        31 => ("error", ALL),
        _ => return None,
    })
}

/// How a push's gradient values are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Encoding {
    /// 4 bytes per value.
    F32 = 0,
    /// IEEE half precision, 2 bytes per value.
    F16 = 1,
    /// bfloat16, 2 bytes per value.
    Bf16 = 2,
    /// MXNet's 2-bit scheme with error feedback, 4 values per byte.
    TwoBit = 3,
}

/// Encodes a push frame straight from a gradient slice. For 2-bit,
/// `residual` carries the error feedback between steps.
pub fn encode_push(step: u64, data: &[f32], enc: Encoding, threshold: f32, residual: &mut [f32], out: &mut Vec<u8>) {
    encode_any_push(step, None, data, enc, threshold, residual, out)
}

/// [`encode_push`] of chunk `chunk` ([`Message::PushChunk`]).
pub fn encode_push_chunk(
    step: u64,
    chunk: u32,
    data: &[f32],
    enc: Encoding,
    threshold: f32,
    residual: &mut [f32],
    out: &mut Vec<u8>,
) {
    encode_any_push(step, Some(chunk), data, enc, threshold, residual, out)
}

/// Bytes of a push_chunk body of f32 values before its values: tag, step,
/// chunk, encoding and count.
pub const PUSH_CHUNK_F32_HEAD: usize = 1 + 8 + 4 + 1 + 4;

/// Whether a frame body beginning with `head` (at least
/// [`PUSH_CHUNK_F32_HEAD`] bytes) is a push_chunk of f32 values, whose
/// values then start at [`PUSH_CHUNK_F32_HEAD`]. The rest of the frame
/// is checked when it is decoded.
pub fn is_push_chunk_f32(head: &[u8]) -> bool {
    head.len() >= PUSH_CHUNK_F32_HEAD && head[0] == TAG_PUSH_CHUNK && head[1 + 8 + 4] == Encoding::F32 as u8
}

/// The head of an f32 [`encode_push_chunk`] frame of `count` values: the
/// frame is this followed by the values as little-endian f32 bytes, which
/// the caller sends from where they are.
pub fn encode_push_chunk_f32_head(step: u64, chunk: u32, count: usize, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.push(TAG_PUSH_CHUNK);
    out.extend_from_slice(&step.to_le_bytes());
    out.extend_from_slice(&chunk.to_le_bytes());
    out.push(Encoding::F32 as u8);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    let body = (out.len() - start - HEADER_LEN + 4 * count) as u32;
    out[start..start + HEADER_LEN].copy_from_slice(&body.to_le_bytes());
}

fn encode_any_push(
    step: u64,
    chunk: Option<u32>,
    data: &[f32],
    enc: Encoding,
    threshold: f32,
    residual: &mut [f32],
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.push(if chunk.is_some() { TAG_PUSH_CHUNK } else { TAG_PUSH });
    out.extend_from_slice(&step.to_le_bytes());
    if let Some(c) = chunk {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out.push(enc as u8);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    match enc {
        Encoding::F32 => warden_kernels::convert::extend_f32_le(out, data),
        Encoding::F16 => warden_kernels::convert::extend_f16_le(out, data),
        Encoding::Bf16 => warden_kernels::convert::extend_bf16_le(out, data),
        Encoding::TwoBit => {
            out.extend_from_slice(&threshold.to_le_bytes());
            warden_kernels::twobit::encode(data, residual, threshold, out);
        }
    }
    let body = (out.len() - start - HEADER_LEN) as u32;
    out[start..start + HEADER_LEN].copy_from_slice(&body.to_le_bytes());
}

/// The step, chunk (`None` for a whole-shard push) and gradient of a push
/// or push_chunk body, borrowed from it; every length is checked against
/// the bytes present and nothing is allocated.
pub fn push_view(body: &[u8]) -> Result<(u64, Option<u32>, warden_kernels::Grad<'_>), DecodeError> {
    use warden_kernels::Grad;
    let mut r = Reader { buf: body, pos: 0 };
    let chunked = match r.u8()? {
        TAG_PUSH => false,
        TAG_PUSH_CHUNK => true,
        _ => return Err(DecodeError::NotPush),
    };
    let step = r.u64()?;
    let chunk = if chunked { Some(r.u32()?) } else { None };
    let enc = r.u8()?;
    let n = r.u32()? as usize;
    let grad = match enc {
        0 => Grad::F32Le(r.take(n * 4)?),
        1 => Grad::F16Le(r.take(n * 2)?),
        2 => Grad::Bf16Le(r.take(n * 2)?),
        3 => {
            let threshold = r.f32()?;
            if !(threshold.is_finite() && threshold > 0.0) {
                return Err(DecodeError::BadThreshold(threshold));
            }
            Grad::TwoBit { packed: r.take(warden_kernels::twobit::packed_len(n))?, len: n, threshold }
        }
        e => return Err(DecodeError::UnknownEncoding(e)),
    };
    r.finish()?;
    Ok((step, chunk, grad))
}

/// Encodes a params frame straight from the shard's parameters, given as
/// its parts in order (its chunks).
pub fn encode_params(version: u64, parts: &[&[f32]], out: &mut Vec<u8>) {
    let n: usize = parts.iter().map(|p| p.len()).sum();
    let body = 1 + 8 + 4 + n * 4;
    out.reserve(HEADER_LEN + body);
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.push(TAG_PARAMS);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for p in parts {
        warden_kernels::convert::extend_f32_le(out, p);
    }
}

/// Encodes a params_chunk frame straight from a chunk's parameters.
pub fn encode_params_chunk(version: u64, chunk: u32, data: &[f32], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + PARAMS_CHUNK_HEAD + data.len() * 4);
    encode_params_chunk_head(version, chunk, data.len(), out);
    warden_kernels::convert::extend_f32_le(out, data);
}

/// The first [`HEADER_LEN`] + [`PARAMS_CHUNK_HEAD`] bytes of a params_chunk
/// frame of `count` values, which follow it as little-endian f32 (sent
/// from where they are, not copied into the frame).
pub fn encode_params_chunk_head(version: u64, chunk: u32, count: usize, out: &mut Vec<u8>) {
    let body = PARAMS_CHUNK_HEAD + count * 4;
    out.extend_from_slice(&(body as u32).to_le_bytes());
    out.push(TAG_PARAMS_CHUNK);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
}

/// The version, chunk and raw little-endian values of a params_chunk body,
/// the count checked against the bytes present; no allocation.
pub fn params_chunk_view(body: &[u8]) -> Result<(u64, u32, &[u8]), DecodeError> {
    let (mut r, v, chunk, n) = params_chunk_fields(body)?;
    let bytes = r.take(n.checked_mul(4).ok_or(DecodeError::CountOverflows)?)?;
    r.finish()?;
    Ok((v, chunk, bytes))
}

/// Bytes of a params_chunk body before its values.
pub const PARAMS_CHUNK_HEAD: usize = 1 + 8 + 4 + 4;

/// The version, chunk and value count of a params_chunk body's head (its
/// first [`PARAMS_CHUNK_HEAD`] bytes; the values follow elsewhere).
pub fn params_chunk_head(head: &[u8]) -> Result<(u64, u32, usize), DecodeError> {
    let (r, v, chunk, n) = params_chunk_fields(head)?;
    r.finish()?;
    Ok((v, chunk, n))
}

/// A params_chunk body's tag, version, chunk and count, and a reader at
/// its values.
fn params_chunk_fields(body: &[u8]) -> Result<(Reader<'_>, u64, u32, usize), DecodeError> {
    let mut r = Reader { buf: body, pos: 0 };
    let tag = r.u8()?;
    if tag != TAG_PARAMS_CHUNK {
        return Err(DecodeError::WrongTag { expected: TAG_PARAMS_CHUNK, found: tag });
    }
    let v = r.u64()?;
    let chunk = r.u32()?;
    let n = r.u32()? as usize;
    Ok((r, v, chunk, n))
}

/// Splits a push or params body into its number and its raw little-endian
/// values, checking the count against the bytes present; no allocation.
pub fn vector_view(body: &[u8], want_tag: u8) -> Result<(u64, &[u8]), DecodeError> {
    let mut r = Reader { buf: body, pos: 0 };
    let tag = r.u8()?;
    if tag != want_tag {
        return Err(DecodeError::WrongTag { expected: want_tag, found: tag });
    }
    let v = r.u64()?;
    let n = r.u32()? as usize;
    let bytes = r.take(n.checked_mul(4).ok_or(DecodeError::CountOverflows)?)?;
    r.finish()?;
    Ok((v, bytes))
}

impl Message {
    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        tag_info(self.tag()).map_or("unknown", |(name, _)| name)
    }

    /// The roles allowed to send this message. Receivers check it against
    /// the role in the sender's certificate before acting on anything.
    pub fn senders(&self) -> &'static [Role] {
        tag_info(self.tag()).map_or(&[], |(_, who)| who)
    }

    fn tag(&self) -> u8 {
        match self {
            Message::Welcome => 1,
            Message::Register => 2,
            Message::SetOptimizer(_) => 3,
            Message::Start => 4,
            Message::Barrier { .. } => 5,
            Message::BarrierDone { .. } => 6,
            Message::Finished => 7,
            Message::Shutdown => 8,
            Message::Abort { .. } => 9,
            Message::Push { .. } => 16,
            Message::Pull { .. } => 17,
            Message::Params { .. } => 18,
            Message::Checkpoint { .. } => 10,
            Message::CheckpointSaved { .. } => 11,
            Message::CheckpointFailed { .. } => 12,
            Message::CheckpointCommit { .. } => 13,
            Message::CheckpointCommitted { .. } => 22,
            Message::Resumable { .. } => 14,
            Message::ResumeFrom { .. } => 15,
            Message::Heartbeat => 20,
            Message::SetParams { .. } => 21,
            Message::PushChunk { .. } => TAG_PUSH_CHUNK,
            Message::PullChunk { .. } => TAG_PULL_CHUNK,
            Message::ParamsChunk { .. } => TAG_PARAMS_CHUNK,
            Message::Error { .. } => 31,
        }
    }

    /// Appends the whole frame (length prefix and body) to `out`.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        out.push(self.tag());
        match self {
            Message::Welcome
            | Message::Register
            | Message::Start
            | Message::Finished
            | Message::Shutdown
            | Message::Heartbeat => {}
            Message::SetOptimizer(spec) => encode_optimizer(spec, out),
            Message::Barrier { id } | Message::BarrierDone { id } => out.extend_from_slice(&id.to_le_bytes()),
            Message::Checkpoint { step } | Message::ResumeFrom { step } | Message::CheckpointCommitted { step } => {
                out.extend_from_slice(&step.to_le_bytes())
            }
            Message::CheckpointSaved { step, record } => {
                out.extend_from_slice(&step.to_le_bytes());
                put_digest(record, out);
            }
            Message::CheckpointFailed { step, reason } => {
                out.extend_from_slice(&step.to_le_bytes());
                put_text(reason, out);
            }
            Message::CheckpointCommit { step, shards } => {
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&(shards.len() as u32).to_le_bytes());
                shards.iter().for_each(|d| put_digest(d, out));
            }
            Message::Resumable { steps } => {
                out.extend_from_slice(&(steps.len() as u32).to_le_bytes());
                steps.iter().for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
            }
            Message::Abort { reason: text } | Message::Error { message: text } => put_text(text, out),
            Message::Push { step, data } => {
                out.extend_from_slice(&step.to_le_bytes());
                out.push(Encoding::F32 as u8);
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                warden_kernels::convert::extend_f32_le(out, data);
            }
            Message::Params { version, data } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                warden_kernels::convert::extend_f32_le(out, data);
            }
            Message::Pull { min_version } => out.extend_from_slice(&min_version.to_le_bytes()),
            Message::PushChunk { step, chunk, data } => {
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&chunk.to_le_bytes());
                out.push(Encoding::F32 as u8);
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                warden_kernels::convert::extend_f32_le(out, data);
            }
            Message::PullChunk { chunk, min_version } => {
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&min_version.to_le_bytes());
            }
            Message::ParamsChunk { version, chunk, data } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                warden_kernels::convert::extend_f32_le(out, data);
            }
            Message::SetParams { data } => {
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                warden_kernels::convert::extend_f32_le(out, data);
            }
        }
        let body = (out.len() - start - HEADER_LEN) as u32;
        out[start..start + HEADER_LEN].copy_from_slice(&body.to_le_bytes());
    }

    /// Decodes one frame body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader { buf: body, pos: 0 };
        let msg = match r.u8()? {
            1 => Message::Welcome,
            2 => Message::Register,
            3 => Message::SetOptimizer(decode_optimizer(&mut r)?),
            4 => Message::Start,
            5 => Message::Barrier { id: r.u64()? },
            6 => Message::BarrierDone { id: r.u64()? },
            7 => Message::Finished,
            8 => Message::Shutdown,
            9 => Message::Abort { reason: r.text()? },
            TAG_PUSH => {
                let step = r.u64()?;
                match r.u8()? {
                    0 => Message::Push { step, data: r.f32s()? },
                    e => return Err(DecodeError::NoGeneralForm(e)),
                }
            }
            TAG_PULL => Message::Pull { min_version: r.u64()? },
            TAG_PUSH_CHUNK => {
                let step = r.u64()?;
                let chunk = r.u32()?;
                match r.u8()? {
                    0 => Message::PushChunk { step, chunk, data: r.f32s()? },
                    e => return Err(DecodeError::NoGeneralForm(e)),
                }
            }
            TAG_PULL_CHUNK => Message::PullChunk { chunk: r.u32()?, min_version: r.u64()? },
            TAG_PARAMS_CHUNK => Message::ParamsChunk { version: r.u64()?, chunk: r.u32()?, data: r.f32s()? },
            TAG_PARAMS => Message::Params { version: r.u64()?, data: r.f32s()? },
            10 => Message::Checkpoint { step: r.u64()? },
            11 => Message::CheckpointSaved { step: r.u64()?, record: r.digest()? },
            12 => Message::CheckpointFailed { step: r.u64()?, reason: r.text()? },
            13 => {
                let step = r.u64()?;
                let n = r.count()?;
                Message::CheckpointCommit { step, shards: (0..n).map(|_| r.digest()).collect::<Result<_, _>>()? }
            }
            14 => {
                let n = r.count()?;
                Message::Resumable { steps: (0..n).map(|_| r.u64()).collect::<Result<_, _>>()? }
            }
            15 => Message::ResumeFrom { step: r.u64()? },
            22 => Message::CheckpointCommitted { step: r.u64()? },
            20 => Message::Heartbeat,
            21 => Message::SetParams { data: r.f32s()? },
            31 => Message::Error { message: r.text()? },
            tag => return Err(DecodeError::UnknownTag(tag)),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn put_digest(d: &ShardDigest, out: &mut Vec<u8>) {
    out.extend_from_slice(&d.shard.to_le_bytes());
    out.extend_from_slice(&d.bytes.to_le_bytes());
    out.extend_from_slice(&d.sha256);
}

fn put_text(text: &str, out: &mut Vec<u8>) {
    // Truncate on a char boundary rather than send something the peer refuses.
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u32).to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

const OPT_SGD: u8 = 0;
const OPT_MOMENTUM: u8 = 1;
const OPT_ADAM: u8 = 2;
const OPT_ADAMW: u8 = 3;
const SCHED_CONSTANT: u8 = 0;
const SCHED_STEP: u8 = 1;
const SCHED_COSINE: u8 = 2;

fn encode_optimizer(spec: &OptimizerSpec, out: &mut Vec<u8>) {
    let f = |out: &mut Vec<u8>, v: f32| out.extend_from_slice(&v.to_le_bytes());
    match spec.kind {
        OptimizerKind::Sgd => out.push(OPT_SGD),
        OptimizerKind::Momentum { .. } => out.push(OPT_MOMENTUM),
        OptimizerKind::Adam { .. } => out.push(OPT_ADAM),
        OptimizerKind::AdamW { .. } => out.push(OPT_ADAMW),
    }
    f(out, spec.lr);
    f(out, spec.weight_decay);
    f(out, spec.clip_gradient);
    out.extend_from_slice(&spec.warmup_steps.to_le_bytes());
    match spec.kind {
        OptimizerKind::Sgd => {}
        OptimizerKind::Momentum { momentum, nesterov } => {
            f(out, momentum);
            out.push(u8::from(nesterov));
        }
        OptimizerKind::Adam { beta1, beta2, eps } | OptimizerKind::AdamW { beta1, beta2, eps } => {
            f(out, beta1);
            f(out, beta2);
            f(out, eps);
        }
    }
    match spec.schedule {
        Schedule::Constant => out.push(SCHED_CONSTANT),
        Schedule::Step { every, gamma } => {
            out.push(SCHED_STEP);
            out.extend_from_slice(&every.to_le_bytes());
            f(out, gamma);
        }
        Schedule::Cosine { decay_steps, min_lr } => {
            out.push(SCHED_COSINE);
            out.extend_from_slice(&decay_steps.to_le_bytes());
            f(out, min_lr);
        }
    }
}

fn decode_optimizer(r: &mut Reader<'_>) -> Result<OptimizerSpec, DecodeError> {
    let kind = r.u8()?;
    let lr = r.f32()?;
    let weight_decay = r.f32()?;
    let clip_gradient = r.f32()?;
    let warmup_steps = r.u64()?;
    let kind = match kind {
        OPT_SGD => OptimizerKind::Sgd,
        OPT_MOMENTUM => {
            let momentum = r.f32()?;
            let nesterov = match r.u8()? {
                0 => false,
                1 => true,
                b => return Err(DecodeError::BadNesterov(b)),
            };
            OptimizerKind::Momentum { momentum, nesterov }
        }
        OPT_ADAM => OptimizerKind::Adam { beta1: r.f32()?, beta2: r.f32()?, eps: r.f32()? },
        OPT_ADAMW => OptimizerKind::AdamW { beta1: r.f32()?, beta2: r.f32()?, eps: r.f32()? },
        k => return Err(DecodeError::UnknownOptimizer(k)),
    };
    let schedule = match r.u8()? {
        SCHED_CONSTANT => Schedule::Constant,
        SCHED_STEP => Schedule::Step { every: r.u64()?, gamma: r.f32()? },
        SCHED_COSINE => Schedule::Cosine { decay_steps: r.u64()?, min_lr: r.f32()? },
        k => return Err(DecodeError::UnknownSchedule(k)),
    };
    let spec = OptimizerSpec { kind, lr, weight_decay, clip_gradient, schedule, warmup_steps };
    spec.validate().map_err(DecodeError::Optimizer)?;
    Ok(spec)
}

/// Bounds-checked little-endian reader over one frame body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(DecodeError::Truncated { needed: n, offset: self.pos })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn f32(&mut self) -> Result<f32, DecodeError> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    /// A list length, bounded by [`MAX_LIST`] before anything is allocated.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_LIST {
            return Err(DecodeError::ListTooLong(n));
        }
        Ok(n)
    }

    fn digest(&mut self) -> Result<ShardDigest, DecodeError> {
        let shard = self.u32()?;
        let bytes = self.u64()?;
        let sha256 = self.take(32)?.try_into().expect("32 bytes");
        Ok(ShardDigest { shard, bytes, sha256 })
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_TEXT {
            return Err(DecodeError::TextTooLong(n));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(DecodeError::NotUtf8)
    }
    fn f32s(&mut self) -> Result<Vec<f32>, DecodeError> {
        let n = self.u32()? as usize;
        // The count is checked against the bytes actually present before
        // anything is allocated.
        let bytes = self.take(n.checked_mul(4).ok_or(DecodeError::CountOverflows)?)?;
        let mut out = vec![0.0f32; n];
        warden_kernels::convert::copy_f32_le(&mut out, bytes);
        Ok(out)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() { Ok(()) } else { Err(DecodeError::Trailing(self.buf.len() - self.pos)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let mut out = Vec::new();
        m.encode_frame(&mut out);
        let len = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4);
        assert_eq!(Message::decode(&out[4..]).unwrap(), m);
        // Every strict prefix of the body fails to decode, and so does any extension.
        for cut in 0..out.len() - 4 {
            assert!(Message::decode(&out[4..4 + cut]).is_err(), "{m:?} cut at {cut}");
        }
        let mut longer = out[4..].to_vec();
        longer.push(0);
        assert!(Message::decode(&longer).is_err());
    }

    /// A head from `encode_push_chunk_f32_head` followed by the values'
    /// bytes is the frame `encode_push_chunk` makes of them.
    #[test]
    fn a_params_chunk_head_is_the_body_before_its_values() {
        let mut frame = Vec::new();
        encode_params_chunk(9, 2, &[1.0, 2.0, 3.0], &mut frame);
        let body = &frame[HEADER_LEN..];
        assert_eq!(params_chunk_head(&body[..PARAMS_CHUNK_HEAD]).unwrap(), (9, 2, 3));
        assert_eq!(body.len(), PARAMS_CHUNK_HEAD + 12);
        assert!(params_chunk_head(&body[..PARAMS_CHUNK_HEAD - 1]).is_err(), "a short head");
        let mut other = body[..PARAMS_CHUNK_HEAD].to_vec();
        other[0] = TAG_PARAMS;
        assert!(params_chunk_head(&other).is_err(), "another tag");
    }

    #[test]
    fn an_f32_push_head_and_its_values_are_the_whole_frame() {
        let values = [1.5f32, -0.0, f32::MAX, 3e-9, 7.0];
        let mut whole = Vec::new();
        encode_push_chunk(41, 3, &values, Encoding::F32, 0.0, &mut [], &mut whole);
        let mut spliced = Vec::new();
        encode_push_chunk_f32_head(41, 3, values.len(), &mut spliced);
        warden_kernels::convert::extend_f32_le(&mut spliced, &values);
        assert_eq!(spliced, whole);
    }

    #[test]
    fn every_message_round_trips() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Momentum { momentum: 0.9, nesterov: true },
            weight_decay: 1e-4,
            clip_gradient: 5.0,
            schedule: Schedule::Step { every: 100, gamma: 0.5 },
            warmup_steps: 10,
            ..OptimizerSpec::sgd(0.1)
        };
        let adamw = OptimizerSpec {
            kind: OptimizerKind::AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-7 },
            schedule: Schedule::Cosine { decay_steps: 1000, min_lr: 0.001 },
            ..spec
        };
        for m in [
            Message::Welcome,
            Message::Register,
            Message::SetOptimizer(spec),
            Message::SetOptimizer(OptimizerSpec { kind: OptimizerKind::Sgd, ..spec }),
            Message::SetOptimizer(adamw),
            Message::SetOptimizer(OptimizerSpec {
                kind: OptimizerKind::Adam { beta1: 0.5, beta2: 0.5, eps: 1.0 },
                ..adamw
            }),
            Message::Start,
            Message::Barrier { id: 7 },
            Message::BarrierDone { id: 7 },
            Message::Finished,
            Message::Shutdown,
            Message::Abort { reason: "worker 1 died".into() },
            Message::Push { step: 3, data: vec![1.0, -2.5] },
            Message::Pull { min_version: 4 },
            Message::Params { version: 4, data: vec![0.5; 3] },
            Message::PushChunk { step: 3, chunk: 7, data: vec![1.0, -2.5] },
            Message::PullChunk { chunk: 2, min_version: 11 },
            Message::ParamsChunk { version: 4, chunk: 1, data: vec![0.25; 5] },
            Message::Error { message: "no".into() },
            Message::Checkpoint { step: 300 },
            Message::CheckpointSaved { step: 300, record: ShardDigest { shard: 1, bytes: 4096, sha256: [7; 32] } },
            Message::CheckpointFailed { step: 300, reason: "disk full".into() },
            Message::CheckpointCommit {
                step: 300,
                shards: vec![
                    ShardDigest { shard: 0, bytes: 10, sha256: [1; 32] },
                    ShardDigest { shard: 1, bytes: 11, sha256: [2; 32] },
                ],
            },
            Message::CheckpointCommitted { step: 300 },
            Message::Resumable { steps: vec![300, 200] },
            Message::Resumable { steps: vec![] },
            Message::ResumeFrom { step: 200 },
            Message::Heartbeat,
        ] {
            round_trip(m);
        }
    }

    #[test]
    fn lists_are_bounded_before_allocation() {
        let mut body = vec![14u8];
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Message::decode(&body).unwrap_err(), DecodeError::ListTooLong(u32::MAX as usize));
        assert!(Message::decode(&body).unwrap_err().to_string().contains("at most 4096"));
    }

    #[test]
    fn optimizer_of_unknown_kind_or_out_of_range_is_rejected() {
        let mut out = Vec::new();
        Message::SetOptimizer(OptimizerSpec::sgd(0.1)).encode_frame(&mut out);
        let mut unknown = out[4..].to_vec();
        unknown[1] = 9;
        assert_eq!(Message::decode(&unknown).unwrap_err(), DecodeError::UnknownOptimizer(9));
        assert_eq!(Message::decode(&unknown).unwrap_err().to_string(), "malformed message: unknown optimizer kind 9");
        let mut huge_lr = out[4..].to_vec();
        huge_lr[2..6].copy_from_slice(&1e9f32.to_le_bytes());
        assert!(matches!(Message::decode(&huge_lr).unwrap_err(), DecodeError::Optimizer(e) if e.field == "lr"));
        let mut nan = out[4..].to_vec();
        nan[2..6].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(Message::decode(&nan).is_err());
        let mut schedule = out[4..].to_vec();
        let last = schedule.len() - 1;
        schedule[last] = 7;
        assert_eq!(Message::decode(&schedule).unwrap_err(), DecodeError::UnknownSchedule(7));
    }

    #[test]
    fn fast_paths_match_the_general_codec() {
        let data = vec![1.5f32, -2.0, 3.25];
        let mut a = Vec::new();
        encode_push(9, &data, Encoding::F32, 0.0, &mut [], &mut a);
        let mut b = Vec::new();
        Message::Push { step: 9, data: data.clone() }.encode_frame(&mut b);
        assert_eq!(a, b);
        let (step, chunk, grad) = push_view(&a[4..]).unwrap();
        assert_eq!((step, chunk, grad.len()), (9, None, 3));
        assert!(push_view(&a[4..a.len() - 1]).is_err());
        let mut p = Vec::new();
        encode_params(4, &[&data[..1], &data[1..]], &mut p);
        let mut q = Vec::new();
        Message::Params { version: 4, data: data.clone() }.encode_frame(&mut q);
        assert_eq!(p, q);
        let (v, raw) = vector_view(&p[4..], TAG_PARAMS).unwrap();
        assert_eq!((v, raw.len()), (4, 12));
        let whole = a.clone();
        // The chunk forms alike.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_push_chunk(9, 5, &data, Encoding::F32, 0.0, &mut [], &mut a);
        Message::PushChunk { step: 9, chunk: 5, data: data.clone() }.encode_frame(&mut b);
        assert_eq!(a, b);
        let (step, chunk, grad) = push_view(&a[4..]).unwrap();
        assert_eq!((step, chunk, grad.len()), (9, Some(5), 3));
        assert!(push_view(&a[4..a.len() - 1]).is_err());
        let (mut p, mut q) = (Vec::new(), Vec::new());
        encode_params_chunk(4, 5, &data, &mut p);
        Message::ParamsChunk { version: 4, chunk: 5, data: data.clone() }.encode_frame(&mut q);
        assert_eq!(p, q);
        let (v, chunk, raw) = params_chunk_view(&p[4..]).unwrap();
        assert_eq!((v, chunk, raw.len()), (4, 5, 12));
        assert!(params_chunk_view(&p[4..p.len() - 1]).is_err());
        assert!(params_chunk_view(&q[4..4 + 1 + 8 + 4]).is_err(), "no count");
        // Every encoding's frame is exactly as long as it says, and checked.
        for enc in [Encoding::F16, Encoding::Bf16, Encoding::TwoBit] {
            let mut residual = vec![0.0; 3];
            let mut f = Vec::new();
            encode_push(1, &data, enc, 1.0, &mut residual, &mut f);
            let (_, _, g) = push_view(&f[4..]).unwrap();
            assert_eq!(g.len(), 3);
            assert!(push_view(&f[4..f.len() - 1]).is_err());
            let mut longer = f[4..].to_vec();
            longer.push(0);
            assert!(push_view(&longer).is_err());
        }
        // The encoding byte after the step (and the chunk index).
        for (frame, at) in [(&whole, 9), (&b, 13)] {
            let mut bad = frame[4..].to_vec();
            bad[at] = 7;
            assert_eq!(push_view(&bad).unwrap_err(), DecodeError::UnknownEncoding(7));
        }
        for t in 0..=255u8 {
            assert_eq!(
                tag_info(t).is_some(),
                Message::decode(&[t]).map(|_| true).unwrap_or_else(|e| e != DecodeError::UnknownTag(t))
            );
        }
    }

    #[test]
    fn vector_count_beyond_the_frame_is_rejected_without_allocating() {
        let mut body = vec![TAG_PUSH];
        body.extend_from_slice(&0u64.to_le_bytes());
        body.push(0);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Message::decode(&body).unwrap_err(), DecodeError::Truncated { .. }));
        assert!(matches!(push_view(&body).unwrap_err(), DecodeError::Truncated { .. }));
        let mut params = vec![TAG_PARAMS];
        params.extend_from_slice(&0u64.to_le_bytes());
        params.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Message::decode(&params).unwrap_err(), DecodeError::Truncated { .. }));
    }
}
