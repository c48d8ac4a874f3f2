//! Multi-head attention on Flex. Per sequence and head, scores, mask, softmax, dropout and the
//! weighted sum of values are computed in cache from the `[n, len, d]` projections, without the
//! `[n, heads, len, len]` tensors or the head split and merge of the generic path (whose
//! reshapes make Flex copy element by element); the backward step recomputes the weights.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::prelude::*;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::simd::{dispatch, exp_neg, lanes8, madd, product, rows_of, zeroed};
use super::{FlexFloat, f32s, from_flex, tensor, to_flex};

/// Multi-head attention on Flex: `q`, `k`, `v`: `[n, len, d]` with the heads side by side
/// (`d = heads·d_head`), `pad`: `[n, len]` (true = padding) → the heads' outputs side by side,
/// `[n, len, d]`. Per sequence and head: scores `q·kᵀ/√d_head`, `masked_score` for padding keys,
/// softmax, dropout `p` on the weights (under autodiff or in a GradCache pass), times `v`, all
/// in cache; the generic path builds `[n, heads, len, len]` tensors and splits and merges the
/// heads. Under `Autodiff<Flex>` it records its own backward step, which recomputes the weights.
/// `None` on other backends: the caller takes the generic path.
pub fn attention<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    pad: &Tensor<B, 2, Bool>,
    heads: usize,
    masked_score: f32,
    p: f64,
) -> Option<Tensor<B, 3>> {
    let (Ok(q), Ok(k), Ok(v)) = (to_flex(q.clone()), to_flex(k.clone()), to_flex(v.clone())) else {
        return None;
    };
    let pad: Vec<bool> = pad.to_data().to_vec().expect("a boolean padding mask");
    Some(from_flex(match (q, k, v) {
        (FlexFloat::Plain(q), FlexFloat::Plain(k), FlexFloat::Plain(v)) => {
            // Without autodiff dropout acts only in a GradCache pass (see `with_chunk_masks`).
            let p = if crate::model::dropout::replaying() {
                p
            } else {
                0.0
            };
            let state = Attention::new([q, k, v], pad, heads, masked_score, p);
            FlexFloat::Plain(state.forward())
        }
        (FlexFloat::Tracked(q), FlexFloat::Tracked(k), FlexFloat::Tracked(v)) => {
            let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
            let state = Attention::new(
                [q.primitive, k.primitive, v.primitive],
                pad,
                heads,
                masked_score,
                p,
            );
            let out = state.forward();
            FlexFloat::Tracked(
                match AttentionBackward
                    .prepare::<NoCheckpointing>(nodes)
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => prep.finish(state, out),
                    OpsKind::UnTracked(prep) => prep.finish(out),
                },
            )
        }
        _ => unreachable!("q, k and v come from one backend"),
    }))
}

/// One attention call: its inputs, padding and dropout mask (kept for the backward step).
#[derive(Clone, Debug)]
struct Attention {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    pad: Vec<bool>,
    /// Dropped weights, `[n, heads, len, len]` (the layout of the generic path's mask).
    drop: Option<Vec<bool>>,
    shape: AttentionShape,
}

/// The sizes of one sequence's attention.
#[derive(Clone, Copy, Debug)]
pub(super) struct AttentionShape {
    pub(super) len: usize,
    pub(super) d: usize,
    heads: usize,
    scale: f32,
    masked_score: f32,
    /// `1/(1 − p)`: the scale of the weights dropout keeps.
    kept_scale: f32,
}

impl AttentionShape {
    /// Sequences of `len` positions, `d` columns in `heads` heads, dropout `p` on the weights.
    pub(super) fn new([len, d, heads]: [usize; 3], masked_score: f32, p: f64) -> Self {
        assert!(
            heads > 0 && d.is_multiple_of(heads),
            "attention: {heads} heads for {d} columns"
        );
        AttentionShape {
            len,
            d,
            heads,
            scale: 1.0 / ((d / heads) as f32).sqrt(),
            masked_score,
            kept_scale: (1.0 / (1.0 - p)) as f32,
        }
    }
}

