//! The one place that picks atomics and the futex, so that `--cfg loom` swaps them for loom's
//! model-checked versions (the convention of tokio's `loom` module).
//!
//! **Futex flag.** Every word this crate waits on lives in memory that other *processes* map
//! (`MAP_SHARED`), so the futex calls here never pass `FUTEX_PRIVATE_FLAG`: a private futex is keyed
//! by (mm, virtual address) and a waiter in another process would never be woken. The shared form is
//! keyed by the backing page (inode + offset), which is the same in every process that maps it,
//! whatever address it is mapped at.
//!
//! Under loom the futex is modelled by one global mutex and condition variable: `wait` re-checks the
//! word under the mutex and sleeps, `wake` takes the mutex and wakes everybody, which is exactly the
//! futex contract (no wake-up is lost between the check and the sleep; spurious wake-ups allowed).
//! A timed wait is modelled as "the timeout fired": it yields and returns.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout` (`None`: until woken). May return early
/// (spuriously, on a signal, or because the word already differs): callers always re-check.
#[cfg(not(loom))]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        // Always < 1e9, fits every c_long.
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY:
    // - `word.as_ptr()` is a valid, aligned u32 for the whole call (we hold `&AtomicU32`); the kernel
    //   only reads it atomically.
    // - `ts_ptr` is null or points to a live `timespec` on this stack frame (a relative timeout, as
    //   FUTEX_WAIT wants).
    // - No FUTEX_PRIVATE_FLAG: the word may be in MAP_SHARED memory used by other processes.
    // The result (0, EAGAIN, ETIMEDOUT, EINTR) is ignored on purpose: every caller re-checks the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes up to `n` waiters sleeping on `word` in any process.
#[cfg(not(loom))]
pub(crate) fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY:
    // - `word.as_ptr()` is a valid u32 address; FUTEX_WAKE does not even read it.
    // - No FUTEX_PRIVATE_FLAG, for the same reason as in `futex_wait`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<u32>(),
            0u32,
            0u32,
        );
    }
}

#[cfg(loom)]
loom::lazy_static! {
    static ref FUTEX: (loom::sync::Mutex<()>, loom::sync::Condvar) =
        (loom::sync::Mutex::new(()), loom::sync::Condvar::new());
}

#[cfg(loom)]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    if timeout.is_some() {
        loom::thread::yield_now();
        return;
    }
    let guard = FUTEX.0.lock().unwrap_or_else(|e| e.into_inner());
    if word.load(Ordering::SeqCst) == expected {
        drop(FUTEX.1.wait(guard).unwrap_or_else(|e| e.into_inner()));
    }
}

#[cfg(loom)]
pub(crate) fn futex_wake(_word: &AtomicU32, _n: i32) {
    let _guard = FUTEX.0.lock().unwrap_or_else(|e| e.into_inner());
    FUTEX.1.notify_all();
}

/// One pause inside a spin loop. Under loom a spin must yield, or the model never ends.
#[inline]
pub(crate) fn spin_pause() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// A monotonic stopwatch. Loom has no clock: there, no patience ever runs out and no liveness check
/// is ever "not yet due", so the model explores the logic, not timing.
#[derive(Clone, Copy)]
pub(crate) struct Stopwatch {
    #[cfg(not(loom))]
    start: std::time::Instant,
}

impl Stopwatch {
    pub(crate) fn start() -> Self {
        Self {
            #[cfg(not(loom))]
            start: std::time::Instant::now(),
        }
    }

    /// Whether more than `d` has passed since `start` (always `false` under loom).
    pub(crate) fn exceeded(&self, d: Duration) -> bool {
        #[cfg(not(loom))]
        {
            self.start.elapsed() > d
        }
        #[cfg(loom)]
        {
            let _ = d;
            false
        }
    }
}

/// Time left until `deadline`: `None` for no deadline, `Some(ZERO)` once it has passed. Under loom
/// a deadline counts as already passed (the model of "the waiter gives up").
pub(crate) fn remaining(deadline: Option<std::time::Instant>) -> Option<Duration> {
    #[cfg(not(loom))]
    {
        deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()))
    }
    #[cfg(loom)]
    {
        deadline.map(|_| Duration::ZERO)
    }
}
