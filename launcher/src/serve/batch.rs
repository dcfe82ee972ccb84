//! Forward passes with the requests that arrived meanwhile taken together:
//! a single input reads every weight once (800 KB for the 784-256-10 MLP,
//! beyond L2), so a batch of k costs little more than one. Nothing waits
//! for a batch to fill: a request that finds no pass running starts one.
//!
//! The passes run in a tokio task (the "combiner"), not a thread of their
//! own: handing each request to a sleeping thread and waking its task from
//! there cost two cross-thread wake-ups per request, about 5% of the
//! machine at 15k requests/s (docs/benchmarks.md). The combiner lives while
//! requests keep coming: after each pass it yields, so the connections on
//! its worker get read and their inputs join the next pass, and it ends
//! when a pass finds nothing queued. A pass blocks the worker it runs on
//! (at most [`ForwardQueue::MAX_ROWS`] rows, about a millisecond on the
//! development machine); the other workers carry on meanwhile.

use std::sync::{Arc, Mutex, MutexGuard};

use warden_agent::job::spec::ModelSpec;
use warden_agent::train::model::{Predictor, Workspace};

/// Where requests queue their inputs for the next forward pass.
pub(super) struct ForwardQueue {
    combiner: Arc<Combiner>,
}

/// The model, and the queue its passes take their inputs from.
struct Combiner {
    model: Predictor,
    // A std mutex, not a tokio one: it is never held across an await.
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<PendingForward>,
    /// A combiner task is running (it will see every input queued).
    running: bool,
    /// The forward pass's buffers, kept between combiner tasks.
    workspace: Option<Workspace>,
}

/// One request's inputs waiting for a pass, and where its answer goes.
struct PendingForward {
    x: Vec<f32>,
    rows: usize,
    reply: tokio::sync::oneshot::Sender<Vec<f32>>,
}

impl ForwardQueue {
    /// Rows in one forward pass at most (more wait for the next pass).
    pub(super) const MAX_ROWS: usize = 256;

    pub(super) fn start(model: ModelSpec, params: Vec<f32>) -> ForwardQueue {
        let model = Predictor::new(model, params);
        ForwardQueue { combiner: Arc::new(Combiner { model, queue: Mutex::default() }) }
    }

    /// The class probabilities of `rows` inputs (row after row), or `None`
    /// if the forward pass failed.
    pub(super) async fn predict(&self, x: Vec<f32>, rows: usize) -> Option<Vec<f32>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            // Not bounded here: HTTP/1 answers a connection's requests in
            // turn, so the queue holds at most one request per connection
            // (at most max_connections), inputs that are in memory anyway.
            let mut q = self.combiner.lock();
            q.pending.push(PendingForward { x, rows, reply });
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            let combiner = self.combiner.clone();
            tokio::spawn(async move { combiner.run().await });
        }
        answer.await.ok()
    }
}

impl Combiner {
    async fn run(&self) {
        // Should a pass panic, the guard ends this combiner cleanly: the
        // queued requests get their senders dropped (503), and the next
        // request starts a new combiner.
        struct Stop<'a>(&'a Mutex<Queue>);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
                q.running = false;
                q.pending.clear();
            }
        }
        let stop = Stop(&self.queue);
        let mut ws = self.lock().workspace.take().unwrap_or_default();
        let (mut batch, mut flat) = (Vec::new(), Vec::new());
        loop {
            {
                let mut q = self.lock();
                if q.pending.is_empty() {
                    q.running = false;
                    q.workspace = Some(ws);
                    std::mem::forget(stop);
                    return;
                }
                let mut rows = 0;
                let take = q.pending.iter().take_while(|p| {
                    let first = rows == 0;
                    rows += p.rows;
                    first || rows <= ForwardQueue::MAX_ROWS
                });
                let n = take.count();
                batch.extend(q.pending.drain(..n));
            }
            self.pass(&mut ws, &mut batch, &mut flat);
            tokio::task::yield_now().await;
        }
    }

    /// One forward pass over `batch`, each request answered with its rows.
    fn pass(&self, ws: &mut Workspace, batch: &mut Vec<PendingForward>, flat: &mut Vec<f32>) {
        let rows = batch.iter().map(|p| p.rows).sum();
        let probs = if let [one] = &batch[..] {
            self.model.predict(ws, &one.x, rows)
        } else {
            flat.clear();
            for p in batch.iter() {
                flat.extend_from_slice(&p.x);
            }
            self.model.predict(ws, flat, rows)
        };
        let mut at = 0;
        for p in batch.drain(..) {
            let len = p.rows * self.model.spec().classes;
            let _ = p.reply.send(probs[at..at + len].to_vec());
            at += len;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many requests at once, each batched with whatever else was queued:
    /// every one must get its own input's probabilities, bit for bit.
    #[test]
    fn concurrent_requests_each_get_their_own_answer() {
        let spec = ModelSpec::mlp(784, vec![256], 10);
        let params = warden_agent::train::model::init(&spec, 5);
        let input = |r: usize, rows: usize| -> Vec<f32> {
            (0..rows * 784).map(|i| ((i * 31 + r * 97) % 255) as f32 / 255.0).collect()
        };
        let alone = Predictor::new(spec.clone(), params.clone());
        let mut ws = Workspace::default();
        let queue = Arc::new(ForwardQueue::start(spec, params));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("a runtime");
        let answers = runtime.block_on(async {
            let tasks: Vec<_> = (0..200)
                .map(|r| {
                    let q = queue.clone();
                    // Mostly single inputs, some batches of up to 5.
                    let rows = if r % 7 == 0 { 1 + r % 5 } else { 1 };
                    tokio::spawn(async move { (r, rows, q.predict(input(r, rows), rows).await) })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.push(t.await.expect("the request task"));
            }
            all
        });
        for (r, rows, got) in answers {
            let got = got.expect("an answer");
            let want = alone.predict(&mut ws, &input(r, rows), rows);
            assert_eq!(got.len(), rows * 10, "request {r}");
            assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "request {r} got another answer");
        }
        // The combiner ends when the queue is empty and is started again.
        let again = runtime.block_on(queue.predict(input(7, 1), 1)).expect("an answer");
        assert_eq!(again, alone.predict(&mut ws, &input(7, 1), 1));
    }
}
