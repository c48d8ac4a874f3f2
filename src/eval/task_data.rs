//! A task's data, read from the files its task file names: the item catalogue, the users with
//! their targets and split, and their feature histories (not yet encoded), built under the
//! leakage rule of the module docs.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::history::{Histories, HistoryBuilder};
use crate::data::log::{list_log_files, parse_timestamp, read_logs, read_table, total_bytes};
use crate::data::prepare::assign_split;
use crate::data::store::Split;
use crate::error::{ClueError, Result};
use crate::eval::task::{Features, Source, Task};
use crate::ui;

/// One task's users, targets and item catalogue, features not yet encoded.
#[derive(Clone)]
pub struct TaskData {
    pub item_ids: Vec<String>,
    pub item_texts: Vec<String>,
    pub users: Vec<String>,
    /// Target items of each user (distinct).
    pub targets: Vec<Vec<usize>>,
    pub split: Vec<Split>,
    pub features: Histories,
    /// Each user's earlier behaviour, the activity user groups are cut by: feature log rows
    /// before the first target (`source = "logs"`), or interactions before the targets
    /// (`source = "history"`), before deduplication and the `max_items` cut.
    pub activity: Vec<u64>,
    /// Counts for the report.
    pub counts: TaskCounts,
    /// Rows `0..task_users` are the task's users; the rows after them are training users'
    /// history prefixes ([`TaskData::add_prefix_rows`]).
    pub task_users: usize,
    /// The task user (row) each prefix row was cut from, in the order of the rows after
    /// `task_users`.
    pub prefix_owner: Vec<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskCounts {
    pub interactions: u64,
    pub unknown_items_skipped: u64,
    /// Log rows at or after the user's first target (or without a timestamp): not used.
    pub feature_rows_dropped_for_leakage: u64,
    pub users_without_features_dropped: u64,
    pub users: [usize; 3],
    pub positives: [usize; 3],
    /// (history prefix → next item) training rows added (`prefixes` in `[features]`).
    #[serde(default)]
    pub prefix_pairs: usize,
}

/// Read a task's files and build its users, targets, split and feature histories.
pub fn load_task(task: &Task, max_items: usize) -> Result<TaskData> {
    let catalogue = read_items(&task.items)?;
    let mut counts = TaskCounts::default();
    let mut interactions = read_interactions(&task.interactions, &catalogue.index, &mut counts)?;
    let services = feature_services(&task.features);
    let mut builder = HistoryBuilder::new(&services, max_items);
    let (targets, cutoff, mut activity) = split_targets(
        &task.features,
        &services,
        &interactions.users,
        &mut interactions.events,
        &catalogue.texts,
        &mut builder,
    );
    if task.features.source == Source::Logs {
        counts.feature_rows_dropped_for_leakage = read_feature_logs(
            &task.features,
            &services,
            &interactions.index,
            &cutoff,
            &mut activity,
            &mut builder,
        )?;
    }
    let (features, targets, activity) = keep_users_with_features(
        &interactions.users,
        targets,
        activity,
        builder.finish(),
        &mut counts,
    );
    let split = assign_splits(task, &features.users, &targets, &mut counts)?;
    Ok(TaskData {
        task_users: targets.len(),
        item_ids: catalogue.ids,
        item_texts: catalogue.texts,
        users: features.users.clone(),
        targets,
        split,
        features,
        activity,
        counts,
        prefix_owner: Vec::new(),
    })
}

/// The task's item table, in file order.
struct Catalogue {
    ids: Vec<String>,
    texts: Vec<String>,
    /// Item id → its row.
    index: HashMap<String, usize>,
}

/// One interaction: (Unix seconds, or `i64::MIN` without a timestamp; line in the file; item).
/// Sorting these puts a user's interactions oldest first, file order breaking ties.
type Event = (i64, u64, usize);

/// The task's users in order of their first interaction with a known item, and their events.
struct Interactions {
    users: Vec<String>,
    /// User id → its position in `users`.
    index: HashMap<String, usize>,
    /// Each user's interactions, in file order.
    events: Vec<Vec<Event>>,
}

/// Read the `item_id,text` table; an id given twice is an error.
fn read_items(path: &Path) -> Result<Catalogue> {
    let mut ids = Vec::new();
    let mut texts = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    read_table(path, &["item_id", "text"], |line, f| {
        if index.insert(f[0].to_string(), ids.len()).is_some() {
            return Err(ClueError::BadRow {
                path: path.to_path_buf(),
                line,
                message: format!("item `{}` appears twice", f[0]),
                hint: "give each item_id one row",
            });
        }
        ids.push(f[0].to_string());
        texts.push(f[1].to_string());
        Ok(())
    })?;
    Ok(Catalogue { ids, texts, index })
}

/// Read the `user_id,item_id,timestamp` table into per-user events; rows with an unknown item
/// are counted and skipped, an unparseable timestamp is an error.
fn read_interactions(
    path: &Path,
    items: &HashMap<String, usize>,
    counts: &mut TaskCounts,
) -> Result<Interactions> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut users: Vec<String> = Vec::new();
    let mut events: Vec<Vec<Event>> = Vec::new();
    read_table(path, &["user_id", "item_id", "timestamp"], |line, f| {
        counts.interactions += 1;
        let Some(&item) = items.get(f[1]) else {
            counts.unknown_items_skipped += 1;
            return Ok(());
        };
        let time = parse_timestamp(f[2]).ok_or_else(|| ClueError::BadRow {
            path: path.to_path_buf(),
            line,
            message: format!("unparseable timestamp `{}`", f[2]),
            hint: "use Unix seconds, RFC 3339, or leave it empty",
        })?;
        let u = *index.entry(f[0].to_string()).or_insert_with(|| {
            users.push(f[0].to_string());
            events.push(Vec::new());
            users.len() - 1
        });
        events[u].push((time.unwrap_or(i64::MIN), line, item));
        Ok(())
    })?;
    if users.is_empty() {
        return Err(ClueError::bad_file(
            path,
            "no interaction with a known item",
            "check that item ids match the items file",
        ));
    }
    Ok(Interactions {
        users,
        index,
        events,
    })
}

