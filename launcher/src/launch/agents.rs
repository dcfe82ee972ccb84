//! One agent's life as the launcher sees it: started with its bundle,
//! enrolled (its CSR answered from the job's CA), its stderr copied to its
//! log, its events read, its exit reported, and stopped on request.

use super::*;

/// The log file name of a process in `DIR/logs/`.
pub fn log_name(p: &PlannedProcess) -> String {
    format!("{}.log", p.dir_name())
}

/// The last `n` lines of a log, indented, for failure reports.
pub(super) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !is_chatter(l) && !l.starts_with("[event] ")).collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// What every agent's start shares.
pub(super) struct StartCtx {
    pub(super) transport: Arc<dyn Transport>,
    pub(super) ca: Arc<JobCa>,
    pub(super) logs: PathBuf,
    pub(super) progress: Arc<Progress>,
}

/// A process's log file, shared by the tasks that serve it.
pub(super) type Log = Arc<Mutex<tokio::fs::File>>;

/// Why an agent could not be started.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    /// The transport could not start it.
    #[error(transparent)]
    Spawn(std::io::Error),
    /// Its log file cannot be made.
    #[error("cannot create its log")]
    Log(#[source] std::io::Error),
    /// It did not take its bundle.
    #[error("cannot send the bundle")]
    Bundle(#[source] std::io::Error),
}

/// Starts one agent, sends its bundle, and spawns the tasks that serve it.
pub(super) async fn start_one(
    i: usize,
    p: &PlannedProcess,
    bundle: Bundle,
    ctx: &StartCtx,
    tx: mpsc::Sender<Report>,
    uid: Option<u32>,
) -> Result<Proc, StartError> {
    let StartCtx { transport, ca, logs, progress } = ctx;
    let spawned = transport.spawn_agent(p).await.map_err(StartError::Spawn)?;
    let log: Log =
        Arc::new(Mutex::new(tokio::fs::File::create(logs.join(log_name(p))).await.map_err(StartError::Log)?));
    let stdin: ControlWriter = Arc::new(Mutex::new(Some(spawned.stdin)));
    send_control(&stdin, &Control::Bundle(Box::new(bundle))).await.map_err(StartError::Bundle)?;

    // stderr -> log file, and the terminal with the process's label.
    let stderr_done =
        tokio::spawn(copy_stderr(BufReader::new(spawned.stderr), log.clone(), p.label(), progress.clone()));
    // stdout -> events; the CSR is answered here.
    let (events_done_tx, events_done_rx) = oneshot::channel::<()>();
    let events = EventReader {
        i,
        who: Identity { job: ca.job().clone(), role: p.role, rank: p.rank },
        address: p.address,
        ca: ca.clone(),
        stdin: stdin.clone(),
        tx: tx.clone(),
        log: log.clone(),
    };
    tokio::spawn(events.run(BufReader::new(spawned.stdout), events_done_tx));
    // exit status; a kill request ends it early.
    let (kill_tx, kill_rx) = oneshot::channel::<Option<(u32, u64)>>();
    {
        let mut handle = spawned.handle;
        let label = p.label();
        tokio::spawn(async move {
            let code = tokio::select! {
                r = handle.wait() => r,
                Ok(group) = kill_rx => {
                    let said = handle.terminate(group, uid).await;
                    tracing::warn!("{label} did not stop on request: {said}");
                    let line = format!("[launcher] did not stop on request: {said}\n");
                    let _ = log.lock().await.write_all(line.as_bytes()).await;
                    // A host that went away cannot report the exit: give up.
                    tokio::time::timeout(Duration::from_secs(15), handle.wait()).await.unwrap_or(Ok(None))
                }
            };
            // Report the exit only after the process's last event (its
            // reason for failing, usually) and the last line of its log
            // (a program's traceback), so neither is lost.
            let _ = tokio::time::timeout(Duration::from_secs(2), events_done_rx).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), stderr_done).await;
            let _ = tx.send(Report::Exited(i, code.unwrap_or(None))).await;
        });
    }
    Ok(Proc { planned: p.clone(), stdin, kill: Some(kill_tx), group: None, exit: None, failed: false })
}

