//! `clue bench`: training and inference throughput on the same workload as the PyTorch
//! reference (`shared/bench/torch_clue_ref.py`). Prints figures with the machine they were
//! measured on (CPU model, instruction sets, threads, denormal mode, a measured matrix-product
//! peak and the share of it a step reaches); asserts nothing.

pub mod denormals;
pub mod machine;

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{Interrupter, ItemLazy, TrainStep};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backend::BackendKind;
use crate::cpu::{CpuInfo, peak_rss_mib};
use crate::data::batcher::{Item, UserBatch, UserBatcher, UserSample};
use crate::error::{ClueError, Result};
use crate::gpu::kernel_work;
use crate::model::init::Init;
use crate::model::{ClueModel, ModelConfig};
use crate::train::config::TrainConfig;
use crate::train::parallel::setup_line;
use crate::train::step::{StepGuard, StepSettings, Trainee};
use burn::data::dataloader::batcher::Batcher;
use denormals::{DenormalCensus, census};
use machine::{MatmulPeak, matmul_peak};

/// A benchmark workload: model shape and batch (the reference's presets).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Preset {
    pub name: &'static str,
    pub vocab: usize,
    pub dim: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    /// Tokens per item (L).
    pub tokens: usize,
    /// Items per user and service (S).
    pub items: usize,
    pub batch: usize,
}

pub const PRESETS: [Preset; 3] = [
    Preset {
        name: "tiny",
        vocab: 4096,
        dim: 64,
        ffn: 256,
        layers: 2,
        heads: 4,
        tokens: 16,
        items: 32,
        batch: 16,
    },
    Preset {
        name: "small",
        vocab: 16384,
        dim: 256,
        ffn: 1024,
        layers: 4,
        heads: 4,
        tokens: 32,
        items: 64,
        batch: 32,
    },
    Preset {
        name: "base",
        vocab: 50257,
        dim: 720,
        ffn: 2880,
        layers: 8,
        heads: 6,
        tokens: 32,
        items: 64,
        batch: 8,
    },
];

pub fn preset(name: &str) -> Result<Preset> {
    PRESETS
        .iter()
        .find(|p| p.name == name)
        .copied()
        .ok_or_else(|| {
            ClueError::config(
                format!("unknown preset `{name}`"),
                "use --preset tiny, small or base",
            )
        })
}

impl Preset {
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            vocab_size: self.vocab,
            d_model: self.dim,
            d_ff: self.ffn,
            heads: self.heads,
            item_layers: self.layers,
            service_layers: self.layers,
            dropout: 0.1,
            max_items: self.items,
            max_item_tokens: self.tokens,
            output_dim: 0,
            ..ModelConfig::default()
        }
    }
}

/// The reference's random batch: each user has S/2..S items per service, each item 3..L random
/// token ids (1..V); every item is distinct.
pub fn random_batch(rng: &mut ChaCha8Rng, p: &Preset, next_id: &mut u32) -> Vec<UserSample> {
    (0..p.batch)
        .map(|user| UserSample {
            user: user as u32,
            services: (0..2)
                .map(|_| {
                    let n = rng.random_range(p.items / 2..=p.items);
                    (0..n)
                        .map(|_| {
                            *next_id += 1;
                            let len = rng.random_range(3..=p.tokens);
                            Item {
                                id: *next_id,
                                tokens: (0..len)
                                    .map(|_| rng.random_range(1..p.vocab as u32))
                                    .collect(),
                            }
                        })
                        .collect()
                })
                .collect(),
        })
        .collect()
}

/// Analytic FLOPs of one step, counted as the reference counts them.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Flops {
    pub train: f64,
    pub infer: f64,
    pub nonpad_tokens: usize,
}

pub fn flops<B: Backend>(model: &ClueModel<B>, p: &Preset, samples: &[UserSample]) -> Flops {
    let n_items: usize = samples
        .iter()
        .flat_map(|s| s.services.iter().map(Vec::len))
        .sum();
    let nonpad_tokens = samples
        .iter()
        .flat_map(|s| s.services.iter().flatten().map(|i| i.tokens.len()))
        .sum();
    let seqs = 2 * p.batch;
    let (t_item, t_svc) = (n_items * p.tokens, seqs * p.items);
    let enc = &model.encoder;
    let p_item = enc.item.num_params() as f64;
    let p_svc = (enc.service.encoder.num_params() + enc.service.norm.num_params()) as f64;
    let p_head = model.head.num_params() as f64;
    let dense = 6.0 * (p_item * t_item as f64 + p_svc * t_svc as f64 + p_head * seqs as f64);
    let attn = 12.0
        * p.dim as f64
        * p.layers as f64
        * (n_items * p.tokens * p.tokens + seqs * p.items * p.items) as f64;
    Flops {
        train: dense + attn,
        infer: (dense - 6.0 * p_head * seqs as f64 + attn) / 3.0,
        nonpad_tokens,
    }
}

