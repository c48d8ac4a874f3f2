//! SimCLR views (`train.objective = "simclr"`, the paper's SimCLR baseline): a user's positive
//! pair is two random augmentations of one of their service sequences instead of two services.
//!
//! The augmentations are CL4SRec's (Xie et al., 2022), on item sequences: *crop* keeps a random
//! contiguous run of [`CROP`] of the items, *mask* drops a random [`MASK`] of them (clue's items
//! are texts, so there is no mask item to put in their place), *reorder* shuffles a random
//! contiguous run of [`REORDER`] of them. Each view applies one, picked at random. Everything is
//! drawn from a ChaCha stream keyed by (run seed, round, user): a resumed run sees the views the
//! uninterrupted one saw, and validation uses one fixed round.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Share of the items a crop keeps.
pub const CROP: f64 = 0.6;
/// Share of the items a mask drops.
pub const MASK: f64 = 0.3;
/// Share of the items a reorder shuffles.
pub const REORDER: f64 = 0.3;
/// The round validation and scoring draw their views with.
pub const VALID_ROUND: u64 = u64::MAX;
/// Draws of the second view before two equal views are accepted (a very short sequence).
const RETRIES: usize = 8;

/// The view maker of one round (a training period, or [`VALID_ROUND`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Views {
    pub seed: u64,
    pub round: u64,
}

impl Views {
    pub fn new(seed: u64, round: u64) -> Self {
        Self { seed, round }
    }

    /// Two views of one of `user`'s service sequences (picked at random among the non-empty
    /// ones), in place of the services. Both views are non-empty when the sequence is, and they
    /// differ whenever the sequence has two or more items.
    pub fn apply<T: Clone + PartialEq>(&self, user: u32, services: &[Vec<T>]) -> Vec<Vec<T>> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ self.round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.set_stream(user as u64);
        let filled: Vec<usize> = (0..services.len())
            .filter(|&s| !services[s].is_empty())
            .collect();
        let seq = match filled.len() {
            0 => Vec::new(),
            n => services[filled[rng.random_range(0..n)]].clone(),
        };
        let a = augment(&seq, &mut rng);
        let mut b = augment(&seq, &mut rng);
        for _ in 0..RETRIES {
            if a != b || seq.len() < 2 {
                break;
            }
            b = augment(&seq, &mut rng);
        }
        vec![a, b]
    }
}

/// One random augmentation of `seq`: crop, mask or reorder.
pub fn augment<T: Clone>(seq: &[T], rng: &mut impl Rng) -> Vec<T> {
    let n = seq.len();
    let part = |share: f64| ((share * n as f64).round() as usize).clamp(1, n.max(1));
    match rng.random_range(0..3) {
        0 => {
            let len = part(CROP);
            let start = rng.random_range(0..=n - len.min(n));
            seq[start..(start + len).min(n)].to_vec()
        }
        1 => {
            let drop = part(MASK).min(n.saturating_sub(1));
            let mut gone = vec![false; n];
            for i in rand::seq::index::sample(rng, n, drop) {
                gone[i] = true;
            }
            seq.iter()
                .zip(gone)
                .filter(|(_, g)| !g)
                .map(|(x, _)| x.clone())
                .collect()
        }
        _ => {
            let len = part(REORDER).max(2).min(n);
            let start = rng.random_range(0..=n - len);
            let mut out = seq.to_vec();
            out[start..start + len].shuffle(rng);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Services of `lens` items; item `i` of service `s` is `1000·s + i`.
    fn services(lens: &[usize]) -> Vec<Vec<u32>> {
        lens.iter()
            .enumerate()
            .map(|(s, &n)| (0..n as u32).map(|i| s as u32 * 1000 + i).collect())
            .collect()
    }

    #[test]
    fn views_are_seeded_never_empty_and_differ() {
        for user in 0..200 {
            let len = 1 + user as usize % 12;
            let s = services(&[len, 0, 3]);
            let v = Views::new(7, 3).apply(user, &s);
            assert_eq!(v, Views::new(7, 3).apply(user, &s), "same key, same views");
            assert_eq!(v.len(), 2);
            assert!(v.iter().all(|x| !x.is_empty()), "user {user}");
            // Both views come from one service, never the empty one.
            let service = v[0][0] / 1000;
            assert_ne!(service, 1);
            assert!(v.iter().flatten().all(|i| i / 1000 == service));
            if s[service as usize].len() >= 2 {
                assert_ne!(v[0], v[1], "user {user}: equal views");
            }
        }
        // Another round, seed or user draws other views.
        let s = services(&[10]);
        let base = Views::new(7, 3).apply(1, &s);
        assert_ne!(base, Views::new(7, 4).apply(1, &s));
        assert_ne!(base, Views::new(8, 3).apply(1, &s));
        assert_ne!(base, Views::new(7, 3).apply(2, &s));
    }

    #[test]
    fn each_augmentation_keeps_the_items_it_should() {
        let seq: Vec<u32> = (0..10).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut kinds = [0usize; 3];
        for _ in 0..300 {
            let v = augment(&seq, &mut rng);
            let sorted = {
                let mut s = v.clone();
                s.sort_unstable();
                s
            };
            if v.len() == 10 {
                // reorder: the same items, one run of 3 shuffled, the rest in place
                assert_eq!(sorted, seq);
                let moved: Vec<usize> = (0..10).filter(|&i| v[i] != seq[i]).collect();
                assert!(moved.last().map_or(0, |l| l - moved[0]) < 3, "{v:?}");
                kinds[2] += 1;
            } else if v.len() == 6 && v.windows(2).all(|w| w[1] == w[0] + 1) {
                kinds[0] += 1; // crop: 6 consecutive items
            } else {
                // mask: 3 dropped, the rest in order
                assert_eq!(v.len(), 7, "{v:?}");
                assert_eq!(sorted, v);
                kinds[1] += 1;
            }
        }
        assert!(kinds.iter().all(|&k| k > 60), "{kinds:?}");
        // A single item survives every augmentation.
        assert_eq!(augment(&[5u32], &mut rng), vec![5]);
        assert!(augment::<u32>(&[], &mut rng).is_empty());
    }
}
