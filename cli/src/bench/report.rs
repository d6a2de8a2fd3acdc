//! Rendering a run: a text table grouped by suite, JSON, and an SVG chart of ratios.

use std::fmt::Write as _;

use serde::Serialize;

use super::{Better, Row};

/// The JSON document `ctx bench --json` writes.
#[derive(Debug, Serialize)]
pub struct Document<'a> {
    /// Format version of this document.
    pub format: u32,
    /// Whether the run was `--quick`.
    pub quick: bool,
    /// Trials per comparison (each case and its baseline alternate that many times; the one-shot
    /// rows of the fork-pool suite take three times as many) and the target length of one trial
    /// of a timed loop, in milliseconds.
    pub trials: usize,
    /// See [`Document::trials`].
    pub trial_ms: u64,
    /// When the run ended, in seconds since the Unix epoch.
    pub finished_unix_s: u64,
    /// The `ctx` version that made it.
    pub ctx_version: &'static str,
    /// What the machine is, as far as the run could tell.
    pub machine: Machine,
    /// The suites that ran.
    pub suites: Vec<&'a str>,
    /// The suites that failed, with why (their rows, if any, are partial).
    pub failed: &'a [String],
    /// Every row.
    pub rows: &'a [Row],
}

/// A short description of the machine the figures come from.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Logical CPUs available.
    pub cpus: usize,
    /// CPU model from /proc/cpuinfo, if readable.
    pub cpu_model: String,
    /// Kernel release (uname -r).
    pub kernel: String,
}

impl Machine {
    /// Reads what the OS says.
    #[must_use]
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        Self {
            cpus,
            cpu_model,
            kernel,
        }
    }
}

