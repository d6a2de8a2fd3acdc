//! The one place that picks the synchronization primitives, so that `--cfg loom` swaps them all for
//! loom's model-checked versions (the convention of tokio's `loom` module).
//!
//! Only the lock protocol ([`crate::LocalLock`]) goes through here: it is what the loom models check.

#[cfg(loom)]
pub(crate) use loom::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    thread::{Thread, current, park},
};

#[cfg(not(loom))]
pub(crate) use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    thread::{Thread, current, park, park_timeout},
};

/// Locks a queue mutex. A poisoned queue mutex cannot happen: nothing that may panic runs while it
/// is held (only `VecDeque` operations, whose allocation failure aborts rather than unwinds). We still
/// take the data rather than panic, because the queue is valid after every single operation.
pub(crate) fn lock_queue<T>(m: &Mutex<T>) -> impl std::ops::DerefMut<Target = T> + '_ {
    #[cfg(loom)]
    {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    #[cfg(not(loom))]
    {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One pause inside a spin loop. Under loom a spin must yield, or the model never ends.
#[inline]
pub(crate) fn spin_pause() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Futex wait and wake for **process-local** words (`FUTEX_PRIVATE_FLAG`). Every word passed here
/// lives in this process's private memory (a stack or heap of this process): the private flag is
/// right only for such words, never for a word in shared memory (context-shmem has its own).
///
/// Not swapped under loom: only the pinned home-thread machinery uses it, which the loom models
/// do not cover (they model `LocalLock`).
pub(crate) mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `*word == expected`, at most `timeout`. Returns on a wake, a timeout, a signal,
    /// or at once if the value differs: callers re-check their condition in a loop.
    pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(d.subsec_nanos().min(999_999_999)),
        });
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
        // SAFETY: FUTEX_WAIT_PRIVATE reads the aligned u32 behind `word` (a valid reference) and
        // compares it with `expected`; `ts_ptr` is null or points to a timespec that outlives the
        // call. The result is ignored on purpose: every outcome means "re-check" to the caller.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                expected,
                ts_ptr,
                std::ptr::null_mut::<u32>(),
                0u32,
            );
        }
    }

    /// Wakes one thread sleeping on the word at `addr`.
    ///
    /// Takes an address, not a reference, and never reads or writes through it: callers may wake a
    /// word whose owner has just returned (and whose memory may be reused). The kernel then wakes
    /// nobody, or causes a spurious wake-up that every waiter here tolerates; this is the same
    /// "wake after the waiter may have left" pattern std's own futex-based locks rely on.
    pub(crate) fn wake_addr(addr: *const AtomicU32) {
        // SAFETY: FUTEX_WAKE_PRIVATE only uses the address as a key into the kernel's wait queues;
        // it does not access user memory, so a stale address is harmless (no fault, no UB).
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                addr.cast::<u32>().cast_mut(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1u32,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null_mut::<u32>(),
                0u32,
            );
        }
    }
}

/// The wait policy every waiter in this crate uses before it sleeps: poll in chunks, yielding the
/// CPU between chunks, then give up (the caller sleeps).
///
/// Spinning alone is right when the other side runs on another CPU (a wake-up costs tens of
/// microseconds on this kind of machine, a poll nanoseconds); yielding between chunks is what keeps
/// it right when both sides share one CPU, where pure spinning would burn the timeslice the other
/// side needs to make progress.
pub(crate) struct Backoff {
    polls: u32,
}

impl Backoff {
    #[cfg(not(loom))]
    const CHUNK: u32 = 500;
    #[cfg(not(loom))]
    const BUDGET: u32 = 4_000;
    #[cfg(loom)]
    const CHUNK: u32 = 1;
    #[cfg(loom)]
    const BUDGET: u32 = 1;

    pub(crate) fn new() -> Self {
        Self { polls: 0 }
    }

    /// Polls once more (yielding at chunk boundaries). `false` once the budget is spent: sleep.
    #[inline]
    pub(crate) fn snooze(&mut self) -> bool {
        if self.polls >= Self::BUDGET {
            return false;
        }
        self.polls += 1;
        if self.polls % Self::CHUNK == 0 {
            #[cfg(not(loom))]
            std::thread::yield_now();
            #[cfg(loom)]
            loom::thread::yield_now();
        } else {
            spin_pause();
        }
        true
    }

    /// Starts over (after progress was made).
    pub(crate) fn reset(&mut self) {
        self.polls = 0;
    }
}
