//! End-to-end calls through proxies: free and pinned targets, threads, re-entrancy, every error.
// Test-only service traits; their methods explain themselves.
#![allow(missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{join, wait_until, watchdog};
use context_core::{Context, Handle};
use context_proxy::{
    Buffer, BufferService, CallError, Exports, FrameError, FrameKind, Mode, ObjectId, Postcard,
    Proxy, Transport, frame, service,
};

#[service]
pub trait Counter {
    /// Adds `n`; returns the new total.
    fn add(&mut self, n: u64, tag: &str) -> u64;
    fn total(&self) -> u64;
    fn last_tag(&self) -> String;
    fn checksum(&self, data: &[u8]) -> u64;
    fn explode(&mut self);
    fn reset(&mut self, to: u64);
}

#[derive(Default)]
struct Tally {
    total: u64,
    last: String,
}

impl Counter for Tally {
    fn add(&mut self, n: u64, tag: &str) -> u64 {
        self.total += n;
        tag.clone_into(&mut self.last);
        self.total
    }
    fn total(&self) -> u64 {
        self.total
    }
    fn last_tag(&self) -> String {
        self.last.clone()
    }
    fn checksum(&self, data: &[u8]) -> u64 {
        data.iter().map(|&b| u64::from(b)).sum()
    }
    fn explode(&mut self) {
        self.total = u64::MAX;
        panic!("boom");
    }
    fn reset(&mut self, to: u64) {
        self.total = to;
    }
}

/// A service whose method calls into another object through a proxy: for re-entrancy.
#[service]
pub trait Relay {
    /// Calls `target.add(n)` from inside this object's context and returns what it answered.
    fn relay(&mut self, n: u64) -> Result<u64, String>;
}

struct Relayer {
    target: Proxy<CounterService>,
}

impl Relay for Relayer {
    fn relay(&mut self, n: u64) -> Result<u64, String> {
        self.target.add(n, "relayed").map_err(|e| e.to_string())
    }
}

#[test]
fn proxies_are_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<Proxy<CounterService>>();
    check::<Proxy<CounterService, Postcard>>();
    check::<Proxy<BufferService<u64>>>();
}

#[test]
fn calls_free_context_from_anywhere() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let b = Context::new("b");
        let counter: Proxy<CounterService> = Proxy::adopt(&b, Tally::default())?;
        assert_eq!(counter.add(5, "sixteen-byte-tag")?, 5);
        assert_eq!(counter.last_tag()?, "sixteen-byte-tag");
        assert_eq!(counter.checksum(&[1, 2, 3, 250])?, 256);

        // From inside another context, and from other threads (in none).
        let a = Context::new("a");
        let c = counter.clone();
        assert_eq!(a.enter(move |_| c.add(1, "a"))??, 6);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = counter.clone();
                std::thread::spawn(move || (0..250).try_for_each(|_| c.add(1, "t").map(drop)))
            })
            .collect();
        for t in threads {
            join("a calling thread", t)?;
        }
        assert_eq!(counter.total()?, 1006);
        assert_eq!(b.stats().panics, 0);
        Ok(())
    })
}

#[test]
fn calls_pinned_context_and_non_send_objects() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        struct RcTally(std::rc::Rc<std::cell::Cell<u64>>);
        impl Counter for RcTally {
            fn add(&mut self, n: u64, _tag: &str) -> u64 {
                self.0.set(self.0.get() + n);
                self.0.get()
            }
            fn total(&self) -> u64 {
                self.0.get()
            }
            fn last_tag(&self) -> String {
                String::new()
            }
            fn checksum(&self, _data: &[u8]) -> u64 {
                0
            }
            fn explode(&mut self) {}
            fn reset(&mut self, to: u64) {
                self.0.set(to);
            }
        }
        // Only a pinned context takes objects that are not `Send`: a typed error elsewhere.
        let free = Context::new("free");
        let refused: Result<Proxy<CounterService>, _> =
            Proxy::adopt_local(&free, || RcTally(Default::default()));
        assert_eq!(
            refused.err(),
            Some(CallError::Access(context_core::AccessError::NotPinned(
                free.id()
            )))
        );
        let p = Context::pinned("home")?;
        let counter: Proxy<CounterService> =
            Proxy::adopt_local(&p, || RcTally(Default::default()))?;
        assert_eq!(counter.add(2, "x")?, 2);
        let c = counter.clone();
        let a = Context::new("a");
        assert_eq!(a.enter(move |_| c.add(3, "y"))??, 5);
        assert!(p.stats().shipped_calls >= 2);
        // Move mode into a pinned context: the request moves to the home thread and back.
        let moving = counter.with_mode(Mode::Move)?;
        assert_eq!(moving.add(1, "z")?, 6);
        Ok(())
    })
}

