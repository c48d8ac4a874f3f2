//! `clue synth`: determinism and the property pretraining relies on — a user's two services are
//! related through the user's latent topics, far above chance.

use std::collections::{HashMap, HashSet};

use clue::data::synth::{SynthOptions, synth};

mod common;

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("a", 4), ("b", 4), ("c", 5)] {
        synth(&dir.path().join(name), &SynthOptions { users: 250, seed }).unwrap();
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
    synth(
        dir.path(),
        &SynthOptions {
            users: 400,
            seed: 2,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
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
    synth(
        dir.path(),
        &SynthOptions {
            users: 100,
            seed: 0,
        },
    )
    .unwrap();
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
