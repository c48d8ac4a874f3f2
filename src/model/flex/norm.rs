//! Layer norms in inference on Flex. Flex's own layer norm zero-fills its output on one thread
//! before its parallel pass, and the masked mean that pools a layer-normed encoder output took
//! a mask, a copy and a sum (together a tenth of a `tiny` inference call on 2 cores). Here a
//! layer norm writes each row once, in parallel; the pooled mean normalises each kept row in
//! cache and adds it up; and the feed-forward block normalises its rows itself
//! ([`super::feed_forward`]). Plain Flex only: under autodiff the generic path runs.

use std::mem::MaybeUninit;

use burn::nn::LayerNorm;
use burn::prelude::*;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::linear::plain;
use super::simd::{dispatch, madd};
use super::{CHUNK, FlexFloat, f32s, from_flex, tensor};

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
        normalise(x, self.gamma, self.beta, out);
    }
}

/// Runs `f` on the γ and β of `norm` as a [`Norm`] when `norm` is a plain Flex module with a β.
pub(super) fn with_norm<B: Backend, T>(
    norm: &LayerNorm<B>,
    f: impl FnOnce(Norm) -> T,
) -> Option<T> {
    let beta = norm.beta.as_ref()?.val();
    let [gamma, beta] = plain([norm.gamma.val(), beta])
        .ok()?
        .map(|t| t.to_contiguous());
    let (gamma, beta) = (f32s(&gamma), f32s(&beta));
    assert_eq!(
        gamma.len(),
        beta.len(),
        "layer norm: γ and β differ in size"
    );
    Some(f(Norm { gamma, beta }))
}

/// `norm(x)` on plain Flex (`x`: `[..., d]`), each task normalising whole rows straight into
/// the output. `Err(x)` on any other backend, under autodiff or without β.
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &LayerNorm<B>,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let [x] = plain([x]).map_err(|[x]| x)?;
    let out = with_norm(norm, |norm| {
        let (x, d) = (x.to_contiguous(), norm.d());
        let xs = f32s(&x);
        assert_eq!(x.shape().dims::<D>()[D - 1], d, "layer norm: d");
        let mut out = Vec::with_capacity(xs.len());
        let rows = (CHUNK / d.max(1)).max(1) * d.max(1);
        out.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(rows)
            .zip(xs.par_chunks(rows))
            .for_each(|(out, x)| norm.rows(x, out));
        // SAFETY: `rows` wrote every value.
        unsafe { out.set_len(xs.len()) };
        tensor(out, x.shape())
    });
    match out {
        Some(out) => Ok(from_flex(FlexFloat::Plain(out))),
        None => Err(from_flex(FlexFloat::Plain(x))),
    }
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
    let [x] = plain([x]).map_err(|[x]| x)?;
    let [n, len, d] = x.shape().dims();
    let out = with_norm(norm, |norm| {
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
        tensor(out, [n, d])
    });
    match out {
        Some(out) => Ok(from_flex(FlexFloat::Plain(out))),
        None => Err(from_flex(FlexFloat::Plain(x))),
    }
}

/// `Σ f(x)` over `x`, in 16 lanes so that it vectorises.
#[inline(always)]
fn sum16(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let (chunks, rest) = x.as_chunks::<16>();
    for chunk in chunks {
        for l in 0..16 {
            acc[l] += f(chunk[l]);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}

/// `out ← (x − mean)/√(var + ε)·γ + β` for each row of `x` (`γ.len()` values), two passes per
/// row in cache (the mean, then the variance of the deviations).
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
        let mean = sum16(row, |v| v) / d as f32;
        let var = sum16(row, |v| (v - mean) * (v - mean)) / d as f32;
        let inverse = 1.0 / (var + LAYER_NORM_EPSILON as f32).sqrt();
        for (((o, &v), &g), &b) in out.iter_mut().zip(row).zip(gamma).zip(beta) {
            o.write(madd::<FMA>(v - mean, inverse * g, b));
        }
    }
}

dispatch!(normalise, normalise_avx2, normalise_avx512, normalise_kernel, (x: &[f32], gamma: &[f32], beta: &[f32], out: &mut [MaybeUninit<f32>]));

#[cfg(test)]
pub(crate) mod tests {
    use burn::backend::Flex;
    use burn::module::Param;

    use crate::model::init::Init;
    use crate::model::ops::{GENERIC, layer_norm, pooled};

    use super::*;

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

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
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
        let mut want_normed = vec![0f32; n * len * d];
        let mut want_mean = vec![0f64; n * d];
        for (r, row) in x.chunks(d).enumerate() {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            for c in 0..d {
                let y = (row[c] as f64 - mean) / (var + LAYER_NORM_EPSILON).sqrt()
                    * gamma[c] as f64
                    + beta[c] as f64;
                want_normed[r * d + c] = y as f32;
                if !pad[r] {
                    want_mean[r / len * d + c] += y;
                }
            }
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
