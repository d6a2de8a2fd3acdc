//! Loom models of the shared lock's state machine (`RawSharedLock`), with the futex modelled in
//! the crate's `sync` module and process liveness modelled by flags.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p context-shmem --release --test loom_lock`
#![cfg(loom)]

use std::time::Instant;

use context_core::{Acquired, LockError};
use context_shmem::{Liveness, RawSharedLock};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering};

/// Liveness of "processes" 1..=3 (token = pid << 32).
struct Live([AtomicBool; 3], bool);

impl Live {
    fn new(deaths: bool) -> Self {
        Self(
            [
                AtomicBool::new(true),
                AtomicBool::new(true),
                AtomicBool::new(true),
            ],
            deaths,
        )
    }
}

impl Liveness for Live {
    fn is_alive(&self, token: u64) -> bool {
        let i = (token >> 32) as usize;
        (1..=3).contains(&i) && self.0[i - 1].load(Ordering::SeqCst)
    }

    /// Models without deaths sleep untimed, so a lost wake-up is a loom deadlock; models with
    /// deaths use the timed sleep (yield and re-check), as the real waiters do.
    fn deaths_possible(&self) -> bool {
        self.1
    }
}

fn token(p: u64) -> u64 {
    p << 32 | 1
}

struct Shared {
    lock: RawSharedLock,
    live: Live,
    data: UnsafeCell<u64>,
}

// SAFETY: `data` is only accessed while holding `lock` (that is what the model checks).
unsafe impl Sync for Shared {}

fn shared(deaths: bool) -> Arc<Shared> {
    Arc::new(Shared {
        lock: RawSharedLock::new(),
        live: Live::new(deaths),
        data: UnsafeCell::new(0),
    })
}

/// Two processes contend; both get in exactly once, exclusively, and nobody sleeps forever.
#[test]
fn mutual_exclusion_and_no_lost_wakeup() {
    loom::model(|| {
        let s = shared(false);
        let hs: Vec<_> = (1..=2u64)
            .map(|p| {
                let s = s.clone();
                loom::thread::spawn(move || {
                    let me = s.lock.register(token(p), &s.live).unwrap();
                    let a = s.lock.lock(me, None, &s.live).unwrap();
                    assert_ne!(a, Acquired::OwnerDied);
                    s.data.with_mut(|d| {
                        // SAFETY: the lock is held (loom reports a concurrent access otherwise).
                        unsafe { *d += 1 }
                    });
                    // SAFETY: held.
                    unsafe { s.lock.unlock() };
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        // SAFETY: all threads joined.
        assert_eq!(s.data.with(|d| unsafe { *d }), 2);
        assert!(!s.lock.is_locked());
    });
}

/// Process 1 takes the lock and dies holding it (modelled: its flag goes false; the waiter's
/// timed sleep is modelled as a yield and re-check). Process 2 must get the lock, and must be told `OwnerDied`
/// exactly when 1 died holding it.
#[test]
fn owner_death_is_detected_by_the_waiter() {
    loom::model(|| {
        let s = shared(true);
        let s1 = s.clone();
        let dier = loom::thread::spawn(move || {
            let me = s1.lock.register(token(1), &s1.live).unwrap();
            match s1.lock.try_lock(me) {
                Ok(_) => {
                    s1.data.with_mut(|d| {
                        // SAFETY: held.
                        unsafe { *d += 100 }
                    });
                    s1.live.0[0].store(false, Ordering::SeqCst);
                    true
                }
                Err(LockError::WouldBlock) => false,
                Err(e) => panic!("{e:?}"),
            }
        });
        let me = s.lock.register(token(2), &s.live).unwrap();
        let got = s.lock.lock(me, None, &s.live).unwrap();
        s.data.with_mut(|d| {
            // SAFETY: held.
            unsafe { *d += 1 }
        });
        let died_holding = dier.join().unwrap();
        if got == Acquired::OwnerDied {
            assert!(died_holding);
            // SAFETY: held.
            unsafe { s.lock.mark_consistent() };
        }
        // SAFETY: held.
        unsafe { s.lock.unlock() };
        // Either way the lock is usable afterwards and healthy.
        let again = s.lock.try_lock(me).unwrap();
        if died_holding && got != Acquired::OwnerDied {
            // 1 died holding it after we released: the death is reported now.
            assert_eq!(again, Acquired::OwnerDied);
            // SAFETY: held.
            unsafe { s.lock.mark_consistent() };
        } else {
            assert_eq!(again, Acquired::Fast);
        }
        // SAFETY: held.
        unsafe { s.lock.unlock() };
    });
}

/// A waiter that gives up (a deadline counts as passed under loom) races the holder's handoff:
/// either it gets the lock after all, or it leaves and the lock does not stall.
#[test]
fn timeout_racing_handoff_never_stalls() {
    loom::model(|| {
        let s = shared(false);
        let me = s.lock.register(token(1), &s.live).unwrap();
        assert_eq!(s.lock.try_lock(me), Ok(Acquired::Fast));
        let s2 = s.clone();
        let waiter = loom::thread::spawn(move || {
            let me2 = s2.lock.register(token(2), &s2.live).unwrap();
            match s2.lock.lock(me2, Some(Instant::now()), &s2.live) {
                Ok(_) => {
                    // SAFETY: held.
                    unsafe { s2.lock.unlock() };
                    true
                }
                Err(LockError::TimedOut) => false,
                Err(e) => panic!("{e:?}"),
            }
        });
        // SAFETY: held since the try_lock above.
        unsafe { s.lock.unlock() };
        let _ = waiter.join().unwrap();
        // Nobody holds or waits: the lock must be idle, not stuck in a handoff to a ticket that
        // left.
        assert_eq!(s.lock.try_lock(me), Ok(Acquired::Fast));
        // SAFETY: held.
        unsafe { s.lock.unlock() };
    });
}

/// Three processes: two lock normally, one gives up (deadline). Bounded to three preemptions so CI
/// stays fast; checks exclusion, that the two patient ones always get in, and no stall at the end.
#[test]
fn three_processes_one_gives_up() {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(|| {
        let s = shared(false);
        let patient: Vec<_> = (1..=2u64)
            .map(|p| {
                let s = s.clone();
                loom::thread::spawn(move || {
                    let me = s.lock.register(token(p), &s.live).unwrap();
                    s.lock.lock(me, None, &s.live).unwrap();
                    s.data.with_mut(|d| {
                        // SAFETY: held.
                        unsafe { *d += 1 }
                    });
                    // SAFETY: held.
                    unsafe { s.lock.unlock() };
                })
            })
            .collect();
        let me3 = s.lock.register(token(3), &s.live).unwrap();
        if s.lock.lock(me3, Some(Instant::now()), &s.live).is_ok() {
            s.data.with_mut(|d| {
                // SAFETY: held.
                unsafe { *d += 10 }
            });
            // SAFETY: held.
            unsafe { s.lock.unlock() };
        }
        for h in patient {
            h.join().unwrap();
        }
        // SAFETY: all threads joined.
        let d = s.data.with(|d| unsafe { *d });
        assert!(d == 2 || d == 12);
        assert_eq!(s.lock.try_lock(me3), Ok(Acquired::Fast));
        // SAFETY: held.
        unsafe { s.lock.unlock() };
    });
}
