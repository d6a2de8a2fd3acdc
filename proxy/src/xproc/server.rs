//! The serving side: a context's exported objects, answered over one channel per client.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use context_core::{Context, Handle};
use context_shmem::{Channel, ChannelError, Endpoint, Side};

use super::wire::{Export, Hello, SEQ_LEN, split_seq};
use super::{XprocError, handshake_io};
use crate::codec::{Bincode, Codec};
use crate::error::CallError;
use crate::frame::FrameError;
use crate::proxy::Exports;
use crate::service::Serve;

/// How often a waiting server looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Settings of the serving side of the socket handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Bytes per ring of each new channel (a power of two, 64 B to 1 GiB); the largest request or
    /// reply frame is this minus 24 bytes. Default: 64 KiB.
    pub capacity: usize,
    /// How long the handshake waits for the client's acknowledgement. Default: 10 s.
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            capacity: 64 << 10,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The serving end of one channel: side B and its buffers. Made by [`Server::attach`] (a channel
/// shared by fork) or by [`Listener::accept`] / [`Server::accept_stream`] (a channel sent over a
/// Unix socket), then run by [`Host::serve`].
#[derive(Debug)]
pub struct Server {
    ep: Endpoint,
    inb: Vec<u8>,
    out: Vec<u8>,
    /// The client's socket, for a channel sent over one: [`Host::serve`] reads the client's
    /// acknowledgement from it, and then watches it: the kernel closes it when the client's
    /// process ends, whatever the client left in the channel.
    socket: Option<Socket>,
}

#[derive(Debug)]
struct Socket {
    stream: UnixStream,
    /// How long [`Host::serve`] waits for the acknowledgement.
    handshake_timeout: Duration,
}

impl Server {
    /// Attaches side B of `channel`. [`Host::serve`] then waits (watching its stop flag) until a
    /// live client has attached side A.
    ///
    /// # Errors
    /// [`XprocError::Channel`]: the side is held by a live process, or the ring state is corrupt.
    pub fn attach(channel: &Channel) -> Result<Self, XprocError> {
        let ep = channel.endpoint(Side::B)?;
        Ok(Self::from_endpoint(ep, None))
    }

    fn from_endpoint(ep: Endpoint, socket: Option<Socket>) -> Self {
        let inb = vec![0u8; 4096.min(ep.max_frame())];
        Self {
            ep,
            inb,
            out: Vec::new(),
            socket,
        }
    }

    /// The server's half of the socket handshake on a connected stream: creates a channel,
    /// attaches side B and sends the channel's sealed memfd (SCM_RIGHTS). It does not wait for
    /// the client: [`Host::serve`] does (on the thread that serves the channel), reading the
    /// client's acknowledgement within `options.handshake_timeout` and checking that a live
    /// process attached side A. So a client that connects and then says nothing holds up only
    /// its own serving thread, never the thread that accepts. The server keeps a duplicate of
    /// the stream and ends the loop when the client's end of it closes.
    ///
    /// # Errors
    /// [`XprocError::Channel`] (a bad capacity, OS errors), [`XprocError::Shmem`] (sending the
    /// descriptor: the client hung up), [`XprocError::Io`] (setting up the socket).
    pub fn accept_stream(stream: &UnixStream, options: &ServerOptions) -> Result<Self, XprocError> {
        let t = options.handshake_timeout.max(Duration::from_millis(1));
        stream
            .set_write_timeout(Some(t))
            .map_err(handshake_io("setting the socket timeouts"))?;
        let channel = Channel::create(options.capacity)?;
        let ep = channel.endpoint(Side::B)?;
        channel.segment().send_fd(stream)?;
        let stream = stream
            .try_clone()
            .map_err(handshake_io("keeping the client's socket"))?;
        Ok(Self::from_endpoint(
            ep,
            Some(Socket {
                stream,
                handshake_timeout: t,
            }),
        ))
    }

    /// The largest request or reply frame this channel carries.
    #[must_use]
    pub fn max_frame(&self) -> usize {
        self.ep.max_frame() - SEQ_LEN
    }
}

/// A Unix socket on which a server process hands out channels: each accepted connection gets a
/// fresh channel whose descriptor travels over the socket, and then the socket is done.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
    options: ServerOptions,
}

