//! Downstream quality of each run of a sweep (paper Figures 3 and 4, right; Tables 5 and 6):
//! `clue eval`'s CLUE probe on every task given to `clue sweep --task`, on the run's bundle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::embed::USER_BATCH;
use crate::error::{ClueError, Result};
use crate::eval::{EvalOptions, Task, eval};

/// Where a run's task evaluations go, under its run directory.
pub const EVAL_DIR: &str = "eval";

/// The CLUE probe's test metrics on one task (sampled negatives, as `clue eval` reports them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Downstream {
    pub task: String,
    pub mrr: f64,
    pub hr10: f64,
    pub ndcg10: f64,
}

/// Load every task file before any run: a broken one, or two tasks of one name, fails the
/// sweep at once. Returns the task names in order.
pub fn task_names(tasks: &[PathBuf]) -> Result<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut names = Vec::new();
    for path in tasks {
        let task = Task::load(path)?;
        if !seen.insert(task.name.clone()) {
            return Err(ClueError::bad_file(
                path,
                format!("a second task named `{}`", task.name),
                "give each --task a task of its own name",
            ));
        }
        names.push(task.name);
    }
    Ok(names)
}

/// Evaluate the run in `run_dir` on the tasks (files and their [`task_names`]) it has no result
/// for yet (`done`), one seed of the CLUE probe each; results go to `run_dir/eval/<task>/`.
pub fn evaluate<B: AutodiffBackend>(
    device: &B::Device,
    run_dir: &Path,
    tasks: &[PathBuf],
    names: &[String],
    done: &[Downstream],
) -> Result<Vec<Downstream>> {
    let mut out = Vec::new();
    for (path, name) in tasks.iter().zip(names) {
        if done.iter().any(|d| &d.task == name) {
            continue;
        }
        let dir = run_dir.join(EVAL_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| ClueError::io(&dir, e))?;
        let options = EvalOptions {
            task: path.clone(),
            model: run_dir.to_path_buf(),
            embeddings: None,
            out: dir.join(name),
            seeds: 1,
            batch_size: USER_BATCH,
            models: Some(vec!["clue".into()]),
            compare: Vec::new(),
        };
        let results = eval::<B>(device, &options)?;
        let clue = results.models.get("clue").ok_or_else(|| {
            ClueError::bad_file(path, "the evaluation gave no `clue` result", "run it again")
        })?;
        out.push(Downstream {
            task: name.clone(),
            mrr: clue.sampled.mrr,
            hr10: clue.sampled.hr10,
            ndcg10: clue.sampled.ndcg10,
        });
    }
    Ok(out)
}
