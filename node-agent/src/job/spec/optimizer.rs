//! `[optimizer]`: the update rule servers apply, its learning-rate schedule,
//! and the keys each rule and schedule owns. The validated type is
//! [`OptimizerSpec`], which also travels on the wire; its numeric bounds are
//! [`OptimizerSpec::validate`]'s, shared with the wire decoder.

use std::ops::Range;

use toml::Spanned;

use super::{SpecError, Src, int_in, raw};
use crate::train::optimizer::{OptimizerKind, OptimizerSpec, Schedule};

/// Checks `[optimizer]`: a known rule and schedule, no key of another rule
/// or schedule, and values within [`OptimizerSpec::validate`]'s bounds.
pub(super) fn convert_optimizer(
    src: &Src<'_>,
    optimizer: &Spanned<raw::Optimizer>,
) -> Result<OptimizerSpec, SpecError> {
    let o = optimizer.get_ref();
    let kind = convert_kind(src, o)?;
    check_rule_keys(src, o, kind)?;
    let schedule = convert_schedule(src, o)?;
    let optimizer = OptimizerSpec {
        kind,
        lr: *o.lr.get_ref() as f32,
        weight_decay: f32_of(&o.weight_decay, 0.0),
        clip_gradient: f32_of(&o.clip_gradient, 0.0),
        schedule,
        warmup_steps: updates(src, &o.warmup_steps, "warmup_steps")?.unwrap_or(0),
    };
    if let Err(e) = optimizer.validate() {
        return Err(src.err(field_span(o, e.field), e.to_string(), e.help()));
    }
    Ok(optimizer)
}

/// A float key, or its default.
fn f32_of(v: &Option<Spanned<f64>>, default: f32) -> f32 {
    v.as_ref().map_or(default, |x| *x.get_ref() as f32)
}

/// A count of updates (`warmup_steps`, `step_every`, `decay_steps`).
fn updates(src: &Src<'_>, v: &Option<Spanned<i64>>, what: &str) -> Result<Option<u64>, SpecError> {
    v.as_ref().map(|v| int_in::<u64>(src, v, what, 0, 1_000_000_000, "a number of updates")).transpose()
}

/// `kind`, with the rule's own numbers.
fn convert_kind(src: &Src<'_>, o: &raw::Optimizer) -> Result<OptimizerKind, SpecError> {
    let kind_name = o.kind.get_ref().as_str();
    Ok(match kind_name {
        "sgd" => OptimizerKind::Sgd,
        "momentum" => OptimizerKind::Momentum {
            momentum: f32_of(&o.momentum, 0.9),
            nesterov: o.nesterov.as_ref().is_some_and(|n| *n.get_ref()),
        },
        "adam" | "adamw" => {
            let (beta1, beta2, eps) = (f32_of(&o.beta1, 0.9), f32_of(&o.beta2, 0.999), f32_of(&o.eps, 1e-8));
            if kind_name == "adam" {
                OptimizerKind::Adam { beta1, beta2, eps }
            } else {
                OptimizerKind::AdamW { beta1, beta2, eps }
            }
        }
        other => {
            return Err(src.err(
                o.kind.span(),
                format!("unknown optimizer kind `{other}`"),
                "supported: \"sgd\", \"momentum\", \"adam\", \"adamw\"",
            ));
        }
    })
}

