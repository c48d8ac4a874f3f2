//! Learning-rate schedule (paper §2.2): linear warm-up over the first 1% of steps, then cosine
//! decay to 10% of the peak, flat at that floor after the last step (never climbing back).

use burn::lr_scheduler::LrScheduler;
use burn::prelude::Backend;

#[derive(Debug, Clone, PartialEq)]
pub struct WarmupCosine {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// Final learning rate as a fraction of the peak.
    pub floor: f64,
    /// Optimizer steps taken so far.
    pub step: usize,
}

impl WarmupCosine {
    /// `warmup_fraction` of `total_steps` (at least one step) warms up.
    pub fn new(peak: f64, total_steps: usize, warmup_fraction: f64, floor: f64) -> Self {
        let total_steps = total_steps.max(1);
        Self {
            peak,
            warmup_steps: ((total_steps as f64 * warmup_fraction).ceil() as usize)
                .clamp(1, total_steps),
            total_steps,
            floor,
            step: 0,
        }
    }

    /// Learning rate of optimizer step `t` (0-based).
    pub fn lr_at(&self, t: usize) -> f64 {
        if t < self.warmup_steps {
            return self.peak * (t + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.total_steps - self.warmup_steps).max(1) as f64;
        let progress = ((t + 1 - self.warmup_steps) as f64 / span).min(1.0);
        let low = self.peak * self.floor;
        low + (self.peak - low) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

impl LrScheduler for WarmupCosine {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        let lr = self.lr_at(self.step);
        self.step += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.step = record;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_peaks_decays_and_stays_at_the_floor() {
        let s = WarmupCosine::new(5e-4, 1000, 0.01, 0.1);
        assert_eq!(s.warmup_steps, 10);
        assert!(
            (s.lr_at(0) - 5e-5).abs() < 1e-12,
            "first step is peak/warmup"
        );
        assert!(
            (s.lr_at(9) - 5e-4).abs() < 1e-12,
            "end of warm-up is the peak"
        );
        // Middle of the cosine: halfway between peak and floor.
        let mid = 10 + (990 / 2) - 1;
        assert!((s.lr_at(mid) - (5e-4 + 5e-5) / 2.0).abs() < 1e-9);
        assert!(
            (s.lr_at(999) - 5e-5).abs() < 1e-12,
            "last step reaches 10% of peak"
        );
        for t in 1000..1100 {
            assert!(
                (s.lr_at(t) - 5e-5).abs() < 1e-12,
                "never rises after the last step"
            );
        }
        for t in 10..999 {
            assert!(s.lr_at(t + 1) <= s.lr_at(t) + 1e-15);
        }
    }

    #[test]
    fn scheduler_state_survives_a_record_round_trip() {
        let mut s = WarmupCosine::new(1e-3, 100, 0.01, 0.1);
        for _ in 0..37 {
            s.step();
        }
        let record = LrScheduler::to_record::<burn::backend::NdArray>(&s);
        let fresh = WarmupCosine::new(1e-3, 100, 0.01, 0.1);
        let mut back = LrScheduler::load_record::<burn::backend::NdArray>(fresh, record);
        assert_eq!(back.step(), s.clone().step());
    }
}
