//! A server's shard of the parameters, in chunks that update on their own.
//!
//! The shard is cut into chunks of `[training] chunk_kib` (see
//! [`chunk_ranges`]). Each chunk has its own parameters, optimizer state,
//! pending pushes and version: in sync mode a chunk's update runs as soon
//! as every worker's copy of that chunk is in, and its pull can go back
//! while later chunks are still arriving. Every element is updated by the
//! same fused kernel with the same inputs in the same worker order as in an
//! unchunked shard (chunk boundaries fall on kernel vector boundaries), so
//! the weights are the same to the bit.
//!
//! A whole-shard push (the form the KV socket and small shards use) counts
//! for every chunk; a whole-shard pull waits for every chunk. Checkpoints
//! see the shard only with every chunk at the same version.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::job::spec::{SuspectRule, SyncMode};
use crate::net::wire::{DecodeError, chunk_ranges, push_view};
use crate::train::optimizer::{OptimizerSpec, RestoreError, ShardOptimizer};

/// Why a server refuses a worker's request (and closes its connection);
/// the worker is told this text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum Refusal {
    /// The request did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message only other roles' peers are sent.
    #[error("`{0}` is not something a server accepts")]
    NotAccepted(&'static str),
    /// A gradient of another length than the shard or chunk.
    #[error("push of {got} values, but this shard holds {holds}")]
    PushLength {
        /// Values pushed.
        got: usize,
        /// Values of the shard (or of the chunk).
        holds: usize,
    },
    /// A gradient with a NaN or an infinity in it.
    #[error("worker {rank} pushed a gradient with a value that is not finite (NaN or infinity); refused")]
    NotFinite {
        /// The worker.
        rank: u32,
    },
    /// A chunk index beyond the shard's chunks.
    #[error("chunk {chunk} asked for, but this shard has {chunks} chunks")]
    NoSuchChunk {
        /// The index given.
        chunk: u32,
        /// Chunks of the shard.
        chunks: usize,
    },
    /// The shard's version cannot grow any more.
    #[error("the shard is at version {0}, the last there is; no update can follow")]
    LastVersion(u64),
    /// Sync mode: a push for another step than the shard's.
    #[error("push for step {step}, but the shard is at step {at}")]
    PushStep {
        /// The push's step.
        step: u64,
        /// The shard's.
        at: u64,
    },
    /// A worker rank beyond the plan's workers.
    #[error("worker rank {0} is not in the plan")]
    NotInPlan(u32),
    /// Sync mode: a second push of one worker for one step.
    #[error("worker {rank} pushed twice for step {step}")]
    PushedTwice {
        /// The worker.
        rank: u32,
        /// The step.
        step: u64,
    },
    /// Initial values in a job that starts from signed weights.
    #[error(
        "this job starts from the signed weights of [model] init; a worker may not replace them \
         (a program's `init` values are ignored in such a job)"
    )]
    SignedInit,
    /// Initial values from a worker other than 0.
    #[error("only worker 0 sets initial values")]
    InitNotWorker0,
    /// Initial values after training began.
    #[error("initial values after {0} update(s); init comes before training")]
    InitAfterUpdates(u64),
    /// Initial values of another length than the shard.
    #[error("initial values for {got} parameters, but this shard holds {holds}")]
    InitLength {
        /// Values given.
        got: usize,
        /// Values of the shard.
        holds: usize,
    },
    /// A pull for a version more than one update ahead.
    #[error("pull for version {min_version}, but the shard is at {current}")]
    PullAhead {
        /// The version asked for.
        min_version: u64,
        /// The shard's.
        current: u64,
    },
    /// A checkpoint asked for by a worker other than 0.
    #[error("only worker 0 may ask for a checkpoint")]
    CheckpointNotWorker0,
    /// A checkpoint in a job without `[checkpoint]`.
    #[error("this job takes no checkpoints ([checkpoint] is not set)")]
    NoCheckpoints,
    /// A checkpoint of a step not after the last one's.
    #[error("checkpoint of step {step} asked for, but step {last} came before it; each checkpoint is of a later step")]
    CheckpointNotLater {
        /// The step asked for.
        step: u64,
        /// The last checkpoint's.
        last: u64,
    },
    /// Sync mode: a checkpoint of another step than the shard's (or a
    /// shard whose chunks are not all at one step).
    #[error("checkpoint of step {step} asked for, but the shard is at step {at}")]
    CheckpointStep {
        /// The step asked for.
        step: u64,
        /// The shard's (the first chunk at another step).
        at: u64,
    },
    /// A checkpoint of another step than worker 0 pushed.
    #[error("checkpoint of step {step} asked for, but worker 0 has pushed {pushed} steps")]
    CheckpointNotPushed {
        /// The step asked for.
        step: u64,
        /// Steps worker 0 pushed.
        pushed: u64,
    },
    /// The checkpoint writer is gone.
    #[error("the checkpoint writer stopped")]
    WriterStopped,
}

