//! The `clue` command line: argument parsing ([`args`]), one function per command, and the one
//! place a backend is chosen ([`dispatch`]).

mod args;

use std::path::PathBuf;
use std::process::ExitCode;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, ValueEnum};

use args::*;
use clue::bench::{BenchOptions, bench, preset};
use clue::data::prepare::{PrepareOptions, format_count, prepare};
use clue::data::store::Split;
use clue::data::synth::{SUBTOPICS, SynthOptions, WorldKind, synth};
use clue::embed::{EmbedOptions, USER_BATCH, embed};
use clue::eval::{EvalOptions, eval};
use clue::scaling::report::scaling;
use clue::scaling::sweep::{SweepOptions, sweep};
use clue::train::config::RunConfig;
use clue::train::coordinator::serve_coordinator;
use clue::train::fit::{FitOptions, fit};
use clue::train::parallel::Devices;
use clue::train::score::{ScoreReport, score_bundle};
use clue::ui;

/// The embedded tiny config: the default run needs no file.
const TINY: &str = include_str!("../../../config/tiny.toml");
const DEFAULT_DATA: &str = "data/default";
const DEFAULT_USERS: usize = 2000;

/// What to run once the backend is chosen.
enum Job {
    Fit(Box<FitOptions>),
    Embed {
        model: PathBuf,
        options: EmbedOptions,
    },
    Eval(EvalOptions),
    Sweep(SweepOptions),
    Bench {
        preset: clue::bench::Preset,
        options: BenchOptions,
        json: bool,
    },
    Score {
        model: PathBuf,
        data: PathBuf,
        split: Split,
        json: bool,
        verify: bool,
    },
}

/// Run `job` on `device`, backend `B` (whose kind, `clue::backend::BackendKind::of::<B>()`,
/// picks fixed shapes and the fast paths).
fn run_job<B: AutodiffBackend>(device: B::Device, job: &Job) -> anyhow::Result<()> {
    match job {
        Job::Embed { model, options } => {
            let report = embed::<B::InnerBackend>(model, &device, options)?;
            ui::say(report.summary());
        }
        Job::Eval(options) => {
            let results = eval::<B>(&device, options)?;
            ui::say(results.markdown());
            ui::say(format!("  results written to {}", options.out.display()));
        }
        Job::Sweep(options) => {
            sweep::<B>(device, options)?;
        }
        Job::Fit(options) => {
            let summary = fit::<B>(device, options)?;
            ui::say(summary.table());
            ui::say(format!("  run written to {}", options.out.display()));
        }
        Job::Score {
            model,
            data,
            split,
            json,
            verify,
        } => {
            let report = score_bundle::<B::InnerBackend>(model, data, *split, *verify, &device)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                ui::say(score_table(&report));
            }
        }
        Job::Bench {
            preset,
            options,
            json,
        } => {
            let name = B::name(&device);
            let report = bench::<B>(device, preset, *options, &name);
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                ui::say(report.table());
            }
        }
    }
    Ok(())
}

fn score_table(report: &ScoreReport) -> String {
    let s = &report.score;
    let pct = |x: f64| format!("{:.1} %", 100.0 * x);
    ui::table(
        &format!("score on {:?} users ({})", report.split, report.backend),
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
    )
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
        let msg = clue::error::panic_message(e.as_ref());
        anyhow::anyhow!("no usable {what} device: {msg}\n  hint: check the driver (nvidia-smi / vulkaninfo), or use --backend ndarray")
    })
}

