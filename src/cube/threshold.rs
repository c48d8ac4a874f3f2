//! The ReLU and a clamp from above in one kernel of clue's own, forward and backward: each
//! value is kept, or replaced by a fill, by which side of a threshold it lies on. Burn's take a
//! comparison and a masked fill forward, and a masked fill backward, each compiled for its
//! threshold's side and shape.

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

/// `out[i] = value[i]` where `reference[i]` is not at or below `threshold` (with `above` 0:
/// where it is not above it), `fill` elsewhere. So a NaN is kept either way, as Burn's ReLU and
/// clamp keep it (and pass its gradient), and a diverged run's NaN still reaches the loss.
#[cube(launch_unchecked)]
fn keep_or_fill(
    reference: &Array<f32>,
    value: &Array<f32>,
    out: &mut Array<f32>,
    threshold: f32,
    fill: f32,
    above: u32,
) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let r = reference[i];
        let mut replaced = r > threshold;
        if above == 1u32 {
            replaced = r <= threshold;
        }
        let mut v = value[i];
        if replaced {
            v = fill;
        }
        out[i] = v;
    }
}

/// Which values a [`Threshold`] keeps: those above it (the rest become the fill) or those at
/// or below it.
#[derive(Clone, Copy, Debug)]
struct Rule {
    threshold: f32,
    above: bool,
}

impl Rule {
    /// `value` where `reference` is kept by the rule, `fill` elsewhere.
    fn apply<R: CubeRuntime>(
        self,
        reference: CubeTensor<R>,
        value: CubeTensor<R>,
        fill: f32,
    ) -> CubeTensor<R> {
        let (reference, value) = (into_contiguous(reference), into_contiguous(value));
        let out = empty_like(&value);
        let (count, dim) = elementwise(&value.client, value.meta.shape().num_elements());
        // SAFETY: three contiguous f32 buffers of the same length; the kernel touches index
        // `i` only below it.
        unsafe {
            keep_or_fill::launch_unchecked::<R>(
                &value.client.clone(),
                count,
                dim,
                reference.into_array_arg(),
                value.into_array_arg(),
                out.clone().into_array_arg(),
                self.threshold,
                fill,
                u32::from(self.above),
            );
        }
        out
    }
}

/// `max(x, 0)` on wgpu or CUDA (plain, or under `Autodiff` with its own backward step: the
/// gradient where `x > 0`); `Err(x)`, the input back, anywhere else.
pub fn relu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let rule = Rule {
        threshold: 0.0,
        above: true,
    };
    threshold(x, rule, 0.0)
}

/// `min(x, max)` on wgpu or CUDA (plain, or under `Autodiff`: the gradient where `x ≤ max`, as
/// Burn's clamp passes it); `Err(x)` anywhere else.
pub fn clamp_max<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    max: f32,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let rule = Rule {
        threshold: max,
        above: false,
    };
    threshold(x, rule, max)
}

fn threshold<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    rule: Rule,
    fill: f32,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !all_f32(&[x.dtype()]) {
        return Err(x);
    }
    dispatch::<B, _>(Threshold(x, rule, fill), true).map_err(|Threshold(x, ..)| x)
}

struct Threshold<B: Backend, const D: usize>(Tensor<B, D>, Rule, f32);

impl<B: Backend, const D: usize> OnCube for Threshold<B, D> {
    type Output = Tensor<B, D>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, D> {
        let Threshold(x, rule, fill) = self;
        match tracked {
            false => {
                let x: CubeTensor<R> = downcast(x);
                upcast(rule.apply(x.clone(), x, fill))
            }
            true => upcast(record::<R, BT, _, 1>(
                ThresholdStep(rule),
                [downcast(x)],
                |[x]| (rule.apply(x.clone(), x.clone(), fill), x),
            )),
        }
    }
}

/// The backward step of a [`Threshold`] under `Autodiff`: keeps the input, and passes the
/// gradient where the rule keeps it (0 elsewhere).
#[derive(Debug)]
struct ThresholdStep(Rule);

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 1> for ThresholdStep {
    type State = CubeTensor<R>;

    fn backward(self, ops: Ops<CubeTensor<R>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<CubeBackend<R, f32, i32, BT>, _>(ops.parents, ops.node, grads, |grad| {
            self.0.apply(x, grad, 0.0)
        });
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::TensorData;

    use super::*;

    type A = Autodiff<Wgpu>;

    /// The values and the gradient of `Σ w·f(x)` for `f` clue's ReLU or clamp at 0.5 (`ours`)
    /// or Burn's.
    fn output_and_gradient(relu_not_clamp: bool, ours: bool) -> [Vec<f32>; 2] {
        let dev = Default::default();
        let v = vec![-1.5, -0.0, 0.0, 0.25, 0.5, 0.75, 3.0, f32::NAN];
        let n = v.len();
        let x = Tensor::<A, 2>::from_data(TensorData::new(v, [2, n / 2]), &dev).require_grad();
        let y = match (relu_not_clamp, ours) {
            (true, true) => relu(x.clone()).expect("wgpu's"),
            (true, false) => burn::tensor::activation::relu(x.clone()),
            (false, true) => clamp_max(x.clone(), 0.5).expect("wgpu's"),
            (false, false) => x.clone().clamp_max(0.5),
        };
        let w = (1..=n).map(|i| i as f32).collect();
        let w = Tensor::<A, 2>::from_data(TensorData::new(w, [2, n / 2]), &dev);
        let grads = (y.clone().slice([0..2, 0..3]) * w.slice([0..2, 0..3]))
            .sum()
            .backward();
        let g = x.grad(&grads).expect("x is tracked");
        [y.into_data(), g.into_data()].map(|d| d.to_vec().unwrap())
    }

    /// On wgpu: the ReLU and the clamp and their gradients are Burn's at every kind of value
    /// (negative, both zeros, the threshold itself, above it, NaN), plain and under autodiff.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn relu_and_clamp_match_burns_on_wgpu() {
        let dev = Default::default();
        let x = Tensor::<Wgpu, 1>::from_floats([-2.0, 0.0, 0.5, 4.0], &dev);
        let r = relu(x.clone())
            .expect("wgpu's")
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(r, [0.0, 0.0, 0.5, 4.0]);
        let c = clamp_max(x, 0.5)
            .expect("wgpu's")
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(c, [-2.0, 0.0, 0.5, 0.5]);

        for relu_not_clamp in [true, false] {
            let [y, g] = output_and_gradient(relu_not_clamp, true);
            let [burns_y, burns_g] = output_and_gradient(relu_not_clamp, false);
            assert_eq!(y[..7], burns_y[..7], "relu {relu_not_clamp}");
            assert!(y[7].is_nan() && burns_y[7].is_nan(), "a NaN is kept");
            assert_eq!(g, burns_g, "relu {relu_not_clamp}: gradient");
            assert!(g.contains(&0.0) && g.iter().any(|&g| g > 0.0));
        }
    }
}
