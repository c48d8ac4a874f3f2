//! The exact GELU on Flex. Flex evaluates `erf` with one scalar libm call per element on one
//! thread: a quarter of an inference pass and a tenth of a training step on the `tiny` preset.
//! Here the exact GELU `x·Φ(x)` and its derivative `Φ(x) + x·φ(x)` run vectorised (AVX-512 or
//! AVX2 + FMA where the CPU has them) and on all cores, in the input's own buffer when nothing
//! else holds it, with the erf approximation PyTorch's vectorised CPU kernel uses
//! (Abramowitz–Stegun 7.1.26: |erf error| ≤ 1.5·10⁻⁷, so |GELU error| ≤ ~10⁻⁷·max(1, |x|)).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::prelude::*;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::simd::{dispatch, exp_neg, madd};
use super::{CHUNK, FlexAutodiffTensor, f32s, on_flex, tensor};

/// `x·Φ(x)` with Φ the standard normal CDF (PyTorch's `gelu`, `approximate="none"`).
/// `Err(x)`, the input back, when `x` is not an f32 tensor of Flex or `Autodiff<Flex>`: the
/// caller takes the generic path.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<Tensor<B, D>, Tensor<B, D>> {
    on_flex(x, flex_gelu, autodiff_flex_gelu)
}

/// The backward step of [`gelu`] under `Autodiff<Flex>`: keeps the input.
#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state.to_contiguous();
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let xs = f32s(&x);
            // grad · gelu'(x), in the gradient's own buffer when nothing else holds it.
            in_place(grad, |start, g| {
                gelu_grad_slice(&xs[start..start + g.len()], g)
            })
        });
    }
}

fn autodiff_flex_gelu(x: FlexAutodiffTensor) -> FlexAutodiffTensor {
    match GeluBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = flex_gelu(x.primitive.clone());
            prep.finish(x.primitive, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_gelu(x.primitive)),
    }
}

fn flex_gelu(x: FlexTensor) -> FlexTensor {
    in_place(x, |_, values| gelu_slice(values))
}

/// Applies `f(start, values)` to every [`CHUNK`] of `x`'s values in parallel, in `x`'s own
/// buffer when nothing else holds it (in inference, a layer's output is used once), else in a
/// copy.
fn in_place(x: FlexTensor, f: impl Fn(usize, &mut [f32]) + Sync) -> FlexTensor {
    // `to_contiguous` gives a clone of a contiguous tensor: drop the original first.
    let mut x = {
        let x = x;
        x.to_contiguous()
    };
    let run = |values: &mut [f32]| {
        values
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| f(i * CHUNK, chunk))
    };
    if let Some(values) = x.try_storage_mut::<f32>() {
        run(values);
        return x;
    }
    let mut values = f32s(&x).to_vec();
    run(&mut values);
    tensor(values, x.shape())
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `(Φ(−|x|), φ(x))`: the standard normal distribution's tail beyond `|x|`, and its density.
#[inline(always)]
fn normal_tail_pdf<const FMA: bool>(x: f32) -> (f32, f32) {
    // erfc(z) ≈ t·P(t)·e^(−z²), t = 1/(1 + p·z), z = |x|/√2 (A&S 7.1.26).
    let z = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / madd::<FMA>(0.327_591_1, z, 1.0);
    let poly = [-1.453_152, 1.421_413_7, -0.284_496_74, 0.254_829_6]
        .iter()
        .fold(1.061_405_4, |acc, &c| madd::<FMA>(acc, t, c))
        * t;
    let e = exp_neg::<FMA>(z * z);
    (0.5 * poly * e, e * FRAC_1_SQRT_2PI)
}

/// `x ← gelu(x)`.
#[inline(always)]
fn gelu_kernel<const FMA: bool>(xs: &mut [f32]) {
    for x in xs {
        // x·Φ(x) = x − x·Φ(−x) for x ≥ 0: one rounding fewer than x·(1 − Φ(−x)).
        let tail = normal_tail_pdf::<FMA>(*x).0;
        *x = if *x >= 0.0 {
            madd::<FMA>(-*x, tail, *x)
        } else {
            *x * tail
        };
    }
}

/// `g ← g · gelu'(x)`.
#[inline(always)]
fn gelu_grad_kernel<const FMA: bool>(xs: &[f32], gs: &mut [f32]) {
    for (g, &x) in gs.iter_mut().zip(xs) {
        let (tail, pdf) = normal_tail_pdf::<FMA>(x);
        let cdf = if x >= 0.0 { 1.0 - tail } else { tail };
        *g *= madd::<FMA>(x, pdf, cdf);
    }
}

dispatch!(pub(super) gelu_slice, gelu_slice_avx2, gelu_slice_avx512, gelu_kernel, (xs: &mut [f32]));
dispatch!(gelu_grad_slice, gelu_grad_slice_avx2, gelu_grad_slice_avx512, gelu_grad_kernel, (xs: &[f32], gs: &mut [f32]));

