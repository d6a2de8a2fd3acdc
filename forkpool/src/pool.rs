//! The supervised pool: the master forks workers that inherit the regions at the same addresses,
//! sends them jobs over one `SOCK_SEQPACKET` socket each, detects and replaces dead workers, grows
//! and releases regions with a barrier over every process, and resets shared memory when a crash
//! leaves it unprovable.
//!
//! The master never reads shared memory for its own bookkeeping: worker pids, sockets, job
//! sequence numbers, region offsets, sizes and descriptors all live in its private memory. Shared
//! memory is read only by the allocator checker, which treats it as untrusted data.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use crate::alloc::{Geometry, RawHeap};
use crate::error::{DeathCause, PoolError, RegionError};
use crate::heap::{Heap, JobArg};
use crate::region::{Backing, Regions, WorkerRegions};
use crate::sys;

const OP_RUN: u32 = 1;
const OP_MAP: u32 = 2;
const OP_UNMAP: u32 = 3;
const OP_PING: u32 = 4;

const ST_OK: u32 = 0;
const ST_PANIC: u32 = 1;
const ST_OS: u32 = 2;

const REQ_LEN: usize = 40;
/// Most workers a pool may have (each takes an allocator slot; slot 0 is the master's).
pub const MAX_WORKERS: usize = 1024;
const REP_LEN: usize = 24;

/// The type-erased entry a worker calls: `(context, user fn, address, metadata) -> result`.
type Trampoline = fn(&JobContext, usize, usize, usize) -> u64;

/// What the pool does when a worker dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeathPolicy {
    /// Repair what the dead process left in the allocator (its transitional chunks), check the whole
    /// allocator, and fork a replacement if it is consistent. The allocator is crash-consistent by
    /// construction, so this is sound for the heap; data structures the job was changing are the
    /// caller's to judge. If the check fails, the pool is reset (or poisoned while owners are alive).
    #[default]
    Replace,
    /// Treat every death during a job as unprovable (PostgreSQL's choice): reset shared memory if no
    /// typed owner is alive, else poison the pool until [`Pool::reset`].
    Reset,
}

/// A dead worker, as reported by [`Pool::take_deaths`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeathReport {
    /// Worker index.
    pub worker: usize,
    /// Its process id.
    pub pid: i32,
    /// How it ended.
    pub cause: DeathCause,
    /// Whether a job was running on it.
    pub during_job: bool,
    /// Allocator chunks the dead process left mid-operation and that were repaired.
    pub repaired_chunks: u64,
    /// What followed: replaced, reset or poisoned.
    pub outcome: DeathOutcome,
}

/// What the pool did about a death.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeathOutcome {
    /// A new worker took its index.
    Replaced,
    /// Shared memory was re-created and all workers restarted.
    Reset,
    /// The pool is poisoned until [`Pool::reset`] (owners were alive).
    Poisoned,
    /// It could not be replaced (the error is given).
    NotReplaced(String),
}

/// Settings for [`Pool`]; see [`Pool::builder`].
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    workers: usize,
    reserve: usize,
    initial: usize,
    chunk_shift: u32,
    backing: Backing,
    control_timeout: Duration,
    policy: DeathPolicy,
}

impl Default for PoolBuilder {
    fn default() -> Self {
        Self {
            workers: 2,
            reserve: 16 << 30,
            initial: 1 << 30,
            chunk_shift: 20,
            backing: Backing::Memfd,
            control_timeout: Duration::from_secs(10),
            policy: DeathPolicy::Replace,
        }
    }
}

impl PoolBuilder {
    /// Number of workers (default 2; 0 gives a heap without workers).
    #[must_use]
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }
    /// Address space reserved for all regions (default 16 GiB). The allocator's management area is
    /// sized for the whole reservation (about 1/128 of it, touched only as chunks are used).
    #[must_use]
    pub fn reserve(mut self, bytes: usize) -> Self {
        self.reserve = bytes;
        self
    }
    /// Size of the first region (default 1 GiB), management area included.
    #[must_use]
    pub fn initial_region(mut self, bytes: usize) -> Self {
        self.initial = bytes;
        self
    }
    /// Chunk size as a power of two (default 20: 1 MiB; 16..=30). Regions are whole chunks.
    #[must_use]
    pub fn chunk_shift(mut self, shift: u32) -> Self {
        self.chunk_shift = shift;
        self
    }
    /// Backing of the regions (default: memfd).
    #[must_use]
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }
    /// Timeout for control operations: start-up handshake, growth and release barriers (default 10 s).
    #[must_use]
    pub fn control_timeout(mut self, t: Duration) -> Self {
        self.control_timeout = t;
        self
    }
    /// What to do when a worker dies.
    #[must_use]
    pub fn death_policy(mut self, p: DeathPolicy) -> Self {
        self.policy = p;
        self
    }

    /// Reserves the address range, maps the first region, initialises the allocator in place and
    /// forks the workers.
    ///
    /// # Errors
    /// [`PoolError::MultiThreaded`] if this process has more than one thread (see [`crate::isolated`]);
    /// region, allocator or OS errors otherwise. Nothing is left behind on error.
    pub fn build(self) -> Result<Pool, PoolError> {
        Pool::start(self)
    }
}

/// Given to every job: which worker runs it, and the worker's handle on the shared heap.
pub struct JobContext {
    index: usize,
    workers: usize,
    heap: Heap,
}

impl JobContext {
    /// This worker's index, `0..workers()`.
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }
    /// How many workers the pool has.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.workers
    }
    /// The shared heap, as seen from this worker (allocations here are visible everywhere).
    #[must_use]
    pub fn heap(&self) -> &Heap {
        &self.heap
    }
}

#[derive(Debug)]
struct Worker {
    pid: libc::pid_t,
    sock: Option<OwnedFd>,
    seq: u32,
    pending: Option<Pending>,
}

/// The request a worker has not answered yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u32,
    /// A job (`OP_RUN`), as opposed to the hello or a control operation (ping, map, unmap). Only a
    /// death during a job can have left shared data half-changed.
    job: bool,
}

