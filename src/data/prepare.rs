//! `clue prepare`: behaviour logs → tokenizer → compact, memory-mappable dataset.
//!
//! The paper's rules (section 3.1): a repeated identical behaviour (user, service, text) is kept
//! once; users below `min_behaviors` in a service are dropped; users lacking a service are dropped
//! (pretraining needs every service of a user); each per-service sequence keeps the most recent
//! `max_items` items. Every distinct item is tokenised once and stored once in an item table.
//! The logs are read by [`crate::data::history`], the reader `clue embed` and `clue eval` share.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::data::history::{Histories, HistoryBuilder, read_histories};
use crate::data::log::{self, BadRows};
pub use crate::data::options::{Dropped, Objective, PrepareOptions};
use crate::data::store::{self, Manifest, Split};
use crate::data::tokenize::{ItemTokenizer, default_vocab_size};
use crate::error::{ClueError, Result};
use crate::ui;

/// What a prepare run did (the end-of-run summary; the manifest holds the deterministic part).
#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub rows_read: u64,
    pub bad_rows: BadRows,
    pub seconds: f64,
}

/// Split assignment from a hash of (seed, user id): a user's split never depends on other users.
pub fn assign_split(seed: u64, user: &str, valid: f64, test: f64) -> Split {
    let digest = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(user.as_bytes())
        .finalize();
    let x = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    if x < valid {
        Split::Valid
    } else if x < valid + test {
        Split::Test
    } else {
        Split::Train
    }
}