/// A worker's push for one chunk, kept until the chunk's update.
#[derive(Debug, Default)]
enum Pending {
    #[default]
    None,
    /// A push_chunk body of its own (its buffer is reused).
    Own(Vec<u8>),
    /// A whole-shard push body, shared by every chunk; this chunk's values
    /// are at its range.
    Part(Arc<Vec<u8>>),
    /// The buffer of a push already applied, kept for the worker's next
    /// receive (the slot is free).
    Spent(Vec<u8>),
}

/// One chunk: its parameters, optimizer state and the step under way.
struct ChunkState {
    /// Shared with the writers sending them ([`Shard::chunk_answer`]); an
    /// update writes them in place when no writer holds them any more (in
    /// sync mode the rule: a worker pushes the next step only after it read
    /// this one's answer whole) and copies them otherwise.
    params: Arc<Vec<f32>>,
    /// Centered clipping: the previous step's combined gradient (zeros at
    /// the start and after a resume); empty for the other rules.
    center: Vec<f32>,
    opt: ShardOptimizer,
    /// Sync mode: each worker's push for the current step.
    pending: Vec<Pending>,
    count: usize,
    version: u64,
}

struct Chunk {
    range: Range<usize>,
    state: Mutex<ChunkState>,
    version: watch::Sender<u64>,
}

/// A chunk's answer to a pull: its frame's head, and the values that
/// follow it (sent from the chunk's own vector, no copy), or, on a
/// big-endian target, the whole frame in `head`.
pub(super) struct ChunkAnswer {
    /// The frame's first bytes.
    pub head: Vec<u8>,
    /// The values, as they were at the head's version.
    pub values: Option<Arc<Vec<f32>>>,
}

impl ChunkAnswer {
    /// The frame's bytes, in order.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        let values = self.values.as_deref().map(|v| bytemuck::cast_slice::<f32, u8>(v));
        std::iter::once(self.head.as_slice()).chain(values)
    }
}

/// Counters of the whole shard.
struct Meta {
    /// Steps worker 0 has pushed (counted from the version training started at).
    worker0_steps: u64,
    /// The step of the newest checkpoint asked for (or where training started).
    last_checkpoint: u64,
}

/// A worker whose gradients stood out: its norm on this shard was above
/// `ratio` times the median of the workers' for `steps` steps in a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Suspect {
    /// The worker's rank.
    pub worker: u32,
    /// Its norm over the median, in the last of those steps.
    pub ratio: f64,
    /// Steps in a row.
    pub steps: u32,
    /// The step that made it suspect (the version it produced).
    pub step: u64,
}

/// The workers' gradient norms on this shard, step by step.
struct Tracker {
    rule: SuspectRule,
    /// Squared norms of each worker's pushes of the step under way.
    norms: Vec<f64>,
    /// Chunks of the step under way that updated.
    updated: usize,
    /// Steps in a row each worker stood out.
    streaks: Vec<u32>,
}

impl Tracker {
    fn new(rule: SuspectRule, workers: usize) -> Tracker {
        Tracker { rule, norms: vec![0.0; workers], updated: 0, streaks: vec![0; workers] }
    }

    /// A chunk's update of step `step` ran; once every chunk's has, the
    /// step's norms are judged: the workers who just reached the rule's
    /// streak.
    fn chunk_updated(&mut self, chunks: usize, step: u64) -> Vec<Suspect> {
        self.updated += 1;
        if self.updated < chunks {
            return Vec::new();
        }
        self.updated = 0;
        let norms: Vec<f64> = self.norms.iter().map(|n| n.sqrt()).collect();
        self.norms.fill(0.0);
        let mut sorted = norms.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let mut found = Vec::new();
        for (w, n) in norms.iter().enumerate() {
            let ratio = if median > 0.0 {
                n / median
            } else if *n > 0.0 {
                f64::INFINITY
            } else {
                1.0
            };
            if ratio > self.rule.ratio {
                self.streaks[w] += 1;
                if self.streaks[w] == self.rule.steps {
                    found.push(Suspect { worker: w as u32, ratio, steps: self.rule.steps, step });
                }
            } else {
                self.streaks[w] = 0;
            }
        }
        found
    }
}

