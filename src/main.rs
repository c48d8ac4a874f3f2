//! The `clue` command line: argument parsing, output, and the one place a backend is chosen.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use clap::{Args, Parser, Subcommand, ValueEnum};

use clue::bench::{bench, preset};
use clue::data::store::Split;
use clue::embed::{EmbedOptions, embed};
use clue::eval::{EvalOptions, eval};
use clue::train::config::RunConfig;
use clue::train::fit::{FitOptions, fit, score_bundle};

use clue::data::prepare::{PrepareOptions, format_count, prepare};
use clue::data::synth::{SynthOptions, synth};
use clue::error::ClueError;
use clue::ui;

#[derive(Parser)]
#[command(
    name = "clue",
    version,
    about = "CLUE: learn general-purpose user embeddings from multi-service behaviour logs",
    after_help = "Examples:\n  clue synth --users 2000 --out data/synth\n  clue prepare data/synth/logs --out data/prepared\n\nEach command's --help shows more."
)]
struct Cli {
    /// Print only errors.
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Print more detail.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write seeded synthetic multi-service logs and downstream task files.
    #[command(
        after_help = "Example:\n  clue synth --users 2000 --seed 7 --out data/synth\n\nWrites DIR/logs/{search,shop}.csv, DIR/tasks/{news,market}/{interactions,items}.csv and DIR/truth/users.csv."
    )]
    Synth(SynthArgs),
    /// Convert a public dataset into canonical logs and task files.
    #[command(
        after_help = "Examples:\n  clue convert lastfm --input hetrec2011-lastfm-2k --out data/lastfm\n  clue convert movielens --input ml-latest-small --out data/movielens\n  clue convert amazon-unisrec --input Scientific --name Scientific --out data/scientific\n\nWrites DIR/logs/*.csv and DIR/tasks/<task>.toml (+ its interactions and items).\nSee datasets/README.md for what is kept and dropped."
    )]
    Convert(ConvertArgs),
    /// Turn behaviour logs into a tokenizer and a compact, memory-mapped dataset.
    #[command(
        after_help = "Examples:\n  clue prepare data/synth/logs --out data/prepared\n  clue prepare a.csv b.csv --out data/p --skip-bad-rows --min-behaviors 3 --max-items 128\n  clue prepare logs/ --out data/p --config config/prepare.toml\n\nLogs are CSV with the header user_id,service,timestamp,text (timestamp: Unix seconds, RFC 3339 or empty)."
    )]
    Prepare(PrepareArgs),
    /// Pretrain CLUE on a prepared dataset (with no argument: the embedded default run).
    #[command(
        after_help = "Examples:\n  clue fit --backend ndarray                     # embedded default: synth + prepare + tiny config\n  clue fit --backend flex --config config/small.toml --data data/prepared --out runs/small\n  clue fit --backend cuda --precision bf16 --config config/base.toml --data data/p --out runs/base\n  clue fit --backend ndarray --set train.epochs=2 --set train.lr=1e-3\n  clue fit --resume runs/small                   # continue a killed run from its last checkpoint\n\nOn a terminal, Burn's dashboard shows progress (q to stop); otherwise plain log lines."
    )]
    Fit(FitArgs),
    /// Contrastive loss and retrieval of a trained model on held-out users.
    #[command(
        after_help = "Examples:\n  clue score --model runs/tiny --data data/default/prepared --split test\n  clue score --model runs/tiny --data data/p --backend cuda --json\n\nThe test split's loss is the pretraining test loss of the scaling study."
    )]
    Score(ScoreArgs),
    /// Export frozen user embeddings (safetensors / .npy + users.csv + manifest).
    #[command(
        after_help = "Examples:\n  clue embed --model runs/tiny --logs data/default/synth/logs --out emb/users.safetensors\n  clue embed --model runs/tiny --logs logs/ --services shop --out emb/shop.npy --f16\n  clue embed --model runs/tiny --logs market.csv --services market --alias market=shop --out emb/m.safetensors\n\nRows of the matrix follow <out>.users.csv (row,user_id,has_<service>...). Each user's vector is the\nconcatenation of their per-service embeddings in --services order; a service without behaviour\ngives zeros there and has_<service> = 0. Python: numpy.load(...) or safetensors.numpy.load_file(...)."
    )]
    Embed(EmbedArgs),
    /// Evaluate user embeddings on a downstream task (CLUE probe vs baselines).
    #[command(
        after_help = "Examples:\n  clue eval --task data/default/synth/tasks/news.toml --model runs/tiny --out eval/news\n  clue eval --task data/default/synth/tasks/market.toml --model runs/tiny --out eval/market --seeds 3\n  clue eval --task t.toml --model runs/tiny --embeddings emb/users.safetensors --out eval/t\n\nWrites DIR/results.json, DIR/results.md and DIR/negatives.csv. The task file (TOML) names\ninteractions (user_id,item_id,timestamp), items (item_id,text), [features] (source = \"logs\" with\nlogs/services, or source = \"history\" with service/targets), [split], [negatives], [probe], models.\n`clue synth` writes two under <out>/tasks/."
    )]
    Eval(EvalArgs),
    /// Measure training and inference throughput on the PyTorch reference's workload.
    #[command(
        after_help = "Examples:\n  clue bench --preset tiny --backend flex\n  clue bench --preset small --backend cuda --precision bf16 --json\n\nCompare with: python3 shared/bench/torch_clue_ref.py --vocab 4096 --dim 64 --layers 2 --heads 4 --L 16 --S 32 --batch 16"
    )]
    Bench(BenchArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendName {
    /// CPU, burn-ndarray (multi-threaded).
    Ndarray,
    /// CPU, Burn's Flex backend.
    Flex,
    /// Any GPU through wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// NVIDIA GPUs.
    Cuda,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Precision {
    F32,
    /// bfloat16 weights and activations (CUDA, compute capability 8.0+).
    Bf16,
}

#[derive(Args)]
struct DeviceArgs {
    /// Where to train.
    #[arg(long, value_enum, default_value = "ndarray")]
    backend: BackendName,
    /// GPU index for --backend cuda.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Float precision (bf16 only on cuda).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

#[derive(Args)]
struct FitArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Run configuration (TOML with [model] and [train]); default: the embedded tiny config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Prepared dataset; default: synthesise and prepare one under data/default.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory; default: runs/<config name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config entry, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "data", "out", "sets"])]
    resume: Option<PathBuf>,
    /// Plain log lines instead of the dashboard, even on a terminal.
    #[arg(long)]
    no_tui: bool,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Run directory (or its model/ bundle).
    #[arg(long)]
    model: PathBuf,
    /// Prepared dataset the model was trained on.
    #[arg(long)]
    data: PathBuf,
    /// Which users: valid or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Print the figures (and the first users' embeddings) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Last.fm HetRec 2011 (tag + listen services, tag-artist task).
    Lastfm,
    /// MovieLens ml-latest-small (movie + tag services, next-movie task).
    Movielens,
    /// Amazon 2018 as preprocessed for UniSRec (one service, next-product task).
    AmazonUnisrec,
}

