//! AdamW, with the whole update of a parameter in one kernel of clue's own on the GPU backends.
//!
//! Burn's AdamW updates a parameter in 15 element-wise operations (the two moments, their bias
//! corrections, the square root, the decay), each a kernel that a GPU run compiles before its
//! first step and launches for every parameter tensor at every step. On wgpu and CUDA (f32
//! tensors, without Burn's fusion) [`ClueAdamW`] reads the weight, the gradient and the two
//! moments once and writes the three new tensors in one kernel (`crate::cube::adamw`). Every
//! other backend, float type or state takes Burn's AdamW. Both keep Burn's state
//! ([`AdamWState`]), so a checkpoint written by one loads into the other.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, AdamWState, LearningRate, SimpleOptimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// AdamW as Burn computes it, fused into one kernel per parameter on the GPU backends.
#[derive(Clone)]
pub struct ClueAdamW {
    burn: AdamW,
    /// The constants again, for the GPU kernel.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    hyper: crate::cube::adamw::Hyper,
}

impl ClueAdamW {
    /// AdamW with the two moments' decay rates, epsilon and the decoupled weight decay.
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let burn = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        Self {
            burn,
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            hyper: crate::cube::adamw::Hyper {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
            },
        }
    }

    /// The optimizer of a module's parameters (the learning rate is given at each step).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }
}

impl<B: Backend> SimpleOptimizer<B> for ClueAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        let (tensor, grad, state) =
            match crate::cube::adamw::step(self.hyper, lr, tensor, grad, state) {
                Ok((tensor, state)) => return (tensor, Some(state)),
                Err(unfused) => unfused,
            };
        self.burn.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// A deterministic `[rows, cols]` tensor of varied signs and magnitudes.
    fn varied<B: Backend>(rows: usize, cols: usize, seed: f32, dev: &B::Device) -> Tensor<B, 2> {
        let values = (0..rows * cols)
            .map(|i| (seed * (i as f32 + 1.0)).sin() * (1.0 + i as f32 % 3.0))
            .collect::<Vec<_>>();
        Tensor::from_data(TensorData::new(values, [rows, cols]), dev)
    }

    fn max_diff<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
        (a - b).abs().max().into_scalar().elem()
    }

    /// Steps of clue's AdamW and Burn's on the same weights and gradients (the second step's
    /// gradient a transposed, non-contiguous view): the largest difference in the weights and
    /// in the two moments, and the two states' step counts.
    fn against_burn<B: Backend>(dev: &B::Device) -> ([f32; 3], usize, usize) {
        let clue = ClueAdamW::new(0.9, 0.98, 1e-6, 0.1);
        let burn = clue.burn.clone();
        let (mut w_clue, mut w_burn) = (varied::<B>(4, 6, 0.7, dev), varied::<B>(4, 6, 0.7, dev));
        let (mut s_clue, mut s_burn) = (None, None);
        for step in 0..3 {
            let g = match step {
                1 => varied::<B>(6, 4, 1.3, dev).transpose(),
                _ => varied::<B>(4, 6, 0.3 + step as f32, dev),
            };
            let lr = 0.05 / (step + 1) as f64;
            (w_clue, s_clue) = SimpleOptimizer::<B>::step(&clue, lr, w_clue, g.clone(), s_clue);
            (w_burn, s_burn) = burn.step(lr, w_burn, g, s_burn);
        }
        let (a, b) = (s_clue.unwrap().momentum, s_burn.unwrap().momentum);
        let diffs = [
            max_diff(w_clue, w_burn),
            max_diff(a.moment_1, b.moment_1),
            max_diff(a.moment_2, b.moment_2),
        ];
        (diffs, a.time, b.time)
    }

    /// On the CPU backends clue's AdamW is Burn's, bit for bit.
    #[test]
    fn other_backends_take_burns_adamw() {
        let (diffs, clue_time, burn_time) =
            against_burn::<burn::backend::NdArray>(&Default::default());
        assert_eq!(diffs, [0.0; 3]);
        assert_eq!((clue_time, burn_time), (3, 3));
    }

    /// On wgpu the fused kernel runs (Burn's fallback would not count as fused) and gives
    /// Burn's weights and moments within float rounding.
    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn the_fused_update_matches_burns_adamw_on_wgpu() {
        type W = burn::backend::Wgpu;
        let dev = Default::default();
        let w = varied::<W>(2, 3, 0.5, &dev);
        let g = varied::<W>(2, 3, 0.9, &dev);
        let fused =
            crate::cube::adamw::step(ClueAdamW::new(0.9, 0.98, 1e-6, 0.1).hyper, 0.01, w, g, None);
        assert!(fused.is_ok(), "wgpu's f32 tensors take the fused kernel");
        let (diffs, clue_time, burn_time) = against_burn::<W>(&dev);
        assert!(diffs.iter().all(|d| *d <= 1e-6), "weights, m, v: {diffs:?}");
        assert_eq!((clue_time, burn_time), (3, 3));
    }
}
