//! Cross-crate and multi-process tests live in `tests/`; the examples in `../examples/`.
//!
//! The workspace README is included below so that its code blocks are compiled and run as
//! doctests: the README cannot show code that does not work.
#![forbid(unsafe_code)]
#![doc = include_str!("../../README.md")]
