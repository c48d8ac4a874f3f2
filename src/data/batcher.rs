//! Burn `Dataset` over a prepared directory and the `Batcher` that pads users into tensors.

use std::collections::HashMap;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;

use crate::data::store::{PreparedDataset, Split};

/// One item of a user's sequence: its index in the item table and its tokens (prefix first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: u32,
    pub tokens: Vec<u32>,
}

/// One user: per service (the dataset's order), the most recent items, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSample {
    pub user: u32,
    pub services: Vec<Vec<Item>>,
}

/// The users of one split of a prepared dataset, each cut to `max_items` items per service and
/// `max_item_tokens` tokens per item.
pub struct UserDataset {
    data: Arc<PreparedDataset>,
    users: Vec<u32>,
    max_items: usize,
    max_item_tokens: usize,
}

impl UserDataset {
    pub fn new(
        data: Arc<PreparedDataset>,
        split: Split,
        max_items: usize,
        max_item_tokens: usize,
    ) -> Self {
        let users = data.users_in(split);
        Self::with_users(data, users, max_items, max_item_tokens)
    }

    pub fn with_users(
        data: Arc<PreparedDataset>,
        users: Vec<u32>,
        max_items: usize,
        max_item_tokens: usize,
    ) -> Self {
        Self {
            data,
            users,
            max_items,
            max_item_tokens,
        }
    }
}

impl Dataset<UserSample> for UserDataset {
    fn get(&self, index: usize) -> Option<UserSample> {
        let user = *self.users.get(index)?;
        let services = (0..self.data.num_services())
            .map(|s| {
                let seq = self.data.sequence(user as usize, s);
                let recent = &seq[seq.len().saturating_sub(self.max_items)..];
                recent
                    .iter()
                    .map(|&id| {
                        let mut tokens = self.data.item_tokens(id);
                        tokens.truncate(self.max_item_tokens);
                        Item { id, tokens }
                    })
                    .collect()
            })
            .collect();
        Some(UserSample { user, services })
    }

    fn len(&self) -> usize {
        self.users.len()
    }
}

/// A padded batch of users, all services stacked: row `s·batch + i` is user `i` in service `s`.
///
/// The distinct items of the batch are packed once each (`item_tokens`), so the Item Transformer
/// never runs on a padding slot nor twice on an item that several users share; `slot_item` puts
/// them back in place. [`UserBatch::tokens`] gives the plain `[rows, items, tokens]` view.
#[derive(Debug, Clone)]
pub struct UserBatch<B: Backend> {
    /// `[distinct items, tokens]` token ids, 0 = padding (extra all-padding rows may follow).
    pub item_tokens: Tensor<B, 2, Int>,
    /// `[services·batch, items]`, true where the item slot is padding.
    pub item_pad: Tensor<B, 2, Bool>,
    /// `[services·batch·items]`: 0 for a padding slot, else 1 + the slot's row in `item_tokens`.
    pub slot_item: Tensor<B, 1, Int>,
    /// Number of services stacked.
    pub services: usize,
    /// Dataset row of each user.
    pub users: Vec<u32>,
}

impl<B: Backend> UserBatch<B> {
    /// The padded token ids `[services·batch, items, tokens]` (0 = padding).
    pub fn tokens(&self) -> Tensor<B, 3, Int> {
        let [rows, slots] = self.item_pad.dims();
        let len = self.item_tokens.dims()[1];
        let zero = self.item_tokens.clone().slice([0..1, 0..len]).zeros_like();
        Tensor::cat(vec![zero, self.item_tokens.clone()], 0)
            .select(0, self.slot_item.clone())
            .reshape([rows, slots, len])
    }
}

/// Fixed tensor shapes for accelerators, where every new shape costs a kernel compilation and
/// an autotune run: slots and tokens are padded to the model's maxima and the number of distinct
/// items to a multiple of `item_multiple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedShape {
    pub items: usize,
    pub tokens: usize,
    pub item_multiple: usize,
}

/// Pads [`UserSample`]s into a [`UserBatch`]: to the batch's own maxima, or to a [`FixedShape`].
#[derive(Debug, Clone, Default)]
pub struct UserBatcher {
    pub fixed: Option<FixedShape>,
}

impl UserBatcher {
    pub fn fixed(shape: FixedShape) -> Self {
        Self { fixed: Some(shape) }
    }
}