impl Listener {
    /// Binds a socket at `path` with default [`ServerOptions`].
    ///
    /// # Errors
    /// [`XprocError::Io`]: the path exists, or the directory is not writable.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, XprocError> {
        Self::bind_with(path, ServerOptions::default())
    }

    /// Binds a socket at `path` whose channels use `options`.
    ///
    /// # Errors
    /// As for [`Listener::bind`].
    pub fn bind_with(path: impl AsRef<Path>, options: ServerOptions) -> Result<Self, XprocError> {
        let path = path.as_ref().to_path_buf();
        let inner = UnixListener::bind(&path).map_err(|source| XprocError::Io {
            op: "binding the server socket",
            source,
        })?;
        // Non-blocking, so that of several threads woken for one client only one gets it and the
        // others go back to waiting (with their timeouts), instead of blocking in `accept`.
        inner
            .set_nonblocking(true)
            .map_err(|source| XprocError::Io {
                op: "setting up the server socket",
                source,
            })?;
        Ok(Self {
            inner,
            path,
            options,
        })
    }

    /// Waits for the next client and sends it a channel ([`Server::accept_stream`]; the rest of
    /// the handshake happens in [`Host::serve`]). A client that hung up before its channel could
    /// be sent is skipped: the errors left concern the listener, or this process (descriptors,
    /// memory).
    ///
    /// # Errors
    /// [`XprocError::Io`] if accepting failed, [`XprocError::Channel`] if no channel could be
    /// made.
    pub fn accept(&self) -> Result<Server, XprocError> {
        loop {
            if let Some(server) = self.accept_until(None)? {
                return Ok(server);
            }
        }
    }

    /// Like [`Listener::accept`], but gives up after `timeout` without a client: `Ok(None)`. For
    /// accept loops that look at a stop flag in between.
    ///
    /// # Errors
    /// As for [`Listener::accept`], and [`XprocError::Io`] if waiting failed.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<Server>, XprocError> {
        self.accept_until(Instant::now().checked_add(timeout))
    }

    /// Takes the next client, waiting until `deadline` (`None`: no limit) for one: `Ok(None)` if
    /// none came. Several threads may wait on one listener: the socket is non-blocking, so a
    /// thread woken for a client another thread took goes back to waiting.
    fn accept_until(&self, deadline: Option<Instant>) -> Result<Option<Server>, XprocError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let io = |op, source| XprocError::Io { op, source };
        loop {
            match self.inner.accept() {
                Ok((stream, _)) => match Server::accept_stream(&stream, &self.options) {
                    Ok(server) => return Ok(Some(server)),
                    // That client is gone (or never read): it concerns nobody else.
                    Err(XprocError::Shmem(_) | XprocError::Io { .. }) => continue,
                    Err(e) => return Err(e),
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io("accepting a client", e)),
            }
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Ok(None);
            }
            let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.inner.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io("waiting for a client", e.into())),
            }
        }
    }

    /// The socket's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The socket file would otherwise stay behind and make the next bind fail.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How a [`Host::serve`] loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// The client closed its end (dropped its [`super::Client`] and proxies).
    ClientClosed,
    /// The client process died.
    ClientDied {
        /// The dead client's pid.
        pid: u32,
    },
    /// The stop flag was set.
    Stopped,
}

/// What a [`Host::serve`] loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Requests answered (successfully or with an error frame).
    pub calls: u64,
    /// Why the loop returned.
    pub end: ServeEnd,
}

