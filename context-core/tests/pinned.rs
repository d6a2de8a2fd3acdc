//! Pinned contexts: every call runs on the home thread.

mod common;

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::watchdog;
use context_core::{Context, EnterError};

/// Has another thread enter `ctx` and stay inside until the returned flag is set; returns once it
/// is inside.
fn keep_busy(ctx: &Context) -> (std::thread::JoinHandle<()>, Arc<AtomicBool>) {
    let started = Arc::new(Barrier::new(2));
    let release = Arc::new(AtomicBool::new(false));
    let busy = {
        let (ctx, started, release) = (ctx.clone(), started.clone(), release.clone());
        std::thread::spawn(move || {
            ctx.enter(move |_| {
                started.wait();
                while !release.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .unwrap();
        })
    };
    started.wait();
    (busy, release)
}

#[test]
fn calls_run_on_the_home_thread_and_hold_non_send_values() {
    watchdog(30, || {
        let p = Context::pinned("p").unwrap();
        let home = p.enter(|_| std::thread::current().id()).unwrap();
        assert_ne!(home, std::thread::current().id());
        let h = p
            .enter(|cx| cx.adopt_local(Rc::new(std::cell::RefCell::new(vec![1]))))
            .unwrap()
            .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let (tid, _) = p
                            .enter(move |cx| {
                                let tid = std::thread::current().id();
                                (tid, cx.with(h, |v| v.borrow_mut().push(i)).unwrap())
                            })
                            .unwrap();
                        assert_eq!(tid, home);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            p.enter(move |cx| cx.with(h, |v| v.borrow().len())).unwrap(),
            Ok(2001)
        );
        assert_eq!(p.stats().shipped_calls, 2003);
        // enter_local from a foreign thread is refused rather than run on the wrong thread.
        assert_eq!(
            p.enter_local(|_| ()),
            Err(EnterError::NotHomeThread(p.id()))
        );
    });
}

#[test]
fn pinned_reentrancy_across_home_threads() {
    watchdog(30, || {
        // P -> Q -> P: P's home thread waits for Q and meanwhile serves P's own queue.
        let p = Context::pinned("p").unwrap();
        let q = Context::pinned("q").unwrap();
        let hp = p.enter(|cx| cx.adopt(10u32)).unwrap().unwrap();
        let (p2, q2) = (p.clone(), q.clone());
        let v = p
            .enter(move |_| {
                let p3 = p2.clone();
                q2.enter(move |_| p3.enter(move |cx| cx.with(hp, |v| *v + 1)).unwrap())
                    .unwrap()
            })
            .unwrap();
        assert_eq!(v, Ok(11));
        // Free -> pinned -> the same free context again.
        let f = Context::new("f");
        let hf = f
            .enter(|cx| cx.adopt(String::from("free")))
            .unwrap()
            .unwrap();
        let (f2, p4) = (f.clone(), p.clone());
        let s = f
            .enter(move |_| {
                p4.enter(move |_| f2.enter(move |cx| cx.with(hf, |s| s.clone())).unwrap())
                    .unwrap()
            })
            .unwrap();
        assert_eq!(s, Ok("free".to_owned()));
    });
}

#[test]
fn panics_on_the_home_thread_are_errors() {
    watchdog(30, || {
        let p = Context::pinned("p").unwrap();
        let r: Result<(), _> = p.enter(|_| panic!("in pinned"));
        assert!(matches!(r, Err(EnterError::Panicked { .. })));
        assert_eq!(p.enter(|_| 3), Ok(3));
    });
}

#[test]
fn timeout_while_the_home_thread_is_busy() {
    watchdog(30, || {
        let p = Context::pinned("p").unwrap();
        let (busy, release) = keep_busy(&p);
        assert_eq!(
            p.enter_timeout(Duration::from_millis(30), |_| ()),
            Err(EnterError::TimedOut(p.id()))
        );
        assert_eq!(p.try_enter(|_| ()), Err(EnterError::WouldBlock(p.id())));
        release.store(true, Ordering::Release);
        busy.join().unwrap();
        assert_eq!(p.enter_timeout(Duration::from_secs(10), |_| 1), Ok(1));
    });
}

struct ReportDrop(mpsc::Sender<std::thread::ThreadId>);
impl Drop for ReportDrop {
    fn drop(&mut self) {
        let _ = self.0.send(std::thread::current().id());
    }
}

#[test]
fn close_and_last_drop_free_objects_on_the_home_thread() {
    watchdog(30, || {
        let (tx, rx) = mpsc::channel();
        let p = Context::pinned("p").unwrap();
        let home = p.enter(|_| std::thread::current().id()).unwrap();
        let tx2 = tx.clone();
        p.enter(move |cx| cx.adopt_local(ReportDrop(tx2)).map(|_| ()))
            .unwrap()
            .unwrap();
        p.close().unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), home);
        assert_eq!(p.enter(|_| ()), Err(EnterError::Closed(p.id())));

        // Dropping the last clone closes it too, on the home thread.
        let q = Context::pinned("q").unwrap();
        let home_q = q.enter(|_| std::thread::current().id()).unwrap();
        q.enter(move |cx| cx.adopt_local(ReportDrop(tx)).map(|_| ()))
            .unwrap()
            .unwrap();
        drop(q);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), home_q);
    });
}

