//! Hostile but fair inputs: each must fail the command with a non-zero exit and a message that
//! names what is wrong, leave no final output holding partial data, and never end in a panic
//! report — or, where the input is legal, succeed.

use clue::data::store::{PreparedDataset, Split};
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::clue;

/// The command failed, without a panic, with a message holding every one of `needles`.
fn assert_fails(out: &Output, needles: &[&str]) -> String {
    let err = assert_fails_after_a_panic(out, needles);
    assert!(!err.contains("panicked"), "a panic report: {err}");
    err
}

/// The command failed with its own error (after whatever a panicking thread printed), holding
/// every one of `needles`.
fn assert_fails_after_a_panic(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "should fail; stderr: {err}");
    let own = &err[err
        .rfind("error: ")
        .unwrap_or_else(|| panic!("no error line: {err}"))..];
    for needle in needles {
        assert!(own.contains(needle), "`{needle}` missing from: {err}");
    }
    err
}

fn assert_succeeds(out: &Output) {
    assert!(
        out.status.success(),
        "should succeed; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private copy of a small prepared synthetic dataset (tests damage it).
fn prepared_copy(dir: &Path) -> PathBuf {
    let source = common::fixture(300, 5, 16, 16).join("p");
    let copy = dir.join("p");
    std::fs::create_dir_all(&copy).unwrap();
    for (name, bytes) in common::dir_bytes(&source) {
        std::fs::write(copy.join(name), bytes).unwrap();
    }
    copy
}

fn fit_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "fit",
        "--no-tui",
        "--data",
        data,
        "--out",
        out,
        "--set",
        "train.epochs=1",
    ];
    args.extend_from_slice(extra);
    args
}

/// A prepared copy in `dir` whose first `split` user's first item is set to an id no item has
/// (the file keeps its size); its path.
fn copy_with_a_bad_item_id(dir: &Path, split: Split) -> String {
    let data = prepared_copy(dir);
    let ds = PreparedDataset::open(&data, true).unwrap();
    let user = ds.users_in(split)[0] as usize;
    let services = ds.num_services();
    drop(ds);
    let offsets = std::fs::read(data.join("seqs.offsets.u64")).unwrap();
    let k = user * services;
    let at = u64::from_le_bytes(offsets[8 * k..8 * k + 8].try_into().unwrap()) as usize;
    let path = data.join("seqs.items.u32");
    let mut items = std::fs::read(&path).unwrap();
    items[4 * at..4 * at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&path, items).unwrap();
    data.display().to_string()
}

#[test]
fn a_damaged_prepared_file_is_refused_before_training_and_a_dead_loader_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = copy_with_a_bad_item_id(dir.path(), Split::Train);

    // Checked by default: the SHA-256 in the manifest names the damaged file.
    let out = clue(dir.path(), &fit_args(&d, "checked", &[]));
    assert_fails(&out, &["seqs.items.u32", "SHA-256", "clue prepare"]);
    assert!(!dir.path().join("checked/model").exists());

    // Unchecked: the loader thread that meets the bad id dies; the run must fail, not stop
    // early with exit 0 and export a part-trained model.
    let out = clue(dir.path(), &fit_args(&d, "unchecked", &["--no-verify"]));
    assert_fails_after_a_panic(&out, &["training stopped after", "data-loading thread"]);
    assert!(!dir.path().join("unchecked/model").exists());
    assert!(!dir.path().join("unchecked/summary.json").exists());
}

/// A loader thread that dies while building a validation batch fails the run with its
/// message, and the period's checkpoint is not written over the partial validation.
#[test]
fn a_loader_that_dies_in_validation_fails_the_run_and_leaves_no_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = copy_with_a_bad_item_id(dir.path(), Split::Valid);
    let out = clue(dir.path(), &fit_args(&d, "run", &["--no-verify"]));
    let err = assert_fails_after_a_panic(&out, &["training stopped after", "data-loading thread"]);
    assert!(err.contains("no checkpoint was completed"), "{err}");
    let files = std::fs::read_dir(dir.path().join("run/checkpoint")).map_or(0, |d| d.count());
    assert_eq!(
        files, 0,
        "checkpoint files written after a failed validation"
    );
    assert!(!dir.path().join("run/model").exists());
}

