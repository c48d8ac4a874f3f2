//! `clue embed`: frozen user embeddings from a model bundle and behaviour logs.
//!
//! Every distinct item text goes through the Item Transformer **once** (the item-embedding
//! cache); then only the Service Transformer runs per user and service, on batches the training
//! batcher lays out ([`UserBatcher::item_slots`]). A user's embedding is the concatenation of
//! their per-service embeddings in the recorded service order (paper §3.2); a service the user
//! has no behaviour in gives zeros there and `0` in the user's mask column. The logs are read by
//! the same reader as `clue prepare` ([`crate::data::history`]); the files are written by
//! [`format`].

pub mod format;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;

use crate::bundle::{Bundle, BundleInfo};
use crate::data::batcher::{UserBatcher, slot_tokens};
use crate::data::history::{Histories, HistoryBuilder, read_histories};
use crate::data::log::{self, list_log_files};
use crate::data::options::repeated;
use crate::data::store::lock_output;
use crate::data::tokenize::ItemTokenizer;
use crate::error::{ClueError, Result};
use crate::model::init::Init;
use crate::model::{BackendKind, ClueEncoder, ModelConfig};
use crate::ui;
use format::{EmbedManifest, Embeddings};

/// Items per Item Transformer call when filling the item cache.
pub const ITEM_CHUNK: usize = 1024;
/// Users per Service Transformer call (`clue embed --batch-size`, `clue eval`).
pub const USER_BATCH: usize = 256;

/// Item vectors of every item in `tokens`, `chunk` items per call: `[items, d_model]` row-major.
/// Items are encoded shortest first, so each call pads to a length close to its items' own.
pub fn item_vectors<B: Backend>(
    encoder: &ClueEncoder<B>,
    tokens: &[Vec<u32>],
    chunk: usize,
    device: &B::Device,
) -> Vec<f32> {
    let bar = ui::bar(tokens.len() as u64, "items", false);
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| tokens[i].len());
    let mut out = Vec::new();
    for part in order.chunks(chunk.max(1)) {
        let rows: Vec<&[u32]> = part.iter().map(|&i| tokens[i].as_slice()).collect();
        let vectors =
            BackendKind::of::<B>().drive(|| to_vec(encode_item_rows(encoder, &rows, device)));
        let d = vectors.len() / part.len();
        if out.is_empty() {
            out = vec![0f32; tokens.len() * d];
        }
        for (&i, v) in part.iter().zip(vectors.chunks_exact(d)) {
            out[i * d..(i + 1) * d].copy_from_slice(v);
        }
        bar.inc(part.len() as u64);
    }
    bar.finish_and_clear();
    out
}

/// Token ids `[rows, len]` (0 = padding) of items given as token lists, `len` the longest
/// list (at least `min_len` and 1).
fn token_rows<B: Backend>(
    rows: &[&[u32]],
    min_len: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let len = rows
        .iter()
        .map(|r| r.len())
        .max()
        .unwrap_or(0)
        .max(min_len)
        .max(1);
    let mut flat = vec![0i64; rows.len() * len];
    for (r, t) in rows.iter().enumerate() {
        for (j, &id) in t.iter().enumerate() {
            flat[r * len + j] = id as i64;
        }
    }
    Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [rows.len() * len]), device)
        .reshape([rows.len(), len])
}

/// Item vectors `[rows, d_model]` of items given as token ids.
fn encode_item_rows<B: Backend>(
    encoder: &ClueEncoder<B>,
    rows: &[&[u32]],
    device: &B::Device,
) -> Tensor<B, 2> {
    encoder.encode_items(token_rows(rows, 1, device))
}

fn to_vec<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// Where the items of users' histories come from while embedding them: their token ids and,
/// when [`item_vectors`] has run, their cached item vectors (`[items, d_model]`). A stacked
/// model encodes the tokens of each batch's distinct items again without a cache (the uncached
/// path, for comparison); a flat model always reads the tokens.
pub struct ItemSource<'a> {
    pub tokens: &'a [Vec<u32>],
    pub cache: Option<&'a [f32]>,
}

