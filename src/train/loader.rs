//! The training data order and its loader.
//!
//! [`EpochPlan`] fixes which users every step sees: each epoch is a seeded shuffle of the training
//! users (ChaCha8 seeded with the run seed and the epoch), cut into batches, and the batches are
//! grouped into *periods* of at most `train.checkpoint_every` steps (a whole epoch when it is 0).
//! A period is what Burn's learner calls an epoch: it ends with validation and a checkpoint. The
//! order depends on nothing else, so a resumed run sees exactly the batches the killed run would
//! have seen.
//!
//! [`PlanLoader`] is the Burn `DataLoader` that serves one period per `iter()` call, with worker
//! threads that build batches ahead, in order. A loading thread that dies (a panic on damaged
//! data) is reported to the run's [`StepGuard`], which stops the learner before the period's
//! checkpoint, instead of ending the period early as if its data had run out. [`ListLoader`]
//! serves the validation users the same way, all of them at each `iter()`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::Dataset;
use burn::data::dataset::transform::PartialDataset;
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::data::augment::{VALID_ROUND, Views};
use crate::data::batcher::{UserBatch, UserBatcher, UserDataset, UserSample};
use crate::data::store::PreparedDataset;
use crate::error::panic_message;
use crate::model::dropout::splitmix64;
use crate::train::config::{RunConfig, TrainConfig};
use crate::train::step::StepGuard;
use crate::train::streams::{Role, on_kept_stream};

/// Which users each training step sees, epoch after epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPlan {
    users: Vec<u32>,
    batch_size: usize,
    epochs: usize,
    seed: u64,
    /// Steps per period; `steps_per_epoch()` when checkpoints are per epoch only.
    period_steps: usize,
    /// Draw a new order every epoch (the paper); otherwise every epoch repeats the first
    /// epoch's batches (Figure 3, right).
    shuffle: bool,
}

impl EpochPlan {
    /// `checkpoint_every` = 0 means one period per epoch.
    pub fn new(
        users: Vec<u32>,
        batch_size: usize,
        epochs: usize,
        seed: u64,
        checkpoint_every: usize,
    ) -> Self {
        let steps = users.len().div_ceil(batch_size.max(1)).max(1);
        let period_steps = if checkpoint_every == 0 {
            steps
        } else {
            checkpoint_every.min(steps)
        };
        Self {
            users,
            batch_size: batch_size.max(1),
            epochs,
            seed,
            period_steps,
            shuffle: true,
        }
    }

    /// The plan `clue fit` trains a run by: its share of the training users `train_users`
    /// ([`nested_subset`] of `train.data_fraction`), batch size, epochs, seed, periods and
    /// shuffling.
    pub fn for_run(train: &TrainConfig, train_users: &[u32]) -> Self {
        Self::new(
            nested_subset(train_users, train.data_fraction),
            train.batch_size,
            train.epochs,
            train.seed,
            train.checkpoint_every,
        )
        .with_shuffle(train.shuffle)
    }

    /// The users it trains on.
    pub fn users(&self) -> &[u32] {
        &self.users
    }

    /// `false`: every epoch sees the first epoch's batches again, in the same order.
    pub fn with_shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Steps in one epoch (the last batch may be short).
    pub fn steps_per_epoch(&self) -> usize {
        self.users.len().div_ceil(self.batch_size).max(1)
    }

    pub fn periods_per_epoch(&self) -> usize {
        self.steps_per_epoch().div_ceil(self.period_steps)
    }

    /// Periods in the whole run: Burn's number of epochs.
    pub fn periods(&self) -> usize {
        self.epochs * self.periods_per_epoch()
    }

    pub fn total_steps(&self) -> usize {
        self.epochs * self.steps_per_epoch()
    }

