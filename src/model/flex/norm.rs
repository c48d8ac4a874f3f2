//! Layer norms in inference on Flex. Flex's own layer norm zero-fills its output on one thread
//! before its parallel pass, and the masked mean that pools a layer-normed encoder output took
//! a mask, a copy and a sum (together a tenth of a `tiny` inference call on 2 cores). Here a
//! layer norm writes each row once, in parallel; the pooled mean normalises each kept row in
//! cache and adds it up; and the fused layer ([`super::layer()`]) normalises its rows itself.
//! Plain Flex only: under autodiff the generic path runs.

use std::mem::MaybeUninit;

use burn::backend::flex::FlexTensor;
use burn::nn::LayerNorm;
use burn::prelude::*;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::linear::plain;
use super::simd::madd;
use super::{CHUNK, FlexFloat, f32s, from_flex, tensor};
use crate::cpu::VectorPath;

/// The ε of every layer norm of clue's models (Burn's default; `LayerNorm` keeps its own
/// private, so the fast paths take it from here, and `Init::layer_norm` sets it).
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

/// A layer norm's γ and β (`d` values each), as slices (ε is [`LAYER_NORM_EPSILON`]).
#[derive(Clone, Copy)]
pub(super) struct Norm<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
}

impl Norm<'_> {
    pub(super) fn d(&self) -> usize {
        self.gamma.len()
    }

    /// Normalises the rows of `x` (`d` values each) into `out`, writing all its values.
    pub(super) fn rows(&self, x: &[f32], out: &mut [MaybeUninit<f32>]) {
        assert_eq!(x.len(), out.len(), "layer norm: output of another size");
        // Whole rows only: the kernels write every value of those.
        assert!(
            x.is_empty() || (self.d() > 0 && x.len().is_multiple_of(self.d())),
            "layer norm: {} values are not rows of {}",
            x.len(),
            self.d()
        );
        normalise(x, self.gamma, self.beta, out);
    }
}

/// A plain Flex layer norm's γ and β, contiguous.
pub(super) struct NormParams([FlexTensor; 2]);

impl NormParams {
    /// `None` when `norm` is not a plain Flex module with a β.
    pub(super) fn of<B: Backend>(norm: &LayerNorm<B>) -> Option<Self> {
        let beta = norm.beta.as_ref()?.val();
        let params = plain([norm.gamma.val(), beta])
            .ok()?
            .map(|t| t.to_contiguous());
        assert_eq!(
            params[0].shape(),
            params[1].shape(),
            "layer norm: γ and β differ in size"
        );
        Some(Self(params))
    }

    pub(super) fn norm(&self) -> Norm<'_> {
        Norm {
            gamma: f32s(&self.0[0]),
            beta: f32s(&self.0[1]),
        }
    }
}

/// `norm(x)` on plain Flex (`x`: `[..., d]`), each task normalising whole rows straight into
/// the output. `Err(x)` on any other backend, under autodiff or without β.
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &LayerNorm<B>,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let Some(params) = NormParams::of(norm) else {
        return Err(x);
    };
    let [x] = plain([x]).map_err(|[x]| x)?;
    let (x, norm) = (x.to_contiguous(), params.norm());
    let (xs, d) = (f32s(&x), norm.d());
    assert_eq!(x.shape().dims::<D>()[D - 1], d, "layer norm: d");
    let mut out = Vec::with_capacity(xs.len());
    let rows = (CHUNK / d.max(1)).max(1) * d.max(1);
    out.spare_capacity_mut()[..xs.len()]
        .par_chunks_mut(rows)
        .zip(xs.par_chunks(rows))
        .for_each(|(out, x)| norm.rows(x, out));
    // SAFETY: `rows` wrote every value.
    unsafe { out.set_len(xs.len()) };
    Ok(from_flex(FlexFloat::Plain(tensor(out, x.shape()))))
}

