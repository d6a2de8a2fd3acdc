//! Cross-process proxies: the same [`Proxy<S>`](crate::Proxy) and calling code as in-process, with
//! the target context in another process, over `context-shmem`'s frame [`Channel`]
//! (feature `xproc`).
//!
//! - **Server side.** A [`Host`] names the objects of one context that clients may call
//!   ([`Host::adopt`], [`Host::export`]). [`Host::serve`] answers one channel: it sends the export
//!   table, then for each request enters the context (FIFO with every other caller of it, local or
//!   remote), runs [`crate::Exports::serve`] and sends the answer back. One `serve` runs per
//!   channel, on its own thread; several may share one `&Host` to serve several clients. It returns
//!   when the client closes or dies, or when its stop flag is set; a socket client that does not
//!   complete the handshake ends it with an error.
//! - **Client side.** A [`Client`] is a [`crate::Transport`] over side A of the channel, shared by
//!   any number of threads; [`Client::proxy`] looks an object up by name and checks its service and
//!   codec, and returns an ordinary `Proxy<S>`.
//! - **Reaching the server.** Either a channel created before `fork` (a forked worker, e.g. of a
//!   `context-forkpool` pool, runs [`Server::attach`] + [`Host::serve`]; the parent runs
//!   [`Client::attach`]), or an unrelated process through a Unix socket: [`Listener::bind`] /
//!   [`Listener::accept`] (or [`Listener::accept_timeout`]) on the server, [`connect`] on the
//!   client. The channel's sealed memfd
//!   travels over the socket with SCM_RIGHTS; the receiver refuses an unsealed one.
//!
//! ## Wire protocol
//!
//! Every message is one channel frame: a proxy frame ([`crate::frame`]) followed by an 8-byte
//! little-endian sequence number. The server's first message is its export table (sequence 0:
//! magic, wire version, codec name, pid, and for each export its name, [`crate::ObjectId`],
//! service id and service name). Requests count from 1; an answer carries its request's number.
//!
//! ## Failures
//!
//! | what happens | the caller gets |
//! |---|---|
//! | no answer within the proxy's timeout | [`CallError::TimedOut`](crate::CallError::TimedOut) with the target's context id; the late answer is discarded by whoever reads next ([`Client::discarded_replies`]) |
//! | the server process dies (even mid-call) | [`CallError::PeerDead`](crate::CallError::PeerDead) within about 10 ms (the channel checks the peer's liveness between bounded sleeps); [`Client::failure`] says [`LinkFailure::PeerDead`] |
//! | the server stops serving (closes its end) | [`CallError::Closed`](crate::CallError::Closed); [`Client::failure`] says [`LinkFailure::Closed`] |
//! | a request larger than the ring | [`CallError::Frame`](crate::CallError::Frame) (`TooLarge`), nothing sent |
//! | a reply larger than the ring | the server sends an error frame instead: `CallError::Frame` (`TooLarge`) |
//! | a malformed reply | `CallError::Frame` from the frame checks, never a panic |
//! | a reply over the codec limit (the largest of the client's proxies' codecs; the server chose the ring's size) | `CallError::Frame` (`TooLarge`); the reply is dropped unread, nothing is allocated for it |
//! | a server that keeps sending late answers, or keeps moving the ring's positions without answering | `CallError::TimedOut` at the proxy's timeout: every retry checks it |
//! | a listener that is alive but does not accept (its queue full) | [`Client::connect`] gives up after the handshake timeout: [`XprocError::HandshakeTimedOut`] |
//! | an export table over 1 MiB | [`XprocError::Handshake`], refused before it is read |
//! | a method that panics, a closed context, ... | the same typed errors as in-process |
//!
//! Once a channel is found dead, closed or corrupt, later calls fail at once with the same error.
//! A call that has reached the server runs to its end even if its caller gave up.
//!
//! ## Example
//!
//! Both ends in one process here (a thread serves); in real use the server is another process, as
//! in the second example.
//!
//! ```
//! use std::sync::atomic::AtomicBool;
//! use context_core::Context;
//! use context_proxy::xproc::{Channel, Client, ClientOptions, Host, ServeEnd, Server};
//! use context_proxy::{Proxy, service};
//!
//! #[service]
//! pub trait Counter {
//!     fn add(&mut self, n: u64) -> u64;
//! }
//! struct Tally(u64);
//! impl Counter for Tally {
//!     fn add(&mut self, n: u64) -> u64 { self.0 += n; self.0 }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Created before fork (or sent over a Unix socket, see `Listener`).
//! let channel = Channel::create(64 << 10)?;
//!
//! // The serving process: a context, what it exports, one serving loop per channel.
//! let mut host = Host::new(Context::new("server"));
//! host.adopt::<CounterService, _>("counter", Tally(0))?;
//! let server = Server::attach(&channel)?;
//! let stop = AtomicBool::new(false);
//!
//! std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
//!     let serving = s.spawn(|| host.serve(server, &stop));
//!
//!     // The calling process: the same Proxy type and calls as in-process.
//!     let client = Client::attach(&channel, &ClientOptions::default())?;
//!     let counter: Proxy<CounterService> = client.proxy("counter")?;
//!     assert_eq!(counter.add(5)?, 5);
//!     assert_eq!(counter.add(2)?, 7);
//!     assert!(client.proxy::<CounterService>("nope").is_err());
//!
//!     drop((counter, client)); // closes the channel: the server's loop returns
//!     let served = serving.join().expect("server thread")?;
//!     assert_eq!((served.calls, served.end), (2, ServeEnd::ClientClosed));
//!     Ok(())
//! })?;
//! # Ok(()) }
//! ```
//!
//! An unrelated process, through a socket:
//!
//! ```no_run
//! # use std::sync::atomic::{AtomicBool, Ordering};
//! # use std::time::Duration;
//! # use context_core::Context;
//! # use context_proxy::xproc::{self, Host, Listener};
//! # use context_proxy::{Proxy, service};
//! # #[service]
//! # pub trait Counter { fn add(&mut self, n: u64) -> u64; }
//! # struct Tally(u64);
//! # impl Counter for Tally { fn add(&mut self, n: u64) -> u64 { self.0 += n; self.0 } }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // In the server process:
//! let mut host = Host::new(Context::new("server"));
//! host.adopt::<CounterService, _>("counter", Tally(0))?;
//! let listener = Listener::bind("/run/user/1000/counter.sock")?;
//! let stop = AtomicBool::new(false); // set it (from a signal handler, say) to shut down
//! std::thread::scope(|s| -> Result<(), xproc::XprocError> {
//!     while !stop.load(Ordering::Relaxed) {
//!         // One channel per client, served on its own thread.
//!         if let Some(server) = listener.accept_timeout(Duration::from_millis(100))? {
//!             let (host, stop) = (&host, &stop);
//!             s.spawn(move || host.serve(server, stop));
//!         }
//!     }
//!     Ok(())
//! })?;
//! # Ok(()) }
//! # fn client() -> Result<(), Box<dyn std::error::Error>> {
//! // In any other process of the same user:
//! let client = xproc::connect("/run/user/1000/counter.sock")?;
//! let counter: Proxy<CounterService> = client.proxy("counter")?;
//! counter.add(1)?;
//! # Ok(()) }
//! ```

