//! The calling side: a [`Transport`] over one channel endpoint, shared by any number of threads.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use context_core::ContextId;
use context_shmem::{Channel, ChannelError, Endpoint, Segment, Side};

use super::wire::{Export, Hello, SEQ_LEN, TableCodec, split_seq};
use super::{XprocError, handshake_io};
use crate::codec::{Bincode, Codec, DEFAULT_LIMIT};
use crate::error::CallError;
use crate::frame::{self, FrameError, HEADER_LEN};
use crate::proxy::Proxy;
use crate::service::Service;
use crate::transport::Transport;

/// Settings of the calling side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// How long attaching waits for the server's export table (and, over a socket, for the
    /// connection and for the channel's descriptor: each step gets the whole timeout, so
    /// [`Client::connect`] may take up to about three times it).
    pub handshake_timeout: Duration,
    /// The timeout given to proxies made by [`Client::proxy`]. It applies to waiting for the call's
    /// turn on the channel and again to the exchange with the server (sending, then waiting for
    /// the answer), so a call may take up to about twice it, more if the object is `InUse` and
    /// retried. `None`: calls wait as long as the server lives (a dead or departed server is still
    /// detected). Default: 30 s.
    pub call_timeout: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            call_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Why a channel became unusable for good. Later calls fail at once with the same cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFailure {
    /// The server process died (its liveness token no longer names a running process).
    PeerDead {
        /// The dead server's pid.
        pid: u32,
    },
    /// The server stopped serving and closed its end.
    Closed,
    /// The server broke the protocol or the shared ring state is inconsistent.
    Corrupt(&'static str),
}

impl std::fmt::Display for LinkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PeerDead { pid } => write!(f, "the server process (pid {pid}) died"),
            Self::Closed => f.write_str("the server closed the channel"),
            Self::Corrupt(what) => write!(f, "the channel is corrupt: {what}"),
        }
    }
}

/// Why one exchange on the lane failed (turned into a [`CallError`] by the link).
enum LaneError {
    TimedOut,
    TooLarge { len: usize, max: usize },
    ShortReply(usize),
    Failed(LinkFailure),
}

/// The channel endpoint and the sequence numbers (no buffers of its own: requests go from the
/// caller's buffer into the ring, replies from the ring into the caller's). Lives in the link's
/// mutex, which orders the callers (see [`Link::lane`]).
struct Lane {
    ep: Endpoint,
    /// Sequence number of the next request (the export table was 0).
    next_seq: u64,
    /// Set once the link is unusable for good.
    failed: Option<LinkFailure>,
    /// When the lane was made: a deadline certainly in the past (see [`Deadline`]).
    epoch: Instant,
}

/// The deadline of one exchange, read from the clock only if a wait needs it: the first waits use
/// the lane's `epoch` (in the past), so the channel spins and polls as usual but gives up instead
/// of sleeping; only then is the clock read and the real deadline set. The common call, whose
/// answer arrives while the channel spins, reads no clock (a clock read costs about a tenth of a
/// whole call). The timeout thus runs from the end of the first spin, a few microseconds late.
struct Deadline {
    timeout: Option<Duration>,
    at: Option<Instant>,
    real: bool,
}

impl Deadline {
    fn new(timeout: Option<Duration>, epoch: Instant) -> Self {
        Self {
            timeout,
            at: timeout.map(|_| epoch),
            real: timeout.is_none(),
        }
    }

    /// After a wait timed out: `true` if that was the provisional deadline (now replaced by the
    /// real one: wait again), `false` if the real one passed.
    fn renew(&mut self) -> bool {
        if self.real {
            return false;
        }
        self.real = true;
        self.at = self.timeout.and_then(|t| Instant::now().checked_add(t));
        true
    }

    /// Whether the exchange is out of time, for a loop that makes progress without waiting (late
    /// answers arriving back to back): starts the real deadline if it was not started yet, and
    /// reads the clock.
    fn passed(&mut self) -> bool {
        if self.timeout.is_none() {
            return false;
        }
        if !self.real {
            self.renew();
            return false;
        }
        self.at.is_some_and(|d| Instant::now() >= d)
    }
}

