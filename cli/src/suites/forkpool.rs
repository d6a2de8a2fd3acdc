//! `ctx bench forkpool`: the fixed-address worker pool of `context-forkpool`.
//!
//! The pool forks, and forking is only safe from a single-threaded process; `ctx` may have a
//! progress thread. So the whole suite runs in a fresh single-threaded copy of this binary started
//! with `context_forkpool::isolated` (a start-up hook runs [`child_entry`] before `main`); the child
//! measures with its own [`Runner`] and prints one JSON object per row, which this process records.
//!
//! Cases (each beside a baseline measured in the same run, in the same child process):
//! - `alloc_free_64b`: the shared allocator vs glibc malloc/free (`Box`), ns per pair;
//! - `parallel_sum_1gib`: summing a shared `u64` array, 2 workers vs 1 worker, GB/s (ratio = speedup);
//!   `--quick` sums 256 MiB instead (said in the note);
//! - `pointer_chase_xproc`: a worker walks a list built by the master vs the master walking it;
//! - `release_rss`: resident bytes of each process before and after returning a region, for both
//!   methods (close + remap, hole punching);
//! - `pool_start`: starting a 2-worker pool over a 1 GiB region until both workers said hello vs
//!   two bare forks until both children said hello (their exit and reaping untimed), and
//!   `pool_start_and_stop`: start plus shutdown vs two bare fork + exit + waitpid.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use context_forkpool::{
    JobContext, ListHead, Pool, SharedList, SharedVec, bare_fork_waitpid, bare_forks_until_hello,
    isolated, resident_bytes,
};
use serde::{Deserialize, Serialize};

use crate::bench::{Better, Config, Runner, Target};

/// Environment variable telling the child whether this is a `--quick` run.
const QUICK_ENV: &str = "CTX_BENCH_FORKPOOL_QUICK";
/// Prefix of the child's result lines on stdout.
const ROW_PREFIX: &str = "FORKPOOL_ROW ";
const T: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

/// One row as the child reports it.
#[derive(Debug, Serialize, Deserialize)]
struct ChildRow {
    case: String,
    metric: String,
    value: f64,
    higher_better: bool,
    baseline: String,
    baseline_value: f64,
    note: String,
}

/// Runs the suite in an isolated child and records its rows.
pub fn run(r: &mut Runner) -> anyhow::Result<()> {
    r.step("forkpool (in a single-threaded re-executed child)");
    let mut cmd = isolated::command(child_entry).context("preparing the isolated child")?;
    cmd.env(QUICK_ENV, if r.quick() { "1" } else { "0" });
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let timeout = if r.quick() {
        Duration::from_secs(240)
    } else {
        Duration::from_secs(900)
    };
    let out = isolated::run_command(cmd, timeout).context("running the forkpool suite")?;
    if !out.success() {
        bail!(
            "forkpool child failed (code {:?}, signal {:?}):\n{}",
            out.code,
            out.signal,
            out.stderr
        );
    }
    let mut n = 0;
    for line in out.stdout.lines() {
        let Some(json) = line.strip_prefix(ROW_PREFIX) else {
            continue;
        };
        let row: ChildRow = serde_json::from_str(json).context("malformed row from the child")?;
        let target = match row.case.as_str() {
            "alloc_free_64b" => Some(Target::RatioAtMost(2.0)),
            "parallel_sum_1gib" => Some(Target::RatioAtLeast(1.7)),
            "pointer_chase_xproc" => Some(Target::RatioAtMost(1.2)),
            "pool_start" => Some(Target::RatioAtMost(3.0)),
            _ => None,
        };
        let better = if row.higher_better {
            Better::Higher
        } else {
            Better::Lower
        };
        r.row(
            &row.case,
            &row.metric,
            row.value,
            better,
            &row.baseline,
            row.baseline_value,
            target,
        );
        r.note(row.note);
        n += 1;
    }
    if n == 0 {
        bail!(
            "the forkpool child reported no rows; stderr:\n{}",
            out.stderr
        );
    }
    Ok(())
}

