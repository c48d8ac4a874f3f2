//! `clue synth`: a seeded generator of realistic multi-service behaviour logs.
//!
//! The generative story (also in `datasets/README.md`):
//! - `K` latent topics; each topic has its own vocabulary, drawn separately for every text style,
//!   with only a part of the words shared between styles;
//! - each user has a sparse mixture of 1–3 topics and an activity level (log-normal, 3 to 400
//!   behaviours per service);
//! - two pretraining services with different text styles for the same interests: `search`
//!   (short queries, Unix-second timestamps) and `shop` (long product titles, RFC 3339);
//! - noise: off-interest behaviours, trending items shared by many users, repeated behaviours,
//!   typos in queries;
//! - downstream tasks: `news` (a third, held-out service of the same company, after each user's
//!   logs) and `market` (another company whose product titles use other templates and a partly
//!   different vocabulary; its users have their own ids).
//!
//! `--world dynamic` ([`dynamic`]) adds what more capacity, longer sequences and more data can
//! keep learning: sub-topics sharing words with their parent, interest drift, sequential
//! patterns within and across services, and users new to a service; the default `static` world
//! is the one above, byte for byte.
//!
//! Users are written in chunks whose rows are shuffled, so a user's rows are not contiguous.
//! The same seed gives the same bytes.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::store::{lock_output, publish_dir, temp_dir_beside};
use crate::error::{ClueError, Result};
use crate::ui;

mod dynamic;
mod tasks;
mod words;

use tasks::{MARKET_TASK, NEWS_TASK, TASK_PROTOCOL};
use words::{ADJECTIVES, MARKET_SPECS, MODIFIERS, NEWS_VERBS, SPECS, capitalise, word};

/// What `clue synth` writes.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub users: usize,
    pub seed: u64,
    pub world: WorldKind,
    /// Latent topics (`dynamic`: parent topics, each with [`SUBTOPICS`] sub-topics); `None`:
    /// [`topic_count`] of the users.
    pub topics: Option<usize>,
}

impl SynthOptions {
    /// `users` users of the static world (the embedded default's) with this seed.
    pub fn new(users: usize, seed: u64) -> Self {
        Self {
            users,
            seed,
            world: WorldKind::Static,
            topics: None,
        }
    }
}

/// Which generative story `clue synth` follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorldKind {
    /// Fixed topic mixtures: order carries nothing (the embedded default).
    #[default]
    Static,
    /// Sub-topics, interest drift, sequential patterns, users new to a service.
    Dynamic,
}

impl std::fmt::Display for WorldKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorldKind::Static => "static",
            WorldKind::Dynamic => "dynamic",
        })
    }
}

impl std::str::FromStr for WorldKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "static" => Ok(WorldKind::Static),
            "dynamic" => Ok(WorldKind::Dynamic),
            other => Err(format!("unknown world `{other}`: use static or dynamic")),
        }
    }
}

/// Counts of what was written.
#[derive(Debug, Default, Clone)]
pub struct SynthReport {
    pub users: usize,
    pub topics: usize,
    pub rows_per_service: Vec<(String, u64)>,
    pub task_interactions: Vec<(String, u64)>,
}

pub const MARKER: &str = "synth.json";
/// The most users `clue synth` writes.
pub const MAX_SYNTH_USERS: usize = 10_000_000;
pub const PRETRAIN_SERVICES: [&str; 2] = ["search", "shop"];

/// Number of latent topics for a population.
pub fn topic_count(users: usize) -> usize {
    (24 + users / 200).min(512)
}

/// Sub-topics per topic in the dynamic world.
pub const SUBTOPICS: usize = 4;
/// The most topics `--topics` takes.
pub const MAX_TOPICS: usize = 4096;

/// The latent world: per-topic vocabularies and item catalogues for every text style.
struct World {
    /// Leaf topics (the dynamic world's sub-topics), which users' interests are over.
    topics: usize,
    /// The dynamic world: the item that tends to follow each item, per style (search, shop,
    /// market), leaf topic and item; empty when static.
    next: Vec<Vec<Vec<usize>>>,
    search: Vec<Vec<String>>,
    shop: Vec<Vec<String>>,
    news: Vec<Vec<String>>,
    market: Vec<Vec<String>>,
    /// Trending items per style: `(topic, index in that topic's catalogue)`.
    trending: Vec<(usize, usize)>,
}

