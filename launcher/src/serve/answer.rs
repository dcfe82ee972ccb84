//! What a caller learns of one input: the label, and unless the policy says
//! labels only, the top-k classes with probabilities rounded to the policy's
//! precision; and the reply's JSON shape, `{"predictions": [...]}`.

use serde::Serialize;

use super::config::Policy;

/// One input's answer, as it is written in the reply (plain structs, not
/// `serde_json::Value` maps: this is on every request's path).
#[derive(Debug, Serialize)]
pub(super) struct Answer {
    label: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    top: Option<Vec<Top>>,
}

#[derive(Debug, Serialize)]
struct Top {
    class: usize,
    probability: f64,
}

/// The body of a successful reply.
#[derive(Serialize)]
pub(super) struct Predictions {
    pub(super) predictions: Vec<Answer>,
}

/// One input's answer under `p`: the label, and unless labels only, the
/// top-k classes with probabilities rounded to `p.precision` decimals.
pub(super) fn answer(probs: &[f32], p: &Policy) -> Answer {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    if p.labels_only {
        return Answer { label: order[0], top: None };
    }
    let scale = 10f64.powi(p.precision as i32);
    let top = order[..p.top_k]
        .iter()
        .map(|&c| Top { class: c, probability: (f64::from(probs[c]) * scale).round() / scale })
        .collect();
    Answer { label: order[0], top: Some(top) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_and_cut_as_configured() {
        let probs = [0.123456f32, 0.654321, 0.2, 0.022223];
        let p = Policy { precision: 2, top_k: 2, ..Policy::default() };
        let json = |a: Answer| serde_json::to_value(a).expect("serialises");
        assert_eq!(
            json(answer(&probs, &p)),
            serde_json::json!({"label": 1, "top": [{"class": 1, "probability": 0.65}, {"class": 2, "probability": 0.2}]})
        );
        let p4 = Policy { precision: 4, top_k: 1, ..Policy::default() };
        assert_eq!(json(answer(&probs, &p4))["top"][0]["probability"], 0.6543);
        assert_eq!(json(answer(&probs, &Policy { labels_only: true, ..p })), serde_json::json!({"label": 1}));
    }
}
