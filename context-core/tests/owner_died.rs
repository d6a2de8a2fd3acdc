//! A context whose lock reports that its previous holder died: the entrant is told through
//! `Cx::owner_died`, repairs, and declares the state consistent through `Cx::mark_consistent`; a
//! holder that dies while the thread is inside a nested call is reported on return.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use common::watchdog;
use context_core::{Acquired, Context, LocalLock, LockError, RawContextLock};

/// A local lock that can be told "the holder died": the next acquisition returns `OwnerDied`, as
/// a process-shared lock does after a holder's process was killed.
#[derive(Default)]
struct DyingLock {
    inner: LocalLock,
    died: AtomicBool,
    repaired: AtomicUsize,
}

impl DyingLock {
    fn how(&self, a: Acquired) -> Acquired {
        if self.died.swap(false, Ordering::Relaxed) {
            Acquired::OwnerDied
        } else {
            a
        }
    }
}

// SAFETY: every method delegates to `LocalLock`, which upholds the contract; the extra flag only
// changes which `Acquired` variant a successful acquisition reports.
unsafe impl RawContextLock for DyingLock {
    fn try_lock(&self) -> Result<Acquired, LockError> {
        self.inner.try_lock().map(|a| self.how(a))
    }
    fn lock(&self, deadline: Option<Instant>) -> Result<Acquired, LockError> {
        self.inner.lock(deadline).map(|a| self.how(a))
    }
    unsafe fn unlock(&self) {
        // SAFETY: forwarded contract: the caller holds the lock.
        unsafe { self.inner.unlock() }
    }
    fn is_locked(&self) -> bool {
        self.inner.is_locked()
    }
    unsafe fn mark_consistent(&self) {
        self.repaired.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn the_next_entrant_is_told_and_repairs() {
    watchdog(30, || {
        let a = Context::with_lock("a", DyingLock::default());
        assert!(!a.enter(|cx| cx.owner_died()).unwrap());
        a.lock().died.store(true, Ordering::Relaxed);
        let seen = a
            .enter(|cx| {
                let died = cx.owner_died();
                cx.mark_consistent().unwrap();
                (died, cx.owner_died())
            })
            .unwrap();
        assert_eq!(seen, (true, false));
        assert_eq!(a.lock().repaired.load(Ordering::Relaxed), 1);
        // Only that one entry was told.
        assert!(!a.enter(|cx| cx.owner_died()).unwrap());
    });
}

#[test]
fn a_death_during_a_nested_call_is_reported_on_return() {
    watchdog(30, || {
        let a = Context::with_lock("a", DyingLock::default());
        let b = Context::new("b");
        let seen = a
            .enter(|cx| {
                let before = cx.owner_died();
                // While this thread is in `b`, `a` is released; another holder "dies" in it.
                b.enter(|_| a.lock().died.store(true, Ordering::Relaxed))
                    .unwrap();
                (before, cx.owner_died())
            })
            .unwrap();
        assert_eq!(seen, (false, true));
    });
}

#[test]
fn a_suspended_cx_cannot_mark_consistent() {
    watchdog(30, || {
        let a = Context::with_lock("a", DyingLock::default());
        let b = Context::new("b");
        a.enter(|cx| {
            let cx: &mut context_core::Cx<'_> = cx;
            let ptr: *mut context_core::Cx<'_> = cx;
            b.enter_local(|_| {
                // The point is that a suspended `Cx` refuses to act.
                // SAFETY: `cx` outlives this nested call on the same thread and is not used by the
                // outer closure while this reference lives.
                let cx = unsafe { &mut *ptr };
                assert!(!cx.is_held());
                assert!(cx.mark_consistent().is_err());
            })
            .unwrap();
        })
        .unwrap();
        assert_eq!(a.lock().repaired.load(Ordering::Relaxed), 0);
    });
}
