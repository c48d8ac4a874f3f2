//! Fast paths for Burn's Flex CPU backend, where the generic operations are slowest.
//!
//! - **GELU.** Flex evaluates `erf` with one scalar libm call per element on one thread: a
//!   quarter of an inference pass and a tenth of a training step on the `tiny` preset. Here the
//!   exact GELU `x·Φ(x)` and its derivative `Φ(x) + x·φ(x)` run vectorised (AVX2 where the CPU
//!   has it) and on all cores, with the erf approximation PyTorch's vectorised CPU kernel uses
//!   (Abramowitz–Stegun 7.1.26: |erf error| ≤ 1.5·10⁻⁷, so |GELU error| ≤ ~10⁻⁷·max(1, |x|)).
//! - **Head split and merge.** Swapping the two middle axes of `[n, len, heads, d_head]` is a
//!   view in Burn, but the reshape after it (in the backward pass too) makes Flex copy element by
//!   element. Here the swap is one copy of `d_head`-long rows, and its backward step the inverse.
//!
//! Each function recognises Flex tensors (plain, and under `Autodiff<Flex>`, where it records
//! its own backward step) by their primitive's type, so the model stays generic over
//! `B: Backend`; other backends (and float types other than f32) take Burn's generic path.

use std::any::Any;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::prelude::*;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{DType, TensorData, TensorMetadata, TensorPrimitive, activation};
use rayon::prelude::*;

/// `Autodiff<Flex>`'s float tensor (its type is not exported under a name).
type FlexAutodiffTensor = <Autodiff<Flex> as BackendTypes>::FloatTensorPrimitive;

/// Elements per parallel task.
const CHUNK: usize = 16 * 1024;

/// Applies `plain` to a Flex tensor or `tracked` to an `Autodiff<Flex>` one (f32 only); gives
/// the tensor back unchanged (`Err`) on any other backend.
fn on_flex<B: Backend, const D: usize, const E: usize>(
    x: Tensor<B, D>,
    plain: impl FnOnce(FlexTensor) -> FlexTensor,
    tracked: impl FnOnce(FlexAutodiffTensor) -> FlexAutodiffTensor,
) -> std::result::Result<Tensor<B, E>, Tensor<B, D>> {
    #[cfg(test)]
    if tests::GENERIC.get() {
        return Err(x);
    }
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let any: Box<dyn Any> = Box::new(x.into_primitive().tensor());
    let (any, done): (Box<dyn Any>, bool) = match any.downcast::<FlexTensor>() {
        Ok(t) => (Box::new(plain(*t)), true),
        Err(any) => match any.downcast::<FlexAutodiffTensor>() {
            Ok(t) => (Box::new(tracked(*t)), true),
            Err(any) => (any, false),
        },
    };
    let primitive = *any
        .downcast::<B::FloatTensorPrimitive>()
        .expect("a primitive of the same type");
    match done {
        true => Ok(Tensor::from_primitive(TensorPrimitive::Float(primitive))),
        false => Err(Tensor::from_primitive(TensorPrimitive::Float(primitive))),
    }
}

/// `x·Φ(x)` with Φ the standard normal CDF (PyTorch's `gelu`, `approximate="none"`).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    on_flex(x, flex_gelu, autodiff_flex_gelu).unwrap_or_else(activation::gelu)
}

/// `[a, b, c, e]` → `[a, c, b, e]` (`x.swap_dims(1, 2)`), contiguous on Flex.
pub fn swap_middle<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    on_flex(x, flex_swap_middle, autodiff_flex_swap_middle).unwrap_or_else(|x| x.swap_dims(1, 2))
}

/// The backward step of [`swap_middle`] under `Autodiff<Flex>`: swaps back.
#[derive(Debug)]
struct SwapMiddleBackward;

impl Backward<Flex, 1> for SwapMiddleBackward {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        unary::<Flex, _>(ops.parents, ops.node, grads, flex_swap_middle);
    }
}

fn autodiff_flex_swap_middle(x: FlexAutodiffTensor) -> FlexAutodiffTensor {
    match SwapMiddleBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((), flex_swap_middle(x.primitive)),
        OpsKind::UnTracked(prep) => prep.finish(flex_swap_middle(x.primitive)),
    }
}

fn flex_swap_middle(x: FlexTensor) -> FlexTensor {
    let dims: Vec<usize> = x.shape().iter().copied().collect();
    let &[a, b, c, e] = dims.as_slice() else {
        panic!("swap_middle: a 4-D tensor, got {dims:?}");
    };
    let x = x.to_contiguous();
    let src = x.as_slice::<f32>().expect("a contiguous f32 tensor");
    let mut out = vec![0f32; src.len()];
    if !out.is_empty() {
        // One task per index of the first axis: `c·b` rows of `e` values.
        out.par_chunks_mut(b * c * e)
            .zip(src.par_chunks(b * c * e))
            .for_each(|(out, src)| {
                for (j, row) in src.chunks_exact(e.max(1)).enumerate() {
                    let (jb, jc) = (j / c, j % c);
                    let at = (jc * b + jb) * e;
                    out[at..at + e].copy_from_slice(row);
                }
            });
    }
    FlexTensor::from_data(TensorData::new(out, [a, c, b, e]))
}

