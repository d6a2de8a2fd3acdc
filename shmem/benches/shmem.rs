//! Criterion benchmarks for context-shmem. Each case has its baseline in the same group, measured
//! in the same run (and `ctx bench shmem` reports the ratios):
//!
//! - `lock_uncontended`: `SharedLock` try_lock + unlock vs `parking_lot::Mutex` lock + unlock.
//! - `channel_roundtrip_xproc`: 16-byte round trip to a forked echo child over the channel vs a
//!   Unix socketpair, a pipe pair, and a bare spin-then-futex shared word (parent pinned to one CPU,
//!   child to another: the two lowest of the affinity mask).
//! - `bulk_write_64mib_xproc`: a worker child copies 64 MiB into a shared buffer vs in-process
//!   memcpy; also a child forked for each fill (includes populating its page tables).
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use context_core::RawContextLock;
use context_shmem::benchkit::{
    BulkWriter, Echo, NoForkBuf, Transport, bulk_write_xproc, cpu_pair, pin_current_thread,
};
use context_shmem::{SharedBuf, SharedLock};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn lock_uncontended(c: &mut Criterion) {
    let mut g = c.benchmark_group("lock_uncontended");
    let lock = SharedLock::anonymous().expect("shared lock");
    g.bench_function("shared_lock", |b| {
        b.iter(|| {
            let a = lock.try_lock();
            black_box(&a);
            // SAFETY: acquired just above (an uncontended lock in this benchmark).
            unsafe { lock.unlock() };
        });
    });
    let m = parking_lot::Mutex::new(0u64);
    g.bench_function("parking_lot_mutex", |b| {
        b.iter(|| {
            *m.lock() += 1;
        });
    });
    g.finish();
}

fn channel_roundtrip(c: &mut Criterion) {
    let mut g = c.benchmark_group("channel_roundtrip_xproc");
    // The parent on one CPU, the echo children on another (see `Echo::spawn_on`): the two lowest
    // of this process's affinity mask.
    let pair = cpu_pair().expect("reading the CPU affinity");
    let _pin = pair.map(|(mine, _)| pin_current_thread(mine).expect("pin the parent"));
    for (name, t) in [
        ("channel", Transport::Channel),
        ("spin_futex_pingpong", Transport::SpinFutex),
        ("unix_socket", Transport::UnixSocket),
        ("pipe", Transport::Pipe),
    ] {
        let mut echo = Echo::spawn_on(t, pair.map(|(_, theirs)| theirs)).expect("echo child");
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                let t0 = Instant::now();
                echo.roundtrips(n).expect("round trips");
                t0.elapsed()
            });
        });
    }
    g.finish();
}

fn bulk(c: &mut Criterion) {
    const N: usize = 64 << 20;
    let mut g = c.benchmark_group("bulk_write_64mib_xproc");
    g.throughput(Throughput::Bytes(N as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    let buf = SharedBuf::<u8>::create(N).expect("64 MiB buffer");
    let src = vec![0x5au8; N];
    // Not inherited by the forked writers, so the forks do not leave these pages write-protected
    // (which would add a fault per page to the parent's writes; see `NoForkBuf`).
    let mut dst = NoForkBuf::new(N).expect("read buffer");
    let mut copy = NoForkBuf::new(N).expect("memcpy buffer");
    // Warm the shared pages once.
    bulk_write_xproc(&buf, &src, dst.as_mut_slice()).expect("warm-up");
    let mut worker = BulkWriter::spawn(&buf, &src).expect("bulk worker");
    worker.fill().expect("warm-up");
    g.bench_function("worker_child_write", |b| {
        b.iter_custom(|n| {
            (0..n)
                .map(|_| Duration::from_nanos(worker.fill().expect("fill")))
                .sum()
        });
    });
    drop(worker);
    g.bench_function("fresh_child_write", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let (w, _) = bulk_write_xproc(&buf, &src, dst.as_mut_slice()).expect("bulk");
                total += Duration::from_nanos(w);
            }
            total
        });
    });
    g.bench_function("memcpy_in_process", |b| {
        b.iter(|| {
            copy.as_mut_slice().copy_from_slice(black_box(&src));
        });
    });
    g.finish();
}

criterion_group!(benches, lock_uncontended, channel_roundtrip, bulk);
criterion_main!(benches);
