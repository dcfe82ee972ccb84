//! The terminal: stages, a progress bar over the whole job, one line per
//! epoch, and what processes say that matters (their INFO lines stay in
//! their logs unless `-v`).

use super::*;

/// An agent's log line at INFO or below (`2026-12-06T02:35:17.009450Z
/// INFO target: ...`): the per-process log's business, not the terminal's.
/// A user program's own output and WARN/ERROR lines are not chatter.
pub(crate) fn is_chatter(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let stamped = words.next().is_some_and(|w| w.len() > 20 && w.as_bytes()[0].is_ascii_digit() && w.contains('T'));
    stamped && matches!(words.next(), Some("INFO" | "DEBUG" | "TRACE"))
}

/// Writes a line to stderr, ignoring failure: a closed terminal or pipe must
/// never stop the launcher before it has torn the job down.
pub(super) fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The terminal display: a progress bar when interactive, plain lines always.
pub(super) struct Progress {
    pub(super) bar: Option<indicatif::ProgressBar>,
    /// Stream the processes' log lines to the terminal: WARN and ERROR
    /// lines and a program's own output, or (`-v`) every line.
    pub(super) stream_logs: bool,
    pub(super) verbose: bool,
    /// The job is stopping: what processes say now is the stop's echo
    /// ("stopped by the launcher", connections closing), left to their logs.
    pub(super) quiet: std::sync::atomic::AtomicBool,
    /// The first step has been shown (the bar left the phase spinner).
    pub(super) training: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub(super) fn new(enabled: bool, stream_logs: bool, verbose: bool) -> Progress {
        let bar = enabled.then(|| {
            let b = indicatif::ProgressBar::new(0);
            // A spinner with the phase until the first step, then the epoch bar.
            b.set_style(indicatif::ProgressStyle::with_template("  {spinner} {msg}").expect("valid template"));
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress { bar, stream_logs, verbose, quiet: Default::default(), training: Default::default() }
    }
    /// The phase before training (starting, enrolling), on the spinner.
    pub(super) fn phase(&self, what: &str) {
        if let Some(b) = &self.bar
            && !self.training.load(std::sync::atomic::Ordering::Relaxed)
        {
            b.set_message(what.to_string());
        }
    }
    /// One line of a process's log, prefixed with its label.
    pub(super) fn log_line(&self, label: &str, line: &str) {
        let shown = self.verbose
            || (self.stream_logs && !is_chatter(line) && !self.quiet.load(std::sync::atomic::Ordering::Relaxed));
        if shown {
            self.println(&format!("{label} {line}"));
        }
    }

    /// From now on, processes' lines go to their logs only (unless `-v`).
    pub(super) fn hush(&self) {
        self.quiet.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    /// Step `step` of `steps` in epoch `epoch` of `epochs`: the bar runs
    /// over the whole job, so it ends full and its ETA is the job's.
    pub(super) fn step(&self, epoch: u32, epochs: u32, step: u64, steps: u64) {
        if let Some(b) = &self.bar {
            if !self.training.swap(true, std::sync::atomic::Ordering::Relaxed) {
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "  {spinner} epoch {msg} [{bar:30}] {percent:>3}%, about {eta} left",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
            }
            b.set_length(u64::from(epochs) * steps);
            b.set_position(u64::from(epoch.saturating_sub(1)) * steps + step);
            b.set_message(format!("{epoch}/{epochs}"));
        }
    }
    pub(super) fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| say(line)),
            None => say(line),
        }
    }
    pub(super) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bar_spans_the_whole_job_and_ends_full() {
        let p = super::Progress::new(true, false, false);
        let bar = p.bar.as_ref().unwrap();
        p.step(1, 5, 20, 62);
        assert_eq!((bar.position(), bar.length()), (20, Some(310)));
        // The last step of the last epoch, which worker 0 always reports.
        p.step(5, 5, 62, 62);
        assert_eq!(Some(bar.position()), bar.length());
    }

    #[test]
    fn chatter_is_info_and_below_from_the_agents_log_format() {
        assert!(super::is_chatter("2026-12-06T02:35:17.009450Z  INFO warden_agent::agent: running as uid 2"));
        assert!(!super::is_chatter("2026-12-06T02:35:17.009450Z  WARN warden_agent: refused"));
        assert!(!super::is_chatter("2026-12-06T02:35:17.009450Z ERROR warden_agent: stopped"));
        assert!(!super::is_chatter("Traceback (most recent call last):"));
        assert!(!super::is_chatter("epoch 3: test accuracy 0.81"));
    }
}
