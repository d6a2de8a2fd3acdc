//! The crash-safe, process-shared, first-come-first-served lock. (First come, first served among
//! waiters that claim their turn: a handoff nobody claims within `PATIENCE`, 50 ms, passes to the
//! next ticket, and a live but descheduled waiter then takes a new one at the back.)
//!
//! [`RawSharedLock`] is the state machine, laid out `#[repr(C)]` so it can live in shared memory
//! (and on the heap, for loom and Miri). [`SharedLock`] is the handle a process uses: it keeps the
//! segment mapped, registers the process, and implements [`context_core::RawContextLock`], so a
//! [`context_core::Context`] can be built over a lock that several processes enter.
//!
//! # Why not a glibc robust mutex
//!
//! `pthread_mutex_t` with `PTHREAD_PROCESS_SHARED` + `PTHREAD_MUTEX_ROBUST` gives owner-died
//! detection (`EOWNERDEAD`) through the kernel's robust futex list, but it does not fit the context
//! handoff, for four reasons:
//!
//! 1. **Ownership is per thread.** A robust mutex records the owner *thread* (its TID in the word)
//!    and must be unlocked by that thread; the kernel walks the dying *thread's* robust list. The
//!    context handoff acquires a context on one thread and may release it on another (a pinned
//!    context's home thread, a handoff that passes a held lock straight to the woken waiter), and a
//!    context outlives the thread that entered it. Unlocking a robust mutex from a non-owner thread
//!    is undefined (`EPERM` at best), and a thread exiting while "owning" it marks it owner-dead
//!    although the process is fine.
//! 2. **No handoff, no FIFO.** The glibc futex mutex wakes one waiter and lets everybody race for
//!    the word (barging). The context protocol promises waiters a fair turn and wants the releasing
//!    side to pass the still-held lock to the oldest waiter.
//! 3. **A process is the unit of failure, not a thread.** The kernel marks a robust mutex
//!    owner-dead when the owning *thread* exits (it walks that thread's robust list at exit). With
//!    contexts handed between threads, that both misses the case we care about (the lock belongs to
//!    a context, not to whichever thread last touched it) and flags healthy state as corrupt when a
//!    worker thread ends normally.
//! 4. **Opaque layout.** `pthread_mutex_t` is libc-private: every process must use the same libc
//!    build, and its protocol cannot be model-checked with loom. Our state is a documented
//!    `#[repr(C)]` layout of atomics whose transitions the loom models in `tests/loom_lock.rs`
//!    explore.
//!
//! So this lock records the owner *process* (a registration slot holding a
//! [`ProcessToken`](crate::ProcessToken): PID + start time, immune to PID reuse), takes the owner
//! in the same compare-and-swap that takes the lock, serves waiters by ticket with direct handoff,
//! and waiters poll the owner's liveness while they sleep in timed futex waits. Nothing depends on
//! the dead process having done anything. The price: a *thread* that exits while holding the lock
//! in a live process is not detected (the process is alive), exactly as for a `LocalLock`.
//!
//! # State (the futex word `state`)
//!
//! | value                    | meaning                                             | left by                                  |
//! |--------------------------|-----------------------------------------------------|------------------------------------------|
//! | `0` FREE                 | idle                                                | fast CAS -> HELD(me); a ticket holder -> HANDOFF(head) |
//! | `DIED` FREE+DIED         | idle, last holder died, nobody repaired yet         | CAS -> HELD(me), caller gets `OwnerDied` |
//! | `gen<<16 \| slot+1` HELD(slot) | held by a thread of the process in `procs[slot]`, registered in the slot's generation `gen` | holder: fast CAS -> FREE; a waiter about to sleep: CAS -> HELD+QUEUED; a waiter that finds `procs[slot]` dead: -> HANDOFF(head)+DIED or FREE+DIED |
//! | `HELD(slot)+QUEUED`      | held, a waiter may be asleep                       | holder (slow path): -> HANDOFF(head), or FREE + wake if every ticket was cancelled; dead-owner recovery as above |
//! | `HANDOFF|t` (+`DIED`)    | released to the waiter holding ticket `t`          | that waiter: CAS -> HELD(it)+QUEUED; anyone, if `t` was cancelled or nobody claims it within `PATIENCE`: -> HANDOFF(t+1) or FREE |
//!
//! Bits of a HELD value: 0..16 `slot + 1`, 16..29 the slot's generation (`gens[slot]` as the
//! holder found it when it registered), 29 QUEUED; 30 and 31 are 0. The generation makes the
//! dead-owner recovery CAS fail when the slot changed hands between a waiter's load of HELD(slot)
//! and its CAS (review F4): the waiter reads `procs[slot]` and sees the dead previous occupant,
//! but meanwhile a registrant recovered the lock, reused the slot and its new occupant took the
//! lock; without the generation the state would be HELD(slot) again and the stale CAS would take
//! the lock from a live holder. A registrant that reuses a dead slot bumps `gens[slot]` *before*
//! publishing its token there, and generations only grow, so the new occupant's HELD values differ
//! from every earlier occupant's (until the 13-bit counter wraps: 8192 reuses of one slot while a
//! waiter sits between one load and one CAS).
//!
//! The uncontended path is one CAS to lock and one CAS to unlock (plus plain loads), like a
//! futex mutex: only a waiter that is about to sleep sets QUEUED, which sends the holder's unlock
//! into the slow path that hands over and wakes. A claimed handoff always carries QUEUED (other
//! tickets may be pending), so the next unlock checks the queue.
//!
//! Tickets: `next` hands them out, `head` is the oldest not yet served. Tickets in `[head, next)`
//! are pending; `cancelled` remembers recently cancelled tickets (timeouts) so they are skipped at
//! once. Every transition out of HANDOFF(t) first tries `head: t -> t+1` and then CASes `state`; the
//! state CAS decides, so mutual exclusion rests on single-word CAS alone.
//!
//! `health` (`OK`/`DIRTY`/`NOT_RECOVERABLE`) is written only by the holder: the claimant of a
//! DIED state sets DIRTY and gets `OwnerDied`; `mark_consistent` sets OK; releasing while DIRTY
//! sets NOT_RECOVERABLE, after which every acquisition fails with `NotRecoverable`.
//!
//! Orderings: `state`, `head` and `next` use `SeqCst`. The two store-load (Dekker) patterns —
//! release vs. a new ticket (`state` then `next`), and release vs. a cancelling waiter (`state`
//! then `cancelled`) — are written with read-modify-writes on the location the other side writes
//! (`swap`, `fetch_add(0)`), so they hold even under Acquire/Release alone: whichever RMW comes
//! second in modification order reads from the other and synchronizes with it. That is also what
//! loom can check (it models SeqCst loads no stronger than Acquire); the models found a real
//! cancel-vs-release stall in an earlier version that way. The fast path is one CAS to lock and
//! one to unlock (x86 `lock cmpxchg`).

use std::fmt;
use std::time::{Duration, Instant};

