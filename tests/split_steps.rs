//! Steps over a split batch. GradCache (`train.grad_cache_chunk`): a batch split into chunks
//! embeds like batches built from the chunks' users, and a step in chunks gives the loss,
//! gradients and weights of the plain step, on NdArray and on Flex (whose attention has its own
//! dropout path). Data-parallel workers (`clue fit --devices`): 2 workers × 8 users give the
//! step of 1 × 16, a failing worker stops the step without hanging the others, and `fit` trains.

use std::sync::Arc;

use burn::backend::flex::Flex;
use burn::backend::{Autodiff, NdArray};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::TrainStep;
use clue::data::batcher::{FixedShape, UserBatch, UserBatcher, UserDataset, UserSample, slot_rows};
use clue::data::store::{PreparedDataset, Split};
use clue::model::dropout::with_chunk_masks;
use clue::model::init::Init;
use clue::model::{ClueModel, ModelConfig, ModelKind};
use clue::train::config::RunConfig;
use clue::train::config::TrainConfig;
use clue::train::fit::{FitOptions, fit};
use clue::train::grad_cache::grad_cache_step;
use clue::train::loss::contrastive_loss;
use clue::train::parallel::Devices;
use clue::train::step::{StepSettings, Trainee};

mod common;
use common::max_abs_diff;

fn config(vocab: usize, kind: ModelKind, dropout: f64) -> ModelConfig {
    ModelConfig {
        kind,
        dropout,
        ..common::small_model(vocab)
    }
}

fn data() -> Arc<PreparedDataset> {
    let root = common::fixture(200, 11, 512, 32);
    Arc::new(PreparedDataset::open(&root.join("p"), true).unwrap())
}

fn samples(data: &Arc<PreparedDataset>, n: usize) -> Vec<UserSample> {
    let ds = UserDataset::new(data.clone(), Split::Train, 16, 12);
    (0..n).map(|i| ds.get(i).unwrap()).collect()
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Every chunk of a split batch embeds exactly as a batch built from its users, holds only its
/// users' items, and (fixed shapes) keeps its item groups a multiple of the batcher's.
#[test]
fn a_split_batch_embeds_like_batches_of_its_chunks() {
    let data = data();
    let dev = Default::default();
    let c = config(data.manifest.vocab_size as usize, ModelKind::Stacked, 0.0);
    let model = ClueModel::<NdArray>::new(&c, &mut Init::new(0, &dev));
    let users = samples(&data, 22);
    let fixed = UserBatcher::fixed(FixedShape {
        items: 16,
        tokens: 12,
        item_multiple: 8,
    });
    // Item groups by length (padded to 1 or to 4 rows each) and one fixed-shape group.
    for (batcher, multiple) in [
        (UserBatcher::default(), 1),
        (UserBatcher::default(), 4),
        (fixed, 8),
    ] {
        let whole: UserBatch<NdArray> = batcher.batch(users.clone(), &dev);
        let chunks = whole.split(8, multiple);
        assert_eq!(
            chunks.iter().map(UserBatch::len).collect::<Vec<_>>(),
            [8, 8, 6]
        );
        let distinct =
            |b: &UserBatch<NdArray>| -> usize { b.item_groups.iter().map(|g| g.dims()[0]).sum() };
        for (k, chunk) in chunks.iter().enumerate() {
            let own = &users[k * 8..(k * 8 + 8).min(22)];
            assert_eq!(chunk.users, own.iter().map(|s| s.user).collect::<Vec<_>>());
            let direct: UserBatch<NdArray> = batcher.batch(own.to_vec(), &dev);
            assert!(distinct(chunk) < distinct(&whole), "only the chunk's items");
            for g in &chunk.item_groups {
                assert_eq!(g.dims()[0] % multiple, 0);
            }
            if batcher.fixed.is_none() {
                assert!(chunk.item_groups.len() > 1, "several groups");
            }
            if multiple == 1 {
                assert_eq!(distinct(chunk), distinct(&direct), "each item once");
            }
            let ints = |t: &Tensor<NdArray, 1, Int>| t.to_data().convert::<i64>().to_vec::<i64>();
            let slot_item = ints(&chunk.slot_item).unwrap();
            assert_eq!(ints(&chunk.slot_row).unwrap(), slot_rows(&slot_item));
            let a = values(model.forward(chunk));
            let b = values(model.forward(&direct));
            let diff = max_abs_diff(&a, &b);
            assert!(diff < 1e-5, "chunk {k} (multiple {multiple}): |Δ| = {diff}");
        }
    }
    let whole: UserBatch<NdArray> = UserBatcher::default().batch(users, &dev);
    assert_eq!(whole.split(22, 1).len(), 1, "a chunk of the whole batch");
}

/// The gradient of every parameter, in visiting order (empty where it has none).
struct Grads<'a> {
    grads: &'a GradientsParams,
    out: Vec<Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = self.grads.get::<B::InnerBackend, D>(param.id);
        self.out.push(g.map(values).unwrap_or_default());
    }
}

