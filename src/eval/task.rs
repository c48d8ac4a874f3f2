//! The task file (TOML): where a task's interactions, items and user features are, its split,
//! its negatives, its probe settings and the models to compare.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ClueError, Result};
use crate::eval::train::ProbeConfig;

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
    /// `source = "history"`: besides their targets, each training user contributes up to this
    /// many (history prefix → next item) pairs, the most recent ones, as sequential recommenders
    /// train; every trained model learns from the same pairs. 0: targets only.
    #[serde(default)]
    pub prefixes: usize,
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

/// Every model `clue eval` knows, in report order: task-specific (trained from scratch on the
/// task), task-agnostic (user features into the probe), hybrid, non-learned baselines.
pub const MODELS: [&str; 10] = [
    "bst",
    "lightgcn",
    "deepfm",
    "clue",
    "text-mean",
    "untrained",
    "noise",
    "hybrid",
    "toppop",
    "random",
];

/// Models trained from scratch on the task (paper Table 3, left).
pub const TASK_SPECIFIC: [&str; 3] = ["bst", "lightgcn", "deepfm"];

/// Models whose user features go into the probe (paper Table 3, middle).
pub const PROBED: [&str; 4] = ["clue", "text-mean", "untrained", "noise"];

/// CLUE features in the user tower of a task-specific model (paper Table 3, right).
pub const HYBRID: &str = "hybrid";

/// Non-learned baselines.
pub const BASELINES: [&str; 2] = ["toppop", "random"];

/// `[model.bst]` in a task file. The paper: 4 layers, hidden 128, 4 heads; smaller by default so
/// that a 2-core CPU trains it in minutes, and without dropout (early stopping regularises). The
/// encoder is clue's own Transformer block stack (the Service Transformer's, with its CPU fast
/// paths).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BstConfig {
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    /// The most recent feature items read per user.
    pub max_len: usize,
    pub dropout: f64,
    pub lr: f64,
}

impl Default for BstConfig {
    fn default() -> Self {
        Self {
            dim: 64,
            layers: 2,
            heads: 4,
            max_len: 50,
            dropout: 0.0,
            lr: 1e-3,
        }
    }
}

/// `[model.lightgcn]` in a task file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LightGcnConfig {
    pub dim: usize,
    /// Propagation steps.
    pub layers: usize,
    pub lr: f64,
}

impl Default for LightGcnConfig {
    fn default() -> Self {
        Self {
            dim: 64,
            layers: 2,
            lr: 1e-2,
        }
    }
}

/// `[model.deepfm]` in a task file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeepFmConfig {
    /// Width of every field's vector (the FM factors).
    pub dim: usize,
    /// Width of the deep part's two hidden layers.
    pub hidden: usize,
    pub lr: f64,
}

impl Default for DeepFmConfig {
    fn default() -> Self {
        Self {
            dim: 32,
            hidden: 128,
            lr: 1e-3,
        }
    }
}

/// The task-specific model whose user tower `hybrid` adds CLUE features to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HybridBase {
    /// The better of `bst` and `lightgcn` by mean validation MRR in this evaluation, as the
    /// paper picks per task (both must be among the models).
    #[default]
    Auto,
    Bst,
    Lightgcn,
}

impl HybridBase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Bst => "bst",
            Self::Lightgcn => "lightgcn",
        }
    }
}

/// `[model.hybrid]` in a task file: the base's own table gives its hyperparameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HybridConfig {
    pub base: HybridBase,
}

