//! Enters an idle shared context `N` times from the pool's master and reads one object each time:
//! the loop of `ctx bench xproc`'s `shared_context_enter_idle`, without the fork, for a profiler.
//!
//! `cargo build --release -p context-forkpool --example shared_enter_loop`, then
//! `valgrind --tool=callgrind ./target/release/examples/shared_enter_loop 1000000` and again with
//! 2000000: the difference of the two totals over 1,000,000 is the instructions per entry. Without a
//! profiler it prints the nanoseconds per entry and per lock + unlock of a parking_lot mutex, for
//! `ROUNDS` rounds (the optional second argument, default 1).

use std::hint::black_box;
use std::time::Instant;

use context_forkpool::{Pool, SharedContext};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |s| s.parse())?;
    let pool = Pool::builder()
        .workers(1)
        .reserve(1 << 30)
        .initial_region(64 << 20)
        .build()?;
    let scx = SharedContext::create(pool.heap(), "loop")?;
    let obj = scx.enter(|s| s.alloc(7u64))??;
    let rounds: u32 = std::env::args().nth(2).map_or(Ok(1), |s| s.parse())?;
    let mutex = parking_lot::Mutex::new(7u64);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n {
            black_box(scx.enter(|s| s.get(obj)).ok());
        }
        let case = t.elapsed().as_secs_f64() * 1e9 / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            let g = mutex.lock();
            black_box(*g);
            drop(g);
        }
        let base = t.elapsed().as_secs_f64() * 1e9 / n as f64;
        println!(
            "enter+get {case:.1} ns, mutex {base:.1} ns, ratio {:.2}",
            case / base
        );
    }
    Ok(())
}