fn fmt_value(v: f64) -> String {
    if v == 0.0 {
        "0".to_owned()
    } else if v.abs() >= 1e9 {
        format!("{:.3e}", v)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_ratio(r: f64) -> String {
    if r == 0.0 {
        "-".to_owned()
    } else if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 0.01 {
        format!("{r:.2}x")
    } else {
        format!("{r:.4}x")
    }
}

/// A row's paired-ratio spread, e.g. `2.81-3.10x`; empty without one.
fn fmt_range(r: Option<(f64, f64)>) -> String {
    r.map(|(lo, hi)| {
        let lo = fmt_ratio(lo);
        format!("{}-{}", lo.trim_end_matches('x'), fmt_ratio(hi))
    })
    .unwrap_or_default()
}

/// The table printed by `ctx bench`.
#[must_use]
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let headers = [
        "case",
        "metric",
        "value",
        "baseline",
        "baseline value",
        "ratio",
        "ratio IQR",
        "target",
        "met",
    ];
    let mut suites: Vec<&str> = Vec::new();
    for r in rows {
        if !suites.contains(&r.suite.as_str()) {
            suites.push(&r.suite);
        }
    }
    for suite in suites {
        let lines: Vec<[String; 9]> = rows
            .iter()
            .filter(|r| r.suite == suite)
            .map(|r| {
                [
                    r.case.clone(),
                    r.metric.clone(),
                    fmt_value(r.value),
                    r.baseline.clone(),
                    fmt_value(r.baseline_value),
                    fmt_ratio(r.ratio),
                    fmt_range(r.ratio_range),
                    r.target.map(|t| t.describe()).unwrap_or_default(),
                    match r.target_met {
                        Some(true) => "yes".to_owned(),
                        Some(false) => "NO".to_owned(),
                        None => String::new(),
                    },
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for l in &lines {
            for (w, c) in widths.iter_mut().zip(l) {
                *w = (*w).max(c.len());
            }
        }
        let _ = writeln!(out, "== {suite}");
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                // Numbers right-aligned, names left-aligned.
                if matches!(i, 2 | 4 | 5 | 6) {
                    let _ = write!(s, "{c:>w$}  ");
                } else {
                    let _ = write!(s, "{c:<w$}  ");
                }
            }
            s.trim_end().to_owned()
        };
        let _ = writeln!(out, "{}", line(&headers.map(str::to_owned)));
        for l in &lines {
            let _ = writeln!(out, "{}", line(l));
        }
        let notes: Vec<String> = rows
            .iter()
            .filter(|r| r.suite == suite && !r.note.is_empty())
            .map(|r| format!("  note: {} vs {}: {}", r.case, r.baseline, r.note))
            .collect();
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
        out.push('\n');
    }
    out
}

/// A Markdown table of the rows (for the README).
#[must_use]
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| suite | case | metric | value | baseline | baseline value | ratio | ratio IQR | target | met |\n",
    );
    out.push_str("|---|---|---|---:|---|---:|---:|---:|---|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.suite,
            r.case,
            r.metric,
            fmt_value(r.value),
            r.baseline,
            fmt_value(r.baseline_value),
            fmt_ratio(r.ratio),
            fmt_range(r.ratio_range),
            r.target.map(|t| t.describe()).unwrap_or_default(),
            match r.target_met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "",
            }
        );
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG chart: one horizontal bar per row with a ratio, on a log scale centred on 1x, grouped by
/// suite. Bars are green when the target is met, red when not, grey without a target.
#[must_use]
pub fn svg(rows: &[Row]) -> String {
    let rows: Vec<&Row> = rows.iter().filter(|r| r.ratio > 0.0).collect();
    let bar_h = 18.0;
    let label_w = 430.0;
    let chart_w = 420.0;
    let top = 40.0;
    let mut y = top;
    let mut body = String::new();
    // log10 scale from 1/1000x to 1000x.
    let span = 3.0f64;
    let x_of =
        |ratio: f64| label_w + (ratio.log10().clamp(-span, span) + span) / (2.0 * span) * chart_w;
    let mut last_suite = "";
    for r in &rows {
        if r.suite != last_suite {
            y += 8.0;
            let _ = writeln!(
                body,
                r#"<text x="8" y="{:.1}" font-weight="bold">{}</text>"#,
                y + 12.0,
                xml_escape(&r.suite)
            );
            y += bar_h;
            last_suite = &r.suite;
        }
        let colour = match r.target_met {
            Some(true) => "#2e8b57",
            Some(false) => "#c0392b",
            None => "#7f8c8d",
        };
        let x1 = x_of(1.0);
        let x2 = x_of(r.ratio);
        let (x, w) = if x2 >= x1 {
            (x1, x2 - x1)
        } else {
            (x2, x1 - x2)
        };
        let better = match r.better {
            Better::Lower => "lower is better",
            Better::Higher => "higher is better",
        };
        let _ = writeln!(
            body,
            r#"<text x="16" y="{:.1}">{} vs {}</text><rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{} {}: {} ({}), target {}</title></rect><text x="{:.1}" y="{:.1}">{}</text>"#,
            y + 13.0,
            xml_escape(&r.case),
            xml_escape(&r.baseline),
            y + 2.0,
            w.max(1.0),
            bar_h - 4.0,
            xml_escape(&r.case),
            xml_escape(&r.metric),
            fmt_ratio(r.ratio),
            better,
            xml_escape(
                &r.target
                    .map(|t| t.describe())
                    .unwrap_or_else(|| "none".to_owned())
            ),
            label_w + chart_w + 8.0,
            y + 13.0,
            fmt_ratio(r.ratio),
        );
        y += bar_h;
    }
    let height = y + 30.0;
    let width = label_w + chart_w + 80.0;
    let mut axis = String::new();
    for p in -3..=3 {
        let ratio = 10f64.powi(p);
        let x = x_of(ratio);
        let _ = writeln!(
            axis,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#ccc"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}x</text>"##,
            height - 26.0,
            height - 10.0,
            if p < 0 {
                format!("{ratio}")
            } else {
                format!("{ratio:.0}")
            }
        );
    }
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">
<text x="8" y="20" font-size="15" font-weight="bold">ctx bench: ratio of each case to its baseline (log scale; 1x = baseline)</text>
{axis}{body}</svg>
"#
    )
}
