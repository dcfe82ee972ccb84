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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// One key's usage, on a clock that starts at 10:00 UTC on day 20000
    /// and is moved by hand.
    struct Key {
        now: Now,
        usage: Usage,
    }

    impl Key {
        fn new() -> Key {
            Key { now: Now { instant: Instant::now(), unix_secs: 20_000 * DAY + 10 * 3600 }, usage: Usage::default() }
        }

        /// Moves the clock `secs` on, then charges `n` queries under `p`.
        fn charge_after(&mut self, secs: f64, p: &Policy, n: u64) -> Result<(), Limited> {
            self.now.instant += Duration::from_secs_f64(secs);
            self.now.unix_secs += secs as u64;
            charge(&mut self.usage, p, n, self.now)
        }
    }

    fn policy(per_day: u64, total: u64, rate: f64, burst: f64) -> Policy {
        Policy { per_day, total, rate, burst, ..Policy::default() }
    }

    #[test]
    fn the_bucket_allows_a_burst_then_refills_at_the_rate() {
        let (mut k, p) = (Key::new(), policy(1000, 1000, 2.0, 5.0));
        assert_eq!(k.charge_after(0.0, &p, 5), Ok(()), "a full bucket at first");
        let limited = k.charge_after(0.0, &p, 1).expect_err("empty");
        assert_eq!(limited, Limited { why: Why::Rate { rate: 2.0, burst: 5.0 }, retry_after: Some(1) });
        assert_eq!(limited.why.to_string(), "rate limit of 2 queries/s (burst 5) exceeded");
        // Half a second at 2/s is one query.
        assert_eq!(k.charge_after(0.5, &p, 1), Ok(()));
        // Four queries at once wait for the tokens they lack: 2 s, rounded up.
        assert_eq!(k.charge_after(0.0, &p, 4).map_err(|l| l.retry_after), Err(Some(2)));
        // An hour refills the bucket to its size, not beyond.
        assert_eq!(k.charge_after(3600.0, &p, 5), Ok(()));
        assert!(k.charge_after(0.0, &p, 1).is_err());
        // A batch larger than the bucket never passes; it is told at least a second.
        assert_eq!(k.charge_after(3600.0, &p, 6).map_err(|l| l.retry_after), Err(Some(1)));
        assert_eq!((k.usage.total, k.usage.today), (11, 11), "refused charges count nothing");
    }

    #[test]
    fn the_daily_budget_starts_again_at_midnight_utc() {
        let (mut k, p) = (Key::new(), policy(3, 1000, 1e6, 1000.0));
        assert_eq!(k.charge_after(0.0, &p, 3), Ok(()));
        let limited = k.charge_after(0.0, &p, 1).expect_err("the day's budget is used");
        // 10:00 UTC: 14 hours to midnight.
        assert_eq!(limited, Limited { why: Why::Daily(3), retry_after: Some(14 * 3600) });
        assert_eq!(limited.why.to_string(), "the daily query budget of this key (3) is used up until 00:00 UTC");
        assert_eq!(k.charge_after(14.0 * 3600.0 - 1.0, &p, 1).map_err(|l| l.retry_after), Err(Some(1)), "23:59:59");
        assert_eq!(k.charge_after(1.0, &p, 1), Ok(()), "00:00 the next day");
        assert_eq!((k.usage.total, k.usage.today, k.usage.day), (4, 1, 20_001));
    }

    #[test]
    fn the_total_budget_never_recovers() {
        let (mut k, p) = (Key::new(), policy(1000, 4, 1e6, 1000.0));
        assert_eq!(k.charge_after(0.0, &p, 3), Ok(()));
        // Over the total as a batch, though one query would still pass.
        let limited = k.charge_after(0.0, &p, 2).expect_err("over the total");
        assert_eq!(limited, Limited { why: Why::Total(4), retry_after: None });
        let text = "the total query budget of this key (4) is used up; ask the operator for another";
        assert_eq!(limited.why.to_string(), text);
        assert_eq!(k.charge_after(0.0, &p, 1), Ok(()));
        assert_eq!(k.charge_after(30.0 * 86_400.0, &p, 1).map_err(|l| l.retry_after), Err(None), "still used up");
        // The total is checked before the day's budget.
        assert_eq!(k.charge_after(0.0, &policy(0, 4, 1e6, 1000.0), 1).map_err(|l| l.why), Err(Why::Total(4)));
    }

    #[test]
    fn counts_but_not_the_bucket_are_saved() {
        let mut k = Key::new();
        k.charge_after(0.0, &policy(1000, 1000, 1.0, 1.0), 1).expect("charged");
        let json = serde_json::to_string(&k.usage).expect("serialises");
        assert_eq!(json, r#"{"total":1,"day":20000,"today":1}"#);
        let back: Usage = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, Usage { tokens: None, ..k.usage });
    }
}
