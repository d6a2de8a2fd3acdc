//! Enters an idle shared context `N` times and reads one object each time: the loop of
//! `ctx bench xproc`'s `shared_context_enter_get` (its `shared_context_enter_idle` row is the same
//! entry with an empty closure), for a profiler and for quick timings.
//!
//! `cargo build --release -p context-forkpool --example shared_enter_loop`, then
//! `valgrind --tool=callgrind ./target/release/examples/shared_enter_loop 1000000` and again with
//! 2000000: the difference of the two totals over 1,000,000 is the instructions per entry. Without a
//! profiler it prints the nanoseconds per entry and per lock + unlock of a parking_lot mutex, for
//! `ROUNDS` rounds (the optional second argument, default 1), measured in the pool's master and,
//! alternately, in its worker 0 (as the benchmark does). With `EMPTY=1` in the environment the
//! closure is empty: the loop of `shared_context_enter_idle` (the figures are then per entry).

use std::hint::black_box;
use std::time::{Duration, Instant};

use context_forkpool::{
    JobContext, Pool, SharedBox, SharedContext, SharedContextRef, SharedHandle,
};

/// `n` entries and `n` mutex pairs; nanoseconds per entry and per pair.
fn measure(scx: &SharedContext, obj: SharedHandle<u64>, n: u64) -> (f64, f64) {
    let t = Instant::now();
    if std::env::var_os("EMPTY").is_some() {
        for _ in 0..n {
            black_box(scx.enter(|_| ()).ok());
        }
    } else {
        for _ in 0..n {
            black_box(scx.enter(|s| s.get(obj)).ok());
        }
    }
    let case = t.elapsed().as_secs_f64() * 1e9 / n as f64;
    let mutex = parking_lot::Mutex::new(7u64);
    let t = Instant::now();
    for _ in 0..n {
        let g = mutex.lock();
        black_box(*g);
        drop(g);
    }
    (case, t.elapsed().as_secs_f64() * 1e9 / n as f64)
}

/// The worker's job: the context, the object, `n`, and the two figures it writes back (f64 bits).
type Job = ((SharedContextRef, SharedHandle<u64>), [u64; 3]);

fn in_worker(jcx: &JobContext, job: &mut Job) -> u64 {
    let (at, obj) = job.0;
    let Ok(scx) = SharedContext::open(jcx.heap(), at) else {
        return 1;
    };
    let (case, base) = measure(&scx, obj, job.1[0]);
    job.1[1] = case.to_bits();
    job.1[2] = base.to_bits();
    0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |s| s.parse())?;
    let rounds: u32 = std::env::args().nth(2).map_or(Ok(1), |s| s.parse())?;
    let mut pool = Pool::builder()
        .workers(1)
        .reserve(1 << 30)
        .initial_region(64 << 20)
        .build()?;
    let scx = SharedContext::create(pool.heap(), "loop")?;
    let obj = scx.enter(|s| s.alloc(7u64))??;
    for _ in 0..rounds {
        let (case, base) = measure(&scx, obj, n);
        println!(
            "master: enter+get {case:.1} ns, mutex {base:.1} ns, ratio {:.2}",
            case / base
        );
        let mut job = SharedBox::new(pool.heap(), ((scx.share(), obj), [n, 0, 0]))?;
        let status = pool.run_mut(0, in_worker, &mut job, Duration::from_secs(120))?;
        if status != 0 {
            return Err(format!("the worker could not measure (status {status})").into());
        }
        let (case, base) = (f64::from_bits(job.1[1]), f64::from_bits(job.1[2]));
        println!(
            "worker: enter+get {case:.1} ns, mutex {base:.1} ns, ratio {:.2}",
            case / base
        );
    }
    Ok(())
}
