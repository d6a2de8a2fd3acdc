//! Shared contexts: a context whose lock and objects live in the pool's shared heap, entered by the
//! master and by workers with the core enter/handoff API.
//!
//! Tests that fork run in a fresh single-threaded copy of this binary (`isolated::run`, which also
//! kills the child after its timeout: a hang fails the test). Tests that do not fork (a pool with no
//! workers) run in the harness with a watchdog thread.

#![cfg(not(loom))] // shared contexts (context-shmem's lock) are left out of the loom build.

#[macro_use]
mod common;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use context_core::{Context, EnterError};
use context_forkpool::{
    JobContext, ObjectError, ObjectId, OpenError, Pool, PoolError, ShareSafe, SharedBox,
    SharedCloseError, SharedContext, SharedContextRef, SharedHandle,
};

use common::{T, small_pool};

/// Runs `f` on a thread and fails the test if it has not finished within `secs`.
fn watchdog(secs: u64, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().expect("test thread"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: re-raise its panic here.
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("watchdog: no result within {secs} s"),
    }
}

/// A pool without workers: no fork, so usable from the multi-threaded test harness.
fn heap_only() -> Pool {
    Pool::builder()
        .workers(0)
        .reserve(1 << 30)
        .initial_region(64 << 20)
        .build()
        .expect("pool without workers")
}

/// Polls `cond` until it holds or `within` passes.
fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

// ---------------------------------------------------------------------------------------------
// One process: handles, errors, borrows, poison, close.

#[test]
fn handles_are_checked() {
    watchdog(60, || {
        let pool = heap_only();
        let scx = SharedContext::create(pool.heap(), "a").unwrap();
        let other = SharedContext::create(pool.heap(), "b").unwrap();
        assert_eq!(scx.name(), "a");
        assert_ne!(scx.uid(), other.uid());

        let h = scx.enter(|s| s.alloc(41u64)).unwrap().unwrap();
        assert_eq!(
            scx.enter(|s| s.with(h, |v| {
                *v += 1;
                *v
            }))
            .unwrap(),
            Ok(42)
        );

        // Wrong type, through a forged cast.
        let wrong = scx.enter(|s| s.with(h.cast::<u32>(), |v| *v)).unwrap();
        assert!(
            matches!(wrong, Err(ObjectError::WrongType { .. })),
            "{wrong:?}"
        );
        // Another context's handle.
        let foreign = other.enter(|s| s.with(h, |v| *v)).unwrap();
        assert!(
            matches!(foreign, Err(ObjectError::WrongContext { .. })),
            "{foreign:?}"
        );
        // Forged slots and generations.
        for (slot, generation) in [(9_999, 1), (u32::MAX, 1), (h.id().to_raw().1, 0)] {
            let forged = ObjectId::from_raw(scx.uid(), slot, generation).typed::<u64>();
            let r = scx.enter(|s| s.with(forged, |v| *v)).unwrap();
            assert_eq!(
                r,
                Err(ObjectError::Stale),
                "slot {slot} generation {generation}"
            );
        }
        // Freed: stale, also after the slot is reused by another object.
        scx.enter(|s| s.free(h)).unwrap().unwrap();
        assert_eq!(
            scx.enter(|s| s.with(h, |v| *v)).unwrap(),
            Err(ObjectError::Stale)
        );
        let h2 = scx.enter(|s| s.alloc(7u64)).unwrap().unwrap();
        assert_eq!(h2.id().to_raw().1, h.id().to_raw().1, "the slot is reused");
        assert_eq!(
            scx.enter(|s| s.with(h, |v| *v)).unwrap(),
            Err(ObjectError::Stale)
        );
        assert_eq!(scx.enter(|s| s.with(h2, |v| *v)).unwrap(), Ok(7));
        assert_eq!(scx.enter(|s| s.free(h)).unwrap(), Err(ObjectError::Stale));
        assert_eq!(scx.enter(|s| s.len()).unwrap(), Ok(1));

        // Many objects: the table grows across segments; every handle still reaches its object.
        let hs: Vec<SharedHandle<[u64; 2]>> = scx
            .enter(|s| (0..500u64).map(|i| s.alloc([i, i * i]).unwrap()).collect())
            .unwrap();
        let sum = scx
            .enter(|s| {
                hs.iter()
                    .map(|&h| s.with(h, |v| v[1] - v[0] * v[0]).unwrap())
                    .sum::<u64>()
            })
            .unwrap();
        assert_eq!(sum, 0);
        assert_eq!(scx.enter(|s| s.len()).unwrap(), Ok(501));
    });
}

