//! Linear layers on Flex. Flex's matrix product zero-fills a byte buffer, copies it into an
//! aligned one and adds the bias in a separate pass. Here `x·W + b` is one product (clue's
//! AVX-512 kernel of [`Panels`] for small weights where the CPU has it, else the gemm crate, as
//! Flex) added to rows that start as the bias; the backward step writes the gradients straight
//! from their products.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::{DType, TensorMetadata};
use rayon::prelude::*;

use super::panels::{Operand, Panels, Start};
use super::{CHUNK, FlexFloat, f32s, from_flex, tensor, to_flex};
use crate::backend::BackendKind;

/// `x·W + b` of a linear layer with a bias, for `x`: `[rows, d_in]` (Burn's `Linear::forward`).
/// On Flex: one matrix product added to rows that start as the bias (Flex's own product
/// zero-fills a byte buffer and copies it to an aligned one, then adds the bias in another pass);
/// its backward step writes the gradients straight from the products too.
/// `Err(x)`, the input back, when the layer has no bias or `x` is not an f32 tensor of Flex or
/// `Autodiff<Flex>`: the caller takes the generic path.
pub fn linear<B: Backend>(
    layer: &Linear<B>,
    x: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let Some(bias) = &layer.bias else {
        return Err(x);
    };
    let x = to_flex(x)?;
    let (Ok(w), Ok(b)) = (to_flex(layer.weight.val()), to_flex(bias.val())) else {
        unreachable!("a Flex input and its layer share the backend");
    };
    Ok(from_flex(match (x, w, b) {
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
    }))
}

/// A plain Flex linear layer with a bias: its weight (`[d_in, d_out]`) and bias, contiguous.
pub(super) struct Dense {
    w: FlexTensor,
    b: FlexTensor,
    /// `[d_in, d_out]`.
    pub(super) dims: [usize; 2],
}

impl Dense {
    /// `None` when `layer` has no bias or is not a plain Flex module.
    pub(super) fn of<B: Backend>(layer: &Linear<B>) -> Option<Self> {
        let bias = layer.bias.as_ref()?.val();
        let ([w], [b]) = (plain([layer.weight.val()]).ok()?, plain([bias]).ok()?);
        let (w, b) = (w.to_contiguous(), b.to_contiguous());
        let dims = dims2(&w);
        assert_eq!(f32s(&b).len(), dims[1], "linear: a bias of another size");
        Some(Self { w, b, dims })
    }

    /// The weight as a product's right operand.
    pub(super) fn weight(&self) -> Operand<'_> {
        (f32s(&self.w), self.dims[1], 1)
    }

    pub(super) fn bias(&self) -> &[f32] {
        f32s(&self.b)
    }
}

/// The plain Flex tensors of `tensors`, or all of them back when one is not one.
pub(super) fn plain<B: Backend, const D: usize, const N: usize>(
    tensors: [Tensor<B, D>; N],
) -> Result<[FlexTensor; N], [Tensor<B, D>; N]> {
    if tensors.iter().any(|t| t.dtype() != DType::F32)
        || BackendKind::of::<B>() != BackendKind::Flex
        || B::ad_enabled(&tensors[0].device())
    {
        return Err(tensors);
    }
    Ok(tensors.map(|t| match to_flex(t) {
        Ok(FlexFloat::Plain(t)) => t,
        _ => unreachable!("an f32 tensor of plain Flex"),
    }))
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
            let dx = product([m, n, k], (gs, n, 1), (ws, 1, n), Start::Zero);
            grads.register::<Flex>(node.id, tensor(dx, [m, k]));
        }
        if let Some(node) = node_w {
            // xᵀ · grad: [k, m] · [m, n].
            let dw = product([k, m, n], (xs, 1, k), (gs, n, 1), Start::Zero);
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
    let out = product(
        [m, k, n],
        (f32s(&x), k, 1),
        (f32s(&w), n, 1),
        Start::Bias(f32s(&b)),
    );
    tensor(out, [m, n])
}

/// A product's right operand as given, and packed into [`Panels`] where clue's AVX-512 kernel
/// takes it (the gemm crate runs the others).
pub(super) struct Right<'a> {
    given: Operand<'a>,
    panels: Option<Panels>,
}

impl<'a> Right<'a> {
    /// `rhs` (`[k, n]`) of products of `m` rows in all, with left operands of unit column
    /// stride: packed when [`Panels::pack`] takes it.
    pub(super) fn new([m, k, n]: [usize; 3], rhs: Operand<'a>) -> Self {
        let panels = Panels::pack([m, k, n], rhs);
        Right { given: rhs, panels }
    }

    /// `rhs` for the gemm crate.
    fn unpacked(rhs: Operand<'a>) -> Self {
        Right {
            given: rhs,
            panels: None,
        }
    }
}

