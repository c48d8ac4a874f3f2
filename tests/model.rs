//! The encoder and the learnable logit scale.

use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::Param;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::train::TrainStep;
use clue::data::batcher::{FixedShape, UserBatch, UserBatcher, UserDataset};
use clue::data::store::{PreparedDataset, Split};
use clue::model::init::Init;
use clue::model::{ClueModel, LOGIT_SCALE_MAX, ModelConfig, ModelKind};
use clue::train::step::{StepSettings, Trainee};

use common::small_model as small_config;

mod common;
use common::max_abs_diff;

/// One prepared synthetic dataset for every test here.
fn prepared() -> Arc<PreparedDataset> {
    let root = common::fixture(200, 11, 512, 32);
    Arc::new(PreparedDataset::open(&root.join("p"), true).unwrap())
}

/// Both kinds of encoder: CLUE's stacked one and the flat ablation (paper Table 5).
const KINDS: [ModelKind; 2] = [ModelKind::Stacked, ModelKind::Flat];

#[test]
fn a_user_embeds_the_same_alone_and_padded_inside_a_batch() {
    for kind in KINDS {
        padded_inside_a_batch(kind);
    }
}

fn padded_inside_a_batch(kind: ModelKind) {
    let data = prepared();
    let c = ModelConfig {
        kind,
        ..small_config(data.manifest.vocab_size as usize)
    };
    let dev = Default::default();
    let model = ClueModel::<NdArray>::new(&c, &mut Init::new(0, &dev));
    let ds = UserDataset::new(data.clone(), Split::Train, c.max_items, c.max_item_tokens);
    // Pick the user with the fewest items, so the batch pads it in both dimensions.
    let samples: Vec<_> = (0..ds.len()).map(|i| ds.get(i).unwrap()).collect();
    let small = samples
        .iter()
        .min_by_key(|s| s.services.iter().map(Vec::len).sum::<usize>())
        .unwrap()
        .clone();
    let mut batch = samples[..7].to_vec();
    batch.push(small.clone());
    let alone: UserBatch<NdArray> = UserBatcher::default().batch(vec![small], &dev);
    let together: UserBatch<NdArray> = UserBatcher::default().batch(batch, &dev);
    assert!(
        together.item_pad.dims()[1] > alone.item_pad.dims()[1],
        "the batch pads this user's items"
    );
    let za = model.encoder.forward(&alone);
    let zb = model.encoder.forward(&together);
    assert_eq!(za.dims(), [2, 24]);
    for s in 0..2 {
        let a: Vec<f32> = za
            .clone()
            .slice([s..s + 1, 0..24])
            .to_data()
            .to_vec()
            .unwrap();
        let b: Vec<f32> = zb
            .clone()
            .slice([s * 8 + 7..s * 8 + 8, 0..24])
            .to_data()
            .to_vec()
            .unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-4, "{kind:?}, service {s}: max |Δ| = {diff}");
    }
}

/// Also padding every item to the model's longest (a flat model reads the padded tokens).
#[test]
fn grouping_items_by_length_changes_no_embedding() {
    for kind in KINDS {
        grouped_or_not(kind);
    }
}

fn grouped_or_not(kind: ModelKind) {
    let data = prepared();
    let c = ModelConfig {
        kind,
        ..small_config(data.manifest.vocab_size as usize)
    };
    let dev = Default::default();
    let model = ClueModel::<NdArray>::new(&c, &mut Init::new(0, &dev));
    let ds = UserDataset::new(data.clone(), Split::Train, c.max_items, c.max_item_tokens);
    let samples: Vec<_> = (0..ds.len().min(96)).map(|i| ds.get(i).unwrap()).collect();
    let grouped: UserBatch<NdArray> = UserBatcher::default().batch(samples.clone(), &dev);
    let one_group: UserBatch<NdArray> = UserBatcher::fixed(FixedShape {
        items: c.max_items,
        tokens: c.max_item_tokens,
        item_multiple: 1,
    })
    .batch(samples, &dev);
    assert!(grouped.item_groups.len() > 1, "items of several lengths");
    assert_eq!(one_group.item_groups.len(), 1);
    let a: Vec<f32> = model.encoder.forward(&grouped).to_data().to_vec().unwrap();
    let b: Vec<f32> = model
        .encoder
        .forward(&one_group)
        .to_data()
        .to_vec()
        .unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "{kind:?}: max |Δ| = {diff}");
}

#[test]
fn parameter_counts_separate_the_embedding_tables() {
    let c = small_config(1000);
    let dev = Default::default();
    let stacked = ClueModel::<NdArray>::new(&c, &mut Init::new(0, &dev)).param_counts();
    assert_eq!(stacked.total - stacked.non_embedding, 1000 * 32 + 16 * 32);
    assert!(stacked.non_embedding > 0);
    // Flat: token positions too (12 per item); one Transformer of both depths and no Item
    // Transformer's final norm (2·32).
    let flat = ModelConfig {
        kind: ModelKind::Flat,
        ..c
    };
    let flat = ClueModel::<NdArray>::new(&flat, &mut Init::new(0, &dev)).param_counts();
    assert_eq!(
        flat.total - flat.non_embedding,
        1000 * 32 + 16 * 32 + 12 * 32
    );
    assert_eq!(flat.non_embedding, stacked.non_embedding - 2 * 32);
}