/// `get` has a fused fast path and a step-by-step fallback: every check must give the same answer
/// through it as through `with`, including on a handle whose segments this process has not
/// validated yet (a fresh `open`), in later table segments, and after the context closes.
#[test]
fn get_checks_every_handle() {
    watchdog(60, || {
        let pool = heap_only();
        let scx = SharedContext::create(pool.heap(), "g").unwrap();
        let other = SharedContext::create(pool.heap(), "other").unwrap();
        // 100 objects: slots in the first three table segments.
        let hs: Vec<SharedHandle<u64>> = scx
            .enter(|s| (0..100u64).map(|i| s.alloc(i * 3).unwrap()).collect())
            .unwrap();
        // A fresh handle (as another process would open it) has validated no segment yet.
        let fresh = SharedContext::open(pool.heap(), scx.share()).unwrap();
        for c in [&fresh, &scx] {
            let got: Vec<u64> = c
                .enter(|s| hs.iter().map(|&h| s.get(h).unwrap()).collect())
                .unwrap();
            assert_eq!(got, (0..100u64).map(|i| i * 3).collect::<Vec<_>>());
        }
        let h = hs[40];
        let expect_same = |what: &str, h: SharedHandle<u64>| {
            let (g, w) = scx.enter(|s| (s.get(h), s.with(h, |v| *v))).unwrap();
            assert_eq!(g, w, "{what}");
            assert!(g.is_err(), "{what}: {g:?}");
        };
        // Another context's handle, forged slots and generations.
        let foreign = other.enter(|s| s.get(h)).unwrap();
        assert!(
            matches!(foreign, Err(ObjectError::WrongContext { .. })),
            "{foreign:?}"
        );
        let (slot, generation) = (h.id().to_raw().1, h.id().to_raw().2);
        for (slot, generation) in [(9_999, 1), (u32::MAX, 1), (slot, 0), (slot, generation + 1)] {
            expect_same(
                "forged",
                ObjectId::from_raw(scx.uid(), slot, generation).typed(),
            );
        }
        // Wrong type.
        let wrong = scx.enter(|s| s.get(h.cast::<i64>())).unwrap();
        assert!(
            matches!(wrong, Err(ObjectError::WrongType { .. })),
            "{wrong:?}"
        );
        // Borrowed (Busy from this chain), poisoned, then accepted again.
        let r = scx.enter(|s| s.with(h, |_| s.get(h))).unwrap().unwrap();
        assert_eq!(r, Err(ObjectError::Busy));
        let _ = scx.enter(|s| s.with(h, |_| panic!("poison it")));
        expect_same("poisoned", h);
        assert_eq!(
            scx.enter(|s| (s.clear_poison(h), s.get(h))).unwrap(),
            (Ok(true), Ok(120))
        );
        // Suspended by a nested call: NotHeld; held again afterwards.
        let local = Context::new("local");
        let r = scx
            .enter_local(|s| (local.enter_local(|_| s.get(h)).unwrap(), s.get(h)))
            .unwrap();
        assert_eq!(r, (Err(ObjectError::NotHeld), Ok(120)));
        // Freed: stale, also once the slot holds another object.
        scx.enter(|s| s.free(h)).unwrap().unwrap();
        expect_same("freed", h);
        let h2 = scx.enter(|s| s.alloc(5u64)).unwrap().unwrap();
        assert_eq!(h2.id().to_raw().1, slot, "the slot is reused");
        expect_same("reused", h);
        assert_eq!(scx.enter(|s| s.get(h2)).unwrap(), Ok(5));
        // Closed from inside the entry (a re-entrant close runs directly): Closed.
        let r = scx
            .enter_local(|s| {
                s.reset().unwrap();
                let h3 = s.alloc(9u64).unwrap();
                (s.get(h3), scx.close(), s.get(h3))
            })
            .unwrap();
        assert_eq!(r, (Ok(9), Ok(()), Err(ObjectError::Closed)));
        assert!(matches!(
            fresh.enter(|s| s.get(h2)),
            Err(EnterError::Closed(_))
        ));
    });
}

#[test]
fn open_validates_the_reference() {
    watchdog(60, || {
        let pool = heap_only();
        let scx = SharedContext::create(pool.heap(), "shared").unwrap();
        let h = scx.enter(|s| s.alloc(5u64)).unwrap().unwrap();
        let (addr, uid) = scx.share().to_raw();

        // A good reference opens the same context (another handle, as another process would).
        let again = SharedContext::open(pool.heap(), scx.share()).unwrap();
        assert_eq!(again.enter(|s| s.with(h, |v| *v)).unwrap(), Ok(5));
        assert_eq!(again.name(), "shared");

        let box_u64 = SharedBox::new(pool.heap(), 0u64).unwrap();
        let small = box_u64.as_ptr() as u64;
        let other_pool = heap_only();
        let elsewhere = SharedContext::create(other_pool.heap(), "elsewhere").unwrap();
        let bad = [
            (SharedContextRef::from_raw(0, uid), "null"),
            (
                SharedContextRef::from_raw(addr + 8, uid),
                "inside the block",
            ),
            (SharedContextRef::from_raw(addr + 1, uid), "misaligned"),
            (SharedContextRef::from_raw(addr, uid ^ 1), "other identity"),
            (SharedContextRef::from_raw(addr, 0), "zero identity"),
            (SharedContextRef::from_raw(small, uid), "a small block"),
            (elsewhere.share(), "another pool's heap"),
            (SharedContextRef::from_raw(u64::MAX - 7, uid), "far away"),
        ];
        for (r, what) in bad {
            match SharedContext::open(pool.heap(), r) {
                Err(OpenError::NotAContext { .. }) => {}
                other => panic!("{what}: {other:?}"),
            }
        }
        // A block that holds a context-sized amount of other data: wrong magic.
        let lookalike = SharedBox::new(pool.heap(), [0u64; 512]).unwrap();
        match SharedContext::open(
            pool.heap(),
            SharedContextRef::from_raw(lookalike.as_ptr() as u64, uid),
        ) {
            Err(OpenError::NotAContext { .. }) => {}
            other => panic!("lookalike: {other:?}"),
        }
    });
}

