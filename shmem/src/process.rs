//! Process identity that survives PID reuse: a [`ProcessToken`] is `(pid, start time)`.
//!
//! A PID alone is not an identity: after a process dies its PID is recycled. The kernel's start time
//! of a process (field 22 of `/proc/<pid>/stat`, in clock ticks since boot) does not change while it
//! lives, and a new process that reuses the PID has a different one. So "token `(pid, start)` is
//! alive" means "`/proc/<pid>/stat` exists, shows the same start time, and the process is not a
//! zombie". This works for any observer, needs nothing from the (possibly dead) process itself, and
//! is what every liveness decision in this crate is based on.
//!
//! The token packs into one `u64` (`pid << 32 | start & 0xffff_ffff`) so it can be published with a
//! single atomic store or compare-and-swap. Keeping 32 bits of start time means a recycled PID is
//! mistaken for the dead process only if it started an exact multiple of 2^32 ticks (about 497 days
//! at 100 Hz) later, to the tick.
//!
//! Reading `/proc` here uses raw `open`/`read` into a stack buffer: no allocation, so it is usable in
//! a forked child of a multi-threaded parent.
//!
//! **Whose `/proc`, which PIDs.** A PID means something only in one PID namespace, and `/proc`
//! shows the processes of the namespace it was mounted for, which need not be the reader's (a
//! container that sees the host's `/proc`), and may hide processes (`hidepid=2`). So: this
//! process's own token is read from `/proc/self/stat` and refused unless that file's PID is the
//! one `getpid` returns ([`ProcessToken::current`]); while it is refused, every other token's
//! liveness is *unknown* (alive), never dead. A `/proc/<pid>` that does not exist proves death
//! only if `kill(pid, 0)` agrees (`ESRCH`): under `hidepid` a live process may be invisible. And
//! tokens from another PID namespace must not be compared at all: shared segments and name
//! records carry their creator's [`pid_namespace`], and openers refuse or ignore foreign ones.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// A process identity that is not fooled by PID reuse (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessToken(u64);

impl ProcessToken {
    /// Builds a token from a PID and a start time (clock ticks since boot).
    #[must_use]
    pub fn new(pid: u32, start_ticks: u64) -> Self {
        Self((u64::from(pid) << 32) | (start_ticks & 0xffff_ffff))
    }

    /// The packed form stored in shared memory (never 0 for a real process, whose PID is > 0).
    #[must_use]
    pub fn to_bits(self) -> u64 {
        self.0
    }

    /// Rebuilds a token from its packed form (`None` for 0, the "nobody" value).
    #[must_use]
    pub fn from_bits(bits: u64) -> Option<Self> {
        if bits >> 32 == 0 {
            None
        } else {
            Some(Self(bits))
        }
    }

    /// The PID part.
    #[must_use]
    pub fn pid(self) -> u32 {
        // The high half of a u64 always fits a u32.
        u32::try_from(self.0 >> 32).unwrap_or(u32::MAX)
    }

    /// The (truncated) start time part.
    #[must_use]
    pub fn start_ticks(self) -> u32 {
        u32::try_from(self.0 & 0xffff_ffff).unwrap_or(u32::MAX)
    }

    /// The token of the process with this PID right now (`None` if there is none, it is a zombie,
    /// or its status cannot be read).
    #[must_use]
    pub fn of_pid(pid: u32) -> Option<Self> {
        match read_stat(pid) {
            StatRead::Found(ref info) if exited(info) => None,
            StatRead::NoProcess | StatRead::Unknown => None,
            StatRead::Found(StatInfo { start, .. }) => Some(Self::new(pid, start)),
        }
    }

    /// The calling process's token (cached; recomputed after `fork`).
    ///
    /// # Errors
    /// If `/proc/self/stat` cannot be read (no procfs mounted), or shows another PID than
    /// `getpid` (the procfs at `/proc` belongs to another PID namespace, so no PID read from it
    /// means what this process would take it to mean).
    pub fn current() -> std::io::Result<Self> {
        match own_token() {
            Ok(t) => Ok(t),
            Err(OwnStat::ForeignProc { ours, shown }) => Err(std::io::Error::other(format!(
                "/proc/self/stat shows pid {shown} but this process is pid {ours}: the procfs at \
                 /proc belongs to another PID namespace (mount one for this namespace)"
            ))),
            Err(_) => Err(std::io::Error::other(
                "cannot read /proc/self/stat (is procfs mounted at /proc?)",
            )),
        }
    }

