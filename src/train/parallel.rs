//! Data-parallel training steps on burn-collective (`clue fit --devices`).
//!
//! The batch is split over W workers, each a thread with its own replica of the model on its own
//! device (W threads on one CPU device, or one per GPU). As in the paper, every worker's InfoNCE
//! is computed against the **global** batch: the projected embeddings of all workers are gathered
//! with an all-reduce (each worker fills its rows of a zero matrix), the worker's own rows are put
//! back with their graph, so its gradient flows through its rows only; the logit scale's gradient,
//! which every worker computes in full, is divided by W; and the workers' gradients are summed
//! with an all-reduce. Without dropout the update is then the one-device update of the whole
//! batch; with it, worker k draws the masks of chunk k of the step (`with_chunk_masks`).
//!
//! A worker that fails (a panic in its forward or backward pass) still takes part in every
//! collective call, with zeros, so the others never wait forever; the step then reports which
//! worker failed and no update is made.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use burn::collective::{
    CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register,
    reset_collective,
};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::DeviceId;

use crate::backend::BackendKind;
use crate::data::batcher::{ITEM_MULTIPLE, UserBatch};
use crate::error::{ClueError, Result, panic_message};
use crate::model::ClueModel;
use crate::model::dropout::with_chunk_masks;
use crate::train::config::TrainConfig;
use crate::train::loss::is_finite;
use crate::train::metrics::ClueOutput;

/// A step's output and its gradients (`None` when the loss is not finite).
pub type StepParts<B> = (ClueOutput<B>, Option<GradientsParams>);

/// What a data-parallel step gives back: worker 0's output (on the main device) and the summed
/// gradients, or the first failed worker's message.
pub type ParallelStep<B> = Result<StepParts<B>, String>;

/// Training step `step` of `model` (a run seeded with `seed`) on `batch`, split over one worker
/// per entry of `devices` (the first is the model's own device), or over fewer when the batch
/// is too short to give each of them a share (users are split in chunks of ⌈n / devices⌉).
pub fn parallel_step<B: AutodiffBackend>(
    model: &ClueModel<B>,
    seed: u64,
    batch: &UserBatch<B>,
    devices: &[B::Device],
    step: u64,
) -> ParallelStep<B> {
    // burn-collective's server is one per process and backend, and its peer ids are reused:
    // one data-parallel step at a time, starting from a clean server.
    let _one = ONE_STEP.lock().unwrap_or_else(|e| e.into_inner());
    reset_collective::<B::InnerBackend>();
    let multiple = if BackendKind::of::<B>().fixed_shapes() {
        ITEM_MULTIPLE
    } else {
        1
    };
    // A short batch (an epoch's last) may make fewer chunks than devices: the step then runs on
    // as many workers as it has chunks.
    let chunks = batch.split(batch.len().div_ceil(devices.len().max(1)), multiple);
    let workers = chunks.len();
    let mut firsts = Vec::with_capacity(workers);
    let mut first = 0;
    for c in &chunks {
        firsts.push(first);
        first += c.len();
    }
    let shared = Shared {
        n: batch.len(),
        services: batch.services,
        workers,
        seed,
        step,
    };
    // Replicas and chunks go to their devices before any worker joins the collective: a failure
    // here stops the step with nobody waiting.
    let placed = catch_unwind(AssertUnwindSafe(|| {
        chunks
            .into_iter()
            .zip(devices)
            .map(|(chunk, device)| (model.clone().fork(device), chunk.to_device(device)))
            .collect::<Vec<_>>()
    }))
    .map_err(|p| {
        format!(
            "placing the model and the batch on the workers' devices failed: {}",
            panic_message(p.as_ref())
        )
    })?;
    let results: Vec<Result<Option<StepParts<B>>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = placed
            .into_iter()
            .zip(devices)
            .zip(firsts)
            .enumerate()
            .map(|(rank, (((replica, chunk), device), first))| {
                let shared = &shared;
                scope.spawn(move || shared.work(rank, replica, chunk, first, device))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(format!("worker {rank} died")))
            })
            .collect()
    });
    let mut main = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Err(e) => return Err(e),
            Ok(out) if rank == 0 => main = out,
            Ok(_) => {}
        }
    }
    main.ok_or_else(|| "worker 0 returned no output".to_string())
}