/// Run `clue prepare` on `inputs` (files or directories) into `out`.
pub fn prepare(inputs: &[PathBuf], out: &Path, options: &PrepareOptions) -> Result<PrepareReport> {
    options.validate()?;
    let _lock = store::lock_output(out, "prepare")?;
    let start = Instant::now();
    let files = log::list_log_files(inputs)?;
    let builder = match &options.services {
        Some(services) => HistoryBuilder::new(services, options.max_items),
        None => HistoryBuilder::any_service(options.max_items),
    };
    let (histories, stats) = read_histories(&files, builder, options.skip_bad_rows)?;
    check_services(&histories, options.objective)?;
    let (kept, dropped) = keep_users(&histories, options.min_behaviors)?;
    let table = ItemTable::new(&histories, &kept);
    let tokenizer = tokenizer(options, &histories.services, &table)?;
    let items = tokenise(&tokenizer, &table, options.max_item_tokens)?;
    let seqs = Sequences::new(&histories, &kept, &table, options);
    let manifest = Manifest {
        format_version: store::FORMAT_VERSION,
        services: histories.services.clone(),
        users: kept.len() as u64,
        items: table.items.len() as u64,
        tokens: items.tokens.len() as u64,
        behaviors: seqs.items.len() as u64,
        behaviors_per_service: seqs.per_service.clone(),
        items_per_service: (0..histories.services.len())
            .map(|s| items.services.iter().filter(|&&x| x as usize == s).count() as u64)
            .collect(),
        vocab_size: tokenizer.vocab_size() as u64,
        id_offset: tokenizer.id_offset,
        service_token_ids: tokenizer.service_ids.clone(),
        item_token_histogram: items.histogram.clone(),
        rows_read: stats.rows,
        bad_rows: stats.bad.total(),
        rows_other_services: histories.other_service_rows,
        duplicates_removed: histories.duplicates,
        users_seen: histories.users.len() as u64,
        users_dropped: dropped,
        split: seqs.split_info(options),
        options: PrepareOptions {
            tokenizer: options
                .tokenizer
                .as_ref()
                .map(|p| PathBuf::from(p.file_name().unwrap_or_default())),
            ..options.clone()
        },
        tokenizer_sha256: String::new(),
        files: Default::default(),
    };
    // Everything goes into a temporary directory beside `out`, then is renamed into place.
    let arrays = store::Arrays {
        item_tokens: &items.tokens,
        item_offsets: &items.offsets,
        item_services: &items.services,
        seq_items: &seqs.items,
        seq_offsets: &seqs.offsets,
        split: &seqs.split,
        user_ids: &seqs.user_ids(&histories),
    };
    let manifest = store::write(out, manifest, &arrays, &tokenizer)?;
    Ok(PrepareReport {
        manifest,
        rows_read: stats.rows,
        bad_rows: stats.bad,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The cross-service objective pairs services: at least two, each with rows (SimCLR: one).
fn check_services(h: &Histories, objective: Objective) -> Result<()> {
    if h.items.is_empty() {
        return Err(ClueError::config(
            "the logs hold no behaviour rows (only a header, or nothing)",
            "give logs with rows `user_id,service,timestamp,text` under the header",
        ));
    }
    if h.services.len() < objective.min_services() {
        return Err(ClueError::config(
            format!(
                "the logs hold {} service(s) ({}); the cross-service objective pairs two services of each user",
                h.services.len(),
                h.services.join(", ")
            ),
            "give logs with at least two services, or prepare for the SimCLR objective with --objective simclr",
        ));
    }
    let mut has_rows = vec![false; h.services.len()];
    for (s, _) in &h.items {
        has_rows[*s] = true;
    }
    if let Some(empty) = has_rows.iter().position(|&x| !x) {
        return Err(ClueError::config(
            format!("service `{}` has no rows in the logs", h.services[empty]),
            "check the service names given to --services",
        ));
    }
    Ok(())
}

/// The users pretraining can use (every service, at least `min_behaviors` items in each),
/// ordered by id for determinism, and how many were dropped for which reason.
fn keep_users(h: &Histories, min_behaviors: usize) -> Result<(Vec<u32>, Dropped)> {
    let mut order: Vec<u32> = (0..h.users.len() as u32).collect();
    order.sort_unstable_by(|a, b| h.users[*a as usize].cmp(&h.users[*b as usize]));
    let mut dropped = Dropped::default();
    let mut kept = Vec::new();
    for u in order {
        let lists = &h.seqs[u as usize];
        if lists.iter().any(|l| l.is_empty()) {
            dropped.missing_service += 1;
        } else if lists.iter().any(|l| l.len() < min_behaviors) {
            dropped.too_few_behaviors += 1;
        } else {
            kept.push(u);
        }
    }
    if kept.is_empty() {
        return Err(ClueError::config(
            format!(
                "no user is left: {} lack a service, {} have fewer than {} behaviours in a service",
                dropped.missing_service, dropped.too_few_behaviors, min_behaviors
            ),
            "lower --min-behaviors, or check that the services share user ids",
        ));
    }
    Ok((kept, dropped))
}

/// The item table: only items that kept users reference, ordered by (service name, text).
struct ItemTable<'a> {
    /// (service, text) of each stored item, in table order.
    items: Vec<(usize, &'a str)>,
    /// History item index → table row (`u32::MAX`: not stored).
    renumber: Vec<u32>,
}

impl<'a> ItemTable<'a> {
    fn new(h: &'a Histories, kept: &[u32]) -> Self {
        let mut used = vec![false; h.items.len()];
        for &u in kept {
            for &i in h.seqs[u as usize].iter().flatten() {
                used[i as usize] = true;
            }
        }
        let mut table: Vec<u32> = (0..h.items.len() as u32)
            .filter(|&i| used[i as usize])
            .collect();
        table.sort_unstable_by(|a, b| {
            let (sa, ta) = &h.items[*a as usize];
            let (sb, tb) = &h.items[*b as usize];
            h.services[*sa].cmp(&h.services[*sb]).then(ta.cmp(tb))
        });
        let mut renumber = vec![u32::MAX; h.items.len()];
        for (new, &old) in table.iter().enumerate() {
            renumber[old as usize] = new as u32;
        }
        let items = table
            .iter()
            .map(|&i| (h.items[i as usize].0, h.items[i as usize].1.as_str()))
            .collect();
        Self { items, renumber }
    }
}

/// The tokenizer: loaded, or trained on each distinct text of the table once.
fn tokenizer(
    options: &PrepareOptions,
    services: &[String],
    table: &ItemTable,
) -> Result<ItemTokenizer> {
    if let Some(path) = &options.tokenizer {
        return ItemTokenizer::load(path, services);
    }
    let mut texts: Vec<&str> = table.items.iter().map(|(_, t)| *t).collect();
    texts.sort_unstable();
    texts.dedup();
    let vocab = options
        .vocab_size
        .unwrap_or_else(|| default_vocab_size(texts.len()));
    let spinner = ui::bar(texts.len() as u64, "tokenizer", false);
    let t = ItemTokenizer::train(texts.iter().copied(), vocab, services)?;
    spinner.finish_and_clear();
    Ok(t)
}

/// The item arrays of the store.
struct ItemArrays {
    tokens: Vec<u32>,
    offsets: Vec<u64>,
    services: Vec<u8>,
    /// `histogram[n]`: items with n tokens.
    histogram: Vec<u64>,
}

/// Tokenise every item once, in chunks (parallel inside the tokenizer).
fn tokenise(tokenizer: &ItemTokenizer, table: &ItemTable, max_tokens: usize) -> Result<ItemArrays> {
    const CHUNK: usize = 16_384;
    let bar = ui::bar(table.items.len() as u64, "tokenising", false);
    let mut out = ItemArrays {
        tokens: Vec::new(),
        offsets: vec![0],
        services: table.items.iter().map(|(s, _)| *s as u8).collect(),
        histogram: vec![0; max_tokens + 1],
    };
    for chunk in table.items.chunks(CHUNK) {
        for ids in tokenizer.encode_items(chunk, max_tokens)? {
            out.histogram[ids.len()] += 1;
            out.tokens.extend_from_slice(&ids);
            out.offsets.push(out.tokens.len() as u64);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Sequences of the kept users (users × services, table rows oldest → newest) and their split.
struct Sequences<'a> {
    kept: &'a [u32],
    items: Vec<u32>,
    offsets: Vec<u64>,
    per_service: Vec<u64>,
    split: Vec<u8>,
    split_counts: [u64; 3],
}

impl<'a> Sequences<'a> {
    fn new(h: &Histories, kept: &'a [u32], table: &ItemTable, options: &PrepareOptions) -> Self {
        let mut s = Self {
            kept,
            items: Vec::new(),
            offsets: vec![0],
            per_service: vec![0; h.services.len()],
            split: Vec::with_capacity(kept.len()),
            split_counts: [0; 3],
        };
        for &u in kept {
            let split = assign_split(
                options.seed,
                &h.users[u as usize],
                options.valid_fraction,
                options.test_fraction,
            );
            s.split.push(split as u8);
            s.split_counts[split as usize] += 1;
            for (svc, list) in h.seqs[u as usize].iter().enumerate() {
                s.per_service[svc] += list.len() as u64;
                s.items
                    .extend(list.iter().map(|&i| table.renumber[i as usize]));
                s.offsets.push(s.items.len() as u64);
            }
        }
        s
    }

    fn split_info(&self, options: &PrepareOptions) -> store::SplitInfo {
        store::SplitInfo {
            seed: options.seed,
            valid_fraction: options.valid_fraction,
            test_fraction: options.test_fraction,
            train: self.split_counts[Split::Train as usize],
            valid: self.split_counts[Split::Valid as usize],
            test: self.split_counts[Split::Test as usize],
        }
    }

    fn user_ids<'h>(&self, h: &'h Histories) -> Vec<&'h str> {
        self.kept
            .iter()
            .map(|&u| h.users[u as usize].as_str())
            .collect()
    }
}

impl PrepareReport {
    /// The end-of-run summary table.
    pub fn summary(&self) -> String {
        let m = &self.manifest;
        let n = |x: u64| format_count(x);
        let mut rows = vec![
            ("rows read".into(), n(self.rows_read)),
            ("bad rows skipped".into(), n(self.bad_rows.total())),
            ("rows of other services".into(), n(m.rows_other_services)),
            ("duplicates removed".into(), n(m.duplicates_removed)),
            ("users seen".into(), n(m.users_seen)),
            (
                "users dropped".into(),
                format!(
                    "{} (missing a service {}, too few behaviours {})",
                    n(m.users_dropped.missing_service + m.users_dropped.too_few_behaviors),
                    n(m.users_dropped.missing_service),
                    n(m.users_dropped.too_few_behaviors)
                ),
            ),
            (
                "users kept".into(),
                format!(
                    "{} (train {}, valid {}, test {})",
                    n(m.users),
                    n(m.split.train),
                    n(m.split.valid),
                    n(m.split.test)
                ),
            ),
        ];
        for (s, name) in m.services.iter().enumerate() {
            rows.push((
                format!("service {name}"),
                format!(
                    "{} behaviours, {} items",
                    n(m.behaviors_per_service[s]),
                    n(m.items_per_service[s])
                ),
            ));
        }
        rows.extend([
            ("items".into(), n(m.items)),
            (
                "tokens".into(),
                format!(
                    "{} ({:.1} per item)",
                    n(m.tokens),
                    m.tokens as f64 / m.items.max(1) as f64
                ),
            ),
            ("vocabulary".into(), n(m.vocab_size)),
            (
                "time".into(),
                format!(
                    "{:.2} s ({} rows/s)",
                    self.seconds,
                    n((self.rows_read as f64 / self.seconds.max(1e-9)) as u64)
                ),
            ),
        ]);
        let mut out = ui::table("prepared", &rows);
        for line in self.bad_rows.describe() {
            out.push_str(&format!("  skipped: {line}\n"));
        }
        out
    }
}

/// 1234567 → "1,234,567".
pub fn format_count(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stable_per_user_and_near_its_fractions() {
        let mut counts = [0usize; 3];
        for u in 0..10_000 {
            let name = format!("u{u}");
            let s = assign_split(7, &name, 0.1, 0.2);
            assert_eq!(s, assign_split(7, &name, 0.1, 0.2));
            counts[s as usize] += 1;
        }
        assert!((counts[Split::Valid as usize] as i64 - 1000).abs() < 150);
        assert!((counts[Split::Test as usize] as i64 - 2000).abs() < 200);
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(format_count(0), "0");
        assert_eq!(format_count(1234), "1,234");
        assert_eq!(format_count(1234567), "1,234,567");
    }
}
