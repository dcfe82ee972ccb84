//! A worker: reads its shard of the data, computes gradients, pushes them to
//! every server and pulls the updated parameters, all servers concurrently.

use std::sync::Arc;
use std::time::Instant;

use super::link::{Gradient, Link, Traffic, close_links, exchange, request_checkpoint};
use super::{RoleCtx, RoleError};
use crate::net::control::{Event, StepScalars};
use crate::net::identity::Role;
use crate::net::wire::Message;
use crate::train::data::Dataset;
use crate::train::model::{Batch, Workspace};
use crate::train::train_rng::{Stream, rng};
use rand::seq::SliceRandom;

/// A worker's data, loaded before training starts.
#[derive(Debug)]
pub struct WorkerData {
    /// This worker's shard of the training set.
    pub train: Dataset,
    /// The test set (rank 0 only).
    pub test: Option<Dataset>,
    /// Steps per epoch, the same on every worker so sync steps line up.
    pub steps: usize,
}

/// Loads this worker's training shard (and, for rank 0, the test set).
pub fn load_data(ctx: &RoleCtx) -> Result<WorkerData, RoleError> {
    let rank = ctx.me().rank;
    let Some(data) = &ctx.spec.data else {
        // The synthetic model: no samples, a fixed number of steps.
        let empty = Dataset { features: 0, x: Vec::new(), y: Vec::new() };
        return Ok(WorkerData { train: empty, test: None, steps: ctx.spec.training.synthetic_steps });
    };
    let (all, test) = crate::train::data::load(data, &ctx.spec.model, ctx.seed, rank == 0)
        .map_err(|e| RoleError::new(e.to_string()))?;
    let workers = ctx.plan.count(Role::Worker) as usize;
    let steps =
        steps_per_epoch(all.len(), workers, ctx.spec.training.batch_size).map_err(|e| RoleError::new(e.to_string()))?;
    Ok(WorkerData { train: all.shard(rank as usize, workers), test, steps })
}

/// Steps per epoch for `n` training samples over `workers` workers: every
/// worker runs the same number, set by the smallest shard.
pub fn steps_per_epoch(n: usize, workers: usize, batch: usize) -> Result<usize, ShardTooSmall> {
    let shard = n / workers;
    if shard < batch {
        return Err(ShardTooSmall { shard, n, workers, batch });
    }
    Ok(shard / batch)
}

/// A worker's shard holds fewer samples than one batch.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "each worker's shard has {shard} samples ({n} samples / {workers} workers), fewer than batch_size = {batch}; lower batch_size or use fewer workers"
)]
pub struct ShardTooSmall {
    /// Samples in the smallest shard.
    pub shard: usize,
    /// Training samples in all.
    pub n: usize,
    /// Workers of the job.
    pub workers: usize,
    /// `[training] batch_size`.
    pub batch: usize,
}

/// The shard-local sample indices of each step of `epoch` on worker `rank`:
/// a permutation of the shard from the training seed, cut into batches.
/// Exposed so tests can replay exactly what a worker trained on.
pub fn epoch_order(seed: u64, rank: u32, epoch: u32, shard_len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..shard_len).collect();
    order.shuffle(&mut rng(seed, Stream::Shuffle { rank, epoch }));
    order
}

/// When worker 0 asks for checkpoints.
struct CheckpointClock {
    every_steps: Option<u64>,
    every: Option<std::time::Duration>,
    last: Instant,
}

impl CheckpointClock {
    /// Worker 0's clock, for a job with `[checkpoint]`; other workers ask for none.
    fn of_worker(ctx: &RoleCtx) -> Option<CheckpointClock> {
        let c = ctx.spec.checkpoint.as_ref().filter(|_| ctx.me().rank == 0)?;
        Some(CheckpointClock {
            every_steps: c.every_steps,
            every: c.every_seconds.map(std::time::Duration::from_secs),
            last: Instant::now(),
        })
    }

    fn due(&mut self, step: u64) -> bool {
        let by_steps = self.every_steps.is_some_and(|n| step.is_multiple_of(n));
        let by_time = self.every.is_some_and(|d| self.last.elapsed() >= d);
        if by_steps || by_time {
            self.last = Instant::now();
        }
        by_steps || by_time
    }
}

