//! Contexts: isolated domains with their own lock and their own object table.

use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{AccessError, EnterError};
use crate::handle::{ContextId, Handle};
use crate::handoff::{self, Lockable, Wait};
use crate::local_lock::LocalLock;
use crate::lock::{Acquired, LockError, RawContextLock};
use crate::pinned::{self, Home};
use crate::table::Table;

/// Counters of one context, read with [`Context::stats`]. All are totals since creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ContextStats {
    /// Successful entries (each `enter` that ran its closure, re-entrant calls excluded).
    pub entries: u64,
    /// Entries that found the context idle and took it with one atomic operation.
    pub fast_entries: u64,
    /// Entries that had to wait for another holder.
    pub contended_entries: u64,
    /// Total time spent waiting in contended entries, in nanoseconds.
    pub wait_nanos: u64,
    /// Entries that gave up (`try_enter` on a busy context, or a timeout).
    pub gave_up: u64,
    /// Closures that panicked inside the context.
    pub panics: u64,
    /// Calls from other threads that a pinned context's home thread ran (counted as each one
    /// starts; a call cancelled by its timeout before it started is not counted).
    pub shipped_calls: u64,
    /// Calls from other threads waiting right now for a pinned context's home thread to take them
    /// (0 for a free context, whose callers wait for its lock instead).
    pub waiting_calls: u64,
}

#[derive(Default)]
struct RawStats {
    fast: AtomicU64,
    contended: AtomicU64,
    wait_nanos: AtomicU64,
    gave_up: AtomicU64,
    panics: AtomicU64,
    shipped: AtomicU64,
}

