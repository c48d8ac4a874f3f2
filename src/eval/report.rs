//! The report of `clue eval`: `results.json` (per-model metrics, counts, hashes) and its
//! markdown table.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::eval::metrics::Metrics;
use crate::eval::task::{BASELINES, HYBRID, MODELS, TASK_SPECIFIC, Task};
use crate::eval::task_data::TaskCounts;

/// Sampled and full-catalogue metrics of one model on one split.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ModelResult {
    pub sampled: Metrics,
    pub full: Metrics,
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
    /// The bundle hash of each `--compare` run, by its name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub compared_bundle_sha256: BTreeMap<String, String>,
    pub seeds: Vec<u64>,
    /// Test-split metrics; the mean over seeds for the probe models.
    pub models: BTreeMap<String, ModelResult>,
    /// Standard deviation over seeds (probe models, `--seeds` > 1).
    pub std: BTreeMap<String, ModelResult>,
    /// Best validation MRR (sampled) and its epoch, per probe model and seed.
    pub validation: BTreeMap<String, Vec<(f64, usize)>>,
    pub leakage_rule: String,
    /// Test metrics within each user group (paper Table 4; mean over seeds).
    #[serde(default)]
    pub groups: BTreeMap<String, GroupResult>,
    /// What each model cost (paper Table 2).
    #[serde(default)]
    pub costs: BTreeMap<String, Cost>,
    /// The task-specific model `hybrid` added CLUE features to, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hybrid_base: Option<String>,
}

/// One user group's test users, positives and per-model metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupResult {
    /// The group's rule, for the report.
    pub rule: String,
    pub users: usize,
    pub positives: usize,
    pub models: BTreeMap<String, ModelResult>,
}

/// A model's size and training cost.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Cost {
    /// Trained parameters (the probe's for the probe models; 0 for non-learned baselines).
    pub parameters: usize,
    /// Wall time per seed: features (encoding included), training and scoring.
    pub seconds: f64,
    /// This process's peak resident memory while the model ran (Linux; NaN elsewhere).
    pub peak_rss_mib: f64,
}

/// Which column of the paper's Table 3 a model belongs to, in table order: task-specific,
/// task-agnostic (the `--compare` runs among them), hybrid, baselines.
pub fn kind(model: &str) -> (usize, &'static str) {
    if TASK_SPECIFIC.contains(&model) {
        (0, "task-specific")
    } else if model == HYBRID {
        (2, "hybrid")
    } else if BASELINES.contains(&model) {
        (3, "baseline")
    } else {
        (1, "task-agnostic")
    }
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
            "| kind | model | HR@1 | HR@10 | NDCG@10 | MRR | full HR@10 | full NDCG@10 | full MRR |\n",
        );
        s.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for name in self.in_table_order() {
            let r = &self.models[name];
            let sd = self.std.get(name);
            let cell = |v: f64, f: &dyn Fn(&ModelResult) -> f64| match sd {
                Some(d) => format!("{:.4} ± {:.4}", v, f(d)),
                None => format!("{v:.4}"),
            };
            s.push_str(&format!(
                "| {} | {name} | {} | {} | {} | {} | {} | {} | {} |\n",
                kind(name).1,
                cell(r.sampled.hr1, &|d| d.sampled.hr1),
                cell(r.sampled.hr10, &|d| d.sampled.hr10),
                cell(r.sampled.ndcg10, &|d| d.sampled.ndcg10),
                cell(r.sampled.mrr, &|d| d.sampled.mrr),
                cell(r.full.hr10, &|d| d.full.hr10),
                cell(r.full.ndcg10, &|d| d.full.ndcg10),
                cell(r.full.mrr, &|d| d.full.mrr),
            ));
        }
        if let Some(base) = &self.hybrid_base {
            s.push_str(&format!("\nhybrid: {base}\n"));
        }
        s.push_str(&self.groups_markdown());
        s.push_str(&self.costs_markdown());
        s.push_str(&format!(
            "\nsplit {} · negatives {} · model {} · seeds {:?}\n",
            &self.split_sha256[..12],
            &self.negatives_sha256[..12],
            &self.model_bundle_sha256[..12],
            self.seeds
        ));
        for (name, hash) in &self.compared_bundle_sha256 {
            s.push_str(&format!("{name}: model {}\n", &hash[..12.min(hash.len())]));
        }
        s
    }
}

