//! The GPU warm-up's batch shapes (`clue fit` on wgpu/cuda compiles their kernels before the
//! first step): they are the shapes the fixed-shape batcher really makes, one per class of the
//! run's batches (over several epochs' orders, with and without SimCLR views, whole or cut in
//! data-parallel shares and GradCache chunks), and every batch falls in a class that was warmed.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::{Autodiff, NdArray};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clue::data::augment::Views;
use clue::data::batcher::{FixedShape, UserBatch, UserBatcher, UserDataset};
use clue::data::store::{PreparedDataset, Split};
use clue::model::ClueModel;
use clue::model::init::Init;
use clue::train::cluster::Place;
use clue::train::config::{RunConfig, TrainConfig};
use clue::train::loader::EpochPlan;
use clue::train::step::{StepGuard, StepSettings, Trainee};
use clue::train::warmup::{StepCut, WarmPlan, warm_shapes, warm_up};

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

/// The fixed shape of the warm-up tests: the small model's maxima, items padded to 8.
const FIXED: FixedShape = FixedShape {
    items: 16,
    tokens: 12,
    item_multiple: 8,
};

fn data() -> Arc<PreparedDataset> {
    let root = common::fixture(200, 11, 512, 32);
    Arc::new(PreparedDataset::open(&root.join("p"), true).unwrap())
}

/// The class of the batch of `users` that a step cut by `cut` encodes: its users, and the
/// users and power-of-two class of padded items of each piece, as the batcher makes them.
fn class_of(
    data: &Arc<PreparedDataset>,
    users: &[u32],
    views: Option<Views>,
    fixed: FixedShape,
    cut: StepCut,
) -> (usize, Vec<(usize, usize)>) {
    let pieces = cut.pieces(users.len()).into_iter().map(|r| {
        let (n, items) = made(data, &users[r], views, fixed);
        (n, items.next_power_of_two())
    });
    (users.len(), pieces.collect())
}

fn check(views: Option<Views>, cut: StepCut) {
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
    let shapes = warm_shapes(
        &data,
        batches.iter().map(|b| (b.clone(), views)),
        fixed,
        cut,
    );
    let classes: BTreeSet<_> = shapes
        .iter()
        .map(|s| class_of(&data, &s.users, s.views, fixed, cut))
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
    // Every batch of the three epochs falls in a warmed class; uncut, with at most its items.
    for b in &batches {
        let class = class_of(&data, b, views, fixed, cut);
        assert!(classes.contains(&class), "no warmed shape for {class:?}");
        if cut == StepCut::default() {
            let (n, items) = made(&data, b, views, fixed);
            let warmed = shapes
                .iter()
                .find(|s| class_of(&data, &s.users, s.views, fixed, cut) == class)
                .unwrap();
            assert!(
                items <= warmed.items,
                "{n} users: {items} > {}",
                warmed.items
            );
        }
    }
}

#[test]
fn warm_shapes_are_the_batchers_shapes_one_per_class_covering_every_batch() {
    check(None, StepCut::default());
}

#[test]
fn warm_shapes_count_the_items_of_simclr_views() {
    check(Some(Views::new(7, 0)), StepCut::default());
}

#[test]
fn warm_shapes_class_the_pieces_of_data_parallel_and_grad_cache_steps() {
    check(
        None,
        StepCut {
            workers: 2,
            chunk: 3,
        },
    );
    check(
        Some(Views::new(7, 0)),
        StepCut {
            workers: 3,
            chunk: 0,
        },
    );
}

/// The pieces are those `parallel_step` and GradCache encode: consecutive shares of ⌈n / W⌉
/// users, each in chunks where the chunk is smaller, and the first user alone for a worker
/// left without a share (5 users over 4 workers: 2, 2, 1 and a stand-in).
#[test]
fn step_cuts_give_the_workers_shares_and_chunks() {
    let cut = |workers, chunk, n| StepCut { workers, chunk }.pieces(n);
    assert_eq!(cut(0, 0, 7), vec![Range { start: 0, end: 7 }]);
    assert_eq!(cut(1, 3, 7), [0..3, 3..6, 6..7]);
    assert_eq!(cut(2, 3, 7), [0..3, 3..4, 4..7]);
    assert_eq!(cut(2, 4, 8), [0..4, 4..8]);
    assert_eq!(cut(4, 0, 5), [0..2, 2..4, 4..5, 0..1]);
    assert_eq!(cut(4, 0, 16), [0..4, 4..8, 8..12, 12..16]);
}

/// The warm-up trains copies: the run's step count (which keys its dropout masks and ends up in
/// `summary.json`) stays where it was, and a bad warm-up step would not stop the run; with one
/// worker and with two data-parallel workers (their shares classed apart).
#[test]
fn the_warm_up_counts_no_step_of_the_run() {
    warm_up_counts_no_step::<Autodiff<NdArray>>(&[1, 2]);
}

