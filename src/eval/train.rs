//! The training loop every trained downstream model shares (the probe and the task-specific
//! models alike): binary cross-entropy of (user, positive item) pairs against sampled negative
//! items, Adam, the validation MRR after every epoch, early stopping, and the best epoch's model.

use std::collections::HashSet;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::ui;

/// How a downstream model is trained (`[probe]` in a task file; every trained model uses it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Sampled negative items per training positive.
    pub negatives: usize,
    /// Stop after this many epochs without a better validation MRR.
    pub patience: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            epochs: 40,
            batch_size: 256,
            lr: 1e-3,
            negatives: 4,
            patience: 5,
        }
    }
}

/// What a model is trained on: `(user row, catalogue item)` positives, and each user's
/// positives, never drawn as their negatives.
pub struct TrainingPairs<'a> {
    pub pairs: &'a [(usize, usize)],
    pub positives: &'a [HashSet<usize>],
    pub n_items: usize,
}

/// The best epoch's model, its validation MRR, that epoch and the epochs run.
pub struct Trained<M> {
    pub model: M,
    pub valid_mrr: f64,
    pub epoch: usize,
    pub epochs_run: usize,
}

/// Train `model` (named `label` in progress lines) with `config` (learning rate `lr`);
/// `score(model, users, items)` gives the logits `[n]` of pairs, `validate(model)` the validation
/// MRR after each epoch. Negatives are drawn with a generator seeded by `seed`.
#[allow(clippy::too_many_arguments)]
pub fn train_ranker<B, M>(
    label: &str,
    mut model: M,
    data: &TrainingPairs,
    config: &ProbeConfig,
    lr: f64,
    seed: u64,
    score: impl Fn(&M, &[usize], &[usize]) -> Tensor<B, 1>,
    mut validate: impl FnMut(&M::InnerModule) -> f64,
) -> Trained<M::InnerModule>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut optim = AdamConfig::new().init::<B, M>();
    let mut best = Trained {
        model: model.valid(),
        valid_mrr: f64::NEG_INFINITY,
        epoch: 0,
        epochs_run: 0,
    };
    let mut since_best = 0;
    let mut order: Vec<usize> = (0..data.pairs.len()).collect();
    let bar = ui::bar(config.epochs as u64, label, false);
    let started = Instant::now();
    for epoch in 1..=config.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(config.batch_size.max(1)) {
            let (users, items, labels) = with_negatives(data, chunk, config.negatives, &mut rng);
            let n = users.len();
            let s = score(&model, &users, &items);
            let device = s.device();
            let y = Tensor::<B, 1>::from_data(TensorData::new(labels, [n]), &device);
            let loss = -(y.clone() * log_sigmoid(s.clone())
                + (y.ones_like() - y) * log_sigmoid(s.neg()))
            .mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
        }
        best.epochs_run = epoch;
        let mrr = validate(&model.valid());
        bar.set_position(epoch as u64);
        ui::detail(format!(
            "{label} epoch {epoch}: valid MRR {mrr:.4} ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
        if mrr > best.valid_mrr {
            (best.model, best.valid_mrr, best.epoch) = (model.valid(), mrr, epoch);
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= config.patience {
                break;
            }
        }
    }
    bar.finish_and_clear();
    best
}

/// The pairs of `chunk`, each followed by `negatives` sampled items (not the user's positives,
/// as far as 20 draws can tell) labelled 0.
fn with_negatives(
    data: &TrainingPairs,
    chunk: &[usize],
    negatives: usize,
    rng: &mut ChaCha8Rng,
) -> (Vec<usize>, Vec<usize>, Vec<f32>) {
    let k = chunk.len() * (1 + negatives);
    let (mut users, mut items, mut labels) = (
        Vec::with_capacity(k),
        Vec::with_capacity(k),
        Vec::with_capacity(k),
    );
    for &p in chunk {
        let (u, pos) = data.pairs[p];
        users.push(u);
        items.push(pos);
        labels.push(1.0f32);
        for _ in 0..negatives {
            let mut j = rng.random_range(0..data.n_items);
            for _ in 0..20 {
                if !data.positives[u].contains(&j) {
                    break;
                }
                j = rng.random_range(0..data.n_items);
            }
            users.push(u);
            items.push(j);
            labels.push(0.0);
        }
    }
    (users, items, labels)
}