#[test]
fn a_queued_call_that_times_out_never_runs() {
    watchdog(30, || {
        let p = Context::pinned("p").unwrap();
        let (busy, release) = keep_busy(&p);
        let ran = Arc::new(AtomicBool::new(false));
        let ran2 = ran.clone();
        let r = p.enter_timeout(Duration::from_millis(20), move |_| {
            ran2.store(true, Ordering::SeqCst)
        });
        assert_eq!(r, Err(EnterError::TimedOut(p.id())));
        release.store(true, Ordering::Release);
        busy.join().unwrap();
        // Later calls run, the timed-out one never does.
        assert_eq!(p.enter(|_| 1), Ok(1));
        assert!(!ran.load(Ordering::SeqCst));
    });
}

#[test]
fn a_home_thread_waiting_on_another_keeps_serving_its_own_calls() {
    watchdog(30, || {
        let p = Context::pinned("p").unwrap();
        let q = Context::pinned("q").unwrap();
        let (tx, rx) = mpsc::channel::<&'static str>();
        let (served_tx, served_rx) = mpsc::channel::<()>();
        // P calls Q, and Q returns only once P has served another call: P's home thread must serve
        // its own calls while it waits for Q (no fixed sleep decides the order, so a slow machine
        // or Miri cannot flip it; if P did not serve, Q gives up after 10 s and says so).
        let caller = {
            let (p, q, tx) = (p.clone(), q.clone(), tx.clone());
            std::thread::spawn(move || {
                p.enter(move |_| {
                    q.enter(move |_| {
                        let served = served_rx.recv_timeout(Duration::from_secs(10)).is_ok();
                        let _ = tx.send(if served { "q done" } else { "q gave up" });
                    })
                    .unwrap();
                })
                .unwrap();
            })
        };
        // Give P's home thread time to go to sleep while it waits (not needed for correctness).
        std::thread::sleep(Duration::from_millis(30));
        // Meanwhile another thread calls P: P's home thread serves it while it waits for Q.
        let p2 = p.clone();
        let tx2 = tx.clone();
        let other = std::thread::spawn(move || {
            p2.enter(move |_| {
                let _ = tx2.send("p served");
                let _ = served_tx.send(());
            })
            .unwrap();
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(20)).unwrap(),
            "p served"
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(20)).unwrap(), "q done");
        caller.join().unwrap();
        other.join().unwrap();
    });
}

#[test]
fn an_idle_home_thread_sleeps_and_is_woken() {
    watchdog(30, || {
        let p = Context::pinned("p").unwrap();
        // The home thread's voluntary context switches (blocking in the kernel; spinning and
        // yielding do not count), read on the home thread itself.
        let home_sleeps = || {
            p.enter(|_| context_core::os::thread_context_switches().map(|(v, _)| v))
                .unwrap()
                .unwrap()
        };
        let before = home_sleeps();
        for i in 0..10u32 {
            // Long enough between calls for the home thread to stop spinning and sleep, also on a
            // loaded machine: its backoff yields eight times before it sleeps, and with other
            // threads runnable each yield may cost a time slice (with 5 ms gaps and the rest of
            // the suite running beside it, it slept in only 5-7 of 20).
            std::thread::sleep(Duration::from_millis(40));
            assert_eq!(p.enter(move |_| i * 2), Ok(i * 2));
        }
        let slept = home_sleeps() - before;
        // Each gap ends with a sleep and a wake-up; allow for gaps a loaded machine shortened.
        assert!(
            slept >= 5,
            "the home thread slept {slept} times in 10 idle gaps"
        );
    });
}

