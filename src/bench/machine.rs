//! What the machine can do, next to what a step reaches: a short fp32 matrix-product probe with
//! the gemm crate (the one the Flex backend and clue's own linear layers use), on all threads.

use std::time::Instant;

use serde::Serialize;

use crate::model::flex::{Start, product};

/// Side of the square products the probe times.
const PEAK_SIDE: usize = 1024;
/// The probe stops after this long (and at least [`PEAK_MIN_RUNS`] products).
const PEAK_SECONDS: f64 = 0.6;
const PEAK_MIN_RUNS: usize = 3;

/// The best fp32 matrix-product rate this machine reached in the probe.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MatmulPeak {
    pub gflops_per_s: f64,
    /// `side × side × side` products.
    pub side: usize,
    pub runs: usize,
}

/// Time `PEAK_SIDE`³ fp32 products (after one warm-up) and keep the fastest.
pub fn matmul_peak() -> MatmulPeak {
    let n = PEAK_SIDE;
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
        .collect();
    let once = || {
        let t0 = Instant::now();
        let c = product([n, n, n], (&a, n, 1), (&b, n, 1), Start::Zero);
        std::hint::black_box(c);
        t0.elapsed().as_secs_f64()
    };
    once();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < PEAK_MIN_RUNS || start.elapsed().as_secs_f64() < PEAK_SECONDS {
        best = best.min(once());
        runs += 1;
    }
    MatmulPeak {
        gflops_per_s: 2.0 * (n * n * n) as f64 / best / 1e9,
        side: n,
        runs,
    }
}
