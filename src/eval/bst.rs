//! `bst`, the Behavior Sequence Transformer (Chen et al., 2019), a task-specific model: a
//! Transformer encoder over the user's last `max_len` feature items (item tower + a learned
//! position counted from the most recent item), then target-aware scoring — the candidate item
//! attends over the encoder's outputs, and an MLP reads [attended, candidate, their product].
//!
//! The paper's BST appends the candidate to the sequence and runs the encoder once per
//! candidate; attending from the candidate over the encoded history keeps the score
//! target-aware while one encoder pass per user serves the whole catalogue.

use burn::nn::{Embedding, Linear, Relu};
use burn::prelude::*;
use burn::tensor::activation::softmax;

use crate::eval::hybrid::{FeatureTower, user_side};
use crate::eval::ids::{IdData, ItemTower, int_tensor};
use crate::eval::probe::Matrix;
use crate::eval::task::BstConfig;
use crate::model::block::Encoder;
use crate::model::init::Init;

#[derive(Module, Debug)]
pub struct Bst<B: Backend> {
    items: ItemTower<B>,
    position: Embedding<B>,
    encoder: Encoder<B>,
    query: Linear<B>,
    hidden: Linear<B>,
    out: Linear<B>,
    activation: Relu,
    max_len: usize,
    /// `hybrid`: CLUE user features, added to the attended history.
    clue: Option<FeatureTower<B>>,
}

/// Encoded histories `[b, max_len, dim]` and their padding as an additive bias `[b, 1, max_len]`
/// (0 for items, -1e9 for padding).
struct Encoded<B: Backend> {
    h: Tensor<B, 3>,
    bias: Tensor<B, 3>,
}

impl<B: Backend> Bst<B> {
    /// `clue_cols`: the width of the user features of a `hybrid` (`None`: plain BST).
    pub fn new(c: &BstConfig, ids: &IdData, clue_cols: Option<usize>, init: &mut Init<B>) -> Self {
        let d = c.dim;
        Self {
            items: ItemTower::new(ids, d, init),
            position: init.embedding(c.max_len, d),
            encoder: Encoder::new(d, 4 * d, c.heads, c.layers, c.dropout, init),
            query: init.linear(d, d),
            hidden: init.linear(3 * d, d),
            out: init.linear(d, 1),
            activation: Relu::new(),
            max_len: c.max_len,
            clue: FeatureTower::new(clue_cols, d, init),
        }
    }

    /// Encode the last `max_len` feature items of each of `users`, padded to the longest.
    fn encode(&self, ids: &IdData, users: &[usize]) -> Encoded<B> {
        let device = self.position.weight.device();
        let longest = users.iter().map(|&u| ids.seqs[u].len()).max().unwrap_or(0);
        let (n, l) = (users.len(), longest.clamp(1, self.max_len));
        let (mut items, mut pos, mut pad) =
            (vec![0usize; n * l], vec![0i64; n * l], vec![true; n * l]);
        for (r, &u) in users.iter().enumerate() {
            let seq = &ids.seqs[u];
            let recent = &seq[seq.len().saturating_sub(l)..];
            for (k, &i) in recent.iter().enumerate() {
                items[r * l + k] = i as usize;
                pos[r * l + k] = (recent.len() - 1 - k) as i64;
                pad[r * l + k] = false;
            }
        }
        let d = self.position.weight.dims()[1];
        let x = self.items.forward(ids, &items).reshape([n, l, d])
            + self.position.forward(int_tensor(pos, [n, l], &device));
        let pad =
            Tensor::<B, 1, Bool>::from_data(TensorData::new(pad, [n * l]), &device).reshape([n, l]);
        let h = self.encoder.forward(x, pad.clone());
        let bias = Tensor::<B, 2>::zeros([n, l], &device)
            .mask_fill(pad, -1e9)
            .reshape([n, 1, l]);
        Encoded { h, bias }
    }

    /// Logits `[b·m]` of `m` candidates `t` `[b, m, dim]` against each of `b` encoded histories;
    /// `clue` `[b, dim]`: a hybrid's projected user features, added to the attended history.
    fn head(&self, e: Encoded<B>, t: Tensor<B, 3>, clue: Option<Tensor<B, 2>>) -> Tensor<B, 1> {
        let [b, m, d] = t.dims();
        let q = self.query.forward(t.clone());
        let logits = q.matmul(e.h.clone().swap_dims(1, 2)) / (d as f64).sqrt() + e.bias;
        let mut a = softmax(logits, 2).matmul(e.h);
        if let Some(c) = clue {
            a = a + c.reshape([b, 1, d]);
        }
        let a = a.reshape([b * m, d]);
        let t = t.reshape([b * m, d]);
        let x = Tensor::cat(vec![a.clone(), t.clone(), a.clone() * t.clone()], 1);
        let mlp = self
            .out
            .forward(self.activation.forward(self.hidden.forward(x)))
            .reshape([b * m]);
        mlp + (a * t).sum_dim(1).reshape([b * m])
    }

    /// Logits `[n]` of (user row, catalogue item) pairs; each distinct user encoded once. `clue`:
    /// a hybrid's user features.
    pub fn score(
        &self,
        ids: &IdData,
        clue: Option<&Matrix>,
        users: &[usize],
        items: &[usize],
    ) -> Tensor<B, 1> {
        let device = self.position.weight.device();
        let mut distinct: Vec<usize> = users.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let e = self.encode(ids, &distinct);
        let at = users
            .iter()
            .map(|u| distinct.binary_search(u).expect("listed") as i64);
        let sel = int_tensor(at, [users.len()], &device);
        let e = Encoded {
            h: e.h.select(0, sel.clone()),
            bias: e.bias.select(0, sel),
        };
        let t = self.items.forward(ids, items);
        let [n, d] = t.dims();
        self.head(e, t.reshape([n, 1, d]), user_side(&self.clue, clue, users))
    }

    /// Scores `[rows, n_items]` of the users `rows` over the catalogue.
    pub fn score_catalogue(&self, ids: &IdData, clue: Option<&Matrix>, rows: &[usize]) -> Vec<f32> {
        let catalogue: Vec<usize> = (0..ids.n_items).collect();
        let t = self.items.forward(ids, &catalogue);
        let [n, d] = t.dims();
        let t = t.reshape([1, n, d]);
        let mut out = Vec::with_capacity(rows.len() * n);
        for chunk in rows.chunks(64) {
            let e = self.encode(ids, chunk);
            let side = user_side(&self.clue, clue, chunk);
            for r in 0..chunk.len() {
                let one = Encoded {
                    h: e.h.clone().narrow(0, r, 1),
                    bias: e.bias.clone().narrow(0, r, 1),
                };
                let c = side.as_ref().map(|s| s.clone().narrow(0, r, 1));
                out.extend(crate::eval::probe::host(self.head(one, t.clone(), c)));
            }
        }
        out
    }
}