impl Attention {
    fn new(
        [q, k, v]: [FlexTensor; 3],
        pad: Vec<bool>,
        heads: usize,
        masked_score: f32,
        p: f64,
    ) -> Self {
        let [n, len, d] = q.shape().dims();
        assert!(
            k.shape().dims::<3>() == [n, len, d] && v.shape().dims::<3>() == [n, len, d],
            "attention: q, k and v differ in shape"
        );
        assert_eq!(pad.len(), n * len, "attention: padding of another shape");
        let drop =
            (p > 0.0).then(|| crate::model::dropout::draw_drop_mask(n * heads * len * len, p));
        Self {
            q: q.to_contiguous(),
            k: k.to_contiguous(),
            v: v.to_contiguous(),
            pad,
            drop,
            shape: AttentionShape::new([len, d, heads], masked_score, p),
        }
    }

    /// Runs `f(s, q, k, v, pad, drop, rows, scratch)` for every sequence `s` in parallel, with its
    /// rows of each of `outputs` (`[n, len, d]` each, zeros at first) and buffers its task reuses.
    fn per_sequence<const N: usize>(
        &self,
        f: impl Fn(usize, [&[f32]; 3], &[bool], Option<&[bool]>, [&mut [f32]; N], &mut Scratch) + Sync,
    ) -> [Vec<f32>; N] {
        let AttentionShape { len, d, heads, .. } = self.shape;
        let rows = len * d;
        let n = self.pad.len() / len.max(1);
        let mut outputs: [Vec<f32>; N] = std::array::from_fn(|_| vec![0f32; n * rows]);
        if rows == 0 {
            return outputs;
        }
        let (qs, ks, vs) = (f32s(&self.q), f32s(&self.k), f32s(&self.v));
        let mut slices: Vec<[&mut [f32]; N]> = (0..n)
            .map(|_| std::array::from_fn(|_| &mut [][..]))
            .collect();
        for (o, output) in outputs.iter_mut().enumerate() {
            for (s, chunk) in output.chunks_mut(rows).enumerate() {
                slices[s][o] = chunk;
            }
        }
        // At least ~32k multiply-adds per task.
        let per_sequence = 2 * len * len * d;
        slices
            .into_par_iter()
            .enumerate()
            .with_min_len((32 * 1024 / per_sequence.max(1)).max(1))
            .for_each_init(Scratch::default, |scratch, (s, out)| {
                let at = s * rows..(s + 1) * rows;
                let weights = heads * len * len;
                let drop = self
                    .drop
                    .as_ref()
                    .map(|m| &m[s * weights..(s + 1) * weights]);
                let inputs = [&qs[at.clone()], &ks[at.clone()], &vs[at]];
                f(
                    s,
                    inputs,
                    &self.pad[s * len..(s + 1) * len],
                    drop,
                    out,
                    scratch,
                );
            });
        outputs
    }

    fn forward(&self) -> FlexTensor {
        let shape = &self.shape;
        let [out] = self.per_sequence(|_, inputs, pad, drop, [out], scratch| {
            attend(shape, inputs, pad, drop, out, scratch)
        });
        tensor(out, self.q.shape())
    }

    /// Gradients of `q`, `k` and `v` from the output's gradient.
    fn backward(&self, grad: &FlexTensor) -> [FlexTensor; 3] {
        let grad = grad.to_contiguous();
        let (gs, shape) = (f32s(&grad), &self.shape);
        let rows = shape.len * shape.d;
        let grads = self.per_sequence(|s, inputs, pad, drop, [dq, dk, dv], scratch| {
            let d_out = &gs[s * rows..(s + 1) * rows];
            attend_backward(shape, inputs, pad, drop, d_out, [dq, dk, dv], scratch)
        });
        grads.map(|g| tensor(g, self.q.shape()))
    }
}

