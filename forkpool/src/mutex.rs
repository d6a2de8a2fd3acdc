//! [`SharedMutex`]: a value guarded by `context-shmem`'s process-shared lock, placed in the shared
//! heap like any other [`ShareSafe`] value, so it sits at the same address in every process of the
//! pool. The lock detects a holder that died (PID plus start time, so PID reuse cannot fool it) and
//! hands the lock to the next taker with [`SharedMutexGuard::owner_died`] set: the data is the
//! caller's to repair, then [`SharedMutexGuard::mark_consistent`]. A holder that *panics* (a job's
//! panic is caught and its worker lives on) leaves the same mark, as `std::sync::Mutex` poisons.
//!
//! Regions holding a live lock are never unmapped: a `SharedMutex` lives in a block, and
//! [`crate::Pool::release_region`] refuses regions with live blocks.

use std::cell::UnsafeCell;
use std::time::Instant;

use context_core::{Acquired, LockError};
use context_shmem::{ProcLiveness, ProcessToken, RawSharedLock, Slot};

use crate::heap::ShareSafe;

/// Errors of [`SharedMutex::lock`].
#[derive(Debug, thiserror::Error)]
pub enum MutexError {
    /// The lock could not be taken (timed out, or unrecoverable after an unrepaired death).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// More processes than the lock has registration slots are alive and registered.
    #[error("every registration slot of the lock belongs to a live process")]
    Full,
    /// This process's identity (PID and start time) could not be read.
    #[error("cannot identify this process: {0}")]
    Identity(#[source] std::io::Error),
}

/// A `T` guarded by a process-shared, owner-death-detecting lock. Build it in place in the shared
/// heap (`SharedBox::new(heap, SharedMutex::new(value))`), hand it to jobs by `&`.
#[repr(C)]
pub struct SharedMutex<T> {
    lock: RawSharedLock,
    /// 1 after a holder's guard was dropped by a panic that began while it held the lock; cleared by
    /// [`SharedMutexGuard::mark_consistent`]. Written and read only under the lock.
    panicked: std::sync::atomic::AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: the lock is all atomics (any bit pattern valid, no pointers, no drop glue); the value is a
// ShareSafe T. A holder killed mid-update leaves T in a state its ShareSafe contract allows, and the
// next holder is told (`owner_died`).
unsafe impl<T: ShareSafe> ShareSafe for SharedMutex<T> {}
// SAFETY: access to the value is serialised by the lock across threads and processes.
unsafe impl<T: ShareSafe + Send> Sync for SharedMutex<T> {}
// SAFETY: moving the mutex moves a T, which is Send.
unsafe impl<T: ShareSafe + Send> Send for SharedMutex<T> {}

impl<T: ShareSafe> SharedMutex<T> {
    /// An unlocked mutex holding `value`.
    pub fn new(value: T) -> Self {
        Self {
            lock: RawSharedLock::new(),
            panicked: std::sync::atomic::AtomicU32::new(0),
            value: UnsafeCell::new(value),
        }
    }

    fn slot(&self) -> Result<Slot, MutexError> {
        let token = ProcessToken::current().map_err(MutexError::Identity)?;
        self.lock
            .register(token.to_bits(), &ProcLiveness)
            .map_err(|_| MutexError::Full)
    }

    /// Takes the lock, waiting until `deadline` (`None`: without limit).
    ///
    /// # Errors
    /// [`MutexError::Lock`] with `TimedOut` or `NotRecoverable`; [`MutexError::Full`];
    /// [`MutexError::Identity`].
    pub fn lock(&self, deadline: Option<Instant>) -> Result<SharedMutexGuard<'_, T>, MutexError> {
        let me = self.slot()?;
        let how = self.lock.lock(me, deadline, &ProcLiveness)?;
        let panicked = self.panicked.load(std::sync::atomic::Ordering::Relaxed) != 0;
        Ok(SharedMutexGuard {
            m: self,
            owner_died: how == Acquired::OwnerDied || panicked,
            was_panicking: std::thread::panicking(),
            _not_send: std::marker::PhantomData,
        })
    }

    /// Whether the lock is held right now (a snapshot).
    #[must_use]
    pub fn is_locked(&self) -> bool {
        self.lock.is_locked()
    }
}

/// Holds a [`SharedMutex`]; derefs to the value; unlocks on drop. Not `Send`: the lock records the
/// holding process, and the guard must be released where it was taken.
///
/// ```compile_fail,E0277
/// fn assert_send<T: Send>(_: T) {}
/// fn f(m: &context_forkpool::SharedMutex<u64>) {
///     assert_send(m.lock(None).unwrap());
/// }
/// ```
pub struct SharedMutexGuard<'a, T: ShareSafe> {
    m: &'a SharedMutex<T>,
    owner_died: bool,
    /// A panic was already unwinding when the lock was taken: only a later one marks the value.
    was_panicking: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl<T: ShareSafe> SharedMutexGuard<'_, T> {
    /// Whether a previous holder died or panicked holding the lock (and nobody has called
    /// [`Self::mark_consistent`] since): the value may be half-updated.
    #[must_use]
    pub fn owner_died(&self) -> bool {
        self.owner_died
    }

    /// Declares the value repaired after [`Self::owner_died`]; without it, releasing the lock makes
    /// it unrecoverable for everyone.
    pub fn mark_consistent(&mut self) {
        // SAFETY: this guard holds the lock.
        unsafe { self.m.lock.mark_consistent() };
        self.m
            .panicked
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.owner_died = false;
    }
}

impl<T: ShareSafe> std::ops::Deref for SharedMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock, which every process takes before touching the value.
        unsafe { &*self.m.value.get() }
    }
}

impl<T: ShareSafe> std::ops::DerefMut for SharedMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for Deref, and `&mut self` makes the reference unique in this process.
        unsafe { &mut *self.m.value.get() }
    }
}

impl<T: ShareSafe> Drop for SharedMutexGuard<'_, T> {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.was_panicking {
            self.m
                .panicked
                .store(1, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: this guard holds the lock and releases it once. (The lock's release orders the
        // store above before the next holder's load.)
        unsafe { self.m.lock.unlock() };
    }
}
