//! Behaviour logs → per-user histories: the one reader behind `clue prepare`, `clue embed` and
//! `clue eval`.
//!
//! The paper's rules (section 3.1) apply while reading: a repeated behaviour (user, service, text)
//! is kept once, at its latest time, and each per-service sequence keeps the most recent
//! `max_items` items, oldest first. A user's list is compacted whenever it grows past
//! `2·max_items + 64` events, so memory follows users and distinct items, not log rows.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::data::log::{self, Behavior, ReadStats};
use crate::error::Result;
use crate::ui;

/// One behaviour kept in memory while reading: its time order key and item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Unix seconds; `i64::MIN` when the log left it empty (then only `row` orders it).
    pub time: i64,
    /// Order of the row among the rows read.
    pub row: u64,
    pub item: u32,
}

/// Keep, per item, only its most recent occurrence, then only the most recent `max_items`
/// events, oldest first. Returns how many duplicate events were removed.
pub fn compact(events: &mut Vec<Event>, max_items: usize) -> u64 {
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

/// Users' item histories, per service, over a table of distinct items. Users and items are
/// numbered in the order they first appear in the logs.
#[derive(Debug, Clone, Default)]
pub struct Histories {
    pub users: Vec<String>,
    pub services: Vec<String>,
    /// Distinct items: (service index, text). The same text in two services is two items.
    pub items: Vec<(usize, String)>,
    /// `seqs[user][service]`: item indices, oldest first, at most `max_items`.
    pub seqs: Vec<Vec<Vec<u32>>>,
    /// Repeated behaviours removed.
    pub duplicates: u64,
    /// Rows of services that were not asked for.
    pub other_service_rows: u64,
}

/// Collects behaviours into [`Histories`], compacting each list as it grows.
pub struct HistoryBuilder {
    /// Whether `services` is the whole list (rows of other services are counted, not kept) or
    /// grows as new services appear.
    fixed_services: bool,
    max_items: usize,
    compact_at: usize,
    users: HashMap<Box<str>, u32>,
    /// Per service: text → item index.
    items: Vec<HashMap<Box<str>, u32>>,
    /// `events[user][service]`; a user's list of lists grows to the services they have.
    events: Vec<Vec<Vec<Event>>>,
    rows: u64,
    out: Histories,
}

impl HistoryBuilder {
    /// Keep the behaviours of `services` only (in this order).
    pub fn new(services: &[String], max_items: usize) -> Self {
        let mut b = Self::any_service(max_items);
        b.fixed_services = true;
        b.out.services = services.to_vec();
        b.items = vec![HashMap::new(); services.len()];
        b
    }

    /// Keep every service, numbered in the order they first appear.
    pub fn any_service(max_items: usize) -> Self {
        Self {
            fixed_services: false,
            max_items,
            compact_at: 2 * max_items + 64,
            users: HashMap::new(),
            items: Vec::new(),
            events: Vec::new(),
            rows: 0,
            out: Histories::default(),
        }
    }

    /// Add one behaviour; `time` None = file order.
    pub fn push(&mut self, user: &str, service: &str, time: Option<i64>, text: &str) {
        let Some(s) = self.service(service) else {
            self.out.other_service_rows += 1;
            return;
        };
        let u = match self.users.get(user) {
            Some(&u) => u,
            None => {
                let u = self.out.users.len() as u32;
                self.users.insert(user.into(), u);
                self.out.users.push(user.to_string());
                self.events.push(Vec::new());
                u
            }
        };
        let item = match self.items[s].get(text) {
            Some(&i) => i,
            None => {
                let i = self.out.items.len() as u32;
                self.items[s].insert(text.into(), i);
                self.out.items.push((s, text.to_string()));
                i
            }
        };
        self.rows += 1;
        let lists = &mut self.events[u as usize];
        if lists.len() <= s {
            lists.resize_with(s + 1, Vec::new);
        }
        let list = &mut lists[s];
        list.push(Event {
            time: time.unwrap_or(i64::MIN),
            row: self.rows,
            item,
        });
        if list.len() >= self.compact_at {
            self.out.duplicates += compact(list, self.max_items);
        }
    }

    /// Add one row of a log.
    pub fn push_behavior(&mut self, b: &Behavior<'_>) {
        self.push(b.user, b.service, b.timestamp, b.text);
    }

    fn service(&mut self, name: &str) -> Option<usize> {
        match self.out.services.iter().position(|s| s == name) {
            Some(s) => Some(s),
            None if self.fixed_services => None,
            None => {
                self.out.services.push(name.to_string());
                self.items.push(HashMap::new());
                Some(self.out.services.len() - 1)
            }
        }
    }

    /// Every user's lists compacted, as item indices per service.
    pub fn finish(mut self) -> Histories {
        let services = self.out.services.len();
        let max_items = self.max_items;
        let mut duplicates = 0;
        self.out.seqs = self
            .events
            .into_iter()
            .map(|mut lists| {
                lists.resize_with(services, Vec::new);
                lists
                    .into_iter()
                    .map(|mut list| {
                        duplicates += compact(&mut list, max_items);
                        list.into_iter().map(|e| e.item).collect()
                    })
                    .collect()
            })
            .collect();
        self.out.duplicates += duplicates;
        self.out
    }
}

/// Read log files (with a progress bar) into `builder`, then finish it.
pub fn read_histories(
    files: &[PathBuf],
    mut builder: HistoryBuilder,
    skip_bad_rows: bool,
) -> Result<(Histories, ReadStats)> {
    let bar = ui::bar(log::total_bytes(files), "reading", true);
    let stats = log::read_logs(
        files,
        skip_bad_rows,
        |b| builder.push_behavior(&b),
        |bytes| bar.set_position(bytes),
    )?;
    bar.finish_and_clear();
    Ok((builder.finish(), stats))
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
    fn histories_keep_latest_occurrence_most_recent_items_per_service() {
        let services = vec!["a".to_string(), "b".to_string()];
        let mut b = HistoryBuilder::new(&services, 2);
        b.push("u1", "a", Some(10), "x");
        b.push("u1", "a", Some(5), "y");
        b.push("u1", "a", Some(30), "x");
        b.push("u1", "a", Some(20), "z");
        b.push("u1", "c", Some(1), "ignored");
        b.push("u2", "b", None, "x");
        let h = b.finish();
        assert_eq!(h.users, vec!["u1", "u2"]);
        assert_eq!(h.other_service_rows, 1);
        assert_eq!(h.duplicates, 1);
        let text = |i: u32| h.items[i as usize].1.as_str();
        // u1/a by time: y@5, z@20, x@30 (x@10 is a repeat); keep the 2 most recent.
        let a: Vec<&str> = h.seqs[0][0].iter().map(|&i| text(i)).collect();
        assert_eq!(a, vec!["z", "x"]);
        assert!(h.seqs[0][1].is_empty());
        // Same text in another service is another item.
        assert_eq!(h.items[h.seqs[1][1][0] as usize], (1, "x".to_string()));
    }

    /// Compaction while reading gives the same histories as compacting once at the end, and
    /// keeps every list short however many rows a user has.
    #[test]
    fn compacting_while_reading_changes_nothing_but_memory() {
        let services = vec!["a".to_string()];
        let mut b = HistoryBuilder::new(&services, 4);
        let mut all = Vec::new();
        for row in 0..1000u64 {
            let (time, text) = ((row * 7919 % 1000) as i64, format!("t{}", row % 37));
            b.push("u", "a", Some(time), &text);
            all.push((time, row + 1, text));
            assert!(b.events[0][0].len() < b.compact_at, "row {row}");
        }
        let h = b.finish();
        // Reference: the latest occurrence of each text, the 4 most recent, oldest first.
        let mut latest: HashMap<String, (i64, u64)> = HashMap::new();
        for (time, row, text) in all {
            let e = latest.entry(text).or_insert((time, row));
            *e = (*e).max((time, row));
        }
        let mut by_time: Vec<(i64, u64, String)> =
            latest.into_iter().map(|(t, (a, b))| (a, b, t)).collect();
        by_time.sort();
        let expected: Vec<String> = by_time[by_time.len() - 4..]
            .iter()
            .map(|x| x.2.clone())
            .collect();
        let got: Vec<String> = h.seqs[0][0]
            .iter()
            .map(|&i| h.items[i as usize].1.clone())
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn any_service_numbers_services_as_they_appear() {
        let mut b = HistoryBuilder::any_service(8);
        b.push("u1", "shop", Some(1), "x");
        b.push("u2", "search", Some(2), "y");
        b.push("u1", "search", Some(3), "x");
        let h = b.finish();
        assert_eq!(h.services, vec!["shop", "search"]);
        assert_eq!(h.seqs[0].len(), 2, "every user gets every service's list");
        assert!(h.seqs[1][0].is_empty());
        assert_eq!(h.items.len(), 3);
    }
}