/// Set when a row could not be written to stdout: the child then fails, so the parent does not
/// report a partial suite as complete.
static EMIT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn emit(row: &ChildRow) {
    let written = serde_json::to_string(row)
        .map_err(anyhow::Error::from)
        .and_then(|s| outln!("{ROW_PREFIX}{s}").map_err(anyhow::Error::from));
    if let Err(e) = written {
        eprintln!("forkpool suite: row {:?} not written: {e:#}", row.case);
        EMIT_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)] // mirrors Runner::row
fn row(
    case: &str,
    metric: &str,
    value: f64,
    higher: bool,
    baseline: &str,
    baseline_value: f64,
    note: String,
) {
    emit(&ChildRow {
        case: case.into(),
        metric: metric.into(),
        value,
        higher_better: higher,
        baseline: baseline.into(),
        baseline_value,
        note,
    });
}

/// The child's entry: runs single-threaded before `main` (see the module docs).
fn child_entry() -> i32 {
    match measure() {
        Ok(()) if !EMIT_FAILED.load(std::sync::atomic::Ordering::Relaxed) => 0,
        Ok(()) => 1,
        Err(e) => {
            eprintln!("forkpool suite: {e:#}");
            1
        }
    }
}

fn measure() -> anyhow::Result<()> {
    let quick = std::env::var(QUICK_ENV).as_deref() == Ok("1");
    let mut r = Runner::new(Config { quick }, Box::new(|_: &str| {}));
    alloc_free(&mut r)?;
    parallel_sum(&mut r, quick)?;
    pointer_chase(&mut r, quick)?;
    release_rss(quick)?;
    pool_start(&mut r)?;
    // Last: it starts threads, and no pool may fork after that.
    threads_reference(&mut r, quick);
    Ok(())
}

/// The same sum with 1 and 2 threads of one process over private memory: how far this machine
/// scales this memory-bound loop at all, independent of the pool.
fn threads_reference(r: &mut Runner, quick: bool) {
    let bytes = if quick { 256 * MIB } else { 1024 * MIB };
    let v = vec![1u64; bytes / 8];
    let sum = |s: &[u64]| s.iter().fold(0u64, |a, x| a.wrapping_add(*x));
    let _ = black_box(sum(&v));
    let mut t1s = Vec::new();
    let mut t2s = Vec::new();
    for _ in 0..r.config().trials() {
        let t0 = Instant::now();
        black_box(sum(&v));
        t1s.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let (a, b) = v.split_at(v.len() / 2);
        let total = std::thread::scope(|s| {
            let h = s.spawn(|| sum(a));
            let x = sum(b);
            h.join().unwrap_or(0).wrapping_add(x)
        });
        black_box(total);
        t2s.push(t0.elapsed().as_secs_f64());
    }
    let gb = bytes as f64 / 1e9;
    row(
        "parallel_sum_threads_reference",
        "gb_per_s",
        gb / crate::bench::median(&mut t2s),
        true,
        "1_thread",
        gb / crate::bench::median(&mut t1s),
        format!(
            "reference, no pool: the same sum over {} MiB of private memory with 2 threads vs 1 \
             (thread start included); the machine's own scaling for this memory-bound loop",
            bytes / MIB
        ),
    );
}

fn alloc_free(r: &mut Runner) -> anyhow::Result<()> {
    let pool = Pool::builder()
        .workers(0)
        .reserve(1 << 30)
        .initial_region(64 * MIB)
        .build()?;
    let heap = pool.heap();
    let layout = std::alloc::Layout::from_size_align(64, 8)?;
    let mut failed = false;
    let (case, base) = r.compare_ns(
        |n| {
            for _ in 0..n {
                failed |= heap.alloc_free_round_trip(black_box(layout)).is_err();
            }
        },
        |n| {
            for _ in 0..n {
                // 64 bytes, 8-aligned, not written: the same request the case makes.
                drop(black_box(Vec::<u64>::with_capacity(8)));
            }
        },
    );
    if failed {
        bail!("alloc_free_64b: an allocation or free failed");
    }
    row(
        "alloc_free_64b",
        "ns_per_op",
        case,
        false,
        "glibc_malloc_free",
        base,
        "one alloc + free of 64 B, same thread; lock-free bitmap allocator in a memfd region"
            .into(),
    );
    Ok(())
}

