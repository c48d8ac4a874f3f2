//! The pre-norm Transformer encoder both CLUE transformers use, written out so the CPU path is
//! cheap: linear layers as one matmul over all positions, the attention mask repeated once per
//! encoder, and [`linear`], [`attention`] and [`gelu`] with fast paths on Flex (see
//! `model::flex`), and dropout masks drawn by a fast generator on the CPU backends (Burn's
//! generic sampler draws element by element: ~14 % of a CPU step).
//!
//! Same computation as PyTorch's `nn.TransformerEncoderLayer(norm_first=True, activation="gelu")`
//! with dropout on the attention weights, after the attention projection, inside the feed-forward
//! block and after it (the layout of `shared/bench/torch_clue_ref.py`).

use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{Distribution, TensorData};
use rayon::prelude::*;

use crate::model::flex::{attention, gelu, linear};

/// Score given to padding keys before the softmax (Burn's multi-head attention uses the same).
const MASKED_SCORE: f64 = -1.0e4;

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
    pub fn new(d: usize, d_ff: usize, heads: usize, dropout: f64, device: &B::Device) -> Self {
        Self {
            norm_attention: LayerNormConfig::new(d).init(device),
            query: LinearConfig::new(d, d).init(device),
            key: LinearConfig::new(d, d).init(device),
            value: LinearConfig::new(d, d).init(device),
            attention_out: LinearConfig::new(d, d).init(device),
            norm_ff: LayerNormConfig::new(d).init(device),
            ff_in: LinearConfig::new(d, d_ff).init(device),
            ff_out: LinearConfig::new(d_ff, d).init(device),
            heads,
            dropout,
        }
    }

    /// `x`: `[n, len, d]`, `padding` of its positions → `[n, len, d]`.
    pub fn forward(&self, x: Tensor<B, 3>, padding: &Padding<B>) -> Tensor<B, 3> {
        let [n, len, d] = x.dims();
        let (h, dh) = (self.heads, d / self.heads);
        let y = self.norm_attention.forward(x.clone());
        let (q, k, v) = (
            flat(&self.query, y.clone()),
            flat(&self.key, y.clone()),
            flat(&self.value, y),
        );
        let context = attention(
            &q,
            &k,
            &v,
            &padding.pad,
            h,
            MASKED_SCORE as f32,
            self.dropout,
        )
        .unwrap_or_else(|| {
            // [n, len, d] → [n, h, len, dh] and back.
            let split = |t: Tensor<B, 3>| t.reshape([n, len, h, dh]).swap_dims(1, 2);
            let (q, k, v) = (split(q), split(k), split(v));
            let scores = q
                .matmul(k.swap_dims(2, 3))
                .mul_scalar(1.0 / (dh as f64).sqrt());
            let weights = softmax(scores.mask_fill(padding.mask(h), MASKED_SCORE), 3);
            let context = dropout(weights, self.dropout).matmul(v); // [n, h, len, dh]
            context.swap_dims(1, 2).reshape([n, len, d])
        });
        let x = x + dropout(flat(&self.attention_out, context), self.dropout);
        let hidden = gelu(flat(&self.ff_in, self.norm_ff.forward(x.clone())));
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
        device: &B::Device,
    ) -> Self {
        Self {
            layers: (0..layers)
                .map(|_| Block::new(d, d_ff, heads, dropout, device))
                .collect(),
        }
    }

    /// `x`: `[n, len, d]`, `pad`: `[n, len]` (true = padding) → `[n, len, d]`.
    pub fn forward(&self, mut x: Tensor<B, 3>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 3> {
        let padding = Padding {
            pad,
            mask: OnceCell::new(),
        };
        for layer in &self.layers {
            x = layer.forward(x, &padding);
        }
        x
    }
}

/// Which positions of an encoder's input are padding (`pad`: `[n, len]`, true = padding), and
/// the attention mask made from it, built when a layer first needs it and then shared.
pub struct Padding<B: Backend> {
    pad: Tensor<B, 2, Bool>,
    mask: OnceCell<Tensor<B, 4, Bool>>,
}