/// Held for the whole of a data-parallel step (see [`parallel_step`]).
static ONE_STEP: Mutex<()> = Mutex::new(());

/// What every worker of one step knows.
struct Shared {
    /// Users in the global batch.
    n: usize,
    services: usize,
    workers: usize,
    seed: u64,
    step: u64,
}

impl Shared {
    /// Worker `rank`'s part of the step: its users are rows `first..first + m` of every service
    /// of the global batch. Worker 0 returns its output and the summed gradients.
    fn work<B: AutodiffBackend>(
        &self,
        rank: usize,
        model: ClueModel<B>,
        chunk: UserBatch<B>,
        first: usize,
        device: &B::Device,
    ) -> Result<Option<StepParts<B>>, String> {
        let peer = PeerId(rank as u32);
        let fail = |what: &str, e: burn::collective::CollectiveError| {
            format!("worker {rank}: {what} failed: {e:?}")
        };
        let config = CollectiveConfig::default().with_num_devices(self.workers);
        register::<B::InnerBackend>(peer, device.clone(), config)
            .map_err(|e| fail("joining the collective", e))?;
        let result = self.collective(rank, &model, &chunk, first, device);
        // Always leave, so that no peer stays registered after this step.
        let left = finish_collective::<B::InnerBackend>(peer);
        let result = result?;
        left.map_err(|e| fail("leaving the collective", e))?;
        Ok(result)
    }

    /// The collective calls of worker `rank`'s step, the same on every worker whatever fails.
    fn collective<B: AutodiffBackend>(
        &self,
        rank: usize,
        model: &ClueModel<B>,
        chunk: &UserBatch<B>,
        first: usize,
        device: &B::Device,
    ) -> Result<Option<StepParts<B>>, String> {
        let peer = PeerId(rank as u32);
        let fail = |what: &str, e: burn::collective::CollectiveError| {
            format!("worker {rank}: {what} failed: {e:?}")
        };
        let (m, services, n) = (chunk.len(), self.services, self.n);
        let d = model.head.w2.weight.dims()[1];
        let zeros = || Tensor::<B::InnerBackend, 2>::zeros([services * n, d], device);
        // Gather: each worker fills its rows of a zero [services·n, d] matrix; the sum is the
        // batch. A worker that fails sends zeros.
        let local = catch_unwind(AssertUnwindSafe(|| {
            let z = with_chunk_masks(self.seed, self.step, rank as u64, || model.forward(chunk));
            let mut buffer = zeros();
            for s in 0..services {
                let rows = z.clone().inner().slice([s * m..(s + 1) * m, 0..d]);
                buffer = buffer.slice_assign([s * n + first..s * n + first + m, 0..d], rows);
            }
            (z, buffer)
        }))
        .map_err(|p| panic_text(rank, "forward pass", p));
        let (local, buffer) = match local {
            Ok((z, buffer)) => (Ok(z), buffer),
            Err(e) => (Err(e), zeros()),
        };
        let gathered = all_reduce::<B::InnerBackend>(
            peer,
            buffer.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| fail("gathering the embeddings", e))?;
        let outcome = local.and_then(|z| {
            catch_unwind(AssertUnwindSafe(|| {
                let mut global = Tensor::<B, 2>::from_inner(Tensor::from_primitive(
                    TensorPrimitive::Float(gathered),
                ));
                for s in 0..services {
                    let own = z.clone().slice([s * m..(s + 1) * m, 0..d]);
                    global = global.slice_assign([s * n + first..s * n + first + m, 0..d], own);
                }
                let out = ClueOutput::of(global, services, model.logit_scale());
                if !is_finite(&out.loss) {
                    return (out, None);
                }
                let mut grads = GradientsParams::from_grads(out.loss.backward(), model);
                // Every worker's loss holds all the logits: count the scale's gradient once.
                let id = model.log_logit_scale.id;
                if let Some(g) = grads.remove::<B::InnerBackend, 1>(id) {
                    grads.register::<B::InnerBackend, 1>(id, g / self.workers as f64);
                }
                (out, Some(grads))
            }))
            .map_err(|p| panic_text(rank, "loss or backward pass", p))
        });
        // Everyone learns whether anyone failed (or met a non-finite loss) before summing.
        let flags = [
            outcome.is_err() as u8 as f32,
            matches!(outcome, Ok((_, None))) as u8 as f32,
        ];
        let flags = all_reduce::<B::InnerBackend>(
            peer,
            Tensor::<B::InnerBackend, 1>::from_floats(flags, device)
                .into_primitive()
                .tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| fail("sharing the step's state", e))?;
        let flags: Vec<f32> =
            Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(flags))
                .into_data()
                .to_vec()
                .expect("two flags");
        match outcome {
            Err(e) => Err(e),
            Ok(_) if flags[0] > 0.0 => Ok(None),
            Ok((out, grads)) => {
                let grads = match grads {
                    Some(g) if flags[1] == 0.0 => Some(
                        g.all_reduce::<B::InnerBackend>(peer, ReduceOperation::Sum)
                            .map_err(|e| fail("summing the gradients", e))?,
                    ),
                    _ => None,
                };
                Ok((rank == 0).then_some((out, grads)))
            }
        }
    }
}