use context_core::{Acquired, LockError};

use crate::sync::{self, AtomicU32, AtomicU64, Ordering};

const HANDOFF: u32 = 1 << 31;
const DIED: u32 = 1 << 30;
/// On a HELD state: somebody may be asleep waiting, so unlock must take the slow path.
const QUEUED: u32 = 1 << 29;
const TICKET_MASK: u32 = QUEUED - 1;
const OWNER_MASK: u32 = 0xffff;
/// Where a slot's generation sits in a HELD value (bits 16..29, below QUEUED).
const GEN_SHIFT: u32 = 16;
const GEN_MASK: u32 = (1 << 13) - 1;
const CANCEL_VALID: u32 = 1 << 31;

const HEALTH_OK: u32 = 0;
const HEALTH_DIRTY: u32 = 1;
const HEALTH_NOT_RECOVERABLE: u32 = 2;

/// Marks an initialized lock ("CTXL").
const LOCK_MAGIC: u32 = 0x4354_584c;

/// How many processes can be registered with one lock at a time. Slots of dead processes are
/// reclaimed when a new process registers.
#[cfg(not(loom))]
pub const MAX_PROCS: usize = 128;
/// How many processes can be registered with one lock at a time (small under loom).
#[cfg(loom)]
pub const MAX_PROCS: usize = 4;

const CANCEL_RING: usize = 16;
const OWNER_RING: usize = 64;

/// Polls a waiter spins on the state word before it sleeps (a few microseconds: waking a sleeper
/// on another vCPU costs tens of microseconds here, see `shared/limits.md`).
#[cfg(not(loom))]
const SPIN_POLLS: u32 = 2_000;
#[cfg(loom)]
const SPIN_POLLS: u32 = 0;

/// Longest single futex sleep: a sleeping waiter re-checks the owner's liveness at least this often.
const CHECK_INTERVAL: Duration = Duration::from_millis(5);

/// How long a HANDOFF may stay unclaimed before other waiters skip it (its waiter died or vanished
/// without cancelling). A slow but live waiter that gets skipped just takes a new ticket.
const PATIENCE: Duration = Duration::from_millis(50);

/// How long a HANDOFF may stay unclaimed before a waiter checks whether the ticket's waiter
/// process is still alive (and skips it at once if not).
const CLAIM_GRACE: Duration = Duration::from_millis(2);

/// Decides whether a registered process is still alive.
///
/// The real one is [`ProcLiveness`]; loom models substitute their own.
pub trait Liveness {
    /// Whether the process whose packed token is `token` is alive.
    fn is_alive(&self, token: u64) -> bool;

    /// Whether a registered process may die while others wait. Real processes can, so waiters
    /// always sleep in bounded slices and re-check; a model that kills nobody returns `false`, and
    /// under loom its waiters then sleep without timeout, so a lost wake-up shows up as a deadlock.
    fn deaths_possible(&self) -> bool {
        true
    }
}

/// [`Liveness`] from `/proc/<pid>/stat` (PID plus start time; zombies count as dead).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcLiveness;

impl Liveness for ProcLiveness {
    fn is_alive(&self, token: u64) -> bool {
        crate::ProcessToken::from_bits(token).is_some_and(crate::ProcessToken::is_alive)
    }
}

/// A registration slot of one process with one lock, in the slot generation it was registered in.
///
/// INVARIANTS: bits 0..16 hold the index, `< MAX_PROCS`, so `index + 1` fits the owner field of
/// the state; bits 16..29 hold the generation (`<= GEN_MASK`); the other bits are 0. So
/// `self.0 + 1` is a HELD value without QUEUED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u32);

impl Slot {
    fn new(index: usize, generation: u32) -> Self {
        let index = u32::try_from(index).unwrap_or(0) & OWNER_MASK;
        Self(((generation & GEN_MASK) << GEN_SHIFT) | index)
    }

    /// The slot index (`< MAX_PROCS`).
    #[must_use]
    pub fn index(self) -> usize {
        (self.0 & OWNER_MASK) as usize
    }

    /// This slot's HELD value (without QUEUED).
    fn held(self) -> u32 {
        self.0 + 1
    }
}

/// Every registration slot is taken by a live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all {MAX_PROCS} process slots of this lock are taken by live processes")]
pub struct LockFull;

fn is_free(s: u32) -> bool {
    s & !DIED == 0
}

fn is_handoff(s: u32) -> bool {
    s & HANDOFF != 0
}

fn ticket(s: u32) -> u32 {
    s & TICKET_MASK
}

fn held_slot(s: u32) -> Option<usize> {
    if is_handoff(s) || is_free(s) {
        None
    } else {
        // Owner 0 never comes from a holder; only a peer scribbling over the word writes it. It
        // maps to no slot (`usize::MAX`), whose owner `lock` treats as dead, so the lock recovers
        // (DIED) rather than this subtraction overflowing.
        Some(((s & OWNER_MASK) as usize).wrapping_sub(1))
    }
}

/// Distance from ticket `a` forward to ticket `b`, modulo the ticket space.
fn dist(a: u32, b: u32) -> u32 {
    b.wrapping_sub(a) & TICKET_MASK
}

/// Whether ticket `t` is pending given `head` and `next`.
fn pending(head: u32, t: u32, next: u32) -> bool {
    dist(head, t) < dist(head, next)
}

/// The lock's state in (shared) memory. See the [module docs](self) for the protocol.
///
/// All fields are atomics (any bit pattern is a valid value), so a mapping of zeroed memory is a
/// valid (uninitialized, `magic == 0`) `RawSharedLock` and no access is ever a data race.
#[repr(C)]
pub struct RawSharedLock {
    magic: AtomicU32,
    state: AtomicU32,
    next: AtomicU32,
    head: AtomicU32,
    health: AtomicU32,
    _reserved: AtomicU32,
    cancelled: [AtomicU32; CANCEL_RING],
    /// `ticket << 32 | slot + 1` of recent tickets' waiters (by ticket modulo the ring), so an
    /// unclaimed handoff to a dead waiter is skipped after `CLAIM_GRACE` instead of `PATIENCE`.
    ticket_owners: [AtomicU64; OWNER_RING],
    procs: [AtomicU64; MAX_PROCS],
    /// Per-slot generation, bumped by a registrant before it reuses a dead process's slot; part
    /// of every HELD value (module docs).
    gens: [AtomicU32; MAX_PROCS],
}

