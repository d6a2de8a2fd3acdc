//! # context-proxy-macros
//!
//! **Not yet implemented** (tracked by the proxy issue). Will hold the `#[service]` attribute macro
//! that turns a trait into request/response enums and a typed client for `context-proxy`.
#![forbid(unsafe_code)]
