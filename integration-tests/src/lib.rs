//! Cross-crate and multi-process tests live in `tests/`; this library holds their shared helpers.
#![forbid(unsafe_code)]
