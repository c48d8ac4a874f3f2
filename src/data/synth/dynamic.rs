//! `clue synth --world dynamic`: a world whose order, recency and finer interests carry
//! signal, so that more capacity, longer sequences and more data keep paying off.
//!
//! On top of the static story (same texts, catalogues, noise and timestamps):
//! - **sub-topics**: every topic has [`SUBTOPICS`] sub-topics whose cores share half their words
//!   with the parent's; interests, items and tasks are over sub-topics;
//! - **interest drift**: a user's mixture moves from a start mixture to an end mixture along
//!   their timeline (one interest is replaced: half the time by a sibling sub-topic, otherwise
//!   by another sub-topic), so recent behaviour predicts the future better than old behaviour;
//! - **sequential patterns**: within a service, an item is followed by its successor (a seeded
//!   cycle through its sub-topic's catalogue) with probability [`P_NEXT`]; across services, a
//!   purchase right after a search comes from the search's sub-topic with probability
//!   [`P_FOLLOW`];
//! - **user groups**: [`P_NEW_TO_SHOP`] of the users never shop (new to `shop`); `truth/users.csv`
//!   records each user's group per service (new, cold ≤ [`COLD`] behaviours, heavy ≥ [`HEAVY`],
//!   else regular);
//! - **tasks that need the recent, sequential part**: a news read comes from one of the sub-topics
//!   of the user's last [`RECENT`] behaviours with probability [`P_RECENT`], otherwise from the
//!   end mixture; a market history drifts and follows successors like the logs.

use std::path::Path;

use rand::Rng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;

use super::{
    PRETRAIN_SERVICES, Profile, SUBTOPICS, World, draw, first_index, head, item_id, profile,
    rfc3339, typo, user_rng, writer,
};
use crate::error::{ClueError, Result};

/// Probability that a behaviour is the successor of the previous one in its service.
pub const P_NEXT: f64 = 0.35;
/// Probability that a purchase right after a search comes from the search's sub-topic.
pub const P_FOLLOW: f64 = 0.5;
/// Users without any `shop` behaviour.
pub const P_NEW_TO_SHOP: f64 = 0.1;
/// Most behaviours in a service of a cold user, fewest of a heavy one (about the 10th and 90th
/// percentiles of the activity distribution).
pub const COLD: usize = 5;
pub const HEAVY: usize = 45;
/// A news read comes from the sub-topic of one of the last `RECENT` behaviours with
/// probability `P_RECENT`.
pub const RECENT: usize = 5;
pub const P_RECENT: f64 = 0.5;

/// `truth/users.csv` of the dynamic world.
pub const TRUTH_HEADER: [&str; 4] = ["user_id", "topics", "topics_end", "groups"];

/// The mixture at position `tau` ∈ [0, 1] of the user's timeline.
fn at(start: &Profile, end: &[(usize, f64)], tau: f64) -> Profile {
    let mut topics: Vec<(usize, f64)> = Vec::with_capacity(start.topics.len() + 1);
    let weighted = start.topics.iter().map(|&(t, w)| (t, w * (1.0 - tau)));
    for (t, w) in weighted.chain(end.iter().map(|&(t, w)| (t, w * tau))) {
        match topics.iter_mut().find(|x| x.0 == t) {
            Some(x) => x.1 += w,
            None => topics.push((t, w)),
        }
    }
    Profile {
        topics,
        activity: start.activity,
        start: start.start,
    }
}

/// The end mixture: one interest replaced, half the time by a sibling sub-topic.
fn drift(rng: &mut ChaCha8Rng, start: &Profile, world: &World) -> Vec<(usize, f64)> {
    let mut end = start.topics.clone();
    let j = rng.random_range(0..end.len());
    let old = end[j].0;
    let new = if rng.random_bool(0.5) {
        let parent = old / SUBTOPICS;
        parent * SUBTOPICS + (old % SUBTOPICS + rng.random_range(1..SUBTOPICS)) % SUBTOPICS
    } else {
        rng.random_range(0..world.topics)
    };
    if !end.iter().any(|x| x.0 == new) {
        end[j].0 = new;
    }
    end
}

fn group(n: usize) -> &'static str {
    match n {
        0 => "new",
        1..=COLD => "cold",
        HEAVY.. => "heavy",
        _ => "regular",
    }
}

