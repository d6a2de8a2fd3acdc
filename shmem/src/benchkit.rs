//! Cross-process measurement workloads shared by the criterion bench (`benches/shmem.rs`) and
//! `ctx bench shmem`, so both measure exactly the same thing, and every baseline runs between the
//! same two processes in the same run.
//!
//! [`Echo::spawn`] forks a child that echoes 16-byte messages over one [`Transport`];
//! [`Echo::roundtrips`] times round trips from the parent. [`bulk_write_xproc`] has a fresh child
//! fill a shared buffer that the parent then reads; [`BulkWriter`] is the same with a long-lived
//! worker.
//!
//! Forking: the child only runs a tight loop over descriptors and shared memory that exist before
//! the fork, allocates nothing it needs the parent's locks for, and leaves with `_exit`. This is
//! safe even if the parent has other threads (a progress thread), as long as the child does not
//! touch locks those threads might hold (stdio, the allocator's user-visible state).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::segment::{Segment, TypeId};
use crate::sync::{self, AtomicU32, Ordering};
use crate::{Channel, Error, SharedBuf, Side};

/// Size of one echoed message.
pub const MSG: usize = 16;

/// What carries the round trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// This crate's [`Channel`].
    Channel,
    /// A `socketpair(AF_UNIX, SOCK_STREAM)`.
    UnixSocket,
    /// Two pipes.
    Pipe,
    /// The bare mechanism under the channel: a shared word, spin briefly, then futex.
    SpinFutex,
}

/// A forked echo child and the parent's end of its transport.
pub struct Echo {
    pid: libc::pid_t,
    end: Option<End>,
}

enum End {
    Channel(crate::Endpoint),
    Socket(UnixStream),
    Pipe {
        tx: std::fs::File,
        rx: std::fs::File,
    },
    Word(Arc<Segment>),
}

impl std::fmt::Debug for Echo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Echo")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

const WORD_TYPE: TypeId = TypeId::of_name("context-shmem::benchkit::word/v1");
const SPIN: u32 = 2_000;

fn word(seg: &Segment, i: usize) -> &AtomicU32 {
    let p = seg
        .payload_ptr(i * 64, 4, 4)
        .unwrap_or_else(|_| unreachable!("segment made with 128 bytes"));
    // SAFETY: in bounds and aligned (checked), kept mapped by `seg`; only accessed atomically.
    unsafe { p.cast::<AtomicU32>().as_ref() }
}

/// Spin-then-futex wait until `w != old`; returns the new value.
fn word_wait(w: &AtomicU32, sleeping: &AtomicU32, old: u32) -> u32 {
    for _ in 0..SPIN {
        let v = w.load(Ordering::Acquire);
        if v != old {
            return v;
        }
        sync::spin_pause();
    }
    loop {
        sleeping.store(1, Ordering::SeqCst);
        let v = w.load(Ordering::SeqCst);
        if v != old {
            sleeping.store(0, Ordering::SeqCst);
            return v;
        }
        sync::futex_wait(w, old, Some(Duration::from_millis(50)));
        sleeping.store(0, Ordering::SeqCst);
    }
}

fn word_post(w: &AtomicU32, sleeping: &AtomicU32, v: u32) {
    w.store(v, Ordering::SeqCst);
    if sleeping.load(Ordering::SeqCst) != 0 {
        sync::futex_wake(w, 1);
    }
}

/// A benchmark-harness failure (a child misbehaved, a transport failed) as an [`Error::Io`].
fn fail(op: &'static str, what: impl std::fmt::Display) -> Error {
    Error::Io {
        op,
        source: std::io::Error::other(what.to_string()),
    }
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}

fn pipe() -> Result<(std::fs::File, std::fs::File), Error> {
    let (r, w) = nix::unistd::pipe().map_err(|e| Error::Io {
        op: "pipe",
        source: e.into(),
    })?;
    Ok((std::fs::File::from(r), std::fs::File::from(w)))
}

