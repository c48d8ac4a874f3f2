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
/// Real items are also listed once each (`unique_slots`), so the Item Transformer never runs on a
/// padding slot nor twice on an item that several users of the batch share.
#[derive(Debug, Clone)]
pub struct UserBatch<B: Backend> {
    /// `[services·batch, items, tokens]` token ids, 0 = padding.
    pub tokens: Tensor<B, 3, Int>,
    /// `[services·batch, items]`, true where the item slot is padding.
    pub item_pad: Tensor<B, 2, Bool>,
    /// `[distinct items]` flat slot (in `services·batch·items`) where each distinct item first occurs.
    pub unique_slots: Tensor<B, 1, Int>,
    /// `[services·batch·items]`: 0 for a padding slot, else 1 + the slot's distinct-item index.
    pub slot_item: Tensor<B, 1, Int>,
    /// Number of services stacked.
    pub services: usize,
    /// Dataset row of each user.
    pub users: Vec<u32>,
}

impl<B: Backend> UserBatch<B> {
    pub fn batch_size(&self) -> usize {
        self.users.len()
    }
}

/// Pads [`UserSample`]s into a [`UserBatch`].
#[derive(Debug, Clone, Default)]
pub struct UserBatcher;

impl<B: Backend> Batcher<B, UserSample, UserBatch<B>> for UserBatcher {
    fn batch(&self, samples: Vec<UserSample>, device: &B::Device) -> UserBatch<B> {
        let n = samples.len();
        let services = samples.first().map(|s| s.services.len()).unwrap_or(0);
        let max_items = samples
            .iter()
            .flat_map(|s| s.services.iter().map(Vec::len))
            .max()
            .unwrap_or(0)
            .max(1);
        let max_tokens = samples
            .iter()
            .flat_map(|s| s.services.iter().flatten().map(|i| i.tokens.len()))
            .max()
            .unwrap_or(0)
            .max(1);
        let rows = services * n;
        let mut tokens = vec![0i64; rows * max_items * max_tokens];
        let mut item_pad = vec![true; rows * max_items];
        let mut slot_item = vec![0i64; rows * max_items];
        let mut unique_slots: Vec<i64> = Vec::new();
        let mut seen: HashMap<u32, i64> = HashMap::new();
        for (i, sample) in samples.iter().enumerate() {
            for (s, items) in sample.services.iter().enumerate() {
                let row = s * n + i;
                for (j, item) in items.iter().enumerate() {
                    let slot = row * max_items + j;
                    item_pad[slot] = false;
                    let base = slot * max_tokens;
                    for (k, &t) in item.tokens.iter().enumerate() {
                        tokens[base + k] = t as i64;
                    }
                    let unique = *seen.entry(item.id).or_insert_with(|| {
                        unique_slots.push(slot as i64);
                        unique_slots.len() as i64 - 1
                    });
                    slot_item[slot] = unique + 1;
                }
            }
        }
        let n_unique = unique_slots.len();
        UserBatch {
            tokens: Tensor::from_data(
                TensorData::new(tokens, [rows, max_items, max_tokens]),
                device,
            ),
            item_pad: Tensor::from_data(TensorData::new(item_pad, [rows, max_items]), device),
            unique_slots: Tensor::from_data(TensorData::new(unique_slots, [n_unique]), device),
            slot_item: Tensor::from_data(TensorData::new(slot_item, [rows * max_items]), device),
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
        let b: UserBatch<NdArray> = UserBatcher.batch(samples, &Default::default());
        assert_eq!(b.tokens.dims(), [4, 2, 4]);
        let tokens: Vec<i64> = b.tokens.to_data().convert::<i64>().to_vec().unwrap();
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
        let unique: Vec<i64> = b.unique_slots.to_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(unique.len(), 4);
        assert_eq!(
            slot_item[0], slot_item[2],
            "item 5 of users 0 and 1 shares one entry"
        );
        assert_eq!(
            slot_item[4], slot_item[6],
            "item 7 of users 0 and 1 shares one entry"
        );
        assert_eq!(slot_item[1], 0, "padding slot");
        for (slot, &u) in slot_item.iter().enumerate() {
            if u > 0 {
                let first = unique[(u - 1) as usize] as usize;
                assert_eq!(
                    tokens[first * 4..first * 4 + 4],
                    tokens[slot * 4..slot * 4 + 4]
                );
            }
        }
    }
}