/// What a server offers: a context, the objects of it that clients may call, and their names.
///
/// `&Host` is `Sync`: to serve several clients, run one [`Host::serve`] per client channel, each
/// on its own thread, all sharing one host. Their calls are serialised by the context's lock in
/// FIFO order, exactly like in-process calls into that context (which may happen at the same
/// time).
pub struct Host<C: Codec = Bincode> {
    ctx: Context,
    exports: Exports<C>,
    table: Vec<Export>,
}

impl<C: Codec> std::fmt::Debug for Host<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("ctx", &self.ctx)
            .field("exports", &self.table)
            .finish()
    }
}

impl Host {
    /// A host for objects of `ctx`, exporting nothing yet, with the default codec.
    #[must_use]
    pub fn new(ctx: Context) -> Self {
        Self::with_codec(ctx)
    }
}

impl<C: Codec> Host<C> {
    /// A host for objects of `ctx` whose frames use codec `C` (clients then call
    /// [`super::Client::proxy_with`] with the same codec).
    #[must_use]
    pub fn with_codec(ctx: Context) -> Self {
        Self {
            ctx,
            exports: Exports::new(),
            table: Vec::new(),
        }
    }

    /// The hosted context.
    #[must_use]
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// What this host exports, as clients see it.
    #[must_use]
    pub fn exports(&self) -> &[Export] {
        &self.table
    }

