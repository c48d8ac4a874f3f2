//! A sweep's grid (`config/sweeps/NAME.toml`): a base config, settings every run shares, a
//! model-size ladder and axes. The sweep's runs are the product of the ladder and the axes, each
//! an ordinary `clue fit` config. Everything is checked before the first run starts.
//!
//! ```toml
//! base = "../tiny.toml"        # relative to the grid file
//! eval_batch_size = 32         # held-out loss at this batch size for every run
//! curve_points = 4             # held-out loss this many times per run (its learning curve)
//! [set]                        # every run
//! train.workers = 2
//! [axes]                       # the product of these lists
//! train.epochs = [1, 2, 4]
//! train.data_fraction = [0.25, 1.0]
//! [[ladder]]                   # model sizes (each a set of model keys)
//! name = "s"
//! d_model = 32
//! d_ff = 128
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{ClueError, Result};
use crate::train::config::RunConfig;

/// Keys a sweep sets itself for every run.
const OWNED: [&str; 2] = ["train.eval_batch_size", "train.checkpoint_every"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    base: PathBuf,
    #[serde(default = "default_eval_batch")]
    eval_batch_size: usize,
    #[serde(default = "default_curve_points")]
    curve_points: usize,
    #[serde(default)]
    set: toml::Table,
    #[serde(default)]
    axes: toml::Table,
    #[serde(default)]
    ladder: Vec<toml::Table>,
}

fn default_eval_batch() -> usize {
    64
}

fn default_curve_points() -> usize {
    4
}

/// A parsed, checked grid.
#[derive(Debug, Clone)]
pub struct Grid {
    pub path: PathBuf,
    /// The batch size every run's held-out loss is measured at.
    pub eval_batch_size: usize,
    /// Held-out loss measurements per run (its learning curve).
    pub curve_points: usize,
    pub runs: Vec<GridRun>,
}

/// One run of a sweep: its directory name, config, and its place on each axis.
#[derive(Debug, Clone, PartialEq)]
pub struct GridRun {
    pub name: String,
    pub config: RunConfig,
    /// `(axis, value)`: `model` (the ladder rung's name) and each axis key.
    pub coords: Vec<(String, String)>,
}

/// `train.epochs = [1, 2]` and `"train.epochs" = [1, 2]` both give `("train.epochs", value)`.
fn flatten(table: &toml::Table) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) if !key.contains('.') => {
                for (field, v) in inner {
                    out.push((format!("{key}.{field}"), v.clone()));
                }
            }
            v => out.push((key.clone(), v.clone())),
        }
    }
    out
}

