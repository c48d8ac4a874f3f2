//! `hybrid` (paper Table 3, right): CLUE's task-agnostic user features added to the user tower
//! of a task-specific model trained from scratch — BST's attended history or LightGCN's
//! propagated user vector gains a learned projection of the user's standardised CLUE features.
//! The base is the better of `bst` and `lightgcn` on validation in the same evaluation, as the
//! paper picks per task, or the one `[model.hybrid] base` names.

use std::collections::BTreeMap;

use burn::nn::Linear;
use burn::prelude::*;

use crate::eval::probe::{Matrix, tensor};
use crate::eval::task::HybridBase;
use crate::model::init::Init;

/// A learned projection of user features `[rows, cols]` into a model's user tower.
#[derive(Module, Debug)]
pub struct FeatureTower<B: Backend> {
    project: Linear<B>,
}

impl<B: Backend> FeatureTower<B> {
    /// `cols` is `None` for a plain task-specific model, which then has no tower.
    pub fn new(cols: Option<usize>, dim: usize, init: &mut Init<B>) -> Option<Self> {
        cols.map(|cols| Self {
            project: init.linear(cols, dim),
        })
    }

    /// The projected features `[users.len(), dim]` of the user rows `users`.
    pub fn forward(&self, x: &Matrix, users: &[usize]) -> Tensor<B, 2> {
        let device = self.project.weight.device();
        self.project
            .forward(tensor(x.rows(users), users.len(), x.cols, &device))
    }
}

/// What a model with an optional tower adds to its user side: `None` without a tower.
///
/// # Panics
/// If the model has a tower but no features are given (a caller's bug).
pub fn user_side<B: Backend>(
    tower: &Option<FeatureTower<B>>,
    x: Option<&Matrix>,
    users: &[usize],
) -> Option<Tensor<B, 2>> {
    tower
        .as_ref()
        .map(|t| t.forward(x.expect("a hybrid model is given its user features"), users))
}

/// The hybrid's base and the line the report gives for it: the configured one, or under
/// `auto` the better of `bst` and `lightgcn` by mean best validation MRR over seeds
/// (`validation`: per model and seed, (best validation MRR, its epoch)); a tie goes to `bst`.
pub fn pick_base(
    base: HybridBase,
    validation: &BTreeMap<String, Vec<(f64, usize)>>,
) -> (&'static str, String) {
    let mean = |m: &str| {
        let v = validation.get(m).map(Vec::as_slice).unwrap_or_default();
        v.iter().map(|x| x.0).sum::<f64>() / v.len().max(1) as f64
    };
    match base {
        HybridBase::Auto => {
            let (b, l) = (mean("bst"), mean("lightgcn"));
            let pick = if b >= l { "bst" } else { "lightgcn" };
            let why = format!(
                "{pick} + CLUE features (the better on validation: bst MRR {b:.4}, lightgcn {l:.4})"
            );
            (pick, why)
        }
        chosen => (
            chosen.name(),
            format!("{} + CLUE features ([model.hybrid] base)", chosen.name()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn auto_picks_the_better_base_on_mean_validation_mrr() {
        let v = BTreeMap::from([
            ("bst".to_string(), vec![(0.30, 3), (0.20, 4)]),
            ("lightgcn".to_string(), vec![(0.26, 9), (0.26, 7)]),
        ]);
        let (pick, why) = pick_base(HybridBase::Auto, &v);
        assert_eq!(pick, "lightgcn", "0.26 > mean(0.30, 0.20) = 0.25");
        assert!(why.contains("bst MRR 0.2500, lightgcn 0.2600"), "{why}");
        assert_eq!(pick_base(HybridBase::Bst, &v).0, "bst");
    }

    #[test]
    fn the_tower_projects_the_given_rows_and_is_absent_without_features() {
        let device = Default::default();
        let init = &mut Init::<Flex>::new(1, &device);
        assert!(FeatureTower::<Flex>::new(None, 4, init).is_none());
        let tower = FeatureTower::<Flex>::new(Some(2), 3, init);
        let data = [1.0, 2.0, 0.0, 0.0, -1.0, 5.0];
        let x = Matrix {
            data: &data,
            cols: 2,
        };
        let out = user_side(&tower, Some(&x), &[2, 1, 2]);
        let rows = crate::eval::probe::host(out.expect("a tower"));
        assert_eq!(rows.len(), 9);
        // Rows 0 and 2 are the same user; row 1 (zero features) is the bias alone.
        assert_eq!(rows[..3], rows[6..]);
        let bias = crate::eval::probe::host(tower.unwrap().project.bias.unwrap().val());
        assert_eq!(rows[3..6], bias[..]);
        assert_ne!(rows[..3], bias[..]);
    }
}