    /// Steps taken before period `period` (0-based) starts.
    pub fn steps_before(&self, period: usize) -> usize {
        let (epoch, part) = (
            period / self.periods_per_epoch(),
            period % self.periods_per_epoch(),
        );
        epoch * self.steps_per_epoch() + part * self.period_steps
    }

    /// The (1-based) epoch and part of (1-based) period `period`, as the renderer shows them.
    pub fn epoch_and_part(&self, period: usize) -> (usize, usize) {
        let p = period.max(1) - 1;
        (
            p / self.periods_per_epoch() + 1,
            p % self.periods_per_epoch() + 1,
        )
    }

    /// The training users in epoch `epoch`'s (0-based) order.
    pub fn epoch_order(&self, epoch: usize) -> Vec<u32> {
        let epoch = if self.shuffle { epoch } else { 0 };
        let mut order = self.users.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        order.shuffle(&mut rng);
        order
    }

    /// The users of period `period` (0-based over the run), in step order.
    pub fn period_users(&self, period: usize) -> Vec<u32> {
        let ppe = self.periods_per_epoch();
        let (epoch, part) = (period / ppe, period % ppe);
        let order = self.epoch_order(epoch);
        let per = self.period_steps * self.batch_size;
        let start = (part * per).min(order.len());
        let end = ((part + 1) * per).min(order.len());
        order[start..end].to_vec()
    }
}

/// The first `fraction` of `users` in a fixed pseudo-random order that depends on nothing but
/// the user ids (at least one user): smaller fractions are subsets of larger ones, whatever the
/// run's seed, so a data-size sweep (paper Figure 3) trains on nested sets.
pub fn nested_subset(users: &[u32], fraction: f64) -> Vec<u32> {
    if fraction >= 1.0 {
        return users.to_vec();
    }
    // 100 × 0.07 is 7.000000000000001 in floating point: keep 7, not 8.
    let keep =
        ((users.len() as f64 * fraction - 1e-9).ceil() as usize).clamp(1, users.len().max(1));
    let mut keyed: Vec<(u64, u32)> = users
        .iter()
        .map(|&u| (splitmix64(u as u64 ^ 0xC1E5_DA7A), u))
        .collect();
    keyed.sort_unstable();
    let mut kept: Vec<u32> = keyed.into_iter().take(keep).map(|(_, u)| u).collect();
    kept.sort_unstable();
    kept
}

/// Burn `DataLoader` over an [`EpochPlan`]: each `iter()` serves the next period.
pub struct PlanLoader<B: Backend> {
    plan: Arc<EpochPlan>,
    data: Arc<PreparedDataset>,
    max_items: usize,
    max_item_tokens: usize,
    loading: Loading<B>,
    /// Next period to serve, shared by the copies `to_device` makes.
    next: Arc<AtomicUsize>,
    /// `slice(start, end)`: only these positions of each period (multi-device splits).
    range: Option<(usize, usize)>,
    /// SimCLR: views drawn with this seed, one round per period.
    views_seed: Option<u64>,
}

impl<B: Backend> PlanLoader<B> {
    /// A loader that starts with period `first` (0-based; a resumed run passes the periods done).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        plan: Arc<EpochPlan>,
        data: Arc<PreparedDataset>,
        batcher: UserBatcher,
        max_items: usize,
        max_item_tokens: usize,
        workers: usize,
        device: B::Device,
        first: usize,
    ) -> Self {
        Self {
            loading: Loading {
                batch_size: plan.batch_size,
                workers: workers.max(1),
                batcher,
                device,
                guard: None,
            },
            plan,
            data,
            max_items,
            max_item_tokens,
            next: Arc::new(AtomicUsize::new(first)),
            range: None,
            views_seed: None,
        }
    }

    /// Report a dead loading thread to `guard` (which stops the learner).
    pub fn with_guard(mut self, guard: Arc<StepGuard>) -> Self {
        self.loading.guard = Some(guard);
        self
    }

    /// Serve two augmented views of each user, drawn with `seed` (the SimCLR objective).
    pub fn with_views(mut self, seed: Option<u64>) -> Self {
        self.views_seed = seed;
        self
    }

    fn users(&self, period: usize) -> Vec<u32> {
        let users = self.plan.period_users(period);
        match self.range {
            Some((start, end)) => users[start.min(users.len())..end.min(users.len())].to_vec(),
            None => users,
        }
    }

    fn copy(&self, device: B::Device, range: Option<(usize, usize)>) -> Self {
        Self {
            plan: self.plan.clone(),
            data: self.data.clone(),
            loading: self.loading.on(device),
            next: self.next.clone(),
            range,
            ..*self
        }
    }
}