/// One step's local work: a batch of this worker's shard, its loss and
/// gradient, in buffers reused from step to step.
struct LocalStep {
    /// Shared with the server links while a step's pushes go out from it.
    grad: Arc<Vec<f32>>,
    xb: Vec<f32>,
    yb: Vec<u8>,
    ws: Workspace,
}

impl LocalStep {
    fn new(ctx: &RoleCtx, train: &Dataset, num_params: usize) -> LocalStep {
        let batch = ctx.spec.training.batch_size;
        LocalStep {
            grad: Arc::new(vec![0.0; num_params]),
            xb: vec![0.0; batch * train.features],
            yb: vec![0; batch],
            ws: Workspace::default(),
        }
    }

    /// The loss of step `step` of `epoch` (whose sample order is `order`),
    /// its gradient left in `self.grad`; a loss that is not finite ends
    /// the job with advice.
    fn gradient(
        &mut self,
        ctx: &RoleCtx,
        train: &Dataset,
        params: &[f32],
        order: &[usize],
        (epoch, step): (u32, usize),
    ) -> Result<f32, RoleError> {
        let (spec, rank, batch) = (&ctx.spec, ctx.me().rank, ctx.spec.training.batch_size);
        // The links let go of the last step's gradient before answering it.
        let grad = Arc::get_mut(&mut self.grad)
            .ok_or_else(|| RoleError::new("a server link still holds the last step's gradient"))?;
        let loss = if spec.model.kind == crate::job::spec::ModelKind::Synthetic {
            // A small constant gradient: the parameters drift, nothing else.
            // Only the worker writes it, so once is enough (the benchmark
            // then measures the transport, as MXNet's side of it does).
            if grad.first() != Some(&1e-6) {
                grad.fill(1e-6);
            }
            0.0
        } else {
            fill_batch(train, &order[step * batch..(step + 1) * batch], &mut self.xb, &mut self.yb);
            // Dropout masks from a stream per step, so a resumed run draws the same ones.
            let mut dropout = rng(ctx.seed, Stream::Dropout { rank, epoch, step: step as u64 });
            let b = Batch { x: &self.xb, y: &self.yb };
            self.ws.loss_and_grad(&spec.model, params, &b, grad, Some(&mut dropout))
        };
        if !loss.is_finite() {
            return Err(RoleError::new(format!(
                "the training loss became {loss} at epoch {epoch}, step {}; lower [optimizer] lr or set clip_gradient",
                step + 1
            )));
        }
        Ok(loss)
    }
}

/// Worker 0's figures since its previous progress event.
struct StepWindow {
    steps: u64,
    loss: f64,
    since: Instant,
    traffic: (u64, u64),
}

impl StepWindow {
    fn new(traffic: &Traffic) -> StepWindow {
        StepWindow { steps: 0, loss: 0.0, since: Instant::now(), traffic: (traffic.pushed, traffic.pulled) }
    }

    /// Adds step `done` of `steps` in `epoch` and, every 20 steps and at
    /// the epoch's last (so the launcher's bar ends full), sends progress
    /// with the window's figures.
    fn after_step(&mut self, ctx: &RoleCtx, loss: f64, (epoch, done, steps): (u32, usize, usize), traffic: &Traffic) {
        self.steps += 1;
        self.loss += loss;
        if done % 20 == 0 || done == steps {
            let global = u64::from(epoch - 1) * steps as u64 + done as u64;
            let synthetic = ctx.spec.model.kind == crate::job::spec::ModelKind::Synthetic;
            let batch = if synthetic { 1 } else { ctx.spec.training.batch_size };
            let scalars = self.take(global, &ctx.spec, batch, traffic);
            ctx.emit(Event::Progress { epoch, step: done as u64, steps: steps as u64, scalars: Some(scalars) });
        }
    }

    /// The figures up to global step `global`, and a fresh window.
    fn take(&mut self, global: u64, spec: &crate::job::spec::JobSpec, batch: usize, traffic: &Traffic) -> StepScalars {
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        let scalars = StepScalars {
            global_step: global,
            train_loss: self.loss / self.steps.max(1) as f64,
            // The f32 rate as written (0.1, not 0.10000000149).
            lr: spec.optimizer.lr_at(global).to_string().parse().unwrap_or(f64::NAN),
            samples_per_s: (self.steps as usize * batch) as f64 / secs,
            bytes_pushed: traffic.pushed - self.traffic.0,
            bytes_pulled: traffic.pulled - self.traffic.1,
        };
        *self = StepWindow::new(traffic);
        scalars
    }
}

