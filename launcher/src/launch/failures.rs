//! What ended an attempt: every failure gathered for a moment after the
//! first, and the one that tells most.

use super::*;

/// What ended an attempt, most telling first: when one process dies, its
/// peers fail too moments later ("connection reset"); the report names the
/// one that died, not the first to notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Cause {
    /// The firewall, an agent's start or the model fetch: never restarted.
    Setup,
    /// Exited non-zero or killed, without saying why.
    Crashed,
    /// Its control channel broke.
    Broken,
    /// It reported a failure (incl. the scheduler declaring a peer dead).
    Reported,
    /// It reported a failure that follows from another process's (a peer's
    /// connection closed under it, or the scheduler aborted the job).
    Follows,
    /// It exited non-zero, or its channel broke, after the job began stopping.
    Stopping,
    /// Ctrl-C or `max_hours`: never restarted; the cause if it came first.
    Stopped,
}

/// Whether an exit status says the process was killed by a signal, and
/// which if known: a transport that runs the agent under another process
/// (srun, a remote shell) reports its death by signal N as 128 + N.
pub(super) fn killed_by(code: Option<i32>) -> Option<Option<i32>> {
    code.map_or(Some(None), |c| (129..=192).contains(&c).then_some(Some(c - 128)))
}

/// The failures of one attempt, gathered for a moment after the first.
#[derive(Default)]
pub(super) struct Failures {
    pub(super) first_at: Option<Instant>,
    /// Each with the log whose last lines tell more, if any.
    pub(super) seen: Vec<(Cause, String, Option<PathBuf>)>,
}

impl Failures {
    /// How long after the first failure others still count as candidates.
    const WINDOW: Duration = Duration::from_secs(1);

    pub(super) fn add(&mut self, cause: Cause, message: String) {
        self.add_with_log(cause, message, None);
    }

    /// A failure whose process's log says more: its last lines are shown
    /// with the message, read once every process has ended (and so every
    /// log is complete).
    pub(super) fn add_with_log(&mut self, cause: Cause, message: String, log: Option<PathBuf>) {
        let first = *self.first_at.get_or_insert_with(Instant::now);
        if first.elapsed() <= Self::WINDOW || matches!(cause, Cause::Stopped) {
            self.seen.push((cause, message, log));
        }
    }

    pub(super) fn is_some(&self) -> bool {
        self.first_at.is_some()
    }

    pub(super) fn is_none(&self) -> bool {
        self.first_at.is_none()
    }

    /// A requested stop came before any failure.
    pub(super) fn stopped(&self) -> bool {
        matches!(self.seen.first(), Some((Cause::Stopped, ..)))
    }

    /// The root cause, and whether `on_failure = "restart"` applies.
    pub(super) fn root(self) -> (Option<String>, bool) {
        let stopped = self.seen.iter().any(|(c, ..)| matches!(c, Cause::Stopped | Cause::Setup));
        if let Some((Cause::Stopped, ..)) = self.seen.first() {
            return (self.seen.into_iter().next().map(|(_, m, _)| m), false);
        }
        // min_by_key keeps the earliest of equal causes.
        match self.seen.into_iter().enumerate().min_by_key(|(i, (c, ..))| (*c, *i)) {
            Some((_, (_, message, None))) => (Some(message), !stopped),
            Some((_, (_, message, Some(log)))) => {
                (Some(format!("{message}\n  last lines of {}:\n{}", log.display(), tail(&log, 12))), !stopped)
            }
            None => (None, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Cause, Failures, killed_by};

    fn root(reports: &[(Cause, &str)]) -> (Option<String>, bool) {
        let mut f = Failures::default();
        for (cause, message) in reports {
            f.add(*cause, (*message).to_string());
        }
        f.root()
    }

    #[test]
    fn a_verdict_outranks_the_symptoms_reported_before_it() {
        // Seen in CI: a worker whose peer closed under it reported before the
        // scheduler's heartbeat verdict that explains it.
        let (message, restartable) = root(&[
            (Cause::Follows, "worker[1]: i/o: peer closed connection"),
            (Cause::Follows, "server[0]: the job was aborted: server[1] declared dead"),
            (Cause::Reported, "scheduler[0]: server[1] sent nothing for 4 s: declared dead"),
            (Cause::Stopping, "worker[0] exited with status 1"),
        ]);
        assert_eq!(message.as_deref(), Some("scheduler[0]: server[1] sent nothing for 4 s: declared dead"));
        assert!(restartable);
    }

    #[test]
    fn signal_deaths_are_told_from_exit_statuses() {
        assert_eq!(killed_by(None), Some(None), "killed here");
        assert_eq!(killed_by(Some(137)), Some(Some(9)), "SIGKILL through srun or ssh");
        assert_eq!(killed_by(Some(143)), Some(Some(15)));
        assert_eq!(killed_by(Some(1)), None);
        assert_eq!(killed_by(Some(128)), None);
        assert_eq!(killed_by(Some(255)), None, "ssh's own failure");
    }

    #[test]
    fn a_symptom_is_named_when_nothing_explains_it() {
        let (message, _) = root(&[(Cause::Stopping, "x exited"), (Cause::Follows, "worker[1]: peer closed")]);
        assert_eq!(message.as_deref(), Some("worker[1]: peer closed"));
    }

    #[test]
    fn a_crash_outranks_every_report_and_ctrl_c_first_is_never_restarted() {
        let (message, _) = root(&[(Cause::Reported, "a"), (Cause::Crashed, "worker[0] was killed by a signal")]);
        assert_eq!(message.as_deref(), Some("worker[0] was killed by a signal"));
        let (message, restartable) = root(&[(Cause::Stopped, "interrupted"), (Cause::Crashed, "b")]);
        assert_eq!(message.as_deref(), Some("interrupted"));
        assert!(!restartable);
    }
}
