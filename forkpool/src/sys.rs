//! The operating-system layer: every system call this crate makes, each in a small wrapper with its
//! preconditions argued once. Nothing above this module calls `libc` for memory mapping, files,
//! processes or sockets directly.
//!
//! Wrappers return `std::io::Error` (errno as data); the modules above turn it into their own errors.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The last OS error, as an `io::Error`.
fn last() -> io::Error {
    io::Error::last_os_error()
}

/// Converts a `-1`-on-error return into a `Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(last()) } else { Ok(ret) }
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; _SC_PAGESIZE is a valid name.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 { 4096 } else { v as usize }
}

/// Reserves `len` bytes of address space with no access and no backing (`PROT_NONE`,
/// `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`). Returns the start address.
pub(crate) fn reserve(len: usize) -> io::Result<usize> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing (addr = NULL, no
    // MAP_FIXED) cannot replace any existing mapping; the arguments are plain integers.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(last())
    } else {
        Ok(p as usize)
    }
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// The range must be owned by the caller (a reservation or regions inside it) and nothing in this
/// process may access it afterwards.
pub(crate) unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and promises no later access (function contract).
    cvt(unsafe { libc::munmap(addr as *mut libc::c_void, len) }).map(drop)
}

/// Maps `len` bytes of `fd` from offset 0 at exactly `addr`, read-write, `MAP_SHARED | MAP_FIXED`.
///
/// # Safety
/// `[addr, addr + len)` must lie inside a reservation owned by the caller that holds no live Rust
/// object (MAP_FIXED silently replaces whatever was there), and `fd` must be at least `len` long.
pub(crate) unsafe fn map_shared_fixed(addr: usize, len: usize, fd: RawFd) -> io::Result<()> {
    // SAFETY: the caller owns the target range and nothing lives there (function contract); the
    // file is long enough, so no access inside the mapping can raise SIGBUS.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(last())
    } else if p as usize != addr {
        Err(io::Error::other(
            "kernel placed a MAP_FIXED mapping elsewhere",
        ))
    } else {
        Ok(())
    }
}

/// Returns `[addr, addr + len)` to the reserved state (`PROT_NONE`, no backing), dropping this
/// process's reference to whatever file was mapped there.
///
/// # Safety
/// The range must lie inside a reservation owned by the caller and no live object of this process
/// may be in it.
pub(crate) unsafe fn map_over_reserved(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and nothing lives there (function contract).
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(last())
    } else {
        Ok(())
    }
}

/// `madvise(MADV_REMOVE)`: frees the backing store of a shared mapping's range (the pages of the
/// file), in every process that maps it.
///
/// # Safety
/// The range must be mapped shared by the caller and hold no live data anyone will read.
pub(crate) unsafe fn madvise_remove(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range is the caller's shared mapping holding no live data (function contract).
    cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_REMOVE) }).map(drop)
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` over `[off, off + len)` of `fd`.
pub(crate) fn punch_hole(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only touches the file's contents; the caller decides which range holds
    // no live data (a hole reads back as zeroes, which is memory-safe for every process).
    cvt(unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    })
    .map(drop)
}

/// A close-on-exec memfd named `name` (the name is only a label in `/proc/<pid>/fd`).
pub(crate) fn memfd(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = cvt(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An unnamed (`O_TMPFILE`), close-on-exec, mode 0600 file in directory `dir`: it has no name to
/// unlink, so it cannot outlive its last descriptor and mapping.
pub(crate) fn tmpfile_in(dir: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let mut bytes = dir.as_os_str().as_bytes().to_vec();
    bytes.push(0);
    let c = CStr::from_bytes_with_nul(&bytes)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path; O_TMPFILE requires O_RDWR and a mode, both given.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the length of `fd` (sparse: no blocks are allocated).
pub(crate) fn set_len(fd: &OwnedFd, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// Seals a memfd against growing, shrinking and further sealing, so no process can truncate it
/// under a mapping (which would turn accesses into SIGBUS).
pub(crate) fn seal(fd: &OwnedFd) -> io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain fcntl on a descriptor we own.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }).map(drop)
}

/// How many threads this process has, from `/proc/self/status`.
pub(crate) fn thread_count() -> io::Result<usize> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn resident_bytes() -> io::Result<u64> {
    let s = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("malformed /proc/self/statm"))?;
    Ok(pages * page_size() as u64)
}

/// Number of open file descriptors of this process (entries of `/proc/self/fd`, not counting the
/// descriptor used to read the directory).
pub fn open_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

/// Number of open descriptors of this process that refer to a memfd.
pub fn open_memfd_count() -> io::Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/fd")? {
        let e = e?;
        if let Ok(t) = std::fs::read_link(e.path()) {
            if t.to_string_lossy().starts_with("/memfd:") {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// A close-on-exec `SOCK_SEQPACKET` socket pair (message boundaries preserved).
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((a, b))
}

/// Sends one message, optionally passing one descriptor (`SCM_RIGHTS`). Never raises SIGPIPE.
pub(crate) fn send_msg(sock: RawFd, bytes: &[u8], pass: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // A control buffer large enough for one descriptor, aligned for cmsghdr.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = pass {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
        debug_assert!(space <= size_of_val(&cbuf));
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` valid, aligned bytes, so the first header fits.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cmsg.is_null() {
            return Err(io::Error::other("no room for SCM_RIGHTS header"));
        }
        // SAFETY: `cmsg` points into `cbuf` (checked non-null above), properly aligned.
        let hdr = unsafe { &mut *cmsg };
        hdr.cmsg_level = libc::SOL_SOCKET;
        hdr.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: pure size computation.
        hdr.cmsg_len = unsafe { libc::CMSG_LEN(size_of::<RawFd>() as u32) } as usize;
        // SAFETY: CMSG_DATA of a header inside `cbuf` points at room for one descriptor
        // (CMSG_SPACE above accounts for it).
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        // SAFETY: `data` has room for one RawFd; unaligned write because CMSG_DATA is only
        // guaranteed byte-aligned by the API.
        unsafe { std::ptr::write_unaligned(data.cast::<RawFd>(), fd) };
    }
    loop {
        // SAFETY: `msg` points at a valid iovec and (optionally) control buffer for the call.
        let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return if r as usize == bytes.len() {
                Ok(())
            } else {
                Err(io::Error::other("short send"))
            };
        }
        let e = last();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message into `buf`; returns its length (0 at end of stream) and a passed
