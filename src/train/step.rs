//! One training step (forward both services, loss, backward, global clipping) and one
//! validation step, as Burn's learner calls them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::{AutodiffModule, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::{AutodiffBackend, DeviceId};
use burn::train::{InferenceStep, Interrupter, TrainOutput, TrainStep};

use crate::backend::BackendKind;
use crate::data::batcher::UserBatch;
use crate::model::dropout::start_step;
use crate::model::ops::clamp_max;
use crate::model::{ClueModel, LOGIT_SCALE_MAX};
use crate::train::clip::clip_global_norm;
use crate::train::cluster::Place;
use crate::train::grad_cache::grad_cache_step;
use crate::train::loss::is_finite;
use crate::train::metrics::ClueOutput;
use crate::train::parallel::{parallel_step, worker_devices};

/// Watches every training step for a non-finite loss. The first bad step skips its update,
/// records its number and stops the learner, so the last checkpoint stays a good one.
/// The checkpoint writer and the data-loading threads report their failures here too
/// ([`StepGuard::fail`]): the learner stops before the period's checkpoint and `clue fit` fails.
pub struct StepGuard {
    steps: AtomicUsize,
    first_bad: AtomicUsize,
    interrupter: std::sync::Mutex<Option<Interrupter>>,
    /// The first failure outside the step (a checkpoint write, a loader thread).
    failure: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for StepGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGuard")
            .field("steps", &self.steps)
            .field("first_bad", &self.bad_step())
            .field("failure", &self.failure())
            .finish()
    }
}

impl StepGuard {
    pub fn new(interrupter: Interrupter, start_step: usize) -> Arc<Self> {
        Arc::new(Self {
            steps: AtomicUsize::new(start_step),
            first_bad: AtomicUsize::new(usize::MAX),
            interrupter: std::sync::Mutex::new(Some(interrupter)),
            failure: std::sync::Mutex::new(None),
        })
    }

    /// Record a failure outside the step (the first one is kept) and stop the learner.
    pub fn fail(&self, what: impl Into<String>) {
        let what = what.into();
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if failure.is_none() {
            *failure = Some(what.clone());
        }
        self.stop(&what);
    }

    /// The first failure recorded by [`StepGuard::fail`].
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn stop(&self, reason: &str) {
        let interrupter = self.interrupter.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = interrupter.as_ref() {
            i.stop(Some(reason));
        }
    }

    /// Step (1-based) whose loss was not finite, if any.
    pub fn bad_step(&self) -> Option<usize> {
        let s = self.first_bad.load(Ordering::Relaxed);
        (s != usize::MAX).then_some(s)
    }

    pub fn steps(&self) -> usize {
        self.steps.load(Ordering::Relaxed)
    }
}

/// Training settings the step needs; not parameters, so skipped by the module derive.
#[derive(Debug, Clone, Default)]
pub struct StepSettings {
    pub clip_norm: f64,
    /// The run's seed: with the step number, it keys the step's dropout masks.
    pub seed: u64,
    /// Counts the steps (and stops on a non-finite loss); without one, every step is step 0.
    pub guard: Option<Arc<StepGuard>>,
    /// GradCache: encode the batch in chunks of this many users (0 = the whole batch at once).
    pub grad_cache_chunk: usize,
    /// Data-parallel workers: one device each, the first the model's own (fewer than two: the
    /// step runs on the model's device alone).
    pub workers: Vec<DeviceId>,
    /// This node's place in a multi-node run (one node by default).
    pub place: Place,
}

/// The model as the learner sees it.
#[derive(Module, Debug)]
pub struct Trainee<B: Backend> {
    pub model: ClueModel<B>,
    #[module(skip)]
    pub settings: StepSettings,
}

impl<B: Backend> Trainee<B> {
    fn output(&self, batch: &UserBatch<B>) -> ClueOutput<B> {
        let projected = self.model.forward(batch);
        ClueOutput::of(projected, batch.services, self.model.log_logit_scale.val())
    }
}