/// Embeddings of `seqs` (item indices per row), `batch` rows per call: `[rows, dim]` row-major.
/// Empty rows give zeros.
pub fn user_vectors<B: Backend>(
    e: &Embedder<B>,
    items: &ItemSource,
    seqs: &[&[u32]],
    batch: usize,
) -> Vec<f32> {
    let dim = e.dim;
    let mut out = vec![0f32; seqs.len() * dim];
    let rows: Vec<usize> = (0..seqs.len()).filter(|&r| !seqs[r].is_empty()).collect();
    let bar = ui::bar(rows.len() as u64, "users", false);
    for part in rows.chunks(batch.max(1)) {
        let part_seqs: Vec<&[u32]> = part.iter().map(|&r| seqs[r]).collect();
        let b = e.batcher.item_slots::<B>(&part_seqs, &e.device);
        let tokens = || {
            let rows: Vec<&[u32]> = b
                .items
                .iter()
                .map(|&i| items.tokens[i as usize].as_slice())
                .collect();
            let min_len = e.batcher.fixed.map_or(1, |f| f.tokens);
            token_rows::<B>(&rows, min_len, &e.device)
        };
        let z = BackendKind::of::<B>().drive(|| {
            to_vec(match (e.encoder.is_flat(), items.cache) {
                (true, _) => {
                    e.encoder
                        .encode_flat(slot_tokens(tokens(), b.slot_item, b.item_pad.dims()))
                }
                (false, Some(cache)) => {
                    let mut v = Vec::with_capacity(b.items.len() * e.d_model);
                    for &item in &b.items {
                        let at = item as usize * e.d_model;
                        v.extend_from_slice(&cache[at..at + e.d_model]);
                    }
                    let vectors = Tensor::<B, 1>::from_data(
                        TensorData::new(v, [b.items.len() * e.d_model]),
                        &e.device,
                    )
                    .reshape([b.items.len(), e.d_model]);
                    e.encoder.encode_users(vectors, b.slot_row, b.item_pad)
                }
                (false, None) => {
                    let vectors = e.encoder.encode_items(tokens());
                    e.encoder.encode_users(vectors, b.slot_row, b.item_pad)
                }
            })
        });
        for (i, &r) in part.iter().enumerate() {
            out[r * dim..(r + 1) * dim].copy_from_slice(&z[i * dim..(i + 1) * dim]);
        }
        bar.inc(part.len() as u64);
    }
    bar.finish_and_clear();
    out
}

/// A loaded model bundle, ready to embed.
pub struct Embedder<B: Backend> {
    pub encoder: ClueEncoder<B>,
    pub info: BundleInfo,
    pub tokenizer: ItemTokenizer,
    pub max_items: usize,
    pub max_item_tokens: usize,
    pub d_model: usize,
    pub dim: usize,
    /// SHA-256 of the bundle's `bundle.json` and the weights loaded (see [`Bundle`]).
    pub bundle_sha256: String,
    /// Lays out batches as training does (fixed shapes on accelerators).
    pub batcher: UserBatcher,
    pub device: B::Device,
    /// The architecture, for an encoder of the same shape ([`Embedder::with_random_weights`]).
    pub config: ModelConfig,
}

impl<B: Backend> Embedder<B> {
    pub fn load(model: &Path, device: &B::Device) -> Result<Self> {
        let bundle = Bundle::<B>::load(model, device)?;
        let m = &bundle.config.model;
        Ok(Self {
            batcher: UserBatcher::new(BackendKind::of::<B>(), m.max_items, m.max_item_tokens),
            max_items: m.max_items,
            max_item_tokens: m.max_item_tokens,
            d_model: m.d_model,
            dim: m.embedding_dim(),
            encoder: bundle.model.encoder,
            tokenizer: bundle.tokenizer,
            info: bundle.info,
            bundle_sha256: bundle.sha256,
            device: device.clone(),
            config: m.clone(),
        })
    }

    /// The same embedder with an encoder of the same architecture and fresh weights drawn with
    /// `seed`: what the model gives before any training.
    pub fn with_random_weights(mut self, seed: u64) -> Self {
        self.encoder = ClueEncoder::new(&self.config, &mut Init::new(seed, &self.device));
        self
    }

