//! # context-forkpool
//!
//! The design note's "evil trick", as a supervised worker pool: the master reserves a large range of
//! address space, maps blank shared files into it at fixed addresses, and forks workers that inherit
//! the mappings at the same addresses. Ordinary pointers stored in those regions are then valid in
//! every process, so a structure built by the master can be walked by workers through plain pointers.
//!
//! - **Regions** ([`Backing`]): one `PROT_NONE` reservation (16 GiB by default), memfd-backed regions
//!   (sealed against resizing) or unnamed files in a directory, mapped `MAP_SHARED | MAP_FIXED`; sparse
//!   until touched. [`Pool::grow`] maps a new region in every process before the allocator may use it;
//!   [`Pool::release_region`] (unmap everywhere behind an epoch barrier, close the file) and
//!   [`Pool::punch_free`] (`fallocate(PUNCH_HOLE)` / `MADV_REMOVE`) return memory. Limits below.
//! - **Allocator** ([`Heap`], [`RawHeap`]): process-shared, lock-free and crash-consistent by
//!   construction (every step is one atomic operation; a process killed anywhere can at worst leak a
//!   block). Size classes with occupancy bitmaps, large blocks of whole chunks, all bookkeeping in a
//!   management area whose size is known up front ([`Geometry::management_size`]). Double free,
//!   foreign pointers and exhaustion are errors. Statistics and a full checker scan the bookkeeping.
//! - **Typed owners**: [`SharedBox`], [`SharedVec`] and [`SharedList`] (a linked list whose nodes any
//!   process can walk and extend), for types that prove they are shareable ([`ShareSafe`]), and
//!   [`SharedMutex`], a value behind `context-shmem`'s process-shared lock, which detects a holder
//!   that died and makes the next holder repair the value.
//! - **Shared contexts** ([`SharedContext`], module [`shared_context`]): a `context_core` context whose
//!   lock (`context-shmem`'s crash-safe process-shared lock) and objects live in the shared heap. Any
//!   process of the pool enters it with the core enter/handoff API (idle: one CAS on the caller's own
//!   thread); objects are named by [`SharedHandle`]s valid in every process; a process that dies inside
//!   the context, or suspended with an object borrowed, gets that object poisoned and its borrow
//!   cleared before anyone else runs, and the next entrant is told ([`SharedCx::recovery`]).
//! - **Workers** ([`Pool`]): jobs are plain function pointers (valid after fork: same image) with
//!   arguments in shared memory ([`Pool::run`], [`Pool::run_mut`], [`Pool::broadcast`]), waits with
//!   timeouts, dead workers detected (exit status or signal), reported ([`Pool::take_deaths`]) and
//!   replaced; a PostgreSQL-style [`Pool::reset`] when shared memory cannot be proven consistent.
//!   Workers get `PR_SET_PDEATHSIG(SIGKILL)` and check their parent, so they die with the master.
//!
//! ## Limits of regions
//!
//! - The reservation is address space only (`MAP_NORESERVE`, no access): it costs page-table space
//!   for nothing until a region is mapped. The default is 16 GiB; x86-64 user space is 128 TiB, so
//!   terabytes are possible, bounded by `vm.max_map_count` only in the number of regions (each is one
//!   mapping) and by `ulimit -v` (RLIMIT_AS counts the reservation).
//! - Backing files are sparse: `ftruncate` allocates nothing; a page costs memory (memfd: shmem, which
//!   counts against the memory cgroup and swap; a file in a directory: that filesystem) on first touch.
//!   A memfd can only be as large as shmem allows (`/proc/sys/vm` overcommit settings do not apply to
//!   untouched pages; touched pages need RAM or swap).
//! - Memfd backings are sealed against shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW`), so no
//!   process can truncate a region under a mapping and turn accesses into SIGBUS. Files in a directory
//!   are `O_TMPFILE` (never named), mode 0600; they cannot be sealed, but nobody else can open them.
//! - Regions are laid out in order and never move. A released region leaves a `PROT_NONE` hole that is
//!   not reused (its chunks are marked released in the allocator); new regions go after the last one.
//!   Adjacent regions are contiguous, so a large block may straddle two of them; such a region cannot
//!   be released until the block is freed.
//! - The allocator's management area is sized for the whole reservation (about 1/128 of it plus
//!   16 bytes per chunk, sparse: touched only as chunks are used) and lives at the start of the first
//!   region, which must be larger than it ([`Geometry::management_size`] tells the size up front).
//! - Blocks that a killed worker held are leaked (blocks are not attributed to processes); chunks it
//!   left mid-operation are repaired ([`DeathReport::repaired_chunks`]); [`Pool::reset`] reclaims
//!   everything. Small chunks return to the free pool only through [`Pool::punch_free`] or a region
//!   release, not on every free.
//!
//! ## Threads and fork: the decision
//!
//! The pool forks only from a single-threaded process and otherwise refuses with
//! [`PoolError::MultiThreaded`]: a child of a multi-threaded process may inherit locks held by threads
//! that do not exist in it. Replacing a dead worker forks again, so the master must stay
//! single-threaded while the pool lives. Multi-threaded hosts (cargo's test harness, a CLI with a
//! progress thread) run the pool in a fresh single-threaded copy of their own binary with
//! [`isolated::run`]: it re-executes `current_exe()` and a start-up hook of this crate runs the chosen
//! entry function before `main`. No zygote is forked early, because a library cannot run before its
//! host's threads exist except through exactly such a hook, and re-execution gives a clean process
//! without inheriting anything. Between `fork` and its loop a worker allocates nothing.
//!
//! ## Layering
//!
//! forkpool sits above `context-shmem` (segments, the process-shared lock, the channel) and
//! `context-core`. It uses the shared lock for [`SharedMutex`] and, as a core `RawContextLock`
//! ([`PoolLock`]), for [`SharedContext`]. Its allocator needs no lock (it is lock-free and crash-consistent
//! by construction), and regions need fixed-address mapping that the segment type does not offer, so
//! they are built with `libc` directly in `sys`.
//!
//! ## Example
//!
//! ```
//! use std::time::Duration;
//! use context_forkpool::{JobContext, ListHead, Pool, SharedList, isolated};
//!
//! fn sum(_: &JobContext, list: &ListHead<u64>) -> u64 {
//!     list.iter().sum()
//! }
//!
//! /// Builds a pool, a list in shared memory, and has a worker walk it.
//! fn demo() -> Result<(), Box<dyn std::error::Error>> {
//!     let mut pool = Pool::builder().workers(2).reserve(1 << 30).initial_region(64 << 20).build()?;
//!     let mut list = SharedList::new(pool.heap())?;
//!     for v in 1..=100u64 {
//!         list.push_front(v)?;
//!     }
//!     // A worker walks the master's list through plain pointers.
//!     assert_eq!(pool.run(0, sum, &list, Duration::from_secs(10))?, 5050);
//!     Ok(())
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Test harnesses (doctests included) may be multi-threaded, and the pool only forks from a
//!     // single-threaded process: run the demo in a fresh single-threaded copy of this binary.
//!     let out = isolated::run(|| demo().map_or_else(|e| { eprintln!("{e}"); 1 }, |()| 0), Duration::from_secs(60))?;
//!     assert!(out.success(), "{}", out.stderr);
//!     Ok(())
//! }
//! ```

