//! Pinned contexts: a home thread that runs every call made into the context.
//!
//! A caller on another thread *ships* its closure: it allocates a job cell, sends a pointer to it to
//! the home thread's queue, releases its own context and waits (spinning briefly, then parked) until
//! the home thread has run the closure inside the context. The closure borrows from the caller's
//! stack; the job cell's state machine guarantees it is only touched while the caller waits:
//!
//! | state     | set by                     | meaning                                              |
//! |-----------|----------------------------|------------------------------------------------------|
//! | QUEUED    | caller, at creation        | in the queue; the caller waits                       |
//! | RUNNING   | home: CAS from QUEUED      | the home thread owns the closure and runs it         |
//! | DONE      | home: store after RUNNING  | the result is in the cell; the home never reads the  |
//! |           |                            | closure or result again                              |
//! | CANCELLED | caller: CAS from QUEUED    | the caller gave up (timeout) and took the closure    |
//! |           |                            | back; the home will not run it                       |
//! | REJECTED  | home: CAS from QUEUED      | the home thread is exiting; the caller takes the     |
//! |           |                            | closure back and reports the context closed          |
//!
//! The caller returns only from DONE, CANCELLED or REJECTED, and in all three the cell's closure and
//! result slots have been emptied by the time it returns, so the home side's last reference (which
//! may outlive the caller) only ever drops empty slots.
//!
//! While a home thread itself waits for another pinned context, it keeps serving its own queue, so a
//! chain P -> Q -> P cannot deadlock.

use std::cell::{Cell, UnsafeCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::{self, Thread, ThreadId};
use std::time::Instant;

use crate::context::{Cx, Inner, enter_inner};
use crate::error::EnterError;
use crate::handle::ContextId;
use crate::handoff::{self, Wait};
use crate::lock::RawContextLock;

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;
const CANCELLED: u8 = 3;
const REJECTED: u8 = 4;

/// Polls before parking, for the caller waiting on its reply and for an idle home thread waiting for
/// work: a short spin turns a round trip into a few hundred nanoseconds instead of two wake-ups at
/// tens of microseconds each (see `shared/limits.md`).
const SPIN_POLLS: u32 = 4_000;

enum Msg {
    Job(JobRef),
    Exit,
}

trait JobRun: Send + Sync {
    fn run(&self);
    fn reject(&self);
}

/// The home side's reference to a job. Dropping it unrun (queue drained at exit, or the channel
/// dropped with messages in it) rejects the job, so its caller is never left waiting.
struct JobRef(Arc<dyn JobRun>);

impl Drop for JobRef {
    fn drop(&mut self) {
        self.0.reject();
    }
}

struct JobCell<G, R> {
    state: AtomicU8,
    /// INVARIANT: touched by the home thread only after it won QUEUED -> RUNNING, and by the caller
    /// only after it saw DONE/REJECTED or won QUEUED -> CANCELLED.
    work: UnsafeCell<Option<G>>,
    /// INVARIANT: written by the home thread while RUNNING, read by the caller after DONE.
    result: UnsafeCell<Option<Result<R, EnterError>>>,
    caller: Thread,
    pending: Arc<AtomicUsize>,
    id: ContextId,
}

// SAFETY: `work` and `result` are accessed by one side at a time, as the state machine above
// decides (INVARIANTs on the fields); the handover is a Release store / Acquire load or an AcqRel
// CAS of `state`. `G` and `R` are `Send` because they move between the caller's thread and the home
// thread.
unsafe impl<G: Send, R: Send> Sync for JobCell<G, R> {}
// SAFETY: as for `Sync`.
unsafe impl<G: Send, R: Send> Send for JobCell<G, R> {}

impl<G, R> JobRun for JobCell<G, R>
where
    G: FnOnce() -> Result<R, EnterError> + Send,
    R: Send,
{
    fn run(&self) {
        if self
            .state
            .compare_exchange(QUEUED, RUNNING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // SAFETY: we won QUEUED -> RUNNING, so the home thread owns `work` (INVARIANT).
        let work = unsafe { (*self.work.get()).take() };
        let result = match work {
            Some(g) => g(),
            None => Err(EnterError::Closed(self.id)),
        };
        // SAFETY: still RUNNING: the caller does not read `result` before DONE (INVARIANT).
        unsafe { *self.result.get() = Some(result) };
        let caller = self.caller.clone();
        self.pending.fetch_sub(1, Ordering::Relaxed);
        self.state.store(DONE, Ordering::Release);
        caller.unpark();
    }

    fn reject(&self) {
        let caller = self.caller.clone();
        if self
            .state
            .compare_exchange(QUEUED, REJECTED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            caller.unpark();
        }
    }
}

/// The home thread's address book, kept inside the context.
pub(crate) struct Home {
    thread: Thread,
    thread_id: ThreadId,
    tx: Sender<Msg>,
    exit: Arc<AtomicBool>,
    /// Jobs shipped and not yet finished (for `try_enter`).
    pending: Arc<AtomicUsize>,
}

impl Home {
    pub(crate) fn is_current(&self) -> bool {
        thread::current().id() == self.thread_id
    }

    /// Asks the home loop to exit after the current job (used by `close` on the home thread).
    pub(crate) fn request_exit(&self) {
        self.exit.store(true, Ordering::Release);
    }

    fn send(&self, msg: Msg) -> bool {
        let ok = self.tx.send(msg).is_ok();
        // Always unpark: cheap when the home thread is not parked (one atomic swap, no syscall).
        self.thread.unpark();
        ok
    }
}

/// Held by every user-facing clone of a pinned `Context`; the last one to go tells the home thread
/// to close the context (dropping its objects on the home thread) and exit. It does not join the
/// thread: a drop must not wait on a job that might run for ever.
pub(crate) struct Owner {
    thread: Thread,
    tx: Sender<Msg>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Exit);
        self.thread.unpark();
    }
}

