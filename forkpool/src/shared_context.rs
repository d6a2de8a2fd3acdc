//! Shared contexts: a context whose lock and objects live in the pool's shared heap, entered by any
//! process of the pool with the same enter/handoff API as a local [`context_core::Context`].
//!
//! A [`SharedContext`] is a process's handle on a context whose *header* lives in the shared heap: a
//! `context-shmem` [`RawSharedLock`] (process-shared, FIFO, crash-detecting) and the table of the
//! context's objects. Its process-local face is a `context_core::Context` built over that lock
//! ([`PoolLock`]), so entering it is the core protocol: when the context is idle the calling thread
//! takes it with one compare-and-swap on the shared lock word, with no message and no thread or
//! process switch; when it is busy the caller waits its turn (FIFO across processes); from inside it
//! a thread can call into a local context and back (the shared lock is released meanwhile and taken
//! again on return); [`SharedContext::try_enter`] and [`SharedContext::enter_timeout`] bound the wait.
//!
//! **Objects** are [`ShareSafe`] values allocated in the shared heap and owned by the context
//! ([`SharedCx::alloc`]); they may hold plain pointers into the pool's regions (a [`crate::ListHead`],
//! say). A [`SharedHandle<T>`] names one: it is `Copy`, valid in every process of the pool, and can
//! itself be stored in shared memory. It carries the context's random identity, the slot and the
//! slot's generation; the slot records the object's type. A handle used in another context, after
//! its object was freed, or with another type is a typed [`ObjectError`], never undefined behaviour.
//!
//! **Borrows** follow the core object table: [`SharedCx::with`] marks the object borrowed, in shared
//! memory, by this process (its [`ProcessToken`]: PID and start time) and this call chain, for as
//! long as the closure runs, *including* across a nested call into another context, during which the
//! shared lock is released. Meanwhile another entrant, in this or another process, gets
//! [`ObjectError::InUse`] (leave, retry later); the same call chain gets [`ObjectError::Busy`]
//! (a re-entrant call: waiting would never end). A panic inside the closure poisons the object
//! ([`ObjectError::Poisoned`] until [`SharedCx::clear_poison`]). [`SharedCx::get`] copies a `Copy`
//! object out without recording a borrow (no caller code runs during the read, so no nested call can
//! suspend it): the cheapest read.
//!
//! **Crashes.** If a process dies inside the context (holding the lock), the lock hands itself to the
//! next entrant marked "owner died" ([`context_core::Cx::owner_died`]). Before that entrant's closure
//! runs, the shared context repairs itself: it rebuilds its free list and counts from the slots (so a
//! table operation cut half-way is undone or completed), poisons every object whose borrower is a
//! dead process and clears that borrow, and only then declares the lock consistent. The entrant sees
//! what happened through [`SharedCx::recovery`]. A process that dies *suspended* (inside a nested
//! call, so not holding the lock) with an object borrowed is caught when somebody next touches that
//! object: an in-use conflict checks the borrower's liveness (PID plus start time, so PID reuse cannot
//! fool it) and reclaims the object from a dead borrower the same way (poisoned, borrow cleared). A
//! holder that dies while this thread is suspended in a nested call is repaired when the call returns.
//!
//! **What a crash can cost.** Every table step is one store of one word under the lock, ordered so
//! that a cut at any point leaves slots the repair understands: the object being allocated or freed at
//! that moment may leak its block (as blocks a killed worker held leak in the allocator, until
//! [`crate::Pool::reset`]); no handle can reach freed memory. Object contents are whatever the dead
//! process left, hence the poison.
//!
//! **Lifetime.** Objects are freed by [`SharedCx::free`], [`SharedCx::reset`] and
//! [`SharedContext::close`]. The header itself (about 3 KiB) is never freed while the pool's heap
//! lives: other processes may still wait on its lock or open it from a [`SharedContextRef`], and must
//! find a closed context rather than reused memory. A [`crate::Pool::reset`] reclaims it with
//! everything else (the pool refuses to reset while a `SharedContext` handle is alive in the master).
//!
//! **Limits.** The lock registers at most [`context_shmem::lock::MAX_PROCS`] live processes. A
//! context holds at most [`MAX_OBJECTS`] objects. Borrows record the process token and core's call
//! chain ([`context_core::call_chain`]), so a pinned context's home thread serving several callers'
//! jobs tells them apart as the core object table does (`InUse`, not `Busy`). A handle carried into a child by `fork` enters and reaches objects
//! (the lock re-registers the child: the registration is cached per process and told apart by a
//! fork generation that a `pthread_atfork` child handler bumps), but allocating or freeing needs the child's own allocator slot:
//! open the context there with the child's heap ([`crate::JobContext::heap`]).
//!
//! # Example
//!
//! A master creates a shared context holding a counter; workers and the master increment it.
//!
//! ```
//! use std::time::Duration;
//! use context_forkpool::{
//!     JobContext, Pool, SharedBox, SharedContext, SharedContextRef, SharedHandle, isolated,
//! };
//!
//! /// What a worker needs: where the context is, and the counter's handle.
//! type Args = (SharedContextRef, SharedHandle<u64>);
//!
//! fn bump(jcx: &JobContext, args: &Args) -> u64 {
//!     let Ok(scx) = SharedContext::open(jcx.heap(), args.0) else { return 0 };
//!     let mut done = 0;
//!     for _ in 0..1000 {
//!         // Idle: one CAS on the shared lock word, on this thread. Busy: wait in line.
//!         if let Ok(Ok(())) = scx.enter(|s| s.with(args.1, |n| *n += 1)) {
//!             done += 1;
//!         }
//!     }
//!     done
//! }
//!
//! fn demo() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut pool = Pool::builder().workers(2).reserve(1 << 30).initial_region(64 << 20).build()?;
//!     let scx = SharedContext::create(pool.heap(), "counter")?;
//!     let counter = scx.enter(|s| s.alloc(0u64))??;
//!     let args = SharedBox::new(pool.heap(), (scx.share(), counter))?;
//!     let (done, ()) = pool.broadcast_during(bump, &args, Duration::from_secs(30), |_, _| {
//!         for _ in 0..1000 {
//!             scx.enter(|s| s.with(counter, |n| *n += 1)).unwrap().unwrap();
//!         }
//!     });
//!     for d in done {
//!         assert_eq!(d?, 1000);
//!     }
//!     assert_eq!(scx.enter(|s| s.with(counter, |n| *n))??, 3000);
//!     Ok(())
//! }
//!
//! // The pool forks only from a single-threaded process: run the demo in a fresh copy of this binary.
//! let out = isolated::run(|| demo().map_or_else(|e| { eprintln!("{e}"); 1 }, |()| 0), Duration::from_secs(60)).unwrap();
//! assert!(out.success(), "{}", out.stderr);
//! ```

use std::alloc::Layout;
use std::any::TypeId;
use std::cell::RefCell;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use context_core::{Acquired, ContextId, ContextStats, Cx, EnterError, LockError, RawContextLock};
use context_shmem::{Liveness, ProcLiveness, ProcessToken, RawSharedLock, Slot};

use crate::error::AllocError;
use crate::heap::{Heap, ShareSafe};

/// Marks an initialized shared-context header ("CTXSHCX1").
const MAGIC: u64 = u64::from_le_bytes(*b"CTXSHCX1");
/// The header's type tag: layout version and sizes, so a header of another build is refused.
const LAYOUT: u64 =
    (1 << 48) | ((size_of::<Header>() as u64) << 16) | (size_of::<SlotRec>() as u64);
/// Bytes of the name kept in the header.
const NAME_BYTES: usize = 48;
/// Slots in the first table segment; segment `k` holds `SEG_BASE << k`.
const SEG_BASE: u64 = 32;
/// Table segments (the directory in the header).
const SEGMENTS: usize = 20;
/// Most objects one shared context can hold at a time.
pub const MAX_OBJECTS: u32 = (SEG_BASE * ((1 << SEGMENTS) - 1)) as u32;

/// Slot state bit: the slot holds an object.
const LIVE: u64 = 1;
/// Slot state bit: the object is poisoned (a panic or a death during a borrow).
const POISONED: u64 = 2;

/// One object's record in the table, in shared memory. All fields are atomics, so any bit pattern a
/// killed process leaves is a valid value; the repair decides what it means.
///
/// | field       | meaning                                                               |
/// |-------------|-----------------------------------------------------------------------|
/// | `state`     | `generation << 32 \| flags` (`LIVE`, `POISONED`); a handle's generation must match |
/// | `ptr`       | address of the object's block in the heap                             |
/// | `tag`       | the object's type tag ([`type_tag`])                                   |
/// | `size`      | `size_of::<T>()`                                                      |
/// | `borrower`  | packed [`ProcessToken`] of the process whose call chain borrows it; 0 = free |
/// | `chain`     | that call chain (a thread tag of that process)                        |
/// | `next_free` | `1 + index` of the next free slot (free slots only); 0 = end          |
///
/// Written only by the holder of the context's lock (orderings: `Relaxed`, the lock's
/// acquire/release orders them between holders).
#[repr(C, align(64))]
struct SlotRec {
    state: AtomicU64,
    ptr: AtomicU64,
    tag: AtomicU64,
    size: AtomicU64,
    borrower: AtomicU64,
    chain: AtomicU64,
    next_free: AtomicU64,
    _reserved: AtomicU64,
}

