//! Pinned contexts: a home thread that runs every call made into the context.
//!
//! A caller on another thread *ships* its closure: it builds a job cell **on its own stack**, hands
//! a pointer to it to the home thread (through a one-job mailbox, one CAS, when nothing is queued;
//! else through the mutex-protected queue), releases its own context and waits (spinning briefly, then
//! sleeping on a futex) until the home thread has run the closure inside the context. Nothing is
//! allocated per call and nothing is reference-counted, so a round trip costs about what a
//! thread-to-thread ping-pong costs.
//!
//! **Who may touch a job cell, and when:**
//!
//! | phase                      | the cell is accessed by                                             |
//! |----------------------------|---------------------------------------------------------------------|
//! | queued                     | nobody but through the queue mutex or the mailbox CAS: the caller   |
//! |                            | may remove it there (timeout), the home thread may take it there    |
//! |                            | (to run or reject it); whoever wins the removal owns the next step  |
//! | popped, not finished       | the home thread only (work, result); the caller only reads `state` |
//! | finished (DONE / REJECTED) | the caller only: the home thread's last access is the atomic write  |
//! |                            | that published the state                                            |
//!
//! The caller does not return while its cell is queued or popped-not-finished (its wait loop ends
//! only on a finished state or after it removed the cell from the queue itself), so the pointer the
//! home thread holds is always valid when used.
//!
//! **Waking.** `state` doubles as the caller's futex word: the caller moves it PENDING -> SLEEPING
//! before it sleeps, and the finisher wakes it only if it saw SLEEPING. A caller that is itself a
//! home thread sleeps on its own home's `sleep` word instead (so that new work for its own context
//! wakes it too) and keeps serving its own queue meanwhile, so a chain P -> Q -> P cannot deadlock.
//! Its finisher passes through FINISHING (not finished: the caller keeps waiting) while it clears
//! and wakes that word, so the word outlives the wake-up.
//! The home thread sleeps on `sleep` when its queue stays empty; a caller that queues work wakes it
//! only if it is asleep.

use std::cell::{Cell, UnsafeCell};
use std::collections::VecDeque;
use std::ptr::{self, NonNull};
use std::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence,
};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Instant;

use crate::context::{Cx, Inner, enter_inner};
use crate::error::EnterError;
use crate::handle::ContextId;
use crate::handoff::{self, Wait};
use crate::lock::RawContextLock;
use crate::sync::{Backoff, futex};

const PENDING: u32 = 0;
const SLEEPING: u32 = 1;
/// The home thread is waking a caller that is itself a home thread; not finished yet (see `finish`).
const FINISHING: u32 = 2;
const DONE: u32 = 3;
const REJECTED: u32 = 4;

/// A queued job: a pointer to a cell on a waiting caller's stack, and the monomorphized functions
/// that run or reject it. Raw pointers rather than `&dyn Trait` methods on purpose (rayon-core's
/// `JobRef` and `Latch::set(*const Self)` make the same choice): the caller may free the cell the
/// instant its final state is published, so the home side must not hold a reference to the cell
/// across that moment, not even as a `&self` argument of a function that is still returning.
#[derive(Clone, Copy)]
struct JobPtr {
    cell: NonNull<()>,
    run: unsafe fn(NonNull<()>),
    reject: unsafe fn(NonNull<()>),
}

// SAFETY: the pointee is `Sync` (`JobCell`'s impl) and stays valid while queued or running (module
// docs); the pointer moves between threads only through the queue mutex.
unsafe impl Send for JobPtr {}

impl JobPtr {
    fn same(self, other: Self) -> bool {
        self.cell == other.cell
    }

    /// Runs the job and finishes it.
    ///
    /// # Safety
    /// Called once, by the home thread, after popping the job from the queue.
    unsafe fn run(self) {
        // SAFETY: forwarded from this function's contract.
        unsafe { (self.run)(self.cell) }
    }

    /// Finishes the job unrun.
    ///
    /// # Safety
    /// As for [`JobPtr::run`].
    unsafe fn reject(self) {
        // SAFETY: forwarded from this function's contract.
        unsafe { (self.reject)(self.cell) }
    }
}