/// What a home thread keeps on its own stack, reachable from its thread-local slot.
struct HomeLocal {
    rx: Receiver<Msg>,
    exit: Arc<AtomicBool>,
}

thread_local! {
    /// INVARIANT: null, or the `HomeLocal` on this thread's stack in `home_main`, which outlives
    /// every use (it is reset before `home_main` returns).
    static HOME: Cell<*const HomeLocal> = const { Cell::new(std::ptr::null()) };
}

/// Serves one message from the calling thread's own home queue, if it is a home thread and one is
/// waiting. `Exit` is remembered and acted on by the top-level loop.
fn serve_one_if_home() -> bool {
    let p = HOME.with(Cell::get);
    // SAFETY: by the INVARIANT on HOME, null or live for this call.
    let Some(local) = (unsafe { p.as_ref() }) else {
        return false;
    };
    match local.rx.try_recv() {
        Ok(Msg::Job(job)) => {
            job.0.run();
            true
        }
        Ok(Msg::Exit) => {
            local.exit.store(true, Ordering::Release);
            true
        }
        Err(_) => false,
    }
}

/// Spawns the home thread of a new pinned context.
pub(crate) fn spawn<L: RawContextLock>(
    name: &str,
    id: ContextId,
    make: impl FnOnce(Home) -> Inner<L>,
) -> std::io::Result<(Arc<Inner<L>>, Arc<Owner>)> {
    let (tx, rx) = mpsc::channel::<Msg>();
    let (inner_tx, inner_rx) = mpsc::sync_channel::<Arc<Inner<L>>>(1);
    let exit = Arc::new(AtomicBool::new(false));
    let exit2 = Arc::clone(&exit);
    let handle = thread::Builder::new()
        .name(format!("ctx-{name}-{id}"))
        .spawn(move || {
            // The creator sends the context right after spawning; if it failed to, there is nothing
            // to serve.
            if let Ok(inner) = inner_rx.recv() {
                home_main(&inner, HomeLocal { rx, exit: exit2 });
            }
        })?;
    let thread = handle.thread().clone();
    let home = Home {
        thread: thread.clone(),
        thread_id: thread.id(),
        tx: tx.clone(),
        exit,
        pending: Arc::new(AtomicUsize::new(0)),
    };
    let inner = Arc::new(make(home));
    // The receiver is alive (the thread waits on it), so this cannot fail.
    let _ = inner_tx.send(Arc::clone(&inner));
    Ok((inner, Arc::new(Owner { thread, tx })))
}

fn home_main<L: RawContextLock>(inner: &Arc<Inner<L>>, local: HomeLocal) {
    struct ResetHome;
    impl Drop for ResetHome {
        fn drop(&mut self) {
            HOME.with(|h| h.set(std::ptr::null()));
        }
    }
    HOME.with(|h| h.set(&raw const local));
    let reset = ResetHome;

    'serve: while !local.exit.load(Ordering::Acquire) {
        let mut polls = 0u32;
        let msg = loop {
            match local.rx.try_recv() {
                Ok(m) => break m,
                Err(TryRecvError::Disconnected) => break 'serve,
                Err(TryRecvError::Empty) => {
                    if local.exit.load(Ordering::Acquire) {
                        break 'serve;
                    }
                    if polls < SPIN_POLLS {
                        polls += 1;
                        std::hint::spin_loop();
                    } else {
                        thread::park();
                    }
                }
            }
        };
        match msg {
            Msg::Job(job) => job.0.run(),
            Msg::Exit => break,
        }
    }

    // Close: drop every object here, on the home thread. A borrow cannot be live at the top of the
    // loop, so `close_held` cannot find one.
    let _ = enter_inner(inner, Wait::Until(None), true, |_cx: &mut Cx<'_>| {
        inner.close_held()
    });
    drop(reset);
    // Reject whatever is still queued; anything sent after this is dropped with the receiver, which
    // rejects it too (`JobRef::drop`).
    while local.rx.try_recv().is_ok() {}
}

