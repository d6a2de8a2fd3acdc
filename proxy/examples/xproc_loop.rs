//! Profiling aid: a tight loop of small proxied calls into a context of a forked process, beside
//! the bare shared-word ping-pong and the channel's own round trip, each the fastest of many short
//! batches (robust to preemption on a shared machine). This process runs on CPU 0, the server and
//! the echo children on CPU 1, as in `ctx bench xproc`.
//!
//! `cargo run --release -p context-proxy --features xproc --example xproc_loop -- [CALLS] [call]`
//! (`call`: the proxied call only, for `valgrind --tool=callgrind`, which counts both processes).
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use context_core::Context;
use context_proxy::Proxy;
use context_proxy::benchkit::{CounterClient, CounterService, Tally, opaque_tag};
use context_proxy::xproc::{Channel, Client, ClientOptions, Host, Server};
use context_shmem::benchkit::{Echo, Transport, pin_current_thread};

/// Calls per timed batch.
const BATCH: u64 = 2_000;

/// Forks the server (before this process has threads): it hosts a `Tally` on CPU 1 and serves the
/// channel until the client closes it.
fn fork_server(channel: &Channel) -> libc::pid_t {
    // SAFETY: called before this process starts any thread, so the child is a copy of a
    // single-threaded process and may allocate; it leaves with `_exit`, never returning into main.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = (|| {
            let _pin = pin_current_thread(1).ok();
            let mut host = Host::new(Context::new("xproc-loop-server"));
            host.adopt::<CounterService, _>("counter", Tally::default())
                .ok()?;
            let server = Server::attach(channel).ok()?;
            host.serve(server, &AtomicBool::new(false)).ok()
        })()
        .map_or(1, |_| 0);
        // SAFETY: ends the child without running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// The fastest batch of `batches`, in nanoseconds per operation.
fn fastest(batches: u64, mut batch: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..batches {
        let t0 = Instant::now();
        batch();
        best = best.min(t0.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    best
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let only_call = std::env::args().nth(2).as_deref() == Some("call");
    let channel = Channel::create(64 << 10).expect("channel");
    let server = fork_server(&channel);
    let _pin = pin_current_thread(0).ok();
    let client = Client::attach(&channel, &ClientOptions::default()).expect("attach");
    let counter: Proxy<CounterService> = client.proxy("counter").expect("proxy");
    let batches = (n / BATCH).max(1);
    let mut call = || {
        for i in 0..BATCH {
            std::hint::black_box(
                counter
                    .add(std::hint::black_box(i), opaque_tag())
                    .expect("call"),
            );
        }
    };
    if only_call {
        let ns = fastest(batches, call);
        println!("proxy_call_xproc: {ns:.0} ns");
    } else {
        let mut word = Echo::spawn_on(Transport::SpinFutex, Some(1)).expect("ping-pong child");
        let mut chan = Echo::spawn_on(Transport::Channel, Some(1)).expect("channel child");
        let (mut best_call, mut best_word, mut best_chan) =
            (f64::INFINITY, f64::INFINITY, f64::INFINITY);
        // Interleaved rounds, so that a slow phase of the machine touches all three.
        for _ in 0..10 {
            best_call = best_call.min(fastest(batches / 10 + 1, &mut call));
            best_word = best_word.min(fastest(batches / 10 + 1, || {
                word.roundtrips(BATCH).expect("ping-pong");
            }));
            best_chan = best_chan.min(fastest(batches / 10 + 1, || {
                chan.roundtrips(BATCH).expect("channel");
            }));
        }
        println!(
            "proxy_call_xproc: {best_call:.0} ns, ping-pong {best_word:.0} ns ({:.2}x), channel \
             round trip {best_chan:.0} ns ({:.2}x); fastest batches of {BATCH}",
            best_call / best_word,
            best_chan / best_word
        );
    }
    drop((counter, client));
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(server, &mut status, 0) };
}
