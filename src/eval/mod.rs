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
//! - ties count against the model; the test split is scored once, with the probe of the best
//!   validation epoch.

pub mod baselines;
pub mod metrics;
pub mod negatives;
pub mod probe;
pub mod report;
pub mod task;
pub mod task_data;

pub use negatives::draw_negatives;
pub use report::{EvalResults, ModelResult};
pub use task::{Features, MODELS, NegativesConfig, Source, SplitConfig, Task};
pub use task_data::{TaskCounts, TaskData, load_task};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use sha2::{Digest, Sha256};

use crate::data::store::{Split, hex, write_atomic};
use crate::embed::format::read_embeddings;
use crate::embed::{Embedder, ITEM_CHUNK, ItemSource, embed_histories, item_vectors};
use crate::error::{ClueError, Result};
use crate::eval::baselines::{random_scores, standardise, text_mean, toppop_scores};
use crate::eval::metrics::{Metrics, rank};
use crate::eval::probe::{Matrix, Probe, score_matrix, train_probe};
use crate::eval::report::mean_std;
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
}

/// Rank every positive of `split` from a scorer of (eval user row, item) scores.
fn evaluate(
    data: &TaskData,
    negatives: &[(usize, usize, Vec<usize>)],
    split: Split,
    scores: &dyn Fn(usize) -> Vec<f32>,
) -> ModelResult {
    let (mut sampled, mut full) = (Vec::new(), Vec::new());
    let mut cache: Option<(usize, Vec<f32>)> = None;
    for (u, p, negs) in negatives.iter().filter(|(u, ..)| data.split[*u] == split) {
        if cache.as_ref().is_none_or(|(cu, _)| cu != u) {
            cache = Some((*u, scores(*u)));
        }
        let s = &cache.as_ref().expect("set").1;
        sampled.push(rank(s[*p], negs.iter().map(|&j| s[j])));
        let own: HashSet<usize> = data.targets[*u].iter().copied().collect();
        full.push(rank(
            s[*p],
            (0..s.len()).filter(|j| !own.contains(j)).map(|j| s[j]),
        ));
    }
    ModelResult {
        sampled: Metrics::from_ranks(&sampled),
        full: Metrics::from_ranks(&full),
    }
}

/// Run `clue eval`.
pub fn eval<B: AutodiffBackend>(device: &B::Device, o: &EvalOptions) -> Result<EvalResults> {
    let task = Task::load(&o.task)?;
    let e = Embedder::<B::InnerBackend>::load(&o.model, device)?;
    let data = load_task(&task, e.max_items)?;
    let vectors = frozen_item_vectors(&e, &task, &data, device)?;
    let negatives = draw_negatives(&data, task.negatives.count, task.negatives.seed)?;
    std::fs::create_dir_all(&o.out).map_err(|err| ClueError::io(&o.out, err))?;
    let negatives_sha256 = write_negatives(&o.out, &data, &negatives)?;
    let split_sha256 = split_hash(&data);

    let protocol = Protocol::new(&task, &data, &negatives);
    let seeds: Vec<u64> = (0..o.seeds.max(1) as u64).collect();
    let mut results = BTreeMap::new();
    let mut stds = BTreeMap::new();
    let mut validation = BTreeMap::new();
    for name in &task.models {
        ui::detail(format!("model {name}"));
        match name.as_str() {
            "toppop" | "random" => {
                results.insert(name.clone(), baseline(name, &protocol));
            }
            probe_model => {
                let (per_seed, val) =
                    probe_model_runs::<B>(probe_model, o, &e, &vectors, &protocol, &seeds, device)?;
                let (mean, sd) = mean_std(&per_seed);
                results.insert(name.clone(), mean);
                if seeds.len() > 1 {
                    stds.insert(name.clone(), sd);
                }
                validation.insert(name.clone(), val);
            }
        }
    }
    let out = EvalResults {
        task: task.clone(),
        counts: data.counts.clone(),
        items: data.item_ids.len(),
        split_sha256,
        negatives_sha256,
        model_bundle_sha256: e.bundle_sha256.clone(),
        seeds,
        models: results,
        std: stds,
        validation,
        leakage_rule: leakage_rule(&task.features),
    };
    write_results(&o.out, &out)?;
    Ok(out)
}

