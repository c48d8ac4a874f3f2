//! `clue scaling`: the points of a sweep fitted and drawn — `scaling.json`, `scaling.md` and
//! the charts (PNG and SVG) in the sweep directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bundle::read_json;
use crate::data::store::write_atomic;
use crate::error::{ClueError, Result};
use crate::scaling::law::{
    Interval, Law, MIN_DECADES, MIN_POINTS, Power, bootstrap, fit_law, fit_power, frontier,
};
use crate::scaling::plot::{Chart, Mark, Series};
use crate::scaling::sweep::{POINT, RUNS, RunPoint, SWEEP, Status, SweepInfo};
use crate::scaling::transfer::{self, Transfer, transfers};

/// Compute held out for the extrapolation check: the frontier's top half-decade.
pub const HOLDOUT_DECADES: f64 = 0.5;
const BOOTSTRAP_ROUNDS: usize = 1000;

/// The fitted law with its intervals and what it was fitted on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LawFit {
    pub law: Law,
    pub alpha_95: Option<Interval>,
    pub l_inf_95: Option<Interval>,
    pub points: usize,
    pub decades: f64,
}

/// The law fitted below the top half-decade, and its error on the runs held out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extrapolation {
    pub law: Law,
    pub fitted_on: usize,
    /// `(run, PF-days, test loss, predicted)`.
    pub held_out: Vec<(String, f64, f64, f64)>,
    pub mean_abs_relative_error: f64,
}

/// Mean test loss of the finished runs at each value of one axis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AxisEffect {
    pub axis: String,
    /// `(value, mean test loss, runs)`.
    pub values: Vec<(String, f64, usize)>,
    pub spread: f64,
}

/// `scaling.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalingReport {
    pub sweep: PathBuf,
    pub eval_batch_size: usize,
    pub eval_users: usize,
    pub points: Vec<RunPoint>,
    /// Runs of the grid without a point yet (the sweep was stopped before them).
    pub unfinished: Vec<String>,
    /// Frontier runs (lower envelope of test loss over PF-days among full-data, shuffled runs).
    pub frontier: Vec<String>,
    pub law: Option<LawFit>,
    pub power: Option<Power>,
    pub extrapolation: Option<Extrapolation>,
    pub axes: Vec<AxisEffect>,
    /// How each downstream task's MRR follows the test loss (sweeps with `--task`).
    #[serde(default)]
    pub transfers: Vec<Transfer>,
    /// Why a fit is missing or weak, in words.
    pub notes: Vec<String>,
    pub charts: Vec<String>,
}

/// Fit, tabulate and draw the sweep in `dir`.
pub fn scaling(dir: &Path) -> Result<ScalingReport> {
    let info: SweepInfo = read_json(&dir.join(SWEEP)).map_err(|_| {
        ClueError::bad_file(
            dir,
            format!("no {SWEEP} here: not a sweep directory"),
            "run `clue sweep --grid G --data D --out DIR` first",
        )
    })?;
    let (mut points, mut unfinished) = (Vec::new(), Vec::new());
    for name in &info.runs {
        match read_json::<RunPoint>(&dir.join(RUNS).join(name).join(POINT)) {
            Ok(p) => points.push(p),
            Err(_) => unfinished.push(name.clone()),
        }
    }
    let mut notes = Vec::new();
    let candidates: Vec<&RunPoint> = points
        .iter()
        .filter(|p| p.frontier_candidate() && p.test_loss.is_some())
        .collect();
    let c: Vec<f64> = candidates.iter().map(|p| p.pf_days).collect();
    let l: Vec<f64> = candidates.iter().filter_map(|p| p.test_loss).collect();
    let front = frontier(&c, &l);
    let (fc, fl): (Vec<f64>, Vec<f64>) = front.iter().map(|&i| (c[i], l[i])).unzip();
    let decades = match fc.len() {
        0 => 0.0,
        n => (fc[n - 1] / fc[0]).log10(),
    };
    let law = if fc.len() < MIN_POINTS {
        notes.push(format!(
            "{} frontier point(s): a law needs at least {MIN_POINTS}, so none is fitted",
            fc.len()
        ));
        None
    } else {
        if decades < MIN_DECADES {
            notes.push(format!(
                "the frontier spans {decades:.2} decades of compute, under the {MIN_DECADES} a law should be read from"
            ));
        }
        let fitted = fit_law(&fc, &fl);
        if fitted.is_none() {
            notes.push("the law's fit did not converge to finite parameters".into());
        }
        fitted.map(|law| {
            let intervals = bootstrap(&fc, &fl, BOOTSTRAP_ROUNDS, 0);
            LawFit {
                law,
                alpha_95: intervals.map(|i| i.0),
                l_inf_95: intervals.map(|i| i.1),
                points: fc.len(),
                decades,
            }
        })
    };
    let power = (fc.len() >= MIN_POINTS)
        .then(|| fit_power(&fc, &fl))
        .flatten();
    let extrapolation = extrapolate(&candidates, &front, &fc, &fl, &mut notes);
    let failed = points.iter().filter(|p| p.status != Status::Done).count();
    if failed > 0 {
        notes.push(format!(
            "{failed} run(s) failed or diverged: listed below, left out of every fit"
        ));
    }
    if !unfinished.is_empty() {
        notes.push(format!(
            "{} run(s) have not finished: `clue sweep` with the same arguments continues them",
            unfinished.len()
        ));
    }
    let mut report = ScalingReport {
        sweep: dir.to_path_buf(),
        eval_batch_size: info.eval_batch_size,
        eval_users: info.eval_users,
        frontier: front.iter().map(|&i| candidates[i].name.clone()).collect(),
        axes: axis_effects(&points),
        transfers: transfers(&points),
        points,
        unfinished,
        law,
        power,
        extrapolation,
        notes,
        charts: Vec::new(),
    };
    report.charts = draw(&report, dir)?;
    let more = transfer::draw(&report.points, &report.transfers, dir)?;
    report.charts.extend(more);
    write_atomic(
        &dir.join("scaling.json"),
        (serde_json::to_string_pretty(&report).expect("json") + "\n").as_bytes(),
    )?;
    write_atomic(&dir.join("scaling.md"), report.markdown().as_bytes())?;
    Ok(report)
}

