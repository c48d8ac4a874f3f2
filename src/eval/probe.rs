//! The task-agnostic probe of the paper (§4.1): user features → MLP input-512-256-128-64 (ReLU);
//! frozen item vectors → their own MLP; score = dot product, trained with binary cross-entropy
//! against sampled negative items, early-stopped on validation MRR.

use burn::module::AutodiffModule;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::AutodiffBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Widths after the input layer (paper §4.1).
pub const WIDTHS: [usize; 4] = [512, 256, 128, 64];

/// Probe training settings (`[probe]` in a task file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Sampled negative items per training positive.
    pub negatives: usize,
    /// Stop after this many epochs without a better validation MRR.
    pub patience: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            epochs: 40,
            batch_size: 256,
            lr: 1e-3,
            negatives: 4,
            patience: 5,
        }
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    layers: Vec<Linear<B>>,
    activation: Relu,
}

impl<B: Backend> Mlp<B> {
    pub fn new(input: usize, device: &B::Device) -> Self {
        let mut dims = vec![input];
        dims.extend(WIDTHS);
        Self {
            layers: dims
                .windows(2)
                .map(|w| LinearConfig::new(w[0], w[1]).init(device))
                .collect(),
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

/// Row-major host matrix.
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub cols: usize,
}

impl Matrix<'_> {
    fn rows(&self, idx: &[usize]) -> Vec<f32> {
        idx.iter()
            .flat_map(|&r| {
                self.data[r * self.cols..(r + 1) * self.cols]
                    .iter()
                    .copied()
            })
            .collect()
    }
}

fn tensor<B: Backend>(
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::<B, 1>::from_data(TensorData::new(data, [rows * cols]), device).reshape([rows, cols])
}

/// Train a probe on `(user row, positive item)` pairs; `validate(probe)` returns the validation
/// MRR after each epoch, and the best epoch's probe is returned with that MRR.
#[allow(clippy::too_many_arguments)]
pub fn train_probe<B: AutodiffBackend>(
    users: &Matrix,
    items: &Matrix,
    train_pairs: &[(usize, usize)],
    excluded: &dyn Fn(usize, usize) -> bool,
    config: &ProbeConfig,
    seed: u64,
    device: &B::Device,
    mut validate: impl FnMut(&Probe<B::InnerBackend>) -> f64,
) -> (Probe<B::InnerBackend>, f64, usize) {
    B::seed(device, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n_items = items.data.len() / items.cols;
    let mut probe = Probe::<B> {
        user: Mlp::new(users.cols, device),
        item: Mlp::new(items.cols, device),
    };
    let mut optim = AdamConfig::new().init::<B, Probe<B>>();
    let mut best = (probe.valid(), f64::NEG_INFINITY, 0);
    let mut since_best = 0;
    let mut order: Vec<usize> = (0..train_pairs.len()).collect();
    for epoch in 1..=config.epochs {
        use rand::seq::SliceRandom;
        order.shuffle(&mut rng);
        for chunk in order.chunks(config.batch_size.max(1)) {
            let k = 1 + config.negatives;
            let mut u_idx = Vec::with_capacity(chunk.len() * k);
            let mut i_idx = Vec::with_capacity(chunk.len() * k);
            let mut labels = Vec::with_capacity(chunk.len() * k);
            for &p in chunk {
                let (u, pos) = train_pairs[p];
                u_idx.push(u);
                i_idx.push(pos);
                labels.push(1.0f32);
                for _ in 0..config.negatives {
                    let mut j = rng.random_range(0..n_items);
                    for _ in 0..20 {
                        if !excluded(u, j) {
                            break;
                        }
                        j = rng.random_range(0..n_items);
                    }
                    u_idx.push(u);
                    i_idx.push(j);
                    labels.push(0.0);
                }
            }
            let n = u_idx.len();
            let xu = tensor::<B>(users.rows(&u_idx), n, users.cols, device);
            let xi = tensor::<B>(items.rows(&i_idx), n, items.cols, device);
            let s = (probe.user.forward(xu) * probe.item.forward(xi))
                .sum_dim(1)
                .reshape([n]);
            let y = Tensor::<B, 1>::from_data(TensorData::new(labels, [n]), device);
            let loss = -(y.clone() * log_sigmoid(s.clone())
                + (y.ones_like() - y) * log_sigmoid(s.neg()))
            .mean();
            let grads = GradientsParams::from_grads(loss.backward(), &probe);
            probe = optim.step(config.lr, probe, grads);
        }
        let mrr = validate(&probe.valid());
        if mrr > best.1 {
            best = (probe.valid(), mrr, epoch);
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= config.patience {
                break;
            }
        }
    }
    best
}

/// Scores `[users, items]` of a trained probe on host matrices, `chunk` users at a time.
pub fn score_matrix<B: Backend>(
    probe: &Probe<B>,
    users: &Matrix,
    rows: &[usize],
    items: &Matrix,
    device: &B::Device,
) -> Vec<f32> {
    let n_items = items.data.len() / items.cols;
    let item_t = tensor::<B>(items.data.to_vec(), n_items, items.cols, device);
    let item_z = probe.item.forward(item_t);
    let mut out = Vec::with_capacity(rows.len() * n_items);
    for chunk in rows.chunks(512) {
        let u = tensor::<B>(users.rows(chunk), chunk.len(), users.cols, device);
        let s = probe.user.forward(u).matmul(item_z.clone().transpose());
        out.extend(
            s.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32"),
        );
    }
    out
}