/// The mean of `norm(x)` over each sequence's positions that are not padding, on plain Flex
/// (`x`: `[n, len, d]`, `pad`: `[n, len]` → `[n, d]`; a sequence of padding only gives zeros).
/// Each kept row is normalised in cache and added to its sequence's sum. `Err(x)` on any other
/// backend, under autodiff or without β.
pub fn pooled<B: Backend>(
    norm: &LayerNorm<B>,
    x: Tensor<B, 3>,
    pad: &Tensor<B, 2, Bool>,
) -> Result<Tensor<B, 2>, Tensor<B, 3>> {
    let Some(params) = NormParams::of(norm) else {
        return Err(x);
    };
    let [x] = plain([x]).map_err(|[x]| x)?;
    let ([n, len, d], norm) = (x.shape().dims(), params.norm());
    assert_eq!(norm.d(), d, "layer norm: d");
    let pad: Vec<bool> = pad.to_data().to_vec().expect("a boolean padding mask");
    assert_eq!(pad.len(), n * len, "pooled: padding of another shape");
    let x = x.to_contiguous();
    let xs = f32s(&x);
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d.max(1))
        .enumerate()
        .with_min_len((CHUNK / (len * d).max(1)).max(1))
        .for_each_init(
            || Vec::with_capacity(d),
            |row, (s, sum)| {
                row.clear();
                let normed = &mut row.spare_capacity_mut()[..d];
                let mut kept = 0;
                for at in (s * len..(s + 1) * len).filter(|&at| !pad[at]) {
                    let at = at * d;
                    norm.rows(&xs[at..at + d], normed);
                    // SAFETY: `rows` wrote all `d` values.
                    let normed = unsafe { normed.assume_init_ref() };
                    sum.iter_mut().zip(normed).for_each(|(s, v)| *s += v);
                    kept += 1;
                }
                let kept = kept.max(1) as f32;
                sum.iter_mut().for_each(|s| *s /= kept);
            },
        );
    Ok(from_flex(FlexFloat::Plain(tensor(out, [n, d]))))
}

/// `out ← (x − mean)/√(var + ε)·γ + β` for each row of `x` (`γ.len()` values), two passes per
/// row in cache (the mean, then the variance of the deviations). The AVX-512 build is written
/// with intrinsics (16 lanes, masked tails, the lanes summed in registers); the compiler turns
/// the portable kernel's lane sums into a chain of scalar additions or 2-lane vectors, which
/// made it about 1.7× slower on 64 features.
fn normalise(x: &[f32], gamma: &[f32], beta: &[f32], out: &mut [MaybeUninit<f32>]) {
    match VectorPath::active() {
        // SAFETY (both): the CPU has these instruction sets (`VectorPath::active` checked them).
        #[cfg(target_arch = "x86_64")]
        VectorPath::Avx512 => unsafe { normalise_avx512(x, gamma, beta, out) },
        #[cfg(target_arch = "x86_64")]
        VectorPath::Avx2Fma => unsafe { normalise_avx2(x, gamma, beta, out) },
        _ => normalise_kernel::<false>(x, gamma, beta, out),
    }
}

/// The mean and `1/√(var + ε)` of `row` (portable: 8 lanes, summed in order).
#[inline(always)]
fn moments<const FMA: bool>(row: &[f32]) -> (f32, f32) {
    let d = row.len() as f32;
    let (chunks, rest) = row.as_chunks::<8>();
    let mut sums = [0f32; 8];
    for chunk in chunks {
        for l in 0..8 {
            sums[l] += chunk[l];
        }
    }
    let mean = (sums.iter().sum::<f32>() + rest.iter().sum::<f32>()) / d;
    let mut squares = [0f32; 8];
    for chunk in chunks {
        for l in 0..8 {
            let v = chunk[l] - mean;
            squares[l] = madd::<FMA>(v, v, squares[l]);
        }
    }
    let rest = rest
        .iter()
        .fold(0.0, |acc, &v| madd::<FMA>(v - mean, v - mean, acc));
    let var = (squares.iter().sum::<f32>() + rest) / d;
    (mean, 1.0 / (var + LAYER_NORM_EPSILON as f32).sqrt())
}