/// `lhs · rhs` for `[m, k, n]` = (`[m, k]`, `[k, n]`), each operand a slice with its row and
/// column strides; row-major `[m, n]`, added to `start`. A right operand that [`Panels`]
/// takes is packed once for clue's AVX-512 kernel; the others go to the gemm crate, as Flex. A
/// large product with many rows runs as blocks of rows on the rayon pool, each block one
/// single-threaded call whose output rows get their start while they are in cache (on 2 cores,
/// copying the bias into all the rows first took a tenth of an inference call on one thread,
/// and the gemm crate's own split of these shapes left a thread idle); a product with few rows
/// (a weight gradient: `d_in` rows) uses the gemm crate's own threads.
pub(crate) fn product([m, k, n]: [usize; 3], lhs: Operand, rhs: Operand, start: Start) -> Vec<f32> {
    check_operands([m, k, n], lhs, rhs, start);
    let mut out = Vec::with_capacity(m * n);
    let spare = &mut out.spare_capacity_mut()[..m * n];
    let big = m * n * k >= PARALLEL_PRODUCT;
    let rhs = match lhs.2 {
        1 => Right::new([m, k, n], rhs),
        _ => Right::unpacked(rhs),
    };
    // A packed right operand serves at least 256 rows, always enough for blocks; a product with
    // few rows but much work runs on the gemm crate's threads.
    let blocks = big
        .then(|| block_rows(m, [k, n], rhs.panels.is_some()))
        .flatten();
    assert!(
        !big || blocks.is_some() || rhs.panels.is_none(),
        "product: a packed operand without blocks"
    );
    // SAFETY (each `product_rows`): the operands and the start were checked for all `m` rows;
    // each call writes all the values of its rows, which together are all `m·n` values.
    match blocks {
        Some(rows) => spare
            .par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(i, part)| unsafe {
                let one = gemm::Parallelism::None;
                product_rows([k, n], i * rows, lhs, &rhs, start, part, one)
            }),
        None => unsafe {
            let threads = match big {
                true => gemm::Parallelism::Rayon(0),
                false => gemm::Parallelism::None,
            };
            product_rows([k, n], 0, lhs, &rhs, start, spare, threads)
        },
    }
    unsafe { out.set_len(m * n) };
    out
}

/// Panics unless both operands and the start lie inside their slices.
fn check_operands([m, k, n]: [usize; 3], lhs: Operand, rhs: Operand, start: Start) {
    let inside = |(values, rs, cs): Operand, rows: usize, cols: usize| {
        rows * cols == 0 || (rows - 1) * rs + (cols - 1) * cs < values.len()
    };
    assert!(inside(lhs, m, k), "product: left operand out of bounds");
    assert!(inside(rhs, k, n), "product: right operand out of bounds");
    let fits = match start {
        Start::Zero => true,
        Start::Bias(bias) => bias.len() == n,
        Start::Residual(rows, bias) => rows.len() == m * n && bias.len() == n,
    };
    assert!(fits, "product: start size");
}

/// Rows `first..first + out.len() / n` of [`product`] into `out`: `first` offsets the left
/// operand and a residual start's rows. clue's AVX-512 kernel where the right operand is
/// packed into panels (and the left one has unit column stride), else the gemm crate with
/// `parallelism`.
///
/// # Safety
/// The left operand holds rows `first..first + out.len() / n` of `k` columns and the right one
/// `k` rows of `n` columns at their strides, and a start's slices are as [`check_operands`]
/// requires of a product of `first + out.len() / n` rows.
pub(super) unsafe fn product_rows(
    [k, n]: [usize; 2],
    first: usize,
    (lhs, lhs_rs, lhs_cs): Operand,
    rhs: &Right,
    start: Start,
    out: &mut [MaybeUninit<f32>],
    parallelism: gemm::Parallelism,
) {
    let rows = out.len() / n.max(1);
    if rows == 0 {
        return;
    }
    if let Some(panels) = rhs.panels.as_ref().filter(|_| lhs_cs == 1) {
        assert_eq!(panels.dims(), [k, n], "product: panels of another shape");
        panels.product_rows(first, (lhs, lhs_rs, lhs_cs), start, out);
        return;
    }
    let (rhs, rhs_rs, rhs_cs) = rhs.given;
    match start {
        Start::Zero if k == 0 => out.fill(MaybeUninit::new(0.0)),
        Start::Zero => {}
        Start::Bias(bias) => out
            .chunks_exact_mut(n)
            .for_each(|row| _ = row.write_copy_of_slice(bias)),
        Start::Residual(values, bias) => {
            let values = &values[first * n..(first + rows) * n];
            for (row, from) in out.chunks_exact_mut(n).zip(values.chunks_exact(n)) {
                for ((o, v), b) in row.iter_mut().zip(from).zip(bias) {
                    o.write(v + b);
                }
            }
        }
    }
    if k == 0 {
        // Nothing to add: the sum over an empty axis.
        return;
    }
    // SAFETY: `out` holds `rows·n` values with row stride `n`, read only when the start
    // wrote them; rows `first..first + rows` of the left operand and all of the right one lie
    // inside their slices (the caller's contract). gemm writes every value of `out`.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            !matches!(start, Start::Zero),
            lhs.as_ptr().add(first * lhs_rs),
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
    }
}