fn pick<'a>(rng: &mut ChaCha8Rng, words: &'a [String]) -> &'a str {
    words.choose(rng).expect("non-empty")
}

impl World {
    /// Not `hierarchical`: the static world of `topics` flat topics; otherwise `topics` parents with
    /// [`SUBTOPICS`] leaves each, whose cores share half their words with the parent's.
    fn new(seed: u64, topics: usize, hierarchical: bool) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(u64::MAX);
        let brands: Vec<String> = (0..40).map(|_| capitalise(&word(&mut rng))).collect();
        let market_brands: Vec<String> = (0..20).map(|_| word(&mut rng).to_uppercase()).collect();
        let parent_cores: Vec<Vec<String>> = match hierarchical {
            true => (0..topics)
                .map(|_| (0..6).map(|_| word(&mut rng)).collect())
                .collect(),
            false => Vec::new(),
        };
        let leaves = topics * if hierarchical { SUBTOPICS } else { 1 };
        let (mut search, mut shop, mut news, mut market) = (vec![], vec![], vec![], vec![]);
        for leaf in 0..leaves {
            // Each style sees 12 words of the topic; styles share only some of them, so a model
            // must learn which query words go with which product words. A sub-topic's core
            // holds 3 of its parent's 6 words: siblings share words a larger model must tell
            // apart.
            let core: Vec<String> = match parent_cores.get(leaf / SUBTOPICS) {
                Some(parent) => {
                    let mut c: Vec<String> = parent.choose_multiple(&mut rng, 3).cloned().collect();
                    c.extend((0..3).map(|_| word(&mut rng)));
                    c
                }
                None => (0..6).map(|_| word(&mut rng)).collect(),
            };
            let style = |rng: &mut ChaCha8Rng, shared: usize| -> Vec<String> {
                let mut w: Vec<String> = core.choose_multiple(rng, shared).cloned().collect();
                w.extend((0..12 - shared).map(|_| word(rng)));
                w
            };
            let (q, p, n, m) = (
                style(&mut rng, 4),
                style(&mut rng, 4),
                style(&mut rng, 4),
                style(&mut rng, 3),
            );
            search.push(
                (0..60)
                    .map(|_| {
                        let k = rng.random_range(1..=3);
                        let mut words: Vec<&str> = (0..k).map(|_| pick(&mut rng, &q)).collect();
                        if rng.random_bool(0.4) {
                            words.push(MODIFIERS.choose(&mut rng).expect("non-empty"));
                        }
                        words.join(" ")
                    })
                    .collect(),
            );
            shop.push(
                (0..100)
                    .map(|_| {
                        format!(
                            "{} {} {} {} for {} - {}",
                            pick(&mut rng, &brands),
                            ADJECTIVES.choose(&mut rng).expect("non-empty"),
                            capitalise(pick(&mut rng, &p)),
                            capitalise(pick(&mut rng, &p)),
                            pick(&mut rng, &p),
                            SPECS.choose(&mut rng).expect("non-empty"),
                        )
                    })
                    .collect(),
            );
            news.push(
                (0..40)
                    .map(|_| {
                        format!(
                            "{} {} {} as {} {}",
                            capitalise(pick(&mut rng, &n)),
                            NEWS_VERBS.choose(&mut rng).expect("non-empty"),
                            pick(&mut rng, &n),
                            pick(&mut rng, &n),
                            pick(&mut rng, &n),
                        )
                    })
                    .collect(),
            );
            market.push(
                (0..60)
                    .map(|_| {
                        format!(
                            "[{}] {} {} {} ({})",
                            pick(&mut rng, &market_brands),
                            pick(&mut rng, &m),
                            pick(&mut rng, &m),
                            pick(&mut rng, &m),
                            MARKET_SPECS.choose(&mut rng).expect("non-empty"),
                        )
                    })
                    .collect(),
            );
        }
        let trending = (0..20)
            .map(|_| (rng.random_range(0..leaves), rng.random_range(0..10)))
            .collect();
        let next = match hierarchical {
            true => [&search, &shop, &market]
                .iter()
                .map(|c: &&Vec<Vec<String>>| c.iter().map(|x| cycle(&mut rng, x.len())).collect())
                .collect(),
            false => Vec::new(),
        };
        Self {
            topics: leaves,
            next,
            search,
            shop,
            news,
            market,
            trending,
        }
    }
}

