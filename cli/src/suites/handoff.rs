//! `ctx bench handoff`: entering contexts and handing their locks between threads.

use std::hint::black_box;

use crate::bench::{Better, Runner, Target};
use context_core::benchkit::{busy_handoff_roundtrips, spin_futex_pingpong};
use context_core::{Context, os};

/// Handoffs counted by `context_switches_idle`.
const IDLE_HANDOFFS: u64 = 100_000;

pub fn run(r: &mut Runner) -> anyhow::Result<()> {
    let a = Context::new("bench-a");
    let b = Context::new("bench-b");
    let mutex = parking_lot::Mutex::new(0u64);
    // The three loops measured below, each once (closures over references are `Copy`).
    let mutex_pairs = |n: u64| {
        for _ in 0..n {
            drop(black_box(mutex.lock()));
        }
    };
    // Every entry is checked: a failing one would only make a loop faster.
    let idle_enters = |n: u64| {
        for _ in 0..n {
            black_box(b.enter(|_| ())).expect("entering an idle context");
        }
    };
    let idle_handoffs = |n: u64| {
        a.enter(|_| {
            for _ in 0..n {
                black_box(b.enter(|_| ())).expect("entering an idle context from another");
            }
        })
        .expect("entering the caller's context");
    };

    r.step("enter_exit_idle");
    let (enter, lock) = r.compare_ns(idle_enters, mutex_pairs);
    r.row(
        "enter_exit_idle",
        "ns_per_op",
        enter,
        Better::Lower,
        "parking_lot_mutex",
        lock,
        Some(Target::RatioAtMost(1.5)),
    );

    r.step("handoff_idle_roundtrip");
    let (handoff, lock) = r.compare_ns(idle_handoffs, mutex_pairs);
    r.row(
        "handoff_idle_roundtrip",
        "ns_per_op",
        handoff,
        Better::Lower,
        "parking_lot_mutex",
        lock,
        Some(Target::RatioAtMost(3.0)),
    );

    r.step("handoff_busy_roundtrip");
    // Two threads take turns in one context, each staying inside until the other is queued, so
    // that every release hands the context over: one round trip is two handoffs between threads,
    // as one ping-pong round trip is two passes.
    let busy_ctx = Context::new("bench-busy");
    let mut handoffs = 0u64;
    let mut entries = 0u64;
    let (busy, pingpong) = r.compare_ns(
        |n| {
            handoffs += busy_handoff_roundtrips(&busy_ctx, n);
            entries += 2 * n;
        },
        spin_futex_pingpong,
    );
    r.row(
        "handoff_busy_roundtrip",
        "ns_per_op",
        busy,
        Better::Lower,
        "spin_futex_pingpong",
        pingpong,
        Some(Target::RatioAtMost(1.5)),
    );
    r.note(format!(
        "{handoffs} of {entries} entries were handed over by the other thread (contended); the \
         rest found the context free at the start or end of a trial"
    ));

    r.step("handoff_pinned_roundtrip");
    let p = Context::pinned("bench-pinned")?;
    let (pinned, pingpong) = r.compare_ns(
        |n| {
            for _ in 0..n {
                black_box(p.enter(|_| ())).expect("entering a pinned context");
            }
        },
        spin_futex_pingpong,
    );
    r.row(
        "handoff_pinned_roundtrip",
        "ns_per_op",
        pinned,
        Better::Lower,
        "spin_futex_pingpong",
        pingpong,
        Some(Target::RatioAtMost(1.5)),
    );

    r.step("context_switches_idle");
    // Counted on a fresh thread, so nothing else this process does is included.
    let (ours, baseline) = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<(u64, u64)> {
            let (v0, _) = os::thread_context_switches()?;
            idle_handoffs(IDLE_HANDOFFS);
            let (v1, _) = os::thread_context_switches()?;
            mutex_pairs(IDLE_HANDOFFS);
            let (v2, _) = os::thread_context_switches()?;
            Ok((v1 - v0, v2 - v1))
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("counting thread panicked")))
    })?;
    r.row(
        "context_switches_idle",
        "count",
        ours as f64,
        Better::Lower,
        "parking_lot_mutex",
        baseline as f64,
        Some(Target::ValueAtMost(0.0)),
    );
    r.note(format!(
        "voluntary context switches across {IDLE_HANDOFFS} idle A -> B -> A handoffs"
    ));
    Ok(())
}