/// Forks. The child runs `f` and `_exit`s; the parent gets the child's pid. With `cpu`, the child
/// runs on that CPU: the forking thread pins itself there for the fork (the child inherits its
/// affinity) and returns to its own afterwards, so a CPU that cannot be used is this call's error,
/// not a child silently running elsewhere.
fn fork_then(cpu: Option<usize>, f: impl FnOnce() -> i32) -> Result<libc::pid_t, Error> {
    let pinned = cpu.map(pin_current_thread).transpose()?;
    // SAFETY: fork itself has no memory-safety preconditions; the child runs only `f`, a loop over
    // descriptors and shared memory created before the fork, and then `_exit`s without returning
    // into the caller, running destructors, or unwinding (a panic is caught and becomes 101).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::Io {
            op: "fork",
            source: std::io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // Keep the inherited pinning: the guard's restore is the parent's.
        std::mem::forget(pinned);
        // Die with the parent, so a crashed benchmark leaves no busy children behind.
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: ends the child at once, skipping atexit handlers and destructors that belong to
        // the parent's state.
        unsafe { libc::_exit(code) };
    }
    Ok(pid)
}

impl Echo {
    /// Forks an echo child for `t`, placed wherever the scheduler likes.
    ///
    /// # Errors
    /// Setting up the transport or forking failed.
    pub fn spawn(t: Transport) -> Result<Self, Error> {
        Self::spawn_on(t, None)
    }

    /// Forks an echo child for `t`, pinned to `cpu` if given. Pin the parent elsewhere with
    /// [`pin_current_thread`] to measure the two processes on different CPUs: otherwise the
    /// scheduler may put both on one CPU, where no spinning can succeed, and the figures swing
    /// between runs by two orders of magnitude.
    ///
    /// # Errors
    /// Setting up the transport or forking failed.
    pub fn spawn_on(t: Transport, cpu: Option<usize>) -> Result<Self, Error> {
        match t {
            Transport::Channel => {
                let ch = Channel::create(4096).map_err(|e| fail("echo channel", e))?;
                let pid = fork_then(cpu, || {
                    let Ok(mut ep) = ch.endpoint(Side::B) else {
                        return 2;
                    };
                    let mut buf = [0u8; MSG];
                    while let Ok(n) = ep.recv(&mut buf, None) {
                        if ep.send(&buf[..n], None).is_err() {
                            break;
                        }
                    }
                    0
                })?;
                let ep = ch
                    .endpoint(Side::A)
                    .map_err(|e| fail("echo channel side A", e))?;
                Ok(Self {
                    pid,
                    end: Some(End::Channel(ep)),
                })
            }
            Transport::UnixSocket => {
                let (a, b) = UnixStream::pair().map_err(io_err("socketpair"))?;
                let (mut a, mut b) = (Some(a), Some(b));
                let pid = fork_then(cpu, || {
                    drop(a.take()); // the parent's end: close it here, or EOF never comes
                    let Some(mut b) = b.take() else { return 2 };
                    let mut buf = [0u8; MSG];
                    while b.read_exact(&mut buf).is_ok() {
                        if b.write_all(&buf).is_err() {
                            break;
                        }
                    }
                    0
                })?;
                drop(b.take());
                let a = a
                    .take()
                    .ok_or_else(|| fail("socketpair", "parent end missing"))?;
                Ok(Self {
                    pid,
                    end: Some(End::Socket(a)),
                })
            }
            Transport::Pipe => {
                let (r1, w1) = pipe()?; // parent -> child
                let (r2, w2) = pipe()?; // child -> parent
                let mut child_ends = Some((r1, w2));
                let mut parent_ends = Some((w1, r2));
                let pid = fork_then(cpu, || {
                    drop(parent_ends.take());
                    let Some((mut r, mut w)) = child_ends.take() else {
                        return 2;
                    };
                    let mut buf = [0u8; MSG];
                    while r.read_exact(&mut buf).is_ok() {
                        if w.write_all(&buf).is_err() {
                            break;
                        }
                    }
                    0
                })?;
                drop(child_ends.take());
                let (tx, rx) = parent_ends
                    .take()
                    .ok_or_else(|| fail("pipe", "parent ends missing"))?;
                Ok(Self {
                    pid,
                    end: Some(End::Pipe { tx, rx }),
                })
            }
            Transport::SpinFutex => {
                let seg = Arc::new(Segment::create_memfd(256, WORD_TYPE)?);
                let pid = fork_then(cpu, || {
                    // word 0: ping (parent -> child), 1: pong, 2: child sleeping, 3: parent sleeping.
                    let (ping, pong, cs) = (word(&seg, 0), word(&seg, 1), word(&seg, 2));
                    let ps = word(&seg, 3);
                    let mut last = 0;
                    loop {
                        let v = word_wait(ping, cs, last);
                        if v == u32::MAX {
                            return 0;
                        }
                        last = v;
                        word_post(pong, ps, v);
                    }
                })?;
                Ok(Self {
                    pid,
                    end: Some(End::Word(seg)),
                })
            }
        }
    }

