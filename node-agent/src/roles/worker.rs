//! A worker: reads its shard of the data, computes gradients, pushes them to
//! the servers and pulls the updated parameters.

use std::time::Instant;

use rand::seq::SliceRandom;

use super::{RoleCtx, RoleError};
use crate::conn::ClientConn;
use crate::control::Event;
use crate::data::{Dataset, load_idx};
use crate::identity::Role;
use crate::model::{Batch, Workspace};
use crate::spec::SyncMode;
use crate::train_rng::{Stream, rng};
use crate::wire::Message;

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
    let d = &ctx.spec.data;
    let m = &ctx.spec.model;
    let all = load_idx(&d.train_images, &d.train_labels, m.inputs, m.classes).map_err(|e| RoleError(e.to_string()))?;
    let workers = ctx.plan.count(Role::Worker) as usize;
    let train = all.shard(ctx.me().rank as usize, workers);
    let test = if ctx.me().rank == 0 {
        Some(load_idx(&d.test_images, &d.test_labels, m.inputs, m.classes).map_err(|e| RoleError(e.to_string()))?)
    } else {
        None
    };
    let min_shard = all.len() / workers;
    if min_shard < ctx.spec.training.batch_size {
        return Err(RoleError(format!(
            "each worker's shard has {min_shard} samples ({} samples / {workers} workers), fewer than batch_size = {}; lower batch_size or use fewer workers",
            all.len(),
            ctx.spec.training.batch_size
        )));
    }
    Ok(WorkerData { train, test, steps: min_shard / ctx.spec.training.batch_size })
}

struct ServerLink {
    conn: ClientConn,
    range: std::ops::Range<usize>,
    version: u64,
}

/// Runs worker `ctx.me().rank` with its data until training is done.
pub async fn run(ctx: RoleCtx, data: WorkerData) -> Result<(), RoleError> {
    let WorkerData { train, test, steps } = data;
    let mut sched = ctx.join_scheduler().await?;
    match sched.recv().await? {
        Message::Start => {}
        Message::Abort { reason } => return Err(RoleError(format!("the job was aborted: {reason}"))),
        m => return Err(RoleError(format!("unexpected `{}` from the scheduler", m.name()))),
    }
    ctx.emit(Event::Started);
    let mut links = Vec::new();
    for p in ctx.plan.of_role(Role::Server) {
        let conn = crate::conn::connect(
            &ctx.tls,
            ctx.plan.identity(Role::Server, p.rank),
            p.socket().expect("servers listen"),
            ctx.spec.limits.max_frame_bytes,
            ctx.patience(),
        )
        .await
        .map_err(|e| RoleError(format!("cannot reach {}: {e}", p.label())))?;
        links.push(ServerLink { conn, range: ctx.plan.shard(p.rank), version: 0 });
    }
    let mut params = vec![0.0f32; ctx.plan.num_params];
    pull_all(&mut links, &mut params, ctx.spec.training.mode, true).await?;

    let spec = &ctx.spec;
    let batch = spec.training.batch_size;
    let n_total = train.len();
    let f = train.features;
    let mut order: Vec<usize> = (0..n_total).collect();
    let mut grad = vec![0.0f32; params.len()];
    let mut xb = vec![0.0f32; batch * f];
    let mut yb = vec![0u8; batch];
    let mut ws = Workspace::default();
    let started = Instant::now();
    for epoch in 1..=spec.training.epochs {
        order.shuffle(&mut rng(ctx.seed, Stream::Shuffle { rank: ctx.me().rank, epoch }));
        let mut loss_sum = 0.0f64;
        for step in 0..steps {
            for (j, &i) in order[step * batch..(step + 1) * batch].iter().enumerate() {
                xb[j * f..(j + 1) * f].copy_from_slice(&train.x[i * f..(i + 1) * f]);
                yb[j] = train.y[i];
            }
            let loss = ws.loss_and_grad(&spec.model, &params, &Batch { x: &xb, y: &yb }, &mut grad);
            loss_sum += f64::from(loss);
            for link in links.iter_mut() {
                let data = grad[link.range.clone()].to_vec();
                link.conn.send(&Message::Push { step: link.version, data }).await?;
            }
            pull_all(&mut links, &mut params, spec.training.mode, false).await?;
            if ctx.me().rank == 0 && (step + 1) % 20 == 0 {
                ctx.emit(Event::Progress { epoch, step: step as u64 + 1, steps: steps as u64 });
            }
        }
        ctx.emit(Event::Epoch { epoch, train_loss: loss_sum / steps as f64, steps: steps as u64 });
        sched.send(&Message::Barrier { id: u64::from(epoch) }).await?;
        match sched.recv().await? {
            Message::BarrierDone { id } if id == u64::from(epoch) => {}
            Message::Abort { reason } => return Err(RoleError(format!("the job was aborted: {reason}"))),
            m => return Err(RoleError(format!("unexpected `{}` from the scheduler at a barrier", m.name()))),
        }
        if let Some(test) = &test {
            // After the barrier every push of this epoch is applied: pull the result.
            if spec.training.mode == SyncMode::Async {
                pull_all(&mut links, &mut params, SyncMode::Async, true).await?;
            }
            let acc = accuracy(&ctx, &mut ws, &params, test);
            ctx.emit(Event::Eval { epoch, test_accuracy: acc });
        }
    }
    tracing::info!("trained {} epochs in {:.1}s", spec.training.epochs, started.elapsed().as_secs_f64());
    if ctx.me().rank == 0 {
        let dir = ctx.workdir.join("model");
        crate::artifact::write_model(&dir, &spec.model, &params, ctx.seed)
            .map_err(|e| RoleError(format!("cannot write the model: {e}")))?;
        ctx.emit(Event::Model { path: dir });
    }
    sched.send(&Message::Finished).await?;
    match sched.recv().await {
        Ok(Message::Shutdown) | Err(crate::conn::ConnError::Closed(_)) => Ok(()),
        Ok(Message::Abort { reason }) => Err(RoleError(format!("the job was aborted: {reason}"))),
        Ok(m) => Err(RoleError(format!("unexpected `{}` from the scheduler at the end", m.name()))),
        Err(e) => Err(e.into()),
    }
}

/// Asks every server for its shard (at the next version in sync mode) and
/// copies the answers into `params`.
async fn pull_all(
    links: &mut [ServerLink],
    params: &mut [f32],
    mode: SyncMode,
    initial: bool,
) -> Result<(), RoleError> {
    for link in links.iter_mut() {
        let min_version = if initial || mode == SyncMode::Async { 0 } else { link.version + 1 };
        link.conn.send(&Message::Pull { min_version }).await?;
    }
    for link in links.iter_mut() {
        match link.conn.recv().await? {
            Message::Params { version, data } if data.len() == link.range.len() => {
                params[link.range.clone()].copy_from_slice(&data);
                link.version = version;
            }
            Message::Params { data, .. } => {
                return Err(RoleError(format!(
                    "server sent {} values for a shard of {}",
                    data.len(),
                    link.range.len()
                )));
            }
            m => return Err(RoleError(format!("unexpected `{}` from a server", m.name()))),
        }
    }
    Ok(())
}

fn accuracy(ctx: &RoleCtx, ws: &mut Workspace, params: &[f32], test: &Dataset) -> f64 {
    let f = test.features;
    let mut correct = 0;
    for start in (0..test.len()).step_by(1024) {
        let end = (start + 1024).min(test.len());
        correct +=
            ws.correct(&ctx.spec.model, params, &Batch { x: &test.x[start * f..end * f], y: &test.y[start..end] });
    }
    correct as f64 / test.len().max(1) as f64
}
