//! Fork/wait helpers for multi-process tests. The test harness is multi-threaded, so a forked child
//! only does simple work and leaves with `libc::_exit` (never returns into the harness, never
//! unwinds, never runs atexit handlers).
#![allow(dead_code, missing_docs)]

use std::time::{Duration, Instant};

/// Forks; the child runs `f` and `_exit`s with its result (101 if it panicked, 102 if it could
/// not ask for the parent-death signal). The child is SIGKILLed when the thread that forked it
/// ends (`PR_SET_PDEATHSIG`), so a child left behind by a failed or killed test does not outlive
/// it: every test here waits for its children on the thread that forked them.
pub fn fork_child(f: impl FnOnce() -> i32) -> libc::pid_t {
    let parent = std::process::id();
    // SAFETY: fork has no memory-safety preconditions of its own; the child below only runs `f`
    // (simple work, chosen by the test) and then `_exit`, never returning into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes no pointers and is async-signal-safe (a plain
        // system call), so it is fine in the child of a multi-threaded process.
        let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        // SAFETY: getppid is async-signal-safe and takes no arguments.
        let ppid = unsafe { libc::getppid() };
        if r != 0 {
            // SAFETY: _exit ends the child at once (see below).
            unsafe { libc::_exit(102) };
        }
        // (0: the parent is outside this child's PID namespace, the child being the first
        // process of a namespace the parent made; it is alive, since it forked us.)
        if ppid != 0 && ppid as u32 != parent {
            // The parent died before the signal was armed: it will never come.
            // SAFETY: _exit ends the child at once (see below).
            unsafe { libc::_exit(102) };
        }
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: _exit ends the child at once, without running the parent's atexit handlers or
        // destructors of state shared with the parent.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for `pid` with a watchdog: after `limit`, SIGKILLs it and panics (a hang fails the test).
/// Returns the raw wait status.
pub fn wait_child(pid: libc::pid_t, limit: Duration) -> i32 {
    let t0 = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return status;
        }
        assert!(
            r == 0,
            "waitpid failed: {}",
            std::io::Error::last_os_error()
        );
        if t0.elapsed() > limit {
            kill9(pid);
            // SAFETY: as above, blocking wait for the child we just killed.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("watchdog: child {pid} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Waits until `cond` holds while child `pid` runs: fails the test if the child ends first
/// (reporting its status; the child is then reaped) or after `limit` (SIGKILLing and reaping it).
pub fn wait_while_child_runs(
    pid: libc::pid_t,
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) {
    let t0 = Instant::now();
    while !cond() {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(
            r != pid,
            "child {pid} ended (status {status:#x}) before {what}"
        );
        assert!(
            r == 0,
            "waitpid failed: {}",
            std::io::Error::last_os_error()
        );
        let waited = t0.elapsed();
        if waited > limit {
            kill9(pid);
            // SAFETY: as above, blocking wait for the child we just killed.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("timed out after {limit:?} waiting for {what} (child {pid} killed)");
        }
        // Spin at first (the wait is usually short), then poll without hogging a core.
        if waited < Duration::from_millis(1) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Waits and asserts a clean exit with code 0.
pub fn expect_ok(pid: libc::pid_t, limit: Duration) {
    let st = wait_child(pid, limit);
    assert!(
        libc::WIFEXITED(st),
        "child {pid} did not exit normally (status {st:#x})"
    );
    assert_eq!(libc::WEXITSTATUS(st), 0, "child {pid} failed");
}

pub fn kill9(pid: libc::pid_t) {
    // SAFETY: sending a signal to our own child has no memory-safety implications.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// A tiny deterministic PRNG (xorshift64*), seeded per test.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Busy-waits about `d` (sleeping would give the scheduler the chance to make every kill land
/// in the same place).
pub fn spin_for(d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// The deadline `secs` seconds from now.
pub fn within(secs: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(secs))
}

/// Stores `name` into the first words of `a`, one byte per word, as a forked child tells its
/// parent what it created (a memfd-backed array both see). Bytes beyond `a`'s length are dropped.
pub fn store_name(a: &context_shmem::AtomicArray, name: &str) {
    for (i, b) in name.bytes().enumerate() {
        if let Some(w) = a.get(i) {
            w.store(u64::from(b), std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The name [`store_name`] left in the first `max` words of `a` (empty until one is stored).
pub fn load_name(a: &context_shmem::AtomicArray, max: usize) -> String {
    (0..max)
        .map_while(|i| a.get(i))
        .map(|w| w.load(std::sync::atomic::Ordering::SeqCst) as u8)
        .take_while(|&b| b != 0)
        .map(char::from)
        .collect()
}
