//! Cross-process proxies with both ends in this process (the server on a thread): the protocol,
//! timeouts and late replies, concurrency and FIFO order, size limits, malformed replies, stopping.
//! The multi-process cases (a forked worker, an unrelated process, SIGKILL) are in
//! `integration-tests/tests/xproc_*.rs`.
#![cfg(feature = "xproc")]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{LIMIT, holds_within, wait_until, watchdog};
use context_core::Context;
use context_proxy::xproc::{
    Channel, Client, ClientOptions, Host, LinkFailure, Listener, ServeEnd, Served, Server,
    ServerOptions, XprocError,
};
use context_proxy::{CallError, FrameError, Postcard, Proxy, service};
use context_shmem::{Endpoint, Side};

/// The system allocator, noting the largest single allocation made on a thread that asked
/// ([`largest_allocation_during`]): how the tests see that a peer cannot make us allocate much.
struct Noting;

thread_local! {
    static NOTE: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    if NOTE.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; `note` only
// touches two thread-local `Cell`s with const initializers (no allocation, no reentrancy).
unsafe impl GlobalAlloc for Noting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded from the caller.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded from the caller.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded from the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Noting = Noting;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    NOTE.with(|n| n.set(true));
    let r = f();
    NOTE.with(|n| n.set(false));
    (r, LARGEST.with(Cell::get))
}

/// The workload's service.
#[service]
pub trait Workload {
    /// Adds `n`; returns the new total.
    fn add(&mut self, n: u64, tag: &str) -> u64;
    /// The total.
    fn total(&self) -> u64;
    /// Sleeps, then returns the total.
    fn sleep_ms(&mut self, ms: u64) -> u64;
    /// `len` bytes.
    fn blob(&self, len: u64) -> Vec<u8>;
    /// How many bytes arrived.
    fn take(&mut self, bytes: &[u8]) -> u64;
    /// Panics.
    fn boom(&mut self);
    /// Records `who`, busy for `us` microseconds; returns the position in the log.
    fn turn(&mut self, who: u64, us: u64) -> u64;
    /// Who called `turn`, in order.
    fn turns(&self) -> Vec<u64>;
}

/// A service nothing here exports (only `one_object_is_exported_as_one_service` tries).
#[service]
pub trait Other {
    /// Anything.
    fn ping(&self) -> u64;
}

#[derive(Default)]
struct Acc {
    total: u64,
    log: Vec<u64>,
}

impl Workload for Acc {
    fn add(&mut self, n: u64, tag: &str) -> u64 {
        self.total += n + tag.len() as u64;
        self.total
    }
    fn total(&self) -> u64 {
        self.total
    }
    fn sleep_ms(&mut self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        self.total
    }
    fn blob(&self, len: u64) -> Vec<u8> {
        vec![7; usize::try_from(len).unwrap_or(0)]
    }
    fn take(&mut self, bytes: &[u8]) -> u64 {
        bytes.len() as u64
    }
    fn boom(&mut self) {
        panic!("boom");
    }
    fn turn(&mut self, who: u64, us: u64) -> u64 {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_micros(us) {
            std::hint::spin_loop();
        }
        self.log.push(who);
        self.log.len() as u64
    }
    fn turns(&self) -> Vec<u64> {
        self.log.clone()
    }
}

const T: Duration = Duration::from_secs(30);

fn options() -> ClientOptions {
    ClientOptions {
        handshake_timeout: T,
        call_timeout: Some(T),
    }
}

/// A host exporting `n` counters named `c0`, `c1`, ... serving `channel` on a thread; the client
/// attached to it; the thread's join handle and its stop flag.
struct Rig {
    client: Client,
    stop: Arc<AtomicBool>,
    serving: Option<std::thread::JoinHandle<Result<Served, XprocError>>>,
}

impl Rig {
    fn new(capacity: usize, n: usize) -> Self {
        let channel = Channel::create(capacity).unwrap();
        let mut host = Host::new(Context::new("server"));
        for i in 0..n {
            host.adopt::<WorkloadService, _>(&format!("c{i}"), Acc::default())
                .unwrap();
        }
        let server = Server::attach(&channel).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let serving = std::thread::spawn(move || host.serve(server, &s2));
        let client = Client::attach(&channel, &options()).unwrap();
        Self {
            client,
            stop,
            serving: Some(serving),
        }
    }

    fn proxy(&self, i: usize) -> Proxy<WorkloadService> {
        self.client.proxy(&format!("c{i}")).unwrap()
    }

    /// Drops the client (closing the channel: the serving thread ends with it, also when a test
    /// panics) and returns what the server did.
    fn finish(mut self) -> Served {
        let (serving, stop) = (self.serving.take().unwrap(), Arc::clone(&self.stop));
        drop(self);
        ended_or_stop(&stop, "the serving thread to end", || serving.is_finished());
        serving.join().unwrap().unwrap()
    }
}

