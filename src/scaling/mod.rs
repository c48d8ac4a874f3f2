//! The scaling study (paper §5.2, Figures 2–4): `clue sweep` trains a grid of runs, each an
//! ordinary run directory measured at the same held-out batches, and `clue scaling` fits the
//! law L(C) = L∞ + (C₀/C)^α to their compute frontier and draws the paper's figures.

pub mod downstream;
pub mod grid;
pub mod law;
pub mod plot;
pub mod report;
pub mod similarity;
pub mod sweep;
pub mod transfer;
