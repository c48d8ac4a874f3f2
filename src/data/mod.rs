//! The data pipeline: read logs, synthesise, tokenise, prepare, and batch for the encoder.

pub mod batcher;
pub mod convert;
pub mod log;
pub mod prepare;
pub mod store;
pub mod synth;
pub mod tokenize;
