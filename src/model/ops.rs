//! The operations of the encoder layers, each with its fast path (Burn's Flex CPU backend:
//! [`crate::model::flex`]; wgpu and CUDA: `crate::cube`) tried first and Burn's generic code
//! right beside it, in the style of `candle_nn::ops`. The path is chosen by
//! [`BackendKind::of`] and nowhere else.

use std::cell::OnceCell;
use std::sync::Arc;

use burn::nn::{LayerNorm, Linear, Relu};
use burn::prelude::*;
use burn::tensor::{IndexingUpdateOp, activation};

use crate::backend::BackendKind;
use crate::model::flex;

pub use crate::model::dropout::dropout;
pub use crate::model::flex::{LayerParts, SparseMatrix};

/// Score given to padding keys before the softmax (Burn's multi-head attention uses the same).
pub const MASKED_SCORE: f64 = -1.0e4;

#[cfg(test)]
thread_local! {
    /// Set: this thread takes the generic paths even on Flex (to test the fast ones against).
    pub(crate) static GENERIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether `B` is of `kind`, the kind whose fast paths apply (never under the tests' `GENERIC`
/// switch).
fn is<B: Backend>(kind: BackendKind) -> bool {
    #[cfg(test)]
    if GENERIC.get() {
        return false;
    }
    BackendKind::of::<B>() == kind
}

/// `f(x)`, the fast path, where `B` is of `kind` (the one `f` is written for); `Err(x)`, `x`
/// back for the generic path, where it is not or `f` gives it back.
fn fast_path<B: Backend, T, U>(
    kind: BackendKind,
    x: T,
    f: impl FnOnce(T) -> Result<U, T>,
) -> Result<U, T> {
    match is::<B>(kind) {
        true => f(x),
        false => Err(x),
    }
}

/// `x·W + b` of a linear layer, `x`: `[rows, d_in]` → `[rows, d_out]`.
pub fn linear<B: Backend>(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let x = match fast_path::<B, _, _>(BackendKind::Flex, x, |x| flex::linear(layer, x)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match fast_path::<B, _, _>(BackendKind::Accelerator, x, |x| match &layer.bias {
        Some(bias) => crate::cube::linear(x, layer.weight.val(), bias.val()),
        None => Err(x),
    }) {
        Ok(y) => return y,
        Err(x) => x,
    };
    layer.forward(x)
}

/// `max(x, 0)`, by `relu` (Burn's module) where there is no fast path.
pub fn relu<B: Backend, const D: usize>(relu: &Relu, x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match fast_path::<B, _, _>(BackendKind::Accelerator, x, crate::cube::relu) {
        Ok(y) => return y,
        Err(x) => x,
    };
    relu.forward(x)
}

/// `min(x, max)`, its gradient passed where `x ≤ max`.
pub fn clamp_max<B: Backend, const D: usize>(x: Tensor<B, D>, max: f64) -> Tensor<B, D> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match fast_path::<B, _, _>(BackendKind::Accelerator, x, |x| {
        crate::cube::clamp_max(x, max as f32)
    }) {
        Ok(y) => return y,
        Err(x) => x,
    };
    x.clamp_max(max)
}

/// An encoder layer without dropout (inference) in one piece, `x`: `[n, len, d]`; `Err(x)`
/// where there is no fused path (the caller runs it op by op).
pub fn fused_layer<B: Backend>(
    parts: LayerParts<B>,
    x: Tensor<B, 3>,
    padding: &Padding<B>,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    fast_path::<B, _, _>(BackendKind::Flex, x, |x| {
        flex::layer(parts, x, &padding.pad, MASKED_SCORE as f32)
    })
}

/// `norm(x)`: a layer norm over the last axis.
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let x = match fast_path::<B, _, _>(BackendKind::Flex, x, |x| flex::layer_norm(norm, x)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match fast_path::<B, _, _>(BackendKind::Accelerator, x, |x| match &norm.beta {
        Some(beta) => {
            crate::cube::layer_norm(x, norm.gamma.val(), beta.val(), flex::LAYER_NORM_EPSILON)
        }
        None => Err(x),
    }) {
        Ok(y) => return y,
        Err(x) => x,
    };
    norm.forward(x)
}

/// The mean of `norm(x)` over each sequence's positions that are not padding (`x`:
/// `[n, len, d]`, `pad`: `[n, len]`, true = padding → `[n, d]`); a sequence of padding only
/// gives zeros. The generic path is written with `mask_fill`, so it keeps `x`'s dtype (bf16
/// stays bf16).
pub fn pooled<B: Backend>(
    norm: &LayerNorm<B>,
    x: Tensor<B, 3>,
    pad: Tensor<B, 2, Bool>,
) -> Tensor<B, 2> {
    let x = match fast_path::<B, _, _>(BackendKind::Flex, x, |x| flex::pooled(norm, x, &pad)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    let x = layer_norm(norm, x);
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match fast_path::<B, _, _>(BackendKind::Accelerator, x, |x| {
        crate::cube::masked_mean(x, &pad)
    }) {
        Ok(mean) => return mean,
        Err(x) => x,
    };
    let [n, len, d] = x.dims();
    let pad3 = pad.unsqueeze_dim::<3>(2);
    let count = x
        .clone()
        .slice([0..n, 0..len, 0..1])
        .ones_like()
        .mask_fill(pad3.clone(), 0.0)
        .sum_dim(1)
        .clamp_min(1.0);
    let sum = x.mask_fill(pad3.expand([n, len, d]), 0.0).sum_dim(1);
    (sum / count).squeeze_dim::<2>(1)
}

/// `x·Φ(x)` with Φ the standard normal CDF (PyTorch's `gelu`, `approximate="none"`).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = match fast_path::<B, _, _>(BackendKind::Flex, x, |x| flex::gelu(x)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match fast_path::<B, _, _>(BackendKind::Accelerator, x, |x| crate::cube::gelu(x)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    activation::gelu(x)
}

/// `a · x`: a fixed sparse matrix `[rows, cols]` times `x` `[cols, d]` → `[rows, d]`
/// (differentiable in `x`). The generic path gathers a row of `x` per entry, scales it by the
/// entry and scatter-adds it into the output.
pub fn sparse_times<B: Backend>(a: &Arc<SparseMatrix>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    assert_eq!(
        x.dims()[0],
        a.shape()[1],
        "sparse_times: x has {} rows, the matrix {} columns",
        x.dims()[0],
        a.shape()[1]
    );
    let x = match fast_path::<B, _, _>(BackendKind::Flex, x, |x| flex::sparse_times(a, x)) {
        Ok(y) => return y,
        Err(x) => x,
    };
    let device = x.device();
    let ([rows, _], d) = (a.shape(), x.dims()[1]);
    let (mut at, mut from, mut weight) = (Vec::new(), Vec::new(), Vec::new());
    for (r, c, w) in a.entries() {
        at.push(r as i64);
        from.push(c as i64);
        weight.push(w);
    }
    let m = weight.len();
    let out = Tensor::<B, 2>::zeros([rows, d], &device);
    if m == 0 {
        return out;
    }
    let index = |v: Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v, [m]), &device);
    let weight = Tensor::<B, 1>::from_data(TensorData::new(weight, [m]), &device).reshape([m, 1]);
    let values = x.select(0, index(from)) * weight;
    out.select_assign(0, index(at), values, IndexingUpdateOp::Add)
}

