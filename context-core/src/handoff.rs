//! The handoff protocol: which contexts a thread holds, and how entering and leaving move the locks.
//!
//! Each thread keeps a pointer to its current *frame*: the set of contexts it holds right now (one,
//! or several for a cross-context operation), each with a `held` flag. Entering a context:
//!
//! | step | action                                                                      |
//! |------|-----------------------------------------------------------------------------|
//! | 1    | if the thread already holds exactly the target: run directly (re-entrant)   |
//! | 2    | release every context of the current frame (`held = false`)                |
//! | 3    | acquire the targets in ascending [`ContextId`] order (the global order)     |
//! | 4    | install a new frame for the targets and run the closure (panics caught)     |
//! | 5    | restore the previous frame pointer and release the targets                  |
//! | 6    | re-acquire the previous frame's contexts, in ascending order                |
//!
//! A thread therefore waits for a lock only while it holds nothing (steps 3 and 6), or while it holds
//! lower-numbered contexts of one multi-enter (step 3): waits-for edges always point from a lower to a
//! higher id or from an empty hand, so no cycle and no deadlock can form.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::time::Instant;

use crate::error::EnterError;
use crate::handle::ContextId;
use crate::lock::Acquired;

/// How long step 3 may wait.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Never wait: fail with `WouldBlock`.
    Try,
    /// Wait until the deadline, or for ever with `None`.
    Until(Option<Instant>),
}

/// What the handoff needs from a context, whatever its lock type.
pub(crate) trait Lockable: Sync {
    fn id(&self) -> ContextId;
    /// Acquires the lock (recording statistics) and checks the context is open; on any error the
    /// lock is not held.
    fn acquire(&self, wait: Wait, allow_closed: bool) -> Result<Acquired, EnterError>;
    /// Re-acquires after a nested call returned: waits without deadline, open or closed.
    fn reacquire(&self) -> Result<Acquired, EnterError>;
    /// Declares the state the lock protects repaired after [`Acquired::OwnerDied`].
    ///
    /// # Safety
    /// The calling thread holds the lock through a frame entry with `held == true`.
    unsafe fn mark_consistent(&self);
    /// Releases the lock.
    ///
    /// # Safety
    /// The calling thread holds the lock through a frame entry with `held == true`.
    unsafe fn release(&self);
    /// Records a panic caught inside the context (called while holding it).
    fn record_panic(&self);
}

/// [`FrameEntry::flags`]: this thread holds the lock through this entry.
const HELD: u8 = 1;
/// [`FrameEntry::flags`]: released by a nested enter (step 2), to be re-acquired when it returns
/// (step 6). Never set together with [`HELD`]: step 2 clears `HELD` as it sets this, step 6 clears
/// this before it sets `HELD` again.
const SUSPENDED: u8 = 2;
/// [`FrameEntry::flags`]: the lock was last acquired from a holder that died holding it
/// (process-shared locks), and the state has not been declared repaired since.
const OWNER_DIED: u8 = 4;

pub(crate) struct FrameEntry<'a> {
    ctx: &'a dyn Lockable,
    /// `ctx.id()`, cached so that membership checks make no virtual call.
    id: ContextId,
    /// [`HELD`], [`SUSPENDED`], [`OWNER_DIED`], in one byte, so that "held, and no death to
    /// repair" is one compare ([`FrameEntry::held_consistent`]).
    flags: Cell<u8>,
}

impl<'a> FrameEntry<'a> {
    /// Whether this thread holds the context through this entry right now.
    #[inline]
    pub(crate) fn is_held(&self) -> bool {
        self.flags.get() & HELD != 0
    }

    /// Whether the lock came from a holder that died, with the state not yet declared repaired.
    #[inline]
    pub(crate) fn owner_died(&self) -> bool {
        self.flags.get() & OWNER_DIED != 0
    }

    /// `is_held() && !owner_died()`, as one compare: `SUSPENDED` is never set while `HELD` is.
    #[inline]
    pub(crate) fn held_consistent(&self) -> bool {
        self.flags.get() == HELD
    }

