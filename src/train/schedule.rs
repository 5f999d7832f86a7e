//! Learning-rate schedules with linear warm-up, as transformers' `get_*_schedule_with_warmup`: the optimizer step
//! with index `k` (0-based) uses `lr(k)`, so with warm-up the very first step has learning rate 0, as there.

use serde::{Deserialize, Serialize};

/// Shape of the schedule after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Half a cosine from the peak down to 0 at the last step (BPO's setting).
    #[default]
    Cosine,
    /// Straight line from the peak down to 0.
    Linear,
    /// The peak throughout (after the warm-up, if any).
    Constant,
}

/// A resolved schedule: peak learning rate, warm-up steps and total optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    /// Warm-up of `ceil(warmup_ratio * total)` steps, as transformers resolves `warmup_ratio`.
    pub fn new(kind: ScheduleKind, peak: f64, warmup_ratio: f64, total: usize) -> Self {
        let warmup = (warmup_ratio.max(0.0) * total as f64).ceil() as usize;
        Schedule { kind, peak, warmup, total }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let after = (step - self.warmup) as f64;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((span - after) / span).max(0.0),
            ScheduleKind::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * after / span).cos())).max(0.0),
        };
        self.peak * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_like_transformers() {
        // transformers: get_cosine_schedule_with_warmup(opt, 3, 10) with lr 1.0, lr_lambda(k) for k = 0..10.
        let s = Schedule::new(ScheduleKind::Cosine, 1.0, 0.3, 10);
        assert_eq!(s.warmup, 3);
        let want = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            0.9504844339512095,
            0.8117449009293668,
            0.6112604669781572,
            0.38873953302184283,
            0.1882550990706332,
            0.04951556604879043,
        ];
        for (k, w) in want.iter().enumerate() {
            assert!((s.lr(k) - w).abs() < 1e-12, "step {k}: {} vs {w}", s.lr(k));
        }
        let l = Schedule::new(ScheduleKind::Linear, 2.0, 0.0, 4);
        assert_eq!((0..5).map(|k| l.lr(k)).collect::<Vec<_>>(), [2.0, 1.5, 1.0, 0.5, 0.0]);
        let c = Schedule::new(ScheduleKind::Constant, 2.0, 0.5, 4);
        assert_eq!((0..4).map(|k| c.lr(k)).collect::<Vec<_>>(), [0.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn warmup_ratio_rounds_up() {
        // BPO: 3% of 1000 steps = 30; of 10 steps, ceil(0.3) = 1.
        assert_eq!(Schedule::new(ScheduleKind::Cosine, 1.0, 0.03, 1000).warmup, 30);
        assert_eq!(Schedule::new(ScheduleKind::Cosine, 1.0, 0.03, 10).warmup, 1);
        assert_eq!(Schedule::new(ScheduleKind::Cosine, 1.0, 0.0, 10).warmup, 0);
    }
}
