//! Error types, one per family of operations. Errno values are carried as data (`std::io::Error`).

use std::io;

use crate::sys::ExitKind;

/// Errors of the allocator and the typed owners.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No mapped chunk can serve the request (grow the pool, or free memory).
    #[error("the shared heap is exhausted")]
    OutOfMemory,
    /// The pointer is not the start of a block of this heap.
    #[error("pointer does not belong to this shared heap (or is not the start of a block)")]
    ForeignPointer,
    /// The block is not live (already freed).
    #[error("double free: the block is not allocated")]
    DoubleFree,
    /// Zero or non-power-of-two alignment, or an alignment above the chunk size, or a size overflow.
    #[error("unsupported size or alignment")]
    BadLayout,
    /// Chunk size or chunk count out of range.
    #[error("invalid heap geometry")]
    BadGeometry,
    /// A range to release still holds live blocks or an operation in flight.
    #[error("the range still holds live blocks")]
    InUse,
    /// The management area fails a consistency check.
    #[error("heap bookkeeping is corrupt: {0}")]
    Corrupt(String),
}

/// Errors of reserving address space and mapping regions.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// A size is zero, not a multiple of the chunk size, or larger than the reservation.
    #[error("invalid region size {size}: {why}")]
    BadSize {
        /// The size asked for.
        size: u64,
        /// Why it is refused.
        why: &'static str,
    },
    /// The reservation has no room for another region.
    #[error("address reservation exhausted: {needed} bytes needed, {left} left")]
    ReservationFull {
        /// Bytes asked for.
        needed: u64,
        /// Bytes left in the reservation.
        left: u64,
    },
    /// No region with this index is mapped.
    #[error("no mapped region {0}")]
    NoSuchRegion(usize),
    /// A system call failed.
    #[error("{op} failed: {error}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error (errno).
        error: io::Error,
    },
}

impl RegionError {
    pub(crate) fn os(op: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |error| Self::Os { op, error }
    }
}

/// Why a worker stopped being usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    /// The process ended (exit status or signal).
    Ended(ExitKind),
    /// The process was killed by the pool (timeout of a job holding a borrow, or shutdown).
    KilledByPool,
    /// The control channel broke but the process has not been reaped yet.
    ChannelLost,
}

impl std::fmt::Display for DeathCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ended(k) => write!(f, "{k}"),
            Self::KilledByPool => f.write_str("killed by the pool"),
            Self::ChannelLost => f.write_str("control channel lost"),
        }
    }
}

/// Errors of the pool: building it, running jobs, growing and releasing regions.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Forking now would copy a multi-threaded process (the child could inherit locks held by threads
    /// that do not exist in it). Build the pool in a single-threaded process: see
    /// [`crate::isolated`] for running code in a fresh single-threaded copy of the current binary.
    #[error(
        "cannot fork workers: this process has {threads} threads (forking is only safe while single-threaded; \
         run the pool in a process started with context_forkpool::isolated)"
    )]
    MultiThreaded {
        /// Threads counted in /proc/self/status.
        threads: usize,
    },
    /// A job argument does not live in this pool's heap.
    #[error("the job argument does not live in this pool's shared heap")]
    ForeignArgument,
    /// More workers than [`crate::MAX_WORKERS`] were asked for.
    #[error("{0} workers asked for; at most 1024 are supported")]
    TooManyWorkers(usize),
    /// A worker index out of range.
    #[error("no worker {0}")]
    NoSuchWorker(usize),
    /// The worker died; it has been reaped and will be replaced by [`crate::Pool::supervise`].
    #[error("worker {worker} (pid {pid}) died: {cause}")]
    WorkerDied {
        /// Worker index.
        worker: usize,
        /// Its process id.
        pid: i32,
        /// How it ended.
        cause: DeathCause,
    },
    /// The job did not finish within the timeout.
    #[error("worker {worker}: no result within {timeout:?}")]
    Timeout {
        /// Worker index.
        worker: usize,
        /// The timeout that elapsed.
        timeout: std::time::Duration,
    },
    /// The job panicked in the worker (the worker survives).
    #[error("worker {worker}: the job panicked")]
    JobPanicked {
        /// Worker index.
        worker: usize,
    },
    /// A job is already running on this worker.
    #[error("worker {0} is busy")]
    Busy(usize),
    /// Shared memory could not be proven consistent after a crash: call [`crate::Pool::reset`].
    #[error("the pool is poisoned ({0}); reset it")]
    Poisoned(String),
    /// A reset was asked for while typed owners (boxes, vectors, lists) still point into the heap.
    #[error("{0} handles to the shared heap are still alive; drop them before reset")]
    HandlesAlive(usize),
    /// The worker answered something that is not a valid reply.
    #[error("worker {worker}: protocol violation: {what}")]
    Protocol {
        /// Worker index.
        worker: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// Region error.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// Allocator error.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A system call failed.
    #[error("{op} failed: {error}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error (errno).
        error: io::Error,
    },
}

impl PoolError {
    pub(crate) fn os(op: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |error| Self::Os { op, error }
    }
}
