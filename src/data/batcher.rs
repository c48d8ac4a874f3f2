//! Burn `Dataset` over a prepared directory and the `Batcher` that pads users into tensors.

use std::collections::HashMap;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;

use crate::backend::BackendKind;
use crate::data::augment::Views;
use crate::data::groups::{GROUP_OVERHEAD, length_groups};
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
/// `max_item_tokens` tokens per item; with [`Views`], two augmented views of one service in place
/// of the services (the SimCLR objective).
pub struct UserDataset {
    data: Arc<PreparedDataset>,
    users: Vec<u32>,
    max_items: usize,
    max_item_tokens: usize,
    views: Option<Views>,
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
            views: None,
        }
    }

    /// Serve two views of each user (`None`: the services as they are).
    pub fn with_views(mut self, views: Option<Views>) -> Self {
        self.views = views;
        self
    }

    /// User `index` and its services' item ids as [`Dataset::get`] serves them, without tokens.
    pub fn item_ids(&self, index: usize) -> Option<(u32, Vec<Vec<u32>>)> {
        let user = *self.users.get(index)?;
        let services: Vec<Vec<u32>> = (0..self.data.num_services())
            .map(|s| {
                let seq = self.data.sequence(user as usize, s);
                seq[seq.len().saturating_sub(self.max_items)..].to_vec()
            })
            .collect();
        Some(match &self.views {
            Some(views) => (user, views.apply(user, &services)),
            None => (user, services),
        })
    }
}

impl Dataset<UserSample> for UserDataset {
    fn get(&self, index: usize) -> Option<UserSample> {
        let (user, ids) = self.item_ids(index)?;
        let item = |id: u32| {
            let mut tokens = self.data.item_tokens(id);
            tokens.truncate(self.max_item_tokens);
            Item { id, tokens }
        };
        let services = ids
            .into_iter()
            .map(|s| s.into_iter().map(item).collect())
            .collect();
        Some(UserSample { user, services })
    }

    fn len(&self) -> usize {
        self.users.len()
    }
}

/// A padded batch of users, all services stacked: row `s·batch + i` is user `i` in service `s`.
///
/// The distinct items of the batch are packed once each, so the Item Transformer never runs on a
/// padding slot nor twice on an item that several users share; `slot_row` puts them back in
/// place (`slot_item` numbers them with 0 for padding, for the flat model's token view). Items
/// come in groups of similar length, each padded only to its own longest item (a batch of
/// 3..16-token items padded to 16 spends ~40 % of the Item Transformer on padding).
/// [`UserBatch::tokens`] gives the plain `[rows, items, tokens]` view.
#[derive(Debug, Clone)]
pub struct UserBatch<B: Backend> {
    /// Distinct items' token ids, 0 = padding, in groups `[items in group, group's tokens]`;
    /// the item rows are numbered through the groups in order. With a [`FixedShape`]: one group
    /// of the fixed width (extra all-padding rows may follow).
    pub item_groups: Vec<Tensor<B, 2, Int>>,
    /// `[services·batch, items]`, true where the item slot is padding.
    pub item_pad: Tensor<B, 2, Bool>,
    /// `[services·batch·items]`: 0 for a padding slot, else 1 + the slot's item row.
    pub slot_item: Tensor<B, 1, Int>,
    /// `[services·batch·items]`: the item row each slot reads (see [`slot_rows`]).
    pub slot_row: Tensor<B, 1, Int>,
    /// Number of services stacked.
    pub services: usize,
    /// Dataset row of each user.
    pub users: Vec<u32>,
}

impl<B: Backend> UserBatch<B> {
    /// The padded token ids `[services·batch, items, tokens]` (0 = padding).
    pub fn tokens(&self) -> Tensor<B, 3, Int> {
        let [rows, slots] = self.item_pad.dims();
        let len = self
            .item_groups
            .iter()
            .map(|g| g.dims()[1])
            .max()
            .unwrap_or(1);
        let device = self.item_pad.device();
        let widened = self.item_groups.iter().map(|g| {
            let [n, w] = g.dims();
            if w == len {
                g.clone()
            } else {
                Tensor::cat(vec![g.clone(), Tensor::zeros([n, len - w], &device)], 1)
            }
        });
        let table = match self.item_groups.len() {
            0 => return Tensor::zeros([rows, slots, 1], &device),
            1 => self.item_groups[0].clone(),
            _ => Tensor::cat(widened.collect(), 0),
        };
        slot_tokens(table, self.slot_item.clone(), [rows, slots])
    }
}

