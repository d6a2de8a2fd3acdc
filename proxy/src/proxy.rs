//! `Proxy<S>`: a typed name for an object in some context, and the call protocol.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use context_core::{Context, Cx, Handle};

use crate::buffer::PlainAccess;
use crate::codec::{Bincode, Codec};
use crate::error::{CallError, WireError};
use crate::frame::{self, FrameError, FrameKind, ObjectId};
use crate::service::{Serve, Service};
use crate::transport::{InProcess, ServeFn, Transport};

// ---------------------------------------------------------------------------------------------
// Buffers: a small per-thread pool so the hot path allocates nothing once warm. A stack, not one
// buffer, because calls nest (A -> B -> A runs a second call while the first one's buffers are in
// use on the same thread).

/// Buffer pairs kept per thread besides the first (for calls nested in calls).
const POOL_MAX: usize = 8;
/// Larger buffers are freed after use rather than kept (a 64 MiB transfer should not pin 64 MiB).
const KEEP_MAX_CAPACITY: usize = 1 << 20;

/// A request and a reply buffer, boxed so that handing the pair around moves one pointer.
#[derive(Default)]
struct Bufs {
    req: Vec<u8>,
    rep: Vec<u8>,
}

thread_local! {
    /// The pair the outermost call on this thread uses: taking it and giving it back is a load
    /// and a store (a `RefCell<Vec<_>>` pool cost about 50 instructions per call).
    static SPARE: Cell<Option<Box<Bufs>>> = const { Cell::new(None) };
    /// More pairs, for calls nested inside a call on the same thread (A -> B -> A runs a second
    /// call while the first one's buffers are in use).
    #[allow(clippy::vec_box, reason = "pairs move between SPARE and POOL as one pointer")]
    static POOL: RefCell<Vec<Box<Bufs>>> = const { RefCell::new(Vec::new()) };
}

/// The thread's buffer pool: a request and a reply buffer are taken for a call with
/// [`Pooled::take`] and given back with [`Pooled::give_back`] when it ends. A call that panics
/// gives nothing back; its buffers are freed and the next call starts with empty ones.
///
/// Explicit rather than a guard given back on drop: LLVM left the guard's `drop_in_place` out of
/// line, a call and some twenty instructions on every call.
struct Pooled;

impl Pooled {
    #[inline]
    fn take() -> Box<Bufs> {
        match SPARE.try_with(Cell::take) {
            Ok(Some(b)) => b,
            _ => Self::take_nested(),
        }
    }

