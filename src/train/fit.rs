//! `clue fit`: wires data, model, optimizer, schedule and Burn's learner together, then writes
//! the model bundle and `summary.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::data::dataloader::DataLoader;
use burn::prelude::*;
use burn::record::DefaultRecorder;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::LearningRateMetric;
use burn::train::{Interrupter, Learner, SupervisedTraining};
use serde::{Deserialize, Serialize};

use crate::bundle::{BUNDLE_DIR, BundleInfo, SplitScore, read_json, save_bundle};
use crate::data::batcher::{UserBatch, UserBatcher};
use crate::data::store::{PreparedDataset, Split, hold_lock, write_atomic};
use crate::error::{ClueError, Result};
use crate::model::init::Init;
use crate::model::{ClueModel, ParamCounts};
use crate::train::checkpoint::{
    AtomicRecorder, ResumedLogs, SaveEveryPeriod, clear_progress, complete_checkpoints,
    last_checkpoint, last_kept, resume_command, resume_from,
};
use crate::train::cluster::{Cluster, Resume, abandon_membership, plan_id};
use crate::train::config::RunConfig;
use crate::train::loader::{EpochPlan, ListLoader, PlanLoader};
use crate::train::metrics::{History, HistoryLog, Stat, StatMetric};
use crate::train::parallel::{Devices, setup_line, worker_devices};
use crate::train::renderer::LogRenderer;
use crate::train::schedule::WarmupCosine;
use crate::train::score::score;
use crate::train::step::{StepGuard, StepSettings, Trainee};
use crate::train::warmup::{WarmPlan, Warmed, warm_up_stopped};
use crate::ui;

/// Files of a run directory.
pub const RUN_CONFIG: &str = "config.toml";
pub const RUN_INFO: &str = "run.json";
pub const SUMMARY: &str = "summary.json";

/// What the error of a run stopped by a non-finite loss says.
pub const DIVERGED: &str = "the loss became NaN or infinite";

/// One PF-day in floating-point operations.
pub const PF_DAY: f64 = 8.64e19;

/// Training compute as the paper counts it (§5.2): 6 × parameters × batch × steps × sequence
/// length, where the sequence length is the number of items per service (S).
pub fn training_flops(params: usize, batch: usize, steps: usize, seq_len: usize) -> f64 {
    6.0 * params as f64 * batch as f64 * steps as f64 * seq_len as f64
}

/// What `clue fit` is asked to do.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub config: RunConfig,
    pub data: PathBuf,
    pub out: PathBuf,
    /// Burn's TUI dashboard (only when stdout is a terminal).
    pub tui: bool,
    /// Continue the run in `out` from its last checkpoint.
    pub resume: bool,
    /// Backend name, recorded in the summary.
    pub backend: String,
    /// Float precision (`f32`, `bf16`), recorded for `--resume`.
    pub precision: String,
    /// Check the prepared data's SHA-256 against its manifest before training.
    pub verify: bool,
    /// Data-parallel workers (`--devices`); `None`: one.
    pub devices: Option<Devices>,
    /// This node's place in a multi-node run (`--nodes`); `None`: one machine.
    pub cluster: Option<Cluster>,
}

/// Where a run's data lives, recorded so `--resume` needs nothing else.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub data: PathBuf,
    pub manifest_sha256: String,
    /// The backend the run started on (`--resume` without `--backend` keeps it).
    #[serde(default)]
    pub backend: Option<String>,
    /// Its float precision (`--resume` without `--precision` keeps it).
    #[serde(default)]
    pub precision: Option<String>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitSummary {
    pub backend: String,
    pub epochs: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub train_loss_final: Option<f64>,
    pub train_loss_best: Option<f64>,
    pub valid_loss_final: f64,
    pub valid_loss_best: f64,
    /// In-batch retrieval accuracy A→B (top-1) of held-out users, batches of `batch_size`.
    pub valid_retrieval_top1: f64,
    pub valid_retrieval_top1_ba: f64,
    pub valid_retrieval_top10: Option<f64>,
    /// 1 / evaluation batch size: what a model that knows nothing scores.
    pub chance_top1: f64,
    pub logit_scale: f64,
    pub params: ParamCounts,
    pub flops: f64,
    pub pf_days: f64,
    pub wall_seconds: f64,
    pub history: History,
}

