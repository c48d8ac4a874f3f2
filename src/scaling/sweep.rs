//! `clue sweep`: every run of a grid, one after the other, as ordinary run directories under
//! `OUT/runs/`, each followed by its held-out test loss at the grid's fixed evaluation batches.
//! A killed sweep started again skips finished runs and resumes the one it was in.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, read_json};
use crate::data::store::{PreparedDataset, Split, hold_lock, write_atomic};
use crate::error::{ClueError, Result};
use crate::model::init::Init;
use crate::model::{ClueModel, ParamCounts};
use crate::scaling::downstream::{Downstream, evaluate, task_names};
use crate::scaling::grid::{Grid, GridRun};
use crate::train::config::RunConfig;
use crate::train::fit::{
    DIVERGED, FitOptions, FitSummary, PF_DAY, RUN_CONFIG, RUN_INFO, fit, training_flops,
};
use crate::train::loader::EpochPlan;
use crate::train::score::score;
use crate::ui;

/// Files of a sweep directory and of its runs.
pub const SWEEP: &str = "sweep.json";
pub const POINT: &str = "point.json";
pub const RUNS: &str = "runs";

/// What `clue sweep` is asked to do.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub grid: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub backend: String,
    pub precision: String,
    pub verify: bool,
    /// Task files every finished run is evaluated on (the CLUE probe, one seed).
    pub tasks: Vec<PathBuf>,
}

/// `sweep.json`: the grid's runs in order, and how they are measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepInfo {
    pub grid: PathBuf,
    pub data: PathBuf,
    pub backend: String,
    pub eval_batch_size: usize,
    /// Test users the held-out loss is measured on (whole evaluation batches).
    pub eval_users: usize,
    pub runs: Vec<String>,
    /// Names of the downstream tasks runs of this sweep were evaluated on (`--task`, over every
    /// invocation).
    #[serde(default)]
    pub tasks: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Done,
    /// The loss became NaN or infinite: left out of every fit, and reported.
    Diverged,
    Failed,
}

/// One point of a run's learning curve: the validation loss at the grid's evaluation batch size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: usize,
    pub pf_days: f64,
    pub valid_loss: f64,
}

/// `runs/NAME/point.json`: what the study knows of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunPoint {
    pub name: String,
    pub coords: Vec<(String, String)>,
    pub status: Status,
    pub error: Option<String>,
    pub params: ParamCounts,
    pub d_model: usize,
    pub layers: usize,
    pub batch_size: usize,
    pub max_items: usize,
    pub output_dim: usize,
    pub data_fraction: f64,
    pub shuffle: bool,
    pub epochs: usize,
    pub steps: usize,
    /// 6 · parameters · batch · steps · S (the paper's count), and in PF-days.
    pub flops: f64,
    pub pf_days: f64,
    /// Held-out test loss of the final model (InfoNCE at the sweep's evaluation batch size).
    pub test_loss: Option<f64>,
    pub test_top1: Option<f64>,
    pub curve: Vec<CurvePoint>,
    pub wall_seconds: f64,
    /// The CLUE probe's test metrics on each task of `clue sweep --task`.
    #[serde(default)]
    pub downstream: Vec<Downstream>,
}

impl RunPoint {
    /// On the compute frontier's candidate list: trained on all the data, reshuffled each epoch.
    pub fn frontier_candidate(&self) -> bool {
        self.status == Status::Done && self.data_fraction >= 1.0 && self.shuffle
    }

    fn planned(run: &GridRun, params: ParamCounts, plan: &EpochPlan) -> Self {
        let c = &run.config;
        let steps = plan.total_steps();
        let flops = training_flops(
            params.total,
            c.train.batch_size,
            steps,
            c.model.user_positions(),
        );
        Self {
            name: run.name.clone(),
            coords: run.coords.clone(),
            status: Status::Failed,
            error: None,
            params,
            d_model: c.model.d_model,
            layers: c.model.item_layers + c.model.service_layers,
            batch_size: c.train.batch_size,
            max_items: c.model.max_items,
            output_dim: c.model.output_dim,
            data_fraction: c.train.data_fraction,
            shuffle: c.train.shuffle,
            epochs: c.train.epochs,
            steps,
            flops,
            pf_days: flops / PF_DAY,
            test_loss: None,
            test_top1: None,
            curve: Vec::new(),
            wall_seconds: 0.0,
            downstream: Vec::new(),
        }
    }
}