/// Runs worker `ctx.me().rank` with its data until training is done.
pub async fn run(ctx: RoleCtx, data: WorkerData) -> Result<(), RoleError> {
    let WorkerData { train, test, steps } = data;
    let mut sched = ctx.scheduler_link().await?;
    let resumed_at = super::await_start(&mut sched, ctx.resume).await?;
    ctx.emit(Event::Started);
    let chunk_floats = ctx.spec.training.chunk_floats();
    let mut links: Vec<Link> =
        ctx.connect_servers().await?.into_iter().map(|(conn, range)| Link::spawn(conn, range, chunk_floats)).collect();
    let spec = &ctx.spec;
    let mode = spec.training.mode;
    let compression = spec.training.compression;
    let mut params = vec![0.0f32; ctx.plan.num_params];
    let mut traffic = Traffic::default();
    exchange(&mut links, &mut params, None, mode, compression, &mut traffic).await?;

    let rank = ctx.me().rank;
    let batch = spec.training.batch_size;
    let mut local = LocalStep::new(&ctx, &train, params.len());
    let synthetic = spec.model.kind == crate::job::spec::ModelKind::Synthetic;
    let started = Instant::now();
    let mut clock = CheckpointClock::of_worker(&ctx);
    // Resuming at global step R continues with step R % steps of epoch R / steps + 1.
    let first_epoch = (resumed_at / steps as u64) as u32 + 1;
    let mut window = StepWindow::new(&traffic);
    for epoch in first_epoch..=spec.training.epochs {
        let epoch_start = Instant::now();
        // The barrier, evaluation and checkpoint between epochs are not steps.
        window.since = epoch_start;
        let before = (traffic.pushed, traffic.pulled);
        let order = epoch_order(ctx.seed, rank, epoch, train.len());
        let mut loss_sum = 0.0f64;
        let first_step = if epoch == first_epoch { (resumed_at % steps as u64) as usize } else { 0 };
        for step in first_step..steps {
            let loss = f64::from(local.gradient(&ctx, &train, &params, &order, (epoch, step))?);
            loss_sum += loss;
            let grad: Gradient = local.grad.clone();
            exchange(&mut links, &mut params, Some(&grad), mode, compression, &mut traffic).await?;
            let global = u64::from(epoch - 1) * steps as u64 + step as u64 + 1;
            if let Some(clock) = clock.as_mut()
                && clock.due(global)
            {
                request_checkpoint(&mut links, &mut sched, global).await?;
            }
            if rank == 0 && ctx.finish.load(std::sync::atomic::Ordering::Relaxed) {
                return keep_work(&ctx, &params, global).await;
            }
            if rank == 0 {
                window.after_step(&ctx, loss, (epoch, step + 1, steps), &traffic);
            }
        }
        let secs = epoch_start.elapsed().as_secs_f64();
        let ran = (steps - first_step).max(1);
        ctx.emit(Event::Epoch {
            epoch,
            train_loss: loss_sum / ran as f64,
            steps: ran as u64,
            samples_per_s: (ran * if synthetic { 1 } else { batch }) as f64 / secs.max(1e-9),
            bytes_pushed: traffic.pushed - before.0,
            bytes_pulled: traffic.pulled - before.1,
        });
        barrier(&mut sched, epoch).await?;
        if let Some(test) = &test {
            // After the barrier every push of the epoch is in: evaluate the result.
            exchange(&mut links, &mut params, None, mode, compression, &mut traffic).await?;
            let (test_loss, test_accuracy) = evaluate(&ctx, &mut local.ws, &params, test);
            ctx.emit(Event::Eval { epoch, test_loss, test_accuracy });
        } else if synthetic && rank == 0 {
            ctx.emit(Event::Eval { epoch, test_loss: 0.0, test_accuracy: 0.0 });
        }
    }
    tracing::info!("trained {} epochs in {:.1}s", spec.training.epochs, started.elapsed().as_secs_f64());
    close_links(links).await;
    finish(&ctx, &mut sched, &params, u64::from(spec.training.epochs) * steps as u64).await
}

