//! The arithmetic of global gradient-norm clipping (`train::clip`) in kernels of clue's own: a
//! gradient's sum of squares (one kernel, launched ⌈log₁₀₂₄ n⌉ times for n values: partial sums,
//! then sums of those), the norm and the clipping factor from the total (one kernel), and a
//! gradient times the factor (one kernel, in place, whatever the gradient's rank). Burn's
//! operations take a square, a reduction and a broadcast product per gradient rank, and five
//! operations on the total.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime};
use cubecl::prelude::*;

use super::{OnCube, all_f32, dispatch, downcast, elementwise, empty, empty_like, owned, upcast};

/// Elements each unit sums in the first pass (strided across units, so the reads of
/// neighbouring units are neighbours).
const PER_UNIT: usize = 1024;

/// Rows each unit sums in the first pass of [`column_sums`].
const ROWS_PER_UNIT: usize = 64;

/// Unit `u` of `units`: the sum of `x[i]` (squared where `square` is 1) over `i = u + k·units`,
/// `k < per_unit`.
#[cube(launch_unchecked)]
fn strided_sums(x: &Array<f32>, out: &mut Array<f32>, units: usize, per_unit: usize, square: u32) {
    let u = ABSOLUTE_POS;
    if u < units {
        let mut sum = 0.0;
        for k in 0..per_unit {
            let i = u + k * units;
            if i < x.len() {
                let v = x[i];
                if square == 1 {
                    sum += v * v;
                } else {
                    sum += v;
                }
            }
        }
        out[u] = sum;
    }
}

/// From the total of the squares: the norm, and `min(1, max_norm / max(norm, 10⁻¹²))`.
#[cube(launch_unchecked)]
fn norm_and_factor(
    total: &Array<f32>,
    norm: &mut Array<f32>,
    factor: &mut Array<f32>,
    max_norm: f32,
) {
    if ABSOLUTE_POS == 0 {
        let n = total[0].sqrt();
        norm[0] = n;
        factor[0] = min(1.0, max_norm / max(n, 1.0e-12));
    }
}

/// `x[i] ·= factor[0]`.
#[cube(launch_unchecked)]
fn scale_by(x: &mut Array<f32>, factor: &Array<f32>) {
    let i = ABSOLUTE_POS;
    if i < x.len() {
        x[i] *= factor[0];
    }
}

/// `Σ g²` (`[1]`) on wgpu or CUDA (plain tensors); `Err(g)` elsewhere, or for an empty `g`.
pub fn sum_of_squares<B: Backend, const D: usize>(
    g: Tensor<B, D>,
) -> Result<Tensor<B, 1>, Tensor<B, D>> {
    if !all_f32(&[g.dtype()]) || g.shape().num_elements() == 0 {
        return Err(g);
    }
    dispatch::<B, _>(SumOfSquares(g), false).map_err(|SumOfSquares(g)| g)
}

struct SumOfSquares<B: Backend, const D: usize>(Tensor<B, D>);

impl<B: Backend, const D: usize> OnCube for SumOfSquares<B, D> {
    type Output = Tensor<B, 1>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, _: bool) -> Tensor<B, 1> {
        upcast(total(downcast::<CubeTensor<R>, B, D>(self.0), true))
    }
}

/// `Σ x` (`Σ x²` with `square`) of a non-empty `x`, as `[1]`: sums of up to [`PER_UNIT`]
/// values each, then of those sums, until one value is left (⌈log₁₀₂₄ n⌉ passes: two up to a
/// million values).
pub(super) fn total<R: CubeRuntime>(x: CubeTensor<R>, mut square: bool) -> CubeTensor<R> {
    let mut sums = into_contiguous(x);
    loop {
        let units = sums.meta.shape().num_elements().div_ceil(PER_UNIT);
        sums = strided(sums, units, square);
        square = false;
        if units == 1 {
            return sums;
        }
    }
}

/// The sums of the `columns` columns of `x` (read as rows of `columns` values, whatever its
/// shape): `[columns]`. Partial sums over blocks of [`ROWS_PER_UNIT`] rows first (one unit per
/// column and block), then their sums: one unit per column alone would sum every row in turn.
pub(super) fn column_sums<R: CubeRuntime>(x: CubeTensor<R>, columns: usize) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let blocks = (x.meta.shape().num_elements() / columns.max(1)).div_ceil(ROWS_PER_UNIT);
    match blocks > 1 {
        // Unit u sums rows u / columns + k·blocks of column u % columns.
        true => strided(strided(x, columns * blocks, false), columns, false),
        false => strided(x, columns, false),
    }
}

