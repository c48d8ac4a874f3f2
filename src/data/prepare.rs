//! `clue prepare`: behaviour logs → tokenizer → compact, memory-mappable dataset.
//!
//! The paper's rules (section 3.1): a repeated identical behaviour (user, service, text) is kept
//! once; users below `min_behaviors` in a service are dropped; users lacking a service are dropped
//! (pretraining needs every service of a user); each per-service sequence keeps the most recent
//! `max_items` items. Every distinct item is tokenised once and stored once in an item table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::log::{self, BadRows, Behavior};
use crate::data::store::{self, Manifest, Split};
use crate::data::tokenize::{ItemTokenizer, default_vocab_size};
use crate::error::{ClueError, Result};
use crate::ui;

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
    /// Services to keep (at least two); `None` keeps every service in the logs.
    pub services: Option<Vec<String>>,
    /// Skip and count bad rows instead of stopping at the first.
    pub skip_bad_rows: bool,
    /// Fractions of users for validation and test (the rest trains).
    pub valid_fraction: f64,
    pub test_fraction: f64,
    /// Seed of the user split.
    pub seed: u64,
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
        }
    }
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
        if self.services.as_ref().is_some_and(|s| s.len() < 2) {
            return fail(
                "pretraining needs at least two services",
                "name two or more with --services a,b",
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

/// What a prepare run did (the end-of-run summary; the manifest holds the deterministic part).
#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub rows_read: u64,
    pub bad_rows: BadRows,
    pub seconds: f64,
}

/// One behaviour kept in memory while reading: its time order key and item.
#[derive(Clone, Copy)]
pub(crate) struct Event {
    /// Unix seconds; `i64::MIN` when the log left it empty (then only `row` orders it).
    pub time: i64,
    pub row: u64,
    pub item: u32,
}

/// Per-user state while reading: one event list per service.
struct UserEvents {
    services: Vec<Vec<Event>>,
}

/// Keep, per item, only its most recent occurrence, then only the most recent `max_items`
/// events, oldest first. Returns how many duplicate events were removed.
pub(crate) fn compact(events: &mut Vec<Event>, max_items: usize) -> u64 {
    events.sort_unstable_by_key(|e| (e.item, std::cmp::Reverse((e.time, e.row))));
    let before = events.len();
    events.dedup_by_key(|e| e.item);
    let duplicates = (before - events.len()) as u64;
    events.sort_unstable_by_key(|e| (e.time, e.row));
    if events.len() > max_items {
        events.drain(..events.len() - max_items);
    }
    duplicates
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
    let start = Instant::now();
    let files = log::list_log_files(inputs)?;

    // 1. Stream the logs: intern users, services and items; keep per-user events, compacted
    //    whenever a list doubles past `max_items`, so memory follows users and items, not rows.
    let mut users: HashMap<Box<str>, u32> = HashMap::new();
    let mut user_names: Vec<Box<str>> = Vec::new();
    let mut events: Vec<UserEvents> = Vec::new();
    let mut services: Vec<String> = options.services.clone().unwrap_or_default();
    let fixed_services = options.services.is_some();
    let mut items: Vec<HashMap<Box<str>, u32>> = vec![HashMap::new(); services.len()];
    let mut item_texts: Vec<(u16, Box<str>)> = Vec::new();
    let mut duplicates = 0u64;
    let mut other_service_rows = 0u64;
    let mut behaviors = 0u64;
    let max_items = options.max_items;
    let compact_at = 2 * max_items + 64;

    let bar = ui::bar(log::total_bytes(&files), "reading", true);
    let stats = log::read_logs(
        &files,
        options.skip_bad_rows,
        |b: Behavior<'_>| {
            let service = match services.iter().position(|s| s == b.service) {
                Some(s) => s,
                None if fixed_services => {
                    other_service_rows += 1;
                    return;
                }
                None => {
                    services.push(b.service.to_string());
                    items.push(HashMap::new());
                    services.len() - 1
                }
            };
            behaviors += 1;
            let user = match users.get(b.user) {
                Some(&u) => u,
                None => {
                    let u = user_names.len() as u32;
                    users.insert(b.user.into(), u);
                    user_names.push(b.user.into());
                    events.push(UserEvents {
                        services: Vec::new(),
                    });
                    u
                }
            };
            let item = match items[service].get(b.text) {
                Some(&i) => i,
                None => {
                    let i = item_texts.len() as u32;
                    items[service].insert(b.text.into(), i);
                    item_texts.push((service as u16, b.text.into()));
                    i
                }
            };
            let lists = &mut events[user as usize].services;
            if lists.len() <= service {
                lists.resize_with(service + 1, Vec::new);
            }
            let list = &mut lists[service];
            list.push(Event {
                time: b.timestamp.unwrap_or(i64::MIN),
                row: behaviors,
                item,
            });
            if list.len() >= compact_at {
                duplicates += compact(list, max_items);
            }
        },
        |pos| bar.set_position(pos),
    )?;
    bar.finish_and_clear();
    drop(items);
    drop(users);

    if services.len() < 2 {
        return Err(ClueError::config(
            format!(
                "the logs hold {} service(s) ({}); pretraining pairs two services of each user",
                services.len(),
                services.join(", ")
            ),
            "give logs with at least two services, or split one service into two pseudo-services",
        ));
    }
    if let Some(empty) = services
        .iter()
        .enumerate()
        .find(|(s, _)| !item_texts.iter().any(|(svc, _)| *svc as usize == *s))
    {
        return Err(ClueError::config(
            format!("service `{}` has no rows in the logs", empty.1),
            "check the service names given to --services",
        ));
    }

    // 2. Finish every user: dedupe, truncate, filter. Users are ordered by id for determinism.
    let mut order: Vec<u32> = (0..user_names.len() as u32).collect();
    order.sort_unstable_by(|a, b| user_names[*a as usize].cmp(&user_names[*b as usize]));
    let mut dropped = Dropped::default();
    let mut kept: Vec<u32> = Vec::new();
    for &u in &order {
        let lists = &mut events[u as usize].services;
        lists.resize_with(services.len(), Vec::new);
        for list in lists.iter_mut() {
            duplicates += compact(list, max_items);
        }
        if lists.iter().any(|l| l.is_empty()) {
            dropped.missing_service += 1;
        } else if lists.iter().any(|l| l.len() < options.min_behaviors) {
            dropped.too_few_behaviors += 1;
        } else {
            kept.push(u);
            continue;
        }
        lists.clear();
        lists.shrink_to_fit();
    }
    if kept.is_empty() {
        return Err(ClueError::config(
            format!(
                "no user is left: {} lack a service, {} have fewer than {} behaviours in a service",
                dropped.missing_service, dropped.too_few_behaviors, options.min_behaviors
            ),
            "lower --min-behaviors, or check that the services share user ids",
        ));
    }

    // 3. The item table: only items that kept users reference, ordered by (service, text).
    let mut used = vec![false; item_texts.len()];
    for &u in &kept {
        for list in &events[u as usize].services {
            for e in list {
                used[e.item as usize] = true;
            }
        }
    }
    let mut table: Vec<u32> = (0..item_texts.len() as u32)
        .filter(|&i| used[i as usize])
        .collect();
    table.sort_unstable_by(|a, b| {
        let (sa, ta) = &item_texts[*a as usize];
        let (sb, tb) = &item_texts[*b as usize];
        services[*sa as usize]
            .cmp(&services[*sb as usize])
            .then(ta.cmp(tb))
    });
    let mut renumber = vec![u32::MAX; item_texts.len()];
    for (new, &old) in table.iter().enumerate() {
        renumber[old as usize] = new as u32;
    }

    // 4. Tokenizer: trained on each distinct text once, or loaded.
    let tokenizer = match &options.tokenizer {
        Some(path) => ItemTokenizer::load(path, &services)?,
        None => {
            let mut texts: Vec<&str> = table.iter().map(|&i| &*item_texts[i as usize].1).collect();
            texts.sort_unstable();
            texts.dedup();
            let vocab = options
                .vocab_size
                .unwrap_or_else(|| default_vocab_size(texts.len()));
            let spinner = ui::bar(texts.len() as u64, "tokenizer", false);
            let t = ItemTokenizer::train(texts.iter().copied(), vocab, &services)?;
            spinner.finish_and_clear();
            t
        }
    };

    // 5. Tokenise every item once, in chunks (parallel inside the tokenizer).
    let bar = ui::bar(table.len() as u64, "tokenising", false);
    let mut item_tokens: Vec<u32> = Vec::new();
    let mut item_offsets: Vec<u64> = vec![0];
    let mut token_hist = vec![0u64; options.max_item_tokens + 1];
    for chunk in table.chunks(16_384) {
        let batch: Vec<(usize, &str)> = chunk
            .iter()
            .map(|&i| {
                (
                    item_texts[i as usize].0 as usize,
                    &*item_texts[i as usize].1,
                )
            })
            .collect();
        for ids in tokenizer.encode_items(&batch, options.max_item_tokens)? {
            token_hist[ids.len()] += 1;
            item_tokens.extend_from_slice(&ids);
            item_offsets.push(item_tokens.len() as u64);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let item_services: Vec<u8> = table
        .iter()
        .map(|&i| item_texts[i as usize].0 as u8)
        .collect();

    // 6. Sequences: users × services, item indices oldest → newest.
    let mut seq_items: Vec<u32> = Vec::new();
    let mut seq_offsets: Vec<u64> = vec![0];
    let mut per_service_behaviors = vec![0u64; services.len()];
    let mut split = Vec::with_capacity(kept.len());
    let mut split_counts = [0u64; 3];
    let mut user_ids: Vec<&str> = Vec::with_capacity(kept.len());
    for &u in &kept {
        let name = &*user_names[u as usize];
        user_ids.push(name);
        let s = assign_split(
            options.seed,
            name,
            options.valid_fraction,
            options.test_fraction,
        );
        split.push(s as u8);
        split_counts[s as usize] += 1;
        for (svc, list) in events[u as usize].services.iter().enumerate() {
            per_service_behaviors[svc] += list.len() as u64;
            seq_items.extend(list.iter().map(|e| renumber[e.item as usize]));
            seq_offsets.push(seq_items.len() as u64);
        }
    }

    let manifest_base = Manifest {
        format_version: store::FORMAT_VERSION,
        services: services.clone(),
        users: kept.len() as u64,
        items: table.len() as u64,
        tokens: item_tokens.len() as u64,
        behaviors: seq_items.len() as u64,
        behaviors_per_service: per_service_behaviors,
        items_per_service: (0..services.len())
            .map(|s| item_services.iter().filter(|&&x| x as usize == s).count() as u64)
            .collect(),
        vocab_size: tokenizer.vocab_size() as u64,
        id_offset: tokenizer.id_offset,
        service_token_ids: tokenizer.service_ids.clone(),
        item_token_histogram: token_hist,
        rows_read: stats.rows,
        bad_rows: stats.bad.total(),
        rows_other_services: other_service_rows,
        duplicates_removed: duplicates,
        users_seen: user_names.len() as u64,
        users_dropped: dropped,
        split: store::SplitInfo {
            seed: options.seed,
            valid_fraction: options.valid_fraction,
            test_fraction: options.test_fraction,
            train: split_counts[Split::Train as usize],
            valid: split_counts[Split::Valid as usize],
            test: split_counts[Split::Test as usize],
        },
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

    // 7. Write everything into a temporary directory beside `out`, then rename it into place.
    let arrays = store::Arrays {
        item_tokens: &item_tokens,
        item_offsets: &item_offsets,
        item_services: &item_services,
        seq_items: &seq_items,
        seq_offsets: &seq_offsets,
        split: &split,
        user_ids: &user_ids,
    };
    let manifest = store::write(out, manifest_base, &arrays, &tokenizer)?;
    Ok(PrepareReport {
        manifest,
        rows_read: stats.rows,
        bad_rows: stats.bad,
        seconds: start.elapsed().as_secs_f64(),
    })
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

    fn ev(time: i64, row: u64, item: u32) -> Event {
        Event { time, row, item }
    }

    #[test]
    fn compact_keeps_latest_occurrence_and_most_recent_items() {
        let mut events = vec![
            ev(10, 1, 7),
            ev(5, 2, 8),
            ev(30, 3, 7),
            ev(20, 4, 9),
            ev(1, 5, 6),
        ];
        let removed = compact(&mut events, 3);
        assert_eq!(removed, 1);
        let items: Vec<u32> = events.iter().map(|e| e.item).collect();
        // Order by time: 6@1, 8@5, 9@20, 7@30 (the repeat of 7 at 10 is gone); keep the last 3.
        assert_eq!(items, vec![8, 9, 7]);
    }

    #[test]
    fn empty_timestamps_fall_back_to_file_order() {
        let mut events = vec![ev(i64::MIN, 3, 1), ev(i64::MIN, 1, 2), ev(i64::MIN, 2, 3)];
        compact(&mut events, 10);
        let items: Vec<u32> = events.iter().map(|e| e.item).collect();
        assert_eq!(items, vec![2, 3, 1]);
    }

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