impl<B: Backend> DataLoader<B, UserBatch<B>> for PlanLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<UserBatch<B>> + 'a> {
        let period = self.next.fetch_add(1, Ordering::SeqCst);
        let dataset = UserDataset::with_users(
            self.data.clone(),
            self.users(period),
            self.max_items,
            self.max_item_tokens,
        )
        .with_views(self.views_seed.map(|s| Views::new(s, period as u64)));
        Box::new(OrderedBatches::start(Arc::new(dataset), &self.loading))
    }

    fn num_items(&self) -> usize {
        self.users(self.next.load(Ordering::SeqCst)).len()
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, UserBatch<B>>> {
        Arc::new(self.copy(device.clone(), self.range))
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, UserBatch<B>>> {
        let range = match self.range {
            Some((s, _)) => (s + start, s + end),
            None => (start, end),
        };
        Arc::new(self.copy(self.loading.device.clone(), Some(range)))
    }
}

/// Burn `DataLoader` over a fixed list of users (validation, scoring, and each period of a
/// [`PlanLoader`]): each `iter()` serves all of them, in order, built ahead by `workers` threads
/// on the loaders' kept CubeCL streams (training and validation never load at once: an epoch's
/// threads end with its last batch).
pub struct ListLoader<B: Backend> {
    dataset: Arc<dyn Dataset<UserSample>>,
    loading: Loading<B>,
}

/// How a loader builds its batches: `batch_size` users each, by `workers` threads, on `device`;
/// a thread that dies is reported to `guard`.
struct Loading<B: Backend> {
    batch_size: usize,
    workers: usize,
    batcher: UserBatcher,
    device: B::Device,
    guard: Option<Arc<StepGuard>>,
}

impl<B: Backend> Loading<B> {
    /// The same, onto `device`.
    fn on(&self, device: B::Device) -> Self {
        Self {
            batcher: self.batcher.clone(),
            device,
            guard: self.guard.clone(),
            ..*self
        }
    }
}

impl<B: Backend> ListLoader<B> {
    /// The held-out `users` as validation and scoring serve them: `train.eval_batch()` users per
    /// batch (SimCLR: the views of [`VALID_ROUND`]), built on `device` by `train.workers` threads.
    pub fn held_out(
        data: Arc<PreparedDataset>,
        users: Vec<u32>,
        config: &RunConfig,
        device: B::Device,
    ) -> Self {
        let (m, t) = (&config.model, &config.train);
        Self {
            dataset: Arc::new(
                UserDataset::with_users(data, users, m.max_items, m.max_item_tokens)
                    .with_views(t.views(VALID_ROUND)),
            ),
            loading: Loading {
                batch_size: t.eval_batch().max(1),
                workers: t.workers.max(1),
                batcher: UserBatcher::of::<B>(m.max_items, m.max_item_tokens),
                device,
                guard: None,
            },
        }
    }

    /// Report a dead loading thread to `guard` (which stops the learner).
    pub fn with_guard(mut self, guard: Arc<StepGuard>) -> Self {
        self.loading.guard = Some(guard);
        self
    }

    fn with(&self, dataset: Arc<dyn Dataset<UserSample>>, device: B::Device) -> Self {
        Self {
            dataset,
            loading: self.loading.on(device),
        }
    }
}

impl<B: Backend> DataLoader<B, UserBatch<B>> for ListLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<UserBatch<B>> + 'a> {
        Box::new(OrderedBatches::start(self.dataset.clone(), &self.loading))
    }

    fn num_items(&self) -> usize {
        self.dataset.len()
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, UserBatch<B>>> {
        Arc::new(self.with(self.dataset.clone(), device.clone()))
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, UserBatch<B>>> {
        let end = end.min(self.dataset.len());
        let part = PartialDataset::new(self.dataset.clone(), start.min(end), end);
        Arc::new(self.with(Arc::new(part), self.loading.device.clone()))
    }
}

/// Batches of a dataset in order, built ahead by `workers` threads: worker `w` builds batches
/// `w, w + workers, …`, each into its own two-deep channel, and the iterator takes them round
/// robin — the order is fixed and at most `2 × workers` batches wait in memory.
struct OrderedBatches<B: Backend> {
    channels: Vec<Receiver<UserBatch<B>>>,
    workers: Vec<Option<JoinHandle<()>>>,
    guard: Option<Arc<StepGuard>>,
    next: usize,
    batches: usize,
    items: usize,
    batch_size: usize,
}

impl<B: Backend> OrderedBatches<B> {
    /// Start building `dataset`'s batches as `loading` says.
    fn start(dataset: Arc<dyn Dataset<UserSample>>, loading: &Loading<B>) -> Self {
        let (batch_size, guard) = (loading.batch_size, loading.guard.clone());
        let items = dataset.len();
        let batches = items.div_ceil(batch_size);
        let workers = loading.workers.min(batches).max(1);
        let mut channels = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(2);
            channels.push(rx);
            let (dataset, batcher, device) = (
                dataset.clone(),
                loading.batcher.clone(),
                loading.device.clone(),
            );
            let handle = std::thread::Builder::new()
                .name(format!("clue-loader-{w}"))
                .spawn(move || {
                    on_kept_stream(Role::Loader, w, || {
                        for b in (w..batches).step_by(workers) {
                            let samples = (b * batch_size..((b + 1) * batch_size).min(items))
                                .filter_map(|i| dataset.get(i))
                                .collect();
                            let batch: UserBatch<B> = batcher.batch(samples, &device);
                            if tx.send(batch).is_err() {
                                return; // the iterator was dropped: stop quietly
                            }
                        }
                    })
                })
                .expect("spawn a data-loading thread");
            handles.push(Some(handle));
        }
        Self {
            channels,
            workers: handles,
            guard,
            next: 0,
            batches,
            items,
            batch_size,
        }
    }
}

