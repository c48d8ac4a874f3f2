//! Data-parallel training steps on burn-collective (`clue fit --devices`, and `--nodes` with
//! [`crate::train::cluster`]).
//!
//! The global batch is split over W workers on each of N nodes, each a thread with its own
//! replica of the model on its own device (W threads on one CPU device, or one per GPU). As in the
//! paper, every worker's InfoNCE is computed against the **global** batch: the projected
//! embeddings of all workers are gathered with an all-reduce (each worker fills its rows of a zero
//! matrix), the worker's own rows are put back with their graph, so its gradient flows through
//! its rows only; the logit scale's gradient, which every worker with users computes in full, is
//! divided by their number; and the workers' gradients are summed with one all-reduce. Without
//! dropout the update is then the one-device update of the whole batch; with it, a worker's
//! chunk draws the masks keyed by the place of its first user in the batch ([`MaskKey`]).
//!
//! With GradCache (`train.grad_cache_chunk`), each worker encodes its share in chunks: first
//! without autodiff for the gather, then again per chunk with its rows of the cached gradient of
//! the global loss ([`MaskKey::replay`]).
//!
//! A worker that fails (a panic in its forward or backward pass) still takes part in every
//! collective call, with zeros, so the others never wait forever; the step then reports which
//! worker failed and no update is made.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use burn::collective::{
    CollectiveConfig, CollectiveError, PeerId, ReduceOperation, all_reduce, finish_collective,
    register, reset_collective,
};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::DeviceId;

use crate::backend::BackendKind;
use crate::data::batcher::UserBatch;
use crate::data::chunk::item_multiple;
use crate::error::{ClueError, Result, panic_message};
use crate::model::ClueModel;
use crate::train::cluster::{Cluster, Place, abandon_membership, nodes_by_workers};
use crate::train::config::TrainConfig;
use crate::train::grad_cache::MaskKey;
use crate::train::loss::is_finite;
use crate::train::metrics::{ClueOutput, StepParts};
use crate::train::streams::{Role, on_kept_stream};
use crate::train::watchdog::{Stop, Watch};

/// What a data-parallel step gives back: worker 0's output (on the main device) and the summed
/// gradients, or the first failed worker's message.
pub type ParallelStep<B> = Result<StepParts<B>, String>;