#[test]
fn a_damaged_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_copy(dir.path());
    let path = data.join("tokenizer.json");
    let mut text = std::fs::read(&path).unwrap();
    text.truncate(text.len() / 2);
    std::fs::write(&path, text).unwrap();
    let out = clue(
        dir.path(),
        &fit_args(&data.display().to_string(), "run", &[]),
    );
    assert_fails(&out, &["tokenizer.json", "SHA-256"]);
    assert!(!dir.path().join("run/model").exists());
}

#[test]
fn score_checks_the_data_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_copy(dir.path());
    let d = data.display().to_string();
    assert_succeeds(&clue(
        dir.path(),
        &fit_args(&d, "run", &["--backend", "flex"]),
    ));
    // A changed byte that leaves the tokenizer the same (a trailing newline): only the hash
    // can tell.
    let path = data.join("tokenizer.json");
    let mut text = std::fs::read(&path).unwrap();
    text.push(b'\n');
    std::fs::write(&path, text).unwrap();
    let score = ["score", "--backend", "flex", "--model", "run", "--data", &d];
    assert_fails(&clue(dir.path(), &score), &["tokenizer.json", "SHA-256"]);
    let text = said(&clue(dir.path(), &[&score[..], &["--no-verify"]].concat()));
    assert!(text.contains("loss"), "{text}");
}

/// stdout and stderr of a command that succeeded.
fn said(out: &Output) -> String {
    assert_succeeds(out);
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn a_checkpoint_that_cannot_be_written_fails_the_run_which_can_then_resume_or_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_copy(dir.path());
    let d = data.display().to_string();
    let blocked = |run: &str| {
        // A file where the checkpoint directory should be: every checkpoint write fails (as on
        // a full disk, but without needing one).
        std::fs::create_dir_all(dir.path().join(run)).unwrap();
        std::fs::write(dir.path().join(run).join("checkpoint"), b"in the way").unwrap();
        let extra = ["--set", "train.checkpoint_every=2", "--backend", "flex"];
        let out = clue(dir.path(), &fit_args(&d, run, &extra));
        let err = assert_fails(
            &out,
            &["training stopped after", "cannot write the checkpoint"],
        );
        assert!(err.contains("no checkpoint was completed"), "{err}");
        assert!(!dir.path().join(run).join("model").exists());
        assert!(!dir.path().join(run).join("summary.json").exists());
        std::fs::remove_file(dir.path().join(run).join("checkpoint")).unwrap();
    };

    // Resumed without --backend: from the first step, on the run's own backend. Its precision
    // is kept too: a run recorded as bf16 stays bf16 (which flex refuses).
    blocked("run");
    let info_path = dir.path().join("run/run.json");
    let info = std::fs::read_to_string(&info_path).unwrap();
    assert!(info.contains("\"precision\": \"f32\""), "{info}");
    std::fs::write(&info_path, info.replace("\"f32\"", "\"bf16\"")).unwrap();
    assert_fails(
        &clue(dir.path(), &["fit", "--no-tui", "--resume", "run"]),
        &["--precision bf16 needs --backend cuda"],
    );
    std::fs::write(&info_path, &info).unwrap();
    let text = said(&clue(dir.path(), &["fit", "--no-tui", "--resume", "run"]));
    assert!(text.contains("no complete checkpoint yet"), "{text}");
    let summary = std::fs::read(dir.path().join("run/summary.json")).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&summary).unwrap();
    assert_eq!(json["backend"], "flex");
    // A finished run says so and is left as it is.
    let text = said(&clue(dir.path(), &["fit", "--no-tui", "--resume", "run"]));
    assert!(text.contains("has finished"), "{text}");
    assert_eq!(
        std::fs::read(dir.path().join("run/summary.json")).unwrap(),
        summary
    );
    // One whose model was lost writes it again from its last checkpoint, the same weights.
    let weights = common::weights(&dir.path().join("run"));
    std::fs::remove_dir_all(dir.path().join("run/model")).unwrap();
    let text = said(&clue(dir.path(), &["fit", "--no-tui", "--resume", "run"]));
    assert!(!text.contains("has finished"), "{text}");
    assert_eq!(common::weights(&dir.path().join("run")), weights);
    assert_fails(
        &clue(dir.path(), &fit_args(&d, "run", &[])),
        &["already holds a run", "--resume"],
    );

    // Started again without --resume: allowed, as nothing was kept.
    blocked("again");
    let text = said(&clue(dir.path(), &fit_args(&d, "again", &[])));
    assert!(text.contains("starting it again"), "{text}");
    assert!(dir.path().join("again/model").exists());
}

