//! [`LocalLock`]: the process-local context lock, first come first served, with direct handoff.

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use crate::lock::{Acquired, LockError, RawContextLock};
use crate::sync::{self, Arc, AtomicBool, AtomicU8, Mutex, Ordering, Thread};

// The lock word. State table (every transition that is not a CAS from the idle state happens either
// by the holder or under the queue mutex):
//
// | state              | meaning                               | left by                                   |
// |--------------------|---------------------------------------|-------------------------------------------|
// | IDLE (0)           | free                                  | CAS -> LOCKED (any thread; the fast path)|
// | LOCKED (1)         | held, nobody queued                   | holder: CAS -> IDLE (fast unlock);        |
// |                    |                                       | a new waiter, under the queue mutex:      |
// |                    |                                       | CAS -> LOCKED|QUEUED                      |
// | LOCKED|QUEUED (3)  | held, waiters queued                  | under the queue mutex only: unlock hands  |
// |                    |                                       | the lock to the oldest waiter (stays      |
// |                    |                                       | LOCKED, QUEUED cleared when it empties);  |
// |                    |                                       | a timed-out waiter leaving an empty queue |
// |                    |                                       | clears QUEUED                             |
//
// Because a held lock with waiters is never made IDLE, a newcomer cannot barge past a queued waiter:
// once anybody waits, the order is strictly FIFO.
const IDLE: u8 = 0;
const LOCKED: u8 = 1;
const QUEUED: u8 = 2;

struct Waiter {
    /// Set (Release) by the unlocking thread when it hands the lock over; read (Acquire) by the
    /// waiter. Once set, the waiter owns the lock.
    granted: AtomicBool,
    thread: Thread,
}

/// The process-local [`RawContextLock`]: one atomic byte for the fast path, a FIFO queue of waiters
/// for the slow path, and direct handoff from the releasing thread to the oldest waiter.
///
/// - **Idle**: `try_lock`/`lock` is one compare-and-swap; `unlock` is one compare-and-swap. No syscall.
/// - **Busy**: the caller queues, spins briefly on its own flag, then parks. `unlock` pops the oldest
///   waiter and passes the still-held lock to it (the lock never becomes idle in between, so nobody
///   can barge in).
/// - **Timeouts** remove the waiter from the queue; a grant that races with the timeout wins (the
///   caller gets the lock).
pub struct LocalLock {
    state: AtomicU8,
    queue: Mutex<VecDeque<Arc<Waiter>>>,
}