#[test]
fn reentrant_a_b_a() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let a = Context::new("a");
        let b = Context::new("b");
        let in_a: Proxy<CounterService> = Proxy::adopt(&a, Tally::default())?;
        let relay: Proxy<RelayService> = Proxy::adopt(
            &b,
            Relayer {
                target: in_a.clone(),
            },
        )?;
        // Caller holds A, calls into B, whose method calls back into A.
        let r = relay.clone();
        let got = a.enter(move |_| r.relay(4))??;
        assert_eq!(got, Ok(4));
        assert_eq!(in_a.total()?, 4);

        // The same on pinned contexts: P -> Q -> P.
        let p = Context::pinned("p")?;
        let q = Context::pinned("q")?;
        let in_p: Proxy<CounterService> = Proxy::adopt(&p, Tally::default())?;
        let relay_q: Proxy<RelayService> = Proxy::adopt(
            &q,
            Relayer {
                target: in_p.clone(),
            },
        )?;
        let r = relay_q.clone();
        assert_eq!(p.enter(move |_| r.relay(9))??, Ok(9));
        assert_eq!(in_p.total()?, 9);

        // Calling back into the very object whose method is running is refused, not a deadlock.
        struct SelfCaller(Option<Proxy<CounterService>>);
        impl Counter for SelfCaller {
            fn add(&mut self, _n: u64, _tag: &str) -> u64 {
                0
            }
            fn total(&self) -> u64 {
                0
            }
            fn last_tag(&self) -> String {
                match &self.0 {
                    Some(me) => format!("{:?}", me.total()),
                    None => String::new(),
                }
            }
            fn checksum(&self, _data: &[u8]) -> u64 {
                0
            }
            fn explode(&mut self) {}
            fn reset(&mut self, _to: u64) {}
        }
        let c = Context::new("c");
        let me: Proxy<CounterService> = Proxy::adopt(&c, SelfCaller(None))?;
        let h: Handle<SelfCaller> = me.handle().expect("handle");
        let me2 = me.clone();
        c.enter(move |cx| cx.with(h, |s| s.0 = Some(me2)))??;
        let answer = me.last_tag()?;
        assert!(answer.starts_with("Err(Busy("), "{answer}");
        Ok(())
    })
}