#[test]
fn borrow_identity_follows_the_call_chain_not_the_home_thread() {
    use context_core::AccessError;
    watchdog(30, || {
        let p = Context::pinned("p").unwrap();
        let q = Context::pinned("q").unwrap();
        let h = p.enter(|cx| cx.adopt(0u32)).unwrap().unwrap();
        let (in_q_tx, in_q_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        // Chain 1: P's object is borrowed while its method waits in Q...
        let chain1 = {
            let (p2, p3, q2) = (p.clone(), p.clone(), q.clone());
            std::thread::spawn(move || {
                p2.enter(move |cx| {
                    cx.with(h, |v| {
                        // ...and a true re-entry from the same chain (P -> Q -> P) is Busy.
                        let reentry = q2
                            .enter(move |_| {
                                let r = p3.enter(move |cx| cx.with(h, |v| *v)).unwrap();
                                in_q_tx.send(()).unwrap();
                                go_rx.recv().unwrap();
                                r
                            })
                            .unwrap();
                        *v += 1;
                        reentry
                    })
                })
                .unwrap()
                .unwrap()
            })
        };
        in_q_rx.recv().unwrap();
        // Chain 2, served by P's home thread while it waits: the object is in use, retry later.
        let other = p.enter(move |cx| cx.with(h, |v| *v)).unwrap();
        assert_eq!(other, Err(AccessError::InUse(p.id())));
        go_tx.send(()).unwrap();
        assert_eq!(chain1.join().unwrap(), Err(AccessError::Busy(p.id())));
        assert_eq!(p.enter(move |cx| cx.with(h, |v| *v)).unwrap(), Ok(1));
    });
}

#[test]
fn calls_waiting_in_the_mailbox_and_the_queue_are_refused_when_the_home_thread_closes() {
    watchdog(30, || {
        let p = Context::pinned("p").unwrap();
        let started = Arc::new(Barrier::new(2));
        let close_now = Arc::new(AtomicBool::new(false));
        // A job on the home thread that waits for the signal, then closes the context from inside:
        // the home loop then stops and refuses everything still waiting.
        let busy = {
            let (p2, started, close_now) = (p.clone(), started.clone(), close_now.clone());
            std::thread::spawn(move || {
                let inner = p2.clone();
                p2.enter(move |_| {
                    started.wait();
                    while !close_now.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    inner.close().unwrap();
                })
                .unwrap();
            })
        };
        started.wait();
        let ran = Arc::new(AtomicBool::new(false));
        // The first waiting caller takes the mailbox, the others queue behind it.
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (p, ran) = (p.clone(), ran.clone());
                std::thread::spawn(move || p.enter(move |_| ran.store(true, Ordering::SeqCst)))
            })
            .collect();
        // All four wait for the home thread (one in the mailbox, three queued) before it closes:
        // a caller that came after the close would be refused too, without testing the refusal
        // of a waiting call.
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.stats().waiting_calls < 4 {
            assert!(
                Instant::now() < deadline,
                "callers not waiting: {:?}",
                p.stats()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        close_now.store(true, Ordering::Release);
        busy.join().unwrap();
        for c in callers {
            assert_eq!(c.join().unwrap(), Err(EnterError::Closed(p.id())));
        }
        assert!(!ran.load(Ordering::SeqCst), "no refused call ran");
        assert_eq!(p.stats().waiting_calls, 0, "refused calls no longer wait");
    });
}

#[test]
fn many_callers_through_the_mailbox_and_the_queue_all_run_once() {
    watchdog(60, || {
        let p = Context::pinned("p").unwrap();
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (p, count) = (p.clone(), count.clone());
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        let c = count.clone();
                        p.enter(move |_| c.fetch_add(1, Ordering::Relaxed)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(count.load(Ordering::Relaxed), 8_000);
    });
}

/// `try_enter` gives up promptly while the home thread is inside a job that has suspended the
/// context (the lock is free, the thread is not serving).
#[test]
fn try_enter_gives_up_while_the_home_thread_is_inside_a_suspended_job() {
    watchdog(60, || {
        let p = Context::pinned("p").unwrap();
        let (inside_tx, inside_rx) = mpsc::channel();
        let release = Arc::new(AtomicBool::new(false));
        let t = {
            let (p, release) = (p.clone(), Arc::clone(&release));
            std::thread::spawn(move || {
                p.enter(move |_| {
                    context_core::suspended(|| {
                        inside_tx.send(()).unwrap();
                        while !release.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    })
                })
                .unwrap()
                .unwrap();
            })
        };
        inside_rx.recv().unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(p.try_enter(|_| 1), Err(EnterError::WouldBlock(p.id())));
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        release.store(true, Ordering::Release);
        t.join().unwrap();
        assert_eq!(p.try_enter(|_| 2), Ok(2), "idle again");
    });
}

/// A panic whose payload panics again when dropped is still a typed error, and the home thread
/// lives on.
#[test]
#[cfg_attr(
    miri,
    ignore = "the payload's own panic payload is leaked on purpose, which Miri reports"
)]
fn a_panic_payload_that_panics_on_drop_does_not_end_the_home_thread() {
    struct PanicOnDrop;
    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            panic!("payload drop panics on purpose");
        }
    }
    watchdog(60, || {
        let p = Context::pinned("p").unwrap();
        let r = p.enter(|_| std::panic::panic_any(PanicOnDrop));
        assert!(matches!(r, Err(EnterError::Panicked { .. })), "{r:?}");
        assert_eq!(p.enter_timeout(Duration::from_secs(20), |_| 3), Ok(3));
    });
}