#[derive(Args)]
struct ConvertArgs {
    /// Dataset format.
    #[arg(value_enum)]
    format: Format,
    /// Folder with the dataset's files as published.
    #[arg(long)]
    input: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// lastfm: tagging on or after this date is the downstream task's target.
    #[arg(long, default_value = "2010-07-01T00:00:00Z")]
    cutoff: String,
    /// amazon-unisrec: the files' prefix (<NAME>.text, <NAME>.test.inter, ...).
    #[arg(long, default_value = "Scientific")]
    name: String,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Run directory (or its model/ bundle).
    #[arg(long)]
    model: PathBuf,
    /// Behaviour logs: CSV files or directories (user_id,service,timestamp,text).
    #[arg(long, num_args = 1.., required = true)]
    logs: Vec<PathBuf>,
    /// Output file: .safetensors or .npy (users.csv and manifest.json go beside it).
    #[arg(long)]
    out: PathBuf,
    /// Services to embed, comma-separated, in output order (default: the model's services).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<String>>,
    /// Read an untrained service's items as a trained one (its prefix token): NEW=KNOWN.
    #[arg(long, value_name = "NEW=KNOWN")]
    alias: Vec<String>,
    /// Store half-precision floats.
    #[arg(long)]
    f16: bool,
    /// Also write a .npy copy beside a .safetensors output.
    #[arg(long)]
    npy: bool,
    /// Users per Service Transformer call.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Encode items again for every batch instead of once (slower; for comparison).
    #[arg(long)]
    no_item_cache: bool,
    /// Skip malformed log rows (counted in the manifest) instead of stopping.
    #[arg(long)]
    skip_bad_rows: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Task file (TOML).
    #[arg(long)]
    task: PathBuf,
    /// Run directory (or its model/ bundle): item-text features, and user features.
    #[arg(long)]
    model: PathBuf,
    /// User features from this `clue embed` output instead of the model.
    #[arg(long)]
    embeddings: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Train the probes with this many seeds and report mean ± std.
    #[arg(long, default_value_t = 1)]
    seeds: usize,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Workload: tiny, small or base.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Timed steps (median reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// The embedded tiny config: the default run needs no file.
const TINY: &str = include_str!("../config/tiny.toml");
const DEFAULT_DATA: &str = "data/default";
const DEFAULT_USERS: usize = 2000;

/// What to run once the backend is chosen.
enum Job {
    Fit(FitOptions),
    Embed {
        model: PathBuf,
        options: EmbedOptions,
    },
    Eval(EvalOptions),
    Bench {
        preset: clue::bench::Preset,
        steps: usize,
        warmup: usize,
        json: bool,
    },
    Score {
        model: PathBuf,
        data: PathBuf,
        split: Split,
        json: bool,
    },
}

/// Run `job` on `device`; `fixed_shapes` for accelerators (see `FixedShape`).
fn run_job<B: AutodiffBackend>(
    device: B::Device,
    job: &Job,
    fixed_shapes: bool,
) -> anyhow::Result<()> {
    match job {
        Job::Embed { model, options } => {
            let options = EmbedOptions {
                fixed_shapes,
                ..options.clone()
            };
            let report = embed::<B::InnerBackend>(model, &device, &options)?;
            ui::say(report.summary());
        }
        Job::Eval(options) => {
            let options = EvalOptions {
                fixed_shapes,
                ..options.clone()
            };
            let results = eval::<B>(&device, &options)?;
            ui::say(results.markdown());
            ui::say(format!("  results written to {}", options.out.display()));
        }
        Job::Fit(options) => {
            let options = FitOptions {
                fixed_shapes,
                ..options.clone()
            };
            let summary = fit::<B>(device, &options)?;
            ui::say(summary.table());
            ui::say(format!("  run written to {}", options.out.display()));
        }
        Job::Score {
            model,
            data,
            split,
            json,
        } => {
            let report =
                score_bundle::<B::InnerBackend>(model, data, *split, &device, fixed_shapes)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let s = &report.score;
                let pct = |x: f64| format!("{:.1} %", 100.0 * x);
                ui::say(ui::table(
                    &format!("score on {:?} users ({})", split, report.backend),
                    &[
                        ("users".into(), s.users.to_string()),
                        (
                            "loss".into(),
                            format!(
                                "{:.4} (log(batch) = {:.4})",
                                s.loss,
                                (s.batch_size as f64).ln()
                            ),
                        ),
                        (
                            "top-1 A→B".into(),
                            format!(
                                "{} (chance {})",
                                pct(s.top1_ab),
                                pct(1.0 / s.batch_size as f64)
                            ),
                        ),
                        ("top-1 B→A".into(), pct(s.top1_ba)),
                        ("top-10 A→B".into(), s.top10_ab.map(pct).unwrap_or_default()),
                    ],
                ));
            }
        }
        Job::Bench {
            preset,
            steps,
            warmup,
            json,
        } => {
            let name = B::name(&device);
            let report = bench::<B>(device, preset, *steps, *warmup, &name, fixed_shapes);
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                ui::say(report.table());
            }
        }
    }
    Ok(())
}