/// Training step `step` of `model` (a run seeded with `seed`) on `batch`, the global batch, split
/// over one worker per entry of `devices` (the first is the model's own device) on each of
/// `place.nodes` nodes: the users are cut in chunks of ⌈n / all workers⌉ and node R's worker k
/// takes chunk R·W + k. A short batch (an epoch's last) may leave the last workers without a
/// chunk: they encode one user whose rows count for nothing, so that every worker makes the
/// same collective calls.
pub fn parallel_step<B: AutodiffBackend>(
    model: &ClueModel<B>,
    seed: u64,
    batch: &UserBatch<B>,
    devices: &[B::Device],
    place: Place,
    step: u64,
    grad_cache: usize,
) -> ParallelStep<B> {
    // burn-collective's server is one per process and backend, and its peer ids are reused:
    // one data-parallel step at a time; on one node, starting from a clean server.
    let _one = ONE_STEP.lock().unwrap_or_else(|e| e.into_inner());
    if !place.multi_node() {
        reset_collective::<B::InnerBackend>();
    }
    let multiple = item_multiple::<B>();
    let w = devices.len().max(1);
    let chunks = batch.split(batch.len().div_ceil(w * place.nodes), multiple);
    let active = chunks.len();
    // The batch's first user, alone (for workers left without a chunk).
    let stand_in =
        (active < (place.rank + 1) * w).then(|| chunks[0].split(1, multiple).swap_remove(0));
    let mut firsts = Vec::with_capacity(active);
    let mut first = 0;
    for c in &chunks {
        firsts.push(first);
        first += c.len();
    }
    let mut mine: Vec<(UserBatch<B>, Option<usize>)> = chunks
        .into_iter()
        .zip(firsts)
        .skip(place.rank * w)
        .take(w)
        .map(|(c, first)| (c, Some(first)))
        .collect();
    if let Some(stand_in) = stand_in {
        mine.resize_with(w, || (stand_in.clone(), None));
    }
    let shared = Arc::new(Shared {
        n: batch.len(),
        services: batch.services,
        workers: w,
        active,
        seed,
        step,
        place,
        grad_cache,
        multiple,
        watch: Watch::new(w),
    });
    // Replicas and chunks go to their devices before any worker joins the collective: a failure
    // here stops the step with nobody waiting.
    let placed = catch_unwind(AssertUnwindSafe(|| {
        mine.into_iter()
            .zip(devices)
            .map(|((chunk, first), device)| {
                let part = Part {
                    chunk: chunk.to_device(device),
                    first,
                };
                (model.clone().fork(device), part)
            })
            .collect::<Vec<_>>()
    }))
    .map_err(|p| {
        if place.multi_node() {
            abandon_membership(); // the other nodes see this one leave
        }
        format!(
            "placing the model and the batch on the workers' devices failed: {}",
            panic_message(p.as_ref())
        )
    })?;
    // Threads of their own, not scoped: a worker stuck in a call to a vanished node must not
    // keep the step from failing. Each runs on its worker's kept CubeCL stream (see
    // [`crate::train::streams`]).
    let (tx, rx) = std::sync::mpsc::channel();
    let (kind, w) = (BackendKind::of::<B>(), devices.len());
    for (k, ((replica, part), device)) in placed.into_iter().zip(devices).enumerate() {
        let (ours, tx, device) = (shared.clone(), tx.clone(), device.clone());
        std::thread::Builder::new()
            .name(format!("clue-worker-{k}"))
            .spawn(move || {
                let result = on_kept_stream(Role::Worker, k, || {
                    let work = || kind.drive_worker(k, w, || ours.work(k, replica, part, &device));
                    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|p| {
                        let why = panic_message(p.as_ref());
                        Err(format!("{} died: {why}", ours.name(k)))
                    })
                });
                let _ = tx.send((k, result));
            })
            .map_err(|e| format!("starting {} failed: {e}", shared.name(k)))?;
    }
    drop(tx);
    let results = shared
        .watch
        .collect(rx, place.peer_timeout)
        .map_err(|stop| match stop {
            Stop::TimedOut {
                worker,
                call,
                waited,
            } => {
                // The worker is left waiting: the run's end must not wait for it again.
                abandon_membership();
                format!(
                    "{} waited {} s for the other nodes while {call} at step {step}, longer \
                     than --peer-timeout: another node stopped answering (suspended, powered \
                     off, cut off from the network, or far slower than this one). No update \
                     was made",
                    shared.name(worker),
                    waited.as_secs()
                )
            }
            Stop::Died(worker) => format!("{} died", shared.name(worker)),
        })?;
    let mut main = None;
    for (k, r) in results.into_iter().enumerate() {
        match r {
            Err(e) => return Err(e),
            Ok(out) if k == 0 => main = out,
            Ok(_) => {}
        }
    }
    // Every local worker saw a failure none of them had: a worker on another node failed.
    main.ok_or_else(|| {
        format!(
            "a worker on another node failed at step {step} (that node's output names it); no update was made"
        )
    })
}

/// Each worker's device: the devices of `ids`, or the main device alone.
pub fn worker_devices<B: Backend>(ids: &[DeviceId], main: &B::Device) -> Vec<B::Device> {
    match ids {
        [] => vec![main.clone()],
        ids => ids.iter().map(|&id| B::Device::from_id(id)).collect(),
    }
}

/// How `clue fit` describes the step: data-parallel workers (over nodes), GradCache.
pub fn setup_line(workers: usize, cluster: Option<&Cluster>, grad_cache: usize) -> String {
    let mut line = match (workers, cluster) {
        (w, Some(c)) => format!(
            ", data-parallel over {}",
            nodes_by_workers(c.nodes, w.max(1))
        ),
        (0 | 1, None) => String::new(),
        (w, None) => format!(", data-parallel over {w} workers"),
    };
    if grad_cache > 0 {
        line += &format!(", GradCache in chunks of {grad_cache} users");
    }
    line
}