/// A requested stop, on worker 0 after step `step`: the weights it holds
/// (every worker's pushes of that step applied, as in sync mode they are
/// when the pull returns) become the model. The links stay open, so that
/// no peer takes the stop for a failure; the launcher stops every process
/// once it has fetched the model.
async fn keep_work(ctx: &RoleCtx, params: &[f32], step: u64) -> Result<(), RoleError> {
    tracing::info!("stopping on request: saving the weights after step {step}");
    save_model(ctx, params, step)?;
    std::future::pending().await
}

/// Worker 0 writes the model and says where.
fn save_model(ctx: &RoleCtx, params: &[f32], step: u64) -> Result<(), RoleError> {
    let dir = ctx.workdir.join("model");
    crate::store::artifact::write_model_at(&dir, &ctx.spec.model, params, ctx.seed, step)
        .map_err(|e| RoleError::new(format!("cannot write the model: {e}")))?;
    ctx.emit(Event::Model { path: dir, step: Some(step) });
    Ok(())
}

/// The end-of-epoch barrier: every worker's pushes of `epoch` are in.
async fn barrier(sched: &mut super::SchedLink, epoch: u32) -> Result<(), RoleError> {
    sched.send(&Message::Barrier { id: u64::from(epoch) }).await?;
    match sched.recv().await? {
        Message::BarrierDone { id } if id == u64::from(epoch) => Ok(()),
        Message::Abort { reason } => Err(RoleError::aborted(&reason)),
        m => Err(RoleError::new(format!("unexpected `{}` from the scheduler at a barrier", m.name()))),
    }
}

/// After training: worker 0 writes the model and says where; every worker
/// says it finished and waits for the scheduler's shutdown.
async fn finish(ctx: &RoleCtx, sched: &mut super::SchedLink, params: &[f32], step: u64) -> Result<(), RoleError> {
    if ctx.me().rank == 0 {
        save_model(ctx, params, step)?;
    }
    sched.send(&Message::Finished).await?;
    match sched.recv_or_closed().await? {
        Some(Message::Shutdown) | None => Ok(()),
        Some(Message::Abort { reason }) => Err(RoleError::aborted(&reason)),
        Some(m) => Err(RoleError::new(format!("unexpected `{}` from the scheduler at the end", m.name()))),
    }
}

/// Copies the samples `picked` of `train` into the batch buffers.
fn fill_batch(train: &Dataset, picked: &[usize], xb: &mut [f32], yb: &mut [u8]) {
    let f = train.features;
    for (j, &i) in picked.iter().enumerate() {
        xb[j * f..(j + 1) * f].copy_from_slice(&train.x[i * f..(i + 1) * f]);
        yb[j] = train.y[i];
    }
}

/// Mean test loss and accuracy.
fn evaluate(ctx: &RoleCtx, ws: &mut Workspace, params: &[f32], test: &Dataset) -> (f64, f64) {
    let f = test.features;
    let (mut loss, mut correct) = (0.0, 0);
    for start in (0..test.len()).step_by(1024) {
        let end = (start + 1024).min(test.len());
        let (l, c) =
            ws.evaluate(&ctx.spec.model, params, &Batch { x: &test.x[start * f..end * f], y: &test.y[start..end] });
        loss += l;
        correct += c;
    }
    let n = test.len().max(1) as f64;
    (loss / n, correct as f64 / n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn checkpoints_fall_due_by_steps_and_by_time() {
        let mut by_steps = CheckpointClock { every_steps: Some(20), every: None, last: Instant::now() };
        let due: Vec<u64> = (1..=100).filter(|s| by_steps.due(*s)).collect();
        assert_eq!(due, vec![20, 40, 60, 80, 100]);

        let long_ago = Instant::now() - Duration::from_secs(120);
        let mut by_time = CheckpointClock { every_steps: None, every: Some(Duration::from_secs(60)), last: long_ago };
        assert!(by_time.due(7), "a minute has passed since the last one");
        assert!(!by_time.due(8), "the clock restarts at each checkpoint");
        // Both: whichever comes first.
        let mut both =
            CheckpointClock { every_steps: Some(1000), every: Some(Duration::from_secs(60)), last: long_ago };
        assert!(both.due(3) && !both.due(4) && both.due(1000));
    }
}
