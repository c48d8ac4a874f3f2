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

pub mod metrics;
pub mod probe;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::log::{parse_timestamp, read_logs, read_table};
use crate::data::prepare::assign_split;
use crate::data::store::{Split, hex, write_atomic};
use crate::embed::{Embedder, HistoryBuilder, ItemSource, embed_histories, item_vectors};
use crate::error::{ClueError, Result};
use crate::eval::metrics::{Metrics, rank};
use crate::eval::probe::{Matrix, ProbeConfig, score_matrix, train_probe};
use crate::ui;

/// Where the users' features come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The users' behaviour logs in the pretraining services (paper's setting).
    Logs,
    /// The task's own earlier interactions, as one service (inter-company transfer).
    History,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Features {
    pub source: Source,
    /// `source = "logs"`: log files or directories, relative to the task file.
    #[serde(default)]
    pub logs: Vec<PathBuf>,
    /// `source = "logs"`: the services to embed, concatenated in this order.
    #[serde(default)]
    pub services: Vec<String>,
    /// `source = "history"`: the service name of the history (e.g. `market`).
    #[serde(default)]
    pub service: Option<String>,
    /// Read the history's items as this pretraining service (its prefix token), e.g. `shop`.
    #[serde(default)]
    pub as_service: Option<String>,
    /// Read the task's item texts as this pretraining service.
    #[serde(default)]
    pub items_as_service: Option<String>,
    /// `source = "history"`: how many of a user's last interactions are targets.
    #[serde(default = "one")]
    pub targets: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitConfig {
    pub seed: u64,
    pub valid: f64,
    pub test: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            valid: 0.1,
            test: 0.2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NegativesConfig {
    pub count: usize,
    pub seed: u64,
}

impl Default for NegativesConfig {
    fn default() -> Self {
        Self {
            count: 100,
            seed: 13,
        }
    }
}

pub const MODELS: [&str; 4] = ["clue", "text-mean", "toppop", "random"];

/// A task file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `user_id,item_id,timestamp` CSV, relative to the task file.
    pub interactions: PathBuf,
    /// `item_id,text` CSV, relative to the task file.
    pub items: PathBuf,
    pub features: Features,
    #[serde(default)]
    pub split: SplitConfig,
    #[serde(default)]
    pub negatives: NegativesConfig,
    #[serde(default)]
    pub probe: ProbeConfig,
    /// Models to compare (default: all of clue, text-mean, toppop, random).
    #[serde(default = "all_models")]
    pub models: Vec<String>,
}

fn all_models() -> Vec<String> {
    MODELS.iter().map(|s| s.to_string()).collect()
}

impl Task {
    /// Load a task file; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ClueError::io(path, e))?;
        let mut t: Task = toml::from_str(&text).map_err(|e| {
            ClueError::bad_file(
                path,
                e.to_string(),
                "see `clue eval --help` for the task format",
            )
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        t.interactions = base.join(&t.interactions);
        t.items = base.join(&t.items);
        t.features.logs = t.features.logs.iter().map(|p| base.join(p)).collect();
        t.validate(path)?;
        Ok(t)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String, hint: &str| Err(ClueError::bad_file(path, m, hint.to_string()));
        let f = &self.features;
        match f.source {
            Source::Logs if f.logs.is_empty() || f.services.is_empty() => {
                return bad(
                    "source = \"logs\" needs `logs` and `services`".into(),
                    "e.g. logs = [\"../logs\"], services = [\"search\", \"shop\"]",
                );
            }
            Source::History if f.service.is_none() || f.targets == 0 => {
                return bad(
                    "source = \"history\" needs `service` and targets ≥ 1".into(),
                    "e.g. service = \"market\", targets = 1",
                );
            }
            _ => {}
        }
        let s = &self.split;
        if !(s.valid > 0.0 && s.test > 0.0 && s.valid + s.test < 1.0) {
            return bad(
                format!(
                    "split fractions valid {} and test {} leave no training users",
                    s.valid, s.test
                ),
                "use e.g. valid = 0.1, test = 0.2",
            );
        }
        if let Some(m) = self.models.iter().find(|m| !MODELS.contains(&m.as_str())) {
            return bad(
                format!("unknown model `{m}`"),
                "models are clue, text-mean, toppop, random",
            );
        }
        let p = &self.probe;
        if p.epochs == 0 || p.batch_size == 0 || p.lr <= 0.0 || p.negatives == 0 {
            return bad(
                "[probe] needs epochs, batch_size, negatives ≥ 1 and lr > 0".into(),
                "remove the table for defaults",
            );
        }
        Ok(())
    }
}

/// One task's users, targets and item catalogue, features not yet encoded.
pub struct TaskData {
    pub item_ids: Vec<String>,
    pub item_texts: Vec<String>,
    pub users: Vec<String>,
    /// Target items of each user (distinct).
    pub targets: Vec<Vec<usize>>,
    pub split: Vec<Split>,
    pub features: crate::embed::Histories,
    /// Counts for the report.
    pub counts: TaskCounts,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskCounts {
    pub interactions: u64,
    pub unknown_items_skipped: u64,
    /// Log rows at or after the user's first target (or without a timestamp): not used.
    pub feature_rows_dropped_for_leakage: u64,
    pub users_without_features_dropped: u64,
    pub users: [usize; 3],
    pub positives: [usize; 3],
}

/// Read a task's files and build its users, targets, split and feature histories.
pub fn load_task(task: &Task, max_items: usize) -> Result<TaskData> {
    let mut item_ids = Vec::new();
    let mut item_texts = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    read_table(&task.items, &["item_id", "text"], |line, f| {
        if index.insert(f[0].to_string(), item_ids.len()).is_some() {
            return Err(ClueError::BadRow {
                path: task.items.clone(),
                line,
                message: format!("item `{}` appears twice", f[0]),
                hint: "give each item_id one row",
            });
        }
        item_ids.push(f[0].to_string());
        item_texts.push(f[1].to_string());
        Ok(())
    })?;
    let mut counts = TaskCounts::default();
    let mut user_index: HashMap<String, usize> = HashMap::new();
    let mut users: Vec<String> = Vec::new();
    let mut events: Vec<Vec<(i64, u64, usize)>> = Vec::new();
    read_table(
        &task.interactions,
        &["user_id", "item_id", "timestamp"],
        |line, f| {
            counts.interactions += 1;
            let Some(&item) = index.get(f[1]) else {
                counts.unknown_items_skipped += 1;
                return Ok(());
            };
            let time = parse_timestamp(f[2]).ok_or_else(|| ClueError::BadRow {
                path: task.interactions.clone(),
                line,
                message: format!("unparseable timestamp `{}`", f[2]),
                hint: "use Unix seconds, RFC 3339, or leave it empty",
            })?;
            let u = *user_index.entry(f[0].to_string()).or_insert_with(|| {
                users.push(f[0].to_string());
                events.push(Vec::new());
                users.len() - 1
            });
            events[u].push((time.unwrap_or(i64::MIN), line, item));
            Ok(())
        },
    )?;
    if users.is_empty() {
        return Err(ClueError::bad_file(
            &task.interactions,
            "no interaction with a known item",
            "check that item ids match the items file",
        ));
    }
    let f = &task.features;
    let services = match f.source {
        Source::Logs => f.services.clone(),
        Source::History => vec![f.service.clone().expect("validated")],
    };
    let mut builder = HistoryBuilder::new(&services);
    let mut targets: Vec<Vec<usize>> = Vec::with_capacity(users.len());
    let mut cutoff: Vec<i64> = Vec::with_capacity(users.len());
    for (u, ev) in events.iter_mut().enumerate() {
        ev.sort_unstable();
        match f.source {
            Source::Logs => {
                targets.push(distinct(ev.iter().map(|e| e.2)));
                cutoff.push(ev[0].0);
            }
            Source::History => {
                let k = f.targets.min(ev.len().saturating_sub(1));
                let first_target = ev.len() - k;
                targets.push(distinct(ev[first_target..].iter().map(|e| e.2)));
                for e in &ev[..first_target] {
                    builder.push(&users[u], &services[0], Some(e.0), &item_texts[e.2]);
                }
                cutoff.push(ev.get(first_target).map(|e| e.0).unwrap_or(i64::MIN));
            }
        }
    }
    if f.source == Source::Logs {
        let files = crate::data::log::list_log_files(&f.logs)?;
        let bar = ui::bar(crate::data::log::total_bytes(&files), "features", true);
        let mut dropped = 0u64;
        read_logs(
            &files,
            false,
            |b| {
                if let Some(&u) = user_index.get(b.user) {
                    match b.timestamp {
                        Some(t) if t < cutoff[u] => {
                            builder.push(b.user, b.service, Some(t), b.text)
                        }
                        _ if services.iter().any(|s| s == b.service) => dropped += 1,
                        _ => {}
                    }
                }
            },
            |bytes| bar.set_position(bytes),
        )?;
        bar.finish_and_clear();
        counts.feature_rows_dropped_for_leakage = dropped;
    }
    let hist = builder.finish(max_items);
    // Keep users with targets and at least one feature behaviour, in the task's user order.
    let by_name: HashMap<&str, usize> = hist
        .users
        .iter()
        .enumerate()
        .map(|(i, u)| (u.as_str(), i))
        .collect();
    let mut keep_users = Vec::new();
    let mut keep_targets = Vec::new();
    let mut seqs = Vec::new();
    for (u, name) in users.iter().enumerate() {
        match by_name.get(name.as_str()) {
            Some(&h) if !targets[u].is_empty() => {
                keep_users.push(name.clone());
                keep_targets.push(std::mem::take(&mut targets[u]));
                seqs.push(hist.seqs[h].clone());
            }
            _ => counts.users_without_features_dropped += 1,
        }
    }
    let split: Vec<Split> = keep_users
        .iter()
        .map(|u| assign_split(task.split.seed, u, task.split.valid, task.split.test))
        .collect();
    for (s, t) in split.iter().zip(&keep_targets) {
        counts.users[*s as usize] += 1;
        counts.positives[*s as usize] += t.len();
    }
    if counts.users.contains(&0) {
        return Err(ClueError::config(
            format!(
                "task `{}`: a split has no users (train/valid/test = {:?})",
                task.name, counts.users
            ),
            "the task needs more users, or other split fractions",
        ));
    }
    Ok(TaskData {
        item_ids,
        item_texts,
        users: keep_users.clone(),
        targets: keep_targets,
        split,
        features: crate::embed::Histories {
            users: keep_users,
            services,
            items: hist.items,
            seqs,
        },
        counts,
    })
}

fn distinct(items: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut seen = HashSet::new();
    items.filter(|i| seen.insert(*i)).collect()
}

/// For every valid/test positive: `(user, positive, negatives)`, drawn once with a seed.
pub fn draw_negatives(
    data: &TaskData,
    count: usize,
    seed: u64,
) -> Result<Vec<(usize, usize, Vec<usize>)>> {
    let n_items = data.item_ids.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (u, targets) in data.targets.iter().enumerate() {
        if data.split[u] == Split::Train {
            continue;
        }
        let own: HashSet<usize> = targets.iter().copied().collect();
        if n_items < own.len() + count {
            return Err(ClueError::config(
                format!(
                    "{n_items} items cannot give {count} negatives besides a user's {} positives",
                    own.len()
                ),
                "lower [negatives] count in the task file",
            ));
        }
        for &p in targets {
            let mut negs: Vec<usize> = Vec::with_capacity(count);
            let mut chosen = HashSet::new();
            while negs.len() < count {
                let j = rng.random_range(0..n_items);
                if !own.contains(&j) && chosen.insert(j) {
                    negs.push(j);
                }
            }
            out.push((u, p, negs));
        }
    }
    Ok(out)
}

/// Sampled and full-catalogue metrics of one model on one split.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ModelResult {
    pub sampled: Metrics,
    pub full: Metrics,
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

/// What `clue eval` is asked to do.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub task: PathBuf,
    pub model: PathBuf,
    pub embeddings: Option<PathBuf>,
    pub out: PathBuf,
    pub seeds: usize,
    pub batch_size: usize,
    pub fixed_shapes: bool,
}

/// `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResults {
    pub task: Task,
    pub counts: TaskCounts,
    pub items: usize,
    pub split_sha256: String,
    pub negatives_sha256: String,
    pub model_bundle_sha256: String,
    pub seeds: Vec<u64>,
    /// Test-split metrics; the mean over seeds for the probe models.
    pub models: std::collections::BTreeMap<String, ModelResult>,
    /// Standard deviation over seeds (probe models, `--seeds` > 1).
    pub std: std::collections::BTreeMap<String, ModelResult>,
    /// Best validation MRR (sampled) and its epoch, per probe model and seed.
    pub validation: std::collections::BTreeMap<String, Vec<(f64, usize)>>,
    pub leakage_rule: String,
}

/// Standardise columns with the train rows' mean and standard deviation.
fn standardise(x: &mut [f32], cols: usize, train: &[usize]) {
    for c in 0..cols {
        let vals: Vec<f64> = train.iter().map(|&r| x[r * cols + c] as f64).collect();
        let mean = vals.iter().sum::<f64>() / vals.len().max(1) as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len().max(1) as f64;
        let sd = var.sqrt().max(1e-6);
        for r in 0..x.len() / cols {
            x[r * cols + c] = ((x[r * cols + c] as f64 - mean) / sd) as f32;
        }
    }
}

/// Mean of the frozen item vectors of each user's history, per service, concatenated.
fn text_mean(h: &crate::embed::Histories, cache: &[f32], d: usize) -> Vec<f32> {
    let k = h.services.len();
    let mut out = vec![0f32; h.users.len() * k * d];
    for (u, per) in h.seqs.iter().enumerate() {
        for (s, seq) in per.iter().enumerate() {
            let row = &mut out[(u * k + s) * d..(u * k + s + 1) * d];
            for &i in seq {
                for (o, v) in row
                    .iter_mut()
                    .zip(&cache[i as usize * d..(i as usize + 1) * d])
                {
                    *o += v / seq.len() as f32;
                }
            }
        }
    }
    out
}

/// Read `--embeddings` (safetensors with `user_embeddings`, or .npy) and its `users.csv`, in the
/// order of `users`.
fn read_embeddings(path: &Path, users: &[String]) -> Result<(Vec<f32>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| ClueError::io(path, e))?;
    let bad = |m: String| ClueError::bad_file(path, m, "give a file written by `clue embed`");
    let (data, shape): (Vec<f32>, Vec<usize>) = if path.extension().is_some_and(|e| e == "npy") {
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).map_err(|e| bad(e.to_string()))?;
        if !header.contains("'<f4'") {
            return Err(bad("only little-endian f32 .npy files are read".into()));
        }
        let dims: Vec<usize> = header
            .split("'shape': (")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_default();
        let data = bytes[10 + hlen..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (data, dims)
    } else {
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let t = st
            .tensor("user_embeddings")
            .map_err(|e| bad(e.to_string()))?;
        let data = match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => t
                .data()
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(bad(format!("unsupported dtype {other:?}"))),
        };
        (data, t.shape().to_vec())
    };
    if shape.len() != 2 || shape[0] * shape[1] != data.len() {
        return Err(bad(format!(
            "expected a [users, dim] matrix, found shape {shape:?}"
        )));
    }
    let ids_path = PathBuf::from(format!("{}.users.csv", path.with_extension("").display()));
    let mut row_of: HashMap<String, usize> = HashMap::new();
    read_table(&ids_path, &["row", "user_id"], |_, f| {
        row_of.insert(f[1].to_string(), f[0].parse().unwrap_or(usize::MAX));
        Ok(())
    })?;
    let dim = shape[1];
    let mut out = Vec::with_capacity(users.len() * dim);
    for u in users {
        let r = *row_of.get(u).filter(|&&r| r < shape[0]).ok_or_else(|| {
            ClueError::bad_file(
                &ids_path,
                format!("user `{u}` of the task has no embedding"),
                "embed the task's users (clue embed on the task's feature logs)",
            )
        })?;
        out.extend_from_slice(&data[r * dim..(r + 1) * dim]);
    }
    Ok((out, dim))
}

