//! Multi-node training (`clue fit --nodes N --node-rank R --coordinator HOST:PORT`) with two
//! processes on the loopback address: they train exactly as one process with all their workers,
//! and what cannot work fails with a clear message, before training and without hanging.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering::SeqCst};
use std::time::{Duration, Instant};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tiny.toml");

/// A port P with P, P + 1 and P + 2 free (the coordinator and two nodes' default addresses),
/// another one at every call (the tests of this file run at the same time).
fn free_ports() -> u16 {
    static CALLS: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 20_000) as u16 + 100 * CALLS.fetch_add(1, SeqCst);
    (start..start + 100)
        .step_by(5)
        .find(|&p| (p..p + 3).all(|q| TcpListener::bind(("0.0.0.0", q)).is_ok()))
        .expect("three free ports")
}

/// `clue fit` of the tiny config on `data` into `out`, with `extra` arguments.
fn fit_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "fit",
        "--backend",
        "flex",
        "--config",
        TINY,
        "--data",
        data,
        "--out",
        out,
        "--no-tui",
        "--set",
        "train.epochs=1",
    ];
    args.extend_from_slice(extra);
    args
}

/// Both ranks of a two-node run, each with its own extra arguments; rank 1 starts first.
fn two_nodes(dir: &Path, data: &str, port: u16, extra: [&[&str]; 2]) -> [Output; 2] {
    node_pair(dir, port, |rank| {
        let out = dir.join(format!("node{rank}"));
        let args = fit_args(data, out.to_str().unwrap(), extra[rank]);
        args.into_iter().map(String::from).collect()
    })
}