    /// Whether the process this token names is still running (not dead, not a zombie, PID not
    /// reused).
    ///
    /// Only positive evidence counts as death: `/proc/<pid>` does not exist (`ENOENT`/`ESRCH`), the
    /// process is a zombie, or the PID now belongs to a process with another start time. When the
    /// status cannot be read for any other reason (`EMFILE`, `ENFILE`, `EACCES` under `hidepid`,
    /// `ENOMEM`, a short or garbled read) the answer is *unknown* and this returns `true`: callers
    /// use "dead" to take over a lock or a channel side, and taking it from a live process would
    /// give two holders, while a wrong "alive" only delays recovery until a later check succeeds.
    /// For the same reason a missing `/proc/<pid>` counts as death only if `kill(pid, 0)` says
    /// `ESRCH` (under `hidepid=2` a live process of another user is invisible), and every token
    /// is alive while this process cannot read its own identity from `/proc` (see
    /// [`ProcessToken::current`]: PIDs read there would be another namespace's).
    #[must_use]
    pub fn is_alive(self) -> bool {
        if own_token().is_err() {
            return true;
        }
        liveness_from(self, read_stat(self.pid()))
    }
}

/// The identity of this process's PID namespace: the inode number of `/proc/self/ns/pid`
/// (cached; recomputed after `fork`, since a child may be in a namespace its parent made with
/// `unshare(CLONE_NEWPID)`). `None` if it cannot be read (no procfs, or a kernel before 3.8).
/// PIDs and [`ProcessToken`]s mean something only between processes with the same value.
#[must_use]
pub fn pid_namespace() -> Option<u32> {
    install_fork_hook();
    let cached = MY_PID_NS.load(Ordering::Relaxed);
    if cached != 0 {
        return Some(cached);
    }
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated literal path and a `stat` buffer that live across the call.
    if unsafe { libc::stat(c"/proc/self/ns/pid".as_ptr(), &mut st) } != 0 {
        return None;
    }
    // Namespace inode numbers are the kernel's `unsigned int` `ns.inum`, never 0.
    let ino = u32::try_from(st.st_ino).ok().filter(|&i| i != 0)?;
    MY_PID_NS.store(ino, Ordering::Relaxed);
    Some(ino)
}

/// This process's token, cached (without allocating: usable in a forked child).
fn own_token() -> Result<ProcessToken, OwnStat> {
    install_fork_hook();
    if let Some(t) = ProcessToken::from_bits(MY_TOKEN.load(Ordering::Relaxed)) {
        return Ok(t);
    }
    match own_stat() {
        OwnStat::Found(pid, info) => {
            let t = ProcessToken::new(pid, info.start);
            MY_TOKEN.store(t.0, Ordering::Relaxed);
            Ok(t)
        }
        other => Err(other),
    }
}

/// This process's full start time (clock ticks after boot), from `/proc/self/stat` (`None` if it
/// cannot be read, or `/proc` is another PID namespace's).
pub(crate) fn own_start_ticks() -> Option<u64> {
    match own_stat() {
        OwnStat::Found(_, info) => Some(info.start),
        OwnStat::ForeignProc { .. } | OwnStat::Unreadable => None,
    }
}

/// What `/proc/self/stat` says about this process.
enum OwnStat {
    Found(u32, StatInfo),
    /// The file's PID is not ours: `/proc` is another PID namespace's procfs.
    ForeignProc {
        ours: u32,
        shown: u32,
    },
    Unreadable,
}

fn own_stat() -> OwnStat {
    // SAFETY: getpid has no preconditions.
    let Ok(ours) = u32::try_from(unsafe { libc::getpid() }) else {
        return OwnStat::Unreadable;
    };
    let mut buf = [0u8; 1024];
    let Ok(len) = read_small_file(c"/proc/self/stat", &mut buf) else {
        return OwnStat::Unreadable;
    };
    let buf = &buf[..len];
    match (parse_stat_pid(buf), parse_stat(buf)) {
        (Some(shown), Some(info)) if shown == ours => OwnStat::Found(ours, info),
        (Some(shown), Some(_)) => OwnStat::ForeignProc { ours, shown },
        _ => OwnStat::Unreadable,
    }
}

