//! The symmetric InfoNCE of one service pair from its cosine similarities and the log of the
//! logit scale, in one kernel forward and one backward (plus the sums of the clipping's kernel):
//! the logit scale `s = exp(min(t, t_max))`, the logits `s·sim`, the cross-entropies of their
//! rows and of their columns against the diagonal, and the mean of the two. Burn's operations
//! take 13 kernels forward (the clamp, the exponential, the product, `log_softmax`, `gather`,
//! the means) and about 15 backward, the scale's gradient included.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use cubecl::prelude::*;

use super::clip::total;
use super::{OnCube, Tracked, all_f32, dispatch, downcast, elementwise, empty, record, upcast};

/// `t`, or `t_max` where `t` is above it: a NaN stays NaN, as in Burn's clamp (a GPU's `min`
/// may give the other operand), so that a diverged scale makes the loss NaN.
#[cube]
fn clamped(t: f32, t_max: f32) -> f32 {
    let mut c = t;
    if t > t_max {
        c = t_max;
    }
    c
}

/// Unit `k < 2n` of `[n, n]` `sim`: row `k` (`k < n`) or column `k − n` of the logits
/// `s·sim`: their log-sum-exp into `lse[k]`, and their cross-entropy against the diagonal over
/// `2n` into `parts[k]` (the loss is the sum of `parts`).
#[cube(launch_unchecked)]
fn infonce_forward(
    sim: &Array<f32>,
    log_scale: &Array<f32>,
    parts: &mut Array<f32>,
    lse: &mut Array<f32>,
    n: usize,
    t_max: f32,
) {
    let k = ABSOLUTE_POS;
    if k < 2 * n {
        let s = Exp::exp(clamped(log_scale[0], t_max));
        // Row i: sim[i·n + q]; column j: sim[q·n + j].
        let mut at = k * n;
        let mut step = 1;
        let mut own = k;
        if k >= n {
            at = k - n;
            step = n;
            own = k - n;
        }
        let mut top = s * sim[at];
        for q in 1..n {
            top = max(top, s * sim[at + q * step]);
        }
        let mut sum = 0.0;
        for q in 0..n {
            sum += Exp::exp(s * sim[at + q * step] - top);
        }
        let l = top + Log::ln(sum);
        lse[k] = l;
        parts[k] = (l - s * sim[at + own * step]) / f32::cast_from(2 * n);
    }
}

/// Unit `i < n`: row `i` of the loss's gradient with respect to `sim` (the gradient `g` of
/// the loss times `s·(p_row + p_col − 2δ) / 2n`), and the row's share of the gradient with
/// respect to `t` (`Σ_j sim·∂loss/∂logit · s`, or 0 where `t > t_max`) into `t_parts[i]`.
#[cube(launch_unchecked)]
fn infonce_backward(
    sim: &Array<f32>,
    log_scale: &Array<f32>,
    lse: &Array<f32>,
    grad: &Array<f32>,
    grad_sim: &mut Array<f32>,
    t_parts: &mut Array<f32>,
    n: usize,
    t_max: f32,
) {
    let i = ABSOLUTE_POS;
    if i < n {
        let t = log_scale[0];
        let s = Exp::exp(clamped(t, t_max));
        let c = grad[0] / f32::cast_from(2 * n);
        let mut along_t = 0.0;
        for j in 0..n {
            let at = i * n + j;
            let logit = s * sim[at];
            let mut d = Exp::exp(logit - lse[i]) + Exp::exp(logit - lse[n + j]);
            if i == j {
                d -= 2.0;
            }
            d *= c;
            grad_sim[at] = s * d;
            along_t += sim[at] * d;
        }
        let mut along = s * along_t;
        if t > t_max {
            along = 0.0;
        }
        t_parts[i] = along;
    }
}

