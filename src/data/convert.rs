//! `clue convert`: public datasets in their published formats → canonical behaviour logs and task
//! files.
//!
//! `movielens` (ml-latest-small, CSV): service `movie` from `ratings.csv` + `movies.csv` — text
//! `"<title> | <genres>"`, timestamped — and service `tag` from `tags.csv` (`"<tag>: <title>"`);
//! task `next-movie`: each user's last rated movie, features from their earlier ratings (as one
//! service, the inter-company setting).
//!
//! `amazon-unisrec` (RecBole atomic files as published with UniSRec): each user's full ordered
//! history is the `test` row's `item_id_list` + its target; service `scientific` holds the product
//! texts in that order (no timestamps); task `next-product`: each user's last product, features
//! from the earlier ones. Items without a text are dropped and counted.
//!
//! `lastfm` (HetRec 2011, tab-separated): service `tag` from `user_taggedartists.dat` + `tags.dat`
//! (Latin-1) + `artists.dat` — text `"<tag>: <artist>"`, dated by the day of tagging; service
//! `listen` from `user_artists.dat` + `artists.dat` — the artist's name, no timestamp, written
//! lightest first so the heaviest listens count as the most recent (and survive `--max-items`).
//! Downstream task `tag-artist`: the artists a user tags on or after `cutoff`, with user features
//! from the `tag` service before it (the `listen` rows carry no time, so the leakage rule of
//! `clue eval` leaves them out). Dropped and counted: tagging rows dated before 2005 (junk dates),
//! rows whose artist or tag id has no name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use crate::data::log::{parse_timestamp, read_table};
use crate::data::store::{lock_output, publish_dir, temp_dir_beside};
use crate::error::{ClueError, Result};

/// What a conversion wrote and dropped.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    /// (file, rows) written.
    pub written: Vec<(String, u64)>,
    /// (reason, rows) dropped.
    pub dropped: BTreeMap<String, u64>,
}

/// Rows of a tab-separated file after its header, decoded as UTF-8 (`latin1` = false; invalid
/// bytes become U+FFFD) or Latin-1.
fn tsv(path: &Path, columns: usize, latin1: bool) -> Result<Vec<(u64, Vec<String>)>> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ClueError::bad_file(
                path,
                "file missing",
                "pass the folder of the unpacked hetrec2011-lastfm-2k.zip",
            )
        } else {
            ClueError::io(path, e)
        }
    })?;
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate().skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let text: String = if latin1 {
            line.iter().map(|&b| b as char).collect()
        } else {
            String::from_utf8_lossy(line).into_owned()
        };
        let fields: Vec<String> = text.split('\t').map(|s| s.trim().to_string()).collect();
        if fields.len() < columns {
            return Err(ClueError::BadRow {
                path: path.to_path_buf(),
                line: i as u64 + 1,
                message: format!(
                    "expected {columns} tab-separated columns, found {}",
                    fields.len()
                ),
                hint: "is this the original HetRec 2011 file?",
            });
        }
        out.push((i as u64 + 1, fields));
    }
    Ok(out)
}

fn number(path: &Path, line: u64, field: &str) -> Result<u64> {
    field.parse().map_err(|_| ClueError::BadRow {
        path: path.to_path_buf(),
        line,
        message: format!("`{field}` is not a number"),
        hint: "is this the original HetRec 2011 file?",
    })
}

fn csv_writer(path: &Path, header: &[&str]) -> Result<csv::Writer<std::fs::File>> {
    let mut w = csv::Writer::from_path(path).map_err(|e| ClueError::io(path, e.into()))?;
    w.write_record(header)
        .map_err(|e| ClueError::io(path, e.into()))?;
    Ok(w)
}

/// Convert the Last.fm HetRec 2011 files in `input` into `out` (logs/, tasks/).
pub fn lastfm(input: &Path, out: &Path, cutoff: &str) -> Result<ConvertReport> {
    let cutoff_ts = parse_timestamp(cutoff).flatten().ok_or_else(|| {
        ClueError::config(
            format!("--cutoff {cutoff} is not a date"),
            "e.g. --cutoff 2010-07-01T00:00:00Z",
        )
    })?;
    convert_into(out, "lastfm", |dir| lastfm_into(input, dir, cutoff_ts))
}

