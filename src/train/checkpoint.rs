//! Checkpoint files written atomically.
//!
//! Burn's file recorders create the target file and write into it, so a run killed mid-write
//! leaves a truncated `model-N.mpk` that `--resume` would then fail to load. [`AtomicRecorder`]
//! wraps any file recorder: it writes `.partial-<name>` beside the target, flushes it to disk and
//! renames it over the target, so a checkpoint file is either complete or absent.
//!
//! A write that fails (a full disk, a directory that vanished) removes its partial file and is
//! reported to the run's [`StepGuard`], which stops the learner before its next checkpoint; `clue
//! fit` then fails naming the file, and the last complete checkpoint stays usable. Burn's
//! checkpointer thread is told the write succeeded: an error would panic that thread and every
//! later save and the learner's shutdown with it, hiding the cause.
//!
//! Old checkpoints are deleted here too, not by Burn's strategy: Burn's writes run on a thread
//! behind the learner, so a strategy's `Delete(k-1)` could run after checkpoints k and k+1 both
//! failed. With [`SaveEveryPeriod`] as the strategy, the recorder removes `X-(k-2)` only after `X-k`
//! was written and no write has failed, keeping the last two as before.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::record::{FileRecorder, Recorder, RecorderError};
use burn::train::checkpoint::{CheckpointingAction, CheckpointingStrategy};
use burn::train::metric::store::EventStoreClient;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ClueError, Result};
use crate::train::loader::EpochPlan;
use crate::train::metrics::HISTORY_FILE;
use crate::train::step::StepGuard;
use crate::ui;

#[derive(Debug, Default, Clone)]
pub struct AtomicRecorder<R> {
    inner: R,
    /// Where a failed write is reported; without one, the error goes back to the caller.
    guard: Option<Arc<StepGuard>>,
}

impl<R> AtomicRecorder<R> {
    pub fn new(inner: R, guard: Option<Arc<StepGuard>>) -> Self {
        Self { inner, guard }
    }