/// Keep compiled GPU kernels on disk so that only the first run on a machine pays for compiling
/// them: CubeCL's compilation cache goes to `$CLUE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/clue/kernels`
/// or `~/.cache/clue/kernels`, unless a `cubecl.toml` already names one. `CUBECL_*` variables
/// (e.g. `CUBECL_DEBUG_LOG`, `CUBECL_AUTOTUNE_LEVEL`) still apply.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn kernel_cache() {
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};
    let dir = std::env::var_os("CLUE_KERNEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("clue/kernels"))
        })
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/clue/kernels")));
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_none()
        && let Some(dir) = dir
        && std::fs::create_dir_all(&dir).is_ok()
    {
        ui::detail(format!("kernel cache: {}", dir.display()));
        config.compilation.cache = Some(CacheConfig::File(dir));
    }
    CubeClRuntimeConfig::set(config);
}

/// Fail with a clear message, not a panic, when a GPU backend finds no device.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn probe<B: burn::tensor::backend::Backend>(device: &B::Device, what: &str) -> anyhow::Result<()> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let dev = device.clone();
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        burn::tensor::Tensor::<B, 1>::zeros([1], &dev).into_data();
    }));
    std::panic::set_hook(hook);
    ok.map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        anyhow::anyhow!("no usable {what} device: {msg}\n  hint: check the driver (nvidia-smi / vulkaninfo), or use --backend ndarray")
    })
}

