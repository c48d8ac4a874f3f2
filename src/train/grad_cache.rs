//! GradCache (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
//! Setup", 2021): a contrastive step whose memory grows with a chunk of users, not the batch.
//!
//! 1. Every chunk's projected embeddings are computed on the backend without autodiff: no
//!    graph is kept.
//! 2. The loss over the whole batch (every other user is still a negative) and its gradient
//!    with respect to those embeddings are computed; this also gives the logit scale's gradient.
//! 3. Each chunk is encoded again with its graph and back-propagated with its rows of that
//!    cached gradient (the gradient of `sum(z ⊙ g)` is `g` pushed through the encoder); the
//!    chunks' parameter gradients add up to the whole batch's.
//!
//! Both passes over a chunk draw the same dropout masks (`with_chunk_masks`, keyed by the place
//! of the chunk's first user in the batch), so the gradient is the exact gradient of the loss the
//! first pass measured. Data-parallel workers run the same phases on their share of the batch
//! (`train::parallel`).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::data::batcher::UserBatch;
use crate::data::chunk::item_multiple;
use crate::model::ClueModel;
use crate::model::dropout::with_chunk_masks;
use crate::train::loss::is_finite;
use crate::train::metrics::{ClueOutput, StepParts};

/// Training step `step` of `model` (a run seeded with `seed`) on `batch` in chunks of `chunk`
/// users: the loss and similarities of the whole batch and its parameter gradients (`None`
/// when the loss is not finite).
pub fn grad_cache_step<B: AutodiffBackend>(
    model: &ClueModel<B>,
    seed: u64,
    batch: &UserBatch<B>,
    chunk: usize,
    step: u64,
) -> StepParts<B> {
    let chunks = batch.split(chunk, item_multiple::<B>());
    let key = MaskKey { seed, step };
    // 1. Embeddings without graphs.
    let projected = Tensor::<B, 2>::from_inner(key.embed_frozen(model, &chunks, 0)).require_grad();
    // 2. The whole batch's loss and its gradient with respect to the embeddings.
    let out = ClueOutput::of(
        projected.clone(),
        batch.services,
        model.log_logit_scale.val(),
    );
    if !is_finite(&out.loss) {
        return (out, None);
    }
    let mut loss_grads = out.loss.backward();
    let cached = projected
        .grad_remove(&mut loss_grads)
        .expect("the embeddings are a leaf of the loss");
    let mut total = GradientsAccumulator::<ClueModel<B>>::new();
    total.accumulate(model, GradientsParams::from_grads(loss_grads, model));
    // 3. Each chunk again, with its graph, back-propagated with its rows of the cached gradient.
    key.replay(model, &chunks, &cached, 0, &mut total);
    (out, Some(total.grads()))
}

/// The step whose dropout masks the chunks draw: a chunk's masks are keyed by the place of its
/// first user in the (global) batch, so one chunk is the plain step, and a data-parallel worker's
/// chunks draw what the same chunks would draw in one process.
#[derive(Debug, Clone, Copy)]
pub struct MaskKey {
    pub seed: u64,
    pub step: u64,
}

impl MaskKey {
    /// `f` under the masks of the chunk whose first user is user `first` of the batch.
    pub fn masks<T>(self, first: usize, f: impl FnOnce() -> T) -> T {
        with_chunk_masks(self.seed, self.step, first as u64, f)
    }

    /// Phase 1: the projected embeddings of `chunks`, consecutive users of a batch from user
    /// `offset` on, without graphs, as one matrix in row order s·m + i (m users in all).
    pub fn embed_frozen<B: AutodiffBackend>(
        self,
        model: &ClueModel<B>,
        chunks: &[UserBatch<B>],
        offset: usize,
    ) -> Tensor<B::InnerBackend, 2> {
        let frozen = model.valid();
        let mut first = offset;
        let parts: Vec<Tensor<B::InnerBackend, 2>> = chunks
            .iter()
            .map(|c| {
                let z = self.masks(first, || frozen.forward(&c.inner()));
                first += c.len();
                z
            })
            .collect();
        let services = chunks[0].services;
        let [_, d] = parts[0].dims();
        let mut pieces = Vec::with_capacity(services * chunks.len());
        for s in 0..services {
            for (part, c) in parts.iter().zip(chunks) {
                let m = c.len();
                pieces.push(part.clone().slice([s * m..(s + 1) * m, 0..d]));
            }
        }
        Tensor::cat(pieces, 0)
    }

    /// Phase 3: each of `chunks` (users from user `offset` of the batch on) encoded again with
    /// its graph and back-propagated with its rows of `cached`, the loss gradient of the whole
    /// batch's embeddings (row s·n + i); the gradients go into `total`.
    pub fn replay<B: AutodiffBackend>(
        self,
        model: &ClueModel<B>,
        chunks: &[UserBatch<B>],
        cached: &Tensor<B::InnerBackend, 2>,
        offset: usize,
        total: &mut GradientsAccumulator<ClueModel<B>>,
    ) {
        let services = chunks[0].services;
        let [rows, d] = cached.dims();
        let n = rows / services;
        let mut first = offset;
        let device = model.devices()[0].clone();
        for c in chunks {
            let m = c.len();
            let rows: Vec<Tensor<B::InnerBackend, 2>> = (0..services)
                .map(|s| {
                    cached
                        .clone()
                        .slice([s * n + first..s * n + first + m, 0..d])
                })
                .collect();
            let g = Tensor::<B, 2>::from_inner(Tensor::cat(rows, 0));
            // A fresh replica (same parameter ids) per chunk: a backward pass makes Burn 0.21's
            // process-wide graph registry forget the parameters' nodes, so a chunk encoded by the
            // model itself would hold none of them, and at a `cat` another thread's backward
            // pass (another data-parallel worker) could free the chunk's first nodes, losing
            // part of its gradient (tests/split_steps.rs reproduces it).
            let replica = model.clone().fork(&device);
            let z = self.masks(first, || replica.forward(c));
            let grads = (z * g).sum().backward();
            total.accumulate(model, GradientsParams::from_grads(grads, &replica));
            first += m;
        }
    }
}
