//! The GPU warm-up's batch shapes (`clue fit` on wgpu/cuda compiles their kernels before the
//! first step): they are the shapes the fixed-shape batcher really makes, one per class of the
//! run's batches (over several epochs' orders, with and without SimCLR views), and every batch
//! falls in a class that was warmed.

use std::collections::BTreeSet;
use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use clue::data::augment::Views;
use clue::data::batcher::{FixedShape, UserBatch, UserBatcher, UserDataset};
use clue::data::store::{PreparedDataset, Split};
use clue::model::ClueModel;
use clue::model::init::Init;
use clue::train::loader::EpochPlan;
use clue::train::step::{StepGuard, StepSettings, Trainee};
use clue::train::warmup::{warm_shapes, warm_up};

mod common;

/// Users and padded distinct items of the batch of `users` that `fixed` makes.
fn made(
    data: &Arc<PreparedDataset>,
    users: &[u32],
    views: Option<Views>,
    fixed: FixedShape,
) -> (usize, usize) {
    let ds = UserDataset::with_users(data.clone(), users.to_vec(), fixed.items, fixed.tokens)
        .with_views(views);
    let samples = (0..ds.len()).map(|i| ds.get(i).unwrap()).collect();
    let batch: UserBatch<NdArray> = UserBatcher::fixed(fixed).batch(samples, &Default::default());
    assert_eq!(batch.item_groups.len(), 1, "one group with a fixed shape");
    (batch.len(), batch.item_groups[0].dims()[0])
}

fn data() -> Arc<PreparedDataset> {
    let root = common::fixture(200, 11, 512, 32);
    Arc::new(PreparedDataset::open(&root.join("p"), true).unwrap())
}

fn check(views: Option<Views>) {
    let data = data();
    let users = data.users_in(Split::Train);
    // Batches of 7 users hold ~60 distinct items (two classes); 7 leaves a short batch.
    let (batch, fixed) = (
        7,
        FixedShape {
            items: 6,
            tokens: 12,
            item_multiple: 2,
        },
    );
    let plan = EpochPlan::new(users.clone(), batch, 3, 5, 0);
    let batches: Vec<Vec<u32>> = (0..3)
        .flat_map(|e| {
            plan.epoch_order(e)
                .chunks(batch)
                .map(<[u32]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect();
    let shapes = warm_shapes(&data, batches.iter().map(|b| (b.clone(), views)), fixed);
    let class = |users: usize, items: usize| (users, items.next_power_of_two());
    let classes: BTreeSet<_> = shapes
        .iter()
        .map(|s| class(s.users.len(), s.items))
        .collect();
    assert_eq!(classes.len(), shapes.len(), "one shape per class");
    assert!(classes.len() >= 3, "the test spans classes: {classes:?}");
    assert!(
        shapes.iter().any(|s| s.users.len() < batch),
        "the short batch is warmed"
    );
    // Each shape is the one its batch really has.
    for s in &shapes {
        assert_eq!(
            made(&data, &s.users, s.views, fixed),
            (s.users.len(), s.items)
        );
    }
    // Every batch of the three epochs falls in a warmed class, with at most its items.
    for b in &batches {
        let (n, items) = made(&data, b, views, fixed);
        let warmed = shapes
            .iter()
            .find(|s| class(s.users.len(), s.items) == class(n, items))
            .unwrap_or_else(|| panic!("no warmed shape for {n} users × {items} items"));
        assert!(items <= warmed.items, "{items} > {}", warmed.items);
    }
}

#[test]
fn warm_shapes_are_the_batchers_shapes_one_per_class_covering_every_batch() {
    check(None);
}

#[test]
fn warm_shapes_count_the_items_of_simclr_views() {
    check(Some(Views::new(7, 0)));
}

/// The warm-up trains copies: the run's step count (which keys its dropout masks and ends up in
/// `summary.json`) stays where it was, and a bad warm-up step would not stop the run.
#[test]
fn the_warm_up_counts_no_step_of_the_run() {
    type B = Autodiff<NdArray>;
    let data = data();
    let fixed = FixedShape {
        items: 16,
        tokens: 12,
        item_multiple: 8,
    };
    let users = data.users_in(Split::Train);
    let shapes = warm_shapes(&data, users.chunks(6).map(|c| (c.to_vec(), None)), fixed);
    let guard = StepGuard::new(Default::default(), 4);
    let config = common::small_model(data.manifest.vocab_size as usize);
    let trainee = Trainee::<B> {
        model: ClueModel::new(&config, &mut Init::new(3, &Default::default())),
        settings: StepSettings {
            clip_norm: 1.0,
            guard: Some(guard.clone()),
            ..Default::default()
        },
    };
    let optim = burn::optim::AdamWConfig::new().init::<B, Trainee<B>>();
    warm_up(
        &trainee,
        &optim,
        1e-3,
        (&data, fixed),
        &shapes,
        &shapes[..1],
    );
    assert!(shapes.len() >= 2, "{} shapes", shapes.len());
    assert_eq!(guard.steps(), 4, "the run's step count moved");
    assert_eq!(guard.bad_step(), None);
}
