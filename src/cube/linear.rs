//! A linear layer `x·W + b` with its bias in a kernel of clue's own: Burn's matrix products
//! forward and backward, the bias added in place to the product (Burn: a broadcast sum, a
//! kernel of its own for each shape), and the bias's gradient by the column sums of the
//! clipping's kernel (Burn: a reduction per shape).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::ModuleOps;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use super::clip::column_sums;
use super::{OnCube, Tracked, all_f32, dispatch, downcast, elementwise, owned, record, upcast};

/// `x[i] += bias[i % d]`.
#[cube(launch_unchecked)]
fn add_bias(x: &mut Array<f32>, bias: &Array<f32>, d: usize) {
    let i = ABSOLUTE_POS;
    if i < x.len() {
        x[i] += bias[i % d];
    }
}

/// `x·W + b` (`x`: `[rows, d_in]`, `W`: `[d_in, d_out]`, `b`: `[d_out]`) on wgpu or CUDA, plain
/// or under `Autodiff`; `Err(x)`, the input back, anywhere else.
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Tensor<B, 1>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    assert_eq!(
        bias.dims()[0],
        weight.dims()[1],
        "linear: a bias of {} for {} outputs",
        bias.dims()[0],
        weight.dims()[1]
    );
    if !all_f32(&[x.dtype(), weight.dtype(), bias.dtype()]) {
        return Err(x);
    }
    dispatch::<B, _>(Linear(x, weight, bias), true).map_err(|Linear(x, _, _)| x)
}

struct Linear<B: Backend>(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1>);

impl<B: Backend> OnCube for Linear<B> {
    type Output = Tensor<B, 2>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, 2> {
        let Linear(x, weight, bias) = self;
        if !tracked {
            let (x, w, b) = (downcast(x), downcast(weight), downcast(bias));
            return upcast(run_forward::<R, BT>(x, w, b));
        }
        let inputs: [Tracked<R, BT>; 3] = [downcast(x), downcast(weight), downcast(bias)];
        upcast(record::<R, BT, _, 3>(LinearStep, inputs, |[x, w, b]| {
            (run_forward::<R, BT>(x.clone(), w.clone(), b), (x, w))
        }))
    }
}

type C<R, BT> = CubeBackend<R, f32, i32, BT>;

fn run_forward<R: CubeRuntime, BT: BoolElement>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    bias: CubeTensor<R>,
) -> CubeTensor<R> {
    let out = owned(C::<R, BT>::linear(x, weight, None));
    let d = bias.meta.shape().num_elements();
    let bias = burn_cubecl::kernel::into_contiguous(bias);
    let (count, dim) = elementwise(&out.client, out.meta.shape().num_elements());
    // SAFETY: `out` is contiguous f32 in a buffer nothing else holds, its rows `d` long; `bias`
    // is `d` contiguous values; the kernel touches `out[i]` only below its length.
    unsafe {
        add_bias::launch_unchecked::<R>(
            &out.client.clone(),
            count,
            dim,
            out.clone().into_array_arg(),
            bias.into_array_arg(),
            d,
        );
    }
    out
}

/// The backward step of [`linear`] under `Autodiff`: keeps the input and the weight.
#[derive(Debug)]
struct LinearStep;

impl<R: CubeRuntime, BT: BoolElement> Backward<C<R, BT>, 3> for LinearStep {
    type State = (CubeTensor<R>, CubeTensor<R>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, w_node, b_node] = ops.parents;
        let grad = grads.consume::<C<R, BT>>(&ops.node);
        let (x, weight) = ops.state;
        let d = weight.meta.shape().dims::<2>()[1];
        if let Some(node) = x_node {
            let dx = C::<R, BT>::linear_x_backward(weight, grad.clone());
            grads.register::<C<R, BT>>(node.id, dx);
        }
        if let Some(node) = w_node {
            let dw = C::<R, BT>::linear_weight_backward(x, grad.clone());
            grads.register::<C<R, BT>>(node.id, dw);
        }
        if let Some(node) = b_node {
            grads.register::<C<R, BT>>(node.id, column_sums(grad, d));
        }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::TensorData;

    use super::*;
    use crate::testing::max_diff;

    type A = Autodiff<Wgpu>;

    /// The output of a `[rows, 3] → [rows, 5]` layer and the gradients of `Σ w·y` with respect
    /// to the input, the weight and the bias, by clue's kernel (`ours`) or Burn's `linear`.
    fn output_and_gradients(rows: usize, ours: bool) -> [Vec<f32>; 4] {
        let dev = Default::default();
        let values = |n: usize, k: f32| (0..n).map(move |i| (i as f32 * k).sin()).collect();
        // A transposed input: the kernel takes any layout.
        let x = Tensor::<A, 2>::from_data(TensorData::new(values(rows * 3, 0.7), [3, rows]), &dev)
            .require_grad();
        let w = Tensor::<A, 2>::from_data(TensorData::new(values(15, 1.3), [3, 5]), &dev)
            .require_grad();
        let b =
            Tensor::<A, 1>::from_data(TensorData::new(values(5, 2.1), [5]), &dev).require_grad();
        let input = x.clone().transpose();
        let y = match ours {
            true => linear(input, w.clone(), b.clone()).expect("wgpu's"),
            false => burn::tensor::module::linear(input, w.clone(), Some(b.clone())),
        };
        let weights =
            Tensor::<A, 2>::from_data(TensorData::new(values(rows * 5, 0.3), [rows, 5]), &dev);
        let grads = (y.clone() * weights).sum().backward();
        let gradient = |t: Option<Tensor<Wgpu, 2>>| t.expect("tracked").into_data();
        [
            y.into_data(),
            gradient(x.grad(&grads)),
            gradient(w.grad(&grads)),
            b.grad(&grads).expect("tracked").into_data(),
        ]
        .map(|d| d.to_vec().unwrap())
    }

    /// On wgpu: a layer's output by hand, plain; and under autodiff the output and the three
    /// gradients are Burn's, for a few rows and for many (the bias's column sums in two passes).
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn linear_and_its_gradients_match_burns_on_wgpu() {
        let dev = Default::default();
        let x = Tensor::<Wgpu, 2>::from_floats([[1.0, 2.0], [0.0, -1.0]], &dev);
        let w = Tensor::<Wgpu, 2>::from_floats([[1.0, 0.5, 0.0], [2.0, 0.0, 1.0]], &dev);
        let b = Tensor::<Wgpu, 1>::from_floats([0.25, -1.0, 3.0], &dev);
        let y = linear(x, w, b)
            .expect("wgpu's")
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(y, [5.25, -0.5, 5.0, -1.75, -1.0, 2.0]);

        for rows in [4, 300] {
            let ours = output_and_gradients(rows, true);
            let burns = output_and_gradients(rows, false);
            for (what, (a, b)) in ["output", "x", "W", "b"]
                .iter()
                .zip(ours.iter().zip(&burns))
            {
                let largest = b.iter().fold(1f32, |m, v| m.max(v.abs()));
                let diff = max_diff(a, b);
                assert!(
                    diff <= 1e-5 * largest,
                    "{rows} rows, {what}: {diff} of {largest}"
                );
            }
        }
    }
}
