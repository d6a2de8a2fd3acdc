//! The handoff protocol: idle fast path, busy path, re-entrancy, multi-enter, panics, counters.

mod common;

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{wait_until, watchdog};
use context_core::{
    AccessError, CloseError, Context, EnterError, enter_all, held_contexts, os, suspended,
};

#[test]
fn idle_handoffs_make_no_voluntary_context_switches() {
    watchdog(60, || {
        let a = Context::new("a");
        let b = Context::new("b");
        // Warm up (first-touch page faults, lazy TLS) before counting.
        a.enter(|_| {
            for _ in 0..1000 {
                b.enter(|_| ()).unwrap();
            }
        })
        .unwrap();
        let (before, _) = os::thread_context_switches().unwrap();
        a.enter(|_| {
            for _ in 0..100_000 {
                b.enter(|_| ()).unwrap();
            }
        })
        .unwrap();
        let (after, _) = os::thread_context_switches().unwrap();
        assert_eq!(
            after - before,
            0,
            "idle handoffs must never block in the kernel"
        );
        assert_eq!(b.stats().contended_entries, 0);
        assert_eq!(b.stats().fast_entries, 101_000);
    });
}

#[test]
fn nested_chain_releases_and_reacquires() {
    let a = Context::new("a");
    let b = Context::new("b");
    let c = Context::new("c");
    let ha = a.enter(|cx| cx.adopt(String::from("a"))).unwrap().unwrap();
    let (a2, b2, c2) = (a.clone(), b.clone(), c.clone());
    let out = a
        .enter(move |cx_a| {
            assert_eq!(held_contexts(), vec![a2.id()]);
            let inner = b2.enter(|_| {
                assert_eq!(held_contexts(), vec![b2.id()]);
                // A was released: another thread could take it now.
                assert!(!a2.lock_is_held_for_test());
                // A -> B -> A: re-entering A from B works (A is idle, B is released meanwhile).
                let s = a2.enter(|cx| cx.with(ha, |s| s.clone())).unwrap().unwrap();
                // -> C
                let t = c2.enter(|_| held_contexts()).unwrap();
                assert_eq!(t, vec![c2.id()]);
                s
            });
            assert_eq!(held_contexts(), vec![a2.id()]);
            // The outer Cx is usable again once the nested call returned.
            cx_a.with(ha, |s| s.push('!')).unwrap();
            inner.unwrap()
        })
        .unwrap();
    assert_eq!(out, "a");
    assert_eq!(
        a.enter(|cx| cx.with(ha, |s| s.clone())).unwrap().unwrap(),
        "a!"
    );
    assert!(held_contexts().is_empty());
}

trait LockProbe {
    fn lock_is_held_for_test(&self) -> bool;
}
impl LockProbe for Context {
    fn lock_is_held_for_test(&self) -> bool {
        use context_core::RawContextLock;
        self.lock().is_locked()
    }
}

#[test]
fn suspended_cx_is_refused_not_raced() {
    let a = Context::new("a");
    let b = Context::new("b");
    let h = a.enter(|cx| cx.adopt(1u32)).unwrap().unwrap();
    let b2 = b.clone();
    a.enter(move |cx_a| {
        let cx_a = &*cx_a;
        // Using A's Cx while the thread holds only B is refused.
        let inside = b2.enter_local(|_| cx_a.with(h, |v| *v)).unwrap();
        assert_eq!(inside, Err(AccessError::NotHeld(cx_a.id())));
        assert_eq!(cx_a.with(h, |v| *v), Ok(1));
    })
    .unwrap();
}

#[test]
fn reentrant_access_to_a_borrowed_object_is_busy() {
    let a = Context::new("a");
    let b = Context::new("b");
    let h = a.enter(|cx| cx.adopt(vec![1, 2, 3])).unwrap().unwrap();
    let (a2, b2) = (a.clone(), b.clone());
    let r = a
        .enter(move |cx| {
            cx.with(h, |v| {
                v.push(4);
                // While `v` is borrowed, a call chain that comes back into A cannot reach it.
                b2.enter(|_| a2.enter(|cx| cx.with(h, |v| v.len())).unwrap())
                    .unwrap()
            })
        })
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(AccessError::Busy(_))));
    assert_eq!(a.enter(|cx| cx.with(h, |v| v.len())).unwrap().unwrap(), 4);
}

