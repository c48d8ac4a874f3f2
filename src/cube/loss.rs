//! The contrastive loss's two row operations, each in one kernel forward and one backward:
//! the L2 normalisation of the projected embeddings (Burn: 5 operations forward, about 12
//! backward) and the cross-entropy of logits whose targets are the diagonal (Burn's
//! `log_softmax`, `gather` and `neg`: 8 forward, about 10 backward).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, unary};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use super::{OnCube, all_f32, dispatch, downcast, elementwise, empty, record, upcast};

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

/// The largest of the `m` logits from `at`, and `Σ exp(l − largest)` over them.
#[cube]
fn row_max(logits: &Array<f32>, at: usize, m: usize) -> f32 {
    let mut top = logits[at];
    for j in 1..m {
        top = max(top, logits[at + j]);
    }
    top
}

#[cube]
fn row_exp_sum(logits: &Array<f32>, at: usize, m: usize, top: f32) -> f32 {
    let mut sum = 0.0;
    for j in 0..m {
        sum += Exp::exp(logits[at + j] - top);
    }
    sum
}

/// One row `i` per unit: `−log softmax(lᵢ)[i]`, in Burn's order of operations.
#[cube(launch_unchecked)]
fn diagonal_nll_forward(logits: &Array<f32>, out: &mut Array<f32>, m: usize) {
    let row = ABSOLUTE_POS;
    if row < out.len() {
        let at = row * m;
        let top = row_max(logits, at, m);
        let sum = row_exp_sum(logits, at, m, top);
        out[row] = -((logits[at + row] - top) - Log::ln(sum));
    }
}

/// One row `i` per unit: `gᵢ · (softmax(lᵢ) − eᵢ)`.
#[cube(launch_unchecked)]
fn diagonal_nll_backward(logits: &Array<f32>, grad: &Array<f32>, out: &mut Array<f32>, m: usize) {
    let row = ABSOLUTE_POS;
    if row < grad.len() {
        let at = row * m;
        let top = row_max(logits, at, m);
        let sum = row_exp_sum(logits, at, m, top);
        let g = grad[row];
        for j in 0..m {
            out[at + j] = g * (Exp::exp(logits[at + j] - top) / sum);
        }
        out[at + row] = out[at + row] - g;
    }
}

/// Which row operation a [`RowTask`] runs.
#[derive(Clone, Copy, Debug)]
enum Row {
    /// [`l2_normalize`] with the squared norms' floor: `[n, d]` → `[n, d]`.
    Normalize(f32),
    /// [`diagonal_nll`]: `[n, m]` → `[n]`.
    DiagonalNll,
}

impl Row {
    fn forward<R: CubeRuntime>(self, x: CubeTensor<R>) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let [n, d] = x.meta.shape().dims::<2>();
        let out_shape = match self {
            Row::Normalize(_) => x.meta.shape().clone(),
            Row::DiagonalNll => [n].into(),
        };
        let out = empty(&x, out_shape);
        let (count, dim) = elementwise(&x.client, n);
        let client = x.client.clone();
        // SAFETY: contiguous f32 buffers of `n` rows of `d` (and `n` values for the losses);
        // each unit reads and writes only its own row below `n`.
        unsafe {
            let (x, o) = (x.into_array_arg(), out.clone().into_array_arg());
            match self {
                Row::Normalize(floor) => {
                    normalize_forward::launch_unchecked::<R>(&client, count, dim, x, o, d, floor)
                }
                Row::DiagonalNll => {
                    diagonal_nll_forward::launch_unchecked::<R>(&client, count, dim, x, o, d)
                }
            }
        }
        out
    }

    fn backward<R: CubeRuntime>(self, x: CubeTensor<R>, grad: CubeTensor<R>) -> CubeTensor<R> {
        let grad = into_contiguous(grad);
        let [n, d] = x.meta.shape().dims::<2>();
        let out = empty(&x, x.meta.shape().clone());
        let (count, dim) = elementwise(&x.client, n);
        let client = x.client.clone();
        // SAFETY: as in `forward` (`x` is the forward pass's contiguous input).
        unsafe {
            let (x, g, o) = (
                x.into_array_arg(),
                grad.into_array_arg(),
                out.clone().into_array_arg(),
            );
            match self {
                Row::Normalize(floor) => normalize_backward::launch_unchecked::<R>(
                    &client, count, dim, x, g, o, d, floor,
                ),
                Row::DiagonalNll => {
                    diagonal_nll_backward::launch_unchecked::<R>(&client, count, dim, x, g, o, d)
                }
            }
        }
        out
    }
}

/// Rows scaled to unit L2 norm (`[n, d]`; the squared norms floored at `floor`, so that a zero
/// row stays finite) on wgpu or CUDA, plain or under `Autodiff`; `Err(x)`, the input back,
/// anywhere else.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>, floor: f32) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let task = RowTask::<B, 2>(Row::Normalize(floor), x);
    dispatch_rows(task).map_err(|RowTask(_, x)| x)
}

/// `−log softmax(lᵢ)[i]` of each row `i` of `logits` (`[n, m]`, `m ≥ n` → `[n]`): the
/// cross-entropy of each row whose target is the diagonal, on wgpu or CUDA, plain or under
/// `Autodiff`; `Err(logits)` anywhere else.
pub fn diagonal_nll<B: Backend>(logits: Tensor<B, 2>) -> Result<Tensor<B, 1>, Tensor<B, 2>> {
    let [n, m] = logits.dims();
    assert!(
        n <= m,
        "diagonal_nll: {n} rows of {m} logits have no diagonal target each"
    );
    let task = RowTask::<B, 1>(Row::DiagonalNll, logits);
    dispatch_rows(task).map_err(|RowTask(_, x)| x)
}