/// Waits (at most [`LIMIT`]) until `ended`; if it does not, sets `stop` (so that a serving loop
/// that missed its end still returns, and a scope around it can end) and fails the test.
fn ended_or_stop(stop: &AtomicBool, what: &str, ended: impl FnMut() -> bool) {
    if !holds_within(LIMIT, ended) {
        stop.store(true, Ordering::SeqCst);
        panic!("timed out after {LIMIT:?} waiting for {what}");
    }
}

#[test]
fn calls_names_and_mismatches() {
    watchdog(60, || {
        let rig = Rig::new(4096, 2);
        let (a, b) = (rig.proxy(0), rig.proxy(1));
        assert_eq!(a.add(5, "abc").unwrap(), 8);
        assert_eq!(b.add(1, "").unwrap(), 1);
        assert_eq!(a.total().unwrap(), 8);
        let names: Vec<_> = rig
            .client
            .exports()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        assert_eq!(names, ["c0", "c1"]);
        assert_eq!(rig.client.server_pid(), std::process::id());
        assert!(matches!(
            rig.client.proxy::<WorkloadService>("missing"),
            Err(XprocError::UnknownName(n)) if n == "missing"
        ));
        assert!(matches!(
            rig.client.proxy::<OtherService>("c0"),
            Err(XprocError::ServiceMismatch { .. })
        ));
        assert!(matches!(
            rig.client.proxy_with::<WorkloadService, Postcard>("c0"),
            Err(XprocError::CodecMismatch { .. })
        ));
        // A method that panics: typed error, the server carries on.
        assert!(matches!(a.boom(), Err(CallError::Panicked { .. })));
        assert!(matches!(a.total(), Err(CallError::Poisoned(_))));
        assert_eq!(b.total().unwrap(), 1);
        drop((a, b));
        let served = rig.finish();
        assert_eq!(served.end, ServeEnd::ClientClosed);
        assert_eq!(served.calls, 6);
    })
}

#[test]
fn another_codec_end_to_end() {
    watchdog(60, || {
        let channel = Channel::create(4096).unwrap();
        let mut host = Host::<Postcard>::with_codec(Context::new("server"));
        host.adopt::<WorkloadService, _>("c", Acc::default())
            .unwrap();
        let server = Server::attach(&channel).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let serving = s.spawn(|| host.serve(server, &stop));
            let client = Client::attach(&channel, &options()).unwrap();
            assert!(matches!(
                client.proxy::<WorkloadService>("c"),
                Err(XprocError::CodecMismatch { .. })
            ));
            let p = client.proxy_with::<WorkloadService, Postcard>("c").unwrap();
            assert_eq!(p.add(2, "x").unwrap(), 3);
            drop((p, client));
            ended_or_stop(&stop, "the serving thread to end", || serving.is_finished());
            assert_eq!(serving.join().unwrap().unwrap().calls, 1);
        });
    })
}

#[test]
fn a_timed_out_call_does_not_desynchronise_the_stream() {
    watchdog(60, || {
        let rig = Rig::new(4096, 1);
        let p = rig.proxy(0);
        p.add(1, "").unwrap();
        let hasty = p.clone().with_timeout(Duration::from_millis(30));
        let e = hasty.sleep_ms(300).unwrap_err();
        assert!(matches!(e, CallError::TimedOut(_)), "{e:?}");
        // The next calls wait behind the sleeping one, then each gets its own answer, not the stale one
        // (which would be 1, the total when the sleep started).
        assert_eq!(p.add(10, "").unwrap(), 11);
        assert_eq!(p.add(10, "").unwrap(), 21);
        assert_eq!(rig.client.discarded_replies(), 1);
        // Many timeouts in a row, then a call that waits: still in step.
        for _ in 0..5 {
            assert!(matches!(hasty.sleep_ms(60), Err(CallError::TimedOut(_))));
        }
        assert_eq!(p.total().unwrap(), 21);
        assert_eq!(rig.client.discarded_replies(), 6);
        assert_eq!(rig.client.failure(), None);
    })
}

#[test]
fn concurrent_callers_get_their_own_answers_identical_to_in_process() {
    watchdog(60, || {
        const THREADS: usize = 6;
        const CALLS: u64 = 300;
        let rig = Rig::new(4096, THREADS + 1);
        let local = Context::new("local");
        let workload = |p: &Proxy<WorkloadService>, shared: &Proxy<WorkloadService>, t: u64| {
            let mut seen = Vec::new();
            for i in 0..CALLS {
                seen.push(p.add(i * t, "tag").unwrap());
                shared.add(1, "").unwrap();
            }
            seen.push(p.total().unwrap());
            seen
        };
        let run = |proxies: Vec<Proxy<WorkloadService>>, shared: Proxy<WorkloadService>| {
            let barrier = Barrier::new(THREADS);
            std::thread::scope(|s| {
                let hs: Vec<_> = proxies
                    .iter()
                    .enumerate()
                    .map(|(t, p)| {
                        let (shared, barrier) = (&shared, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            workload(p, shared, t as u64 + 1)
                        })
                    })
                    .collect();
                let per: Vec<Vec<u64>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
                (per, shared.total().unwrap())
            })
        };
        let remote = run(
            (0..THREADS).map(|i| rig.proxy(i)).collect(),
            rig.proxy(THREADS),
        );
        let inproc = run(
            (0..THREADS)
                .map(|_| Proxy::adopt(&local, Acc::default()).unwrap())
                .collect(),
            Proxy::adopt(&local, Acc::default()).unwrap(),
        );
        assert_eq!(remote, inproc);
        assert_eq!(remote.1, THREADS as u64 * CALLS);
        assert_eq!(rig.client.discarded_replies(), 0);
    })
}