/// A seeded cycle through `0..n`: `next[i]` is the item after `i`.
fn cycle(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut next = vec![0; n];
    for k in 0..n {
        next[order[k]] = order[(k + 1) % n];
    }
    next
}

/// One user's latent profile.
pub struct Profile {
    /// `(topic, weight)`, weights summing to 1.
    pub topics: Vec<(usize, f64)>,
    /// Median behaviours per service for this user.
    pub activity: f64,
    pub start: i64,
}

fn user_rng(seed: u64, user: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(user as u64);
    rng
}

fn profile(rng: &mut ChaCha8Rng, topics: usize) -> Profile {
    let k = match rng.random_range(0..100) {
        0..30 => 1,
        30..75 => 2,
        _ => 3,
    };
    let chosen: Vec<usize> = rand::seq::index::sample(rng, topics, k).into_vec();
    let raw: Vec<f64> = chosen.iter().map(|_| rng.random_range(0.2..1.0)).collect();
    let total: f64 = raw.iter().sum();
    // Log-normal activity: median 16 behaviours per service, heavy tail.
    let normal: f64 = (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0;
    Profile {
        topics: chosen
            .into_iter()
            .zip(raw.into_iter().map(|w| w / total))
            .collect(),
        activity: (16f64.ln() + 0.8 * normal).exp().clamp(3.0, 400.0),
        start: 1_600_000_000 + rng.random_range(0..31_536_000),
    }
}

/// Draw one item of a catalogue family for a user: mostly from the user's own topics (skewed
/// to each catalogue's head), sometimes off-interest, sometimes trending. Returns (topic, index).
fn draw(
    rng: &mut ChaCha8Rng,
    profile: &Profile,
    world: &World,
    catalogue: &[Vec<String>],
) -> (usize, usize) {
    let r: f64 = rng.random();
    let topic = if r < 0.08 {
        let (t, i) = *world.trending.choose(rng).expect("non-empty");
        return (t, i % catalogue[t].len());
    } else if r < 0.18 {
        rng.random_range(0..world.topics)
    } else {
        let mut x: f64 = rng.random();
        let mut t = profile.topics[0].0;
        for &(topic, w) in &profile.topics {
            t = topic;
            if x < w {
                break;
            }
            x -= w;
        }
        t
    };
    (topic, head(rng, catalogue[topic].len()))
}

/// The first index of the text at `index`: a task item is named by the first id of its text.
fn first_index(items: &[String], index: usize) -> usize {
    items
        .iter()
        .position(|x| *x == items[index])
        .unwrap_or(index)
}

/// An index into a catalogue of `n` items, skewed to its head (popular items).
fn head(rng: &mut ChaCha8Rng, n: usize) -> usize {
    let u: f64 = rng.random();
    ((u * u) * n as f64) as usize
}

fn typo(rng: &mut ChaCha8Rng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    if chars.len() > 3 {
        let i = rng.random_range(0..chars.len() - 1);
        chars.swap(i, i + 1);
    }
    chars.into_iter().collect()
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

struct Writers {
    search: csv::Writer<BufWriter<File>>,
    shop: csv::Writer<BufWriter<File>>,
    news: csv::Writer<BufWriter<File>>,
    market: csv::Writer<BufWriter<File>>,
    truth: csv::Writer<BufWriter<File>>,
}

fn writer(path: &Path, header: &[&str]) -> Result<csv::Writer<BufWriter<File>>> {
    let file = File::create(path).map_err(|e| ClueError::io(path, e))?;
    let mut w = csv::Writer::from_writer(BufWriter::with_capacity(1 << 20, file));
    w.write_record(header)
        .map_err(|e| ClueError::io(path, e.into()))?;
    Ok(w)
}

/// Write `clue synth` output into `out` (atomically: a temporary directory renamed at the end).
pub fn synth(out: &Path, options: &SynthOptions) -> Result<SynthReport> {
    if let Some(t) = options.topics
        && !(1..=MAX_TOPICS).contains(&t)
    {
        return Err(ClueError::config(
            format!("--topics {t} is not between 1 and {MAX_TOPICS}"),
            "e.g. --topics 64, or leave it out for 24 + users/200",
        ));
    }
    if !(10..=MAX_SYNTH_USERS).contains(&options.users) {
        return Err(ClueError::config(
            format!(
                "--users must be between 10 and {MAX_SYNTH_USERS} (each user writes ~4 KB of \
                 logs and tasks: the limit is ~40 GB)"
            ),
            "e.g. --users 2000",
        ));
    }
    let _lock = lock_output(out, "synth")?;
    let tmp = temp_dir_beside(out)?;
    let result = write_all(&tmp, options).and_then(|report| {
        publish_dir(&tmp, out, MARKER)?;
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_all(dir: &Path, options: &SynthOptions) -> Result<SynthReport> {
    for sub in ["logs", "tasks/news", "tasks/market", "truth"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| ClueError::io(dir.join(sub), e))?;
    }
    let topics = options.topics.unwrap_or(topic_count(options.users));
    let dynamic = options.world == WorldKind::Dynamic;
    let world = World::new(options.seed, topics, dynamic);
    let truth_header: &[&str] = match dynamic {
        true => &dynamic::TRUTH_HEADER,
        false => &["user_id", "topics"],
    };
    let log_header = ["user_id", "service", "timestamp", "text"];
    let task_header = ["user_id", "item_id", "timestamp"];
    let mut w = Writers {
        search: writer(&dir.join("logs/search.csv"), &log_header)?,
        shop: writer(&dir.join("logs/shop.csv"), &log_header)?,
        news: writer(&dir.join("tasks/news/interactions.csv"), &task_header)?,
        market: writer(&dir.join("tasks/market/interactions.csv"), &task_header)?,
        truth: writer(&dir.join("truth/users.csv"), truth_header)?,
    };
    let mut counts = [0u64; 4];
    let chunk = 1_000;
    let bar = ui::bar(options.users as u64, "synth", false);
    let mut rows: Vec<(u8, [String; 4])> = Vec::new();
    for start in (0..options.users).step_by(chunk) {
        rows.clear();
        for u in start..(start + chunk).min(options.users) {
            match dynamic {
                true => dynamic::user_rows(u, options.seed, &world, &mut rows),
                false => user_rows(u, options.seed, &world, &mut rows),
            }
        }
        let mut shuffle = user_rng(options.seed, usize::MAX - start);
        rows.shuffle(&mut shuffle);
        for (kind, row) in &rows {
            let target = match kind {
                0 => &mut w.search,
                1 => &mut w.shop,
                2 => &mut w.news,
                3 => &mut w.market,
                _ => &mut w.truth,
            };
            let columns = match kind {
                0 | 1 => 4,
                2 | 3 => 3,
                _ => truth_header.len(),
            };
            target
                .write_record(&row[..columns])
                .map_err(|e| ClueError::io(dir, e.into()))?;
            if (*kind as usize) < 4 {
                counts[*kind as usize] += 1;
            }
        }
        bar.set_position((start + chunk).min(options.users) as u64);
    }
    bar.finish_and_clear();
    for mut x in [w.search, w.shop, w.news, w.market, w.truth] {
        x.flush().map_err(|e| ClueError::io(dir, e))?;
    }
    write_items(&dir.join("tasks/news/items.csv"), &world.news)?;
    write_items(&dir.join("tasks/market/items.csv"), &world.market)?;
    write_truth_items(&dir.join("truth/items.csv"), &world)?;
    if dynamic {
        dynamic::write_topics(&dir.join("truth/topics.csv"), &world)?;
    }
    for (name, text) in [("news", NEWS_TASK), ("market", MARKET_TASK)] {
        let path = dir.join(format!("tasks/{name}.toml"));
        std::fs::write(&path, format!("{text}{TASK_PROTOCOL}"))
            .map_err(|e| ClueError::io(&path, e))?;
    }
    let report = SynthReport {
        users: options.users,
        topics,
        rows_per_service: vec![("search".into(), counts[0]), ("shop".into(), counts[1])],
        task_interactions: vec![("news".into(), counts[2]), ("market".into(), counts[3])],
    };
    let marker = serde_json::json!({
        "generator": "clue synth",
        "version": env!("CARGO_PKG_VERSION"),
        "users": options.users,
        "seed": options.seed,
        "world": options.world.to_string(),
        "topics": topics,
        "leaf_topics": world.topics,
        "rows": {"search": counts[0], "shop": counts[1]},
        "task_interactions": {"news": counts[2], "market": counts[3]},
    });
    std::fs::write(
        dir.join(MARKER),
        serde_json::to_string_pretty(&marker).expect("json") + "\n",
    )
    .map_err(|e| ClueError::io(dir.join(MARKER), e))?;
    Ok(report)
}

/// Item ids of a task catalogue: `n<topic>_<index>`.
fn item_id(prefix: char, topic: usize, index: usize) -> String {
    format!("{prefix}{topic}_{index}")
}

fn write_items(path: &Path, catalogue: &[Vec<String>]) -> Result<()> {
    let mut w = writer(path, &["item_id", "text"])?;
    let prefix = if path.to_string_lossy().contains("news") {
        'n'
    } else {
        'm'
    };
    for (t, items) in catalogue.iter().enumerate() {
        for (i, text) in items.iter().enumerate() {
            w.write_record([item_id(prefix, t, i).as_str(), text.as_str()])
                .map_err(|e| ClueError::io(path, e.into()))?;
        }
    }
    w.flush().map_err(|e| ClueError::io(path, e))
}

/// `truth/items.csv`: the latent topic of every pretraining item text.
fn write_truth_items(path: &Path, world: &World) -> Result<()> {
    let mut w = writer(path, &["service", "topic", "text"])?;
    for (service, catalogue) in [("search", &world.search), ("shop", &world.shop)] {
        for (t, items) in catalogue.iter().enumerate() {
            for text in items {
                w.write_record([service, &t.to_string(), text])
                    .map_err(|e| ClueError::io(path, e.into()))?;
            }
        }
    }
    w.flush().map_err(|e| ClueError::io(path, e))
}

/// Rows of one user: kind 0 search, 1 shop, 2 news task, 3 market task, 4 ground truth.
fn user_rows(u: usize, seed: u64, world: &World, rows: &mut Vec<(u8, [String; 4])>) {
    let mut rng = user_rng(seed, u);
    let p = profile(&mut rng, world.topics);
    let user = format!("u{u:07}");
    let mut last = 0i64;
    for (kind, catalogue) in [(0u8, &world.search), (1u8, &world.shop)] {
        let n = (p.activity * rng.random_range(0.6..1.6)).round().max(3.0) as usize;
        let mut history: Vec<String> = Vec::with_capacity(n);
        let mut time = p.start;
        for _ in 0..n {
            time += rng.random_range(60..86_400 * 3);
            let text = if !history.is_empty() && rng.random_bool(0.12) {
                history.choose(&mut rng).expect("non-empty").clone()
            } else {
                let (topic, i) = draw(&mut rng, &p, world, catalogue);
                let t = &catalogue[topic][i];
                if kind == 0 && rng.random_bool(0.05) {
                    typo(&mut rng, t)
                } else {
                    t.to_string()
                }
            };
            let stamp = if kind == 0 {
                time.to_string()
            } else {
                rfc3339(time)
            };
            history.push(text.clone());
            rows.push((
                kind,
                [
                    user.clone(),
                    PRETRAIN_SERVICES[kind as usize].to_string(),
                    stamp,
                    text,
                ],
            ));
        }
        last = last.max(time);
    }
    // News happens after the pretraining logs, so features never see a target.
    let mut t = last;
    for _ in 0..rng.random_range(3..=10) {
        t += rng.random_range(600..86_400);
        let (topic, index) = draw(&mut rng, &p, world, &world.news);
        let index = first_index(&world.news[topic], index);
        rows.push((
            2,
            [
                user.clone(),
                item_id('n', topic, index),
                t.to_string(),
                String::new(),
            ],
        ));
    }
    // Half of the users also shop at another company, under another id.
    if rng.random_bool(0.5) {
        let mut t = p.start;
        for _ in 0..rng.random_range(5..=15) {
            t += rng.random_range(3_600..86_400 * 7);
            let (topic, index) = draw(&mut rng, &p, world, &world.market);
            let index = first_index(&world.market[topic], index);
            rows.push((
                3,
                [
                    format!("m{u:07}"),
                    item_id('m', topic, index),
                    t.to_string(),
                    String::new(),
                ],
            ));
        }
    }
    let topics: Vec<String> = p
        .topics
        .iter()
        .map(|(t, w)| format!("{t}:{w:.3}"))
        .collect();
    rows.push((4, [user, topics.join(" "), String::new(), String::new()]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_sparse_mixtures() {
        let mut rng = user_rng(1, 3);
        for _ in 0..100 {
            let p = profile(&mut rng, 40);
            assert!((1..=3).contains(&p.topics.len()));
            let total: f64 = p.topics.iter().map(|(_, w)| w).sum();
            assert!((total - 1.0).abs() < 1e-9);
            assert!((3.0..=400.0).contains(&p.activity));
        }
    }
}
