//! The benchmark harness behind `ctx bench`: measurement helpers, result rows, report output.
//!
//! A suite is a function `fn(&mut Runner) -> anyhow::Result<()>` registered in [`crate::suites::ALL`].
//! It measures each case **and its baseline in the same run** (use [`Runner::compare_ns`], which
//! interleaves the two so that noise on this shared machine hits both alike) and records one row per
//! (case, baseline) pair with [`Runner::row`]. Rows carry the ratio value / baseline_value and, where
//! the issue states one, the target the ratio is judged against.

pub mod report;

use std::time::{Duration, Instant};

use serde::Serialize;

/// Which direction is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Smaller values are better (times).
    Lower,
    /// Larger values are better (throughput, speedup).
    Higher,
}

/// A target for a row, stated on the ratio (value / baseline_value) or on the value itself.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "limit", rename_all = "snake_case")]
pub enum Target {
    /// ratio <= limit ("within 1.5x of the mutex").
    RatioAtMost(f64),
    /// ratio >= limit ("at 90% of memcpy or better", "1.8x speedup").
    RatioAtLeast(f64),
    /// value <= limit (e.g. 0 context switches).
    ValueAtMost(f64),
    /// value >= limit.
    ValueAtLeast(f64),
}

impl Target {
    /// Whether a row meets the target.
    #[must_use]
    pub fn met(&self, value: f64, ratio: f64) -> bool {
        match *self {
            Self::RatioAtMost(l) => ratio <= l,
            Self::RatioAtLeast(l) => ratio >= l,
            Self::ValueAtMost(l) => value <= l,
            Self::ValueAtLeast(l) => value >= l,
        }
    }

    /// Short human form, e.g. "<= 1.5x".
    #[must_use]
    pub fn describe(&self) -> String {
        match *self {
            Self::RatioAtMost(l) => format!("<= {l}x"),
            Self::RatioAtLeast(l) => format!(">= {l}x"),
            Self::ValueAtMost(l) => format!("value <= {l}"),
            Self::ValueAtLeast(l) => format!("value >= {l}"),
        }
    }
}

/// One result row, as printed and as written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Suite name (`handoff`, `proxy`, ...).
    pub suite: String,
    /// Case name (`enter_exit_idle`, ...).
    pub case: String,
    /// Metric: `ns_per_op`, `gb_per_s`, `count`, `speedup`, `bytes`.
    pub metric: String,
    /// The case's measured value.
    pub value: f64,
    /// The baseline's name.
    pub baseline: String,
    /// The baseline's value, measured in the same run.
    pub baseline_value: f64,
    /// value / baseline_value (0 when the baseline is 0).
    pub ratio: f64,
    /// Which direction is better for this metric.
    pub better: Better,
    /// The target, if the issue states one.
    pub target: Option<Target>,
    /// Whether the target is met (`None` without a target).
    pub target_met: Option<bool>,
    /// Free-form remark (e.g. how many trials).
    pub note: String,
}

/// Options for a run.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Short trials, few repetitions: the whole set in well under a minute.
    pub quick: bool,
}

impl Config {
    /// How many trials to take a median over.
    #[must_use]
    pub fn trials(&self) -> usize {
        if self.quick { 3 } else { 9 }
    }

    /// How long one trial of a timed loop should run.
    #[must_use]
    pub fn trial_time(&self) -> Duration {
        if self.quick {
            Duration::from_millis(15)
        } else {
            Duration::from_millis(120)
        }
    }
}

/// Collects rows for one run and offers the measurement helpers.
pub struct Runner {
    config: Config,
    suite: &'static str,
    rows: Vec<Row>,
    progress: Box<dyn FnMut(&str)>,
}

/// A named fallible measurement for [`Runner::rotate_ns`]: runs `n` operations.
pub type Case<'a> = (&'a str, &'a mut dyn FnMut(u64) -> anyhow::Result<()>);

impl Runner {
    /// A runner; `progress` is told the name of each case as it starts.
    pub fn new(config: Config, progress: Box<dyn FnMut(&str)>) -> Self {
        Self {
            config,
            suite: "",
            rows: Vec::new(),
            progress,
        }
    }

    /// The run's options.
    #[must_use]
    pub fn config(&self) -> Config {
        self.config
    }

    /// Whether this is a `--quick` run.
    #[must_use]
    pub fn quick(&self) -> bool {
        self.config.quick
    }

    pub(crate) fn set_suite(&mut self, suite: &'static str) {
        self.suite = suite;
    }

    /// Reports progress (the case about to be measured).
    pub fn step(&mut self, what: &str) {
        (self.progress)(what);
    }