/// Hyperparameters of the trained models (`[model.bst]`, `[model.lightgcn]`, `[model.deepfm]`,
/// `[model.hybrid]`); each key has a default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelTables {
    pub bst: BstConfig,
    pub lightgcn: LightGcnConfig,
    pub deepfm: DeepFmConfig,
    pub hybrid: HybridConfig,
}

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
    /// Models to compare (default: all of [`MODELS`]).
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    #[serde(default)]
    pub model: ModelTables,
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

    /// Refuse what cannot work, naming `path` (the task file) and the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
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
            Source::Logs if f.prefixes > 0 => {
                return bad(
                    "`prefixes` needs source = \"history\" (under source = \"logs\" every \
                     interaction in the task's service is already a target)"
                        .into(),
                    "remove `prefixes` from [features]",
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
                &format!("models are {}", MODELS.join(", ")),
            );
        }
        if self.models.is_empty() {
            return bad(
                "`models` is empty".into(),
                "list at least one model, or remove the key for all",
            );
        }
        if let Some(m) = self
            .models
            .iter()
            .enumerate()
            .find(|(i, m)| self.models[..*i].contains(m))
        {
            return bad(
                format!("model `{}` is listed twice", m.1),
                "list each model once",
            );
        }
        let listed = |m: &str| self.models.iter().any(|x| x == m);
        if listed(HYBRID)
            && self.model.hybrid.base == HybridBase::Auto
            && !(listed("bst") && listed("lightgcn"))
        {
            return bad(
                "`hybrid` with [model.hybrid] base = \"auto\" picks the better of bst and \
                 lightgcn on validation, but they are not both among the models"
                    .into(),
                "add \"bst\" and \"lightgcn\" to the models, or set [model.hybrid] base = \"bst\" \
                 or \"lightgcn\"",
            );
        }
        if let Err(m) = self.model.check() {
            return bad(m, "fix the value or remove the key for its default");
        }
        if self.negatives.count == 0 {
            return bad(
                "[negatives] count = 0: every ranking would hold the positive alone".into(),
                "use e.g. count = 100 (the paper's sampled metrics), or remove the table",
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

impl ModelTables {
    /// Values that cannot train, named as `[model.NAME] key`.
    fn check(&self) -> std::result::Result<(), String> {
        let positive = |table: &str, key: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(format!("[model.{table}] {key} = {v} must be > 0"))
            }
        };
        let (b, l, d) = (&self.bst, &self.lightgcn, &self.deepfm);
        for (table, key, v) in [
            ("bst", "dim", b.dim as f64),
            ("bst", "layers", b.layers as f64),
            ("bst", "heads", b.heads as f64),
            ("bst", "max_len", b.max_len as f64),
            ("bst", "lr", b.lr),
            ("lightgcn", "dim", l.dim as f64),
            ("lightgcn", "lr", l.lr),
            ("deepfm", "dim", d.dim as f64),
            ("deepfm", "hidden", d.hidden as f64),
            ("deepfm", "lr", d.lr),
        ] {
            positive(table, key, v)?;
        }
        if b.dim % b.heads != 0 {
            return Err(format!(
                "[model.bst] heads = {} does not divide dim = {}",
                b.heads, b.dim
            ));
        }
        if !(0.0..1.0).contains(&b.dropout) {
            return Err(format!(
                "[model.bst] dropout = {} must be in [0, 1)",
                b.dropout
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of a task file with `extra` appended to a valid one.
    fn refused(extra: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let text = format!(
            "name = \"t\"\ninteractions = \"i.csv\"\nitems = \"t.csv\"\n{extra}\n\
             [features]\nsource = \"history\"\nservice = \"x\"\n"
        );
        std::fs::write(&path, text).unwrap();
        let e = Task::load(&path).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("t.toml"), "the file is named: {e}");
        e
    }

    #[test]
    fn model_lists_and_tables_that_cannot_work_are_refused_naming_the_key() {
        assert!(refused("models = [\"xgboost\"]").contains("unknown model `xgboost`"));
        assert!(refused("models = []").contains("`models` is empty"));
        assert!(refused("models = [\"bst\", \"bst\"]").contains("`bst` is listed twice"));
        for (table, needle) in [
            ("[model.bst]\nlayers = 0", "[model.bst] layers = 0"),
            ("[model.bst]\nlr = -0.1", "[model.bst] lr = -0.1"),
            (
                "[model.bst]\ndim = 30\nheads = 4",
                "heads = 4 does not divide dim = 30",
            ),
            ("[model.bst]\ndropout = 1.0", "dropout = 1"),
            ("[model.lightgcn]\ndim = 0", "[model.lightgcn] dim = 0"),
            ("[model.deepfm]\nhidden = 0", "[model.deepfm] hidden = 0"),
            ("[model.deepfm]\nwidth = 8", "unknown field `width`"),
            ("[model.gbdt]\ndim = 8", "unknown field `gbdt`"),
            (
                "[model.hybrid]\nbase = \"deepfm\"",
                "unknown variant `deepfm`",
            ),
        ] {
            let e = refused(&format!("models = [\"bst\"]\n{table}"));
            assert!(e.contains(needle), "{table}: {e}");
        }
        let e = refused("models = [\"bst\", \"hybrid\"]");
        assert!(e.contains("not both among the models"), "{e}");
        assert!(e.contains("base = \"bst\""), "the fix is named: {e}");
        let chosen = "models = [\"hybrid\"]\n[model.hybrid]\nbase = \"lightgcn\"";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let ok = format!(
            "name = \"t\"\ninteractions = \"i.csv\"\nitems = \"t.csv\"\n{chosen}\n\
             [features]\nsource = \"history\"\nservice = \"x\"\nprefixes = 5\n"
        );
        std::fs::write(&path, ok).unwrap();
        let t = Task::load(&path).unwrap();
        assert_eq!(
            (t.model.hybrid.base, t.features.prefixes),
            (HybridBase::Lightgcn, 5)
        );
    }

    #[test]
    fn prefixes_are_refused_under_logs_features() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let text = "name = \"t\"\ninteractions = \"i.csv\"\nitems = \"t.csv\"\n\
             [features]\nsource = \"logs\"\nlogs = [\"l\"]\nservices = [\"a\"]\nprefixes = 3\n";
        std::fs::write(&path, text).unwrap();
        let e = Task::load(&path).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("`prefixes` needs source = \"history\""), "{e}");
    }
}
