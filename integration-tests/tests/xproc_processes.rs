//! Cross-process proxies between real processes: a context hosted by a fork-pool worker (channel
//! created before the fork), and a context in an unrelated process reached through a Unix socket
//! (this test binary re-executed as the server). The same workload runs in-process, on a pinned
//! context and remotely with identical results; the server is SIGKILLed in the middle of a call;
//! timed-out calls are followed by calls that get their own answers; many threads call at once.
//!
//! Watchdogs: every re-executed process is killed when its guard drops (also on a failed
//! assertion), isolated runs have a timeout, and every proxy call has one, so nothing can hang.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

use context_core::Context;
use context_forkpool::{JobContext, Pool, PoolError, isolated};
use context_proxy::xproc::{
    Channel, Client, ClientOptions, Host, LinkFailure, Listener, ServeEnd, Server,
};
use context_proxy::{CallError, Proxy, service};

/// The workload's service.
#[service]
pub trait Workload {
    /// Adds `n` and the tag's length; returns the new total.
    fn add(&mut self, n: u64, tag: &str) -> u64;
    /// The total.
    fn total(&self) -> u64;
    /// Creates the marker file (if the server has one), sleeps, returns the total.
    fn sleep_ms(&mut self, ms: u64) -> u64;
    /// Panics.
    fn boom(&mut self);
    /// The serving process's pid.
    fn pid(&self) -> u32;
}

#[derive(Default)]
struct Acc {
    total: u64,
    marker: Option<PathBuf>,
}

impl Workload for Acc {
    fn add(&mut self, n: u64, tag: &str) -> u64 {
        self.total = self.total.wrapping_add(n + tag.len() as u64);
        self.total
    }
    fn total(&self) -> u64 {
        self.total
    }
    fn sleep_ms(&mut self, ms: u64) -> u64 {
        if let Some(m) = &self.marker {
            let _ = std::fs::write(m, b"sleeping");
        }
        std::thread::sleep(Duration::from_millis(ms));
        self.total
    }
    fn boom(&mut self) {
        panic!("boom");
    }
    fn pid(&self) -> u32 {
        std::process::id()
    }
}

const T: Duration = Duration::from_secs(30);
const SOCKET_ENV: &str = "CTX_XPROC_TEST_SOCKET";
const MARKER_ENV: &str = "CTX_XPROC_TEST_MARKER";
const CONNS_ENV: &str = "CTX_XPROC_TEST_CONNECTIONS";
/// Counters each server exports, `c0` .. `c7`.
const COUNTERS: usize = 8;

fn options() -> ClientOptions {
    ClientOptions {
        handshake_timeout: T,
        call_timeout: Some(T),
    }
}

/// One result of the workload, without anything that differs between processes (context ids).
fn outcome<R: std::fmt::Debug>(r: Result<R, CallError>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(CallError::Panicked { message, .. }) => format!("panicked: {message}"),
        Err(CallError::Poisoned(_)) => "poisoned".to_owned(),
        Err(e) => format!("other error: {e}"),
    }
}

/// The same sequence of calls for every kind of target.
fn workload(p: &Proxy<WorkloadService>, boom: &Proxy<WorkloadService>) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..200u64 {
        out.push(outcome(
            p.add(i * 7919 % 1000, &"x".repeat((i % 17) as usize)),
        ));
        if i % 50 == 0 {
            out.push(outcome(p.total()));
        }
    }
    out.push(outcome(boom.boom()));
    out.push(outcome(boom.total()));
    out.push(outcome(p.total()));
    out
}

/// The workload against an in-process context of the given kind.
fn in_process(ctx: &Context) -> Vec<String> {
    let p = Proxy::adopt(ctx, Acc::default()).unwrap();
    let b = Proxy::adopt(ctx, Acc::default()).unwrap();
    workload(&p, &b)
}

// ---------------------------------------------------------------------------------------------
// An unrelated process: this binary, re-executed, serving through a Unix socket.