fn lastfm_into(input: &Path, dir: &Path, cutoff: i64) -> Result<ConvertReport> {
    let mut report = ConvertReport::default();
    let mut drop = |reason: &str| *report.dropped.entry(reason.to_string()).or_default() += 1;
    let artists_path = input.join("artists.dat");
    let mut artists: HashMap<u64, String> = HashMap::new();
    let mut artist_order: Vec<u64> = Vec::new();
    for (line, f) in tsv(&artists_path, 2, false)? {
        let id = number(&artists_path, line, &f[0])?;
        if f[1].is_empty() {
            drop("artist without a name");
            continue;
        }
        artists.insert(id, f[1].clone());
        artist_order.push(id);
    }
    let tags_path = input.join("tags.dat");
    let mut tags: HashMap<u64, String> = HashMap::new();
    for (line, f) in tsv(&tags_path, 2, true)? {
        tags.insert(number(&tags_path, line, &f[0])?, f[1].clone());
    }
    for sub in ["logs", "tasks/tag-artist"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| ClueError::io(dir.join(sub), e))?;
    }
    let io = |p: &Path, e: csv::Error| ClueError::io(p, e.into());

    // Service `tag`, and the task's targets (tagged on or after the cutoff).
    let tagged_path = input.join("user_taggedartists.dat");
    let tag_log = dir.join("logs/tag.csv");
    let task_inter = dir.join("tasks/tag-artist/interactions.csv");
    let mut w = csv_writer(&tag_log, &["user_id", "service", "timestamp", "text"])?;
    let mut t = csv_writer(&task_inter, &["user_id", "item_id", "timestamp"])?;
    let (mut tag_rows, mut target_rows) = (0u64, 0u64);
    let mut targets_seen: HashSet<(u64, u64)> = HashSet::new();
    for (line, f) in tsv(&tagged_path, 6, false)? {
        let [user, artist, tag, day, month, year] =
            [0, 1, 2, 3, 4, 5].map(|i| number(&tagged_path, line, &f[i]));
        let (user, artist, tag) = (user?, artist?, tag?);
        let (day, month, year) = (day?, month?, year?);
        let date = format!("{year:04}-{month:02}-{day:02}T00:00:00Z");
        let ts = match parse_timestamp(&date).flatten() {
            Some(ts) if year >= 2005 => ts,
            _ => {
                drop("tagging with a junk date (before 2005 or invalid)");
                continue;
            }
        };
        let (Some(name), Some(tag)) = (artists.get(&artist), tags.get(&tag)) else {
            drop("tagging of an artist or tag without a name");
            continue;
        };
        if ts >= cutoff {
            if targets_seen.insert((user, artist)) {
                t.write_record([user.to_string(), artist.to_string(), ts.to_string()])
                    .map_err(|e| io(&task_inter, e))?;
                target_rows += 1;
            }
        } else {
            w.write_record([
                user.to_string(),
                "tag".into(),
                date,
                format!("{tag}: {name}"),
            ])
            .map_err(|e| io(&tag_log, e))?;
            tag_rows += 1;
        }
    }
    w.flush().map_err(|e| ClueError::io(&tag_log, e))?;
    t.flush().map_err(|e| ClueError::io(&task_inter, e))?;

    // Service `listen`: per user, lightest first.
    let listen_path = input.join("user_artists.dat");
    let listen_log = dir.join("logs/listen.csv");
    let mut per_user: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for (line, f) in tsv(&listen_path, 3, false)? {
        let user = number(&listen_path, line, &f[0])?;
        let artist = number(&listen_path, line, &f[1])?;
        let weight = number(&listen_path, line, &f[2])?;
        per_user.entry(user).or_default().push((weight, artist));
    }
    let mut w = csv_writer(&listen_log, &["user_id", "service", "timestamp", "text"])?;
    let mut listen_rows = 0u64;
    for (user, mut list) in per_user {
        list.sort_unstable();
        for (_, artist) in list {
            let Some(name) = artists.get(&artist) else {
                drop("listen of an artist without a name");
                continue;
            };
            w.write_record([
                user.to_string(),
                "listen".into(),
                String::new(),
                name.clone(),
            ])
            .map_err(|e| io(&listen_log, e))?;
            listen_rows += 1;
        }
    }
    w.flush().map_err(|e| ClueError::io(&listen_log, e))?;

    // The task's item catalogue and task file.
    let items_path = dir.join("tasks/tag-artist/items.csv");
    let mut w = csv_writer(&items_path, &["item_id", "text"])?;
    for id in &artist_order {
        w.write_record([id.to_string(), artists[id].clone()])
            .map_err(|e| io(&items_path, e))?;
    }
    w.flush().map_err(|e| ClueError::io(&items_path, e))?;
    let task = format!(
        "# Written by `clue convert lastfm`. Run: clue eval --task <this file> --model runs/<name> --out DIR\n\
         name = \"tag-artist\"\n\
         description = \"Artists a Last.fm user tags on or after {cutoff}. User features: the user's tag service strictly before their first target (listening has no timestamps, so it cannot be shown to precede the targets and is left out).\"\n\
         interactions = \"tag-artist/interactions.csv\"\n\
         items = \"tag-artist/items.csv\"\n\
         models = [\"bst\", \"lightgcn\", \"deepfm\", \"clue\", \"text-mean\", \"untrained\", \"noise\", \"hybrid\", \"toppop\", \"random\"]\n\n\
         [features]\nsource = \"logs\"\nlogs = [\"../logs/tag.csv\"]\nservices = [\"tag\"]\nitems_as_service = \"listen\"\n\n\
         [split]\nseed = 7\nvalid = 0.1\ntest = 0.2\n\n\
         [negatives]\ncount = 100\nseed = 13\n",
        cutoff = chrono::DateTime::from_timestamp(cutoff, 0)
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default()
    );
    let task_path = dir.join("tasks/tag-artist.toml");
    std::fs::write(&task_path, task).map_err(|e| ClueError::io(&task_path, e))?;
    report.written = vec![
        ("logs/tag.csv".into(), tag_rows),
        ("logs/listen.csv".into(), listen_rows),
        ("tasks/tag-artist/interactions.csv".into(), target_rows),
        (
            "tasks/tag-artist/items.csv".into(),
            artist_order.len() as u64,
        ),
    ];
    Ok(report)
}

