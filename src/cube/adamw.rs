//! AdamW's update of one parameter in one kernel: Burn's AdamW takes 15 element-wise
//! operations (the two moments, their bias corrections, the square root, the decay).

use burn::optim::{AdamWState, AdaptiveMomentumState};
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime};
use cubecl::prelude::*;

use super::{OnCube, all_f32, dispatch, downcast, elementwise, empty_like, upcast};

/// AdamW's constants.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hyper {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

/// The new weight, `w·decay − lr·m̂ / (√v̂ + ε)`, and the new moments
/// `m = β₁·m + (1 − β₁)·g`, `v = β₂·v + (1 − β₂)·g²` (`m̂`, `v̂`: each over its bias
/// correction), in Burn's order of operations.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn adamw_update(
    weight: &Array<f32>,
    grad: &Array<f32>,
    m: &Array<f32>,
    v: &Array<f32>,
    weight_out: &mut Array<f32>,
    m_out: &mut Array<f32>,
    v_out: &mut Array<f32>,
    c: Constants,
) {
    let i = ABSOLUTE_POS;
    if i < weight.len() {
        let g = grad[i];
        let m1 = m[i] * c.beta_1 + g * c.rest_1;
        let m2 = v[i] * c.beta_2 + g * g * c.rest_2;
        m_out[i] = m1;
        v_out[i] = m2;
        let step = (m1 / c.correction_1) / ((m2 / c.correction_2).sqrt() + c.epsilon);
        weight_out[i] = weight[i] * c.decay - step * c.lr;
    }
}

/// One step's constants.
#[derive(CubeType, CubeLaunch)]
struct Constants {
    beta_1: f32,
    beta_2: f32,
    rest_1: f32,
    rest_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    decay: f32,
    lr: f32,
}

/// The inputs of a step that the kernel does not take.
pub(crate) type Unfused<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>, Option<AdamWState<B, D>>);

/// AdamW's step on wgpu or CUDA, fused: the new weight and state; the inputs back (`Err`)
/// anywhere else, for Burn's AdamW.
pub(crate) fn step<B: Backend, const D: usize>(
    hyper: Hyper,
    lr: f64,
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    state: Option<AdamWState<B, D>>,
) -> Result<(Tensor<B, D>, AdamWState<B, D>), Unfused<B, D>> {
    let plain = all_f32(&[tensor.dtype(), grad.dtype()])
        && state
            .as_ref()
            .is_none_or(|s| s.momentum.max_moment_2.is_none());
    if !plain {
        return Err((tensor, grad, state));
    }
    let step = Step {
        hyper,
        lr,
        tensor,
        grad,
        state,
    };
    dispatch::<B, _>(step, false).map_err(|s| (s.tensor, s.grad, s.state))
}

struct Step<B: Backend, const D: usize> {
    hyper: Hyper,
    lr: f64,
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    state: Option<AdamWState<B, D>>,
}

impl<B: Backend, const D: usize> OnCube for Step<B, D> {
    type Output = (Tensor<B, D>, AdamWState<B, D>);

    fn on<R: CubeRuntime, BT: BoolElement>(self, _: bool) -> Self::Output {
        let Self {
            hyper,
            lr,
            tensor,
            grad,
            state,
        } = self;
        let (time, m, v) = match state {
            Some(s) => (s.momentum.time, s.momentum.moment_1, s.momentum.moment_2),
            // Burn's first step starts the moments at (1 − β)·g: the same as from zeros here.
            None => (0, grad.zeros_like(), grad.zeros_like()),
        };
        let time = time + 1;
        // As Burn: the corrections in f32, the decay rate in f64.
        let decay_rate = lr * hyper.weight_decay as f64;
        let constants = ConstantsLaunch::new(
            hyper.beta_1,
            hyper.beta_2,
            1.0 - hyper.beta_1,
            1.0 - hyper.beta_2,
            1.0 - hyper.beta_1.powi(time as i32),
            1.0 - hyper.beta_2.powi(time as i32),
            hyper.epsilon,
            (1.0 - decay_rate) as f32,
            lr as f32,
        );
        let shape: Shape = tensor.shape();
        let cube = |x: Tensor<B, D>| into_contiguous(downcast::<CubeTensor<R>, B, D>(x));
        let (w, g, m, v) = (cube(tensor), cube(grad), cube(m), cube(v));
        let (w_out, m_out, v_out) = (empty_like(&w), empty_like(&w), empty_like(&w));
        let client = w.client.clone();
        let (count, dim) = elementwise(&client, shape.num_elements());
        // SAFETY: all seven arrays are contiguous f32 buffers of the same length, and the
        // kernel touches index `i` only where `i` is below it.
        unsafe {
            adamw_update::launch_unchecked::<R>(
                &client,
                count,
                dim,
                w.into_array_arg(),
                g.into_array_arg(),
                m.into_array_arg(),
                v.into_array_arg(),
                w_out.clone().into_array_arg(),
                m_out.clone().into_array_arg(),
                v_out.clone().into_array_arg(),
                constants,
            );
        }
        let momentum = AdaptiveMomentumState::new(time, upcast(m_out), upcast(v_out));
        (upcast(w_out), AdamWState::new(momentum))
    }
}