    /// Exports the object `handle` names, as service `S`, under `name`. Affects channels served
    /// from now on (the table is sent when [`Host::serve`] starts).
    ///
    /// # Errors
    /// [`XprocError::DuplicateName`], [`XprocError::WrongContext`] for a handle of another
    /// context, [`XprocError::ExportedAsOtherService`] for an object already exported as another
    /// service (exporting it again under another name as the same service is fine).
    pub fn export<S: Serve<T>, T: 'static>(
        &mut self,
        name: &str,
        handle: Handle<T>,
    ) -> Result<crate::ObjectId, XprocError> {
        if handle.context() != self.ctx.id() {
            return Err(XprocError::WrongContext {
                handle: handle.context(),
                context: self.ctx.id(),
            });
        }
        if self.table.iter().any(|e| e.name == name) {
            return Err(XprocError::DuplicateName(name.to_owned()));
        }
        let id = crate::ObjectId::of(handle);
        if let Some(e) = self
            .table
            .iter()
            .find(|e| e.object == id && e.service_id != S::ID)
        {
            return Err(XprocError::ExportedAsOtherService {
                name: e.name.clone(),
                service: e.service.clone(),
            });
        }
        let object = self.exports.export::<S, T>(handle);
        self.table.push(Export {
            name: name.to_owned(),
            object,
            service_id: S::ID,
            service: S::NAME.to_owned(),
        });
        Ok(object)
    }

    /// Moves `value` into the context and exports it as service `S` under `name`.
    ///
    /// # Errors
    /// Entering the context failed, its table is full, or [`XprocError::DuplicateName`] (checked
    /// first: the value is then dropped, never adopted).
    pub fn adopt<S: Serve<T>, T: Send + 'static>(
        &mut self,
        name: &str,
        value: T,
    ) -> Result<crate::ObjectId, XprocError> {
        if self.table.iter().any(|e| e.name == name) {
            return Err(XprocError::DuplicateName(name.to_owned()));
        }
        let handle = self.ctx.enter(|cx| cx.adopt(value))??;
        self.export::<S, T>(name, handle)
    }

    /// Serves one channel until the client closes or dies, or `stop` is set: sends the export
    /// table, then answers each request inside the context (FIFO with every other caller of it)
    /// and sends the answer back with the request's sequence number. Consumes the server; its end
    /// of the channel closes when this returns, so waiting clients see the channel closed.
    ///
    /// `stop` is looked at between requests and at least every 20 ms while waiting; a request that
    /// has started runs to its end.
    ///
    /// # Errors
    /// [`XprocError::TableTooLarge`] if the export table does not fit the channel,
    /// [`XprocError::Protocol`] for a message too short to carry a sequence number (the client is
    /// not one of ours), [`XprocError::Channel`] for a corrupt ring. For a channel sent over a
    /// socket, the end of the handshake: [`XprocError::HandshakeTimedOut`] if the client does not
    /// acknowledge within the handshake timeout, [`XprocError::Handshake`] if it hangs up before
    /// attaching, sends something else or acknowledges without attaching (also if the export
    /// table cannot be encoded), [`XprocError::Io`] for socket errors meanwhile: a client that
    /// connects and leaves ends its loop with one of these, not with `Ok`. Errors inside a call (a
    /// panicking method, a closed context, a bad frame) go back to its caller as error frames and
    /// do not end the loop.
    pub fn serve(&self, mut server: Server, stop: &AtomicBool) -> Result<Served, XprocError> {
        let hello = Hello::new(C::NAME, self.table.clone())
            .to_message()
            .map_err(|e| XprocError::Handshake(format!("encoding the export table: {e}")))?;
        if hello.len() > server.ep.max_frame() {
            return Err(XprocError::TableTooLarge {
                len: hello.len(),
                max: server.ep.max_frame(),
            });
        }
        let mut calls = 0;
        let end = |calls, end| Ok(Served { calls, end });
        if let Some(e) = server.wait_for_client(stop)? {
            return end(calls, e);
        }
        // Waits are bounded by `poll` so that `stop` is seen; the deadline is only renewed after it
        // passed, so answering a request reads no clock.
        let mut poll = Instant::now() + STOP_POLL;
        if let Some(e) = send(&mut server.ep, &hello, &mut poll, stop)? {
            return end(calls, e);
        }
        let Server {
            ep,
            inb,
            out,
            socket,
        } = &mut server;
        loop {
            if stop.load(Ordering::Relaxed) {
                return end(calls, ServeEnd::Stopped);
            }
            let n = match ep.recv(inb, Some(poll)) {
                Ok(n) => n,
                Err(ChannelError::TimedOut) => {
                    if socket.as_ref().is_some_and(|s| hung_up(&s.stream)) {
                        return end(calls, ServeEnd::ClientClosed);
                    }
                    poll = Instant::now() + STOP_POLL;
                    continue;
                }
                Err(ChannelError::BufferTooSmall { needed }) => {
                    inb.resize(needed, 0);
                    continue;
                }
                Err(ChannelError::Closed) => return end(calls, ServeEnd::ClientClosed),
                Err(ChannelError::PeerDead { pid }) => {
                    return end(calls, ServeEnd::ClientDied { pid });
                }
                Err(e) => return Err(e.into()),
            };
            let Some((request, seq)) = split_seq(&inb[..n]) else {
                return Err(XprocError::Protocol(
                    "a request too short to carry its sequence number",
                ));
            };
            let exports = &self.exports;
            let answered = self.ctx.enter(|cx| exports.serve(cx, request, out));
            if let Err(e) = answered {
                self.exports.error_reply(request, &CallError::from(e), out);
            }
            let max = ep.max_frame() - SEQ_LEN;
            if out.len() > max {
                let e = CallError::Frame(FrameError::TooLarge {
                    len: out.len() as u64,
                    limit: max as u64,
                });
                self.exports.error_reply(request, &e, out);
            }
            out.extend_from_slice(&seq.to_le_bytes());
            calls += 1;
            if let Some(e) = send(ep, out, &mut poll, stop)? {
                return end(calls, e);
            }
            // A reply too large for the ring was still encoded whole (bincode does not stop at a
            // limit): do not keep its buffer for the rest of the connection.
            if out.capacity() > 2 * (max + SEQ_LEN).max(4096) {
                out.clear();
                out.shrink_to((max + SEQ_LEN).max(4096));
            }
        }
    }
}

