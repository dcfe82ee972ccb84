//! Training figures as they come in, where people look for them:
//! `steps.csv` and TensorBoard event files (`tensorboard/`) in the run
//! directory, and the Prometheus text that `launch --metrics-listen` serves.
//!
//! Step-level figures are worker 0's, every 20 steps and at each epoch's
//! end (its loss, learning rate, samples/s and bytes moved); epoch-level
//! ones are the job's (`metrics.csv`'s row). Writing them never fails a
//! job: a file that cannot be written is reported once and left out.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

use warden_agent::net::control::StepScalars;

use crate::rundir::EpochRow;
use crate::tensorboard::EventWriter;

/// The header of `steps.csv`.
pub const STEPS_HEADER: &str = "step,epoch,wall_time,elapsed_s,train_loss,lr,samples_per_s,bytes_pushed,bytes_pulled\n";

/// Where a run's figures go, shared by every attempt and the metrics
/// endpoint.
#[derive(Debug)]
pub struct Telemetry {
    job: String,
    epochs: u32,
    started: std::time::Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    steps_csv: Option<std::fs::File>,
    tensorboard: Option<EventWriter>,
    last_step: Option<(u32, StepScalars)>,
    last_epoch: Option<EpochRow>,
    /// Steps of the epochs so far: where an epoch's points go when no
    /// step figures came (a program of the user's).
    epoch_steps: u64,
    bytes_pushed: u64,
    bytes_pulled: u64,
    /// Suspect-worker events so far.
    suspects: u64,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Telemetry {
    /// Starts `steps.csv` and the TensorBoard event file in `run_dir`
    /// (`None`: only the metrics endpoint's figures are kept).
    pub fn new(run_dir: Option<&Path>, job: &str, epochs: u32) -> Telemetry {
        let mut inner = Inner::default();
        if let Some(dir) = run_dir {
            let csv = std::fs::File::create(dir.join("steps.csv"))
                .and_then(|mut f| f.write_all(STEPS_HEADER.as_bytes()).map(|()| f));
            match csv {
                Ok(f) => inner.steps_csv = Some(f),
                Err(e) => tracing::warn!("cannot write steps.csv: {e}"),
            }
            match EventWriter::create(&dir.join("tensorboard"), unix_now()) {
                Ok(w) => inner.tensorboard = Some(w),
                Err(e) => tracing::warn!("cannot write TensorBoard events: {e}"),
            }
        }
        Telemetry { job: job.to_string(), epochs, started: std::time::Instant::now(), inner: Mutex::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Worker 0's figures up to `s.global_step`, in epoch `epoch`.
    pub fn step(&self, epoch: u32, s: &StepScalars) {
        let (wall, elapsed) = (unix_now(), self.started.elapsed().as_secs_f64());
        let mut inner = self.lock();
        inner.bytes_pushed += s.bytes_pushed;
        inner.bytes_pulled += s.bytes_pulled;
        inner.last_step = Some((epoch, *s));
        if let Some(f) = inner.steps_csv.as_mut() {
            let line = format!(
                "{},{epoch},{wall:.3},{elapsed:.3},{:.6},{:.6e},{:.1},{},{}\n",
                s.global_step, s.train_loss, s.lr, s.samples_per_s, s.bytes_pushed, s.bytes_pulled
            );
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::warn!("cannot write steps.csv: {e}");
                inner.steps_csv = None;
            }
        }
        let values = [
            ("train/loss", s.train_loss),
            ("train/learning_rate", s.lr),
            ("train/samples_per_s", s.samples_per_s),
            ("train/bytes_pushed", s.bytes_pushed as f64),
            ("train/bytes_pulled", s.bytes_pulled as f64),
        ];
        inner.write_tensorboard(wall, s.global_step, &values);
    }

    /// A server found a worker suspect.
    pub fn suspect(&self) {
        self.lock().suspects += 1;
    }

    /// A complete epoch (the job's figures, `metrics.csv`'s row).
    pub fn epoch(&self, row: &EpochRow) {
        let mut inner = self.lock();
        inner.epoch_steps += row.steps;
        let step = inner.last_step.map_or(inner.epoch_steps, |(_, s)| s.global_step);
        inner.last_epoch = Some(row.clone());
        let values = [
            ("epoch/train_loss", row.train_loss),
            ("epoch/test_loss", row.test_loss),
            ("epoch/test_accuracy", row.test_accuracy),
            ("epoch/samples_per_s", row.samples_per_s),
            ("epoch/epoch", f64::from(row.epoch)),
        ];
        inner.write_tensorboard(unix_now(), step, &values);
    }

    /// The figures in Prometheus' text format, labelled `warden_job` (not
    /// `job`, which Prometheus sets to the scrape job's name).
    pub fn prometheus(&self) -> String {
        let inner = self.lock();
        let job = self.job.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = String::new();
        let step = inner.last_step.map(|(_, s)| s);
        let epoch = inner.last_epoch.as_ref();
        let (gauge, counter) = ("gauge", "counter");
        let figures: [(&str, &str, &str, Option<f64>); 13] = [
            ("warden_step", gauge, "Global step worker 0 reached.", step.map(|s| s.global_step as f64)),
            ("warden_epochs", gauge, "Epochs the job file asks for.", Some(f64::from(self.epochs))),
            ("warden_epoch", gauge, "Epoch under way.", inner.last_step.map(|(e, _)| f64::from(e))),
            ("warden_train_loss", gauge, "Worker 0's recent mean training loss.", step.map(|s| s.train_loss)),
            ("warden_learning_rate", gauge, "Learning rate of the last step.", step.map(|s| s.lr)),
            ("warden_samples_per_second", gauge, "Worker 0's samples per second.", step.map(|s| s.samples_per_s)),
            ("warden_worker0_pushed_bytes_total", counter, "Bytes worker 0 pushed.", Some(inner.bytes_pushed as f64)),
            ("warden_worker0_pulled_bytes_total", counter, "Bytes worker 0 pulled.", Some(inner.bytes_pulled as f64)),
            ("warden_epoch_train_loss", gauge, "Last epoch's mean training loss.", epoch.map(|r| r.train_loss)),
            ("warden_test_loss", gauge, "Test loss after the last epoch.", epoch.map(|r| r.test_loss)),
            ("warden_test_accuracy", gauge, "Test accuracy after the last epoch.", epoch.map(|r| r.test_accuracy)),
            ("warden_elapsed_seconds", gauge, "Seconds since the launch.", Some(self.started.elapsed().as_secs_f64())),
            (
                "warden_suspect_worker_events_total",
                counter,
                "Times a server found a worker's gradients standing out ([training] suspect_ratio).",
                Some(inner.suspects as f64),
            ),
        ];
        for (name, kind, help, value) in figures {
            if let Some(v) = value.filter(|v| v.is_finite()) {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{warden_job=\"{job}\"}} {v}");
            }
        }
        out
    }
}

impl Inner {
    fn write_tensorboard(&mut self, wall: f64, step: u64, values: &[(&str, f64)]) {
        if let Some(w) = self.tensorboard.as_mut()
            && let Err(e) = w.scalars(wall, step, values)
        {
            tracing::warn!("cannot write TensorBoard events to {}: {e}", w.path().display());
            self.tensorboard = None;
        }
    }
}

/// Serves `telemetry` as Prometheus text at `GET /metrics` on `listener`
/// (plain HTTP: the figures are training progress, no secrets, and the
/// address is loopback unless the user names another) until dropped.
pub async fn serve_metrics(listener: tokio::net::TcpListener, telemetry: std::sync::Arc<Telemetry>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: wait rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let telemetry = telemetry.clone();
                async move {
                    let (status, body) = if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
                        (hyper::StatusCode::OK, telemetry.prometheus())
                    } else {
                        (hyper::StatusCode::NOT_FOUND, "only GET /metrics is served here\n".to_string())
                    };
                    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_epochs_become_csv_rows_and_prometheus_text() {
        let dir = tempfile::tempdir().unwrap();
        let t = Telemetry::new(Some(dir.path()), "lab\"job", 5);
        let s = StepScalars {
            global_step: 20,
            train_loss: 0.75,
            lr: 0.1,
            samples_per_s: 1000.0,
            bytes_pushed: 4096,
            bytes_pulled: 8192,
        };
        t.step(1, &s);
        t.step(1, &StepScalars { global_step: 40, ..s });
        let csv = std::fs::read_to_string(dir.path().join("steps.csv")).unwrap();
        assert!(csv.starts_with(STEPS_HEADER), "{csv}");
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.lines().nth(2).unwrap().starts_with("40,1,"), "{csv}");
        let text = t.prometheus();
        assert!(text.contains("warden_step{warden_job=\"lab\\\"job\"} 40\n"), "{text}");
        assert!(text.contains("warden_worker0_pushed_bytes_total{warden_job=\"lab\\\"job\"} 8192\n"), "{text}");
        assert!(!text.contains("warden_test_accuracy"), "no epoch yet: {text}");
        let tb = std::fs::read_dir(dir.path().join("tensorboard")).unwrap().count();
        assert_eq!(tb, 1);
    }
}
