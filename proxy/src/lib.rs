//! # context-proxy
//!
//! Typed proxies for objects that live in other [contexts](context_core::Context). A [`Proxy`] names
//! an object and the context that owns it; calling a method serializes the arguments into a frame,
//! hands the caller's context over to the target context, decodes and runs the method there, and
//! returns the result the same way. The target never sees the caller's memory.
//!
//! - **Services** declare what can be called: the [`#[service]`](macro@service) attribute turns a trait
//!   into request/response enums and a typed client, or a [`Service`] is written by hand.
//! - **Codec**: bincode 2.0.1 behind our own [`Codec`] trait ([`Bincode`], decode always limited);
//!   `Proxy<S, Postcard>` (feature `postcard`) swaps it in one line. Errors are opaque
//!   ([`CodecError`]).
//! - **Frames** carry a checked 32-byte header (magic, version, kind, length, service, object):
//!   see [`frame`]. Arbitrary bytes give an error, never a panic, abort or unbounded allocation.
//! - **Transports** move frames: [`InProcess`] here (idle fast path on the caller's thread, FIFO
//!   wait when busy, home thread for pinned contexts); a cross-process transport implements
//!   [`Transport`] and serves frames with [`Exports`], behind the same `Proxy<S>`.
//! - **Cross-process** (feature `xproc`): `xproc` is that transport over `context-shmem`'s
//!   frame channel: a `Host` serves a context's named objects to other processes (a forked worker,
//!   or an unrelated process reached through a Unix socket), and a `Client` gives ordinary
//!   `Proxy<S>`s to them, with timeouts, discarded late replies, FIFO order among callers and a
//!   dead server detected as an error rather than a hang.
//! - **Move mode** ([`Mode::Move`]) passes `Send` values without serialization, in-process only.
//! - **The cheat path** copies plain buffers ([`PlainBuffer`], e.g. [`Buffer`]) directly between
//!   contexts: [`copy`] enters both contexts in the global order and `memcpy`s.
//!
//! ## With the macro
//!
//! ```
//! use context_core::Context;
//! use context_proxy::{CallError, Mode, Proxy, service};
//!
//! #[service]
//! pub trait Counter {
//!     /// Adds `n`, tagged with a name, and returns the new total.
//!     fn add(&mut self, n: u64, tag: &str) -> u64;
//!     fn total(&self) -> u64;
//! }
//!
//! #[derive(Default)]
//! struct Tally { total: u64, last: String }
//!
//! impl Counter for Tally {
//!     fn add(&mut self, n: u64, tag: &str) -> u64 {
//!         self.total += n;
//!         self.last = tag.to_owned();
//!         self.total
//!     }
//!     fn total(&self) -> u64 { self.total }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let b = Context::new("b");
//! let counter: Proxy<CounterService> = Proxy::adopt(&b, Tally::default())?;
//!
//! // From any thread, inside a context or in none:
//! assert_eq!(counter.add(5, "first")?, 5);
//! let a = Context::new("a");
//! let c2 = counter.clone();
//! assert_eq!(a.enter(move |_| c2.add(2, "from a"))??, 7);
//!
//! // Pinned contexts run the call on their home thread.
//! let p = Context::pinned("home")?;
//! let pinned: Proxy<CounterService> = Proxy::adopt(&p, Tally::default())?;
//! assert_eq!(pinned.add(1, "x")?, 1);
//!
//! // Move mode: no serialization, same API.
//! let moving = counter.clone().with_mode(Mode::Move)?;
//! assert_eq!(moving.total()?, 7);
//!
//! // Typed errors: the context is gone.
//! b.close()?;
//! assert!(matches!(counter.total(), Err(CallError::Closed(_))));
//! # Ok(()) }
//! ```
//!
//! ## By hand
//!
//! ```
//! use context_core::Context;
//! use context_proxy::{Proxy, Serve, Service};
//! use serde::{Deserialize, Serialize};
//!
//! struct Greeter;
//!
//! #[derive(Serialize, Deserialize)]
//! enum GreetRequest<'a> { Hello { name: &'a str } }
//! #[derive(Serialize, Deserialize)]
//! enum GreetResponse { Hello(String) }
//!
//! struct GreetService;
//! impl Service for GreetService {
//!     const NAME: &'static str = "example::Greet";
//!     type Request<'a> = GreetRequest<'a>;
//!     type Response = GreetResponse;
//! }
//! impl Serve<Greeter> for GreetService {
//!     fn serve(_g: &mut Greeter, r: GreetRequest<'_>) -> GreetResponse {
//!         match r { GreetRequest::Hello { name } => GreetResponse::Hello(format!("hello, {name}")) }
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ctx = Context::new("greeter");
//! let greeter: Proxy<GreetService> = Proxy::adopt(&ctx, Greeter)?;
//! let GreetResponse::Hello(s) = greeter.call(GreetRequest::Hello { name: "ada" })?;
//! assert_eq!(s, "hello, ada");
//! # Ok(()) }
//! ```
//!
//! ## The cheat path
//!
//! ```
//! use context_core::Context;
//! use context_proxy::{Buffer, BufferService, Proxy, copy};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (a, b) = (Context::new("a"), Context::new("b"));
//! let src: Proxy<BufferService<u32>> = Proxy::adopt(&a, Buffer::from(vec![1u32, 2, 3, 4]))?;
//! let dst: Proxy<BufferService<u32>> = Proxy::adopt(&b, Buffer::<u32>::zeroed(4))?;
//! copy(&src, 1..3, &dst, 0)?; // both contexts entered at once, one memcpy
//! assert_eq!(dst.read(0..4)?, [2, 3, 0, 0]);
//! # Ok(()) }
//! ```
//!
//! ## What the macro refuses
//!
//! Arguments the callee could write back through, generic methods and `self` by value do not
//! compile; neither does a proxy over an object that does not implement the service:
//!
//! ```compile_fail
//! #[context_proxy::service]
//! pub trait Bad { fn fill(&self, out: &mut Vec<u8>); }
//! ```
//! ```compile_fail
//! #[context_proxy::service]
//! pub trait Bad { fn get<T: Default>(&self) -> T; }
//! ```
//! ```compile_fail
//! #[context_proxy::service]
//! pub trait Bad { fn consume(self); }
//! ```
//! ```compile_fail,E0277
//! # use context_core::Context;
//! # use context_proxy::{Proxy, service};
//! #[service]
//! pub trait Counter { fn total(&self) -> u64; }
//! struct NotACounter;
//! let ctx = Context::new("c");
//! let h = ctx.enter(|cx| cx.adopt(NotACounter)).unwrap().unwrap();
//! let p: Proxy<CounterService> = Proxy::new(&ctx, h).unwrap(); // NotACounter: !Counter
//! ```
//!
//! ## Panics, re-entrancy, limits
//! A method that panics gives [`CallError::Panicked`]; the target context stays usable and only that
//! object is poisoned ([`CallError::Poisoned`] afterwards). A method running in B may call back into
//! A through a proxy (A -> B -> A); calling back into the very object whose method is running gives
//! [`CallError::Busy`]. Generated client methods are trait methods: a service method named like an
//! inherent method of [`Proxy`] (`call`, `new`, ...) must be called as `CounterClient::call(&p, ..)`.
//!
//! ## Speed
//! On the 2-vCPU machine the README's figures come from, a small call into an idle context costs
//! 3-3.4x a parking_lot-guarded direct call when serialized (11-12x when the host runs in its slow
//! mode), about 1.5x in move mode, and 0.28-0.35x a crossbeam channel round trip into a pinned
//! context (`ctx bench proxy`; the README's Results section has the table). Build with
//! `codegen-units = 1` in the release profile, as this workspace does: with the default 16 units
//! LLVM leaves bincode's and serde's generic decoders out of line in the call path and a
//! serialized call takes about a third more instructions.
// One reviewed exception, `codec::borrowed_str::utf8` (an ASCII fast path); everything else is
// safe code.
#![deny(unsafe_code)]
#![deny(missing_docs)]

// Lets `#[service]` (which names `::context_proxy`) be used inside this crate's own tests.
extern crate self as context_proxy;

pub mod benchkit;
mod bounded;
mod buffer;
pub mod codec;
mod error;
pub mod frame;
mod proxy;
mod service;
mod transport;
#[cfg(feature = "xproc")]
pub mod xproc;

pub use buffer::{
    Buffer, BufferRequest, BufferResponse, BufferService, PlainAccess, PlainBuffer, copy,
    copy_plain, plain_access,
};
#[cfg(feature = "postcard")]
pub use codec::Postcard;
pub use codec::{Bincode, Codec, CodecError, CodecErrorKind, DEFAULT_LIMIT};
pub use context_proxy_macros::service;
pub use error::CallError;
pub use frame::{FrameError, FrameKind, ObjectId};
pub use proxy::{Exports, Mode, Proxy};
pub use service::{Serve, Service, fnv1a};
pub use transport::{InProcess, ServeFn, Transport};

/// Paths the `#[service]` macro's output uses. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use serde;
    pub use serde_bytes;
}
