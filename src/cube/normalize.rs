//! The L2 normalisation of the contrastive loss's projected embeddings, in one kernel forward
//! and one backward (Burn: 5 operations forward, about 12 backward).

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

/// `Σ x²` over the `d` values of `x` from `at`.
#[cube]
fn squared_norm(x: &Array<f32>, at: usize, d: usize) -> f32 {
    let mut sum = 0.0;
    for j in 0..d {
        sum += x[at + j] * x[at + j];
    }
    sum
}

/// One row per unit: `x / √max(Σ x², floor)`.
#[cube(launch_unchecked)]
fn normalize_forward(x: &Array<f32>, out: &mut Array<f32>, d: usize, floor: f32) {
    let row = ABSOLUTE_POS;
    if row * d < x.len() {
        let at = row * d;
        let norm = max(squared_norm(x, at, d), floor).sqrt();
        for j in 0..d {
            out[at + j] = x[at + j] / norm;
        }
    }
}

/// One row per unit: `g / ‖x‖ − x · (g·x) / ‖x‖³`, without the second term where the floor
/// holds (the clamp's gradient).
#[cube(launch_unchecked)]
fn normalize_backward(
    x: &Array<f32>,
    grad: &Array<f32>,
    out: &mut Array<f32>,
    d: usize,
    floor: f32,
) {
    let row = ABSOLUTE_POS;
    if row * d < x.len() {
        let at = row * d;
        let squared = squared_norm(x, at, d);
        let norm = max(squared, floor).sqrt();
        let mut dot = 0.0;
        if squared >= floor {
            for j in 0..d {
                dot += grad[at + j] * x[at + j];
            }
        }
        let along = dot / (norm * norm * norm);
        for j in 0..d {
            out[at + j] = grad[at + j] / norm - x[at + j] * along;
        }
    }
}

fn run_forward<R: CubeRuntime>(x: CubeTensor<R>, floor: f32) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let [n, d] = x.meta.shape().dims::<2>();
    let out = empty_like(&x);
    let (count, dim) = elementwise(&x.client, n);
    // SAFETY: contiguous f32 buffers of `n` rows of `d`; each unit reads and writes only its
    // own row below `n`.
    unsafe {
        normalize_forward::launch_unchecked::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_array_arg(),
            out.clone().into_array_arg(),
            d,
            floor,
        );
    }
    out
}

fn run_backward<R: CubeRuntime>(
    x: CubeTensor<R>,
    grad: CubeTensor<R>,
    floor: f32,
) -> CubeTensor<R> {
    let grad = into_contiguous(grad);
    let [n, d] = x.meta.shape().dims::<2>();
    let out = empty_like(&x);
    let (count, dim) = elementwise(&x.client, n);
    // SAFETY: as in `run_forward` (`x` is the forward pass's contiguous input).
    unsafe {
        normalize_backward::launch_unchecked::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_array_arg(),
            grad.into_array_arg(),
            out.clone().into_array_arg(),
            d,
            floor,
        );
    }
    out
}

/// Rows scaled to unit L2 norm (`[n, d]`; the squared norms floored at `floor`, so that a zero
/// row stays finite) on wgpu or CUDA, plain or under `Autodiff`; `Err(x)`, the input back,
/// anywhere else.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>, floor: f32) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    if !all_f32(&[x.dtype()]) {
        return Err(x);
    }
    dispatch::<B, _>(Normalize(x, floor), true).map_err(|Normalize(x, _)| x)
}

struct Normalize<B: Backend>(Tensor<B, 2>, f32);

impl<B: Backend> OnCube for Normalize<B> {
    type Output = Tensor<B, 2>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, 2> {
        let Normalize(x, floor) = self;
        match tracked {
            false => upcast(run_forward::<R>(downcast(x), floor)),
            true => upcast(record::<R, BT, _, 1>(
                NormalizeStep(floor),
                [downcast(x)],
                |[x]| {
                    let x = into_contiguous(x);
                    (run_forward(x.clone(), floor), x)
                },
            )),
        }
    }
}

/// The backward step of [`l2_normalize`] under `Autodiff`: keeps the input.
#[derive(Debug)]
struct NormalizeStep(f32);

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 1> for NormalizeStep {
    type State = CubeTensor<R>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<CubeBackend<R, f32, i32, BT>, _>(ops.parents, ops.node, grads, |grad| {
            run_backward(x, grad, self.0)
        });
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::TensorData;
    use burn::tensor::backend::AutodiffBackend;

    use super::*;
    use crate::testing::max_diff;

    /// A `[5, 6]` input with a zero row, and the output and gradient of `Σ w·f(x)` for the L2
    /// normalisation, by clue's kernels (`ours`) or Burn's operations.
    fn output_and_gradient<B: AutodiffBackend>(ours: bool) -> [Vec<f32>; 2] {
        let dev = Default::default();
        let (n, m) = (5, 6);
        let values = (0..n * m).map(|i| match i / m {
            2 => 0.0,
            _ => ((i * 5 % 11) as f32 - 5.0) * 0.8,
        });
        let x = Tensor::<B, 2>::from_data(TensorData::new(values.collect(), [n, m]), &dev)
            .require_grad();
        let y = match ours {
            true => l2_normalize(x.clone(), 1e-16).expect("wgpu's"),
            false => {
                let norm = x.clone().square().sum_dim(1).clamp_min(1e-16).sqrt();
                x.clone() / norm
            }
        };
        let weights = (0..n * m).map(|i| (i as f32 * 0.9).cos()).collect();
        let w = Tensor::<B, 2>::from_data(TensorData::new(weights, y.dims()), &dev);
        let grads = (y.clone() * w).sum().backward();
        let grad = x.grad(&grads).expect("x is tracked");
        [y.into_data(), grad.into_data()].map(|d| d.to_vec().unwrap())
    }

    /// On wgpu the kernels run (plain and under autodiff), and the L2 normalisation (a zero
    /// row included) and its gradient are Burn's.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn normalisation_matches_burns_on_wgpu() {
        let dev = Default::default();
        let x = Tensor::<Wgpu, 2>::from_data([[3.0, 4.0], [0.0, 0.0]], &dev);
        let z = l2_normalize(x, 1e-16).expect("wgpu's f32 tensors");
        assert_eq!(z.into_data().to_vec::<f32>().unwrap(), [0.6, 0.8, 0.0, 0.0]);

        let [y, g] = output_and_gradient::<Autodiff<Wgpu>>(true);
        let [burns_y, burns_g] = output_and_gradient::<Autodiff<Wgpu>>(false);
        assert!(max_diff(&y, &burns_y) <= 1e-6, "{}", max_diff(&y, &burns_y));
        // Relative: the zero row's gradient is the output's over 10⁻⁸.
        let relative = g
            .iter()
            .zip(&burns_g)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0, f32::max);
        assert!(relative <= 1e-6, "gradient {relative}");
        assert!(g.iter().all(|g| g.is_finite()) && g.iter().any(|g| g.abs() > 1e-2));
    }
}