#[test]
fn typed_errors() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let b = Context::new("b");
        let counter: Proxy<CounterService> = Proxy::adopt(&b, Tally::default())?;

        // Method panicked: typed error; the context stays usable; the object is poisoned.
        match counter.explode() {
            Err(CallError::Panicked { message, .. }) => assert!(message.contains("boom")),
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert!(matches!(counter.total(), Err(CallError::Poisoned(_))));
        let other: Proxy<CounterService> = Proxy::adopt(&b, Tally::default())?;
        assert_eq!(other.add(1, "still usable")?, 1);
        let h: Handle<Tally> = counter.handle().expect("handle");
        b.enter(|cx| cx.clear_poison(h))??;
        counter.reset(0)?;
        assert_eq!(counter.total()?, 0);

        // Object removed.
        b.enter(|cx| cx.remove(h))??;
        assert!(matches!(counter.total(), Err(CallError::Removed(_))));

        // Wrong service: a proxy over an object of another type.
        let buf: Proxy<BufferService> = Proxy::adopt(&b, Buffer::<u8>::zeroed(8))?;
        let bh: Handle<Buffer<u8>> = buf.handle().expect("handle");
        let wrong: Proxy<CounterService> = Proxy::new(&b, bh.cast::<Tally>())?;
        assert!(matches!(wrong.total(), Err(CallError::WrongService { .. })));
        assert_eq!(buf.len()?, 8, "the buffer is untouched");

        // Wrong context at construction.
        let a = Context::new("a");
        assert!(matches!(
            Proxy::<CounterService>::new(&a, h),
            Err(CallError::WrongContext { .. })
        ));

        // Timeout: another thread holds the target.
        let busy = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let (b2, busy2, release2) = (b.clone(), Arc::clone(&busy), Arc::clone(&release));
        let holder = std::thread::spawn(move || {
            b2.enter(|_| {
                busy2.store(true, Ordering::Release);
                wait_until("the holder's release", || release2.load(Ordering::Acquire));
            })
        });
        wait_until("the holder inside b", || busy.load(Ordering::Acquire));
        let timed = other.clone().with_timeout(Duration::from_millis(30));
        assert!(matches!(timed.total(), Err(CallError::TimedOut(_))));
        release.store(true, Ordering::Release);
        join("the holder", holder)?;
        assert_eq!(timed.total()?, 1);

        // Target closed.
        b.close()?;
        assert!(matches!(other.total(), Err(CallError::Closed(_))));
        let moving = Proxy::<CounterService>::adopt(&a, Tally::default())?.with_mode(Mode::Move)?;
        a.close()?;
        assert!(matches!(moving.total(), Err(CallError::Closed(_))));
        Ok(())
    })
}

#[test]
fn move_mode_and_postcard_give_the_same_answers() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let b = Context::new("b");
        let serial: Proxy<CounterService> = Proxy::adopt(&b, Tally::default())?;
        let moving = serial.clone().with_mode(Mode::Move)?;
        assert_eq!(moving.mode(), Mode::Move);
        let h: Handle<Tally> = serial.handle().expect("handle");
        let post: Proxy<CounterService, Postcard> = Proxy::new(&b, h)?;
        assert_eq!(serial.add(1, "s")?, 1);
        assert_eq!(moving.add(2, "m")?, 3);
        assert_eq!(post.add(3, "p")?, 6);
        assert_eq!(moving.last_tag()?, "p");
        assert!(matches!(moving.explode(), Err(CallError::Panicked { .. })));
        assert!(matches!(post.total(), Err(CallError::Poisoned(_))));
        Ok(())
    })
}

/// A transport that only moves bytes: the request frame goes to a server thread over a channel,
/// which answers it with `Exports::serve` inside the target context. What a cross-process transport
/// does, minus the shared memory.
struct Loopback {
    tx: crossbeam_channel::Sender<(Vec<u8>, crossbeam_channel::Sender<Vec<u8>>)>,
    mangle: Option<fn(&mut Vec<u8>)>,
}

impl Transport for Loopback {
    fn round_trip(
        &self,
        request: &[u8],
        reply: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(), CallError> {
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        let mut req = request.to_vec();
        if let Some(m) = self.mangle {
            m(&mut req);
        }
        self.tx
            .send((req, rtx))
            .map_err(|e| CallError::Transport(e.to_string()))?;
        let got = match timeout {
            Some(t) => rrx
                .recv_timeout(t)
                .map_err(|e| CallError::Transport(e.to_string()))?,
            None => rrx
                .recv()
                .map_err(|e| CallError::Transport(e.to_string()))?,
        };
        *reply = got;
        Ok(())
    }
}

fn serve_loopback(
    ctx: Context,
    exports: Exports,
) -> crossbeam_channel::Sender<(Vec<u8>, crossbeam_channel::Sender<Vec<u8>>)> {
    let (tx, rx) = crossbeam_channel::unbounded::<(Vec<u8>, crossbeam_channel::Sender<Vec<u8>>)>();
    std::thread::spawn(move || {
        for (req, reply_to) in rx {
            let mut reply = Vec::new();
            if let Err(e) = ctx.enter(|cx| exports.serve(cx, &req, &mut reply)) {
                exports.error_reply(&req, &e.into(), &mut reply);
            }
            let _ = reply_to.send(reply);
        }
    });
    tx
}

#[test]
fn frames_through_another_transport() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let ctx = Context::new("server");
        let h = ctx.enter(|cx| cx.adopt(Tally::default()))??;
        let mut exports = Exports::new();
        let id = exports.export::<CounterService, Tally>(h);
        let tx = serve_loopback(ctx.clone(), exports);