/// The context's header in the shared heap. All atomics; everything after `lock` is written only
/// by the lock's holder (`Relaxed`), except `magic`, `layout`, `uid` and `name`, written once before
/// the header is published.
#[repr(C)]
struct Header {
    magic: AtomicU64,
    layout: AtomicU64,
    /// Random identity, in every handle and [`SharedContextRef`]; never 0.
    uid: AtomicU64,
    name: [AtomicU64; NAME_BYTES / 8],
    lock: RawSharedLock,
    /// Slots in use: `[0, len)` are in segments that exist.
    len: AtomicU32,
    /// 1 when closed (permanent).
    closed: AtomicU32,
    /// `1 + index` of the first free slot below `len`; 0 = none.
    free_head: AtomicU64,
    /// Live objects.
    live: AtomicU64,
    /// Repairs after a dead holder, and objects reclaimed from dead borrowers.
    recoveries: AtomicU64,
    /// Address of each table segment; 0 = not allocated.
    dir: [AtomicU64; SEGMENTS],
}

/// Segment and index inside it of slot `i`.
fn seg_of(i: u32) -> (usize, usize) {
    let j = u64::from(i) / SEG_BASE + 1;
    let k = (63 - j.leading_zeros()) as usize;
    let first = SEG_BASE * ((1 << k) - 1);
    (k, (u64::from(i) - first) as usize)
}

/// Slots in segment `k`.
fn seg_len(k: usize) -> usize {
    (SEG_BASE as usize) << k
}

fn seg_layout(k: usize) -> Layout {
    // Cannot fail: at most 32 << 19 records of 64 bytes, aligned to 64.
    Layout::from_size_align(seg_len(k) * size_of::<SlotRec>(), align_of::<SlotRec>())
        .unwrap_or(Layout::new::<SlotRec>())
}

/// A number for `T` that is the same in every process of the pool (they all run one executable
/// image) and differs between types: `TypeId` folded with size and alignment. Cheap: the hasher is
/// a few multiplications, which the compiler folds for a known `T`.
fn type_tag<T: 'static>() -> u64 {
    struct Fold(u64);
    impl Hasher for Fold {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = (self.0 ^ n)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(31);
        }
    }
    let mut h = Fold(0xcbf2_9ce4_8422_2325);
    TypeId::of::<T>().hash(&mut h);
    h.write_u64(size_of::<T>() as u64);
    h.write_u64(align_of::<T>() as u64);
    h.finish()
}

/// A fresh identity for a context: unpredictable enough that a handle of one context never matches
/// another (process token, time, address and a counter through splitmix64); never 0.
fn fresh_uid(addr: usize) -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let token = ProcessToken::current().map_or(0, ProcessToken::to_bits);
    let mut z = t
        ^ token.rotate_left(17)
        ^ (addr as u64).rotate_left(41)
        ^ COUNT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.max(1)
}

// ---------------------------------------------------------------------------------------------
// Handles.

/// Where a shared context's header is: what another process of the pool needs to
/// [`SharedContext::open`] it. `Copy` and [`ShareSafe`], so it can travel inside a job's argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SharedContextRef {
    addr: u64,
    uid: u64,
}

// SAFETY: two plain numbers: no process-local pointer (the address is in the shared heap, and is
// validated by `open` before use), no drop glue, every bit pattern valid.
unsafe impl ShareSafe for SharedContextRef {}

impl SharedContextRef {
    /// The reference as two numbers (header address, context identity), for wire formats.
    #[must_use]
    pub fn to_raw(self) -> (u64, u64) {
        (self.addr, self.uid)
    }

    /// Rebuilds a reference from [`SharedContextRef::to_raw`]. Safe: [`SharedContext::open`]
    /// validates it.
    #[must_use]
    pub fn from_raw(addr: u64, uid: u64) -> Self {
        Self { addr, uid }
    }
}

/// An untyped name of an object in a shared context (see [`SharedHandle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct ObjectId {
    context: u64,
    slot: u32,
    generation: u32,
}

// SAFETY: plain numbers, no pointers, no drop glue, every bit pattern valid (a bad one is refused
// when used).
unsafe impl ShareSafe for ObjectId {}

impl ObjectId {
    /// The typed handle (checked against the stored type when used).
    #[must_use]
    pub fn typed<T>(self) -> SharedHandle<T> {
        SharedHandle {
            id: self,
            _type: PhantomData,
        }
    }

    /// The identity of the shared context that owns the object.
    #[must_use]
    pub fn context(self) -> u64 {
        self.context
    }

    /// The id as three numbers (context identity, slot, generation), for wire formats.
    #[must_use]
    pub fn to_raw(self) -> (u64, u32, u32) {
        (self.context, self.slot, self.generation)
    }

    /// Rebuilds an id from [`ObjectId::to_raw`]. Safe: every use checks it.
    #[must_use]
    pub fn from_raw(context: u64, slot: u32, generation: u32) -> Self {
        Self {
            context,
            slot,
            generation,
        }
    }
}

/// A typed name for an object owned by a [`SharedContext`]: context identity, slot and generation.
///
/// `Copy`, valid in every process of the pool, and [`ShareSafe`] (it can be stored in shared memory,
/// in another object of the context for example). It grants nothing by itself: the object is reached
/// only through a [`SharedCx`], the proof that the thread holds the context now.
pub struct SharedHandle<T> {
    id: ObjectId,
    _type: PhantomData<fn() -> T>,
}

// SAFETY: an ObjectId and a zero-sized marker: plain numbers, no drop glue, any bit pattern valid.
unsafe impl<T: 'static> ShareSafe for SharedHandle<T> {}

impl<T> Clone for SharedHandle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedHandle<T> {}
impl<T> PartialEq for SharedHandle<T> {
    fn eq(&self, o: &Self) -> bool {
        self.id == o.id
    }
}
impl<T> Eq for SharedHandle<T> {}
impl<T> Hash for SharedHandle<T> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.id.hash(h);
    }
}
impl<T> fmt::Debug for SharedHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedHandle")
            .field("context", &format_args!("{:#x}", self.id.context))
            .field("slot", &self.id.slot)
            .field("generation", &self.id.generation)
            .finish()
    }
}

impl<T> SharedHandle<T> {
    /// The untyped id.
    #[must_use]
    pub fn id(self) -> ObjectId {
        self.id
    }

    /// The same name with another type. Safe: using it checks the stored type and yields
    /// [`ObjectError::WrongType`] on a mismatch.
    #[must_use]
    pub fn cast<U>(self) -> SharedHandle<U> {
        self.id.typed()
    }
}

impl<T> From<SharedHandle<T>> for ObjectId {
    fn from(h: SharedHandle<T>) -> Self {
        h.id
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Why [`SharedContext::create`] or [`SharedContext::open`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The heap could not hold the header.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The reference does not name a live shared-context header in this heap.
    #[error("no shared context at {addr:#x} in this heap: {why}")]
    NotAContext {
        /// The address given.
        addr: u64,
        /// What did not match.
        why: &'static str,
    },
    /// The context was closed.
    #[error("the shared context was closed")]
    Closed,
    /// Every registration slot of the context's lock belongs to a live process.
    #[error("every registration slot of the shared context's lock belongs to a live process")]
    LockFull,
    /// This process's identity (PID and start time) could not be read.
    #[error("cannot identify this process: {0}")]
    Identity(#[source] std::io::Error),
}

/// Why an object of a shared context could not be reached.
// `repr(u64)`: a word-sized tag, so that a `Result<T, ObjectError>` (what every `SharedCx` access
// returns, and what an `enter` closure typically returns) is laid out in whole words. With the
// default 4-byte tag, `InUse { pid: u32 }` puts data in bytes 4..8 and every copy of such a result
// moves bytes 0..4 and 4..8 as separate 4-byte stores, which the next 8- or 16-byte load cannot
// forward from (a store-forwarding stall on the hot path after each entry: measured 25.6 -> 19.2
// ns per idle entry in `ctx bench xproc`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[repr(u64)]
pub enum ObjectError {
    /// The [`SharedCx`] is suspended (a nested call into another context is running) or the thread
    /// lost the context.
    #[error("the shared context is not held by this thread right now")]
    NotHeld,
    /// The context was closed (by another process, while this one was suspended).
    #[error("the shared context was closed")]
    Closed,
    /// The handle belongs to another shared context.
    #[error("handle belongs to shared context {handle:#x}, used in {context:#x}")]
    WrongContext {
        /// The context the handle names.
        handle: u64,
        /// The context it was used in.
        context: u64,
    },
    /// The object was freed (or its slot reused), or the handle never named one.
    #[error("stale handle: no such object in the shared context")]
    Stale,
    /// The object is not of the handle's type.
    #[error("the object is not a {expected}")]
    WrongType {
        /// The type the handle asked for.
        expected: &'static str,
    },
    /// The object is borrowed further up this call chain (a re-entrant call): fails at once.
    #[error("the object is in use further up this call chain (re-entrant call)")]
    Busy,
    /// The object is borrowed by another call chain (this or another process) that has called out of
    /// the context. Leave the context, wait, retry.
    #[error("the object is in use by another call (process {pid}); retry later")]
    InUse {
        /// The borrowing process.
        pid: u32,
    },
    /// A panic happened while the object was borrowed, or its borrower died: its state may be
    /// half-updated. [`SharedCx::clear_poison`] accepts it again; [`SharedCx::free`] frees it.
    #[error("the object is poisoned (a panic or a dead process during a borrow)")]
    Poisoned,
    /// The context holds [`MAX_OBJECTS`] objects.
    #[error("the shared context is full")]
    Full,
    /// The shared heap refused.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// Allocating or freeing through a handle this process inherited by `fork`: it would use the
    /// parent's allocator slot. Open the context with this process's own heap handle.
    #[error(
        "this SharedContext handle was inherited from another process; open the context with this process's heap to allocate or free"
    )]
    InheritedHandle,
    /// A record in shared memory fails validation (memory written outside this module).
    #[error("the shared context's table is corrupt: {0}")]
    Corrupt(&'static str),
    /// This process's identity (PID and start time) could not be read.
    #[error("cannot identify this process: {0}")]
    Identity(String),
}

/// Why [`SharedContext::close`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseError {
    /// Entering the context failed.
    #[error(transparent)]
    Enter(#[from] EnterError),
    /// An object is borrowed (by a live call chain).
    #[error(transparent)]
    Object(#[from] ObjectError),
}

/// What the repairs during one entry found (see [`SharedCx::recovery`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Repairs after a holder of the lock died (normally 0 or 1; more if holders died during
    /// nested calls of this entry).
    pub repairs: u32,
    /// Objects poisoned because their borrower was dead (a holder, or a process that died
    /// suspended with the object borrowed).
    pub poisoned: Vec<ObjectId>,
    /// Slots whose record failed validation and were dropped (their blocks leak); 0 unless shared
    /// memory was written outside this module.
    pub lost: u64,
}

// ---------------------------------------------------------------------------------------------
// The lock.

/// A registration of this process with the lock: the fork generation and process token it was made
/// in, and the slot.
struct Registration {
    generation: u32,
    token: u64,
    slot: Slot,
}

/// The [`RawContextLock`] of a shared context: a process's handle on the [`RawSharedLock`] in the
/// context's header. It registers the process with the lock when it is made, and again in a child
/// after `fork` (the registration is cached with the fork generation it was made in).
pub struct PoolLock {
    /// INVARIANTS: points at the `lock` field of a validated header in `heap`, which is never freed
    /// while the heap is mapped, and `heap` keeps the mapping alive.
    raw: NonNull<RawSharedLock>,
    _heap: Heap,
    /// The latest registration (for the current process if its generation is the current fork
    /// generation). INVARIANT: never null (`PoolLock::new` registers), and points into an `Arc`
    /// kept in `regs`, so it stays valid until `self` is dropped.
    reg: AtomicPtr<Registration>,
    regs: Mutex<Vec<Arc<Registration>>>,
}

// SAFETY: the pointee of `raw` is all atomics (Sync) kept mapped by `_heap` (Send + Sync); `reg`
// points into an `Arc` owned by `regs` (a Mutex), whose pointee is immutable after creation.
unsafe impl Send for PoolLock {}
// SAFETY: as for Send: every access through `raw` is atomic, `Registration`s are immutable.
unsafe impl Sync for PoolLock {}

impl fmt::Debug for PoolLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolLock")
            .field("raw", self.raw())
            .finish_non_exhaustive()
    }
}