#[test]
fn callers_are_served_in_turn() {
    watchdog(60, || {
        // Each call keeps the server busy for 300 us, far longer than a caller needs to queue again,
        // so every caller is waiting whenever the channel is handed on: with FIFO order the turns
        // rotate; an unfair lock would let one caller run many times in a row.
        const THREADS: u64 = 4;
        const CALLS: u64 = 40;
        let rig = Rig::new(4096, 1);
        let barrier = Barrier::new(THREADS as usize);
        std::thread::scope(|s| {
            for who in 0..THREADS {
                let (p, barrier) = (rig.proxy(0), &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for _ in 0..CALLS {
                        p.turn(who, 300).unwrap();
                    }
                });
            }
        });
        let turns = rig.proxy(0).turns().unwrap();
        assert_eq!(turns.len() as u64, THREADS * CALLS);
        let longest = turns
            .chunk_by(|a, b| a == b)
            .map(<[u64]>::len)
            .max()
            .unwrap_or(0);
        // Allow for callers descheduled for several time slices on a loaded machine (each turn is
        // 300 us); an unfair lock lets the caller that just ran run again while it keeps its CPU,
        // which shows as runs of most of its calls and as callers that wait until the others are
        // done.
        assert!(
            longest <= CALLS as usize / 2,
            "longest run by one caller: {longest}: {turns:?}"
        );
        for who in 0..THREADS {
            assert!(
                turns[..turns.len() * 3 / 4].contains(&who),
                "caller {who} had no turn in the first three quarters: {turns:?}"
            );
        }
    })
}

#[test]
fn frames_larger_than_the_ring_are_typed_errors() {
    watchdog(60, || {
        let rig = Rig::new(1024, 1);
        let p = rig.proxy(0);
        // Request too large: refused before sending.
        let e = p.take(&[1u8; 4000]).unwrap_err();
        assert!(
            matches!(e, CallError::Frame(FrameError::TooLarge { .. })),
            "{e:?}"
        );
        assert_eq!(p.take(&[1u8; 500]).unwrap(), 500);
        // Reply too large: the server answers with an error frame instead.
        let e = p.blob(4000).unwrap_err();
        assert!(
            matches!(e, CallError::Frame(FrameError::TooLarge { .. })),
            "{e:?}"
        );
        assert_eq!(p.blob(100).unwrap().len(), 100);
        assert_eq!(rig.client.failure(), None);
    })
}

#[test]
fn bad_sizes_and_names_at_setup() {
    watchdog(60, || {
        assert!(matches!(
            Server::accept_stream(
                &std::os::unix::net::UnixStream::pair().unwrap().0,
                &ServerOptions {
                    capacity: 1000,
                    handshake_timeout: T
                }
            ),
            Err(XprocError::Channel(_))
        ));
        let mut host = Host::new(Context::new("h"));
        host.adopt::<WorkloadService, _>("x", Acc::default())
            .unwrap();
        assert!(matches!(
            host.adopt::<WorkloadService, _>("x", Acc::default()),
            Err(XprocError::DuplicateName(_))
        ));
        let other = Context::new("other");
        let h = other.enter(|cx| cx.adopt(Acc::default())).unwrap().unwrap();
        assert!(matches!(
            host.export::<WorkloadService, _>("y", h),
            Err(XprocError::WrongContext { .. })
        ));
        // A table that does not fit the ring.
        for i in 0..8 {
            host.adopt::<WorkloadService, _>(&format!("a-rather-long-name-{i}"), Acc::default())
                .unwrap();
        }
        let channel = Channel::create(256).unwrap();
        let server = Server::attach(&channel).unwrap();
        assert!(matches!(
            host.serve(server, &AtomicBool::new(false)),
            Err(XprocError::TableTooLarge { .. })
        ));
        // Nobody answers: the handshake times out.
        let channel = Channel::create(256).unwrap();
        let quick = ClientOptions {
            handshake_timeout: Duration::from_millis(30),
            call_timeout: None,
        };
        assert!(matches!(
            Client::attach(&channel, &quick),
            Err(XprocError::HandshakeTimedOut(_))
        ));
    })
}

/// A fake server on a raw endpoint: sends a real export table, then answers each request with
/// whatever `answer` makes of it.
fn fake_server(
    answer: impl Fn(&[u8], u64) -> Vec<u8> + Send + 'static,
) -> (Client, std::thread::JoinHandle<()>) {
    fake_server_on(4096, move |mut ep| {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = ep.recv(&mut buf, Some(Instant::now() + T)) {
            let (req, seq) = buf[..n].split_at(n - 8);
            let seq = u64::from_le_bytes(seq.try_into().unwrap());
            if ep.send(&answer(req, seq), None).is_err() {
                break;
            }
        }
    })
}