#[inline(always)]
fn normalise_kernel<const FMA: bool>(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    out: &mut [MaybeUninit<f32>],
) {
    let d = gamma.len();
    if d == 0 {
        return;
    }
    for (row, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let (mean, inverse) = moments::<FMA>(row);
        for (((o, &v), &g), &b) in out.iter_mut().zip(row).zip(gamma).zip(beta) {
            o.write(madd::<FMA>(v - mean, inverse * g, b));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn normalise_avx2(x: &[f32], gamma: &[f32], beta: &[f32], out: &mut [MaybeUninit<f32>]) {
    normalise_kernel::<true>(x, gamma, beta, out)
}

/// [`normalise_kernel`] in AVX-512 F intrinsics: each row in registers of 16 values, the last
/// `d % 16` under a mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn normalise_avx512(x: &[f32], gamma: &[f32], beta: &[f32], out: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let d = gamma.len();
    if d == 0 {
        return;
    }
    assert!(beta.len() == d && x.len().is_multiple_of(d) && out.len() == x.len());
    let full = d / 16 * 16;
    let tail = ((1u32 << (d - full)) - 1) as __mmask16;
    let (gamma, beta) = (gamma.as_ptr(), beta.as_ptr());
    for (row, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let (x, out) = (row.as_ptr(), out.as_mut_ptr().cast::<f32>());
        // SAFETY: every load and store is at `c + 16 ≤ full ≤ d` or masked to `d`, inside the
        // row, its output, γ and β (`d` values each).
        unsafe {
            let load = |c: usize| _mm512_loadu_ps(x.add(c));
            let rest = _mm512_maskz_loadu_ps(tail, x.add(full));
            let sum = (0..full)
                .step_by(16)
                .fold(rest, |s, c| _mm512_add_ps(s, load(c)));
            let mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / d as f32);
            let deviation = _mm512_maskz_sub_ps(tail, rest, mean);
            let squares =
                (0..full)
                    .step_by(16)
                    .fold(_mm512_mul_ps(deviation, deviation), |s, c| {
                        let v = _mm512_sub_ps(load(c), mean);
                        _mm512_fmadd_ps(v, v, s)
                    });
            let var = _mm512_reduce_add_ps(squares) / d as f32;
            let inverse = _mm512_set1_ps(1.0 / (var + LAYER_NORM_EPSILON as f32).sqrt());
            let normed = |v: __m512, c: usize, mask: __mmask16| {
                let g = _mm512_mul_ps(inverse, _mm512_maskz_loadu_ps(mask, gamma.add(c)));
                _mm512_fmadd_ps(
                    _mm512_sub_ps(v, mean),
                    g,
                    _mm512_maskz_loadu_ps(mask, beta.add(c)),
                )
            };
            for c in (0..full).step_by(16) {
                _mm512_storeu_ps(out.add(c), normed(load(c), c, !0));
            }
            if tail != 0 {
                _mm512_mask_storeu_ps(out.add(full), tail, normed(rest, full, tail));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::backend::Flex;
    use burn::module::Param;

    use crate::model::init::Init;
    use crate::model::ops::{GENERIC, layer_norm, pooled};

    use super::*;
    use crate::testing::max_diff;

    /// A layer norm over `d` features with γ and β that differ from feature to feature.
    pub(crate) fn varied_norm<B: Backend>(d: usize, device: &B::Device) -> LayerNorm<B> {
        let mut norm = Init::new(0, device).layer_norm(d);
        let values = |f: fn(usize) -> f32| {
            let values: Vec<f32> = (0..d).map(f).collect();
            Param::from_tensor(Tensor::from_data(TensorData::new(values, [d]), device))
        };
        norm.gamma = values(|i| 0.5 + (i % 5) as f32 * 0.3);
        norm.beta = Some(values(|i| (i % 3) as f32 * 0.25 - 0.25));
        norm
    }

    /// `x`'s rows (`γ.len()` values each) layer-normed in f64.
    fn normalised(x: &[f32], gamma: &[f32], beta: &[f32]) -> Vec<f64> {
        let d = gamma.len();
        x.chunks(d)
            .flat_map(|row| {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let inverse = 1.0 / (var + LAYER_NORM_EPSILON).sqrt();
                (0..d).map(move |c| {
                    (row[c] as f64 - mean) * inverse * gamma[c] as f64 + beta[c] as f64
                })
            })
            .collect()
    }

    /// Every build of the row kernel this CPU runs (AVX-512 intrinsics, AVX2, portable with and
    /// without FMA) on 7, 20 and 64 features: masked tails only, a whole 16 and a tail, whole
    /// registers only; rows whose mean is far from 0.
    #[test]
    fn every_build_of_the_row_kernel_normalises_rows() {
        use super::super::simd::{builds, run_build};
        for d in [7, 20, 64] {
            let rows = 5;
            let x: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0 + (i / d) as f32 * 3.0)
                .collect();
            let gamma: Vec<f32> = (0..d).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect();
            let beta: Vec<f32> = (0..d).map(|i| (i % 3) as f32 * 0.25 - 0.25).collect();
            let want: Vec<f32> = normalised(&x, &gamma, &beta)
                .iter()
                .map(|&y| y as f32)
                .collect();
            for build in builds() {
                let mut out = vec![MaybeUninit::new(f32::NAN); rows * d];
                run_build!(
                    build,
                    normalise_kernel,
                    normalise_avx2,
                    normalise_avx512,
                    (&x, &gamma, &beta, &mut out)
                );
                // SAFETY: initialised (NaN where the kernel would have missed a value).
                let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                let diff = max_diff(&got, &want);
                assert!(diff < 2e-6, "{build:?}, d {d}: max |Δ| = {diff}");
            }
        }
    }

    /// Both fast paths against a direct computation in f64 and against the generic path (Flex's
    /// layer norm, whose one-pass variance is less exact, and the masked mean): 20 features (a
    /// 16-lane chunk and 4 more), 1,800 rows (three tasks of whole rows, the last one shorter),
    /// sequences with padding at their end, in the middle, and of padding only.
    #[test]
    fn layer_norm_and_pooled_mean_match_a_direct_computation() {
        let dev = Default::default();
        let (n, len, d) = (150, 12, 20);
        let norm = varied_norm::<Flex>(d, &dev);
        let x: Vec<f32> = (0..n * len * d)
            .map(|i| ((i * 31 % 103) as f32 - 51.0) / 17.0 + (i / d % 7) as f32)
            .collect();
        // Sequence s: s % (len + 1) padding positions at its end (all of them for s = 12),
        // and every third sequence also position 1.
        let pad: Vec<bool> = (0..n * len)
            .map(|i| {
                let (s, at) = (i / len, i % len);
                at >= len - (s % (len + 1)).min(len) || (s % 3 == 0 && at == 1)
            })
            .collect();
        assert!(pad[12 * len..13 * len].iter().all(|&p| p));
        let values = |t: Tensor<Flex, 1>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
        let (gamma, beta) = (
            values(norm.gamma.val()),
            values(norm.beta.as_ref().unwrap().val()),
        );
        let exact = normalised(&x, &gamma, &beta);
        let want_normed: Vec<f32> = exact.iter().map(|&y| y as f32).collect();
        let mut want_mean = vec![0f64; n * d];
        for (r, row) in exact.chunks(d).enumerate().filter(|(r, _)| !pad[*r]) {
            let sum = &mut want_mean[r / len * d..][..d];
            sum.iter_mut().zip(row).for_each(|(s, y)| *s += y);
        }
        for (s, sum) in want_mean.chunks_mut(d).enumerate() {
            let kept = pad[s * len..(s + 1) * len].iter().filter(|&&p| !p).count();
            sum.iter_mut().for_each(|v| *v /= kept.max(1) as f64);
        }
        let want_mean: Vec<f32> = want_mean.iter().map(|&v| v as f32).collect();
        let run = |generic: bool| {
            GENERIC.set(generic);
            let x = Tensor::<Flex, 3>::from_data(TensorData::new(x.clone(), [n, len, d]), &dev);
            let pad =
                Tensor::<Flex, 2, Bool>::from_data(TensorData::new(pad.clone(), [n, len]), &dev);
            let normed: Vec<f32> = layer_norm(&norm, x.clone()).into_data().to_vec().unwrap();
            let mean: Vec<f32> = pooled(&norm, x, pad).into_data().to_vec().unwrap();
            GENERIC.set(false);
            (normed, mean)
        };
        let ((normed, mean), (generic_normed, generic_mean)) = (run(false), run(true));
        assert!(
            mean[12 * d..13 * d].iter().all(|&v| v == 0.0),
            "padding only: zeros"
        );
        for (what, got, want, tolerance) in [
            ("layer norm", &normed, &want_normed, 2e-6),
            ("pooled mean", &mean, &want_mean, 2e-6),
            ("generic layer norm", &generic_normed, &want_normed, 2e-5),
            ("generic pooled mean", &generic_mean, &want_mean, 2e-5),
        ] {
            let diff = max_diff(got, want);
            assert!(diff < tolerance, "{what}: max |Δ| = {diff}");
        }
    }
}