impl PoolLock {
    fn raw(&self) -> &RawSharedLock {
        // SAFETY: by the INVARIANTS on `raw` the pointee is a live, mapped RawSharedLock; it is all
        // atomics, so a shared reference is sound while other processes operate on it.
        unsafe { self.raw.as_ref() }
    }

    /// The latest registration and whether it was made in this process (its generation is the
    /// current fork generation): one load and a compare. (A pair rather than an
    /// `Option<&Registration>`, whose test would be a null check of a pointer known non-null.)
    #[inline(always)]
    fn cached(&self) -> (&Registration, bool) {
        // `attach` checked `fork_hook_installed` before this lock was made, so the hook's
        // installation is complete here.
        let generation = context_shmem::process::fork_generation_installed();
        let p = self.reg.load(Ordering::Acquire);
        // SAFETY: by the INVARIANT on `reg`, `p` is non-null and points into an Arc held by
        // `self.regs` until `self` drops; a `Registration` is immutable.
        let r = unsafe { &*p };
        (r, r.generation == generation)
    }

    /// This process's token and slot.
    #[inline(always)]
    fn me(&self) -> Result<(u64, Slot), LockError> {
        match self.cached() {
            (r, true) => Ok((r.token, r.slot)),
            (_, false) => self.me_slow(),
        }
    }

    /// [`PoolLock::me`] without a registration for this process (its first use, or the first in a
    /// forked child): registers it.
    #[cold]
    #[inline(never)]
    fn me_slow(&self) -> Result<(u64, Slot), LockError> {
        // Without a token or a slot this process cannot take the lock; the trait has no better
        // variant than TimedOut (documented on `SharedContext::enter`).
        let token = ProcessToken::current()
            .map_err(|_| LockError::TimedOut)?
            .to_bits();
        self.register(context_shmem::process::fork_generation(), token)
            .map(|s| (token, s))
    }

    /// This process's slot (only the slot is loaded from the cached registration).
    #[inline(always)]
    fn slot(&self) -> Result<Slot, LockError> {
        match self.cached() {
            (r, true) => Ok(r.slot),
            (_, false) => self.me_slow().map(|(_, s)| s),
        }
    }

    /// A handle on `raw` (the `lock` of a validated header of `heap`), registering this process.
    fn new(raw: &RawSharedLock, heap: &Heap, generation: u32, token: u64) -> Option<Self> {
        let slot = raw.register(token, &ProcLiveness).ok()?;
        let r = Arc::new(Registration {
            generation,
            token,
            slot,
        });
        Some(Self {
            raw: NonNull::from(raw),
            _heap: heap.clone(),
            reg: AtomicPtr::new(Arc::as_ptr(&r).cast_mut()),
            regs: Mutex::new(vec![r]),
        })
    }

    #[cold]
    fn register(&self, generation: u32, token: u64) -> Result<Slot, LockError> {
        let slot = self
            .raw()
            .register(token, &ProcLiveness)
            .map_err(|_| LockError::TimedOut)?;
        let r = Arc::new(Registration {
            generation,
            token,
            slot,
        });
        let p = Arc::as_ptr(&r).cast_mut();
        // A poisoned mutex only means another thread panicked while pushing: the Vec is intact.
        let mut regs = self
            .regs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        regs.push(r);
        self.reg.store(p, Ordering::Release);
        Ok(slot)
    }
}

// SAFETY: every method delegates to the RawSharedLock, whose state machine upholds the contract
// (see context-shmem's `SharedLock`, which makes the same delegation, and its loom models):
// - mutual exclusion: acquisitions are CASes of the state word into HELD(slot);
// - ordering: the acquiring CAS and the releasing store are SeqCst;
// - no lost wake-ups: the lock's own protocol, with sleeps bounded by its liveness interval;
// - `Err` means not held: a failed registration returns before touching the state.
// If this process cannot register (more than MAX_PROCS live processes use the lock, or /proc is
// missing), `try_lock` reports WouldBlock and `lock` TimedOut.
unsafe impl RawContextLock for PoolLock {
    // Always inlined, as the acquire of an idle shared context is this call plus core's frame.
    #[inline(always)]
    fn try_lock(&self) -> Result<Acquired, LockError> {
        let me = self.slot().map_err(|_| LockError::WouldBlock)?;
        self.raw().try_lock(me)
    }

    #[inline]
    fn lock(&self, deadline: Option<Instant>) -> Result<Acquired, LockError> {
        let me = self.slot()?;
        self.raw().lock(me, deadline, &ProcLiveness)
    }

    #[inline(always)]
    unsafe fn unlock(&self) {
        // SAFETY: forwarded contract: the caller holds the lock, taken with this process's slot.
        unsafe { self.raw().unlock() }
    }

    fn is_locked(&self) -> bool {
        self.raw().is_locked()
    }

    unsafe fn mark_consistent(&self) {
        // SAFETY: forwarded contract: the caller holds the lock.
        unsafe { self.raw().mark_consistent() }
    }
}

// ---------------------------------------------------------------------------------------------
// The process-local handle.

struct Local {
    ctx: context_core::Context<PoolLock>,
    /// INVARIANTS: a header validated by `create`/`open` (live block of `heap`, big enough, aligned,
    /// magic and layout checked); headers are never freed while the heap is mapped, and `heap`
    /// keeps the mapping alive.
    hdr: NonNull<Header>,
    uid: u64,
    heap: Heap,
    /// The process this handle was made in (allocation uses that process's allocator slot).
    maker: u64,
    /// The heap's span (start, length): object pointers must fall inside.
    /// INVARIANT: `1 <= start` (the heap's base is non-null) and `start + length < usize::MAX`.
    span: (usize, usize),
    /// This process's cache of validated segment addresses (0 = not yet validated).
    /// INVARIANT: a non-zero entry is the address of a live block of `heap` holding `seg_len(k)`
    /// records, which stays allocated until the context is closed.
    segs: [AtomicU64; SEGMENTS],
    /// The same cache, biased for [`Local::cached_slot`]: `1 + segs[k] - first(k) * 64` (wrapping),
    /// with `first(k)` the index of segment `k`'s first slot, so that slot `i` of the segment has
    /// its record at `slot_base[k] - 1 + i * 64` (one shift and one add); 0 = not yet validated (a
    /// set entry is odd, as segment blocks are 64-aligned). INVARIANT: non-zero only after
    /// `segs[k]` was set, and then derived from it.
    slot_base: [AtomicU64; SEGMENTS],
}

// SAFETY: `hdr` points at atomics only (Sync), kept mapped by `heap`; everything else is Send +
// Sync. Access to the table is serialized by the context's lock.
unsafe impl Send for Local {}
// SAFETY: as for Send.
unsafe impl Sync for Local {}

impl Local {
    #[inline]
    fn hdr(&self) -> &Header {
        // SAFETY: by the INVARIANTS on `hdr` it points at a live, mapped, initialized header, made of
        // atomics only, so a shared reference is sound while other processes use it.
        unsafe { self.hdr.as_ref() }
    }

