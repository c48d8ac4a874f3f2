//! Items of a batch cut into groups of similar length, each padded only to its own longest
//! item, for the Item Transformer (see [`crate::data::batcher::UserBatch`]).

/// Positions a group of items costs beyond its padded tokens (the per-operation overhead of one
/// more pass through the Item Transformer), for [`length_groups`].
pub const GROUP_OVERHEAD: usize = 256;

/// Cuts items sorted by length (`lengths`, ascending) into consecutive groups, each padded to
/// its longest, so that padded positions plus `overhead` per group are smallest. Returns each
/// group's end (exclusive); empty for no items.
pub fn length_groups(lengths: &[usize], overhead: usize) -> Vec<usize> {
    debug_assert!(lengths.is_sorted());
    // Candidate ends: where a run of equal lengths ends.
    let ends: Vec<usize> = (1..=lengths.len())
        .filter(|&e| e == lengths.len() || lengths[e] != lengths[e - 1])
        .collect();
    // best[j]: cost of items up to ends[j - 1]; from[j]: the previous cut.
    let mut best = vec![0usize; ends.len() + 1];
    let mut from = vec![0usize; ends.len() + 1];
    for j in 1..=ends.len() {
        let (end, width) = (ends[j - 1], lengths[ends[j - 1] - 1].max(1));
        (best[j], from[j]) = (0..j)
            .map(|i| {
                let start = if i == 0 { 0 } else { ends[i - 1] };
                (best[i] + (end - start) * width + overhead, i)
            })
            .min()
            .expect("j ≥ 1");
    }
    let mut cuts = Vec::new();
    let mut j = ends.len();
    while j > 0 {
        cuts.push(ends[j - 1]);
        j = from[j];
    }
    cuts.reverse();
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padded positions + overhead of cutting sorted `lengths` at `cuts`.
    fn cost(lengths: &[usize], cuts: &[usize], overhead: usize) -> usize {
        let mut start = 0;
        let mut total = 0;
        for &end in cuts {
            total += (end - start) * lengths[end - 1].max(1) + overhead;
            start = end;
        }
        total
    }

    #[test]
    fn length_groups_are_the_cheapest_cuts() {
        assert!(length_groups(&[], 10).is_empty());
        assert_eq!(
            length_groups(&[2, 2, 3, 4], 0),
            [2, 3, 4],
            "free groups: one per length"
        );
        assert_eq!(length_groups(&[2, 2, 3, 4], 1000), [4], "dear groups: one");
        let two_kinds: Vec<usize> = [vec![3; 100], vec![16; 100]].concat();
        assert_eq!(length_groups(&two_kinds, 256), [100, 200]);
        // Against every set of cuts at length changes, on random inputs.
        let mut state = 7u64;
        for _ in 0..200 {
            let mut next = || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as usize
            };
            let n = 1 + next() % 12;
            let mut lengths: Vec<usize> = (0..n).map(|_| next() % 9).collect();
            lengths.sort();
            let overhead = next() % 20;
            let got = length_groups(&lengths, overhead);
            assert_eq!(*got.last().unwrap(), n);
            let ends: Vec<usize> = (1..n).filter(|&e| lengths[e] != lengths[e - 1]).collect();
            let best = (0..1u32 << ends.len())
                .map(|mask| {
                    let mut cuts: Vec<usize> = (0..ends.len())
                        .filter(|&b| mask >> b & 1 == 1)
                        .map(|b| ends[b])
                        .collect();
                    cuts.push(n);
                    cost(&lengths, &cuts, overhead)
                })
                .min()
                .unwrap();
            assert_eq!(
                cost(&lengths, &got, overhead),
                best,
                "{lengths:?} +{overhead}"
            );
        }
    }
}
