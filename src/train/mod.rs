//! Pretraining: contrastive loss, schedule, global clipping, metrics, renderer and `fit`.

pub mod clip;
pub mod config;
pub mod fit;
pub mod loss;
pub mod metrics;
pub mod renderer;
pub mod schedule;
pub mod step;