fn dispatch(d: &DeviceArgs, job: &Job) -> anyhow::Result<()> {
    if d.precision() == Precision::Bf16 && d.backend() != BackendName::Cuda {
        anyhow::bail!("--precision bf16 needs --backend cuda\n  hint: CPU backends train in f32");
    }
    match d.backend() {
        #[cfg(feature = "ndarray")]
        BackendName::Ndarray => {
            run_job::<Autodiff<burn::backend::NdArray>>(Default::default(), job)
        }
        BackendName::Flex => run_job::<Autodiff<burn::backend::Flex>>(Default::default(), job),
        #[cfg(feature = "wgpu")]
        BackendName::Wgpu => {
            let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
            let _logs = clue::gpu::configure();
            probe::<burn::backend::Wgpu>(&device, "wgpu")?;
            run_job::<Autodiff<burn::backend::Wgpu>>(device, job)
        }
        #[cfg(feature = "cuda")]
        BackendName::Cuda => {
            let device = burn::backend::cuda::CudaDevice::new(d.device);
            let _logs = clue::gpu::configure();
            probe::<burn::backend::Cuda>(&device, "CUDA")?;
            if let Job::Fit(f) = job
                && let Some(Devices::Indices(ix)) = &f.devices
            {
                for &i in ix {
                    let other = burn::backend::cuda::CudaDevice::new(i as usize);
                    probe::<burn::backend::Cuda>(&other, &format!("CUDA device {i} (--devices)"))?;
                }
            }
            match d.precision() {
                Precision::F32 => run_job::<Autodiff<burn::backend::Cuda>>(device, job),
                Precision::Bf16 => {
                    run_job::<Autodiff<burn::backend::Cuda<burn::tensor::bf16>>>(device, job)
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

/// A command-line value's name (`flex`, `bf16`).
fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// Options of `clue fit`, making the embedded default data when no --data is given.
fn fit_options(a: &FitArgs) -> anyhow::Result<FitOptions> {
    let backend = value_name(a.device.backend());
    let precision = value_name(a.device.precision());
    if let Some(run) = &a.resume {
        return Ok(FitOptions {
            config: RunConfig::default(),
            data: PathBuf::new(),
            out: run.clone(),
            tui: !a.no_tui,
            resume: true,
            backend,
            precision,
            verify: !a.no_verify,
            devices: None,
            cluster: None,
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
        precision,
        verify: !a.no_verify,
        devices: None,
        cluster: None,
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
    synth(&root.join("synth"), &SynthOptions::new(DEFAULT_USERS, 0))?;
    let options = PrepareOptions {
        max_items: config.model.max_items,
        max_item_tokens: config.model.max_item_tokens,
        ..PrepareOptions::default()
    };
    let report = prepare(&[root.join("synth").join("logs")], &prepared, &options)?;
    ui::say(report.summary());
    Ok(prepared)
}

fn synth_cmd(a: SynthArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let options = SynthOptions {
        world: a.world,
        topics: a.topics,
        ..SynthOptions::new(a.users, a.seed)
    };
    let report = synth(&a.out, &options)?;
    let topics = match a.world {
        WorldKind::Static => report.topics.to_string(),
        WorldKind::Dynamic => format!("{} × {SUBTOPICS} sub-topics", report.topics),
    };
    let mut rows = vec![
        ("users".to_string(), format_count(report.users as u64)),
        ("world".to_string(), a.world.to_string()),
        ("latent topics".to_string(), topics),
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
    Ok(())
}

fn prepare_cmd(a: PrepareArgs) -> anyhow::Result<()> {
    let options = a.options()?;
    ui::detail(format!("prepare options: {options:?}"));
    let report = prepare(&a.logs, &a.out, &options)?;
    ui::say(report.summary());
    ui::say(format!("  written to {}", a.out.display()));
    Ok(())
}

fn convert_cmd(a: ConvertArgs) -> anyhow::Result<()> {
    let report = match a.format {
        Format::Lastfm => clue::data::convert::lastfm(&a.input, &a.out, &a.cutoff)?,
        Format::Movielens => clue::data::convert::movielens(&a.input, &a.out)?,
        Format::AmazonUnisrec => clue::data::convert::amazon_unisrec(&a.input, &a.out, &a.name)?,
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
    Ok(())
}

fn fit_cmd(mut a: FitArgs) -> anyhow::Result<()> {
    if let Some(run) = &a.resume {
        // Resume on the backend and in the precision the run started with, unless told.
        let info: clue::train::fit::RunInfo =
            clue::bundle::read_json(&run.join(clue::train::fit::RUN_INFO))?;
        if a.device.backend.is_none() {
            a.device.backend = info
                .backend
                .and_then(|name| BackendName::from_str(&name, true).ok());
        }
        if a.device.precision.is_none() {
            a.device.precision = info
                .precision
                .and_then(|name| Precision::from_str(&name, true).ok());
        }
    }
    let devices = a
        .devices
        .as_deref()
        .map(|spec| parse_devices(spec, a.device.backend()))
        .transpose()?;
    if let Some(Devices::Indices(ix)) = &devices {
        if ix.len() == 1 && a.nodes.is_none() {
            ui::say(format!(
                "--devices {}: one GPU, so no data-parallel training (list the GPUs, e.g. 0,1)",
                ix[0]
            ));
        }
        a.device.device = ix[0] as usize;
    }
    let cluster = a.cluster()?;
    let mut options = fit_options(&a)?;
    (options.devices, options.cluster) = (devices, cluster);
    if !options.resume {
        ui::detail(format!("resolved config:\n{}", options.config.to_toml()));
    }
    dispatch(&a.device, &Job::Fit(Box::new(options)))
}

/// `--devices`: GPU indices on cuda, a number of worker threads on a CPU backend.
fn parse_devices(spec: &str, backend: BackendName) -> anyhow::Result<Devices> {
    anyhow::ensure!(
        backend != BackendName::Wgpu,
        "--devices {spec}: data-parallel training runs on cuda or on a CPU backend (flex, ndarray)"
    );
    Ok(Devices::parse(spec, backend == BackendName::Cuda)?)
}

fn score_cmd(a: ScoreArgs) -> anyhow::Result<()> {
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
        verify: !a.no_verify,
    };
    dispatch(&a.device, &job)
}

fn embed_cmd(a: EmbedArgs) -> anyhow::Result<()> {
    let alias = a
        .alias
        .iter()
        .map(|x| {
            x.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--alias {x}: use NEW=KNOWN, e.g. market=shop"))
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
        },
    };
    dispatch(&a.device, &job)
}

fn eval_cmd(a: EvalArgs) -> anyhow::Result<()> {
    let compare = a
        .compare
        .iter()
        .map(|c| match c.split_once('=') {
            Some((name, dir)) => Ok((name.trim().to_string(), PathBuf::from(dir))),
            None => {
                anyhow::bail!("--compare `{c}` is not NAME=DIR: e.g. --compare simclr=runs/simclr")
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let job = Job::Eval(EvalOptions {
        task: a.task.clone(),
        model: a.model.clone(),
        embeddings: a.embeddings.clone(),
        out: a.out.clone(),
        seeds: a.seeds.max(1),
        batch_size: USER_BATCH,
        models: a.models.clone(),
        compare,
    });
    dispatch(&a.device, &job)
}

fn bench_cmd(a: BenchArgs) -> anyhow::Result<()> {
    if a.denormal_census && matches!(a.device.backend(), BackendName::Wgpu | BackendName::Cuda) {
        anyhow::bail!(
            "--denormal-census reads the CPU's floating-point flags: use it with --backend flex or ndarray"
        );
    }
    let mut preset = preset(&a.preset)?;
    if let Some(b) = a.batch {
        anyhow::ensure!(
            b >= 2,
            "--batch {b}: in-batch negatives need at least 2 users"
        );
        preset.batch = b;
    }
    anyhow::ensure!(
        a.grad_cache < preset.batch,
        "--grad-cache {} is not smaller than the batch ({}): use a smaller chunk, or 0 for no GradCache",
        a.grad_cache,
        preset.batch
    );
    anyhow::ensure!(
        a.workers >= 1 && preset.batch.is_multiple_of(a.workers),
        "--workers {}: the batch ({}) must divide into the workers",
        a.workers,
        preset.batch
    );
    let job = Job::Bench {
        preset,
        options: BenchOptions {
            steps: a.steps.max(1),
            warmup: a.warmup,
            denormal_census: a.denormal_census,
            grad_cache: a.grad_cache,
            workers: a.workers,
        },
        json: a.json,
    };
    dispatch(&a.device, &job)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Synth(a) => synth_cmd(a),
        Command::Prepare(a) => prepare_cmd(a),
        Command::Convert(a) => convert_cmd(a),
        Command::Fit(a) => fit_cmd(a),
        Command::Score(a) => score_cmd(a),
        Command::Embed(a) => embed_cmd(a),
        Command::Eval(a) => eval_cmd(a),
        Command::Bench(a) => bench_cmd(a),
        Command::Coordinator(a) => Ok(serve_coordinator(a.port, a.until_stdin_closes)?),
        Command::Sweep(a) => {
            let options = SweepOptions {
                grid: a.grid,
                data: a.data,
                out: a.out,
                backend: value_name(a.device.backend()),
                precision: value_name(a.device.precision()),
                verify: !a.no_verify,
                tasks: a.tasks,
            };
            dispatch(&a.device, &Job::Sweep(options))
        }
        Command::Similarity(a) => {
            if !a.results.is_empty() && a.results.len() != a.tasks.len() {
                anyhow::bail!(
                    "{} --results for {} --task: give one results.json per task, in the same order",
                    a.results.len(),
                    a.tasks.len()
                );
            }
            let rows = clue::scaling::similarity::similarity(&a.pretrain, &a.tasks, &a.results)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                ui::say(clue::scaling::similarity::table(&rows));
            }
            Ok(())
        }
        Command::Scaling(a) => {
            let report = scaling(&a.sweep)?;
            ui::say(report.headline());
            for note in &report.notes {
                ui::say(format!("  note: {note}"));
            }
            ui::say(format!(
                "  written to {} (scaling.md, scaling.json, {})",
                a.sweep.display(),
                report.charts.join(", ")
            ));
            Ok(())
        }
    }
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

/// Rust ignores SIGPIPE, so `println!` to a reader that has gone (`clue ... | head`, `grep -q`)
/// panics. Restore the default: the process ends quietly, as any Unix tool.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn die_quietly_on_closed_pipe() {
    // SAFETY: resetting a signal's disposition to its default, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn die_quietly_on_closed_pipe() {}

fn main() -> ExitCode {
    // SAFETY: the first statement: no other thread exists yet.
    #[cfg(feature = "cuda")]
    unsafe {
        clue::gpu::point_driver_cache()
    };
    keep_freed_memory();
    die_quietly_on_closed_pipe();
    let cli = Cli::parse();
    // Before any compute thread exists: loaders and Burn's threads inherit the bits.
    let keep = cli.keep_denormals || std::env::var("CLUE_KEEP_DENORMALS").is_ok_and(|v| v == "1");
    clue::cpu::set_flush_denormals(!keep);
    // Every command drives one model at a time: its steps can run on rayon's pool (off with
    // CLUE_DRIVE_FROM_POOL=0, to compare).
    clue::cpu::set_drive_from_pool(
        std::env::var("CLUE_DRIVE_FROM_POOL").map_or(true, |v| v != "0"),
    );
    clue::data::log::set_max_row_bytes(cli.max_row_bytes);
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