/// descriptor, if any (received close-on-exec).
pub(crate) fn recv_msg(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    recv_msg_flags(sock, buf, 0)
}

/// As [`recv_msg`], but fails with `WouldBlock` at once when no message is queued.
pub(crate) fn try_recv_msg(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    recv_msg_flags(sock, buf, libc::MSG_DONTWAIT)
}

fn recv_msg_flags(
    sock: RawFd,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&cbuf);
    let n = loop {
        // SAFETY: `msg` points at valid buffers for the duration of the call.
        let r = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        if r >= 0 {
            break r as usize;
        }
        let e = last();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut passed = None;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR only reads its control fields.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if !cmsg.is_null() {
        // SAFETY: non-null header inside `cbuf`, written by the kernel.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: the kernel wrote at least one descriptor after the header.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            // SAFETY: `data` holds one descriptor, possibly unaligned.
            let fd = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>()) };
            // SAFETY: the kernel installed `fd` in our table for us; nobody else owns it.
            passed = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other("truncated control message"));
    }
    Ok((n, passed))
}

/// Waits until `fd` is readable or hung up, at most `timeout_ms` (negative: forever).
/// Returns whether it is ready.
pub(crate) fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = last();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It called exit with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(c) => write!(f, "exited with code {c}"),
            Self::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Reaps `pid` if it has ended (`WNOHANG`), or waits for it (`block`).
pub(crate) fn reap(pid: libc::pid_t, block: bool) -> io::Result<Option<ExitKind>> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int for the kernel to fill.
        let r = unsafe { libc::waitpid(pid, &mut status, if block { 0 } else { libc::WNOHANG }) };
        if r == 0 {
            return Ok(None);
        }
        if r == pid {
            break;
        }
        let e = last();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) {
        Ok(Some(ExitKind::Exited(libc::WEXITSTATUS(status))))
    } else if libc::WIFSIGNALED(status) {
        Ok(Some(ExitKind::Signaled(libc::WTERMSIG(status))))
    } else {
        Ok(None)
    }
}

/// Waits up to `timeout_ms` for child `pid` to end (a pidfd polled for readability, Linux 5.3+;
/// without pidfd, short sleeps), then reaps it if it has ended.
pub(crate) fn wait_exit(pid: libc::pid_t, timeout_ms: i32) -> io::Result<Option<ExitKind>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r >= 0 {
        // SAFETY: the kernel just returned this descriptor to us.
        let pidfd = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
        poll_readable(pidfd.as_raw_fd(), timeout_ms)?;
        return reap(pid, false);
    }
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms.max(0) as u64);
    loop {
        if let Some(k) = reap(pid, false)? {
            return Ok(Some(k));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
}

/// How long [`kill_and_reap`] waits, by default, for a child it sent `SIGKILL` to end. A killed
/// process ends as soon as it leaves the kernel; one in uninterruptible sleep (`D` state: a page
/// fault on a hung NFS or FUSE file, a device that does not answer) leaves only when that kernel call
/// returns, which may be never. Nobody waits for such a process without a bound.
pub(crate) const KILL_GRACE_MS: i32 = 2_000;

/// What became of a child after [`kill_and_reap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Killed {
    /// It ended and was reaped (`None`: the status was not an exit or a signal, or it had been
    /// reaped already).
    Reaped(Option<ExitKind>),
    /// It did not end within the grace: still our unreaped child, so its pid cannot be reused;
    /// reap it later ([`reap`] with `block = false`). It never runs user code again: `SIGKILL` is
    /// pending, and the kernel acts on it before any return to user space.
    Stuck,
}

