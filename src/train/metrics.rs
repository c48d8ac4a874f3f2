//! Training metrics: loss, in-batch retrieval accuracy A→B and B→A (top-1, top-10), logit scale,
//! users/s. Computed on the host from one small read per batch, and kept per epoch in a shared
//! [`History`] for `summary.json`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Transaction;
use burn::train::ItemLazy;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use serde::{Deserialize, Serialize};

use crate::bundle::read_json;
use crate::data::store::write_atomic;
use crate::error::Result;
use crate::model::logit_scale_of;
use crate::train::loss::contrastive_loss;

/// What one batch produced, read back from the device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchStats {
    pub loss: f64,
    pub top1_ab: f64,
    pub top1_ba: f64,
    /// `None` when the batch has 10 users or fewer.
    pub top10_ab: Option<f64>,
    pub logit_scale: f64,
    pub users: usize,
}

/// Fraction of rows whose own column (the diagonal) ranks within the top `k`. Ties count
/// against the positive, so a constant score never looks good.
pub fn retrieval_accuracy(scores: &[f32], n: usize, k: usize, transpose: bool) -> f64 {
    let at = |i: usize, j: usize| {
        if transpose {
            scores[j * n + i]
        } else {
            scores[i * n + j]
        }
    };
    let hits = (0..n)
        .filter(|&i| {
            let own = at(i, i);
            let better = (0..n).filter(|&j| j != i && at(i, j) >= own).count();
            better < k
        })
        .count();
    hits as f64 / n.max(1) as f64
}

impl BatchStats {
    /// From the loss, the first pair's `n × n` similarities (or logits: they rank the same)
    /// and the log of the logit scale.
    pub fn from_host(loss: f32, scores: &[f32], n: usize, log_scale: f32) -> Self {
        Self {
            loss: loss as f64,
            top1_ab: retrieval_accuracy(scores, n, 1, false),
            top1_ba: retrieval_accuracy(scores, n, 1, true),
            top10_ab: (n > 10).then(|| retrieval_accuracy(scores, n, 10, false)),
            logit_scale: logit_scale_of(log_scale as f64),
            users: n,
        }
    }
}

/// A step's output and its gradients (`None` when the loss is not finite).
pub type StepParts<B> = (ClueOutput<B>, Option<burn::optim::GradientsParams>);

/// Model output of one step, still on the device.
pub struct ClueOutput<B: Backend> {
    /// `[1]`
    pub loss: Tensor<B, 1>,
    /// `[batch, batch]` similarities of the first service pair.
    pub similarities: Tensor<B, 2>,
    /// `[1]`: the log of the logit scale.
    pub log_logit_scale: Tensor<B, 1>,
    /// The statistics, once read to the host by [`ClueOutput::settle`].
    pub host: Option<BatchStats>,
}

impl<B: Backend> ClueOutput<B> {
    /// The loss of a batch's projected embeddings `[services·batch, d]` with the log of the
    /// logit scale `log_scale`.
    pub fn of(projected: Tensor<B, 2>, services: usize, log_scale: Tensor<B, 1>) -> Self {
        let out = contrastive_loss(projected, services, log_scale.clone());
        Self {
            loss: out.loss,
            similarities: out.similarities,
            log_logit_scale: log_scale,
            host: None,
        }
    }

    /// Read the statistics to the host now, on the calling thread. A step on a fusion backend
    /// does so (`BackendKind::fused`): Burn's learner reads its outputs on its metric thread,
    /// which would cut the operations being queued for the next step at a different place each
    /// time, and every new cut compiles new fused kernels.
    pub fn settle(mut self) -> Self {
        if self.host.is_none() {
            self.host = Some(self.stats());
        }
        self
    }

    fn stats(&self) -> BatchStats {
        let n = self.similarities.dims()[0];
        let data = Transaction::default()
            .register(self.loss.clone())
            .register(self.similarities.clone())
            .register(self.log_logit_scale.clone())
            .execute();
        let f = |d: &TensorData| {
            d.clone()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("float data")
        };
        BatchStats::from_host(f(&data[0])[0], &f(&data[1]), n, f(&data[2])[0])
    }
}

impl<B: Backend> ItemLazy for ClueOutput<B> {
    type ItemSync = BatchStats;

