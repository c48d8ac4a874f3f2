//! Dropout, with masks that a resumed run replays exactly.
//!
//! On CPU backends the masks come from a counter-based generator keyed by (run seed, training
//! step, call site): [`start_step`] is called at the start of every training step, and the n-th
//! dropout call of that step's forward pass (the call site: the forward pass calls dropout in a
//! fixed order) draws from its own stream. Nothing has to be checkpointed: a run resumed at step
//! k draws the masks an uninterrupted run drew at step k. The masks are boolean (autodiff keeps
//! one byte per element for the backward pass, not four) and filled in parallel, and Burn's
//! generic sampler (element by element: ~14 % of a CPU step) is not involved. On wgpu and CUDA
//! (f32, the default build) clue's kernel (`crate::cube::dropout`) draws each call's mask on the
//! device from the same (seed, step, call) key, so resumed runs replay it there too. Elsewhere on
//! a GPU (bf16, Burn's fusion) dropout takes the backend's own seeded generator, whose state is
//! not checkpointed, except inside [`with_chunk_masks`] (GradCache), where it draws host masks.

use std::cell::Cell;

use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use rayon::prelude::*;

use crate::backend::BackendKind;

/// The stream of the dropout calls of one training step on this thread.
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Hash of (seed, step).
    key: u64,
    /// Dropout calls drawn so far in this step.
    call: u64,
    /// Inside [`with_chunk_masks`]: dropout acts without autodiff too, with keyed masks on
    /// every backend.
    replay: bool,
}

thread_local! {
    /// The forward pass of a step runs on one thread, which sets the stream first: the thread
    /// that calls the step, or the pool thread it is driven on (`BackendKind::drive`).
    static STREAM: Cell<Stream> = const {
        Cell::new(Stream { key: 0x5EED_C1CE, call: 0, replay: false })
    };
}

/// Start the dropout masks of training step `step` (0-based) of a run seeded with `seed`.
pub fn start_step(seed: u64, step: u64) {
    STREAM.set(Stream {
        key: step_key(seed, step),
        call: 0,
        replay: false,
    });
}

fn step_key(seed: u64, step: u64) -> u64 {
    splitmix64(splitmix64(seed) ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Runs `f` (a forward pass over a chunk of training step `step`) with the dropout masks of
/// `key` (the place of the chunk's first user in the batch), for GradCache's two passes over a
/// chunk: the first on the backend without autodiff, the second with it. Inside `f` dropout acts
/// without autodiff too and draws keyed masks on every backend (on the host, or in clue's GPU
/// kernel), so both passes drop the same units. Key 0 draws the masks of [`start_step`]: a single
/// chunk replays the plain step exactly (on a GPU too, where the plain step takes clue's kernel).
pub fn with_chunk_masks<R>(seed: u64, step: u64, key: u64, f: impl FnOnce() -> R) -> R {
    /// Leaves replay mode however `f` ends (validation on this thread must not drop units).
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            STREAM.set(Stream {
                replay: false,
                ..STREAM.get()
            });
        }
    }
    let key = match key {
        0 => step_key(seed, step),
        k => splitmix64(step_key(seed, step) ^ splitmix64(k)),
    };
    STREAM.set(Stream {
        key,
        call: 0,
        replay: true,
    });
    let _reset = Reset;
    f()
}

/// Whether a [`with_chunk_masks`] pass is running on this thread: dropout acts even on a
/// backend without autodiff.
pub(crate) fn replaying() -> bool {
    STREAM.get().replay
}

pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether [`dropout`] with rate `p` changes anything on `device` now.
pub fn active<B: Backend>(p: f64, device: &B::Device) -> bool {
    p > 0.0 && (B::ad_enabled(device) || replaying())
}

/// Inverted dropout, active only while training (an autodiff backend, or a GradCache pass: see
/// [`with_chunk_masks`]), as Burn's `Dropout`.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    let device = x.device();
    if !active::<B>(p, &device) {
        return x;
    }
    let host = BackendKind::of::<B>().host_masks();
    let key = next_key();
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match host {
        true => x,
        false => match crate::cube::dropout(x, p, key) {
            Ok(y) => return y,
            Err(x) => x,
        },
    };
    let keep = 1.0 - p;
    if !(host || replaying()) {
        return x.clone() * x.random_like(Distribution::Bernoulli(keep)) * (1.0 / keep);
    }
    let shape = x.shape();
    let n = shape.num_elements();
    let mask = drop_mask(n, p, key);
    let drop = Tensor::<B, 1, Bool>::from_data(TensorData::new(mask, [n]), &device).reshape(shape);
    x.mask_fill(drop, 0.0).mul_scalar(1.0 / keep)
}

/// The mask of the next dropout call of this step: `n` flags, true = dropped.
pub(crate) fn draw_drop_mask(n: usize, p: f64) -> Vec<bool> {
    drop_mask(n, p, next_key())
}