/// `value` as an override's right-hand side, and as a short label for run names.
fn literal(value: &toml::Value) -> (String, String) {
    let label = match value {
        toml::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    (value.to_string(), label)
}

impl Grid {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ClueError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parse and check `text` (the grid at `path`; `base` is read relative to it).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String, hint: &str| ClueError::bad_file(path, message, hint);
        let file: GridFile = toml::from_str(text).map_err(|e| {
            bad(
                e.to_string(),
                "a grid takes base, eval_batch_size, curve_points, [set], [axes] and [[ladder]]",
            )
        })?;
        let base_path = path.parent().unwrap_or(Path::new(".")).join(&file.base);
        let base = RunConfig::load(&base_path)?;
        if file.eval_batch_size < 2 || file.curve_points == 0 {
            return Err(bad(
                "eval_batch_size must be at least 2 and curve_points at least 1".into(),
                "e.g. eval_batch_size = 64, curve_points = 4",
            ));
        }
        let sets: Vec<String> = flatten(&file.set)
            .iter()
            .map(|(k, v)| format!("{k}={}", literal(v).0))
            .collect();
        let base = base
            .with_overrides(&sets)
            .map_err(|e| bad(format!("[set]: {e}"), "keys are model.* and train.*"))?;
        let mut axes: Vec<(String, Vec<toml::Value>)> = Vec::new();
        for (key, value) in flatten(&file.axes) {
            let toml::Value::Array(values) = value else {
                return Err(bad(
                    format!("[axes] {key} is not a list"),
                    "e.g. train.epochs = [1, 2, 4]",
                ));
            };
            if values.is_empty() {
                return Err(bad(
                    format!("[axes] {key} is empty"),
                    "give it at least one value, or remove it",
                ));
            }
            if OWNED.contains(&key.as_str()) {
                return Err(bad(
                    format!("[axes] {key} is set by the sweep itself"),
                    "use the grid's eval_batch_size and curve_points",
                ));
            }
            axes.push((key, values));
        }
        let mut rungs: Vec<(String, Vec<String>)> = Vec::new();
        for (i, rung) in file.ladder.iter().enumerate() {
            let mut name = format!("m{}", i + 1);
            let mut sets = Vec::new();
            for (key, value) in rung {
                match (key.as_str(), value) {
                    ("name", toml::Value::String(s)) => name = s.clone(),
                    (k, v) => sets.push(format!("model.{k}={}", literal(v).0)),
                }
            }
            if rungs.iter().any(|(n, _)| *n == name) {
                return Err(bad(
                    format!("[[ladder]] names `{name}` twice"),
                    "give every rung its own name",
                ));
            }
            rungs.push((name, sets));
        }
        let mut runs = vec![GridRun {
            name: String::new(),
            config: base,
            coords: Vec::new(),
        }];
        if !rungs.is_empty() {
            runs = rungs
                .iter()
                .enumerate()
                .map(|(i, (name, sets))| {
                    let config = runs[0].config.with_overrides(sets).map_err(|e| {
                        bad(
                            format!("[[ladder]] {} (`{name}`): {e}", i + 1),
                            "a rung takes name and model keys: d_model, d_ff, heads, item_layers, service_layers…",
                        )
                    })?;
                    Ok(GridRun {
                        name: name.clone(),
                        config,
                        coords: vec![("model".into(), name.clone())],
                    })
                })
                .collect::<Result<_>>()?;
        }
        for (key, values) in &axes {
            let mut next = Vec::new();
            for run in &runs {
                for value in values {
                    let (lit, label) = literal(value);
                    let config = run
                        .config
                        .with_overrides(&[format!("{key}={lit}")])
                        .map_err(|e| {
                            bad(
                                format!("[axes] {key} = {lit}: {e}"),
                                "check the key and the value's type",
                            )
                        })?;
                    let field = key.rsplit('.').next().unwrap_or(key);
                    let part = format!("{field}-{label}");
                    let mut coords = run.coords.clone();
                    coords.push((key.clone(), label));
                    next.push(GridRun {
                        name: if run.name.is_empty() {
                            part
                        } else {
                            format!("{}_{part}", run.name)
                        },
                        config,
                        coords,
                    });
                }
            }
            runs = next;
        }
        let mut seen = std::collections::BTreeSet::new();
        for run in &mut runs {
            if run.name.is_empty() {
                run.name = "base".into();
            }
            if run.name.contains(['/', '\\']) || run.name.starts_with('.') {
                return Err(bad(
                    format!("run name `{}` is not a plain directory name", run.name),
                    "ladder names and axis values must not hold / or \\ or start with a dot",
                ));
            }
            if !seen.insert(run.name.clone()) {
                return Err(bad(
                    format!(
                        "two runs are named `{}` (a value repeated on an axis?)",
                        run.name
                    ),
                    "give every axis distinct values",
                ));
            }
            run.config.train.eval_batch_size = file.eval_batch_size;
            run.config.validate().map_err(|e| {
                bad(
                    format!("run `{}` cannot work: {e}", run.name),
                    "change the ladder or the axis value it names",
                )
            })?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            eval_batch_size: file.eval_batch_size,
            curve_points: file.curve_points,
            runs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;

    fn grid(body: &str) -> Result<Grid> {
        let dir = tempfile::tempdir().unwrap();
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tiny.toml");
        let text = format!("base = {:?}\n{body}", base.display().to_string());
        Grid::parse(&text, &dir.path().join("g.toml"))
    }

    #[test]
    fn the_runs_are_the_product_of_ladder_and_axes() {
        let g = grid(
            "eval_batch_size = 16\n[set]\ntrain.workers = 1\n[axes]\ntrain.epochs = [1, 2]\n\"train.data_fraction\" = [0.5, 1.0]\n\
             [[ladder]]\nname = \"xs\"\nd_model = 16\nheads = 2\n[[ladder]]\nd_model = 32\n",
        )
        .unwrap();
        assert_eq!(g.runs.len(), 2 * 2 * 2);
        let names: Vec<&str> = g.runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names[0], "xs_epochs-1_data_fraction-0.5");
        assert_eq!(names[7], "m2_epochs-2_data_fraction-1.0");
        let r = &g.runs[1];
        assert_eq!((r.config.model.d_model, r.config.model.heads), (16, 2));
        assert_eq!(r.config.train.data_fraction, 1.0);
        assert_eq!(r.config.train.workers, 1);
        assert_eq!(r.config.train.eval_batch_size, 16);
        assert_eq!(g.runs[7].config.model.d_model, 32);
        assert_eq!(g.runs[7].config.train.epochs, 2);
        assert_eq!(g.runs[7].coords[0], ("model".into(), "m2".into()));
        assert_eq!(grid("").unwrap().runs[0].name, "base");
    }

    #[test]
    fn grids_that_cannot_work_are_refused_naming_the_key() {
        for (body, needle) in [
            ("[axes]\ntrain.epochs = []", "train.epochs is empty"),
            ("[axes]\ntrain.epocs = [1]", "train.epocs"),
            ("[axes]\ntrain.data_fraction = [0.0, 1.0]", "data_fraction"),
            ("[axes]\ntrain.data_fraction = [1.5]", "outside (0, 1]"),
            ("[[ladder]]\nd_model = 30\nheads = 4", "does not divide"),
            ("[[ladder]]\nwidth = 30", "width"),
            ("[axes]\ntrain.eval_batch_size = [8]", "set by the sweep"),
            ("steps = 3", "unknown field"),
            ("[axes]\ntrain.epochs = 2", "not a list"),
            ("[axes]\ntrain.epochs = [1, 1]", "two runs are named"),
            ("[[ladder]]\nname = \"../x\"", "not a plain directory name"),
        ] {
            let e = grid(body).unwrap_err().to_string();
            assert!(e.contains(needle), "{body}: {e}");
            assert!(e.contains("g.toml"), "names the file: {e}");
        }
    }

    #[test]
    fn the_shipped_grids_parse_and_the_cpu_grid_has_enough_runs() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sweeps");
        let runs = |n: &str| Grid::load(&dir.join(format!("{n}.toml"))).unwrap().runs;
        assert_eq!(runs("smoke").len(), 3);
        assert!(runs("cpu").len() >= 12);
        let gpu = runs("gpu");
        assert_eq!(gpu.len(), 16);
        assert!(
            gpu.iter()
                .all(|r| r.config.train.batch_size == 256 && r.config.model.max_items == 128)
        );
        let ablation = runs("ablation");
        let kinds: Vec<_> = ablation.iter().map(|r| r.config.model.kind).collect();
        assert_eq!(
            kinds,
            [
                ModelKind::Stacked,
                ModelKind::Stacked,
                ModelKind::Flat,
                ModelKind::Flat
            ]
        );
        assert_eq!(runs("lr").len(), 6);
    }
}
