//! The GPU warm-up of `clue fit`: compile the kernels of the batch shapes the run will meet
//! before the learner starts, with a live count, so that a first run on a machine shows
//! "compiling GPU kernels" instead of a dashboard stuck at step 0, and training steps run at
//! their steady speed from the first one.
//!
//! On a GPU backend batches are padded to fixed shapes (`data::batcher::FixedShape`): the model's
//! maxima and the number of distinct items rounded up to a multiple of `ITEM_MULTIPLE`. CubeCL's
//! kernels take shapes as run-time arguments, so a new item count compiles nothing new, except
//! where it changes an autotune key (a build with the `autotune` feature): those round each size
//! up to a power of two. The warm-up therefore runs one step per class of batches among the
//! first epochs' batches (number of users; number of users and power-of-two class of the item
//! count of each piece the step encodes: the batch, or its data-parallel shares and GradCache
//! chunks), with the class's largest item count, counted from the data before training.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{InferenceStep, Interrupter, ItemLazy, TrainStep};

use crate::data::augment::{VALID_ROUND, Views};
use crate::data::batcher::{FixedShape, UserBatch, UserBatcher, UserDataset};
use crate::data::store::PreparedDataset;
use crate::error::ClueError;
use crate::gpu::{KernelWork, kernel_work, settled_work};
use crate::train::checkpoint::resume_command;
use crate::train::config::RunConfig;
use crate::train::loader::EpochPlan;
use crate::train::step::{StepGuard, StepSettings, Trainee};
use crate::ui;

/// Epochs whose batches the warm-up's classes are taken from (a later epoch's batch in another
/// class compiles during training, and `clue fit` counts it at the end).
pub const WARM_EPOCHS: usize = 3;

/// Batches counted per epoch at most (the first ones and the last): counting is host work over
/// every item id of a batch (~10⁶ ids for a batch of 256 users of `base`).
pub const WARM_BATCHES: usize = 300;

/// One batch to warm up: its users (with their views), and its distinct items padded to `items`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmShape {
    pub users: Vec<u32>,
    pub views: Option<Views>,
    pub items: usize,
}

/// How a training step cuts its batch before the model encodes it: over `workers`
/// data-parallel workers (consecutive shares of ⌈n / workers⌉ users, as
/// [`crate::train::parallel::parallel_step`] cuts them) and each share in GradCache chunks of
/// `chunk` users (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCut {
    pub workers: usize,
    pub chunk: usize,
}

impl StepCut {
    /// The users of each piece the model encodes, of a batch of `n` users: the shares, each in
    /// chunks where GradCache cuts it, and the batch's first user alone for the workers left
    /// without a share (a short batch's stand-in).
    pub fn pieces(self, n: usize) -> Vec<Range<usize>> {
        let w = self.workers.max(1);
        let cut = |r: Range<usize>, by: usize| {
            r.clone()
                .step_by(by.max(1))
                .map(move |f| f..(f + by).min(r.end))
        };
        let shares: Vec<_> = cut(0..n, n.div_ceil(w)).collect();
        let mut pieces = Vec::new();
        for share in &shares {
            match self.chunk {
                c if c > 0 && c < share.len() => pieces.extend(cut(share.clone(), c)),
                _ => pieces.push(share.clone()),
            }
        }
        if shares.len() < w && n > 0 {
            pieces.push(0..1);
        }
        pieces
    }
}

/// The batches to warm among `batches` (users and views of each), for steps that cut them as
/// `cut` says: each piece's distinct items rounded up to a multiple of `fixed.item_multiple`;
/// of the batches whose pieces have the same numbers of users and the same power-of-two
/// classes of item count, the one with the most items over its pieces.
pub fn warm_shapes(
    data: &Arc<PreparedDataset>,
    batches: impl IntoIterator<Item = (Vec<u32>, Option<Views>)>,
    fixed: FixedShape,
    cut: StepCut,
) -> Vec<WarmShape> {
    type Class = (usize, Vec<(usize, usize)>);
    let mut classes: BTreeMap<Class, (usize, WarmShape)> = BTreeMap::new();
    let m = fixed.item_multiple.max(1);
    let padded = |distinct: usize| distinct.max(1).div_ceil(m) * m;
    for (users, views) in batches {
        let ds = UserDataset::with_users(data.clone(), users.clone(), fixed.items, fixed.tokens)
            .with_views(views);
        let user_items: Vec<HashSet<u32>> = (0..ds.len())
            .map(|i| {
                ds.item_ids(i)
                    .map(|(_, ids)| ids.into_iter().flatten().collect())
                    .unwrap_or_default()
            })
            .collect();
        let distinct =
            |r: Range<usize>| user_items[r].iter().flatten().collect::<HashSet<_>>().len();
        let pieces: Vec<(usize, usize)> = cut
            .pieces(user_items.len())
            .into_iter()
            .map(|r| (r.len(), padded(distinct(r))))
            .collect();
        let weight = pieces.iter().map(|&(_, i)| i).sum::<usize>();
        let class = pieces
            .iter()
            .map(|&(n, i)| (n, i.next_power_of_two()))
            .collect();
        let key = (user_items.len(), class);
        if classes.get(&key).is_none_or(|(w, _)| weight > *w) {
            let shape = WarmShape {
                items: padded(distinct(0..user_items.len())),
                users,
                views,
            };
            classes.insert(key, (weight, shape));
        }
    }
    classes.into_values().map(|(_, s)| s).collect()
}

