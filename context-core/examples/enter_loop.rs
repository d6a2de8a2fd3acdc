//! Profiling aid for the idle paths (for perf or callgrind):
//! `cargo run --release -p context-core --example enter_loop [iterations]`.
//! Prints ns per idle enter, per A -> B -> A round trip, and per parking_lot lock+unlock.
use std::hint::black_box;
use std::time::Instant;

fn time(n: u64, f: impl Fn()) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        f();
    }
    t0.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000_000);
    let a = context_core::Context::new("a");
    let b = context_core::Context::new("b");
    let m = parking_lot::Mutex::new(());
    let p = context_core::Context::pinned("p").expect("home thread");
    let pinned = time(n / 50, || drop(black_box(p.enter(|_| ()))));
    println!("pinned round trip {pinned:.0} ns");
    for _ in 0..3 {
        let enter = time(n, || drop(black_box(b.enter(|_| ()))));
        let round = a
            .enter(|_| time(n, || drop(black_box(b.enter(|_| ())))))
            .unwrap_or(f64::NAN);
        let mutex = time(n, || drop(black_box(m.lock())));
        println!(
            "enter {enter:.2} ns ({:.2}x)  roundtrip {round:.2} ns ({:.2}x)  mutex {mutex:.2} ns",
            enter / mutex,
            round / mutex
        );
    }
}
