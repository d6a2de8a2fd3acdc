//! Helpers shared by the integration tests: a hang must fail the test, not stall CI.
#![allow(dead_code)] // each test binary uses a subset

use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on a fresh thread and fails the test, naming it, if `f` has not finished within
/// `secs`. A panic in `f` is the test's panic.
pub fn watchdog<R: Send + 'static>(secs: u64, f: impl FnOnce() -> R + Send + 'static) -> R {
    // The harness names each test's thread after the test.
    let test = std::thread::current()
        .name()
        .unwrap_or("the test")
        .to_owned();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(test.clone())
        .spawn(move || {
            let r = f();
            let _ = tx.send(());
            r
        })
        .expect("spawning the test body");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        // Finished, or panicked (the sender is gone): join to get the result or the panic.
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: {test} still running after {secs} s (hang)")
        }
    }
}