impl<B: Backend> Batcher<B, UserSample, UserBatch<B>> for UserBatcher {
    fn batch(&self, samples: Vec<UserSample>, device: &B::Device) -> UserBatch<B> {
        let n = samples.len();
        let services = samples.first().map(|s| s.services.len()).unwrap_or(0);
        let longest = samples
            .iter()
            .flat_map(|s| s.services.iter().map(Vec::len))
            .max()
            .unwrap_or(0);
        let widest = samples
            .iter()
            .flat_map(|s| s.services.iter().flatten().map(|i| i.tokens.len()))
            .max()
            .unwrap_or(0);
        let (slots, len) = match self.fixed {
            Some(f) => (f.items.max(longest), f.tokens.max(widest)),
            None => (longest.max(1), widest.max(1)),
        };
        let rows = services * n;
        let mut item_pad = vec![true; rows * slots];
        let mut slot_item = vec![0i64; rows * slots];
        let mut item_tokens: Vec<i64> = Vec::new();
        let mut seen: HashMap<u32, i64> = HashMap::new();
        for (i, sample) in samples.iter().enumerate() {
            for (s, items) in sample.services.iter().enumerate() {
                let row = s * n + i;
                for (j, item) in items.iter().enumerate() {
                    let slot = row * slots + j;
                    item_pad[slot] = false;
                    let unique = *seen.entry(item.id).or_insert_with(|| {
                        let start = item_tokens.len();
                        item_tokens.resize(start + len, 0);
                        for (k, &t) in item.tokens.iter().enumerate() {
                            item_tokens[start + k] = t as i64;
                        }
                        (start / len) as i64
                    });
                    slot_item[slot] = unique + 1;
                }
            }
        }
        let mut distinct = item_tokens.len() / len;
        if let Some(f) = self.fixed {
            distinct = distinct.max(1).div_ceil(f.item_multiple.max(1)) * f.item_multiple.max(1);
            item_tokens.resize(distinct * len, 0);
        }
        UserBatch {
            item_tokens: Tensor::from_data(TensorData::new(item_tokens, [distinct, len]), device),
            item_pad: Tensor::from_data(TensorData::new(item_pad, [rows, slots]), device),
            slot_item: Tensor::from_data(TensorData::new(slot_item, [rows * slots]), device),
            services,
            users: samples.iter().map(|s| s.user).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    fn item(id: u32, tokens: &[u32]) -> Item {
        Item {
            id,
            tokens: tokens.to_vec(),
        }
    }

    #[test]
    fn batch_pads_items_and_tokens_and_lists_each_distinct_item_once() {
        let samples = vec![
            UserSample {
                user: 0,
                services: vec![
                    vec![item(5, &[1, 9, 9])],
                    vec![item(7, &[2, 8]), item(8, &[2, 6, 6, 6])],
                ],
            },
            UserSample {
                user: 1,
                services: vec![
                    vec![item(5, &[1, 9, 9]), item(6, &[1, 4])],
                    vec![item(7, &[2, 8])],
                ],
            },
        ];
        let b: UserBatch<NdArray> =
            UserBatcher::default().batch(samples.clone(), &Default::default());
        assert_eq!(b.tokens().dims(), [4, 2, 4]);
        let tokens: Vec<i64> = b.tokens().to_data().convert::<i64>().to_vec().unwrap();
        // Row 0 = user 0 service 0; row 3 = user 1 service 1.
        assert_eq!(&tokens[0..8], &[1, 9, 9, 0, 0, 0, 0, 0]);
        assert_eq!(&tokens[3 * 8..3 * 8 + 4], &[2, 8, 0, 0]);
        let pad: Vec<bool> = b.item_pad.to_data().to_vec().unwrap();
        assert_eq!(
            pad,
            vec![false, true, false, false, false, false, false, true]
        );
        // Items 5, 7, 8, 6 are distinct; 5 and 7 appear twice.
        let slot_item: Vec<i64> = b.slot_item.to_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(b.item_tokens.dims(), [4, 4], "four distinct items");
        assert_eq!(
            slot_item[0], slot_item[2],
            "item 5 of users 0 and 1 shares one entry"
        );
        assert_eq!(
            slot_item[4], slot_item[6],
            "item 7 of users 0 and 1 shares one entry"
        );
        assert_eq!(slot_item[1], 0, "padding slot");
        let packed: Vec<i64> = b.item_tokens.to_data().convert::<i64>().to_vec().unwrap();
        for (slot, &u) in slot_item.iter().enumerate() {
            if u > 0 {
                let row = (u - 1) as usize;
                assert_eq!(packed[row * 4..row * 4 + 4], tokens[slot * 4..slot * 4 + 4]);
            }
        }
        let fixed = UserBatcher::fixed(FixedShape {
            items: 8,
            tokens: 6,
            item_multiple: 16,
        });
        let f: UserBatch<NdArray> = fixed.batch(samples, &Default::default());
        assert_eq!(f.tokens().dims(), [4, 8, 6]);
        assert_eq!(
            f.item_tokens.dims(),
            [16, 6],
            "distinct items padded to a multiple of 16"
        );
        let again: Vec<i64> = f
            .tokens()
            .slice([0..4, 0..2, 0..4])
            .to_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        assert_eq!(again, tokens, "same content, more padding");
    }
}
