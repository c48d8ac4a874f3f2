//! Seeded parameter initialisation: every weight of a model drawn from the model's own random
//! stream instead of the backend's one process-wide generator, so a seed gives the same model
//! whatever else the process draws meanwhile (tests in parallel threads, several models in one
//! `clue eval`). The distributions are Burn's defaults: a linear layer's weight and bias
//! `U(−k, k)` with `k = 1/√d_input`, an embedding table `N(0, 1)`, layer norms ones and zeros.
//! Parameter ids come from a second stream of the same seed (Burn draws them at random and writes
//! them into the weights file), so identical weights give a byte-identical `model.mpk`.

use burn::module::{Param, ParamId};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// The random stream of one model's parameters, on `device`.
pub struct Init<'a, B: Backend> {
    rng: ChaCha8Rng,
    ids: ChaCha8Rng,
    pub device: &'a B::Device,
}

impl<'a, B: Backend> Init<'a, B> {
    pub fn new(seed: u64, device: &'a B::Device) -> Self {
        let mut ids = ChaCha8Rng::seed_from_u64(seed);
        ids.set_stream(1);
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            ids,
            device,
        }
    }

    /// A trainable parameter holding `value`, with the next id of the stream.
    pub fn param<const D: usize>(&mut self, value: Tensor<B, D>) -> Param<Tensor<B, D>> {
        Param::initialized(ParamId::from(self.ids.next_u64()), value.require_grad())
    }

    fn tensor<const D: usize>(
        &mut self,
        values: Vec<f32>,
        shape: [usize; D],
    ) -> Param<Tensor<B, D>> {
        let value = Tensor::from_data(TensorData::new(values, shape), self.device);
        self.param(value)
    }

    fn uniform<const D: usize>(&mut self, shape: [usize; D], k: f32) -> Param<Tensor<B, D>> {
        let n = shape.iter().product();
        let values = (0..n).map(|_| self.rng.random_range(-k..=k)).collect();
        self.tensor(values, shape)
    }

    /// `[d_input, d_output]` weight and a bias, as `LinearConfig::new(d_input, d_output)`.
    pub fn linear(&mut self, d_input: usize, d_output: usize) -> Linear<B> {
        let mut layer = self.linear_no_bias(d_input, d_output);
        let k = (d_input.max(1) as f32).sqrt().recip();
        layer.bias = Some(self.uniform([d_output], k));
        layer
    }

    /// A linear layer without bias.
    pub fn linear_no_bias(&mut self, d_input: usize, d_output: usize) -> Linear<B> {
        let k = (d_input.max(1) as f32).sqrt().recip();
        Linear {
            weight: self.uniform([d_input, d_output], k),
            bias: None,
        }
    }

    /// An `[n, d]` table drawn from `N(0, 1)`.
    pub fn embedding(&mut self, n: usize, d: usize) -> Embedding<B> {
        let values = (0..n * d)
            .map(|_| self.rng.sample::<f32, _>(StandardNormal))
            .collect();
        Embedding {
            weight: self.tensor(values, [n, d]),
        }
    }

    /// A layer norm over `d` features (nothing random: γ = 1, β = 0).
    pub fn layer_norm(&mut self, d: usize) -> LayerNorm<B> {
        let mut norm = LayerNormConfig::new(d)
            .with_epsilon(crate::model::flex::LAYER_NORM_EPSILON)
            .init(self.device);
        norm.gamma = self.param(norm.gamma.val());
        norm.beta = norm.beta.map(|beta| self.param(beta.val()));
        norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    fn values(t: Tensor<NdArray, 2>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn a_seed_gives_the_same_weights_whatever_the_global_generator_does() {
        let dev = Default::default();
        let draw = |seed, global| {
            <NdArray as Backend>::seed(&dev, global);
            let _ = Tensor::<NdArray, 1>::random([7], burn::tensor::Distribution::Default, &dev);
            let mut init = Init::<NdArray>::new(seed, &dev);
            (init.linear(8, 3), init.embedding(5, 4))
        };
        let (a, b, c) = (draw(1, 10), draw(1, 99), draw(2, 10));
        assert_eq!(values(a.0.weight.val()), values(b.0.weight.val()));
        assert_eq!(values(a.1.weight.val()), values(b.1.weight.val()));
        assert_ne!(values(a.0.weight.val()), values(c.0.weight.val()));
        // Parameter ids too (Burn writes them into the weights file), all distinct.
        assert_eq!(a.0.weight.id, b.0.weight.id);
        assert_eq!(a.1.weight.id, b.1.weight.id);
        assert_ne!(a.0.weight.id, c.0.weight.id);
        let bias = a.0.bias.as_ref().unwrap();
        assert!(a.0.weight.id != bias.id && bias.id != a.1.weight.id);
    }

    #[test]
    fn weights_follow_burns_default_distributions() {
        let dev = Default::default();
        let mut init = Init::<NdArray>::new(0, &dev);
        let layer = init.linear(64, 200);
        let k = 1.0 / 8.0;
        let w = values(layer.weight.val());
        assert_eq!(layer.weight.val().dims(), [64, 200]);
        assert!(w.iter().all(|x| x.abs() <= k));
        // U(−k, k) has variance k²/3.
        let var = w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32;
        assert!((var / (k * k / 3.0) - 1.0).abs() < 0.05, "variance {var}");
        let bias: Vec<f32> = layer.bias.unwrap().val().into_data().to_vec().unwrap();
        assert_eq!(bias.len(), 200);
        assert!(bias.iter().all(|x| x.abs() <= k) && bias.iter().any(|x| *x != 0.0));
        let e = values(init.embedding(100, 100).weight.val());
        let mean = e.iter().sum::<f32>() / e.len() as f32;
        let var = e.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / e.len() as f32;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "N(0,1)? {mean} {var}"
        );
        assert!(init.linear_no_bias(4, 4).bias.is_none());
    }
}