    /// Write the file `partial` (through `save`), check it, sync it and rename it to `target`.
    /// `check` reads the file back: Burn's recorders write through a `BufWriter` whose last
    /// flush, and so a full disk, goes unreported.
    fn replace(
        target: &Path,
        partial: &Path,
        save: impl FnOnce() -> Result<(), RecorderError>,
        check: impl FnOnce() -> Result<(), RecorderError>,
    ) -> Result<(), RecorderError> {
        let result = save().and_then(|()| check()).and_then(|()| {
            let io =
                |e: std::io::Error| RecorderError::Unknown(format!("{}: {e}", target.display()));
            File::open(partial).and_then(|f| f.sync_all()).map_err(io)?;
            std::fs::rename(partial, target).map_err(io)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(partial);
        }
        result
    }
}

impl<B: Backend, R: FileRecorder<B>> Recorder<B> for AtomicRecorder<R> {
    type Settings = R::Settings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(&self, item: I, file: PathBuf) -> Result<(), RecorderError> {
        // A run that failed (a loading thread died during validation, a checkpoint file could not
        // be written) writes no further file: its last checkpoint stays the last whole one.
        if self.guard.as_ref().is_some_and(|g| g.failure().is_some()) {
            return Ok(());
        }
        let target = file.with_extension(<R as FileRecorder<B>>::file_extension());
        let name = target
            .file_name()
            .ok_or_else(|| RecorderError::Unknown(format!("no file name in {target:?}")))?
            .to_string_lossy()
            .to_string();
        // No dot after the leading one, so the inner recorder appends its extension to it.
        let partial = target.with_file_name(format!(".partial-{}", name.replace('.', "-")));
        let written = partial.with_extension(<R as FileRecorder<B>>::file_extension());
        let result = Self::replace(
            &target,
            &written,
            || self.inner.save_item(item, partial.clone()),
            || {
                let mut file = partial.clone();
                self.inner
                    .load_item::<serde::de::IgnoredAny>(&mut file)
                    .map(|_| ())
            },
        );
        if let Err(e) = result {
            return match &self.guard {
                Some(guard) => {
                    guard.fail(format!(
                        "cannot write the checkpoint {}: {e}",
                        target.display()
                    ));
                    Ok(())
                }
                None => Err(e),
            };
        }
        if let Some(dir) = target.parent() {
            // Make the rename itself durable; not every filesystem lets a directory be synced.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        if self.guard.as_ref().is_some_and(|g| g.failure().is_none())
            && let Some(old) = two_before(&target)
        {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }

    fn load_item<I: DeserializeOwned>(&self, file: &mut PathBuf) -> Result<I, RecorderError> {
        self.inner.load_item(file)
    }
}

impl<B: Backend, R: FileRecorder<B>> FileRecorder<B> for AtomicRecorder<R> {
    fn file_extension() -> &'static str {
        R::file_extension()
    }
}

/// `dir/X-(k-2).ext` for `dir/X-k.ext` (k > 2): the checkpoint file that keeping two retires.
fn two_before(target: &Path) -> Option<PathBuf> {
    let stem = target.file_stem()?.to_str()?;
    let (kind, k) = stem.rsplit_once('-')?;
    let k: usize = k.parse().ok()?;
    let ext = target.extension()?.to_str()?;
    (k > 2).then(|| target.with_file_name(format!("{kind}-{}.{ext}", k - 2)))
}

/// The periods (Burn epochs: an epoch, or `train.checkpoint_every` steps) with a complete
/// checkpoint in `run/checkpoint` (model, optimizer and scheduler), oldest first.
pub fn complete_checkpoints(run: &Path) -> Vec<usize> {
    let dir = run.join("checkpoint");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut held: Vec<usize> = (entries.filter_map(|e| e.ok()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("model-")?
                .strip_suffix(".mpk")?
                .parse::<usize>()
                .ok()
        })
        .filter(|&k| {
            ["optim", "scheduler"]
                .iter()
                .all(|p| dir.join(format!("{p}-{k}.mpk")).exists())
        })
        .collect();
    held.sort_unstable();
    held
}

/// The last period with a complete checkpoint in `run/checkpoint`.
pub fn last_checkpoint(run: &Path) -> Option<usize> {
    complete_checkpoints(run).last().copied()
}

/// Remove what a run that starts again from its first step left: its checkpoint files and
/// metric logs (a new start would mix its own with them).
pub fn clear_progress(run: &Path) -> Result<()> {
    for dir in ["checkpoint", "train", "valid"] {
        let path = run.join(dir);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| ClueError::io(&path, e))?;
        }
    }
    let _ = std::fs::remove_file(run.join(HISTORY_FILE));
    Ok(())
}

/// The step after which the newest complete checkpoint that the run reached was written (a node
/// that resumed with the others from an older checkpoint than its own latest still holds the
/// newer one, which this run may not have reached).
pub fn last_kept(guard: &StepGuard, run: &Path, plan: &EpochPlan) -> Option<usize> {
    (complete_checkpoints(run).into_iter())
        .map(|k| plan.steps_before(k))
        .rfind(|&step| step <= guard.steps())
}

/// The command that resumes the run in `run` from its last complete checkpoint (what the hints
/// of a stopped run tell the user to type).
pub fn resume_command(run: &Path) -> String {
    format!("clue fit --resume {}", run.display())
}