/// The services of the feature histories, in embedding order.
fn feature_services(f: &Features) -> Vec<String> {
    match f.source {
        Source::Logs => f.services.clone(),
        Source::History => vec![f.service.clone().expect("validated")],
    }
}

/// Sort each user's events and split them into distinct targets and a cutoff time: features
/// must be strictly older than it. `source = "logs"`: every interaction is a target, the cutoff
/// is the first one. `source = "history"`: the last `targets` interactions (at most all but
/// one) are targets, the earlier ones go to `builder` as the user's features. The third list
/// is each user's count of those earlier interactions (0 under `source = "logs"`).
fn split_targets(
    f: &Features,
    services: &[String],
    users: &[String],
    events: &mut [Vec<Event>],
    item_texts: &[String],
    builder: &mut HistoryBuilder,
) -> (Vec<Vec<usize>>, Vec<i64>, Vec<u64>) {
    let mut targets: Vec<Vec<usize>> = Vec::with_capacity(users.len());
    let mut cutoff: Vec<i64> = Vec::with_capacity(users.len());
    let mut activity = vec![0u64; users.len()];
    for (u, ev) in events.iter_mut().enumerate() {
        ev.sort_unstable();
        match f.source {
            Source::Logs => {
                targets.push(distinct(ev.iter().map(|e| e.2)));
                cutoff.push(ev[0].0);
            }
            Source::History => {
                let k = f.targets.min(ev.len().saturating_sub(1));
                let first_target = ev.len() - k;
                activity[u] = first_target as u64;
                targets.push(distinct(ev[first_target..].iter().map(|e| e.2)));
                for e in &ev[..first_target] {
                    builder.push(&users[u], &services[0], Some(e.0), &item_texts[e.2]);
                }
                cutoff.push(ev.get(first_target).map(|e| e.0).unwrap_or(i64::MIN));
            }
        }
    }
    (targets, cutoff, activity)
}