#[test]
fn borrows_busy_not_held_and_poison() {
    watchdog(60, || {
        let pool = heap_only();
        let scx = SharedContext::create(pool.heap(), "s").unwrap();
        let local = Context::new("local");
        let (a, b) = scx
            .enter(|s| (s.alloc(1u64).unwrap(), s.alloc(2u64).unwrap()))
            .unwrap();

        // Re-entrant access to a borrowed object from the same chain: Busy; another object: fine.
        let r = scx
            .enter(|s| s.with(a, |_| (s.with(a, |v| *v), s.with(b, |v| *v))))
            .unwrap()
            .unwrap();
        assert_eq!(r, (Err(ObjectError::Busy), Ok(2)));
        // `get` copies out without recording a borrow, and refuses a borrowed object likewise.
        let r = scx
            .enter(|s| s.with(a, |_| (s.get(a), s.get(b))))
            .unwrap()
            .unwrap();
        assert_eq!(r, (Err(ObjectError::Busy), Ok(2)));
        let wrong = scx.enter(|s| s.get(a.cast::<u32>())).unwrap();
        assert!(
            matches!(wrong, Err(ObjectError::WrongType { .. })),
            "{wrong:?}"
        );

        // Inside a nested call into a local context the shared one is suspended: NotHeld. After
        // the call returns, it is held again.
        let r = scx
            .enter_local(|s| {
                let inside = local
                    .enter_local(|_| (s.is_held(), s.with(b, |v| *v)))
                    .unwrap();
                (inside, s.is_held(), s.with(b, |v| *v))
            })
            .unwrap();
        assert_eq!(r, ((false, Err(ObjectError::NotHeld)), true, Ok(2)));

        // Local -> shared -> local -> back.
        let r = local
            .enter(|_| scx.enter(|s| s.with(a, |v| local.enter(|_| 10).map(|x| x + *v))))
            .unwrap()
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r, 11);

        // A panic while borrowing poisons that object only.
        let r: Result<(), EnterError> = scx.enter(|s| {
            let _ = s.with(a, |v| {
                *v = 100;
                panic!("boom")
            });
        });
        assert!(matches!(r, Err(EnterError::Panicked { .. })), "{r:?}");
        let seen = scx
            .enter(|s| {
                (
                    s.with(a, |v| *v),
                    s.with(b, |v| *v),
                    s.poisoned().unwrap(),
                    s.is_poisoned(a),
                )
            })
            .unwrap();
        assert_eq!(
            seen,
            (Err(ObjectError::Poisoned), Ok(2), vec![a.id()], Ok(true))
        );
        assert_eq!(scx.enter(|s| s.get(a)).unwrap(), Err(ObjectError::Poisoned));
        let r = scx
            .enter(|s| (s.clear_poison(a), s.clear_poison(a), s.with(a, |v| *v)))
            .unwrap();
        assert_eq!(r, (Ok(true), Ok(false), Ok(100)));
        // No death happened: no recovery reported.
        assert!(!scx.enter(|s| s.recovered()).unwrap());
        assert_eq!(scx.recoveries(), 0);
    });
}