    /// The segment `k`'s records, validated against the allocator once per process.
    #[inline]
    fn segment(&self, k: usize) -> Option<NonNull<SlotRec>> {
        let cached = self.segs[k].load(Ordering::Relaxed);
        if cached != 0 {
            return NonNull::new(cached as *mut SlotRec);
        }
        self.validate_segment(k)
    }

    #[cold]
    fn validate_segment(&self, k: usize) -> Option<NonNull<SlotRec>> {
        let addr = self.hdr().dir[k].load(Ordering::Relaxed);
        let p = NonNull::new(addr as *mut u8)?;
        let layout = seg_layout(k);
        if addr as usize % layout.align() != 0 {
            return None;
        }
        match self.heap.usable_size(p) {
            Ok(n) if n >= layout.size() => {
                self.segs[k].store(addr, Ordering::Relaxed);
                let first = (SEG_BASE * ((1 << k) - 1)) * size_of::<SlotRec>() as u64;
                self.slot_base[k].store(addr.wrapping_sub(first) | 1, Ordering::Relaxed);
                Some(p.cast())
            }
            _ => None,
        }
    }

    /// `f` of the record of slot `i` if its segment is in this process's cache of validated
    /// segments (`None` otherwise: [`Local::slot`] then validates it). No call, for the fast paths.
    /// (`f` gets the record directly: an `Option<&SlotRec>` of a computed address would be tested
    /// for null.)
    #[inline(always)]
    fn cached_slot<'l, R>(&'l self, i: u32, f: impl FnOnce(&'l SlotRec) -> Option<R>) -> Option<R> {
        if i >= MAX_OBJECTS {
            return None;
        }
        let (k, _) = seg_of(i);
        let biased = self.slot_base.get(k)?.load(Ordering::Relaxed);
        if biased == 0 {
            return None;
        }
        // `segs[k] + (i - first(k)) * 64`: the record of slot `i` in segment `k` (see `seg_of`).
        let addr = (biased - 1).wrapping_add(u64::from(i) * size_of::<SlotRec>() as u64);
        // SAFETY: as in `slot`: a non-zero `slot_base[k]` was derived from `segs[k]`, a validated
        // live block of `seg_len(k)` records (INVARIANTs on `slot_base` and `segs`), and `addr` is
        // its record `i - first(k) < seg_len(k)` (by `seg_of`); records are atomics, and callers
        // check `closed` under the lock first (segments are freed only by `close`).
        f(unsafe { &*(addr as usize as *const SlotRec) })
    }

    /// The record of slot `i` (`None` if its segment does not exist).
    #[inline]
    fn slot(&self, i: u32) -> Option<&SlotRec> {
        if i >= MAX_OBJECTS {
            return None;
        }
        let (k, off) = seg_of(i);
        let base = self.segment(k)?;
        // SAFETY: `base` is a validated live block of `seg_len(k)` records (INVARIANT on `segs`),
        // aligned for SlotRec, and `off < seg_len(k)` by `seg_of`; records are all atomics, so a
        // shared reference is sound while other processes use them. The block is freed only by
        // `close`, after which no access gets here (every path checks `closed` under the lock
        // first, and a closed context never reopens).
        let rec = base.as_ptr().wrapping_add(off);
        // SAFETY: as above.
        Some(unsafe { &*rec })
    }
}

/// A process's handle on a shared context: cheap to clone (`Arc` inside), `Send + Sync`. See the
/// [module docs](self).
#[derive(Clone)]
pub struct SharedContext {
    local: Arc<Local>,
}

impl fmt::Debug for SharedContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedContext")
            .field("name", &self.name())
            .field("uid", &format_args!("{:#x}", self.local.uid))
            .field("header", &self.local.hdr)
            .finish()
    }
}

/// The outcome of a [`SharedContext`] entry as the caller sees it, from the core's outcome `r` and
/// the closure's result slot `out` ([`Local::run_into`]): the result, or why the closure did not
/// run. A macro rather than a function: passing `out` by value made LLVM copy it through three
/// stack slots.
macro_rules! finish {
    ($scx:expr, $r:expr, $out:expr) => {
        match $r {
            Ok(()) => match $out {
                Some(r) => Ok(r),
                None => Err($scx.closed()),
            },
            Err(e) => Err(e),
        }
    };
}

impl SharedContext {
    /// Creates a shared context in `heap` (any process of the pool may do it) and returns this
    /// process's handle. Other processes open it from [`SharedContext::share`]. `name` is kept (up
    /// to 48 bytes) for diagnostics.
    ///
    /// # Errors
    /// [`OpenError::Alloc`] if the heap cannot hold the header; [`OpenError::Identity`] or
    /// [`OpenError::LockFull`] if this process cannot register with the new lock.
    pub fn create(heap: &Heap, name: &str) -> Result<Self, OpenError> {
        let token = ProcessToken::current().map_err(OpenError::Identity)?;
        let block = heap.alloc(Layout::new::<Header>())?.cast::<Header>();
        let uid = fresh_uid(block.as_ptr() as usize);
        let mut name_words = [0u64; NAME_BYTES / 8];
        for (i, b) in name.bytes().take(NAME_BYTES).enumerate() {
            name_words[i / 8] |= u64::from(b) << (8 * (i % 8));
        }
        let header = Header {
            magic: AtomicU64::new(0),
            layout: AtomicU64::new(LAYOUT),
            uid: AtomicU64::new(uid),
            name: name_words.map(AtomicU64::new),
            lock: RawSharedLock::new(),
            len: AtomicU32::new(0),
            closed: AtomicU32::new(0),
            free_head: AtomicU64::new(0),
            live: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            dir: std::array::from_fn(|_| AtomicU64::new(0)),
        };
        // SAFETY: `block` is a fresh block of the heap, sized and aligned for a Header (allocated
        // with its layout), and no other process knows its address yet.
        unsafe { block.as_ptr().write(header) };
        // SAFETY: just written; the reference is to atomics only.
        let h = unsafe { block.as_ref() };
        // Release: a process that sees the magic sees the initialized header.
        h.magic.store(MAGIC, Ordering::Release);
        Self::attach(heap, block, uid, token.to_bits())
    }

    /// Opens a shared context another process of the pool created, from the reference it shared
    /// ([`SharedContext::share`]). `heap` is this process's handle on the pool's heap (in a worker,
    /// [`crate::JobContext::heap`]).
    ///
    /// # Errors
    /// [`OpenError::NotAContext`] if `at` does not name a live header of a shared context in `heap`
    /// (outside the heap, not a live block, wrong magic, layout or identity); [`OpenError::Closed`];
    /// [`OpenError::Identity`]; [`OpenError::LockFull`].
    pub fn open(heap: &Heap, at: SharedContextRef) -> Result<Self, OpenError> {
        let token = ProcessToken::current().map_err(OpenError::Identity)?;
        let bad = |why| OpenError::NotAContext { addr: at.addr, why };
        let addr = usize::try_from(at.addr).map_err(|_| bad("address out of range"))?;
        if addr % align_of::<Header>() != 0 {
            return Err(bad("misaligned"));
        }
        let p = NonNull::new(addr as *mut u8).ok_or_else(|| bad("null"))?;
        if !heap.contains(p.as_ptr()) {
            return Err(bad("outside the heap"));
        }
        match heap.usable_size(p) {
            Ok(n) if n >= size_of::<Header>() => {}
            Ok(_) => return Err(bad("block too small")),
            Err(_) => return Err(bad("not a live block")),
        }
        let block = p.cast::<Header>();
        // SAFETY: a live block of the heap (checked just above) of at least a Header's size, aligned
        // for it; every field is an atomic, so any content is a valid value and reading it races
        // with nobody non-atomically.
        let h = unsafe { block.as_ref() };
        if h.magic.load(Ordering::Acquire) != MAGIC {
            return Err(bad("no shared-context magic"));
        }
        if h.layout.load(Ordering::Relaxed) != LAYOUT {
            return Err(bad("header of another layout"));
        }
        if h.uid.load(Ordering::Relaxed) != at.uid || at.uid == 0 {
            return Err(bad("another context's identity"));
        }
        if !h.lock.is_initialized() {
            return Err(bad("lock not initialized"));
        }
        if h.closed.load(Ordering::Relaxed) != 0 {
            return Err(OpenError::Closed);
        }
        Self::attach(heap, block, at.uid, token.to_bits())
    }