impl<B: Backend> OrderedBatches<B> {
    /// Hang up on the threads (so that none waits on a full channel) and wait for each to end.
    fn join(&mut self) {
        self.channels.clear();
        for handle in self.workers.drain(..).flatten() {
            let _ = handle.join();
        }
    }
}

/// An iterator dropped before its end (an interrupted epoch) leaves no thread loading.
impl<B: Backend> Drop for OrderedBatches<B> {
    fn drop(&mut self) {
        self.join();
    }
}

impl<B: Backend> Iterator for OrderedBatches<B> {
    type Item = UserBatch<B>;

    fn next(&mut self) -> Option<UserBatch<B>> {
        if self.next >= self.batches {
            self.join();
            return None;
        }
        let w = self.next % self.channels.len();
        match self.channels[w].recv() {
            Ok(batch) => {
                self.next += 1;
                Some(batch)
            }
            Err(_) => {
                // The worker hung up before its last batch: it panicked.
                let why = match self.workers[w].take().map(JoinHandle::join) {
                    Some(Err(payload)) => panic_message(payload.as_ref()),
                    _ => "it stopped early".to_string(),
                };
                let what = format!(
                    "the data-loading thread clue-loader-{w} failed at batch {} of {}: {why}",
                    self.next + 1,
                    self.batches
                );
                match &self.guard {
                    Some(guard) => guard.fail(what),
                    None => panic!("{what}"),
                }
                self.join();
                self.next = self.batches;
                None
            }
        }
    }
}