fn extrapolate(
    candidates: &[&RunPoint],
    front: &[usize],
    fc: &[f64],
    fl: &[f64],
    notes: &mut Vec<String>,
) -> Option<Extrapolation> {
    let top = *fc.last()?;
    let cut = top / 10f64.powf(HOLDOUT_DECADES);
    let below = fc.iter().filter(|&&c| c <= cut).count();
    if below < MIN_POINTS || below == fc.len() {
        notes.push(format!(
            "extrapolation check: {below} frontier point(s) below the top {HOLDOUT_DECADES} decade (at least {MIN_POINTS} needed, and one above): not run"
        ));
        return None;
    }
    let Some(law) = fit_law(&fc[..below], &fl[..below]) else {
        notes
            .push("extrapolation check: the fit below the top half-decade did not converge".into());
        return None;
    };
    let held_out: Vec<(String, f64, f64, f64)> = (below..fc.len())
        .map(|k| {
            let p = candidates[front[k]];
            (p.name.clone(), fc[k], fl[k], law.predict(fc[k]))
        })
        .collect();
    let error = held_out
        .iter()
        .map(|(_, _, l, p)| ((p - l) / l).abs())
        .sum::<f64>()
        / held_out.len() as f64;
    Some(Extrapolation {
        law,
        fitted_on: below,
        held_out,
        mean_abs_relative_error: error,
    })
}

fn axis_effects(points: &[RunPoint]) -> Vec<AxisEffect> {
    let mut axes: BTreeMap<String, BTreeMap<String, (f64, usize)>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.status == Status::Done) {
        let Some(loss) = p.test_loss else { continue };
        for (axis, value) in &p.coords {
            let e = axes
                .entry(axis.clone())
                .or_default()
                .entry(value.clone())
                .or_default();
            e.0 += loss;
            e.1 += 1;
        }
    }
    let mut out: Vec<AxisEffect> = axes
        .into_iter()
        .filter(|(_, values)| values.len() > 1)
        .map(|(axis, values)| {
            let values: Vec<(String, f64, usize)> = values
                .into_iter()
                .map(|(v, (sum, n))| (v, sum / n as f64, n))
                .collect();
            let means = values.iter().map(|v| v.1);
            let spread = means.clone().fold(f64::NEG_INFINITY, f64::max)
                - means.fold(f64::INFINITY, f64::min);
            AxisEffect {
                axis,
                values,
                spread,
            }
        })
        .collect();
    out.sort_by(|a, b| b.spread.total_cmp(&a.spread));
    out
}

/// The runs' coordinates other than `skip`, as a legend label.
fn label_without(p: &RunPoint, skip: &[&str]) -> String {
    let parts: Vec<String> = p
        .coords
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k)))
        .collect();
    if parts.is_empty() {
        "all runs".into()
    } else {
        parts.join(" ")
    }
}