#[test]
fn handles_give_typed_errors() {
    let a = Context::new("a");
    let b = Context::new("b");
    let h = a.enter(|cx| cx.adopt(7u64)).unwrap().unwrap();
    // Wrong context.
    let r = b.enter(|cx| cx.with(h, |v| *v)).unwrap();
    assert!(matches!(r, Err(AccessError::WrongContext { .. })));
    // Wrong type.
    let r = a
        .enter(|cx| cx.with(h.cast::<String>(), |v| v.len()))
        .unwrap();
    assert!(matches!(r, Err(AccessError::WrongType { .. })));
    // Stale after removal.
    assert_eq!(a.enter(|cx| cx.remove(h)).unwrap(), Ok(7));
    let r = a.enter(|cx| cx.with(h, |v| *v)).unwrap();
    assert!(matches!(r, Err(AccessError::Stale(_))));
    // A forged handle from raw numbers is just as harmless.
    let forged = context_core::Handle::<u64>::from_raw(a.id().get(), 12345, 0).unwrap();
    assert!(matches!(
        a.enter(|cx| cx.with(forged, |v| *v)).unwrap(),
        Err(AccessError::Stale(_))
    ));
    // A value that is not Send cannot go into a free context.
    let r = a
        .enter_local(|cx| cx.adopt_local(std::rc::Rc::new(1)).map(|_| ()))
        .unwrap();
    assert!(matches!(r, Err(AccessError::NotPinned(_))));
}

