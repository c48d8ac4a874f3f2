//! The mean of each sequence's positions that are not padding, in one kernel, and its
//! backward step in another. Burn's generic path (in `model::ops::pooled`) takes 8 operations
//! forward, two of them maskings, and about 4 backward.

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
    OnCube, all_f32, bool_primitive, dispatch, downcast, elementwise, empty, is_set, record, upcast,
};

/// The number of positions of sequence `b` that are not padding (at least 1).
#[cube]
fn kept<P: Int>(pad: &Array<P>, b: usize, len: usize) -> f32 {
    let mut count = 0.0;
    for t in 0..len {
        if !is_set(pad, b * len + t) {
            count += 1.0;
        }
    }
    max(count, 1.0)
}

/// One feature `j` of one sequence `b` per unit: the sum of `x[b, t, j]` over the positions
/// `t` that are not padding, over their number.
#[cube(launch_unchecked)]
fn pool_forward<P: Int>(
    x: &Array<f32>,
    pad: &Array<P>,
    out: &mut Array<f32>,
    len: usize,
    d: usize,
    #[define(P)] _flags: StorageType,
) {
    let unit = ABSOLUTE_POS;
    if unit < out.len() {
        let (b, j) = (unit / d, unit % d);
        let mut sum = 0.0;
        for t in 0..len {
            if !is_set(pad, b * len + t) {
                sum += x[(b * len + t) * d + j];
            }
        }
        out[unit] = sum / kept(pad, b, len);
    }
}

/// One feature `j` of one sequence `b` per unit: the output's gradient over the number of
/// kept positions at each of them, and 0 at padding.
#[cube(launch_unchecked)]
fn pool_backward<P: Int>(
    grad: &Array<f32>,
    pad: &Array<P>,
    out: &mut Array<f32>,
    len: usize,
    d: usize,
    #[define(P)] _flags: StorageType,
) {
    let unit = ABSOLUTE_POS;
    if unit < grad.len() {
        let (b, j) = (unit / d, unit % d);
        let share = grad[unit] / kept(pad, b, len);
        for t in 0..len {
            let mut g = 0.0;
            if !is_set(pad, b * len + t) {
                g = share;
            }
            out[(b * len + t) * d + j] = g;
        }
    }
}

/// The mean of `x` (`[n, len, d]`) over each sequence's positions that are not padding
/// (`pad`: `[n, len]`, true = padding) → `[n, d]`, zeros for a sequence of padding only; on
/// wgpu or CUDA (plain, or under `Autodiff` with its own backward step); `Err(x)` elsewhere.
pub fn masked_mean<B: Backend>(
    x: Tensor<B, 3>,
    pad: &Tensor<B, 2, Bool>,
) -> Result<Tensor<B, 2>, Tensor<B, 3>> {
    if !all_f32(&[x.dtype()]) {
        return Err(x);
    }
    let [n, len, _] = x.dims();
    assert_eq!(
        pad.dims(),
        [n, len],
        "masked_mean: padding of another shape"
    );
    dispatch::<B, _>(Pool { x, pad }, true).map_err(|task| task.x)
}

struct Pool<'a, B: Backend> {
    x: Tensor<B, 3>,
    pad: &'a Tensor<B, 2, Bool>,
}

impl<B: Backend> OnCube for Pool<'_, B> {
    type Output = Tensor<B, 2>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, 2> {
        let [n, len, d] = self.x.dims();
        let pad = into_contiguous(bool_primitive::<R, B>(self.pad));
        let shape = [n, len, d];
        match tracked {
            false => upcast(run_forward::<R>(downcast(self.x), pad, shape)),
            true => upcast(record::<R, BT, _, 1>(
                PoolStep(shape),
                [downcast(self.x)],
                |[x]| (run_forward(x, pad.clone(), shape), pad),
            )),
        }
    }
}

fn run_forward<R: CubeRuntime>(
    x: CubeTensor<R>,
    pad: CubeTensor<R>,
    [n, len, d]: [usize; 3],
) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let out = empty(&x, [n, d].into());
    let (count, dim) = elementwise(&x.client, n * d);
    // SAFETY: contiguous buffers: x (f32) of `n` sequences of `len × d`, pad (the backend's
    // booleans) of `n × len`, out (f32) of `n × d`; each unit reads one feature of one sequence
    // and writes its own value.
    unsafe {
        pool_forward::launch_unchecked::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_array_arg(),
            pad.clone().into_array_arg(),
            out.clone().into_array_arg(),
            len,
            d,
            pad.dtype.into(),
        );
    }
    out
}

