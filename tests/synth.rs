//! `clue synth`: determinism and the property pretraining relies on — a user's two services are
//! related through the user's latent topics, far above chance.

use std::collections::{HashMap, HashSet};

use clue::data::synth::{SynthOptions, WorldKind, synth};

mod common;

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("a", 4), ("b", 4), ("c", 5)] {
        synth(&dir.path().join(name), &SynthOptions::new(250, seed)).unwrap();
    }
    let files = |d: &str| common::dir_bytes(&dir.path().join(d).join("logs"));
    assert_eq!(files("a"), files("b"));
    assert_ne!(files("a"), files("c"));
}

fn read(path: &std::path::Path) -> Vec<Vec<String>> {
    let mut r = csv::Reader::from_path(path).unwrap();
    r.records()
        .map(|x| x.unwrap().iter().map(str::to_string).collect())
        .collect()
}

#[test]
fn the_two_services_of_a_user_share_topics_far_above_chance() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &SynthOptions::new(400, 2)).unwrap_or_else(|e| panic!("{e}"));
    let mut topic_of: HashMap<(String, String), usize> = HashMap::new();
    for row in read(&dir.path().join("truth/items.csv")) {
        topic_of
            .entry((row[0].clone(), row[2].clone()))
            .or_insert(row[1].parse().unwrap());
    }
    let mut topics: HashMap<String, [HashSet<usize>; 2]> = HashMap::new();
    for (s, service) in ["search", "shop"].iter().enumerate() {
        for row in read(&dir.path().join(format!("logs/{service}.csv"))) {
            if let Some(&t) = topic_of.get(&(service.to_string(), row[3].clone())) {
                topics.entry(row[0].clone()).or_default()[s].insert(t);
            }
        }
    }
    let users: Vec<&String> = {
        let mut u: Vec<&String> = topics.keys().collect();
        u.sort();
        u
    };
    let jaccard = |a: &HashSet<usize>, b: &HashSet<usize>| {
        a.intersection(b).count() as f64 / a.union(b).count().max(1) as f64
    };
    let n = users.len();
    let same: f64 = users
        .iter()
        .map(|u| jaccard(&topics[*u][0], &topics[*u][1]))
        .sum::<f64>()
        / n as f64;
    let other: f64 = (0..n)
        .map(|i| jaccard(&topics[users[i]][0], &topics[users[(i + 7) % n]][1]))
        .sum::<f64>()
        / n as f64;
    assert!(
        same > 3.0 * other,
        "same user {same:.3} vs other users {other:.3}"
    );
    // No text reveals the user: every search text is shared by several users on average.
    let mut users_per_text: HashMap<String, HashSet<String>> = HashMap::new();
    for row in read(&dir.path().join("logs/search.csv")) {
        users_per_text
            .entry(row[3].clone())
            .or_default()
            .insert(row[0].clone());
    }
    let mean = users_per_text.values().map(|s| s.len()).sum::<usize>() as f64
        / users_per_text.len() as f64;
    assert!(mean > 2.0, "{mean}");
}

#[test]
fn task_files_follow_the_task_format_and_come_after_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &SynthOptions::new(100, 0)).unwrap();
    let items: HashSet<String> = read(&dir.path().join("tasks/news/items.csv"))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let mut last_log: HashMap<String, i64> = HashMap::new();
    for row in read(&dir.path().join("logs/search.csv")) {
        let t: i64 = row[2].parse().unwrap();
        let e = last_log.entry(row[0].clone()).or_insert(t);
        *e = (*e).max(t);
    }
    for row in read(&dir.path().join("tasks/news/interactions.csv")) {
        assert_eq!(row.len(), 3);
        assert!(items.contains(&row[1]));
        assert!(row[2].parse::<i64>().unwrap() > last_log[&row[0]]);
    }
    let market = read(&dir.path().join("tasks/market/interactions.csv"));
    assert!(!market.is_empty() && market.iter().all(|r| r[0].starts_with('m')));
}

