//! clue's own GPU kernels, in CubeCL, for wgpu and CUDA in the default build (f32 tensors,
//! without Burn's fusion), as [`crate::model::flex`] holds clue's own kernels for the CPU.
//! Each replaces a run of Burn's element-wise operations by one kernel: fewer kernels to compile
//! before a GPU run's first step (CubeCL compiles one per operation, layout and work-group
//! size), and fewer launches in every step.
//!
//! - **AdamW** ([`adamw`]): the whole update of a parameter (weight and both moments) in one
//!   kernel, for [`crate::train::adamw::ClueAdamW`].
//! - **Gradient clipping** ([`sum_of_squares`], [`norm_and_clip_factor`], [`scale`]): the
//!   global norm's sums of squares, the clipping factor and the products by it, for
//!   `crate::train::clip`.
//! - **Linear layers** ([`linear()`]): the bias added in place to Burn's product, and its
//!   gradient by the clipping's column sums.
//! - **GELU** ([`gelu()`]): the exact GELU in one kernel, and its backward step in another.
//! - **ReLU and a clamp from above** ([`relu()`], [`clamp_max`]): one kernel, forward and
//!   backward, for the projection head and the logit scale's clamp after each step.
//! - **Dropout** ([`dropout()`]): one kernel, forward and backward, its mask drawn from a key.
//! - **The attention's weights** ([`masked_softmax`]): the scores scaled, the padding keys
//!   masked and the softmax over each row in one kernel, and its backward step in another.
//! - **Layer norm** ([`layer_norm`]): in one kernel, and its backward step in another (with
//!   the clipping's column sums for γ and β).
//! - **The pooled mean** ([`masked_mean`]): each sequence's mean over its positions that are
//!   not padding, one kernel each way.
//! - **The contrastive loss** ([`l2_normalize`], [`infonce`]): the L2 normalisation, one
//!   kernel each way; and a service pair's symmetric InfoNCE from its similarities and the log
//!   of the logit scale (the clamp, the scale, both cross-entropies, the scale's gradient), one
//!   kernel each way with the clipping's sums.
//!
//! Each recognises the tensors of the two runtimes by their primitive's type (plain, and for
//! the model's operations under `Autodiff`, where they record their own backward steps), so
//! the model stays generic over `B: Backend`; other backends, float types and Burn's fusion get
//! their input back.

use std::any::{Any, TypeId};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::backend::BackendTypes;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use cubecl::prelude::{ComputeClient, CubeCount, CubeDim};

pub(crate) mod adamw;
mod clip;
mod dropout;
mod gelu;
mod infonce;
mod linear;
mod norm;
mod normalize;
mod pool;
mod softmax;
mod threshold;

pub use clip::{norm_and_clip_factor, scale, sum_of_squares};
pub use dropout::dropout;
pub use gelu::gelu;
pub use infonce::infonce;
pub use linear::linear;
pub use norm::layer_norm;
pub use normalize::l2_normalize;
pub use pool::masked_mean;
pub use softmax::masked_softmax;
pub use threshold::{clamp_max, relu};

use crate::model::flex::from_any;

/// The wgpu backend's tensors (`burn::backend::Wgpu` without fusion).
#[cfg(feature = "wgpu")]
type Wgpu = CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
/// The CUDA backend's f32 tensors (`burn::backend::Cuda` without fusion).
#[cfg(feature = "cuda")]
type Cuda = CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// A computation on the tensors of one CubeCL backend, run by [`dispatch`]: `tracked` says
/// whether they are the backend's own (`false`) or under `Autodiff` (`true`).
trait OnCube {
    type Output;
    fn on<R: CubeRuntime, BT: BoolElement>(self, tracked: bool) -> Self::Output;
}

/// `task` run on wgpu or CUDA where `B` is one of them (checked by the type of `B`'s float
/// tensors, so Burn's fusion does not count); `Err(task)` anywhere else. `B` may be the
/// backend itself or, with `autodiff_too`, the backend under `Autodiff`.
fn dispatch<B: Backend, T: OnCube>(task: T, autodiff_too: bool) -> Result<T::Output, T> {
    let id = TypeId::of::<B::FloatTensorPrimitive>();
    // Some(tracked) where `B` is the backend of these primitives, plain or under autodiff.
    let of = |plain: TypeId, autodiff: TypeId| {
        if id == plain {
            Some(false)
        } else if autodiff_too && id == autodiff {
            Some(true)
        } else {
            None
        }
    };
    #[cfg(feature = "wgpu")]
    if let Some(tracked) = of(primitive::<Wgpu>(), primitive::<Autodiff<Wgpu>>()) {
        return Ok(task.on::<cubecl::wgpu::WgpuRuntime, u32>(tracked));
    }
    #[cfg(feature = "cuda")]
    if let Some(tracked) = of(primitive::<Cuda>(), primitive::<Autodiff<Cuda>>()) {
        return Ok(task.on::<cubecl::cuda::CudaRuntime, u8>(tracked));
    }
    Err(task)
}