#[cfg(test)]
mod tests {
    use super::super::simd::{builds, run_build};
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::activation;

    /// −10 … 10 in steps of 1/512, plus the extremes and a NaN.
    fn grid() -> Vec<f32> {
        let mut xs: Vec<f32> = (-5120..=5120).map(|i| i as f32 / 512.0).collect();
        xs.extend([-1e30, -100.0, 100.0, 1e30, 1e-30, -1e-30]);
        xs
    }

    #[test]
    fn gelu_matches_burns_exact_gelu_and_its_derivative() {
        let xs = grid();
        let n = xs.len();
        let (dev, flex) = (Default::default(), Default::default());
        // Reference: Burn's NdArray gelu (libm erf).
        let reference = Tensor::<NdArray, 1>::from_data(TensorData::new(xs.clone(), [n]), &dev);
        let want: Vec<f32> = activation::gelu(reference)
            .to_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        let x = Tensor::<Flex, 1>::from_data(TensorData::new(xs.clone(), [n]), &flex);
        let got: Vec<f32> = gelu(x).expect("a Flex input").to_data().to_vec().unwrap();
        // The kernel the CPU runs, and every build of it this CPU has.
        let mut outputs = vec![got];
        for build in builds() {
            let mut ys = xs.clone();
            run_build!(
                build,
                gelu_kernel,
                gelu_slice_avx2,
                gelu_slice_avx512,
                (&mut ys)
            );
            outputs.push(ys);
        }
        for got in outputs {
            for ((&x, &w), &g) in xs.iter().zip(&want).zip(&got) {
                let err = (g as f64 - w as f64).abs();
                assert!(
                    err <= 2e-7 * x.abs().max(1.0) as f64,
                    "gelu({x}) = {g}, want {w}"
                );
            }
        }
        // Derivative through Autodiff<Flex>: d/dx Σ gelu(x) = Φ(x) + x·φ(x).
        let x = Tensor::<Autodiff<Flex>, 1>::from_data(TensorData::new(xs.clone(), [n]), &flex)
            .require_grad();
        let grads = gelu(x.clone())
            .expect("an Autodiff<Flex> input")
            .sum()
            .backward();
        let got: Vec<f32> = x.grad(&grads).unwrap().to_data().to_vec().unwrap();
        let mut outputs = vec![got];
        for build in builds() {
            let mut gs = vec![1.0; n];
            run_build!(
                build,
                gelu_grad_kernel,
                gelu_grad_slice_avx2,
                gelu_grad_slice_avx512,
                (&xs, &mut gs)
            );
            outputs.push(gs);
        }
        for (&x, &g) in outputs.iter().flat_map(|got| xs.iter().zip(got)) {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + libm_erf(x / 2f64.sqrt()));
            let want = cdf + x * (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let want = if x.abs() > 50.0 { cdf } else { want };
            assert!(
                (g as f64 - want).abs() <= 3e-7,
                "gelu'({x}) = {g}, want {want}"
            );
        }
        let nan = Tensor::<Flex, 1>::from_data(TensorData::new(vec![f32::NAN], [1]), &flex);
        let nan: Vec<f32> = gelu(nan).expect("a Flex input").to_data().to_vec().unwrap();
        assert!(nan[0].is_nan(), "NaN stays NaN");
    }

    /// erf through Burn's NdArray backend (libm).
    fn libm_erf(x: f64) -> f64 {
        let x = TensorData::new(vec![x as f32], [1]);
        Tensor::<NdArray, 1>::from_data(x, &Default::default())
            .erf()
            .into_scalar()
            .elem::<f64>()
    }

    #[test]
    fn other_backends_and_views_give_the_same_values() {
        let (dev, flex) = (Default::default(), Default::default());
        let data: Vec<f32> = (0..6 * 7).map(|i| (i as f32 - 20.0) / 7.0).collect();
        let nd = Tensor::<NdArray, 2>::from_data(TensorData::new(data.clone(), [6, 7]), &dev);
        let fx = Tensor::<Flex, 2>::from_data(TensorData::new(data, [6, 7]), &flex);
        // Burn's own gelu on NdArray against the fast path on Flex; a transposed view goes
        // through the copy to contiguous memory.
        let a: Vec<f32> = activation::gelu(nd.transpose())
            .to_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        let b: Vec<f32> = gelu(fx.transpose())
            .expect("a Flex input")
            .to_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn gelu_leaves_a_shared_input_alone() {
        let flex = Default::default();
        let data: Vec<f32> = (0..100).map(|i| i as f32 / 10.0 - 5.0).collect();
        let x = Tensor::<Flex, 1>::from_data(TensorData::new(data.clone(), [100]), &flex);
        let y = gelu(x.clone()).expect("a Flex input");
        assert_eq!(x.to_data().to_vec::<f32>().unwrap(), data, "input kept");
        let alone = gelu(x)
            .expect("a Flex input")
            .to_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(y.to_data().to_vec::<f32>().unwrap(), alone, "same values");
    }
}