    fn sync(self) -> BatchStats {
        self.host.clone().unwrap_or_else(|| self.stats())
    }
}

impl Adaptor<BatchStats> for BatchStats {
    fn adapt(&self) -> BatchStats {
        self.clone()
    }
}

/// Which number of [`BatchStats`] a metric shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Stat {
    Loss,
    Top1AB,
    Top1BA,
    Top10AB,
    LogitScale,
    UsersPerSecond,
}

impl Stat {
    fn name(self) -> &'static str {
        match self {
            Stat::Loss => "Loss",
            Stat::Top1AB => "Top-1 A→B",
            Stat::Top1BA => "Top-1 B→A",
            Stat::Top10AB => "Top-10 A→B",
            Stat::LogitScale => "Logit Scale",
            Stat::UsersPerSecond => "Users per s",
        }
    }
}

/// Per-epoch means of every metric, for train and valid.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct History {
    pub train: Vec<EpochStats>,
    pub valid: Vec<EpochStats>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct EpochStats {
    pub loss: Option<f64>,
    pub top1_ab: Option<f64>,
    pub top1_ba: Option<f64>,
    pub top10_ab: Option<f64>,
    pub logit_scale: Option<f64>,
    pub users_per_second: Option<f64>,
    pub batch_size: Option<usize>,
}

/// `history.json` in a run directory: the per-period means so far, rewritten at every period's
/// end, so that a resumed run's summary keeps the periods before the kill.
pub const HISTORY_FILE: &str = "history.json";

/// The run's [`History`], shared by its metrics and kept in `<run>/history.json`.
pub struct HistoryLog {
    inner: Mutex<(History, Option<String>)>,
    path: PathBuf,
}

pub type SharedHistory = Arc<HistoryLog>;

impl HistoryLog {
    /// The history of `run` with its first `periods_done` periods kept (a resumed run; 0 for a
    /// fresh one, which starts empty).
    pub fn open(run: &Path, periods_done: usize) -> Result<SharedHistory> {
        let path = run.join(HISTORY_FILE);
        let mut history = History::default();
        if periods_done > 0 && path.exists() {
            history = read_json(&path)?;
            history.train.truncate(periods_done);
            history.valid.truncate(periods_done);
        }
        Ok(Arc::new(Self {
            inner: Mutex::new((history, None)),
            path,
        }))
    }

    pub fn history(&self) -> History {
        self.inner.lock().expect("history lock").0.clone()
    }

    /// Why the latest write of `history.json` failed, if it did (a later write that succeeds
    /// holds the whole history, so it clears the failure).
    pub fn write_error(&self) -> Option<String> {
        self.inner.lock().expect("history lock").1.clone()
    }

    fn record(&self, valid: bool, epoch: usize, stat: Stat, mean: f64, batch_size: usize) {
        let mut inner = self.inner.lock().expect("history lock");
        let (h, error) = &mut *inner;
        let epochs = if valid { &mut h.valid } else { &mut h.train };
        if epochs.len() <= epoch {
            epochs.resize_with(epoch + 1, EpochStats::default);
        }
        *epochs[epoch].slot(stat) = Some(mean);
        epochs[epoch].batch_size = Some(batch_size);
        let json = serde_json::to_string_pretty(h).expect("json") + "\n";
        *error = write_atomic(&self.path, json.as_bytes())
            .err()
            .map(|e| e.to_string());
    }
}

/// A numeric Burn metric over one [`Stat`]; at each epoch end its mean goes into the history.
#[derive(Clone)]
pub struct StatMetric {
    stat: Stat,
    valid: bool,
    name: MetricName,
    state: NumericMetricState,
    history: SharedHistory,
    started: Option<Instant>,
    max_users: usize,
    /// Index in the history of the epoch being measured.
    epoch: usize,
}

impl StatMetric {
    /// A metric of `stat` for the train (or `valid`) split; the first epoch it sees is history
    /// entry `first_epoch` (the periods a resumed run has done).
    pub fn new(stat: Stat, valid: bool, history: SharedHistory, first_epoch: usize) -> Self {
        Self {
            stat,
            valid,
            name: Arc::new(stat.name().to_string()),
            state: NumericMetricState::new(),
            history,
            started: None,
            max_users: 0,
            epoch: first_epoch,
        }
    }