/// The grid's runs with the vocabulary of `data` and a period length that gives each run about
/// `curve_points` validations, each with its plan (as `clue fit` draws it from the training
/// users `train`).
fn complete(grid: &Grid, data: &PreparedDataset, train: &[u32]) -> Vec<(GridRun, EpochPlan)> {
    let mut runs = grid.runs.clone();
    for run in &mut runs {
        run.config.model.vocab_size = data.manifest.vocab_size as usize;
        let total = EpochPlan::for_run(&run.config.train, train).total_steps();
        run.config.train.checkpoint_every = total.div_ceil(grid.curve_points).max(1);
    }
    runs.into_iter()
        .map(|run| {
            let plan = EpochPlan::for_run(&run.config.train, train);
            (run, plan)
        })
        .collect()
}

/// Run every run of the grid that has not finished; returns the points of all runs.
pub fn sweep<B: AutodiffBackend>(
    device: B::Device,
    options: &SweepOptions,
) -> Result<Vec<RunPoint>> {
    let grid = Grid::load(&options.grid)?;
    let tasks = task_names(&options.tasks)?;
    let data = Arc::new(PreparedDataset::open(&options.data, options.verify)?);
    let test = data.users_in(Split::Test);
    let eb = grid.eval_batch_size;
    let eval_users: Vec<u32> = test[..test.len() / eb * eb].to_vec();
    if eval_users.is_empty() {
        return Err(ClueError::config(
            format!(
                "{} has {} test users, fewer than the grid's eval_batch_size = {eb}",
                options.data.display(),
                test.len()
            ),
            "lower eval_batch_size in the grid, or prepare with a larger --test-fraction",
        ));
    }
    let (runs, plans): (Vec<GridRun>, Vec<EpochPlan>) =
        complete(&grid, &data, &data.users_in(Split::Train))
            .into_iter()
            .unzip();
    for (run, plan) in runs.iter().zip(&plans) {
        let users = plan.users().len();
        if users < run.config.train.batch_size {
            return Err(ClueError::bad_file(
                &options.grid,
                format!(
                    "run `{}` has fewer training users than its batch ({} < {})",
                    run.name, users, run.config.train.batch_size
                ),
                "raise its data_fraction or lower its batch_size",
            ));
        }
    }
    let out = &options.out;
    let _lock = hold_lock(&out.join(".lock"), out, "sweep")?;
    let mut info = SweepInfo {
        grid: options.grid.clone(),
        data: std::fs::canonicalize(&options.data).unwrap_or(options.data.clone()),
        backend: options.backend.clone(),
        eval_batch_size: eb,
        eval_users: eval_users.len(),
        runs: runs.iter().map(|r| r.name.clone()).collect(),
        tasks: Vec::new(),
    };
    let old = read_json::<SweepInfo>(&out.join(SWEEP)).ok();
    // Every task any run of the sweep was evaluated on, the earlier ones first.
    info.tasks = old.as_ref().map(|o| o.tasks.clone()).unwrap_or_default();
    for t in &tasks {
        if !info.tasks.contains(t) {
            info.tasks.push(t.clone());
        }
    }
    if let Some(old) = old
        && (old.data != info.data
            || old.eval_batch_size != info.eval_batch_size
            || old.eval_users != info.eval_users)
    {
        return Err(ClueError::bad_file(
            out,
            format!(
                "holds a sweep of {} measured at batch {} on {} test users; this one is of {} at batch {} on {}",
                old.data.display(),
                old.eval_batch_size,
                old.eval_users,
                info.data.display(),
                eb,
                info.eval_users
            ),
            "sweep into a new --out (its points would not be comparable)",
        ));
    }
    write_atomic(
        &out.join(SWEEP),
        serde_json::to_string_pretty(&info)
            .expect("json")
            .as_bytes(),
    )?;
    let text = std::fs::read(&options.grid).map_err(|e| ClueError::io(&options.grid, e))?;
    write_atomic(&out.join("grid.toml"), &text)?;

    let init_device = device.clone();
    let planned: Vec<RunPoint> = runs
        .iter()
        .zip(&plans)
        .map(|(run, plan)| {
            let model = ClueModel::<B::InnerBackend>::new(
                &run.config.model,
                &mut Init::new(run.config.train.seed, &init_device),
            );
            RunPoint::planned(run, model.param_counts(), plan)
        })
        .collect();
    let start = Instant::now();
    let (mut flops_done, mut start_eta, mut points) = (0.0, 0.0, Vec::new());
    for (i, ((run, epochs), plan)) in runs.iter().zip(&plans).zip(&planned).enumerate() {
        let dir = out.join(RUNS).join(&run.name);
        // A failed run (a full disk, a dead loader) is tried again; a finished or diverged
        // one is kept if the grid still gives it the same config.
        if let Ok(mut point) = read_json::<RunPoint>(&dir.join(POINT))
            && point.status != Status::Failed
        {
            same_config(&dir, run)?;
            ui::detail(format!(
                "run {}/{} {}: finished, skipped",
                i + 1,
                runs.len(),
                run.name
            ));
            let missing = tasks
                .iter()
                .any(|t| !point.downstream.iter().any(|d| &d.task == t));
            if point.status == Status::Done && missing {
                start_eta += add_downstream::<B>(&device, options, &tasks, &mut point, &dir)?;
            }
            points.push(point);
            continue;
        }
        let left: f64 = planned[i..]
            .iter()
            .filter(|p| !out.join(RUNS).join(&p.name).join(POINT).exists())
            .map(|p| p.flops)
            .sum();
        let eta = match flops_done > 0.0 {
            true => format!(
                ", ETA {}",
                minutes((start.elapsed().as_secs_f64() - start_eta) / flops_done * left)
            ),
            false => String::new(),
        };
        ui::say(format!(
            "== run {}/{} {}: {} parameters, batch {}, S {}, {} steps, {:.2e} PF-days{eta}",
            i + 1,
            runs.len(),
            run.name,
            plan.params.total,
            plan.batch_size,
            plan.max_items,
            plan.steps,
            plan.pf_days
        ));
        let mut point = measure::<B>(
            &device,
            options,
            run,
            epochs,
            plan.clone(),
            &data,
            &eval_users,
        )?;
        if point.status == Status::Done {
            flops_done += point.flops;
        } else {
            // A run that stopped early spent little of its compute: the ETA leaves it out.
            start_eta += point.wall_seconds;
        }
        ui::say(format!(
            "   {}: {}",
            run.name,
            match (point.status, point.test_loss) {
                (Status::Done, Some(l)) =>
                    format!("test loss {l:.4} (ln {eb} = {:.4})", (eb as f64).ln()),
                (s, _) => format!("{s:?}: {}", point.error.clone().unwrap_or_default()),
            }
        ));
        write_atomic(
            &dir.join(POINT),
            (serde_json::to_string_pretty(&point).expect("json") + "\n").as_bytes(),
        )?;
        if point.status == Status::Done {
            start_eta += add_downstream::<B>(&device, options, &tasks, &mut point, &dir)?;
        }
        points.push(point);
    }
    ui::say(format!(
        "sweep done: {} runs ({} failed or diverged) in {}; `clue scaling --sweep {}` fits and plots them",
        points.len(),
        points.iter().filter(|p| p.status != Status::Done).count(),
        minutes(start.elapsed().as_secs_f64()),
        out.display()
    ));
    Ok(points)
}