/// Products of at least this many multiply-adds (tens of µs on one core) run on every core.
pub(super) const PARALLEL_PRODUCT: usize = 1 << 20;

/// Rows per block of a parallel product `[m, k, n]`, or `None` when it has too few rows to
/// cut: about four blocks per thread (so that a thread held up elsewhere does not hold up the
/// product), of about 256 KiB of output where the other bounds allow (it stays in cache between
/// the start and the product). The gemm crate packs the right operand again for each block, so
/// a block has at least 64 rows, or 256 when that operand does not fit in 256 KiB (a core's
/// cache): then packing costs at most about 1/256 of the block's work. A right operand packed
/// once into [`Panels`] (`packed`) needs only the 64.
fn block_rows(m: usize, [k, n]: [usize; 2], packed: bool) -> Option<usize> {
    let least = if packed || k * n <= 64 * 1024 {
        64
    } else {
        256
    };
    let rows = m
        .div_ceil(4 * rayon::current_num_threads())
        .min(64 * 1024 / n.max(1))
        .next_multiple_of(16)
        .max(least);
    (m >= 2 * rows).then_some(rows)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::VectorPath;
    use burn::backend::Autodiff;

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
            let x = Tensor::<Fx, 2>::from_data(TensorData::new(data.clone(), [5, 7]), &dev)
                .require_grad();
            // The reference: Burn's own `Linear::forward`, on the same backend.
            let y = match generic {
                true => layer.forward(x.clone().transpose()),
                false => linear(&layer, x.clone().transpose()).expect("an Autodiff<Flex> input"),
            };
            let w = Tensor::<Fx, 2>::from_data(TensorData::new(weights.clone(), [7, 3]), &dev);
            let grads = (y.clone() * w).sum().backward();
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
        let y: Vec<f32> = linear(&plain, x.transpose())
            .expect("a Flex input")
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(y, fast[0]);
    }

    /// The product in each of its ways (one thread; blocks of rows, with clue's AVX-512 kernel
    /// where the CPU has it and the left operand has unit column stride, else the gemm crate;
    /// the gemm crate's threads), with and without a bias, a transposed left operand, and an
    /// empty inner axis, against sums in f64.
    #[test]
    fn product_matches_direct_sums() {
        let value = |i: usize, salt: usize| ((i * 31 + salt) % 23) as f32 / 11.0 - 1.0;
        for [m, k, n] in [[9, 5, 7], [300, 70, 50], [40, 600, 60], [150, 0, 8]] {
            let parallel = m * n * k >= PARALLEL_PRODUCT;
            assert_eq!(
                (parallel, parallel && block_rows(m, [k, n], false).is_some()),
                (m == 300 || m == 40, m == 300),
                "[{m}, {k}, {n}]: the way this case is meant to test"
            );
            let (a, b) = (
                (0..m * k).map(|i| value(i, 1)).collect::<Vec<_>>(),
                (0..k * n).map(|i| value(i, 2)).collect::<Vec<_>>(),
            );
            let avx512 = VectorPath::active() == VectorPath::Avx512;
            assert_eq!(
                Right::new([m, k, n], (&b, n, 1)).panels.is_some(),
                avx512 && m == 300,
                "[{m}, {k}, {n}]: clue's kernel"
            );
            let bias: Vec<f32> = (0..n).map(|i| value(i, 3)).collect();
            let residual: Vec<f32> = (0..m * n).map(|i| value(i, 4)).collect();
            // `a` read as stored ([m, k]) and as its transpose stored ([k, m]); the output
            // starting as zero, as the bias, and as residual rows plus the bias.
            for (lhs, rs, cs) in [(&a, k, 1), (&a, 1, m)] {
                for start in [0, 1, 2] {
                    let got = product(
                        [m, k, n],
                        (lhs, rs, cs),
                        (&b, n, 1),
                        match start {
                            0 => Start::Zero,
                            1 => Start::Bias(&bias),
                            _ => Start::Residual(&residual, &bias),
                        },
                    );
                    assert_eq!(got.len(), m * n);
                    for (at, got) in got.iter().enumerate() {
                        let (i, j) = (at / n, at % n);
                        let want = (0..k)
                            .map(|l| lhs[i * rs + l * cs] as f64 * b[l * n + j] as f64)
                            .sum::<f64>()
                            + match start {
                                0 => 0.0,
                                1 => bias[j] as f64,
                                _ => (bias[j] + residual[at]) as f64,
                            };
                        assert!(
                            (*got as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "[{m}, {k}, {n}] at ({i}, {j}), start {start}: {got} vs {want}"
                        );
                    }
                }
            }
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
}