/// Adds to a counter that only the lock holder writes: a plain load and store (no locked
/// read-modify-write on the fast path). Readers may see a slightly stale total; never a torn one.
#[inline]
fn bump_held(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// What a [`Cx`] reads of its context, whatever the lock type: one place, so that a `Cx` is two
/// pointers (this and its frame entry) and building one on every entry is two stores.
struct CxMeta {
    id: ContextId,
    /// Whether the context is pinned (`Inner::home` is `Some`).
    pinned: bool,
    name: Box<str>,
    /// INVARIANT: only accessed by the thread that holds the context's lock (through a `Cx`, which
    /// checks that, or by `close`/`Drop`, which hold it or are the last owner).
    table: UnsafeCell<Table>,
}

impl CxMeta {
    fn new(id: ContextId, name: &str, pinned: bool) -> Self {
        Self {
            id,
            pinned,
            name: name.into(),
            table: UnsafeCell::new(Table::new(id)),
        }
    }
}

pub(crate) struct Inner<L> {
    id: ContextId,
    /// The `Cx` face: `meta.id == id`, `meta.pinned == home.is_some()`.
    meta: CxMeta,
    lock: L,
    /// Set once, under the lock; read under the lock by `acquire`.
    closed: AtomicBool,
    stats: RawStats,
    /// `Some` for pinned contexts: the only thread that may hold `lock`.
    pub(crate) home: Option<Home>,
}

// SAFETY: `Inner` is shared between threads through `Arc`. Everything except `meta.table` is Sync
// on its own. `meta.table` holds raw pointers to objects and is touched only by the holder of
// `lock` (INVARIANT), so accesses are serialized and ordered by the lock's Acquire/Release. Objects
// that are not `Send` are only admitted into pinned contexts (`Cx::adopt_local` checks), whose lock
// is only ever taken by their home thread (`Context::enter_local` and the multi-enter check it),
// and whose table is cleared on the home thread before it exits (`pinned::home_loop`), so such
// objects never change threads.
unsafe impl<L: RawContextLock> Send for Inner<L> {}
// SAFETY: as for `Send`: shared access to `meta.table` is serialized by `lock`.
unsafe impl<L: RawContextLock> Sync for Inner<L> {}

impl<L: RawContextLock> Inner<L> {
    pub(crate) fn id(&self) -> ContextId {
        self.id
    }

    fn is_pinned(&self) -> bool {
        self.home.is_some()
    }

    /// Counts a shipped call. Called by the home thread as it starts the job, never by the
    /// caller: the counter sits beside those the lock holder (always the home thread, for a
    /// pinned context) bumps on every entry, and a caller's read-modify-write there would pull
    /// that line to the caller's core and back on every call. Only the home thread writes it, so
    /// [`bump_held`] applies.
    pub(crate) fn count_shipped_on_home(&self) {
        bump_held(&self.stats.shipped, 1);
    }

    pub(crate) fn record_gave_up(&self) {
        self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub(crate) fn lock_is_locked(&self) -> bool {
        self.lock.is_locked()
    }

    /// Closes the context while holding it: sets `closed` and drops every object.
    pub(crate) fn close_held(&self) -> Result<(), AccessError> {
        // SAFETY: called only from inside a frame that holds this context (see callers), so by the
        // INVARIANT on `CxMeta::table` we have exclusive access; no reference into the table
        // outlives this.
        let table = unsafe { &mut *self.meta.table.get() };
        table.check_no_borrows()?;
        self.closed.store(true, Ordering::Relaxed);
        // The destructors are user code: one may re-enter this context (still held by this thread,
        // so re-entry succeeds) and use the table, even add objects. So the objects are taken out
        // first and dropped with no reference into the table live, until a round finds it empty.
        let mut panic = None;
        loop {
            // SAFETY: as above; the `&mut` ends within this statement, before any destructor runs.
            let objects = unsafe { &mut *self.meta.table.get() }.take_all();
            if objects.is_empty() {
                break;
            }
            // Every object is dropped here even if one destructor panics (on a pinned context's
            // home thread, where objects that are not `Send` must be dropped); the first panic
            // goes on after the last.
            if let Some(p) = crate::table::drop_all(objects) {
                if panic.is_none() {
                    panic = Some(p);
                } else {
                    crate::handoff::discard_payload(p);
                }
            }
        }
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
        Ok(())
    }
}

impl<L: RawContextLock> Inner<L> {
    #[cold]
    #[inline(never)]
    fn closed_error(&self) -> EnterError {
        EnterError::Closed(self.id)
    }

    /// [`Lockable::acquire`] past its fast path, given the first `try_lock`'s outcome: a busy lock
    /// (wait, or give up for `Wait::Try`), the lock taken from an owner that died holding it, a
    /// lock error; then the stats and the closed check.
    #[cold]
    #[inline(never)]
    fn acquire_slow(
        &self,
        first: Result<Acquired, LockError>,
        wait: Wait,
        allow_closed: bool,
    ) -> Result<Acquired, EnterError> {
        let got = match first {
            Ok(a) => Ok((a, 0)),
            Err(LockError::WouldBlock) => match wait {
                Wait::Try => Err(LockError::WouldBlock),
                Wait::Until(deadline) => {
                    let t0 = Instant::now();
                    self.lock.lock(deadline).map(|a| {
                        let waited = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        (a, waited)
                    })
                }
            },
            Err(e) => Err(e),
        };
        match got {
            Ok((acquired, waited)) => {
                let s = &self.stats;
                match acquired {
                    Acquired::Fast => bump_held(&s.fast, 1),
                    Acquired::Contended | Acquired::OwnerDied => {
                        bump_held(&s.contended, 1);
                        bump_held(&s.wait_nanos, waited);
                    }
                }
                if !allow_closed && self.closed.load(Ordering::Relaxed) {
                    // SAFETY: acquired just above.
                    unsafe { self.lock.unlock() };
                    return Err(EnterError::Closed(self.id));
                }
                Ok(acquired)
            }
            Err(e) => {
                self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
                Err(EnterError::from_lock(self.id, e))
            }
        }
    }
}

impl<L: RawContextLock> Lockable for Inner<L> {
    fn id(&self) -> ContextId {
        self.id
    }

    /// The fast path (the lock free at the first try, the context open) is inlined and touches
    /// no `EnterError`; everything else is out of line. Returned out of line, the
    /// `Result<Acquired, EnterError>` (an error holds a `String`) went through memory on every
    /// entry of a shared context, about 50 instructions.
    #[inline(always)]
    fn acquire(&self, wait: Wait, allow_closed: bool) -> Result<Acquired, EnterError> {
        match self.lock.try_lock() {
            Ok(Acquired::Fast) => {
                bump_held(&self.stats.fast, 1);
                if allow_closed || !self.closed.load(Ordering::Relaxed) {
                    return Ok(Acquired::Fast);
                }
                // SAFETY: acquired just above.
                unsafe { self.lock.unlock() };
                Err(self.closed_error())
            }
            first => self.acquire_slow(first, wait, allow_closed),
        }
    }

    fn reacquire(&self) -> Result<Acquired, EnterError> {
        self.lock
            .lock(None)
            .map_err(|e| EnterError::from_lock(self.id, e))
    }

    unsafe fn mark_consistent(&self) {
        // SAFETY: the caller holds the lock (this method's contract).
        unsafe { self.lock.mark_consistent() }
    }

    #[inline]
    unsafe fn release(&self) {
        // SAFETY: the caller holds the lock (this method's contract).
        unsafe { self.lock.unlock() }
    }

    fn record_panic(&self) {
        bump_held(&self.stats.panics, 1);
    }
}

/// An isolated execution context: its own lock (its "GIL") and its own table of objects.
///
/// `Context` is a cheap, cloneable reference (`Arc` inside); every clone names the same context.
/// See the [crate docs](crate) for the model.
///
/// - **Free** contexts ([`Context::new`]) are entered by whichever thread calls, directly on that
///   thread: when the context is idle, entering is one atomic operation.
/// - **Pinned** contexts ([`Context::pinned`]) own a home thread that runs every call made into them,
///   so they may hold values that are not `Send`.
pub struct Context<L: RawContextLock = LocalLock> {
    inner: Arc<Inner<L>>,
    /// For pinned contexts: tells the home thread to close when the last clone is dropped.
    _owner: Option<Arc<pinned::Owner>>,
}

impl<L: RawContextLock> Clone for Context<L> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            _owner: self._owner.clone(),
        }
    }
}

