//! `deepfm` (Guo et al., IJCAI 2017), a task-specific model over four fields: the user's history
//! as a bag of item ids and as a bag of text words, the candidate's id and the candidate's words.
//! Each field is one vector (a bag's mean) and one first-order weight; score = bias + first-order
//! terms + the factorisation machine's pairwise interactions of the four field vectors + an MLP
//! over them (the deep part).

use burn::nn::{Embedding, Linear, Relu};
use burn::prelude::*;

use crate::eval::ids::{IdData, bag_mean};
use crate::eval::task::DeepFmConfig;
use crate::model::init::Init;

/// One field: a vector table and a first-order weight table.
#[derive(Module, Debug)]
struct Field<B: Backend> {
    v: Embedding<B>,
    w: Embedding<B>,
}

impl<B: Backend> Field<B> {
    fn new(n: usize, d: usize, init: &mut Init<B>) -> Self {
        Self {
            v: init.embedding(n.max(1), d),
            w: init.embedding(n.max(1), 1),
        }
    }

    /// Mean vector `[n, d]` and mean first-order weight `[n, 1]` of each bag.
    fn bags<'a>(
        &self,
        bags: impl ExactSizeIterator<Item = &'a [u32]> + Clone,
    ) -> [Tensor<B, 2>; 2] {
        [
            bag_mean(self.v.weight.val(), bags.clone()),
            bag_mean(self.w.weight.val(), bags),
        ]
    }
}

#[derive(Module, Debug)]
pub struct DeepFm<B: Backend> {
    history_items: Field<B>,
    history_words: Field<B>,
    item: Field<B>,
    item_words: Field<B>,
    deep: Vec<Linear<B>>,
    activation: Relu,
}

/// Each user's history: its item ids, and the words of those items (repeats kept).
fn user_bags(ids: &IdData, users: &[usize]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let items: Vec<Vec<u32>> = users.iter().map(|&u| ids.seqs[u].clone()).collect();
    let words = items
        .iter()
        .map(|seq| {
            seq.iter()
                .flat_map(|&i| ids.words[i as usize].iter().copied())
                .collect()
        })
        .collect();
    (items, words)
}

impl<B: Backend> DeepFm<B> {
    pub fn new(c: &DeepFmConfig, ids: &IdData, init: &mut Init<B>) -> Self {
        let d = c.dim;
        Self {
            history_items: Field::new(ids.vocab, d, init),
            history_words: Field::new(ids.n_words, d, init),
            item: Field::new(ids.n_items, d, init),
            item_words: Field::new(ids.n_words, d, init),
            deep: [(4 * d, c.hidden), (c.hidden, c.hidden), (c.hidden, 1)]
                .into_iter()
                .map(|(i, o)| init.linear(i, o))
                .collect(),
            activation: Relu::new(),
        }
    }

    /// The two user fields of `users`: vectors and first-order weights.
    fn user_fields(&self, ids: &IdData, users: &[usize]) -> [[Tensor<B, 2>; 2]; 2] {
        let (items, words) = user_bags(ids, users);
        [
            self.history_items.bags(items.iter().map(Vec::as_slice)),
            self.history_words.bags(words.iter().map(Vec::as_slice)),
        ]
    }

    /// The two candidate fields of `items`.
    fn item_fields(&self, ids: &IdData, items: &[usize]) -> [[Tensor<B, 2>; 2]; 2] {
        let own: Vec<[u32; 1]> = items.iter().map(|&i| [i as u32]).collect();
        [
            self.item.bags(own.iter().map(|x| &x[..])),
            self.item_words
                .bags(items.iter().map(|&i| &ids.words[i][..])),
        ]
    }

    /// Logits `[n]` of row-aligned user and item fields.
    fn combine(&self, fields: [[Tensor<B, 2>; 2]; 4]) -> Tensor<B, 1> {
        let n = fields[0][0].dims()[0];
        let first = fields
            .iter()
            .map(|[_, w]| w.clone())
            .reduce(|a, b| a + b)
            .expect("four fields")
            .reshape([n]);
        let v: Vec<Tensor<B, 2>> = fields.into_iter().map(|[v, _]| v).collect();
        let sum = v.iter().cloned().reduce(|a, b| a + b).expect("four fields");
        let squares = v
            .iter()
            .map(|x| x.clone().powi_scalar(2))
            .reduce(|a, b| a + b)
            .expect("four fields");
        let fm = ((sum.powi_scalar(2) - squares).sum_dim(1) * 0.5).reshape([n]);
        let mut x = Tensor::cat(v, 1);
        let last = self.deep.len() - 1;
        for (k, layer) in self.deep.iter().enumerate() {
            x = layer.forward(x);
            if k < last {
                x = self.activation.forward(x);
            }
        }
        first + fm + x.reshape([n])
    }

    /// Logits `[n]` of (user row, catalogue item) pairs.
    pub fn score(&self, ids: &IdData, users: &[usize], items: &[usize]) -> Tensor<B, 1> {
        let [u1, u2] = self.user_fields(ids, users);
        let [i1, i2] = self.item_fields(ids, items);
        self.combine([u1, u2, i1, i2])
    }

    /// Scores `[rows, n_items]` of the users `rows` over the catalogue.
    pub fn score_catalogue(&self, ids: &IdData, rows: &[usize]) -> Vec<f32> {
        let n = ids.n_items;
        let catalogue: Vec<usize> = (0..n).collect();
        let items = self.item_fields(ids, &catalogue);
        let users = self.user_fields(ids, rows);
        let mut out = Vec::with_capacity(rows.len() * n);
        for r in 0..rows.len() {
            let row = |t: &Tensor<B, 2>| t.clone().narrow(0, r, 1).repeat_dim(0, n);
            let [[a, b], [c, d]] = &users;
            out.extend(crate::eval::probe::host(self.combine([
                [row(a), row(b)],
                [row(c), row(d)],
                items[0].clone(),
                items[1].clone(),
            ])));
        }
        out
    }
}
