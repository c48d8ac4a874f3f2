//! `clue sweep` and `clue scaling` (issue #15): every run of a grid trained and measured at the
//! same held-out batches, a killed sweep that skips what it finished, grids refused before any
//! run, and a scaling report over made-up points with a known law, a diverged and a missing run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clue::model::ParamCounts;
use clue::scaling::report::{ScalingReport, scaling};
use clue::scaling::sweep::{CurvePoint, POINT, RUNS, RunPoint, SWEEP, Status, SweepInfo};
use clue::train::fit::{PF_DAY, training_flops};

mod common;

const CLUE: &str = env!("CARGO_BIN_EXE_clue");

use common::clue;

fn grid(dir: &Path, body: &str) -> PathBuf {
    grid_with(dir, "eval_batch_size = 16\n", body)
}

/// A grid of tiny models (width 16) with `top` before its `[set]` table and `body` after it.
fn grid_with(dir: &Path, top: &str, body: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tiny.toml");
    let path = dir.join("grid.toml");
    let text = format!(
        "base = {:?}\n{top}curve_points = 2\n[set]\nmodel.d_model = 16\nmodel.d_ff = 32\n\
         model.heads = 2\nmodel.item_layers = 1\nmodel.service_layers = 1\nmodel.max_items = 8\n\
         model.max_item_tokens = 8\ntrain.batch_size = 16\n{body}",
        base.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn point(sweep: &Path, run: &str) -> RunPoint {
    let path = sweep.join(RUNS).join(run).join(POINT);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_sweep_measures_every_run_and_a_killed_sweep_skips_what_it_finished() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let data = common::fixture(300, 3, 8, 8).join("p");
    let data = data.to_str().unwrap();
    let g = grid(
        w,
        "[axes]\ntrain.epochs = [1, 3]\ntrain.shuffle = [true, false]\n",
    );
    let g = g.to_str().unwrap();
    let args = |out: &'static str| {
        vec![
            "sweep",
            "--grid",
            g,
            "--data",
            data,
            "--out",
            out,
            "--backend",
            "flex",
        ]
    };
    let t = Instant::now();
    let out = clue(w, &args("whole"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("== run 4/4 epochs-3_shuffle-false"),
        "{stdout}"
    );
    let info: SweepInfo =
        serde_json::from_str(&std::fs::read_to_string(w.join("whole").join(SWEEP)).unwrap())
            .unwrap();
    assert_eq!(info.runs.len(), 4);
    assert_eq!(info.eval_users % 16, 0, "whole evaluation batches only");
    let prepared = clue::data::store::PreparedDataset::open(Path::new(data), false).unwrap();
    let train = prepared.users_in(clue::data::store::Split::Train).len();
    for name in &info.runs {
        let p = point(&w.join("whole"), name);
        assert_eq!(p.status, Status::Done, "{name}");
        let loss = p.test_loss.unwrap();
        assert!(
            loss.is_finite() && loss < 16f64.ln() + 0.5,
            "{name}: {loss}"
        );
        assert_eq!(p.steps, train.div_ceil(16) * p.epochs, "{name}");
        let flops = training_flops(p.params.total, 16, p.steps, 8);
        assert_eq!(p.pf_days, flops / PF_DAY);
        // Two validations per run (curve_points = 2) or one per epoch, whichever is more.
        assert!(p.curve.len() >= 2, "{name}: {:?}", p.curve);
        assert_eq!(p.curve.last().unwrap().step, p.steps, "{name}");
        assert!(
            w.join("whole/runs")
                .join(name)
                .join("model/bundle.json")
                .exists()
        );
    }
    assert!(!point(&w.join("whole"), "epochs-1_shuffle-false").frontier_candidate());

    // Kill the same sweep as soon as its first run is measured, then start it again.
    let first = w
        .join("k")
        .join(RUNS)
        .join("epochs-1_shuffle-true")
        .join(POINT);
    let mut child = Command::new(CLUE)
        .args(args("k"))
        .current_dir(w)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + full * 3 + Duration::from_secs(30);
    while !first.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap_or(());
    child.wait().unwrap();
    let before = std::fs::read(&first).unwrap();
    let out = clue(w, &args("k"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("== run 1/4"),
        "the finished run was trained again: {stdout}"
    );
    assert!(stdout.contains("sweep done: 4 runs"), "{stdout}");
    assert_eq!(
        std::fs::read(&first).unwrap(),
        before,
        "its point was rewritten"
    );
    for name in &info.runs {
        assert_eq!(point(&w.join("k"), name).status, Status::Done, "{name}");
    }
    // The grid changed under the finished runs: refused, naming the run directory.
    std::fs::write(
        g,
        std::fs::read_to_string(g)
            .unwrap()
            .replace("model.d_model = 16", "model.d_model = 24"),
    )
    .unwrap();
    let out = clue(w, &args("k"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another config"),
        "{err}"
    );
    let out = clue(w, &["scaling", "--sweep", "k"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("a law needs at least 5"), "{stdout}");
    for chart in ["loss-vs-compute", "loss-vs-size", "loss-vs-steps"] {
        assert!(w.join("k").join(format!("{chart}.png")).exists(), "{chart}");
    }
}

#[test]
fn grids_and_data_that_cannot_work_are_refused_before_any_run() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let data = common::fixture(300, 3, 8, 8).join("p");
    let data = data.to_str().unwrap();
    for (top, body, needle) in [
        (
            "",
            "[axes]\ntrain.data_fraction = [0.5, 1.5]\n",
            "outside (0, 1]",
        ),
        ("", "[axes]\ntrain.epocs = [1]\n", "train.epocs"),
        (
            "",
            "[[ladder]]\nd_model = 18\nheads = 4\n",
            "does not divide",
        ),
        (
            "eval_batch_size = 4000\n",
            "",
            "fewer than the grid's eval_batch_size",
        ),
        (
            "eval_batch_size = 16\n",
            "[axes]\nmodel.kind = [\"flat\"]\nmodel.max_items = [2048]\n",
            "a flat model reads max_items · max_item_tokens = 16384",
        ),
    ] {
        let g = grid_with(w, top, body);
        let out = clue(
            w,
            &[
                "sweep",
                "--grid",
                g.to_str().unwrap(),
                "--data",
                data,
                "--out",
                "s",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{body}: {err}"
        );
        assert!(!w.join("s").join(RUNS).exists(), "{body}: a run started");
    }
    let g = grid(w, "");
    let out = clue(
        w,
        &[
            "sweep",
            "--grid",
            g.to_str().unwrap(),
            "--data",
            "missing",
            "--out",
            "s",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("missing"), "{err}");
}

/// A sweep directory `s` holding `points`, and `unfinished` runs of its grid without one.
fn write_sweep(s: &Path, points: &[RunPoint], unfinished: &[&str], tasks: &[&str]) {
    let mut names: Vec<String> = points.iter().map(|p| p.name.clone()).collect();
    names.extend(unfinished.iter().map(|n| n.to_string()));
    for p in points {
        let run = s.join(RUNS).join(&p.name);
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join(POINT), serde_json::to_string(p).unwrap()).unwrap();
    }
    let info = SweepInfo {
        grid: "g.toml".into(),
        data: "d".into(),
        backend: "flex".into(),
        eval_batch_size: 16,
        eval_users: 64,
        runs: names,
        tasks: tasks.iter().map(|t| t.to_string()).collect(),
    };
    std::fs::write(s.join(SWEEP), serde_json::to_string(&info).unwrap()).unwrap();
}

/// A made-up finished run at `pf_days` with `loss`.
fn made_up(name: &str, pf_days: f64, loss: Option<f64>, status: Status, fraction: f64) -> RunPoint {
    RunPoint {
        name: name.into(),
        coords: vec![("model".into(), name.into())],
        status,
        error: (status != Status::Done).then(|| "the loss became NaN or infinite".into()),
        params: ParamCounts {
            total: (pf_days * 1e16) as usize,
            non_embedding: 1,
        },
        d_model: 16,
        layers: 2,
        batch_size: 16,
        max_items: 8,
        output_dim: 0,
        data_fraction: fraction,
        shuffle: true,
        epochs: 1,
        steps: 10,
        flops: pf_days * PF_DAY,
        pf_days,
        test_loss: loss,
        test_top1: loss.map(|_| 0.5),
        curve: loss
            .map(|l| CurvePoint {
                step: 10,
                pf_days,
                valid_loss: l,
            })
            .into_iter()
            .collect(),
        wall_seconds: 1.0,
        downstream: Vec::new(),
    }
}

/// A sweep over both encoder kinds with `--task`: every run is evaluated on the task (its
/// point holds what its `clue eval` results say), a second task added later is evaluated without
/// training anything again, and `clue scaling` writes Table 5 and Figure 4-right from them.
#[test]
fn a_sweep_with_tasks_evaluates_every_run_and_tables_stacked_against_flat() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let root = common::fixture(300, 3, 8, 8);
    let data = root.join("p");
    let g = grid(w, "[axes]\nmodel.kind = [\"stacked\", \"flat\"]\n");
    let market = root.join("s/tasks/market.toml");
    let news = root.join("s/tasks/news.toml");
    let sweep = |out: &str, tasks: &[&Path]| {
        let mut args: Vec<&str> = vec![
            "sweep",
            "--grid",
            g.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out,
            "--backend",
            "flex",
        ];
        for t in tasks {
            args.extend(["--task", t.to_str().unwrap()]);
        }
        clue(w, &args)
    };
    let run = |tasks: &[&Path]| {
        let out = sweep("s", tasks);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    run(&[&market]);
    let names = ["kind-stacked", "kind-flat"];
    let bundle =
        |name: &str| std::fs::read(w.join("s/runs").join(name).join("model/model.mpk")).unwrap();
    let weights: Vec<Vec<u8>> = names.iter().map(|n| bundle(n)).collect();
    for name in names {
        let p = point(&w.join("s"), name);
        assert_eq!(p.downstream.len(), 1, "{name}");
        let d = &p.downstream[0];
        assert_eq!(d.task, "market");
        let results: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(w.join("s/runs").join(name).join("eval/market/results.json"))
                .unwrap(),
        )
        .unwrap();
        let sampled = &results["models"]["clue"]["sampled"];
        assert_eq!(d.mrr, sampled["mrr"].as_f64().unwrap(), "{name}");
        assert_eq!(d.hr10, sampled["hr@10"].as_f64().unwrap(), "{name}");
        assert!(d.mrr > 0.0 && d.mrr <= 1.0, "{name}: {}", d.mrr);
    }
    assert!(
        point(&w.join("s"), "kind-flat").params.non_embedding
            != point(&w.join("s"), "kind-stacked").params.non_embedding,
        "two different encoders"
    );
    // A flat run's compute counts its S·L = 64 positions per user and service.
    let flat = point(&w.join("s"), "kind-flat");
    let flops = training_flops(flat.params.total, 16, flat.steps, 8 * 8);
    assert!(
        (flat.pf_days / (flops / PF_DAY) - 1.0).abs() < 1e-12,
        "{}",
        flat.pf_days
    );
    // Another task later, alone: evaluated on the finished runs, nothing trained again.
    let stdout = run(&[&news]);
    assert!(
        !stdout.contains("== run"),
        "a run was trained again: {stdout}"
    );
    for (name, before) in names.iter().zip(&weights) {
        let tasks: Vec<String> = point(&w.join("s"), name)
            .downstream
            .iter()
            .map(|d| d.task.clone())
            .collect();
        assert_eq!(tasks, ["market", "news"], "{name}");
        assert_eq!(&bundle(name), before, "{name}: the model changed");
    }
    let info: SweepInfo =
        serde_json::from_str(&std::fs::read_to_string(w.join("s").join(SWEEP)).unwrap()).unwrap();
    assert_eq!(info.tasks, ["market", "news"]);
    let r = scaling(&w.join("s")).unwrap();
    assert_eq!(r.transfers.len(), 2);
    assert!(
        r.transfers
            .iter()
            .all(|t| t.runs == 2 && t.pearson.is_none()),
        "2 runs: no correlation"
    );
    let md = std::fs::read_to_string(w.join("s/scaling.md")).unwrap();
    let table = md
        .split("## Table 5")
        .nth(1)
        .expect("Table 5 in scaling.md");
    for kind in ["| flat | 1 |", "| stacked | 1 |", "market MRR", "news MRR"] {
        assert!(table.contains(kind), "{kind}: {table}");
    }
    assert!(w.join("s/downstream-vs-loss.png").exists());
    // Two tasks of one name are refused before any run.
    let out = sweep("t", &[&market, &market]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a second task named `market`"),
        "{err}"
    );
    assert!(!w.join("t/runs").exists());
}

/// Figure 4-right's correlations and Table 6 over made-up runs: MRR falling linearly with the
/// test loss gives Pearson and Spearman of −1, and the table averages each output dimension.
#[test]
fn scaling_correlates_downstream_with_test_loss_and_tables_the_output_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path();
    let mut points = Vec::new();
    for k in 0..4 {
        let loss = 3.0 - 0.1 * k as f64;
        let mut p = made_up(
            &format!("r{k}"),
            1e-10 * (k + 1) as f64,
            Some(loss),
            Status::Done,
            1.0,
        );
        p.coords = vec![("model.output_dim".into(), ["0", "8"][k % 2].into())];
        p.downstream = vec![clue::scaling::downstream::Downstream {
            task: "t".into(),
            mrr: 1.0 - loss / 4.0,
            hr10: 0.5,
            ndcg10: 0.4,
        }];
        points.push(p);
    }
    write_sweep(s, &points, &[], &["t"]);
    let r = scaling(s).unwrap();
    let t = &r.transfers[0];
    assert_eq!((t.task.as_str(), t.runs), ("t", 4));
    assert!((t.pearson.unwrap() + 1.0).abs() < 1e-12, "{t:?}");
    assert!((t.spearman.unwrap() + 1.0).abs() < 1e-12, "{t:?}");
    let md = std::fs::read_to_string(s.join("scaling.md")).unwrap();
    // Output 0: runs r0 (loss 3.0) and r2 (2.8) → 2.9000, MRR 1 − 2.9/4 = 0.2750; output 8:
    // r1, r3 → 2.8000, 0.3000.
    assert!(md.contains("| 0 | 2 | 2.9000 | 50.0 % | 0.2750 |"), "{md}");
    assert!(md.contains("| 8 | 2 | 2.8000 | 50.0 % | 0.3000 |"), "{md}");
    assert!(md.contains("## Table 6"));
    assert!(!md.contains("## Table 5"), "model.kind is not varied");
    assert!(s.join("downstream-vs-loss.png").exists());
}

#[test]
fn scaling_fits_the_frontier_and_reports_diverged_and_unfinished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path();
    let law = |c: f64| 2.0 + (1e-9 / c).powf(0.25);
    let mut points: Vec<RunPoint> = (0..9)
        .map(|k| {
            let c = 1e-12 * 10f64.powf(k as f64 / 2.0);
            made_up(&format!("r{k}"), c, Some(law(c)), Status::Done, 1.0)
        })
        .collect();
    // Above the frontier (more compute, worse loss), a diverged run, and a run on half the data
    // that would be on the frontier if it counted.
    points.push(made_up("slow", 1e-9, Some(law(1e-11)), Status::Done, 1.0));
    points.push(made_up("nan", 1e-10, None, Status::Diverged, 1.0));
    points.push(made_up("half", 2e-12, Some(1.0), Status::Done, 0.5));
    write_sweep(s, &points, &["late"], &[]);
    let r = scaling(s).unwrap();
    let expected: Vec<String> = (0..9).map(|k| format!("r{k}")).collect();
    assert_eq!(
        r.frontier, expected,
        "the lower envelope of the full-data runs"
    );
    let fit = r.law.as_ref().unwrap();
    assert!((fit.law.alpha - 0.25).abs() < 0.25 * 0.02, "{fit:?}");
    assert!((fit.law.l_inf - 2.0).abs() < 0.02, "{fit:?}");
    assert!((fit.decades - 4.0).abs() < 1e-9);
    let x = r.extrapolation.as_ref().unwrap();
    assert_eq!(x.held_out.len(), 1, "the top half-decade: r8 only");
    assert!(x.mean_abs_relative_error < 0.01, "{x:?}");
    assert_eq!(r.unfinished, vec!["late".to_string()]);
    let notes = r.notes.join("\n");
    assert!(
        notes.contains("1 run(s) failed or diverged")
            && notes.contains("1 run(s) have not finished"),
        "{notes}"
    );
    let md = std::fs::read_to_string(s.join("scaling.md")).unwrap();
    assert!(
        md.contains("| nan |") && md.contains("diverged: the loss became NaN"),
        "{md}"
    );
    assert!(
        md.contains("| late |") && md.contains("not run yet"),
        "{md}"
    );
    assert!(s.join("loss-vs-compute.png").exists() && s.join("loss-vs-size.svg").exists());
    // scaling.json reads back whole (no NaN or infinity written as null).
    let back: ScalingReport =
        serde_json::from_str(&std::fs::read_to_string(s.join("scaling.json")).unwrap()).unwrap();
    let read = back.law.unwrap().law;
    assert!(
        (read.alpha / fit.law.alpha - 1.0).abs() < 1e-12
            && (read.c0 / fit.law.c0 - 1.0).abs() < 1e-12
    );
    assert_eq!(back.frontier, r.frontier);
}

#[test]
fn similarity_tells_a_task_in_the_pretraining_vocabulary_from_one_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let root = common::fixture(300, 3, 8, 8);
    // The synthetic news task, and the same task with every item text replaced by words the
    // pretraining logs never use.
    let tasks = root.join("s/tasks");
    let alien = w.join("tasks");
    std::fs::create_dir_all(alien.join("news")).unwrap();
    let toml = std::fs::read_to_string(tasks.join("news.toml")).unwrap();
    let logs = tasks.join("../logs").display().to_string();
    std::fs::write(
        alien.join("news.toml"),
        toml.replace("\"../logs\"", &format!("{logs:?}")),
    )
    .unwrap();
    std::fs::copy(
        tasks.join("news/interactions.csv"),
        alien.join("news/interactions.csv"),
    )
    .unwrap();
    let items = std::fs::read_to_string(tasks.join("news/items.csv")).unwrap();
    let mut lines = items.lines();
    let mut out = format!("{}\n", lines.next().unwrap());
    for (i, line) in lines.enumerate() {
        let id = line.split(',').next().unwrap();
        out.push_str(&format!("{id},Ωmega{} ξylo{} ψ{}\n", i % 7, i % 11, i % 3));
    }
    std::fs::write(alien.join("news/items.csv"), out).unwrap();
    let rows = clue::scaling::similarity::similarity(
        &root.join("p"),
        &[tasks.join("news.toml"), alien.join("news.toml")],
        &[],
    )
    .unwrap();
    let (same, other) = (&rows[0], &rows[1]);
    assert!(
        same.coverage > 0.6,
        "the news task uses the logs' words: {same:?}"
    );
    assert!(
        other.coverage < same.coverage - 0.3,
        "{other:?} vs {same:?}"
    );
    assert!(same.tau.is_some_and(|t| t > -1.0 && t < 1.0), "{same:?}");
    assert!(rows[0].tokens > 100 && rows[0].clue_gain.is_none());
}