impl<B: AutodiffBackend> Trainee<B> {
    /// A step that could not run (a data-parallel worker failed): no update, the learner
    /// stops with `failure` (`clue fit` fails naming it), the last checkpoint stays.
    fn failed(&self, batch: &UserBatch<B>, failure: String) -> TrainOutput<ClueOutput<B>> {
        match &self.settings.guard {
            Some(guard) => guard.fail(failure),
            None => panic!("{failure}"),
        }
        let device = self.model.devices()[0].clone();
        let n = batch.len();
        let item = ClueOutput {
            loss: Tensor::from_floats([f32::NAN], &device),
            similarities: Tensor::zeros([n, n], &device),
            log_logit_scale: self.model.log_logit_scale.val(),
            host: None,
        };
        TrainOutput {
            grads: GradientsParams::new(),
            item,
        }
    }
}

impl<B: AutodiffBackend> TrainStep for Trainee<B> {
    type Input = UserBatch<B>;
    type Output = ClueOutput<B>;

    fn step(&self, batch: UserBatch<B>) -> TrainOutput<ClueOutput<B>> {
        let step = self.settings.guard.as_ref().map_or(0, |g| g.steps()) as u64;
        let chunk = self.settings.grad_cache_chunk;
        let workers = &self.settings.workers;
        let place = self.settings.place;
        let (out, grads) = if workers.len() > 1 || place.multi_node() {
            let devices = worker_devices::<B>(workers, &self.model.devices()[0]);
            let seed = self.settings.seed;
            match parallel_step(&self.model, seed, &batch, &devices, place, step, chunk) {
                Ok(done) => done,
                Err(failure) => return self.failed(&batch, failure),
            }
        } else {
            let seed = self.settings.seed;
            BackendKind::of::<B>().drive(|| {
                if chunk > 0 && chunk < batch.len() {
                    return grad_cache_step(&self.model, seed, &batch, chunk, step);
                }
                start_step(seed, step);
                let out = self.output(&batch);
                let grads = is_finite(&out.loss)
                    .then(|| GradientsParams::from_grads(out.loss.backward(), self));
                (out, grads)
            })
        };
        let finite = grads.is_some();
        let mut grads = grads.unwrap_or_default();
        if let Some(guard) = &self.settings.guard {
            let step = guard.steps.fetch_add(1, Ordering::Relaxed) + 1;
            if !finite && guard.bad_step().is_none() {
                guard.first_bad.store(step, Ordering::Relaxed);
                guard.stop(&format!("non-finite loss at step {step}"));
            }
        }
        let clip_norm = self.settings.clip_norm;
        let kind = BackendKind::of::<B>();
        kind.drive(|| clip_global_norm(self, &mut grads, clip_norm));
        let item = if kind.fused() { out.settle() } else { out };
        TrainOutput { grads, item }
    }

    /// The optimizer step, then CLIP's clamp of the logit scale at ln 100. The clamp keeps the
    /// parameter a trainable leaf (a plain `map(clamp)` would switch its gradient off).
    fn optimize<BB, O>(self, optim: &mut O, lr: f64, grads: GradientsParams) -> Self
    where
        BB: AutodiffBackend,
        O: Optimizer<Self, BB>,
        Self: AutodiffModule<BB>,
    {
        let mut next = BackendKind::of::<B>().drive(|| optim.step(lr, self, grads));
        next.model.log_logit_scale = clamp_param(next.model.log_logit_scale, LOGIT_SCALE_MAX.ln());
        next
    }
}

/// Clamp a parameter's value at `max` without detaching it from training.
pub fn clamp_param<B: Backend>(p: Param<Tensor<B, 1>>, max: f64) -> Param<Tensor<B, 1>> {
    p.map(|t| {
        let rg = t.is_require_grad();
        clamp_max(t, max).detach().set_require_grad(rg)
    })
}

impl<B: Backend> InferenceStep for Trainee<B> {
    type Input = UserBatch<B>;
    type Output = ClueOutput<B>;

    fn step(&self, batch: UserBatch<B>) -> ClueOutput<B> {
        let kind = BackendKind::of::<B>();
        let out = kind.drive(|| self.output(&batch));
        if kind.fused() { out.settle() } else { out }
    }
}