/// Runs `f` in the pinned context `inner` on its home thread, from another thread.
pub(crate) fn ship<L, R, F>(
    inner: &Inner<L>,
    home: &Home,
    wait: Wait,
    f: F,
) -> Result<R, EnterError>
where
    L: RawContextLock,
    F: FnOnce(&mut Cx<'_>) -> R + Send,
    R: Send,
{
    let deadline = match wait {
        Wait::Try => {
            if home.pending.load(Ordering::Relaxed) != 0 || inner.lock_is_locked() {
                return Err(EnterError::WouldBlock(inner.id()));
            }
            None
        }
        Wait::Until(d) => d,
    };
    ship_work(inner, home, deadline, move || {
        enter_inner(inner, Wait::Until(None), false, f)
    })
}

/// Closes the pinned context `inner` from another thread: its objects are dropped on the home
/// thread, which then exits.
pub(crate) fn ship_close<L: RawContextLock>(
    inner: &Inner<L>,
    home: &Home,
) -> Result<(), crate::CloseError> {
    let closed = ship_work(inner, home, None, move || {
        enter_inner(inner, Wait::Until(None), true, |_cx: &mut Cx<'_>| {
            inner.close_held()
        })
    });
    let _ = home.send(Msg::Exit);
    match closed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(crate::CloseError::InUse(inner.id())),
        // Already closed and the home thread gone: closing twice does nothing.
        Err(EnterError::Closed(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn ship_work<L, R, G>(
    inner: &Inner<L>,
    home: &Home,
    deadline: Option<Instant>,
    work: G,
) -> Result<R, EnterError>
where
    L: RawContextLock,
    G: FnOnce() -> Result<R, EnterError> + Send,
    R: Send,
{
    if inner.is_closed() {
        return Err(EnterError::Closed(inner.id()));
    }
    let id = inner.id();
    let cell = Arc::new(JobCell {
        state: AtomicU8::new(QUEUED),
        work: UnsafeCell::new(Some(work)),
        result: UnsafeCell::new(None),
        caller: thread::current(),
        pending: Arc::clone(&home.pending),
        id,
    });
    let erased: Arc<dyn JobRun + '_> = Arc::clone(&cell) as Arc<dyn JobRun + '_>;
    // SAFETY: only the lifetime is changed. The home side may keep this reference after we return,
    // but by the state machine in the module docs it touches `work` and `result` only between winning
    // QUEUED -> RUNNING and storing DONE, and we do not return before DONE, CANCELLED or REJECTED; by
    // then both slots are empty (we take `result`, or take `work` back), so the home side's final drop
    // touches no borrowed data.
    let erased: Arc<dyn JobRun + 'static> = unsafe { std::mem::transmute(erased) };
    inner.stats_shipped();
    home.pending.fetch_add(1, Ordering::Relaxed);

    handoff::while_suspended(|| {
        if !home.send(Msg::Job(JobRef(erased))) {
            // The message (and with it our JobRef) came back and was dropped: that rejected the job.
        }
        wait_for(&cell, deadline, id)
    })?
}

fn wait_for<G, R>(
    cell: &JobCell<G, R>,
    deadline: Option<Instant>,
    id: ContextId,
) -> Result<R, EnterError> {
    let mut polls = 0u32;
    loop {
        match cell.state.load(Ordering::Acquire) {
            DONE => {
                // SAFETY: DONE: the home thread wrote `result` and will not touch it again (INVARIANT).
                let r = unsafe { (*cell.result.get()).take() };
                return r.unwrap_or(Err(EnterError::Closed(id)));
            }
            REJECTED => {
                // SAFETY: REJECTED: the home thread never ran the job and will not (INVARIANT).
                drop(unsafe { (*cell.work.get()).take() });
                return Err(EnterError::Closed(id));
            }
            _ => {}
        }
        if let Some(d) = deadline {
            if Instant::now() >= d
                && cell
                    .state
                    .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                cell.pending.fetch_sub(1, Ordering::Relaxed);
                // SAFETY: we won QUEUED -> CANCELLED, so the home thread will never run the job.
                drop(unsafe { (*cell.work.get()).take() });
                return Err(EnterError::TimedOut(id));
            }
        }
        if serve_one_if_home() {
            polls = 0;
            continue;
        }
        if polls < SPIN_POLLS {
            polls += 1;
            std::hint::spin_loop();
        } else {
            match deadline {
                None => thread::park(),
                Some(d) => {
                    let now = Instant::now();
                    if now < d {
                        thread::park_timeout(d - now);
                    }
                }
            }
        }
    }
}