/// The same on a backend whose float type is not f32, as bf16 is with `--precision bf16` on
/// CUDA: the data-parallel step reads back the flags its workers share, and failed there
/// ("worker 0 died") while it read them as f32. In f64, in a process of its own: a device's
/// float type is set by the first backend that makes a tensor on it, and the other tests use
/// NdArray in f32.
#[test]
fn data_parallel_steps_run_in_another_float_type() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "warm_up_in_f64", "--ignored", "--nocapture"])
        .env("CLUE_TEST_F64", "1")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1 passed"), "{said}");
}

#[test]
#[ignore = "run in a process of its own by data_parallel_steps_run_in_another_float_type"]
fn warm_up_in_f64() {
    if std::env::var_os("CLUE_TEST_F64").is_none() {
        return;
    }
    let probe = Tensor::<NdArray<f64>, 1>::from_floats([1.0], &Default::default());
    assert_eq!(
        probe.dtype(),
        burn::tensor::DType::F64,
        "the device works in f64"
    );
    warm_up_counts_no_step::<Autodiff<NdArray<f64>>>(&[2]);
}

fn warm_up_counts_no_step<B: AutodiffBackend>(worker_counts: &[usize]) {
    let data = data();
    let fixed = FIXED;
    let users = data.users_in(Split::Train);
    let config = common::small_model(data.manifest.vocab_size as usize);
    for &workers in worker_counts {
        let cut = StepCut { workers, chunk: 0 };
        let shapes = warm_shapes(
            &data,
            users.chunks(6).map(|c| (c.to_vec(), None)),
            fixed,
            cut,
        );
        let guard = StepGuard::new(Default::default(), 4);
        let trainee = Trainee::<B> {
            model: ClueModel::new(&config, &mut Init::new(3, &Default::default())),
            settings: StepSettings {
                clip_norm: 1.0,
                guard: Some(guard.clone()),
                workers: vec![B::Device::default().to_id(); workers],
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
        )
        .unwrap();
        assert!(shapes.len() >= 2, "{} shapes", shapes.len());
        assert_eq!(
            guard.steps(),
            4,
            "{workers} worker(s): the run's step count moved"
        );
        assert_eq!(guard.bad_step(), None);
    }
}

/// On several nodes the warm-up classes the pieces of every node's workers: 2 nodes × 1 worker
/// cut a batch as 2 workers of one process do, not as 1 worker does; and the steps the nodes
/// compare when they join tell the two apart.
#[test]
fn the_warm_up_of_two_nodes_cuts_batches_over_every_nodes_workers() {
    let data = data();
    let fixed = FIXED;
    let config = RunConfig {
        model: common::small_model(data.manifest.vocab_size as usize),
        train: TrainConfig {
            batch_size: 6,
            epochs: 1,
            ..Default::default()
        },
    };
    let plan = EpochPlan::for_run(&config.train, &data.users_in(Split::Train));
    let warm = |nodes: usize, workers: usize| {
        let settings = StepSettings {
            workers: vec![NdArrayDevice::default().to_id(); workers],
            place: Place {
                nodes,
                ..Default::default()
            },
            ..Default::default()
        };
        WarmPlan::new(&settings, &config, (&data, fixed), &plan, &[])
    };
    let cut = |workers| {
        let batches = plan.epoch_order(0);
        let batches = batches.chunks(6).map(|c| (c.to_vec(), None));
        warm_shapes(&data, batches, fixed, StepCut { workers, chunk: 0 })
    };
    let two_nodes = warm(2, 1);
    assert_eq!(two_nodes.train, cut(2));
    assert_ne!(cut(2), cut(1), "the cut makes no difference here");
    assert_eq!(two_nodes, warm(1, 2));
    assert_ne!(two_nodes.steps(), warm(1, 1).steps());
}

/// A warm-up step that fails (here every data-parallel worker's forward pass: the model's
/// vocabulary is smaller than the data's) ends the warm-up with the failure named, not a panic.
#[test]
fn a_failed_warm_up_step_is_an_error_naming_the_worker() {
    type B = Autodiff<NdArray>;
    let data = data();
    let fixed = FIXED;
    let users = data.users_in(Split::Train);
    let batches = users.chunks(6).take(2).map(|c| (c.to_vec(), None));
    let shapes = warm_shapes(&data, batches, fixed, StepCut::default());
    let trainee = Trainee::<B> {
        model: ClueModel::new(
            &common::small_model(8),
            &mut Init::new(3, &Default::default()),
        ),
        settings: StepSettings {
            clip_norm: 1.0,
            workers: vec![NdArrayDevice::default().to_id(); 2],
            ..Default::default()
        },
    };
    let optim = burn::optim::AdamWConfig::new().init::<B, Trainee<B>>();
    let e = warm_up(&trainee, &optim, 1e-3, (&data, fixed), &shapes, &[]).unwrap_err();
    assert!(e.contains("worker 0") && e.contains("forward"), "{e}");
}