/// Figure 4-left, Figure 2 and (with a data-size or shuffle axis) Figure 3.
fn draw(r: &ScalingReport, dir: &Path) -> Result<Vec<String>> {
    let done: Vec<&RunPoint> = r.points.iter().filter(|p| p.test_loss.is_some()).collect();
    let mut charts = Vec::new();
    let eb = r.eval_batch_size;
    let mut series: Vec<Series> = done
        .iter()
        .map(|p| Series {
            label: "learning curves (valid)".into(),
            points: p.curve.iter().map(|c| (c.pf_days, c.valid_loss)).collect(),
            mark: Mark::Faint,
            color: Some(4),
        })
        .collect();
    series.push(Series {
        label: "runs (test loss)".into(),
        points: done
            .iter()
            .map(|p| (p.pf_days, p.test_loss.unwrap_or(f64::NAN)))
            .collect(),
        mark: Mark::Dots,
        color: Some(4),
    });
    let front: Vec<(f64, f64)> = r
        .frontier
        .iter()
        .filter_map(|n| done.iter().find(|p| &p.name == n))
        .map(|p| (p.pf_days, p.test_loss.unwrap_or(f64::NAN)))
        .collect();
    series.push(Series {
        label: "compute frontier".into(),
        points: front.clone(),
        mark: Mark::Line,
        color: None,
    });
    let span = |f: &dyn Fn(f64) -> f64| -> Vec<(f64, f64)> {
        let (lo, hi) = (
            front.first().map_or(1.0, |p| p.0),
            front.last().map_or(1.0, |p| p.0),
        );
        (0..=40)
            .map(|k| {
                let c = lo * (hi / lo).powf(k as f64 / 40.0);
                (c, f(c))
            })
            .collect()
    };
    if let Some(fit) = &r.law {
        series.push(Series {
            label: format!("L∞ + (C₀/C)^α, α = {:.3}", fit.law.alpha),
            points: span(&|c| fit.law.predict(c)),
            mark: Mark::Dashed,
            color: Some(0),
        });
    }
    if let Some(p) = &r.power {
        series.push(Series {
            label: format!("(C₀/C)^α, α = {:.3}", p.alpha),
            points: span(&|c| p.predict(c)),
            mark: Mark::Dashed,
            color: Some(2),
        });
    }
    let mut write = |name: &str, chart: Chart| -> Result<()> {
        chart.write(&dir.join(name))?;
        charts.push(format!("{name}.png"));
        Ok(())
    };
    write(
        "loss-vs-compute",
        Chart {
            title: "Test loss vs training compute (paper Figure 4, left)".into(),
            x_label: "PF-days".into(),
            y_label: format!("InfoNCE loss, batch {eb}"),
            log_x: true,
            log_y: true,
            series,
        },
    )?;
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for p in &done {
        lines
            .entry(label_without(p, &["model"]))
            .or_default()
            .push((p.params.total as f64, p.test_loss.unwrap_or(f64::NAN)));
    }
    write(
        "loss-vs-size",
        Chart {
            title: "Test loss vs model size (paper Figure 2)".into(),
            x_label: "parameters".into(),
            y_label: format!("InfoNCE loss, batch {eb}"),
            log_x: true,
            log_y: false,
            series: Series::lines(lines),
        },
    )?;
    let varied = |axis: &str| r.axes.iter().any(|a| a.axis == axis);
    if varied("train.data_fraction") || varied("train.shuffle") {
        let keep = ["train.data_fraction", "train.shuffle"];
        let skip: Vec<&str> = r
            .axes
            .iter()
            .map(|a| a.axis.as_str())
            .filter(|a| !keep.contains(a))
            .collect();
        let largest = done.iter().map(|p| p.params.total).max().unwrap_or(0);
        write(
            "loss-vs-steps",
            Chart {
                title: "Validation loss vs steps by data size (paper Figure 3)".into(),
                x_label: "training steps".into(),
                y_label: format!("InfoNCE loss, batch {eb}"),
                log_x: false,
                log_y: false,
                series: done
                    .iter()
                    .filter(|p| p.params.total == largest)
                    .enumerate()
                    .map(|(i, p)| Series {
                        label: label_without(p, &skip),
                        points: p
                            .curve
                            .iter()
                            .map(|c| (c.step as f64, c.valid_loss))
                            .collect(),
                        mark: Mark::Line,
                        color: Some(i),
                    })
                    .collect(),
            },
        )?;
    }
    Ok(charts)
}

fn interval(i: &Option<Interval>) -> String {
    i.map_or("no interval (too few resamples fitted)".into(), |i| {
        format!("95 % bootstrap interval {:.3} to {:.3}", i.low, i.high)
    })
}

