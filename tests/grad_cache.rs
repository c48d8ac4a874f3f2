//! GradCache (`train.grad_cache_chunk`): a batch split into chunks embeds like batches built
//! from the chunks' users, and a step in chunks gives the loss, gradients and weights of the
//! plain step, on NdArray and on Flex (whose attention has its own dropout path).

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
use clue::data::batcher::{FixedShape, UserBatch, UserBatcher, UserDataset, UserSample};
use clue::data::store::{PreparedDataset, Split};
use clue::model::dropout::with_chunk_masks;
use clue::model::init::Init;
use clue::model::{ClueModel, ModelConfig, ModelKind};
use clue::train::config::TrainConfig;
use clue::train::grad_cache::grad_cache_step;
use clue::train::loss::contrastive_loss;
use clue::train::step::{StepSettings, Trainee};

mod common;
use common::max_abs_diff;

fn config(vocab: usize, kind: ModelKind, dropout: f64) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        kind,
        d_model: 32,
        d_ff: 64,
        heads: 4,
        item_layers: 1,
        service_layers: 1,
        max_items: 16,
        max_item_tokens: 12,
        output_dim: 24,
        dropout,
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
    let dev = Default::default();
    let users = samples(&data, 96);
    let mut plain = trainee::<B>(&data, kind, 0.0, 0);
    let mut cached = trainee::<B>(&data, kind, 0.0, 4);
    let adamw = || TrainConfig::default().optimizer().init::<B, Trainee<B>>();
    let (mut adam_plain, mut adam_cached) = (adamw(), adamw());
    for step in 0..3 {
        let part = users[step * 32..(step + 1) * 32].to_vec();
        let a = TrainStep::step(&plain, UserBatcher::default().batch(part.clone(), &dev));
        let b = TrainStep::step(&cached, UserBatcher::default().batch(part, &dev));
        let (la, lb) = (
            a.item.loss.clone().into_scalar().elem::<f32>(),
            b.item.loss.clone().into_scalar().elem::<f32>(),
        );
        assert!(
            (la - lb).abs() < 1e-5,
            "{kind:?} step {step}: loss {la} vs {lb}"
        );
        let diff = compare(&grads_of(&plain, &a.grads), &grads_of(&cached, &b.grads));
        assert!(
            diff < 1e-4,
            "{kind:?} step {step}: relative gradient |Δ| = {diff}"
        );
        plain = plain.optimize(&mut adam_plain, 1e-3, a.grads);
        cached = cached.optimize(&mut adam_cached, 1e-3, b.grads);
    }
    let (wa, wb) = (
        values(plain.model.head.w1.weight.val()),
        values(cached.model.head.w1.weight.val()),
    );
    let start = values(trainee::<B>(&data, kind, 0.0, 0).model.head.w1.weight.val());
    assert!(max_abs_diff(&wa, &start) > 1e-3, "the weights moved");
    let diff = max_abs_diff(&wa, &wb);
    assert!(diff < 1e-4, "{kind:?}: weights after 3 steps |Δ| = {diff}");
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
    let z: Vec<Tensor<B, 2>> = chunks
        .iter()
        .enumerate()
        .map(|(k, c)| with_chunk_masks(5, 7, k as u64, || t.model.forward(c)))
        .collect();
    let d = z[0].dims()[1];
    let rows = (0..2)
        .flat_map(|s| {
            z.iter()
                .map(move |z| z.clone().slice([s * 4..s * 4 + 4, 0..d]))
        })
        .collect();
    let reference = contrastive_loss(Tensor::cat(rows, 0), 2, t.model.logit_scale()).loss;
    let expected = GradientsParams::from_grads(reference.backward(), &t.model);
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