        let p: Proxy<CounterService> = Proxy::over(
            Arc::new(Loopback {
                tx: tx.clone(),
                mangle: None,
            }),
            id,
        );
        assert_eq!(p.add(7, "remote")?, 7);
        assert!(matches!(
            p.clone().with_mode(Mode::Move),
            Err(CallError::Unsupported(_))
        ));
        assert!(matches!(p.explode(), Err(CallError::Panicked { .. })));
        assert!(matches!(p.total(), Err(CallError::Poisoned(_))));

        // An object that is not exported.
        let ghost = ObjectId { slot: 99, ..id };
        let g: Proxy<CounterService> = Proxy::over(
            Arc::new(Loopback {
                tx: tx.clone(),
                mangle: None,
            }),
            ghost,
        );
        assert!(matches!(g.total(), Err(CallError::Removed(_))));

        // Frames damaged in transit: each is caught by the header check or the codec, never a panic.
        type Mangle = fn(&mut Vec<u8>);
        let cases: [(Mangle, &str); 5] = [
            (|f| f[0] = b'X', "magic"),
            (|f| f[2] = 9, "version"),
            (
                |f| f[4..8].copy_from_slice(&u32::MAX.to_le_bytes()),
                "length bomb",
            ),
            (|f| f.truncate(f.len() - 1), "truncated"),
            (
                |f| {
                    let n = f.len();
                    f[n - 1] ^= 0xFF;
                    f[frame::HEADER_LEN] = 0xEE;
                },
                "body",
            ),
        ];
        for (mangle, what) in cases {
            let bad: Proxy<CounterService> = Proxy::over(
                Arc::new(Loopback {
                    tx: tx.clone(),
                    mangle: Some(mangle),
                }),
                id,
            );
            match bad.add(1, "sixteen-byte-tag") {
                Err(CallError::Frame(_) | CallError::Codec(_)) => {}
                other => panic!("{what}: expected a frame or codec error, got {other:?}"),
            }
        }
        // A wrong service id in the header: a proxy of another service aimed at the exported counter.
        let wrong: Proxy<HoldService> = Proxy::over(
            Arc::new(Loopback {
                tx: tx.clone(),
                mangle: None,
            }),
            id,
        );
        match wrong.wait() {
            Err(CallError::WrongService { found, .. }) => {
                assert!(found.ends_with("Counter"), "{found}")
            }
            other => panic!("expected WrongService, got {other:?}"),
        }
        // A raw frame of the wrong kind, straight through the transport: an error frame comes back.
        let mut odd = Vec::new();
        frame::encode::<context_proxy::Bincode, _>(&mut odd, FrameKind::Reply, 12345, id, &0u8)?;
        let mut reply = Vec::new();
        Loopback { tx, mangle: None }.round_trip(&odd, &mut reply, None)?;
        let (h, _) = frame::parse(&reply, 1 << 20)?;
        assert_eq!(h.kind, FrameKind::Error);
        assert!(matches!(
            frame::parse(&reply[..8], 1 << 20),
            Err(FrameError::Short(8))
        ));
        Ok(())
    })
}

#[service]
pub trait Hold {
    /// Blocks until the gate opens.
    fn wait(&mut self);
}

struct Gate {
    entered: Arc<AtomicBool>,
    open: Arc<AtomicBool>,
}

impl Hold for Gate {
    fn wait(&mut self) {
        self.entered.store(true, Ordering::Release);
        wait_until("the gate to open", || self.open.load(Ordering::Acquire));
    }
}

#[service]
pub trait Outer {
    /// Calls out of its context into the gate, and returns when it opens.
    fn call_out(&mut self) -> u64;
    /// Answers at once.
    fn ping(&mut self) -> u64;
}

