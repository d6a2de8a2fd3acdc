//! Criterion benches for developers: the same cases as `ctx bench handoff`, each beside its
//! baseline in one group so the report shows them side by side.

#![allow(missing_docs)] // criterion_group! generates an undocumented public fn

use context_core::Context;
use context_core::benchkit::{busy_handoff_roundtrips, spin_futex_pingpong};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

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
            busy_handoff_roundtrips(&b, n);
            t0.elapsed()
        });
    });
    g.finish();
}

criterion_group!(benches, idle, cross_thread);
criterion_main!(benches);