/// A fake server on a channel of `capacity` bytes: sends a real export table, then hands its
/// endpoint to `serve`, on a thread.
fn fake_server_on(
    capacity: usize,
    serve: impl FnOnce(Endpoint) + Send + 'static,
) -> (Client, std::thread::JoinHandle<()>) {
    let channel = Channel::create(capacity).unwrap();
    // The table comes from a real host whose serve loop we stop at once.
    let mut host = Host::new(Context::new("real"));
    host.adopt::<WorkloadService, _>("c", Acc::default())
        .unwrap();
    let setup = Channel::create(4096).unwrap();
    let server = Server::attach(&setup).unwrap();
    let stop = AtomicBool::new(false);
    let table = std::thread::scope(|s| {
        let h = s.spawn(|| host.serve(server, &stop));
        let mut ep = setup.endpoint(Side::A).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = ep.recv(&mut buf, Some(Instant::now() + T)).unwrap();
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap().unwrap();
        buf.truncate(n);
        buf
    });
    let mut ep = channel.endpoint(Side::B).unwrap();
    ep.send(&table, None).unwrap();
    let serving = std::thread::spawn(move || serve(ep));
    let client = Client::attach(&channel, &options()).unwrap();
    (client, serving)
}

#[test]
fn late_answers_that_keep_coming_cannot_hold_a_call_past_its_timeout() {
    watchdog(60, || {
        let stop = Arc::new(AtomicBool::new(false));
        let flooding = Arc::clone(&stop);
        let (filled_tx, filled) = std::sync::mpsc::channel();
        // 32 MiB of ring: 2 M late answers of 16 bytes each, far more than a call can drain in its
        // timeout, so the ring is never empty while the call runs.
        let (client, h) = fake_server_on(32 << 20, move |mut ep| {
            // Numbered 0: each looks like the late answer to an earlier caller. Sent until the ring
            // is full, then more as space frees. Bounded, so a regression fails below instead of
            // hanging.
            let late = 0u64.to_le_bytes();
            while ep.send(&late, Some(Instant::now())).is_ok() {}
            let _ = filled_tx.send(());
            let until = Instant::now() + Duration::from_secs(10);
            while !flooding.load(Ordering::Relaxed) && Instant::now() < until {
                let _ = ep.send(&late, Some(Instant::now() + Duration::from_millis(10)));
            }
        });
        filled.recv_timeout(T).unwrap();
        let timeout = Duration::from_millis(20);
        let p: Proxy<WorkloadService> = client
            .proxy::<WorkloadService>("c")
            .unwrap()
            .with_timeout(timeout);
        let t0 = Instant::now();
        let r = p.total();
        let took = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        assert!(matches!(r, Err(CallError::TimedOut(_))), "{r:?}");
        // The regression drained the whole ring (and its refills) before it looked at the clock:
        // at least every answer that was in the ring when the call began. A call that keeps its
        // timeout discards what it can read in 20 ms, a fraction of that on any machine.
        let in_ring = (32u64 << 20) / 16;
        let discarded = client.discarded_replies();
        assert!(discarded > 0);
        assert!(
            discarded < in_ring,
            "the call drained {discarded} late answers (the ring held {in_ring}) in {took:?}"
        );
        assert!(took < Duration::from_secs(1), "the call took {took:?}");
        drop((p, client));
        h.join().unwrap();
    })
}

#[test]
fn a_reply_over_the_codec_limit_is_dropped_unread() {
    watchdog(60, || {
        // A ring large enough for a 17 MiB reply, which the default codec (16 MiB) could not take.
        let big = 17 << 20;
        let (client, h) = fake_server_on(32 << 20, move |mut ep| {
            let mut buf = vec![0u8; 4096];
            if let Ok(n) = ep.recv(&mut buf, Some(Instant::now() + T)) {
                let mut reply = vec![0u8; big];
                reply[big - 8..].copy_from_slice(&buf[n - 8..n]); // the request's number
                let _ = ep.send(&reply, Some(Instant::now() + T));
            }
            // Keep the channel open until the client is done.
            let _ = ep.recv(&mut buf, Some(Instant::now() + T));
        });
        let p: Proxy<WorkloadService> = client.proxy("c").unwrap();
        let (r, largest) = largest_allocation_during(|| p.total());
        assert!(
            matches!(r, Err(CallError::Frame(FrameError::TooLarge { .. }))),
            "{r:?}"
        );
        assert!(
            largest < 1 << 20,
            "a {largest}-byte allocation for a refused reply"
        );
        drop((p, client));
        h.join().unwrap();
    })
}

#[test]
fn an_export_table_over_its_limit_is_refused_before_it_is_allocated() {
    watchdog(60, || {
        let channel = Channel::create(4 << 20).unwrap();
        let mut ep = channel.endpoint(Side::B).unwrap();
        ep.send(&vec![7u8; 2 << 20], None).unwrap();
        let (r, largest) = largest_allocation_during(|| Client::attach(&channel, &options()));
        assert!(matches!(r, Err(XprocError::Handshake(_))), "{r:?}");
        assert!(
            largest < 1 << 20,
            "a {largest}-byte allocation for a refused table"
        );
    })
}