mod alloc;
mod error;
mod heap;
pub mod isolated;
#[cfg(not(loom))]
mod mutex;
mod pool;
pub mod protocol;
mod region;
#[cfg(not(loom))]
pub mod shared_context;
mod sys;

pub use alloc::{CLASSES, CheckReport, Geometry, MAX_SMALL, MIN_BLOCK, RawHeap, Stats};
pub use error::{AllocError, DeathCause, PoolError, RegionError};
pub use heap::{
    Heap, JobArg, ListHead, ListIter, ListNode, ShareSafe, SharedBox, SharedList, SharedVec,
};
#[cfg(not(loom))]
pub use mutex::{MutexError, SharedMutex, SharedMutexGuard};
pub use pool::{
    DeathOutcome, DeathPolicy, DeathReport, JobContext, MAX_WORKERS, Pool, PoolBuilder,
};
pub use region::Backing;
#[cfg(not(loom))]
pub use shared_context::{
    CloseError as SharedCloseError, MAX_OBJECTS, ObjectError, ObjectId, OpenError, PoolLock,
    Recovery, SharedContext, SharedContextRef, SharedCx, SharedHandle,
};
pub use sys::{
    ExitKind, bare_fork_waitpid, bare_forks_until_hello, open_fd_count, open_memfd_count,
    resident_bytes,
};