/// Both ranks of a two-node run, rank r started with `args(r)` and the run's node arguments;
/// rank 1 starts first.
fn node_pair(dir: &Path, port: u16, args: impl Fn(usize) -> Vec<String>) -> [Output; 2] {
    let coordinator = format!("127.0.0.1:{port}");
    let run = |rank: usize| {
        let rank_text = rank.to_string();
        Command::new(env!("CARGO_BIN_EXE_clue"))
            .args(args(rank))
            // One thread per node: a worker computes on its share of the threads (one in a
            // process of two workers on two cores), and some of its sums split by thread count.
            .env("RAYON_NUM_THREADS", "1")
            .args([
                "--nodes",
                "2",
                "--node-rank",
                &rank_text,
                "--coordinator",
                &coordinator,
                "--join-timeout",
                "60",
            ])
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let second = run(1);
    let first = run(0);
    [
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    ]
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two nodes train as one process with all their workers. One worker each: the same weights,
/// byte for byte, as two workers in one process (the batch's chunks, dropout keys and the sum
/// of two gradients are the same; each worker computes on one thread), on both nodes. Two
/// workers each: within 1e-4 of four workers in one process (the four gradients are summed in
/// another order). Rank 0 keeps the coordinator's log.
#[test]
fn two_nodes_on_loopback_train_like_one_process_with_all_their_workers() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::fixture(600, 0, 16, 16).join("p");
    let data = data.to_str().unwrap();
    for workers in [1, 2] {
        let root = dir.path().join(format!("w{workers}"));
        std::fs::create_dir_all(&root).unwrap();
        let all = (2 * workers).to_string();
        let one = root.join("one");
        // Two threads, whatever the machine: one per worker, as on each node.
        let args = fit_args(data, one.to_str().unwrap(), &["--devices", &all]);
        let single = common::clue_with(&root, &args, &[("RAYON_NUM_THREADS", "2")]);
        assert!(single.status.success(), "{}", text(&single));
        let each = workers.to_string();
        let extra: &[&str] = &["--devices", &each];
        let [rank0, rank1] = two_nodes(&root, data, free_ports(), [extra; 2]);
        for (rank, out) in [&rank0, &rank1].into_iter().enumerate() {
            let t = text(out);
            assert!(out.status.success(), "node {rank}: {t}");
            let s = if workers == 1 { "" } else { "s" };
            let line = format!("data-parallel over 2 nodes × {workers} worker{s}");
            assert!(t.contains(&line), "node {rank}: {t}");
            assert!(!t.contains("panicked"), "node {rank}: {t}");
        }
        let reference = common::weights(&one);
        for node in ["node0", "node1"] {
            let got = common::weights(&root.join(node));
            assert_eq!(got.len(), reference.len());
            for (name, w) in &reference {
                let diff = common::max_abs_diff(w, &got[name]);
                if workers == 1 {
                    assert!(
                        diff == 0.0,
                        "{node}, {name}: |Δ| {diff:e}, not the same bytes"
                    );
                } else {
                    assert!(diff <= 1e-4, "{node}, {name}: |Δ| {diff:e}");
                }
            }
        }
        assert!(root.join("node0/coordinator.log").exists());
        assert!(!root.join("node1/coordinator.log").exists());
    }
}

/// What cannot work is refused with the fix named: before any data is made for flags that are
/// wrong on their own; before training, within the time limit, for a run that cannot meet.
#[test]
fn multi_node_runs_that_cannot_work_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let none: &[&str] = &[];
    for (backend, rank, coordinator, extra, expected) in [
        (
            "wgpu",
            "0",
            "127.0.0.1:29500",
            none,
            "cuda or on a CPU backend",
        ),
        (
            "flex",
            "2",
            "127.0.0.1:29500",
            none,
            "--node-rank 2 is out of range for --nodes 2",
        ),
        (
            "flex",
            "0",
            "no-such-host.invalid:29500",
            none,
            "does not resolve",
        ),
        ("flex", "0", "127.0.0.1", none, "not HOST:PORT"),
        (
            "flex",
            "1",
            "10.9.8.7:29500",
            none,
            "--node-address is needed",
        ),
        (
            "flex",
            "0",
            "127.0.0.1:29500",
            &["--peer-timeout", "0"],
            "--peer-timeout 0: every step would fail",
        ),
    ] {
        let mut args = vec![
            "fit",
            "--backend",
            backend,
            "--nodes",
            "2",
            "--node-rank",
            rank,
            "--coordinator",
            coordinator,
        ];
        args.extend_from_slice(extra);
        let out = common::clue(dir.path(), &args);
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out).contains(expected), "{args:?}: {}", text(&out));
    }
    assert!(
        !dir.path().join("data").exists(),
        "no default data was made"
    );

    let data = common::fixture(600, 0, 16, 16).join("p");
    let data = data.to_str().unwrap();
    // Nobody at the coordinator: an error after --join-timeout, not a hang.
    let port = free_ports().to_string();
    let coordinator = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let alone = common::clue(
        dir.path(),
        &fit_args(
            data,
            "alone",
            &[
                "--nodes",
                "2",
                "--node-rank",
                "1",
                "--coordinator",
                &coordinator,
                "--join-timeout",
                "2",
            ],
        ),
    );
    assert!(!alone.status.success());
    assert!(
        text(&alone).contains("waited 2 s at the coordinator"),
        "{}",
        text(&alone)
    );
    // It said once that it joins, not once per connection attempt.
    assert_eq!(
        text(&alone)
            .matches(&format!(
                "node 1 (ranks 0 to 1): joining the run at {coordinator}"
            ))
            .count(),
        1,
        "{}",
        text(&alone)
    );
    assert!(!text(&alone).contains("Connecting to"), "{}", text(&alone));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    // A batch that does not split over every worker of every node.
    let odd = common::clue(
        dir.path(),
        &fit_args(
            data,
            "odd",
            &[
                "--devices",
                "2",
                "--set",
                "train.batch_size=30",
                "--nodes",
                "2",
                "--node-rank",
                "0",
                "--coordinator",
                &coordinator,
            ],
        ),
    );
    assert!(
        text(&odd).contains("does not divide into 2 nodes × 2 workers"),
        "{}",
        text(&odd)
    );
    // Two nodes with different plans (another learning rate) refuse to train apart.
    let [rank0, rank1] = two_nodes(
        dir.path(),
        data,
        free_ports(),
        [&[], &["--set", "train.lr=0.002"]],
    );
    for (rank, out) in [&rank0, &rank1].into_iter().enumerate() {
        assert!(!out.status.success(), "node {rank}");
        assert!(
            text(out).contains("the nodes do not run the same plan: their config differs"),
            "node {rank}: {}",
            text(out)
        );
    }
}