#[test]
fn another_thread_sees_in_use_and_waits_or_times_out() {
    watchdog(60, || {
        let pool = heap_only();
        let scx = SharedContext::create(pool.heap(), "s").unwrap();
        let local = Context::new("local");
        let h = scx.enter(|s| s.alloc(0u64)).unwrap().unwrap();
        let (to_main, from_a) = mpsc::channel();
        let (to_a, from_main) = mpsc::channel::<()>();
        std::thread::scope(|sc| {
            let (scx2, local2) = (&scx, &local);
            let a = sc.spawn(move || {
                scx2.enter_local(|s| {
                    s.with(h, |v| {
                        *v = 1;
                        // Suspends the shared context while the object stays borrowed.
                        local2
                            .enter_local(|_| {
                                to_main.send("suspended").unwrap();
                                from_main.recv_timeout(T).unwrap();
                            })
                            .unwrap();
                        *v = 2;
                    })
                })
            });
            assert_eq!(from_a.recv_timeout(T).unwrap(), "suspended");
            // The lock is free, the object is not: InUse from another chain.
            let r = scx.enter(|s| s.with(h, |v| *v)).unwrap();
            assert!(matches!(r, Err(ObjectError::InUse { .. })), "{r:?}");
            let r = scx.enter(|s| s.free(h)).unwrap();
            assert!(matches!(r, Err(ObjectError::InUse { .. })), "{r:?}");
            let r = scx.enter(|s| s.get(h)).unwrap();
            assert!(matches!(r, Err(ObjectError::InUse { .. })), "{r:?}");
            to_a.send(()).unwrap();
            assert_eq!(a.join().unwrap(), Ok(Ok(())));
        });
        assert_eq!(scx.enter(|s| s.with(h, |v| *v)).unwrap(), Ok(2));

        // Held by another thread: try_enter gives up at once, enter_timeout after the timeout.
        let (to_main, from_a) = mpsc::channel();
        let (to_a, from_main) = mpsc::channel::<()>();
        std::thread::scope(|sc| {
            let scx2 = &scx;
            let a = sc.spawn(move || {
                scx2.enter_local(|_| {
                    to_main.send(()).unwrap();
                    from_main.recv_timeout(T).unwrap();
                })
            });
            from_a.recv_timeout(T).unwrap();
            assert!(scx.is_locked());
            assert!(matches!(
                scx.try_enter(|_| ()),
                Err(EnterError::WouldBlock(_))
            ));
            let t0 = Instant::now();
            let r = scx.enter_timeout(Duration::from_millis(30), |_| ());
            assert!(matches!(r, Err(EnterError::TimedOut(_))), "{r:?}");
            assert!(t0.elapsed() >= Duration::from_millis(30));
            to_a.send(()).unwrap();
            a.join().unwrap().unwrap();
        });
        assert!(!scx.is_locked());
        assert!(scx.stats().entries > 0);
    });
}

#[test]
fn reset_close_and_the_pool_going_away() {
    watchdog(60, || {
        let mut pool = heap_only();
        let scx = SharedContext::create(pool.heap(), "s").unwrap();
        let hs: Vec<SharedHandle<u64>> = scx
            .enter(|s| (0..40).map(|i| s.alloc(i).unwrap()).collect())
            .unwrap();
        let r = scx.enter(|s| s.reset()).unwrap();
        assert_eq!(r, Ok(40));
        let r = scx.enter(|s| (s.len(), s.with(hs[3], |v| *v))).unwrap();
        assert_eq!(r, (Ok(0), Err(ObjectError::Stale)));

        // The pool cannot reset shared memory while a handle is alive in this process.
        assert!(matches!(pool.reset(), Err(PoolError::HandlesAlive(_))));

        // Close: entering fails, opening fails, closing again is fine; other handles see it too.
        let other = SharedContext::open(pool.heap(), scx.share()).unwrap();
        let h = scx.enter(|s| s.alloc(1u64)).unwrap().unwrap();
        scx.close().unwrap();
        assert_eq!(other.enter(|s| s.with(h, |v| *v)).map_err(|_| ()), Err(()));
        assert!(scx.is_closed());
        assert!(matches!(scx.enter(|_| ()), Err(EnterError::Closed(_))));
        assert!(matches!(other.enter(|_| ()), Err(EnterError::Closed(_))));
        assert!(matches!(
            SharedContext::open(pool.heap(), scx.share()),
            Err(OpenError::Closed)
        ));
        assert_eq!(scx.close(), Ok(()));
        assert_eq!(other.close(), Ok(()));

        // A context outlives its pool: the pool leaves the mapping in place while handles exist.
        let scx = SharedContext::create(pool.heap(), "survivor").unwrap();
        let h = scx.enter(|s| s.alloc([3u64; 4])).unwrap().unwrap();
        drop(pool);
        assert_eq!(
            scx.enter(|s| s.with(h, |v| v.iter().sum::<u64>())).unwrap(),
            Ok(12)
        );
    });
}

#[test]
fn close_refuses_while_borrowed() {
    watchdog(60, || {
        let pool = heap_only();
        let scx = SharedContext::create(pool.heap(), "s").unwrap();
        let h = scx.enter(|s| s.alloc(1u64)).unwrap().unwrap();
        let r = scx
            .enter_local(|s| s.with(h, |_| scx.close()))
            .unwrap()
            .unwrap();
        // Re-entrant close from inside the borrow: the object is busy, nothing is closed.
        assert_eq!(r, Err(SharedCloseError::Object(ObjectError::Busy)));
        assert!(!scx.is_closed());
        assert_eq!(scx.enter(|s| s.with(h, |v| *v)).unwrap(), Ok(1));
    });
}