/// Sends `SIGKILL` to child `pid` and reaps it, waiting at most `grace_ms` for it to end.
pub(crate) fn kill_and_reap(pid: libc::pid_t, grace_ms: i32) -> Killed {
    // SIGKILL is harmless on a zombie (not yet reaped, so the pid cannot have been reused).
    let _ = kill(pid, libc::SIGKILL);
    match wait_exit(pid, grace_ms) {
        Ok(None) => Killed::Stuck,
        Ok(Some(k)) => Killed::Reaped(Some(k)),
        // ECHILD: reaped already (or never ours); nothing is left to wait for.
        Err(_) => Killed::Reaped(None),
    }
}

/// Forks `pairs` times a child that exits at once, and reaps it: the bare cost of fork + waitpid,
/// the baseline of the pool's start-up. Returns the total time.
///
/// # Errors
/// [`crate::PoolError::MultiThreaded`] if the process has more than one thread; OS errors.
pub fn bare_fork_waitpid(pairs: usize) -> Result<std::time::Duration, crate::PoolError> {
    let threads = thread_count().map_err(crate::PoolError::os("reading /proc/self/status"))?;
    if threads != 1 {
        return Err(crate::PoolError::MultiThreaded { threads });
    }
    let t0 = std::time::Instant::now();
    for _ in 0..pairs {
        // SAFETY: the process was single-threaded above and starts no thread in this loop; the child
        // calls only _exit.
        let pid = unsafe { fork() }.map_err(crate::PoolError::os("fork"))?;
        if pid == 0 {
            exit_now(0);
        }
        reap(pid, true).map_err(crate::PoolError::os("waitpid"))?;
    }
    Ok(t0.elapsed())
}

/// A pipe, both ends close-on-exec: `(read, write)`.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded: the descriptor is new and owned by nobody else.
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((r, w))
}

/// Forks `n` children that each write one byte ("hello") into a pipe and then wait for the
/// parent to let them go, and returns the time until every hello has arrived: the bare cost of
/// what [`crate::Pool`]'s start-up waits for (its workers' hellos), without any of its setup.
/// Letting the children go and reaping them happen after the clock stopped.
///
/// # Errors
/// [`crate::PoolError::MultiThreaded`] if the process has more than one thread; OS errors.
pub fn bare_forks_until_hello(n: usize) -> Result<std::time::Duration, crate::PoolError> {
    use std::io::Read;
    let threads = thread_count().map_err(crate::PoolError::os("reading /proc/self/status"))?;
    if threads != 1 {
        return Err(crate::PoolError::MultiThreaded { threads });
    }
    let (hello_r, hello_w) = pipe().map_err(crate::PoolError::os("pipe"))?;
    let (go_r, go_w) = pipe().map_err(crate::PoolError::os("pipe"))?;
    let t0 = std::time::Instant::now();
    let mut pids = Vec::with_capacity(n);
    let mut forked = Ok(());
    for _ in 0..n {
        // SAFETY: the process was single-threaded above and starts no thread in this loop; the
        // child makes only async-signal-safe system calls (close, write, read, _exit).
        match unsafe { fork() } {
            Ok(0) => {
                // SAFETY: our copy of the write end of `go`, closed once, so that the read
                // below ends when the parent closes its copy.
                unsafe { libc::close(go_w.as_raw_fd()) };
                let b = [1u8];
                // SAFETY: a one-byte write from a live buffer into the inherited pipe.
                unsafe { libc::write(hello_w.as_raw_fd(), b.as_ptr().cast(), 1) };
                let mut sink = [0u8; 1];
                // SAFETY: a one-byte read into a live buffer; returns at EOF.
                unsafe { libc::read(go_r.as_raw_fd(), sink.as_mut_ptr().cast(), 1) };
                exit_now(0);
            }
            Ok(pid) => pids.push(pid),
            Err(e) => {
                forked = Err(crate::PoolError::os("fork")(e));
                break;
            }
        }
    }
    drop(hello_w);
    let mut hellos = std::fs::File::from(hello_r);
    let mut got = vec![0u8; pids.len()];
    let read = hellos.read_exact(&mut got);
    let took = t0.elapsed();
    drop(go_w);
    for pid in pids {
        let _ = reap(pid, true);
    }
    forked?;
    read.map_err(crate::PoolError::os("reading the children's hellos"))?;
    Ok(took)
}