impl<L: RawContextLock> fmt::Debug for Context<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.inner.id)
            .field("name", &self.inner.meta.name)
            .field("pinned", &self.inner.is_pinned())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Context<LocalLock> {
    /// A new free context with a process-local lock.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self::with_lock(name, LocalLock::new())
    }

    /// A new pinned context: spawns its home thread, which runs every call into it.
    ///
    /// # Errors
    /// The OS refused to spawn the thread.
    pub fn pinned(name: &str) -> std::io::Result<Self> {
        Self::pinned_with_lock(name, LocalLock::new())
    }
}

impl<L: RawContextLock> Context<L> {
    /// A new free context over the given lock (for example a process-shared one from `context-shmem`).
    #[must_use]
    pub fn with_lock(name: &str, lock: L) -> Self {
        let id = ContextId::fresh();
        let inner = Inner {
            id,
            meta: CxMeta::new(id, name, false),
            lock,
            closed: AtomicBool::new(false),
            stats: RawStats::default(),
            home: None,
        };
        Self {
            inner: Arc::new(inner),
            _owner: None,
        }
    }

    /// A new pinned context over the given lock.
    ///
    /// # Errors
    /// The OS refused to spawn the home thread.
    pub fn pinned_with_lock(name: &str, lock: L) -> std::io::Result<Self> {
        let id = ContextId::fresh();
        let (inner, owner) = pinned::spawn(name, id, move |home| Inner {
            id,
            meta: CxMeta::new(id, name, true),
            lock,
            closed: AtomicBool::new(false),
            stats: RawStats::default(),
            home: Some(home),
        })?;
        Ok(Self {
            inner,
            _owner: Some(owner),
        })
    }

    /// This context's id (also its place in the global lock order).
    #[must_use]
    pub fn id(&self) -> ContextId {
        self.inner.id
    }