#[test]
fn a_run_directory_in_use_is_refused_naming_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepared_copy(dir.path());
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let lock = std::fs::File::create(dir.path().join("run/.lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(dir.path().join("run/.lock"), "4242 fit").unwrap();
    let out = clue(
        dir.path(),
        &fit_args(&data.display().to_string(), "run", &[]),
    );
    assert_fails(&out, &["in use by clue fit (PID 4242)"]);
    assert!(!dir.path().join("run/run.json").exists());
    drop(lock);
}

/// `rows` canonical log rows of two services for users u0.., then `extra` appended.
fn log_with(dir: &Path, users: usize, extra: &str) -> PathBuf {
    let path = dir.join("logs.csv");
    std::fs::write(&path, common::log_text(users, extra)).unwrap();
    path
}

#[test]
fn a_quote_that_is_never_closed_stops_prepare_at_the_line_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    let prepare = |log: &Path, extra: &[&str]| {
        let mut args = vec!["prepare", log.to_str().unwrap(), "--out", "p"];
        args.extend_from_slice(extra);
        clue(dir.path(), &args)
    };
    // Line 2 opens a quote that nothing closes, with far more than the row limit after it.
    let mut text = String::from("user_id,service,timestamp,text\nu0,news,1,\"an open quote\n");
    for u in 0..3000 {
        text.push_str(&format!("u{u},shop,2,a perfectly fine row number {u}\n"));
    }
    let runaway = dir.path().join("runaway.csv");
    std::fs::write(&runaway, text).unwrap();
    let err = assert_fails(&prepare(&runaway, &[]), &["runaway.csv:2", "closing quote"]);
    assert!(err.contains("--max-row-bytes"), "{err}");
    assert!(!dir.path().join("p").exists());
    // Even --skip-bad-rows cannot go on: the rows after the quote are unknowable.
    assert_fails(&prepare(&runaway, &["--skip-bad-rows"]), &["runaway.csv:2"]);

    // A quote opened near the end runs to the end of the file: refused at its line too.
    let log = log_with(dir.path(), 60, "u7,news,9,\"unclosed\nu8,news,9,more\n");
    assert_fails(&prepare(&log, &[]), &["logs.csv:362", "never closed"]);
    assert!(!dir.path().join("p").exists());
    // ... also when it opens on the very last line.
    let log = log_with(dir.path(), 60, "u8,news,9,\"unclosed\n");
    assert_fails(&prepare(&log, &[]), &["logs.csv:362", "never closed"]);

    // A closed multi-line quoted text is legal.
    let log = log_with(dir.path(), 60, "u7,news,9,\"two\nlines\"\n");
    assert_succeeds(&prepare(&log, &[]));
}

#[test]
fn a_row_longer_than_the_limit_is_refused_unless_the_limit_is_raised() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!("u3,news,5,{}\n", "word ".repeat(40_000));
    let log = log_with(dir.path(), 60, &long);
    let l = log.display().to_string();
    let out = clue(dir.path(), &["prepare", &l, "--out", "p"]);
    assert_fails(&out, &["logs.csv:362", "longer than 65536 bytes"]);
    let out = clue(
        dir.path(),
        &["prepare", &l, "--out", "p", "--max-row-bytes", "400000"],
    );
    assert_succeeds(&out);
}
