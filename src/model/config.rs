//! Model hyperparameters (paper appendix B for `base`), as plain data.

use serde::{Deserialize, Serialize};

use crate::error::{ClueError, Result};

/// The most positions a flat model reads per user and service (paper Table 5's: 2,048).
const MAX_FLAT_POSITIONS: usize = 8192;

/// The largest model clue builds (4·10¹⁰ bytes of f32 weights; training needs ~4× that).
const MAX_PARAMS: f64 = 1e10;

/// How a user's tokens reach the embedding (paper Table 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// CLUE's encoder: an Item Transformer per item, then a Service Transformer over the item
    /// vectors.
    #[default]
    Stacked,
    /// The paper's single-Transformer ablation: one Transformer of `item_layers +
    /// service_layers` layers over all of a user's tokens in a service (up to `max_items ·
    /// max_item_tokens` positions), mean-pooled.
    Flat,
}

/// Shape of a CLUE encoder. The Item and Service Transformers share width, heads and FFN size
/// (paper Table 7) but may have different depths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Stacked (CLUE) or flat (one Transformer over all tokens, paper Table 5).
    pub kind: ModelKind,
    /// Token vocabulary (set from the prepared dataset when 0).
    pub vocab_size: usize,
    /// Width D of tokens, items and users.
    pub d_model: usize,
    /// Feed-forward width (paper: 4·D).
    pub d_ff: usize,
    pub heads: usize,
    pub item_layers: usize,
    pub service_layers: usize,
    pub dropout: f64,
    /// Most recent items per service the Service Transformer reads (S).
    pub max_items: usize,
    /// Tokens per item the Item Transformer reads (L).
    pub max_item_tokens: usize,
    /// Optional output-dimension reduction of the user embedding (paper Table 6); 0 = none.
    pub output_dim: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Stacked,
            vocab_size: 0,
            d_model: 64,
            d_ff: 256,
            heads: 4,
            item_layers: 2,
            service_layers: 2,
            dropout: 0.1,
            max_items: 32,
            max_item_tokens: 16,
            output_dim: 0,
        }
    }
}

impl ModelConfig {
    /// Refuse shapes that cannot work, before any work is done.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String, h: &str| Err(ClueError::config(m, h));
        for (name, v) in [
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("heads", self.heads),
            ("item_layers", self.item_layers),
            ("service_layers", self.service_layers),
            ("max_items", self.max_items),
            ("max_item_tokens", self.max_item_tokens),
        ] {
            if v == 0 {
                return bad(
                    format!("model.{name} is 0"),
                    "every size must be at least 1",
                );
            }
        }
        for (name, v, max) in [
            ("d_model", self.d_model, 1 << 16),
            ("d_ff", self.d_ff, 1 << 18),
            ("heads", self.heads, 1 << 10),
            ("item_layers", self.item_layers, 1 << 8),
            ("service_layers", self.service_layers, 1 << 8),
            ("max_items", self.max_items, 1 << 16),
            ("max_item_tokens", self.max_item_tokens, 1 << 16),
            ("output_dim", self.output_dim, 1 << 16),
            ("vocab_size", self.vocab_size, 1 << 20),
        ] {
            if v > max {
                return bad(
                    format!("model.{name} = {v} is above the limit of {max}"),
                    "choose a size a machine can hold (the paper's largest model: d_model 2,048)",
                );
            }
        }
        if self.kind == ModelKind::Flat && self.user_positions() > MAX_FLAT_POSITIONS {
            return bad(
                format!(
                    "a flat model reads max_items · max_item_tokens = {} positions, above the \
                     limit of {MAX_FLAT_POSITIONS} (its attention is quadratic in them)",
                    self.user_positions()
                ),
                "lower model.max_items or model.max_item_tokens (the paper's flat model: 2,048)",
            );
        }
        let params = self.approx_params();
        if params > MAX_PARAMS {
            return bad(
                format!(
                    "the model would have ~{:.1e} parameters ({:.0} GB of weights alone), above \
                     the limit of {MAX_PARAMS:.0e}",
                    params,
                    params * 4.0 / 1e9
                ),
                "lower d_model, d_ff or the number of layers",
            );
        }
        if !self.d_model.is_multiple_of(self.heads) {
            return bad(
                format!(
                    "model.heads = {} does not divide model.d_model = {}",
                    self.heads, self.d_model
                ),
                "choose heads that divide d_model (e.g. d_model 720 with 6 heads)",
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(
                format!("model.dropout = {} is outside [0, 1)", self.dropout),
                "e.g. 0.1",
            );
        }
        Ok(())
    }

    /// Parameters of the encoder, roughly (embeddings and the Transformer layers' matrices).
    fn approx_params(&self) -> f64 {
        let d = self.d_model as f64;
        let layers = (self.item_layers + self.service_layers) as f64;
        self.vocab_size.max(1) as f64 * d + layers * (4.0 * d * d + 2.0 * d * self.d_ff as f64)
    }

    /// Positions of the Transformer that reads a service's items: item slots (stacked) or
    /// every token of every slot (flat).
    pub fn user_positions(&self) -> usize {
        match self.kind {
            ModelKind::Stacked => self.max_items,
            ModelKind::Flat => self.max_items * self.max_item_tokens,
        }
    }

    /// Width of the user embedding handed to downstream models.
    pub fn embedding_dim(&self) -> usize {
        if self.output_dim > 0 {
            self.output_dim
        } else {
            self.d_model
        }
    }
}
