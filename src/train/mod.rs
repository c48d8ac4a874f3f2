//! Pretraining: contrastive loss, schedule, global clipping, data order, checkpoints, metrics,
//! renderer and `fit`.

pub mod adamw;
pub mod checkpoint;
pub mod clip;
pub mod cluster;
pub mod config;
pub mod coordinator;
pub mod fit;
pub mod grad_cache;
pub mod loader;
pub mod loss;
pub mod metrics;
pub mod parallel;
pub mod renderer;
pub mod schedule;
pub mod score;
pub mod step;
pub mod streams;
pub mod warmup;
pub mod watchdog;
