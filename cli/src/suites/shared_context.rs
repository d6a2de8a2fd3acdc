//! `shared_context_enter_idle`: entering an idle shared context (`context_forkpool::SharedContext`,
//! lock and objects in the fork pool's shared heap) from a **worker** process and leaving it, with
//! an empty closure, against the lock and unlock of an uncontended `parking_lot` mutex measured in
//! the same worker in the same run (interleaved trials). Beside it, `shared_context_enter_get`: the
//! same entry with a read of one object (`SharedCx::get`, which checks the handle's slot,
//! generation, type, borrow and poison), against the same mutex, so the cost of the object table is
//! shown apart from the entry's.
//!
//! The pool forks, so the measurement runs in a fresh single-threaded copy of this binary
//! (`context_forkpool::isolated`): its master creates the shared context and an object, and worker 0
//! opens the context from the reference it is given and measures the three loops with its own
//! [`Runner`]. The worker writes its medians into shared memory; the child prints them on one
//! line, which this process records.
//!
//! Not registered in `suites::ALL` on its own: the `xproc` suite calls [`run`] and adds the entry's
//! second baseline (`proxy_call_xproc`) from the returned figure.

use std::hint::black_box;
use std::time::Duration;

use anyhow::{Context as _, bail};
use context_forkpool::{
    JobContext, Pool, SharedBox, SharedContext, SharedContextRef, SharedHandle, isolated,
};

use crate::bench::{Better, Config, Runner, Target};

/// Environment variable telling the child whether this is a `--quick` run.
const QUICK_ENV: &str = "CTX_BENCH_SHARED_CONTEXT_QUICK";
/// Prefix of the child's result line on stdout: `<enter ns> <enter + get ns> <mutex ns>`.
const RESULT_PREFIX: &str = "SHARED_CONTEXT_NS ";
/// The entry's row.
pub(crate) const CASE: &str = "shared_context_enter_idle";
/// The row of the entry with an object read.
const CASE_GET: &str = "shared_context_enter_get";

/// A worker's job argument: the context, the object it reads, and
/// `[quick, enter ns, enter + get ns, mutex ns]` (the figures as `f64` bits).
type Job = ((SharedContextRef, SharedHandle<u64>), [u64; 4]);

/// Measures `shared_context_enter_idle` and `shared_context_enter_get` against
/// `parking_lot_mutex`, records their rows and returns the measured nanoseconds per entry (for the
/// `proxy_call_xproc` baseline row of the caller).
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
    let nums: Vec<f64> = line
        .split_whitespace()
        .map(str::parse::<f64>)
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!("malformed result line from the shared-context child: {line:?}")
        })?;
    let &[enter, get, base] = nums.as_slice() else {
        bail!(
            "the shared-context child reported {} figures, not 3: {line:?}",
            nums.len()
        );
    };
    r.row(
        CASE,
        "ns_per_op",
        enter,
        Better::Lower,
        "parking_lot_mutex",
        base,
        Some(Target::RatioAtMost(3.0)),
    );
    r.note(
        "a pool worker enters an idle shared context (process-shared lock in the pool's heap, one \
         CAS each way) and leaves it, with an empty closure, vs lock + unlock of an uncontended \
         parking_lot mutex in the same worker",
    );
    r.row(
        CASE_GET,
        "ns_per_op",
        get,
        Better::Lower,
        "parking_lot_mutex",
        base,
        None,
    );
    r.note(
        "the same entry with a read of one object inside (SharedCx::get: slot, generation, type, \
         borrow and poison checks) vs the same mutex, which guards one u64 that it reads",
    );
    Ok(enter)
}

/// The child's entry: runs single-threaded before `main`.
fn child_entry() -> i32 {
    match measure() {
        Ok([enter, get, base]) => match outln!("{RESULT_PREFIX}{enter} {get} {base}") {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("shared-context measurement: result not written: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("shared-context measurement: {e:#}");
            1
        }
    }
}

/// `[enter ns, enter + get ns, mutex ns]`, measured by worker 0 of a fresh pool.
fn measure() -> anyhow::Result<[f64; 3]> {
    let quick = std::env::var(QUICK_ENV).as_deref() == Ok("1");
    let mut pool = Pool::builder()
        .workers(1)
        .reserve(1 << 30)
        .initial_region(64 << 20)
        .build()?;
    let scx = SharedContext::create(pool.heap(), "bench")?;
    let obj = scx.enter(|s| s.alloc(7u64))??;
    let mut job = SharedBox::new(
        pool.heap(),
        ((scx.share(), obj), [u64::from(quick), 0, 0, 0]),
    )?;
    let status = pool.run_mut(0, in_worker, &mut job, Duration::from_secs(240))?;
    if status != 0 {
        bail!("the worker could not measure (status {status})");
    }
    let [_, enter, get, base] = job.1;
    Ok([enter, get, base].map(f64::from_bits))
}

/// Runs in worker 0: opens the context and measures the three loops, interleaved.
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
    let mut enter = |n: u64| -> anyhow::Result<()> {
        for _ in 0..n {
            black_box(scx.enter(|_| ()))?;
        }
        Ok(())
    };
    let mut get = |n: u64| -> anyhow::Result<()> {
        for _ in 0..n {
            black_box(scx.enter(|s| s.get(obj)))??;
        }
        Ok(())
    };
    let mut lock = |n: u64| -> anyhow::Result<()> {
        for _ in 0..n {
            let g = mutex.lock();
            black_box(*g);
            drop(g);
        }
        Ok(())
    };
    let med = match r.rotate_ns(&mut [
        (CASE, &mut enter),
        (CASE_GET, &mut get),
        ("parking_lot_mutex", &mut lock),
    ]) {
        Ok(med) => med,
        Err(e) => {
            // The child's stderr, which the parent shows when the child fails.
            eprintln!("shared-context worker: {e:#}");
            return 3;
        }
    };
    job.1[1] = med[0].to_bits();
    job.1[2] = med[1].to_bits();
    job.1[3] = med[2].to_bits();
    0
}