impl<B: Backend> DataLoaderIterator<UserBatch<B>> for OrderedBatches<B> {
    fn progress(&self) -> Progress {
        Progress::new((self.next * self.batch_size).min(self.items), self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_cut_each_seeded_epoch_order_without_losing_or_repeating_a_user() {
        let users: Vec<u32> = (0..103).collect();
        // 103 users, batch 10 → 11 steps per epoch; periods of 4 steps → 4, 4, 3.
        let plan = EpochPlan::new(users.clone(), 10, 3, 7, 4);
        assert_eq!(plan.steps_per_epoch(), 11);
        assert_eq!(plan.periods_per_epoch(), 3);
        assert_eq!(plan.periods(), 9);
        assert_eq!(plan.total_steps(), 33);
        assert_eq!(
            (0..=9).map(|p| plan.steps_before(p)).collect::<Vec<_>>(),
            vec![0, 4, 8, 11, 15, 19, 22, 26, 30, 33]
        );
        assert_eq!(plan.epoch_and_part(5), (2, 2));
        for epoch in 0..3 {
            let joined: Vec<u32> = (0..3)
                .flat_map(|part| plan.period_users(epoch * 3 + part))
                .collect();
            assert_eq!(joined, plan.epoch_order(epoch), "periods concatenate");
            let mut sorted = joined.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, users, "every user exactly once per epoch");
            assert_eq!(plan.period_users(epoch * 3).len(), 40);
            assert_eq!(plan.period_users(epoch * 3 + 2).len(), 23);
        }
        assert_ne!(plan.epoch_order(0), plan.epoch_order(1), "reshuffled");
        assert_ne!(plan.epoch_order(0), users, "shuffled");
        let again = EpochPlan::new(users.clone(), 10, 3, 7, 4);
        assert_eq!(again.period_users(4), plan.period_users(4), "seeded");
        let other = EpochPlan::new(users.clone(), 10, 3, 8, 4);
        assert_ne!(other.epoch_order(0), plan.epoch_order(0));
        // Per-epoch checkpoints: one period per epoch, the same order.
        let fixed = EpochPlan::new(users.clone(), 10, 3, 7, 4).with_shuffle(false);
        assert_eq!(fixed.epoch_order(0), plan.epoch_order(0));
        assert_eq!(fixed.epoch_order(2), plan.epoch_order(0), "no reshuffle");
        assert_eq!(fixed.period_users(3), plan.period_users(0), "same batches");
        let whole = EpochPlan::new(users, 10, 3, 7, 0);
        assert_eq!(whole.periods(), 3);
        assert_eq!(whole.period_users(1), plan.epoch_order(1));
        assert_eq!(whole.steps_before(2), 22);
    }

    #[test]
    fn data_fractions_are_nested_and_sized_whatever_the_order() {
        let users: Vec<u32> = (0..200).map(|u| u * 3).collect();
        let tenth = nested_subset(&users, 0.1);
        let half = nested_subset(&users, 0.5);
        assert_eq!((tenth.len(), half.len()), (20, 100));
        assert!(tenth.iter().all(|u| half.contains(u)), "nested");
        assert!(half.iter().all(|u| users.contains(u)));
        assert_ne!(half, users[..100].to_vec(), "not simply the first users");
        let mut reversed = users.clone();
        reversed.reverse();
        assert_eq!(
            nested_subset(&reversed, 0.5),
            half,
            "order of the input does not matter"
        );
        assert_eq!(nested_subset(&users, 1.0), users);
        assert_eq!(nested_subset(&users, 1e-9).len(), 1);
        assert_eq!(nested_subset(&users[..100], 0.07).len(), 7);
    }
}
