//! The exact GELU, `x·Φ(x)`, in one kernel, and its derivative `Φ(x) + x·φ(x)` in another.
//! Burn's GELU takes 5 operations forward and 16 backward, and its backward step is
//! the derivative of the tanh approximation, not of the exact GELU its forward pass computes;
//! this one is exact, as PyTorch's and clue's Flex kernel are.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, unary};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use super::{OnCube, all_f32, dispatch, downcast, elementwise, empty_like, record, upcast};

/// 1/√2 and 1/√(2π).
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[cube(launch_unchecked)]
fn gelu_forward(x: &Array<f32>, out: &mut Array<f32>) {
    let i = ABSOLUTE_POS;
    if i < x.len() {
        let v = x[i];
        out[i] = v * (0.5 * (1.0 + Erf::erf(v * FRAC_1_SQRT_2)));
    }
}

#[cube(launch_unchecked)]
fn gelu_backward(x: &Array<f32>, grad: &Array<f32>, out: &mut Array<f32>) {
    let i = ABSOLUTE_POS;
    if i < x.len() {
        let v = x[i];
        let cdf = 0.5 * (1.0 + Erf::erf(v * FRAC_1_SQRT_2));
        let pdf = Exp::exp(-0.5 * v * v) * FRAC_1_SQRT_2PI;
        out[i] = grad[i] * (cdf + v * pdf);
    }
}

/// `x·Φ(x)` with Φ the standard normal CDF, on wgpu or CUDA (plain, or under `Autodiff` with
/// its own backward step); `Err(x)`, the input back, anywhere else.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !all_f32(&[x.dtype()]) {
        return Err(x);
    }
    dispatch::<B, _>(Gelu(x), true).map_err(|Gelu(x)| x)
}

struct Gelu<B: Backend, const D: usize>(Tensor<B, D>);

impl<B: Backend, const D: usize> OnCube for Gelu<B, D> {
    type Output = Tensor<B, D>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, D> {
        match tracked {
            false => upcast(run_forward(downcast::<CubeTensor<R>, B, D>(self.0))),
            true => upcast(record::<R, BT, _, 1>(
                GeluStep,
                [downcast(self.0)],
                |[x]| (run_forward(x.clone()), x),
            )),
        }
    }
}

fn run_forward<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let out = empty_like(&x);
    let (count, dim) = elementwise(&x.client, x.meta.shape().num_elements());
    // SAFETY: both arrays are contiguous f32 buffers of the same length; the kernel touches
    // index `i` only below it.
    unsafe {
        gelu_forward::launch_unchecked::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_array_arg(),
            out.clone().into_array_arg(),
        );
    }
    out
}

fn run_backward<R: CubeRuntime>(x: CubeTensor<R>, grad: CubeTensor<R>) -> CubeTensor<R> {
    let (x, grad) = (into_contiguous(x), into_contiguous(grad));
    let out = empty_like(&x);
    let (count, dim) = elementwise(&x.client, x.meta.shape().num_elements());
    // SAFETY: as in `run_forward`, for three arrays.
    unsafe {
        gelu_backward::launch_unchecked::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_array_arg(),
            grad.into_array_arg(),
            out.clone().into_array_arg(),
        );
    }
    out
}

/// The backward step of [`gelu`] under `Autodiff`: keeps the input.
#[derive(Debug)]
struct GeluStep;

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 1> for GeluStep {
    type State = CubeTensor<R>;

    fn backward(self, ops: Ops<CubeTensor<R>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<CubeBackend<R, f32, i32, BT>, _>(ops.parents, ops.node, grads, |grad| {
            run_backward(x, grad)
        });
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Flex, Wgpu};
    use burn::tensor::TensorData;
    use burn::tensor::activation;
    use burn::tensor::backend::AutodiffBackend;

    use super::*;
    use crate::model::flex;
    use crate::testing::max_diff;

    /// Inputs from −7.5 to 7.5, and the weights of a loss `Σ wᵢ·gelu(xᵢ)`.
    fn inputs() -> (Vec<f32>, Vec<f32>) {
        let x = (0..601)
            .map(|i| (i as f32 - 300.0) / 40.0)
            .collect::<Vec<_>>();
        let w = (0..601).map(|i| (i as f32 * 0.37).cos()).collect();
        (x, w)
    }

    /// A GELU of clue's own: the output, or the input back.
    type Gelu<B> = fn(Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>>;

    /// GELU of the inputs by `gelu` (clue's kernel for `B`), and the loss's gradient.
    fn gelu_and_gradient<B: AutodiffBackend>(
        gelu: Gelu<B>,
        dev: &B::Device,
    ) -> (Vec<f32>, Vec<f32>) {
        let (x, w) = inputs();
        let n = x.len();
        let x = Tensor::<B, 2>::from_data(TensorData::new(x, [1, n]), dev).require_grad();
        let w = Tensor::<B, 2>::from_data(TensorData::new(w, [1, n]), dev);
        let y = gelu(x.clone()).expect("a backend with clue's GELU");
        let grads = (y.clone() * w).sum().backward();
        let g = x.grad(&grads).expect("x is tracked");
        (
            y.into_data().to_vec().unwrap(),
            g.into_data().to_vec().unwrap(),
        )
    }

    /// On wgpu the kernels run (plain and under autodiff), their GELU is Burn's, and GELU and
    /// its gradient are those of clue's Flex kernel (the exact derivative).
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn gelu_and_its_gradient_match_flex_on_wgpu() {
        let dev = Default::default();
        let (x, _) = inputs();
        let n = x.len();
        let x = Tensor::<Wgpu, 2>::from_data(TensorData::new(x, [1, n]), &dev);
        let ours = gelu(x.clone()).expect("wgpu's f32 tensors take the kernel");
        let burns = activation::gelu(x);
        let (ours, burns) = (
            ours.into_data().to_vec().unwrap(),
            burns.into_data().to_vec().unwrap(),
        );
        assert!(
            max_diff(&ours, &burns) <= 1e-5,
            "{}",
            max_diff(&ours, &burns)
        );
        let tracked = Tensor::<Autodiff<Wgpu>, 1>::zeros([4], &dev);
        assert!(gelu(tracked).is_ok(), "autodiff tensors take it too");

        let (y_gpu, g_gpu) = gelu_and_gradient::<Autodiff<Wgpu>>(super::gelu, &dev);
        let (y_cpu, g_cpu) = gelu_and_gradient::<Autodiff<Flex>>(flex::gelu, &Default::default());
        assert!(
            max_diff(&y_gpu, &y_cpu) <= 1e-5,
            "gelu {}",
            max_diff(&y_gpu, &y_cpu)
        );
        assert!(
            max_diff(&g_gpu, &g_cpu) <= 1e-5,
            "gradient {}",
            max_diff(&g_gpu, &g_cpu)
        );
    }
}