/// The key of the next dropout call of this step (a function of seed, step and call).
fn next_key() -> u64 {
    let s = STREAM.get();
    STREAM.set(Stream {
        call: s.call + 1,
        ..s
    });
    s.key ^ splitmix64(s.call)
}

/// `n` flags, each true (drop) with probability `p` (in steps of 2⁻¹⁶), from a counter-based
/// generator: four draws per 64-bit hash, filled in parallel (the result does not depend on the
/// number of threads).
fn drop_mask(n: usize, p: f64, stream: u64) -> Vec<bool> {
    const BLOCKS: usize = 4096; // hashes per parallel task
    let threshold = (p * 65536.0).round() as u64;
    let key = splitmix64(stream);
    let mut out = vec![false; n];
    out.par_chunks_mut(4 * BLOCKS)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, flags) in chunk.chunks_mut(4).enumerate() {
                let block = (task * BLOCKS + i) as u64;
                let bits = splitmix64(key ^ block.wrapping_mul(0xD1B5_4A32_D192_ED03));
                for (lane, flag) in flags.iter_mut().enumerate() {
                    *flag = (bits >> (16 * lane)) & 0xFFFF < threshold;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    #[test]
    fn drop_masks_drop_about_p() {
        let mask = drop_mask(400_003, 0.1, 7);
        assert_eq!(mask.len(), 400_003);
        let dropped = mask.iter().filter(|&&m| m).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.003, "dropped {dropped}");
        // Lanes of one hash are independent: pairs both dropped ≈ p².
        let pairs = mask.len() / 2;
        let both = (0..pairs)
            .filter(|&i| mask[2 * i] && mask[2 * i + 1])
            .count() as f64;
        assert!((both / pairs as f64 - 0.01).abs() < 0.002, "both {both}");
        assert_ne!(
            drop_mask(64, 0.5, 8),
            drop_mask(64, 0.5, 7),
            "streams differ"
        );
        assert_eq!(
            drop_mask(64, 0.5, 7),
            drop_mask(64, 0.5, 7),
            "deterministic"
        );
        assert!(drop_mask(1000, 0.0, 3).iter().all(|&m| !m));
    }

    /// The masks of a step depend on (seed, step, call) only: starting the same step again
    /// replays them, whatever was drawn before; other steps, seeds and calls differ.
    #[test]
    fn masks_are_a_function_of_seed_step_and_call() {
        let draws = |seed, step| {
            start_step(seed, step);
            [draw_drop_mask(256, 0.5), draw_drop_mask(256, 0.5)]
        };
        let a = draws(1, 5);
        draws(1, 6);
        draw_drop_mask(1000, 0.5);
        assert_eq!(draws(1, 5), a, "replayed after other draws");
        assert_ne!(a[0], a[1], "two calls of one step differ");
        assert_ne!(draws(1, 6)[0], a[0], "another step");
        assert_ne!(draws(2, 5)[0], a[0], "another seed");
    }

    #[test]
    fn dropout_acts_only_while_training() {
        let device = Default::default();
        let x = Tensor::<NdArray, 2>::ones([50, 40], &device);
        let same = dropout(x.clone(), 0.5);
        assert_eq!(same.to_data(), x.to_data(), "no autodiff: identity");
        let t = Tensor::<Autodiff<NdArray>, 2>::ones([50, 40], &device);
        let y: Vec<f32> = dropout(t, 0.5).into_data().to_vec().unwrap();
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!((800..1200).contains(&zeros), "{zeros} of 2000 dropped");
        assert!(
            y.iter().all(|&v| v == 0.0 || v == 2.0),
            "the rest scaled by 1/(1-p)"
        );
    }

    /// On wgpu clue's kernel draws the masks: a function of (seed, step, call), and a GradCache
    /// pass over a single chunk (without autodiff) draws the plain step's.
    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a Vulkan device: .ci/run runs it on Mesa's lavapipe"]
    fn gpu_masks_replay_by_seed_step_and_call_on_wgpu() {
        use burn::backend::Wgpu;
        fn drop_ones<B: Backend>() -> Vec<f32> {
            let x = Tensor::<B, 2>::ones([64, 64], &Default::default());
            dropout(x, 0.5).into_data().to_vec().unwrap()
        }
        let draws = |seed, step| {
            start_step(seed, step);
            [drop_ones::<Autodiff<Wgpu>>(), drop_ones::<Autodiff<Wgpu>>()]
        };
        let a = draws(1, 5);
        draws(1, 6);
        assert_eq!(draws(1, 5), a, "replayed after other draws");
        let zeros = a[0].iter().filter(|v| **v == 0.0).count();
        assert!((1800..2300).contains(&zeros), "{zeros} of 4096 dropped");
        assert_ne!(a[0], a[1], "two calls of one step differ");
        assert_ne!(draws(1, 6)[0], a[0], "another step");
        assert_ne!(draws(2, 5)[0], a[0], "another seed");
        let chunk = with_chunk_masks(1, 5, 0, drop_ones::<Wgpu>);
        assert_eq!(chunk, a[0], "a single chunk replays the plain step");
    }
}