/// A pool of forked workers over fixed-address shared regions. See the crate docs.
pub struct Pool {
    cfg: PoolBuilder,
    regions: Regions,
    heap: Heap,
    raw: RawHeap,
    workers: Vec<Worker>,
    master: libc::pid_t,
    poisoned: Option<String>,
    deaths: Vec<DeathReport>,
    /// How many resets have begun. A barrier (grow, release) that sees it change stops: the reset
    /// re-created every region (new descriptors) and re-forked every worker from the master.
    resets: u64,
    /// Children sent `SIGKILL` that had not ended within [`sys::KILL_GRACE_MS`] (a process in
    /// uninterruptible sleep): not reaped yet, so their pids stay theirs; [`Pool::supervise`] and
    /// the pool's drop reap them without blocking once they end.
    stuck: Vec<libc::pid_t>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field(
                "workers",
                &self.workers.iter().map(|w| w.pid).collect::<Vec<_>>(),
            )
            .field("base", &format_args!("{:#x}", self.regions.base()))
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

fn encode_req(op: u32, seq: u32, a: u64, b: u64, c: u64, d: u64) -> [u8; REQ_LEN] {
    let mut m = [0u8; REQ_LEN];
    m[0..4].copy_from_slice(&op.to_le_bytes());
    m[4..8].copy_from_slice(&seq.to_le_bytes());
    for (k, v) in [a, b, c, d].into_iter().enumerate() {
        m[8 + k * 8..16 + k * 8].copy_from_slice(&v.to_le_bytes());
    }
    m
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn thread_check() -> Result<(), PoolError> {
    let threads = sys::thread_count().map_err(PoolError::os("reading /proc/self/status"))?;
    if threads == 1 {
        Ok(())
    } else {
        Err(PoolError::MultiThreaded { threads })
    }
}

fn tramp_fn(cx: &JobContext, f: usize, _: usize, _: usize) -> u64 {
    // SAFETY: `f` was made from a `fn(&JobContext) -> u64` by `Pool::run_fn` in the master; the worker
    // is a fork of the master, so the same code lives at the same address.
    let f = unsafe { std::mem::transmute::<usize, fn(&JobContext) -> u64>(f) };
    f(cx)
}

fn tramp_ref<A: JobArg>(cx: &JobContext, f: usize, addr: usize, meta: usize) -> u64 {
    // SAFETY: made from this exact fn type by `Pool::run`/`broadcast`; same image after fork.
    let f = unsafe { std::mem::transmute::<usize, fn(&JobContext, &A::Target) -> u64>(f) };
    // SAFETY: the master holds a shared borrow of the owner until this job has ended or this process
    // is killed (`Pool::run` waits or kills), and the region is mapped here at the same address.
    f(cx, unsafe { A::target(addr, meta) })
}

fn tramp_mut<A: JobArg>(cx: &JobContext, f: usize, addr: usize, meta: usize) -> u64 {
    // SAFETY: made from this exact fn type by `Pool::run_mut`; same image after fork.
    let f = unsafe { std::mem::transmute::<usize, fn(&JobContext, &mut A::Target) -> u64>(f) };
    // SAFETY: the master holds an exclusive borrow until the job ends or this process is killed.
    f(cx, unsafe { A::target_mut(addr, meta) })
}

/// How long a worker keeps polling for the next request after answering one, before it sleeps in
/// `recvmsg`. Waking a sleeping process on another CPU costs tens of microseconds on a VM (see
/// the workplace's shared/limits.md); a master that sends the next job at once finds the worker awake.
const WORKER_SPIN: Duration = Duration::from_micros(100);
/// How long the master polls for a reply before it sleeps in `poll`.
const MASTER_SPIN: Duration = Duration::from_micros(50);

/// Receives the next request: polls without blocking for `WORKER_SPIN`, then blocks.
fn next_request(sock: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    let until = Instant::now() + WORKER_SPIN;
    loop {
        match sys::try_recv_msg(sock, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= until {
                    return sys::recv_msg(sock, buf);
                }
                std::hint::spin_loop();
            }
            other => return other,
        }
    }
}

/// The worker's loop. Never returns: leaves with `_exit` when the master closes the socket.
fn worker_main(sock: RawFd, cx: JobContext, regions: WorkerRegions) -> ! {
    let mut buf = [0u8; 64];
    // Hello (sequence 0): the master learns the worker is running without asking first.
    let mut hello = [0u8; REP_LEN];
    hello[0..4].copy_from_slice(&ST_OK.to_le_bytes());
    hello[8..16].copy_from_slice(&u64::from(sys::getpid().unsigned_abs()).to_le_bytes());
    if sys::send_msg(sock, &hello, None).is_err() {
        sys::exit_now(0);
    }
    loop {
        let (n, fd) = match next_request(sock, &mut buf) {
            Ok((0, _)) | Err(_) => sys::exit_now(0),
            Ok(x) => x,
        };
        if n != REQ_LEN {
            sys::exit_now(3);
        }
        let op = u32_at(&buf, 0);
        let seq = u32_at(&buf, 4);
        let (a, b, c, d) = (
            u64_at(&buf, 8),
            u64_at(&buf, 16),
            u64_at(&buf, 24),
            u64_at(&buf, 32),
        );
        let (status, value) = match op {
            OP_PING => (ST_OK, u64::from(sys::getpid().unsigned_abs())),
            OP_RUN => {
                // SAFETY: the master only sends trampolines it took from this image.
                let t = unsafe { std::mem::transmute::<usize, Trampoline>(a as usize) };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    t(&cx, b as usize, c as usize, d as usize)
                }));
                match r {
                    Ok(v) => (ST_OK, v),
                    Err(_) => (ST_PANIC, 0),
                }
            }
            OP_MAP => match fd {
                // SAFETY: the master maps each region once, past all others, inside the reservation this
                // process inherited; no object lives there yet (the allocator limit is raised after).
                Some(fd) => match unsafe { regions.map(a as usize, b as usize, &fd) } {
                    Ok(()) => (ST_OK, 0),
                    Err(e) => (ST_OS, e.raw_os_error().unwrap_or(0) as u64),
                },
                None => (ST_OS, libc::EINVAL as u64),
            },
            OP_UNMAP => {
                // SAFETY: the master releases a region only when the allocator shows no live block in it
                // and no job is running (this process is between jobs here).
                match unsafe { regions.unmap(a as usize, b as usize) } {
                    Ok(()) => (ST_OK, 0),
                    Err(e) => (ST_OS, e.raw_os_error().unwrap_or(0) as u64),
                }
            }
            _ => sys::exit_now(3),
        };
        let mut rep = [0u8; REP_LEN];
        rep[0..4].copy_from_slice(&status.to_le_bytes());
        rep[4..8].copy_from_slice(&seq.to_le_bytes());
        rep[8..16].copy_from_slice(&value.to_le_bytes());
        if sys::send_msg(sock, &rep, None).is_err() {
            sys::exit_now(0);
        }
    }
}

