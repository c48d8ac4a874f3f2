//! A fixed sparse matrix times a dense one, `A·x`, on Flex: LightGCN's neighbour sums over the
//! user–item graph and the word bags of its item tower. The generic path gathers a row of `x` per
//! entry, scales it and scatter-adds it (Flex copies the whole output for the scatter and the
//! whole input for its backward); here each output row is summed from its entries in compressed
//! rows (CSR), in parallel over rows, and the backward step is `Aᵀ·grad` from the transpose's
//! own compressed rows.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::{Flex, FlexTensor};
use burn::prelude::*;
use burn::tensor::TensorMetadata;
use rayon::prelude::*;

use super::{FlexAutodiffTensor, f32s, on_flex, tensor};

/// Output values per parallel task (whole rows).
const TASK: usize = 8 * 1024;

/// Compressed rows: row `r`'s entries are `col[start[r]..start[r + 1]]` with values `val[..]`.
#[derive(Debug, Clone)]
struct Csr {
    start: Vec<usize>,
    col: Vec<u32>,
    val: Vec<f32>,
}

impl Csr {
    /// From `(row, col, value)` entries, kept in their given order within a row.
    fn new(rows: usize, entries: &[(u32, u32, f32)]) -> Self {
        let mut start = vec![0usize; rows + 1];
        for &(r, _, _) in entries {
            start[r as usize + 1] += 1;
        }
        for r in 0..rows {
            start[r + 1] += start[r];
        }
        let mut next = start.clone();
        let (mut col, mut val) = (vec![0u32; entries.len()], vec![0f32; entries.len()]);
        for &(r, c, v) in entries {
            let at = &mut next[r as usize];
            (col[*at], val[*at]) = (c, v);
            *at += 1;
        }
        Self { start, col, val }
    }

    /// `self · x`, `x` `[cols, d]` row-major → `[rows, d]`.
    fn times(&self, x: &[f32], d: usize) -> Vec<f32> {
        let rows = self.start.len() - 1;
        let mut out = vec![0f32; rows * d];
        if d == 0 {
            return out;
        }
        let per_task = (TASK / d).max(1);
        out.par_chunks_mut(per_task * d)
            .enumerate()
            .for_each(|(t, chunk)| {
                for (k, o) in chunk.chunks_exact_mut(d).enumerate() {
                    let r = t * per_task + k;
                    for e in self.start[r]..self.start[r + 1] {
                        let (c, w) = (self.col[e] as usize, self.val[e]);
                        for (o, &x) in o.iter_mut().zip(&x[c * d..(c + 1) * d]) {
                            *o += w * x;
                        }
                    }
                }
            });
        out
    }
}

/// A `rows × cols` sparse matrix of f32 with its transpose, built once and multiplied with
/// dense matrices many times ([`crate::model::ops::sparse_times`]).
#[derive(Debug, Clone)]
pub struct SparseMatrix {
    rows: usize,
    cols: usize,
    a: Csr,
    at: Csr,
}

impl SparseMatrix {
    /// From `(row, col, value)` entries (a repeated position adds up).
    pub fn new(rows: usize, cols: usize, entries: &[(u32, u32, f32)]) -> Self {
        assert!(
            entries
                .iter()
                .all(|&(r, c, _)| (r as usize) < rows && (c as usize) < cols),
            "a sparse entry outside {rows} × {cols}"
        );
        let flipped: Vec<(u32, u32, f32)> = entries.iter().map(|&(r, c, v)| (c, r, v)).collect();
        Self {
            rows,
            cols,
            a: Csr::new(rows, entries),
            at: Csr::new(cols, &flipped),
        }
    }

    /// The transpose (both directions are kept, so this is a swap).
    pub fn transpose(&self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            a: self.at.clone(),
            at: self.a.clone(),
        }
    }

    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Every entry as `(row, col, value)`, row by row.
    pub fn entries(&self) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
        (0..self.rows).flat_map(move |r| {
            (self.a.start[r]..self.a.start[r + 1])
                .map(move |e| (r, self.a.col[e] as usize, self.a.val[e]))
        })
    }
}