/// The largest reply message a client accepts from proxies whose codec limit is `limit`: a frame
/// header, the body and the sequence number.
fn reply_bound(limit: usize) -> usize {
    limit.saturating_add(HEADER_LEN + SEQ_LEN)
}

impl Lane {
    fn fail(&mut self, e: ChannelError) -> LaneError {
        let f = match e {
            ChannelError::TimedOut => return LaneError::TimedOut,
            ChannelError::PeerDead { pid } => LinkFailure::PeerDead { pid },
            ChannelError::Closed => LinkFailure::Closed,
            ChannelError::FrameTooLarge { len, max } => {
                return LaneError::TooLarge { len, max };
            }
            ChannelError::Corrupt(what) => LinkFailure::Corrupt(what),
            // Not produced by send/recv on an attached endpoint (buffer growth is handled by the
            // caller); treated as a broken link rather than a panic.
            _ => LinkFailure::Corrupt("unexpected channel error"),
        };
        self.failed = Some(f);
        LaneError::Failed(f)
    }

    /// Receives one message into `reply` (replacing its contents). Returns its length.
    fn recv(
        &mut self,
        reply: &mut Vec<u8>,
        max: usize,
        deadline: &mut Deadline,
    ) -> Result<usize, LaneError> {
        loop {
            reply.clear();
            match self.ep.recv_append_max(reply, max, deadline.at) {
                Ok(n) => return Ok(n),
                Err(ChannelError::TimedOut) if deadline.renew() => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// One exchange: sends `request` with the next sequence number, then reads messages until the
    /// one answering it, discarding late answers to callers that gave up. The request goes from
    /// the caller's buffer straight into the ring (the number appended on the way), and the answer
    /// straight from the ring into `reply`, whose tail (the number) is then cut off: one copy each
    /// way.
    fn call(
        &mut self,
        request: &[u8],
        reply: &mut Vec<u8>,
        timeout: Option<Duration>,
        max_reply: usize,
        discarded: &AtomicU64,
    ) -> Result<(), LaneError> {
        if let Some(f) = self.failed {
            return Err(LaneError::Failed(f));
        }
        let max = self.ep.max_frame();
        if request.len() > max - SEQ_LEN {
            return Err(LaneError::TooLarge {
                len: request.len(),
                max: max - SEQ_LEN,
            });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let number = seq.to_le_bytes();
        let mut deadline = Deadline::new(timeout, self.epoch);
        loop {
            match self.ep.send_parts(&[request, &number], deadline.at) {
                Ok(()) => break,
                Err(ChannelError::TimedOut) if deadline.renew() => {}
                Err(e) => return Err(self.fail(e)),
            }
        }
        loop {
            let n = self.recv(reply, max_reply, &mut deadline)?;
            let Some((frame, got)) = split_seq(reply) else {
                // A message too short to be numbered cannot be matched to a caller; the stream
                // itself is intact (messages are delimited by the channel).
                return Err(LaneError::ShortReply(n));
            };
            if got == seq {
                let len = frame.len();
                reply.truncate(len);
                return Ok(());
            }
            if got < seq {
                // The late answer to a caller that timed out: nobody waits for it any more.
                discarded.fetch_add(1, Ordering::Relaxed);
                // Late answers that keep coming (a misbehaving server, say) find the ring never
                // empty, so no receive waits and times out: check the deadline here.
                if deadline.passed() {
                    return Err(LaneError::TimedOut);
                }
                continue;
            }
            let f = LinkFailure::Corrupt("the server answered a request that was never sent");
            self.failed = Some(f);
            return Err(LaneError::Failed(f));
        }
    }
}

/// The shared state behind a [`Client`] and every proxy made from it.
struct Link {
    /// The channel, one caller at a time. Always released with `unlock_fair`, which hands the lock
    /// straight to the longest-waiting caller (parking_lot queues waiters in arrival order), so a
    /// caller that arrives while others wait cannot barge past them. Callers take it holding no
    /// context ([`context_core::suspended`]): the caller's own context is free for the duration of
    /// the call, exactly as during an in-process call.
    lane: Mutex<Lane>,
    exports: Vec<Export>,
    codec: String,
    server_pid: u32,
    call_timeout: Option<Duration>,
    discarded: AtomicU64,
    /// The longest reply message accepted ([`Endpoint::recv_append_max`]); longer ones are
    /// dropped unread, so the server, which chose the ring's size, cannot make us allocate more.
    /// [`reply_bound`] of the default codec limit, raised by [`Client::proxy_with`] to that of
    /// the largest codec limit of the proxies made.
    max_reply: AtomicUsize,
    failure: OnceLock<LinkFailure>,
    /// The socket the channel came over, if it came over one: kept open for as long as the
    /// client and its proxies live, so that the server sees the client go when this closes
    /// (even if the client's process dies leaving the channel in any state).
    _socket: Option<UnixStream>,
}

/// An error about the target context named in the request frame's header (`make(target)`), for
/// errors that happen before the frame reaches it (timeouts, a closed channel); for a frame
/// without a valid header, a transport error saying `what`.
fn about_target(
    request: &[u8],
    make: impl FnOnce(ContextId) -> CallError,
    what: &str,
) -> CallError {
    frame::parse(request, usize::MAX)
        .ok()
        .and_then(|(h, _)| ContextId::from_raw(h.object.context))
        .map_or_else(
            || CallError::Transport(format!("{what} (the request has no valid frame header)")),
            make,
        )
}

impl Link {
    fn call_error(&self, e: LaneError, request: &[u8]) -> CallError {
        match e {
            LaneError::TimedOut => about_target(request, CallError::TimedOut, "timed out"),
            LaneError::TooLarge { len, max } => CallError::Frame(FrameError::TooLarge {
                len: len as u64,
                limit: max as u64,
            }),
            LaneError::ShortReply(n) => CallError::Frame(FrameError::Short(n)),
            LaneError::Failed(f) => {
                let _ = self.failure.set(f);
                match f {
                    LinkFailure::Closed => {
                        about_target(request, CallError::Closed, "the server closed the channel")
                    }
                    LinkFailure::PeerDead { pid } => CallError::PeerDead { pid },
                    other => CallError::Transport(other.to_string()),
                }
            }
        }
    }
}

impl Transport for Link {
    fn round_trip(
        &self,
        request: &[u8],
        reply: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(), CallError> {
        let exchanged = context_core::suspended(|| {
            let lane = match timeout {
                None => Some(self.lane.lock()),
                // An idle lane is taken without reading the clock; a busy one is waited for in
                // turn.
                Some(t) => self.lane.try_lock().or_else(|| self.lane.try_lock_for(t)),
            };
            let Some(mut lane) = lane else {
                return Err(LaneError::TimedOut);
            };
            let max = self.max_reply.load(Ordering::Relaxed);
            let r = lane.call(request, reply, timeout, max, &self.discarded);
            MutexGuard::unlock_fair(lane);
            r
        })?;
        exchanged.map_err(|e| self.call_error(e, request))
    }
}

/// The calling end of a cross-process channel: a [`Transport`] that any number of threads share,
/// and the server's table of exported objects.
///
/// Callers are served one at a time in arrival order: each call takes the channel's mutex (a
/// fair one: it is handed straight to the longest-waiting caller, so nobody barges past a waiting
/// caller), sends its request with the next sequence number and waits for the answer carrying that
/// number. A caller that times out simply leaves; the late answer is recognised by its number and
/// discarded by whoever reads next, so the stream never desynchronises. The caller's own context
/// is released for the duration of the call ([`context_core::suspended`]), as during an in-process
/// call (so other threads, or a server calling back, can use it meanwhile).
///
/// Cloning is cheap (a reference count); the channel closes when the client and every proxy made
/// from it are dropped.
#[derive(Clone)]
pub struct Client {
    link: Arc<Link>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server_pid", &self.link.server_pid)
            .field("codec", &self.link.codec)
            .field("exports", &self.link.exports.len())
            .field("failure", &self.link.failure.get())
            .finish()
    }
}

/// Connects a Unix stream socket to `path`, giving up after `timeout`: a listener that is alive
/// but does not accept (stalled, stopped, overloaded) has a full accept queue, and a plain
/// `connect` would then block for as long as that lasts. Linux applies the socket's send timeout
/// (`SO_SNDTIMEO`) to a Unix-domain connect and fails it with `EAGAIN` when it expires.
fn connect_within(path: &Path, timeout: Duration) -> Result<UnixStream, XprocError> {
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
    use nix::sys::time::{TimeVal, TimeValLike};

    let io = |source: Errno| XprocError::Io {
        op: "connecting to the server socket",
        source: source.into(),
    };
    let addr = UnixAddr::new(path).map_err(io)?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io)?;
    // At least 1 ms: a zero send timeout would mean "no timeout".
    let t = timeout.max(Duration::from_millis(1));
    let micros = i64::try_from(t.as_micros()).unwrap_or(i64::MAX);
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::microseconds(micros)).map_err(io)?;
    loop {
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => return Ok(UnixStream::from(fd)),
            // A Unix-domain connect either links the sockets or does not: retrying is safe.
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Err(XprocError::HandshakeTimedOut(timeout)),
            Err(e) => return Err(io(e)),
        }
    }
}

/// The longest first message (export table and sequence number) a client accepts.
const HELLO_MAX: usize = TableCodec::LIMIT + SEQ_LEN;

impl Client {
    /// Attaches side A of `channel` (created before a fork, or received from the server) and
    /// waits for the server's export table.
    ///
    /// # Errors
    /// [`XprocError::Channel`] if the side is taken or the server died or closed before
    /// answering; [`XprocError::HandshakeTimedOut`] if no table came within the handshake timeout;
    /// [`XprocError::Handshake`] for a malformed one.
    pub fn attach(channel: &Channel, options: &ClientOptions) -> Result<Self, XprocError> {
        let ep = channel.endpoint(Side::A)?;
        Self::finish(ep, options, None)
    }

