//! Watching one attempt: its processes' events become progress, metrics
//! rows, checkpoints and the model; exits and broken channels become
//! failures, each of which stops the others; a requested stop keeps the work.

use super::*;

/// Watching one attempt: its processes' events become progress, metrics
/// rows, checkpoints and the model; exits and broken channels become
/// failures, each of which stops the others.
pub(super) struct Watch<'w, 'a> {
    pub(super) ctx: &'w AttemptCtx<'a>,
    pub(super) logs: &'w Path,
    /// Plan index -> position in the attempt's processes.
    pub(super) index: BTreeMap<usize, usize>,
    pub(super) set_up: &'w BTreeMap<String, Option<u32>>,
    pub(super) workers: usize,
    pub(super) epochs: BTreeMap<u32, EpochParts>,
    pub(super) model_at: Option<(usize, PathBuf)>,
    pub(super) model_fetched: bool,
    /// The training step of the model's weights, as worker 0 said.
    pub(super) model_step: Option<u64>,
    /// A requested stop waits until then for worker 0 to save the model.
    pub(super) finish_by: Option<tokio::time::Instant>,
    pub(super) resumed_step: Option<u64>,
    pub(super) started_count: usize,
    pub(super) enrolled: usize,
    pub(super) startup_s: Option<f64>,
}

impl<'w, 'a> Watch<'w, 'a> {
    pub(super) fn new(
        ctx: &'w AttemptCtx<'a>,
        logs: &'w Path,
        index: BTreeMap<usize, usize>,
        set_up: &'w BTreeMap<String, Option<u32>>,
    ) -> Self {
        Watch {
            ctx,
            logs,
            index,
            set_up,
            workers: ctx.plan.count(Role::Worker) as usize,
            epochs: BTreeMap::new(),
            model_at: None,
            model_fetched: false,
            model_step: None,
            finish_by: None,
            resumed_step: None,
            started_count: 0,
            enrolled: 0,
            startup_s: None,
        }
    }

    /// Stops every process; from now on what they say stays in their logs.
    pub(super) async fn stop_all(&self, procs: &mut [Proc]) {
        self.ctx.progress.hush();
        stop_all(procs).await;
    }

    pub(super) fn uid_of(&self, host: &str) -> Option<u32> {
        uid_of(self.ctx.plan, self.set_up, host)
    }

