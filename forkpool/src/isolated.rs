//! Running code in a fresh, single-threaded copy of the current binary.
//!
//! [`crate::Pool`] forks, and forking is only safe while the process is single-threaded. Cargo's test
//! harness and a CLI with a progress thread are not. The pool does not fork from them; instead they
//! re-execute their own binary (the approach of `ipc-channel`'s tests) and build the pool there:
//!
//! - [`command`] / [`run`] spawn `std::env::current_exe()` (by `fork` + `exec` inside
//!   `std::process::Command`, which is safe from any number of threads) with the environment variable
//!   [`ENV`] naming an entry function;
//! - this crate places a start-up hook in `.init_array` (the mechanism of the `ctor` crate). In every
//!   binary that links this crate it runs before `main` and costs one `getenv`. When [`ENV`] is set
//!   and names this very executable, it calls the entry function and exits with its code, so the
//!   entry runs single-threaded before the test harness or the CLI has started any thread.
//!
//! The entry is named by its offset from a function of this crate (both live in the same
//! executable image, so the offset survives address-space randomisation). The variable also carries
//! the executable's device, inode, size and modification time; a child whose `/proc/self/exe`
//! differs (the binary was rebuilt in between) refuses to run and exits with code 97. The variable is
//! removed before the entry runs, so processes the entry spawns do not inherit it.
//!
//! Trust: whoever sets [`ENV`] chooses a code offset in this binary to call, the same power that
//! `LD_PRELOAD` or a debugger gives someone who controls the environment. The identity check only
//! guards against stale or foreign values, not against an attacker; do not run binaries linking this
//! crate with an environment you do not control. The hook ignores [`ENV`] in privileged starts
//! (`AT_SECURE`: set-uid, set-gid, file capabilities).

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that selects an entry in a re-executed binary.
pub const ENV: &str = "CONTEXT_FORKPOOL_ISOLATED";

/// Exit code of a child that refused to run because the executable changed.
pub const EXIT_EXE_MISMATCH: i32 = 97;
/// Exit code of a child whose entry panicked.
pub const EXIT_PANIC: i32 = 101;

/// Errors of [`command`] and [`run`].
#[derive(Debug, thiserror::Error)]
pub enum IsolatedError {
    /// The entry function is not in the main executable (e.g. in a shared library).
    #[error("the entry function is not part of the main executable image")]
    NotInExecutable,
    /// The current executable cannot be found or inspected.
    #[error("cannot inspect the current executable: {0}")]
    Exe(#[source] std::io::Error),
    /// Spawning or waiting failed.
    #[error("spawning the isolated process failed: {0}")]
    Spawn(#[source] std::io::Error),
    /// The child did not finish in time; it was killed. Its output so far is included.
    #[error(
        "the isolated process did not finish within {timeout:?} and was killed; stderr:\n{stderr}"
    )]
    Timeout {
        /// The timeout.
        timeout: Duration,
        /// Captured standard output.
        stdout: String,
        /// Captured standard error.
        stderr: String,
    },
}

/// What an isolated run produced.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code, or `None` if killed by a signal.
    pub code: Option<i32>,
    /// Signal that killed it, if any.
    pub signal: Option<i32>,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
}