/// `source = "logs"`: stream the feature logs into `builder`, keeping a task user's rows strictly
/// before their cutoff, each counted in `activity`. Returns how many rows of the embedded services
/// were dropped for leakage (at or after the cutoff, or without a timestamp).
fn read_feature_logs(
    f: &Features,
    services: &[String],
    user_index: &HashMap<String, usize>,
    cutoff: &[i64],
    activity: &mut [u64],
    builder: &mut HistoryBuilder,
) -> Result<u64> {
    let files = list_log_files(&f.logs)?;
    let bar = ui::bar(total_bytes(&files), "features", true);
    let mut dropped = 0u64;
    read_logs(
        &files,
        false,
        |b| {
            if let Some(&u) = user_index.get(b.user) {
                let embedded = services.iter().any(|s| s == b.service);
                match b.timestamp {
                    Some(t) if t < cutoff[u] => {
                        activity[u] += embedded as u64;
                        builder.push(b.user, b.service, Some(t), b.text)
                    }
                    _ if embedded => dropped += 1,
                    _ => {}
                }
            }
        },
        |bytes| bar.set_position(bytes),
    )?;
    bar.finish_and_clear();
    Ok(dropped)
}

/// Keep the users with targets and at least one feature behaviour, in the task's user order:
/// their histories (over all of `hist`'s items and services), targets and activity. The others
/// are counted.
fn keep_users_with_features(
    users: &[String],
    mut targets: Vec<Vec<usize>>,
    activity: Vec<u64>,
    hist: Histories,
    counts: &mut TaskCounts,
) -> (Histories, Vec<Vec<usize>>, Vec<u64>) {
    let by_name: HashMap<&str, usize> = hist
        .users
        .iter()
        .enumerate()
        .map(|(i, u)| (u.as_str(), i))
        .collect();
    let mut keep_users = Vec::new();
    let mut keep_targets = Vec::new();
    let mut seqs = Vec::new();
    let mut keep_activity = Vec::new();
    for (u, name) in users.iter().enumerate() {
        match by_name.get(name.as_str()) {
            Some(&h) if !targets[u].is_empty() => {
                keep_users.push(name.clone());
                keep_activity.push(activity[u]);
                keep_targets.push(std::mem::take(&mut targets[u]));
                seqs.push(hist.seqs[h].clone());
            }
            _ => counts.users_without_features_dropped += 1,
        }
    }
    let kept = Histories {
        users: keep_users,
        seqs,
        ..hist
    };
    (kept, keep_targets, keep_activity)
}

/// Each user's split from the seeded hash of their id; counts users and positives per split.
/// A split without users is an error.
fn assign_splits(
    task: &Task,
    users: &[String],
    targets: &[Vec<usize>],
    counts: &mut TaskCounts,
) -> Result<Vec<Split>> {
    let split: Vec<Split> = users
        .iter()
        .map(|u| assign_split(task.split.seed, u, task.split.valid, task.split.test))
        .collect();
    for (s, t) in split.iter().zip(targets) {
        counts.users[*s as usize] += 1;
        counts.positives[*s as usize] += t.len();
    }
    if counts.users.contains(&0) {
        return Err(ClueError::config(
            format!(
                "task `{}`: a split has no users (train/valid/test = {:?})",
                task.name, counts.users
            ),
            "the task needs more users, or other split fractions",
        ));
    }
    Ok(split)
}

impl TaskData {
    /// `source = "history"`: give every training user up to `per_user` more training rows, one
    /// per (prefix of their feature history → the item that followed it), the longest
    /// prefixes; e.g. features a b c → rows (a → b) and (a b → c). Rows are appended after the
    /// task's users (named `user#k`, `k` the prefix length), so valid and test users, their
    /// negatives and the split are unchanged. A prefix target whose text names several
    /// catalogue items is the first of them.
    pub fn add_prefix_rows(&mut self, per_user: usize) {
        let mut by_text: HashMap<&str, usize> = HashMap::new();
        for (i, t) in self.item_texts.iter().enumerate() {
            by_text.entry(t.as_str()).or_insert(i);
        }
        let mut rows = Vec::new();
        for u in 0..self.task_users {
            let Some(seq) = self.features.seqs[u].first() else {
                continue;
            };
            if self.split[u] != Split::Train || seq.len() < 2 {
                continue;
            }
            let first = seq.len().saturating_sub(per_user).max(1);
            for (k, &item) in seq.iter().enumerate().skip(first) {
                let text = self.features.items[item as usize].1.as_str();
                if let Some(&target) = by_text.get(text) {
                    rows.push((u, k, target));
                }
            }
        }
        for (u, k, target) in rows {
            let name = format!("{}#{k}", self.users[u]);
            let prefix = self.features.seqs[u][0][..k].to_vec();
            self.features.users.push(name.clone());
            self.features.seqs.push(vec![prefix]);
            self.users.push(name);
            self.targets.push(vec![target]);
            self.split.push(Split::Train);
            self.activity.push(k as u64);
            self.prefix_owner.push(u);
            self.counts.prefix_pairs += 1;
        }
    }