fn dispatch(d: &DeviceArgs, job: &Job) -> anyhow::Result<()> {
    if d.precision == Precision::Bf16 && d.backend != BackendName::Cuda {
        anyhow::bail!("--precision bf16 needs --backend cuda\n  hint: CPU backends train in f32");
    }
    match d.backend {
        #[cfg(feature = "ndarray")]
        BackendName::Ndarray => {
            run_job::<Autodiff<burn::backend::NdArray>>(Default::default(), job, false)
        }
        BackendName::Flex => {
            run_job::<Autodiff<burn::backend::Flex>>(Default::default(), job, false)
        }
        #[cfg(feature = "wgpu")]
        BackendName::Wgpu => {
            let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
            kernel_cache();
            probe::<burn::backend::Wgpu>(&device, "wgpu")?;
            run_job::<Autodiff<burn::backend::Wgpu>>(device, job, true)
        }
        #[cfg(feature = "cuda")]
        BackendName::Cuda => {
            let device = burn::backend::cuda::CudaDevice::new(d.device);
            kernel_cache();
            probe::<burn::backend::Cuda>(&device, "CUDA")?;
            match d.precision {
                Precision::F32 => run_job::<Autodiff<burn::backend::Cuda>>(device, job, true),
                Precision::Bf16 => {
                    run_job::<Autodiff<burn::backend::Cuda<burn::tensor::bf16>>>(device, job, true)
                }
            }
        }
        #[allow(unreachable_patterns)]
        other => {
            let name = other
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            anyhow::bail!(
                "this clue was built without the `{name}` backend\n  hint: rebuild with `cargo build --release --features {name}`"
            )
        }
    }
}

/// Options of `clue fit`, making the embedded default data when no --data is given.
fn fit_options(a: &FitArgs) -> anyhow::Result<FitOptions> {
    let backend = a
        .device
        .backend
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    if let Some(run) = &a.resume {
        return Ok(FitOptions {
            config: RunConfig::default(),
            data: PathBuf::new(),
            out: run.clone(),
            tui: !a.no_tui,
            resume: true,
            backend,
            fixed_shapes: false,
        });
    }
    let (base, name) = match &a.config {
        Some(path) => (
            RunConfig::load(path)?,
            path.file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or("run".into()),
        ),
        None => (
            RunConfig::from_toml(TINY, std::path::Path::new("config/tiny.toml"))?,
            "tiny".to_string(),
        ),
    };
    let config = base.with_overrides(&a.sets)?;
    config.validate()?;
    let data = match &a.data {
        Some(d) => d.clone(),
        None => default_data(&config)?,
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(name));
    Ok(FitOptions {
        config,
        data,
        out,
        tui: !a.no_tui,
        resume: false,
        backend,
        fixed_shapes: false,
    })
}