/// Resumed nodes agree on the newest checkpoint that every node holds. One node stopped while
/// writing its second checkpoint: both resume from the first, the node that holds the second
/// says so, and both end with the weights of the run that was not interrupted (after a try in
/// which one node failed between the join and the first step, which stopped the other). A node
/// whose run has finished trains the last period again with one that has not; where both have
/// finished, neither trains. A node started without `--resume` beside one with it is refused,
/// each saying which it is; so are nodes with no checkpoint in common, until a checkpoint is
/// copied over.
#[test]
fn resumed_nodes_agree_on_the_newest_checkpoint_they_all_hold() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::fixture(600, 0, 16, 16).join("p");
    let data = data.to_str().unwrap();
    let two: &[&str] = &["--set", "train.epochs=2"];
    for (rank, out) in two_nodes(dir.path(), data, free_ports(), [two; 2])
        .iter()
        .enumerate()
    {
        assert!(out.status.success(), "node {rank}: {}", text(out));
    }
    let node = |rank: usize| dir.path().join(format!("node{rank}"));
    let uninterrupted = common::weights(&node(0));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node(0).join("summary.json")).unwrap()).unwrap();
    let first_period = summary["steps"].as_u64().unwrap() / 2;
    // Both stopped before the end; node 1 while writing its second checkpoint.
    for rank in [0, 1] {
        std::fs::remove_file(node(rank).join("summary.json")).unwrap();
        std::fs::remove_dir_all(node(rank).join("model")).unwrap();
    }
    for p in ["model", "optim", "scheduler"] {
        std::fs::remove_file(node(1).join(format!("checkpoint/{p}-2.mpk"))).unwrap();
    }
    let resume = |rank: usize| {
        let run = node(rank).to_str().unwrap().to_string();
        vec!["fit".into(), "--resume".into(), run, "--no-tui".into()]
    };
    // A node that fails after the join (a damaged history.json) stops the other at its first
    // step, and the two runs stay resumable.
    let history = node(1).join("history.json");
    let kept = std::fs::read(&history).unwrap();
    std::fs::write(&history, b"{ damaged").unwrap();
    let started = Instant::now();
    let [rank0, rank1] = node_pair(dir.path(), free_ports(), resume);
    // The failing node leaves at once: had it waited for the others at a last meeting they never
    // come to (they are in their first step), the pair would take 20 s more (`LEAVE_TIMEOUT`).
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "{took:?}");
    let (t0, t1) = (text(&rank0), text(&rank1));
    assert!(
        !rank1.status.success() && t1.contains("history.json"),
        "{t1}"
    );
    assert!(
        !rank0.status.success() && t0.contains("did another node stop?"),
        "{t0}"
    );
    // Node 0 names the checkpoint it resumed from, not the newer one it holds.
    let named = format!("the last complete checkpoint (after step {first_period}) is kept");
    assert!(t0.contains(&named), "{t0}");
    assert!(
        !t0.contains("panicked") && !t1.contains("panicked"),
        "{t0}\n{t1}"
    );
    std::fs::write(&history, kept).unwrap();

    let [rank0, rank1] = node_pair(dir.path(), free_ports(), resume);
    for (rank, out) in [&rank0, &rank1].into_iter().enumerate() {
        assert!(out.status.success(), "node {rank}: {}", text(out));
        assert_eq!(common::weights(&node(rank)), uninterrupted, "node {rank}");
    }
    let said =
        "resuming from checkpoint 1, the newest that every node holds (this node's latest is 2)";
    assert!(text(&rank0).contains(said), "{}", text(&rank0));
    assert!(!text(&rank1).contains("resuming from checkpoint"));

    // Node 1 stopped again before its last checkpoint, after node 0 had finished: node 0 joins
    // (alone, it would say "nothing to resume" and leave node 1 waiting out --join-timeout) and
    // the two train the last period again, to the same weights.
    std::fs::remove_file(node(1).join("summary.json")).unwrap();
    std::fs::remove_dir_all(node(1).join("model")).unwrap();
    for p in ["model", "optim", "scheduler"] {
        std::fs::remove_file(node(1).join(format!("checkpoint/{p}-2.mpk"))).unwrap();
    }
    let finished = std::fs::read(node(0).join("summary.json")).unwrap();
    let [rank0, rank1] = node_pair(dir.path(), free_ports(), resume);
    for (rank, out) in [&rank0, &rank1].into_iter().enumerate() {
        assert!(out.status.success(), "node {rank}: {}", text(out));
        assert_eq!(common::weights(&node(rank)), uninterrupted, "node {rank}");
    }
    let t0 = text(&rank0);
    let joins = "has finished: joining the other nodes";
    assert!(t0.contains(joins) && t0.contains(said), "{t0}");
    // Node 0 trained again: its summary was written again (a new wall time).
    assert_ne!(
        std::fs::read(node(0).join("summary.json")).unwrap(),
        finished
    );
    // Every node has finished: all of them say so and leave their summaries as they were.
    let summaries = [0, 1].map(|rank| std::fs::read(node(rank).join("summary.json")).unwrap());
    let done = node_pair(dir.path(), free_ports(), resume);
    for (rank, out) in done.iter().enumerate() {
        let t = text(out);
        assert!(out.status.success(), "node {rank}: {t}");
        let said = "and every other node have finished: nothing to resume";
        assert!(t.contains(said), "{t}");
        assert!(
            !t.contains("training on"),
            "node {rank} has nothing to train: {t}"
        );
        let summary = std::fs::read(node(rank).join("summary.json")).unwrap();
        assert_eq!(summary, summaries[rank], "node {rank}");
    }

    // A finished node started with --resume beside one that starts anew without it.
    let fresh = dir.path().join("fresh");
    let mixed = node_pair(dir.path(), free_ports(), |rank| match rank {
        0 => resume(0),
        _ => fit_args(data, fresh.to_str().unwrap(), two)
            .into_iter()
            .map(String::from)
            .collect(),
    });
    for (rank, here) in ["with", "without"].into_iter().enumerate() {
        let t = text(&mixed[rank]);
        assert!(!mixed[rank].status.success(), "node {rank}: {t}");
        let own =
            format!("some were started with --resume and some without (this node {here} --resume)");
        assert!(t.contains(&own), "node {rank}: {t}");
    }

    // Node 1 holds no complete checkpoint, node 0 two (its model lost, it has not finished):
    // both refuse (starting again would throw node 0's away), and resume once node 0's newest
    // is copied to node 1, as the fix says: node 0 from its last checkpoint too, writing its
    // model again.
    std::fs::remove_dir_all(node(0).join("model")).unwrap();
    std::fs::remove_file(node(1).join("summary.json")).unwrap();
    std::fs::remove_dir_all(node(1).join("checkpoint")).unwrap();
    let refused = node_pair(dir.path(), free_ports(), resume);
    for (rank, here) in ["[1, 2]", "none"].into_iter().enumerate() {
        let t = text(&refused[rank]);
        assert!(!refused[rank].status.success(), "node {rank}: {t}");
        let own = format!("the nodes hold no checkpoint in common (this node holds {here})");
        assert!(
            t.contains(&own) && t.contains("copy the newest checkpoint's three files"),
            "node {rank}: {t}"
        );
    }
    std::fs::create_dir(node(1).join("checkpoint")).unwrap();
    for p in ["model", "optim", "scheduler"] {
        let file = format!("checkpoint/{p}-2.mpk");
        std::fs::copy(node(0).join(&file), node(1).join(&file)).unwrap();
    }
    for (rank, out) in node_pair(dir.path(), free_ports(), resume)
        .iter()
        .enumerate()
    {
        assert!(out.status.success(), "node {rank}: {}", text(out));
        assert_eq!(common::weights(&node(rank)), uninterrupted, "node {rank}");
    }

    // Node 0 has finished, node 1 has not, and neither holds a checkpoint: both refuse rather
    // than train node 0's run again from its first step.
    std::fs::remove_file(node(1).join("summary.json")).unwrap();
    for rank in [0, 1] {
        std::fs::remove_dir_all(node(rank).join("checkpoint")).unwrap();
    }
    let refused = node_pair(dir.path(), free_ports(), resume);
    for (rank, here) in ["has", "has not"].into_iter().enumerate() {
        let t = text(&refused[rank]);
        assert!(!refused[rank].status.success(), "node {rank}: {t}");
        let own = format!(
            "no node holds a checkpoint to train the others from (this node {here} finished)"
        );
        assert!(
            t.contains(&own) && t.contains("without --resume"),
            "node {rank}: {t}"
        );
    }
    assert!(node(0).join("summary.json").exists() && node(0).join("history.json").exists());
}