    /// Records one row. `ratio` is computed as value / baseline_value.
    #[allow(clippy::too_many_arguments)] // a row has this many fields; a builder would only hide them
    pub fn row(
        &mut self,
        case: &str,
        metric: &str,
        value: f64,
        better: Better,
        baseline: &str,
        baseline_value: f64,
        target: Option<Target>,
    ) {
        let ratio = if baseline_value == 0.0 {
            0.0
        } else {
            value / baseline_value
        };
        let target_met = target.map(|t| t.met(value, ratio));
        self.rows.push(Row {
            suite: self.suite.to_owned(),
            case: case.to_owned(),
            metric: metric.to_owned(),
            value,
            baseline: baseline.to_owned(),
            baseline_value,
            ratio,
            better,
            target,
            target_met,
            note: String::new(),
        });
    }

    /// Adds a note to the last row recorded.
    pub fn note(&mut self, note: impl Into<String>) {
        if let Some(r) = self.rows.last_mut() {
            r.note = note.into();
        }
    }

    /// The rows recorded so far.
    #[must_use]
    pub fn into_rows(self) -> Vec<Row> {
        self.rows
    }

    /// Finds how many iterations of `f` fill about one trial.
    fn calibrate(&self, f: &mut dyn FnMut(u64)) -> u64 {
        let target = self.config.trial_time();
        let mut iters = 1u64;
        loop {
            let t0 = Instant::now();
            f(iters);
            let el = t0.elapsed();
            if el >= target / 4 || iters >= 1 << 32 {
                let per = el.as_secs_f64() / iters as f64;
                return ((target.as_secs_f64() / per.max(1e-12)) as u64).clamp(1, 1 << 34);
            }
            iters *= 4;
        }
    }

    /// Median nanoseconds per operation of a case and of its baseline, measured in alternating trials
    /// so that both see the same machine. Returns `(case, baseline)`.
    pub fn compare_ns(
        &mut self,
        mut case: impl FnMut(u64),
        mut baseline: impl FnMut(u64),
    ) -> (f64, f64) {
        let ci = self.calibrate(&mut case);
        let bi = self.calibrate(&mut baseline);
        let mut cs = Vec::with_capacity(self.config.trials());
        let mut bs = Vec::with_capacity(self.config.trials());
        for _ in 0..self.config.trials() {
            let t0 = Instant::now();
            case(ci);
            cs.push(t0.elapsed().as_nanos() as f64 / ci as f64);
            let t0 = Instant::now();
            baseline(bi);
            bs.push(t0.elapsed().as_nanos() as f64 / bi as f64);
        }
        (median(&mut cs), median(&mut bs))
    }

    /// Several fallible measurements (each runs `n` operations), each calibrated to about one trial,
    /// then rotated through trial by trial so all see the same machine; the median ns per
    /// operation of each, in order. For cases whose loops can fail (cross-process round trips).
    ///
    /// # Errors
    /// The first error of a case, with its name.
    pub fn rotate_ns(&self, cases: &mut [Case<'_>]) -> anyhow::Result<Vec<f64>> {
        use anyhow::Context as _;
        let trial = self.config.trial_time();
        let mut iters = Vec::new();
        for (name, f) in cases.iter_mut() {
            let mut n = 16u64;
            loop {
                let t0 = Instant::now();
                f(n).with_context(|| format!("{name}: calibration"))?;
                let el = t0.elapsed();
                if el >= trial / 4 || n >= 1 << 24 {
                    let per = el.as_secs_f64() / n as f64;
                    iters.push(((trial.as_secs_f64() / per.max(1e-9)) as u64).clamp(16, 1 << 26));
                    break;
                }
                n *= 4;
            }
        }
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..self.config.trials() {
            for (i, (name, f)) in cases.iter_mut().enumerate() {
                let t0 = Instant::now();
                f(iters[i]).with_context(|| format!("{name}: trial"))?;
                samples[i].push(t0.elapsed().as_nanos() as f64 / iters[i] as f64);
            }
        }
        Ok(samples.iter_mut().map(|s| median(s)).collect())
    }

    /// Median of `trials()` runs of a one-shot measurement (for things that cannot loop cheaply,
    /// such as forking or filling 64 MiB). `f` returns the measured value of one run.
    pub fn sample(&mut self, mut f: impl FnMut() -> f64) -> f64 {
        let mut samples: Vec<f64> = (0..self.config.trials()).map(|_| f()).collect();
        median(&mut samples)
    }
}

/// The median of a non-empty sample set (0 for an empty one).
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}
