//! Criterion benches of proxied calls, each beside the baseline the issue names (run in the same
//! process): `cargo bench -p context-proxy --bench proxy`. Ratios are printed by `ctx bench proxy`;
//! here criterion reports each case's time.
#![allow(missing_docs)] // criterion_group! generates an undocumented public fn

use std::hint::black_box;

use context_core::Context;
use context_proxy::benchkit::{
    BigFrames, BlockingHop, COPY_BYTES, Counter, CounterClient, CounterService, Tally, opaque_tag,
    spawn_thread_hop,
};
use context_proxy::{Buffer, BufferService, Mode, Proxy, copy};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use parking_lot::Mutex;

fn calls(c: &mut Criterion) {
    let mut g = c.benchmark_group("call_small");
    let mutex = Mutex::new(Tally::default());
    g.bench_function("direct_call_mutex", |b| {
        b.iter(|| mutex.lock().add(black_box(5), opaque_tag()))
    });

    let ctx = Context::new("target");
    let p: Proxy<CounterService> = Proxy::adopt(&ctx, Tally::default()).expect("adopt");
    g.bench_function("call_small_idle", |b| {
        b.iter(|| p.add(black_box(5), opaque_tag()).expect("call"))
    });

    let h = p.handle::<Tally>().expect("handle");
    g.bench_function("floor_enter_with", |b| {
        b.iter(|| {
            ctx.enter(|cx| cx.with(h, |t| t.add(black_box(5), opaque_tag())))
                .expect("enter")
                .expect("with")
        })
    });
    g.bench_function("floor_enter", |b| {
        b.iter(|| ctx.enter(|_| black_box(5)).expect("enter"))
    });

    let m = p.clone().with_mode(Mode::Move).expect("move mode");
    g.bench_function("call_small_move_idle", |b| {
        b.iter(|| m.add(black_box(5), opaque_tag()).expect("call"))
    });

    let pinned_ctx = Context::pinned("pinned").expect("pinned");
    let pp: Proxy<CounterService> = Proxy::adopt(&pinned_ctx, Tally::default()).expect("adopt");
    g.bench_function("call_small_pinned", |b| {
        b.iter(|| pp.add(black_box(5), opaque_tag()).expect("call"))
    });

    let (tx, rx) = spawn_thread_hop();
    g.bench_function("thread_hop_roundtrip", |b| {
        b.iter(|| {
            tx.send((black_box(5), opaque_tag())).expect("send");
            rx.recv().expect("recv")
        })
    });

    let blocking = BlockingHop::spawn().expect("spawn the blocking hop");
    g.bench_function("thread_hop_blocking_roundtrip", |b| {
        b.iter(|| blocking.call(black_box(5), opaque_tag()))
    });
    g.finish();
}

const N: usize = COPY_BYTES;
type Big = BigFrames;

fn copies(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_64mib");
    g.throughput(Throughput::Bytes(N as u64));
    g.sample_size(10);
    let src = vec![7u8; N];
    let mut dst = vec![0u8; N];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });

    let (a, bctx) = (Context::new("a"), Context::new("b"));
    let s: Proxy<BufferService<u8>, Big> =
        Proxy::adopt(&a, Buffer::from(vec![7u8; N])).expect("adopt");
    let d: Proxy<BufferService<u8>, Big> =
        Proxy::adopt(&bctx, Buffer::<u8>::zeroed(N)).expect("adopt");
    g.bench_function("copy_cheat_64mib", |b| {
        b.iter(|| copy(&s, 0..N, &d, 0).expect("copy"))
    });
    g.bench_function("copy_serialized_64mib", |b| {
        b.iter(|| d.write(0, &s.read(0..N).expect("read")).expect("write"))
    });
    g.finish();
}

criterion_group!(benches, calls, copies);
criterion_main!(benches);
