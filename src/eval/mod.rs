//! `clue eval`: downstream tasks on frozen user embeddings (paper §3.2, §4).
//!
//! A task file (TOML) names the interactions (`user_id,item_id,timestamp`), the items
//! (`item_id,text`), where user features come from, the split, the negatives and the models to
//! compare. Protocol:
//! - users are split by a seeded hash of their id: no user is in two of train/valid/test;
//! - leakage: features come only from behaviour strictly before the user's first target
//!   (`source = "logs"`: later log rows and rows without a timestamp are dropped and counted;
//!   `source = "history"`: the last `targets` interactions are targets, the earlier ones features);
//! - every valid/test positive gets `count` negatives drawn once with a seed (not the positive, not
//!   the user's other positives), saved to `negatives.csv` and used by every model; ranks are also
//!   computed against the full catalogue (the user's other positives left out);
//! - ties count against the model; every trained model is trained on the training users only,
//!   early-stopped on validation MRR, and the test split is scored once, with the model of the
//!   best validation epoch.
//!
//! Models (paper Table 3): task-specific ones learned from scratch on the task ([`bst`],
//! [`lightgcn`], [`deepfm`] over the ids and words of [`ids`]); task-agnostic user features fed to
//! the same [`probe`] (`clue`, `text-mean`, `untrained` — the encoder with random weights — and
//! `noise`); the [`hybrid`] of CLUE features and the better task-specific model; non-learned
//! baselines (`toppop`, `random`). [`models`] runs each under the [`protocol`]; [`groups`] cuts
//! the test users by activity (Table 4). Under `source = "history"`, `prefixes` adds training
//! rows (history prefix → next item) that every trained model learns from
//! ([`TaskData::add_prefix_rows`]).

pub mod baselines;
pub mod bst;
pub mod deepfm;
pub mod groups;
pub mod hybrid;
pub mod ids;
pub mod lightgcn;
pub mod metrics;
pub mod models;
pub mod negatives;
pub mod probe;
pub mod protocol;
pub mod report;
pub mod task;
pub mod task_data;
pub mod train;

pub use negatives::draw_negatives;
pub use report::{Cost, EvalResults, GroupResult, ModelResult};
pub use task::{Features, HYBRID, MODELS, NegativesConfig, Source, SplitConfig, Task};
pub use task_data::{TaskCounts, TaskData, load_task};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use sha2::{Digest, Sha256};

use crate::cpu::{peak_rss_mib, reset_peak_rss};
use crate::data::store::{hex, lock_output, write_atomic};
use crate::embed::Embedder;
use crate::embed::format::read_embeddings;
use crate::error::{ClueError, Result};
use crate::eval::hybrid::pick_base;
use crate::eval::ids::IdData;
use crate::eval::models::{
    ItemVectors, baseline, frozen_item_vectors, probe_model_runs, standardised_features,
    task_specific,
};
use crate::eval::probe::Matrix;
use crate::eval::protocol::Protocol;
use crate::eval::report::mean_std;
use crate::eval::task::{BASELINES, PROBED, TASK_SPECIFIC};
use crate::ui;

/// What `clue eval` is asked to do.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub task: PathBuf,
    pub model: PathBuf,
    pub embeddings: Option<PathBuf>,
    pub out: PathBuf,
    pub seeds: usize,
    pub batch_size: usize,
    /// Run these models instead of the task file's `models`.
    pub models: Option<Vec<String>>,
    /// More task-agnostic feature sources (`--compare NAME=DIR`): other clue runs (e.g. one
    /// pretrained with the SimCLR objective), each probed as `clue` is, reported as NAME.
    pub compare: Vec<(String, PathBuf)>,
}