/// The run's config (from the run directory on `--resume`) completed with the dataset's
/// vocabulary, the data directory, and the opened dataset.
fn resolve(options: &FitOptions) -> Result<(RunConfig, PathBuf, Arc<PreparedDataset>)> {
    let run = &options.out;
    let (mut config, data_dir) = if options.resume {
        let info: RunInfo = read_json(&run.join(RUN_INFO))?;
        (RunConfig::load(&run.join(RUN_CONFIG))?, info.data)
    } else {
        (options.config.clone(), options.data.clone())
    };
    let data = Arc::new(PreparedDataset::open(&data_dir, options.verify)?);
    let vocab = data.manifest.vocab_size as usize;
    if config.model.vocab_size != 0 && config.model.vocab_size != vocab {
        return Err(ClueError::config(
            format!(
                "model.vocab_size = {} but the dataset's tokenizer has {vocab}",
                config.model.vocab_size
            ),
            "leave model.vocab_size at 0 to take it from the data",
        ));
    }
    config.model.vocab_size = vocab;
    config.validate()?;
    let services = &data.manifest.services;
    if services.len() < config.train.objective.min_services() {
        return Err(ClueError::config(
            format!(
                "{} holds one service ({}); the cross-service objective pairs two services of each user",
                data_dir.display(),
                services.join(", ")
            ),
            "pretrain on it with the SimCLR objective (--set train.objective=simclr), or prepare logs with two services",
        ));
    }
    Ok((config, data_dir, data))
}

/// Enough users for one training batch and for validation.
fn check_users(train: usize, valid: usize, batch_size: usize) -> Result<()> {
    if train < batch_size {
        return Err(ClueError::config(
            format!("only {train} training users for train.batch_size = {batch_size}"),
            "lower train.batch_size (--set train.batch_size=N) or prepare more users",
        ));
    }
    if valid < 2 {
        return Err(ClueError::config(
            format!("{valid} validation users: validation needs at least 2"),
            "prepare with a larger --valid-fraction or more users",
        ));
    }
    Ok(())
}

/// A new run: write its resolved config and where its data lives, before any training. A
/// resumed run: check that its data has not changed.
fn init_run_dir(
    options: &FitOptions,
    config: &RunConfig,
    data_dir: &Path,
    manifest_sha256: &str,
) -> Result<()> {
    let run = &options.out;
    if options.resume {
        let info: RunInfo = read_json(&run.join(RUN_INFO))?;
        if info.manifest_sha256 != manifest_sha256 {
            return Err(ClueError::bad_file(
                data_dir,
                "the prepared dataset changed since this run started",
                "resume with the original data, or start a new run",
            ));
        }
        return Ok(());
    }
    if run.join(RUN_INFO).exists() {
        if run.join(SUMMARY).exists() || last_checkpoint(run).is_some() {
            return Err(ClueError::bad_file(
                run,
                "already holds a run",
                "continue it with --resume, or choose another --out",
            ));
        }
        ui::say(format!(
            "{} holds a run that stopped before its first checkpoint: starting it again",
            run.display()
        ));
        clear_progress(run)?;
    }
    std::fs::create_dir_all(run).map_err(|e| ClueError::io(run, e))?;
    write_atomic(&run.join(RUN_CONFIG), config.to_toml().as_bytes())?;
    let info = RunInfo {
        data: std::fs::canonicalize(data_dir).unwrap_or(data_dir.to_path_buf()),
        manifest_sha256: manifest_sha256.to_string(),
        backend: Some(options.backend.clone()),
        precision: Some(options.precision.clone()),
    };
    write_atomic(
        &run.join(RUN_INFO),
        serde_json::to_string_pretty(&info)
            .expect("json")
            .as_bytes(),
    )
}

