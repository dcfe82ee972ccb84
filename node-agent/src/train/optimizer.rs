//! Optimizers as data.
//!
//! MXNet let workers send pickled optimizer objects that servers unpickled and
//! ran. Here an optimizer is an [`OptimizerSpec`]: a rule from a closed list,
//! a learning-rate schedule from a closed list, and numbers, each checked
//! against bounds by [`OptimizerSpec::validate`] wherever one is made: from
//! the job file, or decoded off the wire. Servers apply it with the kernels
//! in `warden-kernels`.

use std::fmt;

use serde::Serialize;
use warden_kernels::{Grad, GradPrep, Rule, Update};

/// Which update rule, with its rule-specific numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Plain stochastic gradient descent.
    Sgd,
    /// SGD with (optionally Nesterov) momentum.
    Momentum {
        /// Momentum coefficient in [0, 1).
        momentum: f32,
        /// Use Nesterov's look-ahead form.
        nesterov: bool,
    },
    /// Adam, with L2 weight decay coupled into the gradient.
    Adam {
        /// First-moment decay in [0, 1).
        beta1: f32,
        /// Second-moment decay in [0, 1).
        beta2: f32,
        /// Denominator term in (0, 1].
        eps: f32,
    },
    /// AdamW: Adam with decoupled weight decay.
    AdamW {
        /// First-moment decay in [0, 1).
        beta1: f32,
        /// Second-moment decay in [0, 1).
        beta2: f32,
        /// Denominator term in (0, 1].
        eps: f32,
    },
}

/// How the learning rate changes with the update count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "schedule", rename_all = "snake_case")]
pub enum Schedule {
    /// `lr` throughout.
    Constant,
    /// `lr * gamma^(t / every)`.
    Step {
        /// Updates between decays.
        every: u64,
        /// Factor per decay, in (0, 1].
        gamma: f32,
    },
    /// Cosine decay from `lr` to `min_lr` over `decay_steps` updates.
    Cosine {
        /// Updates over which to decay.
        decay_steps: u64,
        /// Final learning rate, in [0, lr].
        min_lr: f32,
    },
}

/// A complete optimizer description.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OptimizerSpec {
    /// The rule.
    #[serde(flatten)]
    pub kind: OptimizerKind,
    /// Base learning rate, (0, 10].
    pub lr: f32,
    /// Weight decay, [0, 1) (L2 for all rules but AdamW, where it is decoupled).
    pub weight_decay: f32,
    /// Elementwise gradient clip; 0 disables; otherwise (0, 1e6].
    pub clip_gradient: f32,
    /// Learning-rate schedule.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// Linear warm-up from 0 to the scheduled rate over this many updates.
    pub warmup_steps: u64,
}

impl OptimizerSpec {
    /// Plain SGD at `lr`, no extras.
    pub fn sgd(lr: f32) -> OptimizerSpec {
        OptimizerSpec {
            kind: OptimizerKind::Sgd,
            lr,
            weight_decay: 0.0,
            clip_gradient: 0.0,
            schedule: Schedule::Constant,
            warmup_steps: 0,
        }
    }
}

/// As a person reads it, in the job file's words: `momentum 0.9, lr 0.1,
/// weight_decay 0.0001`.
impl std::fmt::Display for OptimizerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            OptimizerKind::Sgd => write!(f, "sgd")?,
            OptimizerKind::Momentum { momentum, nesterov } => {
                write!(f, "momentum {momentum}{}", if nesterov { " (nesterov)" } else { "" })?
            }
            OptimizerKind::Adam { beta1, beta2, eps } => write!(f, "adam (beta1 {beta1}, beta2 {beta2}, eps {eps})")?,
            OptimizerKind::AdamW { beta1, beta2, eps } => write!(f, "adamw (beta1 {beta1}, beta2 {beta2}, eps {eps})")?,
        }
        write!(f, ", lr {}", self.lr)?;
        if self.weight_decay > 0.0 {
            write!(f, ", weight_decay {}", self.weight_decay)?;
        }
        if self.clip_gradient > 0.0 {
            write!(f, ", clip_gradient {}", self.clip_gradient)?;
        }
        match self.schedule {
            Schedule::Constant => {}
            Schedule::Step { every, gamma } => write!(f, ", lr x {gamma} every {every} updates")?,
            Schedule::Cosine { decay_steps, min_lr } => {
                write!(f, ", cosine decay to {min_lr} over {decay_steps} updates")?
            }
        }
        if self.warmup_steps > 0 {
            write!(f, ", {} warm-up updates", self.warmup_steps)?;
        }
        Ok(())
    }
}

