//! `clue embed`: frozen user embeddings from a model bundle and behaviour logs.
//!
//! Every distinct item text goes through the Item Transformer **once** (the item-embedding
//! cache); then only the Service Transformer runs per user and service. A user's embedding is
//! the concatenation of their per-service embeddings in the recorded service order (paper §3.2);
//! a service the user has no behaviour in gives zeros there and `0` in the user's mask column.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::log::{self, list_log_files, read_logs};
use crate::data::prepare::{Event, compact};
use crate::data::store::{self, hex, sha256_file, write_atomic};
use crate::data::tokenize::ItemTokenizer;
use crate::error::{ClueError, Result};
use crate::model::ClueEncoder;
use crate::train::fit::{BUNDLE_INFO, BundleInfo, bundle_dir, load_bundle};
use crate::ui;

/// Users' item histories, per service, over a table of distinct items.
#[derive(Debug, Clone, Default)]
pub struct Histories {
    pub users: Vec<String>,
    pub services: Vec<String>,
    /// Distinct items: (service index, text).
    pub items: Vec<(usize, String)>,
    /// `seqs[user][service]`: item indices, oldest first, at most `max_items`.
    pub seqs: Vec<Vec<Vec<u32>>>,
}

/// Collects behaviours into [`Histories`] (same rules as `clue prepare`: a repeated item is kept
/// once at its latest time, the most recent `max_items` per service are kept).
pub struct HistoryBuilder {
    services: Vec<String>,
    users: HashMap<String, usize>,
    items: HashMap<(usize, String), u32>,
    out: Histories,
    events: Vec<Vec<Vec<Event>>>,
    rows: u64,
    /// Rows of services that were not asked for.
    pub other_service_rows: u64,
}

impl HistoryBuilder {
    pub fn new(services: &[String]) -> Self {
        Self {
            services: services.to_vec(),
            users: HashMap::new(),
            items: HashMap::new(),
            out: Histories {
                services: services.to_vec(),
                ..Default::default()
            },
            events: Vec::new(),
            rows: 0,
            other_service_rows: 0,
        }
    }

    /// Add one behaviour; `time` None = file order.
    pub fn push(&mut self, user: &str, service: &str, time: Option<i64>, text: &str) {
        let Some(s) = self.services.iter().position(|x| x == service) else {
            self.other_service_rows += 1;
            return;
        };
        let u = match self.users.get(user) {
            Some(&u) => u,
            None => {
                let u = self.out.users.len();
                self.users.insert(user.to_string(), u);
                self.out.users.push(user.to_string());
                self.events.push(vec![Vec::new(); self.services.len()]);
                u
            }
        };
        let next = self.out.items.len() as u32;
        let item = *self.items.entry((s, text.to_string())).or_insert(next);
        if item == next {
            self.out.items.push((s, text.to_string()));
        }
        self.events[u][s].push(Event {
            time: time.unwrap_or(i64::MIN),
            row: self.rows,
            item,
        });
        self.rows += 1;
    }

    pub fn finish(mut self, max_items: usize) -> Histories {
        self.out.seqs = self
            .events
            .into_iter()
            .map(|per_service| {
                per_service
                    .into_iter()
                    .map(|mut ev| {
                        compact(&mut ev, max_items);
                        ev.into_iter().map(|e| e.item).collect()
                    })
                    .collect()
            })
            .collect();
        self.out
    }
}

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
        let vectors = encode_item_rows(encoder, &rows, device);
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

fn encode_item_rows<B: Backend>(
    encoder: &ClueEncoder<B>,
    rows: &[&[u32]],
    device: &B::Device,
) -> Vec<f32> {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let mut flat = vec![0i64; rows.len() * len];
    for (r, t) in rows.iter().enumerate() {
        for (j, &id) in t.iter().enumerate() {
            flat[r * len + j] = id as i64;
        }
    }
    let t = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [rows.len() * len]), device)
        .reshape([rows.len(), len]);
    to_vec(encoder.encode_items(t))
}

fn to_vec<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
}

