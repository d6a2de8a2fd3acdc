//! `ctx bench xproc`: proxies into contexts that live in another process (`context_proxy::xproc`).
//!
//! Cases (each beside baselines measured in the same run, in interleaved trials):
//! - `proxy_call_xproc`: the small call of the proxy benchmarks (`Tally::add(5, 16-byte tag)`,
//!   [`context_proxy::benchkit`]) through an ordinary `Proxy<CounterService>` into a context hosted
//!   by another process: a fresh copy of `ctx` started with `context_forkpool::isolated` (it
//!   allocates, so it must not be a bare fork of this multi-threaded process), reached over the
//!   shared-memory channel whose sealed memfd it sent over a socketpair. Baselines: a 16-byte round
//!   trip over a Unix socketpair (`unix_socket`, target: ratio <= 0.1) and the bare spin-then-futex
//!   ping-pong on a shared word (`spin_futex_pingpong`, target: within 2x), with the echo children of
//!   `context_shmem::benchkit` as in `ctx bench shmem`. This process is pinned to one CPU, the server
//!   and the echo children to another ([`super::placement`]) (the placement spin-based designs are for, and the only one that
//!   gives stable figures); idle children sleep in the kernel while another one is measured.
//!
//! The suite is a list of measurement functions called from [`run`]; others (shared contexts) are
//! added beside [`proxy_call`].

use std::hint::black_box;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use context_core::Context;
use context_forkpool::isolated;
use context_proxy::Proxy;
use context_proxy::benchkit::{CounterClient, CounterService, TAG, Tally, opaque_tag};
use context_proxy::xproc::{Client, ClientOptions, Host, Server, ServerOptions};
use context_shmem::benchkit::{Echo, Transport, pin_current_thread};

use super::placement::Placement;

use crate::bench::{Better, Runner, Target};

/// Tells the server process which CPU to pin itself to (empty: none).
const CPU_ENV: &str = "CTX_BENCH_XPROC_CPU";
/// Name of the counter the server exports.
const COUNTER: &str = "counter";
/// Handshake and per-call timeout: generous, only there so that nothing can hang.
const T: Duration = Duration::from_secs(30);

/// Runs the suite.
pub fn run(r: &mut Runner) -> anyhow::Result<()> {
    let call_ns = proxy_call(r)?;
    let enter_ns = super::shared_context::run(r)?;
    r.row(
        super::shared_context::CASE,
        "ns_per_op",
        enter_ns,
        Better::Lower,
        "proxy_call_xproc",
        call_ns,
        Some(Target::RatioAtMost(0.05)),
    );
    r.note(
        "entering an idle shared context from a pool worker (no message, no process switch) vs \
         the small proxied call into another process measured above in the same run",
    );
    Ok(())
}

/// The server process: pins itself if asked, hosts a `Tally` in a context, receives the socket on
/// its stdin, hands the client a channel and serves it until the client closes it.
fn server_entry() -> i32 {
    let cpu = std::env::var(CPU_ENV).ok().and_then(|c| c.parse().ok());
    let _pinned = match cpu.map(pin_current_thread) {
        Some(Err(e)) => {
            eprintln!("xproc bench server: pinning: {e}");
            return 2;
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let mut host = Host::new(Context::new("bench-xproc-server"));
    if let Err(e) = host.adopt::<CounterService, _>(COUNTER, Tally::default()) {
        eprintln!("xproc bench server: {e}");
        return 3;
    }
    let stream = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("xproc bench server: stdin: {e}");
            return 4;
        }
    };
    let options = ServerOptions {
        handshake_timeout: T,
        ..ServerOptions::default()
    };
    let server = match Server::accept_stream(&stream, &options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xproc bench server: handshake: {e}");
            return 5;
        }
    };
    drop(stream);
    match host.serve(server, &AtomicBool::new(false)) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("xproc bench server: {e}");
            6
        }
    }
}

/// The server process; killed and reaped on drop (it exits by itself once the channel closes).
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server process on `cpu` and returns it with a client connected to it.
fn start_server(cpu: Option<usize>) -> anyhow::Result<(ServerProcess, Client)> {
    let (ours, theirs) = UnixStream::pair().context("socketpair")?;
    let mut cmd = isolated::command(server_entry).context("preparing the server process")?;
    cmd.env(CPU_ENV, cpu.map(|c| c.to_string()).unwrap_or_default())
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let server = ServerProcess(cmd.spawn().context("starting the server process")?);
    drop(cmd); // our copy of its end of the socket
    let options = ClientOptions {
        handshake_timeout: T,
        call_timeout: Some(T),
    };
    let client = Client::handshake(&ours, &options).context("connecting to the server process")?;
    Ok((server, client))
}

/// `proxy_call_xproc` against `unix_socket` and `spin_futex_pingpong`. Returns the call's median
/// nanoseconds (the baseline of the shared-context row).
pub fn proxy_call(r: &mut Runner) -> anyhow::Result<f64> {
    r.step("xproc proxy_call_xproc");
    let place = Placement::new()?;
    let child_cpu = place.partner_cpu();
    let (server, client) = start_server(child_cpu)?;
    let counter: Proxy<CounterService> = client.proxy(COUNTER)?;
    // Fail early and clearly rather than inside a timed loop.
    counter
        .add(0, TAG)
        .context("first call into the server process")?;
    let mut socket = Echo::spawn_on(Transport::UnixSocket, child_cpu)
        .context("forking the unix socket echo child")?;
    let mut futex = Echo::spawn_on(Transport::SpinFutex, child_cpu)
        .context("forking the spin/futex echo child")?;

    let mut calls = 0u64;
    let mut call = |n: u64| -> anyhow::Result<()> {
        for _ in 0..n {
            black_box(counter.add(black_box(5), opaque_tag())?);
        }
        calls += n;
        Ok(())
    };
    let mut sock = |n: u64| socket.roundtrips(n).map_err(anyhow::Error::from);
    let mut word = |n: u64| futex.roundtrips(n).map_err(anyhow::Error::from);
    let med = r.rotate_ns(&mut [
        ("proxy_call_xproc", &mut call),
        ("unix_socket", &mut sock),
        ("spin_futex_pingpong", &mut word),
    ])?;
    // The server really ran every call: its total is 5 per call.
    let total = counter.add(0, TAG)?;
    anyhow::ensure!(
        total == 5 * calls,
        "the server's total is {total}, expected {} after {calls} calls",
        5 * calls
    );
    drop((counter, client));
    drop(server);
    let placement = place.describe("this process", "the server process and the echo children");
    // What each baseline moves: the socket echoes 16 bytes; the ping-pong moves no payload at all,
    // only a shared word each way (the floor under any shared-memory round trip).
    let rows = [
        (
            "unix_socket",
            med[1],
            Target::RatioAtMost(0.1),
            "a 16-byte echo over a Unix socketpair",
        ),
        (
            "spin_futex_pingpong",
            med[2],
            Target::RatioAtMost(2.0),
            "a bare shared-word ping-pong (no payload; spin, then futex)",
        ),
    ];
    for (baseline, value, target, what) in rows {
        r.row(
            "proxy_call_xproc",
            "ns_per_op",
            med[0],
            Better::Lower,
            baseline,
            value,
            Some(target),
        );
        r.note(format!(
            "Tally::add(5, 16-byte tag) through a Proxy into a context of another process vs \
             {what}; {placement}"
        ));
    }
    Ok(med[0])
}
