//! The data pipeline: read logs into histories, synthesise, convert, tokenise, prepare, and
//! batch for the encoder.

pub mod augment;
pub mod batcher;
pub mod chunk;
pub mod convert;
pub mod groups;
pub mod history;
pub mod log;
pub mod options;
pub mod prepare;
pub mod store;
pub mod synth;
pub mod tokenize;
