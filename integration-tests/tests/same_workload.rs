//! The same proxy workload against every kind of in-process context (free and pinned) and both
//! marshalling modes, with many concurrent callers and re-entrant call chains: the results must be
//! identical, nobody may starve, and nothing may deadlock (each test runs under a watchdog: a
//! deadlock fails it instead of hanging; the proxies keep their default, no timeout).

// The proxy crate's test helpers (the watchdog), shared by path: test code is not a crate.
#[path = "../../proxy/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::watchdog;
use context_core::Context;
use context_proxy::{CallError, Mode, Proxy, service};

/// An account book: the workload's object.
#[service]
pub trait Ledger {
    /// Records `amount` under `who`; returns the new balance of `who`.
    fn credit(&mut self, who: &str, amount: u64) -> u64;
    /// The balance of `who`.
    fn balance(&self, who: &str) -> u64;
    /// The sum of all balances.
    fn total(&self) -> u64;
    /// Calls `other.credit(who, amount)` from inside this object's context: a re-entrant chain
    /// when `other` lives in the caller's context.
    fn forward(&mut self, other: u32, who: &str, amount: u64) -> Result<u64, String>;
}

#[derive(Default)]
struct Book {
    balances: std::collections::BTreeMap<String, u64>,
    /// Other ledgers this one may forward to, by index.
    peers: Vec<Proxy<LedgerService>>,
}

impl Ledger for Book {
    fn credit(&mut self, who: &str, amount: u64) -> u64 {
        let b = self.balances.entry(who.to_owned()).or_default();
        *b += amount;
        *b
    }
    fn balance(&self, who: &str) -> u64 {
        self.balances.get(who).copied().unwrap_or(0)
    }
    fn total(&self) -> u64 {
        self.balances.values().sum()
    }
    fn forward(&mut self, other: u32, who: &str, amount: u64) -> Result<u64, String> {
        let peer = self.peers.get(other as usize).ok_or("no such peer")?;
        peer.credit(who, amount).map_err(|e| e.to_string())
    }
}

/// Runs the workload: `threads` callers, each crediting `per_thread` times across both ledgers,
/// half of the credits forwarded by A to B from inside A's context (a chain A -> B while A's object
/// is borrowed, so concurrent callers of A must wait for it). Returns the totals.
fn workload(
    a: &Proxy<LedgerService>,
    b: &Proxy<LedgerService>,
    threads: u64,
    per_thread: u64,
) -> (u64, u64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for t in 0..threads {
            let (a, b, done) = (a.clone(), b.clone(), done.clone());
            s.spawn(move || {
                let who = format!("t{t}");
                for i in 0..per_thread {
                    match i % 4 {
                        0 => a.credit(&who, 1).unwrap(),
                        1 => b.credit(&who, 2).unwrap(),
                        // From A's context into B (A's peer 0 is B).
                        2 => a.forward(0, &who, 3).unwrap().unwrap(),
                        _ => a.forward(0, &who, 4).unwrap().unwrap(),
                    };
                }
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    assert_eq!(
        done.load(Ordering::Relaxed),
        threads,
        "every caller finished"
    );
    (
        a.total().unwrap(),
        b.total().unwrap(),
        a.balance("t0").unwrap() + b.balance("t0").unwrap(),
    )
}

fn pair(
    ctx_a: &Context,
    ctx_b: &Context,
    pinned: bool,
) -> (Proxy<LedgerService>, Proxy<LedgerService>) {
    let make = |ctx: &Context| -> Proxy<LedgerService> {
        if pinned {
            Proxy::adopt_local(ctx, Book::default).unwrap()
        } else {
            Proxy::adopt(ctx, Book::default()).unwrap()
        }
    };
    let (a, b) = (make(ctx_a), make(ctx_b));
    // Wire A's peer inside A's own context. (Not B back to A: two objects that call each other
    // while borrowed can only wait for each other; such a cycle ends in timeouts, by design.)
    let b2 = b.clone();
    let ha = a.handle::<Book>().unwrap();
    ctx_a
        .enter(move |cx| cx.with(ha, |book| book.peers.push(b2)))
        .unwrap()
        .unwrap();
    (a, b)
}

fn expected(threads: u64, per_thread: u64) -> (u64, u64, u64) {
    // Per thread and per cycle of 4: A gets 1, B gets 2 + 3 + 4 (two forwarded from A).
    let cycles = per_thread / 4;
    (threads * cycles, threads * cycles * 9, cycles * 10)
}

#[test]
fn free_contexts_serialize_mode() {
    watchdog(60, || {
        let (ca, cb) = (Context::new("a"), Context::new("b"));
        let (a, b) = pair(&ca, &cb, false);
        assert_eq!(workload(&a, &b, 6, 400), expected(6, 400));
    })
}

#[test]
fn free_contexts_move_mode() {
    watchdog(60, || {
        let (ca, cb) = (Context::new("a"), Context::new("b"));
        let (a, b) = pair(&ca, &cb, false);
        let (a, b) = (
            a.with_mode(Mode::Move).unwrap(),
            b.with_mode(Mode::Move).unwrap(),
        );
        assert_eq!(workload(&a, &b, 6, 400), expected(6, 400));
    })
}

#[test]
fn pinned_contexts() {
    watchdog(60, || {
        let (ca, cb) = (Context::pinned("a").unwrap(), Context::pinned("b").unwrap());
        let (a, b) = pair(&ca, &cb, true);
        assert_eq!(workload(&a, &b, 6, 400), expected(6, 400));
    })
}

#[test]
fn mixed_free_and_pinned() {
    watchdog(60, || {
        let (ca, cb) = (Context::new("a"), Context::pinned("b").unwrap());
        let (a, b) = pair(&ca, &cb, false);
        assert_eq!(workload(&a, &b, 6, 400), expected(6, 400));
    })
}

#[test]
fn a_slow_target_times_out_instead_of_wedging_callers() {
    watchdog(60, || {
        let ctx = Context::new("slow");
        let p: Proxy<LedgerService> = Proxy::adopt(&ctx, Book::default()).unwrap();
        let hold = ctx.clone();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            hold.enter(move |_| {
                entered_tx.send(()).unwrap();
                rx.recv_timeout(Duration::from_secs(10))
            })
            .unwrap()
        });
        // Wait until the holder is inside (a fixed sleep was too short on a loaded machine).
        entered_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the holder entered the context");
        let quick = p.clone().with_timeout(Duration::from_millis(30));
        assert!(
            matches!(quick.total(), Err(CallError::TimedOut(_))),
            "a busy target gives a timeout error"
        );
        tx.send(()).unwrap();
        holder.join().unwrap().unwrap();
        assert_eq!(p.total().unwrap(), 0);
    })
}