/// `(CE(s·sim) + CE(s·simᵀ)) / 2` (`[1]`) for the cosine similarities `sim` (`[n, n]`) of one
/// service pair, where `s = exp(min(t, t_max))` with `t = log_scale` (`[1]`) and CE is the mean
/// cross-entropy of the rows against the diagonal, on wgpu or CUDA, plain or under `Autodiff`
/// (both inputs tracked); `Err` with the inputs back anywhere else.
#[allow(clippy::type_complexity)]
pub fn infonce<B: Backend>(
    sim: Tensor<B, 2>,
    log_scale: Tensor<B, 1>,
    t_max: f32,
) -> Result<Tensor<B, 1>, (Tensor<B, 2>, Tensor<B, 1>)> {
    let [n, m] = sim.dims();
    assert_eq!(n, m, "infonce: {n}×{m} similarities are not square");
    if !all_f32(&[sim.dtype(), log_scale.dtype()]) || log_scale.dims() != [1] || n == 0 {
        return Err((sim, log_scale));
    }
    dispatch::<B, _>(InfoNce(sim, log_scale, t_max), true).map_err(|InfoNce(x, t, _)| (x, t))
}

struct InfoNce<B: Backend>(Tensor<B, 2>, Tensor<B, 1>, f32);

impl<B: Backend> OnCube for InfoNce<B> {
    type Output = Tensor<B, 1>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, 1> {
        let InfoNce(sim, log_scale, t_max) = self;
        if !tracked {
            let (sim, t) = (downcast(sim), downcast(log_scale));
            return upcast(run_forward::<R>(into_contiguous(sim), into_contiguous(t), t_max).0);
        }
        let inputs: [Tracked<R, BT>; 2] = [downcast(sim), downcast(log_scale)];
        upcast(record::<R, BT, _, 2>(
            InfoNceStep(t_max),
            inputs,
            |[sim, t]| {
                let (sim, t) = (into_contiguous(sim), into_contiguous(t));
                let (loss, lse) = run_forward(sim.clone(), t.clone(), t_max);
                (loss, (sim, t, lse))
            },
        ))
    }
}

/// The loss (`[1]`) and the `2n` log-sum-exps its backward step reads, from contiguous `sim`
/// and `log_scale`.
fn run_forward<R: CubeRuntime>(
    sim: CubeTensor<R>,
    log_scale: CubeTensor<R>,
    t_max: f32,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let n = sim.meta.shape().dims::<2>()[0];
    let (parts, lse) = (empty(&sim, [2 * n].into()), empty(&sim, [2 * n].into()));
    let (count, dim) = elementwise(&sim.client, 2 * n);
    // SAFETY: contiguous f32 buffers: `sim` of n², `log_scale` of one value, `parts` and `lse`
    // of 2n; unit k reads below n² and writes index k < 2n only.
    unsafe {
        infonce_forward::launch_unchecked::<R>(
            &sim.client.clone(),
            count,
            dim,
            sim.into_array_arg(),
            log_scale.into_array_arg(),
            parts.clone().into_array_arg(),
            lse.clone().into_array_arg(),
            n,
            t_max,
        );
    }
    (total(parts, false), lse)
}

