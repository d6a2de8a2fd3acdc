//! `ctx`: the command-line face of the workspace. Every command composes library calls, and every
//! figure it prints comes from a run.
#![forbid(unsafe_code)]

mod bench;
mod doctor;
#[macro_use]
mod out;
mod shm;
mod suites;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::bench::{Config, Runner, report};

/// Independent execution contexts: benchmarks and shared-memory tools.
#[derive(Debug, Parser)]
#[command(name = "ctx", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run benchmark suites and print each case's ratio to its baseline measured in the same run.
    #[command(after_help = "\
Examples:
  ctx bench                       every suite, stable medians
  ctx bench --quick               every suite in well under a minute
  ctx bench handoff scaling       two suites
  ctx bench --quick --json -      JSON on stdout (the table goes to stderr)
  ctx bench --json out.json --svg out.svg
  ctx bench --list                the suites and what they measure")]
    Bench(BenchArgs),
    /// Check what this machine offers the library (memfd and seals, MAP_FIXED_NOREPLACE, futex,
    /// pidfd, /dev/shm, overcommit and map-count limits) and say plainly what will not work.
    #[command(after_help = "\
Exit status: 0 when every required feature works (warnings allowed), 1 when one fails.

Example:
  ctx doctor")]
    Doctor,
    /// List, inspect and clean up the named shared-memory segments this library created.
    #[command(subcommand)]
    Shm(ShmCommand),
}

#[derive(Debug, Subcommand)]
enum ShmCommand {
    /// List named segments: creator pid, its state (alive, dead, stale, unknown), size, age.
    #[command(
        after_help = "Examples:\n  ctx shm ls\n  ctx shm ls --json | jq '.[] | select(.creator_state == \"dead\" or .creator_state == \"stale\")'"
    )]
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove the records of segments whose creator is dead or no longer holds them (never one a
    /// live process holds).
    #[command(after_help = "Examples:\n  ctx shm gc --dry-run\n  ctx shm gc")]
    Gc {
        /// Show what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show one segment's record and header.
    #[command(
        after_help = "Example:\n  ctx shm inspect ctxshm-frames-0123456789abcdef0123456789abcdef"
    )]
    Inspect {
        /// The segment's name, as `ctx shm ls` prints it.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Suites to run (default: all). See --list.
    suites: Vec<String>,
    /// Short trials: the whole set in well under a minute (figures are noisier).
    #[arg(long)]
    quick: bool,
    /// Write the rows as JSON to PATH ("-" for stdout; the table then goes to stderr).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write an SVG bar chart of the ratios to PATH.
    #[arg(long, value_name = "PATH")]
    svg: Option<PathBuf>,
    /// Write the rows as a Markdown table to PATH (as pasted into the README).
    #[arg(long, value_name = "PATH")]
    markdown: Option<PathBuf>,
    /// List the suites and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench_cmd(&args),
        Command::Shm(ShmCommand::Ls { json }) => shm::ls(json).map(|()| ExitCode::SUCCESS),
        Command::Shm(ShmCommand::Gc { dry_run }) => shm::gc(dry_run),
        Command::Shm(ShmCommand::Inspect { name }) => {
            shm::inspect(&name).map(|()| ExitCode::SUCCESS)
        }
        Command::Doctor => {
            let checks = doctor::run_checks();
            out!("{}", doctor::render(&checks))
                .map_err(anyhow::Error::from)
                .map(|()| {
                    if checks.iter().any(|c| c.status == doctor::Status::Fail) {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                })
        }
    };
    match result {
        Err(e) if out::is_broken_pipe(&e) => ExitCode::from(out::BROKEN_PIPE_STATUS),
        Ok(code) => code,
        Err(e) => {
            eprintln!("ctx: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, joined by ": " as anyhow's `{:#}` does, but leaving out a cause
/// whose text the message before it already ends with (errors that print their source in their
/// own message and also return it as `source()`, as `std::io` wrappers often do).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn bench_cmd(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if args.list {
        for s in suites::ALL {
            outln!("{:<10} {}", s.name, s.about)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let selected: Vec<&suites::Suite> = if args.suites.is_empty() {
        suites::ALL.iter().collect()
    } else {
        let mut v = Vec::new();
        for name in &args.suites {
            match suites::ALL.iter().find(|s| s.name == name) {
                Some(s) => v.push(s),
                None => {
                    let known: Vec<&str> = suites::ALL.iter().map(|s| s.name).collect();
                    bail!("unknown suite {name:?}; known suites: {}", known.join(", "));
                }
            }
        }
        v
    };

    let json_to_stdout = args.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    let interactive = std::io::stderr().is_terminal();
    let bar = if interactive {
        let pb = indicatif::ProgressBar::new(selected.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>10} [{pos}/{len}] {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let progress: Box<dyn FnMut(&str)> = match &bar {
        Some(pb) => {
            let pb = pb.clone();
            Box::new(move |what: &str| pb.set_message(what.to_owned()))
        }
        None => Box::new(|_: &str| {}),
    };
    let mut runner = Runner::new(Config { quick: args.quick }, progress);
    let mut failures = Vec::new();
    for s in &selected {
        if let Some(pb) = &bar {
            pb.set_prefix(s.name);
        } else {
            eprintln!("ctx bench: running suite {}", s.name);
        }
        runner.set_suite(s.name);
        if let Err(e) = (s.run)(&mut runner) {
            failures.push(format!("{}: {e:#}", s.name));
        }
        if let Some(pb) = &bar {
            pb.inc(1);
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let rows = runner.into_rows();

    let table = report::table(&rows);
    if json_to_stdout {
        eprint!("{table}");
    } else {
        out!("{table}")?;
    }
    if let Some(path) = &args.json {
        let config = Config { quick: args.quick };
        let doc = report::Document {
            format: 3,
            quick: args.quick,
            trials: config.trials(),
            trial_ms: u64::try_from(config.trial_time().as_millis()).unwrap_or(u64::MAX),
            finished_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ctx_version: env!("CARGO_PKG_VERSION"),
            machine: report::Machine::detect(),
            suites: selected.iter().map(|s| s.name).collect(),
            failed: &failures,
            rows: &rows,
        };
        let text = serde_json::to_string_pretty(&doc)?;
        if json_to_stdout {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}")?;
        } else {
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report::svg(&rows))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, report::markdown(&rows))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let missed = rows.iter().filter(|r| r.target_met == Some(false)).count();
    if missed > 0 {
        eprintln!(
            "ctx bench: {missed} of {} rows miss their target (marked NO)",
            rows.len()
        );
    }
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            eprintln!("ctx bench: suite failed: {f}");
        }
        Ok(ExitCode::from(2))
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[test]
    fn a_cause_the_message_already_shows_is_printed_once() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "read name record: {}", self.0)
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::from_raw_os_error(libc::ELOOP);
        let text = io.to_string();
        let e = anyhow::Error::new(Wrapper(io)).context("no readable segment named \"x\"");
        assert_eq!(
            error_chain(&e),
            format!("no readable segment named \"x\": read name record: {text}")
        );
        // Causes that add something are all kept.
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