/// Checkpointed optimizer state that does not fit the optimizer or the shard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the checkpoint holds {found} optimizer state slots of this shard, and this optimizer needs {want}")]
pub struct RestoreError {
    /// Slots in the checkpoint.
    pub found: usize,
    /// Slots the optimizer keeps.
    pub want: usize,
}

/// An optimizer value outside its bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerError {
    /// Which field.
    pub field: &'static str,
    /// Its value.
    pub value: f64,
    /// The accepted range, as text.
    pub range: &'static str,
}

impl fmt::Display for OptimizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "optimizer {} = {} is out of range {}", self.field, self.value, self.range)
    }
}

impl std::error::Error for OptimizerError {}

impl OptimizerError {
    /// How to fix it.
    pub fn help(&self) -> String {
        match self.field {
            "lr" => "a learning rate above 0 and at most 10; 0.1 is a common start for SGD, 0.001 for Adam".into(),
            "momentum" => "momentum from 0 up to (not including) 1; 0.9 is common".into(),
            "weight_decay" => "weight decay from 0 up to (not including) 1; 0.0001 is common".into(),
            "beta1" | "beta2" => "betas from 0 up to (not including) 1; 0.9 and 0.999 are common".into(),
            "eps" => "eps above 0 and at most 1; 1e-8 is common".into(),
            "clip_gradient" => "0 turns clipping off; otherwise a bound above 0, such as 5".into(),
            "step_gamma" => "the factor per decay, above 0 and at most 1, such as 0.1".into(),
            "step_every" | "decay_steps" => "a number of updates, at least 1".into(),
            "min_lr" => "the final learning rate, from 0 up to lr".into(),
            "warmup_steps" => "a number of updates, up to 10^9".into(),
            _ => String::new(),
        }
    }
}

fn check(field: &'static str, value: f64, ok: bool, range: &'static str) -> Result<(), OptimizerError> {
    if ok && value.is_finite() { Ok(()) } else { Err(OptimizerError { field, value, range }) }
}

fn unit(field: &'static str, v: f32) -> Result<(), OptimizerError> {
    check(field, v.into(), (0.0..1.0).contains(&v), "[0, 1)")
}

impl OptimizerSpec {
    /// Checks every number against its bounds.
    pub fn validate(&self) -> Result<(), OptimizerError> {
        check("lr", self.lr.into(), self.lr > 0.0 && self.lr <= 10.0, "(0, 10]")?;
        unit("weight_decay", self.weight_decay)?;
        check("clip_gradient", self.clip_gradient.into(), (0.0..=1e6).contains(&self.clip_gradient), "0 or (0, 1e6]")?;
        check("warmup_steps", self.warmup_steps as f64, self.warmup_steps <= 1_000_000_000, "[0, 1e9]")?;
        match self.kind {
            OptimizerKind::Sgd => {}
            OptimizerKind::Momentum { momentum, .. } => unit("momentum", momentum)?,
            OptimizerKind::Adam { beta1, beta2, eps } | OptimizerKind::AdamW { beta1, beta2, eps } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                check("eps", eps.into(), eps > 0.0 && eps <= 1.0, "(0, 1]")?;
            }
        }
        match self.schedule {
            Schedule::Constant => {}
            Schedule::Step { every, gamma } => {
                check("step_every", every as f64, every >= 1, "[1, ...)")?;
                check("step_gamma", gamma.into(), gamma > 0.0 && gamma <= 1.0, "(0, 1]")?;
            }
            Schedule::Cosine { decay_steps, min_lr } => {
                check("decay_steps", decay_steps as f64, decay_steps >= 1, "[1, ...)")?;
                check("min_lr", min_lr.into(), min_lr >= 0.0 && min_lr <= self.lr, "[0, lr]")?;
            }
        }
        Ok(())
    }

    /// The learning rate for update number `t` (from 1).
    pub fn lr_at(&self, t: u64) -> f32 {
        let base = match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Step { every, gamma } => {
                self.lr * gamma.powi(((t.saturating_sub(1)) / every).min(i32::MAX as u64) as i32)
            }
            Schedule::Cosine { decay_steps, min_lr } => {
                let progress = (t.saturating_sub(1) as f64 / decay_steps as f64).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (f64::from(min_lr) + (f64::from(self.lr) - f64::from(min_lr)) * cos) as f32
            }
        };
        if self.warmup_steps > 0 && t <= self.warmup_steps { base * t as f32 / self.warmup_steps as f32 } else { base }
    }

    fn state_slots(&self) -> usize {
        match self.kind {
            OptimizerKind::Sgd => 0,
            OptimizerKind::Momentum { .. } => 1,
            OptimizerKind::Adam { .. } | OptimizerKind::AdamW { .. } => 2,
        }
    }
}