impl ScalingReport {
    /// The fitted law in one line, or why there is none.
    pub fn headline(&self) -> String {
        match &self.law {
            Some(f) => format!(
                "L(C) = {:.4} + ({:.3e}/C)^{:.3} on {} frontier runs over {:.2} decades (R² {:.3}; α {})",
                f.law.l_inf,
                f.law.c0,
                f.law.alpha,
                f.points,
                f.decades,
                f.law.r2,
                interval(&f.alpha_95)
            ),
            None => "no law fitted (see the notes)".into(),
        }
    }

    pub fn markdown(&self) -> String {
        let done = self
            .points
            .iter()
            .filter(|p| p.status == Status::Done)
            .count();
        let eb = self.eval_batch_size;
        let mut md = format!(
            "# Scaling study: {}\n\n{} runs in the grid: {done} finished, {} failed or diverged, {} not run yet.\n\
             Test loss: InfoNCE of the final model on {} held-out test users in fixed batches of {eb} \
             (chance: ln {eb} = {:.4}), the same for every run. Compute: 6 · parameters (embeddings included) · batch · steps · S (S·L for a flat model), \
             in PF-days (8.64e19 FLOPs), the paper's count — an approximation, since the item tower sees L tokens per item.\n\n",
            self.sweep.display(),
            self.points.len() + self.unfinished.len(),
            self.points.len() - done,
            self.unfinished.len(),
            self.eval_users,
            (eb as f64).ln()
        );
        md.push_str("## The law (paper Figure 4, left)\n\n");
        md.push_str(&format!("{}\n\n", self.headline()));
        if let Some(f) = &self.law {
            md.push_str(&format!("- L∞ {}\n", interval(&f.l_inf_95)));
        }
        if let Some(p) = &self.power {
            md.push_str(&format!(
                "- pure power law (C₀/C)^α: α = {:.4}, C₀ = {:.3e}, R² {:.3}\n",
                p.alpha, p.c0, p.r2
            ));
        }
        md.push_str(&format!(
            "- frontier (lower envelope over runs on all the data, reshuffled each epoch): {}\n",
            if self.frontier.is_empty() {
                "none".into()
            } else {
                self.frontier.join(", ")
            }
        ));
        if let Some(x) = &self.extrapolation {
            md.push_str(&format!(
                "- extrapolation check: fitted on the {} frontier runs below the top {HOLDOUT_DECADES} decade (α {:.3}), \
                 mean absolute error on the held-out runs {:.1} %:\n",
                x.fitted_on,
                x.law.alpha,
                100.0 * x.mean_abs_relative_error
            ));
            for (name, c, l, p) in &x.held_out {
                md.push_str(&format!(
                    "  - {name}: {c:.3e} PF-days, test loss {l:.4}, predicted {p:.4} ({:+.1} %)\n",
                    100.0 * (p - l) / l
                ));
            }
        }
        for n in &self.notes {
            md.push_str(&format!("- note: {n}\n"));
        }
        md.push_str("\n## Axes (mean test loss of the finished runs at each value; largest spread first)\n\n");
        for a in &self.axes {
            let values: Vec<String> = a
                .values
                .iter()
                .map(|(v, l, n)| format!("{v}: {l:.4} ({n})"))
                .collect();
            md.push_str(&format!(
                "- `{}` (spread {:.4}): {}\n",
                a.axis,
                a.spread,
                values.join(", ")
            ));
        }
        md.push_str(&transfer::markdown(&self.points, &self.transfers));
        md.push_str(
            "\n## Runs\n\n| run | parameters | non-embedding | batch | S | data | shuffle | steps | PF-days | test loss | test top-1 | status | wall |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        let mut sorted: Vec<&RunPoint> = self.points.iter().collect();
        sorted.sort_by(|a, b| a.pf_days.total_cmp(&b.pf_days));
        for p in sorted {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.3e} | {} | {} | {} | {:.0} s |\n",
                p.name,
                p.params.total,
                p.params.non_embedding,
                p.batch_size,
                p.max_items,
                p.data_fraction,
                p.shuffle,
                p.steps,
                p.pf_days,
                p.test_loss.map_or("–".into(), |l| format!("{l:.4}")),
                p.test_top1
                    .map_or("–".into(), |t| format!("{:.1} %", 100.0 * t)),
                match p.status {
                    Status::Done => "done".to_string(),
                    s => format!(
                        "{}: {}",
                        format!("{s:?}").to_lowercase(),
                        p.error.clone().unwrap_or_default().replace('\n', " ")
                    ),
                },
                p.wall_seconds
            ));
        }
        for name in &self.unfinished {
            md.push_str(&format!("| {name} | | | | | | | | | | | not run yet | |\n"));
        }
        md.push_str("\n## Charts\n\n");
        for c in &self.charts {
            md.push_str(&format!("![{c}]({c})\n\n"));
        }
        md
    }
}
