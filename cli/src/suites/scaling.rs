//! `ctx bench scaling`: the design note's claim that shared objects make reference counting the
//! serial part. The same workload on 1 and on 2 threads, (a) every thread touching the same
//! `Arc`-counted objects, (b) every thread working on its own objects in its own context.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use context_core::{Context, Handle};

use crate::bench::{Better, Runner, Target};

/// One thread's context and the handle of its objects there.
type Owned = (Context, Handle<Vec<Arc<[u64; 4]>>>);

/// The objects one unit of work touches.
const OBJECTS: usize = 16;

/// One unit of work: take a reference to each object (refcount up), read it, let it go (refcount
/// down). This is what an interpreter does to every object it touches.
fn work(objects: &[Arc<[u64; 4]>]) -> u64 {
    let mut sum = 0u64;
    for o in objects {
        let r = Arc::clone(o);
        sum = sum.wrapping_add(black_box(r[1]));
    }
    sum
}

fn objects() -> Vec<Arc<[u64; 4]>> {
    (0..OBJECTS as u64)
        .map(|i| Arc::new([i, i + 1, i + 2, i + 3]))
        .collect()
}

/// Runs `per_thread` on `threads` threads started together; returns the wall time of the slowest.
fn timed(threads: usize, per_thread: &(dyn Fn(usize) + Sync)) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    per_thread(t);
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        for h in handles {
            let _ = h.join();
        }
        t0.elapsed()
    })
}

/// Speedup of `threads = 2` over `threads = 1` with the same work per thread:
/// (2 x ops / t2) / (ops / t1).
fn speedup(r: &mut Runner, per_thread: &(dyn Fn(usize) + Sync)) -> f64 {
    r.sample(|| {
        let t1 = timed(1, per_thread).as_secs_f64();
        let t2 = timed(2, per_thread).as_secs_f64();
        if t2 == 0.0 { 0.0 } else { 2.0 * t1 / t2 }
    })
}

pub fn run(r: &mut Runner) -> anyhow::Result<()> {
    let units: u64 = if r.quick() { 200_000 } else { 2_000_000 };

    r.step("shared_arc");
    let shared = objects();
    let shared_speedup = speedup(r, &|_| {
        let mut acc = 0u64;
        for _ in 0..units {
            acc = acc.wrapping_add(work(&shared));
        }
        black_box(acc);
    });

    r.step("isolated_contexts");
    // Each thread's objects live in its own context; the thread enters it for every unit of work.
    let contexts: Vec<Owned> = (0..2)
        .map(|i| {
            let c = Context::new(&format!("scaling-{i}"));
            let h = c.enter(|cx| cx.adopt(objects()))?;
            Ok((c, h?))
        })
        .collect::<anyhow::Result<_>>()?;
    let isolated_speedup = speedup(r, &|t| {
        let (ctx, h) = &contexts[t];
        let mut acc = 0u64;
        for _ in 0..units {
            if let Ok(Ok(v)) = ctx.enter(|cx| cx.with(*h, |objs| work(objs))) {
                acc = acc.wrapping_add(v);
            }
        }
        black_box(acc);
    });

    r.row(
        "isolated_contexts",
        "speedup",
        isolated_speedup,
        Better::Higher,
        "shared_arc",
        shared_speedup,
        Some(Target::ValueAtLeast(1.8)),
    );
    r.note(format!(
        "{units} units of work per thread, {OBJECTS} Arc clone+drop each"
    ));
    r.row(
        "shared_arc",
        "speedup",
        shared_speedup,
        Better::Higher,
        "linear_2_threads",
        2.0,
        Some(Target::RatioAtMost(0.8)),
    );
    r.note("the target here says the shared variant visibly fails to scale (<= 1.6x)");
    Ok(())
}