fn with_seq(mut frame: Vec<u8>, seq: u64) -> Vec<u8> {
    frame.extend_from_slice(&seq.to_le_bytes());
    frame
}

#[test]
fn malformed_replies_are_errors_not_panics() {
    watchdog(60, || {
        // Garbage with the right sequence number: the frame checks refuse it.
        let (client, h) =
            fake_server(|_, seq| with_seq(b"not a frame at all, clearly".to_vec(), seq));
        let p: Proxy<WorkloadService> = client.proxy("c").unwrap();
        assert!(matches!(p.total(), Err(CallError::Frame(_))));
        // The request echoed back: a request frame where a reply belongs.
        drop((p, client));
        h.join().unwrap();
        let (client, h) = fake_server(|req, seq| with_seq(req.to_vec(), seq));
        let p: Proxy<WorkloadService> = client.proxy("c").unwrap();
        assert!(matches!(p.total(), Err(CallError::Frame(_))));
        // A truncated reply frame.
        drop((p, client));
        h.join().unwrap();
        let (client, h) = fake_server(|req, seq| with_seq(req[..req.len() - 1].to_vec(), seq));
        let p: Proxy<WorkloadService> = client.proxy("c").unwrap();
        assert!(matches!(p.add(1, "x"), Err(CallError::Frame(_))));
        assert_eq!(client.failure(), None);
        drop((p, client));
        h.join().unwrap();
        // Too short to carry a sequence number.
        let (client, h) = fake_server(|_, _| vec![1, 2, 3]);
        let p: Proxy<WorkloadService> = client.proxy("c").unwrap();
        assert!(matches!(
            p.total(),
            Err(CallError::Frame(FrameError::Short(3)))
        ));
        drop((p, client));
        h.join().unwrap();
        // An answer to a request never sent: the link is broken for good.
        let (client, h) = fake_server(|req, seq| with_seq(req.to_vec(), seq + 5));
        let p: Proxy<WorkloadService> = client.proxy("c").unwrap();
        assert!(matches!(p.total(), Err(CallError::Transport(_))));
        assert!(matches!(client.failure(), Some(LinkFailure::Corrupt(_))));
        assert!(matches!(p.total(), Err(CallError::Transport(_))));
        drop((p, client));
        h.join().unwrap();
    })
}

#[test]
fn a_stopped_server_closes_the_channel() {
    watchdog(60, || {
        let rig = Rig::new(4096, 1);
        let p = rig.proxy(0);
        assert_eq!(p.add(1, "").unwrap(), 1);
        rig.stop.store(true, Ordering::SeqCst);
        // The loop sees the flag within its poll interval and closes its end.
        let deadline = Instant::now() + T;
        let e = loop {
            match p.total() {
                Ok(_) => assert!(Instant::now() < deadline, "the server never stopped"),
                Err(e) => break e,
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(matches!(e, CallError::Closed(_)), "{e:?}");
        assert_eq!(rig.client.failure(), Some(LinkFailure::Closed));
        assert!(matches!(p.total(), Err(CallError::Closed(_))));
        drop(p);
        let served = rig.finish();
        assert_eq!(served.end, ServeEnd::Stopped);
    })
}

#[test]
fn calls_from_inside_a_context_release_it_meanwhile() {
    watchdog(60, || {
        let rig = Rig::new(4096, 1);
        let p = rig.proxy(0);
        let a = Context::new("caller");
        let busy = Arc::new(AtomicBool::new(false));
        let inside = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            let (p2, a2, in2) = (p.clone(), a.clone(), Arc::clone(&inside));
            let h = s.spawn(move || {
                a2.enter(move |_| {
                    in2.store(true, Ordering::SeqCst);
                    p2.sleep_ms(500)
                })
                .unwrap()
                .unwrap()
            });
            // Once the other thread holds `a` and makes its remote call, `a` is free for others
            // while the call sleeps: an entry gets in well before the call ends (kept, `a` would
            // stay held for the whole 500 ms and this entry would time out).
            wait_until("the caller inside its context", || {
                inside.load(Ordering::SeqCst)
            });
            let b2 = Arc::clone(&busy);
            a.enter_timeout(Duration::from_millis(100), move |_| {
                b2.store(true, Ordering::SeqCst)
            })
            .unwrap();
            assert!(!h.is_finished(), "the remote call was still running");
            assert_eq!(h.join().unwrap(), 0);
        });
        assert!(busy.load(Ordering::SeqCst));
    })
}