/// How a finished job wakes its caller.
#[derive(Clone, Copy)]
enum Wake {
    /// The caller sleeps on the cell's own `state` word.
    Own,
    /// The caller is a home thread sleeping on its home's `sleep` word, at this address.
    Home(*const AtomicU32),
}

/// Laid out in two cache-line groups: what the home thread writes last and the caller polls
/// (`state`, `result`) first, what the caller writes before publishing and the home thread reads
/// (`input`) on the next line, so that each group crosses between the cores once per call.
#[repr(C, align(64))]
struct JobCell<G, R> {
    state: AtomicU32,
    /// INVARIANT: written by the home thread before it finishes the cell; read by the caller after.
    result: UnsafeCell<Option<Result<R, EnterError>>>,
    input: JobInput<G>,
}

#[repr(C, align(64))]
struct JobInput<G> {
    /// The cell's own [`JobPtr`], which the mailbox points to: here, on the line the home thread
    /// reads anyway, rather than in a separate stack slot (one cache-line transfer fewer per
    /// shipped call). Its `cell` is set to the cell's address once the cell is in place, before
    /// the job is published; never changed after.
    job: JobPtr,
    /// INVARIANT: touched only by the home thread between popping the cell and finishing it, or by
    /// the caller after it removed the cell from the queue or saw it finished (module docs).
    work: UnsafeCell<Option<G>>,
    wake: Wake,
    id: ContextId,
    /// The caller's call chain, adopted by the home thread while it runs the job.
    chain: u64,
}

// SAFETY: `work` and `result` are accessed by one thread at a time, as the module docs' table says
// (INVARIANTs on the fields); the hand-overs go through the queue mutex or the AcqRel `swap` of
// `state`. `G` and `R` are `Send` because they move between the caller's and the home thread.
unsafe impl<G: Send, R: Send> Sync for JobCell<G, R> {}