/// Sends `sig` to `pid`.
pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall; `pid` is one of our own children (callers only pass those).
    cvt(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// This process's id.
pub(crate) fn getpid() -> libc::pid_t {
    // SAFETY: no preconditions.
    unsafe { libc::getpid() }
}

/// The parent's id.
pub(crate) fn getppid() -> libc::pid_t {
    // SAFETY: no preconditions.
    unsafe { libc::getppid() }
}

/// `fork()`. Returns 0 in the child, the child's pid in the parent.
///
/// # Safety
/// The calling process must be single-threaded (otherwise the child inherits locks held by threads
/// that do not exist in it), and the child must not return into code that assumes it is the parent.
pub(crate) unsafe fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: the caller guarantees a single-threaded process (function contract).
    let r = unsafe { libc::fork() };
    if r == -1 { Err(last()) } else { Ok(r) }
}

/// Child-side start-up right after fork, allocation-free: asks for SIGKILL when the parent dies,
/// then checks that the parent is still `parent` (it may have died before the request took
/// effect), moves `keep` to descriptor 3 and closes every other descriptor above 2.
/// Returns false if the parent is already gone (the caller must `_exit`).
pub(crate) fn child_after_fork(parent: libc::pid_t, keep: RawFd) -> bool {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number; no memory is involved.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 || getppid() != parent {
        return false;
    }
    if keep != 3 {
        // SAFETY: dup2 onto 3 only replaces a descriptor we are about to close anyway.
        if unsafe { libc::dup2(keep, 3) } != 3 {
            return false;
        }
    }
    // dup2 clears FD_CLOEXEC on the copy; keep it close-on-exec like everything else.
    // SAFETY: plain fcntl on descriptor 3, which now exists.
    unsafe { libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: close_range has no memory arguments; closing descriptors we do not own in the child
    // is the point (the child owns its copy of the table).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) };
    if r != 0 {
        // Kernels before 5.9 lack close_range: close one by one (no allocation) up to the limit.
        // SAFETY: sysconf has no preconditions.
        let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(64, 1 << 16) as libc::c_int;
        for fd in 4..max {
            // SAFETY: closing descriptors of the child's own table; EBADF for unused ones is fine.
            unsafe { libc::close(fd) };
        }
    }
    true
}

/// Leaves the process at once, without running atexit handlers or destructors.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}

/// Ignores SIGPIPE in this process (as the Rust runtime does before `main`).
pub(crate) fn ignore_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks a child that maps and touches `touch` bytes, then sleeps until killed. Only
    /// async-signal-safe calls in the child (the test harness has other threads).
    fn sleeping_child(touch: usize) -> libc::pid_t {
        // SAFETY: the child calls only mmap, plain stores, pause and _exit, all async-signal-safe.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if touch > 0 {
                // SAFETY: a fresh private anonymous mapping at an address of the kernel's choosing.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        touch,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    // SAFETY: the mapping is `touch` bytes, readable and writable, and ours alone.
                    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, touch) };
                }
            }
            loop {
                // SAFETY: pause has no preconditions; SIGKILL ends the child.
                unsafe { libc::pause() };
            }
        }
        pid
    }

    #[test]
    fn kill_and_reap_reaps_a_child_that_ends_within_the_grace() {
        let pid = sleeping_child(0);
        assert_eq!(
            kill_and_reap(pid, KILL_GRACE_MS),
            Killed::Reaped(Some(ExitKind::Signaled(libc::SIGKILL)))
        );
        // Reaped: waiting again is an error (ECHILD), not a hang.
        assert!(reap(pid, false).is_err());
    }

    #[test]
    fn kill_and_reap_does_not_wait_past_its_grace_for_a_child_still_ending() {
        // Tearing down 256 MiB of touched memory takes the kernel milliseconds: with no grace the
        // child is still there, unreaped (its pid stays its own), and is reaped later.
        let pid = sleeping_child(256 << 20);
        // Let it touch its memory first (about 0.1 s), so the kill meets a large address space.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let t0 = std::time::Instant::now();
        let killed = kill_and_reap(pid, 0);
        // Not waiting for the teardown is the point: far less than the teardown of a loaded
        // machine could ever take, but no fixed budget of ours either.
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
        match killed {
            // The usual case: still tearing down, left for a later reap.
            Killed::Stuck => assert_eq!(
                wait_exit(pid, 10_000).expect("wait"),
                Some(ExitKind::Signaled(libc::SIGKILL))
            ),
            // The kernel was quicker than the check after the kill: reaped at once, correctly.
            other => assert_eq!(
                other,
                Killed::Reaped(Some(ExitKind::Signaled(libc::SIGKILL)))
            ),
        }
    }
}
