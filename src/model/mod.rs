//! The CLUE model: encoder, projection head f(z) = W2·σ(W1·z), and the learnable logit scale.

pub mod block;
pub mod config;
pub mod dropout;
pub mod encoder;
pub mod flex;
pub mod init;
pub mod ops;

use burn::module::Param;
use burn::nn::{Linear, Relu};
use burn::prelude::*;

pub use crate::backend::BackendKind;
pub use config::{ModelConfig, ModelKind};
pub use encoder::{ClueEncoder, ItemTransformer, ServiceTransformer};

use crate::data::batcher::UserBatch;
use crate::model::init::Init;

/// Initial logit scale (paper §2.2: "initialized to 14.27").
pub const LOGIT_SCALE_INIT: f64 = 14.27;
/// The logit scale never exceeds this.
pub const LOGIT_SCALE_MAX: f64 = 100.0;

/// The logit scale s = exp(t) of its log `t`, never above [`LOGIT_SCALE_MAX`] (on the host;
/// the loss computes it on the device).
pub fn logit_scale_of(t: f64) -> f64 {
    // Not `f64::min`, which would turn a NaN into the maximum.
    let max = LOGIT_SCALE_MAX.ln();
    if t > max { max.exp() } else { t.exp() }
}

/// Projection head used by the loss only: f(z) = W2·ReLU(W1·z).
#[derive(Module, Debug)]
pub struct ProjectionHead<B: Backend> {
    pub w1: Linear<B>,
    pub activation: Relu,
    pub w2: Linear<B>,
}

impl<B: Backend> ProjectionHead<B> {
    pub fn new(dim: usize, init: &mut Init<B>) -> Self {
        Self {
            w1: init.linear_no_bias(dim, dim),
            activation: Relu::new(),
            w2: init.linear_no_bias(dim, dim),
        }
    }

    /// `[n, dim]` → `[n, dim]`.
    pub fn forward(&self, z: Tensor<B, 2>) -> Tensor<B, 2> {
        self.w2
            .forward(ops::relu(&self.activation, self.w1.forward(z)))
    }
}

/// Everything pretraining learns.
#[derive(Module, Debug)]
pub struct ClueModel<B: Backend> {
    pub encoder: ClueEncoder<B>,
    pub head: ProjectionHead<B>,
    /// ln of the logit scale; `logit_scale()` clamps it to ln 100.
    pub log_logit_scale: Param<Tensor<B, 1>>,
}

/// Total and non-embedding parameter counts (non-embedding excludes token and position tables,
/// as in scaling-law studies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParamCounts {
    pub total: usize,
    pub non_embedding: usize,
}

impl<B: Backend> ClueModel<B> {
    /// A model with weights drawn from `init`'s stream.
    pub fn new(c: &ModelConfig, init: &mut Init<B>) -> Self {
        Self {
            encoder: ClueEncoder::new(c, init),
            head: ProjectionHead::new(c.embedding_dim(), init),
            log_logit_scale: init.param(Tensor::from_floats(
                [LOGIT_SCALE_INIT.ln() as f32],
                init.device,
            )),
        }
    }

    /// The logit scale, read to the host (see [`logit_scale_of`]).
    pub fn logit_scale(&self) -> f64 {
        logit_scale_of(self.log_logit_scale.val().into_scalar().elem())
    }

    /// Projected embeddings f(z) of a batch: `[services·batch, embedding_dim]`.
    pub fn forward(&self, batch: &UserBatch<B>) -> Tensor<B, 2> {
        self.head.forward(self.encoder.forward(batch))
    }

    pub fn param_counts(&self) -> ParamCounts {
        let total = self.num_params();
        let e = &self.encoder;
        let embedding = e.token_embedding.num_params()
            + e.service.position.num_params()
            + e.token_position.num_params();
        ParamCounts {
            total,
            non_embedding: total - embedding,
        }
    }
}
