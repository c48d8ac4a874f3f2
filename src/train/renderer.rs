//! Plain-text progress for runs without a terminal (CI, pipes, `--no-tui`): a few lines per
//! epoch with the metric values. On a terminal Burn's TUI dashboard is used instead.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use burn::train::metric::MetricDefinition;
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};

use crate::train::loader::EpochPlan;

pub struct LogRenderer {
    names: BTreeMap<String, String>,
    train: BTreeMap<String, String>,
    valid: BTreeMap<String, String>,
    lines_per_epoch: usize,
    /// Maps Burn's epochs (checkpoint periods) to the run's epochs.
    plan: Arc<EpochPlan>,
    /// (epoch, valid?, fraction of the split in `lines_per_epoch` steps) last printed.
    last_mark: Option<(usize, bool, usize)>,
    start: Instant,
}

impl LogRenderer {
    /// `lines_per_epoch` lines per checkpoint period (a whole epoch unless
    /// `train.checkpoint_every` is set); 0 prints nothing (`--quiet`).
    pub fn new(lines_per_epoch: usize, plan: Arc<EpochPlan>) -> Self {
        Self {
            plan,
            names: BTreeMap::new(),
            train: BTreeMap::new(),
            valid: BTreeMap::new(),
            lines_per_epoch,
            last_mark: None,
            start: Instant::now(),
        }
    }

    fn store(
        map: &mut BTreeMap<String, String>,
        names: &BTreeMap<String, String>,
        state: MetricState,
    ) {
        let entry = match state {
            MetricState::Generic(e) | MetricState::Numeric(e, _) => e,
        };
        let id = format!("{:?}", entry.metric_id);
        let name = names.get(&id).cloned().unwrap_or(id);
        if !entry.serialized_entry.formatted.is_empty() {
            map.insert(name, entry.serialized_entry.formatted);
        }
    }

    fn line(&mut self, split: &str, item: &TrainingProgress, valid: bool) {
        let Some(p) = &item.progress else { return };
        if self.lines_per_epoch == 0 {
            return;
        }
        let total = p.items_total.max(1);
        let mark = (
            item.global_progress.items_processed,
            valid,
            p.items_processed * self.lines_per_epoch / total,
        );
        if self.last_mark == Some(mark) {
            return;
        }
        self.last_mark = Some(mark);
        if mark.2 == 0 {
            return;
        }
        let values = if valid { &self.valid } else { &self.train };
        let metrics: Vec<String> = values.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let (epoch, part) = self
            .plan
            .epoch_and_part(item.global_progress.items_processed);
        let parts = self.plan.periods_per_epoch();
        let part = if parts > 1 {
            format!(" part {part}/{parts}")
        } else {
            String::new()
        };
        println!(
            "[clue {:>6.1}s] epoch {epoch}/{}{part} {split} {}/{} :: {}",
            self.start.elapsed().as_secs_f64(),
            self.plan.periods() / parts,
            p.items_processed,
            p.items_total,
            metrics.join(" | ")
        );
    }
}

impl MetricsRendererTraining for LogRenderer {
    fn update_train(&mut self, state: MetricState) {
        Self::store(&mut self.train, &self.names, state);
    }

    fn update_valid(&mut self, state: MetricState) {
        Self::store(&mut self.valid, &self.names, state);
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        self.line("train", &item, false);
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        self.line("valid", &item, true);
    }
}

impl MetricsRendererEvaluation for LogRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}

    fn render_test(&mut self, _item: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for LogRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .insert(format!("{:?}", definition.metric_id), definition.name);
    }
}