/// The shard and its update state.
///
/// `std::sync::Mutex`es, not tokio ones: nothing awaits while holding
/// them, and the critical sections are short loops over memory. Locks are
/// taken one chunk at a time, or in chunk order.
pub(super) struct Shard {
    chunks: Vec<Chunk>,
    len: usize,
    workers: usize,
    mode: SyncMode,
    /// The job starts from verified signed weights (`[model] init`), which
    /// no worker may replace.
    signed_init: bool,
    /// How a step's gradients are combined (sync mode).
    combine: warden_kernels::Combine,
    /// Centered clipping's radius, when that is the rule instead.
    centered: Option<f32>,
    /// Sync mode: the workers' gradient norms, for the suspect rule. Locked
    /// only while a chunk's lock is held (never the other way round).
    tracker: Option<Mutex<Tracker>>,
    meta: Mutex<Meta>,
    /// The whole-shard params frame of the newest version.
    frame: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a shard starts.
pub(super) struct ShardStart {
    /// Its parameters.
    pub params: Vec<f32>,
    /// Version (steps applied) at the start.
    pub version: u64,
    /// The optimizer.
    pub spec: OptimizerSpec,
    /// Restored optimizer state: updates applied and slots (whole shard).
    pub restored: Option<(u64, Vec<Vec<f32>>)>,
    /// Workers of the job.
    pub workers: usize,
    /// Sync or async.
    pub mode: SyncMode,
    /// The job starts from signed weights.
    pub signed_init: bool,
    /// Floats per chunk.
    pub chunk: usize,
    /// How a step's gradients are combined.
    pub combine: warden_kernels::Combine,
    /// Centered clipping's radius, when that is the rule instead.
    pub centered: Option<f32>,
    /// When a worker is suspect (sync mode).
    pub suspect: Option<SuspectRule>,
}

impl Shard {
    /// A shard cut into chunks of `start.chunk` floats.
    pub fn new(start: ShardStart) -> Result<Shard, RestoreError> {
        let ShardStart {
            params,
            version,
            spec,
            restored,
            workers,
            mode,
            signed_init,
            chunk,
            combine,
            centered,
            suspect,
        } = start;
        let len = params.len();
        let mut chunks = Vec::new();
        for range in chunk_ranges(len, chunk) {
            let opt = match &restored {
                Some((t, slots)) => {
                    let part = slots.iter().map(|s| s.get(range.clone()).unwrap_or_default().to_vec()).collect();
                    ShardOptimizer::restore(spec, range.len(), *t, part)?
                }
                None => ShardOptimizer::new(spec, range.len()),
            };
            let state = ChunkState {
                params: Arc::new(params[range.clone()].to_vec()),
                center: if centered.is_some() { vec![0.0; range.len()] } else { Vec::new() },
                opt,
                pending: (0..workers).map(|_| Pending::None).collect(),
                count: 0,
                version,
            };
            chunks.push(Chunk { range, state: Mutex::new(state), version: watch::Sender::new(version) });
        }
        Ok(Shard {
            chunks,
            len,
            workers,
            mode,
            signed_init,
            combine,
            centered,
            tracker: suspect.filter(|_| mode == SyncMode::Sync).map(|rule| Mutex::new(Tracker::new(rule, workers))),
            meta: Mutex::new(Meta { worker0_steps: version, last_checkpoint: version }),
            frame: Mutex::new(None),
        })
    }

    /// Chunks of the shard.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// The lowest version of any chunk: the shard's version.
    pub fn version(&self) -> u64 {
        self.chunks.iter().map(|c| *c.version.borrow()).min().unwrap_or(0)
    }

    fn chunk(&self, chunk: u32) -> Result<&Chunk, Refusal> {
        self.chunks.get(chunk as usize).ok_or(Refusal::NoSuchChunk { chunk, chunks: self.chunks.len() })
    }

    /// Takes a push or push_chunk body (any encoding, see
    /// [`crate::net::wire::push_view`]). A chunk's body is swapped into
    /// the chunk in sync mode, and `body` comes back holding a spare buffer
    /// (no copy of the gradient); a whole-shard push is shared by all chunks.
    ///
    /// Returns the workers this push's step found suspect (see
    /// [`SuspectRule`]), if it completed a step.
    pub fn push(&self, rank: u32, body: &mut Vec<u8>) -> Result<Vec<Suspect>, Refusal> {
        self.push_checked(rank, body, None)
    }

    /// [`Shard::push`] of a body whose values' [`warden_kernels::Grad::finite_sum_squares`]
    /// is `checked` already (computed as they arrived), if it is given.
    pub fn push_checked(
        &self,
        rank: u32,
        body: &mut Vec<u8>,
        checked: Option<Option<f64>>,
    ) -> Result<Vec<Suspect>, Refusal> {
        let (step, chunk, grad) = push_view(body)?;
        let norm2 = checked.unwrap_or_else(|| grad.finite_sum_squares()).ok_or(Refusal::NotFinite { rank })?;
        let mut found = Vec::new();
        let Some(c) = chunk else {
            self.push_whole(rank, step, grad.len(), body, norm2, &mut found)?;
            return Ok(found);
        };
        let ch = self.chunk(c)?;
        if grad.len() != ch.range.len() {
            return Err(Refusal::PushLength { got: grad.len(), holds: ch.range.len() });
        }
        let last = c as usize + 1 == self.chunks.len();
        let incoming = Pending::Own(std::mem::take(body));
        if let Some(spare) = self.push_chunk(ch, (rank, step, last), incoming, norm2, &mut found)? {
            *body = spare;
        }
        Ok(found)
    }

    fn push_whole(
        &self,
        rank: u32,
        step: u64,
        len: usize,
        body: &mut Vec<u8>,
        norm2: f64,
        found: &mut Vec<Suspect>,
    ) -> Result<(), Refusal> {
        if len != self.len {
            return Err(Refusal::PushLength { got: len, holds: self.len });
        }
        // Checked for every chunk before any takes it: all or nothing.
        for ch in &self.chunks {
            self.admit(&lock(&ch.state), rank, step)?;
        }
        let shared = Arc::new(std::mem::take(body));
        for (i, ch) in self.chunks.iter().enumerate() {
            // The whole push's norm counts once, with its first chunk.
            let part = if i == 0 { norm2 } else { 0.0 };
            let last = i + 1 == self.chunks.len();
            self.push_chunk(ch, (rank, step, last), Pending::Part(shared.clone()), part, found)?;
        }
        Ok(())
    }

