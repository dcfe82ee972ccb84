//! Query budgets per key: a token bucket for the rate, a daily budget that
//! starts again at 00:00 UTC and a total one that never does. Pure: the
//! caller passes the time in, keeps the [`Usage`], and turns [`Limited`]
//! into its reply (HTTP 429 with `Retry-After`).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::config::Policy;

const DAY: u64 = 86_400;

/// Queries charged to one key. The counts are saved in the state file; the
/// bucket starts full again after a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Usage {
    /// Queries ever.
    pub(super) total: u64,
    /// The UTC day (days since the Unix epoch) `today` counts.
    pub(super) day: u64,
    /// Queries on `day`.
    pub(super) today: u64,
    /// Tokens in the bucket, as of when.
    #[serde(skip)]
    tokens: Option<(f64, Instant)>,
}

/// The time, read once per charge: a monotonic instant for the bucket, and
/// seconds since the Unix epoch for the days.
#[derive(Debug, Clone, Copy)]
pub(super) struct Now {
    pub(super) instant: Instant,
    pub(super) unix_secs: u64,
}

impl Now {
    /// The clocks' time now.
    pub(super) fn read() -> Now {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        Now { instant: Instant::now(), unix_secs: unix.map_or(0, |d| d.as_secs()) }
    }

    fn day(self) -> u64 {
        self.unix_secs / DAY
    }

    fn seconds_to_midnight(self) -> u64 {
        DAY - self.unix_secs % DAY
    }
}

/// A charge refused: why, and in how many seconds to try again (`None`:
/// never, the total budget does not recover).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Limited {
    pub(super) why: Why,
    pub(super) retry_after: Option<u64>,
}

/// The budget that ran out.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Why {
    /// The total budget, this many queries.
    Total(u64),
    /// The daily budget, this many queries.
    Daily(u64),
    /// The token bucket, refilled at `rate` queries/s up to `burst`.
    Rate { rate: f64, burst: f64 },
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Total(n) => {
                write!(f, "the total query budget of this key ({n}) is used up; ask the operator for another")
            }
            Why::Daily(n) => write!(f, "the daily query budget of this key ({n}) is used up until 00:00 UTC"),
            Why::Rate { rate, burst } => write!(f, "rate limit of {rate} queries/s (burst {burst}) exceeded"),
        }
    }
}

/// Charges `n` queries under `policy`, or says when to come back. Nothing
/// is counted for a refused charge (the bucket does refill up to `now`).
pub(super) fn charge(usage: &mut Usage, policy: &Policy, n: u64, now: Now) -> Result<(), Limited> {
    if usage.day != now.day() {
        usage.day = now.day();
        usage.today = 0;
    }
    if usage.total + n > policy.total {
        return Err(Limited { why: Why::Total(policy.total), retry_after: None });
    }
    if usage.today + n > policy.per_day {
        return Err(Limited { why: Why::Daily(policy.per_day), retry_after: Some(now.seconds_to_midnight()) });
    }
    let (rate, burst) = (policy.rate, policy.burst);
    let (tokens, at) = usage.tokens.unwrap_or((burst, now.instant));
    let tokens = (tokens + now.instant.saturating_duration_since(at).as_secs_f64() * rate).min(burst);
    if tokens < n as f64 {
        usage.tokens = Some((tokens, now.instant));
        let wait = ((n as f64 - tokens) / rate).ceil().max(1.0) as u64;
        return Err(Limited { why: Why::Rate { rate, burst }, retry_after: Some(wait) });
    }
    usage.tokens = Some((tokens - n as f64, now.instant));
    usage.total += n;
    usage.today += n;
    Ok(())
}
