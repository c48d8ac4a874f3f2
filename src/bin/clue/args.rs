//! The command line's arguments (clap derive): one struct per command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use clue::data::prepare::{Objective, PrepareOptions};
use clue::data::synth::WorldKind;
use clue::error::ClueError;
use clue::train::cluster::Cluster;

#[derive(Parser)]
#[command(
    name = "clue",
    version,
    about = "CLUE: learn general-purpose user embeddings from multi-service behaviour logs",
    after_help = "Examples:\n  clue synth --users 2000 --out data/synth\n  clue prepare data/synth/logs --out data/prepared\n\nEach command's --help shows more."
)]
pub struct Cli {
    /// Print only errors.
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more detail.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// Keep denormal floats (x86 CPUs). By default every CPU compute thread flushes them to
    /// zero (FTZ + DAZ, as torch.set_flush_denormal(True)): values below 1.2e-38 become 0,
    /// which spares Intel cores a slow path (2.4x on training). Also: CLUE_KEEP_DENORMALS=1.
    #[arg(long, global = true)]
    pub keep_denormals: bool,
    /// Longest CSV row (bytes, line ending included) read from logs, tables and task files. A longer row stops the
    /// read with its line: usually a quoted text whose closing quote is missing.
    #[arg(long, global = true, value_name = "BYTES", default_value_t = clue::data::log::DEFAULT_MAX_ROW_BYTES)]
    pub max_row_bytes: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write seeded synthetic multi-service logs and downstream task files.
    #[command(
        after_help = "Examples:\n  clue synth --users 2000 --seed 7 --out data/synth\n  clue synth --users 20000 --world dynamic --topics 64 --out data/dynamic\n\nWrites DIR/logs/{search,shop}.csv, DIR/tasks/{news,market}/{interactions,items}.csv and DIR/truth/users.csv\n(dynamic: also each user's end mixture and groups, and DIR/truth/topics.csv). datasets/README.md tells the story."
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
        after_help = "Examples:\n  clue fit --backend ndarray                     # embedded default: synth + prepare + tiny config\n  clue fit --backend flex --config config/small.toml --data data/prepared --out runs/small\n  clue fit --backend cuda --precision bf16 --config config/base.toml --data data/p --out runs/base\n  clue fit --backend ndarray --set train.epochs=2 --set train.lr=1e-3\n  clue fit --backend cuda --devices 0,1,2,3 --config config/base.toml --data data/p   # data-parallel\n  clue fit --backend cuda --devices 0,1 --nodes 2 --node-rank 0 --coordinator 10.0.0.1:29500 --node-address 10.0.0.1:29501 ...   # multi-node: the same on each machine, with its rank\n  clue fit --backend flex --set train.grad_cache_chunk=8   # GradCache: memory of 8 users, negatives of the batch\n  clue fit --resume runs/small                   # continue a killed run from its last checkpoint\n\nOn a terminal, Burn's dashboard shows progress (q stops the run: it exits non-zero and --resume continues it); otherwise plain log lines."
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
        after_help = "Examples:\n  clue eval --task data/default/synth/tasks/news.toml --model runs/tiny --out eval/news\n  clue eval --task data/default/synth/tasks/market.toml --model runs/tiny --out eval/market --seeds 3\n  clue eval --task t.toml --model runs/tiny --embeddings emb/users.safetensors --out eval/t\n  clue eval --task t.toml --model runs/tiny --models lightgcn,clue,toppop --out eval/quick\n  clue eval --task t.toml --model runs/tiny --compare simclr=runs/simclr --out eval/vs-simclr\n\nWrites DIR/results.json, DIR/results.md and DIR/negatives.csv. The task file (TOML) names\ninteractions (user_id,item_id,timestamp), items (item_id,text), [features] (source = \"logs\" with\nlogs/services, or source = \"history\" with service/targets/prefixes), [split], [negatives], [probe]\n(training of every learned model), models, and [model.bst|lightgcn|deepfm|hybrid] tables.\nModels: task-specific bst, lightgcn, deepfm (from scratch on the task); task-agnostic clue,\ntext-mean, untrained, noise (user features into the probe); hybrid (CLUE features in the user\ntower of the better of bst and lightgcn); baselines toppop, random.\n`clue synth` writes two task files under <out>/tasks/."
    )]
    Eval(EvalArgs),
    /// Measure training and inference throughput on the PyTorch reference's workload.
    #[command(
        after_help = "Examples:\n  clue bench --preset tiny --backend flex\n  clue bench --preset tiny --backend flex --keep-denormals --denormal-census\n  clue bench --preset small --backend cuda --precision bf16 --json\n  clue bench --preset small --batch 256 --grad-cache 32 --steps 1 --warmup 0\n\nCompare with: python3 shared/bench/torch_clue_ref.py --vocab 4096 --dim 64 --layers 2 --heads 4 --L 16 --S 32 --batch 16"
    )]
    Bench(BenchArgs),
    /// Run the coordinator of a multi-node training run (rank 0 of `clue fit --nodes` starts
    /// one itself; run this to keep it apart).
    #[command(
        after_help = "Examples:\n  clue coordinator --port 29500\n  clue fit --nodes 2 --node-rank 0 --coordinator 10.0.0.1:29500 --node-address 10.0.0.1:29501 --coordinator-running ...\n\nRuns until Ctrl+C."
    )]
    Coordinator(CoordinatorArgs),
    /// Train every run of a scaling-study grid, each measured at the same held-out batches.
    #[command(
        after_help = "Examples:\n  clue sweep --grid config/sweeps/smoke.toml --data data/default/prepared --out sweeps/smoke --backend flex\n  clue sweep --grid config/sweeps/cpu.toml --data data/dynamic/prepared --out sweeps/cpu --backend flex\n  clue sweep --grid config/sweeps/gpu.toml --data data/p --out sweeps/gpu --backend cuda\n  clue sweep --grid config/sweeps/cpu.toml --data data/dynamic/prepared --out sweeps/cpu --task data/dynamic/tasks/news.toml\n\nEach run is an ordinary run directory under OUT/runs/ (config, checkpoints, summary, model bundle) plus\npoint.json: parameters, PF-days, learning curve, held-out test loss and (with --task) the CLUE probe's\nMRR and HR@10 on each task (results under runs/NAME/eval/TASK/). The same command again skips\nfinished runs and resumes the one a kill interrupted. Then: clue scaling --sweep OUT."
    )]
    Sweep(SweepArgs),
    /// Fit the scaling law of a sweep and draw the paper's figures (scaling.json, scaling.md, PNG/SVG).
    #[command(
        after_help = "Examples:\n  clue scaling --sweep sweeps/cpu\n\nFits L(C) = L∞ + (C₀/C)^α (and the pure power law) to the compute frontier of the finished runs,\nchecks it by predicting the top half-decade from the runs below, and writes loss-vs-compute,\nloss-vs-size and (with a data-size or shuffle axis) loss-vs-steps charts into the sweep directory.\nFailed, diverged and unfinished runs are reported and left out."
    )]
    Scaling(ScalingArgs),
    /// Kendall's τ between the token distributions of pretraining data and downstream tasks.
    #[command(
        after_help = "Examples:\n  clue similarity --pretrain data/dynamic/prepared --task data/dynamic/tasks/news.toml --task data/dynamic/tasks/market.toml\n  clue similarity --pretrain data/p --task t.toml --results eval/t/results.json\n\nPaper Figure 5: τ-b between the token counts of the prepared data (every behaviour's item text) and\nof each task's target items (tokenised with the pretraining tokenizer), over the tokens both use, and the share of\nthe task's token occurrences the pretraining data uses. With --results (one per --task, in order): CLUE's sampled-MRR gain over the best task-specific model."
    )]
    Similarity(SimilarityArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum BackendName {
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
pub enum Precision {
    F32,
    /// bfloat16 weights and activations (CUDA, compute capability 8.0+).
    Bf16,
}

#[derive(Args)]
pub struct DeviceArgs {
    /// Where to train [default: ndarray; with --resume, the run's own backend].
    #[arg(long, value_enum)]
    pub backend: Option<BackendName>,
    /// GPU index for --backend cuda.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Float precision (bf16 only on cuda) [default: f32; with --resume, the run's own].
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
}

impl DeviceArgs {
    pub fn backend(&self) -> BackendName {
        self.backend.unwrap_or(BackendName::Ndarray)
    }

    pub fn precision(&self) -> Precision {
        self.precision.unwrap_or(Precision::F32)
    }
}

#[derive(Args)]
pub struct FitArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Run configuration (TOML with [model] and [train]); default: the embedded tiny config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Prepared dataset; default: synthesise and prepare one under data/default.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory; default: runs/<config name>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a config entry, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "data", "out", "sets"])]
    pub resume: Option<PathBuf>,
    /// Plain log lines instead of the dashboard, even on a terminal.
    #[arg(long)]
    pub no_tui: bool,
    /// Skip the SHA-256 check of the prepared data against its manifest (file sizes are still
    /// checked). Saves a read of the data on large datasets; damage then shows up mid-training.
    #[arg(long)]
    pub no_verify: bool,
    /// Data-parallel training: on cuda the GPU indices (`0,1,2,3`), on a CPU backend a number
    /// of worker threads (`2`). Each worker encodes its share of every batch; the negatives of
    /// the loss are the whole batch's; the batch must divide by the number of workers. On cuda
    /// the first GPU listed replaces --device.
    #[arg(long, value_name = "LIST|N")]
    pub devices: Option<String>,
    /// Multi-node training: the number of machines. Each runs the same command (same config
    /// and data) with its own --node-rank; every batch is split over all their workers.
    #[arg(long, value_name = "N", requires = "node_rank")]
    pub nodes: Option<usize>,
    /// This machine's rank in a multi-node run, 0 to N-1 (rank 0 starts the coordinator).
    #[arg(long, value_name = "R", requires = "nodes")]
    pub node_rank: Option<usize>,
    /// The coordinator, HOST:PORT, the same on every node; rank 0 starts it there.
    #[arg(long, value_name = "HOST:PORT", requires = "nodes")]
    pub coordinator: Option<String>,
    /// Where the other nodes reach this one, HOST:PORT (with a 127.0.0.1 coordinator the
    /// default is 127.0.0.1 at the coordinator's port + 1 + rank).
    #[arg(long, value_name = "HOST:PORT", requires = "nodes")]
    pub node_address: Option<String>,
    /// Seconds to wait for the coordinator and every node before failing.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        requires = "nodes"
    )]
    pub join_timeout: u64,
    /// Seconds a node may wait for the others in one collective call of a step (gathering the
    /// embeddings, summing the gradients) before the run stops: a node that vanishes without
    /// closing its connections (power loss, a cut network, a suspended process) would otherwise
    /// leave the others waiting for ever. The wait includes the other nodes' compute: allow for
    /// the slowest node's step (and, on a GPU, how much longer its warm-up compiles take).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 600,
        requires = "nodes"
    )]
    pub peer_timeout: u64,
    /// A coordinator already runs at --coordinator (`clue coordinator`): rank 0 starts none.
    #[arg(long, requires = "nodes")]
    pub coordinator_running: bool,
}

