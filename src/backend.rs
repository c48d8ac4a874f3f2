//! Which kind of backend clue runs on. `main.rs` decides it once per command
//! (`BackendKind::of::<B>()`) and passes it down; the model's operations ([`crate::model::ops`])
//! ask the same function, so every backend-specific path is chosen by this one value.

use std::any::TypeId;

use burn::backend::{Autodiff, Flex};
use burn::prelude::Backend;

/// The kinds of backend whose paths differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Burn's Flex CPU backend: clue's own kernels (`model::flex`) and dropout masks.
    Flex,
    /// Another CPU backend (burn-ndarray): Burn's operations, clue's dropout masks.
    Cpu,
    /// A GPU backend (CUDA, wgpu): Burn's operations and random numbers, and fixed tensor
    /// shapes (a new shape can cost kernel compilations and, with autotuning, an autotune run).
    Accelerator,
}

impl BackendKind {
    /// The kind of backend `B` (plain or under autodiff).
    pub fn of<B: Backend>() -> Self {
        let id = TypeId::of::<B>();
        if id == TypeId::of::<Flex>() || id == TypeId::of::<Autodiff<Flex>>() {
            return Self::Flex;
        }
        #[cfg(feature = "ndarray")]
        {
            use burn::backend::NdArray;
            if id == TypeId::of::<NdArray>() || id == TypeId::of::<Autodiff<NdArray>>() {
                return Self::Cpu;
            }
        }
        Self::Accelerator
    }

    /// Pad batches to fixed shapes (see `data::batcher::FixedShape`).
    pub fn fixed_shapes(self) -> bool {
        self == Self::Accelerator
    }

    /// Runs `f`, the work of a training step or an inference call: on Flex, where the program
    /// allows it ([`crate::cpu::set_drive_from_pool`]; the `clue` binary does), on the thread of
    /// rayon's pool that Flex computes on ([`crate::cpu::on_pool`]; tiny on AMD Zen 5: training
    /// 0.073 → 0.060 s/step); elsewhere on the calling thread (a GPU backend keeps its launches
    /// on one thread). Thread-local state (dropout's stream) must be set inside `f`.
    pub fn drive<R: Send>(self, f: impl FnOnce() -> R + Send) -> R {
        match self {
            Self::Flex if crate::cpu::drives_from_pool() => crate::cpu::on_pool(f),
            _ => f(),
        }
    }

    /// Runs `f`, data-parallel worker `k`'s part of a step (one of `workers`): on Flex, where the
    /// program allows it, on a rayon pool of the worker's own with its share of the threads
    /// ([`crate::cpu::on_worker_pool`]); elsewhere on the calling thread.
    pub fn drive_worker<R: Send>(
        self,
        k: usize,
        workers: usize,
        f: impl FnOnce() -> R + Send,
    ) -> R {
        match self {
            Self::Flex if crate::cpu::drives_from_pool() => {
                let threads = (rayon::current_num_threads() / workers.max(1)).max(1);
                crate::cpu::on_worker_pool(k, threads, f)
            }
            _ => f(),
        }
    }

    /// A GPU backend with Burn's kernel fusion (the `fusion` feature): steps read their outputs
    /// to the host themselves (`ClueOutput::settle`), so that Burn's metric thread never cuts
    /// the queue of fused operations at a run-time-dependent place (each new cut compiles new
    /// kernels). Without fusion the learner's thread reads them, which costs no sync in a step.
    pub fn fused(self) -> bool {
        cfg!(feature = "fusion") && self == Self::Accelerator
    }

    /// Draw dropout masks on the host with clue's seeded generator (cheap on a CPU, and the
    /// masks are a function of (seed, step, call site): a resumed run replays them). An
    /// accelerator draws them in clue's kernel from the same keys where it applies.
    pub fn host_masks(self) -> bool {
        self != Self::Accelerator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_backend_type() {
        assert_eq!(BackendKind::of::<Flex>(), BackendKind::Flex);
        assert_eq!(BackendKind::of::<Autodiff<Flex>>(), BackendKind::Flex);
        #[cfg(feature = "ndarray")]
        assert_eq!(
            BackendKind::of::<Autodiff<burn::backend::NdArray>>(),
            BackendKind::Cpu
        );
        #[cfg(feature = "wgpu")]
        assert_eq!(
            BackendKind::of::<burn::backend::Wgpu>(),
            BackendKind::Accelerator
        );
    }
}