    /// Performs `n` round trips of a 16-byte message; panics never, returns an error if the child
    /// misbehaves.
    ///
    /// # Errors
    /// A transport error.
    pub fn roundtrips(&mut self, n: u64) -> Result<(), Error> {
        let msg = [7u8; MSG];
        let mut buf = [0u8; MSG];
        let Some(end) = &mut self.end else {
            return Ok(());
        };
        match end {
            End::Channel(ep) => {
                for _ in 0..n {
                    ep.send(&msg, None).map_err(|e| fail("channel send", e))?;
                    ep.recv(&mut buf, None)
                        .map_err(|e| fail("channel recv", e))?;
                }
            }
            End::Socket(s) => {
                for _ in 0..n {
                    s.write_all(&msg).map_err(io_err("write"))?;
                    s.read_exact(&mut buf).map_err(io_err("read"))?;
                }
            }
            End::Pipe { tx, rx } => {
                for _ in 0..n {
                    tx.write_all(&msg).map_err(io_err("write"))?;
                    rx.read_exact(&mut buf).map_err(io_err("read"))?;
                }
            }
            End::Word(seg) => {
                let (ping, pong, cs, ps) = (word(seg, 0), word(seg, 1), word(seg, 2), word(seg, 3));
                let mut v = ping.load(Ordering::SeqCst);
                for _ in 0..n {
                    v = if v >= u32::MAX - 1 { 1 } else { v + 1 };
                    let before = pong.load(Ordering::SeqCst);
                    word_post(ping, cs, v);
                    while word_wait(pong, ps, before) != v {}
                }
            }
        }
        Ok(())
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(End::Word(seg)) = &self.end {
            word_post(word(seg, 0), word(seg, 2), u32::MAX);
        }
        // Closing our end (channel close flag, EOF on socket/pipe) ends the child; SIGKILL after
        // 200 ms is the backstop, so drop never hangs.
        drop(self.end.take());
        reap(self.pid);
    }
}

