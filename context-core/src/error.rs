//! Error types of context-core.

use crate::handle::ContextId;
use crate::lock::LockError;

/// Why entering a context failed. In every case the caller's own context (if it held one) is held
/// again when the error is returned, except [`EnterError::CallerLost`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnterError {
    /// The context was closed; its objects are gone.
    #[error("context {0} is closed")]
    Closed(ContextId),
    /// `try_enter` found the context busy.
    #[error("context {0} is busy")]
    WouldBlock(ContextId),
    /// The deadline passed before the caller's turn came.
    #[error("timed out waiting to enter context {0}")]
    TimedOut(ContextId),
    /// The closure panicked inside the context. The context was released and stays usable; the
    /// object being mutated when the panic happened is poisoned (see [`AccessError::Poisoned`]).
    #[error("panicked inside context {context}: {message}")]
    Panicked {
        /// The context the panic happened in.
        context: ContextId,
        /// The panic payload, if it was a string.
        message: String,
    },
    /// The context's lock reported an unrepaired crash (process-shared locks only).
    #[error("context {0} is not recoverable: a holder died and its state was never repaired")]
    NotRecoverable(ContextId),
    /// `enter_local` was called for a pinned context from a thread other than its home thread.
    #[error("context {0} is pinned to another thread; use enter() to run on its home thread")]
    NotHomeThread(ContextId),
    /// After the call returned, the caller's own context could not be re-entered (its lock became
    /// unrecoverable meanwhile). The caller now holds no context.
    #[error("could not re-enter the calling context {0} after the call")]
    CallerLost(ContextId),
}

impl EnterError {
    pub(crate) fn from_lock(id: ContextId, e: LockError) -> Self {
        match e {
            LockError::WouldBlock => Self::WouldBlock(id),
            LockError::TimedOut => Self::TimedOut(id),
            LockError::NotRecoverable => Self::NotRecoverable(id),
        }
    }
}

/// Why an object could not be reached through a handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The `Cx` used is not the context this thread holds right now (it was suspended by a call into
    /// another context, or belongs to an outer scope).
    #[error("context {0} is not held by this thread right now")]
    NotHeld(ContextId),
    /// The handle belongs to another context.
    #[error("handle belongs to context {handle} but was used in context {context}")]
    WrongContext {
        /// The context the handle names.
        handle: ContextId,
        /// The context it was used in.
        context: ContextId,
    },
    /// The object was removed (or its slot reused): the handle is stale.
    #[error("stale handle: the object was removed from context {0}")]
    Stale(ContextId),
    /// The object is not of the handle's type (a handle forged with `Handle::cast`).
    #[error("object is a {found}, not a {expected}")]
    WrongType {
        /// The type the handle asked for.
        expected: &'static str,
        /// The type stored.
        found: &'static str,
    },
    /// The object is being used further up *this* call chain (a re-entrant call into an object whose
    /// method is still running). Waiting would never end, so this fails at once.
    #[error("object in context {0} is in use further up this call chain (re-entrant call)")]
    Busy(ContextId),
    /// The object's method is running for *another* call chain (another thread, or another caller's
    /// job on a pinned home thread) and has called out of the context, so the context is free but the
    /// object is not. It becomes available when that call returns: leave the context, wait, and try
    /// again (proxies do this until their timeout).
    #[error("object in context {0} is in use by another call; retry later")]
    InUse(ContextId),
    /// A panic happened while the object was mutably borrowed; its state may be half-updated.
    /// [`crate::Cx::clear_poison`] accepts it again, [`crate::Cx::remove`] takes it out.
    #[error("object in context {0} is poisoned by an earlier panic")]
    Poisoned(ContextId),
    /// A value that is not `Send` can only be adopted by a pinned context.
    #[error("context {0} is not pinned; only pinned contexts hold values that are not Send")]
    NotPinned(ContextId),
    /// The context holds the maximum number of objects (2^32 - 1).
    #[error("context {0} is full")]
    Full(ContextId),
}
