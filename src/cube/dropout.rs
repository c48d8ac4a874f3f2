//! Inverted dropout in one kernel, which draws its mask from a 64-bit key and each element's
//! index instead of reading it: the forward pass and the backward step are the same kernel
//! (on the input, then on the output's gradient), nothing but the key is kept for the backward
//! step, and the masks are a function of the key, so a run that draws its keys from (seed,
//! step, call site), as `model::dropout` does, replays them when resumed. Burn's dropout takes a
//! random-number kernel, a product and a scaling forward, two operations backward, and keeps
//! the f32 mask (as large as the input) for the backward step.

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

/// A bijective mix of 32 bits ("lowbias32", C. Wellons' hash prospector).
#[cube]
fn mix(x: u32) -> u32 {
    let x = (x ^ (x >> 16u32)) * 0x7feb_352du32;
    let x = (x ^ (x >> 15u32)) * 0x846c_a68bu32;
    x ^ (x >> 16u32)
}

/// `x[i] · scale` where element `i` is kept, 0 where the 16 bits drawn for it from the key
/// (`key_lo`, `key_hi`) fall below `threshold` (dropped with probability threshold / 2¹⁶).
#[cube(launch_unchecked)]
fn dropout_apply(
    x: &Array<f32>,
    out: &mut Array<f32>,
    key_lo: u32,
    key_hi: u32,
    threshold: u32,
    scale: f32,
) {
    let i = ABSOLUTE_POS;
    if i < x.len() {
        let bits = mix(mix(u32::cast_from(i) ^ key_lo) ^ key_hi);
        let mut v = 0.0;
        if (bits >> 16) >= threshold {
            v = x[i] * scale;
        }
        out[i] = v;
    }
}

/// The mask of one dropout call: its key, and what the kernel makes of the rate.
#[derive(Debug, Clone, Copy)]
struct Mask {
    key: u64,
    threshold: u32,
    scale: f32,
}

impl Mask {
    fn new(p: f64, key: u64) -> Self {
        Self {
            key,
            threshold: (p * 65536.0).round() as u32,
            scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    /// `x` with this mask applied (the input forward, the output's gradient backward).
    fn apply<R: CubeRuntime>(self, x: CubeTensor<R>) -> CubeTensor<R> {
        let x = into_contiguous(x);
        let out = empty_like(&x);
        let (count, dim) = elementwise(&x.client, x.meta.shape().num_elements());
        // SAFETY: both arrays are contiguous f32 buffers of the same length; the kernel touches
        // index `i` only below it.
        unsafe {
            dropout_apply::launch_unchecked::<R>(
                &x.client.clone(),
                count,
                dim,
                x.into_array_arg(),
                out.clone().into_array_arg(),
                self.key as u32,
                (self.key >> 32) as u32,
                self.threshold,
                self.scale,
            );
        }
        out
    }
}

/// `x` with each element dropped with probability `p` (in steps of 2⁻¹⁶) and the rest scaled
/// by 1/(1 − p), the mask drawn from `key` (the same key, the same mask), on wgpu or CUDA
/// (plain, or under `Autodiff` with its own backward step); `Err(x)` anywhere else.
pub fn dropout<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    p: f64,
    key: u64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !all_f32(&[x.dtype()]) || !(0.0..1.0).contains(&p) {
        return Err(x);
    }
    dispatch::<B, _>(Dropout(x, Mask::new(p, key)), true).map_err(|Dropout(x, _)| x)
}

struct Dropout<B: Backend, const D: usize>(Tensor<B, D>, Mask);

impl<B: Backend, const D: usize> OnCube for Dropout<B, D> {
    type Output = Tensor<B, D>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Tensor<B, D> {
        let Self(x, mask) = self;
        match tracked {
            false => upcast(mask.apply(downcast::<CubeTensor<R>, B, D>(x))),
            true => upcast(record::<R, BT, _, 1>(
                DropoutStep(mask),
                [downcast(x)],
                |[x]| (mask.apply(x), ()),
            )),
        }
    }
}

/// The backward step of [`dropout`] under `Autodiff`: the same mask on the gradient.
#[derive(Debug)]
struct DropoutStep(Mask);

impl<R: CubeRuntime, BT: BoolElement> Backward<CubeBackend<R, f32, i32, BT>, 1> for DropoutStep {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        unary::<CubeBackend<R, f32, i32, BT>, _>(ops.parents, ops.node, grads, |grad| {
            self.0.apply(grad)
        });
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::TensorData;

    use super::*;
    use crate::testing::max_diff;

    const N: usize = 20_000;

    fn values<B: Backend>(x: Tensor<B, 2>) -> Vec<f32> {
        x.into_data().to_vec().unwrap()
    }

    /// On wgpu the kernel drops about `p` of the elements and scales the rest by 1/(1 − p);
    /// its mask is a function of the key; under autodiff the gradient takes the same mask.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn dropout_masks_follow_the_key_and_the_gradient_on_wgpu() {
        let dev = Default::default();
        let ones = Tensor::<Wgpu, 2>::ones([100, N / 100], &dev);
        let a = values(dropout(ones.clone(), 0.25, 7).expect("wgpu's f32 tensors"));
        let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / N as f64;
        assert!((dropped - 0.25).abs() < 0.015, "dropped {dropped}");
        assert!(a.iter().all(|v| *v == 0.0 || *v == 1.0 / 0.75), "scaled");
        // Neighbours are independent: pairs both dropped ≈ p².
        let both = (0..N / 2).filter(|i| a[2 * i] == 0.0 && a[2 * i + 1] == 0.0);
        let both = both.count() as f64 / (N / 2) as f64;
        assert!((both - 0.0625).abs() < 0.015, "both {both}");
        assert_eq!(
            values(dropout(ones.clone(), 0.25, 7).unwrap()),
            a,
            "same key"
        );
        for (key, half) in [(7 | 1 << 32, "upper"), (7 ^ 1, "lower")] {
            let other = values(dropout(ones.clone(), 0.25, key).unwrap());
            assert!(other != a, "another key in its {half} half");
        }
        assert!(
            values(dropout(ones, 0.0, 7).unwrap())
                .iter()
                .all(|v| *v == 1.0),
            "p = 0 keeps every element as it is"
        );

        // Under autodiff: the same output, and the gradient of Σ w·y is w·y(ones).
        let x = (0..N).map(|i| (i as f32 * 0.1).sin()).collect::<Vec<_>>();
        let w = (0..N).map(|i| (i as f32 * 0.3).cos()).collect::<Vec<_>>();
        let tensor = |v: &[f32]| TensorData::new(v.to_vec(), [100, N / 100]);
        let x_t = Tensor::<Autodiff<Wgpu>, 2>::from_data(tensor(&x), &dev).require_grad();
        let w_t = Tensor::<Autodiff<Wgpu>, 2>::from_data(tensor(&w), &dev);
        let y = dropout(x_t.clone(), 0.25, 7).expect("autodiff tensors take it too");
        let grads = (y.clone() * w_t).sum().backward();
        let g = values(x_t.grad(&grads).expect("x is tracked"));
        let masked = |v: &[f32]| v.iter().zip(&a).map(|(v, a)| v * a).collect::<Vec<_>>();
        let (dy, dg) = (max_diff(&values(y), &masked(&x)), max_diff(&g, &masked(&w)));
        assert!(dy <= 1e-6 && dg <= 1e-6, "y: {dy}, gradient: {dg}");
    }
}