/// A coordinator started apart (`clue coordinator`) serves a run whose rank 0 is told it runs
/// (`--coordinator-running`), and a node process that dies mid-run stops the other one with an
/// error at that step instead of leaving it waiting.
#[test]
fn a_separate_coordinator_serves_and_a_dead_node_stops_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::fixture(600, 0, 16, 16).join("p");
    let data = data.to_str().unwrap();
    let port = free_ports();
    let mut coordinator = Command::new(env!("CARGO_BIN_EXE_clue"))
        .args(["coordinator", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let running: &[&str] = &["--coordinator-running"];
    let [rank0, rank1] = two_nodes(dir.path(), data, port, [running; 2]);
    for (rank, out) in [&rank0, &rank1].into_iter().enumerate() {
        assert!(out.status.success(), "node {rank}: {}", text(out));
    }
    assert!(!dir.path().join("node0/coordinator.log").exists());

    // A long run on the same coordinator; node 1 is killed once node 0 has a checkpoint.
    let (mut second, _) = long_node(dir.path(), data, port, 1, running);
    let (mut first, log) = long_node(dir.path(), data, port, 0, running);
    wait_for_checkpoint(&dir.path().join("long0"));
    second.kill().unwrap();
    let _ = second.wait();
    let killed = Instant::now();
    let status = exit_within(&mut first, Duration::from_secs(60), &log);
    let t = std::fs::read_to_string(log).unwrap();
    assert!(!status.success(), "node 0 went on alone: {t}");
    assert!(t.contains("training stopped after"), "{t}");
    assert!(t.contains("did another node stop?"), "{t}");
    // An expected failure: no panic and no backtrace from the collective's threads.
    assert!(!t.contains("panicked") && !t.contains("PANIC"), "{t}");
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "{:?}",
        killed.elapsed()
    );
    // The coordinator still holds the lost run's nodes: a new run on it is refused at once,
    // with the fix.
    let again = dir.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    for out in two_nodes(&again, data, port, [running; 2]) {
        let t = text(&out);
        assert!(!out.status.success(), "{t}");
        assert!(t.contains("restart `clue coordinator`"), "{t}");
    }
    let _ = coordinator.kill();
    let _ = coordinator.wait();
}