impl<G, R> JobCell<G, R>
where
    G: FnOnce() -> Result<R, EnterError> + Send,
    R: Send,
{
    /// The cell's [`JobPtr`], its `cell` still dangling: `ship_work` sets it once the cell is in
    /// place.
    fn unplaced_job_ptr() -> JobPtr {
        JobPtr {
            cell: NonNull::dangling(),
            run: Self::run_raw,
            reject: Self::reject_raw,
        }
    }

    /// # Safety
    /// `cell` points to a live `JobCell<G, R>` that the home thread has popped and not finished.
    unsafe fn run_raw(cell: NonNull<()>) {
        let cell = cell.cast::<Self>().as_ptr();
        // SAFETY (for the blocks below): popped and not finished, so the home thread owns `work` and
        // `result` (INVARIANT) and the cell is live (its caller waits). Everything goes through the
        // raw pointer: no reference to the whole cell is created.
        // SAFETY: `cell` is live; reading a `Copy` field through a raw place.
        let chain = unsafe { (*cell).input.chain };
        // SAFETY: as above.
        let id = unsafe { (*cell).input.id };
        // SAFETY: as above; a raw pointer to the `work` slot, which this thread owns.
        let work_slot = unsafe { (*cell).input.work.get() };
        // SAFETY: `work_slot` is valid and nobody else touches it now (INVARIANT).
        let work = unsafe { (*work_slot).take() };
        // Served on top of a waiting job of another chain (see `wait_for`): that chain cannot go
        // on before this job returns, which deadlock detection must know (`waits`).
        let below = SERVING_ABOVE.with(|c| c.replace(0));
        let edge = if below == 0 {
            None
        } else {
            crate::waits::StackEdge::new(below, chain)
        };
        let result = match work {
            Some(g) => handoff::with_chain(chain, g),
            None => Err(EnterError::Closed(id)),
        };
        drop(edge);
        // SAFETY: as above; a raw pointer to the `result` slot, which this thread owns.
        let result_slot = unsafe { (*cell).result.get() };
        // SAFETY: `result_slot` is valid and nobody else touches it until the state is published.
        unsafe { *result_slot = Some(result) };
        // SAFETY: as above; `finish` is the last access.
        unsafe { Self::finish(cell, DONE) };
    }

    /// # Safety
    /// As for `run_raw`.
    unsafe fn reject_raw(cell: NonNull<()>) {
        // SAFETY: forwarded.
        unsafe { Self::finish(cell.cast::<Self>().as_ptr(), REJECTED) };
    }

    /// Publishes a final state and wakes the caller. The final store is the last access to the
    /// cell: the wake-up uses only values copied before it.
    ///
    /// # Safety
    /// `cell` is live, popped and not finished.
    unsafe fn finish(cell: *const Self, state: u32) {
        // SAFETY: the cell is live until the final state is published below (contract).
        let wake = unsafe { (*cell).input.wake };
        // SAFETY: as above; a raw place projection, no reference to the cell.
        let word = unsafe { &raw const (*cell).state };
        match wake {
            Wake::Own => {
                // SAFETY: as above. The `&AtomicU32` made for the call covers only the atomic
                // (interior mutability), which the caller may free once it sees the new state; as
                // in rayon-core's `CoreLatch::set`, nothing is read or written through it after the
                // swap itself (a futex wake uses only the address).
                if unsafe { (*word).swap(state, Ordering::AcqRel) } == SLEEPING {
                    futex::wake_addr(word);
                }
            }
            Wake::Home(home_word) => {
                // The caller is a home thread waiting in `wait_for`, which sleeps on its own home's
                // `sleep` word. That word lives as long as the caller's home, which the caller
                // holds while it waits, and it waits until the final state: so FINISHING first,
                // then the word, then the final state. The wake clears the word before waking, as
                // `wake_if_sleeping` does: a caller between its check and its `futex_wait` then
                // returns at once instead of missing the wake. Dekker with the caller (it stores
                // `sleep = 1`, SeqCst fence, reads the state): either it sees FINISHING and stays
                // awake, or the swap on its word reads 1 and wakes it.
                // SAFETY: the cell is live (above).
                unsafe { (*word).swap(FINISHING, Ordering::SeqCst) };
                // SAFETY: `home_word` is live until the caller sees the final state (above).
                if unsafe { (*home_word).swap(0, Ordering::SeqCst) } == 1 {
                    futex::wake_addr(home_word);
                }
                // SAFETY: the cell is live until this store; nothing touches it afterwards.
                unsafe { (*word).store(state, Ordering::Release) };
            }
        }
    }
}

impl<G, R> JobCell<G, R> {
    fn is_finished(&self) -> bool {
        self.state.load(Ordering::Acquire) >= DONE
    }
}

struct Queue {
    jobs: VecDeque<JobPtr>,
    /// Set when the home thread has stopped taking work.
    closed: bool,
}

/// The mailbox's value once the home thread has stopped taking work: never a real address (a
/// `JobPtr` is 8-aligned), only compared, never dereferenced.
fn mailbox_closed() -> *mut JobPtr {
    ptr::without_provenance_mut(1)
}

/// A word alone on its cache line(s), so that the callers' CAS and the home thread's polling do
/// not drag the queue mutex and the other fields along (128: adjacent-line prefetch pairs lines).
#[repr(align(128))]
struct Padded<T>(T);

/// The home thread's shared state, kept inside the context.
pub(crate) struct Home {
    /// A one-job slot in front of the queue: a caller that finds the queue empty publishes a
    /// pointer to its `JobPtr` (inside its cell, on its stack) here with one CAS, and the home
    /// thread takes it with one CAS: no mutex, and two cache-line transfers fewer per round trip
    /// than the queue. Null when empty; [`mailbox_closed`] once the home thread stopped.
    ///
    /// Order: the home thread serves the mailbox before the queue, and a caller uses the mailbox
    /// only when the queue is empty, so a queued job is overtaken only by a caller that raced with
    /// it (concurrent calls, no order between them), never starved by later ones.
    mailbox: Padded<AtomicPtr<JobPtr>>,
    /// The home thread's `handoff::thread_tag`, written by the home thread itself as it starts (0
    /// before). Only the home thread can ever find its own tag here, so a stale 0 seen by another
    /// thread is harmless and no ordering is needed.
    home_tag: AtomicU64,
    queue: Mutex<Queue>,
    /// Jobs in `queue` (read without the mutex by the polling home thread).
    queued: AtomicUsize,
    /// 1 while the home thread sleeps, or is about to, on this word.
    sleep: AtomicU32,
    /// Set when the home thread should close the context and exit.
    exit: AtomicBool,
}

