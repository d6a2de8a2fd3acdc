//! Runs the real `ctx` binary as a user would.

use assert_cmd::Command;
use predicates::prelude::*;

fn ctx() -> Command {
    Command::cargo_bin("ctx").expect("the ctx binary is built for tests")
}

#[test]
fn doctor_passes_on_this_machine() {
    ctx()
        .arg("doctor")
        .assert()
        .success()
        .stdout(predicate::str::contains("memfd + seals"))
        .stdout(predicate::str::contains("0 failure(s)"));
}

#[test]
fn bench_quick_json_to_stdout_has_every_suite_and_valid_rows() {
    let out = ctx()
        .args(["bench", "--quick", "--json", "-"])
        .timeout(std::time::Duration::from_secs(600))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctx bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let rows = doc["rows"].as_array().expect("rows array");
    assert_eq!(doc["format"], 3);
    assert_eq!(doc["quick"], true);
    assert!(
        doc["trials"].as_u64().is_some_and(|t| t >= 5),
        "{}",
        doc["trials"]
    );
    assert!(doc["trial_ms"].as_u64().is_some_and(|t| t > 0));
    assert!(
        doc["finished_unix_s"]
            .as_u64()
            .is_some_and(|t| t > 1_700_000_000)
    );
    assert!(doc["ctx_version"].is_string());
    assert_eq!(
        doc["failed"].as_array().map(Vec::len),
        Some(0),
        "{}",
        doc["failed"]
    );
    let listed = ctx().args(["bench", "--list"]).output().unwrap();
    let suites: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(!suites.is_empty());
    for suite in &suites {
        assert!(
            rows.iter().any(|r| r["suite"] == suite.as_str()),
            "suite {suite} produced no rows"
        );
    }
    for r in rows {
        for field in ["suite", "case", "metric", "baseline", "better"] {
            assert!(r[field].is_string(), "row field {field} missing: {r}");
        }
        for field in ["value", "baseline_value", "ratio"] {
            assert!(r[field].is_number(), "row field {field} missing: {r}");
        }
        assert!(r["better"] == "lower" || r["better"] == "higher");
        // The paired-ratio spread, where present, is an ordered pair of positive ratios.
        if let Some(range) = r["ratio_range"].as_array() {
            let (lo, hi) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
            assert!(0.0 < lo && lo <= hi, "bad ratio_range in {r}");
        } else {
            assert!(
                r["ratio_range"].is_null(),
                "ratio_range neither pair nor null: {r}"
            );
        }
        // The per-trial figures: one of each per trial, or none at all; the spread comes from
        // them, so a row with a spread has them.
        let samples = |f: &str| -> Vec<f64> {
            r[f].as_array()
                .unwrap_or_else(|| panic!("{f} is not an array: {r}"))
                .iter()
                .map(|v| v.as_f64().expect("a number"))
                .collect()
        };
        let (vs, bs) = (samples("value_samples"), samples("baseline_samples"));
        assert_eq!(vs.len(), bs.len(), "unpaired samples in {r}");
        if r["ratio_range"].is_array() {
            assert!(!vs.is_empty(), "a spread without its samples: {r}");
        }
        if !vs.is_empty() {
            assert!(vs.len() as u64 >= doc["trials"].as_u64().unwrap(), "{r}");
            assert!(
                vs.iter().chain(&bs).all(|x| x.is_finite() && *x >= 0.0),
                "{r}"
            );
        }
    }
    // Rows from an in-process comparison carry it.
    assert!(
        rows.iter()
            .any(|r| r["case"] == "call_small_idle" && r["ratio_range"].is_array()),
        "no ratio_range on call_small_idle"
    );
    // The human table went to stderr, so stdout stays machine-readable.
    assert!(String::from_utf8_lossy(&out.stderr).contains("== handoff"));
}

#[test]
fn unknown_suite_is_a_clear_error() {
    ctx()
        .args(["bench", "no-such-suite"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("unknown suite \"no-such-suite\""))
        .stderr(predicate::str::contains("known suites: handoff"));
}

#[test]
fn help_has_examples() {
    ctx()
        .args(["bench", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Examples:"));
    ctx()
        .args(["doctor", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Example:"));
}

#[test]
fn svg_and_markdown_outputs() {
    let dir = std::env::temp_dir().join(format!("ctx-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("r.svg");
    let md = dir.join("r.md");
    ctx()
        .args(["bench", "--quick", "handoff", "--svg"])
        .arg(&svg)
        .arg("--markdown")
        .arg(&md)
        .timeout(std::time::Duration::from_secs(300))
        .assert()
        .success();
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.contains("enter_exit_idle"));
    // Well-formed enough for a browser: every `<` opens a tag (targets such as "<= 1.5x" are
    // escaped), and the document closes.
    for (i, _) in svg_text.match_indices('<') {
        let next = svg_text[i + 1..].chars().next().unwrap_or(' ');
        assert!(
            next.is_ascii_alphabetic() || next == '/',
            "unescaped '<' at byte {i}"
        );
    }
    assert!(svg_text.trim_end().ends_with("</svg>"));
    let md_text = std::fs::read_to_string(&md).unwrap();
    assert!(md_text.contains("| handoff | enter_exit_idle |"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `ctx args` with stdout a pipe whose read end is already closed, as in `ctx shm ls | head -0`.
fn run_into_closed_pipe(args: &[&str]) -> std::process::Output {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("ctx"));
    cmd.args(args)
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("ctx runs");
    // The closed pipe must not leave the child waiting; the deadline turns a hang into a failure.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("ctx {args:?} did not exit within 60 s with stdout a closed pipe");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.wait_with_output().expect("ctx output")
}

#[test]
fn closed_stdout_pipe_ends_quietly_like_sigpipe() {
    for args in [
        &["bench", "--list"][..],
        &["shm", "ls"],
        &["shm", "ls", "--json"],
        &["shm", "gc", "--dry-run"],
        &["doctor"],
    ] {
        let out = run_into_closed_pipe(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(141),
            "ctx {args:?} into a closed pipe: {:?}, stderr: {stderr}",
            out.status
        );
        assert!(
            !stderr.contains("panicked"),
            "ctx {args:?} panicked: {stderr}"
        );
        assert!(stderr.is_empty(), "ctx {args:?} wrote to stderr: {stderr}");
    }
}