    /// The name given at creation.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.meta.name
    }

    /// Whether this is a pinned context.
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.inner.is_pinned()
    }

    /// Whether [`Context::close`] has run.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Relaxed)
    }

    /// The raw lock (for diagnostics; e.g. [`LocalLock::queued_waiters`]).
    #[must_use]
    pub fn lock(&self) -> &L {
        &self.inner.lock
    }

    /// A snapshot of this context's counters.
    #[must_use]
    pub fn stats(&self) -> ContextStats {
        let s = &self.inner.stats;
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ContextStats {
            entries: r(&s.fast) + r(&s.contended),
            fast_entries: r(&s.fast),
            contended_entries: r(&s.contended),
            wait_nanos: r(&s.wait_nanos),
            gave_up: r(&s.gave_up),
            panics: r(&s.panics),
            shipped_calls: r(&s.shipped),
            waiting_calls: self.inner.home.as_ref().map_or(0, pinned::Home::waiting),
        }
    }

    /// Enters the context and runs `f` inside it, waiting for its turn if it is busy.
    ///
    /// The calling thread's own context (if any) is released for the duration and re-entered
    /// afterwards. For a free context `f` runs on the calling thread; for a pinned context it runs on
    /// the home thread (the caller waits, holding nothing). Entering the context the thread already
    /// holds runs `f` directly.
    ///
    /// # Errors
    /// [`EnterError::Closed`] for a closed context; [`EnterError::Panicked`] if `f` panicked (the
    /// context is released and stays usable); [`EnterError::CallerLost`] if the caller's own context
    /// could not be re-entered afterwards. Over a lock other than [`LocalLock`], what that lock's
    /// `lock` may fail with: [`EnterError::NotRecoverable`] (a process-shared lock whose holder
    /// died and was not repaired), [`EnterError::TimedOut`] (for context-shmem's `SharedLock`, when
    /// this process could not register with it).
    //
    // Always inlined, down to the handoff's fast path: out of line, the closure is passed by
    // pointer and copied with a store-forwarding stall, and LLVM's heuristics did leave this out of
    // line in a large crate (`ctx`), costing a proxied call in move mode about a sixth.
    #[inline(always)]
    pub fn enter<R, F>(&self, f: F) -> Result<R, EnterError>
    where
        F: FnOnce(&mut Cx<'_>) -> R + Send,
        R: Send,
    {
        self.enter_with(Wait::Until(None), f)
    }

    /// Like [`Context::enter`] but gives up at once if the context is busy.
    ///
    /// # Errors
    /// [`EnterError::WouldBlock`] if busy (for a pinned context: if its home thread is running or has
    /// queued work, or does not start the job within 5 ms, as when a job there has suspended the
    /// context and the thread is still inside it), and everything [`Context::enter`] returns.
    pub fn try_enter<R, F>(&self, f: F) -> Result<R, EnterError>
    where
        F: FnOnce(&mut Cx<'_>) -> R + Send,
        R: Send,
    {
        self.enter_with(Wait::Try, f)
    }

    /// Like [`Context::enter`] but gives up if the caller's turn has not come within `timeout`. Once
    /// the closure has started it runs to completion.
    ///
    /// # Errors
    /// [`EnterError::TimedOut`], and everything [`Context::enter`] returns.
    pub fn enter_timeout<R, F>(&self, timeout: Duration, f: F) -> Result<R, EnterError>
    where
        F: FnOnce(&mut Cx<'_>) -> R + Send,
        R: Send,
    {
        self.enter_with(Wait::Until(Instant::now().checked_add(timeout)), f)
    }

    #[inline(always)]
    fn enter_with<R, F>(&self, wait: Wait, f: F) -> Result<R, EnterError>
    where
        F: FnOnce(&mut Cx<'_>) -> R + Send,
        R: Send,
    {
        match &self.inner.home {
            Some(home) if !home.is_current() => pinned::ship(&self.inner, home, wait, f),
            _ => self.enter_here(wait, false, f),
        }
    }

    /// Enters the context on the calling thread, without requiring `Send`: for a free context from
    /// any thread, for a pinned context only from its home thread.
    ///
    /// # Errors
    /// [`EnterError::NotHomeThread`] for a pinned context entered from elsewhere, and everything
    /// [`Context::enter`] returns.
    #[inline]
    pub fn enter_local<R>(&self, f: impl FnOnce(&mut Cx<'_>) -> R) -> Result<R, EnterError> {
        self.enter_here(Wait::Until(None), false, f)
    }

    #[inline(always)]
    pub(crate) fn enter_here<R>(
        &self,
        wait: Wait,
        allow_closed: bool,
        f: impl FnOnce(&mut Cx<'_>) -> R,
    ) -> Result<R, EnterError> {
        if let Some(home) = &self.inner.home {
            if !home.is_current() {
                return Err(EnterError::NotHomeThread(self.inner.id));
            }
        }
        enter_inner(&self.inner, wait, allow_closed, f)
    }

    /// Closes the context: waits its turn, drops every object (on the home thread, for a pinned
    /// context, which then exits) and makes every later entry fail with [`EnterError::Closed`].
    /// Closing a closed context does nothing.
    ///
    /// # Errors
    /// [`CloseError::InUse`] when called from inside a borrow of one of the context's own objects;
    /// [`CloseError::Enter`] with [`EnterError::Panicked`] if an object's destructor panicked.
    pub fn close(&self) -> Result<(), CloseError> {
        let inner = &*self.inner;
        let run = || -> Result<(), CloseError> {
            let closed =
                handoff::run_in(&[inner as &dyn Lockable], Wait::Until(None), true, |_| {
                    inner.close_held()
                })?;
            closed.map_err(|_| CloseError::InUse(inner.id))
        };
        match &inner.home {
            Some(home) if !home.is_current() => {
                pinned::ship_close(&self.inner, home)?;
                Ok(())
            }
            Some(home) => {
                run()?;
                home.request_exit();
                Ok(())
            }
            None => run(),
        }
    }
}

/// Enters `inner` on the calling thread (the caller has checked it may: free, or its home thread).
#[inline(always)]
pub(crate) fn enter_inner<L: RawContextLock, R>(
    inner: &Inner<L>,
    wait: Wait,
    allow_closed: bool,
    f: impl FnOnce(&mut Cx<'_>) -> R,
) -> Result<R, EnterError> {
    handoff::run_one(
        inner,
        wait,
        allow_closed,
        #[inline(always)]
        |holding| f(&mut Cx::new(inner, holding)),
    )
}

/// Why [`Context::close`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseError {
    /// Entering the context to close it failed.
    #[error(transparent)]
    Enter(#[from] EnterError),
    /// `close` was called from inside a borrow of one of the context's own objects.
    #[error("context {0} cannot be closed while one of its objects is in use")]
    InUse(ContextId),
}

/// Enters several contexts at once, in the global order, on the calling thread, and runs `f` with
/// one [`Cx`] per context, in the order given. For cross-context operations such as copying between
/// two buffers in different contexts without serialization.
///
/// The same context given twice yields two `Cx` for it (an object borrowed through one is `Busy`
/// through the other).
///
/// # Errors
/// [`EnterError::NotHomeThread`] if one of them is pinned to another thread, and everything
/// [`Context::enter`] returns.
pub fn enter_all<L, R>(
    contexts: &[&Context<L>],
    f: impl FnOnce(&mut [Cx<'_>]) -> R,
) -> Result<R, EnterError>
where
    L: RawContextLock,
{
    for c in contexts {
        if let Some(home) = &c.inner.home {
            if !home.is_current() {
                return Err(EnterError::NotHomeThread(c.id()));
            }
        }
    }
    let mut sorted: Vec<&Inner<L>> = contexts.iter().map(|c| &*c.inner).collect();
    sorted.sort_by_key(|i| i.id);
    sorted.dedup_by_key(|i| i.id);
    let targets: Vec<&dyn Lockable> = sorted.iter().map(|&i| i as &dyn Lockable).collect();
    handoff::run_in(&targets, Wait::Until(None), false, |holding| {
        let mut cxs: Vec<Cx<'_>> = contexts
            .iter()
            .map(|c| Cx::new(&c.inner, holding))
            .collect();
        f(&mut cxs)
    })
}

/// The call chain the calling code belongs to (never 0): the calling thread's own number, or, on a
/// pinned context's home thread running a shipped call, the number of the chain that shipped it.
/// Object borrows record it, so that a second borrow from the same chain is re-entrant (`Busy`) and
/// one from another chain must wait (`InUse`). Layers that keep objects of their own (such as
/// `context-forkpool`'s shared contexts) record it the same way. Unique within the process only.
#[must_use]
pub fn call_chain() -> u64 {
    handoff::current_chain()
}

/// Runs `f` holding no context: every context the calling thread holds is released for the
/// duration, exactly as when it calls into another context, and re-acquired (in the global order)
/// when `f` returns. For code that blocks on something other than a context (an answer from
/// another process, I/O, a condition), so that other threads can use the caller's context
/// meanwhile: Python's `Py_BEGIN_ALLOW_THREADS`. Outside any context it just runs `f`.
///
/// Objects the caller borrowed (inside [`Cx::with`]) stay borrowed meanwhile: other call chains
/// get [`AccessError::InUse`] for them. A [`Cx`] captured by `f` refuses access
/// ([`AccessError::NotHeld`]) until `f` returns.
///
/// ```
/// use context_core::{Context, held_contexts, suspended};
///
/// let ctx = Context::new("a");
/// let inside = ctx.enter(|_| suspended(held_contexts)).unwrap().unwrap();
/// assert!(inside.is_empty());
/// assert_eq!(ctx.enter(|_| held_contexts()).unwrap(), vec![ctx.id()]);
/// ```
///
/// # Errors
/// [`EnterError::CallerLost`] if a released context's lock could not be taken again (a lock
/// that reports errors, such as a process-shared one); `f` has run, and the thread then does not
/// hold that context. A context closed meanwhile is re-acquired like an open one (as after any
/// call out of it): its objects are gone and later entries fail.
///
/// # Panics
/// A panic of `f` continues after the contexts were re-acquired.
pub fn suspended<R>(f: impl FnOnce() -> R) -> Result<R, EnterError> {
    handoff::while_suspended(f)
}

/// The contexts the calling thread holds right now, in ascending id order (empty outside any
/// context; one entry inside `enter`; several inside [`enter_all`]).
#[must_use]
pub fn held_contexts() -> Vec<ContextId> {
    handoff::held_ids()
}

/// Proof that the calling thread holds a context, and the way to its objects.
///
/// A `Cx` only exists inside [`Context::enter`] (and friends), is neither `Send` nor `Sync`, and
/// every access re-checks that its context is the one the thread holds *now*: a `Cx` captured by a
/// nested call into another context gives [`AccessError::NotHeld`] there instead of racing.
///
/// ```compile_fail,E0277
/// fn assert_send<T: Send>() {}
/// assert_send::<context_core::Cx<'static>>();
/// ```
pub struct Cx<'a> {
    meta: &'a CxMeta,
    /// The frame entry through which this thread holds the context (see `handoff::Holding`): its
    /// `held` flag is true exactly while this thread holds the lock through it. `None` only if the
    /// frame does not hold it, which never happens. (An `Option` rather than a panic there: an
    /// entry nobody reads is then not computed at all.)
    entry: Option<&'a handoff::FrameEntry<'a>>,
    _not_send: PhantomData<*mut ()>,
}

impl<'a> Cx<'a> {
    #[inline]
    fn new<L: RawContextLock>(inner: &'a Inner<L>, holding: &handoff::Holding<'a>) -> Self {
        Self {
            meta: &inner.meta,
            entry: holding.entry(inner.id),
            _not_send: PhantomData,
        }
    }

    /// A `Cx` for the same context and frame that borrows this one, so that a `Cx` can be passed
    /// by value (two pointers, in registers) to a function that would otherwise take a reference
    /// to one in memory, such as a type-erased function pointer called on every entry.
    #[inline]
    #[must_use]
    pub fn reborrow(&mut self) -> Cx<'_> {
        Cx {
            meta: self.meta,
            entry: self.entry,
            _not_send: PhantomData,
        }
    }

    /// The context this `Cx` belongs to.
    #[must_use]
    pub fn id(&self) -> ContextId {
        self.meta.id
    }

    /// The context's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// Whether the context is pinned.
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.meta.pinned
    }

    /// Whether this thread holds the context through this `Cx` right now: false while a nested call
    /// into another context has suspended it. Layers that keep state of their own under the
    /// context's lock (e.g. objects in shared memory) check this before touching it.
    #[inline]
    #[must_use]
    pub fn is_held(&self) -> bool {
        self.entry.is_some_and(handoff::FrameEntry::is_held)
    }

    /// `is_held() && !owner_died()`, in one load and one compare: the thread holds the context
    /// through this `Cx` now and no holder's death awaits repair. The fast-path check of layers that
    /// keep state of their own under the context's lock.
    #[inline]
    #[must_use]
    pub fn is_held_consistent(&self) -> bool {
        self.entry.is_some_and(handoff::FrameEntry::held_consistent)
    }

    /// `is_held() && owner_died()`, in one load and one compare: the thread holds the context
    /// through this `Cx` now and should repair the state the lock protects (see
    /// [`Cx::owner_died`]).
    #[inline]
    #[must_use]
    pub fn needs_repair(&self) -> bool {
        self.entry.is_some_and(handoff::FrameEntry::held_owner_died)
    }

    /// Whether the previous holder of this context's lock died holding it (possible only with a
    /// process-shared lock, such as `context-shmem`'s): the state the lock protects may be
    /// half-updated. Repair it, then call [`Cx::mark_consistent`]; a context released without that
    /// becomes unrecoverable for a lock that tracks it (every later entry fails with
    /// [`EnterError::NotRecoverable`]). Also set when the lock is
    /// re-acquired after a nested call and its holder meanwhile died.
    #[must_use]
    pub fn owner_died(&self) -> bool {
        self.entry.is_some_and(handoff::FrameEntry::owner_died)
    }

    /// Declares the state this context's lock protects repaired after [`Cx::owner_died`]. Does
    /// nothing harmful when no holder died.
    ///
    /// # Errors
    /// [`AccessError::NotHeld`] if this `Cx` is suspended.
    pub fn mark_consistent(&mut self) -> Result<(), AccessError> {
        match self.entry {
            Some(e) if e.mark_consistent() => Ok(()),
            _ => Err(AccessError::NotHeld(self.meta.id)),
        }
    }

    /// Runs `f` on the table after checking this thread holds the context now.
    #[inline]
    fn table<R>(&self, f: impl FnOnce(&mut Table) -> R) -> Result<R, AccessError> {
        if !self.is_held() {
            return Err(AccessError::NotHeld(self.meta.id));
        }
        // SAFETY: the thread holds the context's lock right now (checked above: the flag is true
        // exactly while this thread's frame entry holds the lock), so by the INVARIANT
        // on `CxMeta::table` nothing else touches the table; the `&mut` does not escape `f`, and `f`
        // is one of this module's short table operations, which never call user code.
        Ok(f(unsafe { &mut *self.meta.table.get() }))
    }

    /// Moves `value` into the context and returns its handle.
    ///
    /// # Errors
    /// [`AccessError::NotHeld`] if this `Cx` is suspended; [`AccessError::Full`].
    pub fn adopt<T: Send + 'static>(&mut self, value: T) -> Result<Handle<T>, AccessError> {
        self.table(|t| t.insert(value))?
    }

    /// Moves a value that is not `Send` into a pinned context (it will only ever be touched on the
    /// home thread, and dropped there).
    ///
    /// # Errors
    /// [`AccessError::NotPinned`] in a free context, and as for [`Cx::adopt`].
    pub fn adopt_local<T: 'static>(&mut self, value: T) -> Result<Handle<T>, AccessError> {
        if !self.meta.pinned {
            return Err(AccessError::NotPinned(self.meta.id));
        }
        self.table(|t| t.insert(value))?
    }

    /// Whether `h` names a live object of type `T` in this context.
    #[must_use]
    pub fn contains<T: 'static>(&self, h: Handle<T>) -> bool {
        self.table(|t| t.contains(h)).unwrap_or(false)
    }

    /// The number of objects in the context.
    ///
    /// # Errors
    /// [`AccessError::NotHeld`] if this `Cx` is suspended.
    pub fn len(&self) -> Result<usize, AccessError> {
        self.table(|t| t.len())
    }

    /// Whether the context holds no objects.
    ///
    /// # Errors
    /// [`AccessError::NotHeld`] if this `Cx` is suspended.
    pub fn is_empty(&self) -> Result<bool, AccessError> {
        self.len().map(|n| n == 0)
    }

    /// Runs `f` with exclusive access to the object. The object stays borrowed until `f` returns, even
    /// if `f` calls into other contexts meanwhile (and so releases this one): a re-entrant access from
    /// further down the same call chain gets [`AccessError::Busy`], an access from another call chain
    /// (another thread, or another caller's job on a pinned context's home thread) gets
    /// [`AccessError::InUse`] (retry once the call returns). If `f` panics the object is poisoned.
    ///
    /// # Errors
    /// [`AccessError::NotHeld`], [`AccessError::WrongContext`], [`AccessError::Stale`],
    /// [`AccessError::WrongType`], [`AccessError::Busy`], [`AccessError::InUse`],
    /// [`AccessError::Poisoned`].
    #[inline]
    pub fn with<T: 'static, R>(
        &self,
        h: Handle<T>,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, AccessError> {
        let ptr = self.table(|t| t.begin_borrow(h, crate::handoff::current_chain()))??;
        /// Ends the borrow, poisoning the object, if `f` unwinds; forgotten when `f` returns.
        struct PoisonOnUnwind<'c, 'a, T: 'static> {
            cx: &'c Cx<'a>,
            h: Handle<T>,
        }
        impl<T: 'static> Drop for PoisonOnUnwind<'_, '_, T> {
            #[cold]
            fn drop(&mut self) {
                self.cx.end_borrow(self.h, true);
            }
        }
        let unwind = PoisonOnUnwind { cx: self, h };
        // SAFETY: `begin_borrow` set the object's borrow flag, which makes this the only reference
        // to it until the flag is cleared after `f` returns or unwinds (every other path to the
        // object checks the flag under the context lock). The object lives in its own allocation,
        // which only `remove` or `clear` free: `remove` refuses a borrowed object and `clear` runs
        // only after `check_no_borrows` (a context is closed only with no borrows). The pointer is
        // valid and aligned: it came from a `Box<T>` (type checked by `begin_borrow`).
        let r = f(unsafe { &mut *ptr.as_ptr() });
        std::mem::forget(unwind);
        self.end_borrow(h, false);
        Ok(r)
    }

    /// Ends a borrow started by [`Cx::with`]; `poison` marks the object poisoned.
    #[inline]
    fn end_borrow<T: 'static>(&self, h: Handle<T>, poison: bool) {
        // If the thread lost the context meanwhile (`CallerLost`) the borrow flag cannot be
        // cleared safely; the object then stays `Busy`, which is safe.
        let _ = self.table(|t| t.end_borrow(h, poison));
    }

    /// Takes the object out of the context; its handle becomes stale.
    ///
    /// # Errors
    /// As for [`Cx::with`] (a poisoned object can be removed).
    pub fn remove<T: 'static>(&mut self, h: Handle<T>) -> Result<T, AccessError> {
        self.table(|t| t.remove(h))?
    }

    /// Accepts a poisoned object again. Returns whether it was poisoned.
    ///
    /// # Errors
    /// As for [`Cx::with`].
    pub fn clear_poison<T: 'static>(&mut self, h: Handle<T>) -> Result<bool, AccessError> {
        self.table(|t| t.clear_poison(h))?
    }
}

impl fmt::Debug for Cx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cx")
            .field("id", &self.meta.id)
            .field("name", &self.meta.name)
            .finish()
    }
}
