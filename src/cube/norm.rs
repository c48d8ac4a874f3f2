//! A layer norm, `(x − mean) / √(var + ε) · γ + β` over each row, in one kernel, and its
//! backward step in one more (γ's and β's gradients by the column sums of the clipping's
//! kernel). Burn's layer norm takes 9 operations forward, and about 20 backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use super::clip::column_sums;
use super::{OnCube, Tracked, all_f32, dispatch, downcast, empty_like, per_row, record, upcast};

/// The mean of the `d` values of `x` from `at`.
#[cube]
fn row_mean(x: &Array<f32>, at: usize, d: usize) -> f32 {
    let mut sum = 0.0;
    for j in 0..d {
        sum += x[at + j];
    }
    sum / f32::cast_from(d)
}

/// `√(var + ε)` of the `d` values of `x` from `at` (biased variance about `mean`).
#[cube]
fn row_deviation(x: &Array<f32>, at: usize, d: usize, mean: f32, epsilon: f32) -> f32 {
    let mut sum = 0.0;
    for j in 0..d {
        let c = x[at + j] - mean;
        sum += c * c;
    }
    (sum / f32::cast_from(d) + epsilon).sqrt()
}

/// One row per unit, in Burn's order of operations.
#[cube(launch_unchecked)]
fn norm_forward(
    x: &Array<f32>,
    gamma: &Array<f32>,
    beta: &Array<f32>,
    out: &mut Array<f32>,
    d: usize,
    epsilon: f32,
) {
    let row = ABSOLUTE_POS;
    if row * d < x.len() {
        let at = row * d;
        let mean = row_mean(x, at, d);
        let deviation = row_deviation(x, at, d, mean, epsilon);
        for j in 0..d {
            out[at + j] = (x[at + j] - mean) / deviation * gamma[j] + beta[j];
        }
    }
}

/// One row per unit, from the input `x` and the output's gradient `g`: the input's gradient
/// `(ĝ − mean ĝ − x̂ · mean(ĝ·x̂)) / √(var + ε)` with `ĝ = g·γ` and `x̂` the normalised input,
/// and `g·x̂` (γ's gradient before its sum over the rows).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    x: &Array<f32>,
    gamma: &Array<f32>,
    grad: &Array<f32>,
    grad_x: &mut Array<f32>,
    grad_times_normed: &mut Array<f32>,
    d: usize,
    epsilon: f32,
) {
    let row = ABSOLUTE_POS;
    if row * d < x.len() {
        let at = row * d;
        let mean = row_mean(x, at, d);
        let deviation = row_deviation(x, at, d, mean, epsilon);
        let mut sum = 0.0;
        let mut sum_normed = 0.0;
        for j in 0..d {
            let g = grad[at + j] * gamma[j];
            sum += g;
            sum_normed += g * ((x[at + j] - mean) / deviation);
        }
        let n = f32::cast_from(d);
        let (mean_g, mean_normed) = (sum / n, sum_normed / n);
        for j in 0..d {
            let normed = (x[at + j] - mean) / deviation;
            let g = grad[at + j] * gamma[j];
            grad_x[at + j] = (g - mean_g - normed * mean_normed) / deviation;
            grad_times_normed[at + j] = grad[at + j] * normed;
        }
    }
}

/// A layer norm over the last axis of `x` with scale `gamma` and shift `beta` (`[d]` each),
/// on wgpu or CUDA (plain, or under `Autodiff` with its own backward step); `Err(x)`, the input
/// back, anywhere else.
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !all_f32(&[x.dtype(), gamma.dtype(), beta.dtype()]) {
        return Err(x);
    }
    assert_eq!(x.dims()[D - 1], gamma.dims()[0], "layer norm: d");
    let task = Norm {
        x,
        gamma,
        beta,
        epsilon: epsilon as f32,
    };
    dispatch::<B, _>(task, true).map_err(|task| task.x)
}

struct Norm<B: Backend, const D: usize> {
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f32,
}

impl<B: Backend, const D: usize> OnCube for Norm<B, D> {
    type Output = Tensor<B, D>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, D> {
        let Self {
            x,
            gamma,
            beta,
            epsilon,
        } = self;
        if !tracked {
            let (x, gamma, beta) = (downcast(x), downcast(gamma), downcast(beta));
            return upcast(run_forward::<R>(x, gamma, beta, epsilon));
        }
        let inputs: [Tracked<R, BT>; 3] = [downcast(x), downcast(gamma), downcast(beta)];
        upcast(record::<R, BT, _, 3>(
            NormStep(epsilon),
            inputs,
            |[x, gamma, beta]| {
                let (x, gamma) = (into_contiguous(x), into_contiguous(gamma));
                let out = run_forward(x.clone(), gamma.clone(), beta, epsilon);
                (out, (x, gamma))
            },
        ))
    }
}

fn run_forward<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    beta: CubeTensor<R>,
    epsilon: f32,
) -> CubeTensor<R> {
    let (x, gamma, beta) = (
        into_contiguous(x),
        into_contiguous(gamma),
        into_contiguous(beta),
    );
    let out = empty_like(&x);
    let d = gamma.meta.shape().num_elements();
    let (count, dim) = per_row(&x, d);
    // SAFETY: contiguous f32 buffers: x and out of the same rows of `d`, γ and β of `d`; the
    // kernel reads and writes only within a row below the number of rows.
    unsafe {
        norm_forward::launch_unchecked::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_array_arg(),
            gamma.into_array_arg(),
            beta.into_array_arg(),
            out.clone().into_array_arg(),
            d,
            epsilon,
        );
    }
    out
}