impl Default for RawSharedLock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RawSharedLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSharedLock")
            .field(
                "state",
                &format_args!("{:#x}", self.state.load(Ordering::Relaxed)),
            )
            .field("head", &self.head.load(Ordering::Relaxed))
            .field("next", &self.next.load(Ordering::Relaxed))
            .field("health", &self.health.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RawSharedLock {
    /// A new, idle, initialized lock (for the heap; shared memory uses [`Self::init`]).
    #[must_use]
    pub fn new() -> Self {
        Self {
            magic: AtomicU32::new(LOCK_MAGIC),
            state: AtomicU32::new(0),
            next: AtomicU32::new(0),
            head: AtomicU32::new(0),
            health: AtomicU32::new(HEALTH_OK),
            _reserved: AtomicU32::new(0),
            cancelled: std::array::from_fn(|_| AtomicU32::new(0)),
            ticket_owners: std::array::from_fn(|_| AtomicU64::new(0)),
            procs: std::array::from_fn(|_| AtomicU64::new(0)),
            gens: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }

    /// (Re)initializes the lock in place with atomic stores, publishing `magic` last.
    pub fn init(&self) {
        self.magic.store(0, Ordering::SeqCst);
        self.state.store(0, Ordering::SeqCst);
        self.next.store(0, Ordering::SeqCst);
        self.head.store(0, Ordering::SeqCst);
        self.health.store(HEALTH_OK, Ordering::SeqCst);
        for o in &self.ticket_owners {
            o.store(0, Ordering::SeqCst);
        }
        for c in &self.cancelled {
            c.store(0, Ordering::SeqCst);
        }
        for p in &self.procs {
            p.store(0, Ordering::SeqCst);
        }
        for g in &self.gens {
            g.store(0, Ordering::SeqCst);
        }
        self.magic.store(LOCK_MAGIC, Ordering::SeqCst);
    }

    /// Whether [`Self::init`] (or [`Self::new`]) ran on this memory.
    #[must_use]
    pub fn is_initialized(&self) -> bool {
        self.magic.load(Ordering::Acquire) == LOCK_MAGIC
    }

    /// Registers a process (by packed [`ProcessToken`](crate::ProcessToken)) and returns its slot.
    /// Registering the same token again returns the same slot. Slots of dead processes are reused
    /// (after recovering the lock if a dead process still holds it).
    ///
    /// # Errors
    /// [`LockFull`] when every slot belongs to a live process.
    pub fn register(&self, token: u64, live: &impl Liveness) -> Result<Slot, LockFull> {
        // The current generation of slot `i`. Any value at least the one in force when our token
        // was published there will do: it only has to differ from earlier occupants' (module docs).
        let slot = |i: usize| Slot::new(i, self.gens[i].load(Ordering::SeqCst));
        if let Some(i) = self
            .procs
            .iter()
            .position(|p| p.load(Ordering::SeqCst) == token)
        {
            return Ok(slot(i));
        }
        for (i, p) in self.procs.iter().enumerate() {
            // A slot is 0 only before its first use (never reset outside `init`), so no earlier
            // occupant's HELD value can exist for it.
            if p.compare_exchange(0, token, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Ok(slot(i));
            }
        }
        for (i, p) in self.procs.iter().enumerate() {
            let old = p.load(Ordering::SeqCst);
            if old == 0 || live.is_alive(old) {
                continue;
            }
            let s = self.state.load(Ordering::SeqCst);
            // The liveness check above is slow (it reads /proc): another registrant may have
            // reused the slot meanwhile and taken the lock, and `s`, loaded after that, would then
            // be the live holder's own value. A reuse swaps the slot's token before its new owner
            // can lock (both SeqCst), so a slot still holding `old` now means `s` is not theirs.
            if p.load(Ordering::SeqCst) != old {
                continue;
            }
            if held_slot(s) == Some(i) {
                // The dead process still holds the lock: pass it on (marked DIED) first. If the
                // slot changed hands since our loads (another registrant reused it and the new
                // occupant took the lock), `s` carries the old generation and the CAS in `recover`
                // fails: a live holder is never recovered.
                self.recover(s);
                if held_slot(self.state.load(Ordering::SeqCst)) == Some(i) {
                    continue;
                }
            }
            // Slot i is dead and not referenced by the state; only its (dead) owner could make it
            // referenced again, so reusing it is safe. Bump its generation first, so that our
            // HELD values differ from the dead occupant's (a waiter may still hold a stale copy
            // of one and try to recover it). If the CAS below fails the bump is merely wasted.
            let generation = self.gens[i].fetch_add(1, Ordering::SeqCst).wrapping_add(1);
            if p.compare_exchange(old, token, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Ok(Slot::new(i, generation));
            }
        }
        Err(LockFull)
    }

    /// Takes the lock if idle (or idle after an owner's death); never waits and never checks
    /// liveness.
    ///
    /// # Errors
    /// `WouldBlock` if held or handed to a waiter; `NotRecoverable` as for [`Self::lock`].
    #[inline]
    pub fn try_lock(&self, me: Slot) -> Result<Acquired, LockError> {
        match self
            .state
            .compare_exchange(0, me.held(), Ordering::SeqCst, Ordering::Relaxed)
        {
            Ok(_) => self.finish(Acquired::Fast, false),
            Err(DIED) => {
                match self.state.compare_exchange(
                    DIED,
                    me.held(),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => self.finish(Acquired::Contended, true),
                    Err(_) => Err(LockError::WouldBlock),
                }
            }
            Err(_) => Err(LockError::WouldBlock),
        }
    }

    /// Takes the lock, waiting in ticket order until `deadline`. A holder that died is detected by
    /// liveness checks while waiting, and the lock then reaches a waiter as `OwnerDied`.
    ///
    /// # Errors
    /// `TimedOut` when the deadline passes; `NotRecoverable` when a dead owner's state was
    /// released without repair (the caller does not hold the lock).
    // Under loom SPIN_POLLS is 0, which makes the spin comparisons trivially true/false.
    #[inline]
    pub fn lock(
        &self,
        me: Slot,
        deadline: Option<Instant>,
        live: &impl Liveness,
    ) -> Result<Acquired, LockError> {
        match self.try_lock(me) {
            Err(LockError::WouldBlock) => self.lock_slow(me, deadline, live),
            other => other,
        }
    }

    #[cold]
    #[inline(never)]
    #[cfg_attr(loom, allow(clippy::absurd_extreme_comparisons))]
    fn lock_slow(
        &self,
        me: Slot,
        deadline: Option<Instant>,
        live: &impl Liveness,
    ) -> Result<Acquired, LockError> {
        let mut t = self.take_ticket_for(me);
        let mut spins = 0u32;
        let mut seen = (u32::MAX, sync::Stopwatch::start());
        let mut last_check: Option<sync::Stopwatch> = None;
        loop {
            let s = self.state.load(Ordering::SeqCst);
            if s != seen.0 {
                seen = (s, sync::Stopwatch::start());
                last_check = None;
            }
            if is_free(s) {
                let h = self.head.load(Ordering::SeqCst);
                let n = self.next.load(Ordering::SeqCst) & TICKET_MASK;
                if !pending(h, t, n) {
                    // We were skipped (too slow to claim): queue again.
                    t = self.take_ticket_for(me);
                    continue;
                }
                // Released while tickets were pending (the unlock raced with a new ticket, or a
                // skip emptied the queue): hand it to the oldest pending ticket ourselves.
                if self
                    .state
                    .compare_exchange(
                        s,
                        HANDOFF | (s & DIED) | h,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_ok()
                {
                    sync::futex_wake(&self.state, i32::MAX);
                }
                continue;
            }
            if is_handoff(s) {
                let h = ticket(s);
                if h == t {
                    if let Some(r) = self.claim(s, me) {
                        return r;
                    }
                    continue;
                }
                let n = self.next.load(Ordering::SeqCst) & TICKET_MASK;
                if !pending(h, t, n) {
                    t = self.take_ticket_for(me);
                    continue;
                }
                if self.is_cancelled(h) || seen.1.exceeded(PATIENCE) {
                    self.skip(s);
                    continue;
                }
                let due = last_check.is_none_or(|c| c.exceeded(CHECK_INTERVAL));
                if due && seen.1.exceeded(CLAIM_GRACE) {
                    last_check = Some(sync::Stopwatch::start());
                    if self.ticket_waiter_dead(h, live) {
                        self.skip(s);
                        continue;
                    }
                }
            } else if let Some(owner) = held_slot(s) {
                // Under loom every wake-up re-checks (the model's stand-in for the periodic check).
                let due = cfg!(loom) || last_check.is_none_or(|c| c.exceeded(CHECK_INTERVAL));
                if owner != me.index() && due && spins >= SPIN_POLLS {
                    last_check = Some(sync::Stopwatch::start());
                    let token = self
                        .procs
                        .get(owner)
                        .map_or(0, |p| p.load(Ordering::SeqCst));
                    if token == 0 || !live.is_alive(token) {
                        self.recover(s);
                        continue;
                    }
                }
            }
            // Wait for the state to change.
            let left = sync::remaining(deadline);
            if left == Some(Duration::ZERO) {
                return self.cancel(t, me);
            }
            if spins < SPIN_POLLS {
                spins += 1;
                sync::spin_pause();
                continue;
            }
            // About to sleep on a HELD state: flag it QUEUED first, so the holder's unlock takes
            // the slow path (which always wakes). If the state moved meanwhile, look again.
            let mut wait_on = s;
            if held_slot(s).is_some() && s & QUEUED == 0 {
                if self
                    .state
                    .compare_exchange(s, s | QUEUED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    continue;
                }
                wait_on = s | QUEUED;
            }
            let slice = if cfg!(loom) && !live.deaths_possible() {
                None
            } else {
                Some(left.map_or(CHECK_INTERVAL, |l| l.min(CHECK_INTERVAL)))
            };
            sync::futex_wait(&self.state, wait_on, slice);
        }
    }

    /// Releases the lock: to the oldest pending ticket if there is one, else to idle.
    ///
    /// # Safety
    /// The caller holds the lock (a successful `try_lock`/`lock` with a slot of this process, not
    /// released since).
    #[inline]
    pub unsafe fn unlock(&self) {
        if self.health.load(Ordering::Relaxed) == HEALTH_DIRTY {
            self.health.store(HEALTH_NOT_RECOVERABLE, Ordering::Relaxed);
        }
        self.release();
    }

    /// Declares the protected state repaired after `OwnerDied`.
    ///
    /// # Safety
    /// The caller holds the lock.
    pub unsafe fn mark_consistent(&self) {
        self.health.store(HEALTH_OK, Ordering::Relaxed);
    }

    /// Whether the lock is held or being handed over (a snapshot).
    #[must_use]
    pub fn is_locked(&self) -> bool {
        !is_free(self.state.load(Ordering::Relaxed))
    }

    /// Whether a dead owner's state was released unrepaired (a snapshot).
    #[must_use]
    pub fn is_not_recoverable(&self) -> bool {
        self.health.load(Ordering::Relaxed) == HEALTH_NOT_RECOVERABLE
    }

    /// How many tickets are pending (waiters in line, including ones that timed out and were not
    /// skipped yet): a snapshot for diagnostics and tests.
    #[must_use]
    pub fn pending_tickets(&self) -> u32 {
        let head = self.head.load(Ordering::SeqCst);
        let next = self.next.load(Ordering::SeqCst) & TICKET_MASK;
        dist(head, next)
    }

    /// Wakes every waiter so it re-checks the state (harmless; used by models of a death that the
    /// waiters' periodic liveness check would notice).
    pub fn wake_waiters(&self) {
        sync::futex_wake(&self.state, i32::MAX);
    }

    /// Takes a ticket and records who waits on it (best effort: a waiter that dies between the
    /// two steps is skipped after `PATIENCE` instead of `CLAIM_GRACE`).
    fn take_ticket_for(&self, me: Slot) -> u32 {
        let t = self.next.fetch_add(1, Ordering::SeqCst) & TICKET_MASK;
        self.ticket_owners[t as usize % OWNER_RING].store(
            (u64::from(t) << 32) | (me.index() as u64 + 1),
            Ordering::SeqCst,
        );
        t
    }

    /// Whether the recorded waiter of ticket `t` is a dead process (false if unknown).
    fn ticket_waiter_dead(&self, t: u32, live: &impl Liveness) -> bool {
        let o = self.ticket_owners[t as usize % OWNER_RING].load(Ordering::SeqCst);
        if o >> 32 != u64::from(t) {
            return false;
        }
        let slot = (o & 0xffff_ffff) as usize;
        match slot.checked_sub(1).and_then(|i| self.procs.get(i)) {
            Some(p) => {
                let token = p.load(Ordering::SeqCst);
                token != 0 && !live.is_alive(token)
            }
            None => false,
        }
    }

    fn is_cancelled(&self, t: u32) -> bool {
        self.cancelled[t as usize % CANCEL_RING].load(Ordering::SeqCst) == (t | CANCEL_VALID)
    }

    /// Completes an acquisition: applies the owner-died flag and the health state.
    #[inline]
    fn finish(&self, kind: Acquired, died: bool) -> Result<Acquired, LockError> {
        if died {
            self.health.store(HEALTH_DIRTY, Ordering::Relaxed);
            return Ok(Acquired::OwnerDied);
        }
        match self.health.load(Ordering::Relaxed) {
            HEALTH_OK => Ok(kind),
            HEALTH_DIRTY => Ok(Acquired::OwnerDied),
            _ => {
                self.release();
                Err(LockError::NotRecoverable)
            }
        }
    }

    /// Claims HANDOFF(t) = `s` for `me`. `None` if someone else moved the state first.
    fn claim(&self, s: u32, me: Slot) -> Option<Result<Acquired, LockError>> {
        let t = ticket(s);
        let _ = self.head.compare_exchange(
            t,
            (t + 1) & TICKET_MASK,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        match self
            .state
            .compare_exchange(s, me.held() | QUEUED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Some(self.finish(Acquired::Contended, s & DIED != 0)),
            Err(_) => None,
        }
    }

    /// Passes HANDOFF(t) = `s` on to ticket t+1 (or to idle if none is pending), and on past
    /// every following ticket that is known to be cancelled.
    fn skip(&self, mut s: u32) {
        loop {
            let t = ticket(s);
            let t1 = (t + 1) & TICKET_MASK;
            let _ = self
                .head
                .compare_exchange(t, t1, Ordering::SeqCst, Ordering::SeqCst);
            let n = self.next.load(Ordering::SeqCst) & TICKET_MASK;
            let new = if t1 == n {
                s & DIED
            } else {
                HANDOFF | (s & DIED) | t1
            };
            if self
                .state
                .compare_exchange(s, new, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                return; // somebody else moved it on
            }
            sync::futex_wake(&self.state, i32::MAX);
            if !(is_handoff(new) && self.is_cancelled(t1)) {
                return;
            }
            s = new;
        }
    }

    /// Takes HELD(dead) = `s` away from a dead owner, passing it on marked DIED. `s` includes the
    /// owner's slot generation, so the CAS fails if the slot was reused and its new occupant took
    /// the lock since the caller loaded `s` (module docs).
    fn recover(&self, s: u32) {
        let h = self.head.load(Ordering::SeqCst);
        let n = self.next.load(Ordering::SeqCst) & TICKET_MASK;
        let new = if h == n { DIED } else { HANDOFF | DIED | h };
        if self
            .state
            .compare_exchange(s, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            sync::futex_wake(&self.state, i32::MAX);
        }
    }

    /// Gives up ticket `t` after a timeout. A handoff that raced ahead of the timeout wins.
    fn cancel(&self, t: u32, me: Slot) -> Result<Acquired, LockError> {
        let s = self.state.load(Ordering::SeqCst);
        if is_handoff(s) && ticket(s) == t {
            if let Some(r) = self.claim(s, me) {
                return r;
            }
        }
        self.cancelled[t as usize % CANCEL_RING].store(t | CANCEL_VALID, Ordering::SeqCst);
        // The holder may have handed over to us between the load above and the store: pass it on.
        // Store-load (Dekker) against `release`, which swaps `state` and then reads `cancelled`:
        // this re-read is an RMW (value unchanged) and `release` writes `state` with an RMW, so
        // whichever comes second in `state`'s modification order reads from the other and
        // synchronizes with it: either we see the handoff here, or `release` sees the cancel.
        let s = self.state.fetch_add(0, Ordering::SeqCst);
        if is_handoff(s) && ticket(s) == t {
            self.skip(s);
        }
        Err(LockError::TimedOut)
    }

    /// The release proper, without the health bookkeeping.
    #[inline]
    fn release(&self) {
        // Fast path: nobody flagged QUEUED, so nobody sleeps: one CAS back to FREE. (A waiter
        // that took a ticket but is still spinning sees FREE and passes it to the oldest ticket;
        // to sleep it must first CAS QUEUED into this very HELD value, which makes our CAS fail.)
        let s = self.state.load(Ordering::Relaxed);
        if s & QUEUED == 0
            && self
                .state
                .compare_exchange(s, 0, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        {
            return;
        }
        self.release_slow();
    }

    #[cold]
    fn release_slow(&self) {
        // While we hold the lock nobody else changes `head` (it moves only out of HANDOFF states).
        let n = self.next.load(Ordering::SeqCst) & TICKET_MASK;
        let mut h = self.head.load(Ordering::SeqCst);
        while h != n && self.is_cancelled(h) {
            let h1 = (h + 1) & TICKET_MASK;
            let _ = self
                .head
                .compare_exchange(h, h1, Ordering::SeqCst, Ordering::SeqCst);
            h = h1;
        }
        if h == n {
            // A swap, not a store: see `cancel` for why `state` is written by RMW here.
            self.state.swap(0, Ordering::SeqCst);
            // Dekker with a waiter's `take_ticket` then `state.load`: either it sees FREE, or we
            // see its ticket here and wake it. The re-read is a read-modify-write on purpose: an
            // RMW reads the latest `next` in modification order, and if that is still `n`, the
            // waiter's later `fetch_add` reads from it and synchronizes with us, so its state
            // loads see FREE. This holds under Acquire/Release alone, which is what loom models
            // (loom treats SeqCst loads like Acquire), so the model checks the real argument.
            if self.next.fetch_add(0, Ordering::SeqCst) & TICKET_MASK != n {
                sync::futex_wake(&self.state, i32::MAX);
            }
        } else {
            self.state.swap(HANDOFF | h, Ordering::SeqCst);
            sync::futex_wake(&self.state, i32::MAX);
            // Ticket `h` may have been cancelled after we checked above and before our swap, and
            // its waiter then found no handoff to pass on (store-load pattern with `cancel`; see
            // there). Re-check after the swap, so one of the two sides always passes it on.
            if self.is_cancelled(h) {
                self.skip(HANDOFF | h);
            }
        }
    }
}

#[cfg(not(loom))]
pub use handle::{SharedLock, SharedLockGuard};

#[cfg(not(loom))]
mod handle {
    use super::*;
    use crate::segment::Segment;
    use crate::{Error, ProcessToken};
    use context_core::RawContextLock;
    use std::ptr::NonNull;
    use std::sync::Arc;

    /// A process's handle on a [`RawSharedLock`] inside a shared [`Segment`]: keeps the segment
    /// mapped, registers this process with the lock (again after `fork`), and implements
    /// [`RawContextLock`] so a [`context_core::Context`] can be built over it.
    ///
    /// Cloning is cheap (same lock, same registration); a clone carried into a forked child
    /// re-registers there on first use.
    pub struct SharedLock {
        seg: Arc<Segment>,
        // INVARIANTS: points into `seg`'s mapping (kept alive by `seg`), aligned for
        // `RawSharedLock`, with `size_of::<RawSharedLock>()` bytes in bounds; checked once in `at`.
        raw: NonNull<RawSharedLock>,
        /// `(fork generation << 32) | (slot + 1)`; 0 = not registered in this process.
        cache: AtomicU64,
    }

    // SAFETY: the pointee is made of atomics only (Sync), the segment is Send + Sync, and `cache`
    // is atomic. The pointer is only a location inside the segment that `seg` keeps mapped.
    unsafe impl Send for SharedLock {}
    // SAFETY: as for Send: every access through `raw` is an atomic operation.
    unsafe impl Sync for SharedLock {}

    impl Clone for SharedLock {
        fn clone(&self) -> Self {
            Self {
                seg: Arc::clone(&self.seg),
                raw: self.raw,
                cache: AtomicU64::new(self.cache.load(Ordering::Relaxed)),
            }
        }
    }

    impl fmt::Debug for SharedLock {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("SharedLock")
                .field("raw", self.raw())
                .finish_non_exhaustive()
        }
    }

    impl SharedLock {
        /// The bytes a lock occupies in a segment.
        pub const SIZE: usize = std::mem::size_of::<RawSharedLock>();
        /// The alignment a lock's offset needs.
        pub const ALIGN: usize = std::mem::align_of::<RawSharedLock>();

        /// A lock in a fresh sealed memfd segment of its own: share it with children by `fork`
        /// (clone the handle) or with other processes by sending [`Self::segment`]'s descriptor.
        ///
        /// # Errors
        /// Creating or mapping the segment failed, or `/proc` is unavailable.
        pub fn anonymous() -> Result<Self, Error> {
            let seg = Arc::new(Segment::create_memfd(
                Self::SIZE,
                crate::TypeId::of_name("context-shmem::SharedLock"),
            )?);
            Self::create_in(seg, 0)
        }

        /// Initializes a new lock at payload offset `offset` of `seg` and registers this process.
        /// Only do this before other processes use that range as a lock.
        ///
        /// # Errors
        /// `offset` out of bounds or misaligned; registration failed; the segment was made in
        /// another PID namespace ([`Segment::check_pid_namespace`]: owners' liveness would be
        /// misread, and a live holder's lock taken).
        pub fn create_in(seg: Arc<Segment>, offset: usize) -> Result<Self, Error> {
            seg.check_pid_namespace()?;
            let lock = Self::at(seg, offset)?;
            lock.raw().init();
            lock.slot().map_err(|_| Error::LockFull(LockFull))?;
            Ok(lock)
        }

        /// Opens the lock another process initialized at payload offset `offset` of `seg`.
        ///
        /// # Errors
        /// Out of bounds, misaligned, not an initialized lock, no free process slot, or a segment
        /// made in another PID namespace (as for [`Self::create_in`]).
        pub fn open_in(seg: Arc<Segment>, offset: usize) -> Result<Self, Error> {
            seg.check_pid_namespace()?;
            let lock = Self::at(seg, offset)?;
            if !lock.raw().is_initialized() {
                return Err(Error::BadHeader("no initialized lock at this offset"));
            }
            lock.slot().map_err(|_| Error::LockFull(LockFull))?;
            Ok(lock)
        }

        fn at(seg: Arc<Segment>, offset: usize) -> Result<Self, Error> {
            let ptr = seg.payload_ptr(offset, Self::SIZE, Self::ALIGN)?;
            Ok(Self {
                seg,
                raw: ptr.cast(),
                cache: AtomicU64::new(0),
            })
        }

        /// The segment holding the lock (to send its descriptor, or to place data beside it).
        #[must_use]
        pub fn segment(&self) -> &Arc<Segment> {
            &self.seg
        }

        /// The raw state machine.
        #[must_use]
        #[inline]
        pub fn raw(&self) -> &RawSharedLock {
            // SAFETY: by the INVARIANTS on `raw` the pointer is in bounds, aligned and kept mapped by
            // `self.seg`; the pointee consists of atomics only, so a shared reference to it is sound
            // even while other processes operate on it (every access is atomic).
            unsafe { self.raw.as_ref() }
        }

        /// Whether the state was left unrepaired by an owner-died holder (a snapshot).
        #[must_use]
        pub fn is_not_recoverable(&self) -> bool {
            self.raw().is_not_recoverable()
        }

        /// Takes the lock (waiting until `deadline`) and returns an RAII guard: the safe way to use
        /// the lock outside a [`context_core::Context`].
        ///
        /// # Errors
        /// `TimedOut` or `NotRecoverable` (see [`RawContextLock::lock`]).
        #[inline]
        pub fn guard(&self, deadline: Option<Instant>) -> Result<SharedLockGuard<'_>, LockError> {
            let a = RawContextLock::lock(self, deadline)?;
            Ok(SharedLockGuard {
                lock: self,
                owner_died: a == Acquired::OwnerDied,
                _not_send: std::marker::PhantomData,
            })
        }
    }

    /// Holds a [`SharedLock`]; releases it on drop. Not `Send`: released where it was taken.
    ///
    /// ```compile_fail,E0277
    /// fn needs_send<T: Send>(_: T) {}
    /// let lock = context_shmem::SharedLock::anonymous().unwrap();
    /// needs_send(lock.guard(None).unwrap());
    /// ```
    ///
    /// If [`Self::owner_died`] is true, the previous holder died holding the lock: repair what it
    /// protects and call [`Self::mark_consistent`], or the lock becomes not recoverable on drop.
    #[derive(Debug)]
    pub struct SharedLockGuard<'a> {
        lock: &'a SharedLock,
        owner_died: bool,
        _not_send: std::marker::PhantomData<*const ()>,
    }

    impl SharedLockGuard<'_> {
        /// Whether the previous holder died holding the lock.
        #[must_use]
        pub fn owner_died(&self) -> bool {
            self.owner_died
        }

        /// Declares the protected state repaired.
        pub fn mark_consistent(&mut self) {
            // SAFETY: this guard holds the lock.
            unsafe { RawContextLock::mark_consistent(self.lock) };
            self.owner_died = false;
        }
    }

    impl Drop for SharedLockGuard<'_> {
        #[inline]
        fn drop(&mut self) {
            // SAFETY: the guard exists only after a successful acquisition and releases once.
            unsafe { RawContextLock::unlock(self.lock) };
        }
    }

    impl SharedLock {
        #[inline]
        fn slot(&self) -> Result<Slot, LockError> {
            let generation = crate::process::fork_generation();
            let c = self.cache.load(Ordering::Relaxed);
            if (c >> 32) as u32 == generation && c as u32 != 0 {
                return Ok(Slot(c as u32 - 1));
            }
            self.register(generation)
        }

        #[cold]
        fn register(&self, generation: u32) -> Result<Slot, LockError> {
            // Without a token or a slot this process cannot take the lock; report it as a timeout
            // (the trait has no better variant), documented on the `RawContextLock` impl.
            let token = ProcessToken::current().map_err(|_| LockError::TimedOut)?;
            let slot = self
                .raw()
                .register(token.to_bits(), &ProcLiveness)
                .map_err(|_| LockError::TimedOut)?;
            self.cache.store(
                (u64::from(generation) << 32) | u64::from(slot.0 + 1),
                Ordering::Relaxed,
            );
            Ok(slot)
        }
    }

    // SAFETY:
    // - Mutual exclusion: every acquisition is a CAS of `state` into HELD(slot) from FREE, FREE+DIED
    //   or a HANDOFF; only the holder (or, for a dead holder, a recoverer after the holder's death)
    //   moves HELD out, so two successful acquisitions never overlap. (Loom model: tests/loom_lock.rs.)
    // - Ordering: the acquiring CAS and the releasing store are SeqCst (>= Acquire / Release).
    // - No lost wake-ups: see `release` (Dekker on state/next) and the futex re-check; every sleep is
    //   also bounded by CHECK_INTERVAL.
    // - Err means not held: `finish` releases before returning NotRecoverable; `cancel` either claims
    //   (Ok) or passes the handoff on.
    //
    // If this process cannot register (more than MAX_PROCS live processes use the lock, or /proc is
    // missing), `try_lock` reports WouldBlock and `lock` TimedOut.
    unsafe impl RawContextLock for SharedLock {
        #[inline]
        fn try_lock(&self) -> Result<Acquired, LockError> {
            let me = self.slot().map_err(|_| LockError::WouldBlock)?;
            self.raw().try_lock(me)
        }

        #[inline]
        fn lock(&self, deadline: Option<Instant>) -> Result<Acquired, LockError> {
            let me = self.slot()?;
            self.raw().lock(me, deadline, &ProcLiveness)
        }

        #[inline]
        unsafe fn unlock(&self) {
            // SAFETY: the caller holds the lock (this method's contract), with a slot of this process.
            unsafe { self.raw().unlock() }
        }

        fn is_locked(&self) -> bool {
            self.raw().is_locked()
        }

        unsafe fn mark_consistent(&self) {
            // SAFETY: the caller holds the lock (this method's contract).
            unsafe { self.raw().mark_consistent() }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    struct AllAlive;
    impl Liveness for AllAlive {
        fn is_alive(&self, _: u64) -> bool {
            true
        }
    }

    /// A deadline for locks that must succeed: generous, so that a hang fails the test instead.
    fn generous() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(20))
    }

    /// Waits (at most 20 s) until `cond` holds, failing the test with `what` otherwise.
    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            std::thread::yield_now();
        }
    }

    struct DeadSet(Vec<u64>);
    impl Liveness for DeadSet {
        fn is_alive(&self, t: u64) -> bool {
            !self.0.contains(&t)
        }
    }

    /// Review of 2026-12-03: registrant R2 finds the slot of dead D, and while it checks D's
    /// liveness (slow: /proc), R1 reuses that slot and takes the lock on the fast path. R2's fresh
    /// load of the state is then R1's own value: R2 must not "recover" it.
    #[test]
    fn a_registrant_does_not_recover_the_hold_of_whoever_reused_the_slot_meanwhile() {
        use std::cell::Cell;
        const D: u64 = 1; // dead, in slot 0; every other slot is taken by a live process
        struct Racing<'a> {
            l: &'a RawSharedLock,
            r1: Cell<Option<Slot>>,
        }
        impl Liveness for Racing<'_> {
            fn is_alive(&self, t: u64) -> bool {
                if t == D && self.r1.get().is_none() {
                    let r1 = self.l.register(400, &DeadSet(vec![D])).unwrap();
                    assert_eq!(r1.index(), 0);
                    assert_eq!(self.l.try_lock(r1), Ok(Acquired::Fast));
                    self.r1.set(Some(r1));
                }
                t != D
            }
        }
        let l = RawSharedLock::new();
        for p in 1..=MAX_PROCS as u64 {
            l.register(p, &AllAlive).unwrap();
        }
        let racing = Racing {
            l: &l,
            r1: Cell::new(None),
        };
        // Every slot is live again once R1 has taken slot 0.
        assert!(l.register(500, &racing).is_err());
        assert!(racing.r1.get().is_some());
        let other = l.register(2, &AllAlive).unwrap();
        assert_eq!(l.try_lock(other), Err(LockError::WouldBlock), "two holders");
        // SAFETY: R1 holds the lock (its fast path above) and nobody else does (asserted).
        unsafe { l.unlock() };
        assert_eq!(l.try_lock(other), Ok(Acquired::Fast));
    }

    /// A state word scribbled by a peer with no owner in it (only the QUEUED flag) is a dead
    /// owner: the next entrant recovers the lock and is told, instead of an arithmetic overflow.
    #[test]
    fn a_held_state_without_an_owner_recovers_as_died() {
        let l = RawSharedLock::new();
        let me = l.register(7, &AllAlive).unwrap();
        l.state.store(QUEUED, Ordering::SeqCst);
        let soon = Some(Instant::now() + Duration::from_secs(5));
        assert_eq!(l.lock(me, soon, &AllAlive), Ok(Acquired::OwnerDied));
    }

    /// Review F4, the reviewer's replay (`aba.rs`): inside waiter W's liveness check of the dead
    /// holder D, a registrant recovers D's hold and reuses D's slot for N, another waiter X
    /// passes through the lock, and N takes it on the fast path. W's stale recovery must fail.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "timing-based: the interpreted waiter needs longer than the 300 ms deadline to reach its liveness check"
    )]
    fn stale_recovery_after_slot_reuse_does_not_take_a_live_holders_lock() {
        use std::cell::Cell;
        const D: u64 = 1; // dies holding the lock (slot 0)
        const W: u64 = 2; // the waiter whose liveness check straddles the reuse (slot 1)
        const X: u64 = 3; // another process (slot 2)
        const N: u64 = 999; // the new occupant of slot 0

        struct Evil<'a> {
            lock: &'a RawSharedLock,
            fired: Cell<bool>,
            n_slot: Cell<Option<Slot>>,
        }
        impl Liveness for Evil<'_> {
            fn is_alive(&self, t: u64) -> bool {
                if t == D && !self.fired.get() {
                    self.fired.set(true);
                    let l = self.lock;
                    let sn = l.register(N, &DeadSet(vec![D])).unwrap();
                    assert_eq!(sn.index(), 0);
                    let sx = l.register(X, &AllAlive).unwrap();
                    let soon = Some(Instant::now() + Duration::from_secs(5));
                    assert!(l.lock(sx, soon, &DeadSet(vec![D, W])).is_ok());
                    // SAFETY: X holds the lock (the `lock` above succeeded).
                    unsafe { l.mark_consistent() };
                    // SAFETY: X holds the lock.
                    unsafe { l.unlock() };
                    assert_eq!(l.try_lock(sn), Ok(Acquired::Fast));
                    self.n_slot.set(Some(sn));
                }
                t != D
            }
        }

        let l = RawSharedLock::new();
        for t in 1..=MAX_PROCS as u64 {
            l.register(t, &AllAlive).unwrap();
        }
        let sd = l.register(D, &AllAlive).unwrap();
        let sw = l.register(W, &AllAlive).unwrap();
        assert_eq!((sd.index(), sw.index()), (0, 1));
        assert_eq!(l.try_lock(sd), Ok(Acquired::Fast));
        let evil = Evil {
            lock: &l,
            fired: Cell::new(false),
            n_slot: Cell::new(None),
        };
        let r = l.lock(sw, Some(Instant::now() + Duration::from_millis(300)), &evil);
        assert!(evil.fired.get());
        let sn = evil.n_slot.get().unwrap();
        assert_eq!(r, Err(LockError::TimedOut), "W took N's lock");
        // N still holds it: its own release works and leaves the lock free.
        assert_eq!(l.state.load(Ordering::SeqCst) & !QUEUED, sn.held());
        // SAFETY: N holds the lock (its `try_lock` succeeded and nobody took it since).
        unsafe { l.unlock() };
        assert_eq!(l.try_lock(sw), Ok(Acquired::Fast));
    }

    #[test]
    fn reused_slot_gets_a_new_generation() {
        let l = RawSharedLock::new();
        let tok = |i: u64| (i << 32) | 1;
        let a = l.register(tok(1), &AllAlive).unwrap();
        for i in 2..=MAX_PROCS as u64 {
            l.register(tok(i), &AllAlive).unwrap();
        }
        let b = l.register(tok(999), &DeadSet(vec![tok(1)])).unwrap();
        assert_eq!(a.index(), b.index());
        assert_ne!(a.held(), b.held());
        assert_eq!(l.register(tok(999), &AllAlive).unwrap(), b);
    }

    #[test]
    fn fast_path_and_release() {
        let l = RawSharedLock::new();
        let a = l.register(1 << 32 | 1, &AllAlive).unwrap();
        assert_eq!(l.try_lock(a), Ok(Acquired::Fast));
        assert_eq!(l.try_lock(a), Err(LockError::WouldBlock));
        // SAFETY: held just above.
        unsafe { l.unlock() };
        assert!(!l.is_locked());
        assert_eq!(l.lock(a, None, &AllAlive), Ok(Acquired::Fast));
        // SAFETY: held just above.
        unsafe { l.unlock() };
    }

    #[test]
    fn dead_owner_is_recovered_and_must_be_repaired() {
        let l = RawSharedLock::new();
        let dead = 1u64 << 32 | 7;
        let d = l.register(dead, &AllAlive).unwrap();
        let me = l.register(2 << 32 | 1, &AllAlive).unwrap();
        assert_eq!(l.try_lock(d), Ok(Acquired::Fast));
        // The owner "dies" holding it.
        let live = DeadSet(vec![dead]);
        let deadline = Some(Instant::now() + Duration::from_secs(5));
        assert_eq!(l.lock(me, deadline, &live), Ok(Acquired::OwnerDied));
        // Released without repair: not recoverable from now on.
        // SAFETY: held.
        unsafe { l.unlock() };
        assert_eq!(l.lock(me, deadline, &live), Err(LockError::NotRecoverable));
        assert!(!l.is_locked());
        assert!(l.is_not_recoverable());
    }

    #[test]
    fn repaired_lock_is_healthy_again() {
        let l = RawSharedLock::new();
        let dead = 1u64 << 32 | 7;
        let d = l.register(dead, &AllAlive).unwrap();
        let me = l.register(2 << 32 | 1, &AllAlive).unwrap();
        assert_eq!(l.try_lock(d), Ok(Acquired::Fast));
        let live = DeadSet(vec![dead]);
        assert_eq!(l.lock(me, generous(), &live), Ok(Acquired::OwnerDied));
        // SAFETY: held.
        unsafe { l.mark_consistent() };
        // SAFETY: held.
        unsafe { l.unlock() };
        assert_eq!(l.try_lock(me), Ok(Acquired::Fast));
        // SAFETY: held.
        unsafe { l.unlock() };
        // The dead process's slot is reused by the next newcomer once the table is full? Not needed
        // here; but re-registering the same token returns the same slot.
        assert_eq!(l.register(2 << 32 | 1, &live).unwrap(), me);
    }

    #[test]
    fn timeout_cancels_and_does_not_stall_the_queue() {
        let l = RawSharedLock::new();
        let a = l.register(1 << 32 | 1, &AllAlive).unwrap();
        let b = l.register(2 << 32 | 1, &AllAlive).unwrap();
        assert_eq!(l.try_lock(a), Ok(Acquired::Fast));
        let r = l.lock(
            b,
            Some(Instant::now() + Duration::from_millis(20)),
            &AllAlive,
        );
        assert_eq!(r, Err(LockError::TimedOut));
        // SAFETY: held by a.
        unsafe { l.unlock() };
        // The cancelled ticket was skipped at release: the lock is idle, the fast path works.
        assert_eq!(l.try_lock(b), Ok(Acquired::Fast));
        // SAFETY: held.
        unsafe { l.unlock() };
    }

    #[test]
    fn dead_slots_are_reclaimed() {
        let l = RawSharedLock::new();
        let dead: Vec<u64> = (1..=MAX_PROCS as u64).map(|p| p << 32 | 3).collect();
        for &t in &dead {
            l.register(t, &AllAlive).unwrap();
        }
        assert_eq!(l.register(999 << 32 | 1, &AllAlive), Err(LockFull));
        // One dead process even holds the lock.
        let d0 = l.register(dead[0], &AllAlive).unwrap();
        assert_eq!(l.try_lock(d0), Ok(Acquired::Fast));
        let live = DeadSet(dead.clone());
        let me = l.register(999 << 32 | 1, &live).unwrap();
        assert_eq!(l.try_lock(me), Ok(Acquired::OwnerDied));
    }

    #[test]
    fn waiters_are_served_in_arrival_order() {
        use std::sync::Arc;
        use std::sync::Mutex;
        let l = Arc::new(RawSharedLock::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let a = l.register(1 << 32 | 1, &AllAlive).unwrap();
        assert_eq!(l.try_lock(a), Ok(Acquired::Fast));
        let mut hs = Vec::new();
        for (i, p) in [(1u32, 2u64), (2, 3), (3, 4)] {
            let (l2, order2) = (Arc::clone(&l), Arc::clone(&order));
            hs.push(std::thread::spawn(move || {
                let me = l2.register(p << 32 | 1, &AllAlive).unwrap();
                assert_eq!(l2.lock(me, generous(), &AllAlive), Ok(Acquired::Contended));
                order2.lock().unwrap().push(i);
                // SAFETY: held.
                unsafe { l2.unlock() };
            }));
            // Let this waiter take its ticket before the next one starts (or fail if it ended).
            let waiter = hs.last().unwrap();
            wait_until(&format!("waiter {i}'s ticket"), || {
                assert!(!waiter.is_finished(), "waiter {i} ended before it queued");
                l.pending_tickets() >= i
            });
        }
        // SAFETY: held since the try_lock above.
        unsafe { l.unlock() };
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 3]);
        assert_eq!(l.pending_tickets(), 0);
    }

    #[test]
    fn threads_are_served_and_exclusive() {
        use std::sync::Arc;
        let l = Arc::new(RawSharedLock::new());
        let counter = Arc::new(AtomicU64::new(0));
        let inside = Arc::new(AtomicU32::new(0));
        let hs: Vec<_> = (0..4u64)
            .map(|i| {
                let (l, counter, inside) =
                    (Arc::clone(&l), Arc::clone(&counter), Arc::clone(&inside));
                std::thread::spawn(move || {
                    let me = l.register((i + 1) << 32 | 1, &AllAlive).unwrap();
                    for _ in 0..2000 {
                        l.lock(me, generous(), &AllAlive).unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        counter.fetch_add(1, Ordering::Relaxed);
                        inside.fetch_sub(1, Ordering::SeqCst);
                        // SAFETY: held.
                        unsafe { l.unlock() };
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::Relaxed), 8000);
        assert!(!l.is_locked());
    }
}
