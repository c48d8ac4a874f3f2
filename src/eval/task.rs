//! The task file (TOML): where a task's interactions, items and user features are, its split,
//! its negatives, its probe settings and the models to compare.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ClueError, Result};
use crate::eval::probe::ProbeConfig;

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