impl LocalLock {
    /// A new, idle lock.
    #[must_use]
    pub fn new() -> Self {
        Self {
            state: AtomicU8::new(IDLE),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    /// How many threads are queued waiting (a snapshot, for tests and diagnostics).
    #[must_use]
    pub fn queued_waiters(&self) -> usize {
        sync::lock_queue(&self.queue).len()
    }

    /// Whether the lock is held with a waiter queued, so that its release hands it over (a
    /// snapshot, for tests and benchmarks; one load, no queue mutex).
    #[must_use]
    pub fn has_waiters(&self) -> bool {
        self.state.load(Ordering::Relaxed) & QUEUED != 0
    }

    #[cold]
    fn lock_slow(&self, deadline: Option<Instant>) -> Result<Acquired, LockError> {
        let waiter = {
            let mut queue = sync::lock_queue(&self.queue);
            let mut s = self.state.load(Ordering::Relaxed);
            loop {
                if s == IDLE {
                    // Released while we took the queue mutex, and nobody is queued: take it.
                    match self.state.compare_exchange(
                        IDLE,
                        LOCKED,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return Ok(Acquired::Contended),
                        Err(now) => s = now,
                    }
                } else if s & QUEUED != 0 {
                    break;
                } else {
                    // Relaxed: the queue mutex orders this against the holder's slow unlock; the
                    // holder's fast unlock CAS fails once QUEUED is set and falls into the slow path.
                    match self.state.compare_exchange(
                        s,
                        s | QUEUED,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break,
                        Err(now) => s = now,
                    }
                }
            }
            let waiter = Arc::new(Waiter {
                granted: AtomicBool::new(false),
                thread: sync::current(),
            });
            queue.push_back(Arc::clone(&waiter));
            waiter
        };

        let mut backoff = sync::Backoff::new();
        while backoff.snooze() {
            if waiter.granted.load(Ordering::Acquire) {
                return Ok(Acquired::Contended);
            }
        }
        loop {
            if waiter.granted.load(Ordering::Acquire) {
                return Ok(Acquired::Contended);
            }
            match deadline {
                None => sync::park(),
                Some(deadline) => {
                    #[cfg(not(loom))]
                    {
                        let now = Instant::now();
                        if now < deadline {
                            sync::park_timeout(deadline - now);
                            continue;
                        }
                    }
                    // Loom has no clock: a deadline is modelled as "already passed after the spin".
                    #[cfg(loom)]
                    let _ = deadline;
                    return self.cancel(&waiter);
                }
            }
        }
    }

    /// Leaves the queue after a timeout. If the grant raced ahead of us, we own the lock after all.
    #[cold]
    fn cancel(&self, waiter: &Arc<Waiter>) -> Result<Acquired, LockError> {
        let mut queue = sync::lock_queue(&self.queue);
        if waiter.granted.load(Ordering::Acquire) {
            return Ok(Acquired::Contended);
        }
        if let Some(pos) = queue.iter().position(|w| Arc::ptr_eq(w, waiter)) {
            queue.remove(pos);
        }
        if queue.is_empty() {
            // The lock is held (QUEUED was set and only the queue-mutex holder clears it), so the
            // state is LOCKED|QUEUED: clear QUEUED so the holder can unlock on the fast path.
            self.state.store(LOCKED, Ordering::Relaxed);
        }
        Err(LockError::TimedOut)
    }

    #[cold]
    fn unlock_slow(&self) {
        let next = {
            let mut queue = sync::lock_queue(&self.queue);
            match queue.pop_front() {
                None => {
                    // Every waiter timed out and left; the last one cleared QUEUED.
                    self.state.store(IDLE, Ordering::Release);
                    return;
                }
                Some(next) => {
                    if queue.is_empty() {
                        // Still held, now by `next`; nobody else waits.
                        self.state.store(LOCKED, Ordering::Relaxed);
                    }
                    next.granted.store(true, Ordering::Release);
                    next
                }
            }
        };
        // Wake it outside the queue mutex: a shorter critical section, and (for the loom models) no
        // unpark of a thread that may be blocked on that mutex (loom issue #249 treats that as a
        // wake-up from the mutex). Our `Arc` keeps the waiter's `Thread` alive even if it has
        // already seen the grant and returned; a stray unpark token only causes a spurious wake-up,
        // which every `park` loop here tolerates.
        next.thread.unpark();
    }
}

impl Default for LocalLock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LocalLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLock")
            .field("locked", &self.is_locked())
            .finish_non_exhaustive()
    }
}

// SAFETY:
// - Mutual exclusion: the lock is taken only by a CAS IDLE -> LOCKED or by a grant, and a grant is
//   issued only by `unlock` of the current holder, which then does not touch the state again; while a
//   waiter is queued the state is never IDLE, so no CAS can succeed alongside a grant.
// - Ordering: the fast CAS is Acquire against the Release of the fast unlock / `store(IDLE)`; a grant
//   is a Release store read with Acquire by the waiter.
// - No lost wake-ups: a waiter queues under the queue mutex after setting QUEUED, so the holder's
//   unlock cannot take the fast path and must pop it; `unpark` before `park` is remembered by the
//   thread's park token. Checked by the loom models in `tests/loom_lock.rs`.
unsafe impl RawContextLock for LocalLock {
    #[inline]
    fn try_lock(&self) -> Result<Acquired, LockError> {
        match self
            .state
            .compare_exchange(IDLE, LOCKED, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => Ok(Acquired::Fast),
            Err(_) => Err(LockError::WouldBlock),
        }
    }

    #[inline]
    fn lock(&self, deadline: Option<Instant>) -> Result<Acquired, LockError> {
        match self.try_lock() {
            Ok(a) => Ok(a),
            Err(_) => self.lock_slow(deadline),
        }
    }

    #[inline]
    unsafe fn unlock(&self) {
        if self
            .state
            .compare_exchange(LOCKED, IDLE, Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            self.unlock_slow();
        }
    }

    fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != IDLE
    }
}
