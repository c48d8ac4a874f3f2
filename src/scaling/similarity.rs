//! `clue similarity` (paper Figure 5): how alike the token distributions of the pretraining logs
//! and of each downstream task are — Kendall's τ-b between the token counts of the two over the
//! tokens both use, and the share of the task's tokens the pretraining data uses — beside CLUE's gain over the best task-specific model when the task's
//! `clue eval` results are given. The paper finds larger gains where the distributions agree.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bundle::read_json;
use crate::data::store::PreparedDataset;
use crate::data::tokenize::ItemTokenizer;
use crate::error::Result;
use crate::eval::report::EvalResults;
use crate::eval::task::Task;
use crate::eval::task_data::load_task;
use crate::scaling::law::kendall_tau_b;

/// Task-specific models the gain is measured against (the best of those in the results).
const TASK_SPECIFIC: [&str; 3] = ["bst", "lightgcn", "deepfm"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Similarity {
    pub task: String,
    pub path: PathBuf,
    /// Kendall's τ-b of the two token-count vectors.
    pub tau: Option<f64>,
    /// Tokens both sides use: τ ranks their counts.
    pub tokens: usize,
    /// Share of the task's token occurrences that are tokens the pretraining data uses.
    pub coverage: f64,
    /// CLUE's sampled MRR over the best task-specific model's, minus one.
    pub clue_gain: Option<f64>,
}

/// Token counts of everything the prepared data holds (each behaviour counts its item's text
/// tokens once, the service prefix left out), indexed by token id.
fn pretrain_counts(data: &PreparedDataset) -> Vec<f64> {
    let mut item_uses = vec![0.0; data.num_items()];
    for user in 0..data.num_users() {
        for service in 0..data.num_services() {
            for item in data.sequence(user, service) {
                item_uses[item as usize] += 1.0;
            }
        }
    }
    let mut counts = vec![0.0; data.manifest.vocab_size as usize];
    for (item, uses) in item_uses.iter().enumerate().filter(|(_, u)| **u > 0.0) {
        for &t in data.item_tokens(item as u32).iter().skip(1) {
            counts[t as usize] += uses;
        }
    }
    counts
}

/// Token counts of a task's target items (each user–item pair counts the item's tokens once),
/// tokenised and cut as the pretraining data was (`max_text_tokens`: its cap less the prefix).
fn task_counts(
    task: &Task,
    tokenizer: &ItemTokenizer,
    vocab: usize,
    max_text_tokens: usize,
) -> Result<Vec<f64>> {
    let data = load_task(task, 1)?;
    let mut item_uses = vec![0.0; data.item_texts.len()];
    for targets in &data.targets {
        for &item in targets {
            item_uses[item] += 1.0;
        }
    }
    let texts: Vec<(Option<u32>, &str)> =
        data.item_texts.iter().map(|t| (None, t.as_str())).collect();
    let tokens = tokenizer.encode_texts(&texts, max_text_tokens)?;
    let mut counts = vec![0.0; vocab];
    for (item, ids) in tokens.iter().enumerate() {
        for &t in ids {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += item_uses[item];
            }
        }
    }
    Ok(counts)
}

/// τ of `pretrain` against each task; `results[i]` (when given) is task i's `results.json`.
pub fn similarity(
    pretrain: &Path,
    tasks: &[PathBuf],
    results: &[PathBuf],
) -> Result<Vec<Similarity>> {
    let data = PreparedDataset::open(pretrain, false)?;
    let tokenizer = ItemTokenizer::load(&data.tokenizer_path(), &data.manifest.services)?;
    let base = pretrain_counts(&data);
    let mut out = Vec::new();
    for (i, path) in tasks.iter().enumerate() {
        let task = Task::load(path)?;
        let cap = data
            .manifest
            .options
            .max_item_tokens
            .saturating_sub(1)
            .max(1);
        let counts = task_counts(&task, &tokenizer, base.len(), cap)?;
        let used: Vec<usize> = (0..base.len())
            .filter(|&t| base[t] > 0.0 && counts[t] > 0.0)
            .collect();
        let total: f64 = counts.iter().sum();
        let shared: f64 = used.iter().map(|&t| counts[t]).sum();
        let x: Vec<f64> = used.iter().map(|&t| base[t]).collect();
        let y: Vec<f64> = used.iter().map(|&t| counts[t]).collect();
        let clue_gain = match results.get(i) {
            Some(r) => gain(&read_json::<EvalResults>(r)?),
            None => None,
        };
        out.push(Similarity {
            task: task.name.clone(),
            path: path.clone(),
            tau: kendall_tau_b(&x, &y),
            tokens: used.len(),
            coverage: if total > 0.0 { shared / total } else { 0.0 },
            clue_gain,
        });
    }
    Ok(out)
}

fn gain(results: &EvalResults) -> Option<f64> {
    let clue = results.models.get("clue")?.sampled.mrr;
    // (A best of zero has no ratio.)
    let best = TASK_SPECIFIC
        .iter()
        .filter_map(|m| results.models.get(*m))
        .map(|r| r.sampled.mrr)
        .fold(None, |b: Option<f64>, x| Some(b.map_or(x, |b| b.max(x))))?;
    (best > 0.0).then(|| clue / best - 1.0)
}

/// The rows as a markdown table.
pub fn table(rows: &[Similarity]) -> String {
    let mut md = String::from(
        "| task | Kendall τ-b (shared tokens' counts) | shared tokens | task tokens covered | CLUE vs best task-specific (sampled MRR) |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} % | {} |\n",
            r.task,
            r.tau.map_or("–".into(), |t| format!("{t:.3}")),
            r.tokens,
            100.0 * r.coverage,
            r.clue_gain
                .map_or("–".into(), |g| format!("{:+.1} %", 100.0 * g))
        ));
    }
    md
}