struct OuterObj {
    gate: Proxy<HoldService>,
    pings: u64,
}

impl Outer for OuterObj {
    fn call_out(&mut self) -> u64 {
        self.gate.wait().expect("gate");
        1
    }
    fn ping(&mut self) -> u64 {
        self.pings += 1;
        self.pings
    }
}

/// An `OuterObj` in context `b` whose `call_out` blocks in a gate in context `h` until `open`.
struct GatedOuter {
    entered: Arc<AtomicBool>,
    open: Arc<AtomicBool>,
    b: Context,
    outer: Proxy<OuterService>,
    _h: Context,
}

fn gated_outer() -> anyhow::Result<GatedOuter> {
    let (entered, open) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let h = Context::new("h");
    let gate: Proxy<HoldService> = Proxy::adopt(
        &h,
        Gate {
            entered: Arc::clone(&entered),
            open: Arc::clone(&open),
        },
    )?;
    let b = Context::new("b");
    let outer: Proxy<OuterService> = Proxy::adopt(&b, OuterObj { gate, pings: 0 })?;
    Ok(GatedOuter {
        entered,
        open,
        b,
        outer,
        _h: h,
    })
}

#[test]
fn object_in_use_on_another_thread_is_retried_until_the_timeout() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let GatedOuter {
            entered,
            open,
            b,
            outer,
            _h,
        } = gated_outer()?;

        let o = outer.clone();
        let first = std::thread::spawn(move || o.call_out());
        wait_until("the first call in the gate", || {
            entered.load(Ordering::Acquire)
        });
        // B is free (its caller is out in H) but the object is not: with a timeout, InUse in the end.
        let short = outer.clone().with_timeout(Duration::from_millis(20));
        assert!(matches!(short.ping(), Err(CallError::InUse(_))));
        let short_move = short.clone().with_mode(Mode::Move)?;
        assert!(matches!(short_move.ping(), Err(CallError::InUse(_))));
        assert_eq!(b.enter(|_| 5)?, 5, "the context itself is free");

        // Without a timeout the proxy retries until the object is free again, in both modes.
        let moving = outer.clone().with_mode(Mode::Move)?;
        let moved_ping = std::thread::spawn(move || moving.ping());
        let opener = {
            let open = Arc::clone(&open);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                open.store(true, Ordering::Release);
            })
        };
        // On a thread too, so that a retry loop that never ends fails the join below.
        let serialized_ping = {
            let outer = outer.clone();
            std::thread::spawn(move || outer.ping())
        };
        let serialized = join("the serialized ping", serialized_ping)?;
        let moved = join("the moved ping", moved_ping)?;
        let mut pings = [serialized, moved];
        pings.sort_unstable();
        assert_eq!(pings, [1, 2], "each retried call ran once");
        assert_eq!(join("the first call", first)?, 1);
        join("the opener", opener);
        Ok(())
    })
}

#[service]
pub trait Sibling {
    /// Calls `ping` on the other object (in the same context) and adds 10.
    fn via(&mut self) -> u64;
}

struct RelayObj {
    other: Proxy<OuterService>,
}

impl Sibling for RelayObj {
    fn via(&mut self) -> u64 {
        self.other.ping().expect("ping through the relay") + 10
    }
}

/// A caller inside the object's own context that meets `InUse` waits with that context released:
/// the borrower (which has called out and must come back into the context) can then finish.
/// Holding the context through the retries deadlocked both.
#[test]
fn in_use_retries_release_the_callers_own_context() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let GatedOuter {
            entered,
            open,
            b,
            outer,
            _h,
        } = gated_outer()?;
        let relay: Proxy<SiblingService> = Proxy::adopt(
            &b,
            RelayObj {
                other: outer.clone(),
            },
        )?;
        let o = outer.clone();
        let first = std::thread::spawn(move || o.call_out());
        wait_until("the first call in the gate", || {
            entered.load(Ordering::Acquire)
        });
        // Inside b (in the relay's method), the outer object is borrowed by the first call: InUse.
        let second = std::thread::spawn(move || relay.via());
        std::thread::sleep(Duration::from_millis(30));
        open.store(true, Ordering::Release);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send((first.join().ok(), second.join().ok()));
        });
        let (first, second) = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| anyhow::anyhow!("deadlock: neither call returned within 20 s"))?;
        assert_eq!(first.expect("first")?, 1);
        assert_eq!(second.expect("second")?, 11);
        Ok(())
    })
}

