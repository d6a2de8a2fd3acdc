//! The error of a proxied call, and its wire form.

use context_core::{AccessError, ContextId, EnterError};
use serde::{Deserialize, Serialize};

use crate::codec::{CodecError, CodecErrorKind};
use crate::frame::{EncodeFrameError, FrameError};

/// Why a call through a [`crate::Proxy`] failed. The caller's own context, if it held one, is held
/// again when this is returned (except [`CallError::CallerLost`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The target context is closed; its objects are gone.
    #[error("target context {0} is closed")]
    Closed(ContextId),
    /// The object was removed from its context (the proxy's handle is stale).
    #[error("the object was removed from context {0}")]
    Removed(ContextId),
    /// The object does not implement the service the proxy speaks (a proxy built from a handle of
    /// another type, or a frame addressed with another service id).
    #[error("wrong service: proxy speaks {expected}, object is {found}")]
    WrongService {
        /// What the proxy expected.
        expected: String,
        /// What the target found.
        found: String,
    },
    /// The handle names an object of another context than the one it was used with.
    #[error("handle of context {handle} used with context {context}")]
    WrongContext {
        /// The handle's context.
        handle: ContextId,
        /// The context it was used with.
        context: ContextId,
    },
    /// The object is in use further up this call chain (a re-entrant call into an object whose method
    /// is still running).
    #[error("the object in context {0} is in use further up the call chain")]
    Busy(ContextId),
    /// The object's method is running on another thread and has called out of its context. Proxies
    /// retry this by themselves (leaving the target in between) until their timeout, and return
    /// it only when a timeout was set and passed without the object becoming free.
    #[error("the object in context {0} is in use by a call on another thread")]
    InUse(ContextId),
    /// The object is in use by another call chain that waits, directly or through others, for this
    /// one (crossed calls between two borrowed objects, say): waiting could never end, so the call
    /// fails once the cycle has lasted 50 ms (a cycle seen only for a moment, as waits change, is
    /// not a deadlock).
    #[error("the object in context {0} is borrowed by a call that waits for this one (deadlock)")]
    Deadlock(ContextId),
    /// An earlier method panicked while holding the object; its state may be half-updated. Clear it
    /// with [`context_core::Cx::clear_poison`] or remove the object.
    #[error("the object in context {0} is poisoned by an earlier panic")]
    Poisoned(ContextId),
    /// A frame failed its header checks (malformed, or over the size limit).
    #[error("bad frame: {0}")]
    Frame(FrameError),
    /// A body could not be encoded or decoded (malformed bytes, a length over the limit, trailing
    /// bytes).
    #[error("codec: {0}")]
    Codec(CodecError),
    /// The method panicked. The target context was released and stays usable; the object is
    /// poisoned ([`CallError::Poisoned`] on later calls).
    #[error("method panicked in context {context}: {message}")]
    Panicked {
        /// The context the method ran in.
        context: ContextId,
        /// The panic message, if it was a string.
        message: String,
    },
    /// The target did not become free within the proxy's timeout.
    #[error("timed out waiting for context {0}")]
    TimedOut(ContextId),
    /// After the call, the caller's own context could not be re-entered. The caller holds no context.
    #[error("could not re-enter the calling context {0}")]
    CallerLost(ContextId),
    /// A reply variant that does not answer the method called (a protocol error of the peer).
    #[error("the reply does not answer the method called")]
    UnexpectedResponse,
    /// A plain-buffer range is out of bounds.
    #[error("range {start}..{end} is out of bounds for a buffer of {len}")]
    OutOfRange {
        /// Start of the range, in elements.
        start: u64,
        /// End of the range, in elements.
        end: u64,
        /// The buffer's length, in elements.
        len: u64,
    },
    /// The operation needs an in-process target reached directly (move mode, the plain-buffer cheat
    /// path), and this proxy goes through another transport or its object is not a plain buffer.
    #[error("not supported for this proxy: {0}")]
    Unsupported(&'static str),
    /// The transport failed to move a frame (for transports other than the in-process one).
    #[error("transport: {0}")]
    Transport(String),
    /// The process serving the target died (cross-process transports): the call may or may not
    /// have run. Every later call through the same link fails the same way.
    #[error("the process serving the target (pid {pid}) died")]
    PeerDead {
        /// Its process id.
        pid: u32,
    },
    /// Any other failure to enter the target context.
    #[error(transparent)]
    Enter(EnterError),
    /// Any other failure to reach or place the object, such as [`AccessError::NotPinned`] from
    /// [`crate::Proxy::adopt_local`] on a context that is not pinned, or [`AccessError::Full`].
    #[error(transparent)]
    Access(AccessError),
}

impl From<EnterError> for CallError {
    fn from(e: EnterError) -> Self {
        match e {
            EnterError::Closed(id) => Self::Closed(id),
            EnterError::TimedOut(id) => Self::TimedOut(id),
            EnterError::Panicked { context, message } => Self::Panicked { context, message },
            EnterError::CallerLost(id) => Self::CallerLost(id),
            other => Self::Enter(other),
        }
    }
}

