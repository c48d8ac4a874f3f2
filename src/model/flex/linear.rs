//! Linear layers on Flex. Flex's matrix product zero-fills a byte buffer, copies it into an
//! aligned one and adds the bias in a separate pass. Here `x·W + b` is one product (the gemm
//! crate, as Flex) added to rows that start as the bias; the backward step writes the gradients
//! straight from their products.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::{CHUNK, FlexFloat, f32s, from_flex, tensor, to_flex};

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
pub(crate) fn product(
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

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn column_sums_add_every_row() {
        let (rows, n) = (3 * CHUNK / 8 + 5, 8);
        let values: Vec<f32> = (0..rows * n).map(|i| (i % n) as f32 + 1.0).collect();
        let sums = column_sums(&values, n);
        let want: Vec<f32> = (0..n).map(|j| rows as f32 * (j as f32 + 1.0)).collect();
        assert_eq!(sums, want);
    }
}
