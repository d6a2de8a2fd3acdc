//! `shared_context_enter_idle`: entering an idle shared context (`context_forkpool::SharedContext`,
//! lock and objects in the fork pool's shared heap) from a **worker** process and leaving it, with a
//! trivial closure (a read of one object, `SharedCx::get`), against the lock and unlock of an
//! uncontended `parking_lot` mutex measured in the same worker in the same run (interleaved trials).
//!
//! The pool forks, so the measurement runs in a fresh single-threaded copy of this binary
//! (`context_forkpool::isolated`): its master creates the shared context and an object, and worker 0
//! opens the context from the reference it is given and measures both loops with its own
//! [`Runner`]. The worker writes its two medians into shared memory; the child prints them on one
//! line, which this process records.
//!
//! Not registered in `suites::ALL` on its own: the `xproc` suite calls [`run`] and adds its second
//! baseline (`proxy_call_xproc`) from the returned figure.

use std::hint::black_box;
use std::time::Duration;

use anyhow::{Context as _, bail};
use context_forkpool::{
    JobContext, Pool, SharedBox, SharedContext, SharedContextRef, SharedHandle, isolated,
};

use crate::bench::{Better, Config, Runner, Target};

/// Environment variable telling the child whether this is a `--quick` run.
const QUICK_ENV: &str = "CTX_BENCH_SHARED_CONTEXT_QUICK";
/// Prefix of the child's result line on stdout: `<case ns> <baseline ns>`.
const RESULT_PREFIX: &str = "SHARED_CONTEXT_NS ";
/// The row's name.
pub(crate) const CASE: &str = "shared_context_enter_idle";

/// A worker's job argument: the context, the object it reads, and `[quick, case ns, baseline ns]`
/// (the figures as `f64` bits).
type Job = ((SharedContextRef, SharedHandle<u64>), [u64; 3]);

/// Measures `shared_context_enter_idle` against `parking_lot_mutex`, records the row and returns
/// the measured nanoseconds per entry (for the `proxy_call_xproc` baseline row of the caller).
///
/// # Errors
/// The child could not be started, failed, timed out or reported nothing usable.
pub(crate) fn run(r: &mut Runner) -> anyhow::Result<f64> {
    r.step("shared_context_enter_idle (a pool worker, in a single-threaded re-executed child)");
    let mut cmd = isolated::command(child_entry).context("preparing the isolated child")?;
    cmd.env(QUICK_ENV, if r.quick() { "1" } else { "0" });
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = isolated::run_command(cmd, Duration::from_secs(300))
        .context("running the shared-context measurement")?;
    if !out.success() {
        bail!(
            "shared-context child failed (code {:?}, signal {:?}):\n{}",
            out.code,
            out.signal,
            out.stderr
        );
    }
    let Some(line) = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_PREFIX))
    else {
        bail!(
            "the shared-context child reported nothing; stderr:\n{}",
            out.stderr
        );
    };
    let mut nums = line.split_whitespace().map(str::parse::<f64>);
    let (Some(Ok(case)), Some(Ok(base))) = (nums.next(), nums.next()) else {
        bail!("malformed result line from the shared-context child: {line:?}");
    };
    r.row(
        CASE,
        "ns_per_op",
        case,
        Better::Lower,
        "parking_lot_mutex",
        base,
        Some(Target::RatioAtMost(3.0)),
    );
    r.note(
        "a pool worker enters an idle shared context (process-shared lock in the pool's heap, one \
         CAS each way) and reads one object (SharedCx::get), vs lock + unlock of an \
         uncontended parking_lot mutex in the same worker",
    );
    Ok(case)
}

/// The child's entry: runs single-threaded before `main`.
fn child_entry() -> i32 {
    match measure() {
        Ok((case, base)) => {
            println!("{RESULT_PREFIX}{case} {base}");
            0
        }
        Err(e) => {
            eprintln!("shared-context measurement: {e:#}");
            1
        }
    }
}

fn measure() -> anyhow::Result<(f64, f64)> {
    let quick = std::env::var(QUICK_ENV).as_deref() == Ok("1");
    let mut pool = Pool::builder()
        .workers(1)
        .reserve(1 << 30)
        .initial_region(64 << 20)
        .build()?;
    let scx = SharedContext::create(pool.heap(), "bench")?;
    let obj = scx.enter(|s| s.alloc(7u64))??;
    let mut job = SharedBox::new(pool.heap(), ((scx.share(), obj), [u64::from(quick), 0, 0]))?;
    let status = pool.run_mut(0, in_worker, &mut job, Duration::from_secs(240))?;
    if status != 0 {
        bail!("the worker could not measure (status {status})");
    }
    let [_, case, base] = job.1;
    Ok((f64::from_bits(case), f64::from_bits(base)))
}

/// Runs in worker 0: opens the context and measures both loops, interleaved.
fn in_worker(jcx: &JobContext, job: &mut Job) -> u64 {
    let (at, obj) = job.0;
    let Ok(scx) = SharedContext::open(jcx.heap(), at) else {
        return 1;
    };
    // Warm up: the first entry registers this process with the lock.
    if scx.enter(|s| s.get(obj)).ok().and_then(Result::ok) != Some(7) {
        return 2;
    }
    let mutex = parking_lot::Mutex::new(7u64);
    let mut r = Runner::new(
        Config {
            quick: job.1[0] == 1,
        },
        Box::new(|_: &str| {}),
    );
    let (case, base) = r.compare_ns(
        |n| {
            for _ in 0..n {
                black_box(scx.enter(|s| s.get(obj)).ok());
            }
        },
        |n| {
            for _ in 0..n {
                let g = mutex.lock();
                black_box(*g);
                drop(g);
            }
        },
    );
    job.1[1] = case.to_bits();
    job.1[2] = base.to_bits();
    0
}