/// The backward step of [`gelu`] under `Autodiff<Flex>`: keeps the input.
#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            flex_map2(&x, &grad, gelu_grad_slice)
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
    let x = x.to_contiguous();
    let input = x.as_slice::<f32>().expect("a contiguous f32 tensor");
    let mut out = vec![0f32; input.len()];
    out.par_chunks_mut(CHUNK)
        .zip(input.par_chunks(CHUNK))
        .for_each(|(y, x)| gelu_slice(x, y));
    FlexTensor::from_data(TensorData::new(out, x.shape()))
}

/// `grad · gelu'(x)`, elementwise.
fn flex_map2(x: &FlexTensor, grad: &FlexTensor, f: fn(&[f32], &[f32], &mut [f32])) -> FlexTensor {
    let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
    let (xs, gs) = (
        x.as_slice::<f32>().expect("a contiguous f32 tensor"),
        grad.as_slice::<f32>().expect("a contiguous f32 gradient"),
    );
    assert_eq!(xs.len(), gs.len(), "gelu backward: shapes differ");
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| f(x, g, o));
    FlexTensor::from_data(TensorData::new(out, x.shape()))
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `(Φ(x), φ(x))`: the standard normal CDF and density.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    // erfc(z) ≈ t·P(t)·e^(−z²), t = 1/(1 + p·z), z = |x|/√2 (A&S 7.1.26).
    let z = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let e = exp_neg(z * z);
    let tail = 0.5 * poly * e; // Φ(−|x|)
    let cdf = if x >= 0.0 { 1.0 - tail } else { tail };
    (cdf, e * FRAC_1_SQRT_2PI)
}

/// `e^(−a)` for `a ≥ 0` (0 beyond `a = 87`), branch-free so loops over it vectorise: `2^k` from
/// the exponent bits times a degree-7 polynomial on the remainder (relative error < 10⁻⁷).
#[inline(always)]
fn exp_neg(a: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let v = -a.min(87.0);
    let shifted = v * std::f32::consts::LOG2_E + MAGIC;
    let k = shifted - MAGIC;
    // k as an integer, from the bits (a float-to-int cast would not vectorise).
    let k_int = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = v - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((k_int + 127) as u32) << 23)
}

#[inline(always)]
fn gelu_kernel(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * normal_cdf_pdf(x).0;
    }
}

#[inline(always)]
fn gelu_grad_kernel(x: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
        let (cdf, pdf) = normal_cdf_pdf(x);
        *o = g * (cdf + x * pdf);
    }
}

/// Compiles a kernel twice, plain and with AVX2, and picks at run time.
macro_rules! dispatch {
    ($name:ident, $avx2:ident, $kernel:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2($($arg: $ty),*) {
            $kernel($($arg),*)
        }

        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { $avx2($($arg),*) };
            }
            $kernel($($arg),*)
        }
    };
}

dispatch!(gelu_slice, gelu_slice_avx2, gelu_kernel, (x: &[f32], y: &mut [f32]));
dispatch!(gelu_grad_slice, gelu_grad_slice_avx2, gelu_grad_kernel, (x: &[f32], g: &[f32], out: &mut [f32]));

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Set: every function here takes Burn's generic path, for comparisons.
        pub(crate) static GENERIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    use burn::backend::NdArray;

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
        let got: Vec<f32> = gelu(x).to_data().to_vec().unwrap();
        for ((&x, &w), &g) in xs.iter().zip(&want).zip(&got) {
            let err = (g as f64 - w as f64).abs();
            assert!(
                err <= 2e-7 * x.abs().max(1.0) as f64,
                "gelu({x}) = {g}, want {w}"
            );
        }
        // Derivative through Autodiff<Flex>: d/dx Σ gelu(x) = Φ(x) + x·φ(x).
        let x = Tensor::<Autodiff<Flex>, 1>::from_data(TensorData::new(xs.clone(), [n]), &flex)
            .require_grad();
        let grads = gelu(x.clone()).sum().backward();
        let got: Vec<f32> = x.grad(&grads).unwrap().to_data().to_vec().unwrap();
        for (&x, &g) in xs.iter().zip(&got) {
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
        let nan: Vec<f32> = gelu(nan).to_data().to_vec().unwrap();
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
        // A transposed view goes through the copy to contiguous memory.
        let a: Vec<f32> = gelu(nd.transpose())
            .to_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        let b: Vec<f32> = gelu(fx.transpose())
            .to_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn exp_neg_is_accurate_and_vanishes_beyond_87() {
        for i in 0..=9000 {
            let a = i as f32 / 100.0;
            let want = (-(a as f64)).exp();
            let got = exp_neg(a) as f64;
            if a <= 87.0 {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "e^-{a} = {got}, want {want}"
                );
            } else {
                assert!(got < 1e-37, "e^-{a} = {got}");
            }
        }
    }
}