/// The summary of a finished `run`, resumed (`every_node`: every node of the run has finished).
fn nothing_to_resume(run: &Path, every_node: bool) -> Result<FitSummary> {
    let who = match every_node {
        true => "and every other node have",
        false => "has",
    };
    ui::say(format!(
        "{} {who} finished: nothing to resume (its model is in {})",
        run.display(),
        run.join(BUNDLE_DIR).display()
    ));
    read_json(&run.join(SUMMARY))
}

/// Hold the run directory (`.lock`, an OS lock that dies with the process) until the returned
/// file is dropped: a second `clue fit` on the same run fails naming this one.
fn lock_run(run: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(run).map_err(|e| ClueError::io(run, e))?;
    hold_lock(&run.join(".lock"), run, "fit")
}

/// Train a CLUE model on `device` as `options` say. Generic over every Burn autodiff backend.
pub fn fit<B: AutodiffBackend>(device: B::Device, options: &FitOptions) -> Result<FitSummary> {
    let start = Instant::now();
    let run = &options.out;
    let (config, data_dir, data) = resolve(options)?;
    let plan = Arc::new(EpochPlan::for_run(
        &config.train,
        &data.users_in(Split::Train),
    ));
    let mut valid_users = data.users_in(Split::Valid);
    // A fixed evaluation batch (a sweep's) validates on whole batches only: a short last batch
    // would lower the mean InfoNCE (chance is ln B) by an amount that depends on the split.
    let eb = config.train.eval_batch_size;
    if eb > 0 && valid_users.len() >= eb {
        valid_users.truncate(valid_users.len() / eb * eb);
    }
    let bs = config.train.batch_size;
    check_users(plan.users().len(), valid_users.len(), bs)?;
    if let Some(d) = &options.devices {
        d.check(&config.train)?;
    }
    let workers = options
        .devices
        .as_ref()
        .map(|d| d.ids(device.to_id()))
        .unwrap_or_default();
    let manifest_sha256 = data.manifest.hash();
    let _lock = lock_run(run)?;
    // A finished node of several still joins: another node may not have finished. A run whose
    // model was lost resumes from its last checkpoint and writes it again.
    let finished = options.resume && run.join(SUMMARY).exists() && run.join(BUNDLE_DIR).is_dir();
    match &options.cluster {
        _ if !finished => {}
        None => return nothing_to_resume(run, false),
        Some(_) => ui::say(format!(
            "{} has finished: joining the other nodes, to train its last periods again with any that has not",
            run.display()
        )),
    }
    init_run_dir(options, &config, &data_dir, &manifest_sha256)?;

    B::seed(&device, config.train.seed);
    let steps_per_epoch = plan.steps_per_epoch();
    let total_steps = plan.total_steps();
    let mut trainee = Trainee {
        model: ClueModel::new(&config.model, &mut Init::new(config.train.seed, &device)),
        settings: StepSettings {
            clip_norm: config.train.grad_clip_norm,
            seed: config.train.seed,
            guard: None,
            grad_cache_chunk: config.train.grad_cache_chunk,
            workers: workers.clone(),
            place: options
                .cluster
                .as_ref()
                .map(Cluster::place)
                .unwrap_or_default(),
        },
    };
    // On a GPU: the batch shapes whose kernels the warm-up compiles (see `warmup.rs`).
    let warm = WarmPlan::of_run::<B>(&trainee.settings, &config, &data, &plan, &valid_users);
    let plan_id = plan_id(
        &config,
        &manifest_sha256,
        options.resume,
        &trainee.model,
        warm.as_ref().map(WarmPlan::steps),
    );
    let devices = worker_devices::<B>(&workers, &device);
    // Burn's "epochs" are the plan's periods: each ends with validation and a checkpoint. A
    // resumed run starts after its latest complete one; resumed nodes, after the newest that
    // every node holds, so they join before anything that depends on it is made.
    let held = (options.resume).then(|| Resume {
        held: complete_checkpoints(run),
        periods: plan.periods(),
        finished,
    });
    let (cluster, resume_period) = match &options.cluster {
        Some(c) => {
            let (joined, agreed) = c.start::<B::InnerBackend>(
                &config.train,
                &devices,
                (&plan_id, held.as_ref()),
                run,
            )?;
            if agreed.finished {
                return nothing_to_resume(run, true);
            }
            (Some(joined), agreed.newest)
        }
        None => (None, held.as_ref().and_then(|h| h.held.last().copied())),
    };
    let params = trainee.model.param_counts();
    let checkpoints = match config.train.checkpoint_every {
        0 => "checkpoint each epoch".to_string(),
        n => format!("checkpoint each epoch and every {n} steps"),
    };
    let setup = setup_line(
        workers.len(),
        options.cluster.as_ref(),
        config.train.grad_cache_chunk,
    );
    ui::say(format!(
        "training on {} ({}): {} parameters ({} non-embedding), {} train / {} valid users, {} epochs × {} steps{setup}, {checkpoints}",
        options.backend,
        B::name(&device),
        params.total,
        params.non_embedding,
        plan.users().len(),
        valid_users.len(),
        config.train.epochs,
        steps_per_epoch
    ));
    // A failure from here to the warm-up is this node's alone: it leaves the other nodes at
    // once (they stop at their next collective call) instead of meeting them out of step.
    let leave = |e: ClueError| {
        if cluster.is_some() {
            abandon_membership();
        }
        e
    };
    if let Some(held) = &held {
        resume_from(run, &held.held, resume_period).map_err(leave)?;
    }
    if finished {
        // Training again, the run is an interrupted one until it ends (its model stays).
        let summary = run.join(SUMMARY);
        std::fs::remove_file(&summary).map_err(|e| leave(ClueError::io(&summary, e)))?;
    }
    let done = resume_period.unwrap_or(0);
    // Counts steps and collects failures (a non-finite loss, a checkpoint write, a loader thread).
    let interrupter = Interrupter::new();
    let guard = StepGuard::new(interrupter.clone(), plan.steps_before(done));
    trainee.settings.guard = Some(guard.clone());

    let m = &config.model;
    let train_loader: Arc<dyn DataLoader<B, UserBatch<B>>> = Arc::new(
        PlanLoader::new(
            plan.clone(),
            data.clone(),
            UserBatcher::of::<B>(m.max_items, m.max_item_tokens),
            m.max_items,
            m.max_item_tokens,
            config.train.workers,
            device.clone(),
            done,
        )
        .with_views(config.train.views_seed())
        .with_guard(guard.clone()),
    );
    let valid_loader: Arc<dyn DataLoader<B::InnerBackend, _>> = Arc::new(
        ListLoader::held_out(data.clone(), valid_users.clone(), &config, device.clone())
            .with_guard(guard.clone()),
    );

    let history = HistoryLog::open(run, done).map_err(leave)?;
    let stats = [
        Stat::Loss,
        Stat::Top1AB,
        Stat::Top1BA,
        Stat::Top10AB,
        Stat::LogitScale,
        Stat::UsersPerSecond,
    ];
    let mut training = SupervisedTraining::new(run, train_loader, valid_loader)
        .with_interrupter(interrupter)
        .with_file_checkpointer(AtomicRecorder::new(
            DefaultRecorder::new(),
            Some(guard.clone()),
        ))
        .with_checkpointing_strategy(SaveEveryPeriod)
        .metric_train_numeric(LearningRateMetric::new())
        .num_epochs(plan.periods());
    for stat in stats {
        training = training
            .metric_train_numeric(StatMetric::new(stat, false, history.clone(), done))
            .metric_valid_numeric(StatMetric::new(stat, true, history.clone(), done));
    }
    if let Some(k) = resume_period {
        training = training.checkpoint(k);
    }
    if !(options.tui && std::io::IsTerminal::is_terminal(&std::io::stdout()))
        || ui::verbosity() == 0
    {
        let lines = if ui::verbosity() == 0 { 0 } else { 4 };
        training = training.renderer(LogRenderer::new(lines, plan.clone()));
    }
    let t = &config.train;
    let optim = t.optimizer().init::<B, Trainee<B>>();
    let schedule = WarmupCosine::new(t.lr, total_steps, t.warmup_fraction, t.final_lr_fraction);
    let mut logs = resume_period
        .map(|k| ResumedLogs::protect(run, k + 1))
        .transpose()
        .map_err(|e| {
            leave(ClueError::bad_file(
                run,
                format!("cannot set its metric logs aside: {e}"),
                "check the run directory's permissions",
            ))
        })?;
    let warmed = warm.map(|w| w.run(&trainee, &optim, (t.lr, t.seed), &data));
    let warmed = (warmed.transpose())
        .map_err(|why| warm_up_stopped(&why, run, resume_period.is_some()))
        // No step was made: a resumed run's logs go back as they were.
        .inspect_err(|_| drop(logs.take().map(ResumedLogs::restore)))?;
    let result = training.launch(Learner::new(trainee, optim, schedule));
    drop(cluster); // the nodes leave together, right after their last step
    drop(result.renderer);
    warmed.iter().for_each(Warmed::report);
    if let Some(logs) = logs {
        logs.restore().map_err(|e| {
            ClueError::bad_file(
                run,
                format!("cannot put its metric logs back in order: {e}"),
                "check the run directory's permissions",
            )
        })?;
    }

    stopped_on_non_finite_loss(&guard, run, &plan)?;
    stopped_early(&guard, run, &plan)?;
    let model: ClueModel<B::InnerBackend> = result.model.model;
    let steps = guard.steps();
    let valid = score::<B::InnerBackend>(&model, &data, valid_users, &config);
    if let Some(e) = history.write_error() {
        return Err(ClueError::bad_file(
            run,
            e,
            "free space in the run directory, then --resume",
        ));
    }
    let history = history.history();
    let logit_scale = model.logit_scale();
    let mut summary = summarise(&config, history, valid, logit_scale, params, steps, options);
    summary.wall_seconds = start.elapsed().as_secs_f64();
    let bundle = BundleInfo {
        clue_version: env!("CARGO_PKG_VERSION").to_string(),
        services: data.manifest.services.clone(),
        embedding_dim: config.model.embedding_dim(),
        dataset_manifest_sha256: manifest_sha256,
        params,
        steps,
        flops: summary.flops,
        pf_days: summary.pf_days,
        valid,
    };
    save_bundle(
        &model,
        &config,
        &bundle,
        &data.tokenizer_path(),
        &run.join(BUNDLE_DIR),
    )?;
    write_atomic(
        &run.join(SUMMARY),
        (serde_json::to_string_pretty(&summary).expect("json") + "\n").as_bytes(),
    )?;
    Ok(summary)
}