#[service]
pub trait Hop {
    /// With `depth > 0`: meets the other thread at the barrier, then calls the peer with `depth - 1`.
    fn hop(&mut self, depth: u32) -> u32;
}

struct Node {
    peer: Arc<std::sync::OnceLock<Proxy<HopService>>>,
    barrier: Arc<std::sync::Barrier>,
}

/// What `hop` answers when its call to the peer was refused as a deadlock.
const REFUSED: u32 = 1000;

impl Hop for Node {
    fn hop(&mut self, depth: u32) -> u32 {
        if depth == 0 {
            return 0;
        }
        self.barrier.wait();
        match self.peer.get().expect("peer").hop(depth - 1) {
            Ok(v) => v + 1,
            Err(CallError::Deadlock(_)) => REFUSED,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}

/// Crossed calls between two borrowed objects (oa.hop -> ob.hop while ob.hop -> oa.hop) would
/// wait on each other for ever: one of them is refused with `Deadlock`, the other then completes.
#[test]
fn crossed_calls_between_borrowed_objects_are_a_deadlock_error() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let (a, b) = (Context::new("a"), Context::new("b"));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let (peer_a, peer_b) = (
            Arc::new(std::sync::OnceLock::new()),
            Arc::new(std::sync::OnceLock::new()),
        );
        let pa: Proxy<HopService> = Proxy::adopt(
            &a,
            Node {
                peer: Arc::clone(&peer_a),
                barrier: Arc::clone(&barrier),
            },
        )?;
        let pb: Proxy<HopService> = Proxy::adopt(
            &b,
            Node {
                peer: Arc::clone(&peer_b),
                barrier,
            },
        )?;
        let _ = peer_a.set(pb.clone());
        let _ = peer_b.set(pa.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        for p in [pa, pb] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send(p.hop(1));
            });
        }
        let mut got = Vec::new();
        for _ in 0..2 {
            let r = rx.recv_timeout(Duration::from_secs(20)).map_err(|_| {
                anyhow::anyhow!("deadlock: the crossed calls did not return in 20 s")
            })?;
            got.push(r?);
        }
        got.sort_unstable();
        assert_eq!(got, [1, REFUSED]);
        Ok(())
    })
}

#[service]
pub trait Nest {
    /// Calls `nap` on the object in the other pinned context (which holds this one borrowed).
    fn slow(&mut self) -> u32;
    /// Sleeps 300 ms if this object naps, and answers 1.
    fn ping(&mut self) -> u32;
    /// Calls `ping` on the linked object; answers 10 + its answer, or `REFUSED` on `Deadlock`.
    fn via(&mut self) -> u32;
}

struct NestObj {
    nap: bool,
    /// Set when a nap begins.
    napping: Arc<AtomicBool>,
    far: Option<Proxy<NestService>>,
    link: Option<Proxy<NestService>>,
}