/// Held for the whole of a data-parallel step (see [`parallel_step`]).
static ONE_STEP: Mutex<()> = Mutex::new(());

/// A worker's share of the batch: its chunk, and where the chunk's users sit in the global
/// batch (`None`: a stand-in whose rows count for nothing).
struct Part<B: Backend> {
    chunk: UserBatch<B>,
    first: Option<usize>,
}

/// What every worker of one step knows.
struct Shared {
    /// Users in the global batch.
    n: usize,
    services: usize,
    /// Workers on each node.
    workers: usize,
    /// Workers with a chunk, over all nodes: each computes the logit scale's whole gradient.
    active: usize,
    seed: u64,
    step: u64,
    place: Place,
    /// GradCache inside each worker: chunks of this many users (0: the worker's share at once).
    grad_cache: usize,
    /// Distinct items per batch padded to a multiple of this.
    multiple: usize,
    /// Which worker waits in which collective call, since when.
    watch: Watch,
}

impl Shared {
    /// Worker `k`'s index among all the run's workers (its peer id and dropout chunk).
    fn global(&self, k: usize) -> usize {
        self.place.rank * self.workers + k
    }

    /// How messages name worker `k`.
    fn name(&self, k: usize) -> String {
        if self.place.multi_node() {
            format!("worker {k} of node {}", self.place.rank)
        } else {
            format!("worker {k}")
        }
    }

    /// Worker `k`'s part of the step. Worker 0 returns its output and the summed gradients.
    /// On one node the workers join the collective for this step only; on several they joined
    /// for the run ([`crate::train::cluster::Cluster::join`]).
    fn work<B: AutodiffBackend>(
        &self,
        k: usize,
        model: ClueModel<B>,
        part: Part<B>,
        device: &B::Device,
    ) -> Result<Option<StepParts<B>>, String> {
        let peer = PeerId(self.global(k) as u32);
        if self.place.multi_node() {
            return self.collective(k, &model, &part, device);
        }
        let config = CollectiveConfig::default().with_num_devices(self.workers);
        register::<B::InnerBackend>(peer, device.clone(), config)
            .map_err(|e| self.give_up(k, "joining the collective", e))?;
        let result = self.collective(k, &model, &part, device);
        // Always leave, so that no peer stays registered after this step.
        let left = finish_collective::<B::InnerBackend>(peer);
        let result = result?;
        left.map_err(|e| self.give_up(k, "leaving the collective", e))?;
        Ok(result)
    }

    /// Gives the run up after worker `k`'s collective call `what` failed with `e`, and says why.
    /// On several nodes this abandons the membership: the run's end then leaves without meeting
    /// the others (one of them left).
    fn give_up(&self, k: usize, what: &str, e: CollectiveError) -> String {
        let hint = if self.place.multi_node() {
            abandon_membership();
            " (did another node stop? its output says why)"
        } else {
            ""
        };
        format!("{}: {what} failed: {e:?}{hint}", self.name(k))
    }