/// The error of a run that a non-finite loss stopped, if one did.
fn stopped_on_non_finite_loss(guard: &StepGuard, run: &Path, plan: &EpochPlan) -> Result<()> {
    let Some(step) = guard.bad_step() else {
        return Ok(());
    };
    let last = last_kept(guard, run, plan)
        .map(|step| format!("after step {step}"))
        .unwrap_or_else(|| "none yet".into());
    Err(ClueError::config(
        format!("training stopped: {DIVERGED} at step {step} (last good checkpoint: {last})"),
        format!(
            "start it again with a lower train.lr or a higher train.grad_clip_norm (`{}` continues from the last good checkpoint with the same settings)",
            resume_command(run)
        ),
    ))
}

/// The error of a run that stopped before its last step: a failure reported to the guard (a
/// checkpoint write, a data-loading thread) or an interruption.
fn stopped_early(guard: &StepGuard, run: &Path, plan: &EpochPlan) -> Result<()> {
    let (steps, total) = (guard.steps(), plan.total_steps());
    let why = match guard.failure() {
        Some(what) => what,
        None if steps < total => "training was interrupted".to_string(),
        None => return Ok(()),
    };
    let last = match last_kept(guard, run, plan) {
        Some(step) => format!(
            "the last complete checkpoint (after step {step}) is kept: fix the cause and run `{}`",
            resume_command(run)
        ),
        None => "no checkpoint was completed: fix the cause and start the run again".to_string(),
    };
    Err(ClueError::bad_file(
        run,
        format!("training stopped after {steps} of {total} steps: {why}"),
        last,
    ))
}

