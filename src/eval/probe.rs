//! The task-agnostic probe of the paper (§4.1): user features → MLP input-512-256-128-64 (ReLU);
//! frozen item vectors → their own MLP; score = dot product, trained with binary cross-entropy
//! against sampled negative items, early-stopped on validation MRR (the loop of
//! [`crate::eval::train`]).

use burn::nn::{Linear, Relu};
use burn::prelude::*;

use crate::model::init::Init;

/// Widths after the input layer (paper §4.1).
pub const WIDTHS: [usize; 4] = [512, 256, 128, 64];

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub layers: Vec<Linear<B>>,
    activation: Relu,
}

impl<B: Backend> Mlp<B> {
    pub fn new(input: usize, init: &mut Init<B>) -> Self {
        let mut dims = vec![input];
        dims.extend(WIDTHS);
        Self {
            layers: dims.windows(2).map(|w| init.linear(w[0], w[1])).collect(),
            activation: Relu::new(),
        }
    }

    /// `[n, input]` → `[n, 64]`; ReLU between layers, none after the last.
    pub fn forward(&self, mut x: Tensor<B, 2>) -> Tensor<B, 2> {
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = self.activation.forward(x);
            }
        }
        x
    }
}

#[derive(Module, Debug)]
pub struct Probe<B: Backend> {
    pub user: Mlp<B>,
    pub item: Mlp<B>,
}

impl<B: Backend> Probe<B> {
    pub fn new(user_cols: usize, item_cols: usize, init: &mut Init<B>) -> Self {
        Self {
            user: Mlp::new(user_cols, init),
            item: Mlp::new(item_cols, init),
        }
    }

    /// Logits `[n]` of (user row, item row) pairs of the host matrices.
    pub fn score(&self, users: &Matrix, items: &Matrix, u: &[usize], i: &[usize]) -> Tensor<B, 1> {
        let device = self.user.layers[0].weight.device();
        let n = u.len();
        let xu = tensor::<B>(users.rows(u), n, users.cols, &device);
        let xi = tensor::<B>(items.rows(i), n, items.cols, &device);
        (self.user.forward(xu) * self.item.forward(xi))
            .sum_dim(1)
            .reshape([n])
    }

    /// Scores `[rows, items]` of the users `rows` over every item row, 512 users at a time.
    pub fn score_catalogue(&self, users: &Matrix, rows: &[usize], items: &Matrix) -> Vec<f32> {
        let device = self.user.layers[0].weight.device();
        let n_items = items.data.len() / items.cols;
        let item_t = tensor::<B>(items.data.to_vec(), n_items, items.cols, &device);
        let item_z = self.item.forward(item_t);
        let mut out = Vec::with_capacity(rows.len() * n_items);
        for chunk in rows.chunks(512) {
            let u = tensor::<B>(users.rows(chunk), chunk.len(), users.cols, &device);
            out.extend(host(
                self.user.forward(u).matmul(item_z.clone().transpose()),
            ));
        }
        out
    }
}

/// Row-major host matrix.
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub cols: usize,
}

impl Matrix<'_> {
    pub fn rows(&self, idx: &[usize]) -> Vec<f32> {
        idx.iter()
            .flat_map(|&r| {
                self.data[r * self.cols..(r + 1) * self.cols]
                    .iter()
                    .copied()
            })
            .collect()
    }
}

/// A `[rows, cols]` float tensor from host values.
pub fn tensor<B: Backend>(
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::<B, 1>::from_data(TensorData::new(data, [rows * cols]), device).reshape([rows, cols])
}

/// A tensor's values, row-major, on the host.
pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32")
}
