//! A whole pre-norm Transformer layer per block of sequences, in inference on Flex. Run op by
//! op, each of a layer's dozen steps writes its `[rows, d]` output to memory and reads its
//! input back, and waits for both cores at its end: on `tiny`, first writes to fresh memory,
//! norms and the waits were a fifth of an inference call. Here each rayon task takes whole
//! sequences and runs the layer on them in its own buffers, in cache: layer norm, the q, k, v
//! products, attention per sequence, the output product onto `x` (the residual connection),
//! layer norm, the feed-forward block with GELU, and its product onto the residual rows. The
//! kernels are the ones of the op-by-op path; each weight is packed once per call for them all
//! ([`Right`]). Plain Flex only, without dropout.

use std::mem::MaybeUninit;

use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use rayon::prelude::*;

use super::attention::{AttentionShape, Scratch, attend};
use super::gelu::gelu_slice;
use super::linear::{Dense, PARALLEL_PRODUCT, Right, plain, product_rows};
use super::norm::NormParams;
use super::panels::Start;
use super::{FlexFloat, f32s, from_flex, tensor};

/// A pre-norm Transformer layer's parts, by reference.
pub struct LayerParts<'a, B: Backend> {
    /// Before the attention and before the feed-forward block.
    pub norms: [&'a LayerNorm<B>; 2],
    /// Query, key, value, attention output, feed-forward in and out.
    pub linears: [&'a Linear<B>; 6],
    pub heads: usize,
}

/// The layer of `parts` (without dropout) on `x`: `[n, len, d]` with padding `pad` (`[n, len]`,
/// true = padding), by blocks of whole sequences on the rayon pool. `Err(x)` on any other
/// backend, under autodiff, for layers without biases, and when there are too few sequences to
/// give every thread a share of a large layer (the caller's op-by-op path runs each op on every
/// thread).
pub fn layer<B: Backend>(
    parts: LayerParts<B>,
    x: Tensor<B, 3>,
    pad: &Tensor<B, 2, Bool>,
    masked_score: f32,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    let [n, len, d] = x.dims();
    let f = parts.linears[4].weight.dims()[1];
    let threads = rayon::current_num_threads();
    // The products' multiply-adds and the attention's.
    let large = n * len * (d * (4 * d + 2 * f) + 2 * len * d) >= PARALLEL_PRODUCT;
    if n * len * d == 0 || (large && n < 2 * threads) {
        return Err(x);
    }
    let dense = parts.linears.map(Dense::of);
    let norms = parts.norms.map(NormParams::of);
    let (Some(params), [Some(norm_a), Some(norm_f)]) = (collect(dense), norms) else {
        return Err(x);
    };
    let [x] = plain([x]).map_err(|[x]| x)?;
    let x = x.to_contiguous();
    let pad: Vec<bool> = pad.to_data().to_vec().expect("a boolean padding mask");
    assert_eq!(pad.len(), n * len, "layer: padding of another shape");
    let expected = [[d, d], [d, d], [d, d], [d, d], [d, f], [f, d]];
    assert!(
        params.iter().map(|p| p.dims).eq(expected),
        "layer: weights of other shapes"
    );
    for norm in [&norm_a, &norm_f] {
        assert_eq!(norm.norm().d(), d, "layer: a layer norm of another size");
    }
    let weights = params
        .each_ref()
        .map(|p| Right::new([n * len, p.dims[0], p.dims[1]], p.weight()));
    let layer = Layer {
        params: &params,
        weights,
        norms: [norm_a.norm(), norm_f.norm()],
        shape: AttentionShape::new([len, d, parts.heads], masked_score, 0.0),
        xs: f32s(&x),
        pad: &pad,
    };
    // About four blocks per thread of a large layer, each of up to 64–256 rows (fewer where the
    // hidden activations are wider: they stay within 1 MiB); a small layer in one block on
    // this thread. Each block reads all the layer's weights (3 MiB on `small`, more than a
    // core's L2 cache): blocks of 64 rows there made inference 1.2× slower than 256.
    let most_rows = (256 * 1024 / f.max(1)).clamp(64, 256);
    let sequences = match large {
        true => n.div_ceil(4 * threads).min((most_rows / len).max(1)),
        false => n,
    };
    let mut out = Vec::with_capacity(n * len * d);
    let spare = &mut out.spare_capacity_mut()[..n * len * d];
    let run = |buffers: &mut Buffers, (i, part): (usize, &mut [MaybeUninit<f32>])| {
        layer.run(i * sequences, part, buffers)
    };
    if large {
        spare
            .par_chunks_mut(sequences * len * d)
            .enumerate()
            .for_each_init(Buffers::default, run);
    } else {
        run(&mut Buffers::default(), (0, spare));
    }
    // SAFETY: every block wrote all of its values.
    unsafe { out.set_len(n * len * d) };
    Ok(from_flex(FlexFloat::Plain(tensor(out, [n, len, d]))))
}

/// All six layers, or `None` when one is missing.
fn collect(dense: [Option<Dense>; 6]) -> Option<[Dense; 6]> {
    let dense: Vec<Dense> = dense.into_iter().collect::<Option<_>>()?;
    dense.try_into().ok()
}

/// A layer's linear layers (query, key, value, attention output, feed-forward in and out),
/// their weights as products' right operands, its norms and input, as slices.
struct Layer<'a> {
    params: &'a [Dense; 6],
    weights: [Right<'a>; 6],
    norms: [super::norm::Norm<'a>; 2],
    shape: AttentionShape,
    /// `[n, len, d]`.
    xs: &'a [f32],
    pad: &'a [bool],
}

/// The buffers one rayon task reuses from block to block.
#[derive(Default)]
struct Buffers {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    context: Vec<f32>,
    x: Vec<f32>,
    hidden: Vec<f32>,
    scratch: Scratch,
}

impl Layer<'_> {
    /// The layer on the sequences from `first` on whose output rows are `out`.
    fn run(&self, first: usize, out: &mut [MaybeUninit<f32>], b: &mut Buffers) {
        let AttentionShape { len, d, .. } = self.shape;
        let [query, key, value, attention_out, ff_in, ff_out] = self.params;
        let [w_query, w_key, w_value, w_attention_out, w_ff_in, w_ff_out] = &self.weights;
        let f = ff_in.dims[1];
        let (rows, at) = (out.len() / d, first * len * d);
        let x = &self.xs[at..at + rows * d];
        // SAFETY (each `written`): the closures write all the values they are given — `rows`
        // (the norms) and `product_rows` with operands of `rows` rows of the sizes their layers
        // have (checked by `layer`).
        let threads = gemm::Parallelism::None;
        let normed = &*unsafe { written(&mut b.normed, rows * d, |o| self.norms[0].rows(x, o)) };
        let qkv = [(&mut b.q, query, w_query), (&mut b.k, key, w_key)];
        for (buffer, layer, w) in qkv.into_iter().chain([(&mut b.v, value, w_value)]) {
            let start = Start::Bias(layer.bias());
            let product = |o: &mut [MaybeUninit<f32>]| unsafe {
                product_rows([d, d], 0, (normed, d, 1), w, start, o, threads)
            };
            unsafe { written(buffer, rows * d, product) };
        }
        let (q, k, v) = (&b.q[..], &b.k[..], &b.v[..]);
        // Attention writes every value of its output: zeros only when the buffer grows.
        if b.context.len() < rows * d {
            b.context.resize(rows * d, 0.0);
        }
        let context = &mut b.context[..rows * d];
        let seq = len * d;
        for (s, out) in context.chunks_exact_mut(seq).enumerate() {
            let at = s * seq..(s + 1) * seq;
            let inputs = [&q[at.clone()], &k[at.clone()], &v[at]];
            let pad = &self.pad[(first + s) * len..(first + s + 1) * len];
            attend(&self.shape, inputs, pad, None, out, &mut b.scratch);
        }
        let context = &*context;
        let x = &*unsafe {
            written(&mut b.x, rows * d, |o| {
                let start = Start::Residual(x, attention_out.bias());
                product_rows(
                    [d, d],
                    0,
                    (context, d, 1),
                    w_attention_out,
                    start,
                    o,
                    threads,
                )
            })
        };
        let normed = &*unsafe { written(&mut b.normed, rows * d, |o| self.norms[1].rows(x, o)) };
        let hidden = unsafe {
            written(&mut b.hidden, rows * f, |o| {
                let start = Start::Bias(ff_in.bias());
                product_rows([d, f], 0, (normed, d, 1), w_ff_in, start, o, threads)
            })
        };
        gelu_slice(hidden);
        let start = Start::Residual(x, ff_out.bias());
        // SAFETY: as above.
        unsafe { product_rows([f, d], 0, (hidden, f, 1), w_ff_out, start, out, threads) };
    }
}

/// `buffer` as the `len` values `write` writes.
///
/// # Safety
/// `write` writes all `len` values it is given.
unsafe fn written(
    buffer: &mut Vec<f32>,
    len: usize,
    write: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> &mut [f32] {
    buffer.clear();
    buffer.reserve(len);
    write(&mut buffer.spare_capacity_mut()[..len]);
    // SAFETY: `write` wrote them (the caller's contract).
    unsafe { buffer.set_len(len) };
    buffer
}
