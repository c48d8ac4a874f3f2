//! A training batch cut into chunks of users (GradCache) and moved off the autodiff backend.

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::backend::BackendKind;
use crate::data::batcher::{ITEM_MULTIPLE, UserBatch, slot_rows};

/// The multiple a batch's distinct items are padded to on backend `B` (1: not padded), as
/// [`crate::data::batcher::UserBatcher::of`] pads them; a split keeps it.
pub fn item_multiple<B: Backend>() -> usize {
    if BackendKind::of::<B>().fixed_shapes() {
        ITEM_MULTIPLE
    } else {
        1
    }
}

impl<B: Backend> UserBatch<B> {
    /// Users in the batch.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The batch cut into consecutive chunks of `chunk` users (the last one may be smaller),
    /// each a batch of its own: its users' rows in every service and only the distinct items
    /// they hold, so the Item Transformer of a chunk runs on that chunk's items alone. Item
    /// groups keep their width; with `item_multiple` > 1 (a fixed-shape batch) each group's
    /// rows are padded with repeats of its first row to a multiple of it, as the batcher does.
    /// A chunk of at least the whole batch gives the batch itself.
    pub fn split(&self, chunk: usize, item_multiple: usize) -> Vec<UserBatch<B>> {
        let n = self.len();
        if chunk == 0 || chunk >= n {
            return vec![self.clone()];
        }
        let slot_item: Vec<i64> = self
            .slot_item
            .to_data()
            .convert::<i64>()
            .to_vec()
            .expect("integer slot table");
        (0..n)
            .step_by(chunk)
            .map(|first| {
                let users = first..(first + chunk).min(n);
                let rows: Vec<usize> = (0..self.services)
                    .flat_map(|s| users.clone().map(move |i| s * n + i))
                    .collect();
                self.chunk_of(&rows, self.users[users].to_vec(), &slot_item, item_multiple)
            })
            .collect()
    }

    /// The batch of `rows` (row `s·m + i` = the chunk's user i in service s), whose users are
    /// `users`; `slot_item` is this batch's slot table on the host.
    fn chunk_of(
        &self,
        rows: &[usize],
        users: Vec<u32>,
        slot_item: &[i64],
        item_multiple: usize,
    ) -> UserBatch<B> {
        let device = self.item_pad.device();
        let [_, slots] = self.item_pad.dims();
        let sizes: Vec<usize> = self.item_groups.iter().map(|g| g.dims()[0]).collect();
        let total: usize = sizes.iter().sum();
        let mut used = vec![false; total];
        for &r in rows {
            for &v in &slot_item[r * slots..(r + 1) * slots] {
                if v > 0 {
                    used[v as usize - 1] = true;
                }
            }
        }
        // New item rows: the used ones, group by group, in their old order.
        let mut new_row = vec![0i64; total];
        let mut item_groups = Vec::new();
        let mut next = 0i64;
        let mut start = 0;
        for (group, &size) in self.item_groups.iter().zip(&sizes) {
            let mut members: Vec<i64> = (0..size)
                .filter(|&j| used[start + j])
                .map(|j| j as i64)
                .collect();
            for (k, &j) in members.iter().enumerate() {
                new_row[start + j as usize] = next + k as i64;
            }
            start += size;
            if members.is_empty() {
                continue;
            }
            let m = item_multiple.max(1);
            members.resize(members.len().div_ceil(m) * m, members[0]);
            // The padding rows count too: the groups are stacked as they are.
            next += members.len() as i64;
            let picked = Tensor::<B, 1, Int>::from_data(
                TensorData::new(members.clone(), [members.len()]),
                &device,
            );
            item_groups.push(group.clone().select(0, picked));
        }
        if item_groups.is_empty() {
            // Users without items (a batch of empty histories): keep one group's first rows.
            if let Some(g) = self.item_groups.first() {
                item_groups.push(
                    g.clone()
                        .narrow(0, 0, g.dims()[0].min(item_multiple.max(1))),
                );
            }
        }
        let slot: Vec<i64> = rows
            .iter()
            .flat_map(|&r| &slot_item[r * slots..(r + 1) * slots])
            .map(|&v| {
                if v > 0 {
                    new_row[v as usize - 1] + 1
                } else {
                    0
                }
            })
            .collect();
        let pad: Vec<bool> = slot.iter().map(|&v| v == 0).collect();
        let n = rows.len();
        UserBatch {
            item_groups,
            item_pad: Tensor::from_data(TensorData::new(pad, [n, slots]), &device),
            slot_row: Tensor::from_data(TensorData::new(slot_rows(&slot), [n * slots]), &device),
            slot_item: Tensor::from_data(TensorData::new(slot, [n * slots]), &device),
            services: self.services,
            users,
        }
    }
}

impl<B: AutodiffBackend> UserBatch<B> {
    /// The same batch on the backend without autodiff (a forward pass that records nothing).
    pub fn inner(&self) -> UserBatch<B::InnerBackend> {
        UserBatch {
            item_groups: self.item_groups.iter().map(|g| g.clone().inner()).collect(),
            item_pad: self.item_pad.clone().inner(),
            slot_item: self.slot_item.clone().inner(),
            slot_row: self.slot_row.clone().inner(),
            services: self.services,
            users: self.users.clone(),
        }
    }
}