/// A node that stops answering without closing its connections (here: suspended) stops the
/// other one after `--peer-timeout`, with a message, instead of leaving it waiting for ever; the
/// checkpoint it had stays.
#[cfg(unix)]
#[test]
fn a_suspended_node_stops_the_other_after_the_peer_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::fixture(600, 0, 16, 16).join("p");
    let data = data.to_str().unwrap();
    let port = free_ports();
    let timeout: &[&str] = &["--peer-timeout", "5"];
    // Killed however the test ends (a suspended process would otherwise stay).
    let second = KillOnDrop(long_node(dir.path(), data, port, 1, timeout).0);
    let (first, log) = long_node(dir.path(), data, port, 0, timeout);
    let mut first = KillOnDrop(first);
    let checkpoint = dir.path().join("long0/checkpoint");
    wait_for_checkpoint(&dir.path().join("long0"));
    let pid = second.0.id().to_string();
    let stopped = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(stopped.success(), "kill -STOP {pid}");
    let start = Instant::now();
    let status = exit_within(&mut first.0, Duration::from_secs(60), &log);
    let waited = start.elapsed();
    let t = std::fs::read_to_string(log).unwrap();
    assert!(!status.success(), "node 0 went on alone: {t}");
    assert!(t.contains("longer than --peer-timeout"), "{t}");
    assert!(t.contains("waited"), "{t}");
    assert!(t.contains("training stopped after"), "{t}");
    // The timeout, a step in flight and the end of the run, which does not wait for the
    // suspended node again.
    assert!(waited < Duration::from_secs(20), "{waited:?}");
    assert!(
        std::fs::read_dir(&checkpoint).unwrap().next().is_some(),
        "the checkpoint is gone"
    );
}

