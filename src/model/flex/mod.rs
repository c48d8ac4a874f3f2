//! Fast paths for Burn's Flex CPU backend, where the generic operations are slowest:
//!
//! - **GELU** ([`gelu()`]): the exact GELU and its derivative, vectorised and on all cores
//!   (Flex calls a scalar libm `erf` per element on one thread).
//! - **Linear layers** ([`linear()`]): `x·W + b` as one product added to rows that start as the
//!   bias, and a backward step that writes the gradients straight from their products; on
//!   AVX-512, small weights are packed once for clue's own product kernel (`panels`).
//! - **Whole Transformer layers in inference** ([`layer()`]): every step of a pre-norm layer
//!   per block of sequences, in cache; the residual connections as products onto rows that
//!   start as `x + b`.
//! - **Layer norms in inference** ([`layer_norm()`], [`pooled()`]): each row written once, in
//!   parallel, and the pooled mean of a layer-normed output without its mask and copies.
//! - **Attention** ([`attention()`]): per sequence and head, all in cache, without the
//!   `[n, heads, len, len]` tensors or the head split and merge of the generic path.
//! - **Sparse products** ([`sparse_times()`]): a fixed sparse matrix times a dense one in
//!   compressed rows (LightGCN's propagation), instead of a gather and a scatter-add.
//!
//! Each lives in its own module with its kernels and its backward step; the pieces the attention
//! and GELU kernels share (the FMA multiply-add, a vectorisable `e^(−a)`, the dispatch to their
//! AVX-512, AVX2 + FMA and portable builds) are in `simd`.
//!
//! Each function recognises Flex tensors (plain, and under `Autodiff<Flex>`, where it records
//! its own backward step) by their primitive's type, so the model stays generic over
//! `B: Backend`; other backends (and float types other than f32) get their input back, and the
//! caller takes Burn's generic path. This file holds that recognition and the small helpers the
//! modules share.

use std::any::Any;

use burn::backend::Autodiff;
use burn::backend::flex::{Flex, FlexTensor};
use burn::prelude::*;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{DType, TensorData, TensorPrimitive};

mod attention;
mod gelu;
mod layer;
mod linear;
mod norm;
mod panels;
mod simd;
mod sparse;

pub use attention::attention;
pub use gelu::gelu;
pub use layer::{LayerParts, layer};
pub use linear::linear;
pub(crate) use linear::product;
#[cfg(test)]
pub(crate) use norm::tests::varied_norm;
pub use norm::{LAYER_NORM_EPSILON, layer_norm, pooled};
pub(crate) use panels::Start;
pub use sparse::{SparseMatrix, sparse_times};

/// `Autodiff<Flex>`'s float tensor (its type is not exported under a name).
type FlexAutodiffTensor = <Autodiff<Flex> as BackendTypes>::FloatTensorPrimitive;

/// Elements per parallel task.
const CHUNK: usize = 16 * 1024;

/// A float tensor of the Flex backend, plain or under `Autodiff<Flex>`.
enum FlexFloat {
    Plain(FlexTensor),
    Tracked(FlexAutodiffTensor),
}

/// `x`'s primitive when `x` is an f32 tensor of Flex or `Autodiff<Flex>`; `x` back otherwise.
fn to_flex<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> std::result::Result<FlexFloat, Tensor<B, D>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let any: Box<dyn Any> = Box::new(x.into_primitive().tensor());
    let any = match any.downcast::<FlexTensor>() {
        Ok(t) => return Ok(FlexFloat::Plain(*t)),
        Err(any) => any,
    };
    let any = match any.downcast::<FlexAutodiffTensor>() {
        Ok(t) => return Ok(FlexFloat::Tracked(*t)),
        Err(any) => any,
    };
    Err(from_any(any))
}

/// The tensor of backend `B` whose primitive `any` holds.
pub(crate) fn from_any<B: Backend, const D: usize>(any: Box<dyn Any>) -> Tensor<B, D> {
    let primitive = *any
        .downcast::<B::FloatTensorPrimitive>()
        .expect("a primitive of the backend's own type");
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// The inverse of [`to_flex`].
fn from_flex<B: Backend, const D: usize>(x: FlexFloat) -> Tensor<B, D> {
    match x {
        FlexFloat::Plain(t) => from_any(Box::new(t)),
        FlexFloat::Tracked(t) => from_any(Box::new(t)),
    }
}

/// Applies `plain` to a Flex tensor or `tracked` to an `Autodiff<Flex>` one (f32 only); gives
/// the tensor back unchanged (`Err`) on any other backend.
fn on_flex<B: Backend, const D: usize, const E: usize>(
    x: Tensor<B, D>,
    plain: impl FnOnce(FlexTensor) -> FlexTensor,
    tracked: impl FnOnce(FlexAutodiffTensor) -> FlexAutodiffTensor,
) -> std::result::Result<Tensor<B, E>, Tensor<B, D>> {
    Ok(from_flex(match to_flex(x)? {
        FlexFloat::Plain(t) => FlexFloat::Plain(plain(t)),
        FlexFloat::Tracked(t) => FlexFloat::Tracked(tracked(t)),
    }))
}

fn f32s(x: &FlexTensor) -> &[f32] {
    x.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::nn::LinearConfig;

    /// Other backends, and linear layers without a bias, get their input back (`Err`) for the
    /// caller's generic path.
    #[test]
    fn other_backends_get_their_input_back() {
        let dev = Default::default();
        let data = TensorData::new(vec![1f32, -2.0, 3.0, -4.0, 5.0, -6.0], [2, 3]);
        let x = Tensor::<NdArray, 2>::from_data(data.clone(), &dev);
        let back = gelu(x.clone()).expect_err("NdArray takes the generic path");
        assert_eq!(back.into_data(), x.to_data());
        let layer = LinearConfig::new(3, 2).init::<NdArray>(&dev);
        let back = linear(&layer, x.clone()).expect_err("NdArray takes the generic path");
        assert_eq!(back.into_data(), x.into_data());
        let flex = Default::default();
        let x = Tensor::<Flex, 2>::from_data(data, &flex);
        let no_bias = LinearConfig::new(3, 2).with_bias(false).init::<Flex>(&flex);
        let back = linear(&no_bias, x.clone()).expect_err("no bias: the generic path");
        assert_eq!(back.into_data(), x.into_data());
    }
}