    fn attach(heap: &Heap, hdr: NonNull<Header>, uid: u64, token: u64) -> Result<Self, OpenError> {
        if !context_shmem::process::fork_hook_installed() {
            return Err(OpenError::Identity(std::io::Error::other(
                "pthread_atfork failed: cannot tell a forked child from its parent",
            )));
        }
        // SAFETY: validated by the caller (created or checked live header of `heap`), all atomics.
        let h = unsafe { hdr.as_ref() };
        let mut bytes = Vec::with_capacity(NAME_BYTES);
        for w in &h.name {
            bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let name = String::from_utf8_lossy(&bytes[..end]).into_owned();
        // Registers now, so that a full lock is an error here rather than a timeout at entry.
        let lock = PoolLock::new(
            &h.lock,
            heap,
            context_shmem::process::fork_generation(),
            token,
        )
        .ok_or(OpenError::LockFull)?;
        // The start is the heap's (non-null) base; the length is clamped so that the span ends
        // before the last address (which no object can reach anyway): the INVARIANT on `span`.
        let (lo, len) = heap.span();
        let span = (lo, len.min(usize::MAX.saturating_sub(lo).saturating_sub(1)));
        Ok(Self {
            local: Arc::new(Local {
                ctx: context_core::Context::with_lock(&name, lock),
                hdr,
                uid,
                heap: heap.clone(),
                maker: token,
                span,
                segs: std::array::from_fn(|_| AtomicU64::new(0)),
                slot_base: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        })
    }

    /// The reference other processes of the pool open this context with.
    #[must_use]
    pub fn share(&self) -> SharedContextRef {
        SharedContextRef {
            addr: self.local.hdr.as_ptr() as u64,
            uid: self.local.uid,
        }
    }

    /// The context's identity (the same in every process; handles carry it).
    #[must_use]
    pub fn uid(&self) -> u64 {
        self.local.uid
    }

    /// The name given at creation (cut to 48 bytes).
    #[must_use]
    pub fn name(&self) -> &str {
        self.local.ctx.name()
    }

    /// The id of this process's core context for it (its place in this process's lock order).
    #[must_use]
    pub fn id(&self) -> ContextId {
        self.local.ctx.id()
    }

    /// This process's entry counters (core [`ContextStats`]).
    #[must_use]
    pub fn stats(&self) -> ContextStats {
        self.local.ctx.stats()
    }

    /// Whether some process holds the context right now (a snapshot).
    #[must_use]
    pub fn is_locked(&self) -> bool {
        self.local.hdr().lock.is_locked()
    }

    /// Whether the context was closed (by any process; a snapshot).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.local.hdr().closed.load(Ordering::Relaxed) != 0
    }

    /// How many times a dead holder's state was repaired or an object reclaimed from a dead borrower,
    /// over the context's life (a snapshot).
    #[must_use]
    pub fn recoveries(&self) -> u64 {
        self.local.hdr().recoveries.load(Ordering::Relaxed)
    }

    /// Enters the context and runs `f` inside it, waiting for its turn if it is busy: exactly
    /// [`context_core::Context::enter`], over the shared lock. The calling thread's own context (a
    /// local one, say) is released for the duration and re-entered afterwards. If the previous holder
    /// died holding the lock, the context is repaired before `f` runs ([`SharedCx::recovery`]).
    ///
    /// # Errors
    /// [`EnterError::Closed`] for a closed context; [`EnterError::Panicked`] if `f` panicked (the
    /// object it was borrowing is poisoned; the context stays usable); [`EnterError::NotRecoverable`]
    /// if a holder died and its state was released unrepaired (only when the lock is used outside
    /// this module); [`EnterError::TimedOut`] at once if this process cannot register with the lock
    /// (more than `MAX_PROCS` live processes use it, or `/proc` is unreadable);
    /// [`EnterError::CallerLost`] as for the core.
    #[inline]
    pub fn enter<R, F>(&self, f: F) -> Result<R, EnterError>
    where
        F: FnOnce(&mut SharedCx<'_, '_>) -> R + Send,
        R: Send,
    {
        let local = &*self.local;
        let mut out = None;
        let slot = &mut out;
        let r = local.ctx.enter(move |cx| local.run_into(cx, f, slot));
        finish!(self, r, out)
    }

    /// Like [`SharedContext::enter`] but gives up at once if the context is busy.
    ///
    /// # Errors
    /// [`EnterError::WouldBlock`], and everything [`SharedContext::enter`] returns.
    pub fn try_enter<R, F>(&self, f: F) -> Result<R, EnterError>
    where
        F: FnOnce(&mut SharedCx<'_, '_>) -> R + Send,
        R: Send,
    {
        let local = &*self.local;
        let mut out = None;
        let slot = &mut out;
        let r = local.ctx.try_enter(move |cx| local.run_into(cx, f, slot));
        finish!(self, r, out)
    }

    /// Like [`SharedContext::enter`] but gives up if the caller's turn has not come within
    /// `timeout`.
    ///
    /// # Errors
    /// [`EnterError::TimedOut`], and everything [`SharedContext::enter`] returns.
    pub fn enter_timeout<R, F>(&self, timeout: Duration, f: F) -> Result<R, EnterError>
    where
        F: FnOnce(&mut SharedCx<'_, '_>) -> R + Send,
        R: Send,
    {
        let local = &*self.local;
        let mut out = None;
        let slot = &mut out;
        let r = local
            .ctx
            .enter_timeout(timeout, move |cx| local.run_into(cx, f, slot));
        finish!(self, r, out)
    }

    /// Like [`SharedContext::enter`], without requiring `Send` of the closure or its result (a
    /// shared context always runs the closure on the calling thread).
    ///
    /// # Errors
    /// As [`SharedContext::enter`].
    pub fn enter_local<R>(
        &self,
        f: impl FnOnce(&mut SharedCx<'_, '_>) -> R,
    ) -> Result<R, EnterError> {
        let local = &*self.local;
        let mut out = None;
        let slot = &mut out;
        let r = local.ctx.enter_local(move |cx| local.run_into(cx, f, slot));
        finish!(self, r, out)
    }

    /// Closed by some process: closes the local face too, so later entries fail at once.
    #[cold]
    #[inline(never)]
    fn closed(&self) -> EnterError {
        let _ = self.local.ctx.close();
        EnterError::Closed(self.local.ctx.id())
    }

    /// Closes the context for every process: frees every object and the table, and makes every
    /// later entry fail with [`EnterError::Closed`] (and [`SharedContext::open`] with
    /// [`OpenError::Closed`]). Objects borrowed by dead processes are reclaimed first. Closing a
    /// closed context does nothing.
    ///
    /// # Errors
    /// [`CloseError::Object`] with [`ObjectError::InUse`] or [`ObjectError::Busy`] while a live
    /// call chain borrows an object; [`ObjectError::InheritedHandle`] on a handle inherited by fork;
    /// [`CloseError::Enter`] if the context cannot be entered.
    pub fn close(&self) -> Result<(), CloseError> {
        match self.enter_local(|s| s.close_held()) {
            Ok(r) => r?,
            Err(EnterError::Closed(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let _ = self.local.ctx.close();
        Ok(())
    }
}

impl Local {
    /// Runs `f` inside the context (the lock is held): repairs first if the last holder died;
    /// `None` if the context is closed.
    #[inline]
    fn run<'a, 'c, R>(
        &'a self,
        cx: &'a mut Cx<'c>,
        f: impl FnOnce(&mut SharedCx<'a, 'c>) -> R,
    ) -> Option<R> {
        let mut s = SharedCx {
            cx: NonNull::from(cx),
            _cx: PhantomData,
            local: self,
            recovery: RefCell::new(None),
        };
        s.sync();
        if self.hdr().closed.load(Ordering::Relaxed) != 0 {
            return None;
        }
        Some(f(&mut s))
    }

    /// [`Local::run`] with its result written to `slot` (which is `None` before), so that the
    /// entry's closure returns nothing and its caller reads the result once, in place, instead of
    /// moving it through the core's `Result`s. The old `None` is forgotten rather than dropped
    /// (nothing to drop), so no drop check is compiled in.
    #[inline]
    fn run_into<'a, 'c, R>(
        &'a self,
        cx: &'a mut Cx<'c>,
        f: impl FnOnce(&mut SharedCx<'a, 'c>) -> R,
        slot: &mut Option<R>,
    ) {
        std::mem::forget(std::mem::replace(slot, self.run(cx, f)));
    }
}

// ---------------------------------------------------------------------------------------------
// Inside the context.

/// Proof that the calling thread holds a shared context, and the way to its objects: the shared
/// counterpart of [`context_core::Cx`]. Exists only inside [`SharedContext::enter`] (and friends),
/// is not `Send`, and every access re-checks that the thread holds the context now.
///
/// ```compile_fail,E0277
/// fn assert_send<T: Send>() {}
/// assert_send::<context_forkpool::SharedCx<'static, 'static>>();
/// ```
pub struct SharedCx<'a, 'c> {
    /// INVARIANTS: made from the `&'a mut Cx<'c>` the core handed to `Local::run`, and this
    /// `SharedCx` is its only user for `'a` (it is neither `Send` nor `Sync`, and the original
    /// reference is not used while it lives). Shared references made from it (`cx()`) end within the
    /// method that made them, and the one exclusive reference (`repair`) is made while none is live.
    cx: NonNull<Cx<'c>>,
    _cx: PhantomData<&'a mut Cx<'c>>,
    local: &'a Local,
    recovery: RefCell<Option<Recovery>>,
}

impl fmt::Debug for SharedCx<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCx")
            .field("name", &self.local.ctx.name())
            .field("uid", &format_args!("{:#x}", self.local.uid))
            .finish_non_exhaustive()
    }
}

impl Drop for SharedCx<'_, '_> {
    #[inline]
    fn drop(&mut self) {
        // A holder may have died while a nested call had this context suspended: repair before the
        // lock is released (unrepaired, the lock would become unrecoverable for everyone).
        self.sync();
    }
}

/// Whether a slot's state word carries the last generation: such a slot is never reused.
fn generation_spent(state: u64) -> bool {
    (state >> 32) as u32 == u32::MAX
}

/// Ends a borrow started by [`SharedCx::with`] (also when the closure panics: then it poisons).
struct EndBorrow<'s, 'a, 'c> {
    s: &'s SharedCx<'a, 'c>,
    rec: &'s SlotRec,
    /// A panic was already unwinding when the borrow began (`with` called from a destructor): only
    /// a panic that starts inside the borrow poisons, as for `std::sync::Mutex`.
    was_panicking: bool,
}

impl Drop for EndBorrow<'_, '_, '_> {
    fn drop(&mut self) {
        // If the thread lost the context (`CallerLost`), the borrow cannot be cleared safely; the
        // object then stays borrowed by this live process (`InUse` for others), which is safe.
        if !self.s.is_held() {
            return;
        }
        self.s.sync();
        if std::thread::panicking() && !self.was_panicking {
            self.rec.state.fetch_or(POISONED, Ordering::Relaxed);
        }
        self.rec.chain.store(0, Ordering::Relaxed);
        self.rec.borrower.store(0, Ordering::Relaxed);
    }
}

impl<'a, 'c> SharedCx<'a, 'c> {
    /// Whether this thread holds the context through this `SharedCx` right now (false while a nested
    /// call into another context has suspended it).
    #[inline]
    #[must_use]
    pub fn is_held(&self) -> bool {
        self.cx().is_held()
    }