/// Keys that belong to another rule are errors, not silently ignored.
fn check_rule_keys(src: &Src<'_>, o: &raw::Optimizer, kind: OptimizerKind) -> Result<(), SpecError> {
    let foreign: &[(&str, Option<Range<usize>>)] = &[
        ("momentum", o.momentum.as_ref().map(|v| v.span())),
        ("nesterov", o.nesterov.as_ref().map(|v| v.span())),
        ("beta1", o.beta1.as_ref().map(|v| v.span())),
        ("beta2", o.beta2.as_ref().map(|v| v.span())),
        ("eps", o.eps.as_ref().map(|v| v.span())),
    ];
    for (key, span) in foreign {
        let owner = if matches!(*key, "momentum" | "nesterov") { "momentum" } else { "adam\" or kind = \"adamw" };
        let belongs = match kind {
            OptimizerKind::Momentum { .. } => matches!(*key, "momentum" | "nesterov"),
            OptimizerKind::Adam { .. } | OptimizerKind::AdamW { .. } => matches!(*key, "beta1" | "beta2" | "eps"),
            OptimizerKind::Sgd => false,
        };
        if let (Some(span), false) = (span, belongs) {
            return Err(src.err(
                span.clone(),
                format!("`{key}` needs kind = \"{owner}\""),
                format!("set kind = \"{owner}\", or remove `{key}`"),
            ));
        }
    }
    Ok(())
}

/// `schedule` and the keys of the schedule it names.
fn convert_schedule(src: &Src<'_>, o: &raw::Optimizer) -> Result<Schedule, SpecError> {
    let sched_name = o.schedule.as_ref().map_or("constant", |s| s.get_ref().as_str());
    let sched_keys = [
        ("step_every", "step", o.step_every.as_ref().map(|v| v.span())),
        ("step_gamma", "step", o.step_gamma.as_ref().map(|v| v.span())),
        ("decay_steps", "cosine", o.decay_steps.as_ref().map(|v| v.span())),
        ("min_lr", "cosine", o.min_lr.as_ref().map(|v| v.span())),
    ];
    for (key, owner, span) in &sched_keys {
        if let (Some(span), true) = (span, sched_name != *owner) {
            return Err(src.err(
                span.clone(),
                format!("`{key}` needs schedule = \"{owner}\""),
                format!("set schedule = \"{owner}\", or remove `{key}`"),
            ));
        }
    }
    let schedule_span = || o.schedule.as_ref().map(|s| s.span()).unwrap_or_default();
    Ok(match sched_name {
        "constant" => Schedule::Constant,
        "step" => Schedule::Step {
            every: updates(src, &o.step_every, "step_every")?.ok_or_else(|| {
                src.err(
                    schedule_span(),
                    "schedule = \"step\" needs step_every",
                    "add for example step_every = 1000 (updates between decays)",
                )
            })?,
            gamma: f32_of(&o.step_gamma, 0.1),
        },
        "cosine" => Schedule::Cosine {
            decay_steps: updates(src, &o.decay_steps, "decay_steps")?.ok_or_else(|| {
                src.err(
                    schedule_span(),
                    "schedule = \"cosine\" needs decay_steps",
                    "add for example decay_steps = 5000 (updates to decay over)",
                )
            })?,
            min_lr: f32_of(&o.min_lr, 0.0),
        },
        other => {
            return Err(src.err(
                schedule_span(),
                format!("unknown schedule `{other}`"),
                "supported: \"constant\", \"step\", \"cosine\"",
            ));
        }
    })
}

/// Where [`OptimizerSpec::validate`]'s complaint about `field` points: the
/// key, or `kind` when the file leaves the key at its default.
fn field_span(o: &raw::Optimizer, field: &str) -> Range<usize> {
    let float = |v: &Option<Spanned<f64>>| v.as_ref().map(|x| x.span());
    match field {
        "lr" => Some(o.lr.span()),
        "momentum" => float(&o.momentum),
        "weight_decay" => float(&o.weight_decay),
        "clip_gradient" => float(&o.clip_gradient),
        "beta1" => float(&o.beta1),
        "beta2" => float(&o.beta2),
        "eps" => float(&o.eps),
        "step_gamma" => float(&o.step_gamma),
        "min_lr" => float(&o.min_lr),
        "step_every" => o.step_every.as_ref().map(|v| v.span()),
        "decay_steps" => o.decay_steps.as_ref().map(|v| v.span()),
        _ => None,
    }
    .unwrap_or(o.kind.span())
}