fn primitive<C: BackendTypes>() -> TypeId {
    TypeId::of::<C::FloatTensorPrimitive>()
}

/// A CubeCL backend's f32 tensors under `Autodiff`.
type Tracked<R, BT> =
    <Autodiff<CubeBackend<R, f32, i32, BT>> as BackendTypes>::FloatTensorPrimitive;

/// `forward(inputs)` under `Autodiff`, recorded with `step` as its backward step: `forward`
/// gives the output and the state `step` keeps (dropped where no input is tracked).
fn record<R, BT, S, const N: usize>(
    step: S,
    inputs: [Tracked<R, BT>; N],
    forward: impl FnOnce([CubeTensor<R>; N]) -> (CubeTensor<R>, S::State),
) -> Tracked<R, BT>
where
    R: CubeRuntime,
    BT: BoolElement,
    S: Backward<CubeBackend<R, f32, i32, BT>, N>,
{
    let nodes = inputs.each_ref().map(|x| x.node.clone());
    let inputs = inputs.map(|x| x.primitive);
    match step
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, state) = forward(inputs);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(inputs).0),
    }
}

/// `pad`'s primitive on a CubeCL backend, plain or under `Autodiff` (which keeps the inner
/// backend's bool tensors): its values as the backend stores booleans (u32 on wgpu, u8 on CUDA),
/// read by the kernels through [`is_set`] without a cast to floats (a kernel of its own).
fn bool_primitive<R: CubeRuntime, B: Backend>(pad: &Tensor<B, 2, Bool>) -> CubeTensor<R> {
    let any: Box<dyn Any> = Box::new(pad.clone().into_primitive());
    *any.downcast::<CubeTensor<R>>()
        .expect("the bool primitive of the dispatched backend")
}

mod flags {
    use cubecl::prelude::*;

    /// Whether the stored boolean `flags[i]` is true: its lowest bit, as Burn's cast of a
    /// bool tensor reads it.
    #[cube]
    pub fn is_set<P: Int>(flags: &Array<P>, i: usize) -> bool {
        (flags[i] & P::from_int(1)) != P::from_int(0)
    }
}
use flags::is_set;

/// Whether every tensor is f32.
fn all_f32(dtypes: &[DType]) -> bool {
    dtypes.iter().all(|d| *d == DType::F32)
}

/// `x`'s primitive as `T` (the caller has checked the type through [`dispatch`]).
fn downcast<T: 'static, B: Backend, const D: usize>(x: Tensor<B, D>) -> T {
    let any: Box<dyn Any> = Box::new(x.into_primitive().tensor());
    *any.downcast::<T>()
        .expect("a primitive of the dispatched type")
}

/// The tensor of `B` whose primitive is `x`.
fn upcast<T: 'static, B: Backend, const D: usize>(x: T) -> Tensor<B, D> {
    from_any(Box::new(x))
}

/// A tensor size that gets the device's largest element-wise cube.
const LARGE: usize = 1 << 20;

/// The launch of an element-wise kernel over `n` elements: one cube size for every `n`, the
/// device's own for large tensors (CubeCL compiles a kernel per cube size, and would pick
/// smaller ones for biases and the logit scale).
fn elementwise<R: CubeRuntime>(client: &ComputeClient<R>, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, LARGE);
    (cubecl::calculate_cube_count_elemwise(client, n, dim), dim)
}

/// The launch of a kernel with one unit per row of `x` (rows of `width` values).
fn per_row<R: CubeRuntime>(x: &CubeTensor<R>, width: usize) -> (CubeCount, CubeDim) {
    elementwise(&x.client, x.meta.shape().num_elements() / width.max(1))
}

/// `x` contiguous in a buffer nothing else holds, for a kernel to write in place: `x` itself
/// where it is (as a fresh result or a gradient taken out of the optimizer's map is), a copy
/// where another tensor shares its buffer. The buffer may be longer than `x` (a `[1]`
/// reduction's is).
fn owned<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let x = burn_cubecl::kernel::into_contiguous(x);
    match x.can_mut() {
        true => x,
        false => x.copy(),
    }
}

/// A new contiguous f32 tensor of `like`'s shape, on its device.
fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>) -> CubeTensor<R> {
    empty(like, like.meta.shape().clone())
}

/// A new contiguous f32 tensor of `shape`, on `like`'s device.
fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape) -> CubeTensor<R> {
    burn_cubecl::ops::numeric::empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        shape,
        DType::F32,
    )
}