/// `summary.json` of a finished run (without its wall time).
fn summarise(
    config: &RunConfig,
    history: History,
    valid: SplitScore,
    logit_scale: f64,
    params: ParamCounts,
    steps: usize,
    options: &FitOptions,
) -> FitSummary {
    let bs = config.train.batch_size;
    let best = |xs: Vec<Option<f64>>| {
        xs.into_iter()
            .flatten()
            .fold(None, |b: Option<f64>, x| Some(b.map_or(x, |b| b.min(x))))
    };
    let flops = training_flops(params.total, bs, steps, config.model.user_positions());
    FitSummary {
        backend: options.backend.clone(),
        epochs: config.train.epochs,
        steps,
        batch_size: bs,
        train_loss_final: history.train.last().and_then(|e| e.loss),
        train_loss_best: best(history.train.iter().map(|e| e.loss).collect()),
        valid_loss_final: valid.loss,
        valid_loss_best: best(
            history
                .valid
                .iter()
                .map(|e| e.loss)
                .chain([Some(valid.loss)])
                .collect(),
        )
        .unwrap_or(valid.loss),
        valid_retrieval_top1: valid.top1_ab,
        valid_retrieval_top1_ba: valid.top1_ba,
        valid_retrieval_top10: valid.top10_ab,
        chance_top1: 1.0 / config.train.eval_batch() as f64,
        logit_scale,
        params,
        flops,
        pf_days: flops / PF_DAY,
        wall_seconds: 0.0,
        history,
    }
}