/// `with` called from a destructor while an unrelated panic unwinds: the update completed, so the
/// object is not poisoned (only a panic that starts inside the borrow poisons).
#[test]
fn with_during_an_unrelated_unwind_does_not_poison() {
    watchdog(60, || {
        let pool = heap_only();
        let scx = SharedContext::create(pool.heap(), "unwind").unwrap();
        let h = scx.enter(|s| s.alloc(0u64)).unwrap().unwrap();
        struct Update<'a>(&'a SharedContext, SharedHandle<u64>);
        impl Drop for Update<'_> {
            fn drop(&mut self) {
                let r = self.0.enter(|s| s.with(self.1, |n| *n += 1));
                assert_eq!(r, Ok(Ok(())));
            }
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _u = Update(&scx, h);
            panic!("unrelated panic, on purpose");
        }));
        assert!(r.is_err());
        let after = scx.enter(|s| (s.is_poisoned(h), s.get(h))).unwrap();
        assert_eq!(after, (Ok(false), Ok(1)));
        // A panic inside the borrow still poisons.
        let r = scx.enter(|s| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                s.with(h, |_| panic!("inside the borrow, on purpose"))
            }))
            .is_err()
        });
        assert_eq!(r, Ok(true));
        assert_eq!(scx.enter(|s| s.is_poisoned(h)).unwrap(), Ok(true));
    });
}

/// A slot whose generation is spent (2^32 reuses) is retired, never handed out again: a handle
/// from its first use could otherwise name the new object. The 2^32 cycles are simulated by
/// writing the slot's state word (fault injection into the table).
#[test]
fn a_slot_whose_generation_is_spent_is_retired() {
    watchdog(60, || {
        let pool = heap_only();
        let heap = pool.heap().clone();
        let scx = SharedContext::create(&heap, "generations").unwrap();
        let (hdr, _) = scx.share().to_raw();
        let first = scx.enter(|s| s.alloc(111u64).unwrap()).unwrap();
        let (ctx, slot, generation) = first.id().to_raw();
        assert_eq!((slot, generation), (0, 1));
        // Slot 0's record: the table header points at a 64-aligned block of the heap whose first
        // word is slot 0's state (generation 1 << 32 | LIVE).
        let rec = (0..512usize)
            .find_map(|i| {
                // SAFETY: reads of the context's header block (at least 4 KiB), in the heap.
                let v = unsafe { *((hdr as usize + i * 8) as *const u64) } as usize;
                let is_rec = v != 0
                    && v % 64 == 0
                    && heap.contains(v as *const u8)
                    // SAFETY: an address inside the heap, mapped in this process.
                    && unsafe { *(v as *const u64) } == (1u64 << 32) | 1;
                is_rec.then_some(v)
            })
            .expect("slot 0's record");
        // SAFETY: the state word is an AtomicU64 in the shared table; written under the lock.
        let state = unsafe { &*(rec as *const AtomicU64) };
        scx.enter(|_| state.store((u64::from(u32::MAX) << 32) | 1, Ordering::Relaxed))
            .unwrap();
        let last = ObjectId::from_raw(ctx, 0, u32::MAX).typed::<u64>();
        assert_eq!(scx.enter(|s| s.get(last)).unwrap(), Ok(111));
        scx.enter(|s| s.free(last)).unwrap().unwrap();
        let next = scx.enter(|s| s.alloc(222u64).unwrap()).unwrap();
        assert_ne!(
            next.id().to_raw().1,
            0,
            "the spent slot was reused: {next:?}"
        );
        assert_eq!(
            scx.enter(|s| s.get(first)).unwrap(),
            Err(ObjectError::Stale)
        );
        assert_eq!(scx.enter(|s| s.get(next)).unwrap(), Ok(222));
    });
}

// ---------------------------------------------------------------------------------------------
// Several processes.

/// A job's view: where the context is, the object, flags to synchronize with the master.
#[repr(C)]
struct Args {
    ctx: SharedContextRef,
    obj: SharedHandle<[u64; 2]>,
    iters: u64,
    flags: [AtomicU64; 4],
}

// SAFETY: plain numbers and atomics (the reference and the handle are ShareSafe), no drop glue, any
// bit pattern valid.
unsafe impl ShareSafe for Args {}

fn args(
    pool: &Pool,
    scx: &SharedContext,
    obj: SharedHandle<[u64; 2]>,
    iters: u64,
) -> SharedBox<Args> {
    SharedBox::new(
        pool.heap(),
        Args {
            ctx: scx.share(),
            obj,
            iters,
            flags: Default::default(),
        },
    )
    .expect("args")
}

/// Waits (bounded) for a flag another process sets.
fn await_flag(f: &AtomicU64, want: u64) -> bool {
    wait_for(T, || f.load(Ordering::SeqCst) == want)
}