    /// The sum of `x` over every worker of the run (worker `k`'s all-reduce, watched as `what`).
    fn summed<B: Backend, const D: usize>(
        &self,
        k: usize,
        what: &'static str,
        x: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, String> {
        let peer = PeerId(self.global(k) as u32);
        let x = x.into_primitive().tensor();
        self.watch
            .waiting(k, what, || all_reduce::<B>(peer, x, ReduceOperation::Sum))
            .map(|sum| Tensor::from_primitive(TensorPrimitive::Float(sum)))
            .map_err(|e| self.give_up(k, what, e))
    }

    /// The collective calls of worker `k`'s step, the same on every worker whatever fails.
    fn collective<B: AutodiffBackend>(
        &self,
        k: usize,
        model: &ClueModel<B>,
        part: &Part<B>,
        device: &B::Device,
    ) -> Result<Option<StepParts<B>>, String> {
        let global = self.global(k);
        let peer = PeerId(global as u32);
        let chunk = &part.chunk;
        let (m, services, n) = (chunk.len(), self.services, self.n);
        let d = model.head.w2.weight.dims()[1];
        let zeros = || Tensor::<B::InnerBackend, 2>::zeros([services * n, d], device);
        let key = MaskKey {
            seed: self.seed,
            step: self.step,
        };
        // A stand-in's masks: past the batch's users (its rows count for nothing anyway).
        let first = part.first.unwrap_or(n + global);
        // GradCache inside the worker: its share in chunks, first encoded without autodiff.
        let cut = self.grad_cache > 0 && self.grad_cache < m && part.first.is_some();
        let subs = if cut {
            chunk.split(self.grad_cache, self.multiple)
        } else {
            Vec::new()
        };
        // Gather: each worker fills its rows of a zero [services·n, d] matrix; the sum is the
        // batch. A worker that fails, or is a stand-in, sends zeros there.
        let local = catch_unwind(AssertUnwindSafe(|| {
            let (z, values) = if cut {
                (None, key.embed_frozen(model, &subs, first))
            } else {
                let z = key.masks(first, || model.forward(chunk));
                (Some(z.clone()), z.inner())
            };
            let mut buffer = zeros();
            if part.first.is_some() {
                for s in 0..services {
                    let rows = values.clone().slice([s * m..(s + 1) * m, 0..d]);
                    buffer = buffer.slice_assign([s * n + first..s * n + first + m, 0..d], rows);
                }
            }
            (z, buffer)
        }))
        .map_err(|p| panic_text(&self.name(k), "forward pass", p));
        let (local, buffer) = match local {
            Ok((z, buffer)) => (Ok(z), buffer),
            Err(e) => (Err(e), zeros()),
        };
        let gathered = self.summed(k, "gathering the embeddings", buffer)?;
        let outcome = local.and_then(|z| {
            catch_unwind(AssertUnwindSafe(|| {
                let mut all = Tensor::<B, 2>::from_inner(gathered);
                if part.first.is_none() {
                    // A stand-in: the same parameters get a gradient, of zero.
                    let z = z.expect("a stand-in is not cut");
                    let out = ClueOutput::of(all, services, model.log_logit_scale.val());
                    let nothing = z.sum() * 0.0 + model.log_logit_scale.val() * 0.0;
                    let grads = GradientsParams::from_grads(nothing.backward(), model);
                    return (out, Some(Flat::of(model, grads)));
                }
                match &z {
                    // Own rows with their graph: the gradient flows through them only.
                    Some(z) => {
                        for s in 0..services {
                            let own = z.clone().slice([s * m..(s + 1) * m, 0..d]);
                            all = all.slice_assign([s * n + first..s * n + first + m, 0..d], own);
                        }
                    }
                    // GradCache: the gathered embeddings are a leaf; their gradient is cached.
                    None => all = all.require_grad(),
                }
                let out = ClueOutput::of(all.clone(), services, model.log_logit_scale.val());
                if !is_finite(&out.loss) {
                    return (out, None);
                }
                let mut loss_grads = out.loss.backward();
                let cached = z.is_none().then(|| {
                    all.grad_remove(&mut loss_grads)
                        .expect("the embeddings are a leaf of the loss")
                });
                let mut grads = GradientsParams::from_grads(loss_grads, model);
                // Every active worker's loss holds all the logits: count the scale's gradient once.
                let id = model.log_logit_scale.id;
                if let Some(g) = grads.remove::<B::InnerBackend, 1>(id) {
                    grads.register::<B::InnerBackend, 1>(id, g / self.active as f64);
                }
                if let Some(cached) = cached {
                    let mut total = GradientsAccumulator::<ClueModel<B>>::new();
                    total.accumulate(model, grads);
                    key.replay(model, &subs, &cached, first, &mut total);
                    grads = total.grads();
                }
                // Laid end to end here, where a failure is caught and shared below.
                (out, Some(Flat::of(model, grads)))
            }))
            .map_err(|p| panic_text(&self.name(k), "loss or backward pass", p))
        });
        // Everyone learns whether anyone failed (or met a non-finite loss) before summing.
        let flags = [
            outcome.is_err() as u8 as f32,
            matches!(outcome, Ok((_, None))) as u8 as f32,
        ];
        let flags = Tensor::<B::InnerBackend, 1>::from_floats(flags, device);
        // Read as f32 whatever the backend's float type (bf16 on `--precision bf16`).
        let flags: Vec<f32> = self
            .summed(k, "sharing the step's state", flags)?
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("two flags");
        match outcome {
            Err(e) => Err(e),
            Ok(_) if flags[0] > 0.0 => Ok(None),
            Ok((out, grads)) => {
                let what = "summing the gradients";
                let grads = match grads {
                    Some(flat) if flags[1] == 0.0 => Some(
                        self.watch
                            .waiting(k, what, || flat.summed(model, peer))
                            .map_err(|e| self.give_up(k, what, e))?,
                    ),
                    _ => None,
                };
                Ok((k == 0).then_some((out, grads)))
            }
        }
    }
}

/// A worker's gradients laid end to end, in the order the model visits its parameters (the
/// same on every worker), so that one all-reduce sums them all: across nodes each all-reduce is
/// a round of messages.
struct Flat<B: AutodiffBackend> {
    /// The gradients `taken` held, end to end; `None` when there were none.
    flat: Option<Tensor<B::InnerBackend, 1>>,
    taken: Vec<ParamId>,
    /// The gradients of parameters the model does not visit (none today).
    rest: GradientsParams,
}

impl<B: AutodiffBackend> Flat<B> {
    fn of(model: &ClueModel<B>, mut grads: GradientsParams) -> Self {
        struct Take<'a, B: AutodiffBackend> {
            grads: &'a mut GradientsParams,
            parts: Vec<Tensor<B::InnerBackend, 1>>,
            taken: Vec<ParamId>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                    self.parts.push(g.reshape([-1]));
                    self.taken.push(param.id);
                }
            }
        }
        let mut take = Take::<B> {
            grads: &mut grads,
            parts: Vec::new(),
            taken: Vec::new(),
        };
        model.visit(&mut take);
        let (parts, taken) = (take.parts, take.taken);
        Flat {
            flat: (!parts.is_empty()).then(|| Tensor::cat(parts, 0)),
            taken,
            rest: grads,
        }
    }

    /// Every worker's gradients summed (an all-reduce), cut back into the gradients.
    fn summed(
        self,
        model: &ClueModel<B>,
        peer: PeerId,
    ) -> std::result::Result<GradientsParams, CollectiveError> {
        /// Cuts the summed vector back into the gradients `taken` held, in the same order.
        struct Put<B: AutodiffBackend> {
            summed: Tensor<B::InnerBackend, 1>,
            at: usize,
            taken: Vec<ParamId>,
            next: usize,
            grads: GradientsParams,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Put<B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if self.taken.get(self.next) != Some(&param.id) {
                    return;
                }
                self.next += 1;
                let shape = param.val().shape();
                let end = self.at + shape.num_elements();
                let g = self
                    .summed
                    .clone()
                    .narrow(0, self.at, end - self.at)
                    .reshape(shape);
                self.grads.register::<B::InnerBackend, D>(param.id, g);
                self.at = end;
            }
        }
        let Some(flat) = self.flat else {
            return Ok(self.rest);
        };
        let summed = all_reduce::<B::InnerBackend>(
            peer,
            flat.into_primitive().tensor(),
            ReduceOperation::Sum,
        )?;
        let mut put = Put::<B> {
            summed: Tensor::from_primitive(TensorPrimitive::Float(summed)),
            at: 0,
            taken: self.taken,
            next: 0,
            grads: self.rest,
        };
        model.visit(&mut put);
        Ok(put.grads)
    }
}

/// The message of a worker's panic.
fn panic_text(worker: &str, phase: &str, payload: Box<dyn std::any::Any + Send>) -> String {
    format!(
        "{worker} failed in its {phase}: {}",
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
            slot_row: self.slot_row.to_device(device),
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
        Ok(())
    }
}