    /// `is_held() && owner_died()`, as one compare (as for [`FrameEntry::held_consistent`]).
    #[inline]
    pub(crate) fn held_owner_died(&self) -> bool {
        self.flags.get() == HELD | OWNER_DIED
    }

    /// Clears `HELD`; returns whether it was set.
    #[inline]
    fn take_held(&self) -> bool {
        let f = self.flags.get();
        self.flags.set(f & !HELD);
        f & HELD != 0
    }

    /// Declares the state repaired (see [`Lockable::mark_consistent`]). Returns `false`, doing
    /// nothing, if this entry does not hold the lock now.
    pub(crate) fn mark_consistent(&self) -> bool {
        if !self.is_held() {
            return false;
        }
        // SAFETY: `HELD` is set, so this thread holds the lock via this entry.
        unsafe { self.ctx.mark_consistent() };
        self.flags.set(self.flags.get() & !OWNER_DIED);
        true
    }

    #[inline]
    fn record(&self, how: Acquired) {
        if how == Acquired::OwnerDied {
            self.flags.set(self.flags.get() | OWNER_DIED);
        }
    }

    /// An entry for a context of a known type: the id is read without a virtual call.
    #[inline]
    fn of<T: Lockable>(ctx: &'a T) -> Self {
        Self {
            ctx,
            id: ctx.id(),
            flags: Cell::new(HELD),
        }
    }

    #[inline]
    fn new(ctx: &'a dyn Lockable) -> Self {
        Self {
            ctx,
            id: ctx.id(),
            flags: Cell::new(HELD),
        }
    }
}

/// The frame entries that hold the contexts an `enter` closure runs in. A `Cx` keeps a reference to
/// its entry's `held` flag: checking that the thread still holds the context is then one load, and
/// the flag turns false exactly while a nested call has suspended the context (or after the caller
/// lost it), which is when the `Cx` must refuse access.
pub(crate) struct Holding<'a> {
    entries: &'a [FrameEntry<'a>],
}

impl<'a> Holding<'a> {
    /// The entry for `id`, if this frame holds it.
    #[inline]
    pub(crate) fn entry(&self, id: ContextId) -> Option<&'a FrameEntry<'a>> {
        self.entries.iter().find(|e| e.id == id)
    }
}

/// The contexts a thread holds. Lives on the stack of the `enter` call that installed it.
struct Frame<'a> {
    entries: &'a [FrameEntry<'a>],
}

thread_local! {
    /// The thread's current frame, or null. INVARIANT: a non-null pointer names a `Frame` on this
    /// thread's stack that is still alive: `run_frame` installs it and restores the previous pointer
    /// before the frame goes out of scope, on every path (the closure's panics are caught, and a
    /// drop guard restores the pointer).
    static CURRENT: Cell<*const Frame<'static>> = const { Cell::new(ptr::null()) };
}

#[inline]
fn with_frame<R>(p: *const Frame<'static>, f: impl FnOnce(Option<&Frame<'_>>) -> R) -> R {
    // SAFETY: every pointer passed here was read from CURRENT on this thread while the frame's
    // `enter` is still on the stack (it is the current frame, or the previous frame of an `enter`
    // that is still running above it), so by the INVARIANT on CURRENT it is null or live.
    let frame = unsafe { p.as_ref() };
    f(frame)
}

#[inline]
fn with_current<R>(f: impl FnOnce(Option<&Frame<'_>>) -> R) -> R {
    with_frame(CURRENT.with(Cell::get), f)
}

/// A small number that names the calling thread, unique for the life of the process (never 0).
/// Cheaper than `thread::current().id()` (no reference count touched).
#[inline(always)]
pub(crate) fn thread_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: Cell<u64> = const { Cell::new(0) };
    }
    TAG.with(|t| {
        let v = t.get();
        if v != 0 {
            return v;
        }
        // Relaxed: only uniqueness matters.
        let v = NEXT.fetch_add(1, Ordering::Relaxed);
        t.set(v);
        v
    })
}