    /// The context's identity (as in its handles).
    #[must_use]
    pub fn uid(&self) -> u64 {
        self.local.uid
    }

    /// This process's handle on the pool's heap (to allocate what an object points to, e.g. the
    /// nodes of a [`crate::ListHead`] it holds).
    #[must_use]
    pub fn heap(&self) -> &Heap {
        &self.local.heap
    }

    /// Whether a repair happened during this entry (a holder died, or an object was reclaimed from
    /// a dead borrower).
    #[must_use]
    pub fn recovered(&self) -> bool {
        self.recovery.borrow().is_some()
    }

    /// What the repairs during this entry found, if any happened.
    #[must_use]
    pub fn recovery(&self) -> Option<Recovery> {
        self.recovery.borrow().clone()
    }

    fn hdr(&self) -> &Header {
        self.local.hdr()
    }

    #[inline]
    fn cx(&self) -> &Cx<'c> {
        // SAFETY: by the INVARIANTS on `cx` the pointee lives for `'a` and no exclusive reference
        // to it is live now (the only one is made and dropped inside `repair`, which never calls
        // back into here while it lives).
        unsafe { self.cx.as_ref() }
    }

    /// This process's token (from the lock's registration cache: the lock is held, so this
    /// process is registered in this fork generation).
    #[inline]
    fn me(&self) -> Result<u64, ObjectError> {
        self.local.ctx.lock().me().map(|(t, _)| t).map_err(|_| {
            ObjectError::Identity("this process cannot register with the context's lock".into())
        })
    }

    /// Repairs if the lock came from a holder that died (at entry, or on return from a nested call).
    #[inline]
    fn sync(&self) {
        if self.cx().needs_repair() {
            self.repair();
        }
    }

    #[cold]
    fn repair(&self) {
        let me = ProcessToken::current().map_or(0, ProcessToken::to_bits);
        let mut rec = self.recovery.borrow_mut();
        let r = rec.get_or_insert_with(Recovery::default);
        r.repairs += 1;
        let h = self.hdr();
        if h.closed.load(Ordering::Relaxed) == 0 {
            self.rebuild(me, r);
        }
        h.recoveries.fetch_add(1, Ordering::Relaxed);
        drop(rec);
        // Held (checked by `sync`), so this cannot fail; if it did, the lock would report the
        // state unrecoverable on release, which is the safe outcome.
        // SAFETY: by the INVARIANTS on `cx`, no other reference to the `Cx` is live during this
        // call (`repair` is reached from `sync`, whose shared reference has ended), and this one
        // ends with the statement.
        let cx = unsafe { &mut *self.cx.as_ptr() };
        let _ = cx.mark_consistent();
    }

    /// Rebuilds the table's derived state from the slots (free list, counts), drops records that
    /// fail validation, and poisons objects whose borrower is dead. Idempotent: a repairer killed
    /// half-way leaves work the next repairer redoes.
    fn rebuild(&self, me: u64, r: &mut Recovery) {
        let h = self.hdr();
        let local = self.local;
        let mut len = h.len.load(Ordering::Relaxed).min(MAX_OBJECTS);
        // Every slot below `len` must be in a segment that exists.
        let (mut k, mut start) = (0usize, 0u32);
        while start < len {
            if local.segment(k).is_none() {
                len = start;
                break;
            }
            start = start.saturating_add(seg_len(k) as u32);
            k += 1;
        }
        h.len.store(len, Ordering::Relaxed);
        let (mut free_head, mut live) = (0u64, 0u64);
        for i in (0..len).rev() {
            let Some(rec) = local.slot(i) else { continue };
            let s = rec.state.load(Ordering::Relaxed);
            if s & LIVE != 0 {
                let ptr = rec.ptr.load(Ordering::Relaxed);
                let size = rec.size.load(Ordering::Relaxed).max(1);
                let valid = NonNull::new(ptr as *mut u8).is_some_and(|p| {
                    self.local
                        .heap
                        .usable_size(p)
                        .is_ok_and(|n| n as u64 >= size)
                });
                if !valid {
                    // Not a live block of the right size: drop the record (the block, if any,
                    // leaks; freeing an unknown address could free someone else's block).
                    rec.state.store(s & !(LIVE | POISONED), Ordering::Relaxed);
                    rec.borrower.store(0, Ordering::Relaxed);
                    r.lost += 1;
                } else {
                    let b = rec.borrower.load(Ordering::Relaxed);
                    if b != 0 && b != me && !ProcLiveness.is_alive(b) {
                        rec.state.store(s | POISONED, Ordering::Relaxed);
                        rec.chain.store(0, Ordering::Relaxed);
                        rec.borrower.store(0, Ordering::Relaxed);
                        r.poisoned.push(ObjectId {
                            context: local.uid,
                            slot: i,
                            generation: (s >> 32) as u32,
                        });
                    }
                    live += 1;
                    continue;
                }
            }
            if generation_spent(rec.state.load(Ordering::Relaxed)) {
                continue; // retired (see `free_slot`)
            }
            rec.next_free.store(free_head, Ordering::Relaxed);
            free_head = u64::from(i) + 1;
        }
        h.free_head.store(free_head, Ordering::Relaxed);
        h.live.store(live, Ordering::Relaxed);
    }

    /// Checks that this thread holds the context now and that it is open, repairing first if a
    /// holder died meanwhile.
    #[inline]
    fn check(&self) -> Result<(), ObjectError> {
        if !self.is_held() {
            return Err(ObjectError::NotHeld);
        }
        self.sync();
        if self.hdr().closed.load(Ordering::Relaxed) != 0 {
            return Err(ObjectError::Closed);
        }
        Ok(())
    }

    /// The record of a live object named by `id`, and its state word.
    #[inline]
    fn lookup(&self, id: ObjectId) -> Result<(&'a SlotRec, u64), ObjectError> {
        if id.context != self.local.uid {
            return Err(ObjectError::WrongContext {
                handle: id.context,
                context: self.local.uid,
            });
        }
        if id.slot >= self.hdr().len.load(Ordering::Relaxed) {
            return Err(ObjectError::Stale);
        }
        let Some(rec) = self.local.slot(id.slot) else {
            return Err(ObjectError::Stale);
        };
        let s = rec.state.load(Ordering::Relaxed);
        if s & LIVE == 0 || (s >> 32) as u32 != id.generation {
            return Err(ObjectError::Stale);
        }
        Ok((rec, s))
    }

