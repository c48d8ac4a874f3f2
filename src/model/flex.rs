//! Fast paths for Burn's Flex CPU backend, where the generic operations are slowest.
//!
//! - **GELU.** Flex evaluates `erf` with one scalar libm call per element on one thread: a
//!   quarter of an inference pass and a tenth of a training step on the `tiny` preset. Here the
//!   exact GELU `x·Φ(x)` and its derivative `Φ(x) + x·φ(x)` run vectorised (AVX2 + FMA where the
//!   CPU has them) and on all cores, in the input's own buffer when nothing else holds it, with
//!   the erf approximation PyTorch's vectorised CPU kernel uses (Abramowitz–Stegun 7.1.26:
//!   |erf error| ≤ 1.5·10⁻⁷, so |GELU error| ≤ ~10⁻⁷·max(1, |x|)).
//! - **Linear layers.** Flex's matrix product zero-fills a byte buffer, copies it into an aligned
//!   one and adds the bias in a separate pass. Here `x·W + b` is one product (the gemm crate, as
//!   Flex) added to rows that start as the bias; the backward step writes the gradients straight
//!   from their products.
//! - **Attention.** Per sequence and head, scores, mask, softmax, dropout and the weighted sum of
//!   values are computed in cache from the `[n, len, d]` projections, without the
//!   `[n, heads, len, len]` tensors or the head split and merge of the generic path (whose
//!   reshapes make Flex copy element by element); the backward step recomputes the weights.
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
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{DType, TensorData, TensorMetadata, TensorPrimitive, activation};
use rayon::prelude::*;

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
    #[cfg(test)]
    if tests::GENERIC.get() {
        return Err(x);
    }
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
fn from_any<B: Backend, const D: usize>(any: Box<dyn Any>) -> Tensor<B, D> {
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

/// `x·Φ(x)` with Φ the standard normal CDF (PyTorch's `gelu`, `approximate="none"`).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    on_flex(x, flex_gelu, autodiff_flex_gelu).unwrap_or_else(activation::gelu)
}

/// `x·W + b` of a linear layer with a bias, for `x`: `[rows, d_in]` (Burn's `Linear::forward`).
/// On Flex: one matrix product added to rows that start as the bias (Flex's own product
/// zero-fills a byte buffer and copies it to an aligned one, then adds the bias in another pass);
/// its backward step writes the gradients straight from the products too.
pub fn linear<B: Backend>(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let Some(bias) = &layer.bias else {
        return layer.forward(x);
    };
    let x = match to_flex(x) {
        Ok(x) => x,
        Err(x) => return layer.forward(x),
    };
    let (Ok(w), Ok(b)) = (to_flex(layer.weight.val()), to_flex(bias.val())) else {
        unreachable!("a Flex input and its layer share the backend");
    };
    from_flex(match (x, w, b) {
        (FlexFloat::Plain(x), FlexFloat::Plain(w), FlexFloat::Plain(b)) => {
            FlexFloat::Plain(flex_linear(&x, &w, &b))
        }
        (FlexFloat::Tracked(x), FlexFloat::Tracked(w), FlexFloat::Tracked(b)) => {
            let out = flex_linear(&x.primitive, &w.primitive, &b.primitive);
            FlexFloat::Tracked(
                match LinearBackward
                    .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), b.node.clone()])
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => prep.finish((x.primitive, w.primitive), out),
                    OpsKind::UnTracked(prep) => prep.finish(out),
                },
            )
        }
        _ => unreachable!("a layer's tensors are all tracked or all plain"),
    })
}

