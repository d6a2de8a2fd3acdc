//! `ctx bench proxy`: method calls through `context-proxy` proxies, and the plain-buffer cheat path,
//! each beside the baseline issue 3 names, measured in the same run.

use std::hint::black_box;
use std::time::Instant;

use context_core::Context;
use context_proxy::benchkit::{
    BigFrames as Big, BlockingHop, COPY_BYTES, Counter, CounterClient, CounterService, TAG, Tally,
    opaque_tag, spawn_echo, spawn_thread_hop,
};
use context_proxy::{Buffer, BufferService, Mode, Proxy, copy};

use super::placement::Placement;
use crate::bench::{Better, Runner, Target};

fn gb_per_s(bytes: usize, f: impl FnOnce()) -> f64 {
    let t0 = Instant::now();
    f();
    bytes as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// Median GB/s of `case` and of `baseline`, in alternating one-shot trials.
fn compare_gbps(
    r: &mut Runner,
    mut case: impl FnMut() -> f64,
    mut baseline: impl FnMut() -> f64,
) -> (f64, f64) {
    // One untimed run each: first-touch page faults are not what is measured.
    case();
    baseline();
    let mut cs = Vec::new();
    let mut bs = Vec::new();
    for _ in 0..r.config().trials() {
        cs.push(case());
        bs.push(baseline());
    }
    let medians = r.paired_medians(vec![cs, bs]);
    (medians[0], medians[1])
}

pub fn run(r: &mut Runner) -> anyhow::Result<()> {
    let place = Placement::new()?;
    let mutex = parking_lot::Mutex::new(Tally::default());
    let direct = |n: u64| {
        for _ in 0..n {
            black_box(mutex.lock().add(black_box(5), opaque_tag()));
        }
    };

    let target = Context::new("bench-proxy-target");
    let idle: Proxy<CounterService> = Proxy::adopt(&target, Tally::default())?;
    let call = |p: &Proxy<CounterService>, n: u64| {
        for _ in 0..n {
            black_box(p.add(black_box(5), opaque_tag()).expect("proxied call"));
        }
    };
    // Fail early and clearly rather than inside a timed loop.
    idle.add(0, TAG)?;

    r.step("call_small_idle");
    let (case, base) = r.compare_ns(|n| call(&idle, n), direct);
    r.row(
        "call_small_idle",
        "ns_per_op",
        case,
        Better::Lower,
        "direct_call_mutex",
        base,
        Some(Target::RatioAtMost(15.0)),
    );

    let (hop_tx, hop_rx) = place.partner(spawn_thread_hop)?;
    let (case, base) = r.compare_ns(
        |n| call(&idle, n),
        |n| {
            for _ in 0..n {
                hop_tx
                    .send((black_box(5), opaque_tag()))
                    .expect("hop thread alive");
                black_box(hop_rx.recv().expect("hop thread alive"));
            }
        },
    );
    // "at least 20x faster than the thread hop": case / baseline <= 1/20.
    r.row(
        "call_small_idle",
        "ns_per_op",
        case,
        Better::Lower,
        "thread_hop_roundtrip",
        base,
        Some(Target::RatioAtMost(0.05)),
    );
    r.note(place.describe("caller", "the other thread (hop worker, home thread, echo)"));
    drop((hop_tx, hop_rx));

    // Context, not a target: the hop to a worker that sleeps until work arrives, as idle workers
    // do, which is the thread switch a direct entry avoids.
    let blocking = place.partner(BlockingHop::spawn)??;
    let (case, base) = r.compare_ns(
        |n| call(&idle, n),
        |n| {
            for _ in 0..n {
                black_box(blocking.call(black_box(5), opaque_tag()));
            }
        },
    );
    r.row(
        "call_small_idle",
        "ns_per_op",
        case,
        Better::Lower,
        "thread_hop_blocking_roundtrip",
        base,
        None,
    );
    r.note(
        "the same call shipped to a worker thread that sleeps (mutex + condvar, no spinning) until \
         a request arrives, as an idle pool worker does: two wake-ups and two thread switches per \
         call. thread_hop_roundtrip's crossbeam channels spin, so in a tight loop both threads stay \
         awake; this is the hop an occasional call to an idle worker pays",
    );
    drop(blocking);

    r.step("call_small_move_idle");
    let moving = idle.clone().with_mode(Mode::Move)?;
    let (case, base) = r.compare_ns(|n| call(&moving, n), direct);
    r.row(
        "call_small_move_idle",
        "ns_per_op",
        case,
        Better::Lower,
        "direct_call_mutex",
        base,
        Some(Target::RatioAtMost(3.0)),
    );

    r.step("call_small_pinned");
    let home = place.partner(|| Context::pinned("bench-proxy-pinned"))??;
    let pinned: Proxy<CounterService> = Proxy::adopt(&home, Tally::default())?;
    pinned.add(0, TAG)?;
    let (echo_tx, echo_rx) = place.partner(spawn_echo)?;
    let (case, base) = r.compare_ns(
        |n| call(&pinned, n),
        |n| {
            for i in 0..n {
                echo_tx.send(black_box(i)).expect("echo thread alive");
                black_box(echo_rx.recv().expect("echo thread alive"));
            }
        },
    );
    r.row(
        "call_small_pinned",
        "ns_per_op",
        case,
        Better::Lower,
        "channel_roundtrip",
        base,
        Some(Target::RatioAtMost(1.3)),
    );
    r.note(place.describe("caller", "the other thread (hop worker, home thread, echo)"));
    drop((echo_tx, echo_rx));

    r.step("copy_cheat_64mib");
    let (ca, cb) = (Context::new("bench-copy-a"), Context::new("bench-copy-b"));
    let src: Proxy<BufferService<u8>, Big> =
        Proxy::adopt(&ca, Buffer::from(vec![7u8; COPY_BYTES]))?;
    let dst: Proxy<BufferService<u8>, Big> = Proxy::adopt(&cb, Buffer::<u8>::zeroed(COPY_BYTES))?;
    let plain_src = vec![7u8; COPY_BYTES];
    let mut plain_dst = vec![0u8; COPY_BYTES];
    let mut memcpy = || {
        gb_per_s(COPY_BYTES, || {
            plain_dst.copy_from_slice(black_box(&plain_src));
            black_box(&mut plain_dst);
        })
    };
    let (case, base) = compare_gbps(
        r,
        || {
            gb_per_s(COPY_BYTES, || {
                copy(&src, 0..COPY_BYTES, &dst, 0).expect("cheat copy")
            })
        },
        &mut memcpy,
    );
    r.row(
        "copy_cheat_64mib",
        "gb_per_s",
        case,
        Better::Higher,
        "memcpy",
        base,
        Some(Target::RatioAtLeast(0.9)),
    );

    r.step("copy_serialized_64mib");
    let (case, base) = compare_gbps(
        r,
        || {
            gb_per_s(COPY_BYTES, || {
                let bytes = src.read(0..COPY_BYTES).expect("serialized read");
                dst.write(0, &bytes).expect("serialized write");
            })
        },
        &mut memcpy,
    );
    r.row(
        "copy_serialized_64mib",
        "gb_per_s",
        case,
        Better::Higher,
        "memcpy",
        base,
        None,
    );
    r.note("the same copy through frames: read (reply carries 64 MiB) then write (request carries 64 MiB)");
    Ok(())
}