/// Synthesise and prepare the embedded default dataset unless it is already there.
fn default_data(config: &RunConfig) -> anyhow::Result<PathBuf> {
    let root = PathBuf::from(DEFAULT_DATA);
    let prepared = root.join("prepared");
    if prepared.join(clue::data::store::MANIFEST).exists() {
        return Ok(prepared);
    }
    ui::say(format!(
        "no --data given: synthesising {DEFAULT_USERS} users into {}",
        root.display()
    ));
    synth(
        &root.join("synth"),
        &SynthOptions {
            users: DEFAULT_USERS,
            seed: 0,
        },
    )?;
    let options = PrepareOptions {
        max_items: config.model.max_items,
        max_item_tokens: config.model.max_item_tokens,
        ..PrepareOptions::default()
    };
    let report = prepare(&[root.join("synth").join("logs")], &prepared, &options)?;
    ui::say(report.summary());
    Ok(prepared)
}

#[derive(Args)]
struct SynthArgs {
    /// Number of users to generate.
    #[arg(long, default_value_t = 2000)]
    users: usize,
    /// Random seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct PrepareArgs {
    /// CSV log files or directories of them.
    #[arg(required = true)]
    logs: Vec<PathBuf>,
    /// Output directory (replaced atomically if it holds an earlier prepared dataset).
    #[arg(long)]
    out: PathBuf,
    /// TOML file whose `[prepare]` table gives defaults for the options below.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Skip bad rows and report them, instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Use this tokenizer.json instead of training a byte-level BPE.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// BPE vocabulary size (default: from the number of distinct texts, at most 50,257).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Most recent items kept per user and service [default: 512].
    #[arg(long)]
    max_items: Option<usize>,
    /// Tokens per item, service prefix included [default: 32].
    #[arg(long)]
    max_item_tokens: Option<usize>,
    /// Drop users with fewer distinct behaviours in any service [default: 2].
    #[arg(long)]
    min_behaviors: Option<usize>,
    /// Services to keep, comma-separated (default: all in the logs).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<String>>,
    /// Fraction of users held out for validation [default: 0.1].
    #[arg(long)]
    valid_fraction: Option<f64>,
    /// Fraction of users held out for test [default: 0.1].
    #[arg(long)]
    test_fraction: Option<f64>,
    /// Seed of the user split [default: 0].
    #[arg(long)]
    seed: Option<u64>,
}

