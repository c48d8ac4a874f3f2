//! What the CLUE embeddings are compared with: the text-mean user features (fed to the same
//! probe), the non-learned TopPop and random scorers, and the feature standardisation every probe
//! model gets.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::history::Histories;
use crate::eval::task_data::TaskData;

/// Standardise columns with the train rows' mean and standard deviation.
pub fn standardise(x: &mut [f32], cols: usize, train: &[usize]) {
    for c in 0..cols {
        let vals: Vec<f64> = train.iter().map(|&r| x[r * cols + c] as f64).collect();
        let mean = vals.iter().sum::<f64>() / vals.len().max(1) as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len().max(1) as f64;
        let sd = var.sqrt().max(1e-6);
        for r in 0..x.len() / cols {
            x[r * cols + c] = ((x[r * cols + c] as f64 - mean) / sd) as f32;
        }
    }
}

/// Mean of the frozen item vectors of each user's history, per service, concatenated.
pub fn text_mean(h: &Histories, cache: &[f32], d: usize) -> Vec<f32> {
    let k = h.services.len();
    let mut out = vec![0f32; h.users.len() * k * d];
    for (u, per) in h.seqs.iter().enumerate() {
        for (s, seq) in per.iter().enumerate() {
            let row = &mut out[(u * k + s) * d..(u * k + s + 1) * d];
            for &i in seq {
                for (o, v) in row
                    .iter_mut()
                    .zip(&cache[i as usize * d..(i as usize + 1) * d])
                {
                    *o += v / seq.len() as f32;
                }
            }
        }
    }
    out
}

/// TopPop: every user gets the same scores, each item's count among the targets of the training
/// users `train_rows` (never the valid/test users').
pub fn toppop_scores(data: &TaskData, train_rows: &[usize]) -> Vec<f32> {
    let mut pop = vec![0f32; data.item_ids.len()];
    for &u in train_rows {
        for &i in &data.targets[u] {
            pop[i] += 1.0;
        }
    }
    pop
}

/// Random: uniform scores for user row `user` over `n_items` items, from a generator seeded by
/// `seed` and the user, so a user's scores are the same whenever they are asked for.
pub fn random_scores(seed: u64, user: usize, n_items: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((user as u64) << 20));
    (0..n_items).map(|_| rng.random::<f32>()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::store::Split;

    #[test]
    fn toppop_counts_only_the_training_users_targets() {
        let train_only = TaskData::for_test(
            vec![vec![0, 1], vec![1], vec![], vec![]],
            vec![Split::Train, Split::Train, Split::Test, Split::Valid],
            5,
        );
        // The same training users; the test and valid users pile targets onto items 2 and 3.
        let d = TaskData::for_test(
            vec![vec![0, 1], vec![1], vec![2; 50], vec![3, 2, 0]],
            vec![Split::Train, Split::Train, Split::Test, Split::Valid],
            5,
        );
        let train_rows = [0, 1];
        assert_eq!(toppop_scores(&d, &train_rows), [1.0, 2.0, 0.0, 0.0, 0.0]);
        assert_eq!(
            toppop_scores(&d, &train_rows),
            toppop_scores(&train_only, &train_rows)
        );
    }

    #[test]
    fn random_scores_repeat_per_seed_and_user() {
        let a = random_scores(13, 4, 10);
        assert_eq!(a.len(), 10);
        assert!(a.iter().all(|s| (0.0..1.0).contains(s)));
        assert_eq!(a, random_scores(13, 4, 10));
        assert_ne!(a, random_scores(13, 5, 10));
        assert_ne!(a, random_scores(14, 4, 10));
    }

    #[test]
    fn standardise_uses_the_training_rows_statistics_only() {
        // Rows 0, 2, 3 train; rows 1 and 4 (valid/test) hold values that would move any
        // statistic they took part in.
        let mut x = vec![
            1.0, 10.0, //
            1e6, -1e6, //
            3.0, 10.0, //
            5.0, 40.0, //
            7.0, 20.0,
        ];
        let train = [0, 2, 3];
        standardise(&mut x, 2, &train);
        for c in 0..2 {
            let vals: Vec<f64> = train.iter().map(|&r| x[r * 2 + c] as f64).collect();
            let mean = vals.iter().sum::<f64>() / 3.0;
            let sd = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
            assert!(mean.abs() < 1e-5, "column {c}: train mean {mean}");
            assert!((sd - 1.0).abs() < 1e-5, "column {c}: train sd {sd}");
        }
        // Column 0's train values 1, 3, 5: mean 3, sd √(8/3); so 7 → 4/√(8/3) = √6.
        assert!((x[8] as f64 - 6f64.sqrt()).abs() < 1e-5, "{}", x[8]);
        // Column 1's train values 10, 10, 40: mean 20, sd √200; so 20 → 0, and row 1's -1e6 →
        // (-1e6 - 20)/√200.
        assert!(x[9].abs() < 1e-6);
        let expected = (-1e6 - 20.0) / 200f64.sqrt();
        assert!((x[3] as f64 - expected).abs() < 1e-6 * expected.abs());
    }
}
