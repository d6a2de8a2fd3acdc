//! Loom models of `LocalLock`: exactly one owner at a time, no lost wake-up (loom reports a
//! deadlock if every thread is parked), direct handoff to queued waiters, and timeouts that leave
//! the lock consistent. Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p context-core --release --test loom_lock
//! ```
#![cfg(loom)]

use context_core::{LocalLock, RawContextLock};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;

struct Guarded {
    lock: LocalLock,
    /// Loom's UnsafeCell reports any access that is not ordered by the lock as a data race.
    value: UnsafeCell<usize>,
    /// How many threads are inside the critical section right now.
    inside: AtomicUsize,
}

impl Guarded {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            lock: LocalLock::new(),
            value: UnsafeCell::new(0),
            inside: AtomicUsize::new(0),
        })
    }

    fn critical(&self) {
        assert_eq!(
            self.inside.fetch_add(1, Ordering::SeqCst),
            0,
            "two owners at once"
        );
        self.value.with_mut(|v| {
            // SAFETY: loom checks that this access is ordered by the lock.
            unsafe { *v += 1 }
        });
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }

    fn read(&self) -> usize {
        // SAFETY: called after every other thread was joined.
        self.value.with(|v| unsafe { *v })
    }
}

#[test]
fn two_threads_mutual_exclusion_and_no_lost_wakeup() {
    loom::model(|| {
        let g = Guarded::new();
        let g2 = g.clone();
        let t = thread::spawn(move || {
            g2.lock.lock(None).unwrap();
            g2.critical();
            // SAFETY: acquired above.
            unsafe { g2.lock.unlock() };
        });
        g.lock.lock(None).unwrap();
        g.critical();
        // SAFETY: acquired above.
        unsafe { g.lock.unlock() };
        t.join().unwrap();
        assert_eq!(g.read(), 2);
        assert!(!g.lock.is_locked());
    });
}

#[test]
fn three_threads_through_the_queue() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let g = Guarded::new();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let g = g.clone();
                thread::spawn(move || {
                    g.lock.lock(None).unwrap();
                    g.critical();
                    // SAFETY: acquired above.
                    unsafe { g.lock.unlock() };
                })
            })
            .collect();
        g.lock.lock(None).unwrap();
        g.critical();
        // SAFETY: acquired above.
        unsafe { g.lock.unlock() };
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(g.read(), 3);
        assert!(!g.lock.is_locked());
        assert_eq!(g.lock.queued_waiters(), 0);
    });
}

#[test]
fn timeout_races_with_handoff() {
    loom::model(|| {
        let g = Guarded::new();
        g.lock.lock(None).unwrap();
        let g2 = g.clone();
        // Under loom a deadline means "give up after the spin": it races with the unlock below.
        let t = thread::spawn(move || {
            let deadline = Some(std::time::Instant::now());
            match g2.lock.lock(deadline) {
                Ok(_) => {
                    g2.critical();
                    // SAFETY: acquired above.
                    unsafe { g2.lock.unlock() };
                    true
                }
                Err(_) => false,
            }
        });
        g.critical();
        // SAFETY: acquired above.
        unsafe { g.lock.unlock() };
        let got_it = t.join().unwrap();
        assert_eq!(g.read(), if got_it { 2 } else { 1 });
        // Whatever happened, the lock is free and consistent afterwards.
        assert!(!g.lock.is_locked());
        assert_eq!(g.lock.queued_waiters(), 0);
        assert!(g.lock.try_lock().is_ok());
        // SAFETY: acquired just above.
        unsafe { g.lock.unlock() };
    });
}

#[test]
fn try_lock_never_blocks_and_excludes() {
    loom::model(|| {
        let g = Guarded::new();
        let g2 = g.clone();
        let t = thread::spawn(move || {
            if g2.lock.try_lock().is_ok() {
                g2.critical();
                // SAFETY: acquired above.
                unsafe { g2.lock.unlock() };
            }
        });
        g.lock.lock(None).unwrap();
        g.critical();
        // SAFETY: acquired above.
        unsafe { g.lock.unlock() };
        t.join().unwrap();
        assert!(!g.lock.is_locked());
    });
}
