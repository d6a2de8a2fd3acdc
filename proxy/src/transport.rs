//! Transports: what moves a request frame to its target and the reply frame back.
//!
//! [`crate::Proxy`] is typed; a [`Transport`] only sees frames (the shape of `ipc-channel`'s typed
//! sender over bytes). [`InProcess`] is the one implemented here: it enters the target context
//! (idle fast path on the caller's thread, fair wait when busy, the home thread for a pinned
//! context) and runs the target's serve function on the frame there. A cross-process transport (a
//! shared-memory channel) implements the same trait, and on the far side answers frames with
//! [`crate::Exports::serve`]; a proxy over it is built with [`crate::Proxy::over`].

use std::time::Duration;

use context_core::{Context, Cx};

use crate::error::CallError;

/// Moves one request frame to its target and writes the reply frame into `reply`.
pub trait Transport: Send + Sync + 'static {
    /// Delivers `request` (a whole frame, header checked by the receiver) and waits for the reply,
    /// at most about `timeout` when one is given.
    ///
    /// # Errors
    /// The target cannot be reached or did not answer in time. Errors *inside* the target (stale
    /// handle, bad frame, ...) come back as error frames in `reply`, not as `Err`.
    fn round_trip(
        &self,
        request: &[u8],
        reply: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(), CallError>;
}

/// The target side of a call: answers one request frame, holding the target's context, by writing a
/// reply or error frame into `reply`. Generated per (service, object type, codec) by
/// [`crate::Proxy::new`] and by [`crate::Exports::export`].
pub type ServeFn = fn(&Cx<'_>, &[u8], &mut Vec<u8>);

/// The in-process transport: a context and the serve function of one object type.
#[derive(Clone)]
pub struct InProcess {
    pub(crate) ctx: Context,
    pub(crate) serve: ServeFn,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

impl InProcess {
    /// A transport into `ctx` that answers frames with `serve`.
    #[must_use]
    pub fn new(ctx: Context, serve: ServeFn) -> Self {
        Self { ctx, serve }
    }

    /// The target context.
    #[must_use]
    pub fn context(&self) -> &Context {
        &self.ctx
    }
}

impl Transport for InProcess {
    // Always inlined into the proxy's call (LLVM left it out of line): the closure's captures, the
    // frame pointers and the `Result` then stay in registers (callgrind: 558 -> 523 instructions
    // per small serialized call).
    #[inline(always)]
    fn round_trip(
        &self,
        request: &[u8],
        reply: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(), CallError> {
        let serve = self.serve;
        // The closure is built in each arm, not once before the match: the one shared by both
        // was stored to memory on the common path for the other's out-of-line call.
        let entered = match timeout {
            None => self
                .ctx
                .enter(move |cx: &mut Cx<'_>| serve(cx, request, reply)),
            Some(t) => self
                .ctx
                .enter_timeout(t, move |cx: &mut Cx<'_>| serve(cx, request, reply)),
        };
        entered.map_err(CallError::from)
    }
}
