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
//! Both passes over a chunk draw the same dropout masks (`with_chunk_masks`), so the gradient
//! is the exact gradient of the loss the first pass measured.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::backend::BackendKind;
use crate::data::batcher::{ITEM_MULTIPLE, UserBatch};
use crate::model::ClueModel;
use crate::model::dropout::with_chunk_masks;
use crate::train::loss::is_finite;
use crate::train::metrics::ClueOutput;

/// Training step `step` of `model` (a run seeded with `seed`) on `batch` in chunks of `chunk`
/// users: the loss and logits of the whole batch and its parameter gradients (`None` when the
/// loss is not finite).
pub fn grad_cache_step<B: AutodiffBackend>(
    model: &ClueModel<B>,
    seed: u64,
    batch: &UserBatch<B>,
    chunk: usize,
    step: u64,
) -> (ClueOutput<B>, Option<GradientsParams>) {
    let multiple = if BackendKind::of::<B>().fixed_shapes() {
        ITEM_MULTIPLE
    } else {
        1
    };
    let chunks = batch.split(chunk, multiple);
    let services = batch.services;
    let n = batch.len();

    // 1. Embeddings without graphs.
    let frozen = model.valid();
    let parts: Vec<Tensor<B::InnerBackend, 2>> = chunks
        .iter()
        .enumerate()
        .map(|(k, c)| with_chunk_masks(seed, step, k as u64, || frozen.forward(&c.inner())))
        .collect();
    drop(frozen);
    // Row s·n + i of the batch = row s·m + (i − first) of the chunk holding user i (m users).
    let [_, d] = parts[0].dims();
    let rows_of = |t: &Tensor<B::InnerBackend, 2>, s: usize, m: usize| {
        t.clone().slice([s * m..(s + 1) * m, 0..d])
    };
    let mut pieces = Vec::with_capacity(services * chunks.len());
    for s in 0..services {
        for (part, c) in parts.iter().zip(&chunks) {
            pieces.push(rows_of(part, s, c.len()));
        }
    }
    drop(parts);
    let projected = Tensor::<B, 2>::from_inner(Tensor::cat(pieces, 0)).require_grad();

    // 2. The whole batch's loss and its gradient with respect to the embeddings.
    let out = ClueOutput::of(projected.clone(), services, model.logit_scale());
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
    let mut first = 0;
    for (k, c) in chunks.iter().enumerate() {
        let m = c.len();
        let rows: Vec<Tensor<B::InnerBackend, 2>> = (0..services)
            .map(|s| {
                cached
                    .clone()
                    .slice([s * n + first..s * n + first + m, 0..d])
            })
            .collect();
        let g = Tensor::<B, 2>::from_inner(Tensor::cat(rows, 0));
        let z = with_chunk_masks(seed, step, k as u64, || model.forward(c));
        let grads = (z * g).sum().backward();
        total.accumulate(model, GradientsParams::from_grads(grads, model));
        first += m;
    }
    (out, Some(total.grads()))
}