    /// Whether `rank`'s push for `step` may go into a chunk in `st`.
    fn admit(&self, st: &ChunkState, rank: u32, step: u64) -> Result<(), Refusal> {
        if st.version.checked_add(1).is_none() {
            return Err(Refusal::LastVersion(st.version));
        }
        if self.mode == SyncMode::Sync {
            if step != st.version {
                return Err(Refusal::PushStep { step, at: st.version });
            }
            match st.pending.get(rank as usize) {
                None => return Err(Refusal::NotInPlan(rank)),
                Some(Pending::None | Pending::Spent(_)) => {}
                Some(_) => return Err(Refusal::PushedTwice { rank, step }),
            }
        }
        Ok(())
    }

    /// One chunk's share of a push: kept (sync) or applied (async); the
    /// chunk's update once every worker's is in. `last`: the shard's last
    /// chunk, whose push completes a step of worker `rank`'s. Returns a
    /// spare buffer for the worker's next receive, if one is free.
    /// `norm2`: the push's squared norm, counted for the suspect rule in
    /// sync mode (under the chunk's lock, so a step's norms are all in
    /// before its last chunk's update can be pulled).
    fn push_chunk(
        &self,
        ch: &Chunk,
        (rank, step, last): (u32, u64, bool),
        incoming: Pending,
        norm2: f64,
        found: &mut Vec<Suspect>,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let mut st = lock(&ch.state);
        self.admit(&st, rank, step)?;
        if let (SyncMode::Sync, Some(t)) = (self.mode, &self.tracker) {
            lock(t).norms[rank as usize] += norm2;
        }
        let spare = match self.mode {
            SyncMode::Async => {
                let ChunkState { params, opt, .. } = &mut *st;
                if let Some(g) = view(&incoming, &ch.range) {
                    opt.apply(Arc::make_mut(params).as_mut_slice(), &[g], 1);
                }
                match incoming {
                    Pending::Own(v) => Some(v),
                    _ => None,
                }
            }
            SyncMode::Sync => {
                let spare = match std::mem::replace(&mut st.pending[rank as usize], incoming) {
                    Pending::Spent(v) => Some(v),
                    _ => None,
                };
                st.count += 1;
                if st.count < self.workers {
                    drop(st);
                    self.count_step(rank, last);
                    return Ok(spare);
                }
                let ChunkState { params, pending, opt, center, .. } = &mut *st;
                let params = Arc::make_mut(params);
                // Validated on arrival; the views cannot fail now. Worker order.
                let grads: Vec<_> = pending.iter().filter_map(|p| view(p, &ch.range)).collect();
                match self.centered {
                    // The radius bounds a worker's difference over the whole
                    // shard: each chunk gets its share (the squares add up).
                    Some(radius) => {
                        let share = (ch.range.len() as f64 / self.len.max(1) as f64).sqrt() as f32;
                        opt.apply_centered(params, center, &grads, radius * share)
                    }
                    None => opt.apply_combined(params, &grads, self.workers, self.combine),
                }
                for p in pending.iter_mut() {
                    *p = match std::mem::take(p) {
                        Pending::Own(v) | Pending::Spent(v) => Pending::Spent(v),
                        _ => Pending::None,
                    };
                }
                st.count = 0;
                if let Some(t) = &self.tracker {
                    found.extend(lock(t).chunk_updated(self.chunks.len(), st.version + 1));
                }
                spare
            }
        };
        st.version += 1;
        ch.version.send_replace(st.version);
        drop(st);
        self.count_step(rank, last);
        Ok(spare)
    }

    fn count_step(&self, rank: u32, last: bool) {
        if rank == 0 && last {
            let mut m = lock(&self.meta);
            m.worker0_steps = m.worker0_steps.saturating_add(1);
        }
    }

    /// Worker 0's initial values (an external model's `init`), before any update.
    pub fn set_params(&self, rank: u32, data: Vec<f32>) -> Result<(), Refusal> {
        if self.signed_init {
            return Err(Refusal::SignedInit);
        }
        if rank != 0 {
            return Err(Refusal::InitNotWorker0);
        }
        if data.len() != self.len {
            return Err(Refusal::InitLength { got: data.len(), holds: self.len });
        }
        let mut states: Vec<_> = self.chunks.iter().map(|c| lock(&c.state)).collect();
        if let Some(st) = states.iter().find(|st| st.version != 0 || st.count != 0) {
            return Err(Refusal::InitAfterUpdates(st.version));
        }
        for (st, ch) in states.iter_mut().zip(&self.chunks) {
            Arc::make_mut(&mut st.params).copy_from_slice(&data[ch.range.clone()]);
        }
        drop(states);
        // The cached frame of version 0 is stale now.
        *lock(&self.frame) = None;
        Ok(())
    }