/// The GPU warm-up runs on several nodes too, after the join, each node's steps meeting the
/// others' (the test runs the library's warm-up with fixed shapes on ndarray; `clue fit` warms
/// up on a GPU only): a node that would warm up and one that would not refuse to start; warmed
/// nodes stay in step and make the same first training step, byte for byte, as nodes that did
/// not warm up; nodes in f64 do the same, and refuse to start with a node in f32; a node that
/// dies right after the join stops the other's warm-up with a message, not a panic or a wait.
#[test]
fn nodes_warm_up_together_and_a_dead_node_stops_the_warm_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::fixture(200, 11, 16, 12).join("p");
    let port = free_ports();
    let coordinator = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_clue"))
            .args(["coordinator", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    // Both nodes in the given modes (rank 1 starts first): what each wrote.
    let pair = |modes: [&str; 2]| {
        let run = |rank: usize| {
            let out = dir.path().join(format!("{}-{}-{rank}", modes[0], modes[1]));
            let log = out.with_extension("log");
            let child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "warm_up_node", "--ignored", "--nocapture"])
                .env("CLUE_TEST_NODE", format!("{rank} {port} {}", modes[rank]))
                .env("CLUE_TEST_NODE_DATA", &data)
                .env("CLUE_TEST_NODE_OUT", &out)
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
                .spawn()
                .unwrap();
            (KillOnDrop(child), out, log)
        };
        let mut nodes = [run(1), run(0)];
        for (child, _, log) in &mut nodes {
            let status = exit_within(&mut child.0, Duration::from_secs(120), log);
            let errors = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
            assert!(status.success(), "{status}: {errors}");
        }
        nodes.map(|(_, out, log)| {
            let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
            let said = read(&log) + &read(&log.with_extension("err"));
            (std::fs::read(out).unwrap_or_default(), said)
        })
    };
    // A node that would warm up with one that would not (a GPU and a CPU backend) refuse to
    // start: their steps would meet out of step.
    for (out, _) in pair(["warm", "cold"]) {
        let t = String::from_utf8_lossy(&out);
        assert!(
            t.contains("the nodes do not run the same plan: their GPU warm-up differs"),
            "{t}"
        );
    }
    let [(warm1, said1), (warm0, said0)] = pair(["warm", "warm"]);
    let [(cold1, _), (cold0, _)] = pair(["cold", "cold"]);
    let ok = |bytes: &[u8]| bytes.starts_with(b"ok ");
    assert!(ok(&warm0), "{}", String::from_utf8_lossy(&warm0));
    for said in [said0, said1] {
        // The first training shape twice, at least one more, and the validation batches.
        let steps = said
            .split("compiling GPU kernels for ")
            .nth(1)
            .unwrap_or("0");
        let steps: usize = steps.split(' ').next().unwrap().parse().unwrap();
        assert!(steps >= 4, "{said}");
        assert!(said.contains("GPU warm-up: done in"), "{said}");
    }
    assert!(warm0 == warm1, "the warmed nodes made different steps");
    assert!(
        warm0 == cold0 && cold0 == cold1,
        "warming up changed the run"
    );
    // Nodes whose float type is not f32 (f64 here, as bf16 is on CUDA) compare their plans,
    // warm up and train in step; a node in f64 with one in f32 refuses to start.
    let [(f1, _), (f0, said)] = pair(["f64", "f64"]);
    assert!(ok(&f0), "{}: {said}", String::from_utf8_lossy(&f0));
    assert!(f0 == f1, "the f64 nodes made different steps");
    for (out, _) in pair(["f64", "warm"]) {
        let t = String::from_utf8_lossy(&out);
        assert!(t.contains("their backend differs"), "{t}");
    }
    // Node 1 dies after the join: node 0's warm-up stops at its first step.
    let [_, (stopped, said)] = pair(["warm", "die"]);
    let t = String::from_utf8_lossy(&stopped);
    assert!(t.starts_with("error "), "{t}");
    assert!(t.contains("warm-up stopped before the first step"), "{t}");
    assert!(t.contains("did another node stop?"), "{t}");
    assert!(!said.contains("panicked"), "{said}");
    drop(coordinator);
}