impl FitArgs {
    /// `--nodes` and company: this machine's place in a multi-node run.
    pub fn cluster(&self) -> Result<Option<Cluster>, ClueError> {
        let Some(nodes) = self.nodes else {
            return Ok(None);
        };
        if self.device.backend() == BackendName::Wgpu {
            return Err(ClueError::config(
                "--nodes on wgpu: multi-node training runs on cuda or on a CPU backend",
                "use --backend cuda, flex or ndarray",
            ));
        }
        let timeouts = [self.join_timeout, self.peer_timeout].map(std::time::Duration::from_secs);
        let (rank, running) = (self.node_rank.unwrap_or(0), self.coordinator_running);
        let (coordinator, node) = (self.coordinator.as_deref(), self.node_address.as_deref());
        Cluster::new(nodes, rank, coordinator, node, timeouts, running).map(Some)
    }
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// The port to listen on (all interfaces).
    #[arg(long, default_value_t = 29500)]
    pub port: u16,
    /// Stop when standard input closes (how rank 0 runs it as its child).
    #[arg(long, hide = true)]
    pub until_stdin_closes: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Run directory (or its model/ bundle).
    #[arg(long)]
    pub model: PathBuf,
    /// Prepared dataset the model was trained on.
    #[arg(long)]
    pub data: PathBuf,
    /// Which users: valid or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Print the figures (and the first users' embeddings) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Skip the SHA-256 check of the prepared data against its manifest (file sizes are still
    /// checked). Saves a read of the data on large datasets.
    #[arg(long)]
    pub no_verify: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    /// Last.fm HetRec 2011 (tag + listen services, tag-artist task).
    Lastfm,
    /// MovieLens ml-latest-small (movie + tag services, next-movie task).
    Movielens,
    /// Amazon 2018 as preprocessed for UniSRec (one service, next-product task).
    AmazonUnisrec,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Dataset format.
    #[arg(value_enum)]
    pub format: Format,
    /// Folder with the dataset's files as published.
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// lastfm: tagging on or after this date is the downstream task's target.
    #[arg(long, default_value = "2010-07-01T00:00:00Z")]
    pub cutoff: String,
    /// amazon-unisrec: the files' prefix (<NAME>.text, <NAME>.test.inter, ...).
    #[arg(long, default_value = "Scientific")]
    pub name: String,
}

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Run directory (or its model/ bundle).
    #[arg(long)]
    pub model: PathBuf,
    /// Behaviour logs: CSV files or directories (user_id,service,timestamp,text).
    #[arg(long, num_args = 1.., required = true)]
    pub logs: Vec<PathBuf>,
    /// Output file: .safetensors or .npy (users.csv and manifest.json go beside it).
    #[arg(long)]
    pub out: PathBuf,
    /// Services to embed, comma-separated, in output order (default: the model's services).
    #[arg(long, value_delimiter = ',')]
    pub services: Option<Vec<String>>,
    /// Read an untrained service's items as a trained one (its prefix token): NEW=KNOWN.
    #[arg(long, value_name = "NEW=KNOWN")]
    pub alias: Vec<String>,
    /// Store half-precision floats.
    #[arg(long)]
    pub f16: bool,
    /// Also write a .npy copy beside a .safetensors output.
    #[arg(long)]
    pub npy: bool,
    /// Users per Service Transformer call.
    #[arg(long, default_value_t = clue::embed::USER_BATCH)]
    pub batch_size: usize,
    /// Encode items again for every batch instead of once (slower; for comparison).
    #[arg(long)]
    pub no_item_cache: bool,
    /// Skip malformed log rows (counted in the manifest) instead of stopping.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Task file (TOML).
    #[arg(long)]
    pub task: PathBuf,
    /// Run directory (or its model/ bundle): item-text features, and user features.
    #[arg(long)]
    pub model: PathBuf,
    /// User features from this `clue embed` output instead of the model.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Train every learned model with this many seeds and report mean ± std.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// Run these models instead of the task file's list (comma-separated), e.g.
    /// `--models bst,lightgcn,clue,toppop`.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Also probe another clue run's user features, reported as NAME (repeatable), e.g.
    /// `--compare simclr=runs/simclr` for a run pretrained with the SimCLR objective.
    #[arg(long, value_name = "NAME=DIR")]
    pub compare: Vec<String>,
}

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The grid (TOML: base, eval_batch_size, curve_points, [set], [axes], [[ladder]]).
    #[arg(long)]
    pub grid: PathBuf,
    /// Prepared dataset every run trains on.
    #[arg(long)]
    pub data: PathBuf,
    /// Sweep directory (runs/, sweep.json; `clue scaling` writes beside them).
    #[arg(long)]
    pub out: PathBuf,
    /// Evaluate every finished run on this downstream task (repeatable): the CLUE probe, one
    /// seed, for paper Figures 3 and 4-right. Added to a finished sweep, it evaluates its runs.
    #[arg(long = "task")]
    pub tasks: Vec<PathBuf>,
    /// Skip the SHA-256 check of the prepared data against its manifest.
    #[arg(long)]
    pub no_verify: bool,
}