impl<B: Backend> Padding<B> {
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

/// State of the CPU dropout generator; [`seed_dropout`] sets it.
static DROPOUT_STATE: AtomicU64 = AtomicU64::new(0x5EED_C1CE);

/// Seed the CPU backends' dropout masks (GPU backends use the backend's seeded generator).
pub fn seed_dropout(seed: u64) {
    DROPOUT_STATE.store(splitmix64(seed), Ordering::SeqCst);
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout, active only while training (an autodiff backend), as Burn's `Dropout`.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    let device = x.device();
    if p <= 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    let keep = 1.0 - p;
    let name = B::name(&device);
    if !(name.contains("flex") || name.contains("ndarray")) {
        return x.clone() * x.random_like(Distribution::Bernoulli(keep)) * (1.0 / keep);
    }
    // A boolean mask: autodiff keeps one byte per element for the backward pass, not four.
    let shape = x.shape();
    let n = shape.num_elements();
    let mask = draw_drop_mask(n, p);
    let drop = Tensor::<B, 1, Bool>::from_data(TensorData::new(mask, [n]), &device).reshape(shape);
    x.mask_fill(drop, 0.0).mul_scalar(1.0 / keep)
}

/// The next dropout mask of the CPU generator: `n` flags, true = dropped.
pub(crate) fn draw_drop_mask(n: usize, p: f64) -> Vec<bool> {
    #[cfg(test)]
    if let Some(stream) = tests::OWN_STREAM.get() {
        tests::OWN_STREAM.set(Some(stream + 1));
        return drop_mask(n, p, stream);
    }
    drop_mask(n, p, DROPOUT_STATE.fetch_add(1, Ordering::SeqCst))
}

/// `n` flags, each true (drop) with probability `p` (in steps of 2⁻¹⁶), from a counter-based
/// generator: four draws per 64-bit hash, filled in parallel (the result does not depend on the
/// number of threads).
fn drop_mask(n: usize, p: f64, stream: u64) -> Vec<bool> {
    const BLOCKS: usize = 4096; // hashes per parallel task
    let threshold = (p * 65536.0).round() as u64;
    let key = splitmix64(stream);
    let mut out = vec![false; n];
    out.par_chunks_mut(4 * BLOCKS)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, flags) in chunk.chunks_mut(4).enumerate() {
                let block = (task * BLOCKS + i) as u64;
                let bits = splitmix64(key ^ block.wrapping_mul(0xD1B5_4A32_D192_ED03));
                for (lane, flag) in flags.iter_mut().enumerate() {
                    *flag = (bits >> (16 * lane)) & 0xFFFF < threshold;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    thread_local! {
        /// Set: this thread's dropout masks come from its own stream counter, so a test can
        /// draw the same masks twice while other tests draw theirs.
        pub(super) static OWN_STREAM: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    }

    #[test]
    fn drop_masks_drop_about_p() {
        let mask = drop_mask(400_003, 0.1, 7);
        assert_eq!(mask.len(), 400_003);
        let dropped = mask.iter().filter(|&&m| m).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.003, "dropped {dropped}");
        // Lanes of one hash are independent: pairs both dropped ≈ p².
        let pairs = mask.len() / 2;
        let both = (0..pairs)
            .filter(|&i| mask[2 * i] && mask[2 * i + 1])
            .count() as f64;
        assert!((both / pairs as f64 - 0.01).abs() < 0.002, "both {both}");
        assert_ne!(
            drop_mask(64, 0.5, 8),
            drop_mask(64, 0.5, 7),
            "streams differ"
        );
        assert_eq!(
            drop_mask(64, 0.5, 7),
            drop_mask(64, 0.5, 7),
            "deterministic"
        );
        assert!(drop_mask(1000, 0.0, 3).iter().all(|&m| !m));
    }

    #[test]
    fn dropout_acts_only_while_training() {
        let device = Default::default();
        let x = Tensor::<NdArray, 2>::ones([50, 40], &device);
        let same = dropout(x.clone(), 0.5);
        assert_eq!(same.to_data(), x.to_data(), "no autodiff: identity");
        let t = Tensor::<Autodiff<NdArray>, 2>::ones([50, 40], &device);
        let y: Vec<f32> = dropout(t, 0.5).into_data().to_vec().unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!((800..1200).contains(&zeros), "{zeros} of 2000 dropped");
        assert!(
            y.iter().all(|&v| v == 0.0 || v == 2.0),
            "the rest scaled by 1/(1-p)"
        );
    }

    /// Inference on plain Flex (clue's linear, GELU and attention kernels) against Burn's
    /// generic operations on the same weights.
    #[test]
    fn flex_inference_matches_the_generic_path() {
        use crate::model::flex::tests::GENERIC;
        use burn::backend::Flex;
        let dev = Default::default();
        let encoder = Encoder::<Flex>::new(24, 48, 4, 2, 0.1, &dev);
        let (n, len) = (4, 6);
        let x: Vec<f32> = (0..n * len * 24)
            .map(|i| ((i * 29 % 97) as f32 - 48.0) / 24.0)
            .collect();
        // Row i has i padding positions at its end.
        let pad: Vec<bool> = (0..n * len).map(|i| i % len >= len - i / len).collect();
        let run = |generic: bool| {
            GENERIC.set(generic);
            let x = Tensor::<Flex, 3>::from_data(TensorData::new(x.clone(), [n, len, 24]), &dev);
            let pad =
                Tensor::<Flex, 2, Bool>::from_data(TensorData::new(pad.clone(), [n, len]), &dev);
            let y: Vec<f32> = encoder.forward(x, pad).into_data().to_vec().unwrap();
            GENERIC.set(false);
            y
        };
        let (fast, generic) = (run(false), run(true));
        let diff = fast
            .iter()
            .zip(&generic)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "max |Δ| = {diff}");
    }

