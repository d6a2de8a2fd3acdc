//! Criterion benchmarks of context-forkpool, each beside its baseline in the same run:
//! - `alloc_free_64b`: the shared allocator vs glibc malloc/free of the same 64 bytes;
//! - `pointer_chase`: a worker walking a list built by the master vs the master walking it;
//! - `parallel_sum`: summing a shared array with 2 workers vs 1;
//! - `pool_start`: starting a 2-worker pool over a 1 GiB region (until both workers said hello) vs
//!   two bare forks until both children said hello (`bare_forks_until_hello`).
//!
//! Criterion's main is single-threaded, so the pool can fork here directly. `ctx bench forkpool`
//! reports the same cases as ratios.

use std::hint::black_box;
use std::time::Duration;

use context_forkpool::{JobContext, ListHead, Pool, SharedList, SharedVec, bare_forks_until_hello};
use criterion::{Criterion, criterion_main};

const T: Duration = Duration::from_secs(60);

fn alloc_free(c: &mut Criterion) {
    let pool = Pool::builder()
        .workers(0)
        .reserve(1 << 30)
        .initial_region(64 << 20)
        .build()
        .expect("heap");
    let heap = pool.heap();
    let layout = std::alloc::Layout::from_size_align(64, 8).expect("layout");
    let mut g = c.benchmark_group("alloc_free_64b");
    g.bench_function("forkpool", |b| {
        b.iter(|| {
            heap.alloc_free_round_trip(black_box(layout))
                .expect("alloc + free");
        });
    });
    // 64 bytes, 8-aligned, not written: the same request the allocator gets.
    g.bench_function("glibc_malloc_free", |b| {
        b.iter(|| drop(black_box(Vec::<u64>::with_capacity(8))));
    });
    g.finish();
}

fn walk(_: &JobContext, l: &ListHead<u64>) -> u64 {
    l.iter().fold(0u64, |a, v| a.wrapping_add(*v))
}

fn pointer_chase(c: &mut Criterion) {
    let mut pool = Pool::builder()
        .workers(1)
        .reserve(1 << 30)
        .initial_region(256 << 20)
        .build()
        .expect("pool");
    let mut list = SharedList::new(pool.heap()).expect("list");
    for v in 0..1_000_000u64 {
        list.push_front(v).expect("push");
    }
    let mut g = c.benchmark_group("pointer_chase_1m");
    g.bench_function("worker", |b| {
        b.iter(|| pool.run(0, walk, &list, T).expect("run"))
    });
    g.bench_function("master", |b| b.iter(|| walk_master(&list)));
    g.finish();
    drop(list);
}

fn walk_master(l: &ListHead<u64>) -> u64 {
    l.iter().fold(0u64, |a, v| a.wrapping_add(*v))
}

fn sum_part(cx: &JobContext, v: &[u64]) -> u64 {
    let n = v.len();
    let (lo, hi) = (
        n * cx.index() / cx.workers(),
        n * (cx.index() + 1) / cx.workers(),
    );
    v[lo..hi].iter().fold(0u64, |a, x| a.wrapping_add(*x))
}

fn parallel_sum(c: &mut Criterion) {
    let words = 32usize << 20; // 256 MiB
    let mut g = c.benchmark_group("parallel_sum_256mib");
    g.sample_size(10);
    for workers in [1usize, 2] {
        let mut pool = Pool::builder()
            .workers(workers)
            .reserve(2 << 30)
            .initial_region(512 << 20)
            .build()
            .expect("pool");
        let v = SharedVec::from_elem(pool.heap(), 1u64, words).expect("vec");
        g.bench_function(format!("{workers}_workers"), |b| {
            b.iter(|| {
                pool.broadcast(sum_part, &v, T)
                    .into_iter()
                    .map(|r| r.expect("job"))
                    .sum::<u64>()
            });
        });
        drop(v);
    }
    g.finish();
}

fn pool_start(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_start_2w_1gib");
    g.sample_size(20);
    // Start only (until both workers said hello); the shutdown is outside the timed part.
    g.bench_function("pool", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let t0 = std::time::Instant::now();
                let pool = Pool::builder()
                    .workers(2)
                    .reserve(2 << 30)
                    .initial_region(1 << 30)
                    .build()
                    .expect("pool");
                total += t0.elapsed();
                drop(black_box(pool));
            }
            total
        });
    });
    // The same wait with nothing else: two bare forks until both children said hello.
    g.bench_function("two_forks_until_hello", |b| {
        b.iter_custom(|n| {
            (0..n)
                .map(|_| bare_forks_until_hello(2).expect("bare forks"))
                .sum()
        });
    });
    g.finish();
}

// criterion_group! generates an undocumented `pub fn`; keep the allow on that function only.
mod group {
    #![allow(missing_docs)]
    use super::{alloc_free, parallel_sum, pointer_chase, pool_start};
    criterion::criterion_group!(benches, alloc_free, pointer_chase, parallel_sum, pool_start);
}
criterion_main!(group::benches);