impl From<FrameError> for CallError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

impl From<CodecError> for CallError {
    fn from(e: CodecError) -> Self {
        Self::Codec(e)
    }
}

impl From<EncodeFrameError> for CallError {
    fn from(e: EncodeFrameError) -> Self {
        match e {
            EncodeFrameError::Codec(c) => Self::Codec(c),
            EncodeFrameError::Frame(f) => Self::Frame(f),
        }
    }
}

impl CallError {
    /// Maps an object access error; `expected` names the type the proxy was built for.
    pub(crate) fn from_access(e: AccessError, expected: &'static str) -> Self {
        match e {
            AccessError::Stale(id) => Self::Removed(id),
            AccessError::WrongType { expected: _, found } => Self::WrongService {
                expected: expected.to_owned(),
                found: found.to_owned(),
            },
            AccessError::WrongContext { handle, context } => Self::WrongContext { handle, context },
            AccessError::Busy(id) => Self::Busy(id),
            AccessError::InUse(id) => Self::InUse(id),
            AccessError::Poisoned(id) => Self::Poisoned(id),
            other => Self::Access(other),
        }
    }
}

/// The body of an error frame: the failures a target can report, in a form any codec can carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireError {
    Removed(u64),
    WrongService { expected: String, found: String },
    WrongContext { handle: u64, context: u64 },
    Busy(u64),
    InUse(u64),
    Poisoned(u64),
    Frame(FrameError),
    Codec { kind: u8, message: String },
    Closed(u64),
    TimedOut(u64),
    Panicked { context: u64, message: String },
    Other(String),
}

fn id(raw: u64) -> Result<ContextId, CallError> {
    ContextId::from_raw(raw).ok_or(CallError::UnexpectedResponse)
}

impl WireError {
    /// The wire form of an error produced while serving a request.
    pub(crate) fn from_call(e: &CallError) -> Self {
        match e {
            CallError::Removed(id) => Self::Removed(id.get()),
            CallError::WrongService { expected, found } => Self::WrongService {
                expected: expected.clone(),
                found: found.clone(),
            },
            CallError::WrongContext { handle, context } => Self::WrongContext {
                handle: handle.get(),
                context: context.get(),
            },
            CallError::Busy(id) => Self::Busy(id.get()),
            CallError::InUse(id) => Self::InUse(id.get()),
            CallError::Poisoned(id) => Self::Poisoned(id.get()),
            CallError::Frame(f) => Self::Frame(f.clone()),
            CallError::Codec(c) => Self::Codec {
                kind: match c.kind() {
                    CodecErrorKind::Encode => 0,
                    CodecErrorKind::Decode => 1,
                    CodecErrorKind::Limit => 2,
                    CodecErrorKind::TrailingBytes => 3,
                },
                message: c.to_string(),
            },
            CallError::Closed(id) => Self::Closed(id.get()),
            CallError::TimedOut(id) => Self::TimedOut(id.get()),
            CallError::Panicked { context, message } => Self::Panicked {
                context: context.get(),
                message: message.clone(),
            },
            other => Self::Other(other.to_string()),
        }
    }

    /// Back to a [`CallError`] on the caller's side. Ids of 0 (never valid) are a protocol error.
    pub(crate) fn into_call(self) -> CallError {
        let r = match self {
            Self::Removed(c) => id(c).map(CallError::Removed),
            Self::WrongService { expected, found } => {
                Ok(CallError::WrongService { expected, found })
            }
            Self::WrongContext { handle, context } => id(handle).and_then(|handle| {
                Ok(CallError::WrongContext {
                    handle,
                    context: id(context)?,
                })
            }),
            Self::Busy(c) => id(c).map(CallError::Busy),
            Self::InUse(c) => id(c).map(CallError::InUse),
            Self::Poisoned(c) => id(c).map(CallError::Poisoned),
            Self::Frame(f) => Ok(CallError::Frame(f)),
            Self::Codec { kind, message } => {
                let kind = match kind {
                    0 => CodecErrorKind::Encode,
                    1 => CodecErrorKind::Decode,
                    2 => CodecErrorKind::Limit,
                    _ => CodecErrorKind::TrailingBytes,
                };
                Ok(CallError::Codec(CodecError::new(
                    kind,
                    format_args!("at the target: {message}"),
                )))
            }
            Self::Closed(c) => id(c).map(CallError::Closed),
            Self::TimedOut(c) => id(c).map(CallError::TimedOut),
            Self::Panicked { context, message } => {
                id(context).map(|context| CallError::Panicked { context, message })
            }
            Self::Other(m) => Ok(CallError::Transport(m)),
        };
        r.unwrap_or_else(|e| e)
    }
}