    /// A copy of the state for checkpoint `step`. In sync mode the shard is
    /// exactly at that step when worker 0 asks (its next push has not been
    /// sent), so the copy is the state after `step` updates. In either mode
    /// `step` is the number of steps worker 0 pushed, and later than the
    /// last checkpoint's: one checkpoint per step at most, so worker 0
    /// cannot make the server copy and write its state faster than it trains.
    pub fn snapshot(&self, step: u64) -> Result<crate::store::checkpoint::ShardState, Refusal> {
        let mut meta = lock(&self.meta);
        if step <= meta.last_checkpoint {
            return Err(Refusal::CheckpointNotLater { step, last: meta.last_checkpoint });
        }
        let states: Vec<_> = self.chunks.iter().map(|c| lock(&c.state)).collect();
        if self.mode == SyncMode::Sync
            && let Some(st) = states.iter().find(|st| st.version != step)
        {
            return Err(Refusal::CheckpointStep { step, at: st.version });
        }
        if meta.worker0_steps != step {
            return Err(Refusal::CheckpointNotPushed { step, pushed: meta.worker0_steps });
        }
        meta.last_checkpoint = step;
        let t = states.iter().map(|st| st.opt.updates()).min().unwrap_or(0);
        let mut params = Vec::with_capacity(self.len);
        let mut slots = vec![Vec::with_capacity(self.len); states.first().map_or(0, |st| st.opt.slots())];
        for st in &states {
            params.extend_from_slice(&st.params);
            for (all, part) in slots.iter_mut().zip(st.opt.slot_values()) {
                all.extend_from_slice(part);
            }
        }
        Ok(crate::store::checkpoint::ShardState { t, params, slots })
    }

    /// Waits until every chunk reaches `min_version`; a pull more than one
    /// update ahead could wait forever and is refused.
    pub async fn reach(&self, min_version: u64) -> Result<(), Refusal> {
        let current = self.version();
        if min_version > current.saturating_add(1) {
            return Err(Refusal::PullAhead { min_version, current });
        }
        for c in 0..self.chunks.len() {
            self.reach_chunk(c as u32, min_version).await?;
        }
        Ok(())
    }

    /// Waits until chunk `chunk` reaches `min_version`.
    pub async fn reach_chunk(&self, chunk: u32, min_version: u64) -> Result<(), Refusal> {
        let ch = self.chunk(chunk)?;
        let mut rx = ch.version.subscribe();
        let current = *rx.borrow();
        if min_version > current.saturating_add(1) {
            return Err(Refusal::PullAhead { min_version, current });
        }
        // The sender lives as long as the shard, so this only ends on success.
        let _ = rx.wait_for(|v| *v >= min_version).await;
        Ok(())
    }

    /// The encoded params frame of the whole shard at its current version.
    pub fn params_frame(&self) -> Arc<Vec<u8>> {
        let mut cache = lock(&self.frame);
        let states: Vec<_> = self.chunks.iter().map(|c| lock(&c.state)).collect();
        let version = states.iter().map(|st| st.version).min().unwrap_or(0);
        let same = states.iter().all(|st| st.version == version);
        if same
            && let Some((v, frame)) = cache.as_ref()
            && *v == version
        {
            return frame.clone();
        }
        // Reuse the old buffer when no connection still holds it.
        let mut buf = cache.take().and_then(|(_, f)| Arc::try_unwrap(f).ok()).unwrap_or_default();
        buf.clear();
        let parts: Vec<&[f32]> = states.iter().map(|st| st.params.as_slice()).collect();
        crate::net::wire::encode_params(version, &parts, &mut buf);
        let frame = Arc::new(buf);
        if same {
            *cache = Some((version, frame.clone()));
        }
        frame
    }