impl Server {
    /// Completes the handshake before anything is sent: reads the acknowledgement of a client
    /// that got its channel over a socket (within its handshake timeout) and checks that a live
    /// process attached side A; for a channel shared by fork, waits until a client has attached
    /// (for as long as it takes: `stop` ends the wait). Then drops whatever an earlier client of
    /// the channel left in its request ring: a new client sends nothing before it has read the
    /// export table, so anything there is a dead client's and must not run again.
    fn wait_for_client(&mut self, stop: &AtomicBool) -> Result<Option<ServeEnd>, XprocError> {
        if let Some(socket) = &self.socket {
            if let Some(end) = read_ack(socket, stop)? {
                return Ok(Some(end));
            }
            match self.ep.peer_attached() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(XprocError::Handshake(
                        "the client acknowledged without attaching its side of the channel"
                            .to_owned(),
                    ));
                }
                Err(ChannelError::PeerDead { pid }) => {
                    return Ok(Some(ServeEnd::ClientDied { pid }));
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            let mut pause = Duration::from_micros(50);
            loop {
                match self.ep.peer_attached() {
                    Ok(true) => break,
                    Ok(false) => {}
                    // A client of an earlier connection died attached: a new one may come.
                    Err(ChannelError::PeerDead { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                if stop.load(Ordering::Relaxed) {
                    return Ok(Some(ServeEnd::Stopped));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(STOP_POLL);
            }
        }
        loop {
            match self.ep.recv(&mut self.inb, Some(Instant::now())) {
                Ok(_) => {}
                Err(ChannelError::BufferTooSmall { needed }) => self.inb.resize(needed, 0),
                Err(
                    ChannelError::TimedOut | ChannelError::Closed | ChannelError::PeerDead { .. },
                ) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }
}

/// Reads the client's one-byte acknowledgement, in slices so that `stop` is seen.
fn read_ack(socket: &Socket, stop: &AtomicBool) -> Result<Option<ServeEnd>, XprocError> {
    let deadline = Instant::now() + socket.handshake_timeout;
    let mut ack = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(XprocError::HandshakeTimedOut(socket.handshake_timeout));
        }
        socket
            .stream
            .set_read_timeout(Some(left.min(STOP_POLL)))
            .map_err(handshake_io("setting the socket timeouts"))?;
        match (&socket.stream).read(&mut ack) {
            Ok(1) if ack == *super::ACK => return Ok(None),
            Ok(0) => {
                return Err(XprocError::Handshake(
                    "the client hung up before attaching".to_owned(),
                ));
            }
            Ok(_) => {
                return Err(XprocError::Handshake(
                    "the client sent something other than its acknowledgement".to_owned(),
                ));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(Some(ServeEnd::Stopped));
                }
            }
            Err(source) => {
                return Err(XprocError::Io {
                    op: "reading the client's acknowledgement",
                    source,
                });
            }
        }
    }
}

/// Whether the client's end of the socket is closed (its process ended, or it dropped its
/// client). Never blocks. (When the peer of a Unix stream socket closes it, the kernel shuts
/// both directions of ours down, which `poll` reports as `POLLHUP`, asked for or not.)
fn hung_up(stream: &UnixStream) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        _ => false,
    }
}

/// Sends one message, waiting for ring space in bounded slices; `Some(end)` if the loop must end.
/// (The reply's number is appended to the reply buffer rather than sent as a second part: one
/// copy into the ring measured a few instructions cheaper.) Inlined into the serving loop: out of
/// line, its result (an `XprocError` in the making) went through memory.
#[inline(always)]
fn send(
    ep: &mut Endpoint,
    msg: &[u8],
    poll: &mut Instant,
    stop: &AtomicBool,
) -> Result<Option<ServeEnd>, XprocError> {
    loop {
        match ep.send(msg, Some(*poll)) {
            Ok(()) => return Ok(None),
            Err(ChannelError::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(Some(ServeEnd::Stopped));
                }
                *poll = Instant::now() + STOP_POLL;
            }
            Err(ChannelError::Closed) => return Ok(Some(ServeEnd::ClientClosed)),
            Err(ChannelError::PeerDead { pid }) => return Ok(Some(ServeEnd::ClientDied { pid })),
            Err(e) => return Err(e.into()),
        }
    }
}