/// The `units` strided sums of contiguous `x` (of its squares with `square`).
fn strided<R: CubeRuntime>(x: CubeTensor<R>, units: usize, square: bool) -> CubeTensor<R> {
    let per_unit = x.meta.shape().num_elements().div_ceil(units);
    let out = empty(&x, [units].into());
    let (count, dim) = elementwise(&x.client, units);
    // SAFETY: contiguous f32 buffers, `out` of `units` values; unit `u` writes `out[u]` only
    // and reads `x` below its length.
    unsafe {
        strided_sums::launch_unchecked::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_array_arg(),
            out.clone().into_array_arg(),
            units,
            per_unit,
            u32::from(square),
        );
    }
    out
}

/// The norm `√total` and the clipping factor `min(1, max_norm / norm)` (each `[1]`, from
/// `total`: `[1]`) on wgpu or CUDA (plain tensors); `Err(total)` elsewhere.
#[allow(clippy::type_complexity)]
pub fn norm_and_clip_factor<B: Backend>(
    total: Tensor<B, 1>,
    max_norm: f64,
) -> Result<(Tensor<B, 1>, Tensor<B, 1>), Tensor<B, 1>> {
    if !all_f32(&[total.dtype()]) || total.dims() != [1] {
        return Err(total);
    }
    dispatch::<B, _>(ClipFactor(total, max_norm as f32), false).map_err(|ClipFactor(t, _)| t)
}

struct ClipFactor<B: Backend>(Tensor<B, 1>, f32);

impl<B: Backend> OnCube for ClipFactor<B> {
    type Output = (Tensor<B, 1>, Tensor<B, 1>);

    fn on<R: CubeRuntime, BT: BoolElement>(self, _: bool) -> Self::Output {
        let total = into_contiguous(downcast::<CubeTensor<R>, B, 1>(self.0));
        let (norm, factor) = (empty_like(&total), empty_like(&total));
        let (count, dim) = elementwise(&total.client, 1);
        // SAFETY: three contiguous f32 buffers of one value; one unit reads and writes them.
        unsafe {
            norm_and_factor::launch_unchecked::<R>(
                &total.client.clone(),
                count,
                dim,
                total.into_array_arg(),
                norm.clone().into_array_arg(),
                factor.clone().into_array_arg(),
                self.1,
            );
        }
        (upcast(norm), upcast(factor))
    }
}

/// `x · factor` (`factor`: `[1]`) on wgpu or CUDA (plain tensors); `Err(x)` elsewhere.
pub fn scale<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    factor: &Tensor<B, 1>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !all_f32(&[x.dtype(), factor.dtype()]) || factor.dims() != [1] {
        return Err(x);
    }
    dispatch::<B, _>(Scale(x, factor), false).map_err(|Scale(x, _)| x)
}

struct Scale<'a, B: Backend, const D: usize>(Tensor<B, D>, &'a Tensor<B, 1>);

