//! The attention's weights from its scores in one kernel: the scores scaled, the keys that are
//! padding masked, and the softmax over each row; and its backward step in another. Burn's
//! generic path takes a scaling, a masking (with a `[n, heads, len, len]` mask) and a softmax
//! of 5 operations forward, and about 10 operations backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, unary};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use super::{
    OnCube, all_f32, bool_primitive, dispatch, downcast, empty_like, is_set, per_row, record,
    upcast,
};

/// The score of key `j` in the row starting at `at` (its sequence's keys start at `keys` in
/// `pad`, true = padding): scaled, or `masked` for a key that is padding.
#[cube]
fn score<P: Int>(
    scores: &Array<f32>,
    pad: &Array<P>,
    at: usize,
    keys: usize,
    j: usize,
    scale: f32,
    masked: f32,
) -> f32 {
    let mut s = scores[at + j] * scale;
    if is_set(pad, keys + j) {
        s = masked;
    }
    s
}

/// One row per unit: `exp(s − max s) / Σ exp(s − max s)` over the row's scores `s` (scaled and
/// masked by [`score`]), in Burn's order of operations.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn softmax_forward<P: Int>(
    scores: &Array<f32>,
    pad: &Array<P>,
    out: &mut Array<f32>,
    len: usize,
    queries: usize,
    scale: f32,
    masked: f32,
    #[define(P)] _flags: StorageType,
) {
    let row = ABSOLUTE_POS;
    if row * len < scores.len() {
        let at = row * len;
        let keys = (row / queries) * len;
        let mut top = score(scores, pad, at, keys, 0, scale, masked);
        for j in 1..len {
            top = max(top, score(scores, pad, at, keys, j, scale, masked));
        }
        let mut sum = 0.0;
        for j in 0..len {
            let e = Exp::exp(score(scores, pad, at, keys, j, scale, masked) - top);
            out[at + j] = e;
            sum += e;
        }
        for j in 0..len {
            out[at + j] = out[at + j] / sum;
        }
    }
}

/// One row per unit: the gradient of the scores from the weights `y` and their gradient `g`,
/// `scale · y · (g − Σ g·y)`, and 0 for the keys that are padding (the masking's gradient).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn softmax_backward<P: Int>(
    weights: &Array<f32>,
    grad: &Array<f32>,
    pad: &Array<P>,
    out: &mut Array<f32>,
    len: usize,
    queries: usize,
    scale: f32,
    #[define(P)] _flags: StorageType,
) {
    let row = ABSOLUTE_POS;
    if row * len < weights.len() {
        let at = row * len;
        let keys = (row / queries) * len;
        let mut dot = 0.0;
        for j in 0..len {
            dot += weights[at + j] * grad[at + j];
        }
        for j in 0..len {
            let mut g = 0.0;
            if !is_set(pad, keys + j) {
                g = scale * weights[at + j] * (grad[at + j] - dot);
            }
            out[at + j] = g;
        }
    }
}

/// `softmax(scores · scale)` over the last axis, with the keys that are padding set to `masked`
/// before it: the attention's weights from its scores (`[n, heads, len, len]`; `pad`:
/// `[n, len]`, true = padding), on wgpu or CUDA (plain, or under `Autodiff` with its own
/// backward step); `Err(scores)`, the scores back, anywhere else.
pub fn masked_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    pad: &Tensor<B, 2, Bool>,
    scale: f32,
    masked: f32,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if !all_f32(&[scores.dtype()]) {
        return Err(scores);
    }
    let task = Softmax {
        scores,
        pad,
        scale,
        masked,
    };
    dispatch::<B, _>(task, true).map_err(|task| task.scores)
}

struct Softmax<'a, B: Backend> {
    scores: Tensor<B, 4>,
    pad: &'a Tensor<B, 2, Bool>,
    scale: f32,
    masked: f32,
}

/// The rows' layout: `len` scores each, `queries` rows (heads × queries) per sequence.
#[derive(Clone, Copy, Debug)]
struct Rows {
    len: usize,
    queries: usize,
    scale: f32,
}

impl<B: Backend> OnCube for Softmax<'_, B> {
    type Output = Tensor<B, 4>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, 4> {
        let [n, heads, len, keys] = self.scores.dims();
        assert_eq!(len, keys, "masked_softmax: the scores of a self-attention");
        assert_eq!(
            self.pad.dims(),
            [n, len],
            "masked_softmax: padding of another shape"
        );
        let rows = Rows {
            len,
            queries: heads * len,
            scale: self.scale,
        };
        let pad = into_contiguous(bool_primitive::<R, B>(self.pad));
        let masked = self.masked;
        match tracked {
            false => upcast(run_forward::<R>(downcast(self.scores), pad, rows, masked)),
            true => upcast(record::<R, BT, _, 1>(
                SoftmaxStep(rows),
                [downcast(self.scores)],
                |[scores]| {
                    let weights = run_forward(scores, pad.clone(), rows, masked);
                    (weights.clone(), (weights, pad))
                },
            )),
        }
    }
}

