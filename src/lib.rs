//! clue — the Contrastive Learning User Encoder (CLUE) on Burn.
//!
//! The pipeline follows the paper: `data` (read logs, synthesise, tokenise, prepare, batch) →
//! `model` (Item Transformer, Service Transformer, projection head) → `train` (contrastive loss,
//! schedule, clipping, learner, `fit`) → `embed` (frozen user embeddings) → `eval` (downstream
//! tasks) → `scaling` (sweeps and scaling laws) → `bench`.

pub mod backend;
pub mod bench;
pub mod bundle;
pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
pub mod data;
pub mod embed;
pub mod error;
pub mod eval;
pub mod gpu;
pub mod model;
pub mod scaling;
#[cfg(test)]
mod testing;
pub mod train;
pub mod ui;

pub use error::{ClueError, Result};