    fn value(&mut self, s: &BatchStats) -> Option<f64> {
        match self.stat {
            Stat::Loss => Some(s.loss),
            Stat::Top1AB => Some(100.0 * s.top1_ab),
            Stat::Top1BA => Some(100.0 * s.top1_ba),
            Stat::Top10AB => s.top10_ab.map(|x| 100.0 * x),
            Stat::LogitScale => Some(s.logit_scale),
            Stat::UsersPerSecond => {
                let now = Instant::now();
                let rate = self
                    .started
                    .map(|t| s.users as f64 / now.duration_since(t).as_secs_f64().max(1e-9));
                self.started = Some(now);
                rate
            }
        }
    }
}

impl Metric for StatMetric {
    type Input = BatchStats;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        let percent = matches!(self.stat, Stat::Top1AB | Stat::Top1BA | Stat::Top10AB);
        NumericAttributes {
            unit: percent.then(|| "%".to_string()),
            higher_is_better: self.stat != Stat::Loss,
        }
        .into()
    }

    fn update(&mut self, item: &BatchStats, _meta: &MetricMetadata) -> SerializedEntry {
        self.max_users = self.max_users.max(item.users);
        let precision = if self.stat == Stat::Loss { 4 } else { 2 };
        let format = FormatOptions::new(self.name()).precision(precision);
        match self.value(item) {
            Some(v) => self.state.update(v, item.users, format),
            None => SerializedEntry::new(String::new(), String::new()),
        }
    }

    fn clear(&mut self) {
        let mean = match self.state.running_value() {
            NumericEntry::Value(v) => Some(v),
            NumericEntry::Aggregated {
                aggregated_value,
                count,
            } => (count > 0).then_some(aggregated_value),
        };
        if let Some(mean) = mean.filter(|m| m.is_finite()) {
            self.history
                .record(self.valid, self.epoch, self.stat, mean, self.max_users);
        }
        self.epoch += 1;
        self.state.reset();
        self.started = None;
    }
}

impl EpochStats {
    fn slot(&mut self, stat: Stat) -> &mut Option<f64> {
        match stat {
            Stat::Loss => &mut self.loss,
            Stat::Top1AB => &mut self.top1_ab,
            Stat::Top1BA => &mut self.top1_ba,
            Stat::Top10AB => &mut self.top10_ab,
            Stat::LogitScale => &mut self.logit_scale,
            Stat::UsersPerSecond => &mut self.users_per_second,
        }
    }
}

impl Numeric for StatMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrieval_accuracy_counts_ties_against_the_positive() {
        // Row 0: positive best. Row 1: tie with column 0 → a miss at top-1. Row 2: positive worst.
        let logits = [3.0, 1.0, 0.0, 2.0, 2.0, 1.0, 5.0, 4.0, 1.0];
        assert!((retrieval_accuracy(&logits, 3, 1, false) - 1.0 / 3.0).abs() < 1e-12);
        assert!((retrieval_accuracy(&logits, 3, 2, false) - 2.0 / 3.0).abs() < 1e-12);
        // Columns (B→A): column 0 = [3,2,5] → miss; column 1 = [1,2,4] → miss; column 2 = [0,1,1] → miss (tie).
        assert_eq!(retrieval_accuracy(&logits, 3, 1, true), 0.0);
        let constant = [1.0f32; 16];
        assert_eq!(retrieval_accuracy(&constant, 4, 1, false), 0.0);
    }

    #[test]
    fn a_failed_history_write_is_reported_until_a_later_write_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let log = HistoryLog::open(run, 0).unwrap();
        // A directory stands where history.json goes: the write fails.
        std::fs::create_dir_all(run.join(HISTORY_FILE).join("x")).unwrap();
        log.record(false, 0, Stat::Loss, 2.5, 8);
        assert!(log.write_error().is_some());
        std::fs::remove_dir_all(run.join(HISTORY_FILE)).unwrap();
        log.record(false, 0, Stat::Top1AB, 40.0, 8);
        assert_eq!(log.write_error(), None);
        let saved: History = read_json(&run.join(HISTORY_FILE)).unwrap();
        assert_eq!(
            saved.train[0].loss,
            Some(2.5),
            "the later write holds the earlier record"
        );
    }
}