fn sum_part(cx: &JobContext, v: &[u64]) -> u64 {
    let n = v.len();
    let (lo, hi) = (
        n * cx.index() / cx.workers(),
        n * (cx.index() + 1) / cx.workers(),
    );
    v[lo..hi].iter().fold(0u64, |a, x| a.wrapping_add(*x))
}

fn sum_all(_: &JobContext, v: &[u64]) -> u64 {
    v.iter().fold(0u64, |a, x| a.wrapping_add(*x))
}

fn parallel_sum(r: &mut Runner, quick: bool) -> anyhow::Result<()> {
    let bytes = if quick { 256 * MIB } else { 1024 * MIB };
    let words = bytes / 8;
    let mut pool = Pool::builder()
        .workers(2)
        .reserve(4 << 30)
        .initial_region(bytes + 256 * MIB)
        .control_timeout(T)
        .build()?;
    let v = SharedVec::from_elem(pool.heap(), 1u64, words)?;
    // Warm up: every worker maps every page once, so neither side pays first-touch faults.
    for res in pool.broadcast(sum_all, &v, T) {
        if res? != words as u64 {
            bail!("parallel_sum: wrong warm-up sum");
        }
    }
    let mut err = None;
    let mut t1s = Vec::new();
    let mut t2s = Vec::new();
    for _ in 0..r.config().trials() {
        let t0 = Instant::now();
        match pool.run(0, sum_all, &v, T) {
            Ok(s) if s == words as u64 => {}
            other => err = Some(format!("1 worker: {other:?}")),
        }
        t1s.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let total: Result<u64, _> = pool.broadcast(sum_part, &v, T).into_iter().sum();
        match total {
            Ok(s) if s == words as u64 => {}
            other => err = Some(format!("2 workers: {other:?}")),
        }
        t2s.push(t0.elapsed().as_secs_f64());
    }
    if let Some(e) = err {
        bail!("parallel_sum: {e}");
    }
    let t1 = crate::bench::median(&mut t1s);
    let t2 = crate::bench::median(&mut t2s);
    let gb = bytes as f64 / 1e9;
    row(
        "parallel_sum_1gib",
        "gb_per_s",
        gb / t2,
        true,
        "1_worker",
        gb / t1,
        format!(
            "{}; ratio = speedup of 2 workers over 1 (job dispatch included); memory-bound: 1 worker \
             already streams {:.1} GB/s",
            if quick {
                "--quick: 256 MiB array instead of 1 GiB"
            } else {
                "1 GiB u64 array in a memfd region"
            },
            gb / t1
        ),
    );
    Ok(())
}

fn walk(_: &JobContext, l: &ListHead<u64>) -> u64 {
    l.iter().fold(0u64, |a, v| a.wrapping_add(*v))
}

fn pointer_chase(r: &mut Runner, quick: bool) -> anyhow::Result<()> {
    // The same list in --quick runs: the case is defined by its size (the job round trip is a fixed
    // cost, so a shorter walk would be a different ratio, not a noisier one).
    let _ = quick;
    let nodes: u64 = 1_000_000;
    let mut pool = Pool::builder()
        .workers(1)
        .reserve(1 << 30)
        .initial_region(256 * MIB)
        .control_timeout(T)
        .build()?;
    let mut list = SharedList::new(pool.heap())?;
    for v in 0..nodes {
        list.push_front(v)?;
    }
    let expect = nodes * (nodes - 1) / 2;
    // Warm up the worker's page tables.
    if pool.run(0, walk, &list, T)? != expect {
        bail!("pointer_chase: wrong sum");
    }
    let bad = std::cell::Cell::new(false);
    let (case, base) = r.compare_ns(
        |n| {
            for _ in 0..n {
                if pool.run(0, walk, &list, T).ok() != Some(expect) {
                    bad.set(true);
                }
            }
        },
        |n| {
            for _ in 0..n {
                if walk_master(black_box(&list)) != expect {
                    bad.set(true);
                }
            }
        },
    );
    if bad.get() {
        bail!("pointer_chase: a walk returned a wrong sum");
    }
    row(
        "pointer_chase_xproc",
        "ns_per_op",
        case,
        false,
        "same_walk_in_master",
        base,
        format!(
            "one walk of a {nodes}-node list built by the master; the worker's includes the job round trip"
        ),
    );
    Ok(())
}