    #[cold]
    fn take_nested() -> Box<Bufs> {
        POOL.try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Keeps `b` for the next call on this thread, unless one of its buffers grew too large.
    #[inline(always)]
    fn give_back(b: Box<Bufs>) {
        if b.req.capacity() > KEEP_MAX_CAPACITY || b.rep.capacity() > KEEP_MAX_CAPACITY {
            return;
        }
        // The pair goes back to `SPARE`. A nested call finds `SPARE` empty at its start (its
        // caller has the pair) and fills it at its end: the caller's pair then goes to `POOL`.
        if let Ok(Some(b)) = SPARE.try_with(|s| s.replace(Some(b))) {
            Self::give_back_nested(b);
        }
    }

    /// [`Pooled::give_back`] for the paths that are not the common one.
    #[inline(never)]
    fn give_back_out_of_line(b: Box<Bufs>) {
        Self::give_back(b);
    }

    #[cold]
    fn give_back_nested(b: Box<Bufs>) {
        let _ = POOL.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                if p.len() < POOL_MAX {
                    p.push(b);
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The target side.

/// Answers one request frame for objects of type `T` serving `S`, encoded with `C`: the function
/// behind every [`ServeFn`]. Runs holding the target context; writes a reply or error frame.
#[inline]
fn serve_frame<S: Serve<T>, T: 'static, C: Codec>(
    cx: &Cx<'_>,
    request: &[u8],
    reply: &mut Vec<u8>,
) {
    let outcome = (|| -> Result<(), CallError> {
        let (h, body) = frame::parse_kind(request, C::LIMIT, FrameKind::Request)?;
        if h.service != S::ID {
            return Err(wrong_service(h.service, S::NAME));
        }
        let handle = h.object.typed::<T>().ok_or(FrameError::Mismatched)?;
        let resp = C::decode_then(body, |req: S::Request<'_>| {
            cx.with(handle, |obj| S::serve(obj, req))
        })?
        .map_err(|e| CallError::from_access(e, S::NAME))?;
        frame::encode::<C, _>(reply, FrameKind::Reply, S::ID, h.object, &resp)?;
        Ok(())
    })();
    if let Err(e) = outcome {
        write_request_error::<C>(reply, request, &e);
    }
}

/// The error for a request to service id `requested` that reached an object serving `serving`.
/// Out of line: formatting the id in place took the whole header's address, so the common path
/// stored it to memory on every call.
#[cold]
fn wrong_service(requested: u64, serving: &str) -> CallError {
    CallError::WrongService {
        expected: format!("service id {requested:#x}"),
        found: serving.to_owned(),
    }
}

/// Writes the error frame answering `request`, which [`serve_frame`] failed on. It echoes the
/// request's service and object, so the caller accepts it; a request whose header does not
/// parse as a request gets zeros. (The header is read again here: kept by the common path for
/// this, it was stored on every call.)
#[cold]
fn write_request_error<C: Codec>(reply: &mut Vec<u8>, request: &[u8], e: &CallError) {
    let (service, object) = echoed(frame::parse_kind(request, C::LIMIT, FrameKind::Request));
    write_error::<C>(reply, service, object, e);
}

/// The service and object an error reply echoes, from its request's parsed header: zeros for a
/// request whose header did not parse (the caller accepts those, see `decode_reply`).
fn echoed(parsed: Result<(frame::Header, &[u8]), FrameError>) -> (u64, ObjectId) {
    match parsed {
        Ok((h, _)) => (h.service, h.object),
        Err(_) => (
            0,
            ObjectId {
                context: 0,
                slot: 0,
                generation: 0,
            },
        ),
    }
}

#[cold]
fn write_error<C: Codec>(reply: &mut Vec<u8>, service: u64, object: ObjectId, e: &CallError) {
    let wire = WireError::from_call(e);
    if frame::encode::<C, _>(reply, FrameKind::Error, service, object, &wire).is_err() {
        // Only a message longer than the limit can fail; send the bare kind instead.
        let short = WireError::Other("error too large to encode".to_owned());
        let _ = frame::encode::<C, _>(reply, FrameKind::Error, service, object, &short);
    }
}

/// Move mode: runs a request value directly on the object, no frames. The request is taken out of
/// the slot only when the object could be borrowed, so a refused call (`InUse`) can be retried.
///
/// The response comes back as the return value and a failure, rarely, through `failure`: a small
/// response (`Option<u64>`-sized) then travels in registers. Passing a whole
/// `Result<Response, CallError>` through memory across this non-inlined call cost a few
/// nanoseconds of a 20 ns call in copies. The `Cx` is passed by value ([`Cx::reborrow`]): two
/// registers rather than a reference to two stores. The object id is passed by reference, read from the
/// proxy itself (by value it is 16 bytes, which the Rust ABI passes through a stack copy).
type MoveFn<S> = for<'a, 'c, 'd, 'e, 'f> fn(
    Cx<'c>,
    &'f ObjectId,
    &'d mut Option<<S as Service>::Request<'a>>,
    &'e mut Option<MoveFailure>,
) -> Option<<S as Service>::Response>;

/// Why a moved call produced no response.
enum MoveFailure {
    /// The proxy's object id does not name an object of the serving type.
    Mismatched,
    /// The object could not be borrowed.
    Access(context_core::AccessError),
    /// The request was already taken (cannot happen on the first attempt; kept as an error).
    Taken,
}

impl MoveFailure {
    #[cold]
    fn into_call<S: Service>(self) -> CallError {
        match self {
            Self::Mismatched => FrameError::Mismatched.into(),
            Self::Access(e) => CallError::from_access(e, S::NAME),
            Self::Taken => CallError::UnexpectedResponse,
        }
    }

    /// The context that refused a borrow because another call chain holds the object.
    fn in_use(&self) -> Option<context_core::ContextId> {
        match self {
            Self::Access(context_core::AccessError::InUse(id)) => Some(*id),
            _ => None,
        }
    }
}

/// The method's result out of `response` (`pick`: `None` for a response to another method).
#[inline]
fn picked<T, R>(response: T, pick: impl FnOnce(T) -> Option<R>) -> Result<R, CallError> {
    match pick(response) {
        Some(r) => Ok(r),
        None => Err(CallError::UnexpectedResponse),
    }
}

/// Writes `e` to `error` and returns `None`: a failed call in [`Proxy::call_split`]'s shape.
#[cold]
fn fail<R>(error: &mut Option<CallError>, e: CallError) -> Option<R> {
    *error = Some(e);
    None
}

/// A moved call's state, on the caller's stack; the `enter` closure holds only a pointer to it.
struct MoveCall<'a, 'r, S: Service> {
    mover: MoveFn<S>,
    object: &'a ObjectId,
    slot: &'a mut Option<S::Request<'r>>,
    failure: Option<MoveFailure>,
}

fn serve_moved<S: Serve<T>, T: 'static>(
    cx: Cx<'_>,
    object: &ObjectId,
    slot: &mut Option<S::Request<'_>>,
    failure: &mut Option<MoveFailure>,
) -> Option<S::Response> {
    let Some(handle) = object.typed::<T>() else {
        *failure = Some(MoveFailure::Mismatched);
        return None;
    };
    match cx.with(handle, |obj| slot.take().map(|r| S::serve(obj, r))) {
        Ok(Some(resp)) => Some(resp),
        Ok(None) => {
            *failure = Some(MoveFailure::Taken);
            None
        }
        Err(e) => {
            *failure = Some(MoveFailure::Access(e));
            None
        }
    }
}