#[test]
fn listener_and_connect_in_one_process() {
    watchdog(60, || {
        let path = std::env::temp_dir().join(format!("ctx-xproc-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = Listener::bind(&path).unwrap();
        let mut host = Host::new(Context::new("server"));
        host.adopt::<WorkloadService, _>("c", Acc::default())
            .unwrap();
        let stop = AtomicBool::new(false);
        // Nobody connects yet: accepting with a timeout gives up.
        assert!(
            listener
                .accept_timeout(Duration::from_millis(20))
                .unwrap()
                .is_none()
        );
        std::thread::scope(|s| {
            let (host, stop, listener) = (&host, &stop, &listener);
            let acceptor = s.spawn(move || {
                let mut ends = Vec::new();
                std::thread::scope(|s2| {
                    let hs: Vec<_> = (0..2)
                        .map(|i| {
                            // Bounded: if a connect below fails, this gives up instead of keeping the
                            // scope (and the test) waiting for ever.
                            let server = listener.accept_timeout(T).unwrap().unwrap_or_else(|| {
                                panic!("client {i} did not connect within {T:?}")
                            });
                            s2.spawn(move || host.serve(server, stop).unwrap())
                        })
                        .collect();
                    for h in hs {
                        ends.push(h.join().unwrap());
                    }
                });
                ends
            });
            let c1 = Client::connect(&path, &options()).unwrap();
            let c2 = context_proxy::xproc::connect(&path).unwrap();
            let (p1, p2): (Proxy<WorkloadService>, Proxy<WorkloadService>) =
                (c1.proxy("c").unwrap(), c2.proxy("c").unwrap());
            assert_eq!(p1.add(1, "").unwrap(), 1);
            assert_eq!(p2.add(1, "").unwrap(), 2); // the same object, through another channel
            drop((p1, p2, c1, c2));
            ended_or_stop(stop, "both serving threads to end", || {
                acceptor.is_finished()
            });
            let ends = acceptor.join().unwrap();
            assert!(
                ends.iter()
                    .all(|e| e.end == ServeEnd::ClientClosed && e.calls == 1)
            );
        });
        drop(listener);
        assert!(!path.exists());
    })
}

#[test]
fn malformed_requests_get_error_frames_and_the_server_carries_on() {
    watchdog(60, || {
        use context_proxy::frame::{self, FrameKind};
        let channel = Channel::create(4096).unwrap();
        let mut host = Host::new(Context::new("server"));
        host.adopt::<WorkloadService, _>("c", Acc::default())
            .unwrap();
        let server = Server::attach(&channel).unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let serving = s.spawn(|| host.serve(server, &stop));
            let mut ep = channel.endpoint(Side::A).unwrap();
            let deadline = || Some(Instant::now() + T);
            let mut buf = vec![0u8; 4096];
            let _table = ep.recv(&mut buf, deadline()).unwrap();
            // Arbitrary bytes (a cheap deterministic generator), each numbered: every one is answered
            // with an error frame carrying its number.
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for seq in 1..=300u64 {
                let len = (x % 200) as usize;
                let mut msg: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                if seq % 3 == 0 && msg.len() >= 4 {
                    // A valid header start, so the deeper checks run too.
                    msg[..4].copy_from_slice(&[b'c', b'x', 1, 1]);
                }
                msg.extend_from_slice(&seq.to_le_bytes());
                ep.send(&msg, deadline()).unwrap();
                let n = ep.recv(&mut buf, deadline()).unwrap();
                let (reply, got) = buf[..n].split_at(n - 8);
                assert_eq!(u64::from_le_bytes(got.try_into().unwrap()), seq);
                let (h, _) = frame::parse(reply, usize::MAX).unwrap();
                assert_eq!(h.kind, FrameKind::Error);
            }
            // A message too short to carry a number: the server refuses the peer.
            ep.send(&[1, 2, 3], deadline()).unwrap();
            ended_or_stop(&stop, "the server to refuse the peer", || {
                serving.is_finished()
            });
            assert!(matches!(
                serving.join().unwrap(),
                Err(XprocError::Protocol(_))
            ));
        });
    })
}

#[test]
fn connecting_to_a_listener_that_does_not_accept_times_out() {
    watchdog(60, || {
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

        let dir = std::env::temp_dir().join(format!("ctx-xproc-stalled-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        // Alive but never accepting, with the smallest accept queue, filled by one connection.
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        socket::listen(&fd, Backlog::new(0).unwrap()).unwrap();
        // Fill the accept queue with non-blocking connects (how many fit is the kernel's business)
        // until the next one would wait.
        let mut queued = Vec::new();
        loop {
            let c = socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            match socket::connect(c.as_raw_fd(), &UnixAddr::new(&path).unwrap()) {
                Ok(()) => queued.push(c),
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("filling the accept queue: {e}"),
            }
            assert!(queued.len() < 1024, "the accept queue never filled");
        }
        let quick = ClientOptions {
            handshake_timeout: Duration::from_millis(100),
            ..options()
        };
        // On a thread, so that a connect that blocks fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let at = path.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let r = Client::connect(&at, &quick).map(drop);
            let _ = tx.send((r, t0.elapsed()));
        });
        let (r, took) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("connect to a stalled listener still blocked after 5 s");
        assert!(matches!(r, Err(XprocError::HandshakeTimedOut(_))), "{r:?}");
        assert!(took < Duration::from_secs(2), "the connect took {took:?}");
        drop(fd);
        let _ = std::fs::remove_dir_all(&dir);
    })
}