/// The static world (the embedded default's) is the one clue wrote before the dynamic world
/// existed, byte for byte (hashes written by the earlier release).
#[test]
fn the_static_world_is_unchanged() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), &SynthOptions::new(250, 4)).unwrap();
    for (file, want) in [
        (
            "logs/search.csv",
            "ff385d041778391b25a355f58af839d61b2082d923e49901b63d75d5876ef397",
        ),
        (
            "logs/shop.csv",
            "be89a4634421e0d8f0732c6890bfeeec0434813cdf2dfecded4895338016e336",
        ),
        (
            "tasks/news/interactions.csv",
            "4fd2713ea923864012d5dbc4cc87c27853f0baf1fd8e1315121b1e8b00c140fd",
        ),
        (
            "tasks/market/interactions.csv",
            "0fef29e68ce8888a036873f4981dbc2f5588fdda6f5ddfb8a6818780dde8721d",
        ),
        (
            "truth/users.csv",
            "fc57fa640f08618d8bb5f87110a318ec6f01bd4909954296c423edce0499e3d5",
        ),
    ] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap();
        let got: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, want, "{file}");
    }
}

fn dynamic(users: usize, seed: u64, dir: &std::path::Path) {
    let options = SynthOptions {
        world: WorldKind::Dynamic,
        ..SynthOptions::new(users, seed)
    };
    synth(dir, &options).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_dynamic_world_is_deterministic_and_another_world() {
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("a", 4), ("b", 4)] {
        dynamic(250, seed, &dir.path().join(name));
    }
    synth(&dir.path().join("s"), &SynthOptions::new(250, 4)).unwrap();
    let files = |d: &str| common::dir_bytes(&dir.path().join(d).join("logs"));
    assert_eq!(files("a"), files("b"));
    assert_ne!(files("a"), files("s"));
}

/// Per user: search texts in time order, and each text's (leaf) topic from the truth.
struct Logs {
    search: HashMap<String, Vec<String>>,
    topic: HashMap<String, usize>,
    news: HashMap<String, Vec<usize>>,
}

fn logs(dir: &std::path::Path) -> Logs {
    let mut topic = HashMap::new();
    for row in read(&dir.join("truth/items.csv")) {
        if row[0] == "search" {
            topic
                .entry(row[2].clone())
                .or_insert(row[1].parse().unwrap());
        }
    }
    let mut timed: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for row in read(&dir.join("logs/search.csv")) {
        let t = row[2].parse().unwrap();
        timed
            .entry(row[0].clone())
            .or_default()
            .push((t, row[3].clone()));
    }
    let search = timed
        .into_iter()
        .map(|(u, mut v)| {
            v.sort();
            (u, v.into_iter().map(|x| x.1).collect())
        })
        .collect();
    let mut news: HashMap<String, Vec<usize>> = HashMap::new();
    for row in read(&dir.join("tasks/news/interactions.csv")) {
        let leaf = row[1][1..].split('_').next().unwrap().parse().unwrap();
        news.entry(row[0].clone()).or_default().push(leaf);
    }
    Logs {
        search,
        topic,
        news,
    }
}

/// Mean over users of (share of news reads whose topic is among the last quarter of their
/// searches' topics) − (the same for the first quarter).
fn recency_gain(l: &Logs) -> f64 {
    let mut gains = Vec::new();
    for (user, texts) in &l.search {
        let topics: Vec<usize> = texts
            .iter()
            .filter_map(|t| l.topic.get(t).copied())
            .collect();
        let q = topics.len() / 4;
        let (Some(news), true) = (l.news.get(user), q > 0) else {
            continue;
        };
        let (first, last): (HashSet<usize>, HashSet<usize>) = (
            topics[..q].iter().copied().collect(),
            topics[topics.len() - q..].iter().copied().collect(),
        );
        let share = |s: &HashSet<usize>| {
            news.iter().filter(|t| s.contains(t)).count() as f64 / news.len() as f64
        };
        gains.push(share(&last) - share(&first));
    }
    gains.iter().sum::<f64>() / gains.len() as f64
}

/// Share of consecutive (different) search pairs that another user also has in that order;
/// `shuffled`: of the same searches in a seeded random order (the level a bag of items gives).
fn shared_transitions(l: &Logs, shuffled: bool) -> f64 {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut users_of: HashMap<(&str, &str), HashSet<&str>> = HashMap::new();
    let mut users: Vec<&String> = l.search.keys().collect();
    users.sort();
    for user in users {
        let mut texts: Vec<&String> = l.search[user].iter().collect();
        if shuffled {
            texts.shuffle(&mut rng);
        }
        for w in texts.windows(2).filter(|w| w[0] != w[1]) {
            let pair = (w[0].as_str(), w[1].as_str());
            users_of.entry(pair).or_default().insert(user.as_str());
        }
    }
    let total: usize = users_of.values().map(HashSet::len).sum();
    let shared: usize = users_of.values().map(HashSet::len).filter(|&n| n > 1).sum();
    shared as f64 / total as f64
}