impl Pool {
    /// Settings with defaults: 2 workers, 16 GiB reserved, a 1 GiB first region, 1 MiB chunks, memfd.
    #[must_use]
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    fn start(cfg: PoolBuilder) -> Result<Self, PoolError> {
        if cfg.workers > MAX_WORKERS {
            return Err(PoolError::TooManyWorkers(cfg.workers));
        }
        let geo = Geometry::new(
            cfg.chunk_shift,
            (cfg.reserve >> cfg.chunk_shift.min(63)) as u64,
        )?;
        let chunk = geo.chunk_size();
        if cfg.reserve % chunk != 0
            || cfg.initial % chunk != 0
            || cfg.initial <= geo.management_size()
        {
            return Err(RegionError::BadSize {
                size: cfg.initial as u64,
                why: "the reservation and the first region must be whole chunks, and the first region larger than the management area",
            }
            .into());
        }
        let mut regions = Regions::reserve(cfg.reserve, chunk, cfg.backing.clone())?;
        regions.add(cfg.initial)?;
        let base = NonNull::new(regions.base() as *mut u8)
            .ok_or(PoolError::Alloc(crate::AllocError::BadGeometry))?;
        // SAFETY: `base` is chunk-aligned (reserved with that alignment); the first region (management
        // area included) was just mapped from a fresh zero-filled file; nobody else exists yet; the
        // mapping lives as long as `regions`, which the pool drops last (and leaks if handles remain).
        let raw = unsafe { RawHeap::init(base, geo, (cfg.initial / chunk) as u64) }?;
        let heap = Heap::from_raw(raw);
        let mut pool = Self {
            cfg,
            regions,
            heap,
            raw,
            workers: Vec::new(),
            master: sys::getpid(),
            poisoned: None,
            resets: 0,
            deaths: Vec::new(),
            stuck: Vec::new(),
        };
        pool.spawn_all()?;
        Ok(pool)
    }

    fn spawn_all(&mut self) -> Result<(), PoolError> {
        self.workers.clear();
        if self.cfg.workers > 0 {
            thread_check()?;
        }
        for i in 0..self.cfg.workers {
            // Checked once above: nothing in this loop starts a thread.
            let w = self.fork_worker(i, true)?;
            self.workers.push(w);
        }
        // Every worker says hello (sequence 0) as soon as it runs; wait for all of them.
        for w in &mut self.workers {
            w.pending = Some(Pending { seq: 0, job: false });
        }
        let t = self.cfg.control_timeout;
        let deadline = Instant::now() + t;
        for i in 0..self.workers.len() {
            match self.recv(i, deadline, t)? {
                (ST_OK, _) => {}
                _ => return Err(self.kill_protocol(i, "bad handshake")),
            }
        }
        Ok(())
    }

    /// Forks worker `index`. The child path up to `worker_main` allocates nothing. `checked`: the
    /// caller has just verified that the process is single-threaded.
    fn fork_worker(&self, index: usize, checked: bool) -> Result<Worker, PoolError> {
        if !checked {
            thread_check()?;
        }
        let (master_end, worker_end) =
            sys::seqpacket_pair().map_err(PoolError::os("socketpair"))?;
        use std::io::Write;
        // Pending output would otherwise be written twice (once by the child, if a job prints).
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let cx = JobContext {
            index,
            workers: self.cfg.workers,
            heap: Heap::from_raw(self.raw.with_slot(index as u16 + 1)),
        };
        let wr = WorkerRegions {
            base: self.regions.base(),
            reserve_len: self.regions.reserve_len(),
        };
        let parent = self.master;
        let wfd = worker_end.as_raw_fd();
        // SAFETY: thread_check() (here or in the caller, `checked`) found one thread, and nothing in
        // between starts one; the child
        // never returns from this function (worker_main ends in _exit).
        match unsafe { sys::fork() }.map_err(PoolError::os("fork"))? {
            0 => {
                if !sys::child_after_fork(parent, wfd) {
                    sys::exit_now(2);
                }
                worker_main(3, cx, wr)
            }
            pid => {
                drop(worker_end);
                drop(cx);
                Ok(Worker {
                    pid,
                    sock: Some(master_end),
                    seq: 0,
                    pending: None,
                })
            }
        }
    }

    /// The shared heap (clone it to keep a handle).
    #[must_use]
    pub fn heap(&self) -> &Heap {
        &self.heap
    }

    /// Number of workers.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Process ids of the workers (0 for a worker that is dead and not yet replaced).
    #[must_use]
    pub fn worker_pids(&self) -> Vec<i32> {
        self.workers
            .iter()
            .map(|w| if w.sock.is_some() { w.pid } else { 0 })
            .collect()
    }

    /// Start address of the reservation (the same in every process).
    #[must_use]
    pub fn base_address(&self) -> usize {
        self.regions.base()
    }