/// The flat model (one Transformer over all of a user's tokens, same loss) learns: 40 steps on
/// 4 fixed batches of 16 users take its mean loss well below where it started (chance ln 16).
#[test]
fn a_flat_model_trains() {
    let data = prepared();
    let dev = Default::default();
    let c = ModelConfig {
        kind: ModelKind::Flat,
        dropout: 0.0,
        ..small_config(data.manifest.vocab_size as usize)
    };
    let mut trainee = Trainee {
        model: ClueModel::<A>::new(&c, &mut Init::new(0, &dev)),
        settings: StepSettings {
            clip_norm: 1e9,
            seed: 0,
            guard: None,
            ..Default::default()
        },
    };
    let ds = UserDataset::new(data, Split::Train, c.max_items, c.max_item_tokens);
    let batches: Vec<Vec<_>> = (0..4)
        .map(|b| (b * 16..b * 16 + 16).map(|i| ds.get(i).unwrap()).collect())
        .collect();
    let mean_loss = |t: &Trainee<A>| -> f64 {
        batches
            .iter()
            .map(|b| {
                let batch: UserBatch<A> = UserBatcher::default().batch(b.clone(), &dev);
                TrainStep::step(t, batch).item.loss.into_scalar() as f64
            })
            .sum::<f64>()
            / batches.len() as f64
    };
    let before = mean_loss(&trainee);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .init::<A, Trainee<A>>();
    for step in 0..40 {
        let batch: UserBatch<A> = UserBatcher::default().batch(batches[step % 4].clone(), &dev);
        let grads = TrainStep::step(&trainee, batch).grads;
        trainee = trainee.optimize(&mut optim, 1e-3, grads);
    }
    let after = mean_loss(&trainee);
    assert!(
        after < before - 0.5,
        "mean loss {before:.3} → {after:.3} after 40 steps"
    );
}

type A = Autodiff<NdArray>;

fn scale_of(t: &Trainee<A>) -> f64 {
    t.model.logit_scale()
}

#[test]
fn the_logit_scale_trains_never_exceeds_100_and_keeps_training_after_clamping() {
    let dev = Default::default();
    let mut trainee = Trainee {
        model: ClueModel::<A>::new(&small_config(100), &mut Init::new(0, &dev)),
        settings: StepSettings::default(),
    };
    assert!(
        (scale_of(&trainee) - 14.27).abs() < 1e-3,
        "initialised at 14.27"
    );
    trainee.model.log_logit_scale = Param::from_tensor(Tensor::from_floats([95.0f32.ln()], &dev));
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .init::<A, Trainee<A>>();
    let id = trainee.model.log_logit_scale.id;
    let push = |g: f32| {
        let mut grads = GradientsParams::new();
        grads.register::<NdArray, 1>(id, Tensor::from_floats([g], &dev));
        grads
    };
    let mut seen = vec![scale_of(&trainee)];
    for _ in 0..3 {
        trainee = trainee.optimize(&mut optim, 0.5, push(-1.0));
        seen.push(scale_of(&trainee));
        let raw: f32 = trainee.model.log_logit_scale.val().into_scalar();
        assert!(
            raw as f64 <= LOGIT_SCALE_MAX.ln() + 1e-6,
            "the parameter itself is clamped"
        );
    }
    assert!(seen.iter().all(|&s| s <= 100.0 + 1e-3), "{seen:?}");
    assert!(
        (seen[3] - 100.0).abs() < 1e-3,
        "pushed up to the cap: {seen:?}"
    );
    assert!(
        trainee.model.log_logit_scale.val().is_require_grad(),
        "still a trainable leaf"
    );
    for _ in 0..3 {
        trainee = trainee.optimize(&mut optim, 0.5, push(1.0));
    }
    assert!(
        scale_of(&trainee) < 99.0,
        "moves down again after clamping: {}",
        scale_of(&trainee)
    );
}

#[test]
fn a_training_step_produces_a_gradient_for_the_logit_scale() {
    let data = prepared();
    let dev = Default::default();
    let trainee = Trainee {
        model: ClueModel::<A>::new(
            &small_config(data.manifest.vocab_size as usize),
            &mut Init::new(0, &dev),
        ),
        settings: StepSettings {
            clip_norm: 1e9,
            seed: 0,
            guard: None,
            ..Default::default()
        },
    };
    let ds = UserDataset::new(data, Split::Train, 16, 12);
    let batch: UserBatch<A> =
        UserBatcher::default().batch((0..8).map(|i| ds.get(i).unwrap()).collect(), &dev);
    let out = TrainStep::step(&trainee, batch);
    let g = out
        .grads
        .get::<NdArray, 1>(trainee.model.log_logit_scale.id)
        .expect("scale has a gradient");
    assert!(g.into_scalar().abs() > 0.0);
}

#[test]
fn a_non_finite_loss_skips_the_update_names_the_step_and_stops_training() {
    let data = prepared();
    let dev = Default::default();
    let interrupter = burn::train::Interrupter::new();
    let guard = clue::train::step::StepGuard::new(interrupter.clone(), 41);
    let mut model = ClueModel::<A>::new(
        &small_config(data.manifest.vocab_size as usize),
        &mut Init::new(0, &dev),
    );
    let w = model.encoder.token_embedding.weight.val();
    model.encoder.token_embedding.weight = Param::from_tensor(w.mul_scalar(f32::NAN).detach());
    let trainee = Trainee {
        model,
        settings: StepSettings {
            clip_norm: 0.01,
            seed: 0,
            guard: Some(guard.clone()),
            ..Default::default()
        },
    };
    let ds = UserDataset::new(data, Split::Train, 16, 12);
    let batch: UserBatch<A> =
        UserBatcher::default().batch((0..8).map(|i| ds.get(i).unwrap()).collect(), &dev);
    let out = TrainStep::step(&trainee, batch);
    assert!(out.grads.is_empty(), "no update from a NaN loss");
    assert_eq!(
        guard.bad_step(),
        Some(42),
        "the step is named (counting from the resumed step)"
    );
    assert!(interrupter.should_stop(), "the learner is asked to stop");
}