impl<B: Backend, const D: usize> OnCube for Scale<'_, B, D> {
    type Output = Tensor<B, D>;

    fn on<R: CubeRuntime, BT: BoolElement>(self, _: bool) -> Tensor<B, D> {
        // In place, as Burn's product would be (a gradient taken out of the optimizer's map is
        // its buffer's only holder).
        let x = owned(downcast::<CubeTensor<R>, B, D>(self.0));
        let factor = downcast::<CubeTensor<R>, B, 1>(self.1.clone());
        let (count, dim) = elementwise(&x.client, x.meta.shape().num_elements());
        // SAFETY: `x` contiguous f32 in a buffer that nothing else holds (it may be longer than
        // `x`, as a `[1]` reduction's is), `factor` one value; the kernel touches index `i` only
        // below `x`'s length.
        unsafe {
            scale_by::launch_unchecked::<R>(
                &x.client.clone(),
                count,
                dim,
                x.clone().into_array_arg(),
                factor.into_array_arg(),
            );
        }
        upcast(x)
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::backend::Wgpu;
    use burn::tensor::{TensorData, TensorPrimitive};

    use super::*;
    use crate::testing::max_diff;

    fn value(x: Tensor<Wgpu, 1>) -> f32 {
        x.into_scalar()
    }

    /// On wgpu: sums of squares of one unit's worth, of several (two passes) and of over a
    /// million values (three passes) against Burn's, the norm and factor of a few totals, and a
    /// product by the factor.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn clipping_arithmetic_matches_burns_on_wgpu() {
        let dev = Default::default();
        for n in [3, PER_UNIT, 5 * PER_UNIT + 17, PER_UNIT * PER_UNIT + 5] {
            let v = (0..n).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>();
            let g = Tensor::<Wgpu, 2>::from_data(TensorData::new(v, [1, n]), &dev);
            let ours = value(sum_of_squares(g.clone()).expect("wgpu's f32 tensors"));
            let burns = value(g.square().sum());
            assert!(
                (ours - burns).abs() <= 1e-5 * burns,
                "n = {n}: {ours} vs {burns}"
            );
        }
        let empty = Tensor::<Wgpu, 2>::zeros([0, 4], &dev);
        assert!(
            sum_of_squares(empty).is_err(),
            "an empty gradient: Burn's path"
        );

        for (total, want_norm, want_factor) in [(4.0, 2.0, 0.5), (0.25, 0.5, 1.0), (0.0, 0.0, 1.0)]
        {
            let total = Tensor::<Wgpu, 1>::from_floats([total], &dev);
            let (norm, factor) = norm_and_clip_factor(total, 1.0).expect("wgpu's");
            let (norm, factor) = (value(norm), value(factor));
            assert!((norm - want_norm).abs() <= 1e-7 && (factor - want_factor).abs() <= 1e-7);
        }

        let x = Tensor::<Wgpu, 2>::from_floats([[1.0, -2.0], [3.0, 0.5]], &dev);
        let factor = Tensor::<Wgpu, 1>::from_floats([0.25], &dev);
        let y = scale(x.transpose(), &factor).expect("wgpu's");
        let y = y.into_data().to_vec::<f32>().unwrap();
        assert_eq!(
            y,
            [0.25, 0.75, -0.5, 0.125],
            "a transposed view, made contiguous"
        );
        let held = Tensor::<Wgpu, 1>::from_floats([1.0, 2.0], &dev);
        let y = scale(held.clone(), &factor).expect("wgpu's");
        assert_eq!(y.into_data().to_vec::<f32>().unwrap(), [0.25, 0.5]);
        let held = held.into_data().to_vec::<f32>().unwrap();
        assert_eq!(
            held,
            [1.0, 2.0],
            "a buffer another tensor holds is not written"
        );
    }

    /// On wgpu: the column sums of a few rows (one pass) and of many (partial sums over blocks
    /// of rows, then their sums) are Burn's, a transposed view's included.
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn column_sums_match_burns_on_wgpu() {
        let dev = Default::default();
        for (rows, columns) in [(3, 5), (ROWS_PER_UNIT * 15 + 9, 7), (2, 1)] {
            let v = (0..rows * columns).map(|i| (i as f32 * 0.61).sin());
            let x =
                Tensor::<Wgpu, 2>::from_data(TensorData::new(v.collect(), [rows, columns]), &dev);
            let burns = x.clone().sum_dim(0).into_data().to_vec::<f32>().unwrap();
            let ours = column_sums(x.into_primitive().tensor(), columns);
            let ours = Tensor::<Wgpu, 1>::from_primitive(TensorPrimitive::Float(ours));
            assert_eq!(ours.dims(), [columns]);
            let ours = ours.into_data().to_vec::<f32>().unwrap();
            assert!(
                max_diff(&ours, &burns) <= 1e-4,
                "{rows}×{columns}: {ours:?} vs {burns:?}"
            );
        }
        let x = Tensor::<Wgpu, 2>::from_floats([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev);
        let sums = column_sums(x.transpose().into_primitive().tensor(), 2);
        let sums = Tensor::<Wgpu, 1>::from_primitive(TensorPrimitive::Float(sums));
        assert_eq!(sums.into_data().to_vec::<f32>().unwrap(), [6.0, 15.0]);
    }
}
