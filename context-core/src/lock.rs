//! The context-lock trait: the raw lock state under every context.
//!
//! A context's lock is a [`RawContextLock`], in the style of `lock_api::RawMutex`: an `unsafe trait`
//! over bare lock state, with the safe API ([`crate::Context`] and its handoff) built on top. The
//! process-local implementation is [`crate::LocalLock`]; `context-shmem` supplies a process-shared,
//! crash-safe implementation so a context's lock can live in shared memory.

use std::time::Instant;

/// How an acquisition went. Every variant means the caller now holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Acquired {
    /// The lock was idle and taken with one atomic operation: no waiting, no syscall.
    Fast,
    /// The lock was held; the caller waited its turn (spinning, then sleeping) and now holds it.
    Contended,
    /// The previous holder died while holding the lock (only process-shared locks can see this).
    /// The caller holds the lock, but the state it protects may be half-updated: repair it, then
    /// call [`RawContextLock::mark_consistent`] before releasing, or the lock becomes unrecoverable.
    OwnerDied,
}

/// Why an acquisition failed. On every variant the caller does **not** hold the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum LockError {
    /// `try_lock` found the lock held.
    #[error("the context lock is held by someone else")]
    WouldBlock,
    /// The deadline passed before the lock could be taken.
    #[error("timed out waiting for the context lock")]
    TimedOut,
    /// A holder died, the next holder released the lock without marking the state consistent, and
    /// so the protected state can no longer be trusted (process-shared locks only).
    #[error("the context lock's owner died and the protected state was never repaired")]
    NotRecoverable,
}

/// The raw state of a context's lock.
///
/// Callers use it through [`crate::Context`]; implementors provide the state machine. The lock is not
/// re-entrant and is not tied to a thread by this trait (an implementation may record an owner for
/// crash detection). Waiters should be served first come, first served: the handoff protocol promises
/// callers a fair turn, and the implementations in this workspace hand a released lock directly to the
/// oldest waiter.
///
/// # Safety
///
/// Implementors must guarantee:
/// - **Mutual exclusion**: between a call of [`try_lock`](Self::try_lock) or [`lock`](Self::lock)
///   that returns `Ok(_)` and the matching [`unlock`](Self::unlock), no other call returns `Ok(_)`.
/// - **Ordering**: a successful acquisition synchronizes-with (has at least `Acquire` semantics
///   against) the `Release` of the previous `unlock`, so everything the previous holder wrote is
///   visible to the next.
/// - **No lost wake-ups**: a waiter in `lock` returns once the lock is released to it or its
///   deadline passes; it never sleeps forever while the lock is free.
/// - `Err(_)` from any method means the caller does not hold the lock.
pub unsafe trait RawContextLock: Send + Sync + 'static {
    /// Takes the lock if it is idle; never waits.
    ///
    /// # Errors
    /// [`LockError::WouldBlock`] if it is held; [`LockError::NotRecoverable`] for a lock whose dead
    /// owner's state was never repaired.
    fn try_lock(&self) -> Result<Acquired, LockError>;

    /// Takes the lock, waiting in line while it is held, until `deadline` if one is given.
    ///
    /// # Errors
    /// [`LockError::TimedOut`] once `deadline` passes; [`LockError::NotRecoverable`] as for
    /// [`try_lock`](Self::try_lock).
    fn lock(&self, deadline: Option<Instant>) -> Result<Acquired, LockError>;

    /// Releases the lock, handing it to the oldest waiter if there is one.
    ///
    /// # Safety
    /// The caller holds the lock: it was acquired by a successful `try_lock` or `lock` on this
    /// lock and has not been released since.
    unsafe fn unlock(&self);

    /// Whether the lock is held right now (a snapshot, for diagnostics and assertions).
    fn is_locked(&self) -> bool;

    /// Declares the protected state repaired after [`Acquired::OwnerDied`]. The default does nothing,
    /// which is right for locks that cannot observe an owner's death.
    ///
    /// # Safety
    /// The caller holds the lock.
    unsafe fn mark_consistent(&self) {}
}
