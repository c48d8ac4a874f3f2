//! `clue score` and the scoring of a split after training: contrastive loss and in-batch
//! retrieval of held-out users with fixed, unshuffled batches.

use std::path::Path;
use std::sync::Arc;

use burn::data::dataloader::DataLoader;
use burn::prelude::*;
use burn::train::{InferenceStep, ItemLazy};
use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, SplitScore};
use crate::data::batcher::{UserBatcher, UserDataset};
use crate::data::store::{PreparedDataset, Split};
use crate::error::{ClueError, Result};
use crate::model::ClueModel;
use crate::train::config::RunConfig;
use crate::train::loader::ListLoader;
use crate::train::metrics::BatchStats;
use crate::train::step::{StepSettings, Trainee};

/// Contrastive loss and retrieval of `users` with fixed, unshuffled batches of `batch_size`.
pub fn score<B: Backend>(
    model: &ClueModel<B>,
    data: &Arc<PreparedDataset>,
    users: Vec<u32>,
    config: &RunConfig,
) -> SplitScore {
    let trainee = Trainee {
        model: model.clone(),
        settings: StepSettings::default(),
    };
    let n = users.len();
    let loader = ListLoader::<B>::held_out(data.clone(), users, config, model.devices()[0].clone());
    let (mut loss, mut ab, mut ba, mut top10, mut top10_n, mut total) =
        (0.0, 0.0, 0.0, 0.0, 0usize, 0usize);
    for batch in loader.iter() {
        let s: BatchStats = InferenceStep::step(&trainee, batch).sync();
        let w = s.users as f64;
        loss += s.loss * w;
        ab += s.top1_ab * w;
        ba += s.top1_ba * w;
        if let Some(t) = s.top10_ab {
            top10 += t * w;
            top10_n += s.users;
        }
        total += s.users;
    }
    let t = total.max(1) as f64;
    SplitScore {
        loss: loss / t,
        top1_ab: ab / t,
        top1_ba: ba / t,
        top10_ab: (top10_n > 0).then(|| top10 / top10_n as f64),
        users: n,
        batch_size: config.train.batch_size,
    }
}

/// `clue score`: a bundle's contrastive loss and retrieval on one split of a prepared dataset,
/// plus the first users' embeddings (to compare backends on the same weights).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreReport {
    pub backend: String,
    pub split: Split,
    pub score: SplitScore,
    /// Embeddings `[service][user][dim]` of the split's first users (at most 4).
    pub embeddings_head: Vec<Vec<Vec<f32>>>,
}

pub fn score_bundle<B: Backend>(
    model_dir: &Path,
    data_dir: &Path,
    split: Split,
    verify: bool,
    device: &B::Device,
) -> Result<ScoreReport> {
    let Bundle { model, config, .. } = Bundle::<B>::load(model_dir, device)?;
    let data = Arc::new(PreparedDataset::open(data_dir, verify)?);
    if data.manifest.vocab_size as usize != config.model.vocab_size {
        return Err(ClueError::config(
            "the dataset's tokenizer does not match the model's vocabulary",
            "score with the data the model was trained on",
        ));
    }
    let users = data.users_in(split);
    let head: Vec<u32> = users.iter().copied().take(4).collect();
    let ds = UserDataset::with_users(
        data.clone(),
        head.clone(),
        config.model.max_items,
        config.model.max_item_tokens,
    );
    let samples = (0..head.len())
        .filter_map(|i| burn::data::dataset::Dataset::get(&ds, i))
        .collect();
    let batch = burn::data::dataloader::batcher::Batcher::<B, _, _>::batch(
        &UserBatcher::of::<B>(config.model.max_items, config.model.max_item_tokens),
        samples,
        device,
    );
    let z: Vec<f32> = model
        .encoder
        .forward(&batch)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("floats");
    let dim = config.model.embedding_dim();
    let embeddings_head = (0..data.num_services())
        .map(|s| {
            (0..head.len())
                .map(|i| z[(s * head.len() + i) * dim..(s * head.len() + i + 1) * dim].to_vec())
                .collect()
        })
        .collect();
    Ok(ScoreReport {
        backend: B::name(device),
        split,
        score: score(&model, &data, users, &config),
        embeddings_head,
    })
}
