//! The benchmark harness behind `ctx bench`: measurement helpers, result rows, report output.
//!
//! A suite is a function `fn(&mut Runner) -> anyhow::Result<()>` registered in [`crate::suites::ALL`].
//! It measures each case **and its baseline in the same run** (use [`Runner::compare_ns`], which
//! interleaves the two so that noise on this shared machine hits both alike) and records one row per
//! (case, baseline) pair with [`Runner::row`]. Rows carry the ratio value / baseline_value and, where
//! the issue states one, the target the ratio is judged against.
//!
//! A row made from the medians of the last comparison also carries the **spread of its paired
//! ratios**: trial `t` of the case and trial `t` of the baseline ran back to back, so their ratio is
//! one paired sample of the ratio, and the interquartile range of those samples
//! ([`Row::ratio_range`]) shows how far this run's noise moved it (the headline ratio stays the
//! ratio of the two medians).

pub mod report;

use std::ptr;
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
    /// The interquartile range (lowest and highest for fewer than five trials) of the paired
    /// per-trial ratios, when the row's two values are the medians of the runner's last comparison
    /// (see the module docs); `None` otherwise (one-shot figures, figures from a child process).
    pub ratio_range: Option<(f64, f64)>,
    /// The per-trial figures behind `value` and `baseline_value`, trial `t` of each run back to
    /// back (so `value_samples[t] / baseline_samples[t]` is one paired ratio), when the row's
    /// values are the medians of the runner's last comparison; empty otherwise. For an analysis
    /// of a run's noise beyond the interquartile range.
    pub value_samples: Vec<f64>,
    /// See [`Row::value_samples`].
    pub baseline_samples: Vec<f64>,
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
        if self.quick { 5 } else { 9 }
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
    /// The last comparison's per-trial samples, each with its median (see [`Runner::row`]).
    recent: Vec<(f64, Vec<f64>)>,
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
            recent: Vec::new(),
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

    /// Records one row. `ratio` is computed as value / baseline_value. If `value` and
    /// `baseline_value` are two of the medians the last [`Runner::compare_ns`] or
    /// [`Runner::rotate_ns`] returned (as returned, bit for bit), the row also gets the spread of the
    /// paired per-trial ratios ([`Row::ratio_range`]).
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
        // A ratio to a zero (or failed) baseline means nothing: no ratio target is judged on it.
        let ratio_meaningful = baseline_value != 0.0 && ratio.is_finite();
        let target_met = target.and_then(|t| match t {
            Target::RatioAtMost(_) | Target::RatioAtLeast(_) if !ratio_meaningful => None,
            t => Some(t.met(value, ratio)),
        });
        let paired = self.paired_samples(value, baseline_value);
        let ratio_range = paired.and_then(|(cs, bs)| paired_range(cs, bs));
        let (value_samples, baseline_samples) =
            paired.map_or_else(Default::default, |(cs, bs)| (cs.to_vec(), bs.to_vec()));
        self.rows.push(Row {
            suite: self.suite.to_owned(),
            case: case.to_owned(),
            metric: metric.to_owned(),
            value,
            baseline: baseline.to_owned(),
            baseline_value,
            ratio,
            ratio_range,
            value_samples,
            baseline_samples,
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
        let medians = self.paired_medians(vec![cs, bs]);
        (medians[0], medians[1])
    }

    /// The medians of the sample sets of one comparison, in order; trial `t` of every set must have
    /// run in the same round. The samples are kept for [`Runner::row`], which then gives a row made
    /// of two of these medians the spread of their paired ratios. [`Runner::compare_ns`] and
    /// [`Runner::rotate_ns`] call this; a suite with its own rounds (one-shot trials) calls it too.
    pub fn paired_medians(&mut self, samples: Vec<Vec<f64>>) -> Vec<f64> {
        self.recent = samples
            .into_iter()
            .map(|s| {
                let m = median(&mut s.clone());
                (m, s)
            })
            .collect();
        self.recent.iter().map(|(m, _)| *m).collect()
    }

    /// The last comparison's sample sets whose medians are `value` and `baseline` (bit-equal), if
    /// both are there, distinct, with the same number of trials.
    fn paired_samples(&self, value: f64, baseline: f64) -> Option<(&[f64], &[f64])> {
        let find = |v: f64| {
            self.recent
                .iter()
                .find(|(m, _)| m.to_bits() == v.to_bits())
                .map(|(_, s)| s)
        };
        let (cs, bs) = (find(value)?, find(baseline)?);
        if cs.len() != bs.len() || cs.is_empty() || ptr::eq(cs, bs) {
            return None;
        }
        Some((cs, bs))
    }

    /// Several fallible measurements (each runs `n` operations), each calibrated to about one trial,
    /// then rotated through trial by trial so all see the same machine; the median ns per
    /// operation of each, in order. For cases whose loops can fail (cross-process round trips).
    ///
    /// # Errors
    /// The first error of a case, with its name.
    pub fn rotate_ns(&mut self, cases: &mut [Case<'_>]) -> anyhow::Result<Vec<f64>> {
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
        Ok(self.paired_medians(samples))
    }

    /// Median of `trials()` runs of a one-shot measurement (for things that cannot loop cheaply,
    /// such as forking or filling 64 MiB). `f` returns the measured value of one run.
    pub fn sample(&mut self, mut f: impl FnMut() -> f64) -> f64 {
        let mut samples: Vec<f64> = (0..self.config.trials()).map(|_| f()).collect();
        median(&mut samples)
    }
}

/// The spread of the paired ratios `cs[t] / bs[t]` of one comparison's sample sets (the
/// [`Runner::paired_samples`] of a row); trials with a zero baseline are left out.
fn paired_range(cs: &[f64], bs: &[f64]) -> Option<(f64, f64)> {
    let mut ratios: Vec<f64> = cs
        .iter()
        .zip(bs)
        .filter(|(_, b)| **b != 0.0)
        .map(|(c, b)| c / b)
        .collect();
    interquartile(&mut ratios)
}

/// The interquartile range of a sample set: its lower and upper quartiles (by rank, no
/// interpolation), which for fewer than five samples are its lowest and highest. `None` if empty.
fn interquartile(samples: &mut [f64]) -> Option<(f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let k = (samples.len() - 1) / 4;
    Some((samples[k], samples[samples.len() - 1 - k]))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn runner() -> Runner {
        Runner::new(Config { quick: true }, Box::new(|_: &str| {}))
    }

    #[test]
    fn a_ratio_target_is_not_judged_against_a_zero_baseline() {
        let mut r = runner();
        for (value, base, target) in [
            (5.0, 0.0, Target::RatioAtMost(1.5)),
            (0.0, 0.0, Target::ValueAtMost(0.0)),
            (5.0, 10.0, Target::RatioAtMost(1.5)),
        ] {
            r.row(
                "c",
                "ns_per_op",
                value,
                Better::Lower,
                "b",
                base,
                Some(target),
            );
        }
        let met: Vec<_> = r.rows.iter().map(|row| row.target_met).collect();
        assert_eq!(met, [None, Some(true), Some(true)]);
    }

    #[test]
    fn interquartile_is_by_rank_and_spans_all_of_a_small_set() {
        assert_eq!(interquartile(&mut []), None);
        assert_eq!(interquartile(&mut [2.0]), Some((2.0, 2.0)));
        assert_eq!(interquartile(&mut [3.0, 1.0, 2.0]), Some((1.0, 3.0)));
        let mut nine = [9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0];
        assert_eq!(interquartile(&mut nine), Some((3.0, 7.0)));
    }

    #[test]
    fn a_row_of_the_last_comparisons_medians_gets_the_paired_spread() {
        let mut r = runner();
        let row = |r: &mut Runner, value: f64, baseline: &str, base: f64| {
            r.row("c", "ns_per_op", value, Better::Lower, baseline, base, None);
        };
        // Trial by trial the case is 2x, 3x and 4x its baseline, though both drift.
        let medians = r.paired_medians(vec![vec![2.0, 30.0, 8.0], vec![1.0, 10.0, 2.0]]);
        assert_eq!(medians, [8.0, 2.0]);
        row(&mut r, medians[0], "b", medians[1]);
        assert_eq!(r.rows[0].ratio, 4.0);
        assert_eq!(r.rows[0].ratio_range, Some((2.0, 4.0)));
        assert_eq!(r.rows[0].value_samples, [2.0, 30.0, 8.0]);
        assert_eq!(r.rows[0].baseline_samples, [1.0, 10.0, 2.0]);
        // Any other figures get none: a value that is not a median, or the same median twice.
        row(&mut r, 8.5, "b", medians[1]);
        row(&mut r, medians[0], "c", medians[0]);
        assert_eq!(r.rows[1].ratio_range, None);
        assert_eq!(r.rows[2].ratio_range, None);
        assert!(r.rows[1].value_samples.is_empty() && r.rows[2].baseline_samples.is_empty());
        // A new comparison replaces the old samples.
        r.paired_medians(vec![vec![1.0], vec![1.0, 2.0]]);
        row(&mut r, medians[0], "b", medians[1]);
        assert_eq!(r.rows[3].ratio_range, None);
    }

    #[test]
    fn compare_ns_pairs_its_trials() {
        let mut r = runner();
        let (case, base) = r.compare_ns(
            |n| std::thread::sleep(Duration::from_micros(n.min(200) * 4)),
            |n| std::thread::sleep(Duration::from_micros(n.min(200))),
        );
        r.row("c", "ns_per_op", case, Better::Lower, "b", base, None);
        let (lo, hi) = r.rows[0].ratio_range.expect("paired spread");
        assert!(0.0 < lo && lo <= hi);
    }
}