/// A server's optimizer: the spec plus its state for one shard.
#[derive(Debug)]
pub struct ShardOptimizer {
    spec: OptimizerSpec,
    slot1: Vec<f32>,
    slot2: Vec<f32>,
    t: u64,
}

impl ShardOptimizer {
    /// State for a shard of `len` parameters.
    pub fn new(spec: OptimizerSpec, len: usize) -> ShardOptimizer {
        let slots = spec.state_slots();
        ShardOptimizer {
            spec,
            slot1: if slots >= 1 { vec![0.0; len] } else { Vec::new() },
            slot2: if slots >= 2 { vec![0.0; len] } else { Vec::new() },
            t: 0,
        }
    }

    /// The rule in force.
    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.t
    }

    /// Optimizer state slots this rule keeps per parameter (0, 1 or 2).
    pub fn slots(&self) -> usize {
        self.spec.state_slots()
    }

    /// The state to checkpoint: updates applied and the slots.
    pub fn state(&self) -> (u64, Vec<Vec<f32>>) {
        let slots = [&self.slot1, &self.slot2];
        (self.t, slots[..self.slots()].iter().map(|s| s.to_vec()).collect())
    }

    /// The optimizer's state slots, borrowed (as many as [`Self::slots`]).
    pub fn slot_values(&self) -> Vec<&[f32]> {
        let slots = [self.slot1.as_slice(), self.slot2.as_slice()];
        slots[..self.slots()].to_vec()
    }

    /// Rebuilds the optimizer from checkpointed state.
    pub fn restore(spec: OptimizerSpec, len: usize, t: u64, mut slots: Vec<Vec<f32>>) -> Result<Self, RestoreError> {
        let want = spec.state_slots();
        if slots.len() != want || slots.iter().any(|s| s.len() != len) {
            return Err(RestoreError { found: slots.len(), want });
        }
        let slot2 = if want >= 2 { slots.pop().unwrap_or_default() } else { Vec::new() };
        let slot1 = if want >= 1 { slots.pop().unwrap_or_default() } else { Vec::new() };
        Ok(ShardOptimizer { spec, slot1, slot2, t })
    }

    /// Applies one update from `count` workers' gradients (their mean is
    /// what the rule sees), summing and updating in one fused pass.
    pub fn apply(&mut self, params: &mut [f32], grads: &[Grad<'_>], count: usize) {
        self.apply_combined(params, grads, count, warden_kernels::Combine::Mean);
    }

    /// [`ShardOptimizer::apply`] with the gradients combined by `combine`
    /// (the mean, a trimmed mean or the median, per coordinate).
    pub fn apply_combined(
        &mut self,
        params: &mut [f32],
        grads: &[Grad<'_>],
        count: usize,
        combine: warden_kernels::Combine,
    ) {
        let u = self.next_update(count);
        let (isa, threads) = (warden_kernels::Isa::best(), warden_kernels::parallel::threads());
        warden_kernels::combine_update_with(isa, threads, params, &mut self.slot1, &mut self.slot2, grads, u, combine);
    }

    /// [`ShardOptimizer::apply`] with the gradients combined by centered
    /// clipping around `center` (which becomes this step's combination).
    pub fn apply_centered(&mut self, params: &mut [f32], center: &mut [f32], grads: &[Grad<'_>], radius: f32) {
        let u = self.next_update(grads.len());
        let (isa, threads) = (warden_kernels::Isa::best(), warden_kernels::parallel::threads());
        let (s1, s2) = (&mut self.slot1, &mut self.slot2);
        warden_kernels::centered_clip_update_with(isa, threads, params, s1, s2, center, grads, u, radius);
    }

    /// Counts an update and says what it is (`count` gradients averaged).
    fn next_update(&mut self, count: usize) -> Update {
        self.t += 1;
        let s = self.spec;
        let coupled = if matches!(s.kind, OptimizerKind::AdamW { .. }) { 0.0 } else { s.weight_decay };
        let prep = GradPrep { scale: 1.0 / count.max(1) as f32, clip: s.clip_gradient, weight_decay: coupled };
        let rule = match s.kind {
            OptimizerKind::Sgd => Rule::Sgd,
            OptimizerKind::Momentum { momentum, nesterov } => Rule::Momentum { momentum, nesterov },
            OptimizerKind::Adam { beta1, beta2, eps } => {
                Rule::Adam { beta1, beta2, eps, decoupled_decay: 0.0, t: self.t }
            }
            OptimizerKind::AdamW { beta1, beta2, eps } => {
                Rule::Adam { beta1, beta2, eps, decoupled_decay: s.weight_decay, t: self.t }
            }
        };
        Update { lr: s.lr_at(self.t), prep, rule }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_optimizer_reads_in_the_job_files_words() {
        let mut o = OptimizerSpec::sgd(0.1);
        o.kind = OptimizerKind::Momentum { momentum: 0.9, nesterov: false };
        o.weight_decay = 0.0001;
        assert_eq!(o.to_string(), "momentum 0.9, lr 0.1, weight_decay 0.0001");
        o.schedule = Schedule::Cosine { decay_steps: 1000, min_lr: 0.001 };
        o.warmup_steps = 50;
        assert_eq!(
            o.to_string(),
            "momentum 0.9, lr 0.1, weight_decay 0.0001, cosine decay to 0.001 over 1000 updates, 50 warm-up updates"
        );
        assert!(!o.to_string().contains('{'));
    }

    #[test]
    fn bounds_are_enforced_and_name_the_field() {
        let ok = OptimizerSpec::sgd(0.1);
        assert!(ok.validate().is_ok());
        let adam = OptimizerSpec { kind: OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, ..ok };
        assert!(adam.validate().is_ok());
        for (bad, field) in [
            (OptimizerSpec { lr: 0.0, ..ok }, "lr"),
            (OptimizerSpec { lr: f32::NAN, ..ok }, "lr"),
            (OptimizerSpec { lr: 11.0, ..ok }, "lr"),
            (OptimizerSpec { weight_decay: -1.0, ..ok }, "weight_decay"),
            (OptimizerSpec { clip_gradient: -1.0, ..ok }, "clip_gradient"),
            (OptimizerSpec { kind: OptimizerKind::Momentum { momentum: 1.0, nesterov: false }, ..ok }, "momentum"),
            (OptimizerSpec { kind: OptimizerKind::Adam { beta1: 1.0, beta2: 0.9, eps: 1e-8 }, ..ok }, "beta1"),
            (OptimizerSpec { kind: OptimizerKind::AdamW { beta1: 0.9, beta2: 0.9, eps: 0.0 }, ..ok }, "eps"),
            (OptimizerSpec { schedule: Schedule::Step { every: 0, gamma: 0.5 }, ..ok }, "step_every"),
            (OptimizerSpec { schedule: Schedule::Cosine { decay_steps: 10, min_lr: 1.0 }, ..ok }, "min_lr"),
        ] {
            assert_eq!(bad.validate().unwrap_err().field, field, "{bad:?}");
        }
    }

    #[test]
    fn schedules() {
        let s = OptimizerSpec { schedule: Schedule::Step { every: 10, gamma: 0.5 }, ..OptimizerSpec::sgd(1.0) };
        assert_eq!((s.lr_at(1), s.lr_at(10), s.lr_at(11), s.lr_at(21)), (1.0, 1.0, 0.5, 0.25));
        let c =
            OptimizerSpec { schedule: Schedule::Cosine { decay_steps: 100, min_lr: 0.1 }, ..OptimizerSpec::sgd(1.0) };
        assert_eq!(c.lr_at(1), 1.0);
        assert!((c.lr_at(51) - 0.55).abs() < 1e-6);
        assert!((c.lr_at(101) - 0.1).abs() < 1e-6 && (c.lr_at(500) - 0.1).abs() < 1e-6);
        let w = OptimizerSpec { warmup_steps: 4, ..OptimizerSpec::sgd(1.0) };
        assert_eq!((w.lr_at(1), w.lr_at(2), w.lr_at(4), w.lr_at(5)), (0.25, 0.5, 1.0, 1.0));
    }

    /// Every rule moves f(x) = 0.5 * |x - target|^2 towards its optimum.
    #[test]
    fn every_rule_descends_a_convex_bowl() {
        let target = [3.0f32, -2.0, 0.5];
        let base = OptimizerSpec::sgd(0.1);
        for kind in [
            OptimizerKind::Sgd,
            OptimizerKind::Momentum { momentum: 0.9, nesterov: false },
            OptimizerKind::Momentum { momentum: 0.9, nesterov: true },
            OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            OptimizerKind::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        ] {
            for schedule in [Schedule::Constant, Schedule::Cosine { decay_steps: 400, min_lr: 0.01 }] {
                let spec = OptimizerSpec { kind, schedule, clip_gradient: 1.0, warmup_steps: 5, ..base };
                let mut opt = ShardOptimizer::new(spec, 3);
                let mut x = [0.0f32; 3];
                let dist = |x: &[f32; 3]| x.iter().zip(&target).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
                let start = dist(&x);
                for _ in 0..400 {
                    // Two "workers" report the same gradient: the sum is halved.
                    let g: Vec<f32> = x.iter().zip(&target).map(|(a, b)| a - b).collect();
                    opt.apply(&mut x, &[Grad::F32(&g), Grad::F32(&g)], 2);
                }
                assert!(dist(&x) < 0.05 * start, "{kind:?} {schedule:?} ended at {x:?}");
            }
        }
    }
}
