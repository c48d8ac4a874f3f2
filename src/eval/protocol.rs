//! What every model is scored under: the task, its data, the shared negatives, the user rows of
//! each split and the test users of each group; ranks with pessimistic ties against the sampled
//! negatives and against the full catalogue.

use std::collections::HashSet;

use crate::data::store::Split;
use crate::eval::groups::user_groups;
use crate::eval::metrics::{Metrics, rank};
use crate::eval::report::ModelResult;
use crate::eval::task::Task;
use crate::eval::task_data::TaskData;
use crate::eval::train::TrainingPairs;

/// `(user row, sampled rank, full-catalogue rank)` of every positive of `split`, from a scorer
/// of (user row → scores of every item).
fn ranks(
    data: &TaskData,
    negatives: &[(usize, usize, Vec<usize>)],
    split: Split,
    scores: &dyn Fn(usize) -> Vec<f32>,
) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut cache: Option<(usize, Vec<f32>)> = None;
    for (u, p, negs) in negatives.iter().filter(|(u, ..)| data.split[*u] == split) {
        if cache.as_ref().is_none_or(|(cu, _)| cu != u) {
            cache = Some((*u, scores(*u)));
        }
        let s = &cache.as_ref().expect("set").1;
        let own: HashSet<usize> = data.targets[*u].iter().copied().collect();
        out.push((
            *u,
            rank(s[*p], negs.iter().map(|&j| s[j])),
            rank(
                s[*p],
                (0..s.len()).filter(|j| !own.contains(j)).map(|j| s[j]),
            ),
        ));
    }
    out
}

/// Metrics over the ranks of the users `keep` accepts.
fn result(ranks: &[(usize, usize, usize)], keep: impl Fn(usize) -> bool) -> ModelResult {
    let (sampled, full): (Vec<usize>, Vec<usize>) = ranks
        .iter()
        .filter(|r| keep(r.0))
        .map(|&(_, s, f)| (s, f))
        .unzip();
    ModelResult {
        sampled: Metrics::from_ranks(&sampled),
        full: Metrics::from_ranks(&full),
    }
}

/// One seed's metrics on a split, overall and in each of the protocol's user groups.
pub struct Scored {
    pub all: ModelResult,
    pub groups: Vec<ModelResult>,
}

/// A test user group: name, rule and user rows.
pub type Group = (&'static str, String, HashSet<usize>);

pub struct Protocol<'a> {
    pub task: &'a Task,
    pub data: &'a TaskData,
    pub negatives: &'a [(usize, usize, Vec<usize>)],
    pub train: Vec<usize>,
    pub valid: Vec<usize>,
    pub test: Vec<usize>,
    /// The test users of each user group.
    pub groups: Vec<Group>,
    /// Every training user's targets as (user row, item) positives.
    train_pairs: Vec<(usize, usize)>,
    /// Every user's targets.
    targets: Vec<HashSet<usize>>,
}

impl<'a> Protocol<'a> {
    pub fn new(
        task: &'a Task,
        data: &'a TaskData,
        negatives: &'a [(usize, usize, Vec<usize>)],
    ) -> Self {
        let rows = |s: Split| -> Vec<usize> {
            (0..data.users.len())
                .filter(|&u| data.split[u] == s)
                .collect()
        };
        let groups = user_groups(data)
            .into_iter()
            .map(|(name, users)| {
                let at = |u: &usize| data.activity[*u];
                let rule = match name {
                    "cold" => format!("activity ≤ {}", users.iter().map(at).max().unwrap_or(0)),
                    _ => format!("activity ≥ {}", users.iter().map(at).min().unwrap_or(0)),
                };
                let test = users
                    .into_iter()
                    .filter(|&u| data.split[u] == Split::Test)
                    .collect();
                (name, rule, test)
            })
            .collect();
        let train = rows(Split::Train);
        let train_pairs = train
            .iter()
            .flat_map(|&u| data.targets[u].iter().map(move |&i| (u, i)))
            .collect();
        Self {
            task,
            data,
            negatives,
            valid: rows(Split::Valid),
            test: rows(Split::Test),
            train,
            groups,
            train_pairs,
            targets: data
                .targets
                .iter()
                .map(|t| t.iter().copied().collect())
                .collect(),
        }
    }