/// Waits between retries of a call refused with `InUse`: a few yields, then sleeps doubling from
/// 10 us to 1 ms. Returns `false` once `deadline` has passed.
///
/// The wait runs with the caller's contexts released (`suspended`), as the design says of `InUse`
/// (leave, wait, retry): the call chain that has the object borrowed may need one of them to
/// finish, for example the caller's own context when the object lives there.
struct Retry {
    attempt: u32,
    deadline: Option<Instant>,
    /// When the waits began to close a cycle (`context_core::waits`), and when one last did. A
    /// cycle can be a moment old (its other side has just got its object and will find so at its
    /// next attempt), so only cycles seen for [`DEADLOCK_CONFIRM`] are reported, and a stretch of
    /// [`CYCLE_GONE`] without one starts the count again.
    cycle: Option<(Instant, Instant)>,
}

/// How long waits must keep closing a cycle before the call fails with `Deadlock`: far more than a
/// retry's longest sleep (about 1 ms) plus a scheduling delay on a loaded machine.
const DEADLOCK_CONFIRM: Duration = Duration::from_millis(50);

/// A wait that finds no cycle this long after the last one that did forgets the earlier ones.
/// (The other side's edge is absent while it makes an attempt, so one miss proves nothing.)
const CYCLE_GONE: Duration = Duration::from_millis(10);

impl Retry {
    fn new(timeout: Option<Duration>) -> Self {
        Self {
            attempt: 0,
            deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
            cycle: None,
        }
    }

    fn wait(&mut self, id: context_core::ContextId) -> Result<bool, CallError> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            context_core::waits::end_wait();
            return Ok(false);
        }
        // A cycle: the object's borrower waits, through any chain of waits, for this caller.
        let now = Instant::now();
        if context_core::waits::begin_wait().is_err() {
            let (first, last) = self.cycle.get_or_insert((now, now));
            *last = now;
            if now.duration_since(*first) >= DEADLOCK_CONFIRM {
                self.cycle = None;
                return Err(CallError::Deadlock(id));
            }
        } else if self
            .cycle
            .is_some_and(|(_, last)| now.duration_since(last) > CYCLE_GONE)
        {
            self.cycle = None;
        }
        self.attempt = self.attempt.saturating_add(1);
        let attempt = self.attempt;
        let slept = context_core::suspended(|| {
            if attempt <= 8 {
                std::thread::yield_now();
            } else {
                let shift = (attempt - 8).min(7);
                std::thread::sleep(Duration::from_micros(10 << shift));
            }
        });
        // The wait is over: while the next attempt runs (and, if it gets the object, the method),
        // this chain waits for nobody.
        context_core::waits::end_wait();
        slept?;
        Ok(true)
    }

    /// The time left for one attempt, for `enter_timeout`.
    fn left(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// Decodes a reply frame for a request sent with `service` to `object`.
///
/// `object` is taken by reference, read from the proxy itself: a by-value copy made just before
/// the call was stored as two 4-byte words and compared as one 8-byte word, a store-forwarding
/// stall of several nanoseconds on every call. Always inlined: out of line, its `Result` came
/// back through memory and was copied at once with wider loads than its stores (perf put a fifth
/// of the calling function's samples on that copy).
#[inline(always)]
fn decode_reply<C: Codec, R: serde::de::DeserializeOwned>(
    reply: &[u8],
    service: u64,
    object: &ObjectId,
) -> Result<R, CallError> {
    // The common case first, the kind checked with magic and version in one compare: a reply.
    if let Ok((h, body)) = frame::parse_kind(reply, C::LIMIT, FrameKind::Reply) {
        if h.service != service || !same_object(&h.object, object) {
            return Err(FrameError::Mismatched.into());
        }
        return Ok(C::decode(body)?);
    }
    decode_other_reply::<C, R>(reply, service, object)
}

/// [`decode_reply`] for a frame that is not a well-formed reply: an error frame, or the error
/// that rejects the frame.
#[cold]
#[inline(never)]
fn decode_other_reply<C: Codec, R: serde::de::DeserializeOwned>(
    reply: &[u8],
    service: u64,
    object: &ObjectId,
) -> Result<R, CallError> {
    let (h, body) = frame::parse(reply, C::LIMIT)?;
    if h.service != service || !same_object(&h.object, object) {
        // Error frames for requests too broken to read carry a zero object; accept those.
        if !(h.kind == FrameKind::Error && h.object.context == 0) {
            return Err(FrameError::Mismatched.into());
        }
    }
    match h.kind {
        FrameKind::Reply => Ok(C::decode(body)?),
        FrameKind::Error => Err(C::decode::<WireError>(body)?.into_call()),
        FrameKind::Request => Err(FrameError::UnexpectedKind {
            expected: FrameKind::Reply,
            found: h.kind,
        }
        .into()),
    }
}

/// `a == b`, with slot and generation compared as one 8-byte word: the derived comparison
/// became vector instructions, about ten more per call.
#[inline(always)]
fn same_object(a: &ObjectId, b: &ObjectId) -> bool {
    let tail = |o: &ObjectId| u64::from(o.slot) | u64::from(o.generation) << 32;
    a.context == b.context && tail(a) == tail(b)
}

// ---------------------------------------------------------------------------------------------
// The proxy.

enum Route<S: Service> {
    /// An in-process target, reached through [`InProcess`] (statically dispatched).
    Local {
        transport: InProcess,
        mover: MoveFn<S>,
        plain: Option<PlainAccess>,
    },
    /// Any other transport.
    Remote(Arc<dyn Transport>),
}

impl<S: Service> Clone for Route<S> {
    fn clone(&self) -> Self {
        match self {
            Self::Local {
                transport,
                mover,
                plain,
            } => Self::Local {
                transport: transport.clone(),
                mover: *mover,
                plain: *plain,
            },
            Self::Remote(t) => Self::Remote(Arc::clone(t)),
        }
    }
}

/// How arguments and results travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Encode, copy through a frame, decode (the default): the target never sees the caller's memory.
    Serialize,
    /// Move the request value into the target and the response value back, without encoding
    /// (in-process targets only; values must be `Send`, which the service types are).
    Move,
}