fn grads_of<B: AutodiffBackend>(t: &Trainee<B>, grads: &GradientsParams) -> Vec<Vec<f32>> {
    let mut v = Grads {
        grads,
        out: Vec::new(),
    };
    t.visit(&mut v);
    v.out
}

fn trainee<B: AutodiffBackend>(
    data: &PreparedDataset,
    kind: ModelKind,
    dropout: f64,
    chunk: usize,
) -> Trainee<B> {
    let c = config(data.manifest.vocab_size as usize, kind, dropout);
    Trainee {
        model: ClueModel::new(&c, &mut Init::new(3, &Default::default())),
        settings: StepSettings {
            clip_norm: 1e9,
            seed: 5,
            grad_cache_chunk: chunk,
            ..Default::default()
        },
    }
}

/// The same, with `workers` data-parallel worker threads on the default device.
fn workers<B: AutodiffBackend>(
    data: &PreparedDataset,
    kind: ModelKind,
    workers: usize,
) -> Trainee<B> {
    with_workers(trainee::<B>(data, kind, 0.0, 0), workers)
}

/// `t` with `workers` data-parallel worker threads on the default device.
fn with_workers<B: AutodiffBackend>(mut t: Trainee<B>, workers: usize) -> Trainee<B> {
    t.settings.workers = vec![B::Device::default().to_id(); workers];
    t
}

/// Largest |Δ| between two gradient lists over the largest gradient (the gradients of an
/// untrained encoder are small: its users look alike); checks both have the same parameters.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut biggest = 0.0f32;
    let mut diff = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            x.is_empty(),
            y.is_empty(),
            "the same parameters have gradients"
        );
        diff = diff.max(max_abs_diff(x, y));
        biggest = x.iter().fold(biggest, |m, v| m.max(v.abs()));
    }
    assert!(biggest > 1e-7, "no gradient: {biggest}");
    diff / biggest
}

/// Batch 32 in chunks of 4 (no dropout) gives the plain step's loss and gradients, and after
/// 3 AdamW steps the same weights; both encoder kinds.
fn chunks_match_the_plain_step<B: AutodiffBackend>(kind: ModelKind) {
    let data = data();
    let plain = trainee::<B>(&data, kind, 0.0, 0);
    let cached = trainee::<B>(&data, kind, 0.0, 4);
    same_steps(plain, cached, 32, &format!("GradCache {kind:?}"));
}

/// Three steps of batch `batch` by `a` and by `b` (both started from the same weights): the same
/// losses, gradients (to 1e-4 of their scale) and, after 3 AdamW steps, weights (|Δ| ≤ 1e-4).
fn same_steps<B: AutodiffBackend>(
    mut plain: Trainee<B>,
    mut cached: Trainee<B>,
    batch: usize,
    what: &str,
) {
    let data = data();
    let dev = Default::default();
    let users = samples(&data, 3 * batch);
    let start = values(plain.model.head.w1.weight.val());
    let adamw = || TrainConfig::default().optimizer().init::<B, Trainee<B>>();
    let (mut adam_plain, mut adam_cached) = (adamw(), adamw());
    for step in 0..3 {
        let part = users[step * batch..(step + 1) * batch].to_vec();
        let a = TrainStep::step(&plain, UserBatcher::default().batch(part.clone(), &dev));
        let b = TrainStep::step(&cached, UserBatcher::default().batch(part, &dev));
        let (la, lb) = (
            a.item.loss.clone().into_scalar().elem::<f32>(),
            b.item.loss.clone().into_scalar().elem::<f32>(),
        );
        assert!(
            (la - lb).abs() < 1e-5,
            "{what} step {step}: loss {la} vs {lb}"
        );
        let diff = compare(&grads_of(&plain, &a.grads), &grads_of(&cached, &b.grads));
        assert!(
            diff < 1e-4,
            "{what} step {step}: relative gradient |Δ| = {diff}"
        );
        plain = plain.optimize(&mut adam_plain, 1e-3, a.grads);
        cached = cached.optimize(&mut adam_cached, 1e-3, b.grads);
    }
    let (wa, wb) = (
        values(plain.model.head.w1.weight.val()),
        values(cached.model.head.w1.weight.val()),
    );
    assert!(max_abs_diff(&wa, &start) > 1e-3, "the weights moved");
    let diff = max_abs_diff(&wa, &wb);
    assert!(diff < 1e-4, "{what}: weights after 3 steps |Δ| = {diff}");
}