    /// Bytes currently mapped (regions added, including released ones' address space).
    #[must_use]
    pub fn mapped_len(&self) -> usize {
        self.regions.next_off()
    }

    /// Reports of dead workers since the last call.
    pub fn take_deaths(&mut self) -> Vec<DeathReport> {
        std::mem::take(&mut self.deaths)
    }

    /// Why the pool is poisoned, if it is.
    #[must_use]
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn usable(&self, w: usize) -> Result<(), PoolError> {
        if let Some(p) = &self.poisoned {
            return Err(PoolError::Poisoned(p.clone()));
        }
        let wk = self.workers.get(w).ok_or(PoolError::NoSuchWorker(w))?;
        if wk.sock.is_none() {
            return Err(PoolError::WorkerDied {
                worker: w,
                pid: wk.pid,
                cause: DeathCause::ChannelLost,
            });
        }
        if wk.pending.is_some() {
            return Err(PoolError::Busy(w));
        }
        Ok(())
    }

    fn send(
        &mut self,
        w: usize,
        op: u32,
        args: [u64; 4],
        pass: Option<RawFd>,
    ) -> Result<u32, PoolError> {
        let wk = &mut self.workers[w];
        wk.seq = wk.seq.wrapping_add(1);
        let seq = wk.seq;
        let msg = encode_req(op, seq, args[0], args[1], args[2], args[3]);
        let fd = wk
            .sock
            .as_ref()
            .map(AsRawFd::as_raw_fd)
            .ok_or(PoolError::NoSuchWorker(w))?;
        if sys::send_msg(fd, &msg, pass).is_err() {
            return Err(self.on_death(w, None));
        }
        self.workers[w].pending = Some(Pending {
            seq,
            job: op == OP_RUN,
        });
        Ok(seq)
    }

    /// Waits for the pending reply of worker `w` until `deadline`.
    fn recv(
        &mut self,
        w: usize,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(u32, u64), PoolError> {
        let fd = self.workers[w]
            .sock
            .as_ref()
            .map(AsRawFd::as_raw_fd)
            .ok_or(PoolError::NoSuchWorker(w))?;
        let spin_until = (Instant::now() + MASTER_SPIN).min(deadline);
        let mut ready = false;
        while !ready && Instant::now() < spin_until {
            ready = sys::poll_readable(fd, 0).map_err(PoolError::os("poll"))?;
        }
        if !ready {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_millis().max(u128::from(!left.is_zero())))
                .unwrap_or(i32::MAX);
            if !sys::poll_readable(fd, ms).map_err(PoolError::os("poll"))? {
                return Err(PoolError::Timeout { worker: w, timeout });
            }
        }
        let mut buf = [0u8; 64];
        match sys::recv_msg(fd, &mut buf) {
            Ok((REP_LEN, _)) => {}
            Ok((0, _)) | Err(_) => return Err(self.on_death(w, None)),
            Ok(_) => return Err(self.kill_protocol(w, "reply of the wrong length")),
        }
        let (status, seq, value) = (u32_at(&buf, 0), u32_at(&buf, 4), u64_at(&buf, 8));
        if Some(seq) != self.workers[w].pending.map(|p| p.seq) {
            return Err(self.kill_protocol(w, "reply to a request that was not sent"));
        }
        self.workers[w].pending = None;
        Ok((status, value))
    }

    fn kill_protocol(&mut self, w: usize, what: &'static str) -> PoolError {
        let _ = self.on_death(w, Some(DeathCause::KilledByPool));
        PoolError::Protocol { worker: w, what }
    }