/// Every object of a pinned context is dropped on its home thread, also the ones after an object
/// whose destructor panics (they may not be `Send`).
#[test]
fn objects_after_a_panicking_destructor_are_still_dropped_on_the_home_thread() {
    static DROPPED_ON: std::sync::Mutex<Vec<Option<String>>> = std::sync::Mutex::new(Vec::new());
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("destructor panics on purpose");
        }
    }
    /// Not `Send`.
    struct Witness(std::marker::PhantomData<*const ()>);
    impl Drop for Witness {
        fn drop(&mut self) {
            let name = std::thread::current().name().map(str::to_owned);
            DROPPED_ON.lock().unwrap().push(name);
        }
    }
    watchdog(60, || {
        let p = Context::pinned("bombs").unwrap();
        p.enter(|cx| {
            cx.adopt_local(Bomb).unwrap();
            cx.adopt_local(Witness(std::marker::PhantomData)).unwrap();
            cx.adopt_local(Bomb).unwrap();
            cx.adopt_local(Witness(std::marker::PhantomData)).unwrap();
        })
        .unwrap();
        let r = p.close();
        assert!(r.is_err(), "the destructor's panic is reported: {r:?}");
        assert!(p.is_closed());
        let seen = DROPPED_ON.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        for name in seen {
            let name = name.unwrap_or_default();
            assert!(name.starts_with("ctx-bombs-"), "dropped on {name:?}");
        }
        drop(p);
    });
}

/// A close refused because an object is borrowed leaves the pinned context open and serving.
#[test]
fn a_refused_close_leaves_a_pinned_context_open() {
    watchdog(60, || {
        let p = Context::pinned("p").unwrap();
        let q = Context::pinned("q").unwrap();
        let h = p.enter(|cx| cx.adopt(5u32).unwrap()).unwrap();
        let (inside_tx, inside_rx) = mpsc::channel();
        let release = Arc::new(AtomicBool::new(false));
        let t = {
            let (p, release) = (p.clone(), Arc::clone(&release));
            std::thread::spawn(move || {
                // Borrows the object, then calls out (into q), which suspends p meanwhile.
                p.enter(move |cx| {
                    cx.with(h, |v| {
                        q.enter(|_| {
                            inside_tx.send(()).unwrap();
                            while !release.load(Ordering::Acquire) {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        })
                        .unwrap();
                        *v
                    })
                    .unwrap()
                })
                .unwrap()
            })
        };
        inside_rx.recv().unwrap();
        let r = p.close();
        assert!(
            r.is_err(),
            "closing while an object is borrowed is refused: {r:?}"
        );
        release.store(true, Ordering::Release);
        assert_eq!(t.join().unwrap(), 5);
        assert!(!p.is_closed());
        assert_eq!(p.enter(move |cx| cx.with(h, |v| *v)), Ok(Ok(5)));
    });
}