#[test]
fn panic_is_an_error_and_poisons_only_the_object() {
    let a = Context::new("a");
    let (h, other) = a
        .enter(|cx| (cx.adopt(0u32).unwrap(), cx.adopt(10u32).unwrap()))
        .unwrap();
    let r = a.enter(move |cx| {
        cx.with(h, |v| {
            *v = 1;
            panic!("half-way through");
        })
    });
    match r {
        Err(EnterError::Panicked { context, message }) => {
            assert_eq!(context, a.id());
            assert_eq!(message, "half-way through");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    // The context is released and usable; the other object is fine; the borrowed one is poisoned.
    assert_eq!(a.enter(|cx| cx.with(other, |v| *v)).unwrap(), Ok(10));
    assert!(matches!(
        a.enter(|cx| cx.with(h, |v| *v)).unwrap(),
        Err(AccessError::Poisoned(_))
    ));
    assert_eq!(a.enter(|cx| cx.clear_poison(h)).unwrap(), Ok(true));
    assert_eq!(a.enter(|cx| cx.with(h, |v| *v)).unwrap(), Ok(1));
    assert_eq!(a.stats().panics, 1);
    // A panic in a nested context does not unwind into the caller's context.
    let b = Context::new("b");
    let b2 = b.clone();
    let outer = a.enter(move |_| {
        matches!(
            b2.enter(|_| panic!("inner")),
            Err(EnterError::Panicked { .. })
        )
    });
    assert_eq!(outer, Ok(true));
}

#[test]
fn try_enter_and_timeout_on_a_busy_context() {
    watchdog(30, || {
        let a = Context::new("a");
        let entered = Arc::new(Barrier::new(2));
        let release = Arc::new(AtomicBool::new(false));
        let holder = {
            let (a, entered, release) = (a.clone(), entered.clone(), release.clone());
            std::thread::spawn(move || {
                a.enter(move |_| {
                    entered.wait();
                    while !release.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
                .unwrap();
            })
        };
        entered.wait();
        assert_eq!(a.try_enter(|_| ()), Err(EnterError::WouldBlock(a.id())));
        let t0 = Instant::now();
        assert_eq!(
            a.enter_timeout(Duration::from_millis(50), |_| ()),
            Err(EnterError::TimedOut(a.id()))
        );
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // The timed-out waiter left the queue: the holder can still release normally.
        assert_eq!(a.lock().queued_waiters(), 0);
        release.store(true, Ordering::Release);
        holder.join().unwrap();
        assert_eq!(a.try_enter(|_| 5), Ok(5));
        assert_eq!(a.stats().gave_up, 2);
    });
}

#[test]
fn waiters_are_served_first_come_first_served() {
    watchdog(60, || {
        let a = Context::new("a");
        let order = Arc::new(Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let a = a.clone();
            std::thread::spawn(move || a.enter(move |_| gate_rx.recv().unwrap()).unwrap())
        };
        wait_until("holder inside", || a.lock_is_held_for_test());
        let mut waiters = Vec::new();
        for i in 0..6 {
            let (a2, order) = (a.clone(), order.clone());
            waiters.push(std::thread::spawn(move || {
                a2.enter(move |_| order.lock().unwrap().push(i)).unwrap()
            }));
            // Queue them one at a time so arrival order is known.
            wait_until("waiter queued", || a.lock().queued_waiters() == i + 1);
        }
        gate_tx.send(()).unwrap();
        holder.join().unwrap();
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert!(a.stats().contended_entries >= 6);
        assert!(a.stats().wait_nanos > 0);
    });
}

/// A counter that is deliberately not atomic: only the context lock protects it.
struct Racy(UnsafeCell<u64>);
// SAFETY: every access happens inside `enter` of the one context that guards it (the property
// under test); a failure of mutual exclusion shows up as lost updates.
unsafe impl Sync for Racy {}

#[test]
fn stress_mutual_exclusion_with_handoffs() {
    watchdog(120, || {
        const THREADS: usize = 8;
        const ITERS: usize = 3_000;
        let contexts: Vec<Context> = (0..4).map(|i| Context::new(&format!("s{i}"))).collect();
        let counters: Arc<Vec<Racy>> = Arc::new((0..4).map(|_| Racy(UnsafeCell::new(0))).collect());
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let contexts = contexts.clone();
                let counters = counters.clone();
                std::thread::spawn(move || {
                    let mut seed = t as u64 * 7919 + 1;
                    for _ in 0..ITERS {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let i = (seed >> 33) as usize % 4;
                        let j = (seed >> 40) as usize % 4;
                        let (ci, cj) = (&counters[i], &counters[j]);
                        let cj_ctx = contexts[j].clone();
                        contexts[i]
                            .enter(move |_| {
                                bump(ci);
                                // Hand off into another context and back while "holding" i.
                                cj_ctx.enter(move |_| bump(cj)).unwrap();
                                bump(ci);
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = counters
            .iter()
            .zip(&contexts)
            // SAFETY: all threads joined; we hold the context while reading.
            .map(|(c, ctx)| ctx.enter(|_| unsafe { *c.0.get() }).unwrap())
            .sum();
        assert_eq!(total, (THREADS * ITERS * 3) as u64);
    });
}

fn bump(c: &Racy) {
    // SAFETY: called only inside `enter` of the context that guards `c`.
    let v = unsafe { *c.0.get() };
    std::hint::spin_loop();
    // SAFETY: as above.
    unsafe { *c.0.get() = v + 1 };
}

#[test]
fn enter_all_uses_one_global_order_and_cannot_deadlock() {
    watchdog(60, || {
        let a = Context::new("a");
        let b = Context::new("b");
        let (ha, hb) = (
            a.enter(|cx| cx.adopt(vec![1u8; 16])).unwrap().unwrap(),
            b.enter(|cx| cx.adopt(vec![0u8; 16])).unwrap().unwrap(),
        );
        let done = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (a, b, done) = (a.clone(), b.clone(), done.clone());
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        // Half the threads name them in the other order.
                        let set = if t % 2 == 0 { [&a, &b] } else { [&b, &a] };
                        enter_all(&set, |cxs| {
                            let (x, y) = cxs.split_at_mut(1);
                            let (cx_a, cx_b) = if t % 2 == 0 {
                                (&x[0], &y[0])
                            } else {
                                (&y[0], &x[0])
                            };
                            cx_a.with(ha, |src| cx_b.with(hb, |dst| dst.copy_from_slice(src)))
                                .unwrap()
                                .unwrap();
                        })
                        .unwrap();
                        // And mix in a single handoff between them.
                        let b2 = b.clone();
                        a.enter(move |_| b2.enter(|_| ()).unwrap()).unwrap();
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(done.load(Ordering::Relaxed), 4);
        assert_eq!(
            b.enter(|cx| cx.with(hb, |v| v.clone())).unwrap().unwrap(),
            vec![1u8; 16]
        );
    });
}

#[test]
fn close_drops_objects_and_refuses_entry() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let a = Context::new("a");
    let flag = Flag(dropped.clone());
    let h = a.enter(move |cx| cx.adopt(flag)).unwrap().unwrap();
    // Closing from inside a borrow of one of its objects is refused.
    let a2 = a.clone();
    let r = a
        .enter(move |cx| cx.with(h, |_| a2.close()))
        .unwrap()
        .unwrap();
    assert_eq!(r, Err(CloseError::InUse(a.id())));
    assert!(!dropped.load(Ordering::SeqCst));
    a.close().unwrap();
    assert!(dropped.load(Ordering::SeqCst));
    assert!(a.is_closed());
    assert_eq!(a.enter(|_| ()), Err(EnterError::Closed(a.id())));
    assert_eq!(a.close(), Ok(()));
}

#[test]
fn an_object_suspended_on_another_thread_is_in_use_not_busy() {
    watchdog(30, || {
        let a = Context::new("a");
        let b = Context::new("b");
        let h = a.enter(|cx| cx.adopt(0u32)).unwrap().unwrap();
        let (inside_b_tx, inside_b_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let t1 = {
            let (a, b) = (a.clone(), b.clone());
            std::thread::spawn(move || {
                a.enter(move |cx| {
                    cx.with(h, |v| {
                        *v += 1;
                        // Call out of A while the object is borrowed; A itself is released.
                        b.enter(move |_| {
                            inside_b_tx.send(()).unwrap();
                            release_rx.recv().unwrap();
                        })
                        .unwrap();
                        *v += 1;
                    })
                })
                .unwrap()
                .unwrap();
            })
        };
        inside_b_rx.recv().unwrap();
        // A is free, the object is not: another thread is told to retry, not that it re-entered.
        assert_eq!(
            a.try_enter(|cx| cx.with(h, |v| *v)).unwrap(),
            Err(AccessError::InUse(a.id()))
        );
        release_tx.send(()).unwrap();
        t1.join().unwrap();
        assert_eq!(a.enter(|cx| cx.with(h, |v| *v)).unwrap(), Ok(2));
    });
}

#[test]
fn suspended_releases_the_callers_contexts_and_takes_them_back() {
    watchdog(30, || {
        let a = Context::new("a");
        let h = a.enter(|cx| cx.adopt(0u32)).unwrap().unwrap();
        // Outside any context it just runs.
        assert_eq!(suspended(|| 7), Ok(7));
        let other = a.clone();
        let seen = a
            .enter(move |cx| {
                let during = suspended(|| {
                    // A is free now: another thread enters it and changes the object.
                    let t = std::thread::spawn(move || {
                        other
                            .try_enter(|cx| cx.with(h, |v| *v = 5))
                            .unwrap()
                            .unwrap();
                    });
                    t.join().unwrap();
                    held_contexts()
                })
                .unwrap();
                assert!(during.is_empty());
                // Held again, and the object is usable through the same Cx.
                assert_eq!(held_contexts(), vec![cx.id()]);
                cx.with(h, |v| *v).unwrap()
            })
            .unwrap();
        assert_eq!(seen, 5);
    });
}

#[test]
fn suspended_refuses_a_captured_cx_and_survives_panics_and_closes() {
    watchdog(30, || {
        let a = Context::new("a");
        let h = a.enter(|cx| cx.adopt(1u32)).unwrap().unwrap();
        a.enter(|cx| {
            let cx = &*cx;
            let inside = suspended(|| cx.with(h, |v| *v)).unwrap();
            assert_eq!(inside, Err(AccessError::NotHeld(cx.id())));
            // A panic inside propagates, and the context is held again when it does.
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                suspended(|| panic!("inside")).ok();
            }));
            assert!(caught.is_err());
            assert_eq!(held_contexts(), vec![cx.id()]);
            assert_eq!(cx.with(h, |v| *v), Ok(1));
        })
        .unwrap();
        // Closed while released: the caller gets it back (as after any call out of it), without
        // its objects; later entries are refused.
        let closer = a.clone();
        let r = a
            .enter(move |cx| {
                let r = suspended(move || closer.close().unwrap());
                (r, held_contexts(), cx.with(h, |v| *v))
            })
            .unwrap();
        assert_eq!(r.0, Ok(()));
        assert_eq!(r.1, vec![a.id()]);
        assert!(r.2.is_err());
        assert!(matches!(a.enter(|_| ()), Err(EnterError::Closed(_))));
    });
}

/// An object whose destructor re-enters its own context and adopts more objects there (a cleanup
/// record, say). Closing runs destructors with no reference into the table live (Miri checks the
/// aliasing), and the objects adopted meanwhile are dropped by the same close.
#[test]
fn close_with_a_destructor_that_reenters_and_adopts() {
    struct AdoptOnDrop(Context, Arc<AtomicUsize>);
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl Drop for AdoptOnDrop {
        fn drop(&mut self) {
            let dropped = Arc::clone(&self.1);
            let r = self.0.enter(move |cx| {
                for _ in 0..64 {
                    cx.adopt(Counted(Arc::clone(&dropped))).unwrap();
                }
            });
            assert!(r.is_ok(), "{r:?}");
        }
    }
    watchdog(60, || {
        let dropped = Arc::new(AtomicUsize::new(0));
        let a = Context::new("a");
        a.enter(|cx| {
            cx.adopt(AdoptOnDrop(a.clone(), Arc::clone(&dropped)))
                .unwrap();
            cx.adopt(Counted(Arc::clone(&dropped))).unwrap();
        })
        .unwrap();
        a.close().unwrap();
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            65,
            "adopted during close, dropped by it"
        );
        assert_eq!(a.enter(|cx| cx.len()), Err(EnterError::Closed(a.id())));
    });
}