/// Which positions of an encoder's input are padding (`pad`: `[n, len]`, true = padding), and
/// the attention mask the generic path makes from it, built when a layer first needs it and
/// then shared by all layers.
pub struct Padding<B: Backend> {
    pub pad: Tensor<B, 2, Bool>,
    mask: OnceCell<Tensor<B, 4, Bool>>,
}

impl<B: Backend> Padding<B> {
    pub fn new(pad: Tensor<B, 2, Bool>) -> Self {
        Self {
            pad,
            mask: OnceCell::new(),
        }
    }

    /// The keys each query may not attend to: `pad` repeated into `[n, heads, len, len]`, in
    /// memory once for all layers (CPU backends would otherwise expand it element by element
    /// in every masking, forward and backward).
    fn mask(&self, heads: usize) -> Tensor<B, 4, Bool> {
        let [n, len] = self.pad.dims();
        self.mask
            .get_or_init(|| {
                self.pad
                    .clone()
                    .reshape([n, 1, 1, len])
                    .repeat_dim(2, len)
                    .repeat_dim(1, heads)
            })
            .clone()
    }
}

/// Multi-head attention of projected queries, keys and values `[n, len, d]` (`d = heads·d_head`)
/// with dropout `p` on the weights: the heads' outputs side by side, `[n, len, d]`.
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    padding: &Padding<B>,
    heads: usize,
    p: f64,
) -> Tensor<B, 3> {
    if is::<B>(BackendKind::Flex)
        && let Some(context) =
            flex::attention(&q, &k, &v, &padding.pad, heads, MASKED_SCORE as f32, p)
    {
        return context;
    }
    let [n, len, d] = q.dims();
    let dh = d / heads;
    // [n, len, d] → [n, h, len, dh] and back.
    let split = |t: Tensor<B, 3>| t.reshape([n, len, heads, dh]).swap_dims(1, 2);
    let (q, k, v) = (split(q), split(k), split(v));
    let scores = q.matmul(k.swap_dims(2, 3));
    let weights = attention_weights(scores, padding, heads, 1.0 / (dh as f64).sqrt());
    let context = dropout(weights, p).matmul(v); // [n, h, len, dh]
    context.swap_dims(1, 2).reshape([n, len, d])
}

/// The attention's weights from its scores `[n, heads, len, len]`: `softmax(scores · scale)`
/// over the keys, with the keys that are padding at [`MASKED_SCORE`] before it.
fn attention_weights<B: Backend>(
    scores: Tensor<B, 4>,
    padding: &Padding<B>,
    heads: usize,
    scale: f64,
) -> Tensor<B, 4> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let scores = match fast_path::<B, _, _>(BackendKind::Accelerator, scores, |s| {
        crate::cube::masked_softmax(s, &padding.pad, scale as f32, MASKED_SCORE as f32)
    }) {
        Ok(weights) => return weights,
        Err(scores) => scores,
    };
    let scores = scores.mul_scalar(scale);
    activation::softmax(scores.mask_fill(padding.mask(heads), MASKED_SCORE), 3)
}
