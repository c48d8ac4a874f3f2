//! A run's configuration: `[model]` and `[train]` tables of a TOML file in `config/`, with
//! `--set key=value` overrides. The resolved config is saved in every run directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::augment::Views;
use crate::data::options::Objective;
use crate::error::{ClueError, Result};
use crate::model::ModelConfig;
use crate::train::adamw::ClueAdamW;

/// Optimisation settings (paper §2.2 defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub epochs: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// Fraction of all steps spent warming up linearly.
    pub warmup_fraction: f64,
    /// Final learning rate as a fraction of `lr` (cosine decay).
    pub final_lr_fraction: f64,
    /// Global gradient-norm clipping.
    pub grad_clip_norm: f64,
    pub seed: u64,
    /// Data-loading threads.
    pub workers: usize,
    /// Also checkpoint (and validate) every this many steps; 0 = at the end of each epoch only.
    pub checkpoint_every: usize,
    /// Train on this fraction of the training users (nested subsets: 0.1 ⊂ 0.5 ⊂ 1; paper
    /// Figure 3).
    pub data_fraction: f64,
    /// Reshuffle the users every epoch (the paper); `false` repeats the first epoch's batches.
    pub shuffle: bool,
    /// Batch size of validation; 0 = `batch_size`. InfoNCE depends on it (chance is ln B), so
    /// a sweep fixes it to compare runs trained with different batches.
    pub eval_batch_size: usize,
    /// `cross-service` (CLUE: a user's two services are the positive pair) or `simclr` (two
    /// augmented views of one service; also trains on single-service data).
    pub objective: Objective,
    /// GradCache: encode each batch in chunks of this many users, so a step's memory grows
    /// with the chunk, not the batch (without dropout the plain step's loss and gradient; with
    /// it, each chunk draws its own masks); ~1.1–1.2× the time on `small`; 0 = off.
    pub grad_cache_chunk: usize,
}

impl TrainConfig {
    /// The seed of the SimCLR views; `None` under the cross-service objective.
    pub fn views_seed(&self) -> Option<u64> {
        (self.objective == Objective::Simclr).then_some(self.seed)
    }

    /// The views of `round` under the SimCLR objective.
    pub fn views(&self, round: u64) -> Option<Views> {
        self.views_seed().map(|seed| Views::new(seed, round))
    }

    /// The batch size of validation and scoring.
    pub fn eval_batch(&self) -> usize {
        match self.eval_batch_size {
            0 => self.batch_size,
            n => n,
        }
    }

    /// AdamW with this config's moments, epsilon and weight decay (the learning rate comes
    /// from the schedule at each step).
    pub fn optimizer(&self) -> ClueAdamW {
        let (b1, b2, eps) = (self.beta1 as f32, self.beta2 as f32, self.epsilon as f32);
        ClueAdamW::new(b1, b2, eps, self.weight_decay as f32)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            epochs: 8,
            lr: 5e-4,
            beta1: 0.9,
            beta2: 0.98,
            epsilon: 1e-6,
            weight_decay: 0.1,
            warmup_fraction: 0.01,
            final_lr_fraction: 0.1,
            grad_clip_norm: 0.01,
            seed: 42,
            workers: 2,
            checkpoint_every: 0,
            data_fraction: 1.0,
            shuffle: true,
            eval_batch_size: 0,
            objective: Objective::CrossService,
            grad_cache_chunk: 0,
        }
    }
}

/// Everything `clue fit` needs besides the data.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
}

