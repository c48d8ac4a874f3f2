//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_`: every gradient is scaled
//! by min(1, max_norm / ‖g‖) where ‖g‖ is the norm over all parameters together. (Burn's
//! `GradientClippingConfig::Norm` clips each parameter tensor on its own.) On wgpu and CUDA (f32,
//! the default build) the arithmetic runs in kernels of clue's own (`crate::cube::clip`), the
//! same kernels for every parameter's rank and size.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq = sum_of_squares(g);
            self.total = Some(match self.total.take() {
                Some(t) => t + sq,
                None => sq,
            });
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: Tensor<B::InnerBackend, 1>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let id: ParamId = param.id;
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(id) {
            self.grads
                .register::<B::InnerBackend, D>(id, scaled(g, &self.factor));
        }
    }
}

/// `Σ g²`: `[1]`.
fn sum_of_squares<B: Backend, const D: usize>(g: Tensor<B, D>) -> Tensor<B, 1> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let g = match crate::cube::sum_of_squares(g) {
        Ok(sum) => return sum,
        Err(g) => g,
    };
    g.square().sum()
}

/// `g · factor` (`factor`: `[1]`).
fn scaled<B: Backend, const D: usize>(g: Tensor<B, D>, factor: &Tensor<B, 1>) -> Tensor<B, D> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let g = match crate::cube::scale(g, factor) {
        Ok(y) => return y,
        Err(g) => g,
    };
    let factor = factor.clone().cast(g.dtype()).reshape([1; D]);
    g * factor
}

/// The sum of the squares of all gradients of `module`'s parameters: `[1]`.
fn squared_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Option<Tensor<B::InnerBackend, 1>> {
    let mut v = SquaredNorm::<B> { grads, total: None };
    module.visit(&mut v);
    v.total
}

/// The norm `√total` and the clipping factor `min(1, max_norm / norm)`.
fn norm_and_factor<B: Backend>(total: Tensor<B, 1>, max_norm: f64) -> (Tensor<B, 1>, Tensor<B, 1>) {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let total = match crate::cube::norm_and_clip_factor(total, max_norm) {
        Ok(both) => return both,
        Err(total) => total,
    };
    let norm = total.sqrt();
    let factor = (norm.clone().clamp_min(1e-12).recip() * max_norm).clamp_max(1.0);
    (norm, factor)
}

/// Scale all gradients so their global norm is at most `max_norm`; returns the norm before
/// clipping (`[1]`, stays on the device: no host sync).
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> Option<Tensor<B::InnerBackend, 1>> {
    let (norm, factor) = norm_and_factor(squared_norm(module, grads)?, max_norm);
    let mut v = Scale::<B> { grads, factor };
    module.visit(&mut v);
    Some(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};

    /// The global norm of the gradients of `model`'s parameters.
    fn global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
        model: &M,
        grads: &GradientsParams,
    ) -> f32 {
        squared_norm(model, grads)
            .unwrap()
            .sqrt()
            .into_scalar()
            .elem()
    }

    fn gradient<B: AutodiffBackend, const D: usize>(
        grads: &GradientsParams,
        id: ParamId,
    ) -> Vec<f32> {
        let g = grads.get::<B::InnerBackend, D>(id).unwrap();
        g.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn scales_the_global_norm_not_each_tensor<B: AutodiffBackend>() {
        let dev = Default::default();
        let model: Linear<B> = LinearConfig::new(2, 1).init(&dev);
        let mut grads = GradientsParams::new();
        // Weight grad [[3],[0]] and bias grad [4]: global norm 5, per-tensor norms 3 and 4.
        let weight = Tensor::from_floats([[3.0f32], [0.0]], &dev);
        grads.register::<B::InnerBackend, 2>(model.weight.id, weight);
        let bias_id = model.bias.as_ref().unwrap().id;
        grads.register::<B::InnerBackend, 1>(bias_id, Tensor::from_floats([4.0f32], &dev));
        let norm: f32 = clip_global_norm(&model, &mut grads, 0.01)
            .unwrap()
            .into_scalar()
            .elem();
        assert!((norm - 5.0).abs() < 1e-6);
        let w = gradient::<B, 2>(&grads, model.weight.id);
        let b = gradient::<B, 1>(&grads, bias_id);
        assert!((w[0] - 0.006).abs() < 1e-7 && w[1].abs() < 1e-9, "{w:?}");
        assert!((b[0] - 0.008).abs() < 1e-7, "{b:?}");
        assert!((global_norm(&model, &grads) - 0.01).abs() < 1e-7);
    }

    fn leaves_small_gradients_alone<B: AutodiffBackend>() {
        let dev = Default::default();
        let model: Linear<B> = LinearConfig::new(1, 1).with_bias(false).init(&dev);
        let mut grads = GradientsParams::new();
        let weight = Tensor::from_floats([[0.003f32]], &dev);
        grads.register::<B::InnerBackend, 2>(model.weight.id, weight);
        clip_global_norm(&model, &mut grads, 0.01);
        let w = gradient::<B, 2>(&grads, model.weight.id);
        assert!((w[0] - 0.003).abs() < 1e-9);
    }

    #[test]
    fn clipping_scales_the_global_norm_not_each_tensor() {
        scales_the_global_norm_not_each_tensor::<Autodiff<NdArray>>();
    }

    #[test]
    fn small_gradients_are_left_alone() {
        leaves_small_gradients_alone::<Autodiff<NdArray>>();
    }

    /// The same on wgpu, where clue's kernels compute the norm, the factor and the products.
    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn clipping_takes_clues_kernels_on_wgpu() {
        use burn::backend::Wgpu;
        type A = Autodiff<Wgpu>;
        let g = Tensor::<Wgpu, 2>::ones([2, 3], &Default::default());
        assert!(
            crate::cube::sum_of_squares(g).is_ok(),
            "the gradients' kernels apply"
        );
        scales_the_global_norm_not_each_tensor::<A>();
        leaves_small_gradients_alone::<A>();
    }
}