    /// Token ids of items; a service the model was not trained on gets no prefix token unless
    /// `alias` maps it to one it knows.
    pub fn tokens(
        &self,
        services: &[String],
        items: &[(usize, String)],
        alias: &HashMap<String, String>,
    ) -> Result<Vec<Vec<u32>>> {
        let prefix: Vec<Option<u32>> = services
            .iter()
            .map(|s| {
                let s = alias.get(s).unwrap_or(s);
                self.info
                    .services
                    .iter()
                    .position(|x| x == s)
                    .map(|i| self.tokenizer.service_ids[i])
            })
            .collect();
        let texts: Vec<(Option<u32>, &str)> = items
            .iter()
            .map(|(s, t)| (prefix[*s], t.as_str()))
            .collect();
        self.tokenizer.encode_texts(&texts, self.max_item_tokens)
    }
}

/// What `clue embed` is asked to do.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    /// Services to embed, in output order; None = the model's services.
    pub services: Option<Vec<String>>,
    /// Embed an untrained service's items as if from a known one: `market=shop`.
    pub alias: HashMap<String, String>,
    pub f16: bool,
    pub npy: bool,
    pub batch_size: usize,
    pub item_cache: bool,
    pub skip_bad_rows: bool,
}

/// Result of `clue embed`.
#[derive(Debug)]
pub struct EmbedReport {
    pub manifest: EmbedManifest,
    pub written: Vec<PathBuf>,
    pub items_seconds: f64,
    pub users_seconds: f64,
    pub item_cache: bool,
}