/// The message of a worker's panic.
fn panic_text(rank: usize, phase: &str, payload: Box<dyn std::any::Any + Send>) -> String {
    format!(
        "worker {rank} failed in its {phase}: {}",
        panic_message(payload.as_ref())
    )
}

impl<B: Backend> UserBatch<B> {
    /// The same batch on `device`.
    pub fn to_device(self, device: &B::Device) -> Self {
        UserBatch {
            item_groups: self
                .item_groups
                .into_iter()
                .map(|g| g.to_device(device))
                .collect(),
            item_pad: self.item_pad.to_device(device),
            slot_item: self.slot_item.to_device(device),
            services: self.services,
            users: self.users,
        }
    }
}

/// The workers of a data-parallel run (`clue fit --devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// This many worker threads on the one (CPU) device.
    Threads(usize),
    /// One worker per GPU index, the first the main device.
    Indices(Vec<u16>),
}

impl Devices {
    /// Each worker's device: the main device's kind, at each index.
    pub fn ids(&self, main: DeviceId) -> Vec<DeviceId> {
        match self {
            Devices::Threads(n) => vec![main; *n],
            Devices::Indices(ix) => ix.iter().map(|&i| DeviceId::new(main.type_id, i)).collect(),
        }
    }

    /// `--devices SPEC`: GPU indices separated by commas on a GPU (`0,1,2,3`), else a number of
    /// worker threads (`2`).
    pub fn parse(spec: &str, gpu: bool) -> Result<Self> {
        const MAX: usize = 64;
        let bad = |why: &str, fix: &str| ClueError::config(format!("--devices {spec}: {why}"), fix);
        if gpu {
            let ix = spec
                .split(',')
                .map(|s| s.trim().parse::<u16>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| {
                    bad(
                        "not a list of GPU indices",
                        "give GPU indices separated by commas, e.g. 0,1,2,3",
                    )
                })?;
            let mut distinct = ix.clone();
            distinct.sort_unstable();
            distinct.dedup();
            if distinct.len() != ix.len() || ix.len() > MAX {
                return Err(bad("a GPU listed twice", "name each GPU at most once"));
            }
            return Ok(Devices::Indices(ix));
        }
        match spec.trim().parse::<usize>() {
            Ok(n) if (1..=MAX).contains(&n) => Ok(Devices::Threads(n)),
            _ => Err(bad(
                "not a number of worker threads",
                &format!(
                    "on a CPU backend give a number of worker threads from 1 to {MAX}, e.g. 2"
                ),
            )),
        }
    }

    /// Refuse a split the step cannot make, before any work.
    pub fn check(&self, train: &TrainConfig) -> Result<()> {
        let w = self.ids(DeviceId::new(0, 0)).len();
        if w == 0 || !train.batch_size.is_multiple_of(w) {
            return Err(ClueError::config(
                format!(
                    "train.batch_size = {} does not divide into {w} workers",
                    train.batch_size
                ),
                "use a batch size that is a multiple of the number of --devices",
            ));
        }
        if w > 1 && train.grad_cache_chunk > 0 {
            return Err(ClueError::config(
                "train.grad_cache_chunk with --devices: GradCache does not run inside data-parallel workers yet",
                "use one of the two (--set train.grad_cache_chunk=0, or no --devices)",
            ));
        }
        Ok(())
    }
}
