//! The CLUE encoder (paper §2.1): tokens → Item Transformer → item vectors → Service
//! Transformer → user embedding z, one encoder for every service.

use burn::nn::{Embedding, LayerNorm, Linear};
use burn::prelude::*;

use crate::data::batcher::UserBatch;
use crate::model::block::Encoder;
use crate::model::config::{ModelConfig, ModelKind};
use crate::model::init::Init;
use crate::model::ops::pooled;

fn transformer<B: Backend>(c: &ModelConfig, layers: usize, init: &mut Init<B>) -> Encoder<B> {
    Encoder::new(c.d_model, c.d_ff, c.heads, layers, c.dropout, init)
}

/// T_item: a pre-norm Transformer over one item's tokens, mean-pooled (paper eq. 1).
#[derive(Module, Debug)]
pub struct ItemTransformer<B: Backend> {
    pub encoder: Encoder<B>,
    pub norm: LayerNorm<B>,
}

impl<B: Backend> ItemTransformer<B> {
    /// `tokens`: `[items, len, d]` embedded tokens, `pad`: `[items, len]` → item vectors `[items, d]`.
    pub fn forward(&self, tokens: Tensor<B, 3>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 2> {
        let h = self.encoder.forward(tokens, pad.clone());
        pooled(&self.norm, h, pad)
    }
}

/// T_service: a learned position per item slot, then a pre-norm Transformer over the sequence of
/// item vectors, mean-pooled into the user's embedding for that service (paper eqs. 2–3). A flat
/// model runs it over every token of the user's items instead (see [`ModelKind::Flat`]).
#[derive(Module, Debug)]
pub struct ServiceTransformer<B: Backend> {
    pub position: Embedding<B>,
    pub encoder: Encoder<B>,
    pub norm: LayerNorm<B>,
}

impl<B: Backend> ServiceTransformer<B> {
    /// `items`: `[users, slots, d]`, `pad`: `[users, slots]` → `[users, d]`.
    pub fn forward(&self, items: Tensor<B, 3>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 2> {
        let [users, slots, _] = items.dims();
        // Written out on the host: an expanded `arange` would take a copy kernel on a GPU (the
        // embedding's lookup reads its indices contiguous).
        let slot: Vec<i64> = (0..users * slots).map(|i| (i % slots) as i64).collect();
        let slot = Tensor::from_data(TensorData::new(slot, [users, slots]), &items.device());
        self.forward_at(items, slot, pad)
    }

    /// `x`: `[users, len, d]`, with each position's item slot `slot`: `[users, len]`.
    fn forward_at(
        &self,
        x: Tensor<B, 3>,
        slot: Tensor<B, 2, Int>,
        pad: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 2> {
        let h = self
            .encoder
            .forward(x + self.position.forward(slot), pad.clone());
        pooled(&self.norm, h, pad)
    }
}

/// Where each of `slots · len` flattened positions sits: its item slot and its place in the
/// item, each `[1, slots·len]`.
fn token_places<B: Backend>(
    slots: usize,
    len: usize,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let index = Tensor::<B, 1, Int>::arange(0..(slots * len) as i64, device);
    let slot = index.clone().div_scalar(len as i64).unsqueeze::<2>();
    (slot, index.remainder_scalar(len as i64).unsqueeze::<2>())
}

/// The user encoder: token embedding, Item Transformer, Service Transformer and the optional
/// output-dimension reduction (paper Table 6).
///
/// A flat model ([`ModelKind::Flat`]) has no Item Transformer: its `service` Transformer reads
/// every token of the user's items, each at its item slot's position plus its place in the item
/// (`token_position`), so padding inside or after the items changes nothing.
#[derive(Module, Debug)]
pub struct ClueEncoder<B: Backend> {
    pub token_embedding: Embedding<B>,
    /// None in a flat model.
    pub item: Option<ItemTransformer<B>>,
    pub service: ServiceTransformer<B>,
    /// A token's place in its item: flat models only.
    pub token_position: Option<Embedding<B>>,
    pub output: Option<Linear<B>>,
}

impl<B: Backend> ClueEncoder<B> {
    pub fn new(c: &ModelConfig, init: &mut Init<B>) -> Self {
        let flat = c.kind == ModelKind::Flat;
        Self {
            token_embedding: init.embedding(c.vocab_size, c.d_model),
            item: (!flat).then(|| ItemTransformer {
                encoder: transformer(c, c.item_layers, init),
                norm: init.layer_norm(c.d_model),
            }),
            service: ServiceTransformer {
                position: init.embedding(c.max_items, c.d_model),
                encoder: transformer(
                    c,
                    c.service_layers + if flat { c.item_layers } else { 0 },
                    init,
                ),
                norm: init.layer_norm(c.d_model),
            },
            token_position: flat.then(|| init.embedding(c.max_item_tokens, c.d_model)),
            output: (c.output_dim > 0).then(|| init.linear(c.d_model, c.output_dim)),
        }
    }

    /// Whether this is a flat model: users are encoded from tokens ([`Self::encode_flat`]),
    /// never from item vectors.
    pub fn is_flat(&self) -> bool {
        self.item.is_none()
    }

    /// Item vectors of item token ids: `[items, len]` (0 = padding) → `[items, d_model]`. A
    /// flat model encodes each item as a user with that one item (before any output
    /// reduction).
    pub fn encode_items(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let pad = tokens.clone().equal_elem(0);
        let x = self.token_embedding.forward(tokens);
        match &self.item {
            Some(item) => item.forward(x, pad),
            None => {
                let [items, len, _] = x.dims();
                self.flat_tokens(x, 1, len, pad, items)
            }
        }
    }

    /// A flat model's user embeddings from the padded token ids of each row's item slots:
    /// `[rows, slots, len]` (0 = padding) → `[rows, embedding_dim]`.
    pub fn encode_flat(&self, tokens: Tensor<B, 3, Int>) -> Tensor<B, 2> {
        let [rows, slots, len] = tokens.dims();
        let tokens = tokens.reshape([rows, slots * len]);
        let pad = tokens.clone().equal_elem(0);
        let x = self.token_embedding.forward(tokens);
        self.reduce(self.flat_tokens(x, slots, len, pad, rows))
    }

    /// Embedded tokens `[rows, slots·len, d]` laid out as `slots` items of `len` tokens, through
    /// the flat Transformer → `[rows, d_model]`.
    fn flat_tokens(
        &self,
        x: Tensor<B, 3>,
        slots: usize,
        len: usize,
        pad: Tensor<B, 2, Bool>,
        rows: usize,
    ) -> Tensor<B, 2> {
        let device = x.device();
        let place = self
            .token_position
            .as_ref()
            .expect("a flat model has token positions");
        let (slot, within) = token_places::<B>(slots, len, &device);
        let (slot, within) = (
            slot.expand([rows, slots * len]),
            within.expand([rows, slots * len]),
        );
        self.service
            .forward_at(x + place.forward(within), slot, pad)
    }

    /// The optional output reduction (paper Table 6).
    fn reduce(&self, z: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.output {
            Some(linear) => linear.forward(z),
            None => z,
        }
    }

    /// Item vectors of groups of items (each `[items, len]`, any `len`), in order:
    /// `[Σ items, d_model]`.
    pub fn encode_item_groups(&self, groups: &[Tensor<B, 2, Int>]) -> Tensor<B, 2> {
        let mut vectors: Vec<Tensor<B, 2>> = groups
            .iter()
            .map(|g| self.encode_items(g.clone()))
            .collect();
        match vectors.len() {
            1 => vectors.pop().expect("one group"),
            _ => Tensor::cat(vectors, 0),
        }
    }

    /// User embeddings from already-encoded item vectors.
    ///
    /// `item_vectors`: `[distinct items, d_model]`; `slot_row`: `[rows·slots]`, the row of
    /// `item_vectors` each slot reads ([`slot_rows`](crate::data::batcher::slot_rows): a padding
    /// slot reads row 0, which `pad` masks); `pad`: `[rows, slots]` → `[rows, embedding_dim]`.
    pub fn encode_users(
        &self,
        item_vectors: Tensor<B, 2>,
        slot_row: Tensor<B, 1, Int>,
        pad: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 2> {
        let [rows, slots] = pad.dims();
        let [items, d] = item_vectors.dims();
        let items = match items {
            // Every slot is padding: nothing to read.
            0 => Tensor::zeros([rows, slots, d], &item_vectors.device()),
            _ => item_vectors.select(0, slot_row).reshape([rows, slots, d]),
        };
        self.reduce(self.service.forward(items, pad))
    }

    /// One embedding per row of the batch: `[services·batch, embedding_dim]`. Each distinct item
    /// of the batch goes through the Item Transformer once (a flat model reads the tokens of
    /// every slot instead).
    pub fn forward(&self, batch: &UserBatch<B>) -> Tensor<B, 2> {
        if self.is_flat() {
            return self.encode_flat(batch.tokens());
        }
        let vectors = self.encode_item_groups(&batch.item_groups);
        self.encode_users(vectors, batch.slot_row.clone(), batch.item_pad.clone())
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::TensorData;

    use super::*;
    use crate::data::batcher::slot_rows;
    use crate::model::init::Init;
    use crate::testing::max_diff;

    type A = Autodiff<NdArray>;

    /// A padding slot reads item row 0 ([`slot_rows`]), which its padding masks: the users'
    /// embeddings, and the item vectors' gradients, are those of a zero vector at each padding
    /// slot (a zero row put in front of the table, as before), for a row with padding at its
    /// end, one with padding first and one of padding only.
    #[test]
    fn padding_slots_read_row_0_and_change_nothing() {
        let dev = Default::default();
        // No dropout: two forward passes under autodiff would draw different masks.
        let c = ModelConfig {
            max_items: 4,
            dropout: 0.0,
            ..ModelConfig::default()
        };
        let encoder = ClueEncoder::<A>::new(&c, &mut Init::new(3, &dev));
        let d = c.d_model;
        let slot_item = vec![2i64, 3, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0];
        let pad: Vec<bool> = slot_item.iter().map(|&v| v == 0).collect();
        let pad = Tensor::<A, 2, Bool>::from_data(TensorData::new(pad, [3, 4]), &dev);
        let index = |v: Vec<i64>| Tensor::<A, 1, Int>::from_data(TensorData::new(v, [12]), &dev);
        let weights = (0..3 * c.embedding_dim())
            .map(|i| (i as f32 * 0.3).sin())
            .collect();
        let weights = TensorData::new(weights, [3, c.embedding_dim()]);
        // The embeddings and the item vectors' gradient of a weighted sum of them.
        let run = |zero_row: bool| {
            let vectors = (0..3 * d)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.2)
                .collect();
            let vectors =
                Tensor::<A, 2>::from_data(TensorData::new(vectors, [3, d]), &dev).require_grad();
            let z = match zero_row {
                false => {
                    encoder.encode_users(vectors.clone(), index(slot_rows(&slot_item)), pad.clone())
                }
                true => {
                    let table = Tensor::cat(vec![Tensor::zeros([1, d], &dev), vectors.clone()], 0);
                    let items = table.select(0, index(slot_item.clone())).reshape([3, 4, d]);
                    encoder.reduce(encoder.service.forward(items, pad.clone()))
                }
            };
            let grads = (z.clone() * Tensor::from_data(weights.clone(), &dev))
                .sum()
                .backward();
            let grad = vectors.grad(&grads).expect("tracked");
            [z.into_data(), grad.into_data()].map(|t| t.to_vec::<f32>().unwrap())
        };
        let ([ours, our_grad], [zeros, zero_grad]) = (run(false), run(true));
        assert!(
            max_diff(&ours, &zeros) <= 1e-6,
            "{}",
            max_diff(&ours, &zeros)
        );
        assert!(
            max_diff(&our_grad, &zero_grad) <= 1e-6,
            "{}",
            max_diff(&our_grad, &zero_grad)
        );
        assert!(
            our_grad[..d].iter().any(|g| *g != 0.0),
            "row 0 is an item too"
        );
    }
}