#[derive(Args)]
pub struct ScalingArgs {
    /// Sweep directory written by `clue sweep`.
    #[arg(long)]
    pub sweep: PathBuf,
}

#[derive(Args)]
pub struct SimilarityArgs {
    /// Prepared pretraining dataset.
    #[arg(long)]
    pub pretrain: PathBuf,
    /// Task file (repeatable).
    #[arg(long = "task", required = true)]
    pub tasks: Vec<PathBuf>,
    /// `clue eval` results.json of each task, in --task order (optional).
    #[arg(long)]
    pub results: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Workload: tiny, small or base.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Timed steps (median reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// After the timed steps, one more step that records where denormal floats occur (CPU
    /// flags per phase; denormal weights, gradients and AdamW moments). Pair with
    /// --keep-denormals to see them unflushed.
    #[arg(long)]
    pub denormal_census: bool,
    /// Users per batch [default: the preset's].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Train with GradCache in chunks of this many users (compare peak RSS with and without).
    #[arg(long, default_value_t = 0)]
    pub grad_cache: usize,
    /// Train with this many data-parallel worker threads (a CPU backend; compare with 1).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Number of users to generate.
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Random seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generative story: static (fixed topic mixtures; the embedded default) or dynamic
    /// (sub-topics, interest drift, sequential patterns, users new to a service).
    #[arg(long, default_value_t = WorldKind::Static)]
    pub world: WorldKind,
    /// Latent topics (dynamic: parent topics, each with 4 sub-topics) [default: 24 + users/200,
    /// at most 512].
    #[arg(long)]
    pub topics: Option<usize>,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct PrepareArgs {
    /// CSV log files or directories of them.
    #[arg(required = true)]
    pub logs: Vec<PathBuf>,
    /// Output directory (replaced atomically if it holds an earlier prepared dataset).
    #[arg(long)]
    pub out: PathBuf,
    /// TOML file whose `[prepare]` table gives defaults for the options below.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Skip bad rows and report them, instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Use this tokenizer.json instead of training a byte-level BPE.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// BPE vocabulary size (default: from the number of distinct texts, at most 50,257).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Most recent items kept per user and service [default: 512].
    #[arg(long)]
    pub max_items: Option<usize>,
    /// Tokens per item, service prefix included [default: 32].
    #[arg(long)]
    pub max_item_tokens: Option<usize>,
    /// Drop users with fewer distinct behaviours in any service [default: 2].
    #[arg(long)]
    pub min_behaviors: Option<usize>,
    /// Services to keep, comma-separated (default: all in the logs).
    #[arg(long, value_delimiter = ',')]
    pub services: Option<Vec<String>>,
    /// Fraction of users held out for validation [default: 0.1].
    #[arg(long)]
    pub valid_fraction: Option<f64>,
    /// Fraction of users held out for test [default: 0.1].
    #[arg(long)]
    pub test_fraction: Option<f64>,
    /// Seed of the user split [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Objective the data is for: cross-service (two or more services) or simclr (one is
    /// enough) [default: cross-service].
    #[arg(long)]
    pub objective: Option<Objective>,
}

impl PrepareArgs {
    pub fn options(&self) -> Result<PrepareOptions, ClueError> {
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
            seed,
            objective
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