impl PrepareArgs {
    fn options(&self) -> Result<PrepareOptions, ClueError> {
        let mut o = match &self.config {
            Some(path) => {
                #[derive(serde::Deserialize)]
                struct File {
                    #[serde(default)]
                    prepare: PrepareOptions,
                }
                let text = std::fs::read_to_string(path).map_err(|e| ClueError::io(path, e))?;
                toml::from_str::<File>(&text)
                    .map_err(|e| {
                        ClueError::bad_file(
                            path,
                            e.to_string(),
                            "see config/prepare.toml for the keys",
                        )
                    })?
                    .prepare
            }
            None => PrepareOptions::default(),
        };
        o.skip_bad_rows |= self.skip_bad_rows;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { o.$f = v.clone(); } )* };
        }
        set!(
            max_items,
            max_item_tokens,
            min_behaviors,
            valid_fraction,
            test_fraction,
            seed
        );
        if self.tokenizer.is_some() {
            o.tokenizer = self.tokenizer.clone();
        }
        if self.vocab_size.is_some() {
            o.vocab_size = self.vocab_size;
        }
        if self.services.is_some() {
            o.services = self.services.clone();
        }
        Ok(o)
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Synth(a) => {
            let start = std::time::Instant::now();
            let report = synth(
                &a.out,
                &SynthOptions {
                    users: a.users,
                    seed: a.seed,
                },
            )?;
            let mut rows = vec![
                ("users".to_string(), format_count(report.users as u64)),
                ("latent topics".to_string(), report.topics.to_string()),
            ];
            for (s, n) in &report.rows_per_service {
                rows.push((format!("log {s}"), format!("{} rows", format_count(*n))));
            }
            for (t, n) in &report.task_interactions {
                rows.push((
                    format!("task {t}"),
                    format!("{} interactions", format_count(*n)),
                ));
            }
            rows.push((
                "time".into(),
                format!("{:.2} s", start.elapsed().as_secs_f64()),
            ));
            rows.push(("written to".into(), a.out.display().to_string()));
            ui::say(ui::table("synthesised", &rows));
        }
        Command::Fit(a) => {
            let options = fit_options(&a)?;
            if !options.resume {
                ui::detail(format!("resolved config:\n{}", options.config.to_toml()));
            }
            dispatch(&a.device, &Job::Fit(options))?;
        }
        Command::Score(a) => {
            let split = match a.split.as_str() {
                "valid" => Split::Valid,
                "test" => Split::Test,
                other => anyhow::bail!("--split {other}: use valid or test"),
            };
            let job = Job::Score {
                model: a.model.clone(),
                data: a.data.clone(),
                split,
                json: a.json,
            };
            dispatch(&a.device, &job)?;
        }
        Command::Convert(a) => {
            let report = match a.format {
                Format::Lastfm => clue::data::convert::lastfm(&a.input, &a.out, &a.cutoff)?,
                Format::Movielens => clue::data::convert::movielens(&a.input, &a.out)?,
                Format::AmazonUnisrec => {
                    clue::data::convert::amazon_unisrec(&a.input, &a.out, &a.name)?
                }
            };
            let mut rows: Vec<(String, String)> = report
                .written
                .iter()
                .map(|(f, n)| (f.clone(), format!("{} rows", format_count(*n))))
                .collect();
            for (why, n) in &report.dropped {
                rows.push((format!("dropped: {why}"), format_count(*n)));
            }
            rows.push(("written to".into(), a.out.display().to_string()));
            ui::say(ui::table("converted", &rows));
        }
        Command::Embed(a) => {
            let alias = a
                .alias
                .iter()
                .map(|x| {
                    x.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| {
                            anyhow::anyhow!("--alias {x}: use NEW=KNOWN, e.g. market=shop")
                        })
                })
                .collect::<anyhow::Result<_>>()?;
            let job = Job::Embed {
                model: a.model.clone(),
                options: EmbedOptions {
                    inputs: a.logs.clone(),
                    out: a.out.clone(),
                    services: a.services.clone(),
                    alias,
                    f16: a.f16,
                    npy: a.npy,
                    batch_size: a.batch_size.max(1),
                    item_cache: !a.no_item_cache,
                    skip_bad_rows: a.skip_bad_rows,
                    fixed_shapes: false,
                },
            };
            dispatch(&a.device, &job)?;
        }
        Command::Eval(a) => {
            let job = Job::Eval(EvalOptions {
                task: a.task.clone(),
                model: a.model.clone(),
                embeddings: a.embeddings.clone(),
                out: a.out.clone(),
                seeds: a.seeds.max(1),
                batch_size: 256,
                fixed_shapes: false,
            });
            dispatch(&a.device, &job)?;
        }
        Command::Bench(a) => {
            let job = Job::Bench {
                preset: preset(&a.preset)?,
                steps: a.steps.max(1),
                warmup: a.warmup,
                json: a.json,
            };
            dispatch(&a.device, &job)?;
        }
        Command::Prepare(a) => {
            let options = a.options()?;
            ui::detail(format!("prepare options: {options:?}"));
            let report = prepare(&a.logs, &a.out, &options)?;
            ui::say(report.summary());
            ui::say(format!("  written to {}", a.out.display()));
        }
    }
    Ok(())
}

/// glibc hands every freed block over 128 KiB (and, dynamically, more) back to the kernel, so each
/// CPU training step page-faults its activations in again: ~20 % of a `clue bench --preset tiny`
/// step on flex. Keep up to 1 GiB of freed memory in the heap instead. `GLIBC_TUNABLES` with
/// malloc settings takes precedence.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc")) {
        return;
    }
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    ui::set_verbosity(if cli.quiet {
        0
    } else if cli.verbose {
        2
    } else {
        1
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