/// Evaluate a finished run on the sweep's tasks it has no result for, then save its point.
/// Returns the seconds it took (the ETA counts training compute only).
fn add_downstream<B: AutodiffBackend>(
    device: &B::Device,
    options: &SweepOptions,
    names: &[String],
    point: &mut RunPoint,
    dir: &Path,
) -> Result<f64> {
    if options.tasks.is_empty() {
        return Ok(0.0);
    }
    let start = Instant::now();
    let added = quietly(|| evaluate::<B>(device, dir, &options.tasks, names, &point.downstream));
    point.downstream.extend(added?);
    for d in &point.downstream {
        ui::say(format!(
            "   {}: {} MRR {:.4}, HR@10 {:.4}",
            point.name, d.task, d.mrr, d.hr10
        ));
    }
    write_atomic(
        &dir.join(POINT),
        (serde_json::to_string_pretty(point).expect("json") + "\n").as_bytes(),
    )?;
    Ok(start.elapsed().as_secs_f64())
}

/// Run `f` printing nothing but errors unless under --verbose: the sweep prints a line per run,
/// a run's own training and evaluation lines only with --verbose.
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let verbosity = ui::verbosity();
    ui::set_verbosity(verbosity.min(if verbosity >= 2 { 2 } else { 0 }));
    let out = f();
    ui::set_verbosity(verbosity);
    out
}