/// How long to run, and what else to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Timed steps (and inference calls); the median is reported.
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// One more step, untimed, that records where denormal floats occur.
    pub denormal_census: bool,
    /// GradCache chunk of the training steps (users; 0 = the whole batch at once).
    pub grad_cache: usize,
    /// Data-parallel worker threads of the training steps (≤ 1: none).
    pub workers: usize,
}

/// Figures of one benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub preset: Preset,
    pub backend: String,
    pub device: String,
    /// The CPU: model, instruction sets, threads, denormal mode.
    pub cpu: CpuInfo,
    /// Measured fp32 matrix-product peak of this machine (CPU backends only).
    pub matmul_peak: Option<MatmulPeak>,
    /// Training GFLOP/s over that peak.
    pub train_peak_fraction: Option<f64>,
    pub denormals: Option<DenormalCensus>,
    pub params_total: usize,
    pub params_non_embedding: usize,
    pub steps: usize,
    pub warmup: usize,
    /// GradCache chunk (0 = off).
    pub grad_cache_chunk: usize,
    /// Data-parallel worker threads (1 = none).
    pub workers: usize,
    pub train_s_per_step: f64,
    pub train_s_all: Vec<f64>,
    pub train_users_per_s: f64,
    pub train_tokens_per_s: f64,
    pub flops_train_per_step: f64,
    pub train_gflops_per_s: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    pub infer_s_per_call: f64,
    /// User-service embeddings per second (two per user), as the reference counts them.
    pub infer_embeddings_per_s: f64,
    pub infer_gflops_per_s: f64,
    /// Peak resident memory when the training steps end (setup included, inference not).
    pub train_peak_rss_mib: f64,
    pub peak_rss_mib: f64,
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Time `warmup + steps` training steps and as many inference calls of `preset` on `device`.
pub fn bench<B: AutodiffBackend>(
    device: B::Device,
    p: &Preset,
    o: BenchOptions,
    backend: &str,
) -> BenchReport {
    let BenchOptions { steps, warmup, .. } = o;
    let cpu = BackendKind::of::<B>() != BackendKind::Accelerator;
    let peak = cpu.then(matmul_peak);
    let batcher = UserBatcher::of::<B>(p.items, p.tokens);
    // The optimiser and clipping of a training run (its default settings).
    let train = TrainConfig::default();
    B::seed(&device, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut next_id = 0;
    let batches: Vec<Vec<UserSample>> = (0..warmup + steps)
        .map(|_| random_batch(&mut rng, p, &mut next_id))
        .collect();
    let config = p.model_config();
    let mut trainee = Trainee {
        model: ClueModel::<B>::new(&config, &mut Init::new(0, &device)),
        settings: StepSettings {
            clip_norm: train.grad_clip_norm,
            seed: 0,
            guard: Some(StepGuard::new(Interrupter::new(), 0)),
            grad_cache_chunk: o.grad_cache,
            workers: match o.workers {
                0 | 1 => Vec::new(),
                w => vec![device.to_id(); w],
            },
            ..Default::default()
        },
    };
    let counts = trainee.model.param_counts();
    let fl: Vec<Flops> = batches[warmup..]
        .iter()
        .map(|b| flops(&trainee.model, p, b))
        .collect();
    let mean = |f: &dyn Fn(&Flops) -> f64| fl.iter().map(f).sum::<f64>() / fl.len().max(1) as f64;
    let (flops_train, flops_infer, tokens) = (
        mean(&|f| f.train),
        mean(&|f| f.infer),
        mean(&|f| f.nonpad_tokens as f64),
    );
    let mut optim = train.optimizer().init::<B, Trainee<B>>();

    let mut times = Vec::new();
    let mut losses = Vec::new();
    for (i, samples) in batches.iter().enumerate() {
        let t0 = Instant::now();
        let before = (crate::ui::verbosity() >= 2).then(kernel_work).flatten(); // -v only
        let batch: UserBatch<B> = batcher.batch(samples.clone(), &device);
        let out = TrainStep::step(&trainee, batch);
        trainee = trainee.optimize(&mut optim, train.lr, out.grads);
        let stats = out.item.sync();
        let took = t0.elapsed().as_secs_f64();
        // On a GPU: what the step compiled (CubeCL logs a moment later; a close count).
        let work = before
            .zip(kernel_work())
            .map(|(b, a)| format!(", {}", a.since(b)));
        crate::ui::detail(format!(
            "train step {}/{}: {took:.3} s, loss {:.4}{}",
            i + 1,
            batches.len(),
            stats.loss,
            work.unwrap_or_default()
        ));
        if i >= warmup {
            times.push(took);
        }
        losses.push(stats.loss);
    }
    let train_peak_rss_mib = peak_rss_mib();
    // The census reads the CPU's flags: nothing to read on an accelerator.
    let denormals = (o.denormal_census && cpu).then(|| {
        let last = batches.last().expect("at least one step");
        let (t, c) = census(
            trainee.clone(),
            &mut optim,
            train.lr,
            batcher.batch(last.clone(), &device),
            batcher.batch(last.clone(), &device),
        );
        trainee = t;
        c
    });
    let model = trainee.model.valid();
    let mut infer = Vec::new();
    for (i, samples) in batches[warmup.saturating_sub(1)..].iter().enumerate() {
        let t0 = Instant::now();
        let batch: UserBatch<B::InnerBackend> = batcher.batch(samples.clone(), &device);
        BackendKind::of::<B>().drive(|| model.encoder.forward(&batch).into_data());
        let took = t0.elapsed().as_secs_f64();
        crate::ui::detail(format!("inference call {}: {took:.3} s", i + 1));
        if i > 0 || warmup == 0 {
            infer.push(took);
        }
    }
    crate::gpu::show_kinds();
    let (train_s, infer_s) = (median(&times), median(&infer));
    let train_gflops_per_s = flops_train / train_s / 1e9;
    BenchReport {
        preset: *p,
        backend: backend.to_string(),
        device: B::name(&device),
        cpu: CpuInfo::detect(),
        matmul_peak: peak,
        train_peak_fraction: peak.map(|m| train_gflops_per_s / m.gflops_per_s),
        denormals,
        params_total: counts.total,
        params_non_embedding: counts.non_embedding,
        steps,
        warmup,
        grad_cache_chunk: o.grad_cache,
        workers: o.workers.max(1),
        train_s_per_step: train_s,
        train_s_all: times,
        train_users_per_s: p.batch as f64 / train_s,
        train_tokens_per_s: tokens / train_s,
        flops_train_per_step: flops_train,
        train_gflops_per_s,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        infer_s_per_call: infer_s,
        infer_embeddings_per_s: 2.0 * p.batch as f64 / infer_s,
        infer_gflops_per_s: flops_infer / infer_s / 1e9,
        train_peak_rss_mib,
        peak_rss_mib: peak_rss_mib(),
    }
}

impl BenchReport {
    pub fn table(&self) -> String {
        let p = &self.preset;
        let mut rows = vec![("CPU".into(), self.cpu.line())];
        if let Some(m) = &self.matmul_peak {
            rows.push((
                "fp32 matmul peak".into(),
                format!(
                    "{:.1} GFLOP/s (gemm crate, {n}×{n}×{n}, best of {})",
                    m.gflops_per_s,
                    m.runs,
                    n = m.side
                ),
            ));
        }
        rows.extend([
            (
                "model".into(),
                format!(
                    "V {} D {} FFN {} layers {}+{} heads {} L {} S {} batch {}",
                    p.vocab, p.dim, p.ffn, p.layers, p.layers, p.heads, p.tokens, p.items, p.batch
                ),
            ),
            (
                "parameters".into(),
                format!(
                    "{} ({} non-embedding)",
                    self.params_total, self.params_non_embedding
                ),
            ),
            (
                "train".into(),
                format!(
                    "{:.4} s/step (median of {}, after {} warm-up){}",
                    self.train_s_per_step,
                    self.steps,
                    self.warmup,
                    setup_line(self.workers, None, self.grad_cache_chunk)
                ),
            ),
            (
                "train users/s".into(),
                format!("{:.1}", self.train_users_per_s),
            ),
            (
                "train tokens/s".into(),
                format!("{:.0} (non-padding)", self.train_tokens_per_s),
            ),
            (
                "train FLOPs/step".into(),
                format!(
                    "{:.3e}{} → {:.1} GFLOP/s{}",
                    self.flops_train_per_step,
                    if self.grad_cache_chunk > 0 {
                        " (the plain step's; GradCache adds a forward pass)"
                    } else {
                        ""
                    },
                    self.train_gflops_per_s,
                    self.train_peak_fraction
                        .map(|f| format!(" ({:.0} % of the matmul peak)", 100.0 * f))
                        .unwrap_or_default()
                ),
            ),
            (
                "loss".into(),
                format!("{:.4} → {:.4}", self.loss_first, self.loss_last),
            ),
            (
                "inference".into(),
                format!(
                    "{:.4} s/call, {:.1} embeddings/s, {:.1} GFLOP/s",
                    self.infer_s_per_call, self.infer_embeddings_per_s, self.infer_gflops_per_s
                ),
            ),
            (
                "peak RSS".into(),
                format!(
                    "{:.0} MiB training, {:.0} MiB in all",
                    self.train_peak_rss_mib, self.peak_rss_mib
                ),
            ),
        ]);
        if let Some(d) = &self.denormals {
            rows.extend(d.rows());
        }
        crate::ui::table(
            &format!("bench {} on {} ({})", p.name, self.backend, self.device),
            &rows,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_batches_follow_the_reference_workload() {
        let p = preset("tiny").unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut id = 0;
        let b = random_batch(&mut rng, &p, &mut id);
        assert_eq!(b.len(), 16);
        for u in &b {
            assert_eq!(u.services.len(), 2);
            for s in &u.services {
                assert!((16..=32).contains(&s.len()));
                for i in s {
                    assert!((3..=16).contains(&i.tokens.len()));
                    assert!(i.tokens.iter().all(|&t| t >= 1 && (t as usize) < p.vocab));
                }
            }
        }
        assert!(preset("huge").is_err());
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
