//! A corpus of hostile but fair inputs across every command (issue #13): encodings, quotes,
//! line endings, sizes, timestamps, paths, configurations and outputs that do not belong
//! together. Each case must fail its command with a non-zero exit, its own message naming what
//! is wrong (no panic report), and leave no output at the path it was asked to write; the legal
//! look-alikes (milliseconds, CRLF, BOM, quoted commas) must succeed.

use std::path::Path;
use std::process::{Command, Output};

mod common;

const CLUE: &str = env!("CARGO_BIN_EXE_clue");

fn clue(dir: &Path, args: &[String]) -> Output {
    Command::new(CLUE)
        .args(args)
        .current_dir(dir)
        .env_remove("CLUE_KEEP_DENORMALS")
        .output()
        .unwrap()
}

/// One hostile input: the command line (`{W}` is the work directory), what the error must say,
/// and the output that must not exist afterwards.
struct Case {
    name: &'static str,
    args: &'static str,
    needles: &'static [&'static str],
    out: Option<&'static str>,
}

const fn case(
    name: &'static str,
    args: &'static str,
    needles: &'static [&'static str],
    out: Option<&'static str>,
) -> Case {
    Case {
        name,
        args,
        needles,
        out,
    }
}

/// The logs, configs and task files the cases read, under `w`.
fn write_inputs(w: &Path, fixture: &Path) {
    let put = |name: &str, bytes: &[u8]| std::fs::write(w.join(name), bytes).unwrap();
    let ok = common::log_text(60, "");
    put("ok.csv", ok.as_bytes());
    put("empty.csv", b"");
    put("header-only.csv", b"user_id,service,timestamp,text\n");
    put("no-text.csv", b"user_id,service,timestamp\nu1,news,1\n");
    put("few.csv", common::log_text(60, "u1,news,5\n").as_bytes());
    put(
        "many.csv",
        common::log_text(60, "u1,news,5,a,b\n").as_bytes(),
    );
    let mut latin1 = common::log_text(60, "").into_bytes();
    latin1.extend_from_slice(b"u1,news,5,caf\xe9 au lait\n");
    put("latin1.csv", &latin1);
    let utf16: Vec<u8> = std::iter::once(0xFEFFu16)
        .chain(ok.encode_utf16())
        .flat_map(|c| c.to_le_bytes())
        .collect();
    put("utf16.csv", &utf16);
    put(
        "when.csv",
        common::log_text(60, "u1,news,yesterday,a text\n").as_bytes(),
    );
    put(
        "no-user.csv",
        common::log_text(60, " ,news,5,a text\n").as_bytes(),
    );
    put(
        "open-quote.csv",
        common::log_text(60, "u1,news,5,\"never closed\n").as_bytes(),
    );
    let long = format!("u1,news,5,{}\n", "x".repeat(70_000));
    put("long-row.csv", common::log_text(60, &long).as_bytes());
    let one: String = common::log_text(60, "")
        .lines()
        .filter(|l| !l.contains(",shop,"))
        .map(|l| format!("{l}\n"))
        .collect();
    put("one-service.csv", one.as_bytes());
    put(
        "crlf-bad.csv",
        common::log_text(60, "u1,news,5\r\n")
            .replace('\n', "\r\n")
            .as_bytes(),
    );
    put("garbage-tokenizer.json", b"{\"model\": 7}");
    std::fs::create_dir_all(w.join("no-csv")).unwrap();
    put("no-csv/readme.txt", b"nothing here");
    std::os::unix::fs::symlink(w.join("gone.csv"), w.join("dangling.csv")).unwrap();
    std::fs::create_dir_all(w.join("taken")).unwrap();
    put("taken/precious.txt", b"mine");
    put("bad.toml", b"[model\nd_model = ");
    // Legal look-alikes.
    let millis = common::log_text(60, "").replace(",17000000", ",17000000000");
    put("millis.csv", millis.as_bytes());
    let rfc = common::log_text(60, "u1,news,2023-11-14T22:13:20.123Z,\"a, quoted; text\"\n");
    put("rfc3339-ms.csv", rfc.as_bytes());
    put("crlf.csv", ok.replace('\n', "\r\n").as_bytes());
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend_from_slice(ok.as_bytes());
    put("bom.csv", &bom);
    let reserved = common::log_text(60, "u1,news,5,<svc:shop> <pad> injected\n");
    put("reserved.csv", reserved.as_bytes());

    // Task files: the fixture's news task with one value that cannot work each.
    let tasks = fixture.join("s/tasks");
    let news = std::fs::read_to_string(tasks.join("news.toml")).unwrap();
    let abs = |t: &str| {
        t.replace("\"news/", &format!("\"{}/news/", tasks.display()))
            .replace("\"../logs\"", &format!("\"{}/s/logs\"", fixture.display()))
    };
    put("news.toml", abs(&news).as_bytes());
    put(
        "zero-negatives.toml",
        abs(&news).replace("count = 100", "count = 0").as_bytes(),
    );
    let models = |m: &str| {
        abs(&news)
            .lines()
            .map(|l| {
                if l.starts_with("models =") {
                    m.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    put("no-models.toml", models("models = []").as_bytes());
    put(
        "unknown-model.toml",
        models("models = [\"gpt\"]").as_bytes(),
    );
    put(
        "twice-model.toml",
        models("models = [\"clue\", \"clue\"]").as_bytes(),
    );
    put(
        "no-split.toml",
        abs(&news).replace("test = 0.2", "test = 0.95").as_bytes(),
    );
    put(
        "missing-items.toml",
        abs(&news)
            .replace("news/items.csv", "news/nothing.csv")
            .as_bytes(),
    );
}

/// Every case, by command. `{W}` is the work directory, `{P}` the prepared fixture, `{S}` its
/// synthetic logs, `{RUN}` a trained run.
const CASES: &[Case] = &[
    // prepare: encodings, columns, quotes, sizes, timestamps, paths, values.
    case(
        "empty file",
        "prepare {W}/empty.csv --out o",
        &["empty.csv", "header"],
        Some("o"),
    ),
    case(
        "header only",
        "prepare {W}/header-only.csv --out o",
        &["no"],
        Some("o"),
    ),
    case(
        "missing column",
        "prepare {W}/no-text.csv --out o",
        &["no-text.csv", "text"],
        Some("o"),
    ),
    case(
        "too few fields",
        "prepare {W}/few.csv --out o",
        &["few.csv:362"],
        Some("o"),
    ),
    case(
        "too many fields",
        "prepare {W}/many.csv --out o",
        &["many.csv:362"],
        Some("o"),
    ),
    case(
        "latin-1 byte",
        "prepare {W}/latin1.csv --out o",
        &["latin1.csv:362", "UTF-8"],
        Some("o"),
    ),
    case(
        "UTF-16 file",
        "prepare {W}/utf16.csv --out o",
        &["utf16.csv"],
        Some("o"),
    ),
    case(
        "bad timestamp",
        "prepare {W}/when.csv --out o",
        &["when.csv:362", "timestamp"],
        Some("o"),
    ),
    case(
        "blank user",
        "prepare {W}/no-user.csv --out o",
        &["no-user.csv:362"],
        Some("o"),
    ),
    case(
        "open quote",
        "prepare {W}/open-quote.csv --out o",
        &["open-quote.csv:362", "never closed"],
        Some("o"),
    ),
    case(
        "row over the limit",
        "prepare {W}/long-row.csv --out o",
        &["long-row.csv:362", "65536"],
        Some("o"),
    ),
    case(
        "CRLF short row",
        "prepare {W}/crlf-bad.csv --out o",
        &["crlf-bad.csv"],
        Some("o"),
    ),
    case(
        "one service",
        "prepare {W}/one-service.csv --out o",
        &["two services"],
        Some("o"),
    ),
    case(
        "every user dropped",
        "prepare {W}/ok.csv --out o --min-behaviors 5",
        &["no user is left", "--min-behaviors"],
        Some("o"),
    ),
    case(
        "service twice",
        "prepare {W}/ok.csv --out o --services news,news",
        &["`news`", "twice"],
        Some("o"),
    ),
    case(
        "unknown service",
        "prepare {W}/ok.csv --out o --services news,films",
        &["films"],
        Some("o"),
    ),
    case(
        "vocabulary too small",
        "prepare {W}/ok.csv --out o --vocab-size 10",
        &["vocab_size", "300"],
        Some("o"),
    ),
    case(
        "vocabulary too large",
        "prepare {W}/ok.csv --out o --vocab-size 100000000",
        &["vocab_size", "1048576"],
        Some("o"),
    ),
    case(
        "zero items",
        "prepare {W}/ok.csv --out o --max-items 0",
        &["max_items"],
        Some("o"),
    ),
    case(
        "items too long",
        "prepare {W}/ok.csv --out o --max-item-tokens 1000000",
        &["65536"],
        Some("o"),
    ),
    case(
        "min behaviours above max",
        "prepare {W}/ok.csv --out o --max-items 4 --min-behaviors 9",
        &["min_behaviors"],
        Some("o"),
    ),
    case(
        "fractions",
        "prepare {W}/ok.csv --out o --valid-fraction 0.7 --test-fraction 0.5",
        &["fractions"],
        Some("o"),
    ),
    case(
        "no such file",
        "prepare {W}/nowhere.csv --out o",
        &["nowhere.csv"],
        Some("o"),
    ),
    case(
        "directory without CSV",
        "prepare {W}/no-csv --out o",
        &["no-csv", ".csv"],
        Some("o"),
    ),
    case(
        "dangling symlink",
        "prepare {W}/dangling.csv --out o",
        &["dangling.csv"],
        Some("o"),
    ),
    case(
        "garbage tokenizer",
        "prepare {W}/ok.csv --out o --tokenizer {W}/garbage-tokenizer.json",
        &["garbage-tokenizer.json"],
        Some("o"),
    ),
    case(
        "broken config",
        "prepare {W}/ok.csv --out o --config {W}/bad.toml",
        &["bad.toml"],
        Some("o"),
    ),
    case(
        "output not clue's",
        "prepare {W}/ok.csv --out taken",
        &["taken", "not an output of clue"],
        None,
    ),
    // synth
    case(
        "too few synthetic users",
        "synth --users 5 --out o",
        &["--users", "10"],
        Some("o"),
    ),
    case(
        "synthetic users that fill a disk",
        "synth --users 10000000000 --out o",
        &["--users", "10000000"],
        Some("o"),
    ),
    // fit
    case(
        "not prepared data",
        "fit --no-tui --data {W}/no-csv --out o",
        &["no-csv"],
        Some("o/model"),
    ),
    case(
        "heads do not divide",
        "fit --no-tui --data {P} --out o --set model.heads=3",
        &["heads"],
        Some("o/model"),
    ),
    case(
        "a model no machine holds",
        "fit --no-tui --data {P} --out o --set model.d_model=60000 --set model.heads=4",
        &["parameters", "limit"],
        Some("o/model"),
    ),
    case(
        "width over the limit",
        "fit --no-tui --data {P} --out o --set model.d_ff=1000000",
        &["model.d_ff", "limit"],
        Some("o/model"),
    ),
    case(
        "zero batch",
        "fit --no-tui --data {P} --out o --set train.batch_size=0",
        &["batch_size"],
        Some("o/model"),
    ),
    case(
        "unknown key",
        "fit --no-tui --data {P} --out o --set train.speed=11",
        &["speed"],
        Some("o/model"),
    ),
    case(
        "dropout of one",
        "fit --no-tui --data {P} --out o --set model.dropout=1.0",
        &["dropout"],
        Some("o/model"),
    ),
    case(
        "batch above the users",
        "fit --no-tui --data {P} --out o --set train.batch_size=100000",
        &["batch"],
        Some("o/model"),
    ),
    case(
        "no such config",
        "fit --no-tui --data {P} --out o --config {W}/nowhere.toml",
        &["nowhere.toml"],
        Some("o/model"),
    ),
    // score
    case(
        "score without a model",
        "score --model {W}/no-csv --data {P}",
        &["no-csv", "bundle"],
        None,
    ),
    // embed
    case(
        "embed to a text file",
        "embed --model {RUN} --logs {S} --out e.txt",
        &["e.txt", ".safetensors"],
        Some("e.txt"),
    ),
    case(
        "embed a service twice",
        "embed --model {RUN} --logs {S} --services shop,shop --out e.safetensors",
        &["`shop`", "twice"],
        Some("e.safetensors"),
    ),
    case(
        "alias to an unknown service",
        "embed --model {RUN} --logs {S} --services shop,market --alias market=films --out e.safetensors",
        &["films"],
        Some("e.safetensors"),
    ),
    case(
        "alias of a service not embedded",
        "embed --model {RUN} --logs {S} --alias market=shop --out e.safetensors",
        &["`market`", "not among"],
        Some("e.safetensors"),
    ),
    case(
        "logs without the services",
        "embed --model {RUN} --logs {W}/ok.csv --services search --out e.safetensors",
        &["no behaviour"],
        Some("e.safetensors"),
    ),
    case(
        "embed without a model",
        "embed --model {W}/no-csv --logs {S} --out e.safetensors",
        &["bundle"],
        Some("e.safetensors"),
    ),
    // eval
    case(
        "no task file",
        "eval --task {W}/nowhere.toml --model {RUN} --out o",
        &["nowhere.toml"],
        Some("o"),
    ),
    case(
        "zero negatives",
        "eval --task {W}/zero-negatives.toml --model {RUN} --out o",
        &["count = 0"],
        Some("o"),
    ),
    case(
        "empty model list",
        "eval --task {W}/no-models.toml --model {RUN} --out o",
        &["empty"],
        Some("o"),
    ),
    case(
        "unknown model",
        "eval --task {W}/unknown-model.toml --model {RUN} --out o",
        &["gpt"],
        Some("o"),
    ),
    case(
        "model listed twice",
        "eval --task {W}/twice-model.toml --model {RUN} --out o",
        &["twice"],
        Some("o"),
    ),
    case(
        "split without training users",
        "eval --task {W}/no-split.toml --model {RUN} --out o",
        &["split"],
        Some("o"),
    ),
    case(
        "missing catalogue",
        "eval --task {W}/missing-items.toml --model {RUN} --out o",
        &["nothing.csv"],
        Some("o"),
    ),
    case(
        "mixed embedding set",
        "eval --task {W}/news.toml --model {RUN} --embeddings {W}/mixed.safetensors --models clue --out o",
        &["mixed.users.csv", "mixed"],
        Some("o"),
    ),
    case(
        "embedding set without manifest",
        "eval --task {W}/news.toml --model {RUN} --embeddings {W}/cut.safetensors --models clue --out o",
        &["incomplete"],
        Some("o"),
    ),
    // bench
    case(
        "unknown preset",
        "bench --preset huge",
        &["huge", "tiny"],
        None,
    ),
];

fn expand(args: &str, vars: &[(&str, String)]) -> Vec<String> {
    args.split_whitespace()
        .map(|a| vars.iter().fold(a.to_string(), |a, (k, v)| a.replace(k, v)))
        .collect()
}

#[test]
fn every_hostile_input_fails_its_command_cleanly_and_the_legal_look_alikes_pass() {
    let fixture = common::fixture(300, 5, 16, 16);
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    write_inputs(w, &fixture);
    let run = w.join("run");
    let vars = vec![
        ("{W}", w.display().to_string()),
        ("{P}", fixture.join("p").display().to_string()),
        ("{S}", fixture.join("s/logs").display().to_string()),
        ("{RUN}", run.display().to_string()),
    ];
    let ok = |args: &str, vars: &[(&str, String)]| {
        let out = clue(w, &expand(args, vars));
        assert!(
            out.status.success(),
            "{args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A small trained run and two embedding sets to damage: `mixed` gets another set's
    // users.csv (the rows of other users), `cut` loses its manifest (a kill before it).
    ok(
        "fit --no-tui --backend flex --data {P} --out {RUN} --set train.epochs=1 \
         --set model.d_model=16 --set model.d_ff=32 --set model.heads=2 \
         --set model.item_layers=1 --set model.service_layers=1",
        &vars,
    );
    for stem in ["mixed", "cut", "other"] {
        ok(
            &format!(
                "embed --backend flex --model {{RUN}} --logs {{S}} --out {{W}}/{stem}.safetensors"
            ),
            &vars,
        );
    }
    let users = std::fs::read_to_string(w.join("other.users.csv")).unwrap();
    let mut lines: Vec<&str> = users.lines().collect();
    lines[1..].reverse();
    std::fs::write(w.join("mixed.users.csv"), lines.join("\n") + "\n").unwrap();
    std::fs::remove_file(w.join("cut.manifest.json")).unwrap();

    let mut failed = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let cwd = w.join(format!("case-{i}"));
        std::fs::create_dir_all(&cwd).unwrap();
        if c.out.is_none() && c.args.contains("taken") {
            std::fs::rename(w.join("taken"), cwd.join("taken")).unwrap();
        }
        let out = clue(&cwd, &expand(c.args, &vars));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let own = err.rfind("error: ").map(|at| &err[at..]).unwrap_or("");
        let mut wrong = Vec::new();
        if out.status.success() {
            wrong.push("exit 0".to_string());
        }
        if own.is_empty() || err.contains("panicked") {
            wrong.push("no error line of its own, or a panic".to_string());
        }
        wrong.extend(
            c.needles
                .iter()
                .filter(|n| !own.contains(*n))
                .map(|n| format!("`{n}` missing")),
        );
        if let Some(o) = c.out
            && cwd.join(o).exists()
        {
            wrong.push(format!("{o} was written"));
        }
        let leftovers: Vec<String> = std::fs::read_dir(&cwd)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
            .collect();
        if !leftovers.is_empty() {
            wrong.push(format!("temporary files left: {leftovers:?}"));
        }
        if !wrong.is_empty() {
            failed.push(format!(
                "{} ({}): {}\n    {}",
                c.name,
                c.args,
                wrong.join("; "),
                own.trim()
            ));
        }
    }
    assert!(
        w.join(format!(
            "case-{}/taken/precious.txt",
            CASES.iter().position(|c| c.args.contains("taken")).unwrap()
        ))
        .exists(),
        "a directory clue did not write is left alone"
    );
    assert!(
        failed.is_empty(),
        "{} of {} cases went wrong:\n{}",
        failed.len(),
        CASES.len(),
        failed.join("\n")
    );

    // The legal look-alikes: milliseconds (integer or RFC 3339), CRLF, a UTF-8 BOM, a quoted
    // comma, and log text that spells the reserved tokens.
    for log in ["millis", "rfc3339-ms", "crlf", "bom", "reserved"] {
        ok(
            &format!("prepare {{W}}/{log}.csv --out {{W}}/ok-{log}"),
            &vars,
        );
    }
    assert!(CASES.len() >= 40, "the corpus holds {} cases", CASES.len());

    // An output another writer holds (its lock taken here) is refused, naming the holder: the
    // command its lock file records (another than the refused one's), or its PID alone.
    for (args, command, held, says) in [
        (
            "prepare {W}/ok.csv --out held",
            "prepare",
            "4242 embed",
            "in use by clue embed (PID 4242)",
        ),
        (
            "embed --model {RUN} --logs {S} --out held.safetensors",
            "embed",
            "4242 eval",
            "in use by clue eval (PID 4242)",
        ),
        (
            "eval --task {W}/news.toml --model {RUN} --out held",
            "eval",
            "4242",
            "in use by another clue (PID 4242)",
        ),
    ] {
        let cwd = w.join(format!("held-{command}"));
        std::fs::create_dir_all(&cwd).unwrap();
        let lock = cwd.join(".held.lock");
        let file = std::fs::File::create(&lock).unwrap();
        file.lock().unwrap();
        std::fs::write(&lock, held).unwrap();
        let out = clue(&cwd, &expand(args, &vars));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args}: {err}");
        assert!(!cwd.join("held").exists() && !cwd.join("held.safetensors").exists());
    }
}
