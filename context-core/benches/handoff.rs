//! Criterion benches for developers: the same cases as `ctx bench handoff`, each beside its
//! baseline in one group so the report shows them side by side.

#![allow(missing_docs)] // criterion_group! generates an undocumented public fn

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

use context_core::Context;
use criterion::{Criterion, criterion_group, criterion_main};

fn idle(c: &mut Criterion) {
    let a = Context::new("a");
    let b = Context::new("b");
    let mutex = parking_lot::Mutex::new(0u64);
    let mut g = c.benchmark_group("idle");
    g.bench_function("parking_lot_mutex", |bench| {
        bench.iter(|| drop(black_box(mutex.lock())))
    });
    g.bench_function("enter_exit_idle", |bench| {
        bench.iter(|| black_box(b.enter(|_| ())))
    });
    g.bench_function("handoff_idle_roundtrip", |bench| {
        a.enter(|_| bench.iter(|| black_box(b.enter(|_| ()))))
            .unwrap();
    });
    g.finish();
}

/// Round trips between two threads over one word: spin up to 2000 polls, then sleep on a futex
/// (`spin_futex_pingpong`, the baseline for the busy and pinned handoffs; the same as the CLI's).
fn spin_futex_pingpong(n: u64) {
    fn wait_for(w: &AtomicU32, want: u32) {
        let mut polls = 0;
        loop {
            let v = w.load(Ordering::Acquire);
            if v == want {
                return;
            }
            if polls < 2_000 {
                polls += 1;
                std::hint::spin_loop();
            } else {
                atomic_wait::wait(w, v);
            }
        }
    }
    fn pass(w: &AtomicU32, v: u32) {
        w.store(v, Ordering::Release);
        atomic_wait::wake_one(w);
    }
    let turn = AtomicU32::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..n {
                wait_for(&turn, 1);
                pass(&turn, 0);
            }
        });
        for _ in 0..n {
            pass(&turn, 1);
            wait_for(&turn, 0);
        }
    });
}

fn cross_thread(c: &mut Criterion) {
    let b = Context::new("b");
    let p = Context::pinned("p").expect("spawn home thread");
    let mut g = c.benchmark_group("cross_thread");
    g.bench_function("spin_futex_pingpong", |bench| {
        bench.iter_custom(|n| {
            let t0 = std::time::Instant::now();
            spin_futex_pingpong(n);
            t0.elapsed()
        });
    });
    g.bench_function("handoff_pinned_roundtrip", |bench| {
        bench.iter(|| black_box(p.enter(|_| ())))
    });
    g.bench_function("handoff_busy_roundtrip", |bench| {
        bench.iter_custom(|n| {
            let t0 = std::time::Instant::now();
            std::thread::scope(|s| {
                s.spawn(|| {
                    for _ in 0..n {
                        let _ = b.enter(|_| ());
                    }
                });
                for _ in 0..n {
                    let _ = b.enter(|_| ());
                }
            });
            t0.elapsed()
        });
    });
    g.finish();
}

criterion_group!(benches, idle, cross_thread);
criterion_main!(benches);
