//! Helpers shared by the integration tests: a hang must fail the test, not stall CI.
#![allow(dead_code)] // each test binary uses a subset

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long [`wait_until`] and [`join`] wait before they fail the test.
pub const LIMIT: Duration = Duration::from_secs(20);

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

/// Waits until `cond` holds; fails the test after [`LIMIT`].
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    assert!(
        holds_within(LIMIT, cond),
        "timed out after {LIMIT:?} waiting for {what}"
    );
}

/// Waits until `cond` holds, at most `limit`: whether it did.
pub fn holds_within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while !cond() {
        let waited = t0.elapsed();
        if waited >= limit {
            return false;
        }
        // Spin politely at first (short waits stay short), then poll without hogging a core.
        if waited < Duration::from_millis(1) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    true
}

/// Joins `h`, waiting at most [`LIMIT`] for it to end; a panic on the thread is re-raised here.
pub fn join<R>(what: &str, h: JoinHandle<R>) -> R {
    wait_until(what, || h.is_finished());
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}