fn minutes(seconds: f64) -> String {
    match seconds < 90.0 {
        true => format!("{seconds:.0} s"),
        false => format!("{:.1} min", seconds / 60.0),
    }
}

/// Refuse a run directory whose recorded config is not the one the grid now gives `run`.
fn same_config(dir: &Path, run: &GridRun) -> Result<()> {
    let path = dir.join(RUN_CONFIG);
    if path.exists() && RunConfig::load(&path)? != run.config {
        return Err(ClueError::bad_file(
            dir,
            "holds a run of another config: the grid changed since this sweep started",
            "sweep into a new --out, or delete this run's directory",
        ));
    }
    Ok(())
}

/// Train (or resume) one run, then measure its test loss; a run that fails or diverges gives a
/// point that says so (the sweep goes on). Errors of the sweep's own files stop it.
fn measure<B: AutodiffBackend>(
    device: &B::Device,
    options: &SweepOptions,
    run: &GridRun,
    plan: &EpochPlan,
    mut point: RunPoint,
    data: &Arc<PreparedDataset>,
    eval_users: &[u32],
) -> Result<RunPoint> {
    let start = Instant::now();
    let dir = &options.out.join(RUNS).join(&run.name);
    let fit_options = FitOptions {
        config: run.config.clone(),
        data: options.data.clone(),
        out: dir.to_path_buf(),
        tui: false,
        resume: dir.join(RUN_INFO).exists(),
        backend: options.backend.clone(),
        precision: options.precision.clone(),
        verify: false,
        devices: None,
        cluster: None,
    };
    if fit_options.resume {
        same_config(dir, run)?;
    }
    let fitted = quietly(|| fit::<B>(device.clone(), &fit_options));
    let summary = match fitted {
        Ok(s) => s,
        Err(e) => {
            let message = e.to_string();
            point.status = match message.contains(DIVERGED) {
                true => Status::Diverged,
                false => Status::Failed,
            };
            point.error = Some(message);
            point.wall_seconds = start.elapsed().as_secs_f64();
            return Ok(point);
        }
    };
    point.curve = curve(&summary, &point, plan, run.config.model.user_positions());
    let bundle = Bundle::<B::InnerBackend>::load(dir, device)?;
    let scored = score::<B::InnerBackend>(&bundle.model, data, eval_users.to_vec(), &run.config);
    point.status = match scored.loss.is_finite() {
        true => Status::Done,
        false => Status::Diverged,
    };
    point.test_loss = Some(scored.loss).filter(|l| l.is_finite());
    point.test_top1 = Some(scored.top1_ab);
    point.wall_seconds = start.elapsed().as_secs_f64();
    Ok(point)
}

/// The run's validation losses (one per period) at the steps and compute they were taken.
fn curve(
    summary: &FitSummary,
    point: &RunPoint,
    plan: &EpochPlan,
    positions: usize,
) -> Vec<CurvePoint> {
    summary
        .history
        .valid
        .iter()
        .enumerate()
        .filter_map(|(k, e)| {
            let step = plan.steps_before(k + 1).min(point.steps);
            let flops = training_flops(point.params.total, point.batch_size, step, positions);
            e.loss.filter(|l| l.is_finite()).map(|l| CurvePoint {
                step,
                pf_days: flops / PF_DAY,
                valid_loss: l,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_is_the_papers_count_worked_by_hand() {
        let mut config = RunConfig::default();
        config.train.batch_size = 32;
        config.train.epochs = 3;
        config.model.max_items = 16;
        let run = GridRun {
            name: "r".into(),
            config,
            coords: vec![],
        };
        // 1,000 users in batches of 32: 32 steps an epoch (the last one short), 96 in all.
        let plan = EpochPlan::new((0..1000).collect(), 32, 3, 0, 0);
        let params = ParamCounts {
            total: 1_000_000,
            non_embedding: 400_000,
        };
        let p = RunPoint::planned(&run, params, &plan);
        assert_eq!(p.steps, 96);
        // 6 · 10⁶ · 32 · 96 · 16 = 2.949 12 · 10¹¹ FLOPs; / 8.64 · 10¹⁹ = 3.413 33 · 10⁻⁹ PF-days.
        assert_eq!(p.flops, 294_912_000_000.0);
        assert!((p.pf_days - 3.413_333e-9).abs() < 1e-14, "{}", p.pf_days);
    }
}