fn increment(jcx: &JobContext, a: &Args) -> u64 {
    let Ok(scx) = SharedContext::open(jcx.heap(), a.ctx) else {
        return u64::MAX;
    };
    let mut n = 0;
    for _ in 0..a.iters {
        let r = scx.enter_timeout(T, |s| {
            s.with(a.obj, |c| {
                // A read-modify-write of plain memory: only mutual exclusion keeps it exact.
                let v = std::hint::black_box(c[0]);
                c[0] = v + 1;
                c[1] = std::hint::black_box(c[1]) + 1;
            })
        });
        match r {
            Ok(Ok(())) => n += 1,
            _ => return u64::MAX - 1,
        }
    }
    n
}

fn counter_across_processes() -> anyhow::Result<()> {
    const ITERS: u64 = 20_000;
    let mut pool = small_pool(3).build()?;
    let scx = SharedContext::create(pool.heap(), "counter")?;
    let obj = scx.enter(|s| s.alloc([0u64; 2]))??;
    let a = args(&pool, &scx, obj, ITERS);
    let (res, mine) = pool.broadcast_during(increment, &a, T * 3, |_, _| {
        let mut n = 0;
        for _ in 0..ITERS {
            if let Ok(Ok(())) = scx.enter(|s| {
                s.with(obj, |c| {
                    let v = std::hint::black_box(c[0]);
                    c[0] = v + 1;
                    c[1] += 1;
                })
            }) {
                n += 1;
            }
        }
        n
    });
    ensure!(mine == ITERS, "master increments: {mine}");
    for r in res {
        let r = r?;
        ensure!(r == ITERS, "worker increments: {r}");
    }
    let total = scx.enter(|s| s.with(obj, |c| *c))??;
    ensure!(
        total == [4 * ITERS; 2],
        "no lost update across 4 processes: {total:?}"
    );
    let stats = scx.stats();
    ensure!(stats.entries >= ITERS, "{stats:?}");
    ensure!(scx.recoveries() == 0);
    Ok(())
}
isolated_test!(
    increments_from_four_processes_are_exact,
    counter_across_processes,
    120
);

fn hold_borrowed_across_a_nested_call(jcx: &JobContext, a: &Args) -> u64 {
    if jcx.index() != 0 {
        return 0;
    }
    let Ok(scx) = SharedContext::open(jcx.heap(), a.ctx) else {
        return u64::MAX;
    };
    let local = Context::new("worker-local");
    let r = scx.enter(|s| {
        s.with(a.obj, |c| {
            c[0] = 7;
            let inner = local.enter(|_| {
                a.flags[0].store(1, Ordering::SeqCst); // suspended, object borrowed
                await_flag(&a.flags[1], 1)
            });
            c[1] = 7;
            inner
        })
    });
    match r {
        Ok(Ok(Ok(true))) => 1,
        _ => u64::MAX - 1,
    }
}

fn nested_in_use() -> anyhow::Result<()> {
    let mut pool = small_pool(2).build()?;
    let scx = SharedContext::create(pool.heap(), "nested")?;
    let obj = scx.enter(|s| s.alloc([0u64; 2]))??;
    let spare = scx.enter(|s| s.alloc(0u64))??;
    let a = args(&pool, &scx, obj, 0);
    let (res, seen) =
        pool.broadcast_during(hold_borrowed_across_a_nested_call, &a, T, |_, pids| {
            ensure!(await_flag(&a.flags[0], 1), "the worker never got suspended");
            // The worker is suspended in a local context: the shared lock is free, its object is not.
            let r = scx.enter_timeout(T, |s| {
                (
                    s.with(obj, |c| *c),
                    s.with(spare, |v| {
                        *v += 1;
                        *v
                    }),
                )
            });
            let (on_obj, on_spare) = r?;
            let pid = u32::try_from(pids[0])?;
            ensure!(on_obj == Err(ObjectError::InUse { pid }), "{on_obj:?}");
            ensure!(on_spare == Ok(1), "{on_spare:?}");
            a.flags[1].store(1, Ordering::SeqCst);
            anyhow::Ok(())
        });
    seen?;
    ensure!(res[0].as_ref().ok() == Some(&1), "{:?}", res[0]);
    // Now free again: the update the worker finished after its nested call is visible.
    let c = scx.enter_timeout(T, |s| s.with(obj, |c| *c))??;
    ensure!(c == [7, 7], "{c:?}");
    Ok(())
}
isolated_test!(
    a_borrow_held_across_a_nested_call_is_in_use_elsewhere,
    nested_in_use,
    60
);

