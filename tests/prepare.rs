//! `clue prepare` end to end on logs the tests write: the paper's rules, bad rows, determinism,
//! the split, and the Dataset/Batcher view of the result.

mod common;

use std::sync::Arc;

use burn::backend::NdArray;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use clue::data::batcher::{UserBatch, UserBatcher, UserDataset};
use clue::data::log::BadRowKind;
use clue::data::prepare::{PrepareOptions, prepare};
use clue::data::store::{PreparedDataset, Split};
use clue::data::synth::{SynthOptions, synth};
use clue::error::ClueError;
use common::{dir_bytes, write_log};

fn opts() -> PrepareOptions {
    PrepareOptions {
        min_behaviors: 1,
        valid_fraction: 0.0,
        test_fraction: 0.0,
        ..Default::default()
    }
}

fn texts(ds: &PreparedDataset, user: &str, service: usize) -> Vec<String> {
    let tok = tokenizers::Tokenizer::from_file(ds.tokenizer_path()).unwrap();
    let u = ds.user_ids.iter().position(|x| x == user).unwrap();
    ds.sequence(u, service)
        .into_iter()
        .map(|i| {
            let ids: Vec<u32> = ds.item_tokens(i)[1..].to_vec();
            tok.decode(&ids, true).unwrap().trim().to_string()
        })
        .collect()
}

#[test]
fn dedupe_order_truncation_and_activity_filter_follow_the_paper() {
    let dir = tempfile::tempdir().unwrap();
    // u1: rows out of order, one repeated query, timestamps in both forms and a Latin word.
    // u2 has one search only (dropped with min_behaviors 2); u3 lacks `shop` entirely.
    write_log(
        dir.path(),
        "a.csv",
        &[
            "u1,search,300,blue shoes",
            "u2,search,100,red hat",
            "u1,search,100,green shirt",
            "u1,shop,1970-01-01T00:05:00Z,Shoe Box Deluxe",
            "u3,search,50,lonely query",
        ],
    );
    write_log(
        dir.path(),
        "b.csv",
        &[
            "u1,search,200,blue shoes",
            "u1,search,400,blue shoes",
            "u1,search,250,red socks",
            "u1,shop,1970-01-01T00:01:40Z,Sock Pack Pro",
            "u2,shop,150,Hat Stand",
            "u2,shop,160,Hat Rack",
        ],
    );
    let out = dir.path().join("p");
    let o = PrepareOptions {
        max_items: 3,
        min_behaviors: 2,
        ..opts()
    };
    let report = prepare(&[dir.path().to_path_buf()], &out, &o).unwrap();
    let m = &report.manifest;
    assert_eq!(m.services, vec!["search", "shop"]);
    assert_eq!(m.duplicates_removed, 2, "blue shoes appears three times");
    assert_eq!(m.users_dropped.missing_service, 1);
    assert_eq!(m.users_dropped.too_few_behaviors, 1);
    assert_eq!(m.users, 1);
    let ds = PreparedDataset::open(&out, true).unwrap();
    // Distinct search items by latest time: green 100, socks 250, blue 400 (max_items 3 keeps all);
    // the repeat of "blue shoes" counts at its most recent time.
    assert_eq!(
        texts(&ds, "u1", 0),
        vec!["green shirt", "red socks", "blue shoes"]
    );
    assert_eq!(
        texts(&ds, "u1", 1),
        vec!["Sock Pack Pro", "Shoe Box Deluxe"]
    );

    let o = PrepareOptions {
        max_items: 2,
        ..opts()
    };
    prepare(&[dir.path().to_path_buf()], &out, &o).unwrap();
    let ds = PreparedDataset::open(&out, true).unwrap();
    assert_eq!(
        texts(&ds, "u1", 0),
        vec!["red socks", "blue shoes"],
        "most recent two"
    );
}

#[test]
fn items_are_stored_once_with_their_service_prefix() {
    let dir = tempfile::tempdir().unwrap();
    write_log(
        dir.path(),
        "a.csv",
        &[
            "a,search,,same text",
            "b,search,,same text",
            "a,shop,,same text",
            "b,shop,,other",
        ],
    );
    let out = dir.path().join("p");
    prepare(&[dir.path().join("a.csv")], &out, &opts()).unwrap();
    let ds = PreparedDataset::open(&out, true).unwrap();
    assert_eq!(ds.num_items(), 3, "one item per (service, text)");
    let (a_search, b_search) = (ds.sequence(0, 0), ds.sequence(1, 0));
    assert_eq!(a_search, b_search, "two users share the one stored item");
    let svc = &ds.manifest.service_token_ids;
    assert_eq!(ds.item_tokens(a_search[0])[0], svc[0]);
    assert_eq!(ds.item_tokens(ds.sequence(0, 1)[0])[0], svc[1]);
    assert_eq!(
        ds.item_tokens(a_search[0])[1..],
        ds.item_tokens(ds.sequence(0, 1)[0])[1..]
    );
}