    #[inline]
    fn lookup_typed<T: 'static>(
        &self,
        h: SharedHandle<T>,
    ) -> Result<(&'a SlotRec, u64), ObjectError> {
        let (rec, s) = self.lookup(h.id)?;
        if rec.tag.load(Ordering::Relaxed) != type_tag::<T>() {
            return Err(ObjectError::WrongType {
                expected: std::any::type_name::<T>(),
            });
        }
        Ok((rec, s))
    }

    /// The fast form of [`SharedCx::check`] plus [`SharedCx::lookup_typed`] plus
    /// [`SharedCx::object_ptr`], for the hot paths: `Some` only if every check of those passes with
    /// nothing to report or repair, i.e. this thread holds the context now (`held`), no holder died
    /// unrepaired (`owner_died` clear, so `sync` would do nothing), the context is open, and `h`
    /// names a live, **unpoisoned** slot of this context in a segment this process has validated
    /// already (`Local::cached_slot`), of `h`'s generation and T's type tag, whose pointer is
    /// non-null, T-aligned and inside the heap. `None` sends the caller to the step-by-step path,
    /// which finds the same answer and reports it (or repairs first, or validates the segment); no
    /// check is skipped, they are only fused into fewer branches with no call and no error value.
    #[inline(always)]
    fn ready<T: 'static>(&self, h: SharedHandle<T>) -> Option<(&'a SlotRec, *mut T)> {
        if !self.cx().is_held_consistent() {
            return None;
        }
        let local = self.local;
        let hdr = local.hdr();
        let id = h.id;
        if hdr.closed.load(Ordering::Relaxed) != 0
            || id.context != local.uid
            || id.slot >= hdr.len.load(Ordering::Relaxed)
        {
            return None;
        }
        local.cached_slot(
            id.slot,
            #[inline(always)]
            |rec| {
                // One compare covers LIVE set, POISONED clear and the generation (the state word is
                // `generation << 32 | flags`).
                if rec.state.load(Ordering::Relaxed) != (u64::from(id.generation) << 32) | LIVE
                    || rec.tag.load(Ordering::Relaxed) != type_tag::<T>()
                {
                    return None;
                }
                let ptr = self.object_addr::<T>(rec)?;
                Some((rec, ptr))
            },
        )
    }

    /// Whether the object is free to borrow; reclaims it from a dead borrower (poisoning it).
    /// `Ok(true)` if it was reclaimed now.
    fn check_borrower(
        &self,
        rec: &SlotRec,
        id: ObjectId,
        me: u64,
        chain: u64,
    ) -> Result<bool, ObjectError> {
        let b = rec.borrower.load(Ordering::Relaxed);
        if b == 0 {
            return Ok(false);
        }
        if b == me {
            return Err(if rec.chain.load(Ordering::Relaxed) == chain {
                ObjectError::Busy
            } else {
                ObjectError::InUse {
                    pid: ProcessToken::from_bits(me).map_or(0, ProcessToken::pid),
                }
            });
        }
        if ProcLiveness.is_alive(b) {
            return Err(ObjectError::InUse {
                pid: ProcessToken::from_bits(b).map_or(0, ProcessToken::pid),
            });
        }
        self.reclaim(rec, id);
        Ok(true)
    }

    /// The borrower died suspended (or its death was not repaired yet): its `&mut` may have left
    /// the object half-updated. Poison it and clear the borrow, as the repair does.
    fn reclaim(&self, rec: &SlotRec, id: ObjectId) {
        rec.state.fetch_or(POISONED, Ordering::Relaxed);
        rec.chain.store(0, Ordering::Relaxed);
        rec.borrower.store(0, Ordering::Relaxed);
        self.hdr().recoveries.fetch_add(1, Ordering::Relaxed);
        self.recovery
            .borrow_mut()
            .get_or_insert_with(Recovery::default)
            .poisoned
            .push(id);
    }

    /// For the queries (which do not borrow): reclaims the object if its borrower has died, so that
    /// they report what the next `with` will find. Returns the state word after.
    fn state_after_reclaiming(&self, rec: &SlotRec, id: ObjectId) -> u64 {
        let b = rec.borrower.load(Ordering::Relaxed);
        if b != 0 && !ProcLiveness.is_alive(b) {
            self.reclaim(rec, id);
        }
        rec.state.load(Ordering::Relaxed)
    }

    /// Moves `value` into the shared heap, owned by the context, and returns its handle.
    ///
    /// # Errors
    /// [`ObjectError::NotHeld`], [`ObjectError::Closed`], [`ObjectError::Full`],
    /// [`ObjectError::Alloc`], [`ObjectError::InheritedHandle`].
    pub fn alloc<T: ShareSafe>(&mut self, value: T) -> Result<SharedHandle<T>, ObjectError> {
        const { assert!(!std::mem::needs_drop::<T>(), "ShareSafe types need no drop") };
        self.check()?;
        if self.me()? != self.local.maker {
            return Err(ObjectError::InheritedHandle);
        }
        let h = self.hdr();
        // Find the slot first (it may need a new segment), so a full table allocates nothing.
        let (index, fresh) = match h.free_head.load(Ordering::Relaxed) {
            0 => {
                let len = h.len.load(Ordering::Relaxed);
                if len >= MAX_OBJECTS {
                    return Err(ObjectError::Full);
                }
                self.ensure_segment(seg_of(len).0)?;
                (len, true)
            }
            f => {
                let i = u32::try_from(f - 1).map_err(|_| ObjectError::Corrupt("free list"))?;
                (i, false)
            }
        };
        let Some(rec) = self.local.slot(index) else {
            return Err(ObjectError::Corrupt("free slot"));
        };
        if !fresh && rec.state.load(Ordering::Relaxed) & LIVE != 0 {
            return Err(ObjectError::Corrupt("free list names a live slot"));
        }
        let layout = Layout::from_size_align(size_of::<T>().max(1), align_of::<T>())
            .map_err(|_| AllocError::BadLayout)?;
        let block = self.local.heap.alloc(layout)?.cast::<T>();
        // SAFETY: a fresh block of the heap, sized and aligned for T; nobody else knows it yet.
        unsafe { block.as_ptr().write(value) };
        // The slot is taken (counted, or unlinked from the free list) before it goes live: a crash
        // in between leaves a slot that is not live and not on the list, which the repair puts
        // back on it (the block leaks).
        if fresh {
            h.len.store(index + 1, Ordering::Relaxed);
        } else {
            h.free_head
                .store(rec.next_free.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let generation = ((rec.state.load(Ordering::Relaxed) >> 32) as u32).wrapping_add(1);
        rec.ptr.store(block.as_ptr() as u64, Ordering::Relaxed);
        rec.tag.store(type_tag::<T>(), Ordering::Relaxed);
        rec.size.store(size_of::<T>() as u64, Ordering::Relaxed);
        rec.chain.store(0, Ordering::Relaxed);
        rec.borrower.store(0, Ordering::Relaxed);
        // The one store that makes the object exist.
        rec.state
            .store((u64::from(generation) << 32) | LIVE, Ordering::Relaxed);
        h.live.fetch_add(1, Ordering::Relaxed);
        Ok(ObjectId {
            context: self.local.uid,
            slot: index,
            generation,
        }
        .typed())
    }

    fn ensure_segment(&self, k: usize) -> Result<(), ObjectError> {
        if self.local.segment(k).is_some() {
            return Ok(());
        }
        let layout = seg_layout(k);
        let block = self.local.heap.alloc(layout)?;
        // SAFETY: a fresh block of `layout.size()` bytes, ours until published below.
        unsafe { std::ptr::write_bytes(block.as_ptr(), 0, layout.size()) };
        // Published under the lock; a crash before this store leaks the block, after it the
        // segment is in use.
        self.hdr().dir[k].store(block.as_ptr() as u64, Ordering::Relaxed);
        match self.local.validate_segment(k) {
            Some(_) => Ok(()),
            None => Err(ObjectError::Corrupt("new segment")),
        }
    }

    /// Runs `f` with exclusive access to the object. The object stays borrowed (recorded in shared
    /// memory: this process and call chain) until `f` returns, even if `f` calls into another
    /// context meanwhile (which releases this one): another call chain, in this or another process,
    /// gets [`ObjectError::InUse`], a re-entrant access from this chain [`ObjectError::Busy`]. If `f`
    /// panics, the object is poisoned. A borrower found dead is handled as a crash: the object is
    /// reclaimed, poisoned, and this call returns [`ObjectError::Poisoned`].
    ///
    /// # Errors
    /// [`ObjectError::NotHeld`], [`ObjectError::Closed`], [`ObjectError::WrongContext`],
    /// [`ObjectError::Stale`], [`ObjectError::WrongType`], [`ObjectError::Busy`],
    /// [`ObjectError::InUse`], [`ObjectError::Poisoned`], [`ObjectError::Corrupt`],
    /// [`ObjectError::Identity`].
    #[inline]
    pub fn with<T: ShareSafe, R>(
        &self,
        h: SharedHandle<T>,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, ObjectError> {
        self.check()?;
        let (rec, s) = self.lookup_typed(h)?;
        let me = self.me()?;
        let chain = context_core::call_chain();
        if self.check_borrower(rec, h.id, me, chain)? || s & POISONED != 0 {
            return Err(ObjectError::Poisoned);
        }
        let ptr = self.object_ptr::<T>(rec)?;
        rec.chain.store(chain, Ordering::Relaxed);
        rec.borrower.store(me, Ordering::Relaxed);
        let end = EndBorrow {
            s: self,
            rec,
            was_panicking: std::thread::panicking(),
        };
        // SAFETY: the slot is live with T's type tag, so `ptr` is the block `alloc` wrote a T into
        // (sized and aligned for T, in the heap this process maps; blocks are freed only after their
        // slot stops being live, and never while borrowed). The borrow just recorded makes this the
        // only reference to it until `end` clears it: every other path to the object, in any process,
        // checks the borrow under the context's lock, and objects borrowed by a live process are
        // never freed or reclaimed.
        let r = f(unsafe { &mut *ptr });
        drop(end);
        Ok(r)
    }

    /// The object's address, checked: written by `alloc` from a fresh block of this heap (and checked
    /// against the allocator by every repair), checked here against the heap's span and T's
    /// alignment.
    #[inline]
    fn object_ptr<T>(&self, rec: &SlotRec) -> Result<*mut T, ObjectError> {
        self.object_addr(rec)
            .ok_or(ObjectError::Corrupt("object pointer"))
    }

    /// [`SharedCx::object_ptr`] without the error value.
    #[inline(always)]
    fn object_addr<T>(&self, rec: &SlotRec) -> Option<*mut T> {
        let addr = rec.ptr.load(Ordering::Relaxed) as usize;
        let (lo, len) = self.local.span;
        // Non-null and inside the span (`lo <= addr` and `addr + size <= lo + len`) as one compare
        // of the offset: by the INVARIANT on `span` (`1 <= lo`, `lo + len < usize::MAX`), an
        // `addr` below `lo`, 0 included, wraps `off` to at least `usize::MAX + 1 - lo > len`.
        let off = addr.wrapping_sub(lo);
        let inside = len
            .checked_sub(size_of::<T>())
            .is_some_and(|last| off <= last);
        if !inside || addr % align_of::<T>() != 0 {
            return None;
        }
        Some(addr as *mut T)
    }

    /// Copies the object out. No code of the caller runs while the object is read, so no nested
    /// call can happen meanwhile and no borrow needs recording: the cheapest read.
    ///
    /// # Errors
    /// As [`SharedCx::with`]: an object borrowed by any call chain (this one included: a `&mut`
    /// to it is live further up) is not read.
    // Always inlined: out of line (LLVM's choice in a large crate, `ctx`), its result went back
    // through memory and was read with a wider load than the stores that wrote it, a
    // store-forwarding stall that made an entry + get 22 ns instead of 13.
    #[inline(always)]
    pub fn get<T: ShareSafe + Copy>(&self, h: SharedHandle<T>) -> Result<T, ObjectError> {
        match self.ready::<T>(h) {
            Some((rec, ptr)) if rec.borrower.load(Ordering::Relaxed) == 0 => {
                // SAFETY: `ready` checked, under the context's lock which this thread holds now,
                // everything `get_checked` checks before its read (see there): the slot is live, of
                // generation `h`'s, unpoisoned, with T's type tag, and `ptr` is a T-aligned
                // pointer inside the heap; the borrow was just found clear. So `ptr` is the block
                // `alloc` wrote a T into, no `&mut` to it exists anywhere, and the read ends before
                // this thread could release the lock.
                Ok(unsafe { ptr.read() })
            }
            _ => {
                // The slow path returns the value and the error separately, so that its answer
                // comes back in registers (for a small `T`) instead of through a result in memory
                // that the fast path's `Ok` would then be built in as well.
                let mut e = ObjectError::NotHeld;
                match self.get_slow(h, &mut e) {
                    Some(v) => Ok(v),
                    None => Err(e),
                }
            }
        }
    }

    /// [`SharedCx::get_checked`], its error written to `e` (and `None` returned).
    #[cold]
    #[inline(never)]
    fn get_slow<T: ShareSafe + Copy>(&self, h: SharedHandle<T>, e: &mut ObjectError) -> Option<T> {
        match self.get_checked(h) {
            Ok(v) => Some(v),
            Err(err) => {
                *e = err;
                None
            }
        }
    }

    /// [`SharedCx::get`] step by step, with its exact errors (and repairs): the path taken whenever
    /// the fast checks of [`SharedCx::ready`] do not all pass.
    #[inline]
    fn get_checked<T: ShareSafe + Copy>(&self, h: SharedHandle<T>) -> Result<T, ObjectError> {
        self.check()?;
        let (rec, s) = self.lookup_typed(h)?;
        if rec.borrower.load(Ordering::Relaxed) != 0 {
            // Busy or InUse for a live borrower; a dead one's object is reclaimed, poisoned.
            self.check_borrower(rec, h.id, self.me()?, context_core::call_chain())?;
            return Err(ObjectError::Poisoned);
        }
        if s & POISONED != 0 {
            return Err(ObjectError::Poisoned);
        }
        let ptr = self.object_ptr::<T>(rec)?;
        // SAFETY: the slot is live with T's type tag, so `ptr` is the block `alloc` wrote a T into
        // (sized and aligned for T, in the heap this process maps). Nobody borrows it (checked
        // under the context's lock, which this thread holds), so no `&mut` to it exists anywhere
        // while it is read, and the read ends before this thread could release the lock.
        Ok(unsafe { ptr.read() })
    }

    /// Frees the object (its block goes back to the heap); its handles become stale. A poisoned
    /// object can be freed; one borrowed by a dead process is reclaimed and freed.
    ///
    /// # Errors
    /// As [`SharedCx::with`] (without `Poisoned` and `WrongType`: any handle of the object will do),
    /// and [`ObjectError::InheritedHandle`].
    pub fn free(&mut self, h: impl Into<ObjectId>) -> Result<(), ObjectError> {
        let id = h.into();
        self.check()?;
        let me = self.me()?;
        if me != self.local.maker {
            return Err(ObjectError::InheritedHandle);
        }
        let (rec, _) = self.lookup(id)?;
        self.check_borrower(rec, id, me, context_core::call_chain())?;
        self.free_slot(id.slot, rec);
        Ok(())
    }

    /// Frees a live, unborrowed slot's object: the slot stops being live first, then joins the free
    /// list, then the block is freed (a crash between the steps leaks the block at worst).
    fn free_slot(&self, index: u32, rec: &SlotRec) {
        let h = self.hdr();
        let s = rec.state.load(Ordering::Relaxed);
        rec.state.store(s & !(LIVE | POISONED), Ordering::Relaxed);
        let live = h.live.load(Ordering::Relaxed);
        h.live.store(live.saturating_sub(1), Ordering::Relaxed);
        // A slot whose generation is spent is retired, not reused: the next `alloc` would wrap it
        // to a generation an old handle may still carry (one slot lost per 2^32 reuses).
        if !generation_spent(s) {
            rec.next_free
                .store(h.free_head.load(Ordering::Relaxed), Ordering::Relaxed);
            h.free_head.store(u64::from(index) + 1, Ordering::Relaxed);
        }
        if let Some(p) = NonNull::new(rec.ptr.load(Ordering::Relaxed) as *mut u8) {
            // SAFETY: the slot was live, so `p` is the object's block; it is no longer reachable
            // (the slot is not live, and it was not borrowed), so nobody uses it after this.
            // A pointer that is not a live block is refused by the allocator (error ignored: the
            // record is gone either way).
            let _ = unsafe { self.local.heap.free(p) };
        }
    }

    /// Accepts a poisoned object again. Returns whether it was poisoned.
    ///
    /// # Errors
    /// [`ObjectError::NotHeld`], [`ObjectError::Closed`], [`ObjectError::WrongContext`],
    /// [`ObjectError::Stale`].
    pub fn clear_poison(&mut self, h: impl Into<ObjectId>) -> Result<bool, ObjectError> {
        let id = h.into();
        self.check()?;
        let (rec, _) = self.lookup(id)?;
        let s = self.state_after_reclaiming(rec, id);
        rec.state.store(s & !POISONED, Ordering::Relaxed);
        Ok(s & POISONED != 0)
    }

    /// Whether the object is poisoned.
    ///
    /// # Errors
    /// As [`SharedCx::clear_poison`].
    pub fn is_poisoned(&self, h: impl Into<ObjectId>) -> Result<bool, ObjectError> {
        self.check()?;
        let id = h.into();
        let (rec, _) = self.lookup(id)?;
        Ok(self.state_after_reclaiming(rec, id) & POISONED != 0)
    }

    /// Whether `h` names a live object of type `T` in this context.
    #[must_use]
    pub fn contains<T: 'static>(&self, h: SharedHandle<T>) -> bool {
        self.check().is_ok() && self.lookup_typed(h).is_ok()
    }

    /// The number of objects in the context.
    ///
    /// # Errors
    /// [`ObjectError::NotHeld`], [`ObjectError::Closed`].
    pub fn len(&self) -> Result<usize, ObjectError> {
        self.check()?;
        Ok(usize::try_from(self.hdr().live.load(Ordering::Relaxed)).unwrap_or(usize::MAX))
    }

    /// Whether the context holds no objects.
    ///
    /// # Errors
    /// As [`SharedCx::len`].
    pub fn is_empty(&self) -> Result<bool, ObjectError> {
        self.len().map(|n| n == 0)
    }

    /// Every poisoned object.
    ///
    /// # Errors
    /// As [`SharedCx::len`].
    pub fn poisoned(&self) -> Result<Vec<ObjectId>, ObjectError> {
        self.check()?;
        let len = self.hdr().len.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for i in 0..len {
            let Some(rec) = self.local.slot(i) else { break };
            let mut s = rec.state.load(Ordering::Relaxed);
            let id = ObjectId {
                context: self.local.uid,
                slot: i,
                generation: (s >> 32) as u32,
            };
            if s & LIVE != 0 {
                s = self.state_after_reclaiming(rec, id);
            }
            if s & (LIVE | POISONED) == LIVE | POISONED {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Frees every object (the supervision reset of one context): objects borrowed by dead
    /// processes are reclaimed first; every handle becomes stale. Returns how many were freed.
    ///
    /// # Errors
    /// [`ObjectError::InUse`] / [`ObjectError::Busy`] while a live call chain borrows an object
    /// (nothing is freed then); [`ObjectError::NotHeld`], [`ObjectError::Closed`],
    /// [`ObjectError::InheritedHandle`].
    pub fn reset(&mut self) -> Result<usize, ObjectError> {
        self.check()?;
        self.free_all()
    }

    fn free_all(&self) -> Result<usize, ObjectError> {
        let me = self.me()?;
        if me != self.local.maker {
            return Err(ObjectError::InheritedHandle);
        }
        let chain = context_core::call_chain();
        let len = self.hdr().len.load(Ordering::Relaxed);
        // First pass: refuse if a live chain borrows anything (reclaiming dead borrowers).
        for i in 0..len {
            let Some(rec) = self.local.slot(i) else { break };
            let s = rec.state.load(Ordering::Relaxed);
            if s & LIVE != 0 {
                let id = ObjectId {
                    context: self.local.uid,
                    slot: i,
                    generation: (s >> 32) as u32,
                };
                self.check_borrower(rec, id, me, chain)?;
            }
        }
        let mut n = 0;
        for i in 0..len {
            let Some(rec) = self.local.slot(i) else { break };
            if rec.state.load(Ordering::Relaxed) & LIVE != 0 {
                self.free_slot(i, rec);
                n += 1;
            }
        }
        Ok(n)
    }

    fn close_held(&self) -> Result<(), ObjectError> {
        self.check()?;
        self.free_all()?;
        let h = self.hdr();
        // Closed first: from here on no process touches the table (every path checks `closed`
        // under the lock), so the segments can go.
        h.closed.store(1, Ordering::Relaxed);
        h.len.store(0, Ordering::Relaxed);
        h.free_head.store(0, Ordering::Relaxed);
        h.live.store(0, Ordering::Relaxed);
        for (k, d) in h.dir.iter().enumerate() {
            let addr = d.swap(0, Ordering::Relaxed);
            let Some(p) = NonNull::new(addr as *mut u8) else {
                continue;
            };
            if self
                .local
                .heap
                .usable_size(p)
                .is_ok_and(|n| n >= seg_layout(k).size())
            {
                // SAFETY: a segment block of this context, unreachable now that the context is
                // closed (no access path passes the `closed` check, and it never reopens).
                let _ = unsafe { self.local.heap.free(p) };
            }
        }
        Ok(())
    }
}
