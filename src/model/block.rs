//! The pre-norm Transformer encoder both CLUE transformers use, written out so the CPU path is
//! cheap: linear layers as one matmul over all positions, the attention mask repeated once per
//! encoder, and the operations of [`crate::model::ops`] (fast paths on Flex, seeded dropout
//! masks that a resumed run replays).
//!
//! Same computation as PyTorch's `nn.TransformerEncoderLayer(norm_first=True, activation="gelu")`
//! with dropout on the attention weights, after the attention projection, inside the feed-forward
//! block and after it (the layout of `shared/bench/torch_clue_ref.py`).

use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;

use crate::model::dropout;
use crate::model::init::Init;
use crate::model::ops::{
    LayerParts, Padding, attention, dropout, fused_layer, gelu, layer_norm, linear,
};

/// One pre-norm encoder layer.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm_attention: LayerNorm<B>,
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub attention_out: Linear<B>,
    pub norm_ff: LayerNorm<B>,
    pub ff_in: Linear<B>,
    pub ff_out: Linear<B>,
    pub heads: usize,
    pub dropout: f64,
}

impl<B: Backend> Block<B> {
    pub fn new(d: usize, d_ff: usize, heads: usize, dropout: f64, init: &mut Init<B>) -> Self {
        Self {
            norm_attention: init.layer_norm(d),
            query: init.linear(d, d),
            key: init.linear(d, d),
            value: init.linear(d, d),
            attention_out: init.linear(d, d),
            norm_ff: init.layer_norm(d),
            ff_in: init.linear(d, d_ff),
            ff_out: init.linear(d_ff, d),
            heads,
            dropout,
        }
    }

    fn parts(&self) -> LayerParts<'_, B> {
        LayerParts {
            norms: [&self.norm_attention, &self.norm_ff],
            linears: [
                &self.query,
                &self.key,
                &self.value,
                &self.attention_out,
                &self.ff_in,
                &self.ff_out,
            ],
            heads: self.heads,
        }
    }

    /// `x`: `[n, len, d]`, `padding` of its positions → `[n, len, d]`.
    pub fn forward(&self, x: Tensor<B, 3>, padding: &Padding<B>) -> Tensor<B, 3> {
        // Dropout inactive (inference): the whole layer in one piece where there is a fused path.
        let x = match dropout::active::<B>(self.dropout, &x.device()) {
            true => x,
            false => match fused_layer(self.parts(), x, padding) {
                Ok(y) => return y,
                Err(x) => x,
            },
        };
        let y = layer_norm(&self.norm_attention, x.clone());
        let (q, k, v) = (
            flat(&self.query, y.clone()),
            flat(&self.key, y.clone()),
            flat(&self.value, y),
        );
        let context = attention(q, k, v, padding, self.heads, self.dropout);
        let x = x + dropout(flat(&self.attention_out, context), self.dropout);
        let hidden = gelu(flat(&self.ff_in, layer_norm(&self.norm_ff, x.clone())));
        let ff = flat(&self.ff_out, dropout(hidden, self.dropout));
        x + dropout(ff, self.dropout)
    }
}

/// `layer` over `[n, len, d_in]` as one `[n·len, d_in]` matmul. Burn's `Linear` treats a 3-D
/// input as a batch of `n` small matmuls, and its weight gradient as `n` small products summed
/// afterwards: on the CPU that is most of a training step.
fn flat<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, len, d] = x.dims();
    let y = linear(layer, x.reshape([n * len, d]));
    let out = y.dims()[1];
    y.reshape([n, len, out])
}

/// A stack of [`Block`]s.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub layers: Vec<Block<B>>,
}

impl<B: Backend> Encoder<B> {
    pub fn new(
        d: usize,
        d_ff: usize,
        heads: usize,
        layers: usize,
        dropout: f64,
        init: &mut Init<B>,
    ) -> Self {
        Self {
            layers: (0..layers)
                .map(|_| Block::new(d, d_ff, heads, dropout, init))
                .collect(),
        }
    }