impl Output {
    /// Whether the entry returned 0.
    #[must_use]
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// The anchor the entry offsets are measured from.
#[inline(never)]
fn anchor() -> i32 {
    std::hint::black_box(0)
}

fn exe_identity() -> std::io::Result<String> {
    let m = std::fs::metadata("/proc/self/exe")?;
    Ok(format!(
        "{}:{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

fn image_base(addr: usize) -> Option<usize> {
    // SAFETY: Dl_info is a plain C struct; all-zero is a valid value for dladdr to overwrite.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables for `addr` and fills `info`.
    let r = unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) };
    if r == 0 {
        None
    } else {
        Some(info.dli_fbase as usize)
    }
}

/// A `Command` that re-executes the current binary and runs `entry` in it before `main`.
/// Add arguments, environment or I/O settings as needed, then spawn it.
///
/// # Errors
/// [`IsolatedError::NotInExecutable`] if `entry` is not in the same image as this crate;
/// [`IsolatedError::Exe`] if the executable cannot be inspected.
pub fn command(entry: fn() -> i32) -> Result<Command, IsolatedError> {
    let a = anchor as fn() -> i32 as usize;
    let e = entry as usize;
    match (image_base(a), image_base(e)) {
        (Some(x), Some(y)) if x == y => {}
        _ => return Err(IsolatedError::NotInExecutable),
    }
    let id = exe_identity().map_err(IsolatedError::Exe)?;
    let exe = std::env::current_exe().map_err(IsolatedError::Exe)?;
    let mut c = Command::new(exe);
    c.env(ENV, format!("v1:{id}:{:x}", e.wrapping_sub(a)));
    Ok(c)
}

/// Runs `entry` in a fresh single-threaded copy of the current binary, capturing its output, and
/// kills it if it takes longer than `timeout` (a watchdog: a hang fails instead of stalling).
///
/// # Errors
/// As [`command`], plus [`IsolatedError::Spawn`] and [`IsolatedError::Timeout`].
pub fn run(entry: fn() -> i32, timeout: Duration) -> Result<Output, IsolatedError> {
    let mut c = command(entry)?;
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_command(c, timeout)
}

/// Spawns a prepared [`command`] with piped output and waits for it with a watchdog.
///
/// Output is read until the pipes close. A process the child started may keep them open after the
/// child has ended (a daemon, a stray grandchild): the output is then taken as it is
/// [`OUTPUT_GRACE`] after the child's end (or the timeout), marked as cut, and the readers are left
/// to finish on their own. So the call never waits past `timeout` plus that grace (plus up to 2 s for
/// a child killed at the timeout to end).
///
/// # Errors
/// [`IsolatedError::Spawn`], [`IsolatedError::Timeout`].
pub fn run_command(mut c: Command, timeout: Duration) -> Result<Output, IsolatedError> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = c.spawn().map_err(IsolatedError::Spawn)?;
    let out = Capture::start(child.stdout.take());
    let err = Capture::start(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(IsolatedError::Spawn)? {
            Some(s) => break Some(s),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                // Reaped if it ends within the grace; one stuck in the kernel (`D` state) is left
                // unreaped rather than waited for without a bound.
                let grace = Instant::now() + KILL_GRACE;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < grace {
                    std::thread::sleep(Duration::from_millis(1));
                }
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let until = Instant::now() + OUTPUT_GRACE;
    let stdout = out.finish(until);
    let stderr = err.finish(until);
    match status {
        Some(s) => Ok(Output {
            code: s.code(),
            signal: s.signal(),
            stdout,
            stderr,
        }),
        None => Err(IsolatedError::Timeout {
            timeout,
            stdout,
            stderr,
        }),
    }
}

/// How long [`run_command`] waits for a child it killed at the timeout to end (see
/// `sys::KILL_GRACE_MS`).
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long [`run_command`] keeps reading output after the child has ended (or was killed) while
/// another process still holds its pipes.
pub const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Appended to output that was cut because the pipe stayed open after the child ended.
pub const OUTPUT_CUT: &str =
    "\n[context-forkpool: output cut: the pipe stayed open after the child ended]\n";

/// The buffer, also after a reader panicked (the bytes read so far are still worth showing).
fn lock(m: &std::sync::Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A thread reading one pipe to its end into a shared buffer.
struct Capture {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Self {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = pipe.map(|mut p| {
            let buf = std::sync::Arc::clone(&buf);
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match p.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => lock(&buf).extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })
        });
        Self { buf, reader }
    }

    /// The output, once the pipe has closed or `until` has passed (then marked [`OUTPUT_CUT`]).
    fn finish(self, until: Instant) -> String {
        let mut cut = false;
        if let Some(r) = self.reader {
            while !r.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            if r.is_finished() {
                let _ = r.join();
            } else {
                cut = true; // detached: it ends when the last holder of the pipe closes it
            }
        }
        let mut s = String::from_utf8_lossy(&lock(&self.buf)).into_owned();
        if cut {
            s.push_str(OUTPUT_CUT);
        }
        s
    }
}

/// Whether this process is running an isolated entry (set while the entry runs).
#[must_use]
pub fn is_isolated() -> bool {
    IN_ENTRY.load(std::sync::atomic::Ordering::Relaxed)
}

static IN_ENTRY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn parse(v: &str) -> Option<(String, usize)> {
    let rest = v.strip_prefix("v1:")?;
    let (id, off) = rest.rsplit_once(':')?;
    Some((id.to_owned(), usize::from_str_radix(off, 16).ok()?))
}

#[cfg_attr(miri, allow(dead_code))]
extern "C" fn startup_hook() {
    let Some(v) = std::env::var_os(ENV) else {
        return;
    };
    // SAFETY: getauxval only reads the auxiliary vector; AT_SECURE is a valid type.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        // Set-uid/set-gid or otherwise privileged start: never act on the environment.
        return;
    }
    let v = v.to_string_lossy().into_owned();
    // SAFETY: this runs from .init_array before main, when the process has a single thread, so no
    // other thread can be reading the environment.
    unsafe { std::env::remove_var(ENV) };
    let Some((id, off)) = parse(&v) else {
        eprintln!("context-forkpool: malformed {ENV}");
        crate::sys::exit_now(EXIT_EXE_MISMATCH);
    };
    if exe_identity().ok().as_deref() != Some(id.as_str()) {
        eprintln!(
            "context-forkpool: {ENV} was made for another executable (rebuilt?); refusing to run"
        );
        crate::sys::exit_now(EXIT_EXE_MISMATCH);
    }
    let addr = (anchor as fn() -> i32 as usize).wrapping_add(off);
    // SAFETY: the parent computed `off` from a `fn() -> i32` of this same executable (checked to share
    // this crate's image), and the identity check above shows this is the same file, so the same
    // function sits at the same offset from `anchor`.
    let entry = unsafe { std::mem::transmute::<usize, fn() -> i32>(addr) };
    crate::sys::ignore_sigpipe();
    IN_ENTRY.store(true, std::sync::atomic::Ordering::Relaxed);
    let code = std::panic::catch_unwind(entry).unwrap_or(EXIT_PANIC);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    crate::sys::exit_now(code);
}

/// The start-up hook: the C runtime calls every `.init_array` entry before `main`. glibc passes
/// (argc, argv, envp), which a C-ABI function without parameters ignores (the caller cleans up), and
/// other runtimes (and Miri) pass nothing, so the hook takes no parameters, as the `ctor` crate's do.
/// Not compiled under Miri, which cannot exec.
#[cfg(not(miri))]
#[used]
// SAFETY: `.init_array` holds pointers to `extern "C" fn()`; `startup_hook` is one, and it returns at
// once unless ENV is set.
#[unsafe(link_section = ".init_array")]
static STARTUP_HOOK: extern "C" fn() = startup_hook;

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(not(miri))]
    use proptest::prelude::*;

    #[test]
    fn parse_accepts_what_command_writes() {
        assert_eq!(
            parse("v1:1:2:3:4.5:ff"),
            Some(("1:2:3:4.5".to_owned(), 255))
        );
        assert_eq!(parse("v2:1:ff"), None);
        assert_eq!(parse("v1:nohex:zz"), None);
    }

    #[cfg(not(miri))] // proptest's failure persistence touches the filesystem
    proptest! {
        #[test]
        fn parse_never_panics(s in ".*") {
            let _ = parse(&s);
        }
    }
}