/// Write a `source = "history"` task file: the last interaction is the target.
fn history_task(dir: &Path, name: &str, service: &str, description: &str) -> Result<()> {
    let text = format!(
        "# Written by `clue convert`. Run: clue eval --task <this file> --model runs/<name> --out DIR\n\
         # The service is new to a model pretrained elsewhere: add as_service / items_as_service = \"<a\n\
         # service of the model>\" under [features] to read its items with that service's prefix token.\n\
         name = \"{name}\"\n\
         description = \"{description}\"\n\
         interactions = \"{name}/interactions.csv\"\n\
         items = \"{name}/items.csv\"\n\
         models = [\"bst\", \"lightgcn\", \"deepfm\", \"clue\", \"text-mean\", \"untrained\", \"noise\", \"hybrid\", \"toppop\", \"random\"]\n\n\
         [features]\nsource = \"history\"\nservice = \"{service}\"\ntargets = 1\nprefixes = 10\n\n\
         [split]\nseed = 7\nvalid = 0.1\ntest = 0.2\n\n\
         [negatives]\ncount = 100\nseed = 13\n"
    );
    let path = dir.join(format!("tasks/{name}.toml"));
    std::fs::write(&path, text).map_err(|e| ClueError::io(&path, e))
}

/// Run `body` into a temporary directory beside `out`, then publish it with a `convert.json`.
fn convert_into(
    out: &Path,
    what: &str,
    body: impl FnOnce(&Path) -> Result<ConvertReport>,
) -> Result<ConvertReport> {
    let _lock = lock_output(out, "convert")?;
    let tmp = temp_dir_beside(out)?;
    let result = body(&tmp).and_then(|r| {
        let marker = serde_json::json!({
            "converter": format!("clue convert {what}"),
            "version": env!("CARGO_PKG_VERSION"),
            "written": r.written,
            "dropped": r.dropped,
        });
        std::fs::write(
            tmp.join("convert.json"),
            serde_json::to_string_pretty(&marker).expect("json") + "\n",
        )
        .map_err(|e| ClueError::io(tmp.join("convert.json"), e))?;
        publish_dir(&tmp, out, "convert.json")?;
        Ok(r)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Convert MovieLens (ml-latest-small) CSV files in `input` into `out`.
pub fn movielens(input: &Path, out: &Path) -> Result<ConvertReport> {
    convert_into(out, "movielens", |dir| {
        let mut report = ConvertReport::default();
        let mut movies: HashMap<String, (String, String)> = HashMap::new();
        let mut order = Vec::new();
        read_table(
            &input.join("movies.csv"),
            &["movieId", "title", "genres"],
            |_, f| {
                let genres = f[2].replace('|', ", ");
                movies.insert(f[0].to_string(), (f[1].to_string(), genres));
                order.push(f[0].to_string());
                Ok(())
            },
        )?;
        for sub in ["logs", "tasks/next-movie"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| ClueError::io(dir.join(sub), e))?;
        }
        let header = ["user_id", "service", "timestamp", "text"];
        let (log_path, inter_path) = (
            dir.join("logs/movie.csv"),
            dir.join("tasks/next-movie/interactions.csv"),
        );
        let mut log = csv_writer(&log_path, &header)?;
        let mut inter = csv_writer(&inter_path, &["user_id", "item_id", "timestamp"])?;
        let (mut n, mut unknown) = (0u64, 0u64);
        read_table(
            &input.join("ratings.csv"),
            &["userId", "movieId", "timestamp"],
            |_, f| {
                let Some((title, genres)) = movies.get(f[1]) else {
                    unknown += 1;
                    return Ok(());
                };
                log.write_record([f[0], "movie", f[2], &format!("{title} | {genres}")])
                    .and_then(|_| inter.write_record([f[0], f[1], f[2]]))
                    .map_err(|e| ClueError::io(&log_path, e.into()))?;
                n += 1;
                Ok(())
            },
        )?;
        log.flush().map_err(|e| ClueError::io(&log_path, e))?;
        inter.flush().map_err(|e| ClueError::io(&inter_path, e))?;
        let tag_path = dir.join("logs/tag.csv");
        let mut tags = csv_writer(&tag_path, &header)?;
        let mut t = 0u64;
        read_table(
            &input.join("tags.csv"),
            &["userId", "movieId", "tag", "timestamp"],
            |_, f| {
                let Some((title, _)) = movies.get(f[1]) else {
                    unknown += 1;
                    return Ok(());
                };
                tags.write_record([f[0], "tag", f[3], &format!("{}: {title}", f[2])])
                    .map_err(|e| ClueError::io(&tag_path, e.into()))?;
                t += 1;
                Ok(())
            },
        )?;
        tags.flush().map_err(|e| ClueError::io(&tag_path, e))?;
        let items_path = dir.join("tasks/next-movie/items.csv");
        let mut items = csv_writer(&items_path, &["item_id", "text"])?;
        for id in &order {
            let (title, genres) = &movies[id];
            items
                .write_record([id.as_str(), &format!("{title} | {genres}")])
                .map_err(|e| ClueError::io(&items_path, e.into()))?;
        }
        items.flush().map_err(|e| ClueError::io(&items_path, e))?;
        history_task(
            dir,
            "next-movie",
            "movie",
            "The next movie a MovieLens user rates; features: the movies they rated before it.",
        )?;
        report.written = vec![
            ("logs/movie.csv".into(), n),
            ("logs/tag.csv".into(), t),
            ("tasks/next-movie/interactions.csv".into(), n),
            ("tasks/next-movie/items.csv".into(), order.len() as u64),
        ];
        if unknown > 0 {
            report.dropped.insert(
                "rating or tag of a movie missing from movies.csv".into(),
                unknown,
            );
        }
        Ok(report)
    })
}

/// Convert the UniSRec-preprocessed Amazon files (`<name>.text`, `<name>.test.inter`, ...) in
/// `input` into `out`; `name` is the files' prefix, e.g. `Scientific`.
pub fn amazon_unisrec(input: &Path, out: &Path, name: &str) -> Result<ConvertReport> {
    convert_into(out, "amazon-unisrec", |dir| {
        let mut report = ConvertReport::default();
        let file = |ext: &str| input.join(format!("{name}.{ext}"));
        let mut text_of: HashMap<String, String> = HashMap::new();
        for (_, f) in tsv(&file("text"), 2, false)? {
            text_of.insert(f[0].clone(), f[1].trim().to_string());
        }
        // item2index and user2index have no header: read every line.
        let pairs = |ext: &str| -> Result<Vec<(String, String)>> {
            let path = file(ext);
            let bytes = std::fs::read(&path).map_err(|e| ClueError::io(&path, e))?;
            Ok(String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .map(|(a, b)| (b.trim().to_string(), a.trim().to_string()))
                .collect())
        };
        let items: HashMap<String, String> = pairs("item2index")?.into_iter().collect();
        let users: HashMap<String, String> = pairs("user2index")?.into_iter().collect();
        let service = name.to_lowercase();
        let task = "next-product";
        for sub in ["logs".to_string(), format!("tasks/{task}")] {
            std::fs::create_dir_all(dir.join(&sub))
                .map_err(|e| ClueError::io(dir.join(&sub), e))?;
        }
        let (log_path, inter_path) = (
            dir.join(format!("logs/{service}.csv")),
            dir.join(format!("tasks/{task}/interactions.csv")),
        );
        let mut log = csv_writer(&log_path, &["user_id", "service", "timestamp", "text"])?;
        let mut inter = csv_writer(&inter_path, &["user_id", "item_id", "timestamp"])?;
        let mut drop = |why: &str| *report.dropped.entry(why.to_string()).or_default() += 1;
        let (mut n, mut users_written) = (0u64, 0u64);
        for (_, f) in tsv(&file("test.inter"), 3, false)? {
            let user = users
                .get(&f[0])
                .cloned()
                .unwrap_or_else(|| format!("user{}", f[0]));
            for index in f[1]
                .split_whitespace()
                .chain(std::iter::once(f[2].as_str()))
            {
                let Some(text) = items.get(index).and_then(|asin| text_of.get(asin)) else {
                    drop("interaction with an item without a text");
                    continue;
                };
                log.write_record([user.as_str(), service.as_str(), "", text])
                    .and_then(|_| inter.write_record([user.as_str(), index, ""]))
                    .map_err(|e| ClueError::io(&log_path, e.into()))?;
                n += 1;
            }
            users_written += 1;
        }
        log.flush().map_err(|e| ClueError::io(&log_path, e))?;
        inter.flush().map_err(|e| ClueError::io(&inter_path, e))?;
        let items_path = dir.join(format!("tasks/{task}/items.csv"));
        let mut w = csv_writer(&items_path, &["item_id", "text"])?;
        let mut ids: Vec<(&String, &String)> = items.iter().collect();
        ids.sort_by_key(|(i, _)| i.parse::<u64>().unwrap_or(u64::MAX));
        let mut kept = 0u64;
        for (index, asin) in ids {
            if let Some(text) = text_of.get(asin) {
                w.write_record([index.as_str(), text])
                    .map_err(|e| ClueError::io(&items_path, e.into()))?;
                kept += 1;
            }
        }
        w.flush().map_err(|e| ClueError::io(&items_path, e))?;
        history_task(
            dir,
            task,
            &service,
            "The next product an Amazon user reviews (another company); features: the products before it.",
        )?;
        report.written = vec![
            (format!("logs/{service}.csv"), n),
            (format!("tasks/{task}/interactions.csv"), n),
            (format!("tasks/{task}/items.csv"), kept),
            ("users".into(), users_written),
        ];
        Ok(report)
    })
}