#[test]
fn chunks_of_4_match_the_plain_step_at_batch_32() {
    for kind in [ModelKind::Stacked, ModelKind::Flat] {
        chunks_match_the_plain_step::<Autodiff<NdArray>>(kind);
    }
    for kind in [ModelKind::Stacked, ModelKind::Flat] {
        chunks_match_the_plain_step::<Autodiff<Flex>>(kind);
    }
}

/// With dropout, a single chunk replays the plain step exactly: both GradCache passes (the
/// first without autodiff) drop the units the plain step drops. Were the first pass to run
/// without dropout, or with other masks, the loss or the gradient would differ.
fn one_chunk_replays_dropout<B: AutodiffBackend>() {
    let data = data();
    let dev = Default::default();
    let part = samples(&data, 12);
    let t = trainee::<B>(&data, ModelKind::Stacked, 0.3, 0);
    let plain = TrainStep::step(&t, UserBatcher::default().batch(part.clone(), &dev));
    let batch: UserBatch<B> = UserBatcher::default().batch(part.clone(), &dev);
    let (out, grads) = grad_cache_step(&t.model, 5, &batch, 12, 0);
    let grads = grads.expect("a finite loss");
    let (la, lb) = (
        plain.item.loss.into_scalar().elem::<f32>(),
        out.loss.into_scalar().elem::<f32>(),
    );
    assert!((la - lb).abs() < 1e-5, "loss {la} vs {lb}");
    let diff = compare(&grads_of(&t, &plain.grads), &grads_of(&t, &grads));
    assert!(diff < 1e-5, "relative gradient |Δ| = {diff}");
    // Dropout is on: the same step without it gives another loss.
    let off = trainee::<B>(&data, ModelKind::Stacked, 0.0, 0);
    let lc = TrainStep::step(&off, UserBatcher::default().batch(part, &dev))
        .item
        .loss
        .into_scalar()
        .elem::<f32>();
    assert!(
        (la - lc).abs() > 1e-4,
        "dropout changes the loss: {la} vs {lc}"
    );
}

#[test]
fn a_single_chunk_replays_the_plain_steps_dropout() {
    one_chunk_replays_dropout::<Autodiff<NdArray>>();
    one_chunk_replays_dropout::<Autodiff<Flex>>();
}

/// After a GradCache step, dropout is off again outside training (validation on the same thread).
#[test]
fn dropout_stays_off_for_inference_after_a_cached_step() {
    let data = data();
    let dev = Default::default();
    let part = samples(&data, 8);
    let t = trainee::<Autodiff<NdArray>>(&data, ModelKind::Stacked, 0.5, 2);
    let _ = TrainStep::step(&t, UserBatcher::default().batch(part.clone(), &dev));
    let batch: UserBatch<NdArray> = UserBatcher::default().batch(part, &dev);
    let model = t.model.valid();
    assert_eq!(
        values(model.forward(&batch)),
        values(model.forward(&batch)),
        "no dropout outside a training step"
    );
}

/// With dropout and several chunks, GradCache's loss and gradients are those of the chunks
/// encoded with autodiff under their own masks, joined in batch order (row s·n + i), and
/// back-propagated in one go: both passes of every chunk (not only the first) drop the same
/// units, and the cached gradient goes back to the right rows.
fn chunk_masks_agree<B: AutodiffBackend>() {
    let data = data();
    let dev = Default::default();
    let part = samples(&data, 12);
    let t = trainee::<B>(&data, ModelKind::Stacked, 0.3, 0);
    let batch: UserBatch<B> = UserBatcher::default().batch(part, &dev);
    let (out, grads) = grad_cache_step(&t.model, 5, &batch, 4, 7);
    let grads = grads.expect("a finite loss");
    let chunks = batch.split(4, 1);
    // Encoded by a replica (the same parameter ids), as `MaskKey::replay` does: the step's
    // backward passes consumed the model's own nodes (see
    // `cached_steps_keep_their_gradients_while_another_thread_backpropagates`).
    let replica = t.model.clone().fork(&dev);
    let z: Vec<Tensor<B, 2>> = chunks
        .iter()
        .enumerate()
        .map(|(k, c)| with_chunk_masks(5, 7, 4 * k as u64, || replica.forward(c)))
        .collect();
    let d = z[0].dims()[1];
    let rows = (0..2)
        .flat_map(|s| {
            z.iter()
                .map(move |z| z.clone().slice([s * 4..s * 4 + 4, 0..d]))
        })
        .collect();
    let reference = contrastive_loss(Tensor::cat(rows, 0), 2, replica.log_logit_scale.val()).loss;
    let expected = GradientsParams::from_grads(reference.backward(), &replica);
    let (la, lb) = (
        reference.into_scalar().elem::<f32>(),
        out.loss.into_scalar().elem::<f32>(),
    );
    assert!((la - lb).abs() < 1e-5, "loss {la} vs {lb}");
    let diff = compare(&grads_of(&t, &expected), &grads_of(&t, &grads));
    assert!(diff < 1e-4, "relative gradient |Δ| = {diff}");
}