/// Run `clue eval`.
pub fn eval<B: AutodiffBackend>(device: &B::Device, o: &EvalOptions) -> Result<EvalResults> {
    let task = Task::load(&o.task)?;
    let e = Embedder::<B::InnerBackend>::load(&o.model, device)?;
    let data = load_task(&task, e.max_items)?;
    let alias: HashMap<String, String> = match (&task.features.service, &task.features.as_service) {
        (Some(s), Some(a)) => HashMap::from([(s.clone(), a.clone())]),
        _ => HashMap::new(),
    };
    // Frozen item vectors: the features' items and the task's catalogue, each encoded once.
    let feature_tokens = e.tokens(&data.features.services, &data.features.items, &alias)?;
    let feature_cache = item_vectors(&e.encoder, &feature_tokens, 1024, device);
    let catalogue: Vec<(usize, String)> = data.item_texts.iter().map(|t| (0, t.clone())).collect();
    let item_service = vec![task.features.items_as_service.clone().unwrap_or_default()];
    let catalogue_tokens = e.tokens(&item_service, &catalogue, &HashMap::new())?;
    let item_cache = item_vectors(&e.encoder, &catalogue_tokens, 1024, device);
    let items = Matrix {
        data: &item_cache,
        cols: e.d_model,
    };

    let negatives = draw_negatives(&data, task.negatives.count, task.negatives.seed)?;
    std::fs::create_dir_all(&o.out).map_err(|err| ClueError::io(&o.out, err))?;
    let mut neg_csv = String::from("user_id,positive,negatives\n");
    for (u, p, negs) in &negatives {
        let ids: Vec<&str> = negs.iter().map(|&j| data.item_ids[j].as_str()).collect();
        neg_csv.push_str(&format!(
            "{},{},{}\n",
            data.users[*u],
            data.item_ids[*p],
            ids.join(" ")
        ));
    }
    write_atomic(&o.out.join("negatives.csv"), neg_csv.as_bytes())?;
    let negatives_sha256 = hex(&Sha256::digest(neg_csv.as_bytes()));
    let split_text: String = data
        .users
        .iter()
        .zip(&data.split)
        .map(|(u, s)| format!("{u},{}\n", *s as u8))
        .collect();
    let split_sha256 = hex(&Sha256::digest(split_text.as_bytes()));

    let rows = |s: Split| -> Vec<usize> {
        (0..data.users.len())
            .filter(|&u| data.split[u] == s)
            .collect()
    };
    let train_rows = rows(Split::Train);
    let (valid_rows, test_rows) = (rows(Split::Valid), rows(Split::Test));
    let n_items = data.item_ids.len();
    let mut results = std::collections::BTreeMap::new();
    let mut stds = std::collections::BTreeMap::new();
    let mut validation = std::collections::BTreeMap::new();
    let seeds: Vec<u64> = (0..o.seeds.max(1) as u64).collect();

    for name in &task.models {
        let bar_note = format!("model {name}");
        ui::detail(&bar_note);
        match name.as_str() {
            "toppop" => {
                let mut pop = vec![0f32; n_items];
                for &u in &train_rows {
                    for &i in &data.targets[u] {
                        pop[i] += 1.0;
                    }
                }
                results.insert(
                    name.clone(),
                    evaluate(&data, &negatives, Split::Test, &|_| pop.clone()),
                );
            }
            "random" => {
                let scores = |u: usize| {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(task.negatives.seed ^ ((u as u64) << 20));
                    (0..n_items).map(|_| rng.random::<f32>()).collect()
                };
                results.insert(
                    name.clone(),
                    evaluate(&data, &negatives, Split::Test, &scores),
                );
            }
            probe_model => {
                let (mut x, cols) = match (probe_model, &o.embeddings) {
                    ("clue", Some(path)) => read_embeddings(path, &data.users)?,
                    ("clue", None) => {
                        let (m, _) = embed_histories(
                            &e,
                            &data.features,
                            &ItemSource::Cache(&feature_cache),
                            o.batch_size,
                            o.fixed_shapes,
                        );
                        (m, e.dim * data.features.services.len())
                    }
                    _ => (
                        text_mean(&data.features, &feature_cache, e.d_model),
                        e.d_model * data.features.services.len(),
                    ),
                };
                standardise(&mut x, cols, &train_rows);
                let users = Matrix { data: &x, cols };
                let train_pairs: Vec<(usize, usize)> = train_rows
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
                for &seed in &seeds {
                    let (probe, mrr, epoch) = train_probe::<B>(
                        &users,
                        &items,
                        &train_pairs,
                        &excluded,
                        &task.probe,
                        seed,
                        device,
                        |p| {
                            let (all, at) = scores_of(p, &users, &valid_rows, &items, device);
                            let s =
                                |u: usize| all[at[&u] * n_items..(at[&u] + 1) * n_items].to_vec();
                            evaluate(&data, &negatives, Split::Valid, &s).sampled.mrr
                        },
                    );
                    val.push((mrr, epoch));
                    let (all, at) = scores_of(&probe, &users, &test_rows, &items, device);
                    let s = |u: usize| all[at[&u] * n_items..(at[&u] + 1) * n_items].to_vec();
                    per_seed.push(evaluate(&data, &negatives, Split::Test, &s));
                }
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
        items: n_items,
        split_sha256,
        negatives_sha256,
        model_bundle_sha256: e.bundle_sha256.clone(),
        seeds,
        models: results,
        std: stds,
        validation,
        leakage_rule: match task.features.source {
            Source::Logs => {
                "features: log rows strictly before the user's first target interaction".into()
            }
            Source::History => format!(
                "features: the user's interactions before their last {} (the targets)",
                task.features.targets
            ),
        },
    };
    write_atomic(
        &o.out.join("results.json"),
        (serde_json::to_string_pretty(&out).expect("json") + "\n").as_bytes(),
    )?;
    write_atomic(&o.out.join("results.md"), out.markdown().as_bytes())?;
    Ok(out)
}

/// Probe scores `[rows, items]` and each row's position.
fn scores_of<B: burn::tensor::backend::Backend>(
    probe: &probe::Probe<B>,
    users: &Matrix,
    rows: &[usize],
    items: &Matrix,
    device: &B::Device,
) -> (Vec<f32>, HashMap<usize, usize>) {
    let all = score_matrix(probe, users, rows, items, device);
    (all, rows.iter().enumerate().map(|(i, &u)| (u, i)).collect())
}

fn mean_std(runs: &[ModelResult]) -> (ModelResult, ModelResult) {
    let n = runs.len().max(1) as f64;
    let get = |f: &dyn Fn(&ModelResult) -> f64| {
        let m = runs.iter().map(f).sum::<f64>() / n;
        let v = runs.iter().map(|r| (f(r) - m).powi(2)).sum::<f64>() / n;
        (m, v.sqrt())
    };
    let metrics = |pick: &dyn Fn(&ModelResult) -> Metrics| {
        let (hr1, hr1s) = get(&|r| pick(r).hr1);
        let (hr10, hr10s) = get(&|r| pick(r).hr10);
        let (nd, nds) = get(&|r| pick(r).ndcg10);
        let (mrr, mrrs) = get(&|r| pick(r).mrr);
        let n = runs.first().map(|r| pick(r).n).unwrap_or(0);
        (
            Metrics {
                hr1,
                hr10,
                ndcg10: nd,
                mrr,
                n,
            },
            Metrics {
                hr1: hr1s,
                hr10: hr10s,
                ndcg10: nds,
                mrr: mrrs,
                n,
            },
        )
    };
    let (sm, ss) = metrics(&|r| r.sampled);
    let (fm, fs) = metrics(&|r| r.full);
    (
        ModelResult {
            sampled: sm,
            full: fm,
        },
        ModelResult {
            sampled: ss,
            full: fs,
        },
    )
}

impl EvalResults {
    /// The models × metrics table (test split), as markdown.
    pub fn markdown(&self) -> String {
        let c = &self.counts;
        let mut s = format!(
            "### {} — test users {} ({} positives), {} items, {} sampled negatives\n\n",
            self.task.name, c.users[2], c.positives[2], self.items, self.task.negatives.count
        );
        s.push_str(
            "| model | HR@1 | HR@10 | NDCG@10 | MRR | full HR@10 | full NDCG@10 | full MRR |\n",
        );
        s.push_str("|---|---|---|---|---|---|---|---|\n");
        for (name, r) in &self.models {
            let sd = self.std.get(name);
            let cell = |v: f64, f: &dyn Fn(&ModelResult) -> f64| match sd {
                Some(d) => format!("{:.4} ± {:.4}", v, f(d)),
                None => format!("{v:.4}"),
            };
            s.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
                cell(r.sampled.hr1, &|d| d.sampled.hr1),
                cell(r.sampled.hr10, &|d| d.sampled.hr10),
                cell(r.sampled.ndcg10, &|d| d.sampled.ndcg10),
                cell(r.sampled.mrr, &|d| d.sampled.mrr),
                cell(r.full.hr10, &|d| d.full.hr10),
                cell(r.full.ndcg10, &|d| d.full.ndcg10),
                cell(r.full.mrr, &|d| d.full.mrr),
            ));
        }
        s.push_str(&format!(
            "\nsplit {} · negatives {} · model {} · seeds {:?}\n",
            &self.split_sha256[..12],
            &self.negatives_sha256[..12],
            &self.model_bundle_sha256[..12],
            self.seeds
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(targets: Vec<Vec<usize>>, split: Vec<Split>, items: usize) -> TaskData {
        TaskData {
            item_ids: (0..items).map(|i| format!("i{i}")).collect(),
            item_texts: vec![String::new(); items],
            users: (0..targets.len()).map(|u| format!("u{u}")).collect(),
            targets,
            split,
            features: Default::default(),
            counts: Default::default(),
        }
    }

    #[test]
    fn negatives_avoid_every_positive_and_repeat_with_the_seed() {
        let d = data(
            vec![vec![0, 1], vec![2], vec![3]],
            vec![Split::Test, Split::Train, Split::Valid],
            120,
        );
        let a = draw_negatives(&d, 100, 5).unwrap();
        assert_eq!(
            a.len(),
            3,
            "two test positives and one valid one; train users get none"
        );
        for (u, p, negs) in &a {
            assert_eq!(negs.len(), 100);
            assert!(!negs.contains(p));
            assert!(negs.iter().all(|j| !d.targets[*u].contains(j)));
            assert_eq!(negs.iter().collect::<HashSet<_>>().len(), 100, "distinct");
        }
        assert_eq!(a, draw_negatives(&d, 100, 5).unwrap());
        assert_ne!(a, draw_negatives(&d, 100, 6).unwrap());
        assert!(draw_negatives(&d, 119, 5).is_err(), "not enough items");
    }

    #[test]
    fn full_ranking_leaves_out_other_positives_and_constant_scores_rank_last() {
        let d = data(vec![vec![0, 1]], vec![Split::Test], 5);
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