    /// `x`: `[n, len, d]`, `pad`: `[n, len]` (true = padding) → `[n, len, d]`.
    pub fn forward(&self, mut x: Tensor<B, 3>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 3> {
        let padding = Padding::new(pad);
        for layer in &self.layers {
            x = layer.forward(x, &padding);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;

    /// Inference on plain Flex (the fused layer: layer norms, products, attention and GELU per
    /// block of sequences; the op-by-op fast kernels where it does not apply) against Burn's
    /// generic operations on the same weights, with γ and β that differ by feature.
    #[test]
    fn flex_inference_matches_the_generic_path() {
        // On a pool of 2 threads, as CI's. 4 × 6 rows: the layer in one block on this thread.
        // 41 sequences of 9 (d 32, d_ff 128): in blocks of whole sequences, the last one shorter
        // (6 × 6 + 5). 2 of 200: too few sequences to share a large layer, op by op.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            inference_matches_the_generic_path([24, 48], [4, 6], true);
            inference_matches_the_generic_path([32, 128], [41, 9], true);
            inference_matches_the_generic_path([32, 128], [2, 200], false);
        });
    }

    fn inference_matches_the_generic_path(
        [d, d_ff]: [usize; 2],
        [n, len]: [usize; 2],
        fused: bool,
    ) {
        use crate::model::flex::varied_norm;
        use crate::model::ops::{GENERIC, MASKED_SCORE};
        use burn::backend::Flex;
        let dev = Default::default();
        let mut encoder = Encoder::<Flex>::new(d, d_ff, 4, 2, 0.1, &mut Init::new(0, &dev));
        for layer in &mut encoder.layers {
            layer.norm_attention = varied_norm(d, &dev);
            layer.norm_ff = varied_norm(d, &dev);
        }
        let x: Vec<f32> = (0..n * len * d)
            .map(|i| ((i * 29 % 97) as f32 - 48.0) / 24.0)
            .collect();
        // Sequence 1 is padding only; the others have s % len padding positions at their end.
        let pad: Vec<bool> = (0..n * len)
            .map(|i| i / len == 1 || i % len >= len - (i / len) % len)
            .collect();
        let tensors = || {
            let x = Tensor::<Flex, 3>::from_data(TensorData::new(x.clone(), [n, len, d]), &dev);
            let pad =
                Tensor::<Flex, 2, Bool>::from_data(TensorData::new(pad.clone(), [n, len]), &dev);
            (x, pad)
        };
        let (x0, pad0) = tensors();
        let parts = encoder.layers[0].parts();
        let took = crate::model::flex::layer(parts, x0, &pad0, MASKED_SCORE as f32).is_ok();
        assert_eq!(took, fused, "{n}×{len}: the fused layer taken");
        let run = |generic: bool| {
            GENERIC.set(generic);
            let (x, pad) = tensors();
            let y: Vec<f32> = encoder.forward(x, pad).into_data().to_vec().unwrap();
            GENERIC.set(false);
            y
        };
        let (fast, generic) = (run(false), run(true));
        assert_eq!(fast.len(), generic.len());
        let diff = fast
            .iter()
            .zip(&generic)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "d {d}, {n}×{len}: max |Δ| = {diff}");
    }

    /// Flex's own kernels (linear, attention, GELU) against Burn's generic operations on the
    /// same backend, weights and dropout masks, forward and backward; with heads of 4 columns
    /// and 5 positions, and with heads of 26 columns (the attention's products in tiles of 16, 8
    /// and 1 columns) and 11 positions (16 query lanes).
    #[test]
    fn flex_fast_paths_match_the_generic_path() {
        fast_paths_match_the_generic_path(16, 4, 5);
        fast_paths_match_the_generic_path(52, 2, 11);
    }

    fn fast_paths_match_the_generic_path(d: usize, heads: usize, len: usize) {
        use crate::model::ops::GENERIC;
        use burn::backend::Flex;
        type Fx = Autodiff<Flex>;
        let dev = Default::default();
        // With dropout: both paths draw the same masks (the fast attention's in the layout of
        // the generic path's `[n, heads, len, len]` weights).
        let encoder = Encoder::<Fx>::new(d, 2 * d, heads, 2, 0.2, &mut Init::new(0, &dev));
        let n = 4;
        let x: Vec<f32> = (0..n * len * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        // Rows 0–2 have 0, 1 and 2 padding positions at their end; row 3 has padding first, in
        // the middle and last.
        let pad: Vec<bool> = (0..n * len)
            .map(|i| match i / len {
                3 => (i % len).is_multiple_of(2),
                row => i % len >= len - row,
            })
            .collect();
        // A weighted sum, so every output position gets its own gradient.
        let weights: Vec<f32> = (0..n * len * d).map(|i| (i % 7) as f32 - 3.0).collect();
        let run = |generic: bool| {
            GENERIC.set(generic);
            crate::model::dropout::start_step(7, 0);
            let x = Tensor::<Fx, 3>::from_data(TensorData::new(x.clone(), [n, len, d]), &dev)
                .require_grad();
            let pad =
                Tensor::<Fx, 2, Bool>::from_data(TensorData::new(pad.clone(), [n, len]), &dev);
            let w = Tensor::<Fx, 3>::from_data(TensorData::new(weights.clone(), [n, len, d]), &dev);
            let y = encoder.forward(x.clone(), pad);
            let grads = (y.clone() * w).sum().backward();
            GENERIC.set(false);
            let layer = &encoder.layers[0];
            let grad = |p: &burn::module::Param<Tensor<Fx, 2>>| p.grad(&grads).unwrap().into_data();
            [
                y.into_data(),
                x.grad(&grads).unwrap().into_data(),
                grad(&layer.query.weight),
                grad(&layer.key.weight),
                grad(&layer.value.weight),
                grad(&layer.ff_in.weight),
            ]
        };
        let (fast, generic) = (run(false), run(true));
        for (what, (a, b)) in ["output", "input gradient", "query", "key", "value", "ff_in"]
            .iter()
            .zip(fast.into_iter().zip(generic))
        {
            let a: Vec<f32> = a.convert::<f32>().to_vec().unwrap();
            let b: Vec<f32> = b.convert::<f32>().to_vec().unwrap();
            assert_eq!(a.len(), b.len());
            let diff = a
                .iter()
                .zip(&b)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            let scale = a.iter().map(|a| a.abs()).fold(1.0, f32::max);
            assert!(
                diff < 1e-5 * scale,
                "d {d}, len {len}, {what}: max |Δ| = {diff}, largest {scale}"
            );
        }
    }
}
