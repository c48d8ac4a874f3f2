//! Ranking metrics with pessimistic ties: an item scored equal to the positive ranks above it, so
//! a model that gives every item the same score ranks each positive last.

use serde::{Deserialize, Serialize};

/// 1-based rank of the positive among `negatives` (ties count against the model).
pub fn rank(positive: f32, negatives: impl IntoIterator<Item = f32>) -> usize {
    1 + negatives
        .into_iter()
        .filter(|&s| s >= positive || s.is_nan())
        .count()
}

/// Means over evaluation positives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(rename = "hr@1")]
    pub hr1: f64,
    #[serde(rename = "hr@10")]
    pub hr10: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg10: f64,
    pub mrr: f64,
    /// Evaluation positives the means are over.
    pub n: usize,
}

impl Metrics {
    pub fn from_ranks(ranks: &[usize]) -> Self {
        let n = ranks.len();
        let mean =
            |f: &dyn Fn(usize) -> f64| ranks.iter().map(|&r| f(r)).sum::<f64>() / n.max(1) as f64;
        Self {
            hr1: mean(&|r| (r <= 1) as u8 as f64),
            hr10: mean(&|r| (r <= 10) as u8 as f64),
            ndcg10: mean(&|r| {
                if r <= 10 {
                    1.0 / (r as f64 + 1.0).log2()
                } else {
                    0.0
                }
            }),
            mrr: mean(&|r| 1.0 / r as f64),
            n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_pessimistic_about_ties() {
        assert_eq!(rank(0.9, [0.1, 0.5, 0.3]), 1);
        assert_eq!(rank(0.4, [0.1, 0.5, 0.3]), 2);
        assert_eq!(rank(0.5, [0.5, 0.5, 0.1]), 3);
        // A constant scorer puts the positive last.
        assert_eq!(rank(1.0, vec![1.0; 100]), 101);
        assert_eq!(rank(0.0, [f32::NAN]), 2);
    }

    #[test]
    fn metrics_match_hand_worked_ranks() {
        // Ranks 1, 3, 11: HR@1 = 1/3, HR@10 = 2/3, NDCG@10 = (1 + 1/log2(4) + 0)/3 = 0.5,
        // MRR = (1 + 1/3 + 1/11)/3.
        let m = Metrics::from_ranks(&[1, 3, 11]);
        assert!((m.hr1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((m.hr10 - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.ndcg10 - 0.5).abs() < 1e-12);
        assert!((m.mrr - (1.0 + 1.0 / 3.0 + 1.0 / 11.0) / 3.0).abs() < 1e-12);
        assert_eq!(m.n, 3);
        let constant = Metrics::from_ranks(&[101; 5]);
        assert_eq!(
            (constant.hr1, constant.hr10, constant.ndcg10),
            (0.0, 0.0, 0.0)
        );
    }
}