#[test]
fn same_input_gives_byte_identical_output_and_replaces_atomically() {
    let dir = tempfile::tempdir().unwrap();
    synth(&dir.path().join("s"), &SynthOptions::new(300, 3)).unwrap();
    let logs = dir.path().join("s/logs");
    let o = PrepareOptions::default();
    prepare(std::slice::from_ref(&logs), &dir.path().join("p1"), &o).unwrap();
    prepare(std::slice::from_ref(&logs), &dir.path().join("p2"), &o).unwrap();
    assert_eq!(
        dir_bytes(&dir.path().join("p1")),
        dir_bytes(&dir.path().join("p2"))
    );
    // Preparing again into p1 replaces it and leaves no temporary directory behind.
    prepare(&[logs], &dir.path().join("p1"), &o).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn split_is_by_user_disjoint_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    synth(&dir.path().join("s"), &SynthOptions::new(500, 1)).unwrap();
    let o = PrepareOptions {
        valid_fraction: 0.2,
        test_fraction: 0.2,
        seed: 9,
        ..Default::default()
    };
    let out = dir.path().join("p");
    let m = prepare(&[dir.path().join("s/logs")], &out, &o)
        .unwrap()
        .manifest;
    let ds = PreparedDataset::open(&out, true).unwrap();
    let (tr, va, te) = (
        ds.users_in(Split::Train),
        ds.users_in(Split::Valid),
        ds.users_in(Split::Test),
    );
    assert_eq!(tr.len() + va.len() + te.len(), ds.num_users());
    assert!(
        tr.iter().all(|u| !va.contains(u) && !te.contains(u)) && va.iter().all(|u| !te.contains(u))
    );
    assert_eq!(
        (m.split.train, m.split.valid, m.split.test),
        (tr.len() as u64, va.len() as u64, te.len() as u64)
    );
    assert!(va.len() > 50 && te.len() > 50 && tr.len() > 200);
    let o2 = PrepareOptions { seed: 10, ..o };
    prepare(&[dir.path().join("s/logs")], &dir.path().join("q"), &o2).unwrap();
    let other = PreparedDataset::open(&dir.path().join("q"), true).unwrap();
    assert_ne!(
        other.users_in(Split::Valid),
        va,
        "another seed, another split"
    );
}

fn bad_logs(dir: &std::path::Path) -> std::path::PathBuf {
    let mut bytes = b"user_id,service,timestamp,text\n".to_vec();
    bytes.extend_from_slice(b"u1,search,1,good one\n");
    bytes.extend_from_slice(b"u1,search,2\n"); // line 3: column count
    bytes.extend_from_slice(b"u1,search,yesterday,bad time\n"); // line 4: timestamp
    bytes.extend_from_slice(b"u1,search,3,\n"); // line 5: empty text
    bytes.extend_from_slice(b"u1,search,4,caf\xe9 au lait\n"); // line 6: Latin-1
    bytes.extend_from_slice(b"u1,shop,5,good two\n");
    bytes.extend_from_slice(b"u1,search,6,\"quoted, with comma\"\n");
    let path = dir.join("bad.csv");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn each_bad_row_kind_stops_the_run_by_default_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = bad_logs(dir.path());
    let err = prepare(std::slice::from_ref(&path), &dir.path().join("p"), &opts()).unwrap_err();
    match &err {
        ClueError::BadRow { line, .. } => assert_eq!(*line, 3),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("bad.csv:3"), "{err}");
    assert!(
        !dir.path().join("p").exists(),
        "nothing is written on error"
    );
    // Each later kind, alone, is reported at its own line.
    for (line, body, needle) in [
        (2, &b"u1,search,yesterday,t\n"[..], "timestamp"),
        (2, &b"u1,search,3,\n"[..], "empty"),
        (2, &b"u1,search,4,caf\xe9\n"[..], "UTF-8"),
    ] {
        let p = dir.path().join("one.csv");
        let mut bytes = b"user_id,service,timestamp,text\n".to_vec();
        bytes.extend_from_slice(body);
        std::fs::write(&p, bytes).unwrap();
        let e = prepare(&[p], &dir.path().join("p"), &opts())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("one.csv:{line}")) && e.contains(needle),
            "{e}"
        );
    }
}