impl RunConfig {
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            ClueError::bad_file(
                origin,
                e.to_string(),
                "see config/tiny.toml for the keys a config takes",
            )
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ClueError::io(path, e))?;
        Self::from_toml(&text, path)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Apply `key=value` overrides such as `train.lr=1e-3` or `model.d_model=128`.
    pub fn with_overrides(&self, sets: &[String]) -> Result<Self> {
        let mut doc: toml::Table = toml::from_str(&self.to_toml()).expect("round trip");
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| {
                ClueError::config(
                    format!("--set `{set}` is not key=value"),
                    "e.g. --set train.lr=1e-3",
                )
            })?;
            let (table, field) = key.trim().split_once('.').ok_or_else(|| {
                ClueError::config(
                    format!("--set key `{key}` needs a table"),
                    "e.g. model.d_model or train.epochs",
                )
            })?;
            let parsed: toml::Value =
                toml::from_str::<toml::Table>(&format!("v = {}", value.trim()))
                    .map(|mut t| t.remove("v").expect("v"))
                    .unwrap_or_else(|_| toml::Value::String(value.trim().to_string()));
            let t = doc
                .get_mut(table)
                .and_then(|t| t.as_table_mut())
                .ok_or_else(|| {
                    ClueError::config(
                        format!("no config table `{table}`"),
                        "tables are model and train",
                    )
                })?;
            if !t.contains_key(field) {
                return Err(ClueError::config(
                    format!("no config key `{key}`"),
                    "see config/tiny.toml for the keys",
                ));
            }
            t.insert(field.to_string(), parsed);
        }
        toml::from_str(&toml::to_string(&doc).expect("table serialises")).map_err(|e| {
            ClueError::config(
                format!("--set gives an invalid config: {e}"),
                "check the value's type",
            )
        })
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let t = &self.train;
        if t.batch_size < 2 {
            return Err(ClueError::config(
                "train.batch_size must be at least 2",
                "in-batch negatives need other users",
            ));
        }
        if t.epochs == 0 || !(t.lr > 0.0 && t.lr <= 1.0) || t.grad_clip_norm <= 0.0 {
            return Err(ClueError::config(
                "train.epochs, train.lr (in (0, 1]) and train.grad_clip_norm must be positive",
                "see config/tiny.toml",
            ));
        }
        if !(t.data_fraction > 0.0 && t.data_fraction <= 1.0) {
            return Err(ClueError::config(
                format!(
                    "train.data_fraction = {} is outside (0, 1]",
                    t.data_fraction
                ),
                "e.g. 0.1 trains on a tenth of the training users",
            ));
        }
        if t.grad_cache_chunk >= t.batch_size {
            return Err(ClueError::config(
                format!(
                    "train.grad_cache_chunk = {} is not smaller than train.batch_size = {}",
                    t.grad_cache_chunk, t.batch_size
                ),
                "use a chunk smaller than the batch (e.g. a quarter of it), or 0 to turn GradCache off",
            ));
        }
        if t.eval_batch_size == 1 {
            return Err(ClueError::config(
                "train.eval_batch_size = 1 leaves no negatives",
                "use 0 (the training batch size) or at least 2",
            ));
        }
        if !(0.0..1.0).contains(&t.warmup_fraction) || !(0.0..=1.0).contains(&t.final_lr_fraction) {
            return Err(ClueError::config(
                "train.warmup_fraction must be in [0, 1) and final_lr_fraction in [0, 1]",
                "paper: 0.01 and 0.1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_change_only_the_named_keys_and_reject_unknown_ones() {
        let c = RunConfig::default();
        let d = c
            .with_overrides(&["train.lr=0.001".into(), "model.d_model=128".into()])
            .unwrap();
        assert_eq!(d.train.lr, 0.001);
        assert_eq!(d.model.d_model, 128);
        assert_eq!(d.train.batch_size, c.train.batch_size);
        assert!(c.with_overrides(&["train.lrr=1".into()]).is_err());
        assert!(c.with_overrides(&["lr=1".into()]).is_err());
    }

    #[test]
    fn invalid_shapes_are_refused_before_any_work() {
        let mut c = RunConfig::default();
        c.model.heads = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("does not divide"), "{e}");
        let mut c = RunConfig::default();
        c.model.item_layers = 0;
        assert!(c.validate().is_err());
        let mut c = RunConfig::default();
        c.train.batch_size = 1;
        assert!(c.validate().is_err());
        let mut c = RunConfig::default();
        for chunk in [c.train.batch_size, c.train.batch_size + 1] {
            c.train.grad_cache_chunk = chunk;
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains("grad_cache_chunk") && e.contains("not smaller"),
                "{e}"
            );
        }
        c.train.grad_cache_chunk = c.train.batch_size / 4;
        assert!(c.validate().is_ok());
        for f in [0.0, 1.5, f64::NAN] {
            let mut c = RunConfig::default();
            c.train.data_fraction = f;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("data_fraction"), "{e}");
        }
    }
}