    fn control(
        &mut self,
        w: usize,
        op: u32,
        a: u64,
        b: u64,
        pass: Option<RawFd>,
    ) -> Result<u64, PoolError> {
        self.usable(w)?;
        self.send(w, op, [a, b, 0, 0], pass)?;
        let t = self.cfg.control_timeout;
        match self.recv(w, Instant::now() + t, t) {
            Ok((ST_OK, v)) => Ok(v),
            Ok((_, errno)) => {
                let e = PoolError::Os {
                    op: "worker-side mmap",
                    error: std::io::Error::from_raw_os_error(errno as i32),
                };
                // A worker whose view of the regions differs from the master's cannot be used.
                let _ = self.on_death(w, Some(DeathCause::KilledByPool));
                Err(e)
            }
            Err(PoolError::Timeout { .. }) => {
                let _ = self.on_death(w, Some(DeathCause::KilledByPool));
                Err(PoolError::Timeout {
                    worker: w,
                    timeout: t,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Handles a dead (or to-be-killed) worker: kill, reap, record, repair its allocator slot,
    /// check, and replace or reset. Returns the error to report for the operation that found it.
    fn on_death(&mut self, w: usize, forced: Option<DeathCause>) -> PoolError {
        self.on_death_inner(w, forced, false)
    }

    fn on_death_inner(&mut self, w: usize, forced: Option<DeathCause>, reaped: bool) -> PoolError {
        let pid = self.workers[w].pid;
        let during_job = self.workers[w].pending.take().is_some_and(|p| p.job);
        self.workers[w].sock = None;
        let status = if reaped {
            None
        } else {
            // Ends a live worker (forced, or one that closed its socket); harmless on a zombie.
            self.kill_and_reap(pid)
        };
        let cause = match (forced, status) {
            (Some(c), _) => c,
            (None, Some(k)) => DeathCause::Ended(k),
            (None, None) => DeathCause::ChannelLost,
        };
        let repaired = self.raw.reclaim_slot(w as u16 + 1);
        let consistent = self.check_with_retries();
        let unprovable = !consistent || (self.cfg.policy == DeathPolicy::Reset && during_job);
        let outcome = if unprovable {
            let why = if consistent {
                format!("worker {w} died during a job under DeathPolicy::Reset")
            } else {
                format!("allocator inconsistent after worker {w} died")
            };
            self.reset_or_poison(why)
        } else {
            match self.replace_worker(w) {
                Ok(()) => DeathOutcome::Replaced,
                Err(e) => DeathOutcome::NotReplaced(e),
            }
        };
        self.deaths.push(DeathReport {
            worker: w,
            pid,
            cause,
            during_job,
            repaired_chunks: repaired,
            outcome,
        });
        PoolError::WorkerDied {
            worker: w,
            pid,
            cause,
        }
    }

    /// Forks a replacement for slot `w` and waits for its hello. Never recurses into death
    /// handling: a replacement that does not answer is killed and the slot stays empty (a child
    /// that cannot start would otherwise be replaced forever).
    fn replace_worker(&mut self, w: usize) -> Result<(), String> {
        let nw = self.fork_worker(w, false).map_err(|e| e.to_string())?;
        let pid = nw.pid;
        let fd = nw.sock.as_ref().map(AsRawFd::as_raw_fd).unwrap_or(-1);
        let t = self.cfg.control_timeout;
        let ms = i32::try_from(t.as_millis()).unwrap_or(i32::MAX);
        let mut buf = [0u8; 64];
        // The worker's hello (sequence 0).
        let ok = sys::poll_readable(fd, ms).unwrap_or(false)
            && matches!(sys::recv_msg(fd, &mut buf), Ok((REP_LEN, _)))
            && u32_at(&buf, 0) == ST_OK
            && u32_at(&buf, 4) == 0;
        if ok {
            self.workers[w] = nw;
            Ok(())
        } else {
            drop(nw);
            let status = self.kill_and_reap(pid);
            Err(format!(
                "the replacement (pid {pid}) did not start: {status:?}"
            ))
        }
    }

    fn check_with_retries(&self) -> bool {
        // Other workers may be mid-operation; a real inconsistency persists, a race does not.
        for _ in 0..5 {
            if self.raw.check().is_consistent() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    fn reset_or_poison(&mut self, why: String) -> DeathOutcome {
        if self.heap.handle_count() == 1 {
            match self.reset() {
                Ok(()) => DeathOutcome::Reset,
                Err(e) => {
                    self.poisoned = Some(format!("{why}; reset failed: {e}"));
                    DeathOutcome::Poisoned
                }
            }
        } else {
            self.poisoned = Some(why);
            DeathOutcome::Poisoned
        }
    }

    fn kill_all(&mut self) {
        for w in 0..self.workers.len() {
            if self.workers[w].sock.take().is_some() {
                self.kill_and_reap(self.workers[w].pid);
            }
            self.workers[w].pending = None;
        }
    }

    /// Sends `SIGKILL` to child `pid` and reaps it, waiting at most [`sys::KILL_GRACE_MS`]; a
    /// child that has not ended by then is kept in `stuck` and reaped later. Returns how it ended
    /// (`None` if unknown or not yet).
    fn kill_and_reap(&mut self, pid: libc::pid_t) -> Option<sys::ExitKind> {
        match sys::kill_and_reap(pid, sys::KILL_GRACE_MS) {
            sys::Killed::Reaped(k) => k,
            sys::Killed::Stuck => {
                self.stuck.push(pid);
                None
            }
        }
    }

    /// Reaps, without blocking, the killed children that have ended since. Returns how many are
    /// still waited for.
    fn reap_stuck(&mut self) -> usize {
        self.stuck
            .retain(|&pid| matches!(sys::reap(pid, false), Ok(None)));
        self.stuck.len()
    }

    /// Resets the pool the way PostgreSQL resets shared memory after a backend crash: kills every
    /// worker, replaces every region with a blank file at the same address, initialises a fresh
    /// allocator in place and forks new workers. Everything in shared memory is lost.
    ///
    /// # Errors
    /// [`PoolError::HandlesAlive`] if typed owners or [`Heap`] clones are still alive (they would
    /// point at blank memory); region, allocator or fork errors otherwise (the pool stays poisoned).
    pub fn reset(&mut self) -> Result<(), PoolError> {
        let handles = self.heap.handle_count();
        if handles > 1 {
            return Err(PoolError::HandlesAlive(handles - 1));
        }
        self.poisoned = Some("reset in progress".into());
        self.resets += 1;
        self.kill_all();
        // SAFETY: every worker is dead and reaped, and no handle into the heap exists in the master
        // (count checked above), so nothing uses the regions.
        if let Err(e) = unsafe { self.regions.recreate() } {
            // Nothing was replaced: the heap is as it was, still mapped, without workers.
            self.poisoned = Some(format!(
                "reset failed ({e}); the heap is unchanged and has no workers: reset again"
            ));
            return Err(e.into());
        }
        let geo = self.raw.geometry();
        let limit = (self.regions.next_off() / geo.chunk_size()) as u64;
        // SAFETY: same base and geometry as before; every region is a fresh zero-filled file mapped at
        // its old address; the old heap handle is the only one and is replaced below.
        let raw = unsafe { RawHeap::init(self.raw.base(), geo, limit) }?;
        for r in self.regions.regions().iter().filter(|r| r.fd.is_none()) {
            let shift = geo.chunk_size().trailing_zeros();
            raw.release_chunks((r.off >> shift) as u64, ((r.off + r.len) >> shift) as u64)?;
        }
        self.raw = raw;
        self.heap = Heap::from_raw(raw);
        self.poisoned = None;
        if let Err(e) = self.spawn_all() {
            self.kill_all();
            self.poisoned = Some(format!("reset could not start workers: {e}"));
            return Err(e);
        }
        Ok(())
    }

    /// Runs `f` on worker `w` with no argument and waits for its result.
    ///
    /// # Errors
    /// [`PoolError::Timeout`] (the job keeps running; wait again with [`Pool::wait`]),
    /// [`PoolError::WorkerDied`], [`PoolError::JobPanicked`], [`PoolError::Busy`],
    /// [`PoolError::Poisoned`], [`PoolError::NoSuchWorker`] for a worker index out of range.
    pub fn run_fn(
        &mut self,
        w: usize,
        f: fn(&JobContext) -> u64,
        timeout: Duration,
    ) -> Result<u64, PoolError> {
        self.usable(w)?;
        self.send(
            w,
            OP_RUN,
            [
                tramp_fn as Trampoline as usize as u64,
                f as usize as u64,
                0,
                0,
            ],
            None,
        )?;
        self.wait(w, timeout)
    }

    /// Waits for the result of the job pending on worker `w` (after a [`PoolError::Timeout`] of
    /// [`Pool::run_fn`]).
    ///
    /// # Errors
    /// As [`Pool::run_fn`]; [`PoolError::Protocol`] if nothing is pending.
    pub fn wait(&mut self, w: usize, timeout: Duration) -> Result<u64, PoolError> {
        if self
            .workers
            .get(w)
            .ok_or(PoolError::NoSuchWorker(w))?
            .pending
            .is_none()
        {
            return Err(PoolError::Protocol {
                worker: w,
                what: "no job pending",
            });
        }
        match self.recv(w, Instant::now() + timeout, timeout)? {
            (ST_OK, v) => Ok(v),
            (ST_PANIC, _) => Err(PoolError::JobPanicked { worker: w }),
            _ => Err(self.kill_protocol(w, "unknown reply status")),
        }
    }

    /// Runs `f` on worker `w` with shared access to `arg` (which lives in the shared heap) and waits
    /// for its result. The borrow of `arg` lasts until the job has ended: on timeout the worker is
    /// killed (and replaced), so no process can still read `arg` when this returns.
    ///
    /// # Errors
    /// As [`Pool::run_fn`], except that a timeout kills the worker; and
    /// [`PoolError::ForeignArgument`] for an argument that does not live in this pool's heap.
    pub fn run<A: JobArg>(
        &mut self,
        w: usize,
        f: fn(&JobContext, &A::Target) -> u64,
        arg: &A,
        timeout: Duration,
    ) -> Result<u64, PoolError>
    where
        A::Target: Sync,
    {
        self.usable(w)?;
        let (addr, meta) = self.check_arg(arg)?;
        let t = tramp_ref::<A> as Trampoline as usize as u64;
        self.send(
            w,
            OP_RUN,
            [t, f as usize as u64, addr as u64, meta as u64],
            None,
        )?;
        self.wait_or_kill(w, timeout)
    }

    /// Runs `f` on worker `w` with exclusive access to `arg`. As [`Pool::run`]: a timeout kills the
    /// worker so that the exclusive borrow really ends when this returns.
    ///
    /// # Errors
    /// As [`Pool::run`].
    pub fn run_mut<A: JobArg>(
        &mut self,
        w: usize,
        f: fn(&JobContext, &mut A::Target) -> u64,
        arg: &mut A,
        timeout: Duration,
    ) -> Result<u64, PoolError>
    where
        A::Target: Send,
    {
        self.usable(w)?;
        let (addr, meta) = self.check_arg(arg)?;
        let t = tramp_mut::<A> as Trampoline as usize as u64;
        self.send(
            w,
            OP_RUN,
            [t, f as usize as u64, addr as u64, meta as u64],
            None,
        )?;
        self.wait_or_kill(w, timeout)
    }

    /// Runs `f` on every worker at once with shared access to `arg`; returns each worker's result.
    /// One deadline covers all; workers still running at the deadline are killed (and replaced).
    pub fn broadcast<A: JobArg>(
        &mut self,
        f: fn(&JobContext, &A::Target) -> u64,
        arg: &A,
        timeout: Duration,
    ) -> Vec<Result<u64, PoolError>>
    where
        A::Target: Sync,
    {
        self.broadcast_during(f, arg, timeout, |_, _| ()).0
    }

    /// As [`Pool::broadcast`], running `during` in the master while the workers run (for example to
    /// allocate from the master at the same time, or to inject a fault); `during` gets the heap and
    /// the worker pids. If `during` panics, every worker that got the job is killed (and replaced)
    /// before the panic goes on, so none still reads `arg` once the borrow ends.
    pub fn broadcast_during<A: JobArg, R>(
        &mut self,
        f: fn(&JobContext, &A::Target) -> u64,
        arg: &A,
        timeout: Duration,
        during: impl FnOnce(&Heap, &[i32]) -> R,
    ) -> (Vec<Result<u64, PoolError>>, R)
    where
        A::Target: Sync,
    {
        let (addr, meta) = match self.check_arg(arg) {
            Ok(x) => x,
            Err(_) => {
                let errs = (0..self.workers.len())
                    .map(|_| Err(PoolError::ForeignArgument))
                    .collect();
                let pids = self.worker_pids();
                return (errs, during(&self.heap, &pids));
            }
        };
        let t = tramp_ref::<A> as Trampoline as usize as u64;
        self.broadcast_raw(
            [t, f as usize as u64, addr as u64, meta as u64],
            timeout,
            during,
        )
    }

    /// Runs `f` (no argument) on every worker at once; returns each worker's result.
    pub fn broadcast_fn(
        &mut self,
        f: fn(&JobContext) -> u64,
        timeout: Duration,
    ) -> Vec<Result<u64, PoolError>> {
        self.broadcast_fn_during(f, timeout, |_, _| ()).0
    }

    /// As [`Pool::broadcast_fn`], running `during` in the master while the workers run.
    pub fn broadcast_fn_during<R>(
        &mut self,
        f: fn(&JobContext) -> u64,
        timeout: Duration,
        during: impl FnOnce(&Heap, &[i32]) -> R,
    ) -> (Vec<Result<u64, PoolError>>, R) {
        let t = tramp_fn as Trampoline as usize as u64;
        self.broadcast_raw([t, f as usize as u64, 0, 0], timeout, during)
    }

    fn broadcast_raw<R>(
        &mut self,
        args: [u64; 4],
        timeout: Duration,
        during: impl FnOnce(&Heap, &[i32]) -> R,
    ) -> (Vec<Result<u64, PoolError>>, R) {
        let sent: Vec<Result<u32, PoolError>> = (0..self.workers.len())
            .map(|w| {
                self.usable(w)?;
                self.send(w, OP_RUN, args, None)
            })
            .collect();
        let pids = self.worker_pids();
        // If `during` panics, the unwinding would end the caller's borrow of the argument (and may
        // drop it) while workers still read it: kill every worker that got the job first.
        let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            during(&self.heap, &pids)
        })) {
            Ok(r) => r,
            Err(payload) => {
                for (w, s) in sent.iter().enumerate() {
                    if s.is_ok() && self.workers[w].pending.is_some() {
                        let _ = self.on_death(w, Some(DeathCause::KilledByPool));
                    }
                }
                std::panic::resume_unwind(payload)
            }
        };
        let deadline = Instant::now() + timeout;
        let results = sent
            .into_iter()
            .enumerate()
            .map(|(w, s)| {
                s?;
                self.finish(w, deadline, timeout)
            })
            .collect();
        (results, r)
    }

    /// The argument's address and metadata, if it lies in this pool's heap (an owner from another
    /// pool's heap is not mapped in these workers).
    fn check_arg<A: JobArg>(&self, arg: &A) -> Result<(usize, usize), PoolError> {
        let (addr, meta) = arg.parts();
        if self.heap.contains(addr as *const u8) {
            Ok((addr, meta))
        } else {
            Err(PoolError::ForeignArgument)
        }
    }

    fn wait_or_kill(&mut self, w: usize, timeout: Duration) -> Result<u64, PoolError> {
        self.finish(w, Instant::now() + timeout, timeout)
    }

    fn finish(&mut self, w: usize, deadline: Instant, timeout: Duration) -> Result<u64, PoolError> {
        match self.recv(w, deadline, timeout) {
            Ok((ST_OK, v)) => Ok(v),
            Ok((ST_PANIC, _)) => Err(PoolError::JobPanicked { worker: w }),
            Ok(_) => Err(self.kill_protocol(w, "unknown reply status")),
            Err(PoolError::Timeout { .. }) => {
                let _ = self.on_death(w, Some(DeathCause::KilledByPool));
                Err(PoolError::Timeout { worker: w, timeout })
            }
            Err(e) => {
                // Any other failure (poll failing, say) leaves the job running as far as we know:
                // the caller's borrow of the argument ends when this returns, so the worker must
                // not outlive it (errors that already handled the worker took `pending`).
                if self.workers[w].pending.is_some() {
                    let _ = self.on_death(w, Some(DeathCause::KilledByPool));
                }
                Err(e)
            }
        }
    }

    fn all_idle(&self) -> Result<(), PoolError> {
        if let Some(p) = &self.poisoned {
            return Err(PoolError::Poisoned(p.clone()));
        }
        match self.workers.iter().position(|w| w.pending.is_some()) {
            Some(w) => Err(PoolError::Busy(w)),
            None => Ok(()),
        }
    }

    /// Adds a region of `bytes` (whole chunks) at the next reserved address and maps it in every
    /// worker before the allocator may hand out any of it (a barrier: the allocator's limit is raised
    /// only after every live worker has acknowledged the mapping). Returns the region index.
    ///
    /// # Errors
    /// [`PoolError::Busy`] if a job is running; [`PoolError::Poisoned`] if the pool is poisoned
    /// (before, or by a death during the barrier); region errors. A worker that fails to map is
    /// killed and replaced (the replacement inherits the mapping) and reported by
    /// [`Pool::take_deaths`].
    pub fn grow(&mut self, bytes: usize) -> Result<usize, PoolError> {
        self.all_idle()?;
        let chunk = self.raw.geometry().chunk_size();
        if bytes == 0 || bytes % chunk != 0 {
            return Err(RegionError::BadSize {
                size: bytes as u64,
                why: "regions must be whole chunks",
            }
            .into());
        }
        let idx = self.regions.add(bytes)?;
        let (off, len) = {
            let r = &self.regions.regions()[idx];
            (r.off, r.len)
        };
        let fd = self.regions.regions()[idx]
            .fd
            .as_ref()
            .map(AsRawFd::as_raw_fd)
            .ok_or(RegionError::NoSuchRegion(idx))?;
        let resets = self.resets;
        for w in 0..self.workers.len() {
            if self.resets != resets {
                // A death below led to a reset: `fd` is closed (its number may name another file
                // by now), and every worker was forked afresh from this process, which has the
                // region mapped. The reset's new allocator already covers the region.
                break;
            }
            if self.workers[w].sock.is_none() {
                continue;
            }
            // A worker that fails to map (or to answer) is killed and replaced; the replacement is
            // forked from this process, which has the region mapped already. Both show up in
            // `take_deaths`; the barrier holds either way.
            let _ = self.control(w, OP_MAP, off as u64, len as u64, Some(fd));
        }
        if let Some(p) = &self.poisoned {
            // Workers after the one whose death poisoned the pool were skipped: the region must
            // not be handed out. `reset` re-forks them all and covers it.
            return Err(PoolError::Poisoned(p.clone()));
        }
        // Every live worker has it mapped, so the allocator may hand it out.
        // SAFETY: chunks up to the new end are mapped in this process and every live worker.
        unsafe { self.raw.raise_limit(((off + len) / chunk) as u64) }?;
        Ok(idx)
    }

    /// Returns region `idx` to the system the design note's way: checks that no block lives in it
    /// and marks its chunks released (so no process can allocate there), maps the reservation back
    /// over it in the master (`MAP_FIXED`, `PROT_NONE`) and closes the file, then, as an epoch
    /// barrier, has every worker do the same between jobs (each acknowledges before the call
    /// returns). When the last mapping goes, the file's pages are freed in every process.
    ///
    /// # Errors
    /// [`crate::AllocError::InUse`] if live blocks remain (nothing changes); [`PoolError::Busy`];
    /// region errors.
    pub fn release_region(&mut self, idx: usize) -> Result<(), PoolError> {
        self.all_idle()?;
        let chunk = self.raw.geometry().chunk_size();
        let (off, len) = match self.regions.regions().get(idx) {
            Some(r) if r.fd.is_some() => (r.off, r.len),
            _ => return Err(RegionError::NoSuchRegion(idx).into()),
        };
        let from = (off / chunk) as u64;
        if from < self.raw.geometry().mgmt_chunks() {
            return Err(RegionError::BadSize {
                size: len as u64,
                why: "the first region holds the allocator",
            }
            .into());
        }
        self.raw
            .release_chunks(from, ((off + len) / chunk) as u64)?;
        // The master first: a worker replaced during the barrier below is forked without the region.
        // SAFETY: the allocator holds no live block in the region and every chunk is marked released,
        // so nothing of ours lives there and no process can allocate there any more.
        unsafe { self.regions.release(idx) }?;
        let resets = self.resets;
        for w in 0..self.workers.len() {
            if self.resets != resets {
                // Every worker was re-forked by a reset from this process, which no longer maps it.
                break;
            }
            if self.workers[w].sock.is_none() {
                continue;
            }
            // A worker that fails is killed (its mapping goes with it) and replaced; see grow().
            let _ = self.control(w, OP_UNMAP, off as u64, len as u64, None);
        }
        if let Some(p) = &self.poisoned {
            // The workers after the death still map the region, so its pages stay allocated until
            // `reset` (nothing can allocate there: its chunks are released).
            return Err(PoolError::Poisoned(p.clone()));
        }
        Ok(())
    }

    /// Returns the pages of every free chunk to the system by hole punching
    /// (`fallocate(PUNCH_HOLE)` on the backing file, or `madvise(MADV_REMOVE)`), retiring small chunks
    /// that hold no live block first. Shared pages leave every process's resident set at once; no
    /// barrier is needed because each chunk is held in a `PUNCHING` state while it is punched.
    /// Returns how many chunks it handled: small chunks retired, plus free chunks whose pages the
    /// system took back (a chunk whose punch failed, on a file system that supports neither call,
    /// is not counted). Every free chunk is punched on every call, so the count does not fall to
    /// zero on a second call; punching a hole that is one already costs a system call, not I/O.
    pub fn punch_free(&mut self) -> u64 {
        let regions = &self.regions;
        let mut punch = |addr: usize, len: usize| {
            // SAFETY: the allocator calls this only for chunks it holds in PUNCHING or RETIRING-empty
            // state, which no process can allocate from meanwhile, and which hold no live block.
            unsafe { regions.punch(addr, len) }.is_ok()
        };
        self.raw.trim(Some(&mut punch))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the sockets tells workers to exit; give them a moment, then make sure. Workers
        // without a socket are dead and already reaped (their pid may have been reused: never signal it).
        let live: Vec<libc::pid_t> = self
            .workers
            .iter_mut()
            .filter_map(|w| w.sock.take().map(|_| w.pid))
            .collect();
        for pid in live {
            // Exiting on EOF takes microseconds; a worker stuck in a job gets half a second.
            if !matches!(sys::wait_exit(pid, 500), Ok(Some(_))) {
                self.kill_and_reap(pid);
            }
        }
        // Killed children still in the kernel are left unreaped (zombies until this process ends,
        // when init reaps them) rather than waited for without a bound.
        self.reap_stuck();
        if self.heap.handle_count() > 1 {
            // Typed owners outlive the pool: keep the memory mapped (leaked) so they stay valid. The
            // descriptors are closed; the mappings keep the files alive.
            self.regions.leak();
        }
    }
}

impl Pool {
    /// Asks worker `w` for a sign of life and returns the round-trip time (a health check between
    /// jobs).
    ///
    /// # Errors
    /// As for control operations: [`PoolError::Busy`], [`PoolError::WorkerDied`] (then handled and
    /// replaced), [`PoolError::Timeout`] (the worker is killed and replaced).
    pub fn ping(&mut self, w: usize) -> Result<Duration, PoolError> {
        let t0 = Instant::now();
        let pid = self.control(w, OP_PING, 0, 0, None)?;
        if pid != u64::from(self.workers[w].pid.unsigned_abs()) {
            return Err(self.kill_protocol(w, "ping answered by another process"));
        }
        Ok(t0.elapsed())
    }

    /// Sends `SIGKILL` to worker `w` (fault injection). The death is noticed, reported and handled
    /// by the next operation on that worker.
    ///
    /// # Errors
    /// [`PoolError::NoSuchWorker`]; [`PoolError::WorkerDied`] if the slot holds no live worker (it
    /// died and was reaped, and no replacement could be started: its old pid may belong to an
    /// unrelated process by now, so it is never signalled); OS errors.
    pub fn kill_worker(&mut self, w: usize) -> Result<(), PoolError> {
        let wk = self.workers.get(w).ok_or(PoolError::NoSuchWorker(w))?;
        if wk.sock.is_none() {
            return Err(PoolError::WorkerDied {
                worker: w,
                pid: wk.pid,
                cause: DeathCause::ChannelLost,
            });
        }
        // A worker with a socket has not been reaped, so its pid is still its own (at worst a zombie).
        sys::kill(wk.pid, libc::SIGKILL).map_err(PoolError::os("kill"))
    }

    /// Checks every worker for death without sending it anything (a supervision tick): reaps ended
    /// workers and handles them as on any other detection. Returns how many were found dead.
    ///
    /// Workers that died earlier and could not be replaced then (for example because the master had
    /// become multi-threaded) are forked again here when possible.
    pub fn supervise(&mut self) -> usize {
        self.reap_stuck();
        let mut n = 0;
        for w in 0..self.workers.len() {
            if self.workers[w].sock.is_none() {
                if self.poisoned.is_none() {
                    let _ = self.replace_worker(w);
                }
                continue;
            }
            if let Ok(Some(k)) = sys::reap(self.workers[w].pid, false) {
                let _ = self.on_death_inner(w, Some(DeathCause::Ended(k)), true);
                n += 1;
            }
        }
        n
    }
}