    /// Until every process has exited (or every report sender is gone).
    pub(super) async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Report>,
        procs: &mut [Proc],
        failure: &mut Failures,
        acc: &mut Accumulated,
        signals: &mut Signals,
    ) -> Result<(), LaunchError> {
        while procs.iter().any(|p| p.exit.is_none()) {
            let finish_by = self.finish_by;
            let report = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => break },
                why = signals.stops.next() => {
                    self.on_stop_request(why.to_string(), procs, failure, &mut signals.stopping).await;
                    continue;
                }
                // Guarded: a completed future must not be polled again.
                _ = &mut signals.deadline, if !signals.timed_out => {
                    signals.timed_out = true;
                    let why = format!("the job ran longer than max_hours = {}", self.ctx.spec.max_hours);
                    self.on_stop_request(why, procs, failure, &mut signals.stopping).await;
                    continue;
                }
                _ = tokio::time::sleep_until(finish_by.unwrap_or_else(tokio::time::Instant::now)), if finish_by.is_some() => {
                    self.finish_by = None;
                    self.ctx.progress.println(&format!(
                        "warden: worker[0] did not save the model within {}s; stopping without it",
                        FINISH_GRACE.as_secs()
                    ));
                    self.stop_all(procs).await;
                    continue;
                }
            };
            // Plan index -> position in `procs`.
            let report = match report {
                Report::Event(i, e) => self.index.get(&i).map(|k| Report::Event(*k, e)),
                Report::Exited(i, c) => self.index.get(&i).map(|k| Report::Exited(*k, c)),
                Report::Broken(i, w) => self.index.get(&i).map(|k| Report::Broken(*k, w)),
            };
            match report {
                Some(Report::Event(i, ev)) => self.on_event(i, ev, procs, failure, acc).await,
                Some(Report::Exited(i, code)) => self.on_exit(i, code, procs, failure).await,
                Some(Report::Broken(i, why)) => self.on_broken(i, why, procs, failure).await,
                None => continue,
            }
            self.complete_epochs(acc)?;
            self.fetch_model(procs, failure).await;
            if self.finish_by.is_some() && self.model_fetched {
                // The work is kept: now the job stops.
                self.finish_by = None;
                self.stop_all(procs).await;
            }
        }
        Ok(())
    }

    /// A stop was requested (a signal, `warden stop`, `max_hours`). The
    /// first keeps the work where it can: worker 0 finishes the step under
    /// way and saves the model, which is fetched before every process is
    /// stopped. A second stops at once.
    pub(super) async fn on_stop_request(
        &mut self,
        why: String,
        procs: &mut [Proc],
        failure: &mut Failures,
        stopping: &mut bool,
    ) {
        if std::mem::replace(stopping, true) {
            self.ctx.progress.println(&format!("warden: {why} again: stopping at once"));
            self.finish_by = None;
            self.stop_all(procs).await;
            return;
        }
        let healthy = failure.is_none();
        failure.add(Cause::Stopped, why.clone());
        let worker0 = procs.iter().find(|p| p.planned.role == Role::Worker && p.planned.rank == 0 && p.exit.is_none());
        let keeps_work = healthy && !self.model_fetched && self.ctx.spec.model.kind != ModelKind::External;
        if let (true, Some(w)) = (keeps_work, worker0)
            && send_control(&w.stdin, &Control::Finish).await.is_ok()
        {
            self.ctx.progress.println(&format!(
                "warden: {why}: finishing the step under way and saving the model (a second Ctrl-C stops at once)"
            ));
            self.finish_by = Some(tokio::time::Instant::now() + FINISH_GRACE);
        } else {
            self.stop_all(procs).await;
        }
    }

    pub(super) async fn on_event(
        &mut self,
        i: usize,
        ev: Event,
        procs: &mut [Proc],
        failure: &mut Failures,
        acc: &mut Accumulated,
    ) {
        match ev {
            Event::Progress { epoch, step, steps, scalars } => {
                self.ctx.progress.step(epoch, self.ctx.spec.training.epochs, step, steps);
                if let Some(s) = scalars {
                    self.ctx.telemetry.step(epoch, &s);
                }
            }
            Event::Epoch { epoch, train_loss, steps, samples_per_s, bytes_pushed, bytes_pulled } => {
                self.epochs.entry(epoch).or_default().add(train_loss, steps, samples_per_s, bytes_pushed, bytes_pulled)
            }
            Event::Eval { epoch, test_loss, test_accuracy } => {
                self.epochs.entry(epoch).or_default().eval = Some((test_loss, test_accuracy))
            }
            // Only the job's own model directory, whatever the event says.
            Event::Model { path, step } if path == self.ctx.transport.workdir(&procs[i].planned).join("model") => {
                self.model_at = Some((i, path));
                self.model_step = step;
            }
            Event::Model { path, .. } => {
                let label = procs[i].planned.label();
                let message = format!("{label}: named {} as its model, not its own model directory", path.display());
                failure.add(Cause::Reported, message);
                self.stop_all(procs).await;
            }
            Event::Checkpoint { step, bytes } => self.on_checkpoint(step, bytes, acc),
            Event::Resumed { step } => self.on_resumed(step, acc),
            Event::Failed { message, follows } => {
                procs[i].failed = true;
                let cause = if follows { Cause::Follows } else { Cause::Reported };
                // A process that failed by itself (a user program, say) may have said why in its log.
                let log = (!follows).then(|| self.logs.join(log_name(&procs[i].planned)));
                failure.add_with_log(cause, format!("{}: {message}", procs[i].planned.label()), log);
                self.stop_all(procs).await;
            }
            Event::SuspectWorker { worker, ratio, steps, step } => {
                let server = procs[i].planned.label();
                let text = warden_agent::net::control::suspect_text(&server, worker, ratio, steps, step);
                self.ctx.progress.println(&format!("warning: {text}"));
                self.ctx.telemetry.suspect();
                acc.suspects.push(crate::rundir::SuspectRow { worker, server, ratio, steps, step });
            }
            Event::Warning { message } => {
                if acc.warnings.insert(message.clone()) {
                    self.ctx.progress.println(&format!("warning: {message}"));
                }
            }
            Event::Started => self.on_started(procs.len()),
            Event::Csr { .. } => self.on_enrolled(procs.len()),
            Event::Process { pid, start } => procs[i].group = Some((pid, start)),
            Event::Done | Event::Listening { .. } => {}
        }
    }

    pub(super) fn on_checkpoint(&mut self, step: u64, bytes: u64, acc: &mut Accumulated) {
        if self.ctx.epoch_lines {
            self.ctx.progress.println(&format!(
                "  checkpoint at step {step}: {:.1} MB, encrypted, on the servers' hosts",
                bytes as f64 / 1e6
            ));
        }
        acc.saved.push(crate::rundir::CheckpointRow { step, bytes });
    }

    pub(super) fn on_resumed(&mut self, step: u64, acc: &mut Accumulated) {
        if self.ctx.epoch_lines {
            self.ctx.progress.println(&format!("  resuming from checkpoint step {step}"));
        }
        self.resumed_step = Some(step);
        acc.resumed = true;
        acc.resumed_step = Some(step);
        acc.first_resumed_step.get_or_insert(step);
    }

    /// One more process started; once all of `total` have, the start-up time is known.
    pub(super) fn on_started(&mut self, total: usize) {
        self.started_count += 1;
        self.ctx.progress.phase(&format!("started {}/{} processes", self.started_count, total));
        if self.started_count == total && self.startup_s.is_none() {
            let at = self.ctx.started.elapsed().as_secs_f64();
            self.startup_s = Some(at);
            if self.ctx.epoch_lines {
                self.ctx
                    .progress
                    .println(&format!("  {n}/{n} processes started ({at:.2}s); training", n = self.started_count));
            }
        }
    }

    /// One more process sent its CSR (answered as it arrived, in [`start_one`]).
    pub(super) fn on_enrolled(&mut self, total: usize) {
        self.enrolled += 1;
        self.ctx.progress.phase(&format!("enrolled {}/{} processes", self.enrolled, total));
        if self.enrolled == total && self.ctx.epoch_lines {
            self.ctx.progress.println(&format!(
                "  {n}/{n} processes enrolled: keys made on their hosts, certificates from this job's CA ({:.2}s)",
                self.ctx.started.elapsed().as_secs_f64(),
                n = self.enrolled
            ));
        }
    }

    pub(super) async fn on_exit(&mut self, i: usize, code: Option<i32>, procs: &mut [Proc], failure: &mut Failures) {
        procs[i].exit = Some(code);
        // A process that said why it failed has been counted already.
        if code != Some(0) && !procs[i].failed {
            let label = procs[i].planned.label();
            let log = self.logs.join(log_name(&procs[i].planned));
            let signal = killed_by(code);
            let what = match (code, signal) {
                (_, Some(Some(n))) => format!("{label} was killed by a signal ({n})"),
                (Some(c), None) => format!("{label} exited with status {c}"),
                (None, _) | (_, Some(None)) => format!("{label} was killed by a signal"),
            };
            // A signal is news even while stopping (the launcher sends
            // none in the grace period); a plain non-zero exit after
            // the stop is just the process obeying it.
            let cause = if signal.is_some() || failure.is_none() { Cause::Crashed } else { Cause::Stopping };
            failure.add_with_log(cause, what, Some(log));
            self.stop_all(procs).await;
        }
    }

    pub(super) async fn on_broken(&mut self, i: usize, why: String, procs: &mut [Proc], failure: &mut Failures) {
        // A channel that breaks once the job is stopping is the stop's doing.
        let cause = if failure.is_none() { Cause::Broken } else { Cause::Stopping };
        failure.add(cause, format!("{}: {why}", procs[i].planned.label()));
        self.stop_all(procs).await;
    }

    /// Complete epochs become metrics rows, in order.
    pub(super) fn complete_epochs(&mut self, acc: &mut Accumulated) -> Result<(), LaunchError> {
        while let Some((&epoch, parts)) = self.epochs.first_key_value() {
            if parts.losses.len() < self.workers {
                break;
            }
            // A program of the user's may report no test figures (they come
            // before its loss when it does); built-in workers always do.
            let external = self.ctx.spec.model.kind == warden_agent::job::spec::ModelKind::External;
            let (test_loss, test_accuracy) = match parts.eval {
                Some(eval) => eval,
                None if external => (f64::NAN, f64::NAN),
                None => break,
            };
            let row = EpochRow {
                epoch,
                train_loss: parts.losses.iter().sum::<f64>() / parts.losses.len() as f64,
                test_loss,
                test_accuracy,
                steps: parts.steps,
                samples_per_s: parts.samples_per_s,
                slowest_worker_samples_per_s: parts.slowest.unwrap_or_default(),
                bytes_pushed: parts.bytes_pushed,
                bytes_pulled: parts.bytes_pulled,
                elapsed_s: self.ctx.started.elapsed().as_secs_f64(),
            };
            if self.ctx.epoch_lines {
                self.ctx.progress.println(&epoch_line(&row, self.ctx.spec.training.epochs));
            }
            self.warn_if_epochs_outlast_the_job(&row, acc);
            // After a restart, an epoch run again replaces what the failed attempt wrote.
            if acc.rows.last().is_some_and(|r| r.epoch >= row.epoch) {
                acc.rows.retain(|r| r.epoch < row.epoch);
                acc.rows.push(row);
                self.ctx.run.write_metrics(&acc.rows).map_err(|e| written(self.ctx.run, e))?;
            } else {
                self.ctx.run.append_metrics(&row).map_err(|e| written(self.ctx.run, e))?;
                acc.rows.push(row);
            }
            self.epochs.pop_first();
            if let Some(row) = acc.rows.last() {
                self.ctx.telemetry.epoch(row);
            }
            self.draw_plot(acc);
        }
        Ok(())
    }

    /// After this run's first epoch: if the epochs left at that pace end
    /// after `max_hours` (when the job's certificates expire and it is
    /// stopped), says so once, with what to change.
    fn warn_if_epochs_outlast_the_job(&self, row: &EpochRow, acc: &mut Accumulated) {
        let (total, max_hours) = (self.ctx.spec.training.epochs, self.ctx.spec.max_hours);
        let trained = acc.rows.len() + 1;
        if trained != 1 || row.epoch >= total {
            return;
        }
        let training_s = (row.elapsed_s - self.startup_s.unwrap_or(0.0)).max(1e-3);
        let needed = row.elapsed_s + training_s * f64::from(total - row.epoch);
        let limit = f64::from(max_hours) * 3600.0;
        if needed <= limit {
            return;
        }
        let message = format!(
            "at this pace the {total} epochs need about {:.1} h, but the job ends at {max_hours} h ([job] max_hours, \
             when its certificates expire); raise max_hours (at most 720) or lower [training] epochs, \
             and with [checkpoint] a stopped job can be resumed",
            needed / 3600.0
        );
        if acc.warnings.insert(message.clone()) && self.ctx.epoch_lines {
            self.ctx.progress.println(&format!("  warning: {message}"));
        }
    }

    /// Redraws `plot.png`: the resumed run's epochs before this run's
    /// first, then this run's (synthetic jobs have nothing to plot).
    fn draw_plot(&self, acc: &Accumulated) {
        if self.ctx.spec.model.kind == warden_agent::job::spec::ModelKind::Synthetic {
            return;
        }
        let first = acc.rows.first().map_or(u32::MAX, |r| r.epoch);
        let earlier: Vec<EpochRow> = acc.earlier.iter().filter(|r| r.epoch < first).cloned().collect();
        let chart = crate::plot::Chart {
            title: &self.ctx.spec.name,
            resumed_at: (!earlier.is_empty()).then_some(first),
            total_epochs: self.ctx.spec.training.epochs,
        };
        let rows: Vec<EpochRow> = earlier.into_iter().chain(acc.rows.iter().cloned()).collect();
        if let Err(e) = crate::plot::draw(&self.ctx.run.path().join("plot.png"), &chart, &rows) {
            tracing::warn!("cannot draw plot.png: {e}");
        }
    }

    /// The model, once worker 0 said where it is.
    pub(super) async fn fetch_model(&mut self, procs: &mut [Proc], failure: &mut Failures) {
        if let Some((i, path)) = self.model_at.take() {
            let limits = crate::transport::FetchLimits {
                uid: self.uid_of(&procs[i].planned.host),
                max_bytes: model_fetch_limit(self.ctx.spec),
            };
            match self.ctx.transport.fetch_dir(&procs[i].planned, &path, &self.ctx.run.model_dir(), limits).await {
                Ok(()) => self.model_fetched = true,
                Err(e) => {
                    failure.add(
                        Cause::Setup,
                        format!("cannot fetch the model from {}: {}", procs[i].planned.label(), Chain(&e)),
                    );
                    self.stop_all(procs).await;
                }
            }
        }
    }
}

/// The most a model fetch may bring back: the parameters as f32 twice
/// over (a format's overhead is far below that), plus room for metadata.
pub(super) fn model_fetch_limit(spec: &JobSpec) -> u64 {
    (warden_agent::train::model::num_params(&spec.model) as u64).saturating_mul(8).saturating_add(64 << 20)
}

/// The terminal's line for a complete epoch (test figures when there are).
fn epoch_line(row: &EpochRow, epochs: u32) -> String {
    let test = if row.test_loss.is_nan() {
        String::new()
    } else {
        format!(", test loss {:.4}, test accuracy {:.4}", row.test_loss, row.test_accuracy)
    };
    format!(
        "  epoch {}/{epochs}: train loss {:.4}{test}, {:.0} samples/s ({:.1}s)",
        row.epoch, row.train_loss, row.samples_per_s, row.elapsed_s
    )
}