/// A typed name for an object in a context, through which its service's methods are called.
///
/// `Proxy` is `Clone + Send + Sync` and can be called from any thread, inside a context or in none.
/// A call performs the whole protocol: encode the request into a frame, release the caller's
/// context, enter the target (on the calling thread when idle; in FIFO order when busy; on the home
/// thread for a pinned context), check and decode the frame, run the method, encode the reply,
/// leave, re-enter the caller's context, decode the reply.
///
/// `C` is the [`Codec`]; swap it in one line (`Proxy<S, Postcard>`).
pub struct Proxy<S: Service, C: Codec = Bincode> {
    route: Route<S>,
    object: ObjectId,
    mode: Mode,
    timeout: Option<Duration>,
    _marker: PhantomData<fn() -> C>,
}

impl<S: Service, C: Codec> Clone for Proxy<S, C> {
    fn clone(&self) -> Self {
        Self {
            route: self.route.clone(),
            object: self.object,
            mode: self.mode,
            timeout: self.timeout,
            _marker: PhantomData,
        }
    }
}

impl<S: Service, C: Codec> fmt::Debug for Proxy<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Proxy");
        d.field("service", &S::NAME)
            .field("codec", &C::NAME)
            .field("object", &self.object)
            .field("mode", &self.mode);
        match &self.route {
            Route::Local { transport, .. } => d.field("context", transport.context()),
            Route::Remote(_) => d.field("context", &"<remote>"),
        };
        d.finish()
    }
}

impl<S: Service, C: Codec> Proxy<S, C> {
    /// A proxy for the object `handle` names in `ctx`.
    ///
    /// # Errors
    /// [`CallError::WrongContext`] if the handle belongs to another context. A handle of the wrong
    /// type cannot be passed (`S: Serve<T>`); a stale one gives [`CallError::Removed`] on each call.
    pub fn new<T: 'static>(ctx: &Context, handle: Handle<T>) -> Result<Self, CallError>
    where
        S: Serve<T>,
    {
        if handle.context() != ctx.id() {
            return Err(CallError::WrongContext {
                handle: handle.context(),
                context: ctx.id(),
            });
        }
        let transport = InProcess::new(ctx.clone(), serve_frame::<S, T, C> as ServeFn);
        let mover: MoveFn<S> = serve_moved::<S, T>;
        Ok(Self {
            route: Route::Local {
                transport,
                mover,
                plain: <S as Serve<T>>::plain_access(),
            },
            object: ObjectId::of(handle),
            mode: Mode::Serialize,
            timeout: None,
            _marker: PhantomData,
        })
    }

    /// Moves `value` into `ctx` and returns a proxy for it.
    ///
    /// # Errors
    /// Entering `ctx` failed (closed, ...), or its table is full.
    pub fn adopt<T: Send + 'static>(ctx: &Context, value: T) -> Result<Self, CallError>
    where
        S: Serve<T>,
    {
        let handle = ctx
            .enter(|cx| cx.adopt(value))?
            .map_err(|e| CallError::from_access(e, S::NAME))?;
        Self::new(ctx, handle)
    }