#[test]
fn skip_bad_rows_counts_each_kind_and_keeps_the_good_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = bad_logs(dir.path());
    let o = PrepareOptions {
        skip_bad_rows: true,
        ..opts()
    };
    let r = prepare(&[path], &dir.path().join("p"), &o).unwrap();
    for kind in [
        BadRowKind::ColumnCount,
        BadRowKind::Timestamp,
        BadRowKind::EmptyField,
        BadRowKind::InvalidUtf8,
    ] {
        assert_eq!(r.bad_rows.count(kind), 1, "{kind:?}");
    }
    assert_eq!(r.manifest.bad_rows, 4);
    assert_eq!(
        r.manifest.behaviors, 3,
        "good one, good two, the quoted text"
    );
    let described = r.bad_rows.describe().join("\n");
    assert!(
        described.contains("bad.csv:6") && described.contains("invalid UTF-8"),
        "{described}"
    );
    assert!(r.summary().contains("skipped"));
}

#[test]
fn a_non_utf8_file_and_a_missing_column_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let latin = dir.path().join("latin1.csv");
    std::fs::write(
        &latin,
        b"user_id,service,timestamp,text\nu1,tag,,r\xe9trospective\n",
    )
    .unwrap();
    let e = prepare(&[latin], &dir.path().join("p"), &opts())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("latin1.csv:2") && e.contains("not valid UTF-8") && e.contains("iconv"),
        "{e}"
    );
    let nocol = dir.path().join("nocol.csv");
    std::fs::write(&nocol, "user_id,service,text\nu1,a,x\n").unwrap();
    let e = prepare(&[nocol], &dir.path().join("p"), &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nocol.csv") && e.contains("`timestamp`"), "{e}");
}

#[test]
fn one_service_or_an_empty_requested_service_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_log(dir.path(), "a.csv", &["u1,search,,x", "u2,search,,y"]);
    let e = prepare(std::slice::from_ref(&p), &dir.path().join("p"), &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("two services"), "{e}");
    let o = PrepareOptions {
        services: Some(vec!["search".into(), "news".into()]),
        ..opts()
    };
    let e = prepare(&[p], &dir.path().join("p"), &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`news` has no rows"), "{e}");
}

#[test]
fn dataset_and_batcher_give_the_encoder_its_input() {
    let dir = tempfile::tempdir().unwrap();
    synth(&dir.path().join("s"), &SynthOptions::new(200, 5)).unwrap();
    let out = dir.path().join("p");
    prepare(
        &[dir.path().join("s/logs")],
        &out,
        &PrepareOptions {
            max_item_tokens: 12,
            ..Default::default()
        },
    )
    .unwrap();
    let data = Arc::new(PreparedDataset::open(&out, true).unwrap());
    let ds = UserDataset::new(data.clone(), Split::Train, 5, 8);
    let samples: Vec<_> = (0..4).map(|i| ds.get(i).unwrap()).collect();
    for s in &samples {
        for (svc, items) in s.services.iter().enumerate() {
            let full = data.sequence(s.user as usize, svc);
            assert_eq!(items.len(), full.len().min(5));
            assert_eq!(
                items.last().unwrap().id,
                *full.last().unwrap(),
                "most recent item last"
            );
            assert!(items.iter().all(
                |i| i.tokens.len() <= 8 && i.tokens[0] == data.manifest.service_token_ids[svc]
            ));
        }
    }
    let b: UserBatch<NdArray> = UserBatcher::default().batch(samples.clone(), &Default::default());
    let [rows, slots, len] = b.tokens().dims();
    assert_eq!(rows, 8);
    assert!(slots <= 5 && len <= 8);
    let pad: Vec<bool> = b.item_pad.to_data().to_vec().unwrap();
    let tokens: Vec<i64> = b.tokens().to_data().convert::<i64>().to_vec().unwrap();
    for (i, s) in samples.iter().enumerate() {
        for (svc, items) in s.services.iter().enumerate() {
            let row = svc * 4 + i;
            for j in 0..slots {
                let is_pad = j >= items.len();
                assert_eq!(pad[row * slots + j], is_pad);
                let first = tokens[(row * slots + j) * len];
                assert_eq!(first == 0, is_pad, "padding slots hold only zeros");
            }
        }
    }
}