/// `a · x` (`x` `[cols, d]` → `[rows, d]`); `Err(x)`, the input back, when `x` is not an f32
/// tensor of Flex or `Autodiff<Flex>`: the caller takes the generic path.
pub fn sparse_times<B: Backend>(
    a: &Arc<SparseMatrix>,
    x: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    on_flex(x, |x| flex_times(&a.a, x), |x| autodiff_times(a, x))
}

fn flex_times(a: &Csr, x: FlexTensor) -> FlexTensor {
    let x = x.to_contiguous();
    let d = x.shape()[1];
    tensor(a.times(f32s(&x), d), [a.start.len() - 1, d])
}

/// The backward step of [`sparse_times`] under `Autodiff<Flex>`: `Aᵀ · grad`.
#[derive(Debug)]
struct TimesBackward;

impl Backward<Flex, 1> for TimesBackward {
    type State = Arc<SparseMatrix>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let a = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| flex_times(&a.at, grad));
    }
}

fn autodiff_times(a: &Arc<SparseMatrix>, x: FlexAutodiffTensor) -> FlexAutodiffTensor {
    match TimesBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = flex_times(&a.a, x.primitive);
            prep.finish(a.clone(), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_times(&a.a, x.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    use crate::model::ops;

    /// `y = A·x` and `∂(Σ y ⊙ r)/∂x` through `ops::sparse_times` on backend `B`.
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        a: &Arc<SparseMatrix>,
        x: &[f32],
        r: &[f32],
        d: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let dev = Default::default();
        let [rows, cols] = a.shape();
        let x =
            Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [cols, d]), &dev).require_grad();
        let r = Tensor::<B, 2>::from_data(TensorData::new(r.to_vec(), [rows, d]), &dev);
        let y = ops::sparse_times(a, x.clone());
        let grads = (y.clone() * r).sum().backward();
        let dx = x.grad(&grads).unwrap().into_data().convert::<f32>();
        (
            y.into_data().convert::<f32>().to_vec().unwrap(),
            dx.to_vec().unwrap(),
        )
    }

    #[test]
    fn the_flex_product_and_its_gradient_match_a_dense_product_and_the_generic_path() {
        let (rows, cols, d) = (5, 7, 3);
        // Row 3 is empty; (0, 2) is given twice and adds up.
        let entries = [
            (0, 2, 0.5),
            (4, 6, -1.5),
            (0, 2, 0.25),
            (1, 0, 2.0),
            (2, 6, 1.0),
            (4, 1, 3.0),
        ];
        let a = Arc::new(SparseMatrix::new(rows, cols, &entries));
        let x: Vec<f32> = (0..cols * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let r: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.61).cos()).collect();
        let mut dense = vec![0f32; rows * cols];
        for &(i, j, v) in &entries {
            dense[i as usize * cols + j as usize] += v;
        }
        let (mut want_y, mut want_dx) = (vec![0f32; rows * d], vec![0f32; cols * d]);
        for i in 0..rows {
            for j in 0..cols {
                for k in 0..d {
                    want_y[i * d + k] += dense[i * cols + j] * x[j * d + k];
                    want_dx[j * d + k] += dense[i * cols + j] * r[i * d + k];
                }
            }
        }
        let flex = run::<Autodiff<Flex>>(&a, &x, &r, d);
        let generic = run::<Autodiff<NdArray>>(&a, &x, &r, d);
        for (got, want) in [
            (&flex.0, &want_y),
            (&flex.1, &want_dx),
            (&generic.0, &want_y),
            (&generic.1, &want_dx),
        ] {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
        assert!(
            flex.0[3 * d..4 * d].iter().all(|&v| v == 0.0),
            "the empty row is 0"
        );
        // The transpose maps the other way.
        let t = a.transpose();
        assert_eq!(t.shape(), [cols, rows]);
        let mut te: Vec<_> = t.entries().map(|(i, j, v)| (j, i, v)).collect();
        let mut ae: Vec<_> = a.entries().collect();
        te.sort_by(|p, q| p.partial_cmp(q).unwrap());
        ae.sort_by(|p, q| p.partial_cmp(q).unwrap());
        assert_eq!(te, ae);
    }
}