thread_local! {
    /// The call chain the thread's code belongs to now: the chain of the shipped job a pinned home
    /// thread is running, else the thread's own tag; 0 until first asked (`current_chain` then
    /// stores the tag, so the common case is one thread-local load).
    static CHAIN: Cell<u64> = const { Cell::new(0) };
}

/// The call chain the calling code belongs to: the chain of the shipped job this thread is running,
/// or else this thread's own tag. Object borrows record it, so that a second borrow from the same
/// chain is a re-entrant call (`Busy`) and one from another chain must wait (`InUse`), even when a
/// pinned context's home thread runs both.
#[inline]
pub(crate) fn current_chain() -> u64 {
    match CHAIN.with(Cell::get) {
        0 => own_chain(),
        chain => chain,
    }
}

/// The first [`current_chain`] of a thread outside any job: its own tag, stored for next time.
///
/// Inlined, although it runs once per thread: it makes no call (two thread-local accesses and at
/// most one atomic add), whereas a call on the common path of a borrow, however cold, kept every
/// value live across it in callee-saved registers (six pushes and pops around every moved call).
#[inline(always)]
fn own_chain() -> u64 {
    let tag = thread_tag();
    CHAIN.with(|c| c.set(tag));
    tag
}

/// Runs `f` as part of `chain` (a shipped job's caller's chain), restoring the previous one after.
pub(crate) fn with_chain<R>(chain: u64, f: impl FnOnce() -> R) -> R {
    struct RestoreChain(u64);
    impl Drop for RestoreChain {
        fn drop(&mut self) {
            CHAIN.with(|c| c.set(self.0));
        }
    }
    let _restore = RestoreChain(CHAIN.with(|c| c.replace(chain)));
    f()
}

/// The contexts the calling thread holds right now, in ascending id order.
pub(crate) fn held_ids() -> Vec<ContextId> {
    with_current(|f| {
        f.map(|f| {
            f.entries
                .iter()
                .filter(|e| e.is_held())
                .map(|e| e.id)
                .collect()
        })
        .unwrap_or_default()
    })
}

/// Step 2: releases everything the current frame holds and marks it suspended.
#[inline]
fn suspend(prev: *const Frame<'static>) {
    with_frame(prev, |f| {
        for e in f.map_or(&[][..], |f| f.entries).iter().rev() {
            let f = e.flags.get();
            if f & HELD != 0 {
                e.flags.set((f & !HELD) | SUSPENDED);
                // SAFETY: `HELD` was set, so this thread holds the lock via this entry.
                unsafe { e.ctx.release() };
            }
        }
    });
}

/// Step 6: re-acquires what `suspend` released, in ascending order. An entry that cannot be
/// re-acquired stays `held = false`, and the error names the first of them.
#[inline]
fn resume(prev: *const Frame<'static>) -> Result<(), EnterError> {
    with_frame(prev, |f| {
        let mut result = Ok(());
        for e in f.map_or(&[][..], |f| f.entries) {
            let f = e.flags.get();
            if f & SUSPENDED == 0 {
                continue;
            }
            e.flags.set(f & !SUSPENDED);
            match e.ctx.reacquire() {
                Ok(how) => {
                    e.flags.set(e.flags.get() | HELD);
                    e.record(how);
                }
                Err(_) if result.is_ok() => result = Err(EnterError::CallerLost(e.id)),
                Err(_) => {}
            }
        }
        result
    })
}

/// Restores `CURRENT` on drop, so the closure's frame never outlives its stack slot.
struct Restore(*const Frame<'static>);
impl Drop for Restore {
    #[inline]
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    };
    discard_payload(payload);
    message
}