/// Frozen item vectors `[items, d_model]`, each item encoded once.
struct ItemVectors {
    /// The items of the users' feature histories.
    features: Vec<f32>,
    /// The task's catalogue, in item order.
    catalogue: Vec<f32>,
}

/// Encode the features' items and the task's catalogue with the model's Item Transformer.
fn frozen_item_vectors<B: Backend>(
    e: &Embedder<B>,
    task: &Task,
    data: &TaskData,
    device: &B::Device,
) -> Result<ItemVectors> {
    let alias: HashMap<String, String> = match (&task.features.service, &task.features.as_service) {
        (Some(s), Some(a)) => HashMap::from([(s.clone(), a.clone())]),
        _ => HashMap::new(),
    };
    let feature_tokens = e.tokens(&data.features.services, &data.features.items, &alias)?;
    let features = item_vectors(&e.encoder, &feature_tokens, ITEM_CHUNK, device);
    let catalogue_items: Vec<(usize, String)> =
        data.item_texts.iter().map(|t| (0, t.clone())).collect();
    let item_service = vec![task.features.items_as_service.clone().unwrap_or_default()];
    let catalogue_tokens = e.tokens(&item_service, &catalogue_items, &HashMap::new())?;
    let catalogue = item_vectors(&e.encoder, &catalogue_tokens, ITEM_CHUNK, device);
    Ok(ItemVectors {
        features,
        catalogue,
    })
}

/// Write `negatives.csv` (`user_id,positive,negatives`, negatives space-separated) into `out`;
/// returns its SHA-256.
fn write_negatives(
    out: &Path,
    data: &TaskData,
    negatives: &[(usize, usize, Vec<usize>)],
) -> Result<String> {
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
    write_atomic(&out.join("negatives.csv"), neg_csv.as_bytes())?;
    Ok(hex(&Sha256::digest(neg_csv.as_bytes())))
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

/// What every model is scored under: the task, its data, the shared negatives and the user rows
/// of each split.
struct Protocol<'a> {
    task: &'a Task,
    data: &'a TaskData,
    negatives: &'a [(usize, usize, Vec<usize>)],
    train: Vec<usize>,
    valid: Vec<usize>,
    test: Vec<usize>,
}

impl<'a> Protocol<'a> {
    fn new(
        task: &'a Task,
        data: &'a TaskData,
        negatives: &'a [(usize, usize, Vec<usize>)],
    ) -> Self {
        let rows = |s: Split| -> Vec<usize> {
            (0..data.users.len())
                .filter(|&u| data.split[u] == s)
                .collect()
        };
        Self {
            task,
            data,
            negatives,
            train: rows(Split::Train),
            valid: rows(Split::Valid),
            test: rows(Split::Test),
        }
    }

    /// Metrics of a probe on the valid or test split.
    fn score_probe<B: Backend>(
        &self,
        probe: &Probe<B>,
        users: &Matrix,
        items: &Matrix,
        split: Split,
        device: &B::Device,
    ) -> ModelResult {
        let rows = match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        };
        let n_items = self.data.item_ids.len();
        let (all, at) = scores_of(probe, users, rows, items, device);
        let s = |u: usize| all[at[&u] * n_items..(at[&u] + 1) * n_items].to_vec();
        evaluate(self.data, self.negatives, split, &s)
    }
}

/// A non-learned baseline (`toppop` or `random`) on the test split.
fn baseline(name: &str, p: &Protocol) -> ModelResult {
    if name == "toppop" {
        let pop = toppop_scores(p.data, &p.train);
        evaluate(p.data, p.negatives, Split::Test, &|_| pop.clone())
    } else {
        let (seed, n_items) = (p.task.negatives.seed, p.data.item_ids.len());
        evaluate(p.data, p.negatives, Split::Test, &|u: usize| {
            random_scores(seed, u, n_items)
        })
    }
}

/// Per seed: the test metrics (with the probe of its best validation epoch), and that best
/// validation MRR and its epoch.
type ProbeRuns = (Vec<ModelResult>, Vec<(f64, usize)>);