#[test]
fn in_the_dynamic_world_recent_behaviour_and_order_carry_signal_that_the_static_world_lacks() {
    let dir = tempfile::tempdir().unwrap();
    dynamic(600, 3, &dir.path().join("d"));
    synth(&dir.path().join("s"), &SynthOptions::new(600, 3)).unwrap();
    let (d, s) = (logs(&dir.path().join("d")), logs(&dir.path().join("s")));
    let (gain_d, gain_s) = (recency_gain(&d), recency_gain(&s));
    println!("recency gain: dynamic {gain_d:.3}, static {gain_s:.3}");
    assert!(gain_s.abs() < 0.05, "static {gain_s:.3}");
    assert!(gain_d > 0.1, "dynamic {gain_d:.3}");
    // Order: consecutive pairs recur across users beyond what the same bags in a random order
    // give (the successors), in the dynamic world only.
    let order = |l: &Logs| (shared_transitions(l, false), shared_transitions(l, true));
    let ((d_order, d_bag), (s_order, s_bag)) = (order(&d), order(&s));
    println!(
        "shared transitions (in order / shuffled): dynamic {d_order:.3} / {d_bag:.3}, static {s_order:.3} / {s_bag:.3}"
    );
    assert!(d_order > 2.0 * d_bag, "dynamic {d_order:.3} / {d_bag:.3}");
    assert!(s_order < 1.3 * s_bag, "static {s_order:.3} / {s_bag:.3}");
}

#[test]
fn dynamic_sub_topics_share_words_with_their_siblings_and_users_have_groups() {
    let dir = tempfile::tempdir().unwrap();
    dynamic(400, 1, dir.path());
    let parent: HashMap<usize, usize> = read(&dir.path().join("truth/topics.csv"))
        .into_iter()
        .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
        .collect();
    let mut words: HashMap<usize, HashSet<String>> = HashMap::new();
    for row in read(&dir.path().join("truth/items.csv")) {
        if row[0] == "search" {
            let w = words.entry(row[1].parse().unwrap()).or_default();
            w.extend(row[2].split(' ').map(str::to_string));
        }
    }
    // Words of many sub-topics ("best", "near me", …) say nothing about the tree.
    let mut spread: HashMap<String, usize> = HashMap::new();
    for w in words.values().flatten() {
        *spread.entry(w.clone()).or_default() += 1;
    }
    for w in words.values_mut() {
        w.retain(|x| spread[x] * 10 <= parent.len());
    }
    let jaccard = |a: usize, b: usize| {
        let (a, b) = (&words[&a], &words[&b]);
        a.intersection(b).count() as f64 / a.union(b).count() as f64
    };
    let (mut sib, mut other) = (Vec::new(), Vec::new());
    for a in 0..parent.len() {
        for b in a + 1..parent.len() {
            let v = jaccard(a, b);
            match parent[&a] == parent[&b] {
                true => sib.push(v),
                false => other.push(v),
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (sib, other) = (mean(&sib), mean(&other));
    println!("word overlap: siblings {sib:.3}, others {other:.3}");
    assert!(
        sib > 0.02 && sib > 5.0 * other,
        "siblings {sib:.3}, others {other:.3}"
    );
    // Groups: `new` users have no shop row, cold ones at most 5 rows, heavy ones at least 45.
    let mut rows: HashMap<String, [usize; 2]> = HashMap::new();
    for (s, service) in ["search", "shop"].iter().enumerate() {
        for row in read(&dir.path().join(format!("logs/{service}.csv"))) {
            rows.entry(row[0].clone()).or_default()[s] += 1;
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for row in read(&dir.path().join("truth/users.csv")) {
        for (s, g) in row[3].split(' ').enumerate() {
            let n = rows.get(&row[0]).map_or(0, |r| r[s]);
            let group = g.split('=').nth(1).unwrap();
            let ok = match group {
                "new" => n == 0,
                "cold" => (1..=5).contains(&n),
                "heavy" => n >= 45,
                _ => (6..45).contains(&n),
            };
            assert!(ok, "{} {g} with {n} rows", row[0]);
            *seen.entry(group.to_string()).or_default() += 1;
        }
    }
    for g in ["new", "cold", "regular", "heavy"] {
        assert!(seen.get(g).is_some_and(|&n| n >= 10), "{g}: {seen:?}");
    }
}