    /// Chunk `chunk`'s params_chunk frame at its current version: its
    /// head, and its values as they are now (the chunk's next update leaves
    /// them be while the answer holds them).
    pub fn chunk_answer(&self, chunk: u32) -> Result<ChunkAnswer, Refusal> {
        let ch = self.chunk(chunk)?;
        let st = lock(&ch.state);
        let mut head = Vec::with_capacity(crate::net::wire::HEADER_LEN + crate::net::wire::PARAMS_CHUNK_HEAD);
        if cfg!(target_endian = "big") {
            // The wire's values are little-endian: the whole frame, encoded.
            crate::net::wire::encode_params_chunk(st.version, chunk, &st.params, &mut head);
            return Ok(ChunkAnswer { head, values: None });
        }
        crate::net::wire::encode_params_chunk_head(st.version, chunk, st.params.len(), &mut head);
        Ok(ChunkAnswer { head, values: Some(st.params.clone()) })
    }
}

/// The gradient of one chunk in a pending push.
fn view<'a>(p: &'a Pending, range: &Range<usize>) -> Option<warden_kernels::Grad<'a>> {
    match p {
        Pending::None | Pending::Spent(_) => None,
        Pending::Own(body) => push_view(body).ok().map(|(_, _, g)| g),
        Pending::Part(body) => push_view(body).ok().map(|(_, _, g)| g.range(range.start, range.end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::wire::{Encoding, HEADER_LEN, encode_push, encode_push_chunk};
    use crate::train::optimizer::OptimizerKind;

    fn shard(mode: SyncMode, workers: usize, version: u64, len: usize, chunk: usize, spec: OptimizerSpec) -> Shard {
        Shard::new(ShardStart {
            params: (0..len).map(|i| (i as f32 * 0.37).sin()).collect(),
            version,
            spec,
            restored: None,
            workers,
            mode,
            signed_init: false,
            chunk,
            combine: warden_kernels::Combine::Mean,
            centered: None,
            suspect: None,
        })
        .unwrap()
    }

    impl Shard {
        /// Every parameter, in order.
        fn params_values(&self) -> Vec<f32> {
            self.chunks.iter().flat_map(|c| lock(&c.state).params.to_vec()).collect()
        }
    }

    /// Centered clipping bounds a worker's pull on the whole shard by
    /// radius / workers, however many chunks the shard is cut into.
    #[test]
    fn centered_clipping_bounds_a_worker_over_the_whole_shard() {
        let mut s = shard(SyncMode::Sync, 2, 0, 256, 64, OptimizerSpec::sgd(1.0));
        s.centered = Some(1.0);
        for st in s.chunks.iter().map(|c| &c.state) {
            let mut st = lock(st);
            st.center = vec![0.0; st.params.len()];
        }
        assert_eq!(s.chunks(), 4);
        let before = s.params_values();
        for (rank, v) in [(0, 0.0f32), (1, 1000.0)] {
            let mut f = Vec::new();
            encode_push(0, &[v; 256], Encoding::F32, 0.5, &mut [], &mut f);
            s.push(rank, &mut body(f)).unwrap();
        }
        let moved: f64 =
            s.params_values().iter().zip(&before).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
        assert!((moved - 0.5).abs() < 1e-4, "the shard moved by {moved}, not radius / workers = 0.5");
    }

    /// A worker whose norm is above the ratio for the rule's steps in a row
    /// is reported once; one normal step starts its count again.
    #[test]
    fn a_worker_standing_out_for_steps_in_a_row_is_suspect_once() {
        let rule = SuspectRule { ratio: 10.0, steps: 3, fail: false };
        let mut t = Tracker::new(rule, 3);
        let step = |scales: [f64; 3], t: &mut Tracker| {
            for (w, s) in scales.iter().enumerate() {
                t.norms[w] += s * s;
            }
            // Two chunks: judged after the second.
            assert!(t.chunk_updated(2, 0).is_empty());
            t.chunk_updated(2, 7)
        };
        assert!(step([1.0, 1.0, 20.0], &mut t).is_empty());
        assert!(step([1.0, 1.0, 20.0], &mut t).is_empty());
        assert!(step([1.0, 1.0, 5.0], &mut t).is_empty(), "below the ratio: the count starts again");
        assert!(step([1.0, 1.2, 20.0], &mut t).is_empty());
        assert!(step([1.0, 1.0, 20.0], &mut t).is_empty());
        let found = step([1.0, 2.0, 30.0], &mut t);
        assert_eq!(found, vec![Suspect { worker: 2, ratio: 15.0, steps: 3, step: 7 }]);
        assert!(step([1.0, 1.0, 20.0], &mut t).is_empty(), "reported once per streak");
    }

    /// A push with a NaN or an infinity is refused, naming the worker, and
    /// leaves the shard as it was.
    #[test]
    fn a_gradient_that_is_not_finite_is_refused_by_name() {
        let s = shard(SyncMode::Sync, 2, 0, 100, 64, OptimizerSpec::sgd(0.1));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for enc in [Encoding::F32, Encoding::F16, Encoding::Bf16] {
                let mut g = vec![0.5f32; 64];
                g[17] = bad;
                let mut f = Vec::new();
                encode_push_chunk(0, 0, &g, enc, 0.5, &mut [], &mut f);
                let why = s.push(1, &mut body(f)).unwrap_err();
                assert_eq!(
                    why.to_string(),
                    "worker 1 pushed a gradient with a value that is not finite (NaN or infinity); refused"
                );
            }
        }
        // The slot is still free: an honest push of worker 1 is taken.
        let mut f = Vec::new();
        encode_push_chunk(0, 0, &[0.5; 64], Encoding::F32, 0.5, &mut [], &mut f);
        s.push(1, &mut body(f)).unwrap();
    }

    fn body(mut frame: Vec<u8>) -> Vec<u8> {
        frame.split_off(HEADER_LEN)
    }

    fn push_body(step: u64, data: &[f32]) -> Vec<u8> {
        let mut raw = Vec::new();
        encode_push(step, data, Encoding::F32, 0.0, &mut [], &mut raw);
        body(raw)
    }

    /// Async mode: worker 0 gets one checkpoint per step it pushed, each of
    /// a later step; other workers' pushes earn it none.
    #[test]
    fn worker_0_asks_for_one_checkpoint_per_step_it_pushed() {
        let s = shard(SyncMode::Async, 2, 0, 2, 64, OptimizerSpec::sgd(0.5));
        let g = [1.0, 1.0];
        assert!(s.snapshot(5).unwrap_err().to_string().contains("worker 0 has pushed 0 steps"));
        s.push(1, &mut push_body(0, &g)).unwrap();
        assert!(s.snapshot(1).is_err(), "worker 1's push is not worker 0's step");
        s.push(0, &mut push_body(0, &g)).unwrap();
        s.snapshot(1).unwrap();
        assert!(s.snapshot(1).unwrap_err().to_string().contains("each checkpoint is of a later step"));
        assert!(s.snapshot(2).is_err());
        s.push(0, &mut push_body(1, &g)).unwrap();
        s.snapshot(2).unwrap();
        // Sync mode: worker 0's push counts when it arrives, the step when all are in.
        let s = shard(SyncMode::Sync, 2, 0, 2, 64, OptimizerSpec::sgd(0.5));
        s.push(0, &mut push_body(0, &g)).unwrap();
        assert!(s.snapshot(1).unwrap_err().to_string().contains("the shard is at step 0"));
        s.push(1, &mut push_body(0, &g)).unwrap();
        s.snapshot(1).unwrap();
        s.push(1, &mut push_body(1, &g)).unwrap();
        s.push(0, &mut push_body(1, &g)).unwrap();
        s.snapshot(2).unwrap();
    }

    /// A shard at the last version there is refuses the next update
    /// instead of wrapping around (or panicking).
    #[test]
    fn the_version_never_wraps() {
        for mode in [SyncMode::Async, SyncMode::Sync] {
            let s = shard(mode, 1, u64::MAX, 2, 64, OptimizerSpec::sgd(0.5));
            let why = s.push(0, &mut push_body(u64::MAX, &[1.0, 1.0])).unwrap_err();
            assert!(why.to_string().contains("the last there is"), "{why}");
            assert_eq!(s.version(), u64::MAX);
        }
    }

    fn grads(workers: usize, step: u64, len: usize) -> Vec<Vec<f32>> {
        (0..workers)
            .map(|w| (0..len).map(|i| ((i * 7 + w * 13) as f32 * 0.011 + step as f32).cos() * 0.1).collect())
            .collect()
    }

    /// Pushes `g` as chunk frames of `s`'s chunks (in the order given), or
    /// whole when `whole`.
    fn push_all(s: &Shard, rank: u32, step: u64, g: &[f32], enc: Encoding, residual: &mut [f32], order: &[usize]) {
        let ranges = chunk_ranges(g.len(), s.chunks[0].range.len());
        for &c in order {
            let r = ranges[c].clone();
            let mut raw = Vec::new();
            encode_push_chunk(step, c as u32, &g[r.clone()], enc, 0.01, &mut residual[r], &mut raw);
            s.push(rank, &mut body(raw)).unwrap();
        }
    }

    fn whole(s: &Shard) -> Vec<u32> {
        let f = s.params_frame();
        let (_, raw) = crate::net::wire::vector_view(&f[HEADER_LEN..], crate::net::wire::TAG_PARAMS).unwrap();
        raw.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    /// Chunked pushes, in any chunk order and any mix of whole and chunked
    /// pushes, give the same weights to the bit as one unchunked shard, for
    /// every encoding and an optimizer with state.
    #[test]
    fn chunks_give_the_unchunked_weights_to_the_bit() {
        let adam = OptimizerSpec {
            kind: OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            weight_decay: 1e-3,
            clip_gradient: 0.05,
            ..OptimizerSpec::sgd(0.01)
        };
        let len = 1000 + 37; // chunks of 128: 8 full and a tail of 13
        for enc in [Encoding::F32, Encoding::F16, Encoding::Bf16, Encoding::TwoBit] {
            let one = shard(SyncMode::Sync, 3, 0, len, 1 << 20, adam);
            let many = shard(SyncMode::Sync, 3, 0, len, 128, adam);
            assert_eq!((one.chunks(), many.chunks()), (1, 9));
            let mut res_one = vec![vec![0.0; len]; 3];
            let mut res_many = vec![vec![0.0; len]; 3];
            for step in 0..4u64 {
                for (w, g) in grads(3, step, len).iter().enumerate() {
                    let mut raw = Vec::new();
                    encode_push(step, g, enc, 0.01, &mut res_one[w], &mut raw);
                    one.push(w as u32, &mut body(raw)).unwrap();
                    if w == 1 && step % 2 == 1 {
                        let mut raw = Vec::new();
                        encode_push(step, g, enc, 0.01, &mut res_many[w], &mut raw);
                        many.push(w as u32, &mut body(raw)).unwrap();
                    } else {
                        let order: Vec<usize> = if w == 2 { (0..9).rev().collect() } else { (0..9).collect() };
                        push_all(&many, w as u32, step, g, enc, &mut res_many[w], &order);
                    }
                }
                assert_eq!(one.version(), step + 1);
                assert_eq!(many.version(), step + 1);
                assert_eq!(whole(&one), whole(&many), "{enc:?} step {step}");
            }
            let (a, b) = (one.snapshot(4).unwrap(), many.snapshot(4).unwrap());
            assert_eq!((a.t, &a.slots), (b.t, &b.slots), "{enc:?}: optimizer state");
        }
    }

    /// A chunk's pull waits only for that chunk; a whole pull for all.
    #[tokio::test]
    async fn a_chunk_is_pulled_as_soon_as_it_is_updated() {
        let s = shard(SyncMode::Sync, 2, 0, 256, 64, OptimizerSpec::sgd(0.5));
        let g = grads(2, 0, 256);
        push_all(&s, 0, 0, &g[0], Encoding::F32, &mut [0.0; 256], &[0, 1, 2, 3]);
        push_all(&s, 1, 0, &g[1], Encoding::F32, &mut [0.0; 256], &[1]);
        tokio::time::timeout(std::time::Duration::from_secs(5), s.reach_chunk(1, 1)).await.unwrap().unwrap();
        let frame: Vec<u8> = s.chunk_answer(1).unwrap().pieces().flatten().copied().collect();
        let (v, c, values) = crate::net::wire::params_chunk_view(&frame[HEADER_LEN..]).unwrap();
        assert_eq!((v, c, values.len()), (1, 1, 4 * 64));
        assert_eq!(s.version(), 0, "the other chunks are not in yet");
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), s.reach(1)).await.is_err());
        assert!(s.reach_chunk(9, 1).await.unwrap_err().to_string().contains("has 4 chunks"));
    }

    /// A chunk's answer keeps the values of its version while the next
    /// update goes on (which then writes a copy); once no answer holds
    /// them, an update writes them in place.
    #[test]
    fn a_chunk_answer_keeps_its_version_and_updates_copy_only_while_one_is_held() {
        let s = shard(SyncMode::Sync, 2, 0, 256, 64, OptimizerSpec::sgd(0.5));
        let step = |t: u64| {
            let g = grads(2, t, 256);
            for (w, g) in g.iter().enumerate() {
                push_all(&s, w as u32, t, g, Encoding::F32, &mut [0.0; 256], &[0, 1, 2, 3]);
            }
        };
        let at = |a: &ChunkAnswer| crate::net::wire::params_chunk_head(&a.head[HEADER_LEN..]).unwrap().0;
        // Where the chunk's own values are now.
        let own = || Arc::as_ptr(&lock(&s.chunks[2].state).params);
        step(0);
        let held = s.chunk_answer(2).unwrap();
        let again = s.chunk_answer(2).unwrap();
        let values = |a: &ChunkAnswer| Arc::as_ptr(a.values.as_ref().unwrap());
        assert_eq!((values(&held), values(&again)), (own(), own()), "answers share the chunk's values");
        drop(again);
        let kept = held.values.as_deref().unwrap().clone();
        step(1);
        assert_eq!((at(&held), held.values.as_deref().unwrap()), (1, &kept), "the held answer is version 1's");
        assert_ne!(own(), values(&held), "the update wrote to a copy");
        let fresh = s.chunk_answer(2).unwrap();
        assert_eq!(at(&fresh), 2);
        assert_ne!(fresh.values.as_deref().unwrap(), &kept, "version 2's values differ");
        drop((held, fresh));
        let before = own();
        step(2);
        assert_eq!(own(), before, "nobody held them: written in place");
        assert_eq!(at(&s.chunk_answer(2).unwrap()), 3);
    }

    /// A worker whose connection drops mid-step leaves some chunks updated
    /// and some not: the shard reports the older version, and no
    /// checkpoint is taken of it.
    #[test]
    fn a_step_cut_short_is_never_checkpointed() {
        let s = shard(SyncMode::Sync, 2, 0, 256, 64, OptimizerSpec::sgd(0.5));
        let g = grads(2, 0, 256);
        push_all(&s, 0, 0, &g[0], Encoding::F32, &mut [0.0; 256], &[0, 1, 2, 3]);
        // Worker 1 gets two of its four chunks out, then is gone.
        push_all(&s, 1, 0, &g[1], Encoding::F32, &mut [0.0; 256], &[0, 1]);
        assert_eq!(s.version(), 0);
        let why = s.snapshot(1).unwrap_err().to_string();
        assert!(why.contains("the shard is at step 0"), "{why}");
    }

    /// Chunk indices, lengths and repeated pushes are checked per chunk.
    #[test]
    fn chunk_pushes_are_checked() {
        let s = shard(SyncMode::Sync, 2, 0, 256, 64, OptimizerSpec::sgd(0.5));
        let mut raw = Vec::new();
        encode_push_chunk(0, 4, &[0.0; 64], Encoding::F32, 0.0, &mut [], &mut raw);
        assert!(s.push(0, &mut body(raw)).unwrap_err().to_string().contains("has 4 chunks"));
        let mut raw = Vec::new();
        encode_push_chunk(0, 1, &[0.0; 63], Encoding::F32, 0.0, &mut [], &mut raw);
        assert!(s.push(0, &mut body(raw)).unwrap_err().to_string().contains("push of 63 values"));
        let mut raw = Vec::new();
        encode_push_chunk(0, 1, &[0.0; 64], Encoding::F32, 0.0, &mut [], &mut raw);
        s.push(0, &mut body(raw.clone())).unwrap();
        assert!(s.push(0, &mut body(raw)).unwrap_err().to_string().contains("pushed twice"));
        // A whole push is refused as a whole when any chunk already has one.
        let why = s.push(0, &mut push_body(0, &[0.0; 256])).unwrap_err().to_string();
        assert!(why.contains("pushed twice"), "{why}");
        assert_eq!(s.chunks[0].state.lock().unwrap().count, 0, "nothing of the refused push was kept");
    }
}