/// The server process: exports `COUNTERS` counters, accepts `CTX_XPROC_TEST_CONNECTIONS` clients
/// (default 1), serves each on its own thread, exits when all of them are done.
fn server_entry() -> i32 {
    let Some(path) = std::env::var_os(SOCKET_ENV) else {
        eprintln!("{SOCKET_ENV} is not set");
        return 2;
    };
    let marker = std::env::var_os(MARKER_ENV).map(PathBuf::from);
    let conns: usize = std::env::var(CONNS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut host = Host::new(Context::new("server"));
    for i in 0..COUNTERS {
        let acc = Acc {
            total: 0,
            marker: marker.clone(),
        };
        if let Err(e) = host.adopt::<WorkloadService, _>(&format!("c{i}"), acc) {
            eprintln!("export: {e}");
            return 3;
        }
    }
    let listener = match Listener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind: {e}");
            return 4;
        }
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut serving = Vec::new();
        for _ in 0..conns {
            match listener.accept() {
                Ok(server) => {
                    let (host, stop) = (&host, &stop);
                    serving.push(s.spawn(move || host.serve(server, stop)));
                }
                Err(e) => {
                    eprintln!("accept: {e}");
                    return 5;
                }
            }
        }
        for h in serving {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    eprintln!("serve: {e}");
                    return 6;
                }
                Err(_) => return 7,
            }
        }
        0
    })
}