/// The token ids of each row's item slots, `[rows, slots, len]` (0 = padding), from the token
/// ids of the distinct items `table`: `[items, len]` and `slot_item`: `[rows·slots]` (0 = a
/// padding slot, else 1 + a row of `table`).
pub fn slot_tokens<B: Backend>(
    table: Tensor<B, 2, Int>,
    slot_item: Tensor<B, 1, Int>,
    [rows, slots]: [usize; 2],
) -> Tensor<B, 3, Int> {
    let len = table.dims()[1];
    let zero = Tensor::<B, 2, Int>::zeros([1, len], &table.device());
    Tensor::cat(vec![zero, table], 0)
        .select(0, slot_item)
        .reshape([rows, slots, len])
}

/// The item row each slot reads, from a slot table of 0 for padding, else 1 + the row: a
/// padding slot reads row 0, whose vector its padding masks (in the attention's keys and the
/// pooled mean), so [`ClueEncoder::encode_users`] gathers the item vectors as they are, without
/// a zero row put in front of them (a copy of the table in every step). Row 0 must be finite:
/// a padding key's weight is 0, and 0 times a NaN or infinity is NaN (a diverged model's).
///
/// [`ClueEncoder::encode_users`]: crate::model::ClueEncoder::encode_users
pub fn slot_rows(slot_item: &[i64]) -> Vec<i64> {
    slot_item.iter().map(|&v| (v - 1).max(0)).collect()
}

/// Fixed tensor shapes for accelerators (a new shape can cost compilations): slots and tokens
/// padded to the model's maxima, the number of distinct items to a multiple of `item_multiple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedShape {
    pub items: usize,
    pub tokens: usize,
    pub item_multiple: usize,
}

/// On accelerators, the number of distinct items of a batch is padded to a multiple of this.
pub const ITEM_MULTIPLE: usize = 256;

/// Pads [`UserSample`]s into a [`UserBatch`]: to the batch's own maxima, or to a [`FixedShape`].
#[derive(Debug, Clone, Default)]
pub struct UserBatcher {
    pub fixed: Option<FixedShape>,
}

impl UserBatcher {
    pub fn fixed(shape: FixedShape) -> Self {
        Self { fixed: Some(shape) }
    }

    /// The batcher for backend `B` (see [`UserBatcher::new`]).
    pub fn of<B: Backend>(max_items: usize, max_item_tokens: usize) -> Self {
        Self::new(BackendKind::of::<B>(), max_items, max_item_tokens)
    }

    /// The batcher for a backend: dynamic shapes on the CPU, fixed ones (the model's maxima)
    /// on accelerators.
    pub fn new(kind: BackendKind, max_items: usize, max_item_tokens: usize) -> Self {
        if kind.fixed_shapes() {
            Self::fixed(FixedShape {
                items: max_items,
                tokens: max_item_tokens,
                item_multiple: ITEM_MULTIPLE,
            })
        } else {
            Self::default()
        }
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
        let entries = samples.iter().enumerate().flat_map(|(i, sample)| {
            sample
                .services
                .iter()
                .enumerate()
                .flat_map(move |(s, items)| {
                    items
                        .iter()
                        .enumerate()
                        .map(move |(j, item)| (s * n + i, j, item.id, item.tokens.as_slice()))
                })
        });
        let layout = SlotLayout::new(rows, slots, entries);
        let item_pad = layout.pad();
        let SlotLayout {
            distinct,
            slot: slot_distinct,
        } = layout;
        // Item rows: by length (one group padded to the fixed width with a FixedShape).
        let mut order: Vec<usize> = (0..distinct.len()).collect();
        let cuts = match self.fixed {
            Some(_) => vec![distinct.len()],
            None => {
                order.sort_by_key(|&u| distinct[u].len());
                let lengths: Vec<usize> = order.iter().map(|&u| distinct[u].len()).collect();
                length_groups(&lengths, GROUP_OVERHEAD)
            }
        };
        let mut row_of = vec![0i64; distinct.len()];
        for (r, &u) in order.iter().enumerate() {
            row_of[u] = r as i64;
        }
        let slot_item: Vec<i64> = slot_distinct
            .iter()
            .map(|&u| if u == PADDING { 0 } else { row_of[u] + 1 })
            .collect();
        let mut item_groups = Vec::with_capacity(cuts.len().max(1));
        let mut start = 0;
        for &end in cuts.iter().chain(cuts.is_empty().then_some(&0)) {
            let members = &order[start..end];
            let (width, count) = match self.fixed {
                Some(f) => {
                    let m = f.item_multiple.max(1);
                    (len, members.len().max(1).div_ceil(m) * m)
                }
                None => (
                    members
                        .iter()
                        .map(|&u| distinct[u].len())
                        .max()
                        .unwrap_or(1)
                        .max(1),
                    members.len(),
                ),
            };
            let mut ids = vec![0i64; count * width];
            for (r, &u) in members.iter().enumerate() {
                for (k, &t) in distinct[u].iter().enumerate() {
                    ids[r * width + k] = t as i64;
                }
            }
            item_groups.push(Tensor::from_data(
                TensorData::new(ids, [count, width]),
                device,
            ));
            start = end;
        }
        UserBatch {
            item_groups,
            item_pad: Tensor::from_data(TensorData::new(item_pad, [rows, slots]), device),
            slot_row: Tensor::from_data(
                TensorData::new(slot_rows(&slot_item), [rows * slots]),
                device,
            ),
            slot_item: Tensor::from_data(TensorData::new(slot_item, [rows * slots]), device),
            services,
            users: samples.iter().map(|s| s.user).collect(),
        }
    }
}

