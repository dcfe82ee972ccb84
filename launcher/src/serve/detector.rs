//! The extraction detector, after PRADA (Juuti et al., EuroS&P 2019): each
//! new query's distance to the nearest of the key's recent queries is
//! recorded, and the key is flagged when those distances are too regular
//! (coefficient of variation below `cv_below`). Natural inputs lie at very
//! uneven distances from each other; synthetic ones (random points, small
//! steps along a boundary) at machine-regular ones. Pure: the caller keeps
//! each key's [`Trail`] and reports a flag.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::config::Policy;

/// The detector's settings, validated (`[detector]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Detector {
    /// Recent queries kept per key to measure distances against.
    pub window: usize,
    /// Distances recorded before a key can be flagged.
    pub min_queries: usize,
    /// Flag when the distances' standard deviation over mean falls below this.
    pub cv_below: f64,
    /// Slow flagged keys down to this many queries per second (`None`: log only).
    pub throttle: Option<f64>,
}

/// What the detector keeps per key. Only the flag is saved in the state
/// file (a flagged key stays flagged across restarts).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Trail {
    /// Flagged by the detector.
    #[serde(default)]
    pub(super) flagged: bool,
    /// Recent queries, for the distances.
    #[serde(skip)]
    recent: VecDeque<Vec<f32>>,
    /// Each query's distance to its nearest recent one.
    #[serde(skip)]
    distances: VecDeque<f64>,
}

impl Detector {
    /// The policy a key is charged under: a key flagged for throttling gets
    /// the throttle rate and no burst.
    pub(super) fn charged_policy(&self, trail: &Trail, policy: &Policy) -> Option<Policy> {
        match self.throttle {
            Some(rate) if trail.flagged => Some(Policy { rate, burst: 1.0, ..policy.clone() }),
            _ => None,
        }
    }

    /// Records `inputs` in `trail`. Returns the coefficient of variation of
    /// the distances, and how many there are, when this flags the key (once).
    pub(super) fn observe(&self, trail: &mut Trail, inputs: Vec<Vec<f32>>) -> Option<(f64, usize)> {
        for x in inputs {
            let nearest = trail
                .recent
                .iter()
                .map(|r| r.iter().zip(&x).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>())
                .fold(f64::INFINITY, f64::min);
            if nearest.is_finite() {
                trail.distances.push_back(nearest.sqrt());
                if trail.distances.len() > self.window {
                    trail.distances.pop_front();
                }
            }
            trail.recent.push_back(x);
            if trail.recent.len() > self.window {
                trail.recent.pop_front();
            }
        }
        if trail.flagged || trail.distances.len() < self.min_queries {
            return None;
        }
        let n = trail.distances.len() as f64;
        let mean = trail.distances.iter().sum::<f64>() / n;
        let sd = (trail.distances.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
        let cv = if mean > 0.0 { sd / mean } else { 0.0 };
        if cv < self.cv_below {
            trail.flagged = true;
            return Some((cv, trail.distances.len()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DETECTOR: Detector = Detector { window: 10, min_queries: 5, cv_below: 0.05, throttle: Some(0.5) };

    #[test]
    fn evenly_spaced_queries_are_flagged_once_and_uneven_ones_are_not() {
        let mut steps = Trail::default();
        let flags: Vec<_> = (0..8).map(|i| DETECTOR.observe(&mut steps, vec![vec![i as f32, 0.0]])).collect();
        // The sixth query makes the fifth distance: all 1.0, no variation.
        assert_eq!(flags.iter().position(Option::is_some), Some(5));
        assert_eq!(flags[5], Some((0.0, 5)));
        assert!(flags[6..].iter().all(Option::is_none), "flagged once");
        assert!(steps.flagged);
        let mut natural = Trail::default();
        let uneven = [0.0f32, 1.0, 1.5, 4.0, 4.1, 9.0, 9.5, 17.0, 30.0, 30.2];
        assert!(uneven.iter().all(|&v| DETECTOR.observe(&mut natural, vec![vec![v, 0.0]]).is_none()));
        assert!(!natural.flagged);
    }

    #[test]
    fn a_flagged_key_is_charged_at_the_throttle_rate_with_no_burst() {
        let p = Policy::default();
        let flagged = Trail { flagged: true, ..Trail::default() };
        assert_eq!(DETECTOR.charged_policy(&Trail::default(), &p), None);
        assert_eq!(DETECTOR.charged_policy(&flagged, &p), Some(Policy { rate: 0.5, burst: 1.0, ..p.clone() }));
        let log_only = Detector { throttle: None, ..DETECTOR };
        assert_eq!(log_only.charged_policy(&flagged, &p), None);
    }
}