fn run_forward<R: CubeRuntime>(
    scores: CubeTensor<R>,
    pad: CubeTensor<R>,
    rows: Rows,
    masked: f32,
) -> CubeTensor<R> {
    let scores = into_contiguous(scores);
    let out = empty_like(&scores);
    let (count, dim) = per_row(&scores, rows.len);
    // SAFETY: contiguous buffers: scores and out (f32) of rows of `len`, pad (the backend's
    // booleans) of `len` per sequence of `queries` rows; the kernel reads and writes only
    // within its own row.
    unsafe {
        softmax_forward::launch_unchecked::<R>(
            &scores.client.clone(),
            count,
            dim,
            scores.into_array_arg(),
            pad.clone().into_array_arg(),
            out.clone().into_array_arg(),
            rows.len,
            rows.queries,
            rows.scale,
            masked,
            pad.dtype.into(),
        );
    }
    out
}

fn run_backward<R: CubeRuntime>(
    weights: CubeTensor<R>,
    grad: CubeTensor<R>,
    pad: CubeTensor<R>,
    rows: Rows,
) -> CubeTensor<R> {
    let grad = into_contiguous(grad);
    let out = empty_like(&weights);
    let (count, dim) = per_row(&weights, rows.len);
    // SAFETY: as in `run_forward` (the weights and pad are the forward pass's contiguous ones).
    unsafe {
        softmax_backward::launch_unchecked::<R>(
            &weights.client.clone(),
            count,
            dim,
            weights.into_array_arg(),
            grad.into_array_arg(),
            pad.clone().into_array_arg(),
            out.clone().into_array_arg(),
            rows.len,
            rows.queries,
            rows.scale,
            pad.dtype.into(),
        );
    }
    out
}

/// The backward step of [`masked_softmax`] under `Autodiff`: keeps the weights and the padding.
#[derive(Debug)]
struct SoftmaxStep(Rows);

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 1> for SoftmaxStep {
    type State = (CubeTensor<R>, CubeTensor<R>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (weights, pad) = ops.state;
        unary::<CubeBackend<R, f32, i32, BT>, _>(ops.parents, ops.node, grads, |grad| {
            run_backward(weights, grad, pad, self.0)
        });
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{TensorData, activation};

    use super::*;
    use crate::testing::max_diff;

    /// 3 sequences of 5 positions, 2 heads: the first without padding, the second with its
    /// last 2 positions padding, the third all padding.
    const SHAPE: [usize; 4] = [3, 2, 5, 5];
    const PAD: [bool; 15] = [
        false, false, false, false, false, false, false, false, true, true, true, true, true, true,
        true,
    ];

    /// The weights and the gradient of `Σ w·weights` with respect to the scores, by clue's
    /// kernel (`ours`) or Burn's operations.
    fn weights_and_gradient<B: AutodiffBackend>(ours: bool, dev: &B::Device) -> [Vec<f32>; 2] {
        let count = SHAPE.iter().product::<usize>();
        let scores = (0..count).map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.9);
        let w = (0..count).map(|i| (i as f32 * 0.61).sin());
        let scores =
            Tensor::<B, 4>::from_data(TensorData::new(scores.collect(), SHAPE), dev).require_grad();
        let w = Tensor::<B, 4>::from_data(TensorData::new(w.collect(), SHAPE), dev);
        let pad = Tensor::<B, 2, Bool>::from_data(TensorData::new(PAD.to_vec(), [3, 5]), dev);
        let scale = 0.7;
        let weights = match ours {
            true => masked_softmax(scores.clone(), &pad, scale, -1.0e4).expect("wgpu's"),
            false => {
                let mask = pad.reshape([3, 1, 1, 5]).repeat_dim(2, 5).repeat_dim(1, 2);
                let masked = scores.clone().mul_scalar(scale).mask_fill(mask, -1.0e4);
                activation::softmax(masked, 3)
            }
        };
        let grads = (weights.clone() * w).sum().backward();
        let grad = scores.grad(&grads).expect("the scores are tracked");
        [weights.into_data(), grad.into_data()].map(|d| d.to_vec().unwrap())
    }

    /// On wgpu the kernels run (plain and under autodiff), and the weights and their gradient
    /// are those of Burn's scaling, masking and softmax, padding and all-padding rows included.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn masked_softmax_and_its_gradient_match_burns_on_wgpu() {
        let dev = Default::default();
        let plain = Tensor::<Wgpu, 4>::zeros(SHAPE, &dev);
        let pad = Tensor::<Wgpu, 2, Bool>::from_data(TensorData::new(PAD.to_vec(), [3, 5]), &dev);
        let uniform = masked_softmax(plain, &pad, 1.0, -1.0e4).expect("wgpu's f32 tensors");
        let uniform = uniform.into_data().to_vec::<f32>().unwrap();
        // Zero scores: the unpadded keys share the weight (an all-padding row: all five do).
        assert_eq!(uniform[0], 0.2);
        assert!((uniform[50] - 1.0 / 3.0).abs() < 1e-7 && uniform[53] == 0.0);
        assert_eq!(uniform[149], 0.2);

        let [ours_y, ours_g] = weights_and_gradient::<Autodiff<Wgpu>>(true, &dev);
        let [burns_y, burns_g] = weights_and_gradient::<Autodiff<Wgpu>>(false, &dev);
        assert!(
            max_diff(&ours_y, &burns_y) <= 1e-6,
            "weights {}",
            max_diff(&ours_y, &burns_y)
        );
        assert!(
            max_diff(&ours_g, &burns_g) <= 1e-6,
            "gradient {}",
            max_diff(&ours_g, &burns_g)
        );
        assert!(
            ours_g.iter().any(|g| g.abs() > 1e-2),
            "a gradient that is not all zeros"
        );
    }
}