impl Nest for NestObj {
    fn slow(&mut self) -> u32 {
        self.far.as_ref().expect("far").ping().expect("far ping") + 1
    }
    fn ping(&mut self) -> u32 {
        if self.nap {
            self.napping.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(300));
        }
        1
    }
    fn via(&mut self) -> u32 {
        match self.link.as_ref().expect("link").ping() {
            Ok(v) => v + 10,
            Err(CallError::Deadlock(_)) => REFUSED,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}

/// A pinned home thread waiting for a call of chain X (which has o1 borrowed) serves chain Y's job,
/// which wants o1: Y's job sits above X's on the same stack, so X cannot resume before Y returns,
/// and Y would wait for X for ever. Y is refused with `Deadlock`, then X completes.
#[test]
fn a_job_served_above_the_borrower_on_a_home_thread_is_a_deadlock_error() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let (p, q) = (Context::pinned("p")?, Context::pinned("q")?);
        let napping = Arc::new(AtomicBool::new(false));
        let napper: Proxy<NestService> = Proxy::adopt(
            &q,
            NestObj {
                nap: true,
                napping: Arc::clone(&napping),
                far: None,
                link: None,
            },
        )?;
        let o1: Proxy<NestService> = Proxy::adopt(
            &p,
            NestObj {
                nap: false,
                napping: Arc::clone(&napping),
                far: Some(napper),
                link: None,
            },
        )?;
        let o2: Proxy<NestService> = Proxy::adopt(
            &p,
            NestObj {
                nap: false,
                napping: Arc::clone(&napping),
                far: None,
                link: Some(o1.clone()),
            },
        )?;
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(("x", o1.slow()));
        });
        // X is inside o1.slow, waiting for the nap in q: o1 is borrowed, p's home thread waits.
        wait_until("chain X in the nap", || napping.load(Ordering::Acquire));
        std::thread::spawn(move || {
            let _ = tx2.send(("y", o2.via()));
        });
        let mut got = Vec::new();
        for _ in 0..2 {
            let (who, r) = rx
                .recv_timeout(Duration::from_secs(20))
                .map_err(|_| anyhow::anyhow!("deadlock: no answer within 20 s"))?;
            got.push((who, r?));
        }
        got.sort_unstable();
        assert_eq!(got, [("x", 2), ("y", REFUSED)]);
        Ok(())
    })
}

#[service]
pub trait Nap {
    /// Sleeps `ms` milliseconds.
    fn nap(&mut self, ms: u64) -> u32;
}

struct Napper;

impl Nap for Napper {
    fn nap(&mut self, ms: u64) -> u32 {
        std::thread::sleep(Duration::from_millis(ms));
        0
    }
}

#[service]
pub trait Keep {
    /// Keeps this object borrowed for `ms` (calling out to a napper meanwhile).
    fn keep(&mut self, ms: u64) -> u32;
}

struct Kept {
    started: Arc<AtomicBool>,
    napper: Proxy<NapService>,
}

impl Keep for Kept {
    fn keep(&mut self, ms: u64) -> u32 {
        self.started.store(true, Ordering::Release);
        self.napper.nap(ms).expect("nap") + 1
    }
}

#[service]
pub trait Front {
    /// Borrowing this object, keeps the other one for `ms`.
    fn front(&mut self, ms: u64) -> u32;
    /// Answers 7.
    fn seven(&mut self) -> u32;
}

struct FrontObj {
    kept: Proxy<KeepService>,
}

impl Front for FrontObj {
    fn front(&mut self, ms: u64) -> u32 {
        self.kept.keep(ms).expect("keep") + 1
    }
    fn seven(&mut self) -> u32 {
        7
    }
}

/// A chain that waited and then got its object is running, not waiting: another chain that now
/// waits for it is not in a cycle, however long the first one keeps the object.
#[test]
fn a_wait_that_ended_is_no_cycle() -> anyhow::Result<()> {
    watchdog(60, || -> anyhow::Result<()> {
        let (a, b, h) = (Context::new("a"), Context::new("b"), Context::new("h"));
        let started = Arc::new(AtomicBool::new(false));
        let napper: Proxy<NapService> = Proxy::adopt(&h, Napper)?;
        let kept: Proxy<KeepService> = Proxy::adopt(
            &b,
            Kept {
                started: Arc::clone(&started),
                napper,
            },
        )?;
        let front: Proxy<FrontService> = Proxy::adopt(&a, FrontObj { kept: kept.clone() })?;
        // Thread B keeps `kept` 30 ms, then calls `front.seven()`.
        let (kept2, front2) = (kept.clone(), front.clone());
        let second = std::thread::spawn(move || {
            kept2.keep(30)?;
            front2.seven()
        });
        wait_until("thread B keeping `kept`", || {
            started.load(Ordering::Acquire)
        });
        // This thread borrows `front`, waits for `kept` (B has it), then keeps it 400 ms, while B waits
        // for `front`.
        assert_eq!(front.front(400)?, 2);
        assert_eq!(join("thread B", second)?, 7);
        Ok(())
    })
}
