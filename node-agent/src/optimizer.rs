//! Optimizers as data.
//!
//! MXNet let workers send pickled optimizer objects that servers unpickled and
//! ran. Here an optimizer is a [`OptimizerSpec`]: a kind from a closed list
//! plus numbers, each checked against bounds by [`OptimizerSpec::validate`]
//! wherever one is made: from the job file, or decoded off the wire. Servers
//! apply it with the kernels in `warden-kernels`.

use std::fmt;

use serde::Serialize;

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
}

/// A complete, validated-on-construction optimizer description.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OptimizerSpec {
    /// The rule.
    #[serde(flatten)]
    pub kind: OptimizerKind,
    /// Learning rate, (0, 10].
    pub lr: f32,
    /// L2 weight decay, [0, 1).
    pub weight_decay: f32,
}

/// An optimizer value outside its bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerError {
    /// Which field.
    pub field: &'static str,
    /// Its value.
    pub value: f32,
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
            "lr" => "a learning rate above 0 and at most 10; 0.1 is a common start for SGD".into(),
            "momentum" => "momentum from 0 up to (not including) 1; 0.9 is common".into(),
            "weight_decay" => "weight decay from 0 up to (not including) 1; 0.0001 is common".into(),
            _ => String::new(),
        }
    }
}

fn check(field: &'static str, value: f32, ok: bool, range: &'static str) -> Result<(), OptimizerError> {
    if ok && value.is_finite() { Ok(()) } else { Err(OptimizerError { field, value, range }) }
}

impl OptimizerSpec {
    /// Checks every number against its bounds.
    pub fn validate(&self) -> Result<(), OptimizerError> {
        check("lr", self.lr, self.lr > 0.0 && self.lr <= 10.0, "(0, 10]")?;
        check("weight_decay", self.weight_decay, (0.0..1.0).contains(&self.weight_decay), "[0, 1)")?;
        if let OptimizerKind::Momentum { momentum, .. } = self.kind {
            check("momentum", momentum, (0.0..1.0).contains(&momentum), "[0, 1)")?;
        }
        Ok(())
    }

    /// Per-parameter state slots this rule keeps.
    pub fn state_slots(&self) -> usize {
        match self.kind {
            OptimizerKind::Sgd => 0,
            OptimizerKind::Momentum { .. } => 1,
        }
    }
}

/// A server's optimizer: the spec plus its state for one shard.
#[derive(Debug)]
pub struct ShardOptimizer {
    spec: OptimizerSpec,
    velocity: Vec<f32>,
}

impl ShardOptimizer {
    /// State for a shard of `len` parameters.
    pub fn new(spec: OptimizerSpec, len: usize) -> ShardOptimizer {
        let velocity = if spec.state_slots() > 0 { vec![0.0; len] } else { Vec::new() };
        ShardOptimizer { spec, velocity }
    }

    /// The rule in force.
    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Applies one update: `grad_sum` is the sum of `count` workers' gradients.
    pub fn apply(&mut self, params: &mut [f32], grad_sum: &[f32], count: usize) {
        let scale = 1.0 / count.max(1) as f32;
        let s = &self.spec;
        match s.kind {
            OptimizerKind::Sgd => warden_kernels::sgd_update(params, grad_sum, scale, s.lr, s.weight_decay),
            OptimizerKind::Momentum { momentum, nesterov } => warden_kernels::momentum_update(
                params,
                &mut self.velocity,
                grad_sum,
                warden_kernels::MomentumParams { scale, lr: s.lr, weight_decay: s.weight_decay, momentum, nesterov },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced() {
        let ok = OptimizerSpec { kind: OptimizerKind::Sgd, lr: 0.1, weight_decay: 0.0 };
        assert!(ok.validate().is_ok());
        for bad in [
            OptimizerSpec { lr: 0.0, ..ok },
            OptimizerSpec { lr: f32::NAN, ..ok },
            OptimizerSpec { lr: 11.0, ..ok },
            OptimizerSpec { weight_decay: -1.0, ..ok },
            OptimizerSpec { kind: OptimizerKind::Momentum { momentum: 1.0, nesterov: false }, ..ok },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sgd_moves_against_the_mean_gradient() {
        let spec = OptimizerSpec { kind: OptimizerKind::Sgd, lr: 0.5, weight_decay: 0.0 };
        let mut opt = ShardOptimizer::new(spec, 2);
        let mut p = vec![1.0, 1.0];
        opt.apply(&mut p, &[2.0, -4.0], 2);
        assert_eq!(p, vec![0.5, 2.0]);
    }
}