impl EmbedReport {
    pub fn summary(&self) -> String {
        let m = &self.manifest;
        let mut rows = vec![
            ("users".into(), m.users.to_string()),
            (
                "services".into(),
                m.services
                    .iter()
                    .zip(&m.users_per_service)
                    .map(|(s, n)| format!("{s} ({n} users)"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "embedding".into(),
                format!(
                    "{} × {} = {} {}",
                    m.services.len(),
                    m.dim_per_service,
                    m.dim,
                    m.dtype
                ),
            ),
            (
                "items encoded".into(),
                if self.item_cache {
                    format!("{} once, {:.1} s", m.distinct_items, self.items_seconds)
                } else {
                    format!(
                        "{} distinct, again in every batch (--no-item-cache)",
                        m.distinct_items
                    )
                },
            ),
            (
                "users embedded".into(),
                format!(
                    "{:.1} s ({:.0} users/s)",
                    self.users_seconds,
                    m.users as f64 / self.users_seconds.max(1e-9)
                ),
            ),
        ];
        if m.bad_rows_skipped > 0 {
            rows.push(("bad rows skipped".into(), m.bad_rows_skipped.to_string()));
        }
        for p in &self.written {
            rows.push(("wrote".into(), p.display().to_string()));
        }
        ui::table("embed summary", &rows)
    }
}

/// Run `clue embed`.
pub fn embed<B: Backend>(
    model: &Path,
    device: &B::Device,
    o: &EmbedOptions,
) -> Result<EmbedReport> {
    let ext = o.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "safetensors" && ext != "npy" {
        return Err(ClueError::config(
            format!("--out {} must end in .safetensors or .npy", o.out.display()),
            "e.g. --out embeddings/users.safetensors (add --npy for a .npy copy)",
        ));
    }
    // Held until the set is written: a second clue embed to the same stem fails at once.
    let _lock = lock_output(&o.out.with_extension(""), "embed")?;
    let e = Embedder::<B>::load(model, device)?;
    let services = o
        .services
        .clone()
        .unwrap_or_else(|| e.info.services.clone());
    if services.is_empty() {
        return Err(ClueError::config(
            "no services to embed",
            "e.g. --services search,shop",
        ));
    }
    check_services(&services, &o.alias, &e.info.services)?;
    let files = list_log_files(&o.inputs)?;
    let builder = HistoryBuilder::new(&services, e.max_items);
    let (h, stats) = read_histories(&files, builder, o.skip_bad_rows)?;
    if h.users.is_empty() {
        return Err(ClueError::config(
            format!(
                "no behaviour of the services {} in the logs",
                services.join(", ")
            ),
            "check --services against the logs' service column",
        ));
    }
    let tokens = e.tokens(&services, &h.items, &o.alias)?;
    let t0 = Instant::now();
    // A flat model has no item vectors to cache: it reads every token of every user.
    let item_cache = o.item_cache && !e.encoder.is_flat();
    let cache = if item_cache {
        item_vectors(&e.encoder, &tokens, ITEM_CHUNK, device)
    } else {
        Vec::new()
    };
    let items_seconds = t0.elapsed().as_secs_f64();
    let source = ItemSource {
        tokens: &tokens,
        cache: item_cache.then_some(&cache[..]),
    };
    let t1 = Instant::now();
    let (matrix, mask) = embed_histories(&e, &h, &source, o.batch_size);
    let users_seconds = t1.elapsed().as_secs_f64();
    let manifest = manifest(&e, &h, &mask, &stats, o.f16);
    let embeddings = Embeddings {
        users: &h.users,
        services: &services,
        matrix: &matrix,
        mask: &mask,
    };
    let written = format::write(&o.out, &embeddings, manifest.clone(), o.f16, o.npy)?;
    Ok(EmbedReport {
        manifest: EmbedManifest {
            files: written.iter().map(|p| p.display().to_string()).collect(),
            ..manifest
        },
        written,
        items_seconds,
        users_seconds,
        item_cache,
    })
}

/// `--services` names each service once, and every `--alias NEW=KNOWN` maps a service being
/// embedded to one the model was trained on.
fn check_services(
    services: &[String],
    alias: &HashMap<String, String>,
    known: &[String],
) -> Result<()> {
    if let Some(s) = repeated(services) {
        return Err(ClueError::config(
            format!("service `{s}` is named twice in --services"),
            "name each service once",
        ));
    }
    let mut pairs: Vec<_> = alias.iter().collect();
    pairs.sort();
    for (new, to) in pairs {
        if !known.contains(to) {
            return Err(ClueError::config(
                format!(
                    "--alias {new}={to}: the model knows no service `{to}` (it was trained on {})",
                    known.join(", ")
                ),
                "alias to one of the model's services",
            ));
        }
        if !services.contains(new) {
            return Err(ClueError::config(
                format!(
                    "--alias {new}={to}: `{new}` is not among the services embedded ({})",
                    services.join(", ")
                ),
                "add it to --services, or drop the alias",
            ));
        }
    }
    Ok(())
}

fn manifest<B: Backend>(
    e: &Embedder<B>,
    h: &Histories,
    mask: &[u8],
    stats: &log::ReadStats,
    f16: bool,
) -> EmbedManifest {
    let k = h.services.len();
    EmbedManifest {
        clue_version: env!("CARGO_PKG_VERSION").into(),
        model_bundle_sha256: e.bundle_sha256.clone(),
        dataset_manifest_sha256: e.info.dataset_manifest_sha256.clone(),
        services: h.services.clone(),
        dim_per_service: e.dim,
        dim: e.dim * k,
        dtype: if f16 { "f16" } else { "f32" }.into(),
        users: h.users.len(),
        users_per_service: (0..k)
            .map(|s| mask.iter().skip(s).step_by(k).filter(|&&m| m == 1).count())
            .collect(),
        distinct_items: h.items.len(),
        rows_read: stats.rows,
        bad_rows_skipped: stats.bad.total(),
        rows_other_services: h.other_service_rows,
        files: Vec::new(),
        sha256: Default::default(),
    }
}

/// `[users, services × dim]` embeddings and the `[users, services]` mask (1 = has behaviour).
pub fn embed_histories<B: Backend>(
    e: &Embedder<B>,
    h: &Histories,
    source: &ItemSource,
    batch: usize,
) -> (Vec<f32>, Vec<u8>) {
    let (n, k, dim) = (h.users.len(), h.services.len(), e.dim);
    let mut matrix = vec![0f32; n * k * dim];
    let mut mask = vec![0u8; n * k];
    for s in 0..k {
        let seqs: Vec<&[u32]> = h.seqs.iter().map(|u| u[s].as_slice()).collect();
        let z = user_vectors(e, source, &seqs, batch);
        for u in 0..n {
            if !seqs[u].is_empty() {
                mask[u * k + s] = 1;
                matrix[(u * k + s) * dim..(u * k + s + 1) * dim]
                    .copy_from_slice(&z[u * dim..(u + 1) * dim]);
            }
        }
    }
    (matrix, mask)
}