/// A probe model (`clue` or `text-mean`): its standardised user features, then one probe per
/// seed.
fn probe_model_runs<B: AutodiffBackend>(
    model: &str,
    o: &EvalOptions,
    e: &Embedder<B::InnerBackend>,
    vectors: &ItemVectors,
    p: &Protocol,
    seeds: &[u64],
    device: &B::Device,
) -> Result<ProbeRuns> {
    let (mut x, cols) = user_features(model, o, e, p.data, &vectors.features)?;
    standardise(&mut x, cols, &p.train);
    let users = Matrix { data: &x, cols };
    let items = Matrix {
        data: &vectors.catalogue,
        cols: e.d_model,
    };
    let data = p.data;
    let train_pairs: Vec<(usize, usize)> = p
        .train
        .iter()
        .flat_map(|&u| data.targets[u].iter().map(move |&i| (u, i)))
        .collect();
    let targets: Vec<HashSet<usize>> = data
        .targets
        .iter()
        .map(|t| t.iter().copied().collect())
        .collect();
    let excluded = |u: usize, j: usize| targets[u].contains(&j);
    let mut per_seed = Vec::new();
    let mut val = Vec::new();
    for &seed in seeds {
        let (probe, mrr, epoch) = train_probe::<B>(
            &users,
            &items,
            &train_pairs,
            &excluded,
            &p.task.probe,
            seed,
            device,
            |probe| {
                p.score_probe(probe, &users, &items, Split::Valid, device)
                    .sampled
                    .mrr
            },
        );
        val.push((mrr, epoch));
        per_seed.push(p.score_probe(&probe, &users, &items, Split::Test, device));
    }
    Ok((per_seed, val))
}

/// A probe model's user features `[users, cols]`, unstandardised: `clue` from `--embeddings` or
/// embedded here from the feature histories; `text-mean` the mean item vector per service.
fn user_features<B: Backend>(
    model: &str,
    o: &EvalOptions,
    e: &Embedder<B>,
    data: &TaskData,
    feature_cache: &[f32],
) -> Result<(Vec<f32>, usize)> {
    Ok(match (model, &o.embeddings) {
        ("clue", Some(path)) => read_embeddings(path, &data.users)?,
        ("clue", None) => {
            let (m, _) = embed_histories(
                e,
                &data.features,
                &ItemSource::Cache(feature_cache),
                o.batch_size,
            );
            (m, e.dim * data.features.services.len())
        }
        _ => (
            text_mean(&data.features, feature_cache, e.d_model),
            e.d_model * data.features.services.len(),
        ),
    })
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

/// Write `results.json` and `results.md` into `out`.
fn write_results(out: &Path, results: &EvalResults) -> Result<()> {
    write_atomic(
        &out.join("results.json"),
        (serde_json::to_string_pretty(results).expect("json") + "\n").as_bytes(),
    )?;
    write_atomic(&out.join("results.md"), results.markdown().as_bytes())
}

/// Probe scores `[rows, items]` and each row's position.
fn scores_of<B: Backend>(
    probe: &Probe<B>,
    users: &Matrix,
    rows: &[usize],
    items: &Matrix,
    device: &B::Device,
) -> (Vec<f32>, HashMap<usize, usize>) {
    let all = score_matrix(probe, users, rows, items, device);
    (all, rows.iter().enumerate().map(|(i, &u)| (u, i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_ranking_leaves_out_other_positives_and_constant_scores_rank_last() {
        let d = TaskData::for_test(vec![vec![0, 1]], vec![Split::Test], 5);
        let negs = vec![(0, 0, vec![2, 3]), (0, 1, vec![3, 4])];
        // Item 1 (another positive) outscores item 0 but does not count against it.
        let r = evaluate(&d, &negs, Split::Test, &|_| vec![0.5, 0.9, 0.1, 0.6, 0.2]);
        // Positive 0: sampled {2: .1, 3: .6} → rank 2; full {2, 3, 4} → rank 2.
        // Positive 1: sampled {3, 4} → rank 1; full → rank 1.
        assert_eq!(r.sampled.mrr, (0.5 + 1.0) / 2.0);
        assert_eq!(r.full.mrr, (0.5 + 1.0) / 2.0);
        let c = evaluate(&d, &negs, Split::Test, &|_| vec![1.0; 5]);
        assert_eq!(c.sampled.mrr, 1.0 / 3.0);
        assert_eq!(c.full.hr1, 0.0);
    }
}