#[test]
fn threads_sharing_a_listener_each_keep_their_timeout() {
    watchdog(60, || {
        let path =
            std::env::temp_dir().join(format!("ctx-xproc-shared-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = Arc::new(Listener::bind(&path).unwrap());
        let host = {
            let mut h = Host::new(Context::new("server"));
            h.adopt::<WorkloadService, _>("c", Acc::default()).unwrap();
            Arc::new(h)
        };
        let wait = Duration::from_millis(300);
        // Four threads wait for clients on one listener; one client comes. The one that takes it
        // serves it; every other returns `None` when its own timeout passes (before the fix, a thread
        // woken for the client another one took blocked in `accept` for good). Detached threads and a
        // channel, so that a stuck waiter fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let (listener, host, tx) = (Arc::clone(&listener), Arc::clone(&host), tx.clone());
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let got = listener.accept_timeout(wait).unwrap();
                let took = t0.elapsed();
                let stop = AtomicBool::new(false);
                let served = got.map(|server| host.serve(server, &stop).unwrap().calls);
                let _ = tx.send((served, took));
            });
        }
        let client = Client::connect(&path, &options()).unwrap();
        let p: Proxy<WorkloadService> = client.proxy("c").unwrap();
        assert_eq!(p.add(3, "").unwrap(), 3);
        drop((p, client));
        let outcomes: Vec<_> = (0..4)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("a thread waiting on the shared listener is stuck")
            })
            .collect();
        assert_eq!(outcomes.iter().filter(|(s, _)| *s == Some(1)).count(), 1);
        for (served, took) in &outcomes {
            if served.is_none() {
                assert!(*took < wait * 5, "a waiter without a client took {took:?}");
            }
        }
    })
}

fn socket_path(what: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("ctx-xproc-{}-{what}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A listener on a fresh socket path, a host exporting one `Acc` as `c`, and a stop flag.
fn listening(what: &str) -> (std::path::PathBuf, Listener, Host, AtomicBool) {
    let path = socket_path(what);
    let listener = Listener::bind(&path).unwrap();
    (path, listener, host_with_c(), AtomicBool::new(false))
}

fn host_with_c() -> Host {
    let mut host = Host::new(Context::new("server"));
    host.adopt::<WorkloadService, _>("c", Acc::default())
        .unwrap();
    host
}

/// Review of 2026-12-04 (F1): a client that sent the acknowledgement without attaching its side
/// (or that attached and then vanished without a trace in the channel) kept its serving loop,
/// a thread and a mapping, until the stop flag; now the loop ends: with a handshake error when
/// nobody attached, and when the client's socket closes.
#[test]
fn a_client_that_acknowledges_without_attaching_ends_its_serving_loop() {
    use std::io::{Read, Write};
    watchdog(60, || {
        let (path, listener, host, stop) = listening("ack");
        std::thread::scope(|s| {
            let mut serving = Vec::new();
            for _ in 0..4 {
                let p = path.clone();
                let hostile = std::thread::spawn(move || {
                    let mut c = std::os::unix::net::UnixStream::connect(&p).unwrap();
                    let mut b = [0u8; 1];
                    let _ = c.read(&mut b); // the descriptor message, descriptor discarded
                    c.write_all(b"A").unwrap();
                });
                let server = listener.accept_timeout(T).unwrap().expect("a client");
                hostile.join().unwrap();
                let (host, stop) = (&host, &stop);
                serving.push(s.spawn(move || host.serve(server, stop)));
            }
            let ended = holds_within(LIMIT, || serving.iter().all(|h| h.is_finished()));
            stop.store(true, Ordering::SeqCst);
            assert!(
                ended,
                "serving loops of clients that never attached did not end"
            );
            for h in serving {
                let r = h.join().unwrap();
                assert!(matches!(r, Err(XprocError::Handshake(_))), "{r:?}");
            }
        });
    })
}

/// F1, the other half: the serving loop of a client ends when the client's socket closes, even
/// if the channel shows nothing: here the client attaches properly, then leaks its side of the
/// channel (its live token stays, the side is never closed, as a process that forged its token
/// and went away would leave it) and closes the socket.
#[test]
fn a_client_whose_socket_closes_ends_its_serving_loop() {
    use std::io::Write;
    watchdog(60, || {
        let (path, listener, host, stop) = listening("hup");
        std::thread::scope(|s| {
            let p = path.clone();
            let client = s.spawn(move || {
                let mut stream = std::os::unix::net::UnixStream::connect(&p).unwrap();
                let seg = context_shmem::Segment::recv_fd(&stream, Channel::type_id()).unwrap();
                let channel = Channel::from_segment(Arc::new(seg)).unwrap();
                let side = channel.endpoint(Side::A).unwrap();
                stream.write_all(b"A").unwrap();
                std::mem::forget(side);
                drop(stream);
            });
            let server = listener.accept_timeout(T).unwrap().expect("a client");
            let serving = s.spawn(|| host.serve(server, &stop));
            client.join().unwrap();
            ended_or_stop(&stop, "the serving loop to see the socket close", || {
                serving.is_finished()
            });
            let r = serving.join().unwrap().unwrap();
            assert_eq!(r.end, ServeEnd::ClientClosed);
        });
    })
}

/// F2: a client that connects and says nothing held the accepting thread for the whole
/// handshake timeout (10 s by default), so clients behind it timed out. Now accepting sends the
/// channel and returns; the wait for the acknowledgement is the serving thread's.
#[test]
fn a_silent_client_does_not_hold_up_the_accepting_thread() {
    watchdog(60, || {
        let (path, listener, host, stop) = listening("silent");
        let _silent = std::os::unix::net::UnixStream::connect(&path).unwrap();
        std::thread::scope(|s| {
            let p = path.clone();
            let legit = s.spawn(move || {
                let o = ClientOptions {
                    handshake_timeout: Duration::from_secs(20),
                    call_timeout: Some(T),
                };
                let c = Client::connect(&p, &o)?;
                let proxy: Proxy<WorkloadService> = c.proxy("c")?;
                Ok::<u64, Box<dyn std::error::Error + Send + Sync>>(proxy.total()?)
            });
            // One accepting thread, as in the module's example: the silent client first.
            let mut serving = Vec::new();
            while serving.len() < 2 {
                if let Some(server) = listener.accept_timeout(Duration::from_millis(100)).unwrap() {
                    let (host, stop) = (&host, &stop);
                    serving.push(s.spawn(move || host.serve(server, stop)));
                }
            }
            let got = legit.join().unwrap();
            stop.store(true, Ordering::SeqCst);
            assert_eq!(
                got.unwrap(),
                0,
                "the client behind a silent one was not served"
            );
            for h in serving {
                let _ = h.join().unwrap();
            }
        });
    })
}

/// F3: a client that hung up before its channel could be sent made `accept` fail, and the
/// module's example (`accept_timeout(..)?`) stop accepting; it concerns that client only.
#[test]
fn a_client_that_hangs_up_at_once_is_skipped_by_accept() {
    watchdog(60, || {
        let (path, listener, host, stop) = listening("gone");
        drop(std::os::unix::net::UnixStream::connect(&path).unwrap());
        let p = path.clone();
        let legit = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            Client::connect(&p, &options()).map(|_| ())
        });
        std::thread::scope(|s| {
            let server = listener
                .accept_timeout(T)
                .expect("a client that hung up is not the listener's failure")
                .expect("the next client");
            let serving = s.spawn(|| host.serve(server, &stop));
            legit.join().unwrap().unwrap();
            ended_or_stop(&stop, "the serving loop", || serving.is_finished());
            serving.join().unwrap().unwrap();
        });
    })
}