/// The backward step of [`infonce`] under `Autodiff`: keeps the similarities, the log of the
/// scale and the log-sum-exps.
#[derive(Debug)]
struct InfoNceStep(f32);

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 2> for InfoNceStep {
    type State = (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        type C<R, BT> = CubeBackend<R, f32, i32, BT>;
        let [sim_node, t_node] = ops.parents;
        let grad = into_contiguous(grads.consume::<C<R, BT>>(&ops.node));
        let (sim, log_scale, lse) = ops.state;
        let n = sim.meta.shape().dims::<2>()[0];
        let (grad_sim, t_parts) = (empty(&sim, [n, n].into()), empty(&sim, [n].into()));
        let (count, dim) = elementwise(&sim.client, n);
        // SAFETY: contiguous f32 buffers: `sim` and `grad_sim` of n², `lse` of 2n, `log_scale`
        // and `grad` of one value, `t_parts` of n; unit i writes row i and `t_parts[i]` only.
        unsafe {
            infonce_backward::launch_unchecked::<R>(
                &sim.client.clone(),
                count,
                dim,
                sim.into_array_arg(),
                log_scale.into_array_arg(),
                lse.into_array_arg(),
                grad.into_array_arg(),
                grad_sim.clone().into_array_arg(),
                t_parts.clone().into_array_arg(),
                n,
                self.0,
            );
        }
        if let Some(node) = sim_node {
            grads.register::<C<R, BT>>(node.id, grad_sim);
        }
        if let Some(node) = t_node {
            grads.register::<C<R, BT>>(node.id, total(t_parts, false));
        }
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

    /// The loss of `[n, n]` similarities at log-scale `t`, by clue's kernels (`ours`) or by the
    /// CPU path's Burn operations, and its gradients with respect to both.
    fn loss_and_gradients<B: AutodiffBackend>(n: usize, t: f32, ours: bool) -> [Vec<f32>; 3] {
        let dev = Default::default();
        let values = (0..n * n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.5);
        let sim = Tensor::<B, 2>::from_data(TensorData::new(values.collect(), [n, n]), &dev)
            .require_grad();
        let log_scale = Tensor::<B, 1>::from_floats([t], &dev).require_grad();
        let t_max = 100f32.ln();
        let loss = match ours {
            true => infonce(sim.clone(), log_scale.clone(), t_max).expect("wgpu's"),
            false => {
                let s = log_scale.clone().clamp_max(t_max).exp().unsqueeze::<2>();
                let logits = sim.clone() * s;
                let targets = Tensor::<B, 1, Int>::arange(0..n as i64, &dev).reshape([n, 1]);
                let ce = |l: Tensor<B, 2>| log_softmax(l, 1).gather(1, targets.clone()).mean();
                (ce(logits.clone()) + ce(logits.transpose())).neg() / 2.0
            }
        };
        // A loss weight other than 1, so that the incoming gradient is read.
        let grads = (loss.clone() * 1.5).backward();
        let g_sim = sim.grad(&grads).expect("sim is tracked");
        let g_t = log_scale.grad(&grads).expect("t is tracked");
        [loss.into_data(), g_sim.into_data(), g_t.into_data()].map(|d| d.to_vec().unwrap())
    }

    /// On wgpu: the loss of a batch of two by hand, and the loss and both gradients against
    /// Burn's operations, below the clamp and above it (where `t` gets no gradient).
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn infonce_and_its_gradients_match_burns_on_wgpu() {
        let dev = Default::default();
        let sim = Tensor::<Wgpu, 2>::from_floats([[1.0, 0.0], [0.5, 1.0]], &dev);
        let t = Tensor::<Wgpu, 1>::from_floats([2f32.ln()], &dev);
        let loss: f32 = infonce(sim, t, 100f32.ln()).expect("wgpu's").into_scalar();
        // Logits [[2, 0], [1, 2]]: rows ln(1 + e⁻²), ln(1 + e⁻¹); columns ln(1 + e⁻¹), ln(1 + e⁻²).
        let want = ((-2f32).exp().ln_1p() + (-1f32).exp().ln_1p()) / 2.0;
        assert!((loss - want).abs() <= 1e-6, "{loss} vs {want}");

        // ln 100 itself: where the clamp after each step leaves a saturated scale.
        for (n, t) in [(5, 14.27f32.ln()), (37, 1.0), (6, 5.0), (4, 100f32.ln())] {
            let [l, g_sim, g_t] = loss_and_gradients::<Autodiff<Wgpu>>(n, t, true);
            let [burns_l, burns_sim, burns_t] = loss_and_gradients::<Autodiff<Wgpu>>(n, t, false);
            assert!(
                max_diff(&l, &burns_l) <= 1e-5,
                "n {n}: {l:?} vs {burns_l:?}"
            );
            // Relative to the largest: at s = 100 the gradients reach 10.
            let largest = burns_sim.iter().fold(1f32, |m, g| m.max(g.abs()));
            assert!(
                max_diff(&g_sim, &burns_sim) <= 1e-6 * largest,
                "n {n}: gradient {} of {largest}",
                max_diff(&g_sim, &burns_sim)
            );
            assert!(g_sim.iter().any(|g| g.abs() > 1e-3));
            assert!(
                max_diff(&g_t, &burns_t) <= 1e-5,
                "n {n}: {g_t:?} vs {burns_t:?}"
            );
            let clamped = t > 100f32.ln();
            assert_eq!(g_t[0] == 0.0, clamped, "n {n}: t's gradient {g_t:?}");
        }
        let sim = Tensor::<Wgpu, 2>::from_floats([[1.0, 0.0], [0.5, 1.0]], &dev);
        let t = Tensor::<Wgpu, 1>::from_floats([f32::NAN], &dev);
        let loss: f32 = infonce(sim, t, 100f32.ln()).expect("wgpu's").into_scalar();
        assert!(loss.is_nan(), "a NaN scale gives a NaN loss: {loss}");
    }
}