fn cpu_set_of(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`, a valid exclusive cpu_set_t; CPUs beyond the
    // set's capacity are ignored by libc's implementation.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

fn set_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 means the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Keeps the calling thread pinned to one CPU; restores the previous affinity on drop.
#[derive(Debug)]
pub struct Pinned {
    old: Option<libc::cpu_set_t>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = set_affinity(old);
        }
    }
}

/// The calling thread's CPU affinity mask.
fn current_affinity() -> Result<libc::cpu_set_t, Error> {
    // SAFETY: all zeroes is a valid (empty) cpu_set_t, filled in by sched_getaffinity below.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(Error::Io {
            op: "sched_getaffinity",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(set)
}

/// The two lowest CPUs in `set`, if it has two.
fn lowest_two(set: &libc::cpu_set_t) -> Option<(usize, usize)> {
    let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads one bit of a valid cpu_set_t; `cpu` is below the set's capacity.
    let mut cpus = (0..bits).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, set) });
    Some((cpus.next()?, cpus.next()?))
}

/// The two CPUs the benchmarks place their two parties on (caller and partner thread, parent and
/// child process): the two lowest the calling thread may run on, as `taskset`, a container's
/// cpuset or `numactl` left its affinity mask. `None` if it may run on only one CPU, or if the
/// system grants it less than two CPUs' worth of time (`available_parallelism`, which also reads
/// cgroup quotas): the parties then share, and spinning designs measure as what they are there.
/// Call it before pinning anything.
///
/// # Errors
/// The affinity mask could not be read.
pub fn cpu_pair() -> Result<Option<(usize, usize)>, Error> {
    if std::thread::available_parallelism().map_or(true, |n| n.get() < 2) {
        return Ok(None);
    }
    Ok(lowest_two(&current_affinity()?))
}

/// Pins the calling thread to `cpu` until the returned guard drops.
///
/// # Errors
/// The affinity could not be read or set (for example `cpu` is not available to this process).
pub fn pin_current_thread(cpu: usize) -> Result<Pinned, Error> {
    let old = current_affinity()?;
    set_affinity(&cpu_set_of(cpu)).map_err(|source| Error::Io {
        op: "sched_setaffinity",
        source,
    })?;
    Ok(Pinned { old: Some(old) })
}

/// A private, zeroed, page-aligned buffer that forked children do not inherit (`MADV_DONTFORK`).
///
/// For baselines measured in a process that also forks: after a fork, every private page the child
/// shares is write-protected in the parent, so the parent's next write to each page takes a fault
/// (no copy once the child has exited, but one fault per 4 KiB page). A `memcpy` baseline into an
/// ordinary `Vec` is thus slowed by the fork that measured the case; this buffer is not.
pub struct NoForkBuf {
    map: memmap2::MmapMut,
}

impl std::fmt::Debug for NoForkBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoForkBuf")
            .field("len", &self.map.len())
            .finish()
    }
}

impl NoForkBuf {
    /// `len` zeroed bytes, pre-faulted.
    ///
    /// # Errors
    /// The mapping or `madvise` failed.
    pub fn new(len: usize) -> Result<Self, Error> {
        let mut map = memmap2::MmapMut::map_anon(len).map_err(io_err("mmap anonymous"))?;
        if len > 0 {
            // SAFETY: the range is exactly this private anonymous mapping (page-aligned start,
            // `len` bytes); MADV_DONTFORK only excludes it from future children's address spaces.
            let r = unsafe { libc::madvise(map.as_mut_ptr().cast(), len, libc::MADV_DONTFORK) };
            if r != 0 {
                return Err(Error::Io {
                    op: "madvise(MADV_DONTFORK)",
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        map.fill(0);
        Ok(Self { map })
    }

    /// The bytes.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

/// A long-lived forked worker that fills a shared buffer on request: the warm version of
/// [`bulk_write_xproc`]. The child populates its page tables for the buffer once, at start (a
/// fresh child has none for shared mappings), then on each request locks the buffer, copies `src`
/// into it, unlocks, and reports the nanoseconds that took (timed in the child). Requests and
/// replies travel over this crate's [`Channel`].
#[derive(Debug)]
pub struct BulkWriter {
    pid: libc::pid_t,
    ep: Option<crate::Endpoint>,
}

impl BulkWriter {
    /// Forks the worker. `src` must not be longer than `buf`.
    ///
    /// # Errors
    /// Setup or fork failed.
    pub fn spawn(buf: &SharedBuf<u8>, src: &[u8]) -> Result<Self, Error> {
        let ch = Channel::create(4096).map_err(|e| fail("bulk control channel", e))?;
        let pid = fork_then(None, || {
            let Ok(mut ep) = ch.endpoint(Side::B) else {
                return 2;
            };
            let _ = buf.segment().prefault();
            let mut req = [0u8; 8];
            while ep.recv(&mut req, None).is_ok() {
                let t0 = Instant::now();
                let ok = match buf.lock(None) {
                    Ok(mut g) => g.write_from(0, src).is_ok(),
                    Err(_) => false,
                };
                let ns = if ok {
                    u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
                } else {
                    0
                };
                if ep.send(&ns.to_le_bytes(), None).is_err() {
                    break;
                }
            }
            0
        })?;
        let ep = ch
            .endpoint(Side::A)
            .map_err(|e| fail("bulk control channel side A", e))?;
        Ok(Self { pid, ep: Some(ep) })
    }

    /// One fill; returns the child's lock + copy + unlock time in nanoseconds.
    ///
    /// # Errors
    /// The worker failed or died.
    pub fn fill(&mut self) -> Result<u64, Error> {
        let ep = self
            .ep
            .as_mut()
            .ok_or_else(|| fail("bulk worker", "closed"))?;
        let deadline = Some(Instant::now() + Duration::from_secs(60));
        ep.send(b"fill", deadline)
            .map_err(|e| fail("bulk worker request", e))?;
        let mut b = [0u8; 8];
        let n = ep
            .recv(&mut b, deadline)
            .map_err(|e| fail("bulk worker reply", e))?;
        let ns = u64::from_le_bytes(b);
        if n != 8 || ns == 0 {
            return Err(fail("bulk worker", "failed to fill the buffer"));
        }
        Ok(ns)
    }
}

impl Drop for BulkWriter {
    fn drop(&mut self) {
        drop(self.ep.take()); // closes the channel: the worker's recv fails and it exits
        reap(self.pid);
    }
}

/// Waits up to 200 ms for a child to exit, then SIGKILLs and reaps it.
fn reap(pid: libc::pid_t) {
    let deadline = Instant::now() + Duration::from_millis(200);
    loop {
        let mut st = 0;
        // SAFETY: waiting for our own child; `st` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r != 0 {
            return;
        }
        if Instant::now() > deadline {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above; blocking wait for the child we just killed.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One run of the bulk workload: a forked child locks `buf` and copies `src` into it; the parent
/// waits for the child, then locks and copies the buffer into `dst`. Returns
/// `(child_write_ns, parent_read_ns)`, each timed around lock + copy + unlock (the child's time
/// also includes populating its page tables for the shared mapping, see [`Segment::prefault`]).
///
/// # Errors
/// Forking failed, or the child failed (non-zero exit).
pub fn bulk_write_xproc(
    buf: &SharedBuf<u8>,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(u64, u64), Error> {
    let timing = crate::AtomicArray::create(1)?;
    let pid = fork_then(None, || {
        let t0 = Instant::now();
        // A forked child has no page-table entries for the shared mapping: populate them in one
        // call (timed, it is part of the child's cost) rather than faulting 16 384 times.
        let _ = buf.segment().prefault();
        let Ok(mut g) = buf.lock(None) else { return 2 };
        if g.write_from(0, src).is_err() {
            return 3;
        }
        drop(g);
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Some(w) = timing.get(0) {
            w.store(ns, std::sync::atomic::Ordering::SeqCst);
        }
        0
    })?;
    let mut st = 0;
    // SAFETY: waiting for our own child; `st` is a valid out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut st, 0) };
    if r != pid || !libc::WIFEXITED(st) || libc::WEXITSTATUS(st) != 0 {
        return Err(fail("bulk writer child", format!("wait status {st:#x}")));
    }
    let write_ns = timing
        .get(0)
        .map_or(0, |w| w.load(std::sync::atomic::Ordering::SeqCst));
    let t0 = Instant::now();
    let g = buf.lock(None)?;
    g.read_into(0, dst)?;
    drop(g);
    let read_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    Ok((write_ns, read_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(cpus: &[usize]) -> libc::cpu_set_t {
        let mut set = cpu_set_of(cpus[0]);
        for &c in &cpus[1..] {
            // SAFETY: CPU_SET writes one bit of `set`, a valid exclusive cpu_set_t.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        set
    }

    #[test]
    fn the_pair_is_the_two_lowest_cpus_of_the_mask() {
        assert_eq!(lowest_two(&set_of(&[0, 1])), Some((0, 1)));
        // A cpuset that excludes CPUs 0 and 1 (a container, `taskset -c 2,5`).
        assert_eq!(lowest_two(&set_of(&[5, 2, 9])), Some((2, 5)));
        assert_eq!(lowest_two(&set_of(&[3])), None);
        let last = 8 * std::mem::size_of::<libc::cpu_set_t>() - 1;
        assert_eq!(lowest_two(&set_of(&[last, 7])), Some((7, last)));
    }

    #[test]
    fn a_thread_allowed_one_cpu_gets_no_pair_and_a_pair_can_be_pinned() {
        let mask = current_affinity().expect("affinity");
        if let Some((a, b)) = cpu_pair().expect("pair") {
            // SAFETY: CPU_ISSET reads one bit of a valid cpu_set_t.
            let in_mask = |cpu| unsafe { libc::CPU_ISSET(cpu, &mask) };
            assert!(in_mask(a) && in_mask(b));
            assert!(a < b);
            for cpu in [a, b] {
                let pinned = pin_current_thread(cpu).expect("a CPU of the pair can be pinned");
                drop(pinned);
            }
        }
        let Some((only, _)) = lowest_two(&mask) else {
            assert_eq!(cpu_pair().expect("pair"), None, "one CPU in the mask");
            return;
        };
        // In a thread of its own: affinity is per thread, and the other tests run beside this one.
        std::thread::spawn(move || {
            let _pinned = pin_current_thread(only).expect("pin");
            assert_eq!(cpu_pair().expect("pair"), None);
        })
        .join()
        .expect("the restricted thread");
    }
}