/// The input's gradient and `g·x̂` (see [`norm_backward`]).
fn run_backward<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    grad: CubeTensor<R>,
    epsilon: f32,
) -> [CubeTensor<R>; 2] {
    let out = [empty_like(&x), empty_like(&x)];
    let d = gamma.meta.shape().num_elements();
    let (count, dim) = per_row(&x, d);
    // SAFETY: as in `run_forward` (x and γ are the forward pass's contiguous ones; the
    // gradient is made contiguous by the caller).
    unsafe {
        norm_backward::launch_unchecked::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_array_arg(),
            gamma.into_array_arg(),
            grad.into_array_arg(),
            out[0].clone().into_array_arg(),
            out[1].clone().into_array_arg(),
            d,
            epsilon,
        );
    }
    out
}

/// The backward step of [`layer_norm`] under `Autodiff`: keeps the input and γ, and recomputes
/// each row's mean and deviation.
#[derive(Debug)]
struct NormStep(f32);

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 3> for NormStep {
    type State = (CubeTensor<R>, CubeTensor<R>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        type C<R, BT> = CubeBackend<R, f32, i32, BT>;
        let [x_node, gamma_node, beta_node] = ops.parents;
        let grad = into_contiguous(grads.consume::<C<R, BT>>(&ops.node));
        let (x, gamma) = ops.state;
        let d = gamma.meta.shape().num_elements();
        let [grad_x, grad_times_normed] = run_backward(x, gamma, grad.clone(), self.0);
        if let Some(node) = x_node {
            grads.register::<C<R, BT>>(node.id, grad_x);
        }
        if let Some(node) = gamma_node {
            grads.register::<C<R, BT>>(node.id, column_sums(grad_times_normed, d));
        }
        if let Some(node) = beta_node {
            grads.register::<C<R, BT>>(node.id, column_sums(grad, d));
        }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Wgpu};
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    use burn::tensor::TensorData;
    use burn::tensor::backend::AutodiffBackend;

    use super::*;
    use crate::testing::max_diff;

    const SHAPE: [usize; 3] = [2, 3, 8];

    /// The layer norm of a `[2, 3, 8]` input and the gradients of `Σ w·norm(x)` with respect to
    /// the input, γ and β, by clue's kernels (`ours`) or Burn's `LayerNorm`.
    fn norm_and_gradients<B: AutodiffBackend>(ours: bool, dev: &B::Device) -> [Vec<f32>; 4] {
        let count = SHAPE.iter().product::<usize>();
        let values = |f: fn(f32) -> f32, n: usize| {
            TensorData::new((0..n).map(|i| f(i as f32)).collect::<Vec<_>>(), [n])
        };
        let x = Tensor::<B, 1>::from_data(values(|i| (i * 1.3).sin() * 3.0 + i * 0.05, count), dev)
            .reshape(SHAPE)
            .require_grad();
        let w = Tensor::<B, 1>::from_data(values(|i| (i * 0.77).cos(), count), dev).reshape(SHAPE);
        let mut norm = LayerNormConfig::new(8).init::<B>(dev);
        let gamma = Tensor::from_data(values(|i| 0.5 + i * 0.2, 8), dev);
        let beta = Tensor::from_data(values(|i| i * 0.1 - 0.3, 8), dev);
        norm.gamma = Param::from_tensor(gamma);
        norm.beta = Some(Param::from_tensor(beta));
        let (gamma, beta) = (norm.gamma.val(), norm.beta.as_ref().unwrap().val());
        let y = match ours {
            true => layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5).expect("wgpu's"),
            false => norm.forward(x.clone()),
        };
        let grads = (y.clone() * w).sum().backward();
        let grad = |t: Tensor<B, 1>| t.grad(&grads).expect("tracked").into_data();
        let grad_x = x.grad(&grads).expect("x is tracked").into_data();
        [y.into_data(), grad_x, grad(gamma), grad(beta)].map(|d| d.to_vec().unwrap())
    }

    /// On wgpu the kernels run (plain and under autodiff), and the layer norm and the
    /// gradients of its input, γ and β are Burn's.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn layer_norm_and_its_gradients_match_burns_on_wgpu() {
        let dev = Default::default();
        let x = Tensor::<Wgpu, 2>::from_data([[1.0, 2.0, 3.0, 6.0]], &dev);
        let (gamma, beta) = (Tensor::ones([4], &dev), Tensor::zeros([4], &dev));
        let y = layer_norm(x, gamma, beta, 0.0).expect("wgpu's f32 tensors");
        // Mean 3, variance 3.5.
        let expected = [-2.0, -1.0, 0.0, 3.0].map(|c: f32| c / 3.5f32.sqrt());
        let y = y.into_data().to_vec::<f32>().unwrap();
        assert!(max_diff(&y, &expected) <= 1e-6, "{y:?}");

        let ours = norm_and_gradients::<Autodiff<Wgpu>>(true, &dev);
        let burns = norm_and_gradients::<Autodiff<Wgpu>>(false, &dev);
        for (what, (ours, burns)) in ["norm", "x", "γ", "β"].iter().zip(ours.iter().zip(&burns)) {
            let diff = max_diff(ours, burns);
            assert!(diff <= 1e-5, "{what}: {diff}");
            assert!(ours.iter().any(|v| v.abs() > 1e-2), "{what}: not all zeros");
        }
    }
}