/// One node of `nodes_warm_up_together_and_a_dead_node_stops_the_warm_up`, in a process of its
/// own (that test starts this binary again; without its settings this does nothing). It joins
/// a two-node run of the small model (batch 8, one worker, dropout on) with a warm-up in its
/// plan (modes `warm` and `die`) or none (`cold`), then warms up (`warm`) or exits at once
/// (`die`), then makes one training step and writes `ok` and the model's bytes, or `error` and
/// the message, to its output file. Mode `f64` is `warm` on NdArray in f64.
#[test]
#[ignore = "a node process of nodes_warm_up_together_and_a_dead_node_stops_the_warm_up"]
fn warm_up_node() {
    let Ok(spec) = std::env::var("CLUE_TEST_NODE") else {
        return;
    };
    let [rank, port, mode] = <[&str; 3]>::try_from(spec.split(' ').collect::<Vec<_>>()).unwrap();
    let data = std::env::var("CLUE_TEST_NODE_DATA").unwrap();
    let out = std::path::PathBuf::from(std::env::var("CLUE_TEST_NODE_OUT").unwrap());
    let run = out.parent().unwrap();
    let (rank, data) = (rank.parse().unwrap(), Path::new(&data));
    // `f64`: warm, on a backend whose float type is not f32 (as bf16 is on CUDA).
    let stepped = match mode {
        "f64" => node_step::<burn::backend::NdArray<f64>>(rank, port, "warm", data, run),
        _ => node_step::<burn::backend::NdArray>(rank, port, mode, data, run),
    };
    let written = match stepped {
        Ok(bytes) => [b"ok ".as_slice(), &bytes].concat(),
        Err(e) => format!("error {e}").into_bytes(),
    };
    std::fs::write(out, written).unwrap();
}