/// Copies an agent's stderr into its log and to the terminal, labelled.
pub(super) async fn copy_stderr(
    stderr: BufReader<Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
    log: Log,
    label: String,
    progress: Arc<Progress>,
) {
    let mut lines = stderr.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        progress.log_line(&label, &line);
        let mut f = log.lock().await;
        let _ = f.write_all(format!("{line}\n").as_bytes()).await;
    }
}

/// The task that reads one agent's events: each is logged, a CSR is
/// answered with a certificate from the job's CA, and each is reported as
/// plan index `i`.
pub(super) struct EventReader {
    pub(super) i: usize,
    pub(super) who: Identity,
    pub(super) address: std::net::IpAddr,
    pub(super) ca: Arc<JobCa>,
    pub(super) stdin: ControlWriter,
    pub(super) tx: mpsc::Sender<Report>,
    pub(super) log: Log,
}

impl EventReader {
    /// Until the agent's stdout ends, the channel breaks or nobody listens.
    pub(super) async fn run(
        self,
        mut reader: BufReader<Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
        events_done: oneshot::Sender<()>,
    ) {
        // Dropped on every return: tells the exit task that all events are in.
        let _events_done = events_done;
        let mut line = Vec::new();
        loop {
            line.clear();
            match self.next_event(&mut reader, &mut line).await {
                Ok(None) => return,
                Ok(Some(ev)) => {
                    if self.tx.send(Report::Event(self.i, ev)).await.is_err() {
                        return;
                    }
                }
                Err(why) => {
                    let _ = self.tx.send(Report::Broken(self.i, why)).await;
                    return;
                }
            }
        }
    }

    /// Reads, logs and parses the next event, answering it if it is a CSR;
    /// `None` at the end of the stream, an error when the channel broke.
    pub(super) async fn next_event(
        &self,
        reader: &mut BufReader<Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
        line: &mut Vec<u8>,
    ) -> Result<Option<Event>, String> {
        let n = (&mut *reader)
            .take(MAX_CONTROL_LINE as u64 + 1)
            .read_until(b'\n', line)
            .await
            .map_err(|e| format!("reading its events: {e}"))?;
        if n == 0 {
            return Ok(None);
        }
        let ev: Event = serde_json::from_slice(line).map_err(|e| format!("sent an unreadable event: {e}"))?;
        // A CSR's PEM text says nothing to someone reading the log.
        let logged: &[u8] = if matches!(ev, Event::Csr { .. }) { b"{\"event\":\"csr\"}\n" } else { line };
        let _ = self.log.lock().await.write_all(&[b"[event] ", logged].concat()).await;
        if let Event::Csr { pem } = &ev {
            let cert_pem =
                self.ca.sign_csr(pem, &self.who, Some(self.address)).map_err(|e| format!("enrolment failed: {e}"))?;
            let answer = Control::Certificate { cert_pem, ca_pem: self.ca.cert_pem().to_string() };
            send_control(&self.stdin, &answer).await.map_err(|e| format!("cannot send its certificate: {e}"))?;
        }
        Ok(Some(ev))
    }
}

pub(super) async fn send_control(stdin: &ControlWriter, msg: &Control) -> std::io::Result<()> {
    // Cleared when dropped: a bundle may carry the checkpoint key.
    let line = msg.to_line().map_err(std::io::Error::other)?;
    let mut guard = stdin.lock().await;
    let w = guard.as_mut().ok_or_else(|| std::io::Error::other("control channel already closed"))?;
    w.write_all(&line).await?;
    w.flush().await
}

/// Asks every agent to stop, closes their control channels and, after a
/// grace period, kills whatever is still running.
pub(super) async fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        let _ = tokio::time::timeout(Duration::from_secs(1), send_control(&p.stdin, &Control::Stop)).await;
        p.stdin.lock().await.take();
    }
    let kills: Vec<_> = procs.iter_mut().filter_map(|p| p.kill.take().map(|k| (k, p.group))).collect();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        for (k, group) in kills {
            let _ = k.send(group);
        }
    });
}