fn dispatch_rows<B: Backend, const O: usize>(
    task: RowTask<B, O>,
) -> Result<Tensor<B, O>, RowTask<B, O>> {
    if !all_f32(&[task.1.dtype()]) {
        return Err(task);
    }
    dispatch::<B, _>(task, true)
}

/// A row operation on `[n, ·]`, giving a tensor of `O` dimensions.
struct RowTask<B: Backend, const O: usize>(Row, Tensor<B, 2>);

impl<B: Backend, const O: usize> OnCube for RowTask<B, O> {
    type Output = Tensor<B, O>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, O> {
        let RowTask(row, x) = self;
        match tracked {
            false => upcast(row.forward::<R>(downcast(x))),
            true => upcast(record::<R, BT, _, 1>(RowStep(row), [downcast(x)], |[x]| {
                let x = into_contiguous(x);
                (row.forward(x.clone()), x)
            })),
        }
    }
}

/// The backward step of a row operation under `Autodiff`: keeps the input.
#[derive(Debug)]
struct RowStep(Row);

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 1> for RowStep {
    type State = CubeTensor<R>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<CubeBackend<R, f32, i32, BT>, _>(ops.parents, ops.node, grads, |grad| {
            self.0.backward(x, grad)
        });
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::activation::log_softmax;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Int, TensorData};

    use super::*;
    use crate::testing::max_diff;

    /// A `[5, 6]` input with a zero row, and the output and gradient of `Σ w·f(x)` for the
    /// operation `row`, by clue's kernels (`ours`) or Burn's operations.
    fn output_and_gradient<B: AutodiffBackend>(row: Row, ours: bool) -> [Vec<f32>; 2] {
        let dev = Default::default();
        let (n, m) = (5, 6);
        let values = (0..n * m).map(|i| match i / m {
            2 if matches!(row, Row::Normalize(_)) => 0.0,
            _ => ((i * 5 % 11) as f32 - 5.0) * 0.8,
        });
        let x = Tensor::<B, 2>::from_data(TensorData::new(values.collect(), [n, m]), &dev)
            .require_grad();
        let (y, w): (Tensor<B, 2>, _) = match (row, ours) {
            (Row::Normalize(_), true) => (l2_normalize(x.clone(), 1e-16).expect("wgpu's"), n * m),
            (Row::Normalize(_), false) => {
                let norm = x.clone().square().sum_dim(1).clamp_min(1e-16).sqrt();
                (x.clone() / norm, n * m)
            }
            (Row::DiagonalNll, true) => {
                let nll = diagonal_nll(x.clone()).expect("wgpu's");
                (nll.reshape([n, 1]), n)
            }
            (Row::DiagonalNll, false) => {
                let targets = Tensor::<B, 1, Int>::arange(0..n as i64, &dev).reshape([n, 1]);
                (log_softmax(x.clone(), 1).gather(1, targets).neg(), n)
            }
        };
        let weights = (0..w).map(|i| (i as f32 * 0.9).cos()).collect();
        let w = Tensor::<B, 2>::from_data(TensorData::new(weights, y.dims()), &dev);
        let grads = (y.clone() * w).sum().backward();
        let grad = x.grad(&grads).expect("x is tracked");
        [y.into_data(), grad.into_data()].map(|d| d.to_vec().unwrap())
    }

    /// On wgpu the kernels run (plain and under autodiff), and the L2 normalisation (a zero
    /// row included) and the diagonal cross-entropy, with their gradients, are Burn's.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn normalisation_and_cross_entropy_match_burns_on_wgpu() {
        let dev = Default::default();
        let x = Tensor::<Wgpu, 2>::from_data([[3.0, 4.0], [0.0, 0.0]], &dev);
        let z = l2_normalize(x.clone(), 1e-16).expect("wgpu's f32 tensors");
        assert_eq!(z.into_data().to_vec::<f32>().unwrap(), [0.6, 0.8, 0.0, 0.0]);
        let nll = diagonal_nll(x).expect("wgpu's f32 tensors");
        let nll = nll.into_data().to_vec::<f32>().unwrap();
        // log(e³ + e⁴) − 3 and log 2.
        let expected = [1.0 + 1.0f32.exp(), 2.0].map(f32::ln);
        assert!(max_diff(&nll, &expected) <= 1e-6, "{nll:?}");

        for row in [Row::Normalize(1e-16), Row::DiagonalNll] {
            let [y, g] = output_and_gradient::<Autodiff<Wgpu>>(row, true);
            let [burns_y, burns_g] = output_and_gradient::<Autodiff<Wgpu>>(row, false);
            assert!(
                max_diff(&y, &burns_y) <= 1e-6,
                "{row:?}: {}",
                max_diff(&y, &burns_y)
            );
            // Relative: the zero row's gradient is the output's over 10⁻⁸.
            let relative = g
                .iter()
                .zip(&burns_g)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                .fold(0.0, f32::max);
            assert!(relative <= 1e-6, "{row:?}: gradient {relative}");
            assert!(g.iter().all(|g| g.is_finite()) && g.iter().any(|g| g.abs() > 1e-2));
        }
    }
}