/// The backward step of [`attention`] under `Autodiff<Flex>`.
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = Attention;

    fn backward(self, ops: Ops<Attention, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [dq, dk, dv] = ops.state.backward(&grad);
        for (node, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

/// The keys a query can attend to: up to the last one that is not padding (keys after it have
/// weight 0, exactly); all of them in a sequence of padding only.
#[inline(always)]
fn attended(pad: &[bool]) -> usize {
    pad.iter()
        .rposition(|&p| !p)
        .map_or(pad.len(), |last| last + 1)
}

/// Buffers that one rayon task reuses from one sequence to the next.
#[derive(Default)]
pub(super) struct Scratch {
    /// A head's queries and output gradients, transposed ([`Head::transpose`]).
    queries: Vec<f32>,
    d_out: Vec<f32>,
    /// `[keys, lanes]`: the weights of every query for each key, and their gradients.
    weights: Vec<f32>,
    d_weights: Vec<f32>,
}

/// The softmax over the keys, for every query, in place of the raw scores `q·k`: `scores` is
/// `[keys, lanes]` (one key's scores of all queries side by side), `pad` the keys' padding
/// (a padding key's score is the masked score). Every pass runs over 8 queries at once, down
/// the keys, so nothing is reduced across lanes.
#[inline(always)]
fn softmax_columns<const FMA: bool>(
    shape: &AttentionShape,
    pad: &[bool],
    scores: &mut [f32],
    lanes: usize,
) {
    for g in (0..lanes).step_by(8) {
        let mut max = [f32::NEG_INFINITY; 8];
        for (j, &padding) in pad.iter().enumerate() {
            let x = lanes8(scores, j * lanes + g);
            for l in 0..8 {
                x[l] = if padding {
                    shape.masked_score
                } else {
                    x[l] * shape.scale
                };
                // Not `f32::max`, whose NaN handling costs two more instructions: a NaN score
                // still makes the sum, and so every weight of its query, NaN.
                max[l] = if x[l] > max[l] { x[l] } else { max[l] };
            }
        }
        let mut sum = [0f32; 8];
        for j in 0..pad.len() {
            let x = lanes8(scores, j * lanes + g);
            for l in 0..8 {
                x[l] = exp_neg::<FMA>(max[l] - x[l]);
                sum[l] += x[l];
            }
        }
        let inverse = sum.map(|s| 1.0 / s);
        for j in 0..pad.len() {
            let x = lanes8(scores, j * lanes + g);
            for l in 0..8 {
                x[l] *= inverse[l];
            }
        }
    }
}

/// Dropout on a head's weights (`[keys, lanes]`, in place): weight `(i, j)` (query, key) times
/// its factor in `drop` (`[heads, len, len]` flags; head `h`'s read row by row).
#[inline(always)]
fn drop_weights(shape: &AttentionShape, drop: &[bool], h: usize, weights: &mut [f32]) {
    let (len, lanes) = (shape.len, shape.len.next_multiple_of(8));
    let (keys, mask) = (
        weights.len() / lanes,
        &drop[h * len * len..(h + 1) * len * len],
    );
    for (i, flags) in mask.chunks_exact(len).enumerate() {
        for (j, &dropped) in flags[..keys].iter().enumerate() {
            weights[j * lanes + i] *= if dropped { 0.0 } else { shape.kept_scale };
        }
    }
}

/// Head `h`'s part of one sequence's products: its columns of the `[len, d]` rows, and the
/// `[keys, lanes]` weights of its queries.
struct Head {
    len: usize,
    d: usize,
    d_head: usize,
    col: usize,
    lanes: usize,
}

impl Head {
    fn new(shape: &AttentionShape, h: usize) -> Self {
        let (len, d, d_head) = (shape.len, shape.d, shape.d / shape.heads);
        let (col, lanes) = (h * d_head, len.next_multiple_of(8));
        Head {
            len,
            d,
            d_head,
            col,
            lanes,
        }
    }

    /// The head's columns of `x` (`[len, d]`), transposed into `out`: `[d_head, lanes]` (the
    /// lanes past `len` are left as they are).
    #[inline(always)]
    fn transpose(&self, x: &[f32], out: &mut [f32]) {
        for (i, row) in x.chunks_exact(self.d).take(self.len).enumerate() {
            for (c, &value) in row[self.col..self.col + self.d_head].iter().enumerate() {
                out[c * self.lanes + i] = value;
            }
        }
    }

    /// `out` (`[keys, lanes]`) = the head's columns of the first `keys` rows of `x` times `t`
    /// (`[d_head, lanes]`, from [`Head::transpose`]): the scores (keys × queries), or the
    /// weights' gradients.
    #[inline(always)]
    fn by_lanes<const FMA: bool>(&self, keys: usize, x: &[f32], t: &[f32], out: &mut [f32]) {
        let (d, col, lanes) = (self.d, self.col, self.lanes);
        product::<FMA>(
            [keys, self.d_head, lanes],
            |j, c| x[j * d + col + c],
            |c| &t[c * lanes..],
            rows_of(out, lanes, 0),
        );
    }

    /// The head's columns of `out`'s `len` rows: row `i` = Σ_j `w[j, i]`·row `j` of `x`, over
    /// the first `keys` rows (`w`: `[keys, lanes]`; the output, or the queries' gradient).
    #[inline(always)]
    fn to_queries<const FMA: bool>(&self, keys: usize, w: &[f32], x: &[f32], out: &mut [f32]) {
        let (d, col, lanes) = (self.d, self.col, self.lanes);
        product::<FMA>(
            [self.len, keys, self.d_head],
            |i, j| w[j * lanes + i],
            |j| &x[j * d + col..],
            rows_of(out, d, col),
        );
    }

    /// The head's columns of `out`'s first `keys` rows: row `j` = Σ_i `w[j, i]`·row `i` of `x`,
    /// over the `len` rows (the keys' or values' gradient).
    #[inline(always)]
    fn to_keys<const FMA: bool>(&self, keys: usize, w: &[f32], x: &[f32], out: &mut [f32]) {
        let (d, col, lanes) = (self.d, self.col, self.lanes);
        product::<FMA>(
            [keys, self.len, self.d_head],
            |j, i| w[j * lanes + i],
            |i| &x[i * d + col..],
            rows_of(out, d, col),
        );
    }
}

/// One sequence's attention, all heads: `q`, `k`, `v` (`inputs`), `out`: `[len, d]`,
/// `pad`: `[len]`, `drop`: `[heads, len, len]`. Per head, the scores are one small product
/// (keys × queries), their softmax runs down the keys, and the output is another product.
#[inline(always)]
fn attend_kernel<const FMA: bool>(
    shape: &AttentionShape,
    [q, k, v]: [&[f32]; 3],
    pad: &[bool],
    drop: Option<&[bool]>,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let AttentionShape { len, d, heads, .. } = *shape;
    let (dh, n, lanes) = (d / heads, attended(pad), len.next_multiple_of(8));
    let queries = zeroed(&mut scratch.queries, dh * lanes);
    let weights = zeroed(&mut scratch.weights, n * lanes);
    for h in 0..heads {
        let head = Head::new(shape, h);
        head.transpose(q, queries);
        head.by_lanes::<FMA>(n, k, queries, weights);
        softmax_columns::<FMA>(shape, &pad[..n], weights, lanes);
        if let Some(drop) = drop {
            drop_weights(shape, drop, h, weights);
        }
        head.to_queries::<FMA>(n, weights, v, out);
    }
}

/// The gradients of one sequence's attention: `d_out` (`[len, d]`) → `dq`, `dk`, `dv` (`[len, d]`,
/// zeros at first). The weights are recomputed.
#[inline(always)]
fn attend_backward_kernel<const FMA: bool>(
    shape: &AttentionShape,
    [q, k, v]: [&[f32]; 3],
    pad: &[bool],
    drop: Option<&[bool]>,
    d_out: &[f32],
    [dq, dk, dv]: [&mut [f32]; 3],
    scratch: &mut Scratch,
) {
    let AttentionShape { len, d, heads, .. } = *shape;
    // Keys from n on have weight 0: their scores, dk and dv rows get no gradient.
    let (dh, n, lanes) = (d / heads, attended(pad), len.next_multiple_of(8));
    let queries = zeroed(&mut scratch.queries, dh * lanes);
    let d_outs = zeroed(&mut scratch.d_out, dh * lanes);
    // [n (keys), lanes (queries)]: the weights, then after dropout; their gradients, then the
    // scores'.
    let weights = zeroed(&mut scratch.weights, n * lanes);
    let d_weights = zeroed(&mut scratch.d_weights, n * lanes);
    for h in 0..heads {
        let head = Head::new(shape, h);
        head.transpose(q, queries);
        head.transpose(d_out, d_outs);
        head.by_lanes::<FMA>(n, k, queries, weights);
        softmax_columns::<FMA>(shape, &pad[..n], weights, lanes);
        // The weights' gradient before dropout: v_j · d_out_i, times the dropout factor.
        head.by_lanes::<FMA>(n, v, d_outs, d_weights);
        if let Some(drop) = drop {
            drop_weights(shape, drop, h, d_weights);
        }
        // Through the softmax, then the scale (padding keys' scores were constants), 8 queries
        // at a time.
        for g in (0..lanes).step_by(8) {
            let mut row_dot = [0f32; 8];
            for j in 0..n {
                let (w, dw) = (
                    lanes8(weights, j * lanes + g),
                    lanes8(d_weights, j * lanes + g),
                );
                for l in 0..8 {
                    row_dot[l] = madd::<FMA>(dw[l], w[l], row_dot[l]);
                }
            }
            for (j, &padding) in pad[..n].iter().enumerate() {
                let w = *lanes8(weights, j * lanes + g);
                let dw = lanes8(d_weights, j * lanes + g);
                for l in 0..8 {
                    dw[l] = match padding {
                        true => 0.0,
                        false => w[l] * (dw[l] - row_dot[l]) * shape.scale,
                    };
                }
            }
        }
        // The weights after dropout.
        if let Some(drop) = drop {
            drop_weights(shape, drop, h, weights);
        }
        let (dropped, d_scores) = (&*weights, &*d_weights);
        head.to_queries::<FMA>(n, d_scores, k, dq);
        head.to_keys::<FMA>(n, d_scores, q, dk);
        head.to_keys::<FMA>(n, dropped, d_out, dv);
    }
}

dispatch!(pub(super) attend, attend_avx2, attend_avx512, attend_kernel,
    (shape: &AttentionShape, inputs: [&[f32]; 3], pad: &[bool], drop: Option<&[bool]>,
     out: &mut [f32], scratch: &mut Scratch));
dispatch!(attend_backward, attend_backward_avx2, attend_backward_avx512, attend_backward_kernel,
    (shape: &AttentionShape, inputs: [&[f32]; 3], pad: &[bool], drop: Option<&[bool]>,
     d_out: &[f32], grads: [&mut [f32]; 3], scratch: &mut Scratch));

#[cfg(test)]
mod tests {
    use super::super::simd::{Build, builds, run_build};
    use super::*;

    /// Attention on plain Flex against a direct f64 computation, with a sequence of padding only
    /// and padding at the start, in the middle and at the end, with and without dropout, and sizes that take
    /// every tile of the small products (rows in fours and ones, columns in 16s, 8s and ones);
    /// every build of the kernel this CPU has, forward and backward, each with one set of
    /// buffers for all sequences.
    #[test]
    fn attention_matches_a_direct_computation() {
        let (n, len, d, heads) = (4, 11, 52, 2);
        let dh = d / heads;
        let value = |i: usize, seed: usize| ((i * seed % 23) as f32 - 11.0) / 7.0;
        let [q, k, v]: [Vec<f32>; 3] =
            [3, 5, 7].map(|seed| (0..n * len * d).map(|i| value(i, seed)).collect());
        // Sequence 0 has padding from position 3 on, 1 none, 2 only padding, 3 padding first,
        // in the middle and last.
        let pad: Vec<bool> = (0..n * len)
            .map(|i| match i / len {
                0 => i % len >= 3,
                1 => false,
                2 => true,
                _ => (i % len).is_multiple_of(2),
            })
            .collect();
        // Weights dropped in every sequence (`[heads, len, len]`), and the kept ones' scale.
        let drop: Vec<bool> = (0..heads * len * len).map(|i| i % 3 == 0).collect();
        let kept_scale = 1.5;
        let direct = |drop: Option<&[bool]>| {
            let mut want = vec![0f64; n * len * d];
            for s in 0..n {
                for h in 0..heads {
                    for i in 0..len {
                        let at = |x: &[f32], j: usize, c: usize| {
                            x[(s * len + j) * d + h * dh + c] as f64
                        };
                        let scores: Vec<f64> = (0..len)
                            .map(|j| match pad[s * len + j] {
                                true => -1e4,
                                false => {
                                    (0..dh).map(|c| at(&q, i, c) * at(&k, j, c)).sum::<f64>()
                                        / (dh as f64).sqrt()
                                }
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        let factor = |j: usize| match drop {
                            Some(m) if m[(h * len + i) * len + j] => 0.0,
                            Some(_) => kept_scale as f64,
                            None => 1.0,
                        };
                        for c in 0..dh {
                            want[(s * len + i) * d + h * dh + c] = (0..len)
                                .map(|j| e[j] / sum * factor(j) * at(&v, j, c))
                                .sum();
                        }
                    }
                }
            }
            want
        };
        let close = |got: &[f32], want: &[f64], what: &str| {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{what}: {g} vs {w}");
            }
        };
        let dev = Default::default();
        let t = |x: &Vec<f32>| {
            Tensor::<Flex, 3>::from_data(TensorData::new(x.clone(), [n, len, d]), &dev)
        };
        let pad_t =
            Tensor::<Flex, 2, Bool>::from_data(TensorData::new(pad.clone(), [n, len]), &dev);
        let got = attention(&t(&q), &t(&k), &t(&v), &pad_t, heads, -1e4, 0.5).expect("plain Flex");
        close(
            &got.into_data().to_vec::<f32>().unwrap(),
            &direct(None),
            "attention",
        );
        let shape = AttentionShape {
            len,
            d,
            heads,
            scale: 1.0 / (dh as f32).sqrt(),
            masked_score: -1e4,
            kept_scale,
        };
        fn sequence(x: &[f32], s: usize, rows: usize) -> &[f32] {
            &x[s * rows..(s + 1) * rows]
        }
        let pad_of = |s: usize| &pad[s * len..(s + 1) * len];
        for build in builds() {
            for drop in [None, Some(&drop[..])] {
                let mut out = vec![0f32; n * len * d];
                let scratch = &mut Scratch::default();
                for (s, out) in out.chunks_mut(len * d).enumerate() {
                    let inputs = [
                        sequence(&q, s, len * d),
                        sequence(&k, s, len * d),
                        sequence(&v, s, len * d),
                    ];
                    run_build!(
                        build,
                        attend_kernel,
                        attend_avx2,
                        attend_avx512,
                        (&shape, inputs, pad_of(s), drop, out, scratch)
                    );
                }
                close(
                    &out,
                    &direct(drop),
                    &format!("{build:?}, dropout {}", drop.is_some()),
                );
            }
        }
        // The backward step, with dropout: every build gives the portable one's gradients.
        let d_out: Vec<f32> = (0..n * len * d).map(|i| value(i, 11)).collect();
        let gradients = |build: Build| -> Vec<f32> {
            let mut all = Vec::new();
            let scratch = &mut Scratch::default();
            for s in 0..n {
                let inputs = [
                    sequence(&q, s, len * d),
                    sequence(&k, s, len * d),
                    sequence(&v, s, len * d),
                ];
                let mut grads = [0; 3].map(|_| vec![0f32; len * d]);
                let [dq, dk, dv] = &mut grads;
                run_build!(
                    build,
                    attend_backward_kernel,
                    attend_backward_avx2,
                    attend_backward_avx512,
                    (
                        &shape,
                        inputs,
                        pad_of(s),
                        Some(&drop[..]),
                        sequence(&d_out, s, len * d),
                        [&mut dq[..], &mut dk[..], &mut dv[..]],
                        scratch
                    )
                );
                all.extend(grads.into_iter().flatten());
            }
            all
        };
        let want = gradients(Build::Plain { fma: false });
        assert!(want.iter().any(|&g| g != 0.0));
        for build in builds() {
            for (g, w) in gradients(build).iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{build:?}: {g} vs {w}"
                );
            }
        }
    }
}