/// The backward step of [`linear`] under `Autodiff<Flex>`: keeps the input and the weight.
#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (x, w) = (ops.state.0.to_contiguous(), ops.state.1.to_contiguous());
        let [m, k] = dims2(&x);
        let n = dims2(&w)[1];
        let (xs, ws, gs) = (f32s(&x), f32s(&w), f32s(&grad));
        let [node_x, node_w, node_b] = ops.parents;
        if let Some(node) = node_x {
            // grad · Wᵀ: [m, n] · [n, k].
            let dx = product([m, n, k], (gs, n, 1), (ws, 1, n), None);
            grads.register::<Flex>(node.id, tensor(dx, [m, k]));
        }
        if let Some(node) = node_w {
            // xᵀ · grad: [k, m] · [m, n].
            let dw = product([k, m, n], (xs, 1, k), (gs, n, 1), None);
            grads.register::<Flex>(node.id, tensor(dw, [k, n]));
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, tensor(column_sums(gs, n), [n]));
        }
    }
}

fn flex_linear(x: &FlexTensor, w: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let (x, w, b) = (x.to_contiguous(), w.to_contiguous(), b.to_contiguous());
    let [m, k] = dims2(&x);
    let n = dims2(&w)[1];
    let rows = f32s(&b).repeat(m);
    let out = product([m, k, n], (f32s(&x), k, 1), (f32s(&w), n, 1), Some(rows));
    tensor(out, [m, n])
}