    /// The task user a row belongs to: itself, or the user a prefix row was cut from.
    pub fn owner(&self, row: usize) -> usize {
        row.checked_sub(self.task_users)
            .map_or(row, |k| self.prefix_owner[k])
    }
}

fn distinct(items: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut seen = HashSet::new();
    items.filter(|i| seen.insert(*i)).collect()
}

#[cfg(test)]
impl TaskData {
    /// Users `u0, u1, …` with these targets and splits over items `i0, i1, …`, no features.
    pub(crate) fn for_test(targets: Vec<Vec<usize>>, split: Vec<Split>, items: usize) -> Self {
        TaskData {
            task_users: targets.len(),
            item_ids: (0..items).map(|i| format!("i{i}")).collect(),
            item_texts: vec![String::new(); items],
            users: (0..targets.len()).map(|u| format!("u{u}")).collect(),
            targets,
            split,
            features: Default::default(),
            activity: Vec::new(),
            counts: Default::default(),
            prefix_owner: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Interactions out of time order, an empty timestamp, unknown items, a user with one
    /// interaction, one with two, and `pam`, whose targets repeat an earlier item.
    const INTERACTIONS: &str = "user_id,item_id,timestamp
max,i1,10
max,i2,20
pam,i1,5
max,i3,30
pam,i2,6
quin,i5,1
ivy,i6,3
ivy,i2,1
pam,i1,7
ann,i1,
ann,zz,50
ivy,i4,2
max,i4,40
pam,i3,8
kim,zz,1
ann,i3,100
ann,i4,200
rex,i5,1
rex,i6,2
";

    #[test]
    fn history_features_are_the_interactions_strictly_before_the_targets() {
        let dir = tempfile::tempdir().unwrap();
        let items = "item_id,text\ni1,apple\ni2,banana\ni3,cherry\ni4,date\ni5,elder\ni6,fig\n";
        std::fs::write(dir.path().join("items.csv"), items).unwrap();
        std::fs::write(dir.path().join("interactions.csv"), INTERACTIONS).unwrap();
        let toml = "name = \"t\"\ninteractions = \"interactions.csv\"\nitems = \"items.csv\"\n\
            [features]\nsource = \"history\"\nservice = \"market\"\ntargets = 2\n\
            [split]\nseed = 7\nvalid = 0.3\ntest = 0.3\n";
        std::fs::write(dir.path().join("task.toml"), toml).unwrap();
        let task = Task::load(&dir.path().join("task.toml")).unwrap();
        let d = load_task(&task, 50).unwrap();

        let texts = |u: usize| {
            let features: Vec<&str> = d.features.seqs[u][0]
                .iter()
                .map(|&i| d.features.items[i as usize].1.as_str())
                .collect();
            let targets: Vec<&str> = d.targets[u]
                .iter()
                .map(|&i| d.item_texts[i].as_str())
                .collect();
            (features, targets)
        };
        // (user, features oldest first, targets): the last two interactions are the targets
        // (one for rex, who has two); quin (one interaction) has no target and is dropped; kim
        // (unknown items only) is no user; ann's row without a timestamp comes first.
        let expected: [(&str, &[&str], &[&str]); 5] = [
            ("max", &["apple", "banana"], &["cherry", "date"]),
            ("pam", &["apple", "banana"], &["apple", "cherry"]),
            ("ivy", &["banana"], &["date", "fig"]),
            ("ann", &["apple"], &["cherry", "date"]),
            ("rex", &["elder"], &["fig"]),
        ];
        assert_eq!(d.users, expected.map(|e| e.0));
        assert_eq!(d.features.users, d.users);
        assert_eq!(d.features.services, ["market"]);
        for (u, (name, features, targets)) in expected.iter().enumerate() {
            let (f, t) = texts(u);
            assert_eq!(
                (f.as_slice(), t.as_slice()),
                (*features, *targets),
                "{name}"
            );
            if *name != "pam" {
                assert!(
                    t.iter().all(|x| !f.contains(x)),
                    "{name}: a target is a feature"
                );
            }
        }
        // pam's apple at 5 is a feature, her apple at 7 a target: were the target leaked into
        // the features, apple would be kept at 7, after banana.
        assert_eq!(texts(1).0, ["apple", "banana"]);

        let c = &d.counts;
        assert_eq!((c.interactions, c.unknown_items_skipped), (19, 2));
        assert_eq!(c.users_without_features_dropped, 1);
        assert_eq!(c.feature_rows_dropped_for_leakage, 0);
        let splits = [
            Split::Train,
            Split::Train,
            Split::Valid,
            Split::Test,
            Split::Test,
        ];
        for (u, s) in d.users.iter().zip(&d.split) {
            assert_eq!(*s, assign_split(7, u, 0.3, 0.3));
        }
        assert_eq!(d.split, splits);
        assert_eq!((c.users, c.positives), ([2, 1, 2], [4, 2, 3]));
    }

    #[test]
    fn prefix_rows_are_training_pairs_appended_after_the_task_users() {
        use crate::data::history::Histories;
        use crate::eval::groups::user_groups;
        // a (train): x y z → target w; b (test): x y; c (train): one item; e (train): y x.
        let mut d = TaskData::for_test(
            vec![vec![3], vec![2], vec![0], vec![2]],
            vec![Split::Train, Split::Test, Split::Train, Split::Train],
            4,
        );
        d.item_texts = ["x", "y", "z", "w"].map(String::from).to_vec();
        d.features = Histories {
            users: d.users.clone(),
            services: vec!["market".into()],
            // Feature items in another order than the catalogue: the targets map by text.
            items: ["z", "x", "y"].map(|t| (0, t.to_string())).to_vec(),
            seqs: vec![
                vec![vec![1, 2, 0]],
                vec![vec![1, 2]],
                vec![vec![2]],
                vec![vec![2, 1]],
            ],
            ..Default::default()
        };
        d.activity = vec![3, 2, 1, 9];
        let groups = user_groups(&d);
        let mut all = d.clone();
        all.add_prefix_rows(10);
        // a: (x → y), (x y → z); e: (y → x); b is a test user, c has no prefix with a next item.
        assert_eq!(all.users[4..], ["u0#1", "u0#2", "u3#1"]);
        assert_eq!(all.features.users, all.users);
        assert_eq!(all.targets[4..], [vec![1], vec![2], vec![0]]);
        assert_eq!(
            all.features.seqs[4..],
            [vec![vec![1]], vec![vec![1, 2]], vec![vec![2]]]
        );
        assert_eq!(all.split[4..], [Split::Train; 3]);
        assert_eq!((all.task_users, all.counts.prefix_pairs), (4, 3));
        assert_eq!((4..7).map(|r| all.owner(r)).collect::<Vec<_>>(), [0, 0, 3]);
        assert_eq!(all.owner(1), 1);
        // The task's own rows, their split and the user groups are unchanged.
        assert_eq!(
            (&all.users[..4], &all.split[..4]),
            (&d.users[..], &d.split[..])
        );
        assert_eq!(user_groups(&all), groups);
        // At most the longest `per_user` prefixes.
        let mut one = d.clone();
        one.add_prefix_rows(1);
        assert_eq!(one.users[4..], ["u0#2", "u3#1"]);
        let mut none = d.clone();
        none.add_prefix_rows(0);
        assert_eq!(none.users.len(), 4);
    }
}
