//! The downstream side of `clue scaling`, from the runs' task evaluations (`clue sweep
//! --task`): how the CLUE probe's MRR follows the pretraining test loss (paper Figure 4, right),
//! MRR against steps by data size (Figure 3), and the architecture ablations as tables — stacked
//! against flat encoders (Table 5) and the output dimension (Table 6).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::scaling::law::{pearson, spearman};
use crate::scaling::plot::{Chart, Mark, Series};
use crate::scaling::sweep::{RunPoint, Status};

/// How one task's downstream MRR follows the pretraining test loss over the finished runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transfer {
    pub task: String,
    pub runs: usize,
    /// Of (test loss, MRR): negative when a lower pretraining loss goes with a better MRR.
    pub pearson: Option<f64>,
    pub spearman: Option<f64>,
}

/// Each task's (test loss, MRR) pairs over the finished runs, tasks in first-seen order.
fn pairs(points: &[RunPoint]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for p in points.iter().filter(|p| p.status == Status::Done) {
        let Some(loss) = p.test_loss else { continue };
        for d in &p.downstream {
            match out.iter_mut().find(|(t, _)| *t == d.task) {
                Some((_, v)) => v.push((loss, d.mrr)),
                None => out.push((d.task.clone(), vec![(loss, d.mrr)])),
            }
        }
    }
    out
}

/// Pearson's and Spearman's correlation of MRR with test loss, per task.
pub fn transfers(points: &[RunPoint]) -> Vec<Transfer> {
    pairs(points)
        .into_iter()
        .map(|(task, v)| {
            let (x, y): (Vec<f64>, Vec<f64>) = v.iter().copied().unzip();
            Transfer {
                task,
                runs: v.len(),
                pearson: pearson(&x, &y),
                spearman: spearman(&x, &y),
            }
        })
        .collect()
}

fn corr(c: Option<f64>) -> String {
    c.map_or("–".into(), |c| format!("{c:+.3}"))
}

/// The markdown of the downstream section: correlations, then Tables 5 and 6 when the sweep
/// varies `model.kind` or `model.output_dim`.
pub fn markdown(points: &[RunPoint], transfers: &[Transfer]) -> String {
    let mut md = String::new();
    if !transfers.is_empty() {
        md.push_str(
            "\n## Downstream (paper Figure 4, right)\n\nThe CLUE probe's sampled-negative test MRR on each task against the run's pretraining test loss \
             (`clue sweep --task`; one seed per run). A negative correlation: lower pretraining loss, better transfer.\n\n\
             | task | runs | Pearson | Spearman |\n|---|---|---|---|\n",
        );
        for t in transfers {
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                t.task,
                t.runs,
                corr(t.pearson),
                corr(t.spearman)
            ));
        }
    }
    let tasks: Vec<&str> = transfers.iter().map(|t| t.task.as_str()).collect();
    for (axis, title) in [
        (
            "model.kind",
            "Table 5: stacked (Item + Service Transformers) against flat (one Transformer over all tokens)",
        ),
        (
            "model.output_dim",
            "Table 6: output dimension (0 = d_model, no reduction)",
        ),
    ] {
        md.push_str(&axis_table(points, axis, title, &tasks));
    }
    md
}