/// Rows of one user (kinds as in the static world: 0 search, 1 shop, 2 news, 3 market,
/// 4 ground truth).
pub(super) fn user_rows(u: usize, seed: u64, world: &World, rows: &mut Vec<(u8, [String; 4])>) {
    let mut rng = user_rng(seed, u);
    let p = profile(&mut rng, world.topics);
    let end = drift(&mut rng, &p, world);
    let user = format!("u{u:07}");
    let count = |rng: &mut ChaCha8Rng| (p.activity * rng.random_range(0.6..1.6)).round().max(3.0);
    let n_search = count(&mut rng) as usize;
    let n_shop = match rng.random_bool(P_NEW_TO_SHOP) {
        true => 0,
        false => count(&mut rng) as usize,
    };
    let total = n_search + n_shop;
    let mut left = [n_search, n_shop];
    // Per service: the texts so far (for repeats) and the last drawn (topic, index).
    let mut history: [Vec<String>; 2] = Default::default();
    let mut last: [Option<(usize, usize)>; 2] = [None, None];
    let mut previous_kind = None;
    let mut recent: Vec<usize> = Vec::new();
    let mut time = p.start;
    for e in 0..total {
        let kind = usize::from(rng.random_range(0..left[0] + left[1]) >= left[0]);
        left[kind] -= 1;
        time += rng.random_range(60..86_400 * 2);
        let catalogue = [&world.search, &world.shop][kind];
        let text = if !history[kind].is_empty() && rng.random_bool(0.12) {
            history[kind].choose(&mut rng).expect("non-empty").clone()
        } else {
            let (topic, i) = match (last[kind], previous_kind, last[0]) {
                (Some((t, i)), ..) if rng.random_bool(P_NEXT) => (t, world.next[kind][t][i]),
                (_, Some(0), Some((t, _))) if kind == 1 && rng.random_bool(P_FOLLOW) => {
                    (t, head(&mut rng, catalogue[t].len()))
                }
                _ => draw(
                    &mut rng,
                    &at(&p, &end, e as f64 / total as f64),
                    world,
                    catalogue,
                ),
            };
            last[kind] = Some((topic, i));
            recent.push(topic);
            match kind == 0 && rng.random_bool(0.05) {
                true => typo(&mut rng, &catalogue[topic][i]),
                false => catalogue[topic][i].clone(),
            }
        };
        previous_kind = Some(kind);
        let stamp = match kind {
            0 => time.to_string(),
            _ => rfc3339(time),
        };
        history[kind].push(text.clone());
        let service = PRETRAIN_SERVICES[kind].to_string();
        rows.push((kind as u8, [user.clone(), service, stamp, text]));
    }
    // News after the logs: from a recent behaviour's sub-topic, or from the end mixture.
    let recent = &recent[recent.len().saturating_sub(RECENT)..];
    let now = at(&p, &end, 1.0);
    let mut t = time;
    for _ in 0..rng.random_range(3..=10) {
        t += rng.random_range(600..86_400);
        let (topic, index) = match recent.choose(&mut rng) {
            Some(&topic) if rng.random_bool(P_RECENT) => {
                (topic, head(&mut rng, world.news[topic].len()))
            }
            _ => draw(&mut rng, &now, world, &world.news),
        };
        let id = item_id('n', topic, first_index(&world.news[topic], index));
        rows.push((2, [user.clone(), id, t.to_string(), String::new()]));
    }
    // Half of the users also shop at another company: a drifting history with successors.
    if rng.random_bool(0.5) {
        let n = rng.random_range(5..=15);
        let mut t = p.start;
        let mut previous: Option<(usize, usize)> = None;
        for k in 0..n {
            t += rng.random_range(3_600..86_400 * 7);
            let (topic, index) = match previous {
                Some((topic, i)) if rng.random_bool(P_NEXT) => (topic, world.next[2][topic][i]),
                _ => draw(
                    &mut rng,
                    &at(&p, &end, k as f64 / n as f64),
                    world,
                    &world.market,
                ),
            };
            previous = Some((topic, index));
            let id = item_id('m', topic, first_index(&world.market[topic], index));
            rows.push((3, [format!("m{u:07}"), id, t.to_string(), String::new()]));
        }
    }
    let mixture = |m: &[(usize, f64)]| {
        let parts: Vec<String> = m.iter().map(|(t, w)| format!("{t}:{w:.3}")).collect();
        parts.join(" ")
    };
    let groups = format!("search={} shop={}", group(n_search), group(n_shop));
    rows.push((4, [user, mixture(&p.topics), mixture(&end), groups]));
}

/// `truth/topics.csv`: the parent of every sub-topic.
pub(super) fn write_topics(path: &Path, world: &World) -> Result<()> {
    let mut w = writer(path, &["topic", "parent"])?;
    for leaf in 0..world.topics {
        w.write_record([leaf.to_string(), (leaf / SUBTOPICS).to_string()])
            .map_err(|e| ClueError::io(path, e.into()))?;
    }
    w.flush().map_err(|e| ClueError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mixture_moves_from_start_to_end() {
        let start = Profile {
            topics: vec![(1, 0.6), (2, 0.4)],
            activity: 10.0,
            start: 0,
        };
        let end = [(1, 0.6), (7, 0.4)];
        let mid = at(&start, &end, 0.25);
        assert_eq!(mid.topics.len(), 3);
        let w = |t: usize| mid.topics.iter().find(|x| x.0 == t).unwrap().1;
        assert!((w(1) - 0.6).abs() < 1e-12);
        assert!((w(2) - 0.3).abs() < 1e-12 && (w(7) - 0.1).abs() < 1e-12);
        assert_eq!(at(&start, &end, 1.0).topics[1], (2, 0.0));
    }

    #[test]
    fn groups_follow_the_thresholds() {
        let g: Vec<&str> = [0, 1, COLD, COLD + 1, HEAVY - 1, HEAVY, 400]
            .map(group)
            .to_vec();
        let want = [
            "new", "cold", "cold", "regular", "regular", "heavy", "heavy",
        ];
        assert_eq!(g, want);
    }
}