impl FitSummary {
    pub fn table(&self) -> String {
        let pct = |x: f64| format!("{:.1} %", 100.0 * x);
        let mut rows = vec![
            ("backend".to_string(), self.backend.clone()),
            (
                "steps".into(),
                format!(
                    "{} ({} epochs, batch {})",
                    self.steps, self.epochs, self.batch_size
                ),
            ),
            (
                "train loss".into(),
                self.train_loss_final
                    .map(|x| format!("{x:.4}"))
                    .unwrap_or_default(),
            ),
            (
                "valid loss".into(),
                format!(
                    "{:.4} (best {:.4}; log(batch) = {:.4})",
                    self.valid_loss_final,
                    self.valid_loss_best,
                    (1.0 / self.chance_top1).ln()
                ),
            ),
            (
                "valid top-1 A→B".into(),
                format!(
                    "{} (chance {})",
                    pct(self.valid_retrieval_top1),
                    pct(self.chance_top1)
                ),
            ),
            ("valid top-1 B→A".into(), pct(self.valid_retrieval_top1_ba)),
        ];
        if let Some(t) = self.valid_retrieval_top10 {
            rows.push(("valid top-10 A→B".into(), pct(t)));
        }
        rows.extend([
            ("logit scale".into(), format!("{:.2}", self.logit_scale)),
            (
                "parameters".into(),
                format!(
                    "{} ({} non-embedding)",
                    self.params.total, self.params.non_embedding
                ),
            ),
            (
                "compute".into(),
                format!("{:.3e} FLOPs = {:.3e} PF-days", self.flops, self.pf_days),
            ),
            ("wall time".into(), format!("{:.1} s", self.wall_seconds)),
        ]);
        ui::table("fit summary", &rows)
    }
}