#[test]
fn every_chunk_keeps_its_dropout_masks_across_both_passes() {
    chunk_masks_agree::<Autodiff<NdArray>>();
    chunk_masks_agree::<Autodiff<Flex>>();
}

/// GradCache steps give their gradients while another thread of the process back-propagates.
/// A backward pass makes Burn 0.21's process-wide graph registry forget the nodes it went
/// through, the parameters' included, so a graph built on the same parameters afterwards holds
/// none of them. At a `cat` (which lets go of its inputs before it registers its output) such a
/// graph can look unused to another thread's backward pass, whose clean-up then frees its first
/// nodes, and part of the gradient is lost. `MaskKey::replay` therefore encodes each chunk with a
/// fresh replica; with the model itself, this test failed (parameters without a gradient).
#[test]
fn cached_steps_keep_their_gradients_while_another_thread_backpropagates() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    type A = Autodiff<NdArray>;
    let data = data();
    let dev = Default::default();
    let t = trainee::<A>(&data, ModelKind::Stacked, 0.0, 4);
    let batch: UserBatch<A> = UserBatcher::default().batch(samples(&data, 16), &dev);
    let step = || {
        let grads = grad_cache_step(&t.model, 5, &batch, 4, 0).1;
        grads_of(&t, &grads.expect("a finite loss"))
    };
    let alone = step();
    let (stop, started) = (AtomicBool::new(false), AtomicBool::new(false));
    let (diffs, noise) = std::thread::scope(|s| {
        let noise = s.spawn(|| {
            let mut passes = 0;
            while !stop.load(Relaxed) {
                let v = Tensor::<A, 1>::from_floats([1.0, 2.0], &dev).require_grad();
                let _ = (v.clone() * v).sum().backward();
                passes += 1;
                started.store(true, Relaxed);
            }
            passes
        });
        // Stops the other thread on the way out, a panicking step included (else the scope
        // would wait for it forever).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Relaxed);
            }
        }
        let stopping = Stop(&stop);
        while !started.load(Relaxed) && !noise.is_finished() {
            std::thread::yield_now();
        }
        let diffs: Vec<f32> = (0..8).map(|_| compare(&alone, &step())).collect();
        drop(stopping);
        (diffs, noise.join().unwrap())
    });
    assert!(noise > 0, "the other thread back-propagated");
    assert!(
        diffs.iter().all(|d| *d < 1e-5),
        "relative gradient |Δ| of 8 steps beside another thread: {diffs:?}"
    );
}

/// 2 workers × 8 users (each worker's InfoNCE against all 16, the logit scale's gradient
/// counted once, gradients summed) give the step of 1 worker × 16: losses, gradients and
/// weights after 3 steps; NdArray and Flex, both encoder kinds on NdArray.
#[test]
fn two_workers_of_8_match_one_of_16() {
    let data = data();
    for kind in [ModelKind::Stacked, ModelKind::Flat] {
        let one = trainee::<Autodiff<NdArray>>(&data, kind, 0.0, 0);
        let two = workers::<Autodiff<NdArray>>(&data, kind, 2);
        same_steps(one, two, 16, &format!("2 workers {kind:?}"));
    }
    let one = trainee::<Autodiff<Flex>>(&data, ModelKind::Stacked, 0.0, 0);
    let three = workers::<Autodiff<Flex>>(&data, ModelKind::Stacked, 3);
    same_steps(one, three, 12, "3 workers on flex");
    // An epoch's short last batch: 5 users over 4 devices, 3 workers of 2, 2 and 1 users and a
    // stand-in whose rows count for nothing.
    let one = trainee::<Autodiff<NdArray>>(&data, ModelKind::Stacked, 0.0, 0);
    let four = workers::<Autodiff<NdArray>>(&data, ModelKind::Stacked, 4);
    same_steps(one, four, 5, "a short batch over 4 devices");
}

