//! The sampled negatives: drawn once per valid/test positive with a seed, shared by every model.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::store::Split;
use crate::error::{ClueError, Result};
use crate::eval::task_data::TaskData;

/// For every valid/test positive: `(user, positive, negatives)`, drawn once with a seed.
pub fn draw_negatives(
    data: &TaskData,
    count: usize,
    seed: u64,
) -> Result<Vec<(usize, usize, Vec<usize>)>> {
    let n_items = data.item_ids.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (u, targets) in data.targets.iter().enumerate() {
        if data.split[u] == Split::Train {
            continue;
        }
        let own: HashSet<usize> = targets.iter().copied().collect();
        if n_items < own.len() + count {
            return Err(ClueError::config(
                format!(
                    "{n_items} items cannot give {count} negatives besides a user's {} positives",
                    own.len()
                ),
                "lower [negatives] count in the task file",
            ));
        }
        for &p in targets {
            let mut negs: Vec<usize> = Vec::with_capacity(count);
            let mut chosen = HashSet::new();
            while negs.len() < count {
                let j = rng.random_range(0..n_items);
                if !own.contains(&j) && chosen.insert(j) {
                    negs.push(j);
                }
            }
            out.push((u, p, negs));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negatives_avoid_every_positive_and_repeat_with_the_seed() {
        let d = TaskData::for_test(
            vec![vec![0, 1], vec![2], vec![3]],
            vec![Split::Test, Split::Train, Split::Valid],
            120,
        );
        let a = draw_negatives(&d, 100, 5).unwrap();
        assert_eq!(
            a.len(),
            3,
            "two test positives and one valid one; train users get none"
        );
        for (u, p, negs) in &a {
            assert_eq!(negs.len(), 100);
            assert!(!negs.contains(p));
            assert!(negs.iter().all(|j| !d.targets[*u].contains(j)));
            assert_eq!(negs.iter().collect::<HashSet<_>>().len(), 100, "distinct");
        }
        assert_eq!(a, draw_negatives(&d, 100, 5).unwrap());
        assert_ne!(a, draw_negatives(&d, 100, 6).unwrap());
        assert!(draw_negatives(&d, 119, 5).is_err(), "not enough items");
    }
}