/// Drops a panic payload without letting a panic of its own destructor unwind. The payload is any
/// type the user panicked with (`panic_any`), whose destructor may panic too; that must not unwind
/// out of an entry (on a pinned context's home thread it would end the thread). Such a second
/// payload is forgotten (leaked), not dropped.
pub(crate) fn discard_payload(payload: Box<dyn std::any::Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// Runs `f` holding no context: releases what the thread holds, runs `f`, re-acquires. Used by
/// callers that wait for another thread (a pinned context's home thread) or another process to do
/// the work. If `f` panics, the contexts are re-acquired before the panic goes on (so the frames
/// above see the state they expect), and a failure to re-acquire is then ignored: the entry stays
/// `held = false`, which refuses access safely.
#[inline]
pub(crate) fn while_suspended<R>(f: impl FnOnce() -> R) -> Result<R, EnterError> {
    let prev = CURRENT.with(Cell::get);
    if prev.is_null() {
        // Nothing held: nothing to release or re-acquire.
        return Ok(f());
    }
    suspend(prev);
    let restore = Restore(prev);
    CURRENT.with(|c| c.set(ptr::null()));
    let r = catch_unwind(AssertUnwindSafe(f));
    drop(restore);
    let resumed = resume(prev);
    match r {
        Ok(r) => resumed.map(|()| r),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// The whole protocol for a set of targets, sorted by id and free of duplicates.
pub(crate) fn run_in<R>(
    targets: &[&dyn Lockable],
    wait: Wait,
    allow_closed: bool,
    f: impl FnOnce(&Holding<'_>) -> R,
) -> Result<R, EnterError> {
    debug_assert!(targets.windows(2).all(|w| w[0].id() < w[1].id()));
    match targets {
        [] => Ok(f(&Holding { entries: &[] })),
        [one] => run_frame(&[FrameEntry::new(*one)], |e| e.ctx, wait, allow_closed, f),
        many => {
            let entries: Vec<FrameEntry<'_>> = many.iter().map(|&t| FrameEntry::new(t)).collect();
            run_frame(&entries, |e| e.ctx, wait, allow_closed, f)
        }
    }
}

/// The protocol for one target of a concrete type: the hot path. The target's own lock calls are
/// direct (inlined) rather than through the `Lockable` vtable; only a suspended outer frame is
/// reached through the vtable.
///
/// Always inlined: out of line, the closure (the caller's whole captured environment) is passed by
/// pointer and copied with wider loads than its fresh stores (a store-forwarding stall; perf put
/// 14% of the out-of-line function's samples on that copy).
#[inline(always)]
pub(crate) fn run_one<T: Lockable, R>(
    target: &T,
    wait: Wait,
    allow_closed: bool,
    f: impl FnOnce(&Holding<'_>) -> R,
) -> Result<R, EnterError> {
    if CURRENT.with(Cell::get).is_null() {
        // The common case, a thread holding nothing: steps 1, 2 and 6 have nothing to do. The
        // lock is taken before the frame is built because a locked instruction waits for every
        // earlier store to drain: the fewer stores in flight, the cheaper the acquire.
        let how = target.acquire(wait, allow_closed)?;
        let entries = [FrameEntry::of(target)];
        entries[0].record(how);
        return run_held(&entries, target, f);
    }
    let entries = [FrameEntry::of(target)];
    run_frame(&entries, |_| target, wait, allow_closed, f)
}

/// Steps 4 and 5 for one target already acquired by a thread that held nothing before. Always
/// inlined, like [`run_one`].
#[inline(always)]
fn run_held<'e, T: Lockable, R>(
    entries: &'e [FrameEntry<'e>; 1],
    target: &'e T,
    f: impl FnOnce(&Holding<'_>) -> R,
) -> Result<R, EnterError> {
    let frame = Frame { entries };
    let restore = Restore(ptr::null());
    CURRENT.with(|c| c.set(ptr::from_ref(&frame).cast::<Frame<'static>>()));
    let outcome = catch_unwind(AssertUnwindSafe(
        #[inline(always)]
        || f(&Holding { entries }),
    ));
    drop(restore);
    // One test of the outcome: the panic's bookkeeping is out of line.
    match outcome {
        Ok(r) => {
            release_held(entries, &|_| target);
            Ok(r)
        }
        Err(p) => Err(panicked_held(entries, target, p)),
    }
}

/// [`run_held`] after its closure panicked: records the panic, releases, and names it.
#[cold]
#[inline(never)]
fn panicked_held<'e, T: Lockable>(
    entries: &'e [FrameEntry<'e>; 1],
    target: &'e T,
    payload: Box<dyn std::any::Any + Send>,
) -> EnterError {
    if entries[0].is_held() {
        target.record_panic();
    }
    release_held(entries, &|_| target);
    EnterError::Panicked {
        context: target.id(),
        message: panic_message(payload),
    }
}

/// Always inlined (into `run_one`'s nested path and `run_in`): out of line its closure and
/// result crossed the call through memory, and a nested enter (A -> B -> A) measured 14 ns
/// instead of 10 with one codegen unit.
#[inline(always)]
fn run_frame<'e, T: Lockable + ?Sized + 'e, R>(
    entries: &'e [FrameEntry<'e>],
    target_of: impl Fn(&'e FrameEntry<'e>) -> &'e T,
    wait: Wait,
    allow_closed: bool,
    f: impl FnOnce(&Holding<'_>) -> R,
) -> Result<R, EnterError> {
    let first = target_of(&entries[0]);
    let prev = CURRENT.with(Cell::get);

    if !prev.is_null() {
        // Step 1: a re-entrant call into exactly what the thread holds runs directly.
        let reentrant = with_frame(prev, |cur| {
            cur.is_some_and(|cur| {
                entries
                    .iter()
                    .all(|t| cur.entries.iter().any(|e| e.is_held() && e.id == t.id))
            })
        });
        if reentrant {
            // The closure's `Cx`s watch the entries of the frame that already holds the targets.
            let outcome = with_frame(prev, |cur| {
                let holding = Holding {
                    entries: cur.map_or(&[][..], |c| c.entries),
                };
                catch_unwind(AssertUnwindSafe(|| f(&holding)))
            });
            return outcome.map_err(|p| {
                first.record_panic();
                EnterError::Panicked {
                    context: first.id(),
                    message: panic_message(p),
                }
            });
        }
        // Step 2.
        suspend(prev);
    }

    // Step 3. The entries start `held = true`; on failure mark what we did not get.
    let mut failure = None;
    for (i, e) in entries.iter().enumerate() {
        match target_of(e).acquire(wait, allow_closed) {
            Ok(how) => e.record(how),
            Err(err) => {
                for later in &entries[i..] {
                    later.take_held();
                }
                failure = Some(err);
                break;
            }
        }
    }
    if let Some(err) = failure {
        release_held(entries, &target_of);
        resume(prev)?;
        return Err(err);
    }

    // Step 4.
    let frame = Frame { entries };
    let restore = Restore(prev);
    CURRENT.with(|c| c.set(ptr::from_ref(&frame).cast::<Frame<'static>>()));
    let holding = Holding { entries };
    let outcome = catch_unwind(AssertUnwindSafe(
        #[inline(always)]
        || f(&holding),
    ));

    // Step 5.
    drop(restore);
    if outcome.is_err() {
        if let Some(e) = entries.iter().find(|e| e.is_held()) {
            target_of(e).record_panic();
        }
    }
    release_held(entries, &target_of);

    // Step 6.
    if !prev.is_null() {
        resume(prev)?;
    }
    outcome.map_err(|p| EnterError::Panicked {
        context: first.id(),
        message: panic_message(p),
    })
}

#[inline]
fn release_held<'e, T: Lockable + ?Sized + 'e>(
    entries: &'e [FrameEntry<'e>],
    target_of: &impl Fn(&'e FrameEntry<'e>) -> &'e T,
) {
    for e in entries.iter().rev() {
        // The entry is done with (its frame ends): every flag is cleared.
        if e.flags.replace(0) & HELD != 0 {
            // SAFETY: `HELD` was set, so this thread holds the lock via this entry.
            unsafe { target_of(e).release() };
        }
    }
}