/// Means over the finished runs at each value of `axis` (the other axes are crossed with it in
/// a grid, so each value averages the same companions); empty when the axis is not varied.
fn axis_table(points: &[RunPoint], axis: &str, title: &str, tasks: &[&str]) -> String {
    // value → (runs, Σ loss, Σ top-1, Σ MRR per task, runs with each task)
    type Sums = (usize, f64, f64, Vec<f64>, Vec<usize>);
    let mut by: BTreeMap<String, Sums> = BTreeMap::new();
    for p in points.iter().filter(|p| p.status == Status::Done) {
        let (Some(value), Some(loss)) = (
            p.coords
                .iter()
                .find(|(k, _)| k == axis)
                .map(|c| c.1.clone()),
            p.test_loss,
        ) else {
            continue;
        };
        let e = by
            .entry(value)
            .or_insert_with(|| (0, 0.0, 0.0, vec![0.0; tasks.len()], vec![0; tasks.len()]));
        e.0 += 1;
        e.1 += loss;
        e.2 += p.test_top1.unwrap_or(0.0);
        for d in &p.downstream {
            if let Some(i) = tasks.iter().position(|t| *t == d.task) {
                e.3[i] += d.mrr;
                e.4[i] += 1;
            }
        }
    }
    if by.len() < 2 {
        return String::new();
    }
    let mut md = format!(
        "\n## {title}\n\nMeans over the finished runs at each `{axis}`.\n\n| {axis} | runs | test loss | test top-1 |"
    );
    for t in tasks {
        md.push_str(&format!(" {t} MRR |"));
    }
    md.push_str(&format!(
        "\n|---|---|---|---|{}\n",
        "---|".repeat(tasks.len())
    ));
    for (value, (n, loss, top1, mrr, with)) in by {
        md.push_str(&format!(
            "| {value} | {n} | {:.4} | {:.1} % |",
            loss / n as f64,
            100.0 * top1 / n as f64
        ));
        for (m, k) in mrr.iter().zip(&with) {
            match k {
                0 => md.push_str(" – |"),
                k => md.push_str(&format!(" {:.4} |", m / *k as f64)),
            }
        }
        md.push('\n');
    }
    md
}

/// Figure 4-right (MRR against test loss, a series per task) and, when the sweep varies the data
/// fraction or shuffling, Figure 3 (the first task's MRR against steps, a line per data fraction
/// and shuffling, among the largest model's runs). Returns the PNG names written.
pub fn draw(points: &[RunPoint], transfers: &[Transfer], dir: &Path) -> Result<Vec<String>> {
    let mut charts = Vec::new();
    if transfers.is_empty() {
        return Ok(charts);
    }
    let series = pairs(points)
        .into_iter()
        .zip(transfers)
        .enumerate()
        .map(|(i, ((task, v), t))| Series {
            label: format!("{task} (Pearson {})", corr(t.pearson)),
            points: v,
            mark: Mark::Dots,
            color: Some(i),
        })
        .collect();
    Chart {
        title: "Downstream MRR vs pretraining test loss (paper Figure 4, right)".into(),
        x_label: "pretraining test loss".into(),
        y_label: "CLUE probe MRR (sampled)".into(),
        log_x: false,
        log_y: false,
        series,
    }
    .write(&dir.join("downstream-vs-loss"))?;
    charts.push("downstream-vs-loss.png".into());

    let done: Vec<&RunPoint> = points
        .iter()
        .filter(|p| p.status == Status::Done && !p.downstream.is_empty())
        .collect();
    let varies = |f: &dyn Fn(&RunPoint) -> String| {
        done.iter().map(|p| f(p)).collect::<BTreeSet<_>>().len() > 1
    };
    if !varies(&|p| p.data_fraction.to_string()) && !varies(&|p| p.shuffle.to_string()) {
        return Ok(charts);
    }
    let task = &transfers[0].task;
    let largest = done.iter().map(|p| p.params.total).max().unwrap_or(0);
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for p in done.iter().filter(|p| p.params.total == largest) {
        if let Some(d) = p.downstream.iter().find(|d| &d.task == task) {
            lines
                .entry(format!("data {} shuffle {}", p.data_fraction, p.shuffle))
                .or_default()
                .push((p.steps as f64, d.mrr));
        }
    }
    Chart {
        title: format!("{task} MRR vs steps by data size (paper Figure 3)"),
        x_label: "training steps".into(),
        y_label: "CLUE probe MRR (sampled)".into(),
        log_x: false,
        log_y: false,
        series: Series::lines(lines),
    }
    .write(&dir.join("downstream-vs-steps"))?;
    charts.push("downstream-vs-steps.png".into());
    Ok(charts)
}
