//! # context-forkpool
//!
//! **Not yet implemented** (tracked by the forkpool issue). This crate will hold fixed-address shared
//! regions mapped before fork, a supervised pool of forked workers, and a process-shared allocator whose
//! pointers are valid in every process of the pool.
//!
//! It exposes nothing yet, on purpose: no API here pretends to work before it does.
#![forbid(unsafe_code)]
