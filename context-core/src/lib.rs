//! # context-core
//!
//! Truly independent execution contexts in one process, with cheap calls between them.
//!
//! A [`Context`] is an isolated domain with its own lock (its "GIL") and its own table of objects.
//! Every object lives in exactly one context; its [`Handle`] names the context, and the object is
//! reached only through a [`Cx`], the proof that the calling thread holds that context right now.
//!
//! **Lock handoff.** A thread holds one context at a time (only [`enter_all`] holds several, taken in
//! one global order). Entering context B while holding A
//! releases A and acquires B; leaving B re-acquires A. If B is idle, the calling thread takes it
//! directly (one compare-and-swap, no syscall, no thread switch); if it is busy, the caller waits its
//! turn in first-come, first-served order. Chains such as A -> B -> A -> C work and cannot deadlock by
//! lock order, because a thread never waits while holding a context, except the lower-numbered ones of
//! one [`enter_all`] (see `ARCHITECTURE.md`).
//! Code that blocks on something else (I/O, another process) calls [`suspended`], which releases the
//! caller's contexts for the duration, as a call into another context does.
//!
//! **Free and pinned.** A free context ([`Context::new`]) runs calls on the calling thread. A pinned
//! context ([`Context::pinned`]) owns a home thread that runs every call, so its objects need not be
//! `Send` (an interpreter state, a C library handle with thread affinity).
//!
//! **Pluggable lock.** The lock is a [`RawContextLock`] (`unsafe trait`, in the style of
//! `lock_api::RawMutex`). [`LocalLock`] is the process-local one; `context-shmem` supplies a
//! process-shared, crash-safe one.
//!
//! ```
//! use context_core::{Context, EnterError};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let a = Context::new("a");
//! let b = Context::new("b");
//!
//! // Objects are adopted into a context and named by handles.
//! let counter = b.enter(|cx| cx.adopt(0u64))??;
//!
//! // From inside A, call into B: A is released while B runs, and re-entered afterwards.
//! let seen = a.enter(|_cx_a| {
//!     b.enter(|cx_b| cx_b.with(counter, |n| { *n += 5; *n }))
//! })???;
//! assert_eq!(seen, 5);
//!
//! // A handle is useless in the wrong context: a typed error, never undefined behaviour.
//! let wrong = a.enter(|cx| cx.with(counter, |n| *n))?;
//! assert!(wrong.is_err());
//!
//! // A panic inside a context is an error for the caller; the context stays usable.
//! let r: Result<(), EnterError> = b.enter(|_| panic!("boom"));
//! assert!(matches!(r, Err(EnterError::Panicked { .. })));
//! assert_eq!(b.enter(|cx| cx.with(counter, |n| *n))??, 5);
//!
//! // Pinned contexts hold values that are not Send; every call runs on their home thread.
//! let p = Context::pinned("interp")?;
//! let rc = p.enter(|cx| cx.adopt_local(std::rc::Rc::new(7)))??;
//! assert_eq!(p.enter(move |cx| cx.with(rc, |v| **v))??, 7);
//! # Ok(()) }
//! ```
//!
//! **Panics and poisoning.** A panic inside a context is caught at the `enter` that ran the closure and
//! returned as [`EnterError::Panicked`]; the context is released and stays usable (it is *not*
//! poisoned as a whole). The one object that was mutably borrowed through [`Cx::with`] when the panic
//! unwound is poisoned: later access gives [`AccessError::Poisoned`] until [`Cx::clear_poison`].
//!
//! **Counters.** [`Context::stats`] reports entries, fast-path entries, contended entries and the total
//! time spent waiting.
#![deny(missing_docs)]

pub mod benchkit;
mod context;
mod error;
mod handle;
mod handoff;
mod local_lock;
mod lock;
pub mod os;
mod pinned;
mod sync;
mod table;
pub mod waits;

pub use context::{
    CloseError, Context, ContextStats, Cx, call_chain, enter_all, held_contexts, suspended,
};
pub use error::{AccessError, EnterError};
pub use handle::{ContextId, Handle};
pub use local_lock::LocalLock;
pub use lock::{Acquired, LockError, RawContextLock};