/// Where item vectors come from while embedding users.
pub enum ItemSource<'a> {
    /// Precomputed by [`item_vectors`] (`[items, d_model]`).
    Cache(&'a [f32]),
    /// Encode each batch's distinct items again (the uncached path, for comparison).
    Tokens(&'a [Vec<u32>]),
}

/// Embeddings of `seqs` (item indices per row), `batch` rows per call: `[rows, dim]` row-major.
/// Empty rows give zeros. With `pad_to`, every batch is padded to that many slots (one shape
/// for GPU backends).
pub fn user_vectors<B: Backend>(
    e: &Embedder<B>,
    items: &ItemSource,
    seqs: &[&[u32]],
    batch: usize,
    pad_to: Option<usize>,
) -> Vec<f32> {
    let (encoder, d_model, dim, device) = (&e.encoder, e.d_model, e.dim, &e.device);
    let mut out = vec![0f32; seqs.len() * dim];
    let rows: Vec<usize> = (0..seqs.len()).filter(|&r| !seqs[r].is_empty()).collect();
    let bar = ui::bar(rows.len() as u64, "users", false);
    for part in rows.chunks(batch.max(1)) {
        let slots =
            pad_to.unwrap_or_else(|| part.iter().map(|&r| seqs[r].len()).max().unwrap_or(1));
        let mut local: HashMap<u32, i64> = HashMap::new();
        let mut order: Vec<u32> = Vec::new();
        let mut slot_item = vec![0i64; part.len() * slots];
        let mut pad = vec![true; part.len() * slots];
        for (i, &r) in part.iter().enumerate() {
            for (j, &item) in seqs[r].iter().take(slots).enumerate() {
                let next = order.len() as i64 + 1;
                let k = *local.entry(item).or_insert(next);
                if k == next {
                    order.push(item);
                }
                slot_item[i * slots + j] = k;
                pad[i * slots + j] = false;
            }
        }
        let vectors = match items {
            ItemSource::Cache(cache) => {
                let mut v = Vec::with_capacity(order.len() * d_model);
                for &item in &order {
                    let at = item as usize * d_model;
                    v.extend_from_slice(&cache[at..at + d_model]);
                }
                Tensor::<B, 1>::from_data(TensorData::new(v, [order.len() * d_model]), device)
                    .reshape([order.len(), d_model])
            }
            ItemSource::Tokens(tokens) => {
                let rows: Vec<&[u32]> = order
                    .iter()
                    .map(|&i| tokens[i as usize].as_slice())
                    .collect();
                let v = encode_item_rows(encoder, &rows, device);
                Tensor::<B, 1>::from_data(TensorData::new(v, [order.len() * d_model]), device)
                    .reshape([order.len(), d_model])
            }
        };
        let slot_item = Tensor::<B, 1, Int>::from_data(
            TensorData::new(slot_item, [part.len() * slots]),
            device,
        );
        let pad =
            Tensor::<B, 1, Bool>::from_data(TensorData::new(pad, [part.len() * slots]), device)
                .reshape([part.len(), slots]);
        let z = to_vec(encoder.encode_users(vectors, slot_item, pad));
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
    /// SHA-256 of the bundle's `bundle.json` and safetensors weights together.
    pub bundle_sha256: String,
    pub device: B::Device,
}

impl<B: Backend> Embedder<B> {
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
        let text = std::fs::read_to_string(&info_path).map_err(|e| ClueError::io(&info_path, e))?;
        let info: BundleInfo = serde_json::from_str(&text).map_err(|e| {
            ClueError::bad_file(
                &info_path,
                e.to_string(),
                "the bundle is damaged: train again",
            )
        })?;
        let (model, config) = load_bundle::<B>(&dir, device)?;
        let tokenizer = ItemTokenizer::load(&dir.join(store::TOKENIZER), &info.services)?;
        let bundle_sha256 = hex(&<sha2::Sha256 as sha2::Digest>::digest(
            format!(
                "{}{}",
                sha256_file(&info_path)?,
                sha256_file(&dir.join("model.safetensors"))?
            )
            .as_bytes(),
        ));
        Ok(Self {
            encoder: model.encoder,
            tokenizer,
            max_items: config.model.max_items,
            max_item_tokens: config.model.max_item_tokens,
            d_model: config.model.d_model,
            dim: config.model.embedding_dim(),
            info,
            bundle_sha256,
            device: device.clone(),
        })
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
    pub fixed_shapes: bool,
}

/// `<stem>.manifest.json`, written beside the embeddings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedManifest {
    pub clue_version: String,
    pub model_bundle_sha256: String,
    pub dataset_manifest_sha256: String,
    pub services: Vec<String>,
    /// Per-service embedding width; the row is `services.len() × dim_per_service` wide.
    pub dim_per_service: usize,
    pub dim: usize,
    pub dtype: String,
    pub users: usize,
    /// Users with at least one behaviour in each service, in service order.
    pub users_per_service: Vec<usize>,
    pub distinct_items: usize,
    pub rows_read: u64,
    pub bad_rows_skipped: u64,
    pub rows_other_services: u64,
    pub files: Vec<String>,
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

/// Read behaviour logs (CSV files or directories) into histories of `services`.
pub fn read_histories(
    inputs: &[PathBuf],
    services: &[String],
    max_items: usize,
    skip_bad_rows: bool,
) -> Result<(Histories, log::ReadStats, u64)> {
    let files = list_log_files(inputs)?;
    let mut builder = HistoryBuilder::new(services);
    let bar = ui::bar(log::total_bytes(&files), "reading", true);
    let stats = read_logs(
        &files,
        skip_bad_rows,
        |b| builder.push(b.user, b.service, b.timestamp, b.text),
        |bytes| bar.set_position(bytes),
    )?;
    bar.finish_and_clear();
    let other = builder.other_service_rows;
    Ok((builder.finish(max_items), stats, other))
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
    let (h, stats, other) = read_histories(&o.inputs, &services, e.max_items, o.skip_bad_rows)?;
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
    let cache = if o.item_cache {
        item_vectors(&e.encoder, &tokens, 1024, device)
    } else {
        Vec::new()
    };
    let items_seconds = t0.elapsed().as_secs_f64();
    let source = if o.item_cache {
        ItemSource::Cache(&cache)
    } else {
        ItemSource::Tokens(&tokens)
    };
    let t1 = Instant::now();
    let (matrix, mask) = embed_histories(&e, &h, &source, o.batch_size, o.fixed_shapes);
    let users_seconds = t1.elapsed().as_secs_f64();
    let users_per_service = (0..services.len())
        .map(|s| {
            mask.iter()
                .skip(s)
                .step_by(services.len())
                .filter(|&&m| m == 1)
                .count()
        })
        .collect();
    let manifest = EmbedManifest {
        clue_version: env!("CARGO_PKG_VERSION").into(),
        model_bundle_sha256: e.bundle_sha256.clone(),
        dataset_manifest_sha256: e.info.dataset_manifest_sha256.clone(),
        services: services.clone(),
        dim_per_service: e.dim,
        dim: e.dim * services.len(),
        dtype: if o.f16 { "f16" } else { "f32" }.into(),
        users: h.users.len(),
        users_per_service,
        distinct_items: h.items.len(),
        rows_read: stats.rows,
        bad_rows_skipped: stats.bad.total(),
        rows_other_services: other,
        files: Vec::new(),
    };
    let written = write_outputs(
        &o.out,
        &h.users,
        &services,
        &matrix,
        &mask,
        manifest.clone(),
        o,
    )?;
    Ok(EmbedReport {
        manifest: EmbedManifest {
            files: written.iter().map(|p| p.display().to_string()).collect(),
            ..manifest
        },
        written,
        items_seconds,
        users_seconds,
        item_cache: o.item_cache,
    })
}

/// `[users, services × dim]` embeddings and the `[users, services]` mask (1 = has behaviour).
pub fn embed_histories<B: Backend>(
    e: &Embedder<B>,
    h: &Histories,
    source: &ItemSource,
    batch: usize,
    fixed_shapes: bool,
) -> (Vec<f32>, Vec<u8>) {
    let (n, k, dim) = (h.users.len(), h.services.len(), e.dim);
    let mut matrix = vec![0f32; n * k * dim];
    let mut mask = vec![0u8; n * k];
    for s in 0..k {
        let seqs: Vec<&[u32]> = h.seqs.iter().map(|u| u[s].as_slice()).collect();
        let z = user_vectors(e, source, &seqs, batch, fixed_shapes.then_some(e.max_items));
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

fn view(
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: &[u8],
) -> safetensors::tensor::TensorView<'_> {
    safetensors::tensor::TensorView::new(dtype, shape, data).expect("consistent tensor view")
}

/// `.npy` (format 1.0) bytes of a C-order matrix.
pub fn npy_bytes(descr: &str, shape: [usize; 2], data: &[u8]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}), }}",
        shape[0], shape[1]
    );
    // magic (6) + version (2) + header length (2) + header + '\n', padded to 64 bytes.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write_outputs(
    out: &Path,
    users: &[String],
    services: &[String],
    matrix: &[f32],
    mask: &[u8],
    mut manifest: EmbedManifest,
    o: &EmbedOptions,
) -> Result<Vec<PathBuf>> {
    let (n, k) = (users.len(), services.len());
    let width = manifest.dim;
    let (dtype, descr, bytes): (safetensors::Dtype, &str, Vec<u8>) = if o.f16 {
        let b = matrix
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        (safetensors::Dtype::F16, "<f2", b)
    } else {
        let b = matrix.iter().flat_map(|x| x.to_le_bytes()).collect();
        (safetensors::Dtype::F32, "<f4", b)
    };
    let stem = out.with_extension("");
    let mut written = Vec::new();
    let st_path = out.with_extension("safetensors");
    let npy_path = out.with_extension("npy");
    if out.extension().is_some_and(|e| e == "safetensors") {
        let tensors = vec![
            ("user_embeddings", view(dtype, vec![n, width], &bytes)),
            (
                "service_mask",
                view(safetensors::Dtype::U8, vec![n, k], mask),
            ),
        ];
        // One metadata entry: safetensors writes a HashMap, whose order would vary between runs.
        let meta = HashMap::from([("services".to_string(), services.join(","))]);
        let data = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| ClueError::io(&st_path, std::io::Error::other(e.to_string())))?;
        write_atomic(&st_path, &data)?;
        written.push(st_path);
    }
    if o.npy || out.extension().is_some_and(|e| e == "npy") {
        write_atomic(&npy_path, &npy_bytes(descr, [n, width], &bytes))?;
        written.push(npy_path);
    }
    let mut csv = format!(
        "row,user_id,{}\n",
        services
            .iter()
            .map(|s| format!("has_{s}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    for (r, u) in users.iter().enumerate() {
        let mut rec = vec![r.to_string(), u.clone()];
        rec.extend(mask[r * k..(r + 1) * k].iter().map(|m| m.to_string()));
        w.write_record(&rec)
            .map_err(|e| ClueError::io(out, e.into()))?;
    }
    csv.push_str(&String::from_utf8(w.into_inner().expect("in memory")).expect("utf-8"));
    let users_path = PathBuf::from(format!("{}.users.csv", stem.display()));
    write_atomic(&users_path, csv.as_bytes())?;
    written.push(users_path);
    let manifest_path = PathBuf::from(format!("{}.manifest.json", stem.display()));
    manifest.files = written.iter().map(|p| p.display().to_string()).collect();
    write_atomic(
        &manifest_path,
        (serde_json::to_string_pretty(&manifest).expect("json") + "\n").as_bytes(),
    )?;
    written.push(manifest_path);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_keep_latest_occurrence_most_recent_items_per_service() {
        let services = vec!["a".to_string(), "b".to_string()];
        let mut b = HistoryBuilder::new(&services);
        b.push("u1", "a", Some(10), "x");
        b.push("u1", "a", Some(5), "y");
        b.push("u1", "a", Some(30), "x");
        b.push("u1", "a", Some(20), "z");
        b.push("u1", "c", Some(1), "ignored");
        b.push("u2", "b", None, "x");
        let h = b.finish(2);
        assert_eq!(h.users, vec!["u1", "u2"]);
        let text = |i: u32| h.items[i as usize].1.as_str();
        // u1/a by time: y@5, z@20, x@30 (x@10 is a repeat); keep the 2 most recent.
        let a: Vec<&str> = h.seqs[0][0].iter().map(|&i| text(i)).collect();
        assert_eq!(a, vec!["z", "x"]);
        assert!(h.seqs[0][1].is_empty());
        // Same text in another service is another item.
        assert_eq!(h.items[h.seqs[1][1][0] as usize], (1, "x".to_string()));
    }

    #[test]
    fn npy_header_is_aligned_and_describes_the_matrix() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b = npy_bytes("<f4", [2, 3], &data);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(&b[10 + hlen..], &data[..]);
    }
}