/// The tri-state outcome of reading `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatRead {
    /// The file was read and parsed.
    Found(StatInfo),
    /// The kernel says there is no such process (`ENOENT` / `ESRCH`).
    NoProcess,
    /// Any other failure: the process may well be alive.
    Unknown,
}

/// Maps the errno of a failed `open`/`read` of `/proc/<pid>/stat` to the tri-state: only
/// `ENOENT` and `ESRCH` prove that the process is gone.
pub(crate) fn stat_error_kind(errno: i32) -> StatRead {
    if errno == libc::ENOENT || errno == libc::ESRCH {
        StatRead::NoProcess
    } else {
        StatRead::Unknown
    }
}

/// Whether a stat read shows a process that has exited: a zombie (or dead) entry whose threads
/// are all gone. A zombie *main thread* with other threads still running (it called
/// `pthread_exit`) is a live process: the kernel shows the group leader's state, `Z`, with a
/// thread count above 1.
fn exited(info: &StatInfo) -> bool {
    matches!(info.state, b'Z' | b'X' | b'x') && info.threads <= 1
}

/// Decides liveness of `token` from one stat read (see [`ProcessToken::is_alive`]).
pub(crate) fn liveness_from(token: ProcessToken, read: StatRead) -> bool {
    match read {
        StatRead::Found(ref info) if exited(info) => false,
        StatRead::NoProcess => false,
        StatRead::Found(StatInfo { start, .. }) => ProcessToken::new(token.pid(), start) == token,
        StatRead::Unknown => true,
    }
}

impl ProcessToken {}

/// Our own token, 0 until computed; reset to 0 in a forked child.
static MY_TOKEN: AtomicU64 = AtomicU64::new(0);
/// Our PID namespace's inode number, 0 until computed; reset to 0 in a forked child.
static MY_PID_NS: AtomicU32 = AtomicU32::new(0);
/// Bumped in every forked child, so per-process caches (lock slot registrations) know to redo work.
static FORK_GENERATION: AtomicU32 = AtomicU32::new(0);
static FORK_HOOK: Once = Once::new();
/// Whether `pthread_atfork` accepted the hook.
static FORK_HOOK_OK: AtomicBool = AtomicBool::new(false);