/// Run `clue eval`.
pub fn eval<B: AutodiffBackend>(device: &B::Device, o: &EvalOptions) -> Result<EvalResults> {
    let mut task = Task::load(&o.task)?;
    if let Some(models) = &o.models {
        task.models = models.clone();
        task.validate(&o.task)?;
    }
    check_options(&task, o)?;
    let _lock = lock_output(&o.out, "eval")?;
    let e = Embedder::<B::InnerBackend>::load(&o.model, device)?;
    // Every compared run loads before any training: a wrong directory fails at once.
    let compared = o
        .compare
        .iter()
        .map(|(name, dir)| {
            Ok((
                name.clone(),
                Embedder::<B::InnerBackend>::load(dir, device)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut data = load_task(&task, e.max_items)?;
    let negatives = draw_negatives(&data, task.negatives.count, task.negatives.seed)?;
    if let Some(path) = &o.embeddings {
        // A damaged or mixed set fails before any training.
        read_embeddings(path, &data.users)?;
    }
    let negatives_csv = negatives_csv(&data, &negatives);
    let negatives_sha256 = hex(&Sha256::digest(negatives_csv.as_bytes()));
    let split_sha256 = split_hash(&data);
    // After the split and negatives are fixed: the added rows are training rows only.
    data.add_prefix_rows(task.features.prefixes);

    let protocol = Protocol::new(&task, &data, &negatives);
    let seeds: Vec<u64> = (0..o.seeds.max(1) as u64).collect();
    let mut vectors: Option<ItemVectors> = None;
    let mut hybrid_base = None;
    let mut results = BTreeMap::new();
    let mut stds = BTreeMap::new();
    let mut validation = BTreeMap::new();
    let mut groups: BTreeMap<String, GroupResult> = protocol
        .groups
        .iter()
        .map(|(name, rule, users)| {
            let positives = negatives.iter().filter(|n| users.contains(&n.0)).count();
            let group = GroupResult {
                rule: rule.clone(),
                users: users.len(),
                positives,
                models: BTreeMap::new(),
            };
            (name.to_string(), group)
        })
        .collect();
    let mut costs = BTreeMap::new();
    // Built on first use: the id view only the task-specific models need.
    let mut ids = None;
    let mut names: Vec<&String> = task
        .models
        .iter()
        .chain(o.compare.iter().map(|c| &c.0))
        .collect();
    // The hybrid picks its base on the other models' validation results: it runs last.
    names.sort_by_key(|n| *n == HYBRID);
    for name in names {
        ui::detail(format!("model {name}"));
        reset_peak_rss();
        let started = Instant::now();
        // The run's own frozen item vectors, encoded once for every model that uses them.
        let own_encoder =
            name == HYBRID || (PROBED.contains(&name.as_str()) && name != "untrained");
        if vectors.is_none() && own_encoder {
            vectors = Some(frozen_item_vectors(&e, &task, &data)?);
        }
        let runs = match name.as_str() {
            b if BASELINES.contains(&b) => baseline(name, &protocol),
            t if TASK_SPECIFIC.contains(&t) => {
                let ids = ids.get_or_insert_with(|| IdData::new(&data, task.features.source));
                task_specific::<B>(name, &protocol, ids, None, &seeds, device)
            }
            HYBRID => {
                let (base, why) = pick_base(task.model.hybrid.base, &validation);
                ui::detail(format!("hybrid: {why}"));
                hybrid_base = Some(why);
                let v = vectors.as_ref().expect("encoded above");
                let (x, cols) = standardised_features("clue", o, &e, &protocol, v)?;
                let x = Matrix { data: &x, cols };
                let ids = ids.get_or_insert_with(|| IdData::new(&data, task.features.source));
                task_specific::<B>(base, &protocol, ids, Some(&x), &seeds, device)
            }
            "untrained" => {
                let random = Embedder::<B::InnerBackend>::load(&o.model, device)?
                    .with_random_weights(task.split.seed);
                let v = frozen_item_vectors(&random, &task, &data)?;
                probe_model_runs::<B>(name, o, &random, &v, &protocol, &seeds, device)?
            }
            probed => match compared.iter().find(|c| c.0 == probed) {
                Some((_, other)) => {
                    let v = frozen_item_vectors(other, &task, &data)?;
                    probe_model_runs::<B>(probed, o, other, &v, &protocol, &seeds, device)?
                }
                None => {
                    let v = vectors.as_ref().expect("encoded above");
                    probe_model_runs::<B>(probed, o, &e, v, &protocol, &seeds, device)?
                }
            },
        };
        costs.insert(
            name.clone(),
            Cost {
                parameters: runs.parameters,
                seconds: started.elapsed().as_secs_f64() / runs.per_seed.len().max(1) as f64,
                peak_rss_mib: peak_rss_mib(),
            },
        );
        let all: Vec<ModelResult> = runs.per_seed.iter().map(|s| s.all).collect();
        let (mean, sd) = mean_std(&all);
        results.insert(name.clone(), mean);
        if all.len() > 1 {
            stds.insert(name.clone(), sd);
        }
        if !runs.validation.is_empty() {
            validation.insert(name.clone(), runs.validation);
        }
        for (g, (group, ..)) in protocol.groups.iter().enumerate() {
            let per_seed: Vec<ModelResult> = runs.per_seed.iter().map(|s| s.groups[g]).collect();
            let r = groups.get_mut(*group).expect("one entry per group");
            r.models.insert(name.clone(), mean_std(&per_seed).0);
        }
    }
    let out = EvalResults {
        task: task.clone(),
        counts: data.counts.clone(),
        items: data.item_ids.len(),
        split_sha256,
        negatives_sha256,
        model_bundle_sha256: e.bundle_sha256.clone(),
        compared_bundle_sha256: compared
            .iter()
            .map(|(name, c)| (name.clone(), c.bundle_sha256.clone()))
            .collect(),
        seeds,
        models: results,
        std: stds,
        validation,
        leakage_rule: leakage_rule(&task.features),
        groups,
        costs,
        hybrid_base,
    };
    write_results(&o.out, &out, &negatives_csv)?;
    Ok(out)
}

/// `--compare` names: new (not a model of the task or [`MODELS`]), distinct, non-empty; and
/// `--embeddings` only where no prefix row needs CLUE features (the file holds whole users).
fn check_options(task: &Task, o: &EvalOptions) -> Result<()> {
    let uses_clue = task.models.iter().any(|m| m == "clue" || m == HYBRID);
    if let (Some(path), true) = (&o.embeddings, task.features.prefixes > 0 && uses_clue) {
        return Err(ClueError::config(
            format!(
                "--embeddings {}: the task's `prefixes` rows need CLUE features of history \
                 prefixes, which a file of whole users does not hold",
                path.display()
            ),
            "leave out --embeddings (clue eval embeds the prefixes itself), or set prefixes = 0",
        ));
    }
    for (i, (name, dir)) in o.compare.iter().enumerate() {
        let taken = MODELS.contains(&name.as_str())
            || task.models.contains(name)
            || o.compare[..i].iter().any(|c| &c.0 == name);
        if name.is_empty() || taken {
            return Err(ClueError::config(
                format!(
                    "--compare `{name}={}`: the name is empty or already names a model",
                    dir.display()
                ),
                "give each compared run its own name, e.g. --compare simclr=runs/simclr",
            ));
        }
    }
    Ok(())
}

/// `negatives.csv`: `user_id,positive,negatives`, negatives space-separated.
fn negatives_csv(data: &TaskData, negatives: &[(usize, usize, Vec<usize>)]) -> String {
    let mut neg_csv = String::from("user_id,positive,negatives\n");
    for (u, p, negs) in negatives {
        let ids: Vec<&str> = negs.iter().map(|&j| data.item_ids[j].as_str()).collect();
        neg_csv.push_str(&format!(
            "{},{},{}\n",
            data.users[*u],
            data.item_ids[*p],
            ids.join(" ")
        ));
    }
    neg_csv
}

/// SHA-256 of the split, as `user_id,split` lines (0 train, 1 valid, 2 test).
fn split_hash(data: &TaskData) -> String {
    let split_text: String = data
        .users
        .iter()
        .zip(&data.split)
        .map(|(u, s)| format!("{u},{}\n", *s as u8))
        .collect();
    hex(&Sha256::digest(split_text.as_bytes()))
}

/// The leakage rule of the task's feature source, for the report.
fn leakage_rule(f: &Features) -> String {
    match f.source {
        Source::Logs => {
            "features: log rows strictly before the user's first target interaction".into()
        }
        Source::History => format!(
            "features: the user's interactions before their last {} (the targets)",
            f.targets
        ),
    }
}

/// Write `negatives.csv`, `results.md` and, last, `results.json` (which names the negatives'
/// hash) into `out`, all at the end of the run: the old `results.json` goes first, so a run cut
/// short never leaves one beside files of another run.
fn write_results(out: &Path, results: &EvalResults, negatives_csv: &str) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| ClueError::io(out, e))?;
    let json = out.join("results.json");
    match std::fs::remove_file(&json) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(ClueError::io(&json, e)),
        _ => {}
    }
    write_atomic(&out.join("negatives.csv"), negatives_csv.as_bytes())?;
    write_atomic(&out.join("results.md"), results.markdown().as_bytes())?;
    write_atomic(
        &json,
        (serde_json::to_string_pretty(results).expect("json") + "\n").as_bytes(),
    )
}
