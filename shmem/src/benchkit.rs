//! Cross-process measurement workloads shared by the criterion bench (`benches/shmem.rs`) and
//! `ctx bench shmem`, so both measure exactly the same thing, and every baseline runs between the
//! same two processes in the same run.
//!
//! [`Echo::spawn`] forks a child that echoes 16-byte messages over one [`Transport`];
//! [`Echo::roundtrips`] times round trips from the parent. [`bulk_write_xproc`] has a child fill a
//! shared buffer that the parent then reads.
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

/// Forks. The child runs `f` and `_exit`s; the parent gets the child's pid.
fn fork_then(f: impl FnOnce() -> i32) -> Result<libc::pid_t, Error> {
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
    /// Forks an echo child for `t`.
    ///
    /// # Errors
    /// Setting up the transport or forking failed.
    pub fn spawn(t: Transport) -> Result<Self, Error> {
        match t {
            Transport::Channel => {
                let ch = Channel::create(4096).map_err(|e| match e {
                    crate::ChannelError::Setup(e) => e,
                    _ => Error::BadHeader("channel setup"),
                })?;
                let pid = fork_then(|| {
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
                    .map_err(|_| Error::BadHeader("channel side A"))?;
                Ok(Self {
                    pid,
                    end: Some(End::Channel(ep)),
                })
            }
            Transport::UnixSocket => {
                let (a, b) = UnixStream::pair().map_err(io_err("socketpair"))?;
                let (mut a, mut b) = (Some(a), Some(b));
                let pid = fork_then(|| {
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
                let a = a.take().ok_or(Error::BadHeader("socket end"))?;
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
                let pid = fork_then(|| {
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
                let (tx, rx) = parent_ends.take().ok_or(Error::BadHeader("pipe ends"))?;
                Ok(Self {
                    pid,
                    end: Some(End::Pipe { tx, rx }),
                })
            }
            Transport::SpinFutex => {
                let seg = Arc::new(Segment::create_memfd(256, WORD_TYPE)?);
                let pid = fork_then(|| {
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
                    ep.send(&msg, None)
                        .map_err(|_| Error::BadHeader("channel send"))?;
                    ep.recv(&mut buf, None)
                        .map_err(|_| Error::BadHeader("channel recv"))?;
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
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            let mut st = 0;
            // SAFETY: waiting for our own child; `st` is a valid out-pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
            if r != 0 {
                return;
            }
            if Instant::now() > deadline {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                // SAFETY: as above; blocking wait for the child we just killed.
                unsafe { libc::waitpid(self.pid, &mut st, 0) };
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
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
    let pid = fork_then(|| {
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
        return Err(Error::BadHeader("bulk writer child failed"));
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