    /// Flex's own kernels (linear, attention, GELU) against Burn's generic operations on the
    /// same backend, weights and dropout masks, forward and backward.
    #[test]
    fn flex_fast_paths_match_the_generic_path() {
        use crate::model::flex::tests::GENERIC;
        use burn::backend::Flex;
        type Fx = Autodiff<Flex>;
        let dev = Default::default();
        // With dropout: both paths draw the same masks (the fast attention's in the layout of
        // the generic path's `[n, heads, len, len]` weights).
        let encoder = Encoder::<Fx>::new(16, 32, 4, 2, 0.2, &dev);
        let (n, len) = (3, 5);
        let x: Vec<f32> = (0..n * len * 16)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let pad: Vec<bool> = (0..n * len).map(|i| i % len >= len - i / len).collect();
        // A weighted sum, so every output position gets its own gradient.
        let weights: Vec<f32> = (0..n * len * 16).map(|i| (i % 7) as f32 - 3.0).collect();
        let run = |generic: bool| {
            GENERIC.set(generic);
            OWN_STREAM.set(Some(7));
            let x = Tensor::<Fx, 3>::from_data(TensorData::new(x.clone(), [n, len, 16]), &dev)
                .require_grad();
            let pad =
                Tensor::<Fx, 2, Bool>::from_data(TensorData::new(pad.clone(), [n, len]), &dev);
            let w =
                Tensor::<Fx, 3>::from_data(TensorData::new(weights.clone(), [n, len, 16]), &dev);
            let y = encoder.forward(x.clone(), pad);
            let grads = (y.clone() * w).sum().backward();
            GENERIC.set(false);
            OWN_STREAM.set(None);
            let layer = &encoder.layers[0];
            let grad = |p: &burn::module::Param<Tensor<Fx, 2>>| p.grad(&grads).unwrap().into_data();
            [
                y.into_data(),
                x.grad(&grads).unwrap().into_data(),
                grad(&layer.query.weight),
                grad(&layer.value.weight),
                grad(&layer.ff_in.weight),
            ]
        };
        let (fast, generic) = (run(false), run(true));
        for (what, (a, b)) in ["output", "input gradient", "query", "value", "ff_in"]
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
                "{what}: max |Δ| = {diff}, largest {scale}"
            );
        }
    }
}