/// F5: a serving loop started on a channel an earlier client used ran that client's queued
/// requests (calls nobody waited for any more, which may not be safe to repeat), and the new
/// client got their answers; a loop started before the new client attached ended at once on the
/// old client's close flag.
#[test]
fn a_reused_channel_drops_the_earlier_clients_requests() {
    watchdog(60, || {
        let channel = Channel::create(4096).unwrap();
        let host = host_with_c();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let first = Server::attach(&channel).unwrap();
            let h1 = s.spawn(|| host.serve(first, &stop));
            let quick = ClientOptions {
                handshake_timeout: T,
                call_timeout: Some(Duration::from_millis(100)),
            };
            let c1 = Client::attach(&channel, &quick).unwrap();
            let p1: Proxy<WorkloadService> = c1.proxy("c").unwrap();
            // The first call keeps the server busy; the second is queued behind it, and its
            // caller gives up too: it is still in the ring when the client leaves.
            assert!(matches!(p1.sleep_ms(500), Err(CallError::TimedOut(..))));
            assert!(matches!(p1.add(1000, ""), Err(CallError::TimedOut(..))));
            drop((p1, c1));
            let r1 = h1.join().unwrap().unwrap();
            assert_eq!(r1.calls, 1, "{r1:?}");
            // A new loop first, then the new client (the loop waits for it).
            let second = Server::attach(&channel).unwrap();
            let h2 = s.spawn(|| host.serve(second, &stop));
            std::thread::sleep(Duration::from_millis(20));
            let c2 = Client::attach(&channel, &options()).unwrap();
            let p2: Proxy<WorkloadService> = c2.proxy("c").unwrap();
            // The total shows whether the dead client's `add(1000)` ran.
            assert_eq!(p2.total().unwrap(), 0);
            assert!(c2.failure().is_none());
            drop((p2, c2));
            ended_or_stop(&stop, "the second loop", || h2.is_finished());
            assert_eq!(h2.join().unwrap().unwrap().calls, 1);
        });
    })
}

impl Other for Acc {
    fn ping(&self) -> u64 {
        42
    }
}

/// F8: one object exported under two names as two services was served as the last one only.
#[test]
fn one_object_is_exported_as_one_service() {
    let ctx = Context::new("server");
    let h = ctx.enter(|cx| cx.adopt(Acc::default())).unwrap().unwrap();
    let mut host = Host::new(ctx);
    host.export::<WorkloadService, _>("w", h).unwrap();
    host.export::<WorkloadService, _>("w2", h).unwrap();
    assert!(matches!(
        host.export::<OtherService, _>("o", h),
        Err(XprocError::ExportedAsOtherService { .. })
    ));
}