impl EvalResults {
    /// The models, in [`table_order`].
    fn in_table_order(&self) -> Vec<&str> {
        table_order(self.models.keys().map(String::as_str).collect())
    }

    /// Sampled MRR of every model within each user group (Table 4).
    fn groups_markdown(&self) -> String {
        if self.groups.is_empty() {
            return String::new();
        }
        let names = self.in_table_order();
        let mut s =
            String::from("\n#### MRR by user group (test users)\n\n| group | users | positives |");
        for n in &names {
            s.push_str(&format!(" {n} |"));
        }
        s.push_str(&format!("\n|---|---|---|{}\n", "---|".repeat(names.len())));
        for (g, r) in &self.groups {
            s.push_str(&format!(
                "| {g} ({}) | {} | {} |",
                r.rule, r.users, r.positives
            ));
            for n in &names {
                match r.models.get(*n) {
                    Some(m) => s.push_str(&format!(" {:.4} |", m.sampled.mrr)),
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        s
    }

    /// Parameters, time and memory of every model (Table 2).
    fn costs_markdown(&self) -> String {
        if self.costs.is_empty() {
            return String::new();
        }
        let mut s = String::from(
            "\n#### Cost\n\n| model | parameters | seconds per seed | peak RSS MiB |\n|---|---|---|---|\n",
        );
        for n in self.in_table_order() {
            if let Some(c) = self.costs.get(n) {
                s.push_str(&format!(
                    "| {n} | {} | {:.1} | {:.0} |\n",
                    c.parameters, c.seconds, c.peak_rss_mib
                ));
            }
        }
        s
    }
}

/// Model names as Table 3 orders them: by [`kind`], then as [`MODELS`] lists them; names
/// outside it (the `--compare` runs) after the built-in task-agnostic models, in the given order.
fn table_order(mut names: Vec<&str>) -> Vec<&str> {
    names.sort_by_key(|m| {
        let listed = MODELS.iter().position(|x| x == m);
        (kind(m).0, listed.unwrap_or(MODELS.len()))
    });
    names
}

/// Mean and standard deviation over runs (seeds) of every metric; `n` is the first run's.
pub fn mean_std(runs: &[ModelResult]) -> (ModelResult, ModelResult) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_list_task_specific_agnostic_compared_hybrid_then_baselines() {
        let names = vec![
            "random", "hybrid", "again", "clue", "toppop", "noise", "bst", "simclr",
        ];
        assert_eq!(
            table_order(names),
            [
                "bst", "clue", "noise", "again", "simclr", "hybrid", "toppop", "random"
            ]
        );
    }

    #[test]
    fn mean_std_is_over_seeds_with_population_sd() {
        let run = |mrr: f64| ModelResult {
            sampled: Metrics {
                mrr,
                n: 7,
                ..Default::default()
            },
            full: Metrics {
                hr1: mrr / 2.0,
                ..Default::default()
            },
        };
        let (mean, sd) = mean_std(&[run(0.2), run(0.4)]);
        assert!((mean.sampled.mrr - 0.3).abs() < 1e-12);
        assert!((sd.sampled.mrr - 0.1).abs() < 1e-12);
        assert!((mean.full.hr1 - 0.15).abs() < 1e-12);
        assert!((sd.full.hr1 - 0.05).abs() < 1e-12);
        assert_eq!((mean.sampled.n, sd.sampled.n), (7, 7));
    }
}