extern "C" fn after_fork_in_child() {
    MY_TOKEN.store(0, Ordering::Relaxed);
    MY_PID_NS.store(0, Ordering::Relaxed);
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Installs the fork hook before `main`: `.init_array` constructors run while the process is
/// still single-threaded, so no thread can be in the middle of the installation (a `Once` in the
/// "running" state) when another thread forks; a child that inherited such a state would wait for
/// it forever. Later calls of `install_fork_hook` find the `Once` complete and return at once.
#[used]
// SAFETY (attribute): the section holds one pointer to an `extern "C" fn()` taking no arguments,
// which is what the loader expects in `.init_array`; the function only completes a `Once` and
// calls `pthread_atfork`, both valid before `main`.
#[unsafe(link_section = ".init_array")]
static INSTALL_AT_START: extern "C" fn() = {
    extern "C" fn run() {
        install_fork_hook();
    }
    run
};

#[inline]
fn install_fork_hook() {
    FORK_HOOK.call_once(|| {
        // SAFETY: `after_fork_in_child` is an `extern "C" fn()` that only touches atomics (it is
        // async-signal-safe, as a child handler of a multi-threaded parent must be). The return value
        // (ENOMEM) leaves the hook uninstalled: `fork_hook_installed` says so.
        let r = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        FORK_HOOK_OK.store(r == 0, Ordering::Relaxed);
    });
}

/// A number that changes in each forked child (via `pthread_atfork`, so forks through libc's
/// `fork()`; a raw `clone` syscall bypasses it). Caches of per-process state (a lock registration,
/// this process's token) compare it: a value recorded in a process is smaller in its ancestors and
/// larger in its descendants, so an equal value means "recorded in this process". Meaningful only
/// while [`fork_hook_installed`] is true.
#[inline]
#[must_use]
pub fn fork_generation() -> u32 {
    install_fork_hook();
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// [`fork_generation`] without its installation step, for callers that have already seen
/// [`fork_hook_installed`] (or [`fork_generation`]) return in this process or an ancestor: the
/// installation is then complete (a forked child inherits the completed state), so this is the
/// same value without the check. One load, for hot paths that validate a per-process cache.
#[inline]
#[must_use]
pub fn fork_generation_installed() -> u32 {
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// Whether the hook behind [`fork_generation`] is installed (installed before `main`; only an
/// out-of-memory `pthread_atfork` leaves it out). Callers that cannot tolerate mistaking a child
/// for its parent refuse to work without it.
#[must_use]
pub fn fork_hook_installed() -> bool {
    install_fork_hook();
    FORK_HOOK_OK.load(Ordering::Relaxed)
}

/// What this crate needs from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatInfo {
    /// The state letter (R, S, D, Z, ...).
    pub(crate) state: u8,
    /// Field 20: the number of threads.
    pub(crate) threads: u64,
    /// Field 22: start time in clock ticks after boot.
    pub(crate) start: u64,
}

/// Parses the contents of `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted from the *last* `)`.
/// Returns `None` for anything malformed.
pub(crate) fn parse_stat(buf: &[u8]) -> Option<StatInfo> {
    let close = buf.iter().rposition(|&b| b == b')')?;
    let rest = buf.get(close + 1..)?;
    let mut fields = rest.split(|&b| b == b' ').filter(|f| !f.is_empty());
    let state = *fields.next()?.first()?;
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.trim_end().parse::<u64>().ok();
    // After the state (field 3), field 20 is the 17th next field and field 22 the 2nd after it.
    let threads = number(fields.nth(16)?)?;
    let start = number(fields.nth(1)?)?;
    Some(StatInfo {
        state,
        threads,
        start,
    })
}

/// The PID in a `/proc/<pid>/stat` line (field 1, before the command name). `None` if malformed.
pub(crate) fn parse_stat_pid(buf: &[u8]) -> Option<u32> {
    let end = buf.iter().position(|&b| b == b' ')?;
    std::str::from_utf8(&buf[..end]).ok()?.parse().ok()
}

/// Whether a process with this PID exists in our namespace, by `kill(pid, 0)`, which sees
/// processes `/proc` may hide: `Some(false)` only for `ESRCH`.
fn pid_exists(pid: u32) -> Option<bool> {
    let pid = libc::pid_t::try_from(pid).ok().filter(|&p| p > 0)?;
    // SAFETY: signal 0 sends nothing; it only checks that the process exists and may be signalled.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return Some(true);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ESRCH) => Some(false),
        Some(libc::EPERM) => Some(true),
        _ => None,
    }
}

/// Reads and parses `/proc/<pid>/stat` without allocating. A missing file is
/// [`StatRead::NoProcess`] only if [`pid_exists`] agrees; a process that `/proc` hides
/// (`hidepid=2`) is [`StatRead::Unknown`].
pub(crate) fn read_stat(pid: u32) -> StatRead {
    match read_stat_raw(pid) {
        StatRead::NoProcess if pid_exists(pid) != Some(false) => StatRead::Unknown,
        other => other,
    }
}

/// Reads the small file at `path` into `buf` without allocating; returns its length, or the
/// errno of the failed `open` or `read`.
fn read_small_file(path: &std::ffi::CStr, buf: &mut [u8]) -> Result<usize, i32> {
    // SAFETY:
    // - `path` is a NUL-terminated byte string that lives across the call.
    // - O_RDONLY|O_CLOEXEC opens without side effects.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    let mut len = 0usize;
    let mut failed = None;
    while len < buf.len() {
        let spare = &mut buf[len..];
        // SAFETY:
        // - `fd` is the descriptor opened above and not yet closed.
        // - `spare` is writable for `spare.len()` bytes.
        let r = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
        match usize::try_from(r) {
            Ok(0) => break,
            Ok(k) => len += k,
            Err(_) => {
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                if errno == libc::EINTR {
                    continue;
                }
                failed = Some(errno);
                break;
            }
        }
    }
    // SAFETY: `fd` was opened above, is owned by this function and is closed exactly once.
    unsafe { libc::close(fd) };
    failed.map_or(Ok(len), Err)
}

fn read_stat_raw(pid: u32) -> StatRead {
    let mut path = [0u8; 32];
    let mut n = 0;
    for &b in b"/proc/" {
        path[n] = b;
        n += 1;
    }
    let mut digits = [0u8; 10];
    let mut d = 0;
    let mut p = pid;
    loop {
        digits[d] = b'0' + u8::try_from(p % 10).unwrap_or(0);
        d += 1;
        p /= 10;
        if p == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        path[n] = digits[d];
        n += 1;
    }
    for &b in b"/stat" {
        path[n] = b;
        n += 1;
    }
    // `path` is NUL-terminated: at most 6 + 10 + 5 = 21 bytes were written into 32 zeroed bytes.
    let Ok(path) = std::ffi::CStr::from_bytes_until_nul(&path) else {
        return StatRead::Unknown;
    };
    let mut buf = [0u8; 1024];
    let len = match read_small_file(path, &mut buf) {
        Ok(len) => len,
        Err(errno) => return stat_error_kind(errno),
    };
    // A stat file that does not parse (truncated, an unexpected kernel format) proves nothing.
    parse_stat(&buf[..len]).map_or(StatRead::Unknown, StatRead::Found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_real_stat_line_with_awkward_name() {
        let line = b"1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615\n";
        assert_eq!(
            parse_stat(line),
            Some(StatInfo {
                state: b'S',
                threads: 1,
                start: 987_654
            })
        );
    }

    #[test]
    fn own_token_is_alive_and_stable() {
        let t = ProcessToken::current().unwrap();
        assert!(t.is_alive());
        assert_eq!(t.pid(), std::process::id());
        assert_eq!(ProcessToken::current().unwrap(), t);
        // The same PID with another start time is not us.
        let other = ProcessToken::new(t.pid(), u64::from(t.start_ticks()) + 1);
        assert!(!other.is_alive());
        assert_eq!(ProcessToken::from_bits(0), None);
    }

    #[test]
    fn only_no_such_process_errors_mean_dead() {
        let t = ProcessToken::new(4242, 777);
        assert_eq!(stat_error_kind(libc::ENOENT), StatRead::NoProcess);
        assert_eq!(stat_error_kind(libc::ESRCH), StatRead::NoProcess);
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EACCES,
            libc::EPERM,
            libc::ENOMEM,
            libc::EIO,
        ] {
            assert_eq!(stat_error_kind(errno), StatRead::Unknown, "errno {errno}");
            assert!(liveness_from(t, stat_error_kind(errno)), "errno {errno}");
        }
        assert!(!liveness_from(t, StatRead::NoProcess));
        let found = |state, threads, start| {
            StatRead::Found(StatInfo {
                state,
                threads,
                start,
            })
        };
        assert!(liveness_from(t, found(b'S', 1, 777)));
        assert!(liveness_from(t, found(b'S', 1, 777 + (1 << 32))));
        assert!(!liveness_from(t, found(b'S', 1, 778)));
        assert!(!liveness_from(t, found(b'Z', 1, 777)));
        assert!(!liveness_from(t, found(b'X', 1, 777)));
        // A zombie main thread whose other threads still run: the process lives.
        assert!(liveness_from(t, found(b'Z', 3, 777)));
        assert!(!liveness_from(t, found(b'Z', 3, 778)));
    }

    /// Review of 2026-12-03: a process whose main thread has exited while another thread runs
    /// shows state `Z` in `/proc/<pid>/stat`; it is alive all the same.
    #[test]
    fn a_process_whose_main_thread_exited_is_alive_while_a_thread_runs() {
        extern "C" fn worker(_: *mut libc::c_void) -> *mut libc::c_void {
            // SAFETY: a plain sleep.
            unsafe { libc::usleep(1_500_000) };
            // SAFETY: `_exit` ends the whole process, skipping the parent's atexit handlers.
            unsafe { libc::_exit(0) }
        }
        // SAFETY: the child creates one thread (glibc's fork handlers make that safe after fork)
        // and makes raw syscalls only; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut t: libc::pthread_t = 0;
            // SAFETY: `t` lives across the call; the thread takes no argument.
            let made = unsafe {
                libc::pthread_create(&mut t, std::ptr::null(), worker, std::ptr::null_mut())
            };
            if made != 0 {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(2) };
            }
            // The main thread alone exits (SYS_exit, not exit_group).
            // SAFETY: ends this thread only; the worker thread ends the process.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
        }
        let pid = u32::try_from(pid).unwrap();
        let token = ProcessToken::of_pid(pid);
        // Wait until the kernel shows the exited main thread.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let zombie_leader = loop {
            match read_stat(pid) {
                StatRead::Found(info) if info.state == b'Z' => break Some(info),
                _ if std::time::Instant::now() > until => break None,
                _ => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        };
        let alive = token.map(ProcessToken::is_alive);
        let again = ProcessToken::of_pid(pid);
        let mut status = 0;
        // SAFETY: reaps our own child; `status` lives across the call.
        unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        let info = zombie_leader.expect("the main thread's exit never showed as Z");
        assert!(info.threads >= 2, "{info:?}");
        assert_eq!(alive, Some(true));
        assert_eq!(again, token);
    }

    /// The reviewer's reproduction: with every descriptor in use, `open` fails with `EMFILE` and a
    /// live process must still be reported alive. Runs in a forked child so the lowered descriptor
    /// limit and the filled table do not disturb the other tests.
    #[test]
    fn emfile_does_not_make_a_live_process_dead() {
        let me = ProcessToken::current().unwrap();
        // SAFETY: the child only calls async-signal-safe functions (setrlimit, open, the raw
        // open/read/close of `is_alive`) and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let lim = libc::rlimit {
                rlim_cur: 32,
                rlim_max: 32,
            };
            // SAFETY: `lim` is a valid rlimit that lives across the call.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
            loop {
                // SAFETY: a NUL-terminated literal path; the descriptor is leaked on purpose.
                let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
                if fd < 0 {
                    break;
                }
            }
            let code = if read_stat(me.pid()) == StatRead::Unknown && me.is_alive() {
                0
            } else {
                1
            };
            // SAFETY: `_exit` is always safe to call; it skips the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status}"
        );
    }

    #[test]
    fn the_pid_field_is_read_before_the_command_name() {
        assert_eq!(parse_stat_pid(b"1234 (a b) S 1 2"), Some(1234));
        assert_eq!(parse_stat_pid(b"x (a) S"), None);
        assert_eq!(parse_stat_pid(b""), None);
        assert_eq!(parse_stat_pid(b"99999999999 (a) S"), None);
    }

    #[test]
    fn kill_zero_tells_an_existing_pid_from_a_gone_one() {
        assert_eq!(pid_exists(std::process::id()), Some(true));
        // PID 1 exists in every namespace (EPERM or success, both mean it exists).
        assert_eq!(pid_exists(1), Some(true));
        // A child we have reaped is gone, to /proc and to kill alike (its PID cannot come back
        // before the kernel has cycled through the whole PID space).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(pid_exists(pid), Some(false));
        assert_eq!(read_stat(pid), StatRead::NoProcess);
        assert_eq!(pid_exists(0), None);
    }

    #[test]
    fn own_identity_is_read_from_proc_self_and_names_this_process() {
        match own_stat() {
            OwnStat::Found(pid, _) => assert_eq!(pid, std::process::id()),
            _ => panic!("/proc/self/stat unreadable in the test environment"),
        }
        assert!(pid_namespace().is_some());
        assert_eq!(pid_namespace(), pid_namespace());
    }

    #[test]
    fn truncated_or_garbage_stat_is_none() {
        assert_eq!(parse_stat(b""), None);
        assert_eq!(parse_stat(b"12 (x) S 1 2 3"), None);
        assert_eq!(parse_stat(b"no paren at all"), None);
    }

    proptest::proptest! {
        #[test]
        fn parse_stat_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = parse_stat(&bytes);
        }

        #[test]
        fn parse_stat_finds_start_after_any_comm(comm in "[ -~]{0,20}", start: u64) {
            let line = format!("77 ({comm}) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 {start} 99 100\n");
            proptest::prop_assert_eq!(
                parse_stat(line.as_bytes()),
                Some(StatInfo { state: b'R', threads: 17, start })
            );
        }
    }
}