fn walk_master(l: &ListHead<u64>) -> u64 {
    l.iter().fold(0u64, |a, v| a.wrapping_add(*v))
}

/// A worker's resident bytes; 0 if it could not read them (a live process is never 0 bytes
/// resident, so [`all_rss`] refuses a 0 rather than report a perfect release).
fn rss_job(_: &JobContext) -> u64 {
    resident_bytes().unwrap_or(0)
}

fn touch(_: &JobContext, v: &[u64]) -> u64 {
    v.iter().step_by(512).fold(0u64, |a, x| a.wrapping_add(*x))
}

fn all_rss(pool: &mut Pool) -> anyhow::Result<Vec<u64>> {
    let mut v = vec![resident_bytes()?];
    for res in pool.broadcast_fn(rss_job, T) {
        let bytes = res?;
        if bytes == 0 {
            bail!("a worker could not read its resident set size (/proc/self/statm)");
        }
        v.push(bytes);
    }
    Ok(v)
}

fn release_rss(quick: bool) -> anyhow::Result<()> {
    let region = if quick { 64 * MIB } else { 256 * MIB };
    let mut pool = Pool::builder()
        .workers(2)
        .reserve(2 << 30)
        .initial_region(32 * MIB)
        .control_timeout(T)
        .build()?;
    // Fill the first region so the measured blocks land in the grown ones.
    let free = pool.heap().stats().free_chunks as usize * pool.heap().geometry().chunk_size();
    let _filler = SharedVec::<u8>::with_capacity(pool.heap(), free)?;
    for method in ["close_remap", "punch_hole"] {
        let idx = pool.grow(region)?;
        let v = SharedVec::from_elem(pool.heap(), 1u64, (region - 2 * MIB) / 8)?;
        for res in pool.broadcast(touch, &v, T) {
            res?;
        }
        let before = all_rss(&mut pool)?;
        drop(v);
        if method == "close_remap" {
            pool.release_region(idx)?;
        } else {
            pool.punch_free();
        }
        let after = all_rss(&mut pool)?;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let who = if i == 0 {
                "master".to_owned()
            } else {
                format!("worker{}", i - 1)
            };
            row(
                &format!("release_rss_{method}_{who}"),
                "bytes",
                *a as f64,
                false,
                "rss_before_release",
                *b as f64,
                format!(
                    "{} MiB region written by the master and read by both workers",
                    region / MIB
                ),
            );
        }
    }
    Ok(())
}

fn pool_start(r: &mut Runner) -> anyhow::Result<()> {
    // Interleaved trials; more than the other cases because one trial is short and noisy.
    let trials = r.config().trials() * 3;
    let mut starts = Vec::new();
    let mut lives = Vec::new();
    let mut bs = Vec::new();
    let mut hellos = Vec::new();
    for _ in 0..trials {
        let t0 = Instant::now();
        let pool = Pool::builder()
            .workers(2)
            .reserve(2 << 30)
            .initial_region(1 << 30)
            .build()?;
        let started = t0.elapsed();
        drop(black_box(pool));
        starts.push(started.as_nanos() as f64);
        lives.push(t0.elapsed().as_nanos() as f64);
        bs.push(bare_fork_waitpid(2)?.as_nanos() as f64);
        hellos.push(bare_forks_until_hello(2)?.as_nanos() as f64);
    }
    let b = crate::bench::median(&mut bs);
    row(
        "pool_start",
        "ns_per_op",
        crate::bench::median(&mut starts),
        false,
        "two_bare_forks_until_hello",
        crate::bench::median(&mut hellos),
        "reserve 2 GiB + memfd 1 GiB + map + allocator init + fork 2 workers until both said hello"
            .into(),
    );
    row(
        "pool_start_and_stop",
        "ns_per_op",
        crate::bench::median(&mut lives),
        false,
        "two_bare_fork_waitpid",
        b,
        "as pool_start, plus shutdown: workers told to exit, reaped, regions unmapped (no target)"
            .into(),
    );
    Ok(())
}