/// A worker whose forward pass panics (a token id past the vocabulary in its half of the batch)
/// stops the step with a message naming it; the other worker does not wait forever.
#[test]
fn a_failing_worker_stops_the_step_and_is_named() {
    let data = data();
    let dev = Default::default();
    let mut part = samples(&data, 8);
    part[6].services[0][0].tokens[0] = 1_000_000;
    let mut t = workers::<Autodiff<NdArray>>(&data, ModelKind::Stacked, 2);
    let interrupter = burn::train::Interrupter::new();
    let guard = clue::train::step::StepGuard::new(interrupter.clone(), 0);
    t.settings.guard = Some(guard.clone());
    let out = TrainStep::step(&t, UserBatcher::default().batch(part, &dev));
    assert!(out.grads.is_empty(), "no update");
    let failure = guard.failure().expect("the failure is recorded");
    assert!(
        failure.contains("worker 1") && failure.contains("forward"),
        "{failure}"
    );
    assert!(interrupter.should_stop(), "the learner stops");
    assert_eq!(guard.bad_step(), None, "not reported as a non-finite loss");
}

/// A split the step cannot make is refused before any work.
#[test]
fn worker_counts_that_cannot_split_the_batch_are_refused() {
    let mut train = TrainConfig {
        batch_size: 12,
        ..Default::default()
    };
    assert!(Devices::Threads(3).check(&train).is_ok());
    assert!(Devices::Indices(vec![0, 1]).check(&train).is_ok());
    let e = Devices::Threads(5).check(&train).unwrap_err().to_string();
    assert!(e.contains("does not divide into 5 workers"), "{e}");
    train.grad_cache_chunk = 4;
    assert!(
        Devices::Threads(2).check(&train).is_ok(),
        "GradCache inside workers"
    );
}

/// GradCache inside data-parallel workers: 2 workers of 8 users, each in chunks of 4, give the
/// step of one process in chunks of 4 — with dropout too (a chunk draws the masks of its first
/// user's place in the batch, wherever it runs) — and, without dropout, the plain step of 16.
#[test]
fn grad_cache_inside_workers_matches_one_process() {
    let data = data();
    let one = trainee::<Autodiff<NdArray>>(&data, ModelKind::Stacked, 0.3, 4);
    let two = with_workers(trainee(&data, ModelKind::Stacked, 0.3, 4), 2);
    same_steps(one, two, 16, "2 workers in chunks of 4, dropout 0.3");
    let plain = trainee::<Autodiff<Flex>>(&data, ModelKind::Stacked, 0.0, 0);
    let two = with_workers(trainee(&data, ModelKind::Stacked, 0.0, 4), 2);
    same_steps(
        plain,
        two,
        16,
        "2 workers in chunks of 4 on flex vs the plain step",
    );
}

/// `clue fit` with 2 workers on flex trains through Burn's learner: the held-out retrieval beats
/// chance, and the summary counts every step.
#[test]
fn fit_with_two_workers_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::fixture(600, 0, 16, 16).join("p");
    let config = RunConfig::from_toml(
        include_str!("../config/tiny.toml"),
        std::path::Path::new("config/tiny.toml"),
    )
    .unwrap()
    .with_overrides(&["train.epochs=2".into(), "model.dropout=0".into()])
    .unwrap();
    let options = FitOptions {
        backend: "flex".into(),
        devices: Some(Devices::Threads(2)),
        ..common::fit_options(config, data, dir.path().join("run"))
    };
    let s = fit::<Autodiff<Flex>>(Default::default(), &options).unwrap();
    assert!(
        s.valid_retrieval_top1 > 2.0 * s.chance_top1,
        "top-1 {} vs chance {}",
        s.valid_retrieval_top1,
        s.chance_top1
    );
    assert!(
        s.valid_loss_final < (32f64).ln(),
        "valid loss {}",
        s.valid_loss_final
    );
}

/// `--devices` that cannot work is refused before any data is made or read.
#[test]
fn bad_devices_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, spec, expected) in [
        ("flex", "0", "from 1 to 64"),
        ("ndarray", "two", "from 1 to 64"),
        ("cuda", "0,0", "each GPU at most once"),
        ("cuda", "0;1", "separated by commas"),
        ("wgpu", "2", "cuda or on a CPU backend"),
    ] {
        let out = common::clue(
            dir.path(),
            &["fit", "--backend", backend, "--devices", spec],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{backend} {spec}");
        assert!(err.contains(expected), "{backend} {spec}: {err}");
    }
    assert!(
        !dir.path().join("data").exists(),
        "no default data was made"
    );
}