mod client;
mod server;
mod wire;

use std::path::Path;
use std::time::Duration;

use context_core::{AccessError, ContextId, EnterError};
pub use context_shmem::{Channel, ChannelError};

pub use client::{Client, ClientOptions, LinkFailure};
pub use server::{Host, Listener, ServeEnd, Served, Server, ServerOptions};
pub use wire::Export;

/// The client's acknowledgement on the socket: it attached its side of the channel.
const ACK: &[u8; 1] = b"A";

/// Why setting up a cross-process link, or serving one, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XprocError {
    /// A socket operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A shared-memory operation failed (sending or receiving the channel's descriptor).
    #[error("shared memory: {0}")]
    Shmem(#[from] context_shmem::Error),
    /// A channel operation failed (creating, attaching, or the peer died or closed during the
    /// handshake).
    #[error("channel: {0}")]
    Channel(#[from] ChannelError),
    /// The peer did not complete the handshake in time.
    #[error("the handshake did not complete within {0:?}")]
    HandshakeTimedOut(Duration),
    /// The peer's handshake was malformed, or from another protocol version.
    #[error("handshake: {0}")]
    Handshake(String),
    /// The server exports nothing under this name.
    #[error("the server exports no object named {0:?}")]
    UnknownName(String),
    /// The object exported under this name speaks another service.
    #[error("{name:?} speaks {found}, not {expected}")]
    ServiceMismatch {
        /// The name asked for.
        name: String,
        /// The service the proxy speaks.
        expected: &'static str,
        /// The service the object speaks.
        found: String,
    },
    /// The server encodes frames with another codec.
    #[error("the server's codec is {found}, the proxy's {expected}")]
    CodecMismatch {
        /// The proxy's codec.
        expected: &'static str,
        /// The server's.
        found: String,
    },
    /// A name exported twice.
    #[error("a name exported twice: {0:?}")]
    DuplicateName(String),
    /// The object is already exported (under `name`) as another service: one object is served
    /// as one service.
    #[error("the object is already exported as {name:?} with service {service}")]
    ExportedAsOtherService {
        /// The name it is exported under.
        name: String,
        /// The service it is exported as.
        service: String,
    },
    /// A handle of another context than the host's.
    #[error("handle of context {handle} exported by the host of context {context}")]
    WrongContext {
        /// The handle's context.
        handle: ContextId,
        /// The host's context.
        context: ContextId,
    },
    /// The export table does not fit one frame of the channel.
    #[error("the export table ({len} bytes) exceeds the channel's largest frame ({max} bytes)")]
    TableTooLarge {
        /// The table's encoded length.
        len: usize,
        /// The largest frame.
        max: usize,
    },
    /// The peer broke the protocol.
    #[error("protocol violation by the peer: {0}")]
    Protocol(&'static str),
    /// Entering the hosted context failed.
    #[error(transparent)]
    Enter(#[from] EnterError),
    /// Adopting an object failed.
    #[error(transparent)]
    Access(#[from] AccessError),
}

fn handshake_io(op: &'static str) -> impl FnOnce(std::io::Error) -> XprocError {
    move |source| XprocError::Io { op, source }
}

/// Connects to the [`Listener`] at `path` with default [`ClientOptions`] (see [`Client::connect`]).
///
/// # Errors
/// As for [`Client::connect`].
pub fn connect(path: impl AsRef<Path>) -> Result<Client, XprocError> {
    Client::connect(path, &ClientOptions::default())
}
