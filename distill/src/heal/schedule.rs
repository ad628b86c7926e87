//! Learning-rate schedules: linear warmup, then linear decay to zero (default), cosine or constant.

/// Shape of the learning rate after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Schedule {
    /// Linear decay to zero at the last step (arXiv 2502.15938).
    #[default]
    Linear,
    /// Half cosine to zero.
    Cosine,
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            _ => Err(format!("unknown schedule `{s}` (linear, cosine, constant)")),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        })
    }
}

/// Learning rate of step `step` (0-based) of `total`: `peak * (step + 1) / warmup` during warmup,
/// then decaying so that the step after the last would have lr 0.
pub fn lr_at(schedule: Schedule, peak: f64, warmup: u64, total: u64, step: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let frac = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => peak,
        Schedule::Linear => peak * (1.0 - frac),
        Schedule::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
    }
}
