//! The options of `clue prepare` and what it records about dropped users: the part of a prepare
//! run that its manifest keeps (so `store` needs nothing from `prepare`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{ClueError, Result};

/// The pretraining objective: what makes a user's positive pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// CLUE (paper eq. 4): the user's sequences in two different services.
    #[default]
    CrossService,
    /// The paper's SimCLR baseline: two random augmentations of one service's sequence
    /// (`data::augment`); needs only one service.
    Simclr,
}

impl Objective {
    /// The fewest services a prepared dataset needs for this objective.
    pub fn min_services(self) -> usize {
        match self {
            Objective::CrossService => 2,
            Objective::Simclr => 1,
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Objective::CrossService => "cross-service",
            Objective::Simclr => "simclr",
        })
    }
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cross-service" => Ok(Objective::CrossService),
            "simclr" => Ok(Objective::Simclr),
            other => Err(format!(
                "unknown objective `{other}`: use cross-service or simclr"
            )),
        }
    }
}

/// Options of `clue prepare` (also the `[prepare]` table of a config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrepareOptions {
    /// Most recent items kept per user and service (paper: 512).
    pub max_items: usize,
    /// Tokens per item, service prefix included (paper: 32).
    pub max_item_tokens: usize,
    /// Users with fewer distinct behaviours than this in any service are dropped.
    pub min_behaviors: usize,
    /// BPE vocabulary size; `None` picks one from the number of distinct texts.
    pub vocab_size: Option<usize>,
    /// Use this `tokenizer.json` instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// Services to keep (at least two; one for `simclr`); `None` keeps every service in the logs.
    pub services: Option<Vec<String>>,
    /// Skip and count bad rows instead of stopping at the first.
    pub skip_bad_rows: bool,
    /// Fractions of users for validation and test (the rest trains).
    pub valid_fraction: f64,
    pub test_fraction: f64,
    /// Seed of the user split.
    pub seed: u64,
    /// The objective the data is prepared for: `simclr` accepts a single service.
    pub objective: Objective,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            max_items: 512,
            max_item_tokens: 32,
            min_behaviors: 2,
            vocab_size: None,
            tokenizer: None,
            services: None,
            skip_bad_rows: false,
            valid_fraction: 0.1,
            test_fraction: 0.1,
            seed: 0,
            objective: Objective::CrossService,
        }
    }
}

/// The largest BPE vocabulary `clue prepare` trains.
pub const MAX_VOCAB_SIZE: usize = 1 << 20;
/// The longest sequence of items, or of tokens per item, `clue prepare` stores.
pub const MAX_SEQUENCE: usize = 1 << 16;

/// The first name `names` holds twice.
pub fn repeated(names: &[String]) -> Option<&str> {
    names
        .iter()
        .enumerate()
        .find(|(i, n)| names[..*i].contains(n))
        .map(|(_, n)| n.as_str())
}

impl PrepareOptions {
    pub fn validate(&self) -> Result<()> {
        let fail = |m: &str, h: &str| Err(ClueError::config(m, h));
        if self.max_items == 0 || self.max_item_tokens < 2 {
            return fail(
                "max_items must be ≥ 1 and max_item_tokens ≥ 2",
                "an item needs its service prefix and at least one text token",
            );
        }
        if self.min_behaviors == 0 || self.min_behaviors > self.max_items {
            return fail(
                "min_behaviors must be between 1 and max_items",
                "lower --min-behaviors or raise --max-items",
            );
        }
        let (v, t) = (self.valid_fraction, self.test_fraction);
        if !(0.0..1.0).contains(&v) || !(0.0..1.0).contains(&t) || v + t >= 1.0 {
            return fail(
                "valid and test fractions must be in [0, 1) and leave users for training",
                "e.g. --valid-fraction 0.1 --test-fraction 0.1",
            );
        }
        if self
            .services
            .as_ref()
            .is_some_and(|s| s.len() < self.objective.min_services())
        {
            return fail(
                "the cross-service objective needs at least two services",
                "name two or more with --services a,b, or prepare one service for SimCLR with --objective simclr",
            );
        }
        if let Some(s) = self.services.as_ref().and_then(|s| repeated(s)) {
            return fail(
                &format!("service `{s}` is named twice in --services"),
                "name each service once",
            );
        }
        if self.vocab_size.is_some_and(|v| v > MAX_VOCAB_SIZE) {
            return fail(
                &format!("vocab_size must be at most {MAX_VOCAB_SIZE}"),
                "the paper uses 50,257; larger tables cost memory without better items",
            );
        }
        if self.max_items > MAX_SEQUENCE || self.max_item_tokens > MAX_SEQUENCE {
            return fail(
                &format!("max_items and max_item_tokens must be at most {MAX_SEQUENCE}"),
                "the paper uses 512 items of 32 tokens",
            );
        }
        if self.vocab_size.is_some_and(|v| v < 300) {
            return fail(
                "vocab_size must be at least 300",
                "a byte-level BPE needs 256 byte tokens plus merges",
            );
        }
        Ok(())
    }
}

/// Why users were dropped, and how many.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub missing_service: u64,
    pub too_few_behaviors: u64,
}