/// The item slots of a batch: its distinct items (each with a payload: tokens, or a catalogue
/// index), in the order they first appear, and for every slot its distinct item or padding.
struct SlotLayout<T> {
    distinct: Vec<T>,
    /// `[rows·slots]`: index into `distinct`, [`PADDING`] for padding.
    slot: Vec<usize>,
}

/// A padding slot in [`SlotLayout::slot`].
const PADDING: usize = usize::MAX;

impl<T: Copy> SlotLayout<T> {
    /// `entries`: (row, position in the row, item id, payload) of every filled slot.
    fn new(
        rows: usize,
        slots: usize,
        entries: impl Iterator<Item = (usize, usize, u32, T)>,
    ) -> Self {
        let mut out = Self {
            distinct: Vec::new(),
            slot: vec![PADDING; rows * slots],
        };
        let mut seen: HashMap<u32, usize> = HashMap::new();
        for (row, j, id, payload) in entries {
            out.slot[row * slots + j] = *seen.entry(id).or_insert_with(|| {
                out.distinct.push(payload);
                out.distinct.len() - 1
            });
        }
        out
    }

    /// `[rows·slots]`: true where the slot is padding.
    fn pad(&self) -> Vec<bool> {
        self.slot.iter().map(|&u| u == PADDING).collect()
    }
}

/// An inference batch over already-encoded items: users as rows of item indices into a table
/// of item vectors (`clue embed`'s item cache), for [`ClueEncoder::encode_users`].
///
/// [`ClueEncoder::encode_users`]: crate::model::ClueEncoder::encode_users
#[derive(Debug, Clone)]
pub struct ItemSlots<B: Backend> {
    /// The rows of the item table the batch needs, in the order `slot_item` numbers them. With
    /// a [`FixedShape`], padded with repeats of the first to a multiple of `item_multiple`.
    pub items: Vec<u32>,
    /// `[rows, slots]`, true where the slot is padding.
    pub item_pad: Tensor<B, 2, Bool>,
    /// `[rows·slots]`: 0 for a padding slot, else 1 + the slot's position in `items`.
    pub slot_item: Tensor<B, 1, Int>,
    /// `[rows·slots]`: the position in `items` each slot reads (see [`slot_rows`]).
    pub slot_row: Tensor<B, 1, Int>,
}