/// The backward step of [`masked_mean`] under `Autodiff`: keeps the padding.
#[derive(Debug)]
struct PoolStep([usize; 3]);

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 1> for PoolStep {
    type State = CubeTensor<R>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let pad = ops.state;
        let Self([n, len, d]) = self;
        unary::<CubeBackend<R, f32, i32, BT>, _>(ops.parents, ops.node, grads, |grad| {
            let grad = into_contiguous(grad);
            let out = empty(&grad, [n, len, d].into());
            let (count, dim) = elementwise(&grad.client, n * d);
            // SAFETY: as in `run_forward`, each unit writing one feature of one sequence.
            unsafe {
                pool_backward::launch_unchecked::<R>(
                    &grad.client.clone(),
                    count,
                    dim,
                    grad.into_array_arg(),
                    pad.clone().into_array_arg(),
                    out.clone().into_array_arg(),
                    len,
                    d,
                    pad.dtype.into(),
                );
            }
            out
        });
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::{Int, TensorData};

    use super::*;
    use crate::testing::max_diff;

    /// 3 sequences of 4 positions: none, the last 3 and all of them padding.
    const PAD: [bool; 12] = [
        false, false, false, false, false, true, true, true, true, true, true, true,
    ];

    /// The masked mean of a `[3, 4, 5]` input and the gradient of `Σ w·mean`, by clue's kernels
    /// (`ours`) or Burn's operations (those of `model::ops::pooled`'s generic path).
    fn mean_and_gradient<B: AutodiffBackend>(ours: bool) -> [Vec<f32>; 2] {
        let dev = Default::default();
        let x = (0..60).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.3).collect();
        let x = Tensor::<B, 3>::from_data(TensorData::new(x, [3, 4, 5]), &dev).require_grad();
        let pad = Tensor::<B, 2, Bool>::from_data(TensorData::new(PAD.to_vec(), [3, 4]), &dev);
        let mean = match ours {
            true => masked_mean(x.clone(), &pad).expect("wgpu's"),
            false => {
                let pad3 = pad.unsqueeze_dim::<3>(2);
                let count = x.clone().slice([0..3, 0..4, 0..1]).ones_like();
                let count = count.mask_fill(pad3.clone(), 0.0).sum_dim(1).clamp_min(1.0);
                let sum = x.clone().mask_fill(pad3.expand([3, 4, 5]), 0.0).sum_dim(1);
                (sum / count).squeeze_dim::<2>(1)
            }
        };
        let w = (0..15).map(|i| (i as f32 * 0.7).sin()).collect();
        let w = Tensor::<B, 2>::from_data(TensorData::new(w, [3, 5]), &dev);
        let grads = (mean.clone() * w).sum().backward();
        let grad = x.grad(&grads).expect("x is tracked");
        [mean.into_data(), grad.into_data()].map(|d| d.to_vec().unwrap())
    }

    /// On wgpu the kernels run (plain and under autodiff), and the mean and its gradient are
    /// those of Burn's operations: a full sequence, one of a single position, one of padding.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn masked_mean_and_its_gradient_match_burns_on_wgpu() {
        let dev = Default::default();
        let x = Tensor::<Wgpu, 3>::from_data(
            [[[1.0, 2.0], [3.0, 6.0]], [[5.0, 7.0], [9.0, 9.0]]],
            &dev,
        );
        let pad = Tensor::<Wgpu, 2, Bool>::from_data([[false, false], [false, true]], &dev);
        // The kernels read the backend's own booleans: written from the host, made by a
        // comparison on the GPU (as the model's padding is, `tokens.equal_elem(0)`), negated.
        let ids = Tensor::<Wgpu, 2, Int>::from_data([[3, 1], [4, 0]], &dev);
        for pad in [
            pad,
            ids.clone().equal_elem(0),
            ids.not_equal_elem(0).bool_not(),
        ] {
            let mean = masked_mean(x.clone(), &pad).expect("wgpu's f32 tensors");
            assert_eq!(
                mean.into_data().to_vec::<f32>().unwrap(),
                [2.0, 4.0, 5.0, 7.0]
            );
        }

        let [ours_y, ours_g] = mean_and_gradient::<Autodiff<Wgpu>>(true);
        let [burns_y, burns_g] = mean_and_gradient::<Autodiff<Wgpu>>(false);
        assert!(
            max_diff(&ours_y, &burns_y) <= 1e-6,
            "mean {}",
            max_diff(&ours_y, &burns_y)
        );
        assert!(
            max_diff(&ours_g, &burns_g) <= 1e-6,
            "gradient {}",
            max_diff(&ours_g, &burns_g)
        );
        assert!(
            ours_y[10..].iter().all(|v| *v == 0.0),
            "padding only: zeros"
        );
        assert!(ours_g[20..25].iter().any(|g| *g != 0.0) && ours_g[25..].iter().all(|g| *g == 0.0));
    }
}