/// `warm_up_node`'s work on the backend `I`: the model's bytes after one training step.
fn node_step<I: burn::tensor::backend::Backend<Device = burn::backend::ndarray::NdArrayDevice>>(
    rank: usize,
    port: &str,
    mode: &str,
    data: &Path,
    run: &Path,
) -> clue::error::Result<Vec<u8>> {
    use burn::backend::Autodiff;
    use burn::backend::ndarray::NdArrayDevice;
    use burn::data::dataloader::batcher::Batcher;
    use burn::data::dataset::Dataset;
    use burn::module::AutodiffModule;
    use burn::module::Module;
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    use burn::train::TrainStep;
    use clue::data::batcher::{FixedShape, UserBatcher, UserDataset};
    use clue::data::store::{PreparedDataset, Split};
    use clue::model::{ClueModel, init::Init};
    use clue::train::cluster::{Cluster, plan_id};
    use clue::train::config::{RunConfig, TrainConfig};
    use clue::train::loader::EpochPlan;
    use clue::train::step::{StepSettings, Trainee};
    use clue::train::warmup::{WarmPlan, warm_up_stopped};
    type B<I> = Autodiff<I>;

    let data = std::sync::Arc::new(PreparedDataset::open(data, true)?);
    let mut config = RunConfig {
        model: common::small_model(data.manifest.vocab_size as usize),
        train: TrainConfig {
            batch_size: 8,
            epochs: 1,
            ..Default::default()
        },
    };
    config.model.dropout = 0.1;
    let (t, device) = (&config.train, NdArrayDevice::default());
    let coordinator = format!("127.0.0.1:{port}");
    let timeouts = [Duration::from_secs(60); 2];
    let cluster = Cluster::new(2, rank, Some(&coordinator), None, timeouts, true)?;
    let trainee = Trainee::<B<I>> {
        model: ClueModel::new(&config.model, &mut Init::new(t.seed, &device)),
        settings: StepSettings {
            clip_norm: t.grad_clip_norm,
            seed: t.seed,
            place: cluster.place(),
            ..Default::default()
        },
    };
    let plan = EpochPlan::for_run(t, &data.users_in(Split::Train));
    let fixed = FixedShape {
        items: 16,
        tokens: 12,
        item_multiple: 8,
    };
    let valid = data.users_in(Split::Valid);
    let warm = (mode != "cold")
        .then(|| WarmPlan::new(&trainee.settings, &config, (&data, fixed), &plan, &valid));
    let steps = warm.as_ref().map(WarmPlan::steps);
    let id = plan_id(&config, "test", false, &trainee.model, steps);
    let (joined, _) = cluster.start::<I>(t, &[device], (&id, None), run)?;
    let mut optim = t.optimizer().init::<B<I>, Trainee<B<I>>>();
    if mode == "die" {
        std::process::exit(0);
    }
    if let Some(warm) = warm {
        let stopped = |why: String| warm_up_stopped(&why, run, false);
        warm.run(&trainee, &optim, (t.lr, t.seed), &data)
            .map_err(stopped)?;
    }
    let first: Vec<u32> = plan.epoch_order(0).into_iter().take(t.batch_size).collect();
    let ds = UserDataset::with_users(data.clone(), first, 16, 12);
    let samples = (0..ds.len()).filter_map(|i| ds.get(i)).collect();
    let batch = UserBatcher::default().batch(samples, &device);
    let step = TrainStep::step(&trainee, batch);
    let trained = trainee.optimize(&mut optim, t.lr, step.grads);
    drop(joined);
    let record = trained.model.valid().into_record();
    Ok(BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(record, ())
        .unwrap())
}

/// A process killed when this is dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Rank `rank` of a two-node run of 40 epochs into `dir/long{rank}`, its output in
/// `dir/long{rank}.log` (returned with the process).
fn long_node(
    dir: &Path,
    data: &str,
    port: u16,
    rank: usize,
    extra: &[&str],
) -> (std::process::Child, std::path::PathBuf) {
    let out = dir.join(format!("long{rank}"));
    let log_path = dir.join(format!("long{rank}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let (coordinator, rank) = (format!("127.0.0.1:{port}"), rank.to_string());
    let mut args = fit_args(data, out.to_str().unwrap(), &["--set", "train.epochs=40"]);
    args.extend([
        "--nodes",
        "2",
        "--node-rank",
        &rank,
        "--coordinator",
        &coordinator,
    ]);
    args.extend(["--join-timeout", "60"]);
    args.extend_from_slice(extra);
    let child = Command::new(env!("CARGO_BIN_EXE_clue"))
        .args(args)
        .current_dir(dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, log_path)
}

/// Waits up to 60 s for the run in `out` to write a checkpoint.
fn wait_for_checkpoint(out: &Path) {
    let start = Instant::now();
    let checkpointed =
        || std::fs::read_dir(out.join("checkpoint")).is_ok_and(|mut d| d.next().is_some());
    while !checkpointed() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(checkpointed(), "{out:?} has no checkpoint after 60 s");
}

/// `child`'s exit status, or a failed test (the child killed, its output `log` shown) if it
/// runs past `limit`.
fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
    log: &Path,
) -> std::process::ExitStatus {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let output = std::fs::read_to_string(log).unwrap_or_default();
    panic!("still running after {limit:?}; its output:\n{output}");
}
