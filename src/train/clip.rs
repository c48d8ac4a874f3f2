//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_`: every gradient is scaled
//! by min(1, max_norm / ‖g‖) where ‖g‖ is the norm over all parameters together. (Burn's
//! `GradientClippingConfig::Norm` clips each parameter tensor on its own.)

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
            let sq = g.square().sum();
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
            let factor = self.factor.clone().cast(g.dtype()).reshape([1; D]);
            self.grads.register::<B::InnerBackend, D>(id, g * factor);
        }
    }
}

/// Global L2 norm of all gradients of `module`'s parameters: `[1]`.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Option<Tensor<B::InnerBackend, 1>> {
    let mut v = SquaredNorm::<B> { grads, total: None };
    module.visit(&mut v);
    v.total.map(|t| t.sqrt())
}

/// Scale all gradients so their global norm is at most `max_norm`; returns the norm before
/// clipping (`[1]`, stays on the device: no host sync).
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> Option<Tensor<B::InnerBackend, 1>> {
    let norm = global_grad_norm(module, grads)?;
    let factor = (norm.clone().clamp_min(1e-12).recip() * max_norm).clamp_max(1.0);
    let mut v = Scale::<B> { grads, factor };
    module.visit(&mut v);
    Some(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};

    type A = Autodiff<NdArray>;

    #[test]
    fn clipping_scales_the_global_norm_not_each_tensor() {
        let dev = Default::default();
        let model: Linear<A> = LinearConfig::new(2, 1).init(&dev);
        let mut grads = GradientsParams::new();
        // Weight grad [[3],[0]] and bias grad [4]: global norm 5, per-tensor norms 3 and 4.
        grads.register::<NdArray, 2>(
            model.weight.id,
            Tensor::from_floats([[3.0f32], [0.0]], &dev),
        );
        let bias_id = model.bias.as_ref().unwrap().id;
        grads.register::<NdArray, 1>(bias_id, Tensor::from_floats([4.0f32], &dev));
        let norm = clip_global_norm(&model, &mut grads, 0.01)
            .unwrap()
            .into_scalar();
        assert!((norm - 5.0).abs() < 1e-6);
        let w: Vec<f32> = grads
            .get::<NdArray, 2>(model.weight.id)
            .unwrap()
            .to_data()
            .to_vec()
            .unwrap();
        let b: Vec<f32> = grads
            .get::<NdArray, 1>(bias_id)
            .unwrap()
            .to_data()
            .to_vec()
            .unwrap();
        assert!((w[0] - 0.006).abs() < 1e-7 && w[1].abs() < 1e-9, "{w:?}");
        assert!((b[0] - 0.008).abs() < 1e-7, "{b:?}");
        let after = global_grad_norm(&model, &grads).unwrap().into_scalar();
        assert!((after - 0.01).abs() < 1e-7);
    }

    #[test]
    fn small_gradients_are_left_alone() {
        let dev = Default::default();
        let model: Linear<A> = LinearConfig::new(1, 1).with_bias(false).init(&dev);
        let mut grads = GradientsParams::new();
        grads.register::<NdArray, 2>(model.weight.id, Tensor::from_floats([[0.003f32]], &dev));
        clip_global_norm(&model, &mut grads, 0.01);
        let w: f32 = grads
            .get::<NdArray, 2>(model.weight.id)
            .unwrap()
            .into_scalar();
        assert!((w - 0.003).abs() < 1e-9);
    }
}
