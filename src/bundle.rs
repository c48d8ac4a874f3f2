//! A trained model on disk: the self-contained bundle `clue fit` writes under `<run>/model/` and
//! `clue score`, `clue embed` and `clue eval` load.
//!
//! | file | what |
//! |---|---|
//! | `bundle.json` | [`BundleInfo`]: services, embedding width, dataset hash, compute, validation |
//! | `model.mpk` | the weights, Burn's full-precision record (what [`Bundle::load`] reads) |
//! | `model.safetensors` | the same weights for Python |
//! | `config.toml` | the resolved run config |
//! | `tokenizer.json` | the item tokenizer of the training data |

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn_store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::store::{self, hex, publish_dir, sha256_file, temp_dir_beside};
use crate::data::tokenize::ItemTokenizer;
use crate::error::{ClueError, Result};
use crate::model::init::Init;
use crate::model::{ClueModel, ParamCounts};
use crate::train::config::RunConfig;

/// The bundle's directory inside a run directory.
pub const BUNDLE_DIR: &str = "model";
/// The file that marks a complete bundle (written last).
pub const BUNDLE_INFO: &str = "bundle.json";
/// The resolved run config inside the bundle.
pub const BUNDLE_CONFIG: &str = "config.toml";
/// The weights file [`Bundle::load`] reads (without its `.mpk` extension, as Burn's recorder
/// wants it).
const WEIGHTS: &str = "model";

/// Loss and in-batch retrieval of one split, measured with fixed batches after training.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SplitScore {
    pub loss: f64,
    pub top1_ab: f64,
    pub top1_ba: f64,
    pub top10_ab: Option<f64>,
    pub users: usize,
    pub batch_size: usize,
}

/// `bundle.json`: everything `clue embed` needs to know besides the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleInfo {
    pub clue_version: String,
    pub services: Vec<String>,
    pub embedding_dim: usize,
    pub dataset_manifest_sha256: String,
    pub params: ParamCounts,
    pub steps: usize,
    pub flops: f64,
    pub pf_days: f64,
    pub valid: SplitScore,
}

/// Read a JSON file written by clue.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ClueError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| ClueError::bad_file(path, e.to_string(), "the run directory is damaged"))
}

/// Write the self-contained model bundle atomically: weights (Burn record and safetensors),
/// resolved config, tokenizer and `bundle.json`.
pub fn save_bundle<B: Backend>(
    model: &ClueModel<B>,
    config: &RunConfig,
    info: &BundleInfo,
    tokenizer: &Path,
    out: &Path,
) -> Result<()> {
    let tmp = temp_dir_beside(out)?;
    let result = (|| {
        let weights = tmp.join(format!("{WEIGHTS}.mpk"));
        model
            .clone()
            .save_file(
                tmp.join(WEIGHTS),
                &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
            )
            .map_err(|e| ClueError::io(&weights, std::io::Error::other(e.to_string())))?;
        let st = tmp.join("model.safetensors");
        model
            // One metadata entry: Burn's default set is a hash map, written in a different order
            // by every process, so identical weights gave different files.
            .save_into(
                &mut SafetensorsStore::from_file(&st)
                    .overwrite(true)
                    .clear_metadata()
                    .metadata("producer", format!("clue {}", env!("CARGO_PKG_VERSION"))),
            )
            .map_err(|e| ClueError::io(&st, std::io::Error::other(e.to_string())))?;
        std::fs::write(tmp.join(BUNDLE_CONFIG), config.to_toml())
            .map_err(|e| ClueError::io(tmp.join(BUNDLE_CONFIG), e))?;
        std::fs::copy(tokenizer, tmp.join(store::TOKENIZER))
            .map_err(|e| ClueError::io(tokenizer, e))?;
        std::fs::write(
            tmp.join(BUNDLE_INFO),
            serde_json::to_string_pretty(info).expect("json") + "\n",
        )
        .map_err(|e| ClueError::io(tmp.join(BUNDLE_INFO), e))?;
        publish_dir(&tmp, out, BUNDLE_INFO)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The bundle directory of a run directory (or the bundle itself).
pub fn bundle_dir(model: &Path) -> PathBuf {
    if model.join(BUNDLE_DIR).join(BUNDLE_INFO).exists() {
        model.join(BUNDLE_DIR)
    } else {
        model.to_path_buf()
    }
}

/// A bundle loaded onto a device.
pub struct Bundle<B: Backend> {
    pub model: ClueModel<B>,
    pub config: RunConfig,
    pub info: BundleInfo,
    pub tokenizer: ItemTokenizer,
    /// SHA-256 of `bundle.json` and the weights file that was loaded, together: names the exact
    /// model behind every embedding and result.
    pub sha256: String,
}

impl<B: Backend> Bundle<B> {
    /// Load the bundle of `model` (a run directory or the bundle itself) onto `device`.
    pub fn load(model: &Path, device: &B::Device) -> Result<Self> {
        let dir = bundle_dir(model);
        let info_path = dir.join(BUNDLE_INFO);
        if !info_path.exists() {
            return Err(ClueError::bad_file(
                model,
                "no model bundle here (bundle.json missing)",
                "pass the run directory written by `clue fit` (e.g. runs/tiny)",
            ));
        }
        let info: BundleInfo = std::fs::read_to_string(&info_path)
            .map_err(|e| ClueError::io(&info_path, e))
            .and_then(|text| {
                serde_json::from_str(&text).map_err(|e| {
                    ClueError::bad_file(
                        &info_path,
                        e.to_string(),
                        "the bundle is damaged: train again",
                    )
                })
            })?;
        let config = RunConfig::load(&dir.join(BUNDLE_CONFIG))?;
        let weights = dir.join(format!("{WEIGHTS}.mpk"));
        let model = ClueModel::<B>::new(&config.model, &mut Init::new(0, device))
            .load_file(
                dir.join(WEIGHTS),
                &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
                device,
            )
            .map_err(|e| {
                ClueError::bad_file(
                    &weights,
                    e.to_string(),
                    "the bundle is damaged: train again",
                )
            })?;
        let tokenizer = ItemTokenizer::load(&dir.join(store::TOKENIZER), &info.services)?;
        let sha256 = hex(&Sha256::digest(
            format!("{}{}", sha256_file(&info_path)?, sha256_file(&weights)?).as_bytes(),
        ));
        Ok(Self {
            model,
            config,
            info,
            tokenizer,
            sha256,
        })
    }
}