    /// Connects to a [`super::Listener`] at `path`: receives the channel's sealed memfd over the
    /// socket (SCM_RIGHTS), attaches to it and reads the export table.
    ///
    /// # Errors
    /// [`XprocError::Io`] if nobody listens at `path`; [`XprocError::HandshakeTimedOut`] if the
    /// listener does not take the connection within the handshake timeout (it is stalled and its
    /// accept queue is full); and everything [`Client::handshake`] returns.
    pub fn connect(path: impl AsRef<Path>, options: &ClientOptions) -> Result<Self, XprocError> {
        let stream = connect_within(path.as_ref(), options.handshake_timeout)?;
        Self::handshake(&stream, options)
    }

    /// The client's half of the socket handshake on an already connected stream (for a
    /// socketpair shared with a child process, say): receives the channel's descriptor, attaches
    /// side A, acknowledges, and reads the export table. The client keeps a duplicate of the
    /// stream open while it and its proxies live: the server ends its loop when it closes.
    ///
    /// # Errors
    /// [`XprocError::Shmem`] if no sealed channel segment arrives, [`XprocError::Io`] if the
    /// acknowledgement cannot be written, [`XprocError::HandshakeTimedOut`], and everything
    /// [`Client::attach`] returns.
    pub fn handshake(stream: &UnixStream, options: &ClientOptions) -> Result<Self, XprocError> {
        let t = options.handshake_timeout.max(Duration::from_millis(1));
        stream
            .set_read_timeout(Some(t))
            .and_then(|()| stream.set_write_timeout(Some(t)))
            .map_err(handshake_io("setting the socket timeouts"))?;
        let seg = Segment::recv_fd(stream, Channel::type_id()).map_err(|e| match e {
            context_shmem::Error::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                XprocError::HandshakeTimedOut(t)
            }
            other => XprocError::Shmem(other),
        })?;
        let channel = Channel::from_segment(Arc::new(seg))?;
        let ep = channel.endpoint(Side::A)?;
        let kept = stream
            .try_clone()
            .map_err(handshake_io("keeping the socket"))?;
        (&*stream)
            .write_all(super::ACK)
            .map_err(handshake_io("acknowledging the channel"))?;
        Self::finish(ep, options, Some(kept))
    }