impl Home {
    fn new() -> Self {
        Self {
            mailbox: Padded(AtomicPtr::new(ptr::null_mut())),
            home_tag: AtomicU64::new(0),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            queued: AtomicUsize::new(0),
            sleep: AtomicU32::new(0),
            exit: AtomicBool::new(false),
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue is consistent after every single operation and nothing that can panic runs
        // while it is held, so a poisoned mutex still guards valid data.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    pub(crate) fn is_current(&self) -> bool {
        self.home_tag.load(Ordering::Relaxed) == handoff::thread_tag()
    }

    /// Asks the home loop to exit after the current job (used by `close` on the home thread).
    pub(crate) fn request_exit(&self) {
        self.exit.store(true, Ordering::Release);
        self.wake_home();
    }

    /// Wakes the home thread if it sleeps. Callers have just published work (a job, or `exit`).
    fn wake_home(&self) {
        // Pairs with the fence in the home thread's sleep path: either it sees our work before it
        // sleeps, or we see `sleep == 1` here.
        fence(Ordering::SeqCst);
        self.wake_if_sleeping();
    }

    /// The second half of [`Home::wake_home`], for a caller whose work was published by a
    /// `SeqCst` read-modify-write (the mailbox CAS): that RMW, followed by this `SeqCst` load,
    /// orders against the home thread's `sleep` store and fence just as our own fence would (if the
    /// CAS precedes the home's fence in the SC order the home sees the job; else this load comes
    /// after that fence and sees `sleep == 1`), without a second full barrier per call.
    fn wake_if_sleeping(&self) {
        if self.sleep.load(Ordering::SeqCst) == 1 {
            self.sleep.store(0, Ordering::Relaxed);
            futex::wake_addr(&raw const self.sleep);
        }
    }

    /// How many calls wait for the home thread to take them (in the mailbox or the queue): a
    /// snapshot, for [`crate::ContextStats::waiting_calls`].
    pub(crate) fn waiting(&self) -> u64 {
        let m = self.mailbox.0.load(Ordering::Acquire);
        let in_mailbox = u64::from(!m.is_null() && m != mailbox_closed());
        in_mailbox + self.queued.load(Ordering::Acquire) as u64
    }

    /// Whether work is waiting (in the mailbox or the queue). The home thread polls this.
    #[inline]
    fn has_work(&self) -> bool {
        let m = self.mailbox.0.load(Ordering::Acquire);
        (!m.is_null() && m != mailbox_closed()) || self.queued.load(Ordering::Acquire) != 0
    }

    /// Hands `job` to the home thread: through the mailbox when the queue is empty and the mailbox
    /// free, else through the queue. `false` if the home thread has stopped taking work.
    ///
    /// `job` must stay where it is until the job is finished or cancelled (the mailbox holds its
    /// address); `ship_work` keeps it in the cell, on the waiting caller's stack.
    fn push(&self, job: &JobPtr) -> bool {
        if self.queued.load(Ordering::Acquire) == 0 {
            // SeqCst (Release at least): the home thread's Acquire on taking the pointer sees the
            // `JobPtr` and the cell written before; SeqCst lets `wake_if_sleeping` skip the fence.
            match self.mailbox.0.compare_exchange(
                ptr::null_mut(),
                ptr::from_ref(job).cast_mut(),
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.wake_if_sleeping();
                    return true;
                }
                Err(m) if m == mailbox_closed() => return false,
                Err(_) => {} // Occupied: queue behind it.
            }
        }
        {
            let mut q = self.lock_queue();
            if q.closed {
                return false;
            }
            q.jobs.push_back(*job);
            self.queued.fetch_add(1, Ordering::Release);
        }
        self.wake_home();
        true
    }