/// A running server process; killed and reaped on drop.
struct ServerProcess {
    child: Child,
    path: PathBuf,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn unique_path(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "ctx-xproc-it-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Starts a server process and connects `conns` clients to it.
fn start_server(conns: usize, marker: Option<&Path>) -> (ServerProcess, Vec<Client>) {
    let path = unique_path("sock");
    let _ = std::fs::remove_file(&path);
    let mut cmd = isolated::command(server_entry).unwrap();
    cmd.env(SOCKET_ENV, &path)
        .env(CONNS_ENV, conns.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(m) = marker {
        cmd.env(MARKER_ENV, m);
    }
    let child = cmd.spawn().unwrap();
    let mut server = ServerProcess { child, path };
    let deadline = Instant::now() + T;
    let mut clients = Vec::new();
    while clients.len() < conns {
        match Client::connect(&server.path, &options()) {
            Ok(c) => clients.push(c),
            Err(e) => {
                if let Some(st) = server.child.try_wait().unwrap() {
                    panic!("the server exited with {st} before accepting: {e}");
                }
                assert!(Instant::now() < deadline, "no server at the socket: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    (server, clients)
}

#[test]
fn an_unrelated_process_gives_the_same_results_as_in_process_and_pinned() {
    let free = in_process(&Context::new("free"));
    let pinned = in_process(&Context::pinned("pinned").unwrap());
    let (server, clients) = start_server(1, None);
    let c = &clients[0];
    let p: Proxy<WorkloadService> = c.proxy("c0").unwrap();
    assert_eq!(p.pid().unwrap(), server.child.id());
    assert_eq!(c.server_pid(), server.child.id());
    let remote = workload(&p, &c.proxy("c1").unwrap());
    assert_eq!(free, pinned);
    assert_eq!(free, remote);
    assert!(remote.iter().any(|r| r == "panicked: boom"));
}

#[test]
fn many_threads_and_two_clients_call_one_server_process() {
    const THREADS: usize = 6;
    const CALLS: u64 = 400;
    let (_server, clients) = start_server(2, None);
    let barrier = Barrier::new(THREADS);
    let per_thread: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                // Threads alternate between the two clients (two channels into one context).
                let c = &clients[t % 2];
                let own: Proxy<WorkloadService> = c.proxy(&format!("c{}", t + 1)).unwrap();
                let shared: Proxy<WorkloadService> = c.proxy("c0").unwrap();
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let mut expect = 0u64;
                    for i in 0..CALLS {
                        expect += i * (t as u64 + 1);
                        assert_eq!(own.add(i * (t as u64 + 1), "").unwrap(), expect);
                        shared.add(1, "").unwrap();
                    }
                    own.total().unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, total) in per_thread.iter().enumerate() {
        assert_eq!(*total, (t as u64 + 1) * CALLS * (CALLS - 1) / 2);
    }
    let shared: Proxy<WorkloadService> = clients[0].proxy("c0").unwrap();
    assert_eq!(shared.total().unwrap(), THREADS as u64 * CALLS);
    assert!(
        clients
            .iter()
            .all(|c| c.failure().is_none() && c.discarded_replies() == 0)
    );
}

#[test]
fn timed_out_calls_are_followed_by_calls_that_get_their_own_answers() {
    let (_server, clients) = start_server(1, None);
    let c = &clients[0];
    let p: Proxy<WorkloadService> = c.proxy("c0").unwrap();
    assert_eq!(p.add(5, "").unwrap(), 5);
    let hasty = p.clone().with_timeout(Duration::from_millis(20));
    for _ in 0..3 {
        assert!(matches!(hasty.sleep_ms(100), Err(CallError::TimedOut(_))));
    }
    // Each answer is this call's: 5 + 1, then + 2 (the stale answers would all say 5).
    assert_eq!(p.add(1, "").unwrap(), 6);
    assert_eq!(p.add(2, "").unwrap(), 8);
    assert_eq!(c.discarded_replies(), 3);
}

#[test]
fn sigkill_of_the_server_in_the_middle_of_a_call_is_a_typed_error() {
    let marker = unique_path("marker");
    let _ = std::fs::remove_file(&marker);
    let (mut server, clients) = start_server(1, Some(&marker));
    let c = &clients[0];
    let p: Proxy<WorkloadService> = c.proxy("c0").unwrap();
    let pid = server.child.id();
    std::thread::scope(|s| {
        // Far longer than the test may take: if the death went unnoticed the call would end by
        // its 30 s timeout with `TimedOut`, not with the error asserted below.
        let call = s.spawn(|| p.sleep_ms(120_000));
        let deadline = Instant::now() + T;
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the call never started");
            std::thread::sleep(Duration::from_millis(2));
        }
        server.child.kill().unwrap(); // SIGKILL, mid-call
        let e = call.join().unwrap().unwrap_err();
        assert_eq!(e, CallError::PeerDead { pid });
    });
    assert_eq!(c.failure(), Some(LinkFailure::PeerDead { pid }));
    // Every later call fails at once, the same way.
    assert_eq!(p.total(), Err(CallError::PeerDead { pid }));
    let _ = std::fs::remove_file(&marker);
}

// ---------------------------------------------------------------------------------------------
// A fork-pool worker hosting the context; the channel is created before the fork.

/// Created by the master before the pool forks, so every worker inherits it.
static CHANNEL: OnceLock<Channel> = OnceLock::new();
/// Never set: the worker's loop ends when the master closes the channel.
static STOP: AtomicBool = AtomicBool::new(false);

/// The worker's job: hosts a context with two counters and serves the inherited channel.
fn serve_in_worker(_: &JobContext) -> u64 {
    let Some(channel) = CHANNEL.get() else {
        return u64::MAX;
    };
    let mut host = Host::new(Context::new("worker"));
    for name in ["c0", "c1"] {
        if host
            .adopt::<WorkloadService, _>(name, Acc::default())
            .is_err()
        {
            return u64::MAX - 1;
        }
    }
    let Ok(server) = Server::attach(channel) else {
        return u64::MAX - 2;
    };
    match host.serve(server, &STOP) {
        Ok(s) if s.end == ServeEnd::ClientClosed => s.calls,
        _ => u64::MAX - 3,
    }
}

/// Runs in a fresh single-threaded copy of this binary (the pool forks).
fn pool_entry() -> i32 {
    let fail = |what: String| {
        eprintln!("{what}");
        1
    };
    match Channel::create(64 << 10) {
        Ok(ch) => {
            let _ = CHANNEL.set(ch);
        }
        Err(e) => return fail(format!("channel: {e}")),
    }
    let mut pool = match Pool::builder()
        .workers(1)
        .reserve(1 << 30)
        .initial_region(16 << 20)
        .build()
    {
        Ok(p) => p,
        Err(e) => return fail(format!("pool: {e}")),
    };
    // Start the serving job and leave it running.
    match pool.run_fn(0, serve_in_worker, Duration::from_millis(1)) {
        Err(PoolError::Timeout { .. }) => {}
        other => return fail(format!("the serving job did not keep running: {other:?}")),
    }
    let Some(channel) = CHANNEL.get() else {
        return fail("no channel".to_owned());
    };
    let client = match Client::attach(channel, &options()) {
        Ok(c) => c,
        Err(e) => return fail(format!("attach: {e}")),
    };
    let (p, b) = match (client.proxy("c0"), client.proxy("c1")) {
        (Ok(p), Ok(b)) => (p, b),
        _ => return fail("lookup failed".to_owned()),
    };
    let worker_pid = match p.pid() {
        Ok(pid) => pid,
        Err(e) => return fail(format!("pid: {e}")),
    };
    if !pool.worker_pids().contains(&(worker_pid as i32)) {
        return fail(format!("answered by {worker_pid}, not a pool worker"));
    }
    let remote = workload(&p, &b);
    let local = in_process(&Context::new("local"));
    if remote != local {
        return fail(format!("worker {remote:?}\nin-process {local:?}"));
    }
    let calls = remote.len() as u64 + 1; // and the pid call
    drop((p, b, client)); // closes the channel: the job returns
    match pool.wait(0, T) {
        Ok(n) if n == calls => 0,
        other => fail(format!(
            "the serving job ended with {other:?}, expected {calls}"
        )),
    }
}

#[test]
fn a_fork_pool_worker_hosts_the_context() {
    let out = isolated::run(pool_entry, Duration::from_secs(120)).unwrap();
    assert!(out.success(), "{:?}\n{}", out.code, out.stderr);
}

// ---------------------------------------------------------------------------------------------
// A shared context: the same workload, with the state in a shared context (lock and object in the
// fork pool's heap). The proxied object forwards each method into the shared context, so every
// call goes local context -> shared context -> back: the nested handoff between the two kinds.

/// A `Workload` whose total lives in a shared context.
struct SharedAcc {
    ctx: context_forkpool::SharedContext,
    total: context_forkpool::SharedHandle<u64>,
}

impl SharedAcc {
    fn update(&self, f: impl FnOnce(&mut u64) -> u64 + Send) -> u64 {
        let h = self.total;
        self.ctx
            .enter(move |s| s.with(h, f))
            .expect("entering the shared context")
            .expect("the shared object")
    }
}

impl Workload for SharedAcc {
    fn add(&mut self, n: u64, tag: &str) -> u64 {
        let add = n + tag.len() as u64;
        self.update(move |t| {
            *t = t.wrapping_add(add);
            *t
        })
    }
    fn total(&self) -> u64 {
        self.update(|t| *t)
    }
    fn sleep_ms(&mut self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        self.total()
    }
    fn boom(&mut self) {
        // Panics inside the shared context, as `Acc::boom` panics inside its own: the panic is
        // caught by the shared context's `enter` and re-raised here, so the proxy reports it the
        // same way.
        let Err(e) = self.ctx.enter(|_| panic!("boom"));
        panic!("{e}");
    }
    fn pid(&self) -> u32 {
        std::process::id()
    }
}

#[test]
fn a_shared_context_gives_the_same_results_as_in_process() {
    let pool = Pool::builder()
        .workers(0)
        .reserve(1 << 30)
        .initial_region(16 << 20)
        .build()
        .expect("a pool without workers (no fork)");
    let shared = context_forkpool::SharedContext::create(pool.heap(), "shared").unwrap();
    let acc = |ctx: &context_forkpool::SharedContext| SharedAcc {
        ctx: ctx.clone(),
        total: ctx.enter(|s| s.alloc(0u64)).unwrap().unwrap(),
    };
    let local = Context::new("front");
    let p = Proxy::adopt(&local, acc(&shared)).unwrap();
    let b = Proxy::adopt(&local, acc(&shared)).unwrap();
    let through_shared = workload(&p, &b);
    let free = in_process(&Context::new("free"));
    // A panic's message names the context it was caught in; every other outcome is identical.
    let strip = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|o| {
                if o.starts_with("panicked") {
                    assert!(o.contains("boom"), "{o}");
                    "panicked".to_owned()
                } else {
                    o.clone()
                }
            })
            .collect()
    };
    assert_eq!(strip(&through_shared), strip(&free));
    assert!(through_shared.iter().any(|o| o == "poisoned"));
    // The state really is in the shared context.
    let total = p.total().unwrap();
    assert_eq!(format!("ok {total}"), *free.last().unwrap());
}
