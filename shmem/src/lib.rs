//! # context-shmem
//!
//! Pointer-free data in memory shared between processes, with synchronization that survives a
//! process dying at the worst moment.
//!
//! - [`Segment`]: sealed memfd segments (passed by `fork` or over a Unix socket with SCM_RIGHTS;
//!   receivers refuse unsealed descriptors), named segments under `/dev/shm/ctxshm-*`, and
//!   file-backed segments. Every segment carries a validated header (magic, layout version, size,
//!   type id). See [`segment`] for exactly what protects each kind against truncation (SIGBUS).
//! - [`ShmSafe`] (+ `#[derive(ShmSafe)]`): types that may live in shared memory.
//!   [`SharedBuf`] gives lock-guarded copy-in/copy-out access, [`AtomicArray`] an atomic view; no
//!   API hands out `&T`/`&[u8]` over memory another process may be writing.
//! - [`SharedLock`]: a futex-based, process-shared, first-come-first-served lock (a waiter that
//!   does not claim its turn within 50 ms, descheduled say, goes to the back) that detects a
//!   dead owner (by PID + start time, immune to PID reuse) and implements
//!   [`context_core::RawContextLock`], so a [`context_core::Context`] can be entered by several
//!   processes. See [`lock`] for the protocol and why glibc robust mutexes do not fit.
//! - [`Channel`]: a bounded duplex frame channel (one SPSC ring per direction) with adaptive spinning,
//!   futex sleep, backpressure, deadlines, and peer-death detection.
//! - [`registry`]: list, inspect and garbage-collect named segments (`ctx shm ls/gc/inspect`).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use context_core::Context;
//! use context_shmem::{Channel, SharedBuf, SharedLock, ShmSafe, Side};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! #[derive(Clone, Copy, ShmSafe)]
//! #[repr(C)]
//! struct Account { id: u64, balance: i64 }
//!
//! // A lock-guarded buffer in a sealed memfd; a forked child (or a process that receives the
//! // descriptor over a Unix socket) sees the same elements.
//! let buf = SharedBuf::<Account>::create(16)?;
//! {
//!     let mut g = buf.lock(Some(Instant::now() + Duration::from_secs(1)))?;
//!     g.set(3, Account { id: 3, balance: 100 })?;
//!     // A guard that reports `owner_died()` means the last holder was killed mid-update:
//!     // repair, then `g.mark_consistent()`.
//!     assert!(!g.owner_died());
//! }
//! assert_eq!(buf.lock(None)?.get(3).map(|a| a.balance), Some(100));
//!
//! // A context whose lock lives in shared memory.
//! let ctx = Context::with_lock("shared", SharedLock::anonymous()?);
//! let h = ctx.enter(|cx| cx.adopt(41u32))??;
//! assert_eq!(ctx.enter(|cx| cx.with(h, |v| { *v += 1; *v }))??, 42);
//!
//! // A frame channel (here both ends in one process; normally one per process).
//! let ch = Channel::create(4096)?;
//! let (mut a, mut b) = (ch.endpoint(Side::A)?, ch.endpoint(Side::B)?);
//! a.send(b"ping", None)?;
//! let mut frame = [0u8; 64];
//! let n = b.recv(&mut frame, Some(Instant::now() + Duration::from_secs(1)))?;
//! assert_eq!(&frame[..n], b"ping");
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

// Lets the derive's `::context_shmem::ShmSafe` path resolve inside this crate's own tests too.
extern crate self as context_shmem;

#[cfg(not(loom))]
pub mod benchkit;
#[cfg(not(loom))]
pub mod channel;
pub mod lock;
pub mod process;
#[cfg(not(loom))]
pub mod registry;
#[cfg(not(loom))]
pub mod segment;
mod sync;
#[cfg(not(loom))]
mod typed;

#[cfg(not(loom))]
pub use channel::{Channel, ChannelError, Endpoint, Side};
pub use context_shmem_derive::ShmSafe;
pub use lock::{Liveness, LockFull, ProcLiveness, RawSharedLock, Slot};
#[cfg(not(loom))]
pub use lock::{SharedLock, SharedLockGuard};
pub use process::ProcessToken;
#[cfg(not(loom))]
pub use segment::{Segment, SegmentKind, TypeId};
#[cfg(not(loom))]
pub use typed::{AtomicArray, BufGuard, SharedBuf, ShmSafe};

/// Errors of segment, buffer and lock-handle operations.
#[cfg(not(loom))]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A received descriptor is not sealed against shrinking and growing: refused.
    #[error("descriptor is not a memfd sealed with F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL")]
    Unsealed,
    /// A header or record is malformed.
    #[error("invalid segment: {0}")]
    BadHeader(&'static str),
    /// The segment holds another type.
    #[error("segment holds type {found}, expected {expected}")]
    WrongType {
        /// The type asked for.
        expected: TypeId,
        /// The type recorded in the segment.
        found: TypeId,
    },
    /// The recorded size does not match the actual size.
    #[error("segment size mismatch: the file has {expected} bytes, the header says {found}")]
    WrongSize {
        /// Size seen by this process (`fstat`).
        expected: u64,
        /// Size recorded in the header.
        found: u64,
    },
    /// No segment of that name.
    #[error("no named segment {0:?}")]
    NotFound(String),
    /// The named segment's creator has exited; the name is stale (see `registry::gc`).
    #[error("the creator (pid {pid}) of this named segment has exited; the name is stale")]
    CreatorGone {
        /// The creator's PID.
        pid: u32,
    },
    /// The named segment's creator runs but no longer holds the segment (it `exec`ed, which
    /// closes the memfd, or closed it); the name is stale (see `registry::gc`).
    #[error(
        "the creator (pid {pid}) of this named segment no longer holds it (it exec'd or closed it); the name is stale"
    )]
    NoLongerHeld {
        /// The creator's PID.
        pid: u32,
    },
    /// The segment (or name record) was made in another PID namespace, whose PIDs this process
    /// cannot check: refused rather than risk taking a live process's lock or channel side.
    #[error(
        "made in another PID namespace (pid:[{}]; this process: pid:[{}]): its process ids mean nothing here",
        theirs.map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
        ours.map_or_else(|| "unknown".to_owned(), |n| n.to_string())
    )]
    ForeignPidNamespace {
        /// This process's PID namespace (`None` if unreadable).
        ours: Option<u32>,
        /// The creator's (`None` if it could not read its own).
        theirs: Option<u32>,
    },
    /// A malformed name or tag.
    #[error("{0}")]
    BadName(String),
    /// An offset/length outside the segment or buffer.
    #[error("range {offset}+{len} out of bounds (size {size})")]
    OutOfBounds {
        /// Requested offset.
        offset: usize,
        /// Requested length.
        len: usize,
        /// Available size.
        size: usize,
    },
    /// An offset not aligned for the type placed there.
    #[error("offset {offset} is not aligned to {align}")]
    Misaligned {
        /// Requested offset.
        offset: usize,
        /// Required alignment.
        align: usize,
    },
    /// A size that overflows or exceeds the crate's limit.
    #[error("size too large")]
    TooLarge,
    /// A lock's process table is full.
    #[error(transparent)]
    LockFull(#[from] LockFull),
    /// Acquiring a lock failed.
    #[error(transparent)]
    Lock(#[from] context_core::LockError),
}