    /// Takes the job in the mailbox, if any. Only the home thread calls this.
    #[inline]
    fn take_mailbox(&self) -> Option<JobPtr> {
        let m = self.mailbox.0.load(Ordering::Acquire);
        if m.is_null() || m == mailbox_closed() {
            return None;
        }
        // A CAS, not a swap: the value may have changed since the load only by its caller
        // cancelling (to null) and maybe another caller publishing; either way only the job
        // whose pointer we saw is taken, and only if it is still there.
        self.mailbox
            .0
            .compare_exchange(m, ptr::null_mut(), Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // SAFETY: the CAS made this thread the job's only taker; its caller published the pointer
        // with Release (seen by the Acquire above) and does not return, so the `JobPtr` on its
        // stack stays valid, until the job is finished (module docs; it can no longer cancel).
        Some(unsafe { *m })
    }

    /// Removes `job` if it is still waiting in the mailbox or the queue (the caller gave up).
    /// `true` if removed.
    fn cancel(&self, job: &JobPtr) -> bool {
        let mine = ptr::from_ref(job).cast_mut();
        if self
            .mailbox
            .0
            .compare_exchange(mine, ptr::null_mut(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        let job = *job;
        let mut q = self.lock_queue();
        match q.jobs.iter().position(|j| j.same(job)) {
            Some(i) => {
                q.jobs.remove(i);
                self.queued.fetch_sub(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn pop(&self) -> Option<JobPtr> {
        let mut q = self.lock_queue();
        let job = q.jobs.pop_front();
        if job.is_some() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        job
    }

    /// Runs one waiting job (the mailbox's first, then the queue's), if any. Only the home thread
    /// calls this.
    fn serve_one(&self) -> bool {
        match self.take_mailbox().or_else(|| self.pop()) {
            Some(job) => {
                // SAFETY: the job was queued by a caller that waits until it is finished (module
                // docs), and popping it made this thread its only user.
                unsafe { job.run() };
                true
            }
            None => false,
        }
    }
}

/// Held by every user-facing clone of a pinned `Context`; the last one to go tells the home thread
/// to close the context (dropping its objects on the home thread) and exit. It does not join the
/// thread: a drop must not wait on a job that might run for ever.
pub(crate) struct Owner {
    home: Arc<dyn HomeRef>,
}

/// Type-erased access to a context's `Home` (the context's lock type does not matter here).
trait HomeRef: Send + Sync {
    fn home(&self) -> &Home;
}

impl<L: RawContextLock> HomeRef for Inner<L> {
    fn home(&self) -> &Home {
        // A pinned context's `Inner` always has a home (set at creation, never removed).
        self.home
            .as_ref()
            .unwrap_or_else(|| unreachable!("pinned context without a home"))
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.home.home().request_exit();
    }
}

thread_local! {
    /// Set by a waiting home thread (`wait_for`) to its waiting chain just before it serves one job
    /// of its own queue; taken (reset to 0) by that job as it starts.
    static SERVING_ABOVE: Cell<u64> = const { Cell::new(0) };
    /// INVARIANT: null, or the `Home` of the context whose home thread this is; valid while
    /// `home_main` runs (which holds the context alive) and reset before it returns.
    static HOME: Cell<*const Home> = const { Cell::new(std::ptr::null()) };
}

fn current_home<'a>() -> Option<&'a Home> {
    let p = HOME.with(Cell::get);
    // SAFETY: by the INVARIANT on HOME, null or valid while this thread runs `home_main`, which is
    // on this thread's stack below any caller of this function.
    unsafe { p.as_ref() }
}

/// Spawns the home thread of a new pinned context.
pub(crate) fn spawn<L: RawContextLock>(
    name: &str,
    id: ContextId,
    make: impl FnOnce(Home) -> Inner<L>,
) -> std::io::Result<(Arc<Inner<L>>, Arc<Owner>)> {
    let (inner_tx, inner_rx) = std::sync::mpsc::sync_channel::<Arc<Inner<L>>>(1);
    // Detached: the home thread exits on its own when the context closes (see `Owner`).
    let _detached = thread::Builder::new()
        .name(format!("ctx-{name}-{id}"))
        .spawn(move || {
            // The creator sends the context right after spawning; if it failed to, there is nothing
            // to serve.
            if let Ok(inner) = inner_rx.recv() {
                home_main(&inner);
            }
        })?;
    let inner = Arc::new(make(Home::new()));
    // The receiver is alive (the thread waits on it), so this cannot fail.
    let _ = inner_tx.send(Arc::clone(&inner));
    let owner = Owner {
        home: Arc::clone(&inner) as Arc<dyn HomeRef>,
    };
    Ok((inner, Arc::new(owner)))
}

fn home_main<L: RawContextLock>(inner: &Arc<Inner<L>>) {
    let home = HomeRef::home(&**inner);
    struct ResetHome;
    impl Drop for ResetHome {
        fn drop(&mut self) {
            HOME.with(|h| h.set(std::ptr::null()));
        }
    }
    home.home_tag
        .store(handoff::thread_tag(), Ordering::Relaxed);
    HOME.with(|h| h.set(std::ptr::from_ref(home)));
    let reset = ResetHome;

    while !home.exit.load(Ordering::Acquire) {
        if home.serve_one() {
            continue;
        }
        let mut backoff = Backoff::new();
        while !home.has_work() && !home.exit.load(Ordering::Acquire) {
            if !backoff.snooze() {
                sleep_home(home);
                break;
            }
        }
    }

    // Stop taking work, reject what is queued, then drop every object here, on the home thread. A
    // borrow cannot be live at the top of the loop, so `close_held` cannot find one.
    let mut rejected: Vec<JobPtr> = {
        let mut q = home.lock_queue();
        q.closed = true;
        home.queued.store(0, Ordering::Relaxed);
        q.jobs.drain(..).collect()
    };
    // Close the mailbox too: a caller's CAS either lands before this swap (and its job is
    // rejected here) or finds it closed.
    let boxed = home.mailbox.0.swap(mailbox_closed(), Ordering::Acquire);
    if !boxed.is_null() && boxed != mailbox_closed() {
        // SAFETY: as in `Home::take_mailbox`: the swap took the job, whose caller waits for it.
        rejected.push(unsafe { *boxed });
    }
    for job in rejected {
        // SAFETY: drained from the queue under the mutex, or taken from the mailbox by the swap;
        // either way this thread is its only user and its caller waits for it.
        unsafe { job.reject() };
    }
    let _ = enter_inner(inner, Wait::Until(None), true, |_cx: &mut Cx<'_>| {
        inner.close_held()
    });
    drop(reset);
}

/// The home thread's sleep: announce it, re-check for work, then sleep on `sleep`.
fn sleep_home(home: &Home) {
    home.sleep.store(1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
    if !home.has_work() && !home.exit.load(Ordering::Relaxed) {
        futex::wait(&home.sleep, 1, None);
    }
    home.sleep.store(0, Ordering::Relaxed);
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
            if home.has_work() || inner.lock_is_locked() {
                inner.record_gave_up();
                return Err(EnterError::WouldBlock(inner.id()));
            }
            // Idle by these signs, but the home thread may be inside a job that has suspended
            // the context (its lock is free, yet the thread is not serving), or take another
            // caller's job first: if it has not started this one within the grace, give up.
            Some(Instant::now() + TRY_GRACE)
        }
        Wait::Until(d) => d,
    };
    let r = ship_work(inner, home, deadline, move || {
        inner.count_shipped_on_home();
        enter_inner(inner, Wait::Until(None), false, f)
    });
    match r {
        Err(EnterError::TimedOut(id)) if matches!(wait, Wait::Try) => {
            Err(EnterError::WouldBlock(id))
        }
        r => r,
    }
}

/// How long `try_enter` on a pinned context waits for an idle-looking home thread to start its job
/// (a sleeping home thread wakes in tens of microseconds; a busy one does not start it at all).
pub(crate) const TRY_GRACE: std::time::Duration = std::time::Duration::from_millis(5);

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
    // Refused (an object is borrowed): the context stays open and its home thread serves on.
    // Anything else closed it (a destructor's panic comes after every object was dropped).
    if !matches!(closed, Ok(Err(_))) {
        home.request_exit();
    }
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
    let id = inner.id();
    if inner.is_closed() {
        return Err(EnterError::Closed(id));
    }
    handoff::while_suspended(|| {
        let caller_home = current_home();
        let mut cell = JobCell {
            state: AtomicU32::new(PENDING),
            result: UnsafeCell::new(None),
            input: JobInput {
                job: JobCell::<G, R>::unplaced_job_ptr(),
                work: UnsafeCell::new(Some(work)),
                wake: caller_home.map_or(Wake::Own, |h| Wake::Home(&raw const h.sleep)),
                id,
                chain: handoff::current_chain(),
            },
        };
        let at = NonNull::from(&mut cell);
        // SAFETY: `at` comes from a `&mut` to `cell`, a live local, so it is valid and aligned,
        // and nobody else knows of the cell yet, so the write races with nothing. It goes through
        // `at`, and every later use of the cell (the shared reference below, and the pointer
        // stored, which the home thread uses) derives from `at`, so none is invalidated.
        unsafe { (*at.as_ptr()).input.job.cell = at.cast() };
        // SAFETY: `at` is valid and aligned (above); `cell` is not used by name again, so no
        // `&mut` to it exists while this shared reference (and what derives from it) lives.
        let cell: &JobCell<G, R> = unsafe { at.as_ref() };
        let job = &cell.input.job;
        // The home thread uses this pointer only while the cell is queued or popped-not-finished, and
        // `wait_for` below does not return (nor unwind: it calls nothing that panics) in those
        // phases (module docs), so the cell outlives every use.
        if !home.push(job) {
            return Err(EnterError::Closed(id));
        }
        wait_for(cell, job, home, caller_home, deadline)
    })?
}

fn wait_for<G, R>(
    cell: &JobCell<G, R>,
    job: &JobPtr,
    target: &Home,
    caller_home: Option<&Home>,
    mut deadline: Option<Instant>,
) -> Result<R, EnterError> {
    let mut backoff = Backoff::new();
    loop {
        if cell.is_finished() {
            return take_outcome(cell);
        }
        if let Some(d) = deadline {
            if Instant::now() >= d {
                if target.cancel(job) {
                    // Removed from the queue before the home thread saw it: it never will.
                    // SAFETY: the cell is ours alone again (module docs).
                    drop(unsafe { (*cell.input.work.get()).take() });
                    return Err(EnterError::TimedOut(cell.input.id));
                }
                // Already running: a started call runs to completion.
                deadline = None;
            }
        }
        if let Some(own) = caller_home {
            SERVING_ABOVE.with(|c| c.set(handoff::current_chain()));
            let served = own.serve_one();
            SERVING_ABOVE.with(|c| c.set(0));
            if served {
                backoff.reset();
                continue;
            }
        }
        if backoff.snooze() {
            continue;
        }
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match caller_home {
            // A home thread sleeps on its own word, so that work for its own context wakes it too.
            Some(own) => {
                own.sleep.store(1, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                // FINISHING: the finisher is waking us right now; stay awake (see `finish`), but
                // give it the CPU in case it was preempted between its two steps.
                let state = cell.state.load(Ordering::Acquire);
                if state == PENDING && !own.has_work() {
                    futex::wait(&own.sleep, 1, timeout);
                } else if state == FINISHING {
                    thread::yield_now();
                }
                own.sleep.store(0, Ordering::Relaxed);
            }
            None => {
                if cell
                    .state
                    .compare_exchange(PENDING, SLEEPING, Ordering::Acquire, Ordering::Acquire)
                    .is_ok()
                    || cell.state.load(Ordering::Acquire) == SLEEPING
                {
                    futex::wait(&cell.state, SLEEPING, timeout);
                }
            }
        }
    }
}

fn take_outcome<G, R>(cell: &JobCell<G, R>) -> Result<R, EnterError> {
    if cell.state.load(Ordering::Acquire) == REJECTED {
        // SAFETY: finished: the cell is ours alone (module docs).
        drop(unsafe { (*cell.input.work.get()).take() });
        return Err(EnterError::Closed(cell.input.id));
    }
    // SAFETY: finished: the home thread wrote `result` and will not touch the cell again.
    unsafe { (*cell.result.get()).take() }.unwrap_or(Err(EnterError::Closed(cell.input.id)))
}