/// `lhs · rhs` for `[m, k, n]` = (`[m, k]`, `[k, n]`), each operand a slice with its row and
/// column strides; row-major `[m, n]`, added to `init` when given. The gemm crate, as Flex.
fn product(
    [m, k, n]: [usize; 3],
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    init: Option<Vec<f32>>,
) -> Vec<f32> {
    let read = init.is_some();
    let mut out = init.unwrap_or_else(|| Vec::with_capacity(m * n));
    assert!(
        out.capacity() >= m * n && (!read || out.len() == m * n),
        "product: output size"
    );
    let reach = |rows: usize, cols: usize, rs: usize, cs: usize| {
        rows.saturating_sub(1) * rs + cols.saturating_sub(1) * cs
    };
    assert!(
        m * k == 0 || reach(m, k, lhs_rs, lhs_cs) < lhs.len(),
        "product: left operand out of bounds"
    );
    assert!(
        k * n == 0 || reach(k, n, rhs_rs, rhs_cs) < rhs.len(),
        "product: right operand out of bounds"
    );
    if m * n == 0 {
        return out;
    }
    if k == 0 {
        // Nothing to add: the sum over an empty axis.
        out.resize(m * n, 0.0);
        return out;
    }
    let parallelism = match m * n * k >= PARALLEL_PRODUCT {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    // SAFETY: `out` has room for `m·n` values, written (and read when `read`, after
    // initialisation) with row stride `n`; both operands lie inside their slices (checked
    // above). `gemm` writes every output value, so the length is set after it returns.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            read,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}

/// Products of at least this many multiply-adds run on every core (Flex's own threshold).
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// Sums of the columns of a row-major matrix with `n` columns: partial sums over blocks of
/// rows in parallel, added in order (the same result on any number of threads).
fn column_sums(values: &[f32], n: usize) -> Vec<f32> {
    let rows_per_task = (CHUNK / n.max(1)).max(1);
    let partial: Vec<Vec<f32>> = values
        .par_chunks(rows_per_task * n.max(1))
        .map(|block| {
            let mut sums = vec![0f32; n];
            for row in block.chunks_exact(n.max(1)) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sums
        })
        .collect();
    partial.into_iter().fold(vec![0f32; n], |mut sums, p| {
        sums.iter_mut().zip(&p).for_each(|(s, v)| *s += v);
        sums
    })
}

fn dims2(x: &FlexTensor) -> [usize; 2] {
    match x.shape().iter().copied().collect::<Vec<_>>()[..] {
        [rows, cols] => [rows, cols],
        ref dims => panic!("a 2-D tensor, got {dims:?}"),
    }
}

fn f32s(x: &FlexTensor) -> &[f32] {
    x.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Multi-head attention on Flex: `q`, `k`, `v`: `[n, len, d]` with the heads side by side
/// (`d = heads·d_head`), `pad`: `[n, len]` (true = padding) → the heads' outputs side by side,
/// `[n, len, d]`. Per sequence and head: scores `q·kᵀ/√d_head`, `masked_score` for padding keys,
/// softmax, dropout `p` on the weights (under autodiff only, as [`dropout`]), times `v`, all in
/// cache; the generic path builds `[n, heads, len, len]` tensors and splits and merges the heads.
/// Under `Autodiff<Flex>` it records its own backward step, which recomputes the weights.
/// `None` on other backends: the caller takes the generic path.
///
/// [`dropout`]: crate::model::block::dropout
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
            let state = Attention::new([q, k, v], pad, heads, masked_score, 0.0);
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
struct AttentionShape {
    len: usize,
    d: usize,
    heads: usize,
    scale: f32,
    masked_score: f32,
    /// `1/(1 − p)`: the scale of the weights dropout keeps.
    kept_scale: f32,
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
        assert!(
            heads > 0 && d % heads == 0,
            "attention: {heads} heads for {d} columns"
        );
        assert_eq!(pad.len(), n * len, "attention: padding of another shape");
        let drop = (p > 0.0).then(|| crate::model::block::draw_drop_mask(n * heads * len * len, p));
        Self {
            q: q.to_contiguous(),
            k: k.to_contiguous(),
            v: v.to_contiguous(),
            pad,
            drop,
            shape: AttentionShape {
                len,
                d,
                heads,
                scale: 1.0 / ((d / heads) as f32).sqrt(),
                masked_score,
                kept_scale: (1.0 / (1.0 - p)) as f32,
            },
        }
    }

    /// Runs `f(s, q, k, v, pad, drop, rows)` for every sequence `s` in parallel, with its rows
    /// of each of `outputs` (`[n, len, d]` each, zeros at first).
    fn per_sequence<const N: usize>(
        &self,
        f: impl Fn(usize, [&[f32]; 3], &[bool], Option<&[bool]>, [&mut [f32]; N]) + Sync,
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
            .for_each(|(s, out)| {
                let at = s * rows..(s + 1) * rows;
                let weights = heads * len * len;
                let drop = self
                    .drop
                    .as_ref()
                    .map(|m| &m[s * weights..(s + 1) * weights]);
                let inputs = [&qs[at.clone()], &ks[at.clone()], &vs[at]];
                f(s, inputs, &self.pad[s * len..(s + 1) * len], drop, out);
            });
        outputs
    }

    fn forward(&self) -> FlexTensor {
        let shape = &self.shape;
        let [out] = self
            .per_sequence(|_, [q, k, v], pad, drop, [out]| attend(shape, q, k, v, pad, drop, out));
        tensor(out, self.q.shape())
    }

    /// Gradients of `q`, `k` and `v` from the output's gradient.
    fn backward(&self, grad: &FlexTensor) -> [FlexTensor; 3] {
        let grad = grad.to_contiguous();
        let (gs, shape) = (f32s(&grad), &self.shape);
        let rows = shape.len * shape.d;
        let grads = self.per_sequence(|s, inputs, pad, drop, [dq, dk, dv]| {
            let d_out = &gs[s * rows..(s + 1) * rows];
            attend_backward(shape, inputs, pad, drop, d_out, [dq, dk, dv])
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

/// Head `h`'s keys (or values) of one sequence, transposed and zero-padded: `[d_head, len8]`.
#[inline(always)]
fn transpose_head(shape: &AttentionShape, x: &[f32], h: usize, out: &mut [f32]) {
    let AttentionShape { len, d, heads, .. } = *shape;
    let (dh, len8) = (d / heads, len.next_multiple_of(8));
    for j in 0..len {
        for (c, &value) in x[j * d + h * dh..j * d + (h + 1) * dh].iter().enumerate() {
            out[c * len8 + j] = value;
        }
    }
}

/// `out[j] = Σ_c x[c]·t[c, j]` for `t`: `[x.len(), len8]` (8 columns at a time, in registers).
#[inline(always)]
fn row_times<const FMA: bool>(x: &[f32], t: &[f32], out: &mut [f32]) {
    let len8 = out.len();
    for (b, block) in out.chunks_exact_mut(8).enumerate() {
        let sums = weighted_sum8::<FMA>(
            x.len(),
            |c| x[c],
            |c| {
                t[c * len8 + 8 * b..c * len8 + 8 * b + 8]
                    .try_into()
                    .expect("8 values")
            },
        );
        block.copy_from_slice(&sums);
    }
}

/// Query `qi`'s softmax weights (before dropout) over the keys `keys` (`[d_head, len8]` from
/// [`transpose_head`]) into `weights[..len]`.
#[inline(always)]
fn softmax_row<const FMA: bool>(
    shape: &AttentionShape,
    qi: &[f32],
    keys: &[f32],
    pad: &[bool],
    weights: &mut [f32],
) {
    row_times::<FMA>(qi, keys, weights);
    let weights = &mut weights[..shape.len];
    for (w, &pad) in weights.iter_mut().zip(pad) {
        *w = if pad {
            shape.masked_score
        } else {
            *w * shape.scale
        };
    }
    let max = weights.iter().fold(f32::NEG_INFINITY, |m, &w| m.max(w));
    for w in weights.iter_mut() {
        *w = exp_neg::<FMA>(max - *w);
    }
    let inverse = 1.0 / weights.iter().sum::<f32>();
    weights.iter_mut().for_each(|w| *w *= inverse);
}

/// The factor dropout gives weight `j` of row `row` (`[len]` flags of a `[heads, len, len]` mask).
#[inline(always)]
fn kept(shape: &AttentionShape, drop: Option<&[bool]>, row: usize, j: usize) -> f32 {
    match drop {
        Some(mask) if mask[row * shape.len + j] => 0.0,
        Some(_) => shape.kept_scale,
        None => 1.0,
    }
}

/// `out = Σ_r coef(r)·row(r)` over `r < n`, 8 columns at a time in registers.
#[inline(always)]
fn combination<'a, const FMA: bool>(
    out: &mut [f32],
    n: usize,
    coef: impl Fn(usize) -> f32,
    row: impl Fn(usize) -> &'a [f32],
) {
    let (o8, o_rest) = out.as_chunks_mut::<8>();
    for (b, ob) in o8.iter_mut().enumerate() {
        *ob = weighted_sum8::<FMA>(n, &coef, |r| {
            row(r)[8 * b..8 * b + 8].try_into().expect("8 values")
        });
    }
    let first = 8 * o8.len();
    for (c, o) in o_rest.iter_mut().enumerate() {
        *o = (0..n).fold(0.0, |acc, r| madd::<FMA>(coef(r), row(r)[first + c], acc));
    }
}

/// One sequence's attention, all heads: `q`, `k`, `v`, `out`: `[len, d]`, `pad`: `[len]`,
/// `drop`: `[heads, len, len]`.
#[inline(always)]
fn attend_kernel<const FMA: bool>(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pad: &[bool],
    drop: Option<&[bool]>,
    out: &mut [f32],
) {
    let AttentionShape { len, d, heads, .. } = *shape;
    let (dh, len8) = (d / heads, len.next_multiple_of(8));
    let mut keys = vec![0f32; dh * len8];
    let mut weights = vec![0f32; len8];
    for h in 0..heads {
        // Head h's columns of row i.
        let at = |i: usize| i * d + h * dh..i * d + (h + 1) * dh;
        transpose_head(shape, k, h, &mut keys);
        for i in 0..len {
            softmax_row::<FMA>(shape, &q[at(i)], &keys, pad, &mut weights);
            for (j, w) in weights[..len].iter_mut().enumerate() {
                *w *= kept(shape, drop, h * len + i, j);
            }
            combination::<FMA>(&mut out[at(i)], len, |j| weights[j], |j| &v[at(j)]);
        }
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
) {
    let AttentionShape { len, d, heads, .. } = *shape;
    let (dh, len8) = (d / heads, len.next_multiple_of(8));
    let (mut keys, mut values) = (vec![0f32; dh * len8], vec![0f32; dh * len8]);
    let (mut weights, mut d_weights) = (vec![0f32; len8], vec![0f32; len8]);
    // One head's weights after dropout and the scores' gradients: [len (queries), len (keys)].
    let (mut dropped, mut d_scores) = (vec![0f32; len * len], vec![0f32; len * len]);
    for h in 0..heads {
        let at = |i: usize| i * d + h * dh..i * d + (h + 1) * dh;
        transpose_head(shape, k, h, &mut keys);
        transpose_head(shape, v, h, &mut values);
        for i in 0..len {
            softmax_row::<FMA>(shape, &q[at(i)], &keys, pad, &mut weights);
            // The weights' gradient before dropout: d_out_i · v_j, times the dropout factor.
            row_times::<FMA>(&d_out[at(i)], &values, &mut d_weights);
            let mut row_dot = 0.0;
            for j in 0..len {
                let factor = kept(shape, drop, h * len + i, j);
                dropped[i * len + j] = weights[j] * factor;
                d_weights[j] *= factor;
                row_dot = madd::<FMA>(d_weights[j], weights[j], row_dot);
            }
            // Through the softmax, then the scale; padding keys' scores were constants.
            for j in 0..len {
                d_scores[i * len + j] = match pad[j] {
                    true => 0.0,
                    false => weights[j] * (d_weights[j] - row_dot) * shape.scale,
                };
            }
        }
        for i in 0..len {
            combination::<FMA>(
                &mut dq[at(i)],
                len,
                |j| d_scores[i * len + j],
                |j| &k[at(j)],
            );
            combination::<FMA>(
                &mut dk[at(i)],
                len,
                |r| d_scores[r * len + i],
                |r| &q[at(r)],
            );
            combination::<FMA>(
                &mut dv[at(i)],
                len,
                |r| dropped[r * len + i],
                |r| &d_out[at(r)],
            );
        }
    }
}

/// `Σ_r coef(r)·row(r)` over `r < n` for 8 lanes, in four partial sums so that consecutive
/// multiply-adds do not wait for each other.
#[inline(always)]
fn weighted_sum8<const FMA: bool>(
    n: usize,
    coef: impl Fn(usize) -> f32,
    row: impl Fn(usize) -> [f32; 8],
) -> [f32; 8] {
    let mut acc = [[0f32; 8]; 4];
    let add = |acc: &mut [f32; 8], r: usize| {
        let (c, x) = (coef(r), row(r));
        for l in 0..8 {
            acc[l] = madd::<FMA>(c, x[l], acc[l]);
        }
    };
    let [a0, a1, a2, a3] = &mut acc;
    let mut r = 0;
    while r + 4 <= n {
        add(a0, r);
        add(a1, r + 1);
        add(a2, r + 2);
        add(a3, r + 3);
        r += 4;
    }
    for r in r..n {
        add(a0, r);
    }
    std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]))
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

/// `a·b + c`, fused into one rounding where the kernel is compiled for FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    match FMA {
        true => a.mul_add(b, c),
        false => a * b + c,
    }
}

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

/// `e^(−a)` for `a ≥ 0` (0 beyond `a = 87`), branch-free so loops over it vectorise: `2^k` from
/// the exponent bits times a degree-7 polynomial on the remainder (relative error < 10⁻⁷).
#[inline(always)]
fn exp_neg<const FMA: bool>(a: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let v = -a.min(87.0);
    let shifted = madd::<FMA>(v, std::f32::consts::LOG2_E, MAGIC);
    let k = shifted - MAGIC;
    // k as an integer, from the bits (a float-to-int cast would not vectorise).
    let k_int = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = madd::<FMA>(-k, 1.428_606_8e-6, madd::<FMA>(-k, 0.693_145_75, v));
    let p = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .iter()
    .fold(1.0 / 5040.0, |acc, &c| madd::<FMA>(acc, r, c));
    p * f32::from_bits(((k_int + 127) as u32) << 23)
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

/// Compiles a kernel twice, plain and with AVX2 + FMA, and picks at run time.
macro_rules! dispatch {
    ($name:ident, $avx2:ident, $kernel:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2($($arg: $ty),*) {
            $kernel::<true>($($arg),*)
        }

        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { $avx2($($arg),*) };
            }
            $kernel::<false>($($arg),*)
        }
    };
}

dispatch!(gelu_slice, gelu_slice_avx2, gelu_kernel, (xs: &mut [f32]));
dispatch!(gelu_grad_slice, gelu_grad_slice_avx2, gelu_grad_kernel, (xs: &[f32], gs: &mut [f32]));
dispatch!(attend, attend_avx2, attend_kernel,
    (shape: &AttentionShape, q: &[f32], k: &[f32], v: &[f32], pad: &[bool], drop: Option<&[bool]>,
     out: &mut [f32]));
dispatch!(attend_backward, attend_backward_avx2, attend_backward_kernel,
    (shape: &AttentionShape, inputs: [&[f32]; 3], pad: &[bool], drop: Option<&[bool]>,
     d_out: &[f32], grads: [&mut [f32]; 3]));

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
        // The kernel the CPU runs, and both builds of it (with and without FMA).
        let (mut plain, mut fused) = (xs.clone(), xs.clone());
        gelu_kernel::<false>(&mut plain);
        gelu_kernel::<true>(&mut fused);
        for got in [got, plain, fused] {
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
        let grads = gelu(x.clone()).sum().backward();
        let got: Vec<f32> = x.grad(&grads).unwrap().to_data().to_vec().unwrap();
        let (mut plain, mut fused) = (vec![1.0; n], vec![1.0; n]);
        gelu_grad_kernel::<false>(&xs, &mut plain);
        gelu_grad_kernel::<true>(&xs, &mut fused);
        for (&x, &g) in [got, plain, fused]
            .iter()
            .flat_map(|got| xs.iter().zip(got))
        {
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
    fn gelu_leaves_a_shared_input_alone() {
        let flex = Default::default();
        let data: Vec<f32> = (0..100).map(|i| i as f32 / 10.0 - 5.0).collect();
        let x = Tensor::<Flex, 1>::from_data(TensorData::new(data.clone(), [100]), &flex);
        let y = gelu(x.clone());
        assert_eq!(x.to_data().to_vec::<f32>().unwrap(), data, "input kept");
        let alone = gelu(x).to_data().to_vec::<f32>().unwrap();
        assert_eq!(y.to_data().to_vec::<f32>().unwrap(), alone, "same values");
    }

    /// Flex's linear layer against Burn's, forward and backward, with a transposed input.
    #[test]
    fn linear_matches_burns_linear() {
        use burn::module::AutodiffModule;
        use burn::nn::LinearConfig;
        type Fx = Autodiff<Flex>;
        let dev = Default::default();
        let layer = LinearConfig::new(5, 3).init::<Fx>(&dev);
        let data: Vec<f32> = (0..5 * 7)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0)
            .collect();
        let weights: Vec<f32> = (0..7 * 3).map(|i| (i % 5) as f32 - 2.0).collect();
        let run = |generic: bool| {
            GENERIC.set(generic);
            let x = Tensor::<Fx, 2>::from_data(TensorData::new(data.clone(), [5, 7]), &dev)
                .require_grad();
            let y = linear(&layer, x.clone().transpose());
            let w = Tensor::<Fx, 2>::from_data(TensorData::new(weights.clone(), [7, 3]), &dev);
            let grads = (y.clone() * w).sum().backward();
            GENERIC.set(false);
            let bias = layer.bias.as_ref().unwrap();
            [
                y.into_data(),
                x.grad(&grads).unwrap().into_data(),
                layer.weight.grad(&grads).unwrap().into_data(),
                bias.grad(&grads).unwrap().into_data(),
            ]
            .map(|d| d.to_vec::<f32>().unwrap())
        };
        let (fast, generic) = (run(false), run(true));
        for (what, (a, b)) in ["output", "input", "weight", "bias"]
            .iter()
            .zip(fast.iter().zip(&generic))
        {
            assert_eq!(a.len(), b.len(), "{what}");
            for (a, b) in a.iter().zip(b) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{what}: {a} vs {b}"
                );
            }
        }
        // Plain Flex (no autodiff) gives the same output.
        let plain = layer.valid();
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(data.clone(), [5, 7]), &dev);
        let y: Vec<f32> = linear(&plain, x.transpose()).into_data().to_vec().unwrap();
        assert_eq!(y, fast[0]);
    }

    /// Attention on plain Flex against a direct f64 computation, with a sequence of padding only
    /// and heads whose width is not a multiple of 8; both builds of the kernel.
    #[test]
    fn attention_matches_a_direct_computation() {
        let (n, len, d, heads) = (3, 5, 20, 2);
        let dh = d / heads;
        let value = |i: usize, seed: usize| ((i * seed % 23) as f32 - 11.0) / 7.0;
        let [q, k, v]: [Vec<f32>; 3] =
            [3, 5, 7].map(|seed| (0..n * len * d).map(|i| value(i, seed)).collect());
        // Sequence 0 has two padding positions, 1 none, 2 only padding.
        let pad: Vec<bool> = (0..n * len)
            .map(|i| match i / len {
                0 => i % len >= 3,
                1 => false,
                _ => true,
            })
            .collect();
        let mut want = vec![0f64; n * len * d];
        for s in 0..n {
            for h in 0..heads {
                for i in 0..len {
                    let at =
                        |x: &[f32], j: usize, c: usize| x[(s * len + j) * d + h * dh + c] as f64;
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
                    for c in 0..dh {
                        want[(s * len + i) * d + h * dh + c] =
                            (0..len).map(|j| e[j] / sum * at(&v, j, c)).sum();
                    }
                }
            }
        }
        let close = |got: &[f32], what: &str| {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
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
        close(&got.into_data().to_vec::<f32>().unwrap(), "attention");
        let shape = AttentionShape {
            len,
            d,
            heads,
            scale: 1.0 / (dh as f32).sqrt(),
            masked_score: -1e4,
            kept_scale: 1.0,
        };
        for fma in [false, true] {
            let mut out = vec![0f32; n * len * d];
            for s in 0..n {
                let rows = s * len * d..(s + 1) * len * d;
                let (q, k, v) = (&q[rows.clone()], &k[rows.clone()], &v[rows.clone()]);
                let (pad, out) = (&pad[s * len..(s + 1) * len], &mut out[rows]);
                match fma {
                    true => attend_kernel::<true>(&shape, q, k, v, pad, None, out),
                    false => attend_kernel::<false>(&shape, q, k, v, pad, None, out),
                }
            }
            close(&out, if fma { "kernel with FMA" } else { "kernel" });
        }
    }

    #[test]
    fn column_sums_add_every_row() {
        let (rows, n) = (3 * CHUNK / 8 + 5, 8);
        let values: Vec<f32> = (0..rows * n).map(|i| (i % n) as f32 + 1.0).collect();
        let sums = column_sums(&values, n);
        let want: Vec<f32> = (0..n).map(|j| rows as f32 * (j as f32 + 1.0)).collect();
        assert_eq!(sums, want);
    }

    #[test]
    fn exp_neg_is_accurate_and_vanishes_beyond_87() {
        for i in 0..=9000 {
            let a = i as f32 / 100.0;
            let want = (-(a as f64)).exp();
            let got = exp_neg::<false>(a) as f64;
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