impl UserBatcher {
    /// An inference batch of `seqs` (one row each: item indices, oldest first), padded like a
    /// training batch: to the longest row, or to the [`FixedShape`].
    pub fn item_slots<B: Backend>(&self, seqs: &[&[u32]], device: &B::Device) -> ItemSlots<B> {
        let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let slots = match self.fixed {
            Some(f) => f.items.max(longest),
            None => longest.max(1),
        };
        let entries = seqs
            .iter()
            .enumerate()
            .flat_map(|(row, seq)| seq.iter().enumerate().map(move |(j, &id)| (row, j, id, id)));
        let layout = SlotLayout::new(seqs.len(), slots, entries);
        let pad = layout.pad();
        let SlotLayout { mut distinct, slot } = layout;
        if let (Some(f), Some(&first)) = (self.fixed, distinct.first()) {
            let m = f.item_multiple.max(1);
            distinct.resize(distinct.len().div_ceil(m) * m, first);
        }
        let slot_item: Vec<i64> = slot
            .iter()
            .map(|&u| if u == PADDING { 0 } else { u as i64 + 1 })
            .collect();
        let rows = seqs.len();
        ItemSlots {
            items: distinct,
            item_pad: Tensor::from_data(TensorData::new(pad, [rows, slots]), device),
            slot_row: Tensor::from_data(
                TensorData::new(slot_rows(&slot_item), [rows * slots]),
                device,
            ),
            slot_item: Tensor::from_data(TensorData::new(slot_item, [rows * slots]), device),
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
        assert_eq!(
            b.item_groups.len(),
            1,
            "too few items to pay for a second group"
        );
        assert_eq!(b.item_groups[0].dims(), [4, 4], "four distinct items");
        assert_eq!(
            slot_item[0], slot_item[2],
            "item 5 of users 0 and 1 shares one entry"
        );
        assert_eq!(
            slot_item[4], slot_item[6],
            "item 7 of users 0 and 1 shares one entry"
        );
        assert_eq!(slot_item[1], 0, "padding slot");
        let packed: Vec<i64> = b.item_groups[0]
            .to_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        assert_eq!(
            packed,
            [2, 8, 0, 0, 1, 4, 0, 0, 1, 9, 9, 0, 2, 6, 6, 6],
            "rows by length, first seen first among equals"
        );
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
            f.item_groups.iter().map(|g| g.dims()).collect::<Vec<_>>(),
            [[16, 6]],
            "one group, distinct items padded to a multiple of 16"
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

    /// Inference batches over the item cache: each distinct item once in first-seen order, slots
    /// numbered 1 + its position, padding 0; with a fixed shape, slots padded to the maximum and
    /// the item list to a multiple (repeats of the first, which no slot points at).
    #[test]
    fn item_slots_list_distinct_items_once_and_pad_like_training() {
        let dev = Default::default();
        let seqs: Vec<&[u32]> = vec![&[7, 3], &[3], &[9, 7, 5]];
        let b = UserBatcher::default().item_slots::<NdArray>(&seqs, &dev);
        assert_eq!(b.items, vec![7, 3, 9, 5]);
        let slots: Vec<i64> = b.slot_item.to_data().to_vec().unwrap();
        assert_eq!(slots, vec![1, 2, 0, 2, 0, 0, 3, 1, 4]);
        let rows: Vec<i64> = b.slot_row.to_data().to_vec().unwrap();
        assert_eq!(rows, vec![0, 1, 0, 1, 0, 0, 2, 0, 3], "padding reads row 0");
        let pad: Vec<bool> = b.item_pad.to_data().to_vec().unwrap();
        assert_eq!(pad, slots.iter().map(|&s| s == 0).collect::<Vec<_>>());
        let fixed = UserBatcher::fixed(FixedShape {
            items: 4,
            tokens: 8,
            item_multiple: 8,
        });
        let f = fixed.item_slots::<NdArray>(&seqs, &dev);
        assert_eq!(f.item_pad.dims(), [3, 4]);
        assert_eq!(f.items, vec![7, 3, 9, 5, 7, 7, 7, 7]);
        let fs: Vec<i64> = f.slot_item.to_data().to_vec().unwrap();
        assert!(
            fs.iter().all(|&s| s <= 4),
            "no slot points at a padding row"
        );
    }

    #[test]
    fn items_of_very_different_lengths_go_in_separate_groups() {
        // 40 one-item users with 2-token items, 40 with 30-token items.
        let samples: Vec<UserSample> = (0..80u32)
            .map(|u| {
                let len = if u % 2 == 0 { 2 } else { 30 };
                let tokens: Vec<u32> = (0..len).map(|k| 1 + u + k).collect();
                UserSample {
                    user: u,
                    services: vec![vec![item(u, &tokens)], vec![item(1000 + u, &tokens[..1])]],
                }
            })
            .collect();
        let b: UserBatch<NdArray> =
            UserBatcher::default().batch(samples.clone(), &Default::default());
        let dims: Vec<[usize; 2]> = b.item_groups.iter().map(|g| g.dims()).collect();
        assert_eq!(
            dims,
            [[120, 2], [40, 30]],
            "each group as wide as its longest"
        );
        let [rows, slots, len] = b.tokens().dims();
        assert_eq!([rows, slots, len], [160, 1, 30]);
        let tokens: Vec<i64> = b.tokens().to_data().convert::<i64>().to_vec().unwrap();
        for (i, s) in samples.iter().enumerate() {
            for (svc, items) in s.services.iter().enumerate() {
                let at = (svc * 80 + i) * len;
                let want: Vec<i64> = (0..len)
                    .map(|k| items[0].tokens.get(k).map_or(0, |&t| t as i64))
                    .collect();
                assert_eq!(tokens[at..at + len], want, "user {i} service {svc}");
            }
        }
    }
}
