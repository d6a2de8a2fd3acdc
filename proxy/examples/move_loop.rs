//! Profiling aid: a tight loop of small proxy calls in move mode and serialize mode
//! (`cargo run --release -p context-proxy --example move_loop -- [CALLS] [move|serialize|pinned|pinned-move|pinned-raw|core]`).
//! `pinned-move` and `pinned-raw` split a pinned call's cost: the same call without serialization,
//! and a bare shipped `enter` with an empty closure, each beside the same channel round trip.
use context_core::Context;
use context_proxy::{Mode, Proxy, service};

/// The benchmark's small call.
#[service]
pub trait Small {
    /// Adds `n`, tagged.
    fn add(&mut self, n: u64, tag: &str) -> u64;
}

struct S(u64);
impl Small for S {
    fn add(&mut self, n: u64, tag: &str) -> u64 {
        self.0 += n + tag.len() as u64;
        self.0
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000_000);
    let ctx = Context::new("b");
    let p: Proxy<SmallService> = Proxy::adopt(&ctx, S(0)).expect("adopt");
    let m = p.clone().with_mode(Mode::Move).expect("move");
    let home = Context::pinned("home").expect("pinned context");
    let pinned: Proxy<SmallService> = Proxy::adopt(&home, S(0)).expect("adopt");
    let only = std::env::args().nth(2);
    let raw = only.as_deref() == Some("pinned-raw");
    let moved = pinned.clone().with_mode(Mode::Move).expect("move");
    let pmove = only.as_deref() == Some("pinned-move");
    if only.as_deref() == Some("pinned") || raw || pmove {
        // The pinned call beside its baseline, a request and reply over two crossbeam channels
        // (`pinned-raw`: a bare `enter` with an empty closure instead of the call; `pinned-move`:
        // the call in move mode).
        let (tx, rx) = context_proxy::benchkit::spawn_echo();
        let batch = 2_000;
        let (mut calls, mut echoes) = (Vec::new(), Vec::new());
        for _ in 0..(n / batch).max(1) {
            let t0 = std::time::Instant::now();
            for i in 0..batch {
                if raw {
                    std::hint::black_box(home.enter(|_| std::hint::black_box(i)).expect("enter"));
                    continue;
                }
                let p = if pmove { &moved } else { &pinned };
                std::hint::black_box(
                    p.add(i, context_proxy::benchkit::opaque_tag())
                        .expect("call"),
                );
            }
            calls.push(t0.elapsed().as_nanos() as f64 / batch as f64);
            let t0 = std::time::Instant::now();
            for i in 0..batch {
                tx.send(i).expect("echo");
                std::hint::black_box(rx.recv().expect("echo"));
            }
            echoes.push(t0.elapsed().as_nanos() as f64 / batch as f64);
        }
        calls.sort_by(f64::total_cmp);
        echoes.sort_by(f64::total_cmp);
        let (best_call, best_echo) = (calls[0], echoes[0]);
        let (mid_call, mid_echo) = (calls[calls.len() / 2], echoes[echoes.len() / 2]);
        println!(
            "pinned: {best_call:.0} ns per call, channel round trip {best_echo:.0} ns \
             ({:.2}x; fastest batches of {batch}); medians {mid_call:.0} and {mid_echo:.0} ns ({:.2}x)",
            best_call / best_echo,
            mid_call / mid_echo
        );
        return;
    }
    if only.as_deref() == Some("core") {
        // The floor under move mode: the core's enter and borrow, with no proxy around them.
        let plain = Context::new("plain");
        let h = plain
            .enter(|cx| cx.adopt(S(0)))
            .expect("enter")
            .expect("adopt");
        let batch = 20_000;
        let mut best = f64::INFINITY;
        for _ in 0..(n / batch).max(1) {
            let t0 = std::time::Instant::now();
            for i in 0..batch {
                let tag = context_proxy::benchkit::opaque_tag();
                std::hint::black_box(
                    plain
                        .enter(|cx| cx.with(h, |o| o.add(std::hint::black_box(i), tag)))
                        .expect("enter")
                        .expect("with"),
                );
            }
            best = best.min(t0.elapsed().as_nanos() as f64 / batch as f64);
        }
        println!("core enter + with: {best:.1} ns per call (fastest batch of {batch})");
        return;
    }
    for (name, proxy) in [("move", &m), ("serialize", &p)] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        // The fastest of many short batches: robust to preemption on a shared machine.
        let batch = 20_000;
        let mut best = f64::INFINITY;
        for _ in 0..(n / batch).max(1) {
            let t0 = std::time::Instant::now();
            for i in 0..batch {
                std::hint::black_box(
                    proxy
                        .add(
                            std::hint::black_box(i),
                            context_proxy::benchkit::opaque_tag(),
                        )
                        .expect("call"),
                );
            }
            best = best.min(t0.elapsed().as_nanos() as f64 / batch as f64);
        }
        println!("{name}: {best:.1} ns per call (fastest batch of {batch})");
    }
}
