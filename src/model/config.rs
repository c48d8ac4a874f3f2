//! Model hyperparameters (paper appendix B for `base`), as plain data.

use serde::{Deserialize, Serialize};

use crate::error::{ClueError, Result};

/// Shape of a CLUE encoder. The Item and Service Transformers share width, heads and FFN size
/// (paper Table 7) but may have different depths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
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

    /// Width of the user embedding handed to downstream models.
    pub fn embedding_dim(&self) -> usize {
        if self.output_dim > 0 {
            self.output_dim
        } else {
            self.d_model
        }
    }
}