    /// Builds a value that is not `Send` on a pinned context's home thread, adopts it there and
    /// returns a proxy for it (e.g. an interpreter state).
    ///
    /// # Errors
    /// As for [`Proxy::adopt`]; `ctx` must be pinned.
    pub fn adopt_local<T: 'static>(
        ctx: &Context,
        make: impl FnOnce() -> T + Send,
    ) -> Result<Self, CallError>
    where
        S: Serve<T>,
    {
        let handle = ctx
            .enter(|cx| cx.adopt_local(make()))?
            .map_err(|e| CallError::from_access(e, S::NAME))?;
        Self::new(ctx, handle)
    }

    /// A proxy whose frames go through `transport` (e.g. to another process) to `object`, which the
    /// far side serves with [`Exports::serve`].
    #[must_use]
    pub fn over(transport: Arc<dyn Transport>, object: ObjectId) -> Self {
        Self {
            route: Route::Remote(transport),
            object,
            mode: Mode::Serialize,
            timeout: None,
            _marker: PhantomData,
        }
    }

    /// The same proxy with a timeout on waiting for the target (a call that has started runs to its
    /// end). A call whose object turns out to be in use by another call chain retries until the
    /// timeout, counted from that first refusal: such a call can take up to about twice the
    /// timeout, and the common call reads no clock.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The same proxy in another marshalling [`Mode`].
    ///
    /// # Errors
    /// [`CallError::Unsupported`] for [`Mode::Move`] on a proxy that goes through another transport.
    pub fn with_mode(mut self, mode: Mode) -> Result<Self, CallError> {
        if mode == Mode::Move && matches!(self.route, Route::Remote(_)) {
            return Err(CallError::Unsupported(
                "move mode needs an in-process target",
            ));
        }
        self.mode = mode;
        Ok(self)
    }

    /// The marshalling mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The target context, for an in-process proxy.
    #[must_use]
    pub fn context(&self) -> Option<&Context> {
        match &self.route {
            Route::Local { transport, .. } => Some(transport.context()),
            Route::Remote(_) => None,
        }
    }

    /// The object's wire name.
    #[must_use]
    pub fn object(&self) -> ObjectId {
        self.object
    }

    /// The object's handle, typed as the caller asks (using it with another type gives an error).
    #[must_use]
    pub fn handle<T: 'static>(&self) -> Option<Handle<T>> {
        self.object.typed()
    }

    pub(crate) fn plain(&self) -> Option<(&Context, PlainAccess)> {
        match &self.route {
            Route::Local {
                transport,
                plain: Some(p),
                ..
            } => Some((transport.context(), *p)),
            _ => None,
        }
    }

    /// Calls the object: sends one request, returns its response.
    ///
    /// # Errors
    /// Every [`CallError`] variant that applies: the target closed, the object removed, wrong
    /// service, a bad frame, the method panicked, the timeout passed, ...
    #[inline]
    pub fn call(&self, request: S::Request<'_>) -> Result<S::Response, CallError> {
        self.call_pick(&mut Some(request), Some)
    }

    /// [`Proxy::call`] with the request built in `slot` by the caller, the response returned as an
    /// `Option` and a failure written to `error` (then `None` is returned). Kept for callers of
    /// earlier versions; generated clients use [`Proxy::call_pick`]. Not meant to be called by
    /// hand.
    #[doc(hidden)]
    #[inline]
    pub fn call_split(
        &self,
        slot: &mut Option<S::Request<'_>>,
        error: &mut Option<CallError>,
    ) -> Option<S::Response> {
        match self.call_pick(slot, Some) {
            Ok(response) => Some(response),
            Err(e) => fail(error, e),
        }
    }

    /// [`Proxy::call`] in the form generated clients (`counter.add(5)?`) use: the request is built
    /// in `slot` by the caller, and `pick` takes the method's result out of the response (`None`:
    /// a response to another method, [`CallError::UnexpectedResponse`]). Not meant to be called by
    /// hand.
    ///
    /// Why this shape, in a call that costs a few tens of nanoseconds: a request passed by value
    /// was copied through the call's layers, and a `Result<Response, CallError>` returned by a
    /// function that was not inlined went back through memory and was copied again; each copy
    /// that reads fresh stores back at another width stalls on store forwarding, several
    /// nanoseconds each. Built in place, the request is read by the target only after the
    /// lock's atomic instruction has drained the stores that built it (in move mode it is taken
    /// out of the slot only then, and stays there if the call did not run). Every path builds
    /// the client's own `Result<R, CallError>` where it ends, so the common one writes the result
    /// once, straight into the client's return slot (an `Option<CallError>` out-parameter, the
    /// previous shape, had to be initialised and then tested for a drop on every call).
    #[doc(hidden)]
    #[inline]
    pub fn call_pick<R>(
        &self,
        slot: &mut Option<S::Request<'_>>,
        pick: impl FnOnce(S::Response) -> Option<R>,
    ) -> Result<R, CallError> {
        match (&self.route, self.mode) {
            (
                Route::Local {
                    transport, mover, ..
                },
                Mode::Move,
            ) => self.call_moved(transport, *mover, slot, pick),
            (Route::Local { transport, .. }, Mode::Serialize) => match slot {
                Some(request) => self.call_framed(transport, request, pick),
                None => Err(CallError::UnexpectedResponse),
            },
            (Route::Remote(t), _) => match slot {
                Some(request) => self.call_framed(&**t, request, pick),
                None => Err(CallError::UnexpectedResponse),
            },
        }
    }

    /// Move mode: one `enter` whose closure holds a single pointer, to the call's state on this
    /// stack (a closure that captured the request or several references by value was copied
    /// from layer to layer of `enter`, with store-forwarding stalls).
    ///
    /// Only the common case is inlined: no timeout, and a first attempt that runs. Everything
    /// else (a timeout, a refusal, a failure, the retry loop) is [`Proxy::call_moved_rest`], out
    /// of line, so the caller carries no retry state, and its frame and register pressure stay
    /// small.
    #[inline]
    fn call_moved<R>(
        &self,
        transport: &InProcess,
        mover: MoveFn<S>,
        slot: &mut Option<S::Request<'_>>,
        pick: impl FnOnce(S::Response) -> Option<R>,
    ) -> Result<R, CallError> {
        if self.timeout.is_some() {
            return self
                .call_moved_rest(transport, mover, slot, None)
                .and_then(|r| picked(r, pick));
        }
        let mut state = MoveCall::<'_, '_, S> {
            mover,
            object: &self.object,
            slot: &mut *slot,
            failure: None,
        };
        let st = &mut state;
        let run =
            move |cx: &mut Cx<'_>| (st.mover)(cx.reborrow(), st.object, st.slot, &mut st.failure);
        match transport.ctx.enter(run) {
            Ok(Some(response)) => picked(response, pick),
            Ok(None) => {
                let failure = state.failure.take();
                self.call_moved_rest(transport, mover, slot, Some(Ok(failure)))
                    .and_then(|r| picked(r, pick))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// [`Proxy::call_moved`] past its common case. `first` is the outcome of a first attempt
    /// made without a timeout (`Ok` with the failure the mover reported, or the enter error);
    /// `None` when no attempt was made yet (the proxy has a timeout). A borrow refused with
    /// `InUse` goes to the retry loop, the request still in its slot.
    #[cold]
    #[inline(never)]
    fn call_moved_rest(
        &self,
        transport: &InProcess,
        mover: MoveFn<S>,
        slot: &mut Option<S::Request<'_>>,
        first: Option<Result<Option<MoveFailure>, context_core::EnterError>>,
    ) -> Result<S::Response, CallError> {
        // Set at the first refusal: the timeout for waiting on the object counts from there.
        let mut retry: Option<Retry> = None;
        let mut outcome = first;
        loop {
            let failure = match outcome.take() {
                Some(Ok(failure)) => failure,
                Some(Err(e)) => return Err(e.into()),
                None => {
                    let mut state = MoveCall::<'_, '_, S> {
                        mover,
                        object: &self.object,
                        slot: &mut *slot,
                        failure: None,
                    };
                    let st = &mut state;
                    let run = move |cx: &mut Cx<'_>| {
                        (st.mover)(cx.reborrow(), st.object, st.slot, &mut st.failure)
                    };
                    // The first attempt waits with the proxy's timeout as it is.
                    let wait = match &retry {
                        None => self.timeout,
                        Some(r) => r.left(),
                    };
                    let entered = match wait {
                        None => transport.ctx.enter(run),
                        Some(t) => transport.ctx.enter_timeout(t, run),
                    };
                    match entered {
                        Ok(Some(response)) => return Ok(response),
                        Ok(None) => state.failure.take(),
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let id = match failure {
                Some(f) => match f.in_use() {
                    Some(id) if slot.is_some() => id,
                    _ => return Err(f.into_call::<S>()),
                },
                None => return Err(CallError::UnexpectedResponse),
            };
            // Refused: another call chain has the object borrowed. Wait and retry.
            if !retry
                .get_or_insert_with(|| Retry::new(self.timeout))
                .wait(id)?
            {
                return Err(CallError::InUse(id));
            }
        }
    }

    /// Serialize mode, in [`Proxy::call_pick`]'s shape: every path builds the final result where
    /// it ends (a `Result` built and then copied as a whole was read back with a
    /// store-forwarding stall).
    #[inline]
    fn call_framed<X: Transport + ?Sized, R>(
        &self,
        transport: &X,
        request: &S::Request<'_>,
        pick: impl FnOnce(S::Response) -> Option<R>,
    ) -> Result<R, CallError> {
        let mut bufs = Pooled::take();
        // The buffers go back to the pool on every path before its result is built (a result
        // built first and returned after the give-back was copied through memory).
        if let Err(e) = frame::encode::<C, _>(
            &mut bufs.req,
            FrameKind::Request,
            S::ID,
            self.object,
            request,
        ) {
            Pooled::give_back_out_of_line(bufs);
            return Err(e.into());
        }
        // The common case: one round trip, with the proxy's timeout as it is (no clock read
        // here; the transport reads one only if it has to wait).
        if let Err(e) = transport.round_trip(&bufs.req, &mut bufs.rep, self.timeout) {
            Pooled::give_back_out_of_line(bufs);
            return Err(e);
        }
        match decode_reply::<C, S::Response>(&bufs.rep, S::ID, &self.object) {
            Ok(response) => {
                Pooled::give_back(bufs);
                picked(response, pick)
            }
            Err(CallError::InUse(id)) => {
                let Bufs { req, rep } = &mut *bufs;
                let retried = self.call_framed_retrying(transport, req, rep, Some(id));
                Pooled::give_back_out_of_line(bufs);
                retried.and_then(|r| picked(r, pick))
            }
            Err(e) => {
                Pooled::give_back_out_of_line(bufs);
                Err(e)
            }
        }
    }

    /// The round trip repeated while the object is in use by another call chain, until the
    /// proxy's timeout.
    #[inline(never)]
    fn call_framed_retrying<X: Transport + ?Sized>(
        &self,
        transport: &X,
        req: &[u8],
        rep: &mut Vec<u8>,
        refused: Option<context_core::ContextId>,
    ) -> Result<S::Response, CallError> {
        let mut retry = Retry::new(self.timeout);
        // A first attempt was refused: wait before the next.
        if let Some(id) = refused {
            if !retry.wait(id)? {
                return Err(CallError::InUse(id));
            }
        }
        loop {
            transport.round_trip(req, rep, retry.left().or(self.timeout))?;
            match decode_reply::<C, S::Response>(rep, S::ID, &self.object) {
                Err(CallError::InUse(id)) => {
                    if !retry.wait(id)? {
                        return Err(CallError::InUse(id));
                    }
                }
                other => return other,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Exports: the serving side for transports other than the in-process one.

/// The objects a context serves to transports: what the far end of a cross-process channel
/// consults to answer a frame. Maps each exported object to the serve function of its service,
/// object type and codec.
pub struct Exports<C: Codec = Bincode> {
    /// Sorted by [`object_key`], looked up by binary search: a SipHash map cost about 270
    /// instructions per served call, a third of the server's own work on a small call. Keys come
    /// from the wire but are only looked up, never inserted, so no hash flooding to defend against.
    objects: Vec<(ObjectId, ServeFn)>,
    _codec: PhantomData<fn() -> C>,
}

/// The order [`Exports`] keeps its objects in.
#[inline]
fn object_key(o: &ObjectId) -> (u64, u32, u32) {
    (o.context, o.slot, o.generation)
}

impl<C: Codec> Default for Exports<C> {
    fn default() -> Self {
        Self {
            objects: Vec::new(),
            _codec: PhantomData,
        }
    }
}

impl<C: Codec> fmt::Debug for Exports<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exports")
            .field("objects", &self.objects.len())
            .finish()
    }
}

impl<C: Codec> Exports<C> {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Exports the object `handle` names as service `S`. Returns its wire name.
    pub fn export<S: Serve<T>, T: 'static>(&mut self, handle: Handle<T>) -> ObjectId {
        let id = ObjectId::of(handle);
        let serve = serve_frame::<S, T, C> as ServeFn;
        match self.find(&id) {
            Ok(i) => self.objects[i].1 = serve,
            Err(i) => self.objects.insert(i, (id, serve)),
        }
        id
    }

    /// Stops serving an object. Returns whether it was exported.
    pub fn unexport(&mut self, object: ObjectId) -> bool {
        match self.find(&object) {
            Ok(i) => {
                self.objects.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Where `object` is (`Ok`) or would go (`Err`).
    #[inline]
    fn find(&self, object: &ObjectId) -> Result<usize, usize> {
        let key = object_key(object);
        self.objects
            .binary_search_by(|(o, _)| object_key(o).cmp(&key))
    }

    /// Writes an error frame answering `request` into `reply`: for a server whose `enter` around
    /// [`Exports::serve`] failed (the method panicked, the context closed, ...), so the caller gets
    /// the typed error rather than a broken reply.
    pub fn error_reply(&self, request: &[u8], error: &CallError, reply: &mut Vec<u8>) {
        let (service, object) = echoed(frame::parse(request, usize::MAX));
        write_error::<C>(reply, service, object, error);
    }

    /// Answers one request frame, holding the context `cx` of the exported objects: writes a reply
    /// or error frame into `reply`. Never panics on any input (a method that panics unwinds to the
    /// caller's `enter`, as usual).
    pub fn serve(&self, cx: &Cx<'_>, request: &[u8], reply: &mut Vec<u8>) {
        // The full checks happen in the serve function; here only enough to route the frame. The
        // limit is checked again there against the codec's own.
        match frame::parse_kind(request, usize::MAX, FrameKind::Request) {
            Ok((h, _)) => match self.find(&h.object) {
                Ok(i) => (self.objects[i].1)(cx, request, reply),
                Err(_) => {
                    let e = match context_core::ContextId::from_raw(h.object.context) {
                        Some(c) => CallError::Removed(c),
                        None => CallError::Frame(FrameError::Mismatched),
                    };
                    write_error::<C>(reply, h.service, h.object, &e);
                }
            },
            Err(e) => write_error::<C>(
                reply,
                0,
                ObjectId {
                    context: 0,
                    slot: 0,
                    generation: 0,
                },
                &e.into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The call protocol on one thread, small enough for Miri.
    use context_core::Context;

    use crate::{Buffer, BufferService, CallError, Exports, Mode, Proxy, copy, frame, service};

    #[service]
    pub(crate) trait Echo {
        /// Returns the string and a number.
        fn echo(&mut self, n: u64, s: &str) -> (u64, String);
    }

    struct E(u64);
    impl Echo for E {
        fn echo(&mut self, n: u64, s: &str) -> (u64, String) {
            self.0 += n;
            (self.0, s.to_owned())
        }
    }

    #[test]
    fn serialized_move_nested_and_exported_calls() {
        let (a, b) = (Context::new("a"), Context::new("b"));
        let p: Proxy<EchoService> = Proxy::adopt(&b, E(0)).unwrap();
        assert_eq!(p.echo(2, "hi").unwrap(), (2, "hi".to_owned()));
        let m = p.clone().with_mode(Mode::Move).unwrap();
        assert_eq!(m.echo(3, "mv").unwrap(), (5, "mv".to_owned()));
        let p2 = p.clone();
        assert_eq!(
            a.enter(move |_| p2.echo(1, "nested")).unwrap().unwrap().0,
            6
        );

        let h = p.handle::<E>().unwrap();
        let mut ex: Exports = Exports::new();
        let id = ex.export::<EchoService, E>(h);
        assert_eq!(serve_echo(&ex, &b, id).unwrap(), 7);
        let mut req = echo_request(id, "x");
        req[3] = 77;
        let rep = serve_raw(&ex, &b, &req);
        let e = super::decode_reply::<crate::Bincode, EchoResponse>(
            &rep,
            0,
            &frame::ObjectId {
                context: 0,
                slot: 0,
                generation: 0,
            },
        );
        assert!(matches!(
            e,
            Err(CallError::Frame(frame::FrameError::UnknownKind(77)))
        ));
    }

    /// A request frame for `echo(1, s)` on `id`.
    fn echo_request(id: frame::ObjectId, s: &str) -> Vec<u8> {
        let mut req = Vec::new();
        frame::encode::<crate::Bincode, _>(
            &mut req,
            frame::FrameKind::Request,
            <EchoService as crate::Service>::ID,
            id,
            &EchoRequest::Echo { n: 1, s },
        )
        .unwrap();
        req
    }

    /// The reply frame `ex` writes for `req`, served inside `ctx`.
    fn serve_raw(ex: &Exports, ctx: &Context, req: &[u8]) -> Vec<u8> {
        let mut rep = Vec::new();
        ctx.enter(|cx| ex.serve(cx, req, &mut rep)).unwrap();
        rep
    }

    /// Serves one echo request for `id` through `ex` and decodes the answer.
    fn serve_echo(ex: &Exports, ctx: &Context, id: frame::ObjectId) -> Result<u64, CallError> {
        let rep = serve_raw(ex, ctx, &echo_request(id, "x"));
        super::decode_reply::<crate::Bincode, EchoResponse>(
            &rep,
            <EchoService as crate::Service>::ID,
            &id,
        )
        .map(|EchoResponse::Echo((n, _))| n)
    }

    #[test]
    fn exports_find_every_object_and_forget_unexported_ones() {
        let b = Context::new("b");
        let mut ex: Exports = Exports::new();
        // Adopted in an order that does not match the table's sort order (several slots).
        let ids: Vec<_> = (0..5)
            .map(|i| {
                let p: Proxy<EchoService> = Proxy::adopt(&b, E(i * 100)).unwrap();
                ex.export::<EchoService, E>(p.handle::<E>().unwrap())
            })
            .rev()
            .collect();
        for (k, &id) in ids.iter().enumerate() {
            assert_eq!(serve_echo(&ex, &b, id).unwrap(), (4 - k as u64) * 100 + 1);
        }
        assert!(ex.unexport(ids[2]));
        assert!(!ex.unexport(ids[2]), "already gone");
        assert!(matches!(
            serve_echo(&ex, &b, ids[2]),
            Err(CallError::Removed(_))
        ));
        assert_eq!(serve_echo(&ex, &b, ids[0]).unwrap(), 402);
        // Exporting again (twice: the second replaces the first) serves it again.
        let h = ids[2].typed::<E>().unwrap();
        assert_eq!(ex.export::<EchoService, E>(h), ids[2]);
        assert_eq!(ex.export::<EchoService, E>(h), ids[2]);
        assert_eq!(serve_echo(&ex, &b, ids[2]).unwrap(), 202);
        assert!(format!("{ex:?}").contains("objects: 5"));
    }

    #[test]
    fn strings_are_checked_utf8_on_the_fast_path_and_off_it() {
        let b = Context::new("b");
        let p: Proxy<EchoService> = Proxy::adopt(&b, E(0)).unwrap();
        // Non-ASCII takes the full check.
        assert_eq!(p.echo(1, "gr\u{fc}\u{df}e").unwrap().1, "gr\u{fc}\u{df}e");
        let h = p.handle::<E>().unwrap();
        let mut ex: Exports = Exports::new();
        let id = ex.export::<EchoService, E>(h);
        for bad in [&b"\xffabcdefgh"[..], b"abcdefgh\xc3"] {
            let mut req = echo_request(id, &"x".repeat(bad.len()));
            let at = req.len() - bad.len();
            req[at..].copy_from_slice(bad);
            let rep = serve_raw(&ex, &b, &req);
            let r = super::decode_reply::<crate::Bincode, EchoResponse>(
                &rep,
                <EchoService as crate::Service>::ID,
                &id,
            );
            assert!(matches!(r, Err(CallError::Codec(_))), "{r:?}");
        }
    }

    #[test]
    fn cheat_copy_between_two_contexts() {
        let (a, b) = (Context::new("a"), Context::new("b"));
        let s: Proxy<BufferService<u16>> =
            Proxy::adopt(&a, Buffer::from(vec![1u16, 2, 3])).unwrap();
        let d: Proxy<BufferService<u16>> = Proxy::adopt(&b, Buffer::<u16>::zeroed(3)).unwrap();
        copy(&s, 1..3, &d, 0).unwrap();
        assert_eq!(d.read(0..3).unwrap(), [2, 3, 0]);
        copy(&s, 0..2, &s, 1).unwrap();
        assert_eq!(s.read(0..3).unwrap(), [1, 1, 2]);
    }
}