    /// What every trained model is trained on.
    pub fn training(&self) -> TrainingPairs<'_> {
        TrainingPairs {
            pairs: &self.train_pairs,
            positives: &self.targets,
            n_items: self.data.item_ids.len(),
        }
    }

    /// Metrics on the valid or test split from `scores(rows)`: `[rows, items]` scores of the
    /// split's user rows over the catalogue.
    pub fn score(&self, split: Split, scores: &dyn Fn(&[usize]) -> Vec<f32>) -> Scored {
        let rows = match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        };
        let n = self.data.item_ids.len();
        let all = scores(rows);
        let at: std::collections::HashMap<usize, usize> =
            rows.iter().enumerate().map(|(i, &u)| (u, i)).collect();
        let s = |u: usize| all[at[&u] * n..(at[&u] + 1) * n].to_vec();
        self.score_by_user(split, &s)
    }

    /// Metrics on `split` from a scorer of one user row at a time.
    pub fn score_by_user(&self, split: Split, scores: &dyn Fn(usize) -> Vec<f32>) -> Scored {
        let r = ranks(self.data, self.negatives, split, scores);
        Scored {
            all: result(&r, |_| true),
            groups: self
                .groups
                .iter()
                .map(|(_, _, users)| result(&r, |u| users.contains(&u)))
                .collect(),
        }
    }

    /// Sampled validation MRR from `scores(rows)` (see [`Protocol::score`]).
    pub fn valid_mrr(&self, scores: &dyn Fn(&[usize]) -> Vec<f32>) -> f64 {
        self.score(Split::Valid, scores).all.sampled.mrr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluate(
        d: &TaskData,
        negs: &[(usize, usize, Vec<usize>)],
        scores: &dyn Fn(usize) -> Vec<f32>,
    ) -> ModelResult {
        result(&ranks(d, negs, Split::Test, scores), |_| true)
    }

    #[test]
    fn full_ranking_leaves_out_other_positives_and_constant_scores_rank_last() {
        let d = TaskData::for_test(vec![vec![0, 1]], vec![Split::Test], 5);
        let negs = vec![(0, 0, vec![2, 3]), (0, 1, vec![3, 4])];
        // Item 1 (another positive) outscores item 0 but does not count against it.
        let r = evaluate(&d, &negs, &|_| vec![0.5, 0.9, 0.1, 0.6, 0.2]);
        // Positive 0: sampled {2: .1, 3: .6} → rank 2; full {2, 3, 4} → rank 2.
        // Positive 1: sampled {3, 4} → rank 1; full → rank 1.
        assert_eq!(r.sampled.mrr, (0.5 + 1.0) / 2.0);
        assert_eq!(r.full.mrr, (0.5 + 1.0) / 2.0);
        let c = evaluate(&d, &negs, &|_| vec![1.0; 5]);
        assert_eq!(c.sampled.mrr, 1.0 / 3.0);
        assert_eq!(c.full.hr1, 0.0);
    }

    #[test]
    fn group_metrics_count_only_the_groups_users() {
        let d = TaskData::for_test(vec![vec![0], vec![1]], vec![Split::Test; 2], 3);
        let negs = vec![(0, 0, vec![1, 2]), (1, 1, vec![0, 2])];
        // User 0's positive ranks 1, user 1's ranks 3.
        let r = ranks(&d, &negs, Split::Test, &|_| vec![0.9, 0.1, 0.5]);
        assert_eq!(result(&r, |u| u == 0).sampled.mrr, 1.0);
        assert_eq!(result(&r, |u| u == 1).sampled.mrr, 1.0 / 3.0);
        assert_eq!(result(&r, |_| true).sampled.n, 2);
    }
}
