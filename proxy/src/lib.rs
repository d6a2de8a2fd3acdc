//! # context-proxy
//!
//! **Not yet implemented** (tracked by the proxy issue). This crate will hold typed proxies that name
//! an object and the context that owns it: a method call serializes its arguments, hands the caller's
//! context lock over to the target context, runs there and returns the result the same way, plus a
//! cheat path for pointer-free buffers that copies directly between contexts.
//!
//! It exposes nothing yet, on purpose: no API here pretends to work before it does.
#![forbid(unsafe_code)]