/// The batch of `shape`, its distinct items padded to exactly `shape.items`.
fn warm_batch<B: Backend>(
    shape: &WarmShape,
    data: &Arc<PreparedDataset>,
    fixed: FixedShape,
    device: &B::Device,
) -> UserBatch<B> {
    let ds = UserDataset::with_users(data.clone(), shape.users.clone(), fixed.items, fixed.tokens)
        .with_views(shape.views);
    let samples = (0..ds.len()).filter_map(|i| ds.get(i)).collect();
    let batcher = UserBatcher::fixed(FixedShape {
        item_multiple: shape.items,
        ..fixed
    });
    batcher.batch(samples, device)
}

/// The count after the warm-up, to tell what training compiled after it.
#[derive(Debug)]
pub struct Warmed(Option<KernelWork>);

impl Warmed {
    /// Print what was compiled since the warm-up (nothing to print when nothing counts).
    pub fn report(&self) {
        if let (Some(before), Some(now)) = (self.0, settled_work()) {
            ui::say(format!(
                "GPU kernels after the warm-up: {}",
                now.since(before)
            ));
        }
    }
}

/// Sets its flag when dropped.
struct Done<'a>(&'a AtomicBool);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Run, on clones of the model and optimizer: a training step with its AdamW update per
/// training shape (the first shape twice: Burn's AdamW, which bf16 and the fused build keep,
/// takes another path at its first update than at later ones), then a validation step per validation shape, showing the kernels compiled as
/// they come. Each step reads its outputs to the host, as in training. A training step that
/// fails (a data-parallel worker, or another node, stopped) ends the warm-up with its message.
pub fn warm_up<B, O>(
    trainee: &Trainee<B>,
    optim: &O,
    lr: f64,
    (data, fixed): (&Arc<PreparedDataset>, FixedShape),
    train: &[WarmShape],
    valid: &[WarmShape],
) -> Result<(), String>
where
    B: AutodiffBackend,
    O: Optimizer<Trainee<B>, B> + Clone,
{
    let start = Instant::now();
    let before = kernel_work();
    let device = trainee.model.devices()[0].clone();
    let twice = train.len().min(1); // the first training shape runs twice
    let total = train.len() + twice + valid.len();
    let cache = if cfg!(feature = "cuda") {
        "; CUDA keeps them on disk for later runs"
    } else {
        ""
    };
    ui::say(format!(
        "compiling GPU kernels for {total} warm-up steps before the first step (a first run can take minutes{cache})"
    ));
    let label = Mutex::new(String::new());
    let done = AtomicBool::new(false);
    let show = |i: usize, what: &str, s: &WarmShape| {
        let line = format!(
            "step {i}/{total}: {what}, {} users × {} items",
            s.users.len(),
            s.items
        );
        *label.lock().unwrap_or_else(|e| e.into_inner()) = line;
    };
    let warmed = std::thread::scope(|scope| {
        // Redraws the count while the steps compile (a CubeCL compile blocks the caller).
        scope.spawn(|| {
            let bar = ui::spinner();
            while !done.load(Ordering::Relaxed) {
                let count = before
                    .zip(kernel_work())
                    .map(|(b, now)| format!(" ({})", now.since(b).compiled))
                    .unwrap_or_default();
                let line = label.lock().unwrap_or_else(|e| e.into_inner()).clone();
                bar.set_message(format!("compiling GPU kernels{count} · {line}"));
                std::thread::sleep(Duration::from_millis(250));
            }
            bar.finish_and_clear();
        });
        let _done = Done(&done); // also when a step panics: the spinner's thread must end
        let mut learner = trainee.clone();
        // The run's steps are not counted, nor stopped, here; a failed step reports to this.
        let guard = StepGuard::new(Interrupter::new(), 0);
        learner.settings.guard = Some(guard.clone());
        let mut optim = optim.clone();
        for (i, s) in train.iter().take(1).chain(train).enumerate() {
            show(i + 1, "training", s);
            let out = TrainStep::step(&learner, warm_batch::<B>(s, data, fixed, &device));
            if let Some(failure) = guard.failure() {
                return Err(failure);
            }
            learner = learner.optimize(&mut optim, lr, out.grads);
            let _ = out.item.sync();
        }
        let frozen = learner.valid();
        for (i, s) in valid.iter().enumerate() {
            show(train.len() + twice + 1 + i, "validation", s);
            let batch = warm_batch::<B::InnerBackend>(s, data, fixed, &device);
            let _ = InferenceStep::step(&frozen, batch).sync();
        }
        Ok(())
    });
    warmed?;
    let work = before
        .zip(settled_work())
        .map(|(b, now)| format!("{} in", now.since(b)))
        .unwrap_or_else(|| "done in".into());
    ui::say(format!(
        "GPU warm-up: {work} {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    crate::gpu::show_kinds();
    Ok(())
}

/// The warm-up of a run: the shape of its batches and the batches to warm, for training and
/// validation. On several nodes every node must warm the same (it is part of the plan they
/// compare when they join, [`crate::train::cluster::plan_id`]): their warm-up steps meet in
/// the same collective calls, as training's do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPlan {
    pub fixed: FixedShape,
    pub train: Vec<WarmShape>,
    pub valid: Vec<WarmShape>,
}

impl WarmPlan {
    /// `clue fit`'s warm-up on a backend with fixed shapes (a GPU; none on a CPU backend, where
    /// nothing is compiled).
    pub fn of_run<B: Backend>(
        settings: &StepSettings,
        config: &RunConfig,
        data: &Arc<PreparedDataset>,
        plan: &EpochPlan,
        valid_users: &[u32],
    ) -> Option<Self> {
        let m = &config.model;
        let fixed = UserBatcher::of::<B>(m.max_items, m.max_item_tokens).fixed?;
        Some(Self::new(
            settings,
            config,
            (data, fixed),
            plan,
            valid_users,
        ))
    }

    /// The warm-up of a run's plan with batches of shape `fixed`: the batches of the first
    /// [`WARM_EPOCHS`] epochs, classed by the pieces its steps encode (data-parallel shares over
    /// every node's workers, GradCache chunks, as `settings` say: [`StepCut`]), and the
    /// validation batches.
    pub fn new(
        settings: &StepSettings,
        config: &RunConfig,
        (data, fixed): (&Arc<PreparedDataset>, FixedShape),
        plan: &EpochPlan,
        valid_users: &[u32],
    ) -> Self {
        let t = &config.train;
        let cut = StepCut {
            workers: settings.workers.len().max(1) * settings.place.nodes,
            chunk: settings.grad_cache_chunk,
        };
        let bs = t.batch_size.max(1);
        let train = (0..WARM_EPOCHS.min(t.epochs.max(1))).flat_map(|e| {
            let order = plan.epoch_order(e);
            let views = t.views((e * plan.periods_per_epoch()) as u64);
            let chunks: Vec<&[u32]> = order.chunks(bs).collect();
            // At most WARM_BATCHES per epoch, the last (short) one always among them.
            let skip = chunks.len().saturating_sub(WARM_BATCHES);
            let first = &chunks[..chunks.len().saturating_sub(skip + 1)];
            let kept = first.iter().chain(chunks.last());
            kept.map(|c| (c.to_vec(), views)).collect::<Vec<_>>()
        });
        let vb = t.eval_batch().max(1);
        let valid = valid_users
            .chunks(vb)
            .map(|c| (c.to_vec(), t.views(VALID_ROUND)));
        Self {
            fixed,
            train: warm_shapes(data, train, fixed, cut),
            valid: warm_shapes(data, valid, fixed, StepCut::default()),
        }
    }

    /// What the nodes of a run compare: the batch shape, and the users and items of each step.
    pub fn steps(&self) -> String {
        let sizes = |shapes: &[WarmShape]| -> Vec<(usize, usize)> {
            shapes.iter().map(|s| (s.users.len(), s.items)).collect()
        };
        format!(
            "{:?} {:?} {:?}",
            self.fixed,
            sizes(&self.train),
            sizes(&self.valid)
        )
    }

    /// Run the warm-up ([`warm_up`]) on copies of `trainee` and `optim` at learning rate `lr`,
    /// then seed the backend's generator again with the run's `seed`, so that the warm-up's
    /// dropout draws leave training as it would have been. Fails with the first failed step's
    /// message; on several nodes a step fails on every node alike, or, when a node exits, stops
    /// the others with a lost node.
    pub fn run<B, O>(
        &self,
        trainee: &Trainee<B>,
        optim: &O,
        (lr, seed): (f64, u64),
        data: &Arc<PreparedDataset>,
    ) -> Result<Warmed, String>
    where
        B: AutodiffBackend,
        O: Optimizer<Trainee<B>, B> + Clone,
    {
        let (train, valid) = (&self.train, &self.valid);
        warm_up(trainee, optim, lr, (data, self.fixed), train, valid)?;
        B::seed(&trainee.model.devices()[0], seed);
        Ok(Warmed(kernel_work()))
    }
}

/// The error of a warm-up that stopped with `why` before the first step of the run in `run`
/// (`resumed`: a run resumed with `--resume`).
pub fn warm_up_stopped(why: &str, run: &Path, resumed: bool) -> ClueError {
    let again = match resumed {
        true => format!("run `{}` again", resume_command(run)),
        false => "start the run again".into(),
    };
    ClueError::bad_file(
        run,
        format!("the GPU warm-up stopped before the first step: {why}"),
        format!("no step was made: fix the cause and {again}"),
    )
}