    fn finish(
        mut ep: Endpoint,
        options: &ClientOptions,
        socket: Option<UnixStream>,
    ) -> Result<Self, XprocError> {
        let deadline = Instant::now().checked_add(options.handshake_timeout);
        let mut inb = vec![0u8; 4096.min(ep.max_frame())];
        let n = loop {
            match ep.recv(&mut inb, deadline) {
                Ok(n) => break n,
                Err(ChannelError::BufferTooSmall { needed }) if needed <= HELLO_MAX => {
                    inb.resize(needed, 0);
                }
                Err(ChannelError::BufferTooSmall { needed }) => {
                    return Err(XprocError::Handshake(format!(
                        "the server's first message has {needed} bytes, over the limit of \
                         {HELLO_MAX} for an export table"
                    )));
                }
                Err(ChannelError::TimedOut) => {
                    return Err(XprocError::HandshakeTimedOut(options.handshake_timeout));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let hello = Hello::from_message(&inb[..n]).map_err(XprocError::Handshake)?;
        let lane = Mutex::new(Lane {
            ep,
            next_seq: 1,
            failed: None,
            epoch: Instant::now(),
        });
        Ok(Self {
            link: Arc::new(Link {
                lane,
                exports: hello.exports,
                codec: hello.codec,
                server_pid: hello.pid,
                call_timeout: options.call_timeout,
                discarded: AtomicU64::new(0),
                max_reply: AtomicUsize::new(reply_bound(DEFAULT_LIMIT)),
                failure: OnceLock::new(),
                _socket: socket,
            }),
        })
    }

    /// A proxy for the object the server exports as `name`, speaking `S` with the default codec.
    ///
    /// # Errors
    /// [`XprocError::UnknownName`], [`XprocError::ServiceMismatch`] if the object speaks another
    /// service, [`XprocError::CodecMismatch`] if the server uses another codec.
    pub fn proxy<S: Service>(&self, name: &str) -> Result<Proxy<S>, XprocError> {
        self.proxy_with::<S, Bincode>(name)
    }

    /// [`Client::proxy`] with another codec (the server's [`super::Host`] must use the same).
    ///
    /// # Errors
    /// As for [`Client::proxy`].
    pub fn proxy_with<S: Service, C: Codec>(&self, name: &str) -> Result<Proxy<S, C>, XprocError> {
        if self.link.codec != C::NAME {
            return Err(XprocError::CodecMismatch {
                expected: C::NAME,
                found: self.link.codec.clone(),
            });
        }
        let e = self
            .link
            .exports
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| XprocError::UnknownName(name.to_owned()))?;
        if e.service_id != S::ID {
            return Err(XprocError::ServiceMismatch {
                name: name.to_owned(),
                expected: S::NAME,
                found: e.service.clone(),
            });
        }
        self.link
            .max_reply
            .fetch_max(reply_bound(C::LIMIT), Ordering::Relaxed);
        let p = Proxy::over(self.transport(), e.object);
        Ok(match self.link.call_timeout {
            Some(t) => p.with_timeout(t),
            None => p,
        })
    }

    /// The transport itself, for [`Proxy::over`] with an [`crate::ObjectId`] learned otherwise.
    /// It accepts replies up to the default codec limit (plus the frame header), or the largest
    /// limit of the codecs of the proxies made with [`Client::proxy_with`]; a longer reply is
    /// dropped unread and the call fails with [`CallError::Frame`].
    #[must_use]
    pub fn transport(&self) -> Arc<dyn Transport> {
        Arc::clone(&self.link) as Arc<dyn Transport>
    }

    /// What the server exports.
    #[must_use]
    pub fn exports(&self) -> &[Export] {
        &self.link.exports
    }

    /// The server process's pid, as it announced it.
    #[must_use]
    pub fn server_pid(&self) -> u32 {
        self.link.server_pid
    }

    /// Why the channel is unusable, once a call has found it so (the server died, closed, or
    /// broke the protocol); `None` while it works. The typed cause behind a
    /// [`CallError::Transport`] or [`CallError::Closed`] of a call.
    #[must_use]
    pub fn failure(&self) -> Option<LinkFailure> {
        self.link.failure.get().copied()
    }

    /// How many late answers (to callers that had timed out) were discarded so far.
    #[must_use]
    pub fn discarded_replies(&self) -> u64 {
        self.link.discarded.load(Ordering::Relaxed)
    }
}
