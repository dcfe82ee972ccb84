//! The counters behind `/metrics`, and their Prometheus text. Who may read
//! them is the HTTP layer's concern (`[metrics]` in the config).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts since the server started; every one is updated with relaxed
/// atomics (they are read only to be reported).
#[derive(Default)]
pub(super) struct Metrics {
    pub(super) requests: AtomicU64,
    pub(super) predictions: AtomicU64,
    pub(super) unauthorized: AtomicU64,
    pub(super) limited: AtomicU64,
    pub(super) too_large: AtomicU64,
    pub(super) bad: AtomicU64,
    pub(super) latency_us: AtomicU64,
    pub(super) flagged: AtomicU64,
    /// Connections closed on accept: over max_connections, over max_handshakes.
    pub(super) refused_connections: AtomicU64,
    pub(super) refused_handshakes: AtomicU64,
}

/// Adds `n` to `counter`.
pub(super) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// The Prometheus text exposition of the counters, with `open`
    /// connections open now.
    pub(super) fn text(&self, open: usize) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP warden_requests_total HTTP requests received.\n# TYPE warden_requests_total counter\nwarden_requests_total {}\n\
             # HELP warden_predictions_total Inputs answered.\n# TYPE warden_predictions_total counter\nwarden_predictions_total {}\n\
             # HELP warden_rejected_total Requests refused, by reason.\n# TYPE warden_rejected_total counter\n\
             warden_rejected_total{{reason=\"unauthorized\"}} {}\nwarden_rejected_total{{reason=\"limited\"}} {}\n\
             warden_rejected_total{{reason=\"too_large\"}} {}\nwarden_rejected_total{{reason=\"bad_request\"}} {}\n\
             # HELP warden_flagged_keys_total Keys the extraction detector flagged.\n# TYPE warden_flagged_keys_total counter\n\
             warden_flagged_keys_total {}\n\
             # HELP warden_request_seconds_total Time spent answering requests.\n# TYPE warden_request_seconds_total counter\n\
             warden_request_seconds_total {:.6}\n\
             # HELP warden_connections_open Connections open now, TLS handshakes included.\n\
             # TYPE warden_connections_open gauge\nwarden_connections_open {}\n\
             # HELP warden_connections_refused_total Connections closed on accept, by the limit reached.\n\
             # TYPE warden_connections_refused_total counter\n\
             warden_connections_refused_total{{limit=\"max_connections\"}} {}\n\
             warden_connections_refused_total{{limit=\"max_handshakes\"}} {}\n",
            g(&self.requests),
            g(&self.predictions),
            g(&self.unauthorized),
            g(&self.limited),
            g(&self.too_large),
            g(&self.bad),
            g(&self.flagged),
            g(&self.latency_us) as f64 / 1e6,
            open,
            g(&self.refused_connections),
            g(&self.refused_handshakes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_reported_in_prometheus_text() {
        let m = Metrics::default();
        add(&m.requests, 3);
        add(&m.limited, 1);
        add(&m.latency_us, 1_500_000);
        let text = m.text(2);
        for line in [
            "warden_requests_total 3\n",
            "warden_rejected_total{reason=\"limited\"} 1\n",
            "warden_rejected_total{reason=\"unauthorized\"} 0\n",
            "warden_request_seconds_total 1.500000\n",
            "warden_connections_open 2\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
