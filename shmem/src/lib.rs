//! # context-shmem
//!
//! **Not yet implemented** (tracked by the shmem issue). This crate will hold shared-memory segments
//! (sealed memfd, named, file-backed), typed buffers of pointer-free data, a crash-safe process-shared
//! lock that implements `context_core::RawContextLock`, and a bounded frame channel.
//!
//! It exposes nothing yet, on purpose: no API here pretends to work before it does.
#![forbid(unsafe_code)]