fn die_holding(jcx: &JobContext, a: &Args) -> u64 {
    if jcx.index() != 0 {
        return 0;
    }
    let Ok(scx) = SharedContext::open(jcx.heap(), a.ctx) else {
        return u64::MAX;
    };
    let _ = scx.enter(|s| {
        s.with(a.obj, |c: &mut [u64; 2]| -> u64 {
            c[0] = 999; // half of an update: c[1] is not written yet
            a.flags[0].store(1, Ordering::SeqCst);
            loop {
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    });
    u64::MAX - 1
}

fn killed_holding() -> anyhow::Result<()> {
    let mut pool = small_pool(2).build()?;
    let scx = SharedContext::create(pool.heap(), "crash")?;
    let obj = scx.enter(|s| s.alloc([1u64, 1]))??;
    let untouched = scx.enter(|s| s.alloc(5u64))??;
    let a = args(&pool, &scx, obj, 0);
    let (res, seen) = pool.broadcast_during(die_holding, &a, T, |_, pids| {
        ensure!(
            await_flag(&a.flags[0], 1),
            "the worker never took the context"
        );
        ensure!(scx.is_locked(), "the worker holds the lock");
        // SAFETY: a plain syscall on our own child.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
        let r = scx.enter_timeout(T, |s| {
            (
                s.recovered(),
                s.recovery(),
                s.with(obj, |c| *c),
                s.with(untouched, |v| *v),
            )
        })?;
        anyhow::Ok(r)
    });
    let (recovered, recovery, on_obj, on_untouched) = seen?;
    ensure!(recovered, "the next entrant is told");
    let recovery = recovery.context("a recovery report")?;
    ensure!(recovery.repairs == 1, "{recovery:?}");
    ensure!(recovery.poisoned == vec![obj.id()], "{recovery:?}");
    ensure!(recovery.lost == 0, "{recovery:?}");
    ensure!(on_obj == Err(ObjectError::Poisoned), "{on_obj:?}");
    ensure!(
        on_untouched == Ok(5),
        "objects the dead process did not borrow are fine"
    );
    ensure!(
        matches!(res[0], Err(PoolError::WorkerDied { .. })),
        "{:?}",
        res[0]
    );
    // The half-done update is there for repair; clear_poison accepts the object again.
    let c = scx.enter(|s| {
        let was = s.clear_poison(obj);
        let c = s.with(obj, |c| {
            let seen = *c;
            c[1] = c[0];
            seen
        });
        (was, c)
    })?;
    ensure!(c == (Ok(true), Ok([999, 1])), "{c:?}");
    // Repaired and declared consistent: later entries are ordinary, from every process.
    ensure!(!scx.enter(|s| s.recovered())?);
    ensure!(scx.recoveries() == 1);
    let a2 = args(&pool, &scx, obj, 100);
    for r in pool.broadcast(increment, &a2, T) {
        ensure!(r? == 100);
    }
    let c = scx.enter(|s| s.with(obj, |c| *c))??;
    ensure!(c == [1199, 1199], "{c:?}");
    Ok(())
}
isolated_test!(
    a_process_killed_inside_the_context_is_repaired,
    killed_holding,
    60
);

fn die_suspended(jcx: &JobContext, a: &Args) -> u64 {
    if jcx.index() != 0 {
        return 0;
    }
    let Ok(scx) = SharedContext::open(jcx.heap(), a.ctx) else {
        return u64::MAX;
    };
    let local = Context::new("worker-local");
    let _ = scx.enter(|s| {
        s.with(a.obj, |c| {
            c[0] = 5;
            let _ = local.enter(|_| -> u64 {
                a.flags[0].store(1, Ordering::SeqCst);
                loop {
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        })
    });
    u64::MAX - 1
}

fn killed_suspended() -> anyhow::Result<()> {
    let mut pool = small_pool(1).build()?;
    let scx = SharedContext::create(pool.heap(), "suspended")?;
    let obj = scx.enter(|s| s.alloc([0u64, 0]))??;
    let a = args(&pool, &scx, obj, 0);
    let (res, seen) = pool.broadcast_during(die_suspended, &a, T, |_, pids| {
        ensure!(await_flag(&a.flags[0], 1), "the worker never got suspended");
        let alive = scx.enter(|s| s.with(obj, |c| *c))?;
        ensure!(matches!(alive, Err(ObjectError::InUse { .. })), "{alive:?}");
        // SAFETY: a plain syscall on our own child.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
        // The borrower is found dead at the next conflict (a zombie counts as dead).
        let mut last = None;
        let reclaimed = wait_for(T, || {
            let r = scx.enter(|s| (s.get(obj), s.recovery()));
            let done = matches!(r, Ok((Err(ObjectError::Poisoned), Some(_))));
            last = Some(r);
            done
        });
        ensure!(
            reclaimed,
            "the dead borrower's object was not reclaimed: {last:?}"
        );
        let Some(Ok((_, Some(recovery)))) = last else {
            bail!("no recovery report");
        };
        anyhow::Ok(recovery)
    });
    let recovery = seen?;
    ensure!(recovery.poisoned == vec![obj.id()], "{recovery:?}");
    ensure!(
        recovery.repairs == 0,
        "nobody died holding the lock: {recovery:?}"
    );
    ensure!(
        matches!(res[0], Err(PoolError::WorkerDied { .. })),
        "{:?}",
        res[0]
    );
    let r = scx.enter(|s| {
        (
            s.with(obj, |c| *c),
            s.clear_poison(obj),
            s.with(obj, |c| *c),
        )
    })?;
    ensure!(
        r == (Err(ObjectError::Poisoned), Ok(true), Ok([5, 0])),
        "{r:?}"
    );
    ensure!(scx.recoveries() == 1);
    Ok(())
}
isolated_test!(
    a_process_killed_while_suspended_releases_its_borrow,
    killed_suspended,
    60
);

/// The queries (`is_poisoned`, `poisoned`, `clear_poison`) see a borrower that died suspended as
/// `with` does: the object is reclaimed and reported poisoned, not called healthy.
fn killed_suspended_queries() -> anyhow::Result<()> {
    let mut pool = small_pool(1).build()?;
    let scx = SharedContext::create(pool.heap(), "suspended-queries")?;
    let obj = scx.enter(|s| s.alloc([0u64, 0]))??;
    let a = args(&pool, &scx, obj, 0);
    let (_res, seen) = pool.broadcast_during(die_suspended, &a, T, |_, pids| {
        ensure!(await_flag(&a.flags[0], 1), "the worker never got suspended");
        // SAFETY: a plain syscall on our own child.
        unsafe { libc::kill(pids[0], libc::SIGKILL) };
        // Until the kernel reports the death, the borrower is alive and the object merely in use.
        let mut last = None;
        let seen = wait_for(T, || {
            let r = scx.enter(|s| s.is_poisoned(obj));
            let done = matches!(r, Ok(Ok(true)));
            last = Some(r);
            done
        });
        ensure!(
            seen,
            "is_poisoned never reported the dead borrower: {last:?}"
        );
        let r = scx.enter(|s| (s.poisoned(), s.clear_poison(obj), s.with(obj, |c| *c)))?;
        anyhow::Ok(r)
    });
    let r = seen?;
    ensure!(r == (Ok(vec![obj.id()]), Ok(true), Ok([5, 0])), "{r:?}");
    ensure!(scx.recoveries() == 1);
    Ok(())
}
isolated_test!(
    queries_report_a_borrower_that_died_suspended,
    killed_suspended_queries,
    60
);

/// A handle the master made before this worker was forked.
static INHERITED: OnceLock<(SharedContext, SharedHandle<[u64; 2]>)> = OnceLock::new();

fn use_inherited(jcx: &JobContext) -> u64 {
    let Some((scx, obj)) = INHERITED.get() else {
        return 1 << 40; // forked before the master made the handle
    };
    // Entering re-registers this process with the lock; objects are reachable.
    let Ok(Ok(v)) = scx.enter(|s| {
        s.with(*obj, |c| {
            c[0] += 1;
            c[0]
        })
    }) else {
        return 1 << 41;
    };
    // Allocation would use the master's allocator slot: refused.
    let Ok(Err(ObjectError::InheritedHandle)) = scx.enter(|s| s.alloc(1u64)) else {
        return 1 << 42;
    };
    // Opened with this process's heap, it allocates and frees.
    let Ok(own) = SharedContext::open(jcx.heap(), scx.share()) else {
        return 1 << 43;
    };
    let Ok(Ok(())) = own.enter(|s| s.alloc(1u64).and_then(|h| s.free(h))) else {
        return 1 << 44;
    };
    v
}

fn inherited_by_fork() -> anyhow::Result<()> {
    let mut pool = small_pool(1).build()?;
    ensure!(
        pool.run_fn(0, use_inherited, T)? == 1 << 40,
        "set after the first fork"
    );
    let scx = SharedContext::create(pool.heap(), "inherited")?;
    let obj = scx.enter(|s| s.alloc([10u64, 0]))??;
    if INHERITED.set((scx.clone(), obj)).is_err() {
        bail!("set twice");
    }
    // A replacement worker is forked now and inherits the handle.
    pool.kill_worker(0)?;
    let deadline = Instant::now() + T;
    let mut found = 0;
    while found == 0 && Instant::now() < deadline {
        found += pool.supervise();
        std::thread::sleep(Duration::from_millis(5));
    }
    ensure!(found == 1, "the killed worker was not noticed");
    ensure!(pool.run_fn(0, use_inherited, T)? == 11);
    ensure!(scx.enter(|s| s.with(obj, |c| c[0]))?? == 11);
    ensure!(
        scx.enter(|s| s.len())?? == 1,
        "the worker freed what it allocated"
    );
    Ok(())
}
isolated_test!(
    a_handle_inherited_by_fork_enters_but_does_not_allocate,
    inherited_by_fork,
    60
);