/// Before a resumed run: say where it resumes when that is not its own latest checkpoint
/// (`held`: a node's, where nodes resume together), and clear its progress when it starts again
/// from its first step (it holds no complete checkpoint; nor does any other node).
pub fn resume_from(run: &Path, held: &[usize], newest: Option<usize>) -> Result<()> {
    match (newest, held.last()) {
        (None, _) => {
            ui::say(format!(
                "{} has no complete checkpoint yet: starting it from its first step",
                run.display()
            ));
            clear_progress(run)
        }
        (Some(k), Some(&latest)) if latest > k => {
            ui::say(format!(
                "resuming from checkpoint {k}, the newest that every node holds (this node's latest is {latest})"
            ));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Save at the end of every period and delete nothing (the guarded recorder retires old files).
#[derive(Debug, Clone, Copy)]
pub struct SaveEveryPeriod;

impl CheckpointingStrategy for SaveEveryPeriod {
    fn checkpointing(&mut self, _: usize, _: &EventStoreClient) -> Vec<CheckpointingAction> {
        vec![CheckpointingAction::Save]
    }
}

/// Burn 0.21 numbers the metric log folders of a resumed run from 1 for its first epoch
/// (`train/epoch-1`, `valid/epoch-1`: its event store starts every split at epoch 1), which
/// would overwrite the first period's logs; later epochs get their right numbers.
/// [`ResumedLogs::protect`] moves the original `epoch-1` folders aside before a resumed run and
/// [`ResumedLogs::restore`] puts the resumed period's logs under its own number and the original
/// ones back. A resume that is killed leaves the originals aside; the next resume keeps them.
pub struct ResumedLogs {
    run: PathBuf,
    first_period: usize,
}

const KEPT: &str = "epoch-1.before-resume";

impl ResumedLogs {
    /// Before resuming `run` at period `first_period` (≥ 2).
    pub fn protect(run: &Path, first_period: usize) -> std::io::Result<Self> {
        for split in ["train", "valid"] {
            let (first, kept) = (run.join(split).join("epoch-1"), run.join(split).join(KEPT));
            if kept.exists() {
                // An earlier resume was killed: `epoch-1` holds its (incomplete) first period.
                if first.exists() {
                    std::fs::remove_dir_all(&first)?;
                }
            } else if first.exists() {
                std::fs::rename(&first, &kept)?;
            }
        }
        Ok(Self {
            run: run.to_path_buf(),
            first_period,
        })
    }

    /// After the resumed run.
    pub fn restore(self) -> std::io::Result<()> {
        for split in ["train", "valid"] {
            let dir = self.run.join(split);
            let (first, kept) = (dir.join("epoch-1"), dir.join(KEPT));
            let resumed = dir.join(format!("epoch-{}", self.first_period));
            if first.exists() {
                // The killed run's logs of this period are superseded by the resumed run's.
                if resumed.exists() {
                    std::fs::remove_dir_all(&resumed)?;
                }
                std::fs::rename(&first, &resumed)?;
            }
            if kept.exists() {
                std::fs::rename(&kept, &first)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::record::{DefaultRecorder, Record};
    use burn::train::Interrupter;

    #[derive(Record, Debug, Clone)]
    struct Numbers<B: Backend> {
        values: Tensor<B, 1>,
        step: usize,
    }

    #[test]
    fn keeping_two_retires_the_file_two_periods_back() {
        let dir = Path::new("/r/checkpoint");
        assert_eq!(
            two_before(&dir.join("optim-7.mpk")),
            Some(dir.join("optim-5.mpk"))
        );
        assert_eq!(two_before(&dir.join("model-2.mpk")), None);
        assert_eq!(two_before(&dir.join("model.mpk")), None);
    }

    #[test]
    fn checkpoint_files_are_replaced_whole_and_leave_no_partial_file() {
        type B = NdArray;
        let device = Default::default();
        let dir = tempfile::tempdir().unwrap();
        let recorder = AtomicRecorder::new(DefaultRecorder::new(), None);
        let base = dir.path().join("model-3");
        for step in [1usize, 2] {
            let record = Numbers::<B> {
                values: Tensor::from_floats([1.0, 2.0, step as f32], &device),
                step,
            };
            Recorder::<B>::record(&recorder, record, base.clone()).unwrap();
        }
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["model-3.mpk".to_string()]);
        let back: Numbers<B> = Recorder::<B>::load(&recorder, base, &device).unwrap();
        assert_eq!(back.step, 2);
        assert_eq!(
            back.values.to_data().to_vec::<f32>().unwrap(),
            [1.0, 2.0, 2.0]
        );
    }

    #[test]
    fn a_failed_run_writes_no_further_checkpoint() {
        type B = NdArray;
        let device = Default::default();
        let dir = tempfile::tempdir().unwrap();
        let guard = StepGuard::new(Interrupter::new(), 0);
        let recorder = AtomicRecorder::new(DefaultRecorder::new(), Some(guard.clone()));
        let save = |step: usize| {
            let record = Numbers::<B> {
                values: Tensor::from_floats([step as f32], &device),
                step,
            };
            Recorder::<B>::record(&recorder, record, dir.path().join(format!("model-{step}")))
                .unwrap();
        };
        save(1);
        guard.fail("the data-loading thread clue-loader-0 failed");
        save(2);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec!["model-1.mpk".to_string()]);
    }
}
